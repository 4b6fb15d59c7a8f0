"""CUDA-graph capture check of moelora's S1 forward+backward.

With ``moelora.validation(False)`` (no host syncs): warm up on a side stream, capture one
forward + ``torch.autograd.grad`` into a CUDA graph, copy a second input set into the
static tensors, replay, and compare output and gradients with eager on that second set.
Passes when every relative error is within the dtype's tolerance. Also times replays, each from
a cold L2 as every device time of the benchmark (and back to back, with the inputs in L2).
"""

from __future__ import annotations

import traceback

import torch

import moelora

from .inputs import make_set
from .shapes import Shape
from .timing import device_median_ms, summarize, time_iterations

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def passes(errors: dict, dtype: torch.dtype) -> tuple:
    """(whether the replay passes, the tolerance): every relative error (``_rel``'s, per output and
    gradient) a number within the tolerance of ``dtype`` (2e-2 for a dtype without one); a NaN
    (a replay that is not finite) fails."""
    tol = TOLERANCE.get(dtype, 2e-2)
    return all(e == e and e <= tol for e in errors.values()), tol


def check(shape: Shape, dtype: torch.dtype, device: torch.device, backend: str = "triton") -> dict:
    if device.type != "cuda":
        return {"status": "skipped", "reason": "CUDA graphs need a CUDA device"}
    result = {"shape": shape.name, "backend": backend, "regime": "auto"}
    try:
        with moelora.validation(False):
            static = make_set(shape, dtype, device, seed=7)
            fresh = make_set(shape, dtype, device, seed=8)
            names = ["x", "a", "b", "w"]

            def step(s):
                y = moelora.moe_lora(s["x"], s["a"], s["b"], s["ids"], s["w"], scaling=shape.scaling,
                                     backend=backend, regime="auto")
                grads = torch.autograd.grad(y, [s[n] for n in names], s["grad_out"])
                return (y,) + tuple(grads)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = step(static)
            with torch.no_grad():
                for key in ("x", "a", "b", "w", "ids", "grad_out"):
                    static[key].copy_(fresh[key])
            graph.replay()
            torch.cuda.synchronize(device)
            eager = step(fresh)
            labels = ["y"] + [f"d{n}" for n in names]
            errs = {lab: _rel(c, e) for lab, c, e in zip(labels, captured, eager)}
            bitwise = all(torch.equal(c, e) for c, e in zip(captured, eager))
            ok, tol = passes(errs, dtype)
            # the target's figure starts each replay from a cold L2, as every other device time
            # (timing.device_median_ms); back-to-back replays of the one static set, which find its
            # tensors in L2, are recorded beside it
            result.update(status="pass" if ok else "fail", rel_err=errs, tolerance=tol, bitwise_equal=bitwise,
                          replay_note="one static input set; replay_median_ms from a cold L2 (flushed before "
                                      "each replay), replay_warm_l2_* back to back")
            try:  # a replay that cannot be timed leaves the check's verdict as it is
                warm = summarize(time_iterations(lambda i: graph.replay(), 20, device))
                result.update(replay_median_ms=device_median_ms(graph.replay, 20, device),
                              replay_warm_l2_median_ms=warm.get("median_ms"), replay_warm_l2_iqr_ms=warm.get("iqr_ms"))
            except Exception as exc:
                result.update(replay_error=f"{type(exc).__name__}: {exc}"[:500])
            del graph, captured, eager, static, fresh
    except Exception as exc:
        result.update(status="fail", error=f"{type(exc).__name__}: {exc}"[:1500],
                      traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:])[-1500:])
    torch.cuda.synchronize(device) if torch.cuda.is_available() else None
    return result
