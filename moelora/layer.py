"""``MoELoRALinear``: a frozen linear layer plus a routed mixture of LoRA experts.

    y = base_layer(x) + s * sum_j w[t,j] * lora_B[e[t,j]] @ (lora_A[(e[t,j])] @ dropout(x[t]))

s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). Routing (see :mod:`moelora.routers`) comes
from a learned ``router`` (fp32 weights; moelora's routing op) or, for task routing, from the
task ids given with the batch and the per-task scales ``lora_gamma``. With one expert and no
task routing there is no router: every token uses expert 0 with weight 1, and the layer is
PEFT's LoRA layer (optionally DoRA).

The forward is one fused op, :func:`moelora.fused_linear.moe_lora_linear`, which owns the
base GEMM (x read once for the LoRA down-projection and the router logits; dx accumulated in
one GEMM; see that module). It takes every feature except these, which run the composed path
(base layer, then :func:`moelora.moe_lora` with ``base_out``): DoRA, base layers other than a
plain ``nn.Linear`` / GPT-2 ``Conv1D`` (subclasses, quantised layers) or with forward hooks,
extra forward arguments, and layers whose E*r calls for moe_lora's grouped regime. Router
jitter and LoRA dropout keep the fused op but cost a separate router GEMM over the jittered
x, resp. the dropped-out copy of x (see README).

Parameter layouts follow PEFT / nn.Linear: ``lora_A`` [r, d_in] (shared A, MoSLD) or
[E, r, d_in]; ``lora_B`` [E, d_out, r]; ``router.weight`` [E, d_in]. With task routing and a
shared LoRA, expert E (the last) is the shared LoRA, used by every token with weight 1.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ._triton_ops import choose_regime
from .functional import moe_lora
from .fused_linear import RouterSpec, moe_lora_linear
from .losses import RoutedModule
from .routers import ROUTER_MODES, Router, Routing, task_routing
from ._validation import check_top_k


_SINGLE = {}


def single_expert_routing(num_tokens: int, device: torch.device):
    """ids 0 and weights 1 for every token ([T, 1] stride-0 views of cached scalars)."""
    pair = _SINGLE.get(device)
    if pair is None:
        pair = _SINGLE[device] = (torch.zeros(1, 1, dtype=torch.int32, device=device),
                                  torch.ones(1, 1, dtype=torch.float32, device=device))
    return pair[0].expand(num_tokens, 1), pair[1].expand(num_tokens, 1)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer storing its weight as [d_in, d_out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def linear_dims(module: nn.Module):
    """(d_in, d_out, fan_in_fan_out) of an nn.Linear or a transformers Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return d_in, d_out, True
    hint = ("; use moelora.MoELoRAEmbedding for nn.Embedding" if isinstance(module, nn.Embedding) else
            "; use moelora.MoELoRAConv for convolutions" if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            else "")
    raise TypeError(f"MoELoRALinear wraps nn.Linear or transformers Conv1D layers, got {type(module).__name__}{hint}")


