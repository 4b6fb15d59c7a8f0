"""Autograd and fake (meta) kernels of the routing and dispatch ops.

Gradients (all computed with the ops themselves or in PyTorch, fixed-order, no atomics):
  dispatch  out[i] = w[p_i] x[p_i // k]:  dx = combine(g, w),  dw[t,j] = <x[t], g[inv[t,j]]>
  combine   out[t] = sum_j w[t,j] y[inv[t,j]]:  dy = dispatch(g, w),  dw[t,j] = <g[t], y[inv[t,j]]>
  pair_dot  out[t,j] = <a[t], b[inv[t,j]]>:  da = combine(b, g),  db = dispatch(a, g)
  router_topk: d logits through weights, prob_sums and lse (route_backward): one Triton kernel
  (launchers.router_backward, the one that differentiates the fused layer's router) where the
  Triton backend runs, else recomputed from the logits in PyTorch; ids and counts are not
  differentiable. Logits read as -inf (NaN, -inf, rows of only -inf) get zero gradient.
For the native ops they are registered with torch.library.register_autograd / register_fake
(what torch.compile traces); in eager mode the native ops run below autograd, inside
autograd.Functions with the same formulas when an input needs a gradient (no custom-op autograd
dispatch: tens of microseconds of host time per call), and the PyTorch fallbacks get the same
formulas through autograd.Functions too.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from moelora.kernels import launchers
from moelora.kernels.launchers import accumulator_dtype
from moelora.ops import native
from moelora.ops import routing_torch as fb
from moelora.ops.backend import kernels_run
from moelora.ops.registration import CustomOp, EagerFunction


def route_backward(logits, ids, weights, mode, renormalize, g_weights, g_prob_sums, g_lse):
    """Gradient w.r.t. logits of router_topk's (weights, prob_sums, lse): one Triton kernel where
    the Triton backend runs (the custom op moelora::router_topk_backward while torch.compile
    traces), else PyTorch; PyTorch also where the gradient must itself be differentiable
    (grad mode on in the backward: ``create_graph=True``), which the kernel's is not."""
    if kernels_run(logits.device):
        # dynamo tracing the backward (torch 2.11 gives it plain tensors), or AOT autograd's
        # fake / functional tensors
        if torch.compiler.is_compiling() or type(logits) is not torch.Tensor:
            return router_topk_backward(logits, ids, weights, g_weights, g_prob_sums, g_lse, mode, renormalize)
        if not torch.is_grad_enabled():
            return _router_topk_backward(logits, ids, weights, g_weights, g_prob_sums, g_lse, mode, renormalize)
    return _route_backward_torch(logits, ids, weights, mode, renormalize, g_weights, g_prob_sums, g_lse)


def _router_topk_backward(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                          g_weights: Optional[torch.Tensor], g_prob_sums: Optional[torch.Tensor],
                          g_lse: Optional[torch.Tensor], mode: int, renormalize: bool) -> torch.Tensor:
    """route_backward on the Triton kernel (launchers.router_backward); gradients not given count as 0."""
    acc = accumulator_dtype(logits.dtype)
    (T, E), k = logits.shape, ids.shape[1]
    if g_weights is None:
        g_weights = logits.new_zeros(T, k, dtype=acc)
    if g_prob_sums is not None or g_lse is not None:
        g_prob_sums = g_prob_sums if g_prob_sums is not None else logits.new_zeros(E, dtype=acc)
        g_lse = g_lse if g_lse is not None else logits.new_zeros(T, dtype=acc)
    name = "topk_softmax" if mode == fb.TOPK_SOFTMAX else "softmax_topk" if renormalize else "softmax_topk_plain"
    router = launchers.RouterGrad(logits, None, None, name, 0.0, 0.0)
    return launchers.router_backward(g_weights, ids, weights, router, g_prob_sums=g_prob_sums, g_lse=g_lse,
                                     out_dtype=logits.dtype)


router_topk_backward = CustomOp("router_topk_backward", _router_topk_backward)


@router_topk_backward.register_fake
def _(logits, ids, weights, g_weights, g_prob_sums, g_lse, mode, renormalize):
    return torch.empty_like(logits)


