"""MoE-LoRA on the transformers architectures a PEFT user brings (tiny random configs, CPU, no downloads).

For each: ``"all-linear"`` selects the modules PEFT's ``"all-linear"`` does; a single expert with the same
weights computes PEFT's LoRA (``export_peft_lora`` read by PEFT's ``PeftModel``), and ``merge_and_unload``
the unmerged output; fused projections (Phi-3's qkv_proj / gate_up_proj, GPT-NeoX's and Falcon's
query_key_value), an encoder-decoder without biases (T5), a vision model (ViT), Whisper's convolutional
front-end and state-space mixers (Mamba, Jamba) are covered (GPT-2's Conv1D: tests/test_model.py). Without
target_modules the adapted modules are PEFT's defaults for the architecture, as get_peft_model's."""

import contextlib
import copy
import functools

import pytest
import torch
import torch.nn as nn

import moelora
from helpers import tiny_whisper

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

ATTENTION = dict(num_hidden_layers=2, num_attention_heads=4)
DECODERS = {
    "qwen2": dict(intermediate_size=48, num_key_value_heads=2),
    "phi3": dict(intermediate_size=48, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(intermediate_size=48),
    "falcon": dict(),
}


def _decoder(name):
    config = transformers.AutoConfig.for_model(name, vocab_size=64, hidden_size=32, **ATTENTION, **DECODERS[name])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _t5():
    """T5: no biases anywhere, encoder-decoder."""
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).eval()


def _vit():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                                    image_size=8, patch_size=4, num_labels=3)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).eval()


# name -> (tiny model, a batch)
MODELS = {
    **{name: (functools.partial(_decoder, name), lambda: dict(input_ids=_ids())) for name in DECODERS},
    "t5": (_t5, lambda: dict(input_ids=_ids(), decoder_input_ids=_ids(2)[:, :4])),
    "vit": (_vit, lambda: dict(pixel_values=torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)))),
}


def _ids(seed=1):
    return torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(seed))


def _randomize_adapters(model, seed=5):
    """Non-zero A and B everywhere (B starts at zero), so that every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _peft_adapted(peft_model):
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


def _adapted(model):
    return sorted(n for n, m in moelora.tuner.targets.unwrap(model).named_modules()
                  if moelora.modules.adapter_base.is_adapter_layer(m))


@pytest.mark.parametrize("name", list(MODELS))
def test_single_expert_all_linear_is_peft_lora_and_merges(name, tmp_path):
    """'all-linear' adapts the modules PEFT's does; one expert is PEFT's LoRA with the same weights, merged or
    not. Falcon's projections are FalconLinear, an nn.Linear subclass whose own forward is x W^T + b: merging
    refused it ("it has a forward of its own"), so merge_and_unload failed on every Falcon model PEFT merges."""
    build, batch = MODELS[name]
    base, batch = build(), batch()
    config = moelora.MoELoRAConfig(r=4, lora_alpha=8, num_experts=1, top_k=1, target_modules="all-linear")
    model = moelora.get_moelora_model(copy.deepcopy(base), config).eval()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear"))
    peft_only = {"classifier"} if name == "vit" else set()  # moelora's 'all-linear' leaves output heads out
    assert set(_adapted(model)) == set(_peft_adapted(reference)) - peft_only
    _randomize_adapters(model)
    with torch.no_grad():
        out = model(**batch).logits
        assert (out - base(**batch).logits).abs().max() > 1e-3  # the adapters are live
        moelora.export_peft_lora(model, str(tmp_path))
        peft_out = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()(**batch).logits
        merged = model.merge_and_unload()(**batch).logits
    torch.testing.assert_close(peft_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, out, rtol=1e-5, atol=1e-5)


def test_whisper_convolutional_front_end_adapts_and_runs(tmp_path):
    """Whisper's encoder reads ``conv1.stride[0]`` from its front-end convolutions: with conv1 adapted the
    forward raised AttributeError ('MoELoRAConv' object has no attribute 'stride'; PEFT's LoRA conv layer
    fails the same way). The adapter layer now shows the base's stride, padding, dilation and padding_mode."""
    base = tiny_whisper()
    features = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
    batch = dict(input_features=features, decoder_input_ids=_ids()[:, :4])
    config = moelora.MoELoRAConfig(r=4, num_experts=4, top_k=2, target_modules=r".*(conv1|conv2|q_proj|v_proj)")
    model = moelora.get_moelora_model(copy.deepcopy(base), config).eval()
    conv1, base_conv1 = model.model.model.encoder.conv1, base.model.encoder.conv1
    assert isinstance(conv1, moelora.MoELoRAConv)
    assert (conv1.stride, conv1.padding, conv1.dilation, conv1.padding_mode) == (
        base_conv1.stride, base_conv1.padding, base_conv1.dilation, base_conv1.padding_mode)
    _randomize_adapters(model)
    with torch.no_grad():
        out = model(**batch).logits
        assert (out - base(**batch).logits).abs().max() > 1e-3
    model.save_pretrained(str(tmp_path))
    reloaded = moelora.MoELoRAModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, out, rtol=0, atol=0)
    model.train()
    model(**batch).logits.square().mean().backward()
    assert model.model.model.encoder.conv1.lora_A.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(DECODERS))
