"""Analysis: coupled structures — attention heads and FFN neurons.

Invariant: each ``GroupSet`` lists every tensor slice that must be removed together for one unit to
disappear without changing what the other units compute: a head is its q/k/v rows (and biases), its
out-projection columns and any per-head tensors (relative-position bias columns, logit scales); an FFN
neuron is its fc1 row and bias and its fc2 column. Every unit comes from one engine, the label propagation
of ``structure`` over an export graph (registered families' attention modules and fused experts aside);
residual widths are never grouped.
"""

from __future__ import annotations

from dataclasses import replace

from torch import fx, nn

from ..capture.types import Captured
from ..families import family_of
from ..names import split_name
from ..plan import GroupSet
from .experts import find_expert_groups
from .experts_flat import find_flat_expert_groups
from .experts_list import find_list_expert_groups
from .routers import graph_top_k

__all__ = ["find_groups", "attention_groups"]


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
    analysis finds in the ``torch.export`` graph (exported here when the capture was ``symbolic_trace``: the whole
    model, else its largest exportable pieces). Also returns, per linear module, why it got no group."""
    from .linears import claimed_weights
    from .structure import discover

    claimed = claimed_weights(attn)
    experts, skipped = find_expert_groups(cap.root, masked)  # fused MoE experts (analysis.experts)
    routers = {split_name(g.members[0].tensor)[0] for g in experts if g.kind == "expert"}
    graph = _export_graph(cap, example_inputs)
    if graph is None:  # nothing of the model exports: only what registered families and fused experts declare
        return attention_groups(attn, masked) + experts, skipped
    captured = set(graph[1].values())
    listed, why_not = find_list_expert_groups(cap.root, masked, captured, example_inputs)  # experts as separate modules
    flat, _ = find_flat_expert_groups(cap.root, masked, captured, example_inputs)  # experts stored [E * I, H]
    experts, skipped = [_routed_top_k(g, graph) for g in experts + listed + flat], {**why_not, **skipped}
    routers |= {split_name(g.members[0].tensor)[0] for g in experts if g.kind == "expert"}
    params = dict(cap.root.named_parameters(remove_duplicate=False))
    found, why = discover(graph[0], graph[1], params, masked, claimed, keep_kv, graph[2])
    if any(g.head_inputs for g in found):
        found, unbound = _bind(cap.root, found, example_inputs)
        why.update(unbound)
    skipped.update({k: v for k, v in why.items() if k not in routers and k not in skipped})
    return attention_groups(attn, masked) + found + experts, skipped


def _routed_top_k(group: GroupSet, graph: tuple[fx.Graph, dict[str, str], dict[str, str]]) -> GroupSet:
    """An expert group keeps at least the experts each token is routed to: the graph's ``topk`` says how many when
    it says more than the attributes did (``routers.top_k_of`` reads 1 where no attribute it knows holds it)."""
    if group.kind != "expert":
        return group
    k = graph_top_k(graph[0], graph[1], group.members[0].tensor, group.units)
    return replace(group, min_units=k) if k is not None and k > group.min_units else group


def _bind(model: nn.Module, groups: list[GroupSet], example_inputs) -> tuple[list[GroupSet], dict[str, str]]:
    """The forward argument of each per-head input (``analysis.head_inputs``), from one eager run."""
    from ..capture.graph import graph_kwargs, normalize_inputs
    from ..transforms.verify import evaluating
    from .head_inputs import bind_arguments

    args, kwargs = normalize_inputs(example_inputs)
    with evaluating(model):
        return bind_arguments(model, groups, args, graph_kwargs(model, kwargs))


def _export_graph(cap: Captured, example_inputs) -> tuple[fx.Graph, dict[str, str], dict[str, str]] | None:
    """The export graph with its node -> parameter and node -> buffer names: the capture's own, else the whole
    model exported, else its largest submodules that export (``capture_pieces``); None when none does."""
    if cap.method == "export":
        return cap.graph, cap.param_of, cap.buffer_of
    if example_inputs is None:
        return None
    from ..capture.graph import CAPTURE_PATHS, normalize_inputs

    args, kwargs = normalize_inputs(example_inputs)
    for path in ("export", "pieces"):
        try:
            exported = CAPTURE_PATHS[path](cap.root, args, kwargs)
        except Exception:  # noqa: BLE001 - this path cannot capture the model: try the next
            continue
        return exported.graph, exported.param_of, exported.buffer_of
    return None
