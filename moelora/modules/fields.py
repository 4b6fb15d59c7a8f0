"""The per-argument checks of the layers' hyper-parameters, shared by everything that takes them:
LayerSettings (so MoELoRALinear, MoELoRAConv, MoELoRAEmbedding and MoELoRAConfig), the
learned :class:`moelora.modules.router.Router`, MoEFFN / ``upcycle_ffn`` and MoLEx, so that the
same argument gets the same error everywhere (``check_field``). Its own module because the
Router, which the layers import, uses them too."""

from __future__ import annotations

from moelora.ops.routing_modes import ROUTER_MODES
from moelora.ops.validation import is_finite_number


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _finite(v) -> bool:
    return is_finite_number(v)  # an int beyond float's range is not (math.isfinite would raise)


def _finite_nonneg(v) -> bool:
    return is_finite_number(v) and v >= 0


# field -> (type predicate, value predicate or None, what it must be): the checks of one
# field's value alone, for LayerSettings and (with its own fields) MoELoRAConfig, and for the
# same arguments of Router (under its own names), MoEFFN, upcycle_ffn and MoLEx. A wrong type
# raises TypeError, a value out of range ValueError (check_field). Checks that involve several
# fields (top_k <= num_experts, DoRA's single expert, ...) and the value checks left None here
# (dropout ranges, the router modes, init_lora_weights) are LayerSettings.__post_init__'s.
LAYER_FIELD_KINDS = {
    "num_experts": (_is_int, lambda v: v >= 1, "a positive int"),
    "top_k": (_is_int, lambda v: v >= 1, "a positive int"),
    "r": (_is_int, lambda v: v >= 1, "a positive int"),
    "lora_alpha": (_is_real, _finite, "a finite number"),
    "lora_dropout": (_is_real, None, "a number in [0, 1)"),
    "use_rslora": (_is_bool, None, "a bool"),
    "share_lora_a": (_is_bool, None, "a bool"),
    "lora_a_dropout": (_is_real, None, "a number in [0, 1)"),
    "router": (lambda v: isinstance(v, str), None, f"one of {ROUTER_MODES}"),
    "router_renormalize": (_is_bool, None, "a bool"),
    "router_jitter_noise": (_is_real, _finite_nonneg, "a finite number >= 0"),
    "threshold_eps": (_is_real, _finite_nonneg, "a finite number >= 0"),
    "threshold_eps_start": (_is_real, _finite_nonneg, "a finite number >= 0"),
    "threshold_ramp_steps": (_is_int, lambda v: v >= 0, "an int >= 0"),
    "task_shared_lora": (_is_bool, None, "a bool"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), None, "True, False or 'gaussian'"),
    "use_dora": (_is_bool, None, "a bool"),
    "router_aux_loss_coef": (_is_real, _finite_nonneg, "a finite number >= 0"),
    "router_z_loss_coef": (_is_real, _finite_nonneg, "a finite number >= 0"),
}


def check_field(name: str, value, kind: tuple) -> None:
    """TypeError for a value of the wrong type (a string for a number, 4.0 for an int), ValueError
    for an impossible one (inf, a count below 1); both name the field as ``name``. ``kind``: a
    (type predicate, value predicate or None, what it must be) entry of LAYER_FIELD_KINDS."""
    type_ok, value_ok, what = kind
    if not type_ok(value):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if value_ok is not None and not value_ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
