"""Mixture-of-experts layers with fused 3-D expert tensors: whole experts and the neurons inside them as units.

Found from the structure (``find_expert_groups``): a module whose 3-D parameters share a leading dim E, next to a
sibling router whose masked weight is ``[E, H]`` (the router's ``F.linear`` is a linear of the graph). Which fused
tensor feeds the experts' hidden units and which reads them, the gate/up layout and where counts live are data
(``families.hf_moe``), overridden by the module's own layout flags.

Units:
- an ``expert`` GroupSet: expert e = router row e (+ bias) + ``up[e]`` + ``down[e]`` (+ ``gate[e]`` where the gate
  is a tensor of its own, + their biases). A draw
  keeps at least top_k experts per layer (``GroupSet.min_units``: the top_k best scored are never dropped), so
  top_k never changes; ``compact`` of a ticket that keeps fewer raises ``TicketMismatchError``.
- a ``neuron`` GroupSet with ``batched`` members: E*I units in runs of I (``per_group``); neuron j of expert e is
  its gate and up rows j and I+j (row j of a separate gate and of the up tensor) and its down column j. Units are
  ranked within each expert and every expert of a layer keeps the same number (one fused tensor has one width), as
  grouped-query heads are (``importance._per_group_keep``); ``round_to`` rounds that per-expert width.

Masked semantics (``install_routing``): a masked expert is never routed to. A zero router row is not enough
(logit 0 can still win top-k, and the softmax denominator would still count it), so while the router module runs
a ``TorchFunctionMode`` (entered by a forward pre-hook, left by an always-called forward hook) sets the masked
experts' logits to -inf at the output of the ``F.linear`` that reads the router weight. Softmax gives them 0, top-k
never picks them (top_k <= kept experts) and each kept expert's probability is the one the compact router (those
rows removed) computes. Invariant: ``compact(m)(x) == m(x)`` for the masked model ``m`` (``verify`` checks it).

ONNX (transformers 5.25, torch 2.14): ``export_onnx`` switches its own copy to the ``batched_mm`` experts kernel
(same function); the default ``grouped_mm`` does not export (``aten::histc``, the dense model neither) and the eager
loop is unrolled for the experts the example input hits. Compact widths are kept multiples of 16 bytes, which
``grouped_mm`` requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from ..adapters import adapter_tensors, is_tuner_layer
from ..families import hf_moe
from ..names import split_name
from ..plan import GroupSet, Member, Plan
from .routers import modules_near, outer_expert_count, per_expert, router_chain, top_k_of

__all__ = ["find_expert_groups", "install_routing", "unit_rows", "is_expert_group", "expert_layout", "ExpertLayout",
           "remove_expert_neurons", "rewrite_expert_counts", "dead_experts"]


@dataclass(frozen=True)
class ExpertLayout:
    """Where the parts of one experts container are (names relative to it)."""

    up: str
    down: str
    up_bias: str | None
    down_bias: str | None
    transposed: bool
    gated: bool
    concatenated: bool
    experts: int
    width: int  # hidden units per expert (I)
    gate: str | None = None  # a separate gate tensor shaped like ``up`` (then ``up`` holds the up half only)
    gate_bias: str | None = None

    @property
    def up_dim(self) -> int:  # the neuron dim of the up tensor
        return 2 if self.transposed else 1

    @property
    def down_dim(self) -> int:
        return 1 if self.transposed else 2

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(n for n in (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias) if n)


def expert_layout(module: nn.Module, hidden: int) -> ExpertLayout | None:
    """The layout of ``module`` if it is an experts container reading and writing width ``hidden``."""
    params = dict(module.named_parameters(recurse=False))
    up = next((n for n in hf_moe.UP_TENSORS if n in params and params[n].dim() == 3), None)
    down = next((n for n in hf_moe.DOWN_TENSORS if n in params and params[n].dim() == 3), None)
    if up is None or down is None:
        return _layout_by_shapes(module, params, hidden)
    gate = next((n for n in hf_moe.GATE_TENSORS if n != up and n in params and params[n].shape == params[up].shape), None)
    flags = {k: bool(getattr(module, k, d)) for k, d in hf_moe.LAYOUT_FLAGS.items()}
    gated = gate is not None or bool(getattr(module, "has_gate", up in hf_moe.GATED_UP))
    orientations = [flags["is_transposed"]] if hasattr(module, "is_transposed") else [False, True]
    u, d = params[up].shape, params[down].shape
    for transposed in orientations:
        u_out, u_in = (u[2], u[1]) if transposed else (u[1], u[2])
        d_out, d_in = (d[2], d[1]) if transposed else (d[1], d[2])
        if u[0] == d[0] and u_in == hidden and d_out == hidden and u_out == (2 if gated and not gate else 1) * d_in:
            break
    else:
        return None
    experts, width = int(u[0]), int(d_in)

    def bias(name: str | None, size: int) -> str | None:
        b = params.get(name + hf_moe.BIAS_SUFFIX) if name else None
        return name + hf_moe.BIAS_SUFFIX if b is not None and tuple(b.shape) == (experts, size) else None

    return ExpertLayout(up, down, bias(up, int(u_out)), bias(down, hidden), transposed, gated, flags["is_concatenated"],
                        experts, width, gate, bias(gate, int(u_out)))


def _layout_by_shapes(module: nn.Module, params: dict[str, torch.Tensor], hidden: int) -> ExpertLayout | None:
    """Names no list knows: the roles the 3-D tensors' shapes allow, when exactly one reading fits — two or three
    of them (gate, up, down in declaration order), the down one writing ``hidden`` and the others reading it, the
    experts' width differing from ``hidden`` (a square one is ambiguous)."""
    cubes = [n for n, p in params.items() if p.dim() == 3]
    if len(cubes) not in (2, 3) or hasattr(module, "is_transposed"):
        return None
    fits = []
    for down in cubes:
        ups = [n for n in cubes if n != down]
        if len(ups) == 2 and params[ups[0]].shape != params[ups[1]].shape:
            continue
        gate = ups[0] if len(ups) == 2 else None
        for transposed in (False, True):
            for fused_gate in ((False,) if gate else (False, True)):  # [E, 2I, H]: gate and up halves in one
                layout = expert_layout(_Named(module, ups[-1], down, transposed, fused_gate), hidden)
                if layout is not None and layout.width != hidden:
                    fits.append(ExpertLayout(ups[-1], down, None, None, transposed, fused_gate or gate is not None,
                                             True, layout.experts, layout.width, gate))
    return fits[0] if len(fits) == 1 else None


