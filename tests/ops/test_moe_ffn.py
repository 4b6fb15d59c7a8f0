"""moelora.moe_ffn (routed expert FFNs) against a float64 per-token loop: forward, every
gradient, every path (the torch backend; the Triton backend on its Triton and grouped_mm
engines, under the interpreter without a GPU), skipped slots, exact zeros for experts
without tokens, the exact identity of identical experts, determinism, gradcheck,
torch.compile(fullgraph=True), and on a GPU bfloat16, CUDA-graph capture and no host sync."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora
from conftest import DEVICE, HAS_CUDA
from helpers import gpu_tile_table, moe_ffn_reference, rel_err
from moelora.ops import moe_ffn as ffn_module
from moelora.ops.grouped_linear import grouped_mm_fn

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_grouped_mm = pytest.mark.skipif(grouped_mm_fn() is None, reason="this torch has no grouped_mm")
# (backend, engine): the torch backend, and the Triton backend on each GEMM engine
PATHS = [("torch", "auto"), ("triton", "triton"), pytest.param(("triton", "grouped_mm"), marks=needs_grouped_mm)]
TRITON_PATHS = PATHS[1:]


def path_id(path):
    return "-".join(path) if path[0] == "triton" else "torch"


def run(x, ids, weights, ffn, path, activation=F.silu, normalize=False):
    backend, engine = path
    return moelora.moe_ffn(x, ids, weights, activation=activation, normalize=normalize, backend=backend,
                           engine=engine, **ffn)


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


def leaves(x, weights, ffn):
    return [x, weights] + [t for t in ffn.values() if t is not None]


def check_against_reference(x, ids, weights, ffn, path, act, normalize, grad_kind="random", dtype_tol=None):
    """Forward and every gradient against the float64 loop."""
    y = run(x, ids, weights, ffn, path, act, normalize)
    assert y.shape == (x.shape[0], ffn["w_out"].shape[1]) and y.dtype == x.dtype
    grad = torch.randn_like(y) if grad_kind == "random" else torch.ones_like(y)
    target = y if grad_kind == "random" else y.sum()  # y.sum(): a stride-0 gradient reaches backward
    got = torch.autograd.grad(target, leaves(x, weights, ffn), grad if grad_kind == "random" else None)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves(x, weights, ffn)]
    ref_ffn = dict(zip([n for n, t in ffn.items() if t is not None], ref_leaves[2:]))
    ref_ffn.update({n: None for n, t in ffn.items() if t is None})
    y_ref = moe_ffn_reference(ref_leaves[0], ids, ref_leaves[1], ref_ffn, act, normalize)
    expected = torch.autograd.grad(y_ref, ref_leaves, grad.double())
    tol = dtype_tol or TOL[x.dtype]
    assert rel_err(y, y_ref) < tol
    for i, (g, r) in enumerate(zip(got, expected)):
        assert rel_err(g, r) < tol, f"gradient {i}: {rel_err(g, r)}"


@pytest.mark.parametrize("path", PATHS, ids=path_id)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gated,bias", [(True, True), (False, False)])
def test_matches_float64_loop_with_gradients(path, normalize, gated, bias):
    x, ids, weights, ffn = make_ffn(gated=gated, bias=bias)
    check_against_reference(x, ids, weights, ffn, path, F.silu if gated else F.gelu, normalize)


@pytest.mark.parametrize("path", PATHS, ids=path_id)
@pytest.mark.parametrize("normalize", [False, True])
def test_slots_dropped_anywhere_match_the_float64_loop(path, normalize):
    """Zero weights in any slot (the anchor slot 0 included) and tokens with every slot
    dropped: the forward and every gradient, the routing weights' above all (on the Triton
    backend one kernel masks and normalises them, one gives their gradient)."""
    x, ids, weights, ffn = make_ffn(T=23, k=3, seed=11)
    with torch.no_grad():
        weights[1::3, 0] = 0.0  # the anchor slot
        weights[2::5, 1] = 0.0
        weights[7] = 0.0  # every slot of token 7
    check_against_reference(x, ids, weights, ffn, path, F.silu, normalize)


@pytest.mark.parametrize("path", PATHS, ids=path_id)
@pytest.mark.parametrize("bias", [True, False])
def test_stacked_gate_weight_matches_the_float64_loop(path, bias):
    """w_in = [w_gate; w_in] stacked ("w13", one GEMM for both), b_in likewise."""
    x, ids, weights, ffn = make_ffn(bias=bias, seed=8)
    w13 = torch.cat([ffn["w_gate"], ffn["w_in"]], 1).detach().requires_grad_()
    b13 = torch.cat([ffn["b_gate"], ffn["b_in"]], 1).detach().requires_grad_() if bias else None
    backend, engine = path
    y = moelora.moe_ffn(x, ids, weights, w13, b13, ffn["w_out"], ffn["b_out"], F.silu, normalize=True,
                        backend=backend, engine=engine, stacked_gate=True)
    grad = torch.randn_like(y)
    params = [x, weights, w13, ffn["w_out"]] + ([b13, ffn["b_out"]] if bias else [])
    got = torch.autograd.grad(y, params, grad)
    ref = {n: (t.detach().double().requires_grad_() if t is not None else None) for n, t in ffn.items()}
    xr, wr = x.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    y_ref = moe_ffn_reference(xr, ids, wr, ref, F.silu, True)
    names = ["w_gate", "w_in", "w_out"] + (["b_gate", "b_in", "b_out"] if bias else [])
    g = dict(zip(["x", "w"] + names, torch.autograd.grad(y_ref, [xr, wr] + [ref[n] for n in names], grad.double())))
    expected = [g["x"], g["w"], torch.cat([g["w_gate"], g["w_in"]], 1), g["w_out"]]
    if bias:
        expected += [torch.cat([g["b_gate"], g["b_in"]], 1), g["b_out"]]
    assert rel_err(y, y_ref) < TOL[x.dtype]
    for i, (a, b) in enumerate(zip(got, expected)):
        assert rel_err(a, b) < TOL[x.dtype], f"gradient {i}: {rel_err(a, b)}"


@pytest.mark.parametrize("path", TRITON_PATHS, ids=path_id)
@pytest.mark.parametrize("activation", ["tanh", "gelu_tanh", "relu_module", "lambda"])
def test_other_activations_on_the_triton_backend(path, activation):
    """GELU-tanh and ReLU run in the fused kernels; other callables as PyTorch ops on the rows."""
    act = {"tanh": torch.tanh, "gelu_tanh": nn.GELU(approximate="tanh"), "relu_module": nn.ReLU(),
           "lambda": lambda t: t * torch.sigmoid(1.702 * t)}[activation]
    x, ids, weights, ffn = make_ffn(T=20, gated=activation != "relu_module", seed=7)
    check_against_reference(x, ids, weights, ffn, path, act, normalize=True, grad_kind="sum")


@pytest.mark.parametrize("path", PATHS, ids=path_id)
@pytest.mark.parametrize("activation", [F.relu, F.silu], ids=["relu", "silu"])
def test_a_nan_weight_of_a_chosen_expert_reaches_its_tokens_outputs(path, activation):
    """A NaN in an expert's first projection makes NaN of the outputs of exactly the tokens that chose
    it, with weight > 0, whatever the activation: the fused ReLU (tl.maximum) turned NaN into 0, so an
    overflow of a ReLU FFN (T5's) passed as finite values on the Triton backend."""
    x, ids, weights, ffn = make_ffn(T=16, d=8, f=8, d_out=4, E=4, gated=False, bias=True, seed=3)
    with torch.no_grad():
        ffn["w_in"][1, 2, 3] = float("nan")
    y = run(x, ids, weights, ffn, path, activation, normalize=False)
    reached = ((ids == 1) & (weights != 0)).any(1)
    assert reached.any() and not reached.all()
    assert torch.equal(torch.isnan(y).any(1), reached) and torch.isnan(y[reached]).all()


@pytest.mark.parametrize("path", PATHS, ids=path_id)
@pytest.mark.parametrize("gated,bias", [(False, False), (False, True), (True, False)])
def test_in_place_activation_matches_the_float64_loop(path, gated, bias):
    """An activation the fused kernels do not know that works in place (nn.ELU(inplace=True)): the
    Triton backend's backward raised 'a leaf Variable that requires grad is being used in an in-place
    operation' (torch.func.vjp over it), and without a bias its forward overwrote the saved first
    projection's output. It matches the float64 loop as on the torch backend."""
    x, ids, weights, ffn = make_ffn(T=12, d=8, f=8, d_out=4, E=3, gated=gated, bias=bias, seed=5)
    check_against_reference(x, ids, weights, ffn, path, nn.ELU(inplace=True), normalize=True)


@pytest.mark.parametrize("path", TRITON_PATHS, ids=path_id)
def test_an_activation_not_finite_at_zero_leaves_the_padding_rows_out(path):
    """log|t| is -inf at 0, its derivative 1/t inf: the padding rows of row space (zero projections without a
    bias) must stay zero through the unfused activation and its backward, or the weight gradients, which sum
    over each expert's padded rows, turn NaN (0 * inf)."""
    x, ids, weights, ffn = make_ffn(T=12, d=8, f=8, d_out=4, E=3, gated=False, bias=False, seed=9)
    check_against_reference(x, ids, weights, ffn, path, lambda t: t.abs().log(), normalize=True)


@pytest.mark.parametrize("path", PATHS, ids=path_id)
def test_activation_module_with_trainable_parameters(path):
    """An activation with trainable parameters (nn.PReLU): the torch backend differentiates them
    (as the float64 loop); the Triton backend, which differentiates the activation in its input
    only, raises ValueError naming it while autograd records (it returned None gradients) and runs
    it frozen or under no_grad like the torch backend."""
    x, ids, weights, ffn = make_ffn(T=12, d=8, f=8, d_out=4, E=3, seed=3)
    act = nn.PReLU(init=0.3).to(DEVICE)
    if path[0] == "triton":
        with pytest.raises(ValueError, match="activation PReLU has trainable parameters.*backend='torch'"):
            run(x, ids, weights, ffn, path, act)
        with pytest.raises(ValueError, match="activation PReLU has trainable parameters"):  # no tokens: the same
            run(x[:0], ids[:0], weights[:0], ffn, path, act)
        with torch.no_grad():
            got = run(x, ids, weights, ffn, path, act)
        act.requires_grad_(False)
        frozen = run(x, ids, weights, ffn, path, act)
        want = run(x, ids, weights, ffn, ("torch", "auto"), act)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(frozen, want, rtol=1e-5, atol=1e-5)
        return
    y = run(x, ids, weights, ffn, path, act)
    ref = moe_ffn_reference(x, ids, weights, ffn, lambda t: F.prelu(t, act.weight.double()), normalize=False)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(y, act.weight, grad.to(y.dtype))[0]
    want = torch.autograd.grad(ref, act.weight, grad)[0]
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)


