"""One vocabulary of op names for every pass that reads ops, keyed as aten names them.

Three engines see ops at different levels: the structure labels read aten graphs (``torch.export``), the feature
rewrites' ``FollowFeatures`` reads ``symbolic_trace`` graphs (torch functions, Tensor methods, ``operator``
calls), and the export-time attention fusion sees torch functions under a ``TorchFunctionMode``. Each names an op
through this module, as its aten overload packet is named (``aten.mul.Tensor``, ``torch.mul``, ``Tensor.__rmul__``,
``operator.mul`` and ``Tensor.multiply`` are all ``mul``; ``Tensor.__imul__`` and ``Tensor.mul_`` are ``mul_``), so
every handler table is keyed the same way and each set below says once what an op is, wherever it was seen.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

__all__ = ["aten_name", "function_name", "op_name", "ALIASES", "RESHAPES", "SIZED_VIEWS", "SPLITS", "PERMUTES",
           "SOFTMAXES", "IDENTITY"]

# names torch gives one aten op: the aten packet's name wins
ALIASES = {"multiply": "mul", "subtract": "sub", "divide": "div", "true_divide": "div", "truediv": "div",
           "floordiv": "floor_divide"}
RESHAPES = frozenset({"view", "reshape", "_unsafe_view"})  # a new shape of the same elements, in order
SIZED_VIEWS = RESHAPES | {"expand"}  # views whose size arguments a compact model may need changed
SPLITS = frozenset({"split", "chunk", "split_with_sizes", "tensor_split", "unbind"})
PERMUTES = frozenset({"transpose", "swapaxes", "permute", "t"})
SOFTMAXES = frozenset({"softmax", "_softmax", "_safe_softmax"})
# the values (or a broadcast of them) at the same positions: labels pass through unchanged
IDENTITY = ("clone", "contiguous", "alias", "detach", "_to_copy", "to", "type_as", "dropout", "lift_fresh_copy",
            "_assert_tensor_metadata", "feature_dropout", "alpha_dropout", "expand", "expand_as", "_unsafe_view_copy",
            "broadcast_to")

_OPERATORS = {operator.getitem: "getitem", operator.matmul: "matmul", operator.mul: "mul", operator.add: "add",
              operator.sub: "sub", operator.truediv: "div", operator.floordiv: "floor_divide", operator.neg: "neg",
              operator.pow: "pow", operator.iadd: "add_", operator.imul: "mul_", operator.isub: "sub_",
              operator.itruediv: "div_"}
_REFLECTED = {"add", "mul"}  # ``__radd__`` computes what ``__add__`` does; ``__rsub__`` and ``__rmatmul__`` do not


def aten_name(node: Any) -> str:
    """The aten op a graph node calls, without its overload (``add`` for ``aten.add.Tensor``); "" for anything else
    (a placeholder, ``operator.getitem``, a higher-order op). The structure handlers are looked up by this name."""
    target = getattr(node, "target", None)
    return target._opname if isinstance(target, torch._ops.OpOverload) else ""


def function_name(func: Any) -> str:
    """The aten-style name of a torch function, Tensor method or dunder, ``operator`` function or aten overload."""
    if isinstance(func, torch._ops.OpOverload):
        return func._opname
    if func in _OPERATORS:
        return _OPERATORS[func]
    name = getattr(func, "__name__", "") or ""
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        core = name[2:-2]
        if core.startswith("i") and ALIASES.get(core[1:], core[1:]) in {"add", "sub", "mul", "div"}:
            return ALIASES.get(core[1:], core[1:]) + "_"  # __imul__: in place
        if core.startswith("r") and core[1:] in _REFLECTED:
            return core[1:]
        name = core
    return ALIASES.get(name, name)


def op_name(node: fx.Node) -> str:
    """The aten-style name of what an fx node computes, at any level: an aten overload, a torch function, a Tensor
    method (``call_method``), an ``operator`` function; otherwise the node's kind (``placeholder``, ``call_module``)."""
    if node.op == "call_method":
        return ALIASES.get(str(node.target), str(node.target))
    if node.op == "call_function":
        return function_name(node.target)
    return node.op
