"""One small handler per aten op: how channel labels flow through it (for ``analysis.structure``).

A handler gets the ``Flow`` (labels so far, the elements, the node's shapes) and the node; it returns the
output's ``Labels`` (or a list of them for ops with several outputs, or None: nothing labelled). An op with a
labelled input and no handler makes those elements unremovable — the analysis never guesses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx

from ..capture.types import param_through_casts
from .labels import Elements, Labels, aligned, compress, varying
from .op_names import ALIASES, aten_name

__all__ = ["HANDLERS", "Flow", "aten_name", "handler"]

aten = torch.ops.aten


class Flow:
    """Per-graph state the handlers read and write."""

    def __init__(self, elements: Elements, param_of: dict[str, str], keep_kv: bool) -> None:
        self.el = elements
        self.param_of = param_of  # node name -> qualified parameter name
        self.labels: dict[fx.Node, Any] = {}
        self.keep_kv = keep_kv  # grouped-query attention: prune query heads inside groups, never KV heads
        self.kv_groups: list[tuple[np.ndarray, np.ndarray]] = []  # (query-head elements, kv-group index)
        self.buffer_of: dict[str, str] = {}  # node name -> qualified buffer name (labelled only by handlers)
        # tensors computed from labelled features by ops the analysis does not follow (a convolution's output): their
        # sizes along those features are fixed, so a compact model cannot cut units that meet them position by position
        self.opaque: set[fx.Node] = set()
        self._from_input: dict[fx.Node, bool] = {}
        self.rms_candidates: list[tuple[fx.Node, fx.Node, list[int]]] = []  # (mean, its squared input, dims)
        self.live: set[fx.Node] = set()  # nodes whose values reach the output (``structure.propagate``)
        self.head_inputs: list[Any] = []  # per-head tensors from outside an attention module (``analysis.head_inputs``)

    def from_input(self, arg: Any) -> bool:
        """Whether ``arg`` depends on the model's inputs (not only on parameters, buffers and constants)."""
        if not isinstance(arg, fx.Node):
            return False
        stack, order = [arg], []
        while stack:  # iterative post-order: graphs are deep
            n = stack.pop()
            if n in self._from_input:
                continue
            pending = [a for a in n.all_input_nodes if a not in self._from_input]
            if pending:
                stack.append(n)
                stack.extend(pending)
                continue
            if n.op == "placeholder":
                self._from_input[n] = n.name not in self.param_of and n.name not in self.buffer_of
            else:
                self._from_input[n] = any(self._from_input[a] for a in n.all_input_nodes)
            order.append(n)
        return self._from_input[arg]

    def lab(self, arg: Any) -> Labels | None:
        return self.labels.get(arg) if isinstance(arg, fx.Node) else None

    def buffer_labels(self, arg: Any, size: int) -> Labels | None:
        """Elements of a 1-D buffer of ``size`` entries (buffers get labels only where a handler knows they follow
        units: a batch norm's statistics, a slice concatenated with labelled parameters)."""
        name = self.buffer_of.get(arg.name) if isinstance(arg, fx.Node) else None
        return Labels(self.el.of(name, 0, size), True) if name is not None and shape(arg) == (size,) else None

    def forbid(self, arg: Any, why: str) -> None:
        lab = self.lab(arg)
        if isinstance(lab, Labels):
            self.el.forbid(lab.ids, why)
        elif isinstance(lab, list):
            for x in lab:
                if x is not None:
                    self.el.forbid(x.ids, why)


