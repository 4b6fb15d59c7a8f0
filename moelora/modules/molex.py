"""MoLEx: mixture of layer experts.

Each layer t of a residual stack is mixed with one other layer j chosen by a gate:

    z_{t+1} = z_t + a * u_t(z_t) + (1 - a) * u_j(z_t),     u_l(z) = layer_l(z) - z

- gate (one shared by all layers, or one per layer) over the L layers, the own layer masked:
  "linear" (logits = W z + b, as the paper's ``nn.Linear(hidden, L)``: with Llama-3.2-1B's
  16 layers of width 2048 and one shared gate, 32,784 parameters), "cosine"
  (cos(P z, e_l) / temperature, P a projection to ``proj_dim``, bias-free by default),
  "cosine_sigmoid" (the same, gate value sigmoid(cos / temperature)); ``bias`` overrides;
- top-1 per token, then one j per batch: the mode of the token choices ("mode") or the
  argmax of the mean gate probabilities ("mean"), kept on the device; only the real tokens
  vote (padding aside, see below), and as j is one per batch, a sequence's output depends on
  the other sequences of its batch (batched generation differs from each prompt alone) and on the
  later tokens of its own: the stack of a causal LM is not causal (a forward's logits at position i
  differ from the last ones of the forward over the first i + 1 tokens where j differs);
- ``a`` fixed (e.g. 0.95) or learned (a = sigmoid(theta));
- the gate learns through a straight-through factor g[t,j] / stopgrad(g[t,j]) (= 1 in the
  forward; computed from log g, so finite where g underflows) on the u_j term, and a Switch
  load-balancing loss over the token choices.

Padding: the tokens the model's 2-D ``attention_mask`` ([batch, sequence], 0 for padding, as
transformers' tokenizers and generate build it) marks as padding take no part in the layer
choice, the load-balancing loss or the statistics, so a padded batch gives its real tokens
what the same batch gives with any other amount of padding. :meth:`MoLEx.track_attention_mask`
(which apply_molex calls on the modules between the model and the stack) reads the mask from
those modules' forward arguments (by keyword or position); the innermost one that took a 2-D
mask or None decides (BERT's encoder, which takes the 4-D mask its model built, defers to the
model). A model given a 4-D mask ([batch, heads, query, key]: bool, True attends; float, additive, 0
attends) in place of the 2-D one: its real tokens are the keys some query attends. Without a mask
every token is real (a padding-free packed row, as transformers' DataCollatorWithFlattening makes:
its sequences are real tokens, and share the row's one j as a padded batch's sequences share
theirs). A gradient checkpoint around a layer's call recomputes it in backward, after those
modules' forward: it takes the real tokens the forward found for that layer's input
(:meth:`MoLEx._real_tokens`), so it chooses the forward's j.

Running u_j without reading j on the host (``layer_selection="device"``): the parameters and
buffers of the L layers are stacked once per forward and layer t's own code runs with layer
j's slice (``torch.func.functional_call``), so no host sync, and torch.compile(fullgraph=True)
and CUDA-graph capture work. The price: one copy of the stack's parameters per forward, plus
the gathered slice of each mixing call kept for backward. That is exact only where the
layers differ in nothing but their tensors' values, and where they are not
gradient-checkpointed (a checkpointed layer's recomputation in backward would run layer t's
own tensors, not layer j's). ``layer_selection="host"`` calls ``layers[j]`` itself (no
copies, one host read per layer). ``"auto"`` (the default) picks device where the layers
are alike (:func:`_layer_signature`): the same submodules with the same parameter and
buffer names, shapes and dtypes, and the same non-tensor attributes (train/eval mode, a
MoE-LoRA layer's scaling, top-k, router mode and schedule, dropout probabilities, a window
size, ...; ``layer_idx``, the layer's KV-cache slot, which the mixing calls do not use, and
``gradient_checkpointing`` aside), and where they are not checkpointed in this forward
(:func:`_checkpointed`: transformers' ``gradient_checkpointing`` flag, in training mode with
gradients enabled); otherwise host (e.g. MoLA's per-layer expert counts, a per-layer
``alpha_pattern``, alternating sliding-window layers, gradient checkpointing in training).
``"device"`` raises where they differ or are checkpointed. Whether the layers are alike is
read in eager mode (at apply_molex and in every eager forward); a compiled graph uses the last
eager reading (dynamo, in torch 2.11, cannot trace a module's ``__dict__``): after changing a
layer's attributes (its scaling, merging it, ...) run one eager forward before the compiled
model, which then compiles again; else it would run one layer's code with another's tensors.

FSDP2: shard the stack as one unit (``fully_shard`` on the model), not layer by layer
(:func:`_refuse_sharded_layers` raises there: each rank runs the layer j its own batch chose).

Applied with forward hooks on the existing layers (module names and state dicts of the base
model are unchanged), and a forward pre-hook on the module holding the stack that starts each
forward's record (:meth:`MoLEx.track_stack_forward`: a forward that skips layers, as LayerDrop
does, records its own layers only); the gates live in ``model.molex``. :meth:`MoLEx.remove` undoes
apply_molex: hooks, ``model.molex``, its routing record and the checkpoint's record of it.
The aux losses and router statistics of MoE-LoRA layers inside the stack are those of each
layer's own call. KV caches: the mixing call runs without the cache (layer j would otherwise
write into its own slot): any argument that is a transformers ``Cache``, by keyword or
positional (GPT-2's blocks take it positionally), and any keyword of ``CACHE_KWARGS``, is
passed as None. That is exact for a forward over whole sequences (training, evaluation,
prefill, into a static cache too: a 4-D attention mask, or flex attention's BlockMask, built over the
cache's slots is cut to the forward's tokens, its first columns; T5's decoder, whose position biases span the
static cache's slots, raises a shape error there) with the model's default
``use_cache``; decoding from a cache that already holds tokens raises (the mixing layer would need keys it
never computed: generate with ``use_cache=False``, which apply_molex makes the generation default of the
model it mixes). The mixing call gives layer j layer t's arguments, its attention mask among them (with alternating
sliding-window and full-attention layers, layer j runs with layer t's mask).
The hidden states and attention maps transformers (>= 5) records with
hooks (``output_hidden_states``, ``output_attentions``) are those of the layers' own calls, the
mixed outputs among them: the mixing hook runs first among a layer's forward hooks, and what the
mixing call recorded is dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import sys
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelora.modules.fields import BOOL, LAYER_FIELD_KINDS, POSITIVE_INT, check_field, is_bool, is_int, is_real
from moelora.modules.init import reset_like_linear
from moelora.kernels.launchers import cdiv
from moelora.ops.backend import without_autocast
from moelora.ops.validation import is_finite_number
from moelora.modules.routed import (RoutedModule, real_tokens_of_attention_mask, recomputing_in_backward,
                                    restore_routing_records, routing_records, torchscript_refusal)
from moelora.ops.losses import balancing_loss, expert_load, routing_entropy


GATE_TYPES = ("linear", "cosine", "cosine_sigmoid")


BATCH_ROUTING = ("mode", "mean")


LAYER_SELECTION = ("auto", "device", "host")


# Module attributes _layer_signature leaves out (see there).
SIGNATURE_EXEMPT = ("layer_idx", "gradient_checkpointing")


CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


# The checks of MoLEx's and LayerGate's arguments (moelora.modules.fields.check_field; aux_loss_coef
# as the layers' router_aux_loss_coef); proj_dim and bias may also be None (their defaults).
MOLEX_ARG_KINDS = {
    "hidden_size": POSITIVE_INT,
    "num_layers": POSITIVE_INT,
    "shared_gate": BOOL,
    "proj_dim": (is_int, lambda v: v >= 1, "a positive int or None (hidden_size)"),
    "alpha": (is_real, lambda v: is_finite_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "learn_alpha": BOOL,
    "aux_loss_coef": LAYER_FIELD_KINDS["router_aux_loss_coef"],
    "temperature": (is_real, lambda v: is_finite_number(v) and v > 0, "a finite number > 0"),
    "bias": (is_bool, None, "a bool or None (the gate's default)"),
}


def _check_args(**values) -> None:
    for name, value in values.items():
        if not (value is None and name in ("proj_dim", "bias")):
            check_field(name, value, MOLEX_ARG_KINDS[name])


def _check_choice(name: str, value, choices: tuple) -> None:
    """TypeError for a ``value`` that is not a str, ValueError for a str not among ``choices``; both name ``name``."""
    check_field(name, value, (lambda v: isinstance(v, str), lambda v: v in choices, f"one of {choices}"))


class HeldWeakly:
    """A module held weakly (call it: the module, or None once it is freed), for what MoLEx keeps of the model it
    mixes (its layer stack; apply_molex's undo: the model): the hooks on the model's modules hold the MoLEx, so a
    strong reference would make every such model a reference cycle, whose memory (GPU memory included) ``del
    model`` leaves for the garbage collector's next full pass. Copies (``copy.deepcopy``, pickling) of a model hold
    its copy of the module, as a strong reference would."""

    __slots__ = ("_ref",)

    def __init__(self, module: nn.Module):
        self._ref = weakref.ref(module)

    def __call__(self) -> Optional[nn.Module]:
        return self._ref()

    def __deepcopy__(self, memo):
        module = self._ref()
        return HeldWeakly(copy.deepcopy(module, memo)) if module is not None else self

    def __reduce__(self):
        return HeldWeakly, (self._ref(),)


class LayerGate(nn.Module):
    """Scores of the L layers for each token: returns (logits [T, L], gate values [T, L]). Its
    parameters are fp32 whatever the default dtype (``torch.set_default_dtype``)."""

    def __init__(self, hidden_size: int, num_layers: int, gate: str = "linear", proj_dim: Optional[int] = None,
                 temperature: float = 0.07, bias: Optional[bool] = None):
        super().__init__()
        _check_choice("gate", gate, GATE_TYPES)
        _check_args(hidden_size=hidden_size, num_layers=num_layers, proj_dim=proj_dim, temperature=temperature,
                    bias=bias)
        self.gate, self.hidden_size = gate, hidden_size
        if bias is None:
            bias = gate == "linear"  # the paper's linear gate is nn.Linear(hidden, L) with its bias
        if gate == "linear":  # the paper's nn.Linear(hidden, L), with nn.Linear's init
            self.weight = nn.Parameter(torch.empty(num_layers, hidden_size, dtype=torch.float32))
            self.bias = nn.Parameter(torch.empty(num_layers, dtype=torch.float32)) if bias else None
        else:
            proj_dim = hidden_size if proj_dim is None else proj_dim
            self.proj = nn.Linear(hidden_size, proj_dim, bias=bias, dtype=torch.float32)
            self.layer_embeddings = nn.Parameter(torch.empty(num_layers, proj_dim, dtype=torch.float32))
            self.temperature = temperature
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the gate's own parameters as its constructor does: the linear gate's weight and
        bias as nn.Linear's, the cosine gates' layer embeddings N(0, 1). The cosine gates'
        projection ``proj`` is a child nn.Linear with its own ``reset_parameters``."""
        if self.gate == "linear":
            reset_like_linear(self.weight, self.bias)
        else:
            nn.init.normal_(self.layer_embeddings)

    def __prepare_scriptable__(self):
        """torch.jit.script's hook: refused, naming torch.export (:func:`torchscript_refusal`)."""
        raise torchscript_refusal("MoLEx's layer gate", "torch.jit.script")

    def _slow_forward(self, *args, **kwargs):
        """nn.Module.__call__'s forward under torch.jit.trace: refused (the gate's choice of a layer is a
        value that selects the layer MoLEx runs, which a trace would freeze)."""
        raise torchscript_refusal("MoLEx's layer gate", "torch.jit.trace")

    def forward(self, z: torch.Tensor, exclude: int):
        if z.shape[-1] != self.hidden_size:
            raise ValueError(f"MoLEx was applied with hidden_size={self.hidden_size}, but the model's hidden states "
                             f"are {z.shape[-1]} wide: apply it with hidden_size={z.shape[-1]}")
        z = z.reshape(-1, z.shape[-1]).float()
        with without_autocast(z):  # fp32 logits under torch.autocast too
            if self.gate == "linear":
                logits = F.linear(z, self.weight.float(), None if self.bias is None else self.bias.float())
            else:
                proj_bias = None if self.proj.bias is None else self.proj.bias.float()
                logits = F.linear(F.normalize(F.linear(z, self.proj.weight.float(), proj_bias), dim=-1),
                                  F.normalize(self.layer_embeddings.float(), dim=-1)) / self.temperature
        # built on the device (an indexed assignment would copy a host scalar: not capturable)
        mask = torch.arange(logits.shape[-1], device=logits.device) == exclude
        logits = logits.masked_fill(mask, float("-inf"))
        values = torch.sigmoid(logits) if self.gate == "cosine_sigmoid" else torch.softmax(logits, dim=-1)
        return logits, values


def mixed_by_molex(module: nn.Module) -> bool:
    """Whether ``module`` is a layer of a MoLEx stack (carries its mixing hook)."""
    return any(isinstance(hook, functools.partial) and getattr(hook.func, "__func__", None) is MoLEx._mix
               for hook in module._forward_hooks.values())


class MoLEx(nn.Module, RoutedModule):
    """Gates, mixing coefficient and losses of MoLEx over one layer stack (see module docstring).

    Args:
        layers: the model's nn.ModuleList of L >= 2 distinct layers (:func:`moelora.apply_molex` finds it).
        hidden_size: the width of the layers' hidden states (an int >= 1).
        gate: "linear" (default), "cosine" or "cosine_sigmoid"; ``shared_gate`` (default True): one gate
            for all layers, else one per layer; ``proj_dim``: the cosine gates' projection width (an int
            >= 1; None: hidden_size); ``temperature`` (> 0, finite): the cosine gates' divisor; ``bias``:
            whether the gate has a bias (None: the linear gate has one, the cosine gates none).
        alpha: the mixing coefficient a in [0, 1] (default 0.95); ``learn_alpha``: learn it, as
            a = sigmoid(theta) started at ``alpha``.
        batch_routing: how the batch's one layer j is chosen: "mode" (default) or "mean".
        aux_loss_coef: the weight of the load-balancing loss (a finite number >= 0).
        layer_selection: "auto" (default), "device" or "host": how layer j runs (module docstring).
    """

    moelora_owned = True  # trained and saved whole (moelora.modules.adapter_base.owned_by_moelora)
    takes_aux_loss_mask = False  # its padding mask comes from the attention_mask (track_attention_mask)

    def __init__(self, layers: nn.ModuleList, hidden_size: int, gate: str = "linear", shared_gate: bool = True,
                 proj_dim: Optional[int] = None, alpha: float = 0.95, learn_alpha: bool = False,
                 batch_routing: str = "mode", aux_loss_coef: float = 0.01, temperature: float = 0.07,
                 bias: Optional[bool] = None, layer_selection: str = "auto"):
        super().__init__()
        if not isinstance(layers, nn.ModuleList):  # a str or a list of modules got far: len, then hooks on its items
            raise TypeError(f"layers must be the model's nn.ModuleList of layers, got {type(layers).__name__}")
        num_layers = len(layers)
        if num_layers < 2:
            raise ValueError("MoLEx needs a stack of at least 2 layers")
        first = {}
        for t, layer in enumerate(layers):
            if first.setdefault(id(layer), t) != t:  # its hooks would mix each call once per position
                raise ValueError(f"MoLEx mixes distinct layers, but layers {first[id(layer)]} and {t} are the same "
                                 "module (a weight-shared stack)")
        _check_choice("batch_routing", batch_routing, BATCH_ROUTING)
        _check_args(hidden_size=hidden_size, shared_gate=shared_gate, alpha=alpha, learn_alpha=learn_alpha,
                    aux_loss_coef=aux_loss_coef)
        _check_choice("layer_selection", layer_selection, LAYER_SELECTION)
        self.layer_selection = layer_selection
        # the stacked tensors of the forward under way (device selection), False while host selection runs
        self._stacked = None
        self._layers = HeldWeakly(layers)  # not registered: the stack belongs to the model
        self.num_layers, self.batch_routing, self.shared_gate = num_layers, batch_routing, shared_gate
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, 0.0
        make = lambda: LayerGate(hidden_size, num_layers, gate, proj_dim, temperature, bias)  # noqa: E731
        self.gates = nn.ModuleList([make()] if shared_gate else [make() for _ in range(num_layers)])
        self.initial_alpha = float(alpha)
        if learn_alpha:
            self.alpha_logit = nn.Parameter(torch.empty((), dtype=torch.float32))
        else:
            self.register_buffer("alpha_value", torch.empty((), dtype=torch.float32))
        self.reset_parameters()
        self._calling_other = False
        # where each layer's forward takes attention_mask positionally (GPT-2's blocks), for _mask_for_own_keys
        self._mask_positions = tuple(_attention_mask_argument(layer)[1] for layer in layers)
        self._alike = _layers_alike(layers)  # whether the layers are alike (_device_selection), eager reading
        self._masks = []  # (module, mask, decides) of the tracked modules whose forward is under way (innermost last)
        self._recompute_real = _ForwardMasks()  # the real tokens of checkpointed layers' inputs (_real_tokens)
        self._on_remove = []  # callables(self) that remove() runs: apply_molex's undo (moelora.tuner.molex)
        # Bound methods (not closures): a deepcopy of the model copies the hooks onto its own MoLEx.
        # First among the layers' forward hooks: the others (transformers' output_hidden_states) see the mixed output.
        self._handles = [layer.register_forward_hook(functools.partial(self._mix, t), with_kwargs=True, prepend=True)
                         for t, layer in enumerate(layers)]
        self.clear_routing_record()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the mixing coefficient as the constructor does: a = ``alpha`` (learned: its
        logit, alpha clamped to [1e-4, 1 - 1e-4]). The gates are child modules with their own
        ``reset_parameters``."""
        if hasattr(self, "alpha_logit"):
            a = min(max(self.initial_alpha, 1e-4), 1 - 1e-4)
            self.alpha_logit.fill_(math.log(a / (1 - a)))
        else:
            self.alpha_value.fill_(self.initial_alpha)

    @property
    def alpha(self) -> torch.Tensor:
        """The mixing coefficient a: sigmoid of its logit when learned (``learn_alpha``), else the fixed value."""
        return torch.sigmoid(self.alpha_logit) if hasattr(self, "alpha_logit") else self.alpha_value

    def clear_routing_record(self) -> None:
        """Forget the last forward's record, and the stacked layers a forward that raised before its
        last layer left (device selection): copies (deepcopy refuses their autograd graph) and the
        wrapper's next forward start without them."""
        super().clear_routing_record()
        self._per_layer = {}
        self._stacked = None

    def choose(self, z: torch.Tensor, t: int, real: Optional[torch.Tensor] = None):
        """(j as a 0-d device tensor, straight-through factor [T], logits, gate values, token
        choices) for layer t; only the tokens ``real`` ([T] bool, None: all) marks vote; nothing
        is read on the host."""
        gate = self.gates[0 if self.shared_gate else t]
        logits, values = gate(z, exclude=t)
        token_choice = values.argmax(dim=-1)
        if self.batch_routing == "mode":  # one-hot counts: a static shape (bincount's is data-dependent)
            votes = F.one_hot(token_choice, self.num_layers)
            score = (votes if real is None else votes * real[:, None]).sum(dim=0)
        else:  # the mean over the real tokens: their sum has the same argmax (padding: any value, NaN too)
            score = values.mean(dim=0) if real is None else torch.where(real[:, None], values, 0.0).sum(dim=0)
        # never the layer itself, even where no token is real (all scores 0)
        j = score.masked_fill(torch.arange(self.num_layers, device=score.device) == t, -1).argmax()
        # g / stopgrad(g) as exp(log g - stopgrad(log g)): 1 in the forward, gradient d log g, and finite
        # where g underflows to 0 (a token's logit for j ~104 below its best): 0 / 0 there gave NaN
        log_values = F.logsigmoid(logits) if gate.gate == "cosine_sigmoid" else torch.log_softmax(logits, dim=-1)
        log_g = log_values.index_select(1, j.reshape(1)).squeeze(1)
        return j, torch.exp(log_g - log_g.detach()), logits, values, token_choice

    def _mix(self, t: int, module, args, kwargs, output):
        """Forward hook of layer t: its output becomes z + a u_t(z) + (1 - a) u_j(z)."""
        if self._calling_other:
            return None
        z = args[0] if args else kwargs["hidden_states"]
        h_t = output[0] if isinstance(output, tuple) else output
        real = self._real_tokens(z, t)
        j, st, logits, values, token_choice = self.choose(z, t, real)
        other = self._call_layer(t, j, *_without_cache(args, kwargs, t, z, self._mask_positions[t]))
        h_j = other[0] if isinstance(other, tuple) else other
        alpha = self.alpha  # 1 - a taken in fp32: in bf16, 1 - bf16(0.99) is 0.0117 and 1 - bf16(0.999) is 0
        a, rest = alpha.to(z.dtype), (1 - alpha).to(z.dtype)
        mixed = z + a * (h_t - z) + rest * (h_j - z) * st.to(z.dtype).reshape(*z.shape[:-1], 1)
        self._record(t, j, logits, token_choice, real)
        return (mixed,) + tuple(output[1:]) if isinstance(output, tuple) else mixed

    def _record(self, t, j, logits, token_choice, real) -> None:
        """Layer t's load-balancing loss, load and routing entropy over the real tokens, and the
        record of the forward's layers so far (aux loss, router statistics). A checkpoint's recomputation in
        backward computes the loss (non-reentrant checkpointing counts the saved tensors) and keeps the forward's
        record, as RoutedModule's."""
        probs = torch.softmax(logits, dim=-1)
        choice = token_choice[:, None].detach()
        loss = self.aux_loss_coef * balancing_loss(probs, choice, self.num_layers, mask=real)
        if recomputing_in_backward():
            return
        grad = torch.is_grad_enabled()
        self._per_layer[t] = (loss if grad else loss.detach(), j, expert_load(choice, self.num_layers, mask=real),
                              routing_entropy(probs.detach(), mask=real), not grad and self.training)
        self._last_aux_loss = torch.stack([v[0] for v in self._per_layer.values()]).sum()
        self._aux_loss_lost_grad = any(v[4] for v in self._per_layer.values())
        self._last_router_stats = {
            "load": torch.stack([v[2] for v in self._per_layer.values()]).mean(0),
            "entropy": torch.stack([v[3] for v in self._per_layer.values()]).mean(),
            "chosen_layers": torch.stack([self._per_layer[k][1].detach() if k in self._per_layer
                                          else torch.full_like(j, -1) for k in range(self.num_layers)]),
        }

    def track_stack_forward(self, module: nn.Module) -> None:
        """Start each forward of ``module`` (the module whose forward runs the stack; apply_molex passes
        the stack's holder) with no record and no stacked layers: a forward that skips layers (LayerDrop,
        as Wav2Vec2's training forward) then records only its own layers (chosen_layers -1 for the others,
        its own aux loss) and stacks the layers' current tensors. :meth:`remove` detaches the hook."""
        self._handles.append(module.register_forward_pre_hook(self._begin))

    def _begin(self, module, args) -> None:
        """Forward pre-hook of the module running the stack: forget the last forward's record and stacked layers."""
        self.clear_routing_record()

    # ------------------------------------------------------------------ padding
    def track_attention_mask(self, modules) -> None:
        """Read the 2-D ``attention_mask`` ([batch, sequence], 0 for padding) from the forward
        arguments of ``modules`` (those between the model and the stack; apply_molex passes
        them): its padding then takes no part in the layer choice, the load-balancing loss or
        the statistics. Modules whose forward has no ``attention_mask`` argument are skipped;
        :meth:`remove` detaches the hooks."""
        for module in modules:
            takes, position = _attention_mask_argument(module)
            if not takes:
                continue
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._enter, position),
                                                                  with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._exit, always_call=True))

    def _enter(self, position, module, args, kwargs) -> None:
        """Forward pre-hook of a tracked module: note the mask it takes. A 2-D tensor or None
        (every token real) decides; a 4-D one ([batch, heads, query, key], built by an outer module
        or given to the model in place of the 2-D mask) decides where no module took a 2-D mask or
        None (the outermost one), by its real tokens, the keys some query attends
        (:func:`real_tokens_of_attention_mask`); anything else leaves it to the other modules."""
        if "attention_mask" in kwargs:
            mask = kwargs["attention_mask"]
        else:
            mask = args[position] if position is not None and len(args) > position else None
        decides = 2 if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2) else 0
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            decides = 1  # read (_real_tokens) only where no module took a 2-D mask or None: BERT's encoder's is not
        self._masks.append((module, mask, decides))

    def _exit(self, module, args, output) -> None:
        """Forward hook of a tracked module (run if its forward raises too): forget its mask."""
        if self._masks and self._masks[-1][0] is module:
            self._masks.pop()

    def _real_tokens(self, z: torch.Tensor, t: int) -> Optional[torch.Tensor]:
        """[B * T] bool, False for the padding of layer t's hidden states z [B, T, D]: the last T
        columns of the deciding mask (a model with a KV cache takes the cached tokens' columns
        too); None where every token is real. Outside the tracked modules' forward, the real
        tokens a training forward found for the same input of layer t (its storage and shape):
        a gradient checkpoint's recomputation in backward (torch.utils.checkpoint around the
        layer's call, transformers < 5) runs this hook again after the forward, and must choose
        the forward's j (else reentrant checkpoints give wrong gradients, non-reentrant ones a
        CheckpointError). The entry lives as long as the forward's z (the checkpoint keeps it)."""
        if not self._masks:
            if torch.compiler.is_compiling() or not self._recompute_real:
                return None
            return self._recompute_real.get((t, z.data_ptr(), tuple(z.shape)))
        # the innermost 2-D mask or None, else the outermost 4-D mask's real tokens (see _enter), found once: its
        # entry then holds them, as a 2-D mask, for the forward's other layers
        masks = self._masks
        i = next((i for i in range(len(masks) - 1, -1, -1) if masks[i][2] == 2), None)
        if i is None:
            i = next((i for i, (_, _, decides) in enumerate(masks) if decides == 1), None)
            if i is not None:
                masks[i] = (masks[i][0], real_tokens_of_attention_mask(masks[i][1]), 2)
        mask = None if i is None else masks[i][1]
        if mask is None:
            return None
        if z.dim() != 3 or mask.shape[0] != z.shape[0] or mask.shape[1] < z.shape[1]:
            raise ValueError(f"the attention_mask of shape {tuple(mask.shape)} does not cover the hidden states of "
                             f"shape {tuple(z.shape)} that MoLEx mixes: expected [batch, sequence] with their batch "
                             f"size and at least their sequence length")
        real = (mask[:, mask.shape[1] - z.shape[1]:] != 0).reshape(-1)
        if self.training and not torch.compiler.is_compiling():  # compiled checkpoints recompute in their graph
            key = (t, z.data_ptr(), tuple(z.shape))
            self._recompute_real[key] = real
            weakref.finalize(z, self._recompute_real.pop, key, None)
        return real

    # ------------------------------------------------------------------ running u_j(z_t)
    def _call_layer(self, t: int, j: torch.Tensor, args, kwargs):
        """Layer j on layer t's input (see the module docstring); the routing records of the
        layer whose code runs are those of its own call afterwards."""
        layers = self._layers()
        if t == 0 or self._stacked is None:  # decided once per forward
            self._stacked = None  # a forward that raised left its stack: freed before stacking again
            _refuse_sharded_layers(layers)
            self._stacked = _stack_layers(layers) if self._device_selection(layers) else False
        device = self._stacked is not False
        if not device and torch.compiler.is_exporting():  # int(j) below: a data-dependent index export cannot trace
            raise RuntimeError(
                "MoLEx selects the mixed layer on the host here (layer_selection='host', or 'auto' with layers that "
                "differ or are gradient-checkpointed), which torch.export cannot trace: the layer index is "
                "data-dependent. Export with layer_selection='device' (layers with the same tensor shapes and "
                "settings)")
        runner = layers[t] if device else layers[int(j)]  # "host": one host read
        records = [(m, r) for m, r in routing_records(runner) if not isinstance(m, MoLEx)]
        self._calling_other = True
        recorded = _recorded_outputs()  # the mixing call's hidden states and attention maps are not the model's
        sizes = [(outputs, len(outputs)) for outputs in recorded]
        try:
            if device:
                index = j.reshape(1)  # a tensor op, not an integer index (no host read, traceable)
                tensors = {name: stacked.index_select(0, index).squeeze(0) for name, stacked in self._stacked.items()}
                out = torch.func.functional_call(runner, tensors, args, kwargs, strict=True)
            else:
                out = runner(*args, **kwargs)
        finally:
            self._calling_other = False
            for outputs, size in sizes:
                del outputs[size:]
            restore_routing_records(records)
            if t == self.num_layers - 1:
                self._stacked = None  # not kept alive between forwards
        return out

    def _device_selection(self, layers: nn.ModuleList) -> bool:
        """Whether this forward runs device selection: "device", or "auto" with layers alike
        (:func:`_layer_signature`) and not gradient-checkpointed in this forward
        (:func:`_checkpointed`: the recomputation in backward would run layer t's own tensors,
        not layer j's slice); "device" raises for checkpointed layers and for layers that differ."""
        if self.layer_selection == "host":
            return False
        checkpointed = _checkpointed(layers)
        if not torch.compiler.is_compiling():  # a compiled graph uses the last eager reading (or apply's)
            self._alike = _layers_alike(layers)
        uniform = self._alike
        if self.layer_selection == "device":
            if checkpointed:
                raise ValueError("layer_selection='device' cannot run gradient-checkpointed layers (the recomputation "
                                 "in backward would use layer t's own parameters, not layer j's): use 'host' or "
                                 "'auto', or disable gradient checkpointing")
            if not uniform:
                raise ValueError("layer_selection='device' needs layers with the same parameter and buffer names and "
                                 "shapes and the same non-tensor attributes (e.g. MoLA's per-layer expert counts, or "
                                 "a per-layer alpha_pattern's scaling, differ): use 'host'")
        return uniform and not checkpointed

    def remove(self) -> None:
        """Undo apply_molex: detach the hooks (the model computes its plain stack again), forget
        the routing record (``moelora.aux_loss`` and ``router_stats`` no longer see it), and run
        what apply_molex registered in ``_on_remove``: take this module off the model
        (``model.molex``) and drop its structural record, so the model saves as it did before
        apply_molex and takes apply_molex again. A second call does nothing."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stacked = None
        self._masks = []
        self._recompute_real.clear()
        self.clear_routing_record()
        on_remove, self._on_remove = self._on_remove, []
        for undo in on_remove:
            undo(self)


class _ForwardMasks(dict):
    """MoLEx's {(layer, input storage, shape): real tokens} of the forward under way (see
    MoLEx._real_tokens): a copy of the model (deepcopy, pickle) starts with none."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return type(self), ()


