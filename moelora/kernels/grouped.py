"""Grouped GEMMs over expert-sorted rows, the fixed-order combine, and the FFN's row and routing kernels.

Row space: the (token, slot) pairs p = t * k + j sorted stably by expert, each expert's
segment starting at ``starts[e]`` and padded to a multiple of the layout block
(``row_pair[r]``: the pair at row r, -1 on padding and on the unused tail;
``block_expert[r // layout_block]``: the expert of row r, -1 on the tail). Token-major
operands (x, dy) are gathered in the GEMM prologue (``row = p // k``); row-space operands
are read in place. Nothing is permuted or copied beforehand, and the combine back to
tokens is a fixed-order per-token sum: no atomics, deterministic.

Every kernel that writes row space writes zeros on the rows without a pair (padding and
the unused tail), so row-space tensors are fully defined and a K-grouped reduction over
whole padded segments (torch's grouped_mm) adds nothing for them.
"""

import triton
import triton.language as tl


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` visiting GROUP_M row tiles across all column tiles
    before moving on, so that their operand tiles stay in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _expert_dot(acc, a_ptr, w_ptr, a_row, mask_m, offs_n, mask_n, K,
                stride_am, stride_ak, stride_wn, stride_wk, a_scale,
                DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                BLOCK_K: tl.constexpr, PRESCALE: tl.constexpr):
    """acc + A[a_row, :] @ W^T with W addressed as [N, K] through its strides (PRESCALE:
    (a_scale * A) @ W^T, A scaled before it is rounded to DOT_DTYPE)."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if PRESCALE:
            a = a.to(ACC_DTYPE) * a_scale
        acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def grouped_matmul_kernel(
    a_ptr, w_ptr, a2_ptr, w2_ptr, c_ptr, row_pair_ptr, block_expert_ptr, scale_ptr, h_ptr, dw_ptr, alpha, alpha_out,
    num_rows, N, K, top_k, layout_block,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk,
    stride_a2m, stride_a2k, stride_w2e, stride_w2n, stride_w2k,
    stride_cm, stride_cn, stride_scale, stride_hm, stride_hn,
    A_BY_TOKEN: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_SCALE: tl.constexpr,
    GATE_GRAD: tl.constexpr, H_BY_TOKEN: tl.constexpr, PRESCALE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[r, :] = scale[p] * alpha * (A[row(r)] @ W[e]^T (+ A2[row(r)] @ W2[e]^T)) for the rows r of expert e.

    row(r) = p // k (A_BY_TOKEN) or r; p = row_pair[r]. W[e] is addressed as [N, K] through
    its strides. GATE_GRAD (one column tile, BLOCK_N >= N) also writes
    dw[p] = <alpha * (A @ W^T)[r], H[row_h(r)]>. Rows without a pair (padding, unused tail)
    get zeros. The scale is applied as two factors, ``alpha`` first and ``alpha_out`` last
    (launchers.scale_factors: a product outside fp32's range still gives representable
    results); PRESCALE (a split scale): alpha multiplies the A tiles before the dot.
    Grid: (num_rows / BLOCK_M * cdiv(N, BLOCK_N),), GROUP_M row tiles at a time.
    """
    num_m = num_rows // BLOCK_M
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    row0 = pid_m.to(tl.int64) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    expert = tl.load(block_expert_ptr + row0 // layout_block).to(tl.int64)
    # A tile on the unused tail or starting on padding holds no pair: zeros, no GEMM.
    if (expert < 0) | (tl.load(row_pair_ptr + row0) < 0):
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_n[None, :])
        return
    pair = tl.load(row_pair_ptr + rows).to(tl.int64)
    mask_m = pair >= 0
    pair = tl.where(mask_m, pair, 0)
    a_row = pair // top_k if A_BY_TOKEN else rows

    acc = _expert_dot(acc, a_ptr, w_ptr + expert * stride_we, a_row, mask_m, offs_n, mask_n, K,
                      stride_am, stride_ak, stride_wn, stride_wk, alpha, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION,
                      BLOCK_K, PRESCALE)
    if HAS_SECOND:
        acc = _expert_dot(acc, a2_ptr, w2_ptr + expert * stride_w2e, a_row, mask_m, offs_n, mask_n, K,
                          stride_a2m, stride_a2k, stride_w2n, stride_w2k, alpha, DOT_DTYPE, ACC_DTYPE,
                          INPUT_PRECISION, BLOCK_K, PRESCALE)
    if not PRESCALE:
        acc = acc * alpha
    if GATE_GRAD:
        h_row = pair // top_k if H_BY_TOKEN else rows
        h = tl.load(h_ptr + h_row[:, None] * stride_hm + offs_n[None, :] * stride_hn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        tl.store(dw_ptr + pair, tl.sum(acc * h.to(ACC_DTYPE), axis=1) * alpha_out, mask=mask_m)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + pair * stride_scale, mask=mask_m, other=0.0)
        acc = acc * scale.to(ACC_DTYPE)[:, None]
    acc = acc * alpha_out
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_n[None, :])


@triton.jit
def grouped_weight_grad_kernel(
    l_ptr, r_ptr, out_ptr, row_pair_ptr, starts_ptr, counts_ptr, scale_ptr, alpha, alpha_out,
    NA, NB, top_k, num_splits,
    stride_lm, stride_la, stride_rm, stride_rb,
    stride_os, stride_oe, stride_oa, stride_ob, stride_scale,
    L_BY_TOKEN: tl.constexpr, R_BY_TOKEN: tl.constexpr, R_ONES: tl.constexpr, HAS_SCALE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_A: tl.constexpr,
):
    """out[s, e] = alpha * alpha_out * sum_r L[row(r)]^T (scale[p] * R[row(r)]) over slice s of expert e's rows.

    With HAS_SCALE, alpha multiplies the scale before R's tile is rounded to DOT_DTYPE (as the
    dense regime's Hg = s * G * h), alpha_out the result.

    Expert e owns rows starts[e] .. starts[e] + counts[e]; row(r) = p // k (token-major
    operand) or r; p = row_pair[r]; R_ONES: R is a column of ones (NB = 1, r_ptr unread: the
    per-expert row sums). The reduction runs in row order: deterministic.
    Experts without rows get exact zeros.
    Grid: (E * num_splits * cdiv(NA, BLOCK_A) * cdiv(NB, BLOCK_B),), expert-major, so that
    the programs running together share one expert's rows.
    """
    num_a = tl.cdiv(NA, BLOCK_A)
    num_b = tl.cdiv(NB, BLOCK_B)
    pid = tl.program_id(0)
    expert_split = pid // (num_a * num_b)
    pid_a, pid_b = _swizzle(pid % (num_a * num_b), num_a, num_b, GROUP_A)
    expert = (expert_split // num_splits).to(tl.int64)
    split = expert_split % num_splits
    start = tl.load(starts_ptr + expert).to(tl.int64)
    count = tl.load(counts_ptr + expert).to(tl.int64)
    chunk = tl.cdiv(tl.cdiv(count, num_splits), BLOCK_K) * BLOCK_K
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, start + count)
    offs_a = pid_a.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a = offs_a < NA
    mask_b = offs_b < NB

    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC_DTYPE)
    for k0 in range(lo, hi, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        mask_k = rows < hi
        if (L_BY_TOKEN or R_BY_TOKEN) or HAS_SCALE:
            pair = tl.load(row_pair_ptr + rows, mask=mask_k, other=0).to(tl.int64)
        l_row = pair // top_k if L_BY_TOKEN else rows
        r_row = pair // top_k if R_BY_TOKEN else rows
        lt = tl.load(l_ptr + l_row[None, :] * stride_lm + offs_a[:, None] * stride_la,
                     mask=mask_a[:, None] & mask_k[None, :], other=0.0)
        if R_ONES:
            rt = tl.where(mask_k[:, None] & mask_b[None, :], 1.0, 0.0)
        else:
            rt = tl.load(r_ptr + r_row[:, None] * stride_rm + offs_b[None, :] * stride_rb,
                         mask=mask_k[:, None] & mask_b[None, :], other=0.0)
        if HAS_SCALE:  # alpha too, before R is rounded to DOT_DTYPE: alpha * scale * R may fit where R does not
            scale = tl.load(scale_ptr + pair * stride_scale, mask=mask_k, other=0.0)
            rt = rt.to(ACC_DTYPE) * (scale.to(ACC_DTYPE) * alpha)[:, None]
        acc += tl.dot(lt.to(DOT_DTYPE), rt.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if not HAS_SCALE:
        acc = acc * alpha
    acc = acc * alpha_out
    tl.store(out_ptr + split * stride_os + expert * stride_oe + offs_a[:, None] * stride_oa
             + offs_b[None, :] * stride_ob, acc.to(out_ptr.dtype.element_ty),
             mask=mask_a[:, None] & mask_b[None, :])


@triton.jit
def _slot_value(rows_ptr, rows2_ptr, inverse_ptr, ids_ptr, bias_ptr, offs_t, mask_t, offs_n, mask_n, j,
                stride_rm, stride_rn, stride_r2m, stride_r2n, stride_it, stride_ik, stride_idt, stride_idk,
                stride_be, stride_bn,
                HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """rows[inv[t, j]] (+ rows2[...]) (+ bias[ids[t, j]]) in ACC_DTYPE; zero for invalid slots."""
    pos = tl.load(inverse_ptr + offs_t * stride_it + j * stride_ik, mask=mask_t, other=-1).to(tl.int64)
    valid = pos >= 0
    pos = tl.where(valid, pos, 0)
    mask = valid[:, None] & mask_n[None, :]
    z = tl.load(rows_ptr + pos[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
    z = z.to(ACC_DTYPE)
    if HAS_SECOND:
        z += tl.load(rows2_ptr + pos[:, None] * stride_r2m + offs_n[None, :] * stride_r2n, mask=mask,
                     other=0.0).to(ACC_DTYPE)
    if HAS_BIAS:
        expert = tl.load(ids_ptr + offs_t * stride_idt + j * stride_idk, mask=valid, other=0).to(tl.int64)
        z += tl.load(bias_ptr + expert[:, None] * stride_be + offs_n[None, :] * stride_bn, mask=mask,
                     other=0.0).to(ACC_DTYPE)
    return z


@triton.jit
def combine_rows_kernel(
    rows_ptr, rows2_ptr, inverse_ptr, coef_ptr, ids_ptr, bias_ptr, base_ptr, out_ptr,
    T, N,
    stride_rm, stride_rn, stride_r2m, stride_r2n, stride_it, stride_ik, stride_ct, stride_ck,
    stride_idt, stride_idk, stride_be, stride_bn, stride_bt, stride_bbn, stride_ot, stride_on,
    TOP_K: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_COEF: tl.constexpr, ANCHORED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t] = base[t] + z_a + sum_j coef[t, j] * (z_j - z_a), in slot order.

    z_j = rows[inv[t, j]] (+ rows2[inv[t, j]]) (+ bias[ids[t, j]]), zero for slots whose
    inverse is -1 (their coef is not read); z_a = z_0 with ANCHORED, else 0; coef = 1 without
    HAS_COEF. Anchored, slots whose z_j equals z_0 bitwise add exactly nothing.
    Grid: (cdiv(T, BLOCK_T), cdiv(N, BLOCK_N)).
    """
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < N
    mask = mask_t[:, None] & mask_n[None, :]
    if HAS_BASE:
        acc = tl.load(base_ptr + offs_t[:, None] * stride_bt + offs_n[None, :] * stride_bbn,
                      mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC_DTYPE)
    anchor = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC_DTYPE)
    if ANCHORED:
        anchor = _slot_value(rows_ptr, rows2_ptr, inverse_ptr, ids_ptr, bias_ptr, offs_t, mask_t, offs_n, mask_n,
                             0, stride_rm, stride_rn, stride_r2m, stride_r2n, stride_it, stride_ik,
                             stride_idt, stride_idk, stride_be, stride_bn, HAS_SECOND, HAS_BIAS, ACC_DTYPE)
        acc += anchor
    for j in tl.static_range(TOP_K):
        z = _slot_value(rows_ptr, rows2_ptr, inverse_ptr, ids_ptr, bias_ptr, offs_t, mask_t, offs_n, mask_n,
                        j, stride_rm, stride_rn, stride_r2m, stride_r2n, stride_it, stride_ik,
                        stride_idt, stride_idk, stride_be, stride_bn, HAS_SECOND, HAS_BIAS, ACC_DTYPE)
        if HAS_COEF:  # a slot outside the layout adds nothing, whatever its coefficient holds
            in_layout = tl.load(inverse_ptr + offs_t * stride_it + j * stride_ik, mask=mask_t, other=-1) >= 0
            c = tl.load(coef_ptr + offs_t * stride_ct + j * stride_ck, mask=in_layout, other=0.0).to(ACC_DTYPE)
            acc += c[:, None] * (z - anchor)
        else:
            acc += z - anchor
    tl.store(out_ptr + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def combine_rows_backward_kernel(
    dy_ptr, rows_ptr, ids_ptr, bias_ptr, coef_ptr, row_pair_ptr, drows_ptr, g_ptr,
    num_rows, N, top_k,
    stride_dt, stride_dn, stride_rm, stride_rn, stride_idt, stride_idk, stride_be, stride_bn,
    stride_dm, stride_dcn,
    HAS_BIAS: tl.constexpr, NEED_G: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """drows[r] = coef[p] * dy[t] and g[p] = <dy[t], rows[r] (+ bias[e])> for p = row_pair[r], t = p // k.

    ``coef`` and ``g`` are flat over the pairs; padding rows get drows = 0 and no g.
    Grid: (cdiv(num_rows, BLOCK_R),); each program walks all N columns.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < num_rows
    pair = tl.load(row_pair_ptr + rows, mask=mask_r, other=-1).to(tl.int64)
    valid = pair >= 0
    pair = tl.where(valid, pair, 0)
    token = pair // top_k
    c = tl.load(coef_ptr + pair, mask=valid, other=0.0).to(ACC_DTYPE)
    if HAS_BIAS:
        expert = tl.load(ids_ptr + token * stride_idt + (pair % top_k) * stride_idk, mask=valid, other=0)
        expert = expert.to(tl.int64)
    g = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = valid[:, None] & mask_n[None, :]
        dy = tl.load(dy_ptr + token[:, None] * stride_dt + offs_n[None, :] * stride_dn, mask=mask,
                     other=0.0).to(ACC_DTYPE)
        tl.store(drows_ptr + rows[:, None] * stride_dm + offs_n[None, :] * stride_dcn,
                 (c[:, None] * dy).to(drows_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_n[None, :])
        if NEED_G:
            z = tl.load(rows_ptr + rows[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask,
                        other=0.0).to(ACC_DTYPE)
            if HAS_BIAS:
                z += tl.load(bias_ptr + expert[:, None] * stride_be + offs_n[None, :] * stride_bn, mask=mask,
                             other=0.0).to(ACC_DTYPE)
            g += tl.sum(dy * z, axis=1)
    if NEED_G:
        tl.store(g_ptr + pair, g, mask=valid)


@triton.jit
def _kept_weights(ids_ptr, w_ptr, T, E, stride_it, stride_ik, stride_wt, stride_wk, TOP_K: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """(offs_t, offs_k, mask, ids, kept, w) of this program's BLOCK_T tokens x BLOCK_K slots: a
    slot is kept when its weight is nonzero and its id in [0, E); w is its weight in ACC_DTYPE,
    0 where not kept."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_t < T)[:, None] & (offs_k < TOP_K)[None, :]
    ids = tl.load(ids_ptr + offs_t[:, None] * stride_it + offs_k[None, :] * stride_ik, mask=mask, other=-1)
    w = tl.load(w_ptr + offs_t[:, None] * stride_wt + offs_k[None, :] * stride_wk, mask=mask,
                other=0.0).to(ACC_DTYPE)
    kept = mask & (w != 0) & (ids >= 0) & (ids < E)
    return offs_t, offs_k, mask, ids, kept, tl.where(kept, w, 0.0)


@triton.jit
def mixing_weights_kernel(
    ids_ptr, w_ptr, ids_out_ptr, coef_ptr, row_coef_ptr,
    T, E, stride_it, stride_ik, stride_wt, stride_wk,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, TINY: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The FFN's routing for the combine: ids_out = ids where kept, else -1 (kept: weight != 0
    and id in [0, E)); coef = the kept weights (0 elsewhere), divided by their sum (at least
    TINY, NaN propagating) with NORMALIZE; with NORMALIZE also row_coef = the coefficients of
    the rows in the anchored mix z_0 + sum_j c_j (z_j - z_0): slot 0's is 1 - sum_{j>0} c_j.
    ids_out, coef, row_coef: contiguous [T, TOP_K].
    Grid: (cdiv(T, BLOCK_T),).
    """
    offs_t, offs_k, mask, ids, kept, c = _kept_weights(ids_ptr, w_ptr, T, E, stride_it, stride_ik, stride_wt,
                                                       stride_wk, TOP_K, ACC_DTYPE, BLOCK_T, BLOCK_K)
    out = offs_t[:, None] * TOP_K + offs_k[None, :]
    if NORMALIZE:
        c = c / tl.maximum(tl.sum(c, axis=1), TINY, propagate_nan=tl.PropagateNan.ALL)[:, None]
        others = tl.sum(tl.where(offs_k[None, :] > 0, c, 0.0), axis=1)
        tl.store(row_coef_ptr + out, tl.where(offs_k[None, :] == 0, 1.0 - others[:, None], c), mask=mask)
    tl.store(ids_out_ptr + out, tl.where(kept, ids, -1).to(ids_out_ptr.dtype.element_ty), mask=mask)
    tl.store(coef_ptr + out, c, mask=mask)


@triton.jit
def mixing_weights_backward_kernel(
    g_ptr, ids_ptr, w_ptr, dw_ptr,
    T, E, stride_it, stride_ik, stride_wt, stride_wk, stride_dt, stride_dk,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, TINY: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """d weights of mixing_weights_kernel's coefficients and the combine, from g [T * TOP_K]
    (contiguous; g[p] = <dy[t], z_j>, read for kept slots only): dc_j = g_j (NORMALIZE, the
    anchored mix: g_j - g_0); NORMALIZE: with s the kept weights' sum and S = max(s, TINY),
    dw_i = dc_i / S - [s >= TINY] sum_j dc_j c_j / S; 0 for slots not kept.
    Grid: (cdiv(T, BLOCK_T),).
    """
    offs_t, offs_k, mask, _, kept, w = _kept_weights(ids_ptr, w_ptr, T, E, stride_it, stride_ik, stride_wt,
                                                     stride_wk, TOP_K, ACC_DTYPE, BLOCK_T, BLOCK_K)
    dc = tl.load(g_ptr + offs_t[:, None] * TOP_K + offs_k[None, :], mask=kept, other=0.0).to(ACC_DTYPE)
    if NORMALIZE:  # the anchored mix: -g_0 cancels below wherever the c_j sum to one (s >= TINY)
        dc -= tl.sum(tl.where(offs_k[None, :] == 0, dc, 0.0), axis=1)[:, None]
        s = tl.sum(w, axis=1)
        scale = tl.maximum(s, TINY, propagate_nan=tl.PropagateNan.ALL)
        c = w / scale[:, None]
        through_sum = tl.where(s >= TINY, tl.sum(dc * c, axis=1) / scale, 0.0)
        dc = dc / scale[:, None] - through_sum[:, None]
    tl.store(dw_ptr + offs_t[:, None] * stride_dt + offs_k[None, :] * stride_dk,
             tl.where(kept, dc, 0.0).to(dw_ptr.dtype.element_ty), mask=mask)


# Activations of the fused GLU kernels (ACT codes; moelora.ops.moe_ffn maps callables to them).
SILU, GELU, GELU_TANH, RELU = 0, 1, 2, 3


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:
        out = x * _sigmoid(x)
    elif ACT == 1:
        out = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        out = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    else:  # ReLU; NaN stays NaN (as torch.relu): an overflow of the projection must show in the output
        out = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return out


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        s = _sigmoid(x)
        out = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        out = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        th = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        out = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    else:
        out = tl.where(x > 0.0, 1.0, 0.0)
    return out


@triton.jit
def _glu_tile(hg_ptr, hu_ptr, bg_ptr, bu_ptr, row_pair_ptr, ids_ptr, num_rows, F, top_k,
              stride_gm, stride_gf, stride_um, stride_uf, stride_bge, stride_bgf, stride_bue, stride_buf,
              stride_idt, stride_idk,
              GATED: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, ACC_DTYPE: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """This program's (rows, offs_f, store mask, valid rows, g = hg + bg[e], u = hu + bu[e]),
    g and u in ACC_DTYPE, e the expert of each row's pair."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_f = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_r = rows < num_rows
    mask_f = offs_f < F
    pair = tl.load(row_pair_ptr + rows, mask=mask_r, other=-1).to(tl.int64)
    valid = pair >= 0
    pair = tl.where(valid, pair, 0)
    mask = valid[:, None] & mask_f[None, :]
    if HAS_BG or HAS_BU:
        expert = tl.load(ids_ptr + (pair // top_k) * stride_idt + (pair % top_k) * stride_idk, mask=valid,
                         other=0).to(tl.int64)
    u = tl.load(hu_ptr + rows[:, None] * stride_um + offs_f[None, :] * stride_uf, mask=mask, other=0.0)
    u = u.to(ACC_DTYPE)
    if HAS_BU:
        u += tl.load(bu_ptr + expert[:, None] * stride_bue + offs_f[None, :] * stride_buf, mask=mask,
                     other=0.0).to(ACC_DTYPE)
    g = u
    if GATED:
        g = tl.load(hg_ptr + rows[:, None] * stride_gm + offs_f[None, :] * stride_gf, mask=mask, other=0.0)
        g = g.to(ACC_DTYPE)
        if HAS_BG:
            g += tl.load(bg_ptr + expert[:, None] * stride_bge + offs_f[None, :] * stride_bgf, mask=mask,
                         other=0.0).to(ACC_DTYPE)
    return rows, offs_f, mask_r[:, None] & mask_f[None, :], valid, g, u


@triton.jit
def glu_forward_kernel(
    hg_ptr, hu_ptr, bg_ptr, bu_ptr, out_ptr, row_pair_ptr, ids_ptr,
    num_rows, F, top_k,
    stride_gm, stride_gf, stride_um, stride_uf, stride_bge, stride_bgf, stride_bue, stride_buf,
    stride_idt, stride_idk, stride_om, stride_of,
    GATED: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """out[r] = act(hg[r] + bg[e]) * (hu[r] + bu[e]) (GATED) or act(hu[r] + bu[e]); 0 on padding rows.

    e = the expert of row r's pair (ids[p // k, p % k]). Grid: (cdiv(num_rows, BLOCK_R), cdiv(F, BLOCK_F)).
    """
    rows, offs_f, store_mask, valid, g, u = _glu_tile(
        hg_ptr, hu_ptr, bg_ptr, bu_ptr, row_pair_ptr, ids_ptr, num_rows, F, top_k, stride_gm, stride_gf, stride_um,
        stride_uf, stride_bge, stride_bgf, stride_bue, stride_buf, stride_idt, stride_idk, GATED, HAS_BG, HAS_BU,
        ACC_DTYPE, BLOCK_R, BLOCK_F)
    out = _act(g, ACT) * u if GATED else _act(u, ACT)
    out = tl.where(valid[:, None], out, 0.0)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_f[None, :] * stride_of, out.to(out_ptr.dtype.element_ty),
             mask=store_mask)


@triton.jit
def glu_backward_kernel(
    dout_ptr, hg_ptr, hu_ptr, bg_ptr, bu_ptr, dhg_ptr, dhu_ptr, row_pair_ptr, ids_ptr,
    num_rows, F, top_k,
    stride_dm, stride_df, stride_gm, stride_gf, stride_um, stride_uf, stride_bge, stride_bgf, stride_bue,
    stride_buf, stride_idt, stride_idk, stride_dgm, stride_dgf, stride_dum, stride_duf,
    GATED: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Gradients of glu_forward: dhg = dout * u * act'(g), dhu = dout * act(g) (GATED), else
    dhu = dout * act'(u); 0 on padding rows. Grid: (cdiv(num_rows, BLOCK_R), cdiv(F, BLOCK_F)).
    """
    rows, offs_f, store_mask, valid, g, u = _glu_tile(
        hg_ptr, hu_ptr, bg_ptr, bu_ptr, row_pair_ptr, ids_ptr, num_rows, F, top_k, stride_gm, stride_gf, stride_um,
        stride_uf, stride_bge, stride_bgf, stride_bue, stride_buf, stride_idt, stride_idk, GATED, HAS_BG, HAS_BU,
        ACC_DTYPE, BLOCK_R, BLOCK_F)
    dout = tl.load(dout_ptr + rows[:, None] * stride_dm + offs_f[None, :] * stride_df,
                   mask=store_mask & valid[:, None], other=0.0).to(ACC_DTYPE)
    if GATED:
        dhg = tl.where(valid[:, None], dout * u * _act_grad(g, ACT), 0.0)
        tl.store(dhg_ptr + rows[:, None] * stride_dgm + offs_f[None, :] * stride_dgf,
                 dhg.to(dhg_ptr.dtype.element_ty), mask=store_mask)
        dhu = dout * _act(g, ACT)
    else:
        dhu = dout * _act_grad(u, ACT)
    dhu = tl.where(valid[:, None], dhu, 0.0)
    tl.store(dhu_ptr + rows[:, None] * stride_dum + offs_f[None, :] * stride_duf,
             dhu.to(dhu_ptr.dtype.element_ty), mask=store_mask)
