"""What PEFT users expect, checked against PEFT itself: injection into embeddings and
convolutions by target_modules, modules_to_save, enable/disable_adapter_layers, named
adapters (add/set/delete/load, the saved folder layout), trained biases in PEFT checkpoints."""

import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn

import moelora
from moelora import MoELoRAConfig, MoELoRAConv, MoELoRAEmbedding, MoELoRALinear, MoELoRAModel, get_moelora_model
from moelora.tuner.adapters import DetachedBase, ModulesToSaveWrapper
from helpers import randomize_adapters, tiny_bert, tiny_llama, token_batch

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class Net(nn.Module):
    """Token embedding + a 1-d convolution over the sequence + linear layers + a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(self.proj(h)))


IDS = torch.tensor([[1, 5, 7, 19, 3], [2, 2, 0, 11, 4]])


def _perturb(model, seed=5, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_regex_adapts_embedding_conv_and_linear_each_with_its_class_and_round_trips(tmp_path):
    model = get_moelora_model(Net(), MoELoRAConfig(target_modules=r"embed|conv|proj", num_experts=3, top_k=2, r=2))
    inner = model.model
    assert (type(inner.embed), type(inner.conv), type(inner.proj)) == (MoELoRAEmbedding, MoELoRAConv, MoELoRALinear)
    assert isinstance(inner.head, nn.Linear)
    trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
    assert {"embed.lora_embedding_A", "embed.router.weight", "conv.lora_A", "conv.router.weight"} <= trainable
    assert not any("base_layer" in n for n in trainable)
    _perturb(model)
    model.eval()
    expected = model(IDS)
    assert moelora.router_stats(model).keys() == {"embed", "conv", "proj"}
    model.save_pretrained(str(tmp_path))
    loaded = MoELoRAModel.from_pretrained(Net(), str(tmp_path))
    assert torch.equal(loaded(IDS), expected)
    # "all-linear" keeps to the linear layers
    linear_only = get_moelora_model(Net(), MoELoRAConfig(target_modules="all-linear", num_experts=2, top_k=1))
    assert isinstance(linear_only.model.embed, nn.Embedding) and isinstance(linear_only.model.conv, nn.Conv1d)


def test_peft_checkpoint_of_embedding_and_conv_imports_and_exports(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    peft_model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["embed", "conv", "proj"],
                                                  init_lora_weights=False)).eval()
    expected = peft_model(IDS)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = moelora.load_peft_lora(Net(), str(tmp_path / "peft")).eval()
    assert isinstance(ours.model.embed, MoELoRAEmbedding) and isinstance(ours.model.conv, MoELoRAConv)
    torch.testing.assert_close(ours(IDS), expected, rtol=1e-5, atol=1e-6)
    moelora.export_peft_lora(ours, str(tmp_path / "again"))
    again = PeftModel.from_pretrained(Net(), str(tmp_path / "again")).eval()
    torch.testing.assert_close(again(IDS), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- modules_to_save
def test_modules_to_save_train_save_and_load_with_the_adapter(tmp_path):
    cfg = MoELoRAConfig(target_modules=["query", "value"], num_experts=2, top_k=1, modules_to_save=["classifier"])
    model = get_moelora_model(tiny_bert(classification=True), cfg)
    wrapper = model.model.classifier
    assert isinstance(wrapper, ModulesToSaveWrapper) and wrapper.out_features == 3
    assert all(p.requires_grad for p in wrapper.modules_to_save.parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    ids = token_batch()
    before = model(ids).logits
    _perturb(model)
    model.eval()
    expected = model(ids).logits
    assert not torch.allclose(expected, before)
    with model.disable_adapter():  # the original head and no LoRA: the base model
        torch.testing.assert_close(model(ids).logits, tiny_bert(classification=True)(ids).logits)
    model.save_pretrained(str(tmp_path))
    loaded = MoELoRAModel.from_pretrained(tiny_bert(classification=True), str(tmp_path))
    assert torch.equal(loaded(ids).logits, expected)
    with pytest.raises(ValueError, match="matches no module"):
        get_moelora_model(tiny_bert(), MoELoRAConfig(target_modules=["query"], modules_to_save=["nothing"]))


def test_modules_to_save_copy_starts_as_the_original_after_meta_init():
    """Meta-device init, reset_parameters() children first (model.apply): the trainable copy of a
    modules_to_save module starts as the original, as the wrapper's constructor makes it (without
    the wrapper's own reset_parameters, its __getattr__ handed out the copy's: redrawn, twice).
    An inactive adapter's wrapper and DoRA layer, which hold no base module, reset without it."""
    from helpers import made_real_with_garbage, reset_every_module

    cfg = MoELoRAConfig(target_modules=["query"], num_experts=2, top_k=1, modules_to_save=["classifier"])
    with torch.device("meta"):
        model = get_moelora_model(tiny_bert(classification=True), cfg)
        model.add_adapter("dora", MoELoRAConfig(target_modules=["query"], num_experts=1, use_dora=True,
                                                modules_to_save=["classifier"]))
    wrapper = reset_every_module(made_real_with_garbage(model), "apply").model.classifier
    original, copy_ = wrapper.original_module.state_dict(), wrapper.modules_to_save.state_dict()
    assert original.keys() == copy_.keys() and all(torch.isfinite(t).all() for t in original.values())
    assert all(torch.equal(copy_[name], t) for name, t in original.items())
    assert all(p.requires_grad for p in wrapper.modules_to_save.parameters())


def test_modules_to_save_wrapper_hands_out_public_attributes_of_the_copy_only():
    """The wrapper reads the trained copy's public attributes (out_features, weight) but none of its private ones:
    accelerate's remove_hook_from_module, asked for the wrapper's _hf_hook, would otherwise get the copy's and
    then fail to delete it from the wrapper."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    wrapper = ModulesToSaveWrapper(nn.Linear(4, 3))
    assert wrapper.out_features == 3 and wrapper.weight is wrapper.modules_to_save.weight
    wrapper.modules_to_save._private_note = "copy's own"
    assert not hasattr(wrapper, "_private_note")
    add_hook_to_module(wrapper.modules_to_save, ModelHook())
    assert not hasattr(wrapper, "_hf_hook")
    remove_hook_from_module(wrapper, recurse=True)
    assert not hasattr(wrapper.modules_to_save, "_hf_hook")
    x = torch.randn(2, 4)
    torch.testing.assert_close(wrapper(x), wrapper.original_module(x))


class _ReadsHeadWeight(Net):
    """Net whose forward reads its head's weight and bias instead of calling it (as Liger's fused linear
    cross-entropy reads ``lm_head.weight``)."""

    def forward(self, ids):
        h = torch.tanh(self.proj(self.embed(ids)))
        return h @ self.head.weight.t() + self.head.bias


def test_a_saved_module_read_by_attribute_gives_the_originals_while_adapters_are_disabled_as_peft_s():
    """Model code reading a saved module's tensors (``head.weight``) reads the trained copy's while the adapter
    runs and the frozen original's while the adapters are disabled, as PEFT's wrapper: the disabled model is the
    base model there too."""
    from peft import LoraConfig, get_peft_model

    ids = IDS
    base = _ReadsHeadWeight()(ids)
    ours = get_moelora_model(_ReadsHeadWeight(), MoELoRAConfig(target_modules=["proj"], num_experts=1,
                                                               modules_to_save=["head"]))
    theirs = get_peft_model(_ReadsHeadWeight(), LoraConfig(target_modules=["proj"], modules_to_save=["head"]))
    with torch.no_grad():
        ours.model.head.modules_to_save.weight.add_(0.5)
        theirs.base_model.model.head.modules_to_save["default"].weight.add_(0.5)
    for model in (ours, theirs):
        trained = model(ids)
        assert not torch.allclose(trained, base)
        with model.disable_adapter():
            torch.testing.assert_close(model(ids), base, rtol=0, atol=0)
        model.disable_adapter_layers()
        torch.testing.assert_close(model(ids), base, rtol=0, atol=0)
        model.enable_adapter_layers()
        torch.testing.assert_close(model(ids), trained, rtol=0, atol=0)


def test_modules_to_save_and_biases_interoperate_with_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    peft_model = get_peft_model(tiny_bert(classification=True), LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False, modules_to_save=["classifier"],
        bias="lora_only"))
    _perturb(peft_model)  # trains the LoRA factors, the classifier copy and the adapted layers' biases
    peft_model.eval()
    ids = token_batch()
    expected = peft_model(ids).logits
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = moelora.load_peft_lora(tiny_bert(classification=True), str(tmp_path / "peft")).eval()
    assert ours.moelora_config.bias == "lora_only" and ours.moelora_config.modules_to_save == ["classifier"]
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
    moelora.export_peft_lora(ours, str(tmp_path / "again"))
    again = PeftModel.from_pretrained(tiny_bert(classification=True), str(tmp_path / "again")).eval()
    assert list(again.peft_config["default"].modules_to_save) == ["classifier"]  # PEFT wraps and trains it again
    torch.testing.assert_close(again(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # merge_and_unload keeps the trained head, as PEFT's
    merged = ours.merge_and_unload()
    assert isinstance(merged.classifier, nn.Linear)
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_peft_checkpoint_with_bias_all_and_modules_to_save_imports_as_peft_loads_it(tmp_path):
    """PEFT's bias="all" saves every bias of the model, also those inside a saved module's wrapper
    (<module>.modules_to_save.bias, <module>.original_module.bias); the import took them for tensors
    of the trained copy and refused the checkpoint (a SEQ_CLS adapter with bias="all", say)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(Net().double(), LoraConfig(r=4, lora_alpha=8, target_modules=["embed", "conv", "proj"],
                                                           modules_to_save=["head"], bias="all"))
    _perturb(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    ours = moelora.load_peft_lora(Net().double(), str(tmp_path)).eval()
    torch.testing.assert_close(ours(IDS), peft_model(IDS), rtol=1e-12, atol=1e-12)
    with peft_model.disable_adapter(), ours.disable_adapter():  # the originals, biases included, as PEFT's
        torch.testing.assert_close(ours(IDS), peft_model(IDS), rtol=0, atol=0)


def _peft_checkpoint_with_a_saved_head(tmp_path):
    """(the weights file, its tensors) of a trained PEFT LoRA of Net's proj, bias="all", with "head" in its
    modules_to_save, saved into ``tmp_path``."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    peft_model = get_peft_model(Net().double(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                           modules_to_save=["head"], bias="all"))
    _perturb(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    weights = str(tmp_path / "adapter_model.safetensors")
    return weights, load_file(weights)


def test_a_saved_modules_bias_under_both_its_names_loads_as_peft_loads_it(tmp_path):
    """PEFT's bias="all" saves a saved module's trained bias as <module>.bias and <module>.modules_to_save.bias;
    where the two differ (an edited checkpoint) the import takes <module>.bias, as PEFT's load does."""
    from peft import PeftModel
    from safetensors.torch import save_file

    weights, state = _peft_checkpoint_with_a_saved_head(tmp_path)
    key = "base_model.model.head.modules_to_save.bias"
    assert key in state and torch.equal(state[key], state["base_model.model.head.bias"])
    save_file(dict(state, **{key: state[key] + 1.0}), weights)
    ours = moelora.load_peft_lora(Net().double(), str(tmp_path)).eval()
    theirs = PeftModel.from_pretrained(Net().double(), str(tmp_path)).eval()
    torch.testing.assert_close(ours(IDS), theirs(IDS), rtol=1e-12, atol=1e-12)
    assert torch.equal(ours.model.head.modules_to_save.bias, state["base_model.model.head.bias"])


def test_a_peft_checkpoint_lacking_a_saved_modules_tensor_is_refused_naming_it(tmp_path):
    """PEFT saves a module of its modules_to_save whole: a checkpoint without one of its tensors (head.weight here)
    was loaded, the trained copy silently keeping the original's weight. It is refused, naming the tensor; one whose
    trained bias is there under its wrapper name alone (bias="all") still loads it."""
    from safetensors.torch import save_file

    weights, state = _peft_checkpoint_with_a_saved_head(tmp_path)
    save_file({k: v for k, v in state.items() if k != "base_model.model.head.bias"}, weights)
    ours = moelora.load_peft_lora(Net().double(), str(tmp_path))
    assert torch.equal(ours.model.head.modules_to_save.bias, state["base_model.model.head.modules_to_save.bias"])
    assert torch.equal(ours.model.head.modules_to_save.weight, state["base_model.model.head.weight"])
    save_file({k: v for k, v in state.items() if k != "base_model.model.head.weight"}, weights)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: the PEFT checkpoint lacks "
                                         r"\['base_model.model.head.weight'\] of head, a module of its "
                                         r"modules_to_save"):
        moelora.load_peft_lora(Net().double(), str(tmp_path))
    # nor a checkpoint without any tensor of a module its config lists
    save_file({k: v for k, v in state.items() if ".head." not in k}, weights)
    with pytest.raises(ValueError, match=r"lacks \['base_model.model.head.weight', 'base_model.model.head.bias'\]"):
        moelora.load_peft_lora(Net().double(), str(tmp_path))


