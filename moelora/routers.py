"""Routers: from router logits (computed in fp32) to top-k expert ids and gate weights.

One small function per routing mode, so a fused routing op can replace any of them:

- ``softmax_topk``: softmax over all experts, keep the top-k, renormalise them to sum to 1
  (MoSLD, MoLA); with ``renormalize=False`` the kept probabilities are used as they are.
- ``topk_softmax``: top-k logits first, softmax over those k (Mixtral, MoLEx).
- ``threshold``: ST-MoE style: softmax, top-n; the best expert is always used, every other
  of the top-n with probability min(1, p_hat / eps) in training (p_hat its probability
  renormalised over the top-n) and iff p_hat >= eps at eval; the kept experts' weights are
  renormalised. Dropped slots keep their id with weight 0, so shapes never depend on data.
  eps follows a linear schedule the trainer steps (``moelora.step_routers``).
- ``task``: k = 1, the expert is the task id given with the batch, the gate a trainable
  per-task scale gamma (see :func:`task_routing`).

Every mode returns ``Routing(weights [T, k] fp32, ids [T, k] int64, probs [T, E] fp32 or
None, logits [T, E] fp32 or None)``; probs and logits feed the auxiliary losses.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn

ROUTER_MODES = ("softmax_topk", "topk_softmax", "threshold", "task")


class Routing(NamedTuple):
    weights: torch.Tensor  # [T, k] fp32
    ids: torch.Tensor  # [T, k] int64
    probs: Optional[torch.Tensor]  # [T, E] fp32 softmax over all experts (None for task routing)
    logits: Optional[torch.Tensor]  # [T, E] fp32 (None for task routing)


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> Routing:
    """Softmax over all experts, then the top-k probabilities (renormalised by default)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(weights, ids, probs, logits)


def topk_softmax(logits: torch.Tensor, top_k: int) -> Routing:
    """Top-k logits, then a softmax over those k (Mixtral's gate)."""
    logits = logits.float()
    top_logits, ids = torch.topk(logits, top_k, dim=-1)
    return Routing(torch.softmax(top_logits, dim=-1), ids, torch.softmax(logits, dim=-1), logits)


def threshold_routing(logits: torch.Tensor, top_n: int, eps: Union[float, torch.Tensor], training: bool,
                      generator: Optional[torch.Generator] = None) -> Routing:
    """ST-MoE threshold routing over the top-n experts (see the module docstring).

    ``eps`` is a float or a 0-d tensor (a scheduled eps read without a host sync).
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    top_p, ids = torch.topk(probs, top_n, dim=-1)
    p_hat = top_p / top_p.sum(dim=-1, keepdim=True)
    if not isinstance(eps, torch.Tensor) and eps <= 0:
        keep = torch.ones_like(p_hat, dtype=torch.bool)
    elif training:
        u = torch.rand(p_hat.shape, device=p_hat.device, generator=generator)
        keep = u < torch.clamp(p_hat / eps, max=1.0)
    else:
        keep = p_hat >= eps
    keep[..., 0] = True  # the best expert always
    kept = torch.where(keep, top_p, torch.zeros_like(top_p))
    return Routing(kept / kept.sum(dim=-1, keepdim=True), ids, probs, logits)


def task_routing(task_ids: torch.Tensor, gamma: torch.Tensor, lead_shape: tuple,
                 shared_expert: Optional[int] = None) -> Routing:
    """k = 1 (k = 2 with a shared LoRA): expert = task id, weight = gamma[task].

    ``task_ids`` is a scalar, one id per example ([B], broadcast over the other leading dims
    of x) or one id per token (``lead_shape``). With ``shared_expert`` every token also uses
    that expert with weight 1 (the report's lora-shared).
    """
    task_ids = torch.as_tensor(task_ids, device=gamma.device).long()
    if task_ids.dim() == 0:
        ids = task_ids.expand(lead_shape)
    elif tuple(task_ids.shape) == tuple(lead_shape):
        ids = task_ids
    elif len(lead_shape) >= 1 and task_ids.dim() == 1 and task_ids.shape[0] == lead_shape[0]:
        ids = task_ids.view((-1,) + (1,) * (len(lead_shape) - 1)).expand(lead_shape)
    else:
        raise ValueError(
            f"task ids of shape {tuple(task_ids.shape)} fit neither one id per example "
            f"(first dim of {tuple(lead_shape)}) nor one per token")
    ids = ids.reshape(-1, 1)
    weights = gamma.float()[ids]
    if shared_expert is not None:
        ids = torch.cat([ids, torch.full_like(ids, shared_expert)], dim=1)
        weights = torch.cat([weights, torch.ones_like(weights)], dim=1)
    return Routing(weights, ids, None, None)


class Router(nn.Linear):
    """The learned gate: an ``nn.Linear(d_in, E, bias=False)`` whose logits are computed in
    fp32, plus the routing mode, top-k, jitter noise and the threshold schedule.

    ``eps`` for threshold routing rises linearly from ``eps_start`` to ``eps_end`` over
    ``eps_ramp_steps`` calls of :meth:`step` (``moelora.step_routers(model)``).
    """

    def __init__(self, in_features: int, num_experts: int, top_k: int, mode: str = "softmax_topk",
                 renormalize: bool = True, jitter_noise: float = 0.0, eps_start: float = 0.0,
                 eps_end: float = 0.0, eps_ramp_steps: int = 0, device=None):
        if mode not in ROUTER_MODES or mode == "task":
            raise ValueError(f"Router mode must be one of {ROUTER_MODES[:3]}, got {mode!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if jitter_noise < 0:
            raise ValueError(f"router jitter noise must be >= 0, got {jitter_noise}")
        super().__init__(in_features, num_experts, bias=False, device=device, dtype=torch.float32)
        self.mode, self.top_k, self.renormalize = mode, top_k, renormalize
        self.jitter_noise = jitter_noise
        self.eps_start, self.eps_end, self.eps_ramp_steps = float(eps_start), float(eps_end), int(eps_ramp_steps)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long), persistent=True)

    @property
    def num_experts(self) -> int:
        return self.out_features

    @property
    def eps(self) -> float:
        """The current eps, read on the host (for logging; forward uses :meth:`scheduled_eps`)."""
        if self.eps_ramp_steps <= 0:
            return self.eps_end
        frac = min(1.0, int(self.num_steps) / self.eps_ramp_steps)
        return self.eps_start + (self.eps_end - self.eps_start) * frac

    def scheduled_eps(self) -> Union[float, torch.Tensor]:
        """eps for this forward: a float without a ramp, else a 0-d tensor computed from the
        step buffer on its device, so torch.compile and CUDA graphs see no host read."""
        if self.eps_ramp_steps <= 0:
            return self.eps_end
        frac = torch.clamp(self.num_steps.float() / self.eps_ramp_steps, max=1.0)
        return self.eps_start + (self.eps_end - self.eps_start) * frac

    def step(self, n: int = 1) -> None:
        self.num_steps += n

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return nn.functional.linear(x, self.weight.float())

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        if self.mode == "softmax_topk":
            return softmax_topk(logits, self.top_k, self.renormalize)
        if self.mode == "topk_softmax":
            return topk_softmax(logits, self.top_k)
        return threshold_routing(logits, self.top_k, self.scheduled_eps(), self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, top_k={self.top_k}"

