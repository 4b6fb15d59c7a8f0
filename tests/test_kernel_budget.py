"""Structural budgets of the hot paths, measured on CPU with moelora.profiling.count_kernels:
Triton launches counted (not run) plus ATen compute ops (views and allocations excluded).
A change that adds a kernel to these paths fails here; GPU timings live in the benchmark.

Budgets (issue 10): moe_lora dense regime forward <= 2 and forward+backward <= 7;
MoELoRALinear (shared A, softmax_topk, training, aux losses on) forward+backward <= 20,
base GEMMs and aux losses included. The pinned counts below are today's: lower them when a
change removes a kernel.
"""

import pytest
import torch
import torch.nn as nn

import moelora
from conftest import DEVICE
from helpers import randomize_adapters
from moelora import profiling
from moelora.kernels import launchers
from moelora.ops import moe_lora as moe_lora_module
from moelora.ops import native
from moelora.profiling import KernelCounts, count_kernels
from moelora.switches import current_backend, fallback_forced

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="counted on CPU (launches are not run)")
# The budgets count moelora._C's routing and dispatch ops as one kernel each; the PyTorch fallbacks that run
# without it (a MOELORA_NO_EXT=1 build, MOELORA_FORCE_FALLBACK=1) take tens of ATen ops instead.
native_routing = pytest.mark.skipif(not native.HAS_C or fallback_forced(),
                                    reason="counts moelora._C's routing ops (the fallbacks run here)")


def _operator_inputs(shared_a=True, T=64, d=64, r=16, E=8, k=2):
    torch.manual_seed(0)
    a_shape = (r, d) if shared_a else (E, r, d)
    leaves = [torch.randn(T, d), torch.randn(*a_shape), torch.randn(E, d, r), torch.rand(T, k)]
    for t in leaves:
        t.requires_grad_()
    ids = torch.rand(T, E).argsort(1)[:, :k]
    return leaves, ids


@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_moe_lora_dense_kernel_budget(shared_a):
    (x, a, b, w), ids = _operator_inputs(shared_a)
    with moelora.use_backend("triton"), moelora.validation(False):
        with count_kernels() as fwd:
            y = moelora.moe_lora(x, a, b, ids, w, scaling=0.5, regime="dense")
        dy = torch.randn_like(y)
        with count_kernels() as bwd:
            torch.autograd.grad(y, [x, a, b, w], dy)
    assert fwd.total <= 2, fwd
    assert fwd.total + bwd.total <= 6, bwd  # budget 7; today: 2 + 4 (a 5th when T is split)
    assert not fwd.aten and not bwd.aten, (fwd, bwd)


@pytest.mark.parametrize("regime", ["dense", "grouped"])
def test_moe_lora_backward_launches_no_dx_gemm_for_an_x_without_grad(regime):
    """x that needs no gradient (a frozen input): the backward skips the dx GEMM, one kernel fewer."""
    (x, a, b, w), ids = _operator_inputs()
    counts = []
    with moelora.use_backend("triton"), moelora.validation(False):
        for x_in in (x, x.detach()):
            y = moelora.moe_lora(x_in, a, b, ids, w, scaling=0.5, regime=regime)
            leaves = [a, b, w] + ([x_in] if x_in.requires_grad else [])
            with count_kernels() as bwd:
                grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
            assert all(g is not None for g in grads)
            counts.append(bwd.total)
    assert counts[1] == counts[0] - 1, counts


@pytest.mark.parametrize("regime", ["dense", "grouped"])
def test_moe_lora_on_zero_tokens_launches_nothing(regime):
    """No Triton kernel runs on zero tokens: the torch path returns the empty result (with its autograd)."""
    (x, a, b, w), ids = _operator_inputs(T=0)
    with moelora.use_backend("triton"), moelora.validation(False):
        with count_kernels() as fwd:
            y = moelora.moe_lora(x, a, b, ids, w, scaling=0.5, regime=regime)
        with count_kernels() as bwd:
            torch.autograd.grad(y, [x, a, b, w], torch.randn_like(y))
    assert y.shape == (0, 64)
    assert not fwd.triton and not bwd.triton, (fwd, bwd)


@pytest.mark.parametrize("regime", ["dense", "grouped"])
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["2d", "3d"])
def test_moe_lora_linear_on_zero_tokens_launches_nothing(regime, lead):
    """The fused layer's op on zero tokens: the composed torch path, no Triton kernel, y [..., d_out]."""
    from moelora.ops.moe_lora_linear import RouterSpec, moe_lora_linear

    E, r = (4, 4) if regime == "dense" else (64, 32)  # grouped: E * r above DENSE_MAX_WIDTH
    assert moe_lora_module.choose_regime(E, r) == regime
    torch.manual_seed(0)
    leaves = [torch.randn(*lead, 16), torch.randn(24, 16), torch.randn(r, 16), torch.randn(E, 24, r),
              torch.randn(E, 16)]
    for t in leaves:
        t.requires_grad_()
    x, weight, a, b, router_weight = leaves
    with moelora.use_backend("triton"):
        with count_kernels() as fwd:
            y, out = moe_lora_linear(x, weight, None, a, b, scaling=0.5,
                                     router=RouterSpec(router_weight, None, "softmax_topk", 2))
        with count_kernels() as bwd:
            torch.autograd.grad(y.sum() + out.aux_loss, leaves)
    assert y.shape == (*lead, 24)
    assert not fwd.triton and not bwd.triton, (fwd, bwd)