class MoELoRALinear(nn.Module, RoutedModule):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) with a mixture of LoRA experts.

    Args:
        base_layer: the frozen layer; its parameters are not touched.
        num_experts: E (the number of tasks for ``router="task"``).
        top_k: experts per token (ignored for task routing, which uses 1).
        r, lora_alpha, use_rslora, lora_dropout, init_lora_weights, use_dora: as PEFT's
            LoraConfig (``init_lora_weights``: True = kaiming-uniform A, "gaussian" =
            N(0, 1/r) A, both with B = 0; False = random B too). DoRA needs E = 1.
        share_lora_a: one A [r, d_in] shared by all experts (MoSLD).
        lora_a_dropout: MoSLD's Bernoulli dropout on A's weights (training only, kept weights
            rescaled by 1/(1-p)).
        router: "softmax_topk", "topk_softmax", "threshold" or "task".
        router_renormalize: renormalise the kept top-k probabilities ("softmax_topk").
        router_jitter_noise: multiplicative U(1-j, 1+j) noise on the router input in training.
        threshold_eps, threshold_eps_start, threshold_ramp_steps: the eps schedule of
            threshold routing.
        task_shared_lora: task routing with a shared LoRA beside the task experts.
        router_aux_loss_coef, router_z_loss_coef: weights of the load-balancing and z losses.
    """

    def __init__(self, base_layer: nn.Module, num_experts: int = 4, top_k: int = 2, r: int = 8,
                 lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
                 share_lora_a: bool = False, lora_a_dropout: float = 0.0, router: str = "softmax_topk",
                 router_renormalize: bool = True, router_jitter_noise: float = 0.0,
                 threshold_eps: float = 0.0, threshold_eps_start: float = 0.0, threshold_ramp_steps: int = 0,
                 task_shared_lora: bool = False, init_lora_weights: Union[bool, str] = True,
                 use_dora: bool = False, router_aux_loss_coef: float = 0.01, router_z_loss_coef: float = 0.001):
        super().__init__()
        d_in, d_out, self.fan_in_fan_out = linear_dims(base_layer)
        check_layer_args(num_experts, top_k, r, lora_dropout, lora_a_dropout, router, init_lora_weights,
                         use_dora, task_shared_lora)
        self.base_layer = base_layer
        self.in_features, self.out_features = d_in, d_out
        self.num_experts, self.r, self.lora_alpha, self.use_rslora = num_experts, r, lora_alpha, use_rslora
        self.router_mode = router
        self.top_k = 1 if router == "task" or num_experts == 1 else top_k
        self.share_lora_a, self.lora_a_dropout = share_lora_a, lora_a_dropout
        self.task_shared_lora = task_shared_lora
        self.use_dora = use_dora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.aux_loss_coef, self.z_loss_coef = router_aux_loss_coef, router_z_loss_coef
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.merged_task: Optional[int] = None
        self.disable_adapters = False
        self.task_ids = None  # task routing: the ids of the next forwards (moelora.set_task_ids sets them)
        self._clear_routing_record()

        weight = base_layer.weight
        # As PEFT (autocast_adapter_dtype): half-precision bases get fp32 adapters.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = dict(device=weight.device, dtype=dtype)
        n_lora = num_experts + (1 if task_shared_lora else 0)
        self.lora_A = nn.Parameter(torch.empty((r, d_in) if share_lora_a else (n_lora, r, d_in), **factory))
        self.lora_B = nn.Parameter(torch.empty(n_lora, d_out, r, **factory))
        if router == "task":
            self.router = None
            self.lora_gamma = nn.Parameter(torch.zeros(num_experts, **factory))
        elif num_experts > 1:
            self.router = Router(d_in, num_experts, top_k, router, router_renormalize, router_jitter_noise,
                                 threshold_eps_start, threshold_eps, threshold_ramp_steps, device=weight.device)
        else:
            self.router = None
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(d_out, **factory))
        self.reset_lora_parameters(init_lora_weights)

    # ----------------------------------------------------------------------------- init
    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        a_slices = [self.lora_A] if self.share_lora_a else list(self.lora_A)
        for a in a_slices:
            if init_lora_weights == "gaussian":
                nn.init.normal_(a, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_lora_weights is False or self.router_mode == "task":
            # Task experts are gated by gamma = 0 at init, so B may (and must, for gamma to
            # receive a gradient) start non-zero.
            for b in self.lora_B:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            self.lora_B.zero_()
        if self.task_shared_lora and init_lora_weights is not False:
            self.lora_B[-1].zero_()
        if self.use_dora:
            self.lora_magnitude_vector.copy_(self._weight_norm(self.base_weight().to(self.lora_B.dtype)))

    # ----------------------------------------------------------------------------- helpers
    def base_weight(self) -> torch.Tensor:
        """The base weight in nn.Linear layout [d_out, d_in] (a view; Conv1D transposed)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.scaling * self.lora_B[0] @ self.expert_A(0)
        return torch.linalg.norm(weight + delta, dim=1)

    def expert_A(self, e: int) -> torch.Tensor:
        return self.lora_A if self.share_lora_a else self.lora_A[e]

    def _effective_A(self) -> torch.Tensor:
        a = self.lora_A
        if self.training and self.lora_a_dropout > 0:
            # drawn in fp32 whatever A's dtype: the same mask for the same seed on every device
            keep = torch.empty(a.shape, device=a.device).bernoulli_(1.0 - self.lora_a_dropout).to(a.dtype)
            a = a * keep / (1.0 - self.lora_a_dropout)
        return a

    def route(self, x: torch.Tensor) -> Routing:
        """Routing for input x [..., d_in]; records the aux losses of learned routers."""
        router, ids, weights = self._routing_inputs(x)
        if router is None:
            return Routing(weights, ids)
        routing = self.router(x)
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
        if self.router is None:
            ids, weights = single_expert_routing(num_tokens, x.device)
            return None, ids, weights
        r = self.router
        logits = r.logits(x.reshape(num_tokens, x.shape[-1])) if r.jitters else None
        spec = RouterSpec(None if r.jitters else r.weight, logits, r.mode, r.top_k, r.renormalize, r.eps_start,
                          r.eps_end, r.eps_ramp_steps, r.num_steps, r.threshold_noise(num_tokens, x.device),
                          self.aux_loss_coef, self.z_loss_coef)
        return spec, None, None

    def _fusable(self, args, kwargs) -> bool:
        """Whether the fused op may replace base_layer(x): a plain Linear / Conv1D, no hooks, no extra
        arguments, and experts few enough for the dense regime (E*r small: see moelora._triton_ops)."""
        base = self.base_layer
        return (not args and not kwargs and not self.use_dora and (type(base) is nn.Linear or is_conv1d(base))
                and not base._forward_hooks and not base._forward_pre_hooks
                and not _global_forward_hooks and not _global_forward_pre_hooks
                and choose_regime(self.lora_B.shape[0], self.r, self.top_k) == "dense")

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        if not self._fusable(args, kwargs):
            return self._composed_forward(x, *args, **kwargs)
        router, ids, weights = self._routing_inputs(x)
        lora_input = None if isinstance(self.lora_dropout, nn.Identity) or not self.training else self.lora_dropout(x)
        y, out = moe_lora_linear(x, self.base_weight(), self.base_layer.bias, self._effective_A(), self.lora_B,
                                 scaling=self.scaling, router=router, topk_ids=ids, topk_weights=weights,
                                 lora_input=lora_input)
        if out.aux_loss is not None:
            self._record_routing(out.routing, out.aux_loss, out.aux_stats)
        return y

    def _composed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """base_layer(x, ...) + moelora.moe_lora (DoRA, custom base layers, extra arguments)."""
        result = self.base_layer(x, *args, **kwargs)
        routing = self.route(x)
        dtype = self.lora_B.dtype
        x_lora = self.lora_dropout(x.to(dtype))
        lora_a = self._effective_A()
        if self.use_dora:
            return self._dora_forward(x_lora, lora_a, routing, result)
        out = moe_lora(x_lora, lora_a, self.lora_B, routing.ids, routing.weights, scaling=self.scaling,
                       base_out=result.to(dtype))
        return out.to(result.dtype)

    def _dora_forward(self, x_lora, lora_a, routing, result):
        """PEFT's DoRA (single expert): the column norm of W + s*B@A is a constant."""
        dtype = self.lora_B.dtype
        weight = self.base_weight().to(dtype)
        a0 = lora_a if self.share_lora_a else lora_a[0]
        norm = torch.linalg.norm(weight + self.scaling * (self.lora_B[0] @ a0).detach(), dim=1).detach()
        mag_scale = self.lora_magnitude_vector / norm
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_no_bias = result.to(dtype) - (bias.to(dtype) if bias is not None else 0)
        else:
            base_no_bias = F.linear(x_lora, weight)
        lora_out = moe_lora(x_lora, lora_a, self.lora_B, routing.ids, routing.weights, scaling=self.scaling)
        out = result.to(dtype) + (mag_scale - 1) * base_no_bias + mag_scale * lora_out
        return out.to(result.dtype)

    # ----------------------------------------------------------------------------- merge
    # Only static routing merges: a single expert (plain LoRA or DoRA), or task routing with the
    # task fixed at merge time. dW = s * gamma[task] * B[task] @ A[task] (+ s * B[shared] @
    # A[shared] with a shared LoRA); E = 1: dW = s * B[0] @ A[0]. DoRA merges
    # W' = m / ||W + dW||_row * (W + dW) and keeps the norm to unmerge. A merged layer returns
    # base_layer(x) until it is unmerged.
    def static_lora_factors(self, task: Optional[int] = None):
        """(A [r', d_in], B [d_out, r']) with scaling * B @ A = the static adapter's weight delta
        (r' = 2r for a task with the shared LoRA); ValueError for a learned router."""
        if self.router is not None:
            raise ValueError(
                "only static routing folds into one weight delta (merge, PEFT export): num_experts=1, or task "
                f"routing with a chosen task; this layer's router depends on the input ({self.router_mode!r} "
                f"over {self.num_experts} experts)")
        if self.router_mode != "task":
            return self.expert_A(0), self.lora_B[0]
        if task is None or not 0 <= task < self.num_experts:
            raise ValueError(f"a task-routed layer needs task in [0, {self.num_experts}), got {task!r}")
        a, b = self.expert_A(task), self.lora_gamma[task] * self.lora_B[task]
        if self.task_shared_lora:
            a = torch.cat([a, self.expert_A(self.num_experts)], dim=0)
            b = torch.cat([b, self.lora_B[-1]], dim=1)
        return a, b

    def delta_weight(self, task: Optional[int] = None) -> torch.Tensor:
        """The static adapter's weight delta in nn.Linear layout [d_out, d_in] (see above)."""
        a, b = self.static_lora_factors(task)
        return self.scaling * (b @ a)

    @torch.no_grad()
    def merge(self, task: Optional[int] = None) -> None:
        """Fold the adapter into the base weight (static routing only; see above)."""
        if self.merged:
            raise RuntimeError("the layer is already merged; unmerge it first")
        weight = self.base_layer.weight
        w = self.base_weight()  # view in [d_out, d_in] layout, writes go to the base weight
        delta = self.delta_weight(task).to(torch.float32)
        if self.use_dora:
            merged = w.float() + delta
            self._dora_merge_scale = (self.lora_magnitude_vector.float() / torch.linalg.norm(merged, dim=1)).detach()
            self._dora_merged_delta = delta
            w.copy_((merged * self._dora_merge_scale[:, None]).to(weight.dtype))
        else:
            w.copy_((w.float() + delta).to(weight.dtype))
        self.merged, self.merged_task = True, task

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("the layer is not merged")
        weight = self.base_layer.weight
        w = self.base_weight()
        if self.use_dora:
            restored = w.float() / self._dora_merge_scale[:, None] - self._dora_merged_delta
            del self._dora_merge_scale, self._dora_merged_delta
        else:
            restored = w.float() - self.delta_weight(self.merged_task).float()
        w.copy_(restored.to(weight.dtype))
        self.merged, self.merged_task = False, None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, r={self.r}, router={self.router_mode}, share_lora_a={self.share_lora_a}")


def check_layer_args(num_experts, top_k, r, lora_dropout, lora_a_dropout, router, init_lora_weights,
                     use_dora, task_shared_lora) -> None:
    """Clear errors for impossible layer settings."""
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if router not in ROUTER_MODES:
        raise ValueError(f"router must be one of {ROUTER_MODES}, got {router!r}")
    if router != "task" and num_experts > 1:
        check_top_k(top_k, num_experts)
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    for name, p in (("lora_dropout", lora_dropout), ("lora_a_dropout", lora_a_dropout)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p}")
    if init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
    if use_dora and (num_experts != 1 or router == "task"):
        raise ValueError("use_dora needs a single expert without task routing (num_experts=1)")
    if task_shared_lora and router != "task":
        raise ValueError("task_shared_lora needs router='task'")
