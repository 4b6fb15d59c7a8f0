"""Folding every adapter of a model into the frozen base weights, and back out; each layer
merges itself (``MoELoRALinear.merge`` / ``unmerge``: static routing only, see there).
:func:`merge_adapter` checks every layer before it merges any, so a model is never left
half-merged; a layer whose base weight is tied to another module's (tied embeddings) does not
merge."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from moelora.modules.adapter_base import is_adapter_layer
from moelora.tuner.adapters import active_named_modules


def _moelora_layers(model: nn.Module):
    """(module path, layer) of every MoE-LoRA layer of ``model`` (of a wrapper: its active adapter's)."""
    return [(n, m) for n, m in active_named_modules(model) if is_adapter_layer(m)]


def check_task_used(layers, task) -> None:
    """ValueError where ``task`` is given but none of ``layers`` ((name, layer) pairs) routes by task: it would
    be ignored (``merge_and_unload(True)``, PEFT's progressbar given by position, would read as a task)."""
    if task is not None and not any(layer.router_mode == "task" for _, layer in layers):
        raise ValueError(f"task={task!r} is given, but no MoE-LoRA layer of the model routes by task (router='task'), "
                         "so it would be ignored; leave it out (PEFT's progressbar / safe_merge are keywords here)")


def merge_adapter(model: nn.Module, task: Optional[int] = None, *, safe_merge: bool = False) -> None:
    """Merge every MoE-LoRA layer of ``model`` (``task`` for task-routed layers), or none: every
    layer is checked first (``check_merge``; with ``safe_merge``, as PEFT's, also its merged weight
    for NaN and Inf), and the error names the layer that cannot merge."""
    _merge(model, task, merged_ok=False, safe_merge=safe_merge)


def _merge(model: nn.Module, task: Optional[int], merged_ok: bool, *, safe_merge: bool = False,
           progressbar: bool = False) -> None:
    """:func:`merge_adapter`; ``merged_ok``: layers merged already (for ``task``) stay as they are, where
    they would raise; ``progressbar``: a tqdm bar over the layers as they merge."""
    named = _moelora_layers(model)
    check_task_used(named, task)
    layers = [(name, layer, task if layer.router_mode == "task" else None) for name, layer in named]
    if merged_ok:
        for name, layer, layer_task in layers:
            if layer.merged and layer.merged_task != layer_task:
                raise ValueError(f"{name}: merged for task {layer.merged_task}, not task {layer_task}; give "
                                 f"task={layer.merged_task} to keep that merge, or unmerge_adapter first")
        layers = [entry for entry in layers if not entry[1].merged]
    _check_each(layers, lambda layer, layer_task: layer.check_merge(layer_task))
    _check_untied(model, layers)
    if safe_merge:  # every merged weight formed and checked before any is stored (twice the arithmetic)
        _check_each(layers, lambda layer, layer_task: layer.merged_base_weight(layer_task, safe_merge=True))
    if progressbar:
        from tqdm.auto import tqdm
        layers = tqdm(layers, desc="Unloading and merging model")
    for _, layer, layer_task in layers:
        layer.merge(layer_task)


def _check_each(layers, check) -> None:
    """``check(layer, task)`` of every (name, layer, task) of ``layers``, its RuntimeError or ValueError
    naming the layer."""
    for name, layer, layer_task in layers:
        try:
            check(layer, layer_task)
        except (RuntimeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None


def _check_untied(model: nn.Module, layers) -> None:
    """ValueError if a layer's base weight is also a weight of another module of ``model`` (an
    embedding tied to the output head): merging would add the layer's delta to that module too.
    The frozen original a saved module's wrapper keeps (run only while adapters are disabled,
    which unmerges first) does not count, nor the layer's own base layer reached under other names
    (a block reused at several layers, ALBERT-style: one module, merged once)."""
    holders: dict = {}  # id(parameter) -> id(module holding it) -> a name of it
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), {}).setdefault(
                    id(module), f"{module_name}.{param_name}" if module_name else param_name)
    for name, layer, _ in layers:
        tied = [n for holder, n in holders.get(id(layer.base_layer.weight), {}).items()
                if holder != id(layer.base_layer) and ".original_module." not in f".{n}"]
        if tied:
            raise ValueError(
                f"{name}: its base weight is tied to {tied[0]} (e.g. tie_word_embeddings), so merging would add "
                "its adapter to that module too and change the model's output; untie them before injecting "
                "(give the other module its own copy of the weight) or leave this module out of target_modules")


def unmerge_adapter(model: nn.Module) -> None:
    """Take every merged MoE-LoRA layer of ``model``'s adapter back out of its base weight (layers that are
    not merged are left alone)."""
    for _, layer in _moelora_layers(model):
        if layer.merged:
            layer.unmerge()


def merge_and_unload(model: nn.Module, task: Optional[int] = None, *, progressbar: bool = False,
                     safe_merge: bool = False) -> nn.Module:
    """Merge every adapter and put the plain base layers back; returns the model. Layers merged already
    (``merge_adapter``, for ``task``) stay as they are, as PEFT's; ``progressbar`` and ``safe_merge`` as
    PEFT's (a tqdm bar; a merged weight with NaN or Inf raises before any layer is merged)."""
    _merge(model, task, merged_ok=True, safe_merge=safe_merge, progressbar=progressbar)
    return unload(model)


def unload(model: nn.Module) -> nn.Module:
    """Replace every MoE-LoRA layer by its base layer (merged or not); returns the model. A
    wrapper's inactive adapters (which run nothing) keep their layers."""
    for name, module in list(active_named_modules(model)):
        for child_name, child in list(module.named_children()):
            if is_adapter_layer(child):
                setattr(module, child_name, child.base_layer)
    return model
