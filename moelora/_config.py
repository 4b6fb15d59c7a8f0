"""Process-wide switches: which backend runs the operator and whether inputs are validated.

Backend: ``moelora.use_backend("torch" | "triton" | "auto")`` (a context manager) or the
environment variable ``MOELORA_BACKEND``; a ``backend=`` argument on a call wins over both.

Validation: shape, dtype and device checks are free and always on. Checks that need a
device-to-host copy (expert ids in range, finite gate weights) are on by default and are
switched off with ``moelora.validation(False)`` (a context manager) or
``MOELORA_VALIDATE=0``. They are skipped by themselves while torch.compile traces
and during CUDA-graph capture. With them off, kernels
still never read or write out of bounds: out-of-range ids contribute nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading

BACKENDS = ("auto", "torch", "triton")

_state = threading.local()


def _env_backend() -> str:
    name = os.environ.get("MOELORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MOELORA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend requested by the innermost ``use_backend`` block, else MOELORA_BACKEND."""
    return getattr(_state, "backend", None) or _env_backend()


@contextlib.contextmanager
def use_backend(name: str):
    """Run the operator with ``name`` ("auto", "torch" or "triton") inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


def validation_enabled() -> bool:
    """Whether checks that need a device-to-host sync run (see module docstring)."""
    flag = getattr(_state, "validate", None)
    if flag is not None:
        return flag
    return os.environ.get("MOELORA_VALIDATE", "1").strip() not in ("0", "false", "False")


@contextlib.contextmanager
def validation(enabled: bool):
    """Switch the syncing input checks on or off inside the block."""
    previous = getattr(_state, "validate", None)
    _state.validate = bool(enabled)
    try:
        yield
    finally:
        _state.validate = previous
