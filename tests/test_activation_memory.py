"""Activation memory: what one training forward saves for backward, per layer feature, measured with
torch.autograd.graph.saved_tensors_hooks (one entry per storage; inputs and parameters cost nothing).

The fused MoELoRALinear (README, "The layer's fused path") saves x (its own storage, no copy), h [T, R]
(R = r for a shared A, E*r for per-expert A; fp32), the routing (logits [T, E] fp32, ids, weights, counts)
and the documented extras: LoRA dropout's bool keep mask (x's shape, 1 byte per element), router jitter's
fp32 factors (x's shape), MoSLD's A (.) M and its bool mask (A's shape), the aux-loss mask ([T] bool),
task routing's one-hot [T, E]; nothing T x d_out, nothing T*k x d, no copy of x in any dtype. DoRA adds
its magnitude's input y [T, d_out] (the magnitude's gradient is sum_t dy * y, as PEFT's). The composed
paths (custom base layers, convolutions, embeddings) read the LoRA branch from one copy of x in the
adapters' dtype (fp32 over a half-precision base, as PEFT), shared with a convolution's router.
Small shapes: on a CPU the Triton kernels run under the interpreter; only forwards run.
"""

import math

import pytest
import torch
import torch.nn as nn

import moelora
from conftest import DEVICE
from moelora import MoELoRAConv, MoELoRAEmbedding, MoELoRALinear
from moelora.modules.ffn import MoEFFN
from moelora.ops.moe_lora import choose_regime, grouped_row_count

T, D_IN, D_OUT, R = 20, 40, 56, 4

FEATURES = {
    "softmax_topk": dict(num_experts=4, top_k=2),
    "softmax_topk_shared_a": dict(num_experts=4, top_k=2, share_lora_a=True),
    "topk_softmax": dict(num_experts=4, top_k=2, router="topk_softmax"),
    "threshold": dict(num_experts=4, top_k=3, router="threshold", threshold_eps=0.3),
    "threshold_ramp": dict(num_experts=4, top_k=3, router="threshold", threshold_eps=0.3, threshold_ramp_steps=4),
    "rslora_no_bias": dict(num_experts=4, top_k=2, use_rslora=True, bias=False),
    "mosld_a_dropout": dict(num_experts=4, top_k=2, share_lora_a=True, lora_a_dropout=0.2),
    "lora_dropout": dict(num_experts=4, top_k=2, lora_dropout=0.3),
    "jitter": dict(num_experts=4, top_k=2, router_jitter_noise=0.2),
    "aux_mask": dict(num_experts=4, top_k=2),
    "aux_mask_threshold": dict(num_experts=4, top_k=3, router="threshold", threshold_eps=0.3),
    "task": dict(num_experts=3, router="task"),
    "task_shared_lora": dict(num_experts=3, router="task", task_shared_lora=True),
    "single": dict(num_experts=1),
    "gpt2_conv1d": dict(num_experts=4, top_k=2),
    "grouped_shared_a": dict(num_experts=72, top_k=2, r=16, share_lora_a=True),
    "grouped_per_expert_a": dict(num_experts=72, top_k=2, r=16),
}


