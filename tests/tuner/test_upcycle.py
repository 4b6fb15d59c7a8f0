"""MoE FFN upcycling: exact at init, routing/gradients, generic MLPs, errors."""

import copy
import math
import re
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora
from moelora import moe_ffn
from moelora.modules.ffn import MoEFFN
from moelora.tuner.upcycle import upcycle_ffn
from helpers import rel_err, tiny_bert, tiny_gpt2, tiny_llama, tiny_phi3, token_batch


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


def test_an_ffn_whose_output_width_is_not_its_input_width_keeps_the_leading_dims():
    """MoEFFN takes an FFN whose out_proj gives another width than its input's (w_out [E, d_out, d_ff]):
    the block maps [..., d_in] to [..., d_out], the dense FFN's output when every expert is routed."""
    torch.manual_seed(0)
    fc_in, fc_out = nn.Linear(8, 20), nn.Linear(20, 5)
    x = torch.randn(2, 3, 8)
    moe = MoEFFN(fc_in, fc_out, torch.relu, 4, 4, router="threshold")
    out = moe(x)
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out, fc_out(torch.relu(fc_in(x))), rtol=1e-6, atol=1e-6)


def test_upcycle_errors():
    with pytest.raises(ValueError, match="top_k must be in"):
        upcycle_ffn(tiny_bert(), num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="no FFN found to upcycle"):
        upcycle_ffn(nn.Sequential(nn.Linear(2, 2)), num_experts=2, top_k=1)
    with pytest.raises(ValueError, match=r"^top_k must be in \[1, num_experts=2\], got 3$"):  # before the search
        upcycle_ffn(nn.Sequential(nn.Linear(2, 2)), num_experts=2, top_k=3)


class _GatedMLP(nn.Module):
    """A generic gated MLP fc_out(act(gate(x)) * fc_in(x)) whose projections may disagree."""

    def __init__(self, gate: nn.Linear, fc_out: nn.Linear):
        super().__init__()
        self.fc_in, self.gate, self.fc_out = nn.Linear(8, 16), gate, fc_out


@pytest.mark.parametrize("gate,fc_out,error,match", [
    (nn.Linear(8, 12), nn.Linear(16, 8), ValueError, r"gate_proj must have in_proj's shape \[16, 8\].*got \[12, 8\]"),
    (nn.Linear(6, 16), nn.Linear(16, 8), ValueError, r"gate_proj must have in_proj's shape \[16, 8\].*got \[16, 6\]"),
    (nn.Linear(8, 16), nn.Linear(16, 8).double(), TypeError, r"out_proj\.weight is torch\.float64 on cpu, in_proj"),
    (nn.Linear(8, 16).half(), nn.Linear(16, 8), TypeError, r"gate_proj\.weight is torch\.float16 on cpu, in_proj"),
], ids=["gate_d_ff", "gate_d_in", "out_dtype", "gate_dtype"])
def test_projections_that_disagree_are_refused_when_built_not_in_the_forward(gate, fc_out, error, match):
    """MoEFFN built from a gate_proj of another shape than in_proj's, or from projections of different
    dtypes, and upcycle_ffn replaced such an MLP: the model then failed in its first forward, with
    moe_ffn's error on w_gate / w_out, names the user never gave. They are refused when built, naming
    the projection, and upcycle_ffn leaves the model as it was."""
    mlp = _GatedMLP(gate, fc_out)
    with pytest.raises(error, match=match):
        MoEFFN(mlp.fc_in, mlp.fc_out, torch.relu, 4, 2, gate_proj=mlp.gate)
    model = nn.Sequential(mlp)
    before = repr(model)
    with pytest.raises(error, match=match):
        upcycle_ffn(model, num_experts=4, top_k=2, ffn_modules=["0"], in_proj="fc_in", gate_proj="gate",
                    out_proj="fc_out", activation=torch.relu)
    assert repr(model) == before


class _PlainMLP(nn.Module):
    """A generic MLP fc2(relu(fc1(x))) whose forward runs (the probe sees it) with fc1 of ``rows`` outputs."""

    def __init__(self, rows: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, rows), nn.Linear(rows, 16)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("make,described,match", [
    (lambda: _PlainMLP(32), dict(in_proj="fc1", out_proj="fc2"),
     r"^out_proj takes 32 features but in_proj gives 16 \(half of the fused gate/up projection's\)$"),
    (lambda: _PlainMLP(33), dict(in_proj="fc1", out_proj="fc2"),
     r"^with stacked_gate=True, in_proj is the fused .* got in_proj with 33 output features and gate_proj NoneType$"),
    (lambda: tiny_llama(num_layers=1).model.layers[0], dict(in_proj="up_proj", out_proj="down_proj",
                                                            gate_proj="gate_proj"),
     r"^with stacked_gate=True, in_proj is the fused .* got in_proj with 32 output features and gate_proj Linear$"),
], ids=["not_fused", "odd_rows", "with_gate_proj"])
def test_a_generic_ffn_described_as_stacked_that_is_not_is_refused_naming_the_projections(make, described, match):
    """stacked_gate=True for an MLP whose in_proj is no fused gate/up projection (an out_proj taking all its rows,
    an odd number of rows, a gate_proj given too), on a module whose own forward runs: the probe comparing the FFN
    described with the module's forward ran it first and raised torch's shape error ("mat1 and mat2 shapes cannot
    be multiplied"), naming nothing the user gave. MoEFFN's own check now raises first, naming the projections, and
    the model is left as it was."""
    mlp = make()
    model = nn.Sequential(mlp.mlp if hasattr(mlp, "mlp") else mlp)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        upcycle_ffn(model, 4, 2, ffn_modules=["0"], activation=F.silu, stacked_gate=True, **described)
    assert not any(isinstance(m, MoEFFN) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("role", ["in_proj", "out_proj", "gate_proj"])
def test_moeffn_refuses_a_bias_of_another_dtype_and_a_projection_on_another_device(role):
    """The experts stack every weight and bias of the FFN, in in_proj.weight's dtype and on its device: a
    projection's bias of another dtype, or a projection on another device (meta here), is refused when built,
    naming the tensor, not left to fail in moe_ffn's forward."""
    def projections():
        return dict(in_proj=nn.Linear(8, 16), out_proj=nn.Linear(16, 8), gate_proj=nn.Linear(8, 16))

    projs = projections()
    projs[role].bias = nn.Parameter(projs[role].bias.detach().half())
    with pytest.raises(TypeError, match=rf"^the FFN's projections must share one dtype and device .*: {role}\.bias "
                                        r"is torch\.float16 on cpu, in_proj\.weight torch\.float32 on cpu$"):
        MoEFFN(activation=torch.relu, num_experts=4, top_k=2, **projs)
    projs = projections()
    projs[role] = projs[role].to("meta")
    named, device = ("out_proj.weight", "cpu") if role == "in_proj" else (f"{role}.weight", "meta")
    with pytest.raises(TypeError, match=rf": {re.escape(named)} is torch\.float32 on {device}, in_proj\.weight "
                                        rf"torch\.float32 on {'meta' if role == 'in_proj' else 'cpu'}$"):
        MoEFFN(activation=torch.relu, num_experts=4, top_k=2, **projs)


def test_upcycling_again_says_the_ffns_are_upcycled_already():
    """A second upcycle_ffn found no FFN and told the user to name ffn_modules, in_proj, out_proj and activation;
    it now says the model's FFNs are upcycled already, naming one, and changes nothing."""
    model = tiny_llama(num_layers=2)
    upcycle_ffn(model, num_experts=2, top_k=2)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"^no dense FFN found to upcycle: the model's are upcycled already \(e.g. "
                                         r"model\.layers\.0\.mlp, a MoEFFN\)"):
        upcycle_ffn(model, num_experts=4, top_k=2)
    assert [type(m) for m in model.modules()] == before
    # ffn_modules naming nothing there: that is what was not found, whatever the model's MoEFFNs
    with pytest.raises(ValueError, match=r"^no FFN found to upcycle: "):
        upcycle_ffn(model, 2, 2, ffn_modules=["fc"], in_proj="a", out_proj="b", activation=torch.relu)


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


