"""``EarlyBird``: when to draw masks, how far they moved, and when the ticket has appeared."""

from __future__ import annotations

import math
import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, NonFiniteWeightsError, TicketMismatchError
from ..persist.io import load_tensors, save_tensors
from ..persist.masks_io import STATE_TAGS, masks_from_tensors, masks_to_tensors, pack_bits
from ..prepare import check_ratio, config_of, mask_shapes, tracker_of
from .distributed import all_finite, check_same, is_main, unwrap, world
from .importance import Masks, compute_masks, hamming, raw_tensor
from .ticket import Ticket, signature_of, snapshot, ticket_from

__all__ = ["EarlyBird", "RULES", "check_options", "deadline_step", "load_ticket"]

RULES = ("relative", "absolute")
DEADLINE = 0.15  # measured (bench/reproduce.py): tickets drawn at 10-30% of the budget retrain alike; later ones cost more
FINETUNE_DEADLINE = 0.3  # fine-tuning (Trainer callback, text CLI): the rule fires at 15-20% (docs/early-bird.md)


class EarlyBird:
    """Early-bird ticket search over a prepared model.

    Call ``step()`` once per epoch (``every="epoch"``) or once per optimizer step (``every=N``: a check
    every N calls). At each check it draws the masks magnitude pruning at ``ratio`` would give now and
    measures the normalized Hamming distance to the previous check's masks, overall and per structure
    kind ("head", "neuron", or "weight" for unstructured masks). The ticket is declared when the last
    ``window`` distances all pass the rule:

    - ``rule="relative"`` (default, threshold 0.3): distance <= ``threshold`` x the largest distance seen so far.
      It means the same on every model and ratio; measured here, absolute unstructured distances never reach 0.1.
    - ``rule="absolute"``: distance < ``threshold`` (the seed paper: 0.1 vision, 0.01 text).

    ``criterion`` picks the distance the rule reads: ``"max"`` (every structure kind must be stable),
    ``"overall"``, or one kind. ``warmup`` calls are skipped before the first check. ``rewind_at=k``
    keeps a CPU copy of the weights at call k (0: now) in ``rewind_weights``.

    When to stop searching: given ``budget`` (the ``step()`` calls the whole training makes), the ticket is
    drawn by call ``deadline`` x ``budget`` at the latest (default 15%) even if the rule has not fired;
    ``ticket.found_at["by"]`` says which (``"rule"`` or ``"deadline"``). Measured (docs/RESULTS.md): from
    scratch, mask distances follow the learning rate, so the rule alone fires at about half the budget, while
    tickets drawn at 10-30% retrain as well and every step searched at full width is a step not saved.
    ``deadline=None`` searches until the rule fires.

    Across processes (torchrun with DDP, FSDP2 ``fully_shard``, Accelerate, the HF Trainer) build it and call
    ``step()`` on every rank: scores come from each rank's shard and are reduced as small vectors, every rank
    checks that all drew the same masks and decision (else ``DistributedError``), and ``save`` writes on rank 0.
    ``sync=False`` skips the cross-rank checks, for a search that one rank runs alone (e.g. under
    ``if rank == 0``); with the default, a rank that stops calling ``step()`` leaves the others waiting.
    """

    def __init__(self, model: nn.Module, ratio: float | None = None, threshold: float = 0.3, rule: str = "relative",
                 window: int = 5, every: int | str = "epoch", warmup: int = 0, criterion: str = "max",
                 rewind_at: int | None = None, sync: bool = True, budget: int | None = None,
                 deadline: float | None = DEADLINE) -> None:
        model = unwrap(model)  # DistributedDataParallel: the user's model inside
        cfg = config_of(model)
        o = check_options(ratio, threshold, rule, window, every, warmup, criterion, rewind_at, budget, deadline)
        _check_criterion(model, criterion)
        if not isinstance(sync, bool):
            raise ConfigError(f"sync={sync!r} must be True or False. Fix: sync=False only when one rank alone runs the search.")
        self.model, self.ratio, self.sync = model, check_ratio(cfg.ratio if ratio is None else ratio), sync
        self.threshold, self.rule, self.window, self.every, self.warmup = (o[k] for k in _CONFIG_KEYS[1:6])
        self.criterion, self.rewind_at, self.budget, self.deadline = (o[k] for k in _CONFIG_KEYS[6:])
        self.rewind_weights: dict[str, torch.Tensor] | None = None
        self.ticks = 0
        self.history: list[dict[str, Any]] = []  # one record per check: check, tick, distances
        self.max_distance = 0.0
        self.ticket: Ticket | None = None
        self._recent: deque[float] = deque(maxlen=window)
        self._previous: Masks | None = None
        self._packed: list[np.ndarray] = []  # every check's masks, bit-packed, for distance_matrix()
        if rewind_at == 0:
            self.rewind_weights = snapshot(model)

    # -- the search -----------------------------------------------------------------------------------
    @property
    def found(self) -> bool:
        return self.ticket is not None

    @property
    def checks(self) -> int:
        return len(self._packed)

    def step(self) -> bool:
        """Advance one epoch or optimizer step; check when due. True once the ticket is found. A check that raises
        leaves the controller as it was (``ticks`` too): the step can be taken again."""
        tick = self.ticks + 1
        last = self.deadline_tick is not None and tick >= self.deadline_tick
        if not self.found and (last or tick > self.warmup and (tick - self.warmup) % self.every == 0):
            self.ticks = tick  # the check records it
            try:
                self.check(last=last)
            except BaseException:
                self.ticks = tick - 1
                raise
        self.ticks = tick
        if self.rewind_at is not None and tick == self.rewind_at:
            self.rewind_weights = snapshot(self.model)
        return self.found

    @property
    def deadline_tick(self) -> int | None:
        """The ``step()`` call at which the search ends at the latest (``deadline`` x ``budget``), or None."""
        return deadline_step(self.budget, self.deadline)

    def check(self, last: bool = False) -> bool:
        """Draw masks now and update the window, whatever the schedule says; ``last``: draw the ticket now
        if the rule does not fire (the search's deadline)."""
        _check_finite(self.model, self.sync)
        cfg, tracker = config_of(self.model), tracker_of(self.model)
        tracker.begin_draw(fresh=True, sync=self.sync)  # a data-aware kind with no data raises here, nothing changed
        masks = compute_masks(self.model, cfg.plan, self.ratio, cfg.structure, cfg.scope, tracker)
        record: dict[str, Any] = {"check": self.checks, "tick": self.ticks, "distances": None, "pruned": masks.pruned_fraction()}
        max_distance, recent = self.max_distance, deque(self._recent, maxlen=self.window)
        if self._previous is not None:
            d = hamming(self._previous, masks)
            value = self._criterion_value(d)
            max_distance = max(max_distance, value)
            recent.append(value)
            record.update(distances=d, distance=value)
        packed = pack_bits(masks)
        by_rule = len(recent) == self.window and all(self._passes(v, max_distance) for v in recent)
        found = by_rule or last
        if self.sync and world()[1] > 1:  # nothing is changed until every rank agrees
            check_same(f"the masks and the decision at check {record['check']}", packed.tobytes() + bytes([found]),
                       "Fix: every rank must hold the same weights (wrap the model in DistributedDataParallel or "
                       "fully_shard before training), call step() on every rank (or pass sync=False to a search one "
                       "rank runs alone), and resume every rank from the same saved search.")
        tracker.end_draw(fresh=True)
        self.max_distance, self._recent = max_distance, recent
        self._packed.append(packed)
        self.history.append(record)
        self._previous = masks
        if found:
            self.ticket = Ticket(masks, self.ratio, config_of(self.model).scope, signature_of(self.model),
                                 {"check": record["check"], "tick": self.ticks, "by": "rule" if by_rule else "deadline"})
        return self.found

    def _criterion_value(self, d: dict[str, float]) -> float:
        if self.criterion == "max":
            kinds = [v for k, v in d.items() if k != "overall"]
            return max(kinds) if kinds else d["overall"]
        if self.criterion not in d:
            raise ConfigError(f"criterion={self.criterion!r} is not measured here (have {sorted(d)}). "
                              "Fix: use 'max' or 'overall'.")
        return d[self.criterion]

    def _passes(self, value: float, max_distance: float) -> bool:
        if self.rule == "absolute":
            return value < self.threshold
        return value <= self.threshold * max_distance

    # -- what it saw ----------------------------------------------------------------------------------
    def distances(self) -> list[float]:
        """The rule's distance at every check after the first."""
        return [r["distance"] for r in self.history if r["distances"] is not None]

    def distance_matrix(self) -> np.ndarray:
        """Pairwise normalized Hamming distance between the masks of all checks (the seed paper's Fig. 3)."""
        n = len(self._packed)
        out = np.zeros((n, n))
        bits = int(self._nbits)
        for i in range(n):
            for j in range(i):
                diff = np.unpackbits(np.bitwise_xor(self._packed[i], self._packed[j]))[:bits].sum()
                out[i, j] = out[j, i] = diff / bits
        return out

    @property
    def _nbits(self) -> int:
        prev = self._previous
        return sum(v.numel() for v in prev.compared().values()) if prev is not None else 0

    # -- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the search and find the same ticket."""
        state: dict[str, Any] = {
            "config": {k: getattr(self, k) for k in _CONFIG_KEYS},
            "ticks": self.ticks, "history": self.history, "max_distance": self.max_distance,
            "recent": list(self._recent), "packed": [torch.from_numpy(p.copy()) for p in self._packed],
            "previous": _masks_to_state(self._previous), "ticket": None, "rewind_weights": self.rewind_weights,
            "importance": {"kind": config_of(self.model).importance, "tensors": tracker_of(self.model).state_dict()},
        }
        if self.ticket is not None:
            state["ticket"] = {"masks": _masks_to_state(self.ticket.masks), "ratio": self.ticket.ratio,
                               "scope": self.ticket.scope, "signature": self.ticket.signature, "found_at": self.ticket.found_at}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; the whole state is checked against this model before any of it is used."""
        try:
            new = self._parse_state(state)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise CheckpointError(f"the early-bird search state is broken ({type(exc).__name__}: {str(exc)[:150]}). "
                                  "Fix: resume from another saved search, or start the search again.") from exc
        stats, kind = new.pop("_tracker_state"), new.pop("_tracker_kind")
        for key, value in new.items():
            setattr(self, key, value)
        if kind != config_of(self.model).importance:
            tracker_of(self.model).choose(kind)  # auto: the kind the saved search chose
        tracker_of(self.model).load_state_dict(stats)

    def _parse_state(self, state: dict[str, Any]) -> dict[str, Any]:
        try:  # the constructor's checks on the saved settings (an unknown one: TypeError)
            new = check_options(**dict(state["config"]))
            _check_criterion(self.model, new["criterion"])
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        new["ratio"] = check_ratio(config_of(self.model).ratio) if new["ratio"] is None else float(new["ratio"])
        ticks, max_distance = state["ticks"], float(state["max_distance"])
        if isinstance(ticks, bool) or not isinstance(ticks, int) or ticks < 0:
            raise ValueError(f"ticks {ticks!r}")
        shapes = mask_shapes(self.model)
        nbytes = -(-sum(math.prod(s) for s in shapes.values()) // 8)
        packed = [np.asarray(p.numpy() if isinstance(p, torch.Tensor) else p, dtype=np.uint8) for p in state["packed"]]
        if any(p.shape != (nbytes,) for p in packed):
            raise TicketMismatchError("this search state was saved on another model (its masks have other sizes). "
                                      "Fix: load it into the same prepared model.")
        previous = _masks_from_state(state["previous"])
        if previous is not None and {k: tuple(v.shape) for k, v in previous.compared().items()} != shapes:
            raise TicketMismatchError("this search state was saved on another model (its last masks do not fit). "
                                      "Fix: load it into the same prepared model.")
        t = state.get("ticket")
        ticket = None if t is None else ticket_from(_masks_from_state(t["masks"]), t)
        if ticket is not None and ticket.signature != signature_of(self.model):
            raise TicketMismatchError("this controller state was saved on another model. "
                                      "Fix: load it into the same prepared model.")
        rewind = state.get("rewind_weights")
        model_state = self.model.state_dict() if rewind is not None else {}
        bad = [k for k, v in (rewind or {}).items() if k not in model_state or tuple(v.shape) != tuple(model_state[k].shape)]
        if bad:
            raise TicketMismatchError(f"the saved rewind weights do not fit this model ({bad[:3]}). "
                                      "Fix: load the search into the same prepared model.")
        recent = [float(v) for v in state["recent"]]
        prepared = config_of(self.model).importance
        stats = state.get("importance") or {"kind": prepared, "tensors": {}}
        tracker = tracker_of(self.model)
        if stats["kind"] != prepared:  # importance="auto" resumes the kind its saved search chose
            tracker = tracker.candidate(stats["kind"]) if prepared == "auto" else None
            if tracker is None:
                raise TicketMismatchError(f"this search ranked by importance={stats['kind']!r}, the model is prepared with "
                                          f"{prepared!r}. Fix: prepare it with importance={stats['kind']!r}.")
        backup = tracker.state_dict()
        tracker.load_state_dict(dict(stats["tensors"]))  # checked here, put back: nothing changes unless all is valid
        tracker.load_state_dict(backup)
        return {"_tracker_state": dict(stats["tensors"]), "_tracker_kind": stats["kind"], **new,
                "ticks": ticks, "history": list(state["history"]), "max_distance": max_distance,
                "_recent": deque(recent, maxlen=new["window"]), "_packed": packed, "_previous": previous,
                "rewind_weights": rewind, "ticket": ticket}

    def save(self, path: str | os.PathLike) -> None:
        """Write ``state_dict()`` as safetensors + JSON (atomic). Across processes only global rank 0 writes: every
        rank holds the same search (checked at every check), and every rank reads the file to resume."""
        if not is_main():
            return
        state = self.state_dict()
        tensors: dict[str, torch.Tensor] = {f"packed/{i}": p for i, p in enumerate(state.pop("packed"))}
        tensors.update({f"previous/{k}": v for k, v in (state["previous"] or {}).pop("tensors", {}).items()})
        if state["ticket"] is not None:
            tensors.update({f"ticket/{k}": v for k, v in state["ticket"]["masks"].pop("tensors").items()})
        tensors.update({f"importance/{k}": v for k, v in state["importance"].pop("tensors").items()})
        rw = state.pop("rewind_weights")
        tensors.update({f"rewind/{k}": v for k, v in (rw or {}).items()})
        state["has_rewind"] = rw is not None
        save_tensors(path, tensors, state, "earlybird")

    def load(self, path: str | os.PathLike) -> None:
        """Resume the search saved in ``path``; refused (nothing changed) if it is broken or from another model."""
        tensors, state = load_tensors(path, "earlybird")
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
        try:
            packed = part("packed")
            state["packed"] = [packed[str(i)] for i in range(len(packed))]
            if state["previous"] is not None:
                state["previous"]["tensors"] = part("previous")
            if state["ticket"] is not None:
                state["ticket"]["masks"]["tensors"] = part("ticket")
            state["rewind_weights"] = part("rewind") if state.pop("has_rewind") else None
            if state.get("importance") is not None:
                state["importance"]["tensors"] = part("importance")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path} is a broken early-bird search ({type(exc).__name__}: {str(exc)[:150]}). Fix: "
                                  "resume from another saved search, or start the search again.") from exc
        self.load_state_dict(state)


def saved_importance(path: str | os.PathLike) -> str:
    """The importance kind of the search saved in ``path`` (an ``EarlyBird.save`` file): retraining prepares with it."""
    _, state = load_tensors(path, "earlybird", prefix="importance/")  # the header, not the weights it holds
    kind = (state.get("importance") or {}).get("kind", "magnitude")
    return kind if isinstance(kind, str) else "magnitude"


def load_ticket(path: str | os.PathLike) -> Ticket:
    """The ticket in ``path``: a ``Ticket.save`` file, an ``EarlyBird.save`` file whose search found one, or a
    Trainer checkpoint folder holding ``earlybird.safetensors`` (``EarlyBirdCallback``)."""

    path = Path(path)
    if path.is_dir():
        path = path / "earlybird.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist. Fix: pass a ticket, a saved search or a Trainer checkpoint folder.")
    try:
        return Ticket.load(path)
    except CheckpointError:
        try:
            tensors, state = load_tensors(path, "earlybird", prefix="ticket/")  # not the rewind weights
        except CheckpointError:
            raise CheckpointError(f"{path} is neither a saved ticket nor a saved early-bird search. Fix: pass a file "
                                  "written by Ticket.save or EarlyBird.save, or a Trainer checkpoint folder.") from None
    t = state.get("ticket")
    if t is None:
        raise CheckpointError(f"{path} is a saved early-bird search that has not found its ticket yet "
                              f"({len(state['history'])} checks). Fix: train on, or draw one with ebcompile.draw_ticket.")
    masks = masks_from_tensors(tensors, t["masks"], prefix="ticket/", tags=STATE_TAGS)
    return Ticket(masks, t["ratio"], t["scope"], {k: list(v) for k, v in t["signature"].items()},
                  dict(t["found_at"]))


def deadline_step(budget: int | None, deadline: float | None) -> int | None:
    """The step at which a search over ``budget`` steps ends at the latest (``deadline`` x ``budget``, at least 1)."""
    if budget is None or deadline is None:
        return None
    return max(1, round(deadline * budget))


_CONFIG_KEYS = ("ratio", "threshold", "rule", "window", "every", "warmup", "criterion", "rewind_at", "budget", "deadline")


def check_options(ratio: float | None = None, threshold: float = 0.3, rule: str = "relative", window: int = 5,
                  every: int | str = "epoch", warmup: int = 0, criterion: str = "max", rewind_at: int | None = None,
                  budget: int | None = None, deadline: float | None = DEADLINE) -> dict[str, Any]:
    """``EarlyBird``'s settings checked without a model (``ConfigError`` naming the fix; ``EarlyBirdCallback`` checks
    its own with it when built) and normalized (``every="epoch"``: 1; numbers as floats). ``ratio=None``: the model's."""
    if ratio is not None:
        check_ratio(ratio)
    if rule not in RULES:
        raise ConfigError(f"rule={rule!r} is not one of {RULES}. Fix: use 'relative' or 'absolute'.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < float("inf"):
        raise ConfigError(f"threshold={threshold!r} must be a number > 0. Fix: e.g. threshold=0.1.")
    if not isinstance(window, int) or window < 1:
        raise ConfigError(f"window={window!r} must be an integer >= 1. Fix: e.g. window=5.")
    every = 1 if every == "epoch" else every
    if not isinstance(every, int) or every < 1:
        raise ConfigError(f"every={every!r} must be 'epoch' or a number of steps >= 1. Fix: e.g. every=100.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup={warmup!r} must be an integer >= 0 (calls to step() before the first check). "
                          "Fix: e.g. warmup=0.")
    if not isinstance(criterion, str):
        raise ConfigError(f"criterion={criterion!r} must be 'max', 'overall' or a kind name. Fix: e.g. criterion='max'.")
    if rewind_at is not None and (isinstance(rewind_at, bool) or not isinstance(rewind_at, int) or rewind_at < 0):
        raise ConfigError(f"rewind_at={rewind_at!r} must be None or a call count >= 0. Fix: e.g. rewind_at=0 (now).")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ConfigError(f"budget={budget!r} must be None or the number of step() calls the training will make (>= 1). "
                          "Fix: e.g. budget=epochs * steps_per_epoch, or leave it out.")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline <= 1):
        raise ConfigError(f"deadline={deadline!r} must be None or a share of the budget in (0, 1]. Fix: e.g. deadline=0.15.")
    return dict(zip(_CONFIG_KEYS, (ratio, float(threshold), rule, window, every, warmup, criterion, rewind_at, budget,
                                   None if deadline is None else float(deadline))))


