"""get_moelora_model on tiny transformers models: targeting, per-layer experts, freezing,
aux losses, router stats, task ids, torch.compile."""

import contextlib
import copy
import inspect
import re
import warnings

import pytest
import torch
import torch.nn as nn

import moelora
from moelora import MoELoRAConfig, MoELoRALinear, get_moelora_model
from helpers import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, tiny_vit, token_batch


def _layers(model):
    inner = model.model if isinstance(model, moelora.MoELoRAModel) else model
    return {n: m for n, m in inner.named_modules() if isinstance(m, MoELoRALinear)}


def test_bert_fresh_equals_base_and_only_adapters_train():
    base = tiny_bert()
    ids = token_batch()
    expected = base(ids).last_hidden_state
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["query", "value"], num_experts=4, top_k=2))
    assert torch.equal(model(ids).last_hidden_state, expected)
    layers = _layers(model)
    assert sorted(layers) == sorted(f"encoder.layer.{i}.attention.self.{p}"
                                    for i in range(4) for p in ("query", "value"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(re.search(r"lora_A|lora_B|router\.weight", n) for n in trainable)
    n_trainable, _ = model.get_nb_trainable_parameters()
    assert n_trainable == 8 * (4 * 8 * 16 + 4 * 16 * 8 + 4 * 16)


def test_llama_all_linear_with_mola_preset_excludes_lm_head():
    model = get_moelora_model(tiny_llama(), MoELoRAConfig(target_modules="all-linear", num_experts="2468", top_k=2))
    layers = _layers(model)
    assert "lm_head" not in layers and len(layers) == 4 * 7
    for name, layer in layers.items():
        idx = int(re.search(r"layers\.(\d+)\.", name).group(1))
        assert layer.num_experts == (2, 4, 6, 8)[idx]
        assert layer.router.weight.shape == (layer.num_experts, layer.in_features)


@pytest.mark.parametrize("num_layers,expected", [(6, [2, 2, 4, 6, 6, 8]), (2, [2, 6]), (5, [2, 2, 4, 6, 8])])
def test_mola_preset_quarters_of_a_layer_count_not_divisible_by_4(num_layers, expected):
    """As docs/layers.md says: layer i of L takes the digit of quarter floor(4 i / L)."""
    cfg = MoELoRAConfig(target_modules=["q_proj"], num_experts="2468", top_k=2)
    assert [m.num_experts for m in _layers(get_moelora_model(tiny_llama(num_layers), cfg)).values()] == expected


def test_per_layer_expert_list_callable_and_layers_to_transform():
    cfg = MoELoRAConfig(target_modules=["q_proj"], num_experts=[2, 3, 5, 2], top_k=2)
    assert [m.num_experts for m in _layers(get_moelora_model(tiny_llama(), cfg)).values()] == [2, 3, 5, 2]
    cfg = MoELoRAConfig(target_modules=["q_proj"], num_experts=lambda i, n: i + 2, top_k=2, layers_to_transform=[1, 3])
    layers = _layers(get_moelora_model(tiny_llama(), cfg))
    assert {n: m.num_experts for n, m in layers.items()} == {"model.layers.1.self_attn.q_proj": 3,
                                                             "model.layers.3.self_attn.q_proj": 5}


def test_rank_and_alpha_patterns_as_peft():
    cfg = MoELoRAConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, num_experts=2, top_k=1,
                        rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 16})
    layers = _layers(get_moelora_model(tiny_llama(), cfg))
    assert layers["model.layers.1.self_attn.v_proj"].r == 2
    assert layers["model.layers.1.self_attn.v_proj"].scaling == 4.0
    assert layers["model.layers.0.self_attn.q_proj"].scaling == 4.0
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 2.0


def test_gpt2_conv1d_is_handled():
    base = tiny_gpt2()
    ids = token_batch()
    expected = base(ids).logits
    model = get_moelora_model(base, MoELoRAConfig(target_modules="all-linear", num_experts=2, top_k=1, r=4))
    layers = _layers(model)
    assert "lm_head" not in layers and {n.split(".")[-1] for n in layers} == {"c_attn", "c_proj", "c_fc"}
    assert layers["transformer.h.0.attn.c_attn"].out_features == 48
    assert torch.equal(model(ids).logits, expected)
    randomize_adapters(model)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert layers["transformer.h.0.mlp.c_fc"].lora_B.grad.abs().sum() > 0


def test_bert_classifier_head_excluded_from_all_linear():
    model = get_moelora_model(tiny_bert(classification=True),
                              MoELoRAConfig(target_modules="all-linear", exclude_modules=["pooler.dense"]))
    assert not any("classifier" in n or "pooler" in n for n in _layers(model))


def test_all_linear_leaves_out_an_output_head_of_any_name_as_peft():
    """The output embedding (get_output_embeddings) is left out whatever its name, as PEFT's all-linear: BERT's
    masked-LM head is cls.predictions.decoder."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import BertConfig, BertForMaskedLM

    def bert():
        torch.manual_seed(0)
        return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=32))

    layers = _layers(get_moelora_model(bert(), MoELoRAConfig(target_modules="all-linear", num_experts=2, top_k=2)))
    peft_model = get_peft_model(bert(), LoraConfig(target_modules="all-linear")).base_model.model
    assert "cls.predictions.decoder" not in layers and "cls.predictions.transform.dense" in layers
    assert sorted(layers) == sorted(n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("cfg,match", [
    (dict(target_modules=["query", "nonexistent_proj"]), r"target_modules \['nonexistent_proj'\] not found"),
    (dict(target_modules=r".*\.nothing"), "matches no linear module"),
    (dict(target_modules=["query"], num_experts=[2, 2, 2]), "lists 3 per-layer counts but the model has 4 layers"),
    (dict(target_modules=["query"], num_experts="2467"), "preset must be one of"),
    (dict(target_modules=["query"], num_experts=[2, 2, 3, 2], top_k=3),
     r"layer 0 \(.*query\): top_k must be in \[1, num_experts=2\], got 3"),
    (dict(target_modules=["query"], num_experts=4, top_k=5), "top_k must be in"),
    (dict(target_modules=["query"], lora_dropout=-0.5), "lora_dropout must be in"),
    (dict(target_modules=["query"], layers_to_transform=[9]),
     r"layers_to_transform \[9\] \(layers_pattern None\) keeps none of the selected modules, whose layer indices "
     r"are \[0, 1, 2, 3\]"),
    (dict(target_modules=["query"], exclude_modules=["query"]), r"exclude_modules \['query'\] excludes every module"),
    (dict(target_modules=["dense"], num_experts="5555"), "not inside a numbered layer"),
    (dict(target_modules=["query"], bias="some"), "bias must be one of"),
])
def test_bad_configurations_raise(cfg, match):
    with pytest.raises(ValueError, match=match):
        get_moelora_model(tiny_bert(num_layers=4), MoELoRAConfig(**cfg))


def test_num_experts_one_with_top_k_above_is_fine_but_list_with_bad_entry_is_not():
    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], num_experts=1, top_k=2))
    assert all(m.router is None for m in _layers(model).values())
    with pytest.raises(ValueError, match="every per-layer num_experts"):
        MoELoRAConfig(num_experts=[2, 0])


def test_a_config_checks_its_layer_fields_against_an_int_num_experts_when_made():
    """With one expert count for every layer, a top_k above it (or a task router's count) is refused when the
    config is made, before any model is built; per-layer counts wait for each layer's (layer_settings)."""
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=4\], got 5"):
        MoELoRAConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=2\], got 3"):
        MoELoRAConfig(num_experts=2, top_k=3)
    config = MoELoRAConfig(num_experts=[2, 4], top_k=3)  # layer 0 is checked when its settings are asked for
    with pytest.raises(ValueError, match=r"layer 0 \(layers\.0\.q\): top_k must be in \[1, num_experts=2\]"):
        config.layer_settings("layers.0.q", 0, 2)
    assert config.layer_settings("layers.1.q", 1, 2).num_experts == 4


def test_dora_with_per_layer_expert_counts_checks_each_layers_count():
    """DoRA needs one expert: a per-layer list of ones is a valid config (the count-dependent checks wait for each
    layer's count), and a layer given more experts is refused when its settings are made, naming it."""
    config = MoELoRAConfig(use_dora=True, num_experts=[1, 1], top_k=1)
    assert config.layer_settings("layers.1.q", 1, 2).use_dora
    with pytest.raises(ValueError, match=r"layer 0 \(layers\.0\.q\): use_dora needs a single expert"):
        MoELoRAConfig(use_dora=True, num_experts=[2, 1], top_k=1).layer_settings("layers.0.q", 0, 2)
    layers = _layers(get_moelora_model(tiny_bert(num_layers=2), MoELoRAConfig(
        target_modules=["query"], use_dora=True, num_experts=[1, 1], top_k=1)))
    assert len(layers) == 2 and all(m.use_dora and m.num_experts == 1 for m in layers.values())


@pytest.mark.parametrize("counts", [[2, 3], [2, 3, 4, 2]])
def test_layer_settings_refuses_a_per_layer_list_of_another_length_than_the_layers(counts):
    """MoELoRAConfig.layer_settings takes a per-layer count list only with one entry per layer, longer or shorter."""
    config = MoELoRAConfig(num_experts=counts, top_k=1)
    with pytest.raises(ValueError, match=rf"layer 1 \(h\.1\.c\): num_experts lists {len(counts)} per-layer counts "
                                         r"but the model has 3 layers"):
        config.layer_settings("h.1.c", 1, 3)
    assert MoELoRAConfig(num_experts=[2, 3, 4], top_k=1).layer_settings("h.1.c", 1, 3).num_experts == 3


def test_aux_loss_added_to_output_loss_exactly_once_and_not_leaked():
    model = get_moelora_model(tiny_llama(), MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts="8228",
                                                          top_k=2, router_aux_loss_coef=0.5, router_z_loss_coef=0.1))
    ids = token_batch()
    with torch.no_grad():
        plain = model.model(ids, labels=ids).loss
    out = model(ids, labels=ids)
    stats = moelora.router_stats(model)
    assert len(stats) == 8
    per_layer = sum(0.5 * s["load_balancing_loss"] + 0.1 * s["z_loss"] for s in stats.values())
    aux = moelora.aux_loss(model)
    torch.testing.assert_close(aux, per_layer)
    torch.testing.assert_close(out.loss, plain + aux)
    assert aux.requires_grad
    # A no-grad forward replaces the stored losses with graph-free ones.
    with torch.no_grad():
        model(ids[:1])
    assert not moelora.aux_loss(model).requires_grad
    # Without labels the output has no loss and nothing is added.
    assert model(ids).loss is None
    # Switched off: output.loss is the wrapped model's loss.
    model.moelora_config.add_aux_loss_to_output = False
    torch.testing.assert_close(model(ids, labels=ids).loss, plain)