@pytest.mark.parametrize("layers, upcycled", [(1, [1]), ([0, 2], [0, 2]), ((2,), [2])])
def test_layers_to_transform_keeps_the_ffns_of_those_layers(layers, upcycled):
    """layers_to_transform, a layer index or a list (a tuple too, as MoELoRAConfig's) of them, keeps those layers'
    FFNs only."""
    model = tiny_llama(3)
    names = [f"model.layers.{i}.mlp" for i in upcycled]
    assert upcycle_ffn(model, 2, 2, layers_to_transform=layers, layers_pattern="layers") == names
    assert [n for n, m in model.named_modules() if isinstance(m, MoEFFN)] == names


def test_layers_pattern_names_the_stack_whose_index_layers_to_transform_reads():
    """With layers_pattern, layers_to_transform reads the index after that stack's name, not the first number of
    the FFN's name (here the stage's)."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    stage = nn.ModuleDict({"layers": nn.ModuleList([Gated(), Gated()])})
    model = nn.ModuleDict({"stages": nn.ModuleList([stage])})
    assert upcycle_ffn(model, 2, 2, layers_to_transform=1, layers_pattern="layers") == ["stages.0.layers.1"]
    assert isinstance(stage.layers[1], MoEFFN) and not isinstance(stage.layers[0], MoEFFN)


def test_ffn_modules_given_as_a_set_are_recorded_as_a_list_and_the_model_saves(tmp_path):
    """ffn_modules given as a set (as MoELoRAConfig's target_modules may be) is recorded sorted, a list: the
    upcycled model saves (JSON has no sets) and loads."""
    import json

    base = tiny_llama()
    upcycle_ffn(base, 2, 2, ffn_modules={"mlp"}, in_proj="up_proj", out_proj="down_proj", gate_proj="gate_proj",
                activation=F.silu)
    model = moelora.get_moelora_model(base, moelora.MoELoRAConfig(target_modules=["o_proj"], num_experts=2, top_k=2))
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "moelora_config.json").read_text())
    (record,) = [r for r in config["structure"] if r["op"] == "upcycle_ffn"]
    assert record["kwargs"]["ffn_modules"] == ["mlp"]
    loaded = moelora.from_pretrained(tiny_llama(), str(tmp_path))
    assert isinstance(loaded.model.model.layers[1].mlp, MoEFFN)


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
@pytest.mark.parametrize("training", [False, True])
def test_upcycled_modules_take_the_training_mode_of_what_they_replace(make, training):
    """The MoEFFN (and a BERT layer's identity output.dense) are in the mode of the module they replace: an
    eval-mode model stays in eval mode throughout (a fresh module is in training mode)."""
    model = make().train(training)
    upcycle_ffn(model, 2, 2)
    assert any(isinstance(m, MoEFFN) for m in model.modules())
    assert all(m.training == training for m in model.modules())


def test_ffns_inside_a_module_an_adapter_saves_are_refused():
    """An FFN inside a module an adapter saves whole (modules_to_save=["layers.0"]: its wrapper holds the original
    layer and the trained copy, both with their MLP) is refused before any change, naming the adapter and the saved
    module: upcycling would change the modules that adapter saves and restores."""
    model = moelora.get_moelora_model(tiny_llama(num_layers=2), moelora.MoELoRAConfig(
        target_modules=["q_proj"], num_experts=1, modules_to_save=["layers.0"]))
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.original_module\.mlp: adapter 'default' has a module "
                                         r"at model\.layers\.0, which upcycling"):
        upcycle_ffn(model, num_experts=2, top_k=1)
    assert [type(m) for m in model.modules()] == before


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


def test_a_regex_matching_the_empty_name_does_not_select_the_model_itself():
    """ffn_modules, a regex that also matches "" (r"0?"), selects the model's named modules only: the model itself
    (named "") is never an FFN to replace."""
    net = nn.Sequential(_ActivatedMLP(nn.ReLU()))
    x = torch.randn(3, 8)
    expected = net(x)
    assert upcycle_ffn(net, 2, 2, ffn_modules=r"0?", in_proj="fc1", out_proj="fc2", activation=nn.ReLU(),
                       router="threshold", threshold_eps=0.0) == ["0"]
    assert isinstance(net[0], MoEFFN)
    torch.testing.assert_close(net(x), expected)


# ------------------------------------------------------------- fused gate/up projections (Phi-3)

def tiny_glm(num_layers=2):
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    cfg = GlmConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                    pad_token_id=0)
    return GlmForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [tiny_phi3, tiny_glm], ids=["phi3", "glm"])
def test_fused_gate_up_mlp_is_found_and_upcycled_exactly(make):
    """Phi-3's and GLM's MLPs (gate_up_proj [2 d_ff, d], chunked into gate then up) become
    MoEFFNs holding the stacked projection; all experts routed, eps 0: the logits bitwise."""
    model = make()
    ids = token_batch()
    expected = model(ids).logits
    assert upcycle_ffn(model, num_experts=4, top_k=4, router="threshold", threshold_eps=0.0) == [
        "model.layers.0.mlp", "model.layers.1.mlp"]
    moe = model.model.layers[0].mlp
    assert isinstance(moe, MoEFFN) and moe.stacked_gate and moe.w_gate is None
    assert moe.w_in.shape == (4, 96, 32) and moe.w_out.shape == (4, 32, 48)
    model.train()
    assert torch.equal(model(ids).logits, expected)


def _phi3_mlp_reference(mlp, moe, x):
    """The float64 reference of ``moe`` (upcycled from the Phi3MLP ``mlp``, experts since changed): each
    expert is ``mlp``'s own forward (transformers' chunk order) run with that expert's weights, mixed by
    the float64 router's normalised weights. (y, its routing ids, the float64 leaves x, w_in, w_out,
    router.weight)."""
    ref_mlp, ref = copy.deepcopy(mlp).double(), copy.deepcopy(moe).double()
    x64 = x.detach().double().requires_grad_()
    flat = x64.reshape(-1, x.shape[-1])
    routing = ref.router(flat)
    experts = torch.stack([torch.func.functional_call(
        ref_mlp, {"gate_up_proj.weight": ref.w_in[e], "down_proj.weight": ref.w_out[e]}, (flat,))
        for e in range(moe.num_experts)])  # [E, T, d]
    picked = experts[routing.ids.long(), torch.arange(flat.shape[0])[:, None]]  # [T, k, d]
    coef = routing.weights / routing.weights.sum(-1, keepdim=True)
    y = (coef.unsqueeze(-1) * picked).sum(1).reshape(x.shape)
    return y, routing.ids, [x64, ref.w_in, ref.w_out, ref.router.weight]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_mlp_experts_match_the_float64_phi3_mlp_with_gradients(backend):
    """Experts made different, softmax top-2 routing: the stacked experts (moe_ffn's stacked_gate on
    either backend) against transformers' Phi3MLP.forward in float64, forward and the gradients of
    x, the stacked w_in, w_out and the router's weight."""
    mlp = tiny_phi3(num_layers=1).model.layers[0].mlp
    moe = MoEFFN(mlp.gate_up_proj, mlp.down_proj, mlp.activation_fn, 4, 2, stacked_gate=True,
                 router="softmax_topk").eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (moe.w_in, moe.w_out, moe.router.weight):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(2, 5, 32, generator=g, requires_grad=True)
    with moelora.use_backend(backend):
        y = moe(x)
    dy = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, [x, moe.w_in, moe.w_out, moe.router.weight], dy)
    y_ref, ref_ids, leaves = _phi3_mlp_reference(mlp, moe, x)
    assert torch.equal(moe.router(x.reshape(-1, 32)).ids, ref_ids)  # the same routing
    expected = torch.autograd.grad(y_ref, leaves, dy.double())
    assert rel_err(y, y_ref) < 1e-5
    for name, a, b in zip(["x", "w_in", "w_out", "router.weight"], got, expected):
        assert rel_err(a, b) < 1e-5, name
    assert all(g[:, half].abs().sum() > 0 for g in [got[1]] for half in (slice(0, 48), slice(48, 96)))


