"""``torch.nn.MultiheadAttention``: a leaf of ``symbolic_trace``, so its projections and heads are named here.

Packed ``in_proj_weight`` (q/k/v head rows at offsets 0, E, 2E) or separate ``q/k/v_proj_weight`` when the
key/value widths differ; ``out_proj`` columns follow the heads. ``add_zero_attn`` adds a zero key/value per head,
which ``CompactMultiheadAttention`` adds too. ``add_bias_kv`` adds per-head rows that are not followed: its heads
are then left unstructured.
"""

from __future__ import annotations

from torch import nn

from ..modules import CompactMultiheadAttention
from ..plan import GroupSet, LinearOp, Member
from .registry import AttentionFamily, linear_op, qkv_members, register

__all__ = ["FAMILY", "compact_mha"]


def _mha_linears(path: str, m: nn.MultiheadAttention) -> list[LinearOp]:
    bias = f"{path}.in_proj_bias" if m.in_proj_bias is not None else None
    if m._qkv_same_embed_dim:
        ops = [LinearOp(f"{path}.in_proj", f"{path}.in_proj_weight", bias, 0, "attention")]
    else:
        ops = [LinearOp(f"{path}.{p}_proj", f"{path}.{p}_proj_weight", None, 0, "attention") for p in "qkv"]
    return ops + [linear_op(path, "out_proj", m.out_proj)]


def _mha_heads(path: str, m: nn.MultiheadAttention) -> GroupSet | None:
    if m.bias_k is not None or m.embed_dim % m.num_heads:  # add_bias_kv: per-head rows we do not follow
        return None
    weights = [f"{path}.in_proj_weight"] if m._qkv_same_embed_dim else [f"{path}.{p}_proj_weight" for p in "qkv"]
    biases = [f"{path}.in_proj_bias"] if m.in_proj_bias is not None else []
    head_dim = m.embed_dim // m.num_heads
    members = qkv_members(weights, biases, m.embed_dim, head_dim) + [Member(f"{path}.out_proj.weight", 1, 0, head_dim)]
    return GroupSet("head", path, m.num_heads, tuple(members), module=path, attributes=("num_heads",))


def _mha_compact_names(path: str, m: nn.MultiheadAttention) -> dict[str, str]:
    """``CompactMultiheadAttention`` keeps the packed projection as a Linear: ``in_proj_weight`` -> ``in_proj.weight``
    (separate ``q/k/v_proj_weight`` keep their names)."""
    if not m._qkv_same_embed_dim:
        return {}
    return {f"{path}.in_proj_weight": f"{path}.in_proj.weight", f"{path}.in_proj_bias": f"{path}.in_proj.bias"}


def compact_mha(m: nn.MultiheadAttention, heads: int) -> CompactMultiheadAttention:
    """The module as a ``CompactMultiheadAttention`` with ``heads`` heads (its tensors already sliced)."""
    return CompactMultiheadAttention.from_module(m, heads)


FAMILY = register(AttentionFamily("torch.nn.MultiheadAttention", lambda m: isinstance(m, nn.MultiheadAttention),
                                  _mha_linears, _mha_heads, rewrite=compact_mha, compact_names=_mha_compact_names,
                                  compact_types=(CompactMultiheadAttention,)))
