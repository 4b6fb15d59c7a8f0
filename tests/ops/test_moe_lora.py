"""The fused operator against the float64 reference: forward, every gradient, both regimes.

Without a GPU the Triton kernels run under the interpreter (fp32, fp16); bf16 and the
larger sweeps run only on a GPU.
"""

import contextlib

import pytest
import torch

import moelora
from conftest import DEVICE, HAS_CUDA
from helpers import TOLERANCE, empty_filled_with_nan, make_problem, reference, rel_err
from moelora.ops.reference import moe_lora_naive

needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
REGIMES = ["dense", "grouped"]
CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_and_check(p, *, regime, backend="triton", grad_kind="random"):
    """Run the op, compare output and all gradients with the float64 reference."""
    y = moelora.moe_lora(*p.args(), scaling=p.scaling, base_out=p.base_out, backend=backend, regime=regime)
    assert y.dtype == p.x.dtype and y.shape == (p.x.shape[0], p.lora_b.shape[1])
    if grad_kind == "sum":  # y.sum() hands backward a stride-0 expanded gradient
        grad_out = torch.ones_like(y)
        grads = torch.autograd.grad(y.sum(), p.leaves())
    else:
        grad_out = torch.randn_like(y)
        grads = torch.autograd.grad(y, p.leaves(), grad_out)
    y_ref, grads_ref = reference(p, grad_out)
    tol = TOLERANCE[p.x.dtype]
    assert rel_err(y, y_ref) < tol, f"forward rel err {rel_err(y, y_ref)}"
    names = ["x", "lora_a", "lora_b", "topk_weights", "base_out"]
    for name, g, g_ref, leaf in zip(names, grads, grads_ref, p.leaves()):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, name
        assert rel_err(g, g_ref) < tol, f"grad {name} rel err {rel_err(g, g_ref)}"
    return y, grads


# T, d_in, d_out, r, E, k: every T of the issue, odd widths, r from 1 to 64, E up to 64, k up to E.
SHAPES = [
    (1, 16, 16, 4, 1, 1),
    (7, 47, 600, 8, 7, 3),
    (97, 47, 60, 16, 8, 2),
    (97, 32, 48, 1, 8, 8),
    (97, 33, 40, 4, 64, 2),
    (130, 64, 72, 64, 4, 2),
    (200, 40, 24, 16, 7, 7),
]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-din{}-dout{}-r{}-E{}-k{}".format(*s))
def test_matches_float64_reference_fp32(shape, shared_a, regime):
    T, d_in, d_out, r, E, k = shape
    run_and_check(make_problem(T, d_in, d_out, r, E, k, shared_a=shared_a, device=DEVICE, seed=T + E), regime=regime)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_matches_float64_reference_fp16(shared_a, regime):
    p = make_problem(97, 47, 60, 16, 8, 2, shared_a=shared_a, dtype=torch.float16, device=DEVICE)
    run_and_check(p, regime=regime)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
@pytest.mark.parametrize("shape", [(1, 64, 64, 16, 8, 2), (1000, 600, 47, 8, 8, 2), (4096, 1024, 1024, 16, 8, 2),
                                   (3000, 512, 768, 64, 64, 4), (2048, 256, 256, 4, 64, 64)],
                         ids=lambda s: "T{}-din{}-dout{}-r{}-E{}-k{}".format(*s))
def test_gpu_sweep(shape, shared_a, regime, dtype):
    T, d_in, d_out, r, E, k = shape
    run_and_check(make_problem(T, d_in, d_out, r, E, k, shared_a=shared_a, dtype=dtype, device=DEVICE), regime=regime)


