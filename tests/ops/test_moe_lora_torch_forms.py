"""The PyTorch backend's two forms (moelora.ops.moe_lora.torch_form): the dense gated expand and,
where no gradient is needed and the (token, slot) pairs are few against the experts (decoding),
the gathered form that reads only the chosen experts' matrices. Both against the float64
reference and against each other, NaN/Inf in chosen and unchosen experts included."""

import pytest
import torch

import moelora
from conftest import DEVICE
from helpers import TOLERANCE, make_problem, rel_err
from moelora.ops import moe_lora as ops
from moelora.ops.reference import moe_lora_naive
from moelora.ops.validation import check_moe_lora_args


def _args(p, **kw):
    return check_moe_lora_args(*p.args(), p.scaling, p.base_out, **kw)


def _run(p, form, base=True):
    """moe_lora_torch_impl on ``p`` (detached: no gradient) in ``form``, chosen by GATHER_MAX_PAIRS_PER_EXPERT."""
    leaves = [t.detach() for t in p.leaves()]
    x, a, b, w = leaves[:4]
    args = check_moe_lora_args(x, a, b, p.topk_ids, w, p.scaling, leaves[4] if base and p.base_out is not None
                               else None)
    limit = 0 if form == "dense" else 10 ** 9
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "GATHER_MAX_PAIRS_PER_EXPERT", limit)
        assert ops.torch_form(args) == form
        return ops.moe_lora_torch_impl(args).reshape(args.out_shape)


def _reference(p, base=True):
    leaves = [t.detach().double() for t in p.leaves()]
    return moe_lora_naive(*leaves[:3], p.topk_ids, leaves[3], scaling=p.scaling,
                          base_out=leaves[4] if base and p.base_out is not None else None)


def test_form_choice():
    """Gathered only without a gradient, with ids known in range, at T*k <= 2 E; dense otherwise."""
    p = make_problem(8, 16, 12, 4, 8, 2, device=DEVICE)  # 16 pairs, 8 experts
    with torch.no_grad():
        assert ops.torch_form(_args(p)) == "gathered"
        with moelora.validation(False):  # the ids were not read: out-of-range ids must contribute nothing
            assert ops.torch_form(_args(p)) == "dense"
        many = make_problem(9, 16, 12, 4, 8, 2, device=DEVICE)  # 18 pairs > 2 * 8
        assert ops.torch_form(_args(many)) == "dense"
    assert ops.torch_form(_args(p)) == "dense"  # x, A, B, w require grad
    detached = [t.detach() for t in p.leaves()]
    args = check_moe_lora_args(*detached[:3], p.topk_ids, detached[3], p.scaling, detached[4])
    assert ops.torch_form(args) == "gathered"  # grad mode on, nothing requires grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
@pytest.mark.parametrize("form", ["gathered", "dense"])
@pytest.mark.parametrize("experts", [None, 3], ids=["all", "idle-experts"])
def test_forms_match_the_float64_reference(form, shared_a, dtype, experts):
    p = make_problem(7, 24, 20, 4, 6, 2, shared_a=shared_a, dtype=dtype, device=DEVICE, experts=experts, seed=5)
    y = _run(p, form)
    assert y.dtype == dtype and y.shape == (7, 20)
    assert rel_err(y, _reference(p)) < TOLERANCE[dtype]
    assert rel_err(_run(p, form, base=False), _reference(p, base=False)) < TOLERANCE[dtype]


def test_gathered_form_repeated_ids_and_zero_weights():
    """Static routing may repeat an expert within a token (their weights add) and threshold
    routing keeps dropped slots with weight 0: as the reference."""
    p = make_problem(5, 16, 8, 4, 4, 3, device=DEVICE, seed=2)
    p.topk_ids[:, 1] = p.topk_ids[:, 0]
    with torch.no_grad():
        p.topk_weights[1:3, 2] = 0
    for form in ("gathered", "dense"):
        assert rel_err(_run(p, form), _reference(p)) < 1e-5, form


def test_gathered_form_zero_tokens():
    p = make_problem(0, 16, 8, 4, 4, 2, device=DEVICE)
    assert _run(p, "gathered").shape == (0, 8)


def _poison(p, shared_a):
    """NaN/Inf in a row of B of experts 1 and 5 and (per-expert A) in A of experts 2 and 5; expert 5 gets
    no token. Returns the bool mask of the outputs a chosen expert's non-finite weight reaches."""
    with torch.no_grad():
        p.lora_b[1, 4, 0] = float("nan")
        p.lora_b[1, 6, 2] = float("inf")
        p.lora_b[5, 0, 0], p.lora_b[5, 3] = float("nan"), -float("inf")
        if not shared_a:
            p.lora_a[2, 0, 0] = float("inf")
            p.lora_a[5, 1] = float("nan")
        p.topk_weights[0, 1] = 0  # a slot kept with weight 0 still reads its expert
    uses = lambda e: (p.topk_ids == e).any(1)  # noqa: E731
    bad = torch.zeros(p.x.shape[0], p.lora_b.shape[1], dtype=torch.bool, device=p.x.device)
    bad[uses(1), 4] = bad[uses(1), 6] = True
    if not shared_a:
        bad[uses(2)] = True
    return bad


