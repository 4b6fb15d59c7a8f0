"""MoLEx: the layer-mixing formula, gates, batch routing, learned alpha, losses, transformers stacks."""

import copy
import gc
import math
import pickle

import pytest
import torch
import torch.nn as nn

import moelora
from moelora.modules.molex import MoLEx
from moelora.tuner.molex import apply_molex
from helpers import capture_training_step, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_batch


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
        chosen = moelora.router_stats(stack)["molex"]["chosen_layers"]
        molex.remove()
        plain = stack(z)
        molex._handles = []  # manual recursion runs the plain layers
        expected = _manual(stack, molex, z)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, plain)
    assert len(molex.gates) == (1 if shared_gate else 4)
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
        molex.gates[0].bias.zero_()  # the paper's linear gate has a bias
        molex.gates[0].weight[2, 0] = 10.0  # tokens with z[...,0] > 0 prefer layer 2
        molex.gates[0].weight[3, 0] = -10.0  # the others layer 3
    zz = torch.zeros(1, 5, 8)
    zz[0, :3, 0], zz[0, 3:, 0] = 0.01, -5.0  # 3 weak votes for layer 2, 2 strong ones for layer 3
    assert molex.choose(zz, 0)[0] == 2
    molex.batch_routing = "mean"
    assert molex.choose(zz, 0)[0] == 3


@pytest.mark.parametrize("batch_routing", ["mode", "mean"])
def test_a_batch_without_real_tokens_never_chooses_the_layer_itself(batch_routing):
    """Where no token is real every layer's score is 0 (argmax: the first layer), yet layer t still
    mixes in another layer, never itself: layer 0 too."""
    stack = Stack()
    molex = apply_molex(stack, hidden_size=8, batch_routing=batch_routing, shared_gate=False, alpha=0.9)
    z, real = torch.randn(6, 8), torch.zeros(6, dtype=torch.bool)
    with torch.no_grad():
        for t in range(len(stack.layers)):
            assert molex.choose(z, t, real=real)[0].item() != t
            assert molex.choose(z, t, real=~real)[0].item() != t


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("gate,learn_alpha", [("linear", False), ("cosine", True)])
def test_gates_and_alpha_are_fp32_whatever_the_default_dtype(default, gate, learn_alpha):
    """The gates and alpha are fp32 whatever the model's dtype (apply_molex), also where the default
    dtype is set (torch.set_default_dtype(torch.bfloat16) to build a model in bf16): they were made
    in the default dtype, so bf16 gates (an optimiser's small steps lost to bf16 rounding) drawn
    from another random stream. Now fp32, and the same seed gives the gates of a default-fp32 build;
    the bf16 model then runs with them."""
    reference, stack = Stack(), Stack().to(default)
    torch.manual_seed(1)
    expected = apply_molex(reference, hidden_size=8, gate=gate, learn_alpha=learn_alpha, alpha=0.8)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        torch.manual_seed(1)
        molex = apply_molex(stack, hidden_size=8, gate=gate, learn_alpha=learn_alpha, alpha=0.8)
    finally:
        torch.set_default_dtype(previous)
    tensors = dict((*molex.named_parameters(), *molex.named_buffers()))
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
    for name, t in (*expected.named_parameters(), *expected.named_buffers()):
        torch.testing.assert_close(tensors[name], t, rtol=0, atol=0)
    z = torch.randn(2, 3, 8, dtype=default)
    assert stack(z).dtype == default


@pytest.mark.parametrize("batch_routing", ["mode", "mean"])
@pytest.mark.parametrize("shape", [(0, 5, 8), (3, 0, 8), (0, 8)], ids=["batch_0", "seq_0", "tokens_0"])
def test_a_batch_without_tokens_gives_zero_stats_and_loss_as_one_without_real_tokens(shape, batch_routing):
    """A forward over no tokens (an empty batch or sequence): the routing entropy was the mean over
    no tokens, NaN, in router_stats (its load and load-balancing loss are 0, as for a padded batch
    with no real token); now 0 like them. The output is empty and the backward runs."""
    stack = Stack()
    molex = apply_molex(stack, hidden_size=8, batch_routing=batch_routing, learn_alpha=True)
    z = torch.randn(shape, requires_grad=True)
    out = stack(z)
    (out.sum() + molex.last_aux_loss).backward()
    stats = moelora.router_stats(stack)["molex"]
    assert out.shape == z.shape and z.grad.shape == z.shape
    assert torch.equal(stats["entropy"], torch.zeros(())) and torch.equal(stats["load"], torch.zeros(4))
    assert torch.equal(molex.last_aux_loss.detach(), torch.zeros(()))
    assert all(torch.isfinite(p.grad).all() for p in molex.parameters() if p.grad is not None)


class _Failing(nn.Linear):
    """A layer whose forward raises while ``fail`` is set, if its ``_raises`` is (an out-of-memory error
    mid-stack; private, so the layers stay alike for device selection)."""

    fail = False

    def forward(self, z):
        if _Failing.fail and self._raises:
            raise RuntimeError("out of memory")
        return super().forward(z)


def test_a_copy_after_a_forward_that_raised_mid_stack_starts_without_its_stacked_layers():
    """Device selection stacks the layers' tensors at layer 0 and drops the stack after the last layer;
    a forward that raised in between (an out-of-memory error) left the stack, with its autograd
    graph, on the MoLEx: copy.deepcopy of the model then raised (deepcopy refuses non-leaf tensors)
    and pickling carried the stacked copies. Copies now start without it (as without a routing
    record), and compute what the original computes."""
    stack = Stack(num_layers=3)
    stack.layers = nn.ModuleList(_Failing(8, 8) for _ in range(3))
    for t, layer in enumerate(stack.layers):
        layer._raises = t == 1
    molex = apply_molex(stack, hidden_size=8, layer_selection="device")
    z = torch.randn(2, 3, 8)
    _Failing.fail = True
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            stack(z)
    finally:
        _Failing.fail = False
    for clone in (copy.deepcopy(stack), pickle.loads(pickle.dumps(stack))):
        assert clone.molex._stacked is None
        torch.testing.assert_close(clone(z), stack(z), rtol=0, atol=0)
    assert molex._stacked is None  # the original's next forward ended it


def _reference64(stack, molex, z):
    """The MoLEx recursion of a shared gate with "mode" routing in float64, written from the formula (not
    with molex.choose): logits W x + b (linear), cos(P x + b, e_l) / temperature (cosine gates), gate
    values g = softmax (sigmoid for cosine_sigmoid) of the logits with the own layer masked, j the most
    frequent token choice, u_j scaled by g[:, j] / stopgrad(g[:, j]) computed as exp(log g - stopgrad(log g))
    (the same value and gradient, finite where g underflows)."""
    gate, a = molex.gates[0], molex.alpha.double()
    for t, layer in enumerate(stack.layers):
        x = z.reshape(-1, z.shape[-1])
        if gate.gate == "linear":
            logits = x @ gate.weight.double().T + (0 if gate.bias is None else gate.bias.double())
        else:
            proj_bias = 0 if gate.proj.bias is None else gate.proj.bias.double()
            proj = nn.functional.normalize(x @ gate.proj.weight.double().T + proj_bias, dim=-1)
            logits = proj @ nn.functional.normalize(gate.layer_embeddings.double(), dim=-1).T / gate.temperature
        logits = logits.masked_fill(torch.arange(len(stack.layers)) == t, -math.inf)
        log_g = nn.functional.logsigmoid(logits) if gate.gate == "cosine_sigmoid" else logits.log_softmax(-1)
        votes = torch.bincount(log_g.argmax(-1), minlength=len(stack.layers))
        j = int(votes.masked_fill(torch.arange(len(stack.layers)) == t, -1).argmax())
        st = torch.exp(log_g[:, j] - log_g[:, j].detach()).reshape(*z.shape[:-1], 1)
        z = z + a * (layer(z) - z) + (1 - a) * (stack.layers[j](z) - z) * st
    return z


def _check_against_reference64(stack, z, run=None, loss=torch.sum):
    """``stack`` (MoLEx applied, one shared gate, "mode" routing) on z against the float64 recursion
    (_reference64) of a copy: the output and the gradients of ``loss`` of it with respect to z, the layers, the
    gate and alpha. ``run(x)``: how the output is computed (default: stack(x)). Returns the float64 output."""
    reference = copy.deepcopy(stack).double()
    reference_molex = reference.molex
    reference_molex.remove()  # the reference runs the plain layers
    outputs, grads = [], []
    for model, dtype in ((stack, torch.float32), (reference, torch.float64)):
        x = z.to(dtype).detach().requires_grad_(True)
        out = (run or stack)(x) if model is stack else _reference64(reference, reference_molex, x)
        loss(out).backward()
        outputs.append(out)
        params = [*model.parameters()] if model is stack else [*reference.parameters(), *reference_molex.parameters()]
        grads.append([x.grad, *(p.grad for p in params)])
    torch.testing.assert_close(outputs[0].double(), outputs[1].detach(), rtol=1e-5, atol=1e-6)
    for got, expected in zip(*grads):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    return outputs[1].detach()


@pytest.mark.parametrize("selection", ["host", "device"])
@pytest.mark.parametrize("gate", ["linear", "cosine", "cosine_sigmoid"])
def test_a_token_whose_gate_value_for_the_chosen_layer_underflows_stays_finite(gate, selection):
    """The straight-through factor g[t, j] / stopgrad(g[t, j]) was 0 / 0 = NaN (output and every
    gradient) for a token whose fp32 gate value for the batch's layer j underflows to 0: its logit
    for j more than ~104 below its best (a linear gate on the large hidden states of a trained LLM,
    a cosine gate with a small temperature). Against the float64 recursion (_reference64): the
    forward and the gradients of z, the layers, the gate and alpha."""
    stack = Stack(num_layers=3, d=4)
    molex = apply_molex(stack, hidden_size=4, gate=gate, layer_selection=selection, learn_alpha=True,
                        temperature=0.005, proj_dim=4, bias=False)
    with torch.no_grad():  # tokens with z[..., 0] > 0 prefer layer 1, the others layer 2, by a wide margin
        g = molex.gates[0]
        if gate == "linear":
            g.weight.copy_(torch.tensor([[0.0, 1, 1, 1], [50, 0, 0, 0], [-50, 0, 0, 0]]) + 0.1 * torch.randn(3, 4))
        else:
            g.proj.weight.copy_(torch.eye(4) + 0.01 * torch.randn(4, 4))
            g.layer_embeddings.copy_(torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [-1, 0, 0, 0]]))
    z = 0.1 * torch.randn(2, 5, 4)
    z[..., 0] = torch.tensor([3.0, 3, 3, -3, -3]).repeat(2, 1)  # 6 votes for layer 1, 4 for layer 2 (at layer 0)
    expected = _check_against_reference64(stack, z)
    assert 1 in moelora.router_stats(stack)["molex"]["chosen_layers"].tolist()
    assert torch.isfinite(expected).all()


