"""MoELoRALinear: identity at init, the routed formula, gradients, PEFT equivalence, errors."""

import copy
import math

import pytest
import torch
import torch.nn as nn

import moelora
from moelora import MoELoRALinear
from moelora.ops.reference import moe_lora_naive
from helpers import randomize_adapters, rel_err

LAYER_KINDS = {
    "softmax_topk": dict(num_experts=4, top_k=2),
    "topk_softmax": dict(num_experts=4, top_k=2, router="topk_softmax"),
    "threshold": dict(num_experts=4, top_k=3, router="threshold", threshold_eps=0.2),
    "shared_a": dict(num_experts=3, top_k=2, share_lora_a=True, lora_a_dropout=0.1),
    "task": dict(num_experts=3, router="task"),
    "task_shared": dict(num_experts=3, router="task", task_shared_lora=True),
    "single": dict(num_experts=1),
    "dora": dict(num_experts=1, use_dora=True),
    "rslora_gaussian": dict(num_experts=2, top_k=1, use_rslora=True, init_lora_weights="gaussian"),
}


def _base(d_in=12, d_out=10, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def _layer(kind, **extra):
    layer = MoELoRALinear(_base(), r=4, lora_alpha=8, **{**LAYER_KINDS[kind], **extra})
    layer.task_ids = torch.tensor([2, 0]) if "task" in kind else None
    return layer


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["softmax_topk", "task", "single"])
@pytest.mark.parametrize("x,error,match", [
    (lambda: torch.randint(0, 3, (3, 12)), TypeError, r"^x must be float16, bfloat16, float32 or float64, got "
                                                      r"torch.int64$"),
    (lambda: torch.ones(3, 12, dtype=torch.bool), TypeError, r"^x must be float16, bfloat16, float32 or float64, got "
                                                             r"torch.bool$"),
    (lambda: torch.randn(()), ValueError, r"^x must have shape \[\.\.\., d_in = 12\], got \(\)$"),
    (lambda: torch.randn(3, 13), ValueError, r"^x must have shape \[\.\.\., d_in = 12\], got \(3, 13\)$"),
], ids=["int", "bool", "0-d", "wider"])
def test_fused_layer_refuses_inputs_of_another_dtype_or_width(kind, backend, x, error, match):
    """The fused path never calls the base layer, whose errors name the input: an integer or bool x
    raised KeyError from the Triton launcher's dtype table, a 0-d x an IndexError (both backends).
    Each now raises naming x, as an x of another width does."""
    with moelora.use_backend(backend), pytest.raises(error, match=match):
        _layer(kind)(x())


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_fresh_layer_returns_base_output_exactly(kind):
    layer = _layer(kind).train()
    x = torch.randn(2, 5, 12)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kind", ["softmax_topk", "task", "single", "dora"])
def test_disabled_adapters_give_the_base_output(kind):
    """disable_adapters (PEFT's disable_adapter_layers) makes a live layer return its base layer's output."""
    layer = _layer(kind)
    randomize_adapters(layer)
    x = torch.randn(2, 3, 12)
    assert not torch.allclose(layer(x), layer.base_layer(x))
    layer.disable_adapters = True
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kind", ["softmax_topk", "topk_softmax", "shared_a", "task", "task_shared", "single"])
def test_layer_computes_routed_formula(kind):
    layer = _layer(kind).eval()
    randomize_adapters(layer)
    x = torch.randn(2, 5, 12)
    routing = layer.compute_routing(x)
    expected = moe_lora_naive(x, layer.lora_A, layer.lora_B, routing.ids, routing.weights,
                              scaling=2.0, base_out=layer.base_layer(x))
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kind", ["softmax_topk", "threshold", "shared_a", "task_shared", "dora"])
def test_gradients_reach_router_a_b_and_gamma(kind):
    layer = _layer(kind).train()
    randomize_adapters(layer)
    layer(torch.randn(2, 5, 12)).sum().backward()
    expected = ["lora_A", "lora_B"] + (["router.weight"] if layer.router is not None else []) \
        + (["lora_gamma"] if kind.startswith("task") else []) + (["lora_magnitude_vector"] if kind == "dora" else [])
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    for name in expected:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert layer.base_layer.weight.grad is not None  # the bare layer leaves freezing to the caller


def test_task_gamma_gets_gradient_at_init():
    layer = _layer("task").train()
    layer(torch.randn(2, 5, 12)).sum().backward()
    assert layer.lora_gamma.grad[[0, 2]].abs().min() > 0
    assert layer.lora_gamma.grad[1] == 0  # task 1 absent from the batch