class _ScaledSiLU(nn.SiLU):
    def forward(self, t):
        return 2 * super().forward(t)


@pytest.mark.parametrize("path", TRITON_PATHS, ids=path_id)
def test_an_activation_subclass_with_its_own_forward_runs_its_forward(path):
    """A subclass of nn.SiLU computing something else (2 silu(t)) was taken for the fused SiLU: the Triton
    backend computed silu, silently. It runs as the unknown callable it is, matching the float64 loop."""
    assert ffn_module.fused_activation_name(_ScaledSiLU()) is None
    x, ids, weights, ffn = make_ffn(T=12, d=8, f=8, d_out=4, E=3, seed=4)
    check_against_reference(x, ids, weights, ffn, path, _ScaledSiLU(), normalize=True)


def test_fused_activation_names():
    from transformers.activations import ACT2FN

    name = ffn_module.fused_activation_name
    assert name(F.silu) == name(nn.SiLU()) == name(ACT2FN["silu"]) == "silu"
    assert name(F.gelu) == name(nn.GELU()) == name(ACT2FN["gelu"]) == "gelu"
    assert name(ACT2FN["gelu_new"]) == name(ACT2FN["gelu_pytorch_tanh"]) == name(nn.GELU("tanh")) == "gelu_tanh"
    assert name(torch.relu) == name(nn.ReLU()) == "relu"
    assert name(torch.tanh) is None and name(ACT2FN["quick_gelu"]) is None