def _route_backward_torch(logits, ids, weights, mode, renormalize, g_weights, g_prob_sums, g_lse):
    """route_backward in PyTorch (devices without Triton, the torch backend)."""
    x = fb.clean_logits(logits)
    probs, _, _ = fb.softmax_stats(x)
    ids = ids.long()
    g_probs = torch.zeros_like(probs)
    g_x = torch.zeros_like(probs)
    if g_prob_sums is not None:
        g_probs = g_probs + g_prob_sums.to(probs.dtype).unsqueeze(0)
    if g_weights is not None:
        gw = g_weights.to(probs.dtype)
        w = weights.to(probs.dtype)
        if mode == fb.SOFTMAX_TOPK:
            if renormalize:
                total = probs.gather(1, ids).sum(-1, keepdim=True)
                gw = torch.where(total > 0, (gw - (gw * w).sum(-1, keepdim=True)) / total,
                                 torch.zeros_like(gw))
            g_probs = g_probs.scatter_add(1, ids, gw)
        else:  # weights = softmax of the selected logits
            g_x = g_x.scatter_add(1, ids, w * (gw - (gw * w).sum(-1, keepdim=True)))
    g_x = g_x + probs * (g_probs - (probs * g_probs).sum(-1, keepdim=True))
    if g_lse is not None:
        g_x = g_x + g_lse.to(probs.dtype).unsqueeze(1) * probs
    g_x = torch.where(x == float("-inf"), torch.zeros_like(g_x), g_x)
    return g_x.to(logits.dtype)


def _cast_like(grad, ref):
    return None if grad is None else grad.to(ref.dtype)


# Dispatch below the autograd key: a custom op then runs its kernel without its (Python) autograd
# wrapper, whose host time is tens of microseconds per call.
below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


def _below(op):
    """``op`` dispatched below the autograd key."""
    def run(*args):
        with below_autograd():
            return op(*args)
    return run


def _eager(op, function=None):
    """A native custom op with its autograd: while torch.compile traces, the op itself (its
    registered autograd); in eager mode ``function`` (an autograd.Function over the op below
    autograd, with the same gradients) when an input needs a gradient, else the op below
    autograd: the custom-op autograd dispatch costs tens of microseconds per call."""
    below = _below(op)

    def run(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        if function is not None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        return below(*args)
    return run


class _Ops:
    """The five ops, native (torch.ops.moelora, see _eager) or PyTorch fallbacks."""

    def __init__(self, native: bool):
        if native:
            ns = torch.ops.moelora
            self.router_topk = _eager(ns.router_topk, _route_function("_NativeRouteFn", _below(ns.router_topk)))
            self.dispatch_metadata = _eager(ns.dispatch_metadata)
            self.dispatch = _eager(ns.dispatch, _saving_function("_NativeDispatchFn", _below(ns.dispatch),
                                                                 _dispatch_grads, native=True))
            self.combine = _eager(ns.combine, _saving_function("_NativeCombineFn", _below(ns.combine),
                                                               _combine_grads, native=True))
            self.pair_dot = _eager(ns.pair_dot, _saving_function("_NativePairDotFn", _below(ns.pair_dot),
                                                                 _pair_dot_grads, native=True))
        else:
            self.router_topk, self.dispatch_metadata = _RouteFn.apply, fb.dispatch_metadata
            self.dispatch, self.combine, self.pair_dot = _DispatchFn.apply, _CombineFn.apply, _PairDotFn.apply


def _dispatch_grads(ops, needs, x, sp, inv, w, g):
    gx = ops.combine(g, sp, inv, w) if needs[0] else None
    gw = _cast_like(ops.pair_dot(x, g, sp, inv), w) if (w is not None and needs[3]) else None
    return gx, None, None, gw


def _combine_grads(ops, needs, y, sp, inv, w, g):
    gy = ops.dispatch(g, sp, inv, w) if needs[0] else None
    gw = _cast_like(ops.pair_dot(g, y, sp, inv), w) if (w is not None and needs[3]) else None
    return gy, None, None, gw


def _pair_dot_grads(ops, needs, a, b, sp, inv, g):
    ga = ops.combine(b, sp, inv, g) if needs[0] else None
    gb = ops.dispatch(a, sp, inv, g) if needs[1] else None
    return ga, gb, None, None


def _save_route(ctx, logits, out, mode, renormalize):
    ctx.save_for_backward(logits, out[1], out[0])
    ctx.mode, ctx.renormalize = mode, renormalize
    ctx.set_materialize_grads(False)  # no zero gradients built for ids, counts or unused outputs


def _route_grads(ctx, g_w, g_ids, g_counts, g_ps, g_lse):
    logits, ids, weights = ctx.saved_tensors
    return route_backward(logits, ids, weights, ctx.mode, ctx.renormalize, g_w, g_ps, g_lse), None, None, None


# ---- autograd.Functions: the PyTorch fallbacks, and the native ops in eager mode ---------------
def _route_setup(ctx, inputs, output):
    logits, _, mode, renormalize = inputs
    _save_route(ctx, logits, output, mode, renormalize)


def _save_all(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _route_function(name: str, router_topk) -> EagerFunction:
    """An autograd.Function running ``router_topk`` (the fallback, or the native op below
    autograd) with the routing op's gradients."""

    def setup(ctx, inputs, output):
        _route_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1], output[2])

    return EagerFunction(name, router_topk, setup, _route_grads)


