"""transformers' Trainer with a MoELoRAModel: the loss it optimises holds the aux loss once,
its column dropping and loss kwargs read the wrapped model's signature, tuple outputs, the
threshold routers' eps schedule (StepRoutersCallback), and checkpoints (MoELoRATrainer, tied
embeddings, resume, save_pretrained arguments)."""

import copy
import inspect
import io
import os

import pytest
import torch
import torch.nn as nn

import moelora
from moelora import MoELoRAConfig, MoELoRAModel, get_moelora_model
from helpers import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")
from moelora.integrations.hf_trainer import MoELoRATrainer, StepRoutersCallback, without_tied_aliases  # noqa: E402
from moelora.model import clear_aux_losses  # noqa: E402
from moelora.modules.router import Router  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_torch_thread")
VOCAB, SEQ = 64, 8


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True,
                    save_strategy="no", logging_steps=1, seed=0, per_device_train_batch_size=4, max_steps=3)
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def _lm_dataset(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, VOCAB, (n, SEQ), generator=g)]


def _llama_moelora(**overrides):
    cfg = dict(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, r=4)
    cfg.update(overrides)
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(**cfg))
    randomize_adapters(model)  # B != 0: router and A get task-loss gradient too
    return model.train()


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------- the loss Trainer optimises
def test_one_trainer_step_follows_the_gradient_of_task_plus_aux_loss_once(tmp_path):
    model = _llama_moelora()
    data = _lm_dataset(n=8)
    reference = copy.deepcopy(model)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    task = reference.model(**batch).loss  # the bare model: no aux loss added
    aux = moelora.aux_loss(reference)
    assert aux.item() > 0
    params = list(_trainable(reference).values())
    grads = {k: torch.autograd.grad(loss, params, retain_graph=True)
             for k, loss in (("once", task + aux), ("without", task), ("twice", task + 2 * aux))}

    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    lr = 1.0  # plain SGD, no clipping or decay: the step is -lr * grad
    trainer = transformers.Trainer(model=model, train_dataset=data, args=_args(
        tmp_path, optim="sgd", learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, max_steps=1, per_device_train_batch_size=len(data)))
    assert trainer.model_accepts_loss_kwargs  # LLaMA takes num_items_in_batch through the wrapper
    trainer.train()
    stepped = torch.cat([(before[n] - p.detach()).flatten() / lr for n, p in _trainable(model).items()])
    expected = {k: torch.cat([g.flatten() for g in gs]) for k, gs in grads.items()}
    torch.testing.assert_close(stepped, expected["once"], rtol=1e-4, atol=1e-6)
    for other in ("without", "twice"):
        assert (stepped - expected[other]).abs().max() > 100 * (stepped - expected["once"]).abs().max()
    for kind in ("router.weight", "lora_A", "lora_B"):  # every kind of adapter parameter was trained
        moved = [n for n, p in _trainable(model).items() if n.endswith(kind) and not torch.equal(p, before[n])]
        assert len(moved) == 4, kind


def test_outputs_loss_is_task_loss_plus_aux_loss_for_dict_and_tuple_outputs():
    model = _llama_moelora()
    ids = _lm_dataset(n=2)[0]["input_ids"][None]
    out = model(input_ids=ids, labels=ids)
    aux = moelora.aux_loss(model)
    task = model.model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(out.loss, task + aux)
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert type(as_tuple) is tuple
    torch.testing.assert_close(as_tuple[0], out.loss)  # (loss, logits, ...): the aux loss once
    torch.testing.assert_close(as_tuple[1], out.logits)
    no_labels = model(input_ids=ids, return_dict=False)  # no loss first: left unchanged
    torch.testing.assert_close(no_labels[0], out.logits)


def test_trainer_loss_decreases_and_eval_reports_the_loss(tmp_path):
    model = _llama_moelora()
    data = _lm_dataset(n=4)
    trainer = transformers.Trainer(model=model, train_dataset=data, eval_dataset=data, args=_args(
        tmp_path, learning_rate=2e-2, max_steps=12))
    assert trainer.label_names == ["labels"]  # read from MoELoRAModel.forward: evaluation gathers the loss
    start = trainer.evaluate()["eval_loss"]
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    end = trainer.evaluate()["eval_loss"]
    assert end < start - 0.1, (start, end)


