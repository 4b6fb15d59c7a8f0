"""Each Triton launcher writes exactly its output: results go into strided views of larger
NaN-filled buffers, the view must be fully written and right, the margins untouched."""

import contextlib
import os
import weakref

import pytest
import torch

from benchmarks import tile_candidates
from conftest import DEVICE
from helpers import TOLERANCE, rel_err
from moelora.kernels import launchers as K
from moelora.ops.routing import dispatch_metadata, expert_layout
from moelora.ops.moe_lora import dense_gates

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
    """Split over K (fp32 partials summed in a fixed order), alpha applied to each slice and the addend
    added once, after the sum (test_matmul's split_k=True does not split on a CPU)."""
    monkeypatch.setattr(K, "_target_programs", lambda device: 64)
    a, b, d = randn(16, 2048), randn(2048, 16), randn(16, 16)
    for addend, expected in ((None, a.double() @ b.double()), (d, 0.5 * a.double() @ b.double() + d.double())):
        big, out = poisoned_view(16, 16)
        K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.float32, split_k=True, out=out,
                 alpha=1.0 if addend is None else 0.5, addend=addend)
        assert_only_view_written(big, out, expected, TOLERANCE[torch.float32])


def routing(T, E, k):
    ids = torch.rand(T, E).argsort(1)[:, :k].to(DEVICE)
    return ids, torch.rand(T, k, device=DEVICE)


@pytest.mark.parametrize("shared_a", [True, False])
def test_gate_backward(shared_a):
    T, E, r, k, s = 45, 5, 3, 2, 0.3
    ids, w = routing(T, E, k)
    h = randn(T, r if shared_a else E * r)
    G = dense_gates(ids, w, E, torch.float64) * s
    h3 = h.double().view(T, 1 if shared_a else E, r).expand(T, E, r)
    dhg = randn(T, E * r)
    big_dh, dh = poisoned_view(T, h.shape[1])
    big_dw, dw = poisoned_view(T, k)
    _, _, hg = K.gate_backward(dhg, h, ids, w, num_experts=E, rank=r, scaling=s, shared_a=shared_a, dh=dh, dw=dw,
                               hg_dtype=torch.float32)
    assert rel_err(hg, (G[:, :, None] * h3).reshape(T, E * r)) < 1e-6
    dhg3 = dhg.double().view(T, E, r)
    dh_ref = (G[:, :, None] * dhg3)
    dh_ref = dh_ref.sum(1) if shared_a else dh_ref.reshape(T, E * r)
    P = s * (dhg3 * h3).sum(-1)
    assert_only_view_written(big_dh, dh, dh_ref, 1e-6)
    assert_only_view_written(big_dw, dw, P.gather(1, ids), 1e-6)


ROUTER_MODES = {"softmax_topk": ("softmax_topk", True), "softmax_topk_plain": ("softmax_topk", False),
                "topk_softmax": ("topk_softmax", True), "threshold": ("threshold", True)}


@pytest.mark.parametrize("with_aux", [True, False], ids=["aux", "no_aux"])
@pytest.mark.parametrize("mode", list(ROUTER_MODES))
def test_gate_backward_differentiates_router_and_aux_loss(mode, with_aux):
    """d logits of L = sum_j w[t,j] * P[t, ids[t,j]] + g * aux(counts, prob_sums, lse), P the
    gate gradient, against float64 autograd through moelora's routing op."""
    from moelora.ops.losses import aux_losses
    from moelora.ops.routing_modes import route_logits

    T, E, r, s, g = 45, 6, 4, 0.3, 1.7
    k = 3 if mode == "threshold" else 2
    logits = (randn(T, E) * 2).double().requires_grad_()
    logits.data[3, :] = float("-inf")  # a fully masked row
    logits.data[4, 2] = float("nan")
    route_mode, renorm = ROUTER_MODES[mode]
    routing_ref = route_logits(logits, route_mode, k, renorm, eps=0.3 if mode == "threshold" else 0.0)
    h, dhg = randn(T, r), randn(T, E * r)
    P = s * (dhg.double().view(T, E, r) * h.double()[:, None, :]).sum(-1)
    loss = (routing_ref.weights * P.gather(1, routing_ref.ids.long())).sum()
    aux, _ = aux_losses(routing_ref.counts, routing_ref.prob_sums, routing_ref.lse, 0.01, 0.001)
    if with_aux:
        loss = loss + g * aux
    (dl_ref,) = torch.autograd.grad(loss, logits)
    router = K.RouterGrad(logits.detach().float(), routing_ref.counts, torch.tensor(g, device=DEVICE) if with_aux
                          else None, mode, 0.01, 0.001)
    dh, dl = K.gate_backward(dhg, h, routing_ref.ids, routing_ref.weights.float(), num_experts=E, rank=r,
                             scaling=s, shared_a=True, router=router)
    assert torch.isfinite(dl).all() and rel_err(dl, dl_ref) < 1e-5
    assert torch.equal(dl[3], torch.zeros(E, device=DEVICE))  # logits read as -inf get no gradient
    # the grouped regime's router_backward, from the weights' gradient dw = P[t, ids[t, j]]
    dw = P.gather(1, routing_ref.ids.long()).float()
    dl_rows = K.router_backward(dw, routing_ref.ids, routing_ref.weights.float(), router)
    assert torch.isfinite(dl_rows).all() and rel_err(dl_rows, dl_ref) < 1e-5
    assert torch.equal(dl_rows[3], torch.zeros(E, device=DEVICE))
    if with_aux:  # strided counts (a view of every other element) give the same gradients
        counts = torch.stack([routing_ref.counts, torch.full_like(routing_ref.counts, 99)], 1)[:, 0]
        strided = router._replace(counts=counts)
        _, dl_strided = K.gate_backward(dhg, h, routing_ref.ids, routing_ref.weights.float(), num_experts=E, rank=r,
                                        scaling=s, shared_a=True, router=strided)
        assert torch.equal(dl_strided, dl)
        assert torch.equal(K.router_backward(dw, routing_ref.ids, routing_ref.weights.float(), strided), dl_rows)


@pytest.mark.parametrize("given", ["g_prob_sums", "g_lse"])
def test_router_backward_takes_the_stat_gradients_together(given):
    """g_prob_sums and g_lse go together (the kernel reads both or neither): one alone is a ValueError,
    not a kernel reading a placeholder for the other."""
    T, E, k = 10, 5, 2
    ids, w = routing(T, E, k)
    router = K.RouterGrad(randn(T, E), None, None, "softmax_topk", 0.01, 0.001)
    stats = dict(g_prob_sums=randn(E), g_lse=randn(T))
    with pytest.raises(ValueError, match="g_prob_sums and g_lse go together"):
        K.router_backward(randn(T, k), ids, w, router, **{given: stats[given]})


def test_lora_down_reads_x_once_for_h_and_logits():
    T, d, R, E = 70, 90, 24, 6
    x, a, wr = randn(T, 3 * d)[:, ::3], randn(R, d, dtype=torch.float64), randn(E, d)  # strided x, fp64 A
    h, logits = K.lora_down(x, a, wr)
    assert h.dtype == logits.dtype == torch.float32
    assert rel_err(h, x.double() @ a.t()) < 1e-6 and rel_err(logits, x.double() @ wr.double().t()) < 1e-6
    h_only, none = K.lora_down(x, a)
    assert none is None and torch.equal(h_only, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_router_aux_loss_backward(dtype):
    """d prob_sums = lb_coef E / T^2 g counts and d lse = 2 z_coef / T g lse, from strided counts and
    lse, over several programs of experts and of tokens."""
    T, E, lb, z = 2500, 1100, 0.01, 0.001
    counts = torch.randint(0, 50, (E, 2), device=DEVICE)[:, 0]
    lse = torch.randn(T, 3, device=DEVICE, dtype=dtype)[:, 1]
    g = torch.tensor(1.7, device=DEVICE)
    g_ps, g_lse = K.router_aux_loss_backward(g, counts, lse, lb, z)
    assert g_ps.dtype == g_lse.dtype == dtype and g_ps.shape == (E,) and g_lse.shape == (T,)
    assert rel_err(g_ps, 1.7 * lb * E / T ** 2 * counts.double()) < 1e-6
    assert rel_err(g_lse, 1.7 * 2 * z / T * lse.double()) < 1e-6


def keep_mask(rows, cols, p=0.3):
    """A LoRA-dropout keep mask [rows, cols] (bool), as a transposed view: any strides are read."""
    return (torch.rand(cols, rows, device=DEVICE) >= p).t()


def test_lora_down_with_a_dropout_mask_masks_h_only():
    """h = s * (x (.) keep) A^T with the keep mask read beside x; the logits read x unmasked."""
    T, d, R, E, s = 70, 90, 24, 6, 1 / 0.7
    x, a, wr, keep = randn(T, d), randn(R, d), randn(E, d), keep_mask(T, d)
    h, logits = K.lora_down(x, a, wr, mask=keep, mask_scale=s)
    x_lora = torch.where(keep, x.double() * s, 0)
    assert rel_err(h, x_lora @ a.double().t()) < 1e-6 and rel_err(logits, x.double() @ wr.double().t()) < 1e-6
    h_only, _ = K.lora_down(x, a, mask=keep, mask_scale=s)
    assert torch.equal(h_only, h)


@pytest.mark.parametrize("sanitize_b", [False, True], ids=["plain", "sanitized"])
def test_matmul_masks_the_first_product_only(sanitize_b):
    """mask_scale * keep (.) (a @ b) + a2 @ b2 + addend: LoRA dropout's dx in one launch."""
    M, Kd, N, K2, s = 50, 30, 40, 6, 2.0
    a, b, a2, b2, d, keep = randn(M, Kd), randn(Kd, N), randn(M, K2), randn(K2, N), randn(M, N), keep_mask(M, N)
    if sanitize_b:
        b[3, 5] = float("nan")
        a[:, 3] = 0  # no row weighs the NaN
    big, out = poisoned_view(M, N)
    K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.float32, second=(a2, b2), addend=d, mask=keep,
             mask_scale=s, sanitize_b=sanitize_b, out=out)
    clean = torch.where(torch.isfinite(b), b, 0).double()
    expected = torch.where(keep, s * (a.double() @ clean), 0) + a2.double() @ b2.double() + d.double()
    assert_only_view_written(big, out, expected, 1e-6)
    with pytest.raises(ValueError, match="not to split_k"):
        K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.float32, mask=keep, split_k=True)


def test_lora_down_with_router_jitter_scales_the_router_input_only():
    """logits = (x (.) J) W_router^T (fp32 product), h from x (or x_lora with a dropout mask too)."""
    T, d, R, E, s = 70, 90, 24, 6, 1 / 0.7
    x, a, wr, keep = randn(T, d), randn(R, d), randn(E, d), keep_mask(T, d)
    jit = 1 + 0.2 * (2 * torch.rand(d, T, device=DEVICE) - 1).t()  # a transposed view: any strides
    h, logits = K.lora_down(x, a, wr, mask=keep, mask_scale=s, jitter=jit)
    assert rel_err(logits, (x.double() * jit.double()) @ wr.double().t()) < 1e-6
    assert rel_err(h, torch.where(keep, x.double() * s, 0) @ a.double().t()) < 1e-6


def test_matmul_scales_the_second_product_elementwise():
    """a @ b + S2 (.) (a2 @ b2): router jitter's dx in one launch, beside LoRA dropout's mask."""
    M, Kd, N, K2 = 50, 30, 40, 6
    a, b, a2, b2, keep, s2 = randn(M, Kd), randn(Kd, N), randn(M, K2), randn(K2, N), keep_mask(M, N), randn(M, N)
    big, out = poisoned_view(M, N)
    K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.float32, second=(a2, b2), mask=keep, mask_scale=2.0,
             second_scale=s2, out=out)
    expected = torch.where(keep, 2.0 * (a.double() @ b.double()), 0) + s2.double() * (a2.double() @ b2.double())
    assert_only_view_written(big, out, expected, 1e-6)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("with_router", [True, False])