def test_a_peft_lora_without_saved_modules_loads_into_an_expert_of_a_model_with_its_own(tmp_path):
    """The model's own modules_to_save (not in the PEFT config, no tensor in the checkpoint) need nothing from a
    PEFT LoRA loaded into one of its experts: they keep their trained tensors."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(Net().double(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    _perturb(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    ours = get_moelora_model(Net().double(), MoELoRAConfig(target_modules=["proj"], r=4, lora_alpha=8, num_experts=2,
                                                           router="task", modules_to_save=["head"]))
    _perturb(ours)
    head = {n: t.clone() for n, t in ours.model.head.modules_to_save.state_dict().items()}
    moelora.load_peft_lora(ours, str(tmp_path), expert=1)
    assert torch.equal(ours.model.proj.lora_B[1], peft_model.base_model.model.proj.lora_B["default"].weight)
    assert all(torch.equal(t, head[n]) for n, t in ours.model.head.modules_to_save.state_dict().items())


def test_bias_all_leaves_a_saved_modules_frozen_original_frozen_as_peft():
    """bias="all" trains every bias of the model but those of a saved module's frozen original (which runs while
    the adapters are disabled), as PEFT's: the original's bias was trainable, so the counts differed from PEFT's and
    a training step through a disabled forward changed the base model's head; also after a set_adapter."""
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(Net().double(), LoraConfig(r=4, target_modules=["proj"], modules_to_save=["head"],
                                                       bias="all"))
    ours = get_moelora_model(Net().double(), MoELoRAConfig(r=4, target_modules=["proj"], num_experts=1,
                                                           modules_to_save=["head"], bias="all"))
    peft_names = {n.replace("base_model.model.", "").replace(".default", "").replace("lora_A.weight", "lora_A")
                  .replace("lora_B.weight", "lora_B") for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n[len("model."):] for n, p in ours.named_parameters() if p.requires_grad} == peft_names
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.add_adapter("other", MoELoRAConfig(r=2, target_modules=["proj"], num_experts=1, bias="all"))
    ours.set_adapter("other")
    ours.set_adapter("default")
    assert not ours.model.head.original_module.bias.requires_grad
    original = {n: t.clone() for n, t in ours.model.head.original_module.state_dict().items()}
    _perturb(ours)
    optimiser = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    with ours.disable_adapter():
        ours(IDS).square().sum().backward()
    optimiser.step()
    assert all(torch.equal(t, original[n]) for n, t in ours.model.head.original_module.state_dict().items())


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_export_carries_trained_biases_and_round_trips(tmp_path, bias):
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg = MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=1, bias=bias)
    base = tiny_llama(num_layers=2)
    with torch.no_grad():  # LLaMA has no biases: give the targeted and one other layer some
        for name in ("q_proj", "v_proj", "o_proj"):
            layer = base.model.layers[0].self_attn.get_submodule(name)
            layer.bias = nn.Parameter(torch.zeros(layer.out_features))

    def fresh():
        model = tiny_llama(num_layers=2)
        for name in ("q_proj", "v_proj", "o_proj"):
            layer = model.model.layers[0].self_attn.get_submodule(name)
            layer.bias = nn.Parameter(torch.zeros(layer.out_features))
        return model

    model = get_moelora_model(base, cfg)
    _perturb(model)
    model.eval()
    ids = token_batch()
    expected = model(ids).logits
    moelora.export_peft_lora(model, str(tmp_path))
    biases = sorted(k for k in load_file(str(tmp_path / "adapter_model.safetensors")) if k.endswith("bias"))
    prefix = "base_model.model.model.layers.0.self_attn."
    adapted = [prefix + "q_proj.base_layer.bias", prefix + "v_proj.base_layer.bias"]
    assert biases == (adapted if bias == "lora_only" else [prefix + "o_proj.bias"] + adapted)  # lora_only: adapted only
    peft_model = PeftModel.from_pretrained(fresh(), str(tmp_path)).eval()
    assert peft_model.peft_config["default"].bias == bias
    torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    back = moelora.load_peft_lora(fresh(), str(tmp_path)).eval()
    torch.testing.assert_close(back(ids).logits, expected, rtol=1e-5, atol=1e-5)
    o_bias = back.model.model.layers[0].self_attn.o_proj.bias
    assert (o_bias.abs().sum() > 0) == (bias == "all")


# ----------------------------------------------------------------------------------- enable / disable
def test_disable_adapter_block_leaves_adapters_disabled_before_it_disabled():
    """``with model.disable_adapter():`` gives each adapter module back the switch it held: adapters switched off
    before the block (disable_adapter_layers(), or an outer block) stay off after it, and on ones come back on."""
    base = tiny_llama(num_layers=2)
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        expected_base = base(ids).logits
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=1,
                                                  modules_to_save=["lm_head"]))
    randomize_adapters(model, seed=7)
    _perturb(model)
    model.eval()
    with_adapter = model(ids).logits
    assert not torch.allclose(with_adapter, expected_base, rtol=1e-3, atol=1e-3)
    with model.disable_adapter():
        with model.disable_adapter():
            pass
        torch.testing.assert_close(model(ids).logits, expected_base, rtol=1e-5, atol=1e-5)  # the outer block's
    torch.testing.assert_close(model(ids).logits, with_adapter, rtol=1e-5, atol=1e-5)
    model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    torch.testing.assert_close(model(ids).logits, expected_base, rtol=1e-5, atol=1e-5)


