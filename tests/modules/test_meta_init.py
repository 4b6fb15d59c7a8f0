"""Meta-device init (FSDP2, torchtitan, accelerate's init_empty_weights): a module built on the
meta device, made real by ``to_empty`` and initialised by ``reset_parameters()`` on each module
that has it equals one built normally. ``to_empty`` leaves memory uninitialised; here every
saved tensor is then filled with NaN (helpers.made_real_with_garbage), so that anything a reset
misses shows. ``model.apply`` visits children first, the constructors' order: the same seed
gives the same module bitwise; a loop over ``model.modules()`` visits parents first (the same
distributions, other draws: compared with a normally built module reset the same way)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moelora import MoELoRAConv, MoELoRAEmbedding, MoELoRALinear
from moelora.modules.ffn import MoEFFN
from moelora.modules.molex import MoLEx
from helpers import made_real_with_garbage, reset_every_module

pytestmark = pytest.mark.usefixtures("single_torch_thread")

D = torch.float64
THRESHOLD = dict(num_experts=4, top_k=3, router="threshold", threshold_eps=0.3, threshold_eps_start=0.1,
                 threshold_ramp_steps=5)
# name -> (layer class, base layer maker, layer arguments, input maker)
LAYERS = {
    "linear_topk": (MoELoRALinear, lambda: nn.Linear(12, 10, dtype=D), dict(num_experts=4, top_k=2, r=4),
                    lambda: torch.randn(5, 12, dtype=D)),
    "linear_threshold": (MoELoRALinear, lambda: nn.Linear(12, 10, dtype=D), dict(r=4, **THRESHOLD),
                         lambda: torch.randn(5, 12, dtype=D)),
    "linear_task_shared": (MoELoRALinear, lambda: nn.Linear(12, 10, dtype=D),
                           dict(num_experts=3, router="task", task_shared_lora=True, r=4),
                           lambda: torch.randn(2, 3, 12, dtype=D)),
    "linear_shared_a_gaussian": (MoELoRALinear, lambda: nn.Linear(12, 10, dtype=D),
                                 dict(num_experts=3, top_k=2, r=4, share_lora_a=True,
                                      init_lora_weights="gaussian"),
                                 lambda: torch.randn(5, 12, dtype=D)),
    "linear_random_b": (MoELoRALinear, lambda: nn.Linear(12, 10, dtype=D),
                        dict(num_experts=3, top_k=2, r=4, init_lora_weights=False),
                        lambda: torch.randn(5, 12, dtype=D)),
    "linear_dora": (MoELoRALinear, lambda: nn.Linear(12, 10, dtype=D), dict(num_experts=1, r=4, use_dora=True),
                    lambda: torch.randn(5, 12, dtype=D)),
    "embedding_task": (MoELoRAEmbedding, lambda: nn.Embedding(11, 8, padding_idx=0, dtype=D),
                       dict(num_experts=3, router="task", r=4), lambda: torch.tensor([[0, 3, 5], [1, 2, 10]])),
    "embedding_threshold": (MoELoRAEmbedding, lambda: nn.Embedding(11, 8, dtype=D), dict(r=4, **THRESHOLD),
                            lambda: torch.tensor([[0, 3, 5], [1, 2, 10]])),
    "conv_grouped": (MoELoRAConv, lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, dtype=D),
                     dict(num_experts=3, top_k=2, r=4), lambda: torch.randn(2, 4, 5, 5, dtype=D)),
}


def _meta_built(make) -> nn.Module:
    with torch.device("meta"):
        module = make()
    return made_real_with_garbage(module)


def _assert_same_state(got: nn.Module, expected: nn.Module) -> None:
    got, expected = got.state_dict(), expected.state_dict()
    assert list(got) == list(expected)
    for name, t in got.items():
        assert torch.equal(t, expected[name]), name


def _assert_same_training_step(got: nn.Module, expected: nn.Module, make_input, task_ids=None) -> None:
    """Forward and backward (training mode, threshold draws from one seed) equal and finite."""
    results = []
    for module in (got, expected):
        module.train().task_ids = task_ids
        torch.manual_seed(7)
        out = module(make_input())
        out.square().sum().backward()
        results.append((out, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (out, grads), (expected_out, expected_grads) = results
    assert torch.isfinite(out).all() and torch.equal(out, expected_out)
    assert grads and grads.keys() == expected_grads.keys()
    for name, g in grads.items():
        assert torch.isfinite(g).all() and torch.equal(g, expected_grads[name]), name


def _built_then_meta_built_and_reset(make, order):
    """(the module ``make`` builds from seed 0, the one it builds on meta, made real and reset in
    ``order`` (reset_every_module) from seed 0), their states asserted equal."""
    torch.manual_seed(0)
    expected = make()
    module = _meta_built(make)
    torch.manual_seed(0)
    reset_every_module(module, order)
    _assert_same_state(module, expected)
    return module, expected


def _make_layer(name):
    cls, base, kwargs, _ = LAYERS[name]
    return lambda: cls(base(), **kwargs)


@pytest.mark.parametrize("name", LAYERS)
def test_meta_built_layer_reset_children_first_is_the_normally_built_layer(name):
    """Built on meta, to_empty, reset children first: bitwise the layer the constructor makes from
    the same seed (base layer, router weight, A, B, task gates, DoRA's magnitude from the base
    weight, the step counter at 0), and it trains as that layer."""
    make = _make_layer(name)
    layer, expected = _built_then_meta_built_and_reset(make, "apply")
    if layer.router is not None:
        assert layer.router.num_steps.item() == 0
    if layer.router_mode == "task":
        assert torch.equal(layer.lora_gamma, torch.zeros(layer.num_experts, dtype=torch.float64))
    if layer.use_dora:
        assert torch.equal(layer.lora_magnitude_vector, torch.linalg.norm(layer.base_layer.weight, dim=1))
    _assert_same_training_step(layer, expected, LAYERS[name][3],
                               torch.tensor([2, 0]) if layer.router_mode == "task" else None)


@pytest.mark.parametrize("name", [n for n in LAYERS if n != "linear_dora"])
def test_meta_built_layer_reset_parents_first_initialises_everything(name):
    """The torchtitan loop over model.modules() (the layer before its base layer and router): every
    tensor set as the constructor sets it, the same as a normally built layer reset the same way
    from the same seed; A, B and gamma keep their exact values where the init is deterministic.
    (DoRA reads the base weight: reset children first, or the layer again after its base.)"""
    make = _make_layer(name)
    expected = make()
    torch.manual_seed(0)
    reset_every_module(expected, "modules")
    layer = _meta_built(make)
    torch.manual_seed(0)
    reset_every_module(layer, "modules")
    _assert_same_state(layer, expected)
    init = layer.settings.init_lora_weights
    if isinstance(layer, MoELoRAEmbedding):
        assert torch.equal(layer.lora_A, torch.zeros_like(layer.lora_A)) == (layer.router_mode != "task")
    elif init is not False and layer.router_mode != "task":
        assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    if layer.router_mode == "task":
        assert torch.equal(layer.lora_gamma, torch.zeros_like(layer.lora_gamma))
    if layer.router is not None:
        assert layer.router.num_steps.item() == 0 and layer.router.eps == layer.router.eps_start
    _assert_same_training_step(layer, expected, LAYERS[name][3],
                               torch.tensor([2, 0]) if layer.router_mode == "task" else None)


@pytest.mark.parametrize("name", [n for n in LAYERS if n != "linear_dora"])  # DoRA: no router, no gamma
def test_reset_lora_parameters_redraws_the_constructors_adapter(name):
    """reset_lora_parameters() re-initialises the whole adapter (router weight and step counter,
    then A, B, gamma, DoRA's magnitude) in the constructor's order, base layer untouched: over
    the loaded base weights of a meta-built layer, the same seed gives the constructor's layer."""
    cls, make_base, kwargs, _ = LAYERS[name]
    torch.manual_seed(0)
    base = make_base()
    seeded = torch.get_rng_state()
    expected = cls(base, **kwargs)
    layer = _meta_built(_make_layer(name))
    layer.base_layer.load_state_dict(base.state_dict())
    torch.set_rng_state(seeded)
    layer.reset_lora_parameters()
    _assert_same_state(layer, expected)


def _ffn():
    """A gated MoEFFN, upcycled from three nn.Linear layers made in LLaMA's MLP order."""
    gate, up, down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
    return MoEFFN(up, down, F.silu, num_experts=4, top_k=2, gate_proj=gate, **{
        "router": "threshold", "threshold_eps": 0.2, "threshold_ramp_steps": 5})


def test_meta_built_moe_ffn_reset_is_the_ffn_upcycled_from_fresh_linears():
    """MoEFFN.reset_parameters draws one FFN as nn.Linear layers would (gate, in, out) and copies it
    into every expert; with the router after it (the loop over modules()), the same seed gives the
    MoEFFN upcycled from nn.Linear layers made in that order, step counter 0, and it trains."""
    ffn, expected = _built_then_meta_built_and_reset(_ffn, "modules")
    assert ffn.router.num_steps.item() == 0
    assert all(torch.equal(w[0], w[-1]) for w in (ffn.w_in, ffn.w_gate, ffn.w_out, ffn.b_out))
    _assert_same_training_step(ffn, expected, lambda: torch.randn(6, 8))


def _stacked_ffn():
    """A MoEFFN upcycled from a Phi-3-style MLP: one fused gate/up nn.Linear, then down_proj."""
    gate_up, down = nn.Linear(8, 32), nn.Linear(16, 8)
    return MoEFFN(gate_up, down, F.silu, num_experts=4, top_k=2, stacked_gate=True, dropout=0.25, **{
        "router": "threshold", "threshold_eps": 0.2, "threshold_ramp_steps": 5})


def test_meta_built_stacked_gate_moe_ffn_reset_is_the_ffn_upcycled_from_fresh_linears():
    """The stacked form: reset_parameters draws w_in [E, 2 d_ff, d_in] as one nn.Linear(d_in, 2 d_ff)
    (Phi-3's gate_up_proj), then w_out; the same seed gives the MoEFFN upcycled from nn.Linear layers
    made in that order (w_gate stays None), and it trains (dropout on its output included)."""
    ffn, expected = _built_then_meta_built_and_reset(_stacked_ffn, "modules")
    assert ffn.stacked_gate and ffn.w_gate is None and ffn.w_in.shape == (4, 32, 8)
    assert ffn.router.num_steps.item() == 0
    assert all(torch.equal(w[0], w[-1]) for w in (ffn.w_in, ffn.b_in, ffn.w_out, ffn.b_out))
    _assert_same_training_step(ffn, expected, lambda: torch.randn(6, 8))


@pytest.mark.parametrize("gate,learn_alpha", [("linear", False), ("cosine", True)])
def test_meta_built_molex_reset_is_the_normally_built_one(gate, learn_alpha):
    """MoLEx's gates (the linear gate's weight and bias, the cosine gates' layer embeddings and
    projection) and its mixing coefficient (the fixed alpha buffer, or the learned logit): reset
    children first after to_empty, the same seed gives the constructor's values."""

    def make():
        layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        holder = nn.Module()
        holder.layers, holder.molex = layers, MoLEx(layers, 8, gate=gate, shared_gate=False, alpha=0.9,
                                                    learn_alpha=learn_alpha)
        return holder

    model, expected = _built_then_meta_built_and_reset(make, "apply")
    assert torch.allclose(model.molex.alpha, torch.tensor(0.9))
    x = torch.randn(4, 8)
    for m in (model, expected):
        y = x
        for layer in m.layers:
            y = layer(y)
        m.out = y
    assert torch.isfinite(model.out).all() and torch.equal(model.out, expected.out)


@pytest.mark.parametrize("init", [False, "gaussian", True], ids=["random_b", "gaussian", "kaiming"])
def test_reset_lora_parameters_with_an_init_redraws_the_constructors_adapter_of_that_init(init):
    """reset_lora_parameters(init_lora_weights) draws the adapter the constructor draws with that init (PEFT's
    argument), from the same seed, whatever the layer was built with; reset_lora_parameters() then draws the
    layer's own setting again."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10, dtype=D)
    kwargs = dict(num_experts=3, top_k=2, r=4)
    own = "gaussian" if init != "gaussian" else False
    seeded = torch.get_rng_state()
    expected = MoELoRALinear(base, init_lora_weights=init, **kwargs)
    torch.set_rng_state(seeded)
    expected_own = MoELoRALinear(base, init_lora_weights=own, **kwargs)
    layer = MoELoRALinear(base, init_lora_weights=own, **kwargs)
    torch.set_rng_state(seeded)
    layer.reset_lora_parameters(init)
    _assert_same_state(layer, expected)
    torch.set_rng_state(seeded)
    layer.reset_lora_parameters()
    _assert_same_state(layer, expected_own)
