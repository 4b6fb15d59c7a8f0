"""``moe_lora_linear``: a frozen linear layer plus routed LoRA experts as ONE autograd op.

    y = x W^T + b + s * sum_j w[t,j] * B[e[t,j]] @ (A[(e[t,j])] @ x_lora[t])

with the routing (w, e) either given (task routing, one expert) or computed from router
logits x W_router^T by moelora's routing op in any learned mode, plus the router's
auxiliary loss. This is MoELoRALinear's forward and backward; it owns the base GEMM so that
x is read once for the LoRA down-projection and the router logits, the expand GEMM adds into
the base output, and dx = dy W + [dh | d logits] [A ; W_router] accumulates in one GEMM.

Triton backend (``_fused_forward`` / ``_fused_backward``), per call, in moelora.moe_lora's
dense regime (E*r small):

  forward   lora_down: [h | logits] = x [A_rows ; W_router]^T (fp32 accumulation, x read once)
            router_topk (moelora._C) (+ threshold_weights): weights, ids, counts, prob_sums, lse
            gated_expand: y = bias + Hg B_stack^T, and in its first program aux_loss, aux_stats [2]
            from the counts, prob_sums and lse;  y += x W^T (cuBLAS addmm_)
  backward  dHg = dy B_stack;  gate_backward: dh and d logits (routing + aux loss gradients)
            dx = [dh | d logits] [A_rows ; W_router] (Triton), dx += dy W (cuBLAS addmm_)
            lora_weight_grad: dB (in its [E, d_out, r] layout), dA, dW_router in one kernel,
            split reductions summed in a fixed order on the device

An aux-loss mask (``RouterSpec.aux_mask``, [T] bool: the real tokens) replaces the aux loss's
program by masked_router_aux_loss (one launch: the real tokens' counts and loss from the logits)
and adds its gradient to the routing's d logits in the backward (one launch).

LoRA dropout (a bool keep mask M of x's shape, drawn by :func:`lora_dropout_mask`, and its
scale s_d = 1/(1-p); the LoRA branch reads x_lora = s_d M (.) x, the router and the base x)
costs no kernel in the dense regime: lora_down reads M beside x (h from x_lora, the logits
from x), lora_weight_grad reads it for dA, and the dx GEMM masks its [dh] A part. x_lora is
never formed (the grouped regime forms it where a per-expert A or dA needs it). Router jitter
(factors J of x's shape, the router reading x (.) J) likewise: lora_down reads J for the logits
(an fp32 product), lora_weight_grad for dW_router, the dx GEMM for its d logits W_router part.

and in its grouped regime (large E*r; ``_grouped_expand`` / ``_grouped_lora_backward``):

  forward   lora_down and the routing as above (per-expert A: logits only); the pairs sorted by
            expert (dispatch metadata); per-expert A: rows x[t] A_e^T (grouped GEMM); rows
            s w B_e h (grouped GEMM, or torch's grouped_mm by moelora.ops.moe_lora.ROWS_ENGINES);
            y = x W^T + b (cuBLAS), the rows summed into it per token
            in a fixed order (combine_rows); router_aux_loss: aux_loss, aux_stats
  backward  dh rows = s w dy B_e with dw in the epilogue (grouped GEMM); dB (grouped reduction);
            router_backward: d logits from dw; dA, dW_router (matmuls over x, or per expert
            from the rows); dx = [dh | d logits] [A ; W_router] + dy W

Saved for backward: x (and LoRA dropout's bool mask), h [T, R] (the grouped
regime's per-expert A: its rows [rows, r]), the routing (logits [T, E], ids, weights, counts;
the grouped regime's pair layout too); nothing T x d_out. Deterministic; no host sync.
A and B of any float dtype (fp32 adapters over a bf16 base, as PEFT keeps them) are read as
they are and rounded to x's dtype in registers by the kernels (no cast kernels, nothing
saved twice); the router's product runs in fp32; everything accumulates in fp32. In eager
mode an autograd.Function runs it; under torch.compile the same forward and backward are the custom ops
``moelora::moe_lora_linear_fwd`` / ``_bwd``.

PyTorch backend (``_composed``): F.linear + the routing op + moelora.moe_lora's torch
backend, differentiated by autograd; the reference of the Triton path. The routing goes to
the torch backend without moelora.moe_lora's checks, whose syncing ones would read it on the
host: a learned router's ids lie in [0, E), given ids were checked by moe_lora_linear's checks.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from moelora.kernels import launchers
from moelora.ops.moe_lora import (choose_regime, fake_grouped_layout, grouped_forward, grouped_input_grads,
                                  grouped_output_grads, grouped_row_count, lora_a_rows, moe_lora_torch_impl,
                                  saved_layout)
from moelora.ops.losses import aux_losses, masked_aux_losses
from moelora.ops.routing_modes import LEARNED_MODES, Routing, linear_logits, route_logits, scheduled_eps
from moelora.ops.routing import router_topk
from moelora.ops.validation import (FLOAT_DTYPES, MoELoRAArgs, as_2d, check_adapter_shapes, check_routing_values,
                                    check_same_device, check_scaling, check_tensor_args, check_top_k,
                                    refuse_double_backward, syncing_checks_enabled)
from moelora.ops.backend import autocast_dtype, autocast_input, check_triton_op_device, resolve_backend
from moelora.ops.registration import apply_eager, custom_op


class RouterSpec(NamedTuple):
    """A learned router: ``weight`` [E, d_in] (logits = x W_router^T, fused with the LoRA
    down-projection) or precomputed ``logits`` [T, E] (e.g. jittered router inputs), the mode
    ("softmax_topk", "topk_softmax" or "threshold"), top_k, renormalize, threshold routing's
    eps schedule (eps_start -> eps_end over ramp_steps steps of the ``num_steps`` counter, read
    on the device) and training draws ``noise`` [T, k] (None at eval), the auxiliary-loss
    coefficients, router jitter's factors ``jitter`` (x's shape; the router reads x (.) jitter;
    None without jitter), and ``aux_mask`` ([T] bool, False for padding: the aux loss and the
    counts over the real tokens only, moelora.ops.losses.masked_aux_losses; None: every token)."""

    weight: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]
    mode: str
    top_k: int
    renormalize: bool = True
    eps_start: float = 0.0
    eps_end: float = 0.0
    ramp_steps: int = 0
    num_steps: Optional[torch.Tensor] = None
    noise: Optional[torch.Tensor] = None
    lb_coef: float = 0.01
    z_coef: float = 0.001
    jitter: Optional[torch.Tensor] = None
    aux_mask: Optional[torch.Tensor] = None


def moe_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                    lora_b: torch.Tensor, *, scaling: float, router: Optional[RouterSpec] = None,
                    topk_ids: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                    dropout_mask: Optional[torch.Tensor] = None, dropout_scale: float = 1.0,
                    backend: Optional[str] = None):
    """The MoE-LoRA linear layer on x [..., d_in] (T tokens); see the module docstring.

    Args:
        weight: the frozen base weight [d_out, d_in] (any strides: a Conv1D's weight.t()).
        bias: [d_out] or None.
        lora_a: [r, d_in] (shared) or [E, r, d_in]; lora_b: [E, d_out, r].
        router: a :class:`RouterSpec` (learned routing), or None with ``topk_ids`` and
            ``topk_weights`` [T, k] given (static routing; the weights may require grad).
        dropout_mask, dropout_scale: LoRA dropout: the bool keep mask (shape of x) and the scale
            of the kept elements; the LoRA branch reads dropout_scale * dropout_mask (.) x
            (:func:`lora_dropout_mask` draws both).
        Routing tensors (given or returned) are [T, ...].

    Returns:
        (y [..., d_out] in x's dtype (autocast's under torch.autocast), :class:`LayerOutput`):
        the routing used and, for a learned router, the auxiliary losses of this forward.

    Raises:
        TypeError / ValueError naming the argument for inconsistent shapes, dtypes or routing
        (:func:`check_linear_args`; with static routing also ids outside [0, E) and non-finite
        weights, under moelora.validation's rule): the kernels read every tensor with the sizes
        the others imply. MoELoRALinear, which builds its arguments consistent, calls
        :func:`unchecked_moe_lora_linear`.
    """
    check_linear_args(x, weight, bias, lora_a, lora_b, scaling, router, topk_ids, topk_weights, dropout_mask)
    return unchecked_moe_lora_linear(x, weight, bias, lora_a, lora_b, scaling=scaling, router=router,
                                     topk_ids=topk_ids, topk_weights=topk_weights, dropout_mask=dropout_mask,
                                     dropout_scale=dropout_scale, backend=backend)


def unchecked_moe_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              lora_a: torch.Tensor, lora_b: torch.Tensor, *, scaling: float,
                              router: Optional[RouterSpec] = None, topk_ids: Optional[torch.Tensor] = None,
                              topk_weights: Optional[torch.Tensor] = None,
                              dropout_mask: Optional[torch.Tensor] = None, dropout_scale: float = 1.0,
                              backend: Optional[str] = None):
    """:func:`moe_lora_linear` without its argument checks, for MoELoRALinear, whose arguments are
    consistent by construction (its forward pays no host time for the checks, and reads nothing
    on the host)."""
    cast = autocast_dtype(x)
    if cast is not None:  # torch.autocast: x and the base layer in its dtype, as F.linear's; the op runs without it
        with torch.autocast(x.device.type, enabled=False):
            return unchecked_moe_lora_linear(autocast_input(x, cast), autocast_input(weight, cast),
                                             autocast_input(bias, cast), lora_a, lora_b, scaling=scaling,
                                             router=router, topk_ids=topk_ids, topk_weights=topk_weights,
                                             dropout_mask=dropout_mask, dropout_scale=dropout_scale, backend=backend)
    T = math.prod(x.shape[:-1])
    if resolve_backend(backend, x.device) == "torch" or T == 0:
        flat = (lambda t: t if t is None else t.reshape(T, t.shape[-1]))  # noqa: E731
        y, out = _composed(flat(x), weight, bias, lora_a, lora_b, scaling, router, topk_ids, topk_weights,
                           flat(dropout_mask), dropout_scale)
        return y.reshape(x.shape[:-1] + (weight.shape[0],)), out
    r = router
    grouped = choose_regime(lora_b.shape[0], lora_b.shape[2]) == "grouped"
    if torch.compiler.is_compiling():
        flat = (lambda t: t if t is None else t.reshape(T, x.shape[-1]))  # noqa: E731
        args = op_args(flat(x), weight, bias, lora_a, lora_b, scaling,
                       r if r is None or r.jitter is None else r._replace(jitter=flat(r.jitter)), topk_ids,
                       topk_weights, flat(dropout_mask), dropout_scale, grouped)
        y, h, logits, ids, weights, counts, aux_loss, aux_stats = _TracedMoELoRALinearFn.apply(*args)[:8]
        y = y.reshape(x.shape[:-1] + (weight.shape[0],))
    else:
        args = op_args(x, weight, bias, lora_a, lora_b, scaling, router, topk_ids, topk_weights, dropout_mask,
                       dropout_scale, grouped)
        extra = []
        y, aux_loss = apply_eager(_MoELoRALinearFn, *args[:_GRAD_INPUTS], args[_GRAD_INPUTS:], extra)
        h, logits, ids, weights, counts, aux_stats = extra
    if r is None:
        return y, LayerOutput(Routing(topk_weights, topk_ids), None, None)
    return y, LayerOutput(Routing(weights, ids, r.logits if r.logits is not None else logits, counts), aux_loss,
                          aux_stats)


def check_linear_args(x, weight, bias, lora_a, lora_b, scaling, router, topk_ids, topk_weights, dropout_mask) -> None:
    """moe_lora_linear's argument checks (TypeError / ValueError naming the argument), with
    moelora.moe_lora's messages where the arguments are the same: x [..., d_in] floating point,
    weight [d_out, d_in], bias [d_out], the adapters, a finite scaling, then the routing: a
    RouterSpec (mode, top_k in [1, E], router weight [E, d_in] or logits [T, E], noise [T, top_k],
    jitter of x's shape) or static ids and weights [T, k] (k in [1, E]; ids in [0, E) and finite
    weights while the syncing checks run), and the bool dropout mask of x's shape. The base weight
    and bias have x's dtype (outside torch.autocast, which casts them); every tensor is on x's device."""
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if router is not None and not isinstance(router, RouterSpec):
        raise TypeError(f"router must be a RouterSpec or None, got {type(router).__name__}")
    optional = dict(bias=bias, dropout_mask=dropout_mask)
    if router is not None:
        optional.update({f"router.{n}": getattr(router, n) for n in ("weight", "logits", "noise", "jitter",
                                                                     "aux_mask")})
    for name, t in optional.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype and autocast_dtype(x) is None:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype} (the base GEMM "
                            f"runs in x's dtype)")
    check_same_device(x, (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), *optional.items()))
    if x.dim() < 1:
        raise ValueError("x must have shape [..., d_in], got a 0-d tensor")
    T, d_in = math.prod(x.shape[:-1]), x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d_in:
        raise ValueError(f"weight must have shape [d_out, d_in = {d_in}], got {tuple(weight.shape)}")
    d_out = weight.shape[0]
    num_experts, b_out, _ = check_adapter_shapes(lora_a, lora_b, d_in)
    if b_out != d_out:
        raise ValueError(f"lora_b must have shape [E, d_out = {d_out}, r] (weight's d_out), got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
    check_scaling(scaling)
    if dropout_mask is not None and (dropout_mask.dtype != torch.bool or dropout_mask.shape != x.shape):
        raise ValueError(f"dropout_mask must be a bool tensor of x's shape {tuple(x.shape)}, got "
                         f"{dropout_mask.dtype} {tuple(dropout_mask.shape)}")
    if router is None:
        if topk_ids is None or topk_weights is None:
            raise ValueError("moe_lora_linear needs a router (RouterSpec) or topk_ids and topk_weights")
        check_tensor_args(x, topk_ids, topk_weights, {}, {})
        if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
            raise ValueError(f"topk_ids and topk_weights must both have shape [T = {T}, k], got "
                             f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
        check_top_k(topk_ids.shape[1], num_experts, "k (topk_ids.shape[1])")
        check_routing_values(topk_ids, topk_weights, num_experts)
        return
    if topk_ids is not None or topk_weights is not None:
        raise ValueError("moe_lora_linear takes a router or topk_ids and topk_weights, not both")
    if router.mode not in LEARNED_MODES:
        raise ValueError(f"router.mode must be one of {LEARNED_MODES}, got {router.mode!r}")
    if (router.weight is None) == (router.logits is None):
        raise ValueError("a RouterSpec has either a router weight or precomputed logits")
    if router.weight is not None and tuple(router.weight.shape) != (num_experts, d_in):
        raise ValueError(f"router.weight must have shape [E = {num_experts}, d_in = {d_in}], "
                         f"got {tuple(router.weight.shape)}")
    if router.logits is not None and tuple(router.logits.shape) != (T, num_experts):
        raise ValueError(f"router.logits must have shape [T = {T}, E = {num_experts}], got "
                         f"{tuple(router.logits.shape)}")
    check_top_k(router.top_k, num_experts, "router.top_k")
    if router.noise is not None and tuple(router.noise.shape) != (T, router.top_k):
        raise ValueError(f"router.noise must have shape [T = {T}, top_k = {router.top_k}], got "
                         f"{tuple(router.noise.shape)}")
    if router.jitter is not None and router.jitter.shape != x.shape:
        raise ValueError(f"router.jitter must have x's shape {tuple(x.shape)}, got {tuple(router.jitter.shape)}")
    mask = router.aux_mask
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (T,)):
        raise ValueError(f"router.aux_mask must be a bool tensor of shape [T = {T}], got {mask.dtype} "
                         f"{tuple(mask.shape)}")


# The fused op's first _GRAD_INPUTS arguments are the tensors that may need a gradient.
_GRAD_INPUTS = 8


def op_args(x, weight, bias, lora_a, lora_b, scaling, router, topk_ids, topk_weights, dropout_mask,
            dropout_scale: float, grouped: bool) -> tuple:
    """The flat argument list of the fused op (``moelora::moe_lora_linear_fwd``): the 8 tensors
    that may need a gradient (x, weight, bias, lora_a, lora_b, router_weight, logits_in,
    topk_weights; each may be None but x, weight and the adapters), the 6 others (topk_ids,
    noise, num_steps, dropout_mask, jitter, aux_mask), then the 11 scalars (scaling, mode, top_k, renormalize,
    eps_start, eps_end, ramp_steps, lb_coef, z_coef, dropout_scale, grouped: the regime of
    moelora.moe_lora)."""
    r = router
    if r is None:
        return (x, weight, bias, lora_a, lora_b, None, None, topk_weights, topk_ids, None, None, dropout_mask, None,
                None, float(scaling), "static", 0, False, 0.0, 0.0, 0, 0.0, 0.0, float(dropout_scale), grouped)
    num_steps = r.num_steps if r.mode == "threshold" and r.ramp_steps > 0 else None
    return (x, weight, bias, lora_a, lora_b, r.weight, r.logits, None, None, r.noise, num_steps, dropout_mask,
            r.jitter, r.aux_mask, float(scaling), r.mode, int(r.top_k), bool(r.renormalize), float(r.eps_start),
            float(r.eps_end), int(r.ramp_steps), float(r.lb_coef), float(r.z_coef), float(dropout_scale), grouped)


def lora_dropout_mask(x: torch.Tensor, p: float):
    """(keep mask, scale) of LoRA dropout with probability ``p`` for x: a bool tensor of x's shape,
    each element kept with probability 1 - p (one bernoulli_ draw from the generator of x's
    device), and 1 / (1 - p); (None, 1.0) for p = 0, an all-False mask and 0.0 for p >= 1."""
    if p <= 0:
        return None, 1.0
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    if p >= 1:
        return mask.zero_(), 0.0
    return mask.bernoulli_(1.0 - p), 1.0 / (1.0 - p)


def dropped_out(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """x_lora = scale * mask (.) x in x's dtype (what the kernels read without forming it): two
    elementwise kernels, and two in its backward."""
    return x * mask * scale


class LayerOutput(NamedTuple):
    """What moe_lora_linear returns beside y: the routing and, for a learned router, this
    forward's weighted auxiliary loss (0-d, differentiable) and its unweighted parts
    ``aux_stats`` = (load-balancing loss, z-loss)."""

    routing: Routing
    aux_loss: Optional[torch.Tensor]
    aux_stats: Optional[torch.Tensor]


# ----------------------------------------------------------------------------- torch backend
def _composed(x, weight, bias, lora_a, lora_b, scaling, router, topk_ids, topk_weights, dropout_mask, dropout_scale):
    dtype = lora_b.dtype
    base = F.linear(x, weight, bias)
    aux_loss = aux_stats = None
    if router is not None:
        if router.logits is not None:
            logits = router.logits
        else:  # in x's accumulator dtype, as the kernels' (a half-precision router weight too)
            logits = linear_logits(x, router.weight, None if router.jitter is None else router.jitter.reshape(x.shape))
        eps = scheduled_eps(router.eps_start, router.eps_end, router.ramp_steps, router.num_steps)
        routing = route_logits(logits, router.mode, router.top_k, router.renormalize, eps, router.noise)
        if router.aux_mask is None:
            aux_loss, aux_stats = aux_losses(routing.counts, routing.prob_sums, routing.lse, router.lb_coef,
                                             router.z_coef)
        else:
            aux_loss, aux_stats, counts = masked_aux_losses(routing.logits, routing.ids, routing.weights,
                                                            router.aux_mask, router.lb_coef, router.z_coef,
                                                            count_kept=router.mode == "threshold", kernels=False)
            routing = routing._replace(counts=counts)
        topk_ids, topk_weights = routing.ids, routing.weights
    else:
        routing = Routing(topk_weights, topk_ids)
    xl = (x if dropout_mask is None else dropped_out(x, dropout_mask, dropout_scale)).to(dtype)
    # Nothing reads the routing on the host here (as on the fused path): the router's ids lie in [0, E); given ids
    # were checked by moe_lora_linear's checks, a layer's task ids where its routing was built, while the syncing
    # checks run.
    in_range = router is not None or syncing_checks_enabled(topk_ids)
    y = moe_lora_torch_impl(MoELoRAArgs(xl, lora_a, lora_b, topk_ids, topk_weights, base.to(dtype), float(scaling),
                                        tuple(base.shape), ids_in_range=in_range))
    return y.to(x.dtype), LayerOutput(routing, aux_loss, aux_stats)


# ----------------------------------------------------------------------------- Triton backend
def _route(logits, mode, top_k, renormalize, noise, num_steps, eps_start, eps_end, ramp_steps, lb_coef, z_coef):
    """(weights, ids, launchers.RouterAux): the routing op and threshold routing's kernel; the aux
    loss (over the kept slots for threshold routing) is computed by the gated expand's launch."""
    threshold = mode == "threshold"
    weights, ids, counts, prob_sums, lse = router_topk(logits, top_k, "softmax_topk" if threshold else mode,
                                                       renormalize and not threshold)
    if threshold:
        weights = launchers.threshold_weights(weights, noise, num_steps, eps_start=eps_start, eps_end=eps_end,
                                              ramp_steps=ramp_steps)
    return weights, ids, launchers.RouterAux(counts, prob_sums, lse, lb_coef, z_coef, count_kept=threshold)


def _fused_forward(x, weight, bias, lora_a, lora_b, router_weight, logits_in, topk_ids, topk_weights, noise,
                   num_steps, dropout_mask, jitter, aux_mask, scaling, mode, top_k, renormalize, eps_start, eps_end,
                   ramp_steps, lb_coef, z_coef, dropout_scale, grouped, y_out=None):
    """(y, h, logits, ids, weights, counts, aux_loss, aux_stats, layout); for static routing ids
    and weights are the given ones and logits, counts and aux are empty. h is [T, R], or for the
    grouped regime's per-expert A the rows x[t] A_e^T [rows of the layout, r]; layout: the
    grouped regime's pair layout (moelora.ops.routing.layout_tensors), [] in the dense regime.
    y is written into ``y_out`` [T, d_out] where given. With ``aux_mask`` the counts and the aux
    loss are the real tokens' (launchers.masked_router_aux_loss, one launch)."""
    dtype = x.dtype
    down_rows = None if grouped and lora_a.dim() == 3 else lora_a_rows(lora_a)  # grouped: per row, below
    if down_rows is not None or router_weight is not None:
        mask = dropout_mask if down_rows is not None else None
        h, logits = launchers.lora_down(x, down_rows, router_weight, mask=mask, mask_scale=dropout_scale,
                                        jitter=jitter)
    if down_rows is None:
        h = None
    if router_weight is None:
        logits = logits_in
    if mode == "static":
        ids, weights, aux = topk_ids, topk_weights, None
    else:
        weights, ids, aux = _route(logits, mode, top_k, renormalize, noise, num_steps, eps_start, eps_end, ramp_steps,
                                   lb_coef, z_coef)
    masked = None
    if aux is not None and aux_mask is not None:  # the real tokens' aux loss and counts, in place of aux's
        masked = launchers.masked_router_aux_loss(logits, ids, weights, aux_mask, lb_coef, z_coef, aux.count_kept)
        aux = None
    out, layout = None, []
    if grouped:
        xl = x if dropout_mask is None or h is not None else dropped_out(x, dropout_mask, dropout_scale)
        y, h, layout = _grouped_expand(x, xl, weight, bias, h, lora_a, lora_b, ids, weights, scaling, y_out)
    else:
        folded = aux if aux is not None and aux.counts.shape[0] <= launchers.GATED_EXPAND_AUX_EXPERTS else None
        expand = dict(scaling=scaling, shared_a=lora_a.dim() == 2, bias=bias, out_dtype=dtype, compute_dtype=dtype)
        out = launchers.gated_expand(h, ids, weights, lora_b, aux=folded, out=y_out, **expand)
        y, out = (out, None) if folded is None else (out[0], out[1:])
        y.addmm_(x, weight.t())
    if aux is not None and out is None:  # the grouped regime, or too many experts to fold into the expand
        out = launchers.router_aux_loss(ids, weights, aux)
    if masked is not None:
        out = masked
    aux_loss, aux_stats, counts = out if out is not None else (x.new_empty(0) for _ in range(3))
    logits = x.new_empty(0) if logits is None else logits
    return y, h, logits, ids, weights, counts, aux_loss, aux_stats, layout


def _grouped_expand(x, xl, weight, bias, h, lora_a, lora_b, ids, weights, scaling, y_out=None):
    """(y, h, layout) of the grouped regime (large E*r): y = x W^T + b (cuBLAS; into ``y_out`` where
    given), then moelora.moe_lora's grouped forward over x_lora adds the expert rows into it in
    place. ``h``: a shared A's x_lora A^T (lora_down's), or None (per-expert A: its rows are
    computed there)."""
    if y_out is None:
        y = F.linear(x, weight, bias)
    else:  # F.linear's GEMM for a 2-d x
        y = torch.mm(x, weight.t(), out=y_out) if bias is None else torch.addmm(bias, x, weight.t(), out=y_out)
    return grouped_forward(xl, lora_a, lora_b, ids, weights, y, scaling, h=h, out=y)


def _on_request(n) -> tuple:
    """needs_input_grad -> _fused_backward's ``needs``: the op's inputs (op_args order) whose
    gradients it computes only on request: x, weight, bias, router_weight, logits_in, topk_weights.
    (A function rather than operator.itemgetter, which dynamo cannot trace in
    _TracedMoELoRALinearFn.backward.)"""
    return n[0], n[1], n[2], n[5], n[6], n[7]


# Saved tensors before the grouped regime's pair layout: x, weight, lora_a, lora_b, router_weight, h,
# logits, ids, weights, counts, dropout_mask, jitter, aux_mask (both autograd paths save them in this order).
_FIXED_SAVED = 13


def _fused_backward(dy, g_aux, x, weight, lora_a, lora_b, router_weight, h, logits, ids, weights, counts,
                    dropout_mask, jitter, aux_mask, layout, scaling, mode, renormalize, lb_coef, z_coef, dropout_scale,
                    grouped, needs):
    """Gradients of (x, weight, bias, lora_a, lora_b, router_weight, logits_in, topk_weights);
    ``needs`` says which are wanted (None where not); ``layout``: the forward's (grouped regime).
    With ``aux_mask`` the masked aux loss's gradient (launchers.masked_router_aux_loss_backward) is
    added to the routing's d logits before they are used, in place of the kernels' own."""
    need_x, need_weight, need_bias, _, need_logits, need_w = needs
    aux_only = dy is None  # only the aux loss reached the loss
    if aux_only:
        dy = x.new_zeros(x.shape[0], weight.shape[0])
    router = dl_aux = None
    if mode != "static":
        grad_mode = "softmax_topk_plain" if mode == "softmax_topk" and not renormalize else mode
        if aux_mask is not None and g_aux is not None:
            dl_aux = (g_aux, logits, counts, aux_mask, lb_coef, z_coef)
        router = launchers.RouterGrad(logits, counts, None if aux_mask is not None else g_aux, grad_mode, lb_coef,
                                      z_coef)
    dropout = (dropout_mask, dropout_scale)
    if grouped:
        grads = _grouped_lora_backward(dy, x, lora_a, lora_b, router_weight, h, ids, weights, dropout, jitter, layout,
                                       scaling, router, need_x, dl_aux)
    else:
        grads = _dense_lora_backward(dy, x, lora_a, lora_b, router_weight, h, ids, weights, dropout, jitter, scaling,
                                     router, need_x, dl_aux)
    dx, dlora_a, dlora_b, drouter, dl, dw = grads
    if need_x and not aux_only:  # the LoRA backward's dx (returned wherever x needs one) gets dy W; dy = 0 adds 0
        dx.addmm_(dy, weight)
    dweight = torch.mm(dy.t(), x) if need_weight else None
    dbias = dy.sum(0) if need_bias else None
    # given logits' gradient in their dtype (the routing's d logits: fp32 for half-precision logits)
    dlogits = dl.to(logits.dtype) if need_logits and router_weight is None and router is not None else None
    dw = dw.to(weights.dtype) if need_w and router is None else None
    return dx, dweight, dbias, dlora_a, dlora_b, drouter, dlogits, dw


def _dense_lora_backward(dy, x, lora_a, lora_b, router_weight, h, ids, weights, dropout, jitter, scaling, router,
                         need_x, dl_aux=None):
    """(dx before dy W or None, dA, dB, dW_router, d logits, dw) of the dense regime: dHg = dy B_stack;
    gate_backward: dh and dw or d logits (routing and aux-loss gradients); lora_weight_grad: dB, dA
    (and dW_router, the router reading x); dx = [dh | dl] [A ; W_router]. ``dropout`` = (mask or
    None, scale): dA reads x_lora and the dx GEMM masks dh A (its dl W_router part stays);
    ``jitter``: dW_router reads x (.) J and the dx GEMM scales dl W_router by J. ``dl_aux``: the
    arguments of the masked aux loss's gradient, added to the routing's d logits."""
    mask, mask_scale = dropout
    dtype = x.dtype
    shared = lora_a.dim() == 2
    num_experts, d_out, rank = lora_b.shape
    a_rows = lora_a_rows(lora_a)
    dhg = launchers.matmul(dy, lora_b, stacked_b=True, out_dtype=launchers.accumulator_dtype(dtype),
                           compute_dtype=dtype)
    dh, dw_or_dl, hg = launchers.gate_backward(dhg, h, ids, weights, num_experts=num_experts, rank=rank,
                                               scaling=scaling, shared_a=shared, router=router, hg_dtype=dtype)
    dl, dw = (dw_or_dl, None) if router is not None else (None, dw_or_dl)
    if dl_aux is not None:
        launchers.masked_router_aux_loss_backward(*dl_aux, dl=dl)
    dlora_a = torch.empty(lora_a.shape, dtype=lora_a.dtype, device=x.device)
    dlora_b = torch.empty(lora_b.shape, dtype=lora_b.dtype, device=x.device)
    drouter = (torch.empty(router_weight.shape, dtype=router_weight.dtype, device=x.device)
               if router_weight is not None else None)
    launchers.lora_weight_grad(dy, x, hg, dh, dl if router_weight is not None else None, rank=rank, scaling=scaling,
                               dlora_b=dlora_b, dlora_a=dlora_a if shared else dlora_a.view(a_rows.shape),
                               drouter=drouter, mask=mask, mask_scale=mask_scale, jitter=jitter)
    dx = None
    if need_x:
        second = (dl, router_weight) if router_weight is not None else None
        dx = launchers.matmul(dh, a_rows, out_dtype=dtype, compute_dtype=dtype, second=second, sanitize_b=not shared,
                              mask=mask, mask_scale=mask_scale, second_scale=jitter)
    return dx, dlora_a, dlora_b, drouter, dl, dw


def _grouped_lora_backward(dy, x, lora_a, lora_b, router_weight, h, ids, weights, dropout, jitter, layout, scaling,
                           router, need_x, dl_aux=None):
    """The same for the grouped regime (moelora.moe_lora's): dh rows = s w dy B_e with dw in the
    same grouped GEMM's epilogue; dB by a fixed-order grouped reduction; router_backward: d
    logits from dw; then dA, dW_router and dx = [dh | dl] [A ; W_router] (dense for a shared
    A; per expert, from the rows, for a per-expert A). With LoRA dropout x_lora is formed for dA
    and dx gets s_d M (.) d x_lora; with router jitter x (.) J is formed for dW_router and dx gets
    J (.) (dl W_router)."""
    mask, mask_scale = dropout
    dtype = x.dtype
    T, top_k = ids.shape
    meta = saved_layout(x, lora_a, lora_b, ids, layout)
    # a learned router's ids are all in the layout; given ids outside it (validation off) keep dw = 0
    dw = (torch.empty if router is not None else torch.zeros)(T * top_k, dtype=h.dtype, device=x.device)
    dh_rows, dlora_b = grouped_output_grads(dy, h, lora_a, lora_b, meta, weights, scaling, dw, dtype)
    dw = dw.view(T, top_k)
    dl = launchers.router_backward(dw, ids, weights, router) if router is not None else None
    if dl_aux is not None:
        launchers.masked_router_aux_loss_backward(*dl_aux, dl=dl)
    drouter = None
    if router_weight is not None:
        x_router = x if jitter is None else x * jitter
        drouter = launchers.matmul(dl.t(), x_router, out_dtype=router_weight.dtype, compute_dtype=dtype, split_k=True)
    router_dx = (dl, router_weight) if router_weight is not None and need_x else None  # x_router = J (.) x
    if mask is None:  # d logits W_router (times J) added by the dx GEMMs
        dlora_a, dx = grouped_input_grads(dh_rows, x, lora_a, meta, need_x, second=router_dx, second_scale=jitter)
    else:
        dlora_a, dx_lora = grouped_input_grads(dh_rows, dropped_out(x, mask, mask_scale), lora_a, meta, need_x)
        dx = None
        if need_x:
            dx = dropped_out(dx_lora, mask, mask_scale)  # x_lora = s_d M (.) x
            if router_dx is not None and jitter is None:
                dx = launchers.matmul(*router_dx, out_dtype=dtype, compute_dtype=dtype, addend=dx, out=dx)
            elif router_dx is not None:
                dx += launchers.matmul(*router_dx, out_dtype=dtype, compute_dtype=dtype).mul_(jitter)
    return dx, dlora_a, dlora_b, drouter, dl, dw


def _outputs(out, static: bool, logits_given: bool, x: torch.Tensor) -> List[torch.Tensor]:
    """The op's outputs: routing tensors that were inputs (static ids and weights, precomputed
    logits) are not returned (an op may not return its inputs); empty placeholders stand in."""
    y, h, logits, ids, weights, counts, aux_loss, aux_stats, layout = out
    if static:
        ids, weights = x.new_empty(0, dtype=ids.dtype), x.new_empty(0)
    if logits_given:
        logits = x.new_empty(0)
    return [y, h, logits, ids, weights, counts, aux_loss, aux_stats, *layout]


class _MoELoRALinearFn(torch.autograd.Function):
    """Eager-mode autograd of the fused layer: the custom ops' forward and backward without
    the custom-op dispatch (tens of microseconds of host time per call). x and the dropout mask of
    any leading shape are flattened here, below autograd: no view nodes in the graph. y is
    allocated in its own shape and written through a [T, d_out] view: a view returned by an
    autograd.Function could not be modified in place (autograd refuses it), nn.Linear's output can.

    Autograd's work per call grows with the Function's inputs and outputs, so only the tensors
    that may need a gradient are inputs: (x, weight, bias, lora_a, lora_b, router_weight,
    logits_in, topk_weights), then ``rest`` = the op's other arguments as op_args orders them
    (topk_ids, noise, num_steps, dropout_mask, jitter, aux_mask, then the 11 scalars). The outputs are
    y [..., d_out] and aux_loss; the non-differentiable ones (h, logits, ids, weights, counts,
    aux_stats) are appended to the list ``extra``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, router_weight, logits_in, topk_weights, rest, extra):
        topk_ids, noise, num_steps, dropout_mask, jitter, aux_mask, scaling, mode, top_k, renormalize, eps_start, \
            eps_end, ramp_steps, lb_coef, z_coef, dropout_scale, grouped = rest
        x_shape, T = x.shape, math.prod(x.shape[:-1])
        x = as_2d(x, T, x_shape[-1])
        if dropout_mask is not None:
            dropout_mask = as_2d(dropout_mask, T, x_shape[-1])
        if jitter is not None:
            jitter = as_2d(jitter, T, x_shape[-1])
        y_out = None if len(x_shape) == 2 else x.new_empty(x_shape[:-1] + (weight.shape[0],))
        y, h, logits, ids, weights, counts, aux_loss, aux_stats, layout = _fused_forward(
            x, weight, bias, lora_a, lora_b, router_weight, logits_in, topk_ids, topk_weights, noise, num_steps,
            dropout_mask, jitter, aux_mask, scaling, mode, top_k, renormalize, eps_start, eps_end, ramp_steps, lb_coef,
            z_coef, dropout_scale, grouped, None if y_out is None else y_out.view(T, weight.shape[0]))
        ctx.save_for_backward(x, weight, lora_a, lora_b, router_weight, h, logits, ids, weights, counts, dropout_mask,
                              jitter, aux_mask, *layout)
        ctx.config = (scaling, mode, renormalize, lb_coef, z_coef, dropout_scale, grouped)
        ctx.x_shape = x_shape
        ctx.set_materialize_grads(False)  # no zero gradients built for the outputs backward ignores
        extra.extend((h, logits, ids, weights, counts, aux_stats))
        return (y if y_out is None else y_out), aux_loss

    @staticmethod
    def backward(ctx, dy, g_aux):
        refuse_double_backward("MoELoRALinear")
        n = ctx.needs_input_grad
        needs = _on_request(n)
        x_shape = ctx.x_shape
        if dy is not None and len(x_shape) != 2:
            dy = dy.reshape(-1, dy.shape[-1])
        saved = ctx.saved_tensors
        # Only the aux loss reached the loss: y's inputs get no gradient, as in PyTorch. (A compiled
        # graph cannot tell: AOTAutograd hands its backward a zero dy, and those gradients are zeros.)
        aux_only = dy is None
        if aux_only:
            needs = (needs[0], False, False, *needs[3:])
        dx, dweight, dbias, dlora_a, dlora_b, drouter, dlogits, dw = _fused_backward(
            dy, g_aux, *saved[:_FIXED_SAVED], saved[_FIXED_SAVED:], *ctx.config, needs)
        if len(x_shape) != 2 and dx is not None:
            dx = dx.view(x_shape)
        if aux_only:
            dlora_a = dlora_b = dw = None
        return (dx, dweight, dbias, dlora_a if n[3] else None, dlora_b if n[4] else None,
                drouter if n[5] else None, dlogits, dw, None, None)


# ----------------------------------------------------------------------------- custom ops (torch.compile)
@custom_op("moe_lora_linear_fwd")
def moe_lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                        lora_b: torch.Tensor, router_weight: Optional[torch.Tensor], logits_in: Optional[torch.Tensor],
                        topk_weights: Optional[torch.Tensor], topk_ids: Optional[torch.Tensor],
                        noise: Optional[torch.Tensor], num_steps: Optional[torch.Tensor],
                        dropout_mask: Optional[torch.Tensor], jitter: Optional[torch.Tensor],
                        aux_mask: Optional[torch.Tensor], scaling: float, mode: str, top_k: int, renormalize: bool,
                        eps_start: float, eps_end: float, ramp_steps: int, lb_coef: float, z_coef: float,
                        dropout_scale: float, grouped: bool) -> List[torch.Tensor]:
    """[y, h, logits, ids, weights, counts, aux_loss, aux_stats, *layout] of the fused layer (see
    the module docstring); layout: the grouped regime's pair layout, none in the dense regime."""
    check_triton_op_device("moe_lora_linear_fwd", x.device)
    out = _fused_forward(x, weight, bias, lora_a, lora_b, router_weight, logits_in, topk_ids, topk_weights, noise,
                         num_steps, dropout_mask, jitter, aux_mask, scaling, mode, top_k, renormalize, eps_start,
                         eps_end, ramp_steps, lb_coef, z_coef, dropout_scale, grouped)
    return _outputs(out, mode == "static", logits_in is not None, x)


@moe_lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, router_weight, logits_in, topk_weights, topk_ids, noise, num_steps,
      dropout_mask, jitter, aux_mask, scaling, mode, top_k, renormalize, eps_start, eps_end, ramp_steps, lb_coef,
      z_coef, dropout_scale, grouped):
    T = x.shape[0]
    acc = launchers.accumulator_dtype(x.dtype)
    y = x.new_empty(T, weight.shape[0])
    k = top_k if mode != "static" else topk_ids.shape[1]
    if grouped and lora_a.dim() == 3:  # the rows x[t] A_e^T of the layout
        h = x.new_empty(grouped_row_count(x.shape[1], lora_a, lora_b, T * k), lora_b.shape[2], dtype=acc)
    else:
        h = x.new_empty(T, lora_a_rows(lora_a).shape[0], dtype=acc)
    layout = fake_grouped_layout(x, lora_a, lora_b, k) if grouped else []
    if mode == "static":
        empty = x.new_empty(0)
        return [y, h, empty, x.new_empty(0, dtype=topk_ids.dtype), x.new_empty(0), x.new_empty(0), x.new_empty(0),
                x.new_empty(0), *layout]
    E = router_weight.shape[0] if router_weight is not None else logits_in.shape[1]
    logits = x.new_empty(T, E, dtype=acc) if logits_in is None else x.new_empty(0)
    ids = x.new_empty(T, top_k, dtype=torch.int32)
    # the routing's weights in its logits' accumulator dtype (fp32 for half-precision logits)
    weights = x.new_empty(T, top_k, dtype=acc if logits_in is None else launchers.accumulator_dtype(logits_in.dtype))
    return [y, h, logits, ids, weights, x.new_empty(E, dtype=torch.int64), x.new_empty((), dtype=acc),
            x.new_empty(2, dtype=acc), *layout]


