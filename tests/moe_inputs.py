"""Random MoE-LoRA problems and the float64 reference the kernel tests compare with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelora.ops.reference import moe_lora_torch

# Relative-error bounds ||out - ref|| / ||ref|| against the float64 reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass
class Problem:
    x: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    base_out: torch.Tensor | None
    scaling: float

    def leaves(self):
        """The differentiable inputs, in a fixed order."""
        out = [self.x, self.lora_a, self.lora_b, self.topk_weights]
        return out + ([self.base_out] if self.base_out is not None else [])

    def args(self):
        return (self.x, self.lora_a, self.lora_b, self.topk_ids, self.topk_weights)


def routing(T: int, E: int, k: int, *, device, id_dtype=torch.int64, experts: int | None = None,
            one_expert: bool = False, generator=None) -> torch.Tensor:
    """[T, k] distinct ids per token drawn from the first ``experts`` experts (all by default).

    ``one_expert`` sends slot 0 of every token to expert 0 (k = 1: all tokens on it).
    """
    pool = experts or E
    ids = torch.rand(T, pool, generator=generator).argsort(dim=1)[:, :k]
    if one_expert:
        ids = torch.rand(T, E, generator=generator).argsort(dim=1)
        ids = torch.cat([torch.zeros(T, 1, dtype=torch.long), ids[ids != 0].view(T, E - 1)], dim=1)[:, :k]
    return ids.to(device=device, dtype=id_dtype)


def make_problem(T, d_in, d_out, r, E, k, *, shared_a=True, dtype=torch.float32, device="cpu",
                 id_dtype=torch.int64, with_base=True, experts=None, one_expert=False,
                 scaling=0.7, seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    a_shape = (r, d_in) if shared_a else (E, r, d_in)
    return Problem(
        x=rand(T, d_in),
        lora_a=(torch.randn(*a_shape, generator=g) / d_in**0.5).to(device=device, dtype=dtype).requires_grad_(),
        lora_b=rand(E, d_out, r),
        topk_ids=routing(T, E, k, device=device, id_dtype=id_dtype, experts=experts, one_expert=one_expert,
                         generator=g),
        topk_weights=torch.rand(T, k, generator=g).to(device).requires_grad_(),
        base_out=rand(T, d_out) if with_base else None,
        scaling=scaling,
    )


def reference(p: Problem, grad_out: torch.Tensor):
    """(y, grads of p.leaves()) of the float64 torch reference."""
    leaves = [t.detach().double().requires_grad_() for t in p.leaves()]
    x, a, b, w = leaves[:4]
    base = leaves[4] if p.base_out is not None else None
    y = moe_lora_torch(x, a, b, p.topk_ids, w, scaling=p.scaling, base_out=base)
    grads = torch.autograd.grad(y, leaves, grad_out.double())
    return y, grads


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double()
    ref = ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm()
    diff = (out - ref).norm()
    return float(diff) if denom == 0 else float(diff / denom)
