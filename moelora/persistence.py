"""Saving and loading adapters, and interop with PEFT LoRA checkpoints.

- :func:`save_pretrained` writes ``moelora_config.json`` and ``adapter_model.safetensors``
  (adapter, router and task-scale parameters, router schedule buffers, trainable biases,
  and every tensor of the modules moelora added whole: upcycled MoE FFNs, MoLEx gates);
  (or, with ``max_shard_size``, transformers' shards ``adapter_model-0000i-of-0000n.safetensors`` and their
  index ``adapter_model.safetensors.index.json``, which the readers take too);
  ``moelora.from_pretrained`` (moelora.model, on top of this module's readers) replays
  ``upcycle_ffn`` / ``apply_molex`` (recorded in the config), injects the layers into a fresh
  base model and loads them back bit-exactly.
- :func:`export_peft_lora` writes a plain PEFT LoRA checkpoint (``adapter_config.json`` +
  ``adapter_model.safetensors``) for static routing: E = 1 (LoRA or DoRA), or one task of a
  task-routed model, whose delta s*gamma*B_t@A_t (+ s*B_sh@A_sh) becomes a rank-r (2r)
  LoRA with the same scaling.
- ``moelora.load_peft_lora`` (moelora.model, with this module's PEFT readers) reads a PEFT
  LoRA checkpoint as a single expert: into a fresh model (E = 1), or into expert ``expert``
  of an injected model with per-expert A. Into a task-routed model it sets that task's gate
  ``lora_gamma[expert]`` to 1, so the task computes the PEFT LoRA exactly (a layer's
  task-shared LoRA must be zero, and so must that task of the task-routed layers the checkpoint
  does not adapt, else it raises).
- Both handle PEFT's layers on linear layers, embeddings (``lora_embedding_A/B``) and
  convolutions (conv kernels), the biases a ``bias="all"`` / ``"lora_only"`` adapter trains,
  and ``modules_to_save`` (PEFT names their tensors ``<module>.<param>``). The import also
  takes the input / output embedding weights PEFT saves with ``save_embedding_layers`` (by
  default when ``embed_tokens`` or ``lm_head`` is a target: ``<module>.base_layer.weight``)
  and copies them into the model's base layers, as PEFT does; the export writes those of the adapted
  embedding layers as PEFT's "auto" does. A PEFT config setting it cannot
  reproduce (layer_replication, lora_bias, PiSSA's or LoftQ's init_lora_weights, ...) is refused,
  the error naming the field (PEFT_SUPPORTED_FIELDS).
- Named adapters (:mod:`moelora.tuner.adapters`): :func:`save_pretrained` writes "default" in the
  directory and any other adapter in a subfolder named after it (PEFT's layout);
  :func:`load_adapter` adds one to a loaded model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import tempfile
import uuid
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from moelora.tuner import structure as _structure
from moelora.tuner.config import BIAS_MODES, CONFIG_NAME, MoELoRAConfig
from moelora.tuner.merge import check_task_used
from moelora.modules.conv import MoELoRAConv
from moelora.modules.embedding import MoELoRAEmbedding
from moelora.modules.adapter_base import is_adapter_layer, owned_by_moelora
from moelora.modules.routed import restore_routing_records, routing_records
from moelora.tuner.adapters import (DEFAULT_ADAPTER, ModulesToSaveWrapper, adapter_tensor_names, check_adapter_name,
                                    merged_tasks, optional_names, remerge)
from moelora.tuner.targets import pattern_value, unwrap

WEIGHTS_NAME = "adapter_model.safetensors"
# A sharded adapter (save_pretrained's max_shard_size): transformers' layout, the index naming each tensor's shard
WEIGHTS_INDEX_NAME = WEIGHTS_NAME + ".index.json"
_SHARD_FILE = re.compile(r"adapter_model-\d{5}-of-\d{5}\.safetensors")
_SIZE_UNITS = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "KIB": 2 ** 10, "MIB": 2 ** 20,
               "GIB": 2 ** 30, "TIB": 2 ** 40, "B": 1}
STRUCTURE_KEY = "structure"  # the replayed upcycle_ffn / apply_molex calls (moelora.tuner.structure)
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# The fields of PEFT's adapter_config.json that load_peft_lora reproduces (peft_as_config), that
# describe the checkpoint, or that chose what its tensors hold (the targets, their ranks, the
# initial weights, which the tensors replace) or a layout they do not change (fan_in_fan_out: the
# base weight's, GPT-2's Conv1D); the *_config of an init_lora_weights mode is read with that mode
# only, runtime_config at run time only. Any other field (layer_replication, lora_bias,
# trainable_token_indices, use_qalora, ...) must be unset (None, False, {} or []): a checkpoint
# that uses it computes what moelora does not, and loading it is refused naming the field.
PEFT_SUPPORTED_FIELDS = (
    "lora_alpha", "alpha_pattern", "lora_dropout", "use_rslora", "use_dora", "bias", "modules_to_save",
    "base_model_name_or_path", "peft_type", "task_type", "revision", "inference_mode", "auto_mapping", "peft_version",
    "r", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
    "init_lora_weights", "fan_in_fan_out", "eva_config", "corda_config", "loftq_config", "lora_ga_config",
    "megatron_core", "qalora_group_size", "runtime_config")
# init_lora_weights modes whose checkpoint holds the whole adapter: the base weights stay as they
# were (PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite them; MiCA is a LoRA variant).
PEFT_INIT_LORA_WEIGHTS = ("gaussian", "orthogonal", "eva")


def _owned_prefixes(model: nn.Module) -> tuple:
    """Name prefixes of the modules moelora added whole (upcycled MoE FFNs, MoLEx)."""
    return tuple(n + "." for n, m in unwrap(model).named_modules() if owned_by_moelora(m))


def _strip_wrapper_prefix(name: str, known: set) -> Optional[str]:
    """``name`` without the prefix a wrapper added ("model.", "module.model.", ...), if the
    rest is one of the ``known`` names (the adapter tensors of the wrapped model)."""
    parts = name.split(".")
    for i in range(len(parts)):
        candidate = ".".join(parts[i:])
        if candidate in known:
            return candidate
    return None


def adapter_state_dict(model: nn.Module, bias: str = "none", state_dict: Optional[dict] = None) -> dict:
    """The tensors a checkpoint holds, named as in the wrapped model's state_dict.

    ``state_dict`` (e.g. a full state dict gathered from FSDP, or a wrapper's, whose names
    carry a prefix) is read instead of the model's own when given; it must hold every
    adapter tensor, unsharded.
    """
    saved = adapter_tensor_names(unwrap(model), bias)
    if state_dict is None:
        source = unwrap(model).state_dict()
    else:
        source = {}
        for name, tensor in state_dict.items():
            stripped = _strip_wrapper_prefix(name, saved)
            if stripped is not None:
                source[stripped] = tensor
        missing = sorted(saved - set(source))
        if missing:
            raise ValueError(f"state_dict lacks adapter tensors of the model, e.g. {missing[:3]} (an FSDP full "
                             "state dict is only gathered on rank 0: save there)")
    state = {}
    for name, tensor in source.items():
        if name not in saved:
            continue
        if hasattr(tensor, "device_mesh"):
            raise ValueError(
                f"{name} is sharded ({type(tensor).__name__}): gather a full state dict first, e.g. "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options="
                "StateDictOptions(full_state_dict=True, cpu_offload=True)), and pass it as state_dict=")
        state[name] = tensor.detach().contiguous().clone()
    return state


def save_pretrained(model: nn.Module, save_directory: str, state_dict: Optional[dict] = None,
                    selected_adapters: Optional[List[str]] = None, *, is_main_process: bool = True,
                    max_shard_size=None) -> None:
    """Write each adapter of ``model`` (``selected_adapters``, default all) as PEFT lays them out:
    the adapter "default" in ``save_directory``, any other in ``save_directory/<name>``. With
    ``state_dict`` (read instead of the model's own) only the active adapter is written (selecting
    another raises). Names the model has no adapter of raise. ``model`` is a MoELoRAModel (it holds the
    adapters' configs); any other module raises a TypeError. ``is_main_process`` False (the other ranks of
    a distributed run, as transformers' argument): the arguments are checked, nothing is written.
    ``max_shard_size`` (bytes, or a string as transformers': "5GB" = 5 * 10**9, "5GiB" = 5 * 2**30; None: no
    limit) splits an adapter's tensors over files of at most that size (a tensor larger than it gets a file of
    its own) with transformers' index ``adapter_model.safetensors.index.json``, where they exceed it. A
    torch.compile'd MoELoRAModel is saved as the model it compiles. A directory it would write that holds a PEFT
    checkpoint's ``adapter_config.json`` raises a ValueError before anything is written (its weights file has the
    name of ours)."""
    model = _uncompiled(model)
    if not getattr(type(model), "is_moelora_model", False):
        raise TypeError(f"save_pretrained writes a MoELoRAModel (get_moelora_model's, which holds the adapters' "
                        f"configs), got {type(model).__name__}: save the wrapper, not the model it wraps")
    shard_bytes = _shard_bytes(max_shard_size)
    names = optional_names(selected_adapters, model.adapter_configs)
    if state_dict is not None and selected_adapters is not None and names != [model.active_adapter]:
        raise ValueError(f"with state_dict only the active adapter ({model.active_adapter!r}) is written; "
                         f"selected_adapters asks for {names}: set_adapter first, or save without state_dict")
    if not is_main_process:
        return
    active_only = state_dict is not None or not model.inactive_adapters
    for name in [model.active_adapter] if active_only else names:  # before anything is written
        _refuse_other_format(_adapter_directory(save_directory, name), PEFT_CONFIG_NAME,
                             "a PEFT LoRA checkpoint (export_peft_lora's or PEFT's)")
    if active_only:
        _save_active_adapter(model, _adapter_directory(save_directory, model.active_adapter), state_dict,
                             shard_bytes)
        return
    for name in names:
        with _adapter_active(model, name):
            _save_active_adapter(model, _adapter_directory(save_directory, name), shard_bytes=shard_bytes)


def _refuse_other_format(directory: str, config_name: str, what: str) -> None:
    """ValueError where ``directory`` holds ``config_name``, the config of the other checkpoint format (``what``):
    both formats name their weights ``adapter_model.safetensors``, so writing this one there would leave that
    config describing weights it does not hold (PEFT loads them with a warning only, as an untrained adapter)."""
    if os.path.isfile(os.path.join(directory, config_name)):
        raise ValueError(f"{directory} holds {config_name}, {what}, whose {WEIGHTS_NAME} this save would overwrite "
                         f"(both formats name their weights so): save into another directory, or remove that "
                         f"checkpoint first")


def _shard_bytes(max_shard_size) -> Optional[int]:
    """``max_shard_size`` in bytes (None: no limit); ValueError naming it unless a positive int or a string
    as transformers reads it ("500MB", "5GB", "2GiB"; a lowercase b after K, M, G or T counts bits: "500Mb")."""
    if max_shard_size is None:
        return None
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        size = max_shard_size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(max_shard_size).upper()) \
            if isinstance(max_shard_size, str) else None
        if match is None:
            raise ValueError(f"max_shard_size must be None, an int number of bytes or a size such as '5GB' or "
                             f"'500MiB', got {max_shard_size!r}")
        bits = len(match.group(2)) == 2 and max_shard_size.rstrip().endswith("b")  # transformers' "5Gb", "5gb"
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)]) // (8 if bits else 1)
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    return size


def _write_staged(directory: str, writers: Dict[str, Callable[[str], None]]) -> None:
    """Write the files ``writers`` names ({file name: function writing it at a path}) into ``directory``: each
    under a temporary name first, all renamed into place once every one is written; a writer that fails (a full
    disk) leaves no temporary file and ``directory`` as it was."""
    staged = []
    try:
        for name, write in writers.items():
            # names of this save's own: another save into the directory at once stages its files beside these
            staged.append((os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp"), os.path.join(directory, name)))
            write(staged[-1][0])
    except BaseException:
        for temporary, _ in staged:
            if os.path.exists(temporary):
                os.remove(temporary)
        raise
    for temporary, final in staged:
        os.replace(temporary, final)


def _write_adapter_files(directory: str, config: dict, state: dict, shard_bytes: Optional[int]) -> None:
    """Write ``config`` as ``moelora_config.json`` and ``state`` as ``adapter_model.safetensors``, or, where its
    tensors exceed ``shard_bytes``, as transformers' shards ``adapter_model-0000i-of-0000n.safetensors`` (tensors in
    name order, a file filled up to ``shard_bytes``) and their index. Every file is written under a temporary name
    first and renamed into place once all are written; the weight files of an earlier save in ``directory`` that
    these do not replace are removed then, so that a reader never mixes them with these. A save that fails midway
    (a full disk) leaves the earlier save as it was."""
    from safetensors.torch import save_file

    sizes = {name: t.numel() * t.element_size() for name, t in state.items()}
    shards, size = [{}], 0
    for name in sorted(state):
        if shard_bytes is not None and shards[-1] and size + sizes[name] > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += sizes[name]

    def json_file(data):
        def write(path):
            with open(path, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
        return write

    writers = {CONFIG_NAME: json_file(config)}
    if len(shards) == 1:
        writers[WEIGHTS_NAME] = functools.partial(save_file, state, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"adapter_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            writers[file] = functools.partial(save_file, shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        writers[WEIGHTS_INDEX_NAME] = json_file({"metadata": {"total_size": sum(sizes.values())},
                                                 "weight_map": weight_map})
    _write_staged(directory, writers)
    for stale in os.listdir(directory):
        if stale not in writers and (stale in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) or _SHARD_FILE.fullmatch(stale)):
            with contextlib.suppress(FileNotFoundError):  # removed by another save into the directory at once
                os.remove(os.path.join(directory, stale))


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module torch.compile compiled into ``model`` (its OptimizedModule's ``_orig_mod``), else ``model``."""
    return getattr(model, "_orig_mod", model)


