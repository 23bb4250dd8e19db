"""Integrations with training frameworks. ``EarlyBirdCallback`` needs ``transformers`` (imported lazily)."""

from __future__ import annotations

from typing import Any

__all__ = ["EarlyBirdCallback"]


def __getattr__(name: str) -> Any:
    if name == "EarlyBirdCallback":
        from .hf_trainer import EarlyBirdCallback

        return EarlyBirdCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