def test_disable_adapter_block_that_raises_gives_back_the_adapter_and_its_forwards_aux_loss():
    """An exception inside ``with model.disable_adapter():`` leaves the model as the block's end does: the adapter
    runs again and the aux loss of the forward before the block is back."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                      num_experts=4, top_k=2))
    randomize_adapters(model, seed=7)
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        with_adapter = model.eval()(ids).logits
    model.train()(ids)
    aux = moelora.aux_loss(model).detach()
    assert aux > 0
    with pytest.raises(RuntimeError, match="in the block"):
        with model.disable_adapter():
            model(ids)
            raise RuntimeError("in the block")
    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, MoELoRALinear))
    torch.testing.assert_close(moelora.aux_loss(model), aux, rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, with_adapter, rtol=1e-5, atol=1e-5)


def test_an_adapter_activated_in_a_disable_adapter_block_runs_after_it_as_the_model_did_before_it():
    """set_adapter inside ``with model.disable_adapter():`` puts in layers the block did not switch off: after the
    block they run as the model did before it, off where disable_adapter_layers() had switched it off, else on."""
    for disabled_before in (False, True):
        model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
        model.add_adapter("other", MoELoRAConfig(target_modules=["v_proj"], num_experts=1))
        if disabled_before:
            model.disable_adapter_layers()
        with model.disable_adapter():
            model.set_adapter("other")
        layers = [m for m in model.modules() if isinstance(m, MoELoRALinear)]
        assert layers and all(m.disable_adapters is disabled_before for m in layers)


def test_enable_disable_adapter_layers_as_peft():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(num_layers=2), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    ids = token_batch()
    base = tiny_llama(num_layers=2)(ids).logits
    with_lora = peft_model(ids).logits
    ours = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                     num_experts=1, r=4, lora_alpha=8))
    with torch.no_grad():
        for name, layer in ours.model.named_modules():
            if isinstance(layer, MoELoRALinear):
                peft_layer = peft_model.base_model.model.get_submodule(name)
                layer.lora_A[0].copy_(peft_layer.lora_A["default"].weight)
                layer.lora_B[0].copy_(peft_layer.lora_B["default"].weight)
    for model in (peft_model, ours):
        model.disable_adapter_layers()
        torch.testing.assert_close(model(ids).logits, base)
        model.enable_adapter_layers()
        torch.testing.assert_close(model(ids).logits, with_lora, rtol=1e-5, atol=1e-5)
    ours.merge_adapter()
    ours.disable_adapter_layers()  # a merged adapter is unmerged first
    torch.testing.assert_close(ours(ids).logits, base, rtol=1e-5, atol=1e-5)

    # merging a disabled adapter would make the disabled model compute the adapter: refused, nothing merges
    def refused():
        with pytest.raises(RuntimeError, match=r"self_attn\.q_proj: the adapter layers are disabled"):
            ours.merge_adapter()
        assert not any(getattr(m, "merged", False) for m in ours.modules())
        torch.testing.assert_close(ours(ids).logits, base, rtol=1e-5, atol=1e-5)

    ours.enable_adapter_layers()
    with ours.disable_adapter():
        refused()
    ours.disable_adapter_layers()
    refused()


# ----------------------------------------------------------------------------------- named adapters
def _two_adapter_model():
    model = get_moelora_model(tiny_llama(num_layers=2),
                              MoELoRAConfig(target_modules=["q_proj"], num_experts=2, top_k=1))
    randomize_adapters(model, seed=1)
    model.add_adapter("second", MoELoRAConfig(target_modules=["v_proj", "embed_tokens"], num_experts=3, top_k=2, r=2))
    return model


def test_add_set_delete_adapters():
    model = _two_adapter_model()
    ids = token_batch()
    inner = model.model.model
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert isinstance(inner.layers[0].self_attn.q_proj, MoELoRALinear)
    assert isinstance(inner.layers[0].self_attn.v_proj, nn.Linear)  # "second" is stored, not in the model
    stored = model.inactive_adapters["second"]
    assert all(isinstance(m.base_layer, DetachedBase) for m in stored.layers)
    assert not any(p.requires_grad for p in stored.parameters())
    assert any(k.startswith("inactive_adapters.second.") for k in model.state_dict())
    default_out = model(ids).logits

    model.set_adapter("second")
    assert model.active_adapter == "second" and model.moelora_config.num_experts == 3
    assert isinstance(inner.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(inner.embed_tokens, MoELoRAEmbedding) and inner.embed_tokens.lora_A.requires_grad
    assert not any(p.requires_grad for p in model.inactive_adapters["default"].parameters())
    randomize_adapters(model.model, seed=3)  # the wrapper's parameters include the stored adapter's
    _perturb(model)
    second_out = model(ids).logits
    assert not torch.allclose(second_out, default_out)
    model.to(torch.float64)  # moves the stored adapter too
    assert model.inactive_adapters["default"].layers[0].lora_A.dtype == torch.float64
    model.to(torch.float32)

    model.set_adapter("default")
    torch.testing.assert_close(model(ids).logits, default_out)
    with pytest.raises(ValueError, match="already has an adapter named 'second'"):
        model.add_adapter("second", MoELoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no adapter named 'third'"):
        model.set_adapter("third")
    model.delete_adapter("default")  # the active one: "second" takes over
    assert model.active_adapter == "second" and list(model.adapter_configs) == ["second"]
    torch.testing.assert_close(model(ids).logits, second_out)
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("second")


def test_step_routers_leaves_inactive_adapters_schedules_alone():
    """moelora.step_routers on the wrapper (what StepRoutersCallback / MoELoRATrainer call) steps
    the active adapter's routers only, as model.step_routers(): a stored adapter is not trained."""
    from moelora.modules.router import Router

    def config():
        return MoELoRAConfig(target_modules=["q_proj"], num_experts=4, top_k=2, router="threshold",
                             threshold_eps=0.2, threshold_ramp_steps=10)

    model = get_moelora_model(tiny_llama(num_layers=2), config())
    model.add_adapter("second", config())

    def steps(module):
        return sorted(int(m.num_steps) for m in module.modules() if isinstance(m, Router))

    model.step_routers()
    moelora.step_routers(model, 2)
    assert steps(model.model) == [3, 3] and steps(model.inactive_adapters) == [0, 0]
    model.set_adapter("second")
    moelora.step_routers(model)
    assert steps(model.model) == [1, 1] and steps(model.inactive_adapters) == [3, 3]


def test_named_adapters_save_as_peft_lays_them_out_and_load_back(tmp_path):
    model = _two_adapter_model()
    model.set_adapter("second")
    _perturb(model)
    model.set_adapter("default")
    model.eval()
    ids = token_batch()
    outputs = {}
    for name in ("default", "second"):
        model.set_adapter(name)
        outputs[name] = model(ids).logits
    model.set_adapter("default")
    model.save_pretrained(str(tmp_path))
    assert {"moelora_config.json", "adapter_model.safetensors", "second"} <= set(os.listdir(tmp_path))
    assert {"moelora_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "second"))
    assert model.active_adapter == "default" and not isinstance(model.model.model.embed_tokens, MoELoRAEmbedding)

    loaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "second"), "second")
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    for name in ("default", "second"):
        loaded.set_adapter(name, inference_mode=True)  # as PEFT's: without it the activated adapter trains
        assert torch.equal(loaded(ids).logits, outputs[name]), name
    assert not any(p.requires_grad for p in loaded.parameters())


def test_added_and_loaded_adapters_follow_the_models_train_or_eval_mode(tmp_path):
    """A new adapter's layers (dropout, router noise) are built in the model's mode: an adapter
    added to or loaded into an eval model runs deterministically once activated."""
    model = get_moelora_model(tiny_llama(num_layers=2),
                              MoELoRAConfig(target_modules=["q_proj"], num_experts=2, top_k=1)).train()
    model.add_adapter("noisy", MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2,
                                             lora_dropout=0.5, router_jitter_noise=0.5))
    assert all(m.training for m in model.modules())  # a training model: new modules train too
    model.set_adapter("noisy")
    randomize_adapters(model.model)
    model.set_adapter("default")
    model.save_pretrained(str(tmp_path))
    ids = token_batch()

    loaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))  # for inference: eval
    loaded.load_adapter(str(tmp_path / "noisy"), "noisy")
    loaded.add_adapter("added", MoELoRAConfig(target_modules=["k_proj"], num_experts=1, lora_dropout=0.3))
    assert not [n for n, m in loaded.named_modules() if m.training]
    for name in ("noisy", "added"):
        loaded.set_adapter(name)
        assert not [n for n, m in loaded.named_modules() if m.training], name
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, loaded(ids).logits), name


def test_named_plain_lora_adapters_match_peft_multi_adapter_model(tmp_path):
    from peft import PeftModel

    ours = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1, r=4))
    ours.add_adapter("other", MoELoRAConfig(target_modules=["v_proj", "o_proj"], num_experts=1, r=2, lora_alpha=4))
    ids = token_batch()
    expected = {}
    for name in ("default", "other"):
        ours.set_adapter(name)
        _perturb(ours, seed=len(name))
        expected[name] = ours(ids).logits
        moelora.export_peft_lora(ours, str(tmp_path / name))
    peft_model = PeftModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path / "default"))
    peft_model.load_adapter(str(tmp_path / "other"), adapter_name="other")
    for name in ("default", "other"):
        peft_model.set_adapter(name)
        torch.testing.assert_close(peft_model(ids).logits, expected[name], rtol=1e-5, atol=1e-5)
    # the folder layout of a multi-adapter save is PEFT's
    peft_model.save_pretrained(str(tmp_path / "peft_saved"))
    ours.save_pretrained(str(tmp_path / "ours_saved"))
    assert os.path.isdir(tmp_path / "peft_saved" / "other") and os.path.isdir(tmp_path / "ours_saved" / "other")


def test_loading_an_adapter_for_inference_leaves_the_trained_adapter_trainable(tmp_path):
    """load_adapter(is_trainable=False) leaves the adapter being trained trainable, after switching to the
    loaded one (frozen with set_adapter(..., inference_mode=True), as PEFT's) and back."""
    get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["v_proj"], num_experts=1)) \
        .save_pretrained(str(tmp_path))
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=2,
                                                                      top_k=1))
    trainable = model.get_nb_trainable_parameters()[0]
    model.load_adapter(str(tmp_path), "reference")
    model.load_adapter(str(tmp_path), "tuned", is_trainable=True)
    assert model.get_nb_trainable_parameters()[0] == trainable
    # as PEFT's: the loaded config's inference_mode is not is_trainable
    assert model.peft_config["reference"].inference_mode and not model.peft_config["tuned"].inference_mode
    model.set_adapter("reference", inference_mode=True)
    assert model.get_nb_trainable_parameters()[0] == 0
    model.set_adapter("tuned")
    assert model.get_nb_trainable_parameters()[0] > 0
    model.set_adapter("default")
    assert model.get_nb_trainable_parameters()[0] == trainable
    model.delete_adapter("reference")
    model.load_adapter(str(tmp_path), "reference", is_trainable=True)  # the name is free again
    model.set_adapter("reference")
    assert model.get_nb_trainable_parameters()[0] > 0


def test_save_pretrained_refuses_selected_adapters_the_model_does_not_have(tmp_path):
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    with pytest.raises(ValueError, match=r"no adapter named 'defualt'; the model has \['default'\]"):
        model.save_pretrained(str(tmp_path), selected_adapters=["defualt"])  # one adapter: was ignored
    assert not os.listdir(tmp_path)
    model.add_adapter("second", MoELoRAConfig(target_modules=["v_proj"], num_experts=1))
    with pytest.raises(ValueError, match=r"no adapter named 'third'"):
        model.save_pretrained(str(tmp_path), selected_adapters=["second", "third"])
    assert not os.listdir(tmp_path)  # checked before anything is written


@pytest.mark.parametrize("settings", [dict(dilation=2), dict(padding=1, padding_mode="reflect"),
                                      dict(padding="same", padding_mode="circular")])
