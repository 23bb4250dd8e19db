"""Analysis: find the linear ops of a captured graph and the attention modules that own projections.

Invariant: every weight that enters a linear op (``nn.Linear``, ``F.linear``/``aten.linear``,
``aten.addmm`` of HF ``Conv1D``, a linear written out as ``x @ W.T (+ b)`` or ``x @ W`` with a 2-D parameter
``W`` (Falcon's ``FalconLinear``), ``nn.MultiheadAttention``'s packed ``in_proj_weight``, torchvision Swin's
``qkv``/``proj``) appears in exactly one ``LinearOp``; linears whose output reaches the model output
without another linear op in between are tagged ``kind="output"`` (the output layer). Writes ``node.meta["ebcompile.linear"]``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..capture.types import Captured, clean_stack_path, param_through_casts
from ..families import family_of
from ..families.vocabulary import is_transposed_linear
from ..names import split_name
from ..plan import LinearOp

__all__ = ["find_linears", "attention_modules", "linear_nodes"]

META = "ebcompile.linear"


def attention_modules(model: nn.Module, used: set[str]) -> dict[str, nn.Module]:
    """Modules of a registered attention family that the graph uses (outermost wins)."""
    found: dict[str, nn.Module] = {}
    for path, m in model.named_modules():
        if path in used and family_of(m) is not None and not any(path.startswith(p + ".") for p in found):
            found[path] = m
    return found


def _used_modules(cap: Captured) -> set[str]:
    """Every module path the graph touches: call_module targets, parameter owners, nn_module_stack."""
    used: set[str] = set()

    def add(path: str) -> None:
        parts = path.split(".") if path else []
        for i in range(len(parts) + 1):
            used.add(".".join(parts[:i]))

    for node in cap.graph.nodes:
        if node.op == "call_module":
            add(str(node.target))
        if (p := cap.param(node)) is not None:
            add(split_name(p)[0])
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            add(clean_stack_path(path))
    return used


_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear}


def _linear_node_weight(cap: Captured, node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str | None, int] | None:
    """(weight, bias, out_dim) when ``node`` is a generic linear op on parameters, else None."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if isinstance(mod, nn.Linear):
            return f"{node.target}.weight", (f"{node.target}.bias" if mod.bias is not None else None), 0
        if is_transposed_linear(mod):  # HF Conv1D traced as a leaf
            return f"{node.target}.weight", f"{node.target}.bias", 1
        return None
    if node.op != "call_function":
        return None
    target = node.target
    if target in _LINEAR_FUNCTIONS or target is torch.ops.aten.linear.default:
        w = param_through_casts(cap.param_of, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        if w is None:
            return None
        b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return w, param_through_casts(cap.param_of, b_node), 0
    if target is torch.ops.aten.addmm.default:  # HF Conv1D: addmm(bias, x2d, weight[in, out])
        w = cap.param(node.args[2])
        if w is None:
            return None
        return w, cap.param(node.args[0]), 1
    if target in _MATMULS and len(node.args) == 2:  # a linear written out: x @ W.T (+ b), or x @ W for W[in, out]
        return _matmul_weight(cap, node)
    return None


_MATMULS = {torch.ops.aten.matmul.default, torch.ops.aten.mm.default, torch.matmul, torch.mm, operator.matmul}


def transposed(node: Any) -> fx.Node | None:
    """The node that ``node`` transposes when it is a 2-D transpose (``W.T``, ``W.t()``, ``permute(1, 0)``,
    ``transpose(0, 1)``), as ``torch.export`` (aten ops) or ``symbolic_trace`` (``getattr``, methods) writes it."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    target, rest = node.target, node.args[1:]
    if node.op == "call_function" and target is getattr:
        return node.args[0] if rest in (("T",), ("mT",)) else None
    if node.op == "call_method":
        target = {"t": torch.t, "transpose": torch.transpose, "permute": torch.permute}.get(target)
    elif node.op != "call_function":
        return None
    if target in (torch.ops.aten.numpy_T.default, torch.ops.aten.t.default, torch.t):
        return node.args[0]
    dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    if not all(isinstance(d, int) for d in dims):
        return None
    if target in (torch.ops.aten.permute.default, torch.permute) and [d % 2 for d in dims] == [1, 0]:
        return node.args[0]
    if target in (torch.ops.aten.transpose.int, torch.transpose) and sorted(d % 2 for d in dims) == [0, 1]:
        return node.args[0]
    return None


def weight_operand(right: Any) -> tuple[fx.Node, int] | None:
    """The right operand of a matmul read as a weight: ``(W, 0)`` for ``W.T`` (``nn.Linear`` layout), else
    ``(right, 1)`` (``[in, out]``); the caller checks that it is a 2-D parameter."""
    if not isinstance(right, fx.Node):
        return None
    source = transposed(right)
    return (right, 1) if source is None else (source, 0)


def _matmul_weight(cap: Captured, node: fx.Node) -> tuple[str, str | None, int] | None:
    """``matmul(x, W.T)`` -> out_dim 0, ``matmul(x, W)`` -> out_dim 1, for a 2-D parameter ``W`` (its bias: a 1-D
    parameter the product's only user adds)."""
    operand = weight_operand(node.args[1])
    if operand is None:
        return None
    source, out_dim = operand
    w = cap.param(source)
    if w is None or cap.root.get_parameter(w).dim() != 2:
        return None
    bias = None
    users = list(node.users)
    if len(users) == 1 and users[0].target in _JOINS and len(users[0].args) == 2:
        other = users[0].args[1] if users[0].args[0] is node else users[0].args[0]
        b = cap.param(other) if isinstance(other, fx.Node) else None
        if b is not None and tuple(cap.root.get_parameter(b).shape) == (cap.root.get_parameter(w).shape[out_dim],):
            bias = b
    return w, bias, out_dim


def linear_nodes(cap: Captured, modules: dict[str, nn.Module]) -> dict[fx.Node, LinearOp]:
    """Graph nodes that are generic linear ops, each with its LinearOp (shared weights: first use wins)."""
    found: dict[fx.Node, LinearOp] = {}
    seen: set[str] = set()
    for node in cap.graph.nodes:
        hit = _linear_node_weight(cap, node, modules)
        if hit is None or hit[0] in seen:
            continue
        weight, bias, out_dim = hit
        seen.add(weight)
        found[node] = LinearOp(split_name(weight)[0], weight, bias, out_dim)
    return found


_JOINS = {operator.add, operator.sub, torch.add, torch.sub, torch.cat, torch.ops.aten.add.Tensor,
          torch.ops.aten.sub.Tensor, torch.ops.aten.cat.default}


def _is_join(node: fx.Node) -> bool:
    """A residual join (``x + f(x)``, a concatenation): the linears behind it are inside the network."""
    is_add = node.target in _JOINS or (node.op == "call_method" and node.target in ("add", "sub"))
    return is_add and len(node.all_input_nodes) >= 2


def _output_layers(graph: fx.Graph, stops: set[fx.Node]) -> set[fx.Node]:
    """Linear nodes from which the graph output is reached without crossing another linear op or a residual
    join (so an encoder without a classifier has no output layer to spare)."""
    outputs: set[fx.Node] = set()
    out = next(n for n in graph.nodes if n.op == "output")
    stack, seen = list(out.all_input_nodes), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in stops:
            outputs.add(node)
            continue
        if not _is_join(node):
            stack.extend(node.all_input_nodes)
    return outputs


def find_linears(cap: Captured) -> tuple[list[LinearOp], dict[str, nn.Module]]:
    """All linear ops of the graph in graph order, plus the attention modules that own some of them."""
    modules = dict(cap.root.named_modules())
    attn = attention_modules(cap.root, _used_modules(cap))
    claimed = claimed_weights(attn)
    nodes = {n: op for n, op in linear_nodes(cap, modules).items() if op.weight not in claimed}
    owners = {n: o for n in cap.graph.nodes if (o := _owner(cap, n, attn)) is not None}
    # pieces (capture by parts): a piece's output is not the model's, and the model's own head is left outside them
    outputs = set() if cap.pieces else _output_layers(cap.graph, set(nodes) | set(owners))
    ops: list[LinearOp] = []
    emitted: set[str] = set()
    for node in cap.graph.nodes:
        if node in nodes:
            op = nodes[node]
            if node in outputs:
                op = LinearOp(op.name, op.weight, op.bias, op.out_dim, "output")
            node.meta[META] = op
            ops.append(op)
        elif (owner := owners.get(node)) is not None and owner not in emitted:
            emitted.add(owner)
            ops.extend(family_of(attn[owner]).linears(owner, attn[owner]))
            node.meta[META] = owner
    return ops, attn


def claimed_weights(attn: dict[str, nn.Module]) -> set[str]:
    """Parameters owned by attention modules: they are handled by their family, never as plain linears."""
    return {p for path, m in attn.items() for p, _ in m.named_parameters(prefix=path)}


def _owner(cap: Captured, node: fx.Node, attn: dict[str, nn.Module]) -> str | None:
    """The attention module a node belongs to, if any."""
    if node.op == "call_module" and str(node.target) in attn:
        return str(node.target)
    p = cap.param(node)
    if p is not None:
        for path in attn:
            if p.startswith(path + "."):
                return path
    for path, _ in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
        clean = clean_stack_path(path)
        if clean in attn:
            return clean
    return None


