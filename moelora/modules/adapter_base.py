"""What every MoE-LoRA layer shares (MoELoRALinear, MoELoRAConv, MoELoRAEmbedding).

:class:`LayerSettings` holds one layer's hyper-parameters, checked once; a layer is built from
them (``MoELoRAConfig.layer_settings`` gives them for a module of a model) or from the same
keyword arguments. :class:`AdapterLayerBase` holds the base layer, A and B, the routing (a
learned :class:`moelora.modules.router.Router`, task routing via
:func:`moelora.ops.routing_modes.task_routing`, or the fixed expert 0 with weight 1), the
aux-loss record (:class:`moelora.modules.routed.RoutedModule`), init, A-dropout and merging, so
that moelora.tuner.merge and moelora.persistence handle every layer alike.

Embedding and convolution layers compute the LoRA down-projection with the base layer's own
operation (a lookup into A's columns, or a convolution with A as the kernel), giving h per
output position: [T, r] with a shared A, [T, E*r] with per-expert A. The rest is the MoE-LoRA
operator on h:

    y[t] = base[t] + s * sum_j w[t,j] * B[e[t,j]] @ h[t, block of e[t,j]]

which is ``moelora.moe_lora(h, S, B, ...)`` with S the identity [r, r] (shared A) or the
block selector [E, r, E*r] (S[e] = the rows e*r..e*r+r of the identity): the fused
kernels (Triton on GPU) run the gated expand and every gradient.
:meth:`AdapterLayerBase._lora_on_projection` does exactly that. The selector costs an extra
T x (E*r)^2 product next to the projection itself; convolutions with a 1 x 1 kernel, stride
1 and no padding skip the projection and call ``moe_lora`` on the input channels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from moelora.kernels.launchers import accumulator_dtype
from moelora.ops.backend import without_autocast
from moelora.ops.moe_lora import routed_moe_lora
from moelora.ops.moe_lora_linear import lora_dropout_mask
from moelora.modules.routed import RoutedModule
from moelora.modules.router import Router
from moelora.ops.routing_modes import ROUTER_MODES, Routing, task_routing
from moelora.ops.validation import _tracing_or_capturing, check_top_k, fake_mode_active, syncing_checks_enabled
from moelora.modules.fields import LAYER_FIELD_KINDS, check_field, is_integral
from moelora.modules.init import kaiming_uniform_per_matrix_, zero_expert_


_SINGLE = {}


def offload_hook(module: nn.Module):
    """accelerate's offloading hook of ``module`` while it holds the module's weights (an
    ``AlignDevicesHook`` with ``offload=True``, as ``cpu_offload``, ``disk_offload`` and a
    ``device_map`` with "cpu" / "disk" entries install it: the weight waits on meta and is loaded
    onto the hook's ``execution_device`` for each forward), or None."""
    if module.weight.device.type != "meta":
        return None
    return offloading_hook(module)


def offloading_hook(module: nn.Module):
    """accelerate's offloading hook of ``module`` (an ``AlignDevicesHook`` with ``offload=True`` and an
    ``execution_device``), whether or not its tensors are on meta now, or None."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", (hook,))  # a SequentialHook holds several
    return next((h for h in hooks if getattr(h, "offload", False) and getattr(h, "execution_device", None) is not None),
                None)


def offloaded_parameter_names(module: nn.Module):
    """Names (as in ``module.named_parameters()``) of the parameters of ``module`` and its children that
    accelerate has offloaded: on meta between forwards, in a module holding an offloading hook
    (:func:`offloading_hook`), which loads them for each forward."""
    return (n for name, m in module.named_modules() if offloading_hook(m) is not None
            for n, p in m.named_parameters(prefix=name) if p.is_meta)


def adapter_device(base_layer: nn.Module) -> torch.device:
    """Where a layer's adapters live: on the base weight's device; for a base layer offloaded by
    accelerate (its weight on meta between forwards), on the device its forwards run on, so that
    the adapters are real, trainable tensors there (on meta they could not be initialised)."""
    hook = offload_hook(base_layer)
    return torch.device(hook.execution_device) if hook is not None else base_layer.weight.device


def refuse_offloaded(base_layer: nn.Module, what: str) -> None:
    """NotImplementedError where ``base_layer`` is offloaded by accelerate: ``what`` reads or writes its
    weight, which lives on meta between forwards (writes would be lost silently)."""
    if offload_hook(base_layer) is not None:
        raise NotImplementedError(
            f"{what} needs the base layer's weight, which accelerate has offloaded ({type(base_layer).__name__} "
            "weight on meta between forwards): load the model without CPU / disk offloading for it")


# the types of a plain weight (no tensor subclass); a FakeTensor stands for a plain one (torch.export's default,
# non-strict, traces the module with its parameters swapped for fakes; a subclass's fake keeps the subclass)
PLAIN_TENSORS = (nn.Parameter, torch.Tensor, FakeTensor)


def is_quantised_weight(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is no plain floating-point tensor: a tensor subclass (torchao's quantize_ leaves an
    nn.Linear holding one) or an integer weight (bitsandbytes' packed Params4bit / Int8Params)."""
    return type(weight) not in PLAIN_TENSORS or not weight.dtype.is_floating_point


def refuse_quantised(base_layer: nn.Module, what: str) -> None:
    """NotImplementedError where ``base_layer``'s weight is quantised (:func:`is_quantised_weight`): ``what``
    reads or writes it as a dense tensor, which a quantised weight does not support exactly (torchao's
    subclasses implement few operators; bitsandbytes' weights are packed integers)."""
    weight = base_layer.weight
    if is_quantised_weight(weight):
        raise NotImplementedError(
            f"{what} needs the base layer's weight as a plain dense floating-point tensor, and "
            f"{type(base_layer).__name__}'s is a {type(weight).__name__} ({weight.dtype}): a quantised weight "
            "(torchao's quantize_, bitsandbytes' 4-bit / 8-bit layers) or another tensor subclass (a DTensor, a "
            "Parameter subclass). MoE-LoRA adapters train on quantised bases (QLoRA), but this is not supported "
            "there; do it on a model loaded without quantisation (and unsharded)")


def refuse_tensor_parallel_shards(layer: nn.Module, sharded_input: bool, sharded_features: bool,
                                  style_dims: Tuple[int, int]) -> None:
    """NotImplementedError where ``layer``'s base layer is tensor-parallel (its weight a ``DTensor``, as
    torch.distributed.tensor.parallel's ColwiseParallel / RowwiseParallel leave it) and took or returned a shard
    (``sharded_input``: an input [..., d_in / n]; ``sharded_features``: an output [..., d_out / n]; neither: an
    output sharded along the tokens, as output_layouts=Shard(1) gives): the adapter computes the whole delta from
    the whole input. ``style_dims``: the weight's dims that ColwiseParallel and RowwiseParallel shard. Nothing
    where the weight is a plain tensor (the caller's own shape errors follow)."""
    base = layer.base_layer
    weight = base._parameters.get("weight")
    if type(weight) in PLAIN_TENSORS or not hasattr(weight, "placements"):
        return
    dims = {p.dim for p in weight.placements if p.is_shard()}
    styles = [name for name, dim in zip(("ColwiseParallel", "RowwiseParallel"), style_dims) if dim in dims]
    style = styles[0] if len(styles) == 1 else "the tensor-parallel style"
    got = ("takes its input as a shard along the features" if sharded_input else
           "returns its output as a shard along the features" if sharded_features else
           "returns its output sharded along the tokens, or for other tokens than its input's")
    raise NotImplementedError(
        f"the {type(base).__name__} that this {type(layer).__name__} adapts is tensor-parallel (its weight a "
        f"{type(weight).__name__} placed {tuple(weight.placements)}, as {style} leaves it) and {got}: the MoE-LoRA "
        "adapter computes the layer's whole delta from its whole input, so the base layer must take and return "
        f"whole tensors. Parallelize the base layer with {style}(input_layouts=Replicate(), "
        "output_layouts=Replicate()) (the adapter then runs replicated on every rank), keep the adapted layers out "
        "of the tensor-parallel plan, or shard with FSDP2 (fully_shard) instead")


def is_uninitialised_lazy(module: nn.Module) -> bool:
    """Whether ``module`` is a lazy module (nn.LazyLinear, LazyConv*) whose parameters wait for a first forward."""
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()


def single_expert_routing(num_tokens: int, device: torch.device):
    """ids 0 and weights 1 for every token ([T, 1] stride-0 views of cached scalars). The scalars
    are made outside inference mode: an inference tensor cached by a first forward under
    torch.inference_mode could not be saved for backward by the training forwards after it. Nor
    are fake tensors cached (made while torch.export traces, or under any FakeTensorMode): they
    hold no values, and every eager forward after them would read them. Nor are scalars made by a
    compiled graph (its outputs are inference tensors when it runs under torch.inference_mode,
    whatever the graph says), nor during CUDA-graph capture (the kernels that fill them are only
    recorded: until the graph replays, their memory holds whatever it held), nor under a torch.func transform
    (grad, jacrev: they would be wrappers of its level). Under a FakeTensorMode the
    cached scalars are not read either (real tensors, which the mode refuses as inputs of its ops)."""
    pair = None if fake_mode_active() else _SINGLE.get(device)
    if pair is None:
        with torch.inference_mode(False):
            pair = (torch.zeros(1, 1, dtype=torch.int32, device=device),
                    torch.ones(1, 1, dtype=torch.float32, device=device))
        if (type(pair[0]) is torch.Tensor and not _tracing_or_capturing()
                and not torch._C._are_functorch_transforms_active()):
            _SINGLE[device] = pair
    return pair[0].expand(num_tokens, 1), pair[1].expand(num_tokens, 1)


def _constants_after_load(layer: "AdapterLayerBase", incompatible_keys) -> None:
    """load_state_dict's post hook: ``load_state_dict(..., assign=True)`` into a layer built on the meta
    device puts the loaded tensors in place of A and B, and nothing in place of the constant
    buffers (no state dict holds them), which would stay on meta."""
    layer._constants_follow_lora_b()


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """The hyper-parameters of one MoE-LoRA layer (PEFT's names where PEFT has them), checked
    when made (each field by LAYER_FIELD_KINDS, then the rules between fields): a layer's
    constructor and MoELoRAConfig give the same errors for the same values. Every field (num_experts,
    top_k, r, lora_alpha, lora_dropout, use_rslora, share_lora_a, lora_a_dropout, router,
    router_renormalize, router_jitter_noise, threshold_eps, threshold_eps_start,
    threshold_ramp_steps, task_shared_lora, init_lora_weights, use_dora, router_aux_loss_coef,
    router_z_loss_coef), its range and default: :class:`moelora.MoELoRALinear`'s Args. ``router``:
    "softmax_topk", "topk_softmax", "threshold" or "task"; the threshold router's eps rises
    from ``threshold_eps_start`` to ``threshold_eps`` over ``threshold_ramp_steps`` steps;
    ``task_shared_lora`` adds a LoRA every token uses (task routing); ``lora_a_dropout`` is
    MoSLD's dropout of A (the shared A, or each expert's)."""

    num_experts: int = 4
    top_k: int = 2
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    share_lora_a: bool = False
    lora_a_dropout: float = 0.0
    router: str = "softmax_topk"
    router_renormalize: bool = True
    router_jitter_noise: float = 0.0
    threshold_eps: float = 0.0
    threshold_eps_start: float = 0.0
    threshold_ramp_steps: int = 0
    task_shared_lora: bool = False
    init_lora_weights: Union[bool, str] = True
    use_dora: bool = False
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001

    def __post_init__(self):
        for name, kind in LAYER_FIELD_KINDS.items():
            check_field(name, getattr(self, name), kind)
        if self.router not in ROUTER_MODES:
            raise ValueError(f"router must be one of {ROUTER_MODES}, got {self.router!r}")
        if self.router != "task" and self.num_experts > 1:
            check_top_k(self.top_k, self.num_experts)
        for name in ("lora_dropout", "lora_a_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        if self.use_dora and (self.num_experts != 1 or self.router == "task"):
            raise ValueError("use_dora needs a single expert without task routing (num_experts=1)")
        if self.task_shared_lora and self.router != "task":
            raise ValueError("task_shared_lora needs router='task'")

    @property
    def scaling(self) -> float:
        """The LoRA scale: lora_alpha / r (rsLoRA: lora_alpha / sqrt(r))."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def layer_settings(settings: Optional[LayerSettings], kwargs: dict) -> LayerSettings:
    """A layer constructor's settings: ``settings``, or LayerSettings(**kwargs); not both."""
    if settings is None:
        return LayerSettings(**kwargs)
    if kwargs:
        raise TypeError(f"give a layer either settings or keyword arguments, not both (got {sorted(kwargs)})")
    if not isinstance(settings, LayerSettings):
        raise TypeError(f"settings must be a LayerSettings, got {type(settings).__name__}")
    return settings


def owned_by_moelora(module: nn.Module) -> bool:
    """Whether moelora added ``module`` to a model whole (an upcycled MoEFFN, MoLEx, the trained
    copy of a ``modules_to_save`` module: their class or instance sets ``moelora_owned``), so that
    every tensor in it is an adapter tensor, trained and saved (moelora.tuner.adapters)."""
    # Read from the instance or its class only: wrappers forward unknown attributes to what they wrap.
    return bool(module.__dict__.get("moelora_owned", getattr(type(module), "moelora_owned", False)))


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a MoE-LoRA layer (MoELoRALinear, MoELoRAEmbedding or MoELoRAConv)."""
    return isinstance(module, AdapterLayerBase)


def projection_selector(num_blocks: int, rank: int, device=None, dtype=None) -> torch.Tensor:
    """The A that makes ``moe_lora`` read h as given: I_r [r, r] for one block, else the block
    selector [E, r, E*r] (entry [e, i, e*r + i] = 1)."""
    eye = torch.eye(num_blocks * rank, device=device, dtype=dtype)
    return eye if num_blocks == 1 else eye.reshape(num_blocks, rank, num_blocks * rank)


class AdapterLayerBase(nn.Module, RoutedModule):
    """A frozen base layer plus E LoRA experts whose A projects ``a_in`` features per position
    and whose B [E, d_out, r / b_groups] acts block-diagonally over ``b_groups`` groups, routed
    per position; built from :class:`LayerSettings`. Subclasses pass the base layer's geometry
    and the router's class and input width, and implement ``forward``.
    """

    supports_dora = False  # MoELoRALinear: True
    uses_selector = True  # the projection selector of _lora_on_projection (MoELoRALinear: False)

    def __init__(self, base_layer: nn.Module, settings: LayerSettings, *, a_in: int, d_out: int, router_in: int,
                 b_groups: int = 1, router_class=Router, router_kwargs: Optional[dict] = None):
        super().__init__()
        if is_uninitialised_lazy(base_layer):
            raise ValueError(f"{type(self).__name__} cannot wrap an uninitialised {type(base_layer).__name__}: its "
                             "input size is not known yet; run a forward pass through the model (or the layer) first, "
                             "which makes it a plain layer, then wrap it")
        s = settings
        if s.use_dora and not self.supports_dora:
            raise ValueError(f"use_dora is supported on linear layers only, not on {type(self).__name__}")
        if s.r % b_groups:
            raise ValueError(f"r must be a multiple of the convolution's groups ({b_groups}), got r={s.r}")
        self.settings = s
        self.base_layer = base_layer
        self.num_experts, self.r, self.lora_alpha, self.use_rslora = s.num_experts, s.r, s.lora_alpha, s.use_rslora
        self.router_mode = s.router
        self.top_k = 1 if s.router == "task" or s.num_experts == 1 else s.top_k
        self.share_lora_a, self.lora_a_dropout = s.share_lora_a, s.lora_a_dropout
        self.task_shared_lora = s.task_shared_lora
        self.use_dora = s.use_dora
        self.scaling = s.scaling
        self.aux_loss_coef, self.z_loss_coef = s.router_aux_loss_coef, s.router_z_loss_coef
        self.merged = False
        self.merged_task: Optional[int] = None
        self.disable_adapters = False
        self.task_ids = None  # task routing: the ids of the next forwards (moelora.set_task_ids sets them)
        self.task_ids_owner = None  # the MoELoRAModel forward that set task_ids, else None (moelora.model)
        self.clear_routing_record()

        weight = base_layer.weight
        if s.use_dora:
            refuse_offloaded(base_layer, "DoRA (its magnitude starts at the base weight's row norms)")
            refuse_quantised(base_layer, "DoRA (its magnitude starts at the base weight's row norms)")
            if not self.forward_is_weight_function(base_layer):
                # PEFT's DoRA formula then computes one function in eval (from the base output less its bias) and
                # another in training with LoRA dropout (from x W^T): they differ by more than the dropout
                raise ValueError(
                    f"use_dora needs a base layer computing {self.weight_function}, and {type(base_layer).__name__} "
                    "has a forward of its own: DoRA rescales W + dW by its magnitude, which says nothing of what such "
                    "a layer computes (its eval forward and its training forward with LoRA dropout would compute "
                    "different functions); use plain LoRA (use_dora=False) on it")
        # fp32 adapters but on fp64 bases: half-precision bases as PEFT's (autocast_adapter_dtype), and quantised
        # ones, whose weight's dtype (bitsandbytes' packed integers) has no gradients.
        dtype = accumulator_dtype(weight.dtype)
        factory = dict(device=adapter_device(base_layer), dtype=dtype)
        self.num_lora = s.num_experts + (1 if s.task_shared_lora else 0)
        a_shape = (s.r, a_in) if s.share_lora_a else (self.num_lora, s.r, a_in)
        self._register_lora(nn.Parameter(torch.empty(a_shape, **factory)),
                            nn.Parameter(torch.empty(self.num_lora, d_out, s.r // b_groups, **factory)))
        if s.router == "task":
            self.router = None
            self.lora_gamma = nn.Parameter(torch.empty(s.num_experts, **factory))
        elif s.num_experts > 1:
            self.router = router_class(router_in, s.num_experts, s.top_k, s.router, s.router_renormalize,
                                       s.router_jitter_noise, s.threshold_eps_start, s.threshold_eps,
                                       s.threshold_ramp_steps, device=factory["device"], **(router_kwargs or {}))
        else:
            self.router = None
        self._add_parameters(factory)
        self._register_constant_buffers(**factory)
        self.register_load_state_dict_post_hook(_constants_after_load)
        self.reset_parameters()  # the router, a child module, initialised itself

    def _register_lora(self, lora_a: nn.Parameter, lora_b: nn.Parameter) -> None:
        """Register A and B (under PEFT's names for the layer type)."""
        self.lora_A, self.lora_B = lora_a, lora_b

    def _add_parameters(self, factory: dict) -> None:
        """What a layer type adds before its constant buffers and the init below: its parameters
        (DoRA's magnitude) and the attributes those two read (e.g. MoELoRAConv's groups)."""

    # ----------------------------------------------------------------------------- constants
    def _constant_buffers(self) -> dict:
        """name -> ``build(device, dtype)`` of the layer's constant buffers (non-persistent, functions
        of its shape alone): the projection selector; MoELoRAConv adds its group mask."""
        if not self.uses_selector:
            return {}
        blocks = 1 if self.share_lora_a else self.num_lora
        return {"lora_selector": lambda device, dtype: projection_selector(blocks, self.r, device, dtype)}

    def _register_constant_buffers(self, device, dtype) -> None:
        for name, build in self._constant_buffers().items():
            self.register_buffer(name, build(device, dtype), persistent=False)

    def _apply(self, fn, recurse=True):
        # The constant buffers are made again where ``fn`` put them, in the dtype it gave them: no
        # state dict restores them, and ``to_empty`` (meta-device init, then loading the weights)
        # leaves their memory uninitialised. Module moves only, never a forward.
        module = super()._apply(fn, recurse)
        for name, build in self._constant_buffers().items():
            old = self._buffers.get(name)
            if old is not None:
                self._buffers[name] = build(old.device, old.dtype)
        return module

    def _constants_follow_lora_b(self) -> None:
        """Make the constant buffers again on B's device in B's dtype where they are elsewhere."""
        b = self.lora_B
        for name, build in self._constant_buffers().items():
            old = self._buffers.get(name)
            if old is not None and (old.device != b.device or old.dtype != b.dtype):
                self._buffers[name] = build(b.device, b.dtype)

    # ----------------------------------------------------------------------------- init
    # Meta-device init (FSDP2, torchtitan, accelerate's init_empty_weights): build on meta,
    # ``to_empty``, then ``reset_parameters()`` on every module that has it. Each module sets its
    # own direct tensors only (nn.Module's convention): the base layer and the router are child
    # modules with their own reset_parameters; the constant buffers are made again by _apply.
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the layer's own parameters as its constructor does (``init_lora_weights`` of
        its settings): A and B (:meth:`_init_lora_factors`), the task gates ``lora_gamma`` at 0,
        DoRA's magnitude (MoELoRALinear). Not the base layer's nor the router's: they are child
        modules, each with its own ``reset_parameters`` (nn.Module's convention, which meta-device
        init relies on: ``for m in model.modules(): m.reset_parameters()`` reaches them too).
        :meth:`reset_lora_parameters` resets the router too."""
        self._init_lora(self.settings.init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: Union[bool, str, None] = None) -> None:
        """Initialise the whole adapter as the constructor does, in its order: the router's weight
        and step counter (:meth:`Router.reset_parameters`), then the layer's own parameters
        (:meth:`reset_parameters`), so that the same seed gives the same adapter. The base layer
        is left as it is. ``init_lora_weights`` (True, False, "gaussian"; None: the layer's
        setting) as PEFT's ``reset_lora_parameters``."""
        if self.router is not None:
            self.router.reset_parameters()
        self._init_lora(self.settings.init_lora_weights if init_lora_weights is None else init_lora_weights)

    def _init_lora(self, init_lora_weights: Union[bool, str]) -> None:
        """The layer's own parameters (see :meth:`reset_parameters`); MoELoRALinear adds DoRA's magnitude."""
        self._init_lora_factors(init_lora_weights)
        if self.router_mode == "task":
            self.lora_gamma.zero_()

    def _init_lora_factors(self, init_lora_weights: Union[bool, str]) -> None:
        """PEFT's init: A kaiming-uniform (``"gaussian"``: normal, std 1/r), B zero, so the layer starts
        as its base; ``init_lora_weights=False`` and task experts (gated by gamma = 0) draw B
        kaiming-uniform too; a task-shared LoRA's B starts at zero."""
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            kaiming_uniform_per_matrix_(self.lora_A)
        if init_lora_weights is False or self.router_mode == "task":
            # Task experts are gated by gamma = 0 at init, so B may (and must, for gamma to
            # receive a gradient) start non-zero.
            kaiming_uniform_per_matrix_(self.lora_B)
        else:
            self.lora_B.zero_()
        if self.task_shared_lora and init_lora_weights is not False:
            zero_expert_(self.lora_B, -1)

    # As PEFT's tuner layers: model code reads the wrapped layer's weight and bias through the
    # adapter layer (T5's ``self.wo.weight.dtype``, ViT's ``projection.weight.dtype``).
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (the frozen parameter itself, in its own layout)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The base layer's bias (None without one)."""
        return self.base_layer.bias

    def __setattr__(self, name: str, value) -> None:
        # Assignments go to the base layer too (transformers' tie_weights sets ``lm_head.weight =
        # embed_tokens.weight``): nn.Module would refuse a parameter named like the properties above.
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", ()):
            setattr(self.base_layer, name, value)
        else:
            super().__setattr__(name, value)

    def expert_A(self, e: int) -> torch.Tensor:
        return self.lora_A if self.share_lora_a else self.lora_A[e]

    def _effective_A(self) -> Tuple[torch.Tensor, float]:
        """(A as the LoRA branch reads it, a factor on the layer's scaling): A and 1.0, or in
        training with MoSLD's A-dropout A (.) M and 1 / (1 - p), M a bool keep mask (whatever A's
        dtype: the same mask for the same seed on every device) and the dropout's scale folded
        into the scaling, so that it costs one elementwise op forward and one backward."""
        a = self.lora_A
        if self.training and self.lora_a_dropout > 0:
            keep, scale = lora_dropout_mask(a, self.lora_a_dropout)
            return a * keep, scale
        return a, 1.0

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
        if not is_integral(task) or not 0 <= task < self.num_experts:
            raise ValueError(f"a task-routed layer needs task in [0, {self.num_experts}) (an int), got {task!r}")
        a, b = self.expert_A(task), self.lora_gamma[task] * self.lora_B[task]
        if self.task_shared_lora:
            a = torch.cat([a, self.expert_A(self.num_experts)], dim=0)
            b = torch.cat([b, self.lora_B[-1]], dim=1)
        return a, b

    def delta_weight(self, task: Optional[int] = None) -> torch.Tensor:
        """The static adapter's weight delta in nn.Linear layout [d_out, d_in] (see above), in the
        adapters' dtype whatever torch.autocast says (merging must not round it)."""
        a, b = self.static_lora_factors(task)
        with without_autocast(a):
            return self.scaling * (b @ a)

    def check_merge(self, task: Optional[int] = None) -> None:
        """Raise the error :meth:`merge` would (the layer is merged already or disabled, or its routing
        does not fold into one weight delta), changing nothing: ``merge_adapter`` checks every layer first."""
        if self.merged:
            raise RuntimeError("the layer is already merged; unmerge it first")
        refuse_offloaded(self.base_layer, "merging")
        refuse_quantised(self.base_layer, "merging")
        if self.disable_adapters:  # it would return the merged weight's output while disabled
            raise RuntimeError("the adapter layers are disabled (disable_adapter_layers() or `with "
                               "model.disable_adapter():`) and a disabled layer computes its base layer; enable "
                               "them before merging")
        self.static_lora_factors(task)
        base = self.base_layer
        if "weight" not in base._parameters and "weight" not in base._buffers:
            # A parametrization (or the pre-hook of torch.nn.utils.weight_norm / spectral_norm / prune) makes
            # the weight again from other tensors on every read or call: the merged delta would be lost.
            raise ValueError(
                f"cannot merge into this {type(base).__name__}: its weight is computed from other tensors on each "
                "call (a parametrization: torch.nn.utils.parametrize, parametrizations.weight_norm or spectral_norm; "
                "or the hook of torch.nn.utils.weight_norm / spectral_norm, or torch.nn.utils.prune's weight_orig * "
                "weight_mask), so the merged delta would be lost and the merged layer would compute its base layer "
                "alone; keep the adapter unmerged, or make the weight a plain parameter first "
                "(parametrize.remove_parametrizations(module, 'weight'); prune.remove(module, 'weight'))")
        if base._forward_pre_hooks or base._forward_hooks or ("forward" in base.__dict__
                                                              and "_hf_hook" not in base.__dict__):
            # The unmerged layer adds its delta to the hooked base output (and reads the input the pre-hooks
            # did not see); merged, the delta would pass through the hooks. accelerate's hooks (``_hf_hook``, a
            # ``forward`` set on the instance) move tensors between devices only.
            raise ValueError(
                f"cannot merge into this {type(base).__name__}: it has forward hooks or pre-hooks (or a forward set "
                "on the instance), which may change its input or output, so the base layer with the merged weight "
                "need not compute base_layer(x) + the adapter's delta (the adapter reads x as given and adds its delta "
                "after the hooks); remove them first (their handles' remove(); torch.nn.utils.prune's, of a pruned "
                "bias: prune.remove(module, 'bias'); transformers' disable_input_require_grads()) or keep the adapter "
                "unmerged")
        if not self.forward_is_weight_function(base):
            raise ValueError(
                f"cannot merge into {type(base).__name__}: it has a forward of its own, so the base layer with the "
                "merged weight need not compute base_layer(x) + the adapter's delta (merging assumes the base "
                f"computes {self.weight_function}); keep the adapter unmerged")

    # what the base layer's forward must compute for merging and DoRA, which change or rescale its weight (their
    # errors)
    weight_function = "its own operation of its weight"

    def forward_is_weight_function(self, base: nn.Module) -> bool:
        """Whether ``base``'s forward computes :attr:`weight_function` of its weight, so that merging gives the
        unmerged output and DoRA's magnitude rescales what the base computes. True here; MoELoRALinear,
        MoELoRAConv and MoELoRAEmbedding each name the forwards of their kind of base."""
        return True

    @torch.no_grad()
    def merged_base_weight(self, task: Optional[int] = None,
                           safe_merge: bool = False) -> Tuple[torch.Tensor, Optional[tuple]]:
        """(the base weight with the adapter folded in: its dtype, :meth:`base_weight`'s [d_out, d_in] layout;
        DoRA's (scale, delta) that :meth:`unmerge` divides out and subtracts, else None), changing nothing. The
        sum is formed in fp32 (fp64 for fp64 weights) and rounded once, so that unmerging restores the weight.
        ``safe_merge`` (as PEFT's): a merged weight holding NaN or Inf raises a ValueError."""
        w = self.base_weight()
        acc = accumulator_dtype(w.dtype)
        delta = self.delta_weight(task).to(acc)
        merged, dora = w.to(acc) + delta, None
        if self.use_dora:
            scale = (self.lora_magnitude_vector.to(acc) / torch.linalg.norm(merged, dim=1)).detach()
            merged, dora = merged * scale[:, None], (scale, delta)
        merged = merged.to(w.dtype)
        if safe_merge and not bool(torch.isfinite(merged).all()):
            raise ValueError("the merged weight holds NaN or Inf (safe_merge=True): the adapter (or the base weight) "
                             "is broken, so nothing was merged")
        return merged, dora

    @torch.no_grad()
    def merge(self, task: Optional[int] = None, safe_merge: bool = False) -> None:
        """Fold the adapter into the base weight (static routing only; see above). ``safe_merge`` (as PEFT's):
        a merged weight holding NaN or Inf raises a ValueError instead, the layer left unmerged."""
        self.check_merge(task)
        merged, dora = self.merged_base_weight(task, safe_merge)
        if dora is not None:
            # What unmerge divides out and subtracts: buffers (not saved), so that they follow the
            # layer's moves (.to(device), .double()) as its weights do.
            self.register_buffer("_dora_merge_scale", dora[0], persistent=False)
            self.register_buffer("_dora_merged_delta", dora[1], persistent=False)
        self._store_base_weight(merged)
        self.merged, self.merged_task = True, task

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("the layer is not merged")
        weight = self.base_layer.weight
        w = self.base_weight()
        acc = accumulator_dtype(weight.dtype)
        if self.use_dora:
            restored = w.to(acc) / self._dora_merge_scale[:, None] - self._dora_merged_delta
            del self._dora_merge_scale, self._dora_merged_delta
        else:
            restored = w.to(acc) - self.delta_weight(self.merged_task).to(acc)
        self._store_base_weight(restored.to(weight.dtype))
        self.merged, self.merged_task = False, None

    def _store_base_weight(self, value: torch.Tensor) -> None:
        """Write ``value`` (the base weight's dtype, :meth:`base_weight`'s [d_out, d_in] layout) into
        the base weight, in place (a view of it takes the write; MoELoRAConv's may be a copy)."""
        self.base_weight().copy_(value)

    def compute_routing(self, router_input: torch.Tensor, lead_shape: tuple) -> Routing:
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

    def routed_moe_lora(self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, routing: Routing,
                        scaling: float, base_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``moelora.moe_lora`` on this layer's routing, which nothing reads on the host (as on the
        fused path; :func:`moelora.ops.moe_lora.routed_moe_lora`): a learned router's ids and the
        single expert's lie in [0, E), task routing's were checked where it was built while the
        syncing checks run."""
        in_range = self.router_mode != "task" or syncing_checks_enabled()
        return routed_moe_lora(x, lora_a, lora_b, routing.ids, routing.weights, scaling=scaling, ids_in_range=in_range,
                               base_out=base_out)

    def _lora_on_projection(self, h: torch.Tensor, routing: Routing, base_out: Optional[torch.Tensor],
                            lora_b: Optional[torch.Tensor] = None, scaling: Optional[float] = None) -> torch.Tensor:
        """``base_out + s * sum_j w_j B[e_j] h[..., block e_j]`` for projected inputs h [..., r] or
        [..., E*r] (see the module docstring); returns [..., d_out]."""
        lora_b = self.lora_B if lora_b is None else lora_b
        scaling = self.scaling if scaling is None else scaling
        selector = self.constant_in(self.lora_selector, h.dtype)
        return self.routed_moe_lora(h, selector, lora_b, routing, scaling, base_out)

    @staticmethod
    def constant_in(buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A constant buffer (a 0/1 matrix, exact in every dtype) in ``dtype``: itself where it has that dtype, as
        :meth:`_apply` keeps it; a cast where the parameters were cast without the buffers (FSDP2's
        ``MixedPrecisionPolicy(param_dtype=...)`` casts parameters only)."""
        return buffer if buffer.dtype == dtype else buffer.to(dtype)

    def jit_traceable(self, *args, **kwargs) -> bool:
        """torch.jit.trace records a merged layer or one with its adapter disabled: its forward is the base layer's."""
        return self.merged or self.disable_adapters

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, r={self.r}, router={self.router_mode}, "
                f"share_lora_a={self.share_lora_a}")