@pytest.mark.parametrize("add_aux", [True, False], ids=["aux_loss", "add_aux_loss_to_output=False"])
def test_moelora_trainer_label_smoothing_shifts_a_causal_lms_labels_and_adds_the_aux_loss(tmp_path, add_aux):
    """With label_smoothing_factor Trainer computes the loss from the logits itself, choosing the labels' shift by
    the held module's class (the wrapper's, which no causal LM mapping names) and calling the model without labels
    (so the wrapper adds the aux loss to no loss): MoELoRATrainer's loss, in training and evaluation, is the
    smoothed loss of the next tokens plus the aux loss once, as the bare model's under Trainer."""
    model = _llama_moelora(add_aux_loss_to_output=add_aux)
    data = _lm_dataset(n=4)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    bare = transformers.Trainer(model=copy.deepcopy(model.model), args=_args(tmp_path, label_smoothing_factor=0.1))
    expected = bare.compute_loss(bare.model, dict(batch))  # the bare LLaMA's: labels shifted
    model(input_ids=batch["input_ids"])
    expected = expected + moelora.aux_loss(model) * add_aux
    trainer = MoELoRATrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1))
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), expected)
    model.eval()
    loss, _, _ = trainer.prediction_step(model, dict(batch), prediction_loss_only=True)
    torch.testing.assert_close(loss, expected.detach())
    if add_aux:  # torch_compile=True hands compute_loss the compiled module (Trainer's own shift reads its class)
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(trainer.compute_loss(compiled, dict(batch)).detach(), expected.detach())


def test_moelora_trainer_label_smoothing_leaves_a_classifiers_labels_unshifted(tmp_path):
    """With label_smoothing_factor, a sequence classifier's labels are not shifted (its class is no causal LM):
    MoELoRATrainer's loss is the bare model's under Trainer plus the aux loss once."""
    model = get_moelora_model(tiny_bert(num_layers=1, classification=True),
                              MoELoRAConfig(target_modules=["query", "value"], num_experts=4, top_k=2, r=4))
    randomize_adapters(model)
    model.train()  # the routers record aux losses (the tiny BERT has no dropout)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, VOCAB, (4, SEQ), generator=g), "labels": torch.tensor([0, 1, 2, 1])}
    bare = transformers.Trainer(model=copy.deepcopy(model.model), args=_args(tmp_path, label_smoothing_factor=0.1))
    expected = bare.compute_loss(bare.model, dict(batch))
    model(input_ids=batch["input_ids"])
    assert moelora.aux_loss(model) > 0
    expected = expected + moelora.aux_loss(model)
    trainer = MoELoRATrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1))
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), expected)


def test_moelora_trainer_on_a_model_without_adapters_is_trainer(tmp_path):
    """MoELoRATrainer holding a plain transformers model (no MoELoRAModel) computes Trainer's label-smoothed loss and
    saves as Trainer does (no moelora adapter files); holding a plain nn.Module, it saves as Trainer does too."""
    torch.manual_seed(0)
    model = tiny_llama(num_layers=1)
    data = _lm_dataset(n=4)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    plain = transformers.Trainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1))
    trainer = MoELoRATrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1))
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), plain.compute_loss(model, dict(batch)))
    trainer.save_model(str(tmp_path / "saved"))
    files = set(os.listdir(tmp_path / "saved"))
    assert "model.safetensors" in files and "moelora_config.json" not in files
    trainer = MoELoRATrainer(model=nn.Sequential(nn.Linear(4, 1)), args=_args(tmp_path))  # no save_pretrained
    trainer.save_model(str(tmp_path / "module"))
    assert "model.safetensors" in os.listdir(tmp_path / "module")


class ReplicatingDataParallel(nn.DataParallel):
    """nn.DataParallel's forward over ``device_ids`` on CPU (its own needs GPUs): the batch split in one chunk per
    device, each run by a replica of the module made as torch.nn.parallel.replicate makes them (each module's
    ``_replicate_for_data_parallel``, sharing the parameters), and the logits gathered."""

    def forward(self, **inputs):
        if len(self.device_ids) <= 1:
            return self.module(**inputs)
        chunks = {k: v.chunk(len(self.device_ids)) for k, v in inputs.items()}
        outputs = [_replica(self.module)(**{k: c[i] for k, c in chunks.items()}) for i in range(len(self.device_ids))]
        return {"logits": torch.cat([out["logits"] for out in outputs])}


def _replica(module, made=None):
    made = {} if made is None else made
    replica = made[module] = module._replicate_for_data_parallel()
    replica._parameters, replica._buffers = dict(module._parameters), dict(module._buffers)
    for name, child in module._modules.items():
        if child is not None:
            replica._modules[name] = made[child] if child in made else _replica(child, made)
    return replica


def test_moelora_trainer_label_smoothing_refuses_data_parallel_over_several_devices(tmp_path):
    """Trainer wraps the model in nn.DataParallel with several GPUs and no distributed launch. Its replicas record
    the aux losses on their own copies of the layers, dropped after the forward, so the label-smoothed loss (made
    from the gathered logits) read the held model's layers: no aux loss (or a stale one), silently. It raises
    instead; DataParallel on one device runs the model itself, and keeps the aux loss."""
    model = _llama_moelora()
    data = _lm_dataset(n=4)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    trainer = MoELoRATrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1))
    expected = trainer.compute_loss(model, dict(batch))
    parallel = ReplicatingDataParallel(model)
    parallel.device_ids = [0]
    torch.testing.assert_close(trainer.compute_loss(parallel, dict(batch)), expected)
    parallel.device_ids = [0, 1]
    clear_aux_losses(model)  # the held model's layers: no record (the replicas' are theirs)
    with pytest.raises(ValueError, match="label_smoothing_factor with nn.DataParallel"):
        trainer.compute_loss(parallel, dict(batch))

    # the user's compute_loss_func is Trainer's to call (the label smoother is not used): no refusal
    def user_loss(outputs, labels, num_items_in_batch=None):
        return outputs["logits"].mean()

    trainer = MoELoRATrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1), compute_loss_func=user_loss)
    torch.testing.assert_close(trainer.compute_loss(parallel, dict(batch)),
                               model(input_ids=batch["input_ids"]).logits.mean())


