"""Timing primitives: per-iteration device timers, robust statistics, a run-wide budget.

On CUDA each iteration is bracketed by a pair of CUDA events on the current stream
(asynchronous launches, one synchronize at the end); on CPU by ``time.perf_counter``.
Inputs are rotated by the caller so that consecutive iterations touch different memory.
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(step: Callable[[int], object], iterations: int, device: torch.device,
                    start: int = 0, host_ms: Optional[List[float]] = None) -> List[float]:
    """Run ``step(i)`` for i in [start, start + iterations); return each one's time in ms.

    With ``host_ms`` (a list) each iteration's host enqueue time is appended to it: the host
    clock from the call to its return, without waiting for the device (on CUDA the device is
    synchronised before each iteration, so the launch queue starts empty)."""
    if iterations <= 0:
        return []
    if device.type == "cuda":
        begin = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]
        for n in range(iterations):
            if host_ms is not None:
                torch.cuda.synchronize(device)
            begin[n].record()
            t0 = time.perf_counter()  # the host clock around the call alone, not the event records
            step(start + n)
            if host_ms is not None:
                host_ms.append((time.perf_counter() - t0) * 1e3)
            end[n].record()
        torch.cuda.synchronize(device)
        return [b.elapsed_time(e) for b, e in zip(begin, end)]
    times = []
    for n in range(iterations):
        t0 = time.perf_counter()
        step(start + n)
        times.append((time.perf_counter() - t0) * 1e3)
    if host_ms is not None:
        host_ms.extend(times)
    return times


HOST_REPEATS = 10  # iterations of the host enqueue timing on CUDA (each after a synchronize)


def time_eager(step: Callable[[int], object], iterations: int, device: torch.device, start: int = 0,
               host_repeats: int = HOST_REPEATS) -> Tuple[List[float], List[float]]:
    """(per-iteration times, host enqueue times) in ms of ``step(i)`` in eager mode.

    The timed iterations are launched back to back, as eager training runs them (the host
    enqueues the next iteration while the device runs this one), so a host-bound step is timed
    at its host cost and a device-bound one at its device time. On CUDA the host enqueue time
    comes from ``min(iterations, host_repeats)`` further iterations, each after a synchronize
    (the launch queue empty): synchronising between the timed iterations would add the host's
    latency to the first launch to every one of them. On CPU both are the same wall times."""
    times = time_iterations(step, iterations, device, start=start)
    if device.type != "cuda":
        return times, list(times)
    host: List[float] = []
    time_iterations(step, min(iterations, host_repeats), device, start=start + iterations, host_ms=host)
    return times, host


def summarize(times_ms: Sequence[float]) -> dict:
    """Median, quartiles and IQR (ms) of a list of timings."""
    if not times_ms:
        return {"n": 0}
    ordered = sorted(times_ms)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "n": len(ordered),
        "median_ms": statistics.median(ordered),
        "q25_ms": q1,
        "q75_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
    }


def adaptive_repeats(estimate_ms: float, repeats: int, min_repeats: int, case_cap_s: float) -> int:
    """Repeats so that one case's timed loop stays near ``case_cap_s`` (never under min)."""
    if estimate_ms <= 0:
        return repeats
    fit = int(case_cap_s * 1e3 / estimate_ms)
    return max(min_repeats, min(repeats, fit))


class Budget:
    """Wall-clock budget for the whole run; cases check ``exhausted()`` before starting."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        if self.seconds is None:
            return float("inf")
        return self.seconds - self.elapsed()

    def exhausted(self) -> bool:
        return self.remaining() <= 0


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` iterations after one untimed call: on
    CUDA, event pairs around calls launched back to back, so a call whose host launch cost
    exceeds its device time is timed at its host cost (what eager mode pays)."""
    fn()
    return summarize(time_iterations(lambda i: fn(), repeats, device))["median_ms"]


