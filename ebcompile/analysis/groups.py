"""Analysis: coupled structures — attention heads and FFN neurons.

Invariant: each ``GroupSet`` lists every tensor slice that must be removed together for one unit to
disappear without changing what the other units compute: a head is its q/k/v rows (and biases), its
out-projection columns and any per-head tensors (relative-position bias columns, logit scales); an FFN
neuron is its fc1 row and bias and its fc2 column, where fc1 reaches fc2 only through pointwise ops.
Residual widths are never grouped. Writes ``node.meta["ebcompile.group"]`` on fc1 nodes.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..capture.types import Captured
from ..families import family_of
from ..names import split_name
from ..plan import GroupSet, LinearOp, Member
from .experts import find_expert_groups

__all__ = ["find_groups", "attention_groups", "ffn_groups"]

META = "ebcompile.group"

_POINTWISE_MODULES = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardswish,
    nn.Hardtanh, nn.ReLU6, nn.Softplus, nn.Dropout, nn.Identity,
)
_POINTWISE_FUNCTIONS = {
    F.relu, F.gelu, F.silu, F.mish, F.leaky_relu, F.elu, F.dropout, F.hardswish, F.relu6, F.softplus,
    torch.relu, torch.tanh, torch.sigmoid, torch.mul, torch.add, torch.pow, torch.div,
    operator.mul, operator.add, operator.truediv, operator.pow, operator.sub, operator.neg,
}
_POINTWISE_METHODS = {"relu", "gelu", "tanh", "sigmoid", "mul", "add", "pow", "div", "neg", "sub", "contiguous"}
_SHAPE_OPS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
              torch.ops.aten.clone.default, torch.ops.aten.alias.default}


def _is_pointwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _POINTWISE_MODULES) or (
            type(modules.get(str(node.target))).__name__.endswith(("GELUActivation", "Activation"))
        )
    if node.op == "call_method":
        return node.target in _POINTWISE_METHODS
    if node.op != "call_function":
        return False
    if node.target in _POINTWISE_FUNCTIONS:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        if torch.Tag.pointwise in node.target.tags or node.target is torch.ops.aten.dropout.default:
            return True
        if node.target in _SHAPE_OPS:  # a view that keeps the feature (last) dimension
            src, dst = node.args[0].meta.get("val"), node.meta.get("val")
            return src is not None and dst is not None and src.shape[-1] == dst.shape[-1]
    return False


def _input_of(node: fx.Node) -> fx.Node | None:
    """The activation input of a linear node (arg 0, or arg 1 for addmm)."""
    if node.op == "call_function" and node.target is torch.ops.aten.addmm.default:
        return node.args[1]
    return node.args[0] if node.args else None


def _fc2_of(cap: Captured, start: fx.Node, nodes: dict[fx.Node, LinearOp], modules: dict[str, nn.Module]) -> fx.Node | None:
    """The one linear node that ``start`` (fc1) reaches only through a closed pointwise region, else None.

    The region is every node reached forward from fc1 through pointwise ops (activations, their decomposed
    arithmetic with several users inside the region, dropout, views that keep the last dim). It is closed when
    each region node reads only region nodes and parameters/constants — a residual add of an outside tensor,
    or a region value read by anything but a pointwise op or a linear's activation input, rejects it.
    """
    region, frontier, consumers = {start}, [start], set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in region or user in consumers:
                continue
            if user in nodes and _input_of(user) is node:
                consumers.add(user)
            elif _is_pointwise(user, modules):
                region.add(user)
                frontier.append(user)
            else:
                return None
    for node in region - {start}:
        if set(node.all_input_nodes) - region - _params(cap, node):
            return None
    for user in consumers:
        if set(user.all_input_nodes) - region - _params(cap, user):
            return None
    return next(iter(consumers)) if len(consumers) == 1 else None


def ffn_groups(cap: Captured, nodes: dict[fx.Node, LinearOp], masked: set[str]) -> list[GroupSet]:
    """fc1 -> pointwise ops -> fc2 chains whose fc1 and fc2 are both masked."""
    modules = dict(cap.root.named_modules())
    params = dict(cap.root.named_parameters())
    groups = []
    for start, fc1 in nodes.items():
        if fc1.weight not in masked:
            continue
        end = _fc2_of(cap, start, nodes, modules)
        if end is None:
            continue
        fc2 = nodes[end]
        units = params[fc1.weight].shape[fc1.out_dim]
        in_dim = 1 - fc2.out_dim
        if fc2.weight not in masked or params[fc2.weight].shape[in_dim] != units:
            continue
        members = [Member(fc1.weight, fc1.out_dim, 0, 1)]
        if fc1.bias is not None:
            members.append(Member(fc1.bias, 0, 0, 1))
        members.append(Member(fc2.weight, in_dim, 0, 1))
        group = GroupSet("neuron", fc1.name, int(units), tuple(members))
        start.meta[META] = group
        groups.append(group)
    return groups


def _params(cap: Captured, node: fx.Node) -> set[fx.Node]:
    return {a for a in node.all_input_nodes if cap.param(a) is not None or a.op == "get_attr"}


def attention_groups(attn: dict[str, nn.Module], masked: set[str]) -> list[GroupSet]:
    """One head GroupSet per attention module whose head slices are all masked."""
    groups = []
    for path, mod in attn.items():
        group = family_of(mod).heads(path, mod)
        if group is not None and all(m.tensor in masked or not m.masked or m.tensor.endswith("bias") for m in group.members):
            groups.append(group)
    return groups


def find_groups(cap: Captured, attn: dict[str, nn.Module], masked: set[str], example_inputs=None,
                keep_kv: bool = False) -> tuple[list[GroupSet], dict[str, str]]:
    """Head groups of registered attention families, then the heads, KV groups and neurons the structure
    analysis finds in the ``torch.export`` graph (exported here when the capture was ``symbolic_trace``); the
    pointwise fc1 -> fc2 search of this module only when no export graph can be had. Also returns, per linear
    module, why it got no group."""
    from .linears import claimed_weights, linear_nodes
    from .structure import discover

    claimed = claimed_weights(attn)
    experts, skipped = find_expert_groups(cap.root, masked)  # fused MoE experts (analysis.experts)
    routers = {split_name(g.members[0].tensor)[0] for g in experts if g.kind == "expert"}
    graph = _export_graph(cap, example_inputs)
    if graph is not None:
        params = dict(cap.root.named_parameters(remove_duplicate=False))
        found, why = discover(graph[0], graph[1], params, masked, claimed, keep_kv, graph[2])
        skipped.update({k: v for k, v in why.items() if k not in routers and k not in skipped})
        return attention_groups(attn, masked) + found + experts, skipped
    modules = dict(cap.root.named_modules())
    nodes = {n: op for n, op in linear_nodes(cap, modules).items() if op.weight not in claimed}
    return attention_groups(attn, masked) + ffn_groups(cap, nodes, masked) + experts, skipped


def _export_graph(cap: Captured, example_inputs) -> tuple[fx.Graph, dict[str, str], dict[str, str]] | None:
    """The export graph with its node -> parameter and node -> buffer names."""
    if cap.method == "export":
        return cap.graph, cap.param_of, cap.buffer_of
    if example_inputs is None:
        return None
    from ..capture.graph import CAPTURE_PATHS, normalize_inputs

    args, kwargs = normalize_inputs(example_inputs)
    try:
        exported = CAPTURE_PATHS["export"](cap.root, args, kwargs)
    except Exception:  # noqa: BLE001 - the model cannot be exported: the fx-graph search still finds FFN neurons
        return None
    return exported.graph, exported.param_of, exported.buffer_of
