"""Tied weights and shared modules: a module object held at several places (modules_to_save, upcycle_ffn; the
injection's check is in test_injection_targets.py) and a weight that transformers ties to modules of the same kind
(T5's ``shared`` and the encoder's and decoder's ``embed_tokens``). Each is handled correctly or refused before
the model changes, with an error naming the modules."""

import copy
import warnings

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
    with pytest.raises(ValueError, match=r"shared's weight is tied to decoder\.embed_tokens \(Embeddings too"):
        get_moelora_model(base, config(["shared", "encoder.embed_tokens"]))  # the copies not selected
    assert type(base.shared) is nn.Embedding and base.encoder.embed_tokens.weight is base.shared.weight
    torch.testing.assert_close(base(input_ids=ids, decoder_input_ids=ids).logits, expected, rtol=0, atol=0)

    model = get_moelora_model(base, config(["embed_tokens"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_embedding_A" in name or "modules_to_save" in name and "embed_tokens" in name:
                p.add_(torch.randn_like(p))
    assert (model(input_ids=ids, decoder_input_ids=ids).logits - expected).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["target_modules", "modules_to_save"])
def test_a_tied_embedding_its_model_calls_is_adapted_not_refused(kind):
    """FSMT with tied embeddings ties encoder.embed_tokens to decoder.embed_tokens (its _tied_weights_keys), both
    nn.Embeddings that the model calls (the decoder embeds with its own). Adapting the decoder's alone was refused
    as if the model called the encoder's in its place (T5's ``shared``, which never runs); it is adapted, and the
    adapter changes the output. The parent that never calls its module (T5's, BART's ``shared``) is still refused
    (test_t5_shared_embedding_is_refused_and_its_tied_copies_are_adapted)."""
    from transformers import BartConfig, BartForConditionalGeneration, FSMTConfig, FSMTForConditionalGeneration

    torch.manual_seed(0)
    base = FSMTForConditionalGeneration(FSMTConfig(
        langs=["en", "de"], src_vocab_size=64, tgt_vocab_size=64, tie_word_embeddings=True, d_model=16,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)).eval()
    assert base.model.decoder.embed_tokens.weight is base.model.encoder.embed_tokens.weight
    ids = torch.randint(3, 64, (2, 6))
    expected = base(input_ids=ids, decoder_input_ids=ids).logits
    names = ["model.decoder.embed_tokens"]
    config = (MoELoRAConfig(target_modules=names, num_experts=1, r=4) if kind == "target_modules" else
              MoELoRAConfig(target_modules=["q_proj"], modules_to_save=names, num_experts=1, r=4))
    model = get_moelora_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_embedding_A" in name or "modules_to_save" in name and "embed_tokens" in name:
                p.add_(torch.randn_like(p))
    assert (model(input_ids=ids, decoder_input_ids=ids).logits - expected).abs().max() > 1e-2

    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32))
    with pytest.raises(ValueError, match=r"model\.shared's weight is tied to model\.encoder\.embed_tokens, "
                                         r"model\.decoder\.embed_tokens"):
        get_moelora_model(bart, MoELoRAConfig(target_modules=["shared"], num_experts=1, r=4))


class Recurrent(nn.Module):
    """One linear cell applied ``steps`` times (weights shared across time steps), each step checkpointed
    (``checkpointed``) or not."""

    def __init__(self, steps=3, checkpointed=False, use_reentrant=False):
        super().__init__()
        self.cell = nn.Linear(16, 16)
        self.steps, self.checkpointed, self.use_reentrant = steps, checkpointed, use_reentrant

    def forward(self, x):
        for _ in range(self.steps):
            if self.checkpointed:
                x = torch.utils.checkpoint.checkpoint(lambda y: torch.tanh(self.cell(y)), x,
                                                      use_reentrant=self.use_reentrant)
            else:
                x = torch.tanh(self.cell(x))
        return x


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputation_keeps_the_forwards_routing_record(use_reentrant):
    """A cell called at three time steps, each checkpointed: its recomputations in backward (the last step
    first) replaced the routing record, so after backward moelora.aux_loss and router_stats described the
    first call, not the last one as without checkpointing (docs/layers.md), and the stored loss held the
    recomputed step's graph (its input, the activation checkpointing frees) until the next forward; with
    reentrant checkpoints the loss the forward lost its gradient for was replaced and the flag cleared. The
    record after backward is now the forward's, as without checkpointing; the gradients match an unrolled float64
    model holding one copy of the cell per step (gradients summed)."""
    torch.manual_seed(0)
    config = MoELoRAConfig(target_modules=["cell"], num_experts=4, top_k=2, r=4)
    plain = get_moelora_model(Recurrent(), config).double()
    with torch.no_grad():
        for p in plain.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model = copy.deepcopy(plain)
    model.model.checkpointed, model.model.use_reentrant = True, use_reentrant
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    outputs = []
    for m in (plain, model):
        out = m(x)
        record = m.model.cell.last_aux_loss
        out.pow(2).sum().backward()
        assert m.model.cell.last_aux_loss is record
        outputs.append((out, moelora.aux_loss(m), moelora.router_stats(m)))
    (out_plain, aux_plain, stats_plain), (out_ckpt, aux_ckpt, stats_ckpt) = outputs
    torch.testing.assert_close(out_ckpt, out_plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux_ckpt.detach(), aux_plain.detach(), rtol=1e-12, atol=1e-12)
    assert model.model.cell.aux_loss_lost_grad is use_reentrant
    assert stats_ckpt.keys() == stats_plain.keys() == {"cell"}
    for name, value in stats_plain["cell"].items():
        torch.testing.assert_close(torch.as_tensor(stats_ckpt["cell"][name]), torch.as_tensor(value))

    unrolled = copy.deepcopy(plain)  # one copy of the cell per step: the shared cell's gradient is their sum
    cells = [unrolled.model.cell] + [copy.deepcopy(unrolled.model.cell) for _ in range(2)]
    for c in cells:
        c.zero_grad()
    y = x.detach()
    for c in cells:
        y = torch.tanh(c(y))
    y.pow(2).sum().backward()
    for name, p in model.model.cell.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, sum(c.get_parameter(name).grad for c in cells), rtol=1e-10, atol=1e-12)


