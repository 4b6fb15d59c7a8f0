"""MoELoRAEmbedding and MoELoRAConv: identity at init, every router mode against a float64
loop (outputs and gradients), PEFT's LoRA Embedding / Conv layers for one expert, the
1 x 1 convolution as the linear case, merging, errors."""

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora
from moelora import MoELoRAConv, MoELoRAEmbedding, MoELoRALinear
from conftest import DEVICE
from helpers import randomize_adapters

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MODES = {
    "softmax_topk": dict(num_experts=4, top_k=2),
    "topk_softmax": dict(num_experts=4, top_k=2, router="topk_softmax", router_renormalize=False),
    "threshold": dict(num_experts=4, top_k=3, router="threshold", threshold_eps=0.3),
    "shared_a": dict(num_experts=3, top_k=2, share_lora_a=True),
    "task": dict(num_experts=3, router="task"),
    "task_shared": dict(num_experts=3, router="task", task_shared_lora=True),
    "task_shared_a": dict(num_experts=3, router="task", task_shared_lora=True, share_lora_a=True),
    "single": dict(num_experts=1),
}
CONVS = {
    "conv2d_3x3_s2": lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1),
    "conv2d_dilated_reflect": lambda: nn.Conv2d(3, 6, (3, 2), padding=2, dilation=2, padding_mode="reflect"),
    "conv2d_grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "conv2d_1x1": lambda: nn.Conv2d(3, 6, 1),
    "conv2d_1x1_s2": lambda: nn.Conv2d(3, 6, 1, stride=2),  # 1 x 1, strided or padded: not the linear case
    "conv2d_1x1_padded": lambda: nn.Conv2d(3, 6, 1, padding=1),
    "conv1d": lambda: nn.Conv1d(3, 6, 3, padding=1),
    "conv1d_grouped_strided": lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
    "conv2d_same_circular": lambda: nn.Conv2d(3, 6, (2, 3), padding="same", padding_mode="circular"),
    "conv2d_same_dilated": lambda: nn.Conv2d(3, 6, (4, 3), padding="same", dilation=(1, 2), bias=False),
    "conv2d_valid_depthwise": lambda: nn.Conv2d(4, 4, 2, padding="valid", groups=4),
    "conv3d_grouped": lambda: nn.Conv3d(4, 6, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 0), groups=2),
}


def _fill(layer, seed=3):
    """Random non-zero A, B, gamma and router weights (float64 layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return layer


EMBEDDINGS = {
    "padding_idx": lambda: nn.Embedding(11, 8, padding_idx=0),
    "scale_grad_by_freq": lambda: nn.Embedding(11, 8, padding_idx=0, scale_grad_by_freq=True),
    "gemma_embed_scale": lambda: _gemma_embedding(11, 8, padding_idx=0),
}


def _gemma_embedding(num_embeddings=12, embedding_dim=6, padding_idx=1):
    """Gemma 3's scaled embedding (its forward multiplies by ``embed_scale``; PEFT scales the LoRA delta too)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding
    return Gemma3TextScaledWordEmbedding(num_embeddings, embedding_dim, padding_idx=padding_idx, embed_scale=2.5)


def _embedding(mode, dtype=torch.float64, base="padding_idx", **extra):
    torch.manual_seed(0)
    layer = MoELoRAEmbedding(EMBEDDINGS[base]().to(dtype), r=4, lora_alpha=8, **{**MODES[mode], **extra})
    layer.task_ids = torch.tensor([2, 0]) if mode.startswith("task") else None
    return layer


def _conv(kind, mode, dtype=torch.float64, **extra):
    torch.manual_seed(0)
    layer = MoELoRAConv(CONVS[kind]().to(dtype), r=4, lora_alpha=8, **{**MODES[mode], **extra})
    layer.task_ids = torch.tensor([2, 0]) if mode.startswith("task") else None
    return layer


def _conv_input(kind, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    channels = 4 if "grouped" in kind or "depthwise" in kind else 3
    spatial = {"conv1d": (7,), "conv3d": (3, 5, 2)}.get(kind[:6], (6, 5))
    return torch.randn((2, channels, *spatial), generator=g, dtype=dtype)


def _full_b_loop(layer, e):
    """B[e] as a dense [C_out, r] matrix, built entry by entry (block-diagonal for groups)."""
    b = layer.lora_B[e]
    if not isinstance(layer, MoELoRAConv) or layer.groups == 1:
        return b
    out, rg = b.shape
    full = b.new_zeros(out, layer.r)
    for o in range(out):
        g = o // (out // layer.groups)
        full[o, g * rg:(g + 1) * rg] = b[o]
    return full


def _mix(layer, h_of, base, routing):
    """base[t] + s * sum_j w[t,j] * B[e] @ h_of(e, t), one token and slot at a time."""
    out = base.clone()
    for t in range(base.shape[0]):
        for j in range(routing.ids.shape[1]):
            e = int(routing.ids[t, j])
            gate = layer.scaling * routing.weights[t, j].to(out.dtype)
            out[t] = out[t] + gate * (_full_b_loop(layer, e) @ h_of(e, t))
    return out


def embedding_loop(layer, ids):
    """The float64 reference of MoELoRAEmbedding (the delta times the base's embed_scale, where it has one)."""
    base = layer.base_layer(ids)
    routing = layer.compute_routing(base, tuple(ids.shape))
    flat = ids.reshape(-1)
    pad = layer.base_layer.padding_idx
    counts = torch.bincount(flat, minlength=layer.num_embeddings)

    def column(e, t):  # no gradient flows into the padding_idx column (F.embedding's rule)
        a = layer.expert_A(e)[:, flat[t]]
        if layer.base_layer.scale_grad_by_freq:  # the gradient divided by the id's count in the batch
            a = a.detach() + (a - a.detach()) / counts[flat[t]]
        return a.detach() if flat[t] == pad else a

    delta = _mix(layer, column, torch.zeros_like(base.reshape(-1, base.shape[-1])), routing)
    return base + getattr(layer.base_layer, "embed_scale", 1.0) * delta.reshape(base.shape)


def _patches(layer, x):
    """[N*L, C_in*k] input patches of the output positions (L in order, C_in*k as the kernel's flattened
    [C_in, *kernel]), cut out of the padded input with Tensor.unfold along each spatial dim (independent of conv)."""
    base = layer.base_layer
    mode = "constant" if base.padding_mode == "zeros" else base.padding_mode
    x = F.pad(x, base._reversed_padding_repeated_twice, mode=mode)  # "same" too (asymmetric for even kernels)
    nd = len(base.kernel_size)
    for d, (k, s, dil) in enumerate(zip(base.kernel_size, base.stride, base.dilation)):
        x = x.unfold(2 + d, dil * (k - 1) + 1, s)  # [N, C, o_1.., span_1..]
    x = x[(...,) + tuple(slice(None, None, dil) for dil in base.dilation)]  # the kernel's taps in each span
    order = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]  # [N, o_1.., C, k_1..]
    return x.permute(order).reshape(-1, x.shape[1] * math.prod(base.kernel_size))