def _adapter_directory(save_directory: str, adapter_name: str) -> str:
    return save_directory if adapter_name == DEFAULT_ADAPTER else os.path.join(save_directory, adapter_name)


@contextlib.contextmanager
def _adapter_active(model: nn.Module, adapter_name: str):
    """Make ``adapter_name`` the active adapter inside the block (trainability, the train / eval mode of every
    module, the merged layers of the active adapter and the loss and statistics of their last forward, restored
    after)."""
    if adapter_name == model.active_adapter:
        yield
        return
    previous, frozen = model.active_adapter, model._active_frozen
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes, records = [(m, m.training) for m in model.modules()], routing_records(model.model)
    merged = merged_tasks(model.model)
    model.set_adapter(adapter_name)
    try:
        yield
    finally:
        model.set_adapter(previous, inference_mode=frozen)
        remerge(model.model, merged)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        restore_routing_records(records)


def _save_active_adapter(model: nn.Module, save_directory: str, state_dict: Optional[dict] = None,
                         shard_bytes: Optional[int] = None) -> None:
    """Write ``moelora_config.json`` and ``adapter_model.safetensors`` (or its shards, :func:`_write_adapter_files`) of
    the active adapter (see the module docstring); with ``state_dict`` the tensors come from it (see
    :func:`adapter_state_dict`)."""
    config = model.moelora_config
    state = adapter_state_dict(model, config.bias, state_dict)
    os.makedirs(save_directory, exist_ok=True)
    saved = config.to_dict()
    structure = _structure.to_json(unwrap(model))
    if structure:
        saved[STRUCTURE_KEY] = structure
    _write_adapter_files(save_directory, saved, state, shard_bytes)


