"""MoLEx: mixture of layer experts.

Each layer t of a residual stack is mixed with one other layer j chosen by a gate:

    z_{t+1} = z_t + a * u_t(z_t) + (1 - a) * u_j(z_t),     u_l(z) = layer_l(z) - z

- gate (one shared by all layers, or one per layer) over the L layers, the own layer masked:
  "linear" (logits = W z), "cosine" (cos(P z, e_l) / temperature, P a projection to
  ``proj_dim``), "cosine_sigmoid" (the same, gate value sigmoid(cos / temperature));
- top-1 per token, then one j per batch: the mode of the token choices ("mode") or the
  argmax of the mean gate probabilities ("mean"); choosing j reads one value on the host;
- ``a`` fixed (e.g. 0.95) or learned (a = sigmoid(theta));
- the gate learns through a straight-through factor g[t,j] / stopgrad(g[t,j]) (= 1 in the
  forward) on the u_j term, and a Switch load-balancing loss over the token choices.

Applied with forward hooks on the existing layers (module names and state dicts of the
base model are unchanged); the gates live in ``model.molex``. Decoder stacks must run
without a KV cache (layer j would write into layer j's cache slot).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._structure import record
from .losses import RoutedModule, expert_load, load_balancing_loss, routing_entropy
from .model import DEFAULT_LAYERS_PATTERN

GATE_TYPES = ("linear", "cosine", "cosine_sigmoid")
BATCH_ROUTING = ("mode", "mean")


class LayerGate(nn.Module):
    """Scores of the L layers for each token: returns (logits [T, L], gate values [T, L])."""

    def __init__(self, hidden_size: int, num_layers: int, gate: str = "linear", proj_dim: Optional[int] = None,
                 temperature: float = 0.07):
        super().__init__()
        if gate not in GATE_TYPES:
            raise ValueError(f"gate must be one of {GATE_TYPES}, got {gate!r}")
        self.gate = gate
        if gate == "linear":
            self.weight = nn.Parameter(torch.empty(num_layers, hidden_size))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            proj_dim = proj_dim or hidden_size
            self.proj = nn.Linear(hidden_size, proj_dim, bias=False)
            self.layer_embeddings = nn.Parameter(torch.randn(num_layers, proj_dim))
            self.temperature = temperature

    def forward(self, z: torch.Tensor, exclude: int):
        z = z.reshape(-1, z.shape[-1]).float()
        if self.gate == "linear":
            logits = F.linear(z, self.weight.float())
        else:
            logits = F.linear(F.normalize(F.linear(z, self.proj.weight.float()), dim=-1),
                              F.normalize(self.layer_embeddings.float(), dim=-1)) / self.temperature
        mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        mask[exclude] = True
        logits = logits.masked_fill(mask, float("-inf"))
        values = torch.sigmoid(logits) if self.gate == "cosine_sigmoid" else torch.softmax(logits, dim=-1)
        return logits, values


class MoLEx(nn.Module, RoutedModule):
    """Gates, mixing coefficient and losses of MoLEx over one layer stack (see module docstring)."""

    _moelora_trainable = True

    def __init__(self, layers: nn.ModuleList, hidden_size: int, gate: str = "linear", shared_gate: bool = True,
                 proj_dim: Optional[int] = None, alpha: float = 0.95, learn_alpha: bool = False,
                 batch_routing: str = "mode", aux_loss_coef: float = 0.01, temperature: float = 0.07):
        super().__init__()
        num_layers = len(layers)
        if num_layers < 2:
            raise ValueError("MoLEx needs a stack of at least 2 layers")
        if batch_routing not in BATCH_ROUTING:
            raise ValueError(f"batch_routing must be one of {BATCH_ROUTING}, got {batch_routing!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self._layers = [layers]  # a list: not registered, the stack belongs to the model
        self.num_layers, self.batch_routing, self.shared_gate = num_layers, batch_routing, shared_gate
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, 0.0
        make = lambda: LayerGate(hidden_size, num_layers, gate, proj_dim, temperature)  # noqa: E731
        self.gates = nn.ModuleList([make()] if shared_gate else [make() for _ in range(num_layers)])
        if learn_alpha:
            a = min(max(alpha, 1e-4), 1 - 1e-4)
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(a / (1 - a))))
        else:
            self.register_buffer("alpha_value", torch.tensor(float(alpha)))
        self._calling_other = False
        self._handles = [layer.register_forward_hook(self._hook(t), with_kwargs=True)
                         for t, layer in enumerate(layers)]
        self._clear_routing_record()

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit) if hasattr(self, "alpha_logit") else self.alpha_value

    def _clear_routing_record(self) -> None:
        super()._clear_routing_record()
        self._per_layer = {}

    def choose(self, z: torch.Tensor, t: int):
        """(j, straight-through factor [T], logits, gate values, token choices) for layer t."""
        gate = self.gates[0 if self.shared_gate else t]
        logits, values = gate(z, exclude=t)
        token_choice = values.argmax(dim=-1)
        if self.batch_routing == "mode":
            j = int(torch.bincount(token_choice, minlength=self.num_layers).argmax())
        else:
            j = int(values.mean(dim=0).argmax())
        g = values[:, j]
        return j, g / g.detach(), logits, values, token_choice

    def _hook(self, t: int):
        def hook(module, args, kwargs, output):
            if self._calling_other:
                return None
            for key in ("past_key_values", "past_key_value", "layer_past", "cache"):
                cache = kwargs.get(key)
                if cache is not None and not (isinstance(cache, (tuple, list)) and len(cache) == 0):
                    raise RuntimeError("MoLEx mixes layers and cannot share a KV cache: run with use_cache=False")
            z = args[0] if args else kwargs["hidden_states"]
            h_t = output[0] if isinstance(output, tuple) else output
            j, st, logits, values, token_choice = self.choose(z, t)
            self._calling_other = True
            try:
                other = self._layers[0][j](*args, **kwargs)
            finally:
                self._calling_other = False
            h_j = other[0] if isinstance(other, tuple) else other
            a = self.alpha.to(z.dtype)
            mixed = z + a * (h_t - z) + (1 - a) * (h_j - z) * st.to(z.dtype).reshape(*z.shape[:-1], 1)
            self._record(t, j, logits, values, token_choice)
            return (mixed,) + tuple(output[1:]) if isinstance(output, tuple) else mixed
        return hook

    def _record(self, t, j, logits, values, token_choice) -> None:
        probs = torch.softmax(logits, dim=-1)
        lb = load_balancing_loss(probs, token_choice[:, None], self.num_layers)
        loss = self.aux_loss_coef * lb
        self._per_layer[t] = (loss if torch.is_grad_enabled() else loss.detach(), j, probs.detach(),
                              token_choice.detach())
        self._last_aux_loss = torch.stack([v[0] for v in self._per_layer.values()]).sum()
        self._last_router_stats = {
            "load": torch.stack([expert_load(v[3][:, None], self.num_layers) for v in self._per_layer.values()]).mean(0),
            "entropy": torch.stack([routing_entropy(v[2]) for v in self._per_layer.values()]).mean(),
            "chosen_layers": torch.tensor([self._per_layer[k][1] if k in self._per_layer else -1
                                           for k in range(self.num_layers)]),
        }

    def remove(self) -> None:
        """Detach the hooks (the model computes its plain stack again)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def find_layer_stack(model: nn.Module, layers: Union[str, nn.ModuleList, None] = None) -> nn.ModuleList:
    if isinstance(layers, nn.ModuleList):
        return layers
    if isinstance(layers, str):
        stack = model.get_submodule(layers)
        if not isinstance(stack, nn.ModuleList):
            raise ValueError(f"{layers} is a {type(stack).__name__}, not an nn.ModuleList of layers")
        return stack
    stacks = [m for n, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and n.split(".")[-1] in DEFAULT_LAYERS_PATTERN and len(m) > 1]
    if not stacks:
        raise ValueError("no layer stack found; pass layers='dotted.name.of.the.ModuleList'")
    return max(stacks, key=len)


