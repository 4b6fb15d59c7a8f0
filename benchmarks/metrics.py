"""FLOP and byte counts per case (DESIGN.md section 4) and the derived metrics.

Counts are the operator's useful work, the same for every implementation of a case, so
that GB/s, TFLOP/s and the percentage of the floor compare implementations directly:
- FLOPs: sparse (selected experts only). Delta forward, shared A: 2 T d_in r + 2 T k r d_out;
  per-expert A: 2 T k r (d_in + d_out). Delta backward: twice the forward (dH', dB; dA, dx).
- Bytes (the fewest a fused kernel must move): forward reads x, writes y, reads the weights
  and routing; backward reads dy and x, writes dx, reads the weights, writes their gradients
  and the gate gradient.
- Whole layer adds the frozen base GEMM: 2 T d_in d_out forward, the same again for dx, and
  W0's bytes in each pass (a fused layer computes base + delta in one pass: no base output is
  written or read). PEFT's cases: one adapter (E = 1, k = 1), no routing. The "-autocast" cases
  (fp32 x and W0 under torch.autocast) read x and W0 and write dx at 4 bytes per element. The
  "-task" cases (MoELoRALinear's task router) route each token to its task's expert alone: k = 1.
- Full-FFN MoE (SwiGLU): forward 2 T k d (3 d_ff); backward twice that.
The decode pass (the inference forward) counts what the forward does.
floor = max(bytes / copy bandwidth, FLOPs / matmul rate), both measured in the same run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional

from .shapes import Shape

ROUTING_BYTES = 8  # int32 id + fp32 weight per (token, slot)


def _delta_counts(shape: Shape, elt: int, x_elt: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """``x_elt``: the element size of x and dx where it differs from ``elt`` (autocast's fp32 x)."""
    T, di, do, r, E, k = shape.tokens, shape.d_in, shape.d_out, shape.rank, shape.experts, shape.top_k
    xe = x_elt or elt
    a_elems = r * di if shape.shared_a else E * r * di
    w_bytes = (a_elems + E * do * r) * elt
    route = T * k * ROUTING_BYTES
    down = 2 * T * di * r if shape.shared_a else 2 * T * k * di * r
    up = 2 * T * k * r * do
    fwd_flops = down + up
    fwd_bytes = T * di * xe + T * do * elt + w_bytes + route
    bwd_flops = 2 * fwd_flops
    bwd_bytes = T * do * elt + T * di * xe + T * di * xe + 2 * w_bytes + route + T * k * 4
    return {"fwd": {"flops": fwd_flops, "bytes": fwd_bytes},
            "bwd": {"flops": bwd_flops, "bytes": bwd_bytes}}


def _layer_counts(shape: Shape, elt: int, impl: str) -> Dict[str, Dict[str, float]]:
    T, di, do = shape.tokens, shape.d_in, shape.d_out
    base_flops = 2 * T * di * do
    # the "-autocast" cases (mixed precision) hold x and W0 in fp32: a fused kernel reads them (and
    # writes dx) at 4 bytes and casts in registers; y and dy are in the run's dtype
    wide = 4 if impl.endswith("-autocast") else elt
    w0 = di * do * wide
    if impl.startswith("linear-frozen"):
        return {"fwd": {"flops": base_flops, "bytes": T * di * wide + T * do * elt + w0},
                "bwd": {"flops": base_flops, "bytes": T * do * elt + T * di * wide + w0}}
    # task routing takes one expert per token whatever the shape's top_k (MoELoRALinear ignores it)
    delta = _delta_counts(replace(shape, top_k=1) if impl.endswith("-task") else shape, elt, wide)
    if impl.startswith("peft-lora"):  # single adapter: E = 1, k = 1, same r, no routing
        r = shape.rank
        lora = 2 * T * di * r + 2 * T * r * do
        w = (r * di + do * r) * elt
        return {"fwd": {"flops": base_flops + lora, "bytes": T * di * elt + T * do * elt + w + w0},
                "bwd": {"flops": base_flops + 2 * lora, "bytes": T * do * elt + 2 * T * di * elt + 2 * w + w0}}
    return {"fwd": {"flops": base_flops + delta["fwd"]["flops"], "bytes": delta["fwd"]["bytes"] + w0},
            "bwd": {"flops": base_flops + delta["bwd"]["flops"], "bytes": delta["bwd"]["bytes"] + w0}}


def _ffn_counts(shape: Shape, elt: int) -> Dict[str, Dict[str, float]]:
    T, d, f, E, k = shape.tokens, shape.d_in, shape.d_ff, shape.experts, shape.top_k
    w = 3 * E * d * f * elt
    route = T * k * ROUTING_BYTES
    fwd_flops = 2 * T * k * d * 3 * f
    return {"fwd": {"flops": fwd_flops, "bytes": 2 * T * d * elt + w + route},
            "bwd": {"flops": 2 * fwd_flops, "bytes": 3 * T * d * elt + 2 * w + route + T * k * 4}}


def counts(shape: Shape, group: str, impl: str, elt: int) -> Dict[str, Dict[str, float]]:
    """{pass: {"flops", "bytes"}} for passes fwd, bwd, fwdbwd and decode (the forward's)."""
    if group == "ffn":
        c = _ffn_counts(shape, elt)
    elif group == "layer":
        c = _layer_counts(shape, elt, impl)
    else:
        c = _delta_counts(shape, elt)
    c["fwdbwd"] = {"flops": c["fwd"]["flops"] + c["bwd"]["flops"], "bytes": c["fwd"]["bytes"] + c["bwd"]["bytes"]}
    c["decode"] = dict(c["fwd"])
    return c


def derived(median_ms: Optional[float], flops: float, nbytes: float, ceilings: dict) -> dict:
    """GB/s, TFLOP/s, the memory / compute / overall floor and the % of it reached."""
    bw = ceilings.get("copy_GBps")
    rate = ceilings.get("matmul_TFLOPs")
    out = {"flops": flops, "bytes": nbytes}
    mem_floor = nbytes / (bw * 1e9) * 1e3 if bw else None
    cmp_floor = flops / (rate * 1e12) * 1e3 if rate else None
    floors = [f for f in (mem_floor, cmp_floor) if f is not None]
    out["memory_floor_ms"] = mem_floor
    out["compute_floor_ms"] = cmp_floor
    out["floor_ms"] = max(floors) if floors else None
    out["bound"] = None if not floors else ("memory" if (mem_floor or 0) >= (cmp_floor or 0) else "compute")
    if median_ms and median_ms > 0:
        out["GBps"] = nbytes / (median_ms * 1e-3) / 1e9
        out["TFLOPs"] = flops / (median_ms * 1e-3) / 1e12
        out["pct_memory_floor"] = 100 * mem_floor / median_ms if mem_floor else None
        out["pct_floor"] = 100 * out["floor_ms"] / median_ms if out["floor_ms"] else None
    return out
