"""Upcycling a pretrained transformer FFN into a mixture of FFN experts (sparse upcycling).

:func:`upcycle_ffn` replaces FFN blocks with :class:`MoEFFN`, whose E experts all start as
copies of the pretrained FFN and whose router (ST-MoE threshold routing by default) mixes
the kept experts with weights summing to 1, so at init the block computes the original FFN.

    ffn(x)        = W_out act(W_in x + b_in) + b_out            (BERT, generic two-linear MLP)
    ffn(x)        = W_out (act(W_gate x) * (W_in x))             (LLaMA-style gated MLP)
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

from typing import Callable, List, Optional

import torch.nn as nn

from moelora.tuner.structure import record, structural_edit
from moelora.tuner.targets import layer_index, matches, set_module, unwrap
from moelora.ops.validation import check_activation
from moelora.modules.adapter_base import refuse_offloaded
from moelora.modules.ffn import MoEFFN, check_ffn_settings


def _is_bert_layer(m: nn.Module) -> bool:
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    return (inter is not None and out is not None and hasattr(inter, "dense")
            and hasattr(inter, "intermediate_act_fn") and hasattr(out, "dense"))


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _generic_parts(name: str, m: nn.Module, in_proj: str, out_proj: str, gate_proj: Optional[str],
                   activation: Callable) -> tuple:
    """(in_proj, out_proj, gate_proj) modules of the generic FFN ``m``. ValueError where ``m`` lacks
    one, or holds parameters besides them: the whole of ``m`` is replaced, so these (an attention,
    layer norms: OPT's decoder layer holds fc1/fc2 itself) would be dropped silently."""
    try:
        parts = [m.get_submodule(p) if p else None for p in (in_proj, out_proj, gate_proj)]
    except AttributeError as err:
        raise ValueError(f"{name} lacks one of in_proj={in_proj!r}, out_proj={out_proj!r}, "
                         f"gate_proj={gate_proj!r}") from err
    kept = {id(p) for part in (*parts, activation) if isinstance(part, nn.Module) for p in part.parameters()}
    others = sorted({n.rsplit(".", 1)[0] if "." in n else n for n, p in m.named_parameters() if id(p) not in kept})
    if others:
        raise ValueError(f"{name} ({type(m).__name__}) holds parameters besides in_proj={in_proj!r}, "
                         f"out_proj={out_proj!r} and gate_proj={gate_proj!r}: {others}; upcycle_ffn replaces the "
                         "whole module by out_proj(act(in_proj(x))), which would drop them: name the MLP module "
                         "that holds only the FFN's projections (a layer holding fc1 / fc2 next to its attention, "
                         "as OPT's decoder layer, cannot be upcycled)")
    return tuple(parts)


@structural_edit
def upcycle_ffn(model: nn.Module, num_experts: int = 4, top_k: int = 2, *, ffn_modules=None,
                in_proj: Optional[str] = None, out_proj: Optional[str] = None, gate_proj: Optional[str] = None,
                activation: Optional[Callable] = None, layers_to_transform=None, layers_pattern=None,
                **router_kwargs) -> List[str]:
    """Replace FFN blocks of ``model`` by :class:`MoEFFN` (in place); returns their names.

    Without ``ffn_modules`` it finds BERT layers (``intermediate`` + ``output``: the
    intermediate becomes the MoE and ``output.dense`` an identity, so BertOutput's dropout,
    residual and LayerNorm stay) and LLaMA-style MLPs (gate/up/down_proj + act_fn). For
    any other MLP give ``ffn_modules`` (suffixes or a regex, as target_modules), the names of
    its ``in_proj`` / ``out_proj`` (and ``gate_proj``) children and ``activation``; the whole
    module is then replaced by out_proj(act(in_proj(x))) (times act(gate_proj(x)) if gated),
    so anything else its forward did (dropout) is dropped.
    ``router_kwargs`` go to MoEFFN (router, threshold_eps, threshold_eps_start,
    threshold_ramp_steps, router_jitter_noise, router_aux_loss_coef, router_z_loss_coef), checked
    as the MoE-LoRA layers' fields of the same names before the model is changed.
    """
    check_ffn_settings(num_experts, top_k, **router_kwargs)
    if activation is not None:
        check_activation(activation)
    model = unwrap(model)
    call = dict(num_experts=num_experts, top_k=top_k, ffn_modules=ffn_modules, in_proj=in_proj, out_proj=out_proj,
                gate_proj=gate_proj, activation=activation, layers_to_transform=layers_to_transform,
                layers_pattern=layers_pattern, **router_kwargs)
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
    if layers_to_transform is not None:
        keep = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        targets = [(n, k) for n, k in targets if layer_index(n, layers_pattern) in keep]
    if not targets:
        raise ValueError("no FFN found to upcycle: give ffn_modules=[...] with in_proj, out_proj and activation")
    if ffn_modules is not None and (in_proj is None or out_proj is None or activation is None):
        raise ValueError("a generic FFN needs in_proj, out_proj and activation")
    # Every MoEFFN is built (and so checked) before the model is changed: an error leaves it as it was.
    built = []
    for name, kind in targets:
        m = model.get_submodule(name)
        for part in m.modules():
            if getattr(part, "weight", None) is not None:
                refuse_offloaded(part, f"upcycling {name} (its experts start as copies of the FFN's weights)")
        if kind == "bert":
            moe = MoEFFN(m.intermediate.dense, m.output.dense, m.intermediate.intermediate_act_fn, num_experts,
                         top_k, **router_kwargs)
        elif kind == "gated":
            moe = MoEFFN(m.up_proj, m.down_proj, m.act_fn, num_experts, top_k, gate_proj=m.gate_proj, **router_kwargs)
        else:
            w_in, w_out, w_gate = _generic_parts(name, m, in_proj, out_proj, gate_proj, activation)
            moe = MoEFFN(w_in, w_out, activation, num_experts, top_k, gate_proj=w_gate, **router_kwargs)
        built.append((name, kind, m, moe.train(m.training)))
    for name, kind, m, moe in built:
        if kind == "bert":
            m.intermediate = moe
            m.output.dense = nn.Identity().train(m.training)
        else:
            set_module(model, name, moe)
    record(model, "upcycle_ffn", call)  # replayed by moelora.from_pretrained
    return [n for n, _ in targets]
