"""Argument errors and out-of-range values of every native op (torch.ops.moelora.*), run by
tests/test_bad_inputs.py in child processes (tests/_isolated.py): a case that crashes
the interpreter (a broken C++ runtime in the extension, an out-of-bounds write) then fails
alone. Each case: (call, expected) with expected = (exception class, message regex), or
("returns", check) for inputs that must be handled without an error.

The messages are matched in full, numbers included: an extension that formats them with a
second (static) copy of libstdc++ cuts them off after the first number, or crashes.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import moelora  # noqa: F401  (loads moelora._C, which registers torch.ops.moelora)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _isolated import outcome_of  # noqa: E402

ops = torch.ops.moelora
L = dict(dtype=torch.long)


def _ids(*shape):
    return torch.zeros(*shape, dtype=torch.long)


def _gather_inputs(T=3, k=2, d=4):
    """(x or y [T or T*k, d], sorted_pairs [T*k], inverse [T, k], weights [T, k])."""
    sp = torch.arange(T * k)
    return torch.randn(T, d), sp, sp.view(T, k), torch.rand(T, k)


x, sp, inv, w = _gather_inputs()
y = torch.randn(6, 4)
# 6 rows of ones followed in memory by a row of 7s: a kernel reading one row past b_sorted reads that row.
_past = torch.ones(7, 4)
_past[6] = 7.0

CASES = {
    # router_topk(logits [T, E], top_k, mode, renormalize)
    "router_topk/top_k_above_E": (lambda: ops.router_topk(torch.randn(3, 4), 5, 0, False),
                                  (ValueError, r"top_k must be in \[1, E = 4\], got 5")),
    "router_topk/top_k_zero": (lambda: ops.router_topk(torch.randn(3, 4), 0, 1, False),
                               (ValueError, r"top_k must be in \[1, E = 4\], got 0")),
    "router_topk/too_many_experts": (lambda: ops.router_topk(torch.randn(3, 5000), 2, 0, False),
                                     (ValueError, r"logits.shape\[1\] \(number of experts\) must be in \[1, 4096\], "
                                                  r"got 5000")),
    "router_topk/no_experts": (lambda: ops.router_topk(torch.randn(3, 0), 1, 0, False),
                               (ValueError, r"number of experts\) must be in \[1, 4096\], got 0")),
    "router_topk/int_logits": (lambda: ops.router_topk(torch.ones(3, 4, dtype=torch.int32), 2, 0, False),
                               (TypeError, r"logits must be float16, bfloat16, float32 or float64, got Int")),
    "router_topk/1d_logits": (lambda: ops.router_topk(torch.randn(4), 2, 0, False),
                              (ValueError, r"logits must be 2-D, got shape \[4\]")),
    "router_topk/bad_mode": (lambda: ops.router_topk(torch.randn(3, 4), 2, 7, False),
                             (ValueError, r"mode must be 0 \(softmax_topk\) or 1 \(topk_softmax\), got 7")),
    # An op whose every tensor argument is None has no device to dispatch on: the dispatcher refused it with
    # "There were no tensor arguments to this function ... no fallback function is registered" (NotImplementedError,
    # naming no argument) and the fake raised AttributeError.
    "router_topk/logits_none": (lambda: ops.router_topk(None, 2, 0, False),
                                (TypeError, r"router_topk: logits must be a tensor, got None")),
    # dispatch_metadata(topk_ids [T, k], num_experts, block_size)
    "dispatch_metadata/1d_ids": (lambda: ops.dispatch_metadata(_ids(4), 2, 0),
                                 (ValueError, r"topk_ids must be 2-D, got shape \[4\]")),
    "dispatch_metadata/topk_ids_none": (lambda: ops.dispatch_metadata(None, 2, 0),
                                        (TypeError, r"dispatch_metadata: topk_ids must be a tensor, got None")),
    "dispatch_metadata/float_ids": (lambda: ops.dispatch_metadata(torch.zeros(4, 1), 2, 0),
                                    (TypeError, r"topk_ids must be int32 or int64, got Float")),
    "dispatch_metadata/no_experts": (lambda: ops.dispatch_metadata(_ids(4, 1), 0, 0),
                                     (ValueError, r"num_experts must be in \[1, 4096\], got 0")),
    "dispatch_metadata/too_many_experts": (lambda: ops.dispatch_metadata(_ids(4, 1), 4097, 0),
                                           (ValueError, r"num_experts must be in \[1, 4096\], got 4097")),
    "dispatch_metadata/k_above_E": (lambda: ops.dispatch_metadata(_ids(4, 3), 2, 0),
                                    (ValueError, r"topk_ids.shape\[1\] \(k\) must be in \[1, num_experts = 2\], "
                                                 r"got 3")),
    "dispatch_metadata/k_zero": (lambda: ops.dispatch_metadata(_ids(4, 0), 2, 0),
                                 (ValueError, r"\(k\) must be in \[1, num_experts = 2\], got 0")),
    "dispatch_metadata/negative_block_size": (lambda: ops.dispatch_metadata(_ids(4, 1), 2, -1),
                                              (ValueError, r"block_size must be in \[0, 65536\] \(0: no padding\), "
                                                           r"got -1")),
    # Crashed (int64 overflow of the padded length, buffer sized 0, writes past it) before.
    "dispatch_metadata/block_size_int64_max": (lambda: ops.dispatch_metadata(_ids(4, 1), 1, 2**63 - 1),
                                               (ValueError, r"block_size must be in \[0, 65536\] .*got "
                                                            r"9223372036854775807")),
    "dispatch_metadata/block_size_2_52_many_experts": (lambda: ops.dispatch_metadata(_ids(4, 1), 4096, 2**52),
                                                       (ValueError, r"got 4503599627370496")),
    "dispatch_metadata/block_size_above_limit": (lambda: ops.dispatch_metadata(_ids(4, 1), 8, 65537),
                                                 (ValueError, r"block_size must be in \[0, 65536\].*got 65537")),
    "dispatch_metadata/ids_out_of_range": (lambda: ops.dispatch_metadata(torch.tensor([[5], [-7], [1]]), 2, 4),
                                           ("returns", lambda out: out[3].tolist() == [[-1], [-1], [0]]
                                            and out[0].tolist() == [0, 1])),
    # dispatch(x [T, d], sorted_pairs [P], inverse [T, k], weights [T, k] | None)
    "dispatch/1d_x": (lambda: ops.dispatch(torch.randn(3), sp, inv, None),
                      (ValueError, r"dispatch: x must be 2-D, got shape \[3\]")),
    "dispatch/int_x": (lambda: ops.dispatch(x.int(), sp, inv, None),
                       (TypeError, r"dispatch: x must be float16, bfloat16, float32 or float64, got Int")),
    "dispatch/int32_sorted_pairs": (lambda: ops.dispatch(x, sp.int(), inv, None),
                                    (TypeError, r"sorted_pairs must be int64, got Int")),
    "dispatch/2d_sorted_pairs": (lambda: ops.dispatch(x, inv, inv, None),
                                 (ValueError, r"sorted_pairs must be 1-D, got shape \[3, 2\]")),
    "dispatch/1d_inverse": (lambda: ops.dispatch(x, sp, sp, None),
                            (ValueError, r"inverse must be 2-D, got shape \[6\]")),
    "dispatch/k_zero_inverse": (lambda: ops.dispatch(x, sp, _ids(3, 0), None),
                                (ValueError, r"dispatch: inverse must have shape \[T, k\] with k >= 1, got \[3, 0\]")),
    "dispatch/weights_shape": (lambda: ops.dispatch(x, sp, inv, w[:, :1]),
                               (ValueError, r"dispatch: weights must have the shape of inverse \[3, 2\], "
                                            r"got \[3, 1\]")),
    "dispatch/int_weights": (lambda: ops.dispatch(x, sp, inv, w.long()),
                             (TypeError, r"weights must be float16, bfloat16, float32 or float64, got Long")),
    "dispatch/rows_mismatch": (lambda: ops.dispatch(torch.randn(4, 4), sp, inv, None),
                               (ValueError, r"dispatch: x has 4 rows but inverse has 3 tokens")),
    "dispatch/pairs_out_of_range": (lambda: ops.dispatch(x, torch.tensor([0, 10**12, -5, 6, 5]), inv, w),
                                    ("returns", lambda out: out.shape == (5, 4) and bool((out[1:4] == 0).all()))),
    # An input on the meta device sends the call to the op's Meta kernel (its fake), which must check
    # the devices as the CPU kernel does (it returned an uninitialised CPU tensor before).
    "dispatch/sorted_pairs_on_meta": (lambda: ops.dispatch(x, sp.to("meta"), inv.to("meta"), None),
                                      (ValueError, r"dispatch: sorted_pairs must be on x's device cpu, got meta")),
    "dispatch/x_on_meta": (lambda: ops.dispatch(x.to("meta"), sp, inv, None),
                           (ValueError, r"dispatch: sorted_pairs must be on x's device meta, got cpu")),
    "dispatch/weights_on_meta": (lambda: ops.dispatch(x, sp, inv, w.to("meta")),
                                 (ValueError, r"dispatch: weights must be on x's device cpu, got meta")),
    # None for a required tensor reaches the kernel as an undefined tensor: it was reported as
    # "x must be 2-D, got shape [0]", "sorted_pairs must be int64, got UNKNOWN_SCALAR" or (pair_dot's a)
    # "tensor does not have a device", naming no argument.
    "dispatch/x_none": (lambda: ops.dispatch(None, sp, inv, None),
                        (TypeError, r"dispatch: x must be a tensor, got None")),
    "dispatch/all_tensors_none": (lambda: ops.dispatch(None, None, None, None),
                                  (TypeError, r"dispatch: x must be a tensor, got None")),
    "dispatch/sorted_pairs_none": (lambda: ops.dispatch(x, None, inv, w),
                                   (TypeError, r"dispatch: sorted_pairs must be a tensor, got None")),
    "dispatch/inverse_none": (lambda: ops.dispatch(x, sp, None, w),
                              (TypeError, r"dispatch: inverse must be a tensor, got None")),
    # combine(y_sorted [P, d], sorted_pairs [P], inverse [T, k], weights [T, k] | None)
    "combine/y_sorted_none": (lambda: ops.combine(None, sp, inv, w),
                              (TypeError, r"combine: y_sorted must be a tensor, got None")),
    "combine/all_tensors_none": (lambda: ops.combine(None, None, None, None),
                                 (TypeError, r"combine: y_sorted must be a tensor, got None")),
    "combine/1d_y_sorted": (lambda: ops.combine(torch.randn(6), sp, inv, None),
                            (ValueError, r"combine: y_sorted must be 2-D, got shape \[6\]")),
    "combine/int_y_sorted": (lambda: ops.combine(y.long(), sp, inv, None),
                             (TypeError, r"combine: y_sorted must be float16, bfloat16, float32 or float64, got Long")),
    "combine/rows_mismatch": (lambda: ops.combine(torch.randn(5, 4), sp, inv, None),
                              (ValueError, r"combine: y_sorted has 5 rows but sorted_pairs has 6 entries")),
    "combine/weights_shape": (lambda: ops.combine(y, sp, inv, w.t()),
                              (ValueError, r"combine: weights must have the shape of inverse \[3, 2\], got \[2, 3\]")),
    "combine/positions_out_of_range": (lambda: ops.combine(y, sp, torch.tensor([[0, 10**12], [-9, 1], [5, 6]]), None),
                                       ("returns", lambda out: torch.equal(out[0], y[0]) and torch.equal(out[1], y[1])
                                        and torch.equal(out[2], y[5]))),
    "combine/int32_inverse": (lambda: ops.combine(y, sp, inv.int(), None),
                              (TypeError, r"inverse must be int64, got Int")),
    "combine/inverse_on_meta": (lambda: ops.combine(y, sp, inv.to("meta"), None),
                                (ValueError, r"combine: inverse must be on y_sorted's device cpu, got meta")),
    "combine/weights_on_meta": (lambda: ops.combine(y, sp, inv, w.to("meta")),
                                (ValueError, r"combine: weights must be on y_sorted's device cpu, got meta")),
    # pair_dot(a [T, d], b_sorted [P, d], sorted_pairs [P], inverse [T, k])
    "pair_dot/dtype_mismatch": (lambda: ops.pair_dot(x.double(), y, sp, inv),
                                (TypeError, r"pair_dot: a \(Double\) and b_sorted \(Float\) must share a dtype")),
    "pair_dot/a_none": (lambda: ops.pair_dot(None, y, sp, inv),
                        (TypeError, r"pair_dot: a must be a tensor, got None")),
    "pair_dot/all_tensors_none": (lambda: ops.pair_dot(None, None, None, None),
                                  (TypeError, r"pair_dot: b_sorted must be a tensor, got None")),
    "pair_dot/b_sorted_none": (lambda: ops.pair_dot(x, None, sp, inv),
                               (TypeError, r"pair_dot: b_sorted must be a tensor, got None")),
    "pair_dot/a_shape": (lambda: ops.pair_dot(torch.randn(3, 5), y, sp, inv),
                         (ValueError, r"pair_dot: a must have shape \[T, d\] = \[3, 4\], got \[3, 5\]")),
    "pair_dot/1d_a": (lambda: ops.pair_dot(torch.randn(4), y, sp, inv),
                      (ValueError, r"pair_dot: a must be 2-D, got shape \[4\]")),
    "pair_dot/1d_b_sorted": (lambda: ops.pair_dot(x, torch.randn(6), sp, inv),
                             (ValueError, r"pair_dot: b_sorted must be 2-D, got shape \[6\]")),
    "pair_dot/rows_mismatch": (lambda: ops.pair_dot(x, torch.randn(5, 4), sp, inv),
                               (ValueError, r"pair_dot: b_sorted has 5 rows but sorted_pairs has 6 entries")),
    "pair_dot/positions_out_of_range": (lambda: ops.pair_dot(x, y, sp, torch.tensor([[0, 10**12], [-3, 1], [2, 3]])),
                                        ("returns",
                                         lambda out: out.shape == (3, 2) and out[0, 1] == 0 and out[1, 0] == 0)),
    "pair_dot/a_rows": (lambda: ops.pair_dot(torch.randn(2, 4), y, sp, inv),
                        (ValueError, r"pair_dot: a must have shape \[T, d\] = \[3, 4\], got \[2, 4\]")),
    # A position equal to b_sorted's row count is out of range too: 0, the row after b_sorted is not read.
    "pair_dot/position_equal_to_rows": (lambda: ops.pair_dot(torch.ones(3, 4), _past[:6], sp,
                                                             torch.tensor([[0, 6], [1, 2], [3, 4]])),
                                        ("returns", lambda out: out.tolist() == [[4.0, 0.0], [4.0, 4.0], [4.0, 4.0]])),
    "pair_dot/a_on_meta": (lambda: ops.pair_dot(x.to("meta"), y, sp, inv),
                           (ValueError, r"pair_dot: a must be on b_sorted's device cpu, got meta")),
    "pair_dot/b_sorted_on_meta": (lambda: ops.pair_dot(x, y.to("meta"), sp.to("meta"), inv.to("meta")),
                                  (ValueError, r"pair_dot: a must be on b_sorted's device meta, got cpu")),
}


# The same checks on the CUDA kernels' entry points (GPU machines with a CUDA build only).
if torch.cuda.is_available() and moelora.ops.native.has_cuda_kernels():
    cx, csp, cinv, cw, cy = (t.cuda() for t in (x, sp, inv, w, y))
    CASES.update({
        "cuda/router_topk/top_k_above_E": (lambda: ops.router_topk(torch.randn(3, 4, device="cuda"), 5, 0, False),
                                           (ValueError, r"top_k must be in \[1, E = 4\], got 5")),
        "cuda/router_topk/int_logits": (lambda: ops.router_topk(torch.ones(3, 4, dtype=torch.int32, device="cuda"), 2,
                                                                0, False),
                                        (TypeError, r"logits must be float16, bfloat16, float32 or float64, got Int")),
        "cuda/dispatch_metadata/block_size_int64_max": (
            lambda: ops.dispatch_metadata(_ids(4, 1).cuda(), 1, 2**63 - 1),
            (ValueError, r"block_size must be in \[0, 65536\] .*got 9223372036854775807")),
        "cuda/dispatch_metadata/block_size_2_52_many_experts": (
            lambda: ops.dispatch_metadata(_ids(4, 1).cuda(), 4096, 2**52), (ValueError, r"got 4503599627370496")),
        "cuda/dispatch/1d_x": (lambda: ops.dispatch(torch.randn(3, device="cuda"), csp, cinv, None),
                               (ValueError, r"dispatch: x must be 2-D, got shape \[3\]")),
        "cuda/combine/rows_mismatch": (lambda: ops.combine(torch.randn(5, 4, device="cuda"), csp, cinv, None),
                                       (ValueError, r"combine: y_sorted has 5 rows but sorted_pairs has 6 entries")),
        "cuda/pair_dot/dtype_mismatch": (lambda: ops.pair_dot(cx.double(), cy, csp, cinv),
                                         (TypeError, r"pair_dot: a \(Double\) and b_sorted \(Float\) must share a "
                                                     r"dtype")),
        "cuda/dispatch/pairs_out_of_range": (
            lambda: ops.dispatch(cx, torch.tensor([0, 10**12, -5, 6, 5], device="cuda"), cinv, cw).cpu(),
            ("returns", lambda out: out.shape == (5, 4) and bool((out[1:4] == 0).all()))),
        "cuda/combine/positions_out_of_range": (
            lambda: ops.combine(cy, csp, torch.tensor([[0, 10**12], [-9, 1], [5, 6]], device="cuda"), None).cpu(),
            ("returns", lambda out: torch.equal(out[2], y[5]))),
    })


def _segfault():
    os.kill(os.getpid(), signal.SIGSEGV)


# Cases of the harness itself (tests/test_bad_inputs.py checks that a crash fails one case).
HARNESS_CASES = {"harness/before": lambda: 1, "harness/crash": _segfault, "harness/after": lambda: 1}


def run_case(name: str) -> dict:
    if name in HARNESS_CASES:
        return outcome_of(HARNESS_CASES[name])
    call, expected = CASES[name]
    return outcome_of(call, expected[1] if expected[0] == "returns" else None)
