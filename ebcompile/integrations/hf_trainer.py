"""``EarlyBirdCallback``: the early-bird search inside ``transformers.Trainer``.

Invariants: the callback never changes how the Trainer trains until the ticket appears; it then applies the
ticket once (``ebcompile.apply_ticket``: pruned weights are zero from then on, through every optimizer step)
and, with ``stop=True``, asks the Trainer to stop. Every check's distances reach ``trainer.state.log_history``.
Each Trainer checkpoint holds the search state (``earlybird.safetensors``), and ``resume_from_checkpoint``
brings it back: the same checks, the same ticket, the ticket frozen again if it was applied.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..errors import ConfigError
from ..search.controller import FINETUNE_DEADLINE, EarlyBird, check_options
from ..search.gates import add_gate_penalty_grad
from ..search.ticket import MODES, Ticket, apply_ticket

__all__ = ["EarlyBirdCallback", "PREFIX", "STATE_FILE", "AUTO_CHECKS", "auto_every"]

PREFIX = "eb/"
AUTO_CHECKS = 75  # every="auto": checks over the optimizer steps (the measured recipe: every 10 of 750 steps)


def auto_every(steps: int) -> int:
    """Optimizer steps between checks for ``every="auto"``: about ``AUTO_CHECKS`` checks over ``steps``, at least 1."""
    return max(1, round(steps / AUTO_CHECKS))

STATE_FILE = "earlybird.safetensors"  # the search state, in each Trainer checkpoint folder
log = logging.getLogger(__name__)


class EarlyBirdCallback(TrainerCallback):
    """Runs ``ebcompile.EarlyBird`` on the Trainer's model (a model returned by ``ebcompile.prepare``).

    Args:
        every: ``"auto"`` (a check every ``max_steps / 75`` optimizer steps: every 10 of a 750-step fine-tuning, as
            measured in docs/early-bird.md), ``"epoch"`` (one check at each epoch end: with the Trainer's three
            epochs the window can never fill, so the deadline draws the ticket) or ``N`` (every N optimizer steps).
        ratio, threshold, rule, window, warmup, criterion: as in ``EarlyBird`` (``warmup`` counts epochs or
            steps, like ``every``).
        deadline: the share of the Trainer's training (``max_steps``, or its epochs with ``every="epoch"``) by
            which the ticket is drawn at the latest (default 0.3: in fine-tuning the rule fires at 15-20% of the
            budget, docs/early-bird.md); ``None``: search until the rule fires. It also sets the budget of an
            ``earlybird`` passed in without one.
        mode: how the found ticket is applied: ``"continue"``, ``"rewind"`` (to the weights at train begin)
            or ``"reinit"`` (seeded with ``seed``); see ``ebcompile.apply_ticket``.
        apply: apply the ticket as soon as it is found (``False``: only record it in ``self.ticket``).
        stop: set ``control.should_training_stop`` once the ticket is found (end of the search phase).
        on_ticket: called with the ticket right after it is found (and applied).
        earlybird: an existing controller to drive instead of building one at train begin.
        gate_l1: the L1 penalty on unit gates (a model prepared with ``importance="gate"``), added to their
            gradients before every optimizer step while the search runs (default 1e-4, EarlyBERT's; 0: none).
        resume_from: a Trainer checkpoint folder (or an ``EarlyBird.save`` file) to restore the search from.
            By default, ``trainer.train(resume_from_checkpoint=...)`` restores it from
            ``<output_dir>/checkpoint-<step>/earlybird.safetensors`` (written at every Trainer save).

    Logged at each check (``trainer.state.log_history``, and every ``report_to`` integration when the callback
    is bound with ``attach(trainer)``): ``eb/distance`` (the value the rule reads), ``eb/distance_overall``,
    ``eb/distance_<kind>`` (head, neuron, weight), ``eb/pruned``; and ``eb/ticket_found`` /
    ``eb/ticket_sparsity`` when the ticket appears. Unbound, the values join the Trainer's next log entry.
    """

    def __init__(
        self,
        every: int | str = "auto",
        ratio: float | None = None,
        threshold: float = 0.3,
        rule: str = "relative",
        window: int = 5,
        warmup: int = 0,
        criterion: str = "max",
        deadline: float | None = FINETUNE_DEADLINE,
        mode: str = "continue",
        apply: bool = True,
        stop: bool = False,
        seed: int | None = None,
        on_ticket: Callable[[Ticket], None] | None = None,
        earlybird: EarlyBird | None = None,
        resume_from: str | os.PathLike | None = None,
        gate_l1: float = 1e-4,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not one of {', '.join(map(repr, MODES))}. Fix: pick one of them.")
        if every not in ("auto", "epoch") and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"every={every!r} must be 'auto', 'epoch' or a number of optimizer steps >= 1. Fix: e.g. "
                              "every='auto' or every=50.")
        if isinstance(gate_l1, bool) or not isinstance(gate_l1, (int, float)) or not 0 <= gate_l1 < float("inf"):
            raise ConfigError(f"gate_l1={gate_l1!r} must be a number >= 0. Fix: e.g. gate_l1=1e-4.")
        self.gate_l1 = float(gate_l1)
        self.every, self.mode, self.apply, self.stop, self.seed, self.on_ticket = every, mode, apply, stop, seed, on_ticket
        self._options: dict[str, Any] = dict(ratio=ratio, threshold=threshold, rule=rule, window=window,
                                             every=every if isinstance(every, int) else 1, warmup=warmup, criterion=criterion,
                                             rewind_at=0 if mode == "rewind" else None, deadline=deadline)
        check_options(**self._options)  # EarlyBird's own checks, now rather than at train begin
        self.deadline = deadline
        self.earlybird = earlybird
        self.resume_from = resume_from
        self.applied = False
        self.trainer: Any = None
        self._pending: dict[str, float] = {}

    @property
    def ticket(self) -> Ticket | None:
        return self.earlybird.ticket if self.earlybird is not None else None

    def attach(self, trainer: Any) -> EarlyBirdCallback:
        """Add this callback to ``trainer`` and log through ``trainer.log`` (reaches every integration)."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    # -- Trainer events -------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        if self.earlybird is None:
            if model is None:
                raise ConfigError("the Trainer passed no model to EarlyBirdCallback. Fix: pass earlybird=EarlyBird(model).")
            if self.every == "auto":
                self._options["every"] = auto_every(state.max_steps)
            self.earlybird = EarlyBird(model, **self._options)  # NotPreparedError when prepare() was not called
        if self.earlybird.budget is None and self.deadline is not None:
            self.earlybird.budget = max(1, math.ceil(state.num_train_epochs) if self.every == "epoch" else state.max_steps)
        self._resume(args, state)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.earlybird is None or not args.should_save:
            return
        name = f"checkpoint-{state.global_step}"
        folders = [os.path.join(args.output_dir, name)] + sorted(  # hyperparameter search: output_dir/run-*/
            (str(p) for p in Path(args.output_dir).glob(f"run-*/{name}")), key=os.path.getmtime, reverse=True)
        folder = next((f for f in folders if os.path.isdir(f)), None)
        if folder is None:
            log.warning("EarlyBirdCallback: no %s folder under %s to save the search into", name, args.output_dir)
            return
        self.earlybird.save(os.path.join(folder, STATE_FILE))

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: nn.Module | None = None, **kwargs: Any) -> None:
        if self.gate_l1 and self.earlybird is not None and not self.earlybird.found:
            add_gate_penalty_grad(self.earlybird.model, self.gate_l1)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> TrainerControl:
        if self.every != "epoch":
            self._tick(state, control)
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> TrainerControl:
        if self.every == "epoch":
            self._tick(state, control)
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self._pending and logs is not None:  # unbound: join the entry the Trainer just logged
            logs.update(self._pending)
            if state.log_history:
                state.log_history[-1].update(self._pending)
            self._pending.clear()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._pending:  # the Trainer logged nothing after the last check
            state.log_history.append({**self._pending, "step": state.global_step})
            self._pending.clear()

    # -- resume ---------------------------------------------------------------------------------------
    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        """Restore the search saved beside the checkpoint the Trainer resumed from (weights already loaded)."""
        candidates = [self.resume_from] if self.resume_from is not None else (
            [args.resume_from_checkpoint, os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
            if state.global_step > 0 else [])
        for where in candidates:
            path = os.path.join(where, STATE_FILE) if where is not None and os.path.isdir(where) else where
            if path is not None and os.path.isfile(path):
                break
        else:
            if self.resume_from is not None:
                raise ConfigError(f"no early-bird search state at {self.resume_from} (looked for {STATE_FILE}). "
                                  "Fix: pass a Trainer checkpoint folder written with this callback, or an EarlyBird.save file.")
            if state.global_step > 0:
                log.warning("resuming at step %d, but no %s was found under %s: the early-bird search starts over. Fix: "
                            "pass EarlyBirdCallback(resume_from=<the checkpoint folder>) when it lives elsewhere.",
                            state.global_step, STATE_FILE, args.output_dir)
            return
        eb = self.earlybird
        budget = eb.budget
        eb.load(path)
        if budget is not None:  # this run's training length: the deadline follows the budget asked for now
            eb.budget = budget
        if eb.found and self.apply and not self.applied:  # the checkpoint's weights already are the ticket's
            apply_ticket(eb.model, eb.ticket, mode="continue")
            self.applied = True

    # -- the search -----------------------------------------------------------------------------------
    def _tick(self, state: TrainerState, control: TrainerControl) -> None:
        eb = self.earlybird
        if eb is None or self.applied or (eb.found and not self.apply):
            return
        checks = eb.checks
        found = eb.step()
        metrics: dict[str, float] = {}
        if eb.checks > checks:
            record = eb.history[-1]
            metrics[f"{PREFIX}pruned"] = float(record["pruned"])
            if record["distances"] is not None:
                metrics[f"{PREFIX}distance"] = float(record["distance"])
                metrics.update({f"{PREFIX}distance_{k}": float(v) for k, v in record["distances"].items()})
        if found:
            metrics[f"{PREFIX}ticket_found"] = 1.0
            metrics[f"{PREFIX}ticket_sparsity"] = float(eb.ticket.sparsity())
            if self.apply:
                apply_ticket(eb.model, eb.ticket, mode=self.mode, weights=eb.rewind_weights, seed=self.seed)
                self.applied = True
            if self.on_ticket is not None:
                self.on_ticket(eb.ticket)
            if self.stop:
                control.should_training_stop = True
        if metrics:
            self._log(metrics, control)

    def _log(self, metrics: dict[str, float], control: TrainerControl) -> None:
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
        else:
            self._pending.update(metrics)
            control.should_log = True