def conv_loop(layer, x):
    """The float64 reference of MoELoRAConv (router logits from the patches too)."""
    base = layer.base_layer(x)
    tokens = base.movedim(1, -1).reshape(-1, base.shape[1])
    lead = (base.shape[0],) + tuple(base.shape[2:])
    patches = _patches(layer, x)
    if layer.router is not None:
        logits = patches @ layer.router.weight.double().t()  # fp64 for fp64 x, as Router's
        torch.testing.assert_close(layer.router.logits(x), logits, rtol=1e-12, atol=1e-12)
    routing = layer.compute_routing(x, lead)
    out = _mix(layer, lambda e, t: layer.expert_A(e) @ patches[t], tokens, routing)
    return out.reshape(*lead, -1).movedim(-1, 1)


def _check_against_loop(layer, run, reference, inputs):
    layer.eval()  # threshold routing samples in training; eval is deterministic and differentiable
    weights = torch.randn_like(run(layer, inputs))
    out = run(layer, inputs)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    expected = reference(layer, inputs)
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert {"lora_B"} <= {n.replace("lora_embedding_", "lora_") for n in grads}
    for name, p in layer.named_parameters():
        if p.grad is not None:
            assert name in grads, name
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-10, msg=name)
    if layer.router is not None:
        assert grads["router.weight"].abs().sum() > 0


@pytest.mark.parametrize("base", list(EMBEDDINGS))
@pytest.mark.parametrize("mode", list(MODES))
def test_embedding_matches_float64_loop(mode, base):
    layer = _fill(_embedding(mode, base=base))
    ids = torch.tensor([[1, 5, 0, 10, 5], [3, 3, 7, 2, 5]])
    _check_against_loop(layer, lambda m, i: m(i), embedding_loop, ids)
    assert torch.all(layer.lora_A.grad[..., 0] == 0)  # padding_idx, as PEFT


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", list(MODES))
def test_embedding_takes_int32_ids_of_any_shape_and_no_ids(mode, backend):
    """As nn.Embedding: int32 ids give the int64 ids' output, ids of shape [S] (an int task id) and [B, S, K]
    the rows of the [B, S] output, 0 tokens an empty output with zero gradients."""
    layer = _fill(_embedding(mode, torch.float32)).to(DEVICE).eval()
    ids = torch.tensor([[1, 5, 0, 10, 5], [3, 3, 7, 2, 9]], device=DEVICE)
    task = mode.startswith("task")
    with moelora.use_backend(backend):
        expected = layer(ids)
        torch.testing.assert_close(layer(ids.int()), expected, rtol=0, atol=0)
        torch.testing.assert_close(layer(ids.reshape(2, -1, 1)), expected.reshape(2, -1, 1, 8), rtol=1e-6, atol=1e-6)
        layer.task_ids = 2 if task else None
        torch.testing.assert_close(layer(ids[0]), expected[0], rtol=1e-6, atol=1e-6)
        layer.task_ids = torch.tensor([2, 0], device=DEVICE) if task else None
        empty = layer(ids[:, :0])
    assert empty.shape == (2, 0, 8)
    empty.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())


@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("mode", list(MODES))
def test_conv_matches_float64_loop(kind, mode):
    layer = _fill(_conv(kind, mode))
    _check_against_loop(layer, lambda m, x: m(x), conv_loop, _conv_input(kind))


@pytest.mark.parametrize("make", [lambda m: _embedding(m, torch.float32),
                                  lambda m: _conv("conv2d_3x3_s2", m, torch.float32)], ids=["embedding", "conv"])
@pytest.mark.parametrize("mode", list(MODES))
def test_fresh_layer_returns_base_output_exactly(make, mode):
    layer = make(mode).train()
    x = torch.tensor([[1, 4, 0], [2, 2, 9]]) if isinstance(layer, MoELoRAEmbedding) else _conv_input("c", torch.float32)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kind", list(CONVS) + ["conv3d"])
@pytest.mark.parametrize("mode", ["softmax_topk", "shared_a", "task_shared", "single"])
def test_conv_takes_unbatched_input_as_a_batch_of_one(kind, mode):
    """[C_in, *spatial] (which nn.Conv1d/2d/3d accept) gives the output of the batch of one."""
    make = CONVS.get(kind, lambda: nn.Conv3d(3, 6, 2, padding=1))
    layer = _fill(MoELoRAConv(make().double(), r=4, lora_alpha=8, **MODES[mode])).eval()
    layer.task_ids = 1 if mode.startswith("task") else None
    x = _conv_input(kind)[0] if kind in CONVS else torch.randn(3, 4, 5, 3, dtype=torch.float64)
    out = layer(x)
    assert out.shape == layer.base_layer(x).shape
    torch.testing.assert_close(out, layer(x.unsqueeze(0)).squeeze(0), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, layer.base_layer(x))


