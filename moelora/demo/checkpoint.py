"""Saving the fine-tuned demo model and loading it back into a fresh base encoder.

A checkpoint directory holds:

- ``adapter/``: the MoE-LoRA adapter (with MoLEx, its gates too: ``from_pretrained``
  re-applies it), written by ``MoELoRAModel.save_pretrained``;
- ``heads.safetensors``: the task heads;
- ``demo_config.json``: where the base encoder lives and the demo's settings.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

import moelora

from moelora.demo.backbone import Backbone, load_encoder
from moelora.demo.data import TASKS
from moelora.demo.encoding import TaskHeads

ADAPTER_DIR = "adapter"
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "demo_config.json"


def save_checkpoint(directory: str, model: moelora.MoELoRAModel, heads: TaskHeads, backbone: Backbone,
                    task_routing: bool, molex_settings: Optional[dict]) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(os.path.join(directory, ADAPTER_DIR))
    tensors = {f"heads.{k}": v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    save_file(tensors, os.path.join(directory, HEADS_FILE))
    config = {"backbone": {"path": backbone.path, "name": backbone.name, "pretrained": backbone.pretrained},
              "tasks": list(TASKS), "task_routing": task_routing, "molex": molex_settings}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def load_checkpoint(directory: str, device):
    """(model, heads, tokenizer, task_routing) rebuilt from ``directory`` on a freshly loaded base encoder."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = json.load(f)
    if config["tasks"] != list(TASKS):
        raise ValueError(f"checkpoint tasks {config['tasks']} differ from the demo's tasks {list(TASKS)}")
    encoder, tokenizer = load_encoder(Backbone(**config["backbone"]), device)
    model = moelora.from_pretrained(encoder, os.path.join(directory, ADAPTER_DIR))
    tensors = load_file(os.path.join(directory, HEADS_FILE), device=str(device))
    heads = TaskHeads(encoder.config.hidden_size).to(device)
    heads.load_state_dict({k[len("heads."):]: v for k, v in tensors.items() if k.startswith("heads.")})
    model.eval()
    heads.eval()
    return model, heads, tokenizer, config["task_routing"]


def outputs_identical(expected: dict, actual: dict) -> bool:
    """True when every task's logits are bit-identical (torch.equal)."""
    return expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