class MicroBatchRecorder(transformers.Trainer):
    """Trainer remembering the micro-batches it computed losses on."""

    micro_batches: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.micro_batches.append({k: v.detach().clone() for k, v in inputs.items() if k != "num_items_in_batch"})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize("loss_kwargs", [True, False], ids=["num_items_in_batch", "accepts_loss_kwargs=False"])
def test_gradient_accumulation_weights_the_aux_loss_per_micro_batch(tmp_path, loss_kwargs):
    """With num_items_in_batch (transformers models) Trainer sums the micro-batch losses, each
    normalised by the whole accumulated batch's token count: the aux loss, added per
    micro-batch, is summed (as transformers' Mixtral's). With ``accepts_loss_kwargs = False``
    each micro-batch loss is a mean divided by the accumulation steps: the aux loss is averaged."""
    accumulation = 2
    model = _llama_moelora()
    if not loss_kwargs:
        model.accepts_loss_kwargs = False
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    trainer = MicroBatchRecorder(model=model, train_dataset=_lm_dataset(n=4), args=_args(
        tmp_path, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation))
    trainer.micro_batches = []
    trainer.train()
    assert trainer.model_accepts_loss_kwargs is loss_kwargs and len(trainer.micro_batches) == accumulation

    total = 0
    for batch in trainer.micro_batches:  # equal token counts: sum/num_items == mean / accumulation
        task = reference.model(**batch).loss
        aux = moelora.aux_loss(reference)
        total = total + (task / accumulation + aux if loss_kwargs else (task + aux) / accumulation)
    expected = torch.autograd.grad(total, list(_trainable(reference).values()))
    for (name, p), grad in zip(_trainable(model).items(), expected):
        torch.testing.assert_close(before[name] - p.detach(), grad, rtol=1e-4, atol=1e-6, msg=name)


class MoELoRAMicroBatchRecorder(MoELoRATrainer):
    """MoELoRATrainer remembering the micro-batches it computed losses on."""

    micro_batches: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.micro_batches.append({k: v.detach().clone() for k, v in inputs.items() if k != "num_items_in_batch"})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_torch_compile_trains_label_smoothing_with_gradient_accumulation_as_the_formula(tmp_path):
    """``TrainingArguments(torch_compile=True)``: Trainer hands compute_loss the compiled module. With label smoothing
    and 2 accumulated micro-batches one SGD step follows, per micro-batch, the smoothed loss of the next tokens over
    the accumulated batch's token count plus the aux loss once (float64 reference by formula), and the logged
    ``aux_loss`` is the micro-batches' mean (with the compiled module taken for no MoELoRAModel, the labels would
    go unshifted and the aux loss unadded)."""
    accumulation, smoothing, lr = 2, 0.1, 1.0
    model = _llama_moelora()
    reference = copy.deepcopy(model).double()
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    trainer = MoELoRAMicroBatchRecorder(model=model, train_dataset=_lm_dataset(n=4), args=_args(
        tmp_path, optim="sgd", learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        label_smoothing_factor=smoothing, torch_compile=True, torch_compile_backend="eager"))
    trainer.micro_batches = []
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.model_accepts_loss_kwargs and len(trainer.micro_batches) == accumulation

    tokens = sum(batch["labels"][:, 1:].numel() for batch in trainer.micro_batches)
    total, aux_losses = 0, []
    for batch in trainer.micro_batches:
        log_probs = reference.model(input_ids=batch["input_ids"]).logits[:, :-1].log_softmax(-1)
        aux_losses.append(moelora.aux_loss(reference))
        nll = -log_probs.gather(-1, batch["labels"][:, 1:, None]).sum()
        uniform = -log_probs.mean(-1).sum()
        total = total + ((1 - smoothing) * nll + smoothing * uniform) / tokens + aux_losses[-1]
    assert all(aux.dtype == torch.float64 and aux > 0 for aux in aux_losses)
    expected = torch.autograd.grad(total, list(_trainable(reference).values()))
    for (name, p), grad in zip(_trainable(model).items(), expected):
        torch.testing.assert_close((before[name] - p.detach()).double() / lr, grad, rtol=1e-4, atol=1e-6, msg=name)
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logged) == 1
    assert logged[0]["aux_loss"] == pytest.approx(sum(aux_losses).item() / accumulation, rel=1e-5)
    assert logged[0]["loss"] == pytest.approx(total.item(), rel=1e-5)


