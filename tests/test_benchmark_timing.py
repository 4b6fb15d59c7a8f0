"""benchmarks/timing.py's device timer: the tuners choose tiles and engines on it, so it must
time the kernels and not the host that launches them (GPU only: on CPU it is the wall clock)."""

import time

import pytest
import torch

from benchmarks.timing import device_median_ms, median_ms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="device time needs a CUDA device")
DEVICE = torch.device("cuda")


def test_device_time_leaves_out_the_host_cost_of_the_launch():
    src, dst = torch.randn(1 << 16, device=DEVICE), torch.empty(1 << 16, device=DEVICE)

    def slow_host_small_kernel():
        time.sleep(0.003)  # a launch that costs the host 3 ms
        dst.copy_(src)

    assert median_ms(slow_host_small_kernel, 5, DEVICE) >= 3.0  # eager timing sees the host
    assert device_median_ms(slow_host_small_kernel, 5, DEVICE) < 0.5


def test_device_time_of_a_device_bound_call_matches_its_wall_time():
    src = torch.randn(1 << 27, device=DEVICE)  # 512 MiB each way: milliseconds on any GPU
    dst = torch.empty_like(src)
    wall = median_ms(lambda: dst.copy_(src), 5, DEVICE)
    device = device_median_ms(lambda: dst.copy_(src), 5, DEVICE)
    assert 0.7 * wall <= device <= 1.3 * wall


def test_a_call_that_synchronises_cannot_be_timed_on_the_device_alone():
    x = torch.randn(16, device=DEVICE)
    with pytest.raises(RuntimeError, match="synchronise"):
        device_median_ms(lambda: (x * 2).sum().item(), 3, DEVICE)