@pytest.mark.parametrize("path", PATHS, ids=path_id)
def test_experts_without_tokens_get_exact_zero_gradients(path):
    x, ids, weights, ffn = make_ffn(E=6, k=2)
    ids = ids % 3  # experts 3..5 get nothing; ids stay distinct per token only where they were
    ids[:, 1] = (ids[:, 0] + 1) % 3
    y = run(x, ids, weights, ffn, path)
    y.backward(torch.randn_like(y))
    for name in ("w_in", "b_in", "w_out", "b_out", "w_gate", "b_gate"):
        grad = ffn[name].grad
        assert torch.equal(grad[3:], torch.zeros_like(grad[3:])), name
        assert grad[:3].abs().sum() > 0, name


@pytest.mark.parametrize("path", TRITON_PATHS, ids=path_id)
def test_triton_bitwise_deterministic(path):
    def once():
        x, ids, weights, ffn = make_ffn(seed=5)
        y = run(x, ids, weights, ffn, path, normalize=True)
        return [y, *torch.autograd.grad(y, leaves(x, weights, ffn), y.detach() + 1)]

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


def test_gradcheck_float64_triton():
    """The fused op's hand-written backward (anchored combine, gated activation, segment sums)
    by finite differences through the mixing weights' normalisation. No weight is 0 here:
    a weight of 0 drops its slot, a step the finite differences would cross."""
    x, ids, weights, ffn = make_ffn(T=6, d=5, f=7, d_out=4, E=3, dtype=torch.float64, seed=3)
    weights = weights.detach() + 0.1
    names = [n for n, t in ffn.items() if t is not None]

    def fn(x, w, *params):
        return moelora.moe_ffn(x, ids, w, activation=F.silu, normalize=True, backend="triton", engine="triton",
                               **dict(zip(names, params)))

    inputs = [t.detach().double().requires_grad_() for t in [x, weights] + [ffn[n] for n in names]]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("path", PATHS[:2], ids=path_id)  # grouped_mm refuses rows of 0 bytes
def test_a_gated_ffn_of_zero_hidden_width_gives_the_float64_loops_output_and_gradients(path):
    """d_ff = 0 (a gated FFN whose hidden units are all pruned): the output is the mix of b_out, the gradients
    those of the float64 loop, empty for the hidden layer's weights. The Triton backend's backward took the saved
    gate projection, empty, for the placeholder of a missing w_gate and failed (AttributeError)."""
    x, ids, weights, ffn = make_ffn()
    ffn = {n: (t[:, :, :0] if n == "w_out" else t if n == "b_out" else t[:, :0]).detach().requires_grad_()
           for n, t in ffn.items()}
    y = run(x, ids, weights, ffn, path)
    got = torch.autograd.grad(y, leaves(x, weights, ffn), torch.ones_like(y))
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves(x, weights, ffn)]
    y_ref = moe_ffn_reference(ref_leaves[0], ids, ref_leaves[1], dict(zip(ffn, ref_leaves[2:])), F.silu, False)
    expected = torch.autograd.grad(y_ref, ref_leaves, torch.ones_like(y_ref))
    torch.testing.assert_close(y.double(), y_ref)
    for g, r in zip(got, expected):
        assert g.shape == r.shape
        torch.testing.assert_close(g.double(), r)