class _Projection(nn.Module):
    """A model of one linear layer ``proj`` (8 -> 8) whose forward gives back ``output(y, labels)`` for its
    projection y: the outputs, losses or not, that the wrapper adds its aux loss to or leaves alone."""

    def __init__(self, output):
        super().__init__()
        self.proj, self.output = nn.Linear(8, 8), output

    def forward(self, x, labels=None):
        return self.output(self.proj(x), labels)


def test_a_tuple_output_gets_the_aux_loss_only_when_labels_were_passed():
    """With return_dict=False a model's tuple starts with its loss only when labels were passed: a tuple whose first
    element is a 0-d float tensor of a call without labels (a score, a temperature) is left as it is."""
    scored = _Projection(lambda y, labels: (y.pow(2).mean() if labels is None else (y - labels).pow(2).mean(), y))
    model = get_moelora_model(scored, MoELoRAConfig(target_modules=["proj"], num_experts=4, top_k=2))
    model.train()
    x = torch.randn(2, 3, 8)
    score, y = model(x)
    aux = moelora.aux_loss(model)
    assert aux > 0
    torch.testing.assert_close(score, y.pow(2).mean())  # no aux loss added
    loss, y = model(x, labels=torch.zeros(2, 3, 8))
    torch.testing.assert_close(loss, y.pow(2).mean() + moelora.aux_loss(model))


def test_a_tuple_output_whose_first_element_is_not_0_d_is_left_as_it_is():
    """Only a 0-d float first element is a loss: per-example losses ([batch]) given back with labels are left as
    they are (the aux loss, one scalar for the batch, is not broadcast into each)."""
    per_example = _Projection(lambda y, labels: ((y - labels).pow(2).mean(dim=(1, 2)), y))
    model = get_moelora_model(per_example, MoELoRAConfig(target_modules=["proj"], num_experts=4, top_k=2))
    model.train()
    losses, y = model(torch.randn(2, 3, 8), labels=torch.zeros(2, 3, 8))
    assert moelora.aux_loss(model) > 0
    torch.testing.assert_close(losses, y.pow(2).mean(dim=(1, 2)))


def test_a_tuple_output_whose_first_element_is_an_integer_or_a_named_tuple_is_left_as_it_is():
    """Only a plain tuple's 0-d float first element is a loss: a 0-d integer (a count of tokens) given back with
    labels is left as it is, and so is a named tuple (no transformers loss output), which keeps its type."""
    import collections

    Pair = collections.namedtuple("Pair", "loss y")

    def counted(y, labels):  # the number of tokens per example
        return torch.tensor(y.shape[1]), y

    def named_pair(y, labels):
        return Pair((y - labels).pow(2).mean(), y)

    for named in (False, True):
        model = get_moelora_model(_Projection(named_pair if named else counted), MoELoRAConfig(
            target_modules=["proj"], num_experts=4, top_k=2, router_aux_loss_coef=100.0))
        model.train()
        out = model(torch.randn(2, 3, 8), labels=torch.zeros(2, 3, 8))
        assert moelora.aux_loss(model) > 1  # an integer's cast of it would not be 0
        if named:
            assert type(out) is Pair
            torch.testing.assert_close(out.loss, out.y.pow(2).mean())
        else:
            assert out[0].dtype == torch.int64 and out[0].item() == 3


def test_a_forward_that_runs_some_layers_adds_their_aux_losses_only():
    """Each wrapper forward starts by clearing every routed module's record: a layer its forward does not run (an
    encoder-decoder's encoder, given ``encoder_outputs``) adds no aux loss of an earlier forward to ``outputs.loss``
    (a stale one would count twice, and backward through its freed graph would fail)."""
    from transformers.modeling_outputs import BaseModelOutput

    model = get_moelora_model(tiny_t5(), MoELoRAConfig(target_modules=["q", "v"], num_experts=4, top_k=2))
    randomize_adapters(model)
    model.train()
    ids, labels = torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (2, 4))
    model(input_ids=ids, labels=labels).loss.backward()
    encoder = [m for n, m in model.named_modules() if isinstance(m, MoELoRALinear) and ".encoder." in n]
    decoder = [m for n, m in model.named_modules() if isinstance(m, MoELoRALinear) and ".decoder." in n]
    assert encoder and decoder and all(m.last_aux_loss is not None for m in encoder)
    hidden = BaseModelOutput(last_hidden_state=torch.randn(2, 5, 16))
    out = model(encoder_outputs=hidden, attention_mask=torch.ones_like(ids), labels=labels)
    assert all(m.last_aux_loss is None for m in encoder)
    aux = moelora.aux_loss(model)
    torch.testing.assert_close(aux, sum(m.last_aux_loss for m in decoder))
    out.loss.backward()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a training-mode forward without gradients
        plain = model.model(encoder_outputs=hidden, attention_mask=torch.ones_like(ids), labels=labels).loss
    torch.testing.assert_close(out.loss, plain + aux)


def test_the_walk_over_routed_modules_takes_each_once_in_modules_order():
    """The wrapper's forward finds the routed modules (to clear their records, then to sum their aux losses) by a
    walk of its own, without building names: it takes each module once, in ``model.modules()``'s order (the
    order the aux losses are summed in), through shared modules (tied, registered twice), None children and
    containers, routed modules inside routed ones included (MoLEx over MoE-LoRA layers)."""
    from moelora.modules.routed import RoutedModule, routed_modules

    base = tiny_llama(num_layers=3)
    moelora.upcycle_ffn(base, num_experts=2, top_k=1, router="softmax_topk", layers_to_transform=[1])
    moelora.apply_molex(base, gate="linear")
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2))
    layers = model.model.model.layers
    layers[2].shared = layers[0].self_attn  # one module registered twice
    layers[2].register_module("nothing", None)
    expected = [m for m in model.modules() if isinstance(m, RoutedModule)]
    assert len(expected) > 6 and len({id(m) for m in expected}) == len(expected)
    found = routed_modules(model)
    assert len(found) == len(expected) and all(a is b for a, b in zip(found, expected))


def test_aux_loss_of_a_float64_model_is_float64():
    """A float64 model's layers record float64 aux losses (fp64 router logits); moelora.aux_loss summed
    them in float32, so it carried fp32's rounding (~1e-8 relative) against a float64 reference and
    differed from the sum of the layers' losses. Now summed in the widest of their dtypes (float32 at
    least): float64 here, float32 for float32 and half-precision models as before; the wrapper adds
    it to the model's loss in that loss's dtype."""
    model = get_moelora_model(tiny_llama(num_layers=2).double(), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                               num_experts=4, top_k=2))
    ids = token_batch()
    out = model(ids, labels=ids)
    losses = [m.last_aux_loss for m in _layers(model).values()]
    assert {loss.dtype for loss in losses} == {torch.float64}
    aux = moelora.aux_loss(model)
    assert aux.dtype == torch.float64
    torch.testing.assert_close(aux, torch.stack(losses).sum(), rtol=1e-15, atol=0)
    with torch.no_grad():
        plain = model.model(ids, labels=ids).loss
    torch.testing.assert_close(out.loss.detach(), plain + aux.detach().to(plain.dtype), rtol=0, atol=0)
    assert moelora.aux_loss(get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"]))
                            ).dtype == torch.float32


def test_aux_loss_per_layer_for_different_expert_counts():
    from moelora.ops.losses import load_balancing_loss

    model = get_moelora_model(tiny_llama(), MoELoRAConfig(target_modules=["q_proj"], num_experts=[2, 4, 6, 8],
                                                          top_k=2, router_z_loss_coef=0.0))
    inputs = {}
    for name, layer in _layers(model).items():
        layer.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
    model(token_batch())
    routings = [_layers(model)[name].router(x) for name, x in inputs.items()]
    expected = sum(0.01 * load_balancing_loss(r.probs, r.ids, r.probs.shape[-1]) for r in routings)
    torch.testing.assert_close(moelora.aux_loss(model), expected)
    for name, s in moelora.router_stats(model).items():
        e = _layers(model)[name].num_experts
        assert s["load"].shape == (e,)
        torch.testing.assert_close(s["load"].sum(), torch.tensor(2.0))
        assert 0 <= s["entropy"] <= torch.log(torch.tensor(float(e)))


def test_task_ids_by_setter_context_and_forward_kwarg():
    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], num_experts=3, router="task",
                                                         task_shared_lora=True))
    randomize_adapters(model)
    ids = token_batch()
    with pytest.raises(RuntimeError, match="none is set"):
        model(ids)
    out_kw = model(ids, task_ids=torch.tensor([0, 2])).last_hidden_state
    with moelora.use_task_ids(model, torch.tensor([0, 2])):
        out_ctx = model(ids).last_hidden_state
    with moelora.use_task_ids(model, 2) as held:  # yields the ids as the layers hold them: an int as a 0-d tensor
        assert isinstance(held, torch.Tensor) and held.dim() == 0 and int(held) == 2
        assert all(layer.task_ids is held for layer in _layers(model).values())
    moelora.set_task_ids(model, torch.tensor([0, 2]))
    out_set = model(ids).last_hidden_state
    assert torch.equal(out_kw, out_ctx) and torch.equal(out_kw, out_set)
    # per-example tasks: example 0 with task 0 equals a batch of task 0 only
    torch.testing.assert_close(model(ids[:1], task_ids=0).last_hidden_state, out_kw[:1])
    # a numpy integer (a dataset's column) is an int: checked as one, held as a 0-d tensor
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(model(ids[:1], task_ids=np.int64(0)).last_hidden_state, out_kw[:1])
    with pytest.raises(ValueError, match=r"task id must be in \[0, 3\), got 3"):
        moelora.set_task_ids(model, np.int32(3))
    # Not out_set.sum(): BERT ends in a LayerNorm (weight 1), whose outputs sum to beta.sum()
    # for any input, so that gradient is zero up to rounding. A fixed projection depends on gamma.
    projection = torch.randn(out_set.shape, generator=torch.Generator().manual_seed(0))
    (out_set * projection).sum().backward()
    gamma = _layers(model)["encoder.layer.0.attention.self.query"].lora_gamma
    assert gamma.grad[0].abs() > 1e-6 and gamma.grad[2].abs() > 1e-6 and gamma.grad[1] == 0  # noise: ~1e-12
    with pytest.raises(ValueError, match="no task-routed"):
        moelora.set_task_ids(tiny_bert(), 1)


