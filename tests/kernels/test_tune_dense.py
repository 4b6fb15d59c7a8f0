"""benchmarks/tune_dense.py runs end to end (on CPU: tiny shapes under the interpreter) and
writes a report whose paste lines are valid Python for DENSE_CONFIGS, and whose tables
``python -m benchmarks --tuned`` installs (benchmarks/tuned.py)."""

import json

import pytest
import torch

from benchmarks import tune_dense, tuned
from moelora.kernels import launchers as K


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs at full size (about a minute): "
                    "the GPU session runs it itself")
def test_tune_dense_smoke(tmp_path):
    before = dict(K.DENSE_CONFIGS)
    out = tmp_path / "tune.json"
    assert tune_dense.main(["--out", str(out), "--budget", "300"]) == 0
    assert K.DENSE_CONFIGS == before  # the run restores the table it tuned against
    report = json.loads(out.read_text())
    assert not report["skipped"] and not report["errors"]
    assert {cls.split(":")[0] for cls in report["tiles"]} == set(K.DENSE_TILE_KEYS)
    for entry in report["tiles"].values():
        assert set(entry["candidates"]) == {"{}"} | {json.dumps(t, sort_keys=True) for t in
                                                     tune_dense.tile_candidates.DENSE_SMOKE[entry["kernel"]]}
        assert entry["best"] in entry["candidates"] and entry["default_ms"] > 0 and entry["best_ms"] > 0
        assert list(entry["best_per_job"]) == entry["jobs"]
        assert all(job["ms"] > 0 and job["memory_floor_ms"] > 0 for job in entry["best_per_job"].values())
    assert report["ceilings"]["copy_GBps"] > 0
    for label in ("default tiles", "tuned tiles"):
        for timings in ("end_to_end", "end_to_end_wall"):
            assert set(report[timings][label]) == {"moe_lora fwd+bwd", "MoELoRALinear fwd+bwd"}


def test_paste_and_install_of_a_dense_report(tmp_path, monkeypatch):
    monkeypatch.setattr(K, "DENSE_CONFIGS", {})
    picks = {"gated_expand:lm:many": dict(BLOCK_T=128, BLOCK_N=64, num_warps=4),
             "matmul:ls:few": dict(BLOCK_M=32, num_stages=4)}
    report = {"dense_configs": picks,
              "tiles": {cls: {"best_ms": 0.05, "default_ms": 0.16} for cls in picks}}
    table = {}
    paste = tune_dense.paste_text(report)
    exec("\n".join(line for line in paste.splitlines() if not line.startswith("#"))
         .replace("Dict[str, Dict[str, int]]", "dict"), {}, table)
    assert table["DENSE_CONFIGS"] == picks
    assert max(map(len, paste.splitlines())) <= 120  # pasted as it is, it passes tests/test_style.py
    path = tmp_path / "tune-dense.json"
    path.write_text(json.dumps(report))
    assert tuned.install([str(path)]) == {str(path): {"dense_configs": picks}}
    assert K.DENSE_CONFIGS == picks
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dense_configs": {"gated_expand:lm:many": {"BLOCK_M": 64}}}))
    with pytest.raises(ValueError, match="gated_expand tiles may set"):
        tuned.install([str(bad)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"cases": []}))
    with pytest.raises(ValueError, match="no tuned table"):
        tuned.install([str(other)])
    K.install_dense_configs({})  # drop the launch configurations cached with the picks