def _count_training_step(module: nn.Module, x: torch.Tensor):
    """(forward, backward) kernel counts of one training step of ``module`` on x, the aux loss
    of a learned router included, after a first call (which fills what is cached per process,
    e.g. plain LoRA's fixed routing)."""
    params = [p for p in module.parameters() if p.requires_grad]
    with moelora.use_backend("triton"), moelora.validation(False):
        with count_kernels():
            module(x)
        with count_kernels() as fwd:
            y = module(x)
        outputs, grads = [y], [torch.randn_like(y)]
        if module.last_aux_loss is not None:
            outputs.append(module.last_aux_loss)
            grads.append(torch.ones((), dtype=module.last_aux_loss.dtype))
        with count_kernels() as bwd:
            torch.autograd.grad(outputs, [x] + params, grads)
    return fwd, bwd


LAYER_BUDGET = 20
# Today's counts per layer feature.
# (The router's aux loss is computed by the gated expand's launch: learned routers cost one
# kernel less than before it was.)
LAYER_SETTINGS = {
    "softmax_topk": ({}, 9),
    "topk_softmax": (dict(router="topk_softmax"), 9),
    "per_expert_a": (dict(share_lora_a=False), 9),
    "threshold": (dict(router="threshold", top_k=3, threshold_eps=0.2, threshold_ramp_steps=10), 11),
    "mosld_a_dropout": (dict(lora_a_dropout=0.1), 12),  # A (.) M forward and backward, the bernoulli_ draw
    # the jitter factors (uniform_) read by the kernels beside x: no jittered copy of x, no router GEMMs
    "jitter": (dict(router_jitter_noise=0.1), 10),
    # the keep mask (bernoulli_) read by the kernels beside x: no dropped-out copy of x, no extra
    # GEMM passes for its gradient
    "lora_dropout": (dict(lora_dropout=0.1), 10),
    "task_shared": (dict(router="task", task_shared_lora=True), 12),  # ids built once per task-id tensor
    # the most experts whose aux loss gated_expand computes (launchers.GATED_EXPAND_AUX_EXPERTS); one more
    # expert and router_aux_loss runs on its own
    "aux_folded_64_experts": (dict(num_experts=64, r=4), 9),
    "aux_unfolded_65_experts": (dict(num_experts=65, r=4), 10),
    "plain_lora": (dict(num_experts=1, top_k=1), 8),  # no router: fixed ids and weights, cached
    "rslora": (dict(use_rslora=True), 9),  # the README's table lists rsLoRA and a Conv1D base at 9
    "conv1d_base": ({}, 9),  # GPT-2's Conv1D as the base layer (its weight transposed, no copy)
    # fp32 adapters over a bf16 base (PEFT's and the benchmark's setup): the kernels read A and B
    # as they are, no cast kernels
    "bf16_base": ({}, 9),
    # E*r = 2048 > DENSE_MAX_WIDTH: moelora.moe_lora's grouped regime inside the fused op (the
    # layout's metadata op in the forward, its tensors saved for the backward; the aux loss and
    # the router's backward have launches of their own)
    "grouped_regime": (dict(num_experts=128), 15),
    "grouped_per_expert_a": (dict(num_experts=128, share_lora_a=False), 17),
    # jitter: x (.) J formed for dW_router (one mul); the dx GEMM scales its d logits W_router
    # part by J (a per-expert A: that product scaled, then the rows added into it)
    "grouped_jitter": (dict(num_experts=128, router_jitter_noise=0.1), 17),
    "grouped_per_expert_a_jitter": (dict(num_experts=128, share_lora_a=False, router_jitter_noise=0.1), 20),
}


@native_routing
@pytest.mark.parametrize("feature", list(LAYER_SETTINGS))
def test_moelora_linear_kernel_budget(feature):
    settings, today = LAYER_SETTINGS[feature]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if feature == "bf16_base" else torch.float32
    if feature == "conv1d_base":
        base = pytest.importorskip("transformers.pytorch_utils").Conv1D(64, 64)
    else:
        base = nn.Linear(64, 64, dtype=dtype)
    layer = moelora.MoELoRALinear(base,
                                  **{**dict(num_experts=8, top_k=2, r=16, share_lora_a=True), **settings}).train()
    layer.base_layer.requires_grad_(False)
    assert layer.lora_B.dtype == torch.float32
    if feature == "task_shared":
        moelora.set_task_ids(nn.Sequential(layer), torch.tensor([3, 1]))
    fwd, bwd = _count_training_step(layer, torch.randn(2, 32, 64, dtype=dtype, requires_grad=True))
    total = fwd.total + bwd.total
    assert total <= min(today, LAYER_BUDGET), f"forward {fwd}\nbackward {bwd}"
    # The base GEMMs on cuBLAS: forward y += x W^T (addmm_; the grouped regime: y = x W^T + b,
    # which its expert rows are then added into: addmm), backward dx += dy W (addmm_).
    assert fwd.aten.count("addmm_") + fwd.aten.count("addmm") == 1 and bwd.aten.count("addmm_") == 1
    assert "moelora.dispatch_metadata" not in bwd.aten  # the grouped regime reuses the forward's layout
    grouped = layer.num_experts * layer.r > moe_lora_module.DENSE_MAX_WIDTH
    assert grouped == feature.startswith("grouped") == ("moelora.dispatch_metadata" in fwd.aten), (fwd, bwd)


