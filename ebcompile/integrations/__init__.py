"""Integrations with training frameworks. ``EarlyBirdCallback`` and ``SafeCheckpoints`` (Trainer checkpoints as
safetensors + JSON) need ``transformers`` (imported lazily)."""

from __future__ import annotations

from typing import Any

__all__ = ["EarlyBirdCallback", "STATE_FILE", "SafeCheckpoints", "safe_trainer_class"]
_SAFE = ("SafeCheckpoints", "safe_trainer_class")


def __getattr__(name: str) -> Any:
    if name in _SAFE:
        from . import safe_checkpoints

        return getattr(safe_checkpoints, name)
    if name in __all__:
        from . import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
