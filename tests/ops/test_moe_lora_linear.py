"""MoELoRALinear's fused op (moelora.ops.moe_lora_linear) on the Triton kernels against a float64
reference: the same layer in float64 on the PyTorch backend (base GEMM, moelora's routing op,
the torch operator, autograd). Output, aux loss and every gradient (x, A, B, router weight,
task scales, bias) for every router mode and layer feature; exact zeros for experts without
tokens; non-finite weights of unchosen experts stay out; bitwise repeats; saved activations;
float64 gradcheck; in-place ops on the output; torch.compile and the custom ops.

Without a GPU the kernels run under the Triton interpreter (fp32, fp16).
"""

import copy

import pytest
import torch
import torch.nn as nn

import moelora
from conftest import DEVICE, HAS_CUDA
from helpers import empty_filled_with_nan, float_args_as_float32, rel_err
from moelora import MoELoRALinear
from moelora.ops import moe_lora as moe_lora_module
from moelora.ops import moe_lora_linear as fused_linear

KINDS = {
    "softmax_topk": dict(num_experts=4, top_k=2),
    "softmax_plain": dict(num_experts=4, top_k=2, router_renormalize=False),
    "topk_softmax": dict(num_experts=4, top_k=2, router="topk_softmax"),
    "threshold": dict(num_experts=4, top_k=3, router="threshold", threshold_eps=0.3),
    "threshold_ramp": dict(num_experts=4, top_k=3, router="threshold", threshold_eps=0.3, threshold_ramp_steps=4),
    "shared_a_mosld": dict(num_experts=3, top_k=2, share_lora_a=True, lora_a_dropout=0.2),
    "per_expert_k1": dict(num_experts=5, top_k=1, use_rslora=True),
    "task": dict(num_experts=3, router="task"),
    "task_shared": dict(num_experts=3, router="task", task_shared_lora=True),
    "single": dict(num_experts=1),
    "lora_dropout": dict(num_experts=4, top_k=2, lora_dropout=0.3),
    "lora_dropout_shared_a_task": dict(num_experts=3, router="task", share_lora_a=True, lora_dropout=0.3),
    "jitter": dict(num_experts=4, top_k=2, router_jitter_noise=0.2),
    "jitter_shared_a": dict(num_experts=4, top_k=2, share_lora_a=True, router_jitter_noise=0.2),
    "jitter_lora_dropout": dict(num_experts=4, top_k=2, router_jitter_noise=0.2, lora_dropout=0.3),
    "dora": dict(num_experts=1, use_dora=True),  # the fused op, then the magnitude (and its gradient)
}
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _layer(kind, base=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = base if base is not None else nn.Linear(40, 24)
    layer = MoELoRALinear(base.to(DEVICE, dtype), r=8, lora_alpha=16, init_lora_weights=False, **KINDS[kind])
    if dtype == torch.float64:  # the router's weight too (float32 by default)
        layer.double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("router"):
                p.mul_(4)  # decisive routing: float64 and fp32 choose the same experts
            if name == "lora_gamma":
                p.copy_(torch.randn_like(p))
    layer.base_layer.requires_grad_(False)
    return layer


def _task_ids(layer, lead):
    if layer.router_mode == "task":
        layer.task_ids = torch.randint(0, layer.num_experts, (lead[0],), device=DEVICE,
                                       generator=torch.Generator(device=DEVICE).manual_seed(3))


def _run(layer, x, backend, seed=1, aux_weight=10):
    """(y, aux or None, grads by name) of one training step with a random output gradient (and the aux
    loss times ``aux_weight`` in the loss unless that is 0)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)  # the same dropout / jitter / threshold draws on both backends
    with moelora.use_backend(backend):
        y = layer(x)
        aux = layer.last_aux_loss
        gen = torch.Generator(device=DEVICE).manual_seed(2)
        loss = (y.double() * torch.randn(y.shape, device=DEVICE, generator=gen, dtype=torch.float64)).sum()
        if aux is not None and aux_weight:
            loss = loss + aux_weight * aux.double()
        loss.backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}
    return y, aux, grads


def _compare(kind, dtype=torch.float32, base=None, lead=(3, 7), train=True, reference_dtype=torch.float64,
             aux_loss_mask=None, aux_weight=10):
    """The layer on the Triton backend against a copy on the PyTorch backend, converted to
    ``reference_dtype`` (None: the layer's own dtypes); ``aux_loss_mask``: set on both."""
    layer = _layer(kind, base, dtype).train(train)
    if aux_loss_mask is not None:
        moelora.set_aux_loss_mask(layer, aux_loss_mask)
    reference = copy.deepcopy(layer)
    if reference_dtype is not None:
        reference = reference.to(reference_dtype)
    x = torch.randn(*lead, layer.in_features, device=DEVICE).to(dtype)
    _task_ids(layer, lead)
    reference.task_ids = layer.task_ids
    y, aux, grads = _run(layer, x, "triton", aux_weight=aux_weight)
    y_ref, aux_ref, grads_ref = _run(reference, x.to(reference_dtype or dtype), "torch", aux_weight=aux_weight)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (*lead, layer.out_features)
    assert rel_err(y, y_ref) < tol, f"output rel err {rel_err(y, y_ref)}"
    assert (aux is None) == (aux_ref is None)
    if aux is not None:
        assert rel_err(aux, aux_ref) < tol
    assert set(grads) == set(grads_ref)
    for name, g in grads.items():
        assert g is not None and grads_ref[name] is not None, name
        assert rel_err(g, grads_ref[name]) < tol, f"grad {name} rel err {rel_err(g, grads_ref[name])}"
    return layer, grads


@pytest.fixture(params=["dense", "grouped"])
def regime(request, monkeypatch):
    """The fused op's regime (moelora.moe_lora's): "grouped", which large E*r calls for, is forced
    on the small test layers by a dense width of 0, and the test fails unless it ran."""
    if request.param == "dense":
        yield "dense"
        return
    monkeypatch.setattr(moe_lora_module, "DENSE_MAX_WIDTH", 0)
    calls = []
    expand = fused_linear._grouped_expand
    monkeypatch.setattr(fused_linear, "_grouped_expand", lambda *a: calls.append(1) or expand(*a))
    yield "grouped"
    assert calls, "the fused op's grouped regime did not run"


@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_layer_matches_float64_reference(kind, regime):
    # Every draw is dtype-free: LoRA dropout's keep mask is a bool tensor, A-dropout, jitter and
    # threshold routing draw in fp32 whatever the dtype; so the float64 copy draws the same.
    _compare(kind)


@pytest.mark.parametrize("kind", ["softmax_topk", "softmax_plain", "topk_softmax", "threshold", "threshold_ramp",
                                  "per_expert_k1", "shared_a_mosld", "lora_dropout", "jitter"])
def test_fused_layer_with_an_aux_loss_mask_matches_float64_reference(kind, regime):
    """The masked aux loss inside the fused op (its counts and loss in the forward, its closed-form
    logits gradient added to the routing's in the backward) against the PyTorch backend's
    (autograd through moelora.ops.losses.masked_aux_losses) in float64: loss and every gradient."""
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(5)) > 0.3
    layer, grads = _compare(kind, aux_loss_mask=mask)
    if layer.router is not None:
        assert layer.last_router_stats["load"].sum() == layer.top_k or kind.startswith("threshold")


@pytest.mark.parametrize("kind", ["softmax_topk", "threshold"])
def test_loss_without_the_aux_loss_under_an_aux_loss_mask_matches_float64_reference(kind, regime):
    """An aux-loss mask set but the aux loss left out of the loss: the gradients are y's alone (the
    masked aux loss's gradient is added only when the aux loss has one)."""
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(5)) > 0.3
    _compare(kind, aux_loss_mask=mask, aux_weight=0)