@pytest.mark.parametrize("kind", ["conv2d_3x3_s2", "conv2d_dilated_reflect", "conv1d_grouped_strided"])
def test_conv_router_jitters_the_input_of_every_patch_in_training(kind):
    """router_jitter_noise: in training the router's logits are those of x times the jitter factors (drawn as
    Router.jitter_factors draws them) convolved in the base's geometry; in eval the plain patches' logits."""
    layer = _fill(_conv(kind, "softmax_topk", router_jitter_noise=0.3))
    router, x = layer.router, _conv_input(kind)
    plain = _patches(layer, x) @ router.weight.double().t()
    torch.testing.assert_close(router.eval().logits(x), plain, rtol=1e-12, atol=1e-12)
    router.train()
    torch.manual_seed(4)
    got = router.logits(x)
    torch.manual_seed(4)
    factors = torch.empty(x.shape, dtype=torch.float32).uniform_(0.7, 1.3).double()
    torch.testing.assert_close(got, _patches(layer, x * factors) @ router.weight.double().t(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, plain)


def test_conv_router_logits_are_fp32_under_autocast():
    """Under torch.autocast (a bf16 training loop) the router's convolution is not autocast's: fp32 logits, the
    ones computed without autocast (F.conv2d is on autocast's lower-precision list)."""
    layer = _fill(_conv("conv2d_3x3_s2", "softmax_topk", torch.float32)).eval()
    x = _conv_input("conv2d_3x3_s2", torch.float32)
    expected = layer.router.logits(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer.router.logits(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", ["softmax_topk", "shared_a"])
@pytest.mark.parametrize("kind", ["conv2d_3x3_s2", "conv2d_grouped", "embedding"])
def test_parameters_cast_without_their_buffers_compute_what_the_cast_layer_does(kind, mode, dtype):
    """FSDP2's MixedPrecisionPolicy(param_dtype=...) casts a layer's parameters and not its buffers: a float32
    layer whose parameters are cast to ``dtype`` computes, and differentiates, what the layer cast with .to(dtype)
    does. The constant buffers (the projection selector, a grouped conv's mask of B) stayed float32: a TypeError
    ("lora_a must have the dtype of x") in every layer that projects before routing."""
    layer = _embedding(mode, torch.float32) if kind == "embedding" else _conv(kind, mode, torch.float32)
    _fill(layer)
    whole = copy.deepcopy(layer).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.data = p.data.to(dtype)
    assert {b.dtype for b in layer.buffers() if b.is_floating_point()} == {torch.float32}
    x = torch.randint(0, 11, (2, 5)) if kind == "embedding" else _conv_input(kind, dtype)
    outputs = []
    for model in (layer, whole):
        y = model(x)
        y.pow(2).sum().backward()
        outputs.append([y] + [p.grad for p in model.parameters() if p.requires_grad])
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_conv_router_logits_of_a_bfloat16_layer_are_fp32():
    """A layer cast to bfloat16 (base, adapters and router): the router reads its bf16 input in fp32, as
    Router's, and gives the fp32 logits of the input's patches and its weight, not bf16-rounded ones."""
    layer = _fill(_conv("conv2d_3x3_s2", "softmax_topk", torch.float32)).eval().to(torch.bfloat16)
    x = _conv_input("conv2d_3x3_s2", torch.bfloat16)
    got = layer.router.logits(x)
    assert got.dtype == torch.float32
    expected = _patches(layer, x.float()) @ layer.router.weight.float().t()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pointwise_conv_is_the_linear_case_and_calls_the_operator(monkeypatch):
    conv = _fill(_conv("conv2d_1x1", "softmax_topk", torch.float32))
    linear = MoELoRALinear(nn.Linear(3, 6), num_experts=4, top_k=2, r=4, lora_alpha=8)
    with torch.no_grad():
        linear.base_layer.weight.copy_(conv.base_layer.weight.reshape(6, 3))
        linear.base_layer.bias.copy_(conv.base_layer.bias)
        for name in ("lora_A", "lora_B", "router.weight"):
            linear.get_parameter(name).copy_(conv.get_parameter(name))
    calls = []
    real = moelora.modules.adapter_base.routed_moe_lora
    monkeypatch.setattr(moelora.modules.adapter_base, "routed_moe_lora",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x = torch.randn(2, 3, 4, 5)
    out = conv(x)
    assert calls == [torch.Size([2, 4, 5, 3])]  # the input channels of every position, no projection
    torch.testing.assert_close(out, linear(x.movedim(1, -1)).movedim(-1, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32])
def test_triton_backend_runs_both_layers(dtype):
    """The Triton kernels (the interpreter on CPU) give the torch backend's result; on a GPU
    also with bfloat16 bases (fp32 adapters)."""
    emb = _fill(_embedding("softmax_topk", torch.float32))
    conv = _fill(_conv("conv2d_grouped", "shared_a", torch.float32))
    ids, x = torch.tensor([[1, 4, 0], [2, 2, 9]], device=DEVICE), _conv_input("conv2d_grouped", dtype).to(DEVICE)
    for layer, inp in ((emb, ids), (conv, x)):
        layer.base_layer.to(dtype)
        layer.to(DEVICE).eval()
        with moelora.use_backend("torch"):
            expected = layer(inp)
        with moelora.use_backend("triton"):
            out = layer(inp)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_triton_embedding_output_takes_in_place_ops():
    """The embedding's output ([B, S, D], from moelora.moe_lora's Triton backend) may be modified
    in place, as nn.Embedding's (a view returned by the op's autograd.Function could not be)."""
    layer = _fill(_embedding("softmax_topk", torch.float32)).to(DEVICE).train()
    ids = torch.tensor([[1, 4, 0], [2, 2, 9]], device=DEVICE)
    grads = []
    for in_place in (True, False):
        layer.zero_grad(set_to_none=True)
        with moelora.use_backend("triton"):
            y = layer(ids)
        y = y.mul_(2).add_(1) if in_place else y * 2 + 1
        (y * y.detach().cos()).sum().backward()
        grads.append([p.grad for p in layer.parameters() if p.requires_grad])
    for g, expected in zip(*grads):
        assert torch.equal(g, expected)


@pytest.mark.parametrize("mode", ["softmax_topk", "task", "task_shared", "task_shared_a", "shared_a"])
@pytest.mark.parametrize("init", [True, False])
def test_padding_token_keeps_the_base_vector_after_training(mode, init):
    """As nn.Embedding's padding row, the padding token's vector stays fixed in training: its column
    of A is 0 at init whatever the init (task experts and init_lora_weights=False draw A from
    N(0, 1)) and gets no gradient, so training B and the gates leaves it the base's vector."""
    layer = _embedding(mode, init_lora_weights=init).eval()
    ids = torch.tensor([[0, 3, 5, 0], [2, 0, 9, 1]])
    with torch.no_grad():  # training moved everything but A's padding column, which gets no gradient
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
        layer.lora_A[..., 0] = _embedding(mode, init_lora_weights=init).lora_A[..., 0]  # as initialised
    out = layer(ids)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.all(layer.lora_A.grad[..., 0] == 0)
    pad = ids == 0
    assert torch.equal(out[pad], layer.base_layer(ids)[pad])
    assert not torch.allclose(out[~pad], layer.base_layer(ids)[~pad])


@pytest.mark.parametrize("init", [True, False])
def test_embedding_init_is_peft_and_zeroes_the_column_of_its_own_padding_idx(init):
    """PEFT's embedding init: B ~ N(0, 1) (so that A, 0 at init, gets a gradient), A = 0, or N(0, 1) with
    init_lora_weights=False; the zeroed column of A is that of the base's padding_idx (here 3), no other."""
    torch.manual_seed(0)
    layer = MoELoRAEmbedding(nn.Embedding(11, 8, padding_idx=3), num_experts=2, top_k=1, r=4, init_lora_weights=init)
    assert layer.lora_B.std() > 0.5
    assert torch.all(layer.lora_A[..., 3] == 0)
    assert bool(torch.all(layer.lora_A[..., [0, 1, 2, 4]] != 0)) is (not init)
    out = layer(torch.tensor([[1, 2, 3]]))
    (out * torch.randn_like(out)).sum().backward()
    assert layer.lora_A.grad[..., 1].abs().sum() > 0 and torch.all(layer.lora_A.grad[..., 3] == 0)


@pytest.mark.parametrize("share_a", [False, True])
@pytest.mark.parametrize("init", [True, False])
def test_task_embedding_init_draws_a_and_starts_the_shared_lora_at_no_delta_unless_init_is_false(init, share_a):
    """Task experts (gated by gamma = 0) draw A from N(0, 1) whatever the init, so that gamma gets a gradient; the
    task-shared LoRA starts at no delta (its A = 0, or its B where A is shared), except with init_lora_weights=False,
    which draws it too (as MoELoRALinear's shared B): the layer then starts away from its base."""
    torch.manual_seed(0)
    layer = MoELoRAEmbedding(nn.Embedding(11, 8, padding_idx=3), num_experts=3, router="task", task_shared_lora=True,
                             share_lora_a=share_a, r=4, init_lora_weights=init)
    layer.task_ids = torch.tensor([2, 0])
    kept = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]  # every column but padding_idx's
    task_a = layer.lora_A[..., kept] if share_a else layer.lora_A[:-1, :, kept]
    shared = layer.lora_B[-1] if share_a else layer.lora_A[-1, :, kept]
    assert torch.all(task_a != 0) and torch.all(layer.lora_B[:-1] != 0)
    assert bool(torch.all(shared == 0)) is init and bool(torch.all(shared != 0)) is (not init)
    ids = torch.tensor([[1, 2, 5], [4, 6, 7]])
    out = layer(ids)
    assert torch.equal(out, layer.base_layer(ids)) is init
    (out * torch.randn_like(out)).sum().backward()
    assert torch.all(layer.lora_gamma.grad[[2, 0]] != 0)


# ----------------------------------------------------------------------------------- PEFT
def _peft_equivalence(net, target, ours, copy_weights, x, lora_dropout=0.0):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=[target], init_lora_weights=False,
                                                lora_dropout=lora_dropout))
    peft_layer = peft_model.base_model.model.get_submodule(target)
    copy_weights(peft_layer, ours)
    x_peft, x_ours = (x.detach().clone().requires_grad_(x.is_floating_point()) for _ in range(2))
    for train in (False, True):
        peft_model.train(train), ours.train(train)
        torch.manual_seed(7)
        expected = peft_model(x_peft)
        torch.manual_seed(7)
        out = ours(x_ours)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(out)
    (expected * weights).sum().backward()
    (out * weights).sum().backward()
    if x.is_floating_point():
        torch.testing.assert_close(x_ours.grad, x_peft.grad, rtol=1e-5, atol=1e-6)
    return peft_layer


@pytest.mark.parametrize("base,ids", [
    (lambda: nn.Embedding(12, 6, padding_idx=1), torch.tensor([[1, 3, 11, 3], [0, 1, 5, 7]])),
    (lambda: nn.Embedding(12, 6, padding_idx=1, scale_grad_by_freq=True), torch.tensor([[1, 3, 11, 3], [3, 1, 5, 3]])),
    (_gemma_embedding, torch.tensor([[1, 3, 11, 3], [0, 1, 5, 7]])),
    (lambda: nn.Embedding(12, 6), torch.tensor([4, 3, 11, 3, 0], dtype=torch.int32)),  # [S], int32
], ids=["padding_idx", "scale_grad_by_freq", "gemma_embed_scale", "int32_1d"])
def test_single_expert_embedding_equals_peft(base, ids):
    """One expert is PEFT's LoRA Embedding: output and the gradients of A and B, with a padding_idx (its column
    of A gets none), scale_grad_by_freq (A's gradient divided by each id's count), Gemma's embed_scale (the delta
    scaled as the base's vectors), an int32 id tensor of shape [S]."""
    torch.manual_seed(0)
    net = nn.Sequential(base())
    ours = MoELoRAEmbedding(net[0], num_experts=1, r=4, lora_alpha=8)

    def copy(peft_layer, ours):
        with torch.no_grad():
            ours.lora_A[0].copy_(peft_layer.lora_embedding_A["default"])
            ours.lora_B[0].copy_(peft_layer.lora_embedding_B["default"])

    peft_layer = _peft_equivalence(net, "0", ours, copy, ids)
    assert (ours.in_features, ours.out_features) == (peft_layer.in_features, peft_layer.out_features) == (12, 6)
    torch.testing.assert_close(ours.lora_A.grad[0], peft_layer.lora_embedding_A["default"].grad)
    torch.testing.assert_close(ours.lora_B.grad[0], peft_layer.lora_embedding_B["default"].grad)
    assert ours.lora_A.grad[0].abs().sum() > 0


@pytest.mark.parametrize("conv", [lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), lambda: nn.Conv2d(4, 6, 1),
                                  lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: nn.Conv1d(4, 6, 3, padding=1),
                                  lambda: nn.Conv2d(4, 6, (2, 3), padding="same", bias=False),
                                  lambda: nn.Conv3d(4, 6, (2, 3, 1), stride=(1, 2, 1), padding=1, groups=2)],
                         ids=["3x3_s2", "1x1", "grouped", "conv1d", "same_no_bias", "conv3d_grouped"])