@custom_op("moe_lora_linear_bwd")
def moe_lora_linear_bwd(dy: torch.Tensor, g_aux: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                        lora_a: torch.Tensor, lora_b: torch.Tensor, router_weight: Optional[torch.Tensor],
                        h: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        counts: torch.Tensor, dropout_mask: Optional[torch.Tensor], jitter: Optional[torch.Tensor],
                        aux_mask: Optional[torch.Tensor], layout: List[torch.Tensor], scaling: float, mode: str,
                        renormalize: bool, lb_coef: float, z_coef: float, dropout_scale: float, grouped: bool,
                        needs: list[bool]) -> list[torch.Tensor]:
    """The gradients of the fused layer (empty tensors where ``needs`` is False)."""
    grads = _fused_backward(dy, g_aux, x, weight, lora_a, lora_b, router_weight, h, logits, ids, weights, counts,
                            dropout_mask, jitter, aux_mask, layout, scaling, mode, renormalize, lb_coef, z_coef,
                            dropout_scale, grouped, tuple(needs))
    return [x.new_empty(0) if g is None else g for g in grads]


@moe_lora_linear_bwd.register_fake
def _(dy, g_aux, x, weight, lora_a, lora_b, router_weight, h, logits, ids, weights, counts, dropout_mask, jitter,
      aux_mask, layout, scaling, mode, renormalize, lb_coef, z_coef, dropout_scale, grouped, needs):
    need_x, need_weight, need_bias, _, need_logits, need_w = needs

    def grad(like, wanted):
        return like.new_empty(like.shape) if wanted else x.new_empty(0)

    return [grad(x, need_x), grad(weight, need_weight), x.new_empty(weight.shape[0]) if need_bias else x.new_empty(0),
            grad(lora_a, True), grad(lora_b, True), grad(router_weight, router_weight is not None),
            grad(logits, need_logits and router_weight is None and mode != "static"),
            grad(weights, need_w and mode == "static")]


