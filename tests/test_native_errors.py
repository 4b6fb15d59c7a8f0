"""Every native op's argument errors, in child processes (a crash fails one case, not the
suite): a ValueError/TypeError whose message names the argument and the expected value,
and out-of-range indices handled without an error. Cases: tests/native_error_cases.py."""

import pytest

import native_error_cases
from _isolated import check_outcome, run_isolated
from _routing_helpers import needs_c

pytestmark = needs_c

NAMES = sorted(native_error_cases.CASES)


@pytest.fixture(scope="module")
def outcomes():
    return run_isolated("native_error_cases", NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_native_op_argument_errors(outcomes, name):
    check_outcome(outcomes[name], native_error_cases.CASES[name][1])


def test_a_crash_fails_only_its_case():
    out = run_isolated("native_error_cases", ["harness/before", "harness/crash", "harness/after"])
    assert out["harness/before"] == out["harness/after"] == {"returned": "1"}
    assert "exit status -11" in out["harness/crash"]["crash"]
    with pytest.raises(AssertionError, match="the process crashed"):
        check_outcome(out["harness/crash"], (ValueError, ""))
