"""PEFT's adapter conventions on a :class:`moelora.MoELoRAModel`: ``modules_to_save``, switching
the adapter layers off and on, and several named adapters on one model.

- ``modules_to_save`` (a list of module names, matched as ``target_modules``): each named module
  is wrapped in :class:`ModulesToSaveWrapper`, which keeps the frozen original and runs a
  trainable copy (``<name>.modules_to_save``), saved and loaded with the adapter (as PEFT's
  wrapper; PEFT checkpoints name the copy's tensors ``<name>.<param>``).
- ``set_adapter_layers(model, enabled)``: every MoE-LoRA layer and saved module of the model
  computes the base model's function while disabled (merged layers are unmerged first, as
  PEFT does on a disabled forward).
- ``layer_status`` / ``model_status``: PEFT's ``get_layer_status`` / ``get_model_status`` (the same fields).
- Named adapters. The layers and saved modules of the active adapter sit in the model, so the
  forward of every layer is the single-adapter one. Each other adapter is a
  :class:`StoredAdapter` held by the wrapper (``MoELoRAModel.inactive_adapters``, so ``.to()``
  and ``state_dict`` see it) with its parameters frozen; the base layers it wraps are not
  stored twice: a stored layer's ``base_layer`` (``original_module``) is a
  :class:`DetachedBase` until the adapter is activated, when it gets the model's module back.
  ``activate`` / ``deactivate`` swap the modules; everything outside the adapter layers (the
  base model, MoLEx gates, upcycled FFNs and, as in PEFT, the biases trained with
  ``bias="all"`` / ``"lora_only"``) is shared by all adapters.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from typing import Dict, List, Optional, Set, Union

import torch
import torch.nn as nn

from moelora.modules.adapter_base import (is_adapter_layer, is_quantised_weight, offloaded_parameter_names,
                                          owned_by_moelora)
from moelora.modules.molex import mixed_by_molex
from moelora.modules.routed import routed_modules
from moelora.tuner.targets import check_single_place, check_tied_source, matches, set_module

DEFAULT_ADAPTER = "default"  # the first adapter's name, as PEFT


class DetachedBase(nn.Module):
    """Stands in for the base layer of a stored (inactive) adapter's layer."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this MoE-LoRA layer belongs to an inactive adapter; activate it with "
                           "model.set_adapter(name)")


class ModulesToSaveWrapper(nn.Module):
    """A module trained and saved with the adapter: a trainable copy (``modules_to_save``) runs
    in place of the frozen ``original_module`` (which runs while adapters are disabled); the wrapper's
    public attributes (``weight``, ...) are those of the module that runs, as PEFT's."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        # Trainable, saved whole with the adapter, never a target of injection (see moelora.model).
        self.modules_to_save.moelora_owned = True
        self.disable_adapters = False
        self.training = module.training

    def forward(self, *args, **kwargs):
        return (self.original_module if self.disable_adapters else self.modules_to_save)(*args, **kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Start the trainable copy as the constructor does: the original module's tensors copied into
        it (meta-device init: after the original is reset or loaded, so children first, as
        ``model.apply`` visits them). Defined here, or ``__getattr__`` would hand out the copy's. A
        wrapper of an inactive adapter holds no original (DetachedBase): its copy is left as it is."""
        if not isinstance(self.original_module, DetachedBase):
            self.modules_to_save.load_state_dict(self.original_module.state_dict())

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # public attributes of the module that runs (out_features, weight, ...), as PEFT's
            if name.startswith("_"):
                raise
            original = super().__getattr__("original_module")
            runs_original = self.__dict__.get("disable_adapters", False) and not isinstance(original, DetachedBase)
            return getattr(original if runs_original else super().__getattr__("modules_to_save"), name)


