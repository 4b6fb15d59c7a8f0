"""Shared helpers of the routing/dispatch tests: the execution paths and slow, obviously
correct references written with Python loops (independent of moelora's fallbacks)."""

import math

import pytest
import torch

from moelora import switches as _config
from moelora.ops import native as _ext

needs_c = pytest.mark.skipif(not _ext.HAS_C, reason="moelora._C not built (MOELORA_NO_EXT=1)")
needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cuda_kernels()), reason="needs a GPU and moelora._C CUDA kernels")

# "native": moelora._C kernels; "fallback": the PyTorch fallbacks (forced).
PATHS = [pytest.param("native", marks=needs_c), "fallback"]


def run_path(path, fn, *args, **kwargs):
    with _config.force_fallback(path == "fallback"):
        return fn(*args, **kwargs)


def route_reference(logits, top_k, mode, renormalize):
    """Row by row in float64: NaN -> -inf, ids sorted by (-logit, index); a row with +inf
    logits takes the softmax's limit (equal probabilities on the +inf entries, lse +inf)."""
    T, E = logits.shape
    x = logits.double().tolist()
    weights, ids, lses = [], [], []
    probs_all = []
    for row in x:
        v = [float("-inf") if math.isnan(a) else a for a in row]
        m = max(v)
        if m == float("-inf"):
            p = [0.0] * E
            lse = float("-inf")
        elif m == float("inf"):
            n_inf = sum(a == m for a in v)
            p = [1.0 / n_inf if a == m else 0.0 for a in v]
            lse = m
        else:
            s = sum(math.exp(a - m) for a in v)
            p = [math.exp(a - m) / s for a in v]
            lse = m + math.log(s)
        order = sorted(range(E), key=lambda e: (-v[e], e))[:top_k]
        if mode == "softmax_topk":
            w = [p[e] for e in order]
        else:
            top = v[order[0]]
            if top == float("inf"):
                w = [1.0 if v[e] == top else 0.0 for e in order]
            else:
                w = [0.0 if top == float("-inf") else math.exp(v[e] - top) for e in order]
        if renormalize or mode == "topk_softmax":
            tot = sum(w)
            w = [a / tot if tot > 0 else 0.0 for a in w]
        weights.append(w)
        ids.append(order)
        lses.append(lse)
        probs_all.append(p)
    counts = [0] * E
    for row in ids:
        for e in row:
            counts[e] += 1
    prob_sums = [sum(p[e] for p in probs_all) for e in range(E)]
    as_t = lambda v, dt: torch.tensor(v, dtype=dt).reshape(-1) if len(v) == 0 else torch.tensor(v, dtype=dt)
    return (as_t(weights, torch.float64).reshape(T, top_k), as_t(ids, torch.int64).reshape(T, top_k),
            torch.tensor(counts, dtype=torch.int64), torch.tensor(prob_sums, dtype=torch.float64),
            as_t(lses, torch.float64).reshape(T))


def metadata_reference(topk_ids, num_experts, block_size):
    """Python-loop stable counting sort; returns a dict of the DispatchMetadata fields."""
    T, k = topk_ids.shape
    ids = topk_ids.reshape(-1).tolist()
    n = len(ids)
    counts = [sum(1 for e in ids if e == x) for x in range(num_experts)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    order = sorted((p for p in range(n) if 0 <= ids[p] < num_experts), key=lambda p: (ids[p], p))
    sorted_pairs = order + [-1] * (n - len(order))
    inverse = [-1] * n
    for pos, p in enumerate(order):
        inverse[p] = pos
    out = dict(counts=counts, offsets=offsets, sorted_pairs=sorted_pairs, inverse=inverse)
    if block_size is not None:
        po = [0]
        for c in counts:
            po.append(po[-1] + (c + block_size - 1) // block_size * block_size)
        max_padded = (n + num_experts * (block_size - 1) + block_size - 1) // block_size * block_size
        spp = [-1] * max_padded
        invp = [-1] * n
        for p in order:
            e = ids[p]
            ppos = po[e] + inverse[p] - offsets[e]
            spp[ppos] = p
            invp[p] = ppos
        be = [-1] * (max_padded // block_size)
        for e in range(num_experts):
            for b in range(po[e] // block_size, po[e + 1] // block_size):
                be[b] = e
        out.update(padded_offsets=po, sorted_pairs_padded=spp, inverse_padded=invp, block_expert=be)
    return out