@pytest.mark.parametrize("bad", [[0, 2], "1", True, torch.tensor([0.0, 2.0])], ids=["list", "str", "bool", "float"])
def test_task_ids_of_the_wrong_type_are_refused_when_set(bad):
    """set_task_ids / use_task_ids took a list, a string, a bool or a float tensor and held it, the error coming at
    a later forward, away from the call (a bool routed nothing until then); they are refused at the call, the
    layers keeping the ids they held."""
    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], num_experts=3, router="task"))
    held = torch.tensor([0, 2])
    moelora.set_task_ids(model, held)
    with pytest.raises(TypeError, match=r"^task ids must be (an int or an integer tensor|integers)"):
        moelora.set_task_ids(model, bad)
    with pytest.raises(TypeError, match=r"^task ids must be (an int or an integer tensor|integers)"):
        with moelora.use_task_ids(model, bad):
            pass
    assert all(layer.task_ids is held for layer in _layers(model).values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_packed_row_routes_by_per_token_task_ids_and_refuses_per_example_ids_naming_them(backend):
    """A padding-free packed row (DataCollatorWithFlattening: [1, total], position_ids restarting per sequence) of
    three sequences of three tasks: per-token ids ([1, total]) give each sequence's logits and the gammas'
    gradients what per-example ids give the padded batch; one id per sequence ([3]) raises, naming per-token ids
    (it named neither packing nor the shape to give)."""
    from transformers import DataCollatorWithFlattening

    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                      num_experts=3, router="task", r=4))
    randomize_adapters(model)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(1, 64, (n,), generator=g) for n in (4, 2, 3)]
    tasks = torch.tensor([2, 0, 1])
    packed = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in seqs])
    per_token = torch.cat([torch.full((len(s),), int(t)) for s, t in zip(seqs, tasks)])[None]
    ids, mask = torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    gammas = [m.lora_gamma for m in _layers(model).values()]
    results = []
    with moelora.use_backend(backend):
        for inputs, task_ids, real in ((dict(packed), per_token, torch.ones(1, 9, dtype=torch.bool)),
                                       (dict(input_ids=ids, attention_mask=mask), tasks, mask.bool())):
            logits = model(**inputs, task_ids=task_ids, use_cache=False).logits[real]
            results.append((logits.detach(), torch.autograd.grad(logits.square().sum(), gammas)))
        with pytest.raises(ValueError, match=r"packed row .* one id per token, shape \(1, 9\)"):
            model(**packed, task_ids=tasks, use_cache=False)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


class _PerTaskHeads(nn.Module):
    """A multi-task model of its own: a body and one head per task, chosen by its forward's ``task_ids``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(3))

    def forward(self, x, task_ids=None):
        h = self.body(x)
        if task_ids is None:
            return self.heads[0](h)
        return torch.stack([self.heads[int(t)](row) for t, row in zip(task_ids, h)])


@pytest.mark.parametrize("router", ["task", "softmax_topk"])
def test_task_ids_reach_a_wrapped_model_whose_forward_takes_them(router):
    """A wrapped model whose forward takes ``task_ids`` itself (per-task heads) got none: the wrapper kept the
    ids for its task-routed layers, and the model ran every example through its default head (a silent wrong
    output); with a learned router they raised "no task-routed layer". They reach it too, by keyword or by
    position, and route the task-routed layers by the same ids."""
    model = get_moelora_model(_PerTaskHeads(), MoELoRAConfig(target_modules=["body"], num_experts=3, r=2, top_k=2,
                                                             router=router))
    randomize_adapters(model)
    x, tasks = torch.randn(4, 8), torch.tensor([2, 0, 1, 2])
    with moelora.use_task_ids(model, tasks) if router == "task" else contextlib.nullcontext():
        expected = model.model(x, task_ids=tasks)
    torch.testing.assert_close(model(x, task_ids=tasks), expected)
    torch.testing.assert_close(model(x, tasks), expected)
    assert not torch.allclose(model.model.heads[0](model.model.body(x)), expected)


def test_generate_passes_task_ids_on_to_a_wrapped_forward_that_takes_them():
    """generate(task_ids=) gave the ids to the task-routed layers only: a causal LM whose forward takes task_ids
    (here: a per-task bias on the logits) generated as if given none. They reach each step too, repeated over
    the beams by transformers as its other model inputs: each example's best beam is its task's token."""
    from transformers import LlamaForCausalLM

    class PerTaskBias(LlamaForCausalLM):
        def forward(self, input_ids=None, task_ids=None, **kwargs):
            out = super().forward(input_ids=input_ids, **kwargs)
            if task_ids is not None:
                out.logits = out.logits + 100.0 * nn.functional.one_hot(10 + task_ids, 64)[:, None]
            return out

    for router in ("task", "softmax_topk"):
        model = get_moelora_model(PerTaskBias(tiny_llama(num_layers=1).config).eval(), MoELoRAConfig(
            target_modules=["q_proj"], num_experts=3, top_k=2, r=2, router=router))
        ids, tasks = token_batch(), torch.tensor([2, 0])
        for settings in ({}, dict(num_beams=2, num_return_sequences=2)):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=tasks, **_GREEDY,
                                 **settings)
            best = out[::len(out) // len(tasks), ids.shape[1]:]  # each example's best beam (the others differ)
            assert torch.equal(best, (10 + tasks)[:, None].expand(-1, 3)), settings


def test_generate_batch_with_task_ids_refuses_a_wrapped_forward_that_takes_them_before_generating():
    """Continuous batching passes the forward nothing but the packed row, so a forward that takes task_ids
    itself would generate as if given none: generate_batch(task_ids=) raises before transformers' batching
    runs (the model's own generate_batch, a recording stand-in here, is never called)."""
    class TakesTaskIds(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x, task_ids=None):
            return self.proj(x)

    model = get_moelora_model(TakesTaskIds(), MoELoRAConfig(target_modules=["proj"], num_experts=3, router="task"))
    calls = []
    model.model.generate_batch = lambda *args, **kwargs: calls.append((args, kwargs))
    model.generate_batch(inputs=[[1, 2]])  # without task_ids the call goes through
    assert len(calls) == 1
    for task_ids in (1, torch.tensor(1)):
        with pytest.raises(ValueError, match="forward takes task_ids itself"):
            model.generate_batch(inputs=[[1, 2]], task_ids=task_ids)
    assert len(calls) == 1


def test_task_ids_forward_kwarg_under_inference_mode():
    """task_ids made under torch.inference_mode (inference tensors) route like any other."""
    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], num_experts=3, router="task"))
    randomize_adapters(model)
    model.eval()
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids, task_ids=torch.tensor([0, 2])).last_hidden_state
    with torch.inference_mode():
        out = model(ids, task_ids=torch.tensor([0, 2])).last_hidden_state
    torch.testing.assert_close(out, expected)


def _task_model_counting_builds(monkeypatch):
    """(an eval task-routed tiny LLaMA with random adapters, the list that gets an entry per build of task
    routing's ids and one-hot matrix)."""
    from moelora.ops import routing_modes

    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj", "o_proj"],
                                                                      num_experts=3, router="task", r=4))
    randomize_adapters(model, scale=2.0)
    builds, build = [], routing_modes._task_ids_one_hot
    monkeypatch.setattr(routing_modes, "_task_ids_one_hot",
                        lambda *args, **kwargs: builds.append(1) or build(*args, **kwargs))
    return model.eval(), builds


def test_task_ids_forward_kwarg_made_under_inference_mode_build_the_routing_once(monkeypatch):
    """Serving (scoring, evaluation) runs the wrapper's forward under torch.inference_mode with task ids made
    there: an inference tensor has no version counter, so task routing would build its ids, one-hot matrix and
    range check again in every layer (on a GPU a host sync each, for ids on the device). The forward holds a
    normal copy for the call, as generate does: one build per forward, as under no_grad, and the same output;
    in-place changes of the caller's ids between forwards are seen."""
    model, builds = _task_model_counting_builds(monkeypatch)
    ids = token_batch()
    with torch.no_grad():
        expected = [model(ids, task_ids=torch.tensor(t)).logits for t in ([2, 0], [1, 2])]
    assert len(builds) == 2
    builds.clear()
    with torch.inference_mode():
        tasks = torch.tensor([2, 0])
        first = model(ids, task_ids=tasks).logits
        tasks.copy_(torch.tensor([1, 2]))
        second = model(ids, task_ids=tasks).logits
    assert len(builds) == 2
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])


def test_bias_modes_mark_biases_trainable():
    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], bias="lora_only"))
    trainable_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable_biases == {f"model.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in range(4)}


def test_bias_mode_of_the_active_adapter_holds_after_add_and_set_adapter():
    """add_adapter and set_adapter mark the trainable parameters again, by the active adapter's ``bias``: the
    adapted layers' biases of a bias="lora_only" adapter stay trainable, and come back trainable with it."""
    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], bias="lora_only"))
    expected = {f"model.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in range(4)}

    def trainable_biases():
        return {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}

    model.add_adapter("other", MoELoRAConfig(target_modules=["value"]))
    assert trainable_biases() == expected
    model.set_adapter("other")
    assert trainable_biases() == set()
    model.set_adapter("default")
    assert trainable_biases() == expected


def test_plain_module_injection():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    model = get_moelora_model(net, MoELoRAConfig(target_modules=["0"], num_experts=3, top_k=2, r=2))
    assert isinstance(model.model[0], MoELoRALinear) and isinstance(model.model[2], nn.Linear)
    x = torch.randn(5, 8)
    torch.testing.assert_close(model(x), net[2](net[1](net[0].base_layer(x))))


def test_torch_compile_of_injected_model_matches_eager():
    model = get_moelora_model(tiny_llama(num_layers=1), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                      num_experts=4, top_k=2))
    randomize_adapters(model)
    ids = token_batch(seq=4)
    eager = model(ids).logits
    with moelora.validation(False):
        compiled = torch.compile(model.model, backend="aot_eager")
        out = compiled(ids).logits
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_disable_adapter_and_molex_gates_not_targeted():
    base = tiny_llama(num_layers=2)
    ids = token_batch()
    expected = base(ids).logits
    moelora.apply_molex(base, gate="cosine", proj_dim=4)
    with_molex = base(ids, use_cache=False).logits
    model = get_moelora_model(base, MoELoRAConfig(target_modules="all-linear", num_experts=2, top_k=1))
    assert not any("molex" in n for n in _layers(model))
    assert all(p.requires_grad for p in base.molex.parameters())
    randomize_adapters(model)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids, use_cache=False).logits, with_molex)
    assert not torch.allclose(model(ids, use_cache=False).logits, with_molex)
    base.molex.remove()
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, expected)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_modules_moelora_adds_start_in_the_models_mode(mode):
    """get_moelora_model, upcycle_ffn, apply_molex, modules_to_save and add_adapter on a model in
    eval mode (transformers' from_pretrained gives one) leave every module in eval mode: new modules
    started in train mode, so LoRA dropout, router jitter and threshold sampling ran in what the
    caller had put in eval mode (two equal forwards differed). A model in train mode stays so."""
    base = tiny_llama(num_layers=2).train(mode == "train")
    moelora.upcycle_ffn(base, num_experts=3, top_k=2, router="threshold", threshold_eps=0.3)
    moelora.apply_molex(base, gate="linear")
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["q_proj"], num_experts=3, top_k=2,
                                                  lora_dropout=0.5, router_jitter_noise=0.5,
                                                  modules_to_save=["lm_head"]))
    model.add_adapter("other", MoELoRAConfig(target_modules=["v_proj"], num_experts=2, top_k=1))
    assert {m.training for m in model.modules()} == {mode == "train"}
    bert = tiny_bert(num_layers=1).train(mode == "train")
    moelora.upcycle_ffn(bert, num_experts=2, top_k=1)
    assert {m.training for m in bert.modules()} == {mode == "train"}
    if mode == "eval":
        randomize_adapters(model)
        ids = token_batch()
        torch.testing.assert_close(model(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   rtol=0, atol=0)


def test_deepcopy_after_a_training_forward_starts_without_routing_record():
    base = tiny_llama(num_layers=2)
    moelora.apply_molex(base, gate="linear")
    ids = token_batch()
    with torch.no_grad():
        plain = base(ids, use_cache=False).logits
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["q_proj"], num_experts=4, top_k=2))
    randomize_adapters(model)  # B != 0: with a zero B a copy that lost its adapter computes the same
    model.train()
    model(ids, labels=ids, use_cache=False)  # every routed module now holds a loss with its graph
    assert moelora.aux_loss(model).grad_fn is not None
    clone = copy.deepcopy(model)  # deepcopy refuses non-leaf tensors: the record is left out
    assert moelora.router_stats(clone) == {}
    assert moelora.aux_loss(model).grad_fn is not None  # the original keeps its record
    expected = model(ids, use_cache=False).logits
    assert not torch.allclose(expected, plain)  # the adapter acts
    torch.testing.assert_close(clone(ids, use_cache=False).logits, expected)