def wrap_modules_to_save(model: nn.Module, patterns) -> List[str]:
    """Wrap the modules ``patterns`` names (suffixes or a regex) in :class:`ModulesToSaveWrapper`."""
    if not patterns:
        return []

    names = [n for n, m in model.named_modules() if n and matches(n, patterns)
             and not isinstance(m, (ModulesToSaveWrapper, DetachedBase))]
    if not names:
        raise ValueError(f"modules_to_save {patterns!r} matches no module of the model")
    saved = [(n, model.get_submodule(n)) for n in names]
    check_single_place(model, saved, "modules_to_save")
    check_tied_source(model, saved, "a trained copy (modules_to_save)",
                      "save those modules instead (modules_to_save=['embed_tokens'] on T5)")
    for name in names:
        module = model.get_submodule(name)
        if any(is_adapter_layer(m) for m in module.modules()):
            raise ValueError(f"modules_to_save names {name}, which holds MoE-LoRA layers; a module is either "
                             "a target or saved whole")
        mixed = next((n for n, m in module.named_modules() if mixed_by_molex(m)), None)
        if mixed is not None:  # its trainable copy would carry a copy of the hook, running a copy of MoLEx
            raise ValueError(f"modules_to_save names {name}, " + ("a layer MoLEx mixes" if not mixed else
                             f"which holds {name}.{mixed}, a layer MoLEx mixes") + "; a layer is either mixed by "
                             "MoLEx or saved whole: save modules inside it instead")
        quantised = next(((n, p) for n, p in module.named_parameters() if is_quantised_weight(p)), None)
        if quantised is not None:  # its copy could not train (no gradient for its dtype) nor save
            n, p = quantised
            raise NotImplementedError(
                f"modules_to_save names {name}, whose parameter {n} is a {type(p).__name__} ({p.dtype}): a quantised "
                "weight (torchao's quantize_, bitsandbytes' 4-bit / 8-bit layers) or another tensor subclass, which "
                "takes no gradient, so its trainable copy could not train; adapt its linear layers instead "
                "(target_modules), or save it from a model loaded without quantisation")
        offloaded = next(offloaded_parameter_names(module), None)
        if offloaded is not None:  # its copy would hold meta tensors, its copied hook loading the original's weights
            raise NotImplementedError(
                f"modules_to_save names {name}, whose parameter {offloaded} accelerate has offloaded (on meta between "
                "forwards): its trainable copy would hold no weights of its own (no gradient, nothing to save); load "
                "the model with that module kept on a device (not \"cpu\" / \"disk\" in the device_map), or adapt "
                "its linear layers instead (target_modules)")
        set_module(model, name, ModulesToSaveWrapper(module))
    return names


def is_adapter_module(module: nn.Module) -> bool:
    """A module that belongs to one adapter: a MoE-LoRA layer or a saved module's wrapper."""
    return is_adapter_layer(module) or isinstance(module, ModulesToSaveWrapper)


def adapter_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """The adapter's modules in ``model`` by name (layers and saved-module wrappers)."""
    return {n: m for n, m in model.named_modules() if is_adapter_module(m)}


def _original_attribute(module: nn.Module) -> str:
    return "original_module" if isinstance(module, ModulesToSaveWrapper) else "base_layer"


def unwrap_modules_to_save(model: nn.Module) -> None:
    """Replace each saved module's wrapper by its trained copy (PEFT's merge_and_unload)."""

    for name, wrapper in list(adapter_modules(model).items()):
        if isinstance(wrapper, ModulesToSaveWrapper):
            trained = wrapper.modules_to_save
            del trained.moelora_owned
            set_module(model, name, trained)


def set_adapter_layers(model: nn.Module, enabled: bool) -> None:
    """Switch every MoE-LoRA layer and saved module of ``model`` on or off (see module docstring)."""
    for module in adapter_modules(model).values():
        if not enabled and getattr(module, "merged", False):
            module.unmerge()
        module.disable_adapters = not enabled


class StoredAdapter(nn.Module):
    """An inactive adapter: its modules (``layers``) and the names they take in the model."""

    def __init__(self, modules: Dict[str, nn.Module]):
        super().__init__()
        self.names = list(modules)
        self.layers = nn.ModuleList(modules.values())

    def items(self):
        return zip(self.names, self.layers)


def active_named_modules(model: nn.Module):
    """``model.named_modules()`` without the modules of inactive adapters (those inside a
    :class:`StoredAdapter`): what the model runs, whether ``model`` is a wrapper or the model it wraps."""
    seen = set()

    def walk(module: nn.Module, prefix: str):
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        for name, child in module._modules.items():
            if child is not None and not isinstance(child, StoredAdapter):
                yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


# A weak reference to every live MoELoRAModel (each drops itself when its wrapper is collected): what a module
# inside a wrapped model is held by (held_modules) and whose last forward's swaps a block puts back
# (moelora.model) are found wherever they are asked for, at no cost to the forward. A plain set, read through
# set.copy (atomic): another thread may create a wrapper meanwhile (a WeakSet's Python iteration would raise
# "Set changed size during iteration").
_wrappers: set = set()


def register_wrapper(wrapper: nn.Module) -> None:
    _wrappers.add(weakref.ref(wrapper, _wrappers.discard))


def live_wrappers() -> list:
    """The MoELoRAModels alive now."""
    return [wrapper for wrapper in (ref() for ref in _wrappers.copy()) if wrapper is not None]


