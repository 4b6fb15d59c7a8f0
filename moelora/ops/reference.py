"""The per-expert Python loop that MoE-LoRA libraries (MixLoRA, MoLA, LoRAMoE, ...) use today:
the baseline moelora's benchmarks beat, and an independent formulation the tests compare
with. The vectorised PyTorch formulation, moelora's own torch backend, is
:func:`moelora.ops.moe_lora.moe_lora_torch` (also reachable here as ``moe_lora_torch``).
"""

from __future__ import annotations

import torch

from moelora.ops.moe_lora import check_moe_lora_args, compute_dtype, moe_lora_torch

__all__ = ["moe_lora_naive", "moe_lora_torch"]


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