def _read_json(path: str, what: str) -> dict:
    """The JSON object in ``path``; errors name the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text (JSON) file ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got a JSON {type(data).__name__}")
    return data


def _read_safetensors(path: str) -> dict:
    """The tensors in the safetensors file ``path``; errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        pickled = os.path.splitext(path)[0] + ".bin"  # PEFT's safe_serialization=False (and older PEFT) file
        hint = (f"; {os.path.basename(pickled)} beside it is a pickle, which moelora does not read (checkpoints are "
                "data only): save the adapter again with safe_serialization=True") if os.path.isfile(pickled) else ""
        raise FileNotFoundError(f"{path}: no such file (the adapter's weights){hint}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def weights_file(directory: str) -> str:
    """The weights of the adapter saved in ``directory``: ``adapter_model.safetensors``, else the index of its
    shards (``adapter_model.safetensors.index.json``) where there is one (transformers' order)."""
    single, index = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, WEIGHTS_INDEX_NAME)
    return index if os.path.isfile(index) and not os.path.isfile(single) else single


def read_weights(directory: str) -> dict:
    """The tensors of the adapter saved in ``directory`` (:func:`weights_file`): one safetensors file, or the
    shards an index names, each shard holding exactly the tensors the index maps to it; errors name the file."""
    path = weights_file(directory)
    if not path.endswith(WEIGHTS_INDEX_NAME):
        return _read_safetensors(path)
    weight_map = _read_json(path, "the shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{path}: weight_map must be a non-empty JSON object of tensor name -> shard file name, got "
                         f"{weight_map!r:.200}")
    state = {}
    for file in sorted(set(weight_map.values())):
        if os.path.basename(file) != file or file in (os.curdir, os.pardir):
            raise ValueError(f"{path}: shard {file!r} is not a file name in the adapter's directory")
        shard = _read_safetensors(os.path.join(directory, file))
        listed = {k for k, v in weight_map.items() if v == file}
        if set(shard) != listed:
            raise ValueError(f"{path}: shard {file} does not hold the tensors the index maps to it: missing "
                             f"{sorted(listed - set(shard))[:5]}, not in the index {sorted(set(shard) - listed)[:5]}")
        state.update(shard)
    return state


def _config_file(directory: str, name: str, other: str, other_is: str) -> str:
    """``directory/name``; FileNotFoundError naming the path where ``directory`` is not a directory (a hub id), or
    naming the file where there is no such file, saying what the directory holds instead: ``other`` (the other
    format's config, which ``other_is`` describes), or
    adapters in subfolders (save_pretrained's layout for adapters other than "default")."""
    if not os.path.isdir(directory):  # a hub id ("org/adapter"), a file, a typo: say what was expected
        what = "a file" if os.path.exists(directory) else "no such directory"
        raise FileNotFoundError(f"{directory}: {what}; an adapter is read from the local directory save_pretrained "
                                "wrote (moelora does not download: fetch a hub adapter first, e.g. with "
                                "huggingface_hub.snapshot_download, and pass its directory)")
    path = os.path.join(directory, name)
    if os.path.isfile(path):
        return path
    hint = ""
    if os.path.isfile(os.path.join(directory, other)):
        hint = f"; the directory holds {other}: {other_is}"
    elif os.path.isdir(directory):
        named = sorted(d for d in os.listdir(directory) if os.path.isfile(os.path.join(directory, d, name)))
        if named:
            hint = (f"; its subfolders {named} hold adapters (save_pretrained writes adapters other than "
                    "'default' there)")
    raise FileNotFoundError(f"{path}: no such file (the adapter's config){hint}")