@pytest.mark.parametrize("masked", [False, True], ids=["all_tokens", "aux_loss_mask"])
@pytest.mark.parametrize("kind", ["softmax_topk", "topk_softmax", "threshold"])
def test_float64_layer_keeps_float64_precision_in_its_aux_loss(kind, masked, regime):
    """A float64 layer on the Triton backend (LoRA scale 2): output, aux loss and every gradient
    (x, A, B, the router weight) to float64's precision. The aux-loss kernels (the gated expand's,
    router_aux_loss, the masked loss's and the router gradients') took 1/T and the coefficients
    as Triton's float arguments, float32 on a GPU (float_args_as_float32): the aux loss and the
    router's and x's gradients were only float32-accurate (relative errors ~1e-7)."""
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(5)) > 0.3 if masked else None
    with float_args_as_float32():
        _compare(kind, dtype=torch.float64, aux_loss_mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_aux_loss_mask_over_half_precision_logits_is_taken_in_fp32(dtype, regime):
    """Half-precision router logits given to the op (RouterSpec.logits) with an aux-loss mask: the
    masked loss kernel sums in fp32 and returns fp32 (as the unmasked loss and the torch backend).
    It used to accumulate in the logits' dtype: a bf16 loss of inf, an fp16 one rounded."""
    T, d_in, d_out, r, E, k = 9, 6, 5, 3, 4, 2
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE, dtype)  # noqa: E731
    x, weight, lora_a, lora_b = rand(T, d_in), rand(d_out, d_in), rand(r, d_in), rand(E, d_out, r)
    logits = rand(T, E).requires_grad_()
    mask = (torch.rand(T, generator=gen) > 0.3).to(DEVICE)
    spec = fused_linear.RouterSpec(None, logits, "softmax_topk", k, lb_coef=0.3, z_coef=0.05, aux_mask=mask)
    outs = {}
    for backend in ("triton", "torch"):
        _, out = fused_linear.moe_lora_linear(x, weight, None, lora_a, lora_b, scaling=0.5, router=spec,
                                              backend=backend)
        outs[backend] = (out.aux_loss, out.aux_stats, torch.autograd.grad(out.aux_loss, logits)[0])
    (loss, stats, grad), (loss_ref, stats_ref, grad_ref) = outs["triton"], outs["torch"]
    assert loss.dtype == stats.dtype == torch.float32
    assert rel_err(loss, loss_ref) < 1e-5 and rel_err(stats, stats_ref) < 1e-5
    assert rel_err(grad.float(), grad_ref.float()) < 1e-2  # the gradient is rounded to the logits' dtype


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["softmax_topk", "threshold"])
def test_aux_loss_mask_leaves_the_padding_out_of_the_returned_counts(mode, backend):
    """With an aux-loss mask the routing the op returns counts the real tokens' slots per expert (threshold routing:
    the kept ones), as its aux loss does: the layers record these counts as the experts' load. The torch backend
    returned the counts over every token."""
    T, d_in, d_out, r, E, k = 11, 6, 5, 3, 4, 2
    gen = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    x, weight, lora_a, lora_b, logits = rand(T, d_in), rand(d_out, d_in), rand(r, d_in), rand(E, d_out, r), rand(T, E)
    mask = torch.tensor([True, False] * 5 + [True], device=DEVICE)
    spec = fused_linear.RouterSpec(None, logits, mode, k, eps_start=0.3, eps_end=0.3, aux_mask=mask)
    _, out = fused_linear.moe_lora_linear(x, weight, None, lora_a, lora_b, scaling=0.5, router=spec, backend=backend)
    kept = out.routing.weights != 0 if mode == "threshold" else torch.ones_like(out.routing.ids, dtype=torch.bool)
    real = out.routing.ids[mask[:, None].expand_as(kept) & kept]
    assert out.routing.counts.tolist() == torch.bincount(real, minlength=E).tolist()


