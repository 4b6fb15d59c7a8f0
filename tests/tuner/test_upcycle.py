"""MoE FFN upcycling: exact at init, routing/gradients, generic MLPs, errors."""

import math

import pytest
import torch
import torch.nn as nn

import moelora
from moelora import moe_ffn
from moelora.modules.ffn import MoEFFN
from moelora.tuner.upcycle import upcycle_ffn
from helpers import tiny_bert, tiny_gpt2, tiny_llama, token_batch


def _perturb_experts(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoEFFN):
                for p in (m.w_in, m.w_out):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("make,out", [(tiny_bert, "last_hidden_state"), (tiny_llama, "logits")])
def test_upcycled_top1_equals_original(make, out):
    model = make()
    ids = token_batch()
    expected = getattr(model(ids), out)
    names = upcycle_ffn(model, num_experts=4, top_k=1)
    assert len(names) == 4 and all(isinstance(m, MoEFFN) for m in model.modules() if type(m).__name__ == "MoEFFN")
    model.train()
    # One expert per token with weight 1.0: only BLAS blocking over fewer rows can differ.
    torch.testing.assert_close(getattr(model(ids), out), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make,out", [(tiny_bert, "last_hidden_state"), (tiny_llama, "logits")])
def test_upcycled_all_experts_routed_eps_zero_equals_original(make, out):
    model = make()
    ids = token_batch()
    expected = getattr(model(ids), out)
    upcycle_ffn(model, num_experts=4, top_k=4, router="threshold", threshold_eps=0.0)
    model.train()
    assert torch.equal(getattr(model(ids), out), expected)


def test_moe_ffn_equals_per_token_loop_and_skips_dropped_slots():
    torch.manual_seed(0)
    e, d, f, t = 3, 6, 10, 9
    w_in, b_in, w_out, b_out, w_gate = (torch.randn(e, f, d), torch.randn(e, f), torch.randn(e, d, f),
                                        torch.randn(e, d), torch.randn(e, f, d))
    x = torch.randn(t, d)
    ids = torch.randint(0, e, (t, 2))
    w = torch.rand(t, 2)
    w[::3, 1] = 0.0  # dropped slots
    got = moe_ffn(x, ids, w, w_in, b_in, w_out, b_out, torch.tanh, w_gate)
    ref = torch.zeros(t, d)
    for i in range(t):
        for j in range(2):
            k = ids[i, j]
            h = torch.tanh(w_gate[k] @ x[i]) * (w_in[k] @ x[i] + b_in[k])
            ref[i] += w[i, j] * (w_out[k] @ h + b_out[k])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    empty = moe_ffn(x[:0], ids[:0], w[:0], w_in, b_in, w_out, b_out, torch.tanh)
    assert empty.shape == (0, d)


def test_experts_and_router_get_gradients_and_aux_losses_recorded():
    model = tiny_llama(num_layers=2)
    upcycle_ffn(model, num_experts=4, top_k=2, router="threshold", threshold_eps=0.1)
    _perturb_experts(model)
    model.train()
    ids = token_batch()
    out = model(ids, labels=ids)
    (out.loss + moelora.aux_loss(model)).backward()
    moe = model.model.layers[0].mlp
    assert moe.router.weight.grad.abs().sum() > 0 and moe.w_gate.grad.abs().sum() > 0
    stats = moelora.router_stats(model)
    assert set(stats) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    for s in stats.values():
        assert 1.0 <= float(s["load"].sum()) <= 2.0  # threshold routing keeps 1..2 experts per token


def test_generic_two_linear_mlp_and_gpt2_conv1d():
    torch.manual_seed(0)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 20), nn.Linear(20, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

        def forward(self, x):
            return x + self.mlp(x)

    net = nn.Sequential(Block(), Block())
    x = torch.randn(2, 3, 8)
    expected = net(x)
    with pytest.raises(ValueError, match="needs in_proj, out_proj and activation"):
        upcycle_ffn(net, 2, 1, ffn_modules=["mlp"], in_proj="fc1")
    assert upcycle_ffn(net, 2, 1, ffn_modules=["mlp"], in_proj="fc1", out_proj="fc2",
                       activation=torch.relu) == ["0.mlp", "1.mlp"]
    assert isinstance(net[0].mlp, MoEFFN) and net[0].mlp.w_in.shape == (2, 20, 8)
    torch.testing.assert_close(net(x), expected, rtol=1e-6, atol=1e-6)

    gpt2 = tiny_gpt2()
    ids = token_batch()
    expected = gpt2(ids).logits
    upcycle_ffn(gpt2, 3, 1, ffn_modules=["mlp"], in_proj="c_fc", out_proj="c_proj",
                activation=gpt2.transformer.h[0].mlp.act)
    torch.testing.assert_close(gpt2(ids).logits, expected, rtol=1e-6, atol=1e-6)


def test_upcycle_errors():
    with pytest.raises(ValueError, match="top_k must be in"):
        upcycle_ffn(tiny_bert(), num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="no FFN found to upcycle"):
        upcycle_ffn(nn.Sequential(nn.Linear(2, 2)), num_experts=2, top_k=1)


@pytest.mark.parametrize("kwargs", [
    dict(router_aux_loss_coef=-1.0), dict(router_z_loss_coef=math.inf), dict(threshold_eps=-0.5),
    dict(threshold_eps=math.nan), dict(threshold_eps_start=-1), dict(threshold_ramp_steps=2.5),
    dict(router_jitter_noise=math.nan), dict(num_experts=4.0), dict(num_experts="4"), dict(top_k=2.0),
    dict(top_k="2"),
], ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_upcycle_ffn_and_moe_ffn_check_their_arguments_as_the_layers(kwargs):
    """upcycle_ffn and MoEFFN reject what the MoE-LoRA layers reject, with the layers' message,
    and upcycle_ffn before it changes the model (top_k=2.0 used to upcycle, then fail in the forward)."""
    call = {"num_experts": 4, "top_k": 2, **kwargs}
    with pytest.raises((TypeError, ValueError)) as layer_error:
        moelora.MoELoRALinear(nn.Linear(8, 8), **call)
    model = tiny_llama()
    before = repr(model)
    with pytest.raises(type(layer_error.value)) as error:
        upcycle_ffn(model, **call)
    assert str(error.value) == str(layer_error.value)
    assert repr(model) == before
    with pytest.raises(type(layer_error.value)) as error:
        MoEFFN(nn.Linear(8, 16), nn.Linear(16, 8), torch.relu, **call)
    assert str(error.value) == str(layer_error.value)


def test_get_moelora_model_keeps_upcycled_experts_trainable():
    model = tiny_bert()
    upcycle_ffn(model, num_experts=2, top_k=1)
    wrapped = moelora.get_moelora_model(model, moelora.MoELoRAConfig(target_modules=["query"], num_experts=3,
                                                                     router="task"))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert "model.encoder.layer.0.intermediate.w_in" in trainable
    assert "model.encoder.layer.0.attention.self.query.lora_gamma" in trainable
    assert "model.embeddings.word_embeddings.weight" not in trainable


def test_upcycle_refuses_moe_models_and_layers_holding_more_than_the_ffn_and_changes_nothing():
    """A model that is already MoE (Qwen2-MoE: its shared experts were upcycled silently) and a
    generic target holding more than the FFN (OPT's decoder layer holds fc1/fc2 itself: the whole
    layer, attention included, was replaced) raise naming the problem; so does a later target
    lacking a projection, and the model is left unchanged (earlier targets were replaced)."""
    from transformers import OPTConfig, OPTForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    moe = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                             moe_intermediate_size=8, shared_expert_intermediate_size=16,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             num_experts=4))
    with pytest.raises(ValueError, match="model.layers.0.mlp .Qwen2MoeSparseMoeBlock. is already a mixture of experts"):
        upcycle_ffn(moe, num_experts=2, top_k=1)
    assert not any(isinstance(m, MoEFFN) for m in moe.modules())
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                   num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match=r"holds parameters besides .*'final_layer_norm', 'self_attn.k_proj'"):
        upcycle_ffn(opt, 2, 1, ffn_modules=r"model\.decoder\.layers\.\d+", in_proj="fc1", out_proj="fc2",
                    activation=torch.relu)
    assert not any(isinstance(m, MoEFFN) for m in opt.modules())
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)), nn.Sequential(nn.Linear(4, 8)))
    with pytest.raises(ValueError, match="1 lacks one of"):
        upcycle_ffn(net, 2, 1, ffn_modules=r"\d", in_proj="0", out_proj="1", activation=torch.relu)
    assert not isinstance(net[0], MoEFFN)
