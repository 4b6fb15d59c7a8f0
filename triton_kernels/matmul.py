"""Strided GEMM: C[s] = alpha * A[:, Ks] @ B[Ks, :] (+ D), one K-slice Ks per split s.

Operands may have any strides (transposes, stride-0 broadcast gradients); offsets are
int64. With SPLIT > 1 each split writes an fp32 partial that the caller reduces in a
fixed order, which keeps the result deterministic.
"""

import triton
import triton.language as tl


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr, d_ptr,
    M, N, K, k_per_split,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_cs, stride_cm, stride_cn, stride_dm, stride_dn,
    alpha,
    HAS_ADDEND: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=INPUT_PRECISION,
                      out_dtype=ACC_DTYPE)

    acc = acc * alpha
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_ADDEND:
        d = tl.load(d_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn, mask=mask, other=0.0)
        acc += d.to(ACC_DTYPE)
    c_ptrs = c_ptr + pid_s * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
