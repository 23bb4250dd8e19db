"""``EarlyBirdCallback``: the early-bird search inside ``transformers.Trainer``.

Invariants: the callback never changes how the Trainer trains until the ticket appears; it then applies the
ticket once (``ebcompile.apply_ticket``: pruned weights are zero from then on, through every optimizer step)
and, with ``stop=True``, asks the Trainer to stop. Every check's distances reach ``trainer.state.log_history``.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..controller import EarlyBird
from ..errors import ConfigError
from ..ticket import MODES, Ticket, apply_ticket

__all__ = ["EarlyBirdCallback", "PREFIX"]

PREFIX = "eb/"


class EarlyBirdCallback(TrainerCallback):
    """Runs ``ebcompile.EarlyBird`` on the Trainer's model (a model returned by ``ebcompile.prepare``).

    Args:
        every: ``"epoch"`` (one check at each epoch end) or ``N`` (one check every N optimizer steps).
        ratio, threshold, rule, window, warmup, criterion: as in ``EarlyBird`` (``warmup`` counts epochs or
            steps, like ``every``).
        mode: how the found ticket is applied: ``"continue"``, ``"rewind"`` (to the weights at train begin)
            or ``"reinit"`` (seeded with ``seed``); see ``ebcompile.apply_ticket``.
        apply: apply the ticket as soon as it is found (``False``: only record it in ``self.ticket``).
        stop: set ``control.should_training_stop`` once the ticket is found (end of the search phase).
        on_ticket: called with the ticket right after it is found (and applied).
        earlybird: an existing controller to drive instead of building one at train begin.

    Logged at each check (``trainer.state.log_history``, and every ``report_to`` integration when the callback
    is bound with ``attach(trainer)``): ``eb/distance`` (the value the rule reads), ``eb/distance_overall``,
    ``eb/distance_<kind>`` (head, neuron, weight), ``eb/pruned``; and ``eb/ticket_found`` /
    ``eb/ticket_sparsity`` when the ticket appears. Unbound, the values join the Trainer's next log entry.
    """

    def __init__(
        self,
        every: int | str = "epoch",
        ratio: float | None = None,
        threshold: float = 0.1,
        rule: str = "relative",
        window: int = 5,
        warmup: int = 0,
        criterion: str = "max",
        mode: str = "continue",
        apply: bool = True,
        stop: bool = False,
        seed: int | None = None,
        on_ticket: Callable[[Ticket], None] | None = None,
        earlybird: EarlyBird | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not one of {', '.join(map(repr, MODES))}. Fix: pick one of them.")
        if every != "epoch" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"every={every!r} must be 'epoch' or a number of optimizer steps >= 1. Fix: e.g. every=50.")
        self.every, self.mode, self.apply, self.stop, self.seed, self.on_ticket = every, mode, apply, stop, seed, on_ticket
        self._options: dict[str, Any] = dict(ratio=ratio, threshold=threshold, rule=rule, window=window,
                                             every=1 if every == "epoch" else every, warmup=warmup, criterion=criterion,
                                             rewind_at=0 if mode == "rewind" else None)
        self.earlybird = earlybird
        self.applied = False
        self.trainer: Any = None
        self._pending: dict[str, float] = {}

    @property
    def ticket(self) -> Ticket | None:
        return self.earlybird.ticket if self.earlybird is not None else None

    def attach(self, trainer: Any) -> "EarlyBirdCallback":
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
            self.earlybird = EarlyBird(model, **self._options)  # NotPreparedError when prepare() was not called

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