def test_a_stack_holding_one_module_twice_is_refused_naming_the_positions():
    """A weight-shared stack (one module at several positions of the ModuleList): each position
    registered its mixing hook on the same module, so every call of it was mixed once per
    position (twice here, with the other position's t), silently. Refused before the model
    changes, naming the positions."""
    stack = Stack(num_layers=3)
    stack.layers[2] = stack.layers[0]
    with pytest.raises(ValueError, match=r"layers 0 and 2 are the same module"):
        apply_molex(stack, hidden_size=8)
    assert not hasattr(stack, "molex") and not stack.layers[0]._forward_hooks


def test_gate_and_learned_alpha_get_gradients_and_lb_loss():
    stack = Stack()
    for p in stack.layers.parameters():
        p.requires_grad_(False)
    molex = apply_molex(stack, hidden_size=8, learn_alpha=True, alpha=0.8, aux_loss_coef=0.1)
    assert molex.alpha.item() == pytest.approx(0.8)
    out = stack(torch.randn(4, 8))
    lb = moelora.aux_loss(stack)
    (out.square().sum() + lb).backward()
    assert molex.alpha_logit.grad is not None and molex.alpha_logit.grad != 0  # None != 0 held too
    assert molex.gates[0].weight.grad.abs().sum() > 0
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
    # the model's default use_cache: the mixing calls run without the cache, same result
    cached = llama(ids)
    torch.testing.assert_close(cached.logits, llama(ids, use_cache=False).logits)
    with pytest.raises(RuntimeError, match="cannot decode from a KV cache"):
        llama(ids[:, -1:], past_key_values=cached.past_key_values)


def test_molex_on_gpt2_keeps_the_positional_cache_out_of_the_mixing_calls():
    """GPT-2's blocks take the KV cache positionally: the mixing calls run without it too, so the
    default use_cache changes nothing, the cache holds each layer's own keys only, and decoding
    from it raises."""
    model = tiny_gpt2(num_layers=3)
    ids = token_batch(seq=7)
    apply_molex(model, alpha=0.8)
    with torch.no_grad():
        cached = model(ids, use_cache=True)
        torch.testing.assert_close(cached.logits, model(ids, use_cache=False).logits, rtol=0, atol=0)
    assert [cached.past_key_values.get_seq_length(t) for t in range(3)] == [7, 7, 7]
    with pytest.raises(RuntimeError, match="cannot decode from a KV cache"):
        model(ids[:, -1:], past_key_values=cached.past_key_values)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("selection", ["device", "host"])
