"""Routers (moelora.ops.routing_modes) and the auxiliary losses (moelora.ops.losses)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import moelora
from conftest import DEVICE
from helpers import float_args_as_float32, rel_err
from moelora.ops.losses import expert_load, load_balancing_loss, router_z_loss, routing_entropy
from moelora.modules.router import Router
from moelora.ops.routing_modes import softmax_topk, task_routing, threshold_routing, topk_softmax


def _logits(t=64, e=6, seed=0):
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed)) * 2


def test_softmax_topk_renormalised_and_not():
    logits = _logits()
    probs = torch.softmax(logits, -1)
    r = softmax_topk(logits, 2)
    ref_p, ref_ids = probs.topk(2, dim=-1)
    assert torch.equal(r.ids, ref_ids)
    torch.testing.assert_close(r.weights, ref_p / ref_p.sum(-1, keepdim=True))
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(64))
    torch.testing.assert_close(softmax_topk(logits, 2, renormalize=False).weights, ref_p)


def test_topk_softmax_is_mixtral_gate():
    logits = _logits()
    r = topk_softmax(logits, 3)
    top, ids = logits.topk(3, dim=-1)
    assert torch.equal(r.ids, ids)
    torch.testing.assert_close(r.weights, torch.softmax(top, -1))


def test_logits_computed_in_fp32_for_half_inputs():
    router = Router(8, 4, 2)
    r = router(torch.randn(3, 8, dtype=torch.bfloat16))
    assert r.logits.dtype == torch.float32 and r.weights.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "threshold"])
def test_route_logits_of_half_logits_routes_and_returns_their_fp32_copy(mode, dtype):
    """route_logits of half-precision logits (a caller's, not a Router's) routes their fp32 copy and returns it as
    the Routing's logits (the z-loss and probs read them), as it does the fp32 logits themselves."""
    from moelora.ops.routing_modes import route_logits

    logits = (torch.randn(16, 6, dtype=torch.float64) * 2).to(dtype)
    got = route_logits(logits, mode, 3, eps=0.2)
    expected = route_logits(logits.float(), mode, 3, eps=0.2)
    assert got.logits.dtype == torch.float32 and torch.equal(got.logits, logits.float())
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float64])
def test_router_weight_is_made_in_fp32_whatever_the_default_dtype(default):
    """The router's weight is created in fp32 (its logits are fp32), not in the default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        router = Router(8, 4, 2)
    finally:
        torch.set_default_dtype(previous)
    assert router.weight.dtype == torch.float32


BAD_ROUTER_INPUTS = {
    "wider": (lambda: torch.randn(3, 9), ValueError, r"^x must have shape \[\.\.\., d_in = 8\], got \(3, 9\)$"),
    "narrower": (lambda: torch.randn(3, 7), ValueError, r"^x must have shape \[\.\.\., d_in = 8\], got \(3, 7\)$"),
    "0-d": (lambda: torch.randn(()), ValueError, r"^x must have shape \[\.\.\., d_in = 8\], got \(\)$"),
    "int": (lambda: torch.randint(0, 3, (3, 8)), TypeError, r"^x must be float16, bfloat16, float32 or float64, got "
                                                            r"torch.int64$"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(BAD_ROUTER_INPUTS))
def test_router_refuses_inputs_of_another_width_or_dtype(case, backend):
    """Router (MoEFFN's gate, and any user's): its logits kernel (Triton backend) read x with x's width
    and the weight's strides, so an x of another width gave logits of wrong columns (reading past the
    weight's end for a wider x) without an error; an integer x raised KeyError there, and a 0-d x an
    IndexError on both backends. Each now raises naming x, on both backends."""
    make, error, match = BAD_ROUTER_INPUTS[case]
    router = Router(8, 4, 2)
    with moelora.use_backend(backend), pytest.raises(error, match=match):
        router(make())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("default", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["jitter", "threshold", "ffn_threshold"])
def test_router_noise_is_drawn_in_fp32_whatever_the_default_dtype(kind, default, backend):
    """Router jitter's factors and threshold routing's uniform draws are fp32 (the same noise for
    the same seed whatever x's dtype): they were drawn in the default dtype, so under
    torch.set_default_dtype(torch.bfloat16) jitter of 0.01 took a handful of values and the threshold
    draws bf16's coarse steps, and the same seed gave other routing and outputs than under the fp32
    default (fp64 too).
    MoELoRALinear (fused op) and MoEFFN (Router.forward), training forwards."""
    torch.manual_seed(0)
    if kind == "ffn_threshold":
        module = moelora.MoEFFN(nn.Linear(12, 6), nn.Linear(6, 12), torch.nn.functional.silu, 4, 3,
                                router="threshold", threshold_eps=0.3)
    else:
        extra = dict(router_jitter_noise=0.01) if kind == "jitter" else dict(router="threshold", threshold_eps=0.3)
        module = moelora.MoELoRALinear(nn.Linear(12, 10), num_experts=4, top_k=3 if extra.get("router") else 2, r=4,
                                       init_lora_weights=False, **extra)
    module.train()
    x = torch.randn(16, 12)

    def run():
        torch.manual_seed(5)
        with moelora.use_backend(backend):
            return module(x), module.last_router_stats["load"]

    expected = run()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = run()
        noise = module.router.threshold_noise(3, x.device)
        assert module.router.jitter_factors(x).dtype == torch.float32
        assert noise is None or noise.dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_router_logits_kernel_matches_float64_without_an_fp32_copy_of_x(dtype):
    """Where the Triton kernels run, one kernel computes the logits from x in its own dtype
    (fp32 accumulation; for bf16 x, bf16 products of the fp32 weight's three bf16 pieces) and
    the backward is two matmuls: logits, dx and dW as float64 within fp32's rounding of the
    inputs (the weight not rounded to x's dtype), and nothing of x's size saved in fp32."""
    router = Router(48, 6, 2, device=DEVICE)
    x = torch.randn(37, 48, device=DEVICE).to(dtype).requires_grad_()
    saved = []
    with moelora.use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        logits = router.logits(x)
    assert type(logits.grad_fn).__name__ == "_RouterLogitsFnBackward" and logits.dtype == torch.float32
    copies = [t for t in saved if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()]
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in copies)
    g = torch.randn_like(logits)
    with moelora.use_backend("triton"):
        dx, dw = torch.autograd.grad(logits, [x, router.weight], g)
    x64, w64 = x.detach().double().requires_grad_(), router.weight.detach().double().requires_grad_()
    ref = x64 @ w64.t()
    dx_ref, dw_ref = torch.autograd.grad(ref, [x64, w64], g.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]  # dx is rounded to x's dtype
    assert rel(logits, ref) < 2e-6 and rel(dw, dw_ref) < 2e-6 and rel(dx, dx_ref) < tol
    assert dx.dtype == dtype and dw.dtype == torch.float32


@pytest.mark.parametrize("needs", ["x", "weight"])
def test_router_logits_kernel_of_a_half_weight_and_fp32_x_keeps_fp32_gradients(needs):
    """The router kernel's backward with a half weight (``router.half()``) and fp32 x: dx is x's dtype and
    multiplied as such (not rounded to the weight's dtype), dW the weight's; each only where it is needed
    (x without gradients still trains the weight, a frozen weight still passes dx)."""
    router = Router(48, 6, 2, device=DEVICE).half()
    router.weight.requires_grad_(needs == "weight")
    x = torch.randn(37, 48, device=DEVICE).requires_grad_(needs == "x")
    with moelora.use_backend("triton"):
        logits = router.logits(x)
        assert type(logits.grad_fn).__name__ == "_RouterLogitsFnBackward" and logits.dtype == torch.float32
        g = torch.randn_like(logits)
        (grad,) = torch.autograd.grad(logits, [x if needs == "x" else router.weight], g)
    x64, w64 = x.detach().double(), router.weight.detach().double()
    ref = g.double() @ w64 if needs == "x" else g.double().t() @ x64
    assert grad.dtype == (torch.float32 if needs == "x" else torch.float16)
    assert rel_err(grad.double(), ref) < (2e-6 if needs == "x" else 1e-3)


def test_threshold_eps_zero_keeps_all_top_n():
    logits = _logits()
    r = threshold_routing(logits, 3, eps=0.0, training=True)
    top, _ = torch.softmax(logits, -1).topk(3, dim=-1)
    torch.testing.assert_close(r.weights, top / top.sum(-1, keepdim=True))
    assert bool((r.weights > 0).all())


@pytest.mark.parametrize("eps", [0.3, 0.6])
def test_threshold_eval_is_deterministic_and_keeps_best(eps):
    """eps 0.6 is above some tokens' best p_hat (>= 1/3 of 3 slots, so eps 0.3 never is): kept anyway."""
    logits = _logits()
    a = threshold_routing(logits, 3, eps=eps, training=False)
    b = threshold_routing(logits, 3, eps=eps, training=False)
    assert torch.equal(a.weights, b.weights)
    p_hat = torch.softmax(logits, -1).topk(3, dim=-1).values
    p_hat = p_hat / p_hat.sum(-1, keepdim=True)
    expected_keep = p_hat >= eps
    expected_keep[:, 0] = True
    assert torch.equal(a.weights > 0, expected_keep)
    torch.testing.assert_close(a.weights.sum(-1), torch.ones(64))


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float-eps", "tensor-eps"])
def test_threshold_eval_keeps_a_slot_whose_p_hat_equals_eps(as_tensor):
    """At eval a slot is kept iff p_hat >= eps: equal logits give p_hat 0.25 exactly, eps 0.25 keeps all four."""
    eps = torch.tensor(0.25) if as_tensor else 0.25
    r = threshold_routing(torch.zeros(2, 4), 4, eps=eps, training=False)
    assert torch.equal(r.weights, torch.full((2, 4), 0.25))


@pytest.mark.parametrize("eps", [0.0, -0.0, -0.25])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_threshold_keeps_every_top_n_slot_while_a_tensor_eps_is_at_most_zero(eps, training):
    """threshold_keep keeps every slot while eps <= 0, a 0-d tensor eps as a float one: for a tensor eps of -0.0
    or below p_hat / eps is <= 0 in training, below no uniform draw (only the best slot would be kept)."""
    from moelora.ops.routing_modes import threshold_keep

    top_p = torch.softmax(torch.randn(32, 6, dtype=torch.float64), -1).topk(3, dim=-1).values
    noise = torch.rand(32, 3, dtype=torch.float64) if training else None
    expected = top_p / top_p.sum(-1, keepdim=True)
    for e in (eps, torch.tensor(eps, dtype=torch.float64)):
        torch.testing.assert_close(threshold_keep(top_p, e, noise), expected, rtol=1e-14, atol=0)


def test_router_ramp_ending_at_eps_end_minus_zero_keeps_every_top_n_slot_in_training():
    """eps_end = -0.0 passes the router's eps >= 0 check; from the ramp's end on the scheduled eps is a tensor
    -0.0, with which training kept every top-n slot as at eps 0 (not the best one only)."""
    router = Router(8, 6, 3, mode="threshold", eps_start=0.5, eps_end=-0.0, eps_ramp_steps=1).double().train()
    router.step()
    x = torch.randn(32, 8, dtype=torch.float64)
    top = torch.softmax(router.logits(x), -1).topk(3, dim=-1).values
    torch.testing.assert_close(router(x).weights, top / top.sum(-1, keepdim=True), rtol=1e-12, atol=0)


def test_threshold_training_draws_from_the_given_generator():
    """The keep draws come from ``generator`` (reproducible), not from torch's global generator."""
    logits = _logits()
    state = torch.get_rng_state()
    a = threshold_routing(logits, 3, eps=0.6, training=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    b = threshold_routing(logits, 3, eps=0.6, training=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.weights, b.weights)


def test_threshold_training_keeps_with_probability_p_over_eps():
    # Every token: p_hat of the second expert is 1/(1+e) ~ 0.269; eps = 0.538 -> kept half the time.
    n = 4000
    logits = torch.tensor([[1.0, 0.0, -20.0]]).repeat(n, 1)
    p2 = 1 / (1 + math.e)
    r = threshold_routing(logits, 2, eps=2 * p2, training=True, generator=torch.Generator().manual_seed(0))
    kept = (r.weights[:, 1] > 0).float().mean().item()
    assert abs(kept - 0.5) < 0.04
    assert bool((r.weights[:, 0] > 0).all())


def test_router_draws_threshold_noise_only_in_training_with_an_eps_that_can_be_positive():
    """Router.forward (MoEFFN's) draws threshold routing's [T, top_k] fp32 uniforms in training where eps can be
    > 0 (eps_end > 0, or a ramp: from eps_start 0.5 down to an eps_end of 0 too) and routes with them; eval
    routes deterministically without them, and an eps of 0 throughout (every top-n slot kept) leaves the RNG."""
    from moelora.ops.routing_modes import route_logits

    x = torch.randn(64, 8)
    router = Router(8, 4, 3, mode="threshold", eps_start=0.5, eps_end=0.0, eps_ramp_steps=10).train()
    torch.manual_seed(3)
    noise = router.threshold_noise(64, x.device)
    assert noise is not None and noise.shape == (64, 3) and noise.dtype == torch.float32
    torch.manual_seed(3)
    got = router(x)
    expected = route_logits(router.logits(x), "threshold", 3, True, router.scheduled_eps(), noise)
    assert torch.equal(got.weights, expected.weights) and bool((got.weights == 0).any())
    for r in (router.eval(), Router(8, 4, 3, mode="threshold").train()):
        state = torch.get_rng_state()
        assert r.threshold_noise(64, x.device) is None
        got = r(x)
        assert torch.equal(torch.get_rng_state(), state)
        expected = route_logits(r.logits(x), "threshold", 3, True, r.scheduled_eps(), None)
        assert torch.equal(got.weights, expected.weights)


def test_threshold_schedule_is_linear_and_stepped_by_trainer():
    router = Router(4, 4, 2, mode="threshold", eps_start=0.0, eps_end=0.2, eps_ramp_steps=10)
    assert router.eps == 0.0
    model = torch.nn.Sequential(router)
    moelora.step_routers(model, 5)
    assert router.eps == pytest.approx(0.1)
    moelora.step_routers(model, 50)
    assert router.eps == pytest.approx(0.2)


@pytest.mark.parametrize("start, end, ramp", [(0.7, 0.1, 7), (0.1, 0.7, 7), (0.05, 0.35, 49), (0.3, 0.1, 3),
                                              (0.1, 0.3, 1), (0.1, 0.3, 0)])
def test_threshold_schedule_follows_the_formula_and_ends_exactly_at_eps_end(start, end, ramp):
    """eps = start + (end - start) * steps / ramp (float64 on the host, fp32 on the device), monotone, within
    [start, end] and exactly end from step ramp on: 0.7 + (0.1 - 0.7) * 1 is 0.09999999999999998 in float64, and
    its fp32 twin 0.09999996 (not fp32(0.1)): the schedule ended past eps_end."""
    router = Router(4, 4, 2, mode="threshold", eps_start=start, eps_end=end, eps_ramp_steps=ramp)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)
    host, device = [], []
    for steps in range(ramp + 11):
        host.append(router.eps)
        device.append(torch.as_tensor(router.scheduled_eps(), dtype=torch.float32))
        if steps in (0, 1, ramp // 2) and steps < ramp:
            assert host[-1] == start + (end - start) * (steps / ramp)
        router.step()
    for eps in host[ramp:]:
        assert eps == end
    for eps in device[ramp:]:
        assert torch.equal(eps, f32(end))
    lo, hi = min(start, end), max(start, end)
    assert all(lo <= eps <= hi for eps in host) and all(f32(lo) <= eps <= f32(hi) for eps in device)
    sign = 1 if end >= start else -1
    assert all(sign * (b - a) >= 0 for a, b in zip(host, host[1:]))
    assert all(sign * (b - a) >= 0 for a, b in zip(device, device[1:]))


@pytest.mark.parametrize("n", [0.5, True, -1, "2", None, 2 ** 63 - 1])
def test_router_steps_are_non_negative_ints(n):
    router = Router(4, 4, 2, mode="threshold", eps_start=0.0, eps_end=0.2, eps_ramp_steps=10)
    for step in (router.step, lambda n: moelora.step_routers(torch.nn.Sequential(), n)):  # (no router there)
        with pytest.raises(ValueError, match="n must be a non-negative int"):
            step(n)
    router.step(0)  # no step: allowed, counts nothing
    router.step(np.int64(3))
    router.step(2 ** 32)  # the most one call adds: the int64 counter cannot wrap around to a negative count
    assert int(router.num_steps) == 3 + 2 ** 32 and router.eps == 0.2


def test_task_routing_broadcasts_per_example_ids_and_adds_shared_expert():
    gamma = torch.tensor([0.5, -1.0, 2.0])
    r = task_routing(torch.tensor([2, 0]), gamma, (2, 3))
    assert r.ids.tolist() == [[2]] * 3 + [[0]] * 3
    assert r.weights.flatten().tolist() == [2.0] * 3 + [0.5] * 3
    r = task_routing(1, gamma, (4,), shared_expert=3)
    assert r.ids.tolist() == [[1, 3]] * 4
    assert r.weights.tolist() == [[-1.0, 1.0]] * 4
    with pytest.raises(ValueError, match="task ids of shape"):
        task_routing(torch.tensor([0, 1, 2]), gamma, (2, 3))


def test_task_routing_reuse_keeps_apart_the_routings_with_and_without_a_shared_expert():
    """One task-id tensor routed without a shared expert, then with one (and another): each gets its own ids,
    not those built for the other (k = 1 ids with k = 2 weights, or the other shared expert's id)."""
    gamma = torch.randn(3, dtype=torch.float64)
    tasks = torch.randint(0, 3, (2,))
    per_token = tasks.repeat_interleave(3).unsqueeze(1)
    for shared in (None, 3, 4, None):
        r = task_routing(tasks, gamma, (2, 3), shared_expert=shared)
        expected = per_token if shared is None else torch.cat([per_token, torch.full_like(per_token, shared)], 1)
        assert torch.equal(r.ids, expected)
        assert r.weights.shape == expected.shape and torch.equal(r.weights[:, 0], gamma[per_token[:, 0]])


def test_task_routing_reuse_keeps_apart_the_routings_of_gammas_of_other_accumulator_dtypes():
    """One task-id tensor routed with a float32 gamma, then a float64 one (a model converted with .double()),
    then a bfloat16 one: each gets gamma[task] in its accumulator dtype (float64 for float64, float32 else),
    not the one-hot matrix built in the other dtype (a matmul of mixed dtypes)."""
    ids = torch.randint(0, 4, (3,))
    gamma64 = torch.randn(4, dtype=torch.float64)
    for gamma, dtype in [(gamma64.float(), torch.float32), (gamma64, torch.float64),
                         (gamma64.bfloat16(), torch.float32)]:
        weights = task_routing(ids, gamma, (3, 2)).weights
        assert weights.dtype == dtype
        want = gamma.double()[ids].repeat_interleave(2).unsqueeze(1)
        assert rel_err(weights.double(), want) == 0


def test_task_routing_reused_after_an_inference_mode_forward_trains():
    """Task ids set once, a forward under torch.inference_mode (evaluation, generation), then a
    training step: what the first forward kept for the task-id tensor must not be inference
    tensors, which the training forward could not save for backward."""
    gamma = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    tasks = torch.tensor([2, 0])
    with torch.inference_mode():
        task_routing(tasks, gamma, (2, 3))
    routing = task_routing(tasks, gamma, (2, 3))
    assert not routing.ids.is_inference()
    (grad,) = torch.autograd.grad(routing.weights.sum(), gamma)
    assert grad.tolist() == [3.0, 0.0, 3.0]
    layer = moelora.MoELoRALinear(torch.nn.Linear(4, 4), num_experts=3, router="task", r=2)
    moelora.set_task_ids(layer, torch.tensor([1, 2]))
    x = torch.randn(2, 3, 4)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()
    assert layer.lora_gamma.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["int", "per_example_host_tensor"])
def test_gpu_task_ids_given_on_the_host_train_without_a_host_sync(kind):
    """Multi-task training with the batch's task ids given on the host (an int, or a CPU tensor
    from the data loader), validation off: setting them and a forward + backward of task-routed
    layers never wait for the device (their copy to the device is not a synchronising one)."""
    layers = [moelora.MoELoRALinear(torch.nn.Linear(64, 64), num_experts=4, router="task", r=8,
                                    task_shared_lora=True) for _ in range(2)]
    model = torch.nn.Sequential(*layers).cuda()
    x = torch.randn(3, 16, 64, device="cuda")

    def step(task):
        moelora.set_task_ids(model, task if kind == "int" else torch.tensor([task, (task + 1) % 4, 0]))
        model(x).square().sum().backward()

    with moelora.validation(False):
        step(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(1)
            step(2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(layer.lora_gamma.grad is not None for layer in layers)


def test_task_routing_reuses_the_ids_of_a_task_id_tensor_until_it_changes():
    """Layers routing by the same task-id tensor build its ids and one-hot matrix once; gamma's
    weights (and gradient) are computed per call; an in-place change of the ids, a validation
    switched on after an unchecked build, or another lead shape builds them again."""
    from moelora.ops import routing_modes

    gamma = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    tasks = torch.tensor([2, 0])
    first, second = task_routing(tasks, gamma, (2, 3)), task_routing(tasks, gamma, (2, 3))
    assert second.ids is first.ids and second.weights is not first.weights
    (grad,) = torch.autograd.grad(second.weights.sum(), gamma)
    assert grad.tolist() == [3.0, 0.0, 3.0]
    tasks[1] = 1  # in place: the version counter moves
    changed = task_routing(tasks, gamma, (2, 3))
    assert changed.ids.flatten().tolist() == [2] * 3 + [1] * 3
    assert changed.weights.flatten().tolist() == [2.0] * 3 + [-1.0] * 3
    assert task_routing(tasks, gamma, (2, 4)).ids.shape == (8, 1)
    bad = torch.tensor([5])
    with moelora.validation(False):
        assert task_routing(bad, gamma, (1,)).weights.tolist() == [[0.0]]  # out of range: weight 0
    with pytest.raises(ValueError, match="task ids must lie in"):
        task_routing(bad, gamma, (1,))
    kept = [torch.tensor([i % 3]) for i in range(10)]
    for t in kept:
        task_routing(t, gamma, (1,))
    assert len(routing_modes._TASK_ROUTING) <= routing_modes._TASK_ROUTING_TENSORS
    for length in range(1, 11):  # held while the sequence grows (generate without a KV cache): bounded too
        assert task_routing(tasks, gamma, (2, length)).ids.flatten().tolist() == [2] * length + [1] * length
    assert len(routing_modes._TASK_ROUTING[tasks]) <= routing_modes._TASK_ROUTING_SHAPES


@pytest.mark.parametrize("edge", [3, -1])
def test_task_ids_just_outside_the_tasks_raise(edge):
    """A task-id tensor holding num_tasks (the first id past the last task) or -1 raises, naming the range;
    it was not routed with a weight of 0."""
    gamma = torch.tensor([0.5, -1.0, 2.0])
    values = rf"\[{min(edge, 0)}, {max(edge, 0)}\]"
    with pytest.raises(ValueError, match=rf"^task ids must lie in \[0, 3\), got values in {values}$"):
        task_routing(torch.tensor([0, edge]), gamma, (2,))


@pytest.mark.parametrize("edge", [3, -1])
def test_int_task_id_outside_the_tasks_raises_with_validation_off(edge):
    """An int task id is a host value: checked whatever moelora.validation says (it was not routed with weight 0)."""
    with moelora.validation(False), pytest.raises(ValueError, match=rf"^task id must be in \[0, 3\), got {edge}$"):
        task_routing(edge, torch.tensor([0.5, -1.0, 2.0]), (2,))


@pytest.mark.parametrize("ids", [True, torch.tensor([True, False])], ids=["bool", "bool-tensor"])
def test_bool_task_ids_are_refused(ids):
    """A bool (or a bool mask) is not a task id: it was routed as task 1 / 0."""
    with pytest.raises(TypeError, match=r"^task ids must be"):
        task_routing(ids, torch.tensor([0.5, -1.0, 2.0]), (2,))


def test_task_routing_evicts_from_two_threads_at_once(monkeypatch):
    """Forwards in two threads (nn.DataParallel's replicas, two models served at once) with new task-id tensors
    both evicted the cache's oldest entry: the second ``del`` raised a KeyError. Here the other thread evicts
    while this one is between choosing the oldest entry and deleting it."""
    import threading

    from torch.utils.weak import WeakIdKeyDictionary

    from moelora.ops import routing_modes

    gamma = torch.tensor([0.5, -1.0, 2.0])
    kept = [torch.tensor([i % 3, 2]) for i in range(routing_modes._TASK_ROUTING_TENSORS + 2)]
    errors, threads = [], []

    def route(tasks):
        try:
            assert task_routing(tasks, gamma, (2,)).ids.flatten().tolist() == tasks.tolist()
        except Exception as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(error)

    class Racing(WeakIdKeyDictionary):
        def keys(self):
            oldest = next(iter(super().keys()))
            if not threads:  # as another thread would, once
                threads.append(threading.Thread(target=route, args=(kept[-1],)))
                threads[0].start()
                threads[0].join(timeout=2.0)  # it waits for this thread's eviction, where it must
            return iter([oldest])

    cache = Racing()
    monkeypatch.setattr(routing_modes, "_TASK_ROUTING", cache)
    for tasks in kept[:-1]:
        route(tasks)
    threads[0].join()
    assert not errors and len(cache) <= routing_modes._TASK_ROUTING_TENSORS


def test_task_routing_sees_task_ids_given_other_memory_through_data():
    """``ids.data = new`` gives the task-id tensor other memory without moving its version counter:
    the reused routing was the old ids' (ids and gamma's weights of tasks no longer given)."""
    gamma = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    tasks = torch.tensor([2, 0])
    task_routing(tasks, gamma, (2, 3))
    tasks.data = torch.tensor([1, 1])
    routing = task_routing(tasks, gamma, (2, 3))
    assert routing.ids.flatten().tolist() == [1] * 6
    assert routing.weights.flatten().tolist() == [-1.0] * 6


def test_task_routing_under_a_fake_tensor_mode_leaves_the_eager_forwards_after_it_real():
    """A forward under a FakeTensorMode (memory / shape estimation tools run one) builds the task
    routing of the layers' real task-id tensor as fake tensors: reused, they made every eager forward
    after it return a fake tensor (with validation off; with it on, the unchecked entry was rebuilt)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    torch.manual_seed(0)
    layer = moelora.MoELoRALinear(nn.Linear(16, 8), num_experts=3, router="task", r=4).double()
    nn.init.normal_(layer.lora_B)
    nn.init.normal_(layer.lora_gamma)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    moelora.set_task_ids(layer, torch.tensor([2, 0]))
    with moelora.validation(False):
        expected = layer(x)
        moelora.set_task_ids(layer, torch.tensor([2, 0]))  # the first forward of these ids runs under the mode
        with FakeTensorMode(allow_non_fake_inputs=True):
            assert isinstance(layer(torch.randn(2, 5, 16, dtype=torch.float64)), FakeTensor)
        y = layer(x)
    assert type(y) is torch.Tensor
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_task_ids_refilled_in_place_before_backward_train_as_the_forward_routed(backend, id_dtype):
    """A training loop that writes the next batch's ids into the task-id tensor (``copy_``) before the
    backward of this one: the gradients are those of the forward's ids, on every backend and id dtype
    (the reused ids were a view of int64 per-token ids on the layer's device, which the Triton
    backend's op saved for backward: autograd then refused the backward)."""
    torch.manual_seed(0)
    layer = moelora.MoELoRALinear(nn.Linear(16, 12), num_experts=3, router="task", r=4).double()
    nn.init.normal_(layer.lora_B)
    nn.init.normal_(layer.lora_gamma)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    tasks = torch.randint(0, 3, (2, 5), dtype=id_dtype)
    forward_tasks = tasks.clone()
    ref = copy.deepcopy(layer)
    moelora.set_task_ids(ref, forward_tasks)
    with moelora.use_backend("torch"):
        ref(x).square().sum().backward()
    moelora.set_task_ids(layer, tasks)
    with moelora.use_backend(backend):
        y = layer(x)
        tasks.copy_((forward_tasks + 1) % 3)  # the next batch's ids
        y.square().sum().backward()
    for p, p_ref in zip(layer.parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-10)


def test_task_routing_of_inference_tensors_under_inference_mode():
    """A task-id tensor made under torch.inference_mode has no version counter: it is routed
    without the reuse cache, by task_routing and by a task-routed layer, with the same result
    as under no_grad."""
    from moelora.ops import routing_modes

    gamma = torch.tensor([0.5, -1.0, 2.0])
    layer = moelora.MoELoRALinear(torch.nn.Linear(8, 8), num_experts=3, r=2, router="task").eval()
    torch.nn.init.normal_(layer.lora_B, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        moelora.set_task_ids(layer, torch.tensor([0, 2]))
        expected = layer(x)
    with torch.inference_mode():
        tasks = torch.tensor([2, 0])
        assert tasks.is_inference()
        r = task_routing(tasks, gamma, (2, 3))
        assert r.ids.flatten().tolist() == [2] * 3 + [0] * 3
        assert r.weights.flatten().tolist() == [2.0] * 3 + [0.5] * 3
        assert tasks not in routing_modes._TASK_ROUTING
        moelora.set_task_ids(layer, torch.tensor([0, 2]))
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["scalar", "per_example", "per_token"])
def test_task_ids_made_under_inference_mode_train_outside_it(backend, kind):
    """Task ids made under torch.inference_mode (an evaluation loop's, a collator run there) and then given
    to a training step outside it: the layer's forward and backward run on every backend with the gradients
    of the same ids made normally. The fused layer's op saves the ids for backward, and ids that were a view
    of the inference tensor (a 0-d or per-token tensor's) could not be saved there (a RuntimeError on the
    Triton backend only)."""
    ids = {"scalar": 1, "per_example": [2, 0], "per_token": [[1, 2, 0], [0, 0, 1]]}[kind]
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    grads = []
    for inference in (False, True):
        torch.manual_seed(0)
        layer = moelora.MoELoRALinear(nn.Linear(8, 8), num_experts=3, router="task", r=2)
        nn.init.normal_(layer.lora_gamma, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode(inference):
            tasks = torch.tensor(ids)
        assert tasks.is_inference() == inference
        moelora.set_task_ids(layer, tasks)
        with moelora.use_backend(backend):
            layer(x).square().sum().backward()
        grads.append([p.grad for p in (layer.lora_A, layer.lora_B, layer.lora_gamma)])
    for got, want in zip(*grads[::-1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_router_jitter_only_in_training():
    router = Router(8, 4, 2, jitter_noise=0.5)
    x = torch.randn(16, 8)
    router.eval()
    assert torch.equal(router.logits(x), router.logits(x))
    router.train()
    assert not torch.equal(router.logits(x), router.logits(x))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_jitters_its_input_on_every_backend_with_fp32_factors(backend, dtype):
    """In training the logits are (x * factors) W^T on both backends (the Triton logits kernel, which cannot
    jitter, is left for the PyTorch formula), the factors drawn in fp32 whatever x's dtype."""
    router = Router(8, 4, 2, jitter_noise=0.5).train()
    x = torch.randn(16, 8).to(dtype)
    torch.manual_seed(7)
    factors = router.jitter_factors(x)
    assert factors.dtype == torch.float32 and factors.shape == x.shape
    expected = (x.double() * factors.double()) @ router.weight.detach().double().t()
    torch.manual_seed(7)
    with moelora.use_backend(backend):
        got = router.logits(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_nan_logits_give_in_range_ids():
    logits = torch.full((4, 5), float("nan"))
    for r in (softmax_topk(logits, 2), topk_softmax(logits, 2), threshold_routing(logits, 2, 0.1, True)):
        assert bool(((r.ids >= 0) & (r.ids < 5)).all())


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_equals_mixtral(top_k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = _logits(t=40, e=8)
    r = softmax_topk(logits, top_k)
    ours = load_balancing_loss(r.probs, r.ids, 8)
    ref = load_balancing_loss_func((logits,), num_experts=8, top_k=top_k)
    torch.testing.assert_close(ours, ref)


def _hf_router(module: str, cls: str, weight: torch.Tensor, **config):
    """transformers' router ``cls`` (of transformers.models.<module>) with ``weight``, or a skip where
    the installed transformers has no such class (routers became modules in transformers 5)."""
    import importlib
    import types

    router_cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls, None)
    if router_cls is None:
        pytest.skip(f"this transformers has no {cls}")
    router = router_cls(types.SimpleNamespace(hidden_size=weight.shape[1], **config))
    with torch.no_grad():
        (router.weight if hasattr(router, "weight") else router.classifier.weight).copy_(weight)
    return router


def _assert_same_gate(ours, ids, weights):
    """Same experts, same order; gates equal to fp32 rounding (the two compute them in different orders)."""
    assert torch.equal(ours.ids.long(), ids.reshape(ours.ids.shape).long())
    torch.testing.assert_close(ours.weights, weights.reshape(ours.weights.shape).float(), rtol=1e-6, atol=1e-7)


def test_routers_equal_transformers_mixtral_qwen_and_switch():
    """docs/layers.md section 2: "topk_softmax" and renormalised "softmax_topk" are Mixtral's gate, Qwen2/3-MoE
    "softmax_topk" with renormalize = norm_topk_prob, Switch Transformers' top-1 k = 1 without renormalising."""
    e, d = 8, 32
    x = torch.randn(48, d)
    weight = torch.randn(e, d) * 0.3
    router = Router(d, e, 2)
    with torch.no_grad():
        router.weight.copy_(weight)
    mixtral = _hf_router("mixtral", "MixtralTopKRouter", weight, num_experts_per_tok=2, num_local_experts=e)
    logits, weights, ids = mixtral(x)
    for mode in ("topk_softmax", "softmax_topk"):
        router.mode = mode
        ours = router(x)
        torch.testing.assert_close(ours.logits, logits, rtol=0, atol=0)
        _assert_same_gate(ours, ids, weights)
    router.mode = "softmax_topk"
    for module, cls in (("qwen2_moe", "Qwen2MoeTopKRouter"), ("qwen3_moe", "Qwen3MoeTopKRouter")):
        for norm in (False, True):
            _, weights, ids = _hf_router(module, cls, weight, num_experts_per_tok=2, num_experts=e,
                                         norm_topk_prob=norm)(x)
            router.renormalize = norm
            _assert_same_gate(router(x), ids, weights)
    switch = _hf_router("switch_transformers", "SwitchTransformersTop1Router", weight, num_experts=e,
                        expert_capacity=x.shape[0], router_bias=False, router_jitter_noise=0.0,
                        router_ignore_padding_tokens=False, router_dtype="float32")
    one_hot, weights, logits = switch(x.view(1, -1, d))
    top1 = Router(d, e, 1, renormalize=False)
    with torch.no_grad():
        top1.weight.copy_(weight)
    _assert_same_gate(top1(x), one_hot.argmax(-1), weights)
    torch.testing.assert_close(router_z_loss(top1(x).logits), switch_z_loss(logits))
    top1.renormalize = True  # k = 1 renormalised: every gate is 1
    assert torch.equal(top1(x).weights, torch.ones(x.shape[0], 1))


def switch_z_loss(logits):
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    return router_z_loss_func(logits)


def test_summed_z_loss_of_several_layers_is_their_number_times_switch_transformers_pooled_one():
    """docs/layers.md section 3: Switch Transformers pools its layers' router logits into one z-loss (the mean of
    the per-layer ones), moelora sums the per-layer losses: L layers give L times Switch's z-loss."""
    L, d, e = 3, 8, 4
    layers = nn.Sequential(*[moelora.MoELoRALinear(nn.Linear(d, d), num_experts=e, top_k=2, router_aux_loss_coef=0.0,
                                                   router_z_loss_coef=1.0).double() for _ in range(L)])
    for layer in layers:
        nn.init.normal_(layer.router.weight)
    x = torch.randn(2, 5, d, dtype=torch.float64)
    logits = []
    for layer in layers:
        logits.append(layer.router.logits(x).view(2, 5, e))
        x = layer(x)
    assert rel_err(moelora.aux_loss(layers), L * switch_z_loss(torch.cat(logits, dim=1))) < 1e-12


def test_router_jitter_is_switch_transformers_jitter():
    """Same seed, same logits as Switch Transformers' jittered fp32 router; no jitter at eval."""
    e, d = 6, 16
    x = torch.randn(2, 12, d)
    weight = torch.randn(e, d)
    switch = _hf_router("switch_transformers", "SwitchTransformersTop1Router", weight, num_experts=e,
                        expert_capacity=24, router_bias=False, router_jitter_noise=0.2,
                        router_ignore_padding_tokens=False, router_dtype="float32")
    router = Router(d, e, 1, renormalize=False, jitter_noise=0.2)
    with torch.no_grad():
        router.weight.copy_(weight)
    torch.manual_seed(3)
    ref = switch.train()(x.clone())[2]  # Switch jitters its input in place
    torch.manual_seed(3)
    assert torch.equal(router.train().logits(x), ref.reshape(-1, e))
    assert torch.equal(router.eval().logits(x), switch.eval()(x.clone())[2].reshape(-1, e))


@pytest.mark.parametrize("top_k", [1, 2])
def test_masked_load_balancing_loss_equals_mixtral(top_k):
    """load_balancing_loss(mask=) is Mixtral's load_balancing_loss_func with the attention mask, gradient too."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 2:] = 0
    logits = _logits(t=30, e=8).requires_grad_()
    r = softmax_topk(logits, top_k)
    ours = load_balancing_loss(r.probs, r.ids, 8, mask=mask.reshape(-1).bool())
    ref = load_balancing_loss_func((logits,), num_experts=8, top_k=top_k, attention_mask=mask)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])


def test_integer_masks_count_every_nonzero_token_as_real_in_the_load_the_loss_and_the_entropy():
    """An integer mask holds nonzero for real tokens (as set_aux_loss_mask and the layers take it; packed batches
    number their sequences 1, 2, ... in the attention_mask). expert_load and routing_entropy weighed each token by
    its mask value (and load_balancing_loss's P_e did not, its f_e did): segment ids 1..3 gave a load-balancing loss
    of 1.41 against 2.47 over the same real tokens. Now all three equal the float64 formula over the nonzero tokens."""
    T, E, k = 12, 4, 2
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(T, E, generator=g, dtype=torch.float64) * 2, -1)
    ids = probs.topk(k, -1).indices
    mask = torch.randint(0, 4, (T,), generator=g)
    mask[:2] = torch.tensor([2, 0])  # a token of segment 2 and a padding token whatever the draw
    real = (mask != 0).double()
    n = real.sum()
    load = (nn.functional.one_hot(ids, E).double() * real[:, None, None]).sum((0, 1)) / n
    want_lb = E * load.dot((probs * real[:, None]).sum(0) / n)
    entropy = -(probs * probs.log()).sum(-1)
    assert rel_err(load_balancing_loss(probs, ids, E, mask=mask), want_lb) < 1e-14
    assert rel_err(expert_load(ids, E, mask=mask, dtype=torch.float64), load) < 1e-14
    torch.testing.assert_close(routing_entropy(probs, mask).double(), (entropy * real).sum() / n)


def test_z_loss_entropy_and_load_formulas():
    logits = _logits(t=10, e=4)
    torch.testing.assert_close(router_z_loss(logits), (torch.logsumexp(logits, -1) ** 2).mean())
    uniform = torch.full((3, 4), 0.25)
    torch.testing.assert_close(routing_entropy(uniform), torch.tensor(math.log(4)))
    ids = torch.tensor([[0, 1], [0, 2], [0, 3]])
    w = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.7, 0.3]])
    assert expert_load(ids, 4).tolist() == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])
    assert expert_load(ids, 4, w).tolist() == pytest.approx([1.0, 1 / 3, 0.0, 1 / 3])


def test_load_balancing_loss_refuses_shapes_of_other_tokens_naming_the_argument():
    """ids, weights or a mask of other tokens than probs' (or probs of another expert count) raise;
    ids of 6 tokens against probs of 10 gave a number (the 6 tokens' load against 10 tokens' probs)."""
    r = softmax_topk(_logits(t=10, e=4), 2)
    with pytest.raises(ValueError, match=r"ids must have shape \[..., k\] with probs' 10 tokens"):
        load_balancing_loss(r.probs, r.ids[:6], 4)
    with pytest.raises(ValueError, match=r"probs must have shape \[..., num_experts = 5\]"):
        load_balancing_loss(r.probs, r.ids, 5)
    with pytest.raises(ValueError, match="weights must have the shape of ids"):
        load_balancing_loss(r.probs, r.ids, 4, weights=r.weights[:, :1])
    for n in (9, 11):
        with pytest.raises(ValueError, match=r"mask must hold one value per token \(10\)"):
            load_balancing_loss(r.probs, r.ids, 4, mask=torch.ones(n, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_experts must be an int >= 1, got 0"):
        load_balancing_loss(r.probs[:, :0], r.ids, 0)
    with pytest.raises(ValueError, match="num_experts must be an int >= 1, got True"):  # not taken as 1
        load_balancing_loss(r.probs[:, :1], torch.zeros(10, 1, dtype=torch.long), True)
    # the same tokens in another leading shape are fine
    mask = torch.ones(2, 5, dtype=torch.long)
    torch.testing.assert_close(load_balancing_loss(r.probs.view(2, 5, 4), r.ids.view(2, 5, 2), 4, mask=mask),
                               load_balancing_loss(r.probs, r.ids, 4))


def test_masked_statistics_of_padding_only_are_zero_not_nan():
    """A mask with no real token (a batch of padding only) gives a load of 0, a load-balancing loss of 0 and an
    entropy of 0 (the real-token count is taken as at least 1), not 0 / 0; so do no tokens, z-loss included."""
    r = softmax_topk(_logits(t=10, e=4), 2)
    none = torch.zeros(10, dtype=torch.bool)
    assert expert_load(r.ids, 4, mask=none).tolist() == [0.0] * 4
    assert load_balancing_loss(r.probs, r.ids, 4, mask=none).item() == 0.0
    assert routing_entropy(r.probs, none).item() == 0.0
    # no tokens at all: 0 as well, z-loss included
    assert router_z_loss(torch.randn(0, 4)).item() == 0.0 and routing_entropy(torch.rand(0, 4)).item() == 0.0
    assert load_balancing_loss(torch.rand(0, 4), torch.zeros(0, 2, dtype=torch.long), 4).item() == 0.0


def test_aux_loss_functions_refuse_inputs_of_other_kinds_naming_them():
    """moelora.load_balancing_loss's ids of a float dtype were truncated to experts (1.7 -> 1) and its probs of an
    integer dtype gave 0, silently; router_z_loss's 0-d logits failed inside it (IndexError: tuple index out of
    range): each now raises naming the argument."""
    r = softmax_topk(_logits(t=10, e=4), 2)
    with pytest.raises(TypeError, match=r"^ids must be an integer tensor \(expert ids\), got torch.float32$"):
        moelora.load_balancing_loss(r.probs, r.ids.float() + 0.7, 4)
    with pytest.raises(TypeError, match=r"^ids must be an integer tensor \(expert ids\), got torch.bool$"):
        moelora.load_balancing_loss(r.probs, r.ids > 0, 4)  # not experts 0 and 1
    with pytest.raises(TypeError, match=r"^probs must be floating point \(router probabilities\), got torch.int64$"):
        moelora.load_balancing_loss(r.probs.long(), r.ids, 4)
    with pytest.raises(ValueError, match=r"^logits must have shape \[\.\.\., E\] with E >= 1, got \(\)$"):
        moelora.router_z_loss(torch.randn(()))
    with pytest.raises(ValueError, match=r"^logits must have shape \[\.\.\., E\] with E >= 1, got \(3, 0\)$"):
        moelora.router_z_loss(torch.randn(3, 0))


def test_load_balancing_loss_refuses_ids_out_of_range_naming_them():
    """moelora.load_balancing_loss with ids outside [0, num_experts) (a backend's own routing, off by one) raised
    torch's one_hot error ("Class values must be smaller than num_classes", naming nothing; on a GPU a device-side
    assert): with moelora.validation on it raises ValueError naming ids and the range; with it off the slots of
    those ids count for no expert (as moe_lora's), and expert_load never fails on them."""
    r = softmax_topk(_logits(t=10, e=4), 2)
    for bad in (4, -1):
        ids = r.ids.clone()
        ids[3, 1] = bad
        with pytest.raises(ValueError, match=rf"^ids must lie in \[0, 4\), got values in \[{min(bad, 0)}, "):
            moelora.load_balancing_loss(r.probs, ids, 4)
        with moelora.validation(False):
            loss = moelora.load_balancing_loss(r.probs, ids, 4)
        kept = torch.ones_like(ids, dtype=torch.float32)
        kept[3, 1] = 0  # the slot counts for no expert: as a slot of weight 0
        torch.testing.assert_close(loss, moelora.load_balancing_loss(r.probs, r.ids, 4, weights=kept))
        load = expert_load(ids, 4)
        torch.testing.assert_close(load, expert_load(r.ids, 4, weights=kept))


def test_load_balancing_loss_runs_under_vmap_as_per_sample():
    """The id-range check of load_balancing_loss read the ids on the host, which a torch.func.vmap-batched tensor
    cannot give ("Cannot access data pointer of Tensor that doesn't have storage"): vmap over the loss (an
    ensemble's members, also under grad) raised where it ran before the check. Batched ids are not read."""
    from torch.func import grad, vmap

    probs = torch.stack([softmax_topk(_logits(t=10, e=4) * (i + 1), 2).probs for i in range(3)])
    ids = probs.topk(2, -1).indices
    loop = torch.stack([load_balancing_loss(probs[i], ids[i], 4) for i in range(3)])
    torch.testing.assert_close(vmap(lambda p, i: load_balancing_loss(p, i, 4))(probs, ids), loop)
    grads = vmap(grad(lambda p, i: load_balancing_loss(p, i, 4)))(probs, ids)
    torch.testing.assert_close(grads, torch.stack([torch.func.grad(lambda p: load_balancing_loss(p, ids[i], 4))(
        probs[i]) for i in range(3)]))


def test_aux_loss_functions_keep_float64():
    """load_balancing_loss and router_z_loss compute in fp32 for half and fp32 inputs, in fp64 for fp64 ones (as
    the routing op and aux_losses), where they rounded fp64 to fp32: z of logits of size 1e3 off by ~0.3."""
    logits = _logits(t=16, e=4).double() * 1e3
    z = router_z_loss(logits)
    assert z.dtype == torch.float64
    torch.testing.assert_close(z, torch.logsumexp(logits, -1).square().mean(), rtol=1e-14, atol=0)
    probs = torch.softmax(_logits(t=16, e=4).double(), -1)
    ids = probs.topk(2, -1).indices
    lb = load_balancing_loss(probs, ids, 4)
    assert lb.dtype == torch.float64
    load = torch.nn.functional.one_hot(ids, 4).sum((0, 1)).double() / 16
    torch.testing.assert_close(lb, 4 * (load * probs.mean(0)).sum(), rtol=1e-14, atol=0)
    assert router_z_loss(logits.half()).dtype == load_balancing_loss(probs.half(), ids, 4).dtype == torch.float32


def test_routing_entropy_of_float64_probs_has_float64_precision():
    """routing_entropy (the routing statistics' entropy, MoLEx's) rounded float64 probabilities to fp32 and took
    log(max(p, 1e-12)): ~1e-8 relative off the float64 entropy. Now in float64 for float64 probs, with p log p = 0
    at p = 0 (a saturated softmax), and in fp32 for half ones."""
    from moelora.ops.losses import routing_entropy

    probs = torch.softmax(_logits(t=21, e=5, seed=8).double(), -1)
    probs[0] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    terms = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
    got = routing_entropy(probs)
    assert got.dtype == torch.float64 and rel_err(got, -terms.sum(-1).mean()) < 1e-14
    assert routing_entropy(probs.half()).dtype == torch.float32


@pytest.mark.parametrize("masked", [False, True], ids=["all_tokens", "masked"])
def test_load_balancing_loss_of_float64_probs_has_float64_precision(masked):
    """The load f_e = c_e / T of float64 probs is float64: it was fp32 (its one-hot sums and the token count), so the
    loss of 21 tokens (f_e = c_e / 21, no fp32 number) was off by ~3e-8 relative, with or without a mask, while the
    docstring promises fp64. Against the float64 formula, thresholded weights (slots of weight 0 not counted) too."""
    T, E, k = 21, 5, 2
    probs = torch.softmax(_logits(t=T, e=E, seed=4).double(), -1)
    ids = probs.topk(k, -1).indices
    weights = torch.rand(T, k, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) - 0.3
    mask = torch.rand(T, generator=torch.Generator().manual_seed(6)) > 0.3
    if not masked:
        mask = torch.ones(T, dtype=torch.bool)
    n = mask.double().sum()
    kept = nn.functional.one_hot(ids, E).double() * (weights > 0).double().unsqueeze(-1) * mask.double()[:, None, None]
    want = E * (kept.sum((0, 1)) / n).dot((probs * mask.double()[:, None]).sum(0) / n)
    got = load_balancing_loss(probs, ids, E, weights=weights, mask=mask if masked else None)
    assert got.dtype == torch.float64 and rel_err(got, want) < 1e-14
    assert expert_load(ids, E, weights, mask if masked else None, torch.float64).dtype == torch.float64


@pytest.mark.parametrize("mode,top_k", [("softmax_topk", 3), ("softmax_topk", 7), ("threshold", 3)],
                         ids=["softmax_topk", "softmax_topk_k=E", "threshold"])
def test_routing_aux_losses_kernel_matches_the_formula(mode, top_k):
    """Where the Triton kernels run, a learned routing's aux loss is one kernel: loss, stats and
    the gradient reaching the logits (through prob_sums and lse) as a float64 formula of the
    logits, to float64's precision for float64 logits. The kernels (forward and backward) took
    1/T and the coefficients as Triton's float arguments, float32 on a GPU
    (float_args_as_float32): relative errors of ~5e-8 (lb = 7.0000003 at k = E)."""
    from moelora.ops.losses import routing_aux_losses
    from moelora.ops.routing_modes import route_logits

    T, E, lb_coef, z_coef = 50, 7, 0.01, 0.001
    logits = (torch.randn(T, E, dtype=torch.float64, device=DEVICE) * 2).requires_grad_()
    routing = route_logits(logits, mode, top_k, eps=0.3)
    with moelora.use_backend("triton"), float_args_as_float32():  # the kernels run on CUDA tensors or interpreted
        loss, stats = routing_aux_losses(routing, lb_coef, z_coef)
        assert type(loss.grad_fn).__name__ == "_AuxLossFnBackward"
        (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    lb = E * (routing.counts.double() / T).dot(torch.softmax(logits, -1).mean(0))  # counts: the routed (kept) slots
    z = torch.logsumexp(logits, -1).square().mean()
    ref_loss = lb_coef * lb + z_coef * z
    (ref_grad,) = torch.autograd.grad(ref_loss, logits)
    if top_k == E:
        assert abs(float(stats[0]) - E) < 1e-12 * E  # f_e = 1 for every expert, the probabilities sum to 1
    assert rel_err(loss, ref_loss) < 1e-12 and rel_err(stats, torch.stack([lb, z])) < 1e-12
    assert rel_err(grad, ref_grad) < 1e-12


@pytest.mark.parametrize("T", [1, 3])
def test_aux_losses_formula_of_the_routing_statistics(T):
    """aux_losses (the PyTorch twin of the fused layer's aux loss) from counts, prob_sums and lse: lb = E (c / T) .
    (P / T), z = mean lse^2, loss = lb_coef lb + z_coef z, stats detached; a single token (T = 1) included."""
    from moelora.ops.losses import aux_losses
    from moelora.ops.routing_modes import route_logits

    logits = torch.randn(T, 5, dtype=torch.float64, requires_grad=True)
    routing = route_logits(logits, "softmax_topk", 2)
    loss, stats = aux_losses(routing.counts, routing.prob_sums, routing.lse, 0.3, 0.7)
    lb = 5 * (routing.counts.double() / T).dot(torch.softmax(logits, -1).mean(0))
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(stats, torch.stack([lb, z]).detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, 0.3 * lb + 0.7 * z, rtol=1e-12, atol=0)
    assert loss.requires_grad and not stats.requires_grad


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "kernel"])
def test_masked_aux_losses_count_the_kept_slots_of_real_tokens_with_count_kept(kernels):
    """masked_aux_losses' counts: the real tokens' slots, with count_kept (threshold routing) only those of weight
    > 0, on either path (the PyTorch ops, or where the Triton kernels run, the kernel)."""
    from moelora.ops.losses import masked_aux_losses

    logits = torch.randn(6, 4, dtype=torch.float64)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3], [3, 3], [1, 0]])
    weights = torch.tensor([[0.5, 0.0], [0.3, 0.7], [0.0, 0.0], [1.0, 0.2], [0.4, 0.0], [0.6, 0.4]],
                           dtype=torch.float64)
    mask = torch.tensor([True, True, True, True, True, False])
    with moelora.use_backend("triton" if kernels else "torch"):
        kept = masked_aux_losses(logits, ids, weights, mask, 0.3, 0.7, count_kept=True, kernels=kernels)[2]
        every = masked_aux_losses(logits, ids, weights, mask, 0.3, 0.7, kernels=kernels)[2]
    assert kept.tolist() == [2, 0, 1, 3] and every.tolist() == [2, 2, 2, 4]


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "threshold"])
def test_aux_loss_kernels_pass_gradcheck(mode, masked):
    """torch.autograd.gradcheck of the aux loss (unmasked: routing_aux_losses, masked: masked_aux_losses) through
    its Triton kernels in float64: the closed-form gradient against finite differences, and an undefined incoming
    gradient (autograd passes None: set_materialize_grads(False)) answered with None, which the unmasked loss's
    backward launched its kernel on (AttributeError: 'NoneType' object has no attribute 'get_device')."""
    from moelora.ops.losses import masked_aux_losses, routing_aux_losses
    from moelora.ops.routing_modes import route_logits

    logits = (torch.randn(7, 4, dtype=torch.float64, device=DEVICE) * 2).requires_grad_()
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool, device=DEVICE)
    fixed = route_logits(logits.detach(), mode, 2, eps=0.3)

    def loss(z):
        if masked:
            return masked_aux_losses(z, fixed.ids, fixed.weights, mask, 0.3, 0.7, count_kept=mode == "threshold")[0]
        return routing_aux_losses(route_logits(z, mode, 2, eps=0.3), 0.3, 0.7)[0]

    with moelora.use_backend("triton"):
        assert type(loss(logits).grad_fn).__name__ == ("_MaskedAuxKernelFnBackward" if masked else "_AuxLossFnBackward")
        assert torch.autograd.gradcheck(loss, (logits,))


def test_router_rejects_bad_settings():
    with pytest.raises(ValueError, match="top_k must be in"):
        Router(8, 4, 5)
    with pytest.raises(ValueError, match=r"mode must be one of \('softmax_topk', 'topk_softmax', 'threshold'\)"):
        Router(8, 4, 2, mode="sinkhorn")
    with pytest.raises(ValueError, match="jitter_noise must be a finite number >= 0"):
        Router(8, 4, 2, jitter_noise=-0.1)
    with pytest.raises(TypeError, match="in_features must be a positive int, got float 8.0"):
        Router(8.0, 4, 2)


@pytest.mark.parametrize("layer_kwargs", [
    dict(num_experts=4.0), dict(num_experts="4"), dict(top_k=2.0), dict(router_jitter_noise=math.nan),
    dict(router_jitter_noise=-1), dict(threshold_eps=-0.5), dict(threshold_eps=math.inf),
    dict(threshold_eps_start=math.nan),
    dict(threshold_ramp_steps=2.5), dict(threshold_ramp_steps=-1), dict(router_renormalize="yes"),
], ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_router_checks_its_arguments_as_the_layers_fields(layer_kwargs):
    """Router's arguments get the layers' checks and messages, under Router's names
    (jitter_noise for router_jitter_noise, eps_end for threshold_eps, ...)."""
    from moelora.modules.router import ROUTER_ARG_FIELDS
    with pytest.raises((TypeError, ValueError)) as layer_error:
        moelora.MoELoRALinear(torch.nn.Linear(8, 8), router="threshold", **{"num_experts": 4, "top_k": 2,
                                                                            **layer_kwargs})
    (field, value), = layer_kwargs.items()
    name = next(arg for arg, f in ROUTER_ARG_FIELDS.items() if f == field)
    with pytest.raises(type(layer_error.value)) as error:
        Router(8, **{"num_experts": 4, "top_k": 2, "mode": "threshold", name: value})
    assert str(error.value) == str(layer_error.value).replace(field, name, 1)


def test_router_repr_names_its_mode_and_top_k():
    assert repr(Router(8, 4, 2, mode="threshold")) == ("Router(in_features=8, out_features=4, bias=False, "
                                                       "mode=threshold, top_k=2)")


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "composed"])
def test_a_layers_aux_loss_without_gradients_is_flagged_lost_in_training_mode_only(hooked):
    """A routed layer's no_grad forward in training mode flags its stored aux loss as lost (aux_loss_lost_grad);
    an evaluation forward (eval mode, no_grad) is not flagged, nor a training forward with gradients."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    if hooked:  # a forward hook on the base layer: the composed path
        base.register_forward_hook(lambda module, args, out: out)
    layer = moelora.MoELoRALinear(base, num_experts=4, top_k=2, r=2).train()
    x = torch.randn(5, 8)
    layer(x)
    assert not layer.aux_loss_lost_grad and layer.last_aux_loss.requires_grad
    with torch.no_grad():
        layer(x)
    assert layer.aux_loss_lost_grad and not layer.last_aux_loss.requires_grad
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert not layer.aux_loss_lost_grad


def test_a_cleared_or_copied_routing_record_is_not_flagged_lost():
    """The lost-gradient flag of a no_grad training forward goes with its record: cleared
    (clear_routing_record, as MoELoRAModel's forward starts) and left out of a copy."""
    layer = moelora.MoELoRALinear(nn.Linear(8, 6), num_experts=4, top_k=2, r=2).train()
    with torch.no_grad():
        layer(torch.randn(5, 8))
    assert layer.aux_loss_lost_grad
    assert not copy.deepcopy(layer).aux_loss_lost_grad and layer.aux_loss_lost_grad
    layer.clear_routing_record()
    assert not layer.aux_loss_lost_grad and layer.last_aux_loss is None


def test_router_buffers_live_on_the_router_device():
    """The threshold schedule's step counter is created where the router's weight is: a layer
    built over a GPU base reads it on the GPU (the fused kernels take its pointer)."""
    router = Router(8, 4, 2, mode="threshold", eps_end=0.2, eps_ramp_steps=10, device="meta")
    assert router.weight.device.type == "meta" and router.num_steps.device.type == "meta"


@pytest.mark.parametrize("mode, renormalize, warns", [("softmax_topk", True, True), ("topk_softmax", False, True),
                                                      ("threshold", True, True), ("threshold", False, True),
                                                      ("softmax_topk", False, False)])
def test_top_1_with_a_renormalised_gate_warns_that_the_task_loss_cannot_train_the_router(mode, renormalize, warns):
    """With top_k=1 a renormalised (or "topk_softmax", or "threshold": renormalize does not apply to them)
    gate is 1 for every token: the task loss gives the router no gradient, only the aux losses train it.
    Constructing such a router warns (threshold routing with router_renormalize=False did not);
    Switch's top-1 (softmax_topk, renormalize=False) does not, and its router learns from the task."""
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = moelora.MoELoRALinear(nn.Linear(8, 8), num_experts=4, top_k=1, r=2, router=mode,
                                      router_renormalize=renormalize, router_aux_loss_coef=0.0,
                                      router_z_loss_coef=0.0, init_lora_weights=False)
    messages = [str(w.message) for w in caught if "top_k=1" in str(w.message)]
    assert len(messages) == (1 if warns else 0), messages
    with moelora.use_backend("torch"):  # in float64: d(w / w) is 0 up to rounding (fp32's reached 2e-5)
        layer.double().train()(torch.randn(6, 8, dtype=torch.float64)).square().sum().backward()
    router_grad = layer.router.weight.grad
    largest = 0.0 if router_grad is None else float(router_grad.abs().max())
    assert largest < 1e-12 if warns else largest > 1e-3


def test_top_1_warning_names_the_callers_line_and_a_single_expert_does_not_warn():
    """The top-1 warning is attributed to the code constructing the Router (stacklevel 2), not to router.py; a
    router of one expert (no routing choice to learn) does not warn."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Router(8, 4, 1)
        Router(8, 1, 1)
        Router(8, 1, 1, mode="threshold")
    messages = [w for w in caught if "top_k=1" in str(w.message)]
    assert len(messages) == 1 and messages[0].filename == __file__, [(w.filename, str(w.message)) for w in caught]


def test_threshold_routing_counts_the_same_slots_on_every_path_when_the_softmax_saturates():
    """Threshold routing at eps 0 (the default) with large logits (a saturated softmax, e.g. a
    half-precision model's large activations): a top-n slot whose probability underflows to 0
    has weight 0, skipped by the experts. Every path counts the slots with weight > 0 in the
    load and the load-balancing loss: the fused layer's kernels, the masked aux loss and the
    PyTorch path at any eps. Before, the PyTorch path at a float eps of 0 counted every top-n
    slot, so the torch backend's load and aux loss differed from the Triton backend's."""
    torch.manual_seed(0)
    layer = moelora.MoELoRALinear(nn.Linear(16, 12), num_experts=4, top_k=2, r=4, router="threshold",
                                  init_lora_weights=False).to(DEVICE).train()
    with torch.no_grad():
        layer.router.weight.mul_(200)
    x = torch.randn(8, 16, device=DEVICE) * 30
    assert bool((layer.router(x).weights == 0).any())  # the premise: saturated slots
    results = []
    for backend, mask in [("torch", None), ("triton", None), ("torch", torch.ones(8, dtype=torch.long))]:
        with moelora.use_backend(backend), moelora.use_aux_loss_mask(layer, mask):
            layer(x)
            stats = moelora.router_stats(layer)[""]
            results.append((stats["load"], stats["load_balancing_loss"]))
    routing = layer.router(x)
    counted = torch.zeros(4, device=DEVICE).index_add_(0, routing.ids.reshape(-1).long(),
                                                       (routing.weights > 0).reshape(-1).float())
    for load, lb in results:
        torch.testing.assert_close(load, counted / 8)
        torch.testing.assert_close(lb, results[1][1])


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("x_device, router_device", [("meta", "cpu"), ("cpu", "meta")])
def test_router_input_on_another_device_names_both(backend, x_device, router_device):
    """x on one device and the router on another (meta standing in for a second one): a ValueError naming x
    and both devices, not the Triton kernel run on x's device with the weight's pointer into the other's
    memory (the interpreter: "Cannot copy out of meta tensor") nor a torch op's error naming neither."""
    router = Router(16, 4, 2, device=router_device)
    with moelora.use_backend(backend), pytest.raises(ValueError, match=f"x is on {x_device} but the module's "
                                                                       f"weights are on {router_device}"):
        router(torch.randn(5, 16, device=x_device))
