"""Loads the native extension ``moelora._C`` when it was built and says which kernels it has.

``moelora._C`` registers the ops ``torch.ops.moelora.{router_topk, dispatch_metadata,
dispatch, combine, pair_dot}`` with CPU kernels (always) and CUDA kernels (CUDA builds).
Import never fails when the extension is missing (``MOELORA_NO_EXT=1`` builds, or a
broken build): callers then run the PyTorch fallbacks in ``moelora._routing_torch``.

The fallbacks can be forced, e.g. to compare them with the kernels, with
``force_fallback()`` (a context manager) or ``MOELORA_FORCE_FALLBACK=1``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

MAX_EXPERTS = 4096  # must equal moelora::kMaxExperts in csrc/moelora.h

try:
    from . import _C  # noqa: F401  (importing registers the ops)

    HAS_C = True
    WITH_CUDA = bool(_C.WITH_CUDA)
    LOAD_ERROR = None
    if _C.MAX_EXPERTS != MAX_EXPERTS:  # a stale build of other sources: do not trust it
        HAS_C, WITH_CUDA = False, False
        LOAD_ERROR = RuntimeError("moelora._C was built from other sources; rebuild it")
        warnings.warn(str(LOAD_ERROR), RuntimeWarning)
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _C = None
    HAS_C = False
    WITH_CUDA = False
    LOAD_ERROR = exc

_state = threading.local()


def fallback_forced() -> bool:
    """Whether the PyTorch fallbacks are forced (force_fallback block or MOELORA_FORCE_FALLBACK=1)."""
    flag = getattr(_state, "force", None)
    if flag is not None:
        return flag
    return os.environ.get("MOELORA_FORCE_FALLBACK", "0").strip() not in ("0", "", "false", "False")


@contextlib.contextmanager
def force_fallback(enabled: bool = True):
    """Run the PyTorch fallbacks instead of the native kernels inside the block."""
    previous = getattr(_state, "force", None)
    _state.force = bool(enabled)
    try:
        yield
    finally:
        _state.force = previous


def has_cpu_kernels() -> bool:
    """Whether moelora._C is loaded (it always carries the C++ CPU kernels)."""
    return HAS_C


def has_cuda_kernels() -> bool:
    """Whether moelora._C is loaded and was built with its CUDA kernels."""
    return HAS_C and WITH_CUDA


def use_native(device: torch.device) -> bool:
    """Whether tensors on ``device`` go to the native kernels (else to the PyTorch fallbacks)."""
    if fallback_forced():
        return False
    if device.type == "cpu":
        return has_cpu_kernels()
    if device.type == "cuda":
        return has_cuda_kernels()
    return False
