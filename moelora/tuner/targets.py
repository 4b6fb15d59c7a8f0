"""Finding modules by name in a model: target patterns, layer indices, per-module values,
replacing a submodule, and the model inside a :class:`moelora.MoELoRAModel` wrapper.

As PEFT: a list of names matches a module whose name equals one of them or ends with
``.<name>``; a string is a regex that must match the full name; rank_pattern / alpha_pattern
keys are regexes matched against the end of the name. This module imports nothing from moelora,
so every module that needs these rules uses this one implementation.
"""

from __future__ import annotations

import re
from typing import Optional

import torch.nn as nn

DEFAULT_LAYERS_PATTERN = ("layers", "h", "block", "blocks", "layer")
OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def matches(name: str, patterns) -> bool:
    """Whether module ``name`` is selected by ``patterns`` (a regex string, or a list of names)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern=None) -> Optional[int]:
    """Index of the numbered layer holding module ``name`` (as PEFT's layers_pattern)."""
    patterns = layers_pattern or DEFAULT_LAYERS_PATTERN
    if isinstance(patterns, str):
        patterns = [patterns]
    alternatives = "|".join(re.escape(p) for p in patterns)
    m = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def pattern_key_regex(key: str) -> str:
    """The regex a rank_pattern / alpha_pattern key stands for: ``key`` matching the end of a
    module name, whole dotted parts (PEFT's rule)."""
    return rf"(.*\.)?(?:{key})$"


def pattern_value(name: str, pattern: Optional[dict], default):
    """The value of the first key of ``pattern`` (a regex) matching the end of ``name``, else
    ``default`` (PEFT's rank_pattern / alpha_pattern rule, :func:`pattern_key_regex`)."""
    for key, value in (pattern or {}).items():
        if re.match(pattern_key_regex(key), name):
            return value
    return default


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def unwrap(model: nn.Module) -> nn.Module:
    """The model a :class:`moelora.MoELoRAModel` wraps (any other module: itself)."""
    return model.model if getattr(type(model), "is_moelora_model", False) else model
