"""The per-argument checks of the layers' hyper-parameters, shared by everything that takes them:
LayerSettings (so MoELoRALinear, MoELoRAConv, MoELoRAEmbedding and MoELoRAConfig), the
learned :class:`moelora.modules.router.Router`, MoEFFN / ``upcycle_ffn`` and MoLEx, so that the
same argument gets the same error everywhere (``check_field``). Its own module because the
Router, which the layers import, uses them too."""

from __future__ import annotations

import numbers

from moelora.ops.routing_modes import ROUTER_MODES
from moelora.ops.validation import is_finite_number, is_number as is_real  # is_real: an int or float, not a bool


def is_int(v) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_integral(v) -> bool:
    """An integer, a numpy one too, that is not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_bool(v) -> bool:
    return isinstance(v, bool)


def _finite_nonneg(v) -> bool:
    return is_finite_number(v) and v >= 0


# Kinds (check_field's entries) that several arguments share.
POSITIVE_INT = (is_int, lambda v: v >= 1, "a positive int")
BOOL = (is_bool, None, "a bool")
FINITE_NONNEG = (is_real, _finite_nonneg, "a finite number >= 0")


# field -> (type predicate, value predicate or None, what it must be): the checks of one
# field's value alone, for LayerSettings and (with its own fields) MoELoRAConfig, and for the
# same arguments of Router (under its own names), MoEFFN, upcycle_ffn and MoLEx. A wrong type
# raises TypeError, a value out of range ValueError (check_field). Checks that involve several
# fields (top_k <= num_experts, DoRA's single expert, ...) and the value checks left None here
# (dropout ranges, the router modes, init_lora_weights) are LayerSettings.__post_init__'s.
LAYER_FIELD_KINDS = {
    "num_experts": POSITIVE_INT,
    "top_k": POSITIVE_INT,
    "r": POSITIVE_INT,
    "lora_alpha": (is_real, is_finite_number, "a finite number"),
    "lora_dropout": (is_real, None, "a number in [0, 1)"),
    "use_rslora": BOOL,
    "share_lora_a": BOOL,
    "lora_a_dropout": (is_real, None, "a number in [0, 1)"),
    "router": (lambda v: isinstance(v, str), None, f"one of {ROUTER_MODES}"),
    "router_renormalize": BOOL,
    "router_jitter_noise": FINITE_NONNEG,
    "threshold_eps": FINITE_NONNEG,
    "threshold_eps_start": FINITE_NONNEG,
    "threshold_ramp_steps": (is_int, lambda v: v >= 0, "an int >= 0"),
    "task_shared_lora": BOOL,
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), None, "True, False or 'gaussian'"),
    "use_dora": BOOL,
    "router_aux_loss_coef": FINITE_NONNEG,
    "router_z_loss_coef": FINITE_NONNEG,
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
