"""Compile moelora's Triton kernels for Hopper (sm_90) ahead of time, without a GPU.

    python -m benchmarks.compile_kernels      # exit 1 if a kernel fails or overflows shared memory

Triton's compiler and the bundled ptxas reject what the interpreter lets through
(unsupported constructs, a variable whose type differs between the branches of an if, a
tile config needing more than the 227 KiB of shared memory a block may use). Every tile
config of moelora.kernels.launchers.GROUPED_CONFIGS and every tuning candidate
(benchmarks/tile_candidates.py) is compiled with every flag of its kernel on, beside the
defaults and the row kernels (all activations); every kernel of the dense regime and the
fused layer (moelora/kernels/dense.py, matmul.py) in each of its modes, and in its most
demanding mode with every DENSE_CONFIGS entry and tuning candidate.

Beside these, every launch of twenty-nine training steps and two backwards (the fused
MoELoRALinear at S1 and in other widths, dtypes and modes, moe_lora's dense and grouped regimes,
moe_ffn's Triton engine, the routing op's and the aux loss's backwards: see traced_jobs) is traced with
moelora.kernels.launchers.record_launches and compiled exactly as configured and as Triton
specialises it; each must fit at least MIN_PROGRAMS_PER_SM programs per SM in registers and
shared memory, without spilling (a structural budget: an SM running one program at a time
cannot hide its memory latency). Each line reports the registers per thread.
Run it in a process that has not run interpreted kernels (TRITON_INTERPRET unset): the
interpreter patches triton.language in place.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

import torch
import triton
import triton.language as tl

from benchmarks import tile_candidates

SM90_SHARED_LIMIT = 232448
DOT = dict(DOT_DTYPE=tl.bfloat16, ACC_DTYPE=tl.float32, INPUT_PRECISION="ieee")
# gated_expand's constexprs without a router
NO_AUX = dict(HAS_AUX=False, COUNT_KEPT=False, AUX_ACC=tl.float32, BLOCK_E=16, BLOCK_AUX_T=1024, BLOCK_K=2)
POINTERS = {"row_pair_ptr": "*i64", "starts_ptr": "*i64", "counts_ptr": "*i64", "inverse_ptr": "*i64",
            "block_expert_ptr": "*i32", "ids_ptr": "*i32", "scale_ptr": "*fp32", "coef_ptr": "*fp32",
            "h_ptr": "*fp32", "dw_ptr": "*fp32", "g_ptr": "*fp32"}
# The dense kernels' fp32 / int operands (routing, statistics, the r-wide intermediates).
DENSE_POINTERS = {"hg_ptr": "*bf16", "num_steps_ptr": "*i64", "kept_ptr": "*i64", "g_aux_ptr": "*fp32",
                  "logits_ptr": "*fp32", "dl_ptr": "*fp32", "dh_ptr": "*fp32", "w_ptr": "*fp32", "part_ptr": "*fp32",
                  "dhg_ptr": "*fp32",
                  "loss_ptr": "*fp32", "stats_ptr": "*fp32", "prob_sums_ptr": "*fp32", "lse_ptr": "*fp32",
                  "top_p_ptr": "*fp32", "noise_ptr": "*fp32", "l_ptr": "*fp32", "a_ptr": "*fp32", "r_ptr": "*fp32"}


# How launches specialise: unit strides (the contiguous dim of each operand) become the
# constant 1, pointers and the other strides and sizes are multiples of 16 bytes / elements.
UNIT_STRIDES = {"stride_ak", "stride_wk", "stride_a2k", "stride_w2k", "stride_cn", "stride_hn", "stride_scale",
                "stride_la", "stride_rb", "stride_ob", "stride_rn", "stride_r2n", "stride_ik", "stride_ck",
                "stride_idk", "stride_bn", "stride_bbn", "stride_on", "stride_dn", "stride_dcn", "stride_gf",
                "stride_uf", "stride_bgf", "stride_buf", "stride_of", "stride_df", "stride_dgf", "stride_duf"}
FLOAT_SCALARS = {"alpha", "scaling", "scale_out", "inv_t", "lb_coef", "z_coef", "lb_lo", "z_lo", "eps_start", "eps_end"}
ALIGNED_INTS = {"num_rows", "N", "K", "NA", "NB", "F", "layout_block"}


def compile_sm90(kernel, constexprs: dict, num_warps: int = 4, num_stages: int = 3, pointers=None) -> tuple:
    """Compile ``kernel`` (a JITFunction) for sm_90 with bf16 pointers (``pointers`` maps names
    to other types), specialised as a launch on aligned row-major operands would be; returns
    (shared memory bytes, registers per thread or None where no cuobjdump can read the cubin)."""
    signature, values, attrs = {}, dict(constexprs), {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr or p.name in UNIT_STRIDES:
            signature[p.name] = "constexpr"
            values.setdefault(p.name, 1)
            continue
        if p.name.endswith("_ptr"):
            signature[p.name] = (pointers or POINTERS).get(p.name, "*bf16")
        else:
            signature[p.name] = "fp32" if p.name in FLOAT_SCALARS else "i32"
        if p.name.endswith("_ptr") or p.name.startswith("stride") or p.name in ALIGNED_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return _compile(kernel, signature, values, attrs, dict(num_warps=num_warps, num_stages=num_stages))


def _compile(kernel, signature: dict, constants: dict, attrs: dict, options: dict) -> tuple:
    """Compile for sm_90: (shared memory bytes, registers per thread as :func:`registers` reads them)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                         options=options)
    return out.metadata.shared, registers(out.asm["cubin"])


