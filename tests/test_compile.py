"""torch.compile: MoE-LoRA layers and injected models train under ``fullgraph=True`` (no graph
break, no recompilation across optimiser steps) and match eager training.

The kernels' own custom ops are compiled in test_custom_ops.py; the forward of an injected
LLaMA under aot_eager in test_model.py. Here: every router mode and A layout, training
steps, a custom module stack, a transformers model, and inductor once.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

import moelora
from moelora import MoELoRAConfig, MoELoRALinear, get_moelora_model
from helpers import needs_c, randomize_adapters, tiny_llama, token_batch

pytestmark = pytest.mark.usefixtures("single_torch_thread")
STEPS = 3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # no cache-size fallback to eager carried over from other tests
    yield
    torch._dynamo.reset()


def _train(model, loss_fn, inputs, compiled: bool, backend="aot_eager", between_steps=None):
    """STEPS of SGD on loss_fn(model, inputs); returns (losses, counter or None)."""
    counter = CompileCounterWithBackend(backend) if compiled else None
    step_loss = torch.compile(loss_fn, fullgraph=True, backend=counter) if compiled else loss_fn
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        torch.manual_seed(0)  # same draws for jitter / threshold sampling in both runs
        loss = step_loss(model, inputs)
        loss.backward()
        opt.step()
        if between_steps is not None:
            between_steps(model)
        losses.append(loss.detach())
    return torch.stack(losses), counter


def _assert_trains_like_eager(model, loss_fn, inputs, backend="aot_eager", between_steps=None, tol=1e-5):
    eager_model = copy.deepcopy(model)
    eager, _ = _train(eager_model, loss_fn, inputs, compiled=False, between_steps=between_steps)
    compiled, counter = _train(model, loss_fn, inputs, compiled=True, backend=backend, between_steps=between_steps)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations: recompiled between steps"
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)


def _layer_loss(layer, x):
    y = layer(x)
    return y.square().mean() + moelora.aux_loss(layer)


LAYER_MODES = {
    "softmax_topk": dict(router="softmax_topk", router_jitter_noise=0.1),
    "topk_softmax": dict(router="topk_softmax"),
    # eps ramps from 0 to 0.4 as the steps go: the scheduled eps is read without a host sync
    "threshold": dict(router="threshold", top_k=3, threshold_eps=0.4, threshold_ramp_steps=2),
    "task": dict(router="task", task_shared_lora=True),
}


@pytest.mark.parametrize("share_lora_a", [True, False], ids=["sharedA", "expertA"])
@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_layer_trains_under_fullgraph_compile_like_eager(mode, share_lora_a):
    torch.manual_seed(0)
    settings = dict(num_experts=4, top_k=2, r=4, lora_dropout=0.1, share_lora_a=share_lora_a)
    settings.update(LAYER_MODES[mode])
    layer = MoELoRALinear(nn.Linear(12, 10), **settings).train()
    randomize_adapters(layer)
    if mode == "task":
        moelora.set_task_ids(layer, torch.tensor([0, 3, 1]))
    step = moelora.step_routers if mode == "threshold" else None
    _assert_trains_like_eager(layer, _layer_loss, torch.randn(3, 5, 12), between_steps=step)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("module", ["dense", "grouped", "ffn"])
def test_new_token_counts_compile_once_into_a_dynamic_graph(module, backend):
    """Training on batches of varying length (no padding to one length): torch.compile
    specialises the first batch, compiles a graph dynamic in the token count at the second, and
    reuses it for every later count, without a graph break (fullgraph) and like eager. The grouped
    regime's layout padding and moe_ffn's plan read the token count through their row class only
    (before, each new count recompiled the grouped layer, and moe_ffn broke the graph)."""
    torch.manual_seed(0)
    d = 12
    if module == "ffn":
        layer = moelora.MoEFFN(nn.Linear(d, 2 * d), nn.Linear(2 * d, d), torch.nn.functional.silu, 4, 2)
    else:  # E*r 4 * 4 = 16 (dense) or 300 * 4 = 1200 > 1024 (grouped)
        layer = MoELoRALinear(nn.Linear(d, d), num_experts=4 if module == "dense" else 300, top_k=2, r=4,
                              share_lora_a=True)
        randomize_adapters(layer)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_layer_loss, fullgraph=True, backend=counter)
    with moelora.use_backend(backend):
        for tokens in (5, 7, 11):
            x = torch.randn(2, tokens, d)
            grads = []
            for step in (_layer_loss, compiled):
                layer.zero_grad()
                step(layer, x).backward()
                grads.append([p.grad.clone() for p in layer.parameters() if p.grad is not None])
            for got, want in zip(*grads):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 2, f"{counter.frame_count} compilations for 3 token counts"


@pytest.mark.parametrize("settings", [dict(num_experts=1, use_dora=True),
                                      dict(num_experts=4, top_k=2, share_lora_a=True, lora_a_dropout=0.2)],
                         ids=["dora", "mosld_a_dropout"])
def test_dora_and_a_dropout_layers_train_under_fullgraph_compile_like_eager(settings):
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(12, 10), r=4, **settings).train()
    randomize_adapters(layer)
    _assert_trains_like_eager(layer, _layer_loss, torch.randn(3, 5, 12))


def test_layer_trains_under_inductor_like_eager():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(12, 10), num_experts=4, top_k=2, r=4).train()
    randomize_adapters(layer)
    _assert_trains_like_eager(layer, _layer_loss, torch.randn(3, 5, 12), backend="inductor", tol=1e-4)


def test_custom_module_stack_trains_under_fullgraph_compile_like_eager():
    torch.manual_seed(0)
    stack = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    model = get_moelora_model(stack, MoELoRAConfig(target_modules=["0", "2", "4"], num_experts=3,
                                                   top_k=2, r=2))
    randomize_adapters(model)
    model.train()

    def loss_fn(m, x):
        return m(x).square().mean() + m.aux_loss()

    _assert_trains_like_eager(model, loss_fn, torch.randn(6, 8))


def test_transformers_model_trains_under_fullgraph_compile_like_eager():
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"],
                                                                      num_experts=4, top_k=2, r=4))
    randomize_adapters(model)
    model.train()
    ids = token_batch(batch=2, seq=6)

    def loss_fn(m, ids):
        return m(input_ids=ids, labels=ids).loss  # task loss + aux loss, added by MoELoRAModel.forward

    _assert_trains_like_eager(model, loss_fn, ids)


@pytest.mark.skipif(torch.__version__ < "2.13", reason="torch 2.11's dynamo fails on this graph with an internal "
                    "error (docs/integration.md section 5)")
def test_gradient_checkpointed_transformers_model_trains_under_fullgraph_compile_like_eager(monkeypatch):
    """docs/integration.md section 5's recipe: transformers' non-reentrant gradient checkpointing, its input
    embeddings' requires_grad_ hook removed, use_cache=False and dynamo's
    skip_fwd_side_effects_in_bwd_under_checkpoint: one graph, training as eager (the aux losses included)."""
    monkeypatch.setattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint", True)
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                      num_experts=4, top_k=2, r=4))
    randomize_adapters(model)
    model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.model.disable_input_require_grads()
    model.train()

    def loss_fn(m, ids):
        return m(input_ids=ids, labels=ids, use_cache=False).loss

    _assert_trains_like_eager(model, loss_fn, token_batch(batch=2, seq=6))


def test_layers_with_different_scalings_compiled_one_by_one_under_fullgraph():
    """Per-block compilation (torch.compile(block, fullgraph=True) for each block, as FSDP2
    recipes do) runs one code object over layers whose scalings differ (alpha_pattern, rsLoRA
    with rank_pattern): dynamo then traces the scaling as a symbolic float, which moe_lora's
    finite-number check could not read (torch.* op returned non-Tensor: an error under
    fullgraph, a graph break per layer without it)."""
    x = torch.randn(2, 3, 6)
    for alpha in (8, 16, 32):
        torch.manual_seed(0)
        layer = MoELoRALinear(nn.Linear(6, 5), num_experts=4, top_k=2, r=2, lora_alpha=alpha).train()
        randomize_adapters(layer)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        y = compiled(x)
        y.square().sum().backward()
        grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B)]
        layer.zero_grad()
        expected = layer(x)
        expected.square().sum().backward()
        torch.testing.assert_close(y, expected, msg=f"lora_alpha={alpha}")
        for grad, p in zip(grads, (layer.lora_A, layer.lora_B)):
            torch.testing.assert_close(grad, p.grad, msg=f"lora_alpha={alpha}")


_LINEAR_KINDS = {"softmax_topk": dict(num_experts=4, top_k=2),
                 "topk_softmax": dict(num_experts=4, top_k=2, router="topk_softmax"),
                 "threshold": dict(num_experts=4, top_k=3, router="threshold", threshold_eps=0.2),
                 "shared_a": dict(num_experts=4, top_k=2, share_lora_a=True),
                 "task": dict(num_experts=3, router="task", task_shared_lora=True),
                 "dora": dict(num_experts=1, use_dora=True)}


def _linear_layer(kind: str, out_features: int) -> MoELoRALinear:
    """A MoELoRALinear over nn.Linear(8, out_features), r 4, of ``kind`` (_LINEAR_KINDS; "task": routing 5 tokens)."""
    layer = MoELoRALinear(nn.Linear(8, out_features), r=4, **_LINEAR_KINDS[kind])
    if kind == "task":
        layer.task_ids = torch.tensor([0, 1, 2, 1, 0])
    return layer


@pytest.mark.parametrize("kind", ["softmax_topk", "threshold", "task", "dora", "conv", "embedding"])
def test_torch_func_grad_runs_through_the_layers_on_the_torch_backend(kind):
    """README (Backends): torch.func.grad of a functional_call equals autograd's gradient on the
    torch backend, for every adapter layer kind (eval: no random draws)."""
    from torch.func import functional_call, grad

    from moelora.modules.conv import MoELoRAConv
    from moelora.modules.embedding import MoELoRAEmbedding

    torch.manual_seed(0)
    x = torch.randn(5, 8)
    if kind == "conv":
        layer, x = MoELoRAConv(nn.Conv2d(3, 4, 3), num_experts=3, top_k=2, r=4), torch.randn(2, 3, 6, 6)
    elif kind == "embedding":
        layer, x = MoELoRAEmbedding(nn.Embedding(10, 6), num_experts=3, top_k=2, r=4), torch.randint(0, 10, (2, 5))
    else:
        layer = _linear_layer(kind, 8)
    randomize_adapters(layer)
    layer.eval()
    params = {name: p.detach() for name, p in layer.named_parameters()}
    with moelora.use_backend("torch"):
        grads = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
        layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=0, msg=name)


def test_torch_func_transforms_the_readme_lists_as_unsupported_raise():
    """README (Backends): vmap, and any transform through the Triton backend or moe_ffn, raise
    rather than return a wrong gradient. A test that fails once they work, so the README's
    sentence is updated with them."""
    from torch.func import functional_call, grad, vmap
    from moelora.modules.ffn import MoEFFN

    layer = MoELoRALinear(nn.Linear(8, 8), num_experts=4, top_k=2, r=4, init_lora_weights=False).eval()
    ffn = MoEFFN(nn.Linear(8, 16), nn.Linear(16, 8), torch.nn.functional.silu, num_experts=4, top_k=2,
                 router="softmax_topk").eval()
    x = torch.randn(5, 8)
    for module, backend in ((layer, "triton"), (ffn, "torch")):
        params = {k: v.detach() for k, v in module.named_parameters()}
        with moelora.use_backend(backend), pytest.raises(RuntimeError, match="functorch transforms"):
            grad(lambda p: functional_call(module, p, (x,)).sum())(params)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    with moelora.use_backend("torch"), pytest.raises(RuntimeError, match="does not have vmap support"):
        vmap(grad(lambda p, xi: functional_call(layer, p, (xi[None],)).sum()), in_dims=(None, 0))(params, x)


@needs_c  # without moelora._C the routing is an autograd.Function without a vmap rule
@pytest.mark.parametrize("seq", [1, 8])
def test_vmap_runs_the_layer_forward_on_the_torch_backend(seq):
    """README (Backends): vmap over MoELoRALinear's forward runs on the torch backend (a learned router's
    routing is read by no host-side check; the routing op's vmap is torch's per-sample fallback) and gives
    the per-sample outputs. Samples of 8 tokens take the torch backend's dense form, whose _FinitePart had no
    vmap rule: vmap raised "does not have vmap support" (1 token per sample took the gathered form)."""
    from torch.func import functional_call, vmap

    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(8, 8), num_experts=4, top_k=2, r=4, init_lora_weights=False).eval()
    x = torch.randn(5, seq, 8)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    with moelora.use_backend("torch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        y = vmap(lambda xi: functional_call(layer, params, (xi,)))(x)
        ref = torch.stack([layer(x[i]) for i in range(5)])
    torch.testing.assert_close(y, ref)


@needs_c  # without moelora._C the routing is an autograd.Function without a vmap rule
@pytest.mark.parametrize("kind", ["softmax_topk", "topk_softmax", "threshold", "task"])
def test_vmap_over_inputs_and_stacked_parameters_on_the_torch_backend(kind):
    """README (Backends): vmap over the layer's forward, per sample and over an ensemble's stacked parameters
    (torch.func.stack_module_state), equals the per-sample / per-member loop for every router. Threshold routing
    counted its kept slots with an in-place index_add_ into unbatched zeros, which vmap refuses ("index_add_(self,
    *extra_args) is not possible because there exists a Tensor `other` in extra_args that has more elements")."""
    from torch.func import functional_call, stack_module_state, vmap

    settings = {"softmax_topk": dict(num_experts=4, top_k=2), "topk_softmax": dict(num_experts=4, top_k=2,
                                                                                   router="topk_softmax"),
                "threshold": dict(num_experts=4, top_k=3, router="threshold", threshold_eps=0.2),
                "task": dict(num_experts=3, router="task")}[kind]
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        layer = MoELoRALinear(nn.Linear(8, 6), r=4, **settings)
        randomize_adapters(layer, seed=seed)
        if kind == "task":
            layer.task_ids = torch.tensor([0, 1, 2, 1, 0])
        members.append(layer.eval())
    x = torch.randn(5, 8)
    params, buffers = stack_module_state(members)
    with moelora.use_backend("torch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        y = vmap(lambda p, b: functional_call(members[0], (p, b), (x,)))(params, buffers)
        torch.testing.assert_close(y, torch.stack([m(x) for m in members]))
        if kind != "task":  # task ids are per example: a sample of the batch is not a batch of them
            xs = torch.randn(4, 2, 8)
            per_sample = vmap(members[0])(xs)
            torch.testing.assert_close(per_sample, torch.stack([members[0](xi) for xi in xs]))


@pytest.mark.parametrize("fallback", [False, True], ids=["native", "fallback"])
@pytest.mark.parametrize("kind", ["softmax_topk", "topk_softmax", "threshold", "shared_a", "task", "dora"])
def test_forward_mode_ad_through_the_layers_on_the_torch_backend(kind, fallback):
    """README (Backends): forward-mode AD (torch.func.jvp and jacfwd, torch.autograd.forward_ad) through
    MoELoRALinear on the torch backend gives the tangent of float64 central differences, in the input and in
    the parameters. The native routing op ran below autograd when no input required a gradient (torch.func.jvp's
    inputs do not), which dropped the router's tangent: a silently wrong jvp / jacfwd in x (an error of the
    order of the output); and the dense form's _FinitePart had no jvp, so a tangent in the parameters raised."""
    from contextlib import nullcontext

    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, jacfwd, jvp

    from moelora import switches

    torch.manual_seed(0)
    layer = _linear_layer(kind, 6)
    randomize_adapters(layer)
    layer.eval()
    layer64 = copy.deepcopy(layer).double()
    x, v = torch.randn(5, 8), torch.randn(5, 8)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}

    def central(f, point, direction, eps=1e-6):
        return (f(point + eps * direction) - f(point - eps * direction)) / (2 * eps)

    with moelora.use_backend("torch"), (switches.force_fallback() if fallback else nullcontext()), torch.no_grad():
        ref_x = central(layer64, x.double(), v.double()).float()
        p64 = {n: p.double() for n, p in params.items()}
        ref_p = ((functional_call(layer64, {n: p64[n] + 1e-6 * tangents[n].double() for n in p64}, (x.double(),))
                  - functional_call(layer64, {n: p64[n] - 1e-6 * tangents[n].double() for n in p64}, (x.double(),)))
                 / 2e-6).float()
    with moelora.use_backend("torch"), (switches.force_fallback() if fallback else nullcontext()):
        torch.testing.assert_close(jvp(layer, (x,), (v,))[1], ref_x, msg="jvp in x")
        torch.testing.assert_close(torch.einsum("tocd,cd->to", jacfwd(layer)(x), v), ref_x, msg="jacfwd in x")
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, v))).tangent
        torch.testing.assert_close(tangent, ref_x, msg="forward_ad in x")
        if kind != "task":  # vmap over samples of jvp: the routing's formula ran an in-place index_add_ vmap refuses
            per_sample = torch.func.vmap(lambda xi, vi: jvp(layer, (xi[None],), (vi[None],))[1][0])(x, v)
            torch.testing.assert_close(per_sample, ref_x, msg="vmap of jvp in x")
        _, tangent = jvp(lambda p: functional_call(layer, p, (x,)), (params,), (tangents,))
        if kind == "dora":
            # DoRA's row norm is a constant (PEFT's, which detaches it), in forward mode as in reverse mode (the
            # differences see it change): the jvp is the one reverse mode's Jacobian gives
            ref_p = sum((jac * tangents[name]).flatten(2).sum(-1) for name, jac in
                        torch.func.jacrev(lambda p: functional_call(layer, p, (x,)))(params).items())
        torch.testing.assert_close(tangent, ref_p, rtol=1e-4, atol=1e-5, msg="jvp in the parameters")


