"""Expert-sorted layout of the (token, slot) pairs for the grouped kernels, in torch ops.

Everything stays on the device and no value is read on the host, so the layout is
CUDA-graph safe; its sizes depend only on T, k, E and the block size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ExpertBlocks(NamedTuple):
    order: torch.Tensor  # [T*k] int64: pair indices p = t*k + j, stably sorted by expert (invalid ids last)
    offsets: torch.Tensor  # [E+1] int64: expert e owns order[offsets[e]:offsets[e+1]]
    row_pair: torch.Tensor  # [num_blocks * block_m] int64: pair of each padded row, -1 for padding
    block_expert: torch.Tensor  # [num_blocks] int32: expert of each block, -1 for unused blocks
    valid: torch.Tensor  # [T*k] bool: id in [0, E)


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the number of BLOCK_M-row blocks after per-expert padding."""
    return -(-(num_pairs + num_experts * (block_m - 1)) // block_m)


def expert_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Sort the pairs by expert (stable) and pad each expert's segment to ``block_m`` rows."""
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = flat.device
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    torch.cumsum(counts[:num_experts], 0, out=offsets[1:])
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)

    num_blocks = max_blocks(num_pairs, num_experts, block_m)
    rows = torch.arange(num_blocks * block_m, device=device)
    row_expert = torch.searchsorted(padded_ends, rows, right=True)  # E for rows past the last segment
    expert = row_expert.clamp(max=num_experts - 1)
    local = rows - (padded_ends[expert] - padded[expert])
    in_segment = (row_expert < num_experts) & (local < counts[expert])
    source = (offsets[expert] + local).clamp(max=max(num_pairs - 1, 0))
    row_pair = torch.where(in_segment, order[source], -1)
    first_rows = row_expert[::block_m]
    block_expert = torch.where(first_rows < num_experts, first_rows, -1).to(torch.int32)
    return ExpertBlocks(order, offsets, row_pair, block_expert, valid)
