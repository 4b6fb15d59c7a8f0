"""The Triton launchers as torch.library custom ops: opcheck, torch.compile, and how a call
reaches the implementation."""

import sys

import pytest
import torch

import moelora
from conftest import DEVICE
from helpers import TOLERANCE, make_problem, rel_err
from moelora.ops import grouped_linear, moe_ffn, moe_lora_linear, routing_autograd
from moelora.ops import moe_lora as moe_lora_module


@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "grouped"])
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_opcheck(shared_a, grouped):
    p = make_problem(12, 8, 10, 4, 3, 2, shared_a=shared_a, device=DEVICE)
    # without grad: the ops carry no autograd of their own (moe_lora._TracedMoELoRA differentiates
    # them under torch.compile; test_torch_compile_fullgraph compares its gradients with eager)
    args = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in
                 (p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, p.base_out, p.scaling, grouped))
    torch.library.opcheck(moe_lora_module.moe_lora_forward.default, args)
    y, h, *layout = moe_lora_module.moe_lora_forward(*args)
    assert len(layout) == (5 if grouped else 0)  # the grouped regime's backward reuses the forward's layout
    dy = torch.randn_like(y)
    bwd_args = (dy, *args[:5], h, layout, p.scaling, grouped, True)
    torch.library.opcheck(moe_lora_module.moe_lora_backward.default, bwd_args)


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
