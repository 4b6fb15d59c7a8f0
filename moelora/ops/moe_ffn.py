"""The routed expert FFN of an MoE block (sparse upcycling), as one functional operator.

    ffn_e(x)     = W_out[e] act(W_in[e] x + b_in[e]) + b_out[e]
                   (gated MLPs: W_out[e] (act(W_gate[e] x + b_gate[e]) * (W_in[e] x + b_in[e])) + b_out[e])
    moe_ffn(x)[t] = sum_j w[t,j] ffn_{e[t,j]}(x[t])

Slots with weight 0 (dropped by threshold routing) are skipped. Ids outside [0, E) raise
(moelora.validation on, the default; one host read) or, with validation off, are skipped.
With ``normalize=True`` the kept weights c = w / sum(w) mix the expert outputs z_j as
``z_0 + sum_j c_j (z_j - z_0)``, equal to ``sum_j c_j z_j`` because the c_j sum to one;
identical experts (a freshly upcycled FFN) then reproduce the original FFN bit for bit
instead of up to the rounding of a weighted sum. The anchor z_0 is slot 0's output on both
backends: a token whose slot 0 is skipped (weight 0; threshold routing never drops it) has
z_0 = 0, so its mix is the plain sum_j c_j z_j, equal to one expert's output only up to
rounding. A token whose slots were all dropped gets 0; kept weights whose sum is below the
smallest normal number of the mixing dtype (fp32, fp64 for fp64 weights; zero or less above
all) cannot be normalised and raise ValueError (moelora.validation on; with it off that
token's output is meaningless, typically inf: the sum is clamped to finfo.tiny).

Backends (as :func:`moelora.moe_lora`):

- ``triton``: one small kernel masks the skipped slots (id -1) and turns the kept weights into
  the mixing coefficients (``launchers.mixing_weights``; its twin gives the weights' gradient
  in the backward); the (token, slot) pairs are sorted by expert (moelora.ops.routing's dispatch
  metadata, the moelora._C kernels when built) into padded row space; per projection one
  grouped GEMM on the engine of :func:`ffn_plan`: ``grouped_mm`` (torch's CUTLASS grouped
  GEMM; x is gathered once into row space) or ``triton`` (moelora's grouped kernels, rows
  gathered in the prologue, tiles from the shape-class table). The gated activation, the
  biases of the first projection and the padding are one elementwise kernel
  (``glu_forward``, SiLU/GELU/GELU-tanh/ReLU; any other activation callable runs as
  PyTorch ops on the same rows); the gate weights, b_out and the mixing are one combine
  kernel. Backward: one row kernel gives the output-row gradients and the gate-weight
  gradients together, weight gradients are grouped GEMMs over each expert's rows (no
  per-expert Python loop), bias gradients fixed-order per-expert row sums. No host
  synchronisation, no full-buffer zero fills; saved for backward: the routing layout, the
  projections' outputs (and, on the grouped_mm engine, the gathered x). Deterministic:
  the Triton kernels reduce in a fixed order without atomics and torch's grouped GEMM
  runs without split-K (checked bitwise on the GPU in tests/ops/test_moe_ffn.py).
- ``torch``: rows gathered in expert order (moelora.dispatch's op), one F.linear per
  non-empty expert segment (``moelora::segment_linear``, a custom op so torch.compile
  keeps it whole; in forward-mode AD its body, grouped_linear.linear_by_segment; it reads the
  segment bounds on the host: free on CPU, one
  synchronisation per projection on a GPU); on a CPU in eager mode the activation runs per
  expert segment too (CPU elementwise kernels round by position). Deterministic; an expert
  that gets every token rounds exactly like the original FFN.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelora.kernels import launchers
from moelora.ops.grouped_linear import (ENGINES, group_ends, grouped_mm_fn, grouped_mm_layout_ok, layout_block,
                                        linear_by_segment, may_be_symbolic, native_major, rows_linear, rows_weight_grad,
                                        segment_bounds)
from moelora.ops.routing_torch import padded_length
from moelora.ops.validation import (check_moe_ffn_args, check_routing_values, check_top_k, fake_mode_active,
                                    refuse_double_backward)
from moelora.ops.backend import autocast_dtype, autocast_input, check_triton_op_device, resolve_backend
from moelora.ops.registration import apply_eager, custom_op, distinct_inputs
from moelora.ops.routing import (LAYOUT_FIELDS, MAX_EXPERTS, DispatchMetadata, dispatch_rows, expert_layout,
                                 fake_layout_tensors, layout_from_tensors, layout_tensors)
from moelora.kernels.grouped import GELU, GELU_TANH, RELU, SILU


def _check_ffn_args(x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, stacked_gate, activation,
                    normalize, check_values: bool):
    """moe_ffn's argument checks; with ``check_values`` also the syncing checks of the routing."""
    check_moe_ffn_args(x, topk_ids, topk_weights, dict(w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out,
                                                       w_gate=w_gate, b_gate=b_gate), activation, normalize,
                       stacked_gate)
    if x.dim() != 2:
        raise ValueError(f"x must have shape [T, d_in], got {tuple(x.shape)}")
    if w_in.dim() != 3 or w_in.shape[2] != x.shape[1]:
        raise ValueError(f"w_in must have shape [E, d_ff, d_in = {x.shape[1]}], got {tuple(w_in.shape)}")
    num_experts, d_ff = w_in.shape[:2]
    if num_experts > MAX_EXPERTS:  # the expert sort's limit, on both backends
        raise ValueError(f"moe_ffn takes at most {MAX_EXPERTS} experts: w_in.shape[0] is {num_experts}")
    if num_experts < 1:
        raise ValueError(f"moe_ffn needs at least one expert: w_in.shape[0] is {num_experts}")
    if stacked_gate:
        if w_gate is not None or b_gate is not None:
            raise ValueError("with stacked_gate=True, w_in holds the gate rows: w_gate and b_gate must be None")
        if d_ff % 2:
            raise ValueError(f"with stacked_gate=True, w_in must have shape [E, 2 * d_ff, d_in], "
                             f"got {tuple(w_in.shape)}")
    elif b_gate is not None and w_gate is None:
        raise ValueError("b_gate is the gate projection's bias: it needs w_gate (or stacked_gate=True with the gate "
                         "rows and their bias in w_in and b_in)")
    rows_in, d_ff = d_ff, d_ff // 2 if stacked_gate else d_ff
    if w_out.dim() != 3 or w_out.shape[0] != num_experts or w_out.shape[2] != d_ff:
        raise ValueError(f"w_out must have shape [E = {num_experts}, d_out, d_ff = {d_ff}], got {tuple(w_out.shape)}")
    if w_gate is not None and tuple(w_gate.shape) != tuple(w_in.shape):
        raise ValueError(f"w_gate must have w_in's shape {tuple(w_in.shape)}, got {tuple(w_gate.shape)}")
    for name, bias, rows in (("b_in", b_in, rows_in), ("b_gate", b_gate, d_ff), ("b_out", b_out, w_out.shape[1])):
        if bias is not None and tuple(bias.shape) != (num_experts, rows):
            raise ValueError(f"{name} must have shape [{num_experts}, {rows}], got {tuple(bias.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_ids and topk_weights must both have shape [T = {x.shape[0]}, k], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    check_top_k(topk_ids.shape[1], num_experts, "k (topk_ids.shape[1])")  # the expert sort's, on both backends
    if check_values:
        check_routing_values(topk_ids, topk_weights, num_experts, positive_kept_sums=normalize)


# ------------------------------------------------------------------------ activations

ACTIVATION_CODES = {"silu": SILU, "gelu": GELU, "gelu_tanh": GELU_TANH, "relu": RELU}
_TRANSFORMERS_ACTIVATIONS = {"SiLUActivation": "silu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
                             "PytorchGELUTanh": "gelu_tanh", "FastGELUActivation": "gelu_tanh"}
_CALLABLES = {}  # key -> activation callable the fused kernels do not know (read under torch.compile)


def fused_activation_name(activation: Callable) -> Optional[str]:
    """The fused kernels' name for ``activation`` (a key of ACTIVATION_CODES), or None (a subclass of nn.SiLU,
    nn.GELU or nn.ReLU with a forward of its own computes something else)."""
    if activation is F.silu or _is_plain(activation, nn.SiLU):
        return "silu"
    if activation is F.gelu:
        return "gelu"
    if _is_plain(activation, nn.GELU):
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    if activation is F.relu or activation is torch.relu or _is_plain(activation, nn.ReLU):
        return "relu"
    kind = type(activation)
    if kind.__module__.startswith("transformers"):
        if kind.__name__ == "GELUActivation" and getattr(activation, "act", None) is F.gelu:
            return "gelu"
        return _TRANSFORMERS_ACTIVATIONS.get(kind.__name__)
    return None


def _is_plain(activation: Callable, cls: type) -> bool:
    """Whether ``activation`` is an instance of the activation module ``cls`` computing ``cls``'s forward."""
    return isinstance(activation, cls) and type(activation).forward is cls.forward


def _activation_key(activation: Callable) -> str:
    """A string naming ``activation`` for the custom ops: its fused name (traced through by
    torch.compile: the isinstance tests on a module such as nn.SiLU are guarded on), else a
    registry key."""
    name = fused_activation_name(activation)
    return name if name is not None else _callable_key(activation)


@torch.compiler.assume_constant_result  # evaluated (and registered) while torch.compile traces
def _callable_key(activation: Callable) -> str:
    """The registry key of an activation the fused kernels do not know."""
    key = f"callable:{id(activation)}"
    _CALLABLES[key] = activation
    return key


def _check_triton_activation(activation: Callable) -> None:
    """ValueError for an activation module with trainable parameters while autograd records: the
    Triton backend differentiates the activation in its input only, so their gradients would be
    lost (the torch backend differentiates them)."""
    if (torch.is_grad_enabled() and isinstance(activation, nn.Module) and fused_activation_name(activation) is None
            and any(p.requires_grad for p in activation.parameters())):
        raise ValueError(f"activation {type(activation).__name__} has trainable parameters, which the Triton "
                         "backend of moe_ffn does not differentiate: use backend='torch' (or freeze them)")


def _exporting_unfused(activation: Callable) -> bool:
    """Whether torch.export traces an activation the fused kernels do not know: the Triton backend's ops would
    name it by a key of this process's registry (``callable:<id>``), which a saved program loaded in another
    process lacks (KeyError there), so the torch backend's ops run instead, tracing it into the program."""
    return torch.compiler.is_exporting() and fused_activation_name(activation) is None


def _resolve_activation(key: str):
    """The fused-kernel code of ``key``, or the registered callable."""
    return ACTIVATION_CODES[key] if key in ACTIVATION_CODES else _CALLABLES[key]


def _row_biases(meta, ids, h, *biases):
    """(valid [R], [h + bias[e] for each bias]) per row r, e the expert of its pair."""
    pair = meta.sorted_pairs_padded
    valid = pair >= 0
    experts = ids.reshape(-1).long()[pair.clamp(min=0)]
    return valid, [t if b is None else t + b[experts] for t, b in zip(h, biases)]


def _out_of_place(activation: Callable) -> Callable:
    """``activation`` applied to a copy of its input: one that works in place (nn.ELU(inplace=True))
    would overwrite the projections' outputs saved for the backward, and torch.func.vjp refuses
    in-place ops on its inputs."""
    return lambda t: activation(t.clone())


def _glu(h_gate, h_in, b_gate, b_in, meta, ids, activation):
    """Row-space act(h_gate + b_gate) * (h_in + b_in) (act(h_in + b_in) ungated), 0 on padding."""
    if isinstance(activation, int):
        return launchers.glu_forward(h_gate, h_in, b_gate, b_in, meta, ids, activation)
    valid, (u, g) = _row_biases(meta, ids, (h_in, h_gate if h_gate is not None else h_in), b_in, b_gate)
    act = _out_of_place(activation)
    out = act(u) if h_gate is None else act(g) * u
    return torch.where(valid[:, None], out, 0)


def _glu_backward(d_h, h_gate, h_in, b_gate, b_in, meta, ids, activation, out=None):
    """(d h_gate or None, d h_in) of _glu, 0 on padding rows; written into ``out`` (a pair of
    views) when given."""
    if isinstance(activation, int):
        return launchers.glu_backward(d_h, h_gate, h_in, b_gate, b_in, meta, ids, activation, out=out)
    if out is not None:
        for view, grad in zip(out, _glu_backward(d_h, h_gate, h_in, b_gate, b_in, meta, ids, activation)):
            view.copy_(grad)
        return out
    valid, (u, g) = _row_biases(meta, ids, (h_in, h_gate if h_gate is not None else h_in), b_in, b_gate)
    d_h = torch.where(valid[:, None], d_h, 0)
    act = _out_of_place(activation)
    if h_gate is None:
        grads = (torch.func.vjp(act, u)[1](d_h)[0],)
    else:
        grads = torch.func.vjp(lambda gate, up: act(gate) * up, g, u)[1](d_h)
    grads = [torch.where(valid[:, None], t, 0) for t in grads]
    return (None, grads[0]) if h_gate is None else (grads[0], grads[1])


# ------------------------------------------------------------------------ engine plan

class FFNPlan(NamedTuple):
    """How the Triton backend runs one moe_ffn call."""

    gemm: str  # engine of the GEMMs with row-space outputs (both projections, dh, dx)
    wgrad: str  # engine of the weight gradients
    layout_block: int  # padding of the expert segments in row space (symbolic under dynamic shapes)

    @property
    def gathers_x(self) -> bool:
        """x is copied into row space once (the grouped_mm engine reads row-space operands)."""
        return "grouped_mm" in (self.gemm, self.wgrad)


# Engine by (GPU major capability, GEMM kind, shape class of the first projection, from
# moelora.kernels.launchers.grouped_shape_class; "*" = any class), measured by benchmarks/tune_grouped.py.
# It applies where torch's grouped_mm runs natively (bfloat16 on sm90/sm100, aligned
# strides); everything else runs the Triton engine.
FFN_ENGINES = {
    (9, "gemm", "*"): "grouped_mm",
    (9, "wgrad", "*"): "grouped_mm",
    (10, "gemm", "*"): "grouped_mm",
    (10, "wgrad", "*"): "grouped_mm",
}


def _grouped_mm_applies(x, w_in, w_out, w_gate, num_pairs) -> bool:
    """torch's grouped GEMM can take every operand of this FFN (dtype, alignment, int32 ends)."""
    if grouped_mm_fn() is None or num_pairs + 16 * w_in.shape[0] >= 2 ** 31:
        return False
    # a width of 0 too is refused: grouped_mm's backward takes no zero stride ("strides should be multiple of 16 bytes")
    widths_ok = all(n > 0 and n * x.element_size() % 16 == 0 for n in (x.shape[1], *w_in.shape[1:], *w_out.shape[1:]))
    tensors = [t for t in (x, w_in, w_out, w_gate) if t is not None]
    strides_ok = all(grouped_mm_layout_ok(t, check_start=False) for t in tensors)
    return widths_ok and strides_ok and len({t.dtype for t in tensors}) == 1


ENGINE_CHOICES = ("auto",) + ENGINES  # moe_ffn's engine argument


def check_engine(engine) -> None:
    """ValueError unless ``engine`` is one of ENGINE_CHOICES (on either backend: the torch backend
    ignores a valid one)."""
    if not isinstance(engine, str) or engine not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {ENGINE_CHOICES}, got {engine!r}")


def ffn_plan(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, w_gate: Optional[torch.Tensor], top_k: int,
             engine: str = "auto") -> FFNPlan:
    """The engines for this call: ``engine`` "triton" or "grouped_mm" forces both, "auto"
    looks up FFN_ENGINES where grouped_mm runs natively and uses Triton elsewhere."""
    check_engine(engine)
    E, d_first, d_in = w_in.shape  # d_first = 2 d_ff with stacked_gate
    d_ff, d_out = w_out.shape[2], w_out.shape[1]
    num_pairs = x.shape[0] * top_k
    applies = _grouped_mm_applies(x, w_in, w_out, w_gate, num_pairs)
    if engine == "grouped_mm" and not applies:
        raise ValueError("engine='grouped_mm' needs torch's grouped_mm and bfloat16/float16/float32 operands of one "
                         "dtype whose rows are 16-byte aligned (d_in, d_ff, d_out nonzero multiples of 16 bytes) and "
                         "laid out with a unit stride in one of their last two dims and 16-byte multiples in the "
                         "others (x and the weights: grouped_linear.grouped_mm_layout_ok)")
    if engine == "auto":
        gemm = wgrad = "triton"
        major = native_major(x.device)
        if applies and x.dtype == torch.bfloat16 and major is not None:
            # traced, the class-free ("*") entries: no guard on the row class
            shape = None if may_be_symbolic(num_pairs) else launchers.grouped_shape_class(
                "matmul", d_first, d_in, launchers.many_rows(num_pairs, E))
            pick = {kind: FFN_ENGINES.get((major, kind, shape), FFN_ENGINES.get((major, kind, "*"), "triton"))
                    for kind in ("gemm", "wgrad")}
            gemm, wgrad = pick["gemm"], pick["wgrad"]
    else:
        gemm = wgrad = engine
    shapes = ((d_first, d_in), (d_out, d_ff), (d_ff, d_out), (d_in, d_first)) if gemm == "triton" else ()
    return FFNPlan(gemm, wgrad, layout_block(shapes, num_pairs, E))


# ------------------------------------------------------------------ fused forward/backward

class _Saved(NamedTuple):
    """What backward needs besides the inputs (None where this plan has none)."""

    meta: DispatchMetadata
    ids: torch.Tensor  # the routing's ids, -1 for skipped slots
    row_coef: torch.Tensor  # the rows' coefficients in the mix (launchers.mixing_weights)
    offs: Optional[torch.Tensor]  # int32 group ends (grouped_mm)
    x_rows: Optional[torch.Tensor]  # x gathered into row space (grouped_mm)
    h_gate: Optional[torch.Tensor]  # gate projection (separate w_gate)
    h_in: torch.Tensor  # first projection (gate columns first with stacked_gate)
    h: torch.Tensor  # activation output, input of the second projection
    out: torch.Tensor  # second projection (no bias)


def _pack(saved: _Saved, like: torch.Tensor) -> List[torch.Tensor]:
    return layout_tensors(saved.meta) + [t if t is not None else like.new_empty(0) for t in saved[1:]]


def _unpack(tensors, num_experts: int, top_k: int, block: int) -> _Saved:
    meta = layout_from_tensors(tensors[:len(LAYOUT_FIELDS)], num_experts, top_k, block)
    rest = [None if name in _OPTIONAL and t.dim() == 1 and not t.numel() else t
            for name, t in zip(_Saved._fields[1:], tensors[len(LAYOUT_FIELDS):])]
    return _Saved(meta, *rest)


_OPTIONAL = ("offs", "x_rows", "h_gate")  # the _Saved fields packed as 1-d empty tensors where a plan has none
# (a saved h_gate or x_rows is 2-d, and empty where d_ff or d_in is 0; offs holds E >= 1 ends)


def _halves(t: Optional[torch.Tensor]):
    """(first half, second half) of the last dim: the gate and up parts of a stacked projection."""
    if t is None:
        return None, None
    half = t.shape[-1] // 2
    return t[..., :half], t[..., half:]


def _first_projection(h_gate, h_in, b_gate, b_in, stacked):
    """(h_gate, h_in, b_gate, b_in) for the activation, split from a stacked projection."""
    if not stacked:
        return h_gate, h_in, b_gate, b_in
    return (*_halves(h_in), *_halves(b_in))


def _ffn_forward(x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, activation, normalize, stacked,
                 plan: FFNPlan):
    """(y [T, d_out], _Saved). ``activation`` a fused-kernel code or a callable; ``stacked``:
    w_in, b_in hold [gate; up] (one GEMM for both); ``normalize``: the anchored mix of
    normalised weights (see the module docstring)."""
    ids, coef, row_coef = launchers.mixing_weights(topk_ids, topk_weights, w_in.shape[0], normalize)
    meta = expert_layout(ids, w_in.shape[0], plan.layout_block)
    offs = group_ends(meta) if plan.gathers_x else None
    x_rows = dispatch_rows(x, meta) if plan.gathers_x else None
    source, by_token = (x_rows, False) if plan.gemm == "grouped_mm" else (x, True)
    h_in = rows_linear(source, w_in, meta, plan.gemm, a_by_token=by_token, offs=offs)
    h_gate = None if w_gate is None else rows_linear(source, w_gate, meta, plan.gemm, a_by_token=by_token, offs=offs)
    h = _glu(*_first_projection(h_gate, h_in, b_gate, b_in, stacked), meta, ids, activation)
    out = rows_linear(h, w_out, meta, plan.gemm, offs=offs)
    y = launchers.combine_rows(out, meta, out_dtype=x.dtype, coef=coef, anchored=normalize,
                               bias=None if b_out is None else (ids, b_out))
    return y, _Saved(meta, ids, row_coef, offs, x_rows, h_gate, h_in, h, out)


def _ffn_backward(dy, x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, saved: _Saved, activation,
                  normalize, stacked, plan: FFNPlan, needs):
    """[dx, d topk_weights, dw_in, db_in, dw_out, db_out, dw_gate, db_gate] (None where not needed)."""
    need_x, need_weights, need_w_in, need_b_in, need_w_out, need_b_out, need_w_gate, need_b_gate = needs
    meta, offs, ids = saved.meta, saved.offs, saved.ids
    # d out rows = c * dy (the rows' coefficients of the mix), g = <dy, z> for the weights' gradient
    d_out, g = launchers.combine_rows_backward(dy, saved.out, meta, ids, saved.row_coef.reshape(-1), bias=b_out,
                                               need_g=need_weights)
    dweights = None
    if need_weights:
        dweights = launchers.mixing_weights_backward(g, topk_ids, topk_weights, w_in.shape[0], normalize)
    db_out = launchers.segment_sum(d_out, meta, out_dtype=b_out.dtype) if need_b_out else None
    dw_out = (rows_weight_grad(d_out, saved.h, meta, plan.wgrad, out_dtype=w_out.dtype, offs=offs) if need_w_out
              else None)
    d_h = rows_linear(d_out, w_out, meta, plan.gemm, transposed=True, offs=offs)
    first = _first_projection(saved.h_gate, saved.h_in, b_gate, b_in, stacked)
    if stacked:  # d of the stacked projection, written by halves; from here on it is "d_in"
        d_in = torch.empty_like(saved.h_in)
        d_gate = None
        _glu_backward(d_h, *first, meta, ids, activation, out=_halves(d_in))
    else:
        d_gate, d_in = _glu_backward(d_h, *first, meta, ids, activation)
    db_in = launchers.segment_sum(d_in, meta, out_dtype=b_in.dtype) if need_b_in else None
    db_gate = launchers.segment_sum(d_gate, meta, out_dtype=b_gate.dtype) if need_b_gate else None
    x_rows, x_by_token = (saved.x_rows, False) if saved.x_rows is not None else (x, True)
    dw_in = rows_weight_grad(d_in, x_rows, meta, plan.wgrad, out_dtype=w_in.dtype, right_by_token=x_by_token,
                             offs=offs) if need_w_in else None
    dw_gate = rows_weight_grad(d_gate, x_rows, meta, plan.wgrad, out_dtype=w_gate.dtype, right_by_token=x_by_token,
                               offs=offs) if need_w_gate else None
    dx = None
    if need_x:
        if plan.gemm == "triton" or d_gate is None:
            second = None if d_gate is None else dict(second=(d_gate, w_gate, (w_gate.stride(2), w_gate.stride(1))))
            dx_rows = rows_linear(d_in, w_in, meta, plan.gemm, transposed=True, offs=offs, **(second or {}))
            dx_rows2 = None
        else:
            dx_rows = rows_linear(d_in, w_in, meta, plan.gemm, transposed=True, offs=offs)
            dx_rows2 = rows_linear(d_gate, w_gate, meta, plan.gemm, transposed=True, offs=offs)
        dx = launchers.combine_rows(dx_rows, meta, out_dtype=x.dtype, second=dx_rows2)
    return [dx, dweights, dw_in, db_in, dw_out, db_out, dw_gate, db_gate]


# ------------------------------------------------------------------ custom ops and autograd

def _fake_saved(x, topk_ids, topk_weights, w_in, w_out, w_gate, gathers_x: bool, layout_block: int
                ) -> List[torch.Tensor]:
    T, top_k = topk_ids.shape
    E, d_first, d_in = w_in.shape
    d_ff = w_out.shape[2]
    rows = padded_length(T * top_k, E, layout_block)
    return fake_layout_tensors(x, T, top_k, E, layout_block) + [
        torch.empty_like(topk_ids), x.new_empty(T, top_k, dtype=launchers.accumulator_dtype(topk_weights.dtype)),
        x.new_empty(E if gathers_x else 0, dtype=torch.int32 if gathers_x else x.dtype),
        x.new_empty((rows, d_in) if gathers_x else (0,)),
        x.new_empty((rows, d_ff) if w_gate is not None else (0,)),
        x.new_empty(rows, d_first), x.new_empty(rows, d_ff), x.new_empty(rows, w_out.shape[1])]


@custom_op("moe_ffn_forward")
def moe_ffn_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_in: torch.Tensor,
                    b_in: Optional[torch.Tensor], w_out: torch.Tensor, b_out: Optional[torch.Tensor],
                    w_gate: Optional[torch.Tensor], b_gate: Optional[torch.Tensor], activation: str, normalize: bool,
                    stacked: bool, gemm: str, wgrad: str, layout_block: int) -> List[torch.Tensor]:
    """[y, *saved]: the fused moe_ffn forward (see the module docstring); ``activation`` a key
    of ACTIVATION_CODES or of a registered callable."""
    check_triton_op_device("moe_ffn_forward", x.device)
    y, saved = _ffn_forward(x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate,
                            _resolve_activation(activation), normalize, stacked, FFNPlan(gemm, wgrad, layout_block))
    return [y] + _pack(saved, x)