def test_target_modules_none_takes_peft_default_targets(name, tmp_path):
    """MoELoRAConfig() without target_modules raised "target_modules must be set" where PEFT's get_peft_model
    adapts its per-architecture defaults (q_proj and v_proj of Qwen2, query_key_value of GPT-NeoX and Falcon);
    it now adapts those, and the wrapper's config (hence the saved one) names them. Phi-3, for which PEFT has
    no default, raises as PEFT does, naming the model type."""
    config = moelora.MoELoRAConfig(r=4, num_experts=2, top_k=1)
    try:
        reference = _peft_adapted(peft.get_peft_model(_decoder(name), peft.LoraConfig(r=4)))
    except ValueError:
        with pytest.raises(ValueError, match=f"target_modules must be set .*no default targets for model_type "
                                             f"'{name}'"):
            moelora.get_moelora_model(_decoder(name), config)
        return
    model = moelora.get_moelora_model(_decoder(name), config)
    assert _adapted(model) == reference and config.target_modules is None
    defaults = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    assert model.moelora_config.target_modules == defaults[name]
    model.save_pretrained(str(tmp_path))
    assert _adapted(moelora.MoELoRAModel.from_pretrained(_decoder(name), str(tmp_path))) == reference
    model.add_adapter("other", moelora.MoELoRAConfig(r=2, num_experts=2, top_k=1))
    assert model.adapter_configs["other"].target_modules == model.moelora_config.target_modules


def test_target_modules_none_on_a_model_without_model_type_raises():
    with pytest.raises(ValueError, match="target_modules must be set .*no config.model_type"):
        moelora.get_moelora_model(nn.Sequential(nn.Linear(4, 4)), moelora.MoELoRAConfig(r=2))


SSM = {
    "mamba": dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4),
    "jamba": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=2, mamba_d_state=4, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1),
}


@pytest.mark.parametrize("name", list(SSM))
def test_state_space_mixers_children_read_by_weight_are_not_adapted(name):
    """Mamba's mixer multiplies by dt_proj.weight (Jamba's too) and passes conv1d, x_proj and out_proj's weights
    to its fused training kernels, never calling them: 'all-linear' put adapters there that did nothing (dt_proj's
    lora_B got no gradient; on a GPU with the kernels, x_proj's and out_proj's neither, in training only). They are
    now left out by 'all-linear' and refused by name, as nn.MultiheadAttention's out_proj; every adapter made is
    live, and the mixers' other projections (Jamba's out_proj, which its mixer calls) are adapted."""
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(name, **SSM[name]))
    with pytest.warns(UserWarning, match="stacked weights") if name == "jamba" else contextlib.nullcontext():
        model = moelora.get_moelora_model(copy.deepcopy(base), moelora.MoELoRAConfig(
            r=4, num_experts=2, top_k=1, target_modules="all-linear"))
    adapted = {n.split(".")[-1] for n in _adapted(model)}
    assert "in_proj" in adapted and not adapted & {"dt_proj", "conv1d"}
    assert ("out_proj" in adapted) == (name == "jamba") and ("x_proj" in adapted) == (name == "jamba")
    _randomize_adapters(model)
    model.train()
    model(input_ids=_ids()).logits.square().mean().backward()
    dead = [n for n, p in model.named_parameters() if "lora_B" in n and not p.grad.abs().sum() > 0]
    assert not dead
    with pytest.raises(ValueError, match=r"dt_proj is the dt_proj of the \w+Mixer .*reads dt_proj.weight itself"):
        moelora.get_moelora_model(copy.deepcopy(base), moelora.MoELoRAConfig(r=4, target_modules=["dt_proj"]))


