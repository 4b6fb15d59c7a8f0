"""Which backend runs: the user's choice (moelora.switches: ``use_backend``, MOELORA_BACKEND, a
``backend=`` argument) against what the device allows (Triton on CUDA tensors, or on CPU
tensors under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

from typing import Optional

import torch

from moelora.kernels.launchers import interpreting  # triton itself is a dependency
from moelora.switches import BACKENDS, current_backend


def resolve_backend(requested: Optional[str], device: torch.device) -> str:
    """The backend that will run for tensors on ``device`` ("torch" or "triton")."""
    name = requested if requested is not None else current_backend()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    triton_can_run = _triton_can_run(device)
    if name == "auto":
        return "triton" if triton_can_run else "torch"
    if name == "triton" and not triton_can_run:
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
            f"for CPU tensors); got tensors on {device}")
    return name


def kernels_run(device: torch.device) -> bool:
    """Whether moelora's own code paths take the Triton kernels for tensors on ``device``: the
    Triton backend can run there (:func:`resolve_backend` "auto") and is not switched off."""
    return current_backend() != "torch" and _triton_can_run(device)


def _triton_can_run(device: torch.device) -> bool:
    return device.type == "cuda" or interpreting()
