"""What the MoE-LoRA layers on nn.Embedding and nn.Conv1d/2d/3d share.

Both compute the LoRA down-projection with the base layer's own operation (a lookup into
A's columns, or a convolution with A as the kernel), giving h per output position: [T, r]
with a shared A, [T, E*r] with per-expert A. The rest is the MoE-LoRA operator on h:

    y[t] = base[t] + s * sum_j w[t,j] * B[e[t,j]] @ h[t, block of e[t,j]]

which is ``moelora.moe_lora(h, S, B, ...)`` with S the identity [r, r] (shared A) or the
block selector [E, r, E*r] (S[e] = the rows e*r..e*r+r of the identity): the fused
kernels (Triton on GPU) run the gated expand and every gradient.
:func:`moe_lora_on_projection` does exactly that. The selector costs an extra
T x (E*r)^2 product next to the projection itself; convolutions with a 1 x 1 kernel, stride
1 and no padding skip the projection and call ``moe_lora`` on the input channels.

:class:`AdapterLayerBase` holds the hyper-parameters, the parameters, routing (a learned
:class:`moelora.routers.Router`, task routing via :func:`moelora.routers.task_routing`, or
the fixed expert 0 with weight 1) and the aux-loss record (:class:`moelora.losses.RoutedModule`);
init, A-dropout, merging and the names of its attributes are those of
:class:`moelora.MoELoRALinear` (its methods, borrowed), so :mod:`moelora.merge` and
:mod:`moelora.persistence` handle every layer alike.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn

from .functional import moe_lora
from .layer import MoELoRALinear, check_layer_args, single_expert_routing
from .losses import RoutedModule
from .routers import Router, Routing, task_routing


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a MoE-LoRA layer (MoELoRALinear, MoELoRAEmbedding or MoELoRAConv)."""
    return isinstance(module, (MoELoRALinear, AdapterLayerBase))


def projection_selector(num_blocks: int, rank: int, device=None, dtype=None) -> torch.Tensor:
    """The A that makes ``moe_lora`` read h as given: I_r [r, r] for one block, else the block
    selector [E, r, E*r] (entry [e, i, e*r + i] = 1)."""
    eye = torch.eye(num_blocks * rank, device=device, dtype=dtype)
    return eye if num_blocks == 1 else eye.reshape(num_blocks, rank, num_blocks * rank)


def moe_lora_on_projection(h: torch.Tensor, selector: torch.Tensor, lora_b: torch.Tensor, routing: Routing,
                           scaling: float, base_out: Optional[torch.Tensor]) -> torch.Tensor:
    """``base_out + s * sum_j w_j B[e_j] h[..., block e_j]`` for projected inputs h [..., r] or
    [..., E*r] (see the module docstring); returns [..., d_out]."""
    return moe_lora(h, selector, lora_b, routing.ids, routing.weights, scaling=scaling, base_out=base_out)


