"""MoE-LoRA adapters on quantised base layers (QLoRA): a torchao-quantised ``nn.Linear`` (its weight a
tensor subclass, the layer still an ``nn.Linear``) and bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``
(an ``nn.Linear`` subclass with a packed integer weight and a forward of its own). The adapters are fp32
and the layer computes base_layer(x) + the adapter (the composed path: the fused op's GEMM never reads a
quantised weight); what needs the weight as a dense tensor (merging, DoRA's magnitude, upcycling an FFN)
is refused, with nothing changed. The first tests mimic both kinds with tensors built here, so that they
run without torchao and bitsandbytes; the others run on the libraries where they are installed."""

import collections
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora
from helpers import rel_err
from moelora import MoELoRALinear

pytestmark = pytest.mark.usefixtures("single_torch_thread")
D_IN, D_OUT, T = 64, 32, 8  # bitsandbytes' CPU 4-bit inference needs d_in % 64 == 0 and d_out % 32 == 0
BACKENDS = ["torch", "triton"]


class Int8RowWeight(torch.Tensor):
    """A weight-only int8 tensor subclass as torchao's ``Int8Tensor``: int8 rows ``qdata`` and their fp32
    scales; ``F.linear`` computes with the dequantised weight, and every other operator raises, as
    torchao's unimplemented ones do (``aten.t``, ``aten.add``, ...)."""

    @staticmethod
    def __new__(cls, qdata, scale, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=dtype, device=qdata.device)

    def __init__(self, qdata, scale, dtype):
        self.qdata, self.scale = qdata, scale

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8RowWeight":
        scale = w.detach().abs().amax(dim=1, keepdim=True) / 127
        return cls((w.detach() / scale).round().clamp(-127, 127).to(torch.int8), scale, w.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.qdata.to(self.dtype) * self.scale.to(self.dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w, *rest = args
            return F.linear(x, w.dequantize(), *rest, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return cls(args[0].qdata, args[0].scale, args[0].dtype)
        raise NotImplementedError(f"{cls.__name__} does not implement {func}")


def int8_subclass_linear(bias=True) -> nn.Linear:
    """A plain nn.Linear whose weight became an Int8RowWeight parameter (what torchao's quantize_ does)."""
    lin = nn.Linear(D_IN, D_OUT, bias=bias)
    lin.weight = nn.Parameter(Int8RowWeight.from_float(lin.weight), requires_grad=False)
    return lin


class PackedInt8Linear(nn.Linear):
    """An nn.Linear subclass holding its weight as an int8 parameter plus row scales, with a forward of its own
    that dequantises: bitsandbytes' Linear8bitLt / Linear4bit (whose Int8Params / Params4bit have an integer
    dtype, Params4bit even a packed [n / 2, 1] shape)."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        w = self.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.weight = nn.Parameter((w / scale).round().clamp(-127, 127).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale

    def forward(self, x):
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)


def _dense_copy(base: nn.Module, dequantized: torch.Tensor) -> nn.Linear:
    """An fp64 nn.Linear computing what ``base`` computes (its dequantised weight)."""
    plain = nn.Linear(D_IN, D_OUT, bias=base.bias is not None).double()
    with torch.no_grad():
        plain.weight.copy_(dequantized)
        if base.bias is not None:
            plain.bias.copy_(base.bias)
    return plain


class _InFloat64(nn.Linear):
    """The quantised layer ``q`` itself as an fp64 layer (its input rounded to fp32): the reference base of a
    layer that quantises its input too (bitsandbytes' LLM.int8), whose output no dense weight gives."""

    def __init__(self, q: nn.Module):
        super().__init__(q.in_features, q.out_features, bias=False, dtype=torch.float64)
        self.q = [q]  # not a submodule: the reference's .double() must not cast the layer under test

    def forward(self, x):
        return self.q[0](x.float()).double()


def _check_against_dequantized(base: nn.Module, dequantized, backend: str, tol: float = 1e-5, **settings) -> None:
    """A MoELoRALinear over the quantised ``base`` against the same adapter over an fp64 nn.Linear holding the
    ``dequantized`` weight (None: over ``base`` itself, :class:`_InFloat64`): output and gradients of x and
    the adapters; the quantised weight gets no gradient and is not changed."""
    torch.manual_seed(0)
    settings = {**dict(num_experts=4, top_k=2, r=4, init_lora_weights=False), **settings}
    layer = MoELoRALinear(base, **settings)
    assert layer.lora_B.dtype == torch.float32 and layer.lora_A.requires_grad
    ref_base = _InFloat64(base) if dequantized is None else _dense_copy(base, dequantized)
    reference = MoELoRALinear(ref_base, **settings)
    reference.load_state_dict({k: v for k, v in layer.state_dict().items() if ".base_layer." not in f".{k}"},
                              strict=False)
    before = {k: v.clone() for k, v in base.state_dict().items() if type(v) in (torch.Tensor, nn.Parameter)}
    reference = reference.double()
    x = torch.randn(T, D_IN, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    with moelora.use_backend(backend):
        y = layer(x)
    y_ref = reference(x64)
    assert y.dtype == torch.float32 and rel_err(y, y_ref) < tol
    dy = torch.randn_like(y_ref)
    y.backward(dy.float())
    y_ref.backward(dy)
    assert rel_err(x.grad, x64.grad) < tol
    for name in ("lora_A", "lora_B", "router.weight"):
        grad, grad_ref = layer.get_parameter(name).grad, reference.get_parameter(name).grad
        assert grad is not None and rel_err(grad, grad_ref) < tol, name
    assert base.weight.grad is None
    for k, v in base.state_dict().items():
        if k in before:
            assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- without the libraries
@pytest.mark.parametrize("backend", BACKENDS)
def test_subclass_weight_runs_the_base_layer(backend):
    """A plain nn.Linear with a tensor-subclass weight (torchao's) computes base_layer(x) + the adapter: the
    fused op's own GEMM over the weight (aten.t + addmm, which torchao's Int8Tensor does not implement)
    is not used."""
    base = int8_subclass_linear()
    _check_against_dequantized(base, base.weight.dequantize(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_integer_weight_gets_fp32_adapters(backend):
    """An nn.Linear subclass with an integer weight (bitsandbytes') gets fp32 adapters (the weight's dtype
    has no gradients) and computes base_layer(x) + the adapter."""
    base = PackedInt8Linear(D_IN, D_OUT)
    _check_against_dequantized(base, base.dequantized(), backend)


@pytest.mark.parametrize("make", [int8_subclass_linear, lambda: PackedInt8Linear(D_IN, D_OUT)],
                         ids=["subclass", "packed"])
def test_dora_on_a_quantised_weight_is_refused(make):
    with pytest.raises(NotImplementedError, match="DoRA.*quantised"):
        MoELoRALinear(make(), num_experts=1, r=4, use_dora=True)


@pytest.mark.parametrize("make", [int8_subclass_linear, lambda: PackedInt8Linear(D_IN, D_OUT)],
                         ids=["subclass", "packed"])
def test_merging_into_a_quantised_weight_is_refused_and_changes_nothing(make):
    """merge_adapter checks every layer before it merges any: a model with a plain and a quantised layer is
    left unmerged (the plain layer's weight too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_IN), make())
    plain_weight = model[0].weight.detach().clone()
    config = moelora.MoELoRAConfig(r=4, num_experts=1, target_modules=["0", "1"], init_lora_weights=False)
    peft_model = moelora.get_moelora_model(model, config)
    x = torch.randn(T, D_IN)
    y = peft_model(x)
    with pytest.raises(NotImplementedError, match="1: merging.*quantised"):
        moelora.merge_adapter(peft_model)
    assert torch.equal(model[0].base_layer.weight, plain_weight) and not model[0].merged
    with pytest.raises(NotImplementedError, match="merging.*quantised"):
        peft_model.merge_and_unload()
    torch.testing.assert_close(peft_model(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("make", [int8_subclass_linear, lambda: PackedInt8Linear(D_IN, D_OUT)],
                         ids=["subclass", "packed"])
def test_upcycling_a_quantised_ffn_is_refused(make):
    torch.manual_seed(0)

    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = make(), nn.Linear(D_OUT, D_IN)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    model = nn.Sequential(FFN())
    with pytest.raises(NotImplementedError, match="upcycling 0.*quantised"):
        moelora.upcycle_ffn(model, num_experts=2, top_k=1, ffn_modules=["0"], in_proj="up", out_proj="down",
                            activation=torch.relu)
    assert isinstance(model[0], FFN)
    with pytest.raises(NotImplementedError, match="MoEFFN.*quantised"):
        moelora.MoEFFN(make(), nn.Linear(D_OUT, D_IN), torch.relu, num_experts=2, top_k=1)


@pytest.mark.parametrize("make", [int8_subclass_linear, lambda: PackedInt8Linear(D_IN, D_OUT)],
                         ids=["subclass", "packed"])
def test_modules_to_save_of_a_quantised_module_is_refused_and_changes_nothing(make):
    """modules_to_save trains and saves a copy of the module, which a quantised weight cannot be: its integer
    dtype takes no gradient (requires_grad_ raised RuntimeError) and a tensor subclass (torchao's) got none
    while marked trainable, then failed to save. Refused at injection, naming the module and the weight."""
    torch.manual_seed(0)
    model = nn.Sequential(collections.OrderedDict(first=nn.Linear(D_IN, D_IN), kept=nn.Sequential(make())))
    config = moelora.MoELoRAConfig(r=4, num_experts=2, top_k=1, target_modules=["first"], modules_to_save=["kept"])
    with pytest.raises(NotImplementedError, match=r"modules_to_save names kept, whose parameter 0\.weight is a "
                                                  r"\w+ \(torch\.\w+\): a quantised weight"):
        moelora.get_moelora_model(model, config)
    assert type(model.first) is nn.Linear and type(model.kept) is nn.Sequential and model.first.weight.requires_grad


@pytest.mark.parametrize("trainable", [True, False])
def test_trainer_accepts_a_quantised_model_with_adapters(trainable, tmp_path):
    """transformers' Trainer refuses a quantised model (``is_quantized``, as from_pretrained with a
    quantization_config sets it) without adapters; MoELoRAModel says it has them (``_hf_peft_config_loaded``,
    PEFT's mark), unless the quantisation method cannot train, which Trainer then refuses."""
    import types

    from transformers import Trainer, TrainingArguments

    from helpers import tiny_llama

    base = tiny_llama(num_layers=1)
    base.is_quantized, base.hf_quantizer = True, types.SimpleNamespace(is_trainable=trainable)
    model = moelora.get_moelora_model(base, moelora.MoELoRAConfig(r=4, num_experts=2, top_k=1,
                                                                  target_modules=["q_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
    if trainable:
        Trainer(model=model, args=args)
    else:
        with pytest.raises(ValueError, match="quantized"):
            Trainer(model=model, args=args)


# ----------------------------------------------------------------------------- torchao
TORCHAO_CONFIGS = ["Int8WeightOnlyConfig", "Float8WeightOnlyConfig"]


def _torchao_linear(config: str, dtype=torch.float32) -> nn.Linear:
    quantization = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    lin = nn.Linear(D_IN, D_OUT).to(dtype)
    quantization.quantize_(nn.Sequential(lin), getattr(quantization, config)())
    assert type(lin) is nn.Linear and type(lin.weight) not in (nn.Parameter, torch.Tensor)  # quantised in place
    return lin


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", TORCHAO_CONFIGS)
def test_torchao_weight_only_base(config, backend):
    base = _torchao_linear(config)
    qdata = base.weight.qdata.clone()
    _check_against_dequantized(base, base.weight.dequantize(), backend)
    assert torch.equal(base.weight.qdata, qdata)


@pytest.mark.parametrize("config", TORCHAO_CONFIGS)
def test_torchao_base_refuses_merge_and_dora(config):
    layer = MoELoRALinear(_torchao_linear(config), num_experts=1, r=4, init_lora_weights=False)
    with pytest.raises(NotImplementedError, match="merging.*quantised"):
        layer.merge()
    with pytest.raises(NotImplementedError, match="DoRA.*quantised"):
        MoELoRALinear(_torchao_linear(config), num_experts=1, r=4, use_dora=True)


def test_torchao_model_injection_and_persistence(tmp_path):
    """quantize_ over a whole model (its output head too): 'all-linear' adapts the quantised linears but the
    head; the saved adapter loads into a second quantised model and gives its outputs."""
    quantization = pytest.importorskip("torchao.quantization")

    def net():
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("q_proj", nn.Linear(D_IN, D_OUT))
        model.add_module("up", nn.Linear(D_OUT, D_IN))
        model.add_module("lm_head", nn.Linear(D_IN, D_OUT))
        quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
        return model

    torch.manual_seed(0)
    config = moelora.MoELoRAConfig(r=4, num_experts=4, top_k=2, target_modules="all-linear", init_lora_weights=False)
    model = moelora.get_moelora_model(net(), config)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, MoELoRALinear)) == ["model.q_proj", "model.up"]
    assert {s.quantization_backend for s in model.get_layer_status()} == {"torchao"}  # PEFT's status field
    assert model.get_model_status().quantization_backend == "torchao"
    x = torch.randn(T, D_IN)
    y = model(x)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(moelora.MoELoRAModel.from_pretrained(net(), tmp_path)(x), y)


def test_torchao_base_compiles():
    base = _torchao_linear("Int8WeightOnlyConfig")
    torch.manual_seed(0)
    layer = MoELoRALinear(base, num_experts=4, top_k=2, r=4, init_lora_weights=False)
    x = torch.randn(T, D_IN)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x))


# ----------------------------------------------------------------------------- bitsandbytes
def _bnb_linear(kind: str, compute_dtype=torch.float32) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(D_IN, D_OUT)
    if kind == "4bit":
        q = bnb.nn.Linear4bit(D_IN, D_OUT, compute_dtype=compute_dtype, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(D_IN, D_OUT, has_fp16_weights=False)
    q.load_state_dict(dense.state_dict())
    q = q.to("cpu")  # quantises the weight
    assert not q.weight.dtype.is_floating_point
    return q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bitsandbytes_base(kind, backend):
    base = _bnb_linear(kind)
    if kind == "4bit":
        import bitsandbytes.functional as bnb_functional

        dequantized = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    else:
        dequantized = None  # LLM.int8 quantises x too: the reference runs the layer itself
    packed = base.weight.data.clone()
    _check_against_dequantized(base, dequantized, backend)
    assert torch.equal(base.weight.data, packed)


def test_bitsandbytes_4bit_computes_in_its_compute_dtype():
    """Linear4bit computes in its compute_dtype (bf16 here); the adapters are fp32 and the output bf16."""
    base = _bnb_linear("4bit", torch.bfloat16)
    torch.manual_seed(0)
    layer = MoELoRALinear(base, num_experts=4, top_k=2, r=4, init_lora_weights=False)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.router.weight.dtype == torch.float32
    x = torch.randn(T, D_IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    lora = layer(x).float() - base(x).float()
    routing = layer.router(x.float())
    expected = moelora.moe_lora(x.float(), layer.lora_A, layer.lora_B, routing.ids, routing.weights,
                                scaling=layer.scaling)
    assert rel_err(lora, expected) < 3e-2


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bitsandbytes_model_injection_and_persistence(kind, tmp_path):
    """'all-linear' adapts the quantised layers and leaves the output head out, as for plain layers; the
    saved adapter loads into a second quantised model and gives its outputs; merging is refused."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.o_proj, self.lm_head = _bnb_linear(kind), _bnb_linear(kind), _bnb_linear(kind)
            self.up = nn.Linear(D_OUT, D_IN)

        def forward(self, x):
            return self.lm_head(self.up(self.q_proj(x)))

    torch.manual_seed(0)
    config = moelora.MoELoRAConfig(r=4, num_experts=4, top_k=2, target_modules="all-linear", init_lora_weights=False)
    model = moelora.get_moelora_model(Net(), config)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, MoELoRALinear))
    assert adapted == ["model.o_proj", "model.q_proj", "model.up"], adapted
    backends = {s.name: s.quantization_backend for s in model.get_layer_status()}  # PEFT's status field
    assert backends == {"model.o_proj": "bitsandbytes", "model.q_proj": "bitsandbytes", "model.up": None}
    assert model.get_model_status().quantization_backend == "irregular"
    x = torch.randn(T, D_IN)
    with torch.no_grad():  # one of bitsandbytes' CPU paths for both (inference: its packed kernel)
        y = model.eval()(x)
        model.save_pretrained(tmp_path)
        loaded = moelora.MoELoRAModel.from_pretrained(Net(), tmp_path)
        torch.testing.assert_close(loaded.eval()(x), y)
    with pytest.raises(NotImplementedError, match="merging.*quantised"):
        model.merge_and_unload()


def test_bitsandbytes_4bit_parameter_count_is_peft_s():
    """A Params4bit packs two 4-bit values per byte of its uint8 [n / 2, 1] storage: get_nb_trainable_parameters
    counts the weight's d_out * d_in values, as PEFT's and transformers' num_parameters (it counted half)."""
    peft = pytest.importorskip("peft")
    model = nn.Sequential(_bnb_linear("4bit"), nn.Linear(D_OUT, D_OUT))
    ours = moelora.get_moelora_model(copy.deepcopy(model), moelora.MoELoRAConfig(r=4, num_experts=1,
                                                                                 target_modules=["0", "1"]))
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0", "1"]))
    dense = D_IN * D_OUT + D_OUT + D_OUT * D_OUT + D_OUT
    lora = 4 * (D_IN + D_OUT) + 4 * (D_OUT + D_OUT)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (lora, dense + lora)


def test_bitsandbytes_qlora_with_trainer(tmp_path):
    """The QLoRA recipe: from_pretrained with BitsAndBytesConfig(load_in_4bit=True) (on CPU), 'all-linear',
    transformers' Trainer: the adapters train (the quantised weights do not change)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    q_proj = base.model.layers[0].self_attn.q_proj
    packed = q_proj.weight.data.clone()
    model = moelora.get_moelora_model(base, moelora.MoELoRAConfig(r=4, num_experts=2, top_k=1,
                                                                  target_modules="all-linear"))
    adapted = base.model.layers[0].self_attn.q_proj
    assert isinstance(adapted, MoELoRALinear) and adapted.base_layer is q_proj
    lora_b = adapted.lora_B.detach().clone()
    ids = torch.randint(0, 64, (4, 8))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r.clone()} for r in ids]).train()
    assert not torch.equal(adapted.lora_B, lora_b) and torch.equal(q_proj.weight.data, packed)
