"""Capture by pieces: when neither path captures the whole model (a vision-language model's data-dependent merge of
image and text tokens, a Python loop over a tensor's values), each largest submodule that exports is captured with
the inputs it received in one eager run, and the pieces' graphs are merged into one graph whose parameter, buffer
and module names are the model's own.

Invariant: every piece output the rest of the model reads (or returns) is an output of the merged graph, so features
that leave a piece reach code the analysis does not see and are never cut (a unit inside one piece is found as in a
whole-model capture); an output nothing reads in the eager run (an attention layer's weights, which its decoder
layer drops) is left out, so it constrains nothing. A module that no piece covers has no linear found, and a lone
linear is never a piece (a classifier or LM head beside the pieces is left alone), except the router of fused 3-D
experts beside it (their loop may not export, the router does; its rows are the experts' units); an
``nn.MultiheadAttention``, one linear plus its own in-projection, is one; no linear inside a piece is taken for the
model's output layer. Inputs are recorded on the first call of each module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..transforms.verify import evaluating
from .types import Captured, clean_stack_path

__all__ = ["capture_pieces"]


@dataclass
class Recorded:
    """One eager run of the model: each module's first call and which of its output tensors anything read."""

    inputs: dict[str, tuple[tuple, dict]] = field(default_factory=dict)  # module path -> (args, kwargs)
    outputs: dict[str, list[Any]] = field(default_factory=dict)  # module path -> its output's pytree leaves (held)
    watched: dict[int, list[tuple[str, int]]] = field(default_factory=dict)  # id of a held output -> its positions
    read: set[tuple[str, int]] = field(default_factory=set)  # (path, leaf) some torch function took, or returned

    def saw(self, values: Any, depth: int = 2) -> None:
        """Mark the watched tensors in ``values``, looking ``depth`` levels into objects pytree does not know (a
        model output that is a plain dataclass)."""
        for t in pytree.tree_leaves(values):
            if isinstance(t, torch.Tensor):
                self.read.update(self.watched.get(id(t), ()))
            elif depth > 0 and hasattr(t, "__dict__") and not isinstance(t, (type, nn.Module)):
                self.saw(list(vars(t).values()), depth - 1)

    def unread(self, path: str) -> set[int]:
        """Positions of ``path``'s output leaves that are tensors nothing read."""
        leaves = self.outputs.get(path, ())
        return {i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and (path, i) not in self.read}


class _Reads(TorchFunctionMode):
    def __init__(self, rec: Recorded) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.rec.saw((args, kwargs), depth=0)
        return func(*args, **kwargs)


def record_inputs(model: nn.Module, args: tuple, kwargs: dict) -> Recorded:
    """Each submodule's first call while ``model`` runs once on the example inputs, and its output tensors read
    afterwards (outputs are held from the call on, so an id stands for one tensor while it is watched)."""
    rec = Recorded()
    handles = []
    for path, module in model.named_modules():
        if path:
            def pre(_m: nn.Module, a: tuple, kw: dict, path: str = path) -> None:
                rec.inputs.setdefault(path, (a, kw))

            def post(_m: nn.Module, _a: tuple, _kw: dict, out: Any, path: str = path) -> None:
                if path not in rec.outputs:
                    rec.outputs[path] = leaves = pytree.tree_leaves(out)
                    for i, t in enumerate(leaves):
                        if isinstance(t, torch.Tensor):
                            rec.watched.setdefault(id(t), []).append((path, i))

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with evaluating(model), torch.no_grad(), _Reads(rec):
            out = model(*args, **kwargs)
        rec.saw(out)
    finally:
        for h in handles:
            h.remove()
    return rec


