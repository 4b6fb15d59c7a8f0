"""Raw Triton kernels of moelora (installed as ``moelora.triton_kernels``).

- ``matmul``:  strided GEMM with split-K, fp32/fp64 accumulation, optional addend.
- ``gating``:  dense gated expand of the r-wide intermediate and its backward.
- ``grouped``: expert-sorted grouped GEMMs (row gather prologue, gate epilogue),
  the per-expert weight-gradient reduction, and the fixed-order combine.

Launchers, autograd and custom-op registration live in ``moelora._triton_ops``.
"""
