"""Folding every adapter of a model into the frozen base weights, and back out; each layer
merges itself (``MoELoRALinear.merge`` / ``unmerge``: static routing only, see there)."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from moelora.modules.adapter_base import is_adapter_layer


def _moelora_layers(model: nn.Module):
    return [m for m in model.modules() if is_adapter_layer(m)]


def merge_adapter(model: nn.Module, task: Optional[int] = None) -> None:
    """Merge every MoELoRALinear of ``model`` (``task`` for task-routed layers)."""
    for layer in _moelora_layers(model):
        layer.merge(task if layer.router_mode == "task" else None)


def unmerge_adapter(model: nn.Module) -> None:
    for layer in _moelora_layers(model):
        if layer.merged:
            layer.unmerge()


def merge_and_unload(model: nn.Module, task: Optional[int] = None) -> nn.Module:
    """Merge every adapter and put the plain base layers back; returns the model."""
    merge_adapter(model, task)
    return unload(model)


def unload(model: nn.Module) -> nn.Module:
    """Replace every MoE-LoRA layer by its base layer (merged or not); returns the model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if is_adapter_layer(child):
                setattr(module, child_name, child.base_layer)
    return model