def test_upcycled_phi3_trains_and_round_trips_through_save_and_load(tmp_path):
    """An upcycled Phi-3 (with MoE-LoRA on o_proj) trains: loss and aux loss give both halves of the
    stacked w_in gradients, an optimiser step changes the loss; saved and loaded onto a fresh
    Phi-3, it computes bitwise the same logits from the same stacked weights."""
    base = tiny_phi3()
    upcycle_ffn(base, num_experts=3, top_k=2, router="threshold", threshold_eps=0.1)
    model = moelora.get_moelora_model(base, moelora.MoELoRAConfig(target_modules=["o_proj"], num_experts=2, top_k=1))
    _perturb_experts(model)
    model.train()
    ids = token_batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(2):
        out = model(ids, labels=ids)
        losses.append(out.loss.item())
        opt.zero_grad()
        (out.loss + moelora.aux_loss(model)).backward()
        w_in = model.model.model.layers[0].mlp.w_in
        assert w_in.grad[:, :48].abs().sum() > 0 and w_in.grad[:, 48:].abs().sum() > 0
        opt.step()
    assert losses[1] != losses[0]
    model.eval()
    expected = model(ids).logits
    model.save_pretrained(str(tmp_path))
    loaded = moelora.from_pretrained(tiny_phi3(), str(tmp_path))
    moe = loaded.model.model.layers[1].mlp
    assert isinstance(moe, MoEFFN) and moe.stacked_gate
    assert torch.equal(moe.w_in, model.model.model.layers[1].mlp.w_in)
    assert torch.equal(loaded(ids).logits, expected)


def test_generic_ffn_with_a_fused_gate_up_projection():
    """ffn_modules with stacked_gate=True: in_proj holds the gate rows, then the up rows (with its
    bias); all experts routed, eps 0: bitwise the MLP; the probe sees the FFN described (no warning)."""
    import warnings

    torch.manual_seed(0)

    class FusedMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w12, self.w3 = nn.Linear(8, 40), nn.Linear(20, 8)

        def forward(self, x):
            gate, up = self.w12(x).chunk(2, dim=-1)
            return self.w3(torch.nn.functional.gelu(gate) * up)

    net = nn.Sequential(FusedMLP(), FusedMLP())
    x = torch.randn(2, 3, 8)
    expected = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert upcycle_ffn(net, 3, 3, ffn_modules=r"\d", in_proj="w12", out_proj="w3",
                           activation=torch.nn.functional.gelu, stacked_gate=True) == ["0", "1"]
    assert net[0].b_in.shape == (3, 40) and net[0].w_gate is None
    assert torch.equal(net(x), expected)


# ------------------------------------------------------------- what the replaced module holds besides the FFN

def _gpt2_with_mlp_dropout(p=0.5):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      resid_pdrop=p, embd_pdrop=0.0, attn_pdrop=0.0))


GPT2_MLP = dict(ffn_modules=["mlp"], in_proj="c_fc", out_proj="c_proj")


def test_mlp_output_dropout_is_refused_kept_or_dropped_as_asked():
    """GPT-2's MLP drops its output (resid_pdrop) in training; upcycling used to lose that silently.
    Now upcycle_ffn refuses (the model unchanged) until ffn_dropout says: "output" keeps it (all
    experts routed, eps 0: in training the MLP's output from the same seed, the same elements
    dropped), "drop" upcycles without it."""
    model = _gpt2_with_mlp_dropout()
    act = model.transformer.h[0].mlp.act
    before = repr(model)
    with pytest.raises(ValueError, match=r"transformer.h.0.mlp \(GPT2MLP\) holds dropout \{'dropout': 0.5\} .*"
                                         r"ffn_dropout='output'"):
        upcycle_ffn(model, 2, 2, activation=act, **GPT2_MLP)
    assert repr(model) == before
    mlp = model.transformer.h[0].mlp.train()
    x = torch.randn(2, 3, 16)
    torch.manual_seed(1)
    expected = mlp(x)
    assert (expected == 0).any()  # the dropout acted
    upcycle_ffn(model, 2, 2, activation=act, ffn_dropout="output", router="threshold", threshold_eps=0.0, **GPT2_MLP)
    moe = model.transformer.h[0].mlp.train()
    assert moe.dropout == 0.5
    torch.manual_seed(1)
    got = moe(x)
    assert torch.equal(got == 0, expected == 0)  # the same draws drop the same elements
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # Conv1D's addmm rounds as F.linear, nearly

    model = _gpt2_with_mlp_dropout()
    mlp = model.transformer.h[0].mlp.eval()
    expected = mlp(x)
    upcycle_ffn(model, 2, 2, activation=act, ffn_dropout="drop", router="threshold", threshold_eps=0.0, **GPT2_MLP)
    moe = model.transformer.h[0].mlp.train()
    assert moe.dropout == 0.0
    torch.testing.assert_close(moe(x), expected, rtol=1e-6, atol=1e-6)


def test_dropout_inside_the_ffn_cannot_be_kept():
    """A BERT-style intermediate holding dropout (Timesformer's: after the activation, before
    output.dense) acts inside the FFN: "output" refuses it, "drop" upcycles without it."""
    class Intermediate(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.intermediate_act_fn, self.dropout = nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.1)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.intermediate, self.output = Intermediate(), nn.Module()
            self.output.dense = nn.Linear(16, 8)

    for ffn_dropout, error in ((None, "which upcycle_ffn cannot tell where"), ("output", "on the FFN's hidden layer")):
        with pytest.raises(ValueError, match=rf"^0.intermediate \(Intermediate\) holds dropout .*{error}"):
            upcycle_ffn(nn.Sequential(Layer()), 2, 1, ffn_dropout=ffn_dropout)
    net = nn.Sequential(Layer())
    assert upcycle_ffn(net, 2, 1, ffn_dropout="drop") == ["0"] and isinstance(net[0].intermediate, MoEFFN)


def test_found_ffns_holding_more_than_their_projections_are_refused():
    """The automatically found FFNs are replaced whole too: one holding other parameters (BitNet's
    LLaMA-style MLP a norm before down_proj, RoBERTa-PreLayerNorm's intermediate a LayerNorm, a
    Phi-3-style MLP a scale) raises naming them, the model unchanged; they used to be dropped."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
            self.act_fn, self.ffn_sub_norm = nn.SiLU(), nn.LayerNorm(16)

    class Intermediate(nn.Module):
        def __init__(self):
            super().__init__()
            self.LayerNorm, self.dense, self.intermediate_act_fn = nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU()

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.intermediate, self.output = Intermediate(), nn.Module()
            self.output.dense = nn.Linear(16, 8)

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj, self.activation_fn = nn.Linear(8, 32), nn.Linear(16, 8), nn.SiLU()
            self.scale = nn.Parameter(torch.ones(8))

    for make, name, other in ((Gated, "0", "ffn_sub_norm"), (Bert, r"0.intermediate", "LayerNorm"),
                              (Fused, "0", "scale")):
        net = nn.Sequential(make())
        before = repr(net)
        with pytest.raises(ValueError, match=rf"^{name} \(\w+\) holds parameters besides .*: \['{other}'\]"):
            upcycle_ffn(net, 2, 1)
        assert repr(net) == before


class _ScaledGatedMLP(nn.Module):
    """Falcon-H1's MLP: LLaMA's children, and multipliers (floats, no parameters) in its forward."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn, self.gate_multiplier, self.down_multiplier = nn.SiLU(), 0.5, 2.0

    def forward(self, x):
        gate = self.act_fn(self.gate_proj(x) * self.gate_multiplier)
        return self.down_proj(self.up_proj(x) * gate) * self.down_multiplier