@moe_ffn_forward.register_fake
def _(x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, activation, normalize, stacked, gemm,
      wgrad, layout_block):
    gathers_x = FFNPlan(gemm, wgrad, layout_block).gathers_x
    return [x.new_empty(x.shape[0], w_out.shape[1])] + _fake_saved(x, topk_ids, topk_weights, w_in, w_out, w_gate,
                                                                   gathers_x, layout_block)


@custom_op("moe_ffn_backward")
def moe_ffn_backward(dy: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     w_in: torch.Tensor, b_in: Optional[torch.Tensor], w_out: torch.Tensor,
                     b_out: Optional[torch.Tensor], w_gate: Optional[torch.Tensor], b_gate: Optional[torch.Tensor],
                     saved: List[torch.Tensor], activation: str, normalize: bool, stacked: bool, gemm: str,
                     wgrad: str, layout_block: int, needs: List[bool]) -> List[torch.Tensor]:
    """[dx, d topk_weights, dw_in, db_in, dw_out, db_out, dw_gate, db_gate], empty where not needed."""
    grads = _ffn_backward(dy, x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate,
                          _unpack(saved, w_in.shape[0], topk_ids.shape[1], layout_block),
                          _resolve_activation(activation), normalize, stacked, FFNPlan(gemm, wgrad, layout_block),
                          needs)
    return [g if g is not None else x.new_empty(0) for g in grads]