def test_peft_lora_of_a_conv_that_peft_computes_otherwise_is_refused_both_ways(tmp_path, settings):
    """PEFT's LoRA convolution ignores the base's dilation and padding_mode, which moelora's
    follows: exporting or importing a LoRA there would compute other numbers, so both refuse."""
    from peft import LoraConfig, get_peft_model

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(3, 4, 3, **settings))

    ours = get_moelora_model(net(), MoELoRAConfig(target_modules=["0"], num_experts=1, r=2))
    with pytest.raises(ValueError, match=r"0: PEFT's LoRA convolution ignores the base's dilation"):
        moelora.export_peft_lora(ours, str(tmp_path / "export"))
    peft_model = get_peft_model(net(), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    with pytest.raises(ValueError, match=r"PEFT's LoRA convolution ignores the base's dilation"):
        moelora.load_peft_lora(net(), str(tmp_path / "peft"))


def test_peft_lora_of_a_conv_that_pads_nothing_moves_both_ways_whatever_its_padding_mode(tmp_path):
    """padding_mode matters only where the convolution pads: without padding PEFT's LoRA convolution computes as
    moelora's, so the LoRA exports to PEFT and imports back."""
    from peft import PeftModel

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(3, 4, 3, padding=0, padding_mode="reflect"))

    ours = get_moelora_model(net(), MoELoRAConfig(target_modules=["0"], num_experts=1, r=2))
    _perturb(ours)
    ours.eval()
    x = torch.randn(2, 3, 9)
    expected = ours(x)
    moelora.export_peft_lora(ours, str(tmp_path))
    theirs = PeftModel.from_pretrained(net(), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moelora.load_peft_lora(net(), str(tmp_path)).eval()(x), expected, rtol=1e-5,
                               atol=1e-6)


def test_switching_adapters_keeps_the_models_disabled_state():
    """disable_adapter_layers switches the model off, not one adapter (as PEFT's, whose layers hold
    every adapter): set_adapter on a disabled model runs the base model, and after
    enable_adapter_layers every adapter runs again, the one that was active when disabling too."""
    model = _two_adapter_model()
    model.set_adapter("second")
    randomize_adapters(model, seed=2)  # (its B starts at zero: it would compute the base model either way)
    ids = token_batch()
    base = tiny_llama(num_layers=2)(ids).logits
    outputs = {}
    for name in ("second", "default"):
        model.set_adapter(name)
        outputs[name] = model(ids).logits
        assert not torch.allclose(outputs[name], base)
    model.disable_adapter_layers()
    model.set_adapter("second")
    torch.testing.assert_close(model(ids).logits, base)
    model.enable_adapter_layers()
    torch.testing.assert_close(model(ids).logits, outputs["second"])
    model.set_adapter("default")
    torch.testing.assert_close(model(ids).logits, outputs["default"])

    with model.disable_adapter():  # a switch inside the block: still the base model, each adapter runs after it
        model.set_adapter("second")
        torch.testing.assert_close(model(ids).logits, base)
    torch.testing.assert_close(model(ids).logits, outputs["second"])
    model.set_adapter("default")
    torch.testing.assert_close(model(ids).logits, outputs["default"])


def test_model_level_functions_on_the_wrapper_leave_inactive_adapters_alone():
    """moelora.merge_adapter / unmerge_adapter / merge_and_unload / set_task_ids / use_task_ids given
    the wrapper act on the active adapter, as the wrapper's methods: the stored adapters (whose base
    layers are DetachedBase) are neither merged, unloaded, nor given task ids (nor checked against them)."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    randomize_adapters(model, seed=1)
    model.add_adapter("tasks", MoELoRAConfig(target_modules=["v_proj"], num_experts=2, router="task"))
    ids = token_batch()
    expected = model(ids).logits
    moelora.merge_adapter(model)
    assert all(layer.merged for layer in model.model.modules() if isinstance(layer, MoELoRALinear))
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    moelora.unmerge_adapter(model)
    with pytest.raises(ValueError, match="no task-routed MoE-LoRA layer"):  # the active adapter has none
        moelora.set_task_ids(model, 1)
    stored = model.inactive_adapters["tasks"].layers
    assert all(layer.task_ids is None for layer in stored)
    unloaded = moelora.merge_and_unload(model)
    torch.testing.assert_close(unloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert all(isinstance(layer, MoELoRALinear) for layer in stored)  # the stored adapter kept its layers

    tasks = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=4,
                                                                      router="task"))
    tasks.add_adapter("two", MoELoRAConfig(target_modules=["v_proj"], num_experts=2, router="task"))
    moelora.set_task_ids(tasks, 3)  # a task of the active adapter (4 experts), not of the stored one (2)
    with moelora.use_task_ids(tasks, 3):
        tasks(ids)
    assert all(layer.task_ids is None for layer in tasks.inactive_adapters["two"].layers)


def test_adding_loading_and_saving_adapters_keep_the_active_adapter_merged(tmp_path):
    """add_adapter, load_adapter and save_pretrained of several adapters take the active adapter
    out of the model for a while (unmerging it): it comes back merged, for the task it was merged
    for (PEFT's add_adapter and save_pretrained leave a merged model merged)."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=3,
                                                                      router="task"))
    randomize_adapters(model, seed=1)
    ids = token_batch()
    expected = model(ids, task_ids=2).logits
    model.merge_adapter(task=2)

    def merged_tasks():
        return [(layer.merged, layer.merged_task)
                for layer in model.model.modules() if isinstance(layer, MoELoRALinear)]

    model.add_adapter("second", MoELoRAConfig(target_modules=["v_proj"], num_experts=1))
    assert merged_tasks() == [(True, 2)] * 2
    model.save_pretrained(str(tmp_path))
    assert merged_tasks() == [(True, 2)] * 2
    model.load_adapter(str(tmp_path / "second"), "loaded")
    assert merged_tasks() == [(True, 2)] * 2
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(ids, task_ids=2).logits, expected, rtol=1e-5, atol=1e-5)


def test_save_pretrained_with_a_state_dict_refuses_to_select_an_inactive_adapter(tmp_path):
    """With state_dict (e.g. the Trainer's gathered one) only the active adapter is written: asking
    for another raises instead of writing the active one in its place."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    model.add_adapter("second", MoELoRAConfig(target_modules=["v_proj"], num_experts=1))
    with pytest.raises(ValueError, match=r"only the active adapter \('default'\).*selected_adapters asks for "
                                         r"\['second'\]"):
        model.save_pretrained(str(tmp_path), state_dict=model.state_dict(), selected_adapters=["second"])
    with pytest.raises(ValueError, match=r"selected_adapters asks for \['default', 'second'\]"):  # the active one too
        model.save_pretrained(str(tmp_path), state_dict=model.state_dict(), selected_adapters=["default", "second"])
    assert not os.listdir(tmp_path)
    model.save_pretrained(str(tmp_path), state_dict=model.state_dict(), selected_adapters=["default"])
    from moelora.persistence import read_checkpoint
    assert list(read_checkpoint(str(tmp_path))[0].target_modules) == ["q_proj"]


def test_save_pretrained_with_a_state_dict_writes_the_active_adapter_from_it_alone(tmp_path):
    """With state_dict and several adapters (selected_adapters unset) the active adapter is written, with the
    state_dict's tensors, and no other: the inactive ones are not in a gathered state dict."""
    from moelora.persistence import read_checkpoint

    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    model.add_adapter("second", MoELoRAConfig(target_modules=["v_proj"], num_experts=1))
    state = {k: v + 1.0 if k.endswith("lora_B") else v for k, v in model.state_dict().items()}
    model.save_pretrained(str(tmp_path), state_dict=state)
    assert sorted(os.listdir(tmp_path)) == ["adapter_model.safetensors", "moelora_config.json"]
    tensors = read_checkpoint(str(tmp_path))[2]
    key = next(k for k in tensors if k.endswith("q_proj.lora_B"))
    assert torch.equal(tensors[key], state["model." + key]) and not model.get_parameter("model." + key).any()


def test_max_shard_size_shards_every_adapter_saved(tmp_path):
    """max_shard_size applies to each adapter written, the inactive ones in their subfolders too."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    model.add_adapter("second", MoELoRAConfig(target_modules=["v_proj"], num_experts=1))
    model.save_pretrained(str(tmp_path), max_shard_size=200)
    for directory in (tmp_path, tmp_path / "second"):
        names = os.listdir(directory)
        assert "adapter_model.safetensors.index.json" in names and "adapter_model.safetensors" not in names, names
    model.load_adapter(str(tmp_path / "second"), "loaded")


def test_set_adapter_that_cannot_go_in_leaves_the_active_adapter_in_place():
    """An adapter whose modules the model no longer has (the FFN it adapts replaced after it was
    added) is refused by set_adapter, naming the module, and the active adapter stays in the model
    (it was taken out first, and lost)."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    randomize_adapters(model, seed=1)
    model.add_adapter("ffn", MoELoRAConfig(target_modules=["up_proj"], num_experts=1))
    ids = token_batch()
    for layer in model.model.model.layers:
        layer.mlp = nn.Identity()
    expected = model(ids).logits
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj, which the model no longer has"):
        model.set_adapter("ffn")
    assert model.active_adapter == "default" and sorted(model.inactive_adapters) == ["ffn"]
    assert isinstance(model.model.model.layers[0].self_attn.q_proj, MoELoRALinear)
    assert torch.equal(model(ids).logits, expected)