def test_a_deleted_wrapper_is_freed_without_the_garbage_collector():
    """``del model`` frees a MoELoRAModel (and the model it wraps) at once, after a training step too: its
    forward with the wrapped signature was a method bound to the wrapper, held by the wrapper, so every
    wrapper was a reference cycle whose memory (GPU memory included) waited for a full garbage collection."""
    import gc
    import weakref

    model = get_moelora_model(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)),
                              MoELoRAConfig(target_modules=["0", "2"], num_experts=3, top_k=2, r=2))
    assert "input" in inspect.signature(model.forward).parameters
    model(torch.randn(4, 8)).square().sum().backward()
    freed = [weakref.ref(model), weakref.ref(model.model[0].lora_B)]
    forward = model.forward
    gc.disable()
    try:
        del model
        assert all(ref() is None for ref in freed)
    finally:
        gc.enable()
    with pytest.raises(ReferenceError, match="MoELoRAModel was deleted"):  # it holds the wrapper weakly
        forward(torch.randn(4, 8))


@pytest.mark.parametrize("backward", [False, True])
def test_a_deleted_wrapper_after_a_forward_with_an_aux_loss_mask_is_freed(backward):
    """A forward with an aux-loss mask (or task ids) and gradients registers a hook on the aux losses the layers
    keep, which put the forward's mask back on the layers in a backward after other forwards: the hook held the
    layers, and a tensor's hook is out of the garbage collector's reach, so such a model (a deleted training model,
    a TRL reference model's copy) was never freed, gc.collect() or not."""
    import gc
    import weakref

    model = get_moelora_model(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)),
                              MoELoRAConfig(target_modules=["0", "2"], num_experts=3, top_k=2, r=2))
    out = model(torch.randn(4, 8), aux_loss_mask=torch.tensor([1, 1, 0, 1]))
    assert moelora.aux_loss(model).requires_grad
    if backward:
        (out.square().sum() + moelora.aux_loss(model)).backward()
    freed = [weakref.ref(model), weakref.ref(model.model[0]), weakref.ref(model.model[0].lora_B)]
    del model, out
    gc.collect()
    assert all(ref() is None for ref in freed)


@pytest.mark.parametrize("copied", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_a_deleted_gradient_checkpointed_wrapper_whose_backward_never_ran_is_freed(backward, copied):
    """A routed module keeps its last forward's aux loss, whose autograd graph holds a gradient-checkpointed layer
    (the checkpoint's recomputation calls it) out of the garbage collector's reach: after a forward with gradients
    whose backward never ran (evaluation with gradients on, an exception before backward), ``del model`` kept
    every checkpointed decoder layer (base weights and adapters) alive for good, gc.collect() or not."""
    import gc
    import weakref

    model = get_moelora_model(tiny_llama(2), MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=3,
                                                           top_k=2, r=2))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if copied:  # a copy (its own layers) is freed likewise
        model = copy.deepcopy(model)
    ids = token_batch()
    out = model(input_ids=ids, labels=ids)
    assert moelora.aux_loss(model).requires_grad
    if backward:
        out.loss.backward()
    layer = model.model.model.layers[0]
    freed = [weakref.ref(model), weakref.ref(layer), weakref.ref(layer.self_attn.q_proj),
             weakref.ref(layer.self_attn.q_proj.base_layer.weight)]
    del model, out, layer
    gc.collect()
    assert [ref() is None for ref in freed] == [True] * len(freed)


def test_a_forward_rebound_as_accelerate_rebinds_it_runs_the_module_it_is_bound_to():
    """The wrapper's forward is a bound method as tools see one (``__func__``, ``__self__``): accelerate's
    ``unwrap_model(keep_fp32_wrapper=False)`` after a mixed-precision ``prepare_model`` rebinds the innermost
    forward it finds to the model, and ``compile_regions`` rebinds ``__func__`` of the forward to its copy of the
    module. With a callable lacking ``__func__`` the first rebound the callable itself (the unwrapped model then
    passed itself as the input: TypeError) and the second kept the original module's forward."""
    import types

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    torch.manual_seed(0)
    model = get_moelora_model(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)),
                              MoELoRAConfig(target_modules=["0", "2"], num_experts=3, top_k=2, r=2))
    randomize_adapters(model)
    x = torch.randn(4, 8)
    expected = model(x)
    forward = model.forward
    assert forward.__self__ is model and "input" in inspect.signature(forward).parameters
    copied = type(model).__new__(type(model))  # compile_regions' copy of a module
    copied.__dict__.update(model.__dict__)
    copied.forward = types.MethodType(forward.__func__, copied)
    assert copied.forward.__self__ is copied and "input" in inspect.signature(copied.forward).parameters
    torch.testing.assert_close(copied(x), expected, rtol=0, atol=0)
    AcceleratorState._reset_state(True)  # a state left by earlier tests (a Trainer's) would refuse bf16
    GradientState._reset_state()
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        prepared = accelerator.prepare_model(model)
        unwrapped = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
        assert unwrapped.forward.__self__ is unwrapped
        torch.testing.assert_close(unwrapped(x), expected, rtol=0, atol=0)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_a_data_parallel_replica_runs_its_own_modules():
    """nn.DataParallel (HF Trainer's with several GPUs and no distributed launch) runs a replica per device
    made by ``_replicate_for_data_parallel``, which copies the wrapper's ``__dict__`` and then gives the replica
    its own children (the device's copies): the forward held there was bound to the original wrapper, so every
    replica ran the original's modules (on the first device) with its device's inputs."""
    torch.manual_seed(0)
    model = get_moelora_model(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)),
                              MoELoRAConfig(target_modules=["0", "2"], num_experts=3, top_k=2, r=2))
    replica = model._replicate_for_data_parallel()
    replica._modules["model"] = nn.Sequential(nn.Linear(8, 4))  # as torch.nn.parallel.replicate sets them
    assert replica.forward.__self__ is replica and model.forward.__self__ is model
    assert inspect.signature(replica.forward) == inspect.signature(model.forward)
    x = torch.randn(2, 8)
    torch.testing.assert_close(replica(x), replica._modules["model"](x), rtol=0, atol=0)


def test_a_data_parallel_replica_leaves_the_originals_task_ids_alone():
    """nn.DataParallel's replicas (one per device, their forwards in threads) copied the wrapper's list of the
    last forward's swaps: a replica's forward put back the task ids the original's forward had given its layers
    (and those of a replica running beside it), which a gradient-checkpointed layer needs again in backward."""
    model = get_moelora_model(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)),
                              MoELoRAConfig(target_modules=["0", "2"], num_experts=3, r=2, router="task"))
    x = torch.randn(2, 8)
    model(x, task_ids=1)
    replica = model._replicate_for_data_parallel()
    replica._modules["model"] = copy.deepcopy(model.model)  # as torch.nn.parallel.replicate sets them
    replica(x, task_ids=2)
    assert int(model.model[0].task_ids) == 1 and int(replica.model[0].task_ids) == 2
    model(x, task_ids=0)  # the original's next forward puts back its own swaps only
    assert int(model.model[0].task_ids) == 0 and int(replica.model[0].task_ids) == 2


def test_a_second_wrapper_around_wrapped_layers_is_refused():
    """MoELoRAModel(model, config) around layers a live wrapper holds (or around a wrapper) was accepted: the second
    wrapper's set_adapter put another adapter's layers into the model, which the first then computed under its own
    active adapter's name (and would save as that). Refused, naming add_adapter; a copy, or the layers of a wrapper
    that is gone (one left to the garbage collector by a reference cycle too) or were unloaded, can be wrapped."""
    import gc
    import pickle

    config = MoELoRAConfig(target_modules=["0", "2"], num_experts=3, r=2)
    model = get_moelora_model(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)), config)
    for inner in (model.model, model.model[0], nn.Sequential(model.model)):
        with pytest.raises(ValueError, match="MoE-LoRA layers of a MoELoRAModel that is still alive"):
            moelora.MoELoRAModel(inner, config)
    with pytest.raises(ValueError, match="MoELoRAModel already; add an adapter to it with add_adapter"):
        moelora.MoELoRAModel(model, config)
    assert moelora.MoELoRAModel(copy.deepcopy(model.model), config).model[0].num_experts == 3
    model.add_adapter("other", MoELoRAConfig(target_modules=["0"], num_experts=2, r=2))
    for copied in (model, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        copied.set_adapter("other")  # an added adapter's layers, and those of a copy, are held too
        with pytest.raises(ValueError, match="MoE-LoRA layers of a MoELoRAModel that is still alive"):
            moelora.MoELoRAModel(copied.model, config)
    inner, model.__dict__["cycle"] = model.model, model  # dropped, it waits for the garbage collector
    gc.disable()
    try:
        del model
        wrapped = moelora.MoELoRAModel(inner, config)
        assert wrapped.model is inner
    finally:
        gc.enable()
    single = get_moelora_model(nn.Sequential(nn.Linear(8, 8)), MoELoRAConfig(target_modules=["0"], num_experts=1))
    for old, base in ((wrapped, wrapped.unload()), (single, single.merge_and_unload())):
        again = MoELoRAConfig(target_modules=["0"], num_experts=2, r=2)
        assert get_moelora_model(base, again).model is old.model  # the old wrapper holds none of its new layers


def test_injecting_into_an_adapted_model_names_what_adapts_it():
    """get_moelora_model on a model that already holds adapter layers is refused; on a PEFT PeftModel the error
    said it held MoE-LoRA layers. It names the layer and what it is: a MoE-LoRA layer (add_adapter), or another
    library's (PEFT's merge_and_unload / unload)."""
    from peft import LoraConfig, get_peft_model

    config = MoELoRAConfig(target_modules=["2"], num_experts=2, r=2)
    peft_model = get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)),
                                LoraConfig(target_modules=["0"], r=2))
    with pytest.raises(ValueError, match=r"adapter layers of another library: base_model\.model\.0 is a peft\..*"
                                         r"merge_and_unload"):
        get_moelora_model(peft_model, config)
    model = get_moelora_model(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)), config)
    for given, layer in ((model, "model.2"), (model.model, "2")):
        with pytest.raises(ValueError, match=rf"already holds MoE-LoRA layers \({layer}\); add another adapter"):
            get_moelora_model(given, config)


