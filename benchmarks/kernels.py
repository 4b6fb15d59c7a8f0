"""Kernels per iteration of a case: device kernels seen by torch.profiler on CUDA (kernels,
memsets and copies); on CPU, ATen compute ops (moelora.profiling.count_kernels: views and
allocations are not counted, Triton launches would be counted without running)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from moelora.profiling import count_kernels


def per_iteration(step: Callable[[], object], device: torch.device) -> Optional[int]:
    """Kernels launched by one call of ``step`` (None when it cannot be counted here)."""
    try:
        if device.type != "cuda":
            with count_kernels() as counts:
                step()
            return counts.total
        torch.cuda.synchronize(device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # a profiler that cannot start here must not fail the case
        return None
