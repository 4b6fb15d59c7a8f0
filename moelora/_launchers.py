"""Python launchers of the raw Triton kernels: output allocation, strides, block sizes.

Each launcher computes one kernel's result on tensors of any strides; no launcher reads
device memory on the host, so all of them are CUDA-graph safe.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_kernels.gating import gate_backward_kernel, gate_expand_kernel, gated_expand_kernel
from .triton_kernels.grouped import combine_pairs_kernel, grouped_matmul_kernel, grouped_weight_grad_kernel
from .triton_kernels.matmul import matmul_kernel

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def grouped_block_m() -> int:
    """Rows per expert block of the grouped GEMMs (the padding of the expert-sorted layout)."""
    return 32 if interpreting() else 64


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every input dtype except fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_config(compute_dtype: torch.dtype) -> dict:
    tf32 = compute_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting()
    return _dot_config_cached(compute_dtype, tf32)


@functools.lru_cache(maxsize=None)
def _dot_config_cached(compute_dtype: torch.dtype, tf32: bool) -> dict:
    return {
        "DOT_DTYPE": _TL_DTYPES[compute_dtype],
        "ACC_DTYPE": _TL_DTYPES[accumulator_dtype(compute_dtype)],
        "INPUT_PRECISION": "tf32" if tf32 else "ieee",
    }


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs needed to fill the device about twice; tiny under the interpreter."""
    if device.type != "cuda":
        return 1
    return 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _split_count(tiles: int, reduction: int, device: torch.device, min_per_split: int = 256) -> int:
    """Slices of a long reduction so that tiles * splits fills the device."""
    want = -(-_target_programs(device) // max(tiles, 1))
    return max(1, min(want, reduction // min_per_split, 64))


def matmul(a: torch.Tensor, b: torch.Tensor, *, out_dtype: torch.dtype, compute_dtype: torch.dtype,
           alpha: float = 1.0, addend: Optional[torch.Tensor] = None, split_k: bool = False,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """alpha * a @ b (+ addend) for a [M, K], b [K, N] of any strides; fp32/fp64 accumulation.

    With ``split_k`` the K range is cut into slices whose fp32 partials are summed in a
    fixed order (for weight gradients, whose reduction runs over all tokens). ``out``
    (any strides) receives the result when given.
    """
    M, K = a.shape
    N = b.shape[1]
    acc_dtype = accumulator_dtype(compute_dtype)
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0 or K == 0:
        out.copy_(addend if addend is not None else torch.zeros((), dtype=out_dtype))
        return out
    block_m = 64 if M >= 64 or interpreting() else _pow2_block(M, 16, 64)
    block_n = _pow2_block(N, 16, 128)
    block_k = _pow2_block(K, 16, 64)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    splits = _split_count(tiles, K, a.device) if split_k else 1
    k_per_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, k_per_split)
    # One split writes straight into ``out``; several write fp32 partials [splits, M, N].
    partial = out if splits == 1 else torch.empty(splits, M, N, dtype=acc_dtype, device=a.device)
    split_stride = 0 if splits == 1 else partial.stride(0)
    has_addend = addend is not None and splits == 1
    d = addend if has_addend else out
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), splits)
    matmul_kernel[grid](
        a, b, partial, d, M, N, K, k_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        split_stride, partial.stride(-2), partial.stride(-1), d.stride(0), d.stride(1),
        alpha, HAS_ADDEND=has_addend, **_dot_config(compute_dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    if splits > 1:
        total = partial.sum(0)
        out.copy_(total if addend is None else total + addend.to(acc_dtype))
    return out


def _routing_blocks(top_k: int) -> int:
    return triton.next_power_of_2(top_k)


def gate_expand(h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, num_experts: int,
                rank: int, scaling: float, shared_a: bool, out_dtype: torch.dtype,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hg [T, E*r] = s * G[t, e] * h_e[t]  (h [T, r] shared, or [T, E*r] per expert)."""
    T = h.shape[0]
    if out is None:
        out = torch.empty(T, num_experts * rank, dtype=out_dtype, device=h.device)
    block_t = 64 if interpreting() else 32
    grid = (triton.cdiv(T, block_t),)
    gate_expand_kernel[grid](
        h, topk_ids, topk_weights, out, T, num_experts, rank, scaling,
        h.stride(0), 0 if shared_a else rank * h.stride(1), h.stride(1),
        topk_ids.stride(0), topk_ids.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        out.stride(0), out.stride(1),
        COMPUTE_DTYPE=_TL_DTYPES[accumulator_dtype(h.dtype)],
        TOP_K=topk_ids.shape[1], BLOCK_K=_routing_blocks(topk_ids.shape[1]),
        BLOCK_T=block_t, BLOCK_R=_pow2_block(rank, 1, 1 << 16),
    )
    return out


def gated_expand(h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, lora_b: torch.Tensor, *,
                 scaling: float, shared_a: bool, base: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = base + sum_e (s * G[:, e] * h_e) @ B[e]^T in one kernel; y in B's dtype, [T, d_out]."""
    num_experts, N, rank = lora_b.shape
    T = h.shape[0]
    if out is None:
        out = torch.empty(T, N, dtype=lora_b.dtype, device=h.device)
    if T == 0 or N == 0:
        return out
    block_t = 64
    block_n = _pow2_block(N, 16, 128)
    base_arg = base if base is not None else out
    grid = (triton.cdiv(T, block_t), triton.cdiv(N, block_n))
    gated_expand_kernel[grid](
        h, topk_ids, topk_weights, lora_b, base_arg, out, T, N, num_experts, rank, scaling,
        h.stride(0), 0 if shared_a else rank * h.stride(1), h.stride(1),
        topk_ids.stride(0), topk_ids.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        base_arg.stride(0), base_arg.stride(1), out.stride(0), out.stride(1),
        SHARED_A=shared_a, HAS_BASE=base is not None, **_dot_config(lora_b.dtype),
        TOP_K=topk_ids.shape[1], BLOCK_K=_routing_blocks(topk_ids.shape[1]),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=_pow2_block(rank, 16, 1 << 16),
    )
    return out


def gate_backward(dhg: torch.Tensor, h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                  num_experts: int, rank: int, scaling: float, shared_a: bool,
                  dh: Optional[torch.Tensor] = None, dw: Optional[torch.Tensor] = None):
    """(dh, dw): dh [T, r] (shared A) or [T, E*r], dw [T, k]; both in h's (accumulator) dtype."""
    T = h.shape[0]
    if dh is None:
        dh = torch.empty(T, rank if shared_a else num_experts * rank, dtype=h.dtype, device=h.device)
    if dw is None:
        dw = torch.empty(topk_ids.shape, dtype=h.dtype, device=h.device)
    block_t = 64 if interpreting() else 32
    grid = (triton.cdiv(T, block_t),)
    gate_backward_kernel[grid](
        dhg, h, topk_ids, topk_weights, dh, dw, T, num_experts, rank, scaling,
        dhg.stride(0), dhg.stride(1),
        h.stride(0), 0 if shared_a else rank * h.stride(1), h.stride(1),
        topk_ids.stride(0), topk_ids.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        dh.stride(0), dh.stride(1), dw.stride(0), dw.stride(1),
        SHARED_A=shared_a, COMPUTE_DTYPE=_TL_DTYPES[h.dtype],
        TOP_K=topk_ids.shape[1], BLOCK_K=_routing_blocks(topk_ids.shape[1]),
        BLOCK_T=block_t, BLOCK_R=_pow2_block(rank, 1, 1 << 16),
    )
    return dh, dw


def grouped_matmul(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, row_pair: torch.Tensor,
                   block_expert: torch.Tensor, block_m: int, *, top_k: int, a_by_token: bool,
                   weight_nk_strides: tuple, compute_dtype: torch.dtype, alpha: float = 1.0,
                   scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[p] = alpha * scale[p] * a[row(p)] @ W[e]^T (+ bias[e], [E, N]) over the expert blocks; returns ``out``.

    ``weight`` is [E, ...] and ``weight_nk_strides`` addresses W[e] as [N, K]; N = out.shape[1].
    Rows of ``out`` of pairs with invalid ids are left untouched.
    """
    N = out.shape[1]
    K = a.shape[1]
    if out.shape[0] == 0 or N == 0:
        return out
    block_n = _pow2_block(N, 16, 128)
    block_k = _pow2_block(K, 16, 64)
    grid = (block_expert.numel(), triton.cdiv(N, block_n))
    scale_arg = scale if scale is not None else out
    bias_arg = bias if bias is not None else out
    grouped_matmul_kernel[grid](
        a, weight, out, row_pair, block_expert, scale_arg, bias_arg, N, K, top_k, alpha,
        a.stride(0), a.stride(1), weight.stride(0), weight_nk_strides[0], weight_nk_strides[1],
        out.stride(0), out.stride(1), scale.stride(0) if scale is not None else 0,
        bias_arg.stride(0), bias_arg.stride(1),
        A_BY_TOKEN=a_by_token, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, **_dot_config(compute_dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


def grouped_weight_grad(left: torch.Tensor, right: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, *,
                        num_experts: int, top_k: int, left_by_token: bool, right_by_token: bool,
                        compute_dtype: torch.dtype, out_dtype: torch.dtype, alpha: float = 1.0,
                        scale: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[E, NA, NB]: per expert e, alpha * sum over its pairs p of left[row(p)]^T (scale[p] * right[row(p)])."""
    NA, NB = left.shape[1], right.shape[1]
    acc_dtype = accumulator_dtype(compute_dtype)
    block_a = _pow2_block(NA, 16, 64)
    block_b = _pow2_block(NB, 16, 64)
    block_k = 32
    tiles = num_experts * triton.cdiv(NA, block_a) * triton.cdiv(NB, block_b)
    splits = _split_count(tiles, order.numel() // max(num_experts, 1), left.device)
    if out is None:
        out = torch.empty(num_experts, NA, NB, dtype=out_dtype, device=left.device)
    if splits == 1:
        partial = out.unsqueeze(0)
    else:
        partial = torch.empty(splits, num_experts, NA, NB, dtype=acc_dtype, device=left.device)
    grid = (num_experts * splits, triton.cdiv(NA, block_a), triton.cdiv(NB, block_b))
    scale_arg = scale if scale is not None else partial
    grouped_weight_grad_kernel[grid](
        left, right, partial, order, offsets, scale_arg, NA, NB, top_k, splits, alpha,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
        scale.stride(0) if scale is not None else 0,
        L_BY_TOKEN=left_by_token, R_BY_TOKEN=right_by_token, HAS_SCALE=scale is not None,
        **_dot_config(compute_dtype), BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_K=block_k,
    )
    if splits > 1:
        out.copy_(partial.sum(0))
    return out


def combine_pairs(pairs: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, *, out_dtype: torch.dtype,
                  base: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[t] = base[t] + sum_j pairs[t*k + j] over the slots with valid ids, in slot order."""
    T, top_k = topk_ids.shape
    N = pairs.shape[1]
    if out is None:
        out = torch.empty(T, N, dtype=out_dtype, device=pairs.device)
    if T == 0 or N == 0:
        return out
    block_t, block_n = 32, _pow2_block(N, 16, 128)
    grid = (triton.cdiv(T, block_t), triton.cdiv(N, block_n))
    base_arg = base if base is not None else out
    combine_pairs_kernel[grid](
        pairs, topk_ids, base_arg, out, T, N, num_experts,
        pairs.stride(0), pairs.stride(1), topk_ids.stride(0), topk_ids.stride(1),
        base_arg.stride(0), base_arg.stride(1), out.stride(0), out.stride(1),
        TOP_K=top_k, HAS_BASE=base is not None, ACC_DTYPE=_TL_DTYPES[accumulator_dtype(out_dtype)],
        BLOCK_T=block_t, BLOCK_N=block_n,
    )
    return out
