"""The ranks of test_distributed.py: each runs every scenario on its shard of one global
batch (gloo, CPU) and saves what the parent process compares to single-process runs."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import moelora
from moelora.modules.adapter_base import is_adapter_layer
from helpers import made_real_with_garbage, randomize_adapters, reset_every_module, tiny_llama

WORLD = 2
PER_RANK = 2
SEQ = 6
EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def build_model(aux: bool = True, router: str = "softmax_topk") -> moelora.MoELoRAModel:
    """The same tiny injected LLaMA on every rank (B != 0: every adapter gets gradient)."""
    coefs = {} if aux else dict(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    config = moelora.MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, r=4,
                                   router=router, **coefs)
    model = moelora.get_moelora_model(tiny_llama(num_layers=2), config)
    randomize_adapters(model)
    return model.train()


def global_batch(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 64, (WORLD * PER_RANK, SEQ), generator=torch.Generator().manual_seed(seed))


def shard(batch: torch.Tensor, rank: int) -> torch.Tensor:
    return batch[rank * PER_RANK:(rank + 1) * PER_RANK]


def eval_batch() -> torch.Tensor:
    return torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(11))


def trainable_grads(model: torch.nn.Module) -> dict:
    """{name: grad} of the trainable parameters, names as in the MoELoRAModel; None if unused."""
    return {n: (None if p.grad is None else p.grad.detach().clone())
            for n, p in model.named_parameters() if p.requires_grad}


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def ddp_gradients(rank: int, aux: bool) -> dict:
    model = build_model(aux=aux)
    ddp = DistributedDataParallel(model)
    _loss(ddp, shard(global_batch(), rank)).backward()
    return trainable_grads(model)


def ddp_with_idle_experts(rank: int) -> dict:
    """Task routing with every token on task 0: experts 1..3 get no token in any step."""
    model = build_model(router="task")
    moelora.set_task_ids(model, 0)
    ddp = DistributedDataParallel(model)  # find_unused_parameters=False
    for _ in range(2):  # a parameter left out of the graph would raise in the second forward
        _loss(ddp, shard(global_batch(), rank)).backward()
    return trainable_grads(model)


def ddp_with_disabled_layer(rank: int) -> dict:
    """One layer's adapters switched off: its router, A and B are not in the graph."""
    results = {}
    for find_unused in (False, True):
        model = build_model()
        model.model.model.layers[0].self_attn.q_proj.disable_adapters = True
        ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
        try:
            for _ in range(2):
                _loss(ddp, shard(global_batch(), rank)).backward()
            results[find_unused] = trainable_grads(model)
        except RuntimeError as exc:
            results[find_unused] = str(exc)
    return results


def ddp_example_checkpoint(out_dir: str) -> dict:
    """examples/train_distributed.py under DDP: rank 0 saves, both ranks report outputs."""
    import train_distributed

    directory = os.path.join(out_dir, "ddp_adapter")
    ddp, losses = train_distributed.train("ddp", steps=2, batch_per_rank=PER_RANK, output_dir=directory)
    ddp.eval()
    device = next(ddp.module.parameters()).device  # cuda:N where the example trains on a GPU
    with torch.no_grad():
        logits = ddp.module(input_ids=eval_batch().to(device)).logits.cpu()
    return {"directory": directory, "logits": logits, "losses": losses}


def fsdp2_run(rank: int, out_dir: str) -> dict:
    """fully_shard per decoder layer + root: gradients, one step, full state dict, adapter."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model(aux=False)
    model.step_routers(3)  # a buffer to carry through sharding and gathering
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _loss(model, shard(global_batch(), rank)).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    try:
        model.save_pretrained(os.path.join(out_dir, "unused"))
        unsharded_save_error = None
    except ValueError as exc:
        unsharded_save_error = str(exc)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    directory = os.path.join(out_dir, "fsdp2_adapter")
    model.save_pretrained(directory, state_dict=full, is_main_process=rank == 0)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=eval_batch()).logits
    return {"grads": grads, "full_state_dict": full, "directory": directory, "logits": logits,
            "unsharded_save_error": unsharded_save_error}


class MetaNet(torch.nn.Module):
    """Embedding, two linear layers and an MLP (to upcycle): every module has its reset_parameters."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.a, self.b = torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    def forward(self, ids):
        return self.mlp(self.b(self.a(self.emb(ids))))


