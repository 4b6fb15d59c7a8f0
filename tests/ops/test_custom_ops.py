"""The Triton launchers as torch.library custom ops: opcheck, torch.compile, and how a call
reaches the implementation."""

import sys

import pytest
import torch

import moelora
from conftest import DEVICE
from helpers import TOLERANCE, gpu_tile_table, make_problem, rel_err
from moelora.ops import grouped_linear, moe_ffn, moe_lora_linear, routing_autograd
from moelora.ops import moe_lora as moe_lora_module


@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "grouped"])
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(shared_a, grouped, dtype):
    """In fp16 too: h (and the gate gradient before its cast to the gates' dtype) are fp32 there, the fakes
    must say so; fp16 gates (an fp16 router's) get an fp16 gradient."""
    p = make_problem(12, 8, 10, 4, 3, 2, shared_a=shared_a, dtype=dtype, device=DEVICE)
    for gates in {p.topk_weights.dtype, dtype}:
        # without grad: the ops carry no autograd of their own (moe_lora._TracedMoELoRA differentiates
        # them under torch.compile; test_torch_compile_fullgraph compares its gradients with eager)
        args = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in
                     (p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights.to(gates), p.base_out, p.scaling, grouped))
        torch.library.opcheck(moe_lora_module.moe_lora_forward.default, args)
        y, h, *layout = moe_lora_module.moe_lora_forward(*args)
        assert len(layout) == (5 if grouped else 0)  # the grouped regime's backward reuses the forward's layout
        dy = torch.randn_like(y)
        for need_dx in (True, False):  # without dx: an empty [0, d_in] tensor, the fake's too
            bwd_args = (dy, *args[:5], h, layout, p.scaling, grouped, need_dx)
            torch.library.opcheck(moe_lora_module.moe_lora_backward.default, bwd_args)
            assert moe_lora_module.moe_lora_backward(*bwd_args)[3].dtype == gates


@pytest.mark.parametrize("regime", ["dense", "grouped"])
def test_torch_compile_fullgraph(regime):
    p = make_problem(16, 8, 12, 4, 4, 2, device=DEVICE)

    def step(x, a, b, ids, w, base):
        y = moelora.moe_lora(x, a, b, ids, w, scaling=0.5, base_out=base, backend="triton", regime=regime)
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    loss = compiled(*p.args(), p.base_out)  # the syncing checks skip themselves while tracing
    grads = torch.autograd.grad(loss, p.leaves())
    eager = step(*p.args(), p.base_out)
    grads_eager = torch.autograd.grad(eager, p.leaves())
    assert rel_err(loss, eager) < TOLERANCE[torch.float32]
    for g, ge in zip(grads, grads_eager):
        assert rel_err(g, ge) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("regime", ["dense", "grouped"])
def test_torch_compile_fullgraph_with_x_as_base_out(regime):
    """moe_lora's base_out may be x itself (a residual, d_in = d_out): under torch.compile(fullgraph=True) the
    Triton backend's autograd.Function got x twice, which dynamo refuses ("duplicate tensor input", a graph
    break); the output and x's gradient (through both uses) equal eager's."""
    p = make_problem(16, 8, 8, 4, 4, 2, device=DEVICE)

    def step(x, a, b, ids, w):
        y = moelora.moe_lora(x, a, b, ids, w, scaling=0.5, base_out=x, backend="triton", regime=regime)
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    leaves = p.leaves()[:4]
    loss = compiled(*p.args())
    grads = torch.autograd.grad(loss, leaves)
    eager = step(*p.args())
    grads_eager = torch.autograd.grad(eager, leaves)
    assert rel_err(loss, eager) < TOLERANCE[torch.float32]
    for g, ge in zip(grads, grads_eager):
        assert rel_err(g, ge) < TOLERANCE[torch.float32]


