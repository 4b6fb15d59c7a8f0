"""MoELoRALinear over base layers that are not a plain nn.Linear in a plain module: subclasses,
parametrized weights, strided weights, hooks, dtypes. The layer must compute base_layer(x) +
s * sum_j w_j B_e A x (the float64 reference below) on the fused path and on the composed one,
on both backends, or refuse what it cannot compute (merging a weight it cannot write)."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, parametrize

import moelora
from moelora import MoELoRALinear
from helpers import rel_err

D_IN, D_OUT = 12, 10


class ScaledLinear(nn.Linear):
    """A Linear subclass with a forward of its own (the composed path must run it)."""

    def forward(self, x):
        return 2.5 * super().forward(x)


class Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def _linear(bias=True):
    torch.manual_seed(1)
    return nn.Linear(D_IN, D_OUT, bias=bias)


def _layer(base, **extra):
    """Two experts, both routed (softmax_topk, top-2), so the reference's gates are softmax(x Wr^T)."""
    layer = MoELoRALinear(base, num_experts=2, top_k=2, r=3, lora_alpha=6, **extra)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _reference(layer, base64, x, dy):
    """float64 y = base64(x) + s * sum_e softmax(x Wr^T)_e B_e A_e x and the gradients of <y, dy>
    for x, A, B, the router weight and base64's trainable parameters."""
    x64 = x.detach().double().requires_grad_()
    a, b, wr = (t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.router.weight))
    gates = torch.softmax(x64 @ wr.t(), dim=-1)
    y = base64(x64) + layer.scaling * torch.einsum("...e,eor,eri,...i->...o", gates, b, a, x64)
    y.backward(dy.double())
    return y, {"x": x64.grad, "lora_A": a.grad, "lora_B": b.grad, "router": wr.grad,
               **{f"base.{n}": p.grad for n, p in base64.named_parameters() if p.requires_grad}}


def _assert_matches_reference(layer, base64, backend, dtype=torch.float32, tol=1e-5):
    x = torch.randn(2, 4, D_IN, dtype=dtype, requires_grad=True)
    with moelora.use_backend(backend):
        y = layer(x)
        dy = torch.randn_like(y)
        y.backward(dy)
    ref, ref_grads = _reference(layer, base64, x, dy)
    grads = {"x": x.grad, "lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad, "router": layer.router.weight.grad,
             **{f"base.{n}": p.grad for n, p in layer.base_layer.named_parameters() if p.requires_grad}}
    assert y.dtype == dtype
    assert rel_err(y, ref) < tol
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and rel_err(grad, ref_grads[name]) < tol, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_hooks_of_the_base_layer_run(backend):
    """The fused op never calls the base layer: a backward hook registered on it (a gradient monitor,
    after the layer was built) or a global module backward hook did not run. The layer runs the
    composed path then, and the hooks see the base output's gradient."""
    layer = _layer(_linear())
    seen = []
    handle = layer.base_layer.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0]))
    x = torch.randn(3, D_IN, requires_grad=True)
    with moelora.use_backend(backend):
        y = layer(x)
        dy = torch.randn_like(y)
        y.backward(dy)
    assert len(seen) == 1 and torch.equal(seen[0], dy)  # the base output's gradient is y's
    handle.remove()
    names = []
    handle = nn.modules.module.register_module_full_backward_pre_hook(
        lambda module, grad_out: names.append(type(module).__name__))
    try:
        with moelora.use_backend(backend):
            layer(x).sum().backward()
    finally:
        handle.remove()
    assert "Linear" in names


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_global_module_backward_hook_sees_the_base_layer(backend):
    """A global module full backward hook (not a pre-hook) also sends the layer down the composed path:
    the hook sees the base layer and the base output's gradient."""
    layer = _layer(_linear())
    seen = []
    handle = nn.modules.module.register_module_full_backward_hook(
        lambda module, grad_in, grad_out: seen.append((type(module).__name__, grad_out[0])))
    x = torch.randn(3, D_IN, requires_grad=True)
    try:
        with moelora.use_backend(backend):
            y = layer(x)
            dy = torch.randn_like(y)
            y.backward(dy)
    finally:
        handle.remove()
    linear = [g for name, g in seen if name == "Linear"]
    assert len(linear) == 1 and torch.equal(linear[0], dy)


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_global_module_forward_hooks_see_the_base_layer(kind):
    """A global module forward hook or pre-hook sends the layer down the composed path: the hook sees the base
    layer called on the layer's input."""
    layer = _layer(_linear())
    seen = []
    register = getattr(nn.modules.module, f"register_module_{kind}_hook")
    handle = register(lambda module, args, *out: seen.append((type(module).__name__, args[0])))
    x = torch.randn(3, D_IN)
    try:
        with moelora.use_backend("triton"):
            layer(x)
    finally:
        handle.remove()
    linear = [a for name, a in seen if name == "Linear"]
    assert len(linear) == 1 and torch.equal(linear[0], x)


