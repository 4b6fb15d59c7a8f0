"""``moelora.moe_lora``, the MoE-LoRA operator: its entry, backend choice and both backends.

    y[t] = base[t] + s * sum_j w[t,j] * B[e[t,j]] @ (A[e[t,j] or shared] @ x[t])

Backends: ``triton`` (fused kernels, forward and backward; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``) and ``torch`` (vectorised PyTorch, differentiated by autograd: the CPU
default and, in float64, the reference the kernels are tested against). ``auto`` picks triton
where it can run, torch elsewhere. Arguments are checked once (moelora.ops.validation).

PyTorch backend (:func:`moe_lora_torch_impl`): the dense gated expand, or where no gradient is
needed and the tokens are few against the experts (decoding) the chosen experts' matrices
gathered (:func:`torch_form`). The sum runs over the chosen experts only: experts no slot of a
token chose contribute nothing to it, whatever their weights hold (NaN, Inf).

Triton backend: two regimes compute the same function:

- dense (small E*r): h = x A^T once; y = base + Hg B_stack^T with the gated
  intermediate Hg = s * G (.) h (all E*r columns) formed in the GEMM's prologue, never
  in memory (moelora/kernels/dense.py). Backward: dHg = dy B_stack, then dh, dw from the
  gating kernel, dB_stack = dy^T Hg and dA = dh^T x in one kernel, dx = dh A. Kernels per
  call: 2 forward, 4 backward (5 when T is split over the device).
- grouped (large E*r): pairs sorted by expert into padded row space (moelora.ops.routing's
  dispatch metadata, i.e. the moelora._C kernels when built); grouped GEMMs gather rows
  in the prologue and apply the gate in the epilogue, and a fixed-order per-token sum
  combines the rows (no atomics). Where ROWS_ENGINES picks it (sm90, bf16), the forward's
  rows run on torch's grouped_mm instead, h gathered into row space first and the gates
  applied by the combine. Backward: dh rows = s w dy B_e with dw in the same
  GEMM's epilogue, dB by a fixed-order grouped reduction. Per-expert A: h rows = x[t] A_e^T.

Saved for backward: x, the weights, the routing and h (T x r; T x E*r for a dense per-expert A;
R x r, the padded row space, for a grouped per-expert A), and in the grouped regime the pairs'
layout (moelora.ops.routing.layout_tensors: O(T*k) ints; the backward does not sort again).
Every step is deterministic. Under
torch.compile the custom ops ``moelora::moe_lora_forward`` / ``_backward`` are traced; in eager
mode ``_EagerMoELoRA`` runs the same forward and backward without the custom-op dispatch.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from moelora.kernels import launchers
from moelora.kernels.launchers import accumulator_dtype
from moelora.ops.grouped_linear import (group_ends, grouped_mm_layout_ok, layout_block, native_major, rows_linear,
                                        rows_weight_grad)
from moelora.ops.routing import (MAX_EXPERTS, dispatch_rows, expert_layout, fake_layout_tensors, layout_from_tensors,
                                 layout_tensors)
from moelora.ops.routing_torch import padded_length
from moelora.ops.validation import MoELoRAArgs, as_2d, check_moe_lora_args, refuse_double_backward
from moelora.ops.backend import autocast_dtype, autocast_input, check_triton_op_device, resolve_backend
from moelora.ops.registration import EagerFunction, apply_eager, custom_op, distinct_inputs, forward_ad_active


REGIMES = ("auto", "dense", "grouped")


def moe_lora(x, lora_a, lora_b, topk_ids, topk_weights, *, scaling: float = 1.0,
             base_out: Optional[torch.Tensor] = None, backend: Optional[str] = None,
             regime: str = "auto") -> torch.Tensor:
    """Mixture-of-experts LoRA: ``base_out + scaling * sum_j w[t,j] * B[e] @ (A @ x[t])``.

    Args:
        x: [..., d_in] activations.
        lora_a: [r, d_in] shared down-projection (MoSLD) or [E, r, d_in] per expert.
        lora_b: [E, d_out, r] per-expert up-projections (nn.Linear layout).
        topk_ids: [..., k] int32/int64 expert ids in [0, E), matching x's leading shape
            (or flattened to [T, k]).
        topk_weights: [..., k] gate weights, same shape as topk_ids.
        scaling: the LoRA scale s (lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA).
        base_out: optional [..., d_out] tensor the delta is added to (the frozen layer's
            output; any strides, x itself too), read, never written: the sum is a new tensor;
            without it the delta alone is returned.
        backend: "auto" (default: see the module docstring), "triton" or "torch".
        regime: triton only: "dense" (gated expand over all E*r columns), "grouped"
            (expert-sorted grouped GEMM, at most MAX_EXPERTS = 4096 experts) or "auto"
            (chosen from the shape).

    Returns:
        [..., d_out] tensor in x's dtype (autocast's under torch.autocast), differentiable
        w.r.t. x, lora_a, lora_b, topk_weights and base_out.
    """
    return _moe_lora(x, lora_a, lora_b, topk_ids, topk_weights, scaling, base_out, backend, regime, None)


def routed_moe_lora(x, lora_a, lora_b, topk_ids, topk_weights, *, scaling: float, ids_in_range: bool,
                    base_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`moe_lora` on routing that moelora made, for the layers' composed paths: a learned
    router's (ids in [0, E) by construction, ``ids_in_range`` True) or the layers' static routing
    (task ids, checked where the routing is built while the syncing checks run). No check reads
    the routing on the host (a device sync per call), as on the fused layer path; the shapes and
    dtypes are checked. ``ids_in_range``: whether the ids are known to lie in [0, E)."""
    return _moe_lora(x, lora_a, lora_b, topk_ids, topk_weights, scaling, base_out, None, "auto", ids_in_range)