def shape(arg: Any) -> tuple[int, ...] | None:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def module_of(node: fx.Node) -> str | None:
    """The path of the innermost module whose forward made ``node`` (from the export's ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


HANDLERS: dict[str, Callable[[Flow, fx.Node], Any]] = {}


def handler(*names: str):
    def register(fn):
        for name in names:
            HANDLERS[name] = fn
        return fn
    return register


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _out(ids: np.ndarray, param: bool = False) -> Labels | None:
    return Labels(compress(ids), param) if (ids >= 0).any() else None


# -- sources: linear ops and embeddings ------------------------------------------------------------------------
def linear_source(flow: Flow, x: Any, weight: str, w_shape: tuple[int, ...], out_dim: int, bias: str | None,
                  out_shape: tuple[int, ...]) -> Labels:
    """Output labels of ``x @ W.T (+ b)``; the input's last-dim labels are tied to W's input columns."""
    el = flow.el
    in_dim = 1 - out_dim
    out_ids = el.of(weight, out_dim, w_shape[out_dim])
    el.roles[(weight, out_dim)], el.roles[(weight, in_dim)] = "out", "in"
    if bias is not None:
        el.roles[(bias, 0)] = "bias"
        el.union(out_ids, el.of(bias, 0, w_shape[out_dim]))
    lab = flow.lab(x)
    if lab is not None:
        ids = lab.ids
        if any(d != ids.ndim - 1 for d in varying(ids)):
            el.forbid(ids, "read by a linear along a dimension other than its features")
        else:
            el.union(ids.reshape(-1)[-ids.shape[-1]:] if ids.shape[-1] > 1 else ids.reshape(-1)[:1],
                     el.of(weight, in_dim, w_shape[in_dim]))
    ids = out_ids.reshape((1,) * (len(out_shape) - 1) + (-1,))
    return Labels(ids)


def _param_shape(flow: Flow, node: Any):
    return param_through_casts(flow.param_of, node), shape(node)


@handler("linear")
def _linear(flow: Flow, node: fx.Node):
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    wname, wshape = _param_shape(flow, w)
    if wname is None:  # a computed weight: treat like a matmul with a transposed operand
        flow.forbid(x, "read by a linear op whose weight is computed")
        flow.forbid(w, "used as a computed linear weight")
        return None
    bname = param_through_casts(flow.param_of, b)
    out = linear_source(flow, x, wname, wshape, 0, bname, shape(node))
    computed = flow.lab(b) if bname is None else None  # a bias built in the forward (EVA's cat of q|k|v biases)
    if isinstance(computed, Labels) and computed.param and computed.ids.size == wshape[0]:
        flow.el.union(flow.el.of(wname, 0, wshape[0]), computed.ids.reshape(-1))
    return out


@handler("embedding")
def _embedding(flow: Flow, node: fx.Node):
    w = node.args[0]
    wname = flow.param_of.get(w.name) if isinstance(w, fx.Node) else None
    if wname is None:
        return None
    lab = table_columns(flow, wname, shape(w)[1], node)
    # rows picked by positions, not by the input's tokens (a sinusoidal or learned position table): constants
    # per feature like a weight, which multiply every head alike (RoFormer's rotary) without joining them
    return Labels(lab.ids, True) if not flow.from_input(node.args[1]) else lab


def table_columns(flow: Flow, table: str, columns: int, node: fx.Node) -> Labels:
    """Rows of a 2-D parameter looked up by index (an embedding, a relative-position bias table): each output
    position carries the table's column labels along its last dimension (columns may be heads and follow them)."""
    return Labels(flow.el.of(table, 1, columns).reshape((1,) * (len(shape(node)) - 1) + (-1,)))


# -- pointwise ------------------------------------------------------------------------------------------------
_ZERO_PRESERVING = {"mul", "div", "where", "masked_fill", "_to_copy", "to", "clone", "type_as"}


