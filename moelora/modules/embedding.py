"""``MoELoRAEmbedding``: a frozen ``nn.Embedding`` plus a routed mixture of LoRA experts.

    y[t] = embed(id[t]) + s * sum_j w[t,j] * lora_embedding_B[e[t,j]] @ lora_embedding_A[(e[t,j])][:, id[t]]

Layouts are PEFT's (``lora_embedding_A`` [r, num_embeddings], ``lora_embedding_B``
[embedding_dim, r]) with an expert dimension: A [r, V] shared (MoSLD) or [E, r, V], B
[E, D, r]. The A step is a lookup of A's columns (with the base's ``padding_idx`` and
``scale_grad_by_freq``, as PEFT); the routed B step is :func:`moelora.moe_lora` (see
:mod:`moelora.modules.adapter_base`). The learned router reads the frozen embedding vector of each
token (fp32 logits, ``router.weight`` [E, D]); task routing and the single expert work
as in :class:`moelora.MoELoRALinear`. As PEFT: A starts at zero and B ~ N(0, 1) (so a fresh
layer returns the base output), no dropout is applied to the lookup (``lora_dropout`` is
accepted and unused), and a base ``embed_scale`` (Gemma's scaled embeddings) scales the
adapter's output too. A base with ``max_norm`` (renormalised in place by each forward) is
refused, as is a subclass whose own forward may look up other rows than its input's (one
without ``embed_scale``: OPT's positional embedding reads an attention mask).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelora.modules.adapter_base import (AdapterLayerBase, LayerSettings, layer_settings,
                                          refuse_tensor_parallel_shards)
from moelora.modules.init import zero_expert_
from moelora.ops.backend import autocast_dtype


class MoELoRAEmbedding(AdapterLayerBase):
    """A frozen ``nn.Embedding`` with E LoRA experts; arguments as :class:`moelora.MoELoRALinear`
    (see the module docstring; DoRA is not supported)."""

    def __init__(self, base_layer: nn.Module, settings: Optional[LayerSettings] = None, **kwargs):
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"MoELoRAEmbedding wraps nn.Embedding layers, got {type(base_layer).__name__}")
        if base_layer.max_norm is not None:
            raise ValueError(
                f"MoELoRAEmbedding cannot wrap an nn.Embedding with max_norm={base_layer.max_norm}: its forward "
                "renormalises the looked-up rows of the weight in place, so the adapted embedding W + dW has no "
                "single meaning (PEFT's LoRA renormalises the columns of A instead, a merged layer would renormalise "
                "W + dW and unmerging would not give W back); set max_norm=None on the base layer first")
        if type(base_layer).forward is not nn.Embedding.forward and not hasattr(base_layer, "embed_scale"):
            raise TypeError(
                f"MoELoRAEmbedding cannot wrap {type(base_layer).__name__}: its forward replaces nn.Embedding's, so "
                "the rows it returns need not be those of its input, while the adapter looks its input up in A (OPT's "
                "and BART's learned positional embeddings map an attention mask or input ids to positions, "
                "Whisper's slices its weight: the delta would be that of other rows, silently); adapt the token "
                "embedding instead. Scaled token embeddings with an embed_scale (Gemma's) are wrapped")
        super().__init__(base_layer, layer_settings(settings, kwargs), a_in=base_layer.num_embeddings,
                         d_out=base_layer.embedding_dim, router_in=base_layer.embedding_dim)
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.in_features, self.out_features = self.num_embeddings, self.embedding_dim  # PEFT's names

    # As the weight: model code reads these through the module it holds (Kyutai's speech-to-text embeddings
    # compare ids with ``embed_tokens.padding_idx``; DiffusionGemma scales by ``embed_tokens.embed_scale``).
    @property
    def padding_idx(self) -> Optional[int]:
        """The base layer's padding_idx."""
        return self.base_layer.padding_idx

    @property
    def embed_scale(self):
        """The base layer's embed_scale (a scaled embedding's, Gemma's); AttributeError where it has none."""
        return self.base_layer.embed_scale

    def _register_lora(self, lora_a: nn.Parameter, lora_b: nn.Parameter) -> None:
        self.lora_embedding_A, self.lora_embedding_B = lora_a, lora_b

    @property
    def lora_A(self) -> nn.Parameter:
        """A under the name every MoE-LoRA layer uses (the parameter is ``lora_embedding_A``)."""
        return self.lora_embedding_A

    @property
    def lora_B(self) -> nn.Parameter:
        """B under the name every MoE-LoRA layer uses (the parameter is ``lora_embedding_B``)."""
        return self.lora_embedding_B

    def _init_lora_factors(self, init_lora_weights: Union[bool, str]) -> None:
        """PEFT's embedding init: A = 0, B ~ N(0, 1); ``init_lora_weights=False`` and task experts
        (gated by gamma = 0 at init, and A must be non-zero for gamma to get a gradient) draw A
        from N(0, 1) too; a task-shared LoRA keeps A = 0 (its B = 0 where A is shared by every expert,
        MoSLD), so that it starts at no delta. The column of A of the base's ``padding_idx`` is 0
        whatever the init (and gets no gradient), so the padding token keeps the base's vector."""
        nn.init.normal_(self.lora_B)
        if init_lora_weights is False or self.router_mode == "task":
            nn.init.normal_(self.lora_A)
            if self.task_shared_lora and init_lora_weights is not False:
                zero_expert_(self.lora_B if self.share_lora_a else self.lora_A, -1)
        else:
            self.lora_A.zero_()
        if self.base_layer.padding_idx is not None:  # as nn.Embedding's padding row: the padding vector stays fixed
            self.lora_A[..., self.base_layer.padding_idx].zero_()  # (its column of A gets no gradient)

    weight_function = "the rows of its weight its input names (times its embed_scale), as nn.Embedding"

    def forward_is_weight_function(self, base: nn.Module) -> bool:
        """Whether ``base`` looks up its weight's rows (nn.Embedding's forward), or is a scaled embedding holding its
        weight alone (Gemma's): a subclass with parameters of its own beside it (T5Gemma2's ``eoi_embedding``,
        which replaces the rows of one token) would lose the merged delta on what they replace, where the
        unmerged layer adds it."""
        return type(base).forward is nn.Embedding.forward or [n for n, _ in base.named_parameters()] == ["weight"]

    def base_weight(self) -> torch.Tensor:
        """The base weight in the adapter's [d_out, d_in] = [D, V] layout (a view)."""
        return self.base_layer.weight.t()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        if result.shape[-1] != self.embedding_dim or result.shape[:-1] != x.shape:
            refuse_tensor_parallel_shards(self, False, result.shape[-1] != self.embedding_dim, (1, 0))
        routing = self.compute_routing(result, tuple(x.shape))  # the router reads the frozen embedding vectors
        dtype = self.lora_B.dtype
        lora_a, a_scale = self._effective_A()
        scaling = self.scaling * a_scale
        rows = lora_a if lora_a.dim() == 2 else lora_a.reshape(-1, self.num_embeddings)  # [E*r, V]
        base = self.base_layer
        h = F.embedding(x, rows.t(), padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)
        embed_scale = getattr(base, "embed_scale", None)
        if embed_scale is None and autocast_dtype(h) is None:  # the op adds the delta to the frozen vectors
            return self._lora_on_projection(h, routing, result.to(dtype), scaling=scaling).to(result.dtype)
        # The delta alone, added here in the adapters' dtype as PEFT adds it: times the base's
        # embed_scale, or under autocast (the op's output is in autocast's dtype, and the frozen
        # vectors keep theirs, as nn.Embedding's under autocast)
        delta = self._lora_on_projection(h, routing, None, scaling=scaling)
        if embed_scale is not None:
            delta = delta * torch.as_tensor(embed_scale, dtype=dtype, device=delta.device)
        return (result.to(dtype) + delta).to(result.dtype)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, {super().extra_repr()}"