@pytest.mark.parametrize("kind", ["softmax_topk", "threshold", "per_expert_k1", "task_shared", "lora_dropout"])
def test_fused_layer_with_grouped_mm_rows_matches_float64_reference(kind, monkeypatch, grouped_mm_rows):
    """The grouped regime with its forward rows on torch's grouped_mm (moe_lora.ROWS_ENGINES; on a
    CPU torch's reference loop): every router mode's gates reach combine_rows."""
    monkeypatch.setattr(moe_lora_module, "DENSE_MAX_WIDTH", 0)
    _compare(kind)
    assert grouped_mm_rows, "the grouped_mm engine did not run"


@pytest.mark.parametrize("num_experts,rank,top_k", [(256, 2, 2), (300, 8, 4)], ids=["dense-E256", "grouped-E300"])
def test_many_experts(num_experts, rank, top_k):
    """Hundreds of experts (the router's columns tiled over programs, the router gradient's
    tokens per program shrinking with E): output, aux loss and every gradient as float64."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(40, 24).to(DEVICE), r=rank, lora_alpha=16, init_lora_weights=False,
                          num_experts=num_experts, top_k=top_k)
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        layer.router.weight.mul_(4)
    reference = copy.deepcopy(layer).double()
    x = torch.randn(3, 7, 40, device=DEVICE)
    y, aux, grads = _run(layer, x, "triton")
    y_ref, aux_ref, grads_ref = _run(reference, x.double(), "torch")
    assert rel_err(y, y_ref) < 2e-5 and rel_err(aux, aux_ref) < 2e-5
    for name, g in grads.items():
        assert rel_err(g, grads_ref[name]) < 2e-5, name


@pytest.mark.parametrize("kind", ["softmax_topk", "threshold", "task_shared"])
def test_fused_layer_eval_mode(kind, regime):
    _compare(kind, train=False)


@pytest.mark.parametrize("kind", ["softmax_topk", "per_expert_k1", "task_shared"])
def test_half_precision_base_with_fp32_adapters(kind, regime):
    """The default over a half-precision base: fp32 adapters, read as they are and rounded to
    fp16 in registers by every kernel that reads A or B (no cast kernels), all gradients."""
    layer, _ = _compare(kind, dtype=torch.float16)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_router_weight_gives_unrounded_logits(dtype, backend):
    """A router weight in half precision (a model cast whole, ``model.half()``) and x in it: the
    logits are x W^T in fp32 on both backends, so the routing is the fp32 router's. Before, the
    torch backend rounded them to the half dtype: 1 + eps/2 became 1, and the near-tie below
    a tie that chose expert 0."""
    if backend == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("the Triton interpreter's bfloat16 is not the GPU's")
    half_eps = torch.finfo(dtype).eps / 2  # 1 + half_eps is a tie with 1 in dtype, not in fp32
    x = torch.ones(1, 2, device=DEVICE, dtype=dtype)
    router_weight = torch.tensor([[1.0, 0.0], [1.0, half_eps]], device=DEVICE, dtype=dtype)
    weight, lora_a, lora_b = (torch.zeros(3, 2, device=DEVICE, dtype=dtype), torch.zeros(4, 2, device=DEVICE),
                              torch.zeros(2, 3, 4, device=DEVICE))
    _, out = fused_linear.moe_lora_linear(x, weight, None, lora_a, lora_b, scaling=1.0, backend=backend,
                                          router=fused_linear.RouterSpec(router_weight, None, "softmax_topk", 1))
    assert torch.equal(out.routing.logits, torch.tensor([[1.0, 1.0 + half_eps]], device=DEVICE))
    assert out.routing.ids.item() == 1


def test_conv1d_base_and_trainable_base_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    _compare("softmax_topk", base=Conv1D(24, 40))
    layer = _layer("shared_a_mosld").train()
    layer.base_layer.requires_grad_(True)  # a user unfreezing the base gets its gradients too
    reference = copy.deepcopy(layer).double()
    x = torch.randn(9, 40, device=DEVICE)
    _, _, grads = _run(layer, x, "triton")
    _, _, grads_ref = _run(reference, x.double(), "torch")
    for name in ("base_layer.weight", "base_layer.bias", "lora_A", "router.weight"):
        assert rel_err(grads[name], grads_ref[name]) < TOL[torch.float32], name


@pytest.mark.parametrize("trainable", ["weight", "bias", "weight_without_bias"])
def test_base_weight_or_bias_trainable_alone_gets_its_gradient(trainable, regime):
    """A base layer with only its weight (or only its bias) unfrozen: that one gets the float64
    reference's gradient and the frozen one none (the op computes each on its own request)."""
    base = nn.Linear(40, 24, bias=trainable != "weight_without_bias")
    layer = _layer("softmax_topk", base=base).train()
    getattr(layer.base_layer, "bias" if trainable == "bias" else "weight").requires_grad_(True)
    reference = copy.deepcopy(layer).double()
    x = torch.randn(2, 5, 40, device=DEVICE)
    _, _, grads = _run(layer, x, "triton")
    _, _, grads_ref = _run(reference, x.double(), "torch")
    name = "base_layer.bias" if trainable == "bias" else "base_layer.weight"
    assert set(grads) == set(grads_ref) == {"x", "lora_A", "lora_B", "router.weight", name}
    for n, g in grads.items():
        assert rel_err(g, grads_ref[n]) < TOL[torch.float32], n
    frozen = layer.base_layer.weight if trainable == "bias" else layer.base_layer.bias
    assert frozen is None or frozen.grad is None