def registers(cubin: bytes) -> Optional[int]:
    """Registers per thread of a compiled kernel, read from its cubin by the cuobjdump that comes
    with Triton's CUDA backend (None if there is none); -1 if it spills registers to the stack."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if not found:
        return None
    return -1 if int(found.group(2)) else int(found.group(1))


def jobs():
    """(name, kernel, constexprs, num_warps, num_stages) of every variant to compile."""
    from moelora.kernels import launchers as K
    from moelora.kernels import grouped as G

    for kernel in ("matmul", "wgrad"):
        configs = {"default": K._default_config(kernel, 4096, 4096)}
        configs.update({cls: c for cls, c in K.GROUPED_CONFIGS.items() if cls.startswith(kernel + ":")})
        table = tile_candidates.GROUPED_MATMUL if kernel == "matmul" else tile_candidates.GROUPED_WGRAD
        configs.update({f"candidate {widths} {i}": K.TileConfig(*c) for widths, options in table.items()
                        for i, c in enumerate(options)})
        for name, c in configs.items():
            if kernel == "matmul":
                flags = dict(A_BY_TOKEN=True, HAS_SECOND=True, HAS_SCALE=True, GATE_GRAD=False, H_BY_TOKEN=False)
                yield (f"grouped_matmul {name} {tuple(c)}", G.grouped_matmul_kernel,
                       dict(**flags, **DOT, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group),
                       c.num_warps, c.num_stages)
            else:
                flags = dict(L_BY_TOKEN=True, R_BY_TOKEN=False, HAS_SCALE=True)
                yield (f"grouped_weight_grad {name} {tuple(c)}", G.grouped_weight_grad_kernel,
                       dict(**flags, **DOT, BLOCK_A=c.block_m, BLOCK_B=c.block_n, BLOCK_K=c.block_k, GROUP_A=c.group),
                       c.num_warps, c.num_stages)
    yield ("grouped_matmul gate-grad epilogue", G.grouped_matmul_kernel,
           dict(A_BY_TOKEN=True, HAS_SECOND=False, HAS_SCALE=True, GATE_GRAD=True, H_BY_TOKEN=True, **DOT,
                BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), 4, 3)
    yield ("combine_rows", G.combine_rows_kernel,
           dict(TOP_K=2, HAS_SECOND=True, HAS_COEF=True, ANCHORED=True, HAS_BIAS=True, HAS_BASE=True,
                ACC_DTYPE=tl.float32, BLOCK_T=32, BLOCK_N=128), 4, 3)
    yield ("combine_rows_backward", G.combine_rows_backward_kernel,
           dict(HAS_BIAS=True, NEED_G=True, ACC_DTYPE=tl.float32, BLOCK_R=16, BLOCK_N=256), 4, 3)
    for act in (G.SILU, G.GELU, G.GELU_TANH, G.RELU):
        for name, kernel in (("glu_forward", G.glu_forward_kernel), ("glu_backward", G.glu_backward_kernel)):
            yield (f"{name} act {act}", kernel, dict(GATED=True, HAS_BG=True, HAS_BU=True, ACT=act,
                                                     ACC_DTYPE=tl.float32, BLOCK_R=32, BLOCK_F=128), 4, 3)


def dense_jobs():
    """(name, kernel, constexprs, num_warps, num_stages[, pointer types]) of the dense regime's and
    fused layer's kernels."""
    from moelora.kernels import dense as D
    from moelora.kernels import matmul as M

    routing = dict(TOP_K=2, BLOCK_K=2)
    yield ("lora_down with router", D.lora_down_kernel,
           dict(HAS_ROUTER=True, **DOT, ROUTER_SPLITS=3, BLOCK_T=64, BLOCK_R=16, BLOCK_E=16, BLOCK_K=64,
                COLUMNS=2), 4, 3)
    for shared in (True, False):
        for rank in (16, 8, 0):  # r = 16, 8 compiled in; any other r read at run time
            for base in (True, False):  # moe_lora's base + delta; the fused layer's bias + delta
                block_n, warps, stages = (64, 4, 3) if base else (128, 8, 2)  # the launcher's defaults
                yield (f"gated_expand shared {shared} RANK {rank} base {base}", D.gated_expand_kernel,
                       dict(SHARED_A=shared, HAS_BASE=base, HAS_BIAS=True, **DOT, TOP_K=2, BLOCK_T=64,
                            BLOCK_N=block_n, BLOCK_C=16, RANK=rank, **NO_AUX), warps, stages)
    for router in (D.NO_ROUTER, D.SOFTMAX_RENORMALIZED, D.SOFTMAX_PLAIN, D.TOPK_SOFTMAX):
        for shared in (True, False):
            yield (f"gate_backward router {router} shared {shared}", D.gate_backward_kernel,
                   dict(SHARED_A=shared, ROUTER=router, HAS_AUX_GRAD=router != D.NO_ROUTER, WRITE_HG=True,
                        ACC=tl.float32, **routing, BLOCK_T=32, BLOCK_R=16, BLOCK_E=8), 4, 3)
    for split in (True, False):
        for router in (True, False):
            yield (f"lora_weight_grad split {split} router {router}", D.lora_weight_grad_kernel,
                   dict(HAS_ROUTER=router, SPLIT=split, **DOT, BLOCK_M=64, BLOCK_CB=128, BLOCK_CA=32, BLOCK_T=64),
                   8, 3)
    yield ("lora_weight_grad_reduce", D.lora_weight_grad_reduce_kernel,
           dict(HAS_ROUTER=True, ACC_DTYPE=tl.float32, BLOCK=1024), 4, 3)
    for kept in (True, False):
        yield (f"gated_expand with the router aux loss, kept {kept}", D.gated_expand_kernel,
               dict(SHARED_A=True, HAS_BASE=False, HAS_BIAS=True, **DOT, TOP_K=3, BLOCK_T=64, BLOCK_N=128,
                    BLOCK_C=16, RANK=16, HAS_AUX=True, COUNT_KEPT=kept, AUX_ACC=tl.float32, BLOCK_E=16,
                    BLOCK_AUX_T=256, BLOCK_K=4), 8, 2)
    # a float64 router's aux loss (its coefficients as float32 parts, 1 / T formed in float64)
    yield ("gated_expand with a float64 router's aux loss", D.gated_expand_kernel,
           dict(SHARED_A=True, HAS_BASE=False, HAS_BIAS=True, **DOT, TOP_K=3, BLOCK_T=64, BLOCK_N=128, BLOCK_C=16,
                RANK=16, HAS_AUX=True, COUNT_KEPT=True, AUX_ACC=tl.float64, BLOCK_E=16, BLOCK_AUX_T=256, BLOCK_K=4),
           8, 2, {"prob_sums_ptr": "*fp64", "lse_ptr": "*fp64", "loss_ptr": "*fp64", "stats_ptr": "*fp64"})
    for acc, ptr in ((tl.float32, "*fp32"), (tl.float64, "*fp64")):  # fp64: a float64 layer's threshold routing
        yield (f"threshold_weights, {ptr[1:]}", D.threshold_weights_kernel,
               dict(HAS_NOISE=True, HAS_RAMP=True, TOP_K=3, ACC=acc, BLOCK_T=128, BLOCK_K=4), 4, 3,
               {"top_p_ptr": ptr, "noise_ptr": ptr, "w_ptr": ptr})
    for group in (16, 0, -1):  # stacked B with r = 16, plain B, stacked with r not a power of two
        yield (f"matmul B_GROUP {group}, second pair, sanitized", M.matmul_kernel,
               dict(HAS_SECOND=True, HAS_ADDEND=True, SANITIZE_B=True, B_GROUP=group, **DOT, BLOCK_M=64, BLOCK_N=128,
                    BLOCK_K=64), 4, 3)
    # fp32 adapters over a bf16 base: A and B are read in fp32 and rounded in registers
    fp32_b = {"b_ptr": "*fp32", "b2_ptr": "*fp32"}
    yield ("gated_expand, fp32 B", D.gated_expand_kernel,
           dict(SHARED_A=True, HAS_BASE=False, HAS_BIAS=True, **DOT, TOP_K=2, BLOCK_T=64, BLOCK_N=128, BLOCK_C=16,
                RANK=16, **NO_AUX), 8, 2, fp32_b)
    yield ("matmul stacked, fp32 B", M.matmul_kernel,
           dict(HAS_SECOND=True, HAS_ADDEND=False, SANITIZE_B=False, B_GROUP=16, **DOT, BLOCK_M=64, BLOCK_N=128,
                BLOCK_K=64), 4, 3, fp32_b)


