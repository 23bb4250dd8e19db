"""The settings of the search and retrain recipes: what ``ebcompile search`` / ``ebcompile retrain`` take on the
command line, as dataclasses a Python caller fills directly.

Invariant: every field's default is the command line's default (tests/test_recipes.py compares them), so a
recipe run from Python and the same command run from the shell do the same thing.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from ..errors import ConfigError

__all__ = ["TrainingSettings", "SearchSettings", "RetrainSettings", "from_namespace", "check_training"]

S = TypeVar("S", "SearchSettings", "RetrainSettings")


@dataclass(kw_only=True)
class TrainingSettings:
    """What every recipe trains with: the output folder, the data, the budget and the optimizer's basics."""

    out: str
    data: str
    epochs: float = 3.0
    batch: int = 32
    lr: float | None = None
    max_len: int = 128
    train_limit: int | None = None
    seed: int = 0


@dataclass(kw_only=True)
class SearchSettings(TrainingSettings):
    """Train ``model`` on ``data`` until the early-bird ticket appears; write it and the early-bird model to ``out``.

    ``model``: a Hugging Face folder or hub name (text: fine-tuned in a ``Trainer``), or ``torchvision:NAME``,
    ``timm:NAME``, ``MODULE:FACTORY`` (images: trained from scratch in a PyTorch loop). ``None`` for ``lr``,
    ``every``, ``rule``, ``threshold`` and ``"auto"`` for ``deadline`` and ``importance`` pick the measured
    default of the kind of model (docs/early-bird.md, docs/RESULTS.md)."""

    model: str
    ratio: float = 0.3
    structure: str = "structured"
    scope: str = "global"
    importance: str = "auto"
    gate_lr: float = 1e-2
    every: int | None = None
    warmup: int = 0
    window: int = 5
    rule: str | None = None
    threshold: float | None = None
    deadline: float | str | None = "auto"
    save_every: int = 200
    model_kwargs: str | None = None
    image_size: str | None = None


@dataclass(kw_only=True)
class RetrainSettings(TrainingSettings):
    """Retrain the ticket a search wrote to ``search`` (its ``out``), compacted, and save it to ``out``.

    ``mode``: the weights the ticket retrains from (``continue``: the early-bird ones with their optimizer state,
    ``rewind``: those before the search, ``reinit``: fresh ones). ``factory``: the ``MODULE:FACTORY`` that builds
    an image model whose saved recipe names one (only code the caller names is imported)."""

    search: str
    mode: str = "continue"
    factory: str | None = None


def from_namespace(cls: type[S], args: argparse.Namespace | Any) -> S:
    """``cls`` filled from the parsed command line (its other attributes are left out)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def check_training(settings: TrainingSettings) -> None:
    """``ConfigError`` for an ``epochs``, ``batch`` or ``lr`` no training can use (refused before anything is loaded
    or written)."""
    batch, epochs, lr = settings.batch, settings.epochs, settings.lr
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"--batch {batch} must be an integer >= 1. Fix: e.g. --batch 32.")
    if not _positive(epochs):
        raise ConfigError(f"--epochs {epochs} must be a finite number > 0. Fix: e.g. --epochs 3.")
    if lr is not None and not _positive(lr):
        raise ConfigError(f"--lr {lr} must be a finite number > 0. Fix: e.g. --lr 5e-5 (text) or --lr 1e-3 (images), "
                          "or leave it out for the default.")


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0