@moe_ffn_backward.register_fake
def _(dy, x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, saved, activation, normalize, stacked,
      gemm, wgrad, layout_block, needs):
    like = (x, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate)
    return [t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip(like, needs)]


_DIFFERENTIABLE = (0, 2, 3, 4, 5, 6, 7, 8)  # x, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate


def _save(ctx, inputs, saved: List[torch.Tensor], activation, normalize, stacked, plan):
    ctx.save_for_backward(*inputs[:9], *saved)
    ctx.activation, ctx.normalize, ctx.stacked, ctx.plan = activation, normalize, stacked, plan


def _input_grads(ctx, dy, backward) -> tuple:
    """Gradients for (x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate) and None for the rest."""
    tensors = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in _DIFFERENTIABLE]
    grads = backward(dy, *tensors[:9], saved=tensors[9:], activation=ctx.activation, normalize=ctx.normalize,
                     stacked=ctx.stacked, plan=ctx.plan, needs=needs)
    out = [None] * len(ctx.needs_input_grad)
    for i, g, need in zip(_DIFFERENTIABLE, grads, needs):
        out[i] = g if need else None
    return tuple(out)


def _op_backward(dy, *inputs, saved, activation, normalize, stacked, plan, needs):
    return moe_ffn_backward(dy, *inputs, list(saved), activation, normalize, stacked, *plan, needs)