# The dense kernels' constexprs at S1 (bf16, r 16, E 8, k 2) and launch options, as the launchers
# choose them by default; a DENSE_CONFIGS entry or tuning candidate overrides some of them.
DENSE_TILE_BASE = {
    "lora_down": (dict(HAS_ROUTER=True, **DOT, ROUTER_SPLITS=3, BLOCK_T=64, BLOCK_R=16, BLOCK_E=16, BLOCK_K=64,
                       COLUMNS=2), 4, 3),
    "gated_expand": (dict(SHARED_A=True, HAS_BASE=True, HAS_BIAS=True, **DOT, TOP_K=2, BLOCK_T=64, BLOCK_N=64,
                          BLOCK_C=16, RANK=16, **NO_AUX), 4, 3),
    "matmul": (dict(HAS_SECOND=True, HAS_ADDEND=True, SANITIZE_B=True, B_GROUP=16, **DOT, BLOCK_M=64, BLOCK_N=128,
                    BLOCK_K=64), 4, 3),
    "lora_weight_grad": (dict(HAS_ROUTER=True, SPLIT=True, **DOT, BLOCK_M=64, BLOCK_CB=128, BLOCK_CA=32, BLOCK_T=64),
                         8, 3),
}


# Every launch of the traced training steps (traced_jobs) must not spill registers and must
# leave room for at least this many programs per SM in registers and shared memory (checked
# where cuobjdump can read the cubin; an SM has 65536 registers, given out 8 per thread at a
# time). The gated expand's sanitized pass (non-finite tiles only) works on 16-row slices so
# that it does not raise the registers of the finite path: sanitizing every tile took over 200
# registers, one program per SM at S1.
MIN_PROGRAMS_PER_SM = 2
SM90_REGISTERS = 65536