def _frozen(module, *trainable):
    for name, p in module.named_parameters():
        p.requires_grad_(name in trainable)
    return module


def _transposed_weight():
    base = _linear()
    base.weight = nn.Parameter(torch.randn(D_IN, D_OUT).t())  # a non-contiguous [D_OUT, D_IN] view
    return base


def _strided_weight():
    base = _linear()
    base.weight = nn.Parameter(torch.randn(D_OUT, 2 * D_IN)[:, ::2])
    return base


def _custom_parametrization():
    base = _linear()
    parametrize.register_parametrization(base, "weight", Doubled())
    return base


def _scaled():
    torch.manual_seed(1)
    return _frozen(ScaledLinear(D_IN, D_OUT))


def _pre_hooked(base):  # registered after the layer was built
    base.register_forward_pre_hook(lambda module, args: (args[0] * 1.5,))


def _hooked(base):
    base.register_forward_hook(lambda module, args, out: out - 0.25)


# name: (base factory (the same base at each call), what is done to the base after the layer is built)
BASES = {
    "trainable": (_linear, None),
    "frozen_no_bias": (lambda: _frozen(_linear(bias=False)), None),
    "bias_only_trainable": (lambda: _frozen(_linear(), "bias"), None),
    "subclass_with_own_forward": (_scaled, None),
    "transposed_weight": (_transposed_weight, None),
    "strided_weight": (_strided_weight, None),
    "weight_norm": (lambda: parametrizations.weight_norm(_linear()), None),
    "custom_parametrization": (_custom_parametrization, None),
    "weight_norm_hook": (lambda: torch.nn.utils.weight_norm(_linear()), None),  # the deprecated pre-hook form
    "pre_hook_after": (lambda: _frozen(_linear()), _pre_hooked),
    "hook_after": (lambda: _frozen(_linear()), _hooked),
}


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", list(BASES))
def test_layer_over_base_matches_float64_reference(kind, backend):
    """Output and gradients (x, A, B, router, and the base layer's trainable parameters: the
    parametrization's originals for weight_norm) against base64(x) + s sum_e w_e B_e A_e x, with
    base64 the same base layer (its forward, parametrization and hooks) in float64."""
    make, after = BASES[kind]
    layer, base64 = _layer(make()), make().double()
    for base in (layer.base_layer, base64) if after else ():
        after(base)
    _assert_matches_reference(layer, base64, backend)


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "composed"])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("triton", torch.float16)])
def test_half_precision_base_with_fp32_adapters_matches_float64_reference(backend, dtype, hooked):
    """A half-precision base (its weight and bias rounded, as the reference's) with the default fp32
    adapters: the output in the base's dtype, within its rounding. (bfloat16 on the torch backend
    only: the Triton interpreter's bfloat16 is broken.) ``composed``: a forward hook on the base makes
    the layer run the composed path, which casts x and the base output to the adapters' dtype and back."""
    base = _frozen(_linear()).to(dtype)
    layer, base64 = _layer(base), copy.deepcopy(base).double()
    for b in (layer.base_layer, base64) if hooked else ():
        _hooked(b)
    assert layer.lora_A.dtype == torch.float32
    _assert_matches_reference(layer, base64, backend, dtype=dtype, tol=1e-2)


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("make", [
    lambda: parametrizations.weight_norm(_linear()),
    lambda: parametrizations.spectral_norm(_linear()).eval(),
    _custom_parametrization,
    lambda: torch.nn.utils.weight_norm(_linear()),
    lambda: torch.nn.utils.spectral_norm(_linear()).eval(),
], ids=["weight_norm", "spectral_norm", "custom_parametrization", "weight_norm_hook", "spectral_norm_hook"])
def test_merge_refuses_a_computed_weight(make, use_dora):
    """A parametrized weight (or one the deprecated weight_norm / spectral_norm pre-hook makes) is
    computed again on each call: merge wrote the delta into a temporary, and the merged layer then
    ran its base layer alone (the adapter silently gone). merge now refuses, changing nothing, and
    merge_adapter names the layer."""
    layer = MoELoRALinear(make(), num_experts=1, r=3, lora_alpha=6, use_dora=use_dora).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, D_IN)
    before = layer(x)
    with pytest.raises(ValueError, match="weight is computed from other tensors"):
        layer.merge()
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match="^0: cannot merge into"):
        moelora.merge_adapter(model)
    assert not layer.merged
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("name,match", [("weight", "weight is computed from other tensors"),
                                        ("bias", "it has forward hooks or pre-hooks")])