def _eager_backward(dy, *inputs, saved, activation, normalize, stacked, plan, needs):
    topk_ids, w_in = inputs[1], inputs[3]
    return _ffn_backward(dy, *inputs, _unpack(saved, w_in.shape[0], topk_ids.shape[1], plan.layout_block),
                         activation, normalize, stacked, plan, needs)


class _TracedMoEFFN(torch.autograd.Function):
    """The custom ops' autograd under torch.compile: dynamo traces this Function (forward: the op
    moe_ffn_forward; backward: moe_ffn_backward) into the graph. The ops carry no autograd kernel
    of their own, whose Python would run on every call of a compiled graph (see
    moelora.ops.moe_lora_linear._TracedMoELoRALinearFn); called directly, they are not
    differentiable."""

    @staticmethod
    def forward(ctx, *inputs):
        output = moe_ffn_forward(*inputs)  # [y, *saved]
        ctx.mark_non_differentiable(*output[1:])
        _save(ctx, inputs, output[1:], inputs[9], inputs[10], inputs[11], FFNPlan(*inputs[12:15]))
        return tuple(output)

    @staticmethod
    def backward(ctx, dy, *unused):
        return _input_grads(ctx, dy, _op_backward)


class _EagerMoEFFN(torch.autograd.Function):
    """The custom ops' forward and backward without the custom-op dispatch (eager mode), with
    the activation passed as it is; torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, activation, normalize,
                stacked, plan):
        inputs = (x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate)
        y, saved = _ffn_forward(*inputs, activation, normalize, stacked, plan)
        _save(ctx, inputs, _pack(saved, x), activation, normalize, stacked, plan)
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("moe_ffn")
        return _input_grads(ctx, dy, _eager_backward)


def _moe_ffn_triton(x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, activation, normalize,
                    stacked, plan):
    inputs = (x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate)
    if torch.compiler.is_compiling():
        return _TracedMoEFFN.apply(*distinct_inputs(*inputs), _activation_key(activation), normalize, stacked, *plan)[0]
    name = fused_activation_name(activation)
    code = ACTIVATION_CODES[name] if name is not None else activation
    return apply_eager(_EagerMoEFFN, *inputs, code, normalize, stacked, plan)


# ------------------------------------------------------------------------ torch backend

def _by_segment(activation: Callable, offsets: torch.Tensor, h: torch.Tensor,
                up: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``activation(h)`` (times ``up``) of contiguous row-space tensors; on a CPU in eager mode one call
    per expert segment (and one for the rows after them), each on a copy of its segment
    (:func:`_out_of_place`: an activation working in place, nn.ELU(inplace=True), would otherwise change
    views of one tensor autograd saved). CPU elementwise kernels round by position (a vectorised body,
    then a scalar tail), so each expert's rows then round as the FFN's activation over the same rows
    did: an expert routed every token reproduces the FFN bit for bit whatever d_ff. Elsewhere (GPUs,
    whose kernels round alike at every position; torch.compile; a FakeTensorMode, whose offsets hold no
    values to read) one call."""
    def fn(act, h, up):
        return act(h) if up is None else act(h) * up

    if h.device.type != "cpu" or torch.compiler.is_compiling() or fake_mode_active():
        return fn(activation, h, up)
    act = _out_of_place(activation)
    segments, end = segment_bounds(offsets)
    bounds = [(lo, hi) for _, lo, hi in segments] + [(end, h.shape[0])]
    return torch.cat([fn(act, h[lo:hi], None if up is None else up[lo:hi]) for lo, hi in bounds])


