"""save_pretrained / from_pretrained, merge / unmerge, PEFT LoRA export and import."""

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelora
from moelora import MoELoRAConfig, MoELoRAModel, get_moelora_model
from helpers import randomize_adapters, tiny_bert, tiny_llama, token_batch


def _perturb_all_adapters(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_save_load_round_trip_is_exact(tmp_path):
    cfg = MoELoRAConfig(target_modules=["q_proj", "down_proj"], num_experts=[2, 3], top_k=2, router="threshold",
                        threshold_eps=0.2, threshold_ramp_steps=10, share_lora_a=True)
    model = get_moelora_model(tiny_llama(num_layers=2), cfg)
    _perturb_all_adapters(model)
    model.step_routers(4)
    model.eval()
    ids = token_batch()
    expected = model(ids).logits
    model.save_pretrained(str(tmp_path))
    loaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))
    assert torch.equal(loaded(ids).logits, expected)
    assert loaded.moelora_config == dataclasses.replace(cfg, inference_mode=True)  # loaded frozen, as PEFT's
    saved = moelora.persistence.adapter_state_dict(model)
    for name, tensor in moelora.persistence.adapter_state_dict(loaded).items():
        assert torch.equal(tensor, saved[name]), name
    assert any(n.endswith("router.num_steps") for n in saved)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path), is_trainable=True) \
        .get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_save_load_round_trip_keeps_the_biases_the_adapter_trains(tmp_path, bias):
    """An adapter with bias="all" / "lora_only" saves the biases it trains and loads them back exactly."""
    cfg = MoELoRAConfig(target_modules=["query", "value"], num_experts=2, top_k=1, bias=bias)
    model = get_moelora_model(tiny_bert(num_layers=2), cfg)
    _perturb_all_adapters(model)
    assert any(n.endswith("query.base_layer.bias") and p.requires_grad for n, p in model.named_parameters())
    model.eval()
    ids = token_batch()
    model.save_pretrained(str(tmp_path))
    loaded = MoELoRAModel.from_pretrained(tiny_bert(num_layers=2), str(tmp_path))
    assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


@pytest.mark.parametrize("upcycle_first", [True, False])
def test_round_trip_replays_upcycling_and_molex(tmp_path, upcycle_first):
    """Upcycled MoE FFNs and MoLEx gates are saved whole and rebuilt on the fresh model."""
    cfg = MoELoRAConfig(target_modules=["query", "value"], num_experts=2, top_k=1)

    def build(model):
        if upcycle_first:
            moelora.upcycle_ffn(model, num_experts=3, top_k=2, router="threshold", threshold_eps=0.1)
        wrapped = get_moelora_model(model, cfg)
        moelora.apply_molex(wrapped, gate="cosine", proj_dim=8, learn_alpha=True)
        if not upcycle_first:
            moelora.upcycle_ffn(wrapped, num_experts=3, top_k=2)
        return wrapped

    model = build(tiny_bert(num_layers=3))
    _perturb_all_adapters(model)
    model.eval()
    ids = token_batch()
    expected = model(ids).last_hidden_state
    model.save_pretrained(str(tmp_path))
    loaded = MoELoRAModel.from_pretrained(tiny_bert(num_layers=3), str(tmp_path))
    assert hasattr(loaded.model, "molex")
    assert sum(type(m).__name__ == "MoEFFN" for m in loaded.modules()) == 3
    assert torch.equal(loaded(ids).last_hidden_state, expected)
    saved = moelora.persistence.adapter_state_dict(model)
    assert any(".intermediate.w_in" in n for n in saved) and any(n.startswith("molex.") for n in saved)
    # the records are saved in the order the edits were applied, and replayed in it: the loaded model saves them so
    structure = json.loads((tmp_path / "moelora_config.json").read_text())["structure"]
    order = ["upcycle_ffn", "apply_molex"] if upcycle_first else ["apply_molex", "upcycle_ffn"]
    assert [r["op"] for r in structure] == order
    loaded.save_pretrained(str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "moelora_config.json").read_text())["structure"] == structure


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.mlp = torch.nn.ModuleDict({"fc1": torch.nn.Linear(8, 16), "fc2": torch.nn.Linear(16, 8)})

    def forward(self, x):
        x = x + self.proj(x)
        mlp = self.mlp
        return x + (mlp(x) if not isinstance(mlp, torch.nn.ModuleDict) else mlp.fc2(torch.relu(mlp.fc1(x))))


def _mlp_stack():
    torch.manual_seed(0)
    return torch.nn.Sequential(_Block(), _Block())


@pytest.mark.parametrize("activation", [torch.relu, lambda t: t.relu()], ids=["importable", "lambda"])
def test_upcycled_generic_ffn_round_trip_saves_its_activation_by_name(tmp_path, activation):
    net = _mlp_stack()
    moelora.upcycle_ffn(net, 2, 1, ffn_modules=["mlp"], in_proj="fc1", out_proj="fc2", activation=activation)
    model = get_moelora_model(net, MoELoRAConfig(target_modules=["proj"], num_experts=2, top_k=1))
    _perturb_all_adapters(model)
    x = torch.randn(3, 5, 8)
    if activation is not torch.relu:
        with pytest.raises(ValueError, match="cannot be saved by name"):
            model.save_pretrained(str(tmp_path))
        return
    model.save_pretrained(str(tmp_path))
    loaded = moelora.from_pretrained(_mlp_stack(), str(tmp_path))
    assert torch.equal(loaded(x), model.eval()(x))


def test_load_into_wrong_model_raises(tmp_path):
    model = get_moelora_model(tiny_llama(num_layers=2),
                              MoELoRAConfig(target_modules=["q_proj"], num_experts=2, top_k=1))
    model.save_pretrained(str(tmp_path))
    cfg = MoELoRAConfig(target_modules=["q_proj"], num_experts=2, top_k=1, r=2)
    (tmp_path / "moelora_config.json").write_text(cfg.to_json_string())
    with pytest.raises(ValueError, match=r"does not fit the model: .*q_proj.lora_A has shape \(2, 8, 16\)"):
        MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))


def test_callable_num_experts_saves_as_the_per_layer_counts_it_gave(tmp_path):
    """A callable num_experts (documented beside lists and presets) is code, which a checkpoint cannot hold: the
    wrapper's config lists the counts it gave (1 where no layer is adapted), for get_moelora_model and
    add_adapter, so the model saves and reloads the same layers and outputs."""
    config = MoELoRAConfig(target_modules=["q_proj"], num_experts=lambda layer, n: layer + 2, top_k=2,
                           layers_to_transform=[1, 2, 3])
    model = get_moelora_model(tiny_llama(), config)
    model.add_adapter("other", dataclasses.replace(config, num_experts=lambda layer, n: 2 * layer + 2))
    assert model.moelora_config.num_experts == [1, 3, 4, 5] and model.adapter_configs["other"].num_experts == [
        1, 4, 6, 8]
    randomize_adapters(model)
    ids = token_batch()
    expected = model.eval()(ids).logits
    model.save_pretrained(str(tmp_path))
    loaded = MoELoRAModel.from_pretrained(tiny_llama(), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), "other")
    assert torch.equal(loaded(ids).logits, expected)
    loaded.set_adapter("other")
    assert [m.num_experts for m in loaded.model.modules() if isinstance(m, moelora.MoELoRALinear)] == [4, 6, 8]


def test_a_config_with_a_callable_num_experts_refuses_to_serialise_naming_the_fix():
    """The config itself (not yet listed by a model) cannot hold the callable in JSON: to_dict and to_json_string say
    so, naming the list to give instead, rather than handing out a dict that json cannot write."""
    config = MoELoRAConfig(num_experts=lambda layer, n: 2, top_k=1)
    for serialise in (config.to_dict, config.to_json_string):
        with pytest.raises(ValueError, match="callable num_experts cannot be saved; give a list instead"):
            serialise()
    listed = dataclasses.replace(config, num_experts=[2, 2])
    assert MoELoRAConfig.from_dict(json.loads(listed.to_json_string())) == listed


