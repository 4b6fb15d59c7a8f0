"""moelora's Python operators (the custom ops torch.compile traces) registered with the
dispatcher directly, at the lowest host cost per call.

``torch.library.custom_op`` runs every call of its operator through Python layers of its own:
an autograd kernel that re-dispatches (the arguments boxed and unboxed twice), a check that
no output aliases an input, and the device wrapper. With the fused layer's 24 arguments and 8
outputs that costs about 35 us of host time per call beyond the implementation on the
development VM, against about 15 us when the same function is the operator's one kernel
(torch.library.Library.impl, "CompositeExplicitAutograd"); a compiled graph pays it twice per
layer and step (forward and backward op). :func:`custom_op` registers that way: the schema
inferred from the annotations by ``torch.library.infer_schema`` (as custom_op does), the
function run with dynamo disabled (torch.compiler.disable, as custom_op does), fake implementations and autograd
registered by ``torch.library.register_fake`` / ``register_autograd``. The implementations
never return their inputs or views of them (custom_op's aliasing check is what they promise).
"""

from __future__ import annotations

from typing import Callable

import torch

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
