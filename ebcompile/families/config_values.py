"""Reading Hugging Face config fields that may be per-layer.

transformers 5.15+ configs can be heterogeneous (``config.per_layer_config``, Gemma 4 and others): a field that
differs between layers (``head_dim``, ``num_attention_heads``, ``intermediate_size``...) raises on the global config
instead of returning one value. Invariant: ``config_value`` never assumes a per-layer field is global — it returns
``default`` for it — and never raises for a missing or ambiguous field.
"""

from __future__ import annotations

from typing import Any

__all__ = ["config_value", "per_layer_fields"]


def per_layer_fields(config: Any) -> set[str]:
    """The fields ``config`` holds per layer (empty for a homogeneous config or a non-HF object)."""
    try:
        fields = getattr(config, "per_layer_attributes", None)
    except Exception:  # noqa: BLE001 - an unusual config object: treat as homogeneous
        return set()
    return set(fields) if isinstance(fields, (set, frozenset, list, tuple)) else set()


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """``config.<name>``, or ``default`` when it is missing or per-layer (read it from the layer's own config)."""
    if name in per_layer_fields(config):
        return default
    try:
        return getattr(config, name, default)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError, whatever its module
        return default
