"""moelora.moe_ffn (routed expert FFNs) against a float64 per-token loop: forward, every
gradient, both backends (Triton under the interpreter without a GPU), skipped slots,
exact zeros for experts without tokens, the exact identity of identical experts."""

import pytest
import torch
import torch.nn.functional as F

import moelora
from conftest import DEVICE, HAS_CUDA
from moe_inputs import rel_err

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_ffn(T=37, d=24, f=40, d_out=20, E=5, k=2, *, gated=True, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_()

    ids = torch.rand(T, E, generator=g).argsort(1)[:, :k].to(DEVICE)
    weights = torch.rand(T, k, generator=g).to(DEVICE)
    weights[::4, -1] = 0.0  # skipped slots (threshold routing drops them)
    ffn = dict(w_in=rand(E, f, d, scale=d ** -0.5), b_in=rand(E, f) if bias else None,
               w_out=rand(E, d_out, f, scale=f ** -0.5), b_out=rand(E, d_out) if bias else None,
               w_gate=rand(E, f, d, scale=d ** -0.5) if gated else None, b_gate=rand(E, f) if gated and bias else None)
    return rand(T, d), ids, weights.requires_grad_(), ffn


def reference(x, ids, weights, ffn, activation, normalize):
    """float64 per-token, per-slot loop."""
    p = {n: (t.double() if t is not None else None) for n, t in ffn.items()}
    x, w = x.double(), weights.double()
    out = []
    for t in range(x.shape[0]):
        kept = [j for j in range(ids.shape[1]) if w[t, j] != 0]
        total = sum(w[t, j] for j in kept) if normalize else 1.0
        acc = torch.zeros(p["w_out"].shape[1], dtype=torch.float64, device=x.device)
        for j in kept:
            e = int(ids[t, j])
            h = F.linear(x[t], p["w_in"][e], None if p["b_in"] is None else p["b_in"][e])
            if p["w_gate"] is None:
                h = activation(h)
            else:
                h = activation(F.linear(x[t], p["w_gate"][e], None if p["b_gate"] is None else p["b_gate"][e])) * h
            acc = acc + w[t, j] / total * F.linear(h, p["w_out"][e], None if p["b_out"] is None else p["b_out"][e])
        out.append(acc)
    return torch.stack(out)


def leaves(x, weights, ffn):
    return [x, weights] + [t for t in ffn.values() if t is not None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gated,bias", [(True, True), (False, False)])
def test_matches_float64_loop_with_gradients(backend, normalize, gated, bias):
    x, ids, weights, ffn = make_ffn(gated=gated, bias=bias)
    act = F.silu if gated else F.gelu
    y = moelora.moe_ffn(x, ids, weights, activation=act, normalize=normalize, backend=backend, **ffn)
    assert y.shape == (x.shape[0], ffn["w_out"].shape[1]) and y.dtype == x.dtype
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves(x, weights, ffn), grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves(x, weights, ffn)]
    ref_ffn = dict(zip([n for n, t in ffn.items() if t is not None], ref_leaves[2:]))
    ref_ffn.update({n: None for n, t in ffn.items() if t is None})
    y_ref = reference(ref_leaves[0], ids, ref_leaves[1], ref_ffn, act, normalize)
    expected = torch.autograd.grad(y_ref, ref_leaves, grad.double())
    assert rel_err(y, y_ref) < TOL[x.dtype]
    for i, (g, r) in enumerate(zip(got, expected)):
        assert rel_err(g, r) < TOL[x.dtype], f"gradient {i}: {rel_err(g, r)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_without_tokens_get_exact_zero_gradients(backend):
    x, ids, weights, ffn = make_ffn(E=6, k=2)
    ids = ids % 3  # experts 3..5 get nothing; ids stay distinct per token only where they were
    ids[:, 1] = (ids[:, 0] + 1) % 3
    y = moelora.moe_ffn(x, ids, weights, activation=F.silu, backend=backend, **ffn)
    y.backward(torch.randn_like(y))
    for name in ("w_in", "b_in", "w_out", "b_out", "w_gate", "b_gate"):
        grad = ffn[name].grad
        assert torch.equal(grad[3:], torch.zeros_like(grad[3:])), name
        assert grad[:3].abs().sum() > 0, name


def test_triton_bitwise_deterministic():
    def once():
        x, ids, weights, ffn = make_ffn(seed=5)
        y = moelora.moe_ffn(x, ids, weights, activation=F.silu, normalize=True, backend="triton", **ffn)
        return [y, *torch.autograd.grad(y, leaves(x, weights, ffn), y.detach() + 1)]

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_experts_reproduce_one_ffn_exactly_when_normalized(backend):
    """Upcycling's promise: copies of one FFN mixed by weights summing to one return that
    FFN's output bit for bit (the backend's own single-expert result)."""
    x, ids, weights, ffn = make_ffn(E=4, k=4, seed=2)
    ids = torch.arange(4, device=DEVICE).repeat(x.shape[0], 1)
    weights = torch.softmax(torch.randn(x.shape[0], 4, device=DEVICE), -1)
    weights[::3, 1:] = 0.0  # some tokens keep only their best expert
    copies = {n: t.detach()[:1].expand_as(t).contiguous() if t is not None else None for n, t in ffn.items()}
    with torch.no_grad():
        mixed = moelora.moe_ffn(x, ids, weights, activation=F.silu, normalize=True, backend=backend, **copies)
        single = moelora.moe_ffn(x, ids[:, :1] * 0, torch.ones_like(weights[:, :1]), activation=F.silu,
                                 backend=backend, **{n: t[:1] if t is not None else None for n, t in copies.items()})
    assert torch.equal(mixed, single)


def test_zero_tokens():
    x, ids, weights, ffn = make_ffn()
    for backend in BACKENDS:
        empty = moelora.moe_ffn(x[:0], ids[:0], weights[:0], activation=F.silu, backend=backend, **ffn)
        assert empty.shape == (0, ffn["w_out"].shape[1])


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(
    torch.bfloat16, marks=pytest.mark.skipif(not HAS_CUDA, reason="the interpreter's bfloat16 is broken"))])