def test_a_mixers_child_whose_weight_only_its_initialisation_reads_is_adapted():
    """Only the weight reads of a mixer's methods that run in its forward make a child unread: one its constructor
    or reset_parameters initialises (``self.out_proj.weight.data``) and its forward calls is adapted; one its
    forward multiplies by (``F.linear(x, self.x_proj.weight)``) is refused."""
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.A_log = nn.Parameter(torch.zeros(4))
            self.x_proj, self.out_proj = nn.Linear(8, 8), nn.Linear(8, 8)
            self.out_proj.weight.data.mul_(0.5)

        def reset_parameters(self):
            nn.init.normal_(self.out_proj.weight)

        def forward(self, x):
            return self.out_proj(torch.nn.functional.linear(x, self.x_proj.weight) * self.A_log.exp())

    model = moelora.get_moelora_model(nn.Sequential(Mixer()), moelora.MoELoRAConfig(r=2, target_modules=["out_proj"]))
    assert _adapted(model) == ["0.out_proj"]
    with pytest.raises(ValueError, match=r"x_proj is the x_proj of the Mixer 0, whose code reads x_proj\.weight"):
        moelora.get_moelora_model(nn.Sequential(Mixer()), moelora.MoELoRAConfig(r=2, target_modules=["x_proj"]))


def _checkpointing_batch(name):
    if name == "vit":
        return _vit(), MODELS["vit"][1](), dict(task_type="SEQ_CLS")  # the classifier head trains too
    features = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
    return tiny_whisper(), dict(input_features=features, decoder_input_ids=_ids()[:, :4]), {}


def _reentrant_checkpointed_gradients(base, batch, config, before=False, after=None, set_adapter=False):
    """The trainable parameters' gradients of one backward of a copy of ``base`` adapted by ``config`` (routers and
    adapters seeded), reentrant checkpointing enabled on the model before wrapping (``before``) or through the
    wrapper's method named ``after`` (gradient_checkpointing_enable, activation_checkpointing_enable), neither:
    none; ``set_adapter``: the active adapter set again first (trainable, as set_adapter makes it)."""
    inner = copy.deepcopy(base)
    if before:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    torch.manual_seed(0)  # the routers' initial weights
    model = moelora.get_moelora_model(inner, config)
    _randomize_adapters(model)
    if after is not None:
        getattr(model, after)(**{after.replace("_enable", "_kwargs"): {"use_reentrant": True}})
    if set_adapter:
        model.set_adapter(model.active_adapter)
    model.train()
    with contextlib.suppress(AttributeError):
        model.config.use_cache = False
    model(**batch).logits.square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_trained_gradients(expected, got):
    assert any("lora_A" in n for n in expected) and all(g is not None for g in expected.values())
    missing = [n for n, g in got.items() if g is None]
    assert not missing, missing[:4]
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("when", ["before_wrapping", "gradient_checkpointing_enable",
                                  "activation_checkpointing_enable"])
