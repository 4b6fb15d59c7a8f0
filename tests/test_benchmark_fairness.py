"""The benchmark's comparisons are fair: the plain-PyTorch baselines that targets are read against
compute what moelora computes and pay no cost that a plain PyTorch implementation need not pay.
CPU only and fast (tiny shapes)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import baselines
from helpers import moe_ffn_reference, rel_err
from moelora.ops import reference

# ATen ops that read a device value back to the host on CUDA (a synchronisation per call): a baseline that
# calls one is timed with the host kept from enqueueing ahead, a cost that moelora's dispatch does not pay
SYNCING_OPS = {"bincount", "nonzero", "_local_scalar_dense", "item", "unique", "_unique2", "masked_select",
               "repeat_interleave"}


class _Ops(TorchDispatchMode):
    """Records the ATen ops run in its block (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _routing(tokens, experts, top_k, empty_expert=None):
    """Random distinct top-k ids (never ``empty_expert``) and renormalised fp32 weights."""
    logits = torch.randn(tokens, experts)
    if empty_expert is not None:
        logits[:, empty_expert] = -float("inf")
    w, ids = torch.softmax(logits, -1).topk(top_k, -1)
    return ids.int(), (w / w.sum(-1, keepdim=True)).requires_grad_()


def _lora_set(shared_a, tokens=40, d=24, r=4, experts=5, top_k=2, empty_expert=None):
    ids, w = _routing(tokens, experts, top_k, empty_expert)
    a = torch.randn(*(() if shared_a else (experts,)), r, d, requires_grad=True)
    return (torch.randn(tokens, d, requires_grad=True), a, torch.randn(experts, d, r, requires_grad=True), ids, w)


needs_grouped_mm = pytest.mark.skipif(baselines.grouped_mm_fn() is None, reason="this torch has no grouped_mm")


@needs_grouped_mm
@pytest.mark.parametrize("shared_a", [True, False])
def test_grouped_mm_baseline_matches_the_reference_with_an_expert_left_empty(shared_a):
    x, a, b, ids, w = _lora_set(shared_a, empty_expert=2)
    dy = torch.randn(x.shape[0], b.shape[1])
    y = baselines.moe_lora_grouped_mm(x, a, b, ids, w, 2.0)
    grads = torch.autograd.grad(y, [x, a, b, w], dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, a, b, w)]
    ref = reference.moe_lora_naive(leaves64[0], leaves64[1], leaves64[2], ids, leaves64[3], scaling=2.0)
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)
    # into a base output (the whole layer's y = x W0^T + delta), as the dense baseline
    base = torch.randn_like(y)
    for op in (baselines.moe_lora_grouped_mm, baselines.moe_lora_dense):
        torch.testing.assert_close(op(x, a, b, ids, w, 2.0, base_out=base).double(), base.double() + ref,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["naive", "grouped_mm"])
def test_ffn_baselines_compute_the_swiglu_moe_with_an_expert_left_empty(op):
    """The runner checks every ffn case against moe_ffn_naive: it is held to the formula itself here
    (an expert with no tokens, which its loop skips, before others that have some)."""
    if op == "grouped_mm" and baselines.grouped_mm_fn() is None:
        pytest.skip("this torch has no grouped_mm")
    ids, w = _routing(24, 5, 2, empty_expert=1)
    x, w13, w2 = torch.randn(24, 16), torch.randn(5, 2 * 12, 16) / 4, torch.randn(5, 16, 12) / 4
    y = getattr(baselines, f"moe_ffn_{op}")(x, w13, w2, ids, w)
    gate, up = w13.chunk(2, dim=1)  # w13_e = [gate_e; up_e]: silu(gate_e x) * up_e x
    ffn = dict(w_in=up, b_in=None, w_gate=gate, b_gate=None, w_out=w2, b_out=None)
    assert rel_err(y, moe_ffn_reference(x, ids, w, ffn, torch.nn.functional.silu, normalize=False)) < 1e-5


@needs_grouped_mm
@pytest.mark.parametrize("case", ["lora-shared", "lora-per-expert", "lora-dense", "ffn"])
def test_timed_baselines_do_not_synchronise_with_the_host(case):
    """Before: the grouped_mm baselines counted each expert's rows with torch.bincount, which reads the
    largest id back to the host on CUDA: every iteration of torch-grouped-mm(-ffn) waited for the device,
    against which the S5 moe_ffn target and the sweep's grouped points were read."""
    if case == "ffn":
        ids, w = _routing(40, 5, 2)
        x = torch.randn(40, 16, requires_grad=True)
        w13, w2 = torch.randn(5, 2 * 12, 16, requires_grad=True), torch.randn(5, 16, 12, requires_grad=True)
        fn, leaves = (lambda: baselines.moe_ffn_grouped_mm(x, w13, w2, ids, w)), [x, w13, w2, w]
    else:
        x, a, b, ids, w = _lora_set(case == "lora-shared" or case == "lora-dense")
        op = baselines.moe_lora_dense if case == "lora-dense" else baselines.moe_lora_grouped_mm
        fn, leaves = (lambda: op(x, a, b, ids, w, 2.0)), [x, a, b, w]
    with _Ops() as ops:
        y = fn()
        torch.autograd.grad(y, leaves, torch.ones_like(y))
    assert not ops.names & SYNCING_OPS, f"{case} synchronises with the host: {sorted(ops.names & SYNCING_OPS)}"