def test_every_config_field_round_trips_through_the_saved_json(tmp_path):
    """moelora_config.json holds every field: a config with no field at its default (but use_dora and
    task_shared_lora, which the other values exclude) reads back equal, field by field, through to_json_string /
    from_dict and through a saved model's moelora_config.json (task_type, modules_to_save, ...)."""
    config = MoELoRAConfig(
        r=4, lora_alpha=6.0, lora_dropout=0.1, target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.k_proj"],
        layers_to_transform=[1], layers_pattern="layers", rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 3.0},
        use_rslora=True, init_lora_weights="gaussian", bias="lora_only", modules_to_save=["lm_head"],
        task_type="CAUSAL_LM", fan_in_fan_out=True, base_model_name_or_path="tiny", inference_mode=True,
        num_experts=[1, 3], top_k=1, router="threshold", router_renormalize=False, router_jitter_noise=0.01,
        share_lora_a=True, lora_a_dropout=0.05, threshold_eps=0.1, threshold_eps_start=0.2, threshold_ramp_steps=5,
        router_aux_loss_coef=0.02, router_z_loss_coef=0.002, add_aux_loss_to_output=False)
    defaults, names = MoELoRAConfig(), [f.name for f in dataclasses.fields(MoELoRAConfig)]
    changed = [n for n in names if getattr(config, n) != getattr(defaults, n)]
    assert set(names) - set(changed) == {"use_dora", "task_shared_lora"}
    again = MoELoRAConfig.from_dict(json.loads(config.to_json_string()))
    assert {f: getattr(again, f) for f in changed} == {f: getattr(config, f) for f in changed}
    get_moelora_model(tiny_llama(num_layers=2), dataclasses.replace(config, inference_mode=False)).save_pretrained(
        str(tmp_path))
    saved = json.loads((tmp_path / "moelora_config.json").read_text())
    assert list(saved) == sorted(saved)  # keys in order, as PEFT's adapter_config.json
    saved = MoELoRAConfig.from_dict(saved)
    assert {f: getattr(saved, f) for f in changed if f != "inference_mode"} == {
        f: getattr(config, f) for f in changed if f != "inference_mode"}


def test_save_pretrained_of_the_wrapped_model_names_the_wrapper(tmp_path):
    """moelora.save_pretrained needs the MoELoRAModel (it holds the adapters' configs): the model it wraps
    (or any other module) is a TypeError saying so, not an AttributeError, and nothing is written."""
    base = tiny_llama()
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["q_proj"], num_experts=2, top_k=2))
    with pytest.raises(TypeError, match=r"^save_pretrained writes a MoELoRAModel .* got LlamaForCausalLM: save the "
                                        r"wrapper"):
        moelora.save_pretrained(base, str(tmp_path / "inner"))
    assert not (tmp_path / "inner").exists()
    moelora.save_pretrained(model, str(tmp_path / "wrapper"))
    assert (tmp_path / "wrapper" / "moelora_config.json").exists()


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_single_expert(use_dora):
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules="all-linear", num_experts=1,
                                                                      use_dora=use_dora))
    _perturb_all_adapters(model)
    ids = token_batch()
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    expected = model(ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.model.model.layers[0].self_attn.q_proj.base_layer.weight,
                           weights["model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, moelora.MoELoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("make", [
    lambda dtype: moelora.MoELoRALinear(torch.nn.Linear(24, 16).to(dtype), num_experts=1, r=4),
    lambda dtype: moelora.MoELoRALinear(torch.nn.Linear(24, 16).to(dtype), num_experts=3, r=4, router="task"),
    lambda dtype: moelora.MoELoRAEmbedding(torch.nn.Embedding(20, 16).to(dtype), num_experts=1, r=4),
    lambda dtype: moelora.MoELoRAConv(torch.nn.Conv2d(3, 8, 3).to(dtype), num_experts=1, r=4),
], ids=["linear", "task", "embedding", "conv"])
def test_unmerge_gives_the_weights_back_to_the_merged_weights_rounding(make, dtype):
    """What docs/layers.md says: W + dW and W' - dW are computed in fp32 and each rounded to the
    weight's dtype once, so the unmerged weight is within one step of that dtype at max(|W|, |W + dW|)
    of W (a delta rounded to the weight's dtype first would not be), for large deltas too."""
    torch.manual_seed(0)
    layer = make(dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora" in name:
                p.normal_()
    task = 1 if layer.router_mode == "task" else None
    before = layer.base_layer.weight.detach().float().clone()
    layer.merge(task)
    merged = layer.base_layer.weight.detach().float().clone()
    layer.unmerge()
    after = layer.base_layer.weight.detach().float()
    assert not torch.equal(merged, before)
    magnitude = torch.maximum(before.abs(), merged.abs()).clamp_min(torch.finfo(dtype).tiny)
    step = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(magnitude)))
    assert ((after - before).abs() <= step).all()


def test_merged_dora_state_follows_the_model_moves():
    """A merged DoRA layer keeps what unmerge divides out (the magnitude scale) and subtracts (the
    delta): they must move with the model (merge on one device, ``.to()`` another, then unmerge,
    disable the adapter or switch adapters, which unmerge) and take its dtype; the meta device
    stands in for another device here."""
    model = get_moelora_model(tiny_llama(num_layers=1), MoELoRAConfig(target_modules=["q_proj"], num_experts=1,
                                                                      use_dora=True))
    _perturb_all_adapters(model)
    ids = token_batch()
    expected = model(ids).logits
    weight = model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    model.merge_adapter()
    model.double()
    with model.disable_adapter():  # unmerges
        model(ids)
    torch.testing.assert_close(model.model.model.layers[0].self_attn.q_proj.base_layer.weight.float(), weight,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(ids).logits.float(), expected, rtol=1e-5, atol=1e-5)
    model.merge_adapter()
    model.to("meta")
    model.unmerge_adapter()
    assert all(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))


def test_merge_task_routed_layer_for_chosen_task_and_reject_learned_router():
    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query", "value"], num_experts=3,
                                                         router="task", task_shared_lora=True))
    randomize_adapters(model)
    _perturb_all_adapters(model)
    ids = token_batch()
    expected = model(ids, task_ids=1).last_hidden_state
    model.merge_adapter(task=1)
    torch.testing.assert_close(model(ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    for route in (lambda: model(ids, task_ids=0), lambda: model.set_task_ids(torch.tensor([0, 2]))):
        with pytest.raises(ValueError, match=r"cannot route merged layers \(task 1 .*unmerge_adapter"):
            route()  # not silently task 1's output
    model.unmerge_adapter()
    torch.testing.assert_close(model(ids, task_ids=1).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs task in"):
        model.merge_adapter()
    routed = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="router depends on the input"):
        routed.merge_adapter()


def test_merges_of_a_model_with_task_routed_and_static_layers_leave_the_static_layers_taskless():
    """A static layer's merge is for no task: merge_adapter(task=1) on a model that also has task-routed layers
    records none for it (merged_task None), so merge_and_unload(task=1) keeps a static layer merged by itself
    (not "merged for task None, not task 1"); unmerge_adapter leaves the layers that are not merged alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(moelora.MoELoRALinear(torch.nn.Linear(8, 8), num_experts=3, r=4, router="task"),
                                moelora.MoELoRALinear(torch.nn.Linear(8, 8), num_experts=1, r=4))
    _perturb_all_adapters(model)
    x = torch.randn(5, 8)
    moelora.set_task_ids(model, 1)
    expected = model(x)
    moelora.set_task_ids(model, None)
    moelora.merge_adapter(model, task=1)
    assert [(layer.merged, layer.merged_task) for layer in model] == [(True, 1), (True, None)]
    moelora.unmerge_adapter(model)
    moelora.unmerge_adapter(model)  # nothing is merged: nothing to do
    model[1].merge()
    moelora.unmerge_adapter(model)  # the static layer alone is merged: it unmerges, the other is left alone
    assert not any(layer.merged for layer in model)
    model[1].merge()
    plain = moelora.merge_and_unload(model, task=1)
    assert all(type(m) is torch.nn.Linear for m in plain)
    torch.testing.assert_close(plain(x), expected)


@pytest.mark.parametrize("task", [True, 1.0, "1"], ids=repr)
def test_a_task_that_is_not_an_int_is_refused_naming_it(tmp_path, task):
    """task=True passed the range check as 1 and indexed lora_gamma as a bool mask: a shape error
    from deep in the export (a merge raised the same); 1.0 and "1" failed with indexing errors."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=3,
                                                                      router="task"))
    _perturb_all_adapters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"needs task in \[0, 3\) \(an int\), got {re.escape(repr(task))}"):
        moelora.export_peft_lora(model, str(tmp_path), task=task)
    with pytest.raises(ValueError, match=r"needs task in \[0, 3\) \(an int\)"):
        model.merge_adapter(task=task)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_merge_adapter_merges_every_layer_or_none_and_errors_name_the_layer():
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=[1, 2],
                                                                      top_k=1))
    _perturb_all_adapters(model)
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    for _ in range(2):  # layer 0 could merge, layer 1 cannot: nothing is merged, and a retry says the same
        with pytest.raises(ValueError, match=r"^model.layers.1.self_attn.q_proj: only static routing folds"):
            model.merge_adapter()
        assert not any(m.merged for m in model.modules() if isinstance(m, moelora.MoELoRALinear))
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    single = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    single.merge_adapter()
    with pytest.raises(RuntimeError, match=r"^model.layers.0.self_attn.q_proj: the layer is already merged"):
        single.merge_adapter()


