"""Python launchers of the raw Triton kernels: output allocation, strides, block sizes.

Each launcher computes one kernel's result on tensors of any strides; no launcher reads
device memory on the host, so all of them are CUDA-graph safe.
"""

from __future__ import annotations

import functools
import os
from typing import Dict, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .triton_kernels.gating import gate_backward_kernel, gate_expand_kernel, gated_expand_kernel
from .triton_kernels.grouped import (combine_rows_backward_kernel, combine_rows_kernel, glu_backward_kernel,
                                     glu_forward_kernel, grouped_matmul_kernel, grouped_weight_grad_kernel)
from .triton_kernels.matmul import matmul_kernel

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every input dtype except fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_config(compute_dtype: torch.dtype) -> dict:
    tf32 = compute_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting()
    return _dot_config_cached(compute_dtype, tf32)


@functools.lru_cache(maxsize=None)
def _dot_config_cached(compute_dtype: torch.dtype, tf32: bool) -> dict:
    return {
        "DOT_DTYPE": _TL_DTYPES[compute_dtype],
        "ACC_DTYPE": _TL_DTYPES[accumulator_dtype(compute_dtype)],
        "INPUT_PRECISION": "tf32" if tf32 else "ieee",
    }


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs needed to fill the device about twice; tiny under the interpreter."""
    if device.type != "cuda":
        return 1
    return 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _split_count(tiles: int, reduction: int, device: torch.device, min_per_split: int = 256) -> int:
    """Slices of a long reduction so that tiles * splits fills the device."""
    want = -(-_target_programs(device) // max(tiles, 1))
    return max(1, min(want, reduction // min_per_split, 64))


def matmul(a: torch.Tensor, b: torch.Tensor, *, out_dtype: torch.dtype, compute_dtype: torch.dtype,
           alpha: float = 1.0, addend: Optional[torch.Tensor] = None, split_k: bool = False,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """alpha * a @ b (+ addend) for a [M, K], b [K, N] of any strides; fp32/fp64 accumulation.

    With ``split_k`` the K range is cut into slices whose fp32 partials are summed in a
    fixed order (for weight gradients, whose reduction runs over all tokens). ``out``
    (any strides) receives the result when given.
    """
    M, K = a.shape
    N = b.shape[1]
    acc_dtype = accumulator_dtype(compute_dtype)
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0 or K == 0:
        out.copy_(addend if addend is not None else torch.zeros((), dtype=out_dtype))
        return out
    block_m = 64 if M >= 64 or interpreting() else _pow2_block(M, 16, 64)
    block_n = _pow2_block(N, 16, 128)
    block_k = _pow2_block(K, 16, 64)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    splits = _split_count(tiles, K, a.device) if split_k else 1
    k_per_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, k_per_split)
    # One split writes straight into ``out``; several write fp32 partials [splits, M, N].
    partial = out if splits == 1 else torch.empty(splits, M, N, dtype=acc_dtype, device=a.device)
    split_stride = 0 if splits == 1 else partial.stride(0)
    has_addend = addend is not None and splits == 1
    d = addend if has_addend else out
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), splits)
    matmul_kernel[grid](
        a, b, partial, d, M, N, K, k_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        split_stride, partial.stride(-2), partial.stride(-1), d.stride(0), d.stride(1),
        alpha, HAS_ADDEND=has_addend, **_dot_config(compute_dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    if splits > 1:
        total = partial.sum(0)
        out.copy_(total if addend is None else total + addend.to(acc_dtype))
    return out


def _routing_blocks(top_k: int) -> int:
    return triton.next_power_of_2(top_k)


def gate_expand(h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, num_experts: int,
                rank: int, scaling: float, shared_a: bool, out_dtype: torch.dtype,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hg [T, E*r] = s * G[t, e] * h_e[t]  (h [T, r] shared, or [T, E*r] per expert)."""
    T = h.shape[0]
    if out is None:
        out = torch.empty(T, num_experts * rank, dtype=out_dtype, device=h.device)
    block_t = 64 if interpreting() else 32
    grid = (triton.cdiv(T, block_t),)
    gate_expand_kernel[grid](
        h, topk_ids, topk_weights, out, T, num_experts, rank, scaling,
        h.stride(0), 0 if shared_a else rank * h.stride(1), h.stride(1),
        topk_ids.stride(0), topk_ids.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        out.stride(0), out.stride(1),
        COMPUTE_DTYPE=_TL_DTYPES[accumulator_dtype(h.dtype)],
        TOP_K=topk_ids.shape[1], BLOCK_K=_routing_blocks(topk_ids.shape[1]),
        BLOCK_T=block_t, BLOCK_R=_pow2_block(rank, 1, 1 << 16),
    )
    return out


