"""torch.autocast reaches moelora's ops as it reaches F.linear: the activations (and a frozen
layer's weight and bias, or the expert weights) are read in autocast's dtype, the output comes
in it, and fp32 parameters get fp32 gradients. So a mixed-precision step (fp32 weights,
``torch.autocast``, as the HF Trainer's bf16=True) runs the half-precision kernels; before,
the ops ignored autocast and ran in fp32. Each op under autocast is checked bitwise against the
same op called on inputs cast by hand, and the layers against a float64 reference."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora
from conftest import DEVICE, HAS_CUDA
from helpers import rel_err, routing
from moelora.modules.conv import MoELoRAConv
from moelora.modules.embedding import MoELoRAEmbedding
from moelora.modules.ffn import MoEFFN
from moelora.ops.moe_ffn import moe_ffn
from moelora.ops.moe_lora_linear import RouterSpec, moe_lora_linear

AMP_DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _kernels_in_bfloat16_need_a_gpu(request):
    params = request.node.callspec.params
    if params.get("backend") == "triton" and params.get("amp") == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("the Triton interpreter's bfloat16 is not the GPU's (as the kernels' bf16 tests, GPU only)")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _step(fn, leaves, grad, amp):
    """(output, gradients of ``leaves``) of fn(*leaves) under autocast to ``amp`` (None: without)."""
    with torch.autocast(DEVICE.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out, [t.grad for t in leaves]


def _assert_autocast_casts_as_by_hand(op, by_hand, leaves, grad, amp):
    """op(*leaves) under autocast to ``amp``: its output in amp, fp32 gradients, and bitwise the
    output and gradients of ``by_hand`` (op on the leaves cast by hand) without autocast."""
    y, grads = _step(op, _leaves(*leaves), grad, amp)
    y_ref, grads_ref = _step(by_hand, _leaves(*leaves), grad, None)
    assert y.dtype == amp and all(g.dtype == torch.float32 for g in grads)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    for g, g_ref, in zip(grads, grads_ref):
        assert g.dtype == g_ref.dtype and torch.equal(g, g_ref)


@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared_a", [True, False])
def test_moe_lora_reads_x_in_the_autocast_dtype(backend, shared_a, amp):
    torch.manual_seed(0)
    T, d_in, d_out, r, E, k = 9, 24, 20, 4, 5, 2
    x = torch.randn(T, d_in, device=DEVICE)
    lora_a = torch.randn(*((r, d_in) if shared_a else (E, r, d_in)), device=DEVICE) / d_in ** 0.5
    lora_b, base_out = torch.randn(E, d_out, r, device=DEVICE), torch.randn(T, d_out, device=DEVICE)
    ids, weights = routing(T, E, k, device=DEVICE), torch.rand(T, k, device=DEVICE)
    grad = torch.randn(T, d_out, device=DEVICE)
    leaves = (x, lora_a, lora_b, weights, base_out)

    def op(x, a, b, w, base):
        return moelora.moe_lora(x, a, b, ids, w, scaling=0.5, base_out=base, backend=backend)

    _assert_autocast_casts_as_by_hand(
        op, lambda x, a, b, w, base: op(x.to(amp), a.to(amp), b.to(amp), w, base.to(amp)), leaves, grad, amp)


@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_lora_linear_reads_x_and_the_base_layer_in_the_autocast_dtype(backend, amp):
    torch.manual_seed(0)
    T, d_in, d_out, r, E = 9, 24, 20, 4, 5
    x, weight, bias = torch.randn(T, d_in, device=DEVICE), torch.randn(d_out, d_in, device=DEVICE), \
        torch.randn(d_out, device=DEVICE)
    lora_a, lora_b = torch.randn(r, d_in, device=DEVICE) / 5, torch.randn(E, d_out, r, device=DEVICE)
    router_weight = torch.randn(E, d_in, device=DEVICE)
    grad = torch.randn(T, d_out, device=DEVICE)
    leaves = (x, weight, bias, lora_a, lora_b, router_weight)

    def op(x, w, b, a, lb, rw):
        y, out = moe_lora_linear(x, w, b, a, lb, scaling=0.5, router=RouterSpec(rw, None, "softmax_topk", 2),
                                 backend=backend)
        return y + 0 * out.aux_loss  # the router weight's gradient through the aux loss too

    _assert_autocast_casts_as_by_hand(
        op, lambda x, w, b, *rest: op(x.to(amp), w.to(amp), b.to(amp), *rest), leaves, grad, amp)


@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_ffn_reads_x_and_the_expert_weights_in_the_autocast_dtype(backend, amp):
    torch.manual_seed(0)
    T, d, d_ff, E, k = 9, 16, 24, 4, 2
    x = torch.randn(T, d, device=DEVICE)
    w_in, w_gate, w_out = (torch.randn(E, d_ff, d, device=DEVICE) / 4, torch.randn(E, d_ff, d, device=DEVICE) / 4,
                           torch.randn(E, d, d_ff, device=DEVICE) / 5)
    b_in, b_out = torch.randn(E, d_ff, device=DEVICE), torch.randn(E, d, device=DEVICE)
    ids, weights = routing(T, E, k, device=DEVICE), torch.rand(T, k, device=DEVICE)
    grad = torch.randn(T, d, device=DEVICE)
    leaves = (x, weights, w_in, b_in, w_out, b_out, w_gate)

    def op(x, w, w_in, b_in, w_out, b_out, w_gate):
        return moe_ffn(x, ids, w, w_in, b_in, w_out, b_out, F.silu, w_gate, backend=backend)

    _assert_autocast_casts_as_by_hand(
        op, lambda x, w, *ws: op(x.to(amp), w, *(t.to(amp) for t in ws)), leaves, grad, amp)


def _layers():
    """{kind: (layer, its input)}: fp32 layers of every kind, and inputs of their shapes."""
    torch.manual_seed(0)
    linear = moelora.MoELoRALinear(nn.Linear(24, 20), num_experts=4, top_k=2, r=4, init_lora_weights=False)
    task = moelora.MoELoRALinear(nn.Linear(24, 20), num_experts=3, r=4, router="task", task_shared_lora=True,
                                 init_lora_weights=False)
    task.task_ids = torch.tensor([2, 0], device=DEVICE)
    ffn = MoEFFN(nn.Linear(24, 32), nn.Linear(32, 24), F.silu, num_experts=4, top_k=2, gate_proj=nn.Linear(24, 32),
                 router="softmax_topk")
    conv = MoELoRAConv(nn.Conv2d(3, 6, 3), num_experts=3, top_k=2, r=4, init_lora_weights=False)
    embedding = MoELoRAEmbedding(nn.Embedding(30, 12), num_experts=3, top_k=2, r=4, init_lora_weights=False)
    dora = moelora.MoELoRALinear(nn.Linear(24, 20), num_experts=1, r=4, use_dora=True, init_lora_weights=False)
    tokens = torch.randn(2, 5, 24, device=DEVICE)
    return {"linear": (linear, tokens), "task": (task, tokens), "ffn": (ffn, tokens),
            "conv": (conv, torch.randn(2, 3, 6, 6, device=DEVICE)),
            "embedding": (embedding, torch.randint(0, 30, (2, 5), device=DEVICE)), "dora": (dora, tokens)}


# What the base layer alone returns under autocast: nn.Embedding is not autocast (fp32 stays fp32)
BASE_UNDER_AUTOCAST = {"embedding": torch.float32}


@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "task", "ffn", "conv", "embedding", "dora"])
def test_layers_train_in_the_autocast_dtype(kind, backend, amp):
    """fp32 layers under autocast: the output in the dtype their base layer gives there
    (autocast's for nn.Linear and nn.Conv2d), fp32 gradients for every parameter, all within
    the half-precision tolerance of float64."""
    layer, x = _layers()[kind]
    layer = layer.to(DEVICE).train()
    reference = copy.deepcopy(layer).double()
    results = []
    for module, dtype, amp_dtype, name in [(layer, torch.float32, amp, backend), (reference, torch.float64, None,
                                                                                  "torch")]:
        xi = x.to(dtype).detach().requires_grad_() if x.is_floating_point() else x
        with moelora.use_backend(name), torch.autocast(DEVICE.type, dtype=amp, enabled=amp_dtype is not None):
            y = module(xi)
            aux = moelora.aux_loss(module)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
        ((y.to(dtype) * grad).sum() + (0 if aux is None else aux.to(dtype))).backward()
        results.append((y, {"x": xi.grad, **{n: p.grad for n, p in module.named_parameters() if p.grad is not None}}))
    (y, grads), (y_ref, grads_ref) = results
    assert y.dtype == BASE_UNDER_AUTOCAST.get(kind, amp) and rel_err(y, y_ref) < TOL[amp]
    assert set(grads) == set(grads_ref)
    for name, g in grads.items():
        if g is None:  # the token ids of an embedding
            assert grads_ref[name] is None
            continue
        assert g.dtype == torch.float32, name
        assert rel_err(g, grads_ref[name]) < TOL[amp] * 2, f"grad {name} rel err {rel_err(g, grads_ref[name])}"


@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_keeps_the_frozen_vectors_in_their_dtype(backend, amp):
    """nn.Embedding is not autocast: a fresh MoELoRAEmbedding (A = 0) under autocast returns the
    frozen vectors bitwise, and a trained one adds its delta to them unrounded (as PEFT)."""
    layer, ids = _layers()["embedding"]
    layer = layer.to(DEVICE)
    with moelora.use_backend(backend), torch.autocast(DEVICE.type, dtype=amp):
        fresh = copy.deepcopy(layer)
        fresh.reset_lora_parameters(True)
        assert torch.equal(fresh(ids), layer.base_layer(ids))
        y = layer(ids)
    with moelora.use_backend(backend):
        delta = layer(ids) - layer.base_layer(ids)
    assert y.dtype == torch.float32 and rel_err(y - layer.base_layer(ids), delta) < TOL[amp]


@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_already_in_the_autocast_dtype_beside_fp32_weights(backend, amp):
    """Under autocast an op's inputs may come in mixed dtypes (x from an earlier autocast op,
    fp32 weights): cast as F.linear casts them, not refused by the ops' same-dtype checks."""
    torch.manual_seed(0)
    T, d, d_ff, r, E = 7, 16, 24, 4, 3
    x = torch.randn(T, d, device=DEVICE).to(amp)
    ids, weights = routing(T, E, 2, device=DEVICE), torch.rand(T, 2, device=DEVICE)
    lora_a, lora_b = torch.randn(r, d, device=DEVICE), torch.randn(E, d, r, device=DEVICE)
    w_in, w_out = torch.randn(E, d_ff, d, device=DEVICE), torch.randn(E, d, d_ff, device=DEVICE)
    weight, bias = torch.randn(d, d, device=DEVICE), torch.randn(d, device=DEVICE)

    def linear(weight, bias):
        return moe_lora_linear(x, weight, bias, lora_a, lora_b, scaling=0.5, topk_ids=ids, topk_weights=weights,
                               backend=backend)[0]

    with torch.autocast(DEVICE.type, dtype=amp):
        y = moelora.moe_lora(x, lora_a, lora_b, ids, weights, base_out=x.float(), backend=backend)
        z = moe_ffn(x, ids, weights, w_in, None, w_out, None, F.silu, backend=backend)
        u = linear(weight, bias)
    assert torch.equal(y, moelora.moe_lora(x, lora_a.to(amp), lora_b.to(amp), ids, weights, base_out=x,
                                           backend=backend))
    assert torch.equal(z, moe_ffn(x, ids, weights, w_in.to(amp), None, w_out.to(amp), None, F.silu, backend=backend))
    assert torch.equal(u, linear(weight.to(amp), bias.to(amp)))


