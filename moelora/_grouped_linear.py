"""Per-expert linear layers over the expert-sorted (token, slot) pairs, on the Triton kernels.

    grouped_linear(a, weight [E, N, K], bias [E, N] | None, meta, ids)[p] = a[row(p)] @ weight[e(p)]^T + bias[e(p)]

for every pair p = t*k + j whose id is valid; rows of the other pairs are zero. ``row(p)``
is the token t when ``a`` holds one row per token ([T, K]) and p when it holds one row per
pair ([T*k, K]). Output rows are pair-major ([T*k, N]), so consecutive expert layers chain
without permutations. Backward: da by the same grouped GEMM against weight^T (per-token
inputs sum their k slots in fixed order), dweight and dbias by the fixed-order per-expert
reduction (experts without pairs get exact zeros). Deterministic, no host synchronisation.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _launchers as K
from .routing import DispatchMetadata, expert_layout


def pair_layout(topk_ids: torch.Tensor, num_experts: int) -> DispatchMetadata:
    """Sort the pairs by expert (moelora._C when built) and pad each segment to the GEMM tile."""
    return expert_layout(topk_ids, num_experts, K.grouped_block_m())


def _nk(weight: torch.Tensor, transposed: bool = False):
    """Strides addressing weight[e] as [N, K] (or its transpose as [K, N])."""
    return (weight.stride(2), weight.stride(1)) if transposed else (weight.stride(1), weight.stride(2))


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, weight, bias, meta: DispatchMetadata, topk_ids, by_token: bool):
        out = torch.zeros(topk_ids.numel(), weight.shape[1], dtype=a.dtype, device=a.device)
        K.grouped_matmul(a, weight, out, meta.sorted_pairs_padded, meta.block_expert, meta.block_size,
                         top_k=meta.top_k, a_by_token=by_token, weight_nk_strides=_nk(weight),
                         compute_dtype=a.dtype, bias=bias)
        ctx.save_for_backward(a, weight, topk_ids)
        ctx.meta, ctx.by_token, ctx.has_bias = meta, by_token, bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        a, weight, topk_ids = ctx.saved_tensors
        meta, by_token = ctx.meta, ctx.by_token
        num_experts, top_k = weight.shape[0], meta.top_k
        da = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            da_pair = torch.zeros(dout.shape[0], weight.shape[2], dtype=a.dtype, device=a.device)
            K.grouped_matmul(dout, weight, da_pair, meta.sorted_pairs_padded, meta.block_expert, meta.block_size,
                             top_k=top_k, a_by_token=False, weight_nk_strides=_nk(weight, transposed=True),
                             compute_dtype=a.dtype)
            da = K.combine_pairs(da_pair, topk_ids, num_experts, out_dtype=a.dtype) if by_token else da_pair
        if ctx.needs_input_grad[1]:
            dweight = K.grouped_weight_grad(dout, a, meta.sorted_pairs, meta.offsets, num_experts=num_experts,
                                            top_k=top_k, left_by_token=False, right_by_token=by_token,
                                            compute_dtype=a.dtype, out_dtype=weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            ones = torch.ones(dout.shape[0], 1, dtype=a.dtype, device=a.device)
            dbias = K.grouped_weight_grad(dout, ones, meta.sorted_pairs, meta.offsets, num_experts=num_experts,
                                          top_k=top_k, left_by_token=False, right_by_token=False,
                                          compute_dtype=a.dtype, out_dtype=weight.dtype).squeeze(2)
        return da, dweight, dbias, None, None, None


def grouped_linear(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], meta: DispatchMetadata,
                   topk_ids: torch.Tensor, by_token: bool) -> torch.Tensor:
    """Pair-major [T*k, N] expert outputs, ``meta`` from :func:`pair_layout` of ``topk_ids``;
    see the module docstring."""
    return _GroupedLinear.apply(a, weight, bias, meta, topk_ids, by_token)
