"""Models whose layers accelerate offloads (cpu_offload, disk_offload, a device_map with "cpu" /
"disk" entries): the base weights wait on meta and are loaded for each forward. Adapters injected
there live on the device the forwards run on and train as on a model held in memory; what
needs the base weight outside a forward (merging, DoRA's magnitude, a modules_to_save copy) is refused, not
done on meta."""

import copy

import pytest
import torch
import torch.nn as nn

import moelora

accelerate = pytest.importorskip("accelerate")
pytestmark = pytest.mark.usefixtures("single_torch_thread")
D = 16


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _offload(model, how, tmp_path):
    if how == "cpu":
        return accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    return accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))


def _inject(model, **settings):
    torch.manual_seed(1)  # the same adapters for every model
    settings = {**dict(num_experts=4, top_k=2), **settings}
    config = moelora.MoELoRAConfig(r=4, lora_alpha=8, target_modules=["a", "b"], init_lora_weights=False, **settings)
    return moelora.get_moelora_model(model, config)


@pytest.mark.parametrize("how", ["cpu", "disk"])
def test_adapters_of_offloaded_layers_are_real_and_train_as_in_memory(how, tmp_path):
    torch.manual_seed(0)
    net = _Net()
    reference = _inject(copy.deepcopy(net))
    offloaded = _inject(_offload(net, how, tmp_path))
    assert net.a.base_layer.weight.device.type == "meta"  # offloaded: loaded for each forward only
    trained = {n: p for n, p in offloaded.named_parameters() if p.requires_grad}
    assert trained and all(p.device.type == "cpu" for p in trained.values())
    expected = dict(reference.named_parameters())
    for name, p in trained.items():  # the same init as the adapters of the model in memory
        torch.testing.assert_close(p, expected[name], rtol=0, atol=0)
    x = torch.randn(6, D)
    y, y_ref = offloaded(x), reference(x)
    torch.testing.assert_close(y, y_ref)
    assert not torch.allclose(y_ref, net.b.base_layer(torch.relu(net.a.base_layer(x))))  # the adapters act
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for name, p in trained.items():
        torch.testing.assert_close(p.grad, expected[name].grad)


def test_merging_an_offloaded_layer_is_refused_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    model = _inject(_offload(_Net(), "cpu", tmp_path), num_experts=1, top_k=1)
    x = torch.randn(3, D)
    before = model(x)
    with pytest.raises(NotImplementedError, match="merging needs the base layer's weight, which accelerate has "
                                                  "offloaded"):
        model.merge_adapter()
    assert not model.model.a.merged and not model.model.b.merged
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["cpu", "disk"])
def test_modules_to_save_of_an_offloaded_module_is_refused_and_changes_nothing(how, tmp_path):
    """modules_to_save trains a copy of the module, and an offloaded module's copy held meta tensors that its
    copied hook replaced by the offloaded weights on each forward: it got no gradient, so an optimiser left it
    as it was, and saving wrote meta tensors. Refused at injection, naming the module and the parameter."""
    torch.manual_seed(0)
    net = _offload(_Net(), how, tmp_path)
    config = moelora.MoELoRAConfig(r=4, num_experts=2, top_k=1, target_modules=["a"], modules_to_save=["b"])
    with pytest.raises(NotImplementedError, match=r"modules_to_save names b, whose parameter weight accelerate has "
                                                  r"offloaded \(on meta between forwards\)"):
        moelora.get_moelora_model(net, config)
    assert type(net.a) is nn.Linear and type(net.b) is nn.Linear and net.a.weight.requires_grad


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_training_an_offloaded_bias_is_refused_and_changes_nothing(bias, tmp_path):
    """bias="lora_only" / "all" trains the base layers' biases, and an offloaded layer's bias waits on meta and
    is loaded from the offloaded weights for each forward: it was marked trainable but got no gradient, and
    saving raised "Cannot copy out of meta tensor". Refused at injection, naming the bias."""
    torch.manual_seed(0)
    net = _offload(_Net(), "cpu", tmp_path)
    with pytest.raises(NotImplementedError, match=rf"bias='{bias}' trains a\.base_layer\.bias, which accelerate has "
                                                  r"offloaded \(on meta between forwards\)"):
        _inject(net, bias=bias)
    assert type(net.a) is nn.Linear and type(net.b) is nn.Linear and net.a.bias.requires_grad


def test_loading_a_peft_bias_checkpoint_into_an_offloaded_model_is_refused(tmp_path):
    """A PEFT checkpoint with bias="all" holds the base biases; copied into an offloaded model's (on meta) they were
    lost silently (the loaded model's outputs off by the biases' change); refused as training them is."""
    torch.manual_seed(0)
    net = _Net()
    offloaded = _offload(copy.deepcopy(net), "cpu", tmp_path)
    model = _inject(net, num_experts=1, top_k=1, bias="all")
    with torch.no_grad():
        net.a.base_layer.bias.add_(torch.rand(D) + 0.5)
    moelora.export_peft_lora(model, str(tmp_path / "peft"))
    with pytest.raises(NotImplementedError, match=r"bias='all' trains a\.base_layer\.bias, which accelerate has "
                                                  r"offloaded"):
        moelora.load_peft_lora(offloaded, str(tmp_path / "peft"))
    assert type(offloaded.a) is nn.Linear


