"""Transform: physically remove pruned heads and FFN neurons, or store an unstructured ticket sparse.

Invariant: does not preserve shapes, does preserve the function of the masked model — for every input,
``compact(m)(x) == m(x)`` up to float rounding, where ``m`` has a ticket applied. The result is an ordinary
``nn.Module`` with no mask left in it, each module in the train/eval mode and each parameter with the
``requires_grad`` it had (``transforms.carry``).

Structured tickets: ``COMPACT``, a declared pipeline (``ebcompile.pipeline``): check_options → copy_baked (a copy
with the masks multiplied in and removed) → remove_units (``transforms.remove_units``: slices, head/expert counts,
``round_to``) → adapt_forwards (``transforms.reshapes``: forwards that size tensors by the old widths) → check_function
(``transforms.verify`` on the example inputs; a module whose forward cannot take fewer units is held whole and the
pipeline runs again) → sync_config → carry_flags. Attention modules that lose no head are left as they are;
``round_to=k`` keeps widths at multiples of ``k`` (default ``ROUND_TO``, 8) by keeping a few all-zero pruned units.

Unstructured tickets: ``sparse=False`` leaves dense weights with the pruned entries zero; ``sparse=True``
replaces each masked ``nn.Linear`` by a ``SparseLinear`` holding its weight in CSR form (an
``nn.MultiheadAttention`` whose projections are masked becomes ``CompactMultiheadAttention`` first, so that
they are ``nn.Linear`` modules). ``storage_bytes`` reports what that saves.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import CompactionError, ConfigError, DistributedError, NoTicketError, NotPreparedError
from ..families.torch_mha import compact_mha
from ..modules import SparseLinear
from ..names import split_name
from ..pipeline import Pass, Pipeline, Retry, State
from ..plan import Plan
from ..search.distributed import is_sharded, unwrap
from ..search.optim_state import retarget_optimizer
from .carry import carry_flags, check_ticket_state, flags_of
from .masks import iter_masks, strip_masks
from .norm_scale import rescale_folded_norms
from .remove_units import record_sliced_buffers, remove_units, replace_module
from .reshapes import adapt_forwards, hold_whole
from .verify import check_same_function

__all__ = ["compact", "storage_bytes", "plain_model", "COMPACT"]


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
            replace_module(new, path, compact_mha(mod, mod.num_heads))
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
            replace_module(new, owner, SparseLinear.from_linear(mod))
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
    """The compact copy of ``model`` (the ``COMPACT`` pipeline); ``check=False`` leaves out the forward rewrites and
    the check on the example inputs (a shadow pass: only which slices each parameter keeps matters)."""
    cfg, ticket = _applied_ticket(model)
    return COMPACT.run(model=model, cfg=cfg, ticket=ticket, round_to=round_to, sparse=sparse, check_function=check).new


# -- the passes of compact, in order ------------------------------------------------------------------------------

def _check_options(s: State) -> None:
    s.example = getattr(s.cfg, "example", None)  # (args, kwargs), for run(check=True)
    s.structured = s.ticket.structure == "structured"
    s.round_to = _check_round_to(s.round_to, s.structured)
    if s.structured and s.sparse:
        raise ConfigError("sparse=True stores unstructured tickets; a structured ticket's compact weights are dense. "
                          "Fix: call compact(model) without sparse=True.")
    if not s.structured and s.round_to is not None:
        raise ConfigError("round_to rounds the head/neuron widths of a structured ticket; this ticket is unstructured. "
                          "Fix: drop round_to (or use sparse=True to store the pruned weights sparse).")


def _copy_baked(s: State) -> None:
    s.flags = flags_of(s.model)
    s.new = copy.deepcopy(s.model)
    strip_masks(s.new, bake=True)
    s.new.__dict__.pop("_ebcompile", None)


def _remove_units(s: State) -> None:
    s.removed, s.widths = remove_units(s.new, s.cfg.plan, s.ticket, s.round_to)
    rescale_folded_norms(s.new, s.cfg.plan)
    record_sliced_buffers(s.new, s.removed)


def _adapt_forwards(s: State) -> None:
    failed: dict[str, str] = {}
    heads = [g.module for g in s.cfg.plan.groups if g.kind == "head" and g.module is not None]  # "": the root
    adapt_forwards(s.model, s.new, list(dict.fromkeys(heads)), getattr(s.cfg, "example", None), s.removed, failed, s.widths)
    if failed and hold_whole(s.cfg.plan, failed):  # once more, those modules' units kept whole
        raise Retry


def _check_function(s: State) -> None:
    watch = [g.module if g.kind == "head" else split_name(g.name)[0] for g in s.cfg.plan.groups]
    try:
        check_same_function(s.model, s.new, getattr(s.cfg, "example", None), [w for w in dict.fromkeys(watch) if w])
    except CompactionError as exc:  # a forward raised with units cut: hold the units of the nearest scope whole
        if _hold_failing_scope(s.cfg.plan, exc):
            raise Retry from exc
        raise


def _sync_config(s: State) -> None:
    from ..persist.pretrained import attach_save_pretrained, sync_config

    sync_config(s.new)
    attach_save_pretrained(s.new)


def _sparse(s: State) -> None:
    s.new = _sparsify(s.new, sorted(s.ticket.masks.tensors))


def _carry_flags(s: State) -> None:
    carry_flags(s.new, s.flags)


def _structured(s: State) -> bool:
    return s.structured


COMPACT = Pipeline("compact", ("model", "cfg", "ticket", "round_to", "sparse", "check_function"), [
    Pass("check_options", _check_options, ("cfg", "ticket", "round_to", "sparse"), ("structured", "round_to", "example"),
         doc="round_to for structured tickets, sparse for unstructured ones"),
    Pass("copy_baked", _copy_baked, ("model",), ("new", "flags"), preserves=True,
         doc="a deep copy with the masks multiplied into the weights and removed: computes what the masked model does"),
    Pass("remove_units", _remove_units, ("new", "cfg", "ticket", "round_to"), ("removed", "widths"), preserves=False,
         when=_structured, doc="structured tickets: slice the pruned units out, rewrite head/expert counts, rescale folded norms"),
    Pass("adapt_forwards", _adapt_forwards, ("model", "new", "cfg", "removed", "widths"), (), preserves=False,
         when=lambda s: s.structured and s.check_function,
         doc=("structured tickets: rewrite forwards that size tensors by the old widths; a module that cannot take "
             "fewer units is held whole and the pipeline reruns")),
    Pass("check_function", _check_function, ("model", "new", "cfg"), (), when=lambda s: s.structured and s.check_function,
         doc=("structured tickets: the compact model computes what the masked one does on the example inputs (else "
             "the failing scope is held whole and the pipeline reruns)")),
    Pass("sync_config", _sync_config, ("new",), (), preserves=True, when=_structured,
         doc="structured tickets: the config's head counts and widths; save_pretrained"),
    Pass("sparsify", _sparse, ("new", "ticket"), (), preserves=True, when=lambda s: not s.structured and s.sparse,
         doc="unstructured tickets with sparse=True: masked linears stored as CSR (SparseLinear)"),
    Pass("carry_flags", _carry_flags, ("new", "flags"), (), preserves=True,
         doc="each module's train/eval mode and each parameter's requires_grad as they were"),
], model="new", example="example", retries=None)


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
