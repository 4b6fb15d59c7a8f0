"""Upcycling a pretrained transformer FFN into a mixture of FFN experts (sparse upcycling).

:func:`upcycle_ffn` replaces FFN blocks with :class:`MoEFFN`, whose E experts all start as
copies of the pretrained FFN and whose router (ST-MoE threshold routing by default) mixes
the kept experts with weights summing to 1, so at init the block computes the original FFN.

    ffn(x)        = W_out act(W_in x + b_in) + b_out            (BERT, generic two-linear MLP)
    ffn(x)        = W_out (act(W_gate x) * (W_in x))             (LLaMA-style gated MLP)
    ffn(x)        = W_out (act(g) * u), [g; u] = W_gate_up x      (Phi-3-style fused gate/up projection,
                                                                 kept stacked: moe_ffn's stacked_gate)
    MoEFFN(x)[t]  = sum_j w[t,j] ffn_{e[t,j]}(x[t])

Expert compute is :func:`moelora.moe_ffn` (moelora/ops/moe_ffn.py): the extension's dispatch
metadata and grouped GEMMs on the Triton backend, a matmul chain per expert segment on
the torch backend. It mixes with ``normalize=True``, so with all experts routed and
eps = 0 a fresh upcycled block returns exactly (bitwise) the original FFN's output
wherever the expert GEMMs round as the original's (the torch backend: each expert then
multiplies all tokens in order, the very matmul the FFN ran); the Triton grouped GEMM
rounds differently from cuBLAS, to the GEMM's precision. Slots dropped by threshold
routing (weight 0) are skipped.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.nn as nn
from torch.nn.modules.dropout import _DropoutNd

from moelora.tuner.adapters import held_modules
from moelora.tuner.structure import record, replaying, structural_edit
from moelora.tuner.config import LAYER_INDICES, LAYER_PATTERNS, MODULE_NAMES
from moelora.tuner.targets import (check_single_place, matches, set_module, stacked_expert_parameters,
                                   transform_layer_index, unwrap)
from moelora.ops.validation import check_activation
from moelora.modules.adapter_base import refuse_offloaded, refuse_quantised
from moelora.modules.ffn import MoEFFN, check_ffn_settings
from moelora.modules.linear import linear_weight
from moelora.modules.fields import BOOL, check_field


def _is_bert_layer(m: nn.Module) -> bool:
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    return (inter is not None and out is not None and hasattr(inter, "dense")
            and hasattr(inter, "intermediate_act_fn") and hasattr(out, "dense"))


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _is_fused_gated_mlp(m: nn.Module) -> bool:
    """Phi-3's MLP (Phi-4's, GLM's, GLM-4's, ...): down_proj(up * activation_fn(gate)) with
    ``gate, up = gate_up_proj(x).chunk(2, -1)``, the gate rows first."""
    return isinstance(getattr(m, "gate_up_proj", None), nn.Module) and all(
        hasattr(m, a) for a in ("down_proj", "activation_fn"))


FFN_DROPOUT = (None, "output", "drop")  # upcycle_ffn's ffn_dropout
CHILD_NAME = (lambda v: isinstance(v, str), None, "the dotted name (str) of a child of the FFN module")  # in_proj, ...

# The names (attributes, globals) the forward of a found MLP may read: LLaMA's
# down_proj(act_fn(gate_proj(x)) * up_proj(x)) and Phi-3's chunked gate_up_proj (its dropout module, if
# any, is _output_dropout's). Anything else changes what the MLP computes, unseen by upcycle_ffn.
PLAIN_FORWARD_NAMES = {"gated": {"gate_proj", "up_proj", "down_proj", "act_fn", "dropout"},
                       "fused": {"gate_up_proj", "down_proj", "activation_fn", "chunk", "dropout"}}


def _generic_parts(name: str, m: nn.Module, in_proj: str, out_proj: str, gate_proj: Optional[str]) -> tuple:
    """(in_proj, out_proj, gate_proj) modules of the generic FFN ``m``; ValueError where ``m`` lacks one."""
    try:
        return tuple(m.get_submodule(p) if p else None for p in (in_proj, out_proj, gate_proj))
    except AttributeError as err:
        raise ValueError(f"{name} lacks one of in_proj={in_proj!r}, out_proj={out_proj!r}, "
                         f"gate_proj={gate_proj!r}") from err


def _check_holds_only(name: str, m: nn.Module, parts: tuple, described: str, activation: Callable, hint: str) -> None:
    """ValueError where ``m``, the module upcycle_ffn replaces, holds parameters besides the FFN's
    ``parts`` (modules or None; ``described`` names them) and ``activation``: these (an attention,
    layer norms: OPT's decoder layer holds fc1/fc2 itself, BitNet's MLP a norm before down_proj)
    would be dropped silently."""
    kept = {id(p) for part in (*parts, activation) if isinstance(part, nn.Module) for p in part.parameters()}
    others = sorted({n.rsplit(".", 1)[0] if "." in n else n for n, p in m.named_parameters() if id(p) not in kept})
    if others:
        raise ValueError(f"{name} ({type(m).__name__}) holds parameters besides {described}: {others}; upcycle_ffn "
                         "replaces it by the FFN out_proj(act(in_proj(x))) (times act(gate_proj(x)) if gated), which "
                         f"would drop them{hint}")


def _check_plain_forward(name: str, m: nn.Module, kind: str) -> None:
    """ValueError where the forward of ``m``, an MLP upcycle_ffn found by its children's names, reads
    names besides PLAIN_FORWARD_NAMES[kind] (its class's code: Gemma-3n's activation sparsity, Falcon-H1's
    multipliers, DeepSeek-V4's clamps, which MoEFFN would drop silently)."""
    code = getattr(type(m).forward, "__code__", None)
    if code is None or type(m).forward is nn.Module.forward:
        return
    others = sorted(set(code.co_names) - PLAIN_FORWARD_NAMES[kind])
    if others and "pretraining_tp" in others and _split_form_is_the_ffn(m):
        return
    if others:
        plain = ("down_proj(act_fn(gate_proj(x)) * up_proj(x))" if kind == "gated"
                 else "down_proj(up * activation_fn(gate)), gate, up = gate_up_proj(x).chunk(2, -1)")
        raise ValueError(f"{name} ({type(m).__name__}): its forward reads {others} besides the FFN {plain}, which "
                         "MoEFFN would not compute (e.g. a scale, a clamp, activation sparsity); if the FFN is that "
                         "after all, name it with ffn_modules, in_proj, out_proj, gate_proj and activation")


def _split_form_is_the_ffn(m: nn.Module) -> bool:
    """Whether ``m``'s forward, which reads ``pretraining_tp`` (transformers < 4.48's LlamaMLP: with
    config.pretraining_tp > 1 it splits the projections' weights into that many slices, without their
    biases, and sums the slices' products), computes the FFN: at pretraining_tp 1 (its other branch is the
    plain FFN), or without biases."""
    tp = getattr(getattr(m, "config", None), "pretraining_tp", None)
    return isinstance(tp, int) and (tp <= 1 or all(getattr(getattr(m, n, None), "bias", None) is None
                                                   for n in ("gate_proj", "up_proj", "down_proj")))


def _activation_modules(m: nn.Module, parts: tuple) -> dict:
    """{name: module} of the activation modules (torch.nn's, transformers.activations') held by ``m``
    outside the FFN's ``parts``: GPT-2's ``act``, CLIP's and ViT's ``activation_fn``, T5's ``act``."""
    inside = {id(q) for part in parts if isinstance(part, nn.Module) for q in part.modules()}
    return {n: a for n, a in m.named_modules() if n and id(a) not in inside
            and type(a).__module__ in ("torch.nn.modules.activation", "transformers.activations")}


def _check_activation_matches(name: str, m: nn.Module, parts: tuple, activation: Callable) -> None:
    """ValueError where ``activation``, the caller's for the generic FFN ``m``, computes something else
    than every activation module ``m`` holds (checked in float64 on [-6, 6]): gelu for GPT-2's gelu_new
    (NewGELUActivation), CLIP's quick_gelu, T5 v1.1's gelu_new, which would change the upcycled model's
    output silently (by ~1e-6 relative: invisible in a low-precision model, yet not the FFN)."""
    held = _activation_modules(m, parts)
    if not held:
        return
    probe = torch.linspace(-6, 6, 241, dtype=torch.float64, device="cpu")  # values, under any default device
    given = _values_on(activation, probe)
    if given is None:
        return
    differ = {}
    for n, act in held.items():
        theirs = _values_on(act, probe)
        if theirs is None:
            return
        if not (given.shape == theirs.shape and torch.allclose(given, theirs, rtol=1e-9, atol=1e-9)):
            differ[n] = act
    if len(differ) == len(held):
        _refuse_unless_replaying(
            f"{name} ({type(m).__name__}): activation {activation!r} computes something else than its activation "
            f"module(s) {differ}; pass the module's own (e.g. activation={name}.{next(iter(differ))}): upcycling with "
            "another would change the model's output (to use another activation, set it on the module first)")


def _values_on(activation: Callable, probe: torch.Tensor) -> Optional[torch.Tensor]:
    """``activation`` of a copy of ``probe`` (an activation may work in place: nn.ELU(inplace=True)), or None where
    it does not take float64 CPU tensors or returns another dtype: nothing to compare there."""
    try:
        values = activation(probe.clone())
    except Exception:
        return None
    return values if isinstance(values, torch.Tensor) and values.dtype == probe.dtype else None


def _refuse_unless_replaying(message: str) -> None:
    """ValueError(``message``) for a description of an FFN that the module contradicts; a warning where a checkpoint
    replays its record (moelora.from_pretrained): written before the check, it was trained with the FFN described,
    which is what it loads into."""
    if not replaying():
        raise ValueError(message)
    warnings.warn(message + "; the checkpoint's record says so, and it is loaded as it was trained", stacklevel=5)


PROBE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # relative; 5e-2 in lower precision


def _warn_unless_the_ffn(name: str, m: nn.Module, parts: tuple, activation: Callable, stacked: bool,
                         probe: _Probe) -> None:
    """UserWarning where the generic FFN the caller described (``parts``: in_proj, out_proj, gate_proj;
    ``activation``, ``stacked``) computes something else on the probe than ``m``'s forward: gate_proj and
    in_proj swapped (T5 v1.1's wi_0 is the gate), a scale or clamp the forward applies. It is upcycled as
    described (the caller's word: the plain FFN of an MLP computing more, as the docs say)."""
    in_proj, out_proj, gate_proj = parts
    with torch.no_grad():
        h = in_proj(probe.x)
        if stacked:
            gate, h = h.chunk(2, dim=-1)
            h = activation(gate) * h
        else:
            h = activation(h) if gate_proj is None else activation(gate_proj(probe.x)) * h
        ffn = out_proj(h)
    y = probe.y
    if not isinstance(y, torch.Tensor) or y.shape != ffn.shape:
        return
    err = float((ffn.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30))
    if not err <= PROBE_TOLERANCE.get(y.dtype, 5e-2):
        warnings.warn(f"{name} ({type(m).__name__}): the FFN described (in_proj, out_proj, gate_proj, activation"
                      f"{', stacked_gate' if stacked else ''}) differs from the module's forward on a probe by "
                      f"{err:.1e} relative: the upcycled block computes the FFN described, not the module; check "
                      "which projection is the gate (activation(gate_proj(x)) * in_proj(x)) and the activation",
                      stacklevel=4)


def _forward_takes_one_input(name: str, m: nn.Module) -> None:
    """ValueError where the forward of ``m``, the module upcycle_ffn replaces, needs more than one
    argument (BLOOM's MLP takes the residual and adds it): MoEFFN's forward takes the hidden states only."""
    try:
        params = list(inspect.signature(type(m).forward).parameters.values())[1:]  # past self
    except (TypeError, ValueError):
        return
    required = [p.name for p in params if p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(required) > 1:
        raise ValueError(f"{name} ({type(m).__name__}): its forward takes {required}, MoEFFN's the hidden states "
                         "only (a forward taking more, as BLOOM's MLP taking the residual it adds, cannot be "
                         "replaced by the FFN); name the module computing the FFN alone")


class _Probe(NamedTuple):
    """One forward of a replaced module on a fixed probe ``x`` [1, 4, d_in]: its output ``y`` and the names
    of its dropout modules that ran before the FFN's output projection's last call (``dropouts_before``; none
    where the forward does not call it as a module, F.linear with its weight: their place is not known)."""

    x: torch.Tensor
    y: torch.Tensor
    dropouts_before: List[str]


def _probe(m: nn.Module, in_proj: nn.Module, out_proj: nn.Module) -> Optional[_Probe]:
    """:class:`_Probe` of ``m`` (in eval mode, on fixed inputs: no random draw; hooks see which dropout modules
    run before ``out_proj``: those drop the FFN's input or hidden layer, as T5's DenseReluDense, not its output;
    the modules' training flags are restored); None where ``m`` cannot run it (meta weights, a forward that
    raises on it): the caller's word stands."""
    weight = linear_weight(in_proj, "in_proj (an FFN projection) must be one of the")
    if weight.is_meta:
        return None
    d_in = weight.shape[1]
    x = torch.sin(torch.arange(4 * d_in, dtype=torch.float64, device=weight.device) * 0.7).reshape(1, 4, d_in)
    x = x.to(weight.dtype)
    order, hooks, modes = [], [], {mod: mod.training for mod in m.modules()}
    for n, d in m.named_modules():
        if isinstance(d, _DropoutNd):
            hooks.append(d.register_forward_hook(lambda *_, n=n: order.append(n)))
    hooks.append(out_proj.register_forward_pre_hook(lambda *_: order.append(None)))
    try:
        m.eval()
        with torch.no_grad():
            y = m(x)
    except Exception:
        return None
    finally:
        for h in hooks:
            h.remove()
        for mod, mode in modes.items():
            mod.train(mode)
    last = max((i for i, n in enumerate(order) if n is None), default=0)  # out_proj not run as a module: none
    return _Probe(x, y, sorted(set(n for n in order[:last] if n is not None)))


def _dropouts(m: nn.Module) -> dict:
    """{name: p} of the active dropout modules (p > 0) ``m`` holds."""
    return {n: d.p for n, d in m.named_modules() if isinstance(d, _DropoutNd) and d.p > 0}


def _output_dropout(name: str, m: nn.Module, ffn_dropout: Optional[str], inner: bool,
                    probe: Optional[_Probe] = None) -> float:
    """p of the dropout MoEFFN applies to its output in place of the active dropout modules
    (p > 0) of ``m``, the module upcycle_ffn replaces: ``ffn_dropout`` "output" (they act on
    m's output; ``inner``: m's output is the FFN's hidden layer, so they cannot), "drop" (0),
    None (ValueError where m holds any: upcycling would change training silently). "output" raises
    where ``probe`` (:func:`_probe`) saw a dropout run before out_proj (T5's DenseReluDense: on the
    hidden layer, not the output)."""
    drops = _dropouts(m)
    if not drops or ffn_dropout == "drop":
        return 0.0
    if ffn_dropout is None:
        raise ValueError(f"{name} ({type(m).__name__}) holds dropout {drops} (name: p), which upcycle_ffn cannot "
                         "tell where its forward applies: pass ffn_dropout='output' if it drops the MLP's output (as "
                         "GPT-2's and GPT-J's MLPs), so that MoEFFN drops its output the same way, or "
                         "ffn_dropout='drop' to train without it (a dropout inside the FFN, as T5's after the "
                         "activation, cannot be kept: the experts' fused kernels have none)")
    if inner:
        raise ValueError(f"{name} ({type(m).__name__}) holds dropout {drops} (name: p) on the FFN's hidden layer "
                         "(output.dense follows it), which MoEFFN cannot keep: the experts' fused kernels have no "
                         "dropout; pass ffn_dropout='drop' to train without it")
    if probe is not None:  # where the forward applies the dropout
        before = [n for n in probe.dropouts_before if n in drops]
        if before:
            _refuse_unless_replaying(
                f"{name} ({type(m).__name__}): its forward applies dropout {before} before the output projection (on "
                "the FFN's hidden layer, as T5's DenseReluDense after the activation), not on the MLP's output, so "
                "ffn_dropout='output' would drop elsewhere; MoEFFN cannot keep it (the experts' fused kernels have no "
                "dropout): pass ffn_dropout='drop' to train without it")
    if len(set(drops.values())) > 1:
        raise ValueError(f"{name} ({type(m).__name__}) holds dropouts of different p {drops}: ffn_dropout='output' "
                         "applies one to MoEFFN's output; pass ffn_dropout='drop' to train without them")
    others = {n: type(d).__name__ for n, d in m.named_modules()
              if n in drops and type(d).forward is not nn.Dropout.forward}
    if others:  # AlphaDropout (SELU's), Dropout2d (whole channels), ...: not what F.dropout on the output computes
        raise ValueError(f"{name} ({type(m).__name__}) holds dropout of another kind than nn.Dropout {others} (name: "
                         "type): ffn_dropout='output' applies nn.Dropout's element-wise F.dropout to MoEFFN's output, "
                         "which would change training silently; pass ffn_dropout='drop' to train without it")
    return next(iter(drops.values()))


def _build(name: str, m: nn.Module, kind: str, num_experts: int, top_k: int, generic: dict, ffn_dropout,
           router_kwargs: dict) -> MoEFFN:
    """The MoEFFN replacing the FFN ``m`` (of a BERT layer: its intermediate and output.dense),
    after checking that the replaced module holds nothing else (parameters, dropout) it would drop."""
    stacked, hint = False, ""
    if kind == "bert":
        name, replaced, act = f"{name}.intermediate", m.intermediate, m.intermediate.intermediate_act_fn
        parts, described = (m.intermediate.dense, m.output.dense, None), "dense and intermediate_act_fn"
    elif kind == "gated":
        replaced, act = m, m.act_fn
        parts, described = (m.up_proj, m.down_proj, m.gate_proj), "gate_proj, up_proj, down_proj and act_fn"
    elif kind == "fused":
        replaced, act, stacked = m, m.activation_fn, True
        parts, described = (m.gate_up_proj, m.down_proj, None), "gate_up_proj, down_proj and activation_fn"
    else:
        replaced, act, stacked = m, generic["activation"], generic["stacked_gate"]
        parts = _generic_parts(name, m, generic["in_proj"], generic["out_proj"], generic["gate_proj"])
        described = ", ".join(f"{k}={generic[k]!r}" for k in ("in_proj", "out_proj", "gate_proj"))
        if all(isinstance(p, nn.Module) for p in parts[:2]):
            _check_activation_matches(name, m, parts, act)
        hint = (": name the MLP module that holds only the FFN's projections (a layer holding fc1 / fc2 next to its "
                "attention, as OPT's decoder layer, cannot be upcycled)")
    _check_holds_only(name, replaced, parts, described, act, hint)
    _forward_takes_one_input(name, replaced)
    if kind in PLAIN_FORWARD_NAMES:
        _check_plain_forward(name, replaced, kind)
    # the probe forward where it is read: a generic FFN's check, a dropout ffn_dropout="output" would move
    probe = None
    if kind == "generic" or (kind != "bert" and ffn_dropout == "output" and _dropouts(replaced)):
        probe = _probe(replaced, parts[0], parts[1])
    dropout = _output_dropout(name, replaced, ffn_dropout, inner=kind == "bert", probe=probe)
    # built before the probe runs the FFN described: its checks name the projections that disagree
    moe = MoEFFN(parts[0], parts[1], act, num_experts, top_k, gate_proj=parts[2], stacked_gate=stacked,
                 dropout=dropout, **router_kwargs)
    if kind == "generic" and probe is not None:
        _warn_unless_the_ffn(name, replaced, parts, act, stacked, probe)
    return moe


@structural_edit
def upcycle_ffn(model: nn.Module, num_experts: int = 4, top_k: int = 2, *, ffn_modules=None,
                in_proj: Optional[str] = None, out_proj: Optional[str] = None, gate_proj: Optional[str] = None,
                activation: Optional[Callable] = None, stacked_gate: bool = False, ffn_dropout: Optional[str] = None,
                fused_gate_up: bool = True,
                layers_to_transform=None, layers_pattern=None, **router_kwargs) -> List[str]:
    """Replace FFN blocks of ``model`` by :class:`MoEFFN` (in place); returns their names.

    Without ``ffn_modules`` it finds BERT layers (``intermediate`` + ``output``: the
    intermediate becomes the MoE and ``output.dense`` an identity, so BertOutput's dropout,
    residual and LayerNorm stay), LLaMA-style MLPs (gate/up/down_proj + act_fn) and Phi-3-style
    MLPs with a fused gate/up projection (gate_up_proj, gate rows first, + down_proj +
    activation_fn: Phi-3/Phi-4, GLM, GLM-4; the experts keep it stacked, ``stacked_gate``). For
    any other MLP give ``ffn_modules`` (suffixes or a regex, as target_modules), the names of
    its ``in_proj`` / ``out_proj`` (and ``gate_proj``) children and ``activation``
    (``stacked_gate=True``: ``in_proj`` is a fused projection, gate rows then up rows, as
    Phi-3's); the whole module is then replaced by out_proj(act(in_proj(x))) (times
    act(gate_proj(x)) if gated); an ``activation`` computing something else than every activation module the
    replaced module holds (gelu for GPT-2's gelu_new ``act``) raises, and one computing otherwise than the
    module's forward on a probe (the gate and up projections swapped) warns. Without ``ffn_modules`` these arguments
    raise (the MLPs found use their own). A replaced module holding other parameters raises, as one
    holding dropout (nn.Dropout with p > 0) unless ``ffn_dropout`` says what to do with it:
    "output" (its forward drops the MLP's output: MoEFFN drops its output with that p) or "drop"
    (train without it; a dropout inside the FFN cannot be kept: "output" on a module whose forward, probed once
    in eval mode, runs a dropout before ``out_proj`` (T5's DenseReluDense) raises). Dropout the forward applies
    without a module (F.dropout) is not seen, and dropped. A found MLP whose forward reads more than
    its children (Gemma-3n's activation sparsity, Falcon-H1's multipliers) raises, as a replaced
    module whose forward takes more than the hidden states (BLOOM's MLP). A model holding a mixture of experts (a
    block with ``experts``) raises without ``ffn_modules``, and a named module holding experts'
    weights stacked in 3-D parameters (transformers' MoE blocks and their experts) always. An FFN
    that a MoELoRAModel's adapter (active or stored) adapts or saves raises, naming the adapter,
    whether ``model`` is the wrapper, the model it wraps or a module inside that.
    ``fused_gate_up=False`` leaves the Phi-3-style fused MLPs out of what is found (checkpoints
    written before they were found replay with it: a model holding both kinds, as GLM-4V, then
    gets the MoEFFNs the checkpoint holds).
    ``num_experts`` (>= 1) and ``top_k`` (in [1, num_experts]) are MoEFFN's. ``layers_to_transform`` (a layer
    index or a list of them) and ``layers_pattern`` (the name, or names, of the layer stack: "layers", "h", ...)
    keep only the FFNs of those numbered layers, as MoELoRAConfig's fields of the same names.
    ``router_kwargs`` go to MoEFFN (router, threshold_eps, threshold_eps_start,
    threshold_ramp_steps, router_jitter_noise, router_aux_loss_coef, router_z_loss_coef), checked
    as the MoE-LoRA layers' fields of the same names before the model is changed.
    """
    check_ffn_settings(num_experts, top_k, **router_kwargs)
    if activation is not None:
        check_activation(activation)
    check_field("stacked_gate", stacked_gate, BOOL)
    check_field("fused_gate_up", fused_gate_up, BOOL)
    if isinstance(ffn_modules, (set, frozenset)) and all(isinstance(n, str) for n in ffn_modules):
        ffn_modules = sorted(ffn_modules)  # as MoELoRAConfig's target_modules: a list (recorded for from_pretrained)
    # as MoELoRAConfig's fields of the same meaning (an int or a bad regex failed deep inside, True chose layer 1)
    for name, value, kind in (("ffn_modules", ffn_modules, MODULE_NAMES), ("in_proj", in_proj, CHILD_NAME),
                              ("out_proj", out_proj, CHILD_NAME), ("gate_proj", gate_proj, CHILD_NAME),
                              ("layers_to_transform", layers_to_transform, LAYER_INDICES),
                              ("layers_pattern", layers_pattern, LAYER_PATTERNS)):
        if value is not None:
            check_field(name, value, kind)
    if ffn_dropout not in FFN_DROPOUT:
        raise ValueError(f"ffn_dropout must be one of {FFN_DROPOUT}, got {ffn_dropout!r}")
    held = held_modules(model)  # the adapters of a MoELoRAModel, inactive ones too
    model = unwrap(model)
    call = dict(num_experts=num_experts, top_k=top_k, ffn_modules=ffn_modules, in_proj=in_proj, out_proj=out_proj,
                gate_proj=gate_proj, activation=activation, stacked_gate=stacked_gate, ffn_dropout=ffn_dropout,
                fused_gate_up=fused_gate_up, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
                **router_kwargs)
    if ffn_modules is None:
        moe_blocks = [n for n, m in model.named_modules() if isinstance(getattr(m, "experts", None), nn.Module)]
        if moe_blocks:
            raise ValueError(f"{moe_blocks[0]} ({type(model.get_submodule(moe_blocks[0])).__name__}) is already a "
                             "mixture of experts: upcycle_ffn upcycles dense FFNs; to upcycle some of this model's "
                             "dense MLPs (e.g. a shared expert), name them with ffn_modules, in_proj, out_proj "
                             "and activation")
    targets = []
    for name, m in model.named_modules():
        if ffn_modules is not None:
            if name and matches(name, ffn_modules):
                targets.append((name, "generic"))
        elif _is_bert_layer(m):
            targets.append((name, "bert"))
        elif _is_gated_mlp(m):
            targets.append((name, "gated"))
        elif fused_gate_up and _is_fused_gated_mlp(m):
            targets.append((name, "fused"))
    if layers_to_transform is not None:
        keep = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        targets = [(n, k) for n, k in targets if transform_layer_index(n, layers_pattern) in keep]
    if not targets:
        upcycled = next((n for n, m in model.named_modules() if isinstance(m, MoEFFN)), None)
        if upcycled is not None and ffn_modules is None:
            raise ValueError(f"no dense FFN found to upcycle: the model's are upcycled already (e.g. {upcycled}, a "
                             "MoEFFN); upcycle_ffn upcycles dense FFNs, once")
        raise ValueError("no FFN found to upcycle: upcycle_ffn finds BERT-style layers (intermediate.dense, "
                         "intermediate.intermediate_act_fn, output.dense), LLaMA-style MLPs (gate_proj, up_proj, "
                         "down_proj, act_fn) and Phi-3-style MLPs (gate_up_proj, down_proj, activation_fn); for "
                         "another MLP (GPT-2's c_fc / c_proj, CLIP's and ViT's fc1 / fc2, T5's wi / wo) give "
                         "ffn_modules=[...] with in_proj, out_proj and activation")
    if ffn_modules is not None and (in_proj is None or out_proj is None or activation is None):
        raise ValueError("a generic FFN needs in_proj, out_proj and activation")
    if stacked_gate and ffn_modules is None:
        raise ValueError("stacked_gate=True describes a generic FFN's in_proj (give ffn_modules, in_proj, out_proj and "
                         "activation); the fused gate_up_proj of Phi-3-style MLPs is found without it")
    given = [k for k, v in dict(in_proj=in_proj, out_proj=out_proj, gate_proj=gate_proj, activation=activation).items()
             if v is not None]
    if given and ffn_modules is None:  # else silently unused: the found MLPs' own projections and activation ran
        raise ValueError(f"{', '.join(given)} given without ffn_modules: they describe a generic FFN; the MLPs "
                         "upcycle_ffn finds on its own use their own projections and activation")
    for name, kind in targets:
        stacked = stacked_expert_parameters(model.get_submodule(name))
        if stacked:
            first = next(iter(stacked.items()))
            raise ValueError(f"{name} ({type(model.get_submodule(name)).__name__}) holds the weights of a mixture of "
                             f"experts stacked in {len(stacked)} parameter(s) (e.g. {first[0]} {list(first[1])}): it "
                             "is (part of) a mixture of experts already, which upcycle_ffn cannot upcycle (it upcycles "
                             "dense FFNs made of linear layers)")
    replaced_modules = [n for name, kind in targets  # what upcycling replaces (a BERT layer: two children)
                        for n in ([f"{name}.intermediate", f"{name}.output.dense"] if kind == "bert" else [name])]
    check_single_place(model, [(n, model.get_submodule(n)) for n in replaced_modules], "upcycle_ffn")
    for name, kind in targets:  # the modules upcycling replaces (a BERT layer: its intermediate and output.dense)
        for replaced in ([f"{name}.intermediate", f"{name}.output.dense"] if kind == "bert" else [name]):
            inside = next((n for n in held if n == replaced or n.startswith(f"{replaced}.")
                           or replaced.startswith(f"{n}.")), None)
            if inside is not None:
                raise ValueError(f"{replaced}: adapter {held[inside]!r} has a module at {inside}, which upcycling "
                                 "this FFN would replace or change; upcycle before injecting adapters (or delete "
                                 "that adapter)")
    # Every MoEFFN is built (and so checked) before the model is changed: an error leaves it as it was.
    generic = dict(in_proj=in_proj, out_proj=out_proj, gate_proj=gate_proj, activation=activation,
                   stacked_gate=stacked_gate)
    built = []
    for name, kind in targets:
        m = model.get_submodule(name)
        for part in m.modules():
            if getattr(part, "weight", None) is not None:
                refuse_offloaded(part, f"upcycling {name} (its experts start as copies of the FFN's weights)")
                refuse_quantised(part, f"upcycling {name} (its experts start as copies of the FFN's weights)")
        moe = _build(name, m, kind, num_experts, top_k, generic, ffn_dropout, router_kwargs)
        built.append((name, kind, m, moe.train(m.training)))
    for name, kind, m, moe in built:
        if kind == "bert":
            m.intermediate = moe
            m.output.dense = nn.Identity().train(m.training)
        else:
            set_module(model, name, moe)
    record(model, "upcycle_ffn", call)  # replayed by moelora.from_pretrained
    return [n for n, _ in targets]
