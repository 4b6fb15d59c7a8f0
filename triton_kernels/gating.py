"""Dense gated expand of the LoRA intermediate (alone, or fused into the expand GEMM), and its backward.

With G[t, e] = sum of the gate weights of the slots of token t that chose expert e
(ids outside [0, E) contribute nothing), s the LoRA scale and h the r-wide
intermediate (h[t] shared by all experts, or h[t, e*r:(e+1)*r] per expert):

    forward:  Hg[t, e*r + i] = s * G[t, e] * h_e[t, i]                  (T x E*r)
    backward: P[t, e]  = sum_i dHg[t, e*r + i] * h_e[t, i]
              dw[t, j] = s * P[t, ids[t, j]]
              dh[t, i] = s * sum_e G[t, e] * dHg[t, e*r + i]   (shared A)
              dh[t, e*r + i] = s * G[t, e] * dHg[t, e*r + i]   (per-expert A)
"""

import triton
import triton.language as tl


@triton.jit
def _load_routing(ids_ptr, w_ptr, offs_t, mask_t, stride_it, stride_ik, stride_wt, stride_wk,
                  TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    mask = mask_t[:, None] & (offs_k[None, :] < TOP_K)
    ids = tl.load(ids_ptr + offs_t[:, None] * stride_it + offs_k[None, :] * stride_ik, mask=mask, other=-1)
    w = tl.load(w_ptr + offs_t[:, None] * stride_wt + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
    return ids, w.to(COMPUTE_DTYPE)


@triton.jit
def gate_expand_kernel(
    h_ptr, ids_ptr, w_ptr, out_ptr,
    T, num_experts, rank, scaling,
    stride_ht, stride_he, stride_hr,
    stride_it, stride_ik, stride_wt, stride_wk,
    stride_ot, stride_oc,
    COMPUTE_DTYPE: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid: (cdiv(T, BLOCK_T),). stride_he is 0 for a shared A."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_r[None, :] < rank)
    ids, w = _load_routing(ids_ptr, w_ptr, offs_t, mask_t, stride_it, stride_ik, stride_wt, stride_wk,
                           TOP_K, BLOCK_K, COMPUTE_DTYPE)
    for e in range(num_experts):
        gate = tl.sum(tl.where(ids == e, w, 0.0), axis=1) * scaling
        h = tl.load(h_ptr + offs_t[:, None] * stride_ht + e * stride_he + offs_r[None, :] * stride_hr,
                    mask=mask, other=0.0)
        out = gate[:, None] * h.to(COMPUTE_DTYPE)
        tl.store(out_ptr + offs_t[:, None] * stride_ot + (e * rank + offs_r[None, :]) * stride_oc,
                 out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gate_backward_kernel(
    dhg_ptr, h_ptr, ids_ptr, w_ptr, dh_ptr, dw_ptr,
    T, num_experts, rank, scaling,
    stride_gt, stride_gc,
    stride_ht, stride_he, stride_hr,
    stride_it, stride_ik, stride_wt, stride_wk,
    stride_dht, stride_dhc, stride_dwt, stride_dwk,
    SHARED_A: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid: (cdiv(T, BLOCK_T),). Writes dh and dw in COMPUTE_DTYPE (fp32, or fp64 for fp64 inputs)."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_r[None, :] < rank)
    ids, w = _load_routing(ids_ptr, w_ptr, offs_t, mask_t, stride_it, stride_ik, stride_wt, stride_wk,
                           TOP_K, BLOCK_K, COMPUTE_DTYPE)
    dw = tl.zeros((BLOCK_T, BLOCK_K), dtype=COMPUTE_DTYPE)
    dh_shared = tl.zeros((BLOCK_T, BLOCK_R), dtype=COMPUTE_DTYPE)
    for e in range(num_experts):
        selected = ids == e
        gate = tl.sum(tl.where(selected, w, 0.0), axis=1) * scaling
        col = e * rank + offs_r[None, :]
        dhg = tl.load(dhg_ptr + offs_t[:, None] * stride_gt + col * stride_gc, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        h = tl.load(h_ptr + offs_t[:, None] * stride_ht + e * stride_he + offs_r[None, :] * stride_hr,
                    mask=mask, other=0.0).to(COMPUTE_DTYPE)
        p = tl.sum(dhg * h, axis=1) * scaling
        dw += tl.where(selected, p[:, None], 0.0)
        if SHARED_A:
            dh_shared += gate[:, None] * dhg
        else:
            tl.store(dh_ptr + offs_t[:, None] * stride_dht + col * stride_dhc, gate[:, None] * dhg, mask=mask)
    if SHARED_A:
        tl.store(dh_ptr + offs_t[:, None] * stride_dht + offs_r[None, :] * stride_dhc, dh_shared, mask=mask)
    offs_k = tl.arange(0, BLOCK_K)
    tl.store(dw_ptr + offs_t[:, None] * stride_dwt + offs_k[None, :] * stride_dwk,
             dw.to(dw_ptr.dtype.element_ty), mask=mask_t[:, None] & (offs_k[None, :] < TOP_K))


@triton.jit
def gated_expand_kernel(
    h_ptr, ids_ptr, w_ptr, b_ptr, base_ptr, y_ptr,
    T, N, num_experts, rank, scaling,
    stride_ht, stride_he, stride_hr,
    stride_it, stride_ik, stride_wt, stride_wk,
    stride_be, stride_bn, stride_br,
    stride_xt, stride_xn, stride_yt, stride_yn,
    SHARED_A: tl.constexpr, HAS_BASE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y = base + sum_e (s * G[:, e] * h_e) @ B[e]^T: the gate applied in the GEMM prologue.

    The gated intermediate never leaves registers. Grid: (cdiv(T, BLOCK_T), cdiv(N, BLOCK_N)).
    """
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask_n = offs_n < N
    mask_r = offs_r < rank
    ids, w = _load_routing(ids_ptr, w_ptr, offs_t, mask_t, stride_it, stride_ik, stride_wt, stride_wk,
                           TOP_K, BLOCK_K, ACC_DTYPE)
    h_ptrs = h_ptr + offs_t[:, None] * stride_ht + offs_r[None, :] * stride_hr
    h_mask = mask_t[:, None] & mask_r[None, :]
    h = tl.load(h_ptrs, mask=h_mask, other=0.0).to(ACC_DTYPE)  # the shared A's h, or expert 0's
    b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
    b_mask = mask_r[:, None] & mask_n[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC_DTYPE)
    for e in range(num_experts):
        gate = tl.sum(tl.where(ids == e, w, 0.0), axis=1) * scaling
        if not SHARED_A:
            if e > 0:
                h = tl.load(h_ptrs + e * stride_he, mask=h_mask, other=0.0).to(ACC_DTYPE)
        b = tl.load(b_ptrs + e * stride_be, mask=b_mask, other=0.0)
        acc += tl.dot((gate[:, None] * h).to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=INPUT_PRECISION,
                      out_dtype=ACC_DTYPE)
    mask = mask_t[:, None] & mask_n[None, :]
    if HAS_BASE:
        acc += tl.load(base_ptr + offs_t[:, None] * stride_xt + offs_n[None, :] * stride_xn,
                       mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask)
