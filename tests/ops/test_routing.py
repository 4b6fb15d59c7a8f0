"""moelora.route: C++ and fallback paths vs a Python-loop reference, ties, NaN, edge sizes,
determinism, opcheck, gradients (the Triton kernel and PyTorch) and argument validation;
CUDA vs CPU when a GPU is there."""

import pytest
import torch

import moelora
from conftest import DEVICE
from helpers import PATHS, needs_c, needs_cuda_kernels, route_reference, run_path

MODES = [("softmax_topk", False), ("softmax_topk", True), ("topk_softmax", False)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}


def _check_route(out, logits, top_k, mode, renorm):
    T, E = logits.shape
    w_ref, ids_ref, cnt_ref, ps_ref, lse_ref = route_reference(logits, top_k, mode, renorm)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert out.weights.dtype == acc and out.prob_sums.dtype == acc and out.lse.dtype == acc
    assert out.ids.dtype == torch.int32 and out.counts.dtype == torch.int64
    assert out.weights.shape == (T, top_k) and out.lse.shape == (T,) and out.counts.shape == (E,)
    assert torch.equal(out.ids.long(), ids_ref)
    assert torch.equal(out.counts, cnt_ref)
    tol = TOL[logits.dtype]
    torch.testing.assert_close(out.weights.double(), w_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(out.prob_sums.double(), ps_ref, rtol=tol * 10, atol=tol * max(T, 1))
    torch.testing.assert_close(out.lse.double(), lse_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode,renorm", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_route_matches_reference(path, mode, renorm, dtype):
    g = torch.Generator().manual_seed(hash((mode, renorm, str(dtype))) % 2**31)
    logits = (torch.randn(37, 11, generator=g) * 3).to(dtype)
    out = run_path(path, moelora.route, logits, 3, mode=mode, renormalize=renorm)
    _check_route(out, logits, 3, mode, renorm)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode,renorm", MODES)
@pytest.mark.parametrize("T,E,k", [(0, 8, 2), (5, 1, 1), (19, 257, 4), (7, 6, 6), (3, 1024, 8)])
def test_route_edge_sizes(path, mode, renorm, T, E, k):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * 1000 + E))
    out = run_path(path, moelora.route, logits, k, mode=mode, renormalize=renorm)
    _check_route(out, logits, k, mode, renorm)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode,renorm", MODES)
def test_route_ties_and_nan(path, mode, renorm):
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-2, 2, (40, 9), generator=g).float()  # many ties
    logits[3] = float("nan")  # all-NaN row: ids 0..k-1, weights 0
    logits[4, ::2] = float("nan")
    logits[5] = float("-inf")
    logits[6, 1:] = float("-inf")  # one finite logit, then -inf ties
    logits[7] = 0.0
    out = run_path(path, moelora.route, logits, 4, mode=mode, renormalize=renorm)
    _check_route(out, logits, 4, mode, renorm)
    assert torch.equal(out.ids[3].long(), torch.arange(4)) and torch.equal(out.ids[5].long(), torch.arange(4))
    assert out.weights[3].abs().sum() == 0 and out.lse[3] == float("-inf")
    assert ((out.ids >= 0) & (out.ids < 9)).all()
    assert all(len(set(r)) == 4 for r in out.ids.tolist())  # distinct per token


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode,renorm", MODES)
def test_route_ties_in_wide_rows_take_the_lowest_expert_first(path, mode, renorm):
    """Tied logits are ranked by expert index in rows of hundreds of experts too (an unstable sort keeps short
    rows' ties in order, not long ones')."""
    logits = torch.randint(-2, 2, (16, 200)).double()  # many ties
    out = run_path(path, moelora.route, logits, 8, mode=mode, renormalize=renorm)
    _check_route(out, logits, 8, mode, renorm)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode,renorm", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_route_plus_inf_logits_take_the_softmax_limit(path, mode, renorm, dtype):
    """+inf logits: probability split equally over them (0 elsewhere), finite weights and
    prob_sums, lse = +inf, finite gradients; the other rows are unaffected."""
    inf = float("inf")
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(7), dtype=dtype)
    logits[0, 2] = inf  # one +inf logit: weight 1 on expert 2
    logits[1, 1] = logits[1, 3] = inf  # two: 1/2 each
    logits[2, :] = torch.tensor([inf, float("nan"), -inf, 3.0, inf])  # with NaN and -inf
    logits[3, 4] = inf
    logits[3, 0] = 50.0  # selection still by the logits: expert 0 second
    x = logits.clone().requires_grad_()
    out = run_path(path, moelora.route, x, 2, mode=mode, renormalize=renorm)
    _check_route(out, logits, 2, mode, renorm)
    assert out.ids[0, 0] == 2 and out.weights[0, 0] == 1 and out.weights[0, 1] == 0
    assert out.ids[1].tolist() == [1, 3] and (out.weights[1] == 0.5).all()
    assert out.ids[3].tolist() == [4, 0]
    assert torch.isinf(out.lse[:4]).all() and (out.lse[:4] > 0).all() and torch.isfinite(out.lse[4:]).all()
    assert torch.isfinite(out.weights).all() and torch.isfinite(out.prob_sums).all()
    (out.weights.sum() + out.prob_sums.sum()).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("path", PATHS)