def pointwise(flow: Flow, node: fx.Node, zero_preserving: bool | None = None, scores_bias: Callable | None = None):
    """Labels of several operands meet position by position: activations are tied together; a parameter vector
    follows the units when each of its entries meets one unit (a bias), and is shared otherwise (a norm weight
    over head_dim); an unlabelled activation that varies along a labelled dimension is data of its own, which
    removing those positions would lose — unless the op keeps zeros zero (``mul``)."""
    out_shape = shape(node)
    if out_shape is None:
        return None
    name = aten_name(node) or str(node.target)
    name = name[:-1] if name.endswith("_") and not name.startswith("_") else name  # in place: masked_fill_
    name = ALIASES.get(name, name)
    if zero_preserving is None:
        zero_preserving = name in _ZERO_PRESERVING
    operands = [a for a in node.args if isinstance(a, fx.Node) and shape(a) is not None]
    labelled = [(a, flow.lab(a)) for a in operands if isinstance(flow.lab(a), Labels)]
    if not labelled:
        return None
    nd = len(out_shape)

    acts = [(a, aligned(lab.ids, nd)) for a, lab in labelled if not lab.param]
    params = [(a, aligned(lab.ids, nd)) for a, lab in labelled if lab.param]
    if not acts:  # only parameters: e.g. a scaled bias vector
        return Labels(compress(params[0][1]), True)
    primary = acts[0][1]
    for _, ids in acts[1:]:
        mine, theirs = set(varying(primary)), set(varying(ids))
        if mine and theirs and not mine & theirs and not flow.el.roots(primary) & flow.el.roots(ids):
            # an outer product (Mamba's dt[..., None] * B[..., None, :]): the outer dimension's units stay units
            # (channels or heads before a state, as tensors are laid out); the inner side is kept whole, as a KV head
            # every query head reads is
            primary, other = (primary, ids) if min(mine) < min(theirs) else (ids, primary)
            flow.el.keep_whole(other, f"every unit of another dimension reads its features in {name} (an outer "
                                      "product): kept whole")
            continue
        flow.el.union(primary, ids)
    for _, ids in params:
        a, b = np.broadcast_arrays(primary, ids)
        keep = (a >= 0) & (b >= 0)
        pairs = {(int(x), int(y)) for x, y in zip(a[keep].ravel(), b[keep].ravel())}
        per_param: dict[int, set[int]] = {}
        for x, y in pairs:
            per_param.setdefault(y, set()).add(flow.el.find(x))
        if pairs and all(len(s) == 1 for s in per_param.values()):
            flow.el.union(a, b)
        else:  # the units may not be joined yet (a head's channels): decided once they are
            flow.el.followers.append((primary, ids, f"its features meet a parameter shared across units in {name}"))
    vary = set(varying(primary))
    for a in operands:
        if isinstance(flow.lab(a), Labels):
            continue
        s = (1,) * (nd - len(shape(a))) + shape(a)
        if _follows_per_dim(flow, a, s, primary, name):
            continue
        leaks = any(s[d] > 1 for d in vary)
        numerator = node.args and a is node.args[0]
        if leaks and scores_bias is not None and scores_bias(flow, primary, a, node):
            continue  # a per-head bias from outside the attention module (MPT's ALiBi): sliced where it enters
        if leaks and not (zero_preserving and not (name == "div" and numerator)):
            flow.el.forbid(primary, f"its features are mixed with other data by {name} (a residual connection)")
        elif leaks and a in flow.opaque:  # zeros stay zeros, so masking is exact; a compact model must cut that data too
            flow.el.fixed_extents.append((primary, s, f"its features meet data of their full width in {name} that "
                                                      "the analysis cannot cut with them (from an op it does not follow)"))
    return _out(primary)


_PARAM_VIEWS = {"unsqueeze", "slice", "view", "reshape", "_unsafe_view", "alias", "detach", "clone", "_to_copy", "to",
                "squeeze", "contiguous"}


def _param_behind(flow: Flow, arg: fx.Node) -> tuple[str, tuple[int, ...]] | None:
    """(name, shape) of the parameter ``arg`` is, or is a view of that only adds or drops size-1 dimensions
    (``pos_bias_v[None, :, None, :]``): the non-1 dimensions of both are the same, in the same order."""
    node = arg
    for _ in range(8):
        name = flow.param_of.get(node.name)
        if name is not None:
            big = [s for s in shape(node) or () if s > 1]
            return (name, shape(node)) if big == [s for s in shape(arg) if s > 1] else None
        op = aten_name(node)
        scaled = op in ("mul", "div") and len(node.args) > 1 and isinstance(node.args[1], (int, float))  # r_w_bias * scale
        if not (op in _PARAM_VIEWS or scaled or _unary(node)) or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def _unary(node: fx.Node) -> bool:
    """An elementwise op of one tensor (Mamba's ``-exp(A_log)``): each output entry is its input's entry."""
    target = node.target
    return (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
            and len(node.all_input_nodes) == 1 and shape(node) == shape(node.args[0]))


def _follows_per_dim(flow: Flow, arg: fx.Node, aligned: tuple[int, ...], primary: np.ndarray, op: str) -> bool:
    """A parameter with several dimensions (Conformer's per-head ``pos_bias_u`` of (heads, head_dim)) met by
    labelled features: each of its dimensions gets elements that follow the units they meet (settled at the end)."""
    found = _param_behind(flow, arg)
    if found is None:
        return False
    name, pshape = found
    param_dims = [d for d, s in enumerate(pshape) if s > 1]
    for d, pd in zip((d for d, s in enumerate(aligned) if s > 1), param_dims):
        ids = flow.el.of(name, pd, aligned[d]).reshape([aligned[d] if i == d else 1 for i in range(len(aligned))])
        flow.el.followers.append((primary, ids, f"its features meet {name}, shared across units, in {op}"))
    return True


# aliases the export keeps, and elementwise activations torch does not tag pointwise (LeViT's hardswish)
@handler("multiply", "subtract", "divide", "true_divide", "hardswish")
def _pointwise_alias(flow: Flow, node: fx.Node):
    return pointwise(flow, node)
