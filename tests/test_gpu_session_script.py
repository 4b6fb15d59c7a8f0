"""benchmarks/gpu_session.sh runs once on a lent GPU machine, with no second chance: its time
arithmetic is checked here on a fake clock, with every command stubbed (python3, timeout, date),
each step taking the whole of its timeout (the worst case)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"

STUBS = {
    # the clock: seconds in a file, advanced by each timeout-bounded step
    "date": '[ "$1" = "+%s" ] && { cat "$CLOCK"; exit 0; }; exec /bin/date "$@"\n',
    # every bounded step takes its whole timeout
    "timeout": 'echo "$*" >> "$CALLS"; echo $(( $(cat "$CLOCK") + $1 )) > "$CLOCK"; shift; exec "$@"\n',
    "python3": r'''
arg() { local prev=""; for a in "$@"; do [ "$prev" = "$NAME" ] && echo "$a"; prev=$a; done; }
case "$*" in
  *"-m benchmarks.tune_"*) NAME=--out; echo '{"dense_configs": {}, "grouped_configs": {}}' > "$(arg "$@")";;
  *"-m benchmarks --profile"*) NAME=--out-dir; D=$(arg "$@"); mkdir -p "$D"; echo table > "$D/profile-S1-a.txt"
                               echo table > "$D/profile-S3-b.txt";;
  *"-m benchmarks"*) NAME=--out-dir; D=$(arg "$@"); echo "{}" > "$D/bench-x.json"; echo png > "$D/bench-x.png"
                     echo "met          a target";;
  *"-m pytest"*) echo "3 passed in 1.0s";;
  *) cat > /dev/null; echo "device: stub";;
esac
''',
}


def _session(tmp_path: Path, **env) -> tuple:
    """Run gpu_session.sh with the stubs; (session.log, the bounded commands, the files under OUT)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text("#!/bin/bash\n" + body)
        (stubs / name).chmod(0o755)
    clock, calls, out = tmp_path / "clock", tmp_path / "calls", tmp_path / "out"
    clock.write_text("1000\n")
    calls.write_text("")
    run_env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "CLOCK": str(clock), "CALLS": str(calls),
               "OUT": str(out), **env}
    proc = subprocess.run(["bash", str(SCRIPT)], env=run_env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    return (out / "session.log").read_text(), calls.read_text().splitlines(), files


def _bench_call(calls):
    line = next(c for c in calls if " -m benchmarks --quick" in c)
    limit = int(line.split()[0])
    budget = float(re.search(r"--time-budget (\S+)", line).group(1))
    hard = re.search(r"--hard-deadline (\S+)", line)
    return limit, budget, float(hard.group(1)) if hard else budget + 60  # the CLI's default


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("deadline", [480, 300])
def test_deadline_bounds_the_whole_session_and_the_benchmark_writes_its_results(tmp_path, deadline):
    """Worst case (every step uses its whole timeout): the session ends within DEADLINE (the defaults'
    timeouts added up to 700 s, past the device tool's 600 s per command, whatever DEADLINE said), the
    benchmark still runs, its watchdog (--hard-deadline, counted from after its imports: 11 s on the
    H200) fires well before its timeout (it was the timeout itself: the run was killed before writing
    its table and targets), and at most eight files land in OUT, no folder."""
    log, calls, files = _session(tmp_path, DEADLINE=str(deadline))
    done = int(re.search(r"session done after (-?\d+) s", log).group(1))
    assert done <= deadline, log
    limit, budget, hard = _bench_call(calls)
    assert 0 < budget < hard <= limit - 25, (limit, budget, hard)
    assert "benchmark rc=0" in log
    assert len(files) <= 8 and all("/" not in f for f in files), files
    assert {"session.log", "bench.log", "bench-x.json", "bench-x.png"} <= set(files)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_with_time_to_spare_every_step_runs_with_its_default_budget(tmp_path):
    log, calls, files = _session(tmp_path, DEADLINE="2000")
    assert [c.split()[0] for c in calls] == ["200", "100", "100", "180", "120", str(2000 - 700)]
    assert "--budget 40 " in calls[1] and "--budget 40 " in calls[2]
    assert _bench_call(calls)[1] == 120
    assert files == ["bench-x.json", "bench-x.png", "bench.log", "profiles.txt", "session.log", "tests.log",
                     "tune-dense.json", "tune-grouped.json"]
    assert "tests rc=0" in log and "==== profile-S1-a.txt" in (tmp_path / "out" / "profiles.txt").read_text()