def _check_criterion(model: nn.Module, criterion: str) -> None:
    """``criterion`` must name a distance ``check`` measures on the prepared ``model``."""
    cfg = config_of(model)
    kinds = sorted({g.kind for g in cfg.plan.groups}) if cfg.structure == "structured" else ["weight"]
    if criterion not in ("max", "overall", *kinds):
        raise ConfigError(f"criterion={criterion!r} is not measured on this {cfg.structure} model (it measures "
                          f"{', '.join(kinds) or 'overall only'}). Fix: use 'max', 'overall' or one of {kinds}.")


def _check_finite(model: nn.Module, sync: bool = True) -> None:
    """Masks are drawn from weight magnitudes: NaN or inf weights (a diverged run) are refused, not ranked."""
    ops = config_of(model).plan.linears
    for op, ok in zip(ops, all_finite([raw_tensor(model, op.weight) for op in ops], reduce=sync)):
        if not ok:
            raise NonFiniteWeightsError(f"{op.weight} holds NaN or inf: training diverged, and masks drawn from it would "
                                        "mean nothing. Fix: lower the learning rate (or clip gradients) and resume from "
                                        "the last saved search (EarlyBird.load).")


def _masks_to_state(masks: Masks | None) -> dict[str, Any] | None:
    if masks is None:
        return None
    tensors, header = masks_to_tensors(masks, tags=STATE_TAGS)
    return {**header, "tensors": tensors}


def _masks_from_state(state: dict[str, Any] | None) -> Masks | None:
    return None if state is None else masks_from_tensors(state["tensors"], state, tags=STATE_TAGS)
