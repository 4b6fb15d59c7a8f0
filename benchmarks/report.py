"""Results file and text table: run metadata, comparisons between cases, JSON, table."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import torch

REFERENCE_IMPL = {"delta": "naive", "sweep": "naive", "ffn": "naive-ffn"}


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def metadata(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    import moelora
    head = _git("rev-parse", "HEAD")
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "moelora": getattr(moelora, "__version__", None),
        "moelora_features": {n: hasattr(moelora, n) for n in
                             ("moe_lora", "MoELoRALinear", "route", "dispatch", "combine", "moe_ffn")},
        # A copy of the tree (e.g. on a lent GPU machine, whose .git may name another commit, or
        # none) names its commit in MOELORA_GIT_COMMIT, which wins; its cleanliness is then unknown.
        "git_commit": os.environ.get("MOELORA_GIT_COMMIT") or head,
        "git_dirty": bool(_git("status", "--porcelain")) if head and not os.environ.get("MOELORA_GIT_COMMIT") else None,
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    total_memory=props.total_memory, l2_cache=getattr(props, "L2_cache_size", None))
    for dist in ("peft", "matplotlib", "liger-kernel", "unsloth", "fms-acceleration-moe"):
        try:
            meta[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            meta[dist] = None
    return meta


def annotate(cases: List[dict]) -> None:
    """Add speedup_vs_naive (delta, sweep, ffn) and ratio_vs_linear (layer) to ok cases."""
    index: Dict[tuple, dict] = {(c["shape"], c["tokens"], c["group"], c["pass"], c["impl"]): c
                                for c in cases if c.get("status") == "ok"}
    for key, c in index.items():
        shape, tokens, group, p, impl = key
        ref_name = REFERENCE_IMPL.get(group)
        if ref_name:
            ref = index.get((shape, tokens, group, p, ref_name))
            if ref:
                c["speedup_vs_naive"] = ref["median_ms"] / c["median_ms"]
        elif group == "layer":
            ref = index.get((shape, tokens, group, p, "linear-frozen-autocast" if impl.endswith("-autocast")
                             else "linear-frozen"))
            if ref:
                c["ratio_vs_linear"] = c["median_ms"] / ref["median_ms"]


def result_paths(out_dir: Path, meta: dict) -> Dict[str, Path]:
    name = re.sub(r"[^A-Za-z0-9]+", "-", meta["device_name"]).strip("-").lower() or meta["device_type"]
    stamp = meta["date"].replace(":", "").replace("-", "")[:15]
    stem = f"bench-{name}-{stamp}"
    return {"json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png"}


def unwritable_dir(path: Path) -> Optional[str]:
    """Why files could not be written into the directory ``path`` (created where missing: its nearest existing
    ancestor must be a writable directory), or None."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def output_file_problem(path) -> Optional[str]:
    """Why a report could not be written to the file ``path`` (its directory created where missing), or None:
    checked before a tuning run, so that a bad --out does not lose its measurements."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory"
    return unwritable_dir(path.parent)


def refuse_bad_tuning_options(parser, args) -> None:
    """``parser.error`` (usage, exit status 2) where a tuner's --out cannot be written, --repeats is below 1 or
    --budget below 0: checked before the tuning run, whose measurements a bad option would lose."""
    problem = output_file_problem(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.budget < 0:
        parser.error(f"--budget must be non-negative, got {args.budget}")


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(cases: List[dict], markdown: bool = False) -> str:
    head = ["case", "median ms", "IQR ms", "host ms", "device ms", "kernels", "GB/s", "TFLOP/s", "% floor", "peak MB",
            "saved MB", "vs naive", "status"]
    rows = []
    for c in cases:
        if c.get("status") == "ok":
            vs = (f"{c['speedup_vs_naive']:.2f}x" if "speedup_vs_naive" in c else
                  f"{c['ratio_vs_linear']:.3f} of lin" if "ratio_vs_linear" in c else "-")
            rows.append([c["id"], _fmt(c.get("median_ms"), ".4f"), _fmt(c.get("iqr_ms"), ".4f"),
                         _fmt(c.get("host_median_ms"), ".3f"), _fmt(c.get("device_median_ms"), ".4f"),
                         _fmt(c.get("kernels_per_iter"), "d"),
                         _fmt(c.get("GBps"), ".0f"), _fmt(c.get("TFLOPs"), ".1f"), _fmt(c.get("pct_floor"), ".1f"),
                         _fmt(c["peak_bytes"] / 2**20 if c.get("peak_bytes") is not None else None, ".1f"),
                         _fmt(c["saved_bytes"] / 2**20 if c.get("saved_bytes") is not None else None, ".2f"),
                         vs, "ok"])
        elif c.get("status") == "error":
            rows.append([c["id"]] + ["-"] * (len(head) - 2) + ["error: " + c["error"].splitlines()[0][:60]])
        # skipped cases are listed in the JSON and summarised below the table
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
        fmt = lambda r: "  ".join(str(v).ljust(w) if i == 0 or i == len(head) - 1 else str(v).rjust(w)
                                  for i, (v, w) in enumerate(zip(r, widths)))
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    skipped = {}
    for c in cases:
        if c.get("status") == "skipped":
            skipped.setdefault(c.get("reason", "?"), set()).add(c["impl"])
    for reason, impls in skipped.items():
        lines.append(f"skipped {', '.join(sorted(impls))}: {reason}")
    return "\n".join(lines)