class _SplitLlamaMLP(nn.Module):
    """transformers 4.46's LlamaMLP (before 4.48): with config.pretraining_tp > 1 its forward splits the
    projections' weights into slices (without their biases) and sums the slices' products."""

    def __init__(self, pretraining_tp: int, bias):  # bias: True, False or the one projection that has one
        super().__init__()
        self.config = types.SimpleNamespace(pretraining_tp=pretraining_tp)
        self.intermediate_size = 16
        has = {n: bias is True or bias == n for n in ("gate_proj", "up_proj", "down_proj")}
        self.gate_proj, self.up_proj = nn.Linear(8, 16, bias=has["gate_proj"]), nn.Linear(8, 16, bias=has["up_proj"])
        self.down_proj, self.act_fn = nn.Linear(16, 8, bias=has["down_proj"]), nn.SiLU()

    def forward(self, x):
        if self.config.pretraining_tp > 1:
            slice = self.intermediate_size // self.config.pretraining_tp
            gate_proj_slices = self.gate_proj.weight.split(slice, dim=0)
            up_proj_slices = self.up_proj.weight.split(slice, dim=0)
            down_proj_slices = self.down_proj.weight.split(slice, dim=1)
            gate_proj = torch.cat([F.linear(x, gate_proj_slices[i]) for i in range(self.config.pretraining_tp)],
                                  dim=-1)
            up_proj = torch.cat([F.linear(x, up_proj_slices[i]) for i in range(self.config.pretraining_tp)], dim=-1)
            intermediate_states = (self.act_fn(gate_proj) * up_proj).split(slice, dim=2)
            down_proj = sum(F.linear(intermediate_states[i], down_proj_slices[i])
                            for i in range(self.config.pretraining_tp))
        else:
            down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


@pytest.mark.parametrize("pretraining_tp, bias", [(1, True), (2, False), (2, True), (2, "down_proj")])
def test_the_split_llama_mlp_of_older_transformers_upcycles_where_it_is_the_ffn(pretraining_tp, bias):
    """transformers < 4.48's LlamaMLP reads config.pretraining_tp (its forward's split form): found and upcycled,
    computing what it did, where that is the FFN (pretraining_tp 1, or no biases, which the split form leaves
    out); refused with biases (down_proj's alone too) and pretraining_tp > 1."""
    torch.manual_seed(0)
    net = nn.Sequential(_SplitLlamaMLP(pretraining_tp, bias)).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    expected = net(x)
    if pretraining_tp > 1 and bias:
        with pytest.raises(ValueError, match=r"its forward reads \[.*'pretraining_tp'.*\] besides the FFN"):
            upcycle_ffn(net, 2, 2, threshold_eps=0.0)
        return
    assert upcycle_ffn(net, 2, 2, router="threshold", threshold_eps=0.0) == ["0"]
    with moelora.use_backend("torch"):
        torch.testing.assert_close(net.eval()(x), expected, rtol=1e-12, atol=1e-12)


class _ResidualMLP(nn.Module):
    """BLOOM's MLP: its forward takes the residual and adds it."""

    def __init__(self):
        super().__init__()
        self.dense_h_to_4h, self.dense_4h_to_h = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, residual):
        return self.dense_4h_to_h(torch.relu(self.dense_h_to_4h(x))) + residual


def test_a_forward_taking_more_only_as_optional_or_variadic_arguments_is_upcycled():
    """A forward taking the hidden states and *args / **kwargs (or defaulted arguments) can be replaced by the FFN:
    only more than one required argument is refused."""
    class Variadic(_ActivatedMLP):
        def forward(self, x, *args, scale=1.0, **kwargs):
            return super().forward(x) * scale

    net = nn.Sequential(Variadic(nn.ReLU()))
    assert upcycle_ffn(net, 2, 2, ffn_modules=["0"], in_proj="fc1", out_proj="fc2", activation=nn.ReLU()) == ["0"]


def test_found_mlps_whose_forward_computes_more_than_the_ffn_are_refused():
    """An MLP found by its children's names whose forward does more than the FFN (Falcon-H1's
    multipliers; Gemma-3n's activation sparsity, DeepSeek-V4's clamps alike) raises naming what
    it reads, the model unchanged (the multipliers used to be dropped silently); named with
    ffn_modules it is the caller's FFN. A module whose forward takes more than the hidden states
    (BLOOM's MLP, taking the residual) raises at upcycling, not at the model's next call."""
    net = nn.Sequential(_ScaledGatedMLP())
    before = repr(net)
    with pytest.raises(ValueError, match=r"^0 \(_ScaledGatedMLP\): its forward reads \['down_multiplier', "
                                         r"'gate_multiplier'\] besides the FFN down_proj"):
        upcycle_ffn(net, 2, 1)
    assert repr(net) == before
    with pytest.warns(UserWarning, match=r"^0 \(_ScaledGatedMLP\): the FFN described .* differs from the module's "):
        assert upcycle_ffn(net, 2, 1, ffn_modules=["0"], in_proj="up_proj", gate_proj="gate_proj",
                           out_proj="down_proj", activation=nn.SiLU()) == ["0"]
    block = nn.Sequential(_ResidualMLP())
    with pytest.raises(ValueError, match=r"^0 \(_ResidualMLP\): its forward takes \['x', 'residual'\]"):
        upcycle_ffn(block, 2, 1, ffn_modules=["0"], in_proj="dense_h_to_4h", out_proj="dense_4h_to_h",
                    activation=torch.relu)
    assert isinstance(block[0], _ResidualMLP)


def test_checkpoints_saved_before_ffn_dropout_replay_without_the_dropout(tmp_path):
    """A record written before ffn_dropout existed holds its old behaviour, "drop" (the default now
    refuses an MLP holding dropout): such a checkpoint still loads."""
    import json

    base = _gpt2_with_mlp_dropout(0.1)
    upcycle_ffn(base, 2, 1, activation=base.transformer.h[0].mlp.act, ffn_dropout="drop", **GPT2_MLP)
    model = moelora.get_moelora_model(base, moelora.MoELoRAConfig(target_modules=["c_attn"], num_experts=2, top_k=1))
    _perturb_experts(model)
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "moelora_config.json").read_text())
    (record,) = [r for r in config["structure"] if r["op"] == "upcycle_ffn"]
    assert record["kwargs"].pop("ffn_dropout") == "drop"
    (tmp_path / "moelora_config.json").write_text(json.dumps(config))
    loaded = moelora.from_pretrained(_gpt2_with_mlp_dropout(0.1), str(tmp_path))
    ids = token_batch()
    assert loaded.model.transformer.h[0].mlp.dropout == 0.0
    assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)


def _llama_with_a_fused_mlp():
    """tiny LLaMA whose second layer holds a Phi-3-style fused MLP (a model with both kinds, as GLM-4V)."""
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    model = tiny_llama(num_layers=2)
    torch.manual_seed(1)
    model.model.layers[1].mlp = Phi3MLP(Phi3Config(hidden_size=16, intermediate_size=32, hidden_act="silu"))
    return model


def test_checkpoints_saved_before_fused_mlps_were_found_replay_without_them(tmp_path):
    """A record written before upcycle_ffn found Phi-3-style fused MLPs replays with
    fused_gate_up=False: a model holding both kinds gets the MoEFFNs the checkpoint holds (else
    its fused MLPs would be upcycled too, and the load would not fit the model)."""
    import json

    base = _llama_with_a_fused_mlp()
    assert upcycle_ffn(base, 2, 1, fused_gate_up=False) == ["model.layers.0.mlp"]
    model = moelora.get_moelora_model(base, moelora.MoELoRAConfig(target_modules=["q_proj"], num_experts=2, top_k=1))
    _perturb_experts(model)
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "moelora_config.json").read_text())
    (record,) = [r for r in config["structure"] if r["op"] == "upcycle_ffn"]
    assert record["kwargs"].pop("fused_gate_up") is False
    (tmp_path / "moelora_config.json").write_text(json.dumps(config))
    loaded = moelora.from_pretrained(_llama_with_a_fused_mlp(), str(tmp_path))
    assert not isinstance(loaded.model.model.layers[1].mlp, MoEFFN)
    ids = token_batch()
    assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)
    assert upcycle_ffn(_llama_with_a_fused_mlp(), 2, 1) == ["model.layers.0.mlp", "model.layers.1.mlp"]


@pytest.mark.parametrize("value", ["no", 0, None])
def test_fused_gate_up_must_be_a_bool(value):
    """fused_gate_up other than a bool raises TypeError naming it, before any change (a truthy "no" would find the
    fused MLPs, a falsy 0 or None leave them out)."""
    model = tiny_phi3()
    with pytest.raises(TypeError, match=rf"^fused_gate_up must be a bool, got {type(value).__name__} "):
        upcycle_ffn(model, 2, 1, fused_gate_up=value)
    assert not any(isinstance(m, MoEFFN) for m in model.modules())