@pytest.mark.parametrize("kind", ["single", "task"])
def test_static_routing_caches_keep_nothing_made_under_a_torch_func_transform(kind):
    """Task routing's ids per task-id tensor and single-expert routing's scalars are cached across forwards. Made
    under a torch.func transform (grad, jacrev) they were wrappers of that transform's level: a later nested
    transform (jacrev(jacrev), after a hessian) failed with "level.has_value() && level <= current_level INTERNAL
    ASSERT FAILED". Now nothing made under a transform is cached; the transforms' Hessians equal autograd's double
    backward in float64, whatever ran before."""
    from torch.func import hessian, jacfwd, jacrev

    from moelora.modules.adapter_base import _SINGLE
    from moelora.ops.routing_modes import _TASK_ROUTING

    torch.manual_seed(0)
    settings = dict(num_experts=1) if kind == "single" else dict(num_experts=3, router="task")
    layer = MoELoRALinear(nn.Linear(6, 4), r=2, **settings)
    randomize_adapters(layer)
    layer.eval()
    task_ids = torch.tensor([0, 1, 2])  # a fresh tensor: no entry made outside a transform yet
    if kind == "task":
        layer.task_ids = task_ids
    x = torch.randn(3, 6)
    layer64 = copy.deepcopy(layer).double()
    x64 = x.double().requires_grad_()
    with moelora.use_backend("torch"):
        g = torch.autograd.grad(layer64(x64).square().sum(), x64, create_graph=True)[0].reshape(-1)
        expected = torch.stack([torch.autograd.grad(gi, x64, retain_graph=True)[0] for gi in g]).reshape(3, 6, 3, 6)
        _SINGLE.clear()  # the scalars made next, under the transforms
        loss = lambda z: layer(z).square().sum()  # noqa: E731
        for transform in (hessian, lambda f: jacrev(jacrev(f)), lambda f: jacfwd(jacrev(f))):
            torch.testing.assert_close(transform(loss)(x).double(), expected, rtol=1e-5, atol=1e-5)
    cached = [t for pair in _SINGLE.values() for t in pair]
    cached += [t for entries in _TASK_ROUTING.values() for entry in entries.values() for t in entry[2:]]
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in cached)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_forward_mode_ad_through_moe_ffn_on_the_torch_backend(gated):
    """README (Backends): forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) through MoEFFN on the torch
    backend gives float64 central differences' tangent, in the input and in the parameters. The experts'
    moelora::segment_linear op carries a registered (reverse-mode) autograd only, through which PyTorch dropped the
    tangents without an error: jvp returned the router's part alone (silently wrong)."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F
    from torch.func import functional_call, jvp

    from moelora.modules.ffn import MoEFFN

    torch.manual_seed(0)
    ffn = MoEFFN(nn.Linear(8, 16), nn.Linear(16, 8), F.silu, num_experts=4, top_k=2, router="softmax_topk",
                 gate_proj=nn.Linear(8, 16) if gated else None).eval()
    randomize_adapters(ffn)
    ffn64 = copy.deepcopy(ffn).double()
    x, v = torch.randn(5, 8), torch.randn(5, 8)
    params = {n: p.detach() for n, p in ffn.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    with moelora.use_backend("torch"), torch.no_grad():
        ref_x = ((ffn64(x.double() + 1e-6 * v.double()) - ffn64(x.double() - 1e-6 * v.double())) / 2e-6).float()
        p64 = {n: p.double() for n, p in params.items()}
        ref_p = ((functional_call(ffn64, {n: p64[n] + 1e-6 * tangents[n].double() for n in p64}, (x.double(),))
                  - functional_call(ffn64, {n: p64[n] - 1e-6 * tangents[n].double() for n in p64}, (x.double(),)))
                 / 2e-6).float()
    with moelora.use_backend("torch"):
        torch.testing.assert_close(jvp(ffn, (x,), (v,))[1], ref_x, msg="jvp in x")
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(ffn(fwAD.make_dual(x, v))).tangent
        torch.testing.assert_close(tangent, ref_x, msg="forward_ad in x")
        _, tangent = jvp(lambda p: functional_call(ffn, p, (x,)), (params,), (tangents,))
        torch.testing.assert_close(tangent, ref_p, rtol=1e-4, atol=1e-5, msg="jvp in the parameters")


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_forward_mode_ad_through_the_triton_functions_raises(grad_mode):
    """Forward-mode AD (torch.autograd.forward_ad; torch.no_grad does not turn it off) through the
    Triton backend's fused Functions, which have no jvp: autograd.Function.apply raises, in grad
    mode and with it off. With grad mode off the eager ops skip apply (registration.apply_eager);
    they called the forward directly inside a dual level too, which returned the layer's output
    with a tangent that left out the kernels' part (silently wrong)."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(8, 8), num_experts=4, top_k=2, r=4, init_lora_weights=False).eval()
    x, tangent = torch.randn(5, 8), torch.randn(5, 8)
    ids, w = torch.rand(5, 4).argsort(1)[:, :2], torch.rand(5, 2)
    a, b = torch.randn(4, 4, 8), torch.randn(4, 8, 4)
    ffn = [torch.randn(4, 16, 8), torch.randn(4, 16), torch.randn(4, 8, 16), torch.randn(4, 8)]
    calls = {"layer": lambda xd: layer(xd), "moe_lora": lambda xd: moelora.moe_lora(xd, a, b, ids, w, scaling=0.5),
             "moe_ffn": lambda xd: moelora.moe_ffn(xd, ids, w, *ffn, F.silu)}
    for name, call in calls.items():
        with moelora.use_backend("triton"), fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
            with pytest.raises(NotImplementedError, match="jvp"):
                y = call(fwAD.make_dual(x, tangent))
                pytest.fail(f"{name}: returned a tangent {fwAD.unpack_dual(y).tangent}")


