"""Checkpoints: a failed load leaves the caller's model as it was (and a retry works), files
that are not what they should be raise errors naming the file, no checkpoint imports code
(activations come from an allow-list), adapter membership does not depend on substrings
of base-model names, and PEFT tensors must fit their layer exactly."""

import json
import re
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora
from moelora import MoELoRAConfig, get_moelora_model
from moelora.persistence import adapter_state_dict
from helpers import randomize_adapters, tiny_llama, token_batch

CONFIG = MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, top_k=1)


def _fingerprint(model: nn.Module):
    """Everything a failed load must leave as it was: module tree, classes, hooks, flags, values."""
    return ([(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
            {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
            sorted(vars(model)))


def _assert_untouched(model, before):
    after = _fingerprint(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].keys() == before[1].keys()
    for name, (flag, value) in before[1].items():
        assert after[1][name][0] == flag and torch.equal(after[1][name][1], value), name


def _refused_untouched(directory, error, match):
    """from_pretrained of ``directory`` into a fresh tiny Llama raises ``error`` matching ``match``, leaving the
    model as it was."""
    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    with pytest.raises(error, match=match):
        moelora.from_pretrained(base, str(directory))
    _assert_untouched(base, before)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint with structural edits (MoLEx) and adapters, and its outputs."""
    model = get_moelora_model(tiny_llama(num_layers=2), CONFIG)
    moelora.apply_molex(model, gate="cosine", proj_dim=4)
    randomize_adapters(model)
    model.eval()
    model.save_pretrained(str(tmp_path))
    with torch.no_grad():
        return tmp_path, model(token_batch(), use_cache=False).logits


# ---- 8. from_pretrained: check first, leave the model untouched on failure, retry works ------
def test_failed_load_leaves_the_model_untouched_and_a_retry_works(saved):
    directory, expected = saved
    config_path = directory / "moelora_config.json"
    good = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(good, r=4)))  # the weights are r=8: shapes do not fit
    base = tiny_llama(num_layers=2).eval()
    before = _fingerprint(base)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: checkpoint does not fit the model: .*lora_A"):
        moelora.from_pretrained(base, str(directory))
    _assert_untouched(base, before)
    config_path.write_text(json.dumps(good))
    loaded = moelora.from_pretrained(base, str(directory))
    with torch.no_grad():
        assert torch.equal(loaded(token_batch(), use_cache=False).logits, expected)


@pytest.mark.parametrize("corrupt,error,match", [
    ("weights_truncated", ValueError, r"adapter_model.safetensors: not a readable safetensors file"),
    ("weights_garbage", ValueError, r"adapter_model.safetensors: not a readable safetensors file"),
    ("weights_missing", FileNotFoundError, r"adapter_model.safetensors: no such file \(the adapter's weights\)$"),
    ("config_invalid_json", ValueError, r"moelora_config.json: not valid JSON"),
    ("config_not_text", ValueError, r"moelora_config.json: not a text \(JSON\) file"),
    ("config_a_list", ValueError, r"moelora_config.json: the MoE-LoRA config must be a JSON object, got a JSON list"),
    ("config_wrong_type", TypeError, r"moelora_config.json: MoELoRAConfig.top_k must be a positive int, got str '1'"),
    ("config_unknown_field", ValueError, r"moelora_config.json: unknown MoELoRAConfig fields: \['colour'\]"),
    ("structure_without_kwargs", ValueError, r"moelora_config.json: structure entry 0 must be \{\"op\": \.\.\., "
                                             r"\"kwargs\""),
    ("structure_unknown_op", ValueError, r"moelora_config.json: structure entry 0: unknown structural edit 'rm_rf'"),
    ("structure_an_object", ValueError, r"moelora_config.json: \"structure\" must be a list of \{\"op\", \"kwargs\"\} "
                                        r"entries, got dict"),
    ("structure_without_op", ValueError, r"moelora_config.json: structure entry 0 must be \{\"op\": \.\.\., "),
    ("structure_entry_a_string", ValueError, r"moelora_config.json: structure entry 0 must be \{\"op\": \.\.\., "),
])
def test_broken_files_raise_errors_naming_the_file_before_touching_the_model(saved, corrupt, error, match):
    directory, _ = saved
    weights, config_path = directory / "adapter_model.safetensors", directory / "moelora_config.json"
    config = json.loads(config_path.read_text())
    if corrupt == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif corrupt == "weights_garbage":
        weights.write_bytes(b"\x00\x01garbage" * 50)
    elif corrupt == "weights_missing":
        weights.unlink()
    elif corrupt == "config_invalid_json":
        config_path.write_text("{not json")
    elif corrupt == "config_not_text":
        config_path.write_bytes(b"\xff\xfe\x00\x01" * 8)
    elif corrupt == "config_a_list":
        config_path.write_text("[1, 2]")
    elif corrupt == "config_wrong_type":
        config_path.write_text(json.dumps(dict(config, top_k="1")))
    elif corrupt == "config_unknown_field":
        config_path.write_text(json.dumps(dict(config, colour="red")))
    elif corrupt == "structure_without_kwargs":
        config_path.write_text(json.dumps(dict(config, structure=[{"op": "apply_molex"}])))
    elif corrupt == "structure_an_object":
        config_path.write_text(json.dumps(dict(config, structure=config["structure"][0])))
    elif corrupt == "structure_without_op":
        config_path.write_text(json.dumps(dict(config, structure=[{"kwargs": {}}])))
    elif corrupt == "structure_entry_a_string":
        config_path.write_text(json.dumps(dict(config, structure=["apply_molex"])))
    else:
        config_path.write_text(json.dumps(dict(config, structure=[{"op": "rm_rf", "kwargs": {}}])))
    _refused_untouched(directory, error, match)


@pytest.mark.parametrize("edit", ["missing", "unexpected", "renamed"])
def test_a_checkpoint_missing_a_tensor_or_holding_another_raises_naming_it(saved, edit):
    """Every adapter tensor must be in the checkpoint (one left out would keep the fresh model's initial value: a
    silently other model) and every tensor in it must be one of the adapter's (another module's or adapter's)."""
    from safetensors.torch import load_file, save_file

    directory, _ = saved
    weights = str(directory / "adapter_model.safetensors")
    state = load_file(weights)
    name = next(n for n in sorted(state) if n.endswith("q_proj.lora_A"))
    other = name.replace("q_proj", "k_proj") if edit == "unexpected" else name + ".other"
    if edit != "missing":
        state[other] = state[name].clone()
    if edit != "unexpected":
        del state[name]
    save_file(state, weights)
    missing, unexpected = [] if edit == "unexpected" else [name], [] if edit == "missing" else [other]
    _refused_untouched(directory, ValueError, re.escape(f"adapter_model.safetensors: checkpoint does not fit the "
                                                        f"model: missing {missing}, unexpected {unexpected}"))
    model = get_moelora_model(tiny_llama(num_layers=2), CONFIG)  # load_adapter: the adapter is not added
    moelora.apply_molex(model, gate="cosine", proj_dim=4)
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=re.escape("adapter_model.safetensors: checkpoint does not fit the model")):
        model.load_adapter(str(directory), "other")
    assert list(model.adapter_configs) == ["default"]
    _assert_untouched(model, before)


def test_a_checkpoint_tensor_with_the_models_number_of_values_in_another_shape_is_refused(saved):
    """A tensor is checked by shape, not by its number of values: lora_A of (experts, in, r) where the model has
    (experts, r, in) is refused naming both shapes, the model untouched."""
    from safetensors.torch import load_file, save_file

    directory, _ = saved
    weights = str(directory / "adapter_model.safetensors")
    state = load_file(weights)
    name = next(n for n in sorted(state) if n.endswith("q_proj.lora_A"))
    shape = tuple(state[name].shape)
    assert len(shape) == 3 and shape[1] != shape[2]
    save_file(dict(state, **{name: state[name].transpose(1, 2).contiguous()}), weights)
    _refused_untouched(directory, ValueError, re.escape(f"checkpoint does not fit the model: {name} has shape "
                                                        f"{(shape[0], shape[2], shape[1])}, the model expects {shape}"))


def test_a_load_adapter_interrupted_while_its_weights_load_adds_no_adapter(saved, monkeypatch):
    """load_adapter adds the adapter, then loads its weights: interrupted there (Ctrl-C) it takes the adapter out
    again, as after an error, instead of leaving a half-loaded one."""
    directory, _ = saved
    model = moelora.from_pretrained(tiny_llama(num_layers=2), str(directory))
    before = _fingerprint(model)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(moelora.persistence, "load_active_adapter_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.load_adapter(str(directory), "other")
    assert list(model.adapter_configs) == ["default"]
    _assert_untouched(model, before)


def test_load_adapter_of_an_adapter_saved_with_other_structural_edits_names_them(saved):
    """The adapter was saved on a model with MoLEx: into one without, the error names both models' edits (not only
    the tensors that then do not fit), and no adapter is added."""
    directory, _ = saved
    model = get_moelora_model(tiny_llama(num_layers=2), CONFIG)
    with pytest.raises(ValueError, match=r"was saved on a model with the structural edits \[\{.*'op': "
                                         r"'apply_molex'\}\], this model has \[\]$"):
        model.load_adapter(str(directory), "other")
    assert list(model.adapter_configs) == ["default"]


# ---- checkpoints never import code: activations from an allow-list ----------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(8, 16), "fc2": nn.Linear(16, 8)})

    def forward(self, x):
        mlp = self.mlp  # an MoEFFN once upcycled
        return x + self.proj(x) + (mlp.fc2(F.gelu(mlp.fc1(x))) if isinstance(mlp, nn.ModuleDict) else mlp(x))


def _upcycled(activation):
    torch.manual_seed(0)
    net = nn.Sequential(_Block(), _Block())
    moelora.upcycle_ffn(net, 2, 1, ffn_modules=["mlp"], in_proj="fc1", out_proj="fc2", activation=activation)
    return get_moelora_model(net, MoELoRAConfig(target_modules=["proj"], num_experts=2, top_k=1))


def my_activation(t):
    return t.relu()


def _fresh():
    torch.manual_seed(0)
    return nn.Sequential(_Block(), _Block())


@pytest.mark.parametrize("activation,name", [(F.gelu, "torch.nn.functional.gelu"), (torch.tanh, "torch.tanh"),
                                             ("gelu_new", "gelu_new"), ("swish", "swish"),
                                             # GELUTanh holds a functools.partial (Starcoder2's MLP activation)
                                             ("gelu_pytorch_tanh", "gelu_pytorch_tanh"),
                                             ("gelu_python_tanh", "gelu_python_tanh")])
def test_allow_listed_activations_round_trip_by_name(tmp_path, activation, name):
    if isinstance(activation, str):
        activation = pytest.importorskip("transformers.activations").ACT2FN[activation]
    model = _upcycled(activation).eval()
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "moelora_config.json").read_text())["structure"]
    assert saved[0]["kwargs"]["activation"] == name
    model.save_pretrained(str(tmp_path / "again"))  # saving left the model's record as it was
    assert json.loads((tmp_path / "again" / "moelora_config.json").read_text())["structure"] == saved
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(moelora.from_pretrained(_fresh(), str(tmp_path))(x), model(x))


def test_saving_an_activation_outside_the_allow_list_fails_at_save_time(tmp_path):
    model = _upcycled(my_activation)  # importable by its dotted name, but not allow-listed
    with pytest.raises(ValueError, match=r"cannot be saved by name: checkpoints name activations from an allow-list"):
        model.save_pretrained(str(tmp_path))


def test_a_subclass_of_an_allow_listed_activation_module_is_not_saved_by_its_bases_name(tmp_path):
    activations = pytest.importorskip("transformers.activations")

    class Doubled(activations.NewGELUActivation):  # its state is NewGELUActivation's: only its class tells
        def forward(self, x):
            return 2 * super().forward(x)

    model = _upcycled(Doubled())
    with pytest.raises(ValueError, match=r"cannot be saved by name: checkpoints name activations from an allow-list"):
        model.save_pretrained(str(tmp_path))


def test_loading_names_outside_the_allow_list_imports_nothing(tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "evil_moelora_module.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\ndef act(t):\n    return t\n")
    sys.path.insert(0, str(tmp_path))
    try:
        model = _upcycled(F.relu)
        model.save_pretrained(str(tmp_path / "ckpt"))
        config_path = tmp_path / "ckpt" / "moelora_config.json"
        config = json.loads(config_path.read_text())
        # torch's own non-activations (torch.load unpickles), an activation's name in another module, and a name
        # of the allow-list that the namespace does not have are refused as well
        for evil in ("evil_moelora_module.act", "os.system", "builtins.eval", "torch.load",
                     "torch.nn.functional.dropout", "numpy.tanh", "torch._C._nn.relu"):
            config["structure"][0]["kwargs"]["activation"] = evil
            config_path.write_text(json.dumps(config))
            base = _fresh()
            before = _fingerprint(base)
            with pytest.raises(ValueError, match=rf"moelora_config.json: activation '{evil}' is not allowed"):
                moelora.from_pretrained(base, str(tmp_path / "ckpt"))
            _assert_untouched(base, before)
        assert not marker.exists() and "evil_moelora_module" not in sys.modules
    finally:
        sys.path.remove(str(tmp_path))


def test_names_earlier_checkpoints_hold_still_load():
    from moelora.tuner import structure as _structure

    assert _structure.resolve_callable("torch._C._nn.gelu") is F.gelu
    assert _structure.resolve_callable("torch.relu") is torch.relu
    assert _structure.resolve_callable("torch.nn.functional.silu") is F.silu


def test_an_activation_module_is_saved_by_a_name_only_with_its_namesakes_arguments():
    """A transformers activation module is saved by its ACT2FN name only where it computes what that name loads:
    GELUTanh's F.gelu partial compared with its arguments, so one whose approximate differs cannot be saved."""
    import functools

    activations = pytest.importorskip("transformers.activations")
    from moelora.tuner import structure as _structure

    act = activations.ACT2CLS["gelu_pytorch_tanh"]()
    assert _structure.callable_name(act, "activation") == "gelu_pytorch_tanh"
    act.act = functools.partial(F.gelu, approximate="none")
    with pytest.raises(ValueError, match=r"^activation .* cannot be saved by name"):
        _structure.callable_name(act, "activation")


def test_replay_checks_every_record_before_it_edits_the_model():
    from moelora.tuner import structure as _structure

    base = _fresh()
    before = _fingerprint(base)
    upcycle = {"op": "upcycle_ffn", "kwargs": dict(num_experts=2, top_k=1, ffn_modules=["mlp"], in_proj="fc1",
                                                   out_proj="fc2", activation="torch.nn.functional.gelu")}
    with pytest.raises(ValueError, match=r"^structure entry 1: unknown structural edit 'rm_rf'"):
        _structure.replay(base, [upcycle, {"op": "rm_rf", "kwargs": {}}])
    _assert_untouched(base, before)
    _structure.replay(base, [upcycle])
    (replayed,) = _structure.to_json(base)  # the records checked, the model is edited
    assert replayed["op"] == "upcycle_ffn" and replayed["kwargs"].items() >= upcycle["kwargs"].items()


@pytest.mark.parametrize("value", [3, ["torch.relu"]])
def test_an_activation_saved_as_anything_but_a_string_is_refused_naming_it(saved, value):
    directory, _ = saved
    config_path = directory / "moelora_config.json"
    config = json.loads(config_path.read_text())
    kwargs = dict(num_experts=2, top_k=1, ffn_modules=["mlp"], in_proj="up_proj", out_proj="down_proj",
                  activation=value)
    config_path.write_text(json.dumps(dict(config, structure=[{"op": "upcycle_ffn", "kwargs": kwargs}])))
    _refused_untouched(directory, ValueError, rf"moelora_config.json: an activation is saved as a string, "
                                              rf"got {type(value).__name__} {re.escape(repr(value))}$")


# ---- adapter membership: moelora's modules, not substrings of names ---------------------------
class _MoEBase(nn.Module):
    """A base model with its own router (as MoE base models have) and a 'lora_'-named layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.router = nn.Linear(8, 4)
        self.lora_like = nn.Linear(4, 8)

    def forward(self, x):
        return self.proj(x) + self.lora_like(self.router(x).softmax(-1))


def test_a_base_models_own_router_stays_frozen_and_out_of_the_checkpoint(tmp_path):
    model = get_moelora_model(_MoEBase(), MoELoRAConfig(target_modules=["proj"], num_experts=3, top_k=2))
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert trainable == {"proj.lora_A", "proj.lora_B", "proj.router.weight"}
    saved = adapter_state_dict(model)
    assert set(saved) == {"proj.lora_A", "proj.lora_B", "proj.router.weight", "proj.router.num_steps"}
    randomize_adapters(model)  # B != 0: a fresh adapter (zero B) computes the base model, loaded or not
    model.save_pretrained(str(tmp_path))
    loaded = moelora.from_pretrained(_MoEBase(), str(tmp_path))
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), _MoEBase()(x))  # the adapter acts
        assert torch.equal(loaded(x), model.eval()(x))


def test_checkpoints_that_also_hold_base_router_tensors_still_load(tmp_path):
    """Earlier versions saved (and trained) any tensor named like 'router.': loaded as saved."""
    from safetensors.torch import load_file, save_file

    model = get_moelora_model(_MoEBase(), MoELoRAConfig(target_modules=["proj"], num_experts=3, top_k=2))
    model.save_pretrained(str(tmp_path))
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(str(weights))
    state["router.weight"] = torch.full((4, 8), 0.25)
    save_file(state, str(weights))
    loaded = moelora.from_pretrained(_MoEBase(), str(tmp_path))
    assert torch.equal(loaded.model.router.weight, torch.full((4, 8), 0.25))
    state["proj.base_layer.weight"] = torch.zeros(8, 8)  # any other base tensor is not part of an adapter
    save_file(state, str(weights))
    with pytest.raises(ValueError,
                       match=r"does not fit the model: missing \[\], unexpected \['proj.base_layer.weight'\]"):
        moelora.from_pretrained(_MoEBase(), str(tmp_path))


# ---- 9. load_peft_lora: exact shapes, expert in range, files named ----------------------------
def _peft_checkpoint(directory, tensors, config=None, prefix="base_model.model.model.layers.0.self_attn.q_proj."):
    from safetensors.torch import save_file

    directory.mkdir(exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config or {"peft_type": "LORA", "r": 4,
                                                                         "lora_alpha": 8}))
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    return str(directory)


GOOD = {"lora_A.weight": torch.randn(4, 16), "lora_B.weight": torch.randn(16, 4)}


@pytest.mark.parametrize("tensors,match", [
    (dict(GOOD, **{"lora_A.weight": torch.randn(4, 1)}),
     r"q_proj.lora_A has shape \(4, 1\), the layer .* needs \(4, 16\)"),
    (dict(GOOD, **{"lora_A.weight": torch.randn(4, 12)}), r"q_proj.lora_A has shape \(4, 12\)"),
    (dict(GOOD, **{"lora_B.weight": torch.randn(1, 4)}), r"q_proj.lora_B has shape \(1, 4\).* needs \(16, 4\)"),
    ({"lora_A.weight": torch.randn(4, 16)}, r"adapter_model.safetensors: model.layers.0.self_attn.q_proj has no "
                                            r".*lora_B.weight"),
    (dict(GOOD, **{"lora_A.weight": torch.randn(4)}), r"q_proj.lora_A must be 2-D"),
])
def test_peft_tensors_must_fit_their_layer_exactly(tmp_path, tensors, match):
    directory = _peft_checkpoint(tmp_path / "peft", tensors)
    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    with pytest.raises(ValueError, match=match):
        moelora.load_peft_lora(base, directory)
    _assert_untouched(base, before)  # the fresh model is left as it was
    moelora.load_peft_lora(base, _peft_checkpoint(tmp_path / "good", GOOD))  # and a retry works


@pytest.mark.parametrize("a,b,match", [
    (torch.randn(2, 3, 1, 9), torch.randn(6, 2, 1, 1), r"0.lora_A has shape \(2, 3, 1, 9\), the layer \(r=2\) "
                                                       r"needs \(2, 3, 3, 3\)"),
    (torch.randn(2, 27), torch.randn(6, 2, 1, 1), r"0.lora_A has shape \(2, 27\), the layer \(r=2\) needs "
                                                  r"\(2, 3, 3, 3\)"),
    (torch.randn(2, 3, 3, 3), torch.randn(6, 2), r"0.lora_B has shape \(6, 2\), the layer \(r=2\) needs "
                                                 r"\(6, 2, 1, 1\)"),
], ids=["kernel_1x9_for_3x3", "flat_A", "flat_B"])
def test_peft_conv_kernels_must_have_the_layers_kernel_shape(tmp_path, a, b, match):
    """PEFT conv kernels were flattened before the shape check, so a LoRA of a (1, 9) kernel loaded into a 3 x 3
    convolution silently (as many entries, another function); the kernels must now have PEFT's shapes for the
    layer: A [r, C_in, *kernel_size], B [C_out, r / groups, 1, ...]."""
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                              "target_modules": ["0"]}))
    save_file({"base_model.model.0.lora_A.weight": a.contiguous(), "base_model.model.0.lora_B.weight": b.contiguous()},
              str(tmp_path / "adapter_model.safetensors"))
    base = nn.Sequential(nn.Conv2d(3, 6, 3))
    before = _fingerprint(base)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: " + match):
        moelora.load_peft_lora(base, str(tmp_path))
    _assert_untouched(base, before)
    save_file({"base_model.model.0.lora_A.weight": a.reshape(2, 3, 3, 3).contiguous(),
               "base_model.model.0.lora_B.weight": b.reshape(6, 2, 1, 1).contiguous()},
              str(tmp_path / "adapter_model.safetensors"))
    layer = moelora.load_peft_lora(base, str(tmp_path)).model[0]
    assert torch.equal(layer.lora_A[0], a.reshape(2, 27)) and torch.equal(layer.lora_B[0], b.reshape(6, 2))


def test_a_peft_config_without_lora_alpha_loads_with_peft_default_alpha_of_8(tmp_path):
    """PEFT's lora_alpha defaults to 8: the layer gets alpha 8 and the checkpoint's B as it is (scaling 8 / r both)."""
    base = tiny_llama(num_layers=2)
    wrapped = moelora.load_peft_lora(base, _peft_checkpoint(tmp_path / "peft", GOOD, {"peft_type": "LORA", "r": 4}))
    layer = wrapped.model.model.layers[0].self_attn.q_proj
    assert layer.scaling == 8 / 4
    assert torch.equal(layer.lora_A[0], GOOD["lora_A.weight"]) and torch.equal(layer.lora_B[0], GOOD["lora_B.weight"])


@pytest.mark.parametrize("config,match", [
    ({"r": 8}, r"r=8 and rank_pattern=\{\} give model.layers.0.self_attn.q_proj rank 8, its LoRA tensors in the "
               r"checkpoint have rank 4"),
    ({}, r"r=8 and rank_pattern=\{\} give .*q_proj rank 8"),  # PEFT's default r
    ({"r": 4, "rank_pattern": {"q_proj": 2}}, r"r=4 and rank_pattern=\{'q_proj': 2\} give .*q_proj rank 2"),
    ({"r": 4, "rank_pattern": {"q_(": 4}}, r"rank_pattern must be .*valid regex"),
    ({"r": "4"}, r"MoELoRAConfig.r must be"),
])
def test_a_peft_config_whose_ranks_disagree_with_its_tensors_is_refused(tmp_path, config, match):
    """The ranks came from the tensors alone: a config of r=8 (PEFT's default) with rank-4 tensors loaded with
    scaling lora_alpha / 4, which PEFT's own load refuses (a size mismatch); which scaling was meant is unknown."""
    directory = _peft_checkpoint(tmp_path / "peft", GOOD, dict({"peft_type": "LORA", "lora_alpha": 8}, **config))
    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    with pytest.raises((TypeError, ValueError), match=r"adapter_config.json: .*" + match):
        moelora.load_peft_lora(base, directory)
    _assert_untouched(base, before)
    for good in ({"r": 4}, {"r": 8, "rank_pattern": {"q_proj": 4}},
                 {"r": 2, "rank_pattern": {"layers.0.self_attn.q_proj": 4}}):
        moelora.load_peft_lora(tiny_llama(num_layers=2), _peft_checkpoint(
            tmp_path / "good", GOOD, dict({"peft_type": "LORA", "lora_alpha": 8}, **good)))


def test_peft_dora_magnitude_must_have_d_out_entries(tmp_path):
    directory = _peft_checkpoint(tmp_path / "peft", dict(GOOD, lora_magnitude_vector=torch.ones(1)),
                                 {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True})
    with pytest.raises(ValueError, match=r"q_proj.lora_magnitude_vector has shape \(1,\).* needs \(16,\)"):
        moelora.load_peft_lora(tiny_llama(num_layers=2), directory)


@pytest.mark.parametrize("expert,error,match", [(-1, ValueError, r"expert must be in \[0, 3\) .*got -1"),
                                                (3, ValueError, r"expert must be in \[0, 3\) .*got 3"),
                                                (1.0, TypeError, r"expert must be an int or None, got float")])
def test_peft_expert_must_be_an_expert_of_the_layer(tmp_path, expert, error, match):
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], r=4, num_experts=3,
                                                                      router="task"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(error, match=match):
        moelora.load_peft_lora(model, _peft_checkpoint(tmp_path / "peft", GOOD), expert=expert)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_peft_files_are_named_in_errors(tmp_path):
    directory = _peft_checkpoint(tmp_path / "peft", GOOD)
    (tmp_path / "peft" / "adapter_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"adapter_config.json: the PEFT adapter config must be a JSON object"):
        moelora.load_peft_lora(tiny_llama(num_layers=2), directory)
    (tmp_path / "peft" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    # a header said to be 16 bytes long, of which 2 are there; then a whole header of no tensor
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: not a readable safetensors file \("):
        moelora.load_peft_lora(tiny_llama(num_layers=2), directory)
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: the PEFT checkpoint holds no LoRA tensor$"):
        moelora.load_peft_lora(tiny_llama(num_layers=2), directory)
    bias_only = _peft_checkpoint(tmp_path / "bias_only", {"base_layer.bias": torch.randn(16)})
    with pytest.raises(ValueError, match=r"bias_only/adapter_model.safetensors: the PEFT checkpoint holds no LoRA "
                                         r"tensor$"):
        moelora.load_peft_lora(tiny_llama(num_layers=2), bias_only)


def test_a_checkpoint_of_the_other_format_or_in_subfolders_is_named_in_the_missing_config_error(saved, tmp_path):
    """A PEFT checkpoint given to from_pretrained / load_adapter, a moelora one to load_peft_lora, or a
    save_pretrained folder whose adapters are all in subfolders: the error named only the missing file."""
    directory, _ = saved
    peft_directory = _peft_checkpoint(tmp_path / "peft", GOOD)
    with pytest.raises(FileNotFoundError, match=r"moelora_config.json: no such file \(the adapter's config\); the "
                                                r"directory holds adapter_config.json: .*moelora.load_peft_lora"):
        moelora.from_pretrained(tiny_llama(num_layers=2), peft_directory)
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json: no such file \(the adapter's config\); the "
                                                r"directory holds moelora_config.json: .*moelora.from_pretrained"):
        moelora.load_peft_lora(tiny_llama(num_layers=2), str(directory))
    model = get_moelora_model(tiny_llama(num_layers=2), CONFIG)
    model.add_adapter("other", CONFIG)
    model.save_pretrained(str(tmp_path / "named"), selected_adapters=["other"])
    (tmp_path / "named" / "logs").mkdir()  # a subfolder without an adapter is not named
    with pytest.raises(FileNotFoundError, match=r"moelora_config.json: no such file .*subfolders \['other'\] hold"):
        moelora.from_pretrained(tiny_llama(num_layers=2), str(tmp_path / "named"))


def test_a_pickled_peft_checkpoint_is_named_with_how_to_convert_it(tmp_path):
    """PEFT saves adapter_model.bin (a pickle) with safe_serialization=False, as older PEFT did: moelora reads
    data only, and the error says the .bin is there and how to write the safetensors file instead."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(num_layers=2), peft.LoraConfig(target_modules=["q_proj"], r=2))
    model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(FileNotFoundError, match=r"adapter_model.safetensors: no such file \(the adapter's weights\); "
                                                r"adapter_model.bin beside it is a pickle, .* safe_serialization=True"):
        moelora.load_peft_lora(tiny_llama(num_layers=2), str(tmp_path))


# ---- PEFT config fields moelora cannot reproduce are refused, naming the field -----------------
@pytest.mark.parametrize("field,value,match", [
    ("layer_replication", [[0, 1], [1, 2]], r"layer_replication=\[\[0, 1\], \[1, 2\]\] is not supported"),
    ("lora_bias", True, r"lora_bias=True is not supported"),
    ("trainable_token_indices", [3, 5], r"trainable_token_indices=\[3, 5\] is not supported"),
    ("use_qalora", True, r"use_qalora=True is not supported"),
    ("target_parameters", ["mlp.experts.gate_up_proj"], r"target_parameters=.* is not supported"),
    ("a_future_peft_field", 1, r"a_future_peft_field=1 is not supported"),
    ("init_lora_weights", "pissa", r"init_lora_weights='pissa' is not supported: .*rewrite the base weights"),
    ("init_lora_weights", "olora", r"init_lora_weights='olora' is not supported"),
    ("init_lora_weights", "loftq", r"init_lora_weights='loftq' is not supported"),
    ("init_lora_weights", 1, r"init_lora_weights=1 is not supported"),
])
def test_peft_config_settings_moelora_cannot_reproduce_are_refused(tmp_path, field, value, match):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, field: value}
    directory = _peft_checkpoint(tmp_path / "peft", GOOD, config)
    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    with pytest.raises(ValueError, match=r"adapter_config.json: " + match):
        moelora.load_peft_lora(base, directory)
    _assert_untouched(base, before)


@pytest.mark.parametrize("peft_type", ["ADALORA", "LOHA"])
def test_a_peft_checkpoint_of_another_method_is_refused_naming_its_peft_type(tmp_path, peft_type):
    """AdaLoRA also saves lora_A / lora_B: the config's peft_type, not the tensors or other fields, says what it is."""
    directory = _peft_checkpoint(tmp_path / "peft", GOOD, {"peft_type": peft_type, "r": 4, "lora_alpha": 8})
    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    with pytest.raises(ValueError, match=rf"adapter_config.json: not a LoRA checkpoint: peft_type={peft_type!r}$"):
        moelora.load_peft_lora(base, directory)
    _assert_untouched(base, before)


def test_peft_config_metadata_and_fields_moelora_honours_are_accepted(tmp_path):
    """What PEFT writes by default (every unused feature unset), its metadata, the fields that
    chose the checkpoint's targets, ranks and initial weights, and fan_in_fan_out load."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers",
                        rank_pattern={"q_proj": 4}, init_lora_weights="gaussian", fan_in_fan_out=True,
                        exclude_modules=["k_proj"], base_model_name_or_path="tiny/llama", revision="main",
                        task_type="CAUSAL_LM", inference_mode=True).to_dict()
    config = json.loads(json.dumps(config, default=str))  # as PEFT's save_pretrained writes it
    directory = _peft_checkpoint(tmp_path / "peft", GOOD, config)
    loaded = moelora.load_peft_lora(tiny_llama(num_layers=2), directory)
    assert loaded.moelora_config.base_model_name_or_path == "tiny/llama"
    for init in (True, False, "orthogonal", "eva"):
        moelora.load_peft_lora(tiny_llama(num_layers=2), _peft_checkpoint(tmp_path / "peft", GOOD,
                                                                          dict(config, init_lora_weights=init)))
    unset = dict(config, layer_replication=[], trainable_token_indices={}, lora_bias=False, use_qalora=None)
    moelora.load_peft_lora(tiny_llama(num_layers=2), _peft_checkpoint(tmp_path / "peft", GOOD, unset))


@pytest.mark.parametrize("field,value", [("target_modules", "q_(proj"), ("exclude_modules", "("),
                                         ("modules_to_save", "*"), ("rank_pattern", {"q_(": 4}),
                                         ("alpha_pattern", {"[q": 4.0})])
def test_config_regexes_that_do_not_compile_raise_naming_the_file_and_field(saved, field, value):
    directory, _ = saved
    config_path = directory / "moelora_config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), **{field: value})))
    _refused_untouched(directory, ValueError, rf"moelora_config.json: MoELoRAConfig.{field} must be .*valid regex")


@pytest.mark.parametrize("field,value,error,match", [
    ("use_rslora", "false", TypeError, r"use_rslora must be a bool, got str 'false'"),
    ("use_dora", 1, TypeError, r"use_dora must be a bool, got int 1"),
    ("lora_alpha", float("nan"), ValueError, r"lora_alpha must be a finite number, got nan"),
    ("lora_alpha", "8", TypeError, r"lora_alpha must be a finite number, got str '8'"),
    ("alpha_pattern", {"v_proj": "x", "q_proj": 4}, TypeError, r"alpha_pattern must be a dict of module-name patterns"),
    ("alpha_pattern", [["q_proj", 4]], TypeError, r"alpha_pattern must be a dict of module-name patterns"),
    ("lora_dropout", 1.5, ValueError, r"lora_dropout must be in \[0, 1\), got 1.5"),
])
def test_peft_config_fields_of_the_wrong_type_raise_before_any_model_is_changed(tmp_path, field, value, error, match):
    """Into a fresh model and into an expert of an injected one alike: checked before anything is
    copied (a str use_rslora is not read as True, a NaN lora_alpha does not reach B)."""
    directory = _peft_checkpoint(tmp_path / "peft", GOOD, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, field: value})
    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    with pytest.raises(error, match=r"adapter_config.json: .*" + match):
        moelora.load_peft_lora(base, directory)
    _assert_untouched(base, before)
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], r=4, num_experts=2,
                                                                      router="task"))
    before = _fingerprint(model)
    with pytest.raises(error, match=r"adapter_config.json: .*" + match):
        moelora.load_peft_lora(model, directory, expert=1)
    _assert_untouched(model, before)


def test_peft_alpha_pattern_applies_to_the_layers_it_names(tmp_path):
    directory = _peft_checkpoint(tmp_path / "peft", GOOD, {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                           "alpha_pattern": {"layers.0.self_attn.q_proj": 2}})
    layer = moelora.load_peft_lora(tiny_llama(num_layers=2), directory).model.model.layers[0].self_attn.q_proj
    assert layer.scaling == 0.5 and torch.equal(layer.lora_B[0], GOOD["lora_B.weight"])


@pytest.mark.parametrize("config,scaling", [({"r": 4}, 2.0), ({"r": 4, "lora_alpha": 8, "use_rslora": True}, 4.0)],
                         ids=["peft_default_alpha", "rslora"])
def test_peft_scaling_is_peft_s_into_a_fresh_model_and_into_an_expert(tmp_path, config, scaling):
    """lora_alpha defaults to PEFT's 8 and use_rslora divides by sqrt(r): the fresh layer takes the checkpoint's B
    as it is; a layer of another scaling (lora_alpha 16, r 4: 4) takes it rescaled to compute the same delta."""
    directory = _peft_checkpoint(tmp_path / "peft", GOOD, dict({"peft_type": "LORA"}, **config))
    layer = moelora.load_peft_lora(tiny_llama(num_layers=2), directory).model.model.layers[0].self_attn.q_proj
    assert layer.scaling == scaling and torch.equal(layer.lora_B[0], GOOD["lora_B.weight"])
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], r=4, lora_alpha=16,
                                                                      num_experts=2, router="task"))
    layer = moelora.load_peft_lora(model, directory, expert=1).model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_B[1] * layer.scaling, GOOD["lora_B.weight"] * scaling)


def test_a_peft_tensor_outside_base_model_model_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _peft_checkpoint(tmp_path / "peft", GOOD)
    weights = str(tmp_path / "peft" / "adapter_model.safetensors")
    save_file(dict(load_file(weights), **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(16)}), weights)
    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: unsupported tensor in the PEFT checkpoint: "
                                         r"model.layers.0.self_attn.q_proj.bias$"):
        moelora.load_peft_lora(base, directory)
    _assert_untouched(base, before)


def test_a_peft_modules_to_save_that_selects_no_module_of_the_model_is_refused_naming_it(tmp_path):
    """PEFT's modules_to_save list is taken as the modules it selects in the model; where it selects none the config
    keeps the list, so the injection names it, not a load that silently leaves the saved modules out."""
    directory = _peft_checkpoint(tmp_path / "peft", GOOD, {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                           "modules_to_save": ["nothere"]})
    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    with pytest.raises(ValueError, match=r"modules_to_save \['nothere'\] matches no module"):
        moelora.load_peft_lora(base, directory)
    _assert_untouched(base, before)


@pytest.mark.parametrize("stop", [RuntimeError, KeyboardInterrupt])
def test_restored_on_error_gives_a_module_its_class_back(stop):
    """restored_on_error undoes every change to the module tree, a module's class included (as an in-place
    conversion swapping __class__ makes), also when the block is interrupted (Ctrl-C), and leaves a block that
    succeeds as it left the model."""
    from moelora.persistence import restored_on_error

    class Swapped(nn.Linear):
        pass

    model = tiny_llama(num_layers=2)
    before = _fingerprint(model)
    with pytest.raises(stop, match="stop"):
        with restored_on_error(model):
            model.model.layers[0].self_attn.q_proj.__class__ = Swapped
            raise stop("stop")
    _assert_untouched(model, before)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with restored_on_error(model):
        model.model.layers[0].self_attn.q_proj.__class__ = Swapped
    assert type(model.model.layers[0].self_attn.q_proj) is Swapped


# ---- injection that fails part-way (add_adapter, load_adapter, get_moelora_model) changes nothing ----
@pytest.mark.parametrize("config,match", [
    (MoELoRAConfig(target_modules=["v_proj"], num_experts=2, top_k=1, modules_to_save=["nothere"]),
     r"modules_to_save \['nothere'\] matches no module"),
    (MoELoRAConfig(target_modules=["v_proj", "lm_head"], num_experts=[2, 2], top_k=1),
     r"layer None \(lm_head\): per-layer num_experts needs a layer index"),
])
def test_an_adapter_that_cannot_be_injected_leaves_the_model_as_it_was(tmp_path, config, match):
    model = get_moelora_model(tiny_llama(num_layers=2), CONFIG)
    randomize_adapters(model)
    model.eval()
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=match):
        model.add_adapter("other", config)
    _assert_untouched(model, before)
    assert list(model.adapter_configs) == ["default"] and not model.inactive_adapters
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, expected)
    model.add_adapter("other", MoELoRAConfig(target_modules=["v_proj"], num_experts=2, top_k=1))  # a retry works

    source = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["v_proj"], num_experts=2,
                                                                       top_k=1))
    source.save_pretrained(str(tmp_path))  # then given a config that does not fit
    (tmp_path / "moelora_config.json").write_text(json.dumps(config.to_dict()))
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=match):
        model.load_adapter(str(tmp_path), "loaded")
    _assert_untouched(model, before)

    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    with pytest.raises(ValueError, match=match):
        get_moelora_model(base, config)
    _assert_untouched(base, before)


def test_peft_lora_without_dora_magnitudes_does_not_load_into_a_dora_layer(tmp_path):
    """A DoRA layer would keep its own magnitude: neither the checkpoint's LoRA nor its DoRA."""
    plain = _peft_checkpoint(tmp_path / "plain", GOOD)
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], r=4, num_experts=1,
                                                                      use_dora=True))
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: model.layers.0.self_attn.q_proj: the layer is "
                                         r"DoRA but the checkpoint has no .*q_proj.lora_magnitude_vector"):
        moelora.load_peft_lora(model, plain)
    _assert_untouched(model, before)
    # a config saying use_dora whose tensors lack the magnitude: the fresh model is left as it was
    missing = _peft_checkpoint(tmp_path / "missing", GOOD, {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "use_dora": True})
    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    with pytest.raises(ValueError, match=r"the layer is DoRA but the checkpoint has no"):
        moelora.load_peft_lora(base, missing)
    _assert_untouched(base, before)