def test_lora_a_dropout_masks_shared_a_in_training_only():
    layer = _layer("shared_a", lora_a_dropout=0.5)
    randomize_adapters(layer)
    x = torch.randn(2, 5, 12)
    layer.train()
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    keep = torch.empty_like(layer.lora_A).bernoulli_(0.5)
    routing = layer.compute_routing(x)
    expected = moe_lora_naive(x, layer.lora_A * keep / 0.5, layer.lora_B, routing.ids, routing.weights,
                              scaling=2.0, base_out=layer.base_layer(x))
    torch.testing.assert_close(out, expected)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_parameter_counts_follow_configuration():
    d_in, d_out, r, e = 12, 10, 4, 4
    per_expert = MoELoRALinear(_base(), num_experts=e, top_k=2, r=r)
    shared = MoELoRALinear(_base(), num_experts=e, top_k=2, r=r, share_lora_a=True)
    task = MoELoRALinear(_base(), num_experts=e, r=r, router="task", task_shared_lora=True)
    adapters = lambda m: sum(p.numel() for n, p in m.named_parameters() if not n.startswith("base_layer"))  # noqa
    assert adapters(per_expert) == e * r * d_in + e * d_out * r + e * d_in
    assert adapters(shared) == r * d_in + e * d_out * r + e * d_in
    assert adapters(task) == (e + 1) * (r * d_in + d_out * r) + e
    assert adapters(MoELoRALinear(_base(), num_experts=1, r=r)) == r * (d_in + d_out)


def test_half_precision_base_gets_fp32_adapters_and_keeps_output_dtype():
    layer = MoELoRALinear(_base().to(torch.bfloat16), num_experts=2, top_k=1, r=4)
    assert layer.lora_A.dtype == torch.float32 and layer.router.weight.dtype == torch.float32
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    assert torch.equal(layer(x), layer.base_layer(x))


def test_missing_task_ids_raise():
    layer = _layer("task")
    layer.task_ids = None
    with pytest.raises(RuntimeError, match="routes by task id but none is set"):
        layer(torch.randn(2, 12))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=4, top_k=5), "top_k must be in"),
    (dict(num_experts=0), "num_experts must be a positive int"),
    (dict(lora_dropout=-0.1), "lora_dropout must be in"),
    (dict(lora_a_dropout=1.0, share_lora_a=True), "lora_a_dropout must be in"),
    (dict(router="hash"), "router must be one of"),
    (dict(num_experts=2, top_k=1, use_dora=True), "use_dora needs a single expert"),
    (dict(num_experts=1, router="task", use_dora=True), "use_dora needs a single expert without task routing"),
    (dict(task_shared_lora=True), "task_shared_lora needs router='task'"),
    (dict(init_lora_weights="pissa"), "init_lora_weights must be"),
    (dict(r=0), "r must be a positive int"),
])
def test_bad_layer_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELoRALinear(_base(), **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(num_experts=4, top_k=2.0), dict(num_experts=4, top_k="2"), dict(lora_alpha="16"), dict(lora_alpha=math.inf),
    dict(lora_dropout="0.1"), dict(router="threshold", threshold_eps=-1.0),
    dict(router="threshold", threshold_eps=math.nan),
    dict(router="threshold", threshold_eps=0.5, threshold_ramp_steps=-5),
    dict(router_aux_loss_coef=-1.0), dict(router_z_loss_coef=math.inf), dict(num_experts=1, router_jitter_noise=-1.0),
    dict(r=4.0), dict(share_lora_a=1), dict(router_renormalize="yes"),
], ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_layer_constructors_check_their_fields_as_the_config(kwargs):
    """MoELoRALinear, MoELoRAConv and MoELoRAEmbedding reject what MoELoRAConfig rejects, with
    the same error naming the argument (LayerSettings' checks are the config's)."""
    with pytest.raises((TypeError, ValueError)) as config_error:
        moelora.MoELoRAConfig(target_modules=["q"], **kwargs)
    expected = config_error.value
    assert str(expected).startswith("MoELoRAConfig.")
    for make in (lambda: MoELoRALinear(_base(), **kwargs), lambda: moelora.MoELoRAConv(nn.Conv1d(3, 4, 3), **kwargs),
                 lambda: moelora.MoELoRAEmbedding(nn.Embedding(5, 4), **kwargs)):
        with pytest.raises(type(expected)) as error:
            make()
        assert "MoELoRAConfig." + str(error.value) == str(expected)


def test_settings_of_another_type_are_refused():
    """settings= takes a LayerSettings: a dict raises naming what it got."""
    with pytest.raises(TypeError, match=r"^settings must be a LayerSettings, got dict$"):
        MoELoRALinear(_base(), settings={"r": 4})


def test_the_threshold_schedule_settings_are_the_routers_eps_ramp():
    """threshold_eps_start, threshold_eps and threshold_ramp_steps make the router's eps go from the start value
    to threshold_eps over the steps."""
    layer = MoELoRALinear(_base(), num_experts=4, top_k=3, router="threshold", threshold_eps_start=0.6,
                          threshold_eps=0.1, threshold_ramp_steps=4)
    eps = []
    for _ in range(5):
        eps.append(layer.router.eps)
        layer.router.step()
    assert eps == pytest.approx([0.6, 0.475, 0.35, 0.225, 0.1])


