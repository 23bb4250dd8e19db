"""The captured graph type every capture path returns, and module-path helpers for its nodes' metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

__all__ = ["Captured", "clean_stack_path"]


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

    def param(self, node: Any) -> str | None:
        """The qualified parameter name a node stands for, if it is a parameter."""
        return self.param_of.get(node.name) if isinstance(node, fx.Node) else None


def clean_stack_path(path: str) -> str:
    """A module path as ``named_modules`` spells it, from an ``nn_module_stack`` entry (torch.export writes paths
    like "L['self'].encoder.layers[0]" or "encoder.layers.0")."""
    path = path.replace("L['self']", "").replace("L__self__", "").lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("'", "")