class AdapterLayerBase(nn.Module, RoutedModule):
    """A frozen base layer plus E LoRA experts whose A projects ``a_in`` features per position
    and whose B [E, d_out, r / b_groups] acts block-diagonally over ``b_groups`` groups.

    The layer arguments (``num_experts`` to ``router_z_loss_coef``) are those of
    :class:`moelora.MoELoRALinear`, with its defaults; DoRA is not supported. Subclasses pass
    the base layer's geometry and the router's class and input width, and implement ``forward``.
    """

    def __init__(self, base_layer: nn.Module, num_experts: int = 4, top_k: int = 2, r: int = 8,
                 lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
                 share_lora_a: bool = False, lora_a_dropout: float = 0.0, router: str = "softmax_topk",
                 router_renormalize: bool = True, router_jitter_noise: float = 0.0,
                 threshold_eps: float = 0.0, threshold_eps_start: float = 0.0, threshold_ramp_steps: int = 0,
                 task_shared_lora: bool = False, init_lora_weights: Union[bool, str] = True,
                 use_dora: bool = False, router_aux_loss_coef: float = 0.01, router_z_loss_coef: float = 0.001,
                 *, a_in: int, d_out: int, router_in: int, b_groups: int = 1, router_class=Router,
                 router_kwargs: Optional[dict] = None):
        super().__init__()
        check_layer_args(num_experts, top_k, r, lora_dropout, lora_a_dropout, router, init_lora_weights,
                         use_dora, task_shared_lora)
        if use_dora:
            raise ValueError(f"use_dora is supported on linear layers only, not on {type(self).__name__}")
        if r % b_groups:
            raise ValueError(f"r must be a multiple of the convolution's groups ({b_groups}), got r={r}")
        self.base_layer = base_layer
        self.num_experts, self.r, self.lora_alpha, self.use_rslora = num_experts, r, lora_alpha, use_rslora
        self.router_mode = router
        self.top_k = 1 if router == "task" or num_experts == 1 else top_k
        self.share_lora_a, self.lora_a_dropout = share_lora_a, lora_a_dropout
        self.task_shared_lora = task_shared_lora
        self.use_dora = False
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.aux_loss_coef, self.z_loss_coef = router_aux_loss_coef, router_z_loss_coef
        self.merged = False
        self.merged_task: Optional[int] = None
        self.disable_adapters = False
        self.task_ids = None  # task routing: the ids of the next forwards (moelora.set_task_ids sets them)
        self._clear_routing_record()

        weight = base_layer.weight
        # As PEFT (autocast_adapter_dtype): half-precision bases get fp32 adapters.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = dict(device=weight.device, dtype=dtype)
        self.num_lora = num_experts + (1 if task_shared_lora else 0)
        a_shape = (r, a_in) if share_lora_a else (self.num_lora, r, a_in)
        self._register_lora(nn.Parameter(torch.empty(a_shape, **factory)),
                            nn.Parameter(torch.empty(self.num_lora, d_out, r // b_groups, **factory)))
        if router == "task":
            self.router = None
            self.lora_gamma = nn.Parameter(torch.zeros(num_experts, **factory))
        elif num_experts > 1:
            self.router = router_class(router_in, num_experts, top_k, router, router_renormalize,
                                       router_jitter_noise, threshold_eps_start, threshold_eps,
                                       threshold_ramp_steps, device=weight.device, **(router_kwargs or {}))
        else:
            self.router = None
        blocks = 1 if share_lora_a else self.num_lora
        self.register_buffer("lora_selector", projection_selector(blocks, r, **factory), persistent=False)
        self.reset_lora_parameters(init_lora_weights)

    def _register_lora(self, lora_a: nn.Parameter, lora_b: nn.Parameter) -> None:
        """Register A and B (under PEFT's names for the layer type)."""
        self.lora_A, self.lora_B = lora_a, lora_b

    # Identical to MoELoRALinear's: one implementation of init, A-dropout and merging.
    reset_lora_parameters = MoELoRALinear.reset_lora_parameters
    expert_A = MoELoRALinear.expert_A
    _effective_A = MoELoRALinear._effective_A
    static_lora_factors = MoELoRALinear.static_lora_factors
    delta_weight = MoELoRALinear.delta_weight
    merge = MoELoRALinear.merge
    unmerge = MoELoRALinear.unmerge

    def route(self, router_input: torch.Tensor, lead_shape: tuple) -> Routing:
        """Routing of the ``lead_shape`` output positions; the learned router reads
        ``router_input`` (what it reads is the subclass's choice) and records its aux losses."""
        if self.router_mode == "task":
            if self.task_ids is None:
                raise RuntimeError(
                    f"this {type(self).__name__} routes by task id but none is set: call moelora.set_task_ids(model, "
                    "ids), use `with moelora.use_task_ids(model, ids):`, or pass task_ids=... to the MoELoRAModel's "
                    "forward")
            shared = self.num_experts if self.task_shared_lora else None
            return task_routing(self.task_ids, self.lora_gamma, lead_shape, shared)
        if self.router is None:
            ids, weights = single_expert_routing(math.prod(lead_shape), self.lora_B.device)
            return Routing(weights, ids)
        routing = self.router(router_input)
        self._record_routing(routing)
        return routing

    def _lora_on_projection(self, h: torch.Tensor, routing: Routing, base_out: Optional[torch.Tensor],
                            lora_b: Optional[torch.Tensor] = None) -> torch.Tensor:
        lora_b = self.lora_B if lora_b is None else lora_b
        return moe_lora_on_projection(h, self.lora_selector, lora_b, routing, self.scaling, base_out)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, r={self.r}, router={self.router_mode}, "
                f"share_lora_a={self.share_lora_a}")