def test_gaussian_init_draws_a_with_std_one_over_r_as_peft():
    """init_lora_weights="gaussian" (PEFT's): A ~ N(0, 1 / r^2), B zero."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(1024, 8), num_experts=2, top_k=1, r=8, init_lora_weights="gaussian")
    assert abs(layer.lora_A.std().item() * 8 - 1) < 0.05 and not layer.lora_B.any()


def test_a_task_merge_needs_an_int_task():
    """A task-routed layer's static factors (merge, PEFT export) need an int task: True (a bool) is refused, not
    read as task 1."""
    layer = _layer("task")
    with pytest.raises(ValueError, match=r"needs task in \[0, 3\) \(an int\), got True"):
        layer.delta_weight(task=True)


def test_rejects_non_linear_base():
    with pytest.raises(TypeError, match="wraps nn.Linear or transformers Conv1D"):
        MoELoRALinear(nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("use_dora,use_rslora", [(False, False), (False, True), (True, False)])
def test_single_expert_equals_peft_lora(use_dora, use_rslora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=use_dora, use_rslora=use_rslora,
                     lora_dropout=0.1, init_lora_weights=False)
    peft_model = get_peft_model(base, cfg).eval()
    ours = nn.Sequential(MoELoRALinear(base[0].base_layer, num_experts=1, r=4, lora_alpha=8, use_dora=use_dora,
                                       use_rslora=use_rslora, lora_dropout=0.1), nn.ReLU(),
                         MoELoRALinear(base[2].base_layer, num_experts=1, r=4, lora_alpha=8, use_dora=use_dora,
                                       use_rslora=use_rslora, lora_dropout=0.1)).eval()
    with torch.no_grad():
        for i in (0, 2):
            ours[i].lora_A[0].copy_(peft_model.base_model.model[i].lora_A["default"].weight)
            ours[i].lora_B[0].copy_(peft_model.base_model.model[i].lora_B["default"].weight)
            if use_dora:
                mag = peft_model.base_model.model[i].lora_magnitude_vector["default"].weight
                ours[i].lora_magnitude_vector.copy_(mag * 1.1)
                mag.mul_(1.1)
    x = torch.randn(3, 7, 12)
    expected = peft_model(x)
    assert not torch.allclose(expected, base[2].base_layer(torch.relu(base[0].base_layer(x))))
    out = ours(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # every adapter gradient as PEFT's (DoRA: the fused path, its magnitude vector included)
    g = torch.randn(out.shape)
    theirs = {n.replace("base_model.model.", ""): p for n, p in peft_model.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in ours.named_parameters() if "base_layer" not in n}
    names = {f"{i}.{kind}": (f"{i}.lora_{kind}.default.weight" if kind in ("A", "B")
                             else f"{i}.lora_magnitude_vector.default.weight")
             for i in (0, 2) for kind in ("A", "B") + (("magnitude_vector",) if use_dora else ())}
    grads_theirs = torch.autograd.grad((expected * g).sum(), [theirs[t] for t in names.values()])
    grads_mine = torch.autograd.grad((out * g).sum(), [mine[f"{m.split('.')[0]}.lora_{m.split('.')[1]}"]
                                                       for m in names])
    for name, got, want in zip(names, grads_mine, grads_theirs):
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-4, atol=1e-6, msg=name)
    # training mode: same dropout draws give the same result (dropout masks drawn in the same order)
    peft_model.train()
    ours.train()
    torch.manual_seed(3)
    expected = peft_model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("base_kind", ["linear", "linear_no_bias", "gpt2_conv1d"])
def test_dora_equals_peft_dora_in_float64(base_kind, backend):
    """DoRA (E = 1) against PEFT's DoRA layer with the same A, B and magnitude, in float64: output and the
    x / A / B / magnitude gradients in eval (the fused op) and in training with LoRA dropout (the composed
    path; the same seed draws PEFT's mask), over nn.Linear with and without a bias and a GPT-2 Conv1D
    (fan_in_fan_out); the merged weight is PEFT's merged weight bit for bit, and unmerging gives the base
    weight back within its rounding."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = (Conv1D(10, 12) if base_kind == "gpt2_conv1d" else nn.Linear(12, 10, bias=base_kind == "linear")).double()
    peft_model = get_peft_model(nn.Sequential(copy.deepcopy(base)), LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], use_dora=True, lora_dropout=0.3, init_lora_weights=False,
        fan_in_fan_out=base_kind == "gpt2_conv1d"))
    theirs = peft_model.base_model.model[0]
    ours = MoELoRALinear(base, num_experts=1, r=4, lora_alpha=8, use_dora=True, lora_dropout=0.3)
    their_params = [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                    theirs.lora_magnitude_vector["default"].weight]
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_()
        their_params[2].mul_(torch.rand(10, dtype=torch.float64) + 0.5)  # not the norm of W + s B A
        for mine, their in zip((ours.lora_A[0], ours.lora_B[0], ours.lora_magnitude_vector), their_params):
            mine.copy_(their)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    for train in (False, True):
        peft_model.train(train), ours.train(train)
        x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(7)
        expected = peft_model(x_theirs)
        with moelora.use_backend(backend):
            torch.manual_seed(7)
            out = ours(x_ours)
            dy = torch.randn_like(out)
            grads = torch.autograd.grad(out, [x_ours, ours.lora_A, ours.lora_B, ours.lora_magnitude_vector], dy)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        for name, got, want in zip(["x", "A", "B", "magnitude"], grads,
                                   torch.autograd.grad(expected, [x_theirs] + their_params, dy)):
            torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-12, atol=1e-12, msg=name)
    peft_model.eval(), ours.eval()
    before = base.weight.detach().clone()
    theirs.merge(), ours.merge()
    assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
    ours.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, before, rtol=0, atol=4 * torch.finfo(torch.float64).eps)


