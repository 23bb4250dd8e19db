"""DeciLM / Nemotron-NAS configuration (``model_type`` "nemotron-nas"), shipped as ``configuration_decilm.py``.

``ebcompile.save_for_serving`` copies this file, unchanged, into every per-layer serving folder: neither transformers
nor vLLM registers a config class for "nemotron-nas" (vLLM runs its own ``DeciLMForCausalLM`` model but reads the
config through ``AutoConfig`` with the folder's ``auto_map``), so loading the folder needs ``trust_remote_code=True``
and this file. It imports transformers only (the serving engine's environment has no ebcompile) and holds no
weights and no model code: a Llama config plus ``block_configs``, one per layer, each with attribute access
(``block.attention.n_heads_in_group``, ``block.ffn.ffn_mult``) as vLLM reads them and plain dicts in JSON.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

__all__ = ["DeciLMConfig", "BlockConfig"]


class _Section:
    """One of a block's ``attention`` / ``ffn`` settings, read as attributes."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__})"


class BlockConfig:
    """One decoder layer: ``attention`` (``n_heads_in_group``, ``no_op``, ``replace_with_linear``) and ``ffn``
    (``ffn_mult``, ``no_op``, ``replace_with_linear``)."""

    def __init__(self, attention: dict[str, Any] | None = None, ffn: dict[str, Any] | None = None, **_: Any) -> None:
        self.attention = _Section(**(attention or {}))
        self.ffn = _Section(**(ffn or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    def __repr__(self) -> str:
        return f"BlockConfig({self.to_dict()})"


class DeciLMConfig(LlamaConfig):
    """A Llama config whose layers differ: ``block_configs[i]`` gives layer ``i``'s KV heads
    (``num_attention_heads // n_heads_in_group``) and FFN width (``ffn_mult``, rounded up to a multiple of 256)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs: list[Any] | None = None, **kwargs: Any) -> None:
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in block_configs or []]
        heads = kwargs.get("num_attention_heads")
        if isinstance(heads, int) and kwargs.get("head_dim") and kwargs.get("hidden_size", 0) % heads:
            # head_dim is explicit, so the query heads need not divide hidden_size; LlamaConfig's validator (run once,
            # at construction) says they must, so it is given a count that does and the real one is set after
            kwargs["num_attention_heads"] = 1
            super().__init__(**kwargs)
            self.num_attention_heads = heads
        else:
            super().__init__(**kwargs)

    def validate(self) -> None:
        """LlamaConfig's checks (``save_pretrained`` runs them), with the query heads judged against ``head_dim``."""
        heads = self.num_attention_heads
        if not (isinstance(heads, int) and self.head_dim and self.hidden_size % heads):
            super().validate()
            return
        self.num_attention_heads = 1
        try:
            super().validate()
        finally:
            self.num_attention_heads = heads

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() if isinstance(b, BlockConfig) else b for b in self.block_configs]
        return out