@pytest.mark.parametrize("kind", ["task", "task_shared"])
def test_task_ids_out_of_range_with_validation_off_add_no_adapter_and_no_gradient(kind, regime):
    """With validation off a task id outside [0, E) adds no adapter (the README's contract): output
    and gradients (lora_gamma's too) are the float64 reference's, which leaves such a token's adapter
    out, even where the op's uninitialised memory (torch.empty, poisoned with NaN here) holds garbage:
    the token's routing-weight gradient is 0, never read from memory nothing wrote."""
    layer = _layer(kind).train()
    layer.task_ids = torch.tensor([0, 7, 2, 1, 3], device=DEVICE)  # E = 3: ids 7 and 3 are out of range
    reference = copy.deepcopy(layer).double()
    reference.task_ids = layer.task_ids
    x = torch.randn(5, 40, device=DEVICE)
    with moelora.validation(False):
        y_ref, _, grads_ref = _run(reference, x.double(), "torch")
        with empty_filled_with_nan():
            y, _, grads = _run(layer, x, "triton")
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert set(grads) == set(grads_ref) and "lora_gamma" in grads
    for name, g in grads.items():
        assert torch.isfinite(g).all() and rel_err(g, grads_ref[name]) < TOL[torch.float32], name
    if kind == "task":  # no adapter on the out-of-range tokens (no shared one either): their rows are the base layer's
        torch.testing.assert_close(y[[1, 4]], layer.base_layer(x)[[1, 4]])


def test_static_ids_out_of_range_with_validation_off_add_no_adapter_on_the_torch_backend_without_grad():
    """Without a gradient, at few tokens, the torch backend runs its gathered form, which indexes the
    experts' matrices by the ids: only for ids known to lie in [0, E). Given ids with validation off
    are not: the out-of-range ones add no adapter, as with a gradient (float64 reference)."""
    torch.manual_seed(0)
    x, weight = torch.randn(4, 16, device=DEVICE), torch.randn(24, 16, device=DEVICE)
    bias = torch.randn(24, device=DEVICE)
    lora_a, lora_b = torch.randn(4, 16, device=DEVICE), torch.randn(3, 24, 4, device=DEVICE)
    ids, weights = torch.tensor([[0], [7], [2], [-1]], device=DEVICE), torch.rand(4, 1, device=DEVICE)
    with moelora.validation(False), torch.no_grad():
        y, _ = fused_linear.moe_lora_linear(x, weight, bias, lora_a, lora_b, scaling=0.5, topk_ids=ids,
                                            topk_weights=weights, backend="torch")
    x64, a64, b64 = x.double(), lora_a.double(), lora_b.double()
    y_ref = x64 @ weight.double().t() + bias.double()
    for t in (0, 2):
        y_ref[t] += 0.5 * weights[t, 0].double() * (b64[ids[t, 0]] @ (a64 @ x64[t]))
    assert rel_err(y, y_ref) < TOL[torch.float32]


def test_experts_without_tokens_get_exact_zero_gradients(regime):
    layer = _layer("per_expert_k1")
    with torch.no_grad():
        layer.router.weight[3] = -50.0  # expert 3 never wins on positive inputs
    x = torch.randn(20, 40, device=DEVICE).abs()
    with moelora.use_backend("triton"):
        layer(x).sum().backward()
    assert torch.equal(layer.lora_B.grad[3], torch.zeros_like(layer.lora_B.grad[3]))
    assert torch.equal(layer.lora_A.grad[3], torch.zeros_like(layer.lora_A.grad[3]))
    assert layer.lora_B.grad[[0, 1, 2, 4]].abs().sum() > 0


@pytest.mark.parametrize("eps, train", [(0.0, False), (0.3, False), (0.3, True), (0.9, False), (0.9, True)],
                         ids=["eps0", "eval", "train", "eval_eps_above_best", "train_eps_above_best"])
def test_float64_threshold_routing_keeps_float64_precision(eps, train, regime):
    """Threshold routing of float64 logits: its kept, renormalised weights (the threshold_weights
    kernel) and the output are float64-accurate. The kernel used to compute them in fp32 whatever
    the probabilities' dtype (relative errors of 1e-8 in the weights, the output and every gradient).
    eps 0.9 is above most tokens' best renormalised probability (at least 1/3 of 3 slots, so eps 0.3
    never is): the best slot must be kept anyway, as the PyTorch twin keeps it."""
    T, d_in, d_out, r, E, k = 9, 6, 5, 3, 4, 3
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    x, weight, lora_a, lora_b, logits = rand(T, d_in), rand(d_out, d_in), rand(r, d_in), rand(E, d_out, r), rand(T, E)
    noise = torch.rand(T, k, generator=gen).to(DEVICE) if train else None
    spec = fused_linear.RouterSpec(None, logits, "threshold", k, True, eps, eps, 0, None, noise)
    outs = {backend: fused_linear.moe_lora_linear(x, weight, None, lora_a, lora_b, scaling=0.5, router=spec,
                                                  backend=backend) for backend in ("triton", "torch")}
    (y, out), (y_ref, out_ref) = outs["triton"], outs["torch"]
    assert out.routing.weights.dtype == torch.float64
    assert rel_err(out.routing.weights, out_ref.routing.weights) < 1e-12
    assert rel_err(y, y_ref) < 1e-12


