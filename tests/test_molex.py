"""MoLEx: the layer-mixing formula, gates, batch routing, learned alpha, losses, transformers stacks."""

import pytest
import torch
import torch.nn as nn

import moelora
from moelora.molex import MoLEx, apply_molex
from tiny_models import tiny_bert, tiny_llama, token_batch


class Stack(nn.Module):
    def __init__(self, num_layers=4, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(num_layers))

    def forward(self, z):
        for layer in self.layers:
            z = layer(z)
        return z


def _manual(stack, molex, z):
    """The MoLEx recursion written out with the gate's own choices."""
    for t, layer in enumerate(stack.layers):
        j, _, _, _, _ = molex.choose(z, t)
        a = molex.alpha
        z = z + a * (layer(z) - z) + (1 - a) * (stack.layers[j](z) - z)
    return z


@pytest.mark.parametrize("gate", ["linear", "cosine", "cosine_sigmoid"])
@pytest.mark.parametrize("shared_gate,batch_routing", [(True, "mode"), (False, "mean")])
def test_molex_follows_the_recursion(gate, shared_gate, batch_routing):
    stack = Stack()
    z = torch.randn(3, 5, 8)
    with torch.no_grad():
        molex = apply_molex(stack, hidden_size=8, gate=gate, shared_gate=shared_gate, proj_dim=4,
                            batch_routing=batch_routing, alpha=0.9)
        out = stack(z)
        molex.remove()
        plain = stack(z)
        molex._handles = []  # manual recursion runs the plain layers
        expected = _manual(stack, molex, z)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, plain)
    assert len(molex.gates) == (1 if shared_gate else 4)
    chosen = moelora.router_stats(stack)["molex"]["chosen_layers"]
    assert all(c != t for t, c in enumerate(chosen.tolist()))  # never the layer itself


def test_alpha_one_is_the_plain_stack_and_batch_choice_rules():
    stack = Stack()
    z = torch.randn(2, 6, 8)
    plain = stack(z)
    apply_molex(stack, hidden_size=8, alpha=1.0)
    torch.testing.assert_close(stack(z), plain)
    molex = stack.molex
    # mode: the most frequent token choice; mean: argmax of the mean gate probabilities
    with torch.no_grad():
        molex.gates[0].weight.zero_()
        molex.gates[0].weight[2, 0] = 10.0  # tokens with z[...,0] > 0 prefer layer 2
        molex.gates[0].weight[3, 0] = -10.0  # the others layer 3
    zz = torch.zeros(1, 5, 8)
    zz[0, :3, 0], zz[0, 3:, 0] = 0.01, -5.0  # 3 weak votes for layer 2, 2 strong ones for layer 3
    assert molex.choose(zz, 0)[0] == 2
    molex.batch_routing = "mean"
    assert molex.choose(zz, 0)[0] == 3


def test_gate_and_learned_alpha_get_gradients_and_lb_loss():
    stack = Stack()
    for p in stack.layers.parameters():
        p.requires_grad_(False)
    molex = apply_molex(stack, hidden_size=8, learn_alpha=True, alpha=0.8, aux_loss_coef=0.1)
    assert molex.alpha.item() == pytest.approx(0.8)
    out = stack(torch.randn(4, 8))
    lb = moelora.aux_loss(stack)
    (out.square().sum() + lb).backward()
    assert molex.alpha_logit.grad != 0 and molex.gates[0].weight.grad.abs().sum() > 0
    assert lb > 0 and len(molex._per_layer) == 4


def test_molex_on_bert_and_llama_stacks():
    bert = tiny_bert()
    ids = token_batch()
    plain = bert(ids).last_hidden_state
    apply_molex(bert, alpha=0.95)
    out = bert(ids).last_hidden_state
    assert out.shape == plain.shape and not torch.allclose(out, plain)
    llama = tiny_llama()
    apply_molex(llama, gate="cosine", proj_dim=4)
    out = llama(ids, labels=ids, use_cache=False)
    out.loss.backward()
    assert llama.molex.gates[0].proj.weight.grad is not None
    with pytest.raises(RuntimeError, match="use_cache=False"):
        llama(ids, use_cache=True)


def test_molex_with_moelora_model_and_errors():
    model = moelora.get_moelora_model(tiny_bert(), moelora.MoELoRAConfig(target_modules=["query"], num_experts=2,
                                                                         top_k=1))
    molex = apply_molex(model)
    assert isinstance(model.model.molex, MoLEx)
    model(token_batch())
    assert "molex" in moelora.router_stats(model)
    with pytest.raises(ValueError, match="already applied"):
        apply_molex(model)
    with pytest.raises(ValueError, match="gate must be one of"):
        apply_molex(Stack(), hidden_size=8, gate="dot")
    with pytest.raises(ValueError, match="batch_routing must be one of"):
        apply_molex(Stack(), hidden_size=8, batch_routing="max")
    with pytest.raises(ValueError, match="pass hidden_size"):
        apply_molex(Stack())
    molex.remove()
