"""Router auxiliary losses and statistics, computed per layer.

- Switch load-balancing loss of one layer with E experts:
  ``E * sum_e f_e * P_e``, f_e = (slots routed to e) / T, P_e = mean router probability of e.
  Equals transformers' Mixtral ``load_balancing_loss_func`` for one layer's logits; being
  per layer, it stays correct when layers have different expert counts.
- Router z-loss (ST-MoE): ``mean_t logsumexp(logits[t])^2``.

:func:`aux_losses` computes both from the statistics of moelora's routing op (counts,
prob_sums, lse), as the fused layer's kernel does. :class:`RoutedModule` is the mixin of
every module with a learned router: after each forward it holds that forward's weighted
losses and statistics (the previous forward's values are replaced, never accumulated),
which ``moelora.aux_loss`` and ``moelora.router_stats`` collect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

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


def aux_losses(counts: torch.Tensor, prob_sums: torch.Tensor, lse: torch.Tensor, lb_coef: float, z_coef: float):
    """(loss, stats) of one layer from its routing statistics, in their dtype (fp32, fp64 for fp64
    logits): loss = lb_coef * lb + z_coef * z (differentiable), stats = (lb, z) detached, with
    lb = E * sum_e (counts_e / T) (prob_sums_e / T) and z = mean_t lse_t^2 (T = lse.numel(); 0 for
    T = 0). The PyTorch twin of the fused layer's router_aux_loss kernel."""
    inv_t = 1.0 / max(lse.numel(), 1)
    lb = counts.to(prob_sums.dtype).dot(prob_sums) * (counts.numel() * inv_t * inv_t)
    z = lse.dot(lse) * inv_t
    return lb_coef * lb + z_coef * z, torch.stack([lb, z]).detach()


class RouterStats(Mapping):
    """One forward's routing statistics, computed when read: ``load`` (slots per token routed
    to each expert, [E]), ``entropy`` (mean routing entropy in nats) and the unweighted
    ``load_balancing_loss`` and ``z_loss`` (from ``aux_stats``). All detached."""

    KEYS = ("load", "entropy", "load_balancing_loss", "z_loss")

    def __init__(self, counts: torch.Tensor, logits: Optional[torch.Tensor], aux_stats: torch.Tensor,
                 num_tokens: int):
        self._counts, self._logits, self._aux_stats, self._num_tokens = counts, logits, aux_stats, num_tokens

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.KEYS:
            raise KeyError(key)
        if self._num_tokens == 0:
            raise ValueError("routing statistics are undefined: this module routed no tokens in its last forward")
        if key == "load":
            return self._counts.detach().float() / self._num_tokens
        if key == "entropy":
            return routing_entropy(torch.softmax(self._logits.detach().float(), dim=-1))
        return self._aux_stats[0 if key == "load_balancing_loss" else 1].detach()

    def __iter__(self):
        return iter(self.KEYS)

    def __len__(self) -> int:
        return len(self.KEYS)


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
        self._last_router_stats: Optional[Mapping] = None

    def _record_routing(self, routing, aux_loss: Optional[torch.Tensor] = None,
                        aux_stats: Optional[torch.Tensor] = None) -> None:
        """Keep this forward's weighted aux loss and statistics from a learned ``routing``
        (moelora.routers.Routing). ``aux_loss`` and ``aux_stats`` (from :func:`aux_losses` or the
        fused layer's kernel) are computed here when not given."""
        if aux_loss is None:
            aux_loss, aux_stats = aux_losses(routing.counts, routing.prob_sums, routing.lse, self.aux_loss_coef,
                                             self.z_loss_coef)
        # Only keep a graph when it can be used: no stale autograd graphs after eval passes.
        # (Written to __dict__: nn.Module.__setattr__ costs microseconds per call.)
        self.__dict__["_last_aux_loss"] = aux_loss if torch.is_grad_enabled() else aux_loss.detach()
        self.__dict__["_last_router_stats"] = RouterStats(routing.counts, routing.logits, aux_stats,
                                                          routing.weights.shape[0])
