"""``MoEFFN``: a routed mixture of FFN experts (sparse upcycling: every expert starts as a
copy of one pretrained FFN) on ``moelora.moe_ffn``; ``moelora.upcycle_ffn`` builds it."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelora.ops.backend import resolve_backend
from moelora.ops.moe_ffn import routed_moe_ffn
from moelora.ops.validation import check_activation, check_top_k
from moelora.modules.fields import BOOL, LAYER_FIELD_KINDS, check_field, is_real
from moelora.modules.init import copy_to_every_expert_, reset_like_linear
from moelora.modules.adapter_base import refuse_quantised
from moelora.modules.linear import linear_weight
from moelora.modules.routed import RoutedModule
from moelora.modules.router import LEARNED_MODE_KIND, Router


# MoEFFN's router arguments (upcycle_ffn's ``router_kwargs``), named as the layers' fields.
ROUTER_ARGS = ("router", "threshold_eps", "threshold_eps_start", "threshold_ramp_steps", "router_jitter_noise",
               "router_aux_loss_coef", "router_z_loss_coef")


def check_ffn_settings(num_experts, top_k, **router_kwargs) -> None:
    """The checks of MoEFFN's expert and router arguments (MoEFFN's and upcycle_ffn's, before
    anything is built or changed): each as the layers' field of the same name (LAYER_FIELD_KINDS;
    ``router``: a learned router's mode), then top_k <= num_experts; unknown names raise TypeError."""
    unknown = sorted(set(router_kwargs) - set(ROUTER_ARGS))
    if unknown:
        raise TypeError(f"unknown router arguments {unknown}: MoEFFN takes {ROUTER_ARGS}")
    for name, value in dict(num_experts=num_experts, top_k=top_k, **router_kwargs).items():
        check_field(name, value, LEARNED_MODE_KIND if name == "router" else LAYER_FIELD_KINDS[name])
    check_top_k(top_k, num_experts)


def _stack(t: Optional[torch.Tensor], num_experts: int) -> Optional[nn.Parameter]:
    if t is None:
        return None
    return nn.Parameter(t.detach().unsqueeze(0).repeat(num_experts, *([1] * t.dim())).contiguous())