@pytest.mark.parametrize("path", PATHS, ids=path_id)
def test_identical_experts_reproduce_one_ffn_exactly_when_normalized(path):
    """Upcycling's promise: copies of one FFN mixed by weights summing to one return that
    FFN's output bit for bit (the backend's own single-expert result)."""
    x, _, _, ffn = make_ffn(E=4, k=4, seed=2)
    weights = torch.softmax(torch.randn(x.shape[0], 4, device=DEVICE), -1)
    weights[::3, 1:] = 0.0  # some tokens keep only their best expert
    _check_copies_of_one_ffn_mix_to_it_exactly(x, weights, ffn, path)


def _check_copies_of_one_ffn_mix_to_it_exactly(x, weights, ffn, path):
    """The normalised mix by ``weights`` [T, E] (slot j: expert j) of E copies of ffn's expert 0 is that
    expert's own output on ``path``, bit for bit. Triton's interpreter (no GPU) excepted: its tl.dot is numpy's
    matmul of the whole tile, whose result for a row can change with the row's place in the tile (OpenBLAS's
    kernels on some CPUs: an AVX-512 machine here), and an expert's tile holds other rows in the mix than
    alone; there the two agree to a few ulps of the largest output (a GPU's dot sums each element in a fixed order)."""
    ids = torch.arange(weights.shape[1], device=DEVICE).repeat(x.shape[0], 1)
    copies = {n: t.detach()[:1].expand_as(t).contiguous() if t is not None else None for n, t in ffn.items()}
    with torch.no_grad():
        mixed = run(x, ids, weights, copies, path, normalize=True)
        single = run(x, ids[:, :1] * 0, torch.ones_like(weights[:, :1]), {n: t[:1] if t is not None else None
                                                                          for n, t in copies.items()}, path)
    if path[1] == "triton" and DEVICE.type == "cpu":
        ulps = 4 * torch.finfo(single.dtype).eps * single.abs().max().item()  # of the largest output
        torch.testing.assert_close(mixed, single, rtol=0, atol=ulps)
    else:
        assert torch.equal(mixed, single)


@pytest.mark.parametrize("path", PATHS, ids=path_id)
def test_identical_experts_with_a_dropped_last_slot_reproduce_one_ffn_exactly(path):
    """The anchor of the normalised mix is slot 0 whatever the other slots: with the last slot dropped
    (weight 0, output 0) and two kept slots of identical experts, the mix is still that FFN's output bit
    for bit (anchored on the dropped slot, it is c_0 z + c_1 z, off by the rounding)."""
    x, _, _, ffn = make_ffn(T=64, E=3, k=3, seed=12)
    weights = torch.rand(x.shape[0], 3, device=DEVICE) + 0.1
    weights[:, 2] = 0.0
    _check_copies_of_one_ffn_mix_to_it_exactly(x, weights, ffn, path)


@pytest.mark.parametrize("normalize", [False, True])
def test_torch_mix_of_half_precision_outputs_rounds_once(normalize):
    """The torch backend's mix of fp16 expert outputs by fp16 weights runs in fp32 (the coefficients
    too) and rounds once: within half an fp16 ulp of the float64 mix of the same values (mixing in fp16
    rounded every product and partial sum)."""
    g = torch.Generator().manual_seed(14)
    pairs = (torch.randn(256, 4, 32, generator=g) * 3).half()
    weights = torch.rand(256, 4, generator=g).half()
    weights[::5, 1] = 0.0
    got = ffn_module.mix_experts(pairs, weights, normalize).double()
    w = weights.double()
    c = w / w.sum(-1, keepdim=True) if normalize else w
    exact = (c.unsqueeze(-1) * pairs.double()).sum(1)
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact.half().double())[1] - 11).clamp_min(2.0 ** -24)
    scale = (c.unsqueeze(-1) * pairs.double()).abs().sum(1) + pairs[:, 0].double().abs()  # fp32 sums' rounding
    assert ((got - exact).abs() <= 0.5 * ulp + 2.0 ** -20 * scale).all()


@pytest.mark.parametrize("path", PATHS, ids=path_id)
def test_zero_tokens(path):
    x, ids, weights, ffn = make_ffn()
    empty = run(x[:0], ids[:0], weights[:0], ffn, path)
    assert empty.shape == (0, ffn["w_out"].shape[1])
    empty.sum().backward()
    assert torch.equal(ffn["w_in"].grad, torch.zeros_like(ffn["w_in"]))


@pytest.mark.parametrize("path", TRITON_PATHS, ids=path_id)
def test_half_precision_triton(path):
    x, ids, weights, ffn = make_ffn(T=20, d=32, f=48, d_out=16, dtype=torch.float16, seed=1)
    check_against_reference(x, ids, weights, ffn, path, F.silu, normalize=True)


