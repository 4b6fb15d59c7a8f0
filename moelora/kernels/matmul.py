"""Strided GEMM: C[s] = alpha * (A[:, Ks] @ B[Ks, :] + A2 @ B2) (+ D), one K-slice Ks per split s
(the first product optionally masked: HAS_MASK; the second scaled elementwise: HAS_SECOND_SCALE).

Operands may have any strides (transposes, stride-0 broadcast gradients) and any float
dtype (converted to DOT_DTYPE in registers); offsets are int64. B's columns may be grouped:
column c of B is addressed as (c // b_group) * stride_bg + (c % b_group) * stride_bn, which
reads B_stack = [B_0 | ... | B_{E-1}] straight from an [E, N, r] tensor. A second operand
pair (A2 [M, K2] @ B2 [K2, N], HAS_SECOND) extends the reduction: [A | A2] @ [B ; B2] without
concatenating anything. With SANITIZE_B, non-finite entries of B count as 0 for the rows of A
whose coefficient on them is 0 and make C NaN where it is not (0 * NaN is not taken as NaN).
With SPLIT > 1 each split writes an fp32 partial that the caller reduces in a fixed order,
which keeps the result deterministic.
"""

import triton
import triton.language as tl


@triton.jit
def _any_nonfinite(acc):
    """Whether the tile ``acc`` holds a NaN or an Inf (a scalar: the tile-wide or of it)."""
    return tl.max(tl.where(tl.abs(acc) < float("inf"), 0, 1)) > 0


@triton.jit
def _sanitized_dot(a, b, acc, poisoned, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, SANITIZE_B: tl.constexpr):
    if SANITIZE_B:
        # B as the dot reads it: an fp32 entry beyond fp16's range is Inf once rounded to fp16
        # and, like any other Inf, must reach only the rows whose coefficient on it is not 0.
        b = b.to(DOT_DTYPE)
        finite = tl.abs(b.to(ACC_DTYPE)) < float("inf")  # NaN compares false
        acc += tl.dot(a.to(DOT_DTYPE), tl.where(finite, b, 0.0).to(DOT_DTYPE), input_precision=INPUT_PRECISION,
                      out_dtype=ACC_DTYPE)
        hits = tl.dot((a != 0).to(DOT_DTYPE), (~finite).to(DOT_DTYPE), input_precision=INPUT_PRECISION,
                      out_dtype=ACC_DTYPE)
        poisoned = poisoned | (hits > 0)
    else:
        acc += tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc, poisoned


# Rows (and reduction columns) per step of a sanitized pass, which runs only for tiles whose
# plain result is not all finite: small, so that the pass needs few registers and the finite
# path keeps the occupancy of a plain GEMM.
SANITIZED_SLICE = tl.constexpr(16)


