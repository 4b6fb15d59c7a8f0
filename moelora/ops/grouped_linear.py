"""Per-expert linear layers over expert-sorted rows: the two GEMM engines and the torch
backend's segment loop.

Row space (moelora.ops.routing.DispatchMetadata with a block size): row r holds the pair
p = sorted_pairs_padded[r] (-1 on padding), expert e's rows start at padded_offsets[e];
rows without a pair are zero in every row-space tensor.

    rows_linear(a, W, meta)[r]   = a[row(r)] @ W[e]^T   (or @ W[e] with ``transposed``)
    rows_weight_grad(L, R, meta)[e] = sum over e's rows of L[row(r)]^T R[row(r)]

Engines:
- ``triton``: the grouped kernels of moelora.kernels.grouped; token-major operands
  are gathered in the prologue (row(r) = p // k), tiles from the shape-class table.
  Deterministic (fixed-order reductions, no atomics).
- ``grouped_mm``: torch's grouped GEMM (torch.nn.functional.grouped_mm / torch._grouped_mm;
  CUTLASS on sm90/sm100 for bfloat16, no host synchronisation there). Operands must
  already be in row space (the caller gathers x once), every stride 16-byte aligned
  (:func:`grouped_mm_layout_ok`), int32 group ends (:func:`group_ends`). No split-K:
  deterministic. Elsewhere (other dtypes or GPUs) torch runs a per-group loop that reads
  the offsets on the host; moelora only picks it on CPU, for tests.

``segment_linear`` is the torch backend's per-expert F.linear over unpadded expert
segments (one host read of the segment bounds), registered as a custom op so that
torch.compile sees one opaque, differentiable op instead of data-dependent slicing.
"""

from __future__ import annotations

import functools
from typing import List, Optional

import torch
import torch.nn.functional as F

from moelora.kernels import launchers
from moelora.ops.registration import custom_op, forward_ad_active

ENGINES = ("triton", "grouped_mm")


def may_be_symbolic(count) -> bool:
    """Whether the row count ``count`` may be symbolic (traced by torch.compile or torch.export with dynamic
    shapes; dynamo shows a symbolic int as an int): a choice by its row class (launchers.many_rows) would
    then put a guard on it."""
    return torch.compiler.is_compiling() or isinstance(count, torch.SymInt)


def layout_block(matmul_shapes: tuple, pairs, num_experts: int):
    """The segment padding of a grouped layout of ``pairs`` (token, slot) pairs over ``num_experts``
    experts for the grouped GEMMs of ``matmul_shapes`` (launchers.grouped_layout_block of the row
    class launchers.many_rows). A symbolic pair count (dynamic shapes under torch.compile or
    torch.export) gets a symbolic block, ``torch.sym_ite`` of the two classes' blocks, rather than a
    guard on the class, which torch.export refuses over a token range crossing it (or fixes in the
    program: larger inputs then fail its guard); the op's kernel picks the same block for the
    concrete count, so the fake and the real layout agree."""
    if may_be_symbolic(pairs):
        few, many = (launchers.grouped_layout_block(matmul_shapes, m) for m in (False, True))
        return few if few == many else torch.sym_ite(pairs >= launchers.MANY_ROWS * max(num_experts, 1), many, few)
    return launchers.grouped_layout_block(matmul_shapes, launchers.many_rows(pairs, num_experts))


def grouped_mm_fn():
    """torch's grouped GEMM (public name first), or None on a torch without it."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def native_major(device: torch.device) -> Optional[int]:
    """The major compute capability of ``device`` where torch runs grouped_mm as one CUTLASS
    kernel for bfloat16 (9 or 10, sm90 / sm100: the key of the engine tables), else None."""
    if device.type != "cuda" or grouped_mm_fn() is None:
        return None
    return _native_major(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _native_major(index: int) -> Optional[int]:
    major = torch.cuda.get_device_capability(index)[0]
    return major if major in (9, 10) else None


def grouped_mm_layout_ok(t: torch.Tensor, check_start: bool = True) -> bool:
    """grouped_mm's layout rules: unit stride in one of the last two dims and a multiple of
    16 bytes in the other (and in the batch dim of a 3-d operand), and, with
    ``check_start`` (not under torch.compile, where it is not known), a 16-byte aligned start."""
    if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    align = 16 // t.element_size()
    if check_start and (t.storage_offset() * t.element_size()) % 16:
        return False
    rows, cols = t.shape[-2], t.shape[-1]
    s_rows, s_cols = t.stride(-2), t.stride(-1)
    if s_cols == 1 and s_rows % align == 0 and s_rows >= max(1, cols):
        ok = True
    elif s_rows == 1 and s_cols % align == 0 and s_cols >= max(1, rows):
        ok = True
    else:
        ok = False
    return ok and (t.dim() == 2 or t.stride(0) % align == 0)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where its start is not 16-byte aligned (a view at an odd
    offset; the strides were checked when the plan was made)."""
    return t if grouped_mm_layout_ok(t) else t.contiguous()