def _moe_lora(x, lora_a, lora_b, topk_ids, topk_weights, scaling, base_out, backend, regime,
              ids_in_range: Optional[bool]) -> torch.Tensor:
    """moe_lora; ``ids_in_range`` None: the syncing checks of the routing run (see check_moe_lora_args)."""
    cast = autocast_dtype(x)
    if cast is not None:  # torch.autocast: x, A, B and base_out in its dtype, as a matmul's; the op runs without it
        x, lora_a, lora_b, base_out = (autocast_input(t, cast) for t in (x, lora_a, lora_b, base_out))
        with torch.autocast(x.device.type, enabled=False):
            return _moe_lora(x, lora_a, lora_b, topk_ids, topk_weights, scaling, base_out, backend, regime,
                             ids_in_range)
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    args = check_moe_lora_args(x, lora_a, lora_b, topk_ids, topk_weights, scaling, base_out, ids_in_range)
    if regime == "grouped" and args.lora_b.shape[0] > MAX_EXPERTS:
        raise ValueError(f"regime='grouped' sorts the pairs by expert, for at most {MAX_EXPERTS} experts: "
                         f"lora_b.shape[0] is {args.lora_b.shape[0]} (regime='dense' takes any number)")
    # No kernel runs on zero tokens: the torch path returns the empty result with its autograd.
    if resolve_backend(backend, args.x.device) == "torch" or args.num_tokens == 0:
        return moe_lora_torch_impl(args).reshape(args.out_shape)
    return moe_lora_triton(args, regime)


# ------------------------------------------------------------------------------ PyTorch backend
# Scalings outside [2^-64, 2^64] are applied in float64: fp32 would overflow (or flush)
# s * w * h although s * w * B @ h is representable (e.g. s = 1e39 with a tiny B).
SCALING_RANGE_FP32 = (2.0**-64, 2.0**64)


def compute_dtype(dtype: torch.dtype, scaling: float) -> torch.dtype:
    """The dtype the pure-PyTorch paths compute in: fp32 for half inputs, float64 when the
    scaling lies outside SCALING_RANGE_FP32, else the input dtype."""
    lo, hi = SCALING_RANGE_FP32
    if scaling != 0 and not lo <= abs(scaling) <= hi:
        return torch.float64
    return accumulator_dtype(dtype)


def dense_gates(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                dtype: torch.dtype, with_chosen: bool = False):
    """G[t, e] = sum of the gate weights of the slots of token t that chose e; [T, E]; with
    ``with_chosen`` also the bool [T, E] "a slot of t chose e" (whatever its weight).

    Ids outside [0, E) match no expert and contribute nothing. Built from the [T, k, E] matches
    of the ids against 0..E-1 (a select and a sum over the slots, not scatter_add), so it is
    deterministic on every device.
    """
    hit = topk_ids[..., None] == torch.arange(num_experts, device=topk_ids.device)  # [T, k, E]
    gates = torch.where(hit, topk_weights.to(dtype)[..., None], 0).sum(-2)
    return (gates, hit.any(-2)) if with_chosen else gates


def _finite_part(t):
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


# Forward: the tensor with NaN/Inf replaced by 0. Backward: the gradient unchanged (the dense
# formula's weight gradients do not depend on the weights' values). Elementwise: vmap batches it.
_FinitePart = EagerFunction("_FinitePart", _finite_part, lambda ctx, inputs, output: None, lambda ctx, grad: grad,
                            vmappable=True)


def finite_part(t: torch.Tensor) -> torch.Tensor:
    """``t`` with NaN/Inf replaced by 0 (:data:`_FinitePart`); in forward-mode AD (``torch.func.jvp`` /
    ``jacfwd``, ``torch.autograd.forward_ad``) nan_to_num itself, which carries the tangent (0 at the
    non-finite entries, whose outputs are NaN): the Function has no jvp, which dynamo cannot trace."""
    if forward_ad_active():
        return _finite_part(t)
    return _FinitePart.apply(t)