def test_pickled_or_torch_saved_wrapper_keeps_the_wrapped_forward_signature():
    """A whole MoELoRAModel through pickle / torch.save + torch.load (and deepcopy) shows the wrapped
    model's forward signature, as the original: transformers' Trainer drops the dataset columns
    the signature does not name, so a copy showing ``(*args, labels, task_ids, **kwargs)`` would
    lose input_ids. Its forward is bound to the copy and computes the model."""
    import inspect
    import io
    import pickle

    model = get_moelora_model(tiny_llama(num_layers=1), MoELoRAConfig(target_modules=["q_proj"], num_experts=2,
                                                                      top_k=1))
    randomize_adapters(model)
    ids = token_batch()
    expected = model(ids).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False), copy.deepcopy(model)]
    for clone in copies:
        assert inspect.signature(clone.forward) == inspect.signature(model.forward)
        assert "input_ids" in inspect.signature(clone.forward).parameters
        assert clone.forward.__self__ is clone
        torch.testing.assert_close(clone(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_aux_loss_warns_when_reentrant_checkpointing_leaves_it_without_gradient(use_reentrant):
    """Reentrant checkpointing runs the layers' forward under torch.no_grad(): their aux losses
    (MoE-LoRA layers, an upcycled MoEFFN, MoLEx) have no gradient, which moelora.aux_loss says
    instead of training no router in silence; non-reentrant checkpointing gives the router its
    aux-loss gradient, and a forward without gradients (eval, generation) warns of nothing."""
    import warnings

    base = tiny_llama(num_layers=2)
    moelora.upcycle_ffn(base, num_experts=2, top_k=1, router="softmax_topk", layers_to_transform=[0])
    moelora.apply_molex(base, gate="linear")
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["q_proj"], num_experts=4, top_k=2,
                                                  router_aux_loss_coef=1.0))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ids = token_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        with torch.no_grad():
            model(ids, labels=ids, use_cache=False)
    messages = [str(w.message) for w in caught if "aux loss" in str(w.message)]
    router = model.model.model.layers[0].self_attn.q_proj.router.weight
    if use_reentrant:
        assert len(messages) == 1 and "use_reentrant=False" in messages[0], messages
        assert "module(s) (first: model.layers.0" in messages[0]
        assert not moelora.aux_loss(model).requires_grad
    else:
        assert messages == [] and router.grad is not None


def test_use_task_ids_after_a_forward_and_a_set_keeps_the_ids_set_since():
    """forward(task_ids=t), set_task_ids(u), then a use_task_ids block: the block puts back the forward's ids only
    where the layers still hold them, so after the block they hold u, set since, not what they held before t."""
    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], num_experts=3, router="task"))
    ids, u = token_batch(), torch.tensor([1, 1])
    model(ids, task_ids=torch.tensor([2, 0]))
    model.set_task_ids(u)
    with moelora.use_task_ids(model, 0):
        model(ids)
    assert all(layer.task_ids is u for layer in _layers(model).values())


def test_use_task_ids_on_another_model_leaves_a_wrappers_forward_ids_alone():
    """A use_task_ids block puts back the ids a wrapper's last forward gave the layers of the block's model only: a
    block on another model leaves the first wrapper's layers their forward's ids (which its backward routes by)."""
    config = MoELoRAConfig(target_modules=["query"], num_experts=3, router="task")
    first, other = get_moelora_model(tiny_bert(), config), get_moelora_model(tiny_bert(), config)
    ids, t = token_batch(), torch.tensor([2, 1])
    first(ids, task_ids=t)
    with moelora.use_task_ids(other, 0):
        other(ids)
    assert all(layer.task_ids is t for layer in _layers(first).values())
    assert len(first._forward_swaps) == 1


@pytest.mark.parametrize("given", ["wrapper", "inner_model", "layer"])
def test_use_task_ids_after_a_forward_with_task_ids_leaves_no_stale_ids(given):
    """The wrapper's forward(task_ids=) keeps its ids until its next forward; a use_task_ids block
    after it must not end by putting them back for good (its forward dropped the record that would
    have restored them): after the block the layers hold what they held before that forward. So too
    for a block given a module inside the wrapper (the wrapped model, one layer), which the wrapper's
    forward in the block ran."""
    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], num_experts=3, router="task"))
    block = {"wrapper": model, "inner_model": model.model,
             "layer": model.model.encoder.layer[1].attention.self.query}[given]
    ids = token_batch()
    if given != "layer":  # (the forward in a block on one layer needs ids on the others: set below)
        model(ids, task_ids=torch.tensor([0, 2]))
        with moelora.use_task_ids(block, torch.tensor([1, 1])):
            model(ids)
        assert all(layer.task_ids is None for layer in _layers(model).values())
        with pytest.raises(RuntimeError, match="none is set"):
            model(ids)
    before = torch.tensor([2, 2])
    model.set_task_ids(before)
    model(ids, task_ids=torch.tensor([0, 2]))
    with moelora.use_task_ids(block, 1):
        model(ids)
    assert all(layer.task_ids is before for layer in _layers(model).values())


@pytest.mark.parametrize("before", [None, 2], ids=["no_ids", "other_ids"])
def test_a_block_inside_the_wrapped_forward_keeps_the_wrappers_task_ids(before):
    """A use_task_ids block that the wrapped model's forward runs on one of its modules (a decoder always
    run as task 0) leaves the ids of the wrapper's forward(task_ids=) on the other layers, and gives them
    back to its own after it: the forward routes as without the wrapper. Before, the block put the
    forward's ids back on every layer first (none: the encoder raised; others: it routed by those)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec, self.enc = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            with moelora.use_task_ids(self.dec, 0):
                h = self.dec(x)
            return self.enc(h)

    torch.manual_seed(0)
    model = get_moelora_model(Net(), MoELoRAConfig(target_modules=["dec", "enc"], num_experts=3, router="task",
                                                   init_lora_weights=False))
    x, ids = torch.randn(2, 8), torch.tensor([1, 2])
    if before is not None:
        model.set_task_ids(before)
    with torch.no_grad(), moelora.use_task_ids(model.model.enc, ids):
        expected = model.model(x)
    with torch.no_grad():
        got = model(x, task_ids=ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert all(layer.task_ids is ids for layer in _layers(model).values())
    model(x, task_ids=torch.tensor([0, 0]))  # the next forward puts the ids held before back first
    with moelora.use_task_ids(model, 1):
        pass
    assert all(layer.task_ids is None if before is None else int(layer.task_ids) == before
               for layer in _layers(model).values())


def test_a_block_while_a_wrapper_is_created_meanwhile():
    """A use_task_ids block reads the registry of live wrappers (for their last forward's ids) while
    another thread may create one (a server loading a model): it reads a snapshot. Here the creation
    happens deterministically while the block reads a wrapper's record; before, the block raised
    "Set changed size during iteration" (the registry was a WeakSet iterated in Python)."""
    config = MoELoRAConfig(target_modules=["0"], num_experts=2, router="task")
    created = []

    class CreatingWrapper(moelora.MoELoRAModel):
        armed = False

        @property
        def _forward_swaps(self):
            if CreatingWrapper.armed and not created:  # as another thread would, between two registry items
                created.append(get_moelora_model(nn.Sequential(nn.Linear(4, 4)), config))
            return self.__dict__["_swaps"]

        @_forward_swaps.setter
        def _forward_swaps(self, value):
            self.__dict__["_swaps"] = value

    model = CreatingWrapper(get_moelora_model(nn.Sequential(nn.Linear(4, 4)), config).model, config)
    model(torch.randn(2, 4), task_ids=torch.tensor([0, 1]))
    CreatingWrapper.armed = True
    with moelora.use_task_ids(model, 1):
        assert int(model.model[0].task_ids) == 1
    assert created and model.model[0].task_ids is None


@pytest.mark.parametrize("setter", ["wrapper", "inner_model", "use_task_ids"])
def test_task_ids_set_after_a_forward_with_the_same_int_stay_set(setter):
    """forward(task_ids=1) then set_task_ids(1): the next forward must route by task 1. Python ints
    are shared objects, so the forward's record could not tell the set ids from its own and put back
    what the layers held before it (task 0 here: a silently wrong task)."""
    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], num_experts=3, router="task"))
    randomize_adapters(model)
    ids = token_batch()
    expected = model(ids, task_ids=torch.tensor([1, 1])).last_hidden_state
    model.set_task_ids(0)
    model(ids, task_ids=1)
    if setter == "use_task_ids":
        with moelora.use_task_ids(model.model, 1):
            out = model(ids).last_hidden_state
    else:
        if setter == "wrapper":
            model.set_task_ids(1)
        else:
            moelora.set_task_ids(model.model, 1)
        out = model(ids).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_task_ids_set_after_a_forward_with_the_same_tensor_stay_set():
    """forward(task_ids=t) then set_task_ids(t), the same tensor object: the next forward must route by t. The
    forward's record tells its own ids from ids set since by who set them, not by the tensor, which is the same."""
    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], num_experts=3, router="task"))
    randomize_adapters(model)
    ids, t = token_batch(), torch.tensor([1, 2])
    expected = model(ids, task_ids=t).last_hidden_state
    model.set_task_ids(0)
    model(ids, task_ids=t)
    model.set_task_ids(t)
    torch.testing.assert_close(model(ids).last_hidden_state, expected, rtol=0, atol=0)
    assert all(layer.task_ids is t for layer in _layers(model).values())


