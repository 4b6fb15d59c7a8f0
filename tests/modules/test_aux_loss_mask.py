"""The aux-loss mask (moelora.set_aux_loss_mask, use_aux_loss_mask, MoELoRAModel's aux_loss_mask):
padding tokens count in neither the aux losses, their gradients, nor the routing statistics."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora
from moelora import MoEFFN, MoELoRAEmbedding, MoELoRALinear
from moelora.modules.routed import RouterStats

from helpers import float_args_as_float32, rel_err, tiny_llama, token_batch

MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
LB, Z = 0.3, 0.05


def _layer(mode: str, dtype=torch.float32, hooked: bool = False) -> MoELoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(16, 12).to(dtype)
    if hooked:  # a forward hook on the base layer: the composed path
        base.register_forward_hook(lambda module, args, out: out)
    layer = MoELoRALinear(base, num_experts=4, top_k=2, r=4, router=mode, init_lora_weights=False,
                          router_aux_loss_coef=LB, router_z_loss_coef=Z).to(dtype)
    return layer.eval() if mode == "threshold" else layer.train()  # threshold at eval: no random draws


def _reference(x64, weight64, top_k):
    """Float64 aux loss (weighted, lb, z) over the real tokens of MASK from logits x W^T: lb = E *
    sum_e f_e P_e with f_e the real tokens' top-k slots on e and P_e their mean probability of e,
    per real token; z the mean over the real tokens of lse^2."""
    real = MASK.reshape(-1).bool()
    logits = (x64.reshape(-1, x64.shape[-1]) @ weight64.t())[real]
    num_experts = weight64.shape[0]
    slots = F.one_hot(logits.topk(top_k, -1).indices, num_experts).sum(1).double()
    lb = num_experts * (slots.mean(0) * torch.softmax(logits, -1).mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    return LB * lb + Z * z, lb, z


def test_masked_load_balancing_loss_is_mixtrals_with_its_attention_mask():
    """The masked statistic is transformers' Mixtral load_balancing_loss_func with the attention
    mask (which takes the slot fractions in fp32)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    layer = _layer("topk_softmax", torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with moelora.use_aux_loss_mask(layer, MASK):
        layer(x)
    logits = x.reshape(10, 16) @ layer.router.weight.detach().t()
    want = load_balancing_loss_func((logits,), 4, 2, MASK)
    assert rel_err(layer.last_router_stats["load_balancing_loss"], want) < 1e-6


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32),
                                           ("triton", torch.float64)])
@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax"])
@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "composed"])
def test_masked_aux_loss_and_gradients_equal_mixtrals_masked_loss_in_float64(backend, dtype, mode, hooked):
    """A float64 layer's masked aux loss and its gradients to float64's precision on the Triton
    backend too: its kernels took the coefficients as Triton's float arguments, float32 on a GPU
    (float_args_as_float32), and formed lb_coef * E in float32 (relative errors ~1e-8)."""
    layer = _layer(mode, dtype, hooked)
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    with moelora.use_backend(backend), moelora.use_aux_loss_mask(layer, MASK), float_args_as_float32():
        layer(x)
        aux = layer.last_aux_loss
        gx, gw = torch.autograd.grad(aux, (x, layer.router.weight))
    x64 = x.detach().double().requires_grad_()
    w64 = layer.router.weight.detach().double().requires_grad_()
    ref, lb, z = _reference(x64, w64, 2)
    rx, rw = torch.autograd.grad(ref, (x64, w64))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(aux, ref) < tol
    stats = layer.last_router_stats
    assert rel_err(stats["load_balancing_loss"], lb) < tol and rel_err(stats["z_loss"], z) < tol
    assert rel_err(gx, rx) < tol and rel_err(gw, rw) < tol
    assert gx[~MASK.bool()].abs().max() == 0  # padding tokens get no aux-loss gradient


def _ffn():
    torch.manual_seed(0)
    return MoEFFN(nn.Linear(16, 24), nn.Linear(24, 16), F.silu, num_experts=4, top_k=2, gate_proj=nn.Linear(16, 24),
                  router="softmax_topk", router_aux_loss_coef=LB, router_z_loss_coef=Z).train()


def _embedding():
    torch.manual_seed(0)
    return MoELoRAEmbedding(nn.Embedding(20, 16), num_experts=4, top_k=2, r=4, init_lora_weights=False,
                            router_aux_loss_coef=LB, router_z_loss_coef=Z).train()


