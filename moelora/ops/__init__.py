"""moelora's operators, one file per op: the functional entry, the backend choice, the autograd
Function and custom op, and the PyTorch backend (argument checks once, in ``validation``).

- ``moe_lora``: the entry, backend choice, PyTorch backend and Triton compositions, custom ops
  and autograd (``reference``: the naive per-expert loop, the baseline),
- ``moe_lora_linear``: MoELoRALinear's whole forward and backward as one op,
- ``moe_ffn`` (+ ``grouped_linear``: per-expert GEMMs over expert-sorted rows),
- ``routing`` (+ ``native``: the moelora._C extension, ``routing_torch``: its PyTorch
  fallbacks, ``routing_autograd``), ``routing_modes`` (the router modes on top of it) and
  ``losses`` (the routers' auxiliary losses),
- ``registration``: how the Python ops that torch.compile traces are registered with the
  dispatcher (``custom_op``, leaner per call than torch.library.custom_op).

May import: moelora.kernels, moelora.switches, moelora._C. Nothing here holds parameters.
"""
