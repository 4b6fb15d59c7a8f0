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
from moelora.ops.registration import CustomOp, EagerFunction, forward_ad_active


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
    return logits.new_empty(logits.shape)


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
                kept = total > 0  # else a row of only -inf: divided by 1, not 0 (a NaN double backward)
                gw = torch.where(kept, (gw - (gw * w).sum(-1, keepdim=True)) / torch.where(kept, total, 1.0),
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


def _forward_ad_aware(run, plain):
    """``run``, except in forward-mode AD (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``'s
    dual level), where ``plain`` runs: the op's PyTorch formulas (routing_torch, the same contract) as
    plain PyTorch ops, which carry the inputs' tangents (and reverse-mode gradients). The fallbacks'
    autograd.Functions have no jvp (forward-mode AD would raise)."""
    def dispatch(*args):
        if forward_ad_active():
            return plain(*args)
        return run(*args)
    return dispatch


def _eager(op, function=None, plain=None):
    """A native custom op with its autograd: while torch.compile traces, the op itself (its
    registered autograd); in eager mode ``function`` (an autograd.Function over the op below
    autograd, with the same gradients) when autograd records (grad mode on, outside
    torch.inference_mode: see registration.apply_function) and an input needs a gradient, else the
    op below autograd: the custom-op autograd dispatch costs tens of microseconds per call. In
    forward-mode AD ``plain``, the op's PyTorch formulas (:func:`_forward_ad_aware`): below autograd
    the op drops the inputs' tangents, silently."""
    below = _below(op)

    def run(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        if plain is not None and forward_ad_active():
            return plain(*args)
        if function is not None and torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        return below(*args)
    return run


class _Ops:
    """The five ops, native (torch.ops.moelora, see _eager) or PyTorch fallbacks; in forward-mode AD
    the fallbacks' formulas as plain PyTorch ops (_forward_ad_aware)."""

    def __init__(self, native: bool):
        if native:
            ns = torch.ops.moelora
            self.router_topk = _eager(ns.router_topk, _route_function("_NativeRouteFn", _below(ns.router_topk)),
                                      fb.router_topk)
            self.dispatch_metadata = _eager(ns.dispatch_metadata)  # integer outputs: no tangents
            self.dispatch = _eager(ns.dispatch, _saving_function("_NativeDispatchFn", _below(ns.dispatch),
                                                                 _dispatch_grads, native=True), fb.dispatch)
            self.combine = _eager(ns.combine, _saving_function("_NativeCombineFn", _below(ns.combine),
                                                               _combine_grads, native=True), fb.combine)
            self.pair_dot = _eager(ns.pair_dot, _saving_function("_NativePairDotFn", _below(ns.pair_dot),
                                                                 _pair_dot_grads, native=True), fb.pair_dot)
        else:
            self.router_topk = _forward_ad_aware(_RouteFn.apply, fb.router_topk)
            self.dispatch_metadata = fb.dispatch_metadata
            self.dispatch = _forward_ad_aware(_DispatchFn.apply, fb.dispatch)
            self.combine = _forward_ad_aware(_CombineFn.apply, fb.combine)
            self.pair_dot = _forward_ad_aware(_PairDotFn.apply, fb.pair_dot)


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


# ---- Native ops: argument checks of the fake kernels ---------------------------------------
# The fakes are the ops' Meta kernels too (the dispatcher picks them when an input is on the meta
# device) and what torch.compile traces: they run the kernels' argument checks of csrc/ops.cpp and
# csrc/cpu/dispatch_cpu.cpp, in the same order and with the same messages, so a call refused by the
# kernels is refused on meta / fake tensors too instead of returning tensors shaped from bad arguments.
_NATIVE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _type_name(t: torch.Tensor) -> str:
    """The dtype of t as c10 spells it in the kernels' messages (Float, Long, BFloat16, ...)."""
    return t.type().rsplit(".", 1)[-1].removesuffix("Tensor")


def _check_router_args(logits, top_k, mode) -> None:
    """check_router_args of csrc/ops.cpp."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D, got shape {list(logits.shape)}")
    if logits.dtype not in _NATIVE_FLOATS:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {_type_name(logits)}")
    E = logits.shape[1]
    if not 1 <= E <= native.MAX_EXPERTS:
        raise ValueError(f"logits.shape[1] (number of experts) must be in [1, {native.MAX_EXPERTS}], got {E}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E = {E}], got {top_k}")
    if mode not in (0, 1):
        raise ValueError(f"mode must be 0 (softmax_topk) or 1 (topk_softmax), got {mode}")


def _check_meta_args(topk_ids, num_experts, block_size) -> None:
    """check_meta_args of csrc/ops.cpp (its int64 overflow check cannot fail for real tensors)."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D, got shape {list(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {_type_name(topk_ids)}")
    if not 1 <= num_experts <= native.MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {native.MAX_EXPERTS}], got {num_experts}")
    if not 1 <= topk_ids.shape[1] <= num_experts:
        raise ValueError(f"topk_ids.shape[1] (k) must be in [1, num_experts = {num_experts}], "
                         f"got {topk_ids.shape[1]}")
    if not 0 <= block_size <= native.MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be in [0, {native.MAX_BLOCK_SIZE}] (0: no padding), got {block_size}")