def test_lora_weight_grad_with_a_dropout_mask(with_router, splits):
    """dA = dh^T (s * x (.) keep) while dW_router = dlogits^T x reads x unmasked, in one kernel."""
    T, d_in, d_out, E, r, R, s = 75, 40, 33, 5, 3, 15, 1 / 0.6
    hg, dy, x, dh, dl, keep = randn(T, E * r), randn(T, d_out), randn(T, d_in), randn(T, R), randn(T, E), \
        keep_mask(T, d_in, 0.4)
    db = torch.empty(E, d_out, r, device=DEVICE)
    big_a, da = poisoned_view(R, d_in)
    big_r, dr = poisoned_view(E, d_in)
    K.lora_weight_grad(dy, x, hg, dh, dl if with_router else None, rank=r, scaling=1.0, dlora_b=db, dlora_a=da,
                       drouter=dr if with_router else None, mask=keep, mask_scale=s, splits=splits)
    x_lora = torch.where(keep, x.double() * s, 0)
    assert_only_view_written(big_a, da, dh.double().t() @ x_lora, 1e-6)
    assert rel_err(db, (dy.double().t() @ hg.double()).view(d_out, E, r).permute(1, 0, 2)) < 1e-6
    if with_router:
        assert_only_view_written(big_r, dr, dl.double().t() @ x.double(), 1e-6)
        # router jitter: dW_router reads x (.) J, with the dropout mask on dA or without it
        jit = 1 + 0.2 * (2 * torch.rand(T, d_in, device=DEVICE) - 1)
        for m in (keep, None):
            K.lora_weight_grad(dy, x, hg, dh, dl, rank=r, scaling=1.0, dlora_b=db, dlora_a=da, drouter=dr, mask=m,
                               mask_scale=s, jitter=jit, splits=splits)
            x_a = x_lora if m is not None else x.double()
            assert rel_err(da, dh.double().t() @ x_a) < 1e-6
            assert rel_err(dr, dl.double().t() @ (x.double() * jit.double())) < 1e-6


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("with_router", [True, False])
def test_lora_weight_grad(with_router, splits):
    """dB (written in its [E, d_out, r] layout), dA and dW_router into strided views of NaN buffers,
    in one kernel (plus the reduction of forced splits of T); experts without tokens get exact zeros."""
    T, d_in, d_out, E, r, R, s = 75, 40, 33, 5, 3, 15, 1e39  # a scale beyond fp32: hg holds 2^64-ish of it
    hg = randn(T, E * r)
    hg[:, 4 * r:] = 0  # expert 4 gets no token
    dy, x, dh, dl = randn(T, d_out), randn(T, d_in), randn(T, R), randn(T, E)
    s_in, s_out = K.scale_factors(s)
    big_b = torch.full((E, d_out + 1, r + 2), NAN, device=DEVICE)
    db = big_b[:, 1:, 1:-1]
    big_a, da = poisoned_view(R, d_in)
    big_r, dr = poisoned_view(E, d_in)
    K.lora_weight_grad(dy, x, hg, dh, dl if with_router else None, rank=r, scaling=s, dlora_b=db, dlora_a=da,
                       drouter=dr if with_router else None, splits=splits)
    db_ref = s_out * torch.einsum("tn,tc->nc", dy.double(), hg.double()).view(d_out, E, r).permute(1, 0, 2)
    assert torch.isfinite(db).all() and rel_err(db, db_ref) < 1e-6
    assert torch.isnan(big_b[:, 0]).all() and torch.isnan(big_b[:, :, 0]).all() and torch.isnan(big_b[:, :, -1]).all()
    assert torch.equal(db[4], torch.zeros_like(db[4]))
    assert_only_view_written(big_a, da, dh.double().t() @ x.double(), 1e-6)
    if with_router:
        assert_only_view_written(big_r, dr, dl.double().t() @ x.double(), 1e-6)
    else:
        assert torch.isnan(big_r).all()


@pytest.mark.parametrize("with_router", [False, True])
def test_lora_weight_grad_without_tokens_writes_zeros(with_router):
    """No tokens: dB, dA (and dW_router) are exact zeros, written into NaN buffers; no kernel runs."""
    d_in, d_out, E, r, R = 40, 33, 5, 3, 15
    db, da, dr = (torch.full(shape, NAN, device=DEVICE) for shape in ((E, d_out, r), (R, d_in), (E, d_in)))
    K.lora_weight_grad(randn(0, d_out), randn(0, d_in), randn(0, E * r), randn(0, R), randn(0, E) if with_router
                       else None, rank=r, scaling=1.0, dlora_b=db, dlora_a=da, drouter=dr if with_router else None)
    assert torch.equal(db, torch.zeros_like(db)) and torch.equal(da, torch.zeros_like(da))
    assert torch.equal(dr, torch.zeros_like(dr)) if with_router else torch.isnan(dr).all()


def _expand_with_aux(res, weights, count_kept, tiles=None, width=24):
    """gated_expand over random h and B [E, width, r] with the routing ``res`` (ids, and ``weights``) and its aux
    loss."""
    T, k = res.ids.shape
    E, r = res.counts.shape[0], 4
    aux = K.RouterAux(res.counts, res.prob_sums, res.lse, 0.01, 0.001, count_kept=count_kept)
    h, B = randn(T, r), randn(E, width, r)
    y, loss, stats, counts = K.gated_expand(h, res.ids, weights, B, scaling=0.5, shared_a=True, aux=aux, tiles=tiles)
    assert y.shape == (T, width)
    assert rel_err(y, K.gated_expand(h, res.ids, weights, B, scaling=0.5, shared_a=True, tiles=tiles)) == 0
    # the grouped regime's launch of its own computes the same, bit for bit
    alone = K.router_aux_loss(res.ids, weights, aux)
    assert all(torch.equal(a, b) for a, b in zip(alone, (loss, stats, counts)))
    return loss, stats, counts


@pytest.mark.parametrize("tiles", [None, dict(BLOCK_T=16, BLOCK_N=16)], ids=["default", "many programs"])
def test_gated_expand_computes_the_router_aux_loss(tiles):
    """The aux loss of the layer's router, computed by the gated expand's first program, matches
    the PyTorch formula; the expansion is unchanged by it."""
    from moelora.ops.losses import aux_losses
    from moelora.ops.routing import route

    res = route(randn(3000, 7) * 3, 2, renormalize=True)
    loss, stats, counts = _expand_with_aux(res, res.weights, False, tiles)
    ref_loss, ref_stats = aux_losses(res.counts, res.prob_sums.double(), res.lse.double(), 0.01, 0.001)
    assert rel_err(loss, ref_loss) < 1e-6 and rel_err(stats, ref_stats) < 1e-6 and counts is res.counts


@pytest.mark.parametrize("T, N", [(300, 0), (0, 24)], ids=["no columns", "no tokens"])
def test_gated_expand_with_an_empty_output_still_computes_the_router_aux_loss(T, N):
    """An empty y (a layer of out_features 0; no tokens) still gets the aux loss, counts and stats
    from the same launch, equal to router_aux_loss's (at T 0: zero loss and stats)."""
    from moelora.ops.routing import route

    res = route(randn(T, 6) * 3, 2, renormalize=True)
    loss, stats, counts = _expand_with_aux(res, res.weights, False, width=N)  # y [T, N], router_aux_loss's
    assert counts is res.counts
    assert T or (loss == 0 and (stats == 0).all())


@pytest.mark.parametrize("ramp, E", [(0, 6), (4, 6), (0, 16)])
@pytest.mark.parametrize("training", [True, False])
def test_threshold_weights_and_kept_counts(training, ramp, E):
    """ST-MoE threshold routing in one kernel (eps schedule read on the device) equals the PyTorch
    formula; the aux kernel recounts the kept slots (E 16: a power of two, the dropped slots' histogram
    bin lies past the experts' all the same)."""
    from moelora.ops.losses import aux_losses
    from moelora.ops.routing_modes import kept_counts, scheduled_eps, threshold_keep
    from moelora.ops.routing import route

    T, n = 300, 3
    res = route(randn(T, E) * 2, n)
    noise = torch.rand(n, T, device=DEVICE).t() if training else None  # strided: read at its own strides
    steps = torch.tensor(3, device=DEVICE)
    w = K.threshold_weights(res.weights, noise, steps, eps_start=0.05, eps_end=0.4, ramp_steps=ramp)
    ref = threshold_keep(res.weights, scheduled_eps(0.05, 0.4, ramp, steps), noise)
    assert torch.equal(w > 0, ref > 0) and rel_err(w, ref) < 1e-6
    assert 0 < (w == 0).sum() < T * (n - 1)  # some slots dropped, the best never
    loss, _, counts = _expand_with_aux(res, w, True)
    assert torch.equal(counts, kept_counts(res.ids, w, E))
    ref_loss, _ = aux_losses(counts, res.prob_sums, res.lse, 0.01, 0.001)
    assert rel_err(loss, ref_loss) < 1e-6


@pytest.mark.parametrize("start, end", [(0.7, 0.1), (0.4, 0.05)])
def test_threshold_weights_use_eps_end_exactly_from_the_ramps_end(start, end):
    """From num_steps = ramp on the kernel's eps is eps_end itself, as the PyTorch twin's
    (scheduled_eps): the kernel used to compute start + (end - start) * min(steps * fp32(1 / ramp), 1),
    and 41 * fp32(1 / 41) is 0.99999994, so eps stayed 1 ulp above eps_end for good and dropped a slot
    whose normalised probability is exactly eps_end."""
    from moelora.ops.routing_modes import scheduled_eps, threshold_keep

    p_end = torch.tensor(end, dtype=torch.float32)
    top_p = torch.stack([1 - p_end, p_end]).expand(4, 2).contiguous().to(DEVICE)  # p_hat of slot 2: fp32(end)
    assert torch.equal(top_p[:, 1] / top_p.sum(1), p_end.expand(4).to(DEVICE))
    for ramp in (41, 47):
        for steps in (ramp, ramp + 3):
            num_steps = torch.tensor(steps, device=DEVICE)
            w = K.threshold_weights(top_p, None, num_steps, eps_start=start, eps_end=end, ramp_steps=ramp)
            ref = threshold_keep(top_p, scheduled_eps(start, end, ramp, num_steps), None)
            assert torch.equal(w, ref) and bool((w[:, 1] > 0).all()), (ramp, steps, w)


@pytest.mark.parametrize("ramp", [0, 3], ids=["no_ramp", "ramp_ended"])
@pytest.mark.parametrize("eps_end", [-0.0, -0.25])
def test_threshold_weights_keep_every_slot_at_an_eps_not_above_zero_in_training(ramp, eps_end):
    """An eps <= 0 (-0.0 passes the router's eps >= 0 check; a RouterSpec given to moe_lora_linear
    may hold any) keeps every slot with training's draws too, as the PyTorch twin (noise <
    p_hat / eps alone would keep the best slot only for a negative eps)."""
    from moelora.ops.routing_modes import scheduled_eps, threshold_keep

    top_p = torch.softmax(torch.randn(37, 6), -1).topk(3, dim=-1).values.to(DEVICE)
    noise = torch.rand(37, 3, device=DEVICE)
    num_steps = torch.tensor(ramp + 1, device=DEVICE)  # past the ramp's end
    w = K.threshold_weights(top_p, noise, num_steps, eps_start=0.5, eps_end=eps_end, ramp_steps=ramp)
    ref = threshold_keep(top_p, scheduled_eps(0.5, eps_end, ramp, num_steps), noise)
    assert bool((w > 0).all())
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("r", [5, 4, 1], ids=["r5", "r4", "r1"])  # group read at run time / compiled in / one column
def test_matmul_stacked_b_second_pair_and_sanitized_b(r):
    """B_stack read from [E, K, r]; [a | a2] @ [b ; b2]; a non-finite entry of b reaches only the
    rows of a that weigh it."""
    M, Kd, E, K2 = 50, 30, 4, 6
    a, b, a2, b2 = randn(M, Kd), randn(E, Kd, r), randn(M, K2), randn(K2, E * r)
    big, out = poisoned_view(M, E * r)
    K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.float32, stacked_b=True, second=(a2, b2), out=out)
    b_stack = b.double().permute(1, 0, 2).reshape(Kd, E * r)
    assert_only_view_written(big, out, a.double() @ b_stack + a2.double() @ b2.double(), 1e-6)

    bad = randn(Kd, 8)
    bad[3, 5] = float("nan")
    bad[7, 2] = float("inf")
    a = randn(M, Kd)
    a[:10, 3] = 0  # rows 0-9 do not weigh the NaN
    a[:20, 7] = 0  # rows 0-19 do not weigh the Inf
    out = K.matmul(a, bad, out_dtype=torch.float32, compute_dtype=torch.float32, sanitize_b=True)
    clean = torch.where(torch.isfinite(bad), bad, 0).double()
    assert rel_err(out[:10], a[:10].double() @ clean) < 1e-6
    assert torch.isnan(out[10:, 5]).all() and torch.isnan(out[20:, 2]).all()
    assert torch.isfinite(out[10:20, 2]).all() and torch.isfinite(out[:, [0, 1, 3, 4, 6, 7]]).all()


