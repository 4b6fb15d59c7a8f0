"""The structural edits a checkpoint must replay on a fresh base model.

:func:`moelora.upcycle_ffn` and :func:`moelora.apply_molex` change a model's module tree.
Each records its call (name and JSON-able arguments) on the model it edited;
``save_pretrained`` writes the records into ``moelora_config.json`` and ``from_pretrained``
replays them, in order, before injecting the adapters and loading the weights.

The edits register themselves here (:func:`structural_edit`), so this module imports neither
of them: the registry is filled when moelora is imported.

A checkpoint never makes moelora import or call arbitrary code: the only callables it can
name are activations from an allow-list (as transformers' and PEFT's string keys):
torch's activation functions by name (``torch.nn.functional.gelu``; ``torch.relu``) and
transformers' ``ACT2FN`` names (``gelu_new``, ``silu``, ...). Saving any other activation
fails at save time; a checkpoint naming anything else fails at load time.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTRIBUTE = "_moelora_structure"
_EDITS: Dict[str, Callable] = {}  # name -> function(model, **kwargs), filled by structural_edit
# Arguments whose default changed, with the value a record written before holds implicitly.
# apply_molex: MoLEx's linear gate gained its bias; upcycle_ffn: an MLP's dropout used to be dropped silently,
# now the default refuses a module holding one (ffn_dropout), and Phi-3-style fused MLPs are found (fused_gate_up).
LEGACY_DEFAULTS = {"apply_molex": {"bias": False}, "upcycle_ffn": {"ffn_dropout": "drop", "fused_gate_up": False}}

# Activation functions a checkpoint may name, in these namespaces (torch._C._nn: names that
# earlier checkpoints hold for the builtins F.gelu, F.softplus, ...).
TORCH_ACTIVATIONS = ("celu", "elu", "gelu", "glu", "hardshrink", "hardsigmoid", "hardswish", "hardtanh",
                     "leaky_relu", "logsigmoid", "mish", "relu", "relu6", "rrelu", "selu", "sigmoid", "silu",
                     "softplus", "softshrink", "softsign", "tanh", "tanhshrink")
TORCH_NAMESPACES = {"torch.nn.functional": F, "torch": torch, "torch._C._nn": torch._C._nn}


def structural_edit(fn: Callable) -> Callable:
    """Register ``fn(model, **kwargs)`` as an edit that checkpoints replay by its name (a decorator)."""
    _EDITS[fn.__name__] = fn
    return fn


def record(model: nn.Module, op: str, kwargs: dict) -> Tuple[str, dict]:
    """Remember that ``op(model, **kwargs)`` was applied to ``model``; returns the record (for :func:`forget`)."""
    entry = (op, dict(kwargs))
    model.__dict__[ATTRIBUTE] = recorded(model) + [entry]
    return entry


def forget(model: nn.Module, entry: Tuple[str, dict]) -> None:
    """Drop ``entry`` (what :func:`record` returned) from the records of ``model``: the edit was
    undone, checkpoints no longer replay it."""
    model.__dict__[ATTRIBUTE] = [e for e in recorded(model) if e is not entry]


def recorded(model: nn.Module) -> List[Tuple[str, dict]]:
    return list(model.__dict__.get(ATTRIBUTE, []))


def _transformers_activations():
    """(ACT2CLS, ACT2FN) of transformers, or ({}, None) without transformers."""
    try:
        from transformers.activations import ACT2CLS, ACT2FN
    except ImportError:
        return {}, None
    return ACT2CLS, ACT2FN


def _comparable(v):
    """``v`` as activation modules' states compare it: a bound method as its function, a
    functools.partial (GELUTanh's F.gelu with approximate="tanh") as its function and arguments."""
    if isinstance(v, functools.partial):
        return v.func, v.args, tuple(sorted(v.keywords.items()))
    return getattr(v, "__func__", v)


def _module_state(m: nn.Module) -> dict:
    return {k: _comparable(v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"}


def callable_name(fn: Callable, what: str) -> str:
    """The allow-listed name of the activation ``fn`` (torch.nn.functional.gelu, torch.relu,
    or a transformers ACT2FN name such as gelu_new); ValueError for anything else."""
    for prefix, namespace in TORCH_NAMESPACES.items():
        for name in TORCH_ACTIVATIONS:
            if getattr(namespace, name, None) is fn:
                return f"{prefix}.{name}"
    act2cls, act2fn = _transformers_activations()
    if isinstance(fn, nn.Module):
        for key, spec in act2cls.items():
            cls = spec[0] if isinstance(spec, tuple) else spec
            if type(fn) is cls:
                candidate = act2fn[key]
                if _module_state(candidate) == _module_state(fn):
                    return key
    raise ValueError(
        f"{what} {fn!r} cannot be saved by name: checkpoints name activations from an allow-list only "
        f"(torch.nn.functional.{{{', '.join(TORCH_ACTIVATIONS)}}} or a transformers ACT2FN name); use one of "
        "those (e.g. torch.nn.functional.gelu) to save this model with save_pretrained")


def resolve_callable(name: str) -> Callable:
    """The activation an allow-listed ``name`` stands for (see the module docstring); ValueError
    for any other name, which is never imported."""
    if not isinstance(name, str):
        raise ValueError(f"an activation is saved as a string, got {type(name).__name__} {name!r}")
    prefix, _, short = name.rpartition(".")
    if prefix in TORCH_NAMESPACES and short in TORCH_ACTIVATIONS and hasattr(TORCH_NAMESPACES[prefix], short):
        return getattr(TORCH_NAMESPACES[prefix], short)
    act2cls, act2fn = _transformers_activations()
    if name in act2cls:
        return act2fn[name]
    raise ValueError(
        f"activation {name!r} is not allowed in a checkpoint: allowed are torch.nn.functional.<name> and "
        f"torch.<name> for <name> in {TORCH_ACTIVATIONS}, and transformers' ACT2FN names "
        f"{tuple(act2cls) if act2cls else '(transformers not installed)'}")


def to_json(model: nn.Module) -> list:
    """The records of ``model`` as JSON data (raises for arguments that cannot be saved)."""
    out = []
    for op, kwargs in recorded(model):
        kwargs = dict(kwargs)
        if kwargs.get("activation") is not None:
            kwargs["activation"] = callable_name(kwargs["activation"], "upcycle_ffn activation")
        out.append({"op": op, "kwargs": kwargs})
    return out


def check_records(records) -> None:
    """ValueError unless ``records`` (a checkpoint's "structure") is a list of
    {"op": a registered edit, "kwargs": {...}} whose activations are allow-listed."""
    if not isinstance(records, list):
        raise ValueError(f'"structure" must be a list of {{"op", "kwargs"}} entries, got {type(records).__name__}')
    for i, entry in enumerate(records):
        if not isinstance(entry, dict) or not isinstance(entry.get("kwargs"), dict) or "op" not in entry:
            raise ValueError(f'structure entry {i} must be {{"op": ..., "kwargs": {{...}}}}, got {entry!r}')
        if entry["op"] not in _EDITS:
            raise ValueError(f"structure entry {i}: unknown structural edit {entry['op']!r} "
                             f"(known: {tuple(_EDITS)})")
        if entry["kwargs"].get("activation") is not None:
            resolve_callable(entry["kwargs"]["activation"])


_REPLAYING = contextvars.ContextVar("moelora_replaying", default=False)


def replaying() -> bool:
    """Whether the running structural edit is a checkpoint's replayed record (:func:`replay`): a check added
    after the record was written warns there instead of refusing, since the checkpoint was trained so."""
    return _REPLAYING.get()


def replay(model: nn.Module, records: list) -> None:
    """Apply the saved edits (checked by check_records) to a fresh base model, in order."""
    check_records(records)
    token = _REPLAYING.set(True)
    try:
        for entry in records:
            kwargs = {**LEGACY_DEFAULTS.get(entry["op"], {}), **entry["kwargs"]}
            if kwargs.get("activation") is not None:
                kwargs["activation"] = resolve_callable(kwargs["activation"])
            _EDITS[entry["op"]](model, **kwargs)
    finally:
        _REPLAYING.reset(token)
