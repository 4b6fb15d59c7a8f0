"""Property-based tests (hypothesis) of the public operators against float64 per-token loops.

Drawn: shapes (empty batches, one expert, k = E), dtypes (fp32/fp64), strides (every input
a non-contiguous view), leading shapes, id patterns (duplicates in a token, all on one
expert, experts without tokens, ids out of range with validation off), gate weights (zero,
negative), scalings, and NaN/Inf in the weights of experts no token chose. Deterministic:
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