@triton.jit
def _matmul_acc(a_ptr, b_ptr, offs_m, mask_m, offs_n, mask_n, b_cols, k_start, k_end, stride_am, stride_ak, stride_bk,
                SANITIZE_B: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(acc, poisoned): A[offs_m, k_start:k_end] @ B[k_start:k_end, offs_n] with _sanitized_dot."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    poisoned = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int1)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + b_cols[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc, poisoned = _sanitized_dot(a, b, acc, poisoned, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, SANITIZE_B)
    return acc, poisoned


@triton.jit
def _second_product(acc, a2_ptr, b2_ptr, offs_m, mask_m, offs_n, mask_n, K2, stride_a2m, stride_a2k, stride_b2k,
                    stride_b2n, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """acc + A2[offs_m, :] @ B2[:, offs_n]."""
    for j0 in range(0, K2, BLOCK_K):
        offs_j = j0 + tl.arange(0, BLOCK_K)
        mask_j = offs_j < K2
        a2 = tl.load(a2_ptr + offs_m[:, None] * stride_a2m + offs_j[None, :] * stride_a2k,
                     mask=mask_m[:, None] & mask_j[None, :], other=0.0)
        b2 = tl.load(b2_ptr + offs_j[:, None] * stride_b2k + offs_n[None, :] * stride_b2n,
                     mask=mask_j[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(a2.to(DOT_DTYPE), b2.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _matmul_finish(acc, poisoned, offs_m, mask_m, offs_n, mask_n, pid_s, a2_ptr, b2_ptr, c_ptr, d_ptr, m_ptr, s2_ptr,
                   alpha, mask_scale, K2, stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_cs, stride_cm,
                   stride_cn, stride_dm, stride_dn, stride_mm, stride_mn, stride_s2m, stride_s2n,
                   HAS_SECOND: tl.constexpr, HAS_ADDEND: tl.constexpr, HAS_MASK: tl.constexpr,
                   HAS_SECOND_SCALE: tl.constexpr, SANITIZE_B: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[s, offs_m, offs_n] = alpha * (acc (.) mask_scale keep + S2 (.) A2 @ B2 (split 0)), NaN where
    poisoned, (+ D); keep = 1 without HAS_MASK, S2 = 1 without HAS_SECOND_SCALE."""
    if HAS_MASK:
        keep = tl.load(m_ptr + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                       mask=mask_m[:, None] & mask_n[None, :], other=0)
        acc = tl.where(keep != 0, acc * mask_scale, 0.0)
    if HAS_SECOND:
        if pid_s == 0:
            if HAS_SECOND_SCALE:  # its own accumulator, scaled, then added
                acc2 = _second_product(tl.zeros(acc.shape, dtype=ACC_DTYPE), a2_ptr, b2_ptr, offs_m, mask_m, offs_n,
                                       mask_n, K2, stride_a2m, stride_a2k, stride_b2k, stride_b2n, DOT_DTYPE,
                                       ACC_DTYPE, INPUT_PRECISION, BLOCK_K)
                s2 = tl.load(s2_ptr + offs_m[:, None] * stride_s2m + offs_n[None, :] * stride_s2n,
                             mask=mask_m[:, None] & mask_n[None, :], other=0.0)
                acc += acc2 * s2.to(ACC_DTYPE)
            else:
                acc = _second_product(acc, a2_ptr, b2_ptr, offs_m, mask_m, offs_n, mask_n, K2, stride_a2m, stride_a2k,
                                      stride_b2k, stride_b2n, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, BLOCK_K)
    acc = acc * alpha
    if SANITIZE_B:
        acc = tl.where(poisoned, float("nan"), acc)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_ADDEND:
        d = tl.load(d_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn, mask=mask, other=0.0)
        acc += d.to(ACC_DTYPE)
    c_ptrs = c_ptr + pid_s * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, d_ptr, m_ptr, s2_ptr,
    alpha, mask_scale,
    M, N, K, K2, k_per_split, b_group,
    stride_am, stride_ak, stride_bk, stride_bg, stride_bn,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_cs, stride_cm, stride_cn, stride_dm, stride_dn, stride_mm, stride_mn, stride_s2m, stride_s2n,
    HAS_SECOND: tl.constexpr, HAS_ADDEND: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SECOND_SCALE: tl.constexpr,
    SANITIZE_B: tl.constexpr, B_GROUP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT). The second pair is added by split 0.

    B_GROUP: 0 for ungrouped columns, the group size when it is a power of two, -1 for another
    size (read from ``b_group``): a compile-time group lets the compiler see that B's columns
    run contiguously inside a group, so B's tiles are copied with vector (asynchronous) loads.

    HAS_MASK: the product A @ B (not the second pair) is multiplied by mask_scale where the
    bool M [M, N] (m_ptr) is true and zeroed elsewhere (LoRA dropout's backward; no split).
    HAS_SECOND_SCALE: the second pair's product is multiplied elementwise by S2 [M, N] (s2_ptr;
    router jitter's backward).

    SANITIZE_B: the tile is computed with plain dots first; only a tile whose product is not all
    finite (a non-finite A or B within its reach, or an overflow) is computed again,
    SANITIZED_SLICE rows at a time, with sanitized dots (_sanitized_dot). Finite tiles cost one
    dot per step and the registers of a plain GEMM.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if B_GROUP == 0:
        b_cols = offs_n * stride_bn
    elif B_GROUP > 0:
        b_cols = (offs_n // B_GROUP) * stride_bg + (offs_n % B_GROUP) * stride_bn
    else:
        b_cols = (offs_n // b_group) * stride_bg + (offs_n % b_group) * stride_bn
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    acc, poisoned = _matmul_acc(a_ptr, b_ptr, offs_m, mask_m, offs_n, mask_n, b_cols, k_start, k_end, stride_am,
                                stride_ak, stride_bk, False, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, BLOCK_M,
                                BLOCK_N, BLOCK_K)
    redo = False
    if SANITIZE_B:
        redo = _any_nonfinite(acc)
    if redo:
        for m0 in range(0, BLOCK_M, SANITIZED_SLICE):
            offs_s = pid_m * BLOCK_M + m0 + tl.arange(0, SANITIZED_SLICE)
            mask_s = offs_s < M
            acc_s, poisoned_s = _matmul_acc(a_ptr, b_ptr, offs_s, mask_s, offs_n, mask_n, b_cols, k_start, k_end,
                                            stride_am, stride_ak, stride_bk, True, DOT_DTYPE, ACC_DTYPE,
                                            INPUT_PRECISION, SANITIZED_SLICE, BLOCK_N, SANITIZED_SLICE)
            _matmul_finish(acc_s, poisoned_s, offs_s, mask_s, offs_n, mask_n, pid_s, a2_ptr, b2_ptr, c_ptr, d_ptr,
                           m_ptr, s2_ptr, alpha, mask_scale, K2, stride_a2m, stride_a2k, stride_b2k, stride_b2n,
                           stride_cs, stride_cm, stride_cn, stride_dm, stride_dn, stride_mm, stride_mn, stride_s2m,
                           stride_s2n, HAS_SECOND, HAS_ADDEND, HAS_MASK, HAS_SECOND_SCALE, SANITIZE_B, DOT_DTYPE,
                           ACC_DTYPE, INPUT_PRECISION, SANITIZED_SLICE)
    else:
        _matmul_finish(acc, poisoned, offs_m, mask_m, offs_n, mask_n, pid_s, a2_ptr, b2_ptr, c_ptr, d_ptr, m_ptr,
                       s2_ptr, alpha, mask_scale, K2, stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_cs,
                       stride_cm, stride_cn, stride_dm, stride_dn, stride_mm, stride_mn, stride_s2m, stride_s2n,
                       HAS_SECOND, HAS_ADDEND, HAS_MASK, HAS_SECOND_SCALE, SANITIZE_B, DOT_DTYPE, ACC_DTYPE,
                       INPUT_PRECISION, BLOCK_K)