def test_half_precision_triton(dtype):
    T = 300 if HAS_CUDA else 20
    x, ids, weights, ffn = make_ffn(T=T, dtype=dtype, seed=1)
    y = moelora.moe_ffn(x, ids, weights, activation=F.silu, backend="triton", **ffn)
    ref = reference(x, ids, weights, ffn, F.silu, False)
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]


def test_argument_errors_name_the_argument():
    x, ids, weights, ffn = make_ffn(gated=False)
    args = dict(activation=F.gelu, **ffn)
    with pytest.raises(ValueError, match="w_in must have shape"):
        moelora.moe_ffn(x, ids, weights, **{**args, "w_in": ffn["w_in"][:, :, :-1]})
    with pytest.raises(ValueError, match="w_out must have shape"):
        moelora.moe_ffn(x, ids, weights, **{**args, "w_out": ffn["w_out"][:-1]})
    with pytest.raises(ValueError, match="b_in must have shape"):
        moelora.moe_ffn(x, ids, weights, **{**args, "b_in": ffn["b_in"][:, :-1]})
    with pytest.raises(ValueError, match="topk_ids and topk_weights"):
        moelora.moe_ffn(x, ids, weights[:, :1], **args)
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64"):
        moelora.moe_ffn(x, ids.float(), weights, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_raise_or_are_skipped_with_validation_off(backend):
    x, ids, weights, ffn = make_ffn(gated=False)
    bad = ids.clone()
    bad[3, 0] = 5  # E = 5
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 5\)"):
        moelora.moe_ffn(x, bad, weights, activation=F.gelu, backend=backend, **ffn)
    with moelora.validation(False):
        got = moelora.moe_ffn(x, bad, weights, activation=F.gelu, backend=backend, **ffn)
    dropped = weights.detach().clone()
    dropped[3, 0] = 0.0
    expected = moelora.moe_ffn(x, ids, dropped, activation=F.gelu, backend=backend, **ffn)
    assert torch.equal(got, expected)
