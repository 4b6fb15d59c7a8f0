"""Kernels of the dense MoE-LoRA regime and of the fused MoE-LoRA linear layer.

Notation: T tokens, x [T, d_in], E experts, top-k slots per token (ids, w [T, k]), LoRA rank
r, s the LoRA scale, A_rows the down-projection as a matrix ([r, d_in] shared, or the E
matrices stacked [E*r, d_in]), R its row count, h = x A_rows^T [T, R], and

    G[t, e]        = sum of w[t, j] over the slots j with ids[t, j] == e (0 if none)
    Hg[t, e*r + i] = s * G[t, e] * h_e[t, i]      (h_e = h for a shared A, else h[:, e*r:(e+1)*r])

Forward:   y = base + Hg @ B_stack^T             (gated_expand_kernel: Hg formed in the prologue)
Backward:  dHg = dy @ B_stack (matmul_kernel), then gate_backward_kernel:
               dw[t, j]  = s * <dHg_e[t], h_e[t]>        for e = ids[t, j]
               dh_e[t]   = s * G[t, e] * dHg_e[t]      (shared A: summed over e)
               and Hg itself (T x E*r, small), which the weight gradients read,
           and, for a learned router with logits [T, E], d logits (router_backward below),
           weight gradients (lora_weight_grad_kernel): dB_stack = dy^T Hg, dA_rows = dh^T x,
           dW_router = dlogits^T x.
Routers with logits: probabilities p = softmax(logits) (NaN read as -inf), and the layer's
auxiliary loss aux = lb_coef * E * sum_e f_e P_e + z_coef * mean_t lse_t^2 with f_e the routed
slots of expert e per token and P_e the mean probability (_router_aux_loss, run by
gated_expand_kernel's first program).

The scale s reaches the kernels as two fp32 factors s = scale * scale_out (scale_out = 1 unless
|s| leaves float32's range): the first enters with the gate, the second last, so a result that
is finite in exact arithmetic stays finite. Unchosen experts never contribute, whatever their
weights hold: a NaN or Inf in the B (or per-expert A) of an expert that a token did not
choose leaves that token's outputs and gradients finite. Every kernel is deterministic (no
atomics) and uses int64 offsets.

A kernel computing in float64 (float64 logits / layers) takes its float coefficients (the aux
loss's) as two float32 parts, hi + lo (moelora.kernels.launchers.float64_parts: Triton passes a
float argument as a float32), and forms 1 / T from T itself: float64's precision where one
float32 argument would give float32's. Below float64 it takes hi alone and the float32 1 / T,
as before the parts were added.

Parameters of every kernel launched here (and of matmul_kernel) come in one order: pointers,
then the floats that change from call to call, then the sizes and strides fixed by the launch
configuration, then the constexprs: moelora.kernels.launchers.KernelLaunch passes the first two groups
per call and keeps the others with the configuration.
"""

import triton
import triton.language as tl

from moelora.kernels.matmul import SANITIZED_SLICE, _any_nonfinite, _sanitized_dot

# Routing slots per token up to which the gated prologue unrolls its loop over them. Beyond 8 the
# unrolled form spills registers for sm_90 (Triton 3.6: k 10 with a base, 64 x 64 tiles) or leaves one
# program per SM (k 16, 64 x 128 tiles); the loop takes fewer registers at every k.
UNROLLED_SLOTS = tl.constexpr(8)