def group_ends(meta) -> torch.Tensor:
    """grouped_mm's ``offs``: the int32 end row of each expert's padded segment, the last one
    extended over the unused tail (zero rows), so that every output row is written."""
    ends = meta.padded_offsets[1:]
    tail = torch.full((1,), meta.sorted_pairs_padded.numel(), dtype=ends.dtype, device=ends.device)
    return torch.cat([ends[:-1], tail]).to(torch.int32)


def rows_linear(a: torch.Tensor, weight: torch.Tensor, meta, engine: str, *, a_by_token: bool = False,
                transposed: bool = False, offs: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                compute_dtype: Optional[torch.dtype] = None, **triton_kwargs) -> torch.Tensor:
    """[R, N] expert outputs in row space: a[row(r)] @ W[e]^T, or a[row(r)] @ W[e] with
    ``transposed`` (weight [E, N, K] either way addressed through its strides); Triton
    multiplies in ``compute_dtype`` (default a's dtype) and writes ``out_dtype`` (default a's).

    grouped_mm needs ``a`` in row space and ``offs`` (:func:`group_ends`). Rows without a
    pair come out zero (grouped_mm: where a's are zero, as every row-space tensor here).
    ``triton_kwargs`` go to launchers.grouped_matmul (alpha, scale, second, gate_grad, config).
    """
    if engine == "grouped_mm":
        if a_by_token or triton_kwargs:
            raise ValueError("the grouped_mm engine takes row-space operands and no epilogue")
        weight = _aligned(weight)
        return grouped_mm_fn()(_aligned(a), weight if transposed else weight.transpose(1, 2), offs=offs)
    n = weight.shape[2] if transposed else weight.shape[1]
    out = torch.empty(meta.sorted_pairs_padded.numel(), n, dtype=out_dtype or a.dtype, device=a.device)
    strides = (weight.stride(2), weight.stride(1)) if transposed else (weight.stride(1), weight.stride(2))
    return launchers.grouped_matmul(a, weight, out, meta, a_by_token=a_by_token, weight_nk_strides=strides,
                                    compute_dtype=compute_dtype or a.dtype, **triton_kwargs)


def rows_weight_grad(left: torch.Tensor, right: torch.Tensor, meta, engine: str, *, out_dtype: torch.dtype,
                     left_by_token: bool = False, right_by_token: bool = False,
                     offs: Optional[torch.Tensor] = None, compute_dtype: Optional[torch.dtype] = None,
                     **triton_kwargs) -> torch.Tensor:
    """[E, NA, NB]: per expert, the sum over its rows of left[row(r)]^T right[row(r)]; exact
    zeros for experts without rows. grouped_mm: both operands in row space, padding rows
    zero in one of them (the K-grouped 2-d x 2-d form)."""
    if engine == "grouped_mm":
        if left_by_token or right_by_token or triton_kwargs:
            raise ValueError("the grouped_mm engine takes row-space operands and no epilogue")
        return grouped_mm_fn()(_aligned(left).t(), _aligned(right), offs=offs).to(out_dtype)
    return launchers.grouped_weight_grad(left, right, meta, left_by_token=left_by_token, right_by_token=right_by_token,
                                         compute_dtype=compute_dtype or left.dtype, out_dtype=out_dtype,
                                         **triton_kwargs)


# ------------------------------------------------------------ torch backend: segment loop

def segment_bounds(offsets: torch.Tensor):
    """([(e, start, end) of the non-empty experts], end of the last segment)."""
    bounds = offsets.tolist()  # the host read of this path
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]], bounds[-1]