# The PyTorch backend's gathered form (:func:`_gathered_delta`) runs where no gradient is needed, the ids are known
# to lie in [0, E) and there are at most GATHER_MAX_PAIRS_PER_EXPERT (token, slot) pairs per expert: it copies
# the T*k chosen B (and per-expert A) matrices, where the dense form contracts over all E and passes over all
# of B; the dense form from there on. Measured on the CPU (one thread, inference_mode, moe_lora_torch_impl,
# E 8 or 16, k 2 or 4, r 8 or 16): the gathered form is 1.5-3x faster at 1 and 2 pairs per expert, even with
# the dense form at 4 (d 512, 1024) and slower beyond (d 1024, 8 pairs: 1.15 against 0.48 ms).
GATHER_MAX_PAIRS_PER_EXPERT = 2


def torch_form(args: MoELoRAArgs) -> str:
    """"gathered" or "dense": the formulation :func:`moe_lora_torch_impl` runs for ``args``. A symbolic pair
    count (torch.compile with dynamic shapes, torch.export) takes the dense form, which holds for every count:
    a guard on the count would recompile, or fail an exported program's inputs on the other side of it."""
    if args.ids_in_range and statically_known_true(args.topk_ids.numel() <= GATHER_MAX_PAIRS_PER_EXPERT
                                                   * args.num_experts):
        grads = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (args.x, args.lora_a, args.lora_b, args.topk_weights,
                                                        args.base_out))
        if not grads:
            return "gathered"
    return "dense"


def moe_lora_torch_impl(args: MoELoRAArgs) -> torch.Tensor:
    """The PyTorch backend on validated arguments; returns [T, d_out]: :func:`_gathered_delta`
    where :func:`torch_form` picks it (inference at a few tokens), else the vectorised dense gated
    expand (:func:`_dense_delta`, differentiated by autograd). Both compute the sum over the chosen
    experts only: experts no slot of a token chose contribute nothing to it, whatever their
    weights hold, and a non-finite weight of a chosen expert makes NaN of the outputs it reaches
    (per-expert A: the whole token; B: the output features of its non-finite rows)."""
    form = torch_form(args)
    args = args.flattened()
    acc = compute_dtype(args.x.dtype, args.scaling)
    delta = (_gathered_delta if form == "gathered" else _dense_delta)(args, acc)
    if args.base_out is not None:
        delta = delta + args.base_out.to(acc)
    return delta.to(args.x.dtype)


def nonfinite_marks(t: torch.Tensor, dims) -> torch.Tensor:
    """0 where the slice of ``t`` over ``dims`` is finite, NaN where it holds a NaN or Inf: the sum
    of t * 0 (elementwise, so the IEEE rules hold: a matrix product may skip zeros), detached. Two
    float kernels, cheaper than isfinite's bool reduction on the CPU."""
    return (t.detach() * 0).sum(dims)


def _dense_delta(args: MoELoRAArgs, acc: torch.dtype) -> torch.Tensor:
    """The dense gated expand [T, d_out] in ``acc``.

    The dense form multiplies every expert's B (and per-expert A) by every token's gate, 0
    for the experts the token did not choose, and 0 * NaN is NaN: so the contraction runs on
    the finite part of the weights, and the outputs that a non-finite weight of a chosen
    expert reaches are set to NaN afterwards. Gradients treat the non-finite entries as 0.
    """
    x, lora_a, lora_b = args.x, args.lora_a, args.lora_b
    num_experts, d_out, rank = lora_b.shape
    gates, chosen = dense_gates(args.topk_ids, args.topk_weights, num_experts, acc, with_chosen=True)
    gates = gates * args.scaling
    xa = x.to(acc)
    marks = nonfinite_marks(lora_b, 2)  # [E, d_out]: NaN at the rows of B with a NaN/Inf
    if args.shared_a:
        h = (xa @ lora_a.to(acc).t())[:, None, :]  # [T, 1, r]
    else:
        h = torch.einsum("td,erd->ter", xa, finite_part(lora_a.to(acc)))  # [T, E, r]
        marks = marks + nonfinite_marks(lora_a, (1, 2))[:, None]  # a per-expert A's: every row
    # Unchosen (token, expert) blocks are exact zeros, whatever x or a shared A hold.
    gated = torch.where(chosen[:, :, None], gates[:, :, None] * h, 0)
    delta = torch.einsum("ter,eor->to", gated, finite_part(lora_b.to(acc)))
    reached = chosen.to(acc) @ marks.isnan().to(acc)  # [T, d_out]: chosen experts with a non-finite weight there
    return torch.where(reached > 0, float("nan"), delta)