def test_int_task_ids_of_each_task_compile_once():
    """Multi-task training one task per batch, the task given as an int (moelora.set_task_ids or
    the wrapper's task_ids=): a module's int attribute is a constant to torch.compile, so each new
    task compiled the model again, and after recompile_limit (8) tasks dynamo ran it eagerly. The
    layers hold an int as a 0-d tensor (checked when set): one graph for every task (two through
    the wrapper's forward: its second call puts back what the first gave the layers, see
    test_wrapper_given_task_ids_and_aux_loss_mask_compiles_twice_then_never), like eager."""
    tasks = 10
    torch.manual_seed(0)
    stack = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 4))
    model = get_moelora_model(stack, MoELoRAConfig(target_modules=["0", "2"], router="task", num_experts=tasks,
                                                   r=2))
    randomize_adapters(model)
    x = torch.randn(3, 6)

    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(lambda m, x: m(x), fullgraph=True, backend=counter)
    for task in range(tasks):
        moelora.set_task_ids(model, task)
        torch.testing.assert_close(forward(model, x), model(x), msg=f"task {task}")
    assert counter.frame_count == 1, f"set_task_ids: {counter.frame_count} compilations for {tasks} tasks"
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(lambda m, x, task: m(x, task_ids=task), fullgraph=True, backend=counter)
    for task in range(tasks):
        torch.testing.assert_close(forward(model, x, task), model(x, task_ids=task), msg=f"task {task}")
    assert counter.frame_count == 2, f"task_ids=: {counter.frame_count} compilations for {tasks} tasks"
    with pytest.raises(ValueError, match=r"task id must be in \[0, 10\), got 10"):
        moelora.set_task_ids(model, tasks)


