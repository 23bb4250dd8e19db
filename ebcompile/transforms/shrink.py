"""Transform: physically remove pruned heads and FFN neurons, or store an unstructured ticket sparse.

Invariant: does not preserve shapes, does preserve the function of the masked model — for every input,
``compact(m)(x) == m(x)`` up to float rounding, where ``m`` has a ticket applied. The result is an ordinary
``nn.Module`` with no mask left in it, each module in the train/eval mode and each parameter with the
``requires_grad`` it had (``transforms.carry``).

Structured tickets: the pruned units' slices are cut out of every member tensor of their group (q/k/v rows,
out-projection columns, relative-position bias columns, logit scales, FFN rows and columns). Head counts are
rewritten where they live: by the attention family's ``rewrite`` hook where it has one
(``ebcompile.families``: ``nn.MultiheadAttention`` becomes ``CompactMultiheadAttention`` and torchvision
``ShiftedWindowAttention``/``V2`` become ``CompactShiftedWindowAttention``/``V2``, whose functional forms take the
head width from the residual width, wrong once heads are gone); otherwise the attribute table of
``transforms.counts``.
Attention modules that lose no head are left as they are. ``round_to=k`` keeps widths (``heads * head_dim``, FFN neurons) at
multiples of ``k`` by keeping a few pruned units back: their masked slices are zero in the masked model, so
the function is unchanged; widths never exceed the original ones. The default rounds to ``ROUND_TO`` (8).

Unstructured tickets: ``sparse=False`` leaves dense weights with the pruned entries zero; ``sparse=True``
replaces each masked ``nn.Linear`` by a ``SparseLinear`` holding its weight in CSR form (an
``nn.MultiheadAttention`` whose projections are masked becomes ``CompactMultiheadAttention`` first, so that
they are ``nn.Linear`` modules). ``storage_bytes`` reports what that saves.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..adapters import sync_adapter_features
from ..analysis.experts import remove_expert_neurons, rewrite_expert_counts
from ..analysis.experts_flat import rounded_runs
from ..analysis.experts_list import is_expert_list, remove_list_experts
from ..errors import CompactionError, ConfigError, DistributedError, NoTicketError, NotPreparedError, TicketMismatchError
from ..families import family_of
from ..families.torch_mha import compact_mha
from ..families.vocabulary import is_transposed_linear
from ..modules import SparseLinear
from ..names import set_tensor, split_name, tensor_at
from ..plan import GroupSet, Plan
from ..search.distributed import is_sharded, unwrap
from ..search.optim_state import retarget_optimizer
from .carry import carry_flags, check_ticket_state, flags_of
from .counts import SLICED_BUFFERS, rewrite_counts
from .head_inputs import install as install_head_inputs
from .head_inputs import slices_for
from .masks import iter_masks, strip_masks
from .norm_scale import rescale_folded_norms
from .reshapes import adapt_forwards, hold_whole, is_held_whole
from .verify import check_same_function

__all__ = ["compact", "storage_bytes", "removed_indices", "set_tensor", "fix_attributes", "plain_model"]


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
                _replace(model, path, replacement)
        elif groups[path].attributes:
            for attr in groups[path].attributes:
                setattr(mod, attr, heads)
        else:  # found by the structure analysis: the attribute table of transforms.counts
            rewrite_counts(model, groups[path], heads)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    owner, name = split_name(path)
    setattr(model.get_submodule(owner) if owner else model, name, new)


def _applied_ticket(model: nn.Module):
    cfg = getattr(model, "_ebcompile", None)
    if cfg is None:
        raise NotPreparedError(
            f"{type(model).__name__} was not prepared by ebcompile, so it has no ticket to compact to. Fix: "
            "ebcompile.prepare(model, example_inputs, ...), find a ticket with EarlyBird, "
            "ebcompile.apply_ticket(model, eb.ticket), then compact(model)."
        )
    ticket = getattr(cfg, "ticket", None)
    if ticket is None:
        raise NoTicketError(
            f"no ticket is applied to this {type(model).__name__}: its masks are not frozen, so compact has nothing "
            "to remove. Fix: call ebcompile.apply_ticket(model, ticket) (ticket = EarlyBird(...).ticket or "
            "Ticket.load(path)) before compact(model)."
        )
    masks = list(iter_masks(model))
    if not masks or not all(m.frozen for *_, m in masks):
        raise NoTicketError(
            "the masks of the applied ticket are no longer on this model (stripped or replaced). "
            "Fix: apply_ticket(model, ticket) again before compact(model)."
        )
    return cfg, ticket


ROUND_TO = 8  # measured: a compact small RoBERTa step at 0.78x dense with widths at multiples of 8, 0.87x without (same MACs)


def _check_round_to(round_to: int | str | None, structured: bool) -> int | None:
    if round_to == "auto":
        return ROUND_TO if structured else None
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to={round_to!r} must be 'auto', None or an integer >= 1. Fix: e.g. round_to=8, or None for "
                          "exactly the ticket's units.")
    return None if round_to == 1 else round_to


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


def _remove_units(new: nn.Module, plan: Plan, ticket, round_to: int | None
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


def _record_sliced_buffers(new: nn.Module, removed: dict) -> None:
    """Buffers outside the state_dict (``persistent=False``: timm EVA's zero k bias) that lost units: a fresh model's
    copy would not fit the compact one, so ``save`` stores them and ``load`` sets them."""
    hidden = {f"{p}.{b}" if p else b for p, m in new.named_modules() for b in m._non_persistent_buffers_set}
    sliced = sorted({name for (name, _), idx in removed.items() if idx and name in hidden})
    if sliced:
        new.__dict__[SLICED_BUFFERS] = sliced


def _sparsify(new: nn.Module, tensors: list[str]) -> nn.Module:
    """Every masked ``nn.Linear`` weight of ``new`` as a ``SparseLinear``; returns the (maybe new) root."""
    targets = set(tensors)
    keep_dense: set[str] = set()  # Linear children of attention modules that read them in fused kernels
    for path, mod in list(new.named_modules()):
        if not path or not isinstance(mod, nn.MultiheadAttention):
            continue
        names = {f"{path}.in_proj_weight": f"{path}.in_proj.weight", f"{path}.out_proj.weight": f"{path}.out_proj.weight"}
        if not targets & set(names):
            continue
        if mod._qkv_same_embed_dim and mod.bias_k is None and not mod.add_zero_attn:
            _replace(new, path, compact_mha(mod, mod.num_heads))
            targets = {names.get(t, t) for t in targets}
        else:  # left dense: nn.MultiheadAttention's fused path needs strided weights
            keep_dense.add(f"{path}.out_proj")
    modules = dict(new.named_modules())
    for name in sorted(targets):
        owner, attr = split_name(name)
        mod = modules.get(owner)
        if attr != "weight" or type(mod) not in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear) or owner in keep_dense:
            continue  # e.g. Hugging Face Conv1D: left dense (pruned entries zero)
        if owner:
            _replace(new, owner, SparseLinear.from_linear(mod))
        else:
            new = SparseLinear.from_linear(mod)
    return new


def compact(model: nn.Module, round_to: int | str | None = "auto", sparse: bool = False,
            optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """A new module computing what the masked ``model`` computes, with the pruned parts gone (``model`` is
    left as it is).

    Args:
        model: a prepared model with a ticket applied (``ebcompile.apply_ticket``).
        round_to: structured tickets only. ``k`` keeps every attention width (``heads * head_dim``) and FFN
            width at a multiple of ``k`` where the original width allows, by keeping some pruned (all-zero)
            units: the function is unchanged and no width exceeds the original. ``"auto"`` (default): 8 for a
            structured ticket (tensor-core shapes on GPU; on the CPU a small RoBERTa's compact step measured
            0.78x a dense one at 182 -> 184 FFN neurons, 0.87x without); ``None``: exactly the ticket's units.
        sparse: unstructured tickets only. ``True`` stores each masked ``nn.Linear`` weight as CSR
            (``ebcompile.modules.SparseLinear``); ``False`` keeps dense weights with zeros.
        optimizer: the optimizer training ``model``; if given, it is moved in place onto the compacted
            model's parameters with its state (momentum, Adam moments, step) sliced like the weights, so
            retraining the compact model continues exactly where the masked one was (a scheduler attached
            to it keeps working). Structured tickets only (an unstructured compact model has no masks left
            to hold its zeros: keep training the masked model and compact afterwards). The padding units
            ``round_to`` keeps are ordinary zero weights: they stay zero while their activation of 0 is 0
            (ReLU, GELU, SiLU, gated units), and train like the other units otherwise (e.g. sigmoid).

    Raises:
        NotPreparedError: ``model`` was not prepared; ``NoTicketError`` (a subclass): no ticket applied.
        TicketStateError: the masks no longer match the applied ticket (a state_dict from before apply_ticket).
        CompactionError: the compact model does not compute what the masked one does.
        ConfigError: ``round_to`` with an unstructured ticket, ``sparse=True`` with a structured one, or a
            bad ``round_to``.
    """
    from ..persist.materialized import require_materialized, require_module

    require_module(model, "compact")
    require_materialized(model, "compact")
    model = unwrap(model)
    if any(is_sharded(p) for p in model.parameters()):
        raise DistributedError("compact needs the whole model, and this one is sharded (FSDP2). Fix: gather it first: "
                               "state = ebcompile.search.distributed.full_state_dict(model) on every rank, then on rank 0 "
                               "plain = ebcompile.prepare(build_model(), example); plain.load_state_dict(state); "
                               "ebcompile.apply_ticket(plain, ticket); ebcompile.compact(plain) (README: multi-process).")
    _, ticket = _applied_ticket(model)
    check_ticket_state(model, ticket)
    if optimizer is not None and ticket.structure != "structured":
        raise ConfigError("optimizer= carries training state onto a compact structured ticket; this ticket is unstructured and "
                          "its compact model has no masks to keep the pruned weights at zero. Fix: keep training the masked "
                          "model with its optimizer and call compact(model) when done.")
    new = _compact(model, round_to, sparse)
    if optimizer is not None:
        # shadow passes carry state tensors, not weights: the forward rewrites and the check on the example inputs,
        # done once above, would only run the model three more times (AdamW) on values that mean nothing
        retarget_optimizer(optimizer, model, new, lambda m: _compact(m, round_to, sparse, check=False))
    return new


def _compact(model: nn.Module, round_to: int | None, sparse: bool, check: bool = True) -> nn.Module:
    """The compact copy of ``model``; ``check=False`` leaves out the forward rewrites and the check on the example
    inputs (a shadow pass: only which slices each parameter keeps matters)."""
    cfg, ticket = _applied_ticket(model)
    structured = ticket.structure == "structured"
    round_to = _check_round_to(round_to, structured)
    if structured and sparse:
        raise ConfigError("sparse=True stores unstructured tickets; a structured ticket's compact weights are dense. "
                          "Fix: call compact(model) without sparse=True.")
    if not structured and round_to is not None:
        raise ConfigError("round_to rounds the head/neuron widths of a structured ticket; this ticket is unstructured. "
                          "Fix: drop round_to (or use sparse=True to store the pruned weights sparse).")
    flags = flags_of(model)
    new = copy.deepcopy(model)
    strip_masks(new, bake=True)
    new.__dict__.pop("_ebcompile", None)
    if structured:
        removed, widths = _remove_units(new, cfg.plan, ticket, round_to)
        rescale_folded_norms(new, cfg.plan)
        _record_sliced_buffers(new, removed)
        watch = [g.module if g.kind == "head" else split_name(g.name)[0] for g in cfg.plan.groups]
        heads = [g.module for g in cfg.plan.groups if g.kind == "head" and g.module]
        if check:
            failed: dict[str, str] = {}
            adapt_forwards(model, new, list(dict.fromkeys(heads)), getattr(cfg, "example", None), removed, failed, widths)
            if failed and hold_whole(cfg.plan, failed):  # once more, those modules' units kept whole
                return _compact(model, round_to, sparse, check)
            try:
                check_same_function(model, new, getattr(cfg, "example", None), [w for w in dict.fromkeys(watch) if w])
            except CompactionError as exc:  # a forward raised with units cut: hold the units of the nearest scope whole
                if _hold_failing_scope(cfg.plan, exc):
                    return _compact(model, round_to, sparse, check)
                raise
        from ..persist.pretrained import attach_save_pretrained, sync_config

        sync_config(new)
        attach_save_pretrained(new)
    elif sparse:
        new = _sparsify(new, sorted(ticket.masks.tensors))
    carry_flags(new, flags)
    return new


def _hold_failing_scope(plan: Plan, exc: CompactionError) -> bool:
    """After the compact model raised in module ``exc.module``: hold whole (``reshapes.hold_whole``) the units of that
    module, else of its nearest enclosing module that has units (the model itself excluded). A forward may size one
    tensor by another's width (``expand_as``, ``torch.cat`` with a literal), which the export graph's static shapes do
    not show; kept whole, the model compacts exactly. False when nothing new could be held (the error stands)."""
    path = getattr(exc, "module", None)
    while path:
        if hold_whole(plan, {path: getattr(exc, "cause", str(exc))}):
            return True
        path = split_name(path)[0]
    return False


def storage_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the parameters and buffers of ``model``.

    Returns ``{"dense": ..., "sparse": ..., "sparse_layers": n}``: ``"sparse"`` counts what is stored
    (a ``SparseLinear`` weight as its CSR values and indices), ``"dense"`` the same model with every
    ``SparseLinear`` weight stored as a dense ``[out, in]`` matrix instead. Equal when there is no
    ``SparseLinear``. Shared tensors are counted once.
    """
    seen: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(id(t), t)
    stored = sum(t.numel() * t.element_size() for t in seen.values())
    dense, layers = stored, 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            csr = sum(t.numel() * t.element_size() for t in (m.values, m.crow_indices, m.col_indices))
            dense += m.in_features * m.out_features * m.values.element_size() - csr
            layers += 1
    return {"dense": dense, "sparse": stored, "sparse_layers": layers}


def plain_model(model: nn.Module) -> nn.Module:
    """The model to export or save: a prepared model is compacted (structured ticket) or has its masks baked in; a
    DistributedDataParallel wrapper gives the model inside."""
    model = unwrap(model)
    cfg = getattr(model, "_ebcompile", None)
    if cfg is None:
        return model
    if getattr(cfg, "ticket", None) is not None:
        return compact(model)
    new = copy.deepcopy(model)
    strip_masks(new, bake=True)
    new.__dict__.pop("_ebcompile", None)
    return new
