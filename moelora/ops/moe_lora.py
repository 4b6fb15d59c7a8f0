"""The public functional operator ``moe_lora`` and its backend choice.

Backends: ``triton`` (fused kernels, forward and backward; CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``) and ``torch`` (vectorised PyTorch, the CPU default and the
float64 reference). ``auto`` picks triton where it can run, torch elsewhere.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from moelora.switches import BACKENDS, current_backend
from moelora.ops.moe_lora_triton import moe_lora_triton
from moelora.kernels.launchers import interpreting
from moelora.ops.validation import check_moe_lora_args
from moelora.ops.reference import moe_lora_torch_impl

REGIMES = ("auto", "dense", "grouped")


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def resolve_backend(requested: Optional[str], device: torch.device) -> str:
    """The backend that will run for tensors on ``device`` ("torch" or "triton")."""
    name = requested if requested is not None else current_backend()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    triton_can_run = triton_available() and (device.type == "cuda" or interpreting())
    if name == "auto":
        return "triton" if triton_can_run else "torch"
    if name == "triton" and not triton_can_run:
        raise ValueError(
            "backend='triton' needs triton installed and CUDA tensors (or TRITON_INTERPRET=1 "
            f"for CPU tensors); got tensors on {device}")
    return name


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
            output); without it the delta alone is returned.
        backend: "auto" (default: see the module docstring), "triton" or "torch".
        regime: triton only: "dense" (gated expand over all E*r columns), "grouped"
            (expert-sorted grouped GEMM) or "auto" (chosen from the shape).

    Returns:
        [..., d_out] tensor in x's dtype, differentiable w.r.t. x, lora_a, lora_b,
        topk_weights and base_out.
    """
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    args = check_moe_lora_args(x, lora_a, lora_b, topk_ids, topk_weights, scaling, base_out)
    # No kernel runs on zero tokens: the torch path returns the empty result with its autograd.
    if resolve_backend(backend, args.x.device) == "torch" or args.num_tokens == 0:
        return moe_lora_torch_impl(args).reshape(args.out_shape)
    return moe_lora_triton(args, regime)