@pytest.mark.parametrize("given", ["aux_loss_mask", "task_ids"])
def test_wrapper_given_task_ids_and_aux_loss_mask_compiles_twice_then_never(given):
    """Training steps of one shape through MoELoRAModel's forward given ``aux_loss_mask=`` (or
    ``task_ids=``), new values each step: the wrapper keeps what a forward gave the layers until its
    next forward, which first puts back what they held before (MoELoRAModel.forward). The first
    call has nothing to put back and the second has: one more graph at the second step (documented
    in README and docs/integration.md section 5), and none after it, whatever the mask's (ids')
    values; training as eager."""
    torch.manual_seed(0)
    stack = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 4))
    settings = dict(router="task", num_experts=3) if given == "task_ids" else dict(num_experts=4, top_k=2)
    model = get_moelora_model(stack, MoELoRAConfig(target_modules=["0", "2"], r=2, **settings))
    randomize_adapters(model)
    model.train()
    x = torch.randn(5, 6)

    def loss_fn(m, x, value):
        return m(x, **{given: value}).square().mean() + m.aux_loss()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    for step in range(5):
        value = torch.randint(0, 3, (5,)) if given == "task_ids" else torch.rand(5) > 0.4
        grads = []
        for fn in (compiled, loss_fn):  # compiled first: its first call has nothing to put back
            model.zero_grad()
            loss = fn(model, x, value)
            loss.backward()
            grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
        for got, want in zip(*grads, strict=True):
            torch.testing.assert_close(got, want, msg=f"step {step}")
    assert counter.frame_count == 2, f"{counter.frame_count} compilations over 5 steps of one shape"


