"""Folding every adapter of a model into the frozen base weights, and back out; each layer
merges itself (``MoELoRALinear.merge`` / ``unmerge``: static routing only, see there).
:func:`merge_adapter` checks every layer before it merges any, so a model is never left
half-merged."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from moelora.modules.adapter_base import is_adapter_layer


def _moelora_layers(model: nn.Module):
    """(module path, layer) of every MoE-LoRA layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if is_adapter_layer(m)]


def merge_adapter(model: nn.Module, task: Optional[int] = None) -> None:
    """Merge every MoE-LoRA layer of ``model`` (``task`` for task-routed layers), or none: every
    layer is checked first (``check_merge``), and the error names the layer that cannot merge."""
    layers = [(name, layer, task if layer.router_mode == "task" else None) for name, layer in _moelora_layers(model)]
    for name, layer, layer_task in layers:
        try:
            layer.check_merge(layer_task)
        except (RuntimeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
    for _, layer, layer_task in layers:
        layer.merge(layer_task)


def unmerge_adapter(model: nn.Module) -> None:
    """Take every merged MoE-LoRA layer's adapter back out of its base weight (layers that are
    not merged are left alone)."""
    for _, layer in _moelora_layers(model):
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
