"""Data-parallel training of a model with MoE-LoRA layers: DDP or FSDP2 (``fully_shard``).

    torchrun --nproc-per-node 2 examples/train_distributed.py --strategy ddp
    torchrun --nproc-per-node 2 examples/train_distributed.py --strategy fsdp2
    python examples/train_distributed.py --strategy fsdp2      # one process, world size 1

gloo on CPU, nccl on GPU. Every rank trains on its own shard of the batch; the router
auxiliary loss is each rank's own (computed on its shard), so the gradient is the mean over
ranks of (task + aux) on each shard. Rank 0 writes the adapter: with FSDP2 from a full
state dict gathered on every rank first.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import moelora  # noqa: E402

VOCAB = 64


def build_base_model(seed: int = 0) -> torch.nn.Module:
    """A tiny LLaMA built from a config (no download), the same on every rank."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def build_model() -> moelora.MoELoRAModel:
    """The base model with MoE-LoRA on its q/v projections."""
    config = moelora.MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, r=4, lora_alpha=8)
    return moelora.get_moelora_model(build_base_model(), config)


def shard_of_batch(step: int, batch_per_rank: int, seq: int = 16) -> torch.Tensor:
    """This rank's rows of the global batch of ``step`` (same global batch on every rank)."""
    g = torch.Generator().manual_seed(step)
    world, rank = dist.get_world_size(), dist.get_rank()
    global_batch = torch.randint(0, VOCAB, (world * batch_per_rank, seq), generator=g)
    return global_batch[rank * batch_per_rank:(rank + 1) * batch_per_rank]


def wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP2 with one shard group per decoder layer plus the root."""
    model.to(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def save_adapter(model: torch.nn.Module, strategy: str, output_dir: str) -> None:
    """Rank 0 writes the adapter; FSDP2 gathers the full state dict on every rank first."""
    if strategy == "ddp":
        if dist.get_rank() == 0:
            model.module.save_pretrained(output_dir)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model.save_pretrained(output_dir, state_dict=full, is_main_process=dist.get_rank() == 0)
    dist.barrier()


def train(strategy: str = "ddp", steps: int = 5, batch_per_rank: int = 4, lr: float = 1e-2,
          output_dir: str | None = None):
    """Train in an initialised process group; returns (the wrapped model, this rank's losses)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = wrap(build_model().train(), strategy, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        ids = shard_of_batch(step, batch_per_rank).to(device)
        loss = model(input_ids=ids, labels=ids).loss  # task loss + this rank's aux loss, once
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    if output_dir is not None:
        save_adapter(model, strategy, output_dir)
    return model, losses


def init_process_group() -> None:
    """From torchrun's environment, else a single process (world size 1)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-per-rank", type=int, default=4)
    parser.add_argument("--output-dir", default=None, help="where rank 0 writes the adapter")
    args = parser.parse_args(argv)
    init_process_group()
    try:
        _, losses = train(args.strategy, args.steps, args.batch_per_rank, output_dir=args.output_dir)
        if dist.get_rank() == 0:
            print(f"{args.strategy}, {dist.get_world_size()} process(es): losses {[round(x, 4) for x in losses]}")
        return losses
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
