"""transformers' ``Trainer`` for MoE-LoRA models (needs transformers; not imported by ``moelora``).

A plain ``Trainer`` trains a :class:`~moelora.MoELoRAModel` as it is: the loss it optimises is
``outputs.loss``, which already holds the auxiliary loss once. Saving is where it falls
short: a module that is not a ``PreTrainedModel`` is checkpointed as its whole state dict
through safetensors, which refuses tensors that share memory, so models with tied
input/output embeddings (GPT-2, many small LLaMA-style models) cannot be checkpointed.

:class:`MoELoRATrainer` saves that state dict with the tied aliases left out (Trainer's
resume and best-model loading read it back unchanged: they load non-strictly, and an alias
is the tensor that was kept; Trainer logs the alias as a missing key) and writes the adapters
in moelora's format beside it, as ``save_pretrained`` does (every adapter; the active one only where
Trainer passes a gathered state dict), so every checkpoint also loads with
``MoELoRAModel.from_pretrained(base_model, checkpoint_dir)``; a model compiled before it was handed over
(``torch.compile(model)``) is saved as the model it compiles, under the compiled module's names (Trainer's resume
loads them into it).

Threshold routing with an eps ramp (``router="threshold"`` and ``threshold_ramp_steps > 0``)
needs ``moelora.step_routers(model)`` once per optimiser step, which Trainer does not call:
:class:`StepRoutersCallback` calls it at ``on_step_end`` (once per optimiser step, after the
gradient-accumulation micro-batches), and :class:`MoELoRATrainer` installs it. A plain
``Trainer`` needs ``callbacks=[StepRoutersCallback()]`` for such models (other routers have no
schedule). The routers' step counts are buffers of the model, saved in its checkpoints, so a
run resumed from a checkpoint goes on from the checkpoint's step.

:class:`MoELoRATrainer` also logs ``aux_loss`` beside Trainer's ``loss`` where the model's routers
record one (learned routers): the mean of ``moelora.aux_loss`` over the training forwards
(micro-batches) since the last log of this ``train()``, as added to the loss before Trainer scales it for gradient
accumulation, averaged over the processes as Trainer averages ``loss`` (over those that recorded one:
the routed layers may not run on every process's batches). It is kept on the device
between logs (no host sync per step).
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moelora.model import MoELoRAModel, aux_loss, recorded_aux_loss, step_routers
from moelora.modules.ffn import MoEFFN


def without_tied_aliases(state_dict: dict) -> dict:
    """``state_dict`` keeping one name per shared tensor (the first one), as safetensors needs."""
    kept, seen = {}, set()
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride())) if isinstance(tensor, torch.Tensor) else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        kept[name] = tensor
    return kept


class _SmootherOfWrapped:
    """Trainer's label smoother for a MoELoRAModel: labels shifted as for the wrapped model's class (Trainer reads
    the class of the module it holds, the wrapper, so it never shifts a causal LM's labels), plus the aux loss of
    the forward that made the logits (Trainer called it without labels, so the wrapper added it to no loss), where
    the wrapper's config adds it to the output's loss (``add_aux_loss_to_output``)."""

    def __init__(self, smoother, wrapped: MoELoRAModel):
        self.smoother, self.wrapped = smoother, wrapped
        self.shift = wrapped.model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()

    def __call__(self, model_output, labels, shift_labels: bool = False, **kwargs):
        loss = self.smoother(model_output, labels, shift_labels=self.shift, **kwargs)
        return loss + aux_loss(self.wrapped) if self.wrapped.moelora_config.add_aux_loss_to_output else loss


class StepRoutersCallback(TrainerCallback):
    """Advances the routers' threshold schedules (``moelora.step_routers``) once per optimiser
    step: at ``on_step_end``, which Trainer calls after each optimiser step (not per
    gradient-accumulation micro-batch). A step the fp16 GradScaler skipped (accelerate's
    ``step_was_skipped``, which also keeps Trainer's learning-rate schedule where it is) does not
    advance them. Needed with a plain ``Trainer`` for threshold routing with
    ``threshold_ramp_steps > 0``; :class:`MoELoRATrainer` installs it."""

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None and not getattr(optimizer, "step_was_skipped", False):
            step_routers(model)


class MoELoRATrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints of a MoELoRAModel work with tied embeddings
    and hold the adapter in moelora's format too, that advances the routers' threshold
    schedules once per optimiser step (:class:`StepRoutersCallback`) and logs the aux loss
    (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, StepRoutersCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(StepRoutersCallback())  # one, also where callbacks=[...] holds it already
        # the aux losses of the training forwards since the last log: their sum (on the device) and count
        self._aux_loss_sum: Optional[torch.Tensor] = None
        self._aux_loss_count = 0

    def get_decay_parameter_names(self, model) -> list:
        """Trainer's (every parameter but the norms' and those whose name holds "bias"), less the expert biases
        of upcycled FFNs (MoEFFN's ``b_in``, ``b_out``, ``b_gate``): copies of the FFN biases Trainer leaves
        undecayed, whose names lost the word."""
        expert_biases = {f"{prefix}.{name}" if prefix else name
                         for prefix, module in model.named_modules() if isinstance(module, MoEFFN)
                         for name in MoEFFN.BIAS_NAMES if getattr(module, name) is not None}
        return [name for name in super().get_decay_parameter_names(model) if name not in expert_biases]

    def _inner_training_loop(self, *args, **kwargs):
        """Trainer's training loop, whose logs start with no aux loss, as its ``loss`` (it resets the loss it logs
        there): the steps a previous ``train()`` left unlogged (or a batch size ``auto_find_batch_size`` gave up)
        are in neither."""
        self._aux_loss_sum, self._aux_loss_count = None, 0
        return super()._inner_training_loop(*args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        self._record_aux_loss(model)
        return loss

    def _record_aux_loss(self, model) -> None:
        """Add the aux loss of the training forward just run to the sum logged next (not under nn.DataParallel
        over several devices: the replicas record it, and the held model's record is stale)."""
        if isinstance(model, torch.nn.DataParallel) and len(model.device_ids) > 1:
            return
        wrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad():
            total = recorded_aux_loss(getattr(wrapped, "_orig_mod", wrapped))
        if total is not None:
            total = total.float()
            self._aux_loss_sum = total if self._aux_loss_sum is None else self._aux_loss_sum + total
            self._aux_loss_count += 1

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Trainer's log, with ``aux_loss`` beside a training log's ``loss`` (see the module docstring)."""
        if "loss" in logs:
            mean = self._mean_aux_loss()
            if mean is not None:
                logs = {**logs, "aux_loss": mean}
        super().log(logs, *args, **kwargs)

    def _mean_aux_loss(self) -> Optional[float]:
        """The mean of the aux losses recorded since the last log on each process, averaged over the processes that
        recorded one (None where none did); the record is reset. Every process enters the gather, those that
        recorded nothing too (their routed layers may not have run: a VLM's adapted vision tower on text-only
        batches): it is a collective, which the others would wait in for good."""
        if self._aux_loss_count:
            mean, recorded = self._aux_loss_sum / self._aux_loss_count, 1.0
        else:
            mean, recorded = torch.zeros((), device=self.args.device), 0.0
        self._aux_loss_sum, self._aux_loss_count = None, 0
        pair = torch.stack([mean, torch.full_like(mean, recorded)]).reshape(1, 2)
        means, recorded = self.accelerator.gather(pair).unbind(-1)
        processes = int((recorded > 0).sum())
        return (means * (recorded > 0)).sum().item() / processes if processes else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss. Where Trainer computes it from the logits itself (``label_smoothing_factor``), the labels
        are shifted as for the wrapped model (a causal LM's are) and the aux loss is added, as to ``outputs.loss``;
        under nn.DataParallel over several devices, whose replicas keep the aux losses, that raises.
        (A ``compute_loss_func`` is the user's loss: add ``moelora.aux_loss(model)`` there.)"""
        wrapped = self.accelerator.unwrap_model(model)
        wrapped = getattr(wrapped, "_orig_mod", wrapped)  # TrainingArguments(torch_compile=True): the compiled module
        if self.label_smoother is None or self.compute_loss_func is not None or not isinstance(wrapped, MoELoRAModel):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if isinstance(model, torch.nn.DataParallel) and len(model.device_ids) > 1:
            # Each device's replica records its aux loss on its own copies of the layers, which the replica drops
            # after the forward: the smoother would read the held model's layers, whose record is none or stale.
            raise ValueError(
                "label_smoothing_factor with nn.DataParallel (Trainer's with several GPUs and no distributed launch): "
                "the aux losses are recorded by the replicas, out of reach of the loss Trainer computes from the "
                "logits, so it would be trained without them; launch with torchrun / accelerate (DDP), use one GPU, "
                "or set label_smoothing_factor=0")
        smoother, self.label_smoother = self.label_smoother, _SmootherOfWrapped(self.label_smoother, wrapped)
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.label_smoother = smoother

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        held = self.accelerator.unwrap_model(self.model)
        model = getattr(held, "_orig_mod", held)  # a model the user compiled: the MoELoRAModel it compiles
        if not isinstance(model, MoELoRAModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # the held module's names (a compiled one's under _orig_mod.): those Trainer's resume loads into it
        super()._save(output_dir, without_tied_aliases(state_dict if state_dict is not None else held.state_dict()))
        # Without a state_dict from Trainer (DeepSpeed / FSDP gather one) the model's own tensors are read: every
        # adapter is written, as save_pretrained lays them out; a given state_dict holds the active adapter only.
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
