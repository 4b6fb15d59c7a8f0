"""Every argument error of moe_lora names the argument and what was expected."""

import pytest
import torch

import moelora
from conftest import DEVICE
from moelora.ops.validation import check_activation
from helpers import make_problem


def call(p, **over):
    kw = dict(x=p.x, lora_a=p.lora_a, lora_b=p.lora_b, topk_ids=p.topk_ids, topk_weights=p.topk_weights)
    extra = {k: over.pop(k) for k in list(over) if k in ("scaling", "base_out", "backend", "regime")}
    kw.update(over)
    return moelora.moe_lora(kw["x"], kw["lora_a"], kw["lora_b"], kw["topk_ids"], kw["topk_weights"], **extra)


@pytest.fixture
def p():
    return make_problem(6, 8, 10, 4, 3, 2, device=DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_errors(p, backend):
    cases = [
        (TypeError, "x must be a torch.Tensor", dict(x=[1.0])),
        (TypeError, "x must be float16, bfloat16, float32 or float64", dict(x=p.x.detach().int())),
        (TypeError, r"lora_a must have the dtype of x", dict(lora_a=p.lora_a.detach().double())),
        (TypeError, r"lora_b must have the dtype of x", dict(lora_b=p.lora_b.detach().half())),
        (TypeError, "topk_ids must be int32 or int64", dict(topk_ids=p.topk_ids.float())),
        (TypeError, "topk_weights must be a floating-point", dict(topk_weights=p.topk_ids)),
        (ValueError, r"lora_b must have shape \[E, d_out, r\]", dict(lora_b=p.lora_b.detach()[0])),
        (ValueError, r"lora_a must have shape \[r, d_in\] \(shared\) or \[E, r, d_in\]",
         dict(lora_a=p.lora_a.detach()[None, None])),
        (ValueError, r"lora_a has shape \(4, 9\) but x", dict(lora_a=torch.randn(4, 9, device=DEVICE))),
        (ValueError, r"lora_a has shape \(2, 4, 8\)", dict(lora_a=torch.randn(2, 4, 8, device=DEVICE))),
        (ValueError, r"topk_ids must have shape \[6, k\]", dict(topk_ids=p.topk_ids[:5])),
        (ValueError, "topk_weights must have the shape of topk_ids", dict(topk_weights=p.topk_weights[:, :1])),
        (ValueError, r"k \(topk_ids.shape\[-1\]\) must be in \[1, num_experts=3\], got 4",
         dict(topk_ids=torch.zeros(6, 4, dtype=torch.long, device=DEVICE),
              topk_weights=torch.ones(6, 4, device=DEVICE))),
        (ValueError, r"topk_ids must lie in \[0, 3\), got values in \[0, 3\]",
         dict(topk_ids=torch.full_like(p.topk_ids, 3).index_fill(0, torch.tensor([0], device=DEVICE), 0))),
        (ValueError, r"topk_ids must lie in \[0, 3\), got values in \[-1",
         dict(topk_ids=torch.full_like(p.topk_ids, -1))),
        (ValueError, "topk_weights contains NaN or Inf",
         dict(topk_weights=p.topk_weights.detach().index_fill(0, torch.tensor([2], device=DEVICE), float("nan")))),
        (ValueError, r"base_out must have shape \(6, 10\)", dict(base_out=torch.zeros(6, 11, device=DEVICE))),
        (TypeError, "base_out must have the dtype of x", dict(base_out=torch.zeros(6, 10, device=DEVICE).double())),
        (TypeError, "scaling must be a finite Python number", dict(scaling=float("inf"))),
        (TypeError, "scaling must be a finite Python number", dict(scaling=torch.tensor(1.0))),
        (ValueError, "regime must be one of", dict(regime="sparse")),
        (ValueError, "backend must be one of", dict(backend="cuda")),
    ]
    for err, match, over in cases:
        over.setdefault("backend", backend)
        with pytest.raises(err, match=match):
            call(p, **over)


def test_mixed_devices_rejected(p):
    other = "meta" if DEVICE.type == "cpu" else "cpu"
    with pytest.raises(ValueError, match=r"lora_b is on .* but x is on .*; all inputs must share a device"):
        call(p, lora_b=p.lora_b.detach().to(other))


def test_validation_switch_skips_only_the_syncing_checks(p):
    bad_ids = torch.full_like(p.topk_ids, 7)
    with moelora.validation(False):
        assert not moelora.validation_enabled()
        call(p, topk_ids=bad_ids, backend="torch")  # no error, no crash
        with pytest.raises(ValueError, match="topk_weights must have the shape"):
            call(p, topk_weights=p.topk_weights[:, :1])
    assert moelora.validation_enabled()
    with pytest.raises(ValueError, match="topk_ids must lie in"):
        call(p, topk_ids=bad_ids)


def test_validation_env_variable(p, monkeypatch):
    monkeypatch.setenv("MOELORA_VALIDATE", "0")
    assert not moelora.validation_enabled()
    call(p, topk_ids=torch.full_like(p.topk_ids, 7), backend="torch")


def test_activation_given_by_name_is_refused_with_a_hint_that_exists():
    """A string activation is refused; the hint names torch.nn.functional's function only where it exists
    (``"gelu_new"``, GPT-2's, is transformers' ACT2FN name, not a torch.nn.functional function)."""
    with pytest.raises(TypeError, match=r"^activation must be a callable \(e.g. torch.nn.functional.silu\), got str"):
        check_activation("silu")
    with pytest.raises(TypeError, match=r"^activation must be a callable \(torch.nn.functional has no 'gelu_new'; "
                                        r"transformers' are transformers.activations.ACT2FN\[name\]\), got str"):
        check_activation("gelu_new")