# The MoELoRAModel holding each adapter module (a weak reference, while the module is alive): a second wrapper
# around modules a live one holds is refused (see MoELoRAModel.__init__).
_holders = weakref.WeakKeyDictionary()


def claim(wrapper: nn.Module, modules) -> None:
    """Record ``wrapper`` as the holder of the adapter modules ``modules``."""
    ref = weakref.ref(wrapper)
    for module in modules:
        _holders[module] = ref


def holder(module: nn.Module) -> Optional[nn.Module]:
    """The live MoELoRAModel holding the adapter module ``module``, or None."""
    ref = _holders.get(module)
    return None if ref is None else ref()


def held_modules(model: nn.Module) -> Dict[str, str]:
    """{module name: adapter name} of the modules of every adapter (active and inactive) of a
    :class:`moelora.MoELoRAModel`, named in the wrapped model, given the wrapper; given the wrapped model or a
    module inside it, those of the wrappers holding it, named in ``model``; ``{}`` for any other module."""
    if not getattr(type(model), "is_moelora_model", False):
        held = {}
        for wrapper in live_wrappers():
            prefix = next((f"{name}." if name else "" for name, m in wrapper.model.named_modules() if m is model), None)
            if prefix is not None:
                held.update({name[len(prefix):]: adapter for name, adapter in held_modules(wrapper).items()
                             if name.startswith(prefix)})
        return held
    held = {name: model.active_adapter for name in adapter_modules(model.model)}
    for adapter_name, store in model.inactive_adapters.items():
        held.update({name: adapter_name for name, _ in store.items() if name not in held})
    return held


def deactivate(model: nn.Module) -> Dict[str, nn.Module]:
    """Take the active adapter's modules out of ``model`` (the base modules go back in place)
    and return them, their base modules replaced by :class:`DetachedBase`."""

    taken = {}
    for name, module in adapter_modules(model).items():
        if getattr(module, "merged", False):
            module.unmerge()
        set_module(model, name, getattr(module, _original_attribute(module)))
        setattr(module, _original_attribute(module), DetachedBase())
        # its routed modules' records (a layer's, a saved module's copy's: an upcycled MoEFFN in it) go with it
        for routed in routed_modules(module):
            routed.clear_routing_record()
        taken[name] = module
    return taken


def activate(model: nn.Module, modules: Dict[str, nn.Module]) -> None:
    """Put an adapter's modules into ``model``, each around the model's module of its name; every
    name is checked first, so on an error ``model`` is left as it was."""

    originals = {}
    for name in modules:
        try:
            originals[name] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the adapter has a module at {name}, which the model no longer has (its structure "
                             "changed after the adapter was added, e.g. by upcycle_ffn)") from None
        if is_adapter_module(originals[name]):
            raise RuntimeError(f"{name} already holds an adapter module; deactivate the active adapter first")
    for name, module in modules.items():
        setattr(module, _original_attribute(module), originals[name])
        set_module(model, name, module)


def merged_tasks(model: nn.Module) -> Dict[str, Optional[int]]:
    """{name: task it was merged for} of the merged layers of ``model``'s active adapter."""
    return {name: m.merged_task for name, m in adapter_modules(model).items() if getattr(m, "merged", False)}


def remerge(model: nn.Module, merged: Dict[str, Optional[int]]) -> None:
    """Merge again the layers :func:`merged_tasks` listed (each merged before, so each can merge)."""
    modules = adapter_modules(model)
    for name, task in merged.items():
        if not modules[name].merged:
            modules[name].merge(task)


def freeze(modules: Dict[str, nn.Module]) -> None:
    for module in modules.values():
        for name, p in module.named_parameters():
            p.requires_grad_(False)


def stored(modules: Dict[str, nn.Module]) -> StoredAdapter:
    freeze(modules)
    return StoredAdapter(modules)


def check_adapter_name(name: str, existing, must_exist: bool) -> None:
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise ValueError(f"adapter names are non-empty strings without '.' or '/', got {name!r}")
    if hasattr(nn.ModuleDict(), name):  # MoELoRAModel.inactive_adapters cannot hold it
        raise ValueError(f"adapter name {name!r} is an attribute of nn.ModuleDict (which holds the inactive "
                         "adapters); choose another name")
    if must_exist and name not in existing:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(existing)}")
    if not must_exist and name in existing:
        raise ValueError(f"the model already has an adapter named {name!r}")


def optional_names(names: Optional[List[str]], existing) -> List[str]:
    names = list(existing) if names is None else list(names)
    for name in names:
        check_adapter_name(name, existing, must_exist=True)
    return names


