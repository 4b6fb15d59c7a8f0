"""``MoELoRALinear``: a frozen linear layer plus a routed mixture of LoRA experts.

    y = base_layer(x) + s * sum_j w[t,j] * lora_B[e[t,j]] @ (lora_A[(e[t,j])] @ dropout(x[t]))

s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). Routing (see :mod:`moelora.ops.routing_modes`) comes
from a learned ``router`` (fp32 weights; moelora's routing op) or, for task routing, from the
task ids given with the batch and the per-task scales ``lora_gamma``. With one expert and no
task routing there is no router: every token uses expert 0 with weight 1, and the layer is
PEFT's LoRA layer (optionally DoRA).

The forward is one fused op, :func:`moelora.ops.moe_lora_linear.moe_lora_linear` (without its
argument checks: unchecked_moe_lora_linear), which owns the base GEMM (x read once for the LoRA
down-projection and the router logits; dx accumulated in one GEMM; see that module), in
moelora.moe_lora's dense or grouped regime (large E*r). It
takes every feature except these, which run the composed path (base layer, then
:func:`moelora.moe_lora` with ``base_out``): base layers other than a plain ``nn.Linear`` /
GPT-2 ``Conv1D`` holding a plain weight (subclasses, quantised layers: bitsandbytes' layers, and
torchao's, whose weight is a tensor subclass; parametrized weights) or with forward or backward
hooks (registered, or a ``forward`` set on the instance, as accelerate's device_map / offloading
hooks do; the fused op never calls the base layer, so its hooks would not run), extra forward
arguments, and DoRA with LoRA dropout in training (PEFT's DoRA then scales a second base GEMM
over the dropped-out x). LoRA dropout's keep mask and router jitter's factors are read by the
op's kernels beside x; DoRA otherwise scales the fused op's output by its magnitude, and
MoSLD's A-dropout passes A (.) M with the dropout's scale folded into s (see README).

Parameter layouts follow PEFT / nn.Linear: ``lora_A`` [r, d_in] (shared A, MoSLD) or
[E, r, d_in]; ``lora_B`` [E, d_out, r]; ``router.weight`` [E, d_in]. With task routing and a
shared LoRA, expert E (the last) is the shared LoRA, used by every token with weight 1.
"""

from __future__ import annotations

import math
import types
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.nn.modules.module import (_global_backward_hooks, _global_backward_pre_hooks, _global_forward_hooks,
                                     _global_forward_pre_hooks)

from moelora.ops.backend import autocast_dtype, autocast_input, without_autocast
from moelora.ops.moe_lora_linear import RouterSpec, lora_dropout_mask, unchecked_moe_lora_linear
from moelora.modules.adapter_base import (PLAIN_TENSORS, AdapterLayerBase, LayerSettings, layer_settings,
                                          refuse_tensor_parallel_shards, single_expert_routing)
