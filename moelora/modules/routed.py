"""What every module with a learned router records after a forward: its weighted auxiliary
loss and routing statistics (:class:`RoutedModule`, read by ``moelora.aux_loss`` and
``moelora.router_stats``; the losses themselves are moelora.ops.losses)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import List, Optional

import torch
import torch.nn as nn

from moelora.ops.losses import masked_aux_losses, routing_aux_losses, routing_entropy


class RouterStats(Mapping):
    """One forward's routing statistics, computed when read: ``load`` (slots per token routed
    to each expert, [E]; threshold routing: the kept slots, weight > 0), ``entropy`` (mean entropy in
    nats of the softmax over all E logits) and the unweighted
    ``load_balancing_loss`` and ``z_loss`` (from ``aux_stats``). All detached. With ``mask``
    ([T] bool, the real tokens of an aux-loss mask) all four are over the real tokens only
    (the first key read then reads the number of real tokens on the host, once)."""

    KEYS = ("load", "entropy", "load_balancing_loss", "z_loss")

    def __init__(self, counts: torch.Tensor, logits: Optional[torch.Tensor], aux_stats: torch.Tensor,
                 num_tokens: int, mask: Optional[torch.Tensor] = None):
        self._counts, self._logits, self._aux_stats, self._num_tokens = counts, logits, aux_stats, num_tokens
        self._mask = mask
        self._real_tokens: Optional[int] = None  # the mask's count, read on the host at the first key read

    @property
    def num_routed(self) -> int:
        """The tokens the statistics are over: the forward's, or its aux-loss mask's real ones (read
        on the host, once)."""
        if self._mask is None:
            return self._num_tokens
        if self._real_tokens is None:
            self._real_tokens = int(self._mask.sum())
        return self._real_tokens

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.KEYS:
            raise KeyError(key)
        num_tokens = self.num_routed
        if num_tokens == 0:
            raise ValueError("routing statistics are undefined: this module routed no tokens in its last forward"
                             + ("" if self._mask is None else " that its aux-loss mask counts"))
        if key == "load":
            return self._counts.detach().float() / num_tokens
        if key == "entropy":
            return routing_entropy(torch.softmax(self._logits.detach().float(), dim=-1), self._mask)
        return self._aux_stats[0 if key == "load_balancing_loss" else 1].detach()

    def __iter__(self):
        return iter(self.KEYS)

    def __len__(self) -> int:
        return len(self.KEYS)


def real_tokens_of_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """[batch, sequence] of the real tokens (nonzero; 0 for padding) of a 4-D attention mask ([batch, heads or 1,
    query, key], as transformers' attention takes it in place of the 2-D ``attention_mask``: bool or integer, nonzero
    where a query attends a key; floating point, additive, 0 where it attends): the keys some query attends (no
    query attends padding). A mask of another number of dimensions is returned as it is."""
    if mask.dim() != 4:
        return mask
    attends = (mask == 0) if mask.is_floating_point() else (mask != 0)
    return attends.any(dim=2).any(dim=1)


def _without_routing_record(inherited_getstate):
    """A ``__getstate__`` returning the inherited state with the routing record cleared."""

    def __getstate__(self):
        record = dict(self.__dict__)
        self.clear_routing_record()
        try:
            return inherited_getstate(self)
        finally:
            self.__dict__.update(record)

    return __getstate__


def torchscript_refusal(what: str, api: str) -> RuntimeError:
    """The error of torch.jit.script / torch.jit.trace (and of what builds on them: torch.onnx.export with
    ``dynamo=False``) for ``what``, a moelora module: TorchScript cannot compile its forward, and a trace would
    fail inside it (sizes traced as tensors) or freeze its shape- and value-dependent choices."""
    return RuntimeError(
        f"{api} cannot capture {what}: TorchScript does not support moelora's modules (their forward branches on "
        "tensor shapes and runs moelora's custom ops); deploy with torch.export.export (README: torch.export) or "
        "compile with torch.compile. torch.jit.trace records a merged adapter layer (merge_and_unload) or one with "
        "its adapter disabled (as its base layer), and MoEFFN on the torch backend")


def _refusing_slow_forward(self, *args, **kwargs):
    """nn.Module.__call__ runs ``_slow_forward`` in place of ``forward`` under torch.jit.trace: refused with
    :func:`torchscript_refusal` unless the module's ``jit_traceable(*args, **kwargs)`` says its forward records
    as it runs (it pays nothing otherwise: eager calls never reach it)."""
    if not self.jit_traceable(*args, **kwargs):
        raise torchscript_refusal(type(self).__name__, "torch.jit.trace")
    return nn.Module._slow_forward(self, *args, **kwargs)


class RoutedModule:
    """Mixin: stores the last forward's auxiliary losses and routing statistics.

    Subclasses set ``aux_loss_coef`` and ``z_loss_coef`` and call :meth:`_record_routing`;
    ``last_aux_loss`` / ``last_router_stats`` read the record (moelora.aux_loss, router_stats).
    An aux-loss mask (``moelora.set_aux_loss_mask``, ``use_aux_loss_mask``, or MoELoRAModel's
    ``aux_loss_mask``) limits both to the real tokens (:func:`moelora.ops.losses.masked_aux_losses`).
    Copies (``copy.deepcopy``, pickling) start with no record: the stored loss carries its
    forward's autograd graph, which deepcopy refuses. TorchScript refuses the module with an error
    naming torch.export (:func:`torchscript_refusal`; ``jit_traceable`` lists what torch.jit.trace records).
    """

    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    takes_aux_loss_mask = True  # whether moelora.set_aux_loss_mask gives this module the mask (MoLEx: no)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__getstate__" not in cls.__dict__:  # nn.Module's comes first in the MRO: wrap it
            cls.__getstate__ = _without_routing_record(cls.__getstate__)
        if "_slow_forward" not in cls.__dict__:  # nn.Module's likewise
            cls._slow_forward = _refusing_slow_forward

    def __prepare_scriptable__(self):
        """torch.jit.script's hook (on the module or any module holding it): refused, naming torch.export."""
        raise torchscript_refusal(type(self).__name__, "torch.jit.script")

    def jit_traceable(self, *args, **kwargs) -> bool:
        """Whether torch.jit.trace records this module's forward on these arguments as it computes them
        (none here; subclasses name theirs)."""
        return False

    def clear_routing_record(self) -> None:
        """Forget the last forward's loss and statistics (moelora.aux_loss then skips this module)."""
        self.__dict__["_last_aux_loss"] = None
        self.__dict__["_last_router_stats"] = None
        self.__dict__["_aux_loss_lost_grad"] = False

    @property
    def aux_loss_lost_grad(self) -> bool:
        """Whether the last forward ran in training mode without gradients (so its stored aux loss
        has none): inside a forward with gradients, that is reentrant gradient checkpointing
        (``torch.utils.checkpoint(..., use_reentrant=True)``), whose checkpointed forward runs under
        ``torch.no_grad()``; the recomputation in backward comes too late for the aux loss."""
        return self.__dict__.get("_aux_loss_lost_grad", False)

    @property
    def aux_loss_mask(self) -> Optional[torch.Tensor]:
        """The real tokens ([T] bool, False for padding) this module's aux loss and statistics are
        taken over, or None (every token); set by ``moelora.set_aux_loss_mask``."""
        return self.__dict__.get("_aux_loss_mask")

    def aux_loss_mask_of(self, num_tokens: int, device: torch.device) -> Optional[torch.Tensor]:
        """The aux-loss mask ([T] bool) on ``device`` for a forward routing ``num_tokens`` tokens, or
        None; a ValueError where the mask has another number of tokens."""
        mask = self.__dict__.get("_aux_loss_mask")
        if mask is None:
            return None
        if mask.numel() != num_tokens:
            raise ValueError(
                f"the aux-loss mask has {mask.numel()} tokens, but this {type(self).__name__} routed {num_tokens} in "
                "its forward: the mask ([batch, sequence], as an attention_mask) must cover the tokens of every "
                "routed module it is set on, in the order of the module's input; set it on the part of the model "
                "whose tokens it covers (moelora.set_aux_loss_mask(submodule, mask))")
        # no copy where it is already there; a copy to the host waits for the device
        return mask.to(device, non_blocking=device.type != "cpu")

    @property
    def last_aux_loss(self) -> Optional[torch.Tensor]:
        """The weighted auxiliary loss (0-d) of this module's last forward, or None."""
        return self.__dict__.get("_last_aux_loss")

    @property
    def last_router_stats(self) -> Optional[Mapping]:
        """The routing statistics of this module's last forward (see :class:`RouterStats`), or None."""
        return self.__dict__.get("_last_router_stats")

    def routing_record(self) -> tuple:
        """(last_aux_loss, last_router_stats, aux_loss_lost_grad), for :meth:`restore_routing_record`."""
        return self.last_aux_loss, self.last_router_stats, self.aux_loss_lost_grad

    def restore_routing_record(self, record: tuple) -> None:
        """Put back a record saved by :meth:`routing_record` (a forward that must not replace it)."""
        (self.__dict__["_last_aux_loss"], self.__dict__["_last_router_stats"],
         self.__dict__["_aux_loss_lost_grad"]) = record

    def _record_routing(self, routing, aux_loss: Optional[torch.Tensor] = None,
                        aux_stats: Optional[torch.Tensor] = None) -> None:
        """Keep this forward's weighted aux loss and statistics from a learned ``routing``
        (moelora.ops.routing_modes.Routing). ``aux_loss`` and ``aux_stats`` (from the fused layer's
        op, over the aux-loss mask's real tokens where one is held, as the routing's counts) are
        computed here when not given (moelora.ops.losses.routing_aux_losses; with an aux-loss mask,
        moelora.ops.losses.masked_aux_losses from the routing's logits, which must then be
        differentiable). A gradient checkpoint's recomputation in backward (eager: backward's graph task
        runs) computes them as the forward did (non-reentrant checkpointing checks that it saves as many
        tensors) but keeps the forward's record: its loss would hold the recomputed inputs' graph until the
        next forward (the activations checkpointing frees), and a layer called several times per forward would
        end with its first call's record (recomputed last) instead of its last call's."""
        mask = self.aux_loss_mask_of(routing.weights.shape[0], routing.weights.device)
        counts = routing.counts
        if aux_loss is None and mask is not None:
            router = getattr(self, "router", None)
            aux_loss, aux_stats, counts = masked_aux_losses(
                routing.logits, routing.ids, routing.weights, mask, self.aux_loss_coef, self.z_loss_coef,
                count_kept=getattr(router, "mode", None) == "threshold")
        elif aux_loss is None:
            aux_loss, aux_stats = routing_aux_losses(routing, self.aux_loss_coef, self.z_loss_coef)
        if recomputing_in_backward():
            return  # a checkpoint's recomputation in backward
        # Only keep a graph when it can be used: no stale autograd graphs after eval passes.
        # (Written to __dict__: nn.Module.__setattr__ costs microseconds per call.)
        grad = torch.is_grad_enabled()
        self.__dict__["_last_aux_loss"] = aux_loss if grad else aux_loss.detach()
        self.__dict__["_aux_loss_lost_grad"] = not grad and self.training
        self.__dict__["_last_router_stats"] = RouterStats(counts, routing.logits, aux_stats,
                                                          routing.weights.shape[0], mask)