@pytest.mark.parametrize("hooks_first", [False, True], ids=["applied_first", "recorded_first"])
def test_output_hidden_states_and_attentions_are_the_stacks_own(model_name, selection, hooks_first):
    """transformers (>= 5) records hidden states and attention maps with forward hooks on the
    layers and their attention modules: the mixing calls were recorded too (2 L attention maps,
    2 L + 1 hidden states, the mixing calls' between the layers'), and where those hooks came
    first (a forward with output_hidden_states before apply_molex) hidden_states held each
    layer's own output, not the mixed one the next layer takes. Now L maps, the L + 1 hidden
    states the next layers take (a hook added after apply_molex sees the same), and with alpha=1
    (the mixing adds 0) both equal the plain model's."""
    model = tiny_llama(num_layers=3) if model_name == "llama" else tiny_gpt2(num_layers=3)
    model.config._attn_implementation = "eager"  # attention maps
    stack = model.model.layers if model_name == "llama" else model.transformer.h
    ids = token_batch(seq=6)
    flags = dict(output_hidden_states=True, output_attentions=True, use_cache=False)
    with torch.no_grad():
        if hooks_first:
            model(ids, **flags)
        molex = apply_molex(model, alpha=0.6, layer_selection=selection)
        _sharpen(molex)
        mixed = []  # each layer's output as the next layer takes it (a hook after MoLEx's, mixing calls aside)
        handles = [layer.register_forward_hook(
            lambda m, a, out: None if molex._calling_other else mixed.append(out[0] if isinstance(out, tuple) else out))
            for layer in stack]
        out = model(ids, **flags)
        assert len(out.attentions) == 3 and len(out.hidden_states) == 4 and len(mixed) == 3
        for t in range(2):  # the last hidden state is the final norm's output
            torch.testing.assert_close(out.hidden_states[t + 1], mixed[t], rtol=0, atol=0)
        for h in handles:
            h.remove()
        molex.alpha_value.fill_(1.0)  # the mixing adds 0 * u_j: the plain model's maps and states
        same = model(ids, **flags)
    molex.remove()
    with torch.no_grad():
        plain = model(ids, **flags)
    for got, expected in zip((same.attentions, same.hidden_states), (plain.attentions, plain.hidden_states)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


def test_a_plain_stack_compiles_fullgraph_where_transformers_is_imported():
    """The mixing call's look-up of transformers' output recorder (above) traces in a compiled
    graph outside a transformers model (ContextVar.get, which dynamo cannot trace, is not read)."""
    import transformers.utils.output_capturing  # noqa: F401

    torch._dynamo.reset()
    stack = Stack(num_layers=3)
    apply_molex(stack, hidden_size=8, layer_selection="device")
    z = torch.randn(2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(stack, fullgraph=True, backend="eager")(z), stack(z))
    torch._dynamo.reset()


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


@pytest.mark.parametrize("copied", [False, True])
def test_a_deleted_model_with_molex_is_freed_without_the_garbage_collector(copied):
    """MoLEx held the layer stack it mixes and (for apply_molex's undo) the model, whose hooks hold the MoLEx: every
    model with MoLEx was a reference cycle, whose memory (GPU memory included) ``del model`` left for the garbage
    collector's next full pass. It holds them weakly now; a copy (copy.deepcopy, pickling) mixes its own layers and
    removes itself from its own model, and is freed likewise."""
    import weakref

    ids = token_batch(seq=7)
    model = tiny_llama(num_layers=3)
    apply_molex(model)
    if copied:
        original = model
        model = pickle.loads(pickle.dumps(copy.deepcopy(model)))
        assert model.molex._layers() is model.model.layers
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    model.train()
    model(ids, labels=ids).loss.backward()
    freed = [weakref.ref(model), weakref.ref(model.molex), weakref.ref(model.model.layers[0].mlp.up_proj.weight)]
    gc.collect()
    gc.disable()
    try:
        del model
        assert [ref() is None for ref in freed] == [True] * len(freed)
    finally:
        gc.enable()


def test_remove_undoes_apply_molex(tmp_path):
    """remove() leaves the model as before apply_molex: its outputs, no MoLEx loss or statistics,
    no model.molex, checkpoints that do not replay apply_molex, and apply_molex works again."""
    ids = token_batch(seq=7)
    model = tiny_llama(num_layers=3)
    plain = model(ids).logits
    molex = apply_molex(model, alpha=0.8)
    model(ids)
    molex.remove()
    molex.remove()  # a second call does nothing
    assert not model._forward_pre_hooks and not model.model._forward_hooks  # the attention-mask hooks too
    assert torch.equal(model(ids).logits, plain)
    assert not hasattr(model, "molex")
    assert moelora.aux_loss(model).item() == 0 and moelora.router_stats(model) == {}
    wrapped = moelora.get_moelora_model(model, moelora.MoELoRAConfig(target_modules=["q_proj"], num_experts=2,
                                                                     top_k=1))
    randomize_adapters(wrapped)
    expected = wrapped(ids).logits
    wrapped.save_pretrained(str(tmp_path))
    loaded = moelora.from_pretrained(tiny_llama(num_layers=3), str(tmp_path))
    assert not hasattr(loaded.model, "molex")
    assert torch.equal(loaded(ids).logits, expected)
    again = apply_molex(wrapped, alpha=0.8)
    assert wrapped.model.molex is again and not torch.equal(wrapped(ids).logits, expected)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(aux_loss_coef=-1.0), ValueError, r"^aux_loss_coef must be a finite number >= 0, got -1.0$"),
    (dict(aux_loss_coef=math.nan), ValueError, r"^aux_loss_coef must be a finite number >= 0, got nan$"),
    (dict(gate="cosine", temperature=0.0), ValueError, r"^temperature must be a finite number > 0, got 0.0$"),
    (dict(gate="cosine", proj_dim=-2), ValueError, r"^proj_dim must be a positive int or None \(hidden_size\)"),
    (dict(gate="cosine", proj_dim=0), ValueError, r"^proj_dim must be a positive int or None \(hidden_size\)"),
    (dict(gate="cosine", proj_dim=4.0), TypeError, r"^proj_dim must be a positive int .*got float 4.0$"),
    (dict(alpha="0.9"), TypeError, r"^alpha must be a number in \[0, 1\], got str '0.9'$"),
    (dict(alpha=1.5), ValueError, r"^alpha must be a number in \[0, 1\], got 1.5$"),
    (dict(shared_gate="no"), TypeError, r"^shared_gate must be a bool, got str 'no'$"),
    (dict(learn_alpha=1), TypeError, r"^learn_alpha must be a bool, got int 1$"),
    (dict(bias="yes"), TypeError, r"^bias must be a bool or None \(the gate's default\), got str 'yes'$"),
    (dict(hidden_size=8.0), TypeError, r"^hidden_size must be a positive int, got float 8.0$"),
    (dict(hidden_size="8"), TypeError, r"^hidden_size must be a positive int, got str '8'$"),
    (dict(batch_routing=0), TypeError, r"^batch_routing must be one of \('mode', 'mean'\), got int 0$"),
    (dict(batch_routing="max"), ValueError, r"^batch_routing must be one of \('mode', 'mean'\), got 'max'$"),
    (dict(layer_selection=None), TypeError,
     r"^layer_selection must be one of \('auto', 'device', 'host'\), got NoneType None$"),
], ids=lambda v: ",".join(f"{k}={x!r}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_apply_molex_checks_its_arguments_before_changing_the_model(kwargs, error, match):
    stack = Stack()
    with pytest.raises(error, match=match):
        apply_molex(stack, **{"hidden_size": 8, **kwargs})
    assert not hasattr(stack, "molex") and not stack.layers[0]._forward_hooks


def test_a_hidden_size_other_than_the_models_width_raises_naming_both():
    llama = tiny_llama()  # its layers declare their width: checked when applied
    with pytest.raises(ValueError, match=r"hidden_size=8 does not match the model's width: its layers take hidden "
                                         r"states of width 16 \(pass hidden_size=16 or leave it out\)"):
        apply_molex(llama, hidden_size=8)
    assert not hasattr(llama, "molex")
    stack = Stack(d=8)  # plain layers: checked at the first forward, before the gate multiplies
    apply_molex(stack, hidden_size=16)
    with pytest.raises(ValueError, match=r"MoLEx was applied with hidden_size=16, but the model's hidden states are "
                                         r"8 wide: apply it with hidden_size=8"):
        stack(torch.randn(2, 8))


# ------------------------------------------------------------------ MoLEx as published
def test_llama_3_2_1b_trainable_parameter_count_matches_the_paper():
    """LoRA r 8 on q_proj and v_proj of Llama-3.2-1B: 851,968; with MoLEx's shared linear gate
    (nn.Linear(2048, 16) with its bias): 884,752, the paper's count. Built on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
    with torch.device("meta"):
        model = moelora.get_moelora_model(LlamaForCausalLM(cfg), moelora.MoELoRAConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], num_experts=1))
    assert model.get_nb_trainable_parameters()[0] == 851_968
    apply_molex(model, gate="linear", shared_gate=True)
    assert model.get_nb_trainable_parameters()[0] == 884_752


def _lora_llama(num_layers=3):
    model = moelora.get_moelora_model(tiny_llama(num_layers=num_layers), moelora.MoELoRAConfig(
        target_modules=["q_proj", "v_proj"], num_experts=3, top_k=2, r=4))
    randomize_adapters(model)
    return model


def test_device_selection_equals_host_selection_in_outputs_and_gradients():
    ids = token_batch()
    grads, outputs = [], []
    for selection in ("host", "device"):
        model = _lora_llama()
        apply_molex(model, gate="linear", layer_selection=selection, learn_alpha=True)
        model.train()
        out = model(ids, labels=ids)
        out.loss.backward()
        outputs.append(out.loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        stats = moelora.router_stats(model)
    torch.testing.assert_close(outputs[1], outputs[0])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
    # routed layers report their own call, not the mixing calls that ran their code
    assert stats["model.layers.0.self_attn.q_proj"]["load"].sum() == pytest.approx(2.0)


def test_device_selection_reads_nothing_on_the_host(monkeypatch):
    stack = Stack()
    molex = apply_molex(stack, hidden_size=8, layer_selection="device", learn_alpha=True)
    z = torch.randn(3, 5, 8)

    def host_read(*args, **kwargs):
        raise AssertionError("a value was read on the host")

    for name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    out = stack(z)
    (out.square().sum() + molex.last_aux_loss).backward()
    monkeypatch.undo()
    assert molex.alpha_logit.grad != 0


def test_device_selection_needs_uniform_layers_and_auto_falls_back():
    model = moelora.get_moelora_model(tiny_llama(num_layers=4), moelora.MoELoRAConfig(
        target_modules=["q_proj"], num_experts="2468", top_k=2))
    molex = apply_molex(model, layer_selection="auto")
    model(token_batch())  # per-layer expert counts differ: the host path runs
    molex.layer_selection = "device"
    with pytest.raises(ValueError, match="needs layers with the same parameter"):
        model(token_batch())
    with pytest.raises(ValueError, match="layer_selection must be one of"):
        apply_molex(Stack(), hidden_size=8, layer_selection="gpu")
    uniform = _lora_llama()  # alike but for layer_idx (the KV-cache slot): device selection
    assert apply_molex(uniform, layer_selection="auto")._device_selection(uniform.model.model.layers)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_changes_no_gradient(use_reentrant):
    """Checkpointed layers recompute in backward with their own parameters, so device selection
    (layer t's code on layer j's slice) cannot run them: "auto" takes the host path, whose
    gradients equal those without checkpointing, and "device" raises."""
    import warnings

    ids = token_batch(seq=7)
    results = []
    for checkpointing in (False, True):
        model = tiny_llama(num_layers=3)
        molex = apply_molex(model, alpha=0.7, layer_selection="auto")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' deprecation notes
            out = model(ids, labels=ids, use_cache=False)
            out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (ckpt_loss, ckpt_grads) = results
    torch.testing.assert_close(ckpt_loss, loss)
    assert ckpt_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not molex._device_selection(model.model.layers)
    with torch.no_grad():  # nothing is checkpointed without gradients: device selection runs
        assert molex._device_selection(model.model.layers)
    molex.layer_selection = "device"
    with pytest.raises(ValueError, match="cannot run gradient-checkpointed layers"):
        model(ids, labels=ids, use_cache=False)


@pytest.mark.parametrize("differs", [
    dict(lora_alpha=64.0), dict(use_rslora=True), dict(router="topk_softmax"), dict(top_k=1),
    dict(router_renormalize=False), dict(router="threshold", threshold_eps=0.3), dict(lora_dropout=0.1),
    dict(lora_a_dropout=0.1), dict(router_jitter_noise=0.1)], ids=lambda d: ",".join(d))
def test_auto_selection_falls_back_to_host_where_layer_settings_differ(differs):
    """Device selection runs layer t's code with layer j's tensors: layers with the same tensor
    shapes but other settings (scaling, routing, dropout, ...) take the host path under "auto",
    whose outputs it then equals; "device" refuses them."""
    z = torch.randn(2, 5, 8)
    outputs = []
    for selection in ("auto", "host"):
        stack = Stack(num_layers=3)
        stack.layers = nn.ModuleList(
            moelora.MoELoRALinear(layer, **{**dict(num_experts=3, top_k=2, r=4, share_lora_a=True),
                                            **(differs if t == 1 else {})})
            for t, layer in enumerate(stack.layers))
        randomize_adapters(stack)
        molex = apply_molex(stack, hidden_size=8, layer_selection=selection)
        with torch.no_grad():
            molex.gates[0].weight.normal_(generator=torch.Generator().manual_seed(1))
            outputs.append(stack.eval()(z))
            assert not molex._device_selection(stack.layers)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    molex.layer_selection = "device"
    with pytest.raises(ValueError, match="same non-tensor attributes"):
        stack(z)


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "left_padded"])
def test_molex_trains_under_fullgraph_compile_like_eager(padded):
    """Also with a left-padded batch: the hooks that read the attention mask trace into the graph."""
    from test_compile import _assert_trains_like_eager

    torch._dynamo.reset()
    model = _lora_llama(num_layers=2)
    _sharpen(apply_molex(model, gate="linear", learn_alpha=True))
    model.train()
    ids = token_batch(batch=2, seq=6)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    def loss_fn(m, ids):  # default use_cache; aux losses added by the wrapper
        if padded:
            return m(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        return m(input_ids=ids, labels=ids).loss

    with moelora.validation(False):
        _assert_trains_like_eager(model, loss_fn, ids)
    torch._dynamo.reset()


def test_checkpoints_of_the_bias_free_gate_still_load(tmp_path):
    """Records written before the gate had a bias replay without one."""
    import json

    model = moelora.get_moelora_model(tiny_bert(num_layers=2), moelora.MoELoRAConfig(target_modules=["query"]))
    apply_molex(model, gate="linear", bias=False)
    ids = token_batch()
    expected = model.eval()(ids).last_hidden_state
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "moelora_config.json"
    saved = json.loads(path.read_text())
    del saved["structure"][0]["kwargs"]["bias"]  # as written by earlier versions
    path.write_text(json.dumps(saved))
    loaded = moelora.from_pretrained(tiny_bert(num_layers=2), str(tmp_path))
    assert loaded.model.molex.gates[0].bias is None
    assert torch.equal(loaded(ids).last_hidden_state, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_molex_forward_backward_replays_in_a_cuda_graph():
    import copy

    torch.manual_seed(0)
    stack = Stack(d=32).cuda()
    molex = apply_molex(stack, hidden_size=32, layer_selection="device", learn_alpha=True)
    eager = copy.deepcopy(stack)

    def step(s, x):
        loss = s(x).square().mean() + moelora.aux_loss(s)
        loss.backward()
        return loss

    static_x = torch.randn(64, 32, device="cuda")
    graph, static_loss = capture_training_step(stack, lambda: step(stack, static_x))
    for seed in (1, 2):
        x = torch.randn(64, 32, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
        static_x.copy_(x)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        torch.testing.assert_close(static_loss, step(eager, x), rtol=1e-4, atol=1e-5)
        for p, q in zip(stack.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    assert molex.alpha_logit.grad is not None


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("selection", ["auto", "host"])
def test_fsdp2_sharding_the_layers_one_by_one_is_refused_and_the_whole_stack_works(selection):
    """FSDP2 with fully_shard on each layer of the stack: device selection stacked layers whose
    parameters are sharded outside their own forward (a DTensor error), and host selection runs
    layer j, chosen by each rank from its own batch, so ranks gathered different layers and hung
    (two gloo ranks: tests/test_distributed.py's set-up). Both now raise, saying to shard the stack
    as one unit; fully_shard on the model alone gives the unsharded model's loss. World size 1."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ids = token_batch(batch=2, seq=5)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        per_layer = tiny_llama(num_layers=3)
        apply_molex(per_layer, layer_selection=selection)
        for layer in per_layer.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(per_layer, mesh=mesh)
        with pytest.raises(RuntimeError, match="FSDP2 shards one by one"):
            per_layer(input_ids=ids, labels=ids)

        whole = tiny_llama(num_layers=3)
        apply_molex(whole, layer_selection=selection)
        expected = whole(input_ids=ids, labels=ids).loss
        fully_shard(whole, mesh=mesh)
        torch.testing.assert_close(whole(input_ids=ids, labels=ids).loss, expected)
    finally:
        dist.destroy_process_group()


def test_find_layer_stack_skips_the_sublayers_inside_a_layer():
    """T5's blocks hold their sublayers in a ModuleList named ``layer`` (the decoder's has 3:
    self-attention, cross-attention, FFN): the longest such list was taken as the stack, and
    MoLEx then mixed a block's attention with its FFN (a TypeError at the first forward)."""
    from helpers import tiny_t5
    from moelora.tuner.molex import find_layer_stack

    model = tiny_t5()
    with pytest.raises(ValueError, match=r"several layer stacks \(encoder\.block, decoder\.block\)"):
        find_layer_stack(model)
    assert find_layer_stack(model, "encoder.block") is model.encoder.block


def test_a_layers_name_the_model_does_not_have_is_a_value_error_naming_layers():
    """apply_molex(model, layers="typo") raised torch's AttributeError ('... has no attribute `typo`'), which names
    neither the argument nor the stacks there are; now a ValueError naming both, before the model changes."""
    from helpers import tiny_t5

    model = tiny_t5()
    with pytest.raises(ValueError, match=r"^layers='encoder\.blocks' names no module of the model; its module lists "
                                         r"are \['encoder\.block', 'decoder\.block'\]$"):
        moelora.apply_molex(model, layers="encoder.blocks")
    with pytest.raises(ValueError, match=r"^layers='encoder' is a T5Stack, not an nn.ModuleList of layers"):
        moelora.apply_molex(model, layers="encoder")
    assert not hasattr(model, "molex")


def test_an_encoder_decoder_model_needs_the_stack_named():
    """T5 has two stacks: apply_molex took the encoder's without saying so. It now raises naming
    both, before changing the model; ``layers=`` picks either, and the decoder's mixes with its
    own attention mask (``decoder_attention_mask``), not the encoder's."""
    from helpers import tiny_t5

    ids, dec = token_batch(seq=6), token_batch(seq=4, seed=3)
    for name in ("encoder.block", "decoder.block"):
        model = tiny_t5()
        with pytest.raises(ValueError, match=r"pass layers='encoder\.block' or layers='decoder\.block'"):
            apply_molex(model)
        assert not hasattr(model, "molex") and not model.encoder.block[0]._forward_hooks
        with torch.no_grad():
            plain = model(input_ids=ids, decoder_input_ids=dec).logits
            molex = apply_molex(model, layers=name, alpha=0.5)
            _sharpen(molex)
            out = model(input_ids=ids, decoder_input_ids=dec).logits
            assert not torch.allclose(out, plain)
            assert molex._layers() is model.get_submodule(name)
            # the stack's own mask reaches it: 3 pad columns at the end of that stack's input
            pad_ids, mask = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1), torch.ones(2, 9, dtype=torch.long)
            mask[:, 6:] = 0
            pad_dec, dec_mask = torch.cat([dec, torch.zeros(2, 3, dtype=torch.long)], 1), mask[:, 2:]
            padded = (model(input_ids=pad_ids, attention_mask=mask, decoder_input_ids=dec).logits if name[0] == "e"
                      else model(input_ids=ids, decoder_input_ids=pad_dec, decoder_attention_mask=dec_mask).logits)
        torch.testing.assert_close(padded[:, :4], out)


# ------------------------------------------------------------------ padded batches
def _sharpen(molex, seed=3, scale=3.0):
    """Gate weights large enough that the layer choice follows the tokens (pads included)."""
    with torch.no_grad():
        for gate in molex.gates:
            gate.weight.normal_(0, scale, generator=torch.Generator().manual_seed(seed))


def _left_padded(seqs, extra=0, pad_id=0):
    """(ids, attention_mask, position_ids) of ``seqs`` left-padded to the longest plus ``extra``."""
    width = max(len(s) for s in seqs) + extra
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):], mask[b, width - len(s):] = s, 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _prompts(lengths=(6, 3), seed=10):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("batch_routing", ["mode", "mean"])
@pytest.mark.parametrize("selection", ["device", "host"])
def test_pad_tokens_change_no_real_token_and_no_routing_statistic(batch_routing, selection):
    """Left-padded batches (as transformers' generate builds them): the pads voted in the batch's
    layer choice and counted in the load-balancing loss and statistics, so a sequence's output
    changed with the padding of its batch (the last layer chose another layer with 8 more pad
    columns). The attention mask the model takes now keeps them out: the real tokens' logits, the
    aux loss and the statistics do not depend on the padding, and a padded sequence alone gives
    what it gives unpadded."""
    model = tiny_llama(num_layers=4)
    molex = apply_molex(model, alpha=0.5, batch_routing=batch_routing, layer_selection=selection)
    _sharpen(molex)
    seqs = _prompts()
    results = []
    with torch.no_grad():
        for extra in (0, 8):
            ids, mask, pos = _left_padded(seqs, extra)
            logits = model(ids, attention_mask=mask, position_ids=pos).logits
            stats = moelora.router_stats(model)["molex"]
            results.append(([logits[b, -len(s):] for b, s in enumerate(seqs)], molex.last_aux_loss, stats))
        (real, loss, stats), (padded_real, padded_loss, padded_stats) = results
        for a, b in zip(padded_real, real):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(padded_loss, loss)
        for key in ("load", "entropy", "chosen_layers"):
            torch.testing.assert_close(padded_stats[key], stats[key], msg=key)
        alone = model(seqs[1][None]).logits[0]
        alone_loss = molex.last_aux_loss
        ids, mask, pos = _left_padded(seqs[1:], extra=8)
        torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=pos).logits[0, -3:], alone)
        torch.testing.assert_close(molex.last_aux_loss, alone_loss)


