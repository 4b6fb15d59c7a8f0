"""Finding modules by name in a model: target patterns, layer indices, per-module values,
replacing a submodule, and the model inside a :class:`moelora.MoELoRAModel` wrapper.

As PEFT: a list of names matches a module whose name equals one of them or ends with
``.<name>``; a string is a regex that must match the full name; rank_pattern / alpha_pattern
keys are regexes matched against the end of the name. This module imports nothing from moelora,
so every module that needs these rules uses this one implementation.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch.nn as nn

from moelora.modules.fields import is_int

DEFAULT_LAYERS_PATTERN = ("layers", "h", "block", "blocks", "layer")
OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def matches(name: str, patterns) -> bool:
    """Whether module ``name`` is selected by ``patterns`` (a regex string, or a list of names)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern=None) -> Optional[int]:
    """Index of the numbered layer holding module ``name`` for the per-layer settings (MoLA's per-layer expert
    counts, the model's number of layers): the number after the first of ``layers_pattern``'s names (default
    :data:`DEFAULT_LAYERS_PATTERN`) in ``name``. :func:`transform_layer_index` is ``layers_to_transform``'s
    (PEFT's rule, which differs without ``layers_pattern`` on models numbering other stacks)."""
    patterns = layers_pattern or DEFAULT_LAYERS_PATTERN
    patterns = [patterns] if isinstance(patterns, str) else patterns
    alternatives = "|".join(re.escape(p) for p in patterns)
    m = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def transform_layer_index(name: str, layers_pattern=None) -> Optional[int]:
    """Index of the numbered layer holding module ``name`` as PEFT's ``layers_to_transform`` reads it: with
    ``layers_pattern``, :func:`layer_index`; without it, the first numbered part of ``name`` followed by another
    (ConvNeXt's ``stages.<i>.layers.<j>.dwconv``: the stage ``i``; LLaMA's ``model.layers.<i>.mlp``, GPT-2's
    ``transformer.h.<i>.attn``; top-level stacks count too), else :func:`layer_index` (the layer itself,
    ``model.layers.<i>``). A module whose only number ends its name elsewhere (an nn.Sequential's child outside
    the layers, Qwen2-VL's ``merger.mlp.0``) is in no layer, as for PEFT."""
    if not layers_pattern:
        m = re.search(r"(?:^|\.)[^.]+\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return layer_index(name, layers_pattern)


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


# The attributes in which transformers' experts modules hold their expert count (DBRX's DbrxExpertGLU: moe_num_experts).
EXPERT_COUNT_ATTRIBUTES = ("num_experts", "moe_num_experts", "num_local_experts")


def expert_count(experts: nn.Module) -> Optional[int]:
    """The number of experts of a mixture-of-experts block's ``experts`` module (an int attribute of
    :data:`EXPERT_COUNT_ATTRIBUTES`, or the length of a ModuleList of experts), or None where it holds none."""
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    return next((c for c in (getattr(experts, a, None) for a in EXPERT_COUNT_ATTRIBUTES)
                 if is_int(c)), None)


def stacked_expert_parameters(model: nn.Module, skip: Callable[[nn.Module], bool] = lambda m: False
                              ) -> Dict[str, tuple]:
    """name -> shape of the parameters holding the weights of a mixture-of-experts block's experts stacked in one
    tensor in the modules of ``model`` that ``skip`` does not skip, as transformers' MoE models store them
    (MixtralExperts.gate_up_proj [E, 2 * I, H], Qwen3MoeExperts.down_proj, JetMoE's ParallelExperts.weight, ...;
    DBRX's DbrxExpertGLU.w1 [E * I, H], the experts' rows one after another): those of a module whose class names
    experts ("Expert" in its name; a ViT's position embeddings [1, N, d] or a weight-normed convolution's are no
    experts) of 3-D or more, or 2-D with rows of several per expert where the module holds its expert count E
    (:data:`EXPERT_COUNT_ATTRIBUTES`; a router's [E, H] weight, GPT-OSS's expert biases [E, ...] are no such)."""
    return {f"{mn}.{pn}" if mn else pn: tuple(p.shape) for mn, m in model.named_modules()
            if "expert" in type(m).__name__.lower() and not skip(m)
            for pn, p in m.named_parameters(recurse=False) if p.dim() >= 3 or _rows_of_stacked_experts(m, p)}


def _rows_of_stacked_experts(module: nn.Module, param) -> bool:
    """Whether ``param`` is 2-D with a multiple of ``module``'s expert count of rows, several per expert."""
    count = expert_count(module)
    return param.dim() == 2 and count is not None and 1 < count < param.shape[0] and param.shape[0] % count == 0


def check_single_place(model: nn.Module, selected: Sequence[Tuple[str, nn.Module]], action: str,
                       remedy: str = "") -> None:
    """ValueError if a selected module (``(name, module)`` pairs) is held by several parents, or under several
    names of one (the same object at two places, ``nn.Sequential(lin, act, lin)``): ``action`` (injection,
    modules_to_save, upcycle_ffn) replaces it at the one place ``named_modules`` lists, and the others would run
    the module as it was. A module reached through a reused parent (a block at several layers, ALBERT-style) has
    one place: what replaces it is shared, as its weights are. ``remedy`` ends the message."""
    ids = {id(m) for _, m in selected}
    places: Dict[int, Dict[tuple, str]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None and id(child) in ids:
                places.setdefault(id(child), {}).setdefault(
                    (id(parent), attr), f"{parent_name}.{attr}" if parent_name else attr)
    for name, module in selected:
        held = list(places.get(id(module), {}).values())
        if len(held) > 1:
            raise ValueError(
                f"{name} is one module held at several places of the model ({', '.join(held)}): {action} replaces "
                "it at one place, and the others would run it as it was; give each place its own module "
                "(copy.deepcopy), or hold the shared module in one parent module that the model reuses (what replaces "
                f"it is then shared, as its weights are){remedy}")


def tied_alias_modules(model: nn.Module) -> set:
    """Names of the modules whose weight transformers ties to another module's (``_tied_weights_keys`` of
    ``model`` and its submodules: transformers 5's {tied: source} dict, transformers 4's list of tied names)."""
    aliases = set()
    for prefix, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if isinstance(keys, (dict, list, tuple)):
            for key in keys:
                if isinstance(key, str) and key.endswith(".weight"):
                    aliases.add(f"{prefix}.{key[:-7]}" if prefix else key[:-7])
    return aliases


def method_sources(cls: type, skip: Tuple[str, ...] = ("__init__",)) -> Iterator[str]:
    """The source of each method of ``cls`` and its bases below nn.Module (but those named in ``skip``); a method
    without source (a built or frozen class) is left out: nothing is known of it."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for name, fn in vars(klass).items():
            if name not in skip and inspect.isfunction(fn):
                try:
                    yield inspect.getsource(fn)
                except (OSError, TypeError):
                    pass


@functools.lru_cache(maxsize=None)
def _class_calls(cls: type, attr: str) -> bool:
    """Whether a method of ``cls`` (but its constructor) calls its child ``attr`` (``self.<attr>(``)."""
    call = re.compile(rf"self\.{re.escape(attr)}\s*\(")
    return any(call.search(source) for source in method_sources(cls))


def check_tied_source(model: nn.Module, selected: Sequence[Tuple[str, nn.Module]], action: str, remedy: str) -> None:
    """ValueError if a selected module (``(name, module)`` pairs) is the source of a tied weight whose tied
    copies (:func:`tied_alias_modules`) are modules of its own class that are not selected, and its parent never
    calls it (:func:`_class_calls`): the model calls those copies in its place (T5 of transformers 5 embeds with
    ``encoder.embed_tokens`` and ``decoder.embed_tokens``, which hold ``shared.weight``; ``shared`` itself never
    runs), so ``action`` there would have no effect. A source its parent calls (FSMT's tied
    ``decoder.embed_tokens``) and tied modules of another class (an output head tied to the input embedding) run
    too and are left alone. ``remedy`` ends the message."""
    aliases = tied_alias_modules(model)
    if not aliases:
        return
    chosen = {n for n, _ in selected}
    holders: Dict[int, list] = {}
    for n, m in model.named_modules():
        weight = m._parameters.get("weight")
        if weight is not None:
            holders.setdefault(id(weight), []).append((n, m))
    for name, module in selected:
        weight = module._parameters.get("weight")
        if name in aliases or weight is None:
            continue
        copies = [n for n, m in holders.get(id(weight), []) if n in aliases and n not in chosen
                  and type(m) is type(module)]
        parent_name, _, attr = name.rpartition(".")
        if copies and not _class_calls(type(model.get_submodule(parent_name)), attr):
            raise ValueError(
                f"{name}'s weight is tied to {', '.join(copies)} ({type(module).__name__}s too: the model's "
                f"_tied_weights_keys), which the model calls in its place (as T5 calls encoder.embed_tokens and "
                f"decoder.embed_tokens, never shared): {action} at {name} would have no effect; {remedy}")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def unwrap(model: nn.Module) -> nn.Module:
    """The model a :class:`moelora.MoELoRAModel` wraps (any other module: itself)."""
    return model.model if getattr(type(model), "is_moelora_model", False) else model