class _Named(nn.Module):
    """A view of an experts container under the names and orientation ``expert_layout`` reads."""

    def __init__(self, module: nn.Module, up: str, down: str, transposed: bool, gated: bool) -> None:
        super().__init__()
        self.up_proj, self.down_proj = getattr(module, up), getattr(module, down)
        self.is_transposed, self.has_gate = transposed, gated


def _router(model: nn.Module, parent: str, path: str, experts: int, masked: set[str]) -> tuple[str, nn.Module] | None:
    """The ``[experts, H]`` masked weight beside the experts: a sibling's own, or the one matrix a sibling holds."""
    for full, child in modules_near(model, parent, path):
        w = child._parameters.get("weight")
        if w is None or w.dim() != 2 or w.shape[0] != experts or f"{full}.weight" not in masked:
            continue
        holders = [model.get_submodule(p) for p in router_chain(parent, full)[1:]]
        if all(_matrices(h) == 1 for h in holders):  # not one of a shared MLP's linears
            return full, child
    return None


def _matrices(module: nn.Module) -> int:
    """The 2-D+ parameters ``module`` holds; a PEFT tuner layer (LoRA on the router) counts as its base layer."""
    if is_tuner_layer(module):
        module = module.base_layer
    return sum(p.dim() >= 2 for p in module.parameters())


def _adapter_rows(model: nn.Module, router: str, experts: int, masked: set[str]) -> list[Member]:
    """The rows of the router's adapters that go with each expert: an adapter linear writing ``experts`` outputs
    from the rank (LoRA's ``lora_B``: ``[experts, r]``), not one reading the router's input (``lora_A``: ``[r, H]``,
    whose rank may equal the expert count)."""
    hidden = model.get_parameter(f"{router}.weight").shape[1]
    rows = []
    for name, base in adapter_tensors(model).items():
        owner = model.get_submodule(name.rpartition(".")[0])
        if (base == router and name in masked and name.endswith(".weight") and isinstance(owner, nn.Linear)
                and owner.out_features == experts and owner.in_features != hidden):
            rows.append(Member(name, 0, 0, 1))
    return rows