def read_checkpoint(directory: str):
    """(config, structure records, tensors) of a checkpoint, every file read and checked."""
    config_path = _config_file(directory, CONFIG_NAME, PEFT_CONFIG_NAME,
                               "a PEFT LoRA checkpoint, which moelora.load_peft_lora reads")
    saved = _read_json(config_path, "the MoE-LoRA config")
    structure = saved.pop(STRUCTURE_KEY, [])
    try:
        config = MoELoRAConfig.from_dict(saved)
        _structure.check_records(structure)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{config_path}: {exc}") from None
    return config, structure, read_weights(directory)


@contextlib.contextmanager
def restored_on_error(model: nn.Module):
    """Undo every change to ``model``'s module tree (children, attributes, hooks, classes,
    requires_grad flags) if the block raises; parameter values are not touched by the
    blocks that use it before they succeed."""
    modules = list(model.modules())
    saved = [(m, type(m), {k: copy.copy(v) if isinstance(v, (dict, list, set)) else v for k, v in vars(m).items()})
             for m in modules]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for m, cls, attributes in saved:
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(attributes)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def _legacy_base_tensor(name: str, present: dict) -> bool:
    """A base model's tensor that checkpoints of the substring era saved with the adapter (its
    name contained 'lora_' or 'router.'): loaded as saved."""
    return name in present and ("lora_" in name or "router." in name)


def load_adapter(model: nn.Module, directory: str, adapter_name: str, is_trainable: bool = False) -> None:
    """Add the adapter saved in ``directory`` to ``model`` as ``adapter_name`` (inactive), as PEFT's
    ``load_adapter``. The model must have the structure (upcycling, MoLEx) the adapter was
    saved with; its config's ``inference_mode`` is ``not is_trainable`` (as PEFT's), and it is
    trainable once ``set_adapter`` activates it, unless given ``inference_mode=True`` there (as
    PEFT's; the others keep their trainability). Its modules are
    in the model's train / eval mode (``MoELoRAModel.add_adapter``): an adapter loaded into a
    model from ``from_pretrained`` (eval) runs without dropout or router noise. Every file is
    checked first (the name before the files); an adapter that does not fit is not added."""
    check_adapter_name(adapter_name, model.adapter_configs, must_exist=False)
    config, structure, state = read_checkpoint(directory)
    if structure != _structure.to_json(unwrap(model)):
        raise ValueError(f"the adapter in {directory} was saved on a model with the structural edits {structure}, "
                         f"this model has {_structure.to_json(unwrap(model))}")
    model.add_adapter(adapter_name, dataclasses.replace(config, inference_mode=not is_trainable))  # as PEFT's
    try:
        with _adapter_active(model, adapter_name):
            load_active_adapter_weights(model, state, weights_file(directory))
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


def load_active_adapter_weights(wrapped: nn.Module, state: dict, weights_path: str) -> None:
    """Load ``state`` (read from ``weights_path``) into the active adapter, checking names and shapes first."""
    expected = adapter_tensor_names(wrapped.model, wrapped.moelora_config.bias)
    present = wrapped.model.state_dict()
    missing = sorted(expected - set(state))
    unexpected = sorted(n for n in state if n not in expected and not _legacy_base_tensor(n, present))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: checkpoint does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != present[name].shape:
            raise ValueError(f"{weights_path}: checkpoint does not fit the model: {name} has shape "
                             f"{tuple(tensor.shape)}, the model expects {tuple(present[name].shape)}")
        _check_dtype_kind(f"{weights_path}: checkpoint does not fit the model: {name}", tensor, present[name])
    # A model built on the meta device (accelerate's init_empty_weights) holds no values to copy
    # into: its adapter tensors become the checkpoint's, in the model's dtypes (as PEFT's low_cpu_mem_usage load)
    on_meta = {n: t.to(present[n].dtype) for n, t in state.items() if present[n].is_meta}
    if on_meta:
        wrapped.model.load_state_dict(on_meta, strict=False, assign=True)
    wrapped.model.load_state_dict({n: t for n, t in state.items() if n not in on_meta}, strict=False)


def _dtype_kind(tensor: torch.Tensor) -> str:
    if tensor.is_floating_point():
        return "floating-point"
    return "complex" if tensor.is_complex() else "bool" if tensor.dtype == torch.bool else "integer"


def _check_dtype_kind(what: str, tensor: torch.Tensor, own: torch.Tensor) -> None:
    """ValueError unless ``tensor`` is of the kind of ``own``'s dtype (floating-point, integer, ...):
    copying it would round (a float step counter) or cast bools and ints into weights silently.
    Floating-point precisions may differ (a bf16 checkpoint loads into fp32 adapters)."""
    if _dtype_kind(tensor) != _dtype_kind(own):
        raise ValueError(f"{what} has dtype {tensor.dtype}, the model's is {own.dtype} ({_dtype_kind(own)} values "
                         "expected)")


# ------------------------------------------------------------------------------- PEFT interop
def check_peft_conv(name: str, layer: nn.Module) -> None:
    """ValueError where ``layer`` is a convolution whose LoRA PEFT computes otherwise: PEFT's lora_A
    convolution takes the base's kernel size, stride and padding but neither its dilation nor its
    padding_mode, so a LoRA moved between PEFT and moelora there would compute other numbers."""
    if not isinstance(layer, MoELoRAConv):
        return
    geometry = layer.geometry
    padded = geometry.padding == "same" or (not isinstance(geometry.padding, str) and any(geometry.padding))
    if any(d != 1 for d in geometry.dilation) or (geometry.padding_mode != "zeros" and padded):
        raise ValueError(f"{name}: PEFT's LoRA convolution ignores the base's dilation {geometry.dilation} and "
                         f"padding_mode {geometry.padding_mode!r}, which moelora's follows: a LoRA moved between "
                         "them would compute other numbers (save it with save_pretrained)")


