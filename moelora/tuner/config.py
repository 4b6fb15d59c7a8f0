"""``MoELoRAConfig``: what :func:`moelora.get_moelora_model` injects, and where.

Fields shared with PEFT's ``LoraConfig`` keep its names and meaning (r, lora_alpha,
lora_dropout, target_modules, exclude_modules, layers_to_transform, layers_pattern,
rank_pattern, alpha_pattern, use_rslora, init_lora_weights, use_dora, bias, modules_to_save,
task_type, fan_in_fan_out); the rest describe the experts, the router and the auxiliary losses.
``task_type`` does what PEFT's task-specific models do with it for LoRA: a classification or
question-answering task trains and saves the model's head whole (``TASK_HEADS``, added to
``modules_to_save``); ``fan_in_fan_out`` is accepted and read from each base layer instead (GPT-2's
``Conv1D`` stores its weight [d_in, d_out]), as PEFT corrects the flag per layer.

``num_experts`` may differ per layer (MoLA): an int, a list with one count per layer, a
callable ``(layer_index, num_layers) -> int``, or a preset over layer quarters ("2468",
"8642", "8228", "5555": the digit is the expert count of that quarter; layer i of L is in quarter
floor(4 i / L), so with L not a multiple of 4 the quarters differ by one layer at most).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

from moelora.modules.adapter_base import LayerSettings
from moelora.modules.fields import BOOL, LAYER_FIELD_KINDS, check_field, is_int, is_real
from moelora.ops.validation import is_finite_number
from moelora.tuner.targets import pattern_key_regex, pattern_value

EXPERT_PRESETS = ("2468", "8642", "8228", "5555")
BIAS_MODES = ("none", "all", "lora_only")
# PEFT's TaskType values, and the heads its task models (PeftModelForSequenceClassification, ...) add to
# modules_to_save: trained and saved whole, where the model has them
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
CONFIG_NAME = "moelora_config.json"


@dataclass
class MoELoRAConfig:
    """What :func:`moelora.get_moelora_model` injects, and where (see the module docstring).

    PEFT's LoraConfig fields keep its names and meaning: ``target_modules`` (module-name
    suffixes, a regex string or "all-linear"; None: PEFT's default targets for the model),
    ``exclude_modules``, ``layers_to_transform`` (a layer index or a list of them; without
    ``layers_pattern``, PEFT's index: the first numbered part of a module's name followed by another),
    ``layers_pattern`` (the layer stack's name or names; per-layer ``num_experts`` index the stacks it names,
    default layers, h, block, blocks, layer), ``rank_pattern`` / ``alpha_pattern``
    ({module-name regex: r or lora_alpha}), ``bias`` ("none", "all" or "lora_only"),
    ``modules_to_save`` (trained and saved whole; targets inside them are left out, as PEFT's), ``task_type`` (None
    or one of TASK_TYPES),
    ``fan_in_fan_out`` (read from each base layer instead), ``base_model_name_or_path`` and
    ``inference_mode`` (build the adapter frozen). ``num_experts`` (an int, a per-layer list, a
    callable ``(layer_index, num_layers) -> int`` or a MoLA preset, module docstring), ``top_k``,
    ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init_lora_weights``, ``use_dora``,
    the router fields (``router``, ``router_renormalize``, ``router_jitter_noise``,
    ``threshold_eps``, ``threshold_eps_start``, ``threshold_ramp_steps``) and ``share_lora_a`` /
    ``lora_a_dropout`` / ``task_shared_lora`` are :class:`moelora.LayerSettings`'s (ranges and
    defaults: :class:`moelora.MoELoRALinear`'s Args); ``router_aux_loss_coef`` /
    ``router_z_loss_coef`` weigh the auxiliary losses, which ``MoELoRAModel.forward`` adds to
    ``outputs.loss`` while ``add_aux_loss_to_output``. Every field is checked when the config is made.
    """

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
    modules_to_save: Optional[Union[List[str], str]] = None  # trained and saved whole (moelora.tuner.adapters)
    task_type: Optional[str] = None  # one of TASK_TYPES; its head (TASK_HEADS) is saved whole
    fan_in_fan_out: bool = False  # accepted for PEFT's configs: each layer's layout is read from its base layer
    base_model_name_or_path: Optional[str] = None
    # as PEFT's: the adapter is built frozen (from_pretrained / load_adapter set it to `not is_trainable`)
    inference_mode: bool = False
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
        for name in _NAME_SET_FIELDS:  # a set of names (PEFT's LoraConfig holds target_modules as one): a sorted list
            value = getattr(self, name)
            if isinstance(value, (set, frozenset)) and all(isinstance(n, str) for n in value):
                setattr(self, name, sorted(value))
        self.task_type = getattr(self.task_type, "value", self.task_type)  # peft.TaskType.CAUSAL_LM: its name
        _check_field_types(self)
        self._layer_fields(self.num_experts if is_int(self.num_experts) else None)  # LayerSettings checks them
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be None or one of PEFT's task types {TASK_TYPES}, got {self.task_type!r}")
        if isinstance(self.num_experts, str) and self.num_experts not in EXPERT_PRESETS:
            raise ValueError(f"num_experts preset must be one of {EXPERT_PRESETS}, got {self.num_experts!r}")
        if isinstance(self.num_experts, (list, tuple)) and not all(is_int(n) and n >= 1 for n in self.num_experts):
            raise ValueError(f"every per-layer num_experts must be an int >= 1, got {self.num_experts}")
        if self.router == "task" and not is_int(self.num_experts):  # a task id names one expert in every layer
            raise ValueError("router='task' routes each example to the expert of its task in every layer, so the "
                             "layers need the same expert count: num_experts must be an int (the number of tasks), "
                             f"not per layer, got {self.num_experts!r}")
        if isinstance(self.target_modules, (list, tuple)) and len(self.target_modules) == 0:
            raise ValueError("target_modules is an empty list: name at least one module (a list of module-name "
                             "suffixes, a regex string, or 'all-linear')")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    def _layer_fields(self, num_experts: Optional[int], **overrides) -> LayerSettings:
        """LayerSettings from this config's fields and ``overrides`` (the one check of the layer
        hyper-parameters); with per-layer expert counts (``num_experts`` None) the checks that
        depend on the count wait for each layer's."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(LayerSettings)}
        if num_experts is None:
            num_experts = 1 if self.use_dora or self.router == "task" else max(2, self.top_k)
        return LayerSettings(**{**fields, **overrides, "num_experts": num_experts})

    def layer_settings(self, module_name: str, layer_index: Optional[int], num_layers: int) -> LayerSettings:
        """The settings of the layer injected at ``module_name`` (the ``layer_index``-th of
        ``num_layers``): its expert count, rank_pattern and alpha_pattern applied."""
        try:
            return self._layer_fields(self.experts_for_layer(layer_index, num_layers, module_name),
                                      r=pattern_value(module_name, self.rank_pattern, self.r),
                                      lora_alpha=pattern_value(module_name, self.alpha_pattern, self.lora_alpha))
        except ValueError as exc:
            raise ValueError(f"layer {layer_index} ({module_name}): {exc}") from None

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
            if not is_int(n) or n < 1:
                raise ValueError(f"num_experts callable returned {n!r} for layer {layer_index}; need an int >= 1")
            return n
        if len(spec) != num_layers:
            raise ValueError(f"num_experts lists {len(spec)} per-layer counts but the model has {num_layers} layers")
        return spec[layer_index]

    def to_dict(self) -> dict:
        """The fields as a dict (what ``moelora_config.json`` holds); a callable num_experts cannot be saved."""
        if callable(self.num_experts):
            raise ValueError("a config with a callable num_experts cannot be saved; give a list instead")
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        """:meth:`to_dict` as JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "MoELoRAConfig":
        """The config of a :meth:`to_dict` dict, checked as a new config; unknown fields raise."""
        if not isinstance(d, dict):
            raise TypeError(f"a MoELoRAConfig is read from a dict (a JSON object), got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MoELoRAConfig fields: {sorted(unknown)}")
        return cls(**d)


# ------------------------------------------------------------------------------- field checks
def _is_names(v) -> bool:
    return isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(n, str) for n in v))


def _is_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _regex_if_str(v) -> bool:
    """A list of names, or a string that is a valid regex (moelora.tuner.targets.matches)."""
    return not isinstance(v, str) or _is_regex(v)


def _pattern_keys_are_regexes(pattern: dict) -> bool:
    """Every key a valid regex as moelora.tuner.targets.pattern_value reads it."""
    return all(_is_regex(pattern_key_regex(key)) for key in pattern)


# Kinds (moelora.modules.fields.check_field's entries) that upcycle_ffn's arguments of the same meaning share.
MODULE_NAMES = (_is_names, _regex_if_str, "a list of module-name suffixes or a valid regex string")
LAYER_INDICES = (lambda v: is_int(v) or (isinstance(v, (list, tuple)) and all(map(is_int, v))), None,
                 "an int or a list of ints")
LAYER_PATTERNS = (_is_names, None, "a string or a list of strings")

# Fields of module names that take a set too (as PEFT's LoraConfig, whose own target_modules is a set).
_NAME_SET_FIELDS = ("target_modules", "exclude_modules", "modules_to_save")

# field -> (type predicate, value predicate or None, what it must be), as LAYER_FIELD_KINDS: the
# layer fields' own entries (one check for a layer's constructor and the config), then the
# config's own fields and its num_experts, which may also be per layer. None passes where it
# is the default.
_FIELD_KINDS = {
    **{name: kind for name, kind in LAYER_FIELD_KINDS.items() if name != "num_experts"},
    "target_modules": (_is_names, _regex_if_str,
                       "a list of module-name suffixes, a valid regex string or 'all-linear'"),
    "exclude_modules": MODULE_NAMES,
    "layers_to_transform": LAYER_INDICES,
    "layers_pattern": LAYER_PATTERNS,
    "rank_pattern": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and is_int(r) for k, r in v.items()),
                     lambda v: all(r >= 1 for r in v.values()) and _pattern_keys_are_regexes(v),
                     "a dict of module-name patterns (valid regexes) to positive ints"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and is_real(a) for k, a in v.items()),
                      lambda v: all(map(is_finite_number, v.values())) and _pattern_keys_are_regexes(v),
                      "a dict of module-name patterns (valid regexes) to finite numbers"),
    "bias": (lambda v: isinstance(v, str), None, f"one of {BIAS_MODES}"),
    "modules_to_save": MODULE_NAMES,
    "task_type": (lambda v: isinstance(v, str), None, f"None or one of {TASK_TYPES}"),
    "fan_in_fan_out": BOOL,
    "base_model_name_or_path": (lambda v: isinstance(v, str), None, "a string"),
    "inference_mode": BOOL,
    "num_experts": (lambda v: is_int(v) or isinstance(v, (str, list, tuple)) or callable(v),
                    lambda v: not is_int(v) or v >= 1,
                    "a positive int, a list of per-layer ints, a preset string or a callable"),
    "add_aux_loss_to_output": BOOL,
}


def _check_field_types(config: "MoELoRAConfig") -> None:
    """TypeError for a value of the wrong type (a string for a number, 4.0 for an int) and
    ValueError for an impossible value (inf, a count below 1), naming the field
    (moelora.modules.fields.check_field)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None and f.default is None:
            continue
        check_field(f"MoELoRAConfig.{f.name}", value, _FIELD_KINDS[f.name])
