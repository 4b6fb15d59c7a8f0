"""pytest-benchmark cases over a few small shapes (forward + backward).

CI runs them with ``--benchmark-disable``, so each body runs once as a smoke test; each
also checks the output against the fp32 reference. Triton cases run only with CUDA and
an importable Triton backend.
"""

from __future__ import annotations


import copy

import pytest
import torch
import torch.nn.functional as F

import moelora

from benchmarks import baselines
from benchmarks.impls import DECODE, by_name
from benchmarks.inputs import make_set
from benchmarks.runner import prepare_sets
from benchmarks.shapes import Shape, decode_shape

# When benchmarking is on, keep each case short: these are small shapes, not the suite.
pytestmark = pytest.mark.benchmark(max_time=0.2, min_rounds=3, warmup=False)

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
TOL = 2e-2 if HAS_CUDA else 1e-5

SMALL = [
    Shape("shared", 96, 64, 48, 8, 4, 2, shared_a=True),
    Shape("per-expert", 96, 64, 48, 8, 4, 2, shared_a=False),
    Shape("task", 80, 32, 32, 8, 3, 1, shared_a=False, routing="task"),
]
IMPLS = ["moelora-torch", "naive", "torch-dense", "torch-grouped-mm", "moelora-triton"]


def _skip_reason(name: str, shape: Shape):
    if name == "moelora-triton":
        if not HAS_CUDA:
            return "Triton cases need CUDA"
    if name == "torch-grouped-mm" and baselines.grouped_mm_fn() is None:
        return "no grouped_mm in this torch"
    return None


def _fwd_bwd(prepared, grad_out):
    y = prepared.forward()
    return (y,) + torch.autograd.grad(y, prepared.leaves, grad_out)


@pytest.mark.parametrize("shape", SMALL, ids=[s.name for s in SMALL])
@pytest.mark.parametrize("name", IMPLS)
def test_delta_fwd_bwd(benchmark, name, shape):
    reason = _skip_reason(name, shape)
    if reason:
        pytest.skip(reason)
    s = make_set(shape, DTYPE, DEVICE, seed=3)
    prepared = by_name(name).prepare(shape, s)
    with moelora.validation(False):
        out = benchmark(_fwd_bwd, prepared, s["grad_out"])
    with torch.no_grad():
        ref = moelora.ops.reference.moe_lora_torch(s["x"].double(), s["a"].double(), s["b"].double(), s["ids"],
                                                   s["w"].double(), scaling=shape.scaling)
    y = out[0].detach().double()
    assert torch.isfinite(y).all()
    assert float((y - ref).norm() / ref.norm()) < TOL
    for g, leaf in zip(out[1:], prepared.leaves):
        assert g.shape == leaf.shape and torch.isfinite(g).all()


FFN = Shape("ffn", 64, 32, 32, 0, 4, 2, kind="ffn", d_ff=48)


@pytest.mark.parametrize("name", ["naive-ffn", "torch-grouped-mm-ffn"])
def test_ffn_fwd_bwd(benchmark, name):
    if name == "torch-grouped-mm-ffn" and baselines.grouped_mm_fn() is None:
        pytest.skip("no grouped_mm in this torch")
    s = make_set(FFN, DTYPE, DEVICE, seed=4)
    prepared = by_name(name).prepare(FFN, s)
    out = benchmark(_fwd_bwd, prepared, s["grad_out"])
    with torch.no_grad():
        ref = baselines.moe_ffn_naive(s["x"].double(), s["w13"].double(), s["w2"].double(), s["ids"], s["w"].double())
    assert float((out[0].detach().double() - ref).norm() / ref.norm()) < TOL


LAYER = Shape("layer", 96, 64, 48, 8, 4, 2, shared_a=True, layer=True)


def _decode_reference(name, shape, s, prepared):
    """float64: the formula of each baseline; MoELoRALinear's layer (its own router) copied to float64
    and run on moelora's PyTorch backend with grad mode on (through autograd.Function.apply)."""
    x, w0, a, b, w = (s[k].detach().double() for k in ("x", "w0", "a", "b", "w"))
    base = F.linear(x, w0)
    if name == "linear-frozen":
        return base
    if name == "peft-lora":
        return base + shape.scaling * (x @ a.t()) @ b[0].t()
    if name in ("torch-dense-layer", "moelora-layer"):
        return moelora.ops.reference.moe_lora_torch(x, a, b, s["ids"], w, scaling=shape.scaling, base_out=base)
    layer = copy.deepcopy(prepared.keep[0]).double()
    with moelora.use_backend("torch"):
        return layer(x).detach()


@pytest.mark.parametrize("name", DECODE)
def test_decode_forward_is_the_inference_forward(benchmark, name):
    """The decode pass runs each layer implementation as generation does: modules in eval mode, the
    forward under torch.inference_mode (an inference tensor out, nothing recorded), at a few tokens,
    one task per token under task routing; its output matches float64."""
    if name == "moelora-layer" and not HAS_CUDA:
        pytest.skip("Triton cases need CUDA")
    shape = decode_shape(LAYER, 5)
    s = make_set(shape, DTYPE, DEVICE, seed=5)
    prepared = prepare_sets(by_name(name), shape, [s], ["decode"])[0]
    with moelora.validation(False):
        y = benchmark(prepared.forward)
    assert y.is_inference() and not y.requires_grad and y.shape == (5, LAYER.d_out)
    modules = [m for k in prepared.keep if isinstance(k, torch.nn.Module) for m in k.modules()]
    assert not any(m.training for m in modules)
    if name.endswith("-task"):  # every token is a sequence of its own: tasks 0, 1, 2, 3, 0
        assert prepared.keep[0].task_ids.tolist() == [0, 1, 2, 3, 0]
    ref = _decode_reference(name, shape, s, prepared)
    assert float((y.double() - ref).norm() / ref.norm()) < TOL
