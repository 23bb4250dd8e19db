"""Label handlers for reductions and normalisations: sums and means, softmax and scans along a dim, layer / RMS /
batch norms (``analysis.structure``). Positions combined by one of them must be one unit. Registered into
``ophandlers.HANDLERS`` on import."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import fx

from .labels import Labels, aligned
from .op_names import SOFTMAXES
from .ophandlers import Flow, _norm_dim, _out, handler, pointwise, shape

__all__ = ["reduce_dims", "schema_arg"]


def reduce_dims(flow: Flow, x: Any, dims: list[int], keepdim: bool, why: str, out_ndim: int | None = None):
    lab = flow.lab(x)
    if not isinstance(lab, Labels):
        return None
    ids = lab.ids
    nd = ids.ndim
    dims = sorted({_norm_dim(d, nd) for d in dims})
    if any(ids.shape[d] > 1 for d in dims):
        moved = np.moveaxis(ids, dims, list(range(nd - len(dims), nd)))
        flat = moved.reshape(moved.shape[: nd - len(dims)] + (-1,))
        for row in flat.reshape(-1, flat.shape[-1]):
            flow.el.same_unit.append((row.copy(), why))
    out = np.take(ids, [0], axis=dims[0]) if dims else ids
    for d in dims[1:]:
        out = np.take(out, [0], axis=d)
    if not keepdim:
        out = np.squeeze(out, axis=tuple(dims))
    return _out(out, lab.param)


def schema_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """The argument called ``name`` in the aten op's schema, wherever it was passed (``linalg_vector_norm`` and
    ``norm`` take ``ord``/``p`` before ``dim``)."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return default
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            return node.args[i] if i < len(node.args) else default
    return default


@handler("mean", "sum", "amax", "amin", "var", "std", "logsumexp", "norm", "linalg_vector_norm", "var_mean", "prod")
def _reduce(flow: Flow, node: fx.Node):
    x = node.args[0]
    s = shape(x)
    if s is None:
        return None
    dims = schema_arg(node, "dim")
    if dims is None or dims == []:
        dims = list(range(len(s)))
    dims = [dims] if isinstance(dims, int) else list(dims)
    keep = bool(schema_arg(node, "keepdim", False))
    out = reduce_dims(flow, x, dims, keep, f"its features are reduced by {node.target._opname} across units")
    return [out, out] if node.target._opname == "var_mean" else out


@handler("max", "min")
def _max_min(flow: Flow, node: fx.Node):
    """``max(x, dim)`` -> (values, indices), reduced like ``amax`` (Hiera's query pooling over window positions);
    ``max(x)`` over everything; ``max(x, other)`` position by position."""
    overload = node.target._overloadname
    if overload == "other":
        return pointwise(flow, node)
    out = _reduce(flow, node)
    return [out, out] if overload.endswith("dim") else out


@handler(*SOFTMAXES, "log_softmax", "_log_softmax", "cumsum", "cumprod", "logcumsumexp")
def _softmax(flow: Flow, node: fx.Node):
    """Every output position reads all positions along ``dim`` (a softmax, or a scan: a Mamba-2 chunk's cumsum over
    time): those must be one unit; the labels stay where they were."""
    lab = flow.lab(node.args[0])
    if not isinstance(lab, Labels):
        return None
    reduce_dims(flow, node.args[0], [node.args[1]], True, f"its features are combined by {node.target._opname} across units")
    return lab


@handler("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(flow: Flow, node: fx.Node):
    x, normalized = node.args[0], node.args[1]
    lab = flow.lab(x)
    if not isinstance(lab, Labels):
        return None
    nd = len(shape(x))
    reduce_dims(flow, x, list(range(nd - len(normalized), nd)), True, "its features are normalised by a norm layer across units")
    out = Labels(lab.ids)
    return [out, None, None] if node.target._opname in ("native_layer_norm", "_fused_rms_norm") else out


_BATCH_NORM_OUTPUTS = {"batch_norm": 1, "native_batch_norm": 3, "_native_batch_norm_legit": 3,
                       "_native_batch_norm_legit_no_training": 3, "_native_batch_norm_legit_functional": 5}


@handler(*_BATCH_NORM_OUTPUTS)
def _batch_norm(flow: Flow, node: fx.Node):
    """Per-channel (dim 1) statistics and affine: the channels stay independent units and the norm's weight, bias
    and running statistics follow them; positions normalised together (the other dims) must be one unit."""
    x = node.args[0]
    lab, s = flow.lab(x), shape(x)
    if not isinstance(lab, Labels) or lab.param or s is None:
        return None
    ids = aligned(lab.ids, len(s))
    if len(s) < 2 or ids.shape[1] != s[1]:  # channels unlabelled, features elsewhere: all mixed by the statistics
        flow.forbid(x, "its features are normalised together by a batch norm")
        return None
    rows = np.moveaxis(ids, 1, 0).reshape(s[1], -1)  # per channel: every position its statistics cover
    if rows.shape[1] > 1:
        for row in rows:
            flow.el.same_unit.append((row.copy(), "its features are normalised together by a batch norm"))
    for vector in node.args[1:5]:  # weight, bias, running mean, running var: one entry per channel
        v = flow.lab(vector)
        v = v if v is not None else flow.buffer_labels(vector, s[1])
        if isinstance(v, Labels) and v.param and v.ids.size == s[1]:
            flow.el.union(rows[:, 0], v.ids.reshape(-1))
    out = Labels(lab.ids)
    n = _BATCH_NORM_OUTPUTS[node.target._opname]
    return out if n == 1 else [out] + [None] * (n - 1)
