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
router; ``save`` records the experts each cut container kept and ``load`` cuts a fresh one alike
(``keep_experts``). Invariant: ``compact(m)(x) == m(x)`` for the masked model ``m`` (``verify`` checks it); experts
are units only where a trial on the example inputs shows that removing one computes what never routing to it does.
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
from .routers import modules_near, per_expert, top_k_of

__all__ = ["find_list_expert_groups", "is_expert_list", "remove_list_experts", "expert_list_sizes", "keep_experts"]

_CHOICE = {"topk", "argmax", "max", "sort", "argsort", "multinomial"}  # aten ops that pick experts from the logits
_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)$")
CUT = "_ebcompile_experts_cut"  # on a container remove_list_experts cut


def is_expert_list(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.ModuleDict))


def _experts(container: nn.Module) -> list[str]:
    """The keys of ``container``'s children that hold parameters (a ``Dropout`` beside the experts is none)."""
    return [k for k, m in container._modules.items() if m is not None and any(True for _ in m.parameters())]


def _equal_experts(container: nn.Module) -> int | None:
    """The expert input width when ``container`` holds >= 2 children with the same parameters and a linear."""
    children = [container._modules[k] for k in _experts(container)]
    if len(children) < 2:
        return None
    shapes = {tuple((n, tuple(p.shape)) for n, p in c.named_parameters()) for c in children}
    first = next((m for m in children[0].modules() if isinstance(m, nn.Linear)), None)
    return first.in_features if len(shapes) == 1 and next(iter(shapes)) and first is not None else None


def _router(model: nn.Module, block: str, container: str, experts: int, width: int, allowed) -> str | None:
    """The module under ``block`` (at most two levels down, outside ``container``) with an ``allowed``
    ``[experts, width]`` weight."""
    for full, module in modules_near(model, block, container):
        w = module._parameters.get("weight")
        if w is not None and tuple(w.shape) == (experts, width) and allowed(f"{full}.weight"):
            return full
    return None


class _FollowRouters(TorchFunctionMode):
    """Tags every tensor computed from a router's output with that router; records the routers whose values reach a
    top-k choice. ``untag`` removes every tag it set (none stays on a buffer an in-place op touched)."""

    def __init__(self) -> None:
        super().__init__()
        self.choosing: set[str] = set()
        self.tagged: list[torch.Tensor] = []

    def tag(self, t: torch.Tensor, tags: set[str]) -> None:
        try:
            setattr(t, TAG, getattr(t, TAG, set()) | tags)
            self.tagged.append(t)
        except (AttributeError, RuntimeError):  # a tensor that takes no attributes: not followed further
            pass

    def untag(self) -> None:
        for t in self.tagged:
            t.__dict__.pop(TAG, None)
        self.tagged = []

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
                    self.tag(leaf, tags)
        return out


TAG = "_ebcompile_router"


def _choosing(model: nn.Module, routers: list[str], blocks: list[str], example_inputs
              ) -> tuple[set[str], dict[str, tuple[tuple, dict]]]:
    """The ``routers`` whose output reaches a top-k choice when ``model`` runs once on ``example_inputs``, and the
    inputs of the first call of each of ``blocks``."""
    from ..capture.graph import normalize_inputs
    from ..transforms.verify import evaluating

    args, kwargs = normalize_inputs(example_inputs)
    mode, inputs = _FollowRouters(), {}

    def tagger(router: str):
        def hook(module: nn.Module, inputs: tuple, out) -> None:  # returns None: the output is left as it is
            for leaf in pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    mode.tag(leaf, {router})
        return hook

    def recorder(block: str):
        def hook(module: nn.Module, a: tuple, kw: dict) -> None:
            inputs.setdefault(block, (a, kw))
        return hook

    handles = [model.get_submodule(r).register_forward_hook(tagger(r)) for r in routers]
    handles += [model.get_submodule(b).register_forward_pre_hook(recorder(b), with_kwargs=True) for b in blocks]
    try:
        with evaluating(model), torch.no_grad(), mode:
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the model ran once already (capture); a failure here finds no router
        return set(), {}
    finally:
        for h in handles:
            h.remove()
        mode.untag()
    return mode.choosing, inputs


