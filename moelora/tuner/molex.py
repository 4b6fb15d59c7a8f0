"""``apply_molex``: turns a model's layer stack into MoLEx (moelora.modules.molex), and
finds that stack (``find_layer_stack``)."""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch.nn as nn

from moelora.tuner.adapters import held_modules
from moelora.tuner.structure import forget, record, structural_edit
from moelora.tuner.targets import DEFAULT_LAYERS_PATTERN, unwrap
from moelora.modules.fields import check_field
from moelora.modules.molex import MOLEX_ARG_KINDS, HeldWeakly, MoLEx


def find_layer_stack(model: nn.Module, layers: Union[str, nn.ModuleList, None] = None) -> nn.ModuleList:
    """The layer stack ``layers`` names (a dotted name or the ModuleList itself), or else the one
    ModuleList of ``model`` named as a stack (``DEFAULT_LAYERS_PATTERN``: ``layers``, ``h``,
    ``block``, ...) that is not inside another (a layer's sublayers, as T5's ``block.i.layer``).
    A model with several (an encoder-decoder's ``encoder.block`` and ``decoder.block``, a vision
    tower beside a language model) raises, naming them: ``layers`` chooses. A ``layers`` of another
    type raises TypeError."""
    if isinstance(layers, nn.ModuleList):
        if not any(m is layers for m in model.modules()):
            raise ValueError("layers is an nn.ModuleList that the model does not hold: pass the model's own stack "
                             "(or its dotted name)")
        return layers
    if isinstance(layers, str):
        try:
            stack = model.get_submodule(layers)
        except AttributeError:
            lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
            outer = [n for n in lists if not any(n.startswith(f"{other}.") for other in lists)]
            raise ValueError(f"layers={layers!r} names no module of the model; its module lists are {outer}") from None
        if not isinstance(stack, nn.ModuleList):
            raise ValueError(f"layers={layers!r} is a {type(stack).__name__}, not an nn.ModuleList of layers")
        return stack
    if layers is not None:  # else silently ignored: the stack found below mixed instead
        raise TypeError("layers must be a dotted name (str), one of the model's nn.ModuleLists or None (the one stack "
                        f"it has), got {type(layers).__name__} {layers!r}")
    named = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and n.split(".")[-1] in DEFAULT_LAYERS_PATTERN and len(m) > 1]
    # a stack inside another's layers is a layer's sublayers (T5's block.i.layer: attention, FFN), not the stack
    stacks = [m for n, m in named if not any(n.startswith(f"{outer}.") for outer, _ in named)]
    if not stacks:
        raise ValueError("no layer stack found; pass layers='dotted.name.of.the.ModuleList'")
    if len(stacks) > 1:
        names = [n for n, m in named if any(m is s for s in stacks)]
        raise ValueError(f"the model has several layer stacks ({', '.join(names)}) and MoLEx mixes the layers of one: "
                         "pass " + " or ".join(f"layers={n!r}" for n in names))
    return stacks[0]