MODULES = {
    "linear-fused": lambda: _layer("softmax_topk"), "linear-composed": lambda: _layer("softmax_topk", hooked=True),
    "linear-threshold": lambda: _layer("threshold"), "ffn": _ffn, "embedding": _embedding,
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_masked_forward_records_what_the_real_tokens_alone_give(backend, kind):
    """Padding changes nothing: the masked record (loss, router gradient, every statistic) of a
    padded batch equals the unmasked record of its real tokens alone; the outputs are unchanged."""
    module = MODULES[kind]()
    real = MASK.bool()
    if kind == "embedding":
        x = torch.randint(0, 20, (2, 5))
        x[~real] = 0  # padding tokens, all alike
    else:
        x = torch.randn(2, 5, 16)
        x[~real] = 0.25
    router = module.router.weight
    with moelora.use_backend(backend):
        unmasked_y = module(x)
        with moelora.use_aux_loss_mask(module, MASK):
            y = module(x)
        masked = module.last_aux_loss, dict(module.last_router_stats)
        masked_grad = torch.autograd.grad(masked[0], router)[0]
        module(x[real])
    alone = module.last_aux_loss, dict(module.last_router_stats)
    assert torch.equal(y, unmasked_y)
    assert rel_err(masked[0], alone[0]) < 1e-5
    assert rel_err(masked_grad, torch.autograd.grad(alone[0], router)[0]) < 1e-5
    for key in masked[1]:
        assert rel_err(masked[1][key], alone[1][key]) < 1e-5, key
    assert module.aux_loss_mask is None  # the block put back what the module held


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_threshold_routing_loads_count_only_the_kept_slots(backend):
    """Threshold routing drops slots (weight 0); its masked load counts the real tokens' kept slots only, as the
    unmasked load of the real tokens alone does (eval: a slot is kept iff its share of the top-k is >= eps)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    base.register_forward_hook(lambda module, args, out: out)  # the composed path: the loss computed from the routing
    layer = MoELoRALinear(base, num_experts=4, top_k=2, r=4, router="threshold", init_lora_weights=False,
                          threshold_eps=0.45).eval()
    x = torch.randn(2, 5, 16)
    with moelora.use_backend(backend):
        with moelora.use_aux_loss_mask(layer, MASK):
            layer(x)
        masked = layer.last_router_stats["load"]
        layer(x[MASK.bool()])
    alone = layer.last_router_stats["load"]
    assert masked.sum() < 2  # some slots were dropped
    torch.testing.assert_close(masked, alone)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_true_mask_gives_the_unmasked_loss_output_and_gradients(backend):
    layer = _layer("softmax_topk")
    x = torch.randn(2, 5, 16, requires_grad=True)
    dy = torch.randn(2, 5, 12)
    grads = []
    for mask in (None, torch.ones(2, 5, dtype=torch.bool)):
        with moelora.use_backend(backend), moelora.use_aux_loss_mask(layer, mask):
            y = layer(x)
        loss = (y * dy).sum() + layer.last_aux_loss
        grads.append([y, loss, *torch.autograd.grad(loss, (x, layer.router.weight, layer.lora_A, layer.lora_B))])
    for got, want in zip(grads[1], grads[0]):
        assert rel_err(got, want) < 1e-5


def test_wrapper_takes_the_mask_as_a_tensor_or_by_argument_name_and_puts_back_what_was_held():
    model = moelora.get_moelora_model(tiny_llama(2), moelora.MoELoRAConfig(
        r=4, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"], router_aux_loss_coef=LB))
    ids = token_batch()
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    routed = [m for m in model.modules() if isinstance(m, moelora.MoELoRALinear)]

    def aux(**kwargs):
        model(ids, attention_mask=mask, **kwargs)
        return model.aux_loss()

    unmasked = aux()
    by_tensor = aux(aux_loss_mask=mask)
    assert all(torch.equal(m.aux_loss_mask, mask.reshape(-1).bool()) for m in routed)  # held until the next forward
    assert not torch.allclose(by_tensor, unmasked)
    assert torch.equal(aux(aux_loss_mask="attention_mask"), by_tensor)
    model.aux_loss_mask_from = "attention_mask"  # what transformers' Trainer, which passes only the batch, needs
    assert torch.equal(aux(), by_tensor)
    model.aux_loss_mask_from = None
    assert torch.equal(aux(), unmasked)
    assert all(m.aux_loss_mask is None for m in routed)
    assert "aux_loss_mask" in __import__("inspect").signature(model.forward).parameters


def test_a_mask_set_by_hand_outlives_the_wrappers_forward_masks():
    model = moelora.get_moelora_model(tiny_llama(2), moelora.MoELoRAConfig(
        r=4, num_experts=4, top_k=2, target_modules=["q_proj"]))
    ids = token_batch()
    mask = torch.ones_like(ids)
    moelora.set_aux_loss_mask(model, mask)
    held = [m.aux_loss_mask for m in model.modules() if isinstance(m, moelora.MoELoRALinear)]
    other = mask.clone()
    other[1, 2:] = 0
    model(ids, aux_loss_mask=other)
    model(ids)  # puts back the mask set by hand
    assert [m.aux_loss_mask for m in model.modules() if isinstance(m, moelora.MoELoRALinear)] == held
    moelora.set_aux_loss_mask(model, None)
    assert all(m.aux_loss_mask is None for m in model.modules() if isinstance(m, moelora.MoELoRALinear))


class _Holder(nn.Module):
    """A module that holds the wrapper and forwards to it (as DDP does)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("outer", ["wrapper", "holder", "compiled", "inner_model", "layer"])
def test_use_aux_loss_mask_after_a_forward_with_a_mask_leaves_no_stale_mask(outer):
    """The wrapper's forward(aux_loss_mask=) keeps its mask until its next forward; a use_aux_loss_mask
    block after it must not end by putting that mask back for good (the block's forward dropped the
    record that would have cleared it): after the block the modules hold what they held before that
    forward, as use_task_ids does for task ids. So too for a block given a module that holds the
    MoELoRAModel (a module of the user's or DDP: "holder"; torch.compile's OptimizedModule), and for
    one given a module inside it (the wrapped model, one layer: the wrapper's forward in the block), where
    the stale mask masked later forwards of a batch of the same shape silently."""
    model = moelora.get_moelora_model(tiny_llama(2), moelora.MoELoRAConfig(
        r=4, num_experts=4, top_k=2, target_modules=["q_proj"], router_aux_loss_coef=LB))
    held = (_Holder(model) if outer == "holder" else torch.compile(model, backend="eager") if outer == "compiled"
            else model)
    block = {"inner_model": model.model, "layer": model.model.model.layers[1].self_attn.q_proj}.get(outer, held)
    routed = [m for m in model.modules() if isinstance(m, moelora.MoELoRALinear)]
    ids = token_batch()
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    held(ids, aux_loss_mask=mask)
    with moelora.use_aux_loss_mask(block, torch.ones_like(ids)):
        held(ids)
    assert all(m.aux_loss_mask is None for m in routed)
    model(ids)
    unmasked = model.aux_loss()
    moelora.set_aux_loss_mask(model, None)
    model(ids)
    torch.testing.assert_close(unmasked, model.aux_loss(), rtol=0, atol=0)


def test_bad_masks_raise_naming_what_was_expected():
    layer = _layer("softmax_topk")
    with pytest.raises(TypeError, match="bool or integer"):
        moelora.set_aux_loss_mask(layer, torch.ones(2, 5))
    with pytest.raises(TypeError, match="torch.Tensor or None"):
        moelora.set_aux_loss_mask(layer, [[1, 1]])
    with pytest.raises(ValueError, match="has 6 tokens, but this MoELoRALinear routed 10"):
        with moelora.use_aux_loss_mask(layer, torch.ones(2, 3, dtype=torch.long)):
            layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="no routed module"):
        moelora.set_aux_loss_mask(nn.Linear(2, 2), MASK)
    with moelora.use_aux_loss_mask(layer, torch.zeros(2, 5, dtype=torch.bool)):  # only padding: no loss
        layer(torch.randn(2, 5, 16))
    assert layer.last_aux_loss == 0
    with pytest.raises(ValueError, match="no tokens in its last forward that its aux-loss mask counts"):
        layer.last_router_stats["load"]


