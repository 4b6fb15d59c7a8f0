"""torch.distributed with 2 CPU processes (gloo): DDP and FSDP2 give the gradients of one
process on the same data, parameters and buffers survive state-dict gathering and
save_pretrained, and what DDP needs when parameters are left out of the graph.

The router auxiliary loss is computed by each rank on its own shard, and DDP averages the
gradients: the gradient is that of mean_r(task_r + aux_r). The task loss (a mean over equal
shards) matches one process on the concatenated batch; the load-balancing loss, a product of
per-batch means, does not: the tests below show both.

All scenarios run in one spawn of two ranks (tests/distributed_workers.py); the tests
compare what the ranks saved with single-process runs made here.
"""

import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_workers as workers
from moelora import MoELoRAModel
from helpers import tiny_llama

pytestmark = [
    pytest.mark.usefixtures("single_torch_thread"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
]
TIMEOUT_S = 240
TOL = dict(rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every scenario on two ranks; returns (results of rank 0, of rank 1)."""
    out_dir = str(tmp_path_factory.mktemp("distributed"))
    context = mp.start_processes(workers.run, args=(_free_port(), out_dir), nprocs=workers.WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):  # raises with the rank's traceback if one failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the distributed ranks did not finish within {TIMEOUT_S} s")
    return tuple(torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(workers.WORLD))


def _single_process_grads(aux: bool, per_shard: bool) -> dict:
    """Gradients of one process: the loss on the concatenated batch, or the mean of the
    per-shard losses (each with its own aux loss, as every DDP rank computes it)."""
    model = workers.build_model(aux=aux)
    batch = workers.global_batch()
    if per_shard:
        shards = [workers.shard(batch, r) for r in range(workers.WORLD)]
        loss = sum(model(input_ids=s, labels=s).loss for s in shards) / len(shards)
    else:
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return workers.trainable_grads(model)


def _assert_grads_close(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, **TOL, msg=name)


def _max_difference(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


# ------------------------------------------------------------------------- DDP
def test_ddp_gradients_equal_one_process_on_the_concatenated_batch(ranks):
    expected = _single_process_grads(aux=False, per_shard=False)
    for results in ranks:
        _assert_grads_close(results["ddp_task_only"], expected)


def test_ddp_with_aux_loss_averages_each_ranks_own_aux_loss(ranks):
    per_shard = _single_process_grads(aux=True, per_shard=True)
    for results in ranks:
        _assert_grads_close(results["ddp_with_aux"], per_shard)
    concatenated = _single_process_grads(aux=True, per_shard=False)
    gap = _max_difference(ranks[0]["ddp_with_aux"], concatenated)
    assert gap > 1e-4, "the aux loss on the concatenated batch would give other gradients"


def test_ddp_needs_no_find_unused_parameters_for_experts_without_tokens(ranks):
    grads = ranks[0]["ddp_idle_experts"]  # two steps ran with find_unused_parameters=False
    assert all(g is not None for g in grads.values())
    for name, grad in grads.items():
        if name.endswith(("lora_B", "lora_A")):
            assert grad[0].abs().sum() > 0 and torch.all(grad[1:] == 0), name
        if name.endswith("lora_gamma"):
            assert grad[0] != 0 and torch.all(grad[1:] == 0), name


def test_ddp_with_switched_off_adapters_needs_find_unused_parameters(ranks):
    for results in ranks:
        outcome = results["ddp_disabled_layer"]
        assert isinstance(outcome[False], str) and "find_unused_parameters" in outcome[False]
        grads = outcome[True]
        off = [n for n in grads if ".layers.0.self_attn.q_proj." in n]
        assert len(off) == 3 and all(grads[n] is None for n in off)  # router, A, B
        assert all(g is not None for n, g in grads.items() if n not in off)


def test_ddp_example_trains_in_sync_and_saves_a_reloadable_adapter(ranks):
    sys.path.insert(0, workers.EXAMPLES)
    import train_distributed

    rank0, rank1 = (r["ddp_example"] for r in ranks)
    torch.testing.assert_close(rank1["logits"], rank0["logits"], rtol=0, atol=0)
    loaded = MoELoRAModel.from_pretrained(train_distributed.build_base_model(), rank0["directory"])
    torch.testing.assert_close(loaded(input_ids=workers.eval_batch()).logits, rank0["logits"])


# ------------------------------------------------------------------------- FSDP2
def test_fsdp2_gradients_equal_one_process_on_the_concatenated_batch(ranks):
    expected = _single_process_grads(aux=False, per_shard=False)
    for results in ranks:
        _assert_grads_close(results["fsdp2"]["grads"], expected)


def test_fsdp2_full_state_dict_and_adapter_reload_with_the_same_outputs(ranks):
    rank0, rank1 = (r["fsdp2"] for r in ranks)
    assert rank1["full_state_dict"] == {}  # gathered to rank 0 only (cpu_offload)
    torch.testing.assert_close(rank1["logits"], rank0["logits"])
    assert "sharded" in rank0["unsharded_save_error"]  # save_pretrained asks for the gathered state dict

    fresh = workers.build_model(aux=False)
    fresh.load_state_dict(rank0["full_state_dict"])  # strict: every parameter and buffer is there
    fresh.eval()
    torch.testing.assert_close(fresh(input_ids=workers.eval_batch()).logits, rank0["logits"], **TOL)

    loaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), rank0["directory"])
    torch.testing.assert_close(loaded(input_ids=workers.eval_batch()).logits, rank0["logits"], **TOL)
    steps = [m.num_steps for n, m in loaded.model.named_modules() if n.endswith("router")]
    assert len(steps) == 4 and all(int(s) == 3 for s in steps)  # the router buffers came through


@pytest.mark.parametrize("name", sorted(workers.META_CONFIGS))
def test_fsdp2_meta_device_init_initialises_every_shard(ranks, name):
    """Meta-device init after fully_shard (the FSDP2 recipe: each rank makes only its shards): reset_parameters
    reaches the experts of every rank's shard (3 experts, or 4 with the shared LoRA, over 2 ranks). Indexing a
    sharded DTensor along the expert dim raised (A's per-expert init) or wrote a copy (silently nothing): the
    shared LoRA's B (A for the embedding) kept to_empty's garbage, and MoEFFN's experts 1.. were never copied."""
    for results in ranks:
        outcome = results["fsdp2_meta_init"][name]
        assert "error" not in outcome, outcome.get("error")
        state = outcome["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
        assert torch.isfinite(outcome["output"]).all()
        for proj in ("a", "b"):
            a, b = state[f"model.{proj}.lora_A"], state[f"model.{proj}.lora_B"]
            bound = 1 / a.shape[-1] ** 0.5  # kaiming-uniform (a = sqrt(5)) of each expert's [r, d_in]
            assert a.abs().max() <= bound and a.abs().amax(dim=(1, 2)).min() > bound / 2
            if name == "task_shared":
                assert torch.all(b[-1] == 0) and torch.all(b[:-1] != 0)  # the shared LoRA starts at zero
            else:
                assert torch.all(b == 0)
        if name == "task_shared":
            a = state["model.emb.lora_embedding_A"]
            assert torch.all(a[-1] == 0) and torch.all(a[:-1] != 0)
        for key in ("w_in", "b_in", "w_out", "b_out"):
            experts = state[f"model.mlp.{key}"]
            assert torch.equal(experts, experts[:1].expand_as(experts)), key  # upcycled: copies of one FFN


def test_fsdp2_mixed_precision_matches_one_process_of_the_parameters_dtype(ranks):
    """FSDP2's MixedPrecisionPolicy(param_dtype=float64) unshards the parameters in float64 and leaves the buffers
    float32: each rank's output is that of one process running the float64 model on its shard, and the gradients
    (float32, as the sharded parameters) are those of the mean of the ranks' losses. The conv and embedding layers
    raised "lora_a must have the dtype of x" (their float32 constant buffers)."""
    model = workers.mixed_precision_model().to(torch.float64)
    outputs = [model(workers.shard(workers.global_batch(), r)) for r in range(workers.WORLD)]
    (sum(out.pow(2).mean() for out in outputs) / workers.WORLD).backward()
    for rank, results in enumerate(ranks):
        outcome = results["fsdp2_mixed_precision"]
        assert "error" not in outcome, outcome.get("error")
        assert outcome["output"].dtype == torch.float64
        torch.testing.assert_close(outcome["output"], outputs[rank].detach(), rtol=1e-12, atol=1e-12)
        grads = outcome["grads"]
        assert grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert grads[name].dtype == torch.float32, name
                torch.testing.assert_close(grads[name], p.grad.float(), **TOL, msg=name)


# ------------------------------------------------------------------------- tensor parallelism
def test_tensor_parallel_base_layers_with_whole_inputs_and_outputs_equal_one_process(ranks):
    """RowwiseParallel / ColwiseParallel with Replicate at the layer's boundaries on the adapted layers' base layers
    (an embedding and a linear MLP), applied after injection or before it (the base weights DTensors at injection):
    every rank computes one process's output and adapter gradients (fp64)."""
    model = workers.tp_model()
    expected = model(workers.tp_input())
    expected.sum().backward()
    grads = workers.trainable_grads(model)
    for results in ranks:
        for case in ("whole", "whole_before"):
            outcome = results["tensor_parallel"][case]
            assert "error" not in outcome, outcome.get("error")
            torch.testing.assert_close(outcome["output"], expected.detach(), rtol=1e-12, atol=1e-12)
            _assert_grads_close(outcome["grads"], grads)


@pytest.mark.parametrize("case, layer, style, shard", [
    ("sharded", "MoELoRALinear", "ColwiseParallel", "returns its output as a shard along the features"),
    ("sharded_before", "MoELoRALinear", "ColwiseParallel", "returns its output as a shard along the features"),
    ("sharded_down_only", "MoELoRALinear", "RowwiseParallel", "takes its input as a shard along the features"),
    ("emb_colwise", "MoELoRAEmbedding", "ColwiseParallel", "returns its output as a shard along the features"),
    ("emb_sequence_sharded", "MoELoRAEmbedding", "RowwiseParallel", "returns its output sharded along the tokens"),
])
def test_tensor_parallel_base_layer_with_a_sharded_input_or_output_is_refused_saying_what_to_do(ranks, case, layer,
                                                                                                style, shard):
    """The usual plan (colwise up, rowwise down: the activation between them sharded; a colwise or sequence-sharded
    embedding) gives an adapted layer a shard of its base output or input. It said the base layer's forward was no
    x W^T + b (leave it out), that x had the wrong width, or that the routing's shape did not match x."""
    for results in ranks:
        error = results["tensor_parallel"][case].get("error", "")
        assert error.startswith("NotImplementedError") and "tensor-parallel" in error and layer in error, error
        assert shard in error and f"{style}(input_layouts=Replicate(), output_layouts=Replicate())" in error, error
        assert "FSDP2" in error and "out of the tensor-parallel plan" in error, error


def test_transformers_tensor_parallel_plan_with_whole_attention_projections_equals_one_process(ranks):
    """transformers' plan strings: "colwise_rep" / "rowwise_rep" on the attention projections (adapted q_proj,
    v_proj) give one process's loss and adapter gradients (fp64); "colwise" on an adapted projection raises at the
    first forward, naming the style and the fix."""
    model = workers.tp_llama(tiny_llama(num_layers=2).double())
    loss = model(input_ids=workers.eval_batch(), labels=workers.eval_batch()).loss
    loss.backward()
    grads = workers.trainable_grads(model)
    for results in ranks:
        whole, sharded = (results["transformers_tensor_parallel"][k] for k in ("whole", "sharded"))
        assert "error" not in whole, whole.get("error")
        torch.testing.assert_close(whole["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        _assert_grads_close(whole["grads"], grads)
        error = sharded.get("error", "")
        assert error.startswith("NotImplementedError") and "ColwiseParallel(input_layouts=Replicate()" in error, error
