"""``analyse``: the structure analysis alone, for models with or without weights (the meta device).

Invariant: ``analyse(model, inputs, **options).plan`` is the plan ``prepare(model, inputs, **options)`` would store
(the same linears, heads, KV groups, FFN neurons and skipped layers), and the model is left exactly as it was: no
mask, hook or attribute. Only shapes are read, so a model built under ``torch.device("meta")`` (a 70B Llama on a
laptop) is analysed like a real one; the entry points that need values (``prepare``, ``EarlyBird``,
``apply_ticket``, ``compact``, ``export_onnx``, ``save``) still refuse it with a ``ConfigError`` naming the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..persist.materialized import require_module
from ..plan import GroupSet, Plan
from .build import build_plan

__all__ = ["analyse", "Analysis"]


@dataclass
class Analysis:
    """What ``prepare`` would mask: ``plan`` (``linears``, ``groups``, ``skipped``), the ``structure`` chosen, the
    ``tensors`` that would get masks, and the model's ``parameters`` (``masked_parameters`` of them in ``tensors``).
    ``str(analysis)`` is a readable table."""

    model: str
    plan: Plan
    structure: str
    tensors: list[str]
    parameters: int
    masked_parameters: int  # elements of ``tensors``

    def counts(self) -> dict[str, int]:
        """Prunable units by kind over the model: ``heads`` (query heads pruned one by one), ``KV groups`` (a KV
        head with the query heads that read it) and ``neurons``."""
        out: dict[str, int] = {}
        for g in self.plan.groups:
            kind = unit_kind(g)
            out[kind] = out.get(kind, 0) + g.units
        return out

    def __str__(self) -> str:
        counts = ", ".join(f"{v:,} {k}" for k, v in self.counts().items()) or "no heads or neurons"
        lines = [f"{self.model}: {self.parameters:,} parameters; {self.structure} masks on {len(self.tensors)} tensors of "
                 f"{len(self.plan.linears)} linears ({self.masked_parameters:,} parameters); {counts}"]
        if self.plan.groups:
            width = max(len(g.name) for g in self.plan.groups)
            lines += [f"  {unit_kind(g):<9} {g.name:<{width}}  {g.units:>6} units  ({_unit_sizes(g)})" for g in self.plan.groups]
        lines += [f"  skipped   {name}: {why}" for name, why in self.plan.skipped.items()]
        return "\n".join(lines)


def unit_kind(group: GroupSet) -> str:
    """``"neurons"``, ``"heads"``, or ``"KV groups"`` when one unit holds more query rows than key rows."""
    if group.kind != "head":
        return "neurons" if group.kind == "neuron" else f"{group.kind}s"
    sizes = {m.unit_size for m in group.members if m.masked and m.dim == 0 and not m.tensor.endswith("bias")}
    return "KV groups" if group.per_group == 0 and len(sizes) > 1 else "heads"


def _unit_sizes(group: GroupSet) -> str:
    return ", ".join(f"{m.tensor.rsplit('.', 2)[-2]}.{m.tensor.rsplit('.', 1)[-1]}[dim {m.dim}] x{m.unit_size}"
                     for m in group.members if m.masked)


def analyse(
    model: nn.Module,
    example_inputs: Any,
    structure: str = "auto",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    prune_output_layer: bool = False,
    capture_method: str = "auto",
    kv_heads: str = "prune",
    importance: str = "magnitude",
) -> Analysis:
    """Run ``prepare``'s analysis on ``model`` without changing it, weights or not.

    Args mean what they mean for ``prepare``. ``model`` may be built on the meta device (``with
    torch.device("meta"): model = LlamaForCausalLM(config)``); ``example_inputs`` may then be CPU or meta tensors
    (only their shapes and dtypes matter: the forward runs on meta tensors). The same typed errors as ``prepare``
    (``NoPrunableLayerError``, ``CaptureError``, ``InputMismatchError``, ``ConfigError``) are raised for the same
    reasons. To prune, materialize the weights (``model.to_empty(device=...)`` and load them), then ``prepare``.
    """
    require_module(model, "analyse")
    plan, structure, _, tensors = build_plan(model, example_inputs, structure, None, include, exclude, prune_output_layer,
                                             capture_method, kv_heads, importance)
    parameters = sum(p.numel() for p in model.parameters())
    masked = sum(model.get_parameter(name).numel() for name in tensors)
    return Analysis(type(model).__name__, plan, structure, tensors, parameters, masked)
