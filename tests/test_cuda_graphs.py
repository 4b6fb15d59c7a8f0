"""CUDA graphs (GPU only): forward + backward of an injected model, captured once, replayed
on new inputs, gives eager's loss and gradients. The syncing input checks skip themselves
during capture; threshold routing reads its eps schedule from a device buffer, so stepping
the routers between replays changes the captured routing."""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import moelora
from moelora import MoELoRAConfig, get_moelora_model
from moelora.ops.moe_lora import choose_regime
from helpers import capture_training_step, randomize_adapters

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

ROUTERS = {
    "softmax_topk": dict(router="softmax_topk", share_lora_a=True),
    "topk_softmax": dict(router="topk_softmax"),
    "threshold": dict(router="threshold", top_k=3, threshold_eps=0.3, threshold_ramp_steps=4),
    "task": dict(router="task", task_shared_lora=True),
    "grouped": dict(router="softmax_topk", num_experts=160),  # E*r = 1280: the fused op's grouped regime
}


STACK_CONFIG = {"target_modules": ["0", "2"], "num_experts": 4, "top_k": 2, "r": 8}


def _injected_stack(settings):
    torch.manual_seed(0)
    stack = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    config = MoELoRAConfig(**{**STACK_CONFIG, **settings})
    model = get_moelora_model(stack, config).cuda()
    randomize_adapters(model)
    return model


def _step(model, x):
    loss = model(x).square().mean() + model.aux_loss()
    loss.backward()
    return loss


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_the_grouped_case_runs_the_grouped_regime():
    """The "grouped" case's width lies above the regime threshold (a case whose E*r the threshold
    later passes would silently test the dense regime twice)."""
    settings = {**STACK_CONFIG, **ROUTERS["grouped"]}
    assert choose_regime(settings["num_experts"], settings["r"]) == "grouped"


def test_single_expert_routing_made_during_capture_is_not_cached(monkeypatch):
    """The single expert's ids and weights, cached per device for every layer of the process, are not
    cached when first made during CUDA-graph capture (a first forward on a device inside
    torch.cuda.graph): the kernels filling them are only recorded, so every eager forward after
    the capture would read their memory unfilled until the graph replays. (Capture is simulated: the
    cache's rule needs no GPU.)"""
    from moelora.modules import adapter_base

    monkeypatch.setattr(adapter_base, "_SINGLE", {})  # as in a fresh process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    ids, weights = adapter_base.single_expert_routing(3, torch.device("cpu"))
    assert ids.tolist() == [[0]] * 3 and weights.tolist() == [[1.0]] * 3
    assert not adapter_base._SINGLE
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    adapter_base.single_expert_routing(3, torch.device("cpu"))
    assert list(adapter_base._SINGLE) == [torch.device("cpu")]


