"""Each Triton launcher writes exactly its output: results go into strided views of larger
NaN-filled buffers, the view must be fully written and right, the margins untouched."""

import pytest
import torch

from conftest import DEVICE
from moe_inputs import TOLERANCE, rel_err
from moelora import _launchers as K
from moelora.routing import dispatch_metadata
from moelora.reference import dense_gates

NAN = float("nan")


def poisoned_view(rows, cols, dtype=torch.float32):
    """A [rows, cols] view with row stride cols*2+5 and column stride 2 inside a NaN buffer."""
    big = torch.full((rows + 2, 2 * cols + 5), NAN, dtype=dtype, device=DEVICE)
    return big, big[1:rows + 1, 3:3 + 2 * cols:2]


def assert_only_view_written(big, view, expected, tol):
    assert torch.isfinite(view).all(), "view not fully written"
    assert rel_err(view, expected) < tol
    margin = torch.ones_like(big, dtype=torch.bool)
    margin[1:view.shape[0] + 1, 3:3 + 2 * view.shape[1]:2] = False
    assert torch.isnan(big[margin]).all(), "write outside the view"


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("split_k", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matmul(dtype, split_k):
    a, b, d = randn(70, 300, dtype=dtype), randn(33, 300, dtype=dtype).t(), randn(70, 33)
    big, out = poisoned_view(70, 33)
    K.matmul(a, b, out_dtype=torch.float32, compute_dtype=dtype, alpha=0.5, addend=d, split_k=split_k, out=out)
    expected = 0.5 * a.double() @ b.double() + d.double()
    assert_only_view_written(big, out, expected, TOLERANCE[dtype])


def test_matmul_split_k_really_splits(monkeypatch):
    monkeypatch.setattr(K, "_target_programs", lambda device: 64)
    a, b = randn(16, 2048), randn(2048, 16)
    big, out = poisoned_view(16, 16)
    K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.float32, split_k=True, out=out)
    assert_only_view_written(big, out, a.double() @ b.double(), TOLERANCE[torch.float32])


def routing(T, E, k):
    ids = torch.rand(T, E).argsort(1)[:, :k].to(DEVICE)
    return ids, torch.rand(T, k, device=DEVICE)


@pytest.mark.parametrize("shared_a", [True, False])
def test_gate_expand_and_backward(shared_a):
    T, E, r, k, s = 45, 5, 3, 2, 0.3
    ids, w = routing(T, E, k)
    h = randn(T, r if shared_a else E * r)
    G = dense_gates(ids, w, E, torch.float64) * s
    h3 = h.double().view(T, 1 if shared_a else E, r).expand(T, E, r)
    big, out = poisoned_view(T, E * r)
    K.gate_expand(h, ids, w, num_experts=E, rank=r, scaling=s, shared_a=shared_a, out_dtype=torch.float32, out=out)
    assert_only_view_written(big, out, (G[:, :, None] * h3).reshape(T, E * r), 1e-6)

    dhg = randn(T, E * r)
    big_dh, dh = poisoned_view(T, h.shape[1])
    big_dw, dw = poisoned_view(T, k)
    K.gate_backward(dhg, h, ids, w, num_experts=E, rank=r, scaling=s, shared_a=shared_a, dh=dh, dw=dw)
    dhg3 = dhg.double().view(T, E, r)
    dh_ref = (G[:, :, None] * dhg3)
    dh_ref = dh_ref.sum(1) if shared_a else dh_ref.reshape(T, E * r)
    P = s * (dhg3 * h3).sum(-1)
    assert_only_view_written(big_dh, dh, dh_ref, 1e-6)
    assert_only_view_written(big_dw, dw, P.gather(1, ids), 1e-6)


def test_grouped_matmul_weight_grad_and_combine():
    T, E, k, d_in, N, block_m = 37, 6, 2, 20, 24, 16
    ids, w = routing(T, E, k)
    x, W = randn(T, d_in), randn(E, N, d_in)
    meta = dispatch_metadata(ids, E, block_m)
    pair_ids = ids.reshape(-1)
    big, out = poisoned_view(T * k, N)
    K.grouped_matmul(x, W, out, meta.sorted_pairs_padded, meta.block_expert, block_m, top_k=k, a_by_token=True,
                     weight_nk_strides=(W.stride(1), W.stride(2)), compute_dtype=torch.float32, alpha=2.0,
                     scale=w.reshape(-1))
    xt = x.double().repeat_interleave(k, 0)
    expected = 2.0 * w.reshape(-1, 1).double() * torch.einsum("pd,pnd->pn", xt, W.double()[pair_ids])
    assert_only_view_written(big, out, expected, 1e-6)

    big_y, y = poisoned_view(T, N)
    base = randn(T, N)
    K.combine_pairs(out, ids, E, out_dtype=torch.float32, base=base, out=y)
    assert_only_view_written(big_y, y, base.double() + expected.view(T, k, N).sum(1), 1e-6)

    dy = randn(T, N)
    grad = torch.full((E, N + 1, d_in + 2), NAN, device=DEVICE)
    view = grad[:, 1:, 1:-1]
    K.grouped_weight_grad(dy, x, meta.sorted_pairs, meta.offsets, num_experts=E, top_k=k, left_by_token=True,
                          right_by_token=True, compute_dtype=torch.float32, out_dtype=torch.float32,
                          scale=w.reshape(-1), out=view)
    onehot = torch.nn.functional.one_hot(ids, E).double() * w.double()[:, :, None]  # [T, k, E]
    ref = torch.einsum("tke,tn,td->end", onehot, dy.double(), x.double())
    assert torch.isfinite(view).all() and rel_err(view, ref) < 1e-6
    assert torch.isnan(grad[:, 0]).all() and torch.isnan(grad[:, :, 0]).all() and torch.isnan(grad[:, :, -1]).all()


@pytest.mark.parametrize("shared_a", [True, False])
def test_gated_expand(shared_a):
    T, E, r, k, N, s = 70, 5, 3, 2, 40, 0.3
    ids, w = routing(T, E, k)
    h, B, base = randn(T, r if shared_a else E * r), randn(E, N, r), randn(T, N)
    G = dense_gates(ids, w, E, torch.float64) * s
    h3 = h.double().view(T, 1 if shared_a else E, r).expand(T, E, r)
    expected = base.double() + torch.einsum("te,ter,enr->tn", G, h3, B.double())
    big, out = poisoned_view(T, N)
    K.gated_expand(h, ids, w, B, scaling=s, shared_a=shared_a, base=base, out=out)
    assert_only_view_written(big, out, expected, 1e-6)
