"""Python launchers of the raw Triton kernels: output allocation, strides, block sizes.

Each launcher computes one kernel's result on tensors of any strides; no launcher reads
device memory on the host, so all of them are CUDA-graph safe. Launch configurations
(grid, block sizes, compile-time flags) are computed once per (shapes, strides, dtypes,
device) and cached, so the hot path does no more than build a key and launch.

Every launch is a :class:`KernelLaunch` built by a cached configuration function
(``_<kernel>_launch``; :func:`clear_launch_caches` drops them all). :func:`count_launches`
replaces the launches by a counter (no kernel runs): with it the host time of the Python
around the kernels and the number of kernels per call can be measured on any machine, a CPU
included.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
import weakref
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import triton.language as tl

from moelora.kernels.dense import (NO_ROUTER, SOFTMAX_PLAIN, SOFTMAX_RENORMALIZED, TOPK_SOFTMAX,
                                   gate_backward_kernel, gated_expand_kernel, lora_down_kernel,
                                   lora_weight_grad_kernel, lora_weight_grad_reduce_kernel,
                                   masked_router_aux_loss_backward_kernel, masked_router_aux_loss_kernel,
                                   router_aux_loss_backward_kernel, router_aux_loss_kernel, router_backward_kernel,
                                   threshold_weights_kernel)
from moelora.kernels.grouped import (combine_rows_backward_kernel, combine_rows_kernel, glu_backward_kernel,
                                     glu_forward_kernel, grouped_matmul_kernel, grouped_weight_grad_kernel,
                                     mixing_weights_backward_kernel, mixing_weights_kernel)
from moelora.kernels.matmul import matmul_kernel

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETING = interpreting()


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every input dtype except fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------ launching
_launch_hook: Optional[Callable] = None
_direct_launch = {"enabled": not _INTERPRETING and os.environ.get("MOELORA_DIRECT_LAUNCH", "1") != "0"}


def _current_device() -> int:
    return torch._C._cuda_getDevice()


def _current_stream(device: int):
    """The raw CUDA stream a launch on ``device`` (the current device) goes to: its current stream."""
    return torch._C._cuda_getCurrentRawStream(device)


class KernelLaunch:
    """``kernel[grid](*args, *fixed, **meta)`` for one launch configuration (shapes, strides,
    dtypes), built once per configuration by the launchers' cached config functions and shared
    by the devices: a launch runs on its tensors' device (the first tensor's), made current
    for it where another one is.

    The kernels launched this way take their parameters in the order: pointers, per-call floats,
    configuration scalars (sizes, strides and what follows from them: ``fixed``), constexprs
    (``meta``, with the launch options num_warps / num_stages). A call passes the first two
    groups: ``launch(*tensors, *floats)``. Floats must be Python floats.

    On a GPU the first launch goes through Triton (which compiles or finds the kernel). Triton
    specialises a launch on its tensors' dtypes and 16-byte alignment, on the ints and on the
    constexprs; here the ints and constexprs are fixed, so a later launch whose tensors have
    the first launch's dtypes and are 16-byte aligned calls the compiled kernel directly (per device),
    skipping Triton's per-launch argument binding and cache lookup; any other launch goes
    through Triton again (MOELORA_DIRECT_LAUNCH=0: always). The check costs the same with the
    launches skipped (``skip_launches``), so host time measured on a CPU includes it.
    """

    __slots__ = ("kernel", "grid", "fixed", "meta", "_direct", "__weakref__")

    def __init__(self, kernel, grid: tuple, fixed: tuple, **meta):
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.fixed = tuple(fixed)
        self.meta = meta
        # Per device (a compiled kernel's function handle is loaded on one device): (the tensors'
        # dtypes at its first aligned launch, the compiled kernel or None, its constexpr values),
        # or False where this Triton cannot launch directly; see _record.
        self._direct: Dict[int, object] = {}
        _LAUNCHES.add(self)  # built once per configuration (cached): not on the hot path

    def __call__(self, *args) -> None:
        device = args[0].get_device()  # the tensors' CUDA device; -1: CPU tensors (the interpreter)
        if device >= 0 and device != _current_device():
            # Triton compiles for, and launches on, the current device, not the tensors' (a layer
            # of a device_map="auto" model holds tensors on cuda:1 while cuda:0 is current)
            with torch.cuda.device(device):
                return self(*args)
        entry = self._direct.get(device)
        same = bool(entry) and _same_specialisation(args, entry[0])
        if _launch_hook is not None:
            _launch_hook(self.kernel, self.grid, self, args)
            if entry is None:  # so that the check above runs as it does on a GPU
                self._record(args, None, device)
            return
        if same and entry[1] is not None:
            _, compiled, constexprs = entry
            try:
                compiled.run(self.grid[0], self.grid[1], self.grid[2], _current_stream(device), compiled.function,
                             compiled.packed_metadata, None, None, None, *args, *self.fixed, *constexprs)
                return
            except TypeError:  # another Triton's launcher signature: launch through Triton from now on
                _direct_launch["enabled"] = False
                self._direct[device] = entry = False
        compiled = self.kernel[self.grid](*args, *self.fixed, **self.meta)
        if (entry is None or (entry and entry[1] is None)) and _direct_launch["enabled"]:
            self._record(args, compiled, device)

    def _record(self, args, compiled, device: int) -> None:
        """Remember, for ``device``, the tensors' dtypes of an aligned launch and, given the
        compiled kernel, its direct launch (or False: not possible with this Triton)."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if any(t.data_ptr() & 15 for t in tensors):
            return  # an unaligned launch: wait for an aligned one
        dtypes = tuple(t.dtype for t in tensors)
        if compiled is None:
            self._direct[device] = (dtypes, None, ())
            return
        names = self.kernel.arg_names[len(args) + len(self.fixed):]
        if hasattr(compiled, "packed_metadata") and all(n in self.meta for n in names):
            self._direct[device] = (dtypes, compiled, tuple(self.meta[n] for n in names))
        else:
            self._direct[device] = False


# Every KernelLaunch alive (the cached configurations hold them): for direct_launch_state.
_LAUNCHES: "weakref.WeakSet[KernelLaunch]" = weakref.WeakSet()


def direct_launch_state() -> dict:
    """How the launches made so far reach their kernels (for the benchmark's record and the GPU
    tests): ``enabled``, whether launches may be direct at all (False under the interpreter, with
    MOELORA_DIRECT_LAUNCH=0, and once a Triton whose launcher takes other arguments was met); then
    per way, the names of the kernels whose configurations (per device) launch that way, each
    with its count: ``direct`` (the compiled kernel called directly), ``through_triton`` (through
    Triton for good: a constexpr the configuration does not give, a compiled kernel without
    packed metadata, or that other launcher) and ``waiting`` (its aligned launches only counted
    or skipped so far: the first one run decides). Configurations with no aligned launch (or
    none while launches may be direct) record nothing and are left out."""
    ways = {"direct": {}, "through_triton": {}, "waiting": {}}
    for launch in list(_LAUNCHES):
        name = _kernel_name(launch.kernel)
        for entry in launch._direct.values():
            way = "through_triton" if entry is False else "direct" if entry[1] is not None else "waiting"
            ways[way][name] = ways[way].get(name, 0) + 1
    return {"enabled": _direct_launch["enabled"], **{way: dict(sorted(n.items())) for way, n in ways.items()}}


def _same_specialisation(args, dtypes: tuple) -> bool:
    """Whether the tensors among ``args`` (they come first) have ``dtypes`` and 16-byte alignment."""
    for t, dtype in zip(args, dtypes):
        if t.dtype is not dtype or t.data_ptr() & 15:
            return False
    return True


@contextlib.contextmanager
def skip_launches():
    """Within the block no Triton kernel runs (for host-time measurements)."""
    global _launch_hook
    previous = _launch_hook
    _launch_hook = _skip
    try:
        yield
    finally:
        _launch_hook = previous


def _skip(kernel, grid, configured, args) -> None:
    return None


@contextlib.contextmanager
def count_launches():
    """Within the block no Triton kernel runs: each launch is recorded in the yielded list
    instead, as (kernel name, grid) once the block exits. Launchers' outputs stay unwritten."""
    global _launch_hook
    calls: List[tuple] = []
    previous = _launch_hook
    _launch_hook = lambda kernel, grid, configured, args: calls.append((kernel, grid))  # noqa: E731
    try:
        yield calls
    finally:
        _launch_hook = previous
        calls[:] = [(_kernel_name(kernel), grid) for kernel, grid in calls]


@contextlib.contextmanager
def record_launches():
    """Within the block no Triton kernel runs: each launch is recorded in the yielded list
    instead, as (kernel, its constexprs and launch options, the values of its other parameters
    in order with each tensor replaced by its dtype), e.g. to compile exactly what a call
    launches (benchmarks/compile_kernels.py)."""
    global _launch_hook
    calls: List[tuple] = []
    previous = _launch_hook

    def record(kernel, grid, configured, args):
        values = (*args, *configured.fixed)
        calls.append((kernel, dict(configured.meta),
                      tuple(v.dtype if isinstance(v, torch.Tensor) else v for v in values)))

    _launch_hook = record
    try:
        yield calls
    finally:
        _launch_hook = previous


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(fn))


def _tf32(compute_dtype: torch.dtype) -> bool:
    """Whether float32 products use tf32 (torch's allow_tf32 setting, read per call)."""
    return compute_dtype is torch.float32 and not _INTERPRETING and torch.backends.cuda.matmul.allow_tf32


def _dot_config(compute_dtype: torch.dtype) -> dict:
    return _dot_config_cached(compute_dtype, _tf32(compute_dtype))


@functools.lru_cache(maxsize=None)
def _dot_config_cached(compute_dtype: torch.dtype, tf32: bool) -> dict:
    return {
        "DOT_DTYPE": _TL_DTYPES[compute_dtype],
        "ACC_DTYPE": _TL_DTYPES[accumulator_dtype(compute_dtype)],
        "INPUT_PRECISION": "tf32" if tf32 else "ieee",
    }


_FP32_SAFE = 2.0 ** 64
# The largest scale magnitude whose two factors stay normal float32 numbers (at most 2**125 each).
SCALE_LIMIT = 2.0 ** 250