def test_merge_and_unload_after_merge_adapter_keeps_the_merged_layers_as_peft():
    """``merge_adapter()`` (e.g. for a fast evaluation) then ``merge_and_unload()``: as PEFT's, the layers merged
    already stay merged (they raised "already merged"); a task-routed layer merged for another task than the one
    asked raises, naming the layer, before anything changes."""
    ids = token_batch()
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                      num_experts=1))
    _perturb_all_adapters(model)
    model.eval()
    expected = model(ids).logits
    model.merge_adapter()
    plain = model.merge_and_unload()
    assert not any(isinstance(m, moelora.MoELoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)

    tasks = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=3,
                                                                      router="task"))
    _perturb_all_adapters(tasks)
    tasks.eval()
    expected = tasks(ids, task_ids=1).logits
    tasks.merge_adapter(task=1)
    with pytest.raises(ValueError, match=r"^model.layers.0.self_attn.q_proj: merged for task 1, not task 2"):
        tasks.merge_and_unload(task=2)
    # without a task the error says which to give: unmerging first (what it said alone) then fails for want of one
    with pytest.raises(ValueError, match=r"merged for task 1, not task None; give task=1 to keep that merge"):
        tasks.merge_and_unload()
    assert all(m.merged and m.merged_task == 1 for m in tasks.modules() if isinstance(m, moelora.MoELoRALinear))
    torch.testing.assert_close(tasks.merge_and_unload(task=1)(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_export_task_adapter_to_peft_and_load_with_peft(tmp_path, use_rslora):
    """PEFT's model loaded from the export computes the task's output; with rsLoRA (s = alpha / sqrt(r)) and a
    per-layer rank the exported alpha_pattern must be s * sqrt(r') (r' = 2r with the shared LoRA), not s * r'."""
    from peft import PeftModel

    model = get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query", "value"], num_experts=3,
                                                         router="task", task_shared_lora=True, r=4, lora_alpha=4,
                                                         rank_pattern={"value": 2}, use_rslora=use_rslora))
    randomize_adapters(model)
    _perturb_all_adapters(model)
    ids = token_batch()
    expected = model(ids, task_ids=2).last_hidden_state
    moelora.export_peft_lora(model, str(tmp_path), task=2)
    peft_model = PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs task in"):
        moelora.export_peft_lora(model, str(tmp_path))


@pytest.mark.parametrize("use_dora", [False, True])
def test_import_peft_lora_as_single_expert_and_into_an_expert(tmp_path, use_dora):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(num_layers=2), LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=use_dora)).eval()
    ids = token_batch()
    expected = peft_model(ids).logits
    peft_model.save_pretrained(str(tmp_path))
    ours = moelora.load_peft_lora(tiny_llama(num_layers=2), str(tmp_path)).eval()
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # round trip back to PEFT
    moelora.export_peft_lora(ours, str(tmp_path / "again"))
    from peft import PeftModel
    again = PeftModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path / "again")).eval()
    torch.testing.assert_close(again(ids).logits, expected, rtol=1e-5, atol=1e-5)
    if use_dora:
        return
    # into expert 1 of a task-routed model: the load sets gamma[1] = 1, task 1 reproduces the PEFT model
    tasks = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                                      lora_alpha=8, num_experts=2, router="task"))
    moelora.load_peft_lora(tasks, str(tmp_path), expert=1)
    torch.testing.assert_close(tasks(ids, task_ids=1).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["single", "task"])
def test_a_peft_lora_loaded_into_a_merged_model_is_merged_in_its_place(tmp_path, router):
    """load_peft_lora into a model whose adapter is merged (merge_adapter) copied the checkpoint into the
    layers while their base weights held the old adapter: the model still computed the old adapter, and
    unmerge_adapter then took the new one out of the base weights, which kept the old one's delta less the
    new one's for good. The merged layers are unmerged for the load and merged again after it: the model
    computes the PEFT LoRA merged, and unmerged, with the base weights it had."""
    from peft import LoraConfig, get_peft_model

    from helpers import rel_err

    peft_model = get_peft_model(tiny_llama(num_layers=2).double(), LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    ids = token_batch()
    expected = peft_model(ids).logits
    peft_model.save_pretrained(str(tmp_path))
    task = 1 if router == "task" else None
    cfg = MoELoRAConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, num_experts=2, router="task") \
        if router == "task" else MoELoRAConfig(target_modules=["q_proj", "v_proj"], r=4, num_experts=1, top_k=1)
    model = get_moelora_model(tiny_llama(num_layers=2).double(), cfg).eval()
    base_weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    randomize_adapters(model, seed=7)
    model.merge_adapter(task)
    moelora.load_peft_lora(model, str(tmp_path), expert=0 if task is None else task)
    layers = [m for m in model.modules() if isinstance(m, moelora.MoELoRALinear)]
    assert layers and all(layer.merged and layer.merged_task == task for layer in layers)
    assert rel_err(model(ids).logits, expected) < 1e-12
    model.unmerge_adapter()
    assert max(rel_err(p, base_weights[n]) for n, p in model.named_parameters() if "base_layer" in n) < 1e-12
    assert rel_err(model(ids, **({} if task is None else {"task_ids": task})).logits, expected) < 1e-12


def test_import_peft_lora_keeps_its_lora_dropout_and_base_model_name(tmp_path):
    """The MoELoRAConfig built for a PEFT checkpoint carries the PEFT config's fields moelora has
    (lora_dropout: continued training drops out as PEFT's would)."""
    import json

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(num_layers=2), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                     lora_dropout=0.3))
    peft_model.save_pretrained(str(tmp_path))
    config_path = tmp_path / "adapter_config.json"
    peft_config = json.loads(config_path.read_text())
    assert peft_config["lora_dropout"] == 0.3
    config_path.write_text(json.dumps(dict(peft_config, base_model_name_or_path="tiny/llama")))
    ours = moelora.load_peft_lora(tiny_llama(num_layers=2), str(tmp_path))
    assert ours.moelora_config.lora_dropout == 0.3 and ours.moelora_config.base_model_name_or_path == "tiny/llama"
    dropout = ours.model.model.layers[0].self_attn.q_proj.lora_dropout
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.3
    config_path.write_text(json.dumps(dict(peft_config, lora_dropout=1.5)))
    with pytest.raises(ValueError, match=r"adapter_config.json: lora_dropout must be in \[0, 1\), got 1.5"):
        moelora.load_peft_lora(tiny_llama(num_layers=2), str(tmp_path))


def test_export_peft_lora_writes_the_layers_lora_dropout(tmp_path):
    """PEFT's config gets the adapter's lora_dropout (a round trip keeps it); layers that differ
    in it cannot be written as one PEFT config."""
    import json

    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                      num_experts=1, lora_dropout=0.2))
    moelora.export_peft_lora(model, str(tmp_path / "a"))
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_dropout"] == 0.2
    assert moelora.load_peft_lora(tiny_llama(num_layers=2), str(tmp_path / "a")).moelora_config.lora_dropout == 0.2
    layer = model.model.model.layers[1].self_attn.v_proj
    layer.settings = dataclasses.replace(layer.settings, lora_dropout=0.4)
    with pytest.raises(ValueError, match=r"the layers' lora_dropout values differ \(\[0.2, 0.4\]\)"):
        moelora.export_peft_lora(model, str(tmp_path / "b"))


def test_exported_task_imports_into_that_task_expert_exactly(tmp_path):
    """export_peft_lora(task=t) then load_peft_lora(expert=t): the load sets gamma[t] = 1 (B holds
    gamma folded in), so task t computes the PEFT LoRA; the other tasks are left as they were.
    A non-zero task-shared LoRA would add to task t's output: an error, nothing copied."""
    cfg = MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=3, router="task")
    source = get_moelora_model(tiny_llama(num_layers=2), cfg)
    _perturb_all_adapters(source)
    source.eval()
    ids = token_batch()
    moelora.export_peft_lora(source, str(tmp_path), task=1)
    target = get_moelora_model(tiny_llama(num_layers=2), cfg).eval()
    randomize_adapters(target, seed=7)
    other_task = target(ids, task_ids=2).logits
    moelora.load_peft_lora(target, str(tmp_path), expert=1)
    torch.testing.assert_close(target(ids, task_ids=1).logits, source(ids, task_ids=1).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(target(ids, task_ids=2).logits, other_task)
    assert target.model.model.layers[0].self_attn.q_proj.lora_gamma[1].item() == 1.0

    shared_cfg = MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=3, router="task", task_shared_lora=True)
    fresh = get_moelora_model(tiny_llama(num_layers=2), shared_cfg).eval()  # the shared LoRA starts at zero: exact
    moelora.load_peft_lora(fresh, str(tmp_path), expert=1)
    torch.testing.assert_close(fresh(ids, task_ids=1).logits, source(ids, task_ids=1).logits, rtol=1e-5, atol=1e-5)
    trained = get_moelora_model(tiny_llama(num_layers=2), shared_cfg)
    randomize_adapters(trained)
    before = {n: p.detach().clone() for n, p in trained.named_parameters()}
    with pytest.raises(ValueError, match=r"q_proj: the layer's task-shared LoRA is non-zero"):
        moelora.load_peft_lora(trained, str(tmp_path), expert=1)
    assert all(torch.equal(p, before[n]) for n, p in trained.named_parameters())


