"""Injecting MoE-LoRA layers into a model, and the model-level helpers.

:func:`get_moelora_model` replaces the modules named by ``config.target_modules`` with
MoE-LoRA layers, as PEFT's LoRA: ``nn.Linear`` (or GPT-2 ``Conv1D``) with
:class:`MoELoRALinear`, ``nn.Embedding`` with :class:`MoELoRAEmbedding`, ``nn.Conv1d/2d/3d``
with :class:`MoELoRAConv` (a regex matching several kinds adapts each with its class;
``"all-linear"`` takes the linear layers only, without output heads and nn.MultiheadAttention's
``out_proj``, whose weight the attention reads without calling it (so do transformers' state-space
mixers with some of their layers, e.g. Mamba's dt_proj): targeting it raises, as do
uninitialised lazy layers and a module object held at several places). Experts stored as stacked
parameters [E, ...] (transformers' MoE models) are no modules: a target naming only them raises,
one selecting modules beside them (and ``"all-linear"``) warns that they keep their weights. In an
nn.TransformerEncoderLayer holding adapters PyTorch's eval-mode fast path, which would skip them,
is turned off. It freezes everything but the adapters, routers and task scales, and returns a
:class:`MoELoRAModel` wrapper. Each layer starts in the train / eval mode of the module it
replaces (as ``upcycle_ffn``'s and ``apply_molex``'s modules, and the wrapper): injecting into a
model in eval mode leaves it in eval mode, without dropout or router noise until ``model.train()``.

Auxiliary losses: every routed module keeps the weighted load-balancing + z-loss of its
last forward. ``moelora.aux_loss(model)`` sums them (custom loops add it to their loss).
``MoELoRAModel.forward`` clears the stored losses before running the wrapped model and,
when ``config.add_aux_loss_to_output`` is set and the output carries a loss, adds the aux
loss to it once; trainers reading ``outputs.loss`` then see it exactly once. The loss is
``output["loss"]`` of dict outputs (transformers' ModelOutput), or, when ``labels`` were
passed, the first element of a tuple output if that is a 0-d float tensor (transformers
models with ``return_dict=False`` return ``(loss, logits, ...)``); other outputs are left
unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import inspect
import itertools
import os
import re
import warnings
import weakref
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from moelora.tuner import structure as _structure, adapters, merge
from moelora import persistence
from moelora.modules.adapter_base import is_adapter_layer, is_uninitialised_lazy, owned_by_moelora
from moelora.tuner.adapters import (DEFAULT_ADAPTER, mark_only_adapters_trainable, refuse_offloaded_biases,
                                    wrap_modules_to_save)
from moelora.tuner.config import TASK_HEADS, MoELoRAConfig
from moelora.modules.linear import MoELoRALinear, is_conv1d
from moelora.modules.conv import MoELoRAConv, is_conv
from moelora.modules.embedding import MoELoRAEmbedding
from moelora.modules.fields import BOOL, check_field, is_int, is_integral
from moelora.modules.molex import CACHE_KWARGS
from moelora.modules.routed import (RoutedModule, RouterStats, real_tokens_of_attention_mask, recording_in_backward,
                                    restore_routing_records, routed_modules, routing_records, running_in_backward)
from moelora.modules.router import Router, check_steps
from moelora.ops.routing_modes import check_task_ids
from moelora.tuner.targets import (OUTPUT_HEAD_NAMES, check_single_place, check_tied_source, expert_count,
                                   layer_index, matches, method_sources, set_module, stacked_expert_parameters,
                                   transform_layer_index, unwrap)


# ------------------------------------------------------------------------------- matching
def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def adapter_class(module: nn.Module):
    """The MoE-LoRA layer class that wraps ``module`` (None if there is none), as PEFT's
    LoRA: linear layers (and GPT-2 Conv1D), embeddings, convolutions."""
    if _is_linear(module):
        return MoELoRALinear
    if isinstance(module, nn.Embedding):
        return MoELoRAEmbedding
    if is_conv(module):
        return MoELoRAConv
    return None


def _output_head_ids(model: nn.Module) -> set:
    ids = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            ids.add(id(head))
    return ids


def with_default_targets(model: nn.Module, config: MoELoRAConfig) -> MoELoRAConfig:
    """``config``; where its ``target_modules`` is None, a copy holding PEFT's default targets for the model's
    architecture, as PEFT's get_peft_model chooses them (``model.config.model_type`` in peft's
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: LLaMA's, Qwen's, Mistral's q_proj and v_proj, GPT-2's
    c_attn, ...); a ValueError saying why where there is none. The heads of its ``task_type``
    (:func:`with_task_heads`) are in the copy's ``modules_to_save``."""
    config = with_task_heads(model, config)
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults
    except ImportError:
        defaults, why = {}, "peft, whose per-architecture default targets are used when it is None, is not installed"
    else:
        why = (f"PEFT has no default targets for model_type {model_type!r}" if model_type else
               "the model has no config.model_type to look PEFT's per-architecture default targets up by")
    target = defaults.get(model_type)
    if target is None:
        raise ValueError(f"MoELoRAConfig.target_modules must be set (a list of module-name suffixes, a regex string, "
                         f"or 'all-linear'): {why}")
    return dataclasses.replace(config, target_modules=target if isinstance(target, str) else list(target))


def with_task_heads(model: nn.Module, config: MoELoRAConfig) -> MoELoRAConfig:
    """``config``, or a copy whose ``modules_to_save`` also names the heads of its ``task_type`` that ``model``
    has (``TASK_HEADS``: a classifier's ``classifier`` or ``score``, a question-answering model's
    ``qa_outputs``), as PEFT's task models add them: trained and saved whole. A ``modules_to_save`` regex must
    match them itself (a ValueError naming them where it does not)."""
    names = [n for n, _ in model.named_modules()]
    heads = [h for h in TASK_HEADS.get(config.task_type, ()) if any(matches(n, [h]) for n in names)]
    saved = config.modules_to_save
    if isinstance(saved, str):
        left_out = [n for n in names if matches(n, heads) and not matches(n, saved)]
        if left_out:
            raise ValueError(f"task_type {config.task_type!r} trains and saves the model's head whole, but the "
                             f"modules_to_save regex {saved!r} does not match {left_out}: make it match them, or give "
                             "modules_to_save as a list of names (the head is then added to it)")
        return config
    added = [h for h in heads if h not in (saved or [])]
    return dataclasses.replace(config, modules_to_save=list(saved or []) + added) if added else config


def find_target_modules(model: nn.Module, config: MoELoRAConfig) -> List[str]:
    """Names of the modules ``config`` selects (target_modules None: PEFT's default targets for the model,
    :func:`with_default_targets`), in model order; errors name what failed."""
    config = with_default_targets(model, config)
    candidates = []
    # Linear layers inside moelora's own modules (MoLEx gates, upcycled experts) are not targets.
    owned = {id(sub) for m in model.modules() if owned_by_moelora(m) for sub in m.modules()}
    for name, module in model.named_modules():
        if adapter_class(module) is None or isinstance(module, Router) or id(module) in owned:
            continue
        if "base_layer" in name.split("."):
            raise _already_adapted(model, name)
        candidates.append((name, module))
    target = config.target_modules
    unread = _unread_modules(model)
    routers = _expert_routers(model)
    stacked = stacked_expert_parameters(model, lambda m: adapter_class(m) is not None or id(m) in owned)
    if target == "all-linear":
        heads = _output_head_ids(model)
        selected = [n for n, m in candidates if _is_linear(m) and id(m) not in heads and id(m) not in unread
                    and id(m) not in routers and n.split(".")[-1] not in OUTPUT_HEAD_NAMES]
        if not selected:
            raise ValueError("target_modules='all-linear' matches no linear layer of the model (output heads and "
                             "nn.MultiheadAttention's out_proj are left out)")
        _warn_stacked_left_out("target_modules='all-linear' adapts linear layers only: the",
                               [n for n in stacked if not _excludes_parameter(n, config.exclude_modules or [])])
    else:
        selected = [n for n, _ in candidates if matches(n, target)]
        named = [n for n in stacked if _names_parameter(n, target)]
        if isinstance(target, str):
            if not selected:
                raise ValueError(f"target_modules regex {target!r} matches no linear module (nor embedding or "
                                 "convolution) of the model" + _stacked_hint({n: stacked[n] for n in named}))
        else:
            unknown = [t for t in target if not any(matches(n, [t]) for n, _ in candidates)]
            if unknown:
                raise ValueError(f"target_modules {unknown} not found among the model's linear, embedding and "
                                 "convolution modules "
                                 f"(e.g. {[n for n, m in candidates if id(m) not in unread][:6]})"
                                 f"{_unknown_hint(model, unknown)}"
                                 + _stacked_hint({n: stacked[n] for n in named if _names_parameter(n, unknown)}))
        _warn_stacked_left_out(f"target_modules {target!r} names, besides the modules it selects, the", named)
    if config.exclude_modules:
        selected = [n for n in selected if not matches(n, config.exclude_modules)]
        if not selected:
            raise ValueError(f"exclude_modules {config.exclude_modules!r} excludes every module target_modules "
                             "selects: no module left to adapt")
    if config.modules_to_save:  # as PEFT's: a module saved whole (a task_type's head too) holds no adapter
        inside = [n for n in selected if _inside_saved_module(n, config.modules_to_save)]
        selected = [n for n in selected if n not in inside]
        if not selected:
            raise ValueError(f"every module target_modules selects is in a module saved whole (modules_to_save "
                             f"{config.modules_to_save!r}, with the heads of task_type {config.task_type!r}): "
                             f"{inside[:4]}; no module left to adapt")
    if config.layers_to_transform is not None:
        keep = set(config.layers_to_transform)
        found = sorted({i for i in (transform_layer_index(n, config.layers_pattern) for n in selected)
                        if i is not None})
        selected = [n for n in selected if transform_layer_index(n, config.layers_pattern) in keep]
        if not selected:
            raise ValueError(f"layers_to_transform {sorted(keep)} (layers_pattern {config.layers_pattern!r}) keeps "
                             f"none of the selected modules, whose layer indices are {found or 'none'}: no module "
                             "left to adapt")
    if isinstance(target, str) and target != "all-linear":
        _refuse_transposed_convs(model, config)
    modules = {n: m for n, m in candidates}
    for name in selected:
        if id(modules[name]) in unread:
            raise ValueError(f"{name} is {unread[id(modules[name])]}; leave it out (exclude_modules)")
        if id(modules[name]) in routers:
            raise ValueError(
                f"{name} is a {type(modules[name]).__name__}, an nn.Linear subclass with a forward of its own that "
                f"routes the experts of the mixture-of-experts block {routers[id(modules[name])] or '(the model)'}: "
                "its forward returns the routing (transformers' PhiMoE router returns (logits, weights, expert ids), "
                "Llama-4's (scores, logits)), not the linear layer's output that a MoE-LoRA layer adds its adapter "
                "to; leave it out (exclude_modules; 'all-linear' leaves it out)")
    check_single_place(model, [(n, modules[n]) for n in selected], "injection")
    check_tied_source(model, [(n, modules[n]) for n in selected], "an adapter",
                      "target those modules instead (target_modules=['embed_tokens'] on T5)")
    return selected


def _inside_saved_module(name: str, saved) -> bool:
    """Whether module ``name`` is, or is inside, a module that ``saved`` (modules_to_save: names or a regex) names;
    PEFT leaves those out of the targets, the saved module training whole."""
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), saved) for i in range(1, len(parts) + 1))


def _already_adapted(model: nn.Module, name: str) -> ValueError:
    """The error for ``model``, whose module ``name`` is the base layer of an adapter layer (a MoE-LoRA layer, or
    another library's: PEFT's LoRA layers hold theirs as ``base_layer`` too)."""
    parts = name.split(".")
    holder_name = ".".join(parts[:parts.index("base_layer")])
    holder = model.get_submodule(holder_name)
    if is_adapter_layer(holder):
        return ValueError(f"the model already holds MoE-LoRA layers ({holder_name}); add another adapter to its "
                          "MoELoRAModel with add_adapter(name, config), or inject into a clean model")
    return ValueError(f"the model already holds adapter layers of another library: {holder_name} is a "
                      f"{type(holder).__module__}.{type(holder).__qualname__} around its base_layer (a PEFT model's "
                      "LoRA layer); inject into the model without them: PEFT's merge_and_unload() (its adapters "
                      "merged) or unload() gives it back")