def capture_pieces(model: nn.Module, args: tuple, kwargs: dict,
                   export: Callable[[nn.Module, tuple, dict], Captured]) -> Captured:
    """The largest submodules of ``model`` that ``export`` captures, merged; ``ValueError`` when none does."""
    rec = record_inputs(model, args, kwargs)
    inputs = rec.inputs
    pieces: list[tuple[str, Captured]] = []

    def visit(path: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{path}.{name}" if path else name
            if (sum(isinstance(m, nn.Linear) for m in child.modules()) < 2 and not isinstance(child, nn.MultiheadAttention)
                    and not _routes_fused_experts(module, child) and not _holds_router(child)):
                continue  # no structure to find: a lone linear stays out (a model's output layer)
            if full not in inputs:  # never called itself: a container (ModuleList of layers) or unused
                visit(full, child)
                continue
            try:
                piece = export(child, *inputs[full])
                _drop_unread_outputs(piece, rec.unread(full), len(rec.outputs.get(full, ())))
                pieces.append((full, piece))
            except Exception:  # noqa: BLE001 - this module does not export: try its children
                visit(full, child)

    visit("", model)
    if not pieces:
        raise ValueError("no submodule with a linear layer exports on its own")
    return merge(model, pieces)


def _routes_fused_experts(parent: nn.Module, child: nn.Module) -> bool:
    """``child`` holds a 2-D weight ``[E, H]`` (itself or in its one linear) and a sibling holds fused expert tensors:
    3-D ``[E, ...]``, or flat ``[E * I, H]`` (MegaBlocks, DBRX) outside any linear — the router of a
    mixture-of-experts layer whose experts loop does not export (the router alone does, and its rows are units)."""
    rows = {p.shape[0] for p in child.parameters() if p.dim() == 2}
    if not rows or sum(isinstance(m, nn.Linear) for m in child.modules()) > 1:
        return False
    for sibling in parent.children():
        if sibling is child:
            continue
        for module in sibling.modules():
            if isinstance(module, nn.Linear):
                continue
            own = [p.shape for p in module.parameters(recurse=False)]
            cubes = {s[0] for s in own if len(s) == 3}
            if len([s for s in own if len(s) == 3]) >= 2 and len(cubes) == 1 and cubes & rows:
                return True
            flat = [s for s in own if len(s) == 2]
            if len(flat) >= 2 and len(set(flat)) == 1 and any(flat[0][0] % e == 0 and flat[0][0] // e >= 2 for e in rows):
                return True
    return False


def _holds_router(module: nn.Module) -> bool:
    return any(_routes_fused_experts(parent, child) for parent in module.modules() for child in parent.children())


def _drop_unread_outputs(piece: Captured, unread: set[int], leaves: int) -> None:
    """Remove the graph outputs at ``unread`` user-output positions; nothing when the graph's user outputs do not
    line up one to one with the eager output's leaves."""
    out = next((n for n in piece.graph.nodes if n.op == "output"), None)
    positions = piece.user_outputs
    if not unread or out is None or positions is None or len(positions) != leaves:
        return
    drop = {positions[i] for i in unread}
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    out.args = (tuple(v for i, v in enumerate(values) if i not in drop),)


def merge(model: nn.Module, pieces: list[tuple[str, Captured]]) -> Captured:
    """One graph holding every piece's nodes; names prefixed with the piece's path; each piece's outputs outputs."""
    graph = fx.Graph()
    merged = Captured(graph=graph, method="export", root=model, pieces=[p for p, _ in pieces])
    outputs: list[Any] = []
    for prefix, piece in pieces:
        env: dict[fx.Node, fx.Node] = {}
        for node in piece.graph.nodes:
            if node.op == "output":
                outputs.append(fx.node.map_arg(node.args[0], env.__getitem__))
                continue
            new = graph.node_copy(node, env.__getitem__)
            new.meta = _prefixed_meta(node.meta, prefix)
            env[node] = new
            if node.name in piece.param_of:
                merged.param_of[new.name] = f"{prefix}.{piece.param_of[node.name]}"
            if node.name in piece.buffer_of:
                merged.buffer_of[new.name] = f"{prefix}.{piece.buffer_of[node.name]}"
    graph.output(tuple(outputs))
    return merged


def _prefixed_meta(meta: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = dict(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        out["nn_module_stack"] = {key: (_join(prefix, clean_stack_path(path)), kind) for key, (path, kind) in stack.items()}
    return out


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if path else prefix