def scale_factors(scaling: float) -> tuple:
    """(scale, scale_out) with scale * scale_out == scaling, both comfortably inside float32's
    range: the kernels apply ``scale`` with the gate and ``scale_out`` last, so a LoRA scale out
    of float32's range (kernel scalars are float32) still gives the finite results it should.
    A nonzero scale of magnitude outside [1 / SCALE_LIMIT, SCALE_LIMIT] fits no such pair: a
    ValueError (the torch backend, which computes in float64, takes it)."""
    magnitude = abs(scaling)
    if magnitude == 0 or (1 / _FP32_SAFE <= magnitude <= _FP32_SAFE) or not math.isfinite(scaling):
        return float(scaling), 1.0
    if not 1 / SCALE_LIMIT <= magnitude <= SCALE_LIMIT:
        raise ValueError(f"scaling must be 0 or of magnitude in [2**-250, 2**250] on the Triton backend (its "
                         f"kernels apply it as two float32 factors), got {scaling!r}; backend='torch' takes it")
    half = 2.0 ** (math.frexp(magnitude)[1] // 2)  # a power of two: the split is exact
    return scaling / half, half


_FLOAT32 = struct.Struct("f")


def float64_parts(value: float) -> tuple:
    """(hi, lo): ``value`` as two float32 numbers (Python floats that float32 holds), hi its float32
    rounding and lo that of the rest, hi + lo = value to ~48 bits: how a kernel computing in
    float64 takes a float argument, which Triton passes as one float32 (see _float_arg in
    moelora.kernels.dense). A value float32 cannot hold (out of its range, not finite): (value, 0.0)."""
    try:
        hi = _FLOAT32.unpack(_FLOAT32.pack(value))[0]
        lo = _FLOAT32.unpack(_FLOAT32.pack(value - hi))[0]
    except OverflowError:
        return value, 0.0
    return (hi, lo) if math.isfinite(hi) else (value, 0.0)


def _coefs(lb_coef: float, z_coef: float, acc: torch.dtype) -> tuple:
    """(lb_coef, z_coef, lb_lo, z_lo), the aux-loss coefficients as a kernel computing in ``acc``
    takes them: float64_parts for float64, else the coefficients (which Triton rounds to float32)
    and zeros."""
    if acc is torch.float64:
        (lb, lb_lo), (z, z_lo) = float64_parts(float(lb_coef)), float64_parts(float(z_coef))
        return lb, z, lb_lo, z_lo
    return float(lb_coef), float(z_coef), 0.0, 0.0


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (triton.cdiv costs microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_power_of_2(n)))


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


def _pow2_or_zero(n: int) -> int:
    """n if it is a power of two, else 0: a size worth compiling into a kernel (see gated_expand_kernel's RANK)."""
    return n if n > 0 and n & (n - 1) == 0 else 0


def _contiguous(cols: int) -> tuple:
    """Strides of a contiguous 2-D tensor with ``cols`` columns (one a launcher allocates)."""
    return (cols, 1)


# ------------------------------------------------------------------------------ dense tiles
# Tiles of the dense kernels by shape class, measured on Hopper (H100/H200, bf16) by
# ``python -m benchmarks.tune_dense`` (paste its "paste" output here). Each entry overrides some
# of the launcher's default tiles (DENSE_TILE_KEYS); a class not listed keeps the defaults, and
# so do 4-byte operands and the interpreter. Change the table through install_dense_configs (it
# checks the entries and drops the cached launch configurations). Entries: H200, Triton 3.6, commit f3481a5
# (benchmarks/results/tune-dense-nvidia-h200-20261128T193823.json; median ms against the defaults, summed
# over a class's launches). That run timed launches back to back in eager mode, so a kernel shorter
# than its launch's host cost (every T 1024 class: 0.04-0.06 ms per launch whatever the kernel) was
# timed at that cost; its one "few" pick (matmul:ml:few, 6% apart) is left out until the tuner's
# device timing measures that class.
DENSE_CONFIGS: Dict[str, Dict[str, int]] = {
    # 0.1071 ms, default 0.1121 ms
    "lora_down:sl:many": dict(BLOCK_K=128, BLOCK_T=64, num_stages=3, num_warps=4),
    # 0.1393 ms, default 0.1795 ms
    "gated_expand:lm:many": dict(BLOCK_C=16, BLOCK_N=128, BLOCK_T=64, num_stages=3, num_warps=4),
    # 0.0580 ms, default 0.0628 ms
    "matmul:ml:many": dict(BLOCK_K=128, BLOCK_M=64, BLOCK_N=64, num_stages=4, num_warps=4),
    # 0.1168 ms, default 0.1460 ms
    "matmul:ls:many": dict(BLOCK_M=128, BLOCK_N=64, num_stages=3, num_warps=4),
    # 0.1960 ms, default 0.2495 ms
    "lora_weight_grad:lm:many": dict(BLOCK_M=32, BLOCK_T=64, num_stages=3, num_warps=4),
}