def test_set_adapter_that_cannot_go_in_leaves_a_merged_active_adapter_merged():
    """The rollback of a refused set_adapter puts the active adapter back as it was: merged where
    it was merged (taking it out unmerges it), as add_adapter / save_pretrained leave it."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    randomize_adapters(model.model, seed=1)
    model.add_adapter("ffn", MoELoRAConfig(target_modules=["up_proj"], num_experts=1))
    for layer in model.model.model.layers:
        layer.mlp = nn.Identity()
    model.eval().merge_adapter()
    ids = token_batch()
    expected = model(ids).logits
    with pytest.raises(ValueError, match="which the model no longer has"):
        model.set_adapter("ffn")
    assert all(layer.self_attn.q_proj.merged for layer in model.model.model.layers)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_set_adapter_from_a_merged_adapter_runs_the_other_on_the_unmerged_base():
    """Switching away from a merged adapter unmerges it as it is stored: the incoming adapter runs on the base
    weights (not on weights still holding the outgoing delta), and the outgoing one, activated again, gives its
    own output (unmerged)."""
    base = tiny_llama(num_layers=2)
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=1))
    model.add_adapter("other", MoELoRAConfig(target_modules=["q_proj"], num_experts=1, r=4))
    randomize_adapters(model, seed=3)  # the active adapter's B (the stored one's next)
    model.set_adapter("other")
    randomize_adapters(model, seed=4)
    model.eval()
    ids = torch.randint(0, 64, (2, 6))
    expected_other = model(ids).logits
    model.set_adapter("default")
    expected_default = model(ids).logits
    assert not torch.allclose(expected_default, expected_other, rtol=1e-3, atol=1e-3)
    model.merge_adapter()
    model.set_adapter("other")
    assert not any(getattr(m, "merged", False) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, expected_other, rtol=1e-5, atol=1e-5)
    model.set_adapter("default")
    torch.testing.assert_close(model(ids).logits, expected_default, rtol=1e-5, atol=1e-5)


def test_upcycle_ffn_refuses_ffns_an_adapter_adapts_inactive_ones_too():
    """upcycle_ffn on a MoELoRAModel replaces FFNs whose projections an adapter adapts: refused
    before any change, naming the adapter, for the active adapter and for the stored ones (whose
    layers would be left around modules the model no longer has)."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    model.add_adapter("ffn", MoELoRAConfig(target_modules=["up_proj"], num_experts=1))
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp: adapter 'ffn' has a module at "
                                         r"model\.layers\.0\.mlp\.up_proj, which upcycling"):
        moelora.upcycle_ffn(model, num_experts=2, top_k=1)
    assert [type(m) for m in model.modules()] == before
    model.set_adapter("ffn")
    with pytest.raises(ValueError, match=r"adapter 'ffn' has a module at model\.layers\.0\.mlp\.up_proj"):
        moelora.upcycle_ffn(model, num_experts=2, top_k=1)
    model.add_adapter("saved", MoELoRAConfig(target_modules=["q_proj"], num_experts=1, modules_to_save=["mlp"]))
    model.set_adapter("saved")  # its wrapper of each MLP (and the copy inside) is not upcycled either
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp: adapter 'saved' has a module at "
                                         r"model\.layers\.0\.mlp,"):
        moelora.upcycle_ffn(model, num_experts=2, top_k=1)


@pytest.mark.parametrize("given", ["wrapped model", "decoder"])
def test_upcycle_ffn_given_the_wrapped_model_refuses_ffns_a_stored_adapter_adapts(given):
    """upcycle_ffn given the model a MoELoRAModel wraps (``upcycle_ffn(hf_model, ...)`` as the docs call it), or a
    module inside it: a stored adapter's layers in an FFN are known there too. It upcycled, leaving that adapter
    around modules the model no longer had: set_adapter and save_pretrained (after writing "default") raised."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    model.add_adapter("ffn", MoELoRAConfig(target_modules=["up_proj"], num_experts=1))
    target, prefix = (model.model, "model.") if given == "wrapped model" else (model.model.model, "")
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=rf"{prefix}layers\.0\.mlp: adapter 'ffn' has a module at "
                                         rf"{prefix}layers\.0\.mlp\.up_proj, which upcycling"):
        moelora.upcycle_ffn(target, num_experts=2, top_k=1)
    assert [type(m) for m in model.modules()] == before
    model.set_adapter("ffn")  # still fits the model
    model.delete_adapter("ffn")
    assert len(moelora.upcycle_ffn(target, num_experts=2, top_k=1)) == 2  # nothing holds the FFNs now


@pytest.mark.parametrize("name", ["items", "train", "training"])
def test_adapter_names_the_inactive_adapters_dict_cannot_hold_are_refused(name):
    """An adapter is stored under its name in an nn.ModuleDict, which refuses its own attribute names:
    add_adapter raised a KeyError after building the adapter, and an adapter so named by the
    wrapper's constructor was lost at the first set_adapter. Both raise a ValueError first."""
    with pytest.raises(ValueError, match=f"adapter name '{name}' is an attribute of nn.ModuleDict"):
        MoELoRAModel(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1),
                     adapter_name=name)
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    with pytest.raises(ValueError, match=f"adapter name '{name}' is an attribute of nn.ModuleDict"):
        model.add_adapter(name, MoELoRAConfig(target_modules=["v_proj"], num_experts=1))
    assert list(model.adapter_configs) == ["default"] and not model.inactive_adapters


@pytest.mark.parametrize("name", ["", "a/b", "a.b"])
def test_an_adapter_name_that_is_empty_or_holds_a_dot_or_a_slash_is_refused(name):
    """An adapter's name is a directory of a multi-adapter save ("/" would nest it) and a key of the wrapper's
    nn.ModuleDict ("." and "" are refused there): add_adapter refuses it before building anything."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    with pytest.raises(ValueError, match=rf"^adapter names are non-empty strings without '\.' or '/', got {name!r}$"):
        model.add_adapter(name, MoELoRAConfig(target_modules=["v_proj"], num_experts=1))
    assert list(model.adapter_configs) == ["default"] and not model.inactive_adapters


def test_held_modules_names_the_active_adapter_where_a_stored_one_adapts_the_same_module():
    """held_modules (which the refusals of upcycle_ffn, apply_molex and resize_token_embeddings name the adapter
    from) gives a module that the active and a stored adapter both adapt to the active one."""
    from moelora.tuner.adapters import held_modules

    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1))
    model.add_adapter("other", MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=1))
    held = held_modules(model)
    assert held["model.layers.0.self_attn.q_proj"] == "default" and held["model.layers.0.self_attn.v_proj"] == "other"
    model.set_adapter("other")
    assert held_modules(model)["model.layers.0.self_attn.q_proj"] == "other"


@pytest.mark.parametrize("config", [MoELoRAConfig(num_experts=2), {"target_modules": ["proj"]}],
                         ids=["no_default_targets", "dict"])
def test_add_adapter_that_is_refused_leaves_the_active_adapter_in_place(config):
    """A config add_adapter refuses (no target_modules on a model without PEFT default targets; not a
    MoELoRAConfig) raises before the active adapter's layers leave the model."""
    model = get_moelora_model(Net(), MoELoRAConfig(target_modules=["proj"], num_experts=2, top_k=2, r=2))
    _perturb(model)
    expected = model(IDS)
    with pytest.raises((ValueError, TypeError), match="target_modules must be set|config must be a moelora"):
        model.add_adapter("other", config)
    assert isinstance(model.model.proj, MoELoRALinear) and sorted(model.adapter_configs) == ["default"]
    assert torch.equal(model(IDS), expected)


@pytest.mark.parametrize("kept", ["none", "bias", "upcycle_ffn", "apply_molex"])
def test_disabling_warns_where_the_output_stays_other_than_the_base_models(kept):
    """Disabled adapter layers leave trained biases, upcycled FFNs and MoLEx in place, so the model does not
    compute the base model's output (documented as it): disable_adapter_layers and disable_adapter warn,
    naming them (PEFT warns for biases); a plain adapter gives the base model's output without a warning."""
    base = tiny_bert(num_layers=2)  # with biases
    ids = token_batch()
    expected = base(ids).last_hidden_state
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["query"], num_experts=2, top_k=2,
                                                  bias="all" if kept == "bias" else "none"))
    if kept == "upcycle_ffn":
        moelora.upcycle_ffn(base, num_experts=2, top_k=2)
    elif kept == "apply_molex":
        moelora.apply_molex(base, alpha=0.5)
    _perturb(model)  # biases, FFN experts and MoLEx gates included: they are trainable
    for disable in (model.disable_adapter_layers, model.disable_adapter().__enter__):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            disable()
        messages = [str(w.message) for w in caught if "disabling the adapter layers" in str(w.message)]
        differs = not torch.allclose(model(ids).last_hidden_state, expected, atol=1e-6)
        assert differs == (kept != "none")
        assert len(messages) == differs and all(kept.split("_")[0] in m for m in messages)
        model.enable_adapter_layers()


def test_peft_attribute_paths_reach_the_wrapped_model_as_peft_s():
    """PEFT's get_base_model(), base_model.model... and peft_config reach what they reach on PEFT's PeftModel."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(num_layers=2), LoraConfig(r=4, target_modules=["q_proj"]))
    ours = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=1, r=4))
    assert peft_model.base_model.model is peft_model.get_base_model()
    assert ours.base_model.model is ours.get_base_model() is ours.model
    for model in (peft_model, ours):
        assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"
        assert hasattr(model.base_model.model.model.layers[1].self_attn.q_proj, "lora_A")  # adapted
        assert model.base_model.model.model.layers[1].self_attn.k_proj.__class__ is nn.Linear
        assert list(model.peft_config) == ["default"] and model.peft_config["default"].r == 4
    assert ours.peft_config is ours.adapter_configs
    ours.add_adapter("second", MoELoRAConfig(target_modules=["v_proj"], num_experts=1, r=2))
    assert list(ours.peft_config) == ["default", "second"] and ours.peft_config["second"].r == 2
    assert ours.get_base_model().model.embed_tokens is ours.model.model.embed_tokens


@pytest.mark.parametrize("modules_to_save", [None, ["classifier"], ["bert.pooler.dense"]])
def test_task_type_trains_and_saves_the_classifier_head_as_peft_s(tmp_path, modules_to_save):
    """LoraConfig's task_type="SEQ_CLS" makes PEFT train and save the classifier whole; the same field of
    MoELoRAConfig does the same (same trainable parameters), and the head round-trips."""
    from peft import LoraConfig, TaskType, get_peft_model

    fields = dict(r=4, target_modules=["query", "value"], modules_to_save=modules_to_save)
    peft_model = get_peft_model(tiny_bert(2, classification=True),
                                LoraConfig(task_type="SEQ_CLS", **copy.deepcopy(fields)))
    ours = get_moelora_model(tiny_bert(2, classification=True),
                             MoELoRAConfig(task_type=TaskType.SEQ_CLS, num_experts=1, **copy.deepcopy(fields)))
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable(ours) == trainable(peft_model)
    assert isinstance(ours.model.classifier, ModulesToSaveWrapper)
    assert ours.peft_config["default"].task_type == "SEQ_CLS"
    _perturb(ours)
    ids = token_batch()
    expected = ours(ids).logits
    ours.save_pretrained(str(tmp_path))
    reloaded = MoELoRAModel.from_pretrained(tiny_bert(2, classification=True), str(tmp_path))
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
    assert reloaded.peft_config["default"].modules_to_save == ours.peft_config["default"].modules_to_save


def _task_model(kind):
    import transformers

    torch.manual_seed(0)
    if kind.startswith("Llama"):
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                       num_labels=3, pad_token_id=0)
    else:
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return getattr(transformers, kind)(cfg).eval()


@pytest.mark.parametrize("task_type,kind,head,targets", [
    ("SEQ_CLS", "LlamaForSequenceClassification", "score", ["q_proj", "v_proj"]),
    ("TOKEN_CLS", "BertForTokenClassification", "classifier", ["query", "value"]),
    ("TOKEN_CLS", "LlamaForTokenClassification", "score", ["q_proj", "v_proj"]),
    ("QUESTION_ANS", "BertForQuestionAnswering", "qa_outputs", ["query", "value"]),
])
def test_each_task_type_trains_and_saves_the_head_peft_s_task_model_saves(task_type, kind, head, targets):
    """PEFT's task models add their heads to modules_to_save (classifier or score for SEQ_CLS / TOKEN_CLS,
    qa_outputs for QUESTION_ANS); task_type does the same here: that head is wrapped, and the trainable
    parameters are PEFT's."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_task_model(kind), LoraConfig(task_type=task_type, r=4, target_modules=targets))
    ours = get_moelora_model(_task_model(kind), MoELoRAConfig(task_type=task_type, r=4, num_experts=1,
                                                              target_modules=targets))
    assert isinstance(getattr(ours.model, head), ModulesToSaveWrapper)
    assert ours.peft_config["default"].modules_to_save == [head]
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable(ours) == trainable(peft_model)


