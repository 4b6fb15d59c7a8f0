"""Run named test cases in child processes, so that a case that crashes the interpreter
(a segfault in native code, an abort) fails that one case instead of the whole suite.

A cases module defines ``run_case(name) -> dict`` (the outcome, JSON-able). All cases run
in one child, which prints one JSON line per finished case; when the child dies, the case
it was running is recorded as a crash and a new child takes the remaining cases.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))

_CHILD = """
import json, sys, importlib
sys.path.insert(0, {tests!r})
module = importlib.import_module({module!r})
for name in sys.argv[1:]:
    print(json.dumps([name, module.run_case(name)]), flush=True)
"""


def run_isolated(module: str, names, timeout: float = 300.0) -> dict:
    """{name: outcome} for every case; a crashed case's outcome is {"crash": description}."""
    results, remaining = {}, list(names)
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    while remaining:
        proc = subprocess.run([sys.executable, "-c", _CHILD.format(tests=TESTS, module=module), *remaining],
                              capture_output=True, text=True, timeout=timeout, env=env)
        for line in proc.stdout.splitlines():
            try:
                name, outcome = json.loads(line)
            except ValueError:
                continue
            results[name] = outcome
        done = [n for n in remaining if n in results]
        remaining = [n for n in remaining if n not in results]
        if remaining:
            if proc.returncode == 0 and not done:
                raise RuntimeError(f"the case runner printed nothing: {proc.stderr[-2000:]}")
            crashed = remaining.pop(0)
            results[crashed] = {"crash": f"exit status {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}"}
    return results


def outcome_of(fn, check=None) -> dict:
    """What calling fn() did: {"raised": [class names of the MRO], "message": str}, or
    {"returned": repr} plus {"check": check(value)} when a check is given."""
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - the outcome is the point
        return {"raised": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
    outcome = {"returned": repr(value)[:200]}
    if check is not None:
        outcome["check"] = bool(check(value))
    return outcome


def check_outcome(outcome: dict, expected) -> None:
    """Assert that a case's outcome is what ``expected`` describes: (exception class, message
    regex), or ("returns", check) for a call that must return and pass ``check``."""
    assert "crash" not in outcome, f"the process crashed: {outcome['crash']}"
    if expected[0] == "returns":
        assert "returned" in outcome, f"raised {outcome['raised'][0]}: {outcome['message']}"
        assert outcome["check"], outcome["returned"]
        return
    exc, pattern = expected
    assert "raised" in outcome, f"no error; returned {outcome['returned']}"
    assert exc.__name__ in outcome["raised"], f"raised {outcome['raised'][0]}: {outcome['message']}"
    assert re.search(pattern, outcome["message"]), f"message {outcome['message']!r} does not match {pattern!r}"