def test_peft_dora_magnitudes_do_not_load_into_a_lora_layer(tmp_path):
    """A DoRA checkpoint into a layer without DoRA would lose its magnitude: refused, naming both."""
    dora = _peft_checkpoint(tmp_path / "dora", dict(GOOD, lora_magnitude_vector=torch.ones(16)))
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], r=4, num_experts=1))
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: model.layers.0.self_attn.q_proj: the checkpoint "
                                         r"is DoRA but the layer is not"):
        moelora.load_peft_lora(model, dora)
    _assert_untouched(model, before)


def test_a_float32_peft_bias_that_rounds_to_a_bfloat16_models_own_loads_into_one_of_several_experts(tmp_path):
    """The shared tensors of a checkpoint into one expert must equal the model's as the model holds them: a float32
    checkpoint's bias that rounds to the bfloat16 model's bias changes nothing and loads."""
    torch.manual_seed(0)
    model = get_moelora_model(nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16),
                              MoELoRAConfig(target_modules=["0"], r=4, num_experts=2, router="task"))
    own = model.model[0].base_layer.bias
    bias = own.detach().float() * (1 + 2 ** -12)  # below bfloat16's resolution: rounds back to own
    assert not torch.equal(bias, own.float()) and torch.equal(bias.to(torch.bfloat16), own)
    tensors = {"lora_A.weight": torch.randn(4, 8), "lora_B.weight": torch.randn(8, 4), "base_layer.bias": bias}
    directory = _peft_checkpoint(tmp_path / "peft", tensors, {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "bias": "all"}, prefix="base_model.model.0.")
    before = own.detach().clone()
    moelora.load_peft_lora(model, directory, expert=1)
    assert torch.equal(model.model[0].base_layer.bias, before) and model.model[0].lora_A[1].any()