def _refuse_sharded_layers(layers: nn.ModuleList) -> None:
    """Raise where FSDP2 shards the layers (or modules inside them) one by one: device selection
    would stack layers whose parameters are sharded outside their own forward, and host selection
    runs layer j, which each rank chooses from its own batch, so the ranks would gather different
    layers' parameters and wait for each other forever. Looked up only where FSDP2 is imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    if fsdp_module is not None and any(isinstance(m, fsdp_module) for layer in layers for m in layer.modules()):
        raise RuntimeError("MoLEx cannot mix layers that FSDP2 shards one by one (fully_shard on each layer of "
                           "the stack): layer t's mixing call runs layer j, chosen by each rank from its own batch, "
                           "while that layer's parameters are sharded. Shard the stack as one unit instead: "
                           "fully_shard(model) (or the module holding the stack) without fully_shard on its layers")


def _checkpointed(layers: nn.ModuleList) -> bool:
    """Whether a module of the layers checkpoints its forward in this forward: transformers'
    rule (GradientCheckpointingLayer), its ``gradient_checkpointing`` flag set, in training
    mode, with gradients enabled."""
    return torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) is True and m.training
                                           for m in layers.modules())


def _layers_alike(layers: nn.ModuleList) -> bool:
    """Whether all the layers have one :func:`_layer_signature` (read in eager mode only: dynamo,
    in torch 2.11, cannot trace a module's ``__dict__``)."""
    return len({_layer_signature(layer) for layer in layers}) == 1


def _layer_signature(layer: nn.Module) -> tuple:
    """What must be equal across the layers for device selection to run layer t's code with layer
    j's tensors: the name, shape and dtype of every parameter and buffer, and the type and the
    public non-tensor attributes of every submodule (train/eval mode, a MoE-LoRA layer's scaling,
    top-k, router settings, dropout probabilities, ...), except ``layer_idx``: the KV-cache slot
    of transformers' attention layers, unused by the mixing calls, which run without the cache, and
    ``gradient_checkpointing`` (checkpointed layers take the host path, :func:`_checkpointed`)."""
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in (*layer.named_parameters(), *layer.named_buffers()))
    modules = tuple((name, type(m), tuple((k, _attribute_value(v)) for k, v in m.__dict__.items()
                                          if not k.startswith("_") and k not in SIGNATURE_EXEMPT))
                    for name, m in layer.named_modules())
    return tensors, modules


