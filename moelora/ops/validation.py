"""Argument checks and normalisation for the MoE-LoRA operator.

Shape, dtype and device checks cost nothing and always run. The two checks that must
read device memory on the host (ids in range, finite gate weights) run only while
``moelora.validation`` is enabled, and never under torch.compile or CUDA-graph capture.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from moelora.kernels.launchers import accumulator_dtype
from moelora.switches import validation_enabled

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)


class MoELoRAArgs(NamedTuple):
    """The operator's validated inputs, as given (x [..., d_in], routing [..., k] or [T, k],
    base_out [..., d_out]); :meth:`flattened` gives the 2-D token-major form the backends use."""

    x: torch.Tensor  # [..., d_in]
    lora_a: torch.Tensor  # [r, d_in] or [E, r, d_in]
    lora_b: torch.Tensor  # [E, d_out, r]
    topk_ids: torch.Tensor  # [..., k] or [T, k]
    topk_weights: torch.Tensor  # shape of topk_ids
    base_out: Optional[torch.Tensor]  # [..., d_out] or None
    scaling: float
    out_shape: tuple  # leading shape of x + (d_out,)
    ids_in_range: bool = False  # topk_ids were read and lie in [0, E) (the syncing checks ran, or by construction)

    @property
    def shared_a(self) -> bool:
        return self.lora_a.dim() == 2

    @property
    def num_experts(self) -> int:
        return self.lora_b.shape[0]

    @property
    def num_tokens(self) -> int:
        return math.prod(self.out_shape[:-1])

    def flattened(self) -> "MoELoRAArgs":
        """x [T, d_in], topk_ids and topk_weights [T, k], base_out [T, d_out] (views; a tensor
        already in that shape is returned itself, so no autograd view node is recorded)."""
        d_in, top_k, T = self.x.shape[-1], self.topk_ids.shape[-1], self.num_tokens
        return self._replace(x=as_2d(self.x, T, d_in), topk_ids=as_2d(self.topk_ids, T, top_k),
                             topk_weights=as_2d(self.topk_weights, T, top_k),
                             base_out=None if self.base_out is None else as_2d(self.base_out, T, self.out_shape[-1]))


def as_2d(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``t`` viewed as [rows, cols]; ``t`` itself when it has that shape already (no view node)."""
    return t if t.dim() == 2 and t.shape[0] == rows else t.reshape(rows, cols)