def test_single_expert_conv_equals_peft(conv):
    torch.manual_seed(0)
    net = nn.Sequential(conv())
    ours = MoELoRAConv(net[0], num_experts=1, r=4, lora_alpha=8, lora_dropout=0.2)

    def copy(peft_layer, ours):
        with torch.no_grad():
            ours.lora_A[0].copy_(peft_layer.lora_A["default"].weight.reshape(4, -1))
            ours.lora_B[0].copy_(peft_layer.lora_B["default"].weight.reshape(6, -1))

    x = torch.randn(2, 4, *{nn.Conv1d: (7,), nn.Conv2d: (7, 6), nn.Conv3d: (3, 5, 4)}[type(net[0])])
    peft_layer = _peft_equivalence(net, "0", ours, copy, x, lora_dropout=0.2)
    torch.testing.assert_close(ours.lora_A.grad[0], peft_layer.lora_A["default"].weight.grad.reshape(4, -1))
    torch.testing.assert_close(ours.lora_B.grad[0], peft_layer.lora_B["default"].weight.grad.reshape(6, -1))


# ----------------------------------------------------------------------------------- merge, errors
@pytest.mark.parametrize("make,inp", [
    (lambda m: _embedding(m, torch.float32), lambda: torch.tensor([[1, 4, 0], [2, 2, 9]])),
    (lambda m: _conv("conv2d_3x3_s2", m, torch.float32), lambda: _conv_input("c", torch.float32)),
], ids=["embedding", "conv"])
@pytest.mark.parametrize("mode", ["single", "task_shared"])
def test_merge_unmerge_static_routing(make, inp, mode):
    layer = _fill(make(mode)).eval()
    x = inp()
    task = 1 if mode.startswith("task") else None
    layer.task_ids = task
    expected = layer(x)
    before = layer.base_layer.weight.clone()
    layer.merge(task)
    assert layer.merged and not torch.equal(layer.base_layer.weight, before)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["single", "task_shared"])