class MoEFFN(nn.Module, RoutedModule):
    """E copies of one FFN behind a router; see the module docstring.

    Args:
        in_proj, out_proj: the FFN's first and last projections (nn.Linear or transformers Conv1D):
            ``out_proj(activation(in_proj(x)))``; ``gate_proj`` (None: not gated) makes it
            ``out_proj(activation(gate_proj(x)) * in_proj(x))``. They must share one dtype and device.
        activation: a callable (e.g. ``F.silu``, an ``ACT2FN`` module; not a name).
        num_experts: E, an int >= 1; ``top_k``: experts per token, in [1, E].
        router: the learned router's mode, "threshold" (default), "softmax_topk" or "topk_softmax";
            ``threshold_eps``, ``threshold_eps_start``, ``threshold_ramp_steps`` and
            ``router_jitter_noise``: as :class:`moelora.Router`'s ``eps_end``, ``eps_start``,
            ``eps_ramp_steps`` and ``jitter_noise``; ``router_aux_loss_coef`` and
            ``router_z_loss_coef`` (finite numbers >= 0) weigh its load-balancing and z losses.
        stacked_gate, dropout: below.

    Parameters (expert dim first, nn.Linear layouts): ``w_in`` [E, d_ff, d_in], ``b_in``,
    ``w_gate`` (gated MLPs), ``w_out`` [E, d_out, d_ff], ``b_out``, ``router.weight`` [E, d_in].
    ``stacked_gate=True``: ``in_proj`` is a fused gate/up projection [2 d_ff, d_in] whose first
    d_ff output rows are the gate's and the rest the up projection's (Phi-3's ``gate_up_proj``,
    ``gate, up = h.chunk(2, -1)``, ``up * act(gate)``); ``w_in`` [E, 2 d_ff, d_in] and ``b_in``
    keep that layout and moe_ffn runs it with ``stacked_gate=True`` (one GEMM for both halves);
    ``w_gate`` is None. ``dropout``: p of a dropout on the block's output in training (the
    original MLP's output dropout, GPT-2's; the experts have none inside).
    The router arguments are checked as the MoE-LoRA layers' fields of the same names
    (:func:`check_ffn_settings`).
    """

    moelora_owned = True  # trained and saved whole (moelora.modules.adapter_base.owned_by_moelora)
    BIAS_NAMES = ("b_in", "b_out", "b_gate")  # the experts' biases ([E, d]; None where the FFN had none)

    def __init__(self, in_proj: nn.Module, out_proj: nn.Module, activation: Callable, num_experts: int,
                 top_k: int, gate_proj: Optional[nn.Module] = None, router: str = "threshold",
                 threshold_eps: float = 0.0, threshold_eps_start: float = 0.0, threshold_ramp_steps: int = 0,
                 router_jitter_noise: float = 0.0, router_aux_loss_coef: float = 0.01,
                 router_z_loss_coef: float = 0.001, *, stacked_gate: bool = False, dropout: float = 0.0):
        super().__init__()
        check_ffn_settings(num_experts, top_k, router=router, threshold_eps=threshold_eps,
                           threshold_eps_start=threshold_eps_start, threshold_ramp_steps=threshold_ramp_steps,
                           router_jitter_noise=router_jitter_noise, router_aux_loss_coef=router_aux_loss_coef,
                           router_z_loss_coef=router_z_loss_coef)
        check_activation(activation)
        check_field("stacked_gate", stacked_gate, BOOL)
        check_field("dropout", dropout, (is_real, lambda v: 0 <= v <= 1, "a number in [0, 1] (nn.Dropout's p)"))
        # each projection's type first (linear_weight), then its weight (refuse_quantised reads it)
        projections = (("in_proj", in_proj), ("out_proj", out_proj), ("gate_proj", gate_proj))
        w_in, w_out, w_gate = (None if proj is None and role == "gate_proj" else
                               linear_weight(proj, f"{role} (an FFN projection) must be one of the")
                               for role, proj in projections)
        for proj in (in_proj, out_proj, gate_proj):
            if proj is not None:
                refuse_quantised(proj, "MoEFFN (its experts start as copies of the FFN's weights)")
        b_in, b_out = in_proj.bias, out_proj.bias
        d_ff = w_in.shape[0] // 2 if stacked_gate else w_in.shape[0]
        if stacked_gate and (gate_proj is not None or w_in.shape[0] % 2):
            raise ValueError("with stacked_gate=True, in_proj is the fused gate/up projection [2 * d_ff, d_in] and "
                             f"gate_proj must be None; got in_proj with {w_in.shape[0]} output features and "
                             f"gate_proj {type(gate_proj).__name__}")
        if w_out.shape[1] != d_ff:
            fused = " (half of the fused gate/up projection's)" if stacked_gate else ""
            raise ValueError(f"out_proj takes {w_out.shape[1]} features but in_proj gives {d_ff}{fused}")
        if w_gate is not None and w_gate.shape != w_in.shape:
            raise ValueError(f"gate_proj must have in_proj's shape {list(w_in.shape)} ([d_ff, d_in], nn.Linear "
                             f"layout), got {list(w_gate.shape)}")
        b_gate = None if gate_proj is None else gate_proj.bias
        for name, t in (("in_proj.bias", b_in), ("out_proj.weight", w_out), ("out_proj.bias", b_out),
                        ("gate_proj.weight", w_gate), ("gate_proj.bias", b_gate)):
            if t is not None and (t.dtype, t.device) != (w_in.dtype, w_in.device):
                raise TypeError(f"the FFN's projections must share one dtype and device (the experts stack them): "
                                f"{name} is {t.dtype} on {t.device}, in_proj.weight {w_in.dtype} on {w_in.device}")
        self.num_experts, self.top_k, self.activation = num_experts, top_k, activation
        self.stacked_gate, self.dropout = stacked_gate, float(dropout)
        self.w_in, self.b_in = _stack(w_in, num_experts), _stack(b_in, num_experts)
        self.w_out, self.b_out = _stack(w_out, num_experts), _stack(b_out, num_experts)
        if gate_proj is not None:
            self.w_gate, self.b_gate = _stack(w_gate, num_experts), _stack(b_gate, num_experts)
        else:
            self.w_gate = self.b_gate = None
        # at top_k 1 the Router warns, with MoEFFN's advice (router_renormalize, the Router's, is no MoEFFN argument)
        self.router = Router(w_in.shape[1], num_experts, top_k, router, jitter_noise=router_jitter_noise,
                             eps_start=threshold_eps_start, eps_end=threshold_eps,
                             eps_ramp_steps=threshold_ramp_steps, device=w_in.device,
                             top1_advice="MoEFFN with top_k=1 normalises each token's kept gates whatever the router "
                                         "(so that the upcycled experts reproduce the dense FFN): take top_k >= 2 "
                                         "for a router the task trains")
        self.aux_loss_coef, self.z_loss_coef = router_aux_loss_coef, router_z_loss_coef
        self.clear_routing_record()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the experts as upcycling a freshly initialised FFN would (meta-device init: the
        pretrained FFN the constructor copied is gone): one FFN drawn as nn.Linear layers draw
        (``w_gate``, ``w_in``, ``w_out``, each weight then its bias: the order of LLaMA's MLP, so
        the same seed gives the FFN that MLP's layers would; a stacked ``w_in`` as one
        nn.Linear(d_in, 2 d_ff), Phi-3's ``gate_up_proj``) and copied into every expert. The
        router is a child module with its own ``reset_parameters``."""
        for weight, bias in ((self.w_gate, self.b_gate), (self.w_in, self.b_in), (self.w_out, self.b_out)):
            if weight is None:
                continue
            # one FFN drawn apart, then copied: the experts of an FSDP2-sharded module cannot be indexed in place
            one_weight = torch.empty(weight.shape[1:], dtype=weight.dtype, device=weight.device)
            one_bias = None if bias is None else torch.empty(bias.shape[1:], dtype=bias.dtype, device=bias.device)
            reset_like_linear(one_weight, one_bias)
            copy_to_every_expert_(weight, one_weight)
            if bias is not None:
                copy_to_every_expert_(bias, one_bias)

    def jit_traceable(self, x: torch.Tensor) -> bool:
        """torch.jit.trace records the torch backend's forward (its expert loop is moelora's custom op
        segment_linear), not the Triton backend's (its launchers read sizes as integers)."""
        return resolve_backend(None, x.device) == "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.router(x)
        self._record_routing(routing)
        flat = x.reshape(-1, x.shape[-1])
        out = routed_moe_ffn(flat, routing, self.w_in, self.b_in, self.w_out, self.b_out, self.activation, self.w_gate,
                             self.b_gate, normalize=True, stacked_gate=self.stacked_gate)
        if self.dropout and self.training:
            out = F.dropout(out, self.dropout)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        d_ff = self.w_out.shape[2]
        gated = self.w_gate is not None or self.stacked_gate
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, d_in={self.w_in.shape[2]}, d_ff={d_ff}, "
                f"gated={gated}" + (", stacked_gate=True" if self.stacked_gate else "")
                + (f", dropout={self.dropout}" if self.dropout else ""))