@pytest.mark.parametrize("split_k", [False, True])
def test_sanitized_matmul_recomputes_only_tiles_that_are_not_finite(monkeypatch, split_k):
    """Tiles whose plain product is finite keep it (bitwise the result for a finite b); a tile with
    a non-finite b entry in reach is computed again in 16-row slices with sanitized dots, the
    second pair, alpha and the addend applied to each slice (split over K too)."""
    if split_k:
        monkeypatch.setattr(K, "_target_programs", lambda device: 64)
    M, Kd, N, K2 = 50, 600 if split_k else 30, 40, 6
    a, a2, b2, d = randn(M, Kd), randn(M, K2), randn(K2, N), randn(M, N)
    bad = randn(Kd, N)
    bad[3, 5], bad[7, 20] = NAN, float("inf")
    a[:10, 3] = 0  # rows 0-9 do not weigh the NaN
    a[:20, 7] = 0  # rows 0-19 do not weigh the Inf
    clean = torch.where(torch.isfinite(bad), bad, 0)
    kwargs = dict(out_dtype=torch.float32, compute_dtype=torch.float32, alpha=0.5, second=(a2, b2), addend=None if
                  split_k else d, split_k=split_k, sanitize_b=True, tiles=dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16))
    out = K.matmul(a, bad, **kwargs)
    out_clean = K.matmul(a, clean, **kwargs)
    assert torch.equal(out[:, 32:], out_clean[:, 32:])  # the third column tile: no sanitized pass
    expected = 0.5 * (a.double() @ clean.double() + a2.double() @ b2.double()) + (0 if split_k else d.double())
    poisoned = torch.zeros(M, N, dtype=torch.bool, device=DEVICE)
    poisoned[10:, 5], poisoned[20:, 20] = True, True
    assert torch.isnan(out[poisoned]).all() and torch.isfinite(out[~poisoned]).all()
    assert rel_err(out[~poisoned], expected[~poisoned]) < 1e-6


@pytest.mark.parametrize("shared_a", [True, False])
def test_gated_expand_recomputes_only_tiles_that_are_not_finite(shared_a):
    """Tiles whose plain product is finite keep it (bitwise the result for a finite B); a tile
    with a non-finite B entry in reach is computed again in 16-row slices with sanitized dots:
    NaN only where a token chose the expert, the reference elsewhere, bias added to every slice."""
    T, E, r, k, N, s = 70, 5, 4, 2, 40, 0.3
    ids, w = routing(T, E, k)
    h, B, bias = randn(T, r if shared_a else E * r), randn(E, N, r), randn(N)
    B[2, 20, 1], B[2, 35, 0] = NAN, -float("inf")  # column tiles 2 and 3 of 16; tile 1 stays finite
    clean_b = torch.where(torch.isfinite(B), B, 0)
    tiles = dict(BLOCK_T=32, BLOCK_N=16, BLOCK_C=16)  # E*r = 20: two Hg steps per tile
    out = K.gated_expand(h, ids, w, B, scaling=s, shared_a=shared_a, bias=bias, tiles=tiles)
    out_clean = K.gated_expand(h, ids, w, clean_b, scaling=s, shared_a=shared_a, bias=bias, tiles=tiles)
    assert torch.equal(out[:, :16], out_clean[:, :16])
    G = dense_gates(ids, w, E, torch.float64) * s
    h3 = h.double().view(T, 1 if shared_a else E, r).expand(T, E, r)
    expected = bias.double() + torch.einsum("te,ter,enr->tn", G, h3, clean_b.double())
    poisoned = torch.zeros(T, N, dtype=torch.bool, device=DEVICE)
    chose_2 = (ids == 2).any(1)
    poisoned[chose_2, 20] = True
    poisoned[chose_2, 35] = True
    assert torch.isnan(out[poisoned]).all() and torch.isfinite(out[~poisoned]).all()
    assert rel_err(out[~poisoned], expected[~poisoned]) < 1e-6


def _row_layout(T, E, k, block=16, experts=None):
    ids = torch.rand(T, E).argsort(1)[:, :k].to(DEVICE)
    if experts is not None:  # only the first ``experts`` experts get pairs
        ids = torch.rand(T, experts).argsort(1)[:, :k].to(DEVICE)
    return ids, dispatch_metadata(ids, E, block)


def _pair_rows(meta):
    """(rows holding a pair [n], their pairs [n]) of the row space."""
    rows = (meta.sorted_pairs_padded >= 0).nonzero().squeeze(1)
    return rows, meta.sorted_pairs_padded[rows]