@triton.jit
def _load_routing(ids_ptr, w_ptr, offs_t, mask_t, stride_it, stride_ik, stride_wt, stride_wk,
                  TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """ids [BLOCK_T, BLOCK_K] (-1 where masked) and w (0 where masked) of a block of tokens."""
    offs_k = tl.arange(0, BLOCK_K)
    mask = mask_t[:, None] & (offs_k[None, :] < TOP_K)
    ids = tl.load(ids_ptr + offs_t[:, None] * stride_it + offs_k[None, :] * stride_ik, mask=mask, other=-1)
    w = tl.load(w_ptr + offs_t[:, None] * stride_wt + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
    return ids, w.to(COMPUTE_DTYPE)


@triton.jit
def lora_down_kernel(
    x_ptr, a_ptr, r_ptr, h_ptr, l_ptr, m_ptr, j_ptr,
    mask_scale,
    T, K, R, E,
    stride_xt, stride_xk, stride_ar, stride_ak, stride_re, stride_rk,
    stride_ht, stride_hr, stride_lt, stride_le, stride_mt, stride_mk, stride_jt, stride_jk,
    HAS_ROUTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_JITTER: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUTER_SPLITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    """h = x @ A_rows^T [T, R] and, with HAS_ROUTER, logits = x @ W_router^T [T, E], in one pass over x.

    HAS_MASK (LoRA dropout): h = mask_scale * (x (.) keep) @ A_rows^T with the bool keep mask
    [T, K] (m_ptr) read beside x; the logits read x as it is. HAS_JITTER (router jitter): the
    logits are (x (.) J) @ W_router^T with the factors J [T, K] (j_ptr), an fp32 product
    (ROUTER_SPLITS 0: x (.) J is not a bf16 number).

    A (any float dtype) is converted to DOT_DTYPE in registers; the router's product runs in
    ACC_DTYPE (fp32: the router weight is not rounded to x's dtype, so expert choices match an
    fp32 router's). For bf16 x it is ROUTER_SPLITS bf16 tensor-core products: the weight split
    into that many bf16 pieces (3 for an fp32 weight, which they hold to all 24 bits; 1 for a
    bf16 weight), each product of bf16 x and a piece exact in fp32, so the logits are x @ W^T
    rounded as an fp32 product is. An fp32 dot runs on the CUDA cores instead: at S1 on an H200
    this kernel's launches in tune_dense (with and without the router) took 2.5x as long in all
    that way. ROUTER_SPLITS 0: the fp32 dot (fp16 and fp32 x). Outputs accumulate in
    ACC_DTYPE. Program t * COLUMNS + j computes, for the t-th BLOCK_T tokens, the j-th BLOCK_R
    columns of h and the j-th BLOCK_E columns of the logits (either may be past the end): the
    router's columns, however many, are tiled like A's, and the programs that read the same rows
    of x run next to each other.
    Grid: (cdiv(T, BLOCK_T) * COLUMNS,), COLUMNS = max(cdiv(R, BLOCK_R), cdiv(E, BLOCK_E), 1).
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_t = pid // COLUMNS
    pid_r = pid % COLUMNS
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_e = pid_r * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_t = offs_t < T
    mask_r = offs_r < R
    mask_e = offs_e < E
    acc_h = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC_DTYPE)
    acc_l = tl.zeros((BLOCK_T, BLOCK_E), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if HAS_MASK:
            keep = tl.load(m_ptr + offs_t[:, None] * stride_mt + offs_k[None, :] * stride_mk,
                           mask=mask_t[:, None] & mask_k[None, :], other=0)
            acc_h += tl.dot(tl.where(keep != 0, x, 0.0), a.to(DOT_DTYPE), input_precision=INPUT_PRECISION,
                            out_dtype=ACC_DTYPE)
        else:
            acc_h += tl.dot(x, a.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_ROUTER:  # in ACC_DTYPE (x exact, the router weight not rounded): routing does not flip on rounding
            wr = tl.load(r_ptr + offs_e[None, :] * stride_re + offs_k[:, None] * stride_rk,
                         mask=mask_k[:, None] & mask_e[None, :], other=0.0)
            if HAS_JITTER:
                jit = tl.load(j_ptr + offs_t[:, None] * stride_jt + offs_k[None, :] * stride_jk,
                              mask=mask_t[:, None] & mask_k[None, :], other=0.0)
                acc_l += tl.dot(x.to(ACC_DTYPE) * jit.to(ACC_DTYPE), wr.to(ACC_DTYPE), input_precision="ieee",
                                out_dtype=ACC_DTYPE)
            elif ROUTER_SPLITS == 0:
                acc_l += tl.dot(x.to(ACC_DTYPE), wr.to(ACC_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)
            else:  # x is bf16: W = w_1 + ... + w_S in bf16 pieces
                rest = wr.to(ACC_DTYPE)
                for _ in tl.static_range(ROUTER_SPLITS):
                    piece = rest.to(tl.bfloat16)
                    acc_l += tl.dot(x, piece, out_dtype=ACC_DTYPE)
                    rest -= piece.to(ACC_DTYPE)
    if HAS_MASK:
        acc_h = acc_h * mask_scale
    tl.store(h_ptr + offs_t[:, None] * stride_ht + offs_r[None, :] * stride_hr, acc_h,
             mask=mask_t[:, None] & mask_r[None, :])
    if HAS_ROUTER:
        tl.store(l_ptr + offs_t[:, None] * stride_lt + offs_e[None, :] * stride_le, acc_l,
                 mask=mask_t[:, None] & mask_e[None, :])


@triton.jit
def _gated_tile(h_ptr, ids_ptr, w_ptr, offs_t, mask_t, offs_c, mask_c, rank, scaling,
                stride_ht, stride_hr, stride_it, stride_ik, stride_wt, stride_wk,
                SHARED_A: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                ACC: tl.constexpr):
    """Hg[offs_t, offs_c] (ACC), zero for (token, expert) pairs the token did not choose and for
    the columns past the end (mask_c false), whose "expert" an out-of-range id may name: its
    weight, NaN or Inf, must not reach the product with B."""
    expert = offs_c // rank
    h_col = offs_c % rank if SHARED_A else offs_c
    h_ptrs = h_ptr + offs_t[:, None] * stride_ht + h_col[None, :] * stride_hr
    h_mask = mask_t[:, None] & mask_c[None, :]
    if TOP_K <= UNROLLED_SLOTS:  # the slots' gates summed per column, then one product with h
        gate = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
        chosen = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.int1)
        for j in tl.static_range(TOP_K):
            id_j = tl.load(ids_ptr + offs_t * stride_it + j * stride_ik, mask=mask_t, other=-1)
            w_j = tl.load(w_ptr + offs_t * stride_wt + j * stride_wk, mask=mask_t, other=0.0).to(ACC)
            hit = id_j[:, None] == expert[None, :]
            gate += tl.where(hit, w_j[:, None], 0.0)
            chosen = chosen | hit
        h = tl.load(h_ptrs, mask=h_mask, other=0.0).to(ACC)
        hg = tl.where(chosen & mask_c[None, :], (gate * scaling) * h, 0.0)
    else:  # a loop adding each slot's product (the form above, unrolled, fails to compile under
        # Triton 3.6 at top_k 64, takes every register at 32 and spills from 10)
        h = tl.load(h_ptrs, mask=h_mask, other=0.0).to(ACC)
        hg = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
        for j in range(TOP_K):
            hg = _add_gated_slot(hg, h, ids_ptr, w_ptr, offs_t, mask_t, expert, j, scaling, stride_it, stride_ik,
                                 stride_wt, stride_wk, ACC)
        hg = tl.where(mask_c[None, :], hg, 0.0)
    return hg


@triton.jit
def _add_gated_slot(hg, h, ids_ptr, w_ptr, offs_t, mask_t, expert, j, scaling, stride_it, stride_ik, stride_wt,
                    stride_wk, ACC: tl.constexpr):
    """hg + (w_j * scaling) * h where routing slot j of the tokens offs_t chose the column's expert."""
    id_j = tl.load(ids_ptr + offs_t * stride_it + j * stride_ik, mask=mask_t, other=-1)
    w_j = tl.load(w_ptr + offs_t * stride_wt + j * stride_wk, mask=mask_t, other=0.0).to(ACC)
    return hg + tl.where(id_j[:, None] == expert[None, :], (w_j * scaling)[:, None] * h, 0.0)


@triton.jit
def _gated_expand_acc(h_ptr, ids_ptr, w_ptr, b_ptr, offs_t, mask_t, offs_n, mask_n, NB, rank, scaling,
                      stride_ht, stride_hr, stride_it, stride_ik, stride_wt, stride_wk, stride_be, stride_bn, stride_br,
                      SHARED_A: tl.constexpr, SANITIZE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, TOP_K: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """(acc, poisoned): Hg @ B_stack^T for the tokens offs_t and the columns offs_n, with plain
    dots, or with SANITIZE dots that take B's non-finite entries as 0 where Hg's coefficient on
    them is 0 and mark the outputs where it is not (moelora.kernels.matmul._sanitized_dot)."""
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC_DTYPE)
    poisoned = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.int1)
    for c0 in range(0, NB, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < NB
        hg = _gated_tile(h_ptr, ids_ptr, w_ptr, offs_t, mask_t, offs_c, mask_c, rank, scaling,
                         stride_ht, stride_hr, stride_it, stride_ik, stride_wt, stride_wk,
                         SHARED_A, TOP_K, BLOCK_T, BLOCK_C, ACC_DTYPE)
        b = tl.load(b_ptr + (offs_c // rank)[:, None] * stride_be + offs_n[None, :] * stride_bn
                    + (offs_c % rank)[:, None] * stride_br, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc, poisoned = _sanitized_dot(hg, b, acc, poisoned, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, SANITIZE)
    return acc, poisoned


@triton.jit
def _gated_expand_store(acc, poisoned, offs_t, mask_t, offs_n, mask_n, base_ptr, bias_ptr, y_ptr, scale_out,
                        stride_xt, stride_xn, stride_bias, stride_yt, stride_yn,
                        HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """y[offs_t, offs_n] = base + bias + acc * scale_out, NaN where poisoned."""
    acc = tl.where(poisoned, float("nan"), acc * scale_out)
    mask = mask_t[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_BASE:
        acc += tl.load(base_ptr + offs_t[:, None] * stride_xt + offs_n[None, :] * stride_xn,
                       mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _float_arg(hi, lo, ACC: tl.constexpr):
    """A float argument in ACC: for float64 hi + lo, the two float32 parts a launcher passes it as
    (moelora.kernels.launchers.float64_parts; ~48 bits), else hi (float32's rounding of it)."""
    if ACC == tl.float64:
        hi = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    return hi


@triton.jit
def _inverse_count(inv_t, T, ACC: tl.constexpr):
    """1 / max(T, 1) in ACC: for float64 computed here from T, else the launcher's float32 inv_t."""
    if ACC == tl.float64:
        inv_t = 1.0 / tl.maximum(tl.cast(T, tl.float64), 1.0)
    return inv_t


@triton.jit
def _store_aux_loss(loss_ptr, stats_ptr, lb, z, lb_coef, z_coef):
    """Stores loss = lb_coef * lb + z_coef * z (0-d) and stats = (lb, z) [2]."""
    tl.store(loss_ptr, lb_coef * lb + z_coef * z)
    tl.store(stats_ptr, lb)
    tl.store(stats_ptr + 1, z)


@triton.jit
def _router_aux_loss(counts_ptr, prob_sums_ptr, lse_ptr, ids_ptr, w_ptr, loss_ptr, stats_ptr, kept_ptr,
                     lb_coef, z_coef, lb_lo, z_lo, T, E, inv_t, stride_lse, stride_it, stride_ik, stride_wt,
                     stride_wk, COUNT_KEPT: tl.constexpr, TOP_K: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """loss = lb_coef * lb + z_coef * z and stats = (lb, z) with lb = E * sum_e (counts_e / T)(prob_sums_e / T)
    (Switch load balancing) and z = mean_t lse_t^2 (ST-MoE z-loss), in ACC, summed in a fixed order,
    by one program (gated_expand_kernel's first). With COUNT_KEPT the counts are those of the
    slots with weight > 0 (threshold routing), counted here from ids and w and written to
    kept_ptr [E] (int64). The coefficients come as float32 parts (lb_coef + lb_lo, z_coef + z_lo:
    _float_arg).
    """
    inv_t = _inverse_count(inv_t, T, ACC)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    if COUNT_KEPT:
        offs_k = tl.arange(0, BLOCK_K)
        kept = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t < T)[:, None] & (offs_k < TOP_K)[None, :]
            ids = tl.load(ids_ptr + offs_t[:, None] * stride_it + offs_k[None, :] * stride_ik, mask=mask, other=-1)
            w = tl.load(w_ptr + offs_t[:, None] * stride_wt + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
            bins = tl.where((w > 0) & (ids >= 0) & (ids < E), ids, BLOCK_E - 1)
            kept += tl.histogram(tl.reshape(bins.to(tl.int32), (BLOCK_T * BLOCK_K,)), BLOCK_E)
        kept = tl.where(mask_e, kept, 0)
        tl.store(kept_ptr + offs_e, kept.to(tl.int64), mask=mask_e)
        counts = kept.to(ACC)
    else:
        counts = tl.load(counts_ptr + offs_e, mask=mask_e, other=0).to(ACC)
    prob_sums = tl.load(prob_sums_ptr + offs_e, mask=mask_e, other=0.0).to(ACC)
    lb = tl.sum(counts * prob_sums, axis=0) * (E * inv_t * inv_t)
    z_acc = tl.zeros((BLOCK_T,), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        lse = tl.load(lse_ptr + offs_t * stride_lse, mask=offs_t < T, other=0.0).to(ACC)
        z_acc += lse * lse
    _store_aux_loss(loss_ptr, stats_ptr, lb, tl.sum(z_acc, axis=0) * inv_t, _float_arg(lb_coef, lb_lo, ACC),
                    _float_arg(z_coef, z_lo, ACC))


@triton.jit
def gated_expand_kernel(
    h_ptr, ids_ptr, w_ptr, b_ptr, base_ptr, bias_ptr, y_ptr,
    counts_ptr, prob_sums_ptr, lse_ptr, loss_ptr, stats_ptr, kept_ptr,
    scaling, scale_out, lb_coef, z_coef, lb_lo, z_lo,
    T, N, NB, rank, E, inv_t,
    stride_ht, stride_hr,
    stride_it, stride_ik, stride_wt, stride_wk,
    stride_be, stride_bn, stride_br,
    stride_xt, stride_xn, stride_bias, stride_yt, stride_yn, stride_lse,
    SHARED_A: tl.constexpr, HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, RANK: tl.constexpr,
    HAS_AUX: tl.constexpr, COUNT_KEPT: tl.constexpr, AUX_ACC: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_AUX_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = base + bias + Hg @ B_stack^T, one GEMM with K = E*r whose A operand, the gated
    intermediate Hg, is formed in the prologue from h and the routing (never in memory) and
    whose B operand is read from B [E, d_out, r] directly. RANK: r when it is a power of two
    (known at compile time, the compiler sees B's r contiguous columns per expert and loads
    them as vectors), else 0 (r read from ``rank``).

    Non-finite entries of an expert's B reach only the tokens that chose it. A tile is
    computed with plain dots; a tile whose result is not all finite (a non-finite B or h within
    its reach, or an overflow) is computed again, SANITIZED_SLICE rows at a time, with dots
    that take B's non-finite entries as 0 where Hg's coefficient on them is 0 and give NaN
    where it is not (moelora.kernels.matmul._sanitized_dot). Finite tiles therefore cost one
    dot per step and the registers of the plain GEMM.

    HAS_AUX: a learned router's auxiliary loss from the routing op's counts, prob_sums and lse is
    computed too, in AUX_ACC (lse's dtype), by program (0, 0) after its tile (_router_aux_loss, E
    experts, inv_t = 1 / T): the layer's forward needs no launch of its own for it.
    Grid: (cdiv(T, BLOCK_T), cdiv(N, BLOCK_N)), at least one program.
    """
    pid_t = tl.program_id(0).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < N
    rank = RANK if RANK > 0 else rank
    acc, poisoned = _gated_expand_acc(h_ptr, ids_ptr, w_ptr, b_ptr, offs_t, mask_t, offs_n, mask_n, NB, rank,
                                      scaling, stride_ht, stride_hr, stride_it, stride_ik, stride_wt, stride_wk,
                                      stride_be, stride_bn, stride_br, SHARED_A, False, DOT_DTYPE, ACC_DTYPE,
                                      INPUT_PRECISION, TOP_K, BLOCK_T, BLOCK_N, BLOCK_C)
    if _any_nonfinite(acc):
        for t0 in range(0, BLOCK_T, SANITIZED_SLICE):
            offs_s = pid_t * BLOCK_T + t0 + tl.arange(0, SANITIZED_SLICE)
            mask_s = offs_s < T
            acc_s, poisoned_s = _gated_expand_acc(
                h_ptr, ids_ptr, w_ptr, b_ptr, offs_s, mask_s, offs_n, mask_n, NB, rank, scaling,
                stride_ht, stride_hr, stride_it, stride_ik, stride_wt, stride_wk, stride_be, stride_bn, stride_br,
                SHARED_A, True, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, TOP_K, SANITIZED_SLICE, BLOCK_N,
                SANITIZED_SLICE)
            _gated_expand_store(acc_s, poisoned_s, offs_s, mask_s, offs_n, mask_n, base_ptr, bias_ptr, y_ptr,
                                scale_out, stride_xt, stride_xn, stride_bias, stride_yt, stride_yn, HAS_BASE,
                                HAS_BIAS, ACC_DTYPE)
    else:
        _gated_expand_store(acc, poisoned, offs_t, mask_t, offs_n, mask_n, base_ptr, bias_ptr, y_ptr, scale_out,
                            stride_xt, stride_xn, stride_bias, stride_yt, stride_yn, HAS_BASE, HAS_BIAS, ACC_DTYPE)
    if HAS_AUX:
        if (pid_t == 0) & (tl.program_id(1) == 0):
            _router_aux_loss(counts_ptr, prob_sums_ptr, lse_ptr, ids_ptr, w_ptr, loss_ptr, stats_ptr, kept_ptr,
                             lb_coef, z_coef, lb_lo, z_lo, T, E, inv_t, stride_lse, stride_it, stride_ik, stride_wt,
                             stride_wk, COUNT_KEPT, TOP_K, AUX_ACC, BLOCK_E, BLOCK_AUX_T, BLOCK_K)


# Router gradient modes of gate_backward_kernel (ROUTER).
NO_ROUTER = 0  # weights are inputs: write dw
SOFTMAX_RENORMALIZED = 1  # w_j = p[id_j] / sum over kept slots (softmax_topk renormalised, threshold)
SOFTMAX_PLAIN = 2  # w_j = p[id_j]
TOPK_SOFTMAX = 3  # w = softmax over the chosen logits


@triton.jit
def _router_backward(logits_ptr, counts_ptr, g_aux_ptr, g_ps_ptr, g_lse_ptr, offs_t, mask_t, ids, w, dw,
                     T, E, inv_t, lb_coef, z_coef, lb_lo, z_lo, stride_lt, stride_le, stride_gps, stride_glse,
                     ROUTER: tl.constexpr, HAS_AUX_GRAD: tl.constexpr, HAS_STAT_GRADS: tl.constexpr,
                     TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                     ACC: tl.constexpr):
    """d aux/d logits + d(loss through w)/d logits for a block of tokens ([BLOCK_T, BLOCK_E] fp32).

    g_w = dw; the aux-loss gradient g enters as d aux / d prob_sums_e = lb_coef * E * f_e / T
    and d aux / d lse_t = 2 * z_coef * lse_t / T (the coefficients as float32 parts: _float_arg).
    HAS_STAT_GRADS: gradients of the routing op's prob_sums [E] and lse [T] are given (g_ps_ptr,
    g_lse_ptr) and enter the same way. Logits
    read as -inf (NaN, -inf) get 0. A row with +inf logits has the forward's softmax limit p
    (1/n on its n +inf entries, 0 elsewhere), as the routing op's PyTorch backward.
    """
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    x = tl.load(logits_ptr + offs_t[:, None] * stride_lt + offs_e[None, :] * stride_le,
                mask=mask_t[:, None] & mask_e[None, :], other=float("-inf")).to(ACC)
    x = tl.where(x != x, float("-inf"), x)
    m = tl.max(x, axis=1)
    empty = m == float("-inf")
    infinite = m == float("inf")
    ex = tl.exp(x - tl.where(empty | infinite, 0.0, m)[:, None])
    ex = tl.where(infinite[:, None], tl.where(x == float("inf"), 1.0, 0.0), ex)
    total = tl.sum(ex, axis=1)
    p = tl.where(empty[:, None], 0.0, ex / tl.where(empty, 1.0, total)[:, None])
    offs_k = tl.arange(0, BLOCK_K)
    g_p = tl.zeros((BLOCK_T, BLOCK_E), dtype=ACC)
    g_x = tl.zeros((BLOCK_T, BLOCK_E), dtype=ACC)
    if ROUTER == 1:  # renormalised over the kept (w > 0) slots
        kept = w > 0
        dot = tl.sum(tl.where(kept, dw * w, 0.0), axis=1)
        s_kept = tl.zeros((BLOCK_T,), dtype=ACC)
        for j in tl.static_range(TOP_K):
            id_j = tl.sum(tl.where(offs_k[None, :] == j, ids, 0), axis=1)
            kept_j = tl.sum(tl.where((offs_k[None, :] == j) & kept, 1, 0), axis=1) > 0
            s_kept += tl.where(kept_j, tl.sum(tl.where(offs_e[None, :] == id_j[:, None], p, 0.0), axis=1), 0.0)
        scale = tl.where(s_kept > 0, 1.0 / tl.where(s_kept > 0, s_kept, 1.0), 0.0)
        for j in tl.static_range(TOP_K):
            id_j = tl.sum(tl.where(offs_k[None, :] == j, ids, 0), axis=1)
            kept_j = tl.sum(tl.where((offs_k[None, :] == j) & kept, 1, 0), axis=1) > 0
            gw_j = tl.sum(tl.where(offs_k[None, :] == j, dw, 0.0), axis=1)
            g_j = tl.where(kept_j, (gw_j - dot) * scale, 0.0)
            g_p += tl.where(offs_e[None, :] == id_j[:, None], g_j[:, None], 0.0)
    elif ROUTER == 2:
        for j in tl.static_range(TOP_K):
            id_j = tl.sum(tl.where(offs_k[None, :] == j, ids, 0), axis=1)
            gw_j = tl.sum(tl.where(offs_k[None, :] == j, dw, 0.0), axis=1)
            g_p += tl.where(offs_e[None, :] == id_j[:, None], gw_j[:, None], 0.0)
    else:  # TOPK_SOFTMAX
        dot = tl.sum(dw * w, axis=1)
        for j in tl.static_range(TOP_K):
            id_j = tl.sum(tl.where(offs_k[None, :] == j, ids, 0), axis=1)
            gw_j = tl.sum(tl.where(offs_k[None, :] == j, dw, 0.0), axis=1)
            w_j = tl.sum(tl.where(offs_k[None, :] == j, w, 0.0), axis=1)
            g_x += tl.where(offs_e[None, :] == id_j[:, None], (w_j * (gw_j - dot))[:, None], 0.0)
    if HAS_AUX_GRAD:
        inv_t = _inverse_count(inv_t, T, ACC)
        g = tl.load(g_aux_ptr).to(ACC)
        f = tl.load(counts_ptr + offs_e, mask=mask_e, other=0).to(ACC) * inv_t
        g_p += (g * _float_arg(lb_coef, lb_lo, ACC) * inv_t * E * f)[None, :]
        lse = tl.where(empty, 0.0, m + tl.log(tl.where(empty, 1.0, total)))
        g_x += (2.0 * g * _float_arg(z_coef, z_lo, ACC) * inv_t * lse)[:, None] * p
    if HAS_STAT_GRADS:
        g_p += tl.load(g_ps_ptr + offs_e * stride_gps, mask=mask_e, other=0.0).to(ACC)[None, :]
        g_x += tl.load(g_lse_ptr + offs_t * stride_glse, mask=mask_t, other=0.0).to(ACC)[:, None] * p
    g_x += p * (g_p - tl.sum(p * g_p, axis=1)[:, None])
    return tl.where(x == float("-inf"), 0.0, g_x)


@triton.jit
def gate_backward_kernel(
    dhg_ptr, h_ptr, ids_ptr, w_ptr, dh_ptr, dw_ptr,
    logits_ptr, counts_ptr, g_aux_ptr, dl_ptr, hg_ptr,
    scaling, scale_out, lb_coef, z_coef, lb_lo, z_lo,
    T, num_experts, rank, inv_t,
    stride_gt, stride_gc,
    stride_ht, stride_he, stride_hr,
    stride_it, stride_ik, stride_wt, stride_wk,
    stride_dht, stride_dhc, stride_dwt, stride_dwk,
    stride_lt, stride_le, stride_dlt, stride_dle, stride_hgt, stride_hgc,
    SHARED_A: tl.constexpr, ROUTER: tl.constexpr, HAS_AUX_GRAD: tl.constexpr, WRITE_HG: tl.constexpr,
    ACC: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """dh [T, R] and either dw [T, k] (ROUTER == NO_ROUTER) or d logits [T, E], all in ACC (fp32, fp64 for fp64);
    with WRITE_HG also the gated intermediate Hg [T, E*r] (without scale_out), which the
    weight-gradient kernel reads.

    Grid: (cdiv(T, BLOCK_T),).
    """
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_r[None, :] < rank)
    ids, w = _load_routing(ids_ptr, w_ptr, offs_t, mask_t, stride_it, stride_ik, stride_wt, stride_wk,
                           TOP_K, BLOCK_K, ACC)
    h_ptrs = h_ptr + offs_t[:, None] * stride_ht + offs_r[None, :] * stride_hr
    h = tl.load(h_ptrs, mask=mask, other=0.0).to(ACC)
    dw = tl.zeros((BLOCK_T, BLOCK_K), dtype=ACC)
    dh_shared = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
    for e in range(num_experts):
        chosen = ids == e
        picked = tl.max(chosen.to(tl.int32), axis=1) > 0
        gate = tl.sum(tl.where(chosen, w, 0.0), axis=1) * scaling
        col = e * rank + offs_r[None, :]
        dhg = tl.load(dhg_ptr + offs_t[:, None] * stride_gt + col * stride_gc, mask=mask, other=0.0).to(ACC)
        if not SHARED_A:
            h = tl.load(h_ptrs + e * stride_he, mask=mask, other=0.0).to(ACC)
        if WRITE_HG:
            tl.store(hg_ptr + offs_t[:, None] * stride_hgt + col * stride_hgc,
                     tl.where(picked[:, None], gate[:, None] * h, 0.0).to(hg_ptr.dtype.element_ty), mask=mask)
        p = tl.sum((dhg * scaling) * h, axis=1) * scale_out  # scaled first: dhg * h alone may overflow
        dw += tl.where(chosen, p[:, None], 0.0)
        dh_e = tl.where(picked[:, None], (gate[:, None] * dhg) * scale_out, 0.0)
        if SHARED_A:
            dh_shared += dh_e
        else:
            tl.store(dh_ptr + offs_t[:, None] * stride_dht + col * stride_dhc, dh_e, mask=mask)
    if SHARED_A:
        tl.store(dh_ptr + offs_t[:, None] * stride_dht + offs_r[None, :] * stride_dhc, dh_shared, mask=mask)
    if ROUTER == 0:
        offs_k = tl.arange(0, BLOCK_K)
        tl.store(dw_ptr + offs_t[:, None] * stride_dwt + offs_k[None, :] * stride_dwk,
                 dw.to(dw_ptr.dtype.element_ty), mask=mask_t[:, None] & (offs_k[None, :] < TOP_K))
    else:
        dl = _router_backward(logits_ptr, counts_ptr, g_aux_ptr, logits_ptr, logits_ptr, offs_t, mask_t, ids, w, dw,
                              T, num_experts, inv_t, lb_coef, z_coef, lb_lo, z_lo, stride_lt, stride_le, 0, 0,
                              ROUTER, HAS_AUX_GRAD, False, TOP_K, BLOCK_T, BLOCK_K, BLOCK_E, ACC)
        offs_e = tl.arange(0, BLOCK_E)
        tl.store(dl_ptr + offs_t[:, None] * stride_dlt + offs_e[None, :] * stride_dle, dl,
                 mask=mask_t[:, None] & (offs_e[None, :] < num_experts))


@triton.jit
def router_backward_kernel(
    ids_ptr, w_ptr, dw_ptr, logits_ptr, counts_ptr, g_aux_ptr, g_ps_ptr, g_lse_ptr, dl_ptr,
    lb_coef, z_coef, lb_lo, z_lo,
    T, num_experts, inv_t,
    stride_it, stride_ik, stride_wt, stride_wk, stride_dwt, stride_dwk,
    stride_lt, stride_le, stride_gps, stride_glse, stride_dlt, stride_dle,
    ROUTER: tl.constexpr, HAS_AUX_GRAD: tl.constexpr, HAS_STAT_GRADS: tl.constexpr, ACC: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """d logits [T, E] (computed in ACC) from the gradient of the routing weights dw [T, k] and
    the aux-loss gradient, or the gradients of the routing op's prob_sums and lse
    (_router_backward): gate_backward_kernel's router part, for the grouped regime (whose dh
    GEMM computes dw in its epilogue) and for the routing op's own backward.

    Grid: (cdiv(T, BLOCK_T),).
    """
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    ids, w = _load_routing(ids_ptr, w_ptr, offs_t, mask_t, stride_it, stride_ik, stride_wt, stride_wk,
                           TOP_K, BLOCK_K, ACC)
    offs_k = tl.arange(0, BLOCK_K)
    dw = tl.load(dw_ptr + offs_t[:, None] * stride_dwt + offs_k[None, :] * stride_dwk,
                 mask=mask_t[:, None] & (offs_k[None, :] < TOP_K), other=0.0).to(ACC)
    dl = _router_backward(logits_ptr, counts_ptr, g_aux_ptr, g_ps_ptr, g_lse_ptr, offs_t, mask_t, ids, w, dw,
                          T, num_experts, inv_t, lb_coef, z_coef, lb_lo, z_lo, stride_lt, stride_le, stride_gps,
                          stride_glse,
                          ROUTER, HAS_AUX_GRAD, HAS_STAT_GRADS, TOP_K, BLOCK_T, BLOCK_K, BLOCK_E, ACC)
    offs_e = tl.arange(0, BLOCK_E)
    tl.store(dl_ptr + offs_t[:, None] * stride_dlt + offs_e[None, :] * stride_dle, dl.to(dl_ptr.dtype.element_ty),
             mask=mask_t[:, None] & (offs_e[None, :] < num_experts))


@triton.jit
def router_aux_loss_kernel(
    ids_ptr, w_ptr, counts_ptr, prob_sums_ptr, lse_ptr, loss_ptr, stats_ptr, kept_ptr,
    lb_coef, z_coef, lb_lo, z_lo,
    T, E, inv_t, stride_lse, stride_it, stride_ik, stride_wt, stride_wk,
    COUNT_KEPT: tl.constexpr, TOP_K: tl.constexpr, AUX_ACC: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_AUX_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The router's auxiliary loss (_router_aux_loss) on its own: for the fused layer's grouped
    regime (no gated expand to compute it in) and routers with more experts than the expand
    takes (launchers.GATED_EXPAND_AUX_EXPERTS), and for the Router module's aux loss
    (moelora.ops.losses.routing_aux_losses).

    Grid: (1,).
    """
    _router_aux_loss(counts_ptr, prob_sums_ptr, lse_ptr, ids_ptr, w_ptr, loss_ptr, stats_ptr, kept_ptr,
                     lb_coef, z_coef, lb_lo, z_lo, T, E, inv_t, stride_lse, stride_it, stride_ik, stride_wt,
                     stride_wk, COUNT_KEPT, TOP_K, AUX_ACC, BLOCK_E, BLOCK_AUX_T, BLOCK_K)


@triton.jit
def _masked_softmax_rows(l_ptr, offs_t, in_t, offs_e, mask_e, stride_lt, stride_le, ACC: tl.constexpr):
    """(probabilities [BLOCK_T, BLOCK_E], logsumexp [BLOCK_T]) of the logits rows offs_t, in ACC."""
    logits = tl.load(l_ptr + offs_t[:, None] * stride_lt + offs_e[None, :] * stride_le,
                     mask=in_t[:, None] & mask_e[None, :], other=float("-inf")).to(ACC)
    row_max = tl.max(logits, axis=1)
    ex = tl.exp(logits - row_max[:, None])
    total = tl.sum(ex, axis=1)
    return ex / total[:, None], row_max + tl.log(total)


@triton.jit
def masked_router_aux_loss_kernel(
    l_ptr, ids_ptr, w_ptr, m_ptr, loss_ptr, stats_ptr, counts_ptr,
    lb_coef, z_coef, lb_lo, z_lo,
    T, E, stride_lt, stride_le, stride_it, stride_ik, stride_wt, stride_wk, stride_m,
    COUNT_KEPT: tl.constexpr, TOP_K: tl.constexpr, ACC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The router's auxiliary loss over the real tokens of the bool mask m [T] (False for
    padding): with n = max(1, sum m), counts [E] the real tokens' routed slots (those with weight
    > 0 where COUNT_KEPT: threshold routing; written to counts_ptr, int64), P the sum of their
    softmax probabilities of the logits [T, E] and their lse: stats = (lb, z) with lb = E (counts
    . P) / n^2 and z = sum lse^2 / n, loss = lb_coef lb + z_coef z (coefficients as float32 parts:
    _float_arg). In ACC (fp32, fp64 for fp64
    logits), summed in a fixed order by one program (as moelora.ops.losses.masked_aux_loss_forward).
    Padding rows are never used, whatever their values; a real row of non-finite logits gives NaN.
    BLOCK_E > E: the histogram's last bin takes the slots not counted.

    Grid: (1,).
    """
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    offs_k = tl.arange(0, BLOCK_K)
    p_acc = tl.zeros((BLOCK_E,), dtype=ACC)  # summed per block of tokens: a [BLOCK_T, BLOCK_E] one would spill
    z_acc = tl.zeros((BLOCK_T,), dtype=ACC)
    n_acc = tl.zeros((BLOCK_T,), dtype=tl.int32)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        in_t = offs_t < T
        real = tl.load(m_ptr + offs_t * stride_m, mask=in_t, other=0) != 0
        probs, lse = _masked_softmax_rows(l_ptr, offs_t, in_t, offs_e, mask_e, stride_lt, stride_le, ACC)
        p_acc += tl.sum(tl.where(real[:, None], probs, 0.0), axis=0)
        z_acc += tl.where(real, lse * lse, 0.0)
        n_acc += real.to(tl.int32)
        slots = real[:, None] & (offs_k < TOP_K)[None, :]
        ids = tl.load(ids_ptr + offs_t[:, None] * stride_it + offs_k[None, :] * stride_ik, mask=slots, other=-1)
        counted = slots & (ids >= 0) & (ids < E)
        if COUNT_KEPT:
            w = tl.load(w_ptr + offs_t[:, None] * stride_wt + offs_k[None, :] * stride_wk, mask=slots, other=0.0)
            counted = counted & (w > 0)
        bins = tl.where(counted, ids, BLOCK_E - 1)
        counts += tl.histogram(tl.reshape(bins.to(tl.int32), (BLOCK_T * BLOCK_K,)), BLOCK_E)
    counts = tl.where(mask_e, counts, 0)
    tl.store(counts_ptr + offs_e, counts.to(tl.int64), mask=mask_e)
    inv_n = 1.0 / tl.maximum(tl.sum(n_acc, axis=0), 1).to(ACC)
    lb = tl.sum(counts.to(ACC) * p_acc, axis=0) * (E * inv_n * inv_n)
    _store_aux_loss(loss_ptr, stats_ptr, lb, tl.sum(z_acc, axis=0) * inv_n, _float_arg(lb_coef, lb_lo, ACC),
                    _float_arg(z_coef, z_lo, ACC))


@triton.jit
def masked_router_aux_loss_backward_kernel(
    g_ptr, l_ptr, counts_ptr, m_ptr, dl_ptr,
    lb_coef, z_coef, lb_lo, z_lo,
    T, E, stride_lt, stride_le, stride_c, stride_m, stride_dt, stride_de,
    ADD: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Adds (ADD; else writes) the gradient of masked_router_aux_loss_kernel's loss, given its
    gradient g (0-d), to the logits' gradient dl [T, E] in place: for a real token t (0 for padding),
    dl[t, j] += g / n p_tj (c'_j - p_t . c' + 2 z_coef lse_t), c' = lb_coef E counts / n (as
    moelora.ops.losses.masked_aux_loss_backward; the coefficients as float32 parts: _float_arg). Each
    program counts n over the whole mask (BLOCK_N tokens at a time), then takes BLOCK_T tokens.

    Grid: (cdiv(T, BLOCK_T),).
    """
    pid = tl.program_id(0)
    n_acc = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for t0 in range(0, T, BLOCK_N):
        offs_n = t0 + tl.arange(0, BLOCK_N)
        n_acc += (tl.load(m_ptr + offs_n * stride_m, mask=offs_n < T, other=0) != 0).to(tl.int32)
    inv_n = 1.0 / tl.maximum(tl.sum(n_acc, axis=0), 1).to(ACC)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    lb_coef = _float_arg(lb_coef, lb_lo, ACC)
    z_coef = _float_arg(z_coef, z_lo, ACC)
    scaled = tl.load(counts_ptr + offs_e * stride_c, mask=mask_e, other=0).to(ACC) * (lb_coef * E * inv_n)
    offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = offs_t < T
    real = tl.load(m_ptr + offs_t * stride_m, mask=in_t, other=0) != 0
    probs, lse = _masked_softmax_rows(l_ptr, offs_t, in_t, offs_e, mask_e, stride_lt, stride_le, ACC)
    per_token = (2 * z_coef) * lse - tl.sum(probs * scaled[None, :], axis=1)
    g = tl.load(g_ptr).to(ACC) * inv_n
    grad = tl.where(real[:, None] & mask_e[None, :], probs * (scaled[None, :] + per_token[:, None]) * g, 0.0)
    dl_ptrs = dl_ptr + offs_t[:, None] * stride_dt + offs_e[None, :] * stride_de
    tile = in_t[:, None] & mask_e[None, :]
    if ADD:
        grad += tl.load(dl_ptrs, mask=tile, other=0.0).to(ACC)
    tl.store(dl_ptrs, grad.to(dl_ptr.dtype.element_ty), mask=tile)


@triton.jit
def router_aux_loss_backward_kernel(
    g_ptr, counts_ptr, lse_ptr, g_prob_sums_ptr, g_lse_ptr,
    lb_scale, z_scale, lb_scale_lo, z_scale_lo,
    E, T, stride_c, stride_l,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """The gradients of router_aux_loss_kernel's loss given its gradient g (0-d): d prob_sums[e] =
    lb_scale * g * counts[e] and d lse[t] = z_scale * g * lse[t] (lb_scale = lb_coef E / T^2,
    z_scale = 2 z_coef / T, as float32 parts: _float_arg), computed and written in ACC (lse's dtype:
    fp32, or fp64 for fp64 logits). Programs below cdiv(E, BLOCK) write BLOCK experts, the others BLOCK tokens.
    Grid: (cdiv(E, BLOCK) + cdiv(T, BLOCK),)."""
    pid = tl.program_id(0)
    blocks_e = tl.cdiv(E, BLOCK)
    g = tl.load(g_ptr).to(ACC)
    lb_scale = _float_arg(lb_scale, lb_scale_lo, ACC)
    z_scale = _float_arg(z_scale, z_scale_lo, ACC)
    if pid < blocks_e:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < E
        c = tl.load(counts_ptr + offs * stride_c, mask=mask, other=0).to(ACC)
        tl.store(g_prob_sums_ptr + offs, (lb_scale * g) * c, mask=mask)
    else:
        offs = (pid - blocks_e).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < T
        lse = tl.load(lse_ptr + offs * stride_l, mask=mask, other=0.0)
        tl.store(g_lse_ptr + offs, (z_scale * g) * lse.to(ACC), mask=mask)


@triton.jit
def _store_lora_b(ptr, offs_n, offs_c, mask, rank, stride_e, stride_n, stride_i, acc):
    """dB_stack[n, e*r + i] (acc, [BLOCK_N, BLOCK_C]) into dB[e, n, i]."""
    tl.store(ptr + (offs_c // rank)[None, :] * stride_e + offs_n[:, None] * stride_n
             + (offs_c % rank)[None, :] * stride_i, acc.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_lora_a(a_ptr, r_ptr, offs_k, offs_c, mask, R, stride_ar, stride_ak, stride_re, stride_rk, acc,
                  HAS_ROUTER: tl.constexpr):
    """[dA_rows | dW_router]^T (acc, [BLOCK_K, BLOCK_C]): column c < R into dA_rows[c, k], else
    dW_router[c - R, k]."""
    tl.store(a_ptr + offs_c[None, :] * stride_ar + offs_k[:, None] * stride_ak, acc.to(a_ptr.dtype.element_ty),
             mask=mask & (offs_c[None, :] < R))
    if HAS_ROUTER:
        c_r = tl.where(offs_c >= R, offs_c - R, 0)
        tl.store(r_ptr + c_r[None, :] * stride_re + offs_k[:, None] * stride_rk, acc.to(r_ptr.dtype.element_ty),
                 mask=mask & (offs_c[None, :] >= R))


@triton.jit
def _weight_grad_b(dy_ptr, hg_ptr, db_ptr, part_ptr, tile, split, t_lo, t_hi, d_out, NB, rank, scale_out, tiles_b_c,
                   stride_yt, stride_yn, stride_hgt, stride_hgc, stride_be, stride_bn, stride_bi,
                   SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CB: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """Job B of lora_weight_grad_kernel: one [BLOCK_M, BLOCK_CB] tile of dB_stack = dy^T Hg over [t_lo, t_hi)."""
    offs_m = (tile // tiles_b_c).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = (tile % tiles_b_c) * BLOCK_CB + tl.arange(0, BLOCK_CB)
    mask_m = offs_m < d_out
    mask_c = offs_c < NB
    acc = tl.zeros((BLOCK_M, BLOCK_CB), dtype=ACC_DTYPE)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_hi
        dyt = tl.load(dy_ptr + offs_t[None, :] * stride_yt + offs_m[:, None] * stride_yn,
                      mask=mask_m[:, None] & mask_t[None, :], other=0.0)
        hg = tl.load(hg_ptr + offs_t[:, None] * stride_hgt + offs_c[None, :] * stride_hgc,
                     mask=mask_t[:, None] & mask_c[None, :], other=0.0)
        acc += tl.dot(dyt.to(DOT_DTYPE), hg.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    acc = acc * scale_out
    mask = mask_m[:, None] & mask_c[None, :]
    if SPLIT:
        tl.store(part_ptr + (split * d_out + offs_m[:, None]) * NB + offs_c[None, :], acc, mask=mask)
    else:
        _store_lora_b(db_ptr, offs_m, offs_c, mask, rank, stride_be, stride_bn, stride_bi, acc)


@triton.jit
def _weight_grad_a(x_ptr, dh_ptr, dl_ptr, da_ptr, dr_ptr, part_ptr, m_ptr, j_ptr, mask_scale, tile_a, split, t_lo,
                   t_hi, d_in, R, E, tiles_a_c, part_a_offset, stride_xt, stride_xk, stride_dht, stride_dhr,
                   stride_dlt, stride_dle, stride_ar, stride_ak, stride_re, stride_rk, stride_mt, stride_mk,
                   stride_jt, stride_jk,
                   HAS_ROUTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_JITTER: tl.constexpr, SPLIT: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_CA: tl.constexpr, BLOCK_T: tl.constexpr):
    """Job A of lora_weight_grad_kernel: one [BLOCK_M, BLOCK_CA] tile of x^T [dh | dlogits] over [t_lo, t_hi);
    HAS_MASK: dh's columns take mask_scale * (x (.) keep) instead of x, HAS_JITTER: dlogits' take
    x (.) J (two products per step with either)."""
    offs_m = (tile_a // tiles_a_c).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = (tile_a % tiles_a_c) * BLOCK_CA + tl.arange(0, BLOCK_CA)
    mask_m = offs_m < d_in
    mask_c = offs_c < R + E
    acc = tl.zeros((BLOCK_M, BLOCK_CA), dtype=ACC_DTYPE)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_hi
        xt = tl.load(x_ptr + offs_t[None, :] * stride_xt + offs_m[:, None] * stride_xk,
                     mask=mask_m[:, None] & mask_t[None, :], other=0.0)
        d = tl.load(dh_ptr + offs_t[:, None] * stride_dht + offs_c[None, :] * stride_dhr,
                    mask=mask_t[:, None] & (offs_c[None, :] < R), other=0.0)
        if HAS_MASK or HAS_JITTER:  # dA reads the dropped-out x, dW_router the jittered x
            xa = xt
            if HAS_MASK:
                keep = tl.load(m_ptr + offs_t[None, :] * stride_mt + offs_m[:, None] * stride_mk,
                               mask=mask_m[:, None] & mask_t[None, :], other=0)
                xa = tl.where(keep != 0, xt, 0.0)
                d = d.to(ACC_DTYPE) * mask_scale
            acc += tl.dot(xa.to(DOT_DTYPE), d.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            d = tl.zeros((BLOCK_T, BLOCK_CA), dtype=ACC_DTYPE)
        if HAS_ROUTER:
            c_r = tl.where(offs_c >= R, offs_c - R, 0)
            d += tl.load(dl_ptr + offs_t[:, None] * stride_dlt + c_r[None, :] * stride_dle,
                         mask=mask_t[:, None] & (offs_c[None, :] >= R) & mask_c[None, :], other=0.0)
            if HAS_JITTER:
                jit = tl.load(j_ptr + offs_t[None, :] * stride_jt + offs_m[:, None] * stride_jk,
                              mask=mask_m[:, None] & mask_t[None, :], other=0.0)
                xt = xt.to(ACC_DTYPE) * jit.to(ACC_DTYPE)
        if HAS_ROUTER or not (HAS_MASK or HAS_JITTER):
            acc += tl.dot(xt.to(DOT_DTYPE), d.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    mask = mask_m[:, None] & mask_c[None, :]
    if SPLIT:
        tl.store(part_ptr + part_a_offset + (split * (R + E) + offs_c[None, :]) * d_in + offs_m[:, None], acc,
                 mask=mask)
    else:
        _store_lora_a(da_ptr, dr_ptr, offs_m, offs_c, mask, R, stride_ar, stride_ak, stride_re, stride_rk, acc,
                      HAS_ROUTER)


@triton.jit
def lora_weight_grad_kernel(
    dy_ptr, x_ptr, hg_ptr, dh_ptr, dl_ptr,
    db_ptr, da_ptr, dr_ptr, part_ptr, m_ptr, j_ptr,
    scale_out, mask_scale,
    T, d_out, d_in, R, E, NB, rank, tiles_b, tiles_b_c, tiles_a_c, t_per_split, part_a_offset,
    stride_yt, stride_yn, stride_xt, stride_xk, stride_hgt, stride_hgc,
    stride_dht, stride_dhr, stride_dlt, stride_dle,
    stride_be, stride_bn, stride_bi, stride_ar, stride_ak, stride_re, stride_rk, stride_mt, stride_mk,
    stride_jt, stride_jk,
    HAS_ROUTER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_JITTER: tl.constexpr, SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CB: tl.constexpr, BLOCK_CA: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """All weight gradients of the dense regime in one launch: two jobs reducing over T.

    job B: dB_stack [d_out, NB = E*r] = dy^T Hg (Hg as gate_backward_kernel wrote it), written
           as dB [E, d_out, r];
    job A: [dA_rows | dW_router]^T [d_in, R + E] = x^T [dh | dlogits], column c < R written
           into dA_rows [R, d_in], c >= R into dW_router [E, d_in] (E = 0 without a router);
           HAS_MASK (LoRA dropout): dA_rows reads mask_scale * (x (.) keep), keep [T, d_in] bool;
           HAS_JITTER (router jitter): dW_router reads x (.) J, J [T, d_in] (j_ptr).
    Program p works on split p // tiles of T (t_per_split tokens each) and tile p % tiles:
    tiles_b tiles of job B, then those of job A (tiles = tiles_b + tiles_a). Without SPLIT the
    results are written in place; with SPLIT each split writes ACC_DTYPE partials (job B at
    part_ptr [S, d_out, NB], job A at part_ptr + part_a_offset [S, R + E, d_in]) that
    lora_weight_grad_reduce_kernel sums in split order. Grid: (tiles * num_splits,).
    """
    pid = tl.program_id(0)
    tiles = tiles_b + tl.cdiv(d_in, BLOCK_M) * tiles_a_c
    split = pid // tiles
    tile = pid % tiles
    t_lo = split.to(tl.int64) * t_per_split
    t_hi = tl.minimum(t_lo + t_per_split, T)
    if tile < tiles_b:
        _weight_grad_b(dy_ptr, hg_ptr, db_ptr, part_ptr, tile, split, t_lo, t_hi, d_out, NB, rank, scale_out,
                       tiles_b_c, stride_yt, stride_yn, stride_hgt, stride_hgc, stride_be, stride_bn, stride_bi,
                       SPLIT, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_CB, BLOCK_T)
    else:
        _weight_grad_a(x_ptr, dh_ptr, dl_ptr, da_ptr, dr_ptr, part_ptr, m_ptr, j_ptr, mask_scale, tile - tiles_b,
                       split, t_lo, t_hi, d_in, R, E, tiles_a_c, part_a_offset, stride_xt, stride_xk, stride_dht,
                       stride_dhr, stride_dlt, stride_dle, stride_ar, stride_ak, stride_re, stride_rk, stride_mt,
                       stride_mk, stride_jt, stride_jk, HAS_ROUTER, HAS_MASK, HAS_JITTER, SPLIT, DOT_DTYPE, ACC_DTYPE,
                       INPUT_PRECISION, BLOCK_M, BLOCK_CA, BLOCK_T)


@triton.jit
def lora_weight_grad_reduce_kernel(
    part_ptr, db_ptr, da_ptr, dr_ptr,
    d_out, d_in, R, E, NB, rank, num_splits, blocks_b, part_a_offset,
    stride_be, stride_bn, stride_bi, stride_ar, stride_ak, stride_re, stride_rk,
    HAS_ROUTER: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sums the split partials of lora_weight_grad_kernel in split order and writes dB, dA_rows
    and dW_router. Program p < blocks_b: BLOCK entries of job B (flat over [d_out, NB]); the
    others: BLOCK entries of job A (flat over [R + E, d_in]). Grid: (blocks_b + blocks_a,).
    """
    pid = tl.program_id(0)
    if pid < blocks_b:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        size = d_out * NB
        mask = offs < size
        acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
        for s in range(num_splits):
            acc += tl.load(part_ptr + s * size + offs, mask=mask, other=0.0)
        n = offs // NB
        c = offs % NB
        tl.store(db_ptr + (c // rank) * stride_be + n * stride_bn + (c % rank) * stride_bi,
                 acc.to(db_ptr.dtype.element_ty), mask=mask)
    else:
        offs = (pid - blocks_b).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        size = (R + E) * d_in
        mask = offs < size
        acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
        for s in range(num_splits):
            acc += tl.load(part_ptr + part_a_offset + s * size + offs, mask=mask, other=0.0)
        c = offs // d_in
        k = offs % d_in
        tl.store(da_ptr + c * stride_ar + k * stride_ak, acc.to(da_ptr.dtype.element_ty), mask=mask & (c < R))
        if HAS_ROUTER:
            c_r = tl.where(c >= R, c - R, 0)
            tl.store(dr_ptr + c_r * stride_re + k * stride_rk, acc.to(dr_ptr.dtype.element_ty),
                     mask=mask & (c >= R))


@triton.jit
def threshold_weights_kernel(top_p_ptr, noise_ptr, num_steps_ptr, w_ptr, eps_start, eps_end, T, ramp_steps,
                             stride_pt, stride_pk, stride_nt, stride_nk, stride_wt, stride_wk,
                             HAS_NOISE: tl.constexpr, HAS_RAMP: tl.constexpr, TOP_K: tl.constexpr,
                             ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """ST-MoE threshold routing's kept weights from the top-n probabilities (best first):
    p_hat = top_p / sum(top_p); the best slot always kept, another iff noise < p_hat / eps
    (training draws, HAS_NOISE) or p_hat >= eps (eval); every slot while eps <= 0; kept
    probabilities renormalised, dropped slots 0. eps = eps_start + (eps_end - eps_start) *
    num_steps / ramp_steps with num_steps read on the device (HAS_RAMP), eps_end itself from
    num_steps = ramp_steps on (as moelora.ops.routing_modes.scheduled_eps); eps_end without a ramp.
    Computed in ACC (top_p's accumulator dtype: fp32, fp64 for fp64 logits). Grid: (cdiv(T, BLOCK_T),).
    """
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_t < T)[:, None] & (offs_k < TOP_K)[None, :]
    p = tl.load(top_p_ptr + offs_t[:, None] * stride_pt + offs_k[None, :] * stride_pk, mask=mask,
                other=0.0).to(ACC)
    if HAS_RAMP:
        steps = tl.load(num_steps_ptr)
        ramped = eps_start + (eps_end - eps_start) * (steps.to(ACC) / ramp_steps)
        eps = tl.where(steps >= ramp_steps, eps_end + tl.zeros((), dtype=ACC), ramped)
    else:
        eps = eps_end + tl.zeros((), dtype=ACC)
    total = tl.sum(p, axis=1)
    p_hat = p / tl.maximum(total, 1.17549435e-38)[:, None]
    if HAS_NOISE:
        u = tl.load(noise_ptr + offs_t[:, None] * stride_nt + offs_k[None, :] * stride_nk, mask=mask, other=2.0)
        keep = u < tl.minimum(p_hat / eps, 1.0)
    else:
        keep = p_hat >= eps
    eps_tile = tl.zeros((BLOCK_T, BLOCK_K), dtype=ACC) + eps
    keep = tl.where((offs_k[None, :] == 0) | (eps_tile <= 0), True, keep)
    kept = tl.where(keep & mask, p, 0.0)
    w = kept / tl.maximum(tl.sum(kept, axis=1), 1.17549435e-38)[:, None]
    tl.store(w_ptr + offs_t[:, None] * stride_wt + offs_k[None, :] * stride_wk, w.to(w_ptr.dtype.element_ty),
             mask=mask)