def _peft_layer_tensors(name: str, layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> dict:
    """PEFT's tensors of one layer from its factors A [r', d_in], B [d_out, r'] (flat layouts)."""
    prefix = f"{PEFT_PREFIX}{name}."
    if isinstance(layer, MoELoRAEmbedding):
        return {prefix + "lora_embedding_A": a, prefix + "lora_embedding_B": b}
    if isinstance(layer, MoELoRAConv):  # A a conv kernel [r', C_in, *kernel], B 1 x 1 [C_out, r'/groups, 1, ...]
        check_peft_conv(name, layer)
        if layer.groups > 1 and layer.task_shared_lora:
            raise ValueError(f"{name}: a task-shared LoRA on a grouped convolution has no PEFT equivalent")
        ones = (1,) * len(layer.kernel_size)
        return {prefix + "lora_A.weight": a.reshape(a.shape[0], layer.in_channels, *layer.kernel_size),
                prefix + "lora_B.weight": b.reshape(*b.shape, *ones)}
    return {prefix + "lora_A.weight": a, prefix + "lora_B.weight": b}


def exact_module_patterns(names) -> tuple:
    """(target_modules, {name: rank_pattern / alpha_pattern key}) that select exactly the modules ``names``, as
    PEFT and moelora read them (moelora.tuner.targets): a list of names would also select every module whose name
    ends with ``.<name>`` and a plain key would give such a module its value (``lin``'s rank to ``sub.lin``), so the
    targets are one regex matching the whole names and each key is anchored at the start of the name."""
    names = sorted(names)
    return "(?:" + "|".join(re.escape(n) for n in names) + ")", {n: "^" + re.escape(n) for n in names}


def _peft_extra_tensors(model: nn.Module, bias: str) -> tuple:
    """(PEFT tensors of the saved modules, of the biases ``bias`` names and of the adapted input / output
    embedding layers' base weights, saved module names).

    PEFT names a saved module's tensors ``<module>.<param>`` and a bias ``<module>.bias``
    (``<module>.base_layer.bias`` in an adapted layer), as the model's own state dict does. Where the input or
    output embedding layer is adapted, PEFT's save_embedding_layers ("auto") saves its base weight
    (``<module>.base_layer.weight``, e.g. the rows of a resized vocabulary) and its load restores it."""
    inner = unwrap(model)
    saved = {n: m for n, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    state = {f"{PEFT_PREFIX}{n}.{k}": t for n, m in saved.items() for k, t in m.modules_to_save.state_dict().items()}
    own = inner.state_dict()
    state.update({f"{PEFT_PREFIX}{p}weight": own[f"{p}weight"] for p in _peft_embedding_prefixes(inner)
                  if p.endswith(".base_layer.")})
    if bias != "none":
        skip = _owned_prefixes(model) + tuple(f"{n}." for n in saved)
        for name, tensor in own.items():
            if name.startswith(skip) or not name.endswith("bias"):
                continue
            if bias == "all" or name.endswith("base_layer.bias"):
                state[PEFT_PREFIX + name] = tensor
    on_meta = next((k for k, t in state.items() if t.is_meta), None)
    if on_meta is not None:  # no values to write (torch's "Cannot copy out of meta tensor" at the write)
        raise NotImplementedError(
            f"the PEFT checkpoint would hold {on_meta[len(PEFT_PREFIX):]}, which is on meta (accelerate offloaded it, "
            "loading it for each forward only; or the model was built on meta and not loaded): it has no values to "
            "write; export with bias='none', or from a model loaded without offloading that layer")
    return {k: t.detach().contiguous().clone() for k, t in state.items()}, sorted(saved)


def export_peft_lora(model: nn.Module, save_directory: str, task: Optional[int] = None,
                     bias: Optional[str] = None) -> None:
    """Write into ``save_directory`` a PEFT LoRA checkpoint equal to the active adapter (for ``task``
    if task-routed), with its saved modules, the biases ``bias`` names (default: the adapter's
    ``bias``), its layers' lora_dropout (one value: layers that differ in it raise) and the adapter's task_type and
    base_model_name_or_path (what PEFT's AutoPeftModel classes read). A model with
    upcycled FFNs or MoLEx raises: PEFT has no place for them. A torch.compile'd model exports the model it
    compiles. A ``save_directory`` holding a moelora checkpoint (``moelora_config.json``) raises a ValueError: its
    weights file has the name of PEFT's. Both files are staged as save_pretrained's: an export that fails midway
    (a full disk) leaves an earlier export in ``save_directory`` as it was."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    model = _uncompiled(model)  # else its names start with _orig_mod.
    layers = [(n, m) for n, m in unwrap(model).named_modules() if is_adapter_layer(m)]
    if not layers:
        raise ValueError("the model holds no MoE-LoRA layer")
    check_task_used(layers, task)
    edits = [op for op, _ in _structure.recorded(unwrap(model))]
    if edits:  # their modules (MoE FFNs, MoLEx gates) are part of the model's function
        raise ValueError(f"the model has structural edits {edits} that a PEFT LoRA checkpoint cannot hold (LoRA "
                         "layers, saved modules and biases only); save it with save_pretrained")
    adapter = model.moelora_config if unwrap(model) is not model else MoELoRAConfig()  # a bare model: defaults
    if bias is None:
        bias = adapter.bias
    if not isinstance(bias, str) or bias not in BIAS_MODES:  # PEFT's load would fail on it, not name it
        raise ValueError(f"bias must be None or one of {BIAS_MODES}, got {bias!r}")
    use_rslora = layers[0][1].use_rslora
    use_dora = layers[0][1].use_dora
    dropouts = {layer.settings.lora_dropout for _, layer in layers}
    if len(dropouts) > 1:  # PEFT's LoraConfig has one lora_dropout
        raise ValueError(f"the layers' lora_dropout values differ ({sorted(dropouts)}): a PEFT LoRA checkpoint holds "
                         "one")
    state, rank_pattern, alpha_pattern = {}, {}, {}
    target_modules, keys = exact_module_patterns(n for n, _ in layers)
    for name, layer in layers:
        a, b = layer.static_lora_factors(task)
        rank = a.shape[0]
        alpha = layer.scaling * (math.sqrt(rank) if use_rslora else rank)
        state.update({k: t.detach().contiguous().clone() for k, t in _peft_layer_tensors(name, layer, a, b).items()})
        if use_dora:
            state[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach().clone()
        rank_pattern[keys[name]], alpha_pattern[keys[name]] = rank, alpha
    extra, saved_modules = _peft_extra_tensors(model, bias)
    state.update(extra)
    config = LoraConfig(r=rank_pattern[next(iter(rank_pattern))], lora_alpha=alpha_pattern[next(iter(alpha_pattern))],
                        target_modules=target_modules, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                        use_rslora=use_rslora, use_dora=use_dora, bias=bias, lora_dropout=dropouts.pop(),
                        modules_to_save=saved_modules or None, task_type=adapter.task_type,
                        base_model_name_or_path=adapter.base_model_name_or_path)
    _refuse_other_format(save_directory, CONFIG_NAME, "a moelora checkpoint (save_pretrained's)")
    os.makedirs(save_directory, exist_ok=True)

    def write_config(path):  # PEFT's own writer, which takes a directory
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".adapter_config.") as staging:
            config.save_pretrained(staging)
            os.replace(os.path.join(staging, PEFT_CONFIG_NAME), path)

    _write_staged(save_directory, {PEFT_CONFIG_NAME: write_config,
                                   WEIGHTS_NAME: functools.partial(save_file, state, metadata={"format": "pt"})})


def read_peft_checkpoint(directory: str):
    """(adapter config, {module: {"lora_A"|"lora_B"|"lora_magnitude_vector": tensor}}, {name: other
    tensor}, weights path) of a PEFT LoRA checkpoint; errors name the file."""
    config_path = _config_file(directory, PEFT_CONFIG_NAME, CONFIG_NAME,
                               "a moelora checkpoint, which moelora.from_pretrained reads")
    weights_path = weights_file(directory)
    peft_config = _read_json(config_path, "the PEFT adapter config")
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: not a LoRA checkpoint: peft_type={peft_config.get('peft_type')!r}")
    _check_peft_fields(peft_config, config_path)
    state = read_weights(directory)
    modules, others = {}, {}
    for key, tensor in state.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B)\.weight|"
                         rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_magnitude_vector)(?:\.weight)?|"
                         rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_embedding_(A|B)", key)
        if m is not None:
            name = m.group(1) or m.group(3) or m.group(5)
            part = m.group(2) or m.group(4) or f"lora_{m.group(6)}"
            if part in ("lora_A", "lora_B") and tensor.dim() < 2:  # conv kernels: [r, C_in, *kernel] / [C_out, ...]
                raise ValueError(f"{weights_path}: {name}.{part} must be 2-D (a conv kernel: 3-D or more), got "
                                 f"shape {tuple(tensor.shape)}")
            modules.setdefault(name, {})[part] = tensor
        elif key.startswith(PEFT_PREFIX):
            others[key[len(PEFT_PREFIX):]] = tensor  # biases and saved modules
        else:
            raise ValueError(f"{weights_path}: unsupported tensor in the PEFT checkpoint: {key}")
    if not modules:
        raise ValueError(f"{weights_path}: the PEFT checkpoint holds no LoRA tensor")
    for name, tensors in modules.items():
        for part in ("lora_A", "lora_B"):
            if part not in tensors:
                raise ValueError(f"{weights_path}: {name} has no {PEFT_PREFIX}{name}.{part}.weight "
                                 f"(found {sorted(tensors)})")
    return peft_config, modules, others, weights_path


def _check_peft_fields(peft_config: dict, config_path: str) -> None:
    """ValueError naming the field for a PEFT config setting moelora cannot reproduce (see
    PEFT_SUPPORTED_FIELDS and PEFT_INIT_LORA_WEIGHTS)."""
    for name, value in peft_config.items():
        if name not in PEFT_SUPPORTED_FIELDS and not (value is None or value is False or value in ({}, [])):
            raise ValueError(f"{config_path}: {name}={value!r} is not supported: moelora cannot reproduce what it "
                             f"changes; a PEFT LoRA checkpoint loads with it unset (None, False, {{}} or [])")
    init = peft_config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or (isinstance(init, str) and init in PEFT_INIT_LORA_WEIGHTS)):
        raise ValueError(f"{config_path}: init_lora_weights={init!r} is not supported: moelora loads adapters "
                         f"initialised with True, False or {PEFT_INIT_LORA_WEIGHTS}, which leave the base model as "
                         "it was (PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base weights: convert the "
                         "adapter with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...))")


def _check_peft_fits(name: str, tensors: dict, layer, target: int, weights_path: str) -> None:
    """The PEFT tensors of module ``name`` fit expert ``target`` of ``layer`` exactly (no
    broadcasting): A and B as one expert's (a convolution's as PEFT's kernels: A [r, C_in, *kernel_size], B
    [C_out, r/groups, 1, ...]), the DoRA magnitude as the layer's (a DoRA layer needs
    one, a LoRA layer takes none). In a task-routed
    layer the task-shared LoRA, which every task adds, must be zero (B, or A where it is not
    the imported one), so that task ``target`` computes the PEFT LoRA exactly."""
    if not is_adapter_layer(layer):
        raise ValueError(f"{weights_path}: {name} is not a MoE-LoRA layer of the model")
    check_peft_conv(f"{weights_path}: {name}", layer)
    if not 0 <= target < layer.num_experts:
        raise ValueError(f"expert must be in [0, {layer.num_experts}) for {name}, got {target}")
    if layer.share_lora_a and layer.num_experts > 1:
        raise ValueError(f"{name}: cannot load a PEFT LoRA into one expert of a layer whose A is shared")
    if layer.task_shared_lora and layer.lora_B[-1].any() and (
            layer.share_lora_a or layer.expert_A(layer.num_experts).any()):
        raise ValueError(f"{name}: the layer's task-shared LoRA is non-zero and adds to every task's output, so task "
                         f"{target} would not compute the PEFT LoRA; load it into a layer whose shared LoRA is zero "
                         "(as injected)")
    expected = {"lora_A": tuple(layer.lora_A.shape[0 if layer.share_lora_a else 1:]),
                "lora_B": tuple(layer.lora_B.shape[1:])}
    if isinstance(layer, MoELoRAConv):  # PEFT's conv kernels: A [r, C_in, *kernel], B [C_out, r/groups, 1, ...]
        expected = {"lora_A": (expected["lora_A"][0], layer.in_channels, *layer.kernel_size),
                    "lora_B": expected["lora_B"] + (1,) * len(layer.kernel_size)}
    if "lora_magnitude_vector" in tensors:
        if not layer.use_dora:
            raise ValueError(f"{weights_path}: {name}: the checkpoint is DoRA but the layer is not")
        expected["lora_magnitude_vector"] = tuple(layer.lora_magnitude_vector.shape)
    elif layer.use_dora:  # its magnitude would stay the layer's own: not the checkpoint's function
        raise ValueError(f"{weights_path}: {name}: the layer is DoRA but the checkpoint has no "
                         f"{PEFT_PREFIX}{name}.lora_magnitude_vector")
    for part, shape in expected.items():
        if tuple(tensors[part].shape) != shape:
            raise ValueError(f"{weights_path}: {name}.{part} has shape {tuple(tensors[part].shape)}, the layer "
                             f"(r={layer.r}) needs {shape}")
        _check_dtype_kind(f"{weights_path}: {name}.{part}", tensors[part], layer.lora_B)


def _peft_embedding_prefixes(inner: nn.Module) -> tuple:
    """Name prefixes of the tensors of the input and output embedding layers that PEFT's
    ``save_embedding_layers`` saves (a transformers model's ``get_input_embeddings`` /
    ``get_output_embeddings``): the base layer of an adapted one (embed_tokens or lm_head among
    the targets), a layer that is not adapted (a resized vocabulary) whole."""
    inner_names = {id(m): n for n, m in inner.named_modules()}
    prefixes = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(inner, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if layer is not None and id(layer) in inner_names:
            prefixes.append(f"{inner_names[id(layer)]}.{'base_layer.' if is_adapter_layer(layer) else ''}")
    return tuple(prefixes)


def _peft_extras_targets(inner: nn.Module, others: dict, weights_path: str, peft_saved) -> list:
    """(model tensor, checkpoint tensor, checkpoint key) of a PEFT checkpoint's biases, saved modules' tensors and
    embedding layers' weights (:func:`_peft_embedding_prefixes`; PEFT loads these into the base
    model too), every one checked to exist in the model with the same shape, and every tensor there of a saved
    module that the PEFT config's modules_to_save (``peft_saved``) selects or that the checkpoint holds tensors of
    (as ``<module>.<param>`` or by its wrapper name)."""
    saved = [n for n, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    embeddings = _peft_embedding_prefixes(inner)
    own = inner.state_dict(keep_vars=True)
    pairs, held = [], set()  # held: the saved modules the checkpoint holds tensors of
    for key, tensor in others.items():
        owner = next((n for n in saved if key.startswith(n + ".")), None)
        held.add(owner)
        if owner is None and not key.endswith("bias") and not key.startswith(embeddings):
            raise ValueError(f"{weights_path}: unsupported tensor in the PEFT checkpoint: {PEFT_PREFIX}{key} "
                             "(neither LoRA, a bias, a tensor of its modules_to_save, nor a weight of the model's "
                             "input / output embedding layer)")
        rest = key[len(owner) + 1:] if owner else key
        if owner and rest.startswith(("modules_to_save.", "original_module.")):
            # PEFT's bias="all" also saves the biases inside a saved module's wrapper, by their wrapper names: the
            # original's (PEFT loads it into the original) and the trained copy's, which <module>.<param> holds too
            # (PEFT loads that one over it)
            if rest.startswith("modules_to_save.") and f"{owner}.{rest[len('modules_to_save.'):]}" in others:
                continue
            name = key
        else:
            name = f"{owner}.modules_to_save.{rest}" if owner else key
        if name not in own:
            raise ValueError(f"{weights_path}: {PEFT_PREFIX}{key} does not fit the model (no tensor {name})")
        if own[name].shape != tensor.shape:
            raise ValueError(f"{weights_path}: {PEFT_PREFIX}{key} does not fit the model: {key} has shape "
                             f"{tuple(tensor.shape)}, the model's has shape {tuple(own[name].shape)}")
        _check_dtype_kind(f"{weights_path}: {PEFT_PREFIX}{key} does not fit the model: {key}", tensor, own[name])
        pairs.append((own[name], tensor, key))
    # PEFT saves the modules of its modules_to_save whole: one of them (or a module the checkpoint holds tensors
    # of) without a tensor would keep the original's silently; the model's own saved modules need none
    listed = _peft_modules_to_save(peft_saved, inner)
    listed = listed if isinstance(listed, list) else []
    for owner in (n for n in saved if n in held or n in listed):
        missing = [f"{PEFT_PREFIX}{owner}.{k}" for k in inner.get_submodule(owner).modules_to_save.state_dict()
                   if f"{owner}.{k}" not in others and f"{owner}.modules_to_save.{k}" not in others]
        if missing:
            raise ValueError(f"{weights_path}: the PEFT checkpoint lacks {missing} of {owner}, a module of its "
                             "modules_to_save (which PEFT saves whole): the trained copy would keep the original's "
                             "tensors")
    return pairs


def _peft_modules_to_save(saved, model: Optional[nn.Module]):
    """The names of the modules of ``model`` that PEFT's ``modules_to_save`` list ``saved`` selects: PEFT saves
    every module whose name ends with one of them as a string (DistilBERT's ``pre_classifier`` for
    ``classifier``), where moelora's list takes whole dotted parts; ``saved`` as it is without a model, or when it
    selects nothing there (the config then names it)."""
    if model is None or not isinstance(saved, list) or not all(isinstance(k, str) for k in saved):
        return saved
    return [n for n, _ in model.named_modules() if n and any(n.endswith(k) for k in saved)] or saved


def peft_as_config(peft_config: dict, modules: dict, directory: str,
                   model: Optional[nn.Module] = None) -> MoELoRAConfig:
    """The MoELoRAConfig of a fresh model that takes a PEFT LoRA checkpoint (its config and
    its LoRA tensors by module, from :func:`read_peft_checkpoint`) as its only expert (its
    checks are those of the PEFT config's fields, whatever the model it loads into): the
    checkpoint's modules as exact targets, their ranks and alphas, and the PEFT config's
    lora_dropout, use_rslora, use_dora, bias, modules_to_save, task_type and base_model_name_or_path (PEFT's
    defaults where it has none). The PEFT fields that choose targets or initial weights do not
    apply: the targets and the weights come from the checkpoint (:func:`read_peft_checkpoint`
    refused the settings moelora cannot reproduce), whose ranks must be those PEFT's r and rank_pattern give. With
    the ``model`` it is for, its modules_to_save are the
    modules PEFT's list selects there (:func:`_peft_modules_to_save`)."""
    ranks = {n: t["lora_A"].shape[0] for n, t in modules.items()}
    target_modules, keys = exact_module_patterns(modules)
    try:  # PEFT's lora_alpha and alpha_pattern: the layers read them as PEFT's (pattern_value)
        # PEFT's r and rank_pattern (checked as a MoELoRAConfig's) give each module the rank its tensors must have
        peft_ranks = MoELoRAConfig(r=peft_config.get("r", 8), rank_pattern=peft_config.get("rank_pattern") or {})
        for name, rank in sorted(ranks.items()):
            expected = pattern_value(name, peft_ranks.rank_pattern, peft_ranks.r)
            if rank != expected:  # PEFT's load refuses it too; which scaling (alpha / rank) was meant is unknown
                raise ValueError(f"r={peft_ranks.r} and rank_pattern={peft_ranks.rank_pattern} give {name} rank "
                                 f"{expected}, its LoRA tensors in the checkpoint have rank {rank}")
        return MoELoRAConfig(
            r=next(iter(ranks.values())), lora_alpha=peft_config.get("lora_alpha", 8),
            lora_dropout=peft_config.get("lora_dropout", 0.0),
            target_modules=target_modules, num_experts=1, top_k=1,
            use_rslora=peft_config.get("use_rslora", False), use_dora=peft_config.get("use_dora", False),
            rank_pattern={keys[n]: r for n, r in ranks.items()},
            alpha_pattern=peft_config.get("alpha_pattern") or {}, bias=peft_config.get("bias", "none"),
            modules_to_save=_peft_modules_to_save(peft_config.get("modules_to_save"), model),
            task_type=peft_config.get("task_type"),
            base_model_name_or_path=peft_config.get("base_model_name_or_path"))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{os.path.join(directory, PEFT_CONFIG_NAME)}: {exc}") from None


def _peft_scaling(peft_config: dict, name: str, rank: int) -> float:
    """The scaling PEFT gives module ``name``'s LoRA of rank ``rank``."""
    alpha = pattern_value(name, peft_config.get("alpha_pattern"), peft_config.get("lora_alpha", 8))
    return alpha / (math.sqrt(rank) if peft_config.get("use_rslora", False) else rank)


def check_peft_checkpoint(peft_config: dict, inner: nn.Module, modules: dict, others: dict, target: int,
                          weights_path: str):
    """(layers by name, extras) of a PEFT checkpoint checked against ``inner`` (the injected model):
    every LoRA tensor fits expert ``target`` of its layer (whose scaling can take the checkpoint's),
    every bias / saved-module tensor fits."""
    adapter_tensors = ((f"{name}.{n}", t) for name, layer in inner.named_modules() if is_adapter_layer(layer)
                       for n, t in itertools.chain(layer.named_parameters(), layer.named_buffers())
                       if not n.startswith("base_layer."))
    _refuse_meta(weights_path, adapter_tensors)
    layers = {}
    for name, tensors in modules.items():
        try:
            layers[name] = inner.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{weights_path}: the model has no module {name}") from None
        _check_peft_fits(name, tensors, layers[name], target, weights_path)
        peft_scaling = _peft_scaling(peft_config, name, tensors["lora_A"].shape[0])
        if layers[name].scaling == 0 and peft_scaling != 0:  # B would have to be infinite
            raise ValueError(f"{weights_path}: {name}: the layer's scaling is 0 (lora_alpha="
                             f"{layers[name].lora_alpha}), it cannot compute the checkpoint's LoRA (scaling "
                             f"{peft_scaling})")
    for name, layer in inner.named_modules():
        if is_adapter_layer(layer) and name not in layers and layer.router_mode == "task" and \
                0 <= target < layer.num_experts and _task_delta_nonzero(layer, target):
            raise ValueError(f"{weights_path}: the checkpoint has no LoRA for {name}, whose task {target} adds a "
                             f"non-zero delta (its expert {target} with gate lora_gamma[{target}] != 0, or the "
                             f"task-shared LoRA), so task {target} would not compute the PEFT LoRA; load it into a "
                             "model whose task-routed layers outside the checkpoint are zero for that task (as "
                             f"injected: lora_gamma[{target}] starts at 0)")
    extras = _peft_extras_targets(inner, others, weights_path, peft_config.get("modules_to_save"))
    _refuse_meta(weights_path, ((key, own) for own, _, key in extras))
    if any(is_adapter_layer(m) and m.num_experts > 1 for m in inner.modules()):
        changed = next((key for own, tensor, key in extras
                        if not torch.equal(own, tensor.to(device=own.device, dtype=own.dtype))), None)
        if changed is not None:  # every expert computes with it
            raise ValueError(f"{weights_path}: {PEFT_PREFIX}{changed} differs from the model's tensor, which every "
                             f"expert and task uses (a bias, a saved module's or an embedding's base weight): loading "
                             f"it for expert {target} would change the model's other experts; load the checkpoint "
                             "into a fresh model, or leave that tensor out of it")
    return layers, extras


def _refuse_meta(weights_path: str, tensors) -> None:
    """NotImplementedError naming the first of ``tensors`` ((name, model tensor) pairs that a PEFT load reads or
    writes) that is on the meta device: a copy into it would be a no-op, losing the checkpoint's values silently."""
    on_meta = next((name for name, tensor in tensors if tensor.is_meta), None)
    if on_meta is not None:
        raise NotImplementedError(
            f"{weights_path}: the model's {on_meta} is on the meta device (a model built with accelerate's "
            "init_empty_weights, or offloaded), which holds no values to load the PEFT LoRA into: load the base "
            "model's weights first, then load_peft_lora (moelora.from_pretrained takes a model on meta)")


def _task_delta_nonzero(layer: nn.Module, task: int) -> bool:
    """Whether task ``task`` of the task-routed ``layer`` adds anything: its expert (gated by
    ``lora_gamma[task]``) or the task-shared LoRA."""
    expert = bool(layer.lora_gamma[task] != 0) and bool(layer.lora_B[task].any()) and bool(layer.expert_A(task).any())
    shared = layer.task_shared_lora and bool(layer.lora_B[-1].any()) and bool(layer.expert_A(layer.num_experts).any())
    return expert or shared


@torch.no_grad()
def copy_peft_checkpoint(peft_config: dict, modules: dict, layers: dict, extras: list, target: int) -> None:
    """Copy the checked tensors (:func:`check_peft_checkpoint`) into expert ``target``; the layers
    keep their scaling, any difference to the checkpoint's is folded into B. A task-routed
    layer's ``lora_gamma[target]`` is set to 1 (the gate of task ``target``; B holds any gamma
    :func:`export_peft_lora` folded in), so that task computes the PEFT LoRA."""
    for name, tensors in modules.items():
        layer, a, b = layers[name], tensors["lora_A"].flatten(1), tensors["lora_B"].flatten(1)  # conv kernels flat
        peft_scaling = _peft_scaling(peft_config, name, a.shape[0])
        if layer.share_lora_a:
            layer.lora_A.copy_(a)
        else:
            layer.lora_A[target].copy_(a)
        layer.lora_B[target].copy_(b if peft_scaling == layer.scaling else b * (peft_scaling / layer.scaling))
        if layer.router_mode == "task":
            layer.lora_gamma[target] = 1.0
        if "lora_magnitude_vector" in tensors:
            layer.lora_magnitude_vector.copy_(tensors["lora_magnitude_vector"])
    for own, tensor, _ in extras:
        own.copy_(tensor)