def test_merge_unmerge_of_a_channels_last_conv_writes_its_kernel(mode):
    """A channels_last kernel (a CNN prepared for inference) is merged into and unmerged from in
    place, keeping its memory format: the merge wrote into a reshaped copy of the kernel and left
    the base weight as it was, so the merged layer computed the base convolution alone."""
    layer = _fill(_conv("conv2d_3x3_s2", mode)).eval()
    task = 1 if mode.startswith("task") else None
    layer.task_ids = task
    layer.base_layer.to(memory_format=torch.channels_last)
    x = _conv_input("c")
    contiguous = copy.deepcopy(layer)
    contiguous.base_layer.to(memory_format=torch.contiguous_format)
    expected = conv_loop(layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    before = layer.base_layer.weight.clone()
    layer.merge(task)
    contiguous.merge(task)
    kernel = layer.base_layer.weight
    assert kernel.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(kernel, contiguous.base_layer.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    layer.unmerge()
    assert layer.base_layer.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["conv2d_3x3_s2", "conv2d_1x1", "conv2d_grouped"])
def test_channels_last_conv_gives_the_base_layers_channels_last_output(kind, backend):
    """A channels_last conv (a CNN trained in channels_last): the base conv's output is channels_last
    (for a channels_last batch, and for an NCHW one with a channels_last kernel), and the layer's
    now has the base output's strides (the routed step's output, [N, *spatial, C] in memory, is that
    layout already): it was copied to NCHW, a copy per layer that gave the next layer an NCHW input.
    An NCHW conv keeps its NCHW output. Values and x's gradient as the float64 loop reference."""
    layer = _fill(_conv(kind, "softmax_topk")).eval()
    fmt = torch.channels_last
    x = _conv_input(kind)
    expected = conv_loop(layer, x)
    x64 = x.clone().requires_grad_()
    dx_ref = torch.autograd.grad(conv_loop(layer, x64), x64, torch.ones_like(expected))[0]
    for kernel_format, x_format in [(torch.contiguous_format, torch.contiguous_format), (fmt, fmt),
                                    (fmt, torch.contiguous_format)]:
        layer.base_layer.to(memory_format=kernel_format)
        xf = x.to(memory_format=x_format).requires_grad_()
        with moelora.use_backend(backend):
            y = layer(xf)
            dx = torch.autograd.grad(y, xf, torch.ones_like(y))[0]
        base_out = layer.base_layer(xf)
        assert y.stride() == base_out.stride(), (kernel_format, x_format)
        assert base_out.is_contiguous(memory_format=kernel_format)
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make,inp", [
    (lambda: MoELoRALinear(nn.Linear(8, 6).double(), num_experts=1, r=4),
     lambda: torch.randn(3, 8, dtype=torch.float64)),
    (lambda: MoELoRALinear(nn.Linear(8, 6).double(), num_experts=1, r=4, use_dora=True),
     lambda: torch.randn(3, 8, dtype=torch.float64)),
    (lambda: _embedding("single"), lambda: torch.tensor([[1, 4, 0], [2, 2, 9]])),
    (lambda: _conv("conv2d_3x3_s2", "single"), lambda: _conv_input("c")),
], ids=["linear", "dora", "embedding", "conv"])
def test_merge_unmerge_of_fp64_layers_rounds_in_fp64(make, inp):
    """Merging folds the delta in fp64 for fp64 weights (fp32 for the others): unmerge gives the
    fp64 weights back to fp64's rounding, and the merged layer computes the unmerged one's output."""
    torch.manual_seed(0)
    layer = _fill(make()).eval()
    x = inp()
    expected, before = layer(x), layer.base_layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda: MoELoRALinear(nn.Linear(8, 6), num_experts=1, r=4),
    lambda: MoELoRALinear(nn.Linear(8, 6), num_experts=1, r=4, use_dora=True),
    lambda: _embedding("single"),
    lambda: _conv("conv2d_3x3_s2", "single"),
], ids=["linear", "dora", "embedding", "conv"])
def test_merge_and_unmerge_under_autocast_do_not_round_the_delta(make):
    """A merge (or unmerge) called inside torch.autocast (a training loop's bf16 context) folds
    the same delta as outside it: the product B A is not rounded to bfloat16."""
    torch.manual_seed(0)
    layer = _fill(make()).eval()
    plain = copy.deepcopy(layer)
    plain.merge()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, plain.base_layer.weight)
    plain.unmerge()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, plain.base_layer.weight)