def _gathered_delta(args: MoELoRAArgs, acc: torch.dtype) -> torch.Tensor:
    """The delta [T, d_out] in ``acc`` from the chosen experts' matrices only (ids in [0, E); run
    where no gradient is needed, its ops differentiable all the same: forward-mode AD's tangents
    through it are exact): the T*k matrices B[e[t,j]] (and A[e[t,j]]) copied out, h[t,j] =
    A[e[t,j]] x[t] (A x[t] for a shared A), then delta[t] = sum_j B[e[t,j]] (s w[t,j] h[t,j]).
    The experts a token did not choose are never read. Each product is :func:`_ieee_matvec`: a row
    of M with a NaN/Inf gives NaN, so a chosen expert's non-finite weight makes NaN of the outputs
    it reaches (a row of B: that output feature; of A: h[t,j] at that row, and through B every
    output of the token), as the dense form's."""
    x, lora_a, lora_b, ids = args.x, args.lora_a, args.lora_b, args.topk_ids
    (T, top_k), (_, d_out, rank) = ids.shape, lora_b.shape
    pairs = ids.reshape(-1)
    xa = x.to(acc)
    if args.shared_a:
        h = (xa @ lora_a.to(acc).t())[:, None, :]  # [T, 1, r]
    else:
        a_rows = lora_a.index_select(0, pairs).to(acc).view(T, top_k, rank, x.shape[1])
        h = _ieee_matvec(a_rows, xa[:, None, None, :])  # [T, k, r]
    hw = (h * (args.topk_weights.to(acc) * args.scaling)[:, :, None]).view(T * top_k, 1, rank)
    b_rows = lora_b.index_select(0, pairs).to(acc)  # [T*k, d_out, r]
    return _ieee_matvec(b_rows, hw).view(T, top_k, d_out).sum(1)


