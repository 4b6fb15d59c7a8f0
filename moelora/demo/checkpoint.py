"""Saving the fine-tuned demo model and loading it back into a fresh base encoder.

A checkpoint directory holds:

- ``adapter/``: the MoE-LoRA adapter, written by ``MoELoRAModel.save_pretrained``;
- ``heads.safetensors``: the task heads and, with MoLEx, its gates (``molex.*``), which
  moelora's adapter checkpoint does not cover;
- ``demo_config.json``: where the base encoder lives and how MoLEx was applied.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

import moelora

from .backbone import Backbone, load_encoder
from .data import TASKS
from .encoding import TaskHeads

ADAPTER_DIR = "adapter"
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "demo_config.json"
MOLEX_PREFIX = "molex."


def _molex_module(model: moelora.MoELoRAModel):
    return getattr(model.model, "molex", None)


def save_checkpoint(directory: str, model: moelora.MoELoRAModel, heads: TaskHeads, backbone: Backbone,
                    task_routing: bool, molex_settings: Optional[dict]) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(os.path.join(directory, ADAPTER_DIR))
    tensors = {f"heads.{k}": v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    molex = _molex_module(model)
    if molex is not None:
        tensors.update({MOLEX_PREFIX + k: v.detach().cpu().contiguous() for k, v in molex.state_dict().items()})
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
    if config["molex"] is not None:
        molex = moelora.apply_molex(model, **config["molex"]).to(device)
        molex.load_state_dict({k[len(MOLEX_PREFIX):]: v for k, v in tensors.items() if k.startswith(MOLEX_PREFIX)})
    heads = TaskHeads(encoder.config.hidden_size).to(device)
    heads.load_state_dict({k[len("heads."):]: v for k, v in tensors.items() if k.startswith("heads.")})
    model.eval()
    heads.eval()
    return model, heads, tokenizer, config["task_routing"]


def outputs_identical(expected: dict, actual: dict) -> bool:
    """True when every task's logits are bit-identical (torch.equal)."""
    return expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