@pytest.mark.parametrize("kind", ["linear", "ffn"])
def test_torch_compile_fullgraph_under_autocast_trains_like_eager(kind):
    """The autocast check and cast are traced: one graph, the same step as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    layer, x = _layers()[kind]
    layer = layer.to(DEVICE).train()
    eager_layer = copy.deepcopy(layer)

    def loss_fn(m, x):
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            y = m(x)
        assert y.dtype == torch.float16
        return y.float().square().mean() + moelora.aux_loss(m)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    with moelora.use_backend("triton"):
        for m, fn in ((layer, compiled), (eager_layer, loss_fn)):
            fn(m, x).backward()
    torch._dynamo.reset()
    assert counter.frame_count == 1
    for (name, p), q in zip(layer.named_parameters(), eager_layer.parameters()):
        assert p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, rtol=TOL[torch.float16], atol=1e-4, msg=name)  # fp16 sums' order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("jitter", [0.0, 0.1])
def test_router_logits_stay_fp32_under_autocast(backend, jitter):
    """The routers' logits are fp32 under autocast as without it (as the fused layer's kernels
    compute them) on every path: the torch backend, jitter, a convolution's router, MoLEx's gates.
    Before, F.linear / conv under autocast rounded them to its dtype off the router kernel's path."""
    from moelora.modules.molex import LayerGate

    torch.manual_seed(0)
    linear = moelora.MoELoRALinear(nn.Linear(24, 20), num_experts=4, top_k=2, r=4, router_jitter_noise=jitter)
    conv = MoELoRAConv(nn.Conv2d(3, 6, 3), num_experts=3, top_k=2, r=4, router_jitter_noise=jitter)
    cases = [(linear.router.to(DEVICE).train(), torch.randn(7, 24, device=DEVICE)),
             (conv.router.to(DEVICE).train(), torch.randn(2, 3, 6, 6, device=DEVICE))]
    for gate in ("linear", "cosine"):
        cases.append((LayerGate(24, 4, gate).to(DEVICE), torch.randn(7, 24, device=DEVICE)))
    for module, x in cases:
        logits = []
        for amp in (torch.bfloat16, None):
            torch.manual_seed(1)  # the same jitter
            with moelora.use_backend(backend), torch.autocast(DEVICE.type, dtype=torch.bfloat16,
                                                              enabled=amp is not None):
                logits.append(module(x, 0)[0] if isinstance(module, LayerGate) else module.logits(x))
        assert logits[0].dtype == torch.float32 and torch.equal(logits[0], logits[1]), type(module).__name__


