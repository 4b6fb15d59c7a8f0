"""Inputs that used to give silent wrong answers: routing tensors whose leading shape differs
from x's, NaN/Inf in experts no token chose (and fp32 adapter values that become Inf in fp16
compute), scalings that overflow in fp32, and moe_ffn's normalisation of kept weights that do
not sum to a positive value."""

import pytest
import torch
import torch.nn.functional as F

import moelora
from conftest import DEVICE
from helpers import make_problem, rel_err
from moelora.ops import moe_lora_linear as fused_linear
from moelora.ops.reference import moe_lora_naive, moe_lora_torch


# (name, call(x, a, b, ids, w, **kw)) of every path of the operator
PATHS = {
    "torch": lambda *a, **kw: moelora.moe_lora(*a, backend="torch", **kw),
    "naive": moe_lora_naive,
    "triton-dense": lambda *a, **kw: moelora.moe_lora(*a, backend="triton", regime="dense", **kw),
    "triton-grouped": lambda *a, **kw: moelora.moe_lora(*a, backend="triton", regime="grouped", **kw),
}


# ---- 1. routing tensors must match x's leading shape -----------------------------------------
@pytest.mark.parametrize("ids_shape", [(3, 2, 2), (1, 6, 2), (6, 1, 2), (2, 3, 1, 2)])
def test_ids_with_another_leading_shape_are_rejected(ids_shape):
    p = make_problem(6, 8, 5, 2, 3, 2, seed=1)
    x = p.x.detach().view(2, 3, 8)
    ids, w = p.topk_ids.reshape(ids_shape), p.topk_weights.detach().reshape(ids_shape)
    with pytest.raises(ValueError, match=r"topk_ids must have shape \[6, k\] or \[2, 3, 'k'\] to match x"):
        moelora.moe_lora(x, p.lora_a, p.lora_b, ids, w)


def test_ids_matching_or_flattened_are_accepted():
    p = make_problem(6, 8, 5, 2, 3, 2, seed=1)
    x = p.x.detach().view(2, 3, 8)
    flat = moelora.moe_lora(x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights)
    nested = moelora.moe_lora(x, p.lora_a, p.lora_b, p.topk_ids.view(2, 3, 2), p.topk_weights.view(2, 3, 2))
    assert flat.shape == (2, 3, 5) and torch.equal(flat, nested)


# ---- 2. NaN/Inf in experts no token chose ----------------------------------------------------
def _poisoned_problem(shared_a, seed=3, tokens=9):
    """Experts 3 and 5 of 6 get no token; their B (and A) hold NaN and Inf."""
    p = make_problem(tokens, 16, 12, 4, 6, 2, shared_a=shared_a, experts=3, device=DEVICE, seed=seed)
    clean_b, clean_a = p.lora_b.detach().clone(), p.lora_a.detach().clone()
    with torch.no_grad():
        p.lora_b[3, 0, 0], p.lora_b[3, 5] = float("nan"), float("inf")
        p.lora_b[5, :, 1] = -float("inf")
        if not shared_a:
            p.lora_a[3, 1, 2], p.lora_a[5] = float("nan"), float("inf")
    return p, clean_a, clean_b


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_nan_and_inf_in_unchosen_experts_change_nothing(path, shared_a):
    p, clean_a, clean_b = _poisoned_problem(shared_a)
    _check_unchosen_experts_change_nothing(PATHS[path], p, clean_a, clean_b, [3, 4, 5])


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_nan_and_inf_in_unchosen_expert_0_change_nothing_at_three_slots(path, shared_a):
    """Expert 0 unchosen and poisoned, k = 3: the kernels read a token's slots in blocks of a power
    of two, and the slot past the k-th (masked) must name no expert, expert 0 included."""
    p = make_problem(9, 16, 12, 4, 6, 3, shared_a=shared_a, experts=4, device=DEVICE, seed=5)
    p.topk_ids = p.topk_ids + 1  # experts 1-4 chosen, 0 and 5 not
    clean_b, clean_a = p.lora_b.detach().clone(), p.lora_a.detach().clone()
    with torch.no_grad():
        p.lora_b[0, 0, 0], p.lora_b[0, 5], p.lora_b[5, :, 1] = float("nan"), float("inf"), -float("inf")
        if not shared_a:
            p.lora_a[0, 1, 2], p.lora_a[0, 3] = float("nan"), float("inf")
    _check_unchosen_experts_change_nothing(PATHS[path], p, clean_a, clean_b, [0, 5])


