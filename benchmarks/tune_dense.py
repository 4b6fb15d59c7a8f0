"""Measure the tiles of the dense MoE-LoRA kernels: moelora.kernels.launchers.DENSE_CONFIGS.

    python -m benchmarks.tune_dense --out tune-dense.json    # GPU: about a minute on an H100/H200
    python -m benchmarks.tune_dense --out smoke.json         # CPU: a tiny smoke run (interpreter)

Every kernel that the dense regime of moe_lora and the fused MoELoRALinear launch on S1
(d_in = d_out 4096, r 16, E 8, k 2, shared A; bf16) is timed at T 8192 ("many" rows) and
T 1024 ("few") with the launcher's default tiles and with each candidate of
benchmarks/tile_candidates.py:

- lora_down: h = x A^T, with and without the router's columns;
- gated_expand: y = base + Hg B_stack^T, with a base output (moe_lora) and with a bias (the layer);
- matmul: dHg = dy B_stack and dx = dh A (+ d logits W_router, the layer's);
- lora_weight_grad: dB, dA (and the router's weight gradient, the layer's).

The timings of one shape class (launchers.dense_shape_class) are summed. A candidate
that beats the defaults by more than MIN_GAIN is installed into DENSE_CONFIGS; then
moe_lora and MoELoRALinear forward+backward at S1 are timed with the default tiles and
with the picks. bf16 on a GPU (fp32 on CPU). Every choice is made on device time
(timing.device_median_ms: the kernels back to back from a cold L2, the host's launch cost
excluded; the launches of a small kernel cost the host more than the kernel costs the
device, so eager timings would compare host costs); each job's time at the best tiles is
recorded beside its memory floor at the copy bandwidth measured in the same run, and the end
to end calls' wall times beside their device times (``end_to_end_wall``). The JSON holds
every timing, ``dense_configs`` (what ``python -m benchmarks --tuned`` installs) and
``paste``: the lines to put into DENSE_CONFIGS. Every candidate is checked against a float64
reference under the interpreter by tests/kernels/test_launchers.py and compiled for
sm_90 by ``python -m benchmarks.compile_kernels``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moelora defines its kernels

import moelora  # noqa: E402
from moelora.kernels import launchers as K  # noqa: E402

from . import ceilings, tile_candidates  # noqa: E402
from .inputs import tensor_bytes  # noqa: E402
from .report import metadata, refuse_bad_tuning_options  # noqa: E402
from .timing import Budget, compile_in_parallel, device_median_ms, median_ms  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
MIN_GAIN = 0.03  # a candidate must beat the defaults by this share to enter the table


class Sizes(NamedTuple):
    tokens: int
    d: int
    rank: int
    experts: int
    top_k: int


ROW_SIZES = [Sizes(8192, 4096, 16, 8, 2), Sizes(1024, 4096, 16, 8, 2)] if GPU else [Sizes(64, 32, 16, 4, 2)]


class Job(NamedTuple):
    name: str
    kernel: str  # a DENSE_TILE_KEYS key
    shape_class: str
    run: Callable[[Dict[str, int]], object]  # tiles -> launch
    nbytes: int  # what the launch must move at least: each operand read once, each output written once


def _randn(*shape, dtype=None):
    return torch.randn(*shape, device=DEVICE).to(dtype or DTYPE)


def jobs(s: Sizes) -> List[Job]:
    """The dense regime's and fused layer's kernel launches at sizes ``s``, on random inputs."""
    T, d, r, E, k = s
    acc = K.accumulator_dtype(DTYPE)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.rand(T, E, generator=g).argsort(1)[:, :k].to(DEVICE)
    w = torch.rand(T, k, generator=g).to(DEVICE)
    x, base, dy = _randn(T, d), _randn(T, d), _randn(T, d)
    a, b, router, bias = _randn(r, d), _randn(E, d, r), _randn(E, d), _randn(d)
    h, dh, dl = _randn(T, r, dtype=acc), _randn(T, r, dtype=acc), _randn(T, E, dtype=acc)
    hg = _randn(T, E * r)
    da, db, dr = torch.empty_like(a), torch.empty_like(b), torch.empty_like(router)
    down = K.dense_shape_class("lora_down", T, r, d)
    expand = K.dense_shape_class("gated_expand", T, d, E * r)
    wgrad = K.dense_shape_class("lora_weight_grad", T, d, E * r)
    y = _randn(T, d)  # an output of the job's shape and dtype, for its byte count
    return [
        Job("h = x A^T", "lora_down", down, lambda t: K.lora_down(x, a, tiles=t), tensor_bytes(x, a, h)),
        Job("h, logits = x [A; W_router]^T", "lora_down", down, lambda t: K.lora_down(x, a, router, tiles=t),
            tensor_bytes(x, a, router, h, dl)),
        Job("y = base + Hg B^T", "gated_expand", expand,
            lambda t: K.gated_expand(h, ids, w, b, scaling=2.0, shared_a=True, base=base, out_dtype=DTYPE,
                                     compute_dtype=DTYPE, tiles=t), tensor_bytes(h, ids, w, b, base, y)),
        Job("y = bias + Hg B^T (layer)", "gated_expand", expand,
            lambda t: K.gated_expand(h, ids, w, b, scaling=2.0, shared_a=True, bias=bias, out_dtype=DTYPE,
                                     compute_dtype=DTYPE, tiles=t), tensor_bytes(h, ids, w, b, bias, y)),
        Job("dHg = dy B_stack", "matmul", K.dense_shape_class("matmul", T, E * r, d),
            lambda t: K.matmul(dy, b, stacked_b=True, out_dtype=acc, compute_dtype=DTYPE, tiles=t),
            tensor_bytes(dy, b) + T * E * r * torch.finfo(acc).bits // 8),
        Job("dx = dh A", "matmul", K.dense_shape_class("matmul", T, d, r),
            lambda t: K.matmul(dh, a, out_dtype=DTYPE, compute_dtype=DTYPE, tiles=t), tensor_bytes(dh, a, y)),
        Job("dx = dh A + dl W_router (layer)", "matmul", K.dense_shape_class("matmul", T, d, r),
            lambda t: K.matmul(dh, a, out_dtype=DTYPE, compute_dtype=DTYPE, second=(dl, router), tiles=t),
            tensor_bytes(dh, a, dl, router, y)),
        Job("dB, dA", "lora_weight_grad", wgrad,
            lambda t: K.lora_weight_grad(dy, x, hg, dh, None, rank=r, scaling=2.0, dlora_b=db, dlora_a=da, tiles=t),
            tensor_bytes(dy, x, hg, dh, db, da)),
        Job("dB, dA, dW_router (layer)", "lora_weight_grad", wgrad,
            lambda t: K.lora_weight_grad(dy, x, hg, dh, dl, rank=r, scaling=2.0, dlora_b=db, dlora_a=da, drouter=dr,
                                         tiles=t), tensor_bytes(dy, x, hg, dh, dl, db, da, dr)),
    ]


def candidates(kernel: str) -> List[Dict[str, int]]:
    """The default tiles ({}) first, then the kernel's candidates."""
    return [{}] + (tile_candidates.DENSE if GPU else tile_candidates.DENSE_SMOKE)[kernel]