def test_route_all_tokens_to_one_expert(path):
    logits = torch.randn(50, 16)
    logits[:, 5] += 100.0
    out = run_path(path, moelora.route, logits, 1, mode="topk_softmax")
    assert (out.ids == 5).all() and out.counts[5] == 50 and out.counts.sum() == 50
    assert torch.equal(out.weights, torch.ones(50, 1))


@pytest.mark.parametrize("path", PATHS)
def test_route_deterministic_and_leading_dims(path):
    logits = torch.randn(4, 300, 64)
    a = run_path(path, moelora.route, logits, 2)
    b = run_path(path, moelora.route, logits, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a.weights.shape == (4, 300, 2) and a.lse.shape == (4, 300)


@needs_c
@pytest.mark.parametrize("mode,renorm", MODES)
def test_route_fallback_equals_native(mode, renorm):
    logits = torch.randn(513, 40) * 4
    a = run_path("native", moelora.route, logits, 5, mode=mode, renormalize=renorm)
    b = run_path("fallback", moelora.route, logits, 5, mode=mode, renormalize=renorm)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts)
    for x, y in ((a.weights, b.weights), (a.prob_sums, b.prob_sums), (a.lse, b.lse)):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-6)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_router_opcheck(dtype):
    logits = torch.randn(13, 10, dtype=dtype, requires_grad=dtype != torch.bfloat16)
    for mode, renorm in ((0, True), (1, False)):
        torch.library.opcheck(torch.ops.moelora.router_topk.default, (logits, 3, mode, renorm))


@needs_c
def test_native_ops_in_eager_mode_skip_the_custom_op_autograd_dispatch():
    """Eager mode runs the native ops below autograd (their Python autograd dispatch costs tens
    of microseconds per call): an autograd.Function node when an input needs a gradient, none
    otherwise; the gradients are the registered ones (checked against references in this file
    and tests/ops/test_dispatch.py, whose native paths are these)."""
    from moelora.ops.routing import router_topk

    logits = torch.randn(9, 6, requires_grad=True)
    weights, ids, counts, prob_sums, lse = router_topk(logits, 2, "softmax_topk", True)
    assert type(weights.grad_fn).__name__ == "_NativeRouteFnBackward" and lse.grad_fn is weights.grad_fn
    assert not ids.requires_grad and not counts.requires_grad
    torch.autograd.grad(weights.sum() + lse.sum() + prob_sums.sum(), logits)
    with torch.no_grad():
        assert router_topk(logits, 2, "softmax_topk", True)[0].grad_fn is None
    assert router_topk(logits.detach(), 2, "softmax_topk", True)[0].grad_fn is None
    meta = moelora.dispatch_metadata(ids, num_experts=6)
    x = torch.randn(9, 5, requires_grad=True)
    rows = moelora.dispatch(x, meta)
    y = moelora.combine(rows, meta, weights)
    assert type(rows.grad_fn).__name__ == "_NativeDispatchFnBackward"
    assert type(y.grad_fn).__name__ == "_NativeCombineFnBackward"
    assert moelora.combine(rows.detach(), meta, weights.detach()).grad_fn is None