def test_merge_refuses_a_pruned_base_naming_prune_remove(name, match):
    """torch.nn.utils.prune's reparametrization (weight_orig * weight_mask, remade by a forward pre-hook): merge
    refused it, but the message named parametrizations and hook handles only; it names prune.remove, which
    makes the tensor a plain parameter again (and after which the layer merges)."""
    from torch.nn.utils import prune

    base = _linear()
    prune.random_unstructured(base, name, amount=0.5)
    layer = MoELoRALinear(base, num_experts=1, r=3, lora_alpha=6).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, D_IN)
    before = layer(x)
    with pytest.raises(ValueError, match=f"(?s){match}.*prune.remove\\(module, '{name}'\\)"):
        layer.merge()
    assert not layer.merged
    prune.remove(base, name)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_merge_into_a_weight_held_as_a_buffer():
    """A base layer holding its weight as a buffer (a frozen weight, not a parameter) is no computed weight: the
    layer merges into it and unmerges."""
    base = _linear()
    weight = base.weight.detach().clone()
    del base.weight
    base.register_buffer("weight", weight)
    layer = MoELoRALinear(base, num_experts=1, r=3, lora_alpha=6, init_lora_weights=False)
    x = torch.randn(3, D_IN)
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)


def test_merge_and_unmerge_of_a_half_base_round_once():
    """The merged half-precision weight is W + dW formed in fp32 and rounded once, not dW rounded to fp16 and
    added in fp16; unmerge subtracts dW from it in fp32 likewise."""
    base = _linear().half()
    before = base.weight.detach().clone()
    layer = MoELoRALinear(base, num_experts=1, r=3, lora_alpha=6, init_lora_weights=False)
    delta = layer.delta_weight().detach()
    layer.merge()
    merged = (before.float() + delta).half()
    assert torch.equal(layer.base_layer.weight, merged)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, (merged.float() - delta).half())


def test_merge_twice_and_unmerge_of_an_unmerged_layer_raise_and_change_no_weight():
    """A second merge would add the delta again and an unmerge of an unmerged layer would subtract it from the
    plain base weight: both raise before touching the weight (check_merge is what merge_adapter runs first)."""
    layer = MoELoRALinear(_linear(), num_experts=1, r=3, init_lora_weights=False)
    plain = layer.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="^the layer is not merged$"):
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, plain) and not layer.merged
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    assert not torch.equal(merged, plain)
    for call in (layer.check_merge, layer.merge):
        with pytest.raises(RuntimeError, match="already merged; unmerge it first"):
            call()
        assert torch.equal(layer.base_layer.weight, merged) and layer.merged


def test_a_merged_dora_layer_saves_no_merge_buffers_and_unmerge_frees_them():
    """What unmerge of a DoRA layer divides out and subtracts (a d_out scale and a d_out x d_in delta) is held in
    buffers while merged: left out of the state dict, and dropped by unmerge."""
    layer = MoELoRALinear(_linear(), num_experts=1, r=3, lora_alpha=6, use_dora=True, init_lora_weights=False)
    names = set(layer.state_dict())
    layer.merge()
    assert set(layer.state_dict()) == names
    assert sorted(n for n, _ in layer.named_buffers() if "dora" in n) == ["_dora_merge_scale", "_dora_merged_delta"]
    layer.unmerge()
    assert not [n for n, _ in layer.named_buffers() if "dora" in n]