META_CONFIGS = {  # 3 experts (4 with the shared LoRA) over 2 ranks: uneven shards
    "task_shared": moelora.MoELoRAConfig(target_modules=["emb", "a", "b"], num_experts=3, r=4, router="task",
                                         task_shared_lora=True),
    "learned": moelora.MoELoRAConfig(target_modules=["emb", "a", "b"], num_experts=3, top_k=2, r=4),
}


def fsdp2_meta_init(name: str) -> dict:
    """The documented meta-device init under FSDP2: build on meta, fully_shard every adapter layer and MoEFFN,
    to_empty (filled with NaN here), reset_parameters; the gathered state dict and an output (or the error)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    try:
        with torch.device("meta"):
            model = moelora.get_moelora_model(MetaNet(), META_CONFIGS[name])
            moelora.upcycle_ffn(model.model, num_experts=3, top_k=2, ffn_modules=["mlp"], in_proj="0", out_proj="2",
                                activation=torch.nn.functional.gelu, router="softmax_topk")
        mesh = init_device_mesh("cpu", (WORLD,))
        for module in list(model.modules()):
            if is_adapter_layer(module) or isinstance(module, moelora.MoEFFN):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        torch.manual_seed(0)
        reset_every_module(made_real_with_garbage(model), order="apply")
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(ids, **({"task_ids": 1} if name == "task_shared" else {}))
        return {"state_dict": full, "output": out}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(exc).__name__}: {exc}"}


class ConvNet(torch.nn.Module):
    """An embedding, a grouped convolution along the sequence and a linear head: a layer of each adapter type."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 8)
        self.conv = torch.nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.head = torch.nn.Linear(8, 8)

    def forward(self, ids):
        return self.head(self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2))


def mixed_precision_model() -> moelora.MoELoRAModel:
    torch.manual_seed(0)
    config = moelora.MoELoRAConfig(target_modules=["emb", "conv", "head"], num_experts=3, top_k=2, r=4)
    model = moelora.get_moelora_model(ConvNet(), config)
    randomize_adapters(model)
    return model.train()


def fsdp2_mixed_precision(rank: int) -> dict:
    """fully_shard per adapter layer and the root with MixedPrecisionPolicy(param_dtype=float64), which casts the
    parameters and leaves the buffers float32: the rank's output and the gathered gradients (or the error)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = mixed_precision_model()
    mesh, policy = init_device_mesh("cpu", (WORLD,)), MixedPrecisionPolicy(param_dtype=torch.float64)
    for module in list(model.modules()):
        if is_adapter_layer(module):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    try:
        out = model(shard(global_batch(), rank))
        out.pow(2).mean().backward()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"output": out.detach(),
            "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}}


class TPBlock(torch.nn.Module):
    """An embedding, then a Llama-like MLP (up colwise, down rowwise in the usual plan), for tensor parallelism."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(12, 8)
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.emb(ids))))


TP_TARGETS = ("emb", "up", "down")


def tp_model(targets=TP_TARGETS, block=None) -> moelora.MoELoRAModel:
    """The same injected TPBlock (fp64, random A and B) on every rank; ``block``: a TPBlock built (seed 0) already."""
    if block is None:
        torch.manual_seed(0)
        block = TPBlock().double()
    config = moelora.MoELoRAConfig(target_modules=list(targets), num_experts=3, top_k=2, r=4, init_lora_weights=False)
    return moelora.get_moelora_model(block, config).double()


def tp_input() -> torch.Tensor:
    return torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(5))