# What a DENSE_CONFIGS entry (or a launcher's ``tiles`` argument) may set, per kernel.
DENSE_TILE_KEYS = {
    "lora_down": ("BLOCK_T", "BLOCK_K", "num_warps", "num_stages"),
    "gated_expand": ("BLOCK_T", "BLOCK_N", "BLOCK_C", "num_warps", "num_stages"),
    "lora_weight_grad": ("BLOCK_M", "BLOCK_T", "BLOCK_CB", "BLOCK_CA", "num_warps", "num_stages"),
    "matmul": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"),
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def dense_shape_class(kernel: str, rows: int, n: int, k: int) -> str:
    """Key of DENSE_CONFIGS: ``kernel:<n><k>:<rows>`` for a GEMM of ``rows`` tokens, n output
    columns and reduction k (widths s <= 64 < m <= 256 < l as grouped_shape_class's; rows few
    (< 2048) or many). Per kernel: lora_down n = R, k = d_in; gated_expand n = d_out, k = E*r;
    lora_weight_grad n = d_out, k = E*r (its reduction runs over the rows); matmul n = N, k = K.
    E.g. S1's gated expand is ``gated_expand:lm:many``, its dx = dh A ``matmul:ls:many``."""
    return f"{kernel}:{_width_class(n)}{_width_class(k)}:{'few' if rows < 2048 else 'many'}"


def check_tiles(kernel: str, tiles: Dict[str, int]) -> Dict[str, int]:
    """``tiles`` if ``kernel`` (a DENSE_TILE_KEYS key) may use them, else a ValueError saying why."""
    if kernel not in DENSE_TILE_KEYS:
        raise ValueError(f"kernel must be one of {sorted(DENSE_TILE_KEYS)}, got {kernel!r}")
    for name, value in tiles.items():
        if name not in DENSE_TILE_KEYS[kernel]:
            raise ValueError(f"{kernel} tiles may set {DENSE_TILE_KEYS[kernel]}, got {name!r}")
        if name == "num_stages":
            ok, expected = isinstance(value, int) and value >= 1, "an int >= 1"
        else:
            smallest = 1 if name == "num_warps" else 16
            ok = isinstance(value, int) and value >= smallest and not value & (value - 1)
            expected = f"a power of two >= {smallest}"
        if not ok:
            raise ValueError(f"{kernel} {name} must be {expected}, got {value!r}")
    return tiles


def _tiles_key(kernel: str, tiles: Optional[Dict[str, int]]) -> tuple:
    """A launcher's ``tiles`` argument as part of its cached configuration's key (() for none)."""
    return tuple(sorted(check_tiles(kernel, tiles).items())) if tiles else ()


def _dense_tiles(kernel: str, given: tuple, rows: int, n: int, k: int, dtype: torch.dtype) -> Dict[str, int]:
    """The tile overrides of one launch: the launcher's ``tiles`` argument, else the table's for
    2-byte operands (the table holds bf16 measurements: with 4-byte operands its tiles spill
    registers, and the launchers' fp32 defaults are sized for those)."""
    if given:
        return dict(given)
    if _INTERPRETING or dtype.itemsize > 2:
        return {}
    return DENSE_CONFIGS.get(dense_shape_class(kernel, rows, n, k), {})


def _launch_options(tiles: Dict[str, int]) -> Dict[str, int]:
    return {name: tiles[name] for name in _LAUNCH_OPTIONS if name in tiles}


def _shape_class_kernel(shape_class: str) -> str:
    """The kernel of a DENSE_CONFIGS key, after checking that the key is one dense_shape_class gives."""
    parts = shape_class.split(":")
    if len(parts) != 3 or len(parts[1]) != 2 or not set(parts[1]) <= set("sml") or parts[2] not in ("few", "many"):
        raise ValueError(f"a DENSE_CONFIGS key is kernel:<n><k>:<rows> with widths s, m or l and rows few or many "
                         f"(see dense_shape_class), got {shape_class!r}")
    return parts[0]


def install_dense_configs(configs: Dict[str, Dict[str, int]], replace: bool = False) -> None:
    """Add ``{shape class: tiles}`` entries to DENSE_CONFIGS (checked; e.g. a tune_dense result),
    or with ``replace`` make them the whole table; drops the launch configurations cached before."""
    checked = {shape_class: check_tiles(_shape_class_kernel(shape_class), dict(tiles))
               for shape_class, tiles in configs.items()}
    if replace:
        DENSE_CONFIGS.clear()
    DENSE_CONFIGS.update(checked)
    clear_launch_caches()


# ------------------------------------------------------------------------------ matmul
@functools.lru_cache(maxsize=4096)
def _matmul_launch(M: int, N: int, K: int, K2: int, group: int, a_strides: tuple, b_strides: tuple,
                   a2_strides: tuple, b2_strides: tuple, out_strides: tuple, addend_strides: Optional[tuple],
                   mask_strides: Optional[tuple], s2_strides: Optional[tuple], device: torch.device, split_k: bool,
                   dtype: torch.dtype, tf32: bool, sanitize_b: bool, given_tiles: tuple):
    """(KernelLaunch of matmul_kernel, splits); b_strides = (k, group, n) strides of b."""
    overrides = _dense_tiles("matmul", given_tiles, M, N, K, dtype)
    # 4-byte operands (fp32 layers) take 32 x 32 tiles, 32-deep steps and a two-stage pipeline: of
    # a sweep of 16 tiles over the fp32 GEMMs that benchmarks/compile_kernels.py traces (the
    # sanitized redo and B's expert groups included), the only one that neither Triton 3.6 nor
    # 3.9 spills for sm_90 in any of them
    narrow = dtype.itemsize > 2 and not _INTERPRETING
    block_m = overrides.get("BLOCK_M") or (32 if narrow else 64 if M >= 64 or _INTERPRETING else
                                           _pow2_block(M, 16, 64))
    block_n = overrides.get("BLOCK_N") or _pow2_block(N, 16, 32 if narrow else 128)
    block_k = overrides.get("BLOCK_K") or _pow2_block(K, 16, 32 if narrow else 64)
    tiles = cdiv(M, block_m) * cdiv(N, block_n)
    splits = _split_count(tiles, K, device) if split_k else 1
    k_per_split = max(1, cdiv(cdiv(K, splits), block_k)) * block_k  # K 0 (the second product alone): one split
    splits = cdiv(max(K, 1), k_per_split)
    has_addend = addend_strides is not None and splits == 1
    # One split writes straight into ``out``; several write fp32 partials [splits, M, N].
    split_stride, partial_strides = (0, out_strides) if splits == 1 else (M * N, (N, 1))
    d_strides = addend_strides if has_addend else out_strides
    b_group = 0 if group >= N else (_pow2_or_zero(group) or -1)  # see matmul_kernel's B_GROUP
    meta = dict(_dot_config_cached(dtype, tf32), HAS_SECOND=K2 > 0, SANITIZE_B=sanitize_b, HAS_ADDEND=has_addend,
                HAS_MASK=mask_strides is not None, HAS_SECOND_SCALE=s2_strides is not None, B_GROUP=b_group,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    if narrow:
        meta.update(num_stages=2)
    meta.update(_launch_options(overrides))
    fixed = (M, N, K, K2, k_per_split, group, *a_strides, *b_strides, *a2_strides, *b2_strides, split_stride,
             *partial_strides, *d_strides, *(mask_strides or (0, 0)), *(s2_strides or (0, 0)))
    return KernelLaunch(matmul_kernel, (cdiv(M, block_m), cdiv(N, block_n), splits), fixed, **meta), splits


def matmul(a: torch.Tensor, b: torch.Tensor, *, out_dtype: torch.dtype, compute_dtype: torch.dtype,
           alpha: float = 1.0, addend: Optional[torch.Tensor] = None, split_k: bool = False,
           out: Optional[torch.Tensor] = None, stacked_b: bool = False,
           second: Optional[tuple] = None, sanitize_b: bool = False, mask: Optional[torch.Tensor] = None,
           mask_scale: float = 1.0, second_scale: Optional[torch.Tensor] = None,
           tiles: Optional[Dict[str, int]] = None) -> torch.Tensor:
    """alpha * (a @ b [+ a2 @ b2]) (+ addend) for operands of any strides and float dtypes; fp32/fp64 accumulation.

    ``mask``: a bool [M, N] tensor; a @ b is then mask_scale * (a @ b) where it is true and 0
    elsewhere (the second product is not masked; LoRA dropout's backward). Not with ``split_k``.
    ``second_scale``: an [M, N] tensor multiplying a2 @ b2 elementwise (router jitter's backward).
    ``stacked_b``: b is [E, K, r], read as B_stack [K, E*r] (column e*r + i = b[e, :, i]).
    ``second``: (a2 [M, K2], b2 [K2, N]) added to the product (a K-concatenated GEMM).
    ``sanitize_b``: non-finite entries of b only reach the rows of a that weigh them (see
    moelora.kernels.matmul). With ``split_k`` the K range is cut into slices whose fp32
    partials are summed in a fixed order (for weight gradients, whose reduction runs over all
    tokens). ``out`` (any strides) receives the result when given. ``tiles``: tile overrides
    (DENSE_TILE_KEYS["matmul"]) instead of DENSE_CONFIGS' (tuning, tests).
    """
    M, K = a.shape
    if stacked_b:
        groups, _, group = b.shape
        N = groups * group
        sb_g, sb_k, sb_n = b.stride()
    else:
        N = b.shape[1]
        group = max(N, 1)
        (sb_k, sb_n), sb_g = b.stride(), 0
    given_out = out is not None
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    a2, b2 = second if second is not None else (a, b)
    K2 = a2.shape[1] if second is not None else 0
    second_scale = second_scale if second is not None else None
    if (mask is not None or second_scale is not None) and split_k:
        raise ValueError("matmul: a mask or second_scale applies to the whole product, not to split_k's partials")
    if M == 0 or N == 0 or K + K2 == 0:
        if addend is not None:
            out.copy_(addend)
        else:
            out.zero_()  # a zero on the device (a host scalar's copy cannot be captured in a CUDA graph)
        return out
    b2_strides = (b2.stride(0), b2.stride(-1))
    kernel, splits = _matmul_launch(M, N, K, K2, group, a.stride(), (sb_k, sb_g, sb_n), a2.stride(), b2_strides,
                                    out.stride() if given_out else _contiguous(N),
                                    addend.stride() if addend is not None else None,
                                    mask.stride() if mask is not None else None,
                                    second_scale.stride() if second_scale is not None else None,
                                    a.device, split_k,
                                    compute_dtype, _tf32(compute_dtype), sanitize_b, _tiles_key("matmul", tiles))
    mask_arg = mask if mask is not None else out
    s2_arg = second_scale if second_scale is not None else out
    if splits == 1:
        kernel(a, b, a2, b2, out, addend if addend is not None else out, mask_arg, s2_arg, float(alpha),
               float(mask_scale))
        return out
    partial = torch.empty(splits, M, N, dtype=accumulator_dtype(compute_dtype), device=a.device)
    kernel(a, b, a2, b2, partial, out, mask_arg, s2_arg, float(alpha), float(mask_scale))
    total = partial.sum(0)
    out.copy_(total if addend is None else total + addend.to(partial.dtype))
    return out


# ------------------------------------------------------------------------------ dense regime
def _routing_blocks(top_k: int) -> int:
    return next_power_of_2(top_k)


_SIGNIFICAND_BITS = {torch.bfloat16: 8, torch.float16: 11}  # with the implicit bit; fp32 and wider: 24


@functools.lru_cache(maxsize=4096)
def _lora_down_launch(T: int, K: int, R: int, E: int, has_router: bool, x_strides: tuple, a_strides: tuple,
                      r_strides: tuple, mask_strides: Optional[tuple], jitter_strides: Optional[tuple],
                      dtype: torch.dtype, router_dtype: torch.dtype, tf32: bool, given_tiles: tuple) -> KernelLaunch:
    overrides = _dense_tiles("lora_down", given_tiles, T, R, K, dtype)
    # bf16 x: the router's product as bf16 tensor-core products of the weight's bf16 pieces, as
    # many as its significand needs (fp32 3, fp16 2, bf16 1); else, and under the interpreter
    # (whose bf16 dots are wrong under Triton 3.9), an fp32 dot
    split = has_router and dtype == torch.bfloat16 and not _INTERPRETING and jitter_strides is None
    router_splits = cdiv(_SIGNIFICAND_BITS.get(router_dtype, 24), 8) if split else 0
    # 32 tokens for a float64 x with a router: 64 spill registers for sm_90 (Triton 3.9)
    block_t = overrides.get("BLOCK_T") or (32 if _INTERPRETING or (has_router and dtype.itemsize > 4) else 64)
    # At most 64 of A's rows per program and 64-deep steps (32 and 32 for 4-byte x): larger tiles
    # spill registers for sm_90 (wide per-expert A's take more programs instead)
    wide = dtype.itemsize <= 2
    block_r = _pow2_block(R, 16, 64 if wide else 32)
    # The router's fp32 product is register-hungry: 16 of its columns per program (80 registers
    # for sm_90 at 4 warps; 32 take 190, 64 spill, 512 need more shared memory than an SM has).
    block_e = 16
    columns = max(1, cdiv(R, block_r), cdiv(E, block_e) if has_router else 0)
    meta = dict(_dot_config_cached(dtype, tf32), HAS_ROUTER=has_router, HAS_MASK=mask_strides is not None,
                HAS_JITTER=jitter_strides is not None, ROUTER_SPLITS=router_splits,
                BLOCK_T=block_t, BLOCK_R=block_r,
                BLOCK_E=block_e, BLOCK_K=overrides.get("BLOCK_K") or _pow2_block(K, 16, 64 if wide else 32),
                COLUMNS=columns,
                **_launch_options(overrides))
    h_strides = _contiguous(R)
    logits_strides = _contiguous(E) if has_router else h_strides
    fixed = (T, K, R, E, *x_strides, *a_strides, *r_strides, *h_strides, *logits_strides, *(mask_strides or (0, 0)),
             *(jitter_strides or (0, 0)))
    return KernelLaunch(lora_down_kernel, (cdiv(T, block_t) * columns,), fixed, **meta)


def lora_down(x: torch.Tensor, a_rows: Optional[torch.Tensor], router_weight: Optional[torch.Tensor] = None, *,
              mask: Optional[torch.Tensor] = None, mask_scale: float = 1.0, jitter: Optional[torch.Tensor] = None,
              tiles: Optional[Dict[str, int]] = None):
    """(h = x @ a_rows^T [T, R], logits = x @ router_weight^T [T, E] or None) in x's accumulator dtype,
    reading x once; a_rows of any float dtype is rounded to x's dtype, the router's product runs in
    the accumulator dtype. ``a_rows`` None: the router logits alone (h is [T, 0]). ``mask`` (LoRA
    dropout): a bool [T, d_in] tensor; h is then mask_scale * (x (.) mask) @ a_rows^T (the logits
    read x unmasked). ``jitter`` (router jitter): a [T, d_in] tensor of factors; the logits are then
    (x (.) jitter) @ router_weight^T, an fp32 product. ``tiles``: tile overrides instead of
    DENSE_CONFIGS' (tuning, tests)."""
    T, K = x.shape
    if a_rows is None:
        a_rows = x.new_empty(0, K)
    R = a_rows.shape[0]
    acc = accumulator_dtype(x.dtype)
    h = torch.empty(T, R, dtype=acc, device=x.device)
    has_router = router_weight is not None
    logits = torch.empty(T, router_weight.shape[0], dtype=acc, device=x.device) if has_router else None
    if T == 0:
        return h, logits
    r_w = router_weight if has_router else a_rows
    jitter = jitter if has_router else None
    kernel = _lora_down_launch(T, K, R, r_w.shape[0], has_router, x.stride(), a_rows.stride(), r_w.stride(),
                               mask.stride() if mask is not None else None,
                               jitter.stride() if jitter is not None else None, x.dtype, r_w.dtype, _tf32(x.dtype),
                               _tiles_key("lora_down", tiles))
    kernel(x, a_rows, r_w, h, logits if has_router else h, mask if mask is not None else h,
           jitter if jitter is not None else h, float(mask_scale))
    return h, logits


# gated_expand computes a router's aux loss in its first program for routers of at most this
# many experts; more would take registers from every program of the expand (at 256 experts,
# 165 per thread for sm_90: one program per SM), so router_aux_loss runs on its own.
GATED_EXPAND_AUX_EXPERTS = 64


class RouterAux(NamedTuple):
    """A learned router's statistics for its auxiliary loss, which gated_expand computes in the
    same launch (router_aux_loss in a launch of its own): the routing op's counts [E],
    prob_sums [E] and lse [T], the coefficients, and whether the counts are recounted over the
    slots with weight > 0 (threshold routing)."""

    counts: torch.Tensor
    prob_sums: torch.Tensor
    lse: torch.Tensor
    lb_coef: float
    z_coef: float
    count_kept: bool = False


def _aux_meta(experts: int, count_kept: bool, dtype: torch.dtype, top_k: int) -> dict:
    """The constexprs of _router_aux_loss (moelora.kernels.dense) for E experts, in ``dtype``."""
    return dict(COUNT_KEPT=count_kept, AUX_ACC=_TL_DTYPES[dtype], BLOCK_E=_pow2_block(experts + 1, 16, 1 << 16),
                BLOCK_AUX_T=256 if count_kept else 1024, BLOCK_K=next_power_of_2(top_k))


def _aux_args(aux: RouterAux):
    """(the pointers, the coefficients) that _router_aux_loss takes for ``aux``; the pointers
    end with its outputs: loss (0-d), stats [2] and the counts (the kept slots', new, when
    ``aux.count_kept``); the coefficients are _coefs' in lse's dtype. The kernels read counts and
    prob_sums at unit stride: strided ones are copied."""
    lse = aux.lse
    aux = aux._replace(counts=aux.counts.contiguous(), prob_sums=aux.prob_sums.contiguous())
    loss = torch.empty((), dtype=lse.dtype, device=lse.device)
    stats = torch.empty(2, dtype=lse.dtype, device=lse.device)
    counts = torch.empty(aux.counts.shape, dtype=torch.int64, device=lse.device) if aux.count_kept else aux.counts
    return (aux.counts, aux.prob_sums, lse, loss, stats, counts), _coefs(aux.lb_coef, aux.z_coef, lse.dtype)


@functools.lru_cache(maxsize=1024)
def _router_aux_loss_launch(T: int, E: int, top_k: int, count_kept: bool, dtype: torch.dtype, lse_stride: int,
                            ids_strides: tuple, w_strides: tuple) -> KernelLaunch:
    fixed = (T, E, 1.0 / max(T, 1), lse_stride, *ids_strides, *w_strides)
    return KernelLaunch(router_aux_loss_kernel, (1,), fixed, TOP_K=top_k, **_aux_meta(E, count_kept, dtype, top_k))


def router_aux_loss(topk_ids: torch.Tensor, topk_weights: torch.Tensor, aux: RouterAux):
    """(loss 0-d, stats [2] = (lb, z), counts [E]) of a learned router in one single-program
    launch (what gated_expand computes beside its tile, where there is no expand to take it:
    see router_aux_loss_kernel); counts as in gated_expand."""
    args, coefs = _aux_args(aux)
    kernel = _router_aux_loss_launch(topk_ids.shape[0], aux.counts.shape[0], topk_ids.shape[1], aux.count_kept,
                                     aux.lse.dtype, aux.lse.stride(0), topk_ids.stride(), topk_weights.stride())
    kernel(topk_ids, topk_weights, *args, *coefs)
    return args[3:]


@functools.lru_cache(maxsize=1024)
def _router_aux_loss_backward_launch(E: int, T: int, counts_stride: int, lse_stride: int,
                                     dtype: torch.dtype) -> KernelLaunch:
    block = 1024
    return KernelLaunch(router_aux_loss_backward_kernel, (cdiv(E, block) + cdiv(T, block),),
                        (E, T, counts_stride, lse_stride), ACC=_TL_DTYPES[accumulator_dtype(dtype)], BLOCK=block)


def router_aux_loss_backward(g: torch.Tensor, counts: torch.Tensor, lse: torch.Tensor, lb_coef: float,
                             z_coef: float):
    """(d prob_sums [E], d lse [T]) of router_aux_loss's loss from its gradient ``g`` (0-d), in
    lse's dtype (products in its accumulator dtype), in one launch."""
    E, T = counts.shape[0], lse.shape[0]
    g_prob_sums = torch.empty(E, dtype=lse.dtype, device=lse.device)
    g_lse = torch.empty(T, dtype=lse.dtype, device=lse.device)
    inv_t = 1.0 / max(T, 1)
    kernel = _router_aux_loss_backward_launch(E, T, counts.stride(0), lse.stride(0), lse.dtype)
    lb_scale, z_scale, lb_lo, z_lo = _coefs(lb_coef * E * inv_t * inv_t, 2.0 * z_coef * inv_t,
                                            accumulator_dtype(lse.dtype))
    kernel(g, counts, lse, g_prob_sums, g_lse, lb_scale, z_scale, lb_lo, z_lo)
    return g_prob_sums, g_lse


@functools.lru_cache(maxsize=1024)
def _masked_router_aux_loss_launch(T: int, E: int, top_k: int, count_kept: bool, dtype: torch.dtype,
                                   logits_strides: tuple, ids_strides: tuple, w_strides: tuple,
                                   mask_stride: int) -> KernelLaunch:
    block_e = _pow2_block(E + 1, 16, 1 << 16)  # a spare histogram bin
    block_t = max(16, min(128, 2048 // block_e))  # 256 spilled registers for sm_90 (Triton 3.6)
    return KernelLaunch(masked_router_aux_loss_kernel, (1,),
                        (T, E, *logits_strides, *ids_strides, *w_strides, mask_stride), COUNT_KEPT=count_kept,
                        TOP_K=top_k, ACC=_TL_DTYPES[accumulator_dtype(dtype)], BLOCK_T=block_t, BLOCK_E=block_e,
                        BLOCK_K=next_power_of_2(top_k))


def masked_router_aux_loss(logits: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           mask: torch.Tensor, lb_coef: float, z_coef: float, count_kept: bool):
    """(loss 0-d, stats [2] = (lb, z), counts [E] int64) of a learned router's aux loss over the real
    tokens of the bool ``mask`` [T], from its ``logits`` [T, E] and routing, in one single-program
    launch (masked_router_aux_loss_kernel), in the logits' accumulator dtype (fp32; fp64 for fp64)."""
    T, E = logits.shape
    acc = accumulator_dtype(logits.dtype)
    loss = torch.empty((), dtype=acc, device=logits.device)
    stats = torch.empty(2, dtype=acc, device=logits.device)
    counts = torch.empty(E, dtype=torch.int64, device=logits.device)
    kernel = _masked_router_aux_loss_launch(T, E, topk_ids.shape[1], count_kept, logits.dtype, logits.stride(),
                                            topk_ids.stride(), topk_weights.stride(), mask.stride(0))
    kernel(logits, topk_ids, topk_weights, mask, loss, stats, counts, *_coefs(lb_coef, z_coef, acc))
    return loss, stats, counts


@functools.lru_cache(maxsize=1024)
def _masked_router_aux_loss_backward_launch(T: int, E: int, dtype: torch.dtype, logits_strides: tuple,
                                            counts_stride: int, mask_stride: int, dl_strides: tuple,
                                            add: bool) -> KernelLaunch:
    block_e = _pow2_block(E, 16, 1 << 16)
    block_t = max(1, min(64, 4096 // block_e))
    return KernelLaunch(masked_router_aux_loss_backward_kernel, (cdiv(T, block_t),),
                        (T, E, *logits_strides, counts_stride, mask_stride, *dl_strides), ADD=add,
                        ACC=_TL_DTYPES[accumulator_dtype(dtype)], BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_N=1024)


def masked_router_aux_loss_backward(g: torch.Tensor, logits: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor,
                                    lb_coef: float, z_coef: float, dl: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient of masked_router_aux_loss's loss for its gradient ``g`` (0-d) with respect to the
    logits, added to ``dl`` [T, E] in place where given, else written to a new tensor (one launch)."""
    T, E = logits.shape
    add = dl is not None
    if not add:
        dl = torch.empty_like(logits)
    if T == 0:
        return dl
    kernel = _masked_router_aux_loss_backward_launch(T, E, logits.dtype, logits.stride(), counts.stride(0),
                                                     mask.stride(0), dl.stride(), add)
    kernel(g, logits, counts, mask, dl, *_coefs(lb_coef, z_coef, accumulator_dtype(logits.dtype)))
    return dl


@functools.lru_cache(maxsize=4096)
def _gated_expand_launch(T: int, N: int, E: int, rank: int, top_k: int, shared_a: bool, h_strides: tuple,
                         ids_strides: tuple, w_strides: tuple, b_strides: tuple, base_strides: Optional[tuple],
                         bias_stride: Optional[int], out_strides: tuple, dtype: torch.dtype,
                         tf32: bool, aux: Optional[tuple], given_tiles: tuple) -> KernelLaunch:
    """Default tiles: Hg's E*r columns 16 at a time; 64 x 128 outputs per program with 8 warps and
    a two-stage pipeline, or, adding a base (whose tile the epilogue loads) or below rank 16,
    64 x 64 with 4 warps and three stages. Compiled for sm_90 by Triton 3.6 and 3.9 either fits at least two
    programs per SM in registers (benchmarks/compile_kernels.py checks it); a whole E*r = 128
    step at once, as before, took over 200 registers: one program per SM. ``aux``: None, or
    (router experts, lse stride, count_kept, lse dtype) of the router aux loss the first program
    computes."""
    has_base = base_strides is not None
    # 64 x 64 tiles with 4 warps also below rank 16, where an expert's columns fill less than a
    # 16-column step: the 8-warp 64 x 128 tile then takes ~165 registers (one program per SM); so it
    # does in float64 (~215)
    narrow = has_base or rank < 16 or dtype.itemsize > 4
    overrides = _dense_tiles("gated_expand", given_tiles, T, N, E * rank, dtype)
    block_t = overrides.get("BLOCK_T") or 64
    block_n = overrides.get("BLOCK_N") or _pow2_block(N, 16, 64 if narrow else 128)
    aux_experts, lse_stride, count_kept, aux_dtype = aux if aux is not None else (E, 0, False, torch.float32)
    meta = dict(_dot_config_cached(dtype, tf32), SHARED_A=shared_a, HAS_BASE=has_base,
                HAS_BIAS=bias_stride is not None, TOP_K=top_k, BLOCK_T=block_t, BLOCK_N=block_n,
                BLOCK_C=overrides.get("BLOCK_C") or 16, RANK=_pow2_or_zero(rank), HAS_AUX=aux is not None,
                **_aux_meta(aux_experts, count_kept, aux_dtype, top_k))
    if not _INTERPRETING:
        meta.update(num_warps=4, num_stages=3) if narrow else meta.update(num_warps=8, num_stages=2)
    meta.update(_launch_options(overrides))
    fixed = (T, N, E * rank, rank, aux_experts, 1.0 / max(T, 1), *h_strides, *ids_strides, *w_strides, *b_strides,
             *(base_strides if base_strides is not None else out_strides),
             bias_stride if bias_stride is not None else out_strides[-1], *out_strides, lse_stride)
    grid = (max(1, cdiv(T, block_t)), max(1, cdiv(N, block_n)))
    return KernelLaunch(gated_expand_kernel, grid, fixed, **meta)


def gated_expand(h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, lora_b: torch.Tensor, *,
                 scaling: float, shared_a: bool, base: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                 compute_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None,
                 aux: Optional[RouterAux] = None, tiles: Optional[Dict[str, int]] = None):
    """y = base + bias + sum_e (s * G[:, e] * h_e) @ B[e]^T in one kernel, [T, d_out] in ``out_dtype``
    (default B's dtype); products in ``compute_dtype`` (default B's dtype), fp32 accumulation.

    With ``aux`` (a :class:`RouterAux`) the same launch computes the router's auxiliary loss:
    returns (y, loss 0-d, stats [2] = (lb, z) in lse's dtype, counts [E]), counts being the kept
    slots' (int64) when ``aux.count_kept``, else ``aux.counts``. ``tiles``: tile overrides instead
    of DENSE_CONFIGS' (tuning, tests)."""
    num_experts, N, rank = lora_b.shape
    T = h.shape[0]
    given_out = out is not None
    if out is None:
        out = torch.empty(T, N, dtype=out_dtype or lora_b.dtype, device=h.device)
    if aux is None and (T == 0 or N == 0):
        return out
    compute_dtype = compute_dtype or lora_b.dtype
    kernel = _gated_expand_launch(T, N, num_experts, rank, topk_ids.shape[1], shared_a, h.stride(), topk_ids.stride(),
                                  topk_weights.stride(), lora_b.stride(),
                                  (base.stride(0), base.stride(-1)) if base is not None else None,
                                  bias.stride(-1) if bias is not None else None,
                                  out.stride() if given_out else _contiguous(N), compute_dtype, _tf32(compute_dtype),
                                  None if aux is None else (aux.counts.shape[0], aux.lse.stride(0), aux.count_kept,
                                                            aux.lse.dtype),
                                  _tiles_key("gated_expand", tiles))
    # without aux, the aux loss's pointers and coefficients are placeholders
    aux_args, coefs = ((out,) * 6, (0.0,) * 4) if aux is None else _aux_args(aux)
    kernel(h, topk_ids, topk_weights, lora_b, base if base is not None else out, bias if bias is not None else out,
           out, *aux_args, *scale_factors(scaling), *coefs)
    return out if aux is None else (out, *aux_args[3:])


ROUTER_GRAD_MODES = {"softmax_topk": SOFTMAX_RENORMALIZED, "softmax_topk_plain": SOFTMAX_PLAIN,
                     "topk_softmax": TOPK_SOFTMAX, "threshold": SOFTMAX_RENORMALIZED}


class RouterGrad(NamedTuple):
    """What gate_backward needs to differentiate a router: logits [T, E] fp32, counts [E] (routed
    slots per expert; needed with g_aux only), the aux-loss gradient (0-d, or None), the mode
    (ROUTER_GRAD_MODES key) and the aux-loss coefficients."""

    logits: torch.Tensor
    counts: Optional[torch.Tensor]
    g_aux: Optional[torch.Tensor]
    mode: str
    lb_coef: float
    z_coef: float


def _router_rows(block_e: int) -> int:
    """Tokens per program of the kernels that differentiate a router (_router_backward): 32 (64 in
    the interpreter), fewer as the experts grow, so that its [tokens, BLOCK_E] tiles hold at most
    4096 values."""
    return max(1, min(64 if _INTERPRETING else 32, 4096 // block_e))


@functools.lru_cache(maxsize=4096)
def _gate_backward_launch(T: int, rank: int, top_k: int, E: int, shared_a: bool, router: int, has_aux: bool,
                          write_hg: bool, dtype: torch.dtype, dhg_strides: tuple, h_strides: tuple,
                          ids_strides: tuple, w_strides: tuple, dh_strides: tuple, second_strides: tuple,
                          logits_strides: tuple) -> KernelLaunch:
    """second: dw [T, k] (no router) or d logits [T, E]; logits_strides those of the router's logits
    (of dw without a router)."""
    block_e, block_r, block_k = _pow2_block(E, 1, 1 << 16), _pow2_block(rank, 1, 1 << 16), _routing_blocks(top_k)
    block_t = _router_rows(block_e) if router != NO_ROUTER else 64 if _INTERPRETING else 32
    meta = dict(SHARED_A=shared_a, ROUTER=router, HAS_AUX_GRAD=has_aux, WRITE_HG=write_hg, ACC=_TL_DTYPES[dtype],
                TOP_K=top_k, BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_E=block_e)
    if not _INTERPRETING:
        # Fewer tokens per program for wide ranks, many slots and float64 (half as many), and 8 warps from
        # rank 256: 32 tokens spill registers for sm_90 at r 256 (4 warps spill there at any BLOCK_T), with a
        # router at k 16 (Triton 3.9) and 64 (3.6), and in float64 (3.9; benchmarks/compile_kernels.py)
        block_t = max(1, min(block_t, 128 // dtype.itemsize, 16384 // (block_r * dtype.itemsize), 256 // block_k))
        if block_r >= 256:
            meta.update(num_warps=8)
    meta.update(BLOCK_T=block_t)
    sh_t, sh_r = h_strides
    hg_strides = _contiguous(E * rank) if write_hg else dh_strides
    fixed = (T, E, rank, 1.0 / T, *dhg_strides, sh_t, 0 if shared_a else rank * sh_r, sh_r, *ids_strides, *w_strides,
             *dh_strides, *second_strides, *logits_strides, *second_strides, *hg_strides)
    return KernelLaunch(gate_backward_kernel, (cdiv(T, block_t),), fixed, **meta)


def gate_backward(dhg: torch.Tensor, h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                  num_experts: int, rank: int, scaling: float, shared_a: bool,
                  router: Optional[RouterGrad] = None, dh: Optional[torch.Tensor] = None,
                  dw: Optional[torch.Tensor] = None, hg_dtype: Optional[torch.dtype] = None):
    """(dh, dw) without ``router``, (dh, d logits) with it; all fp32 (fp64 for fp64 h). With
    ``hg_dtype`` also the gated intermediate Hg [T, E*r] in that dtype: (dh, dw or d logits, Hg).

    dh is [T, r] (shared A) or [T, E*r]; dw [T, k]; d logits [T, E] includes the gradient of
    the router's auxiliary loss when ``router.g_aux`` is given.
    """
    T = h.shape[0]
    dh_cols = rank if shared_a else num_experts * rank
    dh_strides = dh.stride() if dh is not None else _contiguous(dh_cols)
    if dh is None:
        dh = torch.empty(T, dh_cols, dtype=h.dtype, device=h.device)
    if router is None:
        second_strides = dw.stride() if dw is not None else _contiguous(topk_ids.shape[1])
        if dw is None:
            dw = torch.empty(topk_ids.shape, dtype=h.dtype, device=h.device)
        second, logits, counts, g_aux = dw, dw, dw, dw
        logits_strides = second_strides
        mode, coefs, has_aux = NO_ROUTER, (0.0,) * 4, False
    else:
        logits, counts = router.logits, router.counts
        # read at unit stride; without g_aux (None allowed) logits are a placeholder: launches pass tensors only
        counts = counts.contiguous() if counts is not None else logits
        second = torch.empty(logits.shape, dtype=h.dtype, device=h.device)
        second_strides, logits_strides = _contiguous(logits.shape[1]), logits.stride()
        has_aux = router.g_aux is not None
        g_aux = router.g_aux if has_aux else logits
        mode, coefs = ROUTER_GRAD_MODES[router.mode], _coefs(router.lb_coef, router.z_coef, h.dtype)
    hg = torch.empty(T, num_experts * rank, dtype=hg_dtype, device=h.device) if hg_dtype is not None else None
    outputs = (dh, second) if hg is None else (dh, second, hg)
    if T == 0:
        return outputs
    kernel = _gate_backward_launch(T, rank, topk_ids.shape[1], num_experts, shared_a, mode, has_aux, hg is not None,
                                   h.dtype, dhg.stride(), h.stride(), topk_ids.stride(), topk_weights.stride(),
                                   dh_strides, second_strides, logits_strides)
    kernel(dhg, h, topk_ids, topk_weights, dh, second, logits, counts, g_aux, second, hg if hg is not None else dh,
           *scale_factors(scaling), *coefs)
    return outputs


@functools.lru_cache(maxsize=1024)
def _router_backward_launch(T: int, E: int, top_k: int, mode: int, has_aux: bool, stat_grads: bool,
                            dtype: torch.dtype, ids_strides: tuple, w_strides: tuple, dw_strides: tuple,
                            logits_strides: tuple, gps_stride: int, glse_stride: int) -> KernelLaunch:
    block_e = _pow2_block(E, 1, 1 << 16)
    block_t = _router_rows(block_e)
    meta = dict(ROUTER=mode, HAS_AUX_GRAD=has_aux, HAS_STAT_GRADS=stat_grads, ACC=_TL_DTYPES[dtype], TOP_K=top_k,
                BLOCK_K=_routing_blocks(top_k), BLOCK_T=block_t, BLOCK_E=block_e)
    fixed = (T, E, 1.0 / T, *ids_strides, *w_strides, *dw_strides, *logits_strides, gps_stride, glse_stride,
             *_contiguous(E))
    return KernelLaunch(router_backward_kernel, (cdiv(T, block_t),), fixed, **meta)


def router_backward(dw: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, router: RouterGrad, *,
                    g_prob_sums: Optional[torch.Tensor] = None, g_lse: Optional[torch.Tensor] = None,
                    out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """d logits [T, E] (``out_dtype``, default the logits' accumulator dtype) from the gradient of
    the routing weights dw [T, k] and, with ``router.g_aux``, of the aux loss, or with
    ``g_prob_sums`` [E] and ``g_lse`` [T] (both given) of the routing op's prob_sums and lse:
    gate_backward's router part, for the grouped regime (whose dh GEMM gives dw) and the routing
    op's backward."""
    logits = router.logits
    T, E = logits.shape
    acc = accumulator_dtype(logits.dtype)
    dl = torch.empty(T, E, dtype=out_dtype or acc, device=logits.device)
    if T == 0:
        return dl
    has_aux, stat_grads = router.g_aux is not None, g_prob_sums is not None
    if stat_grads != (g_lse is not None):
        raise ValueError("g_prob_sums and g_lse go together (zeros for the one without a gradient)")
    kernel = _router_backward_launch(T, E, topk_ids.shape[1], ROUTER_GRAD_MODES[router.mode], has_aux, stat_grads, acc,
                                     topk_ids.stride(), topk_weights.stride(), dw.stride(), logits.stride(),
                                     g_prob_sums.stride(0) if stat_grads else 0, g_lse.stride(0) if stat_grads else 0)
    kernel(topk_ids, topk_weights, dw, logits, router.counts.contiguous() if has_aux else logits,  # unit stride
           router.g_aux if has_aux else logits, g_prob_sums if stat_grads else logits,
           g_lse if stat_grads else logits, dl, *_coefs(router.lb_coef, router.z_coef, acc))
    return dl


_REDUCE_BLOCK = 1024


@functools.lru_cache(maxsize=4096)
def _weight_grad_launch(T: int, d_out: int, d_in: int, R: int, E: int, NB: int, rank: int, device: torch.device,
                        dtype: torch.dtype, acc: torch.dtype, tf32: bool, splits: Optional[int], dy_strides: tuple,
                        x_strides: tuple, hg_strides: tuple, dh_strides: tuple, dl_strides: tuple,
                        db_strides: tuple, da_strides: tuple, dr_strides: tuple, mask_strides: Optional[tuple],
                        jitter_strides: Optional[tuple], given_tiles: tuple):
    """(KernelLaunch of lora_weight_grad_kernel, of the split reduction or None, partials' length).

    Default tiles: 64 rows of d_out / d_in with 8 warps, T split so that every SM gets about two
    programs (``splits`` forces a number: tests). Every row tile reads all of its T-slice of the
    narrow operand (Hg [T, E*r] for dB, [dh | dlogits] for dA), so halving the rows per tile
    doubles that traffic (at S1 32-row tiles read Hg 128 times: 256 MB); splitting T fills
    the device instead, for a few MB of partials. The tile table (tune_dense) may say otherwise."""
    overrides = _dense_tiles("lora_weight_grad", given_tiles, T, d_out, NB, dtype)
    # At most 128 columns of dB and 64 of [dA | dW_router] per tile: wider tiles need more shared
    # memory than an SM has (256 x 256: 319 KB for sm_90), so wide layers take several tiles; 32 of
    # [dA | dW_router] for 4-byte operands and 64 of dB for 8-byte ones (wider: ~170 registers with 8
    # warps, one program per SM for sm_90).
    block_cb = overrides.get("BLOCK_CB") or _pow2_block(NB, 16, 128 if dtype.itemsize <= 4 else 64)
    block_ca = overrides.get("BLOCK_CA") or _pow2_block(R + E, 16, 64 if dtype.itemsize <= 2 else 32)
    # 16 tokens per step for 4-byte operands (fp32 layers): 64 spill registers for sm_90
    block_t = overrides.get("BLOCK_T") or (32 if _INTERPRETING else 64 if dtype.itemsize <= 2 else 16)
    tiles_b_c, tiles_a_c = cdiv(NB, block_cb), cdiv(R + E, block_ca)
    block_m = overrides.get("BLOCK_M") or 64
    n_tiles = cdiv(d_out, block_m) * tiles_b_c + cdiv(d_in, block_m) * tiles_a_c
    if splits is None:
        splits = _split_count(n_tiles, T, device)
    t_per_split = cdiv(cdiv(T, splits), block_t) * block_t
    splits = max(1, cdiv(T, t_per_split))
    meta = dict(_dot_config_cached(dtype, tf32), HAS_ROUTER=E > 0, HAS_MASK=mask_strides is not None,
                HAS_JITTER=jitter_strides is not None, SPLIT=splits > 1, BLOCK_M=block_m, BLOCK_CB=block_cb,
                BLOCK_CA=block_ca, BLOCK_T=block_t)
    if not _INTERPRETING:
        meta.update(num_warps=8)
    meta.update(_launch_options(overrides))
    tiles_b = cdiv(d_out, block_m) * tiles_b_c
    part_a_offset = splits * d_out * NB
    fixed = (T, d_out, d_in, R, E, NB, rank, tiles_b, tiles_b_c, tiles_a_c, t_per_split, part_a_offset,
             *dy_strides, *x_strides, *hg_strides, *dh_strides, *dl_strides, *db_strides, *da_strides, *dr_strides,
             *(mask_strides or (0, 0)), *(jitter_strides or (0, 0)))
    main = KernelLaunch(lora_weight_grad_kernel, (n_tiles * splits,), fixed, **meta)
    if splits == 1:
        return main, None, 0
    blocks_b = cdiv(d_out * NB, _REDUCE_BLOCK)
    blocks_a = cdiv((R + E) * d_in, _REDUCE_BLOCK)
    reduce = KernelLaunch(lora_weight_grad_reduce_kernel, (blocks_b + blocks_a,),
                          (d_out, d_in, R, E, NB, rank, splits, blocks_b, part_a_offset, *db_strides, *da_strides,
                           *dr_strides), HAS_ROUTER=E > 0, ACC_DTYPE=_TL_DTYPES[acc], BLOCK=_REDUCE_BLOCK)
    return main, reduce, part_a_offset + splits * (R + E) * d_in


def lora_weight_grad(dy: torch.Tensor, x: torch.Tensor, hg: torch.Tensor, dh: torch.Tensor,
                     dlogits: Optional[torch.Tensor], *, rank: int, scaling: float, dlora_b: torch.Tensor,
                     dlora_a: torch.Tensor, drouter: Optional[torch.Tensor] = None,
                     mask: Optional[torch.Tensor] = None, mask_scale: float = 1.0,
                     jitter: Optional[torch.Tensor] = None, splits: Optional[int] = None,
                     tiles: Optional[Dict[str, int]] = None) -> None:
    """Writes dlora_b [E, d_out, r] = s_out * (dy^T Hg) in B's layout (Hg [T, E*r] from
    gate_backward, which holds the rest of the scale ``scaling``), dlora_a [R, d_in] = dh^T x (a
    view of A's gradient as A_rows; with a bool ``mask`` [T, d_in], LoRA dropout's, dh^T x_lora
    for x_lora = mask_scale * x (.) mask) and drouter [E, d_in] = dlogits^T x (x (.) ``jitter``
    with router jitter's [T, d_in] factors), in their own dtypes,
    from one kernel (plus a fixed-order reduction of the splits of T when the device needs
    them; ``splits`` forces their number; ``tiles``: tile overrides instead of DENSE_CONFIGS')."""
    T, d_out = dy.shape
    d_in = x.shape[1]
    R = dh.shape[1]
    E = drouter.shape[0] if drouter is not None else 0
    NB = dlora_b.shape[0] * rank
    if T == 0:
        dlora_b.zero_()
        dlora_a.zero_()
        if drouter is not None:
            drouter.zero_()
        return
    dl = dlogits if dlogits is not None else dh
    dr = drouter if drouter is not None else dlora_a
    jitter = jitter if E > 0 else None  # it scales the router's input only
    acc = accumulator_dtype(x.dtype)
    kernel, reduce, part_length = _weight_grad_launch(
        T, d_out, d_in, R, E, NB, rank, x.device, x.dtype, acc, _tf32(x.dtype), splits, dy.stride(), x.stride(),
        hg.stride(), dh.stride(), dl.stride(), dlora_b.stride(), dlora_a.stride(), dr.stride(),
        mask.stride() if mask is not None else None, jitter.stride() if jitter is not None else None,
        _tiles_key("lora_weight_grad", tiles))
    part = torch.empty(part_length, dtype=acc, device=x.device) if reduce is not None else dh
    kernel(dy, x, hg, dh, dl, dlora_b, dlora_a, dr, part, mask if mask is not None else dh,
           jitter if jitter is not None else dh, scale_factors(scaling)[1], float(mask_scale))
    if reduce is not None:
        reduce(part, dlora_b, dlora_a, dr)


@functools.lru_cache(maxsize=4096)
def _threshold_launch(T: int, n: int, p_strides: tuple, noise_strides: Optional[tuple], ramp_steps: int,
                      dtype: torch.dtype) -> KernelLaunch:
    """``ramp_steps``: the eps schedule's ramp, 0 for none (eps_end throughout)."""
    block_t = 128
    return KernelLaunch(threshold_weights_kernel, (cdiv(T, block_t),),
                        (T, max(ramp_steps, 1), *p_strides, *(noise_strides or p_strides), *_contiguous(n)),
                        HAS_NOISE=noise_strides is not None, HAS_RAMP=ramp_steps > 0, TOP_K=n,
                        ACC=_TL_DTYPES[accumulator_dtype(dtype)], BLOCK_T=block_t, BLOCK_K=next_power_of_2(n))


def threshold_weights(top_p: torch.Tensor, noise: Optional[torch.Tensor], num_steps: Optional[torch.Tensor], *,
                      eps_start: float, eps_end: float, ramp_steps: int) -> torch.Tensor:
    """ST-MoE threshold routing's kept, renormalised weights [T, n] from the top-n probabilities,
    in one kernel (see threshold_weights_kernel), computed in top_p's accumulator dtype (fp64 for
    fp64 probabilities); the eps schedule is read on the device."""
    T, n = top_p.shape
    w = torch.empty(T, n, dtype=top_p.dtype, device=top_p.device)
    if T == 0:
        return w
    ramp = ramp_steps if ramp_steps > 0 and num_steps is not None else 0
    kernel = _threshold_launch(T, n, top_p.stride(), noise.stride() if noise is not None else None, ramp, top_p.dtype)
    kernel(top_p, noise if noise is not None else top_p, num_steps if ramp else top_p, w, float(eps_start),
           float(eps_end))
    return w


# ------------------------------------------------------- grouped GEMMs over expert-sorted rows
#
# Row space (moelora/kernels/grouped.py): the pairs sorted by expert, each expert's segment
# padded to the layout block; ``meta`` is the DispatchMetadata of moelora.ops.routing built with
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


MANY_ROWS = 256  # rows (token, slot pairs) per expert from which the row class is "many"


def many_rows(pairs: int, experts: int) -> bool:
    """The row class of a grouped layout of ``pairs`` (token, slot) pairs over ``experts``:
    MANY_ROWS or more per expert. A comparison of ints, taken as a branch: under torch.compile
    with dynamic shapes it guards on the class, not on the token count."""
    return True if pairs >= MANY_ROWS * max(experts, 1) else False


def grouped_shape_class(kernel: str, n: int, k: int, many: bool) -> str:
    """Key of GROUPED_CONFIGS: ``kernel:<n><k>:<rows>``.

    kernel "matmul" (n = output columns N, k = reduction K) or "wgrad" (n, k = the two
    output dims NA, NB); widths s (<= 64), m (<= 256), l; rows per expert "few" (< 256) or
    "many" (``many``: many_rows). E.g. S5's FFN projections are ``matmul:ll:many``, S3's h @ B is ``matmul:ls:many``,
    its dh = dy @ B ``matmul:sl:many`` and dB ``wgrad:ls:many``.
    """
    rows = "many" if many else "few"
    return f"{kernel}:{_width_class(n)}{_width_class(k)}:{rows}"


# Tile configs by shape class, measured on Hopper (H100/H200, bf16) by
# ``python -m benchmarks.tune_grouped`` (paste its "configs" output here). Classes not listed
# use _default_config; the interpreter always uses _interpreter_config. Entries: H200, Triton 3.6
# (benchmarks/results/tune-grouped-nvidia-h200-20261128T190225.json; median ms, and torch's
# grouped_mm on the same GEMM).
GROUPED_CONFIGS: Dict[str, TileConfig] = {
    "matmul:ll:many": TileConfig(128, 128, 64, 8, 8, 3),  # 3.588 ms, grouped_mm 2.850 ms
    "wgrad:ll:many": TileConfig(128, 128, 64, 8, 8, 3),  # 3.134 ms, grouped_mm 1.649 ms
    "matmul:ls:many": TileConfig(64, 256, 64, 8, 4, 2),  # 0.741 ms, grouped_mm 0.426 ms
    "matmul:sl:many": TileConfig(128, 64, 64, 8, 4, 3),  # 0.245 ms, grouped_mm 0.384 ms
    "wgrad:ls:many": TileConfig(128, 64, 64, 8, 4, 3),  # 0.707 ms, grouped_mm 0.388 ms
}


def _default_config(kernel: str, n: int, k: int) -> TileConfig:
    if kernel == "matmul":
        return TileConfig(64, _pow2_block(n, 16, 128), _pow2_block(k, 16, 64), 8, 4, 3)
    return TileConfig(_pow2_block(n, 16, 64), _pow2_block(k, 16, 64), 32, 8, 4, 3)


def _interpreter_config(kernel: str, n: int, k: int) -> TileConfig:
    if kernel == "matmul":
        return TileConfig(32, _pow2_block(n, 16, 64), _pow2_block(k, 16, 32), 4, 1, 1)
    return TileConfig(_pow2_block(n, 16, 32), _pow2_block(k, 16, 32), 32, 4, 1, 1)


def grouped_config(kernel: str, n: int, k: int, many: bool) -> TileConfig:
    """The tiles for a grouped kernel on this shape: table entry, else the default."""
    if _INTERPRETING:
        return _interpreter_config(kernel, n, k)
    return GROUPED_CONFIGS.get(grouped_shape_class(kernel, n, k, many)) or _default_config(kernel, n, k)


def install_grouped_configs(configs: Dict[str, TileConfig]) -> None:
    """Add ``{shape class: TileConfig}`` entries to GROUPED_CONFIGS (e.g. a tune_grouped result);
    drops the launch configurations cached before."""
    GROUPED_CONFIGS.update({shape_class: TileConfig(*tiles) for shape_class, tiles in configs.items()})
    clear_launch_caches()


def _four_byte(cfg: TileConfig, compute_dtype: torch.dtype) -> TileConfig:
    """The table's tiles (sized for 2-byte operands) for ``compute_dtype``: with 4-byte operands
    (fp32) at most 32 x 64 with 32-deep steps and two stages, which sm_90 holds without spilling."""
    if compute_dtype.itemsize <= 2 or _INTERPRETING:
        return cfg
    return cfg._replace(block_m=min(cfg.block_m, 32), block_n=min(cfg.block_n, 64), block_k=min(cfg.block_k, 32),
                        num_stages=2)


@torch.compiler.assume_constant_result  # torch.compile takes the value instead of tracing the cache
def grouped_layout_block(matmul_shapes: tuple = (), many: bool = False) -> int:
    """Padding of the expert segments for the grouped_matmul launches of ``matmul_shapes``
    ((N, K) pairs) that will run over a layout of row class ``many`` (many_rows): the largest
    row tile of their tiles (each tile then lies in one expert; smaller tiles halve down to
    fit); 16 without any."""
    try:
        return _layout_block(matmul_shapes, many)
    except TypeError:  # symbolic sizes (fake tensors of dynamic shapes) are not hashable
        return _layout_block.__wrapped__(matmul_shapes, many)


@functools.lru_cache(maxsize=4096)
def _layout_block(matmul_shapes: tuple, many: bool) -> int:
    return max([16] + [grouped_config("matmul", n, k, many).block_m for n, k in matmul_shapes])


def _meta_args(meta) -> tuple:
    """What a grouped launch configuration takes from the layout: (top_k, layout block, pairs T*k,
    experts); the rows per expert (pairs / experts) pick the tile table's row class."""
    return meta.top_k, meta.block_size, meta.inverse_padded.numel(), meta.num_experts


@functools.lru_cache(maxsize=4096)
def _grouped_matmul_launch(num_rows: int, N: int, K: int, layout: tuple, a_strides: tuple, w_strides: tuple,
                           a2_strides: tuple, w2_strides: tuple, out_strides: tuple, scale_stride: int,
                           h_strides: tuple, a_by_token: bool, has_second: bool, has_scale: bool, gate_grad: bool,
                           h_by_token: bool, prescale: bool, dtype: torch.dtype, tf32: bool,
                           config: Optional[TileConfig]) -> KernelLaunch:
    """grouped_matmul_kernel's launch; ``layout`` = _meta_args, w_strides = (e, n, k) strides."""
    top_k, layout_block, pairs, experts = layout
    cfg = config or _four_byte(grouped_config("matmul", N, K, many_rows(pairs, experts)), dtype)
    block_m, block_n = cfg.block_m, cfg.block_n
    while layout_block % block_m:  # a row tile must lie in one expert's segment
        block_m //= 2
    if block_m < 16:
        raise ValueError(f"the layout block must be a multiple of 16 rows, got {layout_block}")
    if gate_grad:
        block_n = _pow2_block(N, 16, 1 << 16)  # the row dot needs every column in one tile
    fixed = (num_rows, N, K, top_k, layout_block, *a_strides, *w_strides, *a2_strides, *w2_strides, *out_strides,
             scale_stride, *h_strides)
    return KernelLaunch(grouped_matmul_kernel, (num_rows // block_m * cdiv(N, block_n),), fixed,
                        A_BY_TOKEN=a_by_token, HAS_SECOND=has_second, HAS_SCALE=has_scale, GATE_GRAD=gate_grad,
                        H_BY_TOKEN=h_by_token, PRESCALE=prescale, **_dot_config_cached(dtype, tf32),
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def grouped_matmul(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, meta, *, a_by_token: bool,
                   weight_nk_strides: tuple, compute_dtype: torch.dtype, alpha: float = 1.0,
                   scale: Optional[torch.Tensor] = None, second: Optional[tuple] = None,
                   gate_grad: Optional[tuple] = None, config: Optional[TileConfig] = None) -> torch.Tensor:
    """out[r] = scale[p] * alpha * (a[row(r)] @ W[e]^T (+ a2[row(r)] @ W2[e]^T)) over the rows of ``meta``.

    ``out`` [R, N] (R = rows of the layout); ``weight`` [E, ...] with ``weight_nk_strides``
    addressing W[e] as [N, K]; row(r) = the token of row r's pair (``a_by_token``) or r.
    ``second`` = (a2, weight2, weight2_nk_strides), same row rule and K. ``gate_grad`` =
    (h, h_by_token, dw): also dw[p] = <alpha * (a @ W^T)[r], h[row(r)]> (dw flat over pairs).
    Rows without a pair (padding, unused tail) get zeros. ``alpha`` outside fp32's range is
    applied in two factors (scale_factors), the first to a's tiles; so is any ``alpha`` where
    ``a`` is wider than ``compute_dtype`` (fp32 h for fp16 products: alpha * h is rounded, not h,
    which may lie outside fp16's range where alpha * h does not). Returns ``out``.
    """
    num_rows, N = out.shape
    if num_rows == 0 or N == 0:
        return out
    a2, w2, w2_nk = second if second is not None else (a, weight, weight_nk_strides)
    h, h_by_token, dw = gate_grad if gate_grad is not None else (out, False, out)
    scale_arg = scale if scale is not None else out
    prescale = alpha != 1.0 and a.dtype.itemsize > compute_dtype.itemsize
    alpha, alpha_out = scale_factors(alpha)
    prescale = prescale or alpha_out != 1.0
    kernel = _grouped_matmul_launch(
        num_rows, N, a.shape[1], _meta_args(meta), a.stride(), (weight.stride(0), *weight_nk_strides), a2.stride(),
        (w2.stride(0), *w2_nk), out.stride(), scale.stride(0) if scale is not None else 0, h.stride(), a_by_token,
        second is not None, scale is not None, gate_grad is not None, h_by_token, prescale, compute_dtype,
        _tf32(compute_dtype), config)
    kernel(a, weight, a2, w2, out, meta.sorted_pairs_padded, meta.block_expert, scale_arg, h, dw, alpha, alpha_out)
    return out


@functools.lru_cache(maxsize=4096)
def _grouped_weight_grad_launch(NA: int, NB: int, layout: tuple, l_strides: tuple, r_strides: tuple,
                                out_strides: Optional[tuple], scale_stride: int, l_by_token: bool, r_by_token: bool,
                                r_ones: bool, has_scale: bool, dtype: torch.dtype, tf32: bool, device: torch.device,
                                config: Optional[TileConfig]) -> tuple:
    """(grouped_weight_grad_kernel's launch, splits); ``out_strides``: those of the [E, NA, NB]
    output written directly (one split), None for a new contiguous one."""
    top_k, _, pairs, E = layout
    cfg = config or _four_byte(grouped_config("wgrad", NA, NB, many_rows(pairs, E)), dtype)
    tiles = cdiv(NA, cfg.block_m) * cdiv(NB, cfg.block_n)
    splits = _split_count(E * tiles, pairs // max(E, 1), device)
    if splits > 1:  # fp32 partials [splits, E, NA, NB]
        partial_strides = (E * NA * NB, NA * NB, NB, 1)
    else:  # the output itself, as [1, E, NA, NB]
        partial_strides = (0, *(out_strides or (NA * NB, NB, 1)))
    fixed = (NA, NB, top_k, splits, *l_strides, *r_strides, *partial_strides, scale_stride)
    launch = KernelLaunch(grouped_weight_grad_kernel, (E * splits * tiles,), fixed, L_BY_TOKEN=l_by_token,
                          R_BY_TOKEN=r_by_token, R_ONES=r_ones, HAS_SCALE=has_scale, **_dot_config_cached(dtype, tf32),
                          BLOCK_A=cfg.block_m, BLOCK_B=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_A=cfg.group,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return launch, splits


def grouped_weight_grad(left: torch.Tensor, right: Optional[torch.Tensor], meta, *, left_by_token: bool,
                        right_by_token: bool, compute_dtype: torch.dtype, out_dtype: torch.dtype,
                        alpha: float = 1.0, scale: Optional[torch.Tensor] = None,
                        out: Optional[torch.Tensor] = None, config: Optional[TileConfig] = None) -> torch.Tensor:
    """[E, NA, NB]: per expert e, alpha * sum over its rows r of left[row(r)]^T (scale[p] * right[row(r)]).

    row(r) as in grouped_matmul; ``right`` None: a column of ones (NB = 1: per-expert row sums).
    The sum runs in row order (fixed-order fp32 slices when the rows are split over programs):
    deterministic; experts without rows get exact zeros.
    """
    ones = right is None
    right = left if ones else right  # placeholder pointer, unread
    NA, NB = left.shape[1], 1 if ones else right.shape[1]
    E = meta.num_experts
    kernel, splits = _grouped_weight_grad_launch(
        NA, NB, _meta_args(meta), left.stride(), (0, 0) if ones else right.stride(),
        out.stride() if out is not None else None, scale.stride(0) if scale is not None else 0, left_by_token,
        right_by_token, ones, scale is not None, compute_dtype, _tf32(compute_dtype), left.device, config)
    if out is None:
        out = torch.empty(E, NA, NB, dtype=out_dtype, device=left.device)
    if splits == 1:
        partial = out
    else:
        partial = torch.empty(splits, E, NA, NB, dtype=accumulator_dtype(compute_dtype), device=left.device)
    kernel(left, right, partial, meta.sorted_pairs_padded, meta.padded_offsets, meta.counts,
           scale if scale is not None else partial, *scale_factors(alpha))
    if splits > 1:
        out.copy_(partial.sum(0))
    return out


def segment_sum(rows: torch.Tensor, meta, *, out_dtype: torch.dtype) -> torch.Tensor:
    """[E, N]: per expert, the fixed-order sum of its rows of ``rows`` [R, N] (bias gradients)."""
    return grouped_weight_grad(rows, None, meta, left_by_token=False, right_by_token=False,
                               compute_dtype=rows.dtype, out_dtype=out_dtype).squeeze(2)


@functools.lru_cache(maxsize=4096)
def _combine_rows_launch(T: int, N: int, top_k: int, rows_strides: tuple, second_strides: tuple,
                         inverse_strides: tuple, coef_strides: tuple, ids_strides: tuple, bias_strides: tuple,
                         base_strides: tuple, out_strides: tuple, has_second: bool, has_coef: bool, anchored: bool,
                         has_bias: bool, has_base: bool, acc_dtype: torch.dtype) -> KernelLaunch:
    block_t, block_n = 32, _pow2_block(N, 16, 128)
    fixed = (T, N, *rows_strides, *second_strides, *inverse_strides, *coef_strides, *ids_strides, *bias_strides,
             *base_strides, *out_strides)
    return KernelLaunch(combine_rows_kernel, (cdiv(T, block_t), cdiv(N, block_n)), fixed, TOP_K=top_k,
                        HAS_SECOND=has_second, HAS_COEF=has_coef, ANCHORED=anchored, HAS_BIAS=has_bias,
                        HAS_BASE=has_base, ACC_DTYPE=_TL_DTYPES[acc_dtype], BLOCK_T=block_t, BLOCK_N=block_n)


def combine_rows(rows: torch.Tensor, meta, *, out_dtype: torch.dtype, coef: Optional[torch.Tensor] = None,
                 anchored: bool = False, bias: Optional[tuple] = None, base: Optional[torch.Tensor] = None,
                 second: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[t] = base[t] + z_a + sum_j coef[t, j] (z_j - z_a) in slot order (see combine_rows_kernel).

    z_j = rows[inverse[t, j]] (+ second[...]) (+ bias_e[ids[t, j]] for ``bias`` = (ids, bias_e)),
    zero for pairs outside the layout (their coef unread); z_a = z_0 when ``anchored``, else 0;
    coef [T, k] or 1.
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
    kernel = _combine_rows_launch(T, N, top_k, rows.stride(), second_arg.stride(), inverse.stride(),
                                  coef_arg.stride(), ids.stride(), bias_e.stride(), base_arg.stride(), out.stride(),
                                  second is not None, coef is not None, anchored, bias is not None, base is not None,
                                  accumulator_dtype(out_dtype))
    kernel(rows, second_arg, inverse, coef_arg, ids, bias_e, base_arg, out)
    return out


@functools.lru_cache(maxsize=4096)
def _combine_rows_backward_launch(num_rows: int, N: int, top_k: int, dy_strides: tuple, rows_strides: tuple,
                                  ids_strides: tuple, bias_strides: tuple, has_bias: bool, need_g: bool,
                                  acc_dtype: torch.dtype) -> KernelLaunch:
    block_r = 32 if _INTERPRETING else 16
    fixed = (num_rows, N, top_k, *dy_strides, *rows_strides, *ids_strides, *bias_strides, *_contiguous(N))
    return KernelLaunch(combine_rows_backward_kernel, (cdiv(num_rows, block_r),), fixed, HAS_BIAS=has_bias,
                        NEED_G=need_g, ACC_DTYPE=_TL_DTYPES[acc_dtype], BLOCK_R=block_r,
                        BLOCK_N=_pow2_block(N, 16, 256))


def combine_rows_backward(dy: torch.Tensor, rows: torch.Tensor, meta, ids: torch.Tensor, row_coef: torch.Tensor,
                          *, bias: Optional[torch.Tensor] = None, need_g: bool = True):
    """(drows [R, N] in dy's dtype, g [T*k] accumulator dtype): drows[r] = row_coef[p] * dy[t],
    g[p] = <dy[t], rows[r] + bias[ids[t, j]]> for the pair p = t*k + j of row r (unwritten
    where the pair has no row); ``row_coef`` flat over the pairs (the kernel reads it at unit
    stride: a strided one is copied)."""
    num_rows, N = rows.shape
    acc = accumulator_dtype(dy.dtype)
    drows = torch.empty(num_rows, N, dtype=dy.dtype, device=dy.device)
    g = torch.empty(ids.numel() if need_g else 0, dtype=acc, device=dy.device)
    if num_rows == 0:
        return drows, g
    bias_arg = bias if bias is not None else rows
    kernel = _combine_rows_backward_launch(num_rows, N, meta.top_k, dy.stride(), rows.stride(), ids.stride(),
                                           bias_arg.stride(), bias is not None, need_g, acc)
    kernel(dy, rows, ids, bias_arg, row_coef.contiguous(), meta.sorted_pairs_padded, drows,  # unit stride
           g if need_g else drows)
    return drows, g


@functools.lru_cache(maxsize=4096)
def _glu_launch(backward: bool, num_rows: int, F: int, top_k: int, strides: tuple, gated: bool, has_bg: bool,
                has_bu: bool, act: int, acc_dtype: torch.dtype) -> KernelLaunch:
    """glu_forward_kernel's or glu_backward_kernel's launch; ``strides``: all the kernel's, in order."""
    block_r, block_f = 32, _pow2_block(F, 16, 128)
    return KernelLaunch(glu_backward_kernel if backward else glu_forward_kernel,
                        (cdiv(num_rows, block_r), cdiv(F, block_f)), (num_rows, F, top_k, *strides), GATED=gated,
                        HAS_BG=has_bg, HAS_BU=has_bu, ACT=act, ACC_DTYPE=_TL_DTYPES[acc_dtype], BLOCK_R=block_r,
                        BLOCK_F=block_f)


def _glu_operands(hg, hu, bg, bu, ids) -> tuple:
    """(gate, bg, bu) with placeholders for the absent ones, and their strides with hu's and ids'
    in the kernels' order."""
    gate = hg if hg is not None else hu
    bg_arg = bg if bg is not None else hu
    bu_arg = bu if bu is not None else hu
    return (gate, bg_arg, bu_arg,
            (*gate.stride(), *hu.stride(), *bg_arg.stride(), *bu_arg.stride(), *ids.stride()))


def glu_forward(hg: Optional[torch.Tensor], hu: torch.Tensor, bg: Optional[torch.Tensor], bu: Optional[torch.Tensor],
                meta, ids: torch.Tensor, act: int) -> torch.Tensor:
    """[R, F]: act(hg + bg[e]) * (hu + bu[e]) per row (act(hu + bu[e]) without hg), 0 on padding
    rows; e the expert of the row's pair in ``ids`` [T, k]; ``act`` a code of moelora.kernels.grouped."""
    num_rows, F = hu.shape
    out = torch.empty(num_rows, F, dtype=hu.dtype, device=hu.device)
    if num_rows == 0 or F == 0:
        return out
    gate, bg_arg, bu_arg, strides = _glu_operands(hg, hu, bg, bu, ids)
    kernel = _glu_launch(False, num_rows, F, meta.top_k, (*strides, *out.stride()), hg is not None, bg is not None,
                         bu is not None, act, accumulator_dtype(hu.dtype))
    kernel(gate, hu, bg_arg, bu_arg, out, meta.sorted_pairs_padded, ids)
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
    gate, bg_arg, bu_arg, strides = _glu_operands(hg, hu, bg, bu, ids)
    dhg_arg = dhg if dhg is not None else dhu
    kernel = _glu_launch(True, num_rows, F, meta.top_k, (*dout.stride(), *strides, *dhg_arg.stride(), *dhu.stride()),
                         hg is not None, bg is not None, bu is not None, act, accumulator_dtype(hu.dtype))
    kernel(dout, gate, hu, bg_arg, bu_arg, dhg_arg, dhu, meta.sorted_pairs_padded, ids)
    return dhg, dhu


@functools.lru_cache(maxsize=4096)
def _mixing_launch(backward: bool, T: int, top_k: int, E: int, ids_strides: tuple, w_strides: tuple,
                   dw_strides: tuple, normalize: bool, acc_dtype: torch.dtype) -> KernelLaunch:
    """mixing_weights_kernel's or mixing_weights_backward_kernel's launch."""
    block_k = next_power_of_2(top_k)
    block_t = max(16, 2048 // block_k)
    fixed = (T, E, *ids_strides, *w_strides, *dw_strides)
    return KernelLaunch(mixing_weights_backward_kernel if backward else mixing_weights_kernel, (cdiv(T, block_t),),
                        fixed, TOP_K=top_k, NORMALIZE=normalize, TINY=torch.finfo(acc_dtype).tiny,
                        ACC_DTYPE=_TL_DTYPES[acc_dtype], BLOCK_T=block_t, BLOCK_K=block_k)


def mixing_weights(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, normalize: bool):
    """(ids, coef, row_coef) of a routed FFN's mix, each [T, k] (see mixing_weights_kernel): the
    ids with -1 for skipped slots (weight 0 or id outside [0, num_experts)), the mixing
    coefficients in the accumulator dtype of the weights (divided by their sum with
    ``normalize``) and, with ``normalize``, the rows' coefficients in the anchored mix (else
    ``coef`` itself)."""
    T, top_k = topk_ids.shape
    acc = accumulator_dtype(topk_weights.dtype)
    ids = torch.empty(T, top_k, dtype=topk_ids.dtype, device=topk_ids.device)
    coef = torch.empty(T, top_k, dtype=acc, device=topk_ids.device)
    row_coef = torch.empty_like(coef) if normalize else coef
    if T:
        kernel = _mixing_launch(False, T, top_k, num_experts, topk_ids.stride(), topk_weights.stride(), (),
                                normalize, acc)
        kernel(topk_ids, topk_weights, ids, coef, row_coef)
    return ids, coef, row_coef


def mixing_weights_backward(g: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                            normalize: bool) -> torch.Tensor:
    """d topk_weights [T, k] (topk_weights' dtype) of mixing_weights and the combine, from
    g [T * k] = <dy[t], z_j> of each slot's expert output (read for kept slots only; the kernel
    reads it at unit stride: a strided one is copied)."""
    T, top_k = topk_ids.shape
    dw = torch.empty(T, top_k, dtype=topk_weights.dtype, device=topk_weights.device)
    if T:
        kernel = _mixing_launch(True, T, top_k, num_experts, topk_ids.stride(), topk_weights.stride(), dw.stride(),
                                normalize, accumulator_dtype(topk_weights.dtype))
        kernel(g.contiguous(), topk_ids, topk_weights, dw)  # read at unit stride
    return dw


# Every cached launch configuration (dropped together when a tile table changes).
_LAUNCH_CACHES = (_matmul_launch, _lora_down_launch, _router_aux_loss_launch, _router_aux_loss_backward_launch,
                  _masked_router_aux_loss_launch, _masked_router_aux_loss_backward_launch, _gated_expand_launch,
                  _gate_backward_launch, _router_backward_launch, _weight_grad_launch, _threshold_launch,
                  _grouped_matmul_launch, _grouped_weight_grad_launch, _combine_rows_launch,
                  _combine_rows_backward_launch, _glu_launch, _mixing_launch, _layout_block)


def clear_launch_caches() -> None:
    """Drop every cached launch configuration (after a tile table or the interpreter switch changed)."""
    for cached in _LAUNCH_CACHES:
        cached.cache_clear()
