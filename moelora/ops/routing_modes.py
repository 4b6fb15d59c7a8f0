"""Routers: from router logits (fp32) to top-k expert ids and gate weights.

Every learned mode runs on moelora's fused routing op (``moelora.route``: moelora._C, or its
PyTorch fallback), so the layers and ``moelora.route`` share one implementation:

- ``softmax_topk``: softmax over all experts, keep the top-k, renormalise them to sum to 1
  (MoSLD, MoLA); with ``renormalize=False`` the kept probabilities are used as they are.
- ``topk_softmax``: top-k logits first, softmax over those k (Mixtral, MoLEx).
- ``threshold``: ST-MoE style: softmax, top-n; the best expert is always used, every other
  of the top-n with probability min(1, p_hat / eps) in training (p_hat its probability
  renormalised over the top-n) and iff p_hat >= eps at eval; the kept experts' weights are
  renormalised. Dropped slots keep their id with weight 0, so shapes never depend on data.
  eps follows a linear schedule the trainer steps (``moelora.step_routers``).
- ``task``: k = 1, the expert is the task id given with the batch, the gate a trainable
  per-task scale gamma (see :func:`task_routing`).

A learned mode returns ``Routing(weights [T, k] fp32, ids [T, k] int32, logits [T, E] fp32,
counts [E] (slots per expert; threshold routing: those with weight > 0), prob_sums [E] (summed
softmax probabilities), lse [T] (logsumexp of the logits))``: the last three are the statistics
of the auxiliary losses.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from moelora.kernels.launchers import accumulator_dtype
from moelora.ops.backend import without_autocast
from moelora.ops.validation import _tracing_or_capturing, check_ids_in_range, syncing_checks_enabled
from moelora.ops.routing import router_topk


ROUTER_MODES = ("softmax_topk", "topk_softmax", "threshold", "task")
# The modes of a learned router (task routing has none).
LEARNED_MODES = tuple(m for m in ROUTER_MODES if m != "task")


class Routing(NamedTuple):
    weights: torch.Tensor  # [T, k] fp32
    ids: torch.Tensor  # [T, k] int32 (int64 for task routing)
    logits: Optional[torch.Tensor] = None  # [T, E] fp32 (None for static routing)
    counts: Optional[torch.Tensor] = None  # [E]: slots routed to each expert (threshold routing: with weight > 0)
    prob_sums: Optional[torch.Tensor] = None  # [E]: sum over tokens of the softmax probabilities
    lse: Optional[torch.Tensor] = None  # [T]: logsumexp of each token's logits

    @property
    def probs(self) -> Optional[torch.Tensor]:
        """[T, E] softmax of the logits (computed on access)."""
        return None if self.logits is None else torch.softmax(self.logits, dim=-1)


def linear_logits(x: torch.Tensor, weight: torch.Tensor, jitter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A linear router's logits x W^T [T, E] for x [T, d_in] in x's accumulator dtype (fp32; fp64
    for fp64 x), the router reading x (.) ``jitter`` where given: the PyTorch formula of what the
    fused layer's kernel computes, whatever W's dtype (a half-precision router weight is not
    rounded to, nor are the logits) and whatever torch.autocast says."""
    x = x.to(accumulator_dtype(x.dtype))
    if jitter is not None:
        x = x * jitter.to(x.dtype)
    with without_autocast(x):
        return nn.functional.linear(x, weight.to(x.dtype))


def scheduled_eps(eps_start: float, eps_end: float, ramp_steps: int,
                  num_steps: Optional[torch.Tensor]) -> Union[float, torch.Tensor]:
    """Threshold routing's eps: eps_end without a ramp, else eps_start + (eps_end - eps_start) *
    num_steps / ramp_steps as a 0-d fp32 tensor computed on num_steps' device (no host read), eps_end
    exactly from num_steps = ramp_steps on (the formula's fp32 rounding could end past it)."""
    if ramp_steps <= 0 or num_steps is None:
        return eps_end
    ramped = eps_start + (eps_end - eps_start) * (num_steps.float() / ramp_steps)
    return torch.where(num_steps >= ramp_steps, eps_end, ramped)