def test_moeffn_top1_warns_with_its_own_advice():
    """MoEFFN normalises the kept gates, so at top_k=1 every gate is 1 and the router learns from the aux
    losses alone: it warns so, and not the Router's advice (router_renormalize=False, which MoEFFN does not
    take: following it raised TypeError). top_k >= 2 does not warn."""
    import warnings

    with pytest.warns(UserWarning) as record:
        MoEFFN(nn.Linear(8, 16), nn.Linear(16, 8), torch.relu, num_experts=4, top_k=1)
    messages = [str(w.message) for w in record]
    assert any("MoEFFN with top_k=1" in m for m in messages)
    assert not any("router_renormalize" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoEFFN(nn.Linear(8, 16), nn.Linear(16, 8), torch.relu, num_experts=4, top_k=2)


def test_moeffn_gives_its_router_its_arguments_and_device_and_weighs_its_losses_as_the_layers():
    """threshold_eps, threshold_eps_start, threshold_ramp_steps and router_jitter_noise are the Router's eps_end,
    eps_start, eps_ramp_steps and jitter_noise; the router sits on the projections' device; router_aux_loss_coef
    and router_z_loss_coef weigh the losses, by default as MoELoRAConfig's."""
    moe = MoEFFN(nn.Linear(8, 16), nn.Linear(16, 8), torch.relu, 4, 2, router="threshold", threshold_eps=0.3,
                 threshold_eps_start=0.1, threshold_ramp_steps=5, router_jitter_noise=0.2, router_aux_loss_coef=0.5,
                 router_z_loss_coef=0.25)
    r = moe.router
    assert (r.mode, r.eps_end, r.eps_start, r.eps_ramp_steps, r.jitter_noise) == ("threshold", 0.3, 0.1, 5, 0.2)
    assert (moe.aux_loss_coef, moe.z_loss_coef) == (0.5, 0.25)
    default = MoEFFN(nn.Linear(8, 16), nn.Linear(16, 8), torch.relu, 4, 2)
    assert (default.aux_loss_coef, default.z_loss_coef) == (moelora.MoELoRAConfig.router_aux_loss_coef,
                                                            moelora.MoELoRAConfig.router_z_loss_coef)
    meta = MoEFFN(nn.Linear(8, 16, device="meta"), nn.Linear(16, 8, device="meta"), torch.relu, 4, 2)
    assert meta.router.weight.is_meta and meta.w_in.is_meta


@pytest.mark.parametrize("activation", [nn.SiLU(), nn.GELU("tanh"), nn.Mish(), nn.ReLU()],
                         ids=["silu", "gelu_tanh", "mish", "relu"])
@pytest.mark.parametrize("kind", ["plain", "gated", "stacked"])
@pytest.mark.parametrize("tokens,d_ff,d,dtype", [(10, 12, 8, torch.float32), (11, 13, 8, torch.float32),
                                                 (11, 13, 5, torch.float64)])
def test_upcycled_block_is_bitwise_the_ffn_for_any_width_on_the_torch_backend(activation, kind, tokens, d_ff, d,
                                                                              dtype):
    """The torch backend's promise (all experts routed, eps = 0): the FFN's output bit for bit, whatever
    d_ff and the number of tokens. CPU elementwise kernels round by position (a vectorised body, then
    a scalar tail), so the activation over all experts' rows at once rounded the rows of an expert that
    do not start on a vector boundary otherwise than the FFN's (d_ff = 12, 10 tokens: about 1e-8); and
    CPU GEMMs round by the alignment of their input, so an expert segment starting at an odd byte offset
    of the rows (11 tokens of width 13: 572 bytes in) rounded otherwise than the FFN's GEMM (ReLU too), as an
    expert's weight did (fp64, model width 5, d_ff 13: the second expert's [13, 5] weight 520 bytes in)."""
    torch.manual_seed(0)
    fc_in, fc_out = nn.Linear(d, 2 * d_ff if kind == "stacked" else d_ff), nn.Linear(d_ff, d)
    gate = nn.Linear(d, d_ff) if kind == "gated" else None
    fc_in, fc_out, gate = (None if m is None else m.to(dtype) for m in (fc_in, fc_out, gate))
    moe = MoEFFN(fc_in, fc_out, activation, num_experts=4, top_k=4, gate_proj=gate, router="threshold",
                 stacked_gate=kind == "stacked")
    x = torch.randn(1, tokens, d, dtype=dtype)
    with torch.no_grad():
        if kind == "stacked":  # Phi-3's MLP
            g, up = fc_in(x).chunk(2, -1)
            dense = fc_out(activation(g) * up)
        else:
            dense = fc_out(activation(fc_in(x)) if gate is None else activation(gate(x)) * fc_in(x))
        with moelora.use_backend("torch"):
            assert torch.equal(moe(x), dense)


# ------------------------------------------------------------- the caller's activation against the module's own

def test_a_generic_ffns_activation_other_than_the_modules_own_is_refused():
    """GPT-2's MLP computes gelu_new (NewGELUActivation, its ``act``): upcycling it with ACT2FN["gelu"] (or
    CLIP's quick_gelu with gelu, T5 v1.1's gelu_new with gelu) used to change every output by ~1e-6 relative,
    silently. Now it raises naming the module's activation, the model unchanged; the module's own passes."""
    from transformers.activations import ACT2FN

    model = tiny_gpt2().double()
    before = repr(model)
    with pytest.raises(ValueError, match=r"^transformer.h.0.mlp \(GPT2MLP\): activation GELUActivation\(\) computes "
                                         r"something else than its activation module\(s\) \{'act': NewGELUActivation"):
        upcycle_ffn(model, 2, 2, activation=ACT2FN["gelu"], **GPT2_MLP)
    assert repr(model) == before and not any(isinstance(m, MoEFFN) for m in model.modules())
    ids = token_batch()
    expected = model(ids).logits
    # an equal activation given as another callable (NewGELU's formula as a lambda) passes
    upcycle_ffn(model, 2, 2, activation=lambda t: ACT2FN["gelu_new"](t), router="threshold", threshold_eps=0.0,
                **GPT2_MLP)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-12, atol=1e-12)


def test_a_generic_ffns_activation_equal_to_one_of_the_modules_activations_is_taken():
    """The activation check refuses an activation computing something else than every activation module the
    replaced module holds: one equal to any of them (here its act, not an unused Sigmoid it holds too) passes."""
    torch.manual_seed(0)
    net = nn.Sequential(_ActivatedMLP(nn.GELU())).double()
    net[0].unused = nn.Sigmoid()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    expected = net(x)
    upcycle_ffn(net, 2, 2, ffn_modules=["0"], in_proj="fc1", out_proj="fc2", activation=nn.GELU(), router="threshold",
                threshold_eps=0.0)
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gated", [False, True], ids=["t5", "t5_v1_1"])
def test_dropout_a_generic_ffn_applies_before_its_output_projection_is_not_taken_for_output_dropout(gated):
    """T5's DenseReluDense (and T5 v1.1's gated one) drops the activation's output, before wo: ffn_dropout="output"
    used to be taken at its word, moving that dropout onto the block's output (training changed silently). A probe
    forward (eval mode, hooks) now sees the dropout run before wo and raises; the model is unchanged, its modules'
    training flags and the RNG stream untouched; "drop" upcycles it (eval: the FFN's output)."""
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.activations import ACT2FN

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.1,
                   decoder_start_token_id=0, feed_forward_proj="gated-gelu" if gated else "relu")
    model = T5ForConditionalGeneration(cfg).double().train()
    model.decoder.block[0].layer[2].DenseReluDense.eval()  # a mixed training state, restored as it was
    kw = (dict(in_proj="wi_1", gate_proj="wi_0", activation=ACT2FN["gelu_new"]) if gated
          else dict(in_proj="wi", activation=nn.ReLU()))
    kw.update(ffn_modules=["DenseReluDense"], out_proj="wo")
    before, modes = repr(model), [m.training for m in model.modules()]
    torch.manual_seed(5)
    with pytest.raises(ValueError, match=r"^encoder.block.0.layer.1.DenseReluDense \(T5Dense(Gated)?ActDense\): its "
                                         r"forward applies dropout \['dropout'\] before the output projection"):
        upcycle_ffn(model, 2, 2, ffn_dropout="output", **kw)
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))  # the probe drew nothing
    assert repr(model) == before and [m.training for m in model.modules()] == modes
    model.eval()
    ids = token_batch()
    expected = model(input_ids=ids, decoder_input_ids=ids).logits
    upcycle_ffn(model, 2, 2, ffn_dropout="drop", router="threshold", threshold_eps=0.0, **kw)
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, expected, rtol=1e-12, atol=1e-12)


