"""Memory measures of one case: peak allocation and activations saved for backward.

Peak: ``torch.cuda.max_memory_allocated`` over one call, minus what was allocated before
it (so it counts what the call itself adds: outputs, saved activations, workspaces,
gradients). Saved: the bytes of the distinct storages that autograd packs during the
forward (``torch.autograd.graph.saved_tensors_hooks``), leaving out storages that belong
to the case's inputs and parameters (they exist anyway); views of them are left out too.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # tensors without storage (e.g. some subclasses)
        return None


def saved_activation_bytes(forward: Callable[[], torch.Tensor], known: Iterable[torch.Tensor]) -> dict:
    """Run ``forward`` once under saved-tensor hooks; sum the new storages it saves."""
    known_keys = {_storage_key(t) for t in known if isinstance(t, torch.Tensor)}
    seen = {}
    excluded = 0

    def pack(t):
        nonlocal excluded
        key = _storage_key(t)
        if key is None or key in known_keys:
            excluded += 1
        elif key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return {"saved_bytes": sum(seen.values()), "saved_tensors": len(seen), "saved_inputs_excluded": excluded}


def peak_bytes(call: Callable[[], object], device: torch.device) -> int | None:
    """Extra peak memory of one ``call`` on CUDA (None elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak
