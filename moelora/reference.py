"""Pure-PyTorch MoE-LoRA: the per-expert loop that MoE-LoRA libraries use today, and
the vectorised formulation that is moelora's CPU backend and float64 reference.

Both compute  y[t] = base[t] + s * sum_j w[t,j] * B[e[t,j]] @ (A[e[t,j] or shared] @ x[t])
and are differentiated by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import MoELoRAArgs, check_moe_lora_args


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dense_gates(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                dtype: torch.dtype) -> torch.Tensor:
    """G[t, e] = sum of the gate weights of the slots of token t that chose e; [T, E].

    Ids outside [0, E) contribute nothing. Built with one-hot sums, not scatter_add,
    so it is deterministic on every device.
    """
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    safe_ids = torch.where(valid, topk_ids, 0).long()
    weights = torch.where(valid, topk_weights.to(dtype), 0)
    one_hot = F.one_hot(safe_ids, num_experts).to(dtype)
    return torch.einsum("tke,tk->te", one_hot, weights)


def moe_lora_torch_impl(args: MoELoRAArgs) -> torch.Tensor:
    """Vectorised dense gated expand on validated, flattened arguments; returns [T, d_out]."""
    x, lora_a, lora_b = args.x, args.lora_a, args.lora_b
    acc = _accumulation_dtype(x.dtype)
    num_experts, d_out, rank = lora_b.shape
    gates = dense_gates(args.topk_ids, args.topk_weights, num_experts, acc) * args.scaling
    xa = x.to(acc)
    if args.shared_a:
        h = xa @ lora_a.to(acc).t()  # [T, r]
        gated = gates[:, :, None] * h[:, None, :]  # [T, E, r]
    else:
        h = torch.einsum("td,erd->ter", xa, lora_a.to(acc))  # [T, E, r]
        gated = gates[:, :, None] * h
    delta = torch.einsum("ter,eor->to", gated, lora_b.to(acc))
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
    """
    args = check_moe_lora_args(x, lora_a, lora_b, topk_ids, topk_weights, scaling, base_out)
    x2, ids, w = args.x, args.topk_ids, args.topk_weights
    num_experts, d_out, _ = args.lora_b.shape
    out = torch.zeros(x2.shape[0], d_out, dtype=x2.dtype, device=x2.device)
    for e in range(num_experts):
        tokens, slots = torch.nonzero(ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        a_e = args.lora_a if args.shared_a else args.lora_a[e]
        gate = (w[tokens, slots].to(x2.dtype) * args.scaling).unsqueeze(-1)
        out = out.index_add(0, tokens, ((x2[tokens] @ a_e.t()) @ args.lora_b[e].t()) * gate)
    if args.base_out is not None:
        out = args.base_out + out
    return out.reshape(args.out_shape)