def test_moelora_trainer_leaves_the_upcycled_experts_biases_out_of_weight_decay(tmp_path):
    """Trainer decays every parameter but the norms' and those whose name holds "bias". An upcycled FFN's expert
    biases (MoEFFN's b_in, b_out: copies of BERT's intermediate.dense.bias and output.dense.bias, which Trainer
    left undecayed) hold none, so a plain Trainer decays them; MoELoRATrainer leaves them out as it leaves the
    biases they came from (before: decayed). The expert weights and the router keep their decay."""
    bert = tiny_bert(num_layers=1, classification=True)
    moelora.upcycle_ffn(bert, num_experts=2, top_k=2)
    model = get_moelora_model(bert, MoELoRAConfig(target_modules=["query"], num_experts=2, top_k=2, r=4))
    trainer = MoELoRATrainer(model=model, args=_args(tmp_path, weight_decay=0.1))
    decayed = set(trainer.get_decay_parameter_names(model))
    ffn = "model.bert.encoder.layer.0.intermediate."
    assert {ffn + "b_in", ffn + "b_out"}.isdisjoint(decayed)
    assert {ffn + "w_in", ffn + "w_out", ffn + "router.weight"} <= decayed
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        in_group = {names[id(p)] for p in group["params"]}
        assert (ffn + "b_in" in in_group) <= (group["weight_decay"] == 0.0)


