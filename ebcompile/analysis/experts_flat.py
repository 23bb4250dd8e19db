"""Mixture-of-experts layers whose experts are stored flat, as MegaBlocks and DBRX do: each expert tensor is one
``[E * I, H]`` parameter (DBRX's ``w1``, ``v1``, ``w2``) that the forward views as ``[E, I, H]`` — whole experts and
the neurons inside them as units.

Found from the structure and one eager run: a module without linears holding >= 2 raw 2-D parameters of one shape
``[R, H]``, and, under its parent or grandparent (outside it), a router weight ``[E, H]`` (masked, or in no captured
graph: the experts' loop exports only in pieces) with ``R = E * I``, ``I >= 2``, whose output reaches a top-k choice
(followed as in ``analysis.experts_list``). Every one of these tensors holds neuron j of expert e in row ``e*I + j``
(DBRX reads ``w2`` as ``h @ w2[e]``), so their roles need not be known:

- an ``expert`` GroupSet: expert e = router row e (+ bias) + rows ``e*I .. e*I+I-1`` of each tensor; at least top_k
  kept per layer;
- a ``neuron`` GroupSet of E*I units in runs of I (``per_group``): row ``e*I + j`` of each tensor; every expert
  keeps the same number (the view needs one width).

Compaction slices the rows (pruned experts and pruned neurons: both in original row numbers), then the expert count
and the per-expert width attributes of the container, its parent and the router (``experts.rewrite_expert_counts``:
only ints equal to the old count or width outside the container). Masked semantics as for fused experts (the router
never picks a masked expert, ``experts.install_routing``). Invariant: ``compact(m)(x) == m(x)`` (``verify`` checks).
"""

from __future__ import annotations

import torch
from torch import nn

from ..names import split_name
from ..plan import GroupSet, Member
from .routers import modules_near, top_k_of

__all__ = ["find_flat_expert_groups", "rounded_runs"]


def _flat(module: nn.Module) -> tuple[list[str], int, int] | None:
    """(names, rows, width) of ``module``'s raw 2-D parameters when there are >= 2, all of one shape, and no linear."""
    if any(isinstance(m, nn.Linear) for m in module.modules()):
        return None
    names = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 2]
    shapes = {tuple(module._parameters[n].shape) for n in names}
    if len(names) < 2 or len(shapes) != 1:
        return None
    rows, width = shapes.pop()
    return names, rows, width


def _router(model: nn.Module, path: str, rows: int, width: int, allowed) -> tuple[str, str, int] | None:
    """(router module, block, experts): a ``[E, width]`` weight with ``rows = E * I``, ``I >= 2``, under the
    container's parent or grandparent (at most two levels down, outside the container)."""
    parent = split_name(path)[0]
    for block in dict.fromkeys([parent, split_name(parent)[0] if parent else ""]):
        for full, module in modules_near(model, block, path):
            w = module._parameters.get("weight")
            if w is None or w.dim() != 2 or w.shape[1] != width or not 2 <= w.shape[0] < rows or rows % w.shape[0]:
                continue
            if rows // w.shape[0] >= 2 and allowed(f"{full}.weight"):
                return full, block, int(w.shape[0])
    return None


def find_flat_expert_groups(model: nn.Module, masked: set[str], captured: set[str], example_inputs
                            ) -> tuple[list[GroupSet], dict[str, str]]:
    """The expert and expert-neuron GroupSets of every flat experts container next to a router whose output picks
    experts (see the module docstring)."""
    from .experts_list import _choosing

    candidates = []
    for path, module in model.named_modules():
        found = _flat(module) if path else None
        if found is None:
            continue
        names, rows, width = found
        router = _router(model, path, rows, width, lambda w: w in masked or w not in captured)
        if router is not None:
            candidates.append((path, names, rows, *router))
    if not candidates or example_inputs is None:
        return [], {}
    choosing, _ = _choosing(model, sorted({c[3] for c in candidates}), [], example_inputs)
    groups = []
    for path, names, rows, rpath, block, experts in candidates:
        if rpath not in choosing:
            continue
        router, width = model.get_submodule(rpath), rows // experts
        top_k = top_k_of(model, block, rpath)
        if experts > top_k:
            members = [Member(f"{rpath}.weight", 0, 0, 1)]
            if router._parameters.get("bias") is not None:
                members.append(Member(f"{rpath}.bias", 0, 0, 1))
            members += [Member(f"{path}.{n}", 0, 0, width) for n in names]
            groups.append(GroupSet("expert", path, experts, tuple(members), module=path, min_units=top_k))
        groups.append(GroupSet("neuron", path, rows, tuple(Member(f"{path}.{n}", 0, 0, 1) for n in names), module=path,
                               per_group=width))
    return groups, {}


def rounded_runs(keep: torch.Tensor, per_group: int, round_to: int | None) -> torch.Tensor:
    """``keep`` over runs of ``per_group`` units with every run keeping the same count: the most any run keeps,
    rounded up to ``round_to`` (capped at the run); a run keeping fewer takes back its first pruned units (all zero
    in the masked model, so the function is unchanged)."""
    runs = keep.reshape(-1, per_group).clone()
    kept = max(int(runs.sum(1).max()), 1)
    if round_to is not None:
        kept = min(-(-kept // round_to) * round_to, per_group)
    for row in runs:
        extra = kept - int(row.sum())
        if extra > 0:
            row[(~row).nonzero().flatten()[:extra]] = True
    return runs.flatten()
