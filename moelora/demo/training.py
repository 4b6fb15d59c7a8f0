"""Multi-task MoE-LoRA fine-tuning: every step's batch mixes examples of the three tasks;
AdamW on the adapters, routers (and MoLEx gates) and the task heads, with a linear warm-up
and decay; the loss is the task loss plus moelora's auxiliary router losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn as nn

import moelora

from moelora.demo.data import Example
from moelora.demo.encoding import TaskHeads, batch_loss, collate, embed


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    lr: float  # adapters, routers (and MoLEx gates)
    head_lr: float
    warmup_fraction: float = 0.1
    seed: int = 0


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total - warmup))


def _epoch_order(num_examples: int, generator: torch.Generator):
    while True:
        yield from torch.randperm(num_examples, generator=generator).tolist()


@dataclass
class TrainHistory:
    task_loss: List[float]  # mean cross-entropy of every step's batch
    aux_loss: List[float]  # moelora's router losses (load balancing + z-loss) of every step


def train(model: nn.Module, heads: TaskHeads, tokenizer, examples: Sequence[Example], settings: TrainSettings,
          device, task_routing: bool, progress=None) -> TrainHistory:
    """Fine-tune the trainable parameters of ``model`` and ``heads`` on batches mixing the tasks.

    ``progress``: a callable wrapping the step range (e.g. tqdm), or None.
    """
    adapter_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": adapter_params, "lr": settings.lr, "weight_decay": 0.0},
        {"params": list(heads.parameters()), "lr": settings.head_lr, "weight_decay": 0.01},
    ])
    warmup = max(1, int(settings.warmup_fraction * settings.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, settings.steps, warmup))
    order = _epoch_order(len(examples), torch.Generator().manual_seed(settings.seed))
    steps = range(settings.steps)
    bar = progress(steps) if progress is not None else steps
    history = TrainHistory([], [])
    model.train()
    heads.train()
    for _ in bar:
        batch = collate([examples[next(order)] for _ in range(settings.batch_size)], tokenizer, device)
        task_loss = batch_loss(heads, embed(model, batch, task_routing), batch)
        aux = moelora.aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        (task_loss + aux).backward()
        optimizer.step()
        scheduler.step()
        moelora.step_routers(model)
        history.task_loss.append(task_loss.item())
        history.aux_loss.append(aux.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{history.task_loss[-1]:.3f}", aux=f"{history.aux_loss[-1]:.3f}", refresh=False)
    model.eval()
    heads.eval()
    return history
