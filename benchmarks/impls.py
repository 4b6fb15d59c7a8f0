"""The implementations timed side by side, by group, each with an availability probe.

An implementation turns one input set into a ``Prepared``: a zero-argument forward and
the leaves that backward differentiates. ``probe`` returns None when it can run here or
the reason it is skipped (recorded in the JSON). Errors raised while running are caught
by the runner and recorded per case.

Groups: ``delta`` (MoE-LoRA delta alone), ``layer`` (base nn.Linear + delta, whole
layer), ``ffn`` (full-FFN MoE). The decode pass times the layer implementations named in
``DECODE`` in inference (``inference``: eval mode, forward under torch.inference_mode).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import moelora
from moelora.ops import reference

from . import baselines
from .shapes import Shape

# Names under which a moelora full-FFN MoE op would appear (issue 5: only if exposed).
MOELORA_FFN_NAMES = ("moe_ffn", "moe_mlp")
# Peers that might express the op (probed by module spec only: importing some of them patches torch).
PEERS = {"liger-kernel": "liger_kernel", "unsloth": "unsloth", "fms-acceleration-moe": "fms_acceleration_moe"}


@dataclass
class Prepared:
    forward: Callable[[], torch.Tensor]
    leaves: List[torch.Tensor]
    keep: list = field(default_factory=list)  # modules / tensors to keep alive
    # The reference of implementations whose leaves are not the set's tensors (MoELoRALinear, which routes
    # by itself; PEFT's layer; the fp32 copy of x of the "-autocast" cases): an fp32 twin, a Prepared whose
    # forward (run on moelora's PyTorch backend) computes what forward must, from fp32 copies of the
    # leaves, in the same order. None: the runner's reference from the set's tensors and routing.
    reference: Optional[Callable[[], "Prepared"]] = None
    # For implementations whose forward draws random numbers (LoRA dropout): runs forward and an
    # fp32 reference of that same draw, and returns their relative error (instead of reference).
    check: Optional[Callable[[], float]] = None
    # The loss the last forward recorded beside y (a learned router's aux loss, as MoELoRALinear's
    # last_aux_loss), or None: the backward passes differentiate it with y, as a training step does.
    aux_loss: Optional[Callable[[], Optional[torch.Tensor]]] = None


@dataclass
class Impl:
    name: str
    group: str  # "delta", "layer" or "ffn"
    prepare: Callable[[Shape, Dict[str, torch.Tensor]], Prepared]
    probe: Callable[[Shape, torch.device], Optional[str]] = lambda shape, device: None
    moelora: bool = False  # one of moelora's own implementations (not a baseline)
    description: str = ""


# ---- probes ---------------------------------------------------------------------------

def _needs_cuda(shape, device):
    return None if device.type == "cuda" else "moelora's Triton backend is timed on CUDA only"


def _needs_grouped_mm(shape, device):
    return None if baselines.grouped_mm_fn() is not None else \
        "this torch has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"


def _needs_peft(shape, device):
    if importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    return None


def _moelora_ffn_op():
    for name in MOELORA_FFN_NAMES:
        if hasattr(moelora, name):
            return getattr(moelora, name)
    return None


def _needs_moelora_ffn(shape, device):
    if _moelora_ffn_op() is not None:
        return None
    parts = [n for n in ("route", "dispatch", "combine") if hasattr(moelora, n)]
    extra = f"; it has {', '.join(parts)}, which benchmarks/ does not compose into an FFN" if parts else ""
    return f"moelora exposes no FFN op (looked for {', '.join(MOELORA_FFN_NAMES)}){extra}"


def _needs_moelora_layer(shape, device):
    return None if hasattr(moelora, "MoELoRALinear") else "moelora.MoELoRALinear is not in this tree"


def _peer_probe(module: str):
    def probe(shape, device):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        return (f"{module} is installed but benchmarks/ has no adapter expressing this op with it "
                "(none of its public ops computes a MoE-LoRA delta)")
    return probe


# ---- delta ----------------------------------------------------------------------------

def _delta_leaves(s):
    return [s["x"], s["a"], s["b"], s["w"]]


def _moelora(backend: str, regime: str = "auto"):
    def prepare(shape, s):
        def fwd():
            return moelora.moe_lora(s["x"], s["a"], s["b"], s["ids"], s["w"], scaling=shape.scaling,
                                    backend=backend, regime=regime)
        return Prepared(fwd, _delta_leaves(s))
    return prepare


def _naive(shape, s):
    return Prepared(lambda: reference.moe_lora_naive(s["x"], s["a"], s["b"], s["ids"], s["w"],
                                                     scaling=shape.scaling), _delta_leaves(s))


def _dense(shape, s):
    return Prepared(lambda: baselines.moe_lora_dense(s["x"], s["a"], s["b"], s["ids"], s["w"],
                                                     shape.scaling), _delta_leaves(s))


def _grouped(shape, s):
    return Prepared(lambda: baselines.moe_lora_grouped_mm(s["x"], s["a"], s["b"], s["ids"], s["w"],
                                                          shape.scaling), _delta_leaves(s))


# ---- whole layer ----------------------------------------------------------------------

HALF_DTYPES = (torch.float16, torch.bfloat16)  # the sets' dtypes autocast runs the "-autocast" cases in


def _linear(shape, s):
    return Prepared(lambda: F.linear(s["x"], s["w0"]), [s["x"]])


def _linear_autocast(shape, s):
    """The frozen nn.Linear in mixed precision as the HF Trainer's bf16=True runs it: an fp32
    weight and fp32 x under torch.autocast to the set's dtype (the casts of x and W0 included;
    an fp32 set, the CPU's, runs without autocast)."""
    x, w0 = s["x"].detach().float().requires_grad_(), s["w0"].float()
    amp = s["x"].dtype

    def fwd():
        with torch.autocast(x.device.type, dtype=amp, enabled=amp in HALF_DTYPES):
            return F.linear(x, w0)

    def reference():
        x32 = x.detach().clone().requires_grad_()
        return Prepared(lambda: F.linear(x32, w0), [x32])
    return Prepared(fwd, [x], reference=reference)


