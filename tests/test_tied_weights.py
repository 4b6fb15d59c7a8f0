"""Tied weights and shared modules: a module object held at several places (modules_to_save, upcycle_ffn; the
injection's check is in test_injection_targets.py) and a weight that transformers ties to modules of the same kind
(T5's ``shared`` and the encoder's and decoder's ``embed_tokens``). Each is handled correctly or refused before
the model changes, with an error naming the modules."""

import pytest
import torch
import torch.nn as nn

import moelora
from moelora import MoELoRAConfig, get_moelora_model
from helpers import tiny_llama, tiny_t5, token_batch


class SharedLinear(nn.Module):
    """One nn.Linear called at two places (``a`` and ``b``), around another (``q``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a
        self.q = nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.tanh(self.q(self.a(x))))


def test_modules_to_save_refuses_a_module_held_at_several_places():
    """named_modules lists a module object once: modules_to_save wrapped it at its first place only, and the
    model ran the frozen original at the other (``b``), so the trained copy was half used, silently. It raises,
    naming both places, and leaves the model as it was; each place its own module saves both."""
    model = SharedLinear()
    with pytest.raises(ValueError, match=r"a is one module held at several places of the model \(a, b\): "
                                         r"modules_to_save replaces it at one place"):
        get_moelora_model(model, MoELoRAConfig(target_modules=["q"], modules_to_save=["a"], num_experts=1))
    assert type(model.a) is nn.Linear and model.a is model.b and type(model.q) is nn.Linear
    model.b = nn.Linear(8, 8)
    wrapped = get_moelora_model(model, MoELoRAConfig(target_modules=["q"], modules_to_save=["a", "b"], num_experts=1))
    assert {n for n, m in wrapped.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"} == {
        "model.a", "model.b"}


def test_upcycle_ffn_refuses_an_ffn_held_at_several_places_and_shares_a_reused_block():
    """An MLP object held by two decoder layers: upcycle_ffn replaced it in the first layer only, and the
    second kept running the dense MLP (one FFN of the two upcycled, silently). It raises, naming both places,
    before changing the model. A decoder layer reused at two depths (ALBERT-style) holds its MLP at one place:
    one MoEFFN, run at both depths, computing the dense MLP at start as the unshared model does."""
    torch.manual_seed(0)
    base = tiny_llama(num_layers=2).eval()
    layers = base.model.layers
    layers[1].mlp = layers[0].mlp
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp is one module held at several places of the model "
                                         r"\(model\.layers\.0\.mlp, model\.layers\.1\.mlp\): upcycle_ffn"):
        moelora.upcycle_ffn(base, num_experts=2, top_k=2)
    assert layers[0].mlp is layers[1].mlp and type(layers[0].mlp).__name__ == "LlamaMLP"

    layers[1] = layers[0]
    ids = token_batch()
    expected = base(ids).logits
    assert moelora.upcycle_ffn(base, num_experts=2, top_k=2) == ["model.layers.0.mlp"]
    assert layers[0] is layers[1] and isinstance(layers[0].mlp, moelora.MoEFFN)
    torch.testing.assert_close(base(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["target_modules", "modules_to_save"])
def test_t5_shared_embedding_is_refused_and_its_tied_copies_are_adapted(kind):
    """transformers 5's T5 embeds with encoder.embed_tokens and decoder.embed_tokens, modules of their own that
    hold ``shared.weight`` (its _tied_weights_keys); ``shared`` never runs. An adapter (or a saved copy) on
    ``shared`` trained nothing and changed no output, silently. It raises, naming the modules to use, and leaves
    the model as it was; naming ``embed_tokens`` changes the output (the adapter runs)."""
    ids = token_batch()
    torch.manual_seed(0)
    base = tiny_t5().eval()
    expected = base(input_ids=ids, decoder_input_ids=ids).logits

    def config(names):
        if kind == "target_modules":
            return MoELoRAConfig(target_modules=names, num_experts=1, r=4)
        return MoELoRAConfig(target_modules=["q"], modules_to_save=names, num_experts=1, r=4)

    with pytest.raises(ValueError, match=r"shared's weight is tied to encoder\.embed_tokens, decoder\.embed_tokens "
                                         r".*would have no effect; .*\['embed_tokens'\]"):
        get_moelora_model(base, config(["shared"]))
    assert type(base.shared) is nn.Embedding and base.encoder.embed_tokens.weight is base.shared.weight
    torch.testing.assert_close(base(input_ids=ids, decoder_input_ids=ids).logits, expected, rtol=0, atol=0)

    model = get_moelora_model(base, config(["embed_tokens"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_embedding_A" in name or "modules_to_save" in name and "embed_tokens" in name:
                p.add_(torch.randn_like(p))
    assert (model(input_ids=ids, decoder_input_ids=ids).logits - expected).abs().max() > 1e-2
