"""The masks that pruning at ratio p would give now, from an importance kind's scores.

Importance (how much a weight or a group matters: ``ebcompile.search.scoring`` and ``ebcompile.search.scorers``) is kept apart
from which units the scores remove (here), when masks are drawn (the controller) and how they are applied
(``ticket``), as in torch.ao.pruning and Torch-Pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..analysis.experts import unit_rows
from ..plan import GroupSet, Plan
from .distributed import is_sharded
from .scoring import Importance, raw_tensor, unit_slice_scores
from .sharded_masks import unstructured_sharded

__all__ = ["Masks", "compute_masks", "raw_tensor", "expand_units", "hamming"]


@dataclass
class Masks:
    """Boolean keep-masks: per tensor (``tensors``) and, for structured pruning, per group set (``units``)."""

    structure: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    units: dict[str, torch.Tensor] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # unit key -> "head" | "neuron"

    def compared(self) -> dict[str, torch.Tensor]:
        """The vectors distances are measured on: units for structured masks, tensors otherwise."""
        return self.units if self.structure == "structured" else self.tensors

    def kind_of(self, key: str) -> str:
        return self.kinds.get(key, "weight")

    def pruned_fraction(self) -> float:
        vecs = list(self.compared().values())
        total = sum(v.numel() for v in vecs)
        return sum(int((~v).sum()) for v in vecs) / max(total, 1)


def group_scores(model: nn.Module, group: GroupSet) -> torch.Tensor:
    """Root mean square of each unit's weights over all its masked slices (q/k/v rows + out columns; fc1 row +
    bias + fc2 column): the L2 norm over the square root of the unit's element count. Within a layer this ranks
    like the L2 norm; across layers of different widths (Swin's stages) it keeps a global ranking from pruning the
    narrow layers first only because their units hold fewer weights (Transformers initialise every weight alike).

    Sums of squares are taken per index along each member's unit dim first, so a sharded (FSDP2) tensor
    contributes from its local shard and only that small vector crosses processes."""
    return unit_slice_scores(model, group, lambda _, t: t.float().pow(2), "rms")


def expand_units(model: nn.Module, group: GroupSet, keep: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """AND the unit keep-mask of ``group`` into per-tensor masks in ``out`` (masked members only)."""
    for m in group.members:
        if not m.masked:
            continue
        t = raw_tensor(model, m.tensor)
        mask = out.setdefault(m.tensor, torch.ones(t.shape, dtype=torch.bool, device=t.device))
        for rows, first in unit_rows(mask, m, group):  # views into mask (one per expert for a batched member)
            keep_rows = keep[first:first + rows.shape[0] // m.unit_size].to(mask.device).repeat_interleave(m.unit_size)
            rows &= keep_rows.reshape((-1,) + (1,) * (rows.dim() - 1))


def _bottom_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask that drops exactly the k lowest scores, ties at the threshold dropped in position order (the
    rule ``sharded_masks`` follows across processes, so one process and many draw the same masks)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    threshold = scores.kthvalue(k).values
    below, tied = scores < threshold, scores == threshold
    need = k - int(below.sum())
    return ~below & ~(tied & (tied.cumsum(0) <= need))


def compute_masks(model: nn.Module, plan: Plan, ratio: float, structure: str, scope: str,
                  importance: Importance | None = None) -> Masks:
    """The keep-masks that pruning at ``ratio`` gives now, ranking by ``importance`` (default: magnitude). A
    data-aware kind must have had ``begin_draw`` called (``prepare.current_masks`` does it)."""
    importance = importance or Importance(model, plan, structure)
    with torch.no_grad():
        if structure == "unstructured":
            return _unstructured(model, plan, ratio, scope, importance)
        return _structured(model, plan, ratio, scope, importance)


def _unstructured(model: nn.Module, plan: Plan, ratio: float, scope: str, importance: Importance) -> Masks:
    names = [op.weight for op in plan.linears]
    scored = [importance.element_scores(n) for n in names]
    if any(is_sharded(t) for t in scored):
        return Masks("unstructured", unstructured_sharded(model, names, ratio, scope, scored))
    tensors = [t.flatten() for t in scored]
    masks = Masks("unstructured")
    if scope == "global":
        flat = torch.cat([t.to(tensors[0].device) for t in tensors])
        keep = _bottom_k(flat, round(ratio * flat.numel()))
        for name, piece in zip(names, keep.split([t.numel() for t in tensors])):
            masks.tensors[name] = piece.reshape(raw_tensor(model, name).shape)
    else:
        for name, t in zip(names, tensors):
            masks.tensors[name] = _bottom_k(t, round(ratio * t.numel())).reshape(raw_tensor(model, name).shape)
    return masks


def _structured(model: nn.Module, plan: Plan, ratio: float, scope: str, importance: Importance) -> Masks:
    masks = Masks("structured")
    by_kind: dict[str, list[GroupSet]] = {}
    for g in plan.groups:
        by_kind.setdefault(g.kind, []).append(g)
    for kind, groups in by_kind.items():
        raw = [importance.unit_scores(g) for g in groups]
        scores = [_ranked(r, g) for r, g in zip(raw, groups)]
        local = [scope != "global" or importance.layer_ranked(g) for g in groups]
        keeps = [_bottom_k(s, _layer_quota(s.numel(), g, ratio)) if here else None
                 for s, g, here in zip(scores, groups, local)]
        pool = [i for i, here in enumerate(local) if not here]
        if pool:
            # every set keeps its best unit (an MoE layer its top_k best experts): +inf is never among the k lowest
            guarded = []
            for i in pool:
                s = scores[i].clone()
                s[s.topk(min(groups[i].min_units, s.numel())).indices] = float("inf")
                guarded.append(s)
            flat = torch.cat(guarded)
            k = min(round(ratio * flat.numel()), flat.numel() - sum(min(groups[i].min_units, groups[i].units) for i in pool))
            for i, keep in zip(pool, _bottom_k(flat, k).split([scores[i].numel() for i in pool])):
                keeps[i] = keep
        keeps = [_per_group_keep(r, g, keep) for r, g, keep in zip(raw, groups, keeps)]
        for g, keep in zip(groups, keeps):
            key = f"{g.kind}:{g.name}"
            masks.units[key] = keep
            masks.kinds[key] = kind
            expand_units(model, g, keep, masks.tensors)
    for op in plan.linears:  # masked linears outside every group (e.g. Swin's patch merging) keep all weights
        if op.weight not in masks.tensors:
            t = raw_tensor(model, op.weight)
            masks.tensors[op.weight] = torch.ones(t.shape, dtype=torch.bool, device=t.device)
    return masks


def _ranked(scores: torch.Tensor, group: GroupSet) -> torch.Tensor:
    """Grouped query heads (``per_group``) are removed the same number per KV group: score rank ``j`` of every
    group by the mean of the groups' ``j``-th smallest scores (sorted, so that lower ranks go first)."""
    if group.per_group <= 1:
        return scores
    ranks = scores.reshape(-1, group.per_group).sort(dim=1).values.mean(0)
    return ranks.repeat_interleave(scores.numel() // group.per_group)


def _layer_quota(units: int, group: GroupSet, ratio: float) -> int:
    """Units a layer-scope ranking removes from ``group`` (grouped query heads: whole ranks, one per KV group)."""
    if group.per_group > 1:
        return min(round(ratio * group.per_group), group.per_group - 1) * (units // group.per_group)
    return min(round(ratio * units), units - min(group.min_units, units))


def _per_group_keep(scores: torch.Tensor, group: GroupSet, keep: torch.Tensor) -> torch.Tensor:
    """Turn a keep-mask over ranks back into one over query heads: each KV group drops its lowest ``c``."""
    if group.per_group <= 1:
        return keep
    n = group.per_group
    drop = min(int((~keep).sum()) // (scores.numel() // n), n - 1)
    blocks = scores.reshape(-1, n)
    out = torch.ones_like(blocks, dtype=torch.bool)
    if drop:
        out.scatter_(1, blocks.topk(drop, dim=1, largest=False).indices, False)
    return out.flatten()


def hamming(a: Masks, b: Masks) -> dict[str, float]:
    """Normalized Hamming distance, overall and per structure kind."""
    va, vb = a.compared(), b.compared()
    diff: dict[str, int] = {}
    size: dict[str, int] = {}
    for key, x in va.items():
        kind = a.kind_of(key)
        diff[kind] = diff.get(kind, 0) + int((x != vb[key].to(x.device)).sum())
        size[kind] = size.get(kind, 0) + x.numel()
    out = {"overall": sum(diff.values()) / max(sum(size.values()), 1)}
    out.update({k: diff[k] / max(size[k], 1) for k in sorted(diff)})
    return out