def find_expert_groups(model: nn.Module, masked: set[str]) -> tuple[list[GroupSet], dict[str, str]]:
    """The expert and expert-neuron GroupSets of every experts container whose router weight is ``masked``, and
    why a container next to a masked router has none (keyed by the router's module)."""
    groups: list[GroupSet] = []
    skipped: dict[str, str] = {}
    for path, module in model.named_modules():
        cubes = [p for p in module.parameters(recurse=False) if p.dim() == 3]
        if len(cubes) < 2 or len({p.shape[0] for p in cubes}) != 1:
            continue
        parent = split_name(path)[0]
        found = _router(model, parent, path, int(cubes[0].shape[0]), masked)
        if found is None:
            continue
        rpath, router = found
        layout = expert_layout(module, int(router.weight.shape[1]))
        if layout is None:
            skipped[rpath] = f"no experts: {path}'s 3-D tensors have no layout ebcompile knows (families/hf_moe.py)"
            continue
        top_k = top_k_of(model, parent, rpath)
        outer = outer_expert_count(model, parent, layout.experts)
        if outer is not None:
            skipped[rpath] = (f"no whole experts: {outer} outside the MoE block reads the expert count (ERNIE-4.5-VL's "
                              "modality router: its text and vision blocks would have to keep the same experts)")
        elif layout.experts > top_k:
            members = [Member(f"{rpath}.weight", 0, 0, 1), *_adapter_rows(model, rpath, layout.experts, masked)]
            rbias = router._parameters.get("bias")
            if rbias is not None and f"{rpath}.bias" in masked | {f"{rpath}.bias"}:
                members.append(Member(f"{rpath}.bias", 0, 0, 1))
            for owner in dict.fromkeys([*router_chain(parent, rpath), parent]):  # the router's (and its children's), its holders', the block's
                members += [Member(f"{owner}.{n}" if owner else n, d, 0, 1, masked=False)
                            for n, d in per_expert(model.get_submodule(owner), layout.experts, recurse=owner == rpath)]
            members += [Member(f"{path}.{n}", 0, 0, 1) for n in layout.tensors]
            groups.append(GroupSet("expert", path, layout.experts, tuple(members), module=path, min_units=top_k))
        else:
            skipped[rpath] = f"no whole experts: top_k={top_k} of {layout.experts} experts are read for every token"
        if layout.width > 1:
            groups.append(GroupSet("neuron", path, layout.experts * layout.width, _neuron_members(path, layout),
                                   per_group=layout.width))
    return groups, skipped


def _neuron_members(path: str, lay: ExpertLayout) -> tuple[Member, ...]:
    def halves(tensor: str, dim: int) -> list[Member]:
        if lay.gate:  # the gate is a tensor of its own: this one holds the up rows alone
            return [Member(tensor, dim, 0, 1, batched=True)]
        if lay.gated and lay.concatenated:  # gate rows 0..I-1, up rows I..2I-1
            return [Member(tensor, dim, 0, 1, batched=True), Member(tensor, dim, lay.width, 1, batched=True)]
        return [Member(tensor, dim, 0, 2 if lay.gated else 1, batched=True)]  # interleaved gate/up pairs, or up alone

    members = [Member(f"{path}.{lay.gate}", lay.up_dim, 0, 1, batched=True)] if lay.gate else []
    members += [Member(f"{path}.{lay.gate_bias}", 1, 0, 1, batched=True)] if lay.gate_bias else []
    members += halves(f"{path}.{lay.up}", lay.up_dim)
    if lay.up_bias:
        members += halves(f"{path}.{lay.up_bias}", 1)
    members.append(Member(f"{path}.{lay.down}", lay.down_dim, 0, 1, batched=True))
    return tuple(members)


def is_expert_group(group: GroupSet) -> bool:
    return group.kind == "expert" or any(m.batched for m in group.members)


def unit_rows(t: torch.Tensor, m: Member, group: GroupSet) -> list[tuple[torch.Tensor, int]]:
    """Views of ``t`` (shaped like ``m``'s tensor) with ``m``'s unit index first, each with its first unit: one view
    for a plain member, one per expert (index of dim 0) for a ``batched`` one. Writing into a view writes ``t``."""
    if not m.batched:
        return [(t.narrow(m.dim, m.offset, group.units * m.unit_size).movedim(m.dim, 0), 0)]
    n, dim = group.per_group, m.dim % t.dim() - 1
    return [(t[b].narrow(dim, m.offset, n * m.unit_size).movedim(dim, 0), b * n) for b in range(t.shape[0])]


# -- masked semantics: the router never picks a masked expert ------------------------------------------------


class _RouteMask(TorchFunctionMode):
    """-inf on the dead experts' logits at the output of the ``F.linear`` that reads a ``shape`` weight."""

    def __init__(self, shape: torch.Size, dead: torch.Tensor) -> None:
        super().__init__()
        self.shape, self.dead = shape, dead

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if func is F.linear and isinstance(weight, torch.Tensor) and weight.shape == self.shape:
            out = out.masked_fill(self.dead.to(out.device), float("-inf"))
        return out


def dead_experts(router: nn.Module) -> torch.Tensor | None:
    """The experts whose router rows are masked whole, or None when every expert is live."""
    if not parametrize.is_parametrized(router, "weight"):
        return None
    mask = router.parametrizations["weight"][0]
    if not getattr(mask, "active", False):
        return None
    dead = ~mask.mask.reshape(mask.mask.shape[0], -1).any(1)
    return dead if bool(dead.any()) else None