@pytest.mark.parametrize("name", ["vit", "whisper"])
def test_reentrant_checkpointing_trains_the_adapters_of_a_model_without_input_ids(name, when):
    """transformers hooks the input embeddings to make their output require grad (so that reentrant checkpointing,
    which runs a block without inputs that require grad under no_grad, passes gradients on) only for a model whose
    main input is input_ids, or which is marked as holding adapters: the wrapper's gradient_checkpointing_enable
    went to the wrapped model, unmarked, so a ViT's (pixel_values) or Whisper's (input_features) checkpointed
    layers got no gradient: with the head trained (task_type SEQ_CLS) the adapters silently stayed as they were,
    and without a trainable head backward raised "element 0 of tensors does not require grad". The wrapper now
    hooks the input embeddings as PEFT does for reentrant checkpointing, enabled before or after wrapping; the
    gradients are those without checkpointing."""
    base, batch, extra = _checkpointing_batch(name)
    config = moelora.MoELoRAConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"], **extra)
    before = when == "before_wrapping"
    _assert_same_trained_gradients(_reentrant_checkpointed_gradients(base, batch, config),
                                   _reentrant_checkpointed_gradients(base, batch, config, before=before,
                                                                     after=None if before else when))


@pytest.mark.parametrize("name", ["vit", "whisper"])
def test_reentrant_checkpointing_trains_the_adapters_once_set_adapter_unfreezes_them(name):
    """An adapter built frozen (inference_mode=True) on a model checkpointing reentrantly: the wrapper hooked no
    input embeddings (nothing trained), and set_adapter(..., inference_mode=False), which makes the adapter
    trainable, left them unhooked: the adapters got no gradient (ViT, whose head trains: silently; Whisper: backward
    raised). set_adapter now hooks them as the wrapper does at its creation; the gradients are those without
    checkpointing."""
    base, batch, extra = _checkpointing_batch(name)
    config = moelora.MoELoRAConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"],
                                   inference_mode=True, **extra)
    _assert_same_trained_gradients(_reentrant_checkpointed_gradients(base, batch, config, set_adapter=True),
                                   _reentrant_checkpointed_gradients(base, batch, config, before=True,
                                                                     set_adapter=True))


def _roberta_classifier():
    """RoBERTa's classification head (classifier.dense, classifier.out_proj) holds linear layers of its own."""
    config = transformers.RobertaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, max_position_embeddings=32,
                                        num_labels=3, pad_token_id=1, **ATTENTION)
    torch.manual_seed(0)
    return transformers.RobertaForSequenceClassification(config).eval()


@pytest.mark.parametrize("target", ["all-linear", ["query", "value", "dense"]])
def test_task_head_saved_whole_is_left_out_of_the_targets_as_peft_does(target, tmp_path):
    """task_type='SEQ_CLS' saves the head (classifier) whole; 'all-linear' or a list naming ``dense`` selected the
    head's own linear layers too (RoBERTa's classifier.dense and out_proj), and injection raised "modules_to_save
    names classifier, which holds MoE-LoRA layers" for a modules_to_save the user never wrote. As PEFT's, the
    targets inside a saved module are left out: the adapted modules and the trained ones are PEFT's, the head
    trains whole, and the model saves and loads."""
    base = _roberta_classifier()
    config = moelora.MoELoRAConfig(r=4, num_experts=2, top_k=1, target_modules=target, task_type="SEQ_CLS")
    model = moelora.get_moelora_model(copy.deepcopy(base), config)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=target,
                                                                         task_type="SEQ_CLS"))
    assert _adapted(model) == _peft_adapted(reference) and "roberta.encoder.layer.1.output.dense" in _adapted(model)
    saved = sorted(n.removeprefix("model.") for n, p in model.named_parameters() if p.requires_grad and "lora" not in n
                   and "router" not in n)
    assert saved == sorted(n.removeprefix("base_model.model.").replace(".default", "")
                           for n, p in reference.named_parameters() if p.requires_grad and "lora" not in n)
    _randomize_adapters(model)
    model.train()
    labels = torch.tensor([0, 2])
    model(input_ids=_ids(), labels=labels).loss.backward()
    assert model.model.classifier.modules_to_save.dense.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(input_ids=_ids()).logits
        model.save_pretrained(str(tmp_path))
        reloaded = moelora.MoELoRAModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
        torch.testing.assert_close(reloaded(input_ids=_ids()).logits, out, rtol=0, atol=0)


