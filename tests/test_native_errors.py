"""Every native op's argument errors, in child processes (a crash fails one case, not the
suite): a ValueError/TypeError whose message names the argument and the expected value,
and out-of-range indices handled without an error. Cases: tests/native_error_cases.py."""

import re

import pytest

import native_error_cases
from _isolated import run_isolated
from _routing_helpers import needs_c

pytestmark = needs_c

NAMES = sorted(native_error_cases.CASES)


@pytest.fixture(scope="module")
def outcomes():
    return run_isolated("native_error_cases", NAMES)


def check_outcome(outcome: dict, expected) -> None:
    """Assert that a case's outcome (tests/_isolated.py) is what ``expected`` describes."""
    assert "crash" not in outcome, f"the process crashed: {outcome['crash']}"
    if expected[0] == "returns":
        assert "returned" in outcome, f"raised {outcome['raised'][0]}: {outcome['message']}"
        assert outcome["check"], outcome["returned"]
        return
    exc, pattern = expected
    assert "raised" in outcome, f"no error; returned {outcome['returned']}"
    assert exc.__name__ in outcome["raised"], f"raised {outcome['raised'][0]}: {outcome['message']}"
    assert re.search(pattern, outcome["message"]), f"message {outcome['message']!r} does not match {pattern!r}"


@pytest.mark.parametrize("name", NAMES)
def test_native_op_argument_errors(outcomes, name):
    check_outcome(outcomes[name], native_error_cases.CASES[name][1])


def test_a_crash_fails_only_its_case():
    out = run_isolated("native_error_cases", ["harness/before", "harness/crash", "harness/after"])
    assert out["harness/before"] == out["harness/after"] == {"returned": "1"}
    assert "exit status -11" in out["harness/crash"]["crash"]
    with pytest.raises(AssertionError, match="the process crashed"):
        check_outcome(out["harness/crash"], (ValueError, ""))