def test_plan_picks_the_engine_by_device_dtype_and_table(monkeypatch):
    x, ids, weights, ffn = make_ffn(d=32, f=48, d_out=16, dtype=torch.bfloat16)
    plan = ffn_module.ffn_plan(x, ffn["w_in"], ffn["w_out"], ffn["w_gate"], 2)
    if not HAS_CUDA:
        assert plan.gemm == plan.wgrad == "triton"  # CPU: grouped_mm is not native here
    monkeypatch.setattr(ffn_module, "native_major", lambda device: 9)
    monkeypatch.setattr(ffn_module, "FFN_ENGINES", {(9, "gemm", "*"): "triton", (9, "wgrad", "*"): "grouped_mm"})
    plan = ffn_module.ffn_plan(x, ffn["w_in"], ffn["w_out"], ffn["w_gate"], 2)
    assert (plan.gemm, plan.wgrad) == ("triton", "grouped_mm") and plan.gathers_x
    fp32 = ffn_module.ffn_plan(x.float(), ffn["w_in"].float(), ffn["w_out"].float(), None, 2)
    assert (fp32.gemm, fp32.wgrad) == ("triton", "triton")  # grouped_mm runs natively only in bf16
    odd = ffn_module.ffn_plan(x[:, :30], ffn["w_in"][:, :, :30], ffn["w_out"], None, 2)
    assert odd.gemm == "triton"  # 30 bf16 = 60 bytes: rows not 16-byte aligned


def test_grouped_mm_engine_refuses_an_ffn_of_zero_output_width_which_auto_runs_on_triton():
    """d_out = 0: engine='grouped_mm' is refused by the plan's ValueError, as for d_in or d_ff = 0 (torch's grouped
    GEMM failed in the backward: "strides should be multiple of 16 bytes"); "auto" runs Triton, whose output and
    gradients are empty or zero."""
    x, ids, weights, ffn = make_ffn(d=32, f=48, d_out=0, gated=False)
    with pytest.raises(ValueError, match=r"engine='grouped_mm' needs .* d_out nonzero multiples of 16 bytes"):
        ffn_module.ffn_plan(x, ffn["w_in"], ffn["w_out"], None, 2, engine="grouped_mm")
    assert ffn_module.ffn_plan(x, ffn["w_in"], ffn["w_out"], None, 2).gemm == "triton"
    y = run(x, ids, weights, ffn, ("triton", "auto"), F.gelu)
    assert y.shape == (x.shape[0], 0)
    grads = torch.autograd.grad(y.sum(), leaves(x, weights, ffn), allow_unused=True)
    assert all(g is None or not g.count_nonzero() for g in grads)


def test_a_plan_with_triton_gemms_pads_to_their_row_tiles_whatever_its_weight_gradient_engine(monkeypatch):
    """The segment padding follows the engine of the row-space GEMMs: a table entry running the GEMMs on Triton and
    the weight gradients on grouped_mm pads to the Triton GEMMs' row tiles (as engine='triton' does), which a
    smaller padding would leave straddling two experts."""
    x, _, _, ffn = make_ffn(d=32, f=48, d_out=16, dtype=torch.bfloat16, gated=False)
    triton = ffn_module.ffn_plan(x, ffn["w_in"], ffn["w_out"], None, 2, engine="triton")
    monkeypatch.setattr(ffn_module, "native_major", lambda device: 9)
    monkeypatch.setattr(ffn_module, "FFN_ENGINES", {(9, "gemm", "*"): "triton", (9, "wgrad", "*"): "grouped_mm"})
    plan = ffn_module.ffn_plan(x, ffn["w_in"], ffn["w_out"], None, 2)
    assert (plan.gemm, plan.wgrad) == ("triton", "grouped_mm")
    assert plan.layout_block == triton.layout_block > 16


def test_plan_pads_the_segments_to_the_row_tiles_of_its_engine():
    """The Triton engine's grouped GEMMs need each row tile inside one expert's segment: the plan pads the segments
    to the largest row tile of its GEMMs (of the GPU tile table, by row class; a smaller padding halves the tiles,
    down to 16 rows), the grouped_mm engine (any segment ends) to 16 rows only."""
    from moelora.kernels import launchers

    with gpu_tile_table():  # the interpreter's blocks are 32 rows
        x, _, _, ffn = make_ffn(T=600, d=64, f=128, d_out=32, E=2, gated=False)
        gemms = ((128, 64), (32, 128), (128, 32), (64, 128))  # (N, K): both projections, dh, dx
        for T in (600, 40):  # many rows per expert, few
            plan = ffn_module.ffn_plan(x[:T], ffn["w_in"], ffn["w_out"], None, 2, engine="triton")
            many = launchers.many_rows(2 * T, 2)
            assert plan.layout_block == max(launchers.grouped_config("matmul", n, k, many).block_m
                                            for n, k in gemms) > 16, T
        if grouped_mm_fn() is not None:
            assert ffn_module.ffn_plan(x, ffn["w_in"], ffn["w_out"], None, 2, engine="grouped_mm").layout_block == 16


@pytest.mark.parametrize("path", PATHS, ids=path_id)
def test_fullgraph_compile_matches_eager(path):
    x, ids, weights, ffn = make_ffn(T=12, d=16, f=24, d_out=8, E=4, seed=4)

    def loss(x, weights, ffn):
        return run(x, ids, weights, ffn, path, normalize=True).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")  # the custom ops are what is traced
    got = compiled(x, weights, ffn)
    grads = torch.autograd.grad(got, leaves(x, weights, ffn))
    eager = loss(x, weights, ffn)
    for a, b in zip((got, *grads), (eager, *torch.autograd.grad(eager, leaves(x, weights, ffn)))):
        assert rel_err(a, b) < 1e-5
    torch._dynamo.reset()


