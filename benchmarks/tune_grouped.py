"""Measure what moelora's grouped paths choose from tables: the grouped kernels' tile
configs per shape class, the MoE FFN's GEMM engine, and the MoE-LoRA regime crossover.

    python -m benchmarks.tune_grouped --out tune.json      # GPU: about 90 s on an H100/H200
    python -m benchmarks.tune_grouped --out smoke.json     # CPU: a tiny smoke run (interpreter)

1. Tiles: for each shape class of moelora.kernels.launchers.grouped_shape_class met at S5 (the
   upcycled FFN: T 8192, d 2048, d_ff 5632, E 8, k 2) and S3 (MoE-LoRA: T 32768, d 4096,
   r 64, E 64, k 4, shared A), a handful of TileConfigs of grouped_matmul /
   grouped_weight_grad are timed on the GEMMs of that class (summed), beside torch's
   grouped_mm on the same GEMMs (operands already in row space; S3's rows h B^T as moe_lora's
   forward runs it on grouped_mm, h gathered: the pick for moelora.ops.moe_lora.ROWS_ENGINES).
2. FFN engine: moe_ffn forward+backward at S5 with each (GEMM, weight-gradient) engine pair
   (tuned tiles installed), for moelora.ops.moe_ffn.FFN_ENGINES.
3. Regime: moe_lora forward+backward, dense against grouped, shared A, r 16, E*r from 256
   to 2048 at k = 2 and 4 (T 8192), plus S2 and S4 (per-expert A), for
   moelora.ops.moe_lora.DENSE_MAX_WIDTH (the E*r up to which dense runs).

Everything is bf16 on a GPU (fp32 on CPU). Every choice is made on device time
(timing.device_median_ms: the kernels back to back from a cold L2, the host's launch cost
excluded); the FFN plans and the regimes also record their eager wall times (``_wall_ms``),
where the host's launch cost counts. The candidates of a stage are compiled in parallel
threads first. ``--budget`` (s) skips what is left
when it runs out (recorded). The JSON holds every timing and ``paste``: the Python lines
to put into those tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moelora defines its kernels

import moelora  # noqa: E402
from moelora.kernels import launchers as K
from moelora.ops import moe_ffn as ffn, moe_lora as moe_lora_module
from moelora.ops.grouped_linear import group_ends, grouped_mm_fn, native_major, rows_linear, rows_weight_grad
from moelora.kernels.launchers import TileConfig
from moelora.ops.routing import dispatch_rows, expert_layout

from . import tile_candidates  # noqa: E402
from .report import metadata, refuse_bad_tuning_options  # noqa: E402
from .timing import Budget, compile_in_parallel, device_median_ms, median_ms  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32

LAYOUT_BLOCK = 128 if GPU else 32  # every candidate's row tile divides it
TILES_SHARE = 0.6  # of the budget; the FFN engine and regime stages get the rest


class Sizes(NamedTuple):
    tokens: int
    d: int
    d_ff: int  # FFN; the rank r for MoE-LoRA
    experts: int
    top_k: int


S5 = Sizes(8192, 2048, 5632, 8, 2) if GPU else Sizes(64, 32, 64, 4, 2)
S3 = Sizes(32768, 4096, 64, 64, 4) if GPU else Sizes(64, 32, 16, 8, 4)


def _randn(*shape, scale=1.0, dtype=None):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype or DTYPE)


def _routing(s: Sizes):
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.rand(s.tokens, s.experts, generator=g).argsort(1)[:, :s.top_k].to(DEVICE)
    return ids, torch.rand(s.tokens, s.top_k, generator=g).to(DEVICE)


class Gemm(NamedTuple):
    name: str
    kernel: str  # "matmul" or "wgrad"
    shape_class: str
    triton: Callable[[TileConfig], object]
    grouped_mm: Optional[Callable[[], object]]


def ffn_gemms(s: Sizes) -> List[Gemm]:
    """The S5 FFN's grouped GEMMs (stacked [gate; up] weight w13 as the benchmark's; forward,
    dx, weight gradients) on random row-space data."""
    ids, _ = _routing(s)
    meta = expert_layout(ids, s.experts, LAYOUT_BLOCK)
    offs = group_ends(meta)
    R = meta.sorted_pairs_padded.numel()
    many = K.many_rows(s.tokens * s.top_k, s.experts)
    x = _randn(s.tokens, s.d)
    xs = dispatch_rows(x, meta)
    w13 = _randn(s.experts, 2 * s.d_ff, s.d, scale=s.d ** -0.5)
    w2 = _randn(s.experts, s.d, s.d_ff, scale=s.d_ff ** -0.5)
    h, d13, d_out = _randn(R, s.d_ff), _randn(R, 2 * s.d_ff), _randn(R, s.d)
    gmm = grouped_mm_fn()
    mm_class = K.grouped_shape_class("matmul", 2 * s.d_ff, s.d, many)
    wg_class = K.grouped_shape_class("wgrad", 2 * s.d_ff, s.d, many)
    return [
        Gemm("S5 h13 = x W13^T", "matmul", mm_class,
             lambda c: rows_linear(x, w13, meta, "triton", a_by_token=True, config=c),
             lambda: gmm(xs, w13.transpose(1, 2), offs=offs)),
        Gemm("S5 out = h W2^T", "matmul", mm_class,
             lambda c: rows_linear(h, w2, meta, "triton", config=c),
             lambda: gmm(h, w2.transpose(1, 2), offs=offs)),
        Gemm("S5 dx rows = d13 W13", "matmul", mm_class,
             lambda c: rows_linear(d13, w13, meta, "triton", transposed=True, config=c),
             lambda: gmm(d13, w13, offs=offs)),
        Gemm("S5 dW13 = d13^T x", "wgrad", wg_class,
             lambda c: rows_weight_grad(d13, x, meta, "triton", right_by_token=True, out_dtype=DTYPE, config=c),
             lambda: gmm(d13.t(), xs, offs=offs)),
        Gemm("S5 dW2 = d_out^T h", "wgrad", wg_class,
             lambda c: rows_weight_grad(d_out, h, meta, "triton", out_dtype=DTYPE, config=c),
             lambda: gmm(d_out.t(), h, offs=offs)),
    ]


# The grouped forward's rows GEMM; on grouped_mm timed as moe_lora's forward runs it (h scaled,
# rounded and gathered into row space, the group ends, the GEMM): moe_lora.ROWS_ENGINES.
ROWS_GEMM = "S3 y rows = h B^T"


def lora_gemms(s: Sizes) -> List[Gemm]:
    """The S3 grouped regime's GEMMs: y rows = s w h B^T, dh = s w dy B (with the gate
    gradient epilogue), dB = s dy^T (w h)."""
    ids, w = _routing(s)
    meta = expert_layout(ids, s.experts, LAYOUT_BLOCK)
    offs = group_ends(meta)
    many = K.many_rows(s.tokens * s.top_k, s.experts)
    r = s.d_ff
    h, dy = _randn(s.tokens, r, dtype=torch.float32), _randn(s.tokens, s.d)
    lora_b = _randn(s.experts, s.d, r)
    flat_w, dw = w.reshape(-1), torch.empty(s.tokens * s.top_k, device=DEVICE)
    hs, dys = dispatch_rows(h.to(DTYPE), meta), dispatch_rows(dy, meta)
    gmm = grouped_mm_fn()
    common = dict(compute_dtype=DTYPE, alpha=2.0, scale=flat_w)
    return [
        Gemm(ROWS_GEMM, "matmul", K.grouped_shape_class("matmul", s.d, r, many),
             lambda c: rows_linear(h, lora_b, meta, "triton", a_by_token=True, out_dtype=DTYPE, config=c, **common),
             lambda: moe_lora_module.grouped_rows(h, lora_b, meta, w, 2.0, "grouped_mm", DTYPE, h_by_token=True)),
        Gemm("S3 dh rows = dy B (+ dw)", "matmul", K.grouped_shape_class("matmul", r, s.d, many),
             lambda c: rows_linear(dy, lora_b, meta, "triton", a_by_token=True, transposed=True,
                                   out_dtype=torch.float32, gate_grad=(h, True, dw), config=c, **common),
             lambda: gmm(dys, lora_b, offs=offs)),
        Gemm("S3 dB = dy^T h", "wgrad", K.grouped_shape_class("wgrad", s.d, r, many),
             lambda c: rows_weight_grad(dy, h, meta, "triton", left_by_token=True, right_by_token=True,
                                        out_dtype=DTYPE, config=c, **common),
             lambda: gmm(dys.t(), hs, offs=offs)),
    ]


def candidates(kernel: str, shape_class: str) -> List[TileConfig]:
    if not GPU:
        return [TileConfig(*c) for c in tile_candidates.GROUPED_SMOKE]
    widths = shape_class.split(":")[1]
    table = tile_candidates.GROUPED_MATMUL if kernel == "matmul" else tile_candidates.GROUPED_WGRAD
    return [TileConfig(*c) for c in table.get(widths, table["ll"])]


def tune_tiles(gemms: List[Gemm], repeats: int, budget: Budget, report: dict) -> None:
    """Time every candidate of each class on its GEMMs (compiled class by class, in parallel);
    install the best in K.GROUPED_CONFIGS. Classes left when TILES_SHARE of the budget is
    spent are skipped (recorded)."""
    classes: Dict[str, List[Gemm]] = {}
    for g in gemms:
        classes.setdefault(g.shape_class, []).append(g)
    for shape_class, members in classes.items():
        if budget.seconds is not None and budget.elapsed() > TILES_SHARE * budget.seconds:
            report["skipped"].append(f"tiles {shape_class}: budget")
            continue
        compile_in_parallel([lambda g=g, c=c: g.triton(c) for g in members for c in candidates(g.kernel, shape_class)])
        entry = {"gemms": [g.name for g in members], "candidates": {}, "grouped_mm_ms": {}}
        for config in candidates(members[0].kernel, shape_class):
            try:
                total = sum(device_median_ms(lambda g=g: g.triton(config), repeats, DEVICE) for g in members)
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: recorded, skipped
                entry["candidates"][_config_key(config)] = f"error: {type(err).__name__}: {err}"[:200]
                continue
            entry["candidates"][_config_key(config)] = total
        for g in members:
            if g.grouped_mm is not None and grouped_mm_fn() is not None:
                entry["grouped_mm_ms"][g.name] = device_median_ms(g.grouped_mm, repeats, DEVICE)
        timed = {k: v for k, v in entry["candidates"].items() if isinstance(v, float)}
        if timed:
            best = min(timed, key=timed.get)
            entry["best"] = best
            entry["triton_best_ms"] = timed[best]
            entry["grouped_mm_total_ms"] = sum(entry["grouped_mm_ms"].values()) or None
            K.install_grouped_configs({shape_class: json.loads(best)})
        report["tiles"][shape_class] = entry


def _config_key(c: TileConfig) -> str:
    return json.dumps(list(c))


def time_ffn_plans(s: Sizes, repeats: int, report: dict) -> None:
    """moe_ffn forward+backward at S5 (SwiGLU, stacked w13 as the benchmark's) on each
    (GEMM engine, weight-gradient engine) pair."""
    ids, w = _routing(s)
    x = _randn(s.tokens, s.d).requires_grad_()
    weights = w.requires_grad_()
    w13 = _randn(s.experts, 2 * s.d_ff, s.d, scale=s.d ** -0.5).requires_grad_()
    w2 = _randn(s.experts, s.d, s.d_ff, scale=s.d_ff ** -0.5).requires_grad_()
    leaves = [x, weights, w13, w2]
    engines = ["triton"] + (["grouped_mm"] if ffn._grouped_mm_applies(x, w13, w2, None, ids.numel()) else [])
    results, wall = {}, {}
    for gemm in engines:
        for wgrad in engines:
            plan = ffn.FFNPlan(gemm, wgrad, ffn.ffn_plan(x, w13, w2, None, s.top_k, gemm).layout_block)

            def step(plan=plan):
                y = ffn._moe_ffn_triton(x, ids, weights, w13, None, w2, None, None, None, torch.nn.functional.silu,
                                        True, True, plan)
                torch.autograd.grad(y, leaves, torch.ones_like(y))

            name = f"gemm={gemm},wgrad={wgrad}"
            try:
                with moelora.validation(False):
                    results[name] = device_median_ms(step, repeats, DEVICE)
                    wall[name] = median_ms(step, repeats, DEVICE)
            except Exception as err:  # noqa: BLE001 - recorded; the other pairs still run
                report["errors"].append(f"ffn {name}: {type(err).__name__}: {err}"[:300])
    if not results:
        return
    best = min(results, key=results.get)
    gemm, wgrad = (part.split("=")[1] for part in best.split(","))
    many = K.many_rows(s.tokens * s.top_k, s.experts)
    report["ffn"] = {"sizes": s._asdict(), "fwd_bwd_ms": results, "fwd_bwd_wall_ms": wall, "best": best,
                     "shape_class": K.grouped_shape_class("matmul", 2 * s.d_ff, s.d, many),
                     "engines": {"gemm": gemm, "wgrad": wgrad}}


def regime_cases() -> List[dict]:
    if not GPU:
        return [dict(T=64, d=32, r=4, E=4, k=2, shared=True), dict(T=64, d=32, r=4, E=16, k=2, shared=True)]
    cases = [dict(T=8192, d=4096, r=16, E=e, k=k, shared=True) for k in (2, 4) for e in (16, 32, 64, 128)]
    cases += [dict(T=8192, d=4096, r=8, E=8, k=2, shared=False, name="S2"),
              dict(T=16384, d=2048, r=8, E=4, k=1, shared=False, name="S4")]
    return cases


def time_regimes(repeats: int, budget: Budget, report: dict) -> None:
    """moe_lora forward+backward in both regimes; the crossover in E*r."""
    out = []
    for case in regime_cases():
        if budget.exhausted():
            report["skipped"].append(f"regime {case}: budget")
            continue
        T, d, r, E, k = case["T"], case["d"], case["r"], case["E"], case["k"]
        g = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.rand(T, E, generator=g).argsort(1)[:, :k].to(DEVICE)
        w = torch.rand(T, k, generator=g).to(DEVICE).requires_grad_()
        x = _randn(T, d).requires_grad_()
        a = _randn(*((r, d) if case["shared"] else (E, r, d)), scale=d ** -0.5).requires_grad_()
        b = _randn(E, d, r).requires_grad_()
        row = dict(case, width=E * r)
        for regime in ("dense", "grouped"):
            def step(regime=regime):
                y = moelora.moe_lora(x, a, b, ids, w, scaling=2.0, backend="triton", regime=regime)
                torch.autograd.grad(y, [x, a, b, w], torch.ones_like(y))

            try:
                with moelora.validation(False):
                    row[f"{regime}_ms"] = device_median_ms(step, repeats, DEVICE)
                    row[f"{regime}_wall_ms"] = median_ms(step, repeats, DEVICE)
            except Exception as err:  # noqa: BLE001 - recorded; the other cases still run
                report["errors"].append(f"regime {regime} {case}: {type(err).__name__}: {err}"[:300])
        if "dense_ms" in row and "grouped_ms" in row:
            out.append(row)
    current = moe_lora_module.DENSE_MAX_WIDTH
    report["regime"] = {"cases": out, "dense_max_width": best_threshold(out, current), "current": current}


def best_threshold(cases: List[dict], current: int) -> int:
    """The E*r up to which dense runs that costs the measured cases least in total (dense at
    or below it, grouped above; ties: the one nearest ``current``); ``current`` without cases."""
    if not cases:
        return current
    candidates = sorted({0, *(c["width"] for c in cases)})

    def total(limit):
        return sum(c["dense_ms"] if c["width"] <= limit else c["grouped_ms"] for c in cases)

    return int(min(candidates, key=lambda limit: (total(limit), abs(limit - current))))


def paste_text(report: dict) -> str:
    lines = ["# moelora/kernels/launchers.py", "GROUPED_CONFIGS: Dict[str, TileConfig] = {"]
    for shape_class, entry in report["tiles"].items():
        if "best" in entry:
            gm = entry.get("grouped_mm_total_ms")
            extra = f", grouped_mm {gm:.3f} ms" if gm else ""
            config = ", ".join(str(v) for v in json.loads(entry["best"]))
            lines.append(f'    "{shape_class}": TileConfig({config}),  # {entry["triton_best_ms"]:.3f} ms{extra}')
    lines.append("}")
    if "ffn" in report and GPU:
        major = torch.cuda.get_device_capability()[0]
        cls = report["ffn"]["shape_class"]
        eng = report["ffn"]["engines"]
        lines += ["# moelora/ops/moe_ffn.py (FFN_ENGINES entries)",
                  f'    ({major}, "gemm", "{cls}"): "{eng["gemm"]}",',
                  f'    ({major}, "wgrad", "{cls}"): "{eng["wgrad"]}",']
    if "regime" in report:
        lines += ["# moelora/ops/moe_lora.py", f"DENSE_MAX_WIDTH = {report['regime']['dense_max_width']}"]
    pick = rows_engine_pick(report)
    if pick is not None:
        major, shape_class, engine = pick
        lines += ["# moelora/ops/moe_lora.py (ROWS_ENGINES entry)", f'    ({major}, "{shape_class}"): "{engine}",']
    return "\n".join(lines)


def rows_engine_pick(report: dict) -> Optional[list]:
    """[major, shape class, engine] of the grouped forward's rows GEMM: grouped_mm (its whole
    path timed) when faster than the class's best Triton tile, on a GPU where it runs natively;
    None elsewhere or when the class holds other GEMMs too (their sum is not comparable)."""
    major = native_major(DEVICE)
    for shape_class, entry in report["tiles"].items():
        if entry["gemms"] == [ROWS_GEMM] and "best" in entry and ROWS_GEMM in entry["grouped_mm_ms"]:
            if major is None:
                return None
            faster = entry["grouped_mm_ms"][ROWS_GEMM] < entry["triton_best_ms"]
            return [major, shape_class, "grouped_mm" if faster else "triton"]
    return None


def _tables(report: dict) -> None:
    """The picks as data (what ``python -m benchmarks --tuned`` installs; see benchmarks/tuned.py)."""
    report["grouped_configs"] = {shape_class: json.loads(entry["best"])
                                 for shape_class, entry in report["tiles"].items() if "best" in entry}
    if "ffn" in report and GPU:
        major = torch.cuda.get_device_capability()[0]
        report["ffn_engines"] = [[major, kind, report["ffn"]["shape_class"], engine]
                                 for kind, engine in report["ffn"]["engines"].items()]
    if "regime" in report:
        report["dense_max_width"] = report["regime"]["dense_max_width"]
    pick = rows_engine_pick(report)
    if pick is not None:
        report["rows_engines"] = [pick]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tune-grouped.json", help="JSON file to write")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds; later stages are skipped after it")
    parser.add_argument("--repeats", type=int, default=10 if GPU else 1)
    args = parser.parse_args(argv)
    refuse_bad_tuning_options(parser, args)
    budget = Budget(args.budget)
    report = {"meta": metadata(DEVICE), "dtype": str(DTYPE), "tiles": {}, "skipped": [], "errors": []}
    torch.manual_seed(0)
    phases = {}
    t0 = time.monotonic()
    tune_tiles(ffn_gemms(S5) + lora_gemms(S3), args.repeats, budget, report)
    phases["tiles_s"] = time.monotonic() - t0
    if budget.exhausted():
        report["skipped"].append("ffn engines: budget")
    else:
        t0 = time.monotonic()
        time_ffn_plans(S5, args.repeats, report)
        phases["ffn_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    time_regimes(max(3, args.repeats // 2) if GPU else 1, budget, report)
    phases["regime_s"] = time.monotonic() - t0
    report["phases"] = phases
    report["paste"] = paste_text(report)
    _tables(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    summary = {"device": report["meta"]["device_name"], **{k: report[k] for k in ("phases", "skipped", "errors")}}
    print(json.dumps(summary, indent=1))
    for shape_class, entry in report["tiles"].items():
        print(f"{shape_class}: {entry.get('candidates')} grouped_mm {entry.get('grouped_mm_total_ms')}")
    if "ffn" in report:
        print("ffn fwd+bwd ms:", report["ffn"]["fwd_bwd_ms"])
    for case in report.get("regime", {}).get("cases", []):
        print("regime", case)
    print(report["paste"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
