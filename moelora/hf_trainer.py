"""``moelora.hf_trainer``: the import path of :class:`MoELoRATrainer`, which lives in
moelora.integrations.hf_trainer (transformers is imported here, not by ``import moelora``)."""

from moelora.integrations.hf_trainer import MoELoRATrainer, without_tied_aliases

__all__ = ["MoELoRATrainer", "without_tied_aliases"]