def threshold_keep(top_p: torch.Tensor, eps: Union[float, torch.Tensor], noise: Optional[torch.Tensor]):
    """ST-MoE's kept weights from the top-n probabilities ``top_p`` [T, n] (best first): the best
    always, another iff ``noise < p_hat / eps`` (``noise`` uniform [T, n], training) or
    ``p_hat >= eps`` (``noise`` None); every slot while eps <= 0; renormalised over the kept
    slots, 0 for dropped ones. Differentiable in top_p. ``eps`` is a float or a 0-d tensor.
    The PyTorch twin of the fused layer's threshold_weights kernel."""
    tiny = torch.finfo(top_p.dtype).tiny
    if not isinstance(eps, torch.Tensor) and eps <= 0:
        return top_p / top_p.sum(dim=-1, keepdim=True).clamp_min(tiny)
    p_hat = top_p / top_p.sum(dim=-1, keepdim=True).clamp_min(tiny)
    keep = noise < torch.clamp(p_hat / eps, max=1.0) if noise is not None else p_hat >= eps
    keep[..., 0] = True  # the best expert always
    if isinstance(eps, torch.Tensor):
        keep = keep | (eps <= 0)
    kept = torch.where(keep, top_p, torch.zeros_like(top_p))
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(tiny)


def slot_counts(ids: torch.Tensor, num_experts: int, counted: torch.Tensor) -> torch.Tensor:
    """[E] int64: the slots of ``ids`` [T, k] routed to each expert where ``counted`` [T, k] (bool) holds (out of
    place: torch.func.vmap cannot add batched slots into the unbatched zeros in place)."""
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).index_add(
        0, ids.reshape(-1).long(), counted.reshape(-1).long())


