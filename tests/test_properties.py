"""Property-based tests (hypothesis) of the public operators against float64 per-token loops.

Drawn: shapes (empty batches, one expert, k = E), dtypes (fp32/fp64), strides (every input
a non-contiguous view), leading shapes, id patterns (duplicates in a token, all on one
expert, experts without tokens, ids out of range with validation off), gate weights (zero,
negative), scalings, and NaN/Inf in the weights of experts no token chose; for the fused
layer's op (moe_lora_linear) also its router modes, given logits, LoRA dropout and router
jitter, with the aux loss. Deterministic:
derandomized, no example database. Sized to run in well under a minute on a 2-core CPU;
the Triton backend runs under the interpreter with a handful of tiny examples.
"""

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moelora
from conftest import DEVICE
from helpers import metadata_reference, route_reference, run_path

PROFILE = dict(derandomize=True, database=None, deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
ROUTING_PATHS = st.sampled_from(["native", "fallback"] if moelora.ops.native.HAS_C else ["fallback"])


# ---- strategies ------------------------------------------------------------------------------
def strided(t: torch.Tensor, requires_grad=False, device="cpu") -> torch.Tensor:
    """The values of t in a non-contiguous view (every other element of a larger buffer)."""
    buf = torch.full(tuple(t.shape) + (2,), float("nan") if t.is_floating_point() else -99, dtype=t.dtype,
                     device=device)
    view = buf[..., 0]
    view.copy_(t)
    view = view.detach()
    return view.requires_grad_() if requires_grad else view


@st.composite
def routing(draw, T, E, k_max=None):
    """(ids [T, k], weights [T, k] fp64, used experts) with one of the id patterns."""
    k = draw(st.integers(1, min(E, k_max or E)))
    pattern = draw(st.sampled_from(["distinct", "duplicates", "one_expert", "subset", "out_of_range"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if pattern == "distinct":
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    elif pattern == "duplicates":
        ids = torch.randint(0, E, (T, k), generator=g)
    elif pattern == "one_expert":
        ids = torch.full((T, k), draw(st.integers(0, E - 1)))
    elif pattern == "subset":  # the upper half of the experts gets no token
        ids = torch.randint(0, max(1, E // 2), (T, k), generator=g)
    else:
        ids = torch.randint(-3, E + 3, (T, k), generator=g)
    weights = torch.rand(T, k, generator=g, dtype=torch.float64) * 2 - 0.5  # some negative
    if T and draw(st.booleans()):
        weights[torch.rand(T, k, generator=g) < 0.3] = 0.0
    ids = ids.long()
    used = {int(e) for e in ids.flatten() if 0 <= e < E}
    return ids, weights, used, pattern == "out_of_range"


def poison_unused(t: torch.Tensor, used, E, draw) -> None:
    """Write NaN/Inf into the slices of experts no token chose (dim 0 of t)."""
    for e in range(E):
        if e not in used and draw(st.booleans()):
            t[e].view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))


def assert_grads_match(y, leaves, y_ref, ref_leaves, names, dtype):
    """Gradients of y (leaves) and of the float64 loop y_ref (ref_leaves) for one random
    output gradient agree; leaves either side leaves unused (T = 0, dropped slots) get 0."""
    grad = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, grad.to(y.device, dtype).reshape(y.shape), allow_unused=True)
    grads_ref = (torch.autograd.grad(y_ref, ref_leaves, grad, allow_unused=True) if y_ref.requires_grad
                 else [None] * len(leaves))
    for name, got, want, leaf in zip(names, grads, grads_ref, leaves):
        got = torch.zeros_like(leaf) if got is None else got
        want = torch.zeros(leaf.shape, dtype=torch.float64) if want is None else want
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.cpu().double(), want, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


# ---- moe_lora ---------------------------------------------------------------------------------
def moe_lora_loop(x, a, b, ids, w, scaling, base):
    """float64, token by token and slot by slot; ids outside [0, E) contribute nothing."""
    E = b.shape[0]
    rows = []
    for t in range(x.shape[0]):
        y = base[t] if base is not None else torch.zeros(b.shape[1], dtype=x.dtype)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < E:
                a_e = a if a.dim() == 2 else a[e]
                y = y + scaling * w[t, j] * (b[e] @ (a_e @ x[t]))
        rows.append(y)
    return torch.stack(rows) if rows else torch.zeros(0, b.shape[1], dtype=x.dtype)


@st.composite
def moe_lora_problems(draw, max_tokens=10, max_width=9, max_experts=6, dtypes=(torch.float32, torch.float64),
                      poison=True, min_tokens=0):
    dtype = draw(st.sampled_from(dtypes))
    T = draw(st.integers(min_tokens, max_tokens))
    d_in, d_out = draw(st.integers(1, max_width)), draw(st.integers(1, max_width))
    r, E = draw(st.integers(1, 4)), draw(st.integers(1, max_experts))
    shared_a = draw(st.booleans())
    ids, w, used, out_of_range = draw(routing(T, E))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(T, d_in, generator=g, dtype=torch.float64)
    a = torch.randn(*((r, d_in) if shared_a else (E, r, d_in)), generator=g, dtype=torch.float64) / math.sqrt(d_in)
    b = torch.randn(E, d_out, r, generator=g, dtype=torch.float64)
    base = torch.randn(T, d_out, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    if poison:
        poison_unused(b, used, E, draw)
        if not shared_a:
            poison_unused(a, used, E, draw)
    scaling = draw(st.sampled_from([1.0, 0.5, -2.0, 0.0, 16 / 3]))
    lead = (T,)
    if T and T % 2 == 0 and draw(st.booleans()):
        lead = (2, T // 2)  # x [2, T/2, d_in] with ids [2, T/2, k]
    return dict(dtype=dtype, x=x, a=a, b=b, ids=ids, w=w, base=base, scaling=scaling, lead=lead,
                out_of_range=out_of_range)


def check_moe_lora(p, device="cpu", **kw):
    dtype, lead = p["dtype"], p["lead"]
    shaped = lambda t: t.reshape(*lead, t.shape[-1])  # noqa: E731
    x = strided(shaped(p["x"].to(dtype)), True, device)
    a, b = strided(p["a"].to(dtype), True, device), strided(p["b"].to(dtype), True, device)
    ids = strided(shaped(p["ids"]), device=device)
    w = strided(shaped(p["w"].to(dtype)), True, device)
    base = strided(shaped(p["base"].to(dtype)), True, device) if p["base"] is not None else None
    leaves = [t for t in (x, a, b, w, base) if t is not None]
    with moelora.validation(not p["out_of_range"]):
        y = moelora.moe_lora(x, a, b, ids, w, scaling=p["scaling"], base_out=base, **kw)
    assert y.shape == (*lead, p["b"].shape[1]) and y.dtype == dtype
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    rx, ra, rb, rw = ref_leaves[:4]
    rbase = ref_leaves[4] if base is not None else None
    flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
    y_ref = moe_lora_loop(flat(rx), ra, rb, p["ids"], flat(rw), p["scaling"], flat(rbase))
    torch.testing.assert_close(y.cpu().double().reshape(y_ref.shape), y_ref, **TOL[dtype])
    assert_grads_match(y, leaves, y_ref, ref_leaves, ["x", "lora_a", "lora_b", "topk_weights", "base_out"], dtype)


@settings(max_examples=150, **PROFILE)
@given(moe_lora_problems())
def test_moe_lora_torch_backend_matches_the_per_token_loop(p):
    check_moe_lora(p, backend="torch")


@settings(max_examples=12, **PROFILE)
@given(moe_lora_problems(max_tokens=5, max_width=6, max_experts=4, dtypes=(torch.float32,), min_tokens=1),
       st.sampled_from(["dense", "grouped"]))
def test_moe_lora_triton_backend_matches_the_per_token_loop(p, regime):
    check_moe_lora(p, DEVICE, backend="triton", regime=regime)


# ---- moe_lora_linear (the fused layer's op) ----------------------------------------------------
def linear_routing_loop(logits, ids, mode, renormalize, eps, noise):
    """float64 gate weights of the chosen ``ids`` [T, k] from ``logits`` [T, E] (see
    moelora.ops.routing_modes), and the aux loss's statistics (counts of kept slots, prob_sums, lse)."""
    p = torch.softmax(logits, -1)
    if mode == "topk_softmax":
        w = torch.softmax(logits.gather(1, ids), -1)
    elif mode == "softmax_topk":
        w = p.gather(1, ids)
        w = w / w.sum(-1, keepdim=True) if renormalize else w
    else:  # threshold: the best slot always, another iff noise < p_hat / eps (training) or p_hat >= eps
        top_p = p.gather(1, ids)
        p_hat = (top_p / top_p.sum(-1, keepdim=True)).detach()
        keep = noise.double() < torch.clamp(p_hat / eps, max=1.0) if noise is not None else p_hat >= eps
        keep[:, 0] = True
        kept = torch.where(keep, top_p, 0.0)
        w = kept / kept.sum(-1, keepdim=True)
    counts = torch.zeros(logits.shape[1], dtype=torch.float64)
    counts.index_add_(0, ids[w > 0], torch.ones(int((w > 0).sum()), dtype=torch.float64))
    return w, counts, p.sum(0), torch.logsumexp(logits, -1)


@settings(max_examples=25, **PROFILE)
@given(st.data(), st.sampled_from(["dense", "grouped"]))
def test_moe_lora_linear_matches_the_per_token_loop(data, regime):
    """The fused layer's op on the Triton backend, static or learned routing (router weight or
    given logits), LoRA dropout and router jitter, in fp32 and fp64, against float64 loops:
    output, aux loss and every gradient. Static ids outside [0, E) with validation off add no
    adapter and get a zero gate gradient (the loop skips them)."""
    from moelora.ops import moe_lora as moe_lora_module
    from moelora.ops.moe_lora_linear import RouterSpec, moe_lora_linear

    draw = data.draw
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    T, d_in, d_out = draw(st.integers(1, 6)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    r, E = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    k = draw(st.integers(1, E))
    mode = draw(st.sampled_from(["static", "softmax_topk", "topk_softmax", "threshold"])) if E > 1 else "static"
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    shared_a = draw(st.booleans())
    p = dict(x=rand(T, d_in), weight=rand(d_out, d_in), bias=rand(d_out) if draw(st.booleans()) else None,
             lora_a=rand(*((r, d_in) if shared_a else (E, r, d_in))), lora_b=rand(E, d_out, r))
    mask = torch.rand(T, d_in, generator=g) < 0.7 if draw(st.booleans()) else None
    jitter = noise = router = None
    out_of_range = False
    if mode == "static":
        ids, w = torch.randint(0, E, (T, k), generator=g), torch.rand(T, k, generator=g, dtype=torch.float64) - 0.3
        p["topk_weights"] = w
        out_of_range = draw(st.booleans())
        if out_of_range:  # some slots name no expert: -1, E or beyond
            bad = torch.rand(T, k, generator=g) < 0.4
            ids[bad] = torch.tensor([-1, E, E + 2])[torch.randint(0, 3, (int(bad.sum()),), generator=g)]
    else:
        given_logits = draw(st.booleans())
        p["router"] = rand(T, E) * 2 if given_logits else rand(E, d_in)
        if not given_logits and draw(st.booleans()):
            jitter = (1 + 0.2 * (torch.rand(T, d_in, generator=g) - 0.5)).to(dtype)
        eps = draw(st.sampled_from([0.0, 0.3])) if mode == "threshold" else 0.0
        if eps and draw(st.booleans()):
            noise = torch.rand(T, k, generator=g).to(dtype)
        renormalize = draw(st.booleans())
    leaves = {n: strided(t.to(dtype), True, DEVICE) for n, t in p.items() if t is not None}
    if mode != "static":
        router = RouterSpec(None if given_logits else leaves["router"], leaves["router"] if given_logits else None,
                            mode, k, renormalize, eps, eps, 0, None, None if noise is None else noise.to(DEVICE),
                            0.01, 0.001, None if jitter is None else jitter.to(DEVICE))
    scaling = draw(st.sampled_from([0.5, -2.0, 16 / 3]))
    dense_width = moe_lora_module.DENSE_MAX_WIDTH
    moe_lora_module.DENSE_MAX_WIDTH = dense_width if regime == "dense" else 0  # the grouped regime on a small layer
    try:
        with moelora.validation(not out_of_range):  # validation would refuse the out-of-range ids
            y, out = moe_lora_linear(leaves["x"], leaves["weight"], leaves.get("bias"), leaves["lora_a"],
                                     leaves["lora_b"], scaling=scaling, router=router,
                                     topk_ids=strided(ids, device=DEVICE) if mode == "static" else None,
                                     topk_weights=leaves.get("topk_weights"),
                                     dropout_mask=None if mask is None else mask.to(DEVICE), dropout_scale=1 / 0.7,
                                     backend="triton")
    finally:
        moe_lora_module.DENSE_MAX_WIDTH = dense_width
    ref = {n: t.detach().cpu().double().requires_grad_() for n, t in leaves.items()}
    x = ref["x"]
    x_lora = x if mask is None else x * mask / 0.7
    aux_ref = None
    if mode == "static":
        w_ref = ref["topk_weights"]
    else:
        logits = ref["router"] if given_logits else (x if jitter is None else x * jitter.double()) @ ref["router"].t()
        ids = out.routing.ids.cpu().long()
        top = logits.detach().topk(min(k + 1, E), dim=1).values  # the op's ids are float64's top-k (no near ties)
        decisive = (top[:, k - 1] - top[:, k]).abs() > 1e-6 if k < E else torch.ones(T, dtype=torch.bool)
        assert all(set(ids[t].tolist()) == set(logits[t].topk(k).indices.tolist()) for t in range(T) if decisive[t])
        w_ref, counts, prob_sums, lse = linear_routing_loop(logits, ids, mode, renormalize, eps, noise)
        aux_ref = 0.01 * E * (counts * prob_sums).sum() / T**2 + 0.001 * (lse**2).mean()
        torch.testing.assert_close(out.aux_loss.cpu().double(), aux_ref.detach(), rtol=1e-6, atol=0)
    rows = []
    for t in range(T):
        row = x[t] @ ref["weight"].t() + (ref["bias"] if "bias" in ref else 0)
        for j in range(k):
            e = int(ids[t, j])
            if not 0 <= e < E:  # out of range (validation off): no adapter
                continue
            a_e = ref["lora_a"] if shared_a else ref["lora_a"][e]
            row = row + scaling * w_ref[t, j] * (ref["lora_b"][e] @ (a_e @ x_lora[t]))
        rows.append(row)
    y_ref = torch.stack(rows)
    torch.testing.assert_close(y.cpu().double(), y_ref, **TOL[dtype])
    grad = torch.randn(T, d_out, generator=g, dtype=torch.float64)
    # fp64: the aux loss stays out of the loss (its kernels take their coefficients as fp32 scalars)
    aux_coef = 3.0 if aux_ref is not None and dtype == torch.float32 else 0.0
    loss = (y.double().cpu() * grad).sum() + (aux_coef * out.aux_loss.double().cpu() if aux_coef else 0)
    loss_ref = (y_ref * grad).sum() + (aux_coef * aux_ref if aux_coef else 0)
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    grads_ref = torch.autograd.grad(loss_ref, [ref[n] for n in names], allow_unused=True)
    for name, got, want in zip(names, grads, grads_ref):
        want = torch.zeros(ref[name].shape, dtype=torch.float64) if want is None else want
        got = torch.zeros_like(leaves[name]) if got is None else got
        torch.testing.assert_close(got.cpu().double(), want, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


# ---- moe_ffn ----------------------------------------------------------------------------------
ACTIVATIONS = [F.silu, F.gelu, torch.tanh]


def moe_ffn_loop(x, ids, w, p, activation, normalize):
    """float64 per token: slots with weight 0 or an id outside [0, E) are dropped."""
    E = p["w_in"].shape[0]
    rows = []
    for t in range(x.shape[0]):
        kept = [j for j in range(ids.shape[1]) if w[t, j] != 0 and 0 <= ids[t, j] < E]
        total = sum(w[t, j] for j in kept) if normalize and kept else 1.0
        y = torch.zeros(p["w_out"].shape[1], dtype=torch.float64)
        for j in kept:
            e = int(ids[t, j])
            bias = lambda name: None if p[name] is None else p[name][e]  # noqa: E731
            h = F.linear(x[t], p["w_in"][e], bias("b_in"))
            h = activation(h) if p["w_gate"] is None else activation(F.linear(x[t], p["w_gate"][e], bias("b_gate"))) * h
            y = y + w[t, j] / total * F.linear(h, p["w_out"][e], bias("b_out"))
        rows.append(y)
    return torch.stack(rows) if rows else torch.zeros(0, p["w_out"].shape[1], dtype=torch.float64)


@settings(max_examples=80, **PROFILE)
@given(st.data())
def test_moe_ffn_matches_the_per_token_loop(data):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    T, d, f, E = draw(st.integers(0, 8)), draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
    ids, w, used, out_of_range = draw(routing(T, E))
    normalize = draw(st.booleans())
    if normalize:
        w = w.abs()  # positive kept sums (the others raise: test_moe_lora_edge_values.py)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    gated = draw(st.booleans())
    p = {"w_in": torch.randn(E, f, d, generator=g, dtype=torch.float64),
         "w_out": torch.randn(E, d, f, generator=g, dtype=torch.float64),
         "w_gate": torch.randn(E, f, d, generator=g, dtype=torch.float64) if gated else None}
    for name, rows in (("b_in", f), ("b_out", d), ("b_gate", f)):
        p[name] = torch.randn(E, rows, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    if gated is False:
        p["b_gate"] = None
    for name in ("w_in", "w_out"):
        poison_unused(p[name], used, E, draw)
    activation = draw(st.sampled_from(ACTIVATIONS))
    x = strided(torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype), True)
    weights = strided(w.to(dtype), True)
    params = {n: (strided(t.to(dtype), True) if t is not None else None) for n, t in p.items()}
    with moelora.validation(not out_of_range):
        y = moelora.moe_ffn(x, strided(ids), weights, params["w_in"], params["b_in"], params["w_out"], params["b_out"],
                            activation, params["w_gate"], params["b_gate"], normalize=normalize, backend="torch")
    leaves = [x, weights, params["w_in"]]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_params = dict(p, w_in=ref_leaves[2])
    y_ref = moe_ffn_loop(ref_leaves[0], ids, ref_leaves[1], ref_params, activation, normalize)
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    assert_grads_match(y, leaves, y_ref, ref_leaves, ["x", "topk_weights", "w_in"], dtype)


# ---- route ------------------------------------------------------------------------------------
@settings(max_examples=100, **PROFILE)
@given(st.data(), ROUTING_PATHS)
def test_route_matches_the_per_row_reference(data, path):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    T, E = draw(st.integers(0, 12)), draw(st.integers(1, 10))
    k = draw(st.integers(1, E))
    mode, renorm = draw(st.sampled_from([("softmax_topk", False), ("softmax_topk", True), ("topk_softmax", False)]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    logits = torch.randn(T, E, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 30.0]))
    if T and draw(st.booleans()):  # NaN, -inf and +inf entries, ties
        special = torch.tensor([float("nan"), -float("inf"), float("inf"), 0.0], dtype=torch.float64)
        mask = torch.rand(T, E, generator=g) < 0.3
        logits[mask] = special[torch.randint(0, 4, (int(mask.sum()),), generator=g)]
    logits = strided(logits.to(dtype))
    out = run_path(path, moelora.route, logits, k, mode=mode, renormalize=renorm)
    w_ref, ids_ref, cnt_ref, ps_ref, lse_ref = route_reference(logits, k, mode, renorm)
    assert torch.equal(out.ids.long(), ids_ref) and torch.equal(out.counts, cnt_ref)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.weights.double(), w_ref, **tol)
    torch.testing.assert_close(out.lse.double(), lse_ref, **tol)
    torch.testing.assert_close(out.prob_sums.double(), ps_ref, rtol=tol["rtol"], atol=tol["atol"] * max(T, 1))
    assert torch.isfinite(out.weights).all() and torch.isfinite(out.prob_sums).all()


# ---- dispatch_metadata / dispatch / combine ---------------------------------------------------
@settings(max_examples=100, **PROFILE)
@given(st.data(), ROUTING_PATHS)
def test_dispatch_and_combine_match_the_per_pair_loops(data, path):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    T, E, d = draw(st.integers(0, 12)), draw(st.integers(1, 8)), draw(st.integers(1, 5))
    ids, w, used, out_of_range = draw(routing(T, E))
    block_size = draw(st.sampled_from([None, 1, 2, 4, 8]))
    ids_in = strided(ids.to(draw(st.sampled_from([torch.int32, torch.int64]))))
    with moelora.validation(not out_of_range):
        meta = run_path(path, moelora.dispatch_metadata, ids_in, E, block_size=block_size)
        ref = metadata_reference(ids, E, block_size)
        for name, want in ref.items():
            assert getattr(meta, name).flatten().tolist() == list(want), name
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        x = strided(torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype), True)
        rows = run_path(path, moelora.dispatch, x, meta)
        sp, inv = meta.layout
        k = ids.shape[1]
        for i, pair in enumerate(sp.tolist()):  # dispatch: exact row copies, zero rows for -1
            assert torch.equal(rows[i], x[pair // k] if pair >= 0 else torch.zeros(d, dtype=dtype))
        y_sorted = strided(torch.randn(rows.shape, generator=g, dtype=torch.float64).to(dtype), True)
        weights = strided(w.to(dtype), True)
        out = run_path(path, moelora.combine, y_sorted, meta, weights)
        want = torch.zeros(T, d, dtype=torch.float64)
        for t in range(T):
            for j in range(k):
                if inv[t, j] >= 0:
                    want[t] += w[t, j] * y_sorted[inv[t, j]].double()
        torch.testing.assert_close(out.double(), want, **TOL[dtype])
        grad = torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype)
        gy, gw = torch.autograd.grad(out, (y_sorted, weights), grad)
        gy_want = torch.zeros(rows.shape, dtype=torch.float64)
        gw_want = torch.zeros(T, k, dtype=torch.float64)
        for t in range(T):
            for j in range(k):
                if inv[t, j] >= 0:
                    gy_want[inv[t, j]] += w[t, j] * grad[t].double()
                    gw_want[t, j] = (grad[t].double() * y_sorted[inv[t, j]].double()).sum()
        torch.testing.assert_close(gy.double(), gy_want, **TOL[dtype])
        torch.testing.assert_close(gw.double(), gw_want, **TOL[dtype])