def test_any_nonzero_value_of_an_integer_mask_is_a_real_token():
    """Nonzero is a real token, as documented (an int8 mask of -1s, a uint8 one of 255s): held as the bool mask."""
    layer = _layer("softmax_topk")
    for mask in (-MASK.to(torch.int8), MASK.to(torch.uint8) * 255):
        with moelora.use_aux_loss_mask(layer, mask) as held:
            assert held.dtype == torch.bool and torch.equal(held, MASK.reshape(-1) != 0)


def test_a_layer_reads_the_mask_on_the_device_its_forward_routes_on():
    """The mask is held on the device of the first module's parameters at set time; a layer on another device (a model
    split over devices, or moved after the mask was set) reads it on its own device: a forward on the meta device here
    (no accelerator needed) gets a meta mask, a host forward the held one itself."""
    layer = _layer("softmax_topk")
    moelora.set_aux_loss_mask(layer, MASK)
    held = layer.aux_loss_mask
    assert layer.aux_loss_mask_of(10, torch.device("cpu")) is held
    moved = layer.aux_loss_mask_of(10, torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == (10,) and moved.dtype == torch.bool


def test_router_stats_of_a_model_leave_out_a_module_that_routed_only_padding():
    """moelora.router_stats (what a logging step calls) over an all-padding batch: the modules whose
    statistics are undefined (no real token) are left out instead of raising for the whole model;
    the others are kept."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": _layer("softmax_topk"), "b": _layer("softmax_topk")})
    x = torch.randn(2, 5, 16)
    with moelora.use_aux_loss_mask(model, MASK):
        model["a"](x), model["b"](x)
    assert sorted(moelora.router_stats(model)) == ["a", "b"]
    with moelora.use_aux_loss_mask(model["b"], torch.zeros(2, 5, dtype=torch.bool)):
        model["b"](x)
    stats = moelora.router_stats(model)
    assert sorted(stats) == ["a"] and sorted(stats["a"]) == sorted(RouterStats.KEYS)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_layer_compiles_fullgraph_and_matches_eager(backend):
    layer = _layer("softmax_topk")
    x = torch.randn(2, 5, 16)

    def step(inp):
        y = layer(inp)
        return y, layer.last_aux_loss

    with moelora.use_backend(backend), moelora.use_aux_loss_mask(layer, MASK):
        want = step(x)
        torch._dynamo.reset()
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_wrapper_with_a_mask_per_batch_compiles_fullgraph_once_and_matches_eager():
    """The wrapper's forward given a new aux-loss mask each batch, compiled with fullgraph: the masks
    are tensors (no recompilation per mask), the losses and gradients those of eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    stack = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 4))
    model = moelora.get_moelora_model(stack, moelora.MoELoRAConfig(target_modules=["0", "2"], num_experts=4,
                                                                   top_k=2, r=2, init_lora_weights=False))

    def loss(m, x, mask):
        return m(x, aux_loss_mask=mask).sum() + m.aux_loss()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, fullgraph=True, backend=counter)
    params = [p for p in model.parameters() if p.requires_grad]
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x, mask = torch.randn(2, 5, 6, generator=gen), torch.rand(2, 5, generator=gen) > 0.4
        want = loss(model, x, mask)
        want_grads = torch.autograd.grad(want, params)
        got = compiled(model, x, mask)
        for g, w in zip((got, *torch.autograd.grad(got, params)), (want, *want_grads)):
            assert rel_err(g, w) < 1e-5
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 3 masks"