@pytest.mark.parametrize("make,inp", [
    (lambda: _embedding("softmax_topk"), lambda: torch.tensor([[1, 4, 0], [2, 2, 9]])),
    (lambda: _conv("conv2d_3x3_s2", "softmax_topk"), lambda: _conv_input("c")),
    (lambda: _conv("conv2d_1x1", "softmax_topk"), lambda: _conv_input("conv2d_1x1")),
], ids=["embedding", "conv", "pointwise_conv"])
def test_disabled_adapters_give_the_base_output(make, inp):
    layer, x = _fill(make()).eval(), inp()
    assert not torch.allclose(layer(x), layer.base_layer(x))
    layer.disable_adapters = True
    assert torch.equal(layer(x), layer.base_layer(x))


def test_conv3d_merges_and_unmerges():
    """nn.Conv3d's forward is the weight function as nn.Conv1d's and nn.Conv2d's: a Conv3d layer merges."""
    base = nn.Conv3d(4, 6, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 0)).double()
    layer = _fill(MoELoRAConv(base, r=4, lora_alpha=8, num_experts=1)).eval()
    x = _conv_input("conv3d_grouped")
    expected, before = layer(x), layer.base_layer.weight.clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=1e-14, atol=1e-14)


def test_merge_refusals():
    with pytest.raises(ValueError, match="router depends on the input"):
        _embedding("softmax_topk").merge()
    with pytest.raises(ValueError, match="groups > 1"):
        _conv("conv2d_grouped", "single").merge()


def test_wrong_bases_and_settings_raise_clear_errors():
    with pytest.raises(TypeError, match="wraps nn.Linear or transformers Conv1D.*MoELoRAEmbedding"):
        MoELoRALinear(nn.Embedding(4, 4))
    with pytest.raises(TypeError, match="wraps nn.Linear or transformers Conv1D.*MoELoRAConv"):
        MoELoRALinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="MoELoRAEmbedding wraps nn.Embedding"):
        MoELoRAEmbedding(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="MoELoRAConv wraps nn.Conv1d, nn.Conv2d or nn.Conv3d"):
        MoELoRAConv(nn.ConvTranspose2d(3, 3, 1))
    with pytest.raises(ValueError, match="multiple of the convolution's groups"):
        MoELoRAConv(nn.Conv2d(4, 4, 1, groups=4), r=6)
    with pytest.raises(ValueError, match=r"nn.Embedding with max_norm=1.0: its forward renormalises"):
        MoELoRAEmbedding(nn.Embedding(4, 4, max_norm=1.0), num_experts=1)
    with pytest.raises(ValueError, match="use_dora is supported on linear layers only"):
        MoELoRAEmbedding(nn.Embedding(4, 4), num_experts=1, use_dora=True)
    with pytest.raises(ValueError, match="top_k must be in"):
        MoELoRAConv(nn.Conv2d(3, 3, 1), num_experts=2, top_k=3)
    layer = _conv("conv2d_1x1", "task")
    layer.task_ids = None
    with pytest.raises(RuntimeError, match="routes by task id but none is set"):
        layer(torch.randn(1, 3, 2, 2, dtype=torch.float64))


class _UNet(nn.Module):
    """A down / up convolution stack: the up-sampling layer is an nn.ConvTranspose2d, which no adapter wraps."""

    def __init__(self):
        super().__init__()
        self.down, self.mid = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.up, self.out = nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Conv2d(7, 3, 1)

    def forward(self, x):
        return self.out(torch.cat([self.up(F.relu(self.mid(F.relu(self.down(x))))), x], 1))


def test_a_target_regex_matching_a_transposed_convolution_raises_naming_it():
    """A regex that matches a transposed convolution (which moelora, as PEFT's LoRA, cannot adapt) raises
    naming it, as a list naming it does, instead of leaving the layer without an adapter silently; excluded,
    the other layers are adapted."""
    config = dict(r=4, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match=r"matches up, a ConvTranspose2d.*exclude_modules"):
        moelora.get_moelora_model(_UNet(), moelora.MoELoRAConfig(target_modules=r".*(down|mid|up|out)", **config))
    with pytest.raises(ValueError, match=r"'up' names up, a ConvTranspose2d"):
        moelora.get_moelora_model(_UNet(), moelora.MoELoRAConfig(target_modules=["down", "up"], **config))
    model = moelora.get_moelora_model(_UNet(), moelora.MoELoRAConfig(target_modules=r".*(down|mid|up|out)",
                                                                     exclude_modules=["up"], **config))
    assert [n for n, m in model.model.named_children() if isinstance(m, MoELoRAConv)] == ["down", "mid", "out"]
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3, 8, 8)