@needs_gpu
@pytest.mark.parametrize("regime", REGIMES)
def test_gpu_many_tokens_int64_offsets(regime):
    """T * d above 2^31 elements would wrap int32 offsets; here T * d_out = 70000 * 32768."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    T, d_in, d_out = 70000, 64, 32768
    x = torch.randn(T, d_in, device=DEVICE, dtype=torch.bfloat16)
    a = torch.randn(16, d_in, device=DEVICE, dtype=torch.bfloat16) / 8
    b = torch.randn(4, d_out, 16, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.randint(0, 4, (T, 1), device=DEVICE)
    w = torch.rand(T, 1, device=DEVICE)
    y = moelora.moe_lora(x, a, b, ids, w, backend="triton", regime=regime)
    rows = torch.tensor([0, T // 2, T - 1], device=DEVICE)
    ref = moelora.ops.reference.moe_lora_torch(x[rows].double(), a.double(), b.double(), ids[rows], w[rows].double())
    assert rel_err(y[rows], ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("regime", REGIMES)
def test_leading_dims_int32_ids_and_no_base(regime):
    p = make_problem(24, 16, 20, 4, 5, 2, id_dtype=torch.int32, with_base=False, device=DEVICE)
    x3 = p.x.detach().view(2, 3, 4, 16).requires_grad_()
    ids3 = p.topk_ids.view(2, 3, 4, 2)
    y = moelora.moe_lora(x3, p.lora_a, p.lora_b, ids3, p.topk_weights.view(2, 3, 4, 2), scaling=p.scaling,
                         backend="triton", regime=regime)
    assert y.shape == (2, 3, 4, 20)
    y_ref, _ = reference(p, torch.zeros(24, 20, dtype=torch.float64, device=DEVICE))
    assert rel_err(y.reshape(24, 20), y_ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
def test_output_of_leading_dims_takes_in_place_ops(with_base, regime):
    """y of x [..., d_in] may be modified in place (F.relu_, +=), as a linear layer's output:
    autograd refuses that on a view made inside an autograd.Function (the Triton backend's
    y.view(out_shape) did). The gradients are those of the out-of-place ops."""
    p = make_problem(24, 16, 20, 4, 5, 2, with_base=with_base, device=DEVICE)
    lead = (2, 3, 4)

    def grads(in_place):
        leaves = [t.detach().clone().requires_grad_() for t in p.leaves()]
        x, a, b, w = leaves[:4]
        base = leaves[4].view(*lead, 20) if with_base else None
        y = moelora.moe_lora(x.view(*lead, 16), a, b, p.topk_ids.view(*lead, 2), w.view(*lead, 2),
                             scaling=p.scaling, base_out=base, backend="triton", regime=regime)
        assert y.shape == (*lead, 20)
        y = torch.relu_(y.add_(0.5)) if in_place else torch.relu(y + 0.5)
        return torch.autograd.grad((y * y.detach().cos()).sum(), leaves)

    for g, expected in zip(grads(True), grads(False)):
        assert torch.equal(g, expected)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_non_contiguous_inputs_and_stride0_grad(shared_a, regime):
    """Transposed/sliced views for every input, and the y.sum() gradient (stride 0)."""
    p = make_problem(50, 24, 36, 8, 6, 2, shared_a=shared_a, device=DEVICE)
    p.x = p.x.detach().t().contiguous().t().requires_grad_()  # column-major x
    p.lora_b = p.lora_b.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    p.lora_a = p.lora_a.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    p.topk_ids = p.topk_ids.t().contiguous().t()  # strides (1, T)
    p.topk_weights = p.topk_weights.detach().t().contiguous().t().requires_grad_()
    p.base_out = p.base_out.detach().t().contiguous().t().requires_grad_()
    assert not p.x.is_contiguous() and not p.topk_ids.is_contiguous()
    run_and_check(p, regime=regime, grad_kind="sum")


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_empty_experts_get_exact_zero_gradients(shared_a, regime):
    E = 8
    p = make_problem(60, 20, 30, 4, E, 2, shared_a=shared_a, experts=E // 2, device=DEVICE)
    _, grads = run_and_check(p, regime=regime)
    dB = grads[2]
    assert torch.equal(dB[E // 2:], torch.zeros_like(dB[E // 2:]))
    assert dB[: E // 2].abs().sum() > 0
    if not shared_a:
        dA = grads[1]
        assert torch.equal(dA[E // 2:], torch.zeros_like(dA[E // 2:]))


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("k", [1, 3])
def test_all_tokens_on_one_expert(k, regime):
    run_and_check(make_problem(70, 20, 30, 4, 5, k, one_expert=True, device=DEVICE), regime=regime)


@pytest.mark.parametrize("regime", REGIMES)
def test_repeated_expert_in_two_slots_sums(regime):
    p = make_problem(20, 16, 16, 4, 4, 2, device=DEVICE)
    p.topk_ids = torch.full_like(p.topk_ids, 2)
    run_and_check(p, regime=regime)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_tokens(backend):
    p = make_problem(0, 16, 24, 4, 4, 2, device=DEVICE)
    y = moelora.moe_lora(*p.args(), base_out=p.base_out, backend=backend)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert p.lora_b.grad is not None and torch.equal(p.lora_b.grad, torch.zeros_like(p.lora_b))


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_bitwise_deterministic(shared_a, regime):
    def once():
        p = make_problem(90, 40, 56, 8, 8, 2, shared_a=shared_a, device=DEVICE, seed=3)
        y = moelora.moe_lora(*p.args(), scaling=p.scaling, base_out=p.base_out, backend="triton", regime=regime)
        return [y, *torch.autograd.grad(y, p.leaves(), torch.ones_like(y) * 0.5 + y.detach())]

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_grouped_regime_uses_extension_layout(shared_a, monkeypatch):
    """The grouped regime sorts pairs with moelora._C when it is built, and its results equal
    those over the PyTorch fallback layout bitwise."""
    from moelora import switches as _config
    from moelora.ops import native as _ext
    from moelora.ops import routing_autograd as ops

    def once():
        p = make_problem(90, 40, 56, 8, 8, 2, shared_a=shared_a, device=DEVICE, seed=4)
        y = moelora.moe_lora(*p.args(), scaling=p.scaling, base_out=p.base_out, backend="triton", regime="grouped")
        return [y, *torch.autograd.grad(y, p.leaves(), y.detach() + 1.0)]

    if _ext.use_native(torch.device(DEVICE)):
        calls = []
        native = ops.NATIVE_OPS.dispatch_metadata
        monkeypatch.setattr(ops.NATIVE_OPS, "dispatch_metadata", lambda *a: calls.append(a) or native(*a))
        with_ext = once()
        assert len(calls) == 1  # the forward's; the backward reuses its layout
    else:
        with_ext = once()
    with _config.force_fallback():
        without = once()
    for a, b in zip(with_ext, without):
        assert torch.equal(a, b)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_gradcheck_float64(shared_a, regime):
    p = make_problem(9, 5, 6, 2, 3, 2, shared_a=shared_a, dtype=torch.float64, device=DEVICE)

    def fn(x, a, b, w, base):
        return moelora.moe_lora(x, a, b, p.topk_ids, w, scaling=p.scaling, base_out=base, backend="triton",
                                regime=regime)

    leaves = [t.detach().double().requires_grad_() for t in p.leaves()]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_naive_loop_matches_torch_backend():
    p = make_problem(40, 12, 18, 4, 5, 2, shared_a=False, dtype=torch.float64, device=DEVICE)
    y_naive = moe_lora_naive(*p.args(), scaling=p.scaling, base_out=p.base_out)
    y_ref, _ = reference(p, torch.zeros(40, 18, dtype=torch.float64, device=DEVICE))
    assert rel_err(y_naive, y_ref) < 1e-12


@pytest.mark.parametrize("rank, experts, top_k", [(3, 4, 2), (1, 18, 17)], ids=["k2", "k17"])
@pytest.mark.parametrize("regime", REGIMES)
def test_out_of_range_ids_with_validation_off_contribute_nothing(regime, rank, experts, top_k):
    """With checks off, bad ids must neither crash nor touch memory: they add nothing, whatever
    their weights (here NaN and Inf), and their gate gradient is exactly 0 (not memory no kernel wrote:
    torch.empty is poisoned with NaN). E*r (12; 18) leaves padding columns in the dense regime's
    16-wide column tiles, which the ids just past E name (k 17: the kernel's slot loop)."""
    p = make_problem(30, 16, 20, rank, experts, top_k, device=DEVICE)
    bad = p.topk_ids.clone()
    bad[::3, 1] = experts
    bad[1::6, 1] = experts + 1
    bad[1::5, 0] = -7
    w = p.topk_weights.detach().clone()
    out_of_range = (bad < 0) | (bad >= experts)
    w[out_of_range] = torch.tensor([float("nan"), float("inf")], device=DEVICE).repeat(30)[:int(out_of_range.sum())]
    masked_w = torch.where(out_of_range, torch.zeros_like(w), w).double().requires_grad_()
    w.requires_grad_()
    with moelora.validation(False), empty_filled_with_nan():  # memory no kernel writes must not reach a gradient
        y = moelora.moe_lora(p.x, p.lora_a, p.lora_b, bad, w, scaling=p.scaling, backend="triton", regime=regime)
        y.sum().backward()
    ref = moelora.ops.reference.moe_lora_torch(p.x.detach().double(), p.lora_a.detach().double(),
                                               p.lora_b.detach().double(), bad.clamp(0, experts - 1),
                                               masked_w, scaling=p.scaling)
    assert rel_err(y, ref) < TOLERANCE[torch.float32]
    assert torch.isfinite(p.lora_b.grad).all() and torch.isfinite(p.x.grad).all()
    ref.sum().backward()  # the gate gradient: the reference's in range, exactly 0 out of range
    assert torch.equal(w.grad[out_of_range], torch.zeros_like(w.grad[out_of_range]))
    assert rel_err(w.grad[~out_of_range], masked_w.grad[~out_of_range]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("regime", REGIMES)
def test_reads_only_inside_strided_views(regime):
    """Inputs are views into NaN-filled buffers: any read outside a view poisons the result."""
    T, d_in, d_out, r, E, k = 33, 20, 28, 4, 5, 2
    p = make_problem(T, d_in, d_out, r, E, k, device=DEVICE)

    def embed(t):
        big = torch.full((t.shape[0] + 2, 2 * t.shape[1] + 3), float("nan"), dtype=t.dtype, device=DEVICE)
        view = big[1:-1, 3::2]
        view.copy_(t.detach())
        return view.requires_grad_()

    p.x, p.base_out = embed(p.x), embed(p.base_out)
    big_b = torch.full((E, d_out + 1, r + 2), float("nan"), device=DEVICE)
    big_b[:, 1:, 1:-1] = p.lora_b.detach()
    p.lora_b = big_b[:, 1:, 1:-1].requires_grad_()
    run_and_check(p, regime=regime)


def test_backend_selection(monkeypatch):
    p = make_problem(10, 8, 8, 2, 3, 1, device=DEVICE)
    assert moelora.resolve_backend("torch", p.x.device) == "torch"
    with moelora.use_backend("triton"):
        assert moelora.current_backend() == "triton"
        assert moelora.resolve_backend(None, p.x.device) == "triton"
        assert moelora.resolve_backend("torch", p.x.device) == "torch"  # the argument wins
    monkeypatch.setenv("MOELORA_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert moelora.resolve_backend(None, torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend='triton' needs"):
        moelora.resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert moelora.resolve_backend(None, torch.device("cpu")) == "triton"
    with moelora.use_backend("torch"):
        assert moelora.resolve_backend("auto", torch.device("cpu")) == "triton"  # an "auto" argument wins too
    with pytest.raises(ValueError, match="backend must be one of"):
        moelora.resolve_backend("", p.x.device)  # not read as "no argument"
    monkeypatch.setenv("MOELORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MOELORA_BACKEND must be one of"):
        moelora.current_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        moelora.resolve_backend("fast", p.x.device)
    with pytest.raises(ValueError, match="backend must be one of"):
        with moelora.use_backend("fast"):
            pass


def test_meta_tensors_run_the_torch_backend_under_the_interpreter(monkeypatch):
    """README (Backends): the interpreter runs the kernels on CPU tensors. "auto" picked triton for
    tensors on any device under TRITON_INTERPRET=1, so meta tensors (shapes only, as in FSDP's or
    accelerate's meta-device init) reached the kernels: "Cannot copy out of meta tensor"; as on a GPU
    machine they now take the torch backend, and backend='triton' names the device."""
    monkeypatch.setenv("MOELORA_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    meta = torch.device("meta")
    assert moelora.resolve_backend(None, meta) == "torch"
    with pytest.raises(ValueError, match="backend='triton' needs .* got tensors on meta"):
        moelora.resolve_backend("triton", meta)
    p = make_problem(6, 8, 8, 2, 4, 2, device="meta")
    y = moelora.moe_lora(*p.args(), scaling=p.scaling, base_out=p.base_out)
    assert y.device == meta and y.shape == (6, 8)
    grads = torch.autograd.grad(y.sum(), p.leaves())
    assert [g.shape for g in grads] == [t.shape for t in p.leaves()]


def test_kernels_run_where_the_triton_backend_would_and_is_not_switched_off(monkeypatch):
    """moelora.ops.backend.kernels_run (the routers' and losses' own kernel paths): CPU tensors under the
    interpreter unless the torch backend is chosen, never meta or fake tensors, nor CPU tensors outside the
    interpreter, where the Triton backend's recorded ops (check_triton_op_device) name the device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moelora.ops.backend import check_triton_op_device, kernels_run

    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for backend, runs in (("auto", True), ("triton", True), ("torch", False)):
        with moelora.use_backend(backend):
            assert kernels_run(cpu) == runs and not kernels_run(meta), backend
    with FakeTensorMode(), moelora.use_backend("auto"):
        assert not kernels_run(cpu)
    check_triton_op_device("moe_lora_forward", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with moelora.use_backend("auto"):
        assert not kernels_run(cpu)
    check_triton_op_device("moe_lora_forward", cuda)
    with pytest.raises(ValueError, match="moelora::moe_lora_forward is the Triton backend's op .* got tensors on cpu"):
        check_triton_op_device("moe_lora_forward", cpu)


def test_backends_agree():
    p = make_problem(40, 16, 24, 4, 6, 2, device=DEVICE)
    y_t = moelora.moe_lora(*p.args(), scaling=p.scaling, base_out=p.base_out, backend="triton")
    y_r = moelora.moe_lora(*p.args(), scaling=p.scaling, base_out=p.base_out, backend="torch")
    assert rel_err(y_t, y_r) < TOLERANCE[torch.float32]


def test_choose_regime_is_a_width_threshold(monkeypatch):
    """Dense while E*r <= DENSE_MAX_WIDTH (the crossover benchmarks/tune_grouped.py measures), and beyond
    MAX_EXPERTS experts (which the expert sort does not take); MAX_EXPERTS itself is grouped."""
    from moelora.ops import moe_lora as moe_lora_module

    choose = moe_lora_module.choose_regime
    assert choose(8, 16) == "dense" and choose(64, 64) == "grouped"  # S1, S3 as committed
    E = moe_lora_module.MAX_EXPERTS
    assert choose(E, 1) == "grouped" and choose(E + 1, 1) == "dense"
    monkeypatch.setattr(moe_lora_module, "DENSE_MAX_WIDTH", 512)
    assert choose(32, 16) == "dense" and choose(33, 16) == "grouped" and choose(8, 64) == "dense"


@pytest.mark.parametrize("experts, rank", [(3, 4), (9, 4)], ids=["narrow", "wide"])
def test_auto_regime_runs_the_regime_choose_regime_picks(monkeypatch, experts, rank):
    """regime='auto' launches exactly the kernels of the regime choose_regime names for E and r (the two
    regimes compute the same values, so only their kernels tell them apart): DENSE_MAX_WIDTH lowered to 16,
    E*r 12 is dense, 36 grouped."""
    from moelora.ops import moe_lora as moe_lora_module
    from moelora.profiling import count_kernels

    monkeypatch.setattr(moe_lora_module, "DENSE_MAX_WIDTH", 16)
    p = make_problem(9, 16, 12, rank, experts, 2, device=DEVICE, seed=3)
    launched = {}
    for regime in ("auto", "dense", "grouped"):
        with moelora.use_backend("triton"), moelora.validation(False), count_kernels() as counts:
            moelora.moe_lora(*p.args(), scaling=p.scaling, regime=regime)
        launched[regime] = counts.triton
    assert launched["dense"] != launched["grouped"]
    assert launched["auto"] == launched[moe_lora_module.choose_regime(experts, rank)]
    assert moe_lora_module.choose_regime(experts, rank) == ("dense" if experts * rank <= 16 else "grouped")


def test_grouped_regime_takes_max_experts_and_refuses_one_more(monkeypatch):
    """regime='grouped' sorts at most MAX_EXPERTS experts: MAX_EXPERTS itself runs (checked here with the
    bound lowered to 4, the sort itself taking far more), MAX_EXPERTS + 1 is refused."""
    from moelora.ops import moe_lora as moe_lora_module

    monkeypatch.setattr(moe_lora_module, "MAX_EXPERTS", 4)
    run_and_check(make_problem(9, 16, 12, 4, 4, 2, device=DEVICE, seed=11), regime="grouped")
    p = make_problem(9, 16, 12, 4, 5, 2, device=DEVICE, seed=12)
    with pytest.raises(ValueError, match="for at most 4 experts: lora_b.shape"):
        moelora.moe_lora(*p.args(), scaling=p.scaling, backend="triton", regime="grouped")


# ---- the grouped regime's forward rows on torch's grouped_mm (sm90 bf16 by ROWS_ENGINES) ----------
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
@pytest.mark.parametrize("shape", [(97, 47, 60, 16, 8, 2), (7, 47, 600, 8, 7, 3), (130, 64, 72, 64, 4, 2)],
                         ids=lambda s: "T{}-din{}-dout{}-r{}-E{}-k{}".format(*s))
def test_grouped_rows_on_grouped_mm_match_float64_reference(shape, shared_a, grouped_mm_rows):
    """Forward and every gradient with the rows from grouped_mm and the gates applied by
    combine_rows; experts 0 .. E/2 - 1 only, so that the others' gradients must be exact zeros."""
    T, d_in, d_out, r, E, k = shape
    p = make_problem(T, d_in, d_out, r, E, min(k, E // 2), shared_a=shared_a, experts=E // 2, device=DEVICE, seed=T)
    _, grads = run_and_check(p, regime="grouped")
    assert grouped_mm_rows, "the grouped_mm engine did not run"
    assert (grads[2][E // 2:] == 0).all() and (shared_a or (grads[1][E // 2:] == 0).all())


def test_grouped_mm_rows_ignore_the_weights_of_out_of_range_ids(grouped_mm_rows):
    """Slots whose id is out of range lie outside the layout: combine_rows does not read their
    weight (here Inf and NaN), as the Triton engine's epilogue never sees them."""
    p = make_problem(40, 16, 24, 8, 6, 2, device=DEVICE, seed=5)
    ids = p.topk_ids.clone()
    ids[3, 1], ids[7, 0] = 6, -1
    w = p.topk_weights.detach().clone()
    w[3, 1], w[7, 0] = float("inf"), float("nan")
    with moelora.validation(False):
        y = moelora.moe_lora(p.x, p.lora_a, p.lora_b, ids, w, scaling=p.scaling, backend="triton", regime="grouped")
    kept = torch.where((ids >= 0) & (ids < 6), w, 0.0)
    ref = moe_lora_naive(p.x.double(), p.lora_a.double(), p.lora_b.double(), ids.clamp(0, 5), kept.double(),
                         scaling=p.scaling)
    assert grouped_mm_rows and torch.isfinite(y).all() and rel_err(y, ref) < TOLERANCE[torch.float32]


def test_rows_engine_by_device_dtype_shape_and_table(monkeypatch):
    """grouped_mm where the table picks it for the GPU and the shape class and the operands suit
    it (bf16, 16-byte aligned B, s within fp32's range); Triton everywhere else."""
    from moelora.ops import moe_lora as moe_lora_module

    engine = moe_lora_module.rows_engine
    bf16 = dict(dtype=torch.bfloat16)
    x, b = torch.empty(8, 32, **bf16), torch.empty(64, 4096, 64, **bf16)  # S3: d_out 4096, r 64, E 64
    pairs, rows = 32768 * 4, 32768 * 4 + 64 * 127
    if not HAS_CUDA:
        assert engine(x, b, pairs, rows, 2.0) == "triton"  # CPU: grouped_mm is not native here
    monkeypatch.setattr(moe_lora_module, "native_major", lambda device: 9)
    assert engine(x, b, pairs, rows, 2.0) == "grouped_mm"  # matmul:ls:many, as committed
    assert engine(x, b, 64 * 100, rows, 2.0) == "triton"  # matmul:ls:few: not in the table
    assert engine(x.float(), b.float(), pairs, rows, 2.0) == "triton"  # fp32: Triton
    assert engine(x, b[:, :, :60], pairs, rows, 2.0) == "triton"  # r 60: B's rows not 16-byte aligned
    assert engine(x, b, pairs, rows, 1e30) == "triton"  # s outside SCALING_RANGE_FP32
    assert engine(x, b, pairs, 2 ** 31, 2.0) == "triton"  # int32 group ends
    monkeypatch.setattr(moe_lora_module, "native_major", lambda device: None)
    assert engine(x, b, pairs, rows, 2.0) == "triton"


@pytest.mark.parametrize("regime", REGIMES)
def test_enable_grad_inside_inference_mode_records_nothing(regime):
    """torch.enable_grad() inside torch.inference_mode() records no graph (PyTorch's own ops make
    none): the Triton path's autograd.Function recorded one and refused to save the inference
    tensors it made (RuntimeError "Inference tensors cannot be saved for backward"), under
    torch.profiler too. moelora.route / dispatch / combine likewise on inputs that require grad."""
    p = make_problem(6, 8, 5, 2, 3, 2, shared_a=regime == "dense", seed=3)
    expected = moelora.moe_lora(*p.args(), scaling=p.scaling, base_out=p.base_out, backend="triton", regime=regime)
    logits = torch.randn(6, 3, requires_grad=True)
    route = moelora.route(logits, 2, renormalize=True)
    meta = moelora.dispatch_metadata(route.ids, 3)
    mixed = moelora.combine(moelora.dispatch(p.x, meta), meta, route.weights)
    for profiled in (False, True):
        with torch.profiler.profile() if profiled else contextlib.nullcontext(), torch.inference_mode(), \
                torch.enable_grad():
            y = moelora.moe_lora(*p.args(), scaling=p.scaling, base_out=p.base_out, backend="triton", regime=regime)
            r = moelora.route(logits, 2, renormalize=True)
            m = moelora.combine(moelora.dispatch(p.x, meta), meta, r.weights)
        assert not (y.requires_grad or r.weights.requires_grad or m.requires_grad)
        torch.testing.assert_close(y, expected.detach())
        torch.testing.assert_close(m, mixed.detach())
