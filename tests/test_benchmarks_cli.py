"""The benchmark CLI's CPU default runs end to end and writes the expected JSON and PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks import cli, targets  # noqa: E402


def _run(tmp_path, *extra):
    rc = cli.main(["--device", "cpu", "--out-dir", str(tmp_path), "--repeats", "3", *extra])
    assert rc == 0
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text()), files[0]


def test_cpu_default_writes_results(tmp_path, capsys):
    results, path = _run(tmp_path, "--shapes", "S1,S5", "--sweep-tokens", "32,64")
    assert {"schema", "meta", "shapes", "ceilings", "cases", "checks", "plot", "targets"} <= set(results)
    meta = results["meta"]
    for key in ("device_name", "torch", "triton", "cuda", "git_commit", "date", "dtype"):
        assert key in meta
    assert results["ceilings"]["copy_GBps"] > 0 and results["ceilings"]["matmul_TFLOPs"] > 0
    assert set(results["shapes"]) >= {"S1", "S5", "S1-sweep"}
    cases = {c["id"]: c for c in results["cases"]}
    for p in ("fwd", "bwd", "fwdbwd"):
        for impl in ("naive", "moelora-torch", "torch-dense"):
            c = cases[f"S1/delta/{p}/{impl}"]
            assert c["status"] == "ok", c
            assert len(c["times_ms"]) == c["n"] >= 3
            assert c["median_ms"] > 0 and c["GBps"] > 0 and c["TFLOPs"] > 0 and c["floor_ms"] > 0
            assert c["rel_err_vs_reference"] < 1e-5
        assert cases[f"S1/layer/{p}/linear-frozen"]["status"] == "ok"
        assert cases[f"S5/ffn/{p}/naive-ffn"]["status"] == "ok"
        assert cases[f"S1/delta/{p}/moelora-triton"]["status"] == "skipped"
    assert cases["S1/delta/fwdbwd/moelora-torch"]["saved_bytes"] > 0
    assert "speedup_vs_naive" in cases["S1/delta/fwdbwd/moelora-torch"]
    assert "ratio_vs_linear" in cases["S1/layer/fwdbwd/linear-frozen"]
    assert any(c["group"] == "sweep" and c["tokens"] == 64 and c["status"] == "ok" for c in results["cases"])
    assert results["checks"]["cuda_graph_S1"]["status"] == "skipped"
    assert results["plot"]["path"] and Path(results["plot"]["path"]).stat().st_size > 1000
    assert {t["status"] for t in results["targets"]} <= {"met", "missed", "not measured"}
    out = capsys.readouterr().out
    assert "GPU numbers need a GPU" in out and "S1/delta/fwd/naive" in out
    assert targets.main([str(path)]) == 0


def test_time_budget_records_skips(tmp_path):
    results, _ = _run(tmp_path, "--shapes", "S2", "--no-sweep", "--time-budget", "0", "--markdown")
    statuses = {c["status"] for c in results["cases"]}
    assert statuses == {"skipped"}
    assert any(c.get("reason") == "time budget exhausted" for c in results["cases"])
    assert results["plot"]["skipped"]


@pytest.mark.parametrize("impl", ["naive"])
def test_skip_option(tmp_path, impl):
    results, _ = _run(tmp_path, "--shapes", "S4", "--no-sweep", "--skip", impl, "--passes", "fwd")
    c = [c for c in results["cases"] if c["impl"] == impl]
    assert c and all(x["status"] == "skipped" and x["reason"] == "excluded with --skip" for x in c)
