"""Initialisation shared by modules that hold nn.Linear-shaped tensors without being nn.Linear
(MoEFFN's experts, MoLEx's linear gate), so that their ``reset_parameters`` draws what an
``nn.Linear`` of that shape would, in its order."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn


@torch.no_grad()
def reset_like_linear(weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    """nn.Linear's init of ``weight`` [d_out, d_in] and ``bias`` [d_out] in place: weight
    kaiming-uniform (a = sqrt(5)), then bias U(-1/sqrt(d_in), 1/sqrt(d_in)) (the same draws)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)