def test_generate_after_a_masked_forward_runs_without_the_mask():
    """generate's steps route other numbers of tokens than the training batch whose mask the layers
    held (until the wrapper's next forward): generate runs with the masks off, as nothing trains, and
    puts back a mask set by hand."""
    model = moelora.get_moelora_model(tiny_llama(2), moelora.MoELoRAConfig(
        r=4, num_experts=4, top_k=2, target_modules=["q_proj"])).eval()
    ids = token_batch()
    mask = torch.ones_like(ids)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    model(ids, attention_mask=mask, aux_loss_mask="attention_mask")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), want)
    moelora.set_aux_loss_mask(model, mask)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), want)
    assert all(m.aux_loss_mask is not None for m in model.modules() if isinstance(m, moelora.MoELoRALinear))


def test_gradient_checkpointing_gives_the_masked_gradients():
    """A checkpointed layer runs its forward again in backward: the mask the wrapper's forward set is
    still held then, so the gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = moelora.get_moelora_model(tiny_llama(2), moelora.MoELoRAConfig(
            r=4, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
            router_aux_loss_coef=LB))
        if checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = token_batch()
        mask = torch.ones_like(ids)
        mask[0, 3:] = 0
        model(ids, attention_mask=mask, labels=ids, aux_loss_mask=mask).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for got, want in zip(*grads):
        assert rel_err(got, want) < 1e-5


def _q_proj_model(checkpointing: bool):
    """A tiny Llama with 4-expert top-2 layers on q_proj, both aux losses on, in training mode; its layers
    checkpointed (non-reentrant) if ``checkpointing``. The same seed gives the same adapters either way."""
    torch.manual_seed(0)
    model = moelora.get_moelora_model(tiny_llama(2), moelora.MoELoRAConfig(
        r=4, num_experts=4, top_k=2, target_modules=["q_proj"], init_lora_weights=False,
        router_aux_loss_coef=LB, router_z_loss_coef=Z))
    if checkpointing:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_masked_forwards_and_one_backward_under_checkpointing(backend):
    """Two forwards with other masks over as many tokens (a preference loss's chosen and rejected batches),
    then one backward of both: each checkpointed recomputation takes its own forward's mask, so the
    gradients equal those without checkpointing. Before, the first forward's recomputation silently took
    the second's mask."""
    ids = token_batch()
    first, second = MASK.clone(), MASK.flip(1).clone()
    grads = []
    for checkpointing in (False, True):
        model = _q_proj_model(checkpointing)
        with moelora.use_backend(backend):
            loss = model(ids, attention_mask=first, labels=ids, aux_loss_mask=first).loss
            loss = loss + model(ids, attention_mask=second, labels=ids, aux_loss_mask=second).loss
            loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
        assert all(m.aux_loss_mask.equal(second.reshape(-1).bool()) for m in model.modules()
                   if isinstance(m, MoELoRALinear))
    for got, want in zip(*grads):
        assert rel_err(got, want) < 1e-5


def test_a_backward_of_a_forwards_aux_loss_alone_recomputes_with_that_forwards_mask():
    """forward(aux_loss_mask=a), its aux loss kept (model.aux_loss()), forward(aux_loss_mask=b), then a backward of the
    first's aux loss alone (no output of that forward in it): the checkpointed recomputation takes a, not the b the
    modules hold, so the gradients equal those without checkpointing. The aux losses carry the routing hook too."""
    ids = token_batch()
    first, second = MASK.clone(), MASK.flip(1).clone()
    grads = []
    for checkpointing in (False, True):
        model = _q_proj_model(checkpointing)
        model(ids, attention_mask=first, aux_loss_mask=first)
        aux = model.aux_loss()
        model(ids, attention_mask=second, aux_loss_mask=second)
        aux.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad and p.grad is not None])
    assert grads[0] and len(grads[0]) == len(grads[1])
    for got, want in zip(*grads):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_padding_logits_stay_out_of_the_masked_loss(backend):
    """Padding rows take no part whatever they hold (NaN, +-inf logits): both the PyTorch ops and the
    kernels give the real tokens' loss and gradient."""
    from moelora.ops.losses import masked_aux_losses

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    ids = logits.topk(2, -1).indices.int()
    weights = torch.rand(10, 2, generator=gen, dtype=torch.float64)
    mask = MASK.reshape(-1).bool()
    real = logits[mask].clone().requires_grad_()
    want = masked_aux_losses(real, ids[mask], weights[mask], mask[mask], LB, Z)
    (want_grad,) = torch.autograd.grad(want[0], real)
    poisoned = logits.clone()
    poisoned[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30], dtype=torch.float64)
    poisoned.requires_grad_()
    with moelora.use_backend(backend):
        got = masked_aux_losses(poisoned, ids, weights, mask, LB, Z)
    (grad,) = torch.autograd.grad(got[0], poisoned)
    tol = 1e-12 if backend == "torch" else 1e-6  # the kernels take the coefficients as fp32 scalars
    assert rel_err(got[0], want[0]) < tol and rel_err(got[1], want[1]) < tol and torch.equal(got[2], want[2])
    assert rel_err(grad[mask], want_grad) < tol and grad[~mask].abs().max() == 0


