"""Analysis: coupled structures found in the graph — attention heads, KV groups, FFN neurons — for any model.

Runs over a ``torch.export`` (aten) graph. Every feature of every linear op's output is labelled with the
weight row it comes from; the labels flow forward through one small handler per op (``ophandlers``,
``ops_shape``, ``ops_attention``): views that split features into (heads, head_dim) make each head a unit,
slices and splits of fused projections (q|k|v, gate|up) carry offsets, products of two activations tie their
labels (gated MLPs, q with k, scores with v), repeats of KV heads join a group's query heads, and reading a
feature as a linear's input ties it to that weight's column.

Invariant: each ``GroupSet`` built here lists, for every unit, every parameter slice that holds that unit
(out rows and biases of the producing linears, in columns of the consuming linears, per-unit parameters such
as a position-bias column), and a unit is emitted only if removing it cannot change anything else: its
features never reach the model output, a residual connection, a reduction or normalisation across units, or
an op without a handler (``skipped`` says which). Writes ``node.meta["ebcompile.labels"]``.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections import defaultdict

import numpy as np
import torch
from torch import fx

from ..names import split_name
from ..plan import GroupSet, Member
from . import ops_attention as _ops_attention  # noqa: F401 - registers handlers
from . import ops_conv as _ops_conv  # noqa: F401 - registers handlers
from . import ops_einsum as _ops_einsum  # noqa: F401 - registers handlers
from . import ops_reduce as _ops_reduce  # noqa: F401 - registers handlers
from . import ops_shape as _ops_shape  # noqa: F401 - registers handlers
from .head_inputs import resolve
from .labels import Elements, Labels
from .norm_folds import NormFold, settle_rms_candidates
from .ophandlers import HANDLERS, Flow, aten_name, pointwise

__all__ = ["discover", "META"]

META = "ebcompile.labels"
SOURCES = ("linear", "addmm", "embedding", "mm", "matmul", "index")  # ops that create labels from their parameters


def _param_labels(el: Elements, name: str, value: torch.Tensor) -> Labels | None:
    """A parameter vector (one dimension larger than 1) gets its own elements: it may follow units."""
    if not value.is_floating_point():
        return None
    big = [d for d, s in enumerate(value.shape) if s > 1]
    if len(big) != 1:
        return None
    d = big[0]
    ids = el.of(name, d, value.shape[d]).reshape([value.shape[i] if i == d else 1 for i in range(value.dim())])
    return Labels(ids, param=True)


def _handler_of(node: fx.Node):
    if node.target is operator.getitem:
        return HANDLERS["getitem"]
    if isinstance(node.target, torch._ops.OpOverload):
        fn = HANDLERS.get(aten_name(node))
        if fn is None and _is_pointwise(node.target):
            return pointwise
        return fn if fn is not None else _in_place(node.target)
    return None


def _in_place(op: torch._ops.OpOverload):
    """``masked_fill_`` and the like: the functional op's handler, whose labels the mutated input takes too."""
    functional = getattr(torch.ops.aten, op._opname[:-1], None) if op._opname.endswith("_") else None
    if functional is None or op._opname == "copy_":
        return None
    fn = HANDLERS.get(functional._qualified_op_name.split("::")[-1])
    if fn is None and not _is_pointwise(getattr(functional, functional.overloads()[0])):
        return None

    def run(flow, node: fx.Node):
        out = (fn or pointwise)(flow, node)
        if isinstance(node.args[0], fx.Node):
            flow.labels[node.args[0]] = out
        return out
    return run


def _is_pointwise(op: torch._ops.OpOverload) -> bool:
    """Tagged pointwise, in this overload or another of the same op (``where.ScalarOther`` is not tagged)."""
    packet = op.overloadpacket
    return torch.Tag.pointwise in op.tags or any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())


def _labelled_inputs(flow: Flow, node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if flow.labels.get(a) is not None]