def _enter(router: nn.Module, args: tuple) -> None:
    dead = dead_experts(router)
    if dead is not None:
        mode = _RouteMask(router.parametrizations["weight"].original.shape, dead)
        mode.__enter__()
        router.__dict__["_ebcompile_route"] = mode


def _leave(router: nn.Module, args: tuple, out: object) -> None:
    mode = router.__dict__.pop("_ebcompile_route", None)
    if mode is not None:
        mode.__exit__(None, None, None)


_enter._ebcompile = True  # strip_masks drops tagged hooks
_leave._ebcompile = True


def install_routing(model: nn.Module, plan: Plan) -> None:
    """Hooks on every expert router of ``plan`` that keep masked experts from being routed to (idempotent)."""
    for g in plan.groups:
        if g.kind != "expert":
            continue
        router = model.get_submodule(split_name(g.members[0].tensor)[0])
        if any(h is _enter for h in router._forward_pre_hooks.values()):
            continue
        router.register_forward_pre_hook(_enter)
        router.register_forward_hook(_leave, always_call=True)


# -- compact ------------------------------------------------------------------------------------------------


def remove_expert_neurons(model: nn.Module, group: GroupSet, keep: torch.Tensor, round_to: int | None) -> torch.Tensor:
    """Cut ``group``'s pruned neurons out of every expert (the same count each: the most any expert keeps, rounded
    up to ``round_to`` and capped at I; an expert keeping fewer takes back pruned, all-zero neurons). Returns the
    per-unit keep-mask used. The width is also rounded up to 16 bytes of its dtype: transformers' default
    ``grouped_mm`` experts kernel refuses rows whose stride is not a multiple of 16 bytes (a taken-back neuron is
    all zeros after the ticket, so the function is unchanged)."""
    from ..names import set_tensor, tensor_at

    n = group.per_group
    blocks = keep.reshape(-1, n).clone()
    kept = max(int(blocks.sum(1).max()), 1)
    if round_to is not None:
        kept = min(-(-kept // round_to) * round_to, n)
    align = max(16 // tensor_at(model, group.members[0].tensor).element_size(), 1)
    kept = min(-(-kept // align) * align, n)
    for row in blocks:  # take back the first pruned neurons until every expert keeps ``kept``
        extra = kept - int(row.sum())
        if extra > 0:
            row[(~row).nonzero().flatten()[:extra]] = True
    rows: dict[tuple[str, int], torch.Tensor] = {}  # (tensor, dim) -> [E, size] keep; indices no member owns stay
    for m in group.members:
        t = tensor_at(model, m.tensor)
        k = rows.setdefault((m.tensor, m.dim), torch.ones(t.shape[0], t.shape[m.dim], dtype=torch.bool))
        k[:, m.offset:m.offset + n * m.unit_size] = blocks.repeat_interleave(m.unit_size, dim=1)
    with torch.no_grad():
        for (name, dim), k in rows.items():
            t = tensor_at(model, name).detach()
            pieces = [t[b].index_select(dim - 1, k[b].nonzero().flatten().to(t.device)) for b in range(t.shape[0])]
            set_tensor(model, name, torch.stack(pieces).clone())
    return blocks.flatten()


def rewrite_expert_counts(model: nn.Module, group: GroupSet, kept: int) -> None:
    """Expert counts (``kind == "expert"``) or per-expert widths (expert neurons) on the experts container and its
    router, after their tensors were sliced; raises when fewer experts than top_k would be left."""
    from ..errors import TicketMismatchError

    module = model.get_submodule(group.module or group.name)
    if group.kind == "expert":
        if kept < group.min_units:
            raise TicketMismatchError(f"the ticket keeps {kept} experts of {group.name}, fewer than the {group.min_units} "
                                      "the router reads for every token (top_k). Fix: draw the ticket with "
                                      "ebcompile.draw_ticket, which keeps at least top_k experts per layer.")
        parent = split_name(group.module or group.name)[0]
        block = model.get_submodule(parent) if parent else model
        routers = [model.get_submodule(p) for p in router_chain(parent, split_name(group.members[0].tensor)[0])]
        for holder in (module, *routers, block):  # the block's own count only where it is the experts' count
            for attr in hf_moe.EXPERT_COUNTS:
                value = holder.__dict__.get(attr)
                if isinstance(value, int) and (holder is not block or value == group.units):
                    setattr(holder, attr, kept)
    else:
        parent = split_name(group.module or group.name)[0]
        block = model.get_submodule(parent) if parent else model
        for holder in (module, block):  # the block's own width only where it is the experts' width (DBRX's)
            for attr in hf_moe.EXPERT_WIDTHS:
                value = holder.__dict__.get(attr)
                if isinstance(value, int) and (holder is module or value == group.per_group):
                    setattr(holder, attr, kept // max(group.units // group.per_group, 1))
