"""A bad-input sweep over the public API (moe_lora, moe_lora_linear, moe_ffn, route,
dispatch_metadata, dispatch, combine, MoELoRAConfig, Router, MoEFFN, upcycle_ffn, apply_molex), run by
tests/test_bad_inputs.py in child processes
(tests/_isolated.py), so a crash fails one case. Each case: (call, expected) with expected =
(exception class, regex naming the argument and what was expected), or ("returns", check)
for inputs that must be handled without an error (validation off, empty batches).
File errors of checkpoints: tests/test_checkpoint_safety.py; native ops: native_error_cases.py."""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

import moelora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _isolated import outcome_of  # noqa: E402
from helpers import tiny_llama  # noqa: E402

g = torch.Generator().manual_seed(0)
T, D, R, E, K, FF = 6, 8, 2, 3, 2, 5
X = torch.randn(T, D, generator=g)
A, B = torch.randn(R, D, generator=g), torch.randn(E, 4, R, generator=g)
IDS = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
W = torch.rand(T, K, generator=g)
W_IN, W_OUT = torch.randn(E, FF, D, generator=g), torch.randn(E, D, FF, generator=g)
META = moelora.dispatch_metadata(IDS, E)
META_ON_META = META._replace(**{n: getattr(META, n).to("meta")
                                for n in ("counts", "offsets", "sorted_pairs", "inverse")})


def lora(**over):
    kw = dict(x=X, lora_a=A, lora_b=B, topk_ids=IDS, topk_weights=W)
    extra = {k: over.pop(k) for k in ("scaling", "backend", "regime", "base_out") if k in over}
    kw.update(over)
    return lambda: moelora.moe_lora(kw["x"], kw["lora_a"], kw["lora_b"], kw["topk_ids"], kw["topk_weights"],
                                    backend=extra.get("backend", "torch"), **{k: v for k, v in extra.items()
                                                                              if k != "backend"})


def linear(**over):
    """moelora.ops.moe_lora_linear.moe_lora_linear on the Triton backend (static routing unless a router is given)."""
    from moelora.ops.moe_lora_linear import moe_lora_linear
    kw = dict(x=X, weight=torch.randn(4, D, generator=g), bias=None, lora_a=A, lora_b=B)
    kw.update({k: over.pop(k) for k in list(over) if k in kw})
    extra = dict(dict(topk_ids=IDS, topk_weights=W) if "router" not in over else {}, scaling=0.5, backend="triton")
    extra.update(over)
    return lambda: moe_lora_linear(*kw.values(), **extra)


def ffn(**over):
    kw = dict(x=X, topk_ids=IDS, topk_weights=W, w_in=W_IN, b_in=None, w_out=W_OUT, b_out=None, activation=F.silu)
    extra = {k: over.pop(k) for k in ("normalize", "w_gate", "b_gate", "stacked_gate") if k in over}
    kw.update(over)
    return lambda: moelora.moe_ffn(*kw.values(), **extra)


def unvalidated(fn):
    def call():
        with moelora.validation(False):
            return fn()
    return call


def fallback(fn):
    def call():
        with moelora.switches.force_fallback():
            return fn()
    return call


def config(**kw):
    return lambda: moelora.MoELoRAConfig(**kw)


def unchanged_on_error(edit, make_model):
    """A call of ``edit(model, **kw)`` on a fresh model that, where it raises, must leave the model
    as it was (an AssertionError replaces the error otherwise, failing the case)."""
    def with_kwargs(**kw):
        def call():
            model = make_model()
            before = repr(model)
            try:
                return edit(model, **kw)
            except Exception:
                assert repr(model) == before, "the model was changed before the error"
                raise
        return call
    return with_kwargs


upcycle = unchanged_on_error(lambda m, **kw: moelora.upcycle_ffn(m, **{"num_experts": 4, "top_k": 2, **kw}),
                             lambda: tiny_llama(num_layers=2))
molex = unchanged_on_error(moelora.apply_molex, lambda: tiny_llama(num_layers=2))


