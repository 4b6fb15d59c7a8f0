"""``Router``: the learned gate of the MoE-LoRA layers, an ``nn.Linear(d_in, E)`` whose logits
are computed in fp32, with its routing mode (moelora.ops.routing_modes), top-k, jitter
noise and the threshold schedule that ``moelora.step_routers`` advances."""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
import torch.nn as nn

from moelora.kernels import launchers
from moelora.ops.validation import check_module_input, check_top_k, refuse_double_backward
from moelora.ops.routing_modes import LEARNED_MODES, Routing, linear_logits, route_logits, scheduled_eps
from moelora.ops.backend import kernels_run
from moelora.ops.registration import apply_function
from moelora.modules.fields import LAYER_FIELD_KINDS, POSITIVE_INT, check_field, is_integral


# The check of Router's ``mode`` and of MoEFFN's ``router`` (check_field).
LEARNED_MODE_KIND = (lambda v: isinstance(v, str), lambda v: v in LEARNED_MODES, f"one of {LEARNED_MODES}")

# Router argument -> the layer field it is (LAYER_FIELD_KINDS: the same check under Router's name).
ROUTER_ARG_FIELDS = {"num_experts": "num_experts", "top_k": "top_k", "renormalize": "router_renormalize",
                     "jitter_noise": "router_jitter_noise", "eps_start": "threshold_eps_start",
                     "eps_end": "threshold_eps", "eps_ramp_steps": "threshold_ramp_steps"}