def _moelora_layer(shape, s):
    def fwd():
        base = F.linear(s["x"], s["w0"])
        return moelora.moe_lora(s["x"], s["a"], s["b"], s["ids"], s["w"], scaling=shape.scaling,
                                base_out=base, backend="triton", regime="auto")
    return Prepared(fwd, _delta_leaves(s))


def _dense_layer(shape, s):
    def fwd():
        base = F.linear(s["x"], s["w0"])
        return baselines.moe_lora_dense(s["x"], s["a"], s["b"], s["ids"], s["w"], shape.scaling, base_out=base)
    return Prepared(fwd, _delta_leaves(s))


class _Wrapped(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


# LoRA dropout of the "-dropout" layer cases (PEFT's and MoELoRALinear's)
LAYER_DROPOUT = 0.1


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32 (out reshaped to ref's shape); NaN where out is not finite."""
    out = out.detach().float().reshape(ref.shape)
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref.detach().float()).norm() / ref.detach().float().norm().clamp_min(1e-30))


def _peft_layer(dropout: float):
    """PEFT's single-adapter LoRA (get_peft_model on nn.Linear) at the same r, same dtype, with
    LoRA dropout ``dropout`` (in training mode; checked against the fp32 formula on the input
    its dropout module returned)."""
    def prepare(shape, s):
        from peft import LoraConfig, get_peft_model

        w0 = s["w0"]
        linear = torch.nn.Linear(shape.d_in, shape.d_out, bias=False, device=w0.device, dtype=w0.dtype)
        with torch.no_grad():
            linear.weight.copy_(w0)
        config = LoraConfig(r=shape.rank, lora_alpha=int(shape.scaling * shape.rank), lora_dropout=dropout,
                            target_modules=["proj"])
        model = get_peft_model(_Wrapped(linear), config).to(w0.dtype).train()
        lora_params = [p for n, p in model.named_parameters() if p.requires_grad]
        a, b = (s["a"] if s["a"].dim() == 2 else s["a"][0]), s["b"][0]
        with torch.no_grad():  # PEFT starts B at zero; use the set's random weights instead
            for n, p in model.named_parameters():
                if "lora_A" in n:
                    p.copy_(a)
                elif "lora_B" in n:
                    p.copy_(b)

        def reference():  # the fp32 formula, leaves in the order of PEFT's: x, lora_A, lora_B
            x32, a32, b32 = (t.detach().float().requires_grad_() for t in (s["x"], a, b))
            return Prepared(lambda: F.linear(x32, w0.float()) + shape.scaling * (x32 @ a32.t()) @ b32.t(),
                            [x32, a32, b32])

        if not dropout:
            return Prepared(lambda: model(s["x"]), [s["x"]] + lora_params, keep=[model], reference=reference)

        def check():
            dropout_module = next(m for n, m in model.named_modules() if n.endswith("lora_dropout.default"))
            seen = []
            handle = dropout_module.register_forward_hook(lambda module, args, out: seen.append(out))
            try:
                with torch.no_grad():
                    y = model(s["x"])
            finally:
                handle.remove()
            x_lora = seen[0].float()
            ref = F.linear(s["x"].float(), w0.float()) + shape.scaling * (x_lora @ a.float().t()) @ b.float().t()
            return rel_err(y, ref)

        return Prepared(lambda: model(s["x"]), [s["x"]] + lora_params, keep=[model], check=check)
    return prepare