def test_merge_of_a_block_reused_at_several_layers_merges_its_shared_adapter_once():
    """A decoder layer reused at two depths (ALBERT-style) holds its adapted projections at one place, so the
    adapter is shared as the weights are, and merging folds it once. The tied-weight check counted the second
    path to the same base layer (model.layers.2...base_layer.weight) as another module tied to it and refused
    every merge. Merged, unmerged and unloaded models now compute the adapted model's output; a weight tied to
    another module (GPT-2's wte and lm_head) is still refused (test_model.py)."""
    ids = token_batch()
    torch.manual_seed(0)
    base = tiny_llama(num_layers=3).eval()
    base.model.layers[2] = base.model.layers[0]
    model = get_moelora_model(base, MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=1, r=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    expected = model(ids).logits
    plain = base.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(base.model.layers[0].self_attn.q_proj.base_layer.weight, plain, rtol=1e-6, atol=1e-6)
    merged = model.merge_and_unload()
    assert merged.model.layers[0] is merged.model.layers[2]
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_checkpoint_around_the_wrapper_keeps_the_record_and_trains_the_router_by_the_aux_loss(use_reentrant):
    """A checkpoint around the whole wrapper recomputes its forward in backward: the recomputation's layers stored
    nothing (as a checkpointed layer's) after the wrapper had cleared the records, so after backward aux_loss and
    router_stats were empty, and with a reentrant checkpoint (whose forward runs without gradients) the recomputed
    outputs.loss held no aux loss: it no longer trained the routers, without a warning. The recomputation now records
    and adds its aux loss as the forward did, then gives back the forward's records: the routers' gradients are
    those of the unchecked model (float64), and so are the records after backward, which warn of no lost gradient
    (the reentrant forward's loss had none, but the recomputed one trained the routers)."""
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = get_moelora_model(tiny_llama(2), MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4,
                                                               top_k=2, r=4, router_aux_loss_coef=0.5)).double()
        model.train()
        ids = token_batch()
        embeds = model.model.model.embed_tokens(ids).detach().requires_grad_()

        def loss_of(e):
            return model(inputs_embeds=e, labels=ids, use_cache=False).loss

        loss = (torch.utils.checkpoint.checkpoint(loss_of, embeds, use_reentrant=use_reentrant) if checkpointed
                else loss_of(embeds))
        records = [m.last_aux_loss for m in moelora.modules.routed.routed_modules(model)]
        loss.backward()
        assert all(m.last_aux_loss is r for m, r in zip(moelora.modules.routed.routed_modules(model), records))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the routers were trained by the aux loss: no lost-gradient warning
            results.append(({n: p.grad for n, p in model.named_parameters() if "router" in n},
                            moelora.aux_loss(model).detach(), moelora.router_stats(model)))
    (grads, aux, stats), (grads_ckpt, aux_ckpt, stats_ckpt) = results
    assert grads.keys() == grads_ckpt.keys() and len(grads) == 4
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux_ckpt, aux, rtol=1e-12, atol=1e-12)
    assert stats_ckpt.keys() == stats.keys() and len(stats) == 4


def test_a_recording_block_nested_in_another_leaves_the_outer_one_recording():
    """moelora.modules.routed.recording_in_backward (a wrapper's forward recomputed in backward) puts back what it
    found: a block nested in another (a wrapper inside a wrapper) leaves the outer block recording, so the layers
    that run after it in the outer forward still record; after the outer block, a recomputation stores nothing."""
    from moelora.modules.routed import recording_in_backward

    torch.manual_seed(0)
    layer = moelora.MoELoRALinear(nn.Linear(8, 8), num_experts=4, top_k=2, r=2).train()
    x = torch.randn(3, 8)
    recorded = []

    def records():  # whether a forward here replaces the layer's record
        before = layer.last_aux_loss
        layer(x)
        return layer.last_aux_loss is not before

    class InBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            with torch.enable_grad():
                recorded.append(records())
                with recording_in_backward():
                    with recording_in_backward():
                        recorded.append(records())
                    recorded.append(records())
                recorded.append(records())
            return grad

    InBackward.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert recorded == [False, True, True, False]