from moelora.ops.routing_modes import Routing, task_routing
from moelora.ops.validation import check_module_input


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer storing its weight as [d_in, d_out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


# nn.Linear subclasses whose own forward computes x W^T + b, nn.Linear's function, written out (merging into them
# gives their unmerged output): transformers' Falcon projections.
AFFINE_LINEAR_FORWARDS = {("transformers.models.falcon.modeling_falcon", "FalconLinear")}


def computes_affine(module: nn.Module) -> bool:
    """Whether ``module``'s forward is x W^T + b: nn.Linear's, GPT-2 Conv1D's, or one in AFFINE_LINEAR_FORWARDS."""
    cls = type(module)
    return (is_conv1d(module) or cls.forward is nn.Linear.forward
            or (isinstance(module, nn.Linear) and (cls.__module__, cls.__qualname__) in AFFINE_LINEAR_FORWARDS))


def linear_dims(module: nn.Module, role: str = "MoELoRALinear wraps"):
    """(d_in, d_out, fan_in_fan_out) of an nn.Linear or a transformers Conv1D; for any other
    module a TypeError that starts with ``role``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return d_in, d_out, True
    hint = ("; use moelora.MoELoRAEmbedding for nn.Embedding" if isinstance(module, nn.Embedding) else
            "; use moelora.MoELoRAConv for convolutions" if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            else "")
    raise TypeError(f"{role} nn.Linear or transformers Conv1D layers, got {type(module).__name__}{hint}")


def linear_weight(module: nn.Module, role: str = "MoELoRALinear wraps") -> torch.Tensor:
    """The weight of an nn.Linear or transformers Conv1D in nn.Linear layout [d_out, d_in] (a view)."""
    return module.weight.t() if linear_dims(module, role)[2] else module.weight


class MoELoRALinear(AdapterLayerBase):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) with a mixture of LoRA experts.

    Args (the fields of :class:`LayerSettings`, given as ``settings`` or one by one; defaults
    in brackets):
        base_layer: the frozen layer; its parameters are not touched.
        num_experts: E, an int >= 1 [4] (the number of tasks for ``router="task"``).
        top_k: experts per token, in [1, E] [2] (ignored for task routing, which uses 1, and at E = 1).
        r, lora_alpha, use_rslora, lora_dropout, init_lora_weights, use_dora: as PEFT's
            LoraConfig (r an int >= 1 [8], lora_alpha a finite number [8], lora_dropout in [0, 1)
            [0.0], use_rslora [False], use_dora [False]; ``init_lora_weights`` [True]: True =
            kaiming-uniform A, "gaussian" = N(0, 1/r) A, both with B = 0; False = random B too).
            DoRA needs E = 1. LoRA dropout draws a bool keep mask (``bernoulli_``, kept elements
            scaled by 1/(1-p)) that the fused kernels read beside x: PEFT's distribution, not its
            random stream.
        share_lora_a: one A [r, d_in] shared by all experts (MoSLD) [False].
        lora_a_dropout: MoSLD's Bernoulli dropout on A's weights, in [0, 1) [0.0] (training only,
            kept weights rescaled by 1/(1-p)).
        router: "softmax_topk" [default], "topk_softmax", "threshold" or "task".
        router_renormalize: renormalise the kept top-k probabilities ("softmax_topk") [True].
        router_jitter_noise: multiplicative U(1-j, 1+j) noise on the router input in training, a
            finite number >= 0 [0.0].
        threshold_eps, threshold_eps_start, threshold_ramp_steps: the eps schedule of
            threshold routing (finite numbers >= 0 [0.0]; the ramp an int >= 0 [0]): as
            :class:`moelora.Router`'s eps_end, eps_start and eps_ramp_steps.
        task_shared_lora: task routing with a shared LoRA beside the task experts [False].
        router_aux_loss_coef, router_z_loss_coef: weights of the load-balancing and z losses
            (finite numbers >= 0) [0.01, 0.001].
    """

    supports_dora = True
    uses_selector = False

    def __init__(self, base_layer: nn.Module, settings: Optional[LayerSettings] = None, **kwargs):
        """``settings`` (:class:`LayerSettings`) or its fields as keyword arguments (above)."""
        d_in, d_out, _ = linear_dims(base_layer)  # a clear error for other base layers, first
        super().__init__(base_layer, layer_settings(settings, kwargs), a_in=d_in, d_out=d_out, router_in=d_in)

    def _add_parameters(self, factory: dict) -> None:
        d_in, d_out, self.fan_in_fan_out = linear_dims(self.base_layer)
        self.in_features, self.out_features = d_in, d_out
        p = self.settings.lora_dropout
        self.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(d_out, **factory))

    def _init_lora(self, init_lora_weights: Union[bool, str]) -> None:
        """As every MoE-LoRA layer's (PEFT's init); DoRA's magnitude then starts at the row norms of
        W + s B A, as PEFT's, W the base weight as it is now: after meta-device init, reset (or load)
        the base layer first (``model.apply`` visits children first; a loop over ``model.modules()``
        visits this layer before its base layer). A layer of an inactive adapter holds no base layer
        (moelora.tuner.adapters.DetachedBase): its magnitude is left as it is (reset the layer after
        ``set_adapter``)."""
        super()._init_lora(init_lora_weights)
        if self.use_dora and hasattr(self.base_layer, "weight"):
            self.lora_magnitude_vector.copy_(self._dora_norm(self.base_weight(), self.lora_A, self.scaling))

    weight_function = "x W^T + b, as nn.Linear"

    def forward_is_weight_function(self, base: nn.Module) -> bool:
        """Whether ``base`` computes x W^T + b (nn.Linear's or Conv1D's forward, or Falcon's FalconLinear:
        :func:`computes_affine`), the function a merged weight gives."""
        return computes_affine(base)

    # ----------------------------------------------------------------------------- helpers
    def base_weight(self, base: Optional[nn.Module] = None) -> torch.Tensor:
        """The base weight in nn.Linear layout [d_out, d_in] (a view; Conv1D transposed); ``base``:
        the base layer, when the caller holds it already."""
        w = (base if base is not None else self.base_layer).weight  # linear_weight's rule, layout found at init
        return w.t() if self.fan_in_fan_out else w

    def compute_routing(self, x: torch.Tensor) -> Routing:
        """The routing of input x [..., d_in] (ids and gates per token; ``moelora.route`` is the
        routing op on logits); records the aux losses of learned routers. A learned router draws
        its random numbers (jitter, threshold sampling) once, in its own forward."""
        router = self.router
        if router is None:  # static routing: task ids or the single expert
            _, ids, weights = self._routing_inputs(x)
            return Routing(weights, ids)
        routing = router(x)
        self._record_routing(routing)
        return routing

    def _routing_inputs(self, x: torch.Tensor):
        """(RouterSpec, None, None) for a learned router, else (None, ids, weights) of static routing,
        for the T tokens of x [..., d_in] (routing tensors are [T, ...])."""
        lead = tuple(x.shape[:-1])
        num_tokens = math.prod(lead)
        if self.router_mode == "task":
            if self.task_ids is None:
                raise RuntimeError(
                    "this MoELoRALinear routes by task id but none is set: call "
                    "moelora.set_task_ids(model, ids), use `with moelora.use_task_ids(model, ids):`, or pass "
                    "task_ids=... to the MoELoRAModel's forward")
            shared = self.num_experts if self.task_shared_lora else None
            routing = task_routing(self.task_ids, self.lora_gamma, lead, shared)
            return None, routing.ids, routing.weights
        r = self.router
        if r is None:
            ids, weights = single_expert_routing(num_tokens, x.device)
            return None, ids, weights
        threshold = r.mode == "threshold"
        # drawn in Router.forward's order (the composed path's): jitter factors, then threshold noise
        jitter = r.jitter_factors(x) if r.jitters else None
        spec = RouterSpec(r.weight, None, r.mode, r.top_k, r.renormalize, r.eps_start, r.eps_end, r.eps_ramp_steps,
                          r.num_steps if threshold else None,
                          r.threshold_noise(num_tokens, x.device) if threshold else None,
                          self.aux_loss_coef, self.z_loss_coef, jitter,
                          self.aux_loss_mask_of(num_tokens, x.device) if "_aux_loss_mask" in self.__dict__ else None)
        return spec, None, None

    def _fusable(self, base: nn.Module, args, kwargs) -> bool:
        """Whether the fused op may replace base_layer(x): a plain Linear / Conv1D holding a plain weight
        (not a tensor subclass, as torchao's quantised weights, which implement F.linear but not the
        op's GEMMs; read from ``_parameters``, a dict, not through nn.Module's ``__getattr__``), no forward or
        backward hooks, the base layer's or global ones (the op never calls the base layer, whose
        hooks would then not run), nor a forward of its own (accelerate's hooks, as device_map
        dispatch and offloading install them, replace the instance's ``forward``), no extra
        arguments, no DoRA with LoRA dropout in training (PEFT's DoRA then scales a second base
        GEMM over the dropped-out x). Any number of experts: the op runs moelora.moe_lora's dense
        or grouped regime. The instance's own ``forward`` is found by reading ``base.forward`` (the
        class's bound method, or what was set): torch.compile guards that read, and so compiles
        again when a forward is set after compilation, but not a test of ``base.__dict__``."""
        forward = base.forward
        return (not args and not kwargs and (type(base) is nn.Linear or is_conv1d(base))
                and type(base._parameters.get("weight")) in PLAIN_TENSORS
                and not (self.use_dora and self.training and not isinstance(self.lora_dropout, nn.Identity))
                and not base._forward_hooks and not base._forward_pre_hooks
                and type(forward) is types.MethodType and forward.__func__ is type(base).forward
                and not base._backward_hooks and not base._backward_pre_hooks
                and not _global_forward_hooks and not _global_forward_pre_hooks
                and not _global_backward_hooks and not _global_backward_pre_hooks)

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Each submodule and parameter is read once: a read through nn.Module.__getattr__ costs
        # about a microsecond of host time, which this path pays on every call.
        base = self.base_layer
        if self.disable_adapters or self.merged:
            return base(x, *args, **kwargs)
        if not self._fusable(base, args, kwargs):
            return self._composed_forward(x, *args, **kwargs)
        weight = self.base_weight(base)
        # the base layer's errors, which the fused op never calls it for
        check_module_input(x, self.in_features, weight)
        router, ids, weights = self._routing_inputs(x)
        dropout = self.lora_dropout
        # LoRA dropout as a keep mask that the op's kernels read beside x (x_lora is never formed)
        mask, keep_scale = ((None, 1.0) if isinstance(dropout, nn.Identity) or not self.training
                            else lora_dropout_mask(x, dropout.p))
        lora_a, a_scale = self._effective_A()
        if self.use_dora:
            return self._fused_dora_forward(x, base, weight, lora_a, self.scaling * a_scale, ids, weights)
        y, out = unchecked_moe_lora_linear(x, weight, base.bias, lora_a, self.lora_B,
                                           scaling=self.scaling * a_scale, router=router, topk_ids=ids,
                                           topk_weights=weights, dropout_mask=mask, dropout_scale=keep_scale)
        if out.aux_loss is not None:
            self._record_routing(out.routing, out.aux_loss, out.aux_stats)
        return y

    def _composed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """base_layer(x, ...) + moelora.moe_lora (DoRA, custom base layers, extra arguments). Under
        torch.autocast the router reads x in autocast's dtype, as the fused op's (which reads x once)."""
        result = self.base_layer(x, *args, **kwargs)
        if not isinstance(result, torch.Tensor):
            raise TypeError(
                f"the base layer {type(self.base_layer).__name__} returned a {type(result).__name__}, not a tensor: "
                "MoELoRALinear adds its adapter to the output of the linear layer it wraps, and a subclass whose "
                "forward returns something else (a mixture-of-experts router returning its routing, as "
                "transformers' PhiMoE and Llama-4 routers) cannot be adapted; leave it out (exclude_modules)")
        wrong_input, wrong_width = x.shape[-1] != self.in_features, result.shape[-1] != self.out_features
        wrong_output = wrong_width or result.shape[:-1] != x.shape[:-1]
        if wrong_input or wrong_output:
            refuse_tensor_parallel_shards(self, wrong_input, wrong_width, (1, 0) if self.fan_in_fan_out else (0, 1))
        if wrong_output:
            raise ValueError(
                f"the base layer {type(self.base_layer).__name__} returned an output of shape {tuple(result.shape)} "
                f"for an input of shape {tuple(x.shape)}, not [..., out_features={self.out_features}] as a linear "
                "layer: its forward is not x W^T + b (a grouped or block-diagonal projection, one concatenating "
                "more outputs), and the adapter's delta [..., out_features] cannot be added to it; leave it out "
                "(exclude_modules)")
        cast = autocast_dtype(x)
        routing = self.compute_routing(x if cast is None else autocast_input(x, cast))
        dtype = self.lora_B.dtype
        x_lora = self.lora_dropout(x.to(dtype))
        lora_a, a_scale = self._effective_A()
        scaling = self.scaling * a_scale
        if self.use_dora:
            return self._dora_forward(x_lora, lora_a, scaling, routing, result)
        out = self.routed_moe_lora(x_lora, lora_a, self.lora_B, routing, scaling, result.to(dtype))
        return out.to(result.dtype)

    def _fused_dora_forward(self, x, base, weight, lora_a, scaling, ids, weights):
        """PEFT's DoRA without LoRA dropout: m / ||W + s B A||_row (.) (x W^T + s B A x) + b, the
        parenthesis by the fused op (bias left out), the rest two elementwise ops (in the adapters'
        dtype, as the composed path) beside the norm's GEMM and reduction; ``weight`` the base weight
        (:meth:`base_weight`)."""
        y, _ = unchecked_moe_lora_linear(x, weight, None, lora_a, self.lora_B, scaling=scaling, topk_ids=ids,
                                         topk_weights=weights)
        mag_scale = self.lora_magnitude_vector / self._dora_norm(weight, lora_a, scaling)
        out = y * mag_scale  # (addcmul's backward would cost two more multiplications)
        return (out if base.bias is None else out + base.bias).to(y.dtype)  # x's, or autocast's

    def _dora_norm(self, weight: torch.Tensor, lora_a: torch.Tensor, scaling: float) -> torch.Tensor:
        """||W + s B A||_row in the adapters' dtype, a constant (no gradient flows through it, as in
        PEFT's DoRA, which detaches it; detached here too, as torch.no_grad leaves forward-mode AD's tangents:
        torch.func.jvp / jacfwd agree with grad / jacrev); s: ``scaling``, the layer's times A-dropout's scale."""
        a0 = lora_a if self.share_lora_a else lora_a[0]
        with torch.no_grad(), without_autocast(weight):  # under torch.autocast too (addmm would round W)
            return torch.linalg.norm(torch.addmm(weight.to(self.lora_B.dtype), self.lora_B[0], a0, alpha=scaling),
                                     dim=1).detach()

    def _dora_forward(self, x_lora, lora_a, scaling, routing, result):
        """PEFT's DoRA (single expert) with LoRA dropout in training: the column norm of W + s*B@A is
        a constant (s: ``scaling``, the layer's times A-dropout's scale) and the magnitude scales a
        base GEMM over the dropped-out x."""
        dtype = self.lora_B.dtype
        weight = self.base_weight().to(dtype)
        mag_scale = self.lora_magnitude_vector / self._dora_norm(weight, lora_a, scaling)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_no_bias = result.to(dtype) - (bias.to(dtype) if bias is not None else 0)
        else:
            base_no_bias = F.linear(x_lora, weight)
        lora_out = self.routed_moe_lora(x_lora, lora_a, self.lora_B, routing, scaling)
        # PEFT's result + (m - 1) * base + m * lora, written so that autograd saves one [T, d_out] tensor (base +
        # lora, for m's gradient), not base and lora both
        out = result.to(dtype) - base_no_bias + mag_scale * (base_no_bias + lora_out)
        return out.to(result.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, r={self.r}, router={self.router_mode}, share_lora_a={self.share_lora_a}")
