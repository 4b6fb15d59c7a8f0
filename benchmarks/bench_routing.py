"""Routing benchmark: moelora's fused route + dispatch_metadata + dispatch + combine against
the plain PyTorch chain (softmax, topk, argsort, index_select, index_add).

    python -m benchmarks.bench_routing --out routing.json

On a GPU: T in {8192, 65536}, E in {8, 64}, k = 2, d = 4096, bf16; CUDA events after
warm-up, median of --repeats runs, per stage and end to end. On CPU: one tiny smoke shape
only (the numbers mean nothing; GPU numbers need a GPU). Writes JSON with the device,
torch / triton / CUDA versions, git commit, shapes, raw timings and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

import moelora
from moelora.ops import native as _ext


def _git_commit() -> str:
    """HEAD of the checkout, else MOELORA_GIT_COMMIT (a tree copied without .git), else "unknown"."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("MOELORA_GIT_COMMIT", "unknown")


def _time(fn, repeats: int, warmup: int, cuda: bool) -> list:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)  # us
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return times


def torch_chain(logits, x, k):
    """Plain PyTorch: softmax, topk, argsort, index_select, weighted index_add."""
    probs = torch.softmax(logits.float(), -1)
    w, ids = torch.topk(probs, k, -1)
    order = torch.argsort(ids.reshape(-1), stable=True)
    xs = x.index_select(0, order // k)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, order // k, xs.float() * w.reshape(-1)[order, None])
    return out.to(x.dtype)


def moelora_chain(logits, x, k):
    r = moelora.route(logits, k)
    meta = moelora.dispatch_metadata(r.ids, logits.shape[-1])
    return moelora.combine(moelora.dispatch(x, meta), meta, r.weights)


def bench_shape(T, E, k, d, dtype, device, repeats, warmup):
    cuda = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(T, E, device=device, generator=g).to(dtype)
    x = torch.randn(T, d, device=device, generator=g).to(dtype)
    with moelora.validation(False):
        r = moelora.route(logits, k)
        meta = moelora.dispatch_metadata(r.ids, E)
        xs = moelora.dispatch(x, meta)
        stages = {
            "route": lambda: moelora.route(logits, k),
            "dispatch_metadata": lambda: moelora.dispatch_metadata(r.ids, E),
            "dispatch": lambda: moelora.dispatch(x, meta),
            "combine": lambda: moelora.combine(xs, meta, r.weights),
            "moelora_chain": lambda: moelora_chain(logits, x, k),
            "torch_chain": lambda: torch_chain(logits, x, k),
        }
        raw = {name: _time(fn, repeats, warmup, cuda) for name, fn in stages.items()}
    med = {name: statistics.median(v) for name, v in raw.items()}
    return {
        "shape": {"T": T, "E": E, "k": k, "d": d, "dtype": str(dtype).replace("torch.", "")},
        "median_us": med,
        "speedup_vs_torch_chain": med["torch_chain"] / med["moelora_chain"],
        "raw_us": raw,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.warmup < 0:
        ap.error(f"--warmup must be non-negative, got {args.warmup}")
    out_dir = Path(args.out).resolve().parent  # checked before the timings, which its absence would lose
    if Path(args.out).is_dir() or not out_dir.is_dir() or not os.access(out_dir, os.W_OK):
        ap.error(f"--out {args.out}: cannot write a file there (a writable directory's file name is expected)")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        shapes = [(T, E, 2, 4096) for T in (8192, 65536) for E in (8, 64)]
        dtype, repeats, warmup = torch.bfloat16, args.repeats, args.warmup
    else:
        print("No GPU: running a tiny CPU smoke shape only; GPU numbers need a GPU.")
        shapes = [(256, 8, 2, 64)]
        dtype, repeats, warmup = torch.bfloat16, min(args.repeats, 5), 1
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    results = [bench_shape(*s, dtype, device, repeats, warmup) for s in shapes]
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke run, not a benchmark)",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "native_cpu_kernels": _ext.has_cpu_kernels(),
        "native_cuda_kernels": _ext.has_cuda_kernels(),
        "timer": "CUDA events" if cuda else "time.perf_counter",
        "repeats": repeats,
        "warmup": warmup,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    for r in results:
        s, m = r["shape"], r["median_us"]
        print(f"T={s['T']:6d} E={s['E']:3d} k={s['k']} d={s['d']}: "
              + "  ".join(f"{n}={v:.1f}us" for n, v in m.items())
              + f"  speedup={r['speedup_vs_torch_chain']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