def _check_unchosen_experts_change_nothing(run, p, clean_a, clean_b, unchosen):
    """``run``'s output and gradients on p (whose ``unchosen`` experts hold NaN / Inf) are finite and
    match the float64 reference on the clean weights; the unchosen experts' gradients are exact zeros."""
    y = run(*p.args(), scaling=p.scaling, base_out=p.base_out)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, p.leaves(), g)
    leaves = [t.detach().double().requires_grad_() for t in (p.x, clean_a, clean_b, p.topk_weights, p.base_out)]
    y_ref = moe_lora_torch(*leaves[:3], p.topk_ids, leaves[3], scaling=p.scaling, base_out=leaves[4])
    grads_ref = torch.autograd.grad(y_ref, leaves, g.double())
    assert torch.isfinite(y).all() and rel_err(y, y_ref) < 1e-5
    for name, got, ref in zip(["x", "lora_a", "lora_b", "topk_weights", "base_out"], grads, grads_ref):
        assert torch.isfinite(got).all() and rel_err(got, ref) < 1e-5, name
    assert (grads[2][unchosen] == 0).all() and (p.lora_a.dim() == 2 or (grads[1][unchosen] == 0).all())


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_nan_in_a_chosen_expert_reaches_only_its_tokens(path, shared_a):
    """A NaN in row 4 of a chosen expert's B makes NaN of output column 4 of the tokens that chose
    it (on the Triton backends the tiles holding them are recomputed with B's non-finite entries
    marked: the mark must reach the output, not the entry's stand-in 0); an Inf in a chosen
    expert's per-expert A, all outputs of its tokens non-finite; every other output as without them.
    40 tokens: more than one slice (16 rows) of a recomputed tile."""
    p, _, _ = _poisoned_problem(shared_a, tokens=40)
    with torch.no_grad():
        p.lora_b[1, 4, 0] = float("nan")  # row 4 of B[1]
        if not shared_a:
            p.lora_a[2, 0, 0] = float("inf")
    y = PATHS[path](*p.args(), scaling=p.scaling)
    uses = lambda e: (p.topk_ids == e).any(1)  # noqa: E731
    bad = torch.zeros_like(y, dtype=torch.bool)
    bad[uses(1), 4] = True
    assert torch.isnan(y[bad]).all()
    if not shared_a:
        bad[uses(2)] = True  # Inf in h: +-Inf or NaN, by the signs it meets
    assert not torch.isfinite(y[bad]).any() and torch.isfinite(y[~bad]).all()
    y_ref = moe_lora_naive(*p.args(), scaling=p.scaling)
    torch.testing.assert_close(y[~bad], y_ref[~bad])


