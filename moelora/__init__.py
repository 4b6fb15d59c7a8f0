"""moelora: fused mixture-of-experts LoRA kernels for PyTorch.

- Functional operator: :func:`moe_lora` (Triton kernels, or PyTorch as reference/fallback);
  ``moelora.reference`` holds the pure-PyTorch formulations it is tested against.
- Routing and token movement: :func:`route`, :func:`dispatch_metadata`, :func:`dispatch`,
  :func:`combine` (the ``moelora._C`` extension, with PyTorch fallbacks).
- Layers and model integration: :class:`MoELoRALinear`, :func:`get_moelora_model`, aux
  losses, MoE FFN upcycling, MoLEx, save/load/merge and PEFT interop.
"""

from . import _ext, reference
from ._config import current_backend, use_backend, validation, validation_enabled
from .config import MoELoRAConfig
from .functional import moe_lora, resolve_backend
from .layer import MoELoRALinear
from .layer_conv import MoELoRAConv
from .layer_embedding import MoELoRAEmbedding
from .losses import load_balancing_loss, router_z_loss
from .merge import merge_adapter, merge_and_unload, unmerge_adapter
from .model import (MoELoRAModel, aux_loss, from_pretrained, get_moelora_model, load_peft_lora, router_stats,
                    set_task_ids, step_routers, use_task_ids)
from .molex import MoLEx, apply_molex
from .persistence import export_peft_lora, save_pretrained
from .routers import Router
from .routing import DispatchMetadata, RouteResult, combine, dispatch, dispatch_metadata, route
from .ffn import moe_ffn
from .upcycle import MoEFFN, upcycle_ffn

__version__ = "0.1.0"

__all__ = [
    # operator and switches
    "moe_lora", "resolve_backend", "current_backend", "use_backend", "validation", "validation_enabled",
    "reference",
    # routing and token movement
    "route", "dispatch_metadata", "dispatch", "combine", "RouteResult", "DispatchMetadata",
    # layers and models
    "MoELoRAConfig", "MoELoRALinear", "MoELoRAEmbedding", "MoELoRAConv", "Router", "load_balancing_loss", "router_z_loss",
    "MoELoRAModel", "aux_loss", "get_moelora_model", "router_stats", "set_task_ids", "step_routers",
    "use_task_ids", "merge_adapter", "merge_and_unload", "unmerge_adapter",
    "export_peft_lora", "from_pretrained", "load_peft_lora", "save_pretrained",
    "MoEFFN", "moe_ffn", "upcycle_ffn", "MoLEx", "apply_molex",
]
