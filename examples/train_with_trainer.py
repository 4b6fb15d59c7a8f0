"""Fine-tune a model with MoE-LoRA layers using transformers' Trainer.

    python examples/train_with_trainer.py --steps 30 --output-dir /tmp/moelora-trainer

A tiny LLaMA is built from a config (no download) and learns to continue arithmetic
sequences. ``MoELoRAModel.forward`` adds the router auxiliary loss to ``outputs.loss`` once,
so the loss Trainer optimises is task loss + aux loss with no Trainer subclass.
:class:`moelora.integrations.hf_trainer.MoELoRATrainer` is Trainer with checkpoints that also work for
tied embeddings and carry the adapter in moelora's format; plain ``Trainer`` trains the same
(with threshold routing's eps ramp, ``threshold_ramp_steps > 0``, only when given
``callbacks=[StepRoutersCallback()]``, which MoELoRATrainer installs).
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import moelora  # noqa: E402

VOCAB, SEQ = 32, 12


def build_base_model(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def arithmetic_sequences(n: int, seed: int = 0) -> list:
    """Token sequences start, start+d, start+2d, ... (mod VOCAB), d in 1..3; labels = inputs."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(SEQ)) % VOCAB
    return [{"input_ids": row, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": row.clone()}
            for row in ids]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)
    from transformers import TrainingArguments

    from moelora.integrations.hf_trainer import MoELoRATrainer

    config = moelora.MoELoRAConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], num_experts=4,
                                   top_k=2, r=8, lora_alpha=16, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    model = moelora.get_moelora_model(build_base_model(), config)
    model.print_trainable_parameters()

    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or scratch
        training_args = TrainingArguments(
            output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=max(1, args.steps // 10),
            save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0)
        # Default remove_unused_columns and label_names work: MoELoRAModel.forward shows the
        # wrapped model's arguments and names `labels`.
        trainer = MoELoRATrainer(model=model, args=training_args, train_dataset=arithmetic_sequences(256),
                                 eval_dataset=arithmetic_sequences(32, seed=1))
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
        # model.safetensors (Trainer's resume) + the adapter (moelora_config.json, adapter_model.safetensors)
        trainer.save_model(output_dir)

        model.eval()
        ids = arithmetic_sequences(2, seed=2)[0]["input_ids"][None].to(model.device)
        reloaded = moelora.MoELoRAModel.from_pretrained(build_base_model(), output_dir).to(model.device)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"eval loss {before:.3f} -> {after:.3f}; training losses {[round(x, 3) for x in losses]}")
    load = moelora.router_stats(model)["model.layers.0.self_attn.q_proj"]["load"]
    print(f"expert load of layer 0 q_proj (slots per token): {load.tolist()}")
    return {"eval_loss_before": before, "eval_loss_after": after, "losses": losses}


if __name__ == "__main__":
    main()
