"""moelora.dispatch_metadata / dispatch / combine: C++ and fallback paths vs Python-loop
references, padding, invalid ids, determinism, fallback == native bitwise, opcheck,
gradcheck (fp64) and validation; CUDA vs CPU when a GPU is there."""

import subprocess
import sys

import pytest
import torch

import moelora
from moelora import switches as _config
from helpers import PATHS, metadata_reference, needs_c, needs_cuda_kernels, run_path

FIELDS = ("counts", "offsets", "sorted_pairs", "inverse", "padded_offsets", "sorted_pairs_padded",
          "inverse_padded", "block_expert")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _random_ids(T, E, k, gen, distinct=True):
    if T == 0:
        return torch.empty(0, k, dtype=torch.int64)
    if distinct:
        return torch.rand(T, E, generator=gen).argsort(-1)[:, :k]
    return torch.randint(0, E, (T, k), generator=gen)


def _check_meta(meta, ids, E, bs):
    ref = metadata_reference(ids, E, bs)
    T, k = ids.shape
    for name in FIELDS:
        got = getattr(meta, name)
        if bs is None and name in ("padded_offsets", "sorted_pairs_padded", "inverse_padded", "block_expert"):
            assert got is None
            continue
        want = torch.tensor(ref[name], dtype=got.dtype).reshape(got.shape)
        assert got.dtype == (torch.int32 if name == "block_expert" else torch.int64), name
        assert torch.equal(got, want), name
    assert meta.inverse.shape == (T, k)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bs", [None, 1, 4, 16])
