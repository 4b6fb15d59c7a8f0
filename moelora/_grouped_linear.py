"""Per-expert linear layers over the expert-sorted (token, slot) pairs, on the Triton kernels.

    grouped_linear(a, weight [E, N, K], bias [E, N] | None, layout)[p] = a[row(p)] @ weight[e(p)]^T + bias[e(p)]

for every pair p = t*k + j whose id is valid; rows of the other pairs are zero. ``row(p)``
is the token t when ``a`` holds one row per token ([T, K]) and p when it holds one row per
pair ([T*k, K]). Output rows are pair-major ([T*k, N]), so consecutive expert layers chain
without permutations. Backward: da by the same grouped GEMM against weight^T (per-token
inputs sum their k slots in fixed order), dweight and dbias by the fixed-order per-expert
reduction (experts without pairs get exact zeros). Deterministic, no host synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _launchers as K
from .routing import expert_layout


class PairLayout(NamedTuple):
    """What the grouped kernels read: the dispatch metadata plus the ids they came from."""

    topk_ids: torch.Tensor  # [T, k]; ids outside [0, E) mark pairs left out
    sorted_pairs: torch.Tensor  # [T*k] int64, expert-sorted (moelora.DispatchMetadata)
    offsets: torch.Tensor  # [E+1] int64
    row_pair: torch.Tensor  # [max_padded] int64, -1 in the padding
    block_expert: torch.Tensor  # [max_padded / block_m] int32
    block_m: int


def pair_layout(topk_ids: torch.Tensor, num_experts: int) -> PairLayout:
    """Sort the pairs by expert (moelora._C when built) and pad each segment to the GEMM tile."""
    block_m = K.grouped_block_m()
    meta = expert_layout(topk_ids, num_experts, block_m)
    return PairLayout(topk_ids, meta.sorted_pairs, meta.offsets, meta.sorted_pairs_padded, meta.block_expert,
                      block_m)


def _nk(weight: torch.Tensor, transposed: bool = False):
    """Strides addressing weight[e] as [N, K] (or its transpose as [K, N])."""
    return (weight.stride(2), weight.stride(1)) if transposed else (weight.stride(1), weight.stride(2))


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, weight, bias, layout: PairLayout, by_token: bool):
        num_pairs = layout.topk_ids.numel()
        out = torch.zeros(num_pairs, weight.shape[1], dtype=a.dtype, device=a.device)
        K.grouped_matmul(a, weight, out, layout.row_pair, layout.block_expert, layout.block_m,
                         top_k=layout.topk_ids.shape[1], a_by_token=by_token, weight_nk_strides=_nk(weight),
                         compute_dtype=a.dtype, bias=bias)
        ctx.save_for_backward(a, weight)
        ctx.layout, ctx.by_token, ctx.has_bias = layout, by_token, bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        a, weight = ctx.saved_tensors
        layout, by_token = ctx.layout, ctx.by_token
        num_experts = weight.shape[0]
        top_k = layout.topk_ids.shape[1]
        da = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            da_pair = torch.zeros(dout.shape[0], weight.shape[2], dtype=a.dtype, device=a.device)
            K.grouped_matmul(dout, weight, da_pair, layout.row_pair, layout.block_expert, layout.block_m,
                             top_k=top_k, a_by_token=False, weight_nk_strides=_nk(weight, transposed=True),
                             compute_dtype=a.dtype)
            da = K.combine_pairs(da_pair, layout.topk_ids, num_experts, out_dtype=a.dtype) if by_token else da_pair
        if ctx.needs_input_grad[1]:
            dweight = K.grouped_weight_grad(dout, a, layout.sorted_pairs, layout.offsets, num_experts=num_experts,
                                            top_k=top_k, left_by_token=False, right_by_token=by_token,
                                            compute_dtype=a.dtype, out_dtype=weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            ones = torch.ones(dout.shape[0], 1, dtype=a.dtype, device=a.device)
            dbias = K.grouped_weight_grad(dout, ones, layout.sorted_pairs, layout.offsets, num_experts=num_experts,
                                          top_k=top_k, left_by_token=False, right_by_token=False,
                                          compute_dtype=a.dtype, out_dtype=weight.dtype).squeeze(2)
        return da, dweight, dbias, None, None


def grouped_linear(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], layout: PairLayout,
                   by_token: bool) -> torch.Tensor:
    """Pair-major [T*k, N] expert outputs; see the module docstring."""
    return _GroupedLinear.apply(a, weight, bias, layout, by_token)