def programs_per_sm(registers: int, num_warps: int, shared: int = 0) -> int:
    """Programs of ``num_warps`` warps whose registers and shared memory (1 KiB of it reserved
    per program) fit in one SM together."""
    by_registers = SM90_REGISTERS // (-(-max(registers, 1) // 8) * 8 * 32 * num_warps)
    return min(by_registers, SM90_SHARED_LIMIT // (shared + 1024))


def compile_launch(kernel, meta: dict, values: tuple) -> tuple:
    """Compile a recorded launch (moelora.kernels.launchers.record_launches: the kernel, its
    constexprs and options, its other parameters' values with tensors as dtypes) for sm_90 as
    Triton specialises it: tensors 16-byte aligned, ints equal to 1 made constants, ints
    divisible by 16 marked so, None as a constant. Returns (shared memory bytes, registers per
    thread, -1 if they spill, or None)."""
    signature, constants, attrs = {}, {}, {}
    values = iter(values)
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name], constants[p.name] = "constexpr", meta[p.name]
            continue
        value = next(values)
        if isinstance(value, torch.dtype):
            signature[p.name] = "*" + TRITON_TYPES[value]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value is None:
            signature[p.name], constants[p.name] = "constexpr", None
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        elif value == 1:
            signature[p.name], constants[p.name] = "constexpr", 1
        else:
            signature[p.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return _compile(kernel, signature, constants, attrs, {k: meta[k] for k in ("num_warps", "num_stages") if k in meta})


TRITON_TYPES = {}  # torch dtype -> Triton's type name; filled with torch by traced_jobs


def traced_jobs():
    """(name, kernel, constexprs and options, other parameters' values) of every Triton launch
    of twenty-nine training steps and two backwards (launchers.record_launches), configured by the
    launchers' defaults (the tile tables emptied meanwhile) as on a 132-SM Hopper GPU: the fused
    MoELoRALinear (bf16 base, fp32 adapters, shared A, softmax_topk with the aux loss: S1's
    benchmark case; and with LoRA dropout's keep mask, with router jitter, with an aux-loss mask);
    moe_lora's dense regime
    adding a base (bf16, shared A r 16; per-expert A r 8 as S2); its grouped regime (shared A
    r 64, E 64, k 4 as S3; per-expert A r 32, E 32, also with a LoRA scale beyond fp32's range);
    the fused layer in the grouped regime (E 64, r 16: shared A with softmax_topk, per-expert A
    with threshold routing and an aux-loss mask); dense layers of other widths (256 experts of rank 2, 64 of rank 8,
    16 per-expert A's of rank 32, 8 of rank 8; top-k 8, 16 and 64 of 64 experts) and S1's in fp32,
    fp16 and float64, fp32 with 64 experts; moe_lora's dense
    regime in fp32, float64, at rank 256 and with per-expert A's of rank 64, its grouped regime in fp32; moe_ffn on
    the Triton engine; the routing op's backward (moelora.route) and the Router's aux-loss
    backward. Sizes are scaled down (T 2048 or 4096, d 512) where the launch configurations
    (tiles, flags, divisibility, shape classes) stay those of the full shapes, so that the CPU
    work stays small."""
    from moelora.kernels import launchers as K
    from moelora.ops import moe_ffn as MF
    from moelora.ops import moe_lora as ML
    from moelora.ops import moe_lora_linear as L
    from moelora.ops import routing_autograd
    from moelora.ops.routing import route

    TRITON_TYPES.update({torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                         torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"})
    target_programs = K._target_programs
    K._target_programs = lambda device: 2 * 132  # an H100 / H200 (the launchers' only device query)
    # The launchers' defaults, which are chosen from compiled kernels and held to the policy here;
    # tile-table entries were measured on a GPU (they are among the candidates compiled above).
    tables = dict(K.DENSE_CONFIGS), dict(K.GROUPED_CONFIGS)
    K.DENSE_CONFIGS.clear()
    K.GROUPED_CONFIGS.clear()
    K.clear_launch_caches()
    try:
        T, d, E, k = 2048, 512, 8, 2
        gen = torch.Generator().manual_seed(0)

        def rand(*shape, dtype=torch.bfloat16):
            return torch.randn(*shape, generator=gen).to(dtype)

        x, w0, dy = rand(T, d), rand(d, d), rand(T, d)
        steps = {}
        with K.record_launches() as calls:
            adapters = [rand(*shape, dtype=torch.float32).requires_grad_() for shape in ((16, d), (E, d, 16), (E, d))]
            router = L.RouterSpec(adapters[2], None, "softmax_topk", k)
            padding = torch.arange(T) % 512 < 461  # the aux-loss mask: 10% padding
            for name, p, jitter, aux_mask in (
                    ("S1 layer", 0.0, None, None), ("S1 layer, LoRA dropout", 0.1, None, None),
                    ("S1 layer, router jitter", 0.0, 1 + 0.01 * rand(T, d, dtype=torch.float32), None),
                    ("S1 layer, aux-loss mask", 0.0, None, padding)):
                mask, keep_scale = L.lora_dropout_mask(x, p)
                args = L.op_args(x.requires_grad_(), w0, None, *adapters[:2], 2.0,
                                 router._replace(jitter=jitter, aux_mask=aux_mask), None, None, mask, keep_scale, False)
                y, aux_loss = L._MoELoRALinearFn.apply(*args[:L._GRAD_INPUTS], args[L._GRAD_INPUTS:], [])
                torch.autograd.grad([y, aux_loss], [x, *adapters], [dy, torch.ones(())])
                steps[name], calls[:] = list(calls), []
            x = x.detach()
            ids = torch.rand(T, E, generator=gen).argsort(1)[:, :k].to(torch.int32)
            w = torch.rand(T, k, generator=gen)
            for name, a, dtype in (("S1 moe_lora base + delta", rand(16, d), torch.bfloat16),
                                   ("moe_lora float64", rand(16, d, dtype=torch.float64), torch.float64),
                                   ("moe_lora r 256", rand(256, d), torch.bfloat16),
                                   ("S2 moe_lora per-expert A", rand(E, 8, d), torch.bfloat16),
                                   ("moe_lora per-expert A r 64", rand(E, 64, d), torch.bfloat16),
                                   ("moe_lora fp32", rand(16, d, dtype=torch.float32), torch.float32),
                                   ("moe_lora per-expert A fp32", rand(E, 8, d, dtype=torch.float32), torch.float32)):
                b = rand(E, d, a.shape[-2], dtype=dtype)
                xd, dyd = x.to(dtype), dy.to(dtype)
                y, h = ML._dense_forward(xd, a, b, ids, w, rand(T, d, dtype=dtype), 2.0)
                ML._dense_backward(dyd, xd, a, b, ids, w, h, 2.0, True)
                steps[name], calls[:] = list(calls), []
            T, k = 4096, 4  # 256 rows per expert: the "many" shape classes of S3
            x, dy = rand(T, d), rand(T, d)
            for name, E, a in (("S3 moe_lora grouped", 64, rand(64, d)), ("moe_lora grouped per-expert A", 32,
                                                                          rand(32, 32, d))):
                ids = torch.rand(T, E, generator=gen).argsort(1)[:, :k].to(torch.int32)
                w = torch.rand(T, k, generator=gen)
                b = rand(E, d, a.shape[-2])
                y, h, layout = ML.grouped_forward(x, a, b, ids, w, rand(T, d), 2.0)
                ML.grouped_backward(dy, x, a, b, ids, w, h, layout, 2.0, True)
                steps[name], calls[:] = list(calls), []
            y, h, layout = ML.grouped_forward(x, a, b, ids, w, rand(T, d), 1e39)  # beyond fp32: PRESCALE tiles
            ML.grouped_backward(dy, x, a, b, ids, w, h, layout, 1e39, True)
            steps["moe_lora grouped, scale beyond fp32"], calls[:] = list(calls), []
            xf, af, bf = x.float(), rand(64, d, dtype=torch.float32), rand(E, d, 64, dtype=torch.float32)
            y, h, layout = ML.grouped_forward(xf, af, bf, ids, w, rand(T, d, dtype=torch.float32), 2.0)
            ML.grouped_backward(dy.float(), xf, af, bf, ids, w, h, layout, 2.0, True)
            steps["moe_lora grouped fp32"], calls[:] = list(calls), []
            E, k, w0 = 64, 2, rand(d, d)  # E*r = 1024: the fused layer in the grouped regime
            for name, a_shape, mode in (("grouped layer", (16, d), "softmax_topk"),
                                        ("grouped layer per-expert A threshold", (E, 16, d), "threshold")):
                adapters = [rand(*shape, dtype=torch.float32).requires_grad_() for shape in (a_shape, (E, d, 16),
                                                                                             (E, d))]
                router = L.RouterSpec(adapters[2], None, mode, k, eps_start=0.2, eps_end=0.2,  # masked: counting kept
                                      aux_mask=torch.arange(T) % 512 < 461 if mode == "threshold" else None)
                args = L.op_args(x.requires_grad_(), w0, None, *adapters[:2], 2.0, router, None, None, None, 1.0, True)
                y, aux_loss = L._MoELoRALinearFn.apply(*args[:L._GRAD_INPUTS], args[L._GRAD_INPUTS:], [])
                torch.autograd.grad([y, aux_loss], [x, *adapters], [dy, torch.ones(())])
                x = x.detach()
                steps[name], calls[:] = list(calls), []
            # wide dense layers (E*r = 512 at k = 2): many experts, or wide per-expert A's
            for name, E, a_shape, dtype in (("layer with 256 experts", 256, (2, d), torch.bfloat16),
                                            ("layer with 64 experts", 64, (8, d), torch.bfloat16),
                                            ("layer per-expert A r 32", 16, (16, 32, d), torch.bfloat16),
                                            ("layer r 8", 8, (8, d), torch.bfloat16),
                                            ("layer fp32", 8, (16, d), torch.float32),
                                            ("layer fp16", 8, (16, d), torch.float16),
                                            # edge widths: a router of 64 experts in fp32
                                            # and float64 (fp32 / fp64 adapters); top-k at the gated prologue's
                                            # unrolled form's limit and beyond it
                                            ("layer fp32 64 experts", 64, (16, d), torch.float32),
                                            ("layer float64", 8, (16, d), torch.float64),
                                            ("layer k 8", 64, (64, 16, d), torch.bfloat16),
                                            ("layer k 16", 64, (64, 16, d), torch.bfloat16),
                                            ("layer k 64", 64, (64, 16, d), torch.bfloat16)):
                r = a_shape[-2]
                top_k = int(name.split("layer k ")[-1]) if name.startswith("layer k ") else k
                adapter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
                adapters = [rand(*shape, dtype=adapter_dtype).requires_grad_() for shape in (a_shape, (E, d, r),
                                                                                             (E, d))]
                xd, wd, dyd = x.to(dtype).requires_grad_(), w0.to(dtype), dy.to(dtype)
                args = L.op_args(xd, wd, None, *adapters[:2], 2.0,
                                 L.RouterSpec(adapters[2], None, "softmax_topk", top_k), None, None, None, 1.0, False)
                y, aux_loss = L._MoELoRALinearFn.apply(*args[:L._GRAD_INPUTS], args[L._GRAD_INPUTS:], [])
                torch.autograd.grad([y, aux_loss], [xd, *adapters], [dyd, torch.ones((), dtype=aux_loss.dtype)])
                steps[name], calls[:] = list(calls), []
            # moe_ffn on the Triton engine (bf16 SwiGLU experts, biases, normalised mixing: an upcycled block)
            E, d_ff = 8, 1024
            ids = torch.rand(T, E, generator=gen).argsort(1)[:, :k].to(torch.int32)
            gates = torch.rand(T, k, generator=gen).requires_grad_()
            weights = [rand(*shape).requires_grad_() for shape in ((E, d_ff, d), (E, d_ff), (E, d, d_ff), (E, d),
                                                                   (E, d_ff, d), (E, d_ff))]
            xf = x.detach().requires_grad_()
            plan = MF.ffn_plan(xf, weights[0], weights[2], weights[4], k, "triton")
            y = MF._EagerMoEFFN.apply(xf, ids, gates, *weights, MF.ACTIVATION_CODES["silu"], True, False, plan)
            torch.autograd.grad(y, [xf, gates, *weights], dy)
            steps["moe_ffn triton engine"], calls[:] = list(calls), []
            logits = rand(T, E, dtype=torch.float32)  # the routing op's backward, every gradient given
            out = route(logits, k, renormalize=True)
            routing_autograd._router_topk_backward(logits, out.ids, out.weights, rand(T, k, dtype=torch.float32),
                                                   rand(E, dtype=torch.float32), rand(T, dtype=torch.float32), 0, True)
            steps["routing op backward"], calls[:] = list(calls), []
            K.router_aux_loss_backward(torch.ones(()), out.counts, out.lse, 0.01, 0.001)  # the Router's aux loss
            steps["aux loss backward"], calls[:] = list(calls), []
            # a float64 router's aux-loss kernels (coefficients as float32 parts, 1 / T formed in float64)
            logits, one = rand(T, E, dtype=torch.float64), torch.ones((), dtype=torch.float64)
            out = route(logits, k, renormalize=True)
            K.router_aux_loss(out.ids, out.weights, K.RouterAux(out.counts, out.prob_sums, out.lse, 0.01, 0.001))
            K.router_aux_loss_backward(one, out.counts, out.lse, 0.01, 0.001)
            K.masked_router_aux_loss(logits, out.ids, out.weights, padding, 0.01, 0.001, False)
            K.masked_router_aux_loss_backward(one, logits, out.counts, padding, 0.01, 0.001)
            grad = K.RouterGrad(logits, out.counts, one, "softmax_topk", 0.01, 0.001)
            K.router_backward(rand(T, k, dtype=torch.float64), out.ids, out.weights, grad)
            K.gate_backward(rand(T, E * 16, dtype=torch.float64), rand(T, 16, dtype=torch.float64), out.ids,
                            out.weights, num_experts=E, rank=16, scaling=2.0, shared_a=True, router=grad,
                            hg_dtype=torch.float64)
            steps["float64 aux losses"], calls[:] = list(calls), []
    finally:
        K._target_programs = target_programs
        K.DENSE_CONFIGS.update(tables[0])
        K.GROUPED_CONFIGS.update(tables[1])
        K.clear_launch_caches()
    for step, launches in steps.items():
        for i, (kernel, meta, values) in enumerate(launches):
            tiles = {k: v for k, v in meta.items() if k.startswith("BLOCK")}
            yield f"{step} #{i} {kernel.__name__} {tiles}", kernel, meta, values


def dense_tile_jobs():
    """Every DENSE_CONFIGS entry and every tune_dense candidate, each kernel in its most demanding mode."""
    from moelora.kernels import dense as D
    from moelora.kernels import launchers as K
    from moelora.kernels import matmul as M

    kernels = {"lora_down": D.lora_down_kernel, "gated_expand": D.gated_expand_kernel, "matmul": M.matmul_kernel,
               "lora_weight_grad": D.lora_weight_grad_kernel}
    for name, kernel in kernels.items():
        tiles = {cls: t for cls, t in K.DENSE_CONFIGS.items() if cls.split(":")[0] == name}
        tiles.update({f"candidate {i}": t for i, t in enumerate(tile_candidates.DENSE[name])})
        base, warps, stages = DENSE_TILE_BASE[name]
        for label, t in tiles.items():
            constexprs = {**base, **{key: value for key, value in t.items() if key.startswith("BLOCK_")}}
            yield (f"{name} {label} {t}", kernel, constexprs, t.get("num_warps", warps), t.get("num_stages", stages))


@functools.lru_cache(maxsize=None)
def all_jobs() -> tuple:
    """Every job, built once per process (each worker of main's pool looks its jobs up here)."""
    return tuple(jobs()) + tuple(dense_jobs()) + tuple(dense_tile_jobs()) + tuple(traced_jobs())


def compile_job(index: int) -> str:
    """Compile job ``index`` of all_jobs(); its report line ("ok  ..." or "FAIL ...")."""
    job = all_jobs()[index]
    name = job[0]
    try:
        if len(job) > 4:  # (name, kernel, constexprs, warps, stages[, pointer types])
            _, kernel, constexprs, warps, stages, *pointer_types = job
            pointers = None if kernel.__module__.endswith("grouped") else {**POINTERS, **DENSE_POINTERS}
            if pointer_types:  # a variant with some operands in another dtype
                pointers = {**(pointers or POINTERS), **pointer_types[0]}
            shared, regs = compile_sm90(kernel, constexprs, warps, stages, pointers)
            wanted = None
        else:  # a traced launch
            _, kernel, meta, values = job
            shared, regs = compile_launch(kernel, meta, values)
            warps, wanted = meta.get("num_warps", 4), MIN_PROGRAMS_PER_SM
    except Exception as err:  # noqa: BLE001 - reported, counted
        return f"FAIL {name}: {type(err).__name__}: {str(err)[:500]}"
    fits = None if regs is None or regs < 0 else programs_per_sm(regs, warps, shared)
    over = shared > SM90_SHARED_LIMIT or (wanted is not None and regs is not None and (fits or 0) < wanted)
    used = "registers spilled to the stack" if regs == -1 else f"{regs} registers"
    return (f"{'FAIL' if over else 'ok  '} {name}: {shared} bytes of shared memory, {used}"
            + (f" ({fits} programs per SM, at least {wanted} wanted)" if wanted is not None else ""))


def main(argv=None) -> int:
    """Compile every job, in parallel processes (one per CPU), and report each."""
    argparse.ArgumentParser(prog="python -m benchmarks.compile_kernels", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    count = len(all_jobs())
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(os.cpu_count() or 1, 16)) as pool:
        lines = list(pool.map(compile_job, range(count)))
    for line in lines:
        print(line)
    failed = sum(line.startswith("FAIL") for line in lines)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
