"""Checks issue 5's performance targets against a results JSON and prints met / missed.

    python -m benchmarks.targets benchmarks/results/bench-....json

Targets (moelora = "moelora-triton", regime auto; whole layer = "moelora-layer"):
- S1 delta forward >= 70% of the memory floor;
- S1 delta fwd+bwd >= 10x faster than the naive loop;
- S1 whole layer fwd+bwd <= 1.10x frozen nn.Linear fwd+bwd, and faster than PEFT LoRA;
- S3 within 1.5x of its floor (fwd, bwd, fwd+bwd) and ahead of every baseline;
- S5 ahead of the naive loop and torch grouped_mm (needs a moelora FFN op).
A target whose cases did not run reads "not measured".
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _find(cases, shape, group, p, impl) -> Optional[dict]:
    for c in cases:
        if c["shape"] == shape and c["group"] == group and c["pass"] == p and c["impl"] == impl \
                and c.get("status") == "ok":
            return c
    return None


def _target(name, met, detail) -> dict:
    return {"target": name, "status": "not measured" if met is None else ("met" if met else "missed"),
            "detail": detail}


def evaluate(results: dict) -> List[dict]:
    cases = results.get("cases", [])
    out = []

    c = _find(cases, "S1", "delta", "fwd", "moelora-triton")
    pct = c.get("pct_memory_floor") if c else None
    out.append(_target("S1 delta forward >= 70% of memory floor", None if pct is None else pct >= 70,
                       f"{pct:.1f}% of the memory floor ({c['median_ms']:.4f} ms vs {c['memory_floor_ms']:.4f} ms)"
                       if pct is not None else "moelora-triton S1 fwd not measured"))

    m = _find(cases, "S1", "delta", "fwdbwd", "moelora-triton")
    n = _find(cases, "S1", "delta", "fwdbwd", "naive")
    sp = n["median_ms"] / m["median_ms"] if m and n else None
    out.append(_target("S1 delta fwd+bwd >= 10x faster than naive", None if sp is None else sp >= 10,
                       f"{sp:.2f}x ({m['median_ms']:.4f} ms vs naive {n['median_ms']:.4f} ms)" if sp else
                       "moelora-triton or naive S1 fwdbwd not measured"))

    layer = _find(cases, "S1", "layer", "fwdbwd", "moelora-layer")
    lin = _find(cases, "S1", "layer", "fwdbwd", "linear-frozen")
    peft = _find(cases, "S1", "layer", "fwdbwd", "peft-lora")
    ratio = layer["median_ms"] / lin["median_ms"] if layer and lin else None
    out.append(_target("S1 whole layer fwd+bwd <= 1.10x frozen nn.Linear", None if ratio is None else ratio <= 1.10,
                       f"{ratio:.3f}x ({layer['median_ms']:.4f} ms vs {lin['median_ms']:.4f} ms)" if ratio else
                       "moelora-layer or linear-frozen not measured"))
    out.append(_target("S1 whole layer fwd+bwd faster than PEFT LoRA",
                       None if not (layer and peft) else layer["median_ms"] < peft["median_ms"],
                       f"{layer['median_ms']:.4f} ms vs PEFT {peft['median_ms']:.4f} ms" if layer and peft else
                       "moelora-layer or peft-lora not measured"))

    for p in ("fwd", "bwd", "fwdbwd"):
        c = _find(cases, "S3", "delta", p, "moelora-triton")
        if not c or not c.get("floor_ms"):
            out.append(_target(f"S3 {p} within 1.5x of floor", None, "moelora-triton S3 not measured"))
            out.append(_target(f"S3 {p} ahead of every baseline", None, "moelora-triton S3 not measured"))
            continue
        x = c["median_ms"] / c["floor_ms"]
        out.append(_target(f"S3 {p} within 1.5x of floor", x <= 1.5,
                           f"{x:.2f}x the {c['bound']} floor ({c['median_ms']:.4f} ms vs {c['floor_ms']:.4f} ms)"))
        base = [b for b in cases if b["shape"] == "S3" and b["group"] == "delta" and b["pass"] == p
                and not b.get("moelora") and b.get("status") == "ok"]
        if not base:
            out.append(_target(f"S3 {p} ahead of every baseline", None, "no baseline measured"))
        else:
            best = min(base, key=lambda b: b["median_ms"])
            out.append(_target(f"S3 {p} ahead of every baseline", c["median_ms"] < best["median_ms"],
                               f"{c['median_ms']:.4f} ms vs best baseline {best['impl']} {best['median_ms']:.4f} ms "
                               f"({len(base)} baselines)"))

    f = _find(cases, "S5", "ffn", "fwdbwd", "moelora-ffn")
    for base_name in ("naive-ffn", "torch-grouped-mm-ffn"):
        b = _find(cases, "S5", "ffn", "fwdbwd", base_name)
        out.append(_target(f"S5 fwd+bwd ahead of {base_name}", None if not (f and b) else f["median_ms"] < b["median_ms"],
                           f"{f['median_ms']:.4f} ms vs {b['median_ms']:.4f} ms" if f and b else
                           ("moelora exposes no FFN op" if not f else f"{base_name} not measured")))
    return out


def format_targets(targets: List[dict], meta: Optional[dict] = None) -> str:
    lines = []
    if meta and meta.get("device_type") != "cuda":
        lines.append("note: CPU run with the tiny stand-in shapes; the targets are defined for the GPU suite")
    width = max(len(t["target"]) for t in targets)
    for t in targets:
        lines.append(f"{t['status']:12s} {t['target'].ljust(width)}  {t['detail']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a results JSON written by python -m benchmarks")
    args = parser.parse_args(argv)
    with open(args.results) as fh:
        results = json.load(fh)
    print(format_targets(evaluate(results), results.get("meta")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
