"""Injection into modules that are not called as plain children: nn.MultiheadAttention's out_proj
(its weight is read, the module never called), nn.TransformerEncoderLayer's eval fast path (reads
linear1/linear2's weights), one module object held at several places, and targets that select
nothing. Each is adapted correctly or refused at injection with an error naming the module."""

import copy

import pytest
import torch
import torch.nn as nn

import moelora
from moelora import MoELoRAConfig, get_moelora_model
from helpers import randomize_adapters


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


def _config(target, **extra):
    return MoELoRAConfig(target_modules=target, num_experts=2, top_k=1, r=4, **extra)


@pytest.mark.parametrize("target", [["out_proj"], r".*proj", ["out_proj", "fc"]])
def test_multihead_attention_out_proj_is_refused(target):
    """MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward and never calls
    out_proj: an adapter there trained nothing and changed no output. Targeting it raises, naming
    it, and leaves the model as it was; exclude_modules leaves it out."""
    torch.manual_seed(0)
    model = AttentionNet()
    with pytest.raises(ValueError, match=r"attn\.out_proj is the out_proj of the nn\.MultiheadAttention attn.*"
                                         r"no effect.*exclude_modules"):
        get_moelora_model(model, _config(target))
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen
    wrapped = get_moelora_model(model, _config(["out_proj", "fc"], exclude_modules=["out_proj"]))
    assert isinstance(model.fc, moelora.MoELoRALinear) and wrapped.model is model


def test_all_linear_leaves_out_multihead_attention_out_proj_and_needs_a_layer():
    """all-linear adapts every linear layer an adapter acts on: not MultiheadAttention's out_proj
    (as not the output head); a model with none raises instead of returning a model with no
    adapter (everything frozen, nothing to train)."""
    model = AttentionNet()
    get_moelora_model(model, _config("all-linear"))
    assert isinstance(model.fc, moelora.MoELoRALinear)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with pytest.raises(ValueError, match="'all-linear' matches no linear layer"):
        get_moelora_model(nn.Sequential(nn.MultiheadAttention(8, 2)), _config("all-linear"))
    with pytest.raises(ValueError, match="'all-linear' matches no linear layer"):
        get_moelora_model(nn.Sequential(nn.ReLU()), _config("all-linear"))


def test_target_naming_another_kind_of_module_says_what_it_is():
    """The examples of modules the error offers are ones injection takes: not MultiheadAttention's
    out_proj, which it refuses (they offered attn.out_proj first)."""
    with pytest.raises(ValueError, match=r"\['attn'\] not found .*'attn' names attn, a MultiheadAttention") as err:
        get_moelora_model(AttentionNet(), _config(["attn"]))
    assert "(e.g. ['fc'])" in str(err.value)


def _encoder(nested: bool):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested) if nested else layer


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("nested", [False, True], ids=["layer", "encoder_with_padding"])
def test_transformer_encoder_fast_path_runs_the_adapters(nested, grad):
    """In eval mode nn.TransformerEncoderLayer ran torch._transformer_encoder_layer_fwd, which reads
    linear1/linear2.weight (the frozen base weights) and never calls the adapter layers: evaluation
    silently computed the base model (with or without gradients, the base weights being frozen), and
    an nn.TransformerEncoder given a padding mask fed the layers nested tensors. The adapted model
    in eval mode now computes what it computes with PyTorch's fast path off (the plain modules)."""
    model = _encoder(nested)
    base = copy.deepcopy(model).eval()
    wrapped = get_moelora_model(model, _config(["linear1", "linear2"]))
    randomize_adapters(wrapped)
    wrapped.eval()
    x = torch.randn(2, 5, 16)
    kwargs = {}
    if nested:
        mask = torch.zeros(2, 5, dtype=torch.bool)
        mask[0, 3:] = True
        kwargs["src_key_padding_mask"] = mask
    with torch.set_grad_enabled(grad):
        got = wrapped(x, **kwargs)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            expected = wrapped(x, **kwargs)
            base_out = base(x, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    keep = ~kwargs["src_key_padding_mask"] if nested else torch.ones(2, 5, dtype=torch.bool)
    assert not torch.allclose(expected[keep], base_out[keep], atol=1e-3)  # the adapters change the output
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_module_held_at_several_places_is_refused():
    """named_modules lists a module object once: injection replaced it at its first place only, and
    the model ran the plain layer at the others (an adapter at half its uses, silently). It raises,
    naming the places; a target naming only the second place says which module it is."""
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    for target in (["0"], r".*", "all-linear"):
        with pytest.raises(ValueError, match=r"0 is one module held at several places of the model \(0, 2\)"):
            get_moelora_model(model, _config(target))
        assert model[0] is model[2] is lin
    with pytest.raises(ValueError, match=r"'2' names 2, which is 0 \(one module held at two places\)"):
        get_moelora_model(model, _config(["2"]))


def test_block_reused_at_several_layers_shares_its_adapter():
    """A block reused at several layers (ALBERT-style sharing) holds its linear layer at one place:
    the one adapter is shared by every use, as the block's weights are."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.tanh(self.fc(x))

    def make():
        torch.manual_seed(0)
        block = Block()
        return nn.Sequential(block, block)

    model = make()
    wrapped = get_moelora_model(model, _config(["fc"]))
    randomize_adapters(wrapped)
    assert isinstance(model[0].fc, moelora.MoELoRALinear) and model[1].fc is model[0].fc
    x = torch.randn(3, 8)
    layer = model[0].fc
    expected = layer(layer(x).tanh()).tanh()
    torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=0)


class _RoutingLinear(nn.Linear):
    """A linear subclass whose forward returns more than its output (as transformers' MoE routers)."""

    def forward(self, x):
        logits = super().forward(x)
        return logits, logits.topk(1, dim=-1).indices


def test_linear_subclass_returning_a_tuple_raises_naming_it():
    """A base layer whose forward returns a tuple failed with AttributeError: 'tuple' object has no attribute
    'to' in the composed path; it now raises a TypeError naming the class and what to do."""
    model = nn.Sequential(_RoutingLinear(16, 4))
    wrapped = get_moelora_model(model, _config(["0"]))
    with pytest.raises(TypeError, match=r"base layer _RoutingLinear returned a tuple, not a tensor.*exclude_modules"):
        wrapped(torch.randn(3, 16))


def test_module_names_given_as_a_set_as_peft_holds_them():
    """PEFT's LoraConfig holds target_modules as a set: a set of names (target_modules, exclude_modules,
    modules_to_save) is taken as their sorted list, so a PEFT config's field can be passed over as it is;
    the config then saves as JSON and injects what the list does."""
    peft = pytest.importorskip("peft")
    targets = peft.LoraConfig(target_modules=["fc", "out"]).target_modules
    assert isinstance(targets, set)
    config = MoELoRAConfig(target_modules=targets, exclude_modules=frozenset({"out"}), modules_to_save={"head"},
                           num_experts=2, top_k=1, r=4, router_renormalize=False)
    assert (config.target_modules, config.exclude_modules, config.modules_to_save) == (["fc", "out"], ["out"],
                                                                                       ["head"])
    assert MoELoRAConfig.from_dict(config.to_dict()) == config
    model = nn.Sequential()
    model.fc, model.out, model.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
    wrapped = get_moelora_model(model, config)
    assert type(model.fc).__name__ == "MoELoRALinear" and isinstance(model.out, nn.Linear)
    assert wrapped.moelora_config.target_modules == ["fc", "out"]
    with pytest.raises(TypeError, match="MoELoRAConfig.target_modules must be"):
        MoELoRAConfig(target_modules={"fc", 3})