_L2_FLUSH_BYTES = 256 << 20  # more than any GPU's L2 (H100 / H200: 50 MB), as triton.testing.do_bench flushes
_SLEEP_CALIBRATION_CYCLES = 20_000_000
_DEVICE_CHUNK = 8  # iterations enqueued behind one sleep (a few hundred launches at most: the queue has room)
_MAX_SLEEP_MARGIN = 64.0
_flush_buffers: Dict[int, torch.Tensor] = {}
_sleep_cycles_per_ms: Dict[int, float] = {}


def _cycles_per_ms(index: int) -> float:
    """How many cycles of ``torch.cuda._sleep`` last a millisecond on device ``index`` (measured once)."""
    if index not in _sleep_cycles_per_ms:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(index)
        begin.record()
        torch.cuda._sleep(_SLEEP_CALIBRATION_CYCLES)
        end.record()
        end.synchronize()
        _sleep_cycles_per_ms[index] = _SLEEP_CALIBRATION_CYCLES / max(begin.elapsed_time(end), 1e-3)
    return _sleep_cycles_per_ms[index]


def device_median_ms(fn: Callable[[], object], repeats: int, device: torch.device, flush_l2: bool = True,
                     max_margin: float = _MAX_SLEEP_MARGIN) -> float:
    """Median device time of ``fn()`` in ms: its kernels run back to back, the host's launch cost
    excluded (what a tile or engine choice changes; eager wall time is :func:`median_ms`).

    On CUDA, after one untimed call, the iterations are enqueued in chunks of _DEVICE_CHUNK
    behind a ``torch.cuda._sleep`` kernel sized to outlast the host's enqueueing of the chunk
    (twice its measured host time per iteration); each iteration is an L2 flush (with
    ``flush_l2``: a 256 MB zero fill, so every call starts from a cold L2, as in
    ``triton.testing.do_bench``), a begin event, ``fn()``, an end event. Each event pair then
    brackets ``fn``'s kernels only. A chunk whose sleep had ended before the host finished
    enqueueing it (so the device may have waited on the host) is timed again behind a sleep
    twice as long, up to ``max_margin`` times the host time; a ``fn`` that synchronises with
    the device can never be timed so, and raises RuntimeError. On CPU: :func:`median_ms`.
    """
    if device.type != "cuda":
        return median_ms(fn, repeats, device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    flush = None
    if flush_l2:
        flush = _flush_buffers.get(index)
        if flush is None:
            flush = _flush_buffers[index] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    if flush is not None:
        flush.zero_()
    fn()
    host_ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize(device)
    cycles_per_ms = _cycles_per_ms(index)
    times: List[float] = []
    margin = 2.0
    while len(times) < repeats:
        n = min(_DEVICE_CHUNK, repeats - len(times))
        begin = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        slept = torch.cuda.Event()
        torch.cuda._sleep(int((margin * n * host_ms + 0.5) * cycles_per_ms))
        slept.record()
        for i in range(n):
            if flush is not None:
                flush.zero_()
            begin[i].record()
            fn()
            end[i].record()
        host_ahead = not slept.query()  # the device is still asleep: nothing above waited on the host
        torch.cuda.synchronize(device)
        if host_ahead:
            times += [b.elapsed_time(e) for b, e in zip(begin, end)]
            continue
        margin *= 2
        if margin > max_margin:
            raise RuntimeError("device_median_ms: the device caught up with the host behind a sleep "
                               f"{max_margin:g}x the call's host time; does fn synchronise with the device?")
    return statistics.median(times)


def compile_in_parallel(calls: List[Callable[[], object]]) -> None:
    """On a GPU, run each call once from a thread pool so that Triton compiles the candidates of a
    tuner (and ptxas runs) in parallel; each call must carry its own configuration in its
    arguments. Failures are ignored here: the timed run reports them."""
    if not torch.cuda.is_available() or not calls:
        return
    try:
        calls[0]()  # Triton's driver and caches set up from this thread first
    except Exception:  # noqa: BLE001 - reported when timed
        pass
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        for future in [pool.submit(call) for call in calls[1:]]:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - a candidate that fails is reported when timed
                pass
    torch.cuda.synchronize()