def _experts_torch(x, ids, w_in, b_in, w_out, b_out, activation, w_gate, b_gate, stacked):
    """Pair-major [T*k, d_out] expert outputs (zero rows for skipped pairs), one F.linear per
    expert segment of the expert-sorted rows."""
    meta = expert_layout(ids, w_in.shape[0], None)
    rows = dispatch_rows(x, meta)  # [T*k, d_in], expert-sorted, skipped pairs last
    h = linear_by_segment(rows, w_in, b_in, meta.offsets)
    if stacked:  # the halves are strided: CPU kernels loop over each row on its own, as the FFN's
        gate, h = _halves(h)
        h = activation(gate) * h
    elif w_gate is None:
        h = _by_segment(activation, meta.offsets, h)
    else:
        h = _by_segment(activation, meta.offsets, linear_by_segment(rows, w_gate, b_gate, meta.offsets), h)
    sorted_out = linear_by_segment(h, w_out, b_out, meta.offsets)
    position = meta.inverse.reshape(-1)
    kept = position >= 0
    pairs = sorted_out.index_select(0, torch.where(kept, position, 0))
    return torch.where(kept[:, None], pairs, 0)


def mixing_weights(weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The mixing coefficients in fp32 (fp64 for fp64): the weights (zero for skipped slots),
    divided by their sum with ``normalize`` (a row of only skipped slots stays 0)."""
    w = weights.to(launchers.accumulator_dtype(weights.dtype))
    if not normalize:
        return w
    return w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def mix_experts(pairs: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """[T, d] from expert outputs [T, k, d] (zero for skipped slots) and their weights [T, k]
    (zero for skipped slots); fixed slot order, accumulated in fp32 (fp64 for fp64 data)."""
    acc = launchers.accumulator_dtype(pairs.dtype)
    w = mixing_weights(weights, normalize).to(acc)
    if not normalize:
        return (w.unsqueeze(-1) * pairs).sum(1).to(pairs.dtype)
    wide = pairs.to(acc)  # the differences z_j - z_0 too: in fp16/bf16 each would round
    first = wide[:, :1]
    return (first.squeeze(1) + (w.unsqueeze(-1) * (wide - first)).sum(1)).to(pairs.dtype)


def moe_ffn(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_in: torch.Tensor,
            b_in: Optional[torch.Tensor], w_out: torch.Tensor, b_out: Optional[torch.Tensor],
            activation: Callable, w_gate: Optional[torch.Tensor] = None, b_gate: Optional[torch.Tensor] = None,
            *, normalize: bool = False, backend: Optional[str] = None, engine: str = "auto",
            stacked_gate: bool = False) -> torch.Tensor:
    """Routed expert FFNs on x [T, d_in] with expert weights stacked on dim 0 (nn.Linear
    layouts: w_in/w_gate [E, d_ff, d_in], w_out [E, d_out, d_ff]; biases b_in/b_gate [E, d_ff],
    b_out [E, d_out] or None), routed by ``topk_ids`` [T, k] (int32/int64, k <= E) with gate
    weights ``topk_weights`` [T, k] (floating point; weight 0 skips the slot); returns [T, d_out] in
    x's dtype (autocast's under torch.autocast), differentiable w.r.t. x, every weight and bias, and
    topk_weights. See the module docstring for ``normalize`` and ``backend``; ``engine`` (Triton backend only):
    "auto" (:func:`ffn_plan`), "triton" or "grouped_mm". ``stacked_gate``: w_in [E, 2 d_ff,
    d_in] (and b_in [E, 2 d_ff]) hold the gate rows, then the up rows (the "w13" layout of
    fused MoE kernels; one GEMM for both), w_gate and b_gate are None. An ``activation`` the fused
    kernels do not know runs as PyTorch ops; the Triton backend differentiates it in its input
    only and refuses an nn.Module activation with trainable parameters while autograd records
    (the torch backend trains them); torch.export traces it on the torch backend's path, so that the
    program holds it (see _exporting_unfused).
    """
    return _moe_ffn(x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, activation, normalize, backend,
                    engine, stacked_gate, True)


def routed_moe_ffn(x: torch.Tensor, routing, w_in: torch.Tensor, b_in: Optional[torch.Tensor], w_out: torch.Tensor,
                   b_out: Optional[torch.Tensor], activation: Callable, w_gate: Optional[torch.Tensor] = None,
                   b_gate: Optional[torch.Tensor] = None, *, normalize: bool = False,
                   stacked_gate: bool = False) -> torch.Tensor:
    """:func:`moe_ffn` on a learned router's ``routing`` (moelora.Routing; MoEFFN's): its ids lie in
    [0, E) and its weights are nonnegative, so nothing reads it on the host (a device sync per
    call, which moe_ffn's syncing checks make); the shapes and dtypes are checked."""
    return _moe_ffn(x, routing.ids, routing.weights, w_in, b_in, w_out, b_out, w_gate, b_gate, activation, normalize,
                    None, "auto", stacked_gate, False)


def _moe_ffn(x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, activation, normalize, backend,
             engine, stacked_gate, check_values: bool) -> torch.Tensor:
    """moe_ffn; ``check_values``: whether the syncing checks of the routing run (see _check_ffn_args)."""
    cast = autocast_dtype(x)
    if cast is not None:  # torch.autocast: x and the expert weights in its dtype, as F.linear's; the op runs without it
        x, w_in, b_in, w_out, b_out, w_gate, b_gate = (
            autocast_input(t, cast) for t in (x, w_in, b_in, w_out, b_out, w_gate, b_gate))
        with torch.autocast(x.device.type, enabled=False):
            return _moe_ffn(x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, activation, normalize,
                            backend, engine, stacked_gate, check_values)
    _check_ffn_args(x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, stacked_gate, activation,
                    normalize, check_values)
    check_engine(engine)
    num_tokens, top_k = topk_ids.shape
    triton = resolve_backend(backend, x.device) == "triton" and not _exporting_unfused(activation)
    if triton:  # what the Triton backend refuses, it refuses whatever the token count (no kernel runs on T = 0)
        _check_triton_activation(activation)
        plan = ffn_plan(x, w_in, w_out, w_gate, top_k, engine)
    if not triton or num_tokens == 0:
        kept = (topk_weights != 0) & (topk_ids >= 0) & (topk_ids < w_in.shape[0])
        ids = torch.where(kept, topk_ids, -1)
        pairs = _experts_torch(x, ids, w_in, b_in, w_out, b_out, activation, w_gate, b_gate, stacked_gate)
        return mix_experts(pairs.view(num_tokens, top_k, w_out.shape[1]), torch.where(kept, topk_weights, 0),
                           normalize)
    return _moe_ffn_triton(x, topk_ids, topk_weights, w_in, b_in, w_out, b_out, w_gate, b_gate, activation, normalize,
                           stacked_gate, plan)
