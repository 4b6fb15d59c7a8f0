"""The device's two ceilings, measured in the same run: copy bandwidth and matmul rate.

Copy: a large device-to-device copy, counting bytes read plus bytes written. Matmul:
an 8192^3 product in the run's dtype (bf16 by default) on random data. On CPU both are
measured at small sizes only so the derived metrics are defined; they are not a floor
worth quoting.
"""

from __future__ import annotations

import torch

from .timing import summarize, time_iterations


def measure(device: torch.device, dtype: torch.dtype, repeats: int = 20) -> dict:
    on_gpu = device.type == "cuda"
    copy_elems = (1 << 30) // 2 if on_gpu else (1 << 24)  # fp16: 1 GiB on GPU, 32 MiB on CPU
    src = torch.randn(copy_elems, device=device, dtype=torch.float32).to(torch.float16)
    dst = torch.empty_like(src)
    copy_times = (time_iterations(lambda i: dst.copy_(src), 3, device),
                  time_iterations(lambda i: dst.copy_(src), repeats, device))[1]
    copy = summarize(copy_times)
    moved = 2 * src.numel() * src.element_size()
    del src, dst

    n = 8192 if on_gpu else 512
    mm_dtype = dtype if on_gpu else torch.float32
    a = torch.randn(n, n, device=device, dtype=torch.float32).to(mm_dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(mm_dtype)
    time_iterations(lambda i: a @ b, 3, device)
    mm = summarize(time_iterations(lambda i: a @ b, repeats, device))
    del a, b
    return {
        "copy_bytes": moved,
        "copy_median_ms": copy["median_ms"],
        "copy_GBps": moved / (copy["median_ms"] * 1e-3) / 1e9,
        "matmul_n": n,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "matmul_median_ms": mm["median_ms"],
        "matmul_TFLOPs": 2 * n ** 3 / (mm["median_ms"] * 1e-3) / 1e12,
    }