def _key(tiles: Dict[str, int]) -> str:
    return json.dumps(tiles, sort_keys=True)


def tune_classes(all_jobs: List[Job], repeats: int, budget: Budget, report: dict, copy_gbps: float) -> None:
    """Time every candidate of each shape class on its jobs (device time: ``device_median_ms``);
    install the best where it beats the defaults by MIN_GAIN; record each job's time at the best
    tiles beside its memory floor at ``copy_gbps``. Classes left when the budget is spent are
    skipped (recorded)."""
    classes: Dict[str, List[Job]] = {}
    for job in all_jobs:
        classes.setdefault(job.shape_class, []).append(job)
    compile_in_parallel([lambda j=j, c=c: j.run(c) for j in all_jobs for c in candidates(j.kernel)])
    for shape_class, members in classes.items():
        if budget.exhausted():
            report["skipped"].append(f"tiles {shape_class}: budget")
            continue
        entry = {"kernel": members[0].kernel, "jobs": [j.name for j in members], "candidates": {}}
        per_job = {}
        for tiles in candidates(members[0].kernel):
            try:
                per_job[_key(tiles)] = [device_median_ms(lambda j=j: j.run(tiles), repeats, DEVICE) for j in members]
                entry["candidates"][_key(tiles)] = sum(per_job[_key(tiles)])
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: recorded, skipped
                entry["candidates"][_key(tiles)] = f"error: {type(err).__name__}: {err}"[:200]
        timed = {key: ms for key, ms in entry["candidates"].items() if isinstance(ms, float)}
        default = timed.get(_key({}))
        if timed and default is not None:
            best = min(timed, key=timed.get)
            entry.update(best=best, best_ms=timed[best], default_ms=default)
            entry["best_per_job"] = {j.name: dict(ms=ms, memory_floor_ms=j.nbytes / (copy_gbps * 1e6))
                                     for j, ms in zip(members, per_job[best])}
            if best != _key({}) and timed[best] < (1 - MIN_GAIN) * default:
                report["dense_configs"][shape_class] = json.loads(best)
        report["tiles"][shape_class] = entry