@structural_edit
def apply_molex(model: nn.Module, layers: Union[str, nn.ModuleList, None] = None, hidden_size: Optional[int] = None,
                **kwargs) -> MoLEx:
    """Turn the layer stack of ``model`` into MoLEx; returns the MoLEx module (``model.molex``),
    whose :meth:`~MoLEx.remove` undoes this call.

    kwargs: gate, shared_gate, proj_dim, alpha, learn_alpha, batch_routing, aux_loss_coef,
    temperature, bias, layer_selection (see :class:`MoLEx` and the module docstring). Every
    argument is checked before the model is changed; ``hidden_size`` (default: the config's
    ``hidden_size`` or ``n_embd``) must be the width of the layers' hidden states: it is compared
    with the layers' own ``hidden_size`` where they declare one, else at the first forward.
    ``layers`` names the stack (see :func:`find_layer_stack`): needed where the model has
    several, as an encoder-decoder's encoder and decoder stacks. The padding of the
    ``attention_mask`` the model (or a module between it and the stack) takes routes nothing
    (:meth:`MoLEx.track_attention_mask`).
    """
    target = unwrap(model)
    if hasattr(target, "molex"):
        raise ValueError("MoLEx is already applied to this model")
    stack = find_layer_stack(target, layers)
    if hidden_size is None:
        cfg = getattr(target, "config", None)
        hidden_size = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
        if hidden_size is None:
            raise ValueError("pass hidden_size= (the width of the layers' hidden states)")
    check_field("hidden_size", hidden_size, MOLEX_ARG_KINDS["hidden_size"])
    width = getattr(stack[0], "hidden_size", None)  # transformers' decoder layers declare it (LLaMA, Mistral, ...)
    if isinstance(width, int) and not isinstance(width, bool) and hidden_size != width:
        raise ValueError(f"hidden_size={hidden_size!r} does not match the model's width: its layers take hidden "
                         f"states of width {width} (pass hidden_size={width} or leave it out)")
    stack_name = next(n for n, m in target.named_modules() if m is stack)
    held = held_modules(model)  # the adapters of a MoELoRAModel (stored ones too), given it or the model it wraps
    for i in range(len(stack)):
        layer = f"{stack_name}.{i}" if stack_name else str(i)
        holder = next((n for n in held if n == layer or layer.startswith(f"{n}.")), None)
        if holder is not None:
            raise ValueError(f"{holder}: adapter {held[holder]!r} holds it (saved whole by modules_to_save, or "
                             f"adapted), so MoLEx cannot mix the layer {layer}: its hook would sit on one of the "
                             "modules that adapter swaps in and out, and from_pretrained (which applies MoLEx first) "
                             "would build another model; leave the layers out of that adapter's modules_to_save (or "
                             "delete it)")
    molex = MoLEx(stack, hidden_size, **kwargs).train(stack.training)  # in the model's mode, as every module added
    # the padding of the attention mask the model or a module on the way to the stack takes routes nothing
    parts = stack_name.split(".")
    molex.track_attention_mask(target.get_submodule(".".join(parts[:i])) for i in range(len(parts)))
    parent = target.get_submodule(".".join(parts[:-1]))
    molex.track_stack_forward(parent)  # a forward that skips layers (LayerDrop) keeps no record of the last one's
    first = next(stack.parameters(), None)
    if first is not None:
        molex.to(first.device)  # the gates live where the layers do (fp32 whatever the model's dtype)
    target.add_module("molex", molex)
    if isinstance(parent, nn.TransformerEncoder) and parent.use_nested_tensor:
        # its eval-mode fast path turns a padded batch into a nested tensor, which the mixing cannot take
        parent.use_nested_tensor = False
        molex._on_remove.append(functools.partial(_nested_tensors_again, HeldWeakly(parent)))
    generation = getattr(target, "generation_config", None)
    config = getattr(target, "config", None)
    decodes = not getattr(config, "is_encoder_decoder", False) or "decoder" in stack_name.split(".")
    if decodes and hasattr(generation, "use_cache") and generation.use_cache is not False:
        # decoding from a KV cache cannot mix (layer j would need keys of the past tokens it never computed):
        # generate() recomputes the whole sequence each step unless given use_cache=True, which raises
        previous, generation.use_cache = generation.use_cache, False
        molex._on_remove.append(functools.partial(_generation_cache_again, generation, previous))
    kwargs.setdefault("bias", None)  # recorded explicitly: records without it predate the gate's bias
    entry = record(target, "apply_molex", dict(layers=stack_name, hidden_size=hidden_size, **kwargs))
    # a partial of a module-level function, not a closure: a deepcopy of the model undoes on its own copy
    molex._on_remove.append(functools.partial(_unapply_molex, HeldWeakly(target), entry))
    return molex


def _generation_cache_again(generation, previous, molex: MoLEx) -> None:
    """apply_molex's undo of ``generation_config.use_cache = False`` (at :meth:`MoLEx.remove`)."""
    generation.use_cache = previous


def _nested_tensors_again(encoder: HeldWeakly, molex: MoLEx) -> None:
    """apply_molex's undo of ``encoder.use_nested_tensor = False`` (at :meth:`MoLEx.remove`)."""
    if encoder() is not None:
        encoder().use_nested_tensor = True


def _unapply_molex(target: HeldWeakly, entry, molex: MoLEx) -> None:
    """apply_molex's share of :meth:`MoLEx.remove`: take ``molex`` off ``target`` and drop the
    structural record (``entry``), so checkpoints saved afterwards do not replay apply_molex."""
    target = target()
    if target is None:
        return
    if target._modules.get("molex") is molex:
        delattr(target, "molex")
    forget(target, entry)