def _removal_is_exact(block: nn.Module, container: str, router: str, experts: int, inputs: tuple[tuple, dict]) -> bool:
    """Whether ``block`` (paths relative to it) computes the same with its first expert routed to -inf and with that
    expert removed (router row sliced, the rest renumbered): a forward that indexes experts by position rather than
    by the router's choice (NLLB-MoE's) or is sized by the expert count differs, and gets no expert units."""
    import copy

    from ..transforms.verify import evaluating, relative_error
    from .experts import _RouteMask

    args, kwargs = inputs
    dead = torch.zeros(experts, dtype=torch.bool)
    dead[0] = True
    lin = block.get_submodule(router)
    try:
        with evaluating(block), torch.no_grad():
            mode = _RouteMask(lin.weight.shape, dead)

            def enter(module: nn.Module, a: tuple) -> None:
                mode.__enter__()

            def leave(module: nn.Module, a: tuple, o) -> None:
                mode.__exit__(None, None, None)

            handles = [lin.register_forward_pre_hook(enter), lin.register_forward_hook(leave, always_call=True)]
            try:
                torch.manual_seed(0)
                masked = block(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            small = copy.deepcopy(block)
            small_lin = small.get_submodule(router)
            small_lin.weight = nn.Parameter(small_lin.weight[1:].clone())
            if getattr(small_lin, "bias", None) is not None:
                small_lin.bias = nn.Parameter(small_lin.bias[1:].clone())
            if isinstance(small_lin, nn.Linear):
                small_lin.out_features = experts - 1
            remove_list_experts(small, GroupSet("expert", container, experts, (Member(f"{router}.weight", 0, 0, 1),),
                                                module=container), ~dead)
            torch.manual_seed(0)
            out = small(*args, **kwargs)
        return relative_error(masked, out) <= 1e-4
    except Exception:  # noqa: BLE001 - the block does not run without its first expert: no expert units
        return False


def find_list_expert_groups(model: nn.Module, masked: set[str], captured: set[str], example_inputs
                            ) -> tuple[list[GroupSet], dict[str, str]]:
    """One ``expert`` GroupSet per experts container of separate modules next to a router whose output picks experts
    (see the module docstring). ``captured``: the parameters some captured graph reads (a router among them must be
    ``masked``: include=/exclude= and the skip rules decided it)."""

    candidates = []
    for path, container in model.named_modules():
        if not path or not is_expert_list(container):
            continue
        width = _equal_experts(container)
        if width is None:
            continue
        experts, block = len(_experts(container)), split_name(path)[0]
        rpath = _router(model, block, path, experts, width, lambda w: w in masked or w not in captured)
        if rpath is not None:
            candidates.append((path, block, rpath, experts))
    skipped: dict[str, str] = {}
    if not candidates or example_inputs is None:
        return [], skipped
    choosing, inputs = _choosing(model, sorted({c[2] for c in candidates}), sorted({c[1] for c in candidates}), example_inputs)
    groups = []
    for path, block, rpath, experts in candidates:
        router = model.get_submodule(rpath)
        # at least two kept: a router picking a second expert among the rest (NLLB-MoE's top-2) needs one to exist
        top_k = max(top_k_of(model, block, rpath), 2)
        if rpath not in choosing or experts <= top_k or block not in inputs:
            continue
        rel = len(block) + 1 if block else 0
        if not _removal_is_exact(model.get_submodule(block) if block else model, path[rel:], rpath[rel:], experts, inputs[block]):
            skipped[rpath] = (f"no whole experts: {path} computes otherwise with an expert removed than with it never "
                              "routed to (its forward indexes experts by position or is sized by their count)")
            continue
        members = [Member(f"{rpath}.weight", 0, 0, 1)]
        if router._parameters.get("bias") is not None:
            members.append(Member(f"{rpath}.bias", 0, 0, 1))
        for owner in dict.fromkeys([split_name(rpath)[0], block]):  # per-expert tensors of the router's owner, the block
            members += [Member(f"{owner}.{n}" if owner else n, d, 0, 1, masked=False)
                        for n, d in per_expert(model.get_submodule(owner) if owner else model, experts)]
        groups.append(GroupSet("expert", path, experts, tuple(members), module=path, min_units=top_k))
    return groups, skipped


def remove_list_experts(model: nn.Module, group: GroupSet, keep: torch.Tensor) -> None:
    """Drop the pruned experts from ``group``'s container (numbered keys renumbered in order) and set the expert
    counts on the modules from the block down to the router to the number kept."""
    container = model.get_submodule(group.module)
    keys = _experts(container)
    dropped = {k for k, kept in zip(keys, keep.tolist()) if not kept}
    items = [(k, m) for k, m in container._modules.items() if k not in dropped]
    numbered = [_NUMBERED.match(k) for k in keys]
    renumber = all(m is not None and int(m["index"]) == i and m["prefix"] == numbered[0]["prefix"] for i, m in enumerate(numbered))
    names, i = {}, 0
    for k, _ in items:  # kept experts renumbered 0.. in order (a forward indexes them by the router's choice)
        if k in keys:
            names[k] = f"{numbered[0]['prefix']}{i}" if renumber else k
            i += 1
    container._modules = OrderedDict((names.get(k, k), m) for k, m in items)
    container.__dict__[CUT] = True
    experts, kept = group.units, len(keys) - len(dropped)
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


def expert_list_sizes(model: nn.Module) -> dict[str, list[str]]:
    """Path -> the keys of the experts kept, for every container ``remove_list_experts`` cut (``save`` records it for
    ``load``)."""
    return {path: _experts(m) for path, m in model.named_modules() if m.__dict__.get(CUT)}


def keep_experts(model: nn.Module, kept: dict[str, list[str]]) -> None:
    """Cut each container of ``kept`` (a fresh model's, of E experts) to the experts under those keys, as the compact
    model that was saved kept them; ``ValueError`` naming the entry that does not fit."""
    for path, keys in kept.items():
        try:
            container = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the model has no experts container {path!r}") from None
        have = _experts(container) if is_expert_list(container) else []
        if not isinstance(keys, list) or not keys or any(k not in have for k in keys):
            raise ValueError(f"{path} holds the experts {have[:4]}..., not {str(keys)[:80]}")
        dropped = set(have) - set(keys)
        container._modules = OrderedDict((k, m) for k, m in container._modules.items() if k not in dropped)
        container.__dict__[CUT] = True