def test_compiled_masked_loss_has_the_eager_gradient():
    """The PyTorch formula (torch backend, and what torch.compile traces) compiled with fullgraph: its
    closed-form backward gives eager's gradient. (dynamo 2.11 lost the loss's gradient, all zeros, where
    an in-place op made the Function's output.)"""
    from moelora.ops.losses import masked_aux_losses

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 4, generator=gen, requires_grad=True)
    ids = logits.detach().topk(2, -1).indices.int()
    weights = torch.rand(10, 2, generator=gen)
    mask = MASK.reshape(-1).bool()

    def loss(logits, m):
        return masked_aux_losses(logits, ids, weights, m, LB, Z)[0]

    with moelora.use_backend("torch"):
        want = torch.autograd.grad(loss(logits, mask), logits)[0]
        torch._dynamo.reset()
        got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="eager")(logits, mask), logits)[0]
    assert want.abs().max() > 0 and rel_err(got, want) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["linear-fused", "linear-composed", "ffn"])
def test_non_finite_padding_inputs_stay_out_of_every_statistic(backend, kind):
    """Padding rows of NaN (as a fully masked attention row can give) take no part in the routing
    statistics either: each equals the real tokens' alone. The entropy used to be NaN (the
    padding's NaN entropy multiplied by the mask's 0)."""
    module = MODULES[kind]()
    real = MASK.bool()
    x = torch.randn(2, 5, 16)
    x[~real] = float("nan")
    with moelora.use_backend(backend):
        with moelora.use_aux_loss_mask(module, MASK):
            module(x)
        masked = dict(module.last_router_stats)
        module(x[real])
    alone = dict(module.last_router_stats)
    for key in masked:
        assert rel_err(masked[key], alone[key]) < 1e-5, key


def test_masked_statistics_functions_ignore_what_padding_rows_hold():
    """moelora.load_balancing_loss and routing_entropy with a mask (MoLEx's, the routed modules'
    statistics): NaN probabilities in padding rows give the real rows' values (they were NaN)."""
    from moelora.ops.losses import routing_entropy

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(10, 4, generator=gen), -1)
    ids = probs.topk(2, -1).indices
    mask = MASK.reshape(-1).bool()
    poisoned = probs.clone()
    poisoned[~mask] = float("nan")
    assert rel_err(moelora.load_balancing_loss(poisoned, ids, 4, mask=mask),
                   moelora.load_balancing_loss(probs[mask], ids[mask], 4)) < 1e-6
    assert rel_err(routing_entropy(poisoned, mask), routing_entropy(probs[mask])) < 1e-6


def test_masked_statistics_functions_take_an_integer_attention_mask():
    """moelora.load_balancing_loss and routing_entropy take an attention_mask of 0/1 integers as
    transformers' Mixtral load_balancing_loss_func does (and as they did when they multiplied by the
    mask): the real rows' values. Selecting the real rows with torch.where raised for it."""
    from moelora.ops.losses import routing_entropy

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(10, 4, generator=gen), -1)
    ids = probs.topk(2, -1).indices
    mask = MASK.reshape(-1)
    real = mask.bool()
    assert rel_err(moelora.load_balancing_loss(probs, ids, 4, mask=mask),
                   moelora.load_balancing_loss(probs[real], ids[real], 4)) < 1e-6
    assert rel_err(routing_entropy(probs, mask), routing_entropy(probs[real])) < 1e-6