class _TracedMoELoRALinearFn(torch.autograd.Function):
    """The custom ops' autograd under torch.compile: dynamo traces this Function (forward: the op
    moe_lora_linear_fwd; backward: moe_lora_linear_bwd) into the graph. The ops carry no autograd
    kernel of their own: ``register_autograd``'s Python kernel runs on every call of a compiled
    graph too, grad mode off (about 13 us per call; moelora/ops/registration.py): in one process
    a compiled 8-layer training step took 320 us per layer with it on the forward op and 297 us
    with this Function (launches skipped, CPU). Called directly, the ops are not differentiable."""

    @staticmethod
    def forward(ctx, *inputs):
        (x, weight, bias, lora_a, lora_b, router_weight, logits_in, topk_weights, topk_ids, noise, num_steps,
         dropout_mask, jitter, aux_mask, scaling, mode, top_k, renormalize, eps_start, eps_end, ramp_steps, lb_coef,
         z_coef, dropout_scale, grouped) = inputs
        output = moe_lora_linear_fwd(*inputs)
        _, h, logits, ids, weights, counts, _, _, *layout = output
        if mode == "static":
            ids, weights = topk_ids, topk_weights
        if logits_in is not None:
            logits = logits_in
        ctx.save_for_backward(x, weight, lora_a, lora_b, router_weight, h, logits, ids, weights, counts, dropout_mask,
                              jitter, aux_mask, *layout)
        ctx.config = (scaling, mode, renormalize, lb_coef, z_coef, dropout_scale, grouped)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(*output[1:6], *output[7:])
        ctx.set_materialize_grads(False)
        return tuple(output)

    @staticmethod
    def backward(ctx, *grads):
        """Gradients of the inputs from those of the outputs [y, h, logits, ids, weights, counts,
        aux_loss, aux_stats, *layout] (only y's and aux_loss's reach here)."""
        dy, g_aux = grads[0], grads[6]
        n = ctx.needs_input_grad
        needs = list(_on_request(n))
        needs[2] = needs[2] and ctx.has_bias
        saved = ctx.saved_tensors
        grads = moe_lora_linear_bwd(dy, g_aux, *saved[:_FIXED_SAVED], list(saved[_FIXED_SAVED:]), *ctx.config, needs)
        dx, dweight, dbias, dlora_a, dlora_b, drouter, dlogits, dw = grads
        keep = lambda g, wanted: g if wanted else None  # noqa: E731
        return (keep(dx, n[0]), keep(dweight, n[1]), keep(dbias, needs[2]), keep(dlora_a, n[3]), keep(dlora_b, n[4]),
                keep(drouter, n[5]), keep(dlogits, n[6]), keep(dw, n[7])) + (None,) * 17