def running_in_backward() -> bool:
    """Whether eager code runs inside backward (its graph task: a gradient checkpoint's recomputation); False
    while torch.compile traces, which cannot read it."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def recomputing_in_backward() -> bool:
    """Whether a routed module runs in a checkpoint's recomputation in backward, where it computes its losses as the
    forward did but stores no record (:meth:`RoutedModule._record_routing`; outside :func:`recording_in_backward`)."""
    return running_in_backward() and not getattr(_RECORDING_IN_BACKWARD, "on", False)


# Set (per thread: backward runs on the device's autograd thread) while a forward recomputed in backward records as
# a forward: a checkpoint around the whole MoELoRAModel, whose forward adds the recorded aux losses to its loss.
_RECORDING_IN_BACKWARD = threading.local()


@contextlib.contextmanager
def recording_in_backward():
    """The routed modules record in this block even while backward's graph task runs (see
    :meth:`RoutedModule._record_routing`); the caller gives back the forward's records after it."""
    held = getattr(_RECORDING_IN_BACKWARD, "on", False)
    _RECORDING_IN_BACKWARD.on = True
    try:
        yield
    finally:
        _RECORDING_IN_BACKWARD.on = held


def routed_modules(model: nn.Module) -> List["RoutedModule"]:
    """The routed modules of ``model`` (itself included), each once, in ``model.modules()``'s order, found without
    building the modules' names: half the host time of ``modules()`` (a wrapper's training forward walks the model
    twice, clearing the records and summing the aux losses; a walk of a 1,000-module model took 0.65 ms that way)."""
    found, seen, pending = [], set(), [model]
    while pending:
        module = pending.pop()
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, RoutedModule):
            found.append(module)
        pending.extend(reversed(module._modules.values()))  # so that the first child is taken next
    return found


def routing_records(model: nn.Module) -> list:
    """(module, :meth:`RoutedModule.routing_record`) of every routed module of ``model``, which
    :func:`restore_routing_records` gives back (after what clears them: ``set_adapter``'s round trip)."""
    return [(m, m.routing_record()) for m in routed_modules(model)]


def restore_routing_records(records: list) -> None:
    """Give each module the record :func:`routing_records` took of it."""
    for module, record in records:
        module.restore_routing_record(record)
