"""Putting moelora into a model: the configuration (``config``, the one validator of the
hyper-parameters), finding modules by name (``targets``), adapter membership and PEFT's adapter
conventions (``adapters``), merging (``merge``), the structural edits ``upcycle_ffn`` and
``apply_molex`` and the registry checkpoints replay them from (``structure``).

May import: moelora.modules, moelora.ops, moelora.kernels, moelora.switches.
"""
