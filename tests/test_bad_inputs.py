"""The bad-input sweep (tests/bad_input_cases.py): every case raises ValueError or TypeError
naming the argument and what was expected, or (validation off, empty batches) returns a
finite result; none crashes the process (each runs in a child, tests/_isolated.py)."""

import pytest

import bad_input_cases
from _isolated import check_outcome, run_isolated

NAMES = sorted(bad_input_cases.CASES)


@pytest.fixture(scope="module")
def outcomes():
    return run_isolated("bad_input_cases", NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input(outcomes, name):
    check_outcome(outcomes[name], bad_input_cases.CASES[name][1])
