"""From the demo's examples to what the task heads read, and the multi-task loss.

All sentences of a batch, whatever their task, go through the encoder in one forward (with
one task id per sentence for task routing). The sentence embedding is the mean of the last
hidden states over the attention mask. Each task has its own linear head; the similarity
head reads [u, v, |u-v|, u*v] of the two sentences (Sentence-BERT's classification
objective). The loss is the mean cross-entropy over the batch's examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelora.demo.data import NUM_CLASSES, TASKS, Example

PAIR_TASKS = ("similarity",)


class TaskHeads(nn.Module):
    """One linear classifier per task on the sentence embedding(s)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Linear(hidden_size * (4 if task in PAIR_TASKS else 1), NUM_CLASSES[task]) for task in TASKS)

    def forward(self, task: int, features: torch.Tensor) -> torch.Tensor:
        return self.heads[task](features)


@dataclass
class TaskGroup:
    """The examples of one task inside a batch, as indices into the batch's sentences."""
    first: torch.Tensor  # [n] index of each example's (first) sentence
    second: Optional[torch.Tensor]  # [n] index of the second sentence of a pair, else None
    labels: torch.Tensor  # [n]


@dataclass
class Batch:
    inputs: Dict[str, torch.Tensor]  # tokenizer output: input_ids, attention_mask (, token_type_ids)
    sentence_tasks: torch.Tensor  # [num_sentences] task id of every sentence (for task routing)
    groups: Dict[int, TaskGroup]

    @property
    def num_examples(self) -> int:
        return sum(len(g.labels) for g in self.groups.values())


def collate(examples: Sequence[Example], tokenizer, device) -> Batch:
    """Tokenise every sentence of ``examples`` (padded to the longest) and group the examples by task."""
    texts: List[str] = []
    sentence_tasks: List[int] = []
    parts: Dict[int, tuple] = {}
    for ex in examples:
        first, second, labels = parts.setdefault(ex.task, ([], [], []))
        first.append(len(texts))
        if len(ex.texts) == 2:
            second.append(len(texts) + 1)
        texts.extend(ex.texts)
        sentence_tasks.extend([ex.task] * len(ex.texts))
        labels.append(ex.label)
    inputs = tokenizer(texts, padding=True, return_tensors="pt")

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    groups = {task: TaskGroup(as_tensor(first), as_tensor(second) if second else None, as_tensor(labels))
              for task, (first, second, labels) in sorted(parts.items())}
    return Batch({k: v.to(device) for k, v in inputs.items()}, as_tensor(sentence_tasks), groups)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def task_features(embeddings: torch.Tensor, group: TaskGroup) -> torch.Tensor:
    """What the task head reads: the sentence embedding, or [u, v, |u-v|, u*v] for a pair."""
    u = embeddings[group.first]
    if group.second is None:
        return u
    v = embeddings[group.second]
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


def embed(model: nn.Module, batch: Batch, task_routing: bool, stats_over_real_tokens: bool = False) -> torch.Tensor:
    """Sentence embeddings [num_sentences, hidden] of the batch; ``stats_over_real_tokens``: the
    routers' statistics (and aux losses) leave the padding out (the attention mask as aux-loss mask)."""
    task_ids = batch.sentence_tasks if task_routing else None
    aux_loss_mask = "attention_mask" if stats_over_real_tokens else None
    out = model(**batch.inputs, task_ids=task_ids, aux_loss_mask=aux_loss_mask)
    return mean_pool(out.last_hidden_state, batch.inputs["attention_mask"])


def batch_loss(heads: TaskHeads, embeddings: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's examples, each scored by its task's head."""
    total = embeddings.new_zeros(())
    for task, group in batch.groups.items():
        logits = heads(task, task_features(embeddings, group))
        total = total + F.cross_entropy(logits.float(), group.labels, reduction="sum")
    return total / batch.num_examples


def count_parameters(model: nn.Module, heads: TaskHeads) -> Dict[str, int]:
    """Trainable parameters of the model (adapters, routers, MoLEx gates), of the heads, and the frozen rest."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"adapter_trainable": trainable, "heads": sum(p.numel() for p in heads.parameters()),
            "base_total": sum(p.numel() for p in model.parameters()) - trainable}