def test_exporting_an_offloaded_bias_to_peft_is_refused_clearly(tmp_path):
    """export_peft_lora(bias="all") writes the base biases, and an offloaded layer's waits on meta: the export
    raised torch's "Cannot copy out of meta tensor" from its write; it raises naming the bias, writing nothing."""
    torch.manual_seed(0)
    model = _inject(_offload(_Net(), "cpu", tmp_path), num_experts=1, top_k=1)
    with pytest.raises(NotImplementedError, match=r"a\.base_layer\.bias, which is on meta \(accelerate offloaded "
                                                  r"it"):
        moelora.export_peft_lora(model, str(tmp_path / "peft"), bias="all")
    assert not (tmp_path / "peft").exists()


def test_dora_on_an_offloaded_layer_is_refused(tmp_path):
    with pytest.raises(NotImplementedError, match="DoRA .* accelerate has offloaded"):
        _inject(_offload(_Net(), "cpu", tmp_path), num_experts=1, top_k=1, use_dora=True)


def test_meta_init_without_offloading_keeps_the_adapters_on_meta():
    with torch.device("meta"):
        net = _Net()
    model = _inject(net)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_upcycling_an_offloaded_ffn_is_refused_and_changes_nothing(tmp_path):
    from helpers import tiny_llama

    model = tiny_llama(num_layers=1)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    mlp = model.model.layers[0].mlp
    with pytest.raises(NotImplementedError, match="upcycling model.layers.0.mlp .* accelerate has offloaded"):
        moelora.upcycle_ffn(model, num_experts=2, top_k=1)
    assert model.model.layers[0].mlp is mlp


def test_upcycling_an_offloaded_bert_layer_is_refused_and_changes_nothing():
    """A BERT layer's projections are its grandchildren (intermediate.dense, output.dense): offloaded, they are
    refused as an MLP's children are, not copied from meta into the experts."""
    from helpers import tiny_bert

    model = tiny_bert(num_layers=1)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    layer = model.encoder.layer[0]
    intermediate = layer.intermediate
    with pytest.raises(NotImplementedError, match="upcycling encoder.layer.0 .* accelerate has offloaded"):
        moelora.upcycle_ffn(model, num_experts=2, top_k=1)
    assert layer.intermediate is intermediate


def test_an_offloaded_layer_whose_hook_has_loaded_its_weight_is_not_taken_for_offloaded():
    """offload_hook names the hook only while the weight waits on meta: inside a forward (after the hook's
    pre_forward loaded it) the weight is real, and nothing refuses it; an offloading hook with no execution
    device has nowhere to put the adapters, so it is not taken for one (they stay on meta, as meta init's)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from moelora.modules.adapter_base import adapter_device, offload_hook, refuse_offloaded

    layer, hook = nn.Linear(D, D), AlignDevicesHook(execution_device=torch.device("cpu"), offload=True)
    add_hook_to_module(layer, hook)
    assert offload_hook(layer) is hook and layer.weight.device.type == "meta"
    hook.pre_forward(layer, torch.randn(2, D))
    assert layer.weight.device.type == "cpu"
    assert offload_hook(layer) is None
    refuse_offloaded(layer, "merging")  # no error: the weight is real now
    hook.post_forward(layer, None)
    assert offload_hook(layer) is hook and layer.weight.device.type == "meta"

    nowhere = nn.Linear(D, D)
    add_hook_to_module(nowhere, AlignDevicesHook(execution_device=None, offload=True))
    assert nowhere.weight.device.type == "meta"
    assert offload_hook(nowhere) is None and adapter_device(nowhere).type == "meta"


def test_an_offloaded_layer_with_a_second_hook_is_still_taken_for_offloaded(tmp_path):
    """A hook appended after accelerate's offloading one makes a SequentialHook holding both: the adapters
    are still real on the execution device, and merging is still refused."""
    from accelerate.hooks import ModelHook, SequentialHook, add_hook_to_module

    torch.manual_seed(0)
    net = _offload(_Net(), "cpu", tmp_path)
    add_hook_to_module(net.a, ModelHook(), append=True)
    assert isinstance(net.a._hf_hook, SequentialHook)
    model = _inject(net, num_experts=1, top_k=1)
    assert net.a.base_layer.weight.device.type == "meta"
    assert all(p.device.type == "cpu" for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(NotImplementedError, match="merging needs the base layer's weight, which accelerate has "
                                                  "offloaded"):
        model.merge_adapter()
    assert not net.a.merged