def _same_gradients_with_checkpointing(step, use_reentrant=False, targets=("q_proj", "v_proj")):
    """Run ``step(model)`` (forwards and a backward) on a task-routed tiny Llama without and with gradient
    checkpointing, assert both give the same gradients, and return the two models."""
    import warnings

    grads, models = [], []
    for checkpointing in (False, True):
        model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=list(targets), num_experts=3,
                                                                          router="task"))
        randomize_adapters(model)
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' deprecation notes
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            step(model)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        models.append(model)
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
    return models


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("stale", [False, True], ids=["none_set", "other_ids_set"])
def test_task_ids_forward_kwarg_routes_the_checkpointed_recomputation_too(use_reentrant, stale):
    """A gradient-checkpointed layer runs its forward again in backward: the task ids given to the
    wrapper's forward must still route it then (not the ids set before, nor none), so the
    gradients equal those without checkpointing. The next forward puts the earlier ids back."""
    ids = token_batch(seq=7)
    before = torch.tensor([1, 1]) if stale else None

    def step(model):
        if stale:
            model.set_task_ids(before)
        model(ids, labels=ids, use_cache=False, task_ids=torch.tensor([2, 0])).loss.backward()

    for model in _same_gradients_with_checkpointing(step, use_reentrant):
        model.eval()
        if stale:  # the next forward routes by the ids set before
            expected = model(ids, use_cache=False, task_ids=before).logits
            torch.testing.assert_close(model(ids, use_cache=False).logits, expected)
        else:
            with pytest.raises(RuntimeError, match="none is set"):
                model(ids, use_cache=False)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("between", ["training_forward", "no_grad_forward"])
def test_two_forwards_and_one_backward_route_each_recomputation_by_its_forwards_ids(use_reentrant, between):
    """forward(task_ids=a), forward(task_ids=b), backward of both losses (a multi-task step): each
    checkpointed recomputation must route by its own forward's ids, so the gradients equal those without
    checkpointing. Before, the first forward's recomputation routed by the second's ids (silently wrong
    gradients), also where the second forward ran under no_grad (an evaluation between). After the backward
    the layers hold the last forward's ids again."""
    ids, last = token_batch(seq=7), torch.tensor([1, 1])

    def step(model):
        loss = model(ids, labels=ids, use_cache=False, task_ids=torch.tensor([2, 0])).loss
        if between == "training_forward":
            loss = loss + 0.5 * model(ids.flip(0), labels=ids.flip(0), use_cache=False, task_ids=last).loss
        else:
            with torch.no_grad():
                model(ids, use_cache=False, task_ids=last)
        loss.backward()

    for model in _same_gradients_with_checkpointing(step, use_reentrant):
        assert all(layer.task_ids is last for layer in _layers(model).values())


def test_a_backward_that_raises_leaves_the_layers_the_ids_they_held_before_it():
    """forward(task_ids=a), forward(task_ids=b), a backward of the first's loss that raises (a caught out-of-memory
    error, as a batch-size finder catches it): its routing hook gave the layers a's ids again, and what gives them b's
    back runs at a backward's end, which this one never reached, so the layers kept a's ids for good: the next
    forward put back b's (not held any more) and a forward without task ids routed by a's silently, where it
    raises (none set) after a forward with ids that the model held none before."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                      num_experts=3, router="task"))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = token_batch(seq=7)
    first = model(ids, labels=ids, use_cache=False, task_ids=torch.tensor([2, 0]))
    last = torch.tensor([1, 1])
    model(ids, labels=ids, use_cache=False, task_ids=last)
    weight = next(p for name, p in model.named_parameters() if p.requires_grad and ".layers.0." in name)

    def fail(grad):
        raise RuntimeError("out of memory")

    handle = weight.register_hook(fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        first.loss.backward()
    handle.remove()
    model.eval()
    with pytest.raises(RuntimeError, match="none is set"):  # the ids held before the forwards: none
        model(ids, use_cache=False)
    assert all(layer.task_ids is None for layer in _layers(model).values())
    assert model._backward_put_backs == []


def test_a_block_between_forward_and_backward_keeps_the_forwards_other_state():
    """A use_aux_loss_mask block after the wrapper's forward(task_ids=) leaves the task ids alone (it
    puts back that forward's mask only, not its ids): the backward after it recomputes the
    checkpointed layers with the forward's ids, as without checkpointing. Before, the block put the
    ids held before the forward back (none here: the backward raised; other ids: wrong gradients).
    Likewise a use_task_ids block leaves the forward's aux-loss mask on the layers."""
    ids = token_batch(seq=7)

    def step(model):
        loss = model(ids, labels=ids, use_cache=False, task_ids=torch.tensor([2, 0])).loss
        with moelora.use_aux_loss_mask(model, torch.ones_like(ids)), torch.no_grad():
            model.model(ids, use_cache=False)
        loss.backward()

    model = _same_gradients_with_checkpointing(step, targets=("q_proj",))[1]
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        model(ids, use_cache=False, task_ids=torch.tensor([2, 0]), aux_loss_mask=mask)
        held = [layer.aux_loss_mask for layer in _layers(model).values()]
        assert all(m is not None for m in held)
        with moelora.use_task_ids(model.model, 1):
            model.model(ids, use_cache=False)
    assert all(layer.aux_loss_mask is m for layer, m in zip(_layers(model).values(), held))


def test_a_frozen_adapter_hooks_no_input_embeddings_under_reentrant_checkpointing_until_set_adapter_trains_it():
    """The wrapper makes the input embeddings' outputs require grad (reentrant checkpointing of a ViT, which
    transformers does not hook) only for a trainable adapter: a frozen one (inference_mode) trains nothing, and
    set_adapter making it trainable hooks them."""
    base = tiny_vit()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert not hasattr(base, "_require_grads_hook")
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["q_proj"], num_experts=2, inference_mode=True))
    assert not hasattr(base, "_require_grads_hook")
    model.set_adapter("default")
    assert hasattr(base, "_require_grads_hook")


@pytest.mark.parametrize("embeddings", ["adapted", "saved_whole"])
def test_switching_away_from_an_adapter_of_the_input_embeddings_keeps_them_hooked_for_reentrant_checkpointing(
        embeddings):
    """Reentrant checkpointing enabled on the wrapper hooks the input embeddings (transformers' and the wrapper's
    enable_input_require_grads): those of the active adapter where it adapts them or saves them whole. set_adapter
    to an adapter that does not takes that module out of the model; the embeddings there must be hooked then, or
    the checkpointed layers' adapters get no gradient (PEFT's layers stay in the model, with the hook). Gradients
    as without checkpointing, after switching there and back."""
    ids = token_batch(seq=7)
    settings = ({"target_modules": ["embed_tokens", "q_proj"]} if embeddings == "adapted" else
                {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]})
    grads = []
    for checkpointing in (False, True):
        model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(num_experts=1, **settings)).train()
        model.add_adapter("other", MoELoRAConfig(target_modules=["v_proj"], num_experts=1, r=2))
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' deprecation note
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        step = {}
        for name in ("other", "default"):
            model.set_adapter(name)
            g = torch.Generator().manual_seed(len(name))
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:  # the embedding adapter's A starts at 0, as PEFT's
                        p.add_(torch.randn(p.shape, generator=g) * 0.3)
            model(ids, labels=ids, use_cache=False).loss.backward()
            step[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            model.zero_grad(set_to_none=True)
        grads.append(step)
    for name, expected in grads[0].items():
        assert expected and grads[1][name].keys() == expected.keys(), name
        for n, grad in expected.items():
            assert grad.abs().sum() > 0, n
            torch.testing.assert_close(grads[1][name][n], grad, rtol=1e-5, atol=1e-6, msg=f"{name}: {n}")


def test_layers_expose_the_base_weight_and_bias_as_peft_t5_and_vit_run():
    """Model code reads a targeted layer's weight (T5's ``wo.weight.dtype``, ViT's patch
    ``projection.weight.dtype``): the MoE-LoRA layers give the base layer's, as PEFT's layers."""
    t5, ids = tiny_t5(), token_batch()
    with torch.no_grad():  # (T5 on CPU rounds differently with and without trainable weights)
        expected = t5(input_ids=ids, decoder_input_ids=ids).logits
        model = get_moelora_model(t5, MoELoRAConfig(target_modules=["q", "v", "wo"], num_experts=2, top_k=1, r=4))
        wo = model.model.encoder.block[0].layer[1].DenseReluDense.wo
        assert wo.weight is wo.base_layer.weight and wo.bias is None
        assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits, expected)
        vit = tiny_vit()
        pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        expected = vit(pixel_values=pixels).logits
        model = get_moelora_model(vit, MoELoRAConfig(target_modules=["projection", "q_proj"], num_experts=2, top_k=1))
        projection = model.model.vit.embeddings.patch_embeddings.projection
        assert isinstance(projection, moelora.MoELoRAConv) and projection.bias is projection.base_layer.bias
        assert torch.equal(model(pixel_values=pixels).logits, expected)