@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
@pytest.mark.parametrize("routing", ["static", "router_jitter_dropout", "logits_threshold"])
def test_gradcheck_float64(routing, shared_a, regime):
    """The fused op's hand-written backward by finite differences in float64, through y and the aux
    loss, w.r.t. every differentiable input: x, the base weight and bias, A, B and the static
    weights, the router weight (LoRA dropout and router jitter on) or the precomputed logits
    (threshold routing with its draws). The routing is decisive: no step crosses a choice."""
    T, d_in, d_out, r, E, k = 6, 5, 4, 2, 3, 2
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    ids = torch.rand(T, E, generator=gen).argsort(1)[:, :k].to(DEVICE)
    mask, jitter = (torch.rand(T, d_in, generator=gen) > 0.3).to(DEVICE), 0.9 + 0.2 * rand(T, d_in).sigmoid()
    noise = torch.rand(T, k, generator=gen).to(DEVICE)
    route = {"static": 0.1 + rand(T, k).abs(), "router_jitter_dropout": 3 * rand(E, d_in),
             "logits_threshold": 3 * rand(T, E)}

    def fn(x, weight, bias, lora_a, lora_b, routing_input):
        kwargs = dict(scaling=0.7, backend="triton")
        if routing == "static":
            kwargs.update(topk_ids=ids, topk_weights=routing_input)
        elif routing == "router_jitter_dropout":
            kwargs.update(router=fused_linear.RouterSpec(routing_input, None, "softmax_topk", k, jitter=jitter),
                          dropout_mask=mask, dropout_scale=1 / 0.7)
        else:
            kwargs.update(router=fused_linear.RouterSpec(None, routing_input, "threshold", k, eps_end=0.2, noise=noise))
        y, out = fused_linear.moe_lora_linear(x, weight, bias, lora_a, lora_b, **kwargs)
        return y if out.aux_loss is None else (y, out.aux_loss)

    lora_a = rand(r, d_in) if shared_a else rand(E, r, d_in)
    inputs = [t.requires_grad_() for t in (rand(T, d_in), rand(d_out, d_in), rand(d_out), lora_a, rand(E, d_out, r),
                                           route[routing])]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("kind", ["softmax_topk", "threshold", "jitter_lora_dropout"])
def test_aux_loss_alone_gives_the_gradients_pytorch_gives(kind, regime):
    """A loss of the aux loss only: the router weight and x get their gradients, and the LoRA
    weights and the base layer get None, as on the PyTorch backend (zeros would let an
    optimiser's weight decay and momentum move them)."""
    layer = _layer(kind).train()
    layer.base_layer.requires_grad_(True)
    reference = copy.deepcopy(layer).double()
    x = torch.randn(3, 7, layer.in_features, device=DEVICE)
    grads = {}
    for name, module, backend, dtype in [("triton", layer, "triton", torch.float32),
                                         ("torch", reference, "torch", torch.float64)]:
        xi = x.to(dtype).detach().requires_grad_()
        torch.manual_seed(1)
        with moelora.use_backend(backend):
            module(xi)
            module.last_aux_loss.backward()
        grads[name] = {"x": xi.grad, **{n: p.grad for n, p in module.named_parameters()}}
    for name, g_ref in grads["torch"].items():
        g = grads["triton"][name]
        assert (g is None) == (g_ref is None), name
        if g is not None:
            assert rel_err(g, g_ref) < TOL[torch.float32], f"grad {name} rel err {rel_err(g, g_ref)}"
    assert grads["triton"]["router.weight"] is not None and grads["triton"]["lora_B"] is None


