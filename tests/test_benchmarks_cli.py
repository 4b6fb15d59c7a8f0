"""The benchmark CLI's CPU default runs end to end and writes the expected JSON and PNG."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks import cli, impls, targets  # noqa: E402
from moelora.kernels import launchers  # noqa: E402


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
    assert results["shapes"]["S1-sweep"]["tokens"] == [32, 64]  # the planned points (was the first one's count)
    cases = {c["id"]: c for c in results["cases"]}
    for p in ("fwd", "bwd", "fwdbwd"):
        for impl in ("naive", "moelora-torch", "torch-dense"):
            c = cases[f"S1/delta/{p}/{impl}"]
            assert c["status"] == "ok", c
            assert len(c["times_ms"]) == c["n"] >= 3
            assert c["median_ms"] > 0 and c["GBps"] > 0 and c["TFLOPs"] > 0 and c["floor_ms"] > 0
            assert c["rel_err_vs_reference"] < 1e-5
        assert cases[f"S1/layer/{p}/linear-frozen"]["status"] == "ok"
        assert cases[f"S1/layer/{p}/linear-frozen-autocast"]["status"] == "ok"
        assert cases[f"S1/layer/{p}/moelora-MoELoRALinear-autocast"]["status"] == "ok"
        assert cases[f"S5/ffn/{p}/naive-ffn"]["status"] == "ok"
        assert cases[f"S5/ffn/{p}/moelora-ffn"]["status"] == "ok"  # moelora.moe_ffn: its torch backend here
        assert cases[f"S1/delta/{p}/moelora-triton"]["status"] == "skipped"
    assert cases["S1/delta/fwdbwd/moelora-torch"]["saved_bytes"] > 0
    # the decode pass: S1's layer group in inference at 8 tokens (one sequence each), checked like the others
    assert results["shapes"]["S1-decode"]["tokens"] == 8 and results["shapes"]["S1-decode"]["sequence_len"] == 1
    decode = {i: c for i, c in cases.items() if c["pass"] == "decode"}
    assert set(decode) == {f"S1@T8/layer/decode/{n}" for n in impls.DECODE}
    for case_id, c in decode.items():
        if c["impl"] == "moelora-layer":
            assert c["status"] == "skipped"  # moelora's Triton backend: GPU only
            continue
        assert c["status"] == "ok" and c["shape"] == "S1" and c["tokens"] == 8 and c["group"] == "layer", c
        assert c["median_ms"] > 0 and c["host_median_ms"] > 0 and c["kernels_per_iter"] > 0
        assert c["rel_err_vs_reference"] < 1e-5
        assert c["saved_bytes"] == 0  # nothing kept for a backward under torch.inference_mode
        assert "ratio_vs_linear" in c and c["flops"] > 0
    assert "speedup_vs_naive" in cases["S1/delta/fwdbwd/moelora-torch"]
    assert "ratio_vs_linear" in cases["S1/layer/fwdbwd/linear-frozen"]
    assert any(c["group"] == "sweep" and c["tokens"] == 64 and c["status"] == "ok" for c in results["cases"])
    assert results["checks"]["cuda_graph_S1"]["status"] == "skipped"
    assert results["plot"]["path"] and Path(results["plot"]["path"]).stat().st_size > 1000
    host = {r["case"]: r for r in results["host_overhead"]}
    assert "error" not in host and all(r["host_us"] > 0 for r in host.values())
    assert all(r["kernels"] > 0 for r in host.values() if r["aten"] is not None)  # compiled rows: Triton only
    # the kernels by name, in launch order, beside their counts
    assert all(len(r["triton_kernels"]) == r["triton"] for r in host.values())
    assert all(r["aten_ops"] is None if r["aten"] is None else len(r["aten_ops"]) == r["aten"] for r in host.values())
    assert host["moe_lora fwd"]["triton_kernels"] == ["lora_down_kernel", "gated_expand_kernel"]
    assert host["frozen nn.Linear fwd+bwd"]["aten_ops"] in (["addmm", "mm"], ["mm", "mm"])
    assert {"MoELoRALinear fwd+bwd (E 128, grouped)", "MoEFFN fwd+bwd (SwiGLU, softmax_topk)"} <= set(host)
    # the grouped row runs the grouped regime (its sort and grouped GEMMs), not the dense one
    grouped, dense = host["MoELoRALinear fwd+bwd (E 128, grouped)"], host["MoELoRALinear fwd+bwd (softmax_topk)"]
    assert grouped["triton"] > dense["triton"]
    # the compiled layer launches the eager layer's Triton kernels; the compiled Linear none
    assert host["MoELoRALinear fwd+bwd (softmax_topk), torch.compile"]["triton"] == dense["triton"]
    assert host["frozen nn.Linear fwd+bwd, torch.compile"]["triton"] == 0
    # under autocast the layer launches the same Triton kernels (the casts are ATen ops)
    assert host["MoELoRALinear fwd+bwd (softmax_topk), autocast"]["triton"] == dense["triton"]
    assert {t["status"] for t in results["targets"]} <= {"met", "missed", "not measured"}
    out = capsys.readouterr().out
    assert "GPU numbers need a GPU" in out and "S1/delta/fwd/naive" in out
    assert "S1@T8/layer/decode/moelora-MoELoRALinear-task " in out  # the decode cases are in the table
    assert targets.main([str(path)]) == 0


def test_decode_pass_alone(tmp_path):
    """--passes decode times only S1's layer group in inference, at --decode-tokens tokens."""
    results, _ = _run(tmp_path, "--shapes", "S1,S2", "--passes", "decode", "--decode-tokens", "3",
                      "--no-host-overhead", "--no-graph-check")
    assert results["cases"] and {c["pass"] for c in results["cases"]} == {"decode"}
    assert {c["tokens"] for c in results["cases"]} == {3}
    assert {c["status"] for c in results["cases"] if c["impl"] != "moelora-layer"} == {"ok"}
    assert "S1-sweep" not in results["shapes"] and "S2" in results["shapes"]


@pytest.mark.parametrize("extra, message", [(["--passes", "fwd,infer"], "unknown passes ['infer']"),
                                            # ran nothing, wrote an empty results file, exit 0
                                            (["--passes", ","], "--passes names no pass"),
                                            (["--decode-tokens", "0"], "--decode-tokens must be a positive"),
                                            # were read after the whole suite had run: a traceback, no table
                                            (["--sweep-tokens", "32,1k"], "--sweep-tokens wants comma-separated"),
                                            (["--sweep-tokens", "0"], "--sweep-tokens wants comma-separated"),
                                            # two cases recorded under one id
                                            (["--sweep-tokens", "32,64,32"], "--sweep-tokens wants comma-separated"),
                                            # was ignored: the implementation ran
                                            (["--skip", "moelora-trch"], "--skip: unknown implementations"),
                                            # 0 fell back to the default, -2 failed every case (KeyError)
                                            (["--repeats", "-2"], "--repeats must be at least 1, got -2"),
                                            (["--repeats", "0"], "--repeats must be at least 1, got 0"),
                                            (["--sweep-share", "1.5"], "--sweep-share must be in [0, 1)"),
                                            (["--case-cap", "-1"], "--case-cap must be positive"),
                                            # all the time would go to the sweep, none to the suite
                                            (["--sweep-share", "1"], "--sweep-share must be in [0, 1)"),
                                            (["--min-repeats", "0"], "--min-repeats must be at least 1, got 0"),
                                            (["--warmup", "-1"], "--warmup must be non-negative, got -1"),
                                            # acted as 0 without a word
                                            (["--cpu-threads", "-2"], "--cpu-threads must be non-negative, got -2"),
                                            (["--max-restarts", "-1"], "--max-restarts must be non-negative"),
                                            # ran more repeats than --repeats asked for
                                            (["--repeats", "3", "--min-repeats", "4"],
                                             "--min-repeats must be at most --repeats (3), got 4"),
                                            (["--shapes", "S1,S9"], "unknown shapes ['S9']")])