# Layers the fused op cannot take run the composed path (base layer, router module, moe_lora):
# today's counts, listed in the README with the fused ones.
COMPOSED_SETTINGS = {"dora_with_lora_dropout": (dict(num_experts=1, top_k=1, use_dora=True, lora_dropout=0.1), False,
                                                29),
                     "base_with_hook": ({}, True, 17)}


@pytest.mark.parametrize("dtype,today", [(torch.float32, 17), (torch.bfloat16, 21)], ids=["fp32", "bf16_base"])
def test_dora_kernel_budget(dtype, today):
    """DoRA without LoRA dropout: the fused op (the bias left out), then the magnitude m / ||W + s B A||_row
    (a GEMM and a norm, no gradient) times its output plus the bias; with a bf16 base, casts to the
    adapters' fp32 and back."""
    torch.manual_seed(0)
    layer = moelora.MoELoRALinear(nn.Linear(64, 64, dtype=dtype), num_experts=1, top_k=1, r=16, use_dora=True).train()
    layer.base_layer.requires_grad_(False)
    fwd, bwd = _count_training_step(layer, torch.randn(2, 32, 64, dtype=dtype, requires_grad=True))
    assert fwd.total + bwd.total <= today, f"forward {fwd}\nbackward {bwd}"
    assert fwd.triton == ["lora_down_kernel", "gated_expand_kernel"] and fwd.aten.count("addmm_") == 1


@native_routing
@pytest.mark.parametrize("feature", list(COMPOSED_SETTINGS))
def test_composed_path_kernel_counts(feature):
    settings, hook, today = COMPOSED_SETTINGS[feature]
    torch.manual_seed(0)
    layer = moelora.MoELoRALinear(nn.Linear(64, 64),
                                  **{**dict(num_experts=8, top_k=2, r=16, share_lora_a=True), **settings}).train()
    layer.base_layer.requires_grad_(False)
    if hook:
        layer.base_layer.register_forward_hook(lambda module, inputs, output: None)
    fwd, bwd = _count_training_step(layer, torch.randn(2, 32, 64, requires_grad=True))
    assert fwd.total + bwd.total <= today, f"forward {fwd}\nbackward {bwd}"


@native_routing
def test_moe_ffn_module_kernel_budget():
    """An upcycled MoE FFN block (MoEFFN: SwiGLU experts, softmax_topk router, aux loss on), one
    training step: the router's logits, backward, aux loss and its backward are a kernel each,
    the FFN's mask and normalisation of the weights one kernel forward and one backward (today's 27)."""
    import torch.nn.functional as F
    from moelora.modules.ffn import MoEFFN

    torch.manual_seed(0)
    d, d_ff = 64, 96
    block = MoEFFN(nn.Linear(d, d_ff), nn.Linear(d_ff, d), F.silu, 4, 2, gate_proj=nn.Linear(d, d_ff),
                   router="softmax_topk").train()
    fwd, bwd = _count_training_step(block, torch.randn(2, 32, d, requires_grad=True))
    assert fwd.total + bwd.total <= 27, f"forward {fwd}\nbackward {bwd}"
    assert {"lora_down_kernel", "router_aux_loss_kernel", "mixing_weights_kernel"} <= set(fwd.triton)
    assert {"router_backward_kernel", "router_aux_loss_backward_kernel",
            "mixing_weights_backward_kernel"} <= set(bwd.triton)