def test_a_numpy_integer_expert_loads_as_that_int(tmp_path):
    """expert=np.int64(1) (a task id read from a numpy array) was refused with "expert must be an int",
    where set_task_ids and merge_adapter / export_peft_lora's task take numpy integers: it loads into
    that task's expert as expert=1 does."""
    np = pytest.importorskip("numpy")
    cfg = MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=3, router="task")
    source = get_moelora_model(tiny_llama(num_layers=2), cfg)
    _perturb_all_adapters(source)
    moelora.export_peft_lora(source, str(tmp_path), task=1)
    by_int, by_numpy = (get_moelora_model(tiny_llama(num_layers=2), cfg) for _ in range(2))
    randomize_adapters(by_int, seed=7)
    randomize_adapters(by_numpy, seed=7)
    moelora.load_peft_lora(by_int, str(tmp_path), expert=1)
    moelora.load_peft_lora(by_numpy, str(tmp_path), expert=np.int64(1))
    expected = dict(by_int.named_parameters())
    assert all(torch.equal(p, expected[n]) for n, p in by_numpy.named_parameters())
    assert by_numpy.model.model.layers[0].self_attn.q_proj.lora_gamma[1].item() == 1.0


def test_peft_lora_into_a_task_needs_the_layers_it_does_not_adapt_to_be_zero_for_that_task(tmp_path):
    """A PEFT LoRA of q_proj loaded into task 1 of a model task-routing q_proj and v_proj: task 1 of
    v_proj kept its trained expert, so task 1 computed the PEFT LoRA plus that, silently. It raises
    (nothing copied); into layers that add nothing for the task (as injected) it computes the PEFT LoRA."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(num_layers=2).double(), LoraConfig(r=4, lora_alpha=8,
                                                                              target_modules=["q_proj"]))
    _perturb_all_adapters(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    ids = token_batch()
    cfg = MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=3, router="task", r=4)
    trained = get_moelora_model(tiny_llama(num_layers=2).double(), cfg).eval()
    _perturb_all_adapters(trained)
    before = {n: p.detach().clone() for n, p in trained.named_parameters()}
    with pytest.raises(ValueError, match=r"no LoRA for model.layers.0.self_attn.v_proj, whose task 1 adds a non-zero"):
        moelora.load_peft_lora(trained, str(tmp_path), expert=1)
    assert all(torch.equal(p, before[n]) for n, p in trained.named_parameters())
    with torch.no_grad():
        for layer in (trained.model.model.layers[i].self_attn.v_proj for i in range(2)):
            layer.lora_gamma[1] = 0.0
    other_task = trained(ids, task_ids=2).logits
    moelora.load_peft_lora(trained, str(tmp_path), expert=1)
    torch.testing.assert_close(trained(ids, task_ids=1).logits, peft_model(ids).logits, rtol=1e-12, atol=1e-12)
    assert torch.equal(trained(ids, task_ids=2).logits, other_task)


def test_import_peft_checkpoint_with_targeted_embeddings_loads_their_saved_base_weights(tmp_path):
    """With embed_tokens / lm_head among the targets PEFT also saves their base weights
    (save_embedding_layers="auto"); loading copies them into the base layers, as PEFT does."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file

    peft_model = get_peft_model(tiny_llama(num_layers=2), LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"], init_lora_weights=False)).eval()
    with torch.no_grad():  # e.g. a resized and retrained vocabulary: the saved base weights differ from the fresh ones
        peft_model.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)
        peft_model.base_model.model.lm_head.base_layer.weight.add_(0.1)
    ids = token_batch()
    expected = peft_model(ids).logits
    peft_model.save_pretrained(str(tmp_path))
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(str(weights))
    embedding = "base_model.model.model.embed_tokens.base_layer.weight"
    assert {embedding, "base_model.model.lm_head.base_layer.weight"} <= set(state)
    torch.testing.assert_close(PeftModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path)).eval()(ids).logits,
                               expected)
    ours = moelora.load_peft_lora(tiny_llama(num_layers=2), str(tmp_path)).eval()
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not ours.model.model.embed_tokens.base_layer.weight.requires_grad  # still the frozen base
    # a saved base weight of another shape is an error naming it; the fresh model is left as it was
    state[embedding] = torch.zeros(65, 16)
    save_file(state, str(weights))
    base = tiny_llama(num_layers=2)
    with pytest.raises(ValueError, match=r"model.embed_tokens.base_layer.weight has shape \(65, 16\), the model's "
                                         r"has shape \(64, 16\)"):
        moelora.load_peft_lora(base, str(tmp_path))
    assert type(base.model.embed_tokens) is torch.nn.Embedding


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)


