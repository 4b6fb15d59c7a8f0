"""The structural edits a checkpoint must replay on a fresh base model.

:func:`moelora.upcycle_ffn` and :func:`moelora.apply_molex` change a model's module tree.
Each records its call (name and JSON-able arguments) on the model it edited;
``save_pretrained`` writes the records into ``moelora_config.json`` and ``from_pretrained``
replays them, in order, before injecting the adapters and loading the weights.
"""

from __future__ import annotations

import importlib
from typing import Callable, List, Tuple

import torch.nn as nn

ATTRIBUTE = "_moelora_structure"
# Arguments whose default changed, with the value a record written before holds implicitly.
LEGACY_DEFAULTS = {"apply_molex": {"bias": False}}  # MoLEx's linear gate gained its bias


def record(model: nn.Module, op: str, kwargs: dict) -> None:
    """Remember that ``op(model, **kwargs)`` was applied to ``model``."""
    model.__dict__[ATTRIBUTE] = recorded(model) + [(op, dict(kwargs))]


def recorded(model: nn.Module) -> List[Tuple[str, dict]]:
    return list(model.__dict__.get(ATTRIBUTE, []))


def callable_name(fn: Callable, what: str) -> str:
    """A dotted name that imports ``fn`` back (torch.relu, torch.nn.functional.gelu, ...)."""
    short = getattr(fn, "__name__", "?")
    # torch's builtins (torch.relu) carry no usable __module__: try the torch namespaces too.
    for name in (f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', short)}", f"torch.{short}",
                 f"torch.nn.functional.{short}"):
        try:
            if resolve_callable(name) is fn:
                return name
        except (ImportError, AttributeError, ValueError):
            continue
    raise ValueError(f"{what} {fn!r} cannot be saved by name; use an importable function "
                     "(e.g. torch.nn.functional.gelu) to save this model with save_pretrained")


def resolve_callable(name: str) -> Callable:
    module, _, attr = name.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def to_json(model: nn.Module) -> list:
    """The records of ``model`` as JSON data (raises for arguments that cannot be saved)."""
    out = []
    for op, kwargs in recorded(model):
        kwargs = dict(kwargs)
        if callable(kwargs.get("activation")):
            kwargs["activation"] = callable_name(kwargs["activation"], "upcycle_ffn activation")
        out.append({"op": op, "kwargs": kwargs})
    return out


def replay(model: nn.Module, records: list) -> None:
    """Apply the saved edits to a fresh base model, in their original order."""
    from .molex import apply_molex
    from .upcycle import upcycle_ffn

    ops = {"upcycle_ffn": upcycle_ffn, "apply_molex": apply_molex}
    for entry in records:
        op, kwargs = entry["op"], {**LEGACY_DEFAULTS.get(entry["op"], {}), **entry["kwargs"]}
        if op not in ops:
            raise ValueError(f"unknown structural edit {op!r} in the checkpoint")
        if isinstance(kwargs.get("activation"), str):
            kwargs["activation"] = resolve_callable(kwargs["activation"])
        ops[op](model, **kwargs)