# ------------------------------------------------------------------------------- membership
def _adapter_owners(module: nn.Module, prefix: str = ""):
    """(name, module, recurse) of what moelora added to ``module``'s tree: an adapter layer's
    (MoELoRALinear, MoELoRAEmbedding, MoELoRAConv) own tensors and every child but its base layer;
    modules moelora added whole (``owned_by_moelora``: upcycled MoE FFNs, MoLEx) with everything
    inside them."""
    if owned_by_moelora(module):
        yield prefix, module, True
        return
    if is_adapter_layer(module):
        yield prefix, module, False
        for name, child in module.named_children():
            if name != "base_layer":
                yield f"{prefix}{name}.", child, True
        return
    for name, child in module.named_children():
        yield from _adapter_owners(child, f"{prefix}{name}.")


def adapter_tensor_names(model: nn.Module, bias: str = "none") -> Set[str]:
    """Names (as in ``model.state_dict()``) of the tensors of moelora's adapters: what
    :func:`mark_only_adapters_trainable` leaves trainable (its parameters, but the bias of a saved
    module's frozen original) and what a checkpoint holds. Membership comes from moelora's module
    types (see _adapter_owners), never from substrings of names, so a base model's own ``router``
    or ``lora_`` tensors are not adapters. ``bias``: "all" adds every bias parameter, "lora_only" the biases of
    the adapted layers."""
    names = set()
    for prefix, owner, recurse in _adapter_owners(model):
        for sub_prefix, sub in (owner.named_modules(prefix=prefix.rstrip("."), remove_duplicate=False)
                                if recurse else [(prefix.rstrip("."), owner)]):
            dot = f"{sub_prefix}." if sub_prefix else ""
            names.update(dot + n for n, p in sub._parameters.items() if p is not None)
            names.update(dot + n for n, b in sub._buffers.items()
                         if b is not None and n not in sub._non_persistent_buffers_set)
    if bias == "all":
        names.update(n for n, _ in model.named_parameters(remove_duplicate=False) if n.endswith("bias"))
    elif bias == "lora_only":
        names.update(f"{n}.base_layer.bias" for n, m in model.named_modules()
                     if is_adapter_layer(m) and getattr(m.base_layer, "bias", None) is not None)
    return names


def refuse_offloaded_biases(model: nn.Module, bias: str) -> None:
    """NotImplementedError where ``bias`` ("all", "lora_only") would train a bias that accelerate has offloaded:
    it waits on meta and is loaded from the offloaded weights for each forward, so it would take no gradient
    and could not be saved."""
    if bias == "none":
        return
    trainable = adapter_tensor_names(model, bias)
    offloaded = next((n for n in offloaded_parameter_names(model) if n in trainable), None)
    if offloaded is not None:
        raise NotImplementedError(
            f"bias={bias!r} trains {offloaded}, which accelerate has offloaded (on meta between forwards): loaded "
            "for each forward from the offloaded weights, it would take no gradient and could not be saved; use "
            "bias='none', or load the model with that layer kept on a device (not \"cpu\" / \"disk\" in the "
            "device_map)")


def _saved_originals_parameter_names(model: nn.Module) -> Set[str]:
    """Names of the parameters of the frozen originals that the saved modules' wrappers of ``model`` keep."""
    return {f"{name}.original_module.{n}" if name else f"original_module.{n}"
            for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)
            for n, _ in module.original_module.named_parameters(remove_duplicate=False)}


def mark_only_adapters_trainable(model: nn.Module, bias: str = "none") -> None:
    """requires_grad only for the adapters' parameters (:func:`adapter_tensor_names`: lora_A/B,
    task scales, DoRA magnitudes, routers of MoE-LoRA layers, upcycled MoE FFNs, MoLEx gates)
    and the biases ``bias`` asks for ("all": every bias; "lora_only": biases of adapted layers). The frozen
    original a saved module's wrapper keeps stays frozen, its bias too (as PEFT's wrapper freezes it), though
    a checkpoint of bias="all" holds that bias, as PEFT's does."""
    trainable = adapter_tensor_names(model, bias) - _saved_originals_parameter_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


