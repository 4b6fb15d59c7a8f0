"""moelora's Triton kernels and their launchers (this folder imports nothing else of moelora).

- ``matmul``:  strided GEMM with split-K, grouped B columns (B_stack read from [E, K, r]), a
  second K-concatenated operand pair, fp32/fp64 accumulation, optional addend.
- ``dense``:   the dense MoE-LoRA regime and the fused layer: down-projection with the router
  logits in one pass over x, gated expand, gate + router backward, all weight gradients in
  one kernel, threshold routing and the router's auxiliary loss.
- ``grouped``: expert-sorted grouped GEMMs (row gather prologue, gate epilogue),
  the per-expert weight-gradient reduction, the fixed-order combine, and the MoE FFN's
  row kernels (gated activation) and routing kernels (mask and mixing weights).

- ``launchers``: one Python launcher per kernel (output allocation, cached launch
  configurations, direct launches, the launch counter of moelora.profiling).

Autograd and custom ops live with their ops: ``moelora.ops.moe_lora`` (the operator),
``moelora.ops.moe_lora_linear`` (the layer), ``moelora.ops.moe_ffn`` (the MoE FFN).
"""
