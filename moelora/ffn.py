"""The routed expert FFN of an MoE block (sparse upcycling), as one functional operator.

    ffn_e(x)     = W_out[e] act(W_in[e] x + b_in[e]) + b_out[e]
                   (gated MLPs: W_out[e] (act(W_gate[e] x + b_gate[e]) * (W_in[e] x + b_in[e])) + b_out[e])
    moe_ffn(x)[t] = sum_j w[t,j] ffn_{e[t,j]}(x[t])

Slots with weight 0 (dropped by threshold routing) are skipped. Ids outside [0, E) raise
(moelora.validation on, the default; one host read) or, with validation off, are skipped.
With ``normalize=True`` the kept weights are divided by their sum and the mixture is
evaluated as ``y_0 + sum_j w_j (y_j - y_0)`` (y_0: the first slot's expert output), equal
to ``sum_j w_j y_j`` because the weights sum to one; identical experts (a freshly upcycled
FFN) then reproduce the original FFN bit for bit instead of up to the rounding of a
weighted sum. A token whose slots were all dropped gets 0; kept weights that sum to zero
or less cannot be normalised and raise ValueError (moelora.validation on; with it off that
token's output is meaningless, typically inf).

Backends (as :func:`moelora.moe_lora`): ``triton`` sorts the pairs by expert with the
dispatch metadata of moelora._C and runs each projection as one grouped GEMM that gathers
its rows in the prologue and adds the bias in the epilogue (moelora._grouped_linear), with
no host synchronisation; ``torch`` gathers the rows in expert order (moelora.dispatch's op) and
runs one matmul chain per expert segment (one host synchronisation: the segment sizes).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .functional import resolve_backend
from ._validation import check_moe_ffn_args, check_routing_values
from .routing import dispatch_rows, expert_layout


def _check_ffn_args(x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, activation, normalize):
    check_moe_ffn_args(x, topk_ids, topk_weights, dict(w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out,
                                                       w_gate=w_gate, b_gate=b_gate), activation, normalize)
    if x.dim() != 2:
        raise ValueError(f"x must have shape [T, d_in], got {tuple(x.shape)}")
    if w_in.dim() != 3 or w_in.shape[2] != x.shape[1]:
        raise ValueError(f"w_in must have shape [E, d_ff, d_in = {x.shape[1]}], got {tuple(w_in.shape)}")
    num_experts, d_ff = w_in.shape[:2]
    if w_out.dim() != 3 or w_out.shape[0] != num_experts or w_out.shape[2] != d_ff:
        raise ValueError(f"w_out must have shape [E = {num_experts}, d_out, d_ff = {d_ff}], got {tuple(w_out.shape)}")
    if w_gate is not None and tuple(w_gate.shape) != tuple(w_in.shape):
        raise ValueError(f"w_gate must have w_in's shape {tuple(w_in.shape)}, got {tuple(w_gate.shape)}")
    for name, bias, rows in (("b_in", b_in, d_ff), ("b_gate", b_gate, d_ff), ("b_out", b_out, w_out.shape[1])):
        if bias is not None and tuple(bias.shape) != (num_experts, rows):
            raise ValueError(f"{name} must have shape [{num_experts}, {rows}], got {tuple(bias.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_ids and topk_weights must both have shape [T = {x.shape[0]}, k], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    check_routing_values(topk_ids, topk_weights, num_experts, positive_kept_sums=normalize)


def _experts_triton(x, ids, w_in, b_in, w_out, b_out, activation, w_gate, b_gate):
    """Pair-major [T*k, d_out] expert outputs from grouped GEMMs (zero rows for skipped pairs)."""
    from ._grouped_linear import grouped_linear, pair_layout

    meta = pair_layout(ids, w_in.shape[0])
    h = grouped_linear(x, w_in, b_in, meta, ids, by_token=True)
    if w_gate is None:
        h = activation(h)
    else:
        h = activation(grouped_linear(x, w_gate, b_gate, meta, ids, by_token=True)) * h
    return grouped_linear(h, w_out, b_out, meta, ids, by_token=False)


def _experts_torch(x, ids, w_in, b_in, w_out, b_out, activation, w_gate, b_gate):
    """Pair-major [T*k, d_out] expert outputs from one matmul chain per expert segment."""
    num_experts = w_in.shape[0]
    meta = expert_layout(ids, num_experts, None)
    rows = dispatch_rows(x, meta)  # [T*k, d_in], expert-sorted, skipped pairs last
    segments = []
    bounds = meta.offsets.tolist()  # the one host synchronisation of this path
    for e in range(num_experts):
        seg = rows[bounds[e]:bounds[e + 1]]
        if seg.shape[0] == 0:
            continue
        h = F.linear(seg, w_in[e], None if b_in is None else b_in[e])
        if w_gate is None:
            h = activation(h)
        else:
            h = activation(F.linear(seg, w_gate[e], None if b_gate is None else b_gate[e])) * h
        segments.append(F.linear(h, w_out[e], None if b_out is None else b_out[e]))
    skipped = rows.shape[0] - bounds[-1]
    sorted_out = torch.cat(segments + [x.new_zeros(skipped, w_out.shape[1])])
    position = meta.inverse.reshape(-1)
    kept = position >= 0
    pairs = sorted_out.index_select(0, torch.where(kept, position, 0))
    return torch.where(kept[:, None], pairs, 0)


def mix_experts(pairs: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """[T, d] from expert outputs [T, k, d] (zero for skipped slots) and their weights [T, k]
    (zero for skipped slots); fixed slot order, accumulated in fp32 (fp64 for fp64 data)."""
    acc = torch.float64 if pairs.dtype == torch.float64 else torch.float32
    w = weights.to(acc)
    if not normalize:
        return (w.unsqueeze(-1) * pairs).sum(1).to(pairs.dtype)
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)  # all skipped: w stays 0
    first = pairs[:, :1]
    return (first.squeeze(1) + (w.unsqueeze(-1) * (pairs - first)).sum(1)).to(pairs.dtype)


def moe_ffn(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_in: torch.Tensor,
            b_in: Optional[torch.Tensor], w_out: torch.Tensor, b_out: Optional[torch.Tensor],
            activation: Callable, w_gate: Optional[torch.Tensor] = None, b_gate: Optional[torch.Tensor] = None,
            *, normalize: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Routed expert FFNs on x [T, d_in] with expert weights stacked on dim 0 (nn.Linear
    layouts: w_in/w_gate [E, d_ff, d_in], w_out [E, d_out, d_ff]); returns [T, d_out] in
    x's dtype, differentiable w.r.t. x, every weight and bias, and topk_weights. See the
    module docstring for ``normalize`` and ``backend``.
    """
    _check_ffn_args(x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, activation, normalize)
    num_tokens, top_k = topk_ids.shape
    num_experts = w_in.shape[0]
    kept = (topk_weights != 0) & (topk_ids >= 0) & (topk_ids < num_experts)
    ids = torch.where(kept, topk_ids, -1)
    weights = torch.where(kept, topk_weights, 0)
    use_triton = resolve_backend(backend, x.device) == "triton" and num_tokens > 0
    experts = _experts_triton if use_triton else _experts_torch
    pairs = experts(x, ids, w_in, b_in, w_out, b_out, activation, w_gate, b_gate)
    return mix_experts(pairs.view(num_tokens, top_k, w_out.shape[1]), weights, normalize)