# ------------------------------------------------------------------------- the aux loss in the logs
def test_moelora_trainer_logs_the_mean_aux_loss_of_the_micro_batches_since_the_last_log(tmp_path):
    """MoELoRATrainer logs ``aux_loss`` beside ``loss``: the mean of the aux losses of every training forward
    (micro-batch) since the last log, here 2 optimiser steps of 2 micro-batches per log, read from the
    forwards themselves by a hook. An evaluation between logs adds nothing to it."""
    model = _llama_moelora()
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(
        (module.training, moelora.aux_loss(module).item())))
    trainer = MoELoRATrainer(model=model, train_dataset=_lm_dataset(n=16), eval_dataset=_lm_dataset(n=4, seed=1),
                             args=_args(tmp_path, max_steps=4, logging_steps=2, per_device_train_batch_size=2,
                                        gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=1))
    trainer.train()
    trained = [value for training, value in seen if training]
    assert len(trained) == 8 and len(seen) > 8  # evaluation forwards ran too
    logged = [log["aux_loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(logged) == 2 and all("aux_loss" not in log for log in trainer.state.log_history if "loss" not in log)
    for got, want in zip(logged, (sum(trained[:4]) / 4, sum(trained[4:]) / 4)):
        assert got == pytest.approx(want, rel=1e-6) and want > 0


def test_moelora_trainer_logs_the_aux_loss_of_this_training_run_only(tmp_path):
    """A run whose last steps were not logged (3 steps, a log every 2) leaves their aux losses unlogged, as Trainer
    leaves their loss: the next ``train()`` (a second run, a resumed one, a hyperparameter-search trial) starts its
    logs afresh, as Trainer's ``loss`` does (before: its first ``aux_loss`` held the previous run's last step)."""
    model = _llama_moelora()
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(moelora.aux_loss(module).item()))
    trainer = MoELoRATrainer(model=model, train_dataset=_lm_dataset(n=16), args=_args(
        tmp_path, max_steps=3, logging_steps=2, per_device_train_batch_size=2))
    trainer.train()
    assert len(seen) == 3 and len([log for log in trainer.state.log_history if "aux_loss" in log]) == 1
    unlogged = seen.pop()
    seen.clear()
    trainer.train()
    logged = [log["aux_loss"] for log in trainer.state.log_history if "aux_loss" in log]
    assert len(seen) == 3 and len(logged) == 1
    assert logged[0] == pytest.approx(sum(seen[:2]) / 2, rel=1e-6)
    assert abs(unlogged - sum(seen[:2]) / 2) > 1e-4  # the step left unlogged changes the mean


def test_moelora_trainer_logs_the_aux_loss_under_data_parallel_on_one_device_only(tmp_path):
    """nn.DataParallel on one device runs the model itself, whose layers record the aux loss: it is logged. Over
    several devices the replicas record it and the held model's record is stale: nothing is added to the log."""
    model = _llama_moelora()
    trainer = MoELoRATrainer(model=model, args=_args(tmp_path))
    ids = _lm_dataset(n=2)[0]["input_ids"][None]
    model(input_ids=ids, labels=ids)
    aux = moelora.aux_loss(model).item()
    parallel = ReplicatingDataParallel(model)
    parallel.device_ids = [0]
    trainer._record_aux_loss(parallel)
    model(input_ids=ids.flip(-1), labels=ids)  # another record on the held model, which the replicas would not make
    assert moelora.aux_loss(model).item() != pytest.approx(aux, rel=1e-3)
    parallel.device_ids = [0, 1]
    trainer._record_aux_loss(parallel)  # the held model's (stale) record is left out
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["aux_loss"] == pytest.approx(aux, rel=1e-6) and aux > 0
    trainer._record_aux_loss(model)
    trainer.accelerator.gather = lambda t: torch.cat([t, 3 * t])  # another process's sum: 3 times this one's
    trainer.log({"loss": 1.0})  # averaged over the processes, as Trainer averages the loss
    assert trainer.state.log_history[-1]["aux_loss"] == pytest.approx(2 * moelora.aux_loss(model).item(), rel=1e-6)


def test_moelora_trainer_logs_the_aux_loss_with_every_process_in_the_gather(tmp_path):
    """Under DDP a process's forwards may record no aux loss where another's do (the routed layers run on some
    inputs only: a VLM's adapted vision tower on text-only batches). Trainer logs on every process; the gather of
    the aux loss is a collective, entered by every process (before: only by those with a record, so the others
    went on to the next step's collectives and two CPU processes under torchrun hung where a plain Trainer ran),
    and the mean is over the processes that recorded one (before: their sums over this process's count)."""
    model = _llama_moelora()
    ids = _lm_dataset(n=2)[0]["input_ids"][None]
    trainer = MoELoRATrainer(model=model, args=_args(tmp_path))
    gathered = []

    def gather_with(other):  # the other process's (mean, recorded) pair beside this one's
        def gather(tensor):
            gathered.append(tensor)
            return torch.cat([tensor, torch.tensor(other, dtype=tensor.dtype).reshape(tensor.shape)])
        return gather

    trainer.accelerator.gather = gather_with([0.25, 1.0])  # this process recorded nothing, the other 0.25
    trainer.log({"loss": 1.0})
    assert len(gathered) == 1 and trainer.state.log_history[-1]["aux_loss"] == pytest.approx(0.25)
    model(input_ids=ids, labels=ids)
    trainer._record_aux_loss(model)
    aux = moelora.aux_loss(model).item()
    trainer.accelerator.gather = gather_with([0.0, 0.0])  # this process recorded one, the other none
    trainer.log({"loss": 1.0})
    assert len(gathered) == 2 and trainer.state.log_history[-1]["aux_loss"] == pytest.approx(aux, rel=1e-6) and aux > 0
    trainer.log({"loss": 1.0})  # none recorded anywhere since the last log: no aux_loss
    assert len(gathered) == 3 and "aux_loss" not in trainer.state.log_history[-1]


def test_moelora_trainer_logs_no_aux_loss_without_learned_routers(tmp_path):
    model = get_moelora_model(tiny_llama(num_layers=2), MoELoRAConfig(target_modules=["q_proj"], num_experts=2,
                                                                      router="task"))
    model.set_task_ids(1)
    trainer = MoELoRATrainer(model=model.train(), train_dataset=_lm_dataset(n=4), args=_args(tmp_path, max_steps=2))
    trainer.train()
    assert any("loss" in log for log in trainer.state.log_history)
    assert all("aux_loss" not in log for log in trainer.state.log_history)


# ------------------------------------------------------------------------- the threshold routers' schedule
class RouterStepRecorder(transformers.TrainerCallback):
    """Records every router's step count at the start of each optimiser step (before its micro-batches)."""

    def __init__(self):
        self.seen = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.seen.append(sorted({int(m.num_steps) for m in model.modules() if isinstance(m, Router)}))


def _threshold_llama():
    return _llama_moelora(router="threshold", threshold_eps=0.2, threshold_ramp_steps=4)


def _router_steps(model):
    return sorted({int(m.num_steps) for m in model.modules() if isinstance(m, Router)})


@pytest.mark.parametrize("make", ["MoELoRATrainer", "Trainer+callback", "MoELoRATrainer+callback"])
def test_trainer_advances_threshold_routers_once_per_optimizer_step(tmp_path, make):
    """3 optimiser steps of 2 accumulated micro-batches each: the routers' eps ramp advances 3
    times (at each optimiser step, not per micro-batch), once whether MoELoRATrainer installs
    the callback or it is also given (or given to a plain Trainer)."""
    model = _threshold_llama()
    recorder = RouterStepRecorder()
    callbacks = [recorder] + ([StepRoutersCallback()] if make.endswith("callback") else [])
    trainer_class = transformers.Trainer if make.startswith("Trainer") else MoELoRATrainer
    trainer = trainer_class(model=model, train_dataset=_lm_dataset(n=12), callbacks=callbacks, args=_args(
        tmp_path, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2))
    trainer.train()
    assert recorder.seen == [[0], [1], [2]]  # 4 routers (2 layers x q, v), each at the optimiser step's count
    assert _router_steps(model) == [3]
    router = model.model.model.layers[0].self_attn.q_proj.router
    assert router.eps == pytest.approx(0.15)  # 0.2 * 3 / 4


def test_a_step_the_grad_scaler_skips_advances_the_schedule_no_more_than_the_learning_rate(tmp_path):
    """fp16 training with a GradScaler skips the optimiser step whose gradients overflow; Trainer then leaves the
    learning-rate schedule alone (accelerate's ``step_was_skipped``), and the eps ramp must stay in step with it:
    3 optimiser steps of which the first is skipped advance the routers twice (before: 3 times). A real CPU
    GradScaler sits in the accelerator, an inf gradient in the first backward; the non-fused AdamW lets accelerate
    see the skip (the fused one takes the scaler's found_inf itself, and Trainer steps both schedules then)."""
    model = _threshold_llama()
    backwards = []
    lora_a = model.model.model.layers[0].self_attn.q_proj.lora_A
    lora_a.register_hook(lambda grad: grad * float("inf") if not backwards.append(1) and len(backwards) == 1 else grad)
    recorder = RouterStepRecorder()
    trainer = MoELoRATrainer(model=model, train_dataset=_lm_dataset(n=8), callbacks=[recorder], args=_args(
        tmp_path, max_steps=3, per_device_train_batch_size=2, optim="adamw_torch", lr_scheduler_type="linear"))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() < 2.0 ** 16  # the first step overflowed, and was skipped
    assert trainer.lr_scheduler.last_epoch == 2  # Trainer's lr schedule: 2 steps, not 3
    assert recorder.seen == [[0], [0], [1]]
    assert _router_steps(model) == [2]


def test_plain_trainer_without_the_callback_leaves_the_schedule_alone(tmp_path):
    model = _threshold_llama()
    transformers.Trainer(model=model, train_dataset=_lm_dataset(n=8), args=_args(tmp_path, max_steps=2)).train()
    assert _router_steps(model) == [0]  # what StepRoutersCallback is for (docs/integration.md)


def test_resumed_training_goes_on_from_the_checkpoints_router_step(tmp_path):
    """The step count is a buffer of the model, saved in the checkpoint: resuming from step 2 of 4
    ends at 4, as the run without the interruption, not 2 + 4 or 2."""
    data = _lm_dataset(n=16)
    model = _threshold_llama()
    MoELoRATrainer(model=model, train_dataset=data, args=_args(
        tmp_path, save_strategy="steps", save_steps=2, max_steps=4, per_device_train_batch_size=2)).train()
    assert _router_steps(model) == [4]
    checkpoint = tmp_path / "out" / "checkpoint-2"
    resumed_model = _threshold_llama()
    recorder = RouterStepRecorder()
    resumed = MoELoRATrainer(model=resumed_model, train_dataset=data, callbacks=[recorder], args=_args(
        tmp_path, max_steps=4, per_device_train_batch_size=2))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert recorder.seen == [[2], [3]]  # steps 3 and 4 ran with the checkpoint's schedule
    assert _router_steps(resumed_model) == [4]
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b)  # the same training as the uninterrupted run


