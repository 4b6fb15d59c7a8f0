"""TRL's training flows, reproduced by hand (TRL is not a dependency) on a tiny Llama: a preference step (DPO, KTO)
runs the policy's forward, then the reference's under ``with model.disable_adapter(), torch.no_grad():`` (or with
a reference adapter activated: TRL's ``ref_adapter_name``), then the loss with the router aux loss; PPO / RLOO
generate with the reference the same ways."""

import copy
import warnings

import pytest
import torch

import moelora
from moelora import MoELoRAConfig, get_moelora_model
from helpers import randomize_adapters, tiny_llama, token_batch


def _config():
    return MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2)


def _policy(checkpointing=None):
    """(the wrapped tiny Llama in training mode with random adapters, the base model's logits of token_batch())."""
    base = tiny_llama(num_layers=2)
    with torch.no_grad():
        base_logits = base(token_batch()).logits
    model = get_moelora_model(base, _config())
    randomize_adapters(model)
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    return model, base_logits


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["plain", "non-reentrant", "reentrant"])
def test_a_reference_forward_under_disable_adapter_leaves_the_policys_aux_loss(checkpointing):
    """DPO's step: the policy's forward, the reference's (the base model: disable_adapter, no_grad), then the loss
    with moelora.aux_loss(model). The reference's forward cleared the policy's aux losses (aux_loss 0, the routers
    trained by nothing); now the loss and every gradient are those of the step without the reference forward."""
    model, base_logits = _policy(checkpointing)
    alone = copy.deepcopy(model)
    ids = token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reentrant checkpointing's aux loss has no gradient, and says so
        policy = model(ids, labels=ids)
        expected_aux = moelora.aux_loss(model).detach().clone()
        with model.disable_adapter(), torch.no_grad():
            reference = model(ids).logits
            model.generate(ids, max_new_tokens=2, do_sample=False, attention_mask=torch.ones_like(ids))
        assert torch.equal(reference, base_logits)
        aux = moelora.aux_loss(model)
        assert expected_aux > 0 and torch.equal(aux.detach(), expected_aux)
        (policy.logits.mean() - reference.mean() + aux).backward()
        out = alone(ids, labels=ids)
        (out.logits.mean() - reference.mean() + moelora.aux_loss(alone)).backward()
    grads, expected = _grads(model), _grads(alone)
    assert grads.keys() == expected.keys() and any("router" in n for n in grads)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_reference_adapter_activated_for_its_forward_leaves_the_policys_aux_loss():
    """TRL's ref_adapter_name: set_adapter("reference"), its forward, set_adapter("default"). Switching the
    policy's adapter out cleared its aux losses; now they come back with it, and a stored adapter's loss is not
    counted (moelora.aux_loss of the wrapper walks its stored adapters too)."""
    model, _ = _policy()
    model.add_adapter("reference", _config())
    ids = token_batch()
    policy = model(ids, labels=ids)
    expected_aux = moelora.aux_loss(model).detach().clone()
    model.set_adapter("reference", inference_mode=True)
    assert torch.equal(moelora.aux_loss(model), torch.zeros(()))  # the policy's loss is set aside, not counted
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a training-mode forward without gradients
        reference = model(ids).logits
        assert moelora.aux_loss(model) > 0  # the reference adapter's own
    model.set_adapter("default")
    aux = moelora.aux_loss(model)
    assert torch.equal(aux.detach(), expected_aux) and aux.requires_grad
    assert torch.equal(model.aux_loss().detach(), expected_aux)
    (policy.logits.mean() - reference.mean() + aux).backward()
    router = model.model.model.layers[0].self_attn.q_proj.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    model.set_adapter("reference")  # its loss comes back with it, the policy's goes aside
    with pytest.warns(UserWarning, match="without gradients"):  # its forward's, as it was
        assert moelora.aux_loss(model) > 0 and not torch.equal(moelora.aux_loss(model), expected_aux)
    copy.deepcopy(model)  # the records set aside (autograd graphs) are not copied
    model.delete_adapter("default")
    assert "default" not in model._stored_routing_records


def test_an_adapter_activated_inside_disable_adapter_leaves_no_loss_on_the_stored_one():
    """The end of a disable_adapter block gives back the records of the adapter active before it only where that
    adapter is still active: one stored by a set_adapter in the block does not count in moelora.aux_loss."""
    model, _ = _policy()
    model.add_adapter("other", _config())
    ids = token_batch()
    model(ids)
    with model.disable_adapter():
        model.set_adapter("other")
    assert torch.equal(moelora.aux_loss(model), torch.zeros(()))
    model.set_adapter("default")
    assert moelora.aux_loss(model) > 0


def test_an_adapter_stored_inside_disable_adapter_after_a_base_forward_keeps_its_records():
    """A forward in a disable_adapter block (the base model's) clears the active adapter's records; a set_adapter
    after it in the block stored those cleared records with the adapter, so the policy's aux loss from before the
    block was lost when it came back. The adapter stored in the block keeps the records it had before the block."""
    model, _ = _policy()
    model.add_adapter("other", _config())
    ids = token_batch()
    model(ids)
    expected = moelora.aux_loss(model).detach().clone()
    with model.disable_adapter():
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a training-mode forward without gradients
            model(ids)
        model.set_adapter("other")
    assert torch.equal(moelora.aux_loss(model), torch.zeros(()))
    model.set_adapter("default")
    assert expected > 0 and torch.equal(moelora.aux_loss(model).detach(), expected)
