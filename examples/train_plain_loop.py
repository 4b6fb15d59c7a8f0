"""Train a model with MoE-LoRA layers in a plain PyTorch loop.

    python examples/train_plain_loop.py --steps 40 [--compile] [--output-dir DIR]

The loop is the usual one; what MoE-LoRA adds: the loss (``outputs.loss`` of the wrapper
already holds the router aux loss once, or ``task + moelora.aux_loss(model)`` with the bare
model), one ``step_routers`` call per optimiser step (threshold routing's eps schedule), and
``router_stats`` for logging. ``--compile`` trains the model under torch.compile.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import moelora  # noqa: E402

VOCAB, SEQ = 32, 12


def build_base_model(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def batches(batch_size: int, seed: int = 0):
    """Endless batches of arithmetic sequences start, start+d, ... (mod VOCAB), d in 1..3."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, VOCAB, (batch_size, 1), generator=g)
        stride = torch.randint(1, 4, (batch_size, 1), generator=g)
        yield (start + stride * torch.arange(SEQ)) % VOCAB


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (aot_eager on CPU)")
    parser.add_argument("--output-dir", default=None, help="write the adapter there at the end")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # Threshold routing (ST-MoE): eps rises from 0 to 0.2 over the run as step_routers is called.
    config = moelora.MoELoRAConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], num_experts=4,
                                   top_k=2, r=8, lora_alpha=16, router="threshold", threshold_eps_start=0.0,
                                   threshold_eps=0.2, threshold_ramp_steps=args.steps)
    model = moelora.get_moelora_model(build_base_model(), config).to(device).train()
    forward = model
    if args.compile:
        forward = torch.compile(model, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    losses = []
    for step, ids in zip(range(args.steps), batches(args.batch_size)):
        ids = ids.to(device)
        loss = forward(input_ids=ids, labels=ids).loss  # task loss + aux loss (added once by the wrapper)
        # With the bare model instead:  loss = model.model(input_ids=ids, labels=ids).loss + moelora.aux_loss(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.step_routers()  # once per optimiser step
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            stats = model.router_stats()["model.layers.0.self_attn.q_proj"]
            eps = model.model.model.layers[0].self_attn.q_proj.router.eps
            print(f"step {step:3d}  loss {loss.item():.3f}  eps {eps:.3f}"
                  f"  layer-0 q_proj load {[round(x, 2) for x in stats['load'].tolist()]}")
    if args.output_dir:
        model.save_pretrained(args.output_dir)
    return {"losses": losses}


if __name__ == "__main__":
    main()