@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
@pytest.mark.parametrize("form", ["gathered", "dense"])
def test_nonfinite_weights_reach_exactly_the_chosen_experts_outputs(form, shared_a):
    p = make_problem(9, 16, 12, 4, 6, 2, shared_a=shared_a, experts=5, device=DEVICE, seed=3)
    assert (p.topk_ids == 1).any() and (shared_a or (p.topk_ids == 2).any())
    bad = _poison(p, shared_a)
    y = _run(p, form)
    assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()
    # the other outputs: as if the non-finite weights were 0
    leaves = [torch.nan_to_num(t.detach().double(), 0.0, 0.0, 0.0) for t in p.leaves()]
    ref = moe_lora_naive(*leaves[:3], p.topk_ids, leaves[3], scaling=p.scaling, base_out=leaves[4])
    torch.testing.assert_close(y[~bad], ref[~bad].float())


@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_forms_agree_on_random_poisoning(shared_a):
    """Both forms give the same outputs and the same NaN where NaN/Inf sit at random in the weights."""
    g = torch.Generator().manual_seed(11)
    for seed in range(6):
        p = make_problem(6, 8, 10, 3, 5, 2, shared_a=shared_a, device=DEVICE, seed=seed,
                         id_dtype=(torch.int64, torch.int32)[seed % 2])  # int32: the routing op's ids
        with torch.no_grad():
            for t in (p.lora_b, p.lora_a):
                flat = t.view(-1)
                hits = torch.randint(0, flat.numel(), (3,), generator=g)
                flat[hits] = torch.tensor([float("nan"), float("inf"), -float("inf")], device=flat.device)
        dense, gathered = _run(p, "dense"), _run(p, "gathered")
        assert torch.equal(torch.isnan(dense), torch.isnan(gathered)), seed
        torch.testing.assert_close(gathered, dense, equal_nan=True)


def test_layer_decode_uses_the_gathered_form():
    """MoELoRALinear's eval forward on the torch backend at a few tokens runs the gathered form, and
    gives what the dense form gives."""
    torch.manual_seed(0)
    layer = moelora.MoELoRALinear(torch.nn.Linear(32, 24), num_experts=8, top_k=2, r=4, init_lora_weights=False)
    layer = layer.to(DEVICE).eval()
    x = torch.randn(8, 1, 32, device=DEVICE)
    forms = []
    real = ops.torch_form
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "torch_form", lambda args: forms.append(real(args)) or forms[-1])
        with moelora.use_backend("torch"), torch.inference_mode():
            y = layer(x)
            mp.setattr(ops, "GATHER_MAX_PAIRS_PER_EXPERT", 0)
            y_dense = layer(x)
    assert forms == ["gathered", "dense"]
    torch.testing.assert_close(y, y_dense)


@pytest.mark.parametrize("scaling,x_scale", [(1e39, 1.0), (1e-41, 1e5)])
def test_gathered_form_scaling_outside_the_fp32_range(scaling, x_scale):
    """s * w * h overflows (s = 1e39) or is subnormal (s = 1e-41) in fp32, s * w * B @ h is O(1): the
    gathered form computes in float64 there, as the dense one."""
    p = make_problem(5, 8, 6, 2, 3, 2, with_base=False, device=DEVICE, seed=4)
    with torch.no_grad():
        p.x.mul_(x_scale)
        p.lora_b.div_(scaling * x_scale)
    p.scaling = scaling
    y = _run(p, "gathered")
    assert torch.isfinite(y).all() and rel_err(y, _reference(p)) < 1e-5


@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_gathered_form_fp16_h_beyond_fp16_range_with_a_small_scale(shared_a):
    """h = x A^T beyond fp16's range (|h| ~ 1.3e5), s * w * h within it: h stays in fp32."""
    g = torch.Generator().manual_seed(0)
    p = make_problem(6, 64, 8, 4, 3, 2, shared_a=shared_a, dtype=torch.float16, device=DEVICE, seed=1)
    with torch.no_grad():
        p.x.copy_(4000 + 100 * torch.randn(p.x.shape, generator=g))
        p.lora_a.copy_(0.5 + 0.01 * torch.randn(p.lora_a.shape, generator=g))
    p.scaling = 1e-3
    y = _run(p, "gathered", base=False)
    assert torch.isfinite(y).all() and rel_err(y, _reference(p, base=False)) < 5e-3


@pytest.mark.parametrize("shared_a", [True, False], ids=["sharedA", "expertA"])
def test_forward_mode_ad_through_the_gathered_form(shared_a):
    """torch.func.jvp (grad mode on, no input requiring grad) runs the gathered form; its ops are
    differentiable: the tangents are the per-expert loop's (the dense form's too: test_compile's
    test_forward_mode_ad_through_the_layers_on_the_torch_backend)."""
    from torch.func import jvp

    p = make_problem(5, 8, 6, 3, 5, 2, shared_a=shared_a, dtype=torch.float64, device=DEVICE, seed=7)
    primals = tuple(t.detach() for t in p.leaves())
    tangents = tuple(torch.randn_like(t) for t in primals)
    forms, real = [], ops.torch_form

    def run(op):
        return lambda x, a, b, w, base: op(x, a, b, p.topk_ids, w, scaling=p.scaling, base_out=base)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "torch_form", lambda args: forms.append(real(args)) or forms[-1])
        with moelora.use_backend("torch"):
            out, tangent = jvp(run(moelora.moe_lora), primals, tangents)
    assert forms == ["gathered"]
    ref_out, ref_tangent = jvp(run(moe_lora_naive), primals, tangents)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tangent, ref_tangent)
