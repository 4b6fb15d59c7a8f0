"""Router auxiliary losses and statistics, computed per layer.

- Switch load-balancing loss of one layer with E experts:
  ``E * sum_e f_e * P_e``, f_e = (slots routed to e) / T, P_e = mean router probability of e.
  Equals transformers' Mixtral ``load_balancing_loss_func`` for one layer's logits; being
  per layer, it stays correct when layers have different expert counts.
- Router z-loss (ST-MoE): ``mean_t logsumexp(logits[t])^2``.

:func:`aux_losses` computes both from the statistics of moelora's routing op (counts,
prob_sums, lse), as the fused layer's kernel does; :func:`routing_aux_losses` runs that
kernel (launchers.router_aux_loss) where the Triton kernels run. Every module with a learned
router keeps its last forward's losses and statistics (moelora.modules.routed.RoutedModule),
which ``moelora.aux_loss`` and ``moelora.router_stats`` collect.
"""

from __future__ import annotations

from typing import Optional

import torch

from moelora.kernels import launchers
from moelora.kernels.launchers import accumulator_dtype
from moelora.ops.backend import kernels_run
from moelora.ops.routing_modes import slot_counts
from moelora.ops.validation import host_values, refuse_double_backward, syncing_checks_enabled


def expert_load(ids: torch.Tensor, num_experts: int, weights: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """f_e: routed slots per expert divided by the number of tokens, [E] in ``dtype`` (fp32).

    Slots with weight 0 (dropped by threshold routing) are not counted when ``weights``
    is given; with ``mask`` ([T], the real tokens: bool, or integers nonzero for real tokens and 0 for padding,
    as an attention_mask) only the real tokens' slots count, over the number of real tokens. Built from one-hot
    sums: no host sync, deterministic; ids outside [0, num_experts) count for no expert.
    """
    ids = ids.reshape(-1, ids.shape[-1])
    one_hot = (ids.unsqueeze(-1) == torch.arange(num_experts, device=ids.device)).to(dtype)  # [T, k, E]
    if weights is not None:
        one_hot = one_hot * (weights.reshape(ids.shape) > 0).to(dtype).unsqueeze(-1)
    if mask is not None:
        real = _real_tokens(mask)
        return (one_hot * real.to(dtype).reshape(-1, 1, 1)).sum(dim=(0, 1)) / _count(real, dtype)
    return one_hot.sum(dim=(0, 1)) / max(ids.shape[0], 1)


def load_balancing_loss(probs: torch.Tensor, ids: torch.Tensor, num_experts: int,
                        weights: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch load-balancing loss of one layer (see the module docstring) from the router
    probabilities ``probs`` [..., E = ``num_experts``] and the chosen ``ids`` [..., k] of the same tokens (and their
    ``weights``, ids' shape: slots of weight 0 are not counted); with ``mask`` ([...] of the
    tokens: bool, or integers nonzero for real tokens and 0 for padding, as an attention_mask and as
    ``moelora.set_aux_loss_mask`` takes it) over the real tokens only (f_e and P_e as means over them).
    In fp32 (fp64 for fp64 probs). Shapes that do not match raise ValueError naming the argument, and so do ids
    outside [0, num_experts) while moelora.validation is on (one host read, skipped under torch.compile and
    CUDA-graph capture); with it off their slots count for no expert."""
    _check_load_balancing_args(probs, ids, num_experts, weights, mask)
    if ids.numel() and syncing_checks_enabled(ids):
        lo, hi = host_values(*torch.aminmax(ids))
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")
    return balancing_loss(probs, ids, num_experts, weights, mask)


def balancing_loss(probs: torch.Tensor, ids: torch.Tensor, num_experts: int, weights: Optional[torch.Tensor] = None,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`load_balancing_loss` without its argument checks (no host read), for routing moelora made."""
    probs = probs.reshape(-1, num_experts)
    probs = probs.to(accumulator_dtype(probs.dtype))
    if probs.shape[0] == 0:
        return probs.sum()
    if mask is not None:
        real = _real_tokens(mask)
        mean_probs = torch.where(real.unsqueeze(1), probs, 0.0).sum(dim=0) / _count(real, probs.dtype)  # padding: any
    else:
        mean_probs = probs.mean(dim=0)
    return num_experts * torch.sum(expert_load(ids, num_experts, weights, mask, probs.dtype) * mean_probs)


def _check_load_balancing_args(probs, ids, num_experts, weights, mask) -> None:
    """ValueError naming the argument unless probs is [..., num_experts] and ids, weights and mask
    describe its tokens, TypeError unless probs is floating point and ids integers (free: no value read)."""
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be floating point (router probabilities), got {probs.dtype}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor (expert ids), got {ids.dtype}")
    if probs.dim() < 1 or probs.shape[-1] != num_experts:
        raise ValueError(f"probs must have shape [..., num_experts = {num_experts}], got {tuple(probs.shape)}")
    tokens = probs.numel() // num_experts
    if ids.dim() < 1 or ids.numel() != tokens * ids.shape[-1]:
        raise ValueError(f"ids must have shape [..., k] with probs' {tokens} tokens, got {tuple(ids.shape)} "
                         f"(probs {tuple(probs.shape)})")
    if weights is not None and weights.shape != ids.shape:
        raise ValueError(f"weights must have the shape of ids {tuple(ids.shape)}, got {tuple(weights.shape)}")
    if mask is not None and mask.numel() != tokens:
        raise ValueError(f"mask must hold one value per token ({tokens}), got shape {tuple(mask.shape)}")


def _real_tokens(mask: torch.Tensor) -> torch.Tensor:
    """[T] bool: the real tokens (nonzero) of a token mask of any shape, bool or integer (0 for padding)."""
    mask = mask.reshape(-1)
    return mask if mask.dtype == torch.bool else mask != 0


def _count(real: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The number of real tokens of a [T] bool mask, at least 1, in ``dtype`` (a tensor: no host read)."""
    return real.sum().clamp_min(1).to(dtype)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, in fp32 (fp64 for fp64 logits), of
    ``logits`` [..., E] (else a ValueError naming them)."""
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., E] with E >= 1, got {tuple(logits.shape)}")
    logits = logits.reshape(-1, logits.shape[-1])
    logits = logits.to(accumulator_dtype(logits.dtype))
    if logits.shape[0] == 0:
        return logits.sum()
    return torch.logsumexp(logits, dim=-1).square().mean()


def routing_entropy(probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over tokens (with ``mask``, [T] bool or integers nonzero for real tokens: over the real tokens,
    whatever the padding rows hold) of the entropy (nats) of the router distribution; 0 without tokens (or real
    tokens), as :func:`expert_load`'s load; in fp32 (fp64 for fp64 probs), 0 log 0 taken as 0."""
    probs = probs.reshape(-1, probs.shape[-1])
    probs = probs.to(accumulator_dtype(probs.dtype))
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    if mask is not None:
        real = _real_tokens(mask)
        return torch.where(real, entropy, 0.0).sum() / _count(real)
    return entropy.mean() if entropy.numel() else entropy.sum()


def aux_losses(counts: torch.Tensor, prob_sums: torch.Tensor, lse: torch.Tensor, lb_coef: float, z_coef: float):
    """(loss, stats) of one layer from its routing statistics, in their dtype (fp32, fp64 for fp64
    logits): loss = lb_coef * lb + z_coef * z (differentiable), stats = (lb, z) detached, with
    lb = E * sum_e (counts_e / T) (prob_sums_e / T) and z = mean_t lse_t^2 (T = lse.numel(); 0 for
    T = 0). The PyTorch twin of the aux loss the fused layer's gated expand computes (_router_aux_loss)."""
    inv_t = 1.0 / max(lse.numel(), 1)
    lb = counts.to(prob_sums.dtype).dot(prob_sums) * (counts.numel() * inv_t * inv_t)
    z = lse.dot(lse) * inv_t
    return lb_coef * lb + z_coef * z, torch.stack([lb, z]).detach()


def masked_aux_losses(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                      lb_coef: float, z_coef: float, count_kept: bool = False, kernels: bool = True):
    """(loss, stats, counts) of :func:`aux_losses` over the real tokens only: ``mask`` [T] bool
    (False for padding), T then the number of real tokens n (at least 1), counts [E] (int64) their
    routed slots (those with weight > 0 where ``count_kept``: threshold routing), prob_sums and
    lse over them from the routing's ``logits`` [T, E] (as transformers' Mixtral masks its
    load-balancing loss). Differentiable in the logits, by the closed-form gradient: where the
    Triton kernels run, one launch forward and one backward (launchers.masked_router_aux_loss, as
    in the fused layer's op; :class:`_MaskedAuxKernelFn`), else (and with ``kernels=False``: the fused
    op's torch backend) PyTorch ops (:class:`_MaskedAuxLossFn`).
    An all-True mask gives aux_losses' loss; padding tokens change neither the loss nor its
    gradients, whatever the padding rows hold; a real token's NaN or +inf logits, or a row of -inf only, make the
    loss NaN (the routing op's limits for them are not taken here), while -inf logits beside finite ones take
    probability 0, as in the routing op."""
    logits = logits.to(accumulator_dtype(logits.dtype))
    if kernels and logits.shape[0] and kernels_run(logits.device) and not torch.compiler.is_compiling():
        return _MaskedAuxKernelFn.apply(logits, ids, weights, mask, lb_coef, z_coef, count_kept)
    real_slots = mask.reshape(-1, 1).expand(ids.shape)
    counts = slot_counts(ids, logits.shape[-1], real_slots & (weights > 0) if count_kept else real_slots)
    loss, stats = _MaskedAuxLossFn.apply(logits, counts, mask, lb_coef, z_coef)
    return loss, stats, counts


def _real_rows(logits: torch.Tensor, mask: torch.Tensor):
    """(the logits with padding rows 0, w [T] = m_t / n, 1 / n) of the mask m (1 for real tokens, 0 for
    padding; n = max(1, sum m)): padding rows, whatever they hold, are then finite and weigh 0."""
    mask = mask.reshape(-1)
    real = mask.to(logits.dtype)
    inv_n = real.sum().clamp_min(1).reciprocal()
    return torch.where(mask.unsqueeze(1), logits, 0.0), real.mul_(inv_n), inv_n


def masked_aux_loss_forward(logits: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor, lb_coef: float,
                            z_coef: float):
    """(loss, stats) of the masked aux loss (no autograd: :class:`_MaskedAuxLossFn` differentiates
    it with :func:`masked_aux_loss_backward`), with the token weights w_t = m_t / n:
    lb = E (c / n) . (sum_t w_t p_t), z = sum_t w_t lse_t^2."""
    logits, w, inv_n = _real_rows(logits, mask)
    lse = torch.logsumexp(logits, dim=-1)
    lb = counts.to(logits.dtype).dot(torch.softmax(logits, dim=-1).t().mv(w)) * (inv_n * logits.shape[-1])
    z = (lse * lse).dot(w)
    # no in-place op makes the outputs: traced in _MaskedAuxLossFn.forward, dynamo 2.11 then lost the loss's gradient
    return lb * lb_coef + z * z_coef, torch.stack([lb, z])


def masked_aux_loss_backward(g: torch.Tensor, logits: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor,
                             lb_coef: float, z_coef: float) -> torch.Tensor:
    """d loss / d logits [T, E] of the masked aux loss for its gradient ``g`` (0-d): for a real
    token t (0 for padding), g p_tj (lb_coef E / n^2 (c_j - p_t . c) + 2 z_coef lse_t / n)
    = g w_t p_tj (c'_j - p_t . c' + 2 z_coef lse_t) with c' = lb_coef E c / n. Out-of-place ops:
    autograd differentiates them in a double backward (``create_graph=True``)."""
    logits, w, inv_n = _real_rows(logits, mask)
    probs = torch.softmax(logits, dim=-1)
    scaled = counts.to(logits.dtype) * (inv_n * (lb_coef * logits.shape[-1]))
    per_token = torch.logsumexp(logits, dim=-1) * (2 * z_coef) - probs.mv(scaled)
    return (per_token.unsqueeze(1) + scaled) * probs * (w * g).unsqueeze(1)


class _MaskedAuxKernelFn(torch.autograd.Function):
    """(loss, stats, counts) of :func:`masked_aux_losses` in one launch (launchers.masked_router_aux_loss);
    backward: d logits in one more (launchers.masked_router_aux_loss_backward)."""

    @staticmethod
    def forward(ctx, logits, ids, weights, mask, lb_coef, z_coef, count_kept):
        loss, stats, counts = launchers.masked_router_aux_loss(logits, ids, weights, mask, lb_coef, z_coef, count_kept)
        ctx.save_for_backward(logits, counts, mask)
        ctx.coefs = (lb_coef, z_coef)
        ctx.mark_non_differentiable(stats, counts)
        ctx.set_materialize_grads(False)
        return loss, stats, counts

    @staticmethod
    def backward(ctx, g, *_):
        refuse_double_backward("the masked aux loss")
        if g is None:
            return (None,) * 7
        return (launchers.masked_router_aux_loss_backward(g, *ctx.saved_tensors, *ctx.coefs),) + (None,) * 6


class _MaskedAuxLossFn(torch.autograd.Function):
    """(loss, stats) of :func:`masked_aux_losses` from the logits [T, E], the real tokens' slot
    counts c [E] and the mask m [T] (n = max(1, sum m)): lb = E (c . P) / n^2 with P = sum_t m_t
    p_t, z = sum_t m_t lse_t^2 / n, loss = lb_coef lb + z_coef z; backward: :func:`masked_aux_loss_backward`,
    itself differentiable (the torch backend's higher-order gradients, as its unmasked loss's)."""

    @staticmethod
    def forward(ctx, logits, counts, mask, lb_coef, z_coef):
        loss, stats = masked_aux_loss_forward(logits, counts, mask, lb_coef, z_coef)
        ctx.save_for_backward(logits, counts, mask)
        ctx.coefs = (lb_coef, z_coef)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return loss, stats

    @staticmethod
    def backward(ctx, g, _):
        if g is None:
            return None, None, None, None, None
        return masked_aux_loss_backward(g, *ctx.saved_tensors, *ctx.coefs), None, None, None, None


def routing_aux_losses(routing, lb_coef: float, z_coef: float):
    """:func:`aux_losses` of a learned ``routing`` (moelora.ops.routing_modes.Routing): in eager mode
    where the Triton kernels run, one single-program kernel (the fused layer's) whose backward
    is one more (launchers.router_aux_loss_backward); else (torch.compile, other devices, no
    tokens) the PyTorch formula."""
    lse = routing.lse
    if lse.numel() == 0 or not kernels_run(lse.device) or torch.compiler.is_compiling():
        return aux_losses(routing.counts, routing.prob_sums, lse, lb_coef, z_coef)
    return _AuxLossFn.apply(routing.counts, routing.prob_sums, lse, routing.ids, routing.weights, lb_coef, z_coef)


class _AuxLossFn(torch.autograd.Function):
    """(loss, stats) from launchers.router_aux_loss; backward: d loss / d prob_sums_e =
    lb_coef * E * counts_e / T^2 and d loss / d lse_t = 2 * z_coef * lse_t / T."""

    @staticmethod
    def forward(ctx, counts, prob_sums, lse, ids, weights, lb_coef, z_coef):
        loss, stats, _ = launchers.router_aux_loss(ids, weights, launchers.RouterAux(counts, prob_sums, lse, lb_coef,
                                                                                     z_coef))
        ctx.save_for_backward(counts, lse)
        ctx.coefs = (lb_coef, z_coef)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # stats get no zero gradient
        return loss, stats

    @staticmethod
    def backward(ctx, g, _):
        refuse_double_backward("the aux loss")
        if g is None:
            return (None,) * 7
        counts, lse = ctx.saved_tensors
        g_prob_sums, g_lse = launchers.router_aux_loss_backward(g, counts, lse, *ctx.coefs)
        return None, g_prob_sums, g_lse, None, None, None, None
