"""Importance kinds: how much each weight or unit matters, from the weights alone or from the data training sees.

``prepare(..., importance=kind)`` picks one; the controller (when masks are drawn) and the ticket (how they are
applied) are the same for every kind.

- ``"magnitude"``: the weights alone (RMS of a unit's weights; ``|w|`` per weight).
- ``"taylor"``: first-order Taylor, ``|w * dL/dw|`` summed over a unit's weights (LLM-Pruner), averaged over every
  optimizer step since ``prepare``. Read from the gradients in an optimizer pre-step hook: nothing in the
  training loop changes, gradient accumulation and AMP's unscaled gradients included.
- ``"activation"``: ``|w_ij| * rms(x_j)`` (Wanda; per unit its mean, as in FLAP / Minitron), the RMS of every
  input feature of every masked linear over every forward pass since ``prepare``. Works with frozen weights
  (LoRA), where the weights never move and magnitude cannot find a ticket.

The data statistics are cumulative means, not per-window ones: a few batches between checks give a noisy
ranking whose distance to the previous one never falls (measured: 4-7% of MiniLM's neurons flipping at every
check of 10 steps), while a mean over all the data seen so far settles, and the early-bird rule then measures
what it should: that more data no longer changes the ranking. A check still needs new data since the last one.
- ``"gate"``: EarlyBERT. A learnable coefficient per head / KV group / neuron, inside the mask parametrization,
  scales the unit's output; ``gate_penalty(model)`` is the L1 term to add to the loss (``EarlyBirdCallback`` adds
  its gradient itself). Scores are ``|gate|``; ``compact`` and ``export_onnx`` fold the gates into the weights.

Invariants: trackers only observe (hooks read inputs and gradients, never change them), and stop observing once
a ticket is applied; every score is >= 0; under DDP the statistics are summed over ranks before masks are drawn,
so every rank draws the same masks; under FSDP2 each rank reduces its own shard first (small vectors cross).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..errors import ConfigError, ImportanceDataError
from ..names import split_name
from ..plan import GroupSet, Member, Plan
from .distributed import full_vector, is_sharded, masked, world

__all__ = ["Importance", "raw_tensor", "unit_slice_scores", "register_taylor", "unregister_taylor", "all_reduce_sum", "member_key",
           "sharded_product", "in_dims", "check_window"]


def raw_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The stored (unmasked) tensor behind ``name``, parametrized or not."""
    owner, attr = split_name(name)
    module = model.get_submodule(owner)
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


_raw = raw_tensor


def unit_slice_scores(model: nn.Module, group: GroupSet, element: Callable[[Member, torch.Tensor], torch.Tensor | None],
                      finish: str) -> torch.Tensor:
    """Per-unit scores of ``group``: ``element(member, raw)`` gives a tensor shaped (and sharded) like the member's raw
    tensor, or None to leave that member out; values are summed over each unit's slices and then ``finish``-ed:
    ``"rms"`` (sqrt of the mean), ``"mean"`` or ``"sum"``.

    Sums are taken per index along each member's unit dim first, so a sharded (FSDP2) tensor contributes from its
    local shard and only that small vector crosses processes."""
    total, count = None, 0
    for m in group.members:
        if not m.masked:
            continue
        raw = _raw(model, m.tensor).detach()
        t = element(m, raw)
        if t is None:
            continue
        dim, offset = m.dim % t.dim(), m.offset
        if m.batched:  # one expert's slice per run of units (analysis.experts): sum each expert's rows
            from ..analysis.experts import unit_rows

            count += m.unit_size * math.prod(n for d, n in enumerate(t.shape) if d not in (0, dim))
            units = torch.cat([r.reshape(r.shape[0], -1).sum(1).reshape(-1, m.unit_size).sum(1) for r, _ in unit_rows(t, m, group)])
            total = units if total is None else total + units.to(total.device)
            continue
        count += m.unit_size * math.prod(n for d, n in enumerate(t.shape) if d != dim)
        if not is_sharded(t):  # only the member's slice; a sharded tensor is summed whole on its local shard
            t, offset = t.narrow(dim, offset, group.units * m.unit_size), 0
        other = [d for d in range(t.dim()) if d != dim]
        per_index = full_vector(t.sum(other) if other else t)
        units = per_index.narrow(0, offset, group.units * m.unit_size).reshape(group.units, m.unit_size).sum(1)
        total = units if total is None else total + units.to(total.device)
    if total is None:
        raise ConfigError(f"group {group.name} has no member to score. Fix: use importance='magnitude'.")
    if finish == "sum":
        return total
    mean = total / max(count, 1)
    return mean.sqrt() if finish == "rms" else mean