def test_output_dropouts_of_a_forward_not_calling_out_proj_as_a_module_are_not_taken_for_inner_ones():
    """A forward applying out_proj's weight itself (F.linear(h, self.fc2.weight, self.fc2.bias)), then two output
    dropouts: the probe saw no call of out_proj, and took every dropout but the last (order[:-1]) for one run
    before it, refusing ffn_dropout="output" for 'drop1' wrongly. Where out_proj never runs as a module the probe
    cannot place the dropouts, and the caller's word stands: they drop the output (eval: the dense FFN)."""
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
            self.drop1, self.drop2 = nn.Dropout(0.1), nn.Dropout(0.1)

        def forward(self, x):
            return self.drop2(self.drop1(F.linear(torch.relu(self.fc1(x)), self.fc2.weight, self.fc2.bias)))

    torch.manual_seed(0)
    net = nn.Sequential(MLP()).double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    expected = net(x)
    upcycle_ffn(net, 2, 2, ffn_modules=["0"], in_proj="fc1", out_proj="fc2", activation=torch.relu,
                ffn_dropout="output", router="threshold", threshold_eps=0.0)
    assert net[0].dropout == 0.1
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)


def test_output_dropouts_of_different_p_are_refused_for_output_dropout():
    """ffn_dropout="output" applies one dropout to MoEFFN's output: two output dropouts of different p are refused
    (MoEFFN would keep one's p)."""
    class TwoDrops(_ActivatedMLP):
        def __init__(self, p1, p2):
            super().__init__(nn.ReLU())
            self.drop1, self.drop2 = nn.Dropout(p1), nn.Dropout(p2)

        def forward(self, x):
            return self.drop2(self.drop1(super().forward(x)))

    kw = dict(ffn_modules=["0"], in_proj="fc1", out_proj="fc2", activation=nn.ReLU(), ffn_dropout="output")
    net = nn.Sequential(TwoDrops(0.1, 0.2))
    with pytest.raises(ValueError, match=r"^0 \(TwoDrops\) holds dropouts of different p \{'drop1': 0.1, "
                                         r"'drop2': 0.2\}"):
        upcycle_ffn(net, 2, 2, **kw)
    assert isinstance(net[0], TwoDrops)


@pytest.mark.parametrize("kind", [nn.AlphaDropout, nn.Dropout1d, nn.FeatureAlphaDropout])
def test_an_output_dropout_of_another_kind_than_nn_dropout_is_refused_for_output_dropout(kind):
    """ffn_dropout="output" applies nn.Dropout's element-wise F.dropout to MoEFFN's output: an MLP dropping its
    output with another kind (AlphaDropout keeps SELU's mean and variance, Dropout1d zeroes whole channels) was
    upcycled into an F.dropout of the same p, changing training silently. Now it is refused, naming the module and
    its type, the model unchanged; "drop" still upcycles it."""
    class OtherDrop(_ActivatedMLP):
        def __init__(self):
            super().__init__(nn.ReLU())
            self.drop = kind(0.1)

        def forward(self, x):
            return self.drop(super().forward(x))

    kw = dict(ffn_modules=["0"], in_proj="fc1", out_proj="fc2", activation=nn.ReLU())
    net = nn.Sequential(OtherDrop())
    with pytest.raises(ValueError, match=rf"^0 \(OtherDrop\) holds dropout of another kind than nn.Dropout "
                                         rf"\{{'drop': '{kind.__name__}'\}} \(name: type\)"):
        upcycle_ffn(net, 2, 2, ffn_dropout="output", **kw)
    assert isinstance(net[0], OtherDrop)
    assert upcycle_ffn(net, 2, 2, ffn_dropout="drop", **kw) == ["0"] and isinstance(net[0], MoEFFN)


def test_a_dropout_run_before_out_projs_last_call_is_taken_for_an_inner_one():
    """The probe places the dropouts against out_proj's last call: one run between two calls of out_proj (here
    on the hidden layer the second call takes) is before the output projection, and refused for "output"."""
    class TwoCalls(_ActivatedMLP):
        def __init__(self):
            super().__init__(nn.ReLU())
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h) + self.fc2(self.drop(h))

    with pytest.raises(ValueError, match=r"^0 \(TwoCalls\): its forward applies dropout \['drop'\] before the output"):
        upcycle_ffn(nn.Sequential(TwoCalls()), 2, 2, ffn_modules=["0"], in_proj="fc1", out_proj="fc2",
                    activation=nn.ReLU(), ffn_dropout="output")


def test_a_generic_gated_ffn_described_with_its_gate_and_up_projections_swapped_warns():
    """T5 v1.1's DenseReluDense computes wo(gelu_new(wi_0 x) * wi_1 x): described with in_proj="wi_0",
    gate_proj="wi_1" it used to be upcycled into another FFN silently (the model's output changed by O(1)).
    Now a probe forward of the module against the FFN described warns, naming the module; described right,
    nothing warns and the upcycled model is the dense one (float64)."""
    import warnings
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.activations import ACT2FN

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0,
                   decoder_start_token_id=0, feed_forward_proj="gated-gelu")
    ids = token_batch()
    kw = dict(ffn_modules=["DenseReluDense"], out_proj="wo", activation=ACT2FN["gelu_new"], router="threshold",
              threshold_eps=0.0)
    model = T5ForConditionalGeneration(cfg).double().eval()
    expected = model(input_ids=ids, decoder_input_ids=ids).logits
    with pytest.warns(UserWarning, match=r"^encoder.block.0.layer.1.DenseReluDense \(T5DenseGatedActDense\): the "
                                         r"FFN described .* differs from the module's forward on a probe by"):
        upcycle_ffn(model, 2, 2, in_proj="wi_0", gate_proj="wi_1", **kw)
    assert rel_err(model(input_ids=ids, decoder_input_ids=ids).logits, expected) > 1e-3  # what the warning is for
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        upcycle_ffn(model, 2, 2, in_proj="wi_1", gate_proj="wi_0", **kw)
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, expected, rtol=1e-12, atol=1e-12)


