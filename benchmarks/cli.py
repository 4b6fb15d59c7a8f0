"""Command line: ``python -m benchmarks [options]`` runs the suite and writes the results.

On a CUDA device: the full shape suite S1-S5 (bf16 by default), the S1 whole-layer case,
its decode pass (inference at a few tokens), the CUDA-graph check and the S1 token sweep,
in priority order under ``--time-budget``.
On a CPU: the same structure at tiny sizes (a smoke run; GPU numbers need a GPU).
Writes ``bench-<device>-<date>.json`` and ``.png`` under ``--out-dir`` and prints a table
and the target check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import torch

from moelora.kernels import launchers

from . import ceilings as ceilings_mod
from . import graphcheck, hostcost, impls, report, runner, targets, tuned
from .plot import sweep_plot
from .runner import DECODE_PASS, PASSES, RunContext, run_group
from .shapes import DECODE_TOKENS, decode_shape, suite, sweep_shapes
from .timing import Budget

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
_WATCHDOGS: List[threading.Timer] = []  # cancelled when main() returns or raises
PRIORITY = ["S1", "S3", "S5", "S2", "S4"]  # run order; S1's layer case, decode pass and graph check follow S1


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="S1,S2,S3,S4,S5", help="comma-separated subset of S1..S5")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True, help="S1 token sweep")
    p.add_argument("--sweep-tokens", default=None, help="comma-separated token counts for the sweep")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 50 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per case (default 3 GPU, 1 CPU)")
    p.add_argument("--min-repeats", type=int, default=None, help="floor for the adaptive repeat count")
    p.add_argument("--case-cap", type=float, default=None,
                   help="seconds one case's timed loop may take; fewer repeats for slow cases (default 1.0 GPU)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; cases left when it runs out are recorded as skipped")
    p.add_argument("--hard-deadline", type=float, default=None,
                   help="seconds after which a watchdog saves the results, prints the summary and exits "
                        "even if a case hangs (default: --time-budget + 60)")
    p.add_argument("--sweep-share", type=float, default=0.25,
                   help="share of --time-budget kept for the sweep, which runs last (default 0.25)")
    p.add_argument("--quick", action="store_true",
                   help="every other point of the default sweep; on a GPU also fewer repeats (15) and a shorter "
                        "case cap (0.4 s)")
    p.add_argument("--passes", default=",".join(PASSES + (DECODE_PASS,)),
                   help="comma-separated subset of fwd,bwd,fwdbwd,decode (decode: S1's layer group in inference, "
                        "eval mode under torch.inference_mode, at --decode-tokens tokens)")
    p.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS,
                   help="tokens of the decode pass: a batch of this many sequences each adding one token "
                        f"(default {DECODE_TOKENS})")
    p.add_argument("--skip", default="", help="comma-separated implementation names not to run")
    p.add_argument("--graph-check", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA-graph capture check of the S1 forward+backward")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads on CPU (default 1: steadier on a shared machine; 0 keeps torch's default)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--resume", type=Path, default=None,
                   help="continue the run recorded in this results JSON (used after a lost CUDA context)")
    p.add_argument("--max-restarts", type=int, default=4, help="restarts allowed after a lost CUDA context")
    p.add_argument("--profile", metavar="CASES", default=None,
                   help="print the per-kernel device-time table of each comma-separated case, e.g. "
                        "S1/layer/fwdbwd/moelora-MoELoRALinear, and exit (see benchmarks/profile.py)")
    p.add_argument("--tuned", default="",
                   help="comma-separated JSON reports of benchmarks.tune_dense / tune_grouped whose tables to "
                        "install before running (benchmarks/tuned.py); recorded in the results' meta")
    p.add_argument("--host-overhead", action=argparse.BooleanOptionalAction, default=True,
                   help="measure moelora's host time per call with the Triton launches skipped "
                        "(benchmarks/hostcost.py)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); "
              "use --device cpu (or auto) for the CPU stand-in suite", file=sys.stderr)
        return 2
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    # an explicit index: torch.cuda.set_device rejects an index-less torch.device("cuda")
    device = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
    on_gpu = device.type == "cuda"
    previous_threads = torch.get_num_threads()
    if not on_gpu and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    try:
        return _run(args, device, on_gpu, list(argv) if argv is not None else sys.argv[1:])
    finally:
        torch.set_num_threads(previous_threads)
        while _WATCHDOGS:
            _WATCHDOGS.pop().cancel()


def _sweep_tokens(text: Optional[str]) -> Optional[List[int]]:
    """The token counts of --sweep-tokens (None: the default sweep); ValueError unless distinct positive
    integers (a repeated count would record two cases under one id)."""
    if not text:
        return None
    tokens = [int(t) for t in text.split(",")]
    if min(tokens) < 1 or len(set(tokens)) != len(tokens):
        raise ValueError(text)
    return tokens


def _option_problems(args: argparse.Namespace) -> List[str]:
    """What is wrong with the numeric and name options (each message names its option), checked
    before anything runs."""
    problems = []
    bounds = {"repeats": (lambda v: v >= 1, "at least 1"), "min_repeats": (lambda v: v >= 1, "at least 1"),
              "warmup": (lambda v: v >= 0, "non-negative"), "case_cap": (lambda v: v > 0, "positive"),
              "time_budget": (lambda v: v >= 0, "non-negative"), "hard_deadline": (lambda v: v >= 0, "non-negative"),
              "cpu_threads": (lambda v: v >= 0, "non-negative"), "max_restarts": (lambda v: v >= 0, "non-negative")}
    for name, (ok, expected) in bounds.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            problems.append(f"--{name.replace('_', '-')} must be {expected}, got {value}")
    if args.min_repeats is not None and args.repeats is not None and args.min_repeats > args.repeats:
        problems.append(f"--min-repeats must be at most --repeats ({args.repeats}), got {args.min_repeats}")
    if not 0 <= args.sweep_share < 1:
        problems.append(f"--sweep-share must be in [0, 1), got {args.sweep_share}")
    try:
        _sweep_tokens(args.sweep_tokens)
    except ValueError:
        problems.append(f"--sweep-tokens wants comma-separated distinct positive token counts, e.g. 512,4096, "
                        f"got {args.sweep_tokens!r}")
    unwritable = report.unwritable_dir(args.out_dir)
    if unwritable and args.resume is None:  # a resumed run writes beside its --resume file
        problems.append(f"--out-dir {args.out_dir}: {unwritable}")
    names = {i.name for i in impls.DELTA + impls.LAYER + impls.FFN}
    unknown = [n for n in args.skip.split(",") if n and n not in names]
    if unknown:
        problems.append(f"--skip: unknown implementations {unknown}; choose from {sorted(names)}")
    return problems


def _restart(argv: List[str], json_path: Path) -> None:
    """Replace this process by a fresh one that resumes from ``json_path``."""
    rest, skip_next = [], False
    for a in argv:
        if skip_next:
            skip_next = False
        elif a == "--resume":
            skip_next = True
        elif not a.startswith("--resume="):
            rest.append(a)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks", *rest, "--resume", str(json_path)])


def _run(args: argparse.Namespace, device: torch.device, on_gpu: bool, argv: List[str]) -> int:
    budget = Budget(args.time_budget)
    log = lambda msg: print(msg, flush=True)
    problems = _option_problems(args)
    if problems:  # before anything runs: a bad value found after the suite would lose the table and targets
        for problem in problems:
            print(problem, file=sys.stderr)
        return 2
    resumed = None
    if args.resume is not None:
        try:
            resumed = targets.read_results(args.resume)
        except ValueError as exc:
            print(f"--resume: {exc}", file=sys.stderr)
            return 2
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    repeats = args.repeats or ((15 if args.quick else 50) if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    min_repeats = args.min_repeats or min(repeats, 5 if on_gpu else 3)
    case_cap = args.case_cap or ((0.4 if args.quick else 1.0) if on_gpu else 0.3)
    passes = [p for p in args.passes.split(",") if p]
    train_passes = [p for p in passes if p in PASSES]
    unknown = [p for p in passes if p not in PASSES + (DECODE_PASS,)]
    if unknown or not passes:  # none: nothing would run, and an empty results file be written
        print(f"unknown passes {unknown}; choose from {', '.join(PASSES + (DECODE_PASS,))}" if unknown else
              f"--passes names no pass; choose from {', '.join(PASSES + (DECODE_PASS,))}", file=sys.stderr)
        return 2
    if args.decode_tokens < 1:
        print(f"--decode-tokens must be a positive token count, got {args.decode_tokens}", file=sys.stderr)
        return 2
    shapes = suite(on_gpu)
    wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in shapes]
    if unknown:
        print(f"unknown shapes {unknown}; choose from {sorted(shapes)}", file=sys.stderr)
        return 2

    try:
        installed = tuned.install(p for p in args.tuned.split(",") if p)
    except ValueError as exc:
        print(f"--tuned: {exc}", file=sys.stderr)
        return 2
    if installed:
        log(f"tuned tables installed: {json.dumps(installed)}")
    if args.profile:
        from . import profile

        return profile.run(args.profile, shapes, dtype, device, args.out_dir)

    meta = report.metadata(device)
    if not on_gpu:
        log("No CUDA device: running the tiny CPU stand-in suite (torch backend, naive loop, baselines). "
            "GPU numbers need a GPU: run the same command on a CUDA machine.")
    log(f"moelora benchmarks on {meta['device_name']} ({device}), torch {meta['torch']}, triton {meta['triton']}, "
        f"dtype {str(dtype).replace('torch.', '')}, repeats {repeats}, budget {args.time_budget}")
    paths = report.result_paths(args.out_dir, meta)
    results = {
        "schema": targets.SCHEMA,
        "meta": {**meta, "argv": argv, "dtype": str(dtype).replace("torch.", ""),
                 "repeats": repeats, "warmup": warmup, "min_repeats": min_repeats, "case_cap_s": case_cap,
                 "time_budget_s": args.time_budget, "moelora_validation": False, "tuned": installed,
                 "torch_threads": torch.get_num_threads(), "start_epoch": time.time(), "restarts": 0,
                 "timing": "CUDA events per iteration after warm-up (perf_counter on CPU), median and IQR; "
                           "input sets rotated per iteration; fwd = training forward (autograd recording); "
                           "bwd = backward alone on a retained forward graph (torch.autograd.grad, retain_graph); "
                           "fwdbwd = forward + torch.autograd.grad in one step; "
                           "decode = S1's layer group in inference at a few tokens (eval mode, forward under "
                           "torch.inference_mode)"},
        "shapes": {},
        "ceilings": {},
        "cases": [],
        "checks": {},
    }
    if resumed is not None:
        results = resumed
        results["meta"]["restarts"] = results["meta"].get("restarts", 0) + 1
        budget.start = time.monotonic() - (time.time() - results["meta"]["start_epoch"])
        paths = {"json": Path(args.resume), "png": Path(args.resume).with_suffix(".png")}
        log(f"[{budget.elapsed():6.1f}s] resuming {args.resume} (restart {results['meta']['restarts']}), "
            f"{len(results['cases'])} cases recorded")

    phases = results["meta"].setdefault("phases_s", {})  # seconds per part, to plan budgets

    def phase(name: str, since: float) -> None:
        phases[name] = round(phases.get(name, 0.0) + budget.elapsed() - since, 2)

    def save():
        report.annotate(results["cases"])
        results["meta"]["elapsed_s"] = budget.elapsed()
        report.write_json(paths["json"], results)

    def finish(note_plot: bool = True) -> None:
        note = sweep_plot(results["cases"], paths["png"], f"moelora S1 sweep on {results['meta']['device_name']}, "
                          f"{results['meta']['dtype']}, {results['meta']['date']}") if note_plot else "not drawn"
        results["plot"] = {"path": str(paths["png"]) if note is None else None, "skipped": note}
        results["targets"] = targets.evaluate(results)
        # how this process's launches reached their kernels (a resumed run: those since the restart); on a GPU
        # a kernel "through_triton" pays Triton's argument binding on every launch
        results["meta"]["direct_launch"] = launchers.direct_launch_state()
        save()
        print()
        print(report.table(results["cases"], markdown=args.markdown), flush=True)
        print()
        print(targets.format_targets(results["targets"], results["meta"]), flush=True)
        print(f"direct launch: {json.dumps(results['meta']['direct_launch'])}", flush=True)
        plot = f"\nplot:    {paths['png']}" if note is None else f"\nplot skipped: {note}"
        print(f"\nresults: {paths['json']}" + plot)
        counts = {st: sum(c["status"] == st for c in results["cases"]) for st in ("ok", "error", "skipped")}
        print(f"cases: {counts['ok']} ok, {counts['error']} errors, {counts['skipped']} skipped; "
              f"seconds per part: {phases}")
        print(f"elapsed {budget.elapsed():.1f} s", flush=True)

    deadline = args.hard_deadline if args.hard_deadline is not None else (
        args.time_budget + 60 if args.time_budget is not None else None)
    watchdog = None
    if deadline is not None:
        def on_deadline():
            log(f"[{budget.elapsed():6.1f}s] hard deadline reached: saving what was recorded and exiting")
            results["meta"]["hard_deadline_hit"] = True
            for _ in range(5):  # the main thread may be mutating the results: retry
                try:
                    finish(note_plot=False)
                    break
                except RuntimeError:
                    time.sleep(0.2)
            sys.stdout.flush()
            os._exit(3)
        watchdog = threading.Timer(max(0.0, deadline - budget.elapsed()), on_deadline)
        watchdog.daemon = True
        watchdog.start()
        _WATCHDOGS.append(watchdog)

    t0 = budget.elapsed()
    if not results["ceilings"]:
        try:
            results["ceilings"] = ceilings_mod.measure(device, dtype)
            c = results["ceilings"]
            log(f"[{budget.elapsed():6.1f}s] ceilings: copy {c['copy_GBps']:.0f} GB/s, "
                f"{c['matmul_dtype']} matmul {c['matmul_TFLOPs']:.1f} TFLOP/s")
        except Exception as exc:
            results["ceilings"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"ceilings failed: {exc}")
        phase("ceilings", t0)

    main_budget = budget
    # the suite stops early enough to leave the sweep its share (where one runs: it needs a training pass)
    if args.sweep and train_passes and args.time_budget is not None:
        main_budget = Budget(args.time_budget * (1 - args.sweep_share))
        main_budget.start = budget.start
    ctx = RunContext(device=device, dtype=dtype, repeats=repeats, warmup=warmup, min_repeats=min_repeats,
                     case_cap_s=case_cap, budget=main_budget, ceilings=results["ceilings"], log=log,
                     skip=frozenset(n for n in args.skip.split(",") if n),
                     done=frozenset(c["id"] for c in results["cases"]),
                     poisoned=frozenset(e["last_case"].split("/")[-1]
                                        for e in results["meta"].get("device_lost_events", []) if e.get("last_case")))

    def lost(culprit: Optional[str] = None) -> bool:
        """After a lost CUDA context: save, then restart (or give up after --max-restarts).

        The culprit (default: the last case recorded) is skipped for the rest of the run."""
        if not ctx.device_lost:
            return False
        last = culprit or (results["cases"][-1]["id"] if results["cases"] else None)
        results["meta"].setdefault("device_lost_events", []).append({"after_s": budget.elapsed(), "last_case": last})
        save()
        if results["meta"]["restarts"] < args.max_restarts:
            log(f"[{budget.elapsed():6.1f}s] restarting the process to resume after the lost CUDA context")
            _restart(argv, paths["json"])
        log("too many restarts: finishing with what was recorded")
        return True

    for name in [s for s in PRIORITY if s in wanted]:
        shape = shapes[name]
        results["shapes"][name] = shape.to_dict()
        log(f"[{budget.elapsed():6.1f}s] {name}: {shape.note} T={shape.tokens} d_in={shape.d_in} "
            f"d_out={shape.d_out} r={shape.rank} E={shape.experts} k={shape.top_k}")
        group = "ffn" if shape.kind == "ffn" else "delta"
        if train_passes:
            t0 = budget.elapsed()
            results["cases"] += run_group(ctx, shape, group, impls.impls_for(group), train_passes)
            phase(name, t0)
            save()
            if lost():
                break
        if shape.layer and train_passes:
            t0 = budget.elapsed()
            results["cases"] += run_group(ctx, shape, "layer", impls.impls_for("layer"), train_passes)
            phase(f"{name}-layer", t0)
            save()
            if lost():
                break
        if name == "S1" and DECODE_PASS in passes:
            decode = decode_shape(shape, args.decode_tokens)
            results["shapes"]["S1-decode"] = decode.to_dict()
            t0 = budget.elapsed()
            results["cases"] += run_group(ctx, decode, "layer", [impls.by_name(n) for n in impls.DECODE], [DECODE_PASS])
            phase(f"{name}-decode", t0)
            save()
            if lost():
                break
        if name == "S1" and args.graph_check and "cuda_graph_S1" not in results["checks"]:
            t0 = budget.elapsed()
            if main_budget.exhausted():
                results["checks"]["cuda_graph_S1"] = {"status": "skipped", "reason": "time budget exhausted"}
            else:
                results["checks"]["cuda_graph_S1"] = graphcheck.check(shape, dtype, device)
            log(f"[{budget.elapsed():6.1f}s] CUDA-graph check S1: {results['checks']['cuda_graph_S1']['status']}")
            phase("graph-check", t0)
            save()
            ctx.device_lost = not runner.cuda_alive(device)
            if lost("checks/cuda_graph_S1"):
                break

    if args.sweep and train_passes and not ctx.device_lost:
        tokens = _sweep_tokens(args.sweep_tokens)
        sweep = sweep_shapes(on_gpu, tokens)
        if args.quick and tokens is None:
            sweep = sweep[::2]
        sweep_passes = [p for p in ("fwd", "fwdbwd") if p in passes] or train_passes
        sweep_impls = [impls.by_name(n) for n in impls.SWEEP]
        ctx.budget = budget
        ctx.repeats = max(ctx.min_repeats, repeats // 2)  # the sweep trades repeats for points
        ctx.case_cap_s = case_cap / 2
        results["shapes"]["S1-sweep"] = {**sweep[0].to_dict(), "tokens": [s.tokens for s in sweep]}
        for shape in sweep:
            t0 = budget.elapsed()
            results["cases"] += run_group(ctx, shape, "delta", sweep_impls, sweep_passes, label="sweep")
            phase(f"sweep-T{shape.tokens}", t0)
            save()
            if lost():
                break

    if args.host_overhead and "host_overhead" not in results:
        t0 = budget.elapsed()
        try:
            results["host_overhead"] = hostcost.measure(device)
            save()  # before the compiled rows, whose compilation takes seconds
            results["host_overhead"] += hostcost.measure_compiled(device)
            log(f"[{budget.elapsed():6.1f}s] host time per call, Triton launches skipped (benchmarks/hostcost.py):\n"
                + hostcost.table(results["host_overhead"]))
        except Exception as exc:
            results["host_overhead"] = results.get("host_overhead", []) + [
                {"case": "error", "error": f"{type(exc).__name__}: {exc}"}]
            log(f"host overhead measurement failed: {exc}")
        phase("host-overhead", t0)
        save()

    if watchdog is not None:
        watchdog.cancel()
    finish()
    return 0
