"""Host time and kernels per call of moelora's hot paths with the Triton launches skipped
(moelora.profiling): what moelora's own Python costs around its kernels, measurable on any
machine, a CPU included, so that host-overhead work can go on without a GPU.

On a GPU machine the tensors live on the GPU (ATen ops are enqueued, not waited for); on a
CPU they are tiny CPU tensors. Either way Triton launches are skipped after moelora's Python
has prepared them (cached configuration, direct-launch check): add the C launcher's own cost per
Triton launch (the benchmark's host enqueue column has the full figure on a GPU).
Frozen nn.Linear and PEFT's LoRA layer are measured alongside for scale. Two rows time a
training step under torch.compile (fullgraph; inductor): the layer, whose compiled graph calls
the custom ops moe_lora_linear_fwd / _bwd, and the frozen Linear; of those only the Triton
launches are counted.

    python -m benchmarks.hostcost
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
from typing import Callable, List

import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora
from moelora.modules.ffn import MoEFFN
from moelora.kernels import launchers
from moelora.profiling import count_kernels, host_time

# GPU: S1 (the ATen ops are enqueued, not waited for); CPU: tiny, so that they cost their dispatch only.
GPU_SIZES, CPU_SIZES = (8192, 4096), (32, 64)
R, E, K = 16, 8, 2
LAYER_NOTE = "shared A, training, aux loss in the backward"
LAYER_CASES = {  # MoELoRALinear settings beside the defaults (num_experts E, top_k K, r R, shared A), and a note
    "softmax_topk": ({}, LAYER_NOTE),
    "topk_softmax": (dict(router="topk_softmax"), LAYER_NOTE),
    "threshold": (dict(router="threshold", top_k=3, threshold_eps=0.2), LAYER_NOTE),
    "task": (dict(router="task", task_shared_lora=True), "shared A, training, task routing with a shared LoRA"),
    "LoRA dropout 0.1": (dict(lora_dropout=0.1), LAYER_NOTE),
    "router jitter 0.1": (dict(router_jitter_noise=0.1), LAYER_NOTE),
    "E 128, grouped": (dict(num_experts=128), LAYER_NOTE + "; E*r 2048: the grouped regime"),
    "per-expert A": (dict(share_lora_a=False), "per-expert A, training, aux loss in the backward"),
    "MoSLD A-dropout 0.1": (dict(lora_a_dropout=0.1), LAYER_NOTE),
    "DoRA, E 1": (dict(num_experts=1, top_k=1, use_dora=True), "the fused op, then the magnitude (norm of W + s B A)"),
    "DoRA, E 1, LoRA dropout 0.1": (dict(num_experts=1, top_k=1, use_dora=True, lora_dropout=0.1),
                                    "the composed path: PEFT's second base GEMM over the dropped-out x"),
}


@contextlib.contextmanager
def _triton_backend(device: torch.device):
    """The Triton backend for ``device``: on a CPU through the interpreter switch (no kernel runs)."""
    previous = os.environ.get("TRITON_INTERPRET")
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        with moelora.use_backend("triton"), moelora.validation(False):
            yield
    finally:
        if device.type != "cuda":
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous


def _record(name: str, step: Callable[[], object], out: List[dict], note: str, compiled: bool = False) -> None:
    """Host time and kernels of ``step``; of a compiled step only its Triton launches are counted
    (the ATen counter, a TorchDispatchMode, would change what the compiled code runs)."""
    if compiled:
        with launchers.skip_launches():
            step()  # compiles
        with launchers.count_launches() as calls:
            step()
        triton_ops, aten_ops = [kernel for kernel, _ in calls], None
    else:
        with count_kernels():  # a first call fills what is cached per process (as tests/test_kernel_budget.py)
            step()
        with count_kernels() as counts:
            step()
        triton_ops, aten_ops = counts.triton, counts.aten
    seconds = host_time(step, iterations=30, warmup=5)
    triton, aten = len(triton_ops), None if aten_ops is None else len(aten_ops)
    out.append({"case": name, "host_us": seconds * 1e6, "kernels": None if aten is None else triton + aten,
                "triton": triton, "aten": aten, "note": note,
                # which kernels, in launch order: what a count alone leaves to guess (on a GPU, what to fuse)
                "triton_kernels": list(triton_ops), "aten_ops": None if aten_ops is None else list(aten_ops)})


def _inference_step(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """One forward of ``module`` on x under torch.inference_mode (evaluation, generation)."""
    def step():
        with torch.inference_mode():
            return module(x)

    return step


def _training_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, compiled: bool = False,
                   autocast: bool = False) -> Callable[[], object]:
    """One training step of ``module`` on x: forward (``compiled``: torch.compile, fullgraph;
    ``autocast``: under torch.autocast to bfloat16), then the gradients of x and the trainable
    parameters from dy and, when the module has a learned router, its aux loss (its gradient
    seed made once, outside the step, as dy and as tests/test_kernel_budget.py counts: the
    kernel counts are the module's, the same as that test's)."""
    params = [p for p in module.parameters() if p.requires_grad]
    seeds = {}  # aux-loss dtype -> its gradient seed

    def forward(inputs):
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=autocast):
            return module(inputs), getattr(module, "last_aux_loss", None)

    forward = torch.compile(forward, fullgraph=True) if compiled else forward

    def step():
        y, aux_loss = forward(x)
        outputs, grads = [y], [dy]
        if aux_loss is not None:
            outputs.append(aux_loss)
            if aux_loss.dtype not in seeds:
                seeds[aux_loss.dtype] = torch.ones((), device=x.device, dtype=aux_loss.dtype)
            grads.append(seeds[aux_loss.dtype])
        torch.autograd.grad(outputs, [x] + params, grads)

    return step


def _sizes(device: torch.device) -> tuple:
    """(dtype, T, d) of the measurements on ``device``."""
    return (torch.bfloat16, *GPU_SIZES) if device.type == "cuda" else (torch.float32, *CPU_SIZES)


def _layer(device: torch.device, dtype: torch.dtype, d: int, **settings) -> nn.Module:
    """A training MoELoRALinear on a frozen d x d Linear: ``settings`` beside the defaults (num_experts E,
    top_k K, r R, shared A)."""
    kwargs = {**dict(num_experts=E, top_k=K, r=R, share_lora_a=True), **settings}
    layer = moelora.MoELoRALinear(nn.Linear(d, d, device=device, dtype=dtype), **kwargs).train()
    layer.base_layer.requires_grad_(False)
    return layer


def measure(device: torch.device) -> List[dict]:
    """One record per case: host microseconds per call (median), kernels, Triton launches, ATen ops."""
    dtype, T, D = _sizes(device)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_(grad)

    out: List[dict] = []
    x, a, b = rand(T, D), rand(R, D), rand(E, D, R)
    ids = torch.rand(T, E, generator=gen).argsort(1)[:, :K].to(device)
    w = torch.rand(T, K, generator=gen).to(device).requires_grad_()
    dy = rand(T, D, grad=False)
    with _triton_backend(device):
        _record("moe_lora fwd", lambda: moelora.moe_lora(x, a, b, ids, w, scaling=2.0, regime="dense"), out,
                "dense regime, shared A")
        _record("moe_lora fwd+bwd", lambda: torch.autograd.grad(
            moelora.moe_lora(x, a, b, ids, w, scaling=2.0, regime="dense"), [x, a, b, w], dy), out,
            "dense regime, shared A")
        for case, (settings, note) in LAYER_CASES.items():
            layer = _layer(device, dtype, D, **settings)
            if case == "task":
                moelora.set_task_ids(nn.Sequential(layer), torch.arange(T, device=device) % E)
            _record(f"MoELoRALinear fwd+bwd ({case})", _training_step(layer, x, dy), out, note)
        # mixed precision as the HF Trainer's bf16=True runs it: fp32 weights, torch.autocast
        x32, dy32 = x.detach().float().requires_grad_(), dy.float()
        _record("MoELoRALinear fwd+bwd (softmax_topk), autocast", _training_step(_layer(device, torch.float32, D), x32,
                                                                                 dy32, autocast=True), out,
                LAYER_NOTE + "; fp32 weights, torch.autocast(bfloat16): casts of x, W and b")
        # padding left out of the aux loss (about 10% of the tokens): the masked loss's kernels in place of the unmasked
        masked = _layer(device, dtype, D)
        moelora.set_aux_loss_mask(masked, torch.arange(T, device=device) % 10 != 9)
        _record("MoELoRALinear fwd+bwd (softmax_topk), aux-loss mask", _training_step(masked, x, dy), out,
                LAYER_NOTE + "; moelora.set_aux_loss_mask: the masked aux loss's two kernels")
        _record("MoELoRALinear fwd, inference (softmax_topk)", _inference_step(_layer(device, dtype, D).eval(), x), out,
                "eval under torch.inference_mode (generation): the op's forward without autograd.Function.apply")
        linears = [nn.Linear(D, D, device=device, dtype=dtype) for _ in range(3)]
        block = MoEFFN(linears[0], linears[1], F.silu, E, K, gate_proj=linears[2], router="softmax_topk").train()
        _record("MoEFFN fwd+bwd (SwiGLU, softmax_topk)", _training_step(block, x, dy), out,
                "upcycled MoE FFN block (d_ff = d), aux loss in the backward")
    linear = nn.Linear(D, D, device=device, dtype=dtype).requires_grad_(False)
    _record("frozen nn.Linear fwd+bwd", lambda: torch.autograd.grad(linear(x), [x], dy), out, "for scale")
    _record("frozen nn.Linear fwd, inference", _inference_step(linear, x), out, "for scale (torch.inference_mode)")
    linear32 = nn.Linear(D, D, device=device).requires_grad_(False)
    _record("frozen nn.Linear fwd+bwd, autocast", _training_step(linear32, x32, dy32, autocast=True), out,
            "for scale (fp32 weights, torch.autocast(bfloat16))")
    if importlib.util.find_spec("peft") is not None:
        from peft import LoraConfig, get_peft_model

        class Wrapped(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(D, D, device=device, dtype=dtype)

            def forward(self, inputs):
                return self.proj(inputs)

        peft = get_peft_model(Wrapped(), LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"]))
        trainable = [p for p in peft.parameters() if p.requires_grad]
        _record("PEFT LoRA fwd+bwd", lambda: torch.autograd.grad(peft(x), [x] + trainable, dy), out,
                "for scale (PEFT's own ops, all run)")
        _record("PEFT LoRA fwd, inference", _inference_step(peft.eval(), x), out,
                "for scale (torch.inference_mode; PEFT's own ops, all run)")
    return out


def measure_compiled(device: torch.device) -> List[dict]:
    """The same records for a training step under torch.compile (fullgraph; inductor) of the
    layer, whose compiled graph calls the custom ops moe_lora_linear_fwd / _bwd, and of the
    frozen Linear; of those steps only the Triton launches are counted."""
    dtype, T, D = _sizes(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(T, D, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(T, D, generator=gen).to(device, dtype)
    out: List[dict] = []
    with _triton_backend(device):
        layer = _layer(device, dtype, D)
        _record("MoELoRALinear fwd+bwd (softmax_topk), torch.compile", _training_step(layer, x, dy, compiled=True),
                out, LAYER_NOTE + "; fullgraph", compiled=True)
    linear = nn.Linear(D, D, device=device, dtype=dtype).requires_grad_(False)
    _record("frozen nn.Linear fwd+bwd, torch.compile", _training_step(linear, x, dy, compiled=True), out,
            "for scale (fullgraph)", compiled=True)
    return out


def table(records: List[dict]) -> str:
    lines = [f"{'case':52s} {'host us':>9s} {'kernels':>8s} {'Triton':>7s} {'ATen':>5s}  note"]
    for r in records:
        kernels, aten = (str(r[key]) if r[key] is not None else "-" for key in ("kernels", "aten"))
        lines.append(f"{r['case']:52s} {r['host_us']:9.1f} {kernels:>8s} {r['triton']:7d} {aten:>5s}  {r['note']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m benchmarks.hostcost", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    _, T, D = _sizes(device)
    print(f"host time per call with Triton launches skipped, on {device} (T={T}, d={D}, r={R}, E={E}, k={K})")
    print(table(measure(device) + measure_compiled(device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
