"""Differentiable plain-PyTorch baselines written for the benchmarks.

- ``moe_lora_dense``: the best plain-PyTorch MoE-LoRA (DESIGN.md section 3, "dense gated
  expand"): h = x @ A^T once, H' = s * G (x) h with the gates G [T, E] built from the
  ids/weights, then one GEMM with K = E*r (``addmm`` into the base output when given).
- ``moe_lora_grouped_mm``: sort the (token, slot) pairs by expert, per-expert grouped GEMMs
  (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``) for x @ A_e^T and h @ B_e^T,
  gate, ``index_add`` combine.
- ``moe_ffn_naive`` / ``moe_ffn_grouped_mm``: a full-FFN MoE with SwiGLU experts
  (w13 = [gate; up] stacked [E, 2 d_ff, d], w2 [E, d, d_ff]): per-expert loop, or
  dispatch + grouped GEMM + combine.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def grouped_mm_fn():
    """The installed torch's grouped GEMM (public name first), or None."""
    fn = getattr(F, "grouped_mm", None)
    if fn is None:
        fn = getattr(torch, "_grouped_mm", None)
    return fn


def gates_dense(ids: torch.Tensor, weights: torch.Tensor, experts: int) -> torch.Tensor:
    """G [T, E]: per token, the summed gate weight of each expert (differentiable in weights)."""
    g = torch.zeros(ids.shape[0], experts, dtype=weights.dtype, device=weights.device)
    return g.scatter_add(1, ids.long(), weights)


def moe_lora_dense(x, lora_a, lora_b, ids, weights, scaling: float = 1.0,
                   base_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    T = x.shape[0]
    E, d_out, r = lora_b.shape
    gates = (gates_dense(ids, weights, E) * scaling).to(x.dtype)  # [T, E]
    if lora_a.dim() == 2:
        h = x @ lora_a.t()  # [T, r]
        hp = (gates[:, :, None] * h[:, None, :]).reshape(T, E * r)
    else:
        h = x @ lora_a.reshape(E * r, -1).t()  # [T, E*r]
        hp = (gates[:, :, None] * h.view(T, E, r)).reshape(T, E * r)
    b_stack = lora_b.permute(1, 0, 2).reshape(d_out, E * r)  # [d_out, E*r]
    if base_out is None:
        return hp @ b_stack.t()
    return torch.addmm(base_out, hp, b_stack.t())


def _sort_by_expert(ids: torch.Tensor, experts: int):
    """order of the flattened (token, slot) pairs by expert, their tokens, int32 group ends.

    The group ends come from a binary search of the sorted ids, which the device runs alone:
    ``torch.bincount`` would read the largest id back to the host (a synchronisation per call
    on CUDA, which moelora's own dispatch does not pay and which keeps the host from
    enqueueing ahead: tests/test_benchmark_fairness.py)."""
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    tokens = torch.div(order, ids.shape[1], rounding_mode="floor")
    bounds = torch.arange(1, experts + 1, device=ids.device)
    offs = torch.searchsorted(flat[order], bounds, out_int32=True)  # [E]: pairs with an id below e + 1
    return order, tokens, offs


def moe_lora_grouped_mm(x, lora_a, lora_b, ids, weights, scaling: float = 1.0,
                        base_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    gmm = grouped_mm_fn()
    if gmm is None:
        raise RuntimeError("this torch has neither torch.nn.functional.grouped_mm nor torch._grouped_mm")
    T = x.shape[0]
    E, d_out, r = lora_b.shape
    order, tokens, offs = _sort_by_expert(ids, E)
    if lora_a.dim() == 2:
        hs = (x @ lora_a.t())[tokens]  # [T*k, r]
    else:
        hs = gmm(x[tokens], lora_a.transpose(1, 2), offs=offs)  # [T*k, r]
    ys = gmm(hs, lora_b.transpose(1, 2), offs=offs)  # [T*k, d_out]
    gate = (weights.reshape(-1)[order] * scaling).to(x.dtype)
    ys = ys * gate[:, None]
    out = base_out if base_out is not None else x.new_zeros(T, d_out)
    return out.index_add(0, tokens, ys)


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_ffn_naive(x, w13, w2, ids, weights) -> torch.Tensor:
    """Per-expert loop: select the expert's tokens, SwiGLU FFN, gate, index_add."""
    out = x.new_zeros(x.shape[0], w2.shape[1])
    for e in range(w13.shape[0]):
        tokens, slots = torch.nonzero(ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        y = _swiglu(x[tokens] @ w13[e].t()) @ w2[e].t()
        out = out.index_add(0, tokens, y * weights[tokens, slots].to(x.dtype)[:, None])
    return out


def moe_ffn_grouped_mm(x, w13, w2, ids, weights) -> torch.Tensor:
    """Dispatch (sort + gather rows), grouped GEMMs, gate, index_add combine."""
    gmm = grouped_mm_fn()
    if gmm is None:
        raise RuntimeError("this torch has neither torch.nn.functional.grouped_mm nor torch._grouped_mm")
    order, tokens, offs = _sort_by_expert(ids, w13.shape[0])
    h = gmm(x[tokens], w13.transpose(1, 2), offs=offs)  # [T*k, 2 d_ff]
    ys = gmm(_swiglu(h), w2.transpose(1, 2), offs=offs)  # [T*k, d]
    ys = ys * weights.reshape(-1)[order].to(x.dtype)[:, None]
    return x.new_zeros(x.shape[0], w2.shape[1]).index_add(0, tokens, ys)