def test_a_float32_generic_ffn_off_its_forward_by_a_small_scale_warns():
    """In float32 the probe's tolerance is 1e-4 relative: a forward scaling the FFN by 1.001 (off by 1e-3) warns,
    the plain FFN does not."""
    import warnings

    class Scaled(_ActivatedMLP):
        def forward(self, x):
            return super().forward(x) * 1.001

    kw = dict(ffn_modules=["0"], in_proj="fc1", out_proj="fc2", activation=nn.ReLU())
    with pytest.warns(UserWarning, match=r"^0 \(Scaled\): the FFN described .* differs from the module's forward on a "
                                         r"probe by 1\.0e-03 relative"):
        upcycle_ffn(nn.Sequential(Scaled(nn.ReLU())), 2, 2, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        upcycle_ffn(nn.Sequential(_ActivatedMLP(nn.ReLU())), 2, 2, **kw)


def test_a_generic_ffn_whose_forward_returns_another_shape_is_upcycled_at_the_callers_word():
    """The probe compares the FFN described with the module's forward where their outputs have one shape; a forward
    returning another (here flattened) is not compared (the subtraction failed to broadcast): upcycled as told."""
    class Flat(_ActivatedMLP):
        def forward(self, x):
            return super().forward(x).flatten(-2)

    net = nn.Sequential(Flat(nn.ReLU()))
    assert upcycle_ffn(net, 2, 2, ffn_modules=["0"], in_proj="fc1", out_proj="fc2", activation=nn.ReLU()) == ["0"]
    assert isinstance(net[0], MoEFFN)


def test_moeffn_repr_names_its_sizes_and_whether_it_is_gated():
    """MoEFFN's repr: d_ff is the hidden width (half a stacked gate/up projection's rows), gated for a gate_proj or
    a stacked gate, the dropout where any."""
    plain = MoEFFN(nn.Linear(8, 16), nn.Linear(16, 8), torch.relu, 4, 2)
    assert plain.extra_repr() == "num_experts=4, top_k=2, d_in=8, d_ff=16, gated=False"
    gated = MoEFFN(nn.Linear(8, 16), nn.Linear(16, 8), F.silu, 4, 2, gate_proj=nn.Linear(8, 16))
    assert gated.extra_repr() == "num_experts=4, top_k=2, d_in=8, d_ff=16, gated=True"
    stacked = MoEFFN(nn.Linear(8, 32), nn.Linear(16, 8), F.silu, 4, 2, stacked_gate=True, dropout=0.25)
    assert stacked.extra_repr() == ("num_experts=4, top_k=2, d_in=8, d_ff=16, gated=True, stacked_gate=True, "
                                    "dropout=0.25")


class _ActivatedMLP(nn.Module):
    """fc2(act(fc1(x))), 8 -> 16 -> 8, with the activation module ``act``: a generic FFN upcycle_ffn is told of."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), act, nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_the_activation_check_takes_an_in_place_activation():
    """The caller's activation working in place (nn.ELU(inplace=True)) for an MLP holding nn.ELU(): the check
    comparing the two ran both on one probe tensor, which the caller's overwrote, and refused the same
    activation (ELU of ELU is not ELU)."""
    torch.manual_seed(0)
    net = nn.Sequential(_ActivatedMLP(nn.ELU())).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    expected = net(x)
    upcycle_ffn(net, 2, 2, ffn_modules=["0"], in_proj="fc1", out_proj="fc2", activation=nn.ELU(inplace=True),
                router="threshold", threshold_eps=0.0)
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)


def test_an_activation_module_with_parameters_is_kept_not_refused():
    """An activation with parameters (nn.PReLU) held by the replaced module is the FFN's: it is not taken for
    parameters upcycling would drop, and the upcycled block computes the FFN with it, generic or found."""
    torch.manual_seed(0)
    net = nn.Sequential(_ActivatedMLP(nn.PReLU(init=0.1))).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    expected = net(x)
    act = net[0].act
    upcycle_ffn(net, 2, 2, ffn_modules=["0"], in_proj="fc1", out_proj="fc2", activation=act, router="threshold",
                threshold_eps=0.0)
    assert any(p is act.weight for p in net.parameters())
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)
    llama = tiny_llama(1).double()
    llama.model.layers[0].mlp.act_fn = nn.PReLU(init=0.1).double()
    ids = token_batch(2, 5)
    expected = llama(ids).logits
    assert upcycle_ffn(llama, 2, 2, router="threshold", threshold_eps=0.0) == ["model.layers.0.mlp"]
    torch.testing.assert_close(llama(ids).logits, expected, rtol=1e-10, atol=1e-10)


def test_an_activation_computing_in_another_dtype_is_not_refused_by_the_activation_check():
    """The caller's activation computing in float32 (lambda t: F.gelu(t.float()), for an MLP holding nn.GELU())
    upcycled a float32 model before the activation check; the check compared its float32 result with the module's
    float64 one and raised torch.allclose's 'Float did not match Double'. Now it compares what it can (an
    activation that does not compute in float64 is not compared, as one that does not take float64 inputs)."""
    torch.manual_seed(0)
    net = nn.Sequential(_ActivatedMLP(nn.GELU()))
    x = torch.randn(2, 3, 8)
    expected = net(x)
    upcycle_ffn(net, 2, 2, ffn_modules=["0"], in_proj="fc1", out_proj="fc2", activation=lambda t: F.gelu(t.float()),
                router="threshold", threshold_eps=0.0)
    with moelora.use_backend("torch"):
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_llama, tiny_phi3])
def test_found_mlps_without_dropout_are_upcycled_without_running_their_forward(make):
    """The probe forward (97af3a6, 0f09bcc) ran every found LLaMA-style / Phi-3-style MLP once while upcycling,
    though its result is read only for a generic FFN or to place a dropout for ffn_dropout="output": an extra
    forward per layer (and per replayed checkpoint load) that fired the caller's forward hooks. Found MLPs holding
    no dropout are not run now; a generic FFN still is (its check reads the probe)."""
    model = make()
    calls = []
    for name, m in model.named_modules():
        if name.endswith(".mlp"):
            m.register_forward_hook(lambda *_, name=name: calls.append(name))
    assert upcycle_ffn(model, 2, 2) and calls == []
    net = nn.Sequential(_ScaledGatedMLP())
    net[0].register_forward_hook(lambda *_: calls.append("0"))
    with pytest.warns(UserWarning, match="differs from the module's forward on a probe"):  # its multipliers
        upcycle_ffn(net, 2, 2, ffn_modules=["0"], in_proj="up_proj", out_proj="down_proj", gate_proj="gate_proj",
                    activation=F.silu)
    assert calls == ["0"]


def test_a_found_fused_mlp_whose_forward_computes_more_than_the_ffn_is_refused():
    """A Phi-3-style MLP found by its children's names whose forward scales the FFN raises naming what it reads, as
    a LLaMA-style one does: MoEFFN would drop the scale silently."""
    class ScaledFused(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj, self.activation_fn = nn.Linear(8, 32), nn.Linear(16, 8), nn.SiLU()
            self.scale = 2.0

        def forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(up * self.activation_fn(gate)) * self.scale

    net = nn.Sequential(ScaledFused())
    with pytest.raises(ValueError, match=r"^0 \(ScaledFused\): its forward reads \['scale'\] besides the FFN "
                                         r"down_proj\(up \* activation_fn\(gate\)\)"):
        upcycle_ffn(net, 2, 2)
    assert isinstance(net[0], ScaledFused)


def test_a_found_mlps_dropout_before_down_proj_is_refused_for_output_dropout():
    """A found LLaMA-style or Phi-3-style MLP holding dropout is probed for ffn_dropout="output" as a generic FFN
    is: one run before down_proj (on the hidden layer) is refused, not moved onto the block's output."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
            self.act_fn, self.dropout = nn.SiLU(), nn.Dropout(0.1)

        def forward(self, x):
            return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))

    class Fused(nn.Module):  # Phi-3's MLP, its dropout on the hidden layer
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj = nn.Linear(8, 32), nn.Linear(16, 8)
            self.activation_fn, self.dropout = nn.SiLU(), nn.Dropout(0.1)

        def forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.dropout(up * self.activation_fn(gate)))

    for make in (Gated, Fused):
        net = nn.Sequential(make())
        with pytest.raises(ValueError, match=rf"^0 \({make.__name__}\): its forward applies dropout \['dropout'\] "
                                             "before the output"):
            upcycle_ffn(net, 2, 2, ffn_dropout="output")
        assert upcycle_ffn(net, 2, 2, ffn_dropout="drop") == ["0"]


def test_no_ffn_found_names_the_layouts_found_and_the_way_for_others():
    """transformers 5's ViT holds ViTMLP (fc1, fc2, activation_fn), no BERT-style intermediate / output any
    more: nothing is found, and the error says which layouts are found and how to name another; named, its
    upcycled model is the dense one."""
    from helpers import tiny_vit

    model = tiny_vit().double()
    with pytest.raises(ValueError, match=r"no FFN found to upcycle: upcycle_ffn finds BERT-style layers .* "
                                         r"LLaMA-style .* Phi-3-style .* ViT's fc1 / fc2.* give ffn_modules"):
        upcycle_ffn(model, 2, 2)
    pixels = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    expected = model(pixel_values=pixels).logits
    mlp = model.vit.layers[0].mlp
    upcycle_ffn(model, 2, 2, ffn_modules=["mlp"], in_proj="fc1", out_proj="fc2", activation=mlp.activation_fn,
                router="threshold", threshold_eps=0.0)
    torch.testing.assert_close(model(pixel_values=pixels).logits, expected, rtol=1e-12, atol=1e-12)


