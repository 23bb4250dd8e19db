"""Analysis: per-head tensors an attention layer receives from outside (ALiBi in BLOOM and MPT) — sliced, not kept.

A bias added to the attention scores that differs per head but is made outside the layer (BLOOM builds its ALiBi
tensor ``[batch * heads, 1, keys]`` once in the model's forward and hands it to every layer) cannot be sliced where
it is made: each layer keeps its own heads. It can be sliced where it enters the layer. ``record_bias`` (called by
the attention handlers and by ``pointwise`` for an addend to the scores) finds the tensor that crosses into the
attention module and the dimension along which it varies with the heads, and records which head each position
along that dimension belongs to; ``resolve`` turns those positions into the group's unit indices once the heads are
units (a period of one position per head, repeated for a batch dimension folded in front); ``bind_arguments``
finds, in one eager run, the argument of the module's forward that carries the tensor. Anything that does not
resolve exactly (two varying dimensions, a position that is no single head, a shape no argument has) keeps the
heads whole, as before. ``transforms.head_inputs`` slices the argument in the compact model.

Invariant: a head group carries ``HeadInput``s only when every per-head tensor its scores meet from outside the
module is one of them; masking needs nothing (a masked head's q and k are zero, its output stays zero).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..names import split_name
from ..plan import GroupSet, HeadInput
from .labels import aligned, varying
from .ophandlers import Flow, aten_name, handler, module_of, pointwise, shape

__all__ = ["record_bias", "resolve", "bind_arguments"]

_PASS = ("expand", "_to_copy", "to", "clone", "contiguous", "alias", "type_as", "slice", "detach")
WHY = "its heads meet a per-head bias made outside the layer, which the analysis cannot slice (ALiBi, a shared bias)"


@dataclasses.dataclass
class Candidate:
    module: str  # the attention module the tensor enters
    node: fx.Node  # the tensor as it enters (made outside ``module``)
    dim: int  # its per-head dimension, counted from the end
    elements: np.ndarray  # the scores' elements at each position along that dimension


def record_bias(flow: Flow, scores: np.ndarray, bias: Any, attention: fx.Node) -> bool:
    """Record ``bias`` (added to ``scores``, their element ids) as a per-head input of ``attention``'s module when it
    comes from outside that module and varies with the heads along exactly one dimension; False if it cannot be."""
    where = module_of(attention)
    if where is None or not isinstance(bias, fx.Node):
        return False
    node = bias
    while aten_name(node) in _PASS and isinstance(node.args[0], fx.Node) and _inside(module_of(node), where):
        if aten_name(node) == "slice" and shape(node) is not None and shape(node.args[0]) is not None \
                and len(shape(node)) != len(shape(node.args[0])):
            return False
        node = node.args[0]
    if _inside(module_of(node), where) and node.op != "placeholder":
        return False  # made inside the layer: not an argument of its forward
    s, nd = shape(node), scores.ndim
    if s is None or len(s) > nd:
        return False
    ids = aligned(np.asarray(scores), nd)
    dims = [d for d in varying(ids) if d - nd + len(s) >= 0 and s[d - nd + len(s)] > 1]  # aligned from the right
    if len(dims) != 1 or s[dims[0] - nd + len(s)] != ids.shape[dims[0]]:
        return False
    d = dims[0]
    along = np.moveaxis(ids, d, 0).reshape(ids.shape[d], -1)[:, 0]
    flow.head_inputs.append(Candidate(where, node, d - nd, along.copy()))
    return True


@handler("add", "sub")
def _add(flow: Flow, node: fx.Node):
    """A pointwise op; an unlabelled addend to attention scores that varies with the heads is tried as a per-head
    input (``scores_bias``) before it is taken for data of its own."""
    return pointwise(flow, node, scores_bias=_scores_bias)


def _scores_bias(flow: Flow, ids: np.ndarray, bias: fx.Node, node: fx.Node) -> bool:
    live = ids[ids >= 0]
    if live.size == 0 or not all(int(e) in flow.el.attention for e in np.unique(live)[:64]):
        return False  # not attention scores (elements that went through q @ k^T)
    return record_bias(flow, ids, bias, node)


def _inside(path: str | None, module: str) -> bool:
    return path is not None and (path == module or path.startswith(module + ".") or module == "")


def resolve(flow: Flow, groups: list[GroupSet], unit_of: dict[int, tuple[int, int]]) -> tuple[list[GroupSet], dict[str, str]]:
    """Attach every recorded candidate to its head group as a ``HeadInput`` (unit per position, one period); a group
    with a candidate that does not resolve loses its heads (returned with why, keyed by its module)."""
    el = flow.el
    found: dict[int, list[HeadInput]] = {}
    failed: set[int] = set()
    for c in flow.head_inputs:
        hits = [unit_of.get(el.find(int(e))) if e >= 0 else None for e in c.elements]
        index = {h[0] for h in hits if h is not None}
        if len(index) != 1 or any(h is None for h in hits):
            failed |= index
            continue
        g = index.pop()
        heads = [h[1] for h in hits]
        period = _period(heads, groups[g].units)
        if period is None or groups[g].module != c.module:
            failed.add(g)
            continue
        found.setdefault(g, []).append(HeadInput(c.node.name, tuple(shape(c.node) or ()), c.dim, tuple(heads[:period])))
    out, why = [], {}
    for i, g in enumerate(groups):
        if i in failed:
            why.update(_said(g))
            continue
        out.append(dataclasses.replace(g, head_inputs=tuple(found[i])) if i in found else g)
    return out, why


def _period(heads: list[int], units: int) -> int | None:
    """The length of the shortest repeating run of unit indices holding every unit equally often (a KV group's
    query heads are one unit), or None."""
    for period in range(units, len(heads) + 1, units):
        run = heads[:period]
        if len(heads) % period == 0 and sorted(run) == sorted(list(range(units)) * (period // units)) \
                and all(h == run[i % period] for i, h in enumerate(heads)):
            return period
    return None


def bind_arguments(model: nn.Module, groups: list[GroupSet], args: tuple, kwargs: dict
                   ) -> tuple[list[GroupSet], dict[str, str]]:
    """Name, for every ``HeadInput``, the argument of its module's forward that carries it (the one tensor argument
    of its shape in an eager run); a group with one no argument carries loses its heads."""
    wanted = {g.module for g in groups if g.head_inputs}
    if not wanted:
        return groups, {}
    seen: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for path in wanted:
        def pre(_m: nn.Module, a: tuple, kw: dict, path: str = path) -> None:
            seen.setdefault(path, (a, kw))

        handles.append(model.get_submodule(path).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    out, why = [], {}
    for g in groups:
        if not g.head_inputs:
            out.append(g)
            continue
        a, kw = seen.get(g.module, ((), {}))
        named = [(f"arg:{i}", v) for i, v in enumerate(a)] + [(f"kwarg:{k}", v) for k, v in kw.items()]
        bound = []
        for h in g.head_inputs:
            keys = [k for k, v in named if isinstance(v, torch.Tensor) and tuple(v.shape) == h.shape]
            if len(keys) != 1:
                break
            bound.append(dataclasses.replace(h, arg=keys[0]))
        if len(bound) == len(g.head_inputs):
            out.append(dataclasses.replace(g, head_inputs=tuple(bound)))
        else:
            why.update(_said(g))
    return out, why


def _said(group: GroupSet) -> dict[str, str]:
    """Why ``group``'s heads are kept whole, keyed by each of its masked linears."""
    return {split_name(m.tensor)[0]: f"no heads or neurons: {WHY}" for m in group.members if m.masked}