@needs_cuda
@pytest.mark.parametrize("router", list(ROUTERS))
def test_captured_forward_backward_replays_like_eager(router):
    model = _injected_stack(ROUTERS[router])
    # Threshold sampling draws random numbers in training: compare it in eval mode
    # (deterministic, still differentiable).
    model.train(router != "threshold")
    eager_model = copy.deepcopy(model)
    static_x = torch.randn(64, 32, device="cuda")
    static_tasks = torch.zeros(64, dtype=torch.long, device="cuda")
    if router == "task":
        moelora.set_task_ids(model, static_tasks)

    graph, static_loss = capture_training_step(model, lambda: _step(model, static_x))

    for seed in (1, 2, 3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(64, 32, device="cuda", generator=g)
        tasks = torch.randint(0, 4, (64,), device="cuda", generator=g)
        static_x.copy_(x)
        static_tasks.copy_(tasks)
        graph.replay()
        eager_model.zero_grad(set_to_none=True)
        with moelora.use_task_ids(eager_model, tasks) if router == "task" else contextlib.nullcontext():
            eager_loss = _step(eager_model, x)
        torch.testing.assert_close(static_loss, eager_loss, rtol=1e-4, atol=1e-5)
        for captured, eager in zip(_grads(model), _grads(eager_model)):
            torch.testing.assert_close(captured, eager, rtol=1e-4, atol=1e-5)
        if router == "threshold":
            model.step_routers()  # in place on the buffer the graph reads
            eager_model.step_routers()


@needs_cuda
def test_captured_step_with_an_aux_loss_mask_replays_like_eager():
    """The aux-loss mask the layers hold (one tensor for all, moelora.set_aux_loss_mask) is read on
    the device: a new mask copied into it changes what a replay's aux loss counts."""
    model = _injected_stack(ROUTERS["softmax_topk"])
    eager_model = copy.deepcopy(model)
    static_x = torch.randn(64, 32, device="cuda")
    moelora.set_aux_loss_mask(model, torch.ones(64, dtype=torch.bool, device="cuda"))
    held = {id(m.aux_loss_mask): m.aux_loss_mask for m in model.modules() if isinstance(m, moelora.MoELoRALinear)}
    assert len(held) == 1
    (static_mask,) = held.values()
    graph, static_loss = capture_training_step(model, lambda: _step(model, static_x))
    for seed in (1, 2, 3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(64, 32, device="cuda", generator=g)
        mask = torch.rand(64, device="cuda", generator=g) > 0.3
        static_x.copy_(x)
        static_mask.copy_(mask)
        graph.replay()
        eager_model.zero_grad(set_to_none=True)
        with moelora.use_aux_loss_mask(eager_model, mask):
            eager_loss = _step(eager_model, x)
        torch.testing.assert_close(static_loss, eager_loss, rtol=1e-4, atol=1e-5)
        for captured, eager in zip(_grads(model), _grads(eager_model)):
            torch.testing.assert_close(captured, eager, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_lora_dropout_draws_a_new_keep_mask_on_every_replay():
    """The keep mask comes from bernoulli_ on the device's generator, which a captured graph
    advances on each replay: the same input gives another loss every time."""
    model = _injected_stack(dict(router="softmax_topk", lora_dropout=0.5))
    static_x = torch.randn(64, 32, device="cuda")
    graph, static_loss = capture_training_step(model, lambda: _step(model, static_x))
    losses = []
    for _ in range(3):
        graph.replay()
        losses.append(static_loss.item())
    assert len(set(losses)) == 3, losses


def _train_side_by_side(model, steps: int, device, **compile_options):
    """(compiled model, eager copy) after ``steps`` SGD steps of the stack's loss on the same fresh
    inputs, the loss of each step compared."""
    eager_model = copy.deepcopy(model)

    def loss_fn(m, x):
        return m(x).square().mean() + m.aux_loss()

    compiled = torch.compile(loss_fn, fullgraph=True, **compile_options)
    runs = [(m, fn, torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1))
            for m, fn in ((model, compiled), (eager_model, loss_fn))]
    for seed in range(steps):
        x = torch.randn(64, 32, device=device, generator=torch.Generator(device=device).manual_seed(seed))
        losses = []
        for m, fn, opt in runs:
            torch.compiler.cudagraph_mark_step_begin()  # a new training step for inductor's CUDA graphs
            opt.zero_grad(set_to_none=True)
            loss = fn(m, x)
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())  # a graph's output is overwritten by its next replay
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    return model, eager_model


@needs_cuda
@pytest.mark.parametrize("router", ["softmax_topk", "grouped"])
def test_reduce_overhead_compile_captures_and_trains_like_eager(router):
    """torch.compile's mode="reduce-overhead" (inductor's CUDA graphs, the usual cure for a
    host-bound step): the layers' custom ops are captured (no graph skipped) and training
    matches eager."""
    torch._dynamo.reset()
    counters.clear()
    model, eager_model = _train_side_by_side(_injected_stack(ROUTERS[router]).train(), 4, "cuda",
                                             mode="reduce-overhead")
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch._dynamo.reset()