def test_modules_short_of_a_found_layout_are_not_found():
    """The layouts are found by all their children: a layer whose output has no dense or whose intermediate has no
    intermediate_act_fn, an MLP without act_fn, one whose gate_up_proj is a parameter (not a module) or without
    activation_fn are no FFN found (they used to be taken for one, and failed inside with another error)."""
    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.intermediate, self.output = nn.Module(), nn.Module()
            self.intermediate.dense, self.intermediate.intermediate_act_fn = nn.Linear(8, 16), nn.GELU()
            self.output.LayerNorm = nn.LayerNorm(8)

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(32, 8))
            self.down_proj, self.activation_fn = nn.Linear(16, 8), nn.SiLU()

    class BertWithoutAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.intermediate, self.output = nn.Module(), nn.Module()
            self.intermediate.dense, self.output.dense = nn.Linear(8, 16), nn.Linear(16, 8)

    class FusedWithoutActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj = nn.Linear(8, 32), nn.Linear(16, 8)

    for make in (Bert, Gated, Fused, BertWithoutAct, FusedWithoutActivation):
        net = nn.Sequential(make())
        with pytest.raises(ValueError, match="^no FFN found to upcycle"):
            upcycle_ffn(net, 2, 1)


def test_a_found_mlp_whose_class_defines_no_forward_is_upcycled():
    """A module holding LLaMA's MLP children whose class defines no forward (nn.Module's, which raises) has no
    forward reading more than the FFN: found and upcycled, not refused for the names nn.Module.forward reads."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
            self.act_fn = nn.SiLU()

    net = nn.Sequential(Gated())
    assert upcycle_ffn(net, 2, 2) == ["0"]
    assert isinstance(net[0], MoEFFN)


def _hf_layouts():
    """(name, model factory, upcycle_ffn kwargs (None: found), the dense projection whose gradient the experts' w_in
    gradients sum to, inputs) of transformers 5's FFN layouts, tiny, in float64."""
    import transformers as tf
    from transformers.activations import ACT2FN

    dec = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    t5 = dict(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2, dropout_rate=0.0,
              decoder_start_token_id=0)

    def mlp(name):
        return lambda model: dict(ffn_modules=["mlp"], in_proj="fc1", out_proj="fc2",
                                  activation=model.get_submodule(name).activation_fn)

    return {
        "qwen3": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=8, **dec)), None, "model.layers.0.mlp",
                  "up_proj"),
        "gemma3_gelu_pytorch_tanh": (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=8, **dec)), None,
                                     "model.layers.0.mlp", "up_proj"),
        "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**{k: dec[k] for k in list(dec)[:5]})),
                     lambda m: dict(ffn_modules=["mlp"], in_proj="dense_h_to_4h", out_proj="dense_4h_to_h",
                                    activation=m.gpt_neox.layers[0].mlp.act), "gpt_neox.layers.0.mlp", "dense_h_to_4h"),
        "clip_quick_gelu": (lambda: tf.CLIPTextModel(tf.CLIPTextConfig(**{k: dec[k] for k in list(dec)[:5]})),
                            mlp("encoder.layers.0.mlp"), "encoder.layers.0.mlp", "fc1"),
        "t5_v1_1_gated": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(feed_forward_proj="gated-gelu", **t5)),
                          lambda m: dict(ffn_modules=["DenseReluDense"], in_proj="wi_1", gate_proj="wi_0",
                                         out_proj="wo", activation=ACT2FN["gelu_new"]),
                          "encoder.block.0.layer.1.DenseReluDense", "wi_1"),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["qwen3", "gemma3_gelu_pytorch_tanh", "gpt_neox", "clip_quick_gelu",
                                    "t5_v1_1_gated"])
def test_hf_ffn_layouts_upcycle_to_the_dense_model_with_gradients(layout, backend):
    """Coverage over transformers 5's FFN layouts (float64, top-2 of 3 experts, training mode without dropout):
    the upcycled model's output is the dense model's, and the experts' w_in gradients sum to the dense
    projection's (the kept gates sum to 1); on the Triton backend (interpreter) to its rounding."""
    make, kwargs, ffn, proj = _hf_layouts()[layout]
    torch.manual_seed(0)
    dense = make().double().train()
    model = copy.deepcopy(dense)
    ids = token_batch()
    inputs = dict(input_ids=ids, decoder_input_ids=ids) if layout.startswith("t5") else dict(input_ids=ids)

    def out(m):
        o = m(**inputs)
        return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state

    expected = out(dense)
    dy = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (expected * dy).sum().backward()
    upcycle_ffn(model, 3, 2, router="threshold", threshold_eps=0.1, **(kwargs(model) if kwargs else {}))
    with moelora.use_backend(backend):
        got = out(model)
        (got * dy).sum().backward()
    assert rel_err(got, expected) < 1e-12
    moe = model.get_submodule(ffn)
    assert isinstance(moe, MoEFFN)
    assert rel_err(moe.w_in.grad.sum(0), dense.get_submodule(f"{ffn}.{proj}").weight.grad) < 1e-12


def test_checkpoints_whose_record_a_later_check_refuses_load_as_trained_with_a_warning(tmp_path):
    """The activation check and the T5 dropout check came after checkpoints were written with what they refuse
    (gelu for GPT-2's gelu_new MLP; ffn_dropout="output" on T5's DenseReluDense). Such a checkpoint was trained
    with the FFN its record describes, so from_pretrained replays it so, warning, where upcycle_ffn itself refuses:
    loading raised the new ValueError before."""
    import json
    import warnings
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.activations import ACT2FN

    def t5():
        torch.manual_seed(0)
        return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                   num_heads=2, dropout_rate=0.1, decoder_start_token_id=0))

    t5_ffn = dict(ffn_modules=["DenseReluDense"], in_proj="wi", out_proj="wo", activation=nn.ReLU())
    cases = [(lambda: _gpt2_with_mlp_dropout(0.0), dict(GPT2_MLP, activation=ACT2FN["gelu_new"]), ["c_attn"],
              {"activation": "gelu"}, "computes something else than its activation"),
             (t5, dict(t5_ffn, ffn_dropout="drop"), ["q"], {"ffn_dropout": "output"},
              "applies dropout \\['dropout'\\] before the output projection")]
    for i, (make, upcycle_kwargs, targets, edit, refusal) in enumerate(cases):
        base = make()
        upcycle_ffn(base, 2, 2, **upcycle_kwargs)
        model = moelora.get_moelora_model(base, moelora.MoELoRAConfig(target_modules=targets, num_experts=2, top_k=2))
        out = tmp_path / str(i)
        model.save_pretrained(str(out))
        config = json.loads((out / "moelora_config.json").read_text())
        (record,) = [r for r in config["structure"] if r["op"] == "upcycle_ffn"]
        record["kwargs"].update(edit)  # as a checkpoint written before the check holds it
        (out / "moelora_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=refusal):
            upcycle_ffn(make(), 2, 2, **{**upcycle_kwargs, **{k: ACT2FN[v] if k == "activation" else v
                                                              for k, v in edit.items()}})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = moelora.from_pretrained(make(), str(out))
        assert any(re.search(refusal, str(w.message)) and "loaded as it was trained" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]
        ffns = [m for m in loaded.modules() if isinstance(m, MoEFFN)]
        assert ffns and all(
            (type(f.activation) is type(ACT2FN["gelu"])) if "activation" in edit else f.dropout == 0.1 for f in ffns)


def test_a_generic_ffn_built_on_the_meta_device_upcycles_with_its_activation_given():
    """Meta-device init (``with torch.device("meta")``, as FSDP2's recipe builds the model): the activation check
    made its probe under the block's default device, a meta tensor, and comparing the two activations' values
    raised "Tensor.item() cannot be called on meta tensors". The probe is a CPU tensor, whatever the default
    device; a wrong activation is still refused there."""
    from transformers.activations import ACT2FN

    ffn = dict(ffn_modules=["0"], in_proj="fc1", out_proj="fc2")
    with torch.device("meta"):
        assert upcycle_ffn(nn.Sequential(_ActivatedMLP(nn.GELU())), 3, 2, activation=F.gelu, **ffn) == ["0"]
        refused = nn.Sequential(_ActivatedMLP(nn.GELU()))
        with pytest.raises(ValueError, match="computes something else than its activation"):
            upcycle_ffn(refused, 3, 2, activation=ACT2FN["gelu_new"], **ffn)
    assert isinstance(refused[0], _ActivatedMLP) and refused[0].fc1.weight.is_meta
