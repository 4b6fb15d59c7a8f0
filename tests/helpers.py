"""Helpers shared by the tests: random MoE-LoRA problems and the float64 reference they are
compared with, tiny transformers models built from configs (no downloads), and the
routing/dispatch execution paths with slow, obviously correct loop references."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny transformers models are built from configs

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moelora import switches  # noqa: E402
from moelora.ops import native  # noqa: E402
from moelora.ops.reference import moe_lora_torch  # noqa: E402


# Relative-error bounds ||out - ref|| / ||ref|| against the float64 reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass
class Problem:
    x: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    base_out: torch.Tensor | None
    scaling: float

    def leaves(self):
        """The differentiable inputs, in a fixed order."""
        out = [self.x, self.lora_a, self.lora_b, self.topk_weights]
        return out + ([self.base_out] if self.base_out is not None else [])

    def args(self):
        return (self.x, self.lora_a, self.lora_b, self.topk_ids, self.topk_weights)


def routing(T: int, E: int, k: int, *, device, id_dtype=torch.int64, experts: int | None = None,
            one_expert: bool = False, generator=None) -> torch.Tensor:
    """[T, k] distinct ids per token drawn from the first ``experts`` experts (all by default).

    ``one_expert`` sends slot 0 of every token to expert 0 (k = 1: all tokens on it).
    """
    pool = experts or E
    ids = torch.rand(T, pool, generator=generator).argsort(dim=1)[:, :k]
    if one_expert:
        ids = torch.rand(T, E, generator=generator).argsort(dim=1)
        ids = torch.cat([torch.zeros(T, 1, dtype=torch.long), ids[ids != 0].view(T, E - 1)], dim=1)[:, :k]
    return ids.to(device=device, dtype=id_dtype)


def make_problem(T, d_in, d_out, r, E, k, *, shared_a=True, dtype=torch.float32, device="cpu",
                 id_dtype=torch.int64, with_base=True, experts=None, one_expert=False,
                 scaling=0.7, seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    a_shape = (r, d_in) if shared_a else (E, r, d_in)
    return Problem(
        x=rand(T, d_in),
        lora_a=(torch.randn(*a_shape, generator=g) / d_in**0.5).to(device=device, dtype=dtype).requires_grad_(),
        lora_b=rand(E, d_out, r),
        topk_ids=routing(T, E, k, device=device, id_dtype=id_dtype, experts=experts, one_expert=one_expert,
                         generator=g),
        topk_weights=torch.rand(T, k, generator=g).to(device).requires_grad_(),
        base_out=rand(T, d_out) if with_base else None,
        scaling=scaling,
    )


def reference(p: Problem, grad_out: torch.Tensor):
    """(y, grads of p.leaves()) of the float64 torch reference."""
    leaves = [t.detach().double().requires_grad_() for t in p.leaves()]
    x, a, b, w = leaves[:4]
    base = leaves[4] if p.base_out is not None else None
    y = moe_lora_torch(x, a, b, p.topk_ids, w, scaling=p.scaling, base_out=base)
    grads = torch.autograd.grad(y, leaves, grad_out.double())
    return y, grads


def moe_ffn_reference(x, ids, weights, ffn, activation, normalize):
    """moelora.moe_ffn as a float64 per-token, per-slot loop (``ffn``: w_in, b_in, w_gate, b_gate, w_out, b_out,
    None where absent; w_gate None: no gate)."""
    p = {n: (t.double() if t is not None else None) for n, t in ffn.items()}
    x, w = x.double(), weights.double()
    out = []
    for t in range(x.shape[0]):
        kept = [j for j in range(ids.shape[1]) if w[t, j] != 0]
        total = sum(w[t, j] for j in kept) if normalize else 1.0
        acc = torch.zeros(p["w_out"].shape[1], dtype=torch.float64, device=x.device)
        for j in kept:
            e = int(ids[t, j])
            h = F.linear(x[t], p["w_in"][e], None if p["b_in"] is None else p["b_in"][e])
            if p["w_gate"] is None:
                h = activation(h)
            else:
                h = activation(F.linear(x[t], p["w_gate"][e], None if p["b_gate"] is None else p["b_gate"][e])) * h
            acc = acc + w[t, j] / total * F.linear(h, p["w_out"][e], None if p["b_out"] is None else p["b_out"][e])
        out.append(acc)
    return torch.stack(out)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double()
    ref = ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm()
    diff = (out - ref).norm()
    return float(diff) if denom == 0 else float(diff / denom)


@contextlib.contextmanager
def empty_filled_with_nan():
    """Within the block ``torch.empty`` returns floating-point tensors filled with NaN: memory that no
    kernel writes (uninitialised elsewhere, and maybe zero by chance on a CPU) poisons what reads it."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = poisoned
    try:
        yield
    finally:
        torch.empty = empty


