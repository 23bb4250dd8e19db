"""The pass contract: ``prepare`` and ``compact`` are declared pipelines of passes.

A ``Pass`` names the facts it ``requires`` and the facts it ``ensures`` (attributes of the ``State`` the pipeline
threads through its passes) and says what it does to the model: ``None``, an analysis (changes no model), ``True``,
a transform that preserves the computation (the model computes what it did before: masks of all ones, read-only
hooks), or ``False``, a transform that changes it (cutting units: a later pass must restore the function, and the
pipeline's last check verifies that it did). As ``torch.fx``'s pass infrastructure does, a ``Pipeline`` checks when
it is declared that every requirement is met by its inputs or by an earlier pass, and at run time that each pass
delivered what it ensures; ``run(check=True)`` also runs the model on the example inputs around every pass declared
preserving and raises when its outputs moved. A pass raises ``Retry`` to run the pipeline again from its start (after
it recorded what to do differently: ``compact`` holding a module's units whole).

``describe(pipeline)`` lists the passes (docs/extending.md prints ``PREPARE`` and ``COMPACT``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["Pass", "Pipeline", "State", "Retry", "PassContractError", "describe", "markdown"]


class PassContractError(RuntimeError):
    """A pass or a pipeline broke its declared contract (a bug in ebcompile or in a custom pass, not a user error)."""


class Retry(Exception):
    """Raised by a pass to run the whole pipeline again (it changed a setting the earlier passes read)."""


class State(SimpleNamespace):
    """The facts of one pipeline run (attributes), and the passes it ran (``trace``)."""

    def has(self, fact: str) -> bool:
        return fact in self.__dict__


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[State], None]
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ()
    preserves: bool | None = None  # None: an analysis; True: a transform preserving the computation; False: changing it
    when: Callable[[State], bool] | None = None  # runs only where this holds (its ensures are then optional)
    doc: str = ""

    @property
    def kind(self) -> str:
        return "analysis" if self.preserves is None else "transform"


@dataclass
class Pipeline:
    name: str
    inputs: tuple[str, ...]
    passes: Sequence[Pass]
    model: str = "model"  # the fact holding the model ``check=True`` runs around preserving passes
    example: str = "example"  # the fact holding its example inputs: ``(args, kwargs)``
    retries: int | None = 8  # None: as often as a pass asks (each retry must change a setting, as hold_whole does)

    def __post_init__(self) -> None:
        known = set(self.inputs)
        for p in self.passes:
            missing = [r for r in p.requires if r not in known]
            if missing:
                raise PassContractError(f"pipeline {self.name!r}: pass {p.name!r} requires {missing}, which neither the "
                                        "pipeline's inputs nor an earlier pass ensure")
            known.update(p.ensures)
        names = [p.name for p in self.passes]
        if len(set(names)) != len(names):
            raise PassContractError(f"pipeline {self.name!r} names a pass twice: {names}")

    def __add__(self, passes: Sequence[Pass]) -> Pipeline:
        return Pipeline(self.name, self.inputs, [*self.passes, *passes], self.model, self.example, self.retries)

    def run(self, check: bool | None = None, **inputs: Any) -> State:
        """Run every pass in order on a fresh ``State`` of ``inputs``; again from the start when a pass raises
        ``Retry`` (at most ``retries`` times). ``check``: verify every preserving pass on the example inputs
        (default: the environment variable ``EBCOMPILE_CHECK_PASSES=1``, so ``prepare``/``compact`` can be checked
        from the outside)."""
        if check is None:
            check = os.environ.get("EBCOMPILE_CHECK_PASSES", "") not in ("", "0")
        absent = [i for i in self.inputs if i not in inputs]
        if absent:
            raise PassContractError(f"pipeline {self.name!r} needs the inputs {absent}")
        runs = 0
        while self.retries is None or runs <= self.retries:
            runs += 1
            state = State(**inputs, trace=[])
            try:
                for p in self.passes:
                    self._run_pass(p, state, check)
                return state
            except Retry:
                continue
        raise PassContractError(f"pipeline {self.name!r} asked to run again more than {self.retries} times")

    def _run_pass(self, p: Pass, state: State, check: bool) -> None:
        if p.when is not None and not p.when(state):
            return
        missing = [r for r in p.requires if not state.has(r)]
        if missing:
            raise PassContractError(f"pipeline {self.name!r}: pass {p.name!r} requires {missing}, which an earlier "
                                    "pass declared but did not deliver (it did not run)")
        before = self._outputs(state) if check and p.preserves else None
        p.run(state)
        undelivered = [e for e in p.ensures if not state.has(e)]
        if undelivered:
            raise PassContractError(f"pipeline {self.name!r}: pass {p.name!r} ensures {undelivered} but did not set them")
        after = self._outputs(state) if check and p.preserves else None
        if before is not None and after is not None:
            try:
                torch.testing.assert_close(after, before)
            except AssertionError as exc:
                raise PassContractError(f"pipeline {self.name!r}: pass {p.name!r} is declared to preserve the computation, "
                                        f"but the model's outputs moved: {str(exc).splitlines()[0]}") from exc
        state.trace.append(p.name)

    def _outputs(self, state: State) -> list[torch.Tensor] | None:
        """The model's outputs on the example inputs, in eval mode (dropout off), or None before both exist."""
        if not (state.has(self.model) and state.has(self.example)) or getattr(state, self.example) is None:
            return None
        model, (args, kwargs) = getattr(state, self.model), getattr(state, self.example)
        modes = {m: m.training for m in model.modules()}
        try:
            with torch.no_grad():
                out = model.eval()(*args, **kwargs)
        finally:
            for m, training in modes.items():
                m.training = training
        return [t.clone() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def describe(pipeline: Pipeline) -> list[dict[str, str]]:
    """One row per pass: its name, kind, what it requires and ensures, whether it preserves the computation."""
    rows = []
    for p in pipeline.passes:
        preserves = {None: "–", True: "yes", False: "no"}[p.preserves]
        rows.append({"pass": p.name, "kind": p.kind, "requires": ", ".join(p.requires) or "–",
                     "ensures": ", ".join(p.ensures) or "–", "preserves": preserves,
                     "when": "conditional" if p.when is not None else "always", "doc": p.doc})
    return rows


def markdown(pipeline: Pipeline) -> str:
    """``describe`` as a Markdown table (docs/extending.md holds the tables of ``PREPARE`` and ``COMPACT``)."""
    lines = ["| pass | kind | requires | ensures | preserves the computation | what it does |", "|---|---|---|---|---|---|"]
    for r in describe(pipeline):
        doc = r["doc"] + (" (conditional)" if r["when"] == "conditional" else "")
        lines.append(f"| `{r['pass']}` | {r['kind']} | {r['requires']} | {r['ensures']} | {r['preserves']} | {doc} |")
    return "\n".join(lines)
