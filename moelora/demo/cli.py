"""Command line of ``python -m moelora.demo``: parses the flags into :class:`DemoOptions` and runs
the demo; the exit status is 1 when the reloaded model's outputs differ from the trained one's."""

from __future__ import annotations

import argparse
import re

from moelora.tuner.config import EXPERT_PRESETS
from moelora.ops.routing_modes import ROUTER_MODES
from moelora.demo.run import RUN_SIZES, DemoOptions, check_optional_packages, moelora_config, run, with_run_sizes


def _sizes_help(name: str) -> str:
    full, quick = RUN_SIZES[(False, True)][name], RUN_SIZES[(True, True)][name]
    fb_full, fb_quick = RUN_SIZES[(False, False)][name], RUN_SIZES[(True, False)][name]
    if (full, quick) == (fb_full, fb_quick):
        return f"default {full}, --quick {quick}"
    return f"default {full}, --quick {quick}; fallback model: {fb_full} / {fb_quick}"


def parser() -> argparse.ArgumentParser:
    defaults = DemoOptions()
    p = argparse.ArgumentParser(
        prog="python -m moelora.demo",
        description="Fine-tune all-MiniLM-L6-v2 with MoE-LoRA on q and v (shared A, 4 experts, top-2) on a "
                    "mixture of three generated text tasks; report per-task accuracy before/after and the "
                    "expert load per layer, plot them, save the adapter and check that reloading it gives "
                    "identical outputs.")
    p.add_argument("--steps", type=int, help=f"training steps ({_sizes_help('steps')})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per mixed batch")
    p.add_argument("--lr", type=float, default=defaults.lr, help="learning rate of adapters and routers")
    p.add_argument("--head-lr", type=float, default=defaults.head_lr, help="learning rate of the task heads")
    p.add_argument("--num-experts", type=int,
                   help=f"experts per adapted layer (default {defaults.num_experts}; not with --router task)")
    p.add_argument("--top-k", type=int, help=f"experts per token (default {defaults.top_k}; not with --router task)")
    p.add_argument("--r", type=int, default=defaults.r, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha, help="LoRA alpha (scale alpha / r)")
    p.add_argument("--mola", choices=EXPERT_PRESETS, metavar="PRESET",
                   help=f"MoLA expert counts over layer quarters, one of {', '.join(EXPERT_PRESETS)} "
                        "(replaces --num-experts)")
    p.add_argument("--router", choices=ROUTER_MODES, default=defaults.router,
                   help="routing mode; 'task' uses one expert per task, chosen by the example's task id")
    p.add_argument("--molex", action="store_true", help="also mix layers with MoLEx (mixture of layer experts)")
    p.add_argument("--train-per-task", type=int, help=f"training examples per task ({_sizes_help('train_per_task')})")
    p.add_argument("--eval-per-task", type=int, help=f"eval examples per task ({_sizes_help('eval_per_task')})")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--out-dir", default=defaults.out_dir, help="where the plot, checkpoint and metrics go")
    p.add_argument("--quick", action="store_true", help="short run, as in CI (about 75 s on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help=f"seed of the generated data, the initialisation and the batch order (default {defaults.seed})")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    """DemoOptions of parsed flags; --num-experts and --top-k left out take DemoOptions' defaults."""
    defaults = DemoOptions()
    return DemoOptions(
        steps=args.steps, train_per_task=args.train_per_task, eval_per_task=args.eval_per_task, quick=args.quick,
        batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
        num_experts=defaults.num_experts if args.num_experts is None else args.num_experts,
        top_k=defaults.top_k if args.top_k is None else args.top_k, r=args.r, lora_alpha=args.lora_alpha,
        mola=args.mola, router=args.router, molex=args.molex, device=args.device, out_dir=args.out_dir,
        seed=args.seed, plot=not args.no_plot, progress=not args.no_progress)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.router == "task":  # else ignored: one expert per task, the task id's
        given = [flag for flag, value in (("--mola", args.mola), ("--num-experts", args.num_experts),
                                          ("--top-k", args.top_k)) if value is not None]
        if given:
            p.error(f"{given[0]} sets learned-router experts; --router task uses one expert per task, the example's")
    top_k = DemoOptions().top_k if args.top_k is None else args.top_k
    if args.mola and top_k > min(map(int, args.mola)):  # else refused only once the model has loaded
        p.error(f"--top-k must be at most the fewest experts per layer of --mola {args.mola} "
                f"({min(map(int, args.mola))}), got {top_k}")
    try:  # a bad value is refused before any model loads, as argparse refuses one (usage, exit status 2)
        opts = options_from_args(args)
        moelora_config(with_run_sizes(opts, pretrained=True))
    except ValueError as e:
        flag = lambda m: "--" + (m.group(1) or m.group(2)).replace("_", "-")  # noqa: E731
        p.error(re.sub(r"(?:DemoOptions|MoELoRAConfig)\.(\w+)|^(\w+)(?= must )", flag, str(e)))
    try:
        check_optional_packages(opts)
    except ImportError as e:
        p.error(str(e))
    metrics = run(opts)
    return 0 if metrics["reload_identical"] else 1
