"""Expert-sorted grouped GEMMs and the fixed-order combine.

The (token, slot) pairs p = t * k + j are sorted stably by expert and each expert's
segment is padded to BLOCK_M rows (``row_pair``: pair index per padded row, -1 for
padding; ``block_expert``: expert per block, -1 for unused trailing blocks). Rows are
gathered in the GEMM prologue (``row = p // k`` for token-major operands, ``row = p``
for pair-major ones); nothing is permuted or copied beforehand. Outputs are written
pair-major, so the combine is a fixed-order per-token sum: no atomics, deterministic.
"""

import triton
import triton.language as tl


@triton.jit
def grouped_matmul_kernel(
    a_ptr, w_ptr, c_ptr, row_pair_ptr, block_expert_ptr, scale_ptr, bias_ptr,
    N, K, top_k, alpha,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn, stride_scale,
    stride_be, stride_bn,
    A_BY_TOKEN: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[p, :] = alpha * scale[p] * A[row(p), :] @ W[e]^T (+ bias[e]) for the pairs p of one block of expert e.

    W[e] is addressed as [N, K] through its strides. Grid: (num_blocks, cdiv(N, BLOCK_N)).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_b).to(tl.int64)
    if expert < 0:
        return
    pair = tl.load(row_pair_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = pair >= 0
    pair = tl.where(mask_m, pair, 0)
    a_row = pair // top_k if A_BY_TOKEN else pair
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    acc = acc * alpha
    if HAS_SCALE:
        scale = tl.load(scale_ptr + pair * stride_scale, mask=mask_m, other=0.0)
        acc = acc * scale.to(ACC_DTYPE)[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0)
        acc = acc + bias.to(ACC_DTYPE)[None, :]
    tl.store(c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def grouped_weight_grad_kernel(
    l_ptr, r_ptr, out_ptr, order_ptr, offsets_ptr, scale_ptr,
    NA, NB, top_k, num_splits, alpha,
    stride_lm, stride_la, stride_rm, stride_rb,
    stride_os, stride_oe, stride_oa, stride_ob, stride_scale,
    L_BY_TOKEN: tl.constexpr, R_BY_TOKEN: tl.constexpr, HAS_SCALE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[s, e] = alpha * sum_p L[row(p)]^T (scale[p] * R[row(p)]) over slice s of expert e's pairs.

    Experts without pairs get exact zeros. Grid: (E * num_splits, cdiv(NA, BLOCK_A), cdiv(NB, BLOCK_B)).
    """
    pid = tl.program_id(0).to(tl.int64)
    expert = pid // num_splits
    split = pid % num_splits
    start = tl.load(offsets_ptr + expert).to(tl.int64)
    end = tl.load(offsets_ptr + expert + 1).to(tl.int64)
    chunk = (end - start + num_splits - 1) // num_splits
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, end)
    offs_a = tl.program_id(1).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = tl.program_id(2).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a = offs_a < NA
    mask_b = offs_b < NB

    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC_DTYPE)
    for k0 in range(lo, hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < hi
        pair = tl.load(order_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
        l_row = pair // top_k if L_BY_TOKEN else pair
        r_row = pair // top_k if R_BY_TOKEN else pair
        lt = tl.load(l_ptr + l_row[None, :] * stride_lm + offs_a[:, None] * stride_la,
                     mask=mask_a[:, None] & mask_k[None, :], other=0.0)
        rt = tl.load(r_ptr + r_row[:, None] * stride_rm + offs_b[None, :] * stride_rb,
                     mask=mask_k[:, None] & mask_b[None, :], other=0.0)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + pair * stride_scale, mask=mask_k, other=0.0)
            rt = rt.to(ACC_DTYPE) * scale.to(ACC_DTYPE)[:, None]
        acc += tl.dot(lt.to(DOT_DTYPE), rt.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    acc = acc * alpha
    tl.store(out_ptr + split * stride_os + expert * stride_oe + offs_a[:, None] * stride_oa
             + offs_b[None, :] * stride_ob, acc.to(out_ptr.dtype.element_ty),
             mask=mask_a[:, None] & mask_b[None, :])


@triton.jit
def combine_pairs_kernel(
    pairs_ptr, ids_ptr, base_ptr, out_ptr,
    T, N, num_experts,
    stride_pm, stride_pn, stride_it, stride_ik, stride_bt, stride_bn, stride_ot, stride_on,
    TOP_K: tl.constexpr, HAS_BASE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t] = base[t] + sum_{j < k, ids[t, j] valid} pairs[t * k + j], in slot order.

    Grid: (cdiv(T, BLOCK_T), cdiv(N, BLOCK_N)).
    """
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < N
    mask = mask_t[:, None] & mask_n[None, :]
    if HAS_BASE:
        acc = tl.load(base_ptr + offs_t[:, None] * stride_bt + offs_n[None, :] * stride_bn,
                      mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC_DTYPE)
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + offs_t * stride_it + j * stride_ik, mask=mask_t, other=-1)
        valid = mask_t & (expert >= 0) & (expert < num_experts)
        rows = offs_t * TOP_K + j
        acc += tl.load(pairs_ptr + rows[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                       mask=valid[:, None] & mask_n[None, :], other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)
