"""benchmarks/tune_grouped.py runs end to end (on CPU: tiny shapes under the interpreter) and
writes a report whose paste lines are valid Python for the tables they name."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import tune_grouped, tuned
from moelora.kernels.launchers import TileConfig
from moelora.ops import moe_lora as moe_lora_module


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs at full size (about 90 s): "
                    "the GPU session runs it itself")
def test_tune_grouped_smoke(tmp_path, monkeypatch, request):
    monkeypatch.setattr(tune_grouped.K, "GROUPED_CONFIGS", {})  # the run installs its picks here
    request.addfinalizer(tune_grouped.K.clear_launch_caches)  # configurations cached from them go with it
    out = tmp_path / "tune.json"
    assert tune_grouped.main(["--out", str(out), "--budget", "300"]) == 0
    report = json.loads(out.read_text())
    assert report["tiles"] and not report["skipped"] and not report["errors"]
    for entry in report["tiles"].values():
        assert entry["best"] in entry["candidates"] and entry["triton_best_ms"] > 0
    assert set(report["ffn"]["fwd_bwd_ms"]) >= {"gemm=triton,wgrad=triton"}
    assert set(report["ffn"]["fwd_bwd_wall_ms"]) == set(report["ffn"]["fwd_bwd_ms"])
    assert all(c[f"{regime}{timing}"] > 0 for c in report["regime"]["cases"] for regime in ("dense", "grouped")
               for timing in ("_ms", "_wall_ms"))
    table = {}
    exec("\n".join(line for line in report["paste"].splitlines() if not line.startswith(("#", "    (")))
         .replace("Dict[str, TileConfig]", "dict"), {"TileConfig": TileConfig, "torch": torch}, table)
    assert set(table["GROUPED_CONFIGS"]) == set(report["tiles"]) and table["DENSE_MAX_WIDTH"] >= 0
    # the same picks as data, which ``python -m benchmarks --tuned`` installs
    assert {cls: TileConfig(*tiles) for cls, tiles in report["grouped_configs"].items()} == table["GROUPED_CONFIGS"]
    monkeypatch.setattr(tune_grouped.K, "GROUPED_CONFIGS", {})
    monkeypatch.setattr(moe_lora_module, "DENSE_MAX_WIDTH", -1)
    installed = tuned.install([str(out)])[str(out)]
    assert tune_grouped.K.GROUPED_CONFIGS == table["GROUPED_CONFIGS"]
    assert moe_lora_module.DENSE_MAX_WIDTH == table["DENSE_MAX_WIDTH"] == installed["dense_max_width"]


def test_regime_threshold_is_the_cheapest_on_the_committed_h200_cases():
    """The threshold the tuner picks from the H200 run's regime cases is DENSE_MAX_WIDTH as
    committed (dense wins up to E*r 1024 at k 2 and 4, grouped at 2048); with mixed results at
    one width it is the one that costs the cases least in total; of equal ones, the nearest to
    the current threshold."""
    report = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "results"
                         / "tune-grouped-nvidia-h200-20261128T190225.json").read_text())
    cases = [dict(c, width=c["E"] * c["r"]) for c in report["regime"]["cases"]]
    assert tune_grouped.best_threshold(cases, 256) == moe_lora_module.DENSE_MAX_WIDTH == 1024
    made_up = [dict(width=512, dense_ms=1.0, grouped_ms=2.0), dict(width=1024, dense_ms=2.0, grouped_ms=1.5),
               dict(width=1024, dense_ms=1.0, grouped_ms=1.1), dict(width=2048, dense_ms=3.0, grouped_ms=1.0)]
    assert tune_grouped.best_threshold(made_up, 0) == 512  # in all 4.6 ms; 1024: 5.0, 0: 5.6, 2048: 7.0
    tie = [dict(width=512, dense_ms=1.0, grouped_ms=1.0)]  # 0 and 512 cost the same
    assert tune_grouped.best_threshold(tie, 400) == 512 and tune_grouped.best_threshold(tie, 100) == 0
    assert tune_grouped.best_threshold([], 777) == 777


def test_rows_engine_is_the_pick_of_the_committed_h200_run(monkeypatch):
    """moe_lora.ROWS_ENGINES as committed is what the tuner picks from the H200 run (S3's rows:
    grouped_mm 0.426 ms against 0.741 ms for the best Triton tile); a slower grouped_mm picks
    Triton; nothing is picked where grouped_mm is not native or the class holds other GEMMs."""
    report = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "results"
                         / "tune-grouped-nvidia-h200-20261128T190225.json").read_text())
    monkeypatch.setattr(tune_grouped, "native_major", lambda device: 9)
    major, shape_class, engine = tune_grouped.rows_engine_pick(report)
    assert moe_lora_module.ROWS_ENGINES == {(major, shape_class): engine} == {(9, "matmul:ls:many"): "grouped_mm"}
    entry = report["tiles"][shape_class]
    entry["grouped_mm_ms"][tune_grouped.ROWS_GEMM] = entry["triton_best_ms"] * 1.01
    assert tune_grouped.rows_engine_pick(report) == [9, shape_class, "triton"]
    entry["gemms"].append("another GEMM of the class")
    assert tune_grouped.rows_engine_pick(report) is None
    monkeypatch.setattr(tune_grouped, "native_major", lambda device: None)
    entry["gemms"].pop()
    assert tune_grouped.rows_engine_pick(report) is None


def test_tuned_installs_the_rows_engines(tmp_path, monkeypatch):
    monkeypatch.setattr(moe_lora_module, "ROWS_ENGINES", {})
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"grouped_configs": {}, "rows_engines": [[9, "matmul:ls:few", "grouped_mm"]]}))
    assert tuned.install([str(path)])[str(path)] == {"rows_engines": [[9, "matmul:ls:few", "grouped_mm"]]}
    assert moe_lora_module.ROWS_ENGINES == {(9, "matmul:ls:few"): "grouped_mm"}