def gated_expand(h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, lora_b: torch.Tensor, *,
                 scaling: float, shared_a: bool, base: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = base + sum_e (s * G[:, e] * h_e) @ B[e]^T in one kernel; y in B's dtype, [T, d_out]."""
    num_experts, N, rank = lora_b.shape
    T = h.shape[0]
    if out is None:
        out = torch.empty(T, N, dtype=lora_b.dtype, device=h.device)
    if T == 0 or N == 0:
        return out
    block_t = 64
    block_n = _pow2_block(N, 16, 128)
    base_arg = base if base is not None else out
    grid = (triton.cdiv(T, block_t), triton.cdiv(N, block_n))
    gated_expand_kernel[grid](
        h, topk_ids, topk_weights, lora_b, base_arg, out, T, N, num_experts, rank, scaling,
        h.stride(0), 0 if shared_a else rank * h.stride(1), h.stride(1),
        topk_ids.stride(0), topk_ids.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        base_arg.stride(0), base_arg.stride(1), out.stride(0), out.stride(1),
        SHARED_A=shared_a, HAS_BASE=base is not None, **_dot_config(lora_b.dtype),
        TOP_K=topk_ids.shape[1], BLOCK_K=_routing_blocks(topk_ids.shape[1]),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=_pow2_block(rank, 16, 1 << 16),
    )
    return out


def gate_backward(dhg: torch.Tensor, h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                  num_experts: int, rank: int, scaling: float, shared_a: bool,
                  dh: Optional[torch.Tensor] = None, dw: Optional[torch.Tensor] = None):
    """(dh, dw): dh [T, r] (shared A) or [T, E*r], dw [T, k]; both in h's (accumulator) dtype."""
    T = h.shape[0]
    if dh is None:
        dh = torch.empty(T, rank if shared_a else num_experts * rank, dtype=h.dtype, device=h.device)
    if dw is None:
        dw = torch.empty(topk_ids.shape, dtype=h.dtype, device=h.device)
    block_t = 64 if interpreting() else 32
    grid = (triton.cdiv(T, block_t),)
    gate_backward_kernel[grid](
        dhg, h, topk_ids, topk_weights, dh, dw, T, num_experts, rank, scaling,
        dhg.stride(0), dhg.stride(1),
        h.stride(0), 0 if shared_a else rank * h.stride(1), h.stride(1),
        topk_ids.stride(0), topk_ids.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        dh.stride(0), dh.stride(1), dw.stride(0), dw.stride(1),
        SHARED_A=shared_a, COMPUTE_DTYPE=_TL_DTYPES[h.dtype],
        TOP_K=topk_ids.shape[1], BLOCK_K=_routing_blocks(topk_ids.shape[1]),
        BLOCK_T=block_t, BLOCK_R=_pow2_block(rank, 1, 1 << 16),
    )
    return dh, dw


# ------------------------------------------------------- grouped GEMMs over expert-sorted rows
#
# Row space (triton_kernels/grouped.py): the pairs sorted by expert, each expert's segment
# padded to the layout block; ``meta`` is the DispatchMetadata of moelora.routing built with
# that block size (sorted_pairs_padded = the pair of each row, padded_offsets = segment
# starts, counts, block_expert, inverse_padded = the row of each pair).


class TileConfig(NamedTuple):
    """Tiles of one grouped kernel launch.

    grouped_matmul: block_m rows x block_n output columns, block_k reduction step, ``group``
    row tiles swizzled together. grouped_weight_grad: block_m x block_n tile of the
    [NA, NB] output, block_k rows per reduction step, ``group`` tiles swizzled together.
    """

    block_m: int
    block_n: int
    block_k: int
    group: int
    num_warps: int
    num_stages: int


def _width_class(n: int) -> str:
    return "s" if n <= 64 else ("m" if n <= 256 else "l")


def grouped_shape_class(kernel: str, n: int, k: int, rows_per_expert: float) -> str:
    """Key of GROUPED_CONFIGS: ``kernel:<n><k>:<rows>``.

    kernel "matmul" (n = output columns N, k = reduction K) or "wgrad" (n, k = the two
    output dims NA, NB); widths s (<= 64), m (<= 256), l; rows per expert "few" (< 256) or
    "many". E.g. S5's FFN projections are ``matmul:ll:many``, S3's h @ B is ``matmul:ls:many``,
    its dh = dy @ B ``matmul:sl:many`` and dB ``wgrad:ls:many``.
    """
    rows = "few" if rows_per_expert < 256 else "many"
    return f"{kernel}:{_width_class(n)}{_width_class(k)}:{rows}"


# Tile configs by shape class, measured on Hopper (H100/H200, bf16) by
# ``python -m benchmarks.tune_grouped`` (paste its "configs" output here). Classes not listed
# use _default_config; the interpreter always uses _interpreter_config.
GROUPED_CONFIGS: Dict[str, TileConfig] = {
}


def _default_config(kernel: str, n: int, k: int) -> TileConfig:
    if kernel == "matmul":
        return TileConfig(64, _pow2_block(n, 16, 128), _pow2_block(k, 16, 64), 8, 4, 3)
    return TileConfig(_pow2_block(n, 16, 64), _pow2_block(k, 16, 64), 32, 8, 4, 3)


def _interpreter_config(kernel: str, n: int, k: int) -> TileConfig:
    if kernel == "matmul":
        return TileConfig(32, _pow2_block(n, 16, 64), _pow2_block(k, 16, 32), 4, 1, 1)
    return TileConfig(_pow2_block(n, 16, 32), _pow2_block(k, 16, 32), 32, 4, 1, 1)


def grouped_config(kernel: str, n: int, k: int, rows_per_expert: float) -> TileConfig:
    """The tiles for a grouped kernel on this shape: table entry, else the default."""
    if interpreting():
        return _interpreter_config(kernel, n, k)
    return GROUPED_CONFIGS.get(grouped_shape_class(kernel, n, k, rows_per_expert)) or _default_config(kernel, n, k)


def grouped_layout_block(*matmul_configs: TileConfig) -> int:
    """Padding of the expert segments: the largest row tile of the grouped_matmul launches
    that will run over the layout (each tile then lies in one expert; smaller tiles halve
    down to fit); 16 without any."""
    return max([16] + [c.block_m for c in matmul_configs])


def _rows_per_expert(meta) -> float:
    return meta.inverse_padded.numel() / max(meta.num_experts, 1)


def grouped_matmul(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, meta, *, a_by_token: bool,
                   weight_nk_strides: tuple, compute_dtype: torch.dtype, alpha: float = 1.0,
                   scale: Optional[torch.Tensor] = None, second: Optional[tuple] = None,
                   gate_grad: Optional[tuple] = None, config: Optional[TileConfig] = None) -> torch.Tensor:
    """out[r] = scale[p] * alpha * (a[row(r)] @ W[e]^T (+ a2[row(r)] @ W2[e]^T)) over the rows of ``meta``.

    ``out`` [R, N] (R = rows of the layout); ``weight`` [E, ...] with ``weight_nk_strides``
    addressing W[e] as [N, K]; row(r) = the token of row r's pair (``a_by_token``) or r.
    ``second`` = (a2, weight2, weight2_nk_strides), same row rule and K. ``gate_grad`` =
    (h, h_by_token, dw): also dw[p] = <alpha * (a @ W^T)[r], h[row(r)]> (dw flat over pairs).
    Rows without a pair (padding, unused tail) get zeros. Returns ``out``.
    """
    num_rows, N = out.shape
    K = a.shape[1]
    if num_rows == 0 or N == 0:
        return out
    cfg = config or grouped_config("matmul", N, K, _rows_per_expert(meta))
    block_m, block_n = cfg.block_m, cfg.block_n
    while meta.block_size % block_m:  # a row tile must lie in one expert's segment
        block_m //= 2
    if block_m < 16:
        raise ValueError(f"the layout block must be a multiple of 16 rows, got {meta.block_size}")
    if gate_grad is not None:
        block_n = _pow2_block(N, 16, 1 << 16)  # the row dot needs every column in one tile
    a2, w2, w2_nk = second if second is not None else (a, weight, weight_nk_strides)
    h, h_by_token, dw = gate_grad if gate_grad is not None else (out, False, out)
    scale_arg = scale if scale is not None else out
    grid = (num_rows // block_m * triton.cdiv(N, block_n),)
    grouped_matmul_kernel[grid](
        a, weight, a2, w2, out, meta.sorted_pairs_padded, meta.block_expert, scale_arg, h, dw,
        num_rows, N, K, meta.top_k, meta.block_size, alpha,
        a.stride(0), a.stride(1), weight.stride(0), weight_nk_strides[0], weight_nk_strides[1],
        a2.stride(0), a2.stride(1), w2.stride(0), w2_nk[0], w2_nk[1],
        out.stride(0), out.stride(1), scale.stride(0) if scale is not None else 0, h.stride(0), h.stride(1),
        A_BY_TOKEN=a_by_token, HAS_SECOND=second is not None, HAS_SCALE=scale is not None,
        GATE_GRAD=gate_grad is not None, H_BY_TOKEN=h_by_token, **_dot_config(compute_dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def grouped_weight_grad(left: torch.Tensor, right: torch.Tensor, meta, *, left_by_token: bool,
                        right_by_token: bool, compute_dtype: torch.dtype, out_dtype: torch.dtype,
                        alpha: float = 1.0, scale: Optional[torch.Tensor] = None,
                        out: Optional[torch.Tensor] = None, config: Optional[TileConfig] = None) -> torch.Tensor:
    """[E, NA, NB]: per expert e, alpha * sum over its rows r of left[row(r)]^T (scale[p] * right[row(r)]).

    row(r) as in grouped_matmul; the sum runs in row order (fixed-order fp32 slices when the
    rows are split over programs): deterministic; experts without rows get exact zeros.
    """
    NA, NB = left.shape[1], right.shape[1]
    E = meta.num_experts
    rows_per_expert = _rows_per_expert(meta)
    cfg = config or grouped_config("wgrad", NA, NB, rows_per_expert)
    tiles = triton.cdiv(NA, cfg.block_m) * triton.cdiv(NB, cfg.block_n)
    splits = _split_count(E * tiles, int(rows_per_expert), left.device)
    if out is None:
        out = torch.empty(E, NA, NB, dtype=out_dtype, device=left.device)
    if splits == 1:
        partial = out.unsqueeze(0)
    else:
        partial = torch.empty(splits, E, NA, NB, dtype=accumulator_dtype(compute_dtype), device=left.device)
    scale_arg = scale if scale is not None else partial
    grouped_weight_grad_kernel[(E * splits * tiles,)](
        left, right, partial, meta.sorted_pairs_padded, meta.padded_offsets, meta.counts, scale_arg,
        NA, NB, meta.top_k, splits, alpha,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
        scale.stride(0) if scale is not None else 0,
        L_BY_TOKEN=left_by_token, R_BY_TOKEN=right_by_token, HAS_SCALE=scale is not None,
        **_dot_config(compute_dtype), BLOCK_A=cfg.block_m, BLOCK_B=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_A=cfg.group, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        out.copy_(partial.sum(0))
    return out


def segment_sum(rows: torch.Tensor, meta, *, out_dtype: torch.dtype) -> torch.Tensor:
    """[E, N]: per expert, the fixed-order sum of its rows of ``rows`` [R, N] (bias gradients)."""
    ones = torch.ones((), dtype=rows.dtype, device=rows.device).expand(rows.shape[0], 1)
    return grouped_weight_grad(rows, ones, meta, left_by_token=False, right_by_token=False,
                               compute_dtype=rows.dtype, out_dtype=out_dtype).squeeze(2)


def combine_rows(rows: torch.Tensor, meta, *, out_dtype: torch.dtype, coef: Optional[torch.Tensor] = None,
                 anchored: bool = False, bias: Optional[tuple] = None, base: Optional[torch.Tensor] = None,
                 second: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[t] = base[t] + z_a + sum_j coef[t, j] (z_j - z_a) in slot order (see combine_rows_kernel).

    z_j = rows[inverse[t, j]] (+ second[...]) (+ bias_e[ids[t, j]] for ``bias`` = (ids, bias_e)),
    zero for pairs outside the layout; z_a = z_0 when ``anchored``, else 0; coef [T, k] or 1.
    """
    inverse = meta.inverse_padded
    T, top_k = inverse.shape
    N = rows.shape[1]
    if out is None:
        out = torch.empty(T, N, dtype=out_dtype, device=rows.device)
    if T == 0 or N == 0:
        return out
    ids, bias_e = bias if bias is not None else (inverse, rows)
    second_arg = second if second is not None else rows
    coef_arg = coef if coef is not None else inverse
    base_arg = base if base is not None else out
    block_t, block_n = 32, _pow2_block(N, 16, 128)
    grid = (triton.cdiv(T, block_t), triton.cdiv(N, block_n))
    combine_rows_kernel[grid](
        rows, second_arg, inverse, coef_arg, ids, bias_e, base_arg, out, T, N,
        rows.stride(0), rows.stride(1), second_arg.stride(0), second_arg.stride(1),
        inverse.stride(0), inverse.stride(1), coef_arg.stride(0), coef_arg.stride(1),
        ids.stride(0), ids.stride(1), bias_e.stride(0), bias_e.stride(1),
        base_arg.stride(0), base_arg.stride(1), out.stride(0), out.stride(1),
        TOP_K=top_k, HAS_SECOND=second is not None, HAS_COEF=coef is not None, ANCHORED=anchored,
        HAS_BIAS=bias is not None, HAS_BASE=base is not None, ACC_DTYPE=_TL_DTYPES[accumulator_dtype(out_dtype)],
        BLOCK_T=block_t, BLOCK_N=block_n,
    )
    return out


def combine_rows_backward(dy: torch.Tensor, rows: torch.Tensor, meta, ids: torch.Tensor, row_coef: torch.Tensor,
                          *, bias: Optional[torch.Tensor] = None, need_g: bool = True):
    """(drows [R, N] in dy's dtype, g [T*k] accumulator dtype): drows[r] = row_coef[p] * dy[t],
    g[p] = <dy[t], rows[r] + bias[ids[t, j]]> for the pair p = t*k + j of row r (0 where
    the pair has no row); ``row_coef`` flat over the pairs."""
    num_rows, N = rows.shape
    acc = accumulator_dtype(dy.dtype)
    drows = torch.empty(num_rows, N, dtype=dy.dtype, device=dy.device)
    g = torch.zeros(ids.numel() if need_g else 0, dtype=acc, device=dy.device)
    if num_rows == 0:
        return drows, g
    bias_arg = bias if bias is not None else rows
    block_r = 32 if interpreting() else 16
    combine_rows_backward_kernel[(triton.cdiv(num_rows, block_r),)](
        dy, rows, ids, bias_arg, row_coef, meta.sorted_pairs_padded, drows, g if need_g else drows,
        num_rows, N, meta.top_k,
        dy.stride(0), dy.stride(1), rows.stride(0), rows.stride(1), ids.stride(0), ids.stride(1),
        bias_arg.stride(0), bias_arg.stride(1), drows.stride(0), drows.stride(1),
        HAS_BIAS=bias is not None, NEED_G=need_g, ACC_DTYPE=_TL_DTYPES[acc],
        BLOCK_R=block_r, BLOCK_N=_pow2_block(N, 16, 256),
    )
    return drows, g


def _glu_args(hg, hu, bg, bu, ids):
    gate = hg if hg is not None else hu
    bg_arg = bg if bg is not None else hu
    bu_arg = bu if bu is not None else hu
    return (gate, bg_arg, bu_arg,
            (gate.stride(0), gate.stride(1), hu.stride(0), hu.stride(1), bg_arg.stride(0), bg_arg.stride(1),
             bu_arg.stride(0), bu_arg.stride(1), ids.stride(0), ids.stride(1)))


def _glu_meta(hg, hu, bg, bu, act: int):
    block_f = _pow2_block(hu.shape[1], 16, 128)
    return dict(GATED=hg is not None, HAS_BG=bg is not None, HAS_BU=bu is not None, ACT=act,
                ACC_DTYPE=_TL_DTYPES[accumulator_dtype(hu.dtype)], BLOCK_R=32, BLOCK_F=block_f)


def glu_forward(hg: Optional[torch.Tensor], hu: torch.Tensor, bg: Optional[torch.Tensor], bu: Optional[torch.Tensor],
                meta, ids: torch.Tensor, act: int) -> torch.Tensor:
    """[R, F]: act(hg + bg[e]) * (hu + bu[e]) per row (act(hu + bu[e]) without hg), 0 on padding
    rows; e the expert of the row's pair in ``ids`` [T, k]; ``act`` a code of triton_kernels.grouped."""
    num_rows, F = hu.shape
    out = torch.empty(num_rows, F, dtype=hu.dtype, device=hu.device)
    if num_rows == 0 or F == 0:
        return out
    gate, bg_arg, bu_arg, strides = _glu_args(hg, hu, bg, bu, ids)
    meta_args = _glu_meta(hg, hu, bg, bu, act)
    grid = (triton.cdiv(num_rows, meta_args["BLOCK_R"]), triton.cdiv(F, meta_args["BLOCK_F"]))
    glu_forward_kernel[grid](gate, hu, bg_arg, bu_arg, out, meta.sorted_pairs_padded, ids, num_rows, F, meta.top_k,
                             *strides, out.stride(0), out.stride(1), **meta_args)
    return out


def glu_backward(dout: torch.Tensor, hg: Optional[torch.Tensor], hu: torch.Tensor, bg: Optional[torch.Tensor],
                 bu: Optional[torch.Tensor], meta, ids: torch.Tensor, act: int, out: Optional[tuple] = None):
    """(dhg or None, dhu), each [R, F] in hu's dtype, 0 on padding rows: the gradients of
    glu_forward, written into ``out`` = (dhg, dhu) (any strides) when given."""
    num_rows, F = hu.shape
    if out is not None:
        dhg, dhu = out
    else:
        dhu = torch.empty(num_rows, F, dtype=hu.dtype, device=hu.device)
        dhg = torch.empty_like(dhu) if hg is not None else None
    if num_rows == 0 or F == 0:
        return dhg, dhu
    gate, bg_arg, bu_arg, strides = _glu_args(hg, hu, bg, bu, ids)
    dhg_arg = dhg if dhg is not None else dhu
    meta_args = _glu_meta(hg, hu, bg, bu, act)
    grid = (triton.cdiv(num_rows, meta_args["BLOCK_R"]), triton.cdiv(F, meta_args["BLOCK_F"]))
    glu_backward_kernel[grid](dout, gate, hu, bg_arg, bu_arg, dhg_arg, dhu, meta.sorted_pairs_padded, ids,
                              num_rows, F, meta.top_k, dout.stride(0), dout.stride(1), *strides,
                              dhg_arg.stride(0), dhg_arg.stride(1), dhu.stride(0), dhu.stride(1), **meta_args)
    return dhg, dhu