def _rows_reference(x, W, ids, meta):
    """(rows holding a pair [n], float64 x[p // k] @ W[e]^T of their pairs p [n, N]; e = ids' expert of p)."""
    rows, pairs = _pair_rows(meta)
    return rows, torch.einsum("pd,pnd->pn", x.double()[pairs // ids.shape[1]], W.double()[ids.reshape(-1)[pairs]])


@pytest.mark.parametrize("N", [24, 80], ids=["N24", "N80"])  # 80: wider than a column tile of the interpreter's (64)
def test_grouped_matmul_rows_with_second_operand_scale_and_gate_grad(N):
    """Row r of expert e gets scale[p] * alpha * (x[t] @ W[e]^T + a2[t] @ W2[e]^T), t = p // k; the gate-gradient
    epilogue writes dw[p] = <alpha * x[p // k] @ W[e]^T ..., h[p // k]>, a dot over all N columns (one column
    tile, however wide). The padding rows' zeros: test_grouped_matmul_writes_zeros_on_rows_without_a_pair."""
    T, E, k, d_in = 37, 6, 2, 20
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


@pytest.mark.parametrize("anchored", [False, True])
def test_combine_rows_ignores_the_coefficients_of_slots_outside_the_layout(anchored):
    """Slots left out of the layout (id -1) add nothing, whatever their coefficient holds (NaN here)."""
    T, E, k, N = 29, 5, 3, 40
    ids = torch.rand(T, E).argsort(1)[:, :k].to(DEVICE)
    out_of_layout = torch.rand(T, k, device=DEVICE) < 0.3
    out_of_layout[:, 0] = False  # the anchor slot stays in
    ids[out_of_layout] = -1
    meta = expert_layout(ids, E, 16)
    R = meta.sorted_pairs_padded.numel()
    rows, coef = randn(R, N), torch.rand(T, k, device=DEVICE)
    coef[out_of_layout] = NAN
    y = K.combine_rows(rows, meta, out_dtype=torch.float32, coef=coef, anchored=anchored)
    z = rows.double()[meta.inverse_padded]  # [T, k, N]
    anchor = z[:, :1] if anchored else torch.zeros_like(z[:, :1])
    c = torch.where(out_of_layout, 0.0, coef.double())
    expected = anchor.squeeze(1) + (c[:, :, None] * (z - anchor)).sum(1)
    assert out_of_layout.any() and (meta.inverse_padded[out_of_layout] == -1).all()
    assert torch.isfinite(y).all() and rel_err(y, expected) < 1e-6


def test_scale_factors_split_every_accepted_scaling_into_two_fp32_factors():
    """scale_factors(s) = (a, b) with a * b == s exactly, both in float32's normal range (the kernels take
    them as float32 scalars), over the whole accepted range [2**-250, 2**250] (both signs); outside it a
    ValueError."""
    for e in (-250, -249, -200, -130, -65, 0, 64, 65, 100, 130, 200, 249, 250):
        for s in (2.0 ** e, -1.7 * 2.0 ** min(e, 249)):
            a, b = K.scale_factors(s)
            assert a * b == s and all(2.0 ** -126 <= abs(f) < 2.0 ** 127 for f in (a, b)), (s, a, b)
    for s in (2.0 ** 251, -(2.0 ** -251)):
        with pytest.raises(ValueError, match="scaling must be 0 or of magnitude"):
            K.scale_factors(s)


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


def test_grouped_weight_grad_split_over_rows(monkeypatch):
    """With an expert's rows split over several programs (as on a GPU with few output tiles), each slice
    sums its own rows into an fp32 partial and the partials are added in a fixed order: the float64 sum."""
    T, E, k, NA, NB = 64, 3, 2, 12, 20  # ~64 rows per expert: 32-row slices 0 and 1 hold rows, slice 2 none
    monkeypatch.setattr(K, "_split_count", lambda tiles, reduction, device, min_per_split=256: 3)
    K.clear_launch_caches()  # launches cached with one split
    try:
        ids, meta = _row_layout(T, E, k, experts=2)  # expert 2 gets nothing: exact zeros
        R = meta.sorted_pairs_padded.numel()
        w, dy, x_rows = torch.rand(T * k, device=DEVICE), randn(T, NA), randn(R, NB)
        grad = K.grouped_weight_grad(dy, x_rows, meta, left_by_token=True, right_by_token=False,
                                     compute_dtype=torch.float32, out_dtype=torch.float32, alpha=0.5, scale=w)
        sums = K.segment_sum(x_rows, meta, out_dtype=torch.float32)
    finally:
        K.clear_launch_caches()
    rows, pairs = _pair_rows(meta)
    onehot = torch.nn.functional.one_hot(ids.reshape(-1)[pairs], E).double()
    assert onehot.sum(0).min().item() == 0 and onehot.sum(0)[:2].min().item() > 32  # the layout the comment says
    ref = 0.5 * torch.einsum("pe,pn,pd->end", onehot * w.double()[pairs, None], dy.double()[pairs // k],
                             x_rows.double()[rows])
    assert rel_err(grad, ref) < 1e-6 and torch.equal(grad[2], torch.zeros_like(grad[2]))
    assert rel_err(sums, onehot.t() @ x_rows.double()[rows]) < 1e-6


def test_grouped_weight_grad_keeps_nonfinite_rows_in_their_expert():
    """Inf and NaN in one expert's rows make only that expert's gradient (and row sum) non-finite: the other
    experts' reductions, whose last row slice ends inside the next segment, read nothing of it."""
    counts = [5, 15, 12]  # expert 0's padded segment (16 rows) ends halfway into a 32-row slice
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)]).to(DEVICE)[:, None]
    T, E, NA, NB = ids.shape[0], len(counts), 12, 20
    meta = dispatch_metadata(ids, E, 16)
    R = meta.sorted_pairs_padded.numel()
    rows, pairs = _pair_rows(meta)
    e = ids.reshape(-1)[pairs]
    left, right = randn(R, NA), randn(T, NB)
    left[rows[e == 1]] = torch.tensor([float("inf"), NAN], device=DEVICE).repeat(NA // 2)
    grad = K.grouped_weight_grad(left, right, meta, left_by_token=False, right_by_token=True,
                                 compute_dtype=torch.float32, out_dtype=torch.float32)
    sums = K.segment_sum(left, meta, out_dtype=torch.float32)
    for x in (0, 2):
        mine = e == x
        assert rel_err(grad[x], left.double()[rows[mine]].t() @ right.double()[pairs[mine]]) < 1e-6
        assert rel_err(sums[x], left.double()[rows[mine]].sum(0)) < 1e-6
    assert not torch.isfinite(grad[1]).any() and not torch.isfinite(sums[1]).any()


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


def test_combine_rows_backward_reads_a_strided_row_coef():
    """The kernel reads row_coef at unit stride: a strided one (a view of every other element) gives
    drows of its values all the same (and g, which does not depend on it)."""
    T, E, k, N = 23, 4, 2, 40
    ids, meta = _row_layout(T, E, k)
    R = meta.sorted_pairs_padded.numel()
    dy, rows, coef = randn(T, N), randn(R, N), torch.rand(T * k, device=DEVICE)
    strided = torch.stack([coef, torch.full_like(coef, 7.0)], 1)[:, 0]
    assert not strided.is_contiguous()
    drows, g = K.combine_rows_backward(dy, rows, meta, ids, strided)
    r, pairs = _pair_rows(meta)
    assert rel_err(drows[r], coef.double()[pairs, None] * dy.double()[pairs // k]) < 1e-6
    assert rel_err(g[pairs], (dy.double()[pairs // k] * rows.double()[r]).sum(1)) < 1e-6


@pytest.mark.parametrize("normalize", [False, True])
def test_mixing_weights_backward_reads_a_strided_g(normalize):
    """The kernel reads g at unit stride: a strided one (a view of every other element) gives the gradient of
    its values all the same: d/dw of sum_j c_j(w) g_j, c = w (normalized: w / sum w), in float64."""
    T, E, k = 37, 5, 3
    ids, w = routing(T, E, k)
    g = randn(T * k)
    strided = torch.stack([g, torch.full_like(g, 7.0)], 1)[:, 0]
    assert not strided.is_contiguous()
    dw = K.mixing_weights_backward(strided, ids, w, E, normalize)
    w64 = w.double().requires_grad_()
    c = w64 / w64.sum(1, keepdim=True) if normalize else w64
    (c * g.double().view(T, k)).sum().backward()
    assert rel_err(dw, w64.grad) < 1e-5


@pytest.mark.parametrize("normalize", [False, True])
def test_mixing_weights_backward_reads_g_of_kept_slots_only(normalize):
    """Slots not kept (weight 0, or id outside [0, E)), slot 0 among them, leave g unwritten (NaN here): it is not
    read, their gradient is 0 and the others' the float64 autograd gradient of the anchored mix
    g_0 + sum_j c_j (g_j - g_0), c = w / max(sum w, tiny) over the kept slots; a row whose kept weights sum to
    0 (0.25, -0.25) gets (g_i - g_0) / tiny."""
    T, E, k = 37, 5, 3
    ids = torch.rand(T, E).argsort(1)[:, :k].to(DEVICE)
    w = torch.rand(T, k, device=DEVICE) + 0.1
    w[::4, 0] = 0.0
    ids[1::4, 0] = E
    w[2::4, 2] = 0.0
    w[3] = torch.tensor([0.25, -0.25, 0.0], device=DEVICE)
    kept = (w != 0) & (ids < E)
    g = randn(T, k)
    g[3] *= 0.1  # (g_i - g_0) / tiny within float32's range
    g[~kept] = NAN
    dw = K.mixing_weights_backward(g.reshape(-1), ids, w, E, normalize)
    w64 = torch.where(kept, w.double(), 0.0).requires_grad_()
    g64 = torch.where(kept, g.double(), 0.0)
    if normalize:
        c = w64 / w64.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        loss = (g64[:, :1] + (c * (g64 - g64[:, :1])).sum(1, keepdim=True)).sum()
    else:
        loss = (w64 * g64).sum()
    loss.backward()
    assert torch.equal(dw[~kept], torch.zeros_like(dw[~kept]))
    assert torch.isfinite(dw).all() and rel_err(dw, torch.where(kept, w64.grad, 0.0)) < 1e-5


ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
               "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"), "relu": torch.relu}


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("act, F_", [(act, 40) for act in ACTIVATIONS] + [(list(ACTIVATIONS)[0], 150)])
def test_glu_forward_backward(act, F_, gated):
    """act(hg + bg[e]) * (hu + bu[e]) and its gradients by autograd in float64; 0 on padding rows. F 150: more
    columns than a whole number of column tiles."""
    from moelora.ops.moe_ffn import ACTIVATION_CODES

    T, E, k = 21, 4, 2
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


@pytest.mark.parametrize("gated", [True, False])
def test_glu_backward_relu_gradient_at_exactly_zero_is_zero(gated):
    """ReLU's derivative at an input of exactly 0 is 0, as torch.relu's (a zero pre-activation: zero weights or an
    underflow), in the gate's gradient (gated) or the input's (ungated)."""
    from moelora.ops.moe_ffn import ACTIVATION_CODES

    T, E, k, F_ = 21, 4, 2, 40
    ids, meta = _row_layout(T, E, k)
    R = meta.sorted_pairs_padded.numel()
    hg, hu, dout = randn(R, F_), randn(R, F_), randn(R, F_)
    (hg if gated else hu)[:, ::3] = 0.0
    code = ACTIVATION_CODES["relu"]
    dhg, dhu = K.glu_backward(dout, hg if gated else None, hu, None, None, meta, ids, code)
    r, _ = _pair_rows(meta)
    g, u = hg.double()[r].requires_grad_(), hu.double()[r].requires_grad_()
    ref = torch.relu(g) * u if gated else torch.relu(u)
    ref_grads = torch.autograd.grad(ref, [g, u] if gated else [u], dout.double()[r])
    assert rel_err((dhg if gated else dhu)[r], ref_grads[0]) < 1e-6


@pytest.mark.parametrize("r", [3, 4], ids=["r3", "r4"])  # r read at run time / compiled in (a power of two)
@pytest.mark.parametrize("shared_a", [True, False])
def test_gated_expand(shared_a, r):
    T, E, k, N, s = 70, 5, 2, 40, 0.3
    ids, w = routing(T, E, k)
    h, B, base = randn(T, r if shared_a else E * r), randn(E, N, r), randn(N, T).t()  # base: a transposed view
    bias = randn(2 * N)[::2]  # strided: read at its own stride
    G = dense_gates(ids, w, E, torch.float64) * s
    h3 = h.double().view(T, 1 if shared_a else E, r).expand(T, E, r)
    expected = base.double() + bias.double() + torch.einsum("te,ter,enr->tn", G, h3, B.double())
    big, out = poisoned_view(T, N)
    K.gated_expand(h, ids, w, B, scaling=s, shared_a=shared_a, base=base, bias=bias, out=out)
    assert_only_view_written(big, out, expected, 1e-6)


@pytest.mark.parametrize("shared_a", [True, False])
def test_gated_expand_ignores_nonfinite_weights_of_unchosen_experts(shared_a):
    """NaN/Inf in B (or h) of an expert reach only the tokens that chose it, and only the output
    rows where that expert's B is not finite; bias is added."""
    T, E, r, k, N, s = 70, 5, 3, 2, 40, 0.3
    ids, w = routing(T, E, k)
    h, B, bias = randn(T, r if shared_a else E * r), randn(E, N, r), randn(N)
    B[2, 7, 1] = float("nan")
    B[2, 9, 0] = float("inf")
    if not shared_a:
        h[:, 2 * r:3 * r] = float("nan")  # per-expert h of expert 2 (its A is NaN): only its tokens see it
    out = K.gated_expand(h, ids, w, B, scaling=s, shared_a=shared_a, bias=bias)
    chose_2 = (ids == 2).any(1)
    assert torch.isfinite(out[~chose_2]).all()
    clean_b = torch.where(torch.isfinite(B), B, 0)
    clean_h = torch.where(torch.isfinite(h), h, 0)
    G = dense_gates(ids, w, E, torch.float64) * s
    h3 = clean_h.double().view(T, 1 if shared_a else E, r).expand(T, E, r)
    expected = bias.double() + torch.einsum("te,ter,enr->tn", G, h3, clean_b.double())
    assert rel_err(out[~chose_2], expected[~chose_2]) < 1e-6
    if shared_a:
        assert torch.isnan(out[chose_2][:, [7, 9]]).all() and torch.isfinite(out[chose_2][:, :7]).all()


@pytest.fixture
def interpreter_configs(monkeypatch):
    """Launch configurations as the launchers set them under the interpreter, on any machine
    (launches recorded or counted, not run); none of them stays cached after the test."""
    monkeypatch.setattr(K, "_INTERPRETING", True)
    K.clear_launch_caches()
    yield
    K.clear_launch_caches()


def test_record_launches_gives_each_launch_with_its_configuration_and_argument_types(interpreter_configs):
    """What benchmarks/compile_kernels.py compiles: each launch's kernel, constexprs and the values
    of its other parameters in order (tensors as dtypes), dense and grouped kernels alike; nothing
    runs."""
    a, b = randn(40, 30), randn(30, 20, dtype=torch.float64)
    ids, meta = _row_layout(40, 4, 2)
    with K.record_launches() as calls:
        K.matmul(a, b, out_dtype=torch.float16, compute_dtype=torch.float32, alpha=0.5)
        K.combine_rows(randn(meta.sorted_pairs_padded.numel(), 20), meta, out_dtype=torch.float32)
    (kernel, options, values), (grouped, grouped_options, grouped_values) = calls
    assert kernel is K.matmul_kernel and options["BLOCK_M"] == 64 and options["SANITIZE_B"] is False
    assert values[:10] == (torch.float32, torch.float64, torch.float32, torch.float64, torch.float16, torch.float16,
                           torch.float16, torch.float16, 0.5, 1.0)  # unused addend, mask, scale pointers: the output
    assert values[10:13] == (40, 20, 30)  # M, N, K: the configuration's scalars follow
    assert grouped is K.combine_rows_kernel and torch.float32 in grouped_values and "BLOCK_N" in grouped_options


def test_direct_launch_calls_the_compiled_kernel_with_triton_s_argument_order(monkeypatch):
    """A KernelLaunch's second launch with tensors of the first one's dtypes and alignment calls the
    compiled kernel directly, with Triton's argument order: tensors, per-call floats, the
    configuration's fixed scalars, then the constexprs in parameter order. An unaligned tensor or
    another dtype goes through Triton; the hooks see every launch."""
    runs = []

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def run(self, *args):
            runs.append(args)

    class Kernel:
        arg_names = ["a_ptr", "alpha", "n", "stride", "BLOCK", "FLAG"]
        launches = []

        def __getitem__(self, grid):
            return lambda *args, **meta: (self.launches.append((grid, args, meta)), Compiled())[1]

    monkeypatch.setattr(K, "_direct_launch", {"enabled": True})
    monkeypatch.setattr(K, "_current_stream", lambda device: "stream")
    kernel, x = Kernel(), torch.zeros(8)
    launch = K.KernelLaunch(kernel, (3, 2), (5, 1), FLAG=True, BLOCK=16, num_warps=4)
    launch(x, 0.5)
    assert kernel.launches == [((3, 2, 1), (x, 0.5, 5, 1), dict(FLAG=True, BLOCK=16, num_warps=4))]
    launch(x, 0.25)
    assert runs == [(3, 2, 1, "stream", "fn", "meta", None, None, None, x, 0.25, 5, 1, 16, True)]
    launch(x[1:], 0.5)  # 4-byte offset: not 16-byte aligned
    launch(x[2:], 0.5)  # 8-byte offset: neither
    launch(x.double(), 0.5)  # another dtype
    assert len(kernel.launches) == 4 and len(runs) == 1
    with K.count_launches() as calls:
        launch(x, 0.5)
    assert len(calls) == 1 and calls[0][1] == (3, 2, 1)
    assert len(kernel.launches) == 4 and len(runs) == 1
    # a first launch that is unaligned records nothing: the next, aligned one goes through Triton (whose kernel
    # then assumes the alignment) and is the one that later launches repeat directly
    late = K.KernelLaunch(kernel, (3, 2), (5, 1), FLAG=True, BLOCK=16, num_warps=4)
    late(x[1:], 0.5)
    late(x, 0.5)
    assert len(kernel.launches) == 6 and len(runs) == 1
    late(x, 0.5)
    assert len(kernel.launches) == 6 and len(runs) == 2
    # so does a first launch counted, not run: the first launch run records the compiled kernel
    counted = K.KernelLaunch(kernel, (3, 2), (5, 1), FLAG=True, BLOCK=16, num_warps=4)
    with K.count_launches():
        counted(x, 0.5)
    counted(x, 0.5)
    counted(x, 0.5)
    assert len(kernel.launches) == 7 and len(runs) == 3


def test_direct_launch_keeps_the_first_aligned_record_and_falls_back_to_triton_for_good(monkeypatch):
    """The direct launch repeats the first 16-byte aligned launch's dtypes (an 8-byte offset is not aligned; a
    launch with other dtypes between leaves the record as it is), passes the constexprs in the kernel's
    parameter order, and goes through Triton for good where it cannot launch directly: a constexpr not in
    the configuration (a default), a compiled kernel without packed_metadata, another Triton's launcher
    signature (TypeError: no later launch of any configuration tries again), MOELORA_DIRECT_LAUNCH=0; a launch
    counted after one run keeps the compiled kernel."""
    runs, launches = [], []

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def run(self, *args):
            runs.append(args)

    class Kernel:
        def __init__(self, names, compiled=Compiled):
            self.arg_names, self.compiled = names, compiled

        def __getitem__(self, grid):
            return lambda *args, **meta: (launches.append(args), self.compiled())[1]

    def direct_runs(launch, x, times=2):
        runs.clear(), launches.clear()
        for _ in range(times):
            launch(x, 0.5)
        return len(runs), len(launches)

    monkeypatch.setattr(K, "_direct_launch", {"enabled": True})
    monkeypatch.setattr(K, "_current_stream", lambda device: "stream")
    x = torch.zeros(8)
    names = ["a_ptr", "alpha", "n", "FLAG", "BLOCK"]
    launch = K.KernelLaunch(Kernel(names), (1,), (5,), BLOCK=16, FLAG=False)
    launch(x[2:], 0.5)  # 8-byte offset: not recorded
    launch(x, 0.5)
    assert not runs and len(launches) == 2
    launch(x.double(), 0.5)  # other dtypes: through Triton, the record kept
    with K.count_launches():
        launch(x, 0.5)
    assert direct_runs(launch, x) == (2, 0) and runs[0][-2:] == (False, 16)  # FLAG, BLOCK: parameter order
    default = K.KernelLaunch(Kernel(names), (1,), (5,), BLOCK=16)  # FLAG left to its default
    assert direct_runs(default, x) == (0, 2)
    with K.count_launches():  # a launch counted keeps the record: no direct launch
        default(x, 0.5)
    assert default._direct == {-1: False}
    no_metadata = K.KernelLaunch(Kernel(names, compiled=lambda: object()), (1,), (5,), BLOCK=16, FLAG=False)
    assert direct_runs(no_metadata, x) == (0, 2) and no_metadata._direct == {-1: False}

    class OtherTriton(Compiled):
        def run(self, *args):
            runs.append(args)
            raise TypeError("another signature")

    other = K.KernelLaunch(Kernel(names, compiled=OtherTriton), (1,), (5,), BLOCK=16, FLAG=False)
    assert direct_runs(other, x, times=3) == (1, 3) and other._direct == {-1: False}
    assert K._direct_launch == {"enabled": False}
    fresh = K.KernelLaunch(Kernel(names), (1,), (5,), BLOCK=16, FLAG=False)
    assert direct_runs(fresh, x) == (0, 2) and fresh._direct == {}


def test_direct_launch_state_gives_each_kernels_configurations_by_the_way_they_launch(monkeypatch):
    """direct_launch_state: per kernel name, how many of its configurations (per device) call the compiled
    kernel directly, go through Triton for good (a constexpr left to its default) or wait for their first
    aligned launch to run (only counted so far); a configuration launched unaligned only, or never, is left
    out; ``enabled`` is the switch's."""
    class Compiled:
        function, packed_metadata = "fn", "meta"

        def run(self, *args):
            pass

    def kernel(name, names=("a_ptr", "alpha", "n", "BLOCK")):
        def fn():
            pass

        fn.__name__ = name

        class Kernel:
            arg_names = list(names)

            def __getitem__(self, grid):
                return lambda *args, **meta: Compiled()

        Kernel.fn = fn
        return Kernel()

    monkeypatch.setattr(K, "_direct_launch", {"enabled": True})
    monkeypatch.setattr(K, "_current_stream", lambda device: "stream")
    monkeypatch.setattr(K, "_LAUNCHES", weakref.WeakSet())  # this test's configurations only
    x = torch.zeros(8)
    fast = [K.KernelLaunch(kernel("fast"), (1,), (5,), BLOCK=16) for _ in range(2)]
    for launch in fast:
        launch(x, 0.5)
    slow = K.KernelLaunch(kernel("slow", ("a_ptr", "alpha", "n", "BLOCK", "FLAG")), (1,), (5,), BLOCK=16)
    slow(x, 0.5)
    counted = K.KernelLaunch(kernel("counted"), (1,), (5,), BLOCK=16)
    with K.count_launches():
        counted(x, 0.5)
    unaligned = K.KernelLaunch(kernel("unaligned"), (1,), (5,), BLOCK=16)
    unaligned(x[2:], 0.5)
    never = K.KernelLaunch(kernel("never"), (1,), (5,), BLOCK=16)
    want = {"enabled": True, "direct": {"fast": 2}, "through_triton": {"slow": 1}, "waiting": {"counted": 1}}
    assert K.direct_launch_state() == want
    _fake_cuda_devices(monkeypatch, current=0)
    fast[0](_on_device(0), 0.5)  # the same configuration on cuda:0: a record of its own
    counted(x, 0.5)  # its first launch run: now direct
    assert K.direct_launch_state() == {**want, "direct": {"counted": 1, "fast": 3}, "waiting": {}}
    monkeypatch.setattr(K, "_direct_launch", {"enabled": False})
    assert K.direct_launch_state()["enabled"] is False
    assert len(K._LAUNCHES) == 6 and never._direct == unaligned._direct == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches are a GPU's (Triton's compiled kernels)")
def test_on_a_gpu_the_hot_paths_launches_call_their_compiled_kernels_directly():
    """On a GPU, after two steps each of moe_lora forward+backward (dense and grouped regime) and of a training
    MoELoRALinear (softmax_topk and threshold routing, aux loss), every launch configuration they used calls
    its compiled kernel directly: none goes through Triton's launcher (its argument binding costs tens of
    microseconds of host time per launch): this Triton's launcher takes KernelLaunch's arguments and every
    kernel's constexprs are given. (MOELORA_DIRECT_LAUNCH=0 switches the direct launch off: skipped then.)"""
    import torch.nn as nn

    import moelora

    if os.environ.get("MOELORA_DIRECT_LAUNCH", "1") == "0":
        pytest.skip("MOELORA_DIRECT_LAUNCH=0")
    K.clear_launch_caches()  # this test's configurations only (the cached ones are dropped)
    gen = torch.Generator(device="cpu").manual_seed(0)
    T, d, r, E, k = 64, 128, 16, 8, 2

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16).requires_grad_()

    x, a, dy = rand(T, d), rand(r, d), rand(T, d).detach()
    ids = torch.rand(T, E, generator=gen).argsort(1)[:, :k].cuda()
    w = torch.rand(T, k, generator=gen).cuda().requires_grad_()
    layers = [moelora.MoELoRALinear(nn.Linear(d, d, device="cuda", dtype=torch.bfloat16), num_experts=E, r=r,
                                    share_lora_a=True, **routing).train()
              for routing in (dict(top_k=k), dict(router="threshold", top_k=3, threshold_eps=0.2))]
    with moelora.use_backend("triton"), moelora.validation(False):
        for _ in range(2):
            for regime, b in (("dense", rand(E, d, r)), ("grouped", rand(64, d, r))):
                grouped_ids = ids if regime == "dense" else ids * 8
                y = moelora.moe_lora(x, a, b, grouped_ids, w, scaling=2.0, regime=regime)
                torch.autograd.grad(y, [x, a, b, w], dy)
            for layer in layers:
                y = layer(x)
                torch.autograd.grad([y, layer.last_aux_loss], [x] + [p for p in layer.parameters() if p.requires_grad],
                                    [dy, torch.ones((), device="cuda", dtype=layer.last_aux_loss.dtype)])
    torch.cuda.synchronize()
    state = K.direct_launch_state()
    assert state["enabled"] and not state["through_triton"] and not state["waiting"], state
    used = {"lora_down_kernel", "gated_expand_kernel", "gate_backward_kernel", "lora_weight_grad_kernel",
            "threshold_weights_kernel"}  # the dense regime's (the grouped rows may run on torch's grouped_mm)
    assert used <= set(state["direct"]), state


class _OnDevice(torch.Tensor):
    """A CPU tensor that reports a CUDA device index (_on_device): faked devices, no GPU needed."""

    def get_device(self):
        return self.index


def _on_device(index, dtype=torch.float32):
    t = torch.Tensor._make_subclass(_OnDevice, torch.zeros(8, dtype=dtype))
    t.index = index
    return t


def _fake_cuda_devices(monkeypatch, current):
    """The launchers' current CUDA device and torch.cuda.device(index) faked on a list [index], returned:
    ``current`` at first."""
    state = [current]

    @contextlib.contextmanager
    def device_guard(index):
        previous, state[0] = state[0], index
        try:
            yield
        finally:
            state[0] = previous

    monkeypatch.setattr(K, "_current_device", lambda: state[0])
    monkeypatch.setattr(torch.cuda, "device", device_guard)
    return state


def test_launches_run_on_their_tensors_device_with_a_direct_launch_per_device(monkeypatch):
    """Triton launches on the current device, whatever the tensors' (a device_map="auto" model's
    layer on cuda:1 while cuda:0 is current): a KernelLaunch makes its tensors' device current
    for the launch where another one is, and launches directly (the compiled kernel's function
    handle is loaded on one device) only on the device, and with the dtypes, it recorded there.
    Faked devices: the test needs no GPU."""
    current, events = _fake_cuda_devices(monkeypatch, current=0), []

    class Compiled:
        def __init__(self, device):
            self.function, self.packed_metadata, self.device = f"fn{device}", "meta", device

        def run(self, *args):
            events.append(("direct", current[0], args[3], args[4]))

    class Kernel:
        arg_names = ["a_ptr", "alpha", "n", "BLOCK"]

        def __getitem__(self, grid):
            def launch(*args, **meta):
                events.append(("triton", current[0]))
                return Compiled(current[0])
            return launch

    monkeypatch.setattr(K, "_direct_launch", {"enabled": True})
    monkeypatch.setattr(K, "_current_stream", lambda device: f"stream{device}")
    launch = K.KernelLaunch(Kernel(), (1,), (8,), BLOCK=16)
    for index in (1, 1, 0, 0, 1):
        launch(_on_device(index), 0.5)
    assert events == [("triton", 1), ("direct", 1, "stream1", "fn1"), ("triton", 0), ("direct", 0, "stream0", "fn0"),
                      ("direct", 1, "stream1", "fn1")]
    assert current == [0]  # restored after each launch on cuda:1
    events.clear()
    launch(_on_device(0, torch.float64), 0.5)  # another dtype on cuda:0: through Triton, cuda:1's record untouched
    launch(_on_device(1), 0.5)
    assert events == [("triton", 0), ("direct", 1, "stream1", "fn1")]


def test_kernel_launches_pass_tensors_then_floats_and_fix_the_rest(monkeypatch):
    """What makes the direct launch sound: every KernelLaunch call of the launchers (dense and grouped) passes
    tensors, then Python floats only; the ints that Triton specialises on all sit in the cached
    configuration (its key holds the shapes and strides they come from)."""
    seen = []
    original = K.KernelLaunch.__call__

    def recording(self, *args):
        seen.append((self, args))
        return original(self, *args)

    monkeypatch.setattr(K.KernelLaunch, "__call__", recording)
    T, E, r, k, d = 40, 4, 3, 2, 24
    ids, w = routing(T, E, k)
    x, a, router_w, B, dy = randn(T, d), randn(r, d), randn(E, d), randn(E, d, r), randn(T, d)
    meta = dispatch_metadata(ids, E, 16)
    R = meta.sorted_pairs_padded.numel()
    with K.count_launches():
        for x_in in (x, x.t().contiguous().t()):  # two stride patterns
            h, logits = K.lora_down(x_in, a, router_w)
            K.gated_expand(h, ids, w, B, scaling=0.5, shared_a=True, bias=randn(d))
            dhg = K.matmul(dy, B, stacked_b=True, out_dtype=torch.float32, compute_dtype=torch.float32)
            dh, dl, hg = K.gate_backward(dhg, h, ids, w, num_experts=E, rank=r, scaling=0.5, shared_a=True,
                                         router=K.RouterGrad(logits, torch.ones(E, dtype=torch.int64, device=DEVICE),
                                                             torch.ones((), device=DEVICE), "softmax_topk", 0.01, 1e-3),
                                         hg_dtype=torch.float32)
            K.lora_weight_grad(dy, x_in, hg, dh, dl, rank=r, scaling=0.5, dlora_b=torch.empty_like(B),
                               dlora_a=torch.empty_like(a), drouter=torch.empty_like(router_w), splits=2)
            K.matmul(dh, a, out_dtype=torch.float32, compute_dtype=torch.float32, second=(dl, router_w), alpha=2)
            counts = torch.ones(E, dtype=torch.int64, device=DEVICE)
            aux = K.RouterAux(counts, torch.rand(E, device=DEVICE), torch.rand(T, device=DEVICE), 0.01, 0.0, True)
            K.gated_expand(h, ids, w, B, scaling=0.5, shared_a=True, aux=aux)
            K.router_aux_loss(ids, w, aux)
            K.router_backward(randn(T, k), ids, w, K.RouterGrad(logits, counts, torch.ones((), device=DEVICE),
                                                                "softmax_topk", 0.01, 1e-3))
            K.threshold_weights(w, torch.rand(T, k, device=DEVICE), torch.zeros((), device=DEVICE), eps_start=0,
                                eps_end=0.2, ramp_steps=10)
            rows = randn(R, d)
            K.grouped_matmul(x_in, B.transpose(1, 2), rows, meta, a_by_token=True, weight_nk_strides=(1, d),
                             compute_dtype=torch.float32, alpha=2, scale=w.reshape(-1))
            K.grouped_matmul(rows, B.transpose(1, 2), randn(R, d), meta, a_by_token=False, weight_nk_strides=(1, d),
                             compute_dtype=torch.float32, gate_grad=(x_in, True, torch.empty(T * k, device=DEVICE)))
            K.grouped_weight_grad(x_in, rows, meta, left_by_token=True, right_by_token=False,
                                  compute_dtype=torch.float32, out_dtype=torch.float32, scale=w.reshape(-1))
            K.segment_sum(rows, meta, out_dtype=torch.float32)
            K.combine_rows(rows, meta, out_dtype=torch.float32, coef=w, bias=(ids, randn(E, d)), base=x_in)
            K.combine_rows_backward(dy, rows, meta, ids, w.reshape(-1), bias=randn(E, d))
            K.glu_backward(rows, rows, K.glu_forward(rows, rows, None, randn(E, d), meta, ids, 0), None, None, meta,
                           ids, 0)
    kernels = {launch.kernel for launch, _ in seen}
    assert len(kernels) == 15, kernels
    for launch, args in seen:
        tensors = [i for i, v in enumerate(args) if isinstance(v, torch.Tensor)]
        assert tensors == list(range(len(tensors))), (launch.kernel, args)
        assert all(type(v) is float for v in args[len(tensors):]), (launch.kernel, args)
        assert all(type(v) in (int, float) for v in launch.fixed), (launch.kernel, launch.fixed)
        names = launch.kernel.arg_names
        assert len(args) + len(launch.fixed) + sum(n in launch.meta for n in names) == len(names), launch.kernel
    assert len({id(launch) for launch, _ in seen}) > len(kernels)  # other strides, other configurations


# ------------------------------------------------------------------ dense tiles (DENSE_CONFIGS)
def _dense_candidates():
    return [pytest.param(kernel, tiles, id=f"{kernel}-{i}") for kernel, options in tile_candidates.DENSE.items()
            for i, tiles in enumerate(options)]


@pytest.mark.parametrize("kernel, tiles", _dense_candidates())
def test_every_dense_tile_candidate_computes_the_reference(kernel, tiles, monkeypatch):
    """Each tile candidate benchmarks/tune_dense.py may put into DENSE_CONFIGS gives the float64
    result, into poisoned strided outputs, on shapes that leave partial tiles in every dim (and
    split reductions where the kernel has them); an expert without tokens gets exact zeros."""
    T, d, r, E, k, s = 150, 72, 16, 5, 2, 0.3
    monkeypatch.setattr(K, "_target_programs", lambda device: 64)  # split the reductions
    ids, w = routing(T, E, k)
    if kernel == "lora_down":
        x, a, wr = randn(T, 2 * d)[:, ::2], randn(r, d), randn(E, d)
        h, logits = K.lora_down(x, a, wr, tiles=tiles)
        assert rel_err(h, x.double() @ a.double().t()) < 1e-6
        assert rel_err(logits, x.double() @ wr.double().t()) < 1e-6
    elif kernel == "gated_expand":
        h, B, base, bias = randn(T, r), randn(E, d, r), randn(T, d), randn(d)
        G = dense_gates(ids, w, E, torch.float64) * s
        expected = base.double() + bias.double() + torch.einsum("te,tr,enr->tn", G, h.double(), B.double())
        big, out = poisoned_view(T, d)
        K.gated_expand(h, ids, w, B, scaling=s, shared_a=True, base=base, bias=bias, out=out, tiles=tiles)
        assert_only_view_written(big, out, expected, 1e-6)
    elif kernel == "matmul":
        dy, B, dl, wr = randn(T, d), randn(E, d, r), randn(T, E), randn(E, E * r)
        big, out = poisoned_view(T, E * r)
        K.matmul(dy, B, out_dtype=torch.float32, compute_dtype=torch.float32, stacked_b=True, second=(dl, wr),
                 out=out, tiles=tiles)
        b_stack = B.double().permute(1, 0, 2).reshape(d, E * r)
        assert_only_view_written(big, out, dy.double() @ b_stack + dl.double() @ wr.double(), 1e-6)
        big, out = poisoned_view(d, r)
        dh = randn(T, r)
        K.matmul(dy.t(), dh, out_dtype=torch.float32, compute_dtype=torch.float32, split_k=True, out=out, tiles=tiles)
        assert_only_view_written(big, out, dy.double().t() @ dh.double(), 1e-6)
    else:
        dy, x, dh, dl = randn(T, d), randn(T, d), randn(T, r), randn(T, E)
        hg = randn(T, E * r)
        hg[:, 4 * r:] = 0  # expert 4 gets no token
        big_b = torch.full((E, d + 1, r + 2), NAN, device=DEVICE)
        db = big_b[:, 1:, 1:-1]
        (big_a, da), (big_r, dr) = poisoned_view(r, d), poisoned_view(E, d)
        K.lora_weight_grad(dy, x, hg, dh, dl, rank=r, scaling=s, dlora_b=db, dlora_a=da, drouter=dr, tiles=tiles)
        db_ref = torch.einsum("tn,tc->nc", dy.double(), hg.double()).view(d, E, r).permute(1, 0, 2)
        assert torch.isfinite(big_b[:, 1:, 1:-1]).all() and rel_err(db, db_ref) < 1e-6
        assert torch.equal(db[4], torch.zeros_like(db[4]))
        assert_only_view_written(big_a, da, dh.double().t() @ x.double(), 1e-6)
        assert_only_view_written(big_r, dr, dl.double().t() @ x.double(), 1e-6)


def test_dense_tile_table_entries_are_valid_and_used_off_the_interpreter(monkeypatch, interpreter_configs):
    """DENSE_CONFIGS as committed passes install_dense_configs' checks; off the interpreter a
    launch of a listed shape class with 2-byte operands takes the entry, a launcher's ``tiles``
    win over it, and the interpreter and 4-byte operands keep the defaults."""
    K.install_dense_configs(dict(K.DENSE_CONFIGS))  # checks every key and entry
    assert K.dense_shape_class("gated_expand", 8192, 4096, 128) == "gated_expand:lm:many"
    with monkeypatch.context() as patch:
        patch.setattr(K, "DENSE_CONFIGS", {"gated_expand:lm:many": dict(BLOCK_T=128, num_warps=4)})
        bf16 = torch.bfloat16
        assert K._dense_tiles("gated_expand", (), 8192, 4096, 128, bf16) == {}  # interpreter
        patch.setattr(K, "_INTERPRETING", False)
        assert K._dense_tiles("gated_expand", (), 8192, 4096, 128, bf16) == dict(BLOCK_T=128, num_warps=4)
        assert K._dense_tiles("gated_expand", (), 8192, 4096, 128, torch.float16) == dict(BLOCK_T=128, num_warps=4)
        assert K._dense_tiles("gated_expand", (), 8192, 4096, 128, torch.float32) == {}  # bf16 measurements
        assert K._dense_tiles("gated_expand", (), 1024, 4096, 128, bf16) == {}
        assert K._dense_tiles("gated_expand", (("BLOCK_T", 32),), 8192, 4096, 128, torch.float32) == dict(BLOCK_T=32)
    T, E, r, d = 150, 4, 16, 72
    ids, w = routing(T, E, 2)
    with K.count_launches() as calls:
        K.gated_expand(randn(T, r), ids, w, randn(E, d, r), scaling=1.0, shared_a=True)
        K.gated_expand(randn(T, r), ids, w, randn(E, d, r), scaling=1.0, shared_a=True,
                       tiles=dict(BLOCK_T=128, BLOCK_N=32))
    assert [grid for _, grid in calls] == [(3, 1, 1), (2, 3, 1)]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the GPU's defaults run there anyway")
@pytest.mark.parametrize("regime, shared_a", [("dense", True), ("dense", False), ("grouped", True),
                                              ("grouped", False)])
def test_gpu_default_tiles_of_fp32_compute_the_reference(regime, shared_a, monkeypatch):
    """The tiles the launchers choose off the interpreter for fp32 (GPU-only defaults: 32 x 32 x 32
    matmuls, 32-row lora_down, 16-token weight-gradient steps, the grouped table shrunk), run
    here under the interpreter: forward and every gradient as float64."""
    import moelora
    from helpers import make_problem, reference

    K.clear_launch_caches()
    monkeypatch.setattr(K, "_INTERPRETING", False)
    try:
        p = make_problem(70, 48, 40, 8, 6, 2, shared_a=shared_a, seed=9)
        with moelora.use_backend("triton"):
            y = moelora.moe_lora(*p.args(), scaling=p.scaling, base_out=p.base_out, regime=regime)
            g = torch.randn_like(y)
            grads = torch.autograd.grad(y, p.leaves(), g)
            with K.record_launches() as calls:  # the same call, to see its tiles
                torch.autograd.grad(moelora.moe_lora(*p.args(), scaling=p.scaling, base_out=p.base_out,
                                                     regime=regime), p.leaves(), g)
    finally:
        K.clear_launch_caches()
    y_ref, grads_ref = reference(p, g)
    assert rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < 1e-5
    tiles = [(kernel.__name__, meta) for kernel, meta, _ in calls]
    assert all(max(m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_K"]) <= 32 and m["num_stages"] == 2
               for name, m in tiles if name == "matmul_kernel")
    assert all(m["BLOCK_M"] <= 32 and m["BLOCK_N"] <= 64 and m["BLOCK_K"] <= 32 and m["num_stages"] == 2
               for name, m in tiles if name == "grouped_matmul_kernel")
    assert any(name == ("matmul_kernel" if regime == "dense" else "grouped_matmul_kernel") for name, _ in tiles)


@pytest.mark.parametrize("kernel, tiles, message", [
    ("gated_expand", dict(BLOCK_M=64), "gated_expand tiles may set"),
    ("gated_expand", dict(BLOCK_T=48), "BLOCK_T must be a power of two >= 16"),
    ("matmul", dict(BLOCK_K=8), "BLOCK_K must be a power of two >= 16"),
    ("matmul", dict(num_warps=3), "num_warps must be a power of two >= 1"),
    ("lora_down", dict(num_stages=0), "num_stages must be an int >= 1"),
    ("gate_backward", dict(BLOCK_T=32), "kernel must be one of"),
])
def test_bad_tiles_are_refused_with_the_reason(kernel, tiles, message):
    with pytest.raises(ValueError, match=message):
        K.install_dense_configs({f"{kernel}:ll:many": tiles})
    if kernel in K.DENSE_TILE_KEYS:
        with pytest.raises(ValueError, match=message):
            K.check_tiles(kernel, tiles)


@pytest.mark.parametrize("key", ["gated_expand", "gated_expand:lx:many", "gated_expand:lm:lots", "matmul:lll:few"])
def test_malformed_table_keys_are_refused(key):
    with pytest.raises(ValueError, match="a DENSE_CONFIGS key is kernel:<n><k>:<rows>"):
        K.install_dense_configs({key: dict(BLOCK_T=64)})


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_layers_on_a_device_that_is_not_current_compute_what_they_compute_on_the_current_one():
    """A device_map="auto" model: an MoELoRALinear (dense and grouped regime) and an MoEFFN on
    cuda:1 while cuda:0 is current give, forward and backward, bitwise what copies of them give on
    cuda:0 (Triton would otherwise launch on cuda:0 with cuda:1's pointers)."""
    import copy

    import moelora
    from moelora.modules.ffn import MoEFFN

    torch.manual_seed(0)
    d, T = 64, 96
    modules = [moelora.MoELoRALinear(torch.nn.Linear(d, d), num_experts=experts, top_k=2, r=8, share_lora_a=True)
               for experts in (4, 160)]
    modules.append(MoEFFN(torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d), torch.nn.functional.silu, 4, 2))
    for module in modules:
        for p in module.parameters():  # B starts at zero: give every gradient something to carry
            p.data.normal_(0, 0.1)
        results = []
        for device in ("cuda:0", "cuda:1"):
            moved = copy.deepcopy(module).to(device)
            x = torch.randn(T, d, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
            with torch.cuda.device(0), moelora.use_backend("triton"):
                y = moved(x)
                y.square().sum().backward()
            torch.cuda.synchronize(device)
            results.append([t.cpu() for t in (y, x.grad, *(p.grad for p in moved.parameters() if p.grad is not None))])
        assert len(results[0]) == len(results[1]) > 2
        for a, b in zip(*results):
            assert torch.equal(a, b)


def test_clear_launch_caches_drops_every_cached_launch_configuration():
    """Every cached ``_<kernel>_launch`` configuration function is in _LAUNCH_CACHES, which
    clear_launch_caches drops (after a tile table or the interpreter switch changed): the aux loss's
    backward and the masked aux loss's launches were left out, so they outlived a clear."""
    cached = {name for name, fn in vars(K).items() if name.endswith("_launch") and hasattr(fn, "cache_clear")}
    missing = cached - {fn.__name__ for fn in K._LAUNCH_CACHES}
    assert cached and not missing, missing


def test_install_grouped_configs_drops_the_cached_layout_block(monkeypatch):
    """grouped_layout_block caches the padding its tile table gives: a table installed after must change it."""
    monkeypatch.setattr(K, "_INTERPRETING", False)
    monkeypatch.setattr(K, "GROUPED_CONFIGS", {})
    K.clear_launch_caches()
    try:
        assert K.grouped_layout_block(((4096, 4096),), True) == 64  # the default tiles' 64 rows
        K.install_grouped_configs({"matmul:ll:many": K.TileConfig(128, 128, 64, 8, 8, 3)})
        assert K.grouped_layout_block(((4096, 4096),), True) == 128
        assert K.grouped_layout_block(((4096, 4096),), False) == 64  # the few-rows class: not in the table
    finally:
        K.clear_launch_caches()


def test_shape_classes_at_their_boundaries():
    """Widths s <= 64 < m <= 256 < l, dense rows few below 2048, grouped rows many from MANY_ROWS per expert."""
    assert [K._width_class(n) for n in (64, 65, 256, 257)] == ["s", "m", "m", "l"]
    assert K.dense_shape_class("matmul", 2047, 64, 257) == "matmul:sl:few"
    assert K.dense_shape_class("matmul", 2048, 65, 256) == "matmul:mm:many"
    assert K.many_rows(4 * K.MANY_ROWS, 4) and not K.many_rows(4 * K.MANY_ROWS - 1, 4)
    assert K.many_rows(K.MANY_ROWS, 0) and not K.many_rows(K.MANY_ROWS - 1, 0)


def test_launch_hooks_nest():
    """Each of skip_launches, count_launches and record_launches restores the hook it found: launches after an
    inner block are still counted by the outer one (and run again after the outer)."""
    kernel = type("Kernel", (), {"__getitem__": lambda self, grid: lambda *a, **m: ran.append(a)})()
    ran, x = [], torch.zeros(8)
    launch = K.KernelLaunch(kernel, (1,), (5,), BLOCK=16)
    for inner in (K.skip_launches, K.count_launches, K.record_launches):
        with K.count_launches() as outer:
            with inner():
                launch(x, 0.5)
            launch(x, 0.5)
        assert len(outer) == 1 and not ran
        launch(x, 0.5)
        assert len(ran) == 1
        ran.clear()


def test_a_launch_on_device_0_while_another_is_current_switches_to_it(monkeypatch):
    """cuda:0's tensors while cuda:1 is current: the launch makes cuda:0 current (index 0 is a device too)."""
    current, seen = _fake_cuda_devices(monkeypatch, current=1), []
    kernel = type("Kernel", (), {"__getitem__": lambda self, grid: lambda *a, **m: seen.append(current[0])})()
    monkeypatch.setattr(K, "_direct_launch", {"enabled": False})
    K.KernelLaunch(kernel, (1,), (5,), BLOCK=16)(_on_device(0), 0.5)
    assert seen == [0] and current == [1]


@pytest.mark.parametrize("E", [6, 16, 100])
@pytest.mark.parametrize("count_kept", [False, True])
def test_masked_router_aux_loss_and_its_gradient(E, count_kept):
    """The masked aux loss's kernels (one launch each way) against the PyTorch formulas in float64, over
    the real tokens only: E 16 (a power of two: dropped slots' histogram bin past the experts') and 100
    (fewer tokens per program of the gradient: every one still covered)."""
    from moelora.ops.losses import masked_aux_loss_backward, masked_aux_loss_forward

    T, k, lb, z = 150, 3, 0.01, 0.001
    logits = randn(T, E, dtype=torch.float64)
    ids, w = routing(T, E, k)
    w[::4, 1] = 0.0  # dropped slots, recounted with count_kept
    mask = torch.rand(T, device=DEVICE) > 0.2
    loss, stats, counts = K.masked_router_aux_loss(logits, ids, w, mask, lb, z, count_kept)
    kept = mask.unsqueeze(1) & (w > 0 if count_kept else torch.ones_like(w, dtype=torch.bool))
    ref_counts = torch.bincount(ids[kept], minlength=E)
    assert torch.equal(counts, ref_counts)
    ref_loss, ref_stats = masked_aux_loss_forward(logits, ref_counts, mask, lb, z)
    assert rel_err(loss, ref_loss) < 1e-9 and rel_err(stats, ref_stats) < 1e-9
    g = torch.tensor(1.3, dtype=torch.float64, device=DEVICE)
    dl = K.masked_router_aux_loss_backward(g, logits, ref_counts, mask, lb, z)
    assert rel_err(dl, masked_aux_loss_backward(g, logits, ref_counts, mask, lb, z)) < 1e-9


def test_matmul_with_an_empty_first_product_computes_the_second():
    """K 0 (no LoRA rows, a router only): a @ b is empty, a2 @ b2 is not; the result is alpha * a2 @ b2 (+ addend)."""
    a, b, a2, b2, d = randn(20, 0), randn(0, 12), randn(20, 7), randn(7, 12), randn(20, 12)
    for addend, expected in ((None, 2 * a2.double() @ b2.double()), (d, 2 * a2.double() @ b2.double() + d.double())):
        out = K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.float32, alpha=2.0, second=(a2, b2),
                       addend=addend)
        assert rel_err(out, expected) < TOLERANCE[torch.float32]


def test_matmul_with_an_empty_reduction_gives_the_addend_or_zeros():
    """K 0 and no second product: no kernel runs; the result (in a poisoned ``out`` view) is the addend, or
    zeros without one."""
    a, b, d = randn(20, 0), randn(0, 12), randn(20, 12)
    for addend, expected in ((None, torch.zeros(20, 12, dtype=torch.float64)), (d, d.double())):
        big, out = poisoned_view(20, 12)
        K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.float32, alpha=2.0, addend=addend, out=out)
        assert_only_view_written(big, out, expected, 1e-12)


def test_lora_down_with_more_router_columns_than_lora_columns():
    """E 40 router columns beside R 8 rows of A: the logits take more programs per token block than h."""
    T, d, R, E = 50, 20, 8, 40
    x, a, wr = randn(T, d), randn(R, d), randn(E, d)
    h, logits = K.lora_down(x, a, wr)
    assert rel_err(h, x.double() @ a.double().t()) < 1e-6 and rel_err(logits, x.double() @ wr.double().t()) < 1e-6


@pytest.mark.parametrize("own_launch", [False, True], ids=["in the expand", "router_aux_loss"])
def test_router_aux_loss_reads_strided_counts_and_prob_sums(own_launch):
    """The aux loss's kernels read counts and prob_sums at unit stride: strided ones (views every other
    element) give the loss of their values all the same."""
    from moelora.ops.losses import aux_losses
    from moelora.ops.routing import route

    res = route(randn(300, 7) * 3, 2, renormalize=True)
    counts = torch.stack([res.counts, torch.full_like(res.counts, 99)], 1)[:, 0]
    prob_sums = torch.stack([res.prob_sums, torch.full_like(res.prob_sums, 5.0)], 1)[:, 0]
    aux = K.RouterAux(counts, prob_sums, res.lse, 0.01, 0.001)
    if own_launch:
        loss, stats, out_counts = K.router_aux_loss(res.ids, res.weights, aux)
    else:
        h, B = randn(300, 4), randn(7, 8, 4)
        _, loss, stats, out_counts = K.gated_expand(h, res.ids, res.weights, B, scaling=1.0, shared_a=True, aux=aux)
    ref_loss, ref_stats = aux_losses(res.counts, res.prob_sums.double(), res.lse.double(), 0.01, 0.001)
    assert rel_err(loss, ref_loss) < 1e-6 and rel_err(stats, ref_stats) < 1e-6
    assert torch.equal(out_counts, res.counts)


def test_gate_backward_takes_a_router_without_counts_launch_after_launch():
    """RouterGrad's counts may be None without g_aux: every launch passes tensors only (a None among them
    broke the direct-launch check of the launches after the first), and the gradient is the one with counts."""
    T, E, r, k = 40, 4, 3, 2
    ids, w = routing(T, E, k)
    h, dhg, logits = randn(T, r), randn(T, E * r), randn(T, E)
    with_counts = K.RouterGrad(logits, torch.ones(E, dtype=torch.int64, device=DEVICE), None, "softmax_topk", 0.01, 0.0)
    _, expected = K.gate_backward(dhg, h, ids, w, num_experts=E, rank=r, scaling=0.5, shared_a=True,
                                  router=with_counts)
    router = with_counts._replace(counts=None)
    with K.count_launches() as calls:
        for _ in range(2):
            K.gate_backward(dhg, h, ids, w, num_experts=E, rank=r, scaling=0.5, shared_a=True, router=router)
    assert len(calls) == 2
    for _ in range(2):
        _, dl = K.gate_backward(dhg, h, ids, w, num_experts=E, rank=r, scaling=0.5, shared_a=True, router=router)
        assert torch.equal(dl, expected)


def test_grouped_matmul_covers_output_columns_past_a_whole_number_of_tiles():
    """N 100 (over one column tile, not a multiple of it): every output column of every pair's row is written."""
    T, E, k, d_in, N = 20, 3, 2, 16, 100
    ids, meta = _row_layout(T, E, k)
    R = meta.sorted_pairs_padded.numel()
    x, W = randn(T, d_in), randn(E, N, d_in)
    out = torch.full((R, N), NAN, device=DEVICE)
    K.grouped_matmul(x, W, out, meta, a_by_token=True, weight_nk_strides=(W.stride(1), W.stride(2)),
                     compute_dtype=torch.float32)
    rows, expected = _rows_reference(x, W, ids, meta)
    assert torch.isfinite(out[rows]).all() and rel_err(out[rows], expected) < 1e-6


def test_combine_rows_in_float64_accumulates_in_float64():
    """float64 rows and output: the mix is computed in float64 (to 1e-12 of the reference), not float32."""
    T, E, k, N = 29, 5, 3, 40
    ids, meta = _row_layout(T, E, k)
    R = meta.sorted_pairs_padded.numel()
    rows, coef = randn(R, N, dtype=torch.float64), torch.rand(T, k, device=DEVICE, dtype=torch.float64)
    y = K.combine_rows(rows, meta, out_dtype=torch.float64, coef=coef)
    expected = (coef[:, :, None] * rows[meta.inverse_padded]).sum(1)
    assert y.dtype == torch.float64 and rel_err(y, expected) < 1e-12


def test_grouped_matmul_halves_a_row_tile_four_times_larger_than_the_layout_block():
    """A 64-row tile over a 16-row layout block halves down to 16 rows: no tile spans two experts."""
    T, E, k, d_in, N = 20, 3, 2, 16, 24
    ids, meta = _row_layout(T, E, k)
    x, W = randn(T, d_in), randn(E, N, d_in)
    out = torch.zeros(meta.sorted_pairs_padded.numel(), N, device=DEVICE)
    K.grouped_matmul(x, W, out, meta, a_by_token=True, weight_nk_strides=(W.stride(1), W.stride(2)),
                     compute_dtype=torch.float32, config=K.TileConfig(64, 32, 16, 4, 1, 1))
    rows, expected = _rows_reference(x, W, ids, meta)
    assert rel_err(out[rows], expected) < 1e-6


def test_grouped_matmul_refuses_a_layout_block_below_16_rows():
    """A layout padded to 8 rows leaves no row tile of 16 (the least a dot takes) inside one expert: a ValueError
    naming the layout block, not a launch with 8-row tiles."""
    T, E, k, d_in, N = 20, 3, 2, 16, 24
    ids, meta = _row_layout(T, E, k, block=8)
    x, W = randn(T, d_in), randn(E, N, d_in)
    out = torch.zeros(meta.sorted_pairs_padded.numel(), N, device=DEVICE)
    with pytest.raises(ValueError, match="the layout block must be a multiple of 16 rows, got 8"):
        K.grouped_matmul(x, W, out, meta, a_by_token=True, weight_nk_strides=(W.stride(1), W.stride(2)),
                         compute_dtype=torch.float32)


@pytest.mark.parametrize("block, tiles", [(16, None), (32, K.TileConfig(16, 32, 16, 4, 1, 1))],
                         ids=["tile=block", "tile<block"])
def test_grouped_matmul_writes_zeros_on_rows_without_a_pair(block, tiles):
    """Rows without a pair (each segment's padding and the unused tail) are written with exact zeros, rows with one
    get x[p // k] @ W[e]^T; a 16-row tile inside a 32-row layout block takes the expert of the block it lies in."""
    T, E, k, d_in, N = 21, 4, 2, 20, 24
    ids, meta = _row_layout(T, E, k, block=block)
    R = meta.sorted_pairs_padded.numel()
    x, W = randn(T, d_in), randn(E, N, d_in)
    out = torch.full((R, N), NAN, device=DEVICE)
    K.grouped_matmul(x, W, out, meta, a_by_token=True, weight_nk_strides=(W.stride(1), W.stride(2)),
                     compute_dtype=torch.float32, config=tiles)
    rows, expected = _rows_reference(x, W, ids, meta)
    assert rel_err(out[rows], expected) < 1e-6
    empty = torch.ones(R, dtype=torch.bool, device=DEVICE)
    empty[rows] = False
    used = meta.block_expert.repeat_interleave(block)[:R] >= 0  # rows of an expert's segment
    assert (~used).any() and (empty & used).any()  # an unused tail and padding inside segments
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))


