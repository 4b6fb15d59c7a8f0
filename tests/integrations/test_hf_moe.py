"""MoE-LoRA adapters on transformers' own mixture-of-experts models (tiny random configs, CPU).

transformers stores the experts of Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, PhiMoE, ... as 3-D
parameters [E, ...] (``experts.gate_up_proj``, ``experts.down_proj``), not as nn.Linear per
expert, and their routers as modules that are no nn.Linear (or, PhiMoE's and Llama-4's, an
nn.Linear subclass whose forward returns the routing). moelora adapts modules only: naming the
stacked experts raises, naming them beside adaptable modules (or 'all-linear') warns that they
are left out, 'all-linear' leaves the routing nn.Linear subclasses out, and upcycle_ffn refuses
a block that is a mixture of experts already. What it does adapt (attention, shared experts)
trains, generates, saves, loads and merges as on a dense model, and the model's own router aux
loss and moelora's add up in ``outputs.loss``, each once."""

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import moelora

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

COMMON = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
}


def _build(name):
    config = transformers.AutoConfig.for_model(name, **COMMON, **MODELS[name])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _config(target, **extra):
    return moelora.MoELoRAConfig(target_modules=target, **{**dict(num_experts=4, top_k=2, r=4), **extra})


def _adapted(model):
    return [n for n, m in moelora.tuner.targets.unwrap(model).named_modules() if isinstance(m, moelora.MoELoRALinear)]


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("target", [["gate_up_proj"], ["q_proj", "down_proj"], ["experts"], r".*experts.*",
                                    ["q_proj", "gate_proj", "up_proj"], ["q_proj", "w1", "w3"], r".*\.(w2|up_proj)"])
def test_naming_stacked_experts_raises_saying_they_are_parameters(name, target):
    """The experts' weights are 3-D parameters, not modules: a target naming only them raised "not found
    among the model's linear ... modules" (or a regex "matches no linear module") without saying why; the
    error now says they are stacked expert parameters moelora cannot adapt (PEFT's target_parameters). The names
    of transformers 4's per-expert projections, which transformers 5 fuses into gate_up_proj (gate_proj and
    up_proj; Mixtral's w1 and w3) and down_proj (Mixtral's w2), as a LLaMA recipe or an older config gives them,
    raised the bare "not found"; they now name those stacked parameters too, as PEFT maps them."""
    model = _build(name)
    with pytest.raises(ValueError, match=r"stacked in one tensor \(model\.layers\.0\.mlp\.experts\.(gate_up_proj|"
                                         r"down_proj) \[4, .*not parameters.*target_parameters"):
        moelora.get_moelora_model(model, _config(target))
    assert not _adapted(model) and all(p.requires_grad for p in model.parameters())  # left as it was


@pytest.mark.parametrize("name, target, expected", [
    ("qwen2_moe", ["down_proj"], "mlp.shared_expert.down_proj"),   # the shared expert's is an nn.Linear
    ("qwen2_moe", ["gate_proj", "up_proj"], "mlp.shared_expert.gate_proj"),  # the experts': fused in gate_up_proj
    ("qwen2_moe", r".*\.mlp\..*", "mlp.shared_expert.up_proj"),
    ("mixtral", "all-linear", "self_attn.q_proj"),
    ("olmoe", "all-linear", "self_attn.o_proj"),
])
def test_stacked_experts_left_out_beside_adapted_modules_warn(name, target, expected):
    """A LLaMA recipe's ["down_proj"] on Qwen2-MoE adapts the shared expert's down_proj and silently left the
    routed experts' (experts.down_proj, a 3-D parameter) as they were; 'all-linear' on Mixtral adapts the
    attention only, while PEFT's adapts the experts too. Both now warn, naming the parameters left out. So does
    ["gate_proj", "up_proj"], whose routed experts' projections transformers 5 fuses into experts.gate_up_proj
    (it adapted the shared expert's and left the experts' without a warning)."""
    model = _build(name)
    with pytest.warns(UserWarning, match=r"parameter\(s\) holding the stacked weights of mixture-of-experts experts "
                                         r"\(e\.g\. model\.layers\.0\.mlp\.experts\.(gate_up_proj|down_proj).*"
                                         r"keep their pretrained weights"):
        wrapped = moelora.get_moelora_model(model, _config(target))
    adapted = _adapted(wrapped)
    assert f"model.layers.1.{expected}" in adapted and not any(".experts" in n for n in adapted)


