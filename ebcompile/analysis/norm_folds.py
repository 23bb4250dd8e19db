"""RMS norms across units (OLMo-2's ``q_norm`` over every head's channels of ``q_proj``): heads stay units.

A root-mean-square norm whose statistics span several units would join them into one (removing a head changes the
mean of squares the others are divided by). But in the masked model a pruned unit's channels are zero and add
nothing to the sum of squares; only the divisor, the full width ``N``, differs from a compact norm over ``N'``
channels. Scaling the producing linear's rows by ``c = sqrt(N'/N)`` and dividing the norm's weight by ``c`` makes the
compact norm compute exactly what the masked one did (``transforms.norm_scale``). This module finds where that holds:

- the statistic is ``mean(x ** 2)`` over the last dim (keepdim), where ``x`` is, through casts and views only, the
  whole output of one masked ``linear`` whose every reader lies inside the norm's module;
- that module multiplies by a 1-D parameter of ``N`` entries (its weight), which then follows the units.

Anything else keeps the rule of every norm: the units the statistic spans become one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx

from .labels import Labels
from .ophandlers import HANDLERS, Flow, aten_name, handler, module_of, shape
from .ops_reduce import reduce_dims, schema_arg

__all__ = ["NormFold", "rms_candidate", "settle_rms_candidates"]

_plain_reduction = HANDLERS["mean"]

_PASSTHROUGH = {"to", "_to_copy", "view", "reshape", "_unsafe_view", "clone", "contiguous", "alias", "type_as"}
_WHY = "its features are normalised by a norm layer across units"


@dataclass(frozen=True)
class NormFold:
    """``producer`` (and ``bias``) feed an RMS norm of ``width`` channels whose weight is ``norm_weight``."""

    producer: str
    bias: str | None
    norm_weight: str
    width: int


def rms_candidate(flow: Flow, node: fx.Node, x: Any, dims: list[int], keepdim: bool) -> bool:
    """Whether ``node`` (a mean) is the statistic of an RMS norm over labelled features; if so it is kept for
    ``settle_rms_candidates`` and its output carries no labels (a per-position scalar)."""
    if not (keepdim and isinstance(x, fx.Node) and aten_name(x) in ("pow", "mul")):
        return False
    y = x.args[0]
    square = (x.args[1] == 2) if aten_name(x) == "pow" else (len(x.args) > 1 and x.args[1] is y)
    s = shape(y)
    lab = flow.lab(y)
    if not square or s is None or not isinstance(lab, Labels) or lab.param or [d % len(s) for d in dims] != [len(s) - 1]:
        return False
    if lab.ids.shape[-1] < 2 or any(n > 1 for n in lab.ids.shape[:-1]):  # per-head statistics: not across units
        return False
    flow.rms_candidates.append((node, y, dims))
    return True


@handler("mean")
def _mean(flow: Flow, node: fx.Node):
    """A mean of squares over labelled features is an RMS norm's statistic (a candidate); any other mean reduces."""
    dims = schema_arg(node, "dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if dims and rms_candidate(flow, node, node.args[0], dims, bool(schema_arg(node, "keepdim", False))):
        return None
    return _plain_reduction(flow, node)


def _inside(node: fx.Node, path: str) -> bool:
    where = module_of(node)
    return where is not None and (where == path or where.startswith(path + "."))


def _fold(flow: Flow, node: fx.Node, y: fx.Node, params: dict[str, Any]) -> NormFold | None:
    path = module_of(node)
    if not path:
        return None
    width = shape(y)[-1]
    src = y
    while aten_name(src) in _PASSTHROUGH and isinstance(src.args[0], fx.Node) and _inside(src, path):
        src = src.args[0]
    if aten_name(src) != "linear" or shape(src) is None or shape(src)[-1] != width:
        return None
    weight = flow.param_of.get(src.args[1].name) if isinstance(src.args[1], fx.Node) else None
    bias_arg = src.args[2] if len(src.args) > 2 else None
    bias = flow.param_of.get(bias_arg.name) if isinstance(bias_arg, fx.Node) else None
    if weight is None or (bias_arg is not None and bias is None) or not all(_inside(u, path) for u in src.users):
        return None
    norm_weight = None
    for n in node.graph.nodes:
        if aten_name(n) != "mul" or not _inside(n, path):
            continue
        for a in n.args:
            name = flow.param_of.get(a.name) if isinstance(a, fx.Node) else None
            t = params.get(name) if name else None
            if t is not None and t.dim() == 1 and t.numel() == width:
                norm_weight = name
    if norm_weight is None:
        return None
    return NormFold(weight, bias, norm_weight, width)


def settle_rms_candidates(flow: Flow, params: dict[str, Any]) -> list[NormFold]:
    """The candidates that fold; the others join the units their statistic spans, as any norm does."""
    folds = []
    for node, y, dims in flow.rms_candidates:
        fold = _fold(flow, node, y, params)
        if fold is None:  # as any norm: the statistic joins what it spans (its output would have carried them)
            before = len(flow.el.same_unit)
            reduce_dims(flow, y, dims, True, _WHY)
            for row, _ in flow.el.same_unit[before:]:
                flow.el.union(row, row[:1])
        else:
            folds.append(fold)
    return folds