def test_tie_weights_after_injection_ties_the_targeted_head_base_weight():
    """transformers' tie_weights (which resize_token_embeddings, the Trainer's checkpoint loading and
    users call) assigns ``lm_head.weight = embed_tokens.weight``: on a targeted lm_head that goes to
    its base layer. Before, nn.Module refused a parameter named like the layer's weight property
    (KeyError: attribute 'weight' already exists)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg).eval()
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["q_proj", "lm_head"], num_experts=2, top_k=1, r=2))
    head, embed = base.lm_head, base.model.embed_tokens
    head.base_layer.weight = nn.Parameter(embed.weight.detach().clone())  # untied, as a load may leave it
    base.tie_weights()
    assert head.weight is embed.weight and head.base_layer.weight is embed.weight
    assert "weight" not in head._parameters
    model(token_batch())


@pytest.mark.parametrize("targets, adapted", [
    (dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "model.embed_tokens"),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "lm_head"),
    (dict(target_modules=["q_proj"], adapter="embed"), "model.embed_tokens"),  # held by an inactive adapter
], ids=["lm_head", "embed_tokens", "modules_to_save", "inactive_adapter"])
def test_resize_token_embeddings_refuses_adapted_embeddings_before_changing_anything(targets, adapted):
    """The adapter's tensors of an adapted embedding or head have one row / column per token: resizing
    would leave them at the old vocabulary. transformers' resize raised a TypeError only at the module it
    could not resize: with lm_head adapted after resizing the input embeddings already (a half-resized
    model, 80 input rows and 64 logits). The wrapper refuses first, naming the module; the others resize."""
    extra = targets.pop("adapter", None)
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(num_experts=2, top_k=1, r=2, **targets))
    if extra:
        model.add_adapter(extra, MoELoRAConfig(target_modules=["embed_tokens"], num_experts=2, top_k=1, r=2))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"resize_token_embeddings: {re.escape(adapted)} .*before get_moelora_model"):
        model.resize_token_embeddings(80)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes and model.config.vocab_size == 64
    plain = get_moelora_model(tiny_llama(num_layers=2),
                              MoELoRAConfig(target_modules=["q_proj"], num_experts=2, top_k=1))
    plain.resize_token_embeddings(80)
    assert plain(torch.tensor([[70, 1, 2]])).logits.shape == (1, 3, 80)


def test_merge_refuses_a_layer_tied_to_another_module():
    """GPT-2 ties lm_head to wte: merging the wte adapter would add it to lm_head's weight too (a
    silently different model), so nothing merges and the error names both; an untied copy merges."""
    ids = token_batch()
    model = get_moelora_model(tiny_gpt2(), MoELoRAConfig(target_modules=["c_attn", "wte"], num_experts=1, r=4))
    randomize_adapters(model)
    with torch.no_grad():
        model.model.transformer.wte.lora_embedding_A.normal_()
    weights = {n: p.clone() for n, p in model.model.named_parameters()}
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match=r"transformer\.wte: .*tied to lm_head\.weight"):
            merge()
        assert all(torch.equal(p, weights[n]) for n, p in model.model.named_parameters())
    untied = get_moelora_model(tiny_gpt2(), MoELoRAConfig(target_modules=["c_attn", "wte"], num_experts=1, r=4,
                                                          modules_to_save=["lm_head"]))
    randomize_adapters(untied)
    expected = untied(ids).logits
    torch.testing.assert_close(untied.merge_and_unload()(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_meta_built_model_reset_after_to_empty_starts_as_its_base_and_trains():
    """Meta-device init of an injected model (FSDP2 / torchtitan): get_moelora_model on a model built
    on meta, to_empty (memory filled with NaN, as it may hold anything), reset_parameters() on every
    module that has it, then the base model's own tensors loaded (transformers' RMSNorm weights and
    rotary buffers have no reset_parameters): every adapter is initialised (router step counters 0,
    B zero, so the model computes its base model exactly) and a training step is finite.
    reset_lora_parameters() from the injection's seed gives the injected adapters bitwise."""
    from helpers import made_real_with_garbage, reset_every_module
    from moelora.tuner.adapters import adapter_tensor_names

    config = MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, r=4, router="threshold",
                           threshold_eps=0.2, threshold_eps_start=0.05, threshold_ramp_steps=10)
    base = tiny_llama(2)
    injection_seed = torch.get_rng_state()
    expected = get_moelora_model(copy.deepcopy(base), config)
    with torch.device("meta"):
        model = get_moelora_model(tiny_llama(2), config)
    reset_every_module(made_real_with_garbage(model))
    adapters = adapter_tensor_names(model)
    own = dict((*model.named_parameters(), *model.named_buffers()))
    with torch.no_grad():  # the base model's weights, as a trainer loads them
        for name, t in (*expected.named_parameters(), *expected.named_buffers()):
            if name not in adapters:
                own[name].copy_(t)
    layers = _layers(model)
    assert len(layers) == 4
    for layer in layers.values():
        assert layer.router.num_steps.item() == 0 and not layer.lora_B.any()
        assert torch.isfinite(layer.lora_A).all() and torch.isfinite(layer.router.weight).all()
    ids = token_batch()
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in trained)
    torch.optim.SGD(trained, lr=0.1).step()
    model.step_routers()
    assert all(torch.isfinite(p).all() for p in trained) and any(layer.lora_B.any() for layer in layers.values())

    torch.set_rng_state(injection_seed)
    for layer in layers.values():  # in injection order
        layer.reset_lora_parameters()
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


_GREEDY = dict(do_sample=False, pad_token_id=63, eos_token_id=None, max_new_tokens=3)


def _greedy_without_cache(model, ids, steps, **kwargs):
    """Greedy decoding by full forwards of the growing sequences (no KV cache): (tokens, logits per step)."""
    logits = []
    for _ in range(steps):
        logits.append(model(ids, use_cache=False, **kwargs).logits[:, -1])
        ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], 1)
    return ids, logits


def test_generate_takes_task_ids_as_the_wrappers_forward():
    """``wrapper.generate(..., task_ids=)`` routes every step (the prompt's forward and each cached
    decode step's [batch, 1] tokens) by the given ids, per example or an int: the tokens and logits
    of step-by-step full forwards. Beam search repeats each example's id over its beams; after
    generate the layers hold what they held before."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj", "o_proj"],
                                                                      num_experts=3, router="task", r=4))
    randomize_adapters(model, scale=2.0)
    model.eval()
    ids, tasks = token_batch(), torch.tensor([2, 0])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        for task_ids in (tasks, 1):
            expected, logits = _greedy_without_cache(model, ids, 3, task_ids=task_ids)
            out = model.generate(input_ids=ids, attention_mask=mask, task_ids=task_ids, output_logits=True,
                                 return_dict_in_generate=True, **_GREEDY)
            assert torch.equal(out.sequences, expected)
            torch.testing.assert_close(torch.stack(out.logits), torch.stack(logits))
        beams = model.generate(input_ids=ids, attention_mask=mask, task_ids=tasks, num_beams=2, **_GREEDY)
        for i in range(2):
            alone = model.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], task_ids=int(tasks[i]),
                                   num_beams=2, **_GREEDY)
            assert torch.equal(beams[i:i + 1], alone)
    assert all(layer.task_ids is None for layer in _layers(model).values())


@pytest.mark.parametrize("router", ["task", "softmax_topk"])
def test_generate_with_static_caches_and_multi_token_steps_equals_full_forwards(router):
    """Decoding that runs its forwards otherwise than one new token per step on a growing cache: a static cache
    (by name, and a StaticCache passed in), prompt lookup (several drafted tokens per forward, the cache cropped
    where a draft is rejected), assisted decoding by the model itself, chunked prefill. Each gives the tokens and
    step logits of full forwards over the growing sequences (no cache), by task ids or a learned router."""
    from transformers import StaticCache

    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj", "o_proj"],
                                                                      num_experts=3, top_k=2, router=router, r=4))
    randomize_adapters(model, scale=2.0)
    model.eval()
    ids = token_batch(seq=6)
    mask = torch.ones_like(ids)
    routing = dict(task_ids=torch.tensor([2, 0])) if router == "task" else {}
    with torch.no_grad():
        expected, logits = _greedy_without_cache(model, ids, 3, **routing)
        one = {k: v[:1] for k, v in routing.items()}
        for batch, settings in (
                (2, dict(cache_implementation="static")),
                (2, dict(past_key_values=StaticCache(config=model.config, max_cache_len=16))),
                (2, dict(prefill_chunk_size=4)),
                (1, dict(prompt_lookup_num_tokens=2)),
                (1, dict(assistant_model=model))):
            out = model.generate(input_ids=ids[:batch], attention_mask=mask[:batch], output_logits=True,
                                 return_dict_in_generate=True, **_GREEDY, **(routing if batch == 2 else one),
                                 **settings)
            assert torch.equal(out.sequences, expected[:batch]), settings
            torch.testing.assert_close(torch.stack(out.logits), torch.stack(logits)[:, :batch])


def test_generate_puts_back_the_last_forwards_task_ids_and_checks_its_own():
    """generate runs as a forward of the wrapper: the ids of the last forward(task_ids=) are put back
    first (no generation routed silently by a previous batch's ids), and task ids that cannot route
    the generated tokens (per token) or do not fit the prompt batch raise, naming task_ids."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=3,
                                                                      router="task"))
    ids = token_batch()
    model(ids, task_ids=torch.tensor([2, 0]))
    with pytest.raises(RuntimeError, match="none is set"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **_GREEDY)
    with pytest.raises(ValueError, match=r"task_ids .*per example.*\(2, 5\)"):
        model.generate(input_ids=ids, task_ids=torch.zeros(2, 5, dtype=torch.long), **_GREEDY)
    with pytest.raises(ValueError, match=r"task_ids holds 3 ids .* 2 examples"):
        model.generate(input_ids=ids, task_ids=torch.tensor([0, 1, 2]), **_GREEDY)
    assert all(layer.task_ids is None for layer in _layers(model).values())
    with pytest.raises(AttributeError, match="generate"):
        get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], num_experts=2)).generate


def test_generate_checks_per_example_task_ids_against_the_batch_of_an_encoder_decoders_encoder_outputs():
    """An encoder-decoder generating from ``encoder_outputs`` (no input_ids): generate found no prompt to check the
    ids against, and one id for a batch of two was repeated over both examples (a silent wrong routing; forward
    refuses it). The batch is read from the encoder outputs too: it raises, naming task_ids; ids that fit generate
    what generating from input_ids does, with and without beams."""
    model = get_moelora_model(tiny_t5(), MoELoRAConfig(target_modules=["q", "v"], num_experts=3, router="task", r=4))
    randomize_adapters(model, scale=2.0)
    ids, tasks = token_batch(), torch.tensor([2, 0])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with moelora.use_task_ids(model, tasks):
            encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
        for settings in ({}, dict(num_beams=2)):
            with pytest.raises(ValueError, match=r"task_ids holds 1 ids but the prompt batch has 2 examples"):
                model.generate(encoder_outputs=encoded, attention_mask=mask, task_ids=tasks[:1], **_GREEDY, **settings)
            given = model.generate(encoder_outputs=encoded, attention_mask=mask, task_ids=tasks, **_GREEDY, **settings)
            assert torch.equal(given, model.generate(input_ids=ids, attention_mask=mask, task_ids=tasks, **_GREEDY,
                                                     **settings))


def test_task_ids_set_around_a_beam_search_raise_naming_generates_task_ids():
    """Ids set on the layers (use_task_ids) meet generate's num_beams rows per example: the error
    names the fix, task_ids passed to the wrapper's generate."""
    model = get_moelora_model(tiny_llama(num_layers=1), MoELoRAConfig(target_modules=["q_proj"], num_experts=3,
                                                                      router="task"))
    ids = token_batch()
    with moelora.use_task_ids(model, torch.tensor([2, 0])):
        with pytest.raises(ValueError, match=r"generate\(\.\.\., task_ids"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=2, **_GREEDY)


