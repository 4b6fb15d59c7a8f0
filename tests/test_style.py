"""The Python sources follow one style: pycodestyle (PEP 8) with lines up to 120 columns.

Checked: the package, the benchmarks, the tests, the examples and setup.py. Allowed beyond
pycodestyle's defaults (which already skip W503 / W504, line breaks around binary operators):
E731, a lambda assigned to a name (the tests' one-line factories of inputs and modules). An
import that must follow code (an environment variable set before moelora defines its kernels,
an importorskip) says so with ``# noqa: E402``.
"""

from pathlib import Path

import pytest

pycodestyle = pytest.importorskip("pycodestyle")  # requirements.txt installs it; a GPU image may lack it

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["moelora", "benchmarks", "tests", "examples", "setup.py"]
MAX_LINE_LENGTH = 120


class _Collected(pycodestyle.BaseReport):
    """Keeps every problem as 'path:line:column: code text'."""

    def __init__(self, options):
        super().__init__(options)
        self.problems = []

    def error(self, line_number, offset, text, check):
        code = super().error(line_number, offset, text, check)
        if code:
            self.problems.append(f"{self.filename}:{line_number}:{offset + 1}: {text}")
        return code


def _problems(paths):
    style = pycodestyle.StyleGuide(max_line_length=MAX_LINE_LENGTH, ignore=["E731", "W503", "W504"],
                                   reporter=_Collected)
    report = style.check_files([str(p) for p in paths])
    assert report.counters["files"] >= len(paths)
    return report.problems


def test_sources_pass_pycodestyle():
    problems = _problems([ROOT / p for p in CHECKED])
    assert not problems, "pycodestyle --max-line-length=120 --ignore=E731,W503,W504:\n" + "\n".join(problems)


def test_the_style_check_sees_a_long_line_and_a_bad_indent(tmp_path):
    """The check above fails on what it is meant to catch (it is not vacuous: files found, options read)."""
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n" + "y = '" + "a" * MAX_LINE_LENGTH + "'\n" + "z = max(1,\n     2)\n")
    assert [p.split(": ", 1)[1][:4] for p in _problems([bad])] == ["E501", "E128"]
    fits = tmp_path / "fits.py"
    fits.write_text("y = '" + "a" * (MAX_LINE_LENGTH - 6) + "'\nf = lambda v: v\n")
    assert _problems([fits]) == []