def test_mask_named_by_argument_is_found_when_given_by_position():
    """aux_loss_mask="attention_mask" (or aux_loss_mask_from) takes the argument whether the call
    gives it by keyword or by position (LlamaForCausalLM.forward(input_ids, attention_mask, ...)):
    given by position it used to be missed, and every token counted."""
    model = moelora.get_moelora_model(tiny_llama(2), moelora.MoELoRAConfig(
        r=4, num_experts=4, top_k=2, target_modules=["q_proj"], router_aux_loss_coef=LB))
    ids = token_batch()
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    model(ids, attention_mask=mask, aux_loss_mask=mask)
    want = model.aux_loss()
    model(ids, mask, aux_loss_mask="attention_mask")
    assert torch.equal(model.aux_loss(), want)
    model.aux_loss_mask_from = "attention_mask"
    model(ids, mask)
    assert torch.equal(model.aux_loss(), want)
    model(ids)  # not given: every token counts
    assert all(m.aux_loss_mask is None for m in model.modules() if isinstance(m, moelora.MoELoRALinear))


def test_mask_named_by_an_argument_the_forward_does_not_take_raises():
    """aux_loss_mask / aux_loss_mask_from naming no parameter of the wrapped forward (a typo such as
    "attention_masks") raises, naming it: it used to count every token, padding included, silently."""
    model = moelora.get_moelora_model(tiny_llama(2), moelora.MoELoRAConfig(
        r=4, num_experts=4, top_k=2, target_modules=["q_proj"], router_aux_loss_coef=LB))
    ids = token_batch()
    with pytest.raises(ValueError, match="'attention_masks', which is not a parameter"):
        model(ids, attention_mask=torch.ones_like(ids), aux_loss_mask="attention_masks")
    model.aux_loss_mask_from = "attention_masks"
    with pytest.raises(ValueError, match="'attention_masks', which is not a parameter"):
        model(ids)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_mask_set_in_inference_mode_serves_training_after_it(backend):
    """A mask set inside torch.inference_mode() (an evaluation loop) and still held when training
    resumes: the training step's backward saves it, so it is held as a normal tensor (an inference
    tensor raised "Inference tensors cannot be saved for backward"); the gradients are those of a
    mask set outside."""
    layer = _layer("softmax_topk")
    x = torch.randn(2, 5, 16)
    grads = []
    for inference in (False, True):
        with torch.inference_mode(inference):
            moelora.set_aux_loss_mask(layer, MASK)
        with moelora.use_backend(backend):
            layer(x)
        grads.append(torch.autograd.grad(layer.last_aux_loss, layer.router.weight)[0])
    assert torch.equal(grads[1], grads[0])


def test_wrapper_refuses_a_mask_for_an_encoder_decoder_model():
    """An encoder-decoder's layers route source tokens (encoder, cross-attention keys / values) or
    target tokens (decoder): the source attention_mask on every layer would mask the decoder's with
    it, silently where both have one length. The wrapper refuses; the encoder takes it by hand."""
    from helpers import tiny_t5

    model = moelora.get_moelora_model(tiny_t5(), moelora.MoELoRAConfig(
        r=4, num_experts=4, top_k=2, target_modules=["q", "v"]))
    ids = token_batch()
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    with pytest.raises(ValueError, match="encoder-decoder"):
        model(input_ids=ids, attention_mask=mask, labels=ids, aux_loss_mask="attention_mask")
    with moelora.use_aux_loss_mask(model.model.get_encoder(), mask):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    encoder = [m for n, m in model.named_modules() if isinstance(m, moelora.MoELoRALinear) and ".encoder." in n]
    assert encoder and all(m.last_router_stats is not None for m in encoder)


def test_masked_statistics_read_the_real_token_count_on_the_host_once():
    """Reading every statistic of a masked forward reads the mask's token count on the host once
    (a device sync on a GPU), not once per key; the values are those of the real tokens."""
    layer = _layer("softmax_topk")
    with moelora.use_aux_loss_mask(layer, MASK):
        layer(torch.randn(2, 5, 16))
    stats = layer.last_router_stats
    reads = []

    class HostReadCounting(torch.Tensor):  # results of torch ops on it are of this class too
        def __int__(self):
            reads.append("int")
            return super().__int__()

        def item(self):
            reads.append("item")
            return super().item()

    stats._mask = stats._mask.as_subclass(HostReadCounting)
    values = {key: stats[key] for key in stats}
    assert reads == ["int"], f"{len(reads)} host reads for {len(values)} statistics"
    torch.testing.assert_close(values["load"].sum().as_subclass(torch.Tensor), torch.tensor(2.0))  # top_k per token