class Router(nn.Linear):
    """The learned gate: an ``nn.Linear(d_in, E, bias=False)`` whose logits are computed in
    fp32, plus the routing mode, top-k, jitter noise and the threshold schedule.

    Args:
        in_features: d_in, the width of x (an int >= 1).
        num_experts: E, the gate's output width (an int >= 1).
        top_k: experts per token, in [1, num_experts] (threshold routing: the most it keeps).
        mode: "softmax_topk", "topk_softmax" or "threshold" (moelora.ops.routing_modes; the
            layers' ``router``, task routing aside).
        renormalize: divide the kept softmax probabilities by their sum ("softmax_topk"; the
            layers' ``router_renormalize``).
        jitter_noise: multiplicative U(1 - j, 1 + j) noise on x in training, a finite number >= 0.
        eps_start, eps_end, eps_ramp_steps: threshold routing's ``eps`` (finite numbers >= 0)
            goes linearly from ``eps_start`` to ``eps_end`` (up or down) over ``eps_ramp_steps`` (an int >= 0;
            0: ``eps_end`` throughout) calls of :meth:`step` (``moelora.step_routers(model)``), then is
            ``eps_end`` exactly.
        device: where the weight and the step counter live (the weight is made in fp32; ``.half()`` or
            ``.to(dtype)`` convert it as any parameter, and the logits stay fp32).
        top1_advice: the end of the warning at top_k 1 with a renormalised gate ("softmax_topk" with
            ``renormalize``, "topk_softmax", "threshold": every gate is 1, so the router learns from the aux
            losses alone): what the module holding it offers instead.

    The arguments are checked as the layers' same fields (``ROUTER_ARG_FIELDS``: ``jitter_noise``
    as ``router_jitter_noise``, ``eps_end`` as ``threshold_eps``, ...), the errors naming Router's.
    """

    def __init__(self, in_features: int, num_experts: int, top_k: int, mode: str = "softmax_topk",
                 renormalize: bool = True, jitter_noise: float = 0.0, eps_start: float = 0.0,
                 eps_end: float = 0.0, eps_ramp_steps: int = 0, device=None, *,
                 top1_advice: str = "Switch Transformers' top-1 router is router='softmax_topk' with "
                                    "router_renormalize=False"):
        check_field("in_features", in_features, POSITIVE_INT)
        check_field("mode", mode, LEARNED_MODE_KIND)
        given = dict(num_experts=num_experts, top_k=top_k, renormalize=renormalize, jitter_noise=jitter_noise,
                     eps_start=eps_start, eps_end=eps_end, eps_ramp_steps=eps_ramp_steps)
        for name, field in ROUTER_ARG_FIELDS.items():
            check_field(name, given[name], LAYER_FIELD_KINDS[field])
        check_top_k(top_k, num_experts)
        # threshold routing renormalises its kept gates, and "topk_softmax"'s softmax over k, whatever renormalize
        if top_k == 1 and num_experts > 1 and (renormalize or mode != "softmax_topk"):
            warnings.warn(f"router={mode!r} with top_k=1 and a renormalised gate: every token's gate is 1, so the "
                          f"router learns from the aux losses alone, never from the task loss; {top1_advice}",
                          stacklevel=2)
        super().__init__(in_features, num_experts, bias=False, device=device, dtype=torch.float32)
        self.mode, self.top_k, self.renormalize = mode, top_k, renormalize
        self.jitter_noise = jitter_noise
        self.eps_start, self.eps_end, self.eps_ramp_steps = float(eps_start), float(eps_end), int(eps_ramp_steps)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long, device=device), persistent=True)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the router as its constructor does: ``weight`` as nn.Linear's (kaiming-uniform,
        the same draws), the threshold schedule's step counter ``num_steps`` at 0 (meta-device init:
        ``to_empty`` leaves both uninitialised). nn.Linear's constructor calls this before the
        counter exists."""
        super().reset_parameters()
        if "num_steps" in self._buffers:
            self.num_steps.zero_()

    @property
    def num_experts(self) -> int:
        """E, the gate's output width."""
        return self.out_features

    @property
    def eps(self) -> float:
        """The current eps, read on the host (for logging; forward uses :meth:`scheduled_eps`): eps_end
        exactly from the end of the ramp on (``eps_start + (eps_end - eps_start) * 1`` may round past it)."""
        steps = int(self.num_steps)
        if self.eps_ramp_steps <= 0 or steps >= self.eps_ramp_steps:
            return self.eps_end
        return self.eps_start + (self.eps_end - self.eps_start) * (steps / self.eps_ramp_steps)

    def scheduled_eps(self) -> Union[float, torch.Tensor]:
        """eps for this forward: a float without a ramp, else a 0-d tensor computed from the
        step buffer on its device, so torch.compile and CUDA graphs see no host read."""
        return scheduled_eps(self.eps_start, self.eps_end, self.eps_ramp_steps, self.num_steps)

    def step(self, n: int = 1) -> None:
        """Advance the threshold eps schedule by ``n`` optimiser steps, on the device (see
        :func:`moelora.step_routers`)."""
        self.num_steps += check_steps(n)

    @property
    def jitters(self) -> bool:
        """Whether the router input is jittered in this forward (training with jitter noise)."""
        return self.training and self.jitter_noise > 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, E] logits of x [..., d_in] in fp32 (fp64 for fp64 x), jittered in training. Where the
        Triton kernels run (eager, no jitter) one kernel reads x in its own dtype and
        accumulates in fp32 (:class:`_RouterLogitsFn`): no fp32 copy of x, none saved. x of
        another width or a non-float dtype raises, naming it (the kernel would read it with x's width)."""
        weight = self.weight
        check_module_input(x, self.in_features, weight)
        x = x.reshape(-1, x.shape[-1])
        if not self.jitters and kernels_run(x.device) and not torch.compiler.is_compiling():
            return apply_function(_RouterLogitsFn, x, weight)
        return linear_logits(x, weight, self.jitter_factors(x) if self.jitters else None)

    def jitter_factors(self, x: torch.Tensor) -> torch.Tensor:
        """The multiplicative noise of the router input x: U(1 - jitter_noise, 1 + jitter_noise) per
        element, x's shape, drawn in fp32 whatever x's dtype and the default dtype (the same noise for
        the same seed)."""
        return torch.empty(x.shape, dtype=torch.float32, device=x.device).uniform_(1.0 - self.jitter_noise,
                                                                                   1.0 + self.jitter_noise)

    def threshold_noise(self, num_tokens: int, device) -> Optional[torch.Tensor]:
        """The uniform draws of threshold routing in training, [T, top_k] in fp32 whatever the default
        dtype (None when not needed)."""
        if self.mode != "threshold" or not self.training or (self.eps_ramp_steps <= 0 and self.eps_end <= 0):
            return None
        return torch.rand((num_tokens, self.top_k), dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        return route_logits(logits, self.mode, self.top_k, self.renormalize, self.scheduled_eps(),
                            self.threshold_noise(logits.shape[0], logits.device))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, top_k={self.top_k}"


class _RouterLogitsFn(torch.autograd.Function):
    """logits = x W^T [T, E] in x's accumulator dtype from x in its own dtype (launchers.lora_down's
    router part; W of any float dtype); backward dx = dl W and dW = dl^T x, both multiplied in
    the accumulator dtype as the fp32 linear layer they replace (Triton matmuls, fixed order)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return launchers.lora_down(x, None, weight)[1]

    @staticmethod
    def backward(ctx, dl):
        refuse_double_backward("the router")
        x, weight = ctx.saved_tensors
        acc = dl.dtype
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            dx = launchers.matmul(dl, weight, out_dtype=x.dtype, compute_dtype=acc)
        if ctx.needs_input_grad[1]:
            dweight = launchers.matmul(dl.t(), x, out_dtype=weight.dtype, compute_dtype=acc, split_k=True)
        return dx, dweight


# The most steps one call of Router.step may add: the int64 counter would need 2**31 such calls to wrap around
# (to a negative count, an eps past eps_start).
MAX_STEPS_PER_CALL = 2 ** 32


def check_steps(n) -> int:
    """``n`` as a number of optimiser steps: an integer (a numpy one too) in [0, MAX_STEPS_PER_CALL], else a
    ValueError naming it (a float or a bool would count wrongly, a negative one rewind the ramp, a huge one
    wrap the int64 counter around)."""
    if not is_integral(n) or not 0 <= n <= MAX_STEPS_PER_CALL:
        raise ValueError(f"n must be a non-negative int (optimiser steps) of at most 2**32, got {n!r}")
    return int(n)
