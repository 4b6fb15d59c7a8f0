"""Fused MoE routing and token dispatch / combine (public API).

    route(logits [..., E], top_k)            -> RouteResult(weights, ids, counts, prob_sums, lse)
    dispatch_metadata(topk_ids [T, k], E)    -> DispatchMetadata (stable expert-sorted pair order)
    dispatch(x [T, d], meta)                 -> x rows in expert-sorted order [T*k or max_padded, d]
    combine(y_sorted, meta, topk_weights)    -> [T, d], out[t] = sum_j w[t,j] * y_sorted[pos(t,j)]

A pair is p = t*k + j (token t, slot j). Everything runs in moelora._C (C++ on CPU, CUDA
kernels on GPU) when it is built, else in the PyTorch fallbacks (moelora.ops.routing_torch);
every path is deterministic and free of host synchronisation, except the optional range
checks of moelora.validation (on by default; skipped under torch.compile and CUDA-graph
capture, as every syncing check of moelora: moelora.ops.validation.syncing_checks_enabled).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch

from moelora.ops import native
from moelora.ops import routing_autograd as _ag
from moelora.ops import routing_torch as _fb
from moelora.ops.validation import check_top_k, host_values, syncing_checks_enabled

MODES = {"softmax_topk": _fb.SOFTMAX_TOPK, "topk_softmax": _fb.TOPK_SOFTMAX}
MAX_EXPERTS = native.MAX_EXPERTS
MAX_BLOCK_SIZE = native.MAX_BLOCK_SIZE
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class RouteResult(NamedTuple):
    """Output of route(). acc = float64 for float64 logits, else float32."""

    weights: torch.Tensor  # [..., k] acc: gate weights of the chosen experts, best first
    ids: torch.Tensor  # [..., k] int32: chosen expert ids, distinct per token, in [0, E)
    counts: torch.Tensor  # [E] int64: number of (token, slot) assignments per expert
    prob_sums: torch.Tensor  # [E] acc: sum over tokens of the full softmax probability
    lse: torch.Tensor  # [...] acc: logsumexp of each token's logits (router z-loss)


class DispatchMetadata(NamedTuple):
    """Expert-sorted layout of the pairs p = t*k + j. Ids outside [0, E) are in no bucket.

    counts [E] int64, offsets [E+1] int64 (exclusive prefix of counts),
    sorted_pairs [T*k] int64: the pairs of expert e, increasing p, at offsets[e]:offsets[e+1];
        -1 from offsets[E] on (slots of invalid ids),
    inverse [T, k] int64: position of pair (t, j) in sorted_pairs, -1 for invalid ids.
    With block_size (each expert's segment padded to a multiple of it):
    padded_offsets [E+1] int64, sorted_pairs_padded [max_padded] int64 (-1 in the padding),
    inverse_padded [T, k] int64, block_expert [max_padded / block_size] int32 (-1: unused),
    max_padded = ceil((T*k + E*(block_size-1)) / block_size) * block_size; else None.
    """

    num_experts: int
    top_k: int
    block_size: Optional[int]
    counts: torch.Tensor
    offsets: torch.Tensor
    sorted_pairs: torch.Tensor
    inverse: torch.Tensor
    padded_offsets: Optional[torch.Tensor]
    sorted_pairs_padded: Optional[torch.Tensor]
    inverse_padded: Optional[torch.Tensor]
    block_expert: Optional[torch.Tensor]

    @property
    def layout(self):
        """(sorted_pairs, inverse) of the layout dispatch/combine use: padded iff block_size."""
        if self.block_size is None:
            return self.sorted_pairs, self.inverse
        return self.sorted_pairs_padded, self.inverse_padded


def _ops(device: torch.device):
    return _ag.NATIVE_OPS if native.use_native(device) else _ag.FALLBACK_OPS


def _require(name, value, kind=torch.Tensor):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{name} must be {'a torch.Tensor' if kind is torch.Tensor else kind.__name__}, "
                        f"got {type(value).__name__}")
    return value


def _check_float(name, t):
    _require(name, t)
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_experts(num_experts, name="num_experts"):
    _require(name, num_experts, int)
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"{name} must be in [1, {MAX_EXPERTS}], got {num_experts}")


def route(logits: torch.Tensor, top_k: int, mode: str = "softmax_topk", renormalize: bool = False) -> RouteResult:
    """Fused router: softmax statistics, top-k ids and gate weights in one pass over the logits.

    ``logits`` [..., E] (float), ``top_k`` in [1, E]; returns a :class:`RouteResult`: ``weights`` and
    ``ids`` [..., top_k] (ids int32), ``counts`` and ``prob_sums`` [E] over all tokens, ``lse`` [...].
    mode "softmax_topk": weights = softmax(logits)[ids], divided by their sum if renormalize
    (MoSLD / MoLA); "topk_softmax": weights = softmax over the chosen logits (Mixtral, MoLEx;
    renormalize changes nothing). Experts are chosen on the logits (maths in fp32, fp64 for
    fp64 logits), ties to the lower index; NaN logits count as -inf, so ids are always valid
    and distinct (a row of only NaN/-inf gets ids 0..k-1, weights 0, lse -inf). A row with
    +inf logits gets the softmax's limit: probability 1/n on each of its n +inf entries, 0
    elsewhere, lse = +inf (weights and prob_sums stay finite). Gradients flow to logits
    from weights, prob_sums and lse (on a +inf row: those of the limit, finite, on every path).
    """
    _check_float("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have shape [..., E], got a 0-d tensor")
    _check_experts(logits.shape[-1], "logits.shape[-1] (the number of experts)")
    num_experts = logits.shape[-1]
    _require("top_k", top_k, int)
    check_top_k(top_k, num_experts)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    _require("renormalize", renormalize, bool)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, num_experts)
    w, ids, counts, prob_sums, lse = _ops(logits.device).router_topk(flat, top_k, MODES[mode], renormalize)
    return RouteResult(w.view(*lead, top_k), ids.view(*lead, top_k), counts, prob_sums, lse.view(lead))


def router_topk(logits: torch.Tensor, top_k: int, mode: str, renormalize: bool):
    """route() on validated [T, E] logits without argument checks, for moelora's own layers:
    (weights, ids, counts, prob_sums, lse) from the native op when built, else the fallback."""
    return _ops(logits.device).router_topk(logits, top_k, MODES[mode], renormalize)


def dispatch_metadata(topk_ids: torch.Tensor, num_experts: int, block_size: Optional[int] = None) -> DispatchMetadata:
    """Stable expert-sorted order of the (token, slot) pairs of ``topk_ids`` [T, k] (int32 or
    int64, 1 <= k <= num_experts <= MAX_EXPERTS = 4096); see DispatchMetadata.
    ``block_size``: None (no padded layout) or an int in [1, MAX_BLOCK_SIZE = 65536].

    With moelora.validation on (default), ids outside [0, num_experts) raise ValueError (one
    device-to-host sync; skipped under torch.compile and CUDA-graph capture); with it off
    they are left out of every bucket.
    """
    _require("topk_ids", topk_ids)
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have shape [T, k] with k >= 1, got {tuple(topk_ids.shape)}")
    _check_experts(num_experts)
    top_k = topk_ids.shape[1]
    check_top_k(top_k, num_experts, "k (topk_ids.shape[1])")
    if block_size is not None:
        _require("block_size", block_size, int)
        _fb.check_block_size(block_size)
    lo, hi = _index_range(topk_ids)
    if lo is not None and (lo < 0 or hi >= num_experts):
        raise ValueError(
            f"topk_ids must lie in [0, {num_experts}), got values in [{lo}, {hi}] "
            "(with moelora.validation(False) such pairs are left out instead)")
    return expert_layout(topk_ids, num_experts, block_size)


def _index_range(index: torch.Tensor):
    """(min, max) of an index tensor read on the host (one copy) when the syncing checks run
    (moelora.ops.validation.syncing_checks_enabled), else (None, None)."""
    if index.numel() == 0 or not syncing_checks_enabled(index):
        return None, None
    return tuple(int(v) for v in host_values(*torch.aminmax(index)))


def expert_layout(topk_ids: torch.Tensor, num_experts: int, block_size: Optional[int]) -> DispatchMetadata:
    """dispatch_metadata without argument checks, for callers that validated already (the
    grouped regime of moelora.moe_lora): native op when built, else the PyTorch fallback."""
    out = _ops(topk_ids.device).dispatch_metadata(topk_ids, num_experts, block_size or 0)
    counts, offsets, sp, inv, po, spp, invp, be = out
    if block_size is None:
        po = spp = invp = be = None
    return DispatchMetadata(num_experts, topk_ids.shape[1], block_size, counts, offsets, sp, inv, po, spp, invp, be)


# The fields of a padded layout that the grouped kernels read: what an op saves of its
# forward's layout for the backward, instead of sorting the pairs again.
LAYOUT_FIELDS = ("counts", "padded_offsets", "sorted_pairs_padded", "inverse_padded", "block_expert")


def layout_tensors(meta: DispatchMetadata) -> List[torch.Tensor]:
    """The LAYOUT_FIELDS of a padded layout, in that order."""
    return [getattr(meta, name) for name in LAYOUT_FIELDS]


def layout_from_tensors(tensors: Sequence[torch.Tensor], num_experts: int, top_k: int,
                        block_size: int) -> DispatchMetadata:
    """The padded layout of :func:`layout_tensors`' tensors (the unpadded fields None)."""
    counts, padded_offsets, sorted_pairs_padded, inverse_padded, block_expert = tensors
    return DispatchMetadata(num_experts, top_k, block_size, counts, None, None, None, padded_offsets,
                            sorted_pairs_padded, inverse_padded, block_expert)


def fake_layout_tensors(like: torch.Tensor, tokens: int, top_k: int, num_experts: int,
                        block_size: int) -> List[torch.Tensor]:
    """Empty tensors shaped as :func:`layout_tensors`' (for the custom ops' fake kernels)."""
    rows = _fb.padded_length(tokens * top_k, num_experts, block_size)
    i64 = dict(dtype=torch.int64)
    return [like.new_empty(num_experts, **i64), like.new_empty(num_experts + 1, **i64), like.new_empty(rows, **i64),
            like.new_empty(tokens, top_k, **i64), like.new_empty(rows // block_size, dtype=torch.int32)]


def _check_meta(meta, device):
    if not isinstance(meta, DispatchMetadata):
        raise TypeError(f"meta must be the DispatchMetadata of dispatch_metadata(), got {type(meta).__name__}")
    sp, inv = meta.layout
    if sp.device != device:
        raise ValueError(f"meta is on {sp.device} but the data is on {device}")
    return sp, inv


def _check_positions(name, index, upper):
    lo, hi = _index_range(index)
    if lo is not None and (lo < -1 or hi >= upper):
        raise ValueError(f"{name} must lie in [-1, {upper}), got values in [{lo}, {hi}]")


def dispatch(x: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
    """Rows of x in expert-sorted order: out[i] = x[p // k] for p = sorted_pairs[i], zero rows
    where p = -1. Shape [T*k, d], or [max_padded, d] when meta has a block_size. Exact copy."""
    _check_float("x", x)
    sp, inv = _check_meta(meta, x.device)
    if x.dim() != 2 or x.shape[0] != inv.shape[0]:
        raise ValueError(f"x must have shape [T, d] with T = {inv.shape[0]}, got {tuple(x.shape)}")
    _check_positions("meta sorted pairs", sp, inv.numel())
    return dispatch_rows(x, meta)


def dispatch_rows(x: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
    """dispatch without argument checks (no host synchronisation), for callers that built
    ``meta`` from ``x``'s routing themselves (moelora.moe_ffn)."""
    sp, inv = meta.layout
    return _ops(x.device).dispatch(x, sp, inv, None)


def combine(y_sorted: torch.Tensor, meta: DispatchMetadata, topk_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """out[t] = sum_{j<k} w[t,j] * y_sorted[pos(t,j)], j in order, fp32 (fp64) accumulation,
    in y_sorted's dtype; pairs whose id was invalid contribute 0; topk_weights [T, k] (any float
    dtype), None means 1. ``meta`` is the DispatchMetadata that ``dispatch`` laid y_sorted's rows
    out with (pos(t, j) its inverse)."""
    _check_float("y_sorted", y_sorted)
    sp, inv = _check_meta(meta, y_sorted.device)
    if y_sorted.dim() != 2 or y_sorted.shape[0] != sp.shape[0]:
        raise ValueError(f"y_sorted must have shape [{sp.shape[0]}, d] (the rows of dispatch), "
                         f"got {tuple(y_sorted.shape)}")
    if topk_weights is not None:
        _check_float("topk_weights", topk_weights)
        if tuple(topk_weights.shape) != tuple(inv.shape):
            raise ValueError(f"topk_weights must have shape {tuple(inv.shape)}, got {tuple(topk_weights.shape)}")
        if topk_weights.device != y_sorted.device:
            raise ValueError(f"topk_weights is on {topk_weights.device} but y_sorted is on {y_sorted.device}")
    _check_positions("meta inverse", inv, y_sorted.shape[0])
    return _ops(y_sorted.device).combine(y_sorted, sp, inv, topk_weights)
