"""Folding adapters into the frozen base weights, and back out.

Only possible where routing does not depend on the input: a single expert (plain LoRA or
DoRA), or task routing with the task fixed at merge time. The merged delta is

    dW = s * gamma[task] * B[task] @ A[task]  (+ s * B[shared] @ A[shared] with a shared LoRA)

(E = 1: dW = s * B[0] @ A[0]). DoRA merges W' = m / ||W + dW||_row * (W + dW) and keeps the
norm to unmerge. A merged layer returns ``base_layer(x)`` until it is unmerged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def delta_weight(layer, task: Optional[int] = None) -> torch.Tensor:
    """The adapter's weight delta for static routing, in nn.Linear layout [d_out, d_in]."""
    if layer.router is not None:
        raise ValueError(
            "cannot merge a MoELoRALinear whose router depends on the input "
            f"(num_experts={layer.num_experts}, router={layer.router_mode!r}); merging needs "
            "num_experts=1 or task routing with a chosen task")
    if layer.router_mode == "task":
        if task is None or not 0 <= task < layer.num_experts:
            raise ValueError(f"merging a task-routed layer needs task in [0, {layer.num_experts}), got {task!r}")
        delta = layer.lora_gamma[task] * (layer.lora_B[task] @ layer.expert_A(task))
        if layer.task_shared_lora:
            delta = delta + layer.lora_B[-1] @ layer.expert_A(layer.num_experts)
    else:
        delta = layer.lora_B[0] @ layer.expert_A(0)
    return layer.scaling * delta


@torch.no_grad()
def merge_layer(layer, task: Optional[int] = None) -> None:
    if layer.merged:
        raise RuntimeError("the layer is already merged; unmerge it first")
    weight = layer.base_layer.weight
    w = layer.base_weight()  # view in [d_out, d_in] layout, writes go to the base weight
    delta = delta_weight(layer, task).to(torch.float32)
    if layer.use_dora:
        merged = w.float() + delta
        norm = torch.linalg.norm(merged, dim=1)
        layer._dora_merge_scale = (layer.lora_magnitude_vector.float() / norm).detach()
        merged = merged * layer._dora_merge_scale[:, None]
        layer._dora_merged_delta = delta
        w.copy_(merged.to(weight.dtype))
    else:
        w.copy_((w.float() + delta).to(weight.dtype))
    layer.merged, layer.merged_task = True, task


@torch.no_grad()
def unmerge_layer(layer) -> None:
    if not layer.merged:
        raise RuntimeError("the layer is not merged")
    weight = layer.base_layer.weight
    w = layer.base_weight()
    if layer.use_dora:
        restored = w.float() / layer._dora_merge_scale[:, None] - layer._dora_merged_delta
        del layer._dora_merge_scale, layer._dora_merged_delta
    else:
        restored = w.float() - delta_weight(layer, layer.merged_task).float()
    w.copy_(restored.to(weight.dtype))
    layer.merged, layer.merged_task = False, None


def _moelora_layers(model: nn.Module):
    from ._layer_base import is_adapter_layer

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
    from ._layer_base import is_adapter_layer

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if is_adapter_layer(child):
                setattr(module, child_name, child.base_layer)
    return model