def apply_molex(model: nn.Module, layers: Union[str, nn.ModuleList, None] = None, hidden_size: Optional[int] = None,
                **kwargs) -> MoLEx:
    """Turn the layer stack of ``model`` into MoLEx; returns the MoLEx module (``model.molex``).

    kwargs: gate, shared_gate, proj_dim, alpha, learn_alpha, batch_routing, aux_loss_coef,
    temperature (see :class:`MoLEx`).
    """
    from .model import MoELoRAModel

    target = model.model if isinstance(model, MoELoRAModel) else model
    if hasattr(target, "molex"):
        raise ValueError("MoLEx is already applied to this model")
    stack = find_layer_stack(target, layers)
    if hidden_size is None:
        cfg = getattr(target, "config", None)
        hidden_size = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
        if hidden_size is None:
            raise ValueError("pass hidden_size= (the width of the layers' hidden states)")
    molex = MoLEx(stack, hidden_size, **kwargs)
    first = next(stack.parameters(), None)
    if first is not None:
        molex.to(first.device)  # the gates live where the layers do (fp32 whatever the model's dtype)
    target.add_module("molex", molex)
    stack_name = next(n for n, m in target.named_modules() if m is stack)
    record(target, "apply_molex", dict(layers=stack_name, hidden_size=hidden_size, **kwargs))
    return molex