@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_torch_backend_gradients_treat_the_nonfinite_weights_of_chosen_experts_as_zero(shared_a):
    """Inf in a chosen expert's B row (per-expert A: in its A) makes NaN of the outputs it reaches;
    the gradients stay finite: those outputs pass none back, the Inf entries count as 0 (float64
    reference on the weights with them zeroed)."""
    p, _, _ = _poisoned_problem(shared_a)
    with torch.no_grad():
        p.lora_b[1, 4, 0] = float("inf")
        if not shared_a:
            p.lora_a[2, 0] = float("inf")  # a row: the largest float standing in for its Inf overflows A[2] x
    y = moelora.moe_lora(*p.args(), scaling=p.scaling, base_out=p.base_out, backend="torch")
    bad = torch.isnan(y)
    assert bad.any() and not bad.all()
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, p.leaves(), g)
    leaves = [torch.nan_to_num(t.detach().double(), 0.0, 0.0, 0.0).requires_grad_() for t in p.leaves()]
    y_ref = moe_lora_naive(*leaves[:3], p.topk_ids, leaves[3], scaling=p.scaling, base_out=leaves[4])
    grads_ref = torch.autograd.grad(y_ref, leaves[:4], g.double().masked_fill(bad, 0))
    for name, got, ref in zip(["x", "lora_a", "lora_b", "topk_weights"], grads, grads_ref):
        assert torch.isfinite(got).all() and rel_err(got, ref) < 1e-5, name
    assert torch.equal(grads[4], g)  # base_out's: y's, NaN or not


@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_fp32_adapter_values_beyond_fp16_range_stay_in_unchosen_experts(shared_a):
    """fp16 activations, fp32 adapters (the layer's default over an fp16 base): the kernels round
    A and B to fp16 in registers, where 1e5 becomes Inf. Like any Inf of an expert no token
    chose, it must change nothing: forward and every gradient as in float64."""
    p = make_problem(9, 16, 12, 4, 6, 2, shared_a=shared_a, experts=3, device=DEVICE, seed=5)
    weight = torch.randn(12, 16, device=DEVICE) / 4
    a, b = p.lora_a.detach().clone(), p.lora_b.detach().clone()
    with torch.no_grad():
        b[3, 2, 1], b[5, :, 0] = 1e5, -7e4
        if not shared_a:
            a[4, 0, 3] = 3e5
    leaves = [p.x.detach().half().requires_grad_(), a.requires_grad_(), b.requires_grad_(),
              p.topk_weights.detach().clone().requires_grad_()]
    y, _ = fused_linear.moe_lora_linear(leaves[0], weight.half(), None, *leaves[1:3], scaling=p.scaling,
                                        topk_ids=p.topk_ids, topk_weights=leaves[3], backend="triton")
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    ref = [t.detach().double().requires_grad_() for t in (p.x.half(), p.lora_a, p.lora_b, p.topk_weights)]
    y_ref, _ = fused_linear.moe_lora_linear(ref[0], weight.double(), None, *ref[1:3], scaling=p.scaling,
                                            topk_ids=p.topk_ids, topk_weights=ref[3], backend="torch")
    grads_ref = torch.autograd.grad(y_ref, ref, g.double())
    assert torch.isfinite(y).all() and rel_err(y, y_ref) < 5e-3
    for name, got, want in zip(["x", "lora_a", "lora_b", "topk_weights"], grads, grads_ref):
        assert torch.isfinite(got).all() and rel_err(got, want) < 5e-3, name
    assert (grads[2][3:] == 0).all() and (shared_a or (grads[1][3:] == 0).all())


# ---- 3. scaling beyond fp32's range -----------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("scaling,x_scale", [(1e39, 1.0), (1e-41, 1e5)])
def test_scaling_outside_the_fp32_range_gives_the_representable_result(path, scaling, x_scale):
    """s * w * h overflows (s = 1e39) or is subnormal (s = 1e-41) in fp32, s * w * B @ h is O(1)."""
    p = make_problem(5, 8, 6, 2, 3, 2, with_base=False, device=DEVICE, seed=4)
    x = (p.x.detach() * x_scale).requires_grad_()
    b = (p.lora_b.detach() / (scaling * x_scale)).requires_grad_()
    args = (x, p.lora_a, b, p.topk_ids, p.topk_weights)
    y = PATHS[path](*args, scaling=scaling)
    y_ref = moe_lora_torch(*(t.double() if t.is_floating_point() else t for t in args), scaling=scaling)
    assert torch.isfinite(y).all() and rel_err(y, y_ref) < 1e-5, (y, y_ref)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("scaling,x_scale", [(1e39, 1.0), (1e-41, 1e5)])
