"""Transform: cut the units a structured ticket removes out of a (mask-free) copy of the model.

``remove_units`` slices every group's pruned units out of its member tensors (q/k/v rows, out-projection columns,
relative-position bias columns, logit scales, FFN rows and columns, experts and their router rows, neurons inside
fused experts) and rewrites the counts that size the forward: by the attention family's ``rewrite`` hook where it has
one (``ebcompile.families``: ``nn.MultiheadAttention`` becomes ``CompactMultiheadAttention``, torchvision
``ShiftedWindowAttention``/``V2`` become ``CompactShiftedWindowAttention``/``V2``), else by the attribute table of
``transforms.counts``. ``round_to=k`` keeps widths at multiples of ``k`` by keeping a few pruned units back (their
slices are zero in the masked model, so the function is unchanged).

Invariant: does not preserve the computation by itself (a forward may still size tensors by the old widths);
``transforms.reshapes.adapt_forwards`` and the check of ``shrink.COMPACT`` restore and verify it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..adapters import sync_adapter_features
from ..analysis.experts import remove_expert_neurons, rewrite_expert_counts
from ..analysis.experts_flat import rounded_runs
from ..analysis.experts_list import is_expert_list, remove_list_experts
from ..errors import ConfigError, TicketMismatchError
from ..families import family_of
from ..families.vocabulary import is_transposed_linear
from ..names import set_tensor, split_name, tensor_at
from ..plan import GroupSet, Plan
from .counts import SLICED_BUFFERS, rewrite_counts
from .head_inputs import install as install_head_inputs
from .head_inputs import slices_for
from .reshapes import is_held_whole

__all__ = ["remove_units", "removed_indices", "fix_attributes", "record_sliced_buffers", "replace_module"]


def removed_indices(group: GroupSet, keep: torch.Tensor) -> dict[tuple[str, int], set[int]]:
    """(tensor, dim) -> the indices the pruned units of ``group`` own there."""
    pruned = [int(u) for u in (~keep).nonzero().flatten()]
    out: dict[tuple[str, int], set[int]] = {}
    for m in group.members:
        idx = out.setdefault((m.tensor, m.dim), set())
        for u in pruned:
            start = m.offset + u * m.unit_size
            idx.update(range(start, start + m.unit_size))
    return out


def fix_attributes(model: nn.Module, groups: dict[str, GroupSet], kept_heads: dict[str, tuple[int, int]]) -> None:
    """Make feature counts and head counts agree with the sliced tensors (rewrites or replaces modules)."""
    for _path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif is_transposed_linear(module):
            module.nx, module.nf = module.weight.shape  # HF Conv1D: weight [in, out], forward reads nf
        elif isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not module.transposed:
            per_group = module.out_channels // module.groups  # depthwise or grouped: whole groups cut
            module.groups, module.out_channels = module.weight.shape[0] // per_group, module.weight.shape[0]
            module.in_channels = module.groups * module.weight.shape[1]
    sync_adapter_features(model)
    for path, (heads, units) in kept_heads.items():
        if heads == units:  # nothing removed: the original module still computes the right thing
            continue
        mod = model.get_submodule(path)
        family = family_of(mod)
        if family is not None and family.rewrite is not None:  # the family knows its module best
            try:
                replacement = family.rewrite(mod, heads)
            except ConfigError as exc:
                raise ConfigError(str(exc).replace("<path>", path)) from exc
            if replacement is not None:
                replace_module(model, path, replacement)
        elif groups[path].attributes:
            for attr in groups[path].attributes:
                setattr(mod, attr, heads)
        else:  # found by the structure analysis: the attribute table of transforms.counts
            rewrite_counts(model, groups[path], heads)


def _rounded_keep(group: GroupSet, keep: torch.Tensor, round_to: int | None) -> torch.Tensor:
    """``keep`` with the first pruned units taken back so that the kept width is a multiple of ``round_to``
    (capped at the full width), and never fewer than one unit (an empty head set cannot be expressed)."""
    keep = keep.clone()
    if not keep.any():
        keep[0] = True
    if round_to is None or keep.all():
        return keep
    width = max((m.unit_size for m in group.members if m.masked), default=1)  # head_dim, or 1 for a neuron
    step = round_to // math.gcd(width, round_to)  # units per multiple of round_to
    kept = int(keep.sum())
    target = min(-(-kept // step) * step, group.units)
    extra = target - kept
    if extra > 0:  # pruned units are all zero in the masked model: any of them preserves the function
        keep[(~keep).nonzero().flatten()[:extra]] = True
    return keep


def remove_units(new: nn.Module, plan: Plan, ticket, round_to: int | None
                  ) -> tuple[dict[tuple[str, int], set[int]], dict[str, tuple[int, int]]]:
    """Slice every group's removed units out of ``new``'s tensors: the indices removed per (tensor, dim), and the
    sizes of each attention module whose heads were cut (path -> original and compact heads x head width, original
    and kept heads)."""
    removed: dict[tuple[str, int], set[int]] = {}
    kept_heads: dict[str, tuple[int, int]] = {}
    expert_lists: list[tuple[GroupSet, torch.Tensor]] = []  # experts as separate modules: removed after all slicing
    groups = {(g.module or g.name): g for g in plan.groups if g.kind == "head"}
    for g in plan.groups:
        key = f"{g.kind}:{g.name}"
        if key not in ticket.masks.units:
            raise TicketMismatchError(f"the applied ticket has no unit mask for {key}. Fix: apply a ticket drawn from this model.")
        keep = ticket.masks.units[key].bool().cpu().flatten()
        if any(m.batched for m in g.members):  # neurons inside fused experts: cut per expert, before experts go
            rewrite_expert_counts(new, g, int(remove_expert_neurons(new, g, keep, round_to).sum()))
            continue
        if g.kind == "neuron" and g.per_group:  # flat experts' neurons: every expert keeps as many
            keep = rounded_runs(keep, g.per_group, round_to)
        else:
            keep = _rounded_keep(g, keep, None if g.kind == "expert" else round_to)  # expert counts are never rounded
        if any(is_held_whole(plan, split_name(m.tensor)[0]) for m in g.members if m.masked):
            keep = torch.ones_like(keep)  # held whole (reshapes.hold_whole): its forward cannot take fewer units
        for k, idx in removed_indices(g, keep).items():
            removed.setdefault(k, set()).update(idx)
        if g.kind == "head":
            kept_heads[g.module or g.name] = (int(keep.sum()), g.units)
            if g.head_inputs:  # per-head tensors from outside (ALiBi): sliced where they enter
                install_head_inputs(new.get_submodule(g.module or g.name), slices_for(g, keep))
        elif g.kind == "expert" or g.per_group:  # whole experts, or flat experts' neurons (a per-expert width)
            rewrite_expert_counts(new, g, int(keep.sum()))
            if is_expert_list(new.get_submodule(g.module or g.name)):
                expert_lists.append((g, keep))
        else:
            rewrite_counts(new, g, int(keep.sum()))
    with torch.no_grad():
        for (name, dim), idx in removed.items():
            if not idx:
                continue
            t = tensor_at(new, name)
            keep_idx = torch.tensor([i for i in range(t.shape[dim]) if i not in idx], dtype=torch.long, device=t.device)
            set_tensor(new, name, t.detach().index_select(dim, keep_idx).clone())
    for g, keep in expert_lists:
        remove_list_experts(new, g, keep)
    fix_attributes(new, groups, kept_heads)
    widths = {}
    for path, (kept, units) in kept_heads.items():
        width = max((m.unit_size for m in groups[path].members if m.masked), default=0)
        if kept < units and width:
            widths[path] = (units * width, kept * width, units, kept)
    return removed, widths


def record_sliced_buffers(new: nn.Module, removed: dict) -> None:
    """Buffers outside the state_dict (``persistent=False``: timm EVA's zero k bias) that lost units: a fresh model's
    copy would not fit the compact one, so ``save`` stores them and ``load`` sets them."""
    hidden = {f"{p}.{b}" if p else b for p, m in new.named_modules() for b in m._non_persistent_buffers_set}
    sliced = sorted({name for (name, _), idx in removed.items() if idx and name in hidden})
    if sliced:
        new.__dict__[SLICED_BUFFERS] = sliced


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` in ``model``."""
    owner, name = split_name(path)
    setattr(model.get_submodule(owner) if owner else model, name, new)