def propagate(graph: fx.Graph, param_of: dict[str, str], params: dict[str, torch.Tensor], keep_kv: bool,
              buffer_of: dict[str, str] | None = None) -> Flow:
    """Label every node of ``graph``; returns the flow with its elements and constraints. Buffers get no labels of
    their own: a handler that knows a buffer follows a unit (a batch norm's running statistics) labels it."""
    flow = Flow(Elements(), param_of, keep_kv)
    flow.buffer_of = dict(buffer_of or {})
    flow.live = live = _live(graph)
    for node in graph.nodes:
        if node.op == "call_function" and node not in live:
            continue  # computed and dropped (SAM2's unused attention weights): constrains nothing
        if node.op in ("placeholder", "get_attr"):
            name = param_of.get(node.name)
            if name is not None and name in params:
                flow.labels[node] = _param_labels(flow.el, name, params[name])
            continue
        if node.op == "output":
            for a in _labelled_inputs(flow, node):
                flow.forbid(a, "its features reach the model output")
            continue
        inputs = _labelled_inputs(flow, node)
        from_opaque = any(a in flow.opaque for a in node.all_input_nodes)
        if not inputs and aten_name(node) not in SOURCES:
            if from_opaque and _is_tensor(node):
                flow.opaque.add(node)
            continue
        fn = _handler_of(node)
        what = getattr(node.target, "__name__", str(node.target))
        if fn is None:
            for a in inputs:
                flow.forbid(a, f"its features are read by {what}, which the analysis does not follow")
            flow.opaque.add(node)
            continue
        try:
            out = fn(flow, node)
        except Exception as exc:  # noqa: BLE001 - an unexpected form of a known op: leave its units alone
            for a in inputs:
                flow.forbid(a, f"its features are read by {what} in a form the analysis does not follow ({type(exc).__name__})")
            flow.opaque.add(node)
            continue
        flow.labels[node] = out
        if out is not None:
            node.meta[META] = out
        elif _is_tensor(node) and (from_opaque or any(_reads_values(node, a) for a in inputs)):
            flow.opaque.add(node)  # features mixed into data without labels
    return flow


def _with_folds(group: GroupSet, folds: list[NormFold]) -> GroupSet:
    """``group`` with the RMS norms fed by one of its masked producers (each norm's weight follows the units)."""
    producers = {m.tensor for m in group.members if m.masked and m.dim == 0}
    mine = tuple((f.producer, f.bias, f.norm_weight, f.width) for f in folds if f.producer in producers)
    return dataclasses.replace(group, folds=mine) if mine else group


