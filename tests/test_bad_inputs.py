"""Bad inputs never crash the process and get clear errors: every case runs in a child
process (tests/_isolated.py), so a crash fails that case alone.

- tests/native_error_cases.py: every native op (torch.ops.moelora.*) with bad arguments
  and out-of-range indices; messages matched in full, numbers included (an extension with
  a static copy of libstdc++ cuts them short or crashes).
- tests/bad_input_cases.py: the public API (moe_lora, moe_lora_linear, moe_ffn, route, dispatch_metadata,
  dispatch, combine, MoELoRAConfig, Router, MoEFFN, upcycle_ffn, apply_molex).
Each raises ValueError or TypeError naming the argument and what was expected, or (where
documented: validation off, empty batches, out-of-range indices) returns a sane result."""

import pytest

import bad_input_cases
import native_error_cases
from _isolated import check_outcome, outcome_of, run_isolated
from helpers import needs_c

SWEEPS = {"native_error_cases": native_error_cases.CASES, "bad_input_cases": bad_input_cases.CASES}
PARAMS = [pytest.param(module, name, id=name, marks=[needs_c] if module == "native_error_cases" else [])
          for module, cases in SWEEPS.items() for name in sorted(cases)]


@pytest.fixture(scope="module")
def outcomes():
    runs = {}

    def outcome(module, name):
        if module not in runs:  # one child process per sweep (more only after a crash)
            runs[module] = run_isolated(module, sorted(SWEEPS[module]))
        return runs[module][name]
    return outcome


@pytest.mark.parametrize("module,name", PARAMS)
def test_bad_input(outcomes, module, name):
    check_outcome(outcomes(module, name), SWEEPS[module][name][1])


def test_a_crash_fails_only_its_case():
    out = run_isolated("native_error_cases", ["harness/before", "harness/crash", "harness/after"])
    assert out["harness/before"] == out["harness/after"] == {"returned": "1"}
    assert "exit status -11" in out["harness/crash"]["crash"]
    with pytest.raises(AssertionError, match="the process crashed"):
        check_outcome(out["harness/crash"], (ValueError, ""))


# The native ops' fake kernels are also their Meta kernels (what a call with meta tensors runs) and
# what torch.compile traces: they must refuse what the kernels refuse, with the kernels' messages
# (they returned tensors shaped from bad arguments before, e.g. weights [3, 5] for top_k 5 > E = 4).
FAKE_PARAMS = [pytest.param(name, id=name, marks=[needs_c]) for name in sorted(native_error_cases.CASES)
               if not name.startswith("cuda/")]


@pytest.mark.parametrize("name", FAKE_PARAMS)
def test_fake_kernel_refuses_what_the_kernel_refuses(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    call, expected = native_error_cases.CASES[name]
    with FakeTensorMode(allow_non_fake_inputs=True):
        outcome = outcome_of(call)
    if expected[0] == "returns":  # the values cannot be checked on fake tensors
        assert "returned" in outcome, f"raised {outcome['raised'][0]}: {outcome['message']}"
    else:
        check_outcome(outcome, expected)
