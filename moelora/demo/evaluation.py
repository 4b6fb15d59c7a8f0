"""Evaluating the demo model: per-task accuracy, logits and expert load over an example set,
and the linear-probe baseline (task heads trained on a frozen encoder's embeddings)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora

from moelora.demo.data import TASKS, Example
from moelora.demo.encoding import TaskHeads, collate, embed, task_features


@dataclass
class EncodedTask:
    features: torch.Tensor  # [n, head input] what the task head reads, per example
    labels: torch.Tensor  # [n]
    load_totals: Dict[str, torch.Tensor]  # per routed module: routed slots per expert (summed)


@dataclass
class Evaluation:
    accuracy: Dict[str, float]  # per task
    logits: Dict[str, torch.Tensor]  # per task, every eval example in order (for the reload check)
    expert_load: Dict[str, List[float]]  # per routed module: share of routed slots per expert
    expert_load_by_task: Dict[str, Dict[str, List[float]]]  # the same, per task
    encoded: Dict[str, EncodedTask]


def _batches(examples: Sequence[Example], batch_size: int):
    for start in range(0, len(examples), batch_size):
        yield examples[start:start + batch_size]


def _accumulate_load(totals: Dict[str, torch.Tensor], model: nn.Module, num_tokens: int) -> None:
    """Add the routed slots per expert of the last forward (its load, slots per token, times its
    ``num_tokens`` tokens) to ``totals``."""
    for name, stats in moelora.router_stats(model).items():
        load = stats["load"].detach().double().cpu() * num_tokens
        totals[name] = totals[name] + load if name in totals else load


def _shares(totals: Dict[str, torch.Tensor]) -> Dict[str, List[float]]:
    return {name: (total / total.sum()).tolist() for name, total in totals.items()}


@torch.no_grad()
def encode_by_task(model: nn.Module, tokenizer, examples: Sequence[Example], batch_size: int, device,
                   task_routing: bool) -> Dict[str, EncodedTask]:
    """Head inputs, labels and expert load of every task; each task's examples are batched
    separately, so the load is known per task. The load counts routed slots over the real
    tokens (the padding, which the batching decides, is left out, as MoLEx leaves it out of
    its statistics), so it does not depend on ``batch_size``."""
    model.eval()
    encoded = {}
    for task, name in enumerate(TASKS):
        task_examples = [ex for ex in examples if ex.task == task]
        if not task_examples:
            continue
        features, labels, totals = [], [], {}
        for chunk in _batches(task_examples, batch_size):
            batch = collate(chunk, tokenizer, device)
            embeddings = embed(model, batch, task_routing, stats_over_real_tokens=True)
            _accumulate_load(totals, model, int(batch.inputs["attention_mask"].sum()))
            features.append(task_features(embeddings, batch.groups[task]))
            labels.append(batch.groups[task].labels)
        encoded[name] = EncodedTask(torch.cat(features), torch.cat(labels), totals)
    return encoded


@torch.no_grad()
def score(heads: TaskHeads, encoded: Dict[str, EncodedTask]):
    """(accuracy per task, logits per task on the CPU) of ``heads`` on encoded examples."""
    heads.eval()
    logits = {name: heads(TASKS.index(name), enc.features).cpu() for name, enc in encoded.items()}
    accuracy = {name: (logits[name].argmax(-1) == enc.labels.cpu()).float().mean().item()
                for name, enc in encoded.items()}
    return accuracy, logits


def evaluate(model: nn.Module, heads: TaskHeads, tokenizer, examples: Sequence[Example], batch_size: int,
             device, task_routing: bool) -> Evaluation:
    """Accuracy and logits per task, and each routed layer's expert load (shares summing to
    1 per layer) over all tasks and per task."""
    encoded = encode_by_task(model, tokenizer, examples, batch_size, device, task_routing)
    accuracy, logits = score(heads, encoded)
    overall: Dict[str, torch.Tensor] = {}
    for enc in encoded.values():
        for layer, total in enc.load_totals.items():
            overall[layer] = overall[layer] + total if layer in overall else total
    by_task = {name: _shares(enc.load_totals) for name, enc in encoded.items()}
    return Evaluation(accuracy, logits, _shares(overall), by_task, encoded)


def linear_probe(heads: TaskHeads, train: Dict[str, EncodedTask], evaluation: Dict[str, EncodedTask],
                 steps: int = 300, lr: float = 1e-2) -> Dict[str, float]:
    """Eval accuracy per task of copies of ``heads`` trained (full-batch AdamW) on the head
    inputs of a frozen encoder; ``heads`` is left untouched."""
    probe = copy.deepcopy(heads).train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    for _ in range(steps):
        loss = sum(F.cross_entropy(probe(TASKS.index(name), enc.features).float(), enc.labels)
                   for name, enc in train.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return score(probe, evaluation)[0]
