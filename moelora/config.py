"""``MoELoRAConfig``: what :func:`moelora.get_moelora_model` injects, and where.

Fields shared with PEFT's ``LoraConfig`` keep its names and meaning (r, lora_alpha,
lora_dropout, target_modules, exclude_modules, layers_to_transform, layers_pattern,
rank_pattern, alpha_pattern, use_rslora, init_lora_weights, use_dora, bias, modules_to_save);
the rest describe the experts, the router and the auxiliary losses.

``num_experts`` may differ per layer (MoLA): an int, a list with one count per layer, a
callable ``(layer_index, num_layers) -> int``, or a preset over layer quarters ("2468",
"8642", "8228", "5555": the digit is the expert count of that quarter).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

from .routers import ROUTER_MODES

EXPERT_PRESETS = ("2468", "8642", "8228", "5555")
BIAS_MODES = ("none", "all", "lora_only")
CONFIG_NAME = "moelora_config.json"


@dataclass
class MoELoRAConfig:
    # --- as PEFT's LoraConfig
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[List[str], str]] = None
    exclude_modules: Optional[Union[List[str], str]] = None
    layers_to_transform: Optional[Union[List[int], int]] = None
    layers_pattern: Optional[Union[List[str], str]] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    use_dora: bool = False
    bias: str = "none"
    modules_to_save: Optional[Union[List[str], str]] = None  # trained and saved whole (moelora.adapters)
    base_model_name_or_path: Optional[str] = None
    # --- experts and routing
    num_experts: Union[int, List[int], str, Callable[[int, int], int]] = 4
    top_k: int = 2
    router: str = "softmax_topk"
    router_renormalize: bool = True
    router_jitter_noise: float = 0.0
    share_lora_a: bool = False
    lora_a_dropout: float = 0.0
    threshold_eps: float = 0.0
    threshold_eps_start: float = 0.0
    threshold_ramp_steps: int = 0
    task_shared_lora: bool = False
    # --- auxiliary losses
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    add_aux_loss_to_output: bool = True

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        for name in ("lora_dropout", "lora_a_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if self.router not in ROUTER_MODES:
            raise ValueError(f"router must be one of {ROUTER_MODES}, got {self.router!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if isinstance(self.num_experts, str) and self.num_experts not in EXPERT_PRESETS:
            raise ValueError(f"num_experts preset must be one of {EXPERT_PRESETS}, got {self.num_experts!r}")
        if isinstance(self.num_experts, int) and self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if isinstance(self.num_experts, (list, tuple)) and not all(isinstance(n, int) and n >= 1 for n in self.num_experts):
            raise ValueError(f"every per-layer num_experts must be an int >= 1, got {self.num_experts}")
        if self.router != "task" and isinstance(self.num_experts, int) and self.num_experts > 1 \
                and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got top_k={self.top_k}")
        if self.router_jitter_noise < 0:
            raise ValueError(f"router_jitter_noise must be >= 0, got {self.router_jitter_noise}")
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise ValueError("auxiliary loss coefficients must be >= 0")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    def experts_for_layer(self, layer_index: Optional[int], num_layers: int, module_name: str) -> int:
        """The expert count of the layer with index ``layer_index`` out of ``num_layers``."""
        spec = self.num_experts
        if isinstance(spec, int):
            return spec
        if layer_index is None:
            raise ValueError(
                f"per-layer num_experts needs a layer index, but module {module_name!r} is not inside a "
                "numbered layer; leave it out with target_modules/exclude_modules or set layers_pattern")
        if isinstance(spec, str):
            quarter = min(3, layer_index * 4 // num_layers)
            return int(spec[quarter])
        if callable(spec):
            n = spec(layer_index, num_layers)
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"num_experts callable returned {n!r} for layer {layer_index}; need an int >= 1")
            return n
        if len(spec) != num_layers:
            raise ValueError(f"num_experts lists {len(spec)} per-layer counts but the model has {num_layers} layers")
        return spec[layer_index]

    def to_dict(self) -> dict:
        if callable(self.num_experts):
            raise ValueError("a config with a callable num_experts cannot be saved; give a list instead")
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "MoELoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MoELoRAConfig fields: {sorted(unknown)}")
        return cls(**d)