def kept_counts(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: slots with weight > 0 routed to each expert."""
    return slot_counts(ids, num_experts, weights > 0)


def route_logits(logits: torch.Tensor, mode: str, top_k: int, renormalize: bool = True,
                 eps: Union[float, torch.Tensor] = 0.0, noise: Optional[torch.Tensor] = None) -> Routing:
    """Routing of [T, E] logits in any learned mode (see the module docstring); differentiable in
    the logits through the weights, prob_sums and lse."""
    logits = logits.to(accumulator_dtype(logits.dtype))
    if mode == "threshold":
        top_p, ids, counts, prob_sums, lse = router_topk(logits, top_k, "softmax_topk", False)
        weights = threshold_keep(top_p, eps, noise)
        # the slots with weight > 0, as the fused layer's kernels count them: at eps <= 0 too, where a
        # slot whose probability underflowed to 0 (a saturated softmax) is kept with weight 0
        counts = kept_counts(ids, weights, logits.shape[-1])
    else:
        weights, ids, counts, prob_sums, lse = router_topk(logits, top_k, mode, renormalize)
    return Routing(weights, ids, logits, counts, prob_sums, lse)


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> Routing:
    """Softmax over all experts, then the top-k probabilities (renormalised by default)."""
    return route_logits(logits, "softmax_topk", top_k, renormalize)


def topk_softmax(logits: torch.Tensor, top_k: int) -> Routing:
    """Top-k logits, then a softmax over those k (Mixtral's gate)."""
    return route_logits(logits, "topk_softmax", top_k)


def threshold_routing(logits: torch.Tensor, top_n: int, eps: Union[float, torch.Tensor], training: bool,
                      generator: Optional[torch.Generator] = None) -> Routing:
    """ST-MoE threshold routing over the top-n experts (see the module docstring)."""
    noise = None
    if training and (isinstance(eps, torch.Tensor) or eps > 0):
        noise = torch.rand((logits.shape[0], top_n), dtype=torch.float32, device=logits.device, generator=generator)
    return route_logits(logits, "threshold", top_n, eps=eps, noise=noise)


def check_task_ids(task_ids, num_tasks: int) -> None:
    """The checks of task ids that read no device value: an int in [0, num_tasks), or an
    integer tensor (its values are checked with the syncing checks, where its routing is built)."""
    if isinstance(task_ids, bool) or not isinstance(task_ids, (int, torch.Tensor)):
        raise TypeError(f"task ids must be an int or an integer tensor, got {type(task_ids).__name__}")
    if isinstance(task_ids, torch.Tensor) and (task_ids.is_floating_point() or task_ids.is_complex()
                                               or task_ids.dtype == torch.bool):
        raise TypeError(f"task ids must be integers, got a tensor of {task_ids.dtype}")
    if isinstance(task_ids, int) and not 0 <= task_ids < num_tasks:
        raise ValueError(f"task id must be in [0, {num_tasks}), got {task_ids}")


def task_routing(task_ids, gamma: torch.Tensor, lead_shape: tuple, shared_expert: Optional[int] = None) -> Routing:
    """k = 1 (k = 2 with a shared LoRA): expert = task id, weight = gamma[task].

    ``task_ids`` is an int, one id per example ([B], broadcast over the other leading dims of
    x) or one id per token (``lead_shape``); integers only. With ``shared_expert`` every token
    also uses that expert with weight 1 (the report's lora-shared).

    The ids and the one-hot matrix of a task-id tensor are built once and reused while the
    tensor is alive and unchanged (its version counter and its memory): the layers of a model
    route by the same task ids, so each batch pays for them once, not once per layer. Only the
    weights, which depend on the trainable gamma, are computed per call. Nothing is reused under
    torch.compile or CUDA-graph capture (the graph must record how the ids are made), nor for
    an inference tensor (made under torch.inference_mode), which has no version counter (its ids are
    a copy, which a training forward outside inference mode can save for backward); nothing
    made under a FakeTensorMode is kept (fake tensors hold no values, and the eager forwards after
    it would compute with them), nor anything made under a torch.func transform (wrappers of its
    level). The reused ids are a copy (a later in-place change of the tensor
    cannot reach a forward's ids saved for its backward). Writes that bypass the version counter
    are not seen: change the ids with torch's in-place ops (``copy_``, indexing) or pass a new
    tensor, not by writing through ``.data``, a numpy array sharing the tensor's memory or DLPack
    (``ids.data = new`` is seen).
    """
    num_tasks = gamma.shape[0]
    check_task_ids(task_ids, num_tasks)
    dtype = accumulator_dtype(gamma.dtype)
    # is_inference last: dynamo cannot trace it, and under torch.compile nothing is cached anyway
    tensor = isinstance(task_ids, torch.Tensor) and not _tracing_or_capturing()
    inference = tensor and task_ids.is_inference()
    cached = tensor and not inference
    key = (tuple(lead_shape), num_tasks, shared_expert, gamma.device, dtype)
    entry = _TASK_ROUTING.get(task_ids, {}).get(key) if cached else None
    if not cached:
        # an inference tensor's ids are a copy: a view of it (a 0-d or per-token tensor's) could not be saved for
        # backward by a training forward outside inference mode (the fused layer's op saves the ids)
        ids, one_hot = _task_ids_one_hot(task_ids, lead_shape, num_tasks, shared_expert, gamma.device, dtype,
                                         copy=inference)
    elif (entry is None or entry[0] != (task_ids._version, task_ids.data_ptr())
          or (not entry[1] and syncing_checks_enabled())):
        # Made outside inference mode (as single-expert routing's scalars): an entry made by a forward
        # under torch.inference_mode would hold inference tensors, which the training forwards after
        # it could not save for backward. The ids are a copy, never a view of task_ids: an in-place change
        # of task_ids before a backward would make autograd refuse the ids the forward saved (as views share
        # its version counter), and the entry would hold its own key alive.
        with torch.inference_mode(False):
            ids, one_hot = _task_ids_one_hot(task_ids, lead_shape, num_tasks, shared_expert, gamma.device, dtype,
                                             copy=True)
        # not fake tensors (a forward under a FakeTensorMode: they hold no values), nor those made under a torch.func
        # transform (grad, jacrev, hessian: wrappers of its level, which a later transform's levels refuse with an
        # internal assert); a plain entry made outside one serves them too
        if type(ids) is torch.Tensor and not torch._C._are_functorch_transforms_active():
            with _TASK_ROUTING_LOCK:
                if task_ids not in _TASK_ROUTING and len(_TASK_ROUTING) >= _TASK_ROUTING_TENSORS:
                    del _TASK_ROUTING[next(iter(_TASK_ROUTING.keys()))]  # the oldest
                entries = _TASK_ROUTING.setdefault(task_ids, {})
                if key not in entries and len(entries) >= _TASK_ROUTING_SHAPES:
                    del entries[next(iter(entries))]  # the oldest
                entries[key] = ((task_ids._version, task_ids.data_ptr()), syncing_checks_enabled(), ids, one_hot)
    else:
        ids, one_hot = entry[2:]
    # gamma[ids] as a one-hot product: its gradient is a GEMM (deterministic, unlike the
    # atomics of index_put), and out-of-range ids (validation off) get weight 0. In gamma's
    # accumulator dtype under torch.autocast too (its matmul would round the gates and gamma's
    # gradient to half precision), as a learned router's gates.
    with without_autocast(gamma):
        weights = one_hot @ gamma.to(dtype).unsqueeze(1)
    if shared_expert is not None:
        weights = nn.functional.pad(weights, (0, 1), value=1.0)
    return Routing(weights, ids)


# task_routing's reusable part per task-id tensor (by identity, while it is alive; the
# _TASK_ROUTING_TENSORS newest only, so that task ids kept for a whole dataset do not pile up),
# per key the _TASK_ROUTING_SHAPES newest only (ids held while the sequence length changes, as
# generate without a KV cache or an evaluation loop over batches of several lengths, would keep
# one entry per length): {key: ((version, data_ptr), checked by the syncing checks, ids, one_hot)}; the data
# pointer sees a tensor given other memory through ``.data = ...``, which leaves its version counter as it was.
_TASK_ROUTING = WeakIdKeyDictionary()
# Held while entries are added and evicted: forwards in several threads (nn.DataParallel's replicas, two models
# served at once) would otherwise evict one oldest entry twice (a KeyError). Reads take no lock.
_TASK_ROUTING_LOCK = threading.Lock()
_TASK_ROUTING_TENSORS = 4
_TASK_ROUTING_SHAPES = 4


def _task_ids_one_hot(task_ids, lead_shape: tuple, num_tasks: int, shared_expert: Optional[int], device, dtype,
                      copy: bool = False):
    """(ids [T, k], one-hot [T, num_tasks]) of task routing (k = 2 with the shared expert); with ``copy`` the
    ids share no memory with ``task_ids``."""
    task_ids = torch.as_tensor(task_ids)
    check_ids_in_range("task ids", task_ids, num_tasks)  # host ids (an int's) read without a device sync
    # host ids: no stream sync (a pageable copy is staged); one conversion, the copy included
    task_ids = task_ids.to(device, torch.long, non_blocking=True, copy=copy)
    if task_ids.dim() == 0:
        ids = task_ids.expand(lead_shape)
    elif tuple(task_ids.shape) == tuple(lead_shape):
        ids = task_ids
    elif len(lead_shape) >= 1 and task_ids.dim() == 1 and task_ids.shape[0] == lead_shape[0]:
        ids = task_ids.view((-1,) + (1,) * (len(lead_shape) - 1)).expand(lead_shape)
    else:
        # generate's beams / returned sequences run n rows per example (a multiple of the ids)
        repeated = (task_ids.dim() == 1 and len(lead_shape) >= 1 and task_ids.shape[0] > 0
                    and lead_shape[0] % task_ids.shape[0] == 0)
        # a padding-free packed row (DataCollatorWithFlattening's [1, total]) holds several examples in one row
        packed = not repeated and task_ids.dim() == 1 and len(lead_shape) >= 2 and lead_shape[0] == 1
        raise ValueError(
            f"task ids of shape {tuple(task_ids.shape)} fit neither one id per example "
            f"(first dim of {tuple(lead_shape)}) nor one per token"
            + ("; generate with num_beams or num_return_sequences > 1 runs several rows per example: pass "
               "the ids to MoELoRAModel.generate(..., task_ids=ids), which repeats them" if repeated else "")
            + ("; a packed row (several sequences in one row, as DataCollatorWithFlattening makes) takes one id "
               f"per token, shape {tuple(lead_shape)}" if packed else ""))
    ids = ids.reshape(-1, 1)
    one_hot = (ids == torch.arange(num_tasks, device=ids.device)).to(dtype)
    if shared_expert is not None:
        ids = nn.functional.pad(ids, (0, 1), value=shared_expert)
    return ids, one_hot
