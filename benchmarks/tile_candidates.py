"""The tile candidates the tuners measure on a GPU: benchmarks/tune_grouped.py for
moelora.kernels.launchers.GROUPED_CONFIGS and benchmarks/tune_dense.py for DENSE_CONFIGS.

Plain data (no imports of torch or moelora), so that ``python -m benchmarks.compile_kernels``
can compile every candidate for sm_90 without a GPU and the tests can run every dense
candidate under the interpreter: whatever a tuner picks is known to compile, to fit in
shared memory and to compute the right result.
"""

# Grouped kernels: TileConfig fields (block_m, block_n, block_k, group, num_warps, num_stages)
# per (kernel, widths) part of the shape class; the first is the default's shape.
GROUPED_MATMUL = {
    "ll": [(64, 128, 64, 8, 4, 3), (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (64, 256, 64, 8, 4, 3)],
    "ls": [(64, 128, 64, 8, 4, 2), (64, 256, 64, 8, 4, 2), (128, 128, 64, 8, 8, 2), (128, 256, 64, 8, 8, 2)],
    "sl": [(64, 64, 64, 8, 4, 3), (64, 64, 128, 8, 4, 3), (128, 64, 64, 8, 4, 3), (128, 64, 128, 8, 8, 3)],
}
GROUPED_WGRAD = {
    "ll": [(64, 64, 32, 8, 4, 3), (128, 128, 32, 8, 8, 3), (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3)],
    "ls": [(64, 64, 32, 8, 4, 3), (128, 64, 64, 8, 4, 3), (256, 64, 64, 8, 8, 3), (64, 64, 128, 8, 4, 3)],
}
GROUPED_SMOKE = [(32, 32, 32, 4, 1, 1)]  # on a CPU (the interpreter)

# Dense kernels: overrides of the launcher's default tiles (DENSE_TILE_KEYS of
# moelora.kernels.launchers; keys left out keep the default), per kernel.
DENSE = {
    "lora_down": [
        dict(BLOCK_T=128, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_T=64, BLOCK_K=128, num_warps=4, num_stages=3),
        dict(BLOCK_T=128, BLOCK_K=128, num_warps=8, num_stages=3),
        dict(BLOCK_T=32, BLOCK_K=128, num_warps=4, num_stages=4),
        dict(BLOCK_T=256, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_T=64, BLOCK_K=256, num_warps=8, num_stages=2),
        # 16-token tiles: four times the programs of the default at small T (T 1024: 64 for 132
        # SMs), where every candidate above measured the same (benchmarks/README, lead 5)
        dict(BLOCK_T=16, BLOCK_K=128, num_warps=4, num_stages=4),
    ],
    # Chosen with their sm_90 register counts in view (S1, fp32 B): each needs at most 167
    # registers per thread, i.e. two to four programs per SM, but the last two (one); the last
    # is the default before the registers were counted (all E*r columns in one step), kept to
    # measure the new default against it.
    "gated_expand": [
        dict(BLOCK_T=128, BLOCK_N=128, BLOCK_C=16, num_warps=8, num_stages=3),
        dict(BLOCK_T=64, BLOCK_N=64, BLOCK_C=32, num_warps=4, num_stages=3),
        dict(BLOCK_T=64, BLOCK_N=128, BLOCK_C=16, num_warps=4, num_stages=3),
        dict(BLOCK_T=32, BLOCK_N=128, BLOCK_C=32, num_warps=4, num_stages=2),
        dict(BLOCK_T=128, BLOCK_N=64, BLOCK_C=16, num_warps=4, num_stages=3),
        dict(BLOCK_T=64, BLOCK_N=64, num_warps=4, num_stages=1),
        dict(BLOCK_T=32, BLOCK_N=128, num_warps=4, num_stages=1),
        dict(BLOCK_T=128, BLOCK_N=128, BLOCK_C=32, num_warps=8, num_stages=2),
        dict(BLOCK_T=64, BLOCK_N=128, BLOCK_C=128, num_warps=8, num_stages=1),
    ],
    "matmul": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=2),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
    ],
    "lora_weight_grad": [  # the fifth is the default before 64-row tiles
        dict(BLOCK_M=64, BLOCK_T=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_T=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_T=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_T=32, num_warps=8, num_stages=4),
        dict(BLOCK_M=32, BLOCK_T=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_T=32, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_T=128, num_warps=8, num_stages=2),
    ],
}
# On a CPU (the interpreter) one small candidate per kernel, so that the smoke run is quick.
DENSE_SMOKE = {
    "lora_down": [dict(BLOCK_T=16, BLOCK_K=16)],
    "gated_expand": [dict(BLOCK_T=16, BLOCK_N=16, BLOCK_C=16)],
    "matmul": [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)],
    "lora_weight_grad": [dict(BLOCK_M=16, BLOCK_T=16, BLOCK_CB=16, BLOCK_CA=16)],
}