# ------------------------------------------------------------------------- what Trainer reads from forward
def test_wrapper_forward_shows_the_wrapped_signature():
    model = _llama_moelora()
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "task_ids", "aux_loss_mask"} <= set(params)
    assert list(params)[-1] == "kwargs"

    class NoKwargs(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, features, labels=None):
            out = self.proj(features)
            return {"loss": out.square().mean() if labels is not None else None, "logits": out}

    wrapped = get_moelora_model(NoKwargs(), MoELoRAConfig(target_modules=["proj"], num_experts=2, top_k=1))
    assert list(inspect.signature(wrapped.forward).parameters) == ["features", "labels", "task_ids", "aux_loss_mask"]


def test_copies_of_the_wrapper_run_their_own_model():
    model = _llama_moelora()
    ids = _lm_dataset(n=1)[0]["input_ids"][None]
    expected = model(input_ids=ids).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(clone(input_ids=ids).logits, expected)
        with torch.no_grad():
            for n, p in clone.named_parameters():
                if n.endswith("lora_B"):
                    p.zero_()
        assert not torch.allclose(clone(input_ids=ids).logits, expected)  # the clone's own weights
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_trainer_keeps_the_columns_the_model_takes_and_drops_the_rest(tmp_path):
    model = get_moelora_model(tiny_bert(num_layers=2, classification=True),
                              MoELoRAConfig(target_modules=["query", "value"], num_experts=4, top_k=2, r=4))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, VOCAB, (SEQ,), generator=g), "attention_mask": torch.ones(SEQ).long(),
             "labels": torch.tensor(i % 3), "example_id": f"row-{i}"} for i in range(8)]
    trainer = transformers.Trainer(model=model, train_dataset=data, args=_args(tmp_path, learning_rate=1e-2))
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # example_id dropped, inputs kept
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_trainer_passes_no_loss_kwargs_to_a_forward_without_kwargs(tmp_path):
    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(6, 1)

        def forward(self, features, labels=None):
            pred = self.proj(features).squeeze(-1)
            return {"loss": (pred - labels).square().mean(), "logits": pred}

    model = get_moelora_model(Regressor(), MoELoRAConfig(target_modules=["proj"], num_experts=3, top_k=2, r=2))
    g = torch.Generator().manual_seed(1)
    data = [{"features": torch.randn(6, generator=g), "labels": torch.randn((), generator=g)} for _ in range(8)]
    trainer = transformers.Trainer(model=model, train_dataset=data, args=_args(tmp_path))
    assert not trainer.model_accepts_loss_kwargs
    trainer.train()  # a num_items_in_batch kwarg would raise TypeError in Regressor.forward