def test_attention_targets_and_excluded_experts_do_not_warn(recwarn):
    """Excluding the experts module silences the stacked-experts warning of 'all-linear', also for DBRX, whose
    experts module holds its stacked weights one module down (experts.mlp.w1: the warning came all the same)."""
    moelora.get_moelora_model(_build("mixtral"), _config(["q_proj", "v_proj"]))
    moelora.get_moelora_model(_build("mixtral"), _config("all-linear", exclude_modules=["experts"]))
    wrapped = moelora.get_moelora_model(_dbrx(), _config("all-linear", exclude_modules=["experts"]))
    assert "transformer.blocks.1.norm_attn_norm.attn.Wqkv" in _adapted(wrapped)
    assert not [w for w in recwarn if "stacked weights" in str(w.message)]


def test_modules_of_classes_named_for_experts_without_stacked_parameters_do_not_warn(recwarn):
    """Only parameters of 3-D or more held by a module of a class named for experts themselves are stacked experts:
    a convolution of such a class (4-D weight) is a module moelora adapts, and such a module holding its experts as
    modules (convolutions) holds no stacked parameter. Neither warns."""
    class ExpertConv(torch.nn.Conv2d):
        pass

    class ConvExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = torch.nn.ModuleList(torch.nn.Conv2d(3, 4, 3) for _ in range(2))

    def make():
        return torch.nn.Sequential(torch.nn.Linear(4, 4), ExpertConv(3, 4, 3), ConvExperts())

    wrapped = moelora.get_moelora_model(make(), _config(["1"]))
    assert isinstance(moelora.tuner.targets.unwrap(wrapped)[1], moelora.MoELoRAConv)
    assert _adapted(moelora.get_moelora_model(make(), _config("all-linear"))) == ["0"]
    assert not [w for w in recwarn if "stacked weights" in str(w.message)]


def test_all_linear_leaves_out_routers_that_are_linear_subclasses():
    """PhiMoE's router is an nn.Linear subclass whose forward returns (logits, weights, expert ids):
    'all-linear' wrapped it and the first forward failed with AttributeError: 'tuple' object has no
    attribute 'to'. 'all-linear' now leaves it out; naming it raises at injection, saying why."""
    model = _build("phimoe")
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="stacked weights"):
        wrapped = moelora.get_moelora_model(model, _config("all-linear"))
    assert "model.layers.0.self_attn.q_proj" in _adapted(wrapped)
    assert type(model.model.layers[0].mlp.router).__name__ == "PhimoeTopKRouter"
    assert wrapped(input_ids=ids, labels=ids).loss.isfinite()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.router is a PhimoeTopKRouter.*routes the experts.*"
                                         r"exclude_modules"):
        moelora.get_moelora_model(_build("phimoe"), _config(["q_proj", "router"]))


@pytest.mark.parametrize("target", ["all-linear", ["shared_expert_gate"]])
def test_a_quantised_linear_beside_the_experts_is_no_router(target, tmp_path):
    """QLoRA on Qwen2-MoE: bitsandbytes makes the block's shared_expert_gate (nn.Linear(hidden, 1)) a Linear4bit, an
    nn.Linear subclass with a forward of its own, and moelora took it for a router like PhiMoE's: 'all-linear' left
    it out silently (it adapts it in the model loaded without quantisation, as documented) and naming it raised
    "is a Linear4bit ... that routes the experts". A router gives one logit per expert; the gate is adapted now, and
    its adapter trains."""
    pytest.importorskip("bitsandbytes")
    config = transformers.AutoConfig.for_model("qwen2_moe", **{**COMMON, **MODELS["qwen2_moe"], "hidden_size": 64,
                                                               "num_hidden_layers": 1, "moe_intermediate_size": 64,
                                                               "shared_expert_intermediate_size": 64})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    assert type(model.model.layers[0].mlp.shared_expert_gate).__name__ == "Linear4bit"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'all-linear': the stacked experts
        wrapped = _randomized(moelora.get_moelora_model(model, _config(target)))
    assert "model.layers.0.mlp.shared_expert_gate" in _adapted(wrapped)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].mlp.shared_expert_gate.lora_B.grad.abs().sum() > 0


def _dbrx():
    """Tiny DBRX, whose experts' weights are stacked in 2-D parameters, the experts' rows one after another
    (DbrxExpertGLU.w1, v1, w2 [E * ffn_hidden_size, d_model])."""
    config = transformers.DbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=100,
                                     attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
                                     ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("target", [["w1"], ["Wqkv", "w2"], ["mlp"], r".*\.mlp\.(w1|v1)"])