class _MaskedStack(Stack):
    """A Stack whose forward takes the attention_mask (apply_molex reads the padding from it)."""

    def forward(self, z, attention_mask=None):
        return super().forward(z)


@pytest.mark.parametrize("batch_routing", ["mode", "mean"])
@pytest.mark.parametrize("selection", ["device", "host"])
def test_non_finite_padding_rows_take_no_part_in_the_layer_choice(batch_routing, selection):
    """Padding rows of NaN or inf (as a fully masked attention row can give): "mean" routing summed
    the gate values times the mask, NaN * 0 = NaN, so the batch's score was NaN and argmax took the
    first layer whatever the real tokens chose (an inf row gives NaN gate values too). The choice,
    the aux loss, the statistics and the real tokens' outputs now equal those of the same batch
    with finite padding."""
    stack = _MaskedStack()
    molex = apply_molex(stack, hidden_size=8, batch_routing=batch_routing, layer_selection=selection)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :3] = 0
    z = torch.randn(2, 6, 8)
    with torch.no_grad():
        out = stack(z, attention_mask=mask)
        loss, stats = molex.last_aux_loss, moelora.router_stats(stack)["molex"]
        for pad in (float("nan"), float("inf")):
            padded = z.clone()
            padded[0, :3] = pad
            padded_out = stack(padded, attention_mask=mask)
            padded_stats = moelora.router_stats(stack)["molex"]
            torch.testing.assert_close(padded_stats["chosen_layers"], stats["chosen_layers"], msg=str(pad))
            torch.testing.assert_close(padded_out[mask.bool()], out[mask.bool()])
            torch.testing.assert_close(molex.last_aux_loss, loss)
            for key in ("load", "entropy"):
                torch.testing.assert_close(padded_stats[key], stats[key], msg=key)