class Stack(torch.nn.Module):
    """Four width-8 layers that declare no width (MoLEx's hidden_size is checked at the forward)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    def forward(self, z):
        for layer in self.layers:
            z = layer(z)
        return z


def molex_forward(hidden_size):
    def call():
        stack = Stack()
        moelora.apply_molex(stack, hidden_size=hidden_size)
        return stack(torch.randn(3, 8))
    return call


def router(**kw):
    return lambda: moelora.Router(**{"in_features": 8, "num_experts": 4, "top_k": 2, **kw})


def moe_ffn_module(**kw):
    lin = torch.nn.Linear
    return lambda: moelora.MoEFFN(lin(8, 16), lin(16, 8), F.silu, **{"num_experts": 4, "top_k": 2, **kw})


def finite_shape(shape):
    return lambda out: tuple(out.shape) == shape and bool(torch.isfinite(out).all())


CASES = {
    # moe_lora
    "moe_lora/int_x": (lora(x=X.int()),
                       (TypeError, r"x must be float16, bfloat16, float32 or float64, got torch.int32")),
    "moe_lora/list_x": (lora(x=[1.0]), (TypeError, r"x must be a torch.Tensor, got list")),
    "moe_lora/0d_x": (lora(x=torch.tensor(1.0)), (ValueError, r"^x must have shape \[..., d_in\], got a 0-d tensor$")),
    "moe_lora/int16_ids": (lora(topk_ids=IDS.to(torch.int16)), (TypeError, r"^topk_ids must be int32 or int64, got "
                                                                r"torch.int16$")),
    "moe_lora/ids_on_other_device": (lora(topk_ids=IDS.to("meta")),
                                     (ValueError, r"^topk_ids is on meta but x is on cpu; all inputs must share a "
                                                  r"device$")),
    "moe_lora/int_lora_a": (lora(lora_a=A.int()),
                            (TypeError, r"^lora_a must have the dtype of x \(torch.float32\), got torch.int32$")),
    "moe_lora/list_base_out": (lora(base_out=[[0.0]]), (TypeError, r"^base_out must be a torch.Tensor, got list$")),
    "moe_lora/weights_on_other_device": (lora(topk_weights=W.to("meta")),
                                         (ValueError, r"^topk_weights is on meta but x is on cpu; all inputs must "
                                                      r"share a device$")),
    # each of these has the right element count, which is not enough: it was read in the wrong layout
    "moe_lora/ids_with_an_extra_dim": (lora(topk_ids=IDS.view(T, 1, K), topk_weights=W.view(T, 1, K)),
                                       (ValueError, r"^topk_ids must have shape \[6, k\] or \[6, 'k'\] to match x of "
                                                    r"shape \(6, 8\), got \(6, 1, 2\)$")),
    "moe_lora/weights_transposed": (lora(topk_weights=W.t().contiguous()),
                                    (ValueError, r"^topk_weights must have the shape of topk_ids \(6, 2\), got "
                                                 r"\(2, 6\)$")),
    "moe_lora/base_out_transposed": (lora(base_out=torch.randn(4, T)),
                                     (ValueError, r"^base_out must have shape \(6, 4\), got \(4, 6\)$")),
    "moe_lora/rank_zero": (lora(lora_a=A[:0], lora_b=B[..., :0]),
                           (ValueError, r"^lora_b must have E >= 1 and r >= 1, got shape \(3, 4, 0\)$")),
    "moe_lora/scaling_bool": (lora(scaling=True), (TypeError, r"^scaling must be a finite Python number, got True$")),
    "moe_lora/ids_other_leading_shape": (lora(x=X.view(2, 3, D), topk_ids=IDS.view(3, 2, K),
                                              topk_weights=W.view(3, 2, K)),
                                         (ValueError, r"topk_ids must have shape \[6, k\] or \[2, 3, 'k'\]")),
    "moe_lora/scaling_string": (lora(scaling="2"), (TypeError, r"scaling must be a finite Python number, got '2'")),
    "moe_lora/scaling_nan": (lora(scaling=math.nan), (TypeError, r"scaling must be a finite Python number, got nan")),
    "moe_lora/ids_out_of_range": (lora(topk_ids=IDS + 1), (ValueError, r"topk_ids must lie in \[0, 3\), got values in "
                                                                       r"\[1, 3\]")),
    "moe_lora/ids_out_of_range_unvalidated": (unvalidated(lora(topk_ids=IDS * 1000 - 7)),
                                              ("returns", finite_shape((T, 4)))),
    # few tokens, no gradient: the PyTorch backend's gathered form, which indexes lora_b by the ids, runs only where
    # they are known to lie in [0, E) (validation off: they are not)
    "moe_lora/ids_out_of_range_unvalidated_few_tokens": (
        unvalidated(lora(x=X[:1], topk_ids=IDS[:1] * 1000 - 7, topk_weights=W[:1])), ("returns", finite_shape((1, 4)))),
    "moe_lora/empty_batch": (lora(x=X[:0], topk_ids=IDS[:0], topk_weights=W[:0]), ("returns", finite_shape((0, 4)))),
    # the meta device holds no values: the syncing checks skip themselves there (as under torch.compile)
    "moe_lora/meta_device": (lora(**{n: t.to("meta") for n, t in dict(x=X, lora_a=A, lora_b=B, topk_ids=IDS,
                                                                      topk_weights=W).items()}),
                             ("returns", lambda out: out.is_meta and tuple(out.shape) == (T, 4))),
    "moe_lora/backend_name": (lora(backend="cuda"),
                              (ValueError, r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'")),
    "moe_lora/scaling_int_beyond_float": (lora(scaling=10 ** 400),
                                          (TypeError, r"scaling must be a finite Python number")),
    "moe_lora/scaling_beyond_triton_range": (lora(scaling=1e80, backend="triton"),
                                             (ValueError, r"scaling must be 0 or of magnitude in "
                                                          r"\[2\*\*-250, 2\*\*250\] on the Triton backend .* "
                                                          r"got 1e\+80; backend='torch' takes it")),
    "moe_lora/scaling_beyond_triton_range_on_torch": (lora(scaling=1e80, lora_b=torch.zeros(E, 4, R)),
                                                      ("returns", finite_shape((T, 4)))),
    "moe_lora/zero_width_per_expert_a_dense": (lora(x=X[:, :0], lora_a=torch.randn(E, R, 0), backend="triton",
                                                    regime="dense"), ("returns", finite_shape((T, 4)))),
    "moe_lora/grouped_beyond_max_experts": (lora(lora_b=torch.randn(5000, 4, R), backend="triton", regime="grouped"),
                                            (ValueError, r"regime='grouped' sorts the pairs by expert, for at "
                                                         r"most 4096 experts: lora_b.shape\[0\] is 5000")),
    "moe_lora/auto_beyond_max_experts": (lora(lora_b=torch.randn(5000, 4, R), backend="triton"),
                                         ("returns", finite_shape((T, 4)))),
    # moe_lora_linear (the fused layer's op): its Triton path reads every tensor with the sizes the others imply,
    # so each of these read out of bounds or gave a silently wrong answer before it was checked
    "moe_lora_linear/ids_of_other_tokens": (linear(topk_ids=IDS[:2], topk_weights=W[:2]),
                                            (ValueError, r"topk_ids and topk_weights must both have shape "
                                                         r"\[T = 6, k\], got \(2, 2\) and \(2, 2\)")),
    "moe_lora_linear/weights_of_other_shape": (linear(topk_weights=W[:, :1]),
                                               (ValueError, r"topk_ids and topk_weights must both have shape")),
    "moe_lora_linear/k_above_experts": (linear(topk_ids=torch.zeros(T, E + 1, dtype=torch.long),
                                               topk_weights=torch.rand(T, E + 1)),
                                        (ValueError, r"^k \(topk_ids.shape\[1\]\) must be in \[1, "
                                                     r"num_experts=3\], got 4$")),
    "moe_lora_linear/lora_b_of_other_rank": (linear(lora_b=torch.randn(E, 4, R + 1)),
                                             (ValueError, r"lora_a has shape \(2, 8\) but x \(\[..., 8\]\) and lora_b "
                                                          r"\(\[3, 4, 3\]\) require \(3, 8\)")),
    "moe_lora_linear/lora_a_of_other_width": (linear(lora_a=torch.randn(R, D + 1)), (ValueError, r"lora_a has shape")),
    "moe_lora_linear/lora_b_of_other_d_out": (linear(lora_b=torch.randn(E, 5, R)),
                                              (ValueError, r"lora_b must have shape \[E, d_out = 4, r\] "
                                                           r"\(weight's d_out\), got \(3, 5, 2\)")),
    "moe_lora_linear/bias_shape": (linear(bias=torch.zeros(5)),
                                   (ValueError, r"^bias must have shape \(4,\), got \(5,\)$")),
    "moe_lora_linear/float_ids": (linear(topk_ids=IDS.float()), (TypeError, r"topk_ids must be int32 or int64")),
    "moe_lora_linear/ids_out_of_range": (linear(topk_ids=IDS + 1), (ValueError, r"topk_ids must lie in \[0, 3\)")),
    "moe_lora_linear/ids_out_of_range_unvalidated": (unvalidated(linear(topk_ids=IDS * 1000 - 7)),
                                                     ("returns", lambda out: tuple(out[0].shape) == (T, 4))),
    "moe_lora_linear/scaling_nan": (linear(scaling=math.nan), (TypeError, r"scaling must be a finite Python number")),
    "moe_lora_linear/dropout_mask_shape": (linear(dropout_mask=torch.ones(T, D + 1, dtype=torch.bool)),
                                           (ValueError, r"dropout_mask must be a bool tensor of x's shape \(6, 8\)")),
    "moe_lora_linear/no_routing": (linear(topk_ids=None, topk_weights=None),
                                   (ValueError, r"needs a router \(RouterSpec\) or topk_ids and topk_weights")),
    "moe_lora_linear/router_of_other_experts": (
        linear(router=moelora.ops.moe_lora_linear.RouterSpec(torch.randn(E + 1, D), None, "softmax_topk", 2)),
        (ValueError, r"router.weight must have shape \[E = 3, d_in = 8\], got \(4, 8\)")),
    "moe_lora_linear/router_not_a_spec": (linear(router="softmax_topk"),
                                          (TypeError, r"^router must be a RouterSpec or None, got str$")),
    "moe_lora_linear/weight_of_other_dtype": (linear(weight=torch.randn(4, D, dtype=torch.float64)),
                                              (TypeError, r"^weight must have the dtype of x \(torch.float32\), "
                                                          r"got torch.float64")),
    "moe_lora_linear/bias_of_other_dtype": (linear(bias=torch.zeros(4, dtype=torch.float64)),
                                            (TypeError, r"^bias must have the dtype of x \(torch.float32\)")),
    "moe_lora_linear/weight_on_other_device": (linear(weight=torch.empty(4, D, device="meta")),
                                               (ValueError, r"^weight is on meta but x is on cpu")),
    "moe_lora_linear/router_top_k_above_experts": (
        linear(router=moelora.ops.moe_lora_linear.RouterSpec(torch.randn(E, D), None, "softmax_topk", 4)),
        (ValueError, r"^router.top_k must be in \[1, num_experts=3\], got 4$")),
    # each of these reached the kernels (reading out of bounds, or taking a float mask or a second routing as
    # the first) or failed inside them without naming the argument before it was checked
    "moe_lora_linear/weight_of_other_d_in": (
        linear(weight=torch.randn(4, D + 1)),
        (ValueError, r"^weight must have shape \[d_out, d_in = 8\], got \(4, 9\)$")),
    "moe_lora_linear/float_dropout_mask": (linear(dropout_mask=torch.ones(T, D)),
                                           (ValueError, r"^dropout_mask must be a bool tensor of x's shape \(6, 8\), "
                                                        r"got torch.float32 \(6, 8\)$")),
    "moe_lora_linear/ids_without_weights": (
        linear(topk_weights=None), (ValueError, r"needs a router \(RouterSpec\) or topk_ids and topk_weights")),
    "moe_lora_linear/router_and_static_weights": (
        linear(router=moelora.ops.moe_lora_linear.RouterSpec(torch.randn(E, D), None, "softmax_topk", 2),
               topk_weights=W),
        (ValueError, r"^moe_lora_linear takes a router or topk_ids and topk_weights, not both$")),
    "moe_lora_linear/router_weight_and_logits": (
        linear(router=moelora.ops.moe_lora_linear.RouterSpec(torch.randn(E, D), torch.randn(T, E), "softmax_topk", 2)),
        (ValueError, r"^a RouterSpec has either a router weight or precomputed logits$")),
    "moe_lora_linear/router_noise_shape": (
        linear(router=moelora.ops.moe_lora_linear.RouterSpec(torch.randn(E, D), None, "threshold", 2,
                                                             noise=torch.rand(T, 1))),
        (ValueError, r"^router.noise must have shape \[T = 6, top_k = 2\], got \(6, 1\)$")),
    "moe_lora_linear/router_jitter_shape": (
        linear(router=moelora.ops.moe_lora_linear.RouterSpec(torch.randn(E, D), None, "softmax_topk", 2,
                                                             jitter=torch.ones(T, D + 1))),
        (ValueError, r"^router.jitter must have x's shape \(6, 8\), got \(6, 9\)$")),
    "moe_lora_linear/router_float_aux_mask": (
        linear(router=moelora.ops.moe_lora_linear.RouterSpec(torch.randn(E, D), None, "softmax_topk", 2,
                                                             aux_mask=torch.ones(T))),
        (ValueError, r"^router.aux_mask must be a bool tensor of shape \[T = 6\], got torch.float32 \(6,\)$")),
    # moe_ffn
    "moe_ffn/int_x": (ffn(x=X.int()), (TypeError, r"x must be float16, bfloat16, float32 or float64, got torch.int32")),
    "moe_ffn/mixed_fp64_fp32": (ffn(w_out=W_OUT.double()), (TypeError, r"w_out must have the dtype of x "
                                                                       r"\(torch.float32\), got torch.float64")),
    "moe_ffn/activation_string": (ffn(activation="relu"), (TypeError, r"activation must be a callable \(e.g. "
                                                                      r"torch.nn.functional.relu\), got str 'relu'")),
    # the torch backend ignores a valid engine, and took any other value without a word
    "moe_ffn/engine_name_on_torch": (lambda: moelora.moe_ffn(X, IDS, W, W_IN, None, W_OUT, None, F.silu,
                                                             backend="torch", engine="cutlass"),
                                     (ValueError, r"^engine must be one of \('auto', 'triton', 'grouped_mm'\), "
                                                  r"got 'cutlass'$")),
    "moe_ffn/normalize_int": (ffn(normalize=1), (TypeError, r"normalize must be a bool, got int")),
    # a truthy non-bool (1, "no") ran as stacked_gate=True and None as False
    "moe_ffn/stacked_gate_string": (ffn(stacked_gate="no"), (TypeError, r"^stacked_gate must be a bool, got str$")),
    "moe_ffn/stacked_gate_none": (ffn(stacked_gate=None), (TypeError, r"^stacked_gate must be a bool, got NoneType$")),
    "moe_ffn/w_out_none": (ffn(w_out=None), (TypeError, r"^w_out must be a torch.Tensor, got NoneType$")),
    "moe_ffn/list_x": (ffn(x=[[1.0]]), (TypeError, r"x must be a torch.Tensor, got list")),
    "moe_ffn/bias_shape": (ffn(b_in=torch.zeros(E, FF + 1)),
                           (ValueError, r"b_in must have shape \[3, 5\], got \(3, 6\)")),
    "moe_ffn/w_gate_shape": (ffn(w_gate=torch.zeros(E, FF, D + 1)), (ValueError, r"w_gate must have w_in's shape "
                                                                                 r"\(3, 5, 8\), got \(3, 5, 9\)")),
    # w_in's rows are [gate; up] with stacked_gate: an odd count cannot be split in halves
    "moe_ffn/stacked_gate_odd_rows": (ffn(stacked_gate=True, w_out=torch.randn(E, D, FF // 2)),
                                      (ValueError, r"with stacked_gate=True, w_in must have shape "
                                                   r"\[E, 2 \* d_ff, d_in\], got \(3, 5, 8\)")),
    "moe_ffn/b_gate_without_w_gate": (ffn(b_gate=torch.zeros(E, FF)),
                                      (ValueError, r"b_gate is the gate projection's bias: it needs w_gate")),
    "moe_ffn/beyond_max_experts": (ffn(w_in=torch.randn(5000, FF, D), w_out=torch.randn(5000, D, FF)),
                                   (ValueError, r"moe_ffn takes at most 4096 experts: w_in.shape\[0\] is 5000")),
    # one expert beyond the sort's limit (a check off by one took it)
    "moe_ffn/one_beyond_max_experts": (ffn(w_in=torch.randn(4097, FF, D), w_out=torch.randn(4097, D, FF)),
                                       (ValueError, r"moe_ffn takes at most 4096 experts: w_in.shape\[0\] is 4097")),
    "moe_ffn/routing_of_other_token_count": (ffn(topk_ids=IDS[:-1], topk_weights=W[:-1]),
                                             (ValueError, r"^topk_ids and topk_weights must both have shape "
                                                          r"\[T = 6, k\], got \(5, 2\) and \(5, 2\)$")),
    "moe_ffn/float_ids": (ffn(topk_ids=IDS.float()),
                          (TypeError, r"topk_ids must be int32 or int64, got torch.float32")),
    "moe_ffn/ids_out_of_range": (ffn(topk_ids=IDS + 3), (ValueError, r"topk_ids must lie in \[0, 3\)")),
    # the expert sort's bounds (1 <= k <= E, E >= 1), checked on both paths: the PyTorch fallback of the sort
    # accepted what the native op refuses
    "moe_ffn/k_above_experts": (ffn(topk_ids=torch.zeros(T, E + 1, dtype=torch.long),
                                    topk_weights=torch.rand(T, E + 1)),
                                (ValueError, r"^k \(topk_ids.shape\[1\]\) must be in \[1, num_experts=3\], got 4$")),
    "moe_ffn/k_above_experts_fallback": (
        fallback(unvalidated(ffn(topk_ids=torch.zeros(T, E + 1, dtype=torch.long), topk_weights=torch.rand(T, E + 1)))),
        (ValueError, r"^k \(topk_ids.shape\[1\]\) must be in \[1, num_experts=3\], got 4$")),
    "moe_ffn/k_zero_fallback": (fallback(ffn(topk_ids=IDS[:, :0], topk_weights=W[:, :0])),
                                (ValueError, r"^k \(topk_ids.shape\[1\]\) must be in \[1, num_experts=3\], got 0$")),
    "moe_ffn/no_experts_fallback": (fallback(unvalidated(ffn(w_in=W_IN[:0], w_out=W_OUT[:0]))),
                                    (ValueError, r"^moe_ffn needs at least one expert: w_in.shape\[0\] is 0$")),
    "moe_ffn/ids_out_of_range_unvalidated": (unvalidated(ffn(topk_ids=IDS - 5)), ("returns", finite_shape((T, D)))),
    "moe_ffn/normalize_zero_sum": (ffn(topk_weights=torch.tensor([[0.5, -0.5]] * T), normalize=True),
                                   (ValueError, r"normalize=True needs the kept topk_weights of every token to "
                                                r"sum to a positive value")),
    # the kept weights sum to a subnormal float32: dividing by it overflows
    "moe_ffn/normalize_subnormal_sum": (ffn(topk_weights=torch.full((T, K), 1e-39), normalize=True),
                                        (ValueError, r"normalize=True needs the kept topk_weights of every token to "
                                                     r"sum to a positive value of at least 1.17549")),
    # route
    "route/int_logits": (lambda: moelora.route(torch.ones(3, 4, dtype=torch.long), 2),
                         (TypeError, r"logits must be float16, bfloat16, float32 or float64, got torch.int64")),
    "route/float_top_k": (lambda: moelora.route(torch.randn(3, 4), 2.0), (TypeError, r"top_k must be int, got float")),
    "route/top_k_above_E": (lambda: moelora.route(torch.randn(3, 4), 9),
                            (ValueError, r"top_k must be in \[1, num_experts=4\], got 9")),
    "route/mode": (lambda: moelora.route(torch.randn(3, 4), 2, mode="sigmoid"),
                   (ValueError, r"mode must be one of \('softmax_topk', 'topk_softmax'\), got 'sigmoid'")),
    "route/mode_list": (lambda: moelora.route(torch.randn(3, 4), 2, mode=["softmax_topk"]),
                        (ValueError, r"mode must be one of \('softmax_topk', 'topk_softmax'\), "
                                     r"got \['softmax_topk'\]")),
    "route/too_many_experts": (lambda: moelora.route(torch.randn(3, 5000), 2),
                               (ValueError, r"logits.shape\[-1\] \(the number of experts\) must be in \[1, 4096\], "
                                            r"got 5000")),
    "route/plus_inf_logit": (lambda: moelora.route(torch.tensor([[math.inf, 0.0]]), 2).weights,
                             ("returns", lambda w: w.tolist() == [[1.0, 0.0]])),
    # dispatch_metadata / dispatch / combine
    "dispatch_metadata/block_size_int64_max": (lambda: moelora.dispatch_metadata(torch.zeros(4, 1, dtype=torch.long), 1,
                                                                                 block_size=2**63 - 1),
                                               (ValueError, r"block_size must be in \[1, 65536\] \(or None: no "
                                                            r"padding\), got 9223372036854775807")),
    "dispatch_metadata/block_size_2_52": (lambda: moelora.dispatch_metadata(torch.zeros(4, 1, dtype=torch.long), 4096,
                                                                            block_size=2**52),
                                          (ValueError, r"block_size must be in \[1, 65536\].*got 4503599627370496")),
    "dispatch_metadata/block_size_zero": (lambda: moelora.dispatch_metadata(IDS, E, block_size=0),
                                          (ValueError, r"block_size must be in \[1, 65536\].*got 0")),
    "dispatch_metadata/block_size_float": (lambda: moelora.dispatch_metadata(IDS, E, block_size=4.0),
                                           (TypeError, r"block_size must be int, got float")),
    "dispatch_metadata/num_experts_above_cap": (lambda: moelora.dispatch_metadata(IDS, 5000),
                                                (ValueError, r"num_experts must be in \[1, 4096\], got 5000")),
    "dispatch_metadata/bool_num_experts": (lambda: moelora.dispatch_metadata(IDS, True),
                                           (TypeError, r"num_experts must be int, got bool")),
    "dispatch_metadata/float_ids": (lambda: moelora.dispatch_metadata(IDS.float(), E),
                                    (TypeError, r"topk_ids must be int32 or int64, got torch.float32")),
    "dispatch_metadata/ids_out_of_range_unvalidated": (
        unvalidated(lambda: moelora.dispatch_metadata(IDS * 10**12, E, block_size=4).inverse_padded),
        ("returns", lambda inv: inv.shape == (T, K) and bool((inv[IDS != 0] == -1).all()))),
    "dispatch_metadata/meta_device": (lambda: moelora.dispatch_metadata(IDS.to("meta"), E, block_size=4),
                                      ("returns", lambda m: m.inverse_padded.is_meta and m.inverse.shape == (T, K))),
    "dispatch/meta_device": (lambda: moelora.dispatch(X.to("meta"), META_ON_META),
                             ("returns", lambda out: out.is_meta and tuple(out.shape) == (T * K, D))),
    "combine/meta_device": (lambda: moelora.combine(torch.randn(T * K, 4, device="meta"), META_ON_META,
                                                    W.to("meta")),
                            ("returns", lambda out: out.is_meta and tuple(out.shape) == (T, 4))),
    "dispatch/meta_tuple": (lambda: moelora.dispatch(X, tuple(META)),
                            (TypeError, r"meta must be the DispatchMetadata of dispatch_metadata\(\), got tuple")),
    "dispatch/x_rows": (lambda: moelora.dispatch(X[:2], META), (ValueError, r"x must have shape \[T, d\] with T = 6, "
                                                                            r"got \(2, 8\)")),
    "dispatch/forged_positions": (lambda: moelora.dispatch(X, META._replace(sorted_pairs=META.sorted_pairs * 10**9)),
                                  (ValueError, r"meta sorted pairs must lie in \[-1, 12\)")),
    "combine/y_rows": (lambda: moelora.combine(torch.randn(5, 4), META, None),
                       (ValueError, r"y_sorted must have shape \[12, d\] \(the rows of dispatch\), got \(5, 4\)")),
    "combine/weights_shape": (lambda: moelora.combine(torch.randn(12, 4), META, W[:, :1]),
                              (ValueError, r"topk_weights must have shape \(6, 2\), got \(6, 1\)")),
    "combine/forged_positions_unvalidated": (
        unvalidated(lambda: moelora.combine(torch.randn(12, 4), META._replace(inverse=META.inverse - 10**12), W)),
        ("returns", lambda out: torch.equal(out, torch.zeros(T, 4)))),
    # MoELoRAConfig
    "config/top_k_string": (config(top_k="2"), (TypeError, r"MoELoRAConfig.top_k must be a positive int, got str '2'")),
    "config/lora_alpha_string": (config(lora_alpha="16"), (TypeError, r"MoELoRAConfig.lora_alpha must be a finite "
                                                                      r"number, got str '16'")),
    "config/num_experts_float": (config(num_experts=4.0), (TypeError, r"MoELoRAConfig.num_experts must be a positive "
                                                                      r"int.*got float 4.0")),
    "config/top_k_float": (config(top_k=2.5),
                           (TypeError, r"MoELoRAConfig.top_k must be a positive int, got float 2.5")),
    "config/task_router_per_layer_experts": (config(router="task", num_experts=[2, 3]),
                                             (ValueError, r"^router='task' routes each example to the expert of its "
                                              r"task in every layer.*got \[2, 3\]$")),
    "config/task_router_expert_preset": (config(router="task", num_experts="2468"),
                                         (ValueError, r"num_experts must be an int \(the number of tasks\)")),
    "config/lora_alpha_inf": (config(lora_alpha=math.inf), (ValueError, r"MoELoRAConfig.lora_alpha must be a finite "
                                                                        r"number, got inf")),
    "config/r_zero": (config(r=0), (ValueError, r"MoELoRAConfig.r must be a positive int, got 0")),
    "config/dropout_string": (config(lora_dropout="0.1"), (TypeError, r"MoELoRAConfig.lora_dropout must be a number in "
                                                                      r"\[0, 1\), got str '0.1'")),
    "config/num_experts_zero": (config(num_experts=0), (ValueError, r"^MoELoRAConfig.num_experts must be a positive "
                                                                    r"int, a list of per-layer ints, .*got 0$")),
    # None passes the check of the fields whose default is None only
    "config/add_aux_loss_to_output_none": (config(add_aux_loss_to_output=None),
                                           (TypeError, r"MoELoRAConfig.add_aux_loss_to_output must be a bool, got "
                                                       r"NoneType None")),
    "config/layers_to_transform_names": (config(layers_to_transform=["0"]),
                                         (TypeError, r"MoELoRAConfig.layers_to_transform must be an int or a list of "
                                                     r"ints, got list \['0'\]")),
    "config/target_modules_empty": (config(target_modules=[]), (ValueError, r"target_modules is an empty list")),
    "config/target_modules_int": (config(target_modules=[3]), (TypeError, r"MoELoRAConfig.target_modules must be a "
                                                                          r"list of module-name suffixes")),
    "config/router": (config(router="top1"), (ValueError, r"router must be one of \('softmax_topk', 'topk_softmax', "
                                                          r"'threshold', 'task'\), got 'top1'")),
    "config/init_lora_weights": (config(init_lora_weights="pissa"), (ValueError, r"init_lora_weights must be True, "
                                                                                 r"False or 'gaussian', got 'pissa'")),
    # a callable's bool count passed its int check, then failed in LayerSettings without naming the layer
    "config/num_experts_callable_returns_bool": (
        lambda: moelora.MoELoRAConfig(num_experts=lambda i, n: True, top_k=1).layer_settings("layers.0.q", 0, 2),
        (ValueError, r"^layer 0 \(layers.0.q\): num_experts callable returned True for layer 0; need an int >= 1$")),
    "config/num_experts_callable_returns_zero": (
        lambda: moelora.MoELoRAConfig(num_experts=lambda i, n: 0, top_k=1).layer_settings("layers.0.q", 0, 2),
        (ValueError, r"^layer 0 \(layers.0.q\): num_experts callable returned 0 for layer 0; need an int >= 1$")),
    # rank_pattern / alpha_pattern values are checked when the config is made, as r and lora_alpha are
    "config/rank_pattern_zero": (config(rank_pattern={"q_proj": 4, "v_proj": 0}),
                                 (ValueError, r"MoELoRAConfig.rank_pattern must be a dict of module-name patterns "
                                              r"\(valid regexes\) to positive ints, got \{'q_proj': 4, 'v_proj': 0\}")),
    "config/alpha_pattern_inf": (config(alpha_pattern={"q_proj": math.inf}),
                                 (ValueError, r"MoELoRAConfig.alpha_pattern must be a dict of module-name patterns "
                                              r"\(valid regexes\) to finite numbers, got \{'q_proj': inf\}")),
    "config/from_list": (lambda: moelora.MoELoRAConfig.from_dict([1, 2]),
                         (TypeError, r"a MoELoRAConfig is read from a dict \(a JSON object\), got list")),
    # upcycle_ffn: the router arguments as the layers' fields of the same names, before the model changes
    "upcycle_ffn/aux_loss_coef_negative": (upcycle(router_aux_loss_coef=-1.0),
                                           (ValueError, r"^router_aux_loss_coef must be a finite number >= 0, "
                                                        r"got -1.0$")),
    "upcycle_ffn/threshold_eps_negative": (upcycle(threshold_eps=-0.5),
                                           (ValueError, r"^threshold_eps must be a finite number >= 0, got -0.5$")),
    "upcycle_ffn/threshold_eps_nan": (upcycle(threshold_eps=math.nan),
                                      (ValueError, r"^threshold_eps must be a finite number >= 0, got nan$")),
    "upcycle_ffn/ramp_steps_float": (upcycle(threshold_ramp_steps=2.5),
                                     (TypeError, r"^threshold_ramp_steps must be an int >= 0, got float 2.5$")),
    "upcycle_ffn/jitter_nan": (upcycle(router_jitter_noise=math.nan),
                               (ValueError, r"^router_jitter_noise must be a finite number >= 0, got nan$")),
    "upcycle_ffn/num_experts_float": (upcycle(num_experts=4.0),
                                      (TypeError, r"^num_experts must be a positive int, got float 4.0$")),
    "upcycle_ffn/num_experts_string": (upcycle(num_experts="4"),
                                       (TypeError, r"^num_experts must be a positive int, got str '4'$")),
    "upcycle_ffn/top_k_float": (upcycle(top_k=2.0), (TypeError, r"^top_k must be a positive int, got float 2.0$")),
    "upcycle_ffn/router_task": (upcycle(router="task"), (ValueError, r"^router must be one of \('softmax_topk', "
                                                                     r"'topk_softmax', 'threshold'\), got 'task'$")),
    "upcycle_ffn/unknown_router_argument": (upcycle(threshold=0.1), (TypeError, r"unknown router arguments "
                                                                                r"\['threshold'\]")),
    "upcycle_ffn/activation_string": (upcycle(ffn_modules=["mlp"], in_proj="up_proj", out_proj="down_proj",
                                              activation="silu"),
                                      (TypeError, r"activation must be a callable \(e.g. torch.nn.functional.silu\)")),
    "upcycle_ffn/ffn_dropout_unknown": (upcycle(ffn_dropout="keep"),
                                        (ValueError, r"^ffn_dropout must be one of \(None, 'output', 'drop'\), "
                                                     r"got 'keep'$")),
    # ffn_modules, the projections' names and the layer selection are checked as MoELoRAConfig's fields of the same
    # meaning: an int or a bad regex failed deep inside (re.error), True selected layer 1, a str nothing at all
    "upcycle_ffn/ffn_modules_int": (upcycle(ffn_modules=3, in_proj="up_proj", out_proj="down_proj", activation=F.silu),
                                    (TypeError, r"^ffn_modules must be a list of module-name suffixes or a valid "
                                                r"regex string, got int 3$")),
    "upcycle_ffn/ffn_modules_bad_regex": (upcycle(ffn_modules="(", in_proj="up_proj", out_proj="down_proj",
                                                  activation=F.silu),
                                          (ValueError, r"^ffn_modules must be .* valid regex string, got '\('$")),
    "upcycle_ffn/ffn_modules_set": (upcycle(ffn_modules={"mlp"}, in_proj="up_proj", out_proj="down_proj",
                                            gate_proj="gate_proj", activation=F.silu),
                                    ("returns", lambda names: names == ["model.layers.0.mlp", "model.layers.1.mlp"])),
    "upcycle_ffn/in_proj_int": (upcycle(ffn_modules=["mlp"], in_proj=3, out_proj="down_proj", activation=F.silu),
                                (TypeError, r"^in_proj must be the dotted name \(str\) of a child of the FFN module, "
                                            r"got int 3$")),
    "upcycle_ffn/layers_to_transform_bool": (upcycle(layers_to_transform=True),
                                             (TypeError, r"^layers_to_transform must be an int or a list of ints, "
                                                         r"got bool True$")),
    "upcycle_ffn/layers_to_transform_string": (upcycle(layers_to_transform="0"),
                                               (TypeError, r"^layers_to_transform must be an int or a list of ints")),
    "upcycle_ffn/layers_pattern_int": (upcycle(layers_to_transform=[0], layers_pattern=3),
                                       (TypeError, r"^layers_pattern must be a string or a list of strings, "
                                                   r"got int 3$")),
    "upcycle_ffn/activation_without_ffn_modules": (upcycle(activation=F.gelu),
                                                   (ValueError, r"^activation given without ffn_modules: they describe "
                                                                r"a generic FFN; the MLPs upcycle_ffn finds on its own "
                                                                r"use their own projections and activation$")),
    "upcycle_ffn/generic_without_activation": (upcycle(ffn_modules=["mlp"], in_proj="up_proj", out_proj="down_proj"),
                                               (ValueError, r"^a generic FFN needs in_proj, out_proj and activation$")),
    "upcycle_ffn/stacked_gate_not_bool": (upcycle(stacked_gate=1),
                                          (TypeError, r"^stacked_gate must be a bool, got int 1$")),
    "upcycle_ffn/stacked_gate_without_ffn_modules": (upcycle(stacked_gate=True),
                                                     (ValueError, r"^stacked_gate=True describes a generic FFN's "
                                                                  r"in_proj")),
    "MoEFFN/stacked_gate_with_gate_proj": (
        lambda: moelora.MoEFFN(torch.nn.Linear(8, 32), torch.nn.Linear(16, 8), F.silu, 4, 2,
                               gate_proj=torch.nn.Linear(8, 16), stacked_gate=True),
        (ValueError, r"^with stacked_gate=True, in_proj is the fused gate/up projection \[2 \* d_ff, d_in\] and "
                     r"gate_proj must be None; got in_proj with 32 output features and gate_proj Linear$")),
    # a truthy non-bool ran as stacked_gate=True (upcycle_ffn checked its own argument, MoEFFN took any)
    "MoEFFN/stacked_gate_not_bool": (
        lambda: moelora.MoEFFN(torch.nn.Linear(8, 32), torch.nn.Linear(16, 8), F.silu, 4, 2, stacked_gate=1),
        (TypeError, r"^stacked_gate must be a bool, got int 1$")),
    "MoEFFN/stacked_gate_odd_rows": (
        lambda: moelora.MoEFFN(torch.nn.Linear(8, 33), torch.nn.Linear(16, 8), F.silu, 4, 2, stacked_gate=True),
        (ValueError, r"got in_proj with 33 output features and gate_proj NoneType$")),
    "MoEFFN/stacked_gate_out_proj_width": (
        lambda: moelora.MoEFFN(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), F.silu, 4, 2, stacked_gate=True),
        (ValueError, r"^out_proj takes 16 features but in_proj gives 8 \(half of the fused gate/up projection's\)$")),
    # the projections' type is checked before refuse_quantised reads their weight (an AttributeError before)
    "MoEFFN/in_proj_identity": (
        lambda: moelora.MoEFFN(torch.nn.Identity(), torch.nn.Linear(16, 8), F.silu, 4, 2),
        (TypeError, r"^in_proj \(an FFN projection\) must be one of the nn.Linear or transformers Conv1D layers, "
         r"got Identity$")),
    "MoEFFN/gate_proj_tensor": (
        lambda: moelora.MoEFFN(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), F.silu, 4, 2,
                               gate_proj=torch.randn(16, 8)),
        (TypeError, r"^gate_proj \(an FFN projection\) must be one of the nn.Linear or transformers Conv1D layers, "
         r"got Tensor$")),
    "MoEFFN/in_proj_none": (lambda: moelora.MoEFFN(None, torch.nn.Linear(16, 8), F.silu, 4, 2),
                            (TypeError, r"^in_proj \(an FFN projection\) must be one of the nn.Linear .* "
                                        r"got NoneType$")),
    "MoEFFN/out_proj_none": (lambda: moelora.MoEFFN(torch.nn.Linear(8, 16), None, F.silu, 4, 2),
                             (TypeError, r"^out_proj \(an FFN projection\) must be .* got NoneType$")),
    "MoEFFN/dropout_above_one": (moe_ffn_module(dropout=1.5),
                                 (ValueError, r"^dropout must be a number in \[0, 1\] \(nn.Dropout's p\), got 1.5$")),
    "MoEFFN/dropout_one": (moe_ffn_module(dropout=1), ("returns", lambda moe: repr(moe.dropout) == "1.0")),
    "MoEFFN/activation_string": (
        lambda: moelora.MoEFFN(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), "silu", 4, 2),
        (TypeError, r"^activation must be a callable \(e.g. torch.nn.functional.silu\), got str 'silu'$")),
    "MoEFFN/z_loss_coef_inf": (moe_ffn_module(router_z_loss_coef=math.inf),
                               (ValueError, r"^router_z_loss_coef must be a finite number >= 0, got inf$")),
    "MoEFFN/top_k_string": (moe_ffn_module(top_k="2"), (TypeError, r"^top_k must be a positive int, got str '2'$")),
    # Router: the same checks under Router's argument names
    "Router/jitter_nan": (router(jitter_noise=math.nan), (ValueError, r"^jitter_noise must be a finite number >= 0, "
                                                                      r"got nan$")),
    "Router/eps_end_negative": (router(mode="threshold", eps_end=-0.5),
                                (ValueError, r"^eps_end must be a finite number >= 0, got -0.5$")),
    "Router/ramp_steps_float": (router(mode="threshold", eps_ramp_steps=2.5),
                                (TypeError, r"^eps_ramp_steps must be an int >= 0, got float 2.5$")),
    "Router/top_k_float": (router(top_k=2.0), (TypeError, r"^top_k must be a positive int, got float 2.0$")),
    "Router/renormalize_string": (router(renormalize="no"), (TypeError, r"^renormalize must be a bool, got str 'no'$")),
    # apply_molex / MoLEx / LayerGate, before the model changes
    "apply_molex/aux_loss_coef_negative": (molex(aux_loss_coef=-1.0),
                                           (ValueError, r"^aux_loss_coef must be a finite number >= 0, got -1.0$")),
    "apply_molex/temperature_zero": (molex(gate="cosine", temperature=0.0),
                                     (ValueError, r"^temperature must be a finite number > 0, got 0.0$")),
    "apply_molex/proj_dim_negative": (molex(gate="cosine", proj_dim=-2),
                                      (ValueError, r"^proj_dim must be a positive int or None \(hidden_size\), "
                                                   r"got -2$")),
    "apply_molex/proj_dim_zero": (molex(gate="cosine", proj_dim=0),
                                  (ValueError, r"^proj_dim must be a positive int or None \(hidden_size\), got 0$")),
    "apply_molex/alpha_string": (molex(alpha="0.9"), (TypeError, r"^alpha must be a number in \[0, 1\], "
                                                                 r"got str '0.9'$")),
    "apply_molex/shared_gate_string": (molex(shared_gate="no"), (TypeError, r"^shared_gate must be a bool, "
                                                                            r"got str 'no'$")),
    "apply_molex/bias_string": (molex(bias="yes"), (TypeError, r"^bias must be a bool or None")),
    "apply_molex/gate_int": (molex(gate=1), (TypeError, r"^gate must be one of \('linear', 'cosine', "
                                                        r"'cosine_sigmoid'\), got int 1$")),
    "apply_molex/gate_unknown": (molex(gate="softmax"), (ValueError, r"^gate must be one of .*, got 'softmax'$")),
    "apply_molex/hidden_size_of_another_width": (molex(hidden_size=8),
                                                 (ValueError, r"hidden_size=8 does not match the model's width: its "
                                                              r"layers take hidden states of width 16")),
    "apply_molex/hidden_size_float": (molex(hidden_size=16.0), (TypeError, r"^hidden_size must be a positive int, "
                                                                           r"got float 16.0$")),
    "apply_molex/layers_int": (molex(layers=3),
                               (TypeError, r"^layers must be a dotted name \(str\), one of the model's "
                                           r"nn.ModuleLists or None \(the one stack it has\), got int 3$")),
    "apply_molex/layers_list_of_names": (molex(layers=["model.layers"]),
                                         (TypeError, r"^layers must be a dotted name .* got list \['model.layers'\]$")),
    "MoLEx/layers_list": (lambda: moelora.MoLEx([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)], 8),
                          (TypeError, r"^layers must be the model's nn.ModuleList of layers, got list$")),
    "MoLEx/layers_string": (lambda: moelora.MoLEx("model.layers", 8),
                            (TypeError, r"^layers must be the model's nn.ModuleList of layers, got str$")),
    "apply_molex/hidden_size_at_forward": (molex_forward(hidden_size=16),
                                           (ValueError, r"MoLEx was applied with hidden_size=16, but the model's "
                                                        r"hidden states are 8 wide")),
}


def run_case(name: str) -> dict:
    call, expected = CASES[name]
    return outcome_of(call, expected[1] if expected[0] == "returns" else None)