# The names transformers 4 gave the per-expert projections that transformers 5 stacks in one parameter of the
# experts module (as PEFT's transformers_weight_conversion maps targets): gate_proj and up_proj (Qwen2/3-MoE, OLMoE,
# ...; Mixtral's w1 and w3) are fused into gate_up_proj, Mixtral's w2 is down_proj.
FUSED_EXPERT_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj", "w1", "w3"), "down_proj": ("w2",)}


def _names_parameter(name: str, target) -> bool:
    """Whether ``target`` (a regex, or a list of names) names the parameter ``name`` or the module holding it, or a
    projection transformers 4 held per expert where it is stacked (:data:`FUSED_EXPERT_PROJECTIONS`)."""
    holder, _, leaf = name.rpartition(".")
    return (matches(name, target) or matches(holder, target)
            or any(matches(f"{holder}.{old}", target) for old in FUSED_EXPERT_PROJECTIONS.get(leaf, ())))


def _excludes_parameter(name: str, exclude) -> bool:
    """Whether ``exclude`` (exclude_modules) names the parameter ``name`` as :func:`_names_parameter` does, or a
    module above the one holding it (DBRX's experts module holds its stacked weights in experts.mlp)."""
    parts = name.split(".")
    return _names_parameter(name, exclude) or any(matches(".".join(parts[:i]), exclude) for i in range(1, len(parts)))


def _stacked_hint(stacked: Dict[str, tuple]) -> str:
    """What the stacked expert parameters ``stacked`` (name -> shape) are, for an error, or ""."""
    if not stacked:
        return ""
    first = ", ".join(f"{n} {list(s)}" for n, s in list(stacked.items())[:2])
    return (f"; the target names {len(stacked)} parameter(s) holding the weights of a mixture-of-experts block's "
            f"experts stacked in one tensor ({first}{', ...' if len(stacked) > 2 else ''}), as transformers' "
            "MoE models store them: moelora adapts modules (nn.Linear, Conv1D, nn.Embedding, nn.ConvNd), not "
            "parameters (PEFT's target_parameters has no moelora counterpart), so these experts cannot be adapted; "
            "target the attention projections (and a shared expert's linear layers) instead")


def _warn_stacked_left_out(what: str, names: List[str]) -> None:
    """Warn that the stacked expert parameters ``names`` are not adapted (``what`` starts the sentence)."""
    if names:
        warnings.warn(f"{what} {len(names)} parameter(s) holding the stacked weights of mixture-of-experts "
                      f"experts (e.g. {', '.join(names[:2])}), as transformers' MoE models store them, are not "
                      "modules moelora can adapt and keep their pretrained weights (PEFT's target_parameters has no "
                      "moelora counterpart; see docs/integration.md, transformers' MoE models)", stacklevel=5)


def _expert_routers(model: nn.Module) -> Dict[int, str]:
    """id -> parent name of the routers of mixture-of-experts blocks that subclass nn.Linear with a forward of
    their own (transformers' PhimoeTopKRouter, Llama4Router: the block holds them beside its ``experts``), giving
    one logit per expert (where the experts module holds its count): their forward computes the routing from the
    logits and returns it, not the layer's output. Another such child (a shared expert's gate [1, hidden], or a
    projection, that quantisation made a bitsandbytes Linear4bit / an FP8 linear layer) is no router."""
    return {id(m): n for n, block in model.named_modules() if isinstance(getattr(block, "experts", None), nn.Module)
            for m in block.children() if isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward
            and expert_count(block.experts) in (None, m.out_features)}


def _unread_modules(model: nn.Module) -> Dict[int, str]:
    """id -> what it is, for an error, of the modules whose parent reads their weight without calling them, so
    that an adapter layer in their place would not run: nn.MultiheadAttention's ``out_proj`` (its forward passes
    out_proj.weight and .bias to F.multi_head_attention_forward), and the children of transformers' state-space
    and delta-rule mixers (Mamba's, Mamba-2's, Jamba's, Qwen3-Next's, ...: modules holding ``A_log``) whose weight
    their methods read (:func:`_class_weight_reads`: Mamba's dt_proj always, conv1d, and x_proj and out_proj on the
    fused kernels' training path)."""
    unread = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            unread[id(m.out_proj)] = (
                f"the out_proj of the nn.MultiheadAttention {n or '(the model)'}, which passes out_proj.weight to "
                "F.multi_head_attention_forward and never calls out_proj: an adapter there would have no effect. "
                "moelora cannot adapt nn.MultiheadAttention's projections (an input-routed mixture cannot be folded "
                "into its weights around each call, as PEFT's single LoRA is)")
        elif isinstance(getattr(m, "A_log", None), torch.Tensor):
            for attr in sorted(_class_weight_reads(type(m))):
                child = m._modules.get(attr)
                if child is not None:
                    unread[id(child)] = (
                        f"the {attr} of the {type(m).__name__} {n or '(the model)'}, whose code reads {attr}.weight "
                        "itself (a matmul, or the fused kernels' arguments) instead of calling it: an adapter there "
                        "would have no effect (or only on the paths that call it: training and inference would differ)")
    return unread


# ``self.<child>.weight`` read for its values, not only for its dtype, device or shape.
_WEIGHT_READ = re.compile(r"self\.(\w+)\.weight\b(?!\s*\.\s*(?:dtype|device|shape|size)\b)")


@functools.lru_cache(maxsize=None)
def _class_weight_reads(cls: type) -> frozenset:
    """Names of the children whose weight the methods of ``cls`` (but its constructor and initialisation)
    read as ``self.<child>.weight`` (not only its dtype, device or shape)."""
    return frozenset(name for source in method_sources(cls, ("__init__", "reset_parameters", "_init_weights"))
                     for name in _WEIGHT_READ.findall(source))


def _refuse_transposed_convs(model: nn.Module, config: MoELoRAConfig) -> None:
    """ValueError where the ``target_modules`` regex of ``config`` matches a transposed convolution that the
    selection would adapt were it a convolution (not left out by ``exclude_modules``, not inside a module of
    ``modules_to_save``, in a layer of ``layers_to_transform``): no adapter wraps one (as PEFT's LoRA, which
    refuses it too), and skipping it would leave a layer the regex names without its adapter silently (a list
    naming it raises as an unknown target)."""
    keep = None if config.layers_to_transform is None else set(config.layers_to_transform)
    transposed = [f"{n}, a {type(m).__name__}" for n, m in model.named_modules()
                  if isinstance(m, nn.modules.conv._ConvTransposeNd) and matches(n, config.target_modules)
                  and not (config.exclude_modules and matches(n, config.exclude_modules))
                  and not (config.modules_to_save and _inside_saved_module(n, config.modules_to_save))
                  and (keep is None or transform_layer_index(n, config.layers_pattern) in keep)]
    if transposed:
        raise ValueError(f"target_modules regex {config.target_modules!r} matches {'; '.join(transposed[:3])}: "
                         "transposed convolutions take no MoE-LoRA adapter (as PEFT's LoRA); leave them out "
                         "(exclude_modules, or a regex that does not match them)")


def _unknown_hint(model: nn.Module, unknown: List[str]) -> str:
    """What the ``unknown`` targets name, if they name modules that are not candidates: a module of
    another kind (nn.MultiheadAttention, whose projections are no modules moelora can replace), or one
    that the model holds under a second name (the same object twice; named_modules lists it once)."""
    first = {id(m): n for n, m in model.named_modules()}
    hints = []
    for t in unknown:
        for n, m in model.named_modules(remove_duplicate=False):
            if matches(n, [t]):
                hints.append(f"{t!r} names {n}, a {type(m).__name__}" if first[id(m)] == n else
                             f"{t!r} names {n}, which is {first[id(m)]} (one module held at two places)")
    return f"; {'; '.join(list(dict.fromkeys(hints))[:3])}" if hints else ""


def _no_fast_path(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing: its presence turns off nn.TransformerEncoderLayer's fast path."""


def _keep_torch_fast_paths_off(model: nn.Module) -> None:
    """PyTorch's eval-mode fast path of nn.TransformerEncoderLayer (``torch._transformer_encoder_layer_fwd``)
    reads linear1/linear2's weights without calling them, which would skip their adapters. It runs
    only without hooks in the layer: the adapter layers inside one get a no-op forward pre-hook
    (which leaves the model with them). An nn.TransformerEncoder holding adapters stops turning
    padded batches into nested tensors (``use_nested_tensor``), which only the fast path reads."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            for sub in module.modules():
                if is_adapter_layer(sub) and _no_fast_path not in sub._forward_pre_hooks.values():
                    sub.register_forward_pre_hook(_no_fast_path)
        elif isinstance(module, nn.TransformerEncoder) and any(is_adapter_layer(m) for m in module.modules()):
            module.use_nested_tensor = False


def _num_layers(model: nn.Module, layers_pattern) -> int:
    indices = [layer_index(n, layers_pattern) for n, _ in model.named_modules()]
    indices = [i for i in indices if i is not None]
    return max(indices) + 1 if indices else 0


def inject_moelora(model: nn.Module, config: MoELoRAConfig) -> List[str]:
    """Replace the targeted layers in place; returns their names. If a layer or saved module
    cannot be made, ``model`` is left as it was (the layers made before it are taken out)."""
    lazy = next((n for n, m in model.named_modules() if is_uninitialised_lazy(m)), None)
    if lazy is not None:  # freezing its parameters (requires_grad_) would fail too
        raise ValueError(f"the model holds uninitialised lazy modules (e.g. {lazy or 'the model itself'}: "
                         f"{type(model.get_submodule(lazy)).__name__}); run a forward pass first, which initialises "
                         "them, then inject")
    names = find_target_modules(model, config)
    num_layers = _num_layers(model, config.layers_pattern)
    if isinstance(config.num_experts, (list, tuple)) and len(config.num_experts) != num_layers:
        none = ("" if num_layers else f" (no module sits in a numbered layer, as layers.<i> or h.<i>; layers_pattern="
                f"{config.layers_pattern!r}: name the model's layer list there, or give num_experts as an int)")
        raise ValueError(f"num_experts lists {len(config.num_experts)} per-layer counts but the model has "
                         f"{num_layers} layers{none}")
    with persistence.restored_on_error(model):
        for name in names:
            base = model.get_submodule(name)
            layer_class = adapter_class(base)
            if layer_class is not MoELoRALinear and config.use_dora:
                raise ValueError(f"use_dora is supported on linear layers only; {name} is a {type(base).__name__}")
            settings = config.layer_settings(name, layer_index(name, config.layers_pattern), num_layers)
            try:
                layer = layer_class(base, settings)
            except ValueError as exc:  # what the layer refuses of this base (a conv's groups, ...): name the module
                raise ValueError(f"{name}: {exc}") from None
            set_module(model, name, layer.train(base.training))  # in the mode of the module it replaces
        _keep_torch_fast_paths_off(model)
        wrap_modules_to_save(model, config.modules_to_save)
        refuse_offloaded_biases(model, config.bias)
        mark_only_adapters_trainable(model, config.bias)
    return names


def with_expert_counts_listed(model: nn.Module, config: MoELoRAConfig, names: List[str]) -> MoELoRAConfig:
    """``config``; where its ``num_experts`` is a callable, a copy holding the per-layer list of the counts the
    layers ``names`` of ``model`` were injected with (1 for the layers none of them is in, which nothing adapts),
    so that the config is data: it saves, and its list gives the same layers again."""
    if not callable(config.num_experts):
        return config
    counts = [1] * _num_layers(model, config.layers_pattern)
    for name in names:
        counts[layer_index(name, config.layers_pattern)] = model.get_submodule(name).num_experts
    return dataclasses.replace(config, num_experts=counts)


# ------------------------------------------------------------------------------- helpers
def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the weighted auxiliary losses every routed module stored in its last forward, in the
    widest of their dtypes (float32 at least: float64 for a float64 model).

    Warns, when gradients are enabled, if a module's loss came from a training-mode forward
    run without gradients (reentrant gradient checkpointing; see
    :attr:`moelora.modules.routed.RoutedModule.aux_loss_lost_grad`): that loss trains nothing."""
    return _aux_loss_of(model)


def _aux_loss_of(model: nn.Module, recorded: Optional[List[RoutedModule]] = None) -> torch.Tensor:
    """:func:`aux_loss`, from ``recorded`` (:func:`_recorded_aux_losses` of ``model``) where given."""
    total = recorded_aux_loss(model, recorded)
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), dtype=torch.float32, device=p.device if p is not None else None)
    return total