@contextlib.contextmanager
def gpu_tile_table():
    """Within the block the launchers choose tiles and layout blocks from the GPU tile table, as outside
    the interpreter (whose blocks are 32 rows whatever the row class); the cached layout blocks are dropped
    on entry and exit."""
    from moelora.kernels import launchers

    previous, launchers._INTERPRETING = launchers._INTERPRETING, False
    launchers._layout_block.cache_clear()
    try:
        yield
    finally:
        launchers._INTERPRETING = previous
        launchers._layout_block.cache_clear()


@contextlib.contextmanager
def float_args_as_float32():
    """Within the block every Triton launch of moelora.kernels.launchers gets its Python float
    arguments as the float32 numbers a GPU launch passes (Triton's type for a float argument).
    The interpreter passes them on as Python floats, which a kernel then combines with float64
    tensors in float64: a float64 kernel's test would not see the precision a GPU loses there."""
    from moelora.kernels import launchers

    def launch(kernel, grid, configured, args):
        values = (*args, *configured.fixed)
        kernel[grid](*(float(torch.tensor(v, dtype=torch.float32)) if type(v) is float else v for v in values),
                     **configured.meta)

    previous, launchers._launch_hook = launchers._launch_hook, launch
    try:
        yield
    finally:
        launchers._launch_hook = previous


def tiny_bert(num_layers=4, classification=False):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg) if classification else BertModel(cfg)
    return model.eval()


def tiny_llama(num_layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def tiny_phi3(num_layers=2):
    """Phi-3 (Phi-4's architecture too): its MLP's gate_up_proj is the fused [2 d_ff, d] gate/up projection."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(cfg).eval()


def tiny_gpt2(num_layers=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=num_layers, n_head=2, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_t5(num_layers=2):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=num_layers, num_heads=2,
                   dropout_rate=0.0, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_vit(num_layers=2):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                    image_size=8, patch_size=4, num_channels=3, num_labels=3)
    return ViTForImageClassification(cfg).eval()


def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=8,
        max_target_positions=16, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config).eval()


def token_batch(batch=2, seq=5, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def randomize_adapters(model, seed=2, scale=0.5):
    """Give every lora_B / lora_gamma non-zero values so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_gamma" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


needs_c = pytest.mark.skipif(not native.HAS_C, reason="moelora._C not built (MOELORA_NO_EXT=1)")


needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and native.has_cuda_kernels()), reason="needs a GPU and moelora._C CUDA kernels")


# "native": moelora._C kernels; "fallback": the PyTorch fallbacks (forced).
PATHS = [pytest.param("native", marks=needs_c), "fallback"]


