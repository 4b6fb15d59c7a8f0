"""benchmarks/tune_grouped.py runs end to end (on CPU: tiny shapes under the interpreter) and
writes a report whose paste lines are valid Python for the tables they name."""

import json

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
    assert all(c["dense_ms"] > 0 and c["grouped_ms"] > 0 for c in report["regime"]["cases"])
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