def recorded_aux_loss(model: nn.Module, recorded: Optional[List[RoutedModule]] = None) -> Optional[torch.Tensor]:
    """:func:`aux_loss`, or None where no routed module of ``model`` recorded one in its last forward (no
    learned router, or none has run since the record was cleared); from ``recorded`` where given."""
    routed = _recorded_aux_losses(model) if recorded is None else recorded
    losses = [m.last_aux_loss for m in routed]
    if torch.is_grad_enabled() and any(m.aux_loss_lost_grad for m in routed):
        lost = {id(m) for m in routed if m.aux_loss_lost_grad}
        _warn_aux_loss_without_grad([n for n, m in model.named_modules() if id(m) in lost])
    if not losses:
        return None
    # in the widest of their dtypes, float32 at least (a float64 model's losses are float64)
    dtype = functools.reduce(torch.promote_types, (loss.dtype for loss in losses), torch.float32)
    return torch.stack([loss.to(dtype) for loss in losses]).sum()


def _recorded_aux_losses(model: nn.Module) -> List[RoutedModule]:
    """Every routed module of ``model`` holding an aux loss from its last forward."""
    return [m for m in routed_modules(model) if m.last_aux_loss is not None]


def _warn_aux_loss_without_grad(names: List[str]) -> None:
    if names:
        warnings.warn(
            f"the router aux loss of {len(names)} module(s) (first: {names[0] or 'the module itself'}) was "
            "computed in training mode without gradients, so it trains no router: their forward ran under "
            "torch.no_grad(), as reentrant gradient checkpointing runs it (torch.utils.checkpoint(..., "
            "use_reentrant=True), or gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
            "True})); use use_reentrant=False", stacklevel=5)  # the caller of aux_loss


def clear_aux_losses(model: nn.Module) -> None:
    """Forget every stored loss and statistic (done at the start of MoELoRAModel.forward)."""
    for m in routed_modules(model):
        m.clear_routing_record()


def _clear_aux_losses_at_deletion(wrapper: "MoELoRAModel") -> None:
    """Clear the routing records of ``wrapper``'s model when the wrapper is deleted. A record holds its forward's
    autograd graph until the next forward (or a backward) frees its buffers; a gradient-checkpointed layer's graph
    holds that layer (torch.utils.checkpoint's recomputation calls it), out of the garbage collector's reach (the
    graph is C++). After a forward whose backward never ran (evaluation with gradients on, an exception before
    backward), ``del model`` would keep every checkpointed layer holding a routed module alive for good, base
    weights included. The model is held weakly: it lives as long as the wrapper holds it. Not run at the
    interpreter's exit, which frees everything anyway."""
    weakref.finalize(wrapper, _clear_aux_losses_of, weakref.ref(wrapper.model)).atexit = False


def _clear_aux_losses_of(model_ref: weakref.ref) -> None:
    model = model_ref()
    if model is not None:
        clear_aux_losses(model)