def test_switching_validation_does_not_compile_again():
    """The syncing checks skip themselves under torch.compile, so a compiled graph does not depend
    on moelora.validation; reading the switch while tracing guarded the graph on it, and toggling
    it (validation on in training, off for evaluation) compiled the model again."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(6, 6), num_experts=4, top_k=2, r=2)
    randomize_adapters(layer)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_layer_loss, fullgraph=True, backend=counter)
    x = torch.randn(3, 6)
    for enabled in (True, False, True):
        with moelora.validation(enabled):
            torch.testing.assert_close(compiled(layer, x), _layer_loss(layer, x))
    assert counter.frame_count == 1, f"{counter.frame_count} compilations"


@pytest.mark.parametrize("form", ["module", "function"])
def test_compiled_layer_sees_a_forward_set_on_its_base_layer_after_compilation(form):
    """A forward set on the base layer's instance (accelerate's hooks replace ``forward`` so) makes
    the layer call its base layer (the composed path). The fused path's test of ``base.__dict__``
    was not guarded by torch.compile: a layer compiled before the forward was set kept the fused
    path, which never calls the base layer, silently unlike eager (PyTorch itself honours a forward
    set on a plain submodule after compilation)."""
    import functools

    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(8, 6), num_experts=4, top_k=2, r=4).eval()
    randomize_adapters(layer)
    x = torch.randn(2, 3, 8)
    if form == "module":
        compiled = torch.compile(layer, backend="eager")  # the staleness is dynamo's: no need for AOTAutograd
        run = lambda: compiled(x)  # noqa: E731
    else:
        compiled = torch.compile(lambda m, x: m(x), backend="eager")
        run = lambda: compiled(layer, x)  # noqa: E731
    torch.testing.assert_close(run(), layer(x))
    base = layer.base_layer
    base.forward = functools.partial(lambda module, inp: nn.Linear.forward(module, inp) + 1.0, base)
    torch.testing.assert_close(run(), layer(x), msg="compiled with a forward set on the base layer")
    del base.forward
    torch.testing.assert_close(run(), layer(x), msg="compiled after the base layer's forward was removed")


def test_compiled_inference_forward_first_leaves_training_forwards_working(monkeypatch):
    """A single-expert layer routes by cached scalars (ids 0, weights 1), made outside inference mode
    so that training forwards can save them for backward. A compiled graph's outputs are inference
    tensors when it runs under torch.inference_mode whatever the graph says: a compiled evaluation
    under inference_mode before training cached inference tensors, and every compiled training
    step after it raised (Inference tensors cannot be saved for backward). A compiled graph caches
    nothing now."""
    from moelora.modules import adapter_base

    monkeypatch.setattr(adapter_base, "_SINGLE", {})  # as in a fresh process: nothing cached yet
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(8, 6), num_experts=1, r=4)
    randomize_adapters(layer)
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(5, 8)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B)]
    layer.zero_grad()
    layer(x).square().sum().backward()
    for got, p in zip(grads, (layer.lora_A, layer.lora_B)):
        torch.testing.assert_close(got, p.grad)


@torch._inductor.config.patch(force_disable_caches=True)  # a cached graph kept an old fake
def test_layer_on_transposed_input_trains_under_inductor_on_the_triton_backend():
    """Inductor asserts the strides a custom op's fake gives; the fused backward op's fake gave dx x's
    strides, the kernel a contiguous dx: a layer called on x.t() raised in its compiled backward
    (test_custom_ops.py checks every backward op's fake on such inputs). (The config's own patch: under torch
    2.11 monkeypatch's undo hid the setting, and a later AOTInductor compile raised on reading it.)"""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(8, 6), num_experts=4, top_k=2, r=4)
    randomize_adapters(layer)
    x_t = torch.randn(8, 5, requires_grad=True)

    def loss(layer, x_t):
        return layer(x_t.t()).square().sum()

    with moelora.use_backend("triton"):
        want = torch.autograd.grad(loss(layer, x_t), (x_t, layer.lora_A, layer.lora_B))
        got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="inductor")(layer, x_t),
                                  (x_t, layer.lora_A, layer.lora_B))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
