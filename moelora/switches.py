"""Process-wide switches, each a thread-local setting (a context manager) over an environment
variable: which backend runs the operator, whether inputs are validated, and whether the
PyTorch fallbacks replace the native extension's kernels.

Backend: ``moelora.use_backend("torch" | "triton" | "auto")`` or the environment variable
``MOELORA_BACKEND``; a ``backend=`` argument on a call wins over both.

Validation: shape, dtype and device checks are free and always on. Checks that need a
device-to-host copy (expert ids in range, finite gate weights) are on by default and are
switched off with ``moelora.validation(False)`` or ``MOELORA_VALIDATE=0``. (The boolean variables
read 1, true, yes, on / 0, false, no, off, in any case; another value raises ValueError.) They are skipped
by themselves while torch.compile traces, during CUDA-graph capture and for meta tensors (no
values to read: ``moelora.ops.validation.syncing_checks_enabled``). With them off,
kernels still never read or write out of bounds: out-of-range ids contribute nothing.

Fallbacks: ``force_fallback()`` or ``MOELORA_FORCE_FALLBACK=1`` runs the PyTorch versions of
moelora._C's routing and dispatch ops (e.g. to compare them with the kernels).

A block sets the switch of its own thread only: threads that run a forward for it (nn.DataParallel's
replicas) read the environment variables; set those for them. (Task ids and aux-loss masks, by contrast,
are state of the layers, shared by every thread.)
"""

from __future__ import annotations

import contextlib
import os
import threading

BACKENDS = ("auto", "torch", "triton")

_state = threading.local()


@contextlib.contextmanager
def _scoped(setting: str, value):
    """Within the block ``setting`` of this thread is ``value``."""
    previous = getattr(_state, setting, None)
    setattr(_state, setting, value)
    try:
        yield
    finally:
        setattr(_state, setting, previous)


_FLAG_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _env_flag(name: str, default: bool) -> bool:
    """The boolean environment variable ``name``: 1, true, yes, on or 0, false, no, off (any case); unset or
    empty: ``default``. Any other value raises ValueError (``off`` must not read as on)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    flag = _FLAG_WORDS.get(value.lower())
    if flag is None:
        raise ValueError(f"{name} must be one of 1, true, yes, on, 0, false, no, off (any case), got {value!r}")
    return flag


def _flag_argument(name: str, value) -> bool:
    """``value`` as a bool; a bool or 0/1 int, else TypeError (a string such as "0" or "off" is truthy)."""
    if not isinstance(value, int) or value not in (0, 1):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _env_backend() -> str:
    name = os.environ.get("MOELORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MOELORA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend requested by the innermost ``use_backend`` block, else MOELORA_BACKEND."""
    return getattr(_state, "backend", None) or _env_backend()


def use_backend(name: str):
    """Run the operator with ``name`` ("auto", "torch" or "triton") inside the block (this thread only; the
    previous choice is back after it, an exception's exit too)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return _scoped("backend", name)


def validation_enabled() -> bool:
    """Whether checks that need a device-to-host sync run (see module docstring)."""
    flag = getattr(_state, "validate", None)
    return flag if flag is not None else _env_flag("MOELORA_VALIDATE", True)


def validation(enabled: bool):
    """Switch the syncing input checks on or off (``enabled``: a bool) inside the block (this thread only)."""
    return _scoped("validate", _flag_argument("validation(enabled)", enabled))


def fallback_forced() -> bool:
    """Whether the PyTorch fallbacks replace moelora._C's ops (force_fallback block or MOELORA_FORCE_FALLBACK=1)."""
    flag = getattr(_state, "force_fallback", None)
    return flag if flag is not None else _env_flag("MOELORA_FORCE_FALLBACK", False)


def force_fallback(enabled: bool = True):
    """Run the PyTorch fallbacks instead of moelora._C's kernels inside the block."""
    return _scoped("force_fallback", _flag_argument("force_fallback(enabled)", enabled))