def _ieee_matvec(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum over the last dim of m (.) v + m * 0 (v broadcast against m): a matrix-vector product whose
    rows of m with a NaN/Inf give NaN whatever v holds, as the IEEE rules do elementwise, where a
    matrix product may skip zeros of v. Same elementwise work as a batched matrix-vector product,
    which the CPU runs slower at the gathered form's sizes."""
    return torch.addcmul(m * 0, m, v).sum(-1)


def moe_lora_torch(x, lora_a, lora_b, topk_ids, topk_weights, *, scaling=1.0, base_out=None):
    """Vectorised PyTorch MoE-LoRA (the CPU backend); same contract as ``moelora.moe_lora``."""
    args = check_moe_lora_args(x, lora_a, lora_b, topk_ids, topk_weights, scaling, base_out)
    return moe_lora_torch_impl(args).reshape(args.out_shape)


# ------------------------------------------------------------------------------ Triton backend
# Crossover of the two regimes, measured by benchmarks/tune_grouped.py: dense while
# E*r <= DENSE_MAX_WIDTH.
DENSE_MAX_WIDTH = 1024


def choose_regime(num_experts: int, rank: int) -> str:
    """"dense" or "grouped" for E experts of rank r.

    Dense: the gated expand's GEMMs are E*r wide (x and y move once; the FLOPs grow with
    E*r, for every token). Grouped: only the k selected experts compute, but each token's k
    expert rows (T*k x d_out) pass through memory twice forward and dy is gathered k times
    backward. Measured on an H200 (bf16, T 8192, d 4096, shared A of rank 16, forward and
    backward; benchmarks/results/tune-grouped-nvidia-h200-20261128T190225.json): dense is
    faster up to E*r = 1024 and grouped from 2048, at k = 2 and at k = 4 alike (dense 1.10
    against grouped 1.47 ms at E 64, k 2; 2.01 against 1.93 ms at E 128, k 2; 2.06 against
    1.49 ms at E 128, k 4), so the threshold is on E*r alone. Beyond MAX_EXPERTS experts, which
    the expert sort does not take, dense.
    """
    return "dense" if num_experts * rank <= DENSE_MAX_WIDTH or num_experts > MAX_EXPERTS else "grouped"


def lora_a_rows(lora_a: torch.Tensor) -> torch.Tensor:
    """A as a [rows, d_in] matrix: [r, d_in] shared, or the E matrices stacked [E*r, d_in]."""
    if lora_a.dim() == 2:
        return lora_a
    num_experts, rank, d_in = lora_a.shape
    return lora_a.reshape(num_experts * rank, d_in)  # not -1: d_in may be 0


def _saved_h_shape(x, lora_a, lora_b, topk_ids, grouped: bool):
    num_experts, _, rank = lora_b.shape
    if lora_a.dim() == 2:
        return (x.shape[0], rank)
    if grouped:
        return (grouped_row_count(x.shape[1], lora_a, lora_b, topk_ids.numel()), rank)
    return (x.shape[0], num_experts * rank)


def _dense_forward(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, out=None):
    """2 kernels: h = x A_rows^T (lora_down), y = base + Hg B_stack^T (gated_expand; written into
    ``out`` [T, d_out] where given)."""
    h, _ = launchers.lora_down(x, lora_a_rows(lora_a))
    y = launchers.gated_expand(h, topk_ids, topk_weights, lora_b, scaling=scaling, shared_a=lora_a.dim() == 2,
                               base=base_out, out_dtype=x.dtype, compute_dtype=x.dtype, out=out)
    return y, h


def _dense_backward(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, scaling, need_dx):
    """4 kernels (5 when the device needs split reductions): dHg = dy B_stack; dh, dw; dB and dA
    in one weight-gradient kernel; dx = dh A_rows."""
    num_experts, d_out, rank = lora_b.shape
    shared = lora_a.dim() == 2
    dhg = launchers.matmul(dy, lora_b, stacked_b=True, out_dtype=h.dtype, compute_dtype=x.dtype)
    dh, dw, hg = launchers.gate_backward(dhg, h, topk_ids, topk_weights, num_experts=num_experts, rank=rank,
                                         scaling=scaling, shared_a=shared, hg_dtype=x.dtype)
    a_rows = lora_a_rows(lora_a)
    dlora_a = torch.empty(lora_a.shape, dtype=lora_a.dtype, device=x.device)
    dlora_b = torch.empty(lora_b.shape, dtype=lora_b.dtype, device=x.device)
    launchers.lora_weight_grad(dy, x, hg, dh, None, rank=rank, scaling=scaling, dlora_b=dlora_b,
                               dlora_a=dlora_a if shared else dlora_a.view(a_rows.shape))
    dx = None
    if need_dx:
        dx = launchers.matmul(dh, a_rows, out_dtype=x.dtype, compute_dtype=x.dtype, sanitize_b=not shared)
    return dx, dlora_a, dlora_b, dw


def _grouped_block(d_in: int, lora_a, lora_b, pairs: int) -> int:
    """The segment padding of the grouped regime's layout for ``pairs`` (token, slot) pairs: the
    largest row tile of the grouped GEMMs that run over it."""
    num_experts, d_out, rank = lora_b.shape
    shapes = ((d_out, rank), (rank, d_out)) + (((rank, d_in), (d_in, rank)) if lora_a.dim() == 3 else ())
    return layout_block(shapes, pairs, num_experts)


def grouped_row_count(d_in: int, lora_a, lora_b, pairs: int) -> int:
    """Rows of the grouped regime's padded row space for ``pairs`` (token, slot) pairs."""
    return padded_length(pairs, lora_b.shape[0], _grouped_block(d_in, lora_a, lora_b, pairs))


def grouped_layout(x, lora_a, lora_b, topk_ids):
    """The grouped regime's dispatch metadata (moelora.ops.routing.expert_layout) of ``topk_ids``."""
    return expert_layout(topk_ids, lora_b.shape[0], _grouped_block(x.shape[1], lora_a, lora_b, topk_ids.numel()))


def saved_layout(x, lora_a, lora_b, topk_ids, layout: List[torch.Tensor]):
    """The grouped regime's layout from the forward's ``layout_tensors`` (no second sort)."""
    block = _grouped_block(x.shape[1], lora_a, lora_b, topk_ids.numel())
    return layout_from_tensors(layout, lora_b.shape[0], topk_ids.shape[1], block)


def fake_grouped_layout(x, lora_a, lora_b, top_k: int) -> List[torch.Tensor]:
    """Empty tensors shaped as the grouped regime's saved layout of x's tokens with ``top_k``
    slots each (custom ops' fake kernels)."""
    T = x.shape[0]
    return fake_layout_tensors(x, T, top_k, lora_b.shape[0], _grouped_block(x.shape[1], lora_a, lora_b, T * top_k))


# Engine of the grouped regime's forward GEMM (the rows s * w * B_e h) by (major compute
# capability, launchers.grouped_shape_class of the GEMM), where torch's grouped_mm runs natively;
# the Triton grouped kernel elsewhere and for classes not listed. benchmarks/tune_grouped.py
# times both engines (grouped_mm with the gather of h included) and pastes the pick. The entry:
# H200, S3's h B^T (T 32768, d_out 4096, r 64, E 64, k 4), 0.741 ms Triton against 0.426 ms
# grouped_mm, the GEMM alone (benchmarks/results/tune-grouped-nvidia-h200-20261128T190225.json,
# a run before the gather was timed with it).
ROWS_ENGINES = {(9, "matmul:ls:many"): "grouped_mm"}


def rows_engine(x, lora_b, pairs: int, rows: int, scaling: float) -> str:
    """"grouped_mm" or "triton": the engine of the grouped forward's rows for these operands.

    grouped_mm where ROWS_ENGINES picks it for this GPU and shape, x and B are bfloat16, B's
    rows and columns 16-byte aligned, the ``rows`` of the layout fit int32 group ends, and s
    lies in SCALING_RANGE_FP32 (it scales h before h is rounded to bfloat16)."""
    major = native_major(x.device)
    if major is None or x.dtype is not torch.bfloat16 or lora_b.dtype is not torch.bfloat16 or rows >= 2 ** 31:
        return "triton"
    lo, hi = SCALING_RANGE_FP32
    if scaling != 0 and not lo <= abs(scaling) <= hi:
        return "triton"
    num_experts, d_out, rank = lora_b.shape
    if not (grouped_mm_layout_ok(lora_b.transpose(1, 2), check_start=False) and d_out % 8 == 0 and rank % 8 == 0):
        return "triton"
    shape_class = launchers.grouped_shape_class("matmul", d_out, rank, launchers.many_rows(pairs, num_experts))
    return ROWS_ENGINES.get((major, shape_class), "triton")


def grouped_rows(h, lora_b, meta, topk_weights, scaling, engine: str, out_dtype: torch.dtype, *, h_by_token: bool):
    """(rows, coef) of the grouped forward: rows [R, d_out] and the per-pair factors ``coef``
    [T, k] that combine_rows applies (None: already applied), rows * coef = s * w_p * B_e h.

    triton: one grouped GEMM, h gathered in its prologue, s * w_p in its epilogue.
    grouped_mm: s * h rounded to B's dtype (one kernel), gathered into row space for a shared
    A's h [T, r] (one copy), the int32 group ends (group_ends: the last one extended over the
    unused tail, as moe_ffn runs grouped_mm), torch's grouped_mm; w stays for combine_rows."""
    if engine == "triton":
        rows = rows_linear(h, lora_b, meta, "triton", a_by_token=h_by_token, out_dtype=out_dtype,
                           compute_dtype=out_dtype, alpha=scaling, scale=topk_weights.reshape(-1))
        return rows, None
    hs = torch.mul(h, scaling, out=torch.empty(h.shape, dtype=lora_b.dtype, device=h.device))
    if h_by_token:
        hs = dispatch_rows(hs, meta)
    return rows_linear(hs, lora_b, meta, "grouped_mm", offs=group_ends(meta)), topk_weights


def grouped_forward(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, h=None, out=None):
    """(y, h, layout): y = base + combine of the rows s * w_p * B_e h (:func:`grouped_rows`, on
    the engine of :func:`rows_engine`); h = x A^T [T, r] (shared A) or the row-space x[t] A_e^T
    [R, r] (per-expert A), or the given ``h`` (a shared A's, computed by the caller: the fused
    layer's pass over x); ``out``: the result's tensor (base_out itself where the caller owns
    it), else a new one; ``layout``: the pairs' layout as ``layout_tensors`` (saved for the
    backward)."""
    acc = launchers.accumulator_dtype(x.dtype)
    meta = grouped_layout(x, lora_a, lora_b, topk_ids)
    shared = lora_a.dim() == 2
    if h is None and shared:
        h = launchers.matmul(x, lora_a.t(), out_dtype=acc, compute_dtype=x.dtype)
    elif h is None:
        h = rows_linear(x, lora_a, meta, "triton", a_by_token=True, out_dtype=acc, compute_dtype=x.dtype)
    engine = rows_engine(x, lora_b, topk_ids.numel(), meta.sorted_pairs_padded.numel(), scaling)
    rows, coef = grouped_rows(h, lora_b, meta, topk_weights, scaling, engine, x.dtype, h_by_token=shared)
    y = launchers.combine_rows(rows, meta, out_dtype=x.dtype, coef=coef, base=base_out, out=out)
    return y, h, layout_tensors(meta)


def grouped_output_grads(dy, h, lora_a, lora_b, meta, topk_weights, scaling, dw, compute_dtype):
    """(dh rows, dB) of the grouped regime: one gathered pass of dy for the dh rows
    s * w_p * (dy[t] B_e), with the gate gradient dw[p] = s * <dy[t] B_e, h> written into ``dw``
    [T*k] by the same GEMM's epilogue (pairs outside the layout left as they are), one for dB."""
    shared = lora_a.dim() == 2
    w = topk_weights.reshape(-1)
    dh_rows = rows_linear(dy, lora_b, meta, "triton", a_by_token=True, transposed=True, out_dtype=h.dtype,
                          compute_dtype=compute_dtype, alpha=scaling, scale=w, gate_grad=(h, shared, dw))
    dlora_b = rows_weight_grad(dy, h, meta, "triton", left_by_token=True, right_by_token=shared,
                               out_dtype=lora_b.dtype, compute_dtype=compute_dtype, alpha=scaling, scale=w)
    return dh_rows, dlora_b


def grouped_input_grads(dh_rows, x, lora_a, meta, need_dx, second=None, second_scale=None):
    """(dA, dx or None) of the grouped regime from its dh rows: dense for a shared A (the rows
    combined into dh [T, r]; dA = dh^T x, dx = dh A), per expert from the rows for a per-expert
    A. ``second`` = (a2, b2): dx also gets a2 @ b2 (the fused layer's router: dl W_router),
    times ``second_scale`` [T, d_in] elementwise where given (router jitter's factors J: the
    router read x (.) J)."""
    dtype = x.dtype
    if lora_a.dim() == 2:
        dh = launchers.combine_rows(dh_rows, meta, out_dtype=dh_rows.dtype)
        dlora_a = launchers.matmul(dh.t(), x, out_dtype=lora_a.dtype, compute_dtype=dtype, split_k=True)
        dx = (launchers.matmul(dh, lora_a, out_dtype=dtype, compute_dtype=dtype, second=second,
                               second_scale=second_scale) if need_dx else None)
        return dlora_a, dx
    dlora_a = rows_weight_grad(dh_rows, x, meta, "triton", right_by_token=True, out_dtype=lora_a.dtype,
                               compute_dtype=dtype)
    dx = None
    if need_dx:
        dx_rows = rows_linear(dh_rows, lora_a, meta, "triton", transposed=True, out_dtype=dtype, compute_dtype=dtype)
        base = launchers.matmul(*second, out_dtype=dtype, compute_dtype=dtype) if second is not None else None
        if base is not None and second_scale is not None:
            base.mul_(second_scale)
        dx = launchers.combine_rows(dx_rows, meta, out_dtype=dtype, base=base, out=base)
    return dlora_a, dx


def grouped_backward(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, layout, scaling, need_dx):
    """dx, dA, dB and dw of moe_lora's grouped regime (grouped_output_grads, grouped_input_grads)
    over the forward's ``layout``."""
    T, top_k = topk_ids.shape
    meta = saved_layout(x, lora_a, lora_b, topk_ids, layout)
    dw = torch.zeros(T * top_k, dtype=h.dtype, device=x.device)  # pairs outside the layout keep 0
    dh_rows, dlora_b = grouped_output_grads(dy, h, lora_a, lora_b, meta, topk_weights, scaling, dw, x.dtype)
    dlora_a, dx = grouped_input_grads(dh_rows, x, lora_a, meta, need_dx)
    return dx, dlora_a, dlora_b, dw.view(T, top_k)


def _forward(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, grouped, out=None) -> List[torch.Tensor]:
    """[y, h, *layout]: layout the grouped regime's layout_tensors (none in the dense regime); y
    written into ``out`` [T, d_out] where given."""
    if grouped:
        y, h, layout = grouped_forward(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, out=out)
        return [y, h, *layout]
    return list(_dense_forward(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, out))


def _backward(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, layout, scaling, grouped, need_dx):
    if grouped:
        grads = grouped_backward(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, layout, scaling, need_dx)
    else:
        grads = _dense_backward(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, scaling, need_dx)
    dx, dlora_a, dlora_b, dw = grads
    return dx, dlora_a, dlora_b, dw.to(topk_weights.dtype)


@custom_op("moe_lora_forward")
def moe_lora_forward(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor, base_out: Optional[torch.Tensor], scaling: float,
                     grouped: bool) -> List[torch.Tensor]:
    """[y [T, d_out], h, *layout]: the fused MoE-LoRA forward; h and the grouped regime's pair
    layout are what backward needs."""
    check_triton_op_device("moe_lora_forward", x.device)
    return _forward(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, grouped)


@moe_lora_forward.register_fake
def _(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, grouped):
    y = x.new_empty(x.shape[0], lora_b.shape[1])
    h = x.new_empty(_saved_h_shape(x, lora_a, lora_b, topk_ids, grouped), dtype=launchers.accumulator_dtype(x.dtype))
    return [y, h] + (fake_grouped_layout(x, lora_a, lora_b, topk_ids.shape[1]) if grouped else [])


@custom_op("moe_lora_backward")
def moe_lora_backward(dy: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      topk_ids: torch.Tensor, topk_weights: torch.Tensor, h: torch.Tensor,
                      layout: List[torch.Tensor], scaling: float, grouped: bool,
                      need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dlora_a, dlora_b, dtopk_weights); dx is an empty [0, d_in] tensor when not needed."""
    dx, dlora_a, dlora_b, dw = _backward(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, layout, scaling, grouped,
                                         need_dx)
    return (x.new_empty(0, x.shape[1]) if dx is None else dx), dlora_a, dlora_b, dw


@moe_lora_backward.register_fake
def _(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, layout, scaling, grouped, need_dx):
    dx = x.new_empty(x.shape if need_dx else (0, x.shape[1]))
    # contiguous whatever the inputs' strides, as the kernels write them (inductor asserts a fake's strides)
    return dx, *(t.new_empty(t.shape) for t in (lora_a, lora_b, topk_weights))


def _save_for_backward(ctx, inputs, saved):
    """``saved`` = [h, *layout] of _forward."""
    x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, grouped = inputs
    ctx.save_for_backward(x, lora_a, lora_b, topk_ids, topk_weights, *saved)
    ctx.scaling = scaling
    ctx.grouped = grouped
    ctx.has_base = base_out is not None


def _input_grads(ctx, dy, backward):
    """Gradients for (x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, grouped), the
    saved x, routing and dy being [T, ...] (see _EagerMoELoRA for other leading shapes)."""
    x, lora_a, lora_b, topk_ids, topk_weights, h, *layout = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, dlora_a, dlora_b, dw = backward(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, layout, ctx.scaling,
                                        ctx.grouped, need_dx)
    return (dx if need_dx else None, dlora_a, dlora_b, None, dw, dy if ctx.has_base else None, None, None)


class _TracedMoELoRA(torch.autograd.Function):
    """The custom ops' autograd under torch.compile: dynamo traces this Function (forward: the op
    moe_lora_forward; backward: moe_lora_backward) into the graph. The ops carry no autograd
    kernel of their own, whose Python would run on every call of a compiled graph (see
    moelora.ops.moe_lora_linear._TracedMoELoRALinearFn); called directly, they are not
    differentiable."""

    @staticmethod
    def forward(ctx, *inputs):
        output = moe_lora_forward(*inputs)
        ctx.mark_non_differentiable(*output[1:])
        _save_for_backward(ctx, inputs, output[1:])
        return tuple(output)

    @staticmethod
    def backward(ctx, dy, *unused):
        return _input_grads(ctx, dy, moe_lora_backward)


class _EagerMoELoRA(torch.autograd.Function):
    """The custom ops' forward and backward without the custom-op dispatch, for eager mode.

    That dispatch costs tens of microseconds of host time per call, which is most of the
    layer's time at small T; torch.compile traces the custom ops instead. Inputs of any
    leading shape are flattened here, below autograd: no view nodes in the graph. The output
    is allocated in its own shape and written through a [T, d_out] view: a view returned by an
    autograd.Function could not be modified in place (autograd refuses it), a linear layer's output can.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, grouped, out_shape):
        T, k = math.prod(out_shape[:-1]), topk_ids.shape[-1]
        inputs = (as_2d(x, T, x.shape[-1]), lora_a, lora_b, as_2d(topk_ids, T, k), as_2d(topk_weights, T, k),
                  None if base_out is None else as_2d(base_out, T, out_shape[-1]), scaling, grouped)
        out = None if len(out_shape) == 2 else x.new_empty(out_shape)
        y, *saved = _forward(*inputs, out=None if out is None else out.view(T, out_shape[-1]))
        _save_for_backward(ctx, inputs, saved)
        ctx.shapes = (x.shape, topk_weights.shape)
        return y if out is None else out

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("moe_lora")
        x_shape, w_shape = ctx.shapes
        flat = len(x_shape) == 2
        dx, dlora_a, dlora_b, _, dw, dbase, _, _ = _input_grads(ctx, dy if flat else dy.reshape(-1, dy.shape[-1]),
                                                                _backward)
        if not flat:
            dx = None if dx is None else dx.view(x_shape)
        if len(w_shape) != 2:
            dw = dw.view(w_shape)
        return dx, dlora_a, dlora_b, None, dw, None if dbase is None else dy, None, None, None


def moe_lora_triton(args: MoELoRAArgs, regime: str = "auto") -> torch.Tensor:
    """Run the Triton backend on validated arguments with T > 0; returns [..., d_out] (args.out_shape)."""
    num_experts, _, rank = args.lora_b.shape
    if regime == "auto":
        regime = choose_regime(num_experts, rank)
    grouped = regime == "grouped"
    if torch.compiler.is_compiling():
        flat = args.flattened()
        inputs = distinct_inputs(flat.x, flat.lora_a, flat.lora_b, flat.topk_ids, flat.topk_weights, flat.base_out)
        return _TracedMoELoRA.apply(*inputs, flat.scaling, grouped)[0].reshape(args.out_shape)
    return apply_eager(_EagerMoELoRA, args.x, args.lora_a, args.lora_b, args.topk_ids, args.topk_weights, args.base_out,
                       args.scaling, grouped, args.out_shape)
