"""Runs one group of cases (one shape, one group, several implementations, several passes).

Each implementation is prepared on every input set, checked once against a reference,
warmed up, then timed per pass while cycling the sets:
- ``fwd``: the training forward (autograd records the graph; the output is dropped).
- ``bwd``: backward ALONE: the forward graph of each set is built once before timing and
  ``torch.autograd.grad(y, leaves, dy, retain_graph=True)`` is timed (not fwd+bwd - fwd).
- ``fwdbwd``: forward then ``torch.autograd.grad`` in one timed step.
  Both backward passes also differentiate the aux loss a learned router recorded in the forward
  (MoELoRALinear's, gradient 1), as a training step does.
- ``decode``: the inference forward (``impls.inference``: modules in eval mode, forward under
  torch.inference_mode), as generation runs it; the CLI times S1's layer group so at few tokens.
  It runs in a group of its own (the modules are put in eval mode).
Every failure is caught and recorded in its case; the run goes on. A failure that leaves
the CUDA context unusable (e.g. an illegal memory access) sets ``ctx.device_lost``: the
group stops and the CLI restarts the process, which resumes after the recorded cases.
"""

from __future__ import annotations

import gc
import itertools
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import moelora

from . import baselines, kernels, memory, metrics
from .impls import Impl, Prepared, inference, rel_err
from .inputs import make_sets, rotation_count
from .shapes import Shape
from .timing import Budget, adaptive_repeats, device_median_ms, summarize, time_eager, time_iterations

PASSES = ("fwd", "bwd", "fwdbwd")  # the training passes
DECODE_PASS = "decode"  # the inference forward
# Shapes whose cases (the S1 sweep's too) also record their device time on a GPU (the kernels
# back to back, the host excluded: timing.device_median_ms), beside the eager median: which cases
# the host bounds. A case that synchronises gives up after one longer sleep (max_margin 4).
DEVICE_TIMED_SHAPES = ("S1",)
DEVICE_REPEATS = 10
# Largest rel_err_vs_reference of a correct implementation, by the sets' dtype (the H200 run's worst
# in bf16 was 5e-3; fp32 allows for TF32 products on a GPU). A case above it (or not finite) computes
# something else: it is still timed, but recorded as an error, so that no ratio or target reads it.
REFERENCE_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-2, torch.float64: 1e-6}


@dataclass
class RunContext:
    device: torch.device
    dtype: torch.dtype
    repeats: int
    warmup: int
    min_repeats: int
    case_cap_s: float
    budget: Budget
    ceilings: dict
    log: Callable[[str], None]
    skip: frozenset = frozenset()  # implementation names excluded with --skip
    done: frozenset = frozenset()  # case ids already recorded (a resumed run)
    poisoned: frozenset = frozenset()  # implementations that took down the CUDA context earlier
    device_lost: bool = False  # set when the CUDA context no longer works


def _error_text(exc: BaseException) -> str:
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:])
    return f"{type(exc).__name__}: {exc}"[:1500] + "\n" + tail[-1500:]


def _recover(device: torch.device) -> None:
    """Free what a finished or failed case left behind (GPU only: gc is slow with big imports)."""
    if device.type == "cuda":
        gc.collect()
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception:
            pass


def cuda_alive(device: torch.device) -> bool:
    """Whether the CUDA context still runs work (sticky errors make every call fail)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        t = torch.ones(1, device=device)
        t += 1
        torch.cuda.synchronize(device)
        return True
    except Exception:
        return False


def _after_error(ctx: RunContext) -> None:
    _recover(ctx.device)
    if not cuda_alive(ctx.device):
        ctx.device_lost = True
        ctx.log("  the CUDA context is lost: stopping this process (the run resumes in a new one)")


def _reference_kind(group: str, impl: str) -> str:
    return "linear-frozen" if group == "layer" and impl == "linear-frozen" else group


def _reference(shape: Shape, group: str, impl: str, s: Dict[str, torch.Tensor]) -> torch.Tensor:
    """What the implementation must compute on set ``s``, in fp32 (differentiable in the set's floating
    tensors where grad mode is on; the fp32 leaves of ``_reference_gradients`` are their own fp32 copies)."""
    if group == "ffn":
        args = [t.float() if t.is_floating_point() else t for t in (s["x"], s["w13"], s["w2"], s["ids"], s["w"])]
        return baselines.moe_ffn_naive(*args)
    base = F.linear(s["x"].float(), s["w0"].float()) if group == "layer" else None
    if group == "layer" and impl == "linear-frozen":
        return base
    return moelora.ops.reference.moe_lora_torch(
        s["x"].float(), s["a"].float(), s["b"].float(), s["ids"], s["w"].float(),
        scaling=shape.scaling, base_out=base)


def _on_torch(fn):
    """``fn()`` on moelora's PyTorch backend (an fp32 twin's reference forward)."""
    with moelora.use_backend("torch"):
        return fn()


def _same_draws(device: torch.device, *fns) -> list:
    """``fns``' results, each run from the generator state of the call (an implementation and its fp32 twin
    draw the same threshold noise, jitter, ...); the state after as before."""
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        for fn in fns:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, device)
            out.append(fn())
    return out


def _gradients(p: Prepared, s: dict) -> tuple:
    """The gradients of ``p``'s leaves (None: not reached) in a training step on set ``s``: y with the
    set's grad_out, and the aux loss the forward recorded."""
    with torch.enable_grad():
        y = p.forward()
        outputs, grads = _outputs(p, y, {"grad_out": s["grad_out"].to(y.dtype)})
        return torch.autograd.grad(outputs, p.leaves, grads, allow_unused=True)


