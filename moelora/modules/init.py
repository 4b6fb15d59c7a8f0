"""Initialisation shared by modules that hold nn.Linear-shaped tensors without being nn.Linear
(MoEFFN's experts, MoLEx's linear gate), so that their ``reset_parameters`` draws what an
``nn.Linear`` of that shape would, in its order."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

try:
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # torch built without torch.distributed
    DTensor = None


@torch.no_grad()
def reset_like_linear(weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    """nn.Linear's init of ``weight`` [d_out, d_in] and ``bias`` [d_out] in place: weight
    kaiming-uniform (a = sqrt(5)), then bias U(-1/sqrt(d_in), 1/sqrt(d_in)) (the same draws)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


@torch.no_grad()
def kaiming_uniform_per_matrix_(t: torch.Tensor) -> None:
    """``nn.init.kaiming_uniform_(m, a=sqrt(5))`` of every matrix ``m`` of ``t`` [..., rows, cols]
    (fan_in = cols), in one draw over the whole tensor: the same values on the CPU as a loop over
    the matrices, and it works where the matrices cannot be taken one by one (an FSDP2 ``DTensor``
    sharded over the expert dim, whose slices along it are not addressable)."""
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    fan_in = t.shape[-1]
    bound = gain * math.sqrt(3.0 / fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(t, -bound, bound)


def local_experts(t: torch.Tensor) -> List[Tuple[int, torch.Tensor, tuple]]:
    """[(e, the part of expert ``t[e]`` held here, its slices of ``t[e]``)] for the experts of ``t``
    [E, ...] held here: all of them, whole, for a plain tensor; for a ``DTensor`` (FSDP2's
    ``fully_shard`` shards dim 0) those of its local shard, so that in-place writes by expert reach
    its storage (DTensor indexing along a sharded dim writes a redistributed copy: silently nothing)."""
    if DTensor is None or not isinstance(t, DTensor):
        return [(e, t[e], (slice(None),) * (t.dim() - 1)) for e in range(t.shape[0])]
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = t.to_local()
    region = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:]))
    return [(offset[0] + i, local[i], region) for i in range(shape[0])]


def zero_expert_(t: torch.Tensor, e: int) -> None:
    """``t[e].zero_()`` (``e`` may be negative) for a plain tensor or a sharded ``DTensor`` (:func:`local_experts`)."""
    e %= t.shape[0]
    for index, part, _ in local_experts(t):
        if index == e:
            part.zero_()


@torch.no_grad()
def copy_to_every_expert_(t: torch.Tensor, value: torch.Tensor) -> None:
    """``t[e] = value`` for every expert e of ``t`` [E, ...] (``value``: a plain tensor of one expert's
    shape); a ``DTensor``'s experts get the ``value`` of the first rank of its mesh (the same copy on
    every rank, however each one seeded its generator)."""
    if DTensor is not None and isinstance(t, DTensor):
        value = distribute_tensor(value, t.device_mesh, [Replicate()] * t.device_mesh.ndim).to_local()
    for _, part, region in local_experts(t):
        part.copy_(value[region])
