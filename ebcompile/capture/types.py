"""The captured graph type every capture path returns, and module-path helpers for its nodes' metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

__all__ = ["Captured", "clean_stack_path", "param_through_casts"]


@dataclass
class Captured:
    """A captured graph plus the lookups the analyses need."""

    graph: fx.Graph
    method: str  # "symbolic_trace" | "export" (also a merge of exported pieces)
    root: nn.Module  # the user's module (symbolic_trace: the GraphModule shares its submodules)
    param_of: dict[str, str] = field(default_factory=dict)  # node name -> qualified parameter name
    module_of: dict[str, str] = field(default_factory=dict)  # call_module node name -> module path
    buffer_of: dict[str, str] = field(default_factory=dict)  # node name -> qualified buffer name (export only)
    pieces: list[str] = field(default_factory=list)  # capture by pieces: the submodules captured (else empty)
    user_outputs: list[int] | None = None  # export: positions of the graph's outputs that are the module's own

    def param(self, node: Any) -> str | None:
        """The qualified parameter name a node stands for, if it is a parameter."""
        return self.param_of.get(node.name) if isinstance(node, fx.Node) else None


_CASTS = ("_to_copy", "to", "type_as", "alias", "detach", "clone", "contiguous", "float", "half", "bfloat16")


def param_through_casts(param_of: dict[str, str], node: Any) -> str | None:
    """The parameter ``node`` is, or is a dtype/device copy of (``self.weight.float()``: DeepSeek-V2's and MiMo's
    routers compute in fp32), following at most a few copies; None for anything computed."""
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return None
        if node.name in param_of:
            return param_of[node.name]
        target = node.target
        name = getattr(target, "_opname", None) or (target if node.op == "call_method" else None)
        if name not in _CASTS or not node.args:
            return None
        node = node.args[0]
    return None


def clean_stack_path(path: str) -> str:
    """A module path as ``named_modules`` spells it, from an ``nn_module_stack`` entry (torch.export writes paths
    like "L['self'].encoder.layers[0]" or "encoder.layers.0")."""
    path = path.replace("L['self']", "").replace("L__self__", "").lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("'", "")