def _live(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose values reach the graph's output, or that write to their inputs (in-place ops, buffer updates)."""
    live: set[fx.Node] = set()
    roots = [n for n in graph.nodes if n.op == "output" or _writes(n)]
    while roots:
        n = roots.pop()
        if n not in live:
            live.add(n)
            roots.extend(n.all_input_nodes)
    return live


def _writes(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _is_tensor(node: fx.Node) -> bool:
    """A tensor-valued node (its sizes may be symbolic: never read them here, outside a handler's guard)."""
    return isinstance(node.meta.get("val"), torch.Tensor)


_SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones",
               "new_empty", "new_full", "sym_size", "size"}


def _reads_values(node: fx.Node, arg: fx.Node) -> bool:
    """Whether ``node`` computes from ``arg``'s values, not only its shape (``expand_as(mask, scores)`` reads the
    scores' shape, which a compact model shrinks with them)."""
    op = aten_name(node) or str(node.target)
    return op not in _SHAPE_ONLY and not (op == "expand_as" and len(node.args) > 1 and node.args[1] is arg)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Maximal contiguous runs of sorted indices as (start, length)."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _members(units: list[dict[tuple[str, int], list[int]]], roles: dict[tuple[str, int], str]) -> list[Member] | None:
    """Members describing every unit's slices as offset + u * size, or None when the layout is irregular."""
    members = []
    for key in units[0]:
        runs = [_runs(sorted(u[key])) for u in units]
        if any(len(r) != len(runs[0]) for r in runs):
            return None
        for r in range(len(runs[0])):
            starts, sizes = [x[r][0] for x in runs], {x[r][1] for x in runs}
            if len(sizes) != 1:
                return None
            size = sizes.pop()
            if any(s != starts[0] + u * size for u, s in enumerate(starts)):
                return None
            members.append(Member(key[0], key[1], starts[0], size, masked=key in roles))
    return members


def _common_module(tensors: list[str]) -> str:
    parts = [split_name(t)[0].split(".") for t in tensors]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def discover(graph: fx.Graph, param_of: dict[str, str], params: dict[str, torch.Tensor], masked: set[str],
             claimed: set[str], keep_kv: bool = False, buffer_of: dict[str, str] | None = None
             ) -> tuple[list[GroupSet], dict[str, str]]:
    """Head and neuron ``GroupSet``s of ``graph`` over the ``masked`` weights, and why other linears have none."""
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")  # a size decided by real-tensor propagation
    level = shapes_log.level  # warns each time it is read (propagate_real_tensors evaluate_expr): it is expected here
    shapes_log.setLevel(logging.ERROR)
    try:
        flow = propagate(graph, param_of, params, keep_kv, buffer_of)
    finally:
        shapes_log.setLevel(level)
    folds = settle_rms_candidates(flow, params)
    el = flow.el
    el.settle_splits()
    el.settle_followers()
    comps: dict[int, list[int]] = defaultdict(list)
    for e in range(len(el.parent)):
        comps[el.find(e)].append(e)
    why: dict[int, str] = {}
    for e, reason in el.invalid.items():
        why.setdefault(el.find(e), reason)
    for row, reason in el.same_unit:
        roots = el.roots(row)
        if len(roots) > 1:
            for r in roots:
                why.setdefault(r, reason)
    attention = {el.find(e) for e in el.attention}
    by_shape: dict[tuple, list[tuple[int, dict]]] = defaultdict(list)
    skipped: dict[str, str] = {}
    for root, elements in comps.items():
        slices: dict[tuple[str, int], list[int]] = defaultdict(list)
        for e in elements:
            tensor, dim, idx = el.where[e]
            slices[(tensor, dim)].append(idx)
        roles = {el.roles.get(k) for k in slices}
        weights = {k[0] for k in slices if el.roles.get(k) in ("out", "in")}
        if "out" not in roles:
            continue  # parameters no linear produces (norm weights, embeddings): nothing to prune
        reason = why.get(root)
        if reason is None and "in" not in roles:
            reason = "its output is read by no linear op"
        if reason is None and weights & claimed:
            reason = "it is inside an attention module handled by its registered family"
        if reason is None and weights - masked:
            reason = f"its units are coupled to {sorted(weights - masked)[0]}, which is not masked"
        producers = sorted(k[0] for k in slices if el.roles.get(k) == "out")
        if reason is not None:
            for w in producers:
                skipped.setdefault(split_name(w)[0], f"no heads or neurons: {reason}")
            continue
        by_shape[tuple(sorted(slices))].append((root, dict(slices)))
    groups: list[GroupSet] = []
    unit_of: dict[int, tuple[int, int]] = {}  # a unit's root element -> (its group, its index there)
    names: set[str] = set()
    order = {name: i for i, name in enumerate(dict.fromkeys(param_of.get(n.name) for n in graph.nodes if n.op in ("placeholder", "get_attr")))}
    for key, units in sorted(by_shape.items(), key=lambda kv: min(order.get(t, 1 << 30) for t, _ in kv[0])):
        first = min((k for k in key if el.roles.get(k) == "out"), key=lambda k: order.get(k[0], 1 << 30))
        units.sort(key=lambda u: min(u[1][first]))
        producer = split_name(first[0])[0]
        members = _members([u for _, u in units], {k for k in key if el.roles.get(k) in ("out", "in", "bias")})
        if members is None:
            skipped.setdefault(producer, "its units are laid out irregularly in the weights")
            continue
        is_head = any(root in attention for root, _ in units)
        module = _common_module([m.tensor for m in members if m.masked]) if is_head else producer
        name = module or producer
        while name in names:
            name += "'"
        names.add(name)
        per_group = _per_group(flow, [root for root, _ in units]) if is_head and (keep_kv or flow.kv_groups) else 0
        if per_group < 0:
            skipped.setdefault(producer, "its query heads are not ordered by KV head")
            continue
        for u, (root, _) in enumerate(units):
            unit_of[root] = (len(groups), u)
        groups.append(GroupSet("head" if is_head else "neuron", name, len(units), tuple(members),
                               module=module if is_head else None, per_group=per_group))
    groups, unsliced = resolve(flow, [_with_folds(g, folds) for g in groups], unit_of)
    skipped.update({k: v for k, v in unsliced.items() if k not in skipped})
    live = flow.live
    for node in graph.nodes:  # a layer computed and never used (a backbone stage the head does not read)
        w = param_of.get(node.name)
        if w in masked and node.users and not any(u in live for u in node.users):
            skipped.setdefault(split_name(w)[0], "no heads or neurons: its output never reaches the model's output")
    return groups, skipped


def _per_group(flow: Flow, roots: list[int]) -> int:
    """Query heads per KV head when ``roots`` are the query heads of a grouped-query attention (0 if not,
    -1 if they are but not in consecutive runs of equal length)."""
    el = flow.el
    for heads, group in flow.kv_groups:
        owner = {}
        for e, g in zip(heads, group):
            if e >= 0:
                owner.setdefault(el.find(int(e)), int(g))
        if set(roots) <= set(owner):
            seq = [owner[r] for r in roots]
            counts = np.bincount(seq)
            n = int(counts[0])
            if (counts == n).all() and seq == sorted(seq):
                return n
            return -1
    return 0
