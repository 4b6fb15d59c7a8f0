"""The shape suite (DESIGN.md sections 2 and 4, issue 5) and its tiny CPU stand-in.

Kinds: ``delta`` (the MoE-LoRA delta alone; plus the whole layer where ``layer`` is set)
and ``ffn`` (a full-FFN MoE: dispatch, SwiGLU expert GEMMs, combine).
Routing: ``topk`` (top-k of softmax of random logits, renormalised) or ``task`` (k = 1,
id = the task of the token's sequence, weight = that task's gamma).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, List

SWEEP_TOKENS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
CPU_SWEEP_TOKENS = [32, 64, 128, 256]
# The decode pass: S1's layer group in inference on a batch of this many sequences, each adding one token
# (the CPU stand-in too: it shrinks the widths, and a decode batch is small anyway).
DECODE_TOKENS = 8


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    d_in: int
    d_out: int
    rank: int
    experts: int
    top_k: int
    shared_a: bool = True
    kind: str = "delta"  # "delta" or "ffn"
    routing: str = "topk"  # "topk" or "task"
    d_ff: int = 0  # ffn only
    layer: bool = False  # also time the whole layer (base nn.Linear + delta)
    note: str = ""
    sequence_len: int = 512  # task routing: one task per sequence of this many tokens (1 in decode)

    @property
    def scaling(self) -> float:
        """lora_alpha / r with lora_alpha = 2 r (MoSLD / MoLA use r = 8, alpha = 16)."""
        return 2.0

    def with_tokens(self, tokens: int) -> "Shape":
        return replace(self, tokens=tokens, name=f"{self.name.split('@')[0]}@T{tokens}", layer=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["scaling"] = self.scaling
        return out


GPU_SUITE: Dict[str, Shape] = {
    "S1": Shape("S1", 8192, 4096, 4096, 16, 8, 2, shared_a=True, layer=True,
                note="shared A (MoSLD)"),
    "S2": Shape("S2", 8192, 4096, 4096, 8, 8, 2, shared_a=False, note="per-expert A (MoLA)"),
    "S3": Shape("S3", 32768, 4096, 4096, 64, 64, 4, shared_a=True, note="many experts, large E*r"),
    "S4": Shape("S4", 16384, 2048, 2048, 8, 4, 1, shared_a=False, routing="task",
                note="task-routed LoRA (k=1, weight = per-task gamma)"),
    "S5": Shape("S5", 8192, 2048, 2048, 0, 8, 2, kind="ffn", d_ff=5632,
                note="upcycled MoE FFN (SwiGLU experts)"),
}

# Same structure, tiny sizes: the default on a machine without a GPU.
CPU_SUITE: Dict[str, Shape] = {
    "S1": Shape("S1", 256, 128, 128, 16, 8, 2, shared_a=True, layer=True, note="tiny CPU stand-in"),
    "S2": Shape("S2", 256, 128, 128, 8, 8, 2, shared_a=False, note="tiny CPU stand-in"),
    "S3": Shape("S3", 256, 128, 128, 16, 16, 4, shared_a=True, note="tiny CPU stand-in"),
    "S4": Shape("S4", 256, 128, 128, 8, 4, 1, shared_a=False, routing="task", note="tiny CPU stand-in"),
    "S5": Shape("S5", 128, 64, 64, 0, 4, 2, kind="ffn", d_ff=128, note="tiny CPU stand-in"),
}


def suite(on_gpu: bool) -> Dict[str, Shape]:
    return GPU_SUITE if on_gpu else CPU_SUITE


def sweep_shapes(on_gpu: bool, tokens: List[int] | None = None) -> List[Shape]:
    """S1 at each token count of the sweep (the plot's x axis)."""
    base = suite(on_gpu)["S1"]
    counts = tokens if tokens is not None else (SWEEP_TOKENS if on_gpu else CPU_SWEEP_TOKENS)
    return [base.with_tokens(t) for t in counts]


def decode_shape(base: Shape, tokens: int) -> Shape:
    """``base``'s whole layer at ``tokens`` tokens as decoding runs it: a batch of ``tokens``
    sequences each adding one token (so one task per token under task routing)."""
    return replace(base.with_tokens(tokens), layer=True, sequence_len=1, note=f"decode: {tokens} sequences x 1 token")