def _attribute_value(v):
    """A module attribute as _layer_signature compares it: numbers, strings and frozen dataclasses
    (LayerSettings) by value, tuples and lists elementwise, anything else (a shared config, a
    task-id tensor) by identity."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return tuple(_attribute_value(x) for x in v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type) and type(v).__dataclass_params__.frozen:
        return v
    return ("object", id(v))


def _stack_layers(layers: nn.ModuleList) -> dict:
    """{name: [L, ...] stack} of every parameter and buffer of the layers (differentiable)."""
    names = [n for n, _ in (*layers[0].named_parameters(), *layers[0].named_buffers())]
    per_layer = [dict((*layer.named_parameters(), *layer.named_buffers())) for layer in layers]
    return {name: torch.stack([tensors[name] for tensors in per_layer]) for name in names}


def _is_kv_cache(value) -> bool:
    """Whether ``value`` is a transformers KV cache (``transformers.cache_utils.Cache``), looked up
    only where transformers is already imported (without it no such object exists)."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    cache_class = getattr(cache_utils, "Cache", None)
    return cache_class is not None and isinstance(value, cache_class)


def _recorded_outputs() -> list:
    """The lists of outputs (hidden states, attention maps, ...) that transformers (>= 5) records
    with forward hooks on the layers and their submodules in the forward under way
    (``output_hidden_states``, ``output_attentions``); empty where nothing records. Looked up only
    where transformers is already imported."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    if collector is None or (torch.compiler.is_compiling() and not getattr(collector, "compiling", False)):
        return []  # in a compiled graph transformers records through a global (dynamo cannot trace a ContextVar)
    collected = collector.get()
    return [v for v in collected.values() if isinstance(v, list)] if isinstance(collected, dict) else []


def _without_cache(args: tuple, kwargs: dict, t: int, z: torch.Tensor, mask_position: Optional[int] = None):
    """Layer t's (args, kwargs) for a mixing call, without the KV cache (see the module
    docstring): every argument, positional or keyword, that is a transformers ``Cache``
    (GPT-2's blocks take it positionally), and any other non-empty value of a keyword in
    ``CACHE_KWARGS`` (legacy tuple caches), become None; ``use_cache`` becomes False.
    Raises while decoding, i.e. when layer t's cache held tokens before this forward. A 4-D
    attention mask (or a flex attention BlockMask) wider than the forward's tokens (built over a static cache's
    slots, or a sliding-window layer's window), by keyword or at ``mask_position``, keeps its first columns
    (:func:`_mask_for_own_keys`)."""

    def is_cache(value, key=None) -> bool:
        if _is_kv_cache(value):
            return True
        return key in CACHE_KWARGS and value is not None and not (isinstance(value, (tuple, list)) and len(value) == 0)

    def check(cache) -> None:
        cached = cache.get_seq_length(t) if hasattr(cache, "get_seq_length") else None
        if cached is None or z.dim() < 3 or cached > z.shape[-2]:
            raise RuntimeError("MoLEx cannot decode from a KV cache that already holds tokens (layer j would "
                               "need keys it never computed): generate with use_cache=False")

    args, dropped = list(args), False
    for i, value in enumerate(args):
        if is_cache(value):
            check(value)
            args[i], dropped = None, True
    kwargs = dict(kwargs)
    for key, value in kwargs.items():
        if is_cache(value, key):
            check(value)
            kwargs[key], dropped = None, True
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    if dropped:
        _mask_for_own_keys(args, kwargs, z.shape[-2], mask_position)
    return tuple(args), kwargs


def _attention_mask_argument(module: nn.Module):
    """(whether ``module``'s forward takes ``attention_mask``, its position where it can be given
    positionally, else None: keyword only, after ``*args``, or not taken)."""
    params = list(inspect.signature(module.forward).parameters.values())
    names = [p.name for p in params]
    if "attention_mask" not in names:
        return False, None
    position = names.index("attention_mask")
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return True, None if any(p.kind not in positional for p in params[:position + 1]) else position


def _mask_for_own_keys(args: list, kwargs: dict, length: int, position: Optional[int]) -> None:
    """Cut layer t's attention mask (a 4-D tensor [batch, heads, query, key], or flex attention's
    ``BlockMask``; by keyword or at ``position``) to the ``length`` keys the mixing call computes, in place.
    A cache the forward fills (checked empty before it: :func:`_without_cache`) gets a mask over
    its slots: a static cache's ``max_cache_len``, a sliding-window layer's window where the
    sequence is shorter. The forward's tokens fill the first ``length`` slots, the keys layer j
    computes without the cache, so the mask's first ``length`` columns are theirs."""
    if "attention_mask" in kwargs:
        mask = kwargs["attention_mask"]
    else:
        mask = args[position] if position is not None and position < len(args) else None
    flex = sys.modules.get("torch.nn.attention.flex_attention")  # imported where a BlockMask was built
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] > length:
        mask = mask[..., :length]
    elif flex is not None and isinstance(mask, flex.BlockMask) and mask.seq_lengths[1] > length:
        mask = _block_mask_for_own_keys(flex.BlockMask, mask, length)
    else:
        return
    if "attention_mask" in kwargs:
        kwargs["attention_mask"] = mask
    else:
        args[position] = mask


def _block_mask_for_own_keys(block_mask_class: type, mask, length: int):
    """Flex attention's BlockMask ``mask`` cut to its first ``length`` keys (its queries kept), as torch's error
    for a wider block mask advises (``BlockMask._adjust``). torch 2.11's ``_adjust`` gives the cut mask the lengths
    of its whole blocks ((128, 128) for 3 queries and keys, which flex attention refuses for 3 tokens; 2.13's the
    lengths asked), an earlier one floored them to whole blocks: there the blocks are cut at whole-block lengths
    and the mask built again over the true lengths."""
    q_len = mask.seq_lengths[0]
    cut = mask._adjust(q_len, length)
    if tuple(cut.seq_lengths) == (q_len, length):
        return cut
    q_block, kv_block = mask.BLOCK_SIZE
    cut = mask._adjust(cdiv(q_len, q_block) * q_block, cdiv(length, kv_block) * kv_block)
    return block_mask_class.from_kv_blocks(cut.kv_num_blocks, cut.kv_indices, cut.full_kv_num_blocks,
                                           cut.full_kv_indices, BLOCK_SIZE=mask.BLOCK_SIZE, mask_mod=mask.mask_mod,
                                           seq_lengths=(q_len, length))
