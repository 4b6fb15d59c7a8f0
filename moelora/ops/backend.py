"""Which backend runs: the user's choice (moelora.switches: ``use_backend``, MOELORA_BACKEND, a
``backend=`` argument) against what the device allows (Triton on CUDA tensors, or on CPU
tensors under ``TRITON_INTERPRET=1``), and how torch.autocast reaches the ops."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from moelora.kernels.launchers import interpreting  # triton itself is a dependency
from moelora.ops.validation import fake_mode_active
from moelora.switches import BACKENDS, current_backend


def resolve_backend(requested: Optional[str], device: torch.device) -> str:
    """The backend that will run for tensors on ``device`` ("torch" or "triton"): ``requested`` (a ``backend=``
    argument: "auto", "torch" or "triton"), or where None the switch's (:func:`moelora.use_backend`,
    MOELORA_BACKEND); "auto" is "triton" where it can run. ValueError for another name, or "triton" where it
    cannot run."""
    name = requested if requested is not None else current_backend()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    triton_can_run = _triton_can_run(device)
    if name == "auto":
        return "triton" if triton_can_run else "torch"
    if name == "triton" and not triton_can_run:
        if fake_mode_active():
            raise ValueError("backend='triton' runs no kernel under a FakeTensorMode (fake tensors hold no values): "
                             "use backend='auto' or 'torch' there, or torch.compile, whose graphs take the Triton "
                             "backend's shapes from its fake implementations")
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
            f"for CPU tensors); got tensors on {device}")
    return name


def check_triton_op_device(op: str, device: torch.device) -> None:
    """ValueError where the Triton backend's custom op ``moelora::<op>``, which torch.export and torch.compile record,
    runs on tensors its kernels cannot take: CPU tensors outside the interpreter (a program exported on the Triton
    backend and run on the CPU; triton raised "0 active drivers ([]). There should only be one")."""
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"moelora::{op} is the Triton backend's op and needs CUDA tensors (or TRITON_INTERPRET=1 for "
                         f"CPU tensors); got tensors on {device}: a program that runs on the CPU is exported on the "
                         "torch backend (moelora.use_backend('torch') or MOELORA_BACKEND=torch)")


def kernels_run(device: torch.device) -> bool:
    """Whether moelora's own code paths take the Triton kernels for tensors on ``device``: the
    Triton backend can run there (:func:`resolve_backend` "auto") and is not switched off."""
    return current_backend() != "torch" and _triton_can_run(device)


def _triton_can_run(device: torch.device) -> bool:
    """CUDA tensors, or CPU tensors under the interpreter (not meta tensors, which hold no values), outside a
    FakeTensorMode (whose tensors hold none either: an eager forward under it, as memory and FLOP estimators
    run, takes the PyTorch ops' shapes; torch.compile, which traces under one, takes the Triton backend's
    custom ops and their fake implementations)."""
    return (device.type == "cuda" or (device.type == "cpu" and interpreting())) and not fake_mode_active()


_AUTOCAST_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Devices autocast knows (asked of torch.is_autocast_enabled, which raises for others such as
# meta; torch.amp.is_autocast_available would say, but dynamo 2.11 cannot trace it).
_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")
# Whether autocast is on for any device (torch's own check, which dynamo traces; the per-device
# check below where a torch lacks it): the common case, autocast off, skips x's device.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_dtype(x) -> Optional[torch.dtype]:
    """autocast's dtype where torch.autocast is on for the device of the tensor ``x``, else None
    (also for an ``x`` that is no tensor: the op's checks refuse it). The ops then cast with
    :func:`autocast_input` what F.linear's autocast would cast (x, base_out and the weights x is
    multiplied by: moe_lora's A and B, the fused layer's frozen weight and bias, moe_ffn's expert
    weights), check and run without autocast; the fused layer leaves its adapters and router
    weight as they are (its kernels round them in registers). fp32 parameters get fp32
    gradients, through the casts' backward."""
    if not _any_autocast() or not isinstance(x, torch.Tensor):  # the first: a tenth of a microsecond
        return None
    device_type = x.device.type
    if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_input(t, dtype: torch.dtype):
    """``t`` as torch.autocast hands it to a matmul running in ``dtype``: a float32, float16 or
    bfloat16 tensor cast to it; anything else (float64, integers, None) as it is."""
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_FLOATS else t


def without_autocast(x):
    """A context in which ops on ``x`` run without torch.autocast (a null context where autocast is
    off for x's device): for what moelora computes in its own precision whatever autocast says
    (the routers' fp32 logits, as the fused layer's kernels compute them)."""
    if autocast_dtype(x) is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)