def test_combine_rows_configuration_follows_the_rows_strides_and_the_accumulator_dtype():
    """Two calls alike but for the rows' strides (a transposed copy's view), then for the output's (and so the
    accumulator's) dtype: each gets its own launch configuration, and the right mix (a configuration cached
    for the first would read the strided rows as contiguous, or mix float64 rows in float32)."""
    T, E, k, N = 29, 5, 3, 40
    ids, meta = _row_layout(T, E, k)
    R = meta.sorted_pairs_padded.numel()
    coef, second = torch.rand(T, k, device=DEVICE, dtype=torch.float64), randn(R, N, dtype=torch.float64)
    rows, bias = randn(R, N, dtype=torch.float64), randn(E, N, dtype=torch.float64)  # second, bias: fixed strides
    expected = (coef[:, :, None] * ((rows + second)[meta.inverse_padded] + bias[ids])).sum(1)
    K.clear_launch_caches()
    for rows_in in (rows, rows.t().contiguous().t()):  # strides (N, 1), then (1, R)
        y = K.combine_rows(rows_in, meta, out_dtype=torch.float32, coef=coef, second=second, bias=(ids, bias))
        assert rel_err(y, expected) < 1e-6
    y = K.combine_rows(rows, meta, out_dtype=torch.float64, coef=coef, second=second, bias=(ids, bias))
    assert y.dtype == torch.float64 and rel_err(y, expected) < 1e-12


