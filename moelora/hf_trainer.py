"""``moelora.hf_trainer``: the import path of :class:`MoELoRATrainer` and
:class:`StepRoutersCallback`, which live in moelora.integrations.hf_trainer (transformers is
imported here, not by ``import moelora``)."""

from moelora.integrations.hf_trainer import MoELoRATrainer, StepRoutersCallback, without_tied_aliases

__all__ = ["MoELoRATrainer", "StepRoutersCallback", "without_tied_aliases"]