def _python_frames_before(op, args) -> list:
    """(file, function) of the Python frames a call of ``op`` enters before its implementation."""
    frames, impl = [], op.fn.__code__

    def profile(frame, event, arg):
        if event == "call":
            if frame.f_code is impl:
                sys.setprofile(None)
            else:
                frames.append((frame.f_code.co_filename, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        op.default(*args)
    finally:
        sys.setprofile(None)
    return frames


def test_ops_reach_their_implementation_without_custom_op_wrappers():
    """A compiled graph calls the ops (with grad mode off, inputs that require grad): the call goes
    through the dispatcher's autograd kernel and dynamo's disable wrapper to the implementation,
    without torch.library.custom_op's per-call layers (its device wrapper and aliasing check:
    about 50 us of host time per compiled layer step; moelora/ops/registration.py)."""
    p = make_problem(12, 8, 10, 4, 3, 2, device=DEVICE)
    with torch.no_grad(), moelora.use_backend("triton"):
        frames = _python_frames_before(moe_lora_module.moe_lora_forward, (*p.args(), p.base_out, p.scaling, False))
    assert frames, "the profile saw no frame: the check would pass whatever the registration"
    assert not [f for f in frames if f[0].endswith("custom_ops.py")], frames
    for op in (moe_lora_module.moe_lora_forward, moe_lora_module.moe_lora_backward,
               moe_lora_linear.moe_lora_linear_fwd, moe_lora_linear.moe_lora_linear_bwd, moe_ffn.moe_ffn_forward,
               moe_ffn.moe_ffn_backward, grouped_linear.segment_linear, grouped_linear.segment_linear_backward,
               routing_autograd.router_topk_backward):
        assert type(op).__name__ == "CustomOp" and op.default.name().startswith("moelora::"), op


_OPS = (moe_lora_module.moe_lora_forward, moe_lora_module.moe_lora_backward, moe_lora_linear.moe_lora_linear_fwd,
        moe_lora_linear.moe_lora_linear_bwd, moe_ffn.moe_ffn_forward, moe_ffn.moe_ffn_backward,
        grouped_linear.segment_linear, grouped_linear.segment_linear_backward, routing_autograd.router_topk_backward)


def test_ops_have_a_kernel_for_every_device_and_functional_schemas():
    """registration.py registers each op's function as its kernel for every backend (CompositeExplicitAutograd:
    CUDA tensors, and CPU ones under the interpreter, reach it; a CPU-only registration passed every CPU test
    and left CUDA tensors without a kernel), its fake for meta and fake tensors, and a schema that mutates and
    aliases nothing (what the implementations promise; the compilers rely on it)."""
    for op in _OPS:
        for key in ("CPU", "CUDA", "XPU", "Meta"):
            assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(op.name, key), (op.name, key)
        schema = op.default._schema
        assert not any(a.alias_info for a in (*schema.arguments, *schema.returns)), schema


def _transposed_storage(t):
    """``t``'s values in a tensor whose last two dims are stored transposed (not contiguous)."""
    return t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)


def _transposed_args(args):
    return tuple(_transposed_storage(a) if isinstance(a, torch.Tensor) and a.dim() >= 2 else a for a in args)


@pytest.mark.parametrize("op", ["moe_lora", "moe_lora_linear", "moe_ffn", "router_topk"])
def test_backward_ops_fakes_have_the_kernels_strides_on_non_contiguous_inputs(op):
    """The backward ops write contiguous gradients whatever their inputs' strides; their fakes made
    them torch.empty_like the inputs, so transposed storage in gave transposed fakes. Inductor asserts
    a custom op's output strides against its fake: MoELoRALinear called on x.t() (or moe_lora on a
    transposed A, route on transposed logits) raised in the compiled backward. Checked on the Triton
    backend for float64 inputs stored transposed, with opcheck (its fake-tensor test compares strides)."""
    import torch.nn as nn

    from moelora.modules.linear import MoELoRALinear

    torch.manual_seed(0)
    dt = torch.float64
    if op == "moe_lora":
        p = make_problem(9, 8, 10, 4, 3, 2, shared_a=False, dtype=dt, device=DEVICE)
        args = _transposed_args((p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights.to(dt), p.base_out))
        y, h = moe_lora_module.moe_lora_forward(*args, p.scaling, False)
        bwd, bwd_args = moe_lora_module.moe_lora_backward, (_transposed_storage(torch.randn_like(y)), *args[:5], h, [],
                                                            p.scaling, False, True)
    elif op == "moe_lora_linear":
        layer = MoELoRALinear(nn.Linear(8, 6), num_experts=4, top_k=2, r=4, init_lora_weights=False).to(DEVICE, dt)
        x = _transposed_storage(torch.randn(5, 8, dtype=dt, device=DEVICE))
        router, ids, weights = layer._routing_inputs(x)
        args = moe_lora_linear.op_args(x, layer.base_weight(), layer.base_layer.bias, layer.lora_A, layer.lora_B,
                                       layer.scaling, router, ids, weights, None, 1.0, False)
        args = _transposed_args(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        with moelora.use_backend("triton"):
            y, h, logits, ids, weights, counts, aux_loss, *_ = moe_lora_linear.moe_lora_linear_fwd(*args)
        bwd = moe_lora_linear.moe_lora_linear_bwd
        bwd_args = (torch.randn_like(y), torch.ones_like(aux_loss), *args[:2], *args[3:6], h, logits, ids, weights,
                    counts, args[11], args[12], args[13], [], *args[14:16], args[17], *args[21:25], [True] * 6)
    elif op == "moe_ffn":
        g = torch.Generator().manual_seed(0)
        x, w_in, w_out = (torch.randn(*s, generator=g, dtype=dt).to(DEVICE) for s in ((6, 16), (3, 24, 16), (3, 8, 24)))
        ids = torch.rand(6, 3, generator=g).argsort(1)[:, :2].to(DEVICE)
        weights = torch.rand(6, 2, generator=g, dtype=dt).to(DEVICE)
        plan = moe_ffn.ffn_plan(x, w_in, w_out, None, 2, "triton")
        args = _transposed_args((x, ids, weights, w_in, None, w_out, None, None, None, "silu", True, False, *plan))
        with moelora.use_backend("triton"):
            out = moe_ffn.moe_ffn_forward(*args)
        bwd, bwd_args = moe_ffn.moe_ffn_backward, (torch.randn_like(out[0]), *args[:9], out[1:], *args[9:],
                                                   [True, True, True, False, True, False, False, False])
    else:
        logits = _transposed_storage(torch.randn(7, 6, dtype=dt, device=DEVICE))
        out = moelora.route(logits, 2)
        bwd = routing_autograd.router_topk_backward
        bwd_args = (logits, out.ids, out.weights, torch.randn_like(out.weights),
                    torch.randn(6, dtype=dt, device=DEVICE), torch.randn(7, dtype=dt, device=DEVICE), 0, True)
    with moelora.use_backend("triton"):
        torch.library.opcheck(bwd.default, bwd_args, test_utils=("test_schema", "test_faketensor"))


def test_fake_grouped_layout_has_the_real_layouts_shapes_across_the_row_classes():
    """The fake kernel's layout pads as the real one, by the (token, slot) pairs' row class: T*k pairs, not T.
    The GPU tile table's blocks (the interpreter's do not depend on the class): 64 rows few, 128 many."""
    with gpu_tile_table():
        for T, k in [(300, 2), (200, 2), (600, 1)]:  # 300, 300 pairs per expert: many rows (>= 256); 200: few
            x, a, b = torch.randn(T, 16), torch.randn(8, 16), torch.randn(2, 512, 8)
            ids = torch.arange(T * k).remainder(2).view(T, k)
            real = moe_lora_module.layout_tensors(moe_lora_module.grouped_layout(x, a, b, ids))
            fake = moe_lora_module.fake_grouped_layout(x, a, b, k)
            assert [t.shape for t in fake] == [t.shape for t in real], (T, k)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_segment_linear_differentiates_through_its_registered_autograd(with_bias):
    """segment_linear, which eager code calls, carries its backward (register_autograd): gradcheck in float64
    over experts with rows, one without and rows past the last segment (zero outputs, zero gradients). Without
    it PyTorch backpropagated through the kernel's own ops, warning that this is deprecated ("an autograd
    kernel was not registered"): an error here."""
    import warnings

    torch.manual_seed(0)
    dt = dict(dtype=torch.float64, device=DEVICE)
    rows, weight = torch.randn(6, 4, **dt, requires_grad=True), torch.randn(3, 5, 4, **dt, requires_grad=True)
    bias = torch.randn(3, 5, **dt, requires_grad=True) if with_bias else None
    offsets = torch.tensor([0, 2, 2, 5], device=DEVICE)
    inputs = (rows, weight, bias, offsets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.autograd.gradcheck(lambda *a: grouped_linear.segment_linear(*a), inputs)
    out = grouped_linear.segment_linear(*inputs)
    assert out.grad_fn is not None and torch.equal(out[5], torch.zeros(5, **dt))