class _NestedNames(torch.nn.Module):
    """Two linear layers, one's name (``lin``) the end of the other's (``sub.lin``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.sub = torch.nn.Linear(8, 8), _Inner()

    def forward(self, x):
        return self.sub.lin(self.lin(x))


def test_peft_interop_adapts_exactly_the_named_layers_when_a_name_ends_another(tmp_path):
    """A module's name as a plain target / rank_pattern / alpha_pattern key also selects every module whose name
    ends with ``.<name>`` (PEFT's rule): the import refused a valid PEFT checkpoint with ranks lin: 2, sub.lin: 4
    (``lin``'s rank was given to sub.lin), adapted sub.lin when only lin was in the checkpoint, and the export
    gave sub.lin lin's alpha in PEFT (a silently different output)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    x = torch.randn(3, 8)
    peft_model = get_peft_model(_NestedNames(), LoraConfig(r=2, lora_alpha=2, target_modules=["lin"],
                                                           rank_pattern={"sub.lin": 4}, alpha_pattern={"sub.lin": 1},
                                                           init_lora_weights=False)).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = moelora.load_peft_lora(_NestedNames(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-6, atol=1e-6)

    only_lin = get_peft_model(_NestedNames(), LoraConfig(r=2, target_modules=r"lin", init_lora_weights=False))
    only_lin.save_pretrained(str(tmp_path / "only_lin"))
    loaded = moelora.load_peft_lora(_NestedNames(), str(tmp_path / "only_lin"))
    assert isinstance(loaded.model.lin, moelora.MoELoRALinear)
    assert type(loaded.model.sub.lin) is torch.nn.Linear

    model = get_moelora_model(_NestedNames(), MoELoRAConfig(target_modules=["lin"], num_experts=1, r=2, lora_alpha=2,
                                                            alpha_pattern={"^sub.lin": 7}))
    randomize_adapters(model)
    model.eval()
    moelora.export_peft_lora(model, str(tmp_path / "export"))
    again = PeftModel.from_pretrained(_NestedNames(), str(tmp_path / "export")).eval()
    assert again.base_model.model.sub.lin.scaling["default"] == 3.5
    torch.testing.assert_close(again(x), model(x), rtol=1e-6, atol=1e-6)


def test_peft_task_type_and_base_model_survive_import_and_export(tmp_path):
    """load_peft_lora dropped the PEFT config's task_type and export_peft_lora wrote neither the adapter's
    task_type nor its base_model_name_or_path: PEFT's AutoPeftModelForSequenceClassification could not load the
    export ("Cannot infer the auto class")."""
    from peft import AutoPeftModelForSequenceClassification, LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    tiny_bert(num_layers=2, classification=True).save_pretrained(str(tmp_path / "base"))
    base = lambda: BertForSequenceClassification.from_pretrained(str(tmp_path / "base")).eval()  # noqa: E731
    peft_model = get_peft_model(base(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    _perturb_all_adapters(peft_model)  # the LoRA factors and the classifier's trained copy
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = moelora.load_peft_lora(base(), str(tmp_path / "peft")).eval()
    assert ours.moelora_config.task_type == "SEQ_CLS"
    assert ours.moelora_config.base_model_name_or_path == str(tmp_path / "base")
    moelora.export_peft_lora(ours, str(tmp_path / "export"))
    again = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "export")).eval()
    ids = token_batch()
    torch.testing.assert_close(again(ids).logits, peft_model.eval()(ids).logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, rtol=1e-6, atol=1e-6)


def _tiny_distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32, num_labels=3,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)).eval()


def test_peft_modules_to_save_selects_the_modules_peft_saved(tmp_path):
    """PEFT's modules_to_save list selects every module whose name ends with a name as a string: a DistilBERT
    SEQ_CLS adapter trains and saves pre_classifier with classifier. The import took the list by whole dotted
    parts (classifier only) and refused PEFT's checkpoint ("unsupported tensor ... pre_classifier.weight")."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_tiny_distilbert(), LoraConfig(r=2, target_modules=["q_lin"], task_type="SEQ_CLS"))
    _perturb_all_adapters(peft_model)  # the LoRA factors and both saved modules' trained copies
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    ours = moelora.load_peft_lora(_tiny_distilbert(), str(tmp_path)).eval()
    ids = token_batch()
    torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, rtol=1e-6, atol=1e-6)
    assert sorted(ours.moelora_config.modules_to_save) == ["classifier", "pre_classifier"]


def test_export_with_adapted_embeddings_saves_their_base_weights_as_peft_does(tmp_path):
    """With embed_tokens / lm_head adapted PEFT saves their base weights (save_embedding_layers="auto"), e.g. the
    rows of a resized vocabulary, and its load restores them; export_peft_lora saved none, so PEFT's model, resized
    as the trained one was, had other rows there (a silently different output)."""
    from peft import PeftModel

    def resized(seed):
        model = tiny_llama(num_layers=2)
        torch.manual_seed(seed)  # the new rows are drawn at random
        model.resize_token_embeddings(72, mean_resizing=False)
        return model.eval()

    model = get_moelora_model(resized(1), MoELoRAConfig(target_modules=["embed_tokens", "lm_head", "q_proj"], r=4,
                                                        num_experts=1))
    randomize_adapters(model)
    model.eval()
    ids = torch.tensor([[3, 64, 70, 5, 71]])
    moelora.export_peft_lora(model, str(tmp_path))
    again = PeftModel.from_pretrained(resized(2), str(tmp_path)).eval()
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)


def test_export_without_adapted_embeddings_saves_no_embedding_weight(tmp_path):
    """The base weights of the input / output embeddings are saved where those layers are adapted only (PEFT's
    "auto"): else PEFT's load would overwrite the base model's embeddings with the exporting model's."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], r=4, num_experts=1))
    moelora.export_peft_lora(model, str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved and all(re.search(r"\.lora_[AB]\.weight$", k) for k in saved), sorted(saved)


def test_peft_interop_of_a_model_without_embeddings_round_trips(tmp_path):
    """A transformers model without input embeddings (ConvNeXt) raises NotImplementedError from
    get_input_embeddings: it saves no embedding weight, and its export loads into PEFT and back exactly."""
    import transformers
    from peft import PeftModel

    def convnext():
        torch.manual_seed(0)
        return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
            num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, num_labels=3)).eval()

    model = get_moelora_model(convnext(), MoELoRAConfig(target_modules=["pwconv1"], r=2, num_experts=1))
    _perturb_all_adapters(model)
    model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    expected = model(pixel_values=pixels).logits
    moelora.export_peft_lora(model, str(tmp_path))
    assert all(re.search(r"\.lora_[AB]\.weight$", k) for k in load_file(str(tmp_path / "adapter_model.safetensors")))
    theirs = PeftModel.from_pretrained(convnext(), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(pixel_values=pixels).logits, expected, rtol=1e-5, atol=1e-5)
    ours = moelora.load_peft_lora(convnext(), str(tmp_path)).eval()
    torch.testing.assert_close(ours(pixel_values=pixels).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_of_a_task_shared_lora_on_a_grouped_convolution_is_refused(tmp_path):
    """A task's LoRA plus the task-shared one (rank 2r) on a grouped convolution has no PEFT layout: refused,
    naming the layer, before anything is written."""
    torch.manual_seed(0)
    model = get_moelora_model(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)),
                              MoELoRAConfig(target_modules=["0"], r=2, num_experts=2, router="task",
                                            task_shared_lora=True))
    with pytest.raises(ValueError, match=r"^0: a task-shared LoRA on a grouped convolution has no PEFT equivalent"):
        moelora.export_peft_lora(model, str(tmp_path / "peft"), task=0)
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_export_peft_lora_without_bias_writes_the_adapters_biases(tmp_path, bias):
    """export_peft_lora's bias defaults to the adapter's: the biases it trains are written, and PEFT's config says
    so."""
    cfg = MoELoRAConfig(target_modules=["query"], num_experts=1, bias=bias)
    model = get_moelora_model(tiny_bert(num_layers=2), cfg)
    moelora.export_peft_lora(model, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["bias"] == bias
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    own = model.model.state_dict()
    biases = {k for k in own if k.endswith("bias") and (bias == "all" or k.endswith("base_layer.bias"))}
    assert any(k.endswith("query.base_layer.bias") for k in biases)
    assert any("LayerNorm" in k for k in biases) == (bias == "all")
    assert {k for k in saved if k.endswith("bias")} == {"base_model.model." + k for k in biases}
    assert all(torch.equal(saved["base_model.model." + k], own[k]) for k in biases)


@pytest.mark.parametrize("bias", ["lora-only", "All", 1])
def test_export_peft_lora_refuses_a_bias_peft_does_not_have(tmp_path, bias):
    """export_peft_lora(bias=...) wrote any value into PEFT's config (and saved the adapted layers' biases for
    it), a checkpoint PEFT then failed to load; now the argument is named, nothing written."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    with pytest.raises(ValueError, match=re.escape(f"bias must be None or one of ('none', 'all', 'lora_only'), got "
                                                   f"{bias!r}")):
        moelora.export_peft_lora(model, str(tmp_path / "out"), bias=bias)
    assert not (tmp_path / "out").exists()


def test_peft_biases_into_one_task_that_would_change_the_other_tasks_are_refused(tmp_path):
    """A PEFT checkpoint's biases (bias="all") are tensors every expert and task uses: loaded for expert 1 of a
    task-routed model they silently changed task 2's output. Now an error names the tensor and nothing is copied;
    a bias equal to the model's (PEFT saved the base's) still loads."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    peft_model = get_peft_model(tiny_bert(num_layers=2), LoraConfig(r=4, target_modules=["query"], bias="all",
                                                                    init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path))
    ids = token_batch()
    config = MoELoRAConfig(target_modules=["query"], r=4, num_experts=2, router="task")  # 2: the fewest it refuses
    untouched = get_moelora_model(tiny_bert(num_layers=2), config).eval()
    moelora.load_peft_lora(untouched, str(tmp_path), expert=1)  # the biases are the base's: nothing else changes
    torch.testing.assert_close(untouched(ids, task_ids=1).last_hidden_state, peft_model.eval()(ids).last_hidden_state,
                               rtol=1e-6, atol=1e-6)
    weights = str(tmp_path / "adapter_model.safetensors")
    state = load_file(weights)
    key = "base_model.model.embeddings.LayerNorm.bias"
    state[key] = state[key] + 1e-4  # a trained bias, however little it moved
    save_file(state, weights)
    model = get_moelora_model(tiny_bert(num_layers=2), config).eval()
    randomize_adapters(model)
    other_task = model(ids, task_ids=0).last_hidden_state
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(f"{key} differs from the model's tensor, which every expert")):
        moelora.load_peft_lora(model, str(tmp_path), expert=1)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert torch.equal(model(ids, task_ids=0).last_hidden_state, other_task)


def test_checkpoint_written_by_earlier_code_still_loads():
    """tests/fixtures/checkpoint_v0 was saved by the code before the package was reorganised
    (tests/fixtures/make_checkpoint_v0.py): today's from_pretrained rebuilds the same model."""
    import os

    from safetensors.torch import load_file

    directory = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoint_v0")
    base = tiny_bert(num_layers=2)
    base.load_state_dict(load_file(os.path.join(directory, "base_model.safetensors")))
    loaded = moelora.from_pretrained(base, directory)
    assert sum(type(m).__name__ == "MoEFFN" for m in loaded.modules()) == 2
    assert hasattr(loaded.model, "molex")
    expected = load_file(os.path.join(directory, "expected.safetensors"))["last_hidden_state"]
    torch.testing.assert_close(loaded(token_batch()).last_hidden_state, expected, rtol=1e-6, atol=1e-6)


def test_export_peft_lora_of_a_model_without_moe_lora_layers_is_refused_naming_it(tmp_path):
    """A bare model (no adapter injected) has nothing to export: refused as such, nothing written."""
    with pytest.raises(ValueError, match=r"^the model holds no MoE-LoRA layer$"):
        moelora.export_peft_lora(tiny_llama(num_layers=1), str(tmp_path / "peft"))
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("edit", ["apply_molex", "upcycle_ffn"])
def test_export_peft_lora_refuses_models_with_upcycled_ffns_or_molex(tmp_path, edit):
    """PEFT has no place for an upcycled MoE FFN or a MoLEx gate: the export would compute another function."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    if edit == "apply_molex":
        moelora.apply_molex(model, gate="cosine", proj_dim=4)
    else:
        moelora.upcycle_ffn(model, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match=rf"structural edits \['{edit}'\] that a PEFT LoRA checkpoint cannot hold"):
        moelora.export_peft_lora(model, str(tmp_path / "peft"))
    assert not (tmp_path / "peft").exists()


def test_a_task_given_to_a_model_without_task_routing_is_refused_not_ignored(tmp_path):
    """merge_adapter / merge_and_unload / export_peft_lora with a task on a model whose layers do not route by task
    raise naming it (merge_and_unload(True), PEFT's progressbar by position, used to merge as if no task were given);
    nothing is merged or written."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    for call in (lambda: model.merge_adapter(task=0), lambda: model.merge_and_unload(True),
                 lambda: moelora.export_peft_lora(model, str(tmp_path / "peft"), task=1)):
        with pytest.raises(ValueError, match=r"task=(0|True|1) is given, but no MoE-LoRA layer of the model routes by "
                                             r"task"):
            call()
    assert not any(getattr(m, "merged", False) for m in model.modules()) and not (tmp_path / "peft").exists()
    model.merge_adapter()  # without a task it merges