def _tracing_or_capturing() -> bool:
    """Under torch.compile or CUDA-graph capture a host read is impossible: skip those checks."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_FAKE_MODE_KEY = torch._C._TorchDispatchModeKey.FAKE
_functorch = torch._C._functorch
_functorch_active = torch._C._are_functorch_transforms_active
_get_dispatch_mode = torch._C._get_dispatch_mode
_is_compiling = torch.compiler.is_compiling


def fake_mode_active() -> bool:
    """Whether an eager forward runs under a FakeTensorMode (memory and FLOP estimators, FSDP2's shape
    passes): every tensor an op makes is then fake (shapes only, no values), those made from real
    inputs too. False under torch.compile and torch.export, which trace under one and take their own
    paths (and dynamo cannot trace the mode's lookup)."""
    return not _is_compiling() and _get_dispatch_mode(_FAKE_MODE_KEY) is not None


def syncing_checks_enabled(*tensors: torch.Tensor) -> bool:
    """Whether checks that read device values on the host run now: moelora.validation is on,
    neither torch.compile nor CUDA-graph capture is running, no FakeTensorMode is active (the
    check's reductions would be fake tensors, whose host read raises), and none of ``tensors``
    (those the check would read) is on the meta device, which holds no values (shapes only, as
    under torch.compile), nor batched by torch.func.vmap (no storage to read: its host read raises). Every such
    check in moelora asks this (the rule of this module's docstring)."""
    # torch.compile first: a switch read while dynamo traces guards the graph on it (compiled again per state)
    return (not torch.compiler.is_compiling() and validation_enabled() and not _tracing_or_capturing()
            and not fake_mode_active() and not any(t.is_meta for t in tensors)
            and not (_functorch_active() and any(_vmapped(t) for t in tensors)))


def _vmapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by torch.func.vmap at any of its functorch levels (under grad's wrapper too)."""
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


def host_values(*scalars: torch.Tensor) -> list:
    """0-d tensors (one device) as Python numbers, in one device-to-host copy."""
    dtype = torch.float64 if any(t.is_floating_point() for t in scalars) else torch.int64
    return torch.stack([t.to(dtype) for t in scalars]).tolist()


def is_number(value) -> bool:
    """Whether ``value`` is a Python int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """Whether ``value`` is a Python int or float (not a bool) with a finite float value (an int
    beyond float's range, such as 10**400, is not)."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def refuse_double_backward(op: str) -> None:
    """Raise where a backward built of kernels runs with grad mode on, i.e. under
    ``create_graph=True``: its gradients are not differentiable (not in the incoming gradient,
    nor in the saved inputs they depend on), and ``once_differentiable`` would let
    ``torch.autograd.grad(..., inputs)`` drop the second-order terms without a word. Free in a
    plain backward (grad mode is off there)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}'s Triton backward is not differentiable (create_graph=True, double backward): "
                           "run it on backend='torch' (moelora.use_backend('torch')) for higher-order gradients")


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_tensor_args(x, topk_ids, topk_weights, weights: dict, optional: dict) -> None:
    """Types, dtypes and devices shared by the operators: x a float tensor; ``weights`` (every
    value required) and ``optional`` ({name: tensor or None}) tensors of x's dtype; topk_ids
    int32/int64, topk_weights floating point; everything on x's device."""
    for name, value in (("x", x), *weights.items(), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        _require_tensor(name, value)
    tensors = dict(weights, **{n: t for n, t in optional.items() if t is not None})
    for name, value in optional.items():
        if value is not None:
            _require_tensor(name, value)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    if topk_ids.dtype not in ID_DTYPES:
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be a floating-point tensor, got {topk_weights.dtype}")
    check_same_device(x, (*tensors.items(), ("topk_ids", topk_ids), ("topk_weights", topk_weights)))


def check_module_input(x: torch.Tensor, d_in: int, weight: torch.Tensor) -> None:
    """TypeError / ValueError naming x unless it is a float tensor [..., d_in] on the device of the module's
    ``weight``: a module's forward input (MoELoRALinear's fused path, Router), which the kernels read with the
    module's width and dtype table, on x's device (a weight elsewhere would be read through pointers into
    another device's memory). One comparison where x is right."""
    if x.dtype in FLOAT_DTYPES and x.dim() and x.shape[-1] == d_in and x.device == weight.device:
        return
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the module's weights are on {weight.device}: move x (or the "
                         "module) to one device")
    raise ValueError(f"x must have shape [..., d_in = {d_in}], got {tuple(x.shape)}")


def check_same_device(x: torch.Tensor, named) -> None:
    """ValueError naming the first tensor of ``named`` ((name, tensor or None) pairs) that is not on x's device."""
    for name, t in named:
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share a device")


def check_moe_lora_args(x, lora_a, lora_b, topk_ids, topk_weights, scaling, base_out,
                        ids_in_range: Optional[bool] = None) -> MoELoRAArgs:
    """Validate the operator's arguments and return them (see MoELoRAArgs). The routing's values are
    read on the host (:func:`check_routing_values`) unless ``ids_in_range`` is given: routing that
    moelora made, whose ids are known to lie in [0, E) (True) or may not (False)."""
    check_tensor_args(x, topk_ids, topk_weights, dict(lora_a=lora_a, lora_b=lora_b), dict(base_out=base_out))

    if x.dim() < 1:
        raise ValueError("x must have shape [..., d_in], got a 0-d tensor")
    num_experts, d_out, _ = check_adapter_shapes(lora_a, lora_b, x.shape[-1])

    lead = tuple(x.shape[:-1])
    num_tokens = math.prod(lead)
    if topk_ids.dim() < 1 or topk_ids.shape[-1] < 1:
        raise ValueError(f"topk_ids must have shape [T, k] with k >= 1, got {tuple(topk_ids.shape)}")
    top_k = topk_ids.shape[-1]
    flat_ids = topk_ids.dim() == 2 and topk_ids.shape[0] == num_tokens
    if not flat_ids and tuple(topk_ids.shape[:-1]) != lead:  # same element count is not enough
        raise ValueError(
            f"topk_ids must have shape [{num_tokens}, k] or {list(lead) + ['k']} to match x of shape "
            f"{tuple(x.shape)}, got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}")
    check_top_k(top_k, num_experts, "k (topk_ids.shape[-1])")
    out_shape = lead + (d_out,)
    if base_out is not None and tuple(base_out.shape) != out_shape:
        raise ValueError(f"base_out must have shape {out_shape}, got {tuple(base_out.shape)}")

    check_scaling(scaling)
    checked = check_routing_values(topk_ids, topk_weights, num_experts) if ids_in_range is None else ids_in_range
    return MoELoRAArgs(x, lora_a, lora_b, topk_ids, topk_weights, base_out, float(scaling), out_shape, checked)


def check_adapter_shapes(lora_a, lora_b, d_in: int) -> tuple:
    """(E, d_out, r) of lora_b [E, d_out, r] (E, r >= 1), after checking lora_a is [r, d_in] (shared) or
    [E, r, d_in] (per expert)."""
    if lora_b.dim() != 3:
        raise ValueError(f"lora_b must have shape [E, d_out, r], got {tuple(lora_b.shape)}")
    num_experts, d_out, rank = lora_b.shape
    if num_experts < 1 or rank < 1:
        raise ValueError(f"lora_b must have E >= 1 and r >= 1, got shape {tuple(lora_b.shape)}")
    if lora_a.dim() == 2:
        expected_a = (rank, d_in)
    elif lora_a.dim() == 3:
        expected_a = (num_experts, rank, d_in)
    else:
        raise ValueError(f"lora_a must have shape [r, d_in] (shared) or [E, r, d_in], got {tuple(lora_a.shape)}")
    if tuple(lora_a.shape) != expected_a:
        raise ValueError(
            f"lora_a has shape {tuple(lora_a.shape)} but x ([..., {d_in}]) and lora_b "
            f"([{num_experts}, {d_out}, {rank}]) require {expected_a}")
    return num_experts, d_out, rank


def check_scaling(scaling) -> None:
    """TypeError unless the LoRA scale ``scaling`` is a finite Python number."""
    # Under torch.compile a float that dynamo saw change between calls of the same code (the
    # scalings of layers compiled one by one, as per-block compilation does) is traced as a
    # symbolic float, whose value is not known here: only its type is checked.
    if not (is_number(scaling) if torch.compiler.is_compiling() else is_finite_number(scaling)):
        raise TypeError(f"scaling must be a finite Python number, got {scaling!r}")


def check_top_k(top_k: int, num_experts: int, name: str = "top_k") -> None:
    """ValueError naming ``name`` unless 1 <= top_k <= num_experts (moelora's one top-k check)."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"{name} must be in [1, num_experts={num_experts}], got {top_k}")


def check_routing_values(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                         positive_kept_sums: bool = False) -> bool:
    """The syncing checks (ids in [0, E), finite weights; with ``positive_kept_sums`` also: the
    nonzero weights of every token that has any sum, in the mixing dtype (fp32, fp64 for fp64
    weights), to at least its smallest normal number (finfo.tiny), as moe_ffn's normalize=True
    needs: both backends divide by max(sum, tiny)): one device-to-host copy, only when
    syncing_checks_enabled(). Returns whether the ids are known to lie in [0, E) (checked, or
    there are none)."""
    if topk_ids.numel() == 0:
        return True
    if not syncing_checks_enabled(topk_ids, topk_weights):
        return False
    lo, hi = torch.aminmax(topk_ids)
    checks = [lo, hi, torch.isfinite(topk_weights).all()]
    mixing = accumulator_dtype(topk_weights.dtype)
    if positive_kept_sums:
        kept = topk_weights != 0
        sums = torch.where(kept, topk_weights, 0).to(mixing).sum(-1)
        checks.append((~kept.any(-1) | (sums >= torch.finfo(mixing).tiny)).all())
    lo, hi, finite, *positive = host_values(*checks)  # one device-to-host copy
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_experts:
        raise ValueError(
            f"topk_ids must lie in [0, {num_experts}), got values in [{lo}, {hi}] "
            "(switch the check off with moelora.validation(False) for graph capture)")
    if not finite:
        raise ValueError("topk_weights contains NaN or Inf")
    if positive and not positive[0]:
        raise ValueError(f"normalize=True needs the kept topk_weights of every token to sum to a positive value of "
                         f"at least {torch.finfo(mixing).tiny} (the smallest normal {mixing}: the nonzero weights are "
                         f"divided by their sum in {mixing}); some token's sum to less (zero or less, or subnormal)")
    return True


def check_activation(activation) -> None:
    """TypeError unless ``activation`` is a callable (moe_ffn's, MoEFFN's and upcycle_ffn's)."""
    if not callable(activation) or isinstance(activation, torch.Tensor):
        hint = ""
        if isinstance(activation, str):  # name the function only where torch.nn.functional has it
            in_functional = callable(getattr(torch.nn.functional, activation, None))
            hint = (f" (e.g. torch.nn.functional.{activation})" if in_functional
                    else f" (torch.nn.functional has no {activation!r}; transformers' are "
                         f"transformers.activations.ACT2FN[name])")
        raise TypeError(f"activation must be a callable{hint}, got {type(activation).__name__} {activation!r}")


def check_moe_ffn_args(x, topk_ids, topk_weights, weights: dict, activation, normalize, stacked_gate) -> None:
    """Types, dtypes and devices of moelora.moe_ffn's arguments (shapes: moelora.ops.moe_ffn).

    ``weights``: {name: tensor or None} of w_in, b_in, w_out, b_out, w_gate, b_gate.
    """
    required = {n: weights[n] for n in ("w_in", "w_out")}
    check_tensor_args(x, topk_ids, topk_weights, required, {n: t for n, t in weights.items() if n not in required})
    check_activation(activation)
    for name, flag in (("normalize", normalize), ("stacked_gate", stacked_gate)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


def check_ids_in_range(name: str, ids: torch.Tensor, upper: int) -> None:
    """ids in [0, upper), with the rule of check_routing_values (one host read, only while
    moelora.validation is on and never under torch.compile or graph capture)."""
    if ids.numel() == 0 or not syncing_checks_enabled(ids):
        return
    lo, hi = host_values(*torch.aminmax(ids))
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}), got values in [{lo}, {hi}]")