def test_fullgraph_compile_takes_one_tensor_as_two_arguments():
    """A tensor passed as two of moe_ffn's arguments (w_gate = w_in and b_gate = b_in: a tied gate) broke
    torch.compile(fullgraph=True) on the Triton backend ("duplicate tensor input"); now it traces and gives
    eager's loss and gradients (each tensor's summed over its two uses)."""
    x, ids, weights, ffn = make_ffn(T=12, d=16, f=24, d_out=8, E=4, seed=5)

    def loss(x, weights, w_in, b_in, w_out):
        return moelora.moe_ffn(x, ids, weights, w_in, b_in, w_out, None, F.silu, w_in, b_in,
                               backend="triton").square().sum()

    inputs = (x, weights, ffn["w_in"], ffn["b_in"], ffn["w_out"])
    torch._dynamo.reset()
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(*inputs)
    eager = loss(*inputs)
    for a, b in zip((got, *torch.autograd.grad(got, inputs)), (eager, *torch.autograd.grad(eager, inputs))):
        assert rel_err(a, b) < 1e-5
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moeffn_trains_under_fullgraph_compile(backend, single_torch_thread):
    """An upcycled gated MLP (threshold routing, all experts trainable) compiles whole: the
    torch backend's segment loop and the Triton backend's fused op are custom ops."""
    from moelora.modules.ffn import MoEFFN

    torch.manual_seed(0)
    mlp = dict(in_proj=nn.Linear(16, 32), out_proj=nn.Linear(32, 16), gate_proj=nn.Linear(16, 32))
    moe = MoEFFN(**mlp, activation=nn.SiLU(), num_experts=4, top_k=2, router="softmax_topk").to(DEVICE)
    with torch.no_grad():
        for p in (moe.w_in, moe.w_out, moe.w_gate):
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 5, 16, device=DEVICE)

    def step(m):
        return m(x).square().mean() + moelora.aux_loss(m)

    torch._dynamo.reset()
    with moelora.use_backend(backend):
        eager = copy_and_train(moe, step, compiled=False)
        compiled = copy_and_train(moe, step, compiled=True)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def copy_and_train(module, step, compiled, steps=2):
    import copy

    from torch._dynamo.testing import CompileCounterWithBackend

    module = copy.deepcopy(module)
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(step, fullgraph=True, backend=counter) if compiled else step
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = fn(module)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    if compiled:
        assert counter.frame_count == 1
    return torch.stack(losses + [p.detach().sum() for p in module.parameters()])


# ----------------------------------------------------------------------------- GPU only

@needs_gpu
@pytest.mark.parametrize("engine", ["triton", "grouped_mm"])
@pytest.mark.parametrize("normalize", [False, True])
def test_gpu_bfloat16_with_gradients(engine, normalize):
    x, ids, weights, ffn = make_ffn(T=700, d=256, f=384, d_out=128, E=8, dtype=torch.bfloat16, seed=1)
    check_against_reference(x, ids, weights, ffn, ("triton", engine), F.silu, normalize)


@needs_gpu
@pytest.mark.parametrize("engine", ["triton", "grouped_mm"])
def test_gpu_bfloat16_empty_experts_exact_zeros_and_bitwise_repeats(engine):
    """Also the CUTLASS K-grouped weight gradient: groups without rows must come out 0."""
    def once():
        x, ids, weights, ffn = make_ffn(T=300, d=128, f=256, d_out=64, E=8, dtype=torch.bfloat16, seed=2)
        ids = ids % 4
        ids[:, 1] = (ids[:, 0] + 1) % 4
        y = run(x, ids, weights, ffn, ("triton", engine), normalize=True)
        return [y, *torch.autograd.grad(y, leaves(x, weights, ffn), torch.ones_like(y))]

    first, second = once(), once()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for g in first[3:]:  # every weight and bias gradient (after y, dx, d weights): experts 4..7 got nothing
        assert torch.equal(g[4:], torch.zeros_like(g[4:]))
        assert g[:4].abs().sum() > 0


@needs_gpu
@pytest.mark.parametrize("engine", ["triton", "grouped_mm"])
def test_gpu_no_host_sync_and_cuda_graph_capture(engine):
    x, ids, weights, ffn = make_ffn(T=256, d=64, f=128, d_out=64, E=4, dtype=torch.bfloat16, seed=3)
    params = leaves(x, weights, ffn)

    def step():
        y = run(x, ids, weights, ffn, ("triton", engine), normalize=True)
        # y detached: a graph kept alive would keep the leaves' AccumulateGrad nodes of the eager
        # step, on the default stream, which the captured backward cannot wait on
        return [y.detach(), *torch.autograd.grad(y, params, torch.ones_like(y))]

    with moelora.validation(False):
        eager = step()  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)


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
    with pytest.raises(ValueError, match="w_gate and b_gate must be None"):
        moelora.moe_ffn(x, ids, weights, stacked_gate=True, **{**args, "w_gate": ffn["w_in"]})
    with pytest.raises(ValueError, match=r"w_out must have shape \[E = 5, d_out, d_ff = 20\]"):
        moelora.moe_ffn(x, ids, weights, stacked_gate=True, **args)  # w_in's 40 rows = 2 x 20
    with pytest.raises(ValueError, match="engine must be one of"):
        moelora.moe_ffn(x, ids, weights, backend="triton", engine="cutlass", **args)
    for width in ("d", "f", "d_out"):  # d_in, d_ff or d_out of 6 fp32 = 24 bytes a row
        small = make_ffn(gated=False, **{width: 6})
        with pytest.raises(ValueError, match="engine='grouped_mm' needs"):
            moelora.moe_ffn(small[0], small[1], small[2], activation=F.gelu, backend="triton", engine="grouped_mm",
                            **small[3])
        # refused on no tokens too (the call runs no kernel there, but its engine is wrong whatever the batch)
        with pytest.raises(ValueError, match="engine='grouped_mm' needs"):
            moelora.moe_ffn(small[0][:0], small[1][:0], small[2][:0], activation=F.gelu, backend="triton",
                            engine="grouped_mm", **small[3])