def _check_gather_args(op, data_name, data, sorted_pairs, inverse, weights) -> None:
    """check_gather_args of csrc/ops.cpp."""
    for name, t in ((data_name, data), ("sorted_pairs", sorted_pairs), ("inverse", inverse)):
        _check_defined(op, name, t)
    if data.dim() != 2:
        raise ValueError(f"{op}: {data_name} must be 2-D, got shape {list(data.shape)}")
    if data.dtype not in _NATIVE_FLOATS:
        raise TypeError(f"{op}: {data_name} must be float16, bfloat16, float32 or float64, got {_type_name(data)}")
    for name, t, dim in (("sorted_pairs", sorted_pairs, 1), ("inverse", inverse, 2)):
        if t.dim() != dim:
            raise ValueError(f"{name} must be {dim}-D, got shape {list(t.shape)}")
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {_type_name(t)}")
    if inverse.shape[1] < 1:
        raise ValueError(f"{op}: inverse must have shape [T, k] with k >= 1, got {list(inverse.shape)}")
    for name, t in (("sorted_pairs", sorted_pairs), ("inverse", inverse)):
        if t.device != data.device:
            raise ValueError(f"{op}: {name} must be on {data_name}'s device {data.device}, got {t.device}")
    if weights is not None:
        if weights.dtype not in _NATIVE_FLOATS:
            raise TypeError(f"weights must be float16, bfloat16, float32 or float64, got {_type_name(weights)}")
        if weights.device != data.device:
            raise ValueError(f"{op}: weights must be on {data_name}'s device {data.device}, got {weights.device}")
        if weights.shape != inverse.shape:
            raise ValueError(f"{op}: weights must have the shape of inverse {list(inverse.shape)}, "
                             f"got {list(weights.shape)}")


def _check_defined(op, name, t) -> None:
    """The kernels' refusal of a None passed for a required tensor (which reaches them as an undefined tensor)."""
    if t is None:
        raise TypeError(f"{op}: {name} must be a tensor, got None")


def _check_rows(op, data_name, data, index_name, index) -> None:
    """The row-count check of dispatch (x vs inverse's tokens), combine and pair_dot (the sorted rows
    vs sorted_pairs' entries)."""
    if data.shape[0] != index.shape[0]:
        what = "tokens" if index_name == "inverse" else "entries"
        raise ValueError(f"{op}: {data_name} has {data.shape[0]} rows but {index_name} has {index.shape[0]} {what}")


def _no_device_kernel(name, fake):
    """The kernel of ``moelora::<name>`` for the calls no device's kernel takes: those whose every tensor argument
    is None (no device for the dispatcher to pick; it refused them naming no argument), and tensors on a
    device the build has no kernel for. It runs the fake's argument checks, which name a None argument as the
    kernels do, and otherwise refuses the device."""
    def kernel(*args):
        fake(*args)
        devices = ", ".join(sorted({str(a.device) for a in args if isinstance(a, torch.Tensor)}))
        raise NotImplementedError(f"{name}: moelora._C has no kernel for tensors on {devices}")
    return kernel


# ---- Native ops: fake kernels and autograd -----------------------------------------------
def _register_native():
    lib = "moelora::"

    @torch.library.register_fake(lib + "router_topk")
    def _router_fake(logits, top_k, mode, renormalize):
        _check_defined("router_topk", "logits", logits)
        _check_router_args(logits, top_k, mode)
        T, E = logits.shape
        acc = accumulator_dtype(logits.dtype)
        return (logits.new_empty((T, top_k), dtype=acc), logits.new_empty((T, top_k), dtype=torch.int32),
                logits.new_empty((E,), dtype=torch.int64), logits.new_empty((E,), dtype=acc),
                logits.new_empty((T,), dtype=acc))

    @torch.library.register_fake(lib + "dispatch_metadata")
    def _meta_fake(topk_ids, num_experts, block_size):
        _check_defined("dispatch_metadata", "topk_ids", topk_ids)
        _check_meta_args(topk_ids, num_experts, block_size)
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

    @torch.library.register_fake(lib + "dispatch")
    def _dispatch_fake(x, sorted_pairs, inverse, weights):
        _check_gather_args("dispatch", "x", x, sorted_pairs, inverse, weights)
        _check_rows("dispatch", "x", x, "inverse", inverse)
        return x.new_empty((sorted_pairs.shape[0], x.shape[1]))

    @torch.library.register_fake(lib + "combine")
    def _combine_fake(y, sorted_pairs, inverse, weights):
        _check_gather_args("combine", "y_sorted", y, sorted_pairs, inverse, weights)
        _check_rows("combine", "y_sorted", y, "sorted_pairs", sorted_pairs)
        return y.new_empty((inverse.shape[0], y.shape[1]))

    @torch.library.register_fake(lib + "pair_dot")
    def _pair_dot_fake(a, b, sorted_pairs, inverse):
        _check_gather_args("pair_dot", "b_sorted", b, sorted_pairs, inverse, None)
        _check_rows("pair_dot", "b_sorted", b, "sorted_pairs", sorted_pairs)
        _check_defined("pair_dot", "a", a)
        if a.device != b.device:
            raise ValueError(f"pair_dot: a must be on b_sorted's device {b.device}, got {a.device}")
        if a.dim() != 2:
            raise ValueError(f"pair_dot: a must be 2-D, got shape {list(a.shape)}")
        if a.dtype != b.dtype:
            raise TypeError(f"pair_dot: a ({_type_name(a)}) and b_sorted ({_type_name(b)}) must share a dtype")
        if a.shape[0] != inverse.shape[0] or a.shape[1] != b.shape[1]:
            raise ValueError(f"pair_dot: a must have shape [T, d] = [{inverse.shape[0]}, {b.shape[1]}], "
                             f"got {list(a.shape)}")
        return a.new_empty(tuple(inverse.shape), dtype=accumulator_dtype(a.dtype))

    for name, fake in (("router_topk", _router_fake), ("dispatch_metadata", _meta_fake), ("dispatch", _dispatch_fake),
                       ("combine", _combine_fake), ("pair_dot", _pair_dot_fake)):
        torch.library.impl(lib + name, "CompositeExplicitAutograd", _no_device_kernel(name, fake))

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