ROUTER_DTYPES = {"fp32": (torch.float32, torch.float32), "bf16_x": (torch.bfloat16, torch.float32),
                 "bf16_x_and_weight": (torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize("x_dtype,weight_dtype", list(ROUTER_DTYPES.values()), ids=list(ROUTER_DTYPES))
def test_router_logits_backward_launches_a_gemm_per_gradient_needed_and_no_cast(x_dtype, weight_dtype):
    """Router.logits on the Triton engine (a routed module outside the fused layer: MoEFFN's): the forward one
    kernel, the backward one matmul for dW and one for dx, none for an x that needs no gradient; each gradient
    written in its input's dtype from the fp32 logits' (a bf16 x or weight: no cast kernel after)."""
    torch.manual_seed(0)
    router = moelora.Router(64, 8, top_k=2).to(weight_dtype)
    for x in (torch.randn(48, 64, dtype=x_dtype, requires_grad=True), torch.randn(48, 64, dtype=x_dtype)):
        leaves = [router.weight] + ([x] if x.requires_grad else [])
        with moelora.use_backend("triton"), moelora.validation(False):
            with count_kernels() as fwd:
                logits = router.logits(x)
            dl = torch.randn_like(logits)
            with count_kernels() as bwd:
                grads = torch.autograd.grad(logits, leaves, dl)
        assert logits.dtype == torch.float32 and fwd.triton == ["lora_down_kernel"] and not fwd.aten, fwd
        assert bwd.triton == ["matmul_kernel"] * len(leaves) and not bwd.aten, bwd
        assert [g.dtype for g in grads] == [leaf.dtype for leaf in leaves]


@native_routing
@pytest.mark.parametrize("normalize", [False, True])
def test_moe_ffn_operator_kernel_budget(normalize):
    """moelora.moe_ffn, SwiGLU with biases on the Triton engine: forward = the mask / normalise
    kernel, the layout (moelora._C), three grouped GEMMs, the GLU and the combine; backward = 12
    Triton kernels and no ATen op (no zero fills, no PyTorch ops for the weights' gradient)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    T, d, f, E, k = 48, 32, 48, 4, 2
    x, w = torch.randn(T, d, requires_grad=True), torch.rand(T, k, requires_grad=True)
    ids = torch.rand(T, E).argsort(1)[:, :k]
    params = [torch.randn(*shape, requires_grad=True) for shape in ((E, f, d), (E, f), (E, d, f), (E, d), (E, f, d),
                                                                    (E, f))]
    with moelora.use_backend("triton"), moelora.validation(False):
        with count_kernels() as fwd:
            y = moelora.moe_ffn(x, ids, w, *params[:4], F.silu, *params[4:], normalize=normalize)
        dy = torch.randn_like(y)
        with count_kernels() as bwd:
            torch.autograd.grad(y, [x, w] + params, dy)
    assert fwd.triton == ["mixing_weights_kernel", "grouped_matmul_kernel", "grouped_matmul_kernel",
                          "glu_forward_kernel", "grouped_matmul_kernel", "combine_rows_kernel"], fwd
    assert fwd.aten == ["moelora.dispatch_metadata"], fwd
    assert len(bwd.triton) == 12 and "mixing_weights_backward_kernel" in bwd.triton and not bwd.aten, bwd


def test_counter_skips_ops_that_launch_nothing():
    """Views, allocations and _unsafe_view (the aliasing reshape of matmul's and reshape's results,
    which autograd does not track as a view) are not counted: a 3-D x 2-D matmul is one mm
    whatever x's leading shape, so counts do not depend on it."""
    a, b = torch.randn(2, 3, 4), torch.randn(4, 5)
    with count_kernels() as counted:
        a @ b
        a.reshape(6, 4)
    assert counted.aten == ["mm"], counted


def test_counter_skips_every_allocation_and_detach_and_names_native_ops_by_namespace():
    """Fresh tensors (empty, empty_like, empty_strided, empty_permuted, new_empty, new_empty_strided, a literal's
    lift_fresh), resize_, set_, detach, is_same_size and .item() launch nothing and are not counted; every compute
    op is, in order, a moelora._C op as ``moelora.<name>`` (one kernel whatever its CUDA version uses), an aten op by
    its bare name. The ops under the counter still compute what they compute without it (keyword-only arguments
    reach them)."""
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    with count_kernels() as counted:
        torch.empty(3), torch.empty_like(x), torch.empty_strided((2, 3), (1, 2)), torch.empty_permuted((2, 3), (1, 0))
        x.new_empty(2), x.new_empty_strided((2, 2), (1, 2)), torch.tensor([1.5])
        torch.empty(2).resize_(5), torch.empty(0).set_(x.untyped_storage())
        z = x.detach()
        x.is_same_size(y)
        total = torch.add(z, y, alpha=2.0)
        total.sum().item()
        if native.HAS_C:
            torch.ops.moelora.router_topk(x, 2, 0, True)
    assert counted.aten == ["add", "sum"] + (["moelora.router_topk"] if native.HAS_C else []), counted
    torch.testing.assert_close(total, x + 2 * y)


def test_counts_total_and_text_name_both_kinds_of_kernel():
    counts = KernelCounts(triton=["lora_down_kernel"], aten=["mm", "add"])
    assert counts.total == 3
    assert str(counts) == "3 kernels (1 Triton: ['lora_down_kernel']; 2 ATen: ['mm', 'add'])"


class _FakeClock:
    """perf_counter for moelora.profiling: each call of ``fn`` advances it by the next of ``durations``; ``fn``
    records the state host_time sets up around it (threads, launch hook, denormal flushing)."""

    def __init__(self, durations, fail_at=None):
        self.now, self.durations, self.fail_at, self.seen = 100.0, list(durations), fail_at, []

    def perf_counter(self):
        return self.now

    def fn(self):
        if len(self.seen) == self.fail_at:
            raise KeyError("inside the timed call")
        self.seen.append((torch.get_num_threads(), launchers._launch_hook is launchers._skip, _subnormal_product()))
        self.now += self.durations[len(self.seen) - 1]


def _subnormal_product() -> float:
    """1e-310 (a float64 subnormal) times 1 as ATen computes it: 0.0 where subnormals are flushed."""
    return (torch.tensor([1e-310], dtype=torch.float64) * 1.0).item()


def _denormal_kept() -> bool:
    return _subnormal_product() != 0.0


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("warmup, iterations, durations, median", [
    (2, 5, [90.0, 80.0, 3.0, 1.0, 5.0, 2.0, 4.0], 3.0),  # the warmup calls' times are dropped
    (1, 4, [90.0, 4.0, 1.0, 3.0, 2.0], 3.0)],  # an even count: the upper of the two middle times
    ids=["odd", "even"])
def test_host_time_is_the_median_of_the_timed_calls_after_the_warmup(monkeypatch, two_threads, warmup, iterations,
                                                                     durations, median):
    """warmup + iterations calls, each timed alone, with Triton launches skipped, on one thread and with subnormals
    flushed to zero; the caller's thread count and (unflushed) subnormals are back afterwards."""
    clock = _FakeClock(durations)
    monkeypatch.setattr(profiling, "time", clock)
    assert profiling.host_time(clock.fn, iterations=iterations, warmup=warmup) == median
    assert len(clock.seen) == warmup + iterations
    assert torch.get_num_threads() == 2 and _denormal_kept()
    supported = torch.set_flush_denormal(False)  # (the machine flushes subnormals at all)
    assert clock.seen == [(1, True, 0.0 if supported else 1e-310)] * len(durations)
    assert launchers._launch_hook is not launchers._skip


def test_host_time_defaults_to_fifty_timed_calls_after_ten(monkeypatch):
    durations = [1000.0] * 10 + [float(i % 7 + 1) for i in range(50)]
    clock = _FakeClock(durations)
    monkeypatch.setattr(profiling, "time", clock)
    assert profiling.host_time(clock.fn) == sorted(durations[10:])[25]
    assert len(clock.seen) == 60


def test_host_time_restores_threads_and_subnormals_when_the_call_raises(monkeypatch, two_threads):
    clock = _FakeClock([1.0] * 5, fail_at=3)
    monkeypatch.setattr(profiling, "time", clock)
    with pytest.raises(KeyError, match="inside the timed call"):
        profiling.host_time(clock.fn, iterations=3, warmup=2)
    assert len(clock.seen) == 3
    assert torch.get_num_threads() == 2 and _denormal_kept()
    assert launchers._launch_hook is not launchers._skip


def test_counts_hold_the_launches_before_an_exception_of_the_block():
    """count_kernels' Triton launches are recorded when the block raises (a failing call's launches so far);
    they were dropped, the ATen ops kept."""
    (x, a, b, w), ids = _operator_inputs(T=8, d=16, r=4, E=4)
    with moelora.use_backend("triton"), moelora.validation(False):
        with pytest.raises(KeyError, match="after the forward"):
            with count_kernels() as counts:
                moelora.moe_lora(x, a, b, ids, w, scaling=0.5, regime="dense")
                raise KeyError("after the forward")
    assert counts.triton == ["lora_down_kernel", "gated_expand_kernel"], counts


def test_counts_are_real_launches():
    """The counter sees what runs: the same call without the counter launches real kernels
    (interpreter) and gives the values; with it, no kernel runs."""
    (x, a, b, w), ids = _operator_inputs()
    with moelora.use_backend("triton"):
        with count_kernels() as counted:
            moelora.moe_lora(x, a, b, ids, w, scaling=0.5, regime="dense")
    assert counted.triton == ["lora_down_kernel", "gated_expand_kernel"]


def _graph_nodes(*outputs) -> list:
    """Names of the autograd nodes between ``outputs`` and the leaves (AccumulateGrad excluded)."""
    seen, stack = set(), [t.grad_fn for t in outputs]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sorted(type(node).__name__ for node in seen if type(node).__name__ != "AccumulateGrad")


@pytest.mark.parametrize("lead", [(64,), (4, 16)], ids=["2d", "3d"])
def test_one_autograd_node_per_call(lead):
    """The operator and the fused layer each record ONE autograd node, whatever x's leading
    shape (flattening happens inside, below autograd): no view nodes for the engine to run."""
    (x, a, b, w), ids = _operator_inputs()
    x3 = x.detach().view(*lead, x.shape[-1]).requires_grad_()
    layer = moelora.MoELoRALinear(nn.Linear(64, 64), num_experts=8, top_k=2, r=16, share_lora_a=True).train()
    with moelora.use_backend("triton"), moelora.validation(False):
        with moelora.kernels.launchers.skip_launches():
            y = moelora.moe_lora(x3, a, b, ids.view(*lead, 2), w.detach().view(*lead, 2).requires_grad_(),
                                 scaling=0.5, base_out=torch.randn(*lead, 64, requires_grad=True))
            assert _graph_nodes(y) == ["_EagerMoELoRABackward"]
            y = layer(x3)
            assert y.shape == (*lead, 64)
            assert _graph_nodes(y, layer.last_aux_loss) == ["_MoELoRALinearFnBackward"]


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_ops_run_their_forward_without_autograd_function_when_grad_is_off(monkeypatch, no_grad):
    """With grad mode off (evaluation, generation) the eager ops (the fused layer's, moe_lora's,
    moe_ffn's) call their Function's forward directly (moelora.ops.registration.apply_eager):
    autograd.Function.apply's work is host time where no graph is recorded. The outputs, and the
    layer's aux loss and routing statistics, are those of the same call in grad mode."""
    import torch.nn.functional as F
    from moelora.ops import moe_ffn as moe_ffn_module
    from moelora.ops import moe_lora_linear as linear_module

    torch.manual_seed(0)
    (x, a, b, w), ids = _operator_inputs(T=16, d=32, r=4, E=4, k=2)
    layer = moelora.MoELoRALinear(nn.Linear(32, 32), num_experts=4, top_k=2, r=4, share_lora_a=True).eval()
    randomize_adapters(layer)  # B != 0: a fresh layer's zero B computes its base layer whatever the path
    ffn_params = [torch.randn(*shape, requires_grad=True) for shape in ((4, 48, 32), (4, 48), (4, 32, 48), (4, 32))]

    def calls():
        y_op = moelora.moe_lora(x, a, b, ids, w, scaling=0.5, regime="dense")
        y_ffn = moelora.moe_ffn(x, ids, w.detach(), *ffn_params, F.silu)
        y_layer = layer(x)
        stats = layer.last_router_stats
        return y_op, y_ffn, y_layer, layer.last_aux_loss, stats["load"], stats["load_balancing_loss"], stats["z_loss"]

    with moelora.use_backend("triton"), moelora.validation(False):
        with_graph = [t.detach() for t in calls()]
        assert with_graph[2].shape == (16, 32)
        assert not torch.allclose(with_graph[2], layer.base_layer(x).detach())  # the adapter acts

        def refuse(*args):
            raise AssertionError("autograd.Function.apply ran with grad mode off")

        for function in (moe_lora_module._EagerMoELoRA, moe_ffn_module._EagerMoEFFN, linear_module._MoELoRALinearFn):
            monkeypatch.setattr(function, "apply", refuse)
        with no_grad():
            without = calls()
    for got, expected in zip(without, with_graph):
        assert not got.requires_grad
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_ops_name_their_range_in_a_profiler_trace_when_grad_is_off():
    """Under torch.profiler apply_eager takes Function.apply with grad mode off too: a trace of an
    inference forward names each op's range (the Function's name) as a training one does."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    (x, a, b, w), ids = _operator_inputs(T=16, d=32, r=4, E=4, k=2)
    layer = moelora.MoELoRALinear(nn.Linear(32, 32), num_experts=4, top_k=2, r=4, share_lora_a=True).eval()
    ffn_params = [torch.randn(*shape) for shape in ((4, 48, 32), (4, 48), (4, 32, 48), (4, 32))]
    with moelora.use_backend("triton"), moelora.validation(False), torch.no_grad():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
            moelora.moe_lora(x, a, b, ids, w, scaling=0.5, regime="dense")
            moelora.moe_ffn(x, ids, w, *ffn_params, F.silu)
            layer(x)
    names = {event.name for event in trace.events()}
    assert {"_EagerMoELoRA", "_EagerMoEFFN", "_MoELoRALinearFn"} <= names


# python -m benchmarks.hostcost's layer rows (LAYER_CASES) and the counts above that the README's
# table lists: the same settings count the same kernels there.
HOSTCOST_CASES = {"softmax_topk": LAYER_SETTINGS["softmax_topk"][1], "topk_softmax": LAYER_SETTINGS["topk_softmax"][1],
                  "threshold": LAYER_SETTINGS["threshold"][1], "task": LAYER_SETTINGS["task_shared"][1],
                  "LoRA dropout 0.1": LAYER_SETTINGS["lora_dropout"][1],
                  "router jitter 0.1": LAYER_SETTINGS["jitter"][1],
                  "E 128, grouped": LAYER_SETTINGS["grouped_regime"][1],
                  "per-expert A": LAYER_SETTINGS["per_expert_a"][1],
                  "MoSLD A-dropout 0.1": LAYER_SETTINGS["mosld_a_dropout"][1], "DoRA, E 1": 17,
                  "DoRA, E 1, LoRA dropout 0.1": COMPOSED_SETTINGS["dora_with_lora_dropout"][2]}


def _hostcost():
    """benchmarks.hostcost (the repository root, which holds benchmarks/, put on the path)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import hostcost
    return hostcost


@native_routing
def test_hostcost_counts_the_budgets_kernels():
    hostcost = _hostcost()
    assert set(HOSTCOST_CASES) == set(hostcost.LAYER_CASES)
    cpu, (_, T, d) = torch.device("cpu"), hostcost._sizes(torch.device("cpu"))
    counted = {}
    for case, (settings, _) in hostcost.LAYER_CASES.items():
        torch.manual_seed(0)
        layer = hostcost._layer(cpu, torch.float32, d, **settings)
        if case == "task":
            moelora.set_task_ids(nn.Sequential(layer), torch.arange(T) % 8)
        step = hostcost._training_step(layer, torch.randn(T, d, requires_grad=True), torch.randn(T, d))
        with moelora.use_backend("triton"), moelora.validation(False):
            with count_kernels():
                step()
            with count_kernels() as counts:
                step()
        counted[case] = counts.total
    assert counted == HOSTCOST_CASES


@pytest.mark.parametrize("previous", [None, "0"])
def test_hostcost_puts_back_the_triton_interpreter_switch(monkeypatch, previous):
    """On a CPU hostcost runs moelora's Triton path through the interpreter switch, set for its block only."""
    import os

    hostcost = _hostcost()
    if previous is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", previous)
    with hostcost._triton_backend(torch.device("cpu")):
        assert os.environ["TRITON_INTERPRET"] == "1" and current_backend() == "triton"
    assert os.environ.get("TRITON_INTERPRET") == previous


def test_hostcost_records_the_kernels_of_a_steady_call():
    """A row counts a call after a first one (which fills what is cached per process, here one extra ATen op):
    kernels = Triton launches + ATen ops."""
    hostcost = _hostcost()
    (x, a, b, w), ids = _operator_inputs(T=8, d=16, r=4, E=4)
    first = []

    def step():
        if not first:
            first.append(torch.exp(x))
        return moelora.moe_lora(x, a, b, ids, w, regime="dense") + 1  # an ATen op beside the Triton launches

    out = []
    with hostcost._triton_backend(torch.device("cpu")):
        hostcost._record("row", step, out, "note")
        with count_kernels() as steady:
            step()
    (row,) = out
    assert (row["case"], row["note"], row["triton"], row["aten"]) == ("row", "note", len(steady.triton),
                                                                      len(steady.aten))
    assert row["triton"] > 0 and row["aten"] > 0 and row["kernels"] == steady.total and row["host_us"] > 0


def test_hostcost_training_step_differentiates_the_aux_loss():
    """A row's training step seeds the gradient of the aux loss the forward recorded (last_aux_loss), as a
    training step's loss holds it: its backward is counted and timed."""
    hostcost = _hostcost()
    seeds = []

    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.randn(4))

        def forward(self, x):
            self.last_aux_loss = (self.p * self.p).sum()
            self.last_aux_loss.register_hook(seeds.append)
            return x * self.p

    hostcost._training_step(Module(), torch.randn(3, 4, requires_grad=True), torch.randn(3, 4))()
    assert [float(g) for g in seeds] == [1.0]


# A layer holding an aux-loss mask (moelora.set_aux_loss_mask): the kernels without it, its unmasked aux loss's launch
# (a program of the gated expand, or router_aux_loss_kernel) replaced by masked_router_aux_loss_kernel, and the masked
# loss's gradient (masked_router_aux_loss_backward_kernel) added to the routing's d logits: today's counts.
MASKED_SETTINGS = {"dense": ({}, 11), "threshold": (dict(router="threshold", top_k=3, threshold_eps=0.2), 13),
                   "grouped_regime": (dict(num_experts=128), 16)}


@native_routing
@pytest.mark.parametrize("feature", list(MASKED_SETTINGS))
def test_aux_loss_mask_kernel_budget(feature):
    settings, today = MASKED_SETTINGS[feature]
    counts = []
    for masked in (False, True):
        torch.manual_seed(0)
        layer = moelora.MoELoRALinear(nn.Linear(64, 64),
                                      **{**dict(num_experts=8, top_k=2, r=16, share_lora_a=True), **settings}).train()
        layer.base_layer.requires_grad_(False)
        if masked:
            moelora.set_aux_loss_mask(layer, torch.arange(64).reshape(2, 32) % 10 != 9)
        counts.append(_count_training_step(layer, torch.randn(2, 32, 64, requires_grad=True)))
    (fwd, bwd), (masked_fwd, masked_bwd) = counts
    assert masked_fwd.total + masked_bwd.total <= today, f"forward {masked_fwd}\nbackward {masked_bwd}"
    unmasked = [k for k in fwd.triton + bwd.triton if k != "router_aux_loss_kernel"]
    assert [k for k in masked_fwd.triton + masked_bwd.triton if not k.startswith("masked_")] == unmasked
    assert masked_fwd.aten == fwd.aten and masked_bwd.aten == bwd.aten  # no pass over x more, no PyTorch ops


# MoELoRALinear's eval forward on the PyTorch backend at 8 tokens (decoding: a batch of 8 sequences adding
# a token each), under torch.inference_mode: ATen ops per feature, today's. The base and router GEMMs, the
# routing op, the router's aux loss (8 small ops), then moelora.moe_lora's gathered form (the chosen experts'
# matrices only, no check that reads the routing on the host, no isfinite pass over B): 42 ops before it.
TORCH_DECODE_SETTINGS = {
    "softmax_topk": ({}, 20),
    "topk_softmax": (dict(router="topk_softmax"), 20),
    "per_expert_a": (dict(share_lora_a=False), 23),
    "threshold": (dict(router="threshold", threshold_eps=0.2), 33),
    "task": (dict(router="task"), 11),
}


@native_routing
@pytest.mark.parametrize("feature", list(TORCH_DECODE_SETTINGS))
def test_torch_backend_decode_op_budget(feature):
    settings, today = TORCH_DECODE_SETTINGS[feature]
    torch.manual_seed(0)
    layer = moelora.MoELoRALinear(nn.Linear(64, 64), **{**dict(num_experts=8, top_k=2, r=16, share_lora_a=True,
                                                               init_lora_weights=False), **settings}).eval()
    if feature == "task":
        moelora.set_task_ids(nn.Sequential(layer), torch.arange(8))
    x = torch.randn(8, 1, 64)
    with moelora.use_backend("torch"), torch.inference_mode():
        layer(x)
        with count_kernels() as fwd:
            layer(x)
    assert not fwd.triton and fwd.total <= today, fwd
    assert "isfinite" not in fwd.aten and "aminmax" not in fwd.aten, fwd  # no syncing check of the routing
    assert "index_select" in fwd.aten, fwd  # the gathered form


# Layers whose routing moelora makes (a learned router's, or task ids checked where their routing is built) read
# nothing on the host, with moelora.validation on as by default: on a GPU each read is a device sync per layer
# and call. The composed paths (a hooked or quantised base, DoRA with LoRA dropout), the convolution and
# embedding layers and MoEFFN ran moelora.moe_lora's / moe_ffn's syncing check of the routing on every forward.
def _hooked(layer):
    layer.base_layer.register_forward_hook(lambda module, inputs, output: None)
    return layer


HOST_READ_FREE_LAYERS = {
    "linear_fused": lambda: moelora.MoELoRALinear(nn.Linear(16, 16), num_experts=4, top_k=2, r=4),
    "linear_composed": lambda: _hooked(moelora.MoELoRALinear(nn.Linear(16, 16), num_experts=4, top_k=2, r=4)),
    "linear_dora_dropout": lambda: moelora.MoELoRALinear(nn.Linear(16, 16), num_experts=1, top_k=1, r=4,
                                                         use_dora=True, lora_dropout=0.1),
    "linear_task": lambda: moelora.MoELoRALinear(nn.Linear(16, 16), num_experts=4, r=4, router="task"),
    "linear_task_composed": lambda: _hooked(moelora.MoELoRALinear(nn.Linear(16, 16), num_experts=4, r=4,
                                                                  router="task", task_shared_lora=True)),
    "conv_3x3": lambda: moelora.MoELoRAConv(nn.Conv2d(4, 4, 3, padding=1), num_experts=4, top_k=2, r=2),
    "conv_1x1": lambda: moelora.MoELoRAConv(nn.Conv2d(4, 4, 1), num_experts=4, top_k=2, r=2),
    "embedding": lambda: moelora.MoELoRAEmbedding(nn.Embedding(16, 16), num_experts=4, top_k=2, r=4),
    "moe_ffn": lambda: moelora.MoEFFN(nn.Linear(16, 32), nn.Linear(32, 16), nn.functional.silu, 4, 2,
                                      gate_proj=nn.Linear(16, 32), router="softmax_topk"),
}


# (moe_ffn's torch backend loops over the experts' row segments, whose bounds it reads: documented, left out)
@pytest.mark.parametrize("kind,backend", [(kind, backend) for kind in HOST_READ_FREE_LAYERS
                                          for backend in ("torch", "triton")
                                          if (kind, backend) != ("moe_ffn", "torch")])
def test_layers_read_nothing_on_the_host_with_validation_on(kind, backend, monkeypatch):
    torch.manual_seed(0)
    layer = HOST_READ_FREE_LAYERS[kind]().train()
    model = nn.Sequential(layer)
    if kind.startswith("linear_task"):
        moelora.set_task_ids(model, torch.tensor([3, 1]))  # its routing is built (and checked) once
    x = (torch.randint(0, 16, (2, 5)) if kind == "embedding" else
         torch.randn(2, 4, 6, 6) if kind.startswith("conv") else torch.randn(2, 5, 16, requires_grad=True))

    def step():
        out = model(x)
        aux = layer.last_aux_loss
        (out.float().square().sum() + (0 if aux is None else aux)).backward()

    def host_read(*args, **kwargs):
        raise AssertionError("a value was read on the host")

    with moelora.use_backend(backend), moelora.validation(True), moelora.kernels.launchers.skip_launches():
        step()
        for name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, host_read)
        step()
        monkeypatch.undo()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