def time_end_to_end(repeats: int, report: dict, label: str) -> None:
    """moe_lora (dense regime) and MoELoRALinear (softmax_topk, aux loss) forward+backward at the
    first ROW_SIZES, with the tiles installed now."""
    T, d, r, E, k = ROW_SIZES[0]
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.rand(T, E, generator=g).argsort(1)[:, :k].to(DEVICE)
    w = torch.rand(T, k, generator=g).to(DEVICE).requires_grad_()
    x = _randn(T, d).requires_grad_()
    a, b = _randn(r, d).requires_grad_(), _randn(E, d, r).requires_grad_()
    dy = _randn(T, d)
    layer = moelora.MoELoRALinear(torch.nn.Linear(d, d, device=DEVICE, dtype=DTYPE), num_experts=E, top_k=k, r=r,
                                  share_lora_a=True).train()
    layer.base_layer.requires_grad_(False)
    params = [p for p in layer.parameters() if p.requires_grad]

    def op():
        torch.autograd.grad(moelora.moe_lora(x, a, b, ids, w, scaling=2.0, regime="dense"), [x, a, b, w], dy)

    def linear():
        y = layer(x)
        torch.autograd.grad([y, layer.last_aux_loss], [x] + params, [dy, torch.ones((), device=DEVICE)])

    out = report["end_to_end"].setdefault(label, {})
    wall = report["end_to_end_wall"].setdefault(label, {})
    with moelora.use_backend("triton"), moelora.validation(False):
        for name, step in (("moe_lora fwd+bwd", op), ("MoELoRALinear fwd+bwd", linear)):
            try:
                out[name] = device_median_ms(step, repeats, DEVICE)
                wall[name] = median_ms(step, repeats, DEVICE)
            except Exception as err:  # noqa: BLE001 - recorded
                report["errors"].append(f"end to end {label} {name}: {type(err).__name__}: {err}"[:300])


def paste_text(report: dict) -> str:
    lines = ["# moelora/kernels/launchers.py", "DENSE_CONFIGS: Dict[str, Dict[str, int]] = {"]
    for shape_class, tiles in report["dense_configs"].items():
        entry = report["tiles"][shape_class]
        args = ", ".join(f"{name}={value}" for name, value in tiles.items())
        lines.append(f'    # {entry["best_ms"]:.4f} ms, default {entry["default_ms"]:.4f} ms')
        lines.append(f'    "{shape_class}": dict({args}),')
    lines.append("}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tune-dense.json", help="JSON file to write")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds; classes left after it are skipped")
    parser.add_argument("--repeats", type=int, default=20 if GPU else 1)
    args = parser.parse_args(argv)
    refuse_bad_tuning_options(parser, args)
    budget = Budget(args.budget)
    report = {"meta": metadata(DEVICE), "dtype": str(DTYPE), "sizes": [s._asdict() for s in ROW_SIZES],
              "tiles": {}, "dense_configs": {}, "end_to_end": {}, "end_to_end_wall": {},
              "skipped": [], "errors": []}
    torch.manual_seed(0)
    t0 = time.monotonic()
    previous = dict(K.DENSE_CONFIGS)
    K.install_dense_configs({}, replace=True)  # the defaults are what the candidates compete with
    try:
        time_end_to_end(args.repeats, report, "default tiles")
        report["ceilings"] = ceilings.measure(DEVICE, DTYPE)
        tune_classes([job for s in ROW_SIZES for job in jobs(s)], args.repeats, budget, report,
                     report["ceilings"]["copy_GBps"])
        K.install_dense_configs(report["dense_configs"])
        time_end_to_end(args.repeats, report, "tuned tiles")
    finally:
        K.install_dense_configs(previous, replace=True)
    report["seconds"] = time.monotonic() - t0
    report["paste"] = paste_text(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for shape_class, entry in report["tiles"].items():
        floors = ", ".join(f"{job['ms'] / job['memory_floor_ms']:.1f}x"
                           for job in entry.get("best_per_job", {}).values())
        print(f"{shape_class}: default {entry.get('default_ms')} ms, best {entry.get('best')} "
              f"{entry.get('best_ms')} ms (jobs at {floors or '-'} their memory floors)")
    print("end to end, device ms:", json.dumps(report["end_to_end"]))
    print("end to end, wall ms:", json.dumps(report["end_to_end_wall"]))
    if report["skipped"] or report["errors"]:
        print("skipped:", report["skipped"], "errors:", report["errors"])
    print(report["paste"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
