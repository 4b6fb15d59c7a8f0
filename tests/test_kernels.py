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


def _row_layout(T, E, k, block=16, experts=None):
    ids = torch.rand(T, E).argsort(1)[:, :k].to(DEVICE)
    if experts is not None:  # only the first ``experts`` experts get pairs
        ids = torch.rand(T, experts).argsort(1)[:, :k].to(DEVICE)
    return ids, dispatch_metadata(ids, E, block)


def _pair_rows(meta):
    """(rows holding a pair [n], their pairs [n]) of the row space."""
    rows = (meta.sorted_pairs_padded >= 0).nonzero().squeeze(1)
    return rows, meta.sorted_pairs_padded[rows]


def test_grouped_matmul_rows_with_second_operand_scale_and_gate_grad():
    """Row r of expert e gets scale[p] * alpha * (x[t] @ W[e]^T + a2[t] @ W2[e]^T), t = p // k; the gate-gradient
    epilogue writes dw[p] = <alpha * x[p // k] @ W[e]^T ..., h[p // k]>; padding rows may stay unwritten."""
    T, E, k, d_in, N = 37, 6, 2, 20, 24
    ids, meta = _row_layout(T, E, k)
    R = meta.sorted_pairs_padded.numel()
    x, W, W2, w = randn(T, d_in), randn(E, N, d_in), randn(E, d_in, N), torch.rand(T * k, device=DEVICE)
    a2, h = randn(T, d_in), randn(T, N)
    big, out = poisoned_view(R, N)
    dw = torch.full((T * k,), NAN, device=DEVICE)
    K.grouped_matmul(x, W, out, meta, a_by_token=True, weight_nk_strides=(W.stride(1), W.stride(2)),
                     compute_dtype=torch.float32, alpha=2.0, scale=w,
                     second=(a2, W2, (W2.stride(2), W2.stride(1))), gate_grad=(h, True, dw))
    rows, pairs = _pair_rows(meta)
    e = ids.reshape(-1)[pairs]
    first = torch.einsum("pd,pnd->pn", x.double()[pairs // k], W.double()[e])
    second = torch.einsum("pd,pdn->pn", a2.double()[pairs // k], W2.double()[e])
    expected = 2.0 * w.double()[pairs, None] * (first + second)
    assert rel_err(out[rows], expected) < 1e-6
    assert rel_err(dw[pairs], 2.0 * ((first + second) * h.double()[pairs // k]).sum(1)) < 1e-6
    margin = torch.ones_like(big, dtype=torch.bool)
    margin[1:R + 1, 3:3 + 2 * N:2] = False
    assert torch.isnan(big[margin]).all(), "write outside the view"


@pytest.mark.parametrize("anchored", [False, True])
def test_combine_rows(anchored):
    """out[t] = base + z_a + sum_j c[t, j] (z_j - z_a), z_j = rows[inverse] + second[inverse] + bias[ids]."""
    T, E, k, N = 29, 5, 3, 40
    ids, meta = _row_layout(T, E, k)
    R = meta.sorted_pairs_padded.numel()
    rows, second, bias, base, coef = randn(R, N), randn(R, N), randn(E, N), randn(T, N), torch.rand(T, k, device=DEVICE)
    big, y = poisoned_view(T, N)
    K.combine_rows(rows, meta, out_dtype=torch.float32, coef=coef, anchored=anchored, bias=(ids, bias), base=base,
                   second=second, out=y)
    z = (rows + second).double()[meta.inverse_padded] + bias.double()[ids]  # [T, k, N]
    anchor = z[:, :1] if anchored else torch.zeros_like(z[:, :1])
    expected = base.double() + anchor.squeeze(1) + (coef.double()[:, :, None] * (z - anchor)).sum(1)
    assert_only_view_written(big, y, expected, 1e-6)


def test_grouped_weight_grad_and_segment_sum():
    T, E, k, d_in, N = 37, 6, 2, 20, 24
    ids, meta = _row_layout(T, E, k, experts=4)  # experts 4, 5 get nothing: exact zeros
    R = meta.sorted_pairs_padded.numel()
    w = torch.rand(T, k, device=DEVICE)
    dy, x_rows = randn(T, N), randn(R, d_in)
    grad = torch.full((E, N + 1, d_in + 2), NAN, device=DEVICE)
    view = grad[:, 1:, 1:-1]
    K.grouped_weight_grad(dy, x_rows, meta, left_by_token=True, right_by_token=False, compute_dtype=torch.float32,
                          out_dtype=torch.float32, alpha=0.5, scale=w.reshape(-1), out=view)
    rows, pairs = _pair_rows(meta)
    onehot = torch.nn.functional.one_hot(ids.reshape(-1)[pairs], E).double() * w.double().reshape(-1)[pairs, None]
    ref = 0.5 * torch.einsum("pe,pn,pd->end", onehot, dy.double()[pairs // k], x_rows.double()[rows])
    assert torch.isfinite(view).all() and rel_err(view, ref) < 1e-6
    assert torch.equal(view[4:], torch.zeros_like(view[4:]))
    assert torch.isnan(grad[:, 0]).all() and torch.isnan(grad[:, :, 0]).all() and torch.isnan(grad[:, :, -1]).all()
    sums = K.segment_sum(x_rows, meta, out_dtype=torch.float32)
    onehot = torch.nn.functional.one_hot(ids.reshape(-1)[pairs], E).double()
    assert rel_err(sums, onehot.t() @ x_rows.double()[rows]) < 1e-6


@pytest.mark.parametrize("with_bias", [False, True])
def test_combine_rows_backward(with_bias):
    """drows[r] = coef[p] * dy[p // k] (0 on padding), g[p] = <dy[p // k], rows[r] + bias[e]>."""
    T, E, k, N = 23, 4, 2, 300
    ids, meta = _row_layout(T, E, k)
    R = meta.sorted_pairs_padded.numel()
    dy, rows, bias, coef = randn(T, N), randn(R, N), randn(E, N), torch.rand(T * k, device=DEVICE)
    drows, g = K.combine_rows_backward(dy, rows, meta, ids, coef, bias=bias if with_bias else None)
    r, pairs = _pair_rows(meta)
    z = rows.double()[r] + (bias.double()[ids.reshape(-1)[pairs]] if with_bias else 0)
    assert rel_err(drows[r], coef.double()[pairs, None] * dy.double()[pairs // k]) < 1e-6
    padding = torch.ones(R, dtype=torch.bool, device=DEVICE)
    padding[r] = False
    assert torch.equal(drows[padding], torch.zeros_like(drows[padding]))
    assert rel_err(g[pairs], (dy.double()[pairs // k] * z).sum(1)) < 1e-6


ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
               "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"), "relu": torch.relu}


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_glu_forward_backward(act, gated):
    """act(hg + bg[e]) * (hu + bu[e]) and its gradients by autograd in float64; 0 on padding rows."""
    from moelora.ffn import ACTIVATION_CODES

    T, E, k, F_ = 21, 4, 2, 40
    ids, meta = _row_layout(T, E, k)
    R = meta.sorted_pairs_padded.numel()
    hg, hu, bg, bu, dout = randn(R, F_) * 2, randn(R, F_), randn(E, F_), randn(E, F_), randn(R, F_)
    code = ACTIVATION_CODES[act]
    out = K.glu_forward(hg if gated else None, hu, bg if gated else None, bu, meta, ids, code)
    dhg, dhu = K.glu_backward(dout, hg if gated else None, hu, bg if gated else None, bu, meta, ids, code)
    r, pairs = _pair_rows(meta)
    e = ids.reshape(-1)[pairs]
    g = (hg.double()[r] + bg.double()[e]).requires_grad_()
    u = (hu.double()[r] + bu.double()[e]).requires_grad_()
    ref = ACTIVATIONS[act](g) * u if gated else ACTIVATIONS[act](u)
    ref_grads = torch.autograd.grad(ref, [g, u] if gated else [u], dout.double()[r])
    padding = torch.ones(R, dtype=torch.bool, device=DEVICE)
    padding[r] = False
    assert rel_err(out[r], ref) < 1e-6 and torch.equal(out[padding], torch.zeros_like(out[padding]))
    assert rel_err(dhu[r], ref_grads[-1]) < 1e-6 and torch.equal(dhu[padding], torch.zeros_like(dhu[padding]))
    if gated:
        assert rel_err(dhg[r], ref_grads[0]) < 1e-6
    else:
        assert dhg is None


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