@pytest.mark.parametrize("shared_a", [True, False])
def test_nonfinite_weights_of_an_unchosen_expert_stay_out(shared_a, regime):
    layer = _layer("shared_a_mosld" if shared_a else "per_expert_k1").eval()
    E = layer.num_experts
    with torch.no_grad():
        layer.router.weight[E - 1] = -1e4  # never chosen on positive inputs...
        layer.lora_B[E - 1, 3, 0] = float("nan")  # ...whatever it holds
        layer.lora_B[E - 1, 5, 1] = float("inf")
        if not shared_a:
            layer.lora_A[E - 1, 2, 4] = float("nan")
    x = torch.rand(16, 40, device=DEVICE, requires_grad=True)  # dx's GEMM reads A too
    with moelora.use_backend("triton"):
        y = layer(x)
        y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_bitwise_repeats(regime):
    layer = _layer("threshold").eval()
    x = torch.randn(33, 40, device=DEVICE)
    runs = [_run(layer, x, "triton") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    for name in runs[0][2]:
        assert torch.equal(runs[0][2][name], runs[1][2][name]), name


def _saved_activations(**settings):
    """(layer, x, y, the activations one fp16 training forward of the fused layer saves: tensors
    other than x and the parameters, one per storage)."""
    layer = MoELoRALinear(nn.Linear(64, 96).to(DEVICE).half(), num_experts=8, top_k=2, r=16, share_lora_a=True,
                          **settings).train()
    layer.base_layer.requires_grad_(False)
    x = torch.randn(50, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
    saved = []
    with moelora.use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    storages = {t.untyped_storage().data_ptr(): t for t in saved}
    return layer, x, y, [t for ptr, t in storages.items() if ptr not in params and t.dim() > 0 and t.numel() > 0]


@pytest.mark.parametrize("kind", ["softmax_topk", "task"])
def test_output_of_leading_dims_takes_in_place_ops(kind, regime):
    """The layer's output for x [..., d_in] may be modified in place (F.relu_, +=), as nn.Linear's:
    autograd refuses that on a view made inside an autograd.Function (the fused op's
    y.view(out_shape) was one). The gradients are those of the out-of-place ops."""
    layer = _layer(kind).train()
    x = torch.randn(3, 7, layer.in_features, device=DEVICE)
    _task_ids(layer, x.shape[:-1])

    def grads(in_place):
        layer.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        with moelora.use_backend("triton"):
            y = layer(xi)
            y = torch.relu_(y.add_(0.5)) if in_place else torch.relu(y + 0.5)
            loss = (y * y.detach().cos()).sum()
            if layer.last_aux_loss is not None:
                loss = loss + layer.last_aux_loss
            loss.backward()
        return [xi.grad] + [p.grad for p in layer.parameters() if p.requires_grad]

    for g, expected in zip(grads(True), grads(False)):
        assert torch.equal(g, expected)


def test_saved_activations_are_x_h_and_the_routing(regime):
    """Saved for backward: x (once), h [T, r], the routing (logits, ids, weights, counts) and the
    adapters rounded to x's dtype; nothing T x d_out."""
    layer, x, y, activations = _saved_activations()
    T, E, r, k = 50, 8, 16, 2
    allowed = T * r * 4 + T * E * 4 + T * k * (4 + 4) + E * 8  # h, logits (fp32), ids + weights, counts
    adapters = sum(p.numel() * 2 for p in (layer.lora_A, layer.lora_B, layer.router.weight))  # fp16 copies
    assert sum(t.numel() * t.element_size() for t in activations) <= allowed + adapters
    assert all(t.shape[-1] != 96 or t.dim() != 2 or t.shape[0] != T for t in activations)  # nothing T x d_out


def test_lora_dropout_saves_its_keep_mask_not_the_dropped_input(regime):
    """With LoRA dropout the kernels read the bool keep mask beside x: saved for backward are x,
    the mask (1 byte per element of x), h and the routing; no dropped-out copy of x."""
    layer, x, y, activations = _saved_activations(lora_dropout=0.25)
    masks = [t for t in activations if t.dtype == torch.bool]
    assert len(masks) == 1 and masks[0].shape == x.shape and 0.6 < masks[0].float().mean() < 0.9
    assert not any(t.shape == x.shape and t.is_floating_point() for t in activations)  # no x_lora


def test_router_jitter_saves_its_factors_not_the_jittered_input(regime):
    """With router jitter the kernels read the factors J beside x: saved for backward are x, J
    (fp32, x's shape: the draws' own dtype), h and the routing; no jittered copy of x."""
    layer, x, y, activations = _saved_activations(router_jitter_noise=0.1)
    shaped = [t for t in activations if t.shape == x.shape]
    assert len(shaped) == 1 and shaped[0].dtype == torch.float32 and (shaped[0] - 1).abs().max() <= 0.1


def test_no_host_synchronisation(regime):
    """With validation off nothing reads device memory on the host (CUDA graphs, torch.compile)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SyncCounter(TorchDispatchMode):
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_local_scalar_dense", "item", "nonzero", "equal"):
                SyncCounter.syncs += 1
            return func(*args, **(kwargs or {}))

    for kind in ("softmax_topk", "threshold_ramp", "task_shared"):
        layer = _layer(kind).train()
        _task_ids(layer, (4,))
        x = torch.randn(4, 40, device=DEVICE, requires_grad=True)
        with moelora.use_backend("triton"), moelora.validation(False), SyncCounter():
            y = layer(x)
            (y.sum() + (layer.last_aux_loss if layer.last_aux_loss is not None else 0)).backward()
        assert SyncCounter.syncs == 0, kind


def test_lora_dropout_mask_keeps_each_element_with_probability_one_minus_p():
    """lora_dropout_mask(x, p): no mask and scale 1 for p = 0 (the kernels skip it); a bool keep mask of
    x's shape keeping a fraction 1 - p, with scale 1 / (1 - p); an all-False mask and scale 0 for p = 1
    (not a division by zero)."""
    x = torch.empty(200, 3, 250, device=DEVICE)
    assert fused_linear.lora_dropout_mask(x, 0.0) == (None, 1.0)
    mask, scale = fused_linear.lora_dropout_mask(x, 1.0)
    assert mask.dtype == torch.bool and mask.shape == x.shape and not mask.any() and scale == 0.0
    torch.manual_seed(0)
    mask, scale = fused_linear.lora_dropout_mask(x, 0.3)
    assert mask.dtype == torch.bool and mask.shape == x.shape and scale == pytest.approx(1 / 0.7)
    # 150000 draws: the kept fraction's standard deviation is 0.0012
    assert abs(mask.float().mean().item() - 0.7) < 0.01


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    """No tokens: an empty output and x gradient, an aux loss of 0 (1/T guarded), undefined statistics refused."""
    layer = _layer("softmax_topk")
    x = torch.randn(0, 40, device=DEVICE, requires_grad=True)
    with moelora.use_backend(backend):
        y = layer(x)
        (y.sum() + layer.last_aux_loss).backward()
    assert y.shape == (0, 24) and x.grad.shape == (0, 40)
    assert layer.last_aux_loss.item() == 0
    with pytest.raises(ValueError, match="routed no tokens"):
        layer.last_router_stats["load"]
    assert moelora.router_stats(nn.Sequential(layer)) == {}  # undefined statistics are left out, not raised


def test_router_stats_from_the_fused_op():
    layer = _layer("softmax_topk")
    x = torch.randn(30, 40, device=DEVICE)
    with moelora.use_backend("triton"):
        layer(x)
    stats = moelora.router_stats(nn.Sequential(layer))["0"]
    routing = layer.router(x)
    load = torch.bincount(routing.ids.reshape(-1).long(), minlength=4).float() / 30
    torch.testing.assert_close(stats["load"], load)
    assert 0 < stats["entropy"] <= torch.log(torch.tensor(4.0))
    lb = moelora.load_balancing_loss(routing.probs, routing.ids, 4)
    torch.testing.assert_close(stats["load_balancing_loss"], lb, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["z_loss"], moelora.router_z_loss(routing.logits), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["softmax_topk", "threshold_ramp", "task_shared", "jitter", "lora_dropout",
                                  "aux_loss_mask"])
def test_custom_ops_opcheck(kind, regime):
    layer = _layer("softmax_topk" if kind == "aux_loss_mask" else kind).train()
    if kind == "aux_loss_mask":
        moelora.set_aux_loss_mask(layer, torch.tensor([1, 1, 0, 1, 0, 1]))
    _task_ids(layer, (6,))
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    router, ids, weights = layer._routing_inputs(x)
    mask, keep_scale = fused_linear.lora_dropout_mask(x, layer.lora_dropout.p if kind == "lora_dropout" else 0.0)
    args = fused_linear.op_args(x, layer.base_weight(), layer.base_layer.bias, layer.lora_A, layer.lora_B,
                                layer.scaling, router, ids, weights, mask, keep_scale, regime == "grouped")
    # The ops carry no autograd of their own (_TracedMoELoRALinearFn differentiates them under
    # torch.compile; the compile tests compare its gradients with eager): checked without grad.
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    with moelora.use_backend("triton"):
        torch.library.opcheck(fused_linear.moe_lora_linear_fwd.default, args)
        y, h, logits, ids, weights, counts, aux_loss, aux_stats, *layout = fused_linear.moe_lora_linear_fwd(*args)
        x, weight, _, lora_a, lora_b, router_weight, _, topk_weights, topk_ids = args[:9]
        static = router is None
        bwd_args = (torch.randn_like(y), None if static else torch.ones_like(aux_loss), x, weight, lora_a, lora_b,
                    router_weight, h, logits, topk_ids if static else ids, topk_weights if static else weights,
                    counts, args[11], args[12], args[13], layout, *args[14:16], args[17], *args[21:25],
                    [True, True, True, True, True, True])
        torch.library.opcheck(fused_linear.moe_lora_linear_bwd.default, bwd_args)


@pytest.mark.parametrize("routing", ["router_weight", "given_logits", "static"])
def test_custom_ops_opcheck_in_half_precision(routing, regime):
    """The ops' fakes in fp16, where the accumulator dtype (h, the router's logits and weights: fp32)
    differs from x's and given logits or static weights keep their own dtype (fp16); the backward's
    for every gradient requested alone too."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE, torch.float16)  # noqa: E731
    T, d_in, d_out, r, E, k = 6, 16, 8, 4, 4, 2
    x, weight, lora_a, lora_b = rand(T, d_in), rand(d_out, d_in), rand(r, d_in), rand(E, d_out, r)
    ids = torch.rand(T, E, generator=gen).argsort(1)[:, :k].to(DEVICE)
    router, topk_ids, topk_weights = None, None, None
    if routing == "static":
        topk_ids, topk_weights = ids, rand(T, k).abs() + 0.1
    else:
        router = fused_linear.RouterSpec(rand(E, d_in) if routing == "router_weight" else None,
                                         rand(T, E) if routing == "given_logits" else None, "softmax_topk", k)
    args = fused_linear.op_args(x, weight, rand(d_out), lora_a, lora_b, 0.5, router, topk_ids, topk_weights, None,
                                1.0, regime == "grouped")
    with moelora.use_backend("triton"):
        torch.library.opcheck(fused_linear.moe_lora_linear_fwd.default, args)
        y, h, logits, ids_out, weights, counts, aux_loss, aux_stats, *layout = fused_linear.moe_lora_linear_fwd(*args)
        assert h.dtype == torch.float32
        static = router is None
        if routing == "given_logits":
            assert weights.dtype == torch.float32  # the routing's, from fp16 logits
            logits = router.logits
        bwd_args = (torch.randn_like(y), None if static else torch.ones_like(aux_loss), x, weight, lora_a, lora_b,
                    args[5], h, logits, topk_ids if static else ids_out, topk_weights if static else weights, counts,
                    None, None, None, layout, *args[14:16], args[17], *args[21:25], [True] * 6)
        torch.library.opcheck(fused_linear.moe_lora_linear_bwd.default, bwd_args)
        # each gradient requested alone, and none: the fake's placeholders and gradients are the real op's
        for needs in ([False] * 6, *([i == j for j in range(6)] for i in range(6))):
            torch.library.opcheck(fused_linear.moe_lora_linear_bwd.default, (*bwd_args[:-1], needs),
                                  test_utils="test_faketensor")


@pytest.mark.parametrize("kind", ["softmax_topk", "threshold_ramp", "task_shared"])
def test_torch_compile_fullgraph_trains_like_eager(kind, regime):
    layer = _layer(kind).train()
    _task_ids(layer, (5,))
    eager_layer = copy.deepcopy(layer)
    x = torch.randn(5, 40, device=DEVICE)

    def loss_fn(m, x):
        y = m(x)
        aux = m.last_aux_loss
        return y.square().mean() + (aux if aux is not None else 0)

    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    with moelora.use_backend("triton"):
        for _ in range(2):
            for m, fn in ((layer, compiled), (eager_layer, loss_fn)):
                m.zero_grad()
                torch.manual_seed(0)
                fn(m, x).backward()
                with torch.no_grad():
                    for p in m.parameters():
                        if p.grad is not None:
                            p -= 0.1 * p.grad
            moelora.step_routers(nn.Sequential(layer))
            moelora.step_routers(nn.Sequential(eager_layer))
    torch._dynamo.reset()
    assert counter.frame_count == 1
    for (name, p), q in zip(layer.named_parameters(), eager_layer.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("routing", ["jitter", "given_logits", "static"])
def test_compiled_op_on_3d_x_returns_what_eager_returns(routing):
    """moe_lora_linear under torch.compile (the custom ops) on x [2, 3, d_in]: y, the routing it returns
    and every gradient equal eager's: router jitter's factors (x's shape) are flattened with x, given
    logits come back as the routing's logits and static routing returns the given ids and weights
    (the ops return empty placeholders for the routing tensors that were their inputs)."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    d_in, d_out, r, E, k = 8, 6, 2, 4, 2
    x, weight, bias, lora_a, lora_b = rand(2, 3, d_in), rand(d_out, d_in), rand(d_out), rand(r, d_in), rand(E, d_out, r)
    route = {"jitter": 3 * rand(E, d_in), "given_logits": 3 * rand(6, E), "static": rand(6, k).abs() + 0.1}[routing]
    jitter = 0.6 + 0.8 * torch.rand(2, 3, d_in, generator=gen).to(DEVICE)
    ids = torch.rand(6, E, generator=gen).argsort(1)[:, :k].to(DEVICE)

    def fn(x, lora_a, lora_b, route):
        kwargs = dict(topk_ids=ids, topk_weights=route)
        if routing == "jitter":
            kwargs = dict(router=fused_linear.RouterSpec(route, None, "softmax_topk", k, jitter=jitter))
        elif routing == "given_logits":
            kwargs = dict(router=fused_linear.RouterSpec(None, route, "softmax_topk", k))
        y, out = fused_linear.moe_lora_linear(x, weight, bias, lora_a, lora_b, scaling=0.5, **kwargs)
        loss = (y * torch.arange(y.numel(), device=DEVICE).view(y.shape).sin()).sum()
        loss = loss + (out.aux_loss if out.aux_loss is not None else 0)
        return y, loss, out.routing.weights, out.routing.ids, out.routing.logits

    results = []
    torch._dynamo.reset()
    with moelora.use_backend("triton"):
        for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
            inputs = [t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b, route)]
            y, loss, weights, ids_out, logits = f(*inputs)
            loss.backward()
            results.append((y, weights, ids_out, logits, *(t.grad for t in inputs)))
    torch._dynamo.reset()
    (y, weights, ids_out, logits, *grads), (y_c, weights_c, ids_c, logits_c, *grads_c) = results
    assert y_c.shape == (2, 3, d_out)
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights_c, weights)
    assert torch.equal(ids_c, ids_out)
    if routing == "static":
        assert torch.equal(ids_c, ids) and logits is None and logits_c is None
        torch.testing.assert_close(weights_c, route)
    else:
        assert logits_c.shape == (6, E)
        torch.testing.assert_close(logits_c, logits, rtol=1e-5, atol=1e-5)
    if routing == "given_logits":
        assert torch.equal(logits_c, route)
    for name, g, g_c in zip(("x", "lora_a", "lora_b", "route"), grads, grads_c):
        assert g is not None and g_c is not None, name
        torch.testing.assert_close(g_c, g, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("trainable", ["weight", "bias"])
def test_compiled_op_with_only_the_base_weight_or_bias_trainable(trainable, regime):
    """Under torch.compile (the custom ops and their fakes) a base weight (or bias) requiring grad
    alone gets eager's gradient, the closed form c^T x (c.sum(0)) of the loss sum(c * y) in
    float64, and the other, frozen, none: the backward op's fake returns the real op's shape for
    the one requested and an empty placeholder for the other."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    T, d_in, d_out, r, E, k = 6, 8, 6, 2, 4, 2
    x, weight, bias = rand(T, d_in), rand(d_out, d_in), rand(d_out)
    lora_a, lora_b = rand(E, r, d_in), rand(E, d_out, r)
    router = fused_linear.RouterSpec(3 * rand(E, d_in), None, "softmax_topk", k)
    c = torch.arange(T * d_out, device=DEVICE).view(T, d_out).sin()

    def fn(weight, bias):
        y, _ = fused_linear.moe_lora_linear(x, weight, bias, lora_a, lora_b, scaling=0.5, router=router)
        return (y * c).sum()

    grads = []
    torch._dynamo.reset()
    with moelora.use_backend("triton"):
        for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
            w = weight.clone().requires_grad_(trainable == "weight")
            b = bias.clone().requires_grad_(trainable == "bias")
            f(w, b).backward()
            frozen, trained = (b, w) if trainable == "weight" else (w, b)
            assert frozen.grad is None and trained.grad is not None
            grads.append(trained.grad)
    torch._dynamo.reset()
    expected = c.double().t() @ x.double() if trainable == "weight" else c.double().sum(0)
    eager, compiled = grads
    assert compiled.shape == expected.shape and compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 kernels need a GPU")
@pytest.mark.parametrize("kind", ["softmax_topk", "threshold", "shared_a_mosld", "task_shared", "per_expert_k1",
                                  "dora"])
def test_bf16_on_gpu(kind, regime):
    """A bf16 base with the default fp32 adapters against the same layer on the PyTorch backend
    (which computes the LoRA branch in fp32): both route on fp32 logits of the same bf16 x."""
    _compare(kind, dtype=torch.bfloat16, lead=(4, 300), reference_dtype=None)