def test_saving_several_adapters_keeps_the_active_adapters_last_aux_loss_and_router_stats(tmp_path):
    """save_pretrained activates each adapter in turn to write it; the active adapter's layers then hold the loss
    and statistics of their last forward as before (a loop saving between its forward and its logging or
    its moelora.aux_loss), not nothing."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=4,
                                                                      top_k=2))
    model.add_adapter("other", MoELoRAConfig(target_modules=["v_proj"], num_experts=2, top_k=1))
    model.train()
    model(token_batch(), labels=token_batch())
    loss, stats = model.aux_loss(), model.router_stats()
    assert loss > 0 and len(stats) == 2
    model.save_pretrained(str(tmp_path))
    assert torch.equal(model.aux_loss(), loss)
    after = model.router_stats()
    assert after.keys() == stats.keys()
    for name in stats:
        assert all(torch.equal(after[name][k], stats[name][k]) for k in stats[name]), name


def test_saving_several_adapters_leaves_every_modules_train_or_eval_mode(tmp_path):
    """save_pretrained's round trip through the other adapters leaves each module in its mode: the wrapped model
    put in eval mode by itself (``model.get_base_model().eval()``) keeps its adapter layers in eval mode (no
    dropout, no router noise), not the wrapper's train mode that set_adapter gives the adapters it stores."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=4,
                                                                      top_k=2, lora_dropout=0.5))
    model.add_adapter("other", MoELoRAConfig(target_modules=["v_proj"], num_experts=2, top_k=1))
    model.train()
    model.get_base_model().eval()
    modes = {n: m.training for n, m in model.named_modules()}
    model.save_pretrained(str(tmp_path))
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_saving_several_adapters_leaves_the_trainability_of_every_parameter(tmp_path):
    """save_pretrained's round trip through the other adapters leaves a parameter frozen by hand frozen, and an
    active adapter set frozen (inference_mode) frozen, also when add_adapter activates it again later."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=2,
                                                                      top_k=1))
    model.add_adapter("other", MoELoRAConfig(target_modules=["v_proj"], num_experts=2, top_k=1))
    model.model.model.layers[0].self_attn.q_proj.lora_A.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(flags.values()) and not all(flags.values())
    model.save_pretrained(str(tmp_path / "trainable"))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    model.set_adapter("default", inference_mode=True)
    model.save_pretrained(str(tmp_path / "frozen"))
    model.add_adapter("third", MoELoRAConfig(target_modules=["k_proj"], num_experts=2, top_k=1))
    assert not any(p.requires_grad for p in model.parameters())


def _perturbed_llama_and_its_logits():
    """(a tiny Llama with perturbed adapters in eval mode, a token batch, its logits)."""
    cfg = MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=3, top_k=2, router="topk_softmax")
    model = get_moelora_model(tiny_llama(num_layers=2), cfg)
    _perturb_all_adapters(model)
    model.eval()
    ids = token_batch()
    return model, ids, model(ids).logits


def _weight_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("adapter_model"))


def _directory_contents(directory):
    """{path relative to ``directory``: bytes} of every file under it."""
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_max_shard_size_splits_the_adapter_into_shards_with_an_index_that_load_back_exactly(tmp_path):
    """save_pretrained(max_shard_size=...) writes transformers' shards and index (it was ignored: one file); a
    later save without it replaces them; from_pretrained and load_adapter read the shards."""
    model, ids, expected = _perturbed_llama_and_its_logits()
    state = moelora.persistence.adapter_state_dict(model)
    largest = max(t.numel() * t.element_size() for t in state.values())
    model.save_pretrained(str(tmp_path), max_shard_size=f"{2 * largest / 1000}KB")
    files = _weight_files(tmp_path)
    shards = [f for f in files if f != "adapter_model.safetensors.index.json"]
    assert "adapter_model.safetensors.index.json" in files and len(shards) > 1
    assert shards == [f"adapter_model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((tmp_path / "adapter_model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(state) and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:
        assert sum(t.numel() * t.element_size() for t in load_file(tmp_path / shard).values()) <= 2 * largest
    loaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))
    assert torch.equal(loaded(ids).logits, expected)
    loaded.load_adapter(str(tmp_path), "again")
    loaded.set_adapter("again")
    assert torch.equal(loaded(ids).logits, expected)
    others = ["adapter_model-00001-of-00002.safetensors.bak", "adapter_model-00001-of-00002-safetensors"]
    for name in others:  # files only named alike (the user's) are not the earlier save's
        (tmp_path / name).write_bytes(b"not moelora's")
    model.save_pretrained(str(tmp_path))  # unsharded: the shards of the earlier save go
    assert _weight_files(tmp_path) == sorted(["adapter_model.safetensors"] + others)


def test_a_save_that_fails_midway_leaves_the_earlier_save_as_it_was(tmp_path, monkeypatch):
    """save_pretrained removed the earlier save's weight files before it wrote the new ones (and wrote the config
    first): a save failing midway (a full disk) lost the earlier checkpoint, or left its weights under the new
    config. Every file is written under a temporary name and renamed into place once all are written."""
    import safetensors.torch

    model, ids, expected = _perturbed_llama_and_its_logits()
    model.save_pretrained(str(tmp_path), max_shard_size=4000)
    before = _directory_contents(tmp_path)
    _perturb_all_adapters(model, seed=9)
    model.moelora_config.lora_alpha = 3.0
    calls, failing = [], {}

    def failing_save_file(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == failing["call"]:
            raise OSError(28, "No space left on device")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    for shard_size, failing["call"] in ((4000, 2), (None, 1)):  # shards over shards (the second fails), one file
        calls.clear()
        with pytest.raises(OSError, match="No space left"):
            model.save_pretrained(str(tmp_path), max_shard_size=shard_size)
        assert _directory_contents(tmp_path) == before
    monkeypatch.undo()
    assert torch.equal(MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))(ids).logits, expected)


def _save_file_stopped_midway(exc):
    """A safetensors save_file that writes a part of its file, then raises ``exc`` (a full disk, Ctrl-C)."""
    def save_file_part(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 16)
        raise exc
    return save_file_part


def test_a_save_interrupted_midway_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A save stopped while it writes (Ctrl-C: a KeyboardInterrupt, not an Exception) removes the files it staged
    as a failing one does, and leaves the earlier save as it was."""
    import safetensors.torch

    model, _, _ = _perturbed_llama_and_its_logits()
    model.save_pretrained(str(tmp_path))
    before = _directory_contents(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", _save_file_stopped_midway(KeyboardInterrupt()))  # Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(str(tmp_path))
    assert _directory_contents(tmp_path) == before


def test_an_export_that_fails_midway_leaves_the_earlier_export_as_it_was(tmp_path, monkeypatch):
    """export_peft_lora wrote PEFT's adapter_config.json in place, then the weights in place: an export failing
    while it wrote the weights (a full disk) left the new config over a truncated weights file, which neither PEFT
    nor load_peft_lora can read. Its files are staged as save_pretrained's and renamed into place once written."""
    import safetensors.torch

    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                      num_experts=1, lora_alpha=4.0))
    _perturb_all_adapters(model)
    model.eval()
    ids = token_batch()
    expected = model(ids).logits
    moelora.export_peft_lora(model, str(tmp_path))
    before = _directory_contents(tmp_path)
    _perturb_all_adapters(model, seed=9)
    full_disk = OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", _save_file_stopped_midway(full_disk))
    with pytest.raises(OSError, match="No space left"):
        moelora.export_peft_lora(model, str(tmp_path))
    assert _directory_contents(tmp_path) == before
    monkeypatch.undo()
    assert torch.equal(moelora.load_peft_lora(tiny_llama(num_layers=2), str(tmp_path)).eval()(ids).logits, expected)