def test_targets_all_inside_saved_modules_raise_saying_so():
    with pytest.raises(ValueError, match=r"every module target_modules selects is in a module saved whole .*"
                                         r"classifier\.out_proj"):
        moelora.get_moelora_model(_roberta_classifier(), moelora.MoELoRAConfig(
            r=4, target_modules=["out_proj"], task_type="SEQ_CLS"))


@pytest.mark.parametrize("layers", [[0], [1]])
def test_layers_to_transform_without_layers_pattern_indexes_the_first_numbered_stack_as_peft(layers):
    """Without layers_pattern PEFT's layer index is the first numbered segment of the module's name; moelora took the
    index after a stack named layers / h / block / blocks / layer, which in ConvNeXt's stages.<i>.layers.<j> is the
    block inside the stage: layers_to_transform=[0] adapted the first block of every stage where PEFT adapts every
    block of the first stage (silently other modules). It now takes PEFT's index."""
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[2, 2], num_stages=2,
                                         image_size=32, num_labels=3)
    torch.manual_seed(0)
    base = transformers.ConvNextForImageClassification(config).eval()
    kwargs = dict(target_modules=["pwconv1"], layers_to_transform=layers)
    model = moelora.get_moelora_model(copy.deepcopy(base), moelora.MoELoRAConfig(r=4, num_experts=2, top_k=1, **kwargs))
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **kwargs))
    assert _adapted(model) == _peft_adapted(reference) == [f"convnext.encoder.stages.{layers[0]}.layers.{j}.pwconv1"
                                                           for j in range(2)]


class _StackAndProjector(nn.Module):
    """A layer stack (model.layers.<i>.fc) beside a projector outside it whose linear layers are children of an
    nn.Sequential (proj.0, proj.2), as Qwen2-VL's merger.mlp.<i> or InternVL's mlp1.<i>."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module() for _ in range(3)])
        for layer in self.model.layers:
            layer.fc = nn.Linear(8, 8)
        self.proj = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))

    def forward(self, x):
        for layer in self.model.layers:
            x = layer.fc(x)
        return self.proj(x)


@pytest.mark.parametrize("layers", [[0], [2]])
def test_layers_to_transform_leaves_out_modules_outside_the_layers_as_peft(layers):
    """Without layers_pattern a module whose only numbered part ends its name (an nn.Sequential's child outside
    the layer stack: proj.0) has no layer index for PEFT, which leaves it out of layers_to_transform; f8f9a9e read
    the number ending the name as its layer (proj.0 in layer 0, proj.2 in layer 2), adapting it beside the
    chosen layer (silently other modules than PEFT's, and than before). Such a module is left out again."""
    torch.manual_seed(0)
    base = _StackAndProjector()
    kwargs = dict(target_modules=["fc", "0", "2"], layers_to_transform=layers)
    model = moelora.get_moelora_model(copy.deepcopy(base), moelora.MoELoRAConfig(r=4, num_experts=2, top_k=1, **kwargs))
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **kwargs))
    assert _adapted(model) == _peft_adapted(reference) == [f"model.layers.{layers[0]}.fc"]


def test_per_layer_expert_counts_index_the_transformer_layers_of_a_model_numbering_other_stacks():
    """MoLA's per-layer counts index the layers named as DEFAULT_LAYERS_PATTERN (encoder.layers.<i>), not the first
    numbered stack: Wav2Vec2's feature extractor (conv_layers.0 .. 6) comes first. Reading layers_to_transform's
    PEFT index for them counted 7 layers in a 3-layer model: num_experts=[2, 3, 4] raised and the "2468" preset
    silently gave [2, 2, 4] where it gives [2, 4, 6] (saved configs of such models changed meaning)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                         conv_dim=(8,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                         num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, vocab_size=10)
    for num_experts, expected in (([2, 3, 4], [2, 3, 4]), ("2468", [2, 4, 6])):
        model = moelora.get_moelora_model(Wav2Vec2Model(cfg), moelora.MoELoRAConfig(
            target_modules=["q_proj"], num_experts=num_experts, top_k=2, r=2))
        assert [m.num_experts for n, m in model.named_modules() if n.endswith("q_proj")] == expected
