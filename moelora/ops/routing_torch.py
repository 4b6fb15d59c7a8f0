"""PyTorch fallbacks (and references) of the ``moelora._C`` routing and dispatch ops.

Same contracts as the native ops, argument for argument:
  router_topk(logits [T, E], top_k, mode, renormalize)
      -> weights [T, k] acc, ids [T, k] int32, counts [E] int64, prob_sums [E] acc, lse [T] acc
  dispatch_metadata(topk_ids [T, k], E, block_size) -> 8 tensors (see moelora.ops.routing)
  dispatch(x [T, d], sorted_pairs [P], inverse [T, k], weights [T, k] | None) -> [P, d]
  combine(y [P, d], sorted_pairs [P], inverse [T, k], weights [T, k] | None) -> [T, d]
  pair_dot(a [T, d], b [P, d], sorted_pairs [P], inverse [T, k]) -> [T, k] acc
(acc = float64 for float64 data, float32 otherwise). Integer outputs, dispatch and combine
equal the C++ CPU kernels bitwise; router floats and pair_dot agree to rounding. No host
synchronisation: every shape follows from input shapes. A router row with +inf logits gets
the softmax's limit: probability split equally over its +inf entries, lse = +inf.
"""

from __future__ import annotations

import torch

from moelora.ops import native
from moelora.kernels.launchers import accumulator_dtype

SOFTMAX_TOPK, TOPK_SOFTMAX = 0, 1
INF = float("inf")


def check_block_size(block_size: int) -> None:
    """block_size (of the padded layout) in [1, MAX_BLOCK_SIZE]: keeps every padded offset in int64."""
    if not 1 <= block_size <= native.MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be in [1, {native.MAX_BLOCK_SIZE}] (or None: no padding), got {block_size}")


def padded_length(num_pairs, num_experts: int, block_size: int):
    """Rows of the padded layout: T*k + E*(block_size-1), rounded up to a multiple of block_size."""
    check_block_size(block_size)
    raw = num_pairs + num_experts * (block_size - 1)
    return (raw + block_size - 1) // block_size * block_size


def clean_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits in the accumulation dtype with NaN replaced by -inf."""
    x = logits.to(accumulator_dtype(logits.dtype))
    return torch.where(torch.isnan(x), torch.full_like(x, -INF), x)


def shifted_exp(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(x - m) for row maxima m, with the limit 1 (x = +inf) / 0 (else) on rows where m = +inf."""
    infinite = m == INF
    limit = (x == INF).to(x.dtype)
    return torch.where(infinite, limit, torch.exp(x - torch.where(m.abs() == INF, torch.zeros_like(m), m)))


def softmax_stats(x: torch.Tensor):
    """(probs, lse, masked) of cleaned logits; a row of only -inf has probs 0 and lse -inf; a
    row with +inf logits has equal probabilities on those (0 elsewhere) and lse +inf."""
    m = x.amax(-1, keepdim=True)
    masked = m == -INF
    ex = shifted_exp(x, m)
    # s = 1 on rows of only -inf (their branch is not taken): no 0 / 0 nor log 0 whose gradient, 0 * inf, would
    # make a double backward (create_graph) NaN there
    s = torch.where(masked, torch.ones_like(m), ex.sum(-1, keepdim=True))
    lse = torch.where(masked | (m == INF), m, m + torch.log(s)).squeeze(-1)
    probs = torch.where(masked, torch.zeros_like(ex), ex / s)
    return probs, lse, masked


def router_topk(logits: torch.Tensor, top_k: int, mode: int, renormalize: bool):
    num_experts = logits.shape[1]
    x = clean_logits(logits)
    probs, lse, masked = softmax_stats(x)
    ids = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :top_k]
    if mode == SOFTMAX_TOPK:
        weights = probs.gather(1, ids)
    else:
        sel = x.gather(1, ids)
        top = sel[:, :1]
        weights = torch.where(top == -INF, torch.zeros_like(sel), shifted_exp(sel, top))
    if renormalize or mode == TOPK_SOFTMAX:
        total = weights.sum(-1, keepdim=True)
        weights = torch.where(total > 0, weights / total, torch.zeros_like(weights))
    flat = ids.reshape(-1)
    # out of place: torch.func.vmap (of forward-mode AD, which runs this formula) cannot add batched ids into the
    # unbatched zeros in place
    counts = torch.zeros(num_experts, dtype=torch.int64, device=logits.device).index_add(
        0, flat, torch.ones_like(flat))
    return weights, ids.to(torch.int32), counts, probs.sum(0), lse