def _saving_function(name: str, forward, grads, native: bool = False) -> EagerFunction:
    """An autograd.Function running ``forward`` (a fallback, or a native op below autograd), its
    inputs saved, whose backward is ``grads`` on the same kind of ops (the native ops register the
    same ``grads`` for torch.compile)."""

    def bwd(ctx, g):
        return grads(NATIVE_OPS if native else FALLBACK_OPS, ctx.needs_input_grad, *ctx.saved_tensors, g)

    return EagerFunction(name, forward, _save_all, bwd)


_RouteFn = _route_function("_RouteFn", fb.router_topk)
_DispatchFn = _saving_function("_DispatchFn", fb.dispatch, _dispatch_grads)
_CombineFn = _saving_function("_CombineFn", fb.combine, _combine_grads)
_PairDotFn = _saving_function("_PairDotFn", fb.pair_dot, _pair_dot_grads)


FALLBACK_OPS = _Ops(native=False)
NATIVE_OPS = _Ops(native=True) if native.HAS_C else None


# ---- Native ops: fake kernels and autograd -----------------------------------------------
def _register_native():
    lib = "moelora::"

    @torch.library.register_fake(lib + "router_topk")
    def _router_fake(logits, top_k, mode, renormalize):
        T, E = logits.shape
        acc = accumulator_dtype(logits.dtype)
        return (logits.new_empty((T, top_k), dtype=acc), logits.new_empty((T, top_k), dtype=torch.int32),
                logits.new_empty((E,), dtype=torch.int64), logits.new_empty((E,), dtype=acc),
                logits.new_empty((T,), dtype=acc))

    @torch.library.register_fake(lib + "dispatch_metadata")
    def _meta_fake(topk_ids, num_experts, block_size):
        T, k = topk_ids.shape
        n = T * k
        i64 = dict(dtype=torch.int64)
        padded = block_size > 0
        mp = fb.padded_length(n, num_experts, block_size) if padded else 0
        return (topk_ids.new_empty((num_experts,), **i64), topk_ids.new_empty((num_experts + 1,), **i64),
                topk_ids.new_empty((n,), **i64), topk_ids.new_empty((T, k), **i64),
                topk_ids.new_empty((num_experts + 1 if padded else 0,), **i64), topk_ids.new_empty((mp,), **i64),
                topk_ids.new_empty((T, k) if padded else (0, 0), **i64),
                topk_ids.new_empty((mp // block_size if padded else 0,), dtype=torch.int32))

    # The fakes are the ops' Meta kernels too, which the dispatcher picks when any input is on the
    # meta device: the kernels' device checks, else data on another device gets an empty result there.
    def _same_device(op, data_name, data, **tensors):
        for name, t in tensors.items():
            if t is not None and t.device != data.device:
                raise ValueError(f"{op}: {name} must be on {data_name}'s device {data.device}, got {t.device}")

    @torch.library.register_fake(lib + "dispatch")
    def _dispatch_fake(x, sorted_pairs, inverse, weights):
        _same_device("dispatch", "x", x, sorted_pairs=sorted_pairs, inverse=inverse, weights=weights)
        return x.new_empty((sorted_pairs.shape[0], x.shape[1]))

    @torch.library.register_fake(lib + "combine")
    def _combine_fake(y, sorted_pairs, inverse, weights):
        _same_device("combine", "y_sorted", y, sorted_pairs=sorted_pairs, inverse=inverse, weights=weights)
        return y.new_empty((inverse.shape[0], y.shape[1]))

    @torch.library.register_fake(lib + "pair_dot")
    def _pair_dot_fake(a, b, sorted_pairs, inverse):
        _same_device("pair_dot", "b_sorted", b, sorted_pairs=sorted_pairs, inverse=inverse, a=a)
        return a.new_empty(tuple(inverse.shape), dtype=accumulator_dtype(a.dtype))

    torch.library.register_autograd(lib + "router_topk", _route_grads, setup_context=_route_setup)
    torch.library.register_autograd(
        lib + "dispatch", lambda ctx, g: _dispatch_grads(NATIVE_OPS, ctx.needs_input_grad, *ctx.saved_tensors, g),
        setup_context=_save_all)
    torch.library.register_autograd(
        lib + "combine", lambda ctx, g: _combine_grads(NATIVE_OPS, ctx.needs_input_grad, *ctx.saved_tensors, g),
        setup_context=_save_all)
    torch.library.register_autograd(
        lib + "pair_dot", lambda ctx, g: _pair_dot_grads(NATIVE_OPS, ctx.needs_input_grad, *ctx.saved_tensors, g),
        setup_context=_save_all)


if native.HAS_C:
    _register_native()
