"""The Triton launchers as torch.library custom ops: opcheck and torch.compile."""

import pytest
import torch

import moelora
from conftest import DEVICE
from helpers import TOLERANCE, make_problem, rel_err
from moelora.ops import moe_lora as moe_lora_module


@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "grouped"])
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_opcheck(shared_a, grouped):
    p = make_problem(12, 8, 10, 4, 3, 2, shared_a=shared_a, device=DEVICE)
    args = (p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, p.base_out, p.scaling, grouped)
    torch.library.opcheck(moe_lora_module.moe_lora_forward, args)
    y, h, *layout = moe_lora_module.moe_lora_forward(*args)
    assert len(layout) == (5 if grouped else 0)  # the grouped regime's backward reuses the forward's layout
    dy = torch.randn_like(y)
    bwd_args = (dy, p.x.detach(), p.lora_a.detach(), p.lora_b.detach(), p.topk_ids, p.topk_weights.detach(),
                h.detach(), layout, p.scaling, grouped, True)
    torch.library.opcheck(moe_lora_module.moe_lora_backward, bwd_args)


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