def tensor_parallel() -> dict:
    """parallelize_module on the adapted layers' base layers: with whole inputs and outputs (Replicate at each
    layer's boundaries) the output and gradients, the plan applied after injection or before it; with the usual
    sharded plans the error of the first forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,))

    def run_plan(plan, before=False, targets=TP_TARGETS):
        try:
            if before:
                torch.manual_seed(0)
                model = tp_model(targets, parallelize_module(TPBlock().double(), mesh, plan))
            else:
                model = tp_model(targets)
                parallelize_module(model.model, mesh, {f"{k}.base_layer" if k in targets else k: v
                                                       for k, v in plan.items()})
            y = model(tp_input())
            y.sum().backward()
            return {"output": y.detach(), "grads": trainable_grads(model)}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return {"error": f"{type(exc).__name__}: {exc}"}

    whole = {"emb": RowwiseParallel(input_layouts=Replicate()), "up": ColwiseParallel(output_layouts=Replicate()),
             "down": RowwiseParallel(input_layouts=Replicate())}
    sharded = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    return {"whole": run_plan(whole), "whole_before": run_plan(whole, before=True),
            "sharded": run_plan(sharded, targets=("up", "down")),
            "sharded_before": run_plan(sharded, before=True, targets=("up", "down")),
            "sharded_down_only": run_plan(sharded, targets=("down",)),
            "emb_colwise": run_plan({"emb": ColwiseParallel()}, targets=("emb",)),
            "emb_sequence_sharded": run_plan({"emb": RowwiseParallel(input_layouts=Replicate(),
                                                                     output_layouts=Shard(1))}, targets=("emb",))}


def transformers_tensor_parallel() -> dict:
    """transformers' own tensor parallelism (apply_tensor_parallelism with its plan strings, as from_pretrained's
    tp_plan applies them) on the tiny LLaMA before injection: "colwise" q_proj / v_proj (the error), or every
    attention projection "colwise_rep" / "rowwise_rep" (whole inputs and outputs; the MLP stays sharded): the loss
    and adapter gradients. One KV head: k_proj cannot be split over two ranks, so it is replicated too."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.integrations.tensor_parallel import apply_tensor_parallelism

    mesh = init_device_mesh("cpu", (WORLD,))
    mlp = dict(gate_proj="colwise", up_proj="colwise", down_proj="rowwise")
    plans = {"sharded": dict(q_proj="colwise", k_proj="colwise_rep", v_proj="colwise", o_proj="rowwise", **mlp),
             "whole": dict(q_proj="colwise_rep", k_proj="colwise_rep", v_proj="colwise_rep", o_proj="rowwise_rep",
                           **mlp)}
    results = {}
    for name, styles in plans.items():
        try:
            base = tiny_llama(num_layers=2).double()
            plan = {}
            for module_name, _ in base.named_modules():
                style = styles.get(module_name.rpartition(".")[2])
                if style is not None:
                    plan.update({module_name: style, f"{module_name}.weight": style})
            apply_tensor_parallelism(base, mesh, plan)
            model = tp_llama(base)
            loss = _loss(model, eval_batch())
            loss.backward()
            results[name] = {"loss": loss.detach(), "grads": trainable_grads(model)}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


def tp_llama(base: torch.nn.Module) -> moelora.MoELoRAModel:
    """The tiny LLaMA (fp64) with q_proj / v_proj adapted, random A and B, in training mode."""
    config = moelora.MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=3, top_k=2, r=4,
                                   init_lora_weights=False)
    torch.manual_seed(1)
    return moelora.get_moelora_model(base, config).double().train()


def run(rank: int, port: int, out_dir: str) -> None:
    """Entry point of each spawned rank."""
    sys.path.insert(0, EXAMPLES)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {
            "ddp_task_only": ddp_gradients(rank, aux=False),
            "ddp_with_aux": ddp_gradients(rank, aux=True),
            "ddp_idle_experts": ddp_with_idle_experts(rank),
            "ddp_example": ddp_example_checkpoint(out_dir),
            "fsdp2": fsdp2_run(rank, out_dir),
            "fsdp2_meta_init": {name: fsdp2_meta_init(name) for name in META_CONFIGS},
            "fsdp2_mixed_precision": fsdp2_mixed_precision(rank),
            "tensor_parallel": tensor_parallel(),
            "transformers_tensor_parallel": transformers_tensor_parallel(),
            "ddp_disabled_layer": ddp_with_disabled_layer(rank),  # last: its failing DDP is left behind
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