def test_dbrx_experts_stacked_in_2d_parameters_are_named_and_warned_of_as_stacked_experts(target):
    """DBRX stacks its experts' rows in 2-D parameters ([E * ffn, d]), not in 3-D ones: naming them raised the
    bare "not found among the model's linear ... modules" ("matches no linear module"), and 'all-linear' adapted
    the attention and the router without the warning that the experts keep their weights. Both now say they are
    stacked expert parameters, as for Mixtral's 3-D ones; the GPT-OSS experts' 2-D biases [E, ...] are no more
    listed than before."""
    model = _dbrx()
    with pytest.raises(ValueError, match=r"stacked in one tensor \(transformer\.blocks\.0\.ffn\.experts\.mlp\.(w1|v1|"
                                         r"w2) \[64, 32\].*target_parameters"):
        moelora.get_moelora_model(model, _config(target))
    assert not _adapted(model)
    with pytest.warns(UserWarning, match=r"the 6 parameter\(s\) holding the stacked weights of mixture-of-experts "
                                         r"experts \(e\.g\. transformer\.blocks\.0\.ffn\.experts\.mlp\.w1, "
                                         r"transformer\.blocks\.0\.ffn\.experts\.mlp\.v1\)"):
        wrapped = moelora.get_moelora_model(model, _config("all-linear"))
    assert "transformer.blocks.1.norm_attn_norm.attn.Wqkv" in _adapted(wrapped)
    with pytest.warns(UserWarning, match=r"the 4 parameter\(s\) holding the stacked weights .* \(e\.g\. "
                                         r"model\.layers\.0\.mlp\.experts\.gate_up_proj, "
                                         r"model\.layers\.0\.mlp\.experts\.down_proj\)"):
        moelora.get_moelora_model(_build("gpt_oss"), _config("all-linear"))


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("ffn_modules, in_proj, out_proj", [(["mlp"], "experts", "experts"),
                                                            (["experts"], "gate_up_proj", "down_proj")])
def test_upcycle_ffn_refuses_a_block_that_is_a_mixture_of_experts(name, ffn_modules, in_proj, out_proj):
    """Naming a MoE block or its experts as the FFN raised "lacks one of in_proj='gate_up_proj', ..." (the
    experts module has gate_up_proj, as a stacked parameter) or listed the router as a stray parameter; it
    now says the module holds stacked expert weights (named from the module named), a mixture of experts already."""
    model = _build(name)
    with pytest.raises(ValueError, match=r"holds the weights of a mixture of experts stacked in 2 parameter\(s\) "
                                         r"\(e\.g\. (experts\.)?\w+ \[4, .*mixture of experts already"):
        moelora.upcycle_ffn(model, ffn_modules=ffn_modules, in_proj=in_proj, out_proj=out_proj, activation=F.silu)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(\w+\) is already a mixture of experts"):
        moelora.upcycle_ffn(model)


def _randomized(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_gamma" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"])
def test_loss_adds_the_models_router_loss_and_moeloras_once(name):
    """outputs.loss of the wrapper = the wrapped model's loss (cross-entropy + router_aux_loss_coef x its own
    load-balancing loss, with output_router_logits) + moelora.aux_loss, each once; outputs.aux_loss stays the
    model's own. Every trainable tensor gets a gradient, with gradient checkpointing the same ones."""
    with pytest.warns(UserWarning, match="stacked weights"):
        wrapped = _randomized(moelora.get_moelora_model(_build(name), _config("all-linear")))
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    inner = wrapped.model
    out = wrapped(input_ids=ids, labels=ids, output_router_logits=True)
    ours = moelora.aux_loss(wrapped)
    task = inner(input_ids=ids, labels=ids).loss
    bare = inner(input_ids=ids, labels=ids, output_router_logits=True)
    assert ours > 0 and out.aux_loss > 0
    torch.testing.assert_close(bare.loss, task + inner.config.router_aux_loss_coef * bare.aux_loss)
    torch.testing.assert_close(out.loss, bare.loss + ours)
    torch.testing.assert_close(out.aux_loss, bare.aux_loss)
    out.loss.backward()
    trained = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in trained.items()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    wrapped.zero_grad()
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped(input_ids=ids, labels=ids, output_router_logits=True).loss.backward()
    for n, p in trained.items():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"])