@dataclasses.dataclass
class LayerStatus:
    """One adapter module's status, with the fields of PEFT's ``TunerLayerStatus``: its path from the wrapper
    (``model.<path in the wrapped model>``, as PEFT's from its tuner model), class, whether it runs, the adapters
    active / merged / held there, per adapter its parameters' requires_grad (True, False or "irregular") and
    device types, and the quantisation of its base weight (the weight class's package: "bitsandbytes",
    "torchao"; None for a plain weight)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: List[str]
    merged_adapters: List[str]
    requires_grad: Dict[str, Union[bool, str]]
    available_adapters: List[str]
    devices: Dict[str, List[str]]
    quantization_backend: Optional[str]


@dataclasses.dataclass
class ModelStatus:
    """A wrapper's status, with the fields of PEFT's ``TunerModelStatus``: the layers' statuses combined, a
    field whose layers disagree being "irregular"."""

    base_model_type: str
    adapter_model_type: str
    peft_types: Dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, str]
    active_adapters: Union[List[str], str]
    merged_adapters: Union[List[str], str]
    requires_grad: Dict[str, Union[bool, str]]
    available_adapters: List[str]
    devices: Dict[str, List[str]]
    quantization_backend: Optional[str]


def _all_or_irregular(values) -> Union[bool, str]:
    values = list(values)
    return True if all(v is True for v in values) else False if all(v is False for v in values) else "irregular"


def _one_or_irregular(values):
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else "irregular"


def _own_parameters(module: nn.Module) -> List[nn.Parameter]:
    """An adapter module's parameters without those of the base module it wraps."""
    base = _original_attribute(module) + "."
    return [p for n, p in module.named_parameters() if not n.startswith(base)]


def layer_status(wrapper: nn.Module) -> List[LayerStatus]:
    """:class:`LayerStatus` of every place of ``wrapper``'s model that an adapter (active or stored) adapts. As
    PEFT's (whose set_adapter and disable_adapter_layers reach every layer), a place only stored adapters adapt
    reports the model's active adapter and whether the model's adapters are enabled."""
    active_modules = adapter_modules(wrapper.model)
    held: Dict[str, Dict[str, nn.Module]] = {n: {wrapper.active_adapter: m} for n, m in active_modules.items()}
    for adapter_name, store in wrapper.inactive_adapters.items():
        for name, module in store.items():
            held.setdefault(name, {})[adapter_name] = module
    disabled = any(m.disable_adapters for m in active_modules.values())  # the model's switch (see set_adapter)
    statuses = []
    for name, modules in held.items():
        module = modules.get(wrapper.active_adapter, next(iter(modules.values())))
        active, here = [wrapper.active_adapter], wrapper.active_adapter in modules
        base = getattr(module, _original_attribute(module))
        weight = getattr(base, "weight", None)
        quantised = isinstance(weight, torch.Tensor) and is_quantised_weight(weight)
        statuses.append(LayerStatus(
            name=f"model.{name}", module_type=f"moelora.{type(module).__name__}",
            enabled=not (module.disable_adapters if here else disabled), active_adapters=active,
            merged_adapters=active if here and getattr(module, "merged", False) else [],
            requires_grad={a: _all_or_irregular(p.requires_grad for p in _own_parameters(m))
                           for a, m in modules.items()},
            available_adapters=sorted(modules),
            devices={a: sorted({p.device.type for p in _own_parameters(m)}) for a, m in modules.items()},
            quantization_backend=type(weight).__module__.partition(".")[0] if quantised else None))
    return statuses


def model_status(wrapper: nn.Module) -> ModelStatus:
    """:class:`ModelStatus` of ``wrapper`` (its layers' :func:`layer_status` combined as PEFT's)."""
    layers = layer_status(wrapper)
    trainable, total = wrapper.get_nb_trainable_parameters()
    merged = sorted({a for s in layers for a in s.merged_adapters})
    if any(set(merged) & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers):
        merged = "irregular"  # merged at some layers, not at others
    active = _one_or_irregular(tuple(s.active_adapters) for s in layers) if layers else ()
    requires_grad: Dict[str, list] = {}
    devices: Dict[str, set] = {}
    for s in layers:
        for a, value in s.requires_grad.items():
            requires_grad.setdefault(a, []).append(value)
        for a, types in s.devices.items():
            devices.setdefault(a, set()).update(types)
    return ModelStatus(
        base_model_type=type(wrapper.model).__name__, adapter_model_type=type(wrapper).__name__,
        peft_types={a: "MOELORA" for a in wrapper.adapter_configs}, trainable_params=trainable, total_params=total,
        num_adapter_layers=len(layers), enabled=_one_or_irregular(s.enabled for s in layers) if layers else True,
        active_adapters=active if active == "irregular" else list(active),
        merged_adapters=merged,
        requires_grad={a: _all_or_irregular(values) for a, values in requires_grad.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={a: sorted(types) for a, types in devices.items()},
        quantization_backend=_one_or_irregular(s.quantization_backend for s in layers) if layers else None)