# ------------------------------------------------------------------------- checkpoints
def test_moelora_trainer_checkpoints_a_tied_embedding_model_and_resumes(tmp_path):
    def gpt2_moelora():
        return get_moelora_model(tiny_gpt2(), MoELoRAConfig(target_modules=["c_attn"], num_experts=4, top_k=2, r=4))

    data = _lm_dataset(n=8)
    model = gpt2_moelora()
    assert model.model.lm_head.weight is model.model.transformer.wte.weight
    trainer = MoELoRATrainer(model=model, train_dataset=data, args=_args(
        tmp_path, save_strategy="steps", save_steps=2, max_steps=2, learning_rate=1e-2))
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert {"model.safetensors", "adapter_model.safetensors", "moelora_config.json"} <= set(os.listdir(checkpoint))
    ids = data[0]["input_ids"][None]
    model.eval()
    expected = model(input_ids=ids).logits

    loaded = MoELoRAModel.from_pretrained(tiny_gpt2(), str(checkpoint))
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    resumed_model = gpt2_moelora()
    resumed = MoELoRATrainer(model=resumed_model, train_dataset=data, args=_args(tmp_path, max_steps=2))
    resumed.train(resume_from_checkpoint=str(checkpoint))  # loads the checkpoint, no step left to take
    resumed_model.eval()
    torch.testing.assert_close(resumed_model(input_ids=ids).logits, expected)


def test_moelora_trainer_checkpoints_a_model_the_user_compiled(tmp_path):
    """A MoELoRAModel compiled before it is handed to MoELoRATrainer (``torch.compile(model)``; Trainer then needs
    ``remove_unused_columns=False``, as for any compiled model: the compiled forward shows no signature) is
    checkpointed as the model it compiles: tied aliases left out and the adapters written (before: the compiled
    module was taken for no MoELoRAModel, so a tied-embedding model's checkpoint raised safetensors' 'Some tensors
    share memory', and other models' checkpoints held no adapter files). Resuming into a compiled model loads it."""
    def tied_llama():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True))

    def compiled_llama_moelora():
        model = get_moelora_model(tied_llama(), MoELoRAConfig(target_modules=["q_proj"], num_experts=4, top_k=2, r=4))
        assert model.model.lm_head.weight is model.model.model.embed_tokens.weight
        return model, torch.compile(model, backend="eager", fullgraph=True)

    data = _lm_dataset(n=8)
    model, compiled = compiled_llama_moelora()
    trainer = MoELoRATrainer(model=compiled, train_dataset=data, args=_args(
        tmp_path, save_strategy="steps", save_steps=2, max_steps=2, learning_rate=1e-2, remove_unused_columns=False))
    trainer.train()
    assert [log["aux_loss"] > 0 for log in trainer.state.log_history if "loss" in log] == [True, True]
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert {"model.safetensors", "adapter_model.safetensors", "moelora_config.json"} <= set(os.listdir(checkpoint))
    ids = data[0]["input_ids"][None]
    model.eval()
    expected = model(input_ids=ids).logits
    trained = {n: p.detach().clone() for n, p in _trainable(model).items()}

    loaded = MoELoRAModel.from_pretrained(tied_llama(), str(checkpoint))
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    resumed_model, resumed_compiled = compiled_llama_moelora()
    assert any(not torch.equal(p, trained[n]) for n, p in _trainable(resumed_model).items())
    MoELoRATrainer(model=resumed_compiled, train_dataset=data, args=_args(
        tmp_path, max_steps=2, remove_unused_columns=False)).train(resume_from_checkpoint=str(checkpoint))
    for name, p in _trainable(resumed_model).items():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0, msg=name)


def test_moelora_trainer_checkpoints_hold_every_adapter_as_save_pretrained_writes_them(tmp_path):
    """A model with several adapters, training a non-default one: each checkpoint (and ``save_model``) holds
    every adapter in moelora's format, laid out as ``save_pretrained`` lays them out ("default" at the root,
    the others in subfolders), with the trained adapter's weights."""
    model = _llama_moelora()
    model.add_adapter("other", MoELoRAConfig(target_modules=["k_proj"], num_experts=2, top_k=1, r=2))
    model.add_adapter("idle", MoELoRAConfig(target_modules=["o_proj"], num_experts=1, r=2))
    model.set_adapter("other")
    randomize_adapters(model)
    trained = set(_trainable(model))
    data = _lm_dataset(n=4)
    MoELoRATrainer(model=model, train_dataset=data, args=_args(
        tmp_path, save_strategy="steps", save_steps=2, max_steps=2, learning_rate=1e-2)).train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    assert {"adapter_model.safetensors", "moelora_config.json", "other", "idle"} <= set(os.listdir(checkpoint))
    ids = data[0]["input_ids"][None]
    model.eval()
    loaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), checkpoint)
    torch.testing.assert_close(loaded(input_ids=ids).logits, _with_adapter(model, "default", ids))
    loaded.load_adapter(os.path.join(checkpoint, "other"), "other")
    loaded.set_adapter("other")
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert model.active_adapter == "other" and set(_trainable(model)) == trained  # saving left them as they were