LAYER_ROUTERS = {
    "softmax_topk": {},
    "topk_softmax": dict(router="topk_softmax"),
    "threshold": dict(router="threshold", threshold_eps=0.2),
    "task": dict(router="task"),
}


def _moelora_linear_layer(router: str, dropout: float = 0.0, autocast: bool = False, aux_mask: bool = False):
    """moelora.MoELoRALinear as a user builds it: the frozen base nn.Linear (the set's W0), its
    constructor's defaults (fp32 adapters over a half-precision base, as PEFT) with the shape's
    E, k, r, alpha and A layout, random adapters, ``router``'s mode and LoRA dropout
    ``dropout``; task routing gets one task per sequence of ``shape.sequence_len`` tokens (512; 1 in
    decode, where every token is a sequence of its own) and random per-task gates ``lora_gamma`` in
    [0.5, 1.5) (the layer starts them at 0). With dropout the check runs
    the layer and its fp32 copy (torch backend) from one generator state: the same keep mask.
    ``autocast``: mixed precision as the HF Trainer's bf16=True runs it (an fp32 base and fp32 x
    under torch.autocast to the set's dtype; an fp32 set, the CPU's, runs without autocast).
    ``aux_mask``: the last 10% of every 512-token sequence is padding, left out of the aux loss
    (moelora.set_aux_loss_mask)."""
    def prepare(shape, s):
        w0 = s["w0"]
        x = s["x"] if not autocast else s["x"].detach().float().requires_grad_()
        amp = autocast and s["x"].dtype in HALF_DTYPES
        linear = torch.nn.Linear(shape.d_in, shape.d_out, bias=False, device=w0.device,
                                 dtype=torch.float32 if autocast else w0.dtype)
        with torch.no_grad():
            linear.weight.copy_(w0)
        linear.weight.requires_grad_(False)
        layer = moelora.MoELoRALinear(linear, num_experts=shape.experts, top_k=shape.top_k, r=shape.rank,
                                      lora_alpha=shape.scaling * shape.rank, share_lora_a=shape.shared_a,
                                      init_lora_weights=False, lora_dropout=dropout, **LAYER_ROUTERS[router])
        if router == "task":
            tasks = torch.arange(shape.tokens, device=w0.device) // shape.sequence_len % shape.experts
            moelora.set_task_ids(torch.nn.Sequential(layer), tasks)
            with torch.no_grad():  # the per-task gates start at 0 (the layer is its base): random, as the sets' gamma
                layer.lora_gamma.copy_(0.5 + torch.rand(shape.experts, device=w0.device))
        if aux_mask:
            moelora.set_aux_loss_mask(layer, torch.arange(shape.tokens, device=w0.device) % 512 < 461)
        layer.train()
        trainable = [p for p in layer.parameters() if p.requires_grad]

        def forward():  # the aux loss is computed (and recorded) in every training forward
            if not amp:  # no autocast context at all: entering even a disabled one costs the host microseconds
                return layer(x)
            with torch.autocast(x.device.type, dtype=s["x"].dtype):
                return layer(x)

        def reference():  # the layer in fp32 (its modules' current mode), without autocast
            ref = copy.deepcopy(layer).float()
            x32 = x.detach().float().requires_grad_()
            return Prepared(lambda: ref(x32), [x32] + [p for p in ref.parameters() if p.requires_grad], keep=[ref],
                            aux_loss=lambda: ref.last_aux_loss)

        def aux_loss():
            return layer.last_aux_loss

        if not dropout:
            return Prepared(forward, [x] + trainable, keep=[layer], reference=reference, aux_loss=aux_loss)

        def check():
            with torch.no_grad(), torch.random.fork_rng(devices=[w0.device] if w0.is_cuda else []):
                y = forward()  # the generator state is restored after it: reference() draws the same
            twin = reference()
            with torch.no_grad(), moelora.use_backend("torch"):
                return rel_err(y, twin.forward())

        return Prepared(forward, [x] + trainable, keep=[layer], check=check, aux_loss=aux_loss)
    return prepare