def test_generate_routes_a_task_routed_assistant_model_by_its_task_ids():
    """Assisted decoding (``assistant_model=``) with a draft model that routes by task too: its drafts got no ids
    (it raised "none is set", for the wrapper or the model it wraps as the assistant). Every forward of the draft
    routes by generate's task ids (an int, a [1] tensor), the output is the model's own greedy output, and after
    generate the draft's layers hold what they held before."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                      num_experts=3, router="task", r=4))
    draft = get_moelora_model(tiny_llama(num_layers=1), MoELoRAConfig(target_modules=["q_proj"], num_experts=3,
                                                                      router="task", r=4))
    randomize_adapters(model, scale=2.0)
    randomize_adapters(draft, scale=2.0)
    ids = token_batch()[:1]
    mask = torch.ones_like(ids)
    routed = []
    draft_layer = _layers(draft)["model.layers.0.self_attn.q_proj"]
    draft_layer.register_forward_pre_hook(lambda layer, _: routed.append(layer.task_ids.tolist()))
    with torch.no_grad():
        for task_ids in (2, torch.tensor([1])):
            want = model.generate(input_ids=ids, attention_mask=mask, task_ids=task_ids, **_GREEDY)
            for assistant in (draft, draft.model):
                routed.clear()
                out = model.generate(input_ids=ids, attention_mask=mask, task_ids=task_ids, assistant_model=assistant,
                                     **_GREEDY)
                assert torch.equal(out, want)
                assert routed and all(r == torch.as_tensor(task_ids).tolist() for r in routed), routed
            assert all(layer.task_ids is None for layer in _layers(draft).values())


def test_generate_under_inference_mode_builds_the_task_routing_once_per_ids(monkeypatch):
    """Serving runs generate under torch.inference_mode. The task-id tensors moelora makes there (an
    int's 0-d tensor, the ids repeated over beams) and ids the caller made there must still be reused
    by every layer and step (an inference tensor has no version counter, so task routing would build
    its ids, one-hot matrix and range check again in every layer at every step: on a GPU a host sync
    each, for ids on the device): as many builds as under no_grad, the same tokens. Ids set with
    set_task_ids under inference_mode are held as a normal tensor too."""
    model, builds = _task_model_counting_builds(monkeypatch)
    ids = token_batch()

    def run(mode, task_ids, **settings):
        builds.clear()
        with mode():
            tasks = task_ids() if callable(task_ids) else task_ids
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=tasks, **_GREEDY,
                                 **settings)
        return out, len(builds)

    for task_ids, settings in ((1, {}), (1, dict(num_beams=2)), (lambda: torch.tensor([2, 0]), {}),
                               (lambda: torch.tensor([2, 0]), dict(num_beams=2))):
        expected, expected_builds = run(torch.no_grad, task_ids, **settings)
        out, count = run(torch.inference_mode, task_ids, **settings)
        assert torch.equal(out, expected)
        assert count == expected_builds <= 2, (task_ids, settings)
    with torch.inference_mode():
        moelora.set_task_ids(model, 2)
    assert not _layers(model)["model.layers.0.self_attn.q_proj"].task_ids.is_inference()


def test_get_moelora_model_names_a_model_or_config_of_the_wrong_type():
    """A dict of fields, PEFT's LoraConfig or None as config (or a non-module model) is a TypeError naming the
    argument, before the model changes, not an AttributeError from deep inside the injection."""
    from peft import LoraConfig

    base = tiny_llama()
    for config, hint in [({"target_modules": ["q_proj"]}, r"got dict; build one with moelora.MoELoRAConfig"),
                         (LoraConfig(target_modules=["q_proj"], r=4), r"got LoraConfig; a PEFT LoRA checkpoint"),
                         (None, r"got NoneType$")]:
        with pytest.raises(TypeError, match=r"^config must be a moelora.MoELoRAConfig, " + hint):
            get_moelora_model(base, config)
    assert not _layers(base)
    with pytest.raises(TypeError, match=r"^model must be a torch.nn.Module, got str"):
        get_moelora_model("q_proj", MoELoRAConfig(target_modules=["q_proj"]))


def test_injection_errors_name_the_module_and_what_a_layerless_model_lacks():
    """A layer refusing its base (a grouped conv whose groups do not divide r) said only 'r must be a multiple
    of the convolution's groups (4), got r=2', not which module; a per-layer num_experts list on a model
    without numbered layers said 'the model has 0 layers' without why. Both now say; nothing is injected."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(8, 8, 3, groups=4))
    with pytest.raises(ValueError, match=r"^1: r must be a multiple of the convolution's groups \(4\), got r=2$"):
        get_moelora_model(model, MoELoRAConfig(target_modules=["0", "1"], num_experts=2, top_k=1, r=2))
    with pytest.raises(ValueError, match=r"^num_experts lists 2 per-layer counts but the model has 0 layers "
                                         r"\(no module sits in a numbered layer, as layers.<i> or h.<i>; "
                                         r"layers_pattern=None"):
        get_moelora_model(model, MoELoRAConfig(target_modules=["0"], num_experts=[2, 2], top_k=1))
    assert not _layers(model)


def test_router_stats_names_are_relative_to_the_wrapped_model_through_dataparallel_and_compile():
    """router_stats of a wrapper inside nn.DataParallel (Trainer's on several GPUs; on CPU it calls the module)
    or torch.compile's OptimizedModule names the layers as it does for the wrapper itself."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=2,
                                                                      top_k=1))
    model(token_batch())
    expected = moelora.router_stats(model)
    assert list(expected) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    for container in (torch.nn.DataParallel(model), torch.compile(model), torch.nn.DataParallel(torch.compile(model))):
        stats = moelora.router_stats(container)
        assert list(stats) == list(expected)
        for name in expected:
            torch.testing.assert_close(stats[name], expected[name], rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_three_forwards_and_one_backward_leave_the_layers_the_last_forwards_ids(use_reentrant):
    """forward(task_ids=a), forward(b), forward(c), one backward of the three losses: each recomputation routes by
    its forward's ids, and after the backward the layers hold c's again (the last forward's), not b's: the put-backs
    the routing hooks queue run at the backward's end, and must give back in the reverse of the order the hooks ran."""
    ids, last = token_batch(seq=7), torch.tensor([1, 1])

    def step(model):
        loss = model(ids, labels=ids, use_cache=False, task_ids=torch.tensor([2, 0])).loss
        loss = loss + 0.5 * model(ids.flip(0), labels=ids.flip(0), use_cache=False, task_ids=torch.tensor([0, 1])).loss
        loss = loss + 0.25 * model(ids, labels=ids, use_cache=False, task_ids=last).loss
        loss.backward()

    for model in _same_gradients_with_checkpointing(step, use_reentrant):
        assert all(layer.task_ids is last for layer in _layers(model).values())


def test_all_linear_takes_a_model_whose_get_output_embeddings_raises_attribute_error():
    """A model whose get_output_embeddings raises AttributeError (a head-less model reading an attribute it lacks)
    has no output head to leave out: 'all-linear' adapts its linear layers instead of raising."""

    class Headless(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.out = nn.Linear(4, 4), nn.Linear(4, 4)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, x):
            return self.out(self.proj(x))

    model = get_moelora_model(Headless(), MoELoRAConfig(target_modules="all-linear", num_experts=2, top_k=1))
    assert sorted(_layers(model)) == ["out", "proj"]


def test_a_peft_default_target_given_as_a_regex_is_kept_as_a_regex():
    """PEFT's default targets of some architectures are a regex (Gemma 4's), not a list: the config takes it as a
    regex (as a list of its characters it named no module)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    class Multimodal(nn.Module):
        def __init__(self, model_type):
            super().__init__()
            self.config = type("Config", (), {"model_type": model_type})()
            self.language_model = nn.ModuleDict({"layers": nn.ModuleList(
                [nn.ModuleDict({"q_proj": nn.Linear(4, 4), "k_proj": nn.Linear(4, 4), "v_proj": nn.Linear(4, 4)})])})

    names = [n for n, m in Multimodal("").named_modules() if isinstance(m, nn.Linear)]
    found = [(t, v, sorted(n for n in names if re.fullmatch(v, n))) for t, v in defaults.items() if isinstance(v, str)]
    found = [entry for entry in found if entry[2]]
    if not found:
        pytest.skip("this PEFT gives no architecture a regex of default targets matching this model's names")
    model_type, regex, expected = found[0]
    model = get_moelora_model(Multimodal(model_type), MoELoRAConfig(num_experts=2, top_k=1))
    assert model.moelora_config.target_modules == regex
    assert sorted(_layers(model)) == expected


@pytest.mark.parametrize("returned", ["dict", "tuple"])
def test_the_aux_loss_added_to_a_half_precision_loss_keeps_its_dtype(returned):
    """A bfloat16 model's loss stays bfloat16 with the (float32) aux loss added, in a dict output as in a tuple
    (a float32 sum would change what the trainer's scaler and logging see)."""
    def half_loss(y, labels):
        loss = (y - labels).pow(2).mean().to(torch.bfloat16)
        return {"loss": loss, "y": y} if returned == "dict" else (loss, y)

    model = get_moelora_model(_Projection(half_loss), MoELoRAConfig(target_modules=["proj"], num_experts=4, top_k=2))
    model.train()
    out = model(torch.randn(2, 3, 8), labels=torch.zeros(2, 3, 8))
    loss, y = (out["loss"], out["y"]) if returned == "dict" else out
    assert moelora.aux_loss(model) > 0 and loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss, (y.pow(2).mean().to(torch.bfloat16) + moelora.aux_loss(model).to(torch.bfloat16)))


def test_the_wrappers_step_routers_advances_the_schedules_by_n():
    """``model.step_routers(n)`` advances every router's threshold schedule by ``n`` steps, as
    ``moelora.step_routers(model, n)`` does (not by one)."""
    from moelora.modules.router import Router

    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(
        target_modules=["q_proj"], num_experts=4, top_k=2, router="threshold", threshold_eps=0.2,
        threshold_ramp_steps=10))
    model.step_routers(3)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers and [int(r.num_steps) for r in routers] == [3] * len(routers)


def test_clearing_task_ids_of_a_model_without_task_routed_layers_is_a_no_op():
    """``set_task_ids(model, None)`` (and a ``use_task_ids(model, None)`` block) clears the ids: on a model without
    task-routed layers there is nothing to clear, and it does not raise (ids there do)."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=2,
                                                                      top_k=1))
    moelora.set_task_ids(model, None)
    model.set_task_ids(None)
    with moelora.use_task_ids(model, None) as held:
        assert held is None
    with pytest.raises(ValueError, match="no task-routed MoE-LoRA layer"):
        model.set_task_ids(0)


def test_task_ids_of_merged_layers_can_be_cleared():
    """Task ids cannot route merged layers (which run their base weights), but clearing them routes nothing:
    ``set_task_ids(None)`` and a ``use_task_ids(model, None)`` block on a merged model do not raise."""
    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], num_experts=3, router="task"))
    model.merge_adapter(task=1)
    model.set_task_ids(None)
    with moelora.use_task_ids(model, None):
        model(token_batch())
    with pytest.raises(ValueError, match=r"cannot route merged layers \(task 1"):
        model.set_task_ids(0)


@pytest.mark.parametrize("kwargs,hooked", [({}, True), ({"use_reentrant": False}, False)])
def test_checkpointing_without_use_reentrant_counts_as_reentrant_for_the_input_embeddings_hook(kwargs, hooked):
    """Checkpointing kwargs that do not name use_reentrant run torch.utils.checkpoint's default, reentrant: the
    wrapper hooks the input embeddings (a ViT's, which transformers does not hook) as for use_reentrant=True;
    use_reentrant=False needs no hook."""
    base = tiny_vit()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert not hasattr(base, "_require_grads_hook")
    get_moelora_model(base, MoELoRAConfig(target_modules=["q_proj"], num_experts=2))
    assert hasattr(base, "_require_grads_hook") == hooked


def test_a_target_that_modules_to_save_names_itself_is_saved_whole_not_adapted():
    """A module that modules_to_save names (not only one inside it) trains and saves whole, as PEFT's: a target
    naming it too leaves it out and adapts the others."""
    model = get_moelora_model(tiny_bert(classification=True), MoELoRAConfig(
        target_modules=["query", "classifier"], modules_to_save=["classifier"], num_experts=2, top_k=1))
    layers = _layers(model)
    assert layers and all(n.endswith("query") for n in layers)
