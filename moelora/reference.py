"""``moelora.reference``: the pure-PyTorch formulations moelora is tested against, under the
import path they have always had: the per-expert loop (moelora.ops.reference) and the
vectorised formulation that is the torch backend (moelora.ops.moe_lora)."""

from moelora.ops.moe_lora import compute_dtype, dense_gates, moe_lora_torch
from moelora.ops.reference import moe_lora_naive

__all__ = ["compute_dtype", "dense_gates", "moe_lora_naive", "moe_lora_torch"]
