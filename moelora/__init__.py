"""moelora: fused mixture-of-experts LoRA kernels for PyTorch.

- Functional operator: :func:`moe_lora` (Triton kernels, or PyTorch as reference/fallback);
  ``moelora.reference`` holds the pure-PyTorch formulations it is tested against (the naive
  per-expert loop, and the vectorised one that is the torch backend).
- Import paths are those of the folders (moelora.kernels, ops, modules, tuner, integrations:
  see README, "Architecture"); ``moelora.reference`` and ``moelora.hf_trainer`` keep their
  documented paths.
- Routing and token movement: :func:`route`, :func:`dispatch_metadata`, :func:`dispatch`,
  :func:`combine` (the ``moelora._C`` extension, with PyTorch fallbacks).
- Layers and model integration: :class:`MoELoRALinear`, :func:`get_moelora_model`, aux
  losses, MoE FFN upcycling, MoLEx, save/load/merge and PEFT interop.
"""

from moelora.ops.backend import resolve_backend
from moelora.switches import current_backend, use_backend, validation, validation_enabled
from moelora import reference
from moelora.ops.moe_lora import moe_lora
from moelora.ops.moe_ffn import moe_ffn
from moelora.ops.routing import DispatchMetadata, RouteResult, combine, dispatch, dispatch_metadata, route
from moelora.ops.losses import load_balancing_loss, router_z_loss
from moelora.modules.adapter_base import LayerSettings
from moelora.modules.linear import MoELoRALinear
from moelora.modules.conv import MoELoRAConv
from moelora.modules.embedding import MoELoRAEmbedding
from moelora.modules.router import Router
from moelora.modules.ffn import MoEFFN
from moelora.modules.molex import MoLEx
from moelora.tuner.config import MoELoRAConfig
from moelora.tuner.merge import merge_adapter, merge_and_unload, unmerge_adapter
from moelora.tuner.upcycle import upcycle_ffn
from moelora.tuner.molex import apply_molex
from moelora.persistence import export_peft_lora, save_pretrained
from moelora.model import (MoELoRAModel, aux_loss, from_pretrained, get_moelora_model, load_peft_lora, router_stats,
                           set_aux_loss_mask, set_task_ids, step_routers, use_aux_loss_mask, use_task_ids)

__version__ = "0.1.0"

__all__ = [
    # operator and switches
    "moe_lora", "resolve_backend", "current_backend", "use_backend", "validation", "validation_enabled",
    "reference",
    # routing and token movement
    "route", "dispatch_metadata", "dispatch", "combine", "RouteResult", "DispatchMetadata",
    # layers and models
    "MoELoRAConfig", "LayerSettings", "MoELoRALinear", "MoELoRAEmbedding", "MoELoRAConv", "Router",
    "load_balancing_loss", "router_z_loss",
    "MoELoRAModel", "aux_loss", "get_moelora_model", "router_stats", "set_aux_loss_mask", "set_task_ids",
    "step_routers", "use_aux_loss_mask", "use_task_ids", "merge_adapter", "merge_and_unload", "unmerge_adapter",
    "export_peft_lora", "from_pretrained", "load_peft_lora", "save_pretrained",
    "MoEFFN", "moe_ffn", "upcycle_ffn", "MoLEx", "apply_molex",
]
