"""Pure-PyTorch MoE-LoRA: the per-expert loop that MoE-LoRA libraries use today, and
the vectorised formulation that is moelora's CPU backend and float64 reference.

Both compute  y[t] = base[t] + s * sum_j w[t,j] * B[e[t,j]] @ (A[e[t,j] or shared] @ x[t])
and are differentiated by autograd. The sum runs over the chosen experts only: experts no
slot of a token chose contribute nothing to it, whatever their weights hold (NaN, Inf).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelora.ops.validation import MoELoRAArgs, check_moe_lora_args
from moelora.kernels.launchers import accumulator_dtype


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

    Ids outside [0, E) contribute nothing. Built with one-hot sums, not scatter_add,
    so it is deterministic on every device.
    """
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    safe_ids = torch.where(valid, topk_ids, 0).long()
    weights = torch.where(valid, topk_weights.to(dtype), 0)
    one_hot = F.one_hot(safe_ids, num_experts) * valid[..., None]  # [T, k, E] int
    gates = torch.einsum("tke,tk->te", one_hot.to(dtype), weights)
    return (gates, one_hot.sum(1) > 0) if with_chosen else gates


class _FinitePart(torch.autograd.Function):
    """Forward: the tensor with NaN/Inf replaced by 0. Backward: the gradient unchanged (the
    dense formula's weight gradients do not depend on the weights' values)."""

    @staticmethod
    def forward(ctx, t):
        return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))

    @staticmethod
    def backward(ctx, grad):
        return grad


def moe_lora_torch_impl(args: MoELoRAArgs) -> torch.Tensor:
    """Vectorised dense gated expand on validated arguments; returns [T, d_out].

    The dense form multiplies every expert's B (and per-expert A) by every token's gate, 0
    for the experts the token did not choose, and 0 * NaN is NaN: so the contraction runs on
    the finite part of the weights, and the outputs that a non-finite weight of a chosen
    expert reaches are set to NaN afterwards (per-expert A: the whole token; B: the output
    features of its non-finite rows). Gradients treat the non-finite entries as 0.
    """
    args = args.flattened()
    x, lora_a, lora_b = args.x, args.lora_a, args.lora_b
    acc = compute_dtype(x.dtype, args.scaling)
    num_experts, d_out, rank = lora_b.shape
    gates, chosen = dense_gates(args.topk_ids, args.topk_weights, num_experts, acc, with_chosen=True)
    gates = gates * args.scaling
    xa = x.to(acc)
    if args.shared_a:
        h = (xa @ lora_a.to(acc).t())[:, None, :]  # [T, 1, r]
        bad_a = None
    else:
        h = torch.einsum("td,erd->ter", xa, _FinitePart.apply(lora_a.to(acc)))  # [T, E, r]
        bad_a = ~torch.isfinite(lora_a).flatten(1).all(1)  # [E]
    # Unchosen (token, expert) blocks are exact zeros, whatever x or a shared A hold.
    gated = torch.where(chosen[:, :, None], gates[:, :, None] * h, torch.zeros((), dtype=acc, device=x.device))
    delta = torch.einsum("ter,eor->to", gated, _FinitePart.apply(lora_b.to(acc)))
    bad = ~torch.isfinite(lora_b).all(2)  # [E, d_out]: rows of B with a NaN/Inf
    if bad_a is not None:
        bad = bad | bad_a[:, None]
    reached = chosen.to(acc) @ bad.to(acc)  # [T, d_out]: chosen experts with a non-finite weight there
    delta = torch.where(reached > 0, torch.full((), float("nan"), dtype=acc, device=x.device), delta)
    if args.base_out is not None:
        delta = delta + args.base_out.to(acc)
    return delta.to(x.dtype)


def moe_lora_torch(x, lora_a, lora_b, topk_ids, topk_weights, *, scaling=1.0, base_out=None):
    """Vectorised PyTorch MoE-LoRA (the CPU backend); same contract as ``moelora.moe_lora``."""
    args = check_moe_lora_args(x, lora_a, lora_b, topk_ids, topk_weights, scaling, base_out)
    return moe_lora_torch_impl(args).reshape(args.out_shape)


def moe_lora_naive(x, lora_a, lora_b, topk_ids, topk_weights, *, scaling=1.0, base_out=None):
    """The per-expert Python loop (select tokens, matmul, scale, index_add).

    This is how MoE-LoRA libraries (MixLoRA, MoLA, LoRAMoE, ...) compute the layer today:
    the baseline moelora's benchmarks beat. It synchronises with the host once per expert.
    Scalings outside fp32's comfortable range run in float64 (see compute_dtype).
    """
    args = check_moe_lora_args(x, lora_a, lora_b, topk_ids, topk_weights, scaling, base_out).flattened()
    dtype = torch.float64 if compute_dtype(args.x.dtype, args.scaling) == torch.float64 else args.x.dtype
    x2, ids, w = args.x.to(dtype), args.topk_ids, args.topk_weights
    num_experts, d_out, _ = args.lora_b.shape
    out = torch.zeros(x2.shape[0], d_out, dtype=dtype, device=x2.device)
    for e in range(num_experts):
        tokens, slots = torch.nonzero(ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        a_e = (args.lora_a if args.shared_a else args.lora_a[e]).to(dtype)
        gate = (w[tokens, slots].to(dtype) * args.scaling).unsqueeze(-1)
        out = out.index_add(0, tokens, ((x2[tokens] @ a_e.t()) @ args.lora_b[e].to(dtype).t()) * gate)
    if args.base_out is not None:
        out = args.base_out.to(dtype) + out
    return out.to(args.x.dtype).reshape(args.out_shape)