def test_two_saves_into_one_directory_at_once_both_succeed(tmp_path, monkeypatch):
    """Two saves into one directory at once (two ranks that both save, a checkpoint thread beside the training loop)
    staged their files under the same temporary names: the first rename took the other's file away (its rename
    raised FileNotFoundError), and both removed the earlier save's weight file, the second os.remove raising too.
    Each save stages under names of its own and a weight file already removed is no error."""
    import os
    import threading

    import safetensors.torch

    model, ids, expected = _perturbed_llama_and_its_logits()
    model.save_pretrained(str(tmp_path))  # one file, which the sharded saves below remove
    writing, listing = threading.Barrier(2, timeout=30), threading.Barrier(2, timeout=30)
    listdir = os.listdir

    def save_file_together(*args, **kwargs):  # both saves staged their config before either renames
        if "00001-of" in args[1]:  # the first shard
            writing.wait()
        return save_file(*args, **kwargs)

    def listdir_together(path="."):  # both saves list the directory before either removes a stale file
        names = listdir(path)
        if os.path.abspath(path) == str(tmp_path):
            listing.wait()
        return names

    monkeypatch.setattr(safetensors.torch, "save_file", save_file_together)
    monkeypatch.setattr(os, "listdir", listdir_together)
    errors = []

    def save():
        try:
            model.save_pretrained(str(tmp_path), max_shard_size=4000)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            writing.abort()
            listing.abort()

    threads = [threading.Thread(target=save) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    monkeypatch.undo()
    assert not errors, errors
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert "adapter_model.safetensors" not in _weight_files(tmp_path)
    assert torch.equal(MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))(ids).logits, expected)


def test_a_shard_is_filled_up_to_max_shard_size_and_a_larger_tensor_gets_a_file_of_its_own(tmp_path):
    """transformers' rule: a tensor starts a new shard only where it would take the current one past max_shard_size
    (tensors of exactly max_shard_size bytes in all are one file), and a tensor larger than it gets a file of its own
    (no empty shard before it)."""
    model, ids, expected = _perturbed_llama_and_its_logits()
    state = moelora.persistence.adapter_state_dict(model)
    model.save_pretrained(str(tmp_path / "exact"), max_shard_size=sum(t.numel() * t.element_size()
                                                                      for t in state.values()))
    assert _weight_files(tmp_path / "exact") == ["adapter_model.safetensors"]
    model.save_pretrained(str(tmp_path / "tiny"), max_shard_size=1)
    files = _weight_files(tmp_path / "tiny")
    assert len(files) == len(state) + 1  # a shard per tensor and the index
    index = json.loads((tmp_path / "tiny" / "adapter_model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"].values()) == files[:-1]
    assert torch.equal(MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path / "tiny"))(ids).logits,
                       expected)


def test_every_shard_is_filled_until_the_next_tensor_would_take_it_past_max_shard_size(tmp_path):
    """Tensors in name order fill a shard up to max_shard_size: a shard ends only where the next tensor would not
    fit in it, after an earlier split as before it (a shard size not restarted at a split put every later tensor in
    a file of its own)."""
    model, _, _ = _perturbed_llama_and_its_logits()
    state = moelora.persistence.adapter_state_dict(model)
    sizes = {n: t.numel() * t.element_size() for n, t in state.items()}
    limit = 3 * max(sizes.values())
    model.save_pretrained(str(tmp_path), max_shard_size=limit)
    shards = [sorted(load_file(tmp_path / f)) for f in _weight_files(tmp_path) if not f.endswith(".json")]
    assert len(shards) > 2
    assert [n for shard in shards for n in shard] == sorted(state)
    for shard, following in zip(shards, shards[1:]):
        assert sum(sizes[n] for n in shard) <= limit < sum(sizes[n] for n in shard) + sizes[following[0]]
    given = dict(reversed(list(state.items())))  # a state_dict in another order shards in name order too
    model.save_pretrained(str(tmp_path / "given"), state_dict=given, max_shard_size=limit)
    assert [sorted(load_file(tmp_path / "given" / f)) for f in _weight_files(tmp_path / "given")
            if not f.endswith(".json")] == shards


def test_every_weights_file_written_carries_the_pt_format_metadata(tmp_path):
    """transformers' and PEFT's safetensors files carry {"format": "pt"} (transformers' readers check it): the one
    weights file, every shard and the PEFT export's weights file do."""
    from safetensors import safe_open

    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                      num_experts=1))
    model.save_pretrained(str(tmp_path / "one"))
    model.save_pretrained(str(tmp_path / "shards"), max_shard_size=1)
    moelora.export_peft_lora(model, str(tmp_path / "peft"))
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) > 3
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}, file


def test_a_directory_with_both_a_weights_file_and_a_shard_index_reads_the_weights_file(tmp_path):
    """As transformers: adapter_model.safetensors wins over a shard index beside it (left by another writer)."""
    model, ids, expected = _perturbed_llama_and_its_logits()
    model.save_pretrained(str(tmp_path), max_shard_size=4000)
    assert "adapter_model.safetensors.index.json" in _weight_files(tmp_path)
    single = {n: t + 1 for n, t in moelora.persistence.adapter_state_dict(model).items()}
    save_file(single, str(tmp_path / "adapter_model.safetensors"))
    loaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))
    for name, tensor in moelora.persistence.adapter_state_dict(loaded).items():
        assert torch.equal(tensor, single[name]), name


def test_an_adapter_sharded_by_huggingface_hub_loads(tmp_path):
    """transformers' writer (huggingface_hub.save_torch_state_dict) with the adapter's file name pattern."""
    from huggingface_hub import save_torch_state_dict

    cfg = MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, top_k=1)
    model = get_moelora_model(tiny_llama(num_layers=2), cfg)
    _perturb_all_adapters(model)
    model.eval()
    model.save_pretrained(str(tmp_path))
    state = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    save_torch_state_dict(state, str(tmp_path), filename_pattern="adapter_model{suffix}.safetensors",
                          max_shard_size=2000)
    assert len(_weight_files(tmp_path)) > 2
    loaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))
    assert torch.equal(loaded(token_batch()).logits, model(token_batch()).logits)


@pytest.mark.parametrize("size", ["5GB", "5Gb", "5gb", "500MB", "500Mb", "12KB", "12kb", "3KiB", "2GiB", "5Gib",
                                  "3kib", 123456])
def test_max_shard_size_reads_a_size_as_transformers_does(size):
    """A lowercase b after K, M or G counts bits in transformers ("500Mb" = 500 * 10**6 / 8 bytes); moelora took it
    for bytes, shards 8 times the size transformers' save_pretrained would write for the same argument."""
    from transformers.utils.hub import convert_file_size_to_int

    assert moelora.persistence._shard_bytes(size) == convert_file_size_to_int(size)


def test_max_shard_size_reads_a_size_with_spaces_around_it_as_without():
    """Spaces around a size are ignored, the bits rule included (a lowercase b before a trailing space)."""
    for size in ("500Mb", "500MB", "2GiB"):
        assert moelora.persistence._shard_bytes(f" {size}  ") == moelora.persistence._shard_bytes(size), size


def test_max_shard_size_reads_a_decimal_size_as_huggingface_hub_does():
    """A decimal number of units (which transformers' int() refuses) counts as huggingface_hub's parse_size_to_int
    reads it: 0.5MB is 500000 bytes, not int(0.5) MB = 0. (The figures are written out: that function is
    private to huggingface_hub.)"""
    sizes = {"1.5GB": 1_500_000_000, "0.5MB": 500_000, "2.5KB": 2_500}
    assert {size: moelora.persistence._shard_bytes(size) for size in sizes} == sizes
    assert moelora.persistence._shard_bytes("1.5MiB") == 3 * 2 ** 19
    assert moelora.persistence._shard_bytes("1.5Mb") == 1_500_000 // 8


def test_max_shard_size_reads_terabytes_which_transformers_does_not():
    """TB and TiB (beyond transformers' units) count 10**12 and 2**40 bytes."""
    sizes = [moelora.persistence._shard_bytes(s) for s in ("2TB", "1TiB", "3tib")]
    assert sizes == [2 * 10 ** 12, 2 ** 40, 3 * 2 ** 40]


@pytest.mark.parametrize("size,match", [(0, "max_shard_size must be positive, got 0"),
                                        ("5 elephants", "max_shard_size must be None, an int number of bytes or a"),
                                        (True, "max_shard_size must be None, an int number of bytes or a size")])
def test_a_bad_max_shard_size_raises_naming_it_and_writes_nothing(tmp_path, size, match):
    model = get_moelora_model(tiny_llama(num_layers=1), MoELoRAConfig(target_modules=["q_proj"], num_experts=2))
    with pytest.raises(ValueError, match=match):
        model.save_pretrained(str(tmp_path / "out"), max_shard_size=size)
    assert not (tmp_path / "out").exists()


def test_save_pretrained_refuses_keywords_it_does_not_take(tmp_path):
    """An unknown keyword (push_to_hub, a misspelt max_shard_size) was swallowed and ignored."""
    model = get_moelora_model(tiny_llama(num_layers=1), MoELoRAConfig(target_modules=["q_proj"], num_experts=2))
    with pytest.raises(TypeError, match="max_shardsize"):
        model.save_pretrained(str(tmp_path / "out"), max_shardsize="1KB")
    assert not (tmp_path / "out").exists()
    model.save_pretrained(str(tmp_path / "out"), safe_serialization=True)  # what transformers' Trainer passes
    assert _weight_files(tmp_path / "out") == ["adapter_model.safetensors"]


