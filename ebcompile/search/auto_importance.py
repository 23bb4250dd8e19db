"""``importance="auto"`` (``prepare``'s default): rank by the best evidence the training loop gives, chosen at the first
early-bird check and kept for the rest of the search.

- ``"taylor"`` when every masked weight got gradients at optimizer steps (full fine-tuning, training from scratch);
- ``"activation"`` when forward passes were seen but the masked weights get no gradients (LoRA: a frozen base);
- ``"magnitude"`` when nothing was seen (one-shot pruning of a trained model: ``prepare`` then ``apply_ticket``).

Until the first check both data-aware trackers observe (their hooks only read); the check picks one, the others'
hooks are removed, and the model's config then names the kind chosen (``config_of(model).importance``), which is what
``EarlyBird.save`` records. A draw that is not a check (``current_masks``) uses the best kind so far without choosing.
Why these kinds: docs/early-bird.md (measured on MiniLM / MR, full fine-tuning and LoRA).

Invariant: the choice is made from counters every rank of a DDP group holds alike (optimizer steps, rows seen), so
every rank chooses the same kind.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..analysis.experts import install_routing
from ..errors import ConfigError
from ..plan import GroupSet, Plan
from .gates import GateImportance
from .scorers import ActivationImportance, TaylorImportance, check_kind
from .scoring import Importance

__all__ = ["AutoImportance", "make_importance"]


class AutoImportance(Importance):
    """Observes with ``taylor`` and ``activation`` at once until the first check chooses one (see the module doc)."""

    kind = "auto"

    def __init__(self, model: nn.Module, plan: Plan, structure: str) -> None:
        super().__init__(model, plan, structure)
        self.candidates: dict[str, Importance] = {"taylor": TaylorImportance(model, plan, structure)}
        self.candidates["activation"] = ActivationImportance(model, plan, structure)
        self.candidates["magnitude"] = Importance(model, plan, structure)
        self.chosen: Importance | None = None
        self._drawing: Importance = self.candidates["magnitude"]

    def best(self) -> str:
        """The kind the evidence seen so far supports (nothing changes)."""
        taylor = self.candidates.get("taylor")
        if isinstance(taylor, TaylorImportance) and taylor.steps and {k[0] for k in taylor.keys} <= {k[0] for k in taylor.sums}:
            return "taylor"
        activation = self.candidates["activation"]
        if isinstance(activation, ActivationImportance) and sum(activation.tokens.values()):
            return "activation"
        return "magnitude"

    def candidate(self, kind: str) -> Importance | None:
        """The tracker ``kind`` would use if chosen (a resumed search names the kind it chose), or None."""
        return self.chosen if self.chosen is not None and self.chosen.kind == kind else (
            None if self.chosen is not None else self.candidates.get(kind))

    def choose(self, kind: str) -> Importance:
        """Keep ``kind``'s tracker, remove the others' hooks; the model's config names ``kind`` from now on."""
        tracker = self.candidate(kind)
        if tracker is None:
            raise ConfigError(f"importance='auto' cannot rank by {kind!r} on this model. Fix: prepare it with "
                              f"importance={kind!r}.")
        for other in self.candidates.values():
            if other is not tracker:
                other.close()
        self.chosen = self._drawing = tracker
        cfg = getattr(self.model, "_ebcompile", None)
        if cfg is not None:
            cfg.tracker, cfg.importance = tracker, kind
        return tracker

    # -- drawing -------------------------------------------------------------------------------------
    def begin_draw(self, fresh: bool, sync: bool = True) -> None:
        if self.chosen is not None:
            self.chosen.begin_draw(fresh, sync)
            return
        kind = self.best()
        self.candidates[kind].begin_draw(fresh, sync)  # raises before anything is chosen
        self._drawing = self.candidates[kind]
        if fresh:
            if kind == "magnitude":
                warnings.warn("importance='auto' saw no optimizer step and no forward pass before the first early-bird "
                              "check: the search ranks by magnitude. Check after training steps, or pass importance=.",
                              stacklevel=4)
            self.choose(kind)

    def end_draw(self, fresh: bool) -> None:
        self._drawing.end_draw(fresh)

    def element_scores(self, name: str) -> torch.Tensor:
        return self._drawing.element_scores(name)

    def unit_scores(self, group: GroupSet) -> torch.Tensor:
        return self._drawing.unit_scores(group)

    def layer_ranked(self, group: GroupSet) -> bool:
        return self._drawing.layer_ranked(group)

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.chosen is not None:
            return self.chosen.state_dict()
        return {f"{kind}/{k}": v for kind, t in self.candidates.items() for k, v in t.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.chosen is not None:
            self.chosen.load_state_dict(state)
            return
        parts: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in self.candidates}
        for k, v in state.items():
            kind, _, rest = k.partition("/")
            if kind not in parts or not rest:
                raise ValueError(f"importance statistic {k!r} is not one importance='auto' keeps on this model")
            parts[kind][rest] = v
        backups = {kind: t.state_dict() for kind, t in self.candidates.items()}
        try:
            for kind, t in self.candidates.items():
                t.load_state_dict(parts[kind])
        except ValueError:
            for kind, t in self.candidates.items():
                t.load_state_dict(backups[kind])
            raise

    def close(self) -> None:
        for t in self.candidates.values():
            t.close()


def make_importance(kind: str, model: nn.Module, plan: Plan, structure: str) -> Importance:
    """The tracker for ``kind``, attached to ``model`` (hooks and gates installed); masks must be inserted first.
    Also installs the routing hooks of mixture-of-experts layers (``analysis.experts``): a masked expert is never routed to."""
    if structure == "structured":
        install_routing(model, plan)
    classes = {"auto": AutoImportance, "magnitude": Importance, "taylor": TaylorImportance,
               "activation": ActivationImportance, "gate": GateImportance}
    return classes[check_kind(kind, structure)](model, plan, structure)
