"""``importance="gate"`` (EarlyBERT): one learnable coefficient per unit inside the mask parametrization, trained with
an L1 penalty the user adds (``add_gate_penalty_grad`` / ``gate_penalty``; the Trainer callback adds it itself). A
unit's score is ``|gate|``; gates fold into the weights at ``compact`` (``transforms.masks.strip_masks``).

Invariant: a gate multiplies a slice its unit's output is linear in where the plan has one (``gate_slots``), so
``|gate|`` reads as the unit's contribution; the product of the weight and its gates is what the model computes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..names import split_name
from ..plan import GroupSet, Member, Plan
from ..transforms.masks import iter_masks
from .distributed import full_vector, unwrap
from .scoring import Importance, in_dims, raw_tensor

__all__ = ["GateImportance", "gate_slots", "check_plan_kind", "gate_penalty", "add_gate_penalty_grad", "gate_parameters"]


class GateImportance(Importance):
    """One learnable coefficient per unit, on the member that scales the unit's output linearly (the input columns
    of the linear reading it: an attention output projection, an FFN's down projection) when there is one."""

    kind = "gate"

    def __init__(self, model: nn.Module, plan: Plan, structure: str) -> None:
        super().__init__(model, plan, structure)
        masks = {name: m for name, _, _, m in iter_masks(model)}
        dims = in_dims(plan)
        self.slots: dict[str, list[tuple[str, int]]] = {}  # group -> (tensor, gate index) of each piece of its gate
        for g in plan.groups:
            self.slots[f"{g.kind}:{g.name}"] = [(m.tensor, masks[m.tensor].add_gate(units, m))
                                                for m, units in gate_slots(model, g, dims, plan)]

    def _gates(self, group: GroupSet) -> list[torch.Tensor]:
        out = []
        for tensor, index in self.slots[f"{group.kind}:{group.name}"]:
            owner, attr = split_name(tensor)
            out.append(self.model.get_submodule(owner).parametrizations[attr][0].gates[index])
        return out

    def unit_scores(self, group: GroupSet) -> torch.Tensor:
        return torch.cat([full_vector(g.detach()) for g in self._gates(group)]).abs().float()


def gate_slots(model: nn.Module, group: GroupSet, dims: dict[str, int], plan: Plan) -> list[tuple[Member, int]]:
    """Where a group's gate goes, as (member, units) pieces whose gates concatenate to one per unit: a member its
    output is linear in where there is one (the input side of the linear reading the unit). Mixture-of-experts units:
    a neuron of fused experts on its column of the down tensor, expert by expert (``analysis.experts`` lists the
    tensor reading the units last); a whole fused or flat expert on its slice of that tensor; an expert held as a
    module of its own (``analysis.experts_list``) by one coefficient on the whole input of its down projection."""
    if any(m.batched for m in group.members):
        return [(group.members[-1], group.units)]
    if group.kind == "expert":
        return _expert_slots(model, group, dims, plan)
    masked = [m for m in group.members if m.masked and m.tensor in dims]
    for m in masked:
        if m.dim % 2 == dims[m.tensor]:  # the input side of a linear: scaling it scales the unit's output
            return [(m, group.units)]
    if masked:
        return [(masked[0], group.units)]
    raw = [m for m in group.members if m.masked]  # raw parameters (flat experts' neurons): the reading one is last
    if not raw:
        raise ConfigError(f"group {group.name} has no masked tensor to gate. Fix: use importance='activation'.")
    return [(raw[-1], group.units)]


def _expert_slots(model: nn.Module, group: GroupSet, dims: dict[str, int], plan: Plan) -> list[tuple[Member, int]]:
    from ..analysis.experts_list import _experts

    router = split_name(group.members[0].tensor)[0]
    own = [m for m in group.members if m.masked and split_name(m.tensor)[0] != router]
    neurons = next((g for g in plan.groups if g.kind == "neuron" and g.name == group.name), None)
    if own and neurons is not None:  # fused [E, ...] or flat [E * I, ...] tensors: the slice of the one reading
        reading = neurons.members[-1].tensor
        member = next((m for m in own if m.tensor == reading), None)
        if member is not None:
            return [(member, group.units)]
    container = model.get_submodule(group.module or group.name)
    pieces = []
    for key in _experts(container):
        prefix = f"{group.module or group.name}.{key}."
        inner = [g for g in plan.groups if g.kind == "neuron" and g.name.startswith(prefix)]
        if len(inner) != 1:
            break
        m, _ = gate_slots(model, inner[0], dims, plan)[0]
        size = raw_tensor(model, m.tensor).shape[m.dim]
        pieces.append((Member(m.tensor, m.dim, 0, size), 1))
    if len(pieces) != group.units:
        raise ConfigError(f"the experts of {group.name} have no down projection to gate. Fix: use importance='activation' "
                          "or 'taylor'.")
    return pieces


def check_plan_kind(kind: str, plan: Plan, structure: str, model: nn.Module) -> None:
    """``kind`` checked against the units ``plan`` found (prepare calls it before inserting any mask): every unit
    ``gate`` would learn a coefficient for has a member to scale."""
    if kind == "gate" and structure == "structured":
        dims = in_dims(plan)
        for g in plan.groups:
            gate_slots(model, g, dims, plan)


def gate_penalty(model: nn.Module) -> torch.Tensor:
    """The L1 norm of every unit gate (EarlyBERT): add ``l1 * gate_penalty(model)`` to the loss (e.g. l1=1e-4)."""
    gates = _gates(model)
    if not gates:
        raise ConfigError("this model has no unit gates. Fix: prepare it with importance='gate'.")
    return sum(g.abs().sum() for g in gates)


def add_gate_penalty_grad(model: nn.Module, l1: float) -> None:
    """Add the gradient of ``l1 * gate_penalty(model)`` to the gates' gradients (call it before ``optimizer.step()``;
    ``EarlyBirdCallback`` does it for the Trainer). Nothing happens on a model without gates."""
    with torch.no_grad():
        for g in _gates(model):
            if g.grad is None:
                g.grad = torch.zeros_like(g)
            g.grad.add_(torch.sign(g.detach()), alpha=l1)


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The unit gates of a model prepared with ``importance="gate"``, for an optimizer group of their own: in
    fine-tuning the model's learning rate (e.g. 5e-5) barely moves a gate that starts at 1; measured on MiniLM, a
    group at lr 1e-2 without weight decay separates the units within a few dozen steps."""
    return _gates(model)


def _gates(model: nn.Module) -> list[torch.Tensor]:
    return [g for _, _, _, m in iter_masks(unwrap(model)) for g in m.gates]
