"""MoE-LoRA on the Triton kernels: forward and backward compositions, registered as
``torch.library`` custom ops with fake implementations and autograd.

Two regimes compute the same function:

- dense (small E*r): h = x A^T once; y = base + Hg B_stack^T with the gated
  intermediate Hg = s * G (.) h (all E*r columns) formed in the GEMM's prologue, never
  in memory (triton_kernels/dense.py). Backward: dHg = dy B_stack, then dh, dw from the
  gating kernel, dB_stack = dy^T Hg and dA = dh^T x in one kernel, dx = dh A. Kernels per
  call: 2 forward, 4 backward (5 when T is split over the device).
- grouped (large E*r): pairs sorted by expert (moelora.routing's dispatch metadata,
  i.e. the moelora._C kernels when built), grouped GEMMs gather rows in the prologue and apply the gate in the epilogue, writing pair-major rows that a fixed-order
  per-token sum combines (no atomics). Per-expert A: h_pair = x[t] A_e^T per pair.

Saved for backward: x, the weights, the routing and h (T x r; T x E*r for a dense
per-expert A; T*k x r for a grouped per-expert A). Every step is deterministic.

Under torch.compile the custom ops are traced; in eager mode ``_EagerMoELoRA`` runs the
same forward and backward without the custom-op dispatch.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _launchers as K
from .routing import expert_layout
from ._validation import MoELoRAArgs

# Dense while the gated intermediate is at most this wide; measured crossover on GPU
# belongs in the autotune table of the benchmark issue.
DENSE_MAX_WIDTH = 512


def choose_regime(num_experts: int, rank: int) -> str:
    return "dense" if num_experts * rank <= DENSE_MAX_WIDTH else "grouped"


def _a_rows(lora_a: torch.Tensor) -> torch.Tensor:
    """A as a [rows, d_in] matrix: [r, d_in] shared, or the E matrices stacked [E*r, d_in]."""
    return lora_a if lora_a.dim() == 2 else lora_a.reshape(-1, lora_a.shape[-1])


def _saved_h_shape(x, lora_a, lora_b, topk_ids, grouped: bool):
    num_experts, _, rank = lora_b.shape
    if lora_a.dim() == 2:
        return (x.shape[0], rank)
    if grouped:
        return (topk_ids.numel(), rank)
    return (x.shape[0], num_experts * rank)


# ---------------------------------------------------------------- dense regime

def _dense_forward(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling):
    """2 kernels: h = x A_rows^T (lora_down), y = base + Hg B_stack^T (gated_expand)."""
    h, _ = K.lora_down(x, _a_rows(lora_a))
    y = K.gated_expand(h, topk_ids, topk_weights, lora_b, scaling=scaling, shared_a=lora_a.dim() == 2, base=base_out,
                       out_dtype=x.dtype, compute_dtype=x.dtype)
    return y, h


def _dense_backward(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, scaling, need_dx):
    """4 kernels (5 when the device needs split reductions): dHg = dy B_stack; dh, dw; dB and dA
    in one weight-gradient kernel; dx = dh A_rows."""
    num_experts, d_out, rank = lora_b.shape
    shared = lora_a.dim() == 2
    dhg = K.matmul(dy, lora_b, stacked_b=True, out_dtype=h.dtype, compute_dtype=x.dtype)
    dh, dw = K.gate_backward(dhg, h, topk_ids, topk_weights, num_experts=num_experts, rank=rank,
                             scaling=scaling, shared_a=shared)
    a_rows = _a_rows(lora_a)
    dlora_a = torch.empty(lora_a.shape, dtype=lora_a.dtype, device=x.device)
    dlora_b = torch.empty(lora_b.shape, dtype=lora_b.dtype, device=x.device)
    K.lora_weight_grad(dy, x, h, topk_ids, topk_weights, dh, None, rank=rank, scaling=scaling, shared_a=shared,
                       dlora_b=dlora_b, dlora_a=dlora_a.view(a_rows.shape))
    dx = K.matmul(dh, a_rows, out_dtype=x.dtype, compute_dtype=x.dtype, sanitize_b=not shared) if need_dx else None
    return dx, dlora_a, dlora_b, dw


# -------------------------------------------------------------- grouped regime

def _grouped_forward(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling):
    num_experts, d_out, rank = lora_b.shape
    top_k = topk_ids.shape[1]
    acc = K.accumulator_dtype(x.dtype)
    block_m = K.grouped_block_m()
    meta = expert_layout(topk_ids, num_experts, block_m)
    if lora_a.dim() == 2:
        h = K.matmul(x, lora_a.t(), out_dtype=acc, compute_dtype=x.dtype)
        h_by_token = True
    else:
        h = torch.zeros(topk_ids.numel(), rank, dtype=acc, device=x.device)
        K.grouped_matmul(x, lora_a, h, meta.sorted_pairs_padded, meta.block_expert, block_m, top_k=top_k,
                         a_by_token=True, weight_nk_strides=(lora_a.stride(1), lora_a.stride(2)),
                         compute_dtype=x.dtype)
        h_by_token = False
    pairs = torch.empty(topk_ids.numel(), d_out, dtype=x.dtype, device=x.device)
    K.grouped_matmul(h, lora_b, pairs, meta.sorted_pairs_padded, meta.block_expert, block_m, top_k=top_k,
                     a_by_token=h_by_token, weight_nk_strides=(lora_b.stride(1), lora_b.stride(2)),
                     compute_dtype=x.dtype, alpha=scaling, scale=topk_weights.reshape(-1))
    y = K.combine_pairs(pairs, topk_ids, num_experts, out_dtype=x.dtype, base=base_out)
    return y, h


def _grouped_backward(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, scaling, need_dx):
    num_experts, d_out, rank = lora_b.shape
    T, top_k = topk_ids.shape
    shared = lora_a.dim() == 2
    acc = h.dtype
    block_m = K.grouped_block_m()
    meta = expert_layout(topk_ids, num_experts, block_m)
    flat_w = topk_weights.reshape(-1)
    valid = meta.inverse.reshape(-1) >= 0

    dh_pair = torch.zeros(topk_ids.numel(), rank, dtype=acc, device=x.device)
    K.grouped_matmul(dy, lora_b, dh_pair, meta.sorted_pairs_padded, meta.block_expert, block_m, top_k=top_k,
                     a_by_token=True, weight_nk_strides=(lora_b.stride(2), lora_b.stride(1)),
                     compute_dtype=x.dtype)
    h_pair = h.repeat_interleave(top_k, dim=0) if shared else h
    dw = torch.where(valid, scaling * (dh_pair * h_pair).sum(-1), 0).view(T, top_k)
    dh_pair = dh_pair * (scaling * torch.where(valid, flat_w.to(acc), 0))[:, None]

    dlora_b = K.grouped_weight_grad(dy, h, meta.sorted_pairs, meta.offsets, num_experts=num_experts, top_k=top_k,
                                    left_by_token=True, right_by_token=shared, compute_dtype=x.dtype,
                                    out_dtype=lora_b.dtype, alpha=scaling, scale=flat_w)
    if shared:
        dh = dh_pair.view(T, top_k, rank).sum(1)
        dlora_a = K.matmul(dh.t(), x, out_dtype=lora_a.dtype, compute_dtype=x.dtype, split_k=True)
        dx = K.matmul(dh, lora_a, out_dtype=x.dtype, compute_dtype=x.dtype) if need_dx else None
    else:
        dlora_a = K.grouped_weight_grad(dh_pair, x, meta.sorted_pairs, meta.offsets, num_experts=num_experts,
                                        top_k=top_k, left_by_token=False, right_by_token=True,
                                        compute_dtype=x.dtype, out_dtype=lora_a.dtype)
        dx = None
        if need_dx:
            dx_pair = torch.empty(topk_ids.numel(), x.shape[1], dtype=x.dtype, device=x.device)
            K.grouped_matmul(dh_pair, lora_a, dx_pair, meta.sorted_pairs_padded, meta.block_expert, block_m,
                             top_k=top_k, a_by_token=False,
                             weight_nk_strides=(lora_a.stride(2), lora_a.stride(1)), compute_dtype=x.dtype)
            dx = K.combine_pairs(dx_pair, topk_ids, num_experts, out_dtype=x.dtype)
    return dx, dlora_a, dlora_b, dw


# ------------------------------------------------------------ custom ops

def _forward(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, grouped):
    run = _grouped_forward if grouped else _dense_forward
    return run(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling)


def _backward(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, scaling, grouped, need_dx):
    run = _grouped_backward if grouped else _dense_backward
    dx, dlora_a, dlora_b, dw = run(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, scaling, need_dx)
    return dx, dlora_a, dlora_b, dw.to(topk_weights.dtype)


@torch.library.custom_op("moelora::moe_lora_forward", mutates_args=())
def moe_lora_forward(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor, base_out: Optional[torch.Tensor], scaling: float,
                     grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [T, d_out], h): the fused MoE-LoRA forward; h is what backward needs."""
    return _forward(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, grouped)


