"""Integrations with training frameworks. ``EarlyBirdCallback`` needs ``transformers`` (imported lazily)."""

from __future__ import annotations

from typing import Any

__all__ = ["EarlyBirdCallback", "STATE_FILE"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