class Importance:
    """Scores weights (unstructured) and units (structured). Subclasses add hooks and statistics."""

    kind = "magnitude"

    def __init__(self, model: nn.Module, plan: Plan, structure: str) -> None:
        self.plan, self.structure = plan, structure
        self._model = weakref.ref(model)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise ConfigError("the model this importance tracker belonged to is gone. Fix: prepare the model again.")
        return model

    def _stopped(self) -> bool:
        """True once a ticket is applied: the search is over, and so is observing."""
        cfg = getattr(self._model(), "_ebcompile", None)
        return cfg is None or cfg.ticket is not None

    # -- drawing -------------------------------------------------------------------------------------
    def begin_draw(self, fresh: bool, sync: bool = True) -> None:
        """Called before a draw; ``fresh``: the draw is a check, which needs data seen since the last check.
        Raises ImportanceDataError (nothing changed) when the kind has nothing to score from."""

    def end_draw(self, fresh: bool) -> None:
        """Called after a draw; a check (``fresh``) starts a new window of statistics."""

    def layer_ranked(self, group: GroupSet) -> bool:
        """Whether ``group``'s last scores are on another scale than the kind's (a fallback): a global ranking then
        ranks its units within the group, at the layer quota, instead of against every other group."""
        return False

    def element_scores(self, name: str) -> torch.Tensor:
        return _raw(self.model, name).detach().abs().float()

    def unit_scores(self, group: GroupSet) -> torch.Tensor:
        return unit_slice_scores(self.model, group, lambda _, t: t.float().pow(2), "rms")

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"importance {self.kind!r} keeps no statistics, got {sorted(state)[:3]}")

    def close(self) -> None:
        """Remove hooks (the model goes back to being observed by nothing)."""


def in_dims(plan: Plan) -> dict[str, int]:
    """masked weight name -> the dim that indexes its input features (1 for nn.Linear, 0 for Conv1D)."""
    return {op.weight: 1 - op.out_dim for op in plan.linears}


def check_window(kind: str, seen: int, fix: str) -> None:
    if not seen:
        raise ImportanceDataError(f"importance={kind!r} has seen no {'forward pass' if kind == 'activation' else 'gradient'} "
                                  f"since the last check. Fix: {fix}")


_TAYLOR: weakref.WeakSet[Any] = weakref.WeakSet()
_TAYLOR_HOOK: Any = None


def _taylor_pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Optimizer pre-step hook: every live Taylor tracker reads the gradients this optimizer is about to apply."""
    if not _TAYLOR:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for tracker in list(_TAYLOR):
        tracker.observe(stepped)


def register_taylor(tracker: Any) -> None:
    global _TAYLOR_HOOK
    _TAYLOR.add(tracker)
    if _TAYLOR_HOOK is None:
        _TAYLOR_HOOK = register_optimizer_step_pre_hook(_taylor_pre_step)


def unregister_taylor(tracker: Any) -> None:
    """``tracker`` reads no more gradients."""
    _TAYLOR.discard(tracker)


def all_reduce_sum(tensors: list[torch.Tensor], sync: bool) -> list[torch.Tensor]:
    """Sum plain tensors over every rank (DDP: each rank saw its own batches); unchanged in one process or without sync."""
    if not sync or world()[1] == 1 or not tensors:
        return tensors
    from .distributed import collective_ints

    device = collective_ints([0]).device
    flat = torch.cat([t.detach().double().flatten().to(device) for t in tensors])
    dist.all_reduce(flat)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].reshape(t.shape).to(t.device, t.dtype))
        i += t.numel()
    return out


def member_key(m: Member) -> tuple[str, int]:
    return (m.tensor, m.dim)


def sharded_product(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``weight * factor`` (factor broadcast to the weight's whole shape), sharded like ``weight``."""
    return masked(weight, factor.expand(weight.shape)) if is_sharded(weight) else weight * factor