@pytest.mark.parametrize("amp", AMP_DTYPES)
def test_dora_weight_norm_is_not_rounded_under_autocast(amp):
    """DoRA's ||W + s B A||_row is in the adapters' dtype under autocast too (as PEFT's, whose W
    stays fp32): before, autocast ran its addmm in half precision, so a fresh layer's magnitude
    scale m / ||W|| was off 1 by up to ~0.4% per output row."""
    torch.manual_seed(0)
    layer = moelora.MoELoRALinear(nn.Linear(64, 48), num_experts=1, r=4, use_dora=True).to(DEVICE)
    weight = layer.base_weight()
    norm = layer._dora_norm(weight, layer.lora_A, layer.scaling)
    with torch.autocast(DEVICE.type, dtype=amp):
        norm_amp = layer._dora_norm(weight, layer.lora_A, layer.scaling)
    assert norm_amp.dtype == torch.float32 and torch.equal(norm_amp, norm)
    assert torch.equal(layer.lora_magnitude_vector / norm_amp, torch.ones_like(norm))


@pytest.mark.parametrize("amp", AMP_DTYPES)
def test_task_gates_stay_fp32_under_autocast(amp):
    """Task routing's gates gamma[task] and gamma's gradient are fp32 under autocast as without
    it (as a learned router's gates). Before, autocast ran the one-hot product in half
    precision: the gates and gamma's gradient (a sum over the tokens) rounded to amp."""
    from moelora.ops.routing_modes import task_routing

    gamma = torch.tensor([1.001, 0.3337, 2.0123], device=DEVICE, requires_grad=True)
    ids, grad = torch.tensor([2, 0, 1, 1], device=DEVICE), torch.randn(4, 1, device=DEVICE)
    results = []
    for enabled in (True, False):
        with torch.autocast(DEVICE.type, dtype=amp, enabled=enabled):
            weights = task_routing(ids, gamma, (4,)).weights
        results.append((weights, torch.autograd.grad(weights, gamma, grad)[0]))
    (weights, dgamma), (weights_ref, dgamma_ref) = results
    assert weights.dtype == torch.float32 and torch.equal(weights, weights_ref)
    assert torch.equal(dgamma, dgamma_ref)


