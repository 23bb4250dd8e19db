"""Capture by pieces: when neither path captures the whole model (a vision-language model's data-dependent merge of
image and text tokens, a Python loop over a tensor's values), each largest submodule that exports is captured with
the inputs it received in one eager run, and the pieces' graphs are merged into one graph whose parameter, buffer
and module names are the model's own.

Invariant: every piece's outputs are outputs of the merged graph, so features that leave a piece reach code the
analysis does not see and are never cut (a unit inside one piece is found as in a whole-model capture); a module
that no piece covers has no linear found, and a lone linear is never a piece (so a classifier or LM head beside the
pieces is left alone; an ``nn.MultiheadAttention``, one linear plus its own in-projection, is one; no linear inside
a piece is taken for the model's output layer). Inputs are recorded on the first call of each module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from ..transforms.verify import evaluating
from .types import Captured, clean_stack_path

__all__ = ["capture_pieces"]


def record_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, tuple[tuple, dict]]:
    """module path -> the (args, kwargs) of its first call while ``model`` runs once on the example inputs."""
    seen: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for path, module in model.named_modules():
        if path:
            def hook(_m: nn.Module, a: tuple, kw: dict, path: str = path) -> None:
                seen.setdefault(path, (a, kw))

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with evaluating(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def capture_pieces(model: nn.Module, args: tuple, kwargs: dict,
                   export: Callable[[nn.Module, tuple, dict], Captured]) -> Captured:
    """The largest submodules of ``model`` that ``export`` captures, merged; ``ValueError`` when none does."""
    inputs = record_inputs(model, args, kwargs)
    pieces: list[tuple[str, Captured]] = []

    def visit(path: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{path}.{name}" if path else name
            if sum(isinstance(m, nn.Linear) for m in child.modules()) < 2 and not isinstance(child, nn.MultiheadAttention):
                continue  # no structure to find: a lone linear stays out (a model's output layer)
            if full not in inputs:  # never called itself: a container (ModuleList of layers) or unused
                visit(full, child)
                continue
            try:
                pieces.append((full, export(child, *inputs[full])))
            except Exception:  # noqa: BLE001 - this module does not export: try its children
                visit(full, child)

    visit("", model)
    if not pieces:
        raise ValueError("no submodule with a linear layer exports on its own")
    return merge(model, pieces)


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