def test_install_dense_configs_drops_cached_tiles_and_replaces_the_table(monkeypatch):
    """A dense launch configuration cached before install_dense_configs takes the tiles installed after;
    ``replace`` drops the entries it does not list (their shape classes go back to the defaults)."""
    monkeypatch.setattr(K, "_INTERPRETING", False)
    monkeypatch.setattr(K, "DENSE_CONFIGS", {})
    a, b = randn(64, 16, dtype=torch.bfloat16), randn(16, 16, dtype=torch.bfloat16)
    assert K.dense_shape_class("matmul", 64, 16, 16) == "matmul:ss:few"

    def block_m():
        with K.record_launches() as calls:
            K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.bfloat16)
        return calls[0][1]["BLOCK_M"]

    K.clear_launch_caches()
    try:
        assert block_m() == 64  # the default
        K.install_dense_configs({"matmul:ss:few": dict(BLOCK_M=128)})
        assert block_m() == 128
        K.install_dense_configs({"matmul:ss:many": dict(BLOCK_M=32)}, replace=True)
        assert K.DENSE_CONFIGS == {"matmul:ss:many": dict(BLOCK_M=32)} and block_m() == 64
    finally:
        K.clear_launch_caches()


def test_matmul_configuration_follows_the_compute_dtype():
    """The same operands multiplied in float16, then in float32: the second gets float32 products (a
    configuration cached for the first, whose DOT_DTYPE is float16, would round its operands)."""
    a, b = randn(40, 48), randn(48, 24)
    expected = a.double() @ b.double()
    K.clear_launch_caches()
    rough = K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.float16)
    exact = K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.float32)
    assert 1e-5 < rel_err(rough, expected) < 1e-2 and rel_err(exact, expected) < 1e-6