def test_a_peft_config_without_lora_dropout_gives_peft_s_default_of_zero(tmp_path):
    """lora_dropout absent reads as PEFT's default 0.0: the fresh layers drop nothing out in training."""
    directory = _peft_checkpoint(tmp_path / "peft", GOOD, {"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    loaded = moelora.load_peft_lora(tiny_llama(num_layers=2), directory)
    assert loaded.moelora_config.lora_dropout == 0.0
    assert loaded.model.model.layers[0].self_attn.q_proj.settings.lora_dropout == 0.0


def test_a_peft_config_without_peft_type_loads_as_a_lora(tmp_path):
    """peft_type absent (a hand-written or older config) reads as PEFT's LORA, whose tensors these are."""
    directory = _peft_checkpoint(tmp_path / "peft", GOOD, {"r": 4, "lora_alpha": 8})
    layer = moelora.load_peft_lora(tiny_llama(num_layers=2), directory).model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_B[0], GOOD["lora_B.weight"])


def test_peft_lora_loads_into_a_single_expert_layer_with_a_shared_a(tmp_path):
    """share_lora_a is refused with several experts only (their A is one): with one expert the shared A is that
    expert's, and takes the checkpoint's."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], r=4, num_experts=1,
                                                                      share_lora_a=True))
    loaded = moelora.load_peft_lora(model, _peft_checkpoint(tmp_path / "peft", GOOD))
    layer = loaded.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_A, GOOD["lora_A.weight"]) and torch.equal(layer.lora_B[0], GOOD["lora_B.weight"])


@pytest.mark.parametrize("prefix,config,match", [
    ("base_model.model.model.layers.0.self_attn.q_proj.", dict(num_experts=2, share_lora_a=True),
     r"q_proj: cannot load a PEFT LoRA into one expert of a layer whose A is shared"),
    ("base_model.model.model.layers.0.self_attn.k_proj.", dict(num_experts=2),
     r"adapter_model.safetensors: model.layers.0.self_attn.k_proj is not a MoE-LoRA layer of the model")])
def test_peft_lora_into_one_of_two_experts_with_a_shared_a_or_into_a_layer_not_adapted_is_refused(
        tmp_path, prefix, config, match):
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], r=4, top_k=1,
                                                                      **config))
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=match):
        moelora.load_peft_lora(model, _peft_checkpoint(tmp_path / "peft", GOOD, prefix=prefix), expert=0)
    _assert_untouched(model, before)


def test_peft_lora_into_a_shared_a_is_refused_where_the_task_shared_b_is_non_zero(tmp_path):
    """With share_lora_a the task-shared LoRA reads the A the checkpoint replaces: a non-zero shared B would add
    B_sh @ A_peft to the task, even where the shared A is zero before the load."""
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], r=4, num_experts=1,
                                                                      router="task", share_lora_a=True,
                                                                      task_shared_lora=True))
    layer = model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_A.zero_()
        layer.lora_B[-1].fill_(0.5)
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=r"q_proj: the layer's task-shared LoRA is non-zero"):
        moelora.load_peft_lora(model, _peft_checkpoint(tmp_path / "peft", GOOD), expert=0)
    _assert_untouched(model, before)


# ---- tensors of another dtype kind are refused (floating-point precisions may differ) ------------
@pytest.mark.parametrize("suffix,make,match", [
    ("q_proj.lora_A", lambda t: (t * 100).long(), r"q_proj.lora_A has dtype torch.int64, the model's is torch.float32"),
    ("q_proj.lora_B", lambda t: t > 0, r"q_proj.lora_B has dtype torch.bool, the model's is torch.float32"),
    ("router.num_steps", lambda t: t.float() + 0.7, r"num_steps has dtype torch.float32, the model's is torch.int64 "
     r"\(integer values expected\)"),
    ("router.num_steps", lambda t: t > 0, r"num_steps has dtype torch.bool, the model's is torch.int64"),
    ("router.num_steps", lambda t: t.to(torch.complex64), r"num_steps has dtype torch.complex64, the model's is "
     r"torch.int64"),
])
def test_checkpoint_tensors_of_another_dtype_kind_raise(tmp_path, suffix, make, match):
    from safetensors.torch import load_file, save_file

    model = get_moelora_model(tiny_llama(num_layers=2), CONFIG)
    randomize_adapters(model)
    model.eval()
    model.save_pretrained(str(tmp_path))
    weights = str(tmp_path / "adapter_model.safetensors")
    state = load_file(weights)
    name = next(n for n in state if n.endswith(suffix))
    save_file(dict(state, **{name: make(state[name])}), weights)
    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: checkpoint does not fit the model: .*" + match):
        moelora.from_pretrained(base, str(tmp_path))
    _assert_untouched(base, before)
    # another floating-point precision loads (rounded as load_state_dict rounds)
    save_file({n: t.bfloat16() if t.is_floating_point() else t for n, t in state.items()}, weights)
    loaded = moelora.from_pretrained(tiny_llama(num_layers=2), str(tmp_path))
    assert torch.equal(loaded.model.get_parameter(name.replace("router.num_steps", "lora_A")),
                       state[name.replace("router.num_steps", "lora_A")].bfloat16().float())


def test_peft_tensors_of_another_dtype_kind_raise(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    with pytest.raises(ValueError, match=r"q_proj.lora_A has dtype torch.int64, the model's is torch.float32"):
        moelora.load_peft_lora(base, _peft_checkpoint(tmp_path / "a", dict(GOOD, **{"lora_A.weight":
                                                                                    torch.ones(4, 16).long()})))
    _assert_untouched(base, before)
    directory = _peft_checkpoint(tmp_path / "b", GOOD)  # plus an int input embedding (save_embedding_layers)
    weights = str(tmp_path / "b" / "adapter_model.safetensors")
    save_file(dict(load_file(weights), **{"base_model.model.model.embed_tokens.weight": torch.ones(64, 16).long()}),
              weights)
    with pytest.raises(ValueError, match=r"embed_tokens.weight does not fit the model: .* has dtype torch.int64"):
        moelora.load_peft_lora(base, directory)
    _assert_untouched(base, before)
    # as many values in another shape (transposed) do not fit either
    save_file(dict(load_file(weights), **{"base_model.model.model.embed_tokens.weight": torch.randn(16, 64)}),
              weights)
    with pytest.raises(ValueError, match=r"embed_tokens.weight does not fit the model: .* has shape \(16, 64\), the "
                                         r"model's has shape \(64, 16\)"):
        moelora.load_peft_lora(base, directory)
    _assert_untouched(base, before)


def test_peft_lora_alpha_zero_loads_as_a_no_op_and_a_zero_scaled_layer_refuses_a_real_lora(tmp_path):
    """lora_alpha=0 (PEFT: a no-op adapter) divided by the layer's zero scaling after the model was
    changed; a layer whose scaling is 0 cannot take a non-zero scaled LoRA: an error before any copy."""
    zero = _peft_checkpoint(tmp_path / "zero", GOOD, {"peft_type": "LORA", "r": 4, "lora_alpha": 0})
    model = moelora.load_peft_lora(tiny_llama(num_layers=2), zero)
    layer = model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling == 0 and torch.equal(layer.lora_B[0], GOOD["lora_B.weight"])
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, tiny_llama(num_layers=2).eval()(ids).logits)
    tasks = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], r=4, lora_alpha=0,
                                                                      num_experts=2, router="task"))
    before = _fingerprint(tasks)
    with pytest.raises(ValueError, match=r"q_proj: the layer's scaling is 0 \(lora_alpha=0\), it cannot compute the "
                                         r"checkpoint's LoRA \(scaling 2.0\)"):
        moelora.load_peft_lora(tasks, _peft_checkpoint(tmp_path / "good", GOOD), expert=1)
    _assert_untouched(tasks, before)


@pytest.mark.parametrize("corrupt,error,match", [
    ("shard_missing", FileNotFoundError, r"adapter_model-00002-of-000\d\d.safetensors: no such file"),
    ("shard_truncated", ValueError, r"adapter_model-00002-of-000\d\d.safetensors: not a readable safetensors file"),
    ("tensor_left_out_of_the_index", ValueError, r"index.json: shard adapter_model-\d{5}-of-\d{5}.safetensors does "
                                                 r"not hold the tensors the index maps to it: missing \[\], not in"),
    ("tensor_in_the_index_not_in_its_shard", ValueError, r"index.json: shard "
                                                         r"adapter_model-00001-of-000\d\d.safetensors does not hold "
                                                         r"the tensors the index maps to it: missing \["),
    ("shard_outside_the_directory", ValueError, r"index.json: shard '../x.safetensors' is not a file name in"),
    ("shard_the_parent_directory", ValueError, r"index.json: shard '..' is not a file name in"),
    ("index_without_weight_map", ValueError, r"index.json: weight_map must be a non-empty JSON object"),
    ("index_with_an_empty_weight_map", ValueError, r"index.json: weight_map must be a non-empty JSON object"),
])
def test_broken_shards_raise_errors_naming_the_file_before_touching_the_model(saved, corrupt, error, match):
    """A sharded adapter (save_pretrained's max_shard_size) is read whole and checked: a shard that is missing,
    unreadable or does not hold what the index says never loads in part."""
    directory, expected = saved
    model = moelora.from_pretrained(tiny_llama(num_layers=2), str(directory))
    model.save_pretrained(str(directory), max_shard_size=4000)
    index_path = directory / "adapter_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    fullest = max(shards, key=list(index["weight_map"].values()).count)
    assert len(shards) > 2 and list(index["weight_map"].values()).count(fullest) > 1
    if corrupt == "shard_missing":
        (directory / shards[1]).unlink()
    elif corrupt == "shard_truncated":
        (directory / shards[1]).write_bytes((directory / shards[1]).read_bytes()[:100])
    elif corrupt == "tensor_left_out_of_the_index":
        del index["weight_map"][next(k for k, v in index["weight_map"].items() if v == fullest)]
    elif corrupt == "tensor_in_the_index_not_in_its_shard":
        index["weight_map"][next(k for k, v in index["weight_map"].items() if v == shards[1])] = shards[0]
    elif corrupt == "shard_outside_the_directory":
        index["weight_map"][next(iter(index["weight_map"]))] = "../x.safetensors"
    elif corrupt == "shard_the_parent_directory":
        index["weight_map"][next(iter(index["weight_map"]))] = ".."
    elif corrupt == "index_with_an_empty_weight_map":
        index["weight_map"] = {}
    else:
        del index["weight_map"]
    if corrupt not in ("shard_missing", "shard_truncated"):
        index_path.write_text(json.dumps(index))
    _refused_untouched(directory, error, match)
    with pytest.raises(error, match=match):
        model.load_adapter(str(directory), "other")
    assert list(model.adapter_configs) == ["default"]


@pytest.mark.parametrize("where,what", [("org/adapter-on-the-hub", "no such directory"),
                                        ("adapter_model.safetensors", "a file")])
def test_a_path_that_is_not_a_directory_is_named_with_what_was_expected(saved, where, what, monkeypatch):
    """A hub id or a file named where the adapter's directory goes: the error said '<it>/moelora_config.json: no
    such file', as if the adapter's directory lacked its config; both readers now say it is not a directory."""
    directory, _ = saved
    monkeypatch.chdir(directory)
    base = tiny_llama(num_layers=2)
    before = _fingerprint(base)
    for load in (moelora.from_pretrained, moelora.load_peft_lora):
        with pytest.raises(FileNotFoundError, match=rf"^{re.escape(where)}: {what}; an adapter is read from the local "
                                                    r"directory .*snapshot_download"):
            load(base, where)
    _assert_untouched(base, before)
