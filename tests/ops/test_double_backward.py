"""Higher-order gradients (``create_graph=True``): the torch backend's ops are differentiable
twice and match a float64 autograd reference; a backward built of Triton kernels is not, and
raises instead of returning a gradient without its second-order terms (which
``once_differentiable`` would let ``torch.autograd.grad(..., inputs)`` do silently). The routing
op's backward switches to its differentiable PyTorch form there."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora
from conftest import DEVICE
from helpers import PATHS, run_path
from moelora.ops.losses import routing_aux_losses
from moelora.ops.reference import moe_lora_naive
from moelora.ops.routing_modes import route_logits

T, D, R, E, K = 6, 8, 2, 3, 2
F64 = dict(dtype=torch.float64, device=DEVICE)


def _penalty_grads(fn, leaves):
    """Gradients of sum(y) + |d sum(y^2) / d leaves[0]|^2 (a gradient penalty) w.r.t. the leaves."""
    leaves = [t.clone().requires_grad_() for t in leaves]
    y = fn(*leaves)
    g = torch.autograd.grad(y.pow(2).sum(), leaves[0], create_graph=True)[0]
    return torch.autograd.grad(y.sum() + g.pow(2).sum(), leaves)


def _routing():
    g = torch.Generator().manual_seed(0)
    ids = torch.rand(T, E, generator=g).argsort(1)[:, :K].to(DEVICE)
    return ids, torch.rand(T, K, generator=g, dtype=torch.float64).to(DEVICE)


def _assert_close(got, want):
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-10


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode,renorm", [("softmax_topk", False), ("softmax_topk", True), ("topk_softmax", False)])
def test_route_second_order_gradient_of_a_row_of_only_minus_inf_is_zero(path, mode, renorm):
    """A row of only -inf logits (ids 0..k-1, weights 0, lse -inf) gets zero gradient from the weights, prob_sums
    and lse, and zero second-order ones (a gradient penalty's, in the logits and in what scales the weights), not
    NaN (a 0 / 0 or log 0 whose gradient is 0 * inf); the other rows get what they get without that row."""
    logits, scale = torch.randn(T, E, **F64), torch.randn(T, K, **F64)
    logits[2] = float("-inf")
    rows = [0, 1, 3, 4, 5]

    def outputs(z, v, finite):
        r = moelora.route(z, K, mode=mode, renormalize=renorm)
        return torch.cat([(r.weights * v).flatten(), r.prob_sums, r.lse[finite]])

    with moelora.use_backend("torch"):
        got = run_path(path, _penalty_grads, lambda z, v: outputs(z, v, rows), [logits, scale])
        want = run_path(path, _penalty_grads, lambda z, v: outputs(z, v, slice(None)), [logits[rows], scale[rows]])
    assert torch.equal(got[0][2], torch.zeros(E, **F64)) and torch.equal(got[1][2], torch.zeros(K, **F64))
    _assert_close([got[0][rows], got[1][rows]], want)


def test_moe_lora_torch_backend_is_twice_differentiable():
    ids, w = _routing()
    leaves = [torch.randn(T, D, **F64), torch.randn(R, D, **F64), torch.randn(E, D, R, **F64), w]
    got = _penalty_grads(lambda x, a, b, w: moelora.moe_lora(x, a, b, ids, w, backend="torch"), leaves)
    _assert_close(got, _penalty_grads(lambda x, a, b, w: moe_lora_naive(x, a, b, ids, w), leaves))


@pytest.mark.parametrize("gated", [False, True])
def test_moe_ffn_torch_backend_is_twice_differentiable_without_a_deprecated_fallback(gated):
    """moe_ffn on the torch backend, differentiated twice (a gradient penalty), matches the float64 loop; its
    per-expert linear op's backward is differentiated through its PyTorch ops, with no warning: PyTorch's
    fallback for an op without a derivative of its own warned "may lead to silently incorrect behavior ...
    will be removed in a future version of PyTorch" on every call."""
    import warnings

    from helpers import moe_ffn_reference

    ids, w = _routing()
    f, bias = 5, (lambda *shape: torch.randn(*shape, **F64))
    leaves = [torch.randn(T, D, **F64), torch.randn(E, f, D, **F64), bias(E, f), torch.randn(E, D, f, **F64),
              bias(E, D), w] + ([torch.randn(E, f, D, **F64), bias(E, f)] if gated else [])

    def params(w_in, b_in, w_out, b_out, w_gate=None, b_gate=None):
        return dict(w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out, w_gate=w_gate, b_gate=b_gate)

    def op(x, w_in, b_in, w_out, b_out, topk_weights, *gate):
        return moelora.moe_ffn(x, ids, topk_weights, activation=torch.tanh, backend="torch",
                               **params(w_in, b_in, w_out, b_out, *gate))

    def reference(x, w_in, b_in, w_out, b_out, topk_weights, *gate):
        return moe_ffn_reference(x, ids, topk_weights, params(w_in, b_in, w_out, b_out, *gate), torch.tanh, False)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _penalty_grads(op, leaves)
    _assert_close(got, _penalty_grads(reference, leaves))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_route_is_twice_differentiable_on_both_backends(backend):
    logits = torch.randn(T, E, **F64)

    def reference(z):
        chosen = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices[:, :K]
        return z.softmax(-1).gather(1, chosen)

    with moelora.use_backend(backend):
        got = _penalty_grads(lambda z: moelora.route(z, K).weights, [logits])
    _assert_close(got, _penalty_grads(reference, [logits]))


def _moe_lora(x):
    ids, w = _routing()
    return moelora.moe_lora(x, torch.randn(R, D, **F64), torch.randn(E, D, R, **F64), ids, w, backend="triton")


def _moe_ffn(x):
    ids, w = _routing()
    return moelora.moe_ffn(x, ids, w, torch.randn(E, 5, D, **F64), None, torch.randn(E, D, 5, **F64), None, F.silu,
                           backend="triton")


def _layer(x):
    torch.manual_seed(0)
    layer = moelora.MoELoRALinear(nn.Linear(D, D), num_experts=E, top_k=K, r=R, init_lora_weights=False)
    with moelora.use_backend("triton"):
        return layer.to(**F64)(x) + 0 * moelora.aux_loss(layer)


@pytest.mark.parametrize("op, fn", [("moe_lora", _moe_lora), ("moe_ffn", _moe_ffn), ("MoELoRALinear", _layer)])
def test_triton_backward_refuses_create_graph(op, fn):
    x = torch.randn(T, D, **F64, requires_grad=True)
    y = fn(x)
    torch.autograd.grad(y.pow(2).sum(), x, retain_graph=True)  # first order: fine
    with pytest.raises(RuntimeError, match=f"{op}'s Triton backward is not differentiable .*backend='torch'"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True, retain_graph=True)
    # a constant incoming gradient too: d sum(y) / dx still depends on the weights
    with pytest.raises(RuntimeError, match=f"{op}'s Triton backward is not differentiable"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_router_and_aux_loss_backwards_refuse_create_graph():
    """The Router module's logits and the aux loss of its routing (kernels of their own where the
    Triton backend runs: routed modules outside the fused layer, e.g. MoEFFN)."""
    torch.manual_seed(0)
    router = moelora.Router(D, E, top_k=K).to(**F64)
    x = torch.randn(T, D, **F64, requires_grad=True)
    with moelora.use_backend("triton"):
        logits = router.logits(x)
        with pytest.raises(RuntimeError, match="the router's Triton backward is not differentiable"):
            torch.autograd.grad(logits.pow(2).sum(), x, create_graph=True)
        z = torch.randn(T, E, **F64, requires_grad=True)
        loss, _ = routing_aux_losses(route_logits(z, "softmax_topk", K), 0.01, 0.001)
        with pytest.raises(RuntimeError, match="the aux loss's Triton backward is not differentiable"):
            torch.autograd.grad(loss, z, create_graph=True)


def test_masked_aux_loss_is_twice_differentiable_on_the_torch_backend():
    """The masked aux loss on the torch backend (its closed-form backward in PyTorch ops) is
    differentiable twice, as the unmasked loss there, against autograd through the formula (a
    float64 reference: softmax and logsumexp of the real rows); its kernels refuse. It used to
    refuse on the torch backend too, saying to run on the torch backend."""
    from moelora.ops.losses import masked_aux_losses

    ids, w = _routing()
    mask = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    counts = torch.zeros(E, **F64).index_add_(0, ids[mask].reshape(-1), torch.ones(int(mask.sum()) * K, **F64))

    def reference(z):
        real = z[mask]
        lb = E * counts.dot(real.softmax(-1).sum(0)) / mask.sum() ** 2
        return 0.3 * lb + 0.05 * torch.logsumexp(real, -1).square().mean()

    logits = torch.randn(T, E, **F64)
    with moelora.use_backend("torch"):
        got = _penalty_grads(lambda z: masked_aux_losses(z, ids, w, mask, 0.3, 0.05)[0], [logits])
    _assert_close(got, _penalty_grads(reference, [logits]))
    z = logits.clone().requires_grad_()
    with moelora.use_backend("triton"):
        loss = masked_aux_losses(z, ids, w, mask, 0.3, 0.05)[0]
    with pytest.raises(RuntimeError, match="the masked aux loss's Triton backward is not differentiable"):
        torch.autograd.grad(loss, z, create_graph=True)


def test_fused_ops_torch_backend_with_an_aux_loss_mask_is_twice_differentiable_whatever_the_global_backend():
    """moe_lora_linear(..., backend="torch") with RouterSpec.aux_mask takes its masked aux loss in
    PyTorch ops, as its unmasked one, also where the global backend is "triton": against autograd
    through the float64 formula. Its masked loss used to take the kernels there, and refused
    create_graph=True, saying to run on backend=torch."""
    from moelora.ops.moe_lora_linear import RouterSpec, moe_lora_linear

    g = torch.Generator().manual_seed(1)
    x, rw = torch.randn(T, D, generator=g, **F64), torch.randn(E, D, generator=g, **F64)
    lora_a, lora_b = torch.randn(R, D, generator=g, **F64), torch.randn(E, 5, R, generator=g, **F64)
    weight = torch.randn(5, D, generator=g, **F64)
    mask = torch.tensor([True, False, True, True, False, True], device=DEVICE)

    def op(router_weight):
        spec = RouterSpec(router_weight, None, "softmax_topk", K, lb_coef=0.3, z_coef=0.05, aux_mask=mask)
        return moe_lora_linear(x, weight, None, lora_a, lora_b, scaling=1.0, router=spec,
                               backend="torch")[1].aux_loss

    def reference(router_weight):
        real = (x @ router_weight.t())[mask]
        slots = F.one_hot(real.detach().topk(K, -1).indices, E).sum(1).to(real.dtype)
        lb = E * slots.sum(0).dot(real.softmax(-1).sum(0)) / mask.sum() ** 2
        return 0.3 * lb + 0.05 * torch.logsumexp(real, -1).square().mean()

    with moelora.use_backend("triton"):
        got = _penalty_grads(op, [rw])
    _assert_close(got, _penalty_grads(reference, [rw]))