@moe_lora_forward.register_fake
def _(x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, grouped):
    y = x.new_empty(x.shape[0], lora_b.shape[1])
    h = x.new_empty(_saved_h_shape(x, lora_a, lora_b, topk_ids, grouped), dtype=K.accumulator_dtype(x.dtype))
    return y, h


@torch.library.custom_op("moelora::moe_lora_backward", mutates_args=())
def moe_lora_backward(dy: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      topk_ids: torch.Tensor, topk_weights: torch.Tensor, h: torch.Tensor, scaling: float,
                      grouped: bool, need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dlora_a, dlora_b, dtopk_weights); dx is an empty [0, d_in] tensor when not needed."""
    dx, dlora_a, dlora_b, dw = _backward(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, scaling, grouped,
                                         need_dx)
    return (x.new_empty(0, x.shape[1]) if dx is None else dx), dlora_a, dlora_b, dw


@moe_lora_backward.register_fake
def _(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, scaling, grouped, need_dx):
    dx = x.new_empty(x.shape if need_dx else (0, x.shape[1]))
    return dx, torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(topk_weights)


def _save_for_backward(ctx, inputs, h):
    x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, grouped = inputs
    ctx.save_for_backward(x, lora_a, lora_b, topk_ids, topk_weights, h)
    ctx.scaling = scaling
    ctx.grouped = grouped
    ctx.has_base = base_out is not None


def _input_grads(ctx, dy, backward):
    """Gradients for (x, lora_a, lora_b, topk_ids, topk_weights, base_out, scaling, grouped)."""
    x, lora_a, lora_b, topk_ids, topk_weights, h = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, dlora_a, dlora_b, dw = backward(dy, x, lora_a, lora_b, topk_ids, topk_weights, h, ctx.scaling,
                                        ctx.grouped, need_dx)
    return (dx if need_dx else None, dlora_a, dlora_b, None, dw, dy if ctx.has_base else None, None, None)


moe_lora_forward.register_autograd(
    lambda ctx, dy, _dh: _input_grads(ctx, dy, moe_lora_backward),
    setup_context=lambda ctx, inputs, output: _save_for_backward(ctx, inputs, output[1]),
)


class _EagerMoELoRA(torch.autograd.Function):
    """The custom ops' forward and backward without the custom-op dispatch, for eager mode.

    That dispatch costs tens of microseconds of host time per call, which is most of the
    layer's time at small T; torch.compile traces the custom ops instead.
    """

    @staticmethod
    def forward(ctx, *inputs):
        y, h = _forward(*inputs)
        _save_for_backward(ctx, inputs, h)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _input_grads(ctx, dy, _backward)


def moe_lora_triton(args: MoELoRAArgs, regime: str = "auto") -> torch.Tensor:
    """Run the Triton backend on validated, flattened arguments with T > 0; returns [T, d_out]."""
    num_experts, _, rank = args.lora_b.shape
    if regime == "auto":
        regime = choose_regime(num_experts, rank)
    inputs = (args.x, args.lora_a, args.lora_b, args.topk_ids, args.topk_weights, args.base_out, args.scaling,
              regime == "grouped")
    if torch.compiler.is_compiling():
        return moe_lora_forward(*inputs)[0]
    return _EagerMoELoRA.apply(*inputs)
