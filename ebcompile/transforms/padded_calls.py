"""Calls a compact forward was not traced for, run at the original width (``transforms.reshapes``,
``transforms.trace_values``): ``padding_of`` records, at compact, which tensors of a module were cut and the integer
attributes that changed; ``run_padded`` runs the module's own class forward with those tensors zero-padded back from
the live compact weights (differentiably) and the attributes set back for the call.

Invariant: a padded call computes what the masked module computed for the same call (``reshapes`` checks it on the
example before installing a rewrite that can fall back to it). Once PEFT adapters are merged (``merge_and_unload``) a
recorded base-layer tensor is found at its tuner layer's path and an adapter's own tensors are skipped; anything else
missing raises.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

__all__ = ["PADDED_WARNED", "padding_of", "run_padded"]

PADDED_WARNED = "_ebcompile_padded_warned"


def padding_of(original: nn.Module, compact: nn.Module, removed: dict[str, dict[int, list[int]]]) -> dict[str, Any]:
    """What ``run_padded`` needs (JSON): per cut tensor of the module (``removed``: relative name -> dim -> removed
    indices) its original size and kept indices per dim, and every int attribute the compaction changed. Columns
    cut because an input from outside the module is narrower (an encoder's cut projection) are not padded."""
    weights = {}
    made = {tuple(dims[0]) for dims in removed.values() if 0 in dims}  # features the module's own linears produce
    for name, dims in removed.items():
        sizes = _tensor(original, name).shape
        inner = {d: idx for d, idx in dims.items() if d == 0 or tuple(idx) in made}  # columns read from outside stay cut
        weights[name] = [[int(d), int(sizes[d]), sorted(set(range(sizes[d])) - set(idx))] for d, idx in sorted(inner.items())]
    attrs = {}
    for path, sub in original.named_modules():
        try:
            small = compact.get_submodule(path)
        except AttributeError:  # a mask's parametrization: gone from the compact module
            continue
        for a, v in sub.__dict__.items():
            if type(v) is int and not a.startswith("_") and type(small.__dict__.get(a)) is int and small.__dict__[a] != v:
                attrs[f"{path}.{a}" if path else a] = v
    return {"weights": weights, "attrs": attrs}


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    return functools.reduce(getattr, name.split("."), module)


def _has_module(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _merged(path: str) -> str:
    """``path`` once PEFT adapters are merged (``merge_and_unload``): the base layer sits at its tuner layer's path."""
    return ".".join(p for p in path.split(".") if p != "base_layer")


def _adapter_part(path: str) -> bool:
    """Whether ``path`` names a PEFT adapter's own module or tensor (gone once merged)."""
    return any(p.startswith("lora_") for p in path.split("."))


def _live_name(module: nn.Module, name: str) -> str | None:
    """Where tensor ``name`` (recorded at compact) is now: at the same path, at its merged path, or gone with its
    adapter (None). Anything else missing raises."""
    for candidate in dict.fromkeys((name, _merged(name))):
        try:
            _tensor(module, candidate)
            return candidate
        except AttributeError:
            continue
    if _adapter_part(name):
        return None
    _tensor(module, name)  # raises, naming it
    return None


def run_padded(module: nn.Module, fallback: dict[str, Any], args: tuple, kwargs: dict) -> Any:
    """``module``'s own forward at its original width: its cut tensors zero-padded back (differentiably, from the
    live compact weights) and its changed attributes set to the original values for the call."""
    params = {}
    for recorded, entries in fallback["weights"].items():
        name = _live_name(module, recorded)
        if name is None:
            continue
        t = _tensor(module, name)
        for dim, size, kept in entries:
            shape = list(t.shape)
            shape[dim] = size
            t = t.new_zeros(shape).index_copy(dim, torch.tensor(kept, device=t.device), t)
        params[name] = t
    saved = []
    for path, value in fallback["attrs"].items():
        owner, _, attr = path.rpartition(".")
        holder = next((module.get_submodule(p) for p in dict.fromkeys((owner, _merged(owner))) if _has_module(module, p)), None)
        if holder is None and _adapter_part(owner):  # an adapter merged away
            continue
        if holder is None:
            holder = module.get_submodule(owner)  # raises, naming it
        saved.append((holder, attr, holder.__dict__[attr]))
        holder.__dict__[attr] = value
    if not module.__dict__.get(PADDED_WARNED):
        module.__dict__[PADDED_WARNED] = True
        warnings.warn(f"{type(module).__name__} was called unlike the example its compact forward was traced on (a KV "
                      "cache, another flag): it runs its own code at the original width for such calls (the same outputs, "
                      "not faster)", UserWarning, stacklevel=4)
    try:  # the class's forward itself: the module's hooks already ran for this call
        with _reparametrize_module(module, params):
            return type(module).forward(module, *args, **kwargs)
    finally:
        for holder, attr, value in saved:
            holder.__dict__[attr] = value