def made_real_with_garbage(module):
    """``module.to_empty(device="cpu")`` (meta-device init), its saved tensors (parameters,
    persistent buffers) then filled with what to_empty may leave: NaN, integer ones a large count,
    so that anything an initialisation misses shows."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for t in module.state_dict().values():
            t.fill_(float("nan") if t.is_floating_point() else 123456)
    return module


def reset_every_module(module, order="modules"):
    """reset_parameters() on every module that has it: parents first (``"modules"``: the torchtitan
    loop over ``module.modules()``) or children first (``"apply"``: ``module.apply``)."""
    visit = lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None  # noqa: E731
    if order == "apply":
        module.apply(visit)
    else:
        for m in module.modules():
            visit(m)
    return module


def run_path(path, fn, *args, **kwargs):
    with switches.force_fallback(path == "fallback"):
        return fn(*args, **kwargs)


def route_reference(logits, top_k, mode, renormalize):
    """Row by row in float64: NaN -> -inf, ids sorted by (-logit, index); a row with +inf
    logits takes the softmax's limit (equal probabilities on the +inf entries, lse +inf)."""
    T, E = logits.shape
    x = logits.double().tolist()
    weights, ids, lses = [], [], []
    probs_all = []
    for row in x:
        v = [float("-inf") if math.isnan(a) else a for a in row]
        m = max(v)
        if m == float("-inf"):
            p = [0.0] * E
            lse = float("-inf")
        elif m == float("inf"):
            n_inf = sum(a == m for a in v)
            p = [1.0 / n_inf if a == m else 0.0 for a in v]
            lse = m
        else:
            s = sum(math.exp(a - m) for a in v)
            p = [math.exp(a - m) / s for a in v]
            lse = m + math.log(s)
        order = sorted(range(E), key=lambda e: (-v[e], e))[:top_k]
        if mode == "softmax_topk":
            w = [p[e] for e in order]
        else:
            top = v[order[0]]
            if top == float("inf"):
                w = [1.0 if v[e] == top else 0.0 for e in order]
            else:
                w = [0.0 if top == float("-inf") else math.exp(v[e] - top) for e in order]
        if renormalize or mode == "topk_softmax":
            tot = sum(w)
            w = [a / tot if tot > 0 else 0.0 for a in w]
        weights.append(w)
        ids.append(order)
        lses.append(lse)
        probs_all.append(p)
    counts = [0] * E
    for row in ids:
        for e in row:
            counts[e] += 1
    prob_sums = [sum(p[e] for p in probs_all) for e in range(E)]
    as_t = lambda v, dt: torch.tensor(v, dtype=dt).reshape(-1) if len(v) == 0 else torch.tensor(v, dtype=dt)
    return (as_t(weights, torch.float64).reshape(T, top_k), as_t(ids, torch.int64).reshape(T, top_k),
            torch.tensor(counts, dtype=torch.int64), torch.tensor(prob_sums, dtype=torch.float64),
            as_t(lses, torch.float64).reshape(T))


def metadata_reference(topk_ids, num_experts, block_size):
    """Python-loop stable counting sort; returns a dict of the DispatchMetadata fields."""
    T, k = topk_ids.shape
    ids = topk_ids.reshape(-1).tolist()
    n = len(ids)
    counts = [sum(1 for e in ids if e == x) for x in range(num_experts)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    order = sorted((p for p in range(n) if 0 <= ids[p] < num_experts), key=lambda p: (ids[p], p))
    sorted_pairs = order + [-1] * (n - len(order))
    inverse = [-1] * n
    for pos, p in enumerate(order):
        inverse[p] = pos
    out = dict(counts=counts, offsets=offsets, sorted_pairs=sorted_pairs, inverse=inverse)
    if block_size is not None:
        po = [0]
        for c in counts:
            po.append(po[-1] + (c + block_size - 1) // block_size * block_size)
        max_padded = (n + num_experts * (block_size - 1) + block_size - 1) // block_size * block_size
        spp = [-1] * max_padded
        invp = [-1] * n
        for p in order:
            e = ids[p]
            ppos = po[e] + inverse[p] - offsets[e]
            spp[ppos] = p
            invp[p] = ppos
        be = [-1] * (max_padded // block_size)
        for e in range(num_experts):
            for b in range(po[e] // block_size, po[e + 1] // block_size):
                be[b] = e
        out.update(padded_offsets=po, sorted_pairs_padded=spp, inverse_padded=invp, block_expert=be)
    return out


def capture_training_step(module, step, warmup: int = 3):
    """(CUDA graph, its static output) of ``step()``, a training step of ``module``, captured
    after ``warmup`` eager runs on a side stream (kernels compiled, allocator settled); the
    gradients are cleared before every run and before the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            module.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    module.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
