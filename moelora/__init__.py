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

# ---- layers (issue 4): MoE-LoRA layer, routers, losses, model integration --------------
from .config import MoELoRAConfig  # noqa: E402
from .layer import MoELoRALinear  # noqa: E402
from .routers import Router  # noqa: E402
from .losses import load_balancing_loss, router_z_loss  # noqa: E402
from .model import (  # noqa: E402
    MoELoRAModel, aux_loss, get_moelora_model, router_stats, set_task_ids, step_routers, use_task_ids)
from .merge import merge_adapter, merge_and_unload, unmerge_adapter  # noqa: E402
from .persistence import export_peft_lora, from_pretrained, load_peft_lora, save_pretrained  # noqa: E402
from .upcycle import MoEFFN, moe_ffn, upcycle_ffn  # noqa: E402
from .molex import MoLEx, apply_molex  # noqa: E402

__all__ += [
    "MoELoRAConfig", "MoELoRALinear", "Router", "load_balancing_loss", "router_z_loss",
    "MoELoRAModel", "aux_loss", "get_moelora_model", "router_stats", "set_task_ids", "step_routers",
    "use_task_ids", "merge_adapter", "merge_and_unload", "unmerge_adapter",
    "export_peft_lora", "from_pretrained", "load_peft_lora", "save_pretrained",
    "MoEFFN", "moe_ffn", "upcycle_ffn", "MoLEx", "apply_molex",
]