class _DecoderStack(nn.Module):
    """Two numbered layers, each a convolution and a transposed convolution, and a decoder holding another pair."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(OrderedDict(conv=nn.Conv2d(4, 4, 1), up=nn.ConvTranspose2d(4, 4, 1)))
                                     for _ in range(2)])
        self.decoder = nn.Sequential(OrderedDict(conv=nn.Conv2d(4, 4, 1), up=nn.ConvTranspose2d(4, 4, 1)))

    def forward(self, x):
        for block in [*self.layers, self.decoder]:
            x = block(x)
        return x


@pytest.mark.parametrize("left_out", ["saved", "layers"])
def test_a_target_regex_matching_a_transposed_convolution_that_the_selection_leaves_out_is_accepted(left_out):
    """A transposed convolution the regex matches inside a module saved whole (modules_to_save, trained whole; PEFT
    skips it too) or in a layer that layers_to_transform leaves out would take no adapter anyway: no error (it
    raised the transposed-convolution error before); the transposed convolutions the selection keeps still raise."""
    config = dict(r=4, num_experts=2, top_k=1, target_modules=r".*(conv|up)")
    if left_out == "saved":
        config.update(modules_to_save=["decoder"], exclude_modules=r"layers\.\d\.up")
        adapted = ["layers.0.conv", "layers.1.conv"]
    else:
        config.update(layers_to_transform=[1], exclude_modules=r"(layers\.1|decoder)\.up")
        adapted = ["layers.1.conv"]
    model = moelora.get_moelora_model(_DecoderStack(), moelora.MoELoRAConfig(**config))
    assert [n for n, m in model.model.named_modules() if isinstance(m, MoELoRAConv)] == adapted
    assert model(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)
    config["exclude_modules"] = None
    with pytest.raises(ValueError, match=r"matches layers\.(0|1)\.up, a ConvTranspose2d"):
        moelora.get_moelora_model(_DecoderStack(), moelora.MoELoRAConfig(**config))


def test_embedding_subclasses_whose_forward_looks_up_other_rows_are_refused():
    """OPT's learned positional embedding looks up the positions of its attention-mask input (BART's those of its
    input ids' shape, Whisper's slices its weight): the adapter's lookup of the input itself added the delta of
    other rows, silently (OPT: the rows of ids 0 and 1 on every position). Such a subclass (a forward of its own,
    no embed_scale) is refused, naming it; Gemma's scaled embedding and a subclass keeping nn.Embedding's forward
    are wrapped."""
    from transformers.models.bart.modeling_bart import BartLearnedPositionalEmbedding
    from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding
    from transformers.models.whisper.modeling_whisper import WhisperPositionalEmbedding

    for base in (OPTLearnedPositionalEmbedding(20, 8), BartLearnedPositionalEmbedding(20, 8),
                 WhisperPositionalEmbedding(20, 8)):
        with pytest.raises(TypeError, match=f"cannot wrap {type(base).__name__}: its forward replaces nn.Embedding's"):
            MoELoRAEmbedding(base, num_experts=1)
    MoELoRAEmbedding(_gemma_embedding(), num_experts=1)
    MoELoRAEmbedding(type("Tagged", (nn.Embedding,), {})(12, 6), num_experts=1)


def test_model_code_reads_the_padding_idx_and_embed_scale_of_an_adapted_embedding():
    """Model code reads an embedding's padding_idx and embed_scale through the module it holds (Kyutai's
    speech-to-text embeddings offset every id but ``embed_tokens.padding_idx``; DiffusionGemma scales its soft
    embeddings by ``embed_tokens.embed_scale``): an adapted ``embed_tokens`` gives the base's, as it gives its
    weight. Its forward raised AttributeError ('MoELoRAEmbedding' object has no attribute 'padding_idx')."""
    from transformers import KyutaiSpeechToTextConfig
    from transformers.models.kyutai_speech_to_text.modeling_kyutai_speech_to_text import (
        KyutaiSpeechToTextEmbeddings)

    config = KyutaiSpeechToTextConfig(vocab_size=20, codebook_vocab_size=8, num_codebooks=2, hidden_size=8,
                                      audio_pad_token_id=36, bos_token_id=None, audio_bos_token_id=None)
    torch.manual_seed(0)
    embeddings = KyutaiSpeechToTextEmbeddings(config)
    ids = torch.tensor([[[3, 36, 5], [7, 2, 36]], [[36, 1, 4], [0, 36, 6]]])
    plain = embeddings(ids)
    model = moelora.get_moelora_model(copy.deepcopy(embeddings), moelora.MoELoRAConfig(
        target_modules=["embed_tokens"], num_experts=1, r=2, init_lora_weights=False))
    layer = model.model.embed_tokens
    assert isinstance(layer, MoELoRAEmbedding) and layer.padding_idx == 36
    out = model(ids)
    # the ids the model looks up: the padding id kept, the others offset per codebook (as its forward does)
    looked_up = torch.where(ids == 36, ids, ids + embeddings.audio_tokens_offsets)
    delta = layer(looked_up) - layer.base_layer(looked_up)
    torch.testing.assert_close(out, plain + delta.sum(dim=2), rtol=1e-6, atol=1e-6)
    assert delta[looked_up == 36].abs().max() == 0 and delta.abs().max() > 0
    scaled = MoELoRAEmbedding(_gemma_embedding(), num_experts=1)
    assert scaled.embed_scale is scaled.base_layer.embed_scale and scaled.padding_idx == 1
    with pytest.raises(AttributeError, match="embed_scale"):
        MoELoRAEmbedding(nn.Embedding(4, 4), num_experts=1).embed_scale


def test_merging_refuses_a_scaled_embedding_that_replaces_rows_with_a_parameter_of_its_own():
    """T5Gemma2's scaled embedding replaces the vectors of its end-of-input token with a parameter of its own
    (eoi_embedding): unmerged, the adapter adds its delta there; merged into the weight, the delta was lost on
    those tokens, silently. Merging it is refused; Gemma's scaled embedding still merges exactly."""
    from transformers.models.t5gemma2.modeling_t5gemma2 import T5Gemma2TextScaledWordEmbedding

    base = T5Gemma2TextScaledWordEmbedding(12, 6, padding_idx=0, embed_scale=2.5, eoi_token_index=3)
    with torch.no_grad():
        base.eoi_embedding.normal_()
    layer = MoELoRAEmbedding(base, num_experts=1, r=2, init_lora_weights=False)
    ids = torch.tensor([[1, 3, 5, 3]])
    unmerged = layer(ids)
    with pytest.raises(ValueError, match="cannot merge into T5Gemma2TextScaledWordEmbedding: it has a forward"):
        layer.merge()
    assert torch.equal(layer(ids), unmerged) and not layer.merged
    gemma = MoELoRAEmbedding(_gemma_embedding(), num_experts=1, r=2, init_lora_weights=False)
    want = gemma(ids)
    gemma.merge()
    torch.testing.assert_close(gemma(ids), want)