# The start alignment (bytes) of a fresh CPU tensor: PyTorch's CPU allocator's (c10's gAlignment).
CPU_ALIGNMENT = 64


def _fresh_cpu_layout(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where it is a CPU view starting CPU_ALIGNMENT-misaligned: CPU GEMMs round by
    their operands' alignment, so an expert segment of the sorted rows starting at an odd byte offset (11 rows of
    width 13 in), or an expert's weight (fp64 [13, 5]: the second one 520 bytes in), rounded otherwise than the
    same values in a fresh tensor, as the plain linear layer reads them."""
    if t.device.type != "cpu" or (t.storage_offset() * t.element_size()) % CPU_ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


@custom_op("segment_linear")
def segment_linear(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   offsets: torch.Tensor) -> torch.Tensor:
    """out[i] = F.linear(rows[i], weight[e], bias[e]) for offsets[e] <= i < offsets[e+1]; zero
    rows from offsets[E] on. One F.linear per non-empty expert, on CPUs on a fresh-aligned
    segment and weight (:func:`_fresh_cpu_layout`), so an expert that gets every row rounds
    exactly like the plain linear layer."""
    out = rows.new_empty(rows.shape[0], weight.shape[1])
    segments, end = segment_bounds(offsets)
    for e, lo, hi in segments:
        out[lo:hi] = F.linear(_fresh_cpu_layout(rows[lo:hi]), _fresh_cpu_layout(weight[e]),
                              None if bias is None else bias[e])
    out[end:] = 0
    return out


@segment_linear.register_fake
def _(rows, weight, bias, offsets):
    return rows.new_empty(rows.shape[0], weight.shape[1])


@custom_op("segment_linear_backward")
def segment_linear_backward(grad: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                            has_bias: bool) -> List[torch.Tensor]:
    """[d_rows, d_weight, d_bias (empty without bias)]; experts without rows get zeros."""
    segments, end = segment_bounds(offsets)
    d_rows = torch.empty_like(rows)
    d_rows[end:] = 0
    d_weight = torch.zeros_like(weight) if len(segments) < weight.shape[0] else torch.empty_like(weight)
    d_bias = weight.new_zeros(weight.shape[:2] if has_bias else (0,))
    for e, lo, hi in segments:
        g = grad[lo:hi]
        d_rows[lo:hi] = g @ weight[e]
        d_weight[e] = g.t() @ rows[lo:hi]
        if has_bias:
            d_bias[e] = g.sum(0)
    return [d_rows, d_weight, d_bias]


@segment_linear_backward.register_fake
def _(grad, rows, weight, offsets, has_bias):
    return [torch.empty_like(rows), torch.empty_like(weight), weight.new_empty(weight.shape[:2] if has_bias else (0,))]


def _segment_linear_setup(ctx, inputs, output):
    rows, weight, bias, offsets = inputs
    ctx.save_for_backward(rows, weight, offsets)
    ctx.has_bias = bias is not None


def _segment_linear_grads(ctx, grad):
    rows, weight, offsets = ctx.saved_tensors
    # Grad mode on in a backward (create_graph=True, higher-order gradients): the op's body, whose PyTorch ops
    # autograd records; the op has no derivative of its own, and PyTorch differentiates through such an op only
    # with a deprecation warning ("may lead to silently incorrect behavior ... will be removed").
    backward = segment_linear_backward.fn if torch.is_grad_enabled() else segment_linear_backward
    d_rows, d_weight, d_bias = backward(grad, rows, weight, offsets, ctx.has_bias)
    return d_rows, d_weight, (d_bias if ctx.has_bias else None), None


segment_linear.register_autograd(_segment_linear_grads, setup_context=_segment_linear_setup)


def linear_by_segment(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      offsets: torch.Tensor) -> torch.Tensor:
    """:func:`segment_linear`; in forward-mode AD (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``)
    its body called directly, whose F.linear ops carry the tangents: a custom op's registered autograd has no
    forward-mode formula, and PyTorch drops the inputs' tangents through it without an error."""
    if forward_ad_active():
        return segment_linear.fn(rows, weight, bias, offsets)
    return segment_linear(rows, weight, bias, offsets)