def test_router_stats_are_detached_and_know_only_their_keys():
    """RouterStats' values are detached whatever it is given (aux statistics carrying a graph too), and a key
    that is not a statistic raises KeyError (so ``in`` and ``get`` answer as for a dict)."""
    logits = torch.randn(4, 3, requires_grad=True)
    aux_stats = torch.stack([logits.sum(), logits.square().sum()])
    stats = RouterStats(torch.tensor([2.0, 3.0, 3.0], requires_grad=True), logits, aux_stats, 4)
    assert all(not stats[key].requires_grad for key in stats)
    assert "loss" not in stats and stats.get("loss") is None
    with pytest.raises(KeyError):
        stats["loss"]


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
@pytest.mark.parametrize("given", ["aux_loss_mask_from", "per_call"])
def test_a_mask_named_by_argument_fits_a_cached_decoding_step(given, cache_name):
    """aux_loss_mask_from="attention_mask" (or aux_loss_mask="attention_mask") in a decoding step with a KV cache:
    transformers' attention mask covers the cached tokens too, so the layers take its last columns, those of the
    step's tokens (it raised: the mask has 7 tokens, the layer routed 2); the step's logits are the full forward's.
    The cache by either keyword: ``cache`` (transformers 5's name; a step given it raised so) or ``past_key_values``
    (older releases', deprecated in 5)."""
    from transformers import LlamaForCausalLM

    if cache_name == "cache" and "cache" not in inspect.signature(LlamaForCausalLM.forward).parameters:
        pytest.skip("this transformers release's forward takes the cache as past_key_values only")
    torch.manual_seed(0)
    model = moelora.get_moelora_model(tiny_llama(num_layers=2), moelora.MoELoRAConfig(
        target_modules=["q_proj"], num_experts=2, top_k=1)).eval()
    kwargs = {}
    if given == "aux_loss_mask_from":
        model.aux_loss_mask_from = "attention_mask"
    else:
        kwargs["aux_loss_mask"] = "attention_mask"
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    prefill = model(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
    step_ids = prefill.logits[:, -1].argmax(-1, keepdim=True)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    cache = prefill.get("cache", prefill.get("past_key_values"))  # the output's name for it: transformers 5's, older
    step = model(input_ids=step_ids, attention_mask=step_mask, use_cache=True, **{cache_name: cache}, **kwargs)
    layer = model.model.model.layers[0].self_attn.q_proj
    assert layer.last_router_stats.num_routed == 2  # the step's tokens, both real
    full = model(input_ids=torch.cat([ids, step_ids], dim=1), attention_mask=step_mask, **kwargs)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="aux-loss mask"):  # a mask tensor given as such is taken as it is
        model(input_ids=step_ids, aux_loss_mask=step_mask, **{cache_name: cache})


def _four_d(mask: torch.Tensor, kind: str) -> torch.Tensor:
    """The 4-D attention mask ([batch, 1, query, key]: causal, padding keys attended by no query) of a 2-D ``mask``,
    as transformers' attention takes it: bool (True attends) or float (additive: 0 attends)."""
    seq = mask.shape[-1]
    attends = torch.tril(torch.ones(seq, seq, dtype=torch.bool))[None, None] & mask[:, None, None, :].bool()
    if kind == "float":
        return torch.where(attends, 0.0, torch.finfo(torch.float32).min)
    return attends


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("left", [False, True], ids=["right_padding", "left_padding"])
def test_a_four_d_attention_mask_named_as_the_aux_loss_mask_leaves_out_the_keys_no_query_attends(kind, left):
    """aux_loss_mask="attention_mask" (or aux_loss_mask_from) where the model is given a 4-D attention mask
    ([batch, 1, query, key], as packing with 4-D masks and some collators pass): it raised that the mask had 50
    tokens for 10 routed (bool) or that it must not be float (an additive mask); the real tokens are now the
    keys some query attends, and the aux loss and statistics are those of the 2-D mask."""
    torch.manual_seed(0)
    model = moelora.get_moelora_model(tiny_llama(num_layers=2), moelora.MoELoRAConfig(
        target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, r=4, init_lora_weights=False)).train()
    ids = torch.randint(1, 64, (2, 5))
    mask = MASK.flip(-1) if left else MASK
    model(input_ids=ids, attention_mask=mask, aux_loss_mask="attention_mask")
    expected = model.aux_loss().detach()
    layer = model.model.model.layers[0].self_attn.q_proj
    expected_load = layer.last_router_stats["load"]
    model(input_ids=ids, attention_mask=_four_d(mask, kind), aux_loss_mask="attention_mask")
    torch.testing.assert_close(model.aux_loss().detach(), expected)
    torch.testing.assert_close(layer.last_router_stats["load"], expected_load)
    assert layer.last_router_stats.num_routed == int(mask.sum())
    model.aux_loss_mask_from = "attention_mask"
    model(input_ids=ids, attention_mask=_four_d(mask, kind))
    torch.testing.assert_close(model.aux_loss().detach(), expected)
    if kind == "float":  # given as the mask itself (not by name): refused, naming the 2-D mask and the name to give
        with pytest.raises(TypeError, match=r"4-D attention mask .*aux_loss_mask=\"attention_mask\""):
            model(input_ids=ids, aux_loss_mask=_four_d(mask, kind))