@pytest.mark.parametrize("amp", AMP_DTYPES)
def test_autocast_helpers_say_what_autocast_would_cast(amp):
    """moelora.ops.backend: autocast's dtype only where autocast is on for the tensor's device (none for a
    meta tensor, which autocast does not know, or what is no tensor); fp32, fp16 and bf16 tensors cast to it,
    float64, integers and None as they are; without_autocast turns it off for x's device."""
    from moelora.ops.backend import autocast_dtype, autocast_input, without_autocast

    x, meta = torch.randn(3, 4, device=DEVICE), torch.randn(3, 4, device="meta")
    assert autocast_dtype(x) is None
    with torch.autocast(DEVICE.type, dtype=amp):
        assert autocast_dtype(x) == amp and autocast_dtype(meta) is None and autocast_dtype([x]) is None
        for t in (x, x.half(), x.bfloat16()):
            assert autocast_input(t, amp).dtype == amp
        ints = torch.arange(3, device=DEVICE)
        assert autocast_input(x.double(), amp).dtype == torch.float64 and autocast_input(ints, amp) is ints
        assert autocast_input(None, amp) is None
        assert (x @ x.T).dtype == amp
        with without_autocast(x):
            assert (x @ x.T).dtype == torch.float32 and autocast_dtype(x) is None
        assert (x @ x.T).dtype == amp
    with without_autocast(x):
        assert (x @ x.T).dtype == torch.float32