# ---- full-FFN MoE -----------------------------------------------------------------------

def _ffn_leaves(s):
    return [s["x"], s["w13"], s["w2"], s["w"]]


def _ffn_naive(shape, s):
    return Prepared(lambda: baselines.moe_ffn_naive(s["x"], s["w13"], s["w2"], s["ids"], s["w"]), _ffn_leaves(s))


def _ffn_grouped(shape, s):
    return Prepared(lambda: baselines.moe_ffn_grouped_mm(s["x"], s["w13"], s["w2"], s["ids"], s["w"]),
                    _ffn_leaves(s))


def _ffn_moelora(shape, s):
    """moelora.moe_ffn(x, ids, weights, w13, None, w2, None, F.silu, stacked_gate=True): SwiGLU with
    w13 = [gate; up] as one weight (one GEMM for both, as the grouped_mm baseline)."""
    op = _moelora_ffn_op()
    return Prepared(lambda: op(s["x"], s["ids"], s["w"], s["w13"], None, s["w2"], None, F.silu, stacked_gate=True),
                    _ffn_leaves(s))


def _peer_impls(group: str) -> List[Impl]:
    def never(shape, s):
        raise RuntimeError("no adapter")
    return [Impl(f"{peer}{'-ffn' if group == 'ffn' else ''}", group, never, _peer_probe(module),
                 description=f"peer package {peer} (probed)") for peer, module in PEERS.items()]


# Baselines first, moelora last within each group: a kernel that takes down the CUDA
# context then costs no baseline of its group (see the restart logic in cli.py).
DELTA = [
    Impl("naive", "delta", _naive, description="per-expert Python loop (moelora.ops.reference.moe_lora_naive)"),
    Impl("torch-dense", "delta", _dense, description="best plain PyTorch: x@A^T, gated expand, one GEMM K=E*r"),
    Impl("torch-grouped-mm", "delta", _grouped, _needs_grouped_mm,
         description="sorted tokens, torch grouped_mm per expert, index_add combine"),
] + _peer_impls("delta") + [
    Impl("moelora-torch", "delta", _moelora("torch"), moelora=True, description="moelora torch backend (einsum)"),
    Impl("moelora-triton", "delta", _moelora("triton", "auto"), _needs_cuda, True, "moelora Triton, regime auto"),
    Impl("moelora-triton-dense", "delta", _moelora("triton", "dense"), _needs_cuda, True,
         "moelora Triton, dense forced"),
    Impl("moelora-triton-grouped", "delta", _moelora("triton", "grouped"), _needs_cuda, True,
         "moelora Triton, grouped forced"),
]

