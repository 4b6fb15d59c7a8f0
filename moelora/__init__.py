"""moelora: fused mixture-of-experts LoRA kernels for PyTorch.

The functional operator is :func:`moe_lora`; ``moelora.reference`` holds the pure
PyTorch formulations it is tested and benchmarked against.
"""

from ._config import current_backend, use_backend, validation, validation_enabled
from .functional import moe_lora, resolve_backend
from . import reference

__version__ = "0.1.0"

__all__ = [
    "moe_lora",
    "resolve_backend",
    "current_backend",
    "use_backend",
    "validation",
    "validation_enabled",
    "reference",
]

# --- issue 3: fused routing and token dispatch/combine (moelora._C + PyTorch fallbacks) ---
from . import _ext  # noqa: E402
from .routing import (  # noqa: E402
    DispatchMetadata,
    RouteResult,
    combine,
    dispatch,
    dispatch_metadata,
    route,
)

__all__ += ["route", "dispatch_metadata", "dispatch", "combine", "RouteResult", "DispatchMetadata"]
# --- end issue 3 ---
