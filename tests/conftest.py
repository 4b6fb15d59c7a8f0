"""Test-session set-up.

Without a GPU the Triton kernels run under the Triton interpreter, which must be switched
on before any kernel is defined, hence before moelora's kernels are imported. Tests
that are not about the kernels run on the fast torch backend there (MOELORA_BACKEND);
kernel tests ask for backend="triton" explicitly.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("MOELORA_BACKEND", "torch")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread for modules that train tiny models: their matmuls gain nothing from
    more, and on a small shared machine extra threads only wait for each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def grouped_mm_rows(monkeypatch):
    """The grouped forward's rows on the grouped_mm engine whatever the device (on a CPU torch's
    reference loop); yields the list of grouped_mm calls."""
    from moelora.ops import grouped_linear, moe_lora as moe_lora_module  # imported once TRITON_INTERPRET is set

    calls = []
    gmm = grouped_linear.grouped_mm_fn()
    monkeypatch.setattr(moe_lora_module, "rows_engine", lambda *args: "grouped_mm")
    monkeypatch.setattr(grouped_linear, "grouped_mm_fn", lambda: lambda *a, **kw: calls.append(1) or gmm(*a, **kw))
    yield calls