@pytest.mark.parametrize("is_trainable", [False, True])
def test_an_adapter_loads_into_a_model_built_on_the_meta_device(tmp_path, is_trainable):
    """from_pretrained onto a base built on the meta device (init_empty_weights, low_cpu_mem_usage) copied the
    adapter into meta tensors, which hold nothing (torch warned; the weights were lost): the adapter tensors now
    take the checkpoint's values, in the model's dtype, and the model computes the saved one once its base
    weights are loaded."""
    model, ids, expected = _perturbed_llama_and_its_logits()
    model.save_pretrained(str(tmp_path))
    state = load_file(tmp_path / "adapter_model.safetensors")  # an adapter saved in bf16
    save_file({n: t.bfloat16() if t.is_floating_point() else t for n, t in state.items()},
              str(tmp_path / "adapter_model.safetensors"))
    with torch.device("meta"):
        base = tiny_llama(num_layers=2)
    loaded = MoELoRAModel.from_pretrained(base, str(tmp_path), is_trainable=is_trainable)
    adapter = moelora.persistence.adapter_state_dict(loaded)
    assert adapter.keys() == state.keys()
    for name, tensor in adapter.items():
        assert not tensor.is_meta and tensor.dtype == state[name].dtype, name
        assert torch.equal(tensor, state[name].bfloat16().to(tensor.dtype) if tensor.is_floating_point()
                           else state[name]), name
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == ({f"model.{n}" for n, p in loaded.model.named_parameters()
                          if "lora_" in n or "router." in n} if is_trainable else set())
    real, own = tiny_llama(num_layers=2), set(loaded.model.state_dict())
    base_state = {(n if n in own else n.replace(".weight", ".base_layer.weight")): t
                  for n, t in real.state_dict().items()}
    assert not loaded.model.load_state_dict(base_state, strict=False, assign=True).unexpected_keys
    for name, buffer in real.named_buffers():  # the rotary embedding's (not in a state dict)
        owner, _, leaf = name.rpartition(".")
        loaded.model.get_submodule(owner)._buffers[leaf] = buffer
    bf16 = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))
    torch.testing.assert_close(loaded(ids).logits, bf16(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("where", ["fresh", "wrapper"])
def test_a_peft_lora_loaded_into_a_model_on_the_meta_device_is_refused_naming_the_tensor(tmp_path, where):
    """load_peft_lora onto a base built on the meta device (init_empty_weights) copied the PEFT LoRA into the
    injected layers' meta tensors, which hold nothing: it returned with every value lost, silently. Refused,
    naming the tensor, before anything is copied; a fresh model is left as it was."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(num_layers=2), LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path))
    with torch.device("meta"):
        base = tiny_llama(num_layers=2)
        model = base if where == "fresh" else get_moelora_model(base, MoELoRAConfig(
            target_modules=["q_proj", "v_proj"], r=4, num_experts=2, router="task"))
    with pytest.raises(NotImplementedError, match=r"adapter_model.safetensors: the model's model\.layers\.0\.self_attn"
                                                  r"\.q_proj\.lora_A is on the meta device"):
        moelora.load_peft_lora(model, str(tmp_path), expert=None if where == "fresh" else 1)
    if where == "fresh":
        assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.parametrize("source", ["wrapper", "wrapped", "prefixed"])
def test_a_state_dict_with_or_without_a_wrappers_prefix_saves_the_adapter(tmp_path, source):
    """save_pretrained(state_dict=...) takes the names of the wrapped model's state_dict as they are, or under a
    prefix (the MoELoRAModel's "model.", a wrapper's "module.model.")."""
    model, ids, expected = _perturbed_llama_and_its_logits()
    state = {"wrapper": model.state_dict, "wrapped": model.model.state_dict,
             "prefixed": lambda: {f"module.{n}": t for n, t in model.state_dict().items()}}[source]()
    model.save_pretrained(str(tmp_path), state_dict=state)
    assert torch.equal(MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))(ids).logits, expected)


def test_a_state_dict_lacking_an_adapter_tensor_is_refused_and_one_of_strided_views_saves(tmp_path):
    """save_pretrained(state_dict=...) refuses a dict without every adapter tensor (an FSDP rank's), writing
    nothing; a dict of non-contiguous views (as a gather may give) saves and loads back exactly."""
    model, ids, expected = _perturbed_llama_and_its_logits()
    state = model.model.state_dict()
    dropped = next(n for n in moelora.persistence.adapter_state_dict(model) if n.endswith("lora_B"))
    with pytest.raises(ValueError, match=r"state_dict lacks adapter tensors of the model, e\.g\. \[" + re.escape(
            repr(dropped))):
        model.save_pretrained(str(tmp_path / "partial"), state_dict={n: t for n, t in state.items() if n != dropped})
    assert not (tmp_path / "partial").exists()
    views = {n: t.t().contiguous().t() if t.dim() == 2 else t for n, t in state.items()}
    assert not all(t.is_contiguous() for t in views.values())
    model.save_pretrained(str(tmp_path / "views"), state_dict=views)
    assert torch.equal(MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path / "views"))(ids).logits,
                       expected)


def test_a_compiled_model_saves_as_the_model_it_compiles(tmp_path):
    """moelora.save_pretrained(torch.compile(model)) was refused as 'not a MoELoRAModel' (the method worked);
    a compiled model's state_dict (keys under _orig_mod.) as state_dict= saves too."""
    cfg = MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, top_k=1, router="topk_softmax")
    model = get_moelora_model(tiny_llama(num_layers=2), cfg)
    _perturb_all_adapters(model)
    model.eval()
    compiled = torch.compile(model)
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    moelora.save_pretrained(compiled, str(tmp_path / "function"))
    compiled.save_pretrained(str(tmp_path / "method"), state_dict=compiled.state_dict())
    ids = token_batch()
    for directory in ("function", "method"):
        loaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path / directory))
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_compiled_model_exports_the_peft_names_of_the_model_it_compiles(tmp_path):
    """export_peft_lora(torch.compile(model)) wrote base_model.model._orig_mod.model.<module> names (PEFT cannot
    load them) and the default config's task_type instead of the adapter's."""
    peft = pytest.importorskip("peft")
    cfg = MoELoRAConfig(target_modules=["q_proj"], num_experts=1, top_k=1, task_type="CAUSAL_LM")
    model = get_moelora_model(tiny_llama(num_layers=2), cfg)
    randomize_adapters(model)
    model.eval()
    moelora.export_peft_lora(torch.compile(model), str(tmp_path / "compiled"))
    moelora.export_peft_lora(model, str(tmp_path / "eager"))
    compiled, eager = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("compiled", "eager"))
    assert compiled.keys() == eager.keys() and all(torch.equal(compiled[k], eager[k]) for k in eager)
    assert json.loads((tmp_path / "compiled" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    ids = token_batch()
    loaded = peft.PeftModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path / "compiled")).eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_save_into_a_directory_holding_the_other_checkpoint_format_is_refused_and_writes_nothing(tmp_path):
    """save_pretrained and export_peft_lora both name their weights adapter_model.safetensors: a save into a
    directory holding the other format's checkpoint overwrote its weights and left its config, which PEFT then read
    with a warning only ("missing adapter keys": an untrained adapter) and moelora read as a checkpoint that does not
    fit. Either save now refuses, naming the config, before anything is written (the other adapters' folders too)."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                      num_experts=3, router="task"))
    _perturb_all_adapters(model)
    model.add_adapter("other", MoELoRAConfig(target_modules=["v_proj"], num_experts=2, top_k=1))
    peft_dir, ours_dir = tmp_path / "peft", tmp_path / "ours"
    moelora.export_peft_lora(model, str(peft_dir), task=1)
    model.save_pretrained(str(ours_dir))
    exported, saved = _directory_contents(peft_dir), _directory_contents(ours_dir)
    with pytest.raises(ValueError, match=r"peft holds adapter_config\.json, a PEFT LoRA checkpoint .* would overwrite"):
        model.save_pretrained(str(peft_dir))
    with pytest.raises(ValueError, match=r"ours holds moelora_config\.json, a moelora checkpoint .* would overwrite"):
        moelora.export_peft_lora(model, str(ours_dir), task=1)
    assert _directory_contents(peft_dir) == exported and _directory_contents(ours_dir) == saved
    # the adapter "other" is saved in a subfolder: a PEFT checkpoint there is refused before "default" is written
    mixed = tmp_path / "mixed"
    moelora.export_peft_lora(model, str(mixed / "other"), task=1)
    with pytest.raises(ValueError, match=r"other holds adapter_config\.json"):
        model.save_pretrained(str(mixed))
    assert sorted(p.name for p in mixed.iterdir()) == ["other"]
    model.save_pretrained(str(mixed), selected_adapters=["default"])  # a directory the save does not write is fine
    assert (mixed / "moelora_config.json").is_file()