@pytest.mark.parametrize("path", PATHS, ids=path_id)
def test_an_x_of_more_than_two_dims_is_refused_naming_x(path):
    """x is [T, d_in]: a batch of sequences [B, T, d_in] (or any 3-d x) is refused by a ValueError naming x on
    every path, whether or not its dim 1 happens to equal d_in (where the checks of the other arguments pass)."""
    x, ids, weights, ffn = make_ffn(gated=False, d=24)
    for bad in (x.detach()[:, None], x.detach()[:, None].expand(-1, 24, -1)):
        with pytest.raises(ValueError, match=r"x must have shape \[T, d_in\]"):
            run(bad, ids, weights, ffn, path, F.gelu)


@pytest.mark.parametrize("path", PATHS, ids=path_id)
def test_stacked_gate_refuses_a_b_gate_given_without_w_gate(path):
    """With stacked_gate=True the gate's bias is the first half of b_in: a b_gate given alone would be ignored,
    so it is refused as a w_gate is."""
    x, ids, weights, ffn = make_ffn(gated=False, f=40, d_out=20)
    stacked = dict(ffn, w_out=ffn["w_out"][:, :, :20], b_gate=ffn["b_in"][:, :20])
    with pytest.raises(ValueError, match="w_gate and b_gate must be None"):
        moelora.moe_ffn(x, ids, weights, activation=F.silu, backend=path[0], engine=path[1], stacked_gate=True,
                        **stacked)


@pytest.mark.parametrize("path", PATHS, ids=path_id)
def test_out_of_range_ids_raise_or_are_skipped_with_validation_off(path):
    x, ids, weights, ffn = make_ffn(gated=False)
    bad = ids.clone()
    bad[3, 0] = 5  # E = 5
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 5\)"):
        run(x, bad, weights, ffn, path, F.gelu)
    with moelora.validation(False):
        got = run(x, bad, weights, ffn, path, F.gelu)
    dropped = weights.detach().clone()
    dropped[3, 0] = 0.0
    expected = run(x, ids, dropped, ffn, path, F.gelu)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("path", PATHS, ids=path_id)
def test_out_of_range_ids_with_validation_off_leave_the_normalised_mix(path):
    """With validation off, a slot with an id outside [0, E) is skipped as a zero weight would be: its
    weight is out of the normalisation's sum too."""
    x, ids, weights, ffn = make_ffn(gated=False)
    bad = ids.clone()
    bad[3, 0], bad[6, 1] = 5, -2  # E = 5
    dropped = weights.detach().clone()
    dropped[3, 0] = dropped[6, 1] = 0.0
    assert weights[3, 0] > 0 and weights[6, 1] > 0
    with moelora.validation(False):
        got = run(x, bad, weights, ffn, path, F.gelu, normalize=True)
    assert torch.equal(got, run(x, ids, dropped, ffn, path, F.gelu, normalize=True))


