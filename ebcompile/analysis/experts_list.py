"""Mixture-of-experts layers whose experts are separate modules (an ``nn.ModuleList`` / ``nn.ModuleDict`` of equal
MLPs: Switch Transformers, NLLB-MoE, most hand-written MoE code): whole experts as units.

Found from the structure and one eager run: a container of E >= 2 children with the same parameters (names and
shapes), each holding a linear, whose block also holds a router weight ``[E, H]`` (H: the experts' input width; masked,
or in no captured graph: such routing code often exports only in pieces) whose output reaches a top-k choice
(``topk``, ``argmax``, ``max``, ``sort``) when the model runs on the example inputs (values derived from the router's
output are followed op by op in a ``TorchFunctionMode``, so data-dependent routing loops need no graph). An
``expert`` GroupSet:
expert e = router row e (+ bias, + per-expert tensors of the block); the neurons inside each expert are found by the
structure analysis as in any FFN.

Masked semantics: the router's masked logits are -inf (``experts.install_routing``), so a masked expert is never
picked and the kept experts' weights are those the compact router computes. ``compact`` slices the router rows, then
removes the pruned experts from the container (``remove_list_experts``; numbered keys ``expert_<i>`` renumbered, so
a forward indexing by the router's choice still finds them) and rewrites the expert counts between the block and its
router; ``load`` drops the children a save does not hold (``drop_unsaved_children``). Invariant: ``compact(m)(x) ==
m(x)`` for the masked model ``m`` (``verify`` checks it).
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode

from ..families import hf_moe
from ..names import split_name
from ..plan import GroupSet, Member

__all__ = ["find_list_expert_groups", "is_expert_list", "remove_list_experts", "drop_unsaved_children"]

_CHOICE = {"topk", "argmax", "max", "sort", "argsort", "multinomial"}  # aten ops that pick experts from the logits
_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)$")


def is_expert_list(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.ModuleDict))


def _children(container: nn.Module) -> list[nn.Module]:
    return list(container._modules.values())


def _equal_experts(container: nn.Module) -> int | None:
    """The expert input width when ``container`` holds >= 2 children with the same parameters and a linear."""
    children = _children(container)
    if len(children) < 2 or any(c is None for c in children):
        return None
    shapes = {tuple((n, tuple(p.shape)) for n, p in c.named_parameters()) for c in children}
    first = next((m for m in children[0].modules() if isinstance(m, nn.Linear)), None)
    return first.in_features if len(shapes) == 1 and next(iter(shapes)) and first is not None else None


def _router(model: nn.Module, block: str, container: str, experts: int, width: int, allowed) -> str | None:
    """The module under ``block`` (at most two levels down, outside ``container``) with an ``allowed``
    ``[experts, width]`` weight."""
    owner = model.get_submodule(block) if block else model
    for name, module in owner.named_modules():
        full = f"{block}.{name}" if block and name else (name or block)
        if not name or name.count(".") > 1 or full == container or full.startswith(container + "."):
            continue
        w = module._parameters.get("weight")
        if w is not None and tuple(w.shape) == (experts, width) and allowed(f"{full}.weight"):
            return full
    return None


class _FollowRouters(TorchFunctionMode):
    """Tags every tensor computed from a router's output with that router; records the routers whose values reach a
    top-k choice."""

    def __init__(self) -> None:
        super().__init__()
        self.choosing: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tags = set()
        for leaf in pytree.tree_leaves((args, kwargs)):
            tags |= getattr(leaf, TAG, set()) if isinstance(leaf, torch.Tensor) else set()
        if tags:
            if getattr(func, "__name__", "") in _CHOICE:
                self.choosing |= tags
            for leaf in pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    _tag(leaf, tags)
        return out


TAG = "_ebcompile_router"


def _tag(t: torch.Tensor, tags: set[str]) -> None:
    try:
        setattr(t, TAG, getattr(t, TAG, set()) | tags)
    except (AttributeError, RuntimeError):  # a tensor that takes no attributes: not followed further
        pass


def _choosing(model: nn.Module, routers: list[str], example_inputs) -> set[str]:
    """The ``routers`` whose output reaches a top-k choice when ``model`` runs once on ``example_inputs``."""
    from ..capture.graph import normalize_inputs
    from ..transforms.verify import evaluating

    args, kwargs = normalize_inputs(example_inputs)
    mode = _FollowRouters()
    def tagger(router: str):
        def hook(module: nn.Module, inputs: tuple, out) -> None:  # returns None: the output is left as it is
            for leaf in pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    _tag(leaf, {router})
        return hook

    handles = [model.get_submodule(r).register_forward_hook(tagger(r)) for r in routers]
    try:
        with evaluating(model), torch.no_grad(), mode:
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the model ran once already (capture); a failure here finds no router
        return set()
    finally:
        for h in handles:
            h.remove()
    return mode.choosing


def find_list_expert_groups(model: nn.Module, masked: set[str], captured: set[str], example_inputs) -> list[GroupSet]:
    """One ``expert`` GroupSet per experts container of separate modules next to a router whose output picks experts
    (see the module docstring). ``captured``: the parameters some captured graph reads (a router among them must be
    ``masked``: include=/exclude= and the skip rules decided it)."""
    from .experts import _per_expert, _top_k

    candidates = []
    for path, container in model.named_modules():
        if not path or not is_expert_list(container):
            continue
        width = _equal_experts(container)
        if width is None:
            continue
        experts, block = len(container), split_name(path)[0]
        rpath = _router(model, block, path, experts, width, lambda w: w in masked or w not in captured)
        if rpath is not None:
            candidates.append((path, block, rpath, experts))
    if not candidates or example_inputs is None:
        return []
    choosing = _choosing(model, sorted({c[2] for c in candidates}), example_inputs)
    groups = []
    for path, block, rpath, experts in candidates:
        router = model.get_submodule(rpath)
        top_k = _top_k(router, model.get_submodule(block) if block else model)
        if rpath not in choosing or experts <= top_k:
            continue
        members = [Member(f"{rpath}.weight", 0, 0, 1)]
        if router._parameters.get("bias") is not None:
            members.append(Member(f"{rpath}.bias", 0, 0, 1))
        for owner in dict.fromkeys([split_name(rpath)[0], block]):  # per-expert tensors of the router's owner, the block
            members += [Member(f"{owner}.{n}" if owner else n, d, 0, 1, masked=False)
                        for n, d in _per_expert(model.get_submodule(owner) if owner else model, experts)]
        groups.append(GroupSet("expert", path, experts, tuple(members), module=path, min_units=top_k))
    return groups


def remove_list_experts(model: nn.Module, group: GroupSet, keep: torch.Tensor) -> None:
    """Drop the pruned experts from ``group``'s container (numbered keys renumbered in order) and set the expert
    counts on the modules from the block down to the router to the number kept."""
    container = model.get_submodule(group.module)
    items = [(k, m) for (k, m), kept in zip(container._modules.items(), keep.tolist()) if kept]
    if isinstance(container, nn.ModuleList):
        container._modules = OrderedDict((str(i), m) for i, (_, m) in enumerate(items))
    else:
        numbered = [_NUMBERED.match(k) for k, _ in container._modules.items()]
        renumber = all(m is not None and int(m["index"]) == i for i, m in enumerate(numbered))
        container._modules = OrderedDict(
            (f"{numbered[0]['prefix']}{i}" if renumber else k, m) for i, (k, m) in enumerate(items))
    experts, kept = group.units, len(items)
    router = split_name(group.members[0].tensor)[0]
    block = split_name(group.module)[0]
    holders = {block, group.module, router}
    parts = router.split(".")
    holders |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]).startswith(block)}
    for path in holders:
        holder = model.get_submodule(path) if path else model
        for attr in hf_moe.EXPERT_COUNTS:
            if holder.__dict__.get(attr) == experts:
                setattr(holder, attr, kept)


def drop_unsaved_children(model: nn.Module, saved: set[str]) -> None:
    """Remove the children of every ``nn.ModuleList`` / ``nn.ModuleDict`` that hold parameters none of which is among
    ``saved`` (state_dict names), when some of their siblings are saved: experts a compact model dropped."""
    for path, container in list(model.named_modules()):
        if not is_expert_list(container):
            continue
        prefix = f"{path}." if path else ""
        present = {k: any(f"{prefix}{k}.{n}" in saved for n, _ in m.named_parameters()) for k, m in container._modules.items()
                   if m is not None and any(True for _ in m.parameters())}
        if present and any(present.values()) and not all(present.values()):
            container._modules = OrderedDict((k, m) for k, m in container._modules.items() if present.get(k, True))