LAYER = [
    Impl("linear-frozen", "layer", _linear, description="frozen nn.Linear alone (the floor we add to)"),
    Impl("torch-dense-layer", "layer", _dense_layer, description="frozen nn.Linear + best plain PyTorch (addmm)"),
    Impl("peft-lora", "layer", _peft_layer(0.0), _needs_peft, description="PEFT single-adapter LoRA layer, same r"),
    Impl("peft-lora-dropout", "layer", _peft_layer(LAYER_DROPOUT), _needs_peft,
         description=f"PEFT's LoRA layer with lora_dropout={LAYER_DROPOUT}"),
    Impl("moelora-layer", "layer", _moelora_layer, _needs_cuda, True,
         "frozen nn.Linear + moelora Triton (base_out = linear output)"),
] + [
    Impl("moelora-MoELoRALinear" + ("" if router == "softmax_topk" else f"-{router}"), "layer",
         _moelora_linear_layer(router), _needs_moelora_layer, True, f"moelora.MoELoRALinear, router={router}")
    for router in LAYER_ROUTERS
] + [
    Impl("moelora-MoELoRALinear-dropout", "layer", _moelora_linear_layer("softmax_topk", LAYER_DROPOUT),
         _needs_moelora_layer, True, f"moelora.MoELoRALinear, router=softmax_topk, lora_dropout={LAYER_DROPOUT}"),
    Impl("moelora-MoELoRALinear-auxmask", "layer", _moelora_linear_layer("softmax_topk", aux_mask=True),
         _needs_moelora_layer, True,
         "moelora.MoELoRALinear, router=softmax_topk, 10% padding left out of the aux loss"),
    Impl("linear-frozen-autocast", "layer", _linear_autocast,
         description="frozen nn.Linear, fp32 weight under torch.autocast (mixed precision, as HF Trainer bf16=True)"),
    Impl("moelora-MoELoRALinear-autocast", "layer", _moelora_linear_layer("softmax_topk", autocast=True),
         _needs_moelora_layer, True, "moelora.MoELoRALinear, router=softmax_topk, fp32 base under torch.autocast"),
]

FFN = [
    Impl("naive-ffn", "ffn", _ffn_naive, description="per-expert loop over SwiGLU experts"),
    Impl("torch-grouped-mm-ffn", "ffn", _ffn_grouped, _needs_grouped_mm,
         description="dispatch + torch grouped_mm + index_add combine"),
] + _peer_impls("ffn") + [
    Impl("moelora-ffn", "ffn", _ffn_moelora, _needs_moelora_ffn, True, "moelora full-FFN op"),
]

SWEEP = ["naive", "torch-dense", "torch-grouped-mm", "moelora-torch", "moelora-triton"]
# The layer implementations timed in the decode pass (``inference``): those with an inference form. The
# "-dropout" cases are the plain ones in eval mode, the "-auxmask" case has no aux loss there.
DECODE = ["linear-frozen", "torch-dense-layer", "peft-lora", "moelora-layer"] + [
    "moelora-MoELoRALinear" + ("" if router == "softmax_topk" else f"-{router}") for router in LAYER_ROUTERS]


def inference(prepared: Prepared) -> Prepared:
    """``prepared`` as generation runs it: its modules in eval mode (no LoRA dropout, no aux loss)
    and its forward under torch.inference_mode (moelora's ops then call their autograd Function's
    forward directly: moelora.ops.registration.apply_eager). The reference is unchanged (the same
    modules, now in eval mode); a self-checking forward (``check``) is not supported."""
    if prepared.check is not None:
        raise ValueError("the decode pass takes no forward that checks itself (LoRA dropout is off in eval mode)")
    for m in prepared.keep:
        if isinstance(m, torch.nn.Module):
            m.eval()
    forward = prepared.forward

    def infer():
        with torch.inference_mode():
            return forward()
    return dataclasses.replace(prepared, forward=infer)


def impls_for(group: str) -> List[Impl]:
    return {"delta": DELTA, "layer": LAYER, "ffn": FFN}[group]


def by_name(name: str) -> Impl:
    for impl in DELTA + LAYER + FFN:
        if impl.name == name:
            return impl
    raise KeyError(name)