def test_task_type_and_fan_in_fan_out_are_checked_and_a_regex_must_save_the_head():
    with pytest.raises(ValueError, match=r"task_type must be None or one of PEFT's task types"):
        MoELoRAConfig(task_type="CLASSIFY")
    with pytest.raises(TypeError, match=r"MoELoRAConfig\.fan_in_fan_out"):
        MoELoRAConfig(fan_in_fan_out="yes")
    assert MoELoRAConfig(task_type="CAUSAL_LM", fan_in_fan_out=True).task_type == "CAUSAL_LM"
    with pytest.raises(ValueError, match=r"modules_to_save regex .* does not match \['classifier'\]"):
        get_moelora_model(tiny_bert(2, classification=True), MoELoRAConfig(
            task_type="SEQ_CLS", target_modules=["query"], modules_to_save=r".*pooler\.dense"))


def test_a_peft_task_type_member_is_held_as_its_name():
    """peft.TaskType.SEQ_CLS (a str enum, whose str() is "TaskType.SEQ_CLS") is held as the plain name, so messages,
    the saved JSON and a reloaded config read "SEQ_CLS"."""
    from peft import TaskType

    config = MoELoRAConfig(task_type=TaskType.SEQ_CLS)
    assert type(config.task_type) is str and str(config.task_type) == "SEQ_CLS"
    assert type(config.to_dict()["task_type"]) is str
    assert MoELoRAConfig.from_dict(config.to_dict()).task_type == "SEQ_CLS"


def test_safe_merge_refuses_a_non_finite_merged_weight_before_any_layer_merges_as_peft_s():
    """safe_merge=True (PEFT's merge_adapter / merge_and_unload keyword): a NaN in one layer's adapter raises a
    ValueError naming the layer (PEFT raises one too), and no layer is merged, not even those checked before it;
    without safe_merge the merge goes ahead as PEFT's does."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(num_layers=2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ours = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                                     num_experts=1, r=4))
    randomize_adapters(ours)
    with torch.no_grad():
        peft_model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("nan")
        ours.model.model.layers[1].self_attn.v_proj.lora_B[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        peft_model.merge_and_unload(safe_merge=True)
    before = {n: t.clone() for n, t in ours.state_dict().items()}
    for merge in (lambda: ours.merge_adapter(safe_merge=True), lambda: ours.merge_and_unload(safe_merge=True)):
        with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj: the merged weight holds NaN or "
                                             r"Inf \(safe_merge=True\)"):
            merge()
        assert not any(layer.merged for layer in ours.modules() if isinstance(layer, MoELoRALinear))
        for n, t in ours.state_dict().items():
            torch.testing.assert_close(t, before[n], rtol=0, atol=0, equal_nan=True)
    layer = ours.model.model.layers[1].self_attn.v_proj
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    ours.merge_adapter()  # unsafe: merges, NaN and all
    assert layer.merged and layer.base_layer.weight.isnan().any()


def test_merge_and_unload_takes_peft_s_progressbar_and_adapter_names(capsys):
    """merge_and_unload(progressbar=True, adapter_names=[active]) merges as without them (the bar on stderr);
    adapter_names naming another adapter, an unknown one, or given as a string is refused (moelora merges the
    active adapter alone) before anything changes."""
    config = MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=1, r=4)
    model = get_moelora_model(tiny_llama(num_layers=2), config)
    randomize_adapters(model)
    model.add_adapter("other", config)
    ids = token_batch()
    expected = copy.deepcopy(model).merge_and_unload()(ids).logits
    with pytest.raises(ValueError, match=r"adapter_names: moelora merges the active adapter alone \('default'\), "
                                         r"got \['other'\]; set_adapter\(name\) first"):
        model.merge_and_unload(adapter_names=["other"])
    with pytest.raises(ValueError, match=r"adapter_names: moelora merges the active adapter alone"):
        model.merge_adapter(adapter_names=["default", "other"])
    with pytest.raises(ValueError, match=r"adapter_names: no adapter named \['missing'\] \(the adapters: "
                                         r"\['default', 'other'\]\)"):
        model.merge_and_unload(adapter_names=["missing"])
    with pytest.raises(TypeError, match="adapter_names must be None or a list of adapter names, got 'default'"):
        model.merge_adapter(adapter_names="default")
    assert not any(m.merged for m in model.modules() if isinstance(m, MoELoRALinear))
    model.merge_adapter(adapter_names=["default", "default"])  # the active adapter named twice is the active one
    assert all(m.merged for m in model.model.modules() if isinstance(m, MoELoRALinear))
    model.unmerge_adapter()
    capsys.readouterr()
    plain = model.merge_and_unload(progressbar=True, adapter_names=["default"])
    assert "Unloading and merging model" in capsys.readouterr().err
    assert not any(isinstance(m, MoELoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=0)


def test_functional_merge_and_unload_of_a_wrapper_keeps_its_inactive_adapters_layers():
    """moelora.merge_and_unload / moelora.unload given the wrapper itself replace the active adapter's layers by
    their base layers and leave the layers of an inactive adapter (which run nothing) as they are, unmerged."""
    config = MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=1, r=4)
    for unload in (moelora.merge_and_unload, moelora.tuner.merge.unload):
        model = get_moelora_model(tiny_llama(num_layers=2), config)
        model.add_adapter("other", MoELoRAConfig(target_modules=["q_proj"], num_experts=1, r=4))
        stored = list(model.inactive_adapters["other"].layers)
        assert len(stored) == 2 and all(isinstance(m, MoELoRALinear) for m in stored)
        assert unload(model) is model
        assert not any(isinstance(m, MoELoRALinear) for m in model.model.modules())
        assert list(model.inactive_adapters["other"].layers) == stored
        assert not any(m.merged for m in stored)


def test_inference_mode_and_adapter_names_as_peft_s(tmp_path):
    """MoELoRAConfig(inference_mode=True) builds a frozen adapter, as PEFT's LoraConfig(inference_mode=True) does
    (get_moelora_model; add_adapter: frozen when activated); from_pretrained / load_adapter set it to
    ``not is_trainable`` as PEFT's, and take PEFT's adapter_name; active_peft_config is the active adapter's."""
    from peft import LoraConfig, get_peft_model

    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable(get_peft_model(tiny_llama(num_layers=2), LoraConfig(r=4, target_modules=["q_proj"],
                                                                         inference_mode=True))) == 0
    frozen = get_moelora_model(tiny_llama(num_layers=2),
                               MoELoRAConfig(target_modules=["q_proj"], num_experts=2, r=4, inference_mode=True),
                               adapter_name="serving")
    assert trainable(frozen) == 0 and frozen.active_adapter == "serving"
    with pytest.raises(TypeError, match=r"MoELoRAConfig\.inference_mode"):
        MoELoRAConfig(inference_mode="yes")
    with pytest.raises(ValueError, match="adapter names are non-empty strings"):
        get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"]), adapter_name="a.b")

    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=2, r=4))
    assert model.active_peft_config is model.peft_config["default"]
    model.add_adapter("frozen", MoELoRAConfig(target_modules=["v_proj"], num_experts=1, r=2, inference_mode=True))
    model.save_pretrained(str(tmp_path))
    theirs = get_peft_model(tiny_llama(num_layers=2), LoraConfig(r=4, target_modules=["q_proj"]))
    theirs.add_adapter("frozen", LoraConfig(r=2, target_modules=["v_proj"], inference_mode=True))
    # set_adapter: the activated adapter is trainable unless inference_mode=True, whatever its config says, and
    # also where it is active already (PEFT 0.21's rule; moelora kept an inference adapter frozen before)
    for name, inference_mode in (("frozen", False), ("frozen", True), ("default", False), ("default", True),
                                 ("default", False), ("frozen", True), ("frozen", False)):
        model.set_adapter(name, inference_mode=inference_mode)
        theirs.set_adapter(name, inference_mode=inference_mode)
        assert (trainable(model) > 0) == (trainable(theirs) > 0) == (not inference_mode), (name, inference_mode)
        assert model.active_peft_config is model.peft_config[name]
    with pytest.raises(TypeError, match="inference_mode must be a bool"):
        model.set_adapter("frozen", inference_mode="yes")

    loaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path), adapter_name="tuned",
                                          is_trainable=True)
    assert loaded.active_adapter == "tuned" and not loaded.active_peft_config.inference_mode and trainable(loaded) > 0
    loaded.load_adapter(str(tmp_path), "reference")
    assert loaded.peft_config["reference"].inference_mode and trainable(loaded) > 0  # "tuned" stays trainable
    loaded.set_adapter("reference")
    assert trainable(loaded) > 0  # as PEFT's set_adapter
    for_inference = moelora.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))
    assert for_inference.active_peft_config.inference_mode and trainable(for_inference) == 0
    for_inference.add_adapter("other", MoELoRAConfig(target_modules=["v_proj"], num_experts=1, r=2))
    assert trainable(for_inference) == 0  # the active adapter stays frozen
    for_inference.save_pretrained(str(tmp_path / "again"))  # swaps "other" in and out to save it
    for_inference.add_adapter("third", MoELoRAConfig(target_modules=["v_proj"], num_experts=1, r=2))
    assert trainable(for_inference) == 0  # still frozen (the save's swap back had made it trainable again)


