"""moelora's Triton kernels compile for Hopper (sm_90) without a GPU: the grouped kernels with
every tile config of the table, the dense regime's and fused layer's kernels in each mode
(benchmarks/compile_kernels.py, in a process that never ran the interpreter)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "benchmarks.compile_kernels"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    if "ptxas" in run.stdout + run.stderr and "not found" in (run.stdout + run.stderr).lower():
        pytest.skip("no ptxas for the CUDA backend here")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "0 failed" in run.stdout