@pytest.mark.parametrize("T,E,k", [(0, 4, 2), (1, 1, 1), (50, 8, 2), (33, 257, 3), (9, 6, 6), (200, 1024, 4)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_metadata_matches_reference(path, bs, T, E, k, id_dtype):
    gen = torch.Generator().manual_seed(T * 7 + E)
    ids = _random_ids(T, E, k, gen, distinct=(T % 2 == 0)).to(id_dtype)
    meta = run_path(path, moelora.dispatch_metadata, ids, E, block_size=bs)
    _check_meta(meta, ids, E, bs)


@pytest.mark.parametrize("path", PATHS)
def test_metadata_all_to_one_expert_and_invalid_ids(path):
    ids = torch.full((40, 2), 3)
    ids[:, 1] = torch.arange(40) % 5  # includes 3 again (a token may name an expert twice)
    _check_meta(run_path(path, moelora.dispatch_metadata, ids, 5, block_size=8), ids, 5, 8)
    bad = ids.clone()
    bad[0, 0], bad[7, 1], bad[9, 0] = -1, 5, 1 << 40
    with pytest.raises(ValueError, match="topk_ids must lie in"):
        run_path(path, moelora.dispatch_metadata, bad, 5)
    with moelora.validation(False):
        meta = run_path(path, moelora.dispatch_metadata, bad, 5, block_size=4)
    _check_meta(meta, bad, 5, 4)
    assert meta.inverse[0, 0] == -1 and meta.inverse_padded[7, 1] == -1 and meta.offsets[-1] == 77
    assert (meta.sorted_pairs[77:] == -1).all()


@pytest.mark.parametrize("path", PATHS)
def test_metadata_deterministic(path):
    ids = torch.randint(0, 64, (5000, 2), dtype=torch.int32)
    a = run_path(path, moelora.dispatch_metadata, ids, 64, block_size=64)
    b = run_path(path, moelora.dispatch_metadata, ids, 64, block_size=64)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def _reference_combine(y, inv, w):
    out = torch.zeros(inv.shape[0], y.shape[1], dtype=torch.float64)
    for t in range(inv.shape[0]):
        for j in range(inv.shape[1]):
            if inv[t, j] >= 0:
                out[t] += (1.0 if w is None else float(w[t, j])) * y[inv[t, j]].double()
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [None, 4])
def test_dispatch_combine_match_reference(path, dtype, bs):
    gen = torch.Generator().manual_seed(17)
    T, E, k, d = 23, 6, 2, 37
    ids = _random_ids(T, E, k, gen)
    ids[3, 0] = 9  # invalid id, left out with validation off
    x = torch.randn(T, d, generator=gen).to(dtype)
    w = torch.rand(T, k, generator=gen)
    with moelora.validation(False):
        meta = run_path(path, moelora.dispatch_metadata, ids, E, block_size=bs)
    sp, inv = meta.layout
    xs = run_path(path, moelora.dispatch, x, meta)
    assert xs.dtype == dtype and xs.shape == (sp.shape[0], d)
    for i, p in enumerate(sp.tolist()):
        assert torch.equal(xs[i], x[p // k] if p >= 0 else torch.zeros(d, dtype=dtype)), i
    y = (xs.float() * 2 - 1).to(dtype)
    out = run_path(path, moelora.combine, y, meta, w)
    assert out.dtype == dtype and out.shape == (T, d)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(out.double(), _reference_combine(y, inv, w), rtol=tol, atol=tol)
    torch.testing.assert_close(run_path(path, moelora.combine, y, meta, None).double(),
                               _reference_combine(y, inv, None), rtol=tol, atol=tol)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_fallback_equals_native_bitwise(dtype):
    gen = torch.Generator().manual_seed(29)
    T, E, k, d = 301, 16, 3, 65
    ids = _random_ids(T, E, k, gen)
    x = (torch.randn(T, d, generator=gen) * 5).to(dtype)
    w = torch.rand(T, k, generator=gen)
    for bs in (None, 16):
        outs = []
        for path in ("native", "fallback"):
            meta = run_path(path, moelora.dispatch_metadata, ids, E, block_size=bs)
            xs = run_path(path, moelora.dispatch, x, meta)
            outs.append((meta, xs, run_path(path, moelora.combine, xs * 3, meta, w),
                         run_path(path, torch.ops.moelora.dispatch if path == "native" else
                                  moelora.ops.routing_torch.dispatch, x, *meta.layout, w)))
        (ma, *ra), (mb, *rb) = outs
        assert all(torch.equal(getattr(ma, f), getattr(mb, f)) for f in FIELDS if getattr(ma, f) is not None)
        assert all(torch.equal(a, b) for a, b in zip(ra, rb))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bs", [None, 4])
def test_dispatch_combine_gradcheck(path, bs):
    gen = torch.Generator().manual_seed(3)
    T, E, k, d = 7, 4, 2, 5
    ids = _random_ids(T, E, k, gen)
    ids[2, 1] = -1
    with moelora.validation(False):
        meta = run_path(path, moelora.dispatch_metadata, ids, E, block_size=bs)
    x = torch.randn(T, d, dtype=torch.float64, generator=gen, requires_grad=True)
    rows = meta.layout[0].shape[0]
    y = torch.randn(rows, d, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.autograd.gradcheck(lambda a: run_path(path, moelora.dispatch, a, meta), (x,))
    torch.autograd.gradcheck(lambda a, b: run_path(path, moelora.combine, a, meta, b), (y, w))
    torch.autograd.gradcheck(lambda a, b: run_path(path, moelora.combine, run_path(path, moelora.dispatch, a, meta)
                                                   * 2, meta, b), (x, w))


@pytest.mark.parametrize("path", PATHS)
def test_combine_gradgradcheck(path):
    """Second derivatives (create_graph=True) of the weighted combine: its backward runs dispatch and
    pair_dot, whose own gradients (pair_dot's with respect to both operands) are checked here."""
    gen = torch.Generator().manual_seed(5)
    T, E, k, d = 6, 4, 2, 3
    ids = _random_ids(T, E, k, gen)
    ids[1, 0] = -1
    with moelora.validation(False):
        meta = run_path(path, moelora.dispatch_metadata, ids, E, block_size=4)
    y = torch.randn(meta.layout[0].shape[0], d, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.autograd.gradgradcheck(lambda a, b: run_path(path, moelora.combine, a, meta, b), (y, w))


@pytest.mark.parametrize("path", PATHS)
def test_combine_gradgradcheck_with_only_the_weights_requiring_grad(path):
    """Second derivatives of the weighted combine in its weights alone (y a constant): the weights' gradient
    pair_dot(g, y) is differentiated in g, whose operand is then the only one needing a gradient."""
    gen = torch.Generator().manual_seed(6)
    ids = _random_ids(6, 4, 2, gen)
    meta = run_path(path, moelora.dispatch_metadata, ids, 4)
    y = torch.randn(meta.layout[0].shape[0], 3, dtype=torch.float64, generator=gen)
    w = torch.rand(6, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.autograd.gradgradcheck(lambda b: run_path(path, moelora.combine, y, meta, b), (w,))


@pytest.mark.parametrize("path", PATHS)
def test_dispatch_with_validation_off_gives_a_zero_row_for_a_pair_past_the_pairs(path):
    """With moelora.validation(False) a sorted pair of T*k or more is not dereferenced: its row is zero."""
    meta = run_path(path, moelora.dispatch_metadata, torch.tensor([[0, 1], [1, 2]]), 3)
    x = torch.randn(2, 4)
    with moelora.validation(False):
        out = run_path(path, moelora.dispatch, x, meta._replace(sorted_pairs=torch.tensor([0, 1, 4, 2])))
    assert torch.equal(out, torch.stack([x[0], x[0], torch.zeros(4), x[1]]))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_combine_weight_gradient_of_half_rows_accumulates_in_fp32(path, dtype):
    """The gate weights' gradient of a combine of half-precision rows (pair_dot(g, y)): each
    sum_d g[t, d] y[pos(t, j), d] of the half values in fp32, not rounded to half precision, against
    float64 by relative error."""
    gen = torch.Generator().manual_seed(41)
    T, E, k, d = 37, 6, 3, 256
    ids = _random_ids(T, E, k, gen)
    meta = run_path(path, moelora.dispatch_metadata, ids, E, block_size=4)
    y = torch.randn(meta.layout[0].shape[0], d, generator=gen).to(dtype)
    g = torch.randn(T, d, generator=gen).to(dtype)
    w = torch.rand(T, k, generator=gen, requires_grad=True)
    out = run_path(path, moelora.combine, y, meta, w)
    run_path(path, torch.autograd.backward, out, g)
    inv = meta.layout[1]
    want = (g.double().unsqueeze(1) * y.double()[inv]).sum(-1)
    assert w.grad.dtype == torch.float32
    assert ((w.grad.double() - want).norm() / want.norm()).item() < 1e-6


@pytest.mark.parametrize("path", PATHS)
def test_backward_with_expanded_gradient(path):
    """y.sum() hands backward a stride-0 gradient: gradients must still be exact."""
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]])
    meta = run_path(path, moelora.dispatch_metadata, ids, 3, block_size=2)
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.rand(3, 2, requires_grad=True)
    out = run_path(path, moelora.combine, run_path(path, moelora.dispatch, x, meta), meta, w)
    out.sum().backward()
    torch.testing.assert_close(x.grad, w.detach().sum(1, keepdim=True).expand(3, 4))
    torch.testing.assert_close(w.grad, x.detach().sum(1, keepdim=True).expand(3, 2))


@needs_c
def test_opcheck_dispatch_ops():
    ids = torch.tensor([[0, 2], [1, 2], [2, 0], [1, 0]], dtype=torch.int32)
    for bs in (0, 4):
        torch.library.opcheck(torch.ops.moelora.dispatch_metadata.default, (ids, 3, bs))
    meta = moelora.dispatch_metadata(ids, 3, block_size=4)
    sp, inv = meta.layout
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(sp.shape[0], 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.moelora.dispatch.default, (x, sp, inv, None))
    torch.library.opcheck(torch.ops.moelora.dispatch.default, (x, sp, inv, w))
    torch.library.opcheck(torch.ops.moelora.combine.default, (y, sp, inv, w))
    torch.library.opcheck(torch.ops.moelora.combine.default, (y.detach().half(), sp, inv, None))
    torch.library.opcheck(torch.ops.moelora.pair_dot.default, (x, y, sp, inv))


@pytest.mark.parametrize("path", PATHS)
def test_validation(path):
    ids = torch.tensor([[0, 1], [1, 2]])
    meta = moelora.dispatch_metadata(ids, 3)
    x = torch.randn(2, 4)
    cases = [
        (TypeError, "topk_ids", lambda: moelora.dispatch_metadata(ids.float(), 3)),
        (ValueError, "topk_ids", lambda: moelora.dispatch_metadata(ids[0], 3)),
        (ValueError, "num_experts", lambda: moelora.dispatch_metadata(ids, 1)),
        (ValueError, "experts", lambda: moelora.dispatch_metadata(ids, 5000)),
        (ValueError, "block_size", lambda: moelora.dispatch_metadata(ids, 3, block_size=0)),
        (TypeError, "x", lambda: moelora.dispatch(x.int(), meta)),
        (ValueError, "x", lambda: moelora.dispatch(torch.randn(3, 4), meta)),
        (TypeError, "meta", lambda: moelora.dispatch(x, tuple(meta))),
        (ValueError, "y_sorted", lambda: moelora.combine(torch.randn(3, 4), meta, None)),
        (ValueError, "topk_weights", lambda: moelora.combine(torch.randn(4, 4), meta, torch.rand(2, 3))),
        (TypeError, "topk_weights",
         lambda: moelora.combine(torch.randn(4, 4), meta, torch.ones(2, 2, dtype=torch.long))),
    ]
    for exc, word, fn in cases:
        with pytest.raises(exc, match=word):
            run_path(path, fn)
    forged = meta._replace(inverse=torch.tensor([[0, 1], [2, 9]]))  # out-of-range position
    with pytest.raises(ValueError, match="inverse"):
        run_path(path, moelora.combine, torch.randn(4, 4), forged, None)
    with moelora.validation(False):  # skipped, never dereferenced
        out = run_path(path, moelora.combine, torch.ones(4, 4), forged, None)
    assert torch.equal(out, torch.tensor([[2.0] * 4, [1.0] * 4]))


@pytest.mark.parametrize("path", PATHS)
def test_combine_backward_with_no_tokens_and_a_padded_layout(path):
    """T = 0 with block_size: y_sorted still has the padding rows (found by test_properties)."""
    meta = run_path(path, moelora.dispatch_metadata, torch.zeros(0, 1, dtype=torch.long), 1, block_size=2)
    y = torch.randn(meta.sorted_pairs_padded.shape[0], 3, requires_grad=True)
    w = torch.rand(0, 1, requires_grad=True)
    out = run_path(path, moelora.combine, y, meta, w)
    gy, gw = torch.autograd.grad(out.sum(), (y, w))
    assert out.shape == (0, 3) and gw.shape == (0, 1) and torch.equal(gy, torch.zeros_like(y))


@pytest.mark.parametrize("path", PATHS)
def test_syncing_checks_skip_themselves_under_torch_compile(path):
    """The range checks read device values on the host; like moelora.ops.validation's they skip
    themselves while torch.compile traces (a host read there is a graph break)."""
    torch._dynamo.reset()

    def f(ids, x, y):
        meta = moelora.dispatch_metadata(ids, 3, block_size=2)
        return moelora.dispatch(x, meta), moelora.combine(y, meta, None)

    ids, x, y = torch.tensor([[0, 1], [1, 2]]), torch.randn(2, 4), torch.randn(8, 4)
    with _config.force_fallback(path == "fallback"):
        eager = f(ids, x, y)
        compiled = torch.compile(f, fullgraph=True, backend="eager")(ids, x, y)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    torch._dynamo.reset()


def test_import_and_fallbacks_without_extension():
    code = (
        "import sys; sys.modules['moelora._C'] = None\n"
        "import torch, moelora\n"
        "from moelora.ops import native as _ext\n"
        "assert not _ext.HAS_C and not _ext.use_native(torch.device('cpu'))\n"
        "r = moelora.route(torch.randn(6, 4), 2)\n"
        "m = moelora.dispatch_metadata(r.ids, 4, block_size=2)\n"
        "y = moelora.combine(moelora.dispatch(torch.ones(6, 3), m), m, r.weights)\n"
        "assert torch.allclose(y, r.weights.sum(1, keepdim=True).expand(6, 3))\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ---- CUDA ----------------------------------------------------------------------------------
@needs_cuda_kernels
@pytest.mark.parametrize("T,E,k", [(65536, 64, 2), (65536, 8, 2), (3001, 257, 4), (700, 4096, 3), (0, 8, 2), (1, 1, 1)])
@pytest.mark.parametrize("bs", [None, 64])
def test_metadata_cuda_matches_cpu(T, E, k, bs):
    ids = _random_ids(T, E, k, torch.Generator().manual_seed(T + E), distinct=False).to(torch.int32)
    if T > 10:
        ids[5, 0] = -3
        ids[9, k - 1] = E
    with moelora.validation(False):
        cpu = moelora.dispatch_metadata(ids, E, block_size=bs)
        gpu = moelora.dispatch_metadata(ids.cuda(), E, block_size=bs)
        gpu2 = moelora.dispatch_metadata(ids.cuda().long(), E, block_size=bs)
    for f in FIELDS:
        a, b, c = getattr(cpu, f), getattr(gpu, f), getattr(gpu2, f)
        if a is None:
            continue
        assert torch.equal(b.cpu(), a) and torch.equal(c.cpu(), a), f


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [4096, 37, 8])
def test_dispatch_combine_cuda_matches_cpu(dtype, d):
    T, E, k = 65536 if d == 8 else 2048, 64, 2
    ids = _random_ids(T, E, k, torch.Generator().manual_seed(d))
    x = torch.randn(T, d).to(dtype)
    w = torch.rand(T, k)
    for bs in (None, 128):
        meta_c = moelora.dispatch_metadata(ids, E, block_size=bs)
        meta_g = moelora.dispatch_metadata(ids.cuda(), E, block_size=bs)
        xs_c, xs_g = moelora.dispatch(x, meta_c), moelora.dispatch(x.cuda(), meta_g)
        assert torch.equal(xs_g.cpu(), xs_c)
        out_c, out_g = moelora.combine(xs_c, meta_c, w), moelora.combine(xs_g, meta_g, w.cuda())
        assert torch.equal(out_g, moelora.combine(xs_g, meta_g, w.cuda()))  # deterministic
        tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
        torch.testing.assert_close(out_g.cpu(), out_c, rtol=tol, atol=tol)


@needs_cuda_kernels
def test_dispatch_combine_cuda_grad_and_opcheck():
    ids = torch.tensor([[0, 2], [1, 2], [2, 0], [1, 0]], device="cuda")
    meta = moelora.dispatch_metadata(ids, 3, block_size=4)
    x = torch.randn(4, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.rand(4, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: moelora.combine(moelora.dispatch(a, meta) * 2, meta, b), (x, w))
    sp, inv = meta.layout
    torch.library.opcheck(torch.ops.moelora.combine.default, (moelora.dispatch(x, meta), sp, inv, w))
    torch.library.opcheck(torch.ops.moelora.dispatch_metadata.default, (ids, 3, 4))


@pytest.mark.parametrize("path", PATHS)
def test_validation_edges_are_exact(path):
    """The range checks' bounds: an id equal to num_experts, a sorted pair equal to T*k and an inverse
    position equal to y_sorted's row count are refused; num_experts = MAX_EXPERTS is accepted."""
    with pytest.raises(ValueError, match="topk_ids"):
        run_path(path, moelora.dispatch_metadata, torch.tensor([[0, 3], [1, 2]]), 3)
    meta = run_path(path, moelora.dispatch_metadata, torch.tensor([[0, 1], [1, 2]]), 3)
    forged = meta._replace(sorted_pairs=torch.tensor([0, 1, 2, 4]))  # 4 = T*k
    with pytest.raises(ValueError, match="sorted pairs"):
        run_path(path, moelora.dispatch, torch.randn(2, 4), forged)
    forged = meta._replace(inverse=torch.tensor([[0, 1], [2, 4]]))  # 4 = y_sorted's rows
    with pytest.raises(ValueError, match="inverse"):
        run_path(path, moelora.combine, torch.randn(4, 4), forged, None)
    ids = torch.tensor([[moelora.ops.routing.MAX_EXPERTS - 1, 0]])
    meta = run_path(path, moelora.dispatch_metadata, ids, moelora.ops.routing.MAX_EXPERTS)
    assert meta.counts.shape == (moelora.ops.routing.MAX_EXPERTS,) and meta.counts[-1] == 1


@pytest.mark.parametrize("path", PATHS)
def test_dispatch_refuses_a_padded_layouts_sorted_pair_equal_to_t_times_k(path):
    """A padded layout has more rows than pairs (T*k = 4 here, 16 rows): a sorted pair of T*k in it is refused as
    out of range, as in the unpadded layout, instead of being read as padding."""
    meta = run_path(path, moelora.dispatch_metadata, torch.tensor([[0, 1], [1, 2]]), 3, block_size=4)
    assert meta.sorted_pairs_padded.numel() == 16
    forged = meta.sorted_pairs_padded.clone()
    forged[0] = 4
    with pytest.raises(ValueError, match="sorted pairs"):
        run_path(path, moelora.dispatch, torch.randn(2, 4), meta._replace(sorted_pairs_padded=forged))


@pytest.mark.parametrize("path", PATHS)
def test_metadata_refuses_a_negative_id_alone_and_ids_of_three_dims(path):
    """An id below 0 is refused with no id above the experts beside it, and topk_ids of 3 dims are refused as not
    [T, k]: ValueErrors naming topk_ids on every path (the fallback's layout would unpack a 3-D shape)."""
    with pytest.raises(ValueError, match="topk_ids must lie in"):
        run_path(path, moelora.dispatch_metadata, torch.tensor([[0, 1], [-1, 2]]), 3)
    with pytest.raises(ValueError, match="topk_ids must have shape"):
        run_path(path, moelora.dispatch_metadata, torch.tensor([[[0], [1]], [[1], [2]]]), 3)


@pytest.mark.parametrize("T,E,k,bs", [(0, 3, 1, 4), (5, 3, 2, 4), (7, 16, 3, 1), (9, 5, 5, 64)])
def test_fake_layout_tensors_have_the_real_layouts_shapes_and_dtypes(T, E, k, bs):
    """What the custom ops' fake kernels return for a forward's padded layout is shaped as the real one."""
    from moelora.ops.routing import fake_layout_tensors, layout_tensors

    ids = _random_ids(T, E, k, torch.Generator().manual_seed(T))
    real = layout_tensors(moelora.dispatch_metadata(ids, E, block_size=bs))
    fake = fake_layout_tensors(torch.empty(0), T, k, E, bs)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_pair_dot_fake_has_the_kernels_shape_and_dtype(dtype):
    """pair_dot's fake kernel returns [T, k] in the accumulator dtype of its inputs, as the kernel does."""
    ids = _random_ids(5, 4, 2, torch.Generator().manual_seed(2))
    sp, inv = moelora.dispatch_metadata(ids, 4).layout
    a, b = torch.randn(5, 6, dtype=dtype), torch.randn(sp.shape[0], 6, dtype=dtype)
    real = torch.ops.moelora.pair_dot(a, b, sp, inv)
    fake = torch.ops.moelora.pair_dot(a.to("meta"), b.to("meta"), sp.to("meta"), inv.to("meta"))
    assert (fake.shape, fake.dtype) == (real.shape, real.dtype)


@pytest.mark.parametrize("path", PATHS)
def test_metadata_takes_block_size_max_block_size_and_refuses_one_more(path):
    """block_size = MAX_BLOCK_SIZE is accepted on every path (its layout matches the reference); one more is not."""
    from moelora.ops import native

    ids = torch.randint(0, 2, (3, 1))
    meta = run_path(path, moelora.dispatch_metadata, ids, 2, block_size=native.MAX_BLOCK_SIZE)
    _check_meta(meta, ids, 2, native.MAX_BLOCK_SIZE)
    with pytest.raises(ValueError, match=rf"block_size must be in \[1, {native.MAX_BLOCK_SIZE}\]"):
        run_path(path, moelora.dispatch_metadata, ids, 2, block_size=native.MAX_BLOCK_SIZE + 1)
