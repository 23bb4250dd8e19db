"""Transform: a module's own width attributes set to the compact width where its forward needs them (``adapt_forwards``).

Invariant: an attribute is changed only where the compact module fails or computes something else without it, and
kept only when the module then computes what the masked one did (its per-head outputs aside); every change is
recorded in the module's ``__dict__[WIDTH_ATTRS]`` (saved with the counts, set again at load).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .counts import WIDTH_ATTRS
from .verify import _tensors, relative_error

__all__ = ["rewrite_widths", "same_but_heads", "undo_widths"]


def rewrite_widths(module: nn.Module, width: tuple[int, int], heads: tuple[int, int]) -> list[tuple[nn.Module, str, Any]]:
    """In ``module`` and its submodules (linears aside): set every plain ``int`` attribute equal to the heads' original
    width (``width``: original, compact; heads x head_dim) to the compact one, and in every tuple of ints (a shape kept
    as an attribute, timm's ``bias_shape``) the original head count (``heads``: original, kept) to the kept one.
    Each change is recorded in its module's ``__dict__[WIDTH_ATTRS]`` (saved with the counts, set again at load).
    For sizes kept under names the count table cannot claim in general (GPTBigCode's ``embed_dim``, read to split its
    fused q/k/v, is the residual width in most modules), so it is tried only where the compact module fails without
    it, and kept only when the module then computes what the masked one did. Returns (module, attr, old value)."""
    changed = []
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            continue
        for a, v in list(sub.__dict__.items()):
            if a.startswith("_"):
                continue
            if type(v) is int and v == width[0]:
                new: Any = width[1]
            elif isinstance(v, tuple) and v and all(type(x) is int for x in v) and heads[0] in v:
                new = tuple(heads[1] if x == heads[0] else x for x in v)
            else:
                continue
            setattr(sub, a, new)
            sub.__dict__.setdefault(WIDTH_ATTRS, {})[a] = new
            changed.append((sub, a, v))
    return changed


def same_but_heads(ref: Any, out: Any, heads: tuple[int, int]) -> float:
    """``relative_error`` of the outputs, where a per-head output (attention probabilities returned beside the
    attention output: ``h0`` heads in the masked module, ``h1`` in the compact one) is left out; the first output,
    the one the model goes on with, must match. ``compact``'s whole-model check still runs after."""
    xs, ys = _tensors(ref), _tensors(out)
    if not xs or len(xs) != len(ys) or xs[0].shape != ys[0].shape:
        return float("inf")
    pairs = []
    for x, y in zip(xs, ys):
        if x.shape == y.shape:
            pairs.append((x, y))
        elif x.dim() != y.dim() or [(a, b) for a, b in zip(x.shape, y.shape) if a != b] != [heads]:
            return float("inf")
    return relative_error([x for x, _ in pairs], [y for _, y in pairs])


def undo_widths(changed: list[tuple[nn.Module, str, Any]]) -> None:
    for sub, a, old in changed:
        setattr(sub, a, old)
        sub.__dict__.get(WIDTH_ATTRS, {}).pop(a, None)