def test_batched_greedy_generate_does_not_depend_on_the_padding():
    """generate left-pads a batch to its longest prompt and extends the mask each step; the pads
    no longer vote, so what each prompt generates does not change with more padding, and a
    padded single prompt generates what it does alone (use_cache=False: MoLEx cannot decode
    from a KV cache)."""
    model = tiny_llama(num_layers=4)
    model.generation_config.eos_token_id = None  # the tiny config's eos id would stop some sequences early
    _sharpen(apply_molex(model, alpha=0.5))
    seqs = _prompts()
    settings = dict(max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    with torch.no_grad():
        new = []
        for extra in (0, 8):
            ids, mask, _ = _left_padded(seqs, extra)
            new.append(model.generate(ids, attention_mask=mask, **settings)[:, -4:])
        assert torch.equal(new[1], new[0])
        ids, mask, _ = _left_padded(seqs[:1], extra=8)
        assert torch.equal(model.generate(ids, attention_mask=mask, **settings)[0, 8:],
                           model.generate(seqs[0][None], **settings)[0])


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_four_d_attention_mask_given_to_the_model_keeps_the_padding_out(kind):
    """A 4-D attention mask ([batch, 1, query, key]) given to the model in place of the 2-D one: no tracked
    module took a 2-D mask, so every token counted as real and the pads voted and entered the load-balancing
    loss and statistics (silently). The real tokens are now the keys some query attends (bool: True attends;
    float, additive: 0 attends): the same choice, loss and statistics as the 2-D mask."""
    model = tiny_llama(num_layers=4)
    molex = apply_molex(model, alpha=0.5)
    _sharpen(molex)
    ids, mask, pos = _left_padded(_prompts(), extra=8)
    seq = ids.shape[1]
    attends = torch.tril(torch.ones(seq, seq, dtype=torch.bool))[None, None] & mask[:, None, None, :].bool()
    four_d = attends if kind == "bool" else torch.where(attends, 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos)
        loss, stats = molex.last_aux_loss, moelora.router_stats(model)["molex"]
        model(ids, attention_mask=four_d, position_ids=pos)
        torch.testing.assert_close(molex.last_aux_loss, loss)
        for key in ("load", "entropy", "chosen_layers"):
            torch.testing.assert_close(moelora.router_stats(model)["molex"][key], stats[key], msg=key)


def test_a_four_d_attention_mask_is_reduced_once_per_forward(monkeypatch):
    """The real tokens of a 4-D mask given to the model (a reduction over [batch, heads, query, key]) were found
    again at every layer's mix (L reductions of the whole mask per forward); they are found once per forward and
    every layer reads them (the same choice and loss as the 2-D mask: the test above)."""
    import moelora.modules.molex as molex_module

    model = tiny_llama(num_layers=4)
    molex = apply_molex(model, alpha=0.5)
    ids, mask, pos = _left_padded(_prompts(), extra=8)
    seq = ids.shape[1]
    four_d = torch.tril(torch.ones(seq, seq, dtype=torch.bool))[None, None] & mask[:, None, None, :].bool()
    calls = []
    reduce = molex_module.real_tokens_of_attention_mask
    monkeypatch.setattr(molex_module, "real_tokens_of_attention_mask", lambda m: calls.append(m) or reduce(m))
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos)
        loss = molex.last_aux_loss
        model(ids, attention_mask=four_d, position_ids=pos)
    assert len(calls) == 1, f"{len(calls)} reductions of the 4-D mask over {molex.num_layers} layers"
    torch.testing.assert_close(molex.last_aux_loss, loss)


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_a_padding_free_packed_row_mixes_as_the_padded_batch(flash_kwargs):
    """transformers' DataCollatorWithFlattening packs the batch into one row without an attention_mask: every
    token is real, the row's one j is the padded batch's (the same real tokens vote), and the layer choice, aux
    loss, statistics, real tokens' logits and the gates' gradients are those of the sequences right-padded."""
    from transformers import DataCollatorWithFlattening

    model = tiny_llama(num_layers=4).train()
    molex = apply_molex(model, alpha=0.5)
    _sharpen(molex)
    seqs = _prompts((5, 3, 4))
    packed = dict(DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": s.tolist()}
                                                                                     for s in seqs]))
    ids, mask = torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    results = []
    for inputs, real in ((dict(input_ids=ids, attention_mask=mask), mask.bool()),
                         (packed, torch.ones(1, 12, dtype=torch.bool))):
        logits = model(**inputs, use_cache=False).logits[real]  # packed sequences are found without a cache only
        stats = moelora.router_stats(model)["molex"]
        grads = torch.autograd.grad(molex.last_aux_loss + logits.square().mean(), [g.weight for g in molex.gates])
        results.append((logits.detach(), molex.last_aux_loss.detach(), stats, grads))
    (logits, loss, stats, grads), (p_logits, p_loss, p_stats, p_grads) = results
    torch.testing.assert_close(p_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_loss, loss)
    for key in ("load", "entropy", "chosen_layers"):
        torch.testing.assert_close(p_stats[key], stats[key], msg=key)
    for got, want in zip(p_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


class MaskedStack(Stack):
    """A stack whose forward takes an attention mask, as transformers' models do."""

    def forward(self, z, attention_mask=None):
        return super().forward(z)


def test_the_mask_reaches_molex_positionally_and_must_fit_the_hidden_states():
    """BERT takes the mask as its second positional argument; a mask that does not cover the
    hidden states (batch, sequence) raises naming both shapes."""
    bert = tiny_bert()
    _sharpen(apply_molex(bert, alpha=0.5))
    ids = token_batch(seq=6)
    pad_ids, mask = torch.cat([ids, torch.zeros(2, 8, dtype=torch.long)], 1), torch.ones(2, 14, dtype=torch.long)
    mask[:, 6:] = 0
    with torch.no_grad():
        expected = bert(ids).last_hidden_state
        torch.testing.assert_close(bert(pad_ids, mask).last_hidden_state[:, :6], expected)
        torch.testing.assert_close(bert(pad_ids, attention_mask=mask).last_hidden_state[:, :6], expected)
    stack = MaskedStack()
    apply_molex(stack, hidden_size=8)
    z = torch.randn(2, 5, 8)
    for bad in (torch.ones(1, 5), torch.ones(2, 4)):
        with pytest.raises(ValueError, match=rf"attention_mask of shape \({bad.shape[0]}, {bad.shape[1]}\) does not "
                                             rf"cover the hidden states of shape \(2, 5, 8\)"):
            stack(z, bad)
    assert not stack.molex._masks  # the mask of a failed forward is not kept for the next


class CheckpointedStack(MaskedStack):
    """Each layer's call (its hooks included, so MoLEx's mixing) under torch.utils.checkpoint, as
    transformers before 5 checkpoints its decoder layers and as custom models do."""

    def __init__(self, use_reentrant=None):
        super().__init__()
        self.use_reentrant = use_reentrant

    def forward(self, z, attention_mask=None):
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            z = layer(z) if self.use_reentrant is None else checkpoint(layer, z, use_reentrant=self.use_reentrant)
        return z


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_a_checkpoint_recomputes_the_layer_choice_of_the_padded_forward(use_reentrant):
    """A checkpoint's recomputation in backward runs MoLEx's hook again, outside the forward of
    the modules that took the mask: it chose j with the pads voting, another layer than the
    forward's (reentrant: silently wrong gradients; non-reentrant: CheckpointError, the saved
    tensors differ). It now takes the forward's real tokens: gradients as without checkpointing."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 16, 8, generator=g, requires_grad=True)  # reentrant checkpoints need an input with grad
    mask = torch.zeros(2, 16)
    mask[:, -2:] = 1  # mostly padding: the pads alone would choose other layers
    results = []
    for reentrant in (None, use_reentrant):
        stack = CheckpointedStack(reentrant)
        molex = apply_molex(stack, hidden_size=8, alpha=0.5, layer_selection="host")
        _sharpen(molex, seed=6)
        stack.train()
        out = stack(z, attention_mask=mask)
        chosen = molex.last_router_stats["chosen_layers"].clone()
        (out * mask[..., None]).square().sum().backward()
        results.append((chosen, {n: p.grad for n, p in stack.named_parameters()}))
    with torch.no_grad():  # the precondition: without the mask the pads change the choice
        stack(z)
    assert not torch.equal(molex.last_router_stats["chosen_layers"], results[0][0])
    (chosen, grads), (ckpt_chosen, ckpt_grads) = results
    assert torch.equal(ckpt_chosen, chosen)
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], msg=name)
    del z, out  # the last forward's inputs: nothing is kept once they are gone (torch 2.11's non-reentrant
    gc.collect()  # checkpoint frees them through a reference cycle)
    assert not molex._recompute_real


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_a_checkpoint_recomputation_keeps_the_forwards_record(use_reentrant):
    """A checkpointed layer's recomputation in backward runs MoLEx's hook again: with reentrant checkpoints (whose
    forward runs without gradients) it replaced the forward's record, so after backward the aux loss held the
    recomputed inputs' graph and aux_loss_lost_grad no longer said that the forward's loss had no gradient (as
    RoutedModule's records, 1b8231d). The record after backward is the forward's."""
    stack = CheckpointedStack(use_reentrant)
    molex = apply_molex(stack, hidden_size=8, alpha=0.5, layer_selection="host")
    stack.train()
    z = torch.randn(2, 6, 8, requires_grad=True)
    out = stack(z)
    record, lost, stats = molex.last_aux_loss, molex.aux_loss_lost_grad, molex.last_router_stats
    out.square().sum().backward()
    assert molex.last_aux_loss is record and molex.last_router_stats is stats
    assert molex.aux_loss_lost_grad is lost is use_reentrant


def test_device_selection_with_a_mask_reads_nothing_on_the_host(monkeypatch):
    stack = MaskedStack()
    molex = apply_molex(stack, hidden_size=8, layer_selection="device", batch_routing="mean")
    z, mask = torch.randn(3, 5, 8), torch.ones(3, 5)
    mask[0, :2] = 0

    def host_read(*args, **kwargs):
        raise AssertionError("a value was read on the host")

    for name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    out = stack(z, attention_mask=mask)
    (out.square().sum() + molex.last_aux_loss).backward()
    monkeypatch.undo()
    assert molex.gates[0].weight.grad.abs().sum() > 0


def test_a_layer_stack_the_model_does_not_hold_is_refused_by_name():
    model = tiny_llama(num_layers=2)
    with pytest.raises(ValueError, match="layers is an nn.ModuleList that the model does not hold"):
        apply_molex(model, layers=nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)]))
    assert not hasattr(model, "molex")


def test_an_nn_transformer_encoder_with_a_padding_mask_takes_molex_in_eval():
    """nn.TransformerEncoder's eval-mode fast path turned a padded batch (src_key_padding_mask) into
    a nested tensor, which MoLEx's mixing cannot take: apply_molex turns that off (remove() restores it)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0), 3)
    model.eval()
    molex = apply_molex(model, layers="encoder.layers", hidden_size=16)
    x, pad = torch.randn(2, 5, 16), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        y = model.encoder(x, src_key_padding_mask=pad)
    assert not y.is_nested and y.shape == x.shape and torch.isfinite(y).all()
    molex.remove()
    assert model.encoder.use_nested_tensor


def test_modules_to_save_and_molex_on_the_same_layers_are_refused_in_either_order():
    """A saved module's trainable copy is a deepcopy: a MoLEx layer copied with its mixing hook ran a copy of
    MoLEx (its own gates, in no state dict), and MoLEx applied over a layer an
    adapter saves whole hooked the wrapper, which from_pretrained (MoLEx replayed first) cannot rebuild: the
    reloaded model computed other outputs. Both orders raise, naming the module, before changing the model."""
    config = moelora.MoELoRAConfig(target_modules=["q_proj"], layers_to_transform=[0], num_experts=1,
                                   modules_to_save=["layers.1"])
    base = tiny_llama(num_layers=2)
    apply_molex(base)
    with pytest.raises(ValueError, match=r"modules_to_save names model\.layers\.1, a layer MoLEx mixes"):
        moelora.get_moelora_model(base, config)
    assert not any(isinstance(m, moelora.MoELoRALinear) for m in base.modules())

    model = moelora.get_moelora_model(tiny_llama(num_layers=2), moelora.MoELoRAConfig(
        target_modules=["q_proj"], layers_to_transform=[0], num_experts=1))
    model.add_adapter("other", config)  # a stored adapter's saved module, and the active one's
    for _ in range(2):
        with pytest.raises(ValueError, match=r"model\.layers\.1: adapter 'other' holds it"):
            apply_molex(model.model)
        assert not hasattr(model.model, "molex")
        model.set_adapter("other")


def test_molex_over_adapted_layers_applies_before_injection_only():
    """MoLEx over a stack whose layers are themselves adapted (linear layers): applied first, the adapter layers
    inject around the hooked layers (as from_pretrained replays it); applied after, its hook sat on the adapter
    layers, and the reloaded model computed other outputs. That order raises, naming the layer."""
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    config = moelora.MoELoRAConfig(target_modules=["layers.0", "layers.1", "layers.2"], num_experts=1)
    model = moelora.get_moelora_model(Stack(), config)
    with pytest.raises(ValueError, match=r"layers\.0: adapter 'default' holds it"):
        apply_molex(model.model, layers="layers", hidden_size=16)
    assert not hasattr(model.model, "molex")
    base = Stack()
    apply_molex(base, layers="layers", hidden_size=16)
    moelora.get_moelora_model(base, config)(torch.randn(2, 5, 16))  # the order from_pretrained replays


def test_generate_decodes_without_the_kv_cache_by_default_and_remove_gives_it_back():
    """apply_molex sets the model's generation_config.use_cache to False (decoding from a cache cannot mix: layer
    j would need keys of the past tokens it never computed), so a plain generate() works (it raised after the
    prefill) and equals generate(use_cache=False); use_cache=True still raises; remove() restores the setting.
    An encoder-decoder with MoLEx on its encoder keeps its decoder's cache."""
    from helpers import tiny_t5

    torch.manual_seed(0)
    model = tiny_llama(num_layers=3).eval()
    molex = moelora.apply_molex(model)
    ids = torch.randint(0, 50, (2, 5))
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(plain, model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                             do_sample=False, use_cache=False))
    with pytest.raises(RuntimeError, match="MoLEx cannot decode from a KV cache"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, use_cache=True)
    molex.remove()
    assert model.generation_config.use_cache is True
    encoder_only = tiny_t5().eval()
    moelora.apply_molex(encoder_only, layers="encoder.block")
    assert encoder_only.generation_config.use_cache is True
    decoder = tiny_t5().eval()
    moelora.apply_molex(decoder, layers="decoder.block")
    assert decoder.generation_config.use_cache is False


def _tiny_mistral(num_layers=3, sliding_window=4):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                        sliding_window=sliding_window)
    return MistralForCausalLM(cfg).eval()


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "mistral"])
def test_prefill_into_a_static_cache_mixes_as_without_the_cache(model_name):
    """A whole-sequence forward that fills a fresh StaticCache (generate's cache_implementation="static" prefill)
    gets the attention mask built over the cache's slots (max_cache_len; a sliding-window layer's window where the
    prompt is shorter): the mixing call, which runs layer j without the cache on the forward's tokens only, met a
    mask wider than its keys and raised 'The size of tensor a (5) must match the size of tensor b (12)' (padded
    llama / GPT-2, and Mistral's window unpadded). It now takes the mask's first columns (the forward's tokens' slots:
    the cache held none before, else the decoding check raises) and gives the logits of the forward without cache;
    decoding from that cache still raises MoLEx's error, and so does generate with the static cache."""
    from transformers import StaticCache

    model = {"llama": lambda: tiny_llama(num_layers=3), "gpt2": lambda: tiny_gpt2(num_layers=3),
             "mistral": _tiny_mistral}[model_name]()
    model.to(torch.float64)
    apply_molex(model, alpha=0.5)
    ids = token_batch(seq=3 if model_name == "mistral" else 5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: a 4-D mask over the cache's slots
    with torch.no_grad():
        for attention_mask in (mask, None):
            want = model(ids, attention_mask=attention_mask, use_cache=False).logits
            cache = StaticCache(config=model.config, max_cache_len=12)
            got = model(ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True).logits
            real = slice(None) if attention_mask is None else attention_mask.bool()
            torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-12)
        with pytest.raises(RuntimeError, match="MoLEx cannot decode from a KV cache"):
            model(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), past_key_values=cache)
        with pytest.raises(RuntimeError, match="MoLEx cannot decode from a KV cache"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                           use_cache=True, cache_implementation="static")