@pytest.fixture(params=["kernel", "torch"])
def grad_path(request, monkeypatch):
    """The device of the test's logits, by where the routing op's backward runs: the Triton
    kernel (the Triton backend, on the device where it runs: CUDA, or the CPU under the
    interpreter; checked to have run) or PyTorch (the torch backend, on the CPU)."""
    from moelora.ops import routing_autograd

    if request.param == "torch":
        monkeypatch.setenv("MOELORA_BACKEND", "torch")
        yield torch.device("cpu")
        return
    monkeypatch.setenv("MOELORA_BACKEND", "auto")  # the test session's default is torch (conftest)
    calls = []
    kernel = routing_autograd._router_topk_backward
    monkeypatch.setattr(routing_autograd, "_router_topk_backward", lambda *a: calls.append(1) or kernel(*a))
    yield DEVICE
    assert calls, "the routing op's backward kernel did not run"


def _route_sum(path, mode, renorm, k, coef):
    def f(logits):
        out = run_path(path, moelora.route, logits, k, mode=mode, renormalize=renorm)
        return out.weights, (out.prob_sums * coef).sum(), out.lse
    return f


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode,renorm", MODES)
def test_route_gradcheck(path, mode, renorm, grad_path):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 7, dtype=torch.float64, generator=g).to(grad_path).requires_grad_()
    coef = torch.randn(7, dtype=torch.float64, generator=g).to(grad_path)
    torch.autograd.gradcheck(_route_sum(path, mode, renorm, 3, coef), (logits,))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode,renorm", MODES)