def test_layer_and_model_status_and_parameter_counts_match_peft_s():
    """get_layer_status / get_model_status have PEFT's fields and, for the same adapters (a second adapter on
    one of the two targets, merged, disabled, frozen), PEFT's values; the types' names are moelora's.
    get_nb_trainable_parameters counts the inactive adapters' parameters too, as PEFT's."""
    import dataclasses
    from peft import LoraConfig, get_peft_model
    from peft.peft_model import TunerLayerStatus, TunerModelStatus

    theirs = get_peft_model(tiny_llama(num_layers=2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    ours = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     num_experts=1))
    ours.add_adapter("other", MoELoRAConfig(r=2, target_modules=["v_proj"], num_experts=1))
    fields = lambda cls: [f.name for f in dataclasses.fields(cls)]  # noqa: E731
    assert fields(moelora.tuner.adapters.LayerStatus) == fields(TunerLayerStatus)
    assert fields(moelora.tuner.adapters.ModelStatus) == fields(TunerModelStatus)
    own_names = {"module_type": None, "adapter_model_type": None, "peft_types": None}

    def same_status(ignored=()):
        ignored = {**own_names, **dict.fromkeys(ignored)}
        if "requires_grad" not in ignored:
            assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        layers = lambda m: sorted((dataclasses.asdict(s) | ignored for s in m.get_layer_status()),  # noqa: E731
                                  key=lambda s: s["name"])
        assert layers(ours) == layers(theirs)
        assert dataclasses.asdict(ours.get_model_status()) | ignored == \
            dataclasses.asdict(theirs.get_model_status()) | ignored

    same_status()
    statuses = ours.get_layer_status()
    assert {s.module_type for s in statuses} == {"moelora.MoELoRALinear"}
    assert ours.get_model_status().peft_types == {"default": "MOELORA", "other": "MOELORA"}
    for model in (ours, theirs):
        model.merge_adapter()
    same_status()
    assert ours.get_model_status().merged_adapters == ["default"]
    for model in (ours, theirs):
        model.unmerge_adapter()
        model.disable_adapter_layers()
    same_status(ignored=["requires_grad", "trainable_params"])  # PEFT's also freezes the disabled adapter
    assert ours.get_model_status().enabled is False and ours.get_model_status().requires_grad["default"] is True
    for model in (ours, theirs):
        model.enable_adapter_layers()
        model.model.model.layers[0].self_attn.q_proj.requires_grad_(False)  # one layer frozen: "irregular"
    same_status()
    assert ours.get_model_status().requires_grad["default"] == "irregular"
    for model in (ours, theirs):
        model.model.model.layers[0].self_attn.q_proj.merge()  # merged at one layer of several: "irregular"
    same_status()
    assert ours.get_model_status().merged_adapters == "irregular"


def test_print_trainable_parameters_prints_peft_s_line(capsys):
    """print_trainable_parameters prints the counts of get_nb_trainable_parameters as PEFT's does (the
    trainable share in percent, four decimals), the same line as PEFT's for the same adapter."""
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(tiny_llama(num_layers=2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ours = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     num_experts=1))
    trainable, total = ours.get_nb_trainable_parameters()
    assert 0 < trainable < total
    capsys.readouterr()
    ours.print_trainable_parameters()
    line = capsys.readouterr().out
    assert line == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                    f"trainable%: {100 * trainable / total:.4f}\n")
    theirs.print_trainable_parameters()
    assert capsys.readouterr().out == line


def test_layer_status_of_places_only_inactive_adapters_adapt_matches_peft_s():
    """A place that only inactive adapters adapt reports, as PEFT's, the model's active adapter and its enabled
    state (PEFT's set_adapter and disable_adapter_layers reach every layer), so that the model's status is
    regular: an adapter on other targets than the stored one is active, enabled or disabled."""
    import dataclasses
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(tiny_llama(num_layers=2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    ours = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     num_experts=1))
    ours.add_adapter("other", MoELoRAConfig(r=2, target_modules=["v_proj"], num_experts=1))
    ignored = {"module_type": None, "adapter_model_type": None, "peft_types": None}

    def same_status():
        layers = lambda m: sorted((dataclasses.asdict(s) | ignored for s in m.get_layer_status()),  # noqa: E731
                                  key=lambda s: s["name"])
        assert layers(ours) == layers(theirs)
        assert dataclasses.asdict(ours.get_model_status()) | ignored == \
            dataclasses.asdict(theirs.get_model_status()) | ignored

    for model in (ours, theirs):
        model.set_adapter("other")
    same_status()
    assert ours.get_model_status().active_adapters == ["other"]
    for model in (ours, theirs):
        model.disable_adapter_layers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours.get_model_status().enabled is False
        for model in (ours, theirs):
            for p in model.parameters():  # PEFT's disable freezes the adapter: compare the rest
                p.requires_grad_(False)
        same_status()


def test_unload_keeps_the_trained_copy_of_saved_modules_as_peft_s():
    """unload() (without merging) gives the base model back with each saved module's trained copy in place, as
    PEFT's (and merge_and_unload), and the adapter layers' base layers: the same model as PEFT's unload."""
    from peft import LoraConfig, get_peft_model

    ours = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(r=2, target_modules=["q_proj"], num_experts=1,
                                                                     modules_to_save=["lm_head"]))
    theirs = get_peft_model(tiny_llama(num_layers=2), LoraConfig(r=2, target_modules=["q_proj"],
                                                                 modules_to_save=["lm_head"]))
    for model, copy_ in ((ours, ours.model.lm_head.modules_to_save),
                         (theirs, theirs.base_model.model.lm_head.modules_to_save["default"])):
        with torch.no_grad():
            copy_.weight.add_(1.0)
    ours, theirs = ours.unload(), theirs.unload()
    assert type(ours.lm_head) is nn.Linear and not hasattr(ours.lm_head, "moelora_owned")
    assert type(ours.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.equal(ours.lm_head.weight, theirs.lm_head.weight)
    ids = token_batch()
    assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_adding_and_loading_an_adapter_keep_the_active_adapters_last_aux_loss_and_router_stats(tmp_path):
    """add_adapter / load_adapter take the active adapter out of the model while they build the new one; its
    layers then hold the loss and statistics of their last forward as before, not nothing."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=4,
                                                                      top_k=2))
    model.add_adapter("saved", MoELoRAConfig(target_modules=["v_proj"], num_experts=2, top_k=1))
    model.save_pretrained(str(tmp_path), selected_adapters=["saved"])
    model.delete_adapter("saved")
    model.train()
    model(token_batch(), labels=token_batch())
    loss, stats = model.aux_loss(), model.router_stats()
    assert loss > 0 and len(stats) == 2
    model.add_adapter("added", MoELoRAConfig(target_modules=["v_proj"], num_experts=2, top_k=1))
    model.load_adapter(str(tmp_path / "saved"), "saved")
    assert torch.equal(model.aux_loss(), loss)
    assert model.router_stats().keys() == stats.keys()


def test_deleting_the_active_adapter_activates_the_first_remaining_by_name_and_warns_as_peft_s():
    """PEFT's delete_adapter of the active adapter activates the first of the remaining adapters in sorted order
    (not the order they were added in) and warns which; moelora's does the same."""
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(tiny_llama(num_layers=2), LoraConfig(r=2, target_modules=["q_proj"]))
    ours = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(r=2, target_modules=["q_proj"], num_experts=1))
    for name in ("zeta", "alpha"):
        theirs.add_adapter(name, LoraConfig(r=2, target_modules=["q_proj"]))
        ours.add_adapter(name, MoELoRAConfig(r=2, target_modules=["q_proj"], num_experts=1))
    for model in (theirs, ours):
        with pytest.warns(UserWarning, match="Adapter default was active which is now deleted. Setting active "
                                             "adapter to alpha"):
            model.delete_adapter("default")
    assert ours.active_adapter == theirs.active_adapter == "alpha"
    assert ours.get_model_status().requires_grad == {"alpha": True, "zeta": False}


def test_task_ids_are_state_of_each_adapters_layers():
    """As docs/layers.md says: set_task_ids gives the ids to the active adapter's task-routed layers; an adapter
    activated later routes by the ids its layers held when it was last active, a new one by none."""
    def config():
        return MoELoRAConfig(target_modules=["q_proj"], num_experts=4, top_k=1, router="task")

    model = get_moelora_model(tiny_llama(num_layers=2), config())
    model.add_adapter("other", config())
    model.set_task_ids(3)
    model.set_adapter("other")
    with pytest.raises(RuntimeError, match="routes by task id but none is set"):
        model(token_batch())
    model.set_task_ids(1)
    model.set_adapter("default")
    held = lambda: {int(m.task_ids) for m in model.model.modules() if isinstance(m, MoELoRALinear)}  # noqa: E731
    assert held() == {3}
    model.set_adapter("other")
    assert held() == {1}