def router_stats(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per routed module (by name), from its last forward (in eval mode and under torch.no_grad too):
    ``load`` (slots per token routed to each expert, [E]; threshold routing: the kept ones), ``entropy``
    (mean routing entropy, nats), and the unweighted ``load_balancing_loss`` and ``z_loss``. Names are
    relative to the wrapped model, also through the containers a training loop puts around it
    (nn.DataParallel, DistributedDataParallel: ``.module``; torch.compile: ``._orig_mod``). A module whose
    last forward routed no token (an empty batch; with an aux-loss mask, all padding), whose statistics are
    undefined, is left out: a logging step over such a batch does not raise."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    model = unwrap(model)
    return {name: dict(stats) for name, m in model.named_modules()
            if isinstance(m, RoutedModule) and (stats := m.last_router_stats) is not None
            and (not isinstance(stats, RouterStats) or stats.num_routed > 0)}


def _task_layers(model: nn.Module):
    """The task-routed layers ``model`` runs (of a wrapper: its active adapter's)."""
    return [m for _, m in adapters.active_named_modules(model) if is_adapter_layer(m) and m.router_mode == "task"]


class _Swap(NamedTuple):
    """Per-module routing state (task ids, an aux-loss mask) given to ``modules``: ``value`` as each
    now holds it, what each held before (``previous``), and how the state is written (``put``, which
    also names the kind of state), recognised (``holds``) and read (``held``), for :meth:`put_back` and
    :meth:`put_again`. A ``with`` block puts back what was held at its end; a MoELoRAModel's forward
    keeps its swaps until its next forward (or a block of their kind, see :func:`_swapped`), and gives
    them again to the backward of its outputs (:func:`_backward_routes_as_forward`), so that a
    gradient checkpoint's recomputation in backward routes as the forward did."""
    value: object
    modules: list
    previous: list
    put: Callable[[nn.Module, object], None]
    holds: Callable[[nn.Module, object], bool]
    held: Callable[[nn.Module], object]

    def put_back(self, where_unchanged: bool = False) -> None:
        """Give each module what it held before (``where_unchanged``: only those still holding ``value``,
        not something set since)."""
        for module, previous in zip(self.modules, self.previous):
            if not where_unchanged or self.holds(module, self.value):
                self.put(module, previous)

    def put_again(self) -> Optional[Callable[[], None]]:
        """Give ``value`` again to the modules that hold something else now; returns what gives them that
        back (where they still hold ``value``), or None where every module holds ``value``."""
        others = [(module, self.held(module)) for module in self.modules if not self.holds(module, self.value)]
        for module, _ in others:
            self.put(module, self.value)

        def undo() -> None:
            for module, now in others:
                if self.holds(module, self.value):
                    self.put(module, now)

        return undo if others else None


class _BackwardPutBack:
    """Gives modules back what they held before a backward's routing hook gave them its forward's swaps again
    (``undo``: what the swaps' ``put_again`` returned), once: at that backward's end, or at the wrapper's next
    forward where the backward raised, which never reaches its end (see :func:`_backward_routes_as_forward`)."""

    __slots__ = ("undo", "wrapper")

    def __init__(self, undo: List[Callable[[], None]], wrapper: weakref.ref):
        self.undo, self.wrapper = undo, wrapper

    def __call__(self) -> None:
        if self.undo is None:
            return  # run already
        wrapper = self.wrapper()
        waiting = wrapper._backward_put_backs if wrapper is not None else []
        if self in waiting:
            # The backward's end runs its callbacks in the order queued; those queued after this one (later hooks of
            # the same backward: three forwards and one backward) hold what this one gave: they give back first.
            for later in reversed(waiting[waiting.index(self) + 1:]):
                later()
            waiting.remove(self)
        undo, self.undo = self.undo, None
        for u in reversed(undo):
            u()


def _backward_routes_as_forward(output, aux_losses: List[torch.Tensor], swaps: List[_Swap],
                                wrapper: "MoELoRAModel") -> None:
    """Make every backward through ``output`` (the tensors of a MoELoRAModel forward's output that need a
    gradient, in any nesting of tuples, lists and dicts) or through the ``aux_losses`` its modules recorded
    route as the forward did: where the modules hold other task ids or another aux-loss
    mask then (a forward since, with others: two forwards and one backward of both, as a multi-task or
    preference loss runs them), the first gradient hook of that backward gives them the forward's
    ``swaps`` again, and the backward's end gives them back what they held. A gradient-checkpointed
    layer runs its forward again inside that backward; every path into it from a loss passes through
    these tensors first (a loss computed from other tensors of the forward is not covered). Not under
    torch.compile's tracing, which cannot trace the hooks (a compiled wrapper keeps the next-forward rule
    only: see MoELoRAModel.forward). A backward that raises never reaches its end: what gives the modules back
    what they held waits in ``wrapper._backward_put_backs`` too, and the wrapper's next forward runs it (else the
    modules would keep that forward's ids or mask, which the next forwards' put-backs take for what they held
    before, so that a forward without task ids would route by them)."""
    tensors = [loss for loss in aux_losses if loss.requires_grad]
    pending = [output]
    while pending:
        value = pending.pop()
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                tensors.append(value)
        elif isinstance(value, (tuple, list)):
            pending.extend(value)
        elif isinstance(value, dict):  # transformers' ModelOutput too
            pending.extend(value.values())

    # The hook holds the modules weakly: the aux losses it is registered on are held by those modules, and what a
    # tensor's hook holds is out of the garbage collector's reach (the autograd graph is C++), so the cycle would
    # keep a deleted model (its device memory) alive for good.
    weak = [(swap._replace(modules=[], previous=[]), [weakref.ref(m) for m in swap.modules]) for swap in swaps]
    wrapper_ref = weakref.ref(wrapper)

    def hook(_grad):
        live = [swap._replace(modules=[m for m in (ref() for ref in refs) if m is not None]) for swap, refs in weak]
        undo = [u for u in (swap.put_again() for swap in live) if u is not None]
        if undo:
            put_back = _BackwardPutBack(undo, wrapper_ref)
            owner = wrapper_ref()
            if owner is not None:
                owner._backward_put_backs.append(put_back)
            torch.autograd.Variable._execution_engine.queue_callback(put_back)  # run at the backward's end

    for tensor in tensors:
        tensor.register_hook(hook)


def set_task_ids(model: nn.Module, ids) -> None:
    """Give every task-routed layer the task ids of the next batches: an int (a numpy integer
    too), one id per example ([batch]) or one per token; ``None`` clears them. An int is checked here and held
    as a 0-d tensor: torch.compile takes a module's int attribute for a constant, and would
    compile the model again for every task (falling back to eager after its recompile_limit)."""
    _swap_task_ids(model, ids)


def _swap_task_ids(model: nn.Module, ids, owner=None) -> _Swap:
    """:func:`set_task_ids`, returning the swap (value: the ids as the layers hold them and
    ``owner``) for a caller that puts back what the layers held. ``owner``: who set them (a
    MoELoRAModel's ``_task_ids_owner`` in its forward, else None), so that the wrapper's next
    forward puts back only ids its forward set, not ids set since (the same tensor or int)."""
    if is_integral(ids):  # an int, or a numpy integer: held as an int's
        ids = int(ids)
    layers = _task_layers(model)
    if not layers and ids is not None:
        raise ValueError("the model has no task-routed MoE-LoRA layer (router='task')")
    merged = next((layer for layer in layers if layer.merged), None) if ids is not None else None
    if merged is not None:  # a merged layer runs its base layer: the ids would route nothing (as PEFT's rule)
        raise ValueError(f"task ids cannot route merged layers (task {merged.merged_task} is folded into their base "
                         "weights, which every token runs): call unmerge_adapter() first, or run without task ids")
    if is_int(ids):
        for layer in layers:
            check_task_ids(ids, layer.num_experts)
        with _outside_inference_mode():  # an inference tensor's routing would be built by every layer, every call
            ids = torch.tensor(ids)
    elif ids is not None:  # its type here (a list, a bool: no forward routes by it); a tensor's values where routed
        check_task_ids(ids, layers[0].num_experts)
    previous = [_task_ids_held(layer) for layer in layers]
    held = (ids, owner)
    for layer in layers:
        _put_task_ids(layer, held)
    return _Swap(held, layers, previous, _put_task_ids, _holds_task_ids, _task_ids_held)


def _outside_inference_mode():
    """A context in which the tensors moelora makes to hold across forwards (task ids, aux-loss masks) are
    normal tensors where the caller runs under torch.inference_mode (a no-op otherwise, and under torch.compile,
    which cannot trace is_inference_mode_enabled): an inference tensor has no version counter, so task routing
    would not reuse what it builds for it (moelora.ops.routing_modes.task_routing), and a training step's
    backward cannot save one."""
    eager_inference = not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
    return torch.inference_mode(False) if eager_inference else contextlib.nullcontext()


def _held_for_the_call(task_ids):
    """Task ids given to one call (MoELoRAModel's forward or generate) as its layers hold them: an inference
    tensor (made under torch.inference_mode, as a serving loop makes them) as a normal copy, whose routing every
    layer and step reuses (an inference tensor has no version counter, so each layer of each forward would build
    its ids, one-hot matrix and range check again: a host sync each for ids on a GPU); anything else as it is.
    The copy is made per call, so the caller's in-place changes between calls are seen."""
    if isinstance(task_ids, torch.Tensor) and not torch.compiler.is_compiling() and task_ids.is_inference():
        with _outside_inference_mode():
            return task_ids.clone()
    return task_ids


def _put_task_ids(layer: nn.Module, held: tuple) -> None:
    """Give ``layer`` the (task ids, owner) ``held``."""
    layer.task_ids = held[0]
    # never a module or tensor: skips nn.Module.__setattr__'s checks, which cost microseconds per layer
    layer.__dict__["task_ids_owner"] = held[1]


def _holds_task_ids(layer: nn.Module, held: tuple) -> bool:
    return layer.task_ids is held[0] and layer.task_ids_owner is held[1]


def _task_ids_held(layer: nn.Module) -> tuple:
    return layer.task_ids, layer.task_ids_owner


@contextlib.contextmanager
def use_task_ids(model: nn.Module, ids):
    """``with moelora.use_task_ids(model, ids): model(...)``: task ids for the block only.

    Under gradient checkpointing the checkpointed layers run their forward again in backward,
    reading the task ids the layers hold then: call ``backward`` inside the block (or pass
    ``task_ids`` to :meth:`MoELoRAModel.forward`, whose ids stay until its next forward and route the
    backward of its outputs), else
    the recomputation routes by the ids outside the block (wrong gradients, or an error when
    none are set). Ids that a MoELoRAModel's last forward gave (some of) the layers of ``model``
    are put back first, as its next forward would: after the block the layers hold what they held
    before that forward (its aux-loss mask stays). Yields the ids the layers hold (an int as a 0-d
    tensor)."""
    with _swapped(model, _swap_task_ids, _put_task_ids, ids) as swap:
        yield swap.value[0]


@contextlib.contextmanager
def _swapped(model: nn.Module, swap_fn: Callable[..., _Swap], put: Callable, value):
    """``swap_fn(model, value)`` for a ``with`` block, put back at its end. State of this kind (``put``) that
    a MoELoRAModel's last forward gave modules of ``model`` goes back first, as the wrapper's next forward
    would put it back: a forward of the wrapper in the block would drop its record of it, and the block's
    end then put it back for good."""
    _put_back_forward_swaps_in(model, put)
    swap = swap_fn(model, value)
    try:
        yield swap
    finally:
        swap.put_back()


def _put_back_forward_swaps_in(model: nn.Module, put: Callable) -> None:
    """Put back the swaps of kind ``put`` kept by a MoELoRAModel's last forward (see
    :meth:`MoELoRAModel.forward`) that gave state to a module of ``model``, on all that swap's modules
    (where unchanged since), and drop them from the wrapper's record. Its swaps of the other kind stay,
    so that a checkpointed backward after a block routes by them as its forward did."""
    pending = [(wrapper, swap) for wrapper in adapters.live_wrappers() for swap in wrapper._forward_swaps
               if swap.put is put]
    if not pending:
        return
    held = {id(m) for m in model.modules()}
    for wrapper, swap in pending:
        if any(id(m) in held for m in swap.modules):
            swap.put_back(where_unchanged=True)
            swaps = wrapper._forward_swaps
            swaps[:] = [s for s in swaps if s is not swap]  # in place (see MoELoRAModel.__init__)


def set_aux_loss_mask(model: nn.Module, mask: Optional[torch.Tensor]) -> None:
    """Take the aux losses and routing statistics of every module with a learned router in
    ``model`` (MoE-LoRA layers, MoEFFN; not MoLEx, which reads the attention mask itself) over
    the real tokens of ``mask`` only: [batch, sequence] (any shape whose elements, in order, are
    each routed module's tokens), nonzero for real tokens and 0 for padding, as transformers'
    ``attention_mask`` (and as Mixtral masks its load-balancing loss); ``None`` clears it. The
    modules hold it until it is changed; a module routing another number of tokens raises. The
    masked loss is one kernel and its gradient another (moelora.ops.losses.masked_aux_losses; the
    fused MoELoRALinear runs them inside its op, in place of its unmasked aux loss), PyTorch ops
    on the torch backend and under torch.compile's tracing of modules with a Router."""
    _swap_aux_loss_mask(model, mask)


def _swap_aux_loss_mask(model: nn.Module, mask: Optional[torch.Tensor]) -> _Swap:
    """:func:`set_aux_loss_mask`, returning the swap (value: the mask as the modules hold it) for a
    caller that puts back what they held. The mask is held as a new [T] bool tensor, on the device
    of the first module's parameters."""
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"the aux-loss mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"the aux-loss mask must be a bool or integer tensor (1 for real tokens, 0 for padding, "
                            f"as an attention_mask), got {mask.dtype}" + (
                                "; a 4-D attention mask ([batch, heads, query, key], additive) holds no value per "
                                "token: give the 2-D attention_mask, or name the forward's argument holding it "
                                "(aux_loss_mask=\"attention_mask\"), whose 4-D mask gives the keys some query attends"
                                if mask.dim() == 4 else ""))
    modules = [m for m in routed_modules(model) if m.takes_aux_loss_mask]
    if not modules and mask is not None:
        raise ValueError("the model has no routed module (MoE-LoRA layer, MoEFFN) whose aux losses a mask could mask")
    if mask is not None:
        weight = next(modules[0].parameters(), None)  # one copy to the modules' device (a data loader's CPU mask)
        # held past an inference_mode block as a normal tensor: a training step's backward saves it
        with _outside_inference_mode():
            device = mask.device if weight is None else weight.device
            # a copy to the host waits for the device (non_blocking there lets the host read it before it lands)
            mask = (mask.reshape(-1) != 0).to(device, non_blocking=device.type != "cpu")
    previous = [_aux_loss_mask_held(m) for m in modules]
    for m in modules:
        _put_aux_loss_mask(m, mask)
    return _Swap(mask, modules, previous, _put_aux_loss_mask, _holds_aux_loss_mask, _aux_loss_mask_held)


def _put_aux_loss_mask(module: nn.Module, mask: Optional[torch.Tensor]) -> None:
    module.__dict__["_aux_loss_mask"] = mask  # nn.Module.__setattr__ would register a tensor as a buffer


def _holds_aux_loss_mask(module: nn.Module, mask: Optional[torch.Tensor]) -> bool:
    return module.aux_loss_mask is mask


def _aux_loss_mask_held(module: nn.Module) -> Optional[torch.Tensor]:
    return module.aux_loss_mask


@contextlib.contextmanager
def use_aux_loss_mask(model: nn.Module, mask: Optional[torch.Tensor]):
    """``with moelora.use_aux_loss_mask(model, attention_mask): model(...)``: :func:`set_aux_loss_mask`
    for the block only (the modules hold what they held before after it). A mask that a MoELoRAModel's
    last forward gave (some of) the modules of ``model`` is put back first, as its next forward would:
    after the block the modules hold what they held before that forward (its task ids stay). Yields the
    mask as the modules hold it."""
    with _swapped(model, _swap_aux_loss_mask, _put_aux_loss_mask, mask) as swap:
        yield swap.value


def _task_ids_per_row(model: nn.Module, ids: torch.Tensor):
    """A forward pre-hook (``with_kwargs``) for ``model`` generating with one task id per example
    (``ids`` [B], which its task-routed layers hold), and for an encoder-decoder's encoder, which generate
    calls by itself: a forward over B * n rows (generate's beams and returned sequences: n rows per example,
    as transformers' ``repeat_interleave`` of the prompt, which Whisper's generate does before encoding)
    routes by each id repeated n times. The rows are read from the forward's sequence inputs
    (``_GENERATE_INPUTS``), its module's main input (Whisper's ``input_features``, ``pixel_values``), or
    its first positional argument."""
    by_rows, held = {len(ids): ids}, [len(ids)]  # the repeated ids, made once per generate call

    def hook(module, args, kwargs):
        inputs = [kwargs.get(k) for k in (*_GENERATE_INPUTS, getattr(module, "main_input_name", None))]
        inputs += list(args[:1])
        rows = next((v.shape[0] for v in inputs if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if rows is None or rows == held[0] or rows % len(ids):
            return None  # rows that fit no example: the layers' routing raises, naming the shapes
        if rows not in by_rows:
            with _outside_inference_mode():  # reused by every layer and step (see _outside_inference_mode)
                by_rows[rows] = ids.repeat_interleave(rows // len(ids))
        _swap_task_ids(model, by_rows[rows])
        held[0] = rows
        return None

    return hook


def _routing_the_assistant(assistant, model: nn.Module, ids):
    """For generate's ``assistant_model`` (assisted decoding's draft model; a MoELoRAModel or the model it wraps)
    holding task-routed layers of its own: :func:`use_task_ids` with ``ids``, generate's task ids, so that its
    drafts route by the task of the call (its layers raised "none is set"); else, and where it is ``model``
    itself (whose layers hold them already), a no-op context."""
    inner = unwrap(assistant) if isinstance(assistant, nn.Module) else None
    if inner is None or inner is model or not _task_layers(inner):
        return contextlib.nullcontext()
    return use_task_ids(inner, ids)


def _encoder_states(encoded):
    """The last hidden states in an encoder-decoder's precomputed ``encoder_outputs`` (transformers' ModelOutput,
    a dict, or a tuple), or None."""
    return (encoded.get("last_hidden_state") if isinstance(encoded, dict) else
            encoded[0] if isinstance(encoded, (tuple, list)) and encoded else None)


# Where a forward of a transformers model (each of generate's steps) finds its batch.
_GENERATE_INPUTS = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")


def step_routers(model: nn.Module, n: int = 1) -> None:
    """Advance every router's threshold schedule by ``n`` steps (call once per optimiser step).
    The routers of inactive adapters (``MoELoRAModel.inactive_adapters``), which are not trained,
    keep their step: the wrapper or the model it wraps, the same routers step."""
    check_steps(n)
    for _, m in adapters.active_named_modules(model):
        if isinstance(m, Router):
            m.step(n)


# ------------------------------------------------------------------------------- wrapper
def _is_loss_scalar(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()


def _wrapped_signature(model: nn.Module) -> Optional[inspect.Signature]:
    """The wrapped model's forward signature plus ``task_ids`` and ``aux_loss_mask`` (None if it has none)."""
    try:
        inner = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    params = [p for p in inner.parameters.values() if p.name not in ("task_ids", "aux_loss_mask")]
    var_keyword = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in ("task_ids", "aux_loss_mask")]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    return inner.replace(parameters=[self_param, *params, *added, *var_keyword])


def _forward_parameters(model: nn.Module) -> Tuple[tuple, Optional[frozenset]]:
    """(the names of the wrapped model's forward parameters a call can give by position, in order;
    the names of all its named parameters, or None where its signature cannot be read)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return (), None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return (tuple(p.name for p in itertools.takewhile(lambda p: p.kind in positional, params)),
            frozenset(p.name for p in params if p.kind not in variadic))


def _forward_with_wrapped_signature(wrapper: "MoELoRAModel"):
    """``wrapper.forward``, bound, with the wrapped model's signature: tools that read it
    (transformers' Trainer drops dataset columns the forward does not name, and passes
    ``num_items_in_batch`` only to forwards taking ``**kwargs``) then see the real one."""
    signature = _wrapped_signature(wrapper.model)
    if signature is None:
        return None

    def forward(self, *args, **kwargs):
        return type(self).forward(self, *args, **kwargs)

    forward.__signature__ = signature
    forward.__doc__ = MoELoRAModel.forward.__doc__
    return _BoundForward(forward, wrapper)


class _BoundForward:
    """``func`` bound to a wrapper, as ``types.MethodType(func, wrapper)``, but holding the wrapper weakly: the
    wrapper holds it, and a bound method there would make every wrapper a reference cycle, which ``del model``
    does not free (its GPU memory, the wrapped model's included, would wait for the garbage collector's next full
    pass). Like a bound method it has ``__func__`` (``func``, with the signature and ``self``) and ``__self__``:
    tools that bind a module's forward to another module (accelerate's ``unwrap_model(keep_fp32_wrapper=False)``,
    ``compile_regions``) bind ``func``, whose call runs the module it is bound to."""

    def __init__(self, func: Callable, wrapper: "MoELoRAModel"):
        self.__func__ = func
        self._wrapper = weakref.ref(wrapper)
        signature = func.__signature__
        self.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
        self.__doc__ = func.__doc__

    @property
    def __self__(self) -> "MoELoRAModel":
        return self._wrapper()

    def __call__(self, *args, **kwargs):
        wrapper = self._wrapper()
        if wrapper is None:
            raise ReferenceError("this forward's MoELoRAModel was deleted (its forward holds it weakly): keep the "
                                 "model, not only its forward")
        return type(wrapper).forward(wrapper, *args, **kwargs)


def _check_not_wrapped(model: nn.Module) -> None:
    """A ValueError where ``model`` is a MoELoRAModel, or holds adapter modules a live MoELoRAModel holds: a
    second wrapper around them would activate, add and save adapters the first one does not know of (after the
    second's ``set_adapter`` the first computed another adapter under its own active adapter's name)."""
    if getattr(type(model), "is_moelora_model", False):
        raise ValueError("model is a MoELoRAModel already; add an adapter to it with add_adapter(name, config) "
                         "instead of wrapping it again")

    def held() -> bool:
        return any(adapters.holder(m) is not None for m in model.modules() if adapters.is_adapter_module(m))

    if held():
        gc.collect()  # a wrapper dropped while in a reference cycle lets go of its modules at its collection
        if held():
            raise ValueError("model holds MoE-LoRA layers of a MoELoRAModel that is still alive; use that wrapper "
                             "(add_adapter(name, config) for another adapter), or copy.deepcopy it for a second "
                             "model")


def _activate_the_adapter_the_dict_holds_active(wrapper: "MoELoRAModel", state_dict, prefix: str, *_) -> None:
    """``load_state_dict`` pre-hook of a MoELoRAModel. Its state dict holds the active adapter's tensors in the
    model (``model.<module>...``) and each inactive adapter's under ``inactive_adapters.<name>.``: a dict saved
    with another adapter active (a checkpoint resumed after a ``set_adapter``) names that adapter's tensors as
    the model's. The adapter the dict holds active (the one adapter of the wrapper it stores no tensors of,
    where it stores the active adapter's) is activated for the load, and the active one put back after it
    (:func:`_put_back_the_active_adapter`), so every adapter's tensors go to its own layers."""
    stored_prefix = f"{prefix}inactive_adapters."
    stored = {k[len(stored_prefix):].partition(".")[0] for k in state_dict if k.startswith(stored_prefix)}
    held_active = [name for name in wrapper.adapter_configs if name not in stored]
    if wrapper.active_adapter not in stored:
        return
    if len(held_active) != 1:  # the model's tensors are another adapter's than the active one: which is unknown
        raise ValueError(
            f"the state dict holds adapter {wrapper.active_adapter!r} under {stored_prefix}, so its model tensors are "
            f"those of the adapter that was active when it was saved; this model's adapters it stores nothing of are "
            f"{sorted(held_active)}, not one: set_adapter(name) to the adapter it held active before loading it, "
            f"or load it into a model with the same adapters")
    requires_grad = {n: p.requires_grad for n, p in wrapper.named_parameters()}
    active, merged = wrapper.active_adapter, adapters.merged_tasks(wrapper.model)
    wrapper._swap_in(held_active[0])
    wrapper.__dict__["_active_adapter_put_back_after_load"] = (active, merged, requires_grad)


def _put_back_the_active_adapter(wrapper: "MoELoRAModel", _incompatible_keys) -> None:
    """``load_state_dict`` post-hook of a MoELoRAModel: the adapter active before the load back in the model, as
    it was (merged layers, requires_grad), after :func:`_activate_the_adapter_the_dict_holds_active`."""
    put_back = wrapper.__dict__.pop("_active_adapter_put_back_after_load", None)
    if put_back is None:
        return
    active, merged, requires_grad = put_back
    wrapper._swap_in(active)
    adapters.remerge(wrapper.model, merged)
    for n, p in wrapper.named_parameters():
        p.requires_grad_(requires_grad.get(n, False))


# transformers' methods that turn activation checkpointing on (the second is transformers 5's name for the first)
CHECKPOINTING_ENABLERS = ("gradient_checkpointing_enable", "activation_checkpointing_enable")


class MoELoRAModel(nn.Module):
    """A model with MoE-LoRA layers injected, shaped like PEFT's PeftModel; built by
    :func:`moelora.get_moelora_model`, which injects ``config``'s layers into ``model`` and wraps it
    as ``MoELoRAModel(model, config, adapter_name)`` (the adapter's name, default "default").

    ``forward(*args, labels=None, task_ids=None, **kwargs)`` calls the wrapped model
    (``self.model``) and adds the auxiliary loss to its loss (see the module docstring).
    ``inspect.signature(wrapper.forward)`` shows the wrapped model's arguments. Attributes
    the wrapper lacks are looked up on the wrapped model.

    Named adapters as PEFT's (:mod:`moelora.tuner.adapters`): the first is ``"default"``;
    ``add_adapter`` / ``load_adapter`` add more, ``set_adapter`` activates one,
    ``delete_adapter`` drops one; ``moelora_config`` is the active adapter's config and
    ``adapter_configs`` holds them all. Inactive adapters live in ``inactive_adapters``, frozen.
    One wrapper per model: wrapping a MoELoRAModel, or layers a live one holds, raises (``copy.deepcopy`` of a
    wrapper is a second model with its own layers, as a frozen reference model).
    """

    is_moelora_model = True  # what moelora.tuner.targets.unwrap looks for

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """transformers' mark of a model with trainable adapters attached, which Trainer reads before it trains
        a quantised model (trainer_utils.validate_quantization_for_training: a quantised model without it is
        refused as "purely quantized"; QLoRA with bitsandbytes): True unless the wrapped model's quantisation
        method cannot train (its ``hf_quantizer.is_trainable``), which Trainer then refuses."""
        return getattr(getattr(self.model, "hf_quantizer", None), "is_trainable", True)

    def __init__(self, model: nn.Module, config: MoELoRAConfig, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        adapters.check_adapter_name(adapter_name, {}, must_exist=False)
        _check_not_wrapped(model)
        self.model = model
        self.training = model.training  # the wrapped model's mode (what add_adapter gives new adapters)
        self.adapter_configs: Dict[str, MoELoRAConfig] = {adapter_name: config}
        self._active_adapter = adapter_name  # see the active_adapter property
        self.inactive_adapters = nn.ModuleDict().train(model.training)
        # whether the active adapter is frozen: built with inference_mode (loaded with is_trainable=False), or
        # activated by set_adapter(..., inference_mode=True)
        self._active_frozen = config.inference_mode
        # the _Swaps (task ids, aux-loss mask) of the last forward, put back by the next (a list mutated
        # in place: dynamo 2.11 cannot trace a module's __dict__.pop)
        self._forward_swaps = []
        # what gives the modules back what they held before a backward's routing hooks gave them a forward's swaps
        # again, until that backward's end runs it (see _backward_routes_as_forward): left by a backward that raised
        self._backward_put_backs = []
        self._task_ids_owner = object()  # what the layers hold beside the task ids its forward gives them
        # adapter name -> the routing records (routing_records) of a stored adapter's last forward while it was active,
        # given back by set_adapter (see _swap_in)
        self._stored_routing_records: Dict[str, list] = {}
        # the forward argument whose tensor is the aux-loss mask when aux_loss_mask is not given (e.g.
        # "attention_mask": transformers' Trainer passes the batch's columns only)
        self.aux_loss_mask_from: Optional[str] = None
        self._bind_forward()
        adapters.register_wrapper(self)
        _clear_aux_losses_at_deletion(self)
        adapters.claim(self, adapters.adapter_modules(model).values())
        self._register_load_hooks()
        if config.inference_mode:
            self._mark_trainable()
        self._inputs_require_grad_for_checkpointing()  # checkpointing enabled before wrapping, as PEFT's wrapper

    def _register_load_hooks(self) -> None:
        """The load_state_dict hooks that load a dict saved with another adapter active into each adapter's own
        layers (:func:`_activate_the_adapter_the_dict_holds_active`), unless registered already."""
        pre = [getattr(h, "hook", h) for h in self._load_state_dict_pre_hooks.values()]
        if _activate_the_adapter_the_dict_holds_active not in pre:
            self.register_load_state_dict_pre_hook(_activate_the_adapter_the_dict_holds_active)
        if _put_back_the_active_adapter not in self._load_state_dict_post_hooks.values():
            self.register_load_state_dict_post_hook(_put_back_the_active_adapter)

    def _bind_forward(self) -> None:
        # where forward finds a named argument
        self._positional_parameters, self._parameter_names = _forward_parameters(self.model)
        forward = _forward_with_wrapped_signature(self)
        if forward is not None:
            self.forward = forward

    # The forward with the wrapped model's signature is a local function bound to the wrapper:
    # pickling would store it as getattr(wrapper, "forward"), the class's, without the signature
    # (transformers' Trainer would then drop every dataset column of a torch.load-ed model). Copies
    # (pickle, torch.save, copy.deepcopy) leave it out and bind their own.
    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("forward", None)
        state["_backward_put_backs"] = []  # closures over this model's modules
        state["_stored_routing_records"] = {}  # autograd graphs (copies start without records, see RoutedModule)
        return state

    def __setstate__(self, state):
        if "active_adapter" in state:  # pickled when it was a plain attribute
            state["_active_adapter"] = state.pop("active_adapter")
        super().__setstate__(state)
        self._backward_put_backs = []  # a wrapper pickled before it had them too
        self._stored_routing_records = {}
        self._register_load_hooks()  # a wrapper pickled before it had them
        self._bind_forward()
        adapters.register_wrapper(self)
        _clear_aux_losses_at_deletion(self)
        adapters.claim(self, (m for m in self.modules() if adapters.is_adapter_module(m)))  # inactive ones too

    def _replicate_for_data_parallel(self):
        """nn.DataParallel's replica (one per device and forward; HF Trainer uses it with several GPUs and no
        distributed launch): it copies the wrapper's ``__dict__``, so the forward there is bound to the replica,
        and the replica holds its own forward's swaps (task ids, aux-loss mask): in the original's list, a
        replica's forward would put back what the original's forward (or another replica's, running in another
        thread) gave its layers, which a gradient-checkpointed layer still needs for its backward."""
        replica = super()._replicate_for_data_parallel()
        replica._forward_swaps = []
        replica._backward_put_backs = []
        forward = self.__dict__.get("forward")
        if isinstance(forward, _BoundForward):
            replica.__dict__["forward"] = _BoundForward(forward.__func__, replica)
        return replica

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            value = getattr(super().__getattr__("model"), name)
        if name == "generate":  # only where the wrapped model has one (hasattr stays the model's)
            return functools.wraps(value)(functools.partial(self._generate, value))
        if name == "generate_batch":  # transformers' continuous batching, likewise
            return functools.wraps(value)(functools.partial(self._generate_batch, value))
        if name == "resize_token_embeddings":  # likewise
            return functools.wraps(value)(functools.partial(self._resize_token_embeddings, value))
        if name in CHECKPOINTING_ENABLERS:  # likewise
            return functools.wraps(value)(functools.partial(self._enable_checkpointing, value))
        return value

    def _enable_checkpointing(self, enable, *args, **kwargs):
        """``wrapper.gradient_checkpointing_enable`` / ``activation_checkpointing_enable``: the wrapped model's,
        then :meth:`_inputs_require_grad_for_checkpointing`."""
        out = enable(*args, **kwargs)
        self._inputs_require_grad_for_checkpointing()
        return out

    def _inputs_require_grad_for_checkpointing(self) -> None:
        """Under reentrant activation checkpointing (a transformers model's, enabled before or after wrapping) make
        the wrapped model's input embeddings' outputs require grad (its ``enable_input_require_grads``), as PEFT does
        and transformers' ``activation_checkpointing_enable`` does for a model with adapters: a reentrant
        checkpoint whose inputs do not require grad passes no gradient to the adapters inside it. transformers
        hooks them itself for a model whose main input is input_ids only: a ViT's (pixel_values) or Whisper's
        (input_features) adapters got no gradient. Nothing is hooked while the adapter is frozen, under
        non-reentrant checkpointing (which needs no hook) or where the model has its hooks already; set_adapter
        making the adapter trainable hooks them then."""
        model = self.model
        if (self._active_frozen or not hasattr(model, "enable_input_require_grads")
                or getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook")):
            return
        checkpoints = [m._gradient_checkpointing_func for m in model.modules()
                       if getattr(m, "gradient_checkpointing", False) is True
                       and callable(getattr(m, "_gradient_checkpointing_func", None))]
        # torch.utils.checkpoint's use_reentrant defaults to True where not given (before torch 2.9)
        if any(getattr(f, "keywords", {}).get("use_reentrant", True) is not False for f in checkpoints):
            model.enable_input_require_grads()

    def forward(self, *args, labels=None, task_ids=None, aux_loss_mask=None, **kwargs):
        """Run the wrapped model (``labels`` are passed on when given; ``task_ids`` go to the
        task-routed layers, and to the wrapped model where its forward takes ``task_ids`` itself) and add
        the auxiliary loss to its loss once.

        ``aux_loss_mask``: the real tokens the aux losses are taken over (see
        :func:`moelora.set_aux_loss_mask`), a tensor or the name of another argument of this
        forward holding it (``"attention_mask"``, given by keyword or position; a 4-D one there, [batch, heads,
        query, key], with input_ids or inputs_embeds: the keys some query attends); when not given,
        the argument named by the wrapper's ``aux_loss_mask_from`` attribute (None: every token
        counts).

        ``task_ids`` and the mask stay on the layers until the next forward of the wrapper, which
        first puts back what they held before (unless changed since): a gradient-checkpointed layer
        runs its forward again in backward, and must route that recomputation by the same task ids.
        A backward through this forward's output (or the aux losses its layers recorded) after other
        forwards (two forwards with other ids or masks, one backward of both) gives the layers this
        forward's ids and mask again while it runs, and back what they held at its end (not under
        torch.compile, where the next forward's rule alone holds).
        A :func:`moelora.use_task_ids` (:func:`moelora.use_aux_loss_mask`) block given a module they
        are on (the wrapper, a module holding it, a module inside it) after this forward puts back the
        ids (the mask) first too, so that after the block the layers hold what they held before this
        forward; a block that the wrapped model's forward runs leaves them on the other layers.

        A gradient checkpoint around the wrapper recomputes this forward in backward: it records and adds the aux
        loss as the forward did (a reentrant checkpoint's forward ran without gradients: the recomputed loss
        trains the routers), then gives back the forward's losses and statistics (docs/layers.md), with the
        recomputation's ``aux_loss_lost_grad`` (whether the loss backward ran through trained the routers)."""
        if running_in_backward():
            records = routing_records(self.model)
            try:
                with recording_in_backward():
                    return self._forward(args, labels, task_ids, aux_loss_mask, kwargs)
            finally:
                restore_routing_records([(m, (loss, stats, m.aux_loss_lost_grad)) for m, (loss, stats, _) in records])
        return self._forward(args, labels, task_ids, aux_loss_mask, kwargs)

    def _forward(self, args: tuple, labels, task_ids, aux_loss_mask, kwargs: dict):
        """:meth:`forward`."""
        clear_aux_losses(self.model)
        self._put_back_forward_swaps()
        if labels is not None:
            kwargs["labels"] = labels
        # Recorded once the wrapped model's forward has run (or raised): a use_task_ids / use_aux_loss_mask block
        # that forward runs on one of its modules must not put them back (on every layer) first, as a block
        # after this forward does (see _swapped); like any block, it gives its modules back what they held.
        swaps = []
        try:
            route = task_ids is not None
            if self._takes_task_ids():
                task_ids, route = self._task_ids_of_wrapped(task_ids, args, kwargs)
            if route:
                swaps.append(_swap_task_ids(self.model, _held_for_the_call(task_ids), self._task_ids_owner))
            if aux_loss_mask is None:
                aux_loss_mask = self.aux_loss_mask_from
            if isinstance(aux_loss_mask, str):  # not given: no padding to mask
                aux_loss_mask = self._of_the_new_tokens(self._argument(aux_loss_mask, args, kwargs), args, kwargs)
            if aux_loss_mask is not None and getattr(getattr(self.model, "config", None), "is_encoder_decoder",
                                                     False):
                raise ValueError(
                    "aux_loss_mask: an encoder-decoder model's layers route the source tokens (encoder, "
                    "cross-attention keys and values) or the target tokens (decoder), which one mask cannot cover, "
                    "and where both have one length the wrong one would pass silently; set the source mask on the "
                    "encoder with moelora.set_aux_loss_mask(model.get_encoder(), attention_mask) instead")
            if aux_loss_mask is not None:
                swaps.append(_swap_aux_loss_mask(self.model, aux_loss_mask))
            output = self.model(*args, **kwargs)
        finally:
            self._forward_swaps.extend(swaps)  # in place (see __init__)
        hooked = swaps and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        recorded = _recorded_aux_losses(self.model) if hooked else None  # one walk over the modules for both
        if self.moelora_config.add_aux_loss_to_output:
            output = self._with_aux_loss(output, labels is not None, recorded)
        if hooked:
            _backward_routes_as_forward(output, [m.last_aux_loss for m in recorded], swaps, self)
        return output

    def _takes_task_ids(self) -> bool:
        """Whether the wrapped model's forward takes ``task_ids`` itself (per-task heads; a signature that cannot
        be read: no)."""
        return self._parameter_names is not None and "task_ids" in self._parameter_names

    def _task_ids_of_wrapped(self, task_ids, args: tuple, kwargs: dict):
        """(the call's task ids, whether to route the task-routed layers by them) for a wrapped model whose
        forward takes ``task_ids`` itself (per-task heads): ids given to the wrapper by keyword are passed on
        to it (into ``kwargs``), ids it is given by position are read from ``args``; the layers route by them
        where the model has task-routed layers (a model without any takes its ids for itself)."""
        if task_ids is not None:
            kwargs["task_ids"] = task_ids
        else:
            task_ids = self._argument("task_ids", args, {})
        return task_ids, task_ids is not None and bool(_task_layers(self.model))

    def _generate(self, generate, *args, task_ids=None, **kwargs):
        """``wrapper.generate``: the wrapped model's ``generate`` (transformers' GenerationMixin), run
        as a forward of the wrapper: the stored aux losses are cleared and the last forward's
        ``task_ids`` put back first (see :meth:`forward`). ``task_ids`` (an int, or one id per example
        of the prompt batch) route every step, for this call only: per-example ids are repeated over
        the rows generate runs per example (``num_beams``, ``num_return_sequences``), as transformers
        repeats the prompt; an ``assistant_model`` (assisted decoding's draft) with task-routed layers routes by
        them too. Per-token ids cannot route the tokens generate adds: they raise. Aux-loss
        masks are off while it runs (its steps route other numbers of tokens; nothing trains)."""
        with self._generating():
            return self._generate_with_task_ids(generate, args, kwargs, task_ids)

    @contextlib.contextmanager
    def _generating(self):
        """What a generation (``generate``, ``generate_batch``) runs in, as a forward of the wrapper: the stored aux
        losses cleared, the last forward's swaps put back first, no aux-loss mask."""
        clear_aux_losses(self.model)
        self._put_back_forward_swaps()
        with use_aux_loss_mask(self.model, None):
            yield

    def _generate_with_task_ids(self, generate, args, kwargs, task_ids):
        if task_ids is not None and self._takes_task_ids():
            kwargs["task_ids"] = task_ids  # the wrapped forward's own (see forward): generate gives them to each step
            if not _task_layers(self.model):
                task_ids = None
        if task_ids is None:
            return generate(*args, **kwargs)
        if isinstance(task_ids, torch.Tensor) and task_ids.dim() > 1:
            raise ValueError(f"task_ids of generate must be an int or one id per example ([batch]), got shape "
                             f"{tuple(task_ids.shape)}: per-token ids cannot route the tokens generate adds")
        per_example = isinstance(task_ids, torch.Tensor) and task_ids.dim() == 1 and len(task_ids) > 0
        task_ids = _held_for_the_call(task_ids)
        batch = self._prompt_batch(args, kwargs)
        if per_example and batch is not None and len(task_ids) != batch:
            raise ValueError(f"task_ids holds {len(task_ids)} ids but the prompt batch has {batch} examples "
                             "(one id per example)")
        subsets = self._whisper_row_subsets(args, kwargs) if per_example else None
        if subsets is not None:
            if not bool((task_ids == task_ids[0]).all()):
                raise ValueError(f"task_ids: one id per example cannot route Whisper's {subsets}, whose steps run a "
                                 "subset of the examples' rows that the ids cannot be matched to; generate each "
                                 "task's examples in a call of their own, with an int task id")
            task_ids, per_example = task_ids[0], False  # one task: the subsets route by it
        with use_task_ids(self.model, task_ids) as held, _routing_the_assistant(kwargs.get("assistant_model"),
                                                                                self.model, held):
            hooks = []
            if per_example:
                per_row = _task_ids_per_row(self.model, held)
                hooks = [module.register_forward_pre_hook(per_row, with_kwargs=True)
                         for module in (self.model, self._encoder()) if module is not None]
            try:
                return generate(*args, **kwargs)
            finally:
                for hook in hooks:
                    hook.remove()

    def _whisper_row_subsets(self, args: tuple, kwargs: dict) -> Optional[str]:
        """What makes Whisper's generate (a model with ``generate_with_fallback``) run subsets of the batch's rows,
        or None: long-form transcription (more input frames than one segment: examples that end drop out of the
        batch) and temperature fallback (several temperatures and a threshold that makes rows fall back: only those run
        again)."""
        model = self.model
        if not hasattr(model, "generate_with_fallback"):
            return None
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

        def setting(name):
            return kwargs[name] if name in kwargs else getattr(config, name, None)

        temperature = setting("temperature")
        thresholds = [setting(name) for name in ("compression_ratio_threshold", "logprob_threshold")]
        if isinstance(temperature, (list, tuple)) and len(temperature) > 1 and any(t is not None for t in thresholds):
            return "temperature fallback (several temperatures and a compression-ratio or log-prob threshold)"
        encoder = self._encoder()
        try:
            stride = encoder.conv1.stride[0] * encoder.conv2.stride[0]
            segment = stride * model.config.max_source_positions
        except (AttributeError, TypeError, IndexError):
            return None
        features = kwargs.get("input_features", args[0] if args else None)
        encoded = _encoder_states(kwargs.get("encoder_outputs"))
        frames = (features.shape[-1] if isinstance(features, torch.Tensor) else
                  encoded.shape[1] * stride if isinstance(encoded, torch.Tensor) and encoded.dim() == 3 else 0)
        return f"long-form transcription ({frames} input frames, segments of {segment})" if frames > segment else None

    def _encoder(self) -> Optional[nn.Module]:
        """The encoder that an encoder-decoder's generate runs by itself (``get_encoder()``, outside the wrapped
        model's forward), or None (a decoder-only model)."""
        if not getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            return None
        encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
        return encoder if isinstance(encoder, nn.Module) and encoder is not self.model else None

    def _generate_batch(self, generate_batch, *args, task_ids=None, **kwargs):
        """``wrapper.generate_batch``: the wrapped model's continuous batching (transformers' ``generate_batch``) run
        as :meth:`_generate` runs ``generate``: ``task_ids``, an int (or a 0-d tensor), route every request of the
        call (transformers took them for a generation argument it ignores, so the layers routed by whatever ids
        they held, or raised in its worker thread, which returns empty generations). Continuous batching packs the
        requests' tokens into one row and passes no other argument to the forward: one id per prompt, and a
        wrapped forward that takes ``task_ids`` itself, raise."""
        if task_ids is not None and (isinstance(task_ids, torch.Tensor) and task_ids.dim() > 0
                                     or not isinstance(task_ids, torch.Tensor) and not is_integral(task_ids)):
            raise ValueError("task_ids of generate_batch must be an int (or a 0-d tensor): continuous batching packs "
                             "the requests' tokens into one row, which per-prompt ids cannot route; call "
                             "generate_batch once per task, or generate(..., task_ids=ids)")
        if task_ids is not None and self._takes_task_ids():
            raise ValueError("task_ids: the wrapped model's forward takes task_ids itself, which continuous batching "
                             "(generate_batch) cannot pass on to it: use generate(..., task_ids=ids)")
        with self._generating():
            if task_ids is None:
                return generate_batch(*args, **kwargs)
            with use_task_ids(self.model, _held_for_the_call(task_ids)):
                return generate_batch(*args, **kwargs)

    def _prompt_batch(self, args: tuple, kwargs: dict) -> Optional[int]:
        """The number of examples of a generate call's prompt (None where none is found): of its first tensor
        among the positional prompt, ``inputs``, ``input_ids``, ``inputs_embeds``, the model's main input
        (``main_input_name``: Whisper's ``input_features``, a vision encoder-decoder's ``pixel_values``), an
        encoder-decoder's precomputed ``encoder_outputs`` and the ``attention_mask``."""
        encoded = _encoder_states(kwargs.get("encoder_outputs"))
        candidates = [args[0] if args else None] + [kwargs.get(k) for k in (
            "inputs", "input_ids", "inputs_embeds", getattr(self.model, "main_input_name", None))]
        candidates += [encoded, kwargs.get("attention_mask")]
        return next((len(c) for c in candidates if isinstance(c, torch.Tensor) and c.dim() > 0), None)

    def _put_back_forward_swaps(self) -> None:
        """Put back what the modules held before the last forward's ``task_ids`` and ``aux_loss_mask``
        (see :meth:`forward`), where they still hold that forward's."""
        waiting = self._backward_put_backs  # left by a backward that raised: it held the modules for its forward
        while waiting:
            waiting[-1]()
        swaps = self._forward_swaps
        while swaps:
            swaps.pop().put_back(where_unchanged=True)

    def _argument(self, name: str, args: tuple, kwargs: dict):
        """The wrapped model's forward argument ``name`` in a call's ``args`` and ``kwargs`` (by keyword
        or position), or None where the call does not give it; a ValueError where the forward takes no
        parameter of that name (a misspelt name would otherwise count every token)."""
        if name in kwargs:
            return kwargs[name]
        if self._parameter_names is not None and name not in self._parameter_names:
            raise ValueError(f"aux_loss_mask (or aux_loss_mask_from) names the argument {name!r}, which is not a "
                             f"parameter of the wrapped model's forward (it takes {sorted(self._parameter_names)}) "
                             "nor given to this call")
        names = self._positional_parameters
        position = names.index(name) if name in names else len(args)
        return args[position] if position < len(args) else None

    def _of_the_new_tokens(self, mask, args: tuple, kwargs: dict):
        """``mask``, read from another argument (the attention mask), for the tokens this call routes (a 4-D
        attention mask, [batch, heads, query, key], where the call routes a sequence, input_ids or inputs_embeds: the
        keys some query attends, real_tokens_of_attention_mask; another 4-D mask, a convolution's [N, 1, H, W], is
        one value per position): in a decoding step with a KV cache (``cache``, transformers 5's name, or
        ``past_key_values``: any of ``CACHE_KWARGS``) transformers' attention mask covers the cached tokens too
        ([batch, past + new], the new ones last), so its last columns."""
        def given(name):
            known = self._parameter_names is None or name in self._parameter_names or name in kwargs
            return self._argument(name, args, kwargs) if known else None

        if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
            return mask
        if mask.dim() == 4:
            if given("input_ids") is None and given("inputs_embeds") is None:
                return mask
            mask = real_tokens_of_attention_mask(mask)  # the keys some query attends, [batch, keys]
        if all(given(name) is None for name in CACHE_KWARGS):
            return mask
        ids, embeds = given("input_ids"), given("inputs_embeds")
        new = (ids.shape[-1] if isinstance(ids, torch.Tensor) else
               embeds.shape[-2] if isinstance(embeds, torch.Tensor) else mask.shape[-1])
        return mask[:, mask.shape[-1] - new:] if 0 < new < mask.shape[-1] else mask

    def _with_aux_loss(self, output, labels_given: bool, recorded: Optional[List[RoutedModule]] = None):
        """``output`` with the aux loss added to its loss (from ``recorded``, :func:`_recorded_aux_losses`, where
        given)."""
        if isinstance(output, dict):
            loss = output.get("loss")
            if loss is not None:
                output["loss"] = loss + _aux_loss_of(self.model, recorded).to(loss.dtype)
        elif labels_given and type(output) is tuple and output and _is_loss_scalar(output[0]):
            output = (output[0] + _aux_loss_of(self.model, recorded).to(output[0].dtype),) + output[1:]
        return output

    # helpers bound to the wrapped model
    def aux_loss(self) -> torch.Tensor:
        """:func:`moelora.aux_loss` of the wrapped model (already in ``outputs.loss``: do not add it twice)."""
        return aux_loss(self.model)

    def router_stats(self):
        """:func:`moelora.router_stats` of the wrapped model."""
        return router_stats(self.model)

    def set_task_ids(self, ids) -> None:
        """:func:`moelora.set_task_ids` on the wrapped model."""
        set_task_ids(self.model, ids)

    def step_routers(self, n: int = 1) -> None:
        """:func:`moelora.step_routers` on the wrapped model: once per optimiser step."""
        step_routers(self.model, n)

    def _resize_token_embeddings(self, resize, *args, **kwargs):
        """``wrapper.resize_token_embeddings``: the wrapped model's (transformers'), refused before any change
        where an adapter (active or not) adapts the input embeddings or the output head, or saves them whole
        (``modules_to_save``): its tensors there have one row / column per token of the old vocabulary, and
        transformers raised only at the module it could not resize, the input embeddings resized already."""
        inner = self.model
        embeddings = set()
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            get = getattr(inner, getter, None)
            module = get() if callable(get) else None
            if module is not None:
                embeddings.add(id(module))
        held = adapters.held_modules(self)
        adapted = sorted(n for n, m in inner.named_modules() if id(m) in embeddings and n in held)
        if adapted:
            raise ValueError(
                f"resize_token_embeddings: {adapted[0]} holds adapter {held[adapted[0]]!r}, whose tensors have one "
                "row / column per token of the current vocabulary; resize the base model's token embeddings before "
                "get_moelora_model, or leave the embeddings and output head out of target_modules and "
                "modules_to_save")
        return resize(*args, **kwargs)

    def get_nb_trainable_parameters(self):
        """(trainable parameters, all parameters) of the model and its adapters, inactive ones included, as PEFT's:
        a bitsandbytes 4-bit weight (Params4bit, two values in each byte of its packed storage) counts its values,
        not its bytes."""
        counts = [(p.requires_grad, p.numel() * (2 * p.element_size() if type(p).__name__ == "Params4bit" else 1))
                  for p in self.parameters()]
        return sum(n for trainable, n in counts if trainable), sum(n for _, n in counts)

    def print_trainable_parameters(self) -> None:
        """Print the counts of :meth:`get_nb_trainable_parameters`, as PEFT's."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    @contextlib.contextmanager
    def disable_adapter(self):
        """``with model.disable_adapter():`` runs the base model (as PEFT's); an adapter activated inside
        the block (:meth:`set_adapter`) runs after it as the model did before it. The routing records (aux losses,
        router statistics) of the forward before the block are given back at its end: a reference model's forward
        in the block (DPO's, KTO's, PPO's: the policy's forward, the reference's under the block, then the loss
        with ``moelora.aux_loss(model)``) leaves the policy's aux loss as it was."""
        modules = list(adapters.adapter_modules(self.model).values())
        previous = [m.disable_adapters for m in modules]
        records, adapter = routing_records(self.model), self.active_adapter
        self.disable_adapter_layers()
        try:
            yield
        finally:
            active = {id(m) for m in routed_modules(self.model)}  # not an adapter stored by a set_adapter in the block
            restore_routing_records([(m, record) for m, record in records if id(m) in active])
            if adapter != self.active_adapter and adapter in self._stored_routing_records:
                self._stored_routing_records[adapter] = records  # not the cleared records of a forward in the block
            for m, prev in zip(modules, previous):
                m.disable_adapters = prev
            recorded = {id(m) for m in modules}
            for m in adapters.adapter_modules(self.model).values():
                if id(m) not in recorded:
                    m.disable_adapters = any(previous)

    def merge_adapter(self, task: Optional[int] = None, *, safe_merge: bool = False,
                      adapter_names: Optional[List[str]] = None) -> None:
        """Fold every layer's adapter into its base weight (``task`` for task-routed layers), or none:
        if one layer cannot merge (a learned router, merged already; with ``safe_merge``, as PEFT's, a
        merged weight holding NaN or Inf) nothing is merged and the error names that layer.
        ``adapter_names`` (PEFT's): None or a list naming the active adapter, the one moelora merges."""
        self._check_merged_adapters(adapter_names)
        merge.merge_adapter(self.model, task, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter`: every merged layer's adapter is taken back out of its base weight."""
        merge.unmerge_adapter(self.model)

    def merge_and_unload(self, task: Optional[int] = None, *, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[List[str]] = None) -> nn.Module:
        """Merge the adapter into the base weights and return the plain model (saved modules:
        their trained copies). ``progressbar``, ``safe_merge`` and ``adapter_names`` as PEFT's (a tqdm bar
        over the layers; see :meth:`merge_adapter`)."""
        self._check_merged_adapters(adapter_names)
        merge.merge_and_unload(self.model, task, progressbar=progressbar, safe_merge=safe_merge)
        adapters.unwrap_modules_to_save(self.model)
        return self.model

    def _check_merged_adapters(self, adapter_names) -> None:
        """ValueError unless ``adapter_names`` is None or lists the active adapter alone: PEFT's merge sums the
        deltas of the adapters it names, moelora merges the active one (its inactive adapters run nothing)."""
        if adapter_names is None:
            return
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be None or a list of adapter names, got {adapter_names!r}")
        unknown = [n for n in adapter_names if n not in self.adapter_configs]
        if unknown:
            raise ValueError(f"adapter_names: no adapter named {unknown} (the adapters: {list(self.adapter_configs)})")
        if list(dict.fromkeys(adapter_names)) != [self.active_adapter]:
            raise ValueError(f"adapter_names: moelora merges the active adapter alone ({self.active_adapter!r}), got "
                             f"{list(adapter_names)}; set_adapter(name) first to merge another one")

    def unload(self) -> nn.Module:
        """The base model back, without merging: every adapter layer replaced by its base layer (a merged one
        unmerged first) and each saved module (``modules_to_save``) by its trained copy, as PEFT's."""
        adapters.unwrap_modules_to_save(self.model)
        adapters.deactivate(self.model)
        return self.model

    def save_pretrained(self, save_directory: str, state_dict: Optional[dict] = None,
                        is_main_process: bool = True, selected_adapters: Optional[List[str]] = None,
                        max_shard_size=None, safe_serialization: bool = True) -> None:
        """Write the adapters (see :func:`moelora.save_pretrained`; "default" in
        ``save_directory``, the others in subfolders named after them, as PEFT). Takes the
        arguments transformers passes to ``PreTrainedModel.save_pretrained``: ``state_dict``
        (e.g. a gathered FSDP state dict) is read instead of the model's own, only the main
        process writes, ``max_shard_size`` splits an adapter into safetensors shards with an index
        (transformers' layout), and ``safe_serialization`` is ignored: the weights are always
        safetensors. Any other keyword is a TypeError."""
        persistence.save_pretrained(self, save_directory, state_dict=state_dict, selected_adapters=selected_adapters,
                                    is_main_process=is_main_process, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str, is_trainable: bool = False,
                        adapter_name: str = DEFAULT_ADAPTER) -> "MoELoRAModel":
        """:func:`moelora.from_pretrained`: ``model`` (a fresh base model) with the adapter saved in
        ``directory`` as ``adapter_name``; frozen unless ``is_trainable``."""
        return from_pretrained(model, directory, is_trainable=is_trainable, adapter_name=adapter_name)

    # ----------------------------------------------------------------- PEFT adapter conventions
    @property
    def moelora_config(self) -> MoELoRAConfig:
        """The active adapter's configuration."""
        return self.adapter_configs[self.active_adapter]

    @property
    def active_peft_config(self) -> MoELoRAConfig:
        """PEFT's name for :attr:`moelora_config` (the active adapter's configuration)."""
        return self.moelora_config

    @property
    def peft_config(self) -> Dict[str, MoELoRAConfig]:
        """PEFT's name for :attr:`adapter_configs` (adapter name -> config; the same dict)."""
        return self.adapter_configs

    @property
    def base_model(self) -> "MoELoRAModel":
        """The wrapper itself, as PEFT's ``PeftModel.base_model`` (its tuner model: ``.model`` is the wrapped
        model, other attributes are looked up there), so that PEFT's ``model.base_model.model...`` paths reach
        the wrapped model. The wrapped transformers model's own ``base_model`` (its backbone) is
        ``model.get_base_model().base_model``."""
        return self

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with the adapter layers in it), as PEFT's ``get_base_model``."""
        return self.model

    @property
    def active_adapter(self) -> str:
        """The active adapter's name. Read-only: :meth:`set_adapter` activates an adapter (assigning the name alone, as
        PEFT's ``PeftModel.active_adapter`` takes it, would leave the active adapter's layers in the model)."""
        return self._active_adapter

    @active_adapter.setter
    def active_adapter(self, adapter_name) -> None:
        raise AttributeError(f"active_adapter is read-only; activate an adapter with set_adapter({adapter_name!r})")

    @property
    def active_adapters(self) -> List[str]:
        """``[active_adapter]`` (PEFT's list form)."""
        return [self.active_adapter]

    def get_layer_status(self) -> List[adapters.LayerStatus]:
        """PEFT's ``get_layer_status``: one :class:`moelora.tuner.adapters.LayerStatus` (PEFT's fields) per adapted
        place of the model (the active adapter's layers and those only stored adapters adapt)."""
        return adapters.layer_status(self)

    def get_model_status(self) -> adapters.ModelStatus:
        """PEFT's ``get_model_status``: the layers' statuses combined (:class:`moelora.tuner.adapters.ModelStatus`)."""
        return adapters.model_status(self)

    def enable_adapter_layers(self) -> None:
        """Run the adapter again after :meth:`disable_adapter_layers`."""
        adapters.set_adapter_layers(self.model, True)

    def disable_adapter_layers(self) -> None:
        """Run the base model (merged layers are unmerged first) until :meth:`enable_adapter_layers`. Warns
        where what stays on makes the output differ from the base model's: trained biases (``bias`` not
        "none", as PEFT warns), upcycled FFNs and MoLEx (structural edits, which no adapter switch turns off)."""
        kept = [f"bias={self.moelora_config.bias!r}"] if self.moelora_config.bias != "none" else []
        kept += [op for op, _ in _structure.recorded(self.model)]
        if kept:
            warnings.warn(f"disabling the adapter layers leaves {', '.join(kept)} in place: the model computes the "
                          "base model with them, not the base model's output", stacklevel=2)
        adapters.set_adapter_layers(self.model, False)

    def add_adapter(self, adapter_name: str, config: MoELoRAConfig) -> None:
        """Add an adapter built from ``config`` (inactive and frozen; see :meth:`set_adapter`), its
        modules in the model's train / eval mode (``self.training``). It is built on the unmerged base
        layers: a merged active adapter is unmerged meanwhile, and merged again after; the loss and statistics
        of its last forward stay."""
        adapters.check_adapter_name(adapter_name, self.adapter_configs, must_exist=False)
        check_model_and_config(self.model, config)
        config = with_default_targets(self.model, config)  # before the active adapter leaves the model
        merged, records = adapters.merged_tasks(self.model), routing_records(self.model)
        active = adapters.deactivate(self.model)
        try:
            config = with_expert_counts_listed(self.model, config, inject_moelora(self.model, config))
            new = adapters.deactivate(self.model)
        finally:
            adapters.activate(self.model, active)
            adapters.remerge(self.model, merged)
            restore_routing_records(records)
            self._mark_trainable()
        self.inactive_adapters[adapter_name] = adapters.stored(new).train(self.training)
        self.adapter_configs[adapter_name] = config
        adapters.claim(self, new.values())

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Activate ``adapter_name``: its layers go into the model, trainable unless ``inference_mode``
        (frozen then), as PEFT's: also an adapter loaded or built for inference, and the active adapter
        itself (only its trainability is set), enabled or disabled as the model is
        (:meth:`disable_adapter_layers` switches the model off, not one adapter, as PEFT's); the active
        one is stored, frozen (merged layers are unmerged), with the aux losses and router statistics of its last
        forward, which come back with it: a reference adapter's forward between the policy's forward and its loss
        (TRL's ``ref_adapter_name``: ``set_adapter("reference")``, its forward, ``set_adapter("default")``) leaves
        ``moelora.aux_loss(model)`` the policy's."""
        adapters.check_adapter_name(adapter_name, self.adapter_configs, must_exist=True)
        check_field("inference_mode", inference_mode, BOOL)
        if adapter_name != self.active_adapter:
            self._swap_in(adapter_name)
        self._active_frozen = inference_mode
        self._mark_trainable()
        self._inputs_require_grad_for_checkpointing()  # a frozen adapter made trainable trains under checkpointing

    def _swap_in(self, adapter_name: str) -> None:
        """Put the stored adapter ``adapter_name``'s layers into the model, the active one's into the store."""
        incoming = self.inactive_adapters[adapter_name]
        merged, records = adapters.merged_tasks(self.model), routing_records(self.model)
        outgoing = adapters.deactivate(self.model)
        disabled = any(m.disable_adapters for m in outgoing.values())
        try:
            adapters.activate(self.model, dict(incoming.items()))
        except BaseException:  # nothing of it went in: the active adapter goes back as it was (merged, records)
            adapters.activate(self.model, outgoing)
            adapters.remerge(self.model, merged)
            restore_routing_records(records)
            raise
        adapters.set_adapter_layers(self.model, enabled=not disabled)
        del self.inactive_adapters[adapter_name]
        self.inactive_adapters[self.active_adapter] = adapters.stored(outgoing).train(self.training)
        # the routing records go aside with their adapter (deactivate cleared them on its modules, which a walk of
        # the wrapper reaches: a stored adapter's loss must not count) and come back with it
        restore_routing_records(self._stored_routing_records.pop(adapter_name, []))
        self._stored_routing_records[self.active_adapter] = records
        self._active_adapter = adapter_name
        self._rehook_input_embeddings()

    def _rehook_input_embeddings(self) -> None:
        """Hook the input embeddings in the model again where the wrapped model's ``enable_input_require_grads``
        hooks (transformers', for reentrant checkpointing: ``_require_grads_hooks``) sit on a module the model no
        longer holds: the adapter module that adapted or saved the embeddings, stored by a switch of adapter. Its
        checkpointed layers' adapters would get no gradient (PEFT's layers stay in the model, with the hook)."""
        model = self.model
        handles = getattr(model, "_require_grads_hooks", None)
        handles = handles or ([model._require_grads_hook] if hasattr(model, "_require_grads_hook") else [])
        if not handles or not hasattr(model, "disable_input_require_grads"):
            return
        in_model = {id(m._forward_hooks) for m in model.modules()}
        if all(id(h.hooks_dict_ref()) in in_model for h in handles):
            return
        model.disable_input_require_grads()
        model.enable_input_require_grads()

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name``; deleting the active one activates the first remaining adapter in sorted order,
        with a warning naming it, as PEFT's."""
        adapters.check_adapter_name(adapter_name, self.adapter_configs, must_exist=True)
        if adapter_name == self.active_adapter:
            others = sorted(n for n in self.adapter_configs if n != adapter_name)
            if not others:
                raise ValueError(f"{adapter_name!r} is the model's only adapter; it cannot be deleted")
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                          f"{others[0]}.", stacklevel=2)
            self.set_adapter(others[0])
        del self.inactive_adapters[adapter_name]
        del self.adapter_configs[adapter_name]
        self._stored_routing_records.pop(adapter_name, None)

    def load_adapter(self, directory: str, adapter_name: str, is_trainable: bool = False) -> None:
        """Load an adapter saved by :meth:`save_pretrained` as ``adapter_name`` (inactive, in the
        model's train / eval mode, as :meth:`add_adapter`; its config's ``inference_mode`` is ``not
        is_trainable``); :meth:`set_adapter` makes it trainable or frozen when it activates it (as PEFT's)."""
        persistence.load_adapter(self, directory, adapter_name, is_trainable=is_trainable)

    def _mark_trainable(self) -> None:
        if not self._active_frozen:
            mark_only_adapters_trainable(self.model, self.moelora_config.bias)
        else:
            for p in self.model.parameters():
                p.requires_grad_(False)


def check_model_and_config(model, config) -> None:
    """TypeError naming the argument unless ``model`` is an nn.Module and ``config`` a MoELoRAConfig (a PEFT
    LoraConfig or a dict of fields is not one: their fields are MoELoRAConfig's keyword arguments)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, MoELoRAConfig):
        hint = ("; a PEFT LoRA checkpoint loads with moelora.load_peft_lora" if type(config).__name__ == "LoraConfig"
                else "; build one with moelora.MoELoRAConfig(**fields)" if isinstance(config, dict) else "")
        raise TypeError(f"config must be a moelora.MoELoRAConfig, got {type(config).__name__}{hint}")


def get_moelora_model(model: nn.Module, config: MoELoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> MoELoRAModel:
    """Inject MoE-LoRA layers into ``model`` (in place) and wrap it, the adapter named ``adapter_name``; see
    the module docstring. Without ``config.target_modules`` the wrapper's config holds PEFT's default targets
    for the model's architecture; with ``config.inference_mode`` the adapter is frozen (as PEFT's)."""
    check_model_and_config(model, config)
    adapters.check_adapter_name(adapter_name, {}, must_exist=False)  # before the model changes
    config = with_default_targets(model, config)
    names = inject_moelora(model, config)
    return MoELoRAModel(model, with_expert_counts_listed(model, config, names), adapter_name)


def from_pretrained(model: nn.Module, directory: str, is_trainable: bool = False,
                    adapter_name: str = DEFAULT_ADAPTER) -> MoELoRAModel:
    """Inject the configuration saved in ``directory`` (by save_pretrained) into ``model`` (a fresh
    base model) and load the weights (as the adapter ``adapter_name``; :meth:`MoELoRAModel.load_adapter`
    adds the others). The configuration's ``inference_mode`` is ``not is_trainable``, as PEFT's.

    Every file is read and checked before ``model`` is changed; if the tensors then do not
    fit the injected model, ``model`` is restored as it was (a corrected retry works).
    Checkpoints written before adapter membership was explicit may also hold a base model's
    own tensors whose names contain ``router.`` or ``lora_`` (they were trained then): such
    tensors, where the model has them with the same shape, are loaded too; any other tensor
    the adapter does not have is an error.
    """
    config, structure, state = persistence.read_checkpoint(directory)
    config = dataclasses.replace(config, inference_mode=not is_trainable)  # as PEFT's from_pretrained
    with persistence.restored_on_error(model):
        _structure.replay(model, structure)
        wrapped = get_moelora_model(model, config, adapter_name)
        persistence.load_active_adapter_weights(wrapped, state, persistence.weights_file(directory))
    if not is_trainable:
        for p in wrapped.parameters():
            p.requires_grad_(False)
        wrapped.eval()
    return wrapped


@torch.no_grad()
def load_peft_lora(model: nn.Module, directory: str, expert: Optional[int] = None) -> MoELoRAModel:
    """Load the PEFT LoRA checkpoint in ``directory`` as one expert (see moelora.persistence); returns the
    wrapper.
    Into expert ``expert`` of a task-routed model the task's gate ``lora_gamma[expert]`` is set to
    1, so that task computes the PEFT LoRA (its task-routed layers the checkpoint does not adapt must add nothing
    for that task, else it raises); in a model with several experts the checkpoint's biases, saved modules and
    embedding base weights, which every expert uses, must equal the model's. Every tensor is checked against the
    model before any is copied; a fresh ``model`` is left as it was when the checkpoint does not fit. The merged
    layers of a MoELoRAModel (``merge_adapter``) are unmerged for the load and merged again after it (as it was
    merged: for the same task), so they hold the loaded adapter."""
    peft_config, modules, others, weights_path = persistence.read_peft_checkpoint(directory)
    config = persistence.peft_as_config(  # checks its fields, for any model
        peft_config, modules, directory, None if isinstance(model, MoELoRAModel) else model)
    if expert is not None and not is_integral(expert):  # a numpy integer too, as set_task_ids' and merge's task
        raise TypeError(f"expert must be an int or None, got {type(expert).__name__} {expert!r}")
    expert = None if expert is None else int(expert)
    # a merged layer's base weight holds its adapter's delta: the checks read, and the copy replaces, the adapter
    merged = adapters.merged_tasks(model.model) if isinstance(model, MoELoRAModel) else {}
    if merged:
        merge.unmerge_adapter(model.model)
    try:
        with persistence.restored_on_error(model):
            if isinstance(model, MoELoRAModel):
                wrapped, target = model, expert if expert is not None else 0
            else:
                if expert not in (None, 0):
                    raise ValueError("a fresh model gets the checkpoint as its only expert; expert must be None or 0")
                wrapped, target = get_moelora_model(model, config), 0
            layers, extras = persistence.check_peft_checkpoint(peft_config, wrapped.model, modules, others, target,
                                                               weights_path)
        persistence.copy_peft_checkpoint(peft_config, modules, layers, extras, target)
    finally:
        if merged:
            adapters.remerge(model.model, merged)
    return wrapped
