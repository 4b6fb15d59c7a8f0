"""Loads the native extension ``moelora._C`` when it was built and says which kernels it has.

``moelora._C`` registers the ops ``torch.ops.moelora.{router_topk, dispatch_metadata,
dispatch, combine, pair_dot}`` with CPU kernels (always) and CUDA kernels (CUDA builds).
Import never fails when the extension is missing (``MOELORA_NO_EXT=1`` builds, or a
broken build): callers then run the PyTorch fallbacks in ``moelora.ops.routing_torch``.

An extension that carries its own static copy of the C++ runtime (see
``moelora._cxx_runtime``: every torch error raised inside it would crash the process) is
not used either: import warns and the fallbacks run.

The fallbacks can be forced, e.g. to compare them with the kernels, with
``moelora.switches.force_fallback()`` (a context manager) or ``MOELORA_FORCE_FALLBACK=1``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from moelora import _cxx_runtime
from moelora.switches import fallback_forced

MAX_EXPERTS = 4096  # must equal moelora::kMaxExperts in csrc/moelora.h

MAX_BLOCK_SIZE = 65536  # must equal moelora::kMaxBlockSize in csrc/moelora.h


def _untrusted_reason(module) -> Optional[str]:
    """Why the loaded extension must not be used (a stale build, a static C++ runtime), or None."""
    if getattr(module, "MAX_EXPERTS", None) != MAX_EXPERTS or getattr(module, "MAX_BLOCK_SIZE", None) != MAX_BLOCK_SIZE:
        return "moelora._C was built from other sources; rebuild it (pip install --no-build-isolation -e .)"
    try:
        problem = _cxx_runtime.link_problem(module.__file__)
    except (OSError, _cxx_runtime.NotElfError):  # not ELF (another platform): nothing to check
        return None
    if problem is not None:
        return (f"moelora._C is not used: {problem}; torch errors raised inside it would crash the process. "
                "Rebuild it with a compiler that links libstdc++ dynamically (setup.py says which to set).")
    return None


try:
    from moelora import _C

    HAS_C = True
    WITH_CUDA = bool(_C.WITH_CUDA)
    LOAD_ERROR = None
    _reason = _untrusted_reason(_C)
    if _reason is not None:  # do not trust it: the PyTorch fallbacks run instead
        HAS_C, WITH_CUDA = False, False
        LOAD_ERROR = RuntimeError(_reason)
        warnings.warn(_reason, RuntimeWarning)
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _C = None
    HAS_C = False
    WITH_CUDA = False
    LOAD_ERROR = exc


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
