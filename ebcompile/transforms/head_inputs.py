"""Transform: a compact attention module slices the per-head tensors it receives from outside to its kept heads.

``analysis.head_inputs`` found, for an attention module whose scores meet a per-head tensor made outside it (BLOOM's
and MPT's ALiBi), the forward argument that carries it, the dimension (from the end) and the head of each position
along it (one period; a batch folded in front repeats it). After compaction the module keeps only some heads while
the model still builds the tensor for all of them: a forward pre-hook selects the kept positions of every period.

Invariant: with the hook, the compact module computes what the masked one did (``compact`` checks it); the hook's
data (``ATTR`` on the module: JSON-able) is saved with the model and the hook installed again on load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..plan import GroupSet

__all__ = ["ATTR", "slices_for", "install", "head_input_slices"]

ATTR = "_ebcompile_head_inputs"


def slices_for(group: GroupSet, keep: torch.Tensor) -> list[dict[str, Any]]:
    """The slices of ``group``'s per-head inputs for its kept units (empty when every head is kept)."""
    if bool(keep.all()):
        return []
    return [{"arg": h.arg, "dim": h.dim, "period": len(h.heads),
             "keep": [p for p, unit in enumerate(h.heads) if bool(keep[unit])]} for h in group.head_inputs]


def install(module: nn.Module, slices: list[dict[str, Any]]) -> None:
    """Slice ``module``'s per-head inputs before every forward (replacing slices installed before)."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _slice_inputs:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    if slices:
        module.__dict__[ATTR] = [dict(s) for s in slices]
        module.register_forward_pre_hook(_slice_inputs, with_kwargs=True)
    else:
        module.__dict__.pop(ATTR, None)


def head_input_slices(model: nn.Module) -> dict[str, list[dict[str, Any]]]:
    """Module path -> its slices, for every module that has some."""
    return {path: m.__dict__[ATTR] for path, m in model.named_modules() if m.__dict__.get(ATTR)}


def _slice_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args = list(args)
    for s in module.__dict__.get(ATTR, ()):
        kind, _, key = s["arg"].partition(":")
        holder, index = (args, int(key)) if kind == "arg" else (kwargs, key)
        present = index < len(holder) if kind == "arg" else index in holder
        value = holder[index] if present else None
        if isinstance(value, torch.Tensor):
            holder[index] = _select(value, s["dim"], s["period"], s["keep"])
    return tuple(args), kwargs


def _select(t: torch.Tensor, dim: int, period: int, keep: list[int]) -> torch.Tensor:
    d = dim % t.dim()
    index = torch.tensor(keep, dtype=torch.long, device=t.device)
    folded = t.unflatten(d, (-1, period)).index_select(d + 1, index)
    return folded.flatten(d, d + 1)