def test_scaling_outside_the_fp32_range_gives_the_representable_gradients(path, scaling, x_scale):
    """The gradients of the problem above: those of x, A and the weights are O(1) and must come out
    so (the kernels apply the split scale's second factor to each of them); B's is s-sized, compared
    where float32 holds it."""
    p = make_problem(5, 8, 6, 2, 3, 2, with_base=False, device=DEVICE, seed=4)
    x = (p.x.detach() * x_scale).requires_grad_()
    b = (p.lora_b.detach() / (scaling * x_scale)).requires_grad_()
    args = (x, p.lora_a, b, p.topk_ids, p.topk_weights)
    leaves = [x, p.lora_a, b, p.topk_weights]
    grad_out = torch.randn(5, 6, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads = torch.autograd.grad(PATHS[path](*args, scaling=scaling), leaves, grad_out)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = moe_lora_torch(*ref[:3], p.topk_ids, ref[3], scaling=scaling)
    grads_ref = torch.autograd.grad(y_ref, ref, grad_out.double())
    for name, g, g_ref in zip(["x", "lora_a", "lora_b", "topk_weights"], grads, grads_ref):
        if g_ref.abs().max() < torch.finfo(torch.float32).max:
            assert torch.isfinite(g).all() and rel_err(g, g_ref) < 1e-5, (name, g, g_ref)


# ---- 5. moe_ffn(normalize=True) with kept weights that do not sum to a positive value ----------
def _ffn_inputs(weights):
    g = torch.Generator().manual_seed(0)
    T, d, f, E = len(weights), 4, 6, 3
    x = torch.randn(T, d, generator=g)
    w_in, w_out = torch.randn(E, f, d, generator=g), torch.randn(E, d, f, generator=g)
    ids = torch.tensor([[0, 1]] * T)
    return x, ids, torch.tensor(weights), w_in, None, w_out, None, F.silu


@pytest.mark.parametrize("weights", [[[0.5, -0.5]], [[0.3, 0.7], [-0.2, -0.4]], [[0.0, -1e-3]]])
def test_moe_ffn_normalize_rejects_kept_weights_without_a_positive_sum(weights):
    with pytest.raises(ValueError, match=r"normalize=True needs the kept topk_weights of every token to sum to a "
                                         r"positive value"):
        moelora.moe_ffn(*_ffn_inputs(weights), normalize=True)
    moelora.moe_ffn(*_ffn_inputs(weights), normalize=False)  # nothing to normalise: fine


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_moe_ffn_normalize_rejects_kept_weights_whose_sum_is_subnormal(backend, dtype):
    """Kept weights summing to less than the smallest normal number of the mixing dtype (fp32; fp64 for
    fp64 weights) cannot be normalised as promised: the sum is clamped to it (finfo.tiny) on both backends,
    so [1e-39, 3e-39] mixed with coefficients [0.085, 0.256] (summing to 0.34, not 1) without a word. They
    raise as a sum of zero or less does; a normal sum (the same weights scaled up) still runs."""
    tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    x, ids, _, *rest = _ffn_inputs([[0.5, 0.5], [0.5, 0.5]])
    weights = torch.tensor([[0.25, 0.75], [tiny / 8, 3 * tiny / 8]], dtype=torch.float64).to(dtype)
    assert (weights[1] > 0).all()  # subnormal, not flushed to 0
    with pytest.raises(ValueError, match=r"normalize=True needs the kept topk_weights of every token to sum to a "
                                         r"positive value of at least"):
        moelora.moe_ffn(x, ids, weights, *rest, normalize=True, backend=backend)
    scaled = moelora.moe_ffn(x, ids, weights * 2.0 ** 100, *rest, normalize=True, backend=backend)
    ref = moelora.moe_ffn(x, ids, torch.tensor([[0.25, 0.75]] * 2, dtype=dtype), *rest, normalize=True,
                          backend=backend)
    torch.testing.assert_close(scaled, ref)


def test_moe_ffn_normalize_with_every_slot_dropped_gives_zero():
    out = moelora.moe_ffn(*_ffn_inputs([[0.0, 0.0], [0.2, 0.6]]), normalize=True)
    assert torch.equal(out[0], torch.zeros(4)) and torch.isfinite(out).all()


# ---- 6. fp16 activations whose h = x A^T leaves fp16's range while s * w * h does not ----------
@pytest.mark.parametrize("path", ["triton-dense", "triton-grouped"])
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_fp16_h_beyond_fp16_range_with_a_small_scale(path, shared_a):
    """h is kept in fp32 (|h| ~ 1.3e5 here, fp16's largest is 65504); the LoRA scale 1e-3 brings
    s * w * h back into range, as the dense regime and the torch backend compute it: the grouped
    regime must not round h itself to fp16 first (Inf in y and in dB)."""
    g = torch.Generator().manual_seed(0)
    T, d_in, d_out, r, E, k = 12, 64, 8, 4, 3, 2
    x = (4000 + 100 * torch.randn(T, d_in, generator=g)).half()
    a = (0.5 + 0.01 * torch.randn(*(() if shared_a else (E,)), r, d_in, generator=g)).half()
    b = torch.randn(E, d_out, r, generator=g).half()
    ids = torch.rand(T, E, generator=g).argsort(1)[:, :k].to(DEVICE)
    w = torch.rand(T, k, generator=g)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, a, b, w)]
    y = PATHS[path](*leaves[:3], ids, leaves[3], scaling=1e-3)
    dy = torch.randn(y.shape, generator=g).half().to(DEVICE)
    grads = torch.autograd.grad(y, leaves, dy)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = moe_lora_torch(*ref[:3], ids, ref[3], scaling=1e-3)
    grads_ref = torch.autograd.grad(y_ref, ref, dy.double())
    assert torch.isfinite(y).all() and rel_err(y, y_ref) < 5e-3
    for name, got, want in zip(["x", "lora_a", "lora_b", "topk_weights"], grads, grads_ref):
        assert torch.isfinite(got).all() and rel_err(got, want) < 5e-3, name


# ---- 7. base_out is read, never written: aliases of x, views of a kept tensor, stride-0 views --------
@pytest.mark.parametrize("path", ["torch", "triton-dense", "triton-grouped"])
@pytest.mark.parametrize("base_kind", ["x", "strided_view", "expanded"])
def test_base_out_is_read_not_modified_and_gets_dy(path, base_kind):
    """The result is a new tensor (base_out itself is left as it was, whether it is x, a strided
    view of a tensor the caller keeps, or a stride-0 expansion), and base_out's gradient is dy
    (through the view to the tensor it views, summed over an expansion's copies)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    lora_a = torch.randn(3, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(3, 6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0], [1, 2]]).view(2, 3, 2)
    weights = torch.rand(2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    kept = torch.randn(3, 2, 12, generator=g, dtype=torch.float64, requires_grad=True)
    row = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    base = {"x": x, "strided_view": kept.transpose(0, 1)[..., ::2], "expanded": row.expand(2, 3, 6)}[base_kind]
    before = base.detach().clone()
    y = PATHS[path](x, lora_a, lora_b, ids, weights, scaling=0.5, base_out=base)
    assert torch.equal(base.detach(), before)
    assert y.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in (x, kept, row)}
    expected = moe_lora_naive(x, lora_a, lora_b, ids, weights, scaling=0.5) + base
    torch.testing.assert_close(y, expected)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    leaf = {"x": x, "strided_view": kept, "expanded": row}[base_kind]
    grad, = torch.autograd.grad(y, leaf, dy)
    ref, = torch.autograd.grad(expected, leaf, dy)
    torch.testing.assert_close(grad, ref)