def dispatch_metadata(topk_ids: torch.Tensor, num_experts: int, block_size: int):
    T, k = topk_ids.shape
    n = T * k
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))  # invalid ids: bucket E
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev).index_add_(
        0, key, torch.ones_like(key))[:num_experts]
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    arange = torch.arange(n, dtype=torch.int64, device=dev)
    sorted_pairs = torch.where(arange < offsets[-1], order, torch.full_like(order, -1))
    pos = torch.empty_like(order).scatter_(0, order, arange)
    inverse = torch.where(valid, pos, torch.full_like(pos, -1)).view(T, k)
    if block_size <= 0:
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        return (counts, offsets, sorted_pairs, inverse, empty, empty.clone(), empty.view(0, 0),
                torch.empty(0, dtype=torch.int32, device=dev))
    max_padded = padded_length(n, num_experts, block_size)
    padded_counts = (counts + block_size - 1) // block_size * block_size
    padded_offsets = torch.cat([counts.new_zeros(1), torch.cumsum(padded_counts, 0)])
    e = key.clamp(max=num_experts - 1)
    ppos = padded_offsets[e] + (pos - offsets[e])
    ppos = torch.where(valid, ppos, torch.full_like(ppos, max_padded))  # invalid -> spare slot
    sorted_padded = torch.full((max_padded + 1,), -1, dtype=torch.int64, device=dev)
    sorted_padded = sorted_padded.scatter_(0, ppos, arange)[:max_padded]
    inverse_padded = torch.where(valid, ppos, torch.full_like(ppos, -1)).view(T, k)
    starts = torch.arange(max_padded // block_size, dtype=torch.int64, device=dev) * block_size
    block_expert = torch.searchsorted(padded_offsets, starts, right=True) - 1
    block_expert = torch.where(starts < padded_offsets[-1], block_expert, torch.full_like(block_expert, -1))
    return (counts, offsets, sorted_pairs, inverse, padded_offsets, sorted_padded, inverse_padded,
            block_expert.to(torch.int32))


def dispatch(x, sorted_pairs, inverse, weights):
    n = inverse.numel()
    k = inverse.shape[1]
    valid = (sorted_pairs >= 0) & (sorted_pairs < n)
    p = torch.where(valid, sorted_pairs, torch.zeros_like(sorted_pairs))
    if n == 0:
        return x.new_zeros(sorted_pairs.shape[0], x.shape[1])
    rows = x.index_select(0, p // k)
    if weights is not None:
        acc = accumulator_dtype(x.dtype)
        rows = (weights.reshape(-1).to(acc)[p].unsqueeze(1) * rows.to(acc)).to(x.dtype)
    return torch.where(valid.unsqueeze(1), rows, torch.zeros((), dtype=x.dtype, device=x.device))


def combine(y, sorted_pairs, inverse, weights):
    acc = accumulator_dtype(y.dtype)
    T, k = inverse.shape
    P = y.shape[0]
    out = torch.zeros(T, y.shape[1], dtype=acc, device=y.device)
    if P == 0:
        return out.to(y.dtype)
    zero = torch.zeros((), dtype=acc, device=y.device)
    for j in range(k):
        pos = inverse[:, j]
        valid = (pos >= 0) & (pos < P)
        rows = y.index_select(0, torch.where(valid, pos, torch.zeros_like(pos))).to(acc)
        term = rows if weights is None else weights[:, j].to(acc).unsqueeze(1) * rows
        out = out + torch.where(valid.unsqueeze(1), term, zero)
    return out.to(y.dtype)


def pair_dot(a, b, sorted_pairs, inverse):
    acc = accumulator_dtype(a.dtype)
    T, k = inverse.shape
    P = b.shape[0]
    if P == 0:
        return torch.zeros(T, k, dtype=acc, device=a.device)
    pos = inverse.reshape(-1)
    valid = (pos >= 0) & (pos < P)
    # [T, k, d] spelled out: view(T, k, -1) fails for T = 0 (a padded layout has rows then).
    rows = b.index_select(0, torch.where(valid, pos, torch.zeros_like(pos))).to(acc).view(T, k, b.shape[1])
    dots = (a.to(acc).unsqueeze(1) * rows).sum(-1)
    return torch.where(valid.view(T, k), dots, torch.zeros((), dtype=acc, device=a.device))