def test_generate_save_load_and_merge(name, tmp_path):
    """Greedy generate with the KV cache on a left-padded batch equals argmax over full forwards; the
    adapter reloads into a fresh model with equal logits; a merged single-expert adapter gives the
    logits of the unmerged one."""
    with pytest.warns(UserWarning, match="stacked weights"):
        wrapped = _randomized(moelora.get_moelora_model(_build(name), _config("all-linear"))).eval()
    prompt = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        generated = wrapped.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=4, do_sample=False)
        seq = prompt
        for _ in range(4):
            logits = wrapped(input_ids=seq, attention_mask=mask).logits[:, -1]
            seq, mask = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1), F.pad(mask, (0, 1), value=1)
        assert torch.equal(generated, seq)
        ids = seq
        logits = wrapped(input_ids=ids).logits
        assert not torch.allclose(logits, _build(name)(input_ids=ids).logits)  # the adapters act
        wrapped.save_pretrained(str(tmp_path))
        with pytest.warns(UserWarning, match="stacked weights"):
            reloaded = moelora.from_pretrained(_build(name), str(tmp_path))
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0, atol=0)
        with pytest.warns(UserWarning, match="stacked weights"):
            single = _randomized(moelora.get_moelora_model(_build(name), _config("all-linear", num_experts=1,
                                                                                 top_k=1))).eval()
        expected = single(input_ids=ids).logits
        merged = single.merge_and_unload()
        assert not _adapted(merged)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def _float64_moe_block(x, router_weight, gate_up, down, top_k, renormalize):
    """The float64 MoE block written out: softmax of x W_r^T, top-k, kept probabilities renormalised
    or not, sum_j w_j down_e (silu(gate) * up) with [gate; up] = gate_up_e x, per token and slot."""
    probs = (x @ router_weight.T).softmax(-1)
    top, ids = probs.topk(top_k, -1)
    if renormalize:
        top = top / top.sum(-1, keepdim=True)
    out = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(top_k):
            gate, up = (gate_up[ids[t, j]] @ x[t]).chunk(2)
            acc = acc + top[t, j] * (down[ids[t, j]] @ (F.silu(gate) * up))
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,top_k", [("mixtral", 2), ("mixtral", 4), ("qwen3_moe", 3), ("olmoe", 1)])
def test_moeffn_holding_a_transformers_moe_blocks_weights_computes_that_block(name, top_k, backend):
    """MoEFFN (router="softmax_topk", stacked_gate=True) given the weights of transformers' Mixtral block,
    or Qwen3-MoE's or OLMoE's with norm_topk_prob=True (experts.gate_up_proj -> w_in, experts.down_proj -> w_out,
    gate.weight -> router.weight): the output and every gradient (x, experts, router) equal the float64
    block written out, T = 1 too; the block itself agrees to its fp32 routing; the load-balancing loss is
    transformers' load_balancing_loss_func of the logits and the z-loss Switch's router_z_loss_func."""
    from moelora.modules.ffn import MoEFFN
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    extra = {} if name == "mixtral" else dict(norm_topk_prob=True)
    config = transformers.AutoConfig.for_model(name, **{**COMMON, **MODELS[name], "hidden_size": 8,
                                                        "intermediate_size": 12, "moe_intermediate_size": 12,
                                                        "num_experts_per_tok": top_k, **extra})
    modeling = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    block_class = {"mixtral": "MixtralSparseMoeBlock", "qwen3_moe": "Qwen3MoeSparseMoeBlock",
                   "olmoe": "OlmoeSparseMoeBlock"}[name]
    block = getattr(modeling, block_class)(config).double()  # standalone: the experts' eager loop takes float64
    torch.manual_seed(1)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    experts, E = block.experts, block.experts.gate_up_proj.shape[0]
    with warnings.catch_warnings():  # top_k = 1: MoEFFN's gates are then 1 (it warns so)
        warnings.simplefilter("ignore")
        moe = MoEFFN(torch.nn.Linear(8, 24, bias=False), torch.nn.Linear(12, 8, bias=False), F.silu, E, top_k,
                     router="softmax_topk", stacked_gate=True).double()
    with torch.no_grad():
        for mine, theirs in ((moe.w_in, experts.gate_up_proj), (moe.w_out, experts.down_proj),
                             (moe.router.weight, block.gate.weight)):
            mine.copy_(theirs)
    for T in (1, 7):
        x = torch.randn(1, T, 8, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(1, T, 8, dtype=torch.float64)
        with moelora.use_backend(backend):
            y = moe(x)
        got = torch.autograd.grad(y, (x, moe.w_in, moe.w_out, moe.router.weight), grad)
        leaves = [t.detach().clone().requires_grad_() for t in (x.reshape(T, 8), experts.gate_up_proj,
                                                                experts.down_proj, block.gate.weight)]
        ref = _float64_moe_block(leaves[0], leaves[3], leaves[1], leaves[2], top_k, renormalize=True)
        expected = torch.autograd.grad(ref, leaves, grad.reshape(T, 8))
        torch.testing.assert_close(y.reshape(T, 8), ref, rtol=1e-12, atol=1e-12)
        for g, r in zip(got, expected):
            torch.testing.assert_close(g.reshape(r.shape), r, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(block(x), y, rtol=1e-6, atol=1e-6)  # transformers' routing is fp32
        logits = (leaves[0] @ leaves[3].T).detach()
        stats = moe.last_router_stats
        lb = load_balancing_loss_func((logits,), E, top_k).double()  # counted in fp32
        torch.testing.assert_close(stats["load_balancing_loss"], lb, rtol=1e-6, atol=0)
        torch.testing.assert_close(stats["z_loss"], router_z_loss_func(logits[None]), rtol=1e-6, atol=0)
        weighted = 0.01 * stats["load_balancing_loss"] + 0.001 * stats["z_loss"]  # the default coefficients
        torch.testing.assert_close(moe.last_aux_loss.detach(), weighted)