def test_route_grad_matches_torch_autograd(path, mode, renorm, grad_path):
    """fp32 logits: gradient vs plain-PyTorch autograd of softmax / topk / logsumexp."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(33, 8, generator=g).to(grad_path)
    gw, gps, glse = (t.to(grad_path) for t in (torch.randn(33, 2, generator=g), torch.randn(8, generator=g),
                                               torch.randn(33, generator=g)))
    x = logits.clone().requires_grad_()
    out = run_path(path, moelora.route, x, 2, mode=mode, renormalize=renorm)
    ((out.weights * gw).sum() + (out.prob_sums * gps).sum() + (out.lse * glse).sum()).backward()
    y = logits.clone().requires_grad_()
    probs = torch.softmax(y, -1)
    ids = out.ids.long()
    if mode == "softmax_topk":
        w = probs.gather(1, ids)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
    else:
        w = torch.softmax(y.gather(1, ids), -1)
    ((w * gw).sum() + (probs.sum(0) * gps).sum() + (torch.logsumexp(y, -1) * glse).sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_route_grad_nan_rows_are_zero(path, grad_path):
    logits = torch.randn(4, 5, dtype=torch.float64, device=grad_path)
    logits[1] = float("nan")
    logits[2, 0] = float("nan")
    x = logits.clone().requires_grad_()
    out = run_path(path, moelora.route, x, 2, renormalize=True)
    (out.weights.sum() + out.prob_sums.sum() + out.lse[[0, 2, 3]].sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all() and x.grad[2, 0] == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode,renorm", MODES)
@pytest.mark.parametrize("k", [1, 5])
def test_route_grad_with_masked_nan_and_tied_rows_every_mode(path, mode, renorm, k, grad_path):
    """float64 logits with all-NaN, all -inf, partly -inf/NaN and all-tied rows, k = 1 and k = E:
    the gradient (weights, prob_sums, lse) equals float64 autograd of softmax / top-k / logsumexp
    on the logits with NaN read as -inf, and is exactly 0 on the -inf entries and masked rows."""
    inf = float("inf")
    g = torch.Generator().manual_seed(10 * k + len(mode) + renorm)
    logits = torch.randn(7, 5, dtype=torch.float64, generator=g)
    logits[0] = float("nan")
    logits[1] = -inf
    logits[2, :3] = -inf
    logits[3, 1], logits[3, 4] = float("nan"), -inf
    logits[4] = 0.25  # ties: ids 0..k-1
    gw, gps, glse = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((7, k), (5,), (7,)))
    glse[:2] = 0  # lse = -inf there
    x = logits.clone().to(grad_path).requires_grad_()
    out = run_path(path, moelora.route, x, k, mode=mode, renormalize=renorm)
    torch.autograd.backward([out.weights, out.prob_sums, out.lse], [t.to(grad_path) for t in (gw, gps, glse)])
    got = x.grad.cpu()
    ids = out.ids.long().cpu()
    assert torch.equal(ids[4], torch.arange(k)) and (got[:2] == 0).all()
    y = logits[2:].clone().requires_grad_()  # the rows with a finite logit, by plain autograd
    z = torch.nan_to_num(y, nan=-inf)
    probs = torch.softmax(z, -1)
    sel = ids[2:]
    if mode == "softmax_topk":
        w = probs.gather(1, sel)
        w = w / w.sum(-1, keepdim=True) if renorm else w
    else:
        w = torch.softmax(z.gather(1, sel), -1)
    ((w * gw[2:]).sum() + (probs.sum(0) * gps).sum() + (torch.logsumexp(z, -1) * glse[2:]).sum()).backward()
    want = torch.where(z == -inf, 0.0, y.grad)
    torch.testing.assert_close(got[2:], want, rtol=1e-10, atol=1e-12)
    assert (got[2:][z.detach() == -inf] == 0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode,renorm", MODES)
def test_route_grad_of_masked_logits_is_zero_under_nonfinite_upstream_gradients(path, mode, renorm, grad_path):
    """A -inf (masked) logit gets exactly 0 even where the gradient reaching it is not finite
    (an Inf on the weight of the slot that took it at k = E, and on its prob_sums): 0, not
    0 * Inf; the other entries of that row are what they are (NaN)."""
    inf = float("inf")
    g = torch.Generator().manual_seed(len(mode) + renorm)
    logits = torch.randn(3, 5, dtype=torch.float64, generator=g)
    logits[0, 1] = logits[2, 3] = -inf
    x = logits.clone().to(grad_path).requires_grad_()
    out = run_path(path, moelora.route, x, 5, mode=mode, renormalize=renorm)
    ids = out.ids.long().cpu()
    gw, gps, glse = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((3, 5), (5,), (3,)))
    gw[ids == 1] = inf  # the slots that took expert 1 (row 0: its -inf logit)
    gps[3] = inf
    torch.autograd.backward([out.weights, out.prob_sums, out.lse], [t.to(grad_path) for t in (gw, gps, glse)])
    got = x.grad.cpu()
    assert got[0, 1] == 0 and got[2, 3] == 0


@pytest.mark.parametrize("mode,renorm", MODES)
def test_route_grad_plus_inf_rows_take_the_softmax_limit(mode, renorm, grad_path):
    """A row with +inf logits: the forward's limit p (1/n on its n +inf entries) differentiated,
    on both backward paths: g_x = p (g_p - <p, g_p>) + g_lse p (+ the chosen softmax's term in
    topk_softmax), finite; the rows without +inf as autograd's. (The kernel gave NaN rows.)"""
    inf = float("inf")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 6, dtype=torch.float64, generator=g)
    logits[0, 2] = logits[0, 4] = inf
    logits[1, 5] = inf
    logits[2, :] = torch.tensor([inf, float("nan"), -inf, 1.0, inf, 0.5], dtype=torch.float64)
    gw, gps, glse = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((5, 2), (6,), (5,)))
    x = logits.to(grad_path).requires_grad_()
    out = moelora.route(x, 2, mode=mode, renormalize=renorm)
    torch.autograd.backward([out.weights, out.prob_sums, out.lse], [t.to(grad_path) for t in (gw, gps, glse)])
    got = x.grad.cpu()
    assert torch.isfinite(got).all()
    # float64 reference: the limit's p per row; the chosen slots' gradient through p (softmax_topk) or
    # through the k-way softmax of the chosen logits (topk_softmax, whose weights are 1/n on the +inf ones)
    finite = torch.nan_to_num(logits, nan=-inf)
    plus = finite == inf
    p = torch.where(plus.any(1, keepdim=True), plus.double() / plus.sum(1, keepdim=True).clamp_min(1),
                    torch.softmax(finite, -1))
    ids, w = out.ids.long().cpu(), out.weights.detach().double().cpu()
    g_p = gps.expand(5, 6).clone()
    g_x = torch.zeros(5, 6, dtype=torch.float64)
    if mode == "softmax_topk":
        chosen = gw
        if renorm:
            total = p.gather(1, ids).sum(1, keepdim=True)
            chosen = (gw - (gw * w).sum(1, keepdim=True)) / total
        g_p.scatter_add_(1, ids, chosen)
    else:
        g_x.scatter_add_(1, ids, w * (gw - (gw * w).sum(1, keepdim=True)))
    want = g_x + p * (g_p - (p * g_p).sum(1, keepdim=True)) + glse[:, None] * p
    want = torch.where(finite == -inf, 0.0, want)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("E,k", [(300, 4), (2048, 2)])
