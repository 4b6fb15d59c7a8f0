"""Router auxiliary losses and statistics, computed per layer.

- Switch load-balancing loss of one layer with E experts:
  ``E * sum_e f_e * P_e``, f_e = (slots routed to e) / T, P_e = mean router probability of e.
  Equals transformers' Mixtral ``load_balancing_loss_func`` for one layer's logits; being
  per layer, it stays correct when layers have different expert counts.
- Router z-loss (ST-MoE): ``mean_t logsumexp(logits[t])^2``.

:class:`RoutedModule` is the mixin of every module with a learned router: after each
forward it holds that forward's weighted losses and detached statistics (the previous
forward's values are replaced, never accumulated), which ``moelora.aux_loss`` and
``moelora.router_stats`` collect.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F


def expert_load(ids: torch.Tensor, num_experts: int, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """f_e: routed slots per expert divided by the number of tokens, [E] fp32.

    Slots with weight 0 (dropped by threshold routing) are not counted when ``weights``
    is given. Built from one-hot sums: no host sync, deterministic.
    """
    ids = ids.reshape(-1, ids.shape[-1])
    one_hot = F.one_hot(ids.long(), num_experts).float()  # [T, k, E]
    if weights is not None:
        one_hot = one_hot * (weights.reshape(ids.shape) > 0).float().unsqueeze(-1)
    return one_hot.sum(dim=(0, 1)) / max(ids.shape[0], 1)


def load_balancing_loss(probs: torch.Tensor, ids: torch.Tensor, num_experts: int,
                        weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch load-balancing loss of one layer (see the module docstring)."""
    probs = probs.reshape(-1, num_experts).float()
    if probs.shape[0] == 0:
        return probs.sum()
    return num_experts * torch.sum(expert_load(ids, num_experts, weights) * probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if logits.shape[0] == 0:
        return logits.sum()
    return torch.logsumexp(logits, dim=-1).square().mean()


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of the router distribution."""
    probs = probs.reshape(-1, probs.shape[-1]).float()
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()


def _without_routing_record(inherited_getstate):
    """A ``__getstate__`` returning the inherited state with the routing record cleared."""

    def __getstate__(self):
        record = dict(self.__dict__)
        self._clear_routing_record()
        try:
            return inherited_getstate(self)
        finally:
            self.__dict__.update(record)

    return __getstate__


class RoutedModule:
    """Mixin: stores the last forward's auxiliary losses and routing statistics.

    Subclasses set ``aux_loss_coef`` and ``z_loss_coef`` and call :meth:`_record_routing`.
    Copies (``copy.deepcopy``, pickling) start with no record: the stored loss carries its
    forward's autograd graph, which deepcopy refuses.
    """

    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__getstate__" not in cls.__dict__:  # nn.Module's comes first in the MRO: wrap it
            cls.__getstate__ = _without_routing_record(cls.__getstate__)

    def _clear_routing_record(self) -> None:
        self._last_aux_loss: Optional[torch.Tensor] = None
        self._last_router_stats: Optional[Dict[str, torch.Tensor]] = None

    def _record_routing(self, probs: torch.Tensor, logits: Optional[torch.Tensor], ids: torch.Tensor,
                        weights: torch.Tensor, num_experts: int) -> None:
        loss = probs.new_zeros(())
        lb = load_balancing_loss(probs, ids, num_experts, weights)
        if self.aux_loss_coef:
            loss = loss + self.aux_loss_coef * lb
        z = router_z_loss(logits) if logits is not None else probs.new_zeros(())
        if self.z_loss_coef and logits is not None:
            loss = loss + self.z_loss_coef * z
        # Only keep a graph when it can be used: no stale autograd graphs after eval passes.
        self._last_aux_loss = loss if torch.is_grad_enabled() else loss.detach()
        self._last_router_stats = {
            "load": expert_load(ids, num_experts, weights).detach(),
            "entropy": routing_entropy(probs).detach(),
            "load_balancing_loss": lb.detach(),
            "z_loss": z.detach(),
        }
