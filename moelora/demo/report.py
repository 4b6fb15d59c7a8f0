"""What the demo prints and writes: the accuracy table, expert load per layer, the PNG plot
(training loss and expert load) and the metrics JSON."""

from __future__ import annotations

import json
import re
from typing import Dict, List

from moelora.demo.data import TASKS

COLUMNS = (
    ("untrained", "untrained"),
    ("linear_probe", "linear probe"),
    ("trained", "MoE-LoRA trained"),
)


def definitions(molex: bool) -> Dict[str, str]:
    """What each accuracy column measures."""
    untrained = ("the model before any training step: MoE-LoRA injected at init (its B matrices or task gates are "
                 "zero, so the encoder computes the base model) and freshly initialised task heads")
    if molex:
        untrained += "; MoLEx mixes in other layers from the start, so its encoder differs slightly from the base"
    return {
        "untrained": untrained,
        "linear_probe": "the untrained encoder, frozen, with only the task heads trained on its embeddings; "
                        "a reference for what fine-tuning the adapter adds",
        "trained": "MoE-LoRA adapters, routers and task heads trained on the task mixture",
    }


def accuracy_table(accuracy: Dict[str, Dict[str, float]]) -> str:
    """Per-task eval accuracy (%) of each model in ``accuracy`` (keys of COLUMNS), as a text table."""
    columns = [(key, title) for key, title in COLUMNS if key in accuracy]
    width = max(len(t) for t in TASKS) + 2
    lines = ["task".ljust(width) + "".join(title.rjust(len(title) + 3) for _, title in columns)]
    for task in TASKS:
        cells = "".join(f"{100 * accuracy[key][task]:.1f}%".rjust(len(title) + 3) for key, title in columns)
        lines.append(task.ljust(width) + cells)
    return "\n".join(lines)


def short_layer_name(name: str) -> str:
    """'encoder.layer.3.attention.self.query' -> 'layer 3 query'."""
    m = re.search(r"layer\.(\d+)\..*?(\w+)$", name)
    return f"layer {m.group(1)} {m.group(2)}" if m else name


def expert_load_lines(load: Dict[str, List[float]], load_by_task: Dict[str, Dict[str, List[float]]]) -> List[str]:
    """One line per routed layer: the expert shares (%) over all eval examples, then per task."""
    if not load:
        return ["(no learned router: with task routing every example uses the expert of its task)"]
    groups = ["all tasks"] + list(load_by_task)
    cell = lambda shares: " ".join(f"{round(100 * share):3d}" for share in shares)  # noqa: E731
    width = max(len(cell(shares)) for shares in load.values())
    name_width = max(len(short_layer_name(n)) for n in load) + 2
    lines = ["".ljust(name_width) + " | ".join(g.ljust(width) for g in groups)]
    for name, shares in load.items():
        cells = [cell(shares)] + [cell(load_by_task[task][name]) for task in load_by_task]
        lines.append(short_layer_name(name).ljust(name_width) + " | ".join(c.ljust(width) for c in cells))
    return lines


def print_results(accuracy, definitions, min_gain: float, improved: bool, load, load_by_task) -> None:
    print("\neval accuracy per task")
    print(accuracy_table(accuracy))
    for key, _ in COLUMNS:
        print(f"  {key}: {definitions[key]}")
    print(f"trained beats untrained by >= {100 * min_gain:.0f} points on every task: {'yes' if improved else 'NO'}")
    print("\nexpert load per layer after training: % of routed slots on experts 0..E-1 over the eval set")
    print("\n".join(expert_load_lines(load, load_by_task)))


def smooth(values: List[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(path: str, task_loss: List[float], aux_loss: List[float], load: Dict[str, List[float]],
         title: str) -> None:
    """PNG with the training loss per step and the eval expert load of every routed layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.1, 1]})
    steps = range(1, len(task_loss) + 1)
    ax_loss.plot(steps, task_loss, color="tab:blue", alpha=0.3, lw=1)
    ax_loss.plot(steps, smooth(task_loss, 10), color="tab:blue", lw=2, label="task loss (mean CE, smoothed)")
    ax_loss.plot(steps, aux_loss, color="tab:orange", lw=1.5, label="router aux loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss")
    ax_loss.legend()
    if load:
        names = list(load)
        colors = plt.get_cmap("tab10").colors
        for row, name in enumerate(names):
            left = 0.0
            for expert, share in enumerate(load[name]):
                ax_load.barh(row, share, left=left, color=colors[expert % len(colors)], edgecolor="white")
                if share >= 0.06:
                    ax_load.text(left + share / 2, row, str(expert), ha="center", va="center", fontsize=7)
                left += share
        ax_load.set_yticks(range(len(names)), [short_layer_name(n) for n in names], fontsize=8)
        ax_load.invert_yaxis()
        ax_load.set_xlim(0, 1)
        ax_load.set_xlabel("share of routed slots (eval set); numbers are expert ids")
        ax_load.set_title("expert load per layer")
    else:
        ax_load.axis("off")
        ax_load.text(0.5, 0.5, "task routing: no learned router", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def improvement_ok(accuracy: Dict[str, Dict[str, float]], min_gain: float) -> bool:
    """Whether the trained model beats the untrained one by ``min_gain`` on every task."""
    return all(accuracy["trained"][t] - accuracy["untrained"][t] >= min_gain for t in TASKS)