def test_rows_linear_multiplies_in_compute_dtype_and_writes_out_dtype():
    """grouped_linear.rows_linear on the Triton engine: operands rounded to ``compute_dtype`` (fp16 here, from
    fp32 rows), the result written in ``out_dtype`` (fp32); moe_lora keeps its fp32 intermediates so."""
    from moelora.kernels import launchers
    from moelora.ops.grouped_linear import rows_linear
    from moelora.ops.routing import expert_layout

    g = torch.Generator().manual_seed(15)
    ids = torch.rand(10, 3, generator=g).argsort(1)[:, :2].to(DEVICE)
    a, w = torch.randn(10, 16, generator=g).to(DEVICE), torch.randn(3, 8, 16, generator=g).to(DEVICE)
    meta = expert_layout(ids, 3, launchers.grouped_layout_block(((8, 16),), False))
    got = rows_linear(a, w, meta, "triton", a_by_token=True, out_dtype=torch.float32, compute_dtype=torch.float16)
    half = rows_linear(a.half(), w.half(), meta, "triton", a_by_token=True, out_dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, half)
    pair = meta.sorted_pairs_padded
    want = torch.where((pair >= 0)[:, None], torch.einsum("rk,rnk->rn", a.double()[pair.clamp(min=0) // 2],
                                                          w.double()[ids.reshape(-1)[pair.clamp(min=0)]]), 0)
    assert rel_err(got, want) < 5e-3


def test_segment_linear_zeroes_the_rows_after_the_last_segment_and_empty_experts_gradients():
    """moelora::segment_linear: F.linear per expert segment, zero rows from offsets[E] on (the skipped pairs);
    its backward: zero row gradients there and zero weight and bias gradients for an expert without rows."""
    from moelora.ops.grouped_linear import segment_linear

    g = torch.Generator().manual_seed(16)
    rows, w, b = (torch.randn(9, 4, generator=g), torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, generator=g))
    rows, w, b = (t.requires_grad_() for t in (rows, w, b))
    offsets = torch.tensor([0, 2, 2, 6])  # expert 1 gets no rows; rows 6..8 are past the segments
    for _ in range(3):  # freed NaN buffers of the outputs' sizes: memory an unwritten output may reuse
        junk = [torch.full(t.shape, float("nan")) for t in (rows, w, b, rows[:, :1].expand(9, 5))]
        del junk
        out = segment_linear(rows, w, b, offsets)
        grads = torch.autograd.grad(out, (rows, w, b), torch.randn(9, 5, generator=g))
        assert torch.equal(out[6:], torch.zeros(3, 5)) and torch.equal(grads[0][6:], torch.zeros(3, 4))
        assert torch.equal(grads[1][1], torch.zeros(5, 4)) and torch.equal(grads[2][1], torch.zeros(5))
    want = torch.cat([F.linear(rows[:2], w[0], b[0]), F.linear(rows[2:6], w[2], b[2]), torch.zeros(3, 5)])
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("path", TRITON_PATHS, ids=path_id)
def test_opcheck_fused_ops(path):
    """The fused forward and backward as custom ops: fake kernels, schemas, compile traces."""
    x, ids, weights, ffn = make_ffn(T=10, d=16, f=24, d_out=8, E=3, seed=6)
    weights = weights.detach()
    plan = ffn_module.ffn_plan(x, ffn["w_in"], ffn["w_out"], ffn["w_gate"], 2, path[1])
    params = [t.detach() if t is not None else None for t in (ffn["w_in"], ffn["b_in"], ffn["w_out"], ffn["b_out"],
                                                              ffn["w_gate"], ffn["b_gate"])]
    stacked = (torch.cat([params[4], params[0]], 1), torch.cat([params[5], params[1]], 1), *params[2:4], None, None)
    for weights_, is_stacked in ((params, False), (stacked, True)):
        args = (x.detach(), ids, weights, *weights_, "silu", True, is_stacked, *plan)
        torch.library.opcheck(ffn_module.moe_ffn_forward.default, args, test_utils=("test_schema", "test_faketensor",
                                                                                    "test_aot_dispatch_dynamic"))
        out = ffn_module.moe_ffn_forward(*args)
        needs = [t is not None for t in (x, weights, *weights_)]
        bwd_args = (torch.randn_like(out[0]), *args[:9], out[1:], "silu", True, is_stacked, *plan, needs)
        torch.library.opcheck(ffn_module.moe_ffn_backward.default, bwd_args)


def test_opcheck_fused_ops_in_half_precision():
    """The fused ops in fp16 (routing weights too) against their fake kernels: the saved mixing coefficients
    in fp32, the gradients in their tensors' dtypes (a real output in fp32 passed autograd, which casts, but not
    torch.compile's metadata)."""
    x, ids, weights, ffn = make_ffn(T=8, d=16, f=16, d_out=8, E=3, dtype=torch.float16, seed=13)
    weights = weights.detach().half()  # the saved mixing coefficients are fp32 all the same
    plan = ffn_module.ffn_plan(x, ffn["w_in"], ffn["w_out"], ffn["w_gate"], 2, "triton")
    params = [ffn[n].detach() for n in ("w_in", "b_in", "w_out", "b_out", "w_gate", "b_gate")]
    args = (x.detach(), ids, weights, *params, "silu", True, False, *plan)
    torch.library.opcheck(ffn_module.moe_ffn_forward.default, args, test_utils=("test_schema", "test_faketensor"))
    out = ffn_module.moe_ffn_forward(*args)
    bwd_args = (torch.randn_like(out[0]), *args[:9], out[1:], "silu", True, False, *plan, [True] * 8)
    grads = ffn_module.moe_ffn_backward(*bwd_args)
    assert [g.dtype for g in grads] == [t.dtype for t in (x, weights, *params)]
    torch.library.opcheck(ffn_module.moe_ffn_backward.default, bwd_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_moeffn_runs_forward_and_backward_under_a_fake_tensor_mode(gated, backend):
    """An eager forward and backward of MoEFFN under a FakeTensorMode (memory and FLOP estimators): fake
    outputs and gradients of the real shapes. The torch backend on a CPU read the fake expert offsets on the
    host for its per-segment activation (DataDependentOutputException)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from moelora.modules.ffn import MoEFFN

    with FakeTensorMode(), moelora.use_backend(backend):
        moe = MoEFFN(nn.Linear(8, 16), nn.Linear(16, 8), nn.SiLU(), num_experts=4, top_k=2, router="softmax_topk",
                     gate_proj=nn.Linear(8, 16) if gated else None).train()
        x = torch.randn(2, 5, 8, requires_grad=True)
        y = moe(x)
        y.sum().backward()
    assert isinstance(y, FakeTensor) and y.shape == x.shape
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and p.grad.shape == p.shape for p in moe.parameters() if p.requires_grad)
