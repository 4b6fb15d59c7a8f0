"""``python -m benchmarks --profile S1/layer/fwdbwd/moelora-MoELoRALinear``: the per-kernel
device-time table of a case (torch.profiler), plus its median time, host enqueue time and
kernels per iteration. The case id is shape/group/pass/implementation as in the results JSON
(group: delta, layer or ffn; pass: fwd, bwd, fwdbwd, or decode for the layer group, e.g.
S1@T8/layer/decode/moelora-MoELoRALinear; a shape S1@T<n> is S1 at n tokens); several
comma-separated ids profile each in turn. Each table is printed and written to
``profile-<shape>-<group>-<pass>-<impl>.txt`` under --out-dir.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import traceback
from pathlib import Path

import torch

import moelora

from . import impls
from .inputs import make_sets
from .runner import DECODE_PASS, PASSES, _steps, prepare_sets
from .shapes import decode_shape
from .timing import summarize, time_eager, time_iterations


def profile_file_name(case_id: str) -> str:
    """``profile-<shape>-<group>-<pass>-<impl>.txt`` for a case id: only letters, digits, '-', '_' and '.'
    (a decode id's '@' becomes '-'), names that every file transfer keeps."""
    return "profile-" + re.sub(r"[^A-Za-z0-9_.-]", "-", case_id) + ".txt"


def run(case_ids: str, shapes: dict, dtype: torch.dtype, device: torch.device, out_dir: Path,
        iterations: int = 10) -> int:
    """Profile each of the comma-separated ``case_ids``; 0 when all ran, else 2 (every case is tried: one
    that fails prints why on stderr, as a bad id does, and the next is profiled)."""
    codes = []
    for case_id in case_ids.split(","):
        try:
            codes.append(run_case(case_id, shapes, dtype, device, out_dir, iterations))
        except Exception:  # a case that fails to run (an error of its implementation, out of memory)
            print(f"{case_id} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            codes.append(2)
    return max(codes)


def run_case(case_id: str, shapes: dict, dtype: torch.dtype, device: torch.device, out_dir: Path,
             iterations: int = 10) -> int:
    try:
        shape_name, group, pass_name, impl_name = case_id.split("/")
        base, _, tokens = shape_name.partition("@T")
        shape, impl = shapes[base], impls.by_name(impl_name)
        if pass_name not in PASSES + (DECODE_PASS,) or (tokens and int(tokens) < 1):
            raise ValueError(case_id)
        if pass_name == DECODE_PASS:
            shape = decode_shape(shape, int(tokens) if tokens else shape.tokens)
        elif tokens:
            shape = dataclasses.replace(shape.with_tokens(int(tokens)), layer=shape.layer)
    except (ValueError, KeyError):
        print(f"--profile wants shape/group/pass/implementation, e.g. S1/layer/fwdbwd/moelora-MoELoRALinear; "
              f"shapes {sorted(shapes)} (or <shape>@T<tokens>, a positive token count), "
              f"passes {', '.join(PASSES + (DECODE_PASS,))}, "
              f"implementations {[i.name for i in impls.DELTA + impls.LAYER + impls.FFN]}", file=sys.stderr)
        return 2
    if impl.group != group:
        print(f"{impl_name} belongs to the {impl.group} group, not {group}", file=sys.stderr)
        return 2
    if pass_name == DECODE_PASS and group != "layer":
        print(f"{case_id}: the decode pass times the layer group only (e.g. S1@T8/layer/decode/moelora-MoELoRALinear)",
              file=sys.stderr)
        return 2
    reason = impl.probe(shape, device)
    if reason is not None:
        print(f"{case_id} cannot run here: {reason}", file=sys.stderr)
        return 2
    with moelora.validation(False):
        sets = make_sets(shape, dtype, device, 2)
        prepared = prepare_sets(impl, shape, sets, [pass_name])
        step, keep = _steps(pass_name, prepared, sets)
        time_iterations(step, 3, device)
        times, host = time_eager(step, iterations, device, start=3)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(iterations):
                step(i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        del keep
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    head = (f"{case_id} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
            f"{str(dtype).replace('torch.', '')}: median {summarize(times)['median_ms']:.4f} ms, host enqueue "
            f"{summarize(host)['median_ms']:.4f} ms, {kernels / iterations:.1f} device kernels per iteration "
            f"({iterations} iterations profiled; times are totals over them)")
    text = head + "\n" + prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / profile_file_name(case_id)
    path.write_text(text)
    print(f"written to {path}")
    return 0