def test_set_adapter_that_cannot_go_in_leaves_the_active_adapters_last_aux_loss_and_router_stats():
    """The rollback of a refused set_adapter gives the active adapter back its last forward's loss and statistics
    too (taking it out clears them), as add_adapter / save_pretrained leave them."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=4,
                                                                      top_k=2))
    model.add_adapter("ffn", MoELoRAConfig(target_modules=["up_proj"], num_experts=1))
    for layer in model.model.model.layers:
        layer.mlp = nn.Identity()
    model.train()
    model(token_batch(), labels=token_batch())
    loss, stats = model.aux_loss(), model.router_stats()
    assert loss > 0 and len(stats) == 2
    with pytest.raises(ValueError, match="which the model no longer has"):
        model.set_adapter("ffn")
    assert torch.equal(model.aux_loss(), loss) and model.router_stats().keys() == stats.keys()


def test_a_stored_adapters_last_aux_loss_does_not_count_while_another_is_active():
    """set_adapter takes the outgoing adapter's loss and statistics aside with it: the newly active adapter, which
    has not run, adds no aux loss (the stored layers, which moelora.aux_loss's walk of the wrapper reaches, hold
    none), and switching back gives the first adapter its own again."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=4,
                                                                      top_k=2))
    model.add_adapter("other", MoELoRAConfig(target_modules=["q_proj"], num_experts=4, top_k=2))
    model.train()
    model(token_batch(), labels=token_batch())
    loss = model.aux_loss()
    assert loss > 0 and len(model.router_stats()) == 2
    model.set_adapter("other")
    for aux_loss in (model.aux_loss, lambda: moelora.aux_loss(model), lambda: moelora.aux_loss(model.model)):
        assert aux_loss().item() == 0
    assert model.router_stats() == {} and moelora.router_stats(model) == {}
    model.set_adapter("default")
    assert torch.equal(model.aux_loss(), loss) and len(model.router_stats()) == 2


def test_a_stored_adapters_saved_module_holding_an_upcycled_ffn_adds_no_aux_loss_while_another_is_active():
    """A saved module (modules_to_save) holding an upcycled MoEFFN stores its trained copy, routed, with its adapter:
    set_adapter takes that copy's loss aside too, so moelora.aux_loss(wrapper), whose walk reaches the stored copy,
    and model.aux_loss(), which walks the wrapped model, agree (the copy's loss came back with its adapter only)."""
    base = tiny_llama(num_layers=2)
    moelora.upcycle_ffn(base, num_experts=4, top_k=2)
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["q_proj"], num_experts=4, top_k=2,
                                                  modules_to_save=["layers.0"]))
    model.add_adapter("other", MoELoRAConfig(target_modules=["q_proj"], num_experts=4, top_k=2))
    model.train()
    model(token_batch(), labels=token_batch())
    loss = moelora.aux_loss(model)
    assert torch.equal(model.aux_loss(), loss)
    model.set_adapter("other")
    # what stays is the structural layers.1.mlp's loss (the stored copy of layers.0 holds none)
    assert moelora.aux_loss(model).item() == model.aux_loss().item() == moelora.aux_loss(model.model).item() > 0
    assert model.aux_loss() < loss
    model.set_adapter("default")
    assert torch.equal(moelora.aux_loss(model), loss) and torch.equal(model.aux_loss(), loss)


@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_of_a_wrapper_with_another_adapter_active_loads_each_adapter_into_its_own_layers(strict):
    """The wrapper's state dict holds the active adapter in the model and each inactive one under
    inactive_adapters.<name>; loading one saved with another adapter active (a resumed checkpoint) raised for
    missing keys, and with strict=False loaded the saved active adapter's tensors into this model's active one."""
    configs = {"default": MoELoRAConfig(target_modules=["proj", "conv"], num_experts=3, top_k=2, r=2),
               "b": MoELoRAConfig(target_modules=["proj", "conv"], num_experts=3, top_k=2, r=2,
                                  modules_to_save=["head"])}

    def wrapper(seed):
        model = get_moelora_model(Net(), configs["default"])
        model.add_adapter("b", configs["b"])
        _perturb(model.model, seed)  # the active adapter's
        model.set_adapter("b")
        _perturb(model.model, seed + 1)
        return model.eval()

    source, target = wrapper(5), wrapper(7)
    source.set_adapter("default")
    frozen_router = target.model.proj.router.weight.requires_grad_(False)  # the user's choice is kept
    result = target.load_state_dict(source.state_dict(), strict=strict)
    assert not result.missing_keys and not result.unexpected_keys
    assert target.active_adapter == "b"
    assert {n for n, p in target.named_parameters() if p.requires_grad} == {
        n for n, p in target.named_parameters() if n.startswith("model.") and p is not frozen_router and (
            ".lora_" in n or ".router." in n or ".modules_to_save." in n)}
    for name in ("default", "b", "default"):
        source.set_adapter(name)
        target.set_adapter(name)
        torch.testing.assert_close(target(IDS), source(IDS), rtol=0, atol=0)


def test_load_state_dict_with_another_adapter_active_merges_again_the_layers_merged_before_the_load():
    """Loading a dict saved with another adapter active swaps that adapter in for the load, which unmerges the
    active one's merged layers, and swaps the active one back after it: the layers merged before the load
    (merge_adapter for a task) are merged again, so the model computes what the source merged for that task
    computes, and unmerge_adapter gives back the source's unmerged model."""
    config = MoELoRAConfig(target_modules=["proj", "conv"], num_experts=3, r=2, router="task")

    def wrapper(seed):
        model = get_moelora_model(Net(), config)
        model.add_adapter("b", config)
        _perturb(model.model, seed)
        model.set_adapter("b")
        _perturb(model.model, seed + 1)
        return model.eval()

    source, target = wrapper(5), wrapper(7)
    source.set_adapter("default")  # the dict holds "default" active
    target.merge_adapter(task=1)
    merged = moelora.tuner.adapters.merged_tasks(target.model)
    assert merged and set(merged.values()) == {1}
    target.load_state_dict(source.state_dict())
    assert target.active_adapter == "b" and moelora.tuner.adapters.merged_tasks(target.model) == merged
    source.set_adapter("b")
    with moelora.use_task_ids(source.model, torch.tensor([1, 1])):
        expected = source(IDS)
    torch.testing.assert_close(target(IDS), expected, rtol=1e-6, atol=1e-6)
    target.unmerge_adapter()
    for task_ids in (torch.tensor([1, 1]), torch.tensor([0, 2])):
        with moelora.use_task_ids(source.model, task_ids), moelora.use_task_ids(target.model, task_ids):
            torch.testing.assert_close(target(IDS), source(IDS), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_of_a_dict_whose_active_adapter_is_ambiguous_is_refused(strict):
    """A dict that stores this model's active adapter under inactive_adapters holds another adapter's tensors in the
    model; when the model has several adapters the dict stores nothing of (a dict from a wrapper with fewer
    adapters), which one is unknown, and with strict=False the load put them into the active adapter silently."""
    config = MoELoRAConfig(target_modules=["proj"], num_experts=3, top_k=2, r=2)
    source, target = get_moelora_model(Net(), config), get_moelora_model(Net(), config)
    source.add_adapter("b", config)
    source.set_adapter("b")
    for name in ("b", "c"):
        target.add_adapter(name, config)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"holds adapter 'default' under inactive_adapters\..*\['b', 'c'\]"):
        target.load_state_dict(source.state_dict(), strict=strict)
    assert target.active_adapter == "default"
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_a_wrapper_pickled_without_the_load_hooks_gets_them_when_unpickled():
    """A MoELoRAModel pickled before it registered its load_state_dict hooks (and with active_adapter a plain
    attribute) came back without them: a dict saved with another adapter active then loaded into the wrong layers.
    Unpickling registers them, once; a copy that has them keeps one of each."""
    import pickle

    config = MoELoRAConfig(target_modules=["proj"], num_experts=3, top_k=2, r=2)
    source = get_moelora_model(Net(), config)
    source.add_adapter("b", config)
    _perturb(source.model, 5)
    source.set_adapter("b")
    _perturb(source.model, 6)
    old = copy.deepcopy(source)
    old._load_state_dict_pre_hooks.clear()
    old._load_state_dict_post_hooks.clear()
    old.__dict__["active_adapter"] = old.__dict__.pop("_active_adapter")  # as pickled when it was an attribute
    target = pickle.loads(pickle.dumps(old))
    assert (len(target._load_state_dict_pre_hooks), len(target._load_state_dict_post_hooks)) == (1, 1)
    again = pickle.loads(pickle.dumps(source))
    assert (len(again._load_state_dict_pre_hooks), len(again._load_state_dict_post_hooks)) == (1, 1)
    source.set_adapter("default")
    target.set_adapter("b")
    target.load_state_dict(source.state_dict())
    for name in ("default", "b"):
        source.set_adapter(name)
        target.set_adapter(name)
        torch.testing.assert_close(target.eval()(IDS), source.eval()(IDS), rtol=0, atol=0)


def test_assigning_active_adapter_is_refused_naming_set_adapter_as_peft_s():
    """model.active_adapter = name (PEFT's layers refuse it, a property without setter; PeftModel takes it and
    renames alone) changed the name alone: moelora_config and save_pretrained then named the other adapter while
    the old one's layers ran, and set_adapter raised KeyError."""
    model = get_moelora_model(Net(), MoELoRAConfig(target_modules=["proj"], num_experts=2, top_k=1))
    model.add_adapter("b", MoELoRAConfig(target_modules=["conv"], num_experts=2, top_k=1))
    with pytest.raises(AttributeError, match=r"set_adapter\('b'\)"):
        model.active_adapter = "b"
    assert model.active_adapter == "default" and model.moelora_config.target_modules == ["proj"]
    model.set_adapter("b")
    assert (model.active_adapter, model.active_adapters) == ("b", ["b"]) and isinstance(model.model.conv, MoELoRAConv)
    restored = copy.deepcopy(model)
    restored.set_adapter("default")
    assert restored.active_adapter == "default" and isinstance(restored.model.proj, MoELoRALinear)


@pytest.mark.parametrize("name", ["default", "a.b", 3])
def test_load_adapter_checks_the_name_before_reading_the_directory(tmp_path, name):
    """load_adapter read the checkpoint first: an adapter name taken already or invalid was reported as the
    directory's missing files (FileNotFoundError), or after the files were read and checked."""
    model = get_moelora_model(Net(), MoELoRAConfig(target_modules=["proj"], num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="adapter named 'default'|adapter names are"):
        model.load_adapter(str(tmp_path / "nothing_here"), name)