def test_generate_steps_are_prefix_forwards_and_later_tokens_change_earlier_logits():
    """j is chosen by all the real tokens of the batch, the later ones too (docs/layers.md, section 6): generate
    (without the KV cache) gives at each step the last logits of the forward over the sequence so far, while one
    forward over the generated sequence gives, at a position where the later tokens' votes changed j, other
    logits (the stack is not causal); where the chosen layers agree, the same logits."""
    model = tiny_llama(num_layers=4).to(torch.float64)
    molex = apply_molex(model, alpha=0.5)
    with torch.no_grad():
        molex.gates[0].weight.normal_(0, 50, generator=torch.Generator().manual_seed(0))  # choices vary with z
        molex.gates[0].bias.zero_()
    ids = token_batch(batch=1, seq=3, seed=3)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        full = model(out.sequences, use_cache=False).logits
        chosen = molex.last_router_stats["chosen_layers"].clone()
        differs = []
        for step, logits in enumerate(out.logits):
            position = ids.shape[1] - 1 + step
            prefix = model(out.sequences[:, :position + 1], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, prefix.float())  # generate gives fp32 logits
            same_j = torch.equal(molex.last_router_stats["chosen_layers"], chosen)
            assert torch.allclose(prefix, full[:, position], rtol=0, atol=1e-12) == same_j
            differs.append(not same_j)
    assert any(differs) and not all(differs)


def _block_mask_adjust_of_older_torch(adjust, floored: bool):
    """BlockMask._adjust as torch 2.11 has it (the cut mask's lengths those of its whole blocks: (128, 128) for 3
    queries and keys) and, ``floored``, as an earlier torch's (the lengths floored to whole blocks first)."""
    def older_adjust(self, new_q_len, new_kv_len):
        if floored:
            new_q_len, new_kv_len = (new_q_len // self.BLOCK_SIZE[0] * self.BLOCK_SIZE[0],
                                     new_kv_len // self.BLOCK_SIZE[1] * self.BLOCK_SIZE[1])
        cut = adjust(self, new_q_len, new_kv_len)
        return type(self).from_kv_blocks(cut.kv_num_blocks, cut.kv_indices, cut.full_kv_num_blocks,
                                         cut.full_kv_indices, BLOCK_SIZE=cut.BLOCK_SIZE, mask_mod=cut.mask_mod)
    return older_adjust


@pytest.mark.parametrize("adjust", ["installed", "torch_2_11", "floored"])
@pytest.mark.parametrize("model_name", ["llama", "mistral"])
def test_prefill_into_a_static_cache_with_flex_attention_mixes_as_without_the_cache(model_name, adjust, monkeypatch):
    """With attn_implementation="flex_attention" the layers get a BlockMask built over the static cache's slots
    (max_cache_len; Mistral's window where the prompt is shorter), not a tensor: the mixing call raised torch's
    'block_mask was created for block_mask.shape=(2, 1, 3, 12) but got q_len=3 and kv_len=3'. It is now cut to the
    forward's tokens as the 4-D tensor mask is (BlockMask._adjust), giving the logits of the forward without cache
    (float32: flex attention on the CPU takes no float64). With torch 2.11's _adjust (and an older, flooring one) the
    cut mask still raised ('created for block_mask.shape=(2, 1, 128, 128)'): its lengths were whole blocks'."""
    from transformers import StaticCache
    from torch.nn.attention.flex_attention import BlockMask

    if adjust != "installed":
        monkeypatch.setattr(BlockMask, "_adjust", _block_mask_adjust_of_older_torch(BlockMask._adjust,
                                                                                    floored=adjust == "floored"))
    model = {"llama": lambda: tiny_llama(num_layers=3), "mistral": _tiny_mistral}[model_name]()
    model.config._attn_implementation = "flex_attention"
    apply_molex(model, alpha=0.5)
    ids = token_batch(seq=3)
    mask = torch.ones_like(ids)
    mask[1, :1] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        cache = StaticCache(config=model.config, max_cache_len=12)
        got = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-6)


def test_each_layer_has_its_own_gate_where_the_gates_are_not_shared():
    """shared_gate=False: layer t's choice is made by gates[t] (the state dict's gates.t), not a neighbour's."""
    stack = Stack()
    molex = apply_molex(stack, hidden_size=8, shared_gate=False)
    with torch.no_grad():
        for t, gate in enumerate(molex.gates):
            gate.weight.zero_()
            gate.bias.zero_()
            gate.bias[(t + 2) % 4] = 10.0  # gate t prefers layer t + 2; gate t - 1's layer t + 1
        stack(torch.randn(3, 5, 8))
    assert moelora.router_stats(stack)["molex"]["chosen_layers"].tolist() == [2, 3, 0, 1]


@pytest.mark.parametrize("gate", ["linear", "cosine", "cosine_sigmoid"])
def test_the_gate_values_are_a_softmax_or_for_cosine_sigmoid_a_sigmoid_of_the_logits(gate):
    """LayerGate's values: softmax of the logits (linear, cosine: a distribution, the own layer 0), sigmoid of them for
    cosine_sigmoid (the own layer's -inf logit gives 0)."""
    from moelora.modules.molex import LayerGate
    torch.manual_seed(0)
    g = LayerGate(8, 4, gate, proj_dim=4, temperature=0.5)
    logits, values = g(torch.randn(6, 8), exclude=1)
    assert torch.isneginf(logits[:, 1]).all()
    expected = torch.sigmoid(logits) if gate == "cosine_sigmoid" else torch.softmax(logits, dim=-1)
    torch.testing.assert_close(values, expected)
    assert (values[:, 1] == 0).all()


def test_chosen_layers_is_minus_one_for_the_layers_a_forward_did_not_run():
    """router_stats' chosen_layers has one entry per layer: j for the layers this forward ran, -1 for the others (a
    forward that runs only part of the stack)."""
    stack = Stack()
    apply_molex(stack, hidden_size=8)
    with torch.no_grad():
        z = torch.randn(3, 5, 8)
        for layer in stack.layers[:2]:
            z = layer(z)
    chosen = moelora.router_stats(stack)["molex"]["chosen_layers"].tolist()
    assert len(chosen) == 4 and chosen[2:] == [-1, -1]
    assert all(0 <= c < 4 and c != t for t, c in enumerate(chosen[:2]))


def test_the_load_is_the_mean_of_the_layers_loads_a_distribution_over_the_layers():
    """router_stats' load is the mean over the layers of each one's token fractions: it sums to 1."""
    stack = Stack()
    apply_molex(stack, hidden_size=8, shared_gate=False)
    with torch.no_grad():
        stack(torch.randn(3, 5, 8))
    load = moelora.router_stats(stack)["molex"]["load"]
    assert load.shape == (4,)
    torch.testing.assert_close(load.sum(), torch.tensor(1.0))


def test_an_aux_loss_computed_without_gradients_is_flagged_lost_in_training_mode_only():
    """A no_grad forward's aux loss trains nothing: flagged (aux_loss_lost_grad) in training mode, where it was
    meant to train; an evaluation forward (eval mode) is not flagged, nor a forward with gradients."""
    stack = Stack()
    molex = apply_molex(stack, hidden_size=8)
    z = torch.randn(2, 3, 8)
    stack(z)
    assert not molex.aux_loss_lost_grad
    with torch.no_grad():
        stack(z)
    assert molex.aux_loss_lost_grad
    stack.eval()
    with torch.no_grad():
        stack(z)
    assert not molex.aux_loss_lost_grad


def test_a_cleared_or_copied_record_drops_the_lost_gradient_flag():
    """clear_routing_record forgets the lost-gradient flag with the loss it was about, and a copy (which starts with no
    record) starts unflagged; the original keeps its record and its flag."""
    stack = Stack()
    molex = apply_molex(stack, hidden_size=8)
    with torch.no_grad():
        stack(torch.randn(2, 3, 8))
    assert molex.aux_loss_lost_grad and molex.last_aux_loss is not None
    for clone in (copy.deepcopy(stack), pickle.loads(pickle.dumps(stack))):
        assert clone.molex.last_aux_loss is None and not clone.molex.aux_loss_lost_grad
    assert molex.aux_loss_lost_grad and molex.last_aux_loss is not None
    molex.clear_routing_record()
    assert molex.last_aux_loss is None and molex.last_router_stats is None and not molex.aux_loss_lost_grad