def test_each_tiles_argument_gets_its_own_launch_configuration(interpreter_configs):
    """benchmarks/tune_dense.py times each tile candidate through a launcher's ``tiles``: the configuration
    cached for one candidate must not serve the next (every candidate would be timed with the first's tiles)."""
    a, b = randn(64, 64), randn(64, 64)
    with K.record_launches() as calls:
        for block_m in (16, 32):
            K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.float32, tiles=dict(BLOCK_M=block_m))
    assert [options["BLOCK_M"] for _, options, _ in calls] == [16, 32]


def test_recorded_launch_options_are_copies(interpreter_configs):
    """record_launches gives each launch's constexprs as a dict of its own: changing it leaves the cached
    launch configuration (and so the next launch) as it was."""
    a, b = randn(40, 30), randn(30, 20)
    for _ in range(2):
        with K.record_launches() as calls:
            K.matmul(a, b, out_dtype=torch.float32, compute_dtype=torch.float32)
        assert calls[0][1]["BLOCK_M"] == 64
        calls[0][1]["BLOCK_M"] = 16


def test_router_aux_loss_configuration_follows_the_lse_dtype():
    """The same routing's aux loss with float32, then float64 statistics: the second is computed in float64
    (a configuration cached for the first would accumulate it in float32)."""
    from moelora.ops.losses import aux_losses
    from moelora.ops.routing import route

    res = route(randn(300, 7, dtype=torch.float64) * 3, 2, renormalize=True)
    ref_loss, ref_stats = aux_losses(res.counts, res.prob_sums, res.lse, 0.01, 0.001)
    K.clear_launch_caches()
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        aux = K.RouterAux(res.counts, res.prob_sums.to(dtype), res.lse.to(dtype), 0.01, 0.001)
        loss, stats, _ = K.router_aux_loss(res.ids, res.weights, aux)
        assert loss.dtype == dtype and rel_err(loss, ref_loss) < tol and rel_err(stats, ref_stats) < tol


