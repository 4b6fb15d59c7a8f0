"""moelora's Python operators (the custom ops torch.compile traces) registered with the
dispatcher directly, at a lower host cost per call than ``torch.library.custom_op``.

``torch.library.custom_op`` runs every call of its operator through Python layers of its own
beside the autograd kernel: a device wrapper with a per-call check whether the kernel is
disabled, and a check that no output aliases an input. For the fused layer's forward op (24
arguments, 8 outputs; launches skipped, one process, best of 5 x 2000 calls on the development
VM) a call took 87.5 us through custom_op and 78.6 us registered here, the implementation
itself 50.1 us; of the 28.5 us left, the dispatcher's boxing is about 12.5, the autograd
kernel (``register_autograd``; it runs in compiled graphs too, with grad mode off) about 13.5
and dynamo's disable wrapper about 3. A compiled graph calls two such ops per layer and step
(forward and backward): a compiled training step of 8 MoELoRALinear layers took 326 us per
layer with the ops on custom_op and 277 us registered here (same process, both compiled,
best of 6 x 300 steps).

:func:`custom_op` registers the function as the operator's one kernel
(torch.library.Library.impl, "CompositeExplicitAutograd"): the schema inferred from the
annotations by ``torch.library.infer_schema`` (as custom_op does), the function run with dynamo
disabled (torch.compiler.disable, as custom_op does), fake implementations registered by
``torch.library.register_fake``. The implementations never return their inputs or views of
them (custom_op's aliasing check is what they promise; ``torch.library.opcheck`` checks it in
the tests).

Autograd: the ops that only compiled graphs call (moe_lora, moe_lora_linear and moe_ffn's
forward and backward) carry none; under torch.compile each pair is differentiated by an
autograd.Function that dynamo traces, so no autograd kernel runs per call. ``segment_linear``,
which eager code calls too, registers its backward with ``register_autograd``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.autograd.forward_ad as forward_ad
import torch.autograd.profiler as autograd_profiler

_LIBRARY = torch.library.Library("moelora", "FRAGMENT")


class CustomOp:
    """A Python operator ``moelora::<name>``: calling it calls the operator (``torch.ops.moelora.<name>``);
    ``register_fake`` and ``register_autograd`` as on torch.library.custom_op's operators."""

    def __init__(self, name: str, fn: Callable):
        self.name = f"moelora::{name}"
        _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIBRARY.impl(name, torch.compiler.disable(fn), "CompositeExplicitAutograd")
        self.fn = fn
        self.default = getattr(torch.ops.moelora, name).default
        self.__doc__ = fn.__doc__

    def __call__(self, *args):
        return self.default(*args)

    def register_fake(self, fn: Callable) -> Callable:
        torch.library.register_fake(self.name, fn, lib=_LIBRARY)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        torch.library.register_autograd(self.name, backward, setup_context=setup_context, lib=_LIBRARY)


def custom_op(name: str) -> Callable[[Callable], CustomOp]:
    """Decorator: the annotated function as the operator ``moelora::<name>`` (see the module docstring)."""
    return lambda fn: CustomOp(name, fn)


class EagerFunction:
    """An autograd.Function given as ``forward(*inputs)``, ``setup_context(ctx, inputs, output)``
    and ``backward(ctx, *grads)``, built twice: with ctx passed to forward, which ``apply`` runs
    (a third of the host time per call: 7.5 against 22 us on the development VM), and in the
    setup_context form, which ``apply`` runs under torch.func transforms (grad, vmap), which
    need it. Same gradients either way. ``vmappable``: the setup_context form gets torch.func's
    generated vmap rule (forward and backward of PyTorch ops that vmap batches; without it vmap
    raises "does not have vmap support")."""

    __slots__ = ("eager", "functorch")

    def __init__(self, name: str, forward: Callable, setup_context: Callable, backward: Callable,
                 vmappable: bool = False):
        def forward_with_ctx(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        self.eager = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward_with_ctx),
                                                             "backward": staticmethod(backward)})
        self.functorch = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                                 "setup_context": staticmethod(setup_context),
                                                                 "backward": staticmethod(backward),
                                                                 "generate_vmap_rule": vmappable})

    def apply(self, *inputs):
        if torch._C._are_functorch_transforms_active():
            return self.functorch.apply(*inputs)
        return apply_function(self.eager, *inputs)


class _NoGraphContext:
    """The ctx of an autograd.Function's forward called outside autograd (:func:`apply_eager`):
    what the forward records for a backward is dropped with it."""

    def save_for_backward(self, *tensors) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def apply_eager(function: type, *args):
    """``function.apply(*args)`` for an autograd.Function whose forward takes a ctx; with grad mode
    off (evaluation, generation, ``torch.no_grad``, ``torch.inference_mode``), where apply records
    no graph, its forward called directly with a ctx that keeps nothing: the same outputs without
    apply's own work, about 12 of the fused layer's 68 us of host time per call in inference
    (launches skipped, T 1, the development VM). Under torch.func transforms and in forward-mode AD
    (``torch.autograd.forward_ad.dual_level``, which grad mode does not turn off), apply: it raises
    there for want of a jvp, where the forward called directly would drop its inputs' tangents.
    Under torch.profiler, apply too, so that a trace names the op's range (``_MoELoRALinearFn``) as
    in training. Inside ``torch.inference_mode`` apply runs with grad mode off (:func:`apply_function`)."""
    if (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
            or forward_ad_active() or autograd_profiler._is_profiler_enabled):
        return apply_function(function, *args)
    return function.forward(_NoGraphContext(), *args)


def distinct_inputs(*args) -> list:
    """``args`` with every tensor that already came earlier replaced by a view of it, for an autograd.Function's
    apply under torch.compile: dynamo refuses one tensor passed twice ("duplicate tensor input", a graph break),
    such as moe_lora's x given as its base_out (a residual). The view's gradient reaches the tensor; nothing
    changes where the tensors differ. For the traced paths only (a view per repeat). Compared with ``is``, not
    ``id()``: torch 2.11's dynamo cannot trace ``id()`` of a tensor made in the traced function."""
    out = []
    for arg in args:
        if isinstance(arg, torch.Tensor) and any(arg is earlier for earlier in out):
            arg = arg.view_as(arg)
        out.append(arg)
    return out


def forward_ad_active() -> bool:
    """Whether forward-mode AD runs (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad.dual_level``):
    grad mode does not turn it off, and an op run below autograd (a custom op's registered autograd, a native op
    called directly, an autograd.Function's forward) drops its inputs' tangents without an error."""
    return forward_ad._current_level >= 0


def apply_function(function, *args):
    """``function.apply(*args)`` (an autograd.Function; :meth:`EagerFunction.apply` and
    :func:`apply_eager` run theirs through this), with grad mode off inside ``torch.inference_mode``
    (where ``torch.enable_grad`` may have turned it on): autograd records nothing there, PyTorch's own
    ops make no graph, but a Function's apply would record one and refuse to save the inference
    tensors its forward made ("Inference tensors cannot be saved for backward"). Traced by
    torch.compile as ``function.apply``."""
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.no_grad():
            return function.apply(*args)
    return function.apply(*args)