def test_owned_by_moelora_reads_the_module_not_what_a_wrapper_forwards_to():
    """Only a module whose instance or class sets moelora_owned is moelora's: a wrapper that forwards unknown
    attributes to the module it wraps is not."""
    from moelora.modules.adapter_base import owned_by_moelora

    class Forwarding(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    owned = _linear()
    owned.moelora_owned = True
    assert owned_by_moelora(owned) and not owned_by_moelora(Forwarding(owned))


def test_merge_refuses_a_base_with_its_own_forward():
    """A Linear subclass whose forward is not x W^T + b (here it scales its output): the merged layer
    computed 2.5 (x (W + dW)^T + b), not 2.5 (x W^T + b) + dW x. merge refuses it; a subclass that
    keeps nn.Linear's forward (MultiheadAttention's NonDynamicallyQuantizableLinear) still merges."""
    layer = MoELoRALinear(_scaled(), num_experts=1, r=3, lora_alpha=6).eval()
    with pytest.raises(ValueError, match="ScaledLinear: it has a forward of its own"):
        layer.merge()
    assert not layer.merged
    torch.manual_seed(1)
    inherited = MoELoRALinear(nn.modules.linear.NonDynamicallyQuantizableLinear(D_IN, D_OUT), num_experts=1, r=3).eval()
    with torch.no_grad():
        inherited.lora_B.normal_()
    x = torch.randn(4, D_IN)
    expected = inherited(x)
    inherited.merge()
    torch.testing.assert_close(inherited(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_computed_weight_of_a_convolution():
    """The rule is every layer's (here a weight-normed convolution, as wav2vec2's positional one)."""
    torch.manual_seed(0)
    layer = moelora.MoELoRAConv(parametrizations.weight_norm(nn.Conv1d(4, 6, 3)), num_experts=1, r=2).eval()
    with pytest.raises(ValueError, match="weight is computed from other tensors"):
        layer.merge()
    assert not layer.merged


@pytest.mark.parametrize("make", [lambda: nn.LazyLinear(D_OUT), lambda: nn.LazyConv2d(4, 3)], ids=["linear", "conv"])
def test_uninitialised_lazy_base_is_refused(make):
    """An uninitialised lazy layer has no input size yet: the layer was built with d_in = 0 and failed
    later with an unrelated message (a field check, or torch's uninitialised-parameter error at
    injection). It is refused by name, and wraps once a forward has initialised it."""
    layer_class = MoELoRALinear if isinstance(make(), nn.Linear) else moelora.MoELoRAConv
    with pytest.raises(ValueError, match="cannot wrap an uninitialised Lazy.*run a forward pass"):
        layer_class(make(), num_experts=2, r=2)
    model = nn.Sequential(make(), nn.Linear(5, 5))
    for target in ("0", "1"):  # the lazy module or another one: freezing the lazy one would fail too
        with pytest.raises(ValueError, match=r"uninitialised lazy modules \(e.g. 0: Lazy.*run a forward pass"):
            moelora.get_moelora_model(model, moelora.MoELoRAConfig(target_modules=[target], num_experts=2, r=2))
        assert type(model[0]).__name__.startswith("Lazy") and type(model[1]) is nn.Linear  # left as it was
    base = make()
    base(torch.randn(1, 5) if isinstance(base, nn.Linear) else torch.randn(1, 3, 6, 6))
    layer_class(base, num_experts=2, r=2)


def _set_forward(base):  # a forward set on the instance, not by accelerate: it doubles the input
    plain_forward = base.forward
    base.forward = lambda inp: plain_forward(2 * inp)


def _conv():
    torch.manual_seed(1)
    return nn.Conv2d(3, 4, 3, padding=1)


@pytest.mark.parametrize("make,x_shape", [(_linear, (4, D_IN)), (_conv, (2, 3, 5, 5))], ids=["linear", "conv"])
@pytest.mark.parametrize("hook", [
    lambda base: base.register_forward_pre_hook(lambda module, args: (args[0] * 1.5,)),
    lambda base: base.register_forward_hook(lambda module, args, out: out * 2),
    _set_forward,
], ids=["pre_hook", "hook", "instance_forward"])
def test_merge_refuses_a_base_with_forward_hooks(make, x_shape, hook):
    """The unmerged layer adds its delta to the hooked base output (and reads the input the pre-hook
    did not change); merged, the delta passed through the hooks: merge silently changed the output
    (by up to 10 here). merge now refuses, changing nothing; without the hooks the base merges."""
    layer_class = MoELoRALinear if make is _linear else moelora.MoELoRAConv
    layer = layer_class(make(), num_experts=1, r=2, lora_alpha=4).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    plain = copy.deepcopy(layer)
    hook(layer.base_layer)
    x = torch.randn(x_shape)
    before = layer(x)
    with pytest.raises(ValueError, match="it has forward hooks or pre-hooks"):
        layer.merge()
    with pytest.raises(ValueError, match="^0: cannot merge into"):
        moelora.merge_adapter(nn.Sequential(layer))
    assert not layer.merged
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    expected = plain(x)
    plain.merge()
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_through_an_accelerate_hook():
    """accelerate's hooks (device_map dispatch: add_hook_to_module) set ``forward`` on the instance and
    move tensors between devices only: such a layer still merges."""
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    layer = MoELoRALinear(_linear(), num_experts=1, r=2, lora_alpha=4).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    accelerate_hooks.add_hook_to_module(layer.base_layer, accelerate_hooks.AlignDevicesHook(execution_device="cpu"))
    assert "forward" in layer.base_layer.__dict__
    x = torch.randn(4, D_IN)
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


class StdConv2d(nn.Conv2d):
    """A weight-standardised convolution, as timm's: its forward convolves with (W - mean) / std per output channel."""

    def forward(self, x):
        w = self.weight
        dims = (1, 2, 3)
        w = (w - w.mean(dim=dims, keepdim=True)) / (w.var(dim=dims, unbiased=False, keepdim=True) + 1e-6).sqrt()
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_conv_with_its_own_forward_runs_it_and_refuses_merging():
    """A convolution subclass whose forward is not the convolution of x with its weight (timm's
    StdConv2d): the adapter adds its delta to that forward's output (float64 reference), but merging
    W + dW was standardised with W, so the merged layer computed other numbers (silently). merge now
    refuses it; a subclass that keeps nn.Conv2d's forward still merges."""
    torch.manual_seed(0)
    base = StdConv2d(3, 4, 3, padding=1)
    layer = moelora.MoELoRAConv(base, num_experts=1, r=2, lora_alpha=4).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 5, 5)
    y = layer(x)
    a, b = layer.lora_A.double().reshape(2, 3, 3, 3), layer.lora_B[0].double()[:, :, None, None]
    base64 = copy.deepcopy(base).double()
    down = nn.functional.conv2d(x.double(), a, padding=1)
    expected = base64(x.double()) + layer.scaling * nn.functional.conv2d(down, b)
    assert rel_err(y, expected) < 1e-5
    with pytest.raises(ValueError, match="StdConv2d: it has a forward of its own.*standardised weight"):
        layer.merge()
    assert not layer.merged
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)

    class Inherited(nn.Conv2d):
        pass

    inherited = moelora.MoELoRAConv(Inherited(3, 4, 3, padding=1), num_experts=1, r=2).eval()
    with torch.no_grad():
        inherited.lora_B.normal_()
    expected = inherited(x)
    inherited.merge()
    torch.testing.assert_close(inherited(x), expected, rtol=1e-5, atol=1e-5)


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow's 'same' padding, computed from the input size in forward (padding=0 stored)."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride),
                                 reversed(self.dilation)):
            pad = max((-(size // -s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [pad // 2, pad - pad // 2]
        return super().forward(nn.functional.pad(x, pads))


class CausalConv1d(nn.Conv1d):
    """A causal convolution padding its input on the left in forward."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, ((self.kernel_size[0] - 1) * self.dilation[0] + 1, 0)))


@pytest.mark.parametrize("router", ["softmax_topk", "task"])
@pytest.mark.parametrize("make,x_shape", [
    (lambda: Conv2dSame(3, 4, 3, stride=2), (2, 3, 7, 7)),
    (lambda: CausalConv1d(3, 4, 3), (2, 3, 7)),
    (lambda: CausalConv1d(3, 4, 1), (2, 3, 7)),  # a 1-wide kernel: the pointwise path
], ids=["same", "causal", "causal_pointwise"])
def test_conv_padding_its_input_in_forward_is_refused_clearly(make, x_shape, router):
    """A convolution whose forward pads its input itself has other output positions than a
    convolution in the geometry of its attributes, which the adapter uses: the layer raised
    "base_out must have shape ..." or "topk_ids must have shape ..." from deep in moe_lora. It now
    says which layer and why."""
    layer = moelora.MoELoRAConv(make(), num_experts=2, r=2, router=router)
    if router == "task":
        layer.task_ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="returned outputs at positions .* its forward pads or crops the input"):
        layer(torch.randn(x_shape))


def test_dora_refuses_a_base_with_its_own_forward():
    """DoRA rescales W + dW by its magnitude; over a Linear subclass whose forward is not x W^T + b its
    (PEFT's) formula computed one function in eval (from the base output less its bias) and another
    in training with LoRA dropout (from x W^T), apart by 1.9 here with a dropout that drops nothing
    (p = 1e-7; 1e-7 for nn.Linear). DoRA is refused on such a base; Falcon-style x W^T + b
    subclasses and parametrized weights keep it (test_merge_refuses_a_computed_weight)."""
    with pytest.raises(ValueError,
                       match="use_dora needs a base layer computing x W.T \\+ b.*ScaledLinear has a forward"):
        MoELoRALinear(_scaled(), num_experts=1, r=2, use_dora=True, lora_dropout=1e-7)
    layer = MoELoRALinear(_linear(), num_experts=1, r=2, use_dora=True, lora_dropout=1e-7)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector.mul_(1.3)
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(layer.train()(x), layer.eval()(x), rtol=1e-5, atol=1e-5)


class GroupedLinear(nn.Linear):
    """A block-diagonal projection, as transformers' DeepseekV4GroupedLinear: x [..., g, in] -> [..., g, out / g]."""

    def __init__(self, in_features, out_features, n_groups):
        super().__init__(in_features, out_features, bias=False)
        self.n_groups = n_groups

    def forward(self, x):
        w = self.weight.view(self.n_groups, -1, x.shape[-1]).transpose(1, 2)
        y = torch.bmm(x.reshape(-1, self.n_groups, x.shape[-1]).transpose(0, 1), w)
        return y.transpose(0, 1).reshape(*x.shape[:-2], self.n_groups, -1)


class DecoupledLinear(nn.Linear):
    """A Linear that concatenates more outputs, as transformers' IdeficsDecoupledLinear."""

    def __init__(self, in_features, out_features, additional):
        super().__init__(in_features, out_features)
        self.additional_fc = nn.Linear(in_features, additional)

    def forward(self, x):
        return torch.cat([super().forward(x), self.additional_fc(x)], dim=-1)


class FirstTokenLinear(nn.Linear):
    """A Linear returning the first token's output only: [..., out_features] for other tokens than its input's."""

    def forward(self, x):
        return super().forward(x)[:1]


@pytest.mark.parametrize("num_experts", [1, 2])
@pytest.mark.parametrize("make,x_shape", [(lambda: GroupedLinear(4, 6, 2), (3, 2, 4)),
                                          (lambda: DecoupledLinear(4, 6, 2), (3, 4)),
                                          (lambda: FirstTokenLinear(4, 6), (3, 4))],
                         ids=["grouped", "decoupled", "first_token"])
def test_linear_base_with_another_output_shape_is_refused_clearly(make, x_shape, num_experts):
    """A Linear subclass whose output is not [..., out_features] cannot take the adapter's delta: the
    layer raised "base_out must have shape ..." from inside moe_lora. It now names the base layer and why."""
    layer = MoELoRALinear(make(), num_experts=num_experts, r=2)
    with pytest.raises(ValueError, match="base layer (Grouped|Decoupled|FirstToken)Linear returned an output of "
                                         r"shape .* not \[\.\.\., out_features=6\]"):
        layer(torch.randn(x_shape))


class TaggedParameter(nn.Parameter):
    """A Parameter subclass (no DTensor: no placements), as some frameworks tag their weights with."""


def test_linear_base_with_another_output_shape_and_a_parameter_subclass_weight_is_refused_clearly():
    """A weight of a tensor subclass is not taken for a tensor-parallel one unless it has placements: the
    shape error names the base layer, and nothing reads the subclass's missing placements."""
    base = DecoupledLinear(4, 6, 2)
    base.weight = TaggedParameter(base.weight.detach().clone())
    layer = MoELoRALinear(base, num_experts=2, r=2)
    with pytest.raises(ValueError, match=r"base layer DecoupledLinear returned an output of shape \(3, 8\)"):
        layer(torch.randn(3, 4))


@pytest.mark.parametrize("settings, task, match", [
    (dict(num_experts=3, top_k=2), None, "only static routing folds into one weight delta"),
    (dict(num_experts=3, router="task"), 3, r"a task-routed layer needs task in \[0, 3\) \(an int\), got 3"),
    (dict(num_experts=3, router="task"), None, r"needs task in \[0, 3\) \(an int\), got None")])
def test_check_merge_refuses_routing_that_does_not_fold_into_one_delta(settings, task, match):
    """check_merge raises the error merge would for routing that merge cannot fold (merge_adapter checks every
    layer first so that a refusal leaves no layer merged); neither changes the weight."""
    layer = MoELoRALinear(_linear(), r=3, init_lora_weights=False, **settings)
    plain = layer.base_layer.weight.detach().clone()
    for call in (layer.check_merge, layer.merge):
        with pytest.raises(ValueError, match=match):
            call(task)
        assert torch.equal(layer.base_layer.weight, plain) and not layer.merged
