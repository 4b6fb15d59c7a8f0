"""Structure of a call without a GPU: kernels per call and host time per call.

:func:`count_kernels` runs a block with every Triton launch replaced by a counter (no kernel
runs, the launchers' outputs stay unwritten) and every ATen compute op counted by a
TorchDispatchMode. Views, allocations and metadata ops are not counted: they launch nothing.
Since moelora's paths never read device memory on the host, the sequence of launches does
not depend on the (unwritten) values, so the counts are those of a real GPU call; a native
op (``torch.ops.moelora.*``) counts as one, whatever number of kernels its CUDA version uses.

:func:`host_time` times the Python path of a call the same way (launches skipped):
what remains is moelora's own host work (each launch prepared up to the call into the compiled
kernel: see moelora.kernels.launchers.KernelLaunch) plus ATen's dispatch on tiny CPU tensors. On a GPU
machine each counted launch adds Triton's C launcher (measured by the benchmark).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moelora.kernels import launchers

_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "empty_permuted",
                "lift_fresh", "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
                "is_same_size", "_local_scalar_dense",
                "_unsafe_view"}  # a view that autograd does not track as one (reshape of a non-viewable result)


@dataclass
class KernelCounts:
    """Triton launches (kernel names in order) and ATen compute ops (op names in order)."""

    triton: List[str] = field(default_factory=list)
    aten: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.triton) + len(self.aten)

    def __str__(self) -> str:
        return f"{self.total} kernels ({len(self.triton)} Triton: {self.triton}; {len(self.aten)} ATen: {self.aten})"


class _AtenCounter(TorchDispatchMode):
    def __init__(self, ops: List[str]):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in _ALLOCATIONS or name.startswith("detach")):
            self.ops.append(f"{func.namespace}.{name}" if func.namespace != "aten" else name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_kernels():
    """``with count_kernels() as counts: ...``: the block's Triton launches are counted instead
    of run, its ATen compute ops counted as they run (up to the exception where the block
    raises); see the module docstring."""
    counts = KernelCounts()
    calls: List[tuple] = []
    try:
        with launchers.count_launches() as calls, _AtenCounter(counts.aten):
            yield counts
    finally:
        counts.triton.extend(name for name, _ in calls)


def host_time(fn: Callable[[], object], iterations: int = 50, warmup: int = 10) -> float:
    """Median host seconds of ``fn()`` with Triton launches skipped (one CPU thread)."""
    times = []
    # Unwritten outputs hold arbitrary bits: subnormal floats would make the CPU's ATen ops
    # orders of magnitude slower than on real data.
    flushed = torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a thread pool only adds waiting on a shared machine
    try:
        with launchers.skip_launches():
            for i in range(warmup + iterations):
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)
    times.sort()
    return times[len(times) // 2]