def test_route_backward_kernel_with_many_experts(E, k):
    """Rows per program shrink as E grows (tiles of 4096 logits): the kernel's gradient equals
    the PyTorch formula's."""
    from moelora.ops import routing_autograd

    g = torch.Generator().manual_seed(E)
    logits = (torch.randn(9, E, generator=g) * 2).to(DEVICE)
    out = moelora.route(logits, k, renormalize=True)
    grads = [t.to(DEVICE) for t in (torch.randn(9, k, generator=g), torch.randn(E, generator=g),
                                    torch.randn(9, generator=g))]
    got = routing_autograd._router_topk_backward(logits, out.ids, out.weights, *grads, 0, True)
    want = routing_autograd._route_backward_torch(logits, out.ids, out.weights, 0, True, *grads)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,renorm", MODES)
def test_route_backward_kernel_reads_broadcast_gradients(mode, renorm):
    """Gradients as autograd hands them over for sums (expanded: stride 0) and sliced (strided):
    the kernel reads them through their strides, equal to the PyTorch formula on copies."""
    from moelora.ops import routing_autograd
    from moelora.ops import routing_torch as fb

    T, E, k = 10, 6, 2
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(T, E, generator=g).to(DEVICE)
    code = fb.TOPK_SOFTMAX if mode == "topk_softmax" else fb.SOFTMAX_TOPK
    out = moelora.route(logits, k, mode=mode, renormalize=renorm)
    g_weights = torch.randn(T, 2 * k, generator=g).to(DEVICE)[:, ::2]  # strided
    g_prob_sums = torch.full((1,), 0.75, device=DEVICE).expand(E)  # d sum(prob_sums) * 0.75
    g_lse = torch.full((1,), -1.5, device=DEVICE).expand(T)
    grads = (g_weights, g_prob_sums, g_lse)
    got = routing_autograd._router_topk_backward(logits, out.ids, out.weights, *grads, code, renorm)
    want = routing_autograd._route_backward_torch(logits, out.ids, out.weights, code, renorm,
                                                  *(t.contiguous() for t in grads))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("given", ["all", "weights", "stats"])
def test_route_backward_op_opcheck(given, monkeypatch):
    """The custom op that torch.compile traces for the routing op's backward kernel."""
    from moelora.ops.routing_autograd import router_topk_backward

    monkeypatch.setenv("MOELORA_BACKEND", "auto")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 6, generator=g).to(DEVICE)
    out = moelora.route(logits, 2, renormalize=True)
    gw, gps, glse = (t.to(DEVICE) for t in (torch.randn(20, 2, generator=g), torch.randn(6, generator=g),
                                            torch.randn(20, generator=g)))
    grads = {"all": (gw, gps, glse), "weights": (gw, None, None), "stats": (None, gps, None)}[given]
    torch.library.opcheck(router_topk_backward.default, (logits, out.ids, out.weights, *grads, 0, True))


@pytest.mark.parametrize("path", PATHS)
def test_route_validation(path):
    logits = torch.randn(4, 6)
    cases = [
        (ValueError, "top_k", (logits, 7)), (ValueError, "top_k", (logits, 0)), (TypeError, "top_k", (logits, 2.0)),
        (TypeError, "logits", (logits.long(), 2)), (TypeError, "logits", (logits.numpy(), 2)),
        (ValueError, "experts", (torch.randn(2, 5000), 2)), (ValueError, "experts", (torch.randn(2, 0), 1)),
    ]
    for exc, word, args in cases:
        with pytest.raises(exc, match=word):
            run_path(path, moelora.route, *args)
    with pytest.raises(ValueError, match="mode"):
        run_path(path, moelora.route, logits, 2, mode="sigmoid")
    with pytest.raises(TypeError, match="renormalize"):
        run_path(path, moelora.route, logits, 2, renormalize=1)


