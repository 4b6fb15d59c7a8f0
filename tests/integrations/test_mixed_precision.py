"""Mixed-precision training end to end, as users run it: fp32 master weights and adapters,
``torch.autocast`` to float16 and ``torch.amp.GradScaler``. A loss scale that overflows makes
every path's gradients non-finite, so the scaler skips the step and lowers its scale exactly as
for PEFT's LoRA (nothing in the kernels turns the overflow into finite gradients, also where
it reaches one token only); with a finite scale the unscaled gradients are float64's within the
half-precision tolerance, in every router mode, for the fused layer (both backends), MoEFFN and
MoLEx."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora
from conftest import DEVICE
from helpers import rel_err, tiny_llama, token_batch
from moelora.modules.ffn import MoEFFN
from moelora.ops.moe_lora_linear import RouterSpec, moe_lora_linear

pytestmark = pytest.mark.usefixtures("single_torch_thread")
AMP = torch.float16
TOL = 1e-2  # float16 (as tests/ops/test_autocast.py's gradients: 2 x 5e-3)
MODES = ["softmax_topk", "topk_softmax", "threshold"]


def _linear(mode):
    torch.manual_seed(0)
    extra = dict(threshold_eps=0.2) if mode == "threshold" else {}
    model = nn.Sequential(*(moelora.MoELoRALinear(nn.Linear(16, 16), num_experts=4, top_k=2, r=4, router=mode,
                                                  init_lora_weights=False, **extra) for _ in range(2)))
    for layer in model:
        layer.base_layer.requires_grad_(False)
    return model, torch.randn(12, 16)


def _ffn(mode):
    torch.manual_seed(0)
    extra = dict(threshold_eps=0.2) if mode == "threshold" else {}
    return MoEFFN(nn.Linear(16, 24), nn.Linear(24, 16), F.silu, num_experts=4, top_k=2, gate_proj=nn.Linear(16, 24),
                  router=mode, **extra), torch.randn(12, 16)


def _molex(mode):
    torch.manual_seed(0)
    model = tiny_llama(3)
    model.requires_grad_(False)
    moelora.apply_molex(model, gate="linear", shared_gate=False, learn_alpha=True, aux_loss_coef=0.01)
    return model, token_batch()


def _peft(mode):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)),
                           LoraConfig(target_modules=["0", "1"], r=4, init_lora_weights=False))
    return model, torch.randn(12, 16)


KINDS = {"linear-torch": (_linear, "torch"), "linear-triton": (_linear, "triton"), "ffn-torch": (_ffn, "torch"),
         "ffn-triton": (_ffn, "triton"), "molex": (_molex, "torch"), "peft": (_peft, "torch")}


def _loss(model, x, backend, amp):
    """A training forward (the same threshold draws for the same seed) under autocast to ``amp``
    (None: without): sum(out * g) / numel + the aux losses, in float64."""
    torch.manual_seed(1)
    with moelora.use_backend(backend), torch.autocast(DEVICE.type, dtype=amp or AMP, enabled=amp is not None):
        out = model(x)
        out = out.logits if hasattr(out, "logits") else out
        aux = moelora.aux_loss(model)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64, device=DEVICE)
    return (out.double() * g).sum() / out.numel() + aux.double()


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _scaler_step(model, x, backend, init_scale):
    """One GradScaler step (SGD, lr 1) under float16 autocast: (the scale after it, the unscaled
    gradients, the parameters' change)."""
    params = _trainable(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=1.0)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=init_scale)
    scaler.scale(_loss(model, x, backend, AMP)).backward()
    scaler.unscale_(optimizer)
    grads = {n: p.grad.clone() for n, p in params.items()}
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale(), grads, {n: p.detach() - before[n] for n, p in params.items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_overflowing_loss_scale_skips_the_step_as_for_peft(kind):
    """A scale whose scaled gradient is beyond float16's range: the step is skipped (no parameter
    changes) and the scale halves, for moelora's layers as for PEFT's LoRA and an nn.Linear, every
    trainable parameter's gradient non-finite (none turned finite, i.e. to 0 or garbage)."""
    make, backend = KINDS[kind]
    model, x = make("softmax_topk")
    model.train()
    init_scale = 2.0 ** 40
    scale, grads, change = _scaler_step(model, x, backend, init_scale)
    assert scale == init_scale / 2
    assert all(torch.equal(d, torch.zeros_like(d)) for d in change.values())
    finite = [n for n, g in grads.items() if bool(torch.isfinite(g).all())]
    assert not finite, f"finite gradients despite the overflow: {finite}"


@pytest.mark.parametrize("kind, mode", [(kind, mode) for kind in ["linear-torch", "linear-triton", "ffn-torch",
                                                                  "ffn-triton"] for mode in MODES]
                         + [("molex", None)])  # MoLEx's gate has no router mode
def test_unscaled_gradients_of_a_finite_scale_match_float64(kind, mode):
    """GradScaler's default scale (2^16): the step is taken and the unscaled gradients (the step
    itself, SGD with lr 1) are float64's (no autocast, no scale) within float16's tolerance."""
    make, backend = KINDS[kind]
    model, x = make(mode)
    model.train()
    reference = copy.deepcopy(model).double()
    scale, grads, change = _scaler_step(model, x, backend, 2.0 ** 16)
    assert scale == 2.0 ** 16
    _loss(reference, x if not x.is_floating_point() else x.double(), "torch", None).backward()
    for name, p in _trainable(reference).items():
        assert grads[name].dtype == torch.float32, name
        assert rel_err(grads[name], p.grad) < TOL, f"{name}: rel err {rel_err(grads[name], p.grad)}"
        torch.testing.assert_close(change[name], -grads[name])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_nan_input_token_of_moe_ffn_gives_a_non_finite_training_gradient(backend):
    """A token of MoEFFN's input holding a NaN (an fp16 overflow upstream) has NaN logits, read as
    -inf: every slot is dropped and its output is 0 (docs/layers.md, section 5). A training step
    does not take that silently: the router weight's gradient and the aux loss are non-finite,
    so a GradScaler skips the step."""
    model, x = _ffn("softmax_topk")
    model.train()
    x[3, 5] = float("nan")
    with moelora.use_backend(backend):
        y = model(x)
    assert torch.equal(y[3], torch.zeros_like(y[3])) and bool(torch.isfinite(y[torch.arange(12) != 3]).all())
    init_scale = 2.0 ** 16
    scale, grads, change = _scaler_step(model, x, backend, init_scale)
    assert scale == init_scale / 2 and not bool(torch.isfinite(grads["router.weight"]).all())
    assert all(torch.equal(d, torch.zeros_like(d)) for d in change.values())


def _nonfinite_rows(t):
    return set((~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten().tolist())


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("path", ["torch", "triton-dense", "triton-grouped", "linear-torch", "linear-triton",
                                  "ffn-torch", "ffn-triton"])
def test_an_upstream_gradient_overflowing_at_one_token_reaches_the_gradients(path, bad):
    """A scaled gradient that overflows float16 at one token only (dy[3] holds an Inf or NaN): the
    gradients that token reaches are non-finite, for the GradScaler to see, on every backend and
    regime (what keeps an unchosen expert's NaN/Inf away from a token must not also turn a chosen
    expert's into finite numbers): dx and the gate weights' gradient at that token and no other (the
    fused layer: its router weight's), the per-expert weights' gradients of the experts it chose (the
    others' may be NaN too: 0 * Inf)."""
    kind, _, backend = path.rpartition("-") if path.startswith(("ffn", "linear")) else ("lora", "", path)
    backend, _, regime = backend.partition("-")
    gen = torch.Generator().manual_seed(0)
    T, d, d_out, r, E, k = 10, 16, 12, 4, 5, 2
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k].to(DEVICE)
    x = torch.randn(T, d, generator=gen).to(DEVICE, AMP)
    weights = torch.rand(T, k, generator=gen).to(DEVICE)
    if kind == "ffn":
        w_in, w_out = torch.randn(E, 24, d, generator=gen) / 4, torch.randn(E, d_out, 24, generator=gen) / 5
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t, dtype in ((x, AMP), (weights, torch.float32),
                                                                        (w_in, AMP), (w_out, AMP))]
        y = moelora.moe_ffn(leaves[0], ids, leaves[1], leaves[2], None, leaves[3], None, F.silu, backend=backend)
    elif kind == "linear":  # fp32 adapters and router over an fp16 base, a learned router
        weight, router_weight = torch.randn(d_out, d, generator=gen) / 4, torch.randn(E, d, generator=gen)
        lora_a, lora_b = torch.randn(r, d, generator=gen) / 4, torch.randn(E, d_out, r, generator=gen)
        leaves = [t.to(DEVICE).requires_grad_() for t in (x, router_weight, lora_a, lora_b)]
        y, out = moe_lora_linear(leaves[0], weight.to(DEVICE, AMP), None, *leaves[2:], scaling=0.5,
                                 router=RouterSpec(leaves[1], None, "softmax_topk", k), backend=backend)
        ids = out.routing.ids
    else:
        lora_a, lora_b = torch.randn(E, r, d, generator=gen) / 4, torch.randn(E, d_out, r, generator=gen)
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t, dtype in ((x, AMP), (weights, torch.float32),
                                                                        (lora_a, AMP), (lora_b, AMP))]
        y = moelora.moe_lora(leaves[0], leaves[2], leaves[3], ids, leaves[1], scaling=0.5, backend=backend,
                             **({"regime": regime} if regime else {}))
    dy = torch.randn(y.shape, generator=gen).to(DEVICE, y.dtype)
    dy[3, 2] = bad
    y.backward(dy)
    dx, dw, *per_expert = (t.grad for t in leaves)
    assert _nonfinite_rows(dx) == {3}
    if kind == "linear":  # every logit of token 3 gets a non-finite gradient (softmax), so every row of dW_router
        assert not bool(torch.isfinite(dw).any()) and not bool(torch.isfinite(per_expert.pop(0)).all())  # shared A
    else:
        assert _nonfinite_rows(dw) == {3}
    for grad in per_expert:
        assert set(ids[3].tolist()) <= _nonfinite_rows(grad)