def test_bad_options_are_refused_before_anything_runs(tmp_path, capsys, extra, message):
    assert cli.main(["--device", "cpu", "--out-dir", str(tmp_path), "--shapes", "S1", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TUNE_REPORT = RESULTS_DIR / "tune-dense-nvidia-h200-20261128T193823.json"


def _bad_files(tmp_path):
    """A missing file, a file that is not JSON, a JSON list and a tuner's report (not a results file)."""
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "list.json").write_text("[1, 2]")
    return {"missing": (tmp_path / "missing.json", "cannot read it"), "bad": (tmp_path / "bad.json", "not a JSON file"),
            "list": (tmp_path / "list.json", "not a results file"), "tune": (TUNE_REPORT, "not a results file")}


@pytest.mark.parametrize("option, kind", [("--resume", "missing"), ("--resume", "bad"), ("--resume", "tune"),
                                          ("--tuned", "missing"), ("--tuned", "bad"), ("--tuned", "list"),
                                          ("--out-dir", "file"), ("--out-dir", "under_file")])
def test_files_that_cannot_be_read_or_written_are_refused_before_anything_runs(tmp_path, capsys, option, kind):
    """--resume / --tuned naming a missing, malformed or other file, and an --out-dir that cannot be made a
    directory, exit 2 naming the option and the file (were tracebacks: --out-dir's after the first group ran)."""
    out_dir = tmp_path / "out"
    (tmp_path / "afile").write_text("x")
    files = {**_bad_files(tmp_path), "file": (tmp_path / "afile", "is not a directory"),
             "under_file": (tmp_path / "afile" / "sub", "is not a directory")}
    path, message = files[kind]
    message = "no tuned table" if (option, kind) == ("--tuned", "list") else message
    out_dir = path if option == "--out-dir" else out_dir
    argv = ["--device", "cpu", "--shapes", "S4", "--no-sweep", "--passes", "fwd", "--no-host-overhead"]
    assert cli.main([*argv, "--out-dir", str(out_dir), *([option, str(path)] if option != "--out-dir" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{option}") and str(path) in err and message in err, err
    assert not list(tmp_path.rglob("bench-*.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_device_cuda_without_a_gpu_says_so(tmp_path, capsys):
    """--device cuda on a machine without CUDA: exit 2 saying so (was an AssertionError deep in torch.cuda)."""
    assert cli.main(["--device", "cuda", "--out-dir", str(tmp_path)]) == 2
    assert "--device cuda: no CUDA device" in capsys.readouterr().err


def test_targets_refuse_what_is_not_a_results_file_and_accept_the_committed_ones(tmp_path, capsys):
    """python -m benchmarks.targets FILE: exit 2 naming the file for a missing, malformed or other JSON (were
    tracebacks; a tuner's report read every target "not measured"), 0 with every target for the committed runs
    and for any other run in benchmarks/results (README's main job writes a CPU run there, whose targets follow a
    note that they are defined for the GPU suite)."""
    for path, message in _bad_files(tmp_path).values():
        assert targets.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(str(path)) and message in err, err
    runs = sorted(RESULTS_DIR.glob("bench-*.json"))
    assert any("nvidia" in path.name for path in runs)  # the committed GPU runs
    for path in runs:
        assert targets.main([str(path)]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("note: ")]
        assert len(lines) == 11 and all(line.split()[0] in ("met", "missed", "not") for line in lines), lines


@pytest.mark.parametrize("module, argv, message", [
    ("tune_dense", ["--repeats", "0"], "--repeats must be at least 1, got 0"),  # recorded KeyErrors, exit 0
    ("tune_dense", ["--out", "{tmp}/afile/t.json"], "afile is not a directory"),  # lost the run's measurements
    ("tune_dense", ["--budget", "-1"], "--budget must be non-negative"),
    ("tune_grouped", ["--repeats", "-1"], "--repeats must be at least 1, got -1"),
    ("tune_grouped", ["--out", "{tmp}"], "is a directory"),
    ("bench_routing", ["--repeats", "0"], "--repeats must be at least 1, got 0"),  # StatisticsError
    ("bench_routing", ["--warmup", "-1"], "--warmup must be non-negative"),
    ("bench_routing", ["--out", "{tmp}/missing/r.json"], "cannot write a file there"),  # after the timings
])
def test_tuners_and_routing_benchmark_refuse_bad_options_before_measuring(tmp_path, capsys, monkeypatch,
                                                                          module, argv, message):
    import importlib

    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    argv = argv if "--out" in argv else ["--out", str(tmp_path / "r.json"), *argv]
    mod = importlib.import_module(f"benchmarks.{module}")
    monkeypatch.setattr(sys, "argv", [module, *argv])  # bench_routing.main reads sys.argv
    with pytest.raises(SystemExit) as info:
        mod.main(argv) if module != "bench_routing" else mod.main()
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("module", ["compile_kernels", "hostcost"])
def test_help_prints_usage_instead_of_running(capsys, module):
    """--help of compile_kernels (minutes of compiles) and hostcost ran the whole job; an unknown option too."""
    import importlib

    mod = importlib.import_module(f"benchmarks.{module}")
    with pytest.raises(SystemExit) as info:
        mod.main(["--help"])
    assert info.value.code == 0 and f"python -m benchmarks.{module}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        mod.main(["--no-such-option"])
    assert info.value.code == 2


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


def test_resume_keeps_recorded_cases(tmp_path):
    first, path = _run(tmp_path, "--shapes", "S4", "--no-sweep", "--passes", "fwd")
    before = {c["id"]: c["times_ms"] for c in first["cases"] if c["status"] == "ok"}
    rc = cli.main(["--device", "cpu", "--out-dir", str(tmp_path), "--repeats", "3", "--shapes", "S4,S2",
                   "--no-sweep", "--passes", "fwd", "--resume", str(path)])
    assert rc == 0
    resumed = json.loads(path.read_text())
    assert resumed["meta"]["restarts"] == 1
    ids = [c["id"] for c in resumed["cases"]]
    assert len(ids) == len(set(ids))  # nothing recorded twice
    for case_id, times in before.items():  # recorded cases were kept, not re-run
        assert next(c for c in resumed["cases"] if c["id"] == case_id)["times_ms"] == times
    assert any(i.startswith("S2/delta/fwd/") for i in ids)


def test_lost_device_saves_and_restarts(tmp_path, monkeypatch):
    """A failure that kills the CUDA context: results are saved, then the process re-executes itself."""
    from benchmarks import impls, runner

    class Exec(Exception):
        pass

    def broken(shape, s):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def fake_execv(exe, argv):
        raise Exec(argv)

    monkeypatch.setattr(impls.by_name("torch-dense"), "prepare", broken)
    monkeypatch.setattr(runner, "cuda_alive", lambda device: False)
    monkeypatch.setattr(cli.os, "execv", fake_execv)
    with pytest.raises(Exec) as info:
        cli.main(["--device", "cpu", "--out-dir", str(tmp_path), "--repeats", "3", "--shapes", "S4,S2",
                  "--no-sweep", "--passes", "fwd"])
    argv = info.value.args[0]
    path = Path(argv[argv.index("--resume") + 1])
    assert argv[1:3] == ["-m", "benchmarks"] and "--shapes" in argv
    results = json.loads(path.read_text())
    assert results["meta"]["device_lost_events"][0]["last_case"] == "S2/delta/fwd/torch-dense"  # S2 runs first
    assert next(c for c in results["cases"] if c["impl"] == "torch-dense")["status"] == "error"
    assert not any(c["shape"] == "S4" for c in results["cases"])

    monkeypatch.undo()  # the "new process": a working device again
    assert cli.main(argv[3:]) == 0
    resumed = {c["id"]: c for c in json.loads(path.read_text())["cases"]}
    assert resumed["S2/delta/fwd/torch-dense"]["status"] == "error"
    assert resumed["S2/delta/fwd/moelora-torch"]["status"] == "ok"
    assert resumed["S4/delta/fwd/naive"]["status"] == "ok"
    assert resumed["S4/delta/fwd/torch-dense"]["status"] == "skipped"
    assert "CUDA context" in resumed["S4/delta/fwd/torch-dense"]["reason"]


def test_failing_backend_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """moelora's Triton cases forced to run here fail (no GPU / no kernels): recorded per case."""
    from benchmarks import impls

    for name in ("moelora-triton", "moelora-triton-dense", "moelora-triton-grouped"):
        monkeypatch.setattr(impls.by_name(name), "probe", lambda shape, device: None)
    monkeypatch.setattr(impls.by_name("moelora-triton"), "prepare",
                        lambda shape, s: (_ for _ in ()).throw(RuntimeError("kernel exploded")))
    results, _ = _run(tmp_path, "--shapes", "S4", "--no-sweep", "--passes", "fwd,fwdbwd")
    cases = {c["id"]: c for c in results["cases"]}
    assert cases["S4/delta/fwd/moelora-triton"]["status"] == "error"
    assert "kernel exploded" in cases["S4/delta/fwd/moelora-triton"]["error"]
    assert cases["S4/delta/fwdbwd/moelora-triton-grouped"]["status"] in ("error", "ok")
    assert cases["S4/delta/fwdbwd/naive"]["status"] == "ok"
    assert cases["S4/delta/fwdbwd/moelora-torch"]["status"] == "ok"


def test_hard_deadline_saves_and_exits(tmp_path, monkeypatch, capsys):
    """A case that hangs past --hard-deadline: the watchdog writes the JSON, prints the summary, exits."""
    import threading
    import time

    from benchmarks import impls

    exited = threading.Event()
    monkeypatch.setattr(cli.os, "_exit", lambda code: exited.set())
    monkeypatch.setattr(impls.by_name("torch-dense"), "prepare",
                        lambda shape, s: (time.sleep(2.0), (_ for _ in ()).throw(RuntimeError("hung")))[1])
    cli.main(["--device", "cpu", "--out-dir", str(tmp_path), "--repeats", "3", "--shapes", "S4",
              "--no-sweep", "--passes", "fwd", "--hard-deadline", "0.5"])
    assert exited.is_set()
    results = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert results["meta"]["hard_deadline_hit"] is True
    assert "hard deadline reached" in capsys.readouterr().out


def test_targets_read_eager_medians_and_show_device_time_ratios():
    def case(impl, group, median, device=None, tokens=8192, shape="S1"):
        c = {"shape": shape, "group": group, "pass": "fwdbwd", "impl": impl, "tokens": tokens, "status": "ok",
             "median_ms": median, "host_median_ms": median}
        return c if device is None else {**c, "device_median_ms": device}

    results = {"cases": [case("moelora-MoELoRALinear", "layer", 1.4, 0.9), case("linear-frozen", "layer", 0.7, 0.72),
                         case("peft-lora", "layer", 1.0),
                         case("moelora-triton", "sweep", 0.4, 0.2, 512), case("torch-dense", "sweep", 0.3, 0.25, 512)]}
    found = {t["target"]: t for t in targets.evaluate(results)}
    layer = found["S1 MoELoRALinear fwd+bwd <= 1.15x frozen nn.Linear"]
    assert layer["status"] == "missed" and layer["detail"].startswith("2.000x")
    assert "device time 1.250x" in layer["detail"]
    peft = found["S1 MoELoRALinear fwd+bwd faster than PEFT LoRA"]
    assert peft["status"] == "missed" and "device time" not in peft["detail"]  # PEFT's case has no device time
    sweep = found["moelora-triton <= torch-dense at every S1 sweep point"]
    assert sweep["status"] == "missed" and "T512 fwdbwd 1.33x; device time 0.800x" in sweep["detail"]


def test_profile_writes_one_table_per_case(tmp_path, capsys):
    """--profile takes comma-separated cases (gpu_session.sh profiles S1's layer and S3's grouped delta);
    a bad id fails the run without keeping the others from being profiled."""
    cases = "S3/delta/fwdbwd/moelora-torch,S1/layer/fwd/linear-frozen"
    rc = cli.main(["--device", "cpu", "--out-dir", str(tmp_path), "--profile", cases])
    assert rc == 0
    for case in cases.split(","):
        text = (tmp_path / f"profile-{case.replace('/', '-')}.txt").read_text()
        assert text.startswith(f"{case} on cpu") and "device kernels per iteration" in text
    rc = cli.main(["--device", "cpu", "--out-dir", str(tmp_path / "bad"), "--profile",
                   "S3/delta/fwd/no-such-impl,S1/delta/fwd/moelora-torch"])
    assert rc == 2
    assert "--profile wants shape/group/pass/implementation" in capsys.readouterr().err
    assert (tmp_path / "bad" / "profile-S1-delta-fwd-moelora-torch.txt").exists()


@pytest.mark.parametrize("case, message", [
    ("S1@T0/delta/fwd/naive", "--profile wants"),  # profiled an empty case
    ("S1@T-4/delta/fwd/naive", "--profile wants"),  # a traceback from torch (negative dimension)
    ("S1@T8/delta/decode/naive", "the decode pass times the layer group only"),  # timed a case the suite has not
    ("S5/ffn/decode/naive-ffn", "the decode pass times the layer group only")])
def test_profile_refuses_a_token_count_below_1_and_the_decode_pass_outside_the_layer_group(
        tmp_path, capsys, case, message):
    assert cli.main(["--device", "cpu", "--out-dir", str(tmp_path), "--profile", case]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_profile_reports_on_stderr_and_goes_on_after_a_case_that_fails(tmp_path, capsys, monkeypatch):
    """gpu_session.sh keeps --profile's stderr (its log) and drops its stdout (the tables, which it
    keeps as files): why a case was not profiled goes to stderr, and a case whose implementation
    raises does not keep the next one from being profiled (it ended the whole run before)."""
    monkeypatch.setattr(impls.by_name("torch-dense"), "prepare",
                        lambda shape, s: (_ for _ in ()).throw(RuntimeError("kernel exploded")))
    cases = "S2/delta/fwd/torch-dense,S2/delta/fwd/moelora-triton,S2/delta/fwd/moelora-torch"
    assert cli.main(["--device", "cpu", "--out-dir", str(tmp_path), "--profile", cases]) == 2
    err = capsys.readouterr().err
    assert "S2/delta/fwd/torch-dense failed" in err and "kernel exploded" in err
    assert "S2/delta/fwd/moelora-triton cannot run here" in err
    assert [p.name for p in tmp_path.iterdir()] == ["profile-S2-delta-fwd-moelora-torch.txt"]


def test_profile_takes_decode_cases_and_refuses_unknown_passes(tmp_path, capsys):
    """--profile runs the decode pass's ids as the JSON names them (S1@T8/layer/decode/...); an unknown
    pass is refused (it was profiled as the backward)."""
    case = "S1@T8/layer/decode/moelora-MoELoRALinear"
    assert cli.main(["--device", "cpu", "--out-dir", str(tmp_path), "--profile", case]) == 0
    assert (tmp_path / "profile-S1-T8-layer-decode-moelora-MoELoRALinear.txt").read_text().startswith(f"{case} on cpu")
    assert cli.main(["--device", "cpu", "--out-dir", str(tmp_path / "bad"), "--profile", "S1/layer/xyz/peft-lora"]) == 2
    assert "--profile wants shape/group/pass/implementation" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_ffn_target_reads_the_compute_floor_not_the_larger_floor():
    """Issue 11's S5 target is against the compute floor; a case whose memory floor is larger
    (floor_ms = max of both) must not be judged against the memory floor."""
    ffn = {"shape": "S5", "group": "ffn", "pass": "fwdbwd", "impl": "moelora-ffn", "tokens": 8192, "status": "ok",
           "median_ms": 6.0, "floor_ms": 5.0, "memory_floor_ms": 5.0, "compute_floor_ms": 3.0}
    found = {t["target"]: t for t in targets.evaluate({"cases": [ffn]})}
    t = found["S5 moe_ffn fwd+bwd <= 1.4x the compute floor"]
    assert t["status"] == "missed" and t["detail"].startswith("2.00x"), t


def test_faster_than_peft_is_strict():
    """Issue 10: MoELoRALinear "faster than PEFT's single LoRA": a tie is not faster."""
    def case(impl, median):
        return {"shape": "S1", "group": "layer", "pass": "fwdbwd", "impl": impl, "tokens": 8192, "status": "ok",
                "median_ms": median}

    found = {t["target"]: t for t in targets.evaluate({"cases": [case("moelora-MoELoRALinear", 1.0),
                                                                 case("peft-lora", 1.0)]})}
    assert found["S1 MoELoRALinear fwd+bwd faster than PEFT LoRA"]["status"] == "missed"


def test_sweep_target_is_not_met_when_points_are_missing():
    """"At every S1 sweep point": a point where either side did not run (an error, the time budget)
    leaves the target unmeasured, not met."""
    def case(impl, p, tokens, median=None, status="ok"):
        c = {"shape": "S1", "group": "sweep", "pass": p, "impl": impl, "tokens": tokens, "status": status}
        return {**c, "median_ms": median} if status == "ok" else c

    cases = [case("moelora-triton", "fwd", 512, 0.1), case("torch-dense", "fwd", 512, 0.2),
             case("moelora-triton", "fwdbwd", 512, 0.1), case("torch-dense", "fwdbwd", 512, status="error"),
             case("moelora-triton", "fwd", 1024, status="skipped"), case("torch-dense", "fwd", 1024, 0.3)]
    found = {t["target"]: t for t in targets.evaluate({"cases": cases})}
    sweep = found["moelora-triton <= torch-dense at every S1 sweep point"]
    assert sweep["status"] == "not measured", sweep
    assert sweep["detail"].startswith("1 points") and "not measured at: T512 fwdbwd, T1024 fwd" in sweep["detail"]
    # a slower point is a miss whatever else is missing
    cases.append(case("moelora-triton", "fwdbwd", 2048, 0.5))
    cases.append(case("torch-dense", "fwdbwd", 2048, 0.4))
    found = {t["target"]: t for t in targets.evaluate({"cases": cases})}
    assert found["moelora-triton <= torch-dense at every S1 sweep point"]["status"] == "missed"


def test_sweep_target_is_not_met_when_planned_points_have_no_record():
    """The results name the sweep's planned token counts (shapes["S1-sweep"]["tokens"]); a run stopped by
    --hard-deadline (or a lost device) after the first point recorded nothing of the others. That partial
    sweep read "met at every S1 sweep point" over the one point it had; it is not measured."""
    cases = [{"shape": "S1", "group": "sweep", "pass": p, "impl": impl, "tokens": 512, "status": "ok",
              "median_ms": median} for impl, median in (("moelora-triton", 0.4), ("torch-dense", 0.5))
             for p in ("fwd", "fwdbwd")]
    name = "moelora-triton <= torch-dense at every S1 sweep point"
    full = {t["target"]: t for t in targets.evaluate({"cases": cases, "shapes": {"S1-sweep": {"tokens": [512]}}})}
    assert full[name]["status"] == "met", full[name]
    partial = {"cases": cases, "shapes": {"S1-sweep": {"tokens": [512, 1024]}}}
    t = {t["target"]: t for t in targets.evaluate(partial)}[name]
    assert t["status"] == "not measured" and "not measured at: T1024 fwd, T1024 fwdbwd" in t["detail"], t
    # results written before the planned list was kept name the first point's token count alone
    old = {t["target"]: t for t in targets.evaluate({"cases": cases, "shapes": {"S1-sweep": {"tokens": 512}}})}
    assert old[name]["status"] == "met", old[name]
    # issue 10 asks for forward and forward+backward: a run of one pass (--passes fwd) does not meet it
    forward = [c for c in cases if c["pass"] == "fwd"]
    t = {t["target"]: t for t in targets.evaluate({"cases": forward, "shapes": {"S1-sweep": {"tokens": [512]}}})}[name]
    assert t["status"] == "not measured" and "not measured at: T512 fwdbwd" in t["detail"], t


def test_eager_timing_launches_the_timed_iterations_back_to_back(monkeypatch):
    """The eager median times iterations launched back to back, as training runs them: no
    synchronize between the timed iterations (a synchronize before each would idle the device
    and add the host's latency to its first launch to every device-bound iteration, e.g. the
    frozen Linear that the 1.15x target divides by). The host enqueue time still comes from
    iterations that each start on an empty queue. CUDA faked: events record their place in a log."""
    import statistics

    import torch

    from benchmarks import runner
    from benchmarks.impls import Prepared
    from benchmarks.timing import Budget

    log = []

    class Event:
        def __init__(self, enable_timing=False):
            self.pos = None

        def record(self):
            self.pos = len(log)
            log.append("event")

        def elapsed_time(self, end):
            return float(self.pos)  # the begin event's place in the log

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.setattr(runner.kernels, "per_iteration", lambda step, device: None)
    monkeypatch.setattr(runner.memory, "peak_bytes", lambda call, device: None)
    ctx = runner.RunContext(device=torch.device("cuda"), dtype=torch.float32, repeats=6, warmup=1, min_repeats=3,
                            case_cap_s=1e9, budget=Budget(None), ceilings={}, log=lambda msg: None)
    prepared = [Prepared(lambda: log.append("step") or torch.zeros(1), [])]
    rec = {"shape": "S2"}
    runner._time_pass(ctx, "fwd", prepared, [{}], rec)
    begins = [int(t) for t in rec["times_ms"]]
    assert len(begins) == 6
    assert "sync" not in log[begins[0]:begins[-1] + 3], log[begins[0]:begins[-1] + 3]
    assert rec["host_median_ms"] is not None and 1 <= len(rec["host_ms"]) <= 6
    assert rec["host_median_ms"] == statistics.median(rec["host_ms"])  # the host's times, not the events'


def test_timed_iterations_continue_the_rotation_of_the_input_sets(monkeypatch):
    """Consecutive iterations touch different input sets: the timed loop takes up the rotation where the
    warm-up left it (warm-up on sets 0, 1; timed on 2, 0, 1), not again at set 0 (with one warm-up iteration
    that is the set just used, timed from a warm cache)."""
    from benchmarks import runner
    from benchmarks.impls import Prepared
    from benchmarks.timing import Budget

    used = []
    monkeypatch.setattr(runner.kernels, "per_iteration", lambda step, device: None)
    monkeypatch.setattr(runner.memory, "peak_bytes", lambda call, device: None)
    ctx = runner.RunContext(device=torch.device("cpu"), dtype=torch.float32, repeats=3, warmup=2, min_repeats=3,
                            case_cap_s=1e9, budget=Budget(None), ceilings={}, log=lambda msg: None)
    prepared = [Prepared(lambda k=k: used.append(k) or torch.zeros(1), []) for k in range(3)]
    runner._time_pass(ctx, "fwd", prepared, [{}] * 3, {"shape": "S2"})
    assert used == [0, 1, 2, 0, 1], used


def test_host_enqueue_targets_read_the_layer_cases():
    """Issue 10's host enqueue targets are per S1 forward+backward of the layer, base GEMM included
    ("moelora.moe_lora base + delta": 1.92 ms host; MoELoRALinear: 4.38 ms), not of the delta alone."""
    def case(impl, group, host):
        return {"shape": "S1", "group": group, "pass": "fwdbwd", "impl": impl, "tokens": 8192, "status": "ok",
                "median_ms": host, "host_median_ms": host, "kernels_per_iter": 7}

    found = {t["target"]: t for t in targets.evaluate({"cases": [case("moelora-triton", "delta", 0.2),
                                                                 case("moelora-layer", "layer", 0.3)]})}
    t = found["S1 host enqueue per fwd+bwd, moe_lora <= 0.25 ms"]
    assert t["status"] == "missed" and t["detail"].startswith("0.300 ms"), t


def test_peft_layer_bytes_are_one_adapters():
    """PEFT's case moves one LoRA's weights and no routing (its FLOPs count E = 1, k = 1 too): at
    S1 in bf16, x, y and W0 plus A [r, d_in] and B [d_out, r] forward; backward dy, x (for dA),
    dx and W0, the weights read and their gradients written."""
    from benchmarks import metrics
    from benchmarks.shapes import GPU_SUITE

    s = GPU_SUITE["S1"]
    T, d, r, elt = s.tokens, s.d_in, s.rank, 2
    lora, w0 = 2 * r * d * elt, d * d * elt
    c = metrics.counts(s, "layer", "peft-lora", elt)
    assert c["fwd"]["bytes"] == 2 * T * d * elt + lora + w0
    assert c["bwd"]["bytes"] == 3 * T * d * elt + 2 * lora + w0
    assert c["fwdbwd"]["bytes"] == c["fwd"]["bytes"] + c["bwd"]["bytes"]
    assert c["fwd"]["flops"] == 2 * T * d * d + 4 * T * d * r


def test_autocast_layer_bytes_count_the_fp32_x_and_base_weight():
    """The "-autocast" cases hold x and W0 in fp32 (mixed precision): at S1 in bf16 the fewest bytes
    read x and W0 (and write dx) at 4 bytes per element, y and dy at 2."""
    from benchmarks import metrics
    from benchmarks.shapes import GPU_SUITE

    s = GPU_SUITE["S1"]
    T, d = s.tokens, s.d_in
    lin = metrics.counts(s, "layer", "linear-frozen", 2)
    amp = metrics.counts(s, "layer", "linear-frozen-autocast", 2)
    assert amp["fwd"]["bytes"] == T * d * 4 + T * d * 2 + d * d * 4
    assert amp["bwd"]["bytes"] == T * d * 2 + T * d * 4 + d * d * 4
    assert amp["fwd"]["flops"] == lin["fwd"]["flops"]
    layer = metrics.counts(s, "layer", "moelora-MoELoRALinear", 2)
    layer_amp = metrics.counts(s, "layer", "moelora-MoELoRALinear-autocast", 2)
    assert layer_amp["fwd"]["bytes"] - layer["fwd"]["bytes"] == 2 * T * d + 2 * d * d  # x, W0
    assert layer_amp["bwd"]["bytes"] - layer["bwd"]["bytes"] == 2 * (2 * T * d) + 2 * d * d  # x, dx, W0
    assert metrics.counts(s, "layer", "linear-frozen-autocast", 4) == metrics.counts(s, "layer", "linear-frozen", 4)


def test_a_case_that_computes_something_else_is_an_error_not_a_timing(tmp_path, monkeypatch):
    """rel_err_vs_reference was recorded but never read: an implementation computing another function
    (here torch-dense with half the scaling) was an "ok" case whose median fed speedups, ratios and
    targets. Above the dtype's tolerance it is an error (timings kept, not compared)."""
    from benchmarks import baselines

    dense = baselines.moe_lora_dense
    monkeypatch.setattr(baselines, "moe_lora_dense", lambda x, a, b, ids, w, scaling=1.0, base_out=None:
                        dense(x, a, b, ids, w, scaling / 2, base_out=base_out))
    results, _ = _run(tmp_path, "--shapes", "S4", "--no-sweep", "--passes", "fwd,fwdbwd", "--no-host-overhead")
    cases = {c["id"]: c for c in results["cases"]}
    for p in ("fwd", "fwdbwd"):
        wrong = cases[f"S4/delta/{p}/torch-dense"]
        assert wrong["status"] == "error" and wrong["error"].startswith("wrong result: rel_err_vs_reference"), wrong
        assert wrong["rel_err_vs_reference"] > 0.1 and wrong["median_ms"] > 0 and "speedup_vs_naive" not in wrong
        right = cases[f"S4/delta/{p}/moelora-torch"]
        assert right["status"] == "ok" and right["rel_err_vs_reference"] < 1e-5 and "speedup_vs_naive" in right


def test_a_result_not_finite_or_above_the_tolerance_is_wrong():
    """REFERENCE_TOLERANCE[dtype] is the largest error of a correct result (inclusive); a NaN error (an output
    not finite) is wrong, not within it."""
    from benchmarks import runner

    tol = runner.REFERENCE_TOLERANCE[torch.float32]
    assert runner._wrong_result(tol, torch.float32) is None
    assert runner._wrong_result(tol * 1.01, torch.float32).startswith("wrong result: rel_err_vs_reference")
    assert runner._wrong_result(float("nan"), torch.float32).startswith("wrong result: rel_err_vs_reference nan")
    # impls.rel_err, which feeds it: an output not finite has error NaN, as its docstring says (not inf)
    ref = torch.randn(6)
    assert impls.rel_err(ref.clone(), ref) == 0.0 and abs(impls.rel_err(2 * ref, ref) - 1.0) < 1e-6
    assert math.isnan(impls.rel_err(torch.cat([ref[:-1], torch.tensor([float("inf")])]), ref))


def test_task_routed_layer_counts_one_expert_per_token():
    """MoELoRALinear's task router takes one expert per token (its top_k is ignored): the S1 "-task"
    case's FLOPs and bytes are those of k = 1, not of S1's k = 2 (which overstated its TFLOP/s and
    % of floor). At S1 in bf16: forward 2 T d d (base) + 2 T d r (shared A) + 2 T r d (one expert)."""
    from benchmarks import metrics
    from benchmarks.shapes import GPU_SUITE

    s = GPU_SUITE["S1"]
    T, d, r, E, elt = s.tokens, s.d_in, s.rank, s.experts, 2
    task = metrics.counts(s, "layer", "moelora-MoELoRALinear-task", elt)
    assert task["fwd"]["flops"] == 2 * T * d * d + 2 * T * d * r + 2 * T * r * d
    weights = (r * d + E * d * r) * elt
    assert task["fwd"]["bytes"] == 2 * T * d * elt + weights + T * 1 * 8 + d * d * elt
    assert task["bwd"]["flops"] == 2 * T * d * d + 2 * (2 * T * d * r + 2 * T * r * d)
    assert metrics.counts(s, "layer", "moelora-MoELoRALinear", elt)["fwd"]["flops"] == \
        task["fwd"]["flops"] + 2 * T * r * d  # top-2


@pytest.mark.parametrize("pass_name", ["bwd", "fwdbwd"])
def test_backward_passes_differentiate_the_aux_loss_the_forward_recorded(pass_name):
    """A training step's loss is y's plus the router's aux loss: the layer cases' backward passes
    differentiate both (before, y alone: the aux-loss backward of MoELoRALinear went untimed)."""
    from benchmarks import runner

    w = torch.randn(5, requires_grad=True)
    recorded = []

    def forward():
        recorded.append((w * w).sum() * 3)  # as MoELoRALinear's forward records last_aux_loss
        return w * 2

    prepared = [impls.Prepared(forward, [w], aux_loss=lambda: recorded[-1])]
    sets = [{"grad_out": torch.randn(5)}]
    step, _ = runner._steps(pass_name, prepared, sets)
    (grad,) = step(0)
    torch.testing.assert_close(grad, 2 * sets[0]["grad_out"] + 6 * w.detach())
    no_aux = [impls.Prepared(forward, [w])]
    (grad,) = runner._steps(pass_name, no_aux, sets)[0](0)
    torch.testing.assert_close(grad, 2 * sets[0]["grad_out"])


def test_moelora_linear_cases_hand_the_backward_their_aux_loss():
    from benchmarks import inputs, shapes

    shape = shapes.suite(on_gpu=False)["S1"]
    s = inputs.make_set(shape, torch.float32, torch.device("cpu"), seed=0)
    for name in ("moelora-MoELoRALinear", "moelora-MoELoRALinear-dropout", "moelora-MoELoRALinear-task"):
        prepared = impls.by_name(name).prepare(shape, s)
        prepared.forward()
        aux = prepared.aux_loss()
        assert (aux is None) == name.endswith("-task") and (aux is None or aux.requires_grad), name


def test_every_layer_case_adds_an_adapter_that_changes_y_and_trains():
    """Each layer case but the frozen Linear computes base + a non-zero adapter delta, and each trainable
    leaf gets a non-zero gradient: the "-task" case's per-task gates lora_gamma start at 0 (the layer's
    init), so it timed a zero delta whose A and B gradients were zero and whose reference check compared
    the base output alone (the H200 runs' rel_err_vs_reference equals the frozen Linear's)."""
    import torch.nn.functional as F

    from benchmarks import inputs, runner, shapes

    shape = shapes.suite(on_gpu=False)["S1"]
    s = inputs.make_set(shape, torch.float32, torch.device("cpu"), seed=0)
    base = F.linear(s["x"], s["w0"]).detach()
    for impl in impls.LAYER:
        if impl.name.startswith("linear-frozen") or impl.probe(shape, s["x"].device) is not None:
            continue
        prepared = impl.prepare(shape, s)
        y = prepared.forward()
        assert float((y.detach() - base).norm() / base.norm()) > 0.05, impl.name
        outputs, grads = runner._outputs(prepared, y, s)
        for leaf, g in zip(prepared.leaves, torch.autograd.grad(outputs, prepared.leaves, grads, allow_unused=True)):
            assert g is not None and g.abs().max() > 0, (impl.name, tuple(leaf.shape))


def test_a_case_whose_backward_computes_something_else_is_an_error_not_a_timing(tmp_path, monkeypatch):
    """The reference check read the forward alone: a baseline whose gradient is wrong (here torch-dense
    with its gates detached from the routing weights: the same y, no gate gradient, less backward work)
    was an "ok" case in the bwd and fwdbwd passes. Each leaf's gradient on set 0 is now compared with the
    fp32 reference's (the aux loss included); its forward timing stays valid."""
    from benchmarks import baselines

    dense = baselines.moe_lora_dense
    monkeypatch.setattr(baselines, "moe_lora_dense", lambda x, a, b, ids, w, scaling=1.0, base_out=None:
                        dense(x, a, b, ids, w.detach(), scaling, base_out=base_out))
    results, _ = _run(tmp_path, "--shapes", "S4", "--no-sweep", "--passes", "fwd,bwd,fwdbwd", "--no-host-overhead")
    cases = {c["id"]: c for c in results["cases"]}
    assert cases["S4/delta/fwd/torch-dense"]["status"] == "ok"
    for p in ("bwd", "fwdbwd"):
        wrong = cases[f"S4/delta/{p}/torch-dense"]
        assert wrong["status"] == "error" and wrong["error"].startswith("wrong gradient: "), wrong
        assert wrong["grad_rel_err_vs_reference"] == float("inf") and wrong["median_ms"] > 0
        for impl in ("moelora-torch", "naive", "torch-grouped-mm"):
            right = cases[f"S4/delta/{p}/{impl}"]
            assert right["status"] == "ok" and right["grad_rel_err_vs_reference"] < 1e-5, right


def test_a_case_that_draws_random_numbers_is_checked_against_the_same_draws():
    """Threshold routing draws its noise in every training forward: the reference check compared the layer
    with its fp32 copy drawing other noise, so a few tokens routed differently (rel_err_vs_reference 6.5e-3
    in fp32 at the CPU S1, against a tolerance of 1e-2, depending on the generator's state). Both now run
    from one generator state, forward and gradients alike."""
    from benchmarks import runner, shapes
    from benchmarks.timing import Budget

    shape = shapes.suite(on_gpu=False)["S1"]
    ctx = runner.RunContext(device=torch.device("cpu"), dtype=torch.float32, repeats=1, warmup=1, min_repeats=1,
                            case_cap_s=0.05, budget=Budget(None), ceilings={}, log=lambda *a: None)
    errors = []
    for seed in range(8):
        torch.manual_seed(seed)
        (rec,) = runner.run_group(ctx, shape, "layer", [impls.by_name("moelora-MoELoRALinear-threshold")],
                                  passes=("fwdbwd",), sets_count=1)
        errors.append((rec["rel_err_vs_reference"], rec.get("grad_rel_err_vs_reference")))
    assert all(e < 1e-5 for pair in errors for e in pair), errors


def test_each_pass_records_its_raw_timings_and_its_own_counts_rates_and_floors():
    """A case's record keeps its raw timings (the warm-up's, at least one even with --warmup 0, the timed
    iterations' and the host's), the input sets it cycled, and the figures of its own pass: the FLOPs and
    bytes of metrics.counts at the run's element size, the floors and rates derived from its own median."""
    import statistics

    from benchmarks import metrics, runner, shapes
    from benchmarks.timing import Budget

    shape = shapes.suite(on_gpu=False)["S2"]
    ceilings = {"copy_GBps": 100.0, "matmul_TFLOPs": 400.0}
    ctx = runner.RunContext(device=torch.device("cpu"), dtype=torch.float64, repeats=3, warmup=0, min_repeats=3,
                            case_cap_s=1.0, budget=Budget(None), ceilings=ceilings, log=lambda *a: None)
    recs = runner.run_group(ctx, shape, "delta", [impls.by_name("moelora-torch")], passes=("fwd", "fwdbwd"),
                            sets_count=2)
    counts = metrics.counts(shape, "delta", "moelora-torch", 8)  # float64
    assert counts["fwd"] != counts["fwdbwd"]
    for rec in recs:
        assert rec["status"] == "ok" and rec["sets"] == 2 and len(rec["warmup_ms"]) == 1, rec
        assert rec["n"] == len(rec["times_ms"]) == 3 and rec["median_ms"] == statistics.median(rec["times_ms"])
        assert rec["host_median_ms"] == statistics.median(rec["host_ms"])
        want = metrics.derived(rec["median_ms"], counts[rec["pass"]]["flops"], counts[rec["pass"]]["bytes"], ceilings)
        assert {k: rec[k] for k in want} == want and rec["flops"] == counts[rec["pass"]]["flops"]


def test_graph_replay_target_does_not_read_a_failed_graph_check():
    """The CUDA-graph check records its replay time whether or not the replay matched eager: a replay whose
    output or gradients differ (status "fail") computes something else, and was still read as met or
    missed. Only a passing check's replay time is compared with the 0.12 ms target."""
    name = "S1 delta fwd+bwd device time (CUDA-graph replay) <= 0.12 ms"

    def graph_target(check):
        found = {t["target"]: t for t in targets.evaluate({"cases": [], "checks": {"cuda_graph_S1": check}})}
        return found[name]

    check = {"status": "pass", "rel_err": {"y": 1e-3}, "tolerance": 2e-2, "replay_median_ms": 0.1}
    assert graph_target(check)["status"] == "met"
    wrong = graph_target({**check, "status": "fail", "rel_err": {"y": 0.5}})
    assert wrong["status"] == "not measured" and "fail" in wrong["detail"], wrong
    assert graph_target({})["status"] == "not measured"
    # a passing check whose replay could not be timed: not measured, saying why (the verdict stays a pass)
    untimed = {k: v for k, v in check.items() if k != "replay_median_ms"}
    untimed = graph_target({**untimed, "replay_error": "RuntimeError: could not be timed"})
    assert untimed["status"] == "not measured" and "could not be timed" in untimed["detail"], untimed


def test_layer_cases_without_mixed_precision_enter_no_autocast_context(monkeypatch):
    """The MoELoRALinear cases ran every forward inside torch.autocast(enabled=False) unless "-autocast":
    a few microseconds of the host per call (3 to 5 us on the development VM) that the frozen Linear's and
    PEFT's cases do not pay, in medians the host bounds (the decode pass at T 8, the host enqueue targets).
    Only the "-autocast" case in a half-precision set enters torch.autocast from the benchmark."""
    import sys as _sys

    from benchmarks import inputs, shapes

    entered = []
    autocast = torch.autocast

    def spy(*args, **kwargs):
        if _sys._getframe(1).f_globals.get("__name__") == impls.__name__:
            entered.append(kwargs.get("enabled", True))
        return autocast(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    shape = shapes.suite(on_gpu=False)["S1"]
    for dtype in (torch.float32, torch.bfloat16):
        s = inputs.make_set(shape, dtype, torch.device("cpu"), seed=0)
        for impl in impls.LAYER:
            if impl.name.startswith("moelora-MoELoRALinear"):
                entered.clear()
                with torch.no_grad():
                    impl.prepare(shape, s).forward()
                amp = impl.name.endswith("-autocast") and dtype == torch.bfloat16
                assert entered == ([True] if amp else []), (impl.name, dtype, entered)


def test_a_case_whose_backward_leaves_out_an_input_is_an_error_not_a_timing(tmp_path, monkeypatch):
    """The gradient check compared the leaves an implementation names: one that leaves an input out of
    them (here torch-dense with the routing weights detached and not among its leaves: less backward work)
    had nothing to compare there and was an "ok" case in the bwd and fwdbwd passes. The reference's gradients
    of the set's trainable tensors the implementation does not differentiate now count as missing."""
    from benchmarks import baselines

    dense = baselines.moe_lora_dense

    def prepare(shape, s):
        return impls.Prepared(lambda: dense(s["x"], s["a"], s["b"], s["ids"], s["w"].detach(), shape.scaling),
                              [s["x"], s["a"], s["b"]])

    monkeypatch.setattr(impls.by_name("torch-dense"), "prepare", prepare)
    results, _ = _run(tmp_path, "--shapes", "S4", "--no-sweep", "--passes", "fwd,fwdbwd", "--no-host-overhead")
    cases = {c["id"]: c for c in results["cases"]}
    assert cases["S4/delta/fwd/torch-dense"]["status"] == "ok"
    wrong = cases["S4/delta/fwdbwd/torch-dense"]
    assert wrong["status"] == "error" and wrong["error"].startswith("wrong gradient: "), wrong
    assert wrong["grad_rel_err_vs_reference"] == float("inf")
    right = cases["S4/delta/fwdbwd/moelora-torch"]
    assert right["status"] == "ok" and right["grad_rel_err_vs_reference"] < 1e-5, right


def test_host_enqueue_time_is_the_call_alone(monkeypatch):
    """The host enqueue time is "the host clock from the call to its return": on CUDA it also held the
    recording of the iteration's two CUDA events (a few microseconds against the 0.25 ms target). A fake
    clock advanced by each event record, not by the call, reads 0 for the call."""
    from types import SimpleNamespace

    from benchmarks import timing

    clock = [0.0]

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            clock[0] += 1.0

        def elapsed_time(self, end):
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0], monotonic=lambda: clock[0]))
    times, host = timing.time_eager(lambda i: None, 4, torch.device("cuda"))
    assert times == [1.0] * 4 and host == [0.0] * 4, host


def test_implementation_names_are_unique():
    """--skip, --profile, DECODE and SWEEP pick implementations by name (impls.by_name takes the first)."""
    names = [i.name for i in impls.DELTA + impls.LAYER + impls.FFN]
    assert len(names) == len(set(names)), names


def test_moelora_op_cases_name_their_backend_and_regime_and_add_the_base_output(monkeypatch):
    """Each case of moelora.moe_lora calls it with the backend and regime its name says, and "moelora-layer"
    hands it the frozen Linear's output as base_out (without it the layer case would time the delta alone
    beside baselines that run the base GEMM). Triton needs CUDA: the op is spied on and run on the torch
    backend, its result compared with the runner's reference."""
    import moelora
    import torch.nn.functional as F

    from benchmarks import inputs, runner, shapes

    op, calls = moelora.moe_lora, []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return op(*args, **{**kwargs, "backend": "torch"})

    monkeypatch.setattr(moelora, "moe_lora", spy)
    shape = shapes.suite(on_gpu=False)["S1"]
    s = inputs.make_set(shape, torch.float32, torch.device("cpu"), seed=0)
    want = {"moelora-torch": ("torch", "auto"), "moelora-triton": ("triton", "auto"),
            "moelora-triton-dense": ("triton", "dense"), "moelora-triton-grouped": ("triton", "grouped"),
            "moelora-layer": ("triton", "auto")}
    for name, (backend, regime) in want.items():
        calls.clear()
        group = impls.by_name(name).group
        y = impls.by_name(name).prepare(shape, s).forward()
        assert [(c["backend"], c["regime"]) for c in calls] == [(backend, regime)], (name, calls)
        assert impls.rel_err(y, runner._reference(shape, group, name, s)) < 1e-5, name
        base = calls[0].get("base_out")
        assert (base is None) == (group == "delta"), name
        assert base is None or torch.equal(base, F.linear(s["x"], s["w0"])), name


def _layer_sets(dtype=torch.float32):
    """CPU S1 (shared A) and S2 (per-expert A) as whole layers at 1024 tokens (two 512-token sequences)."""
    import dataclasses

    from benchmarks import inputs, shapes

    suite = shapes.suite(on_gpu=False)
    for shape in (suite["S1"], suite["S2"]):
        shape = dataclasses.replace(shape, tokens=1024, layer=True)
        yield shape, inputs.make_set(shape, dtype, torch.device("cpu"), seed=0)


def test_moelora_linear_cases_build_the_layer_the_shape_and_name_say():
    """The MoELoRALinear cases are layers of the shape's E, k, r, alpha and A layout (the reference is a
    copy of the layer, so a layer built otherwise was an "ok" case), with the router, LoRA dropout, task
    ids (one task per 512-token sequence) and aux-loss mask (the last 10% of each sequence) their names
    say, in training mode; the dropout case's check draws the same keep mask on both sides."""
    routers = {"task": "task", "threshold": "threshold", "topk_softmax": "topk_softmax"}
    for shape, s in _layer_sets():
        T = shape.tokens
        for impl in impls.LAYER:
            if not impl.name.startswith("moelora-MoELoRALinear"):
                continue
            prepared = impl.prepare(shape, s)
            (layer,) = prepared.keep
            st, suffix = layer.settings, impl.name.rsplit("-", 1)[-1]
            assert (st.num_experts, st.top_k, st.r, st.lora_alpha, st.share_lora_a) == \
                (shape.experts, shape.top_k, shape.rank, shape.scaling * shape.rank, shape.shared_a), impl.name
            assert st.router == routers.get(suffix, "softmax_topk"), impl.name
            assert st.lora_dropout == (impls.LAYER_DROPOUT if suffix == "dropout" else 0.0), impl.name
            assert layer.training, impl.name
            tasks = torch.arange(T) // 512 % shape.experts
            assert (layer.task_ids is None) if suffix != "task" else torch.equal(layer.task_ids, tasks), impl.name
            mask = layer.aux_loss_mask
            assert mask is None if suffix != "auxmask" else torch.equal(mask, torch.arange(T) % 512 < 461), impl.name
            # the dropout case checks the layer against its fp32 copy drawing the same keep mask
            assert suffix != "dropout" or prepared.check() < 1e-5, impl.name


def test_peft_cases_are_a_training_lora_of_the_shapes_r_and_scaling_with_their_dropout():
    """PEFT's cases: one LoRA of the shape's r and scaling, in training mode, LoRA dropout in the
    "-dropout" case only (in eval mode, or at p 0, the "-dropout" case timed no dropout and its check,
    which reads the dropout module's output, still passed); the check compares with the draw taken."""
    from peft.tuners.lora import LoraLayer

    for shape, s in _layer_sets():
        for name, p in (("peft-lora", 0.0), ("peft-lora-dropout", impls.LAYER_DROPOUT)):
            prepared = impls.by_name(name).prepare(shape, s)
            (model,) = prepared.keep
            (lora,) = [m for m in model.modules() if isinstance(m, LoraLayer)]
            assert model.training and lora.r["default"] == shape.rank, name
            assert lora.scaling["default"] == shape.scaling, name
            dropout = lora.lora_dropout["default"]
            assert (dropout.p == p) if p else isinstance(dropout, torch.nn.Identity), name
            assert (prepared.check is None) == (p == 0.0), name
            assert p == 0.0 or prepared.check() < 1e-5, name


def test_autocast_cases_take_fp32_x_and_base_weight_and_run_in_the_sets_dtype():
    """The "-autocast" cases run as the HF Trainer's bf16=True: fp32 x and base weight under
    torch.autocast to the set's dtype (bf16 here), y in bf16. An x or base weight already in bf16
    would time mixed precision without its casts; autocast off, an fp32 layer."""
    for shape, s in _layer_sets(torch.bfloat16):
        for name in ("linear-frozen-autocast", "moelora-MoELoRALinear-autocast"):
            prepared = impls.by_name(name).prepare(shape, s)
            x = prepared.leaves[0]
            assert x.dtype == torch.float32 and torch.equal(x, s["x"].float()) and x.requires_grad, name
            assert all(m.base_layer.weight.dtype == torch.float32 for m in prepared.keep), name
            with torch.no_grad():
                assert prepared.forward().dtype == torch.bfloat16, name


def test_the_decode_pass_runs_modules_in_eval_mode_under_inference_mode():
    """impls.inference: the modules in eval mode (no LoRA dropout, no aux loss) and the forward under
    torch.inference_mode (its output an inference tensor, nothing recorded for autograd); a case that
    checks itself against its own draw (LoRA dropout) is refused."""
    shape, s = next(_layer_sets())
    for name in ("moelora-MoELoRALinear", "peft-lora"):
        prepared = impls.by_name(name).prepare(shape, s)
        (module,) = prepared.keep
        decode = impls.inference(prepared)
        assert not any(m.training for m in module.modules()), name
        assert decode.forward().is_inference(), name
    with pytest.raises(ValueError, match="checks itself"):
        impls.inference(impls.by_name("moelora-MoELoRALinear-dropout").prepare(shape, s))


def _plan(tmp_path, monkeypatch, *argv, sleep_in_ceilings=0.0, resume=None):
    """cli.main on the CPU with each part faked: what run_group is asked to run (shape, tokens, group, label,
    implementations, passes and the context's repeats, warm-up, repeat floor, case cap and budget), which
    of the ceilings, graph check and host overhead were measured, the watchdog's delay, and the results."""
    import time

    from benchmarks import ceilings, graphcheck, hostcost

    calls, measured, timers = [], [], []

    def run_group(ctx, shape, group, impl_list, passes, label=None):
        calls.append(dict(shape=shape.name, tokens=shape.tokens, group=group, label=label,
                          impls=[i.name for i in impl_list], passes=list(passes), repeats=ctx.repeats,
                          warmup=ctx.warmup, min_repeats=ctx.min_repeats, case_cap=ctx.case_cap_s,
                          budget=ctx.budget.seconds))
        return []

    class Timer:
        def __init__(self, interval, fn):
            timers.append(interval)

        def start(self):
            pass

        def cancel(self):
            pass

    def fake(name, value):
        def measure(*args):
            measured.append(name)
            time.sleep(sleep_in_ceilings if name == "ceilings" else 0.0)
            return value() if callable(value) else value
        return measure

    monkeypatch.setattr(cli, "run_group", run_group)
    monkeypatch.setattr(cli.threading, "Timer", Timer)
    monkeypatch.setattr(ceilings, "measure", fake("ceilings", {"copy_GBps": 1.0, "matmul_TFLOPs": 1.0,
                                                               "matmul_dtype": "fp32"}))
    monkeypatch.setattr(graphcheck, "check", fake("graph", {"status": "skipped", "reason": "faked"}))
    monkeypatch.setattr(hostcost, "measure", fake("host", lambda: []))
    monkeypatch.setattr(hostcost, "measure_compiled", fake("host-compiled", lambda: []))
    resume = ["--resume", str(resume)] if resume else []
    assert cli.main(["--device", "cpu", "--out-dir", str(tmp_path), *argv, *resume]) == 0
    (path,) = tmp_path.glob("*.json")
    return calls, measured, timers, json.loads(path.read_text()), path


def test_the_cpu_run_plan_and_its_defaults(tmp_path, monkeypatch):
    """On a CPU: fp32, 5 repeats, 1 warm-up, a floor of 3, a 0.3 s case cap (recorded in meta); each shape's
    group, S1's whole layer (the only shape with one) and its decode pass (impls.DECODE at 8 tokens); the
    sweep last on the planned points, forward and forward+backward only, at half the repeats (not under the
    floor) and half the case cap, under the whole budget while the suite had (1 - sweep share) of it; the
    watchdog at the budget + 60 s; the ceilings, graph check and host overhead measured once each."""
    calls, measured, timers, results, _ = _plan(tmp_path, monkeypatch, "--shapes", "S2,S1,S5",
                                                "--sweep-tokens", "32,64,128", "--time-budget", "1000")
    meta = results["meta"]
    assert (meta["dtype"], meta["repeats"], meta["warmup"], meta["min_repeats"], meta["case_cap_s"]) == \
        ("float32", 5, 1, 3, 0.3)
    assert meta["time_budget_s"] == 1000 and meta["torch_threads"] == 1
    suite = dict(repeats=5, warmup=1, min_repeats=3, case_cap=0.3, budget=750.0)
    train = ["fwd", "bwd", "fwdbwd"]
    want = [dict(shape="S1", tokens=256, group="delta", label=None, impls=[i.name for i in impls.DELTA], passes=train),
            dict(shape="S1", tokens=256, group="layer", label=None, impls=[i.name for i in impls.LAYER], passes=train),
            dict(shape="S1@T8", tokens=8, group="layer", label=None, impls=impls.DECODE, passes=["decode"]),
            dict(shape="S5", tokens=128, group="ffn", label=None, impls=[i.name for i in impls.FFN], passes=train),
            dict(shape="S2", tokens=256, group="delta", label=None, impls=[i.name for i in impls.DELTA], passes=train)]
    want = [{**w, **suite} for w in want] + [
        dict(shape=f"S1@T{t}", tokens=t, group="delta", label="sweep", impls=impls.SWEEP, passes=["fwd", "fwdbwd"],
             repeats=3, warmup=1, min_repeats=3, case_cap=0.15, budget=1000) for t in (32, 64, 128)]
    assert calls == want
    assert measured == ["ceilings", "graph", "host", "host-compiled"]
    assert results["shapes"]["S1-decode"]["tokens"] == 8
    # how the launches reached their kernels (none here: the CPU stand-in runs the torch backend)
    assert results["meta"]["direct_launch"] == launchers.direct_launch_state()
    assert set(results["meta"]["direct_launch"]) == {"enabled", "direct", "through_triton", "waiting"}
    # armed at 1060 s from the start less the time spent before it (importing what meta names can take seconds)
    assert len(timers) == 1 and 1060 - results["meta"]["elapsed_s"] <= timers[0] <= 1060


def test_the_run_plan_follows_the_options(tmp_path, monkeypatch):
    """--warmup 0 is kept (not the default), --quick thins only the default sweep (not --sweep-tokens'
    points), the sweep takes the forward when --passes has no fwdbwd, --passes without decode (or
    without a training pass) runs no decode pass (or no sweep, and keeps no share of --time-budget for one),
    --cpu-threads 0 keeps torch's threads."""
    calls, _, _, results, _ = _plan(tmp_path, monkeypatch, "--shapes", "S1", "--sweep-tokens", "32,64,128",
                                    "--quick", "--warmup", "0", "--repeats", "8", "--min-repeats", "2",
                                    "--passes", "fwd,bwd", "--no-graph-check", "--no-host-overhead",
                                    "--cpu-threads", "0")
    assert results["meta"]["warmup"] == 0 and results["meta"]["torch_threads"] == torch.get_num_threads()
    assert [(c["shape"], c["group"], c["passes"], c["warmup"], c["repeats"]) for c in calls] == \
        [("S1", "delta", ["fwd", "bwd"], 0, 8), ("S1", "layer", ["fwd", "bwd"], 0, 8)] + \
        [(f"S1@T{t}", "delta", ["fwd"], 0, 4) for t in (32, 64, 128)]
    calls, *_ = _plan(tmp_path / "decode", monkeypatch, "--shapes", "S1", "--passes", "decode",
                      "--no-graph-check", "--no-host-overhead", "--time-budget", "100")
    # no sweep runs, so none of the budget is kept for one
    assert [(c["shape"], c["passes"], c["budget"]) for c in calls] == [("S1@T8", ["decode"], 100.0)]


def test_a_resumed_run_keeps_what_was_measured_and_the_graph_check_obeys_the_suites_budget(tmp_path, monkeypatch):
    """A run whose suite budget ((1 - sweep share) of --time-budget) is spent skips the CUDA-graph check
    (the sweep still runs on the rest); a resumed run measures neither the ceilings, the graph check nor
    the host overhead again."""
    calls, measured, _, results, path = _plan(tmp_path, monkeypatch, "--shapes", "S1", "--passes", "fwd",
                                              "--sweep-tokens", "32", "--time-budget", "5", "--sweep-share",
                                              "0.96", sleep_in_ceilings=0.3)
    assert results["checks"]["cuda_graph_S1"] == {"status": "skipped", "reason": "time budget exhausted"}
    assert measured == ["ceilings", "host", "host-compiled"] and calls[-1]["label"] == "sweep"
    results["checks"]["cuda_graph_S1"] = {"status": "pass"}
    path.write_text(json.dumps(results))
    _, measured, _, resumed, _ = _plan(tmp_path, monkeypatch, "--shapes", "S1", "--passes", "fwd",
                                       "--sweep-tokens", "32", resume=path)
    assert measured == [] and resumed["meta"]["restarts"] == 1
    assert resumed["ceilings"] == results["ceilings"] and resumed["checks"]["cuda_graph_S1"] == {"status": "pass"}


def test_a_device_lost_in_the_graph_check_names_it_and_restarts_within_max_restarts(tmp_path, monkeypatch):
    """A CUDA context lost in the graph check records the check (not the last case) as the culprit; the
    process restarts while restarts < --max-restarts, resuming from the results without the old --resume."""
    from benchmarks import runner

    class Exec(Exception):
        pass

    monkeypatch.setattr(runner, "cuda_alive", lambda device: False)
    monkeypatch.setattr(cli.os, "execv", lambda exe, argv: (_ for _ in ()).throw(Exec(argv)))
    with pytest.raises(Exec) as info:
        _plan(tmp_path, monkeypatch, "--shapes", "S1", "--passes", "fwd", "--no-sweep", "--max-restarts", "1")
    argv = info.value.args[0]
    path = Path(argv[-1])
    assert argv[-2:] == ["--resume", str(path)] and argv.count("--resume") == 1
    assert json.loads(path.read_text())["meta"]["device_lost_events"][0]["last_case"] == "checks/cuda_graph_S1"
    results = json.loads(path.read_text())
    del results["checks"]["cuda_graph_S1"]  # the check is run again, and the device lost again
    path.write_text(json.dumps(results))
    # the restart's own run (restart 1 of at most 1) gives up instead, and finishes with what was recorded
    _, _, _, resumed, _ = _plan(tmp_path, monkeypatch, "--shapes", "S1", "--passes", "fwd", "--no-sweep",
                                "--max-restarts", "1", resume=path)
    assert resumed["meta"]["restarts"] == 1 and len(resumed["meta"]["device_lost_events"]) == 2


def test_a_restart_drops_the_previous_resume_options(monkeypatch):
    class Exec(Exception):
        pass

    monkeypatch.setattr(cli.os, "execv", lambda exe, argv: (_ for _ in ()).throw(Exec(exe, argv)))
    with pytest.raises(Exec) as info:
        cli._restart(["--shapes", "S1", "--resume", "a.json", "--quick", "--resume=b.json"], Path("c.json"))
    exe, argv = info.value.args
    assert exe == sys.executable and argv == [exe, "-m", "benchmarks", "--shapes", "S1", "--quick",
                                              "--resume", "c.json"]


def test_graph_check_relative_error():
    """graphcheck's relative error of a replay against eager: ||a - b|| / ||b||, NaN when the replay is not
    finite (a NaN error fails the check)."""
    from benchmarks import graphcheck

    b = torch.randn(50) + 3
    assert graphcheck._rel(b, b) == 0.0 and abs(graphcheck._rel(b, 2 * b) - 0.5) < 1e-6
    assert math.isnan(graphcheck._rel(torch.cat([b[:-1], torch.tensor([float("inf")])]), b))


def test_graph_check_passes_when_every_error_is_within_the_dtypes_tolerance():
    """The check's verdict: every relative error at most the dtype's tolerance (the bound included), a
    NaN error (a replay that is not finite) fails, a dtype without a tolerance gets bf16's."""
    from benchmarks import graphcheck

    assert graphcheck.passes({"y": 1e-4, "dx": 0.0}, torch.float32) == (True, 1e-4)
    assert graphcheck.passes({"y": 1e-4, "dx": 1.01e-4}, torch.float32) == (False, 1e-4)
    assert graphcheck.passes({"y": 1e-3, "dx": float("nan")}, torch.float16) == (False, 5e-3)
    assert graphcheck.passes({"y": 1e-3, "dx": 4e-3}, torch.float16) == (True, 5e-3)
    assert graphcheck.passes({"y": 2e-2}, torch.bfloat16) == (True, 2e-2)
    assert graphcheck.passes({"y": 1.9e-2}, torch.float64) == (True, 2e-2)
    assert graphcheck.passes({"y": 2.1e-2}, torch.float64) == (False, 2e-2)