@needs_c
def test_native_op_checks_arguments():
    with pytest.raises(ValueError, match="top_k"):
        torch.ops.moelora.router_topk(torch.randn(3, 4), 5, 0, False)
    with pytest.raises(ValueError, match="number of experts"):
        torch.ops.moelora.router_topk(torch.randn(3, 5000), 2, 0, False)
    with pytest.raises(TypeError, match="logits"):
        torch.ops.moelora.router_topk(torch.ones(3, 4, dtype=torch.int32), 2, 0, False)


# ---- CUDA ----------------------------------------------------------------------------------
@needs_cuda_kernels
@pytest.mark.parametrize("T,E,k", [(65536, 64, 2), (4099, 8, 2), (1000, 257, 8), (33, 4096, 4), (0, 16, 2), (9, 5, 5)])
@pytest.mark.parametrize("mode,renorm", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_route_cuda_matches_cpu(T, E, k, mode, renorm, dtype):
    logits = (torch.randn(T, E) * 2).to(dtype)
    if T > 8:
        logits[1] = float("nan")
        logits[2, : E // 2] = float("nan")
        logits[3] = torch.round(logits[3])  # ties
    cpu = moelora.route(logits, k, mode=mode, renormalize=renorm)
    gpu = moelora.route(logits.cuda(), k, mode=mode, renormalize=renorm)
    gpu2 = moelora.route(logits.cuda(), k, mode=mode, renormalize=renorm)
    assert all(torch.equal(a, b) for a, b in zip(gpu, gpu2))  # bitwise reproducible
    assert torch.equal(gpu.ids.cpu(), cpu.ids) and torch.equal(gpu.counts.cpu(), cpu.counts)
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.lse.cpu(), cpu.lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu.prob_sums.cpu(), cpu.prob_sums, rtol=1e-4, atol=1e-3)


@needs_cuda_kernels
def test_route_cuda_fp64_and_grad():
    logits = torch.randn(300, 2500, dtype=torch.float64)  # fp64 with opted-in shared memory
    cpu = moelora.route(logits, 3, renormalize=True)
    gpu = moelora.route(logits.cuda(), 3, renormalize=True)
    assert torch.equal(gpu.ids.cpu(), cpu.ids)
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=1e-12, atol=1e-14)
    x = logits[:8, :9].cuda().requires_grad_()
    torch.autograd.gradcheck(_route_sum("native", "topk_softmax", False, 2, torch.randn(9, dtype=torch.float64,
                                                                                        device="cuda")), (x,))
    torch.library.opcheck(torch.ops.moelora.router_topk.default, (x, 2, 0, True))


@needs_cuda_kernels
@pytest.mark.parametrize("mode,renorm", MODES)
def test_route_cuda_plus_inf_logits_match_cpu(mode, renorm):
    inf = float("inf")
    logits = torch.randn(70, 40)
    logits[0, 7] = inf
    logits[1, [3, 30]] = inf
    logits[2, :] = float("nan")
    logits[2, 39] = inf
    logits[3, 5], logits[3, 6] = inf, 1e30
    cpu = moelora.route(logits, 3, mode=mode, renormalize=renorm)
    gpu = moelora.route(logits.cuda(), 3, mode=mode, renormalize=renorm)
    assert torch.equal(gpu.ids.cpu(), cpu.ids) and torch.equal(gpu.counts.cpu(), cpu.counts)
    assert torch.equal(gpu.lse.cpu()[:4], cpu.lse[:4]) and torch.isinf(cpu.lse[:4]).all()
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.prob_sums.cpu(), cpu.prob_sums, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(gpu.weights).all() and torch.isfinite(gpu.prob_sums).all()


@pytest.mark.parametrize("path", PATHS)
def test_route_forward_mode_ad_carries_the_tangents_on_every_path(path):
    """torch.func.jvp of route's weights and lse (forward-mode AD: the ops' PyTorch formulas) equals the jvp of
    softmax(logits) at the chosen ids, and of logsumexp, in float64."""
    from torch.func import jvp

    logits, tangent = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :2]

    def routed(z):
        r = run_path(path, moelora.route, z, 2)
        return r.weights, r.lse

    got = jvp(routed, (logits,), (tangent,))[1]
    want = jvp(lambda z: (z.softmax(-1).gather(1, ids), z.logsumexp(-1)), (logits,), (tangent,))[1]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