def test_a_mask_wider_than_the_hidden_states_gives_its_last_columns():
    """A mask over more tokens than the forward's (a KV cache's earlier tokens first) marks the forward's tokens
    in its last columns: the same as the mask cut to them."""
    stack = MaskedStack()
    molex = apply_molex(stack, hidden_size=8, alpha=0.5)
    z, wide = torch.randn(2, 4, 8), torch.ones(2, 6, dtype=torch.long)
    wide[0, :3] = 0  # 2 earlier tokens and the first of this forward's are padding
    with torch.no_grad():
        out = stack(z, attention_mask=wide)
        loss, stats = molex.last_aux_loss, moelora.router_stats(stack)["molex"]
        cut_out = stack(z, attention_mask=wide[:, 2:])
        cut_stats = moelora.router_stats(stack)["molex"]
        torch.testing.assert_close(out, cut_out)
        torch.testing.assert_close(loss, molex.last_aux_loss)
        for key in ("load", "entropy", "chosen_layers"):
            torch.testing.assert_close(stats[key], cut_stats[key], msg=key)
        stack(z, attention_mask=torch.ones(2, 4))
        assert not torch.equal(moelora.router_stats(stack)["molex"]["load"], stats["load"])  # the padding counts


class _Outer(nn.Module):
    """A model whose inner module takes the mask it gives (None here: the padding already dealt with)."""

    def __init__(self):
        super().__init__()
        self.inner = MaskedStack()

    def forward(self, z, attention_mask=None):
        return self.inner(z, attention_mask=None)


def test_the_innermost_module_that_takes_a_two_d_mask_or_none_decides():
    """Of the modules between the model and the stack, the innermost one's mask (None: every token real) decides,
    not the model's."""
    model = _Outer()
    molex = apply_molex(model, layers="inner.layers", hidden_size=8, alpha=0.5)
    z, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        out = model(z, attention_mask=mask)
        load = moelora.router_stats(model)["molex"]["load"]
        torch.testing.assert_close(out, model(z))
        torch.testing.assert_close(load, moelora.router_stats(model)["molex"]["load"])


class _OuterOfAPlainStack(nn.Module):
    """A model taking the mask, whose inner module (between it and the stack) takes none."""

    def __init__(self):
        super().__init__()
        self.inner = Stack()

    def forward(self, z, attention_mask=None):
        return self.inner(z)


class _OuterOfAThreeDMask(nn.Module):
    """A model taking the 2-D mask, whose inner module takes a 3-D mask [batch, query, key] it builds from it."""

    def __init__(self):
        super().__init__()
        self.inner = MaskedStack()

    def forward(self, z, attention_mask=None):
        three_d = None if attention_mask is None else attention_mask[:, None, :].expand(-1, z.shape[1], -1)
        return self.inner(z, attention_mask=three_d)


@pytest.mark.parametrize("outer", [_OuterOfAPlainStack, _OuterOfAThreeDMask], ids=["no_mask", "3d_mask"])
def test_a_module_between_model_and_stack_without_a_2d_or_4d_mask_leaves_the_mask_to_the_model(outer):
    """A module whose forward takes no attention_mask is not tracked, and one taking a mask of neither 2 nor 4
    dimensions (a 3-D [batch, query, key]) decides nothing: the model's 2-D mask still keeps the padding out (its
    padding rows change neither the real tokens' outputs nor the load; a 3-D mask deciding raised a shape error)."""
    model = outer()
    apply_molex(model, layers="inner.layers", hidden_size=8, alpha=0.5)
    torch.manual_seed(1)
    real = torch.randn(1, 3, 8)
    padded = torch.cat([50 * torch.randn(1, 5, 8), real], dim=1)
    mask = torch.tensor([[0] * 5 + [1] * 3])
    with torch.no_grad():
        expected = model(real)
        load = moelora.router_stats(model)["molex"]["load"]
        out = model(padded, attention_mask=mask)
    torch.testing.assert_close(out[:, 5:], expected)
    torch.testing.assert_close(moelora.router_stats(model)["molex"]["load"], load)


def test_device_selection_refuses_checkpointed_layers_in_training_only():
    """transformers checkpoints a layer whose gradient_checkpointing is set in training mode only: "device"
    refuses it there (with gradients), and runs it in eval mode, as it runs under no_grad."""
    stack = Stack()
    for layer in stack.layers:
        layer.gradient_checkpointing = True
    apply_molex(stack, hidden_size=8, layer_selection="device")
    z = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="cannot run gradient-checkpointed layers"):
        stack(z)
    with torch.no_grad():
        stack(z)
    stack.eval()
    stack(z).sum().backward()


def test_a_forward_after_one_that_ran_part_of_the_stack_stacks_the_layers_again():
    """Device selection stacks the layers' tensors at layer 0 and drops the stack after the last layer: a forward
    that ran only part of the stack leaves it, and the next forward must stack the layers again at layer 0, not mix
    with the copies of the weights they had then."""
    stack = Stack()
    apply_molex(stack, hidden_size=8, layer_selection="device")
    z = torch.randn(3, 5, 8)
    with torch.no_grad():
        stack.layers[0](z)  # part of the stack
        for layer in stack.layers:
            layer.weight.mul_(2.0)
    torch.testing.assert_close(stack(z), copy.deepcopy(stack)(z), rtol=0, atol=0)


def test_remove_forgets_the_routing_record_of_a_molex_the_model_still_holds():
    """remove() forgets the last forward's record: a MoLEx built directly (MoLEx(layers, ...)) and kept as a
    submodule, which no apply_molex undo takes off the model, adds no stale loss or statistics afterwards."""
    stack = Stack()
    stack.molex = molex = MoLEx(stack.layers, hidden_size=8)
    stack(torch.randn(3, 5, 8))
    assert moelora.aux_loss(stack).item() > 0 and "molex" in moelora.router_stats(stack)
    molex.remove()
    assert molex.last_aux_loss is None and molex.last_router_stats is None
    assert moelora.aux_loss(stack).item() == 0 and moelora.router_stats(stack) == {}


def test_a_second_remove_after_apply_molex_again_leaves_the_new_molex_alone():
    """remove() runs apply_molex's undo once: a second call on the removed MoLEx, after apply_molex again, leaves the
    new one's generation_config.use_cache = False (else generate() decoded from the cache and raised)."""
    model = tiny_llama(num_layers=3).eval()
    old = apply_molex(model)
    old.remove()
    new = apply_molex(model)
    old.remove()
    assert model.molex is new and model.generation_config.use_cache is False
    ids = torch.randint(0, 50, (2, 5))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("build", [lambda: MoLEx(Stack(num_layers=1).layers, hidden_size=8),
                                   lambda: apply_molex(tiny_llama(num_layers=1), layers="model.layers")],
                         ids=["MoLEx", "apply_molex"])