@pytest.mark.parametrize("kind,extra", [("threshold", {}), ("softmax_topk", dict(router_jitter_noise=0.2)),
                                        ("shared_a", {}), ("threshold", dict(router_jitter_noise=0.2)),
                                        ("threshold", dict(threshold_eps_start=0.6, threshold_ramp_steps=4))],
                         ids=["threshold", "jitter", "a_dropout", "threshold_jitter", "threshold_ramp"])
def test_composed_path_draws_random_numbers_as_the_fused_path(kind, extra):
    """The composed path (here for a base layer with a forward hook) draws the router's threshold
    noise or jitter factors once, in the router, in the fused path's order (jitter factors, then
    threshold noise): from the same seed it gives the fused path's output and leaves the generator
    where the fused path does."""
    fused = _layer(kind, **extra).train()
    randomize_adapters(fused)
    composed = copy.deepcopy(fused)
    composed.base_layer.register_forward_hook(lambda module, args, out: None)
    x = torch.randn(4, 6, 12)
    results = []
    for layer in (fused, composed):
        torch.manual_seed(5)
        results.append((layer(x), torch.rand(3)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    assert torch.equal(results[1][1], results[0][1])


@pytest.mark.parametrize("kind", ["softmax_topk", "dora"])
def test_base_layer_with_an_accelerate_style_forward_runs_it(kind):
    """accelerate's hooks (device_map dispatch, offloading: add_hook_to_module) replace the base
    layer's ``forward`` on the instance instead of registering a forward hook. The layer must run
    that forward, as it runs a registered hook, not the fused op's own base GEMM, which would
    skip it: here it doubles the base's input (as a hook moving x to another device changes it)."""
    plain = _layer(kind)
    randomize_adapters(plain)
    hooked, registered = copy.deepcopy(plain), copy.deepcopy(plain)
    plain_forward = hooked.base_layer.forward
    hooked.base_layer.forward = lambda inp, *args, **kwargs: plain_forward(2 * inp, *args, **kwargs)
    registered.base_layer.register_forward_pre_hook(lambda module, args: (2 * args[0],))
    x = torch.randn(4, 12)
    expected = registered(x)
    assert not torch.allclose(expected, plain(x))
    torch.testing.assert_close(hooked(x), expected, rtol=0, atol=0)


def test_scaling_is_alpha_over_r_or_sqrt_r():
    assert MoELoRALinear(_base(), num_experts=1, r=4, lora_alpha=8).scaling == 2.0
    assert MoELoRALinear(_base(), num_experts=1, r=4, lora_alpha=8, use_rslora=True).scaling == 8 / math.sqrt(4)


def test_forward_is_the_fused_op(monkeypatch):
    """The layer's forward is one call of moe_lora_linear (which owns the base GEMM; the layer calls
    it without its argument checks); DoRA with LoRA dropout in training runs the composed path: base
    layer, then moe_lora."""
    calls = []
    real_fused, real_op = moelora.modules.linear.unchecked_moe_lora_linear, moelora.modules.adapter_base.routed_moe_lora

    def spy_fused(*args, **kwargs):
        calls.append("fused")
        return real_fused(*args, **kwargs)

    def spy_op(*args, **kwargs):
        calls.append("moe_lora" if kwargs.get("base_out") is None else "moe_lora+base")
        return real_op(*args, **kwargs)

    monkeypatch.setattr(moelora.modules.linear, "unchecked_moe_lora_linear", spy_fused)
    monkeypatch.setattr(moelora.modules.adapter_base, "routed_moe_lora", spy_op)
    _layer("softmax_topk")(torch.randn(3, 12))
    assert calls == ["fused"]
    calls.clear()
    _layer("dora")(torch.randn(3, 12))  # DoRA without LoRA dropout: the fused op too
    assert calls == ["fused"]
    calls.clear()
    _layer("dora", lora_dropout=0.1).train()(torch.randn(3, 12))  # with it, a second base GEMM over x_lora
    assert calls == ["moe_lora"]
    calls.clear()
    _layer("dora", lora_dropout=0.1).eval()(torch.randn(3, 12))
    assert calls == ["fused"]


def test_layers_are_built_from_settings_or_the_same_keywords():
    """A layer takes LayerSettings (checked once) or its fields as keywords, not both; a config
    gives each injected layer its settings (per-layer experts, rank and alpha patterns)."""
    from moelora.modules.adapter_base import LayerSettings

    settings = LayerSettings(num_experts=3, top_k=2, r=4, router="topk_softmax", share_lora_a=True)
    torch.manual_seed(0)
    by_settings = MoELoRALinear(nn.Linear(6, 5), settings)
    torch.manual_seed(0)
    by_keywords = MoELoRALinear(nn.Linear(6, 5), num_experts=3, top_k=2, r=4, router="topk_softmax",
                                share_lora_a=True)
    assert by_settings.settings == by_keywords.settings == settings
    for (name, a), (_, b) in zip(by_settings.state_dict().items(), by_keywords.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match="not both"):
        MoELoRALinear(nn.Linear(6, 5), settings, r=8)
    with pytest.raises(ValueError, match="top_k must be in"):
        LayerSettings(num_experts=2, top_k=3)
    config = moelora.MoELoRAConfig(target_modules=["q"], num_experts=[2, 3], r=4, lora_alpha=8, rank_pattern={"q": 8},
                                   alpha_pattern={r"layers\.1\.q": 2})
    layer = config.layer_settings("layers.1.q", 1, 2)
    assert (layer.num_experts, layer.r, layer.lora_alpha, layer.top_k) == (3, 8, 2, 2)


def test_config_and_layer_settings_share_their_defaults():
    """MoELoRAConfig declares the layer fields again (it is the user-facing, PEFT-shaped config):
    their defaults must stay those of LayerSettings."""
    import dataclasses

    from moelora.modules.adapter_base import LayerSettings

    config_defaults = {f.name: f.default for f in dataclasses.fields(moelora.MoELoRAConfig)}
    for f in dataclasses.fields(LayerSettings):
        assert config_defaults[f.name] == f.default, f.name


@pytest.mark.parametrize("make", [lambda: MoELoRALinear(_base(6, 5), num_experts=1, r=2),
                                  lambda: moelora.MoELoRAEmbedding(nn.Embedding(7, 5), num_experts=1, r=2)],
                         ids=["linear", "embedding"])
def test_single_expert_layer_trains_after_a_first_forward_under_inference_mode(make, monkeypatch):
    """The single expert's cached ids and weights are made outside inference mode: a first forward
    under torch.inference_mode (an evaluation before training) cached inference tensors, which the
    Triton kernels' training forward then could not save for backward (RuntimeError)."""
    from moelora.modules import adapter_base

    monkeypatch.setattr(adapter_base, "_SINGLE", {})  # as in a fresh process
    layer = make()
    randomize_adapters(layer)
    x = torch.tensor([[1, 3, 6]]) if isinstance(layer, moelora.MoELoRAEmbedding) else torch.randn(1, 3, 6)
    with moelora.use_backend("triton"):
        with torch.inference_mode():
            expected = layer(x)
        y = layer(x)
        y.sum().backward()
    torch.testing.assert_close(y.detach(), expected)
    assert sum(p.grad.abs().sum() for p in (layer.lora_A, layer.lora_B)) > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_composed_path_routes_autocast_input_as_the_fused_path(backend):
    """Under torch.autocast the fused op reads x in autocast's dtype, its router too (x is read
    once); the composed path (a base layer with a forward hook) routes the same rounded x, so both
    give the same logits, experts and routing statistics (the composed path's router used to read
    the fp32 x: other logits, aux loss and z-loss, and other experts at near ties)."""
    fused = _layer("softmax_topk", num_experts=8, top_k=1).train()
    randomize_adapters(fused)
    composed = copy.deepcopy(fused)
    composed.base_layer.register_forward_hook(lambda module, args, out: None)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    results = []
    with moelora.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        for layer in (fused, composed):
            y = layer(x)
            results.append((y, dict(layer.last_router_stats), layer.last_aux_loss))
    (y, stats, aux), (y_c, stats_c, aux_c) = results
    assert y.dtype == y_c.dtype == torch.bfloat16
    assert torch.equal(stats["load"], stats_c["load"])
    torch.testing.assert_close(stats_c["z_loss"], stats["z_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_c, aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_c.float(), y.float(), rtol=2e-2, atol=2e-2)


_GRAD_INSIDE_INFERENCE_LAYERS = {
    "linear": lambda: (MoELoRALinear(_base(6, 5), num_experts=4, top_k=2, r=2), torch.randn(2, 3, 6)),
    "linear_shared_a": lambda: (MoELoRALinear(_base(6, 5), num_experts=4, top_k=2, r=2, share_lora_a=True),
                                torch.randn(5, 6)),
    "conv": lambda: (moelora.MoELoRAConv(nn.Conv2d(3, 4, 3, padding=1), num_experts=3, top_k=2, r=2),
                     torch.randn(1, 3, 4, 4)),
    "embedding": lambda: (moelora.MoELoRAEmbedding(nn.Embedding(7, 5), num_experts=3, top_k=2, r=2),
                          torch.tensor([[1, 3, 6]])),
    "ffn": lambda: (moelora.MoEFFN(nn.Linear(6, 8), nn.Linear(8, 6), torch.nn.functional.silu, 3, 2,
                                   router="softmax_topk"), torch.randn(2, 3, 6)),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", list(_GRAD_INSIDE_INFERENCE_LAYERS))
def test_layers_run_under_enable_grad_inside_inference_mode(kind, backend):
    """torch.enable_grad() inside torch.inference_mode() turns grad mode on but records no graph
    (nn.Linear's output there does not require grad). The Triton paths' autograd.Functions recorded
    one and tried to save the inference tensors they made: RuntimeError "Inference tensors cannot be
    saved for backward"; they run as in inference now, with the outputs of a plain forward."""
    torch.manual_seed(0)
    layer, x = _GRAD_INSIDE_INFERENCE_LAYERS[kind]()
    randomize_adapters(layer)
    layer.train()
    with moelora.use_backend(backend):
        expected = layer(x)
        with torch.inference_mode(), torch.enable_grad():
            y = layer(x)
    assert not y.requires_grad
    torch.testing.assert_close(y, expected.detach())


FAKE_MODE_LAYERS = {
    "single": dict(num_experts=1, r=4),
    "dora": dict(num_experts=1, r=4, use_dora=True),
    "softmax_topk": dict(num_experts=3, top_k=2, r=4),
    "threshold": dict(num_experts=3, top_k=2, r=4, router="threshold", threshold_eps=0.2, threshold_ramp_steps=4),
    "grouped": dict(num_experts=16, top_k=2, r=8),
    "task": dict(num_experts=3, router="task", r=4, task_shared_lora=True),
}


@pytest.mark.parametrize("kind", list(FAKE_MODE_LAYERS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layers_run_forward_and_backward_under_a_fake_tensor_mode(kind, training):
    """An eager forward and backward under a FakeTensorMode (memory and FLOP estimators; FSDP2's and
    torch.export's shape passes) with the default backend: fake outputs and gradients of the real shapes
    and dtypes, with the syncing checks on. Where the Triton kernels run (CUDA, or the interpreter here)
    they were launched on the fake tensors (the interpreter raised copying their storage; on a GPU their
    data pointers are no memory), and task routing's range check read the fake ids on the host
    (DataDependentOutputException); and a single expert's routing scalars, cached by a real forward before,
    were real tensors, which the mode refuses."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    MoELoRALinear(nn.Linear(16, 12), num_experts=1, r=4)(torch.randn(3, 16))  # caches the single expert's scalars
    with FakeTensorMode(), moelora.use_backend("auto"), moelora.validation(True):
        layer = MoELoRALinear(nn.Linear(16, 12), **FAKE_MODE_LAYERS[kind]).train(training)
        if kind == "task":
            moelora.set_task_ids(layer, torch.tensor([2, 0]))
        x = torch.randn(2, 5, 16, requires_grad=True)
        y = layer(x)
        y.sum().backward()
    assert isinstance(y, FakeTensor) and y.shape == (2, 5, 12) and y.dtype == torch.float32
    assert isinstance(x.grad, FakeTensor) and x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.shape == p.shape, name


def test_triton_backend_asked_for_under_a_fake_tensor_mode_names_the_mode():
    """backend='triton' runs no kernel on fake tensors: a ValueError naming the FakeTensorMode and what
    runs there instead (the interpreter raised copying a fake tensor's storage)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), moelora.use_backend("triton"):
        layer = MoELoRALinear(nn.Linear(16, 12), num_experts=3, top_k=2, r=4)
        with pytest.raises(ValueError, match="FakeTensorMode.*backend='auto' or 'torch'"):
            layer(torch.randn(2, 5, 16))


@pytest.mark.parametrize("kind", ["single", "dora", "softmax_topk", "grouped", "task"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("x_device, layer_device", [("meta", "cpu"), ("cpu", "meta")])
def test_input_on_another_device_than_the_layer_names_both(kind, backend, x_device, layer_device):
    """x on one device and the layer on another (the meta device standing in for a second one): a ValueError
    naming x and both devices. The fused path ran the Triton kernels on x's device with the weights' pointers
    into the other's memory (the interpreter: "Cannot copy out of meta tensor"; a GPU's direct launch checks
    no pointer), or failed in a torch op naming neither argument."""
    layer = MoELoRALinear(nn.Linear(16, 12), **FAKE_MODE_LAYERS[kind]).to(layer_device)
    if kind == "task":
        moelora.set_task_ids(layer, torch.tensor([2, 0]))
    x = torch.randn(2, 5, 16, device=x_device)
    with moelora.use_backend(backend), pytest.raises(ValueError, match=f"x is on {x_device} but the module's "
                                                                       f"weights are on {layer_device}"):
        layer(x)


@pytest.mark.parametrize("kind", ["single", "dora", "softmax_topk", "task"])
@pytest.mark.parametrize("convert", ["half", "double"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_converted_after_creation_runs_as_its_converted_weights(kind, convert, backend):
    """``.half()`` / ``.double()`` after creation convert every float tensor of the layer (adapters, router,
    DoRA's magnitude, gamma; the step counter stays int64), as PEFT's layers after ``model.half()``; the
    forward and backward then compute the float64 function of the converted weights (router logits in fp32
    from the fp16 router weight; fp64 for fp64 x)."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 12), **FAKE_MODE_LAYERS[kind]).train()
    randomize_adapters(layer)
    if kind == "dora":
        with torch.no_grad():
            layer.lora_magnitude_vector.abs_().add_(0.5)
    layer = getattr(layer, convert)()
    dtype = layer.base_layer.weight.dtype
    assert {t.dtype for t in [*layer.parameters(), *layer.buffers()] if t.is_floating_point()} == {dtype}
    if kind == "task":
        moelora.set_task_ids(layer, torch.tensor([2, 0]))
    ref = copy.deepcopy(layer).double()
    x = torch.randn(2, 5, 16).to(dtype).requires_grad_()
    g = torch.randn(2, 5, 12)
    with moelora.use_backend(backend):
        y = layer(x)
        y.backward(g.to(dtype))
    x64 = x.detach().double().requires_grad_()
    with moelora.use_backend("torch"):
        y64 = ref(x64)
        y64.backward(g.double())
    tol = 4e-3 if dtype == torch.float16 else 1e-10
    assert y.dtype == dtype and rel_err(y, y64) < tol
    assert rel_err(x.grad, x64.grad) < tol
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        if p.grad is not None:
            assert p.grad.dtype == dtype and rel_err(p.grad, q.grad) < tol, name


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "composed"])
def test_dora_with_bias_matches_float64_reference_on_both_paths(hooked):
    """PEFT's DoRA, m / ||W + s B A||_row (.) (x W^T + s B A x) + b: the bias is added after the magnitude scale,
    on the fused path and on the composed one (a base layer with a forward hook), whose output includes the bias
    and must take it out before scaling."""
    base = nn.Linear(16, 12).double()
    layer = MoELoRALinear(base, num_experts=1, r=4, lora_alpha=8, use_dora=True).double().eval()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
        layer.lora_magnitude_vector.copy_(torch.rand_like(layer.lora_magnitude_vector) + 0.5)
        base.bias.copy_(torch.randn_like(base.bias))
    if hooked:
        base.register_forward_hook(lambda module, args, out: None)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    s = layer.scaling
    a, b, w = layer.lora_A[0], layer.lora_B[0], base.weight
    norm = torch.linalg.norm(w + s * b @ a, dim=1)
    expected = layer.lora_magnitude_vector / norm * (x @ w.t() + s * x @ a.t() @ b.t()) + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "composed"])
def test_dora_over_a_bfloat16_base_keeps_its_dtype_and_matches_float64_reference(hooked):
    """DoRA over a bfloat16 base with its fp32 adapters (PEFT's layout): the output has the base's dtype, as every
    other layer's (the magnitude scale runs in the adapters' fp32 and is cast back), on the fused path and on the
    composed one (a base layer with a forward hook), and equals m / ||W + s B A||_row (.) (x W^T + s B A x) + b in
    float64 within bfloat16's rounding; every adapter gradient has its parameter's dtype and the float64 values."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12).to(torch.bfloat16)
    layer = MoELoRALinear(base, num_experts=1, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False).eval()
    assert layer.lora_magnitude_vector.dtype == torch.float32
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.rand(12) + 0.5)
    if hooked:
        base.register_forward_hook(lambda module, args, out: None)
    x = torch.randn(3, 5, 16).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, 12)
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude_vector]
    dy = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, params, dy.to(out.dtype))
    a, b, m = (p.detach().double().requires_grad_() for p in params)
    s, w, xd = layer.scaling, base.weight.double(), x.double()
    norm = torch.linalg.norm(w + s * b[0] @ a[0], dim=1).detach()  # a constant, as PEFT's
    expected = m / norm * (xd @ w.t() + s * xd @ a[0].t() @ b[0].t()) + base.bias.double()
    assert rel_err(out, expected) < 2e-2
    for name, p, got, want in zip(["A", "B", "magnitude"], params, grads, torch.autograd.grad(expected, [a, b, m], dy)):
        assert got.dtype == p.dtype and rel_err(got, want) < 3e-2, name


def test_dora_lora_dropout_changes_nothing_in_eval_on_the_composed_path():
    """LoRA dropout is inert in eval: a DoRA layer with lora_dropout=0.3 computes what the same layer with
    lora_dropout=0 does, on the composed path too (a base layer with a forward hook that changes its output):
    in eval, PEFT's DoRA takes the base output less its bias, not a second GEMM x W^T, which the hooked base's
    output need not equal."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double()
    base.register_forward_hook(lambda module, args, out: out - 0.25)
    outputs = []
    for p in (0.0, 0.3):
        torch.manual_seed(1)
        layer = MoELoRALinear(base, num_experts=1, r=4, lora_alpha=8, use_dora=True, lora_dropout=p).double()
        with torch.no_grad():
            layer.lora_B.normal_()
            layer.lora_magnitude_vector.mul_(torch.rand(10, dtype=torch.float64) + 0.5)
        x = torch.randn(3, 5, 12, dtype=torch.float64)
        outputs.append(layer.eval()(x))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    # the adapter is live: its output is not the hooked base's
    assert (outputs[1] - base(x)).abs().max() > 1e-3


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "composed"])
def test_dora_with_a_shared_a_matches_float64_reference(hooked):
    """DoRA over MoSLD's shared A (lora_A [r, d_in], no expert dim): m / ||W + s B A||_row (.) (x W^T + s B A x) + b,
    the norm read from the shared A itself, at init (the magnitude starts at the row norms) and with trained
    factors, on the fused path and on the composed one (a base layer with a forward hook)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12).double()
    layer = MoELoRALinear(base, num_experts=1, r=4, lora_alpha=8, use_dora=True, share_lora_a=True,
                          init_lora_weights=False).double().eval()
    assert layer.lora_A.shape == (4, 16)
    s, a, b, w = layer.scaling, layer.lora_A, layer.lora_B[0], base.weight
    torch.testing.assert_close(layer.lora_magnitude_vector, torch.linalg.norm(w + s * b @ a, dim=1),
                               rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.rand(12, dtype=torch.float64) + 0.5)
    if hooked:
        base.register_forward_hook(lambda module, args, out: None)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    norm = torch.linalg.norm(w + s * b @ a, dim=1)
    expected = layer.lora_magnitude_vector / norm * (x @ w.t() + s * x @ a.t() @ b.t()) + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_dora_magnitude_starts_at_the_unrounded_row_norms_under_autocast():
    """A DoRA layer built under torch.autocast: its magnitude starts at the row norms of W + s B A in fp32, as
    outside autocast (autocast would round the addmm to bfloat16)."""
    base = _base(16, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer = MoELoRALinear(base, num_experts=1, r=4, lora_alpha=8, use_dora=True)
    assert layer.lora_magnitude_vector.dtype == torch.float32
    torch.testing.assert_close(layer.lora_magnitude_vector, torch.linalg.norm(base.weight, dim=1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "composed"])
def test_dora_with_lora_a_dropout_in_training_scales_by_the_kept_fraction(hooked):
    """DoRA with MoSLD's A-dropout in training: A (.) M with the dropout's 1 / (1 - p) folded into s, in the LoRA
    term and in the norm, on the fused path and on the composed one (a base layer with a forward hook)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12).double()
    layer = MoELoRALinear(base, num_experts=1, r=4, lora_alpha=8, use_dora=True, share_lora_a=True,
                          lora_a_dropout=0.5, init_lora_weights=False).double().train()
    if hooked:
        base.register_forward_hook(lambda module, args, out: None)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.manual_seed(5)
    a, keep_scale = layer._effective_A()  # the mask the forward draws from the same seed
    assert keep_scale == 2.0 and 0 < int((a == 0).sum()) < a.numel()
    s, b, w = layer.scaling * keep_scale, layer.lora_B[0], base.weight
    norm = torch.linalg.norm(w + s * b @ a, dim=1)
    expected = layer.lora_magnitude_vector / norm * (x @ w.t() + s * x @ a.t() @ b.t()) + base.bias
    torch.manual_seed(5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kwargs", [dict(num_experts=3, router="task"), dict(num_experts=3, router="task",
                                    task_shared_lora=True), dict(num_experts=2, router="task"), dict(num_experts=1)],
                         ids=["task", "task_shared", "task_top_k_above_tasks", "single"])
def test_top_k_is_one_where_routing_is_static(kwargs):
    """top_k is ignored by task routing and at E = 1 (the Args): every token uses one expert, and the layer's
    top_k (its repr too) says 1, whatever top_k was given."""
    layer = MoELoRALinear(_base(), r=4, top_k=3 if kwargs["num_experts"] > 1 else 2, **kwargs)
    assert layer.top_k == 1
    assert "top_k=1," in repr(layer)


def test_task_shared_lora_with_random_b_init_starts_live():
    """init_lora_weights=False draws every B at random (PEFT's non-identity start), the task-shared LoRA's too: with
    every task gate at 0 the shared LoRA alone makes the layer differ from its base. The default init zeroes the
    shared B (the layer starts as its base)."""
    x = torch.randn(2, 3, 12)
    for init, live in ((False, True), (True, False)):
        layer = _layer("task_shared", init_lora_weights=init)
        assert torch.equal(layer.lora_gamma, torch.zeros(3))
        assert bool(layer.lora_B[-1].ne(0).any()) == live
        with torch.no_grad():
            delta = (layer(x) - layer.base_layer(x)).abs().max()
        assert (delta > 1e-3) if live else (delta == 0)


def test_bias_assigned_to_the_layer_is_the_base_layers():
    """layer.bias = p (as weight tying does for weight) sets the base layer's bias, which the forward adds."""
    layer = _layer("softmax_topk")
    randomize_adapters(layer)
    x = torch.randn(3, 12)
    with torch.no_grad():
        before = layer(x)
        new_bias = nn.Parameter(layer.base_layer.bias.detach() + 1.0)
        layer.bias = new_bias
        assert layer.base_layer.bias is new_bias and layer.bias is new_bias
        assert "bias" not in layer._parameters
        torch.testing.assert_close(layer(x), before + 1.0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["task", "task_shared"])
def test_merging_a_task_out_of_range_is_refused_naming_it(kind):
    """A task-routed layer over 3 tasks merges tasks 0..2: task 3 (one past the last; with a shared LoRA, the index
    of the shared expert) and -1 are refused with the range, the layer left unmerged and its base weight as it was;
    the last task merges."""
    layer = _layer(kind)
    randomize_adapters(layer)
    before = layer.base_layer.weight.detach().clone()
    for task in (3, -1):
        with pytest.raises(ValueError, match=rf"needs task in \[0, 3\) \(an int\), got {task}$"):
            layer.merge(task=task)
        assert not layer.merged and torch.equal(layer.base_layer.weight, before)
    layer.merge(task=2)
    assert layer.merged and layer.merged_task == 2


@pytest.mark.parametrize("kind", ["softmax_topk", "single", "dora"])
def test_extra_arguments_reach_the_base_layer(kind):
    """Extra forward arguments go to the base layer, as PEFT's layers pass them: nn.Linear takes none, so the layer
    raises nn.Linear's own TypeError instead of dropping them (the fused op never calls the base layer)."""
    layer = _layer(kind)
    x = torch.randn(3, 12)
    with pytest.raises(TypeError, match="unexpected keyword argument 'scale'"):
        layer(x, scale=2.0)
    with pytest.raises(TypeError, match="positional argument"):
        layer(x, 2.0)


@pytest.mark.parametrize("kind", ["task_shared", "single", "shared_a"])
def test_linear_layers_hold_no_projection_selector(kind):
    """The fused linear op reads x itself: MoELoRALinear has no constant buffer (the [E, r, E*r] selector of
    conv and embedding layers would be dead memory, moved and rebuilt on every .to())."""
    layer = _layer(kind)
    assert not [name for name, _ in layer.named_buffers() if not name.startswith("router.")]
