"""Random input sets: realistic routing and fresh (never zero) tensors.

Each set is a dict of tensors; the trainable leaves (x, lora weights, gate weights,
FFN expert weights) require grad. Several independent sets are made per case and cycled
through, so that no iteration is served from L2 by the previous one.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch

from .shapes import Shape

SEQUENCE_LEN = 512  # task routing: one task per sequence of this many tokens


def topk_routing(tokens: int, experts: int, top_k: int, device, generator=None):
    """ids: top-k of softmax of random logits (distinct per token); weights renormalised (fp32)."""
    logits = torch.randn(tokens, experts, device=device, generator=generator)
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids.to(torch.int32), weights.float()


def task_routing(tokens: int, tasks: int, device, generator=None, sequence_len: int = SEQUENCE_LEN):
    """k = 1: id = task of the token's sequence (of ``sequence_len`` tokens), weight = per-task gamma (non-zero)."""
    sequences = math.ceil(tokens / sequence_len)
    seq_task = torch.randint(0, tasks, (sequences,), device=device, generator=generator)
    ids = seq_task.repeat_interleave(sequence_len)[:tokens]
    gamma = 0.5 + torch.rand(tasks, device=device, generator=generator)
    return ids[:, None].to(torch.int32), gamma[ids][:, None].float()


def _param(shape, fan_in: int, dtype, device, generator) -> torch.Tensor:
    t = torch.randn(*shape, device=device, dtype=torch.float32, generator=generator) / math.sqrt(fan_in)
    return t.to(dtype).requires_grad_(True)


def make_set(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    T, E, k = shape.tokens, shape.experts, shape.top_k
    if shape.routing == "task":
        ids, w = task_routing(T, E, device, g, shape.sequence_len)
    else:
        ids, w = topk_routing(T, E, k, device, g)
    s = {
        "x": torch.randn(T, shape.d_in, device=device, dtype=torch.float32, generator=g).to(dtype).requires_grad_(True),
        "ids": ids,
        "w": w.requires_grad_(True),
        "grad_out": torch.randn(T, shape.d_out, device=device, dtype=torch.float32, generator=g).to(dtype),
    }
    if shape.kind == "ffn":
        s["w13"] = _param((E, 2 * shape.d_ff, shape.d_in), shape.d_in, dtype, device, g)
        s["w2"] = _param((E, shape.d_out, shape.d_ff), shape.d_ff, dtype, device, g)
        return s
    r = shape.rank
    a_shape = (r, shape.d_in) if shape.shared_a else (E, r, shape.d_in)
    s["a"] = _param(a_shape, shape.d_in, dtype, device, g)
    s["b"] = _param((E, shape.d_out, r), r, dtype, device, g)
    if shape.layer:
        # frozen base weight of the whole-layer case
        s["w0"] = _param((shape.d_out, shape.d_in), shape.d_in, dtype, device, g).requires_grad_(False)
    return s


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """The bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


def set_bytes(s: Dict[str, torch.Tensor]) -> int:
    return tensor_bytes(*s.values())


def make_sets(shape: Shape, dtype, device, count: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    return [make_set(shape, dtype, device, seed + 1000 * i) for i in range(count)]


def rotation_count(shape: Shape, dtype, device: torch.device, minimum: int = 2, maximum: int = 16) -> int:
    """Enough sets that a full cycle touches at least 3x the L2 cache (GPU) or 2 sets (CPU)."""
    if device.type != "cuda":
        return minimum
    probe = make_set(shape.with_tokens(min(shape.tokens, 64)), dtype, device, 0)
    per_token = (probe["x"].element_size() * (shape.d_in + shape.d_out))
    weights = set_bytes({k: v for k, v in probe.items() if k not in ("x", "grad_out", "ids", "w")})
    one_set = shape.tokens * per_token + weights
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(minimum, min(maximum, math.ceil(3 * l2 / max(one_set, 1))))