def test_a_stack_of_one_layer_is_refused(build):
    """MoLEx mixes each layer with another one: a stack of one layer has none (its gate chose the layer itself)."""
    with pytest.raises(ValueError, match="^MoLEx needs a stack of at least 2 layers$"):
        build()


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_fsdp2_sharding_modules_inside_the_layers_one_by_one_is_refused():
    """fully_shard on a module inside each layer (its MLP) shards the layers one by one too: refused as fully_shard
    on the layers is (test_fsdp2_sharding_the_layers_one_by_one_is_refused_and_the_whole_stack_works)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ids = token_batch(batch=2, seq=5)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = tiny_llama(num_layers=3)
        apply_molex(model, layer_selection="host")
        for layer in model.model.layers:
            fully_shard(layer.mlp, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with pytest.raises(RuntimeError, match="FSDP2 shards one by one"):
            model(input_ids=ids, labels=ids)
    finally:
        dist.destroy_process_group()


def test_an_aux_loss_of_which_one_layer_lost_its_gradient_is_flagged_lost():
    """One layer of the stack run without gradients in training mode (reentrant gradient checkpointing around it)
    leaves that layer's share of the aux loss without gradient: the forward's loss is flagged, not only one whose
    layers all lost it."""
    stack = Stack()
    molex = apply_molex(stack, hidden_size=8)
    z = torch.randn(2, 3, 8)
    for t, layer in enumerate(stack.layers):
        with torch.set_grad_enabled(t != 1):
            z = layer(z)
    assert molex.last_aux_loss.requires_grad and molex.aux_loss_lost_grad


class _CacheArgs(nn.Linear):
    """A layer taking legacy cache keywords; records the use_cache and past_key_values of each call."""

    def forward(self, hidden_states, past_key_values=None, use_cache=False):
        self.calls.append((use_cache, past_key_values))
        return super().forward(hidden_states)


def test_the_mixing_calls_run_with_use_cache_false_and_an_empty_legacy_cache_is_no_cache():
    """A mixing call gets use_cache=False, and a legacy cache keyword holding an empty tuple or list (no cached
    tokens) is no cache: the forward mixes (it does not raise that it cannot decode) and passes it on."""
    stack = Stack(num_layers=3)
    stack.layers = nn.ModuleList(_CacheArgs(8, 8) for _ in range(3))
    apply_molex(stack, hidden_size=8)
    for empty in ((), []):
        for layer in stack.layers:
            layer.calls = []
        z = torch.randn(2, 3, 8)
        for layer in stack.layers:
            z = layer(z, past_key_values=empty, use_cache=True)
        calls = [call for layer in stack.layers for call in layer.calls]
        assert len(calls) == 6 and sorted(use for use, _ in calls) == [False] * 3 + [True] * 3
        assert all(past == empty for _, past in calls)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_at_either_end_of_its_range_is_taken_fixed_or_learned(alpha):
    """alpha = 0 and 1 are in its range [0, 1]: fixed, a = 0 makes layer t's output layer j's on z_t (a = 1: layer
    t's own); learned, the logit starts at alpha clamped to [1e-4, 1 - 1e-4], finite, and gets a gradient."""
    stack = Stack()
    z = torch.randn(2, 5, 8, dtype=torch.float64)
    molex = apply_molex(stack.double(), hidden_size=8, alpha=alpha)
    with torch.no_grad():
        out = stack(z)
        expected = z
        for t, layer in enumerate(stack.layers):
            j = int(molex.choose(expected, t)[0])
            expected = stack.layers[j if alpha == 0 else t].forward(expected)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    molex.remove()
    learned = apply_molex(stack, hidden_size=8, alpha=alpha, learn_alpha=True)
    a = min(max(alpha, 1e-4), 1 - 1e-4)
    assert learned.alpha_logit.item() == pytest.approx(math.log(a / (1 - a)), rel=1e-6)
    stack(z).sum().backward()
    assert torch.isfinite(learned.alpha_logit.grad) and learned.alpha_logit.grad != 0


@pytest.mark.parametrize("gate,bias,has_bias", [("linear", None, True), ("cosine", None, False),
                                                ("cosine_sigmoid", None, False), ("linear", False, False),
                                                ("cosine", True, True)])
def test_only_the_linear_gate_has_a_bias_by_default_and_bias_overrides(gate, bias, has_bias):
    """bias=None: the linear gate has one (the paper's nn.Linear(hidden, L)), the cosine gates' projection none;
    bias=True / False give it or take it away, in the state dict too."""
    molex = apply_molex(Stack(), hidden_size=8, gate=gate, proj_dim=4, bias=bias)
    linear = molex.gates[0] if gate == "linear" else molex.gates[0].proj
    assert (linear.bias is not None) == has_bias
    keys = set(molex.state_dict())
    assert any(k.endswith("bias") for k in keys) == has_bias


@pytest.mark.parametrize("gate", ["cosine", "cosine_sigmoid"])
def test_the_cosine_gates_project_to_proj_dim_else_to_hidden_size(gate):
    """proj_dim sets the width of the cosine gates' projection and layer embeddings (None: hidden_size)."""
    for proj_dim, width in [(3, 3), (None, 8)]:
        g = apply_molex(Stack(), hidden_size=8, gate=gate, proj_dim=proj_dim).gates[0]
        assert g.proj.weight.shape == (width, 8) and g.layer_embeddings.shape == (4, width)


def test_the_cosine_gates_layer_embeddings_start_standard_normal():
    """reset_parameters (and the constructor) draw the cosine gates' layer embeddings from N(0, 1)."""
    from moelora.modules.molex import LayerGate
    torch.manual_seed(0)
    e = LayerGate(64, 32, "cosine").layer_embeddings.detach()
    assert abs(e.mean().item()) < 0.1 and abs(e.std().item() - 1) < 0.1 and (e < 0).float().mean() > 0.4


@pytest.mark.parametrize("coef", [0.0, 0.3])
def test_the_aux_loss_and_router_stats_match_a_float64_computation_from_each_layers_input(coef):
    """aux_loss = aux_loss_coef * sum_t L sum_l f_l P_l, f_l the share of tokens whose top-1 is l and P_l the mean
    softmax of layer t's gate logits (the own layer masked); router_stats' load and entropy are the means over the
    layers of f and of the tokens' routing entropy. Against a float64 computation from each layer's input."""
    stack = Stack()
    molex = apply_molex(stack, hidden_size=8, shared_gate=False, aux_loss_coef=coef)
    inputs, z = [], torch.randn(3, 5, 8)
    for layer in stack.layers:  # Stack.forward, keeping each layer's input
        inputs.append(z.detach())
        z = layer(z)
    loss, loads, entropies = torch.zeros((), dtype=torch.float64), [], []
    for t, (z, gate) in enumerate(zip(inputs, molex.gates)):
        logits = z.reshape(-1, 8).double() @ gate.weight.double().T + gate.bias.double()
        logits[:, t] = -math.inf
        probs = torch.softmax(logits, dim=-1)
        f = torch.nn.functional.one_hot(probs.argmax(-1), 4).double().mean(0)
        loss += 4 * (f * probs.mean(0)).sum()
        loads.append(f)
        entropies.append(-torch.special.xlogy(probs, probs).sum(-1).mean())
    stats = moelora.router_stats(stack)["molex"]
    torch.testing.assert_close(moelora.aux_loss(stack).double(), coef * loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["load"].double(), torch.stack(loads).mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats["entropy"].double(), torch.stack(entropies).mean(), rtol=1e-5, atol=1e-7)


def test_molex_applied_to_a_model_in_eval_mode_starts_in_eval_mode():
    """apply_molex puts MoLEx in the model's mode: on an evaluated model (eval()) a no_grad forward is an evaluation,
    its aux loss not flagged as lost; train() then switches both."""
    stack = Stack().eval()
    molex = apply_molex(stack, hidden_size=8)
    assert not molex.training
    with torch.no_grad():
        stack(torch.randn(2, 3, 8))
    assert not molex.aux_loss_lost_grad
    stack.train()
    assert molex.training


def test_molex_is_refused_over_a_stack_an_adapter_saves_whole():
    """An adapter whose modules_to_save holds the whole stack (a module above the layers) holds every layer: MoLEx
    over it raises, naming that module, before changing the model."""
    model = moelora.get_moelora_model(tiny_llama(num_layers=2), moelora.MoELoRAConfig(
        target_modules=["q_proj"], layers_to_transform=[0], num_experts=1))
    model.add_adapter("other", moelora.MoELoRAConfig(target_modules=["lm_head"], num_experts=1,
                                                     modules_to_save=["layers"]))
    with pytest.raises(ValueError, match=r"model\.layers: adapter 'other' holds it"):
        apply_molex(model.model)
    assert not hasattr(model.model, "molex")


class _LayerDropStack(Stack):
    """A stack whose forward skips the layers ``skip`` names (LayerDrop, as Wav2Vec2's training forward does)."""

    skip = ()

    def forward(self, z):
        for t, layer in enumerate(self.layers):
            if t not in self.skip:
                z = layer(z)
        return z


@pytest.mark.parametrize("selection", ["device", "host"])
def test_a_forward_that_skips_layers_keeps_nothing_of_the_previous_forward(selection):
    """A forward that skips layers (LayerDrop: Wav2Vec2's default layerdrop=0.1 in training) records its own layers
    only: chosen_layers is -1 for the skipped ones, the aux loss is this forward's (the previous forward's, whose
    graph its backward freed, made the next backward raise), and device selection mixes with the layers' weights of
    this forward (the previous forward, which skipped the last layer, left its stacked copies)."""
    stack = _LayerDropStack()
    apply_molex(stack, hidden_size=8, layer_selection=selection)
    z = torch.randn(3, 5, 8)
    stack.skip = (3,)
    (stack(z).sum() + moelora.aux_loss(stack)).backward()
    with torch.no_grad():
        for layer in stack.layers:
            layer.weight.mul_(2.0)
    stack.skip = (0,)
    out = stack(z)
    chosen = moelora.router_stats(stack)["molex"]["chosen_layers"].tolist()
    assert chosen[0] == -1 and all(0 <= c < 4 and c != t for t, c in enumerate(chosen) if t != 0)
    fresh = copy.deepcopy(stack)
    torch.testing.assert_close(out, fresh(z), rtol=0, atol=0)
    torch.testing.assert_close(moelora.aux_loss(stack), moelora.aux_loss(fresh), rtol=0, atol=0)
    (out.sum() + moelora.aux_loss(stack)).backward()


@pytest.mark.parametrize("alpha", [0.9, 0.99, 0.999])
def test_a_bf16_stack_mixes_with_the_coefficients_of_float64(alpha):
    """In a bf16 model the u_j term's weight is 1 - a taken in fp32, then rounded: 1 - bf16(a) weighed it 0.0117 for
    a = 0.99 (the gate's gradient 16% off float64's) and 0 for a = 0.999 (the gate got no gradient from the task
    loss). Output and every gradient against the same stack in float64, which chooses the same layers."""
    class Wide(Stack):
        def __init__(self):
            super().__init__(num_layers=3, d=16)

    stack = Wide().to(torch.bfloat16)
    apply_molex(stack, hidden_size=16, alpha=alpha)
    reference = copy.deepcopy(stack).double()
    torch.manual_seed(1)
    z = torch.randn(4, 5, 16)
    out = stack(z.bfloat16())
    out.float().pow(2).sum().backward()
    expected = reference(z.double())
    expected.pow(2).sum().backward()
    assert (moelora.router_stats(stack)["molex"]["chosen_layers"].tolist()
            == moelora.router_stats(reference)["molex"]["chosen_layers"].tolist())
    rel = lambda x, ref: ((x.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(out, expected) < 0.03
    params = dict(reference.named_parameters())
    for name, p in stack.named_parameters():
        assert params[name].grad.norm() > 0 and rel(p.grad, params[name].grad) < 0.08, name  # bf16: 2-4% (seeds)


def test_a_forward_that_calls_the_layers_itself_stacks_them_again_at_layer_zero():
    """Device selection stacks the layers' tensors at layer 0 of each forward: a forward that calls the layers
    itself (no forward of the module holding the stack, whose pre-hook also drops the stack), after one that ran
    part of the stack, mixes with the layers' current weights, not the copies the partial forward stacked. Against
    the float64 recursion (_reference64): the output and the gradients of z, the layers and the gate."""
    torch.manual_seed(1)
    stack = Stack()
    apply_molex(stack, hidden_size=8, layer_selection="device", bias=False, learn_alpha=True, alpha=0.7)
    z = torch.randn(3, 5, 8)
    with torch.no_grad():
        stack.layers[0](z)  # part of the stack: its stacked copies stay
        for layer in stack.layers:
            layer.weight.add_(0.3 * torch.randn_like(layer.weight))

    def layer_by_layer(x):  # the layers called one by one, not through stack's forward
        for layer in stack.layers:
            x = layer(x)
        return x

    assert torch.isfinite(_check_against_reference64(stack, z, layer_by_layer, lambda out: out.square().sum())).all()


@pytest.mark.parametrize("gate", ["linear", "cosine", "cosine_sigmoid"])
def test_gates_with_a_bias_mix_as_the_float64_recursion(gate):
    """bias=True: the linear gate's bias and the cosine gates' projection bias (cos(P z + b, e_l) / temperature)
    enter the logits. Against the float64 recursion (_reference64): the output and the gradients of z, the layers,
    the gate (its bias among them) and alpha."""
    torch.manual_seed(2)
    stack = Stack()
    molex = apply_molex(stack, hidden_size=8, gate=gate, bias=True, proj_dim=4, temperature=0.5, learn_alpha=True,
                        alpha=0.8)
    bias = molex.gates[0].bias if gate == "linear" else molex.gates[0].proj.bias
    with torch.no_grad():
        bias.copy_(torch.randn_like(bias))
    z = torch.randn(3, 5, 8)
    _check_against_reference64(stack, z, loss=lambda out: out.square().sum())
    assert bias.grad is not None and bias.grad.abs().sum() > 0
