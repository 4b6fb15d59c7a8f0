"""Plain training loops with a MoELoRAModel, as users write them: an optimiser whose state is saved and restored
into a model reloaded with from_pretrained(is_trainable=True), and parameter groups found by name (PEFT's LoRA+)."""

import copy

import pytest
import torch

import moelora
from moelora import MoELoRAConfig, MoELoRAModel, get_moelora_model
from helpers import randomize_adapters, tiny_llama

pytestmark = pytest.mark.usefixtures("single_torch_thread")
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def _model():
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(
        target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, r=4, router="threshold", threshold_eps=0.2,
        threshold_ramp_steps=4))
    randomize_adapters(model)
    return model.train()


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _step(model, optimizer, seed):
    torch.manual_seed(seed)  # the threshold routing draws
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.step_routers()


def test_a_restored_optimizer_goes_on_as_the_uninterrupted_run_in_a_reloaded_model(tmp_path):
    """The trainable parameters of a model reloaded with from_pretrained(is_trainable=True) come in the order of the
    saved one, so the saved optimizer state (indexed by that order) fits them: the step after the restore equals the
    uninterrupted run's, eps ramp included (the routers' step counts are saved)."""
    model = _model()
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2)
    for seed in range(2):
        _step(model, optimizer, seed)
    model.save_pretrained(str(tmp_path))
    saved_state = copy.deepcopy(optimizer.state_dict())
    _step(model, optimizer, 2)

    reloaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path), is_trainable=True).train()
    assert [n for n, p in reloaded.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
    restored = torch.optim.AdamW(_trainable(reloaded), lr=1e-2)
    restored.load_state_dict(saved_state)
    _step(reloaded, restored, 2)
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("router", ["threshold", "task"])
def test_peft_loraplus_gives_every_lora_b_the_higher_learning_rate(router):
    """docs/integration.md: PEFT's create_loraplus_optimizer finds moelora's B matrices by their name (lora_B),
    and gives every 1-D parameter the higher rate too (task routing's lora_gamma, which the docs once left
    implied to keep the base rate); A and the routers keep the base rate."""
    loraplus = pytest.importorskip("peft.optimizers").create_loraplus_optimizer
    model = _model() if router == "threshold" else get_moelora_model(
        tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=3, router="task"))
    optimizer = loraplus(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert set(lr_of) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(name.endswith("lora_gamma") for name in lr_of) == (router == "task")
    for name, lr in lr_of.items():
        assert lr == pytest.approx(1.6e-2 if name.endswith(("lora_B", "lora_gamma")) else 1e-3), name