def _reference_gradients(shape: Shape, group: str, impl: str, p: Prepared, s: dict, cache: dict) -> tuple:
    """The fp32 reference's gradients for ``p``'s leaves on set ``s``: its twin's (``Prepared.reference``,
    on moelora's PyTorch backend), or those of the set's reference in fp32 copies of the set's trainable
    tensors (kept in ``cache`` for the group's other implementations), ``p``'s leaves first, then those of the
    set's trainable tensors that are not ``p``'s leaves (a backward that leaves out an input the reference
    differentiates then has a gradient missing: ``grad_rel_err`` is inf)."""
    if p.reference is not None:
        twin = p.reference()
        return _on_torch(lambda: _gradients(twin, s))
    keys = []
    for i, leaf in enumerate(p.leaves):
        key = next((k for k, v in s.items() if v is leaf), None)
        if key is None:
            raise ValueError(f"{impl}: leaf {i} {tuple(leaf.shape)} is none of the input set's tensors and the "
                             "implementation gives no reference (Prepared.reference)")
        keys.append(key)
    trainable = [k for k, v in s.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    key = ("grad", _reference_kind(group, impl))
    if key not in cache:
        leaves = {k: s[k].detach().float().requires_grad_() for k in trainable}
        with torch.enable_grad():
            y = _reference(shape, group, impl, {**s, **leaves})
            grads = torch.autograd.grad([y], [leaves[k] for k in trainable], [s["grad_out"].float().view_as(y)],
                                        allow_unused=True)
        cache[key] = dict(zip(trainable, grads))
    return tuple(cache[key][k] for k in keys) + tuple(cache[key][k] for k in trainable if k not in keys)


def grad_rel_err(got, want) -> float:
    """The largest ``rel_err`` over the leaves' gradients; inf where a leaf has a non-zero gradient on one
    side and none on the other (the implementation skips, or adds, work the reference's backward does), or
    where one side has more gradients (``want``'s for inputs the implementation does not differentiate)."""
    worst = 0.0
    for g, r in itertools.zip_longest(got, want):
        if g is None or r is None:
            if (r if g is None else g) is not None and bool((r if g is None else g).any()):
                return float("inf")
            continue
        err = rel_err(g, r)
        if err != err:  # not finite
            return err
        worst = max(worst, err)
    return worst


def _wrong_result(err: float, dtype: torch.dtype, what: str = "result",
                  key: str = "rel_err_vs_reference") -> Optional[str]:
    """Why an implementation whose output (``what``: "result"; its gradients: "gradient") is ``err``
    (relative, vs the fp32 reference) from the reference computes something else, or None when it is within
    REFERENCE_TOLERANCE[dtype]."""
    tol = REFERENCE_TOLERANCE.get(dtype, 3e-2)
    if err <= tol:  # False for NaN (a non-finite output)
        return None
    return f"wrong {what}: {key} {err:.3g} > {tol:g} (the timings are kept but not compared)"


def _base_record(shape: Shape, group: str, impl: Impl, pass_name: str) -> dict:
    """``group`` here is the label recorded (e.g. "sweep" for delta cases of the sweep)."""
    return {"id": f"{shape.name}/{group}/{pass_name}/{impl.name}", "shape": shape.name.split("@")[0],
            "tokens": shape.tokens, "group": group, "impl": impl.name, "pass": pass_name,
            "moelora": impl.moelora, "description": impl.description}


def prepare_sets(impl: Impl, shape: Shape, sets: List[dict], passes) -> List[Prepared]:
    """``impl`` prepared on every set for ``passes`` (the decode pass: ``impls.inference`` of each)."""
    prepared = [impl.prepare(shape, s) for s in sets]
    return [inference(p) for p in prepared] if DECODE_PASS in passes else prepared


def _outputs(p: Prepared, y: torch.Tensor, s: dict) -> tuple:
    """(outputs, their gradients) of a backward pass: y with the set's grad_out, and the aux loss the
    forward recorded (a learned router's, 1 as its gradient: a training step's loss) where there is one."""
    aux = p.aux_loss() if p.aux_loss is not None else None
    dy = s["grad_out"].view_as(y)
    return ([y], [dy]) if aux is None else ([y, aux], [dy, None])


def _steps(pass_name: str, prepared: List[Prepared], sets: List[dict]):
    n = len(prepared)
    if pass_name in ("fwd", DECODE_PASS):  # the decode pass's forward is already the inference one
        return lambda i: prepared[i % n].forward(), None

    def fwdbwd(i):
        p = prepared[i % n]
        outputs, grads = _outputs(p, p.forward(), sets[i % n])
        return torch.autograd.grad(outputs, p.leaves, grads, allow_unused=True)

    if pass_name == "fwdbwd":
        return fwdbwd, None
    # forward graphs kept for the backward-alone timing (with the aux loss each forward recorded)
    outs = [_outputs(p, p.forward(), s) for p, s in zip(prepared, sets)]

    def bwd(i):
        outputs, grads = outs[i % n]
        return torch.autograd.grad(outputs, prepared[i % n].leaves, grads, retain_graph=True, allow_unused=True)
    return bwd, outs


def _time_pass(ctx: RunContext, pass_name: str, prepared, sets, rec: dict) -> None:
    step, keep = _steps(pass_name, prepared, sets)
    warm = time_iterations(step, max(1, ctx.warmup), ctx.device)
    estimate = min(warm[-2:]) if len(warm) > 1 else warm[-1]
    cap = max(0.05, min(ctx.case_cap_s, ctx.budget.remaining() / 4))
    reps = adaptive_repeats(estimate, ctx.repeats, ctx.min_repeats, cap)
    times, host = time_eager(step, reps, ctx.device, start=len(warm))
    rec.update({"status": "ok", "warmup_ms": warm, "times_ms": times, **summarize(times),
                "host_ms": host, "host_median_ms": summarize(host).get("median_ms")})
    if ctx.device.type == "cuda" and rec["shape"] in DEVICE_TIMED_SHAPES:
        order = itertools.count(len(warm) + reps + len(host))  # the input sets keep rotating
        try:
            rec["device_median_ms"] = device_median_ms(lambda: step(next(order)), min(reps, DEVICE_REPEATS),
                                                       ctx.device, max_margin=4)
        except RuntimeError as exc:  # a case that synchronises with the host (e.g. the naive loop)
            rec["device_time_error"] = str(exc)
    rec["kernels_per_iter"] = kernels.per_iteration(lambda: step(0), ctx.device)
    rec["peak_bytes"] = memory.peak_bytes(lambda: step(0), ctx.device)
    del keep


def run_group(ctx: RunContext, shape: Shape, group: str, impls: List[Impl],
              passes=PASSES, sets_count: Optional[int] = None, label: Optional[str] = None) -> List[dict]:
    """Time every implementation of one group on one shape; returns one record per (impl, pass).

    ``label`` is the group name recorded (default ``group``). The decode pass runs alone."""
    unknown = [p for p in passes if p not in PASSES + (DECODE_PASS,)]
    if unknown or (DECODE_PASS in passes and len(passes) > 1):
        raise ValueError(f"passes: expected a subset of {', '.join(PASSES)} or {DECODE_PASS!r} alone, "
                         f"got {list(passes)}")
    records: List[dict] = []
    tag = label or group
    elt = torch.empty((), dtype=ctx.dtype).element_size()
    runnable = []
    for impl in impls:
        ids = [_base_record(shape, tag, impl, p)["id"] for p in passes]
        if any(i in ctx.done for i in ids):  # resumed run: recorded before the restart
            for p, i in zip(passes, ids):
                if i not in ctx.done:
                    records.append({**_base_record(shape, tag, impl, p), "status": "error",
                                    "error": "the CUDA context was lost during an earlier pass of this "
                                             "implementation; the run restarted without it"})
            continue
        if impl.name in ctx.skip:
            reason = "excluded with --skip"
        elif impl.name in ctx.poisoned:
            reason = "took down the CUDA context earlier in this run (see meta.device_lost_events)"
        else:
            reason = impl.probe(shape, ctx.device)
        if reason is not None:
            for p in passes:
                records.append({**_base_record(shape, tag, impl, p), "status": "skipped", "reason": reason})
            ctx.log(f"  skip {group:5s} {impl.name}: {reason}")
        else:
            runnable.append(impl)
    if not runnable:
        return records
    if ctx.budget.exhausted():
        for impl in runnable:
            for p in passes:
                records.append({**_base_record(shape, tag, impl, p), "status": "skipped",
                                "reason": "time budget exhausted"})
        return records
    try:
        count = sets_count or rotation_count(shape, ctx.dtype, ctx.device)
        sets = make_sets(shape, ctx.dtype, ctx.device, count)
    except Exception as exc:  # e.g. out of memory
        err = _error_text(exc)
        for impl in runnable:
            for p in passes:
                records.append({**_base_record(shape, tag, impl, p), "status": "error", "error": err})
        ctx.log(f"  input sets for {shape.name} failed: {err.splitlines()[0]}")
        _after_error(ctx)
        return records

    refs: dict = {}  # fp32 reference outputs (by kind) and gradients (by kind and leaves) on sets[0]
    with moelora.validation(False):
        for impl in runnable:
            records.extend(_run_impl(ctx, shape, group, impl, passes, sets, elt, tag, refs))
            if ctx.device_lost:
                break
    del sets, refs
    _recover(ctx.device)
    return records


def _run_impl(ctx, shape, group, impl, passes, sets, elt, tag, refs) -> List[dict]:
    out = []
    counts = metrics.counts(shape, group, impl.name, elt)
    common = {}
    try:
        prepared = prepare_sets(impl, shape, sets, passes)
        if prepared[0].check is not None:  # a forward that draws random numbers checks itself
            common["rel_err_vs_reference"] = prepared[0].check()
        else:
            if prepared[0].reference is not None:  # its fp32 twin (e.g. a layer that routes by itself)
                twin = prepared[0].reference()
                with torch.no_grad():
                    y0, ref = _same_draws(ctx.device, prepared[0].forward, lambda: _on_torch(twin.forward))
                del twin
            else:
                with torch.no_grad():
                    y0 = prepared[0].forward()
                kind = _reference_kind(group, impl.name)
                if kind not in refs:
                    with torch.no_grad():
                        refs[kind] = _reference(shape, group, impl.name, sets[0])
                ref = refs[kind]
            common["rel_err_vs_reference"] = rel_err(y0, ref)
            del ref
            del y0
            if any(p in ("bwd", "fwdbwd") for p in passes):  # the backward passes: each leaf's gradient too
                common["grad_rel_err_vs_reference"] = grad_rel_err(*_same_draws(
                    ctx.device, lambda: _gradients(prepared[0], sets[0]),
                    lambda: _reference_gradients(shape, group, impl.name, prepared[0], sets[0], refs)))
        known = list(sets[0].values()) + list(prepared[0].leaves)
        for m in prepared[0].keep:
            if isinstance(m, torch.nn.Module):
                known += list(m.parameters()) + list(m.buffers())
        common.update(memory.saved_activation_bytes(prepared[0].forward, known))
        wrong = _wrong_result(common["rel_err_vs_reference"], ctx.dtype)
        wrong_grad = None if "grad_rel_err_vs_reference" not in common else \
            _wrong_result(common["grad_rel_err_vs_reference"], ctx.dtype, "gradient", "grad_rel_err_vs_reference")
    except Exception as exc:
        err = _error_text(exc)
        ctx.log(f"  error {shape.name} {group} {impl.name}: {err.splitlines()[0][:200]}")
        _after_error(ctx)
        return [{**_base_record(shape, tag, impl, p), "status": "error", "error": err} for p in passes]

    for p in passes:
        rec = {**_base_record(shape, tag, impl, p), "sets": len(sets), **common}
        wrong_here = wrong or (wrong_grad if p in ("bwd", "fwdbwd") else None)
        if ctx.budget.exhausted():
            rec.update(status="skipped", reason="time budget exhausted")
            out.append(rec)
            continue
        try:
            _time_pass(ctx, p, prepared, sets, rec)
            rec.update(metrics.derived(rec.get("median_ms"), counts[p]["flops"], counts[p]["bytes"], ctx.ceilings))
            pct = rec.get("pct_floor")
            ctx.log(f"[{ctx.budget.elapsed():6.1f}s] {shape.name:9s} {group:5s} {p:6s} {impl.name:24s} "
                    f"{rec['median_ms']:10.4f} ms  IQR {rec['iqr_ms']:.4f}  n={rec['n']}  "
                    f"host {rec['host_median_ms']:.3f} ms  {rec['kernels_per_iter']} kernels"
                    + (f"  {pct:5.1f}% of floor" if pct is not None else "")
                    + (f"  {wrong_here}" if wrong_here else ""))
            if wrong_here:
                rec.update(status="error", error=wrong_here)
        except Exception as exc:
            rec.update(status="error", error=_error_text(exc))
            ctx.log(f"  error {shape.name} {group} {p} {impl.name}: {rec['error'].splitlines()[0][:200]}")
            _after_error(ctx)
        out.append(rec)
        if ctx.device_lost:
            break
    del prepared
    _recover(ctx.device)
    return out