def test_grouped_matmul_configuration_follows_the_layout():
    """Two layouts with as many rows (20 tokens x 2 slots, 40 tokens x 1) and operands of the same strides:
    each launch reads its own layout's top_k (a configuration cached for the first would take the rows of
    the second's pairs from the wrong tokens)."""
    E, d_in, N = 5, 16, 24
    W = randn(E, N, d_in)
    for T, k in ((20, 2), (40, 1)):
        ids, meta = _row_layout(T, E, k)
        assert meta.sorted_pairs_padded.numel() == 128
        x = randn(T, d_in)
        out = torch.zeros(128, N, device=DEVICE)
        K.grouped_matmul(x, W, out, meta, a_by_token=True, weight_nk_strides=(W.stride(1), W.stride(2)),
                         compute_dtype=torch.float32)
        rows, expected = _rows_reference(x, W, ids, meta)
        assert rel_err(out[rows], expected) < 1e-6


def test_combine_rows_backward_configuration_follows_the_rows_strides():
    """combine_rows_backward twice, alike but for the rows' strides: each g is right (a configuration cached
    for the contiguous rows would read the transposed copy's view as contiguous)."""
    T, E, k, N = 29, 5, 3, 40
    ids, meta = _row_layout(T, E, k)
    R = meta.sorted_pairs_padded.numel()
    dy, bias, row_coef = randn(T, N), randn(E, N), torch.rand(T * k, device=DEVICE)
    rows = randn(R, N)
    r_idx, pairs = _pair_rows(meta)
    K.clear_launch_caches()
    for rows_in in (rows, rows.t().contiguous().t()):
        _, g = K.combine_rows_backward(dy, rows_in, meta, ids, row_coef, bias=bias)
        z = rows.double()[r_idx] + bias.double()[ids.reshape(-1)[pairs]]
        assert rel_err(g[pairs], (dy.double()[pairs // k] * z).sum(1)) < 1e-6


def test_glu_forward_configuration_follows_the_strides():
    """glu_forward twice, alike but for the up projection's strides: both right (a configuration cached for
    the contiguous one would read the transposed copy's view as contiguous)."""
    T, E, k, F_ = 29, 5, 2, 40
    ids, meta = _row_layout(T, E, k)
    R = meta.sorted_pairs_padded.numel()
    hg, hu = randn(R, F_), randn(R, F_)
    r_idx, _ = _pair_rows(meta)
    expected = torch.nn.functional.silu(hg.double()[r_idx]) * hu.double()[r_idx]
    K.clear_launch_caches()
    for hu_in in (hu, hu.t().contiguous().t()):
        out = K.glu_forward(hg, hu_in, None, None, meta, ids, 0)
        assert rel_err(out[r_idx], expected) < 1e-6


@pytest.mark.parametrize("normalize", [False, True])
def test_mixing_weights_configuration_follows_the_weights_strides(normalize):
    """mixing_weights twice, alike but for the weights' strides: both right (a configuration cached for the
    contiguous weights would read the transposed copy's view as contiguous)."""
    T, E, k = 29, 6, 3
    ids, w = routing(T, E, k)
    expected = w.double() / w.double().sum(1, keepdim=True) if normalize else w.double()
    K.clear_launch_caches()
    for w_in in (w, w.t().contiguous().t()):
        _, coef, _ = K.mixing_weights(ids, w_in, E, normalize)
        assert rel_err(coef, expected) < 1e-6
