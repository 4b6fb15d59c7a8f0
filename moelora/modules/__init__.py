"""nn.Modules built on moelora.ops: the MoE-LoRA layers (``linear``: MoELoRALinear, ``conv``,
``embedding``, and ``adapter_base``, what the last two share), the per-argument checks they
and the other modules share (``fields``), the learned ``router``, the
aux-loss record every routed module keeps (``routed``), the upcycled expert FFN (``ffn``),
MoLEx (``molex``) and the nn.Linear-like init the last two share (``init``).

May import: moelora.ops, moelora.kernels, moelora.switches.
"""