def saved_activations(run, free):
    """(run()'s output, the tensors it saved for backward: one per storage, leaving out the storages
    of ``free``, the inputs and parameters, which saving keeps alive at no cost), and whether each of
    ``free``'s first tensor (x) was saved itself."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = run()
    skip = {t.untyped_storage().data_ptr() for t in free}
    kept = {}
    for t in saved:
        if t.numel():
            kept.setdefault(t.untyped_storage().data_ptr(), t)
    x_ptr = free[0].untyped_storage().data_ptr()
    return out, [t for ptr, t in kept.items() if ptr not in skip], x_ptr in kept


def nbytes(tensors) -> int:
    """The memory the tensors keep alive (their storages)."""
    return sum(t.untyped_storage().nbytes() for t in tensors)


def _linear_layer(name, dtype):
    settings = dict(FEATURES[name])
    torch.manual_seed(0)
    bias = settings.pop("bias", True)
    if name == "gpt2_conv1d":
        from transformers.pytorch_utils import Conv1D
        base = Conv1D(D_OUT, D_IN)
    else:
        base = nn.Linear(D_IN, D_OUT, bias=bias)
    layer = MoELoRALinear(base.to(DEVICE, dtype).requires_grad_(False), r=settings.pop("r", R), **settings).train()
    if layer.router_mode == "task":
        moelora.set_task_ids(layer, torch.randint(0, layer.num_experts, (T,), device=DEVICE))
    if name.startswith("aux_mask"):
        moelora.set_aux_loss_mask(layer, torch.arange(T, device=DEVICE) % 3 != 0)
    return layer


def _free(layer, x):
    return [x, *layer.parameters(), *layer.buffers()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(FEATURES))
def test_fused_linear_saves_x_h_and_the_routing_only(name, dtype):
    """The fused op on the Triton kernels, per feature: x itself (no copy, in no dtype), h [T, R]
    (R = r, E*r for a dense per-expert A, the padded rows for a grouped per-expert A) and the routing;
    every other saved tensor is one of the feature's documented extras, and the bytes add up to no
    more than their sum: nothing T x d_out or T*k x d, no fp32 copy of a half-precision x."""
    layer = _linear_layer(name, dtype)
    E, k, r, num_lora = layer.num_experts, layer.top_k, layer.r, layer.num_lora
    x = torch.randn(T, D_IN, device=DEVICE, dtype=dtype, requires_grad=True)
    with moelora.use_backend("triton"):
        _, acts, x_saved = saved_activations(lambda: layer(x), _free(layer, x))
    grouped = choose_regime(num_lora, r) == "grouped"
    assert grouped == name.startswith("grouped")
    assert x_saved
    # what the documentation lists, in bytes (the accumulator dtype of the fused path is fp32)
    if grouped and not layer.share_lora_a:  # h: the rows x[t] A_e^T of the padded row space
        rows = grouped_row_count(D_IN, layer.lora_A, layer.lora_B, T * k)
        budget = rows * r * 4
    else:
        rows = None
        budget = T * (r if layer.share_lora_a else num_lora * r) * 4
    budget += T * (k + layer.task_shared_lora) * (8 + 4)  # ids (int64 at most) and weights; the shared LoRA's slot
    if layer.router is not None:
        budget += T * E * 4 + E * 8  # logits, counts
    if layer.router_mode == "task":
        budget += T * E * 4  # the one-hot of gamma[ids], for gamma's gradient
    if grouped:  # the pair layout: O(padded rows + E) ints
        padded = grouped_row_count(D_IN, layer.lora_A, layer.lora_B, T * k)
        budget += (padded + T * k + 4 * (E + 1)) * 8
    extras = {"lora_dropout": T * D_IN, "jitter": T * D_IN * 4, "aux_mask": T, "aux_mask_threshold": T,
              "mosld_a_dropout": layer.lora_A.numel() * (1 + 4)}
    budget += extras.get(name, 0)
    assert nbytes(acts) <= budget, [(tuple(t.shape), t.dtype) for t in acts]
    for t in acts:
        wide = t.dim() >= 2 and t.shape[-1] in (D_IN, D_OUT) and math.prod(t.shape[:-1]) in (T, T * k)
        documented_x_shaped = (t.shape == x.shape and (t.dtype == torch.bool and name == "lora_dropout"
                                                       or t.dtype == torch.float32 and name == "jitter"))
        assert not wide or documented_x_shaped, (tuple(t.shape), t.dtype)
        assert t.numel() != T * k * D_IN or documented_x_shaped
        assert t.numel() not in (T * D_OUT, T * k * D_OUT), (tuple(t.shape), t.dtype)
        if rows is not None and t.is_floating_point() and t.dim() == 2 and t.shape[0] == rows:
            assert t.shape[1] == r


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_dora_saves_the_magnitudes_input_and_nothing_else_of_t_by_d_out(dtype):
    """DoRA (E = 1) runs the fused op, then m / ||W + s B A|| (.) y + b: it saves the fused op's
    tensors, y [T, d_out] once (the magnitude's gradient is sum_t dy * y / ||.||, as PEFT's) and
    [d_out] vectors; no fp32 copy of y or x."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(D_IN, D_OUT).to(DEVICE, dtype).requires_grad_(False), num_experts=1, r=R,
                          use_dora=True).train()
    x = torch.randn(T, D_IN, device=DEVICE, dtype=dtype, requires_grad=True)
    with moelora.use_backend("triton"):
        _, acts, x_saved = saved_activations(lambda: layer(x), _free(layer, x))
    assert x_saved
    wide = [t for t in acts if t.numel() >= T * D_OUT]
    assert len(wide) == 1 and wide[0].shape == (T, D_OUT) and wide[0].dtype == dtype
    assert nbytes(acts) <= T * D_OUT * x.element_size() + T * R * 4 + T * (8 + 4) + 2 * D_OUT * 4


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("pointwise", [False, True])
def test_conv_reads_one_copy_of_a_half_precision_x(pointwise, backend):
    """MoELoRAConv over a bf16 base (fp32 adapters): the router (its logits a convolution in fp32) and
    the LoRA branch read the same fp32 copy of x, saved once (two were made and saved: the router's
    x.to(fp32) and the LoRA branch's); the pointwise case's [N*H*W, C_in] rows are that copy's
    channels-last layout, a second tensor of x's size. Nothing [N, C_out, H, W] in floating point is saved."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, 1 if pointwise else 3, padding=0 if pointwise else 1)
    layer = MoELoRAConv(conv.to(DEVICE, torch.bfloat16).requires_grad_(False), num_experts=4, top_k=2, r=R).train()
    x = torch.randn(2, 5, 3, 4, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    with moelora.use_backend(backend):
        y, acts, _ = saved_activations(lambda: layer(x), _free(layer, x))
    copies = [t for t in acts if t.is_floating_point() and t.numel() == x.numel()]
    assert len(copies) == (2 if pointwise else 1) and all(t.dtype == torch.float32 for t in copies)
    assert not any(t.numel() == y.numel() for t in acts if t.is_floating_point())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["3x3", "1x1", "grouped_3d"])
def test_conv_over_an_fp32_base_saves_x_itself(kind, backend):
    """MoELoRAConv over an fp32 base (the adapters' dtype): the router and the LoRA branch read x itself, saved
    with no copy; only the pointwise case's [N*H*W, C_in] rows (x's channels-last layout, which the op reads) are
    a tensor of x's size. Nothing [N, C_out, *spatial] in floating point is saved."""
    torch.manual_seed(0)
    conv, x_shape = {"3x3": (nn.Conv2d(5, 6, 3, padding=1), (2, 5, 3, 4)), "1x1": (nn.Conv2d(5, 6, 1), (2, 5, 3, 4)),
                     "grouped_3d": (nn.Conv3d(4, 6, (2, 3, 1), stride=(1, 2, 1), padding=1, groups=2),
                                    (2, 4, 3, 5, 2))}[kind]
    layer = MoELoRAConv(conv.to(DEVICE).requires_grad_(False), num_experts=4, top_k=2, r=R).train()
    x = torch.randn(x_shape, device=DEVICE, requires_grad=True)
    with moelora.use_backend(backend):
        y, acts, x_saved = saved_activations(lambda: layer(x), _free(layer, x))
    assert x_saved
    copies = [t for t in acts if t.is_floating_point() and t.numel() == x.numel()]
    assert len(copies) == (1 if kind == "1x1" else 0), [(tuple(t.shape), t.dtype) for t in acts]
    assert not any(t.numel() == y.numel() for t in acts if t.is_floating_point())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_composed_linear_path_saves_one_copy_of_x_in_the_adapters_dtype(dtype):
    """A hooked base layer takes the composed path (base layer, Router module, moelora.moe_lora): the
    router's kernel reads x in its own dtype (x saved, no copy), the LoRA branch one copy of x in the
    adapters' dtype (fp32 over a bf16 base, as PEFT; x itself over an fp32 base); nothing T x d_out."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).to(DEVICE, dtype).requires_grad_(False)
    base.register_forward_hook(lambda *args: None)
    layer = MoELoRALinear(base, num_experts=4, top_k=2, r=R).train()
    x = torch.randn(T, D_IN, device=DEVICE, dtype=dtype, requires_grad=True)
    with moelora.use_backend("triton"):
        _, acts, x_saved = saved_activations(lambda: layer(x), _free(layer, x))
    assert x_saved
    copies = [t for t in acts if t.is_floating_point() and t.numel() == x.numel()]
    assert len(copies) == (1 if dtype == torch.bfloat16 else 0) and all(t.dtype == torch.float32 for t in copies)
    assert not any(t.numel() >= T * D_OUT for t in acts)


EMBEDDING_FEATURES = {name: FEATURES[name] for name in ("softmax_topk", "softmax_topk_shared_a", "task", "single")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(EMBEDDING_FEATURES))
def test_embedding_saves_its_routers_input_and_the_projected_rows(name, dtype):
    """MoELoRAEmbedding on the Triton kernels: a learned router reads the frozen vectors (the base output
    [T, d] in the base's dtype, saved for dW_router; no fp32 copy of a bf16 one), the LoRA branch saves the
    looked-up rows of A [T, R] and the op's h [T, R] (R = r shared, E*r per-expert A; fp32) and the routing.
    Without a router (task routing, one expert) nothing [T, d] is saved. Measured at T = 20, d = 56, E = 4,
    r = 4: 5552 bytes (bf16 base, per-expert A), 7792 (fp32), 2400 (task routing), 648 (one expert)."""
    settings = EMBEDDING_FEATURES[name]
    torch.manual_seed(0)
    layer = MoELoRAEmbedding(nn.Embedding(50, D_OUT).to(DEVICE, dtype).requires_grad_(False), r=R,
                             **settings).train()
    if layer.router_mode == "task":
        moelora.set_task_ids(layer, torch.randint(0, layer.num_experts, (T,), device=DEVICE))
    E, k = layer.num_experts, layer.top_k
    rank = R if layer.share_lora_a else layer.num_lora * R
    ids = torch.randint(0, 50, (T,), device=DEVICE)
    with moelora.use_backend("triton"):
        _, acts, _ = saved_activations(lambda: layer(ids), _free(layer, ids))
    wide = [t for t in acts if t.numel() >= T * D_OUT]
    budget = 2 * T * rank * 4 + T * (k + layer.task_shared_lora) * (8 + 4)  # the two [T, R]; ids and weights
    if layer.router is not None:
        assert len(wide) == 1 and wide[0].shape == (T, D_OUT) and wide[0].dtype == dtype
        budget += T * D_OUT * wide[0].element_size() + T * E * 4 + E * 8 + T * 4  # router input, logits, counts, lse
    else:
        assert not wide
    if layer.router_mode == "task":
        budget += T * E * 4  # the one-hot of gamma[ids], for gamma's gradient
    assert nbytes(acts) <= budget, [(tuple(t.shape), t.dtype) for t in acts]


@pytest.mark.parametrize("gated", [False, True])
def test_moe_ffn_saves_the_projections_rows_not_copies_of_x(gated):
    """MoEFFN on the Triton kernels: x (itself), the routing, the pair layout and the rows of the
    projections (first projection(s), activation, second projection: its gate-weight gradient is
    <dy, z>) in the padded row space; no copy of x (the triton engine reads x by token)."""
    torch.manual_seed(0)
    d_ff = 48
    proj = lambda i, o: nn.Linear(i, o).to(DEVICE, torch.bfloat16)  # noqa: E731
    ffn = MoEFFN(proj(D_IN, d_ff), proj(d_ff, D_IN), nn.functional.silu, 4, 2,
                 gate_proj=proj(D_IN, d_ff) if gated else None).train()
    x = torch.randn(T, D_IN, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    with moelora.use_backend("triton"):
        _, acts, x_saved = saved_activations(lambda: ffn(x), _free(ffn, x))
    assert x_saved
    assert not any(t.is_floating_point() and t.shape == x.shape for t in acts)
    rows = [t for t in acts if t.dim() == 2 and t.shape[1] in (d_ff, D_IN) and t.dtype == torch.bfloat16]
    assert sorted(t.shape[1] for t in rows) == [D_IN] + [d_ff] * (3 if gated else 2)
    assert len({t.shape[0] for t in rows}) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dora_with_lora_dropout_saves_one_t_by_d_out_tensor(backend):
    """DoRA with LoRA dropout in training (the composed path: PEFT's m (.) (W x_d + s B A x_d) over the
    dropped-out x_d, plus the base output minus W x_d): one [T, d_out] tensor saved, the sum the
    magnitude's gradient reads (two were: W x_d and the LoRA output, each saved by its product with m)."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(D_IN, D_OUT).to(DEVICE).requires_grad_(False), num_experts=1, r=R,
                          use_dora=True, lora_dropout=0.3).train()
    x = torch.randn(T, D_IN, device=DEVICE, requires_grad=True)
    with moelora.use_backend(backend):
        y, acts, _ = saved_activations(lambda: layer(x), _free(layer, x))
    assert len([t for t in acts if t.is_floating_point() and t.numel() == y.numel()]) == 1