def test_half_precision_bases_get_fp32_adapters_and_keep_dtype():
    emb = MoELoRAEmbedding(nn.Embedding(10, 8).to(torch.bfloat16), num_experts=2, top_k=1, r=4)
    conv = MoELoRAConv(nn.Conv2d(3, 8, 3).to(torch.bfloat16), num_experts=2, top_k=1, r=4)
    randomize_adapters(conv)
    assert emb.lora_A.dtype == conv.lora_B.dtype == torch.float32
    assert emb(torch.tensor([[1, 2]])).dtype == torch.bfloat16
    assert conv(torch.randn(1, 3, 5, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("base", ["gemma_embed_scale", "autocast"])
def test_half_precision_embedding_adding_its_delta_apart_keeps_the_base_dtype(base):
    """Where the delta is added apart from the op (times Gemma's embed_scale, or under autocast, which leaves
    nn.Embedding's output in its dtype), it is added in fp32 and the sum returned in the bf16 base's dtype, as the
    base layer returns it: the layer returned fp32 vectors there."""
    torch.manual_seed(0)
    make = _gemma_embedding if base == "gemma_embed_scale" else (lambda: nn.Embedding(12, 6))
    layer = MoELoRAEmbedding(make().to(torch.bfloat16), num_experts=1, r=4, init_lora_weights=False)
    ids = torch.tensor([[2, 3, 5], [4, 0, 7]])  # not Gemma's padding_idx, 1
    fp32 = copy.deepcopy(layer)
    fp32.base_layer.float()
    delta = fp32(ids) - fp32.base_layer(ids)
    assert delta.abs().min() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=base == "autocast"):
        out, frozen = layer(ids), layer.base_layer(ids)
    assert out.dtype == frozen.dtype == torch.bfloat16
    # the fp32 delta, to bf16's rounding (autocast's delta is computed in bf16)
    torch.testing.assert_close(out, (frozen.float() + delta).to(torch.bfloat16), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["embedding", "conv2d_3x3_s2", "conv2d_1x1"])
def test_a_dropout_is_the_layer_with_a_masked_and_rescaled(kind):
    """MoSLD's A-dropout (training): the output of the layer whose shared A is A (.) M / (1 - p),
    M the keep mask the forward drew (the dropout's scale is folded into the LoRA scaling)."""
    make = (lambda: _embedding("shared_a", lora_a_dropout=0.5)) if kind == "embedding" else \
        (lambda: _conv(kind, "shared_a", lora_a_dropout=0.5))
    layer, reference = _fill(make()), _fill(make())
    x = torch.tensor([[0, 3, 5, 7], [1, 2, 10, 4]]) if kind == "embedding" else _conv_input(kind)
    torch.manual_seed(5)
    out = layer.train()(x)
    torch.manual_seed(5)
    keep = torch.empty(layer.lora_A.shape, dtype=torch.bool).bernoulli_(0.5)  # the forward's first draw
    with torch.no_grad():
        reference.lora_A.mul_(keep / 0.5)
    expected = reference.eval()(x)  # eval: no A-dropout
    assert not torch.allclose(out, _fill(make()).eval()(x))  # the mask changed the output
    torch.testing.assert_close(out, expected)


def _threshold_linear_three_steps_in():
    """A threshold-routed MoELoRALinear 3 steps into its eps ramp (eval: no threshold draws)."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(10, 6).double(), r=4, **MODES["threshold"], threshold_eps_start=0.05,
                          threshold_ramp_steps=10).eval()
    layer.router.step(3)
    return layer


@pytest.mark.parametrize("make,inp", [
    (lambda: _embedding("softmax_topk"), lambda: torch.tensor([[0, 3, 5, 7], [1, 2, 10, 4]])),
    (lambda: _conv("conv2d_grouped", "shared_a"), lambda: _conv_input("conv2d_grouped")),
    (lambda: _conv("conv2d_3x3_s2", "task_shared"), lambda: _conv_input("conv2d_3x3_s2")),
    (_threshold_linear_three_steps_in, lambda: torch.linspace(-2, 2, 30, dtype=torch.float64).reshape(3, 10))])
@pytest.mark.parametrize("how", ["to_empty", "assign"])
def test_meta_device_layer_made_real_then_loaded_equals_the_layer(make, inp, how):
    """Meta-device init (FSDP2, big models): build on meta, then ``to_empty`` and load the weights,
    or load them with ``assign=True``. The loaded tensors are kept (the router's step count too:
    loading is the alternative to reset_parameters, which would zero it). The constant buffers no
    state dict holds (the projection selector, the group mask) must be right again, not the
    uninitialised memory to_empty leaves nor meta tensors; and they follow ``.to(dtype)``, and the dtype an
    ``assign=True`` load gives B."""
    layer = _fill(make())
    with torch.device("meta"):
        empty = make()
    if how == "to_empty":
        empty.to_empty(device="cpu").load_state_dict(layer.state_dict())
    else:
        empty.load_state_dict(layer.state_dict(), assign=True)
    assert all(torch.equal(t, layer.state_dict()[name]) for name, t in empty.state_dict().items())
    empty.task_ids = layer.task_ids
    torch.testing.assert_close(empty(inp()), layer(inp()), rtol=0, atol=0)
    single = _fill(make()).float()
    assert all(b.dtype == torch.float32 for b in single.buffers() if b.is_floating_point())
    x = inp() if inp().dtype == torch.long else inp().float()
    torch.testing.assert_close(single(x).double(), layer(inp()), rtol=1e-5, atol=1e-5)
    if how == "assign":  # float64 tensors assigned into a float32 layer: the constants follow B's dtype
        single.load_state_dict(layer.state_dict(), assign=True)
        assert all(b.dtype == torch.float64 for b in single.buffers() if b.is_floating_point())
        single.task_ids = layer.task_ids
        torch.testing.assert_close(single(inp()), layer(inp()), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["embedding", "conv"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_task_ids_out_of_range_with_validation_off_add_no_adapter(kind, backend, grad):
    """With validation off a task id outside [0, E) adds no adapter to its example (the README's contract, as
    for MoELoRALinear): that example's output is the base layer's, the other's what it is with valid ids. The
    layers' routing is not taken for checked here (the torch backend's gathered form, without a gradient, would
    index lora_B by the id)."""
    layer = _fill(_embedding("task") if kind == "embedding" else _conv("conv2d_3x3_s2", "task"))
    inputs = torch.tensor([[1, 4, 5], [2, 9, 3]]) if kind == "embedding" else _conv_input("conv2d_3x3_s2")
    with moelora.use_backend(backend), torch.set_grad_enabled(grad):
        layer.task_ids = torch.tensor([2, 0])
        valid = layer(inputs)
        layer.task_ids = torch.tensor([2, 7])  # E = 3
        with moelora.validation(False):
            y = layer(inputs)
        base = layer.base_layer(inputs)
    assert not torch.equal(valid[0], base[0])  # the adapter changes what it reaches
    torch.testing.assert_close(y[0], valid[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y[1], base[1], rtol=0, atol=1e-12)