def test_without_tied_aliases_drops_only_names_of_the_same_tensor():
    """A checkpoint keeps one name per tensor (the tied aliases dropped) and every tensor that is not the same view:
    other slices of one storage (other offsets), other strides and other shapes over the same memory are kept."""
    base = torch.arange(16.0).reshape(4, 4)
    state = {"w": base, "tied": base, "row0": base[0], "row1": base[1], "row0_again": base[0], "t": base.t(),
             "top": base[:2], "other": base.clone(), "step": 3}
    assert list(without_tied_aliases(state)) == ["w", "row0", "row1", "t", "top", "other", "step"]


def test_moelora_trainer_saves_the_state_dict_trainer_passes(tmp_path):
    """Where Trainer passes a gathered state dict (DeepSpeed, FSDP), that is what the checkpoint holds, in Trainer's
    file and in moelora's adapter files, not the held model's own tensors."""
    from safetensors.torch import load_file

    model = _llama_moelora()
    trainer = MoELoRATrainer(model=model, args=_args(tmp_path))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith("q_proj.lora_B"))
    state[key] += 1.0
    out = str(tmp_path / "saved")
    trainer._save(out, state_dict=state)
    torch.testing.assert_close(load_file(os.path.join(out, "model.safetensors"))[key], state[key])
    loaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), out)
    torch.testing.assert_close(loaded.get_parameter(key), state[key])
    assert not torch.equal(model.get_parameter(key), state[key])


def test_moelora_trainer_writes_the_adapter_files_where_trainer_saves_only(tmp_path, monkeypatch):
    """Trainer calls _save on every process where it gathers the state dict (DeepSpeed, FSDP); moelora's adapter
    files are written where args.should_save (the main process) only."""
    model = _llama_moelora()
    trainer = MoELoRATrainer(model=model, args=_args(tmp_path))
    monkeypatch.setattr(transformers.TrainingArguments, "should_save", property(lambda self: False))
    trainer._save(str(tmp_path / "other_rank"), state_dict=model.state_dict())
    assert not (tmp_path / "other_rank" / "moelora_config.json").exists()


def _with_adapter(model, name, ids):
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        return model(input_ids=ids).logits
    finally:
        model.set_adapter(previous)


def test_save_pretrained_takes_the_arguments_transformers_passes(tmp_path):
    model = _llama_moelora()
    model.eval()
    ids = _lm_dataset(n=1)[0]["input_ids"][None]
    model.save_pretrained(str(tmp_path / "skipped"), is_main_process=False)
    moelora.save_pretrained(model, str(tmp_path / "skipped"), is_main_process=False)  # the function takes it too
    assert not (tmp_path / "skipped").exists()
    with pytest.raises(ValueError, match="no adapter named .missing."):  # checked on every rank, written on none
        model.save_pretrained(str(tmp_path / "skipped"), is_main_process=False, selected_adapters=["missing"])
    model.save_pretrained(str(tmp_path / "a"), state_dict=model.state_dict(), safe_serialization=True)
    loaded = MoELoRAModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path / "a"))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="lacks adapter tensors"):
        model.save_pretrained(str(tmp_path / "b"), state_dict={})


def test_trainer_step_leaves_padding_out_of_the_aux_loss_with_aux_loss_mask_from(tmp_path):
    """``model.aux_loss_mask_from = "attention_mask"``: Trainer passes the batch only, and the wrapper
    takes its attention_mask as the aux-loss mask; the step follows task + masked aux loss."""
    model = _llama_moelora(router_aux_loss_coef=0.5)
    data = _lm_dataset(n=4)
    for i, example in enumerate(data):
        example["attention_mask"] = torch.ones_like(example["input_ids"])
        example["attention_mask"][SEQ - i:] = 0  # 0 .. 3 padding tokens at the end
    reference = copy.deepcopy(model)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    task = reference.model(**batch).loss
    unmasked = moelora.aux_loss(reference)
    with moelora.use_aux_loss_mask(reference.model, batch["attention_mask"]):
        reference.model(**batch)
    masked = moelora.aux_loss(reference)
    params = list(_trainable(reference).values())
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(task + masked, params)])
    assert (masked - unmasked).abs() > 1e-4

    model.aux_loss_mask_from = "attention_mask"
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    lr = 0.1
    transformers.Trainer(model=model, train_dataset=data, args=_args(
        tmp_path, optim="sgd", learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        max_steps=1, per_device_train_batch_size=len(data))).train()
    stepped = torch.cat([(before[n] - p.detach()).flatten() / lr for n, p in _trainable(model).items()])
    torch.testing.assert_close(stepped, expected, rtol=1e-4, atol=1e-6)