class _MaskedConv(nn.Module):
    """A convolution whose forward takes a per-position mask ([N, 1, H, W]) beside its input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, mask=None):
        return self.conv(x)


def test_a_four_d_per_position_mask_named_as_the_aux_loss_mask_stays_per_position():
    """A 4-D mask argument of a model that routes no token sequence (a convolution's [N, 1, H, W], one value per
    routed position), named as the aux-loss mask: it was taken as it is, as when given as the tensor itself; reading
    every named 4-D mask as an attention mask (the keys some query attends, [N, W]) made the wrapper raise that the
    mask has N * W tokens for N * H * W routed. An attention mask is read so where the forward routes a sequence
    (input_ids or inputs_embeds given); this mask gives what the tensor itself gives."""
    torch.manual_seed(0)
    model = moelora.get_moelora_model(_MaskedConv(), moelora.MoELoRAConfig(
        r=2, num_experts=4, top_k=2, target_modules=["conv"], init_lora_weights=False)).train()
    x, mask = torch.randn(2, 3, 5, 6), torch.rand(2, 1, 5, 6) > 0.3
    model(x, aux_loss_mask=mask)
    expected = model.aux_loss().detach()
    assert model.model.conv.last_router_stats.num_routed == int(mask.sum())
    model(x, mask=mask, aux_loss_mask="mask")
    torch.testing.assert_close(model.aux_loss().detach(), expected)
    model.aux_loss_mask_from = "mask"
    model(x, mask)
    torch.testing.assert_close(model.aux_loss().detach(), expected)


def _float64_aux_loss(model, inputs, real):
    """The model's aux loss recomputed in float64 from each MoE-LoRA layer's input over the tokens ``real`` marks
    (per layer lb_coef * lb + z_coef * z, lb = E sum_e f_e P_e of the top-k slots and softmax probabilities, z the
    mean of lse^2), after a forward on ``inputs``."""
    layers = [m for m in model.modules() if isinstance(m, MoELoRALinear)]
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.__setitem__(m, args[0].detach())) for layer in layers]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    total = torch.zeros((), dtype=torch.float64)
    for layer in layers:
        x = seen[layer].double().reshape(-1, seen[layer].shape[-1])[real.reshape(-1)]
        logits = x @ layer.router.weight.double().t()
        num_experts = logits.shape[-1]
        slots = F.one_hot(logits.topk(layer.router.top_k, -1).indices, num_experts).sum(1).double()
        lb = num_experts * (slots.mean(0) * torch.softmax(logits, -1).mean(0)).sum()
        total += layer.aux_loss_coef * lb + layer.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    return total


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_a_padding_free_packed_row_gives_the_padded_batchs_aux_loss_gradients_and_statistics(backend, flash_kwargs):
    """transformers' DataCollatorWithFlattening packs a batch into one row without padding (position_ids restarting
    per sequence, no attention_mask; with return_flash_attn_kwargs also cu_seq_lens_q / max_length_q): through the
    wrapper with aux_loss_mask_from="attention_mask" every token counts, and the aux loss (a float64 reference over
    the real tokens), the routers' gradients and the statistics are those of the same sequences right- or
    left-padded with the padding masked."""
    from transformers import DataCollatorWithFlattening

    torch.manual_seed(0)
    model = moelora.get_moelora_model(tiny_llama(num_layers=2), moelora.MoELoRAConfig(
        target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, r=4, init_lora_weights=False)).train()
    model.aux_loss_mask_from = "attention_mask"
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 64, (n,), generator=g) for n in (5, 3, 4)]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": s.tolist()}
                                                                                for s in seqs])
    assert "attention_mask" not in packed
    batches = {"packed": (dict(packed), torch.ones_like(packed["input_ids"], dtype=torch.bool))}
    for side in ("right", "left"):
        ids, mask = torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long)
        for b, s in enumerate(seqs):
            cols = slice(5 - len(s), 5) if side == "left" else slice(0, len(s))
            ids[b, cols], mask[b, cols] = s, 1
        batches[side] = (dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                              labels=ids.masked_fill(mask == 0, -100)), mask.bool())
    routers = [m.router.weight for m in model.modules() if isinstance(m, MoELoRALinear)]
    layer = model.model.model.layers[1].self_attn.v_proj
    results = {}
    with moelora.use_backend(backend):
        for name, (inputs, real) in batches.items():
            inputs = dict(inputs, use_cache=False)  # transformers finds the packed sequences only without a cache
            out = model(**inputs)
            aux = model.aux_loss()
            results[name] = (aux.detach(), torch.autograd.grad(aux, routers), dict(layer.last_router_stats),
                             out.logits[real].detach())
            assert layer.last_router_stats.num_routed == 12
            torch.testing.assert_close(aux.detach().double(), _float64_aux_loss(model, inputs, real),
                                       rtol=1e-5, atol=1e-7)
    for name in ("right", "left"):
        torch.testing.assert_close(results["packed"][0], results[name][0], rtol=1e-5, atol=1e-7)
        for got, want in zip(results["packed"][1], results[name][1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        for key in results[name][2]:
            torch.testing.assert_close(results["packed"][2][key], results[name][2][key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results["packed"][3], results[name][3], rtol=1e-5, atol=1e-5)
