"""Hugging Face attention with separate q/k/v projections plus an output projection (``transformers`` 5.x).

The projections sit under the module itself (``q_proj``/``k_proj``/``v_proj``/``o_proj``: ViT, DeiT, Swin in
5.x) or under a child (``self``/``attention`` with ``query``/``key``/``value``, and ``output.dense``: BERT,
RoBERTa and older ViT/Swin layouts). Swin's ``relative_position_bias_table`` ``[positions, heads]`` follows
its heads by column. Invariants: the family matches only when every projection it names exists and has the
shape its head count implies (grouped-query and other uneven layouts are left to the plain analyses); widths
are read from tensor shapes, so ``heads`` also describes an already compacted module (``ebcompile.load``
relies on it); ``rewrite`` only edits the head-count attributes — the tensors were sliced by ``compact``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..plan import GroupSet, LinearOp, Member
from .registry import AttentionFamily, class_named, linear_op, register
from .vocabulary import HEAD_COUNTS

__all__ = ["SEPARATE_QKV_NAMES", "FAMILY"]

SEPARATE_QKV_NAMES = (
    "BertAttention", "RobertaAttention", "XLMRobertaAttention", "CamembertAttention", "ElectraAttention",
    "ViTAttention", "DeiTAttention", "SwinAttention",
)


@dataclass(frozen=True)
class _Layout:
    holder: str  # child holding the head-count attributes ("" for the module itself)
    qkv: tuple[str, str, str]  # paths relative to the module
    out: str
    head_dim: int


def _layout(m: nn.Module) -> _Layout | None:
    """Where the projections and head attributes of a separate-q/k/v attention module are, if it is one."""
    if all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        layout = _Layout("", ("q_proj", "k_proj", "v_proj"), "o_proj", getattr(m, "head_dim", 0))
    else:
        holder = next((n for n in ("self", "attention") if isinstance(getattr(m, n, None), nn.Module)), None)
        inner = getattr(m, holder) if holder else None
        dense = getattr(getattr(m, "output", None), "dense", None)
        if inner is None or not isinstance(dense, nn.Linear) or not all(
            isinstance(getattr(inner, n, None), nn.Linear) for n in ("query", "key", "value")
        ):
            return None
        layout = _Layout(holder, tuple(f"{holder}.{n}" for n in ("query", "key", "value")), "output.dense",
                         getattr(inner, "attention_head_size", getattr(inner, "head_dim", 0)))
    widths = {m.get_submodule(p).out_features for p in layout.qkv} | {m.get_submodule(layout.out).in_features}
    if not isinstance(layout.head_dim, int) or layout.head_dim < 1 or len(widths) != 1 or widths.pop() % layout.head_dim:
        return None  # grouped-query or otherwise uneven projections: not this family
    return layout


def _separate_matches(m: nn.Module) -> bool:
    return class_named(m, SEPARATE_QKV_NAMES, "transformers") and _layout(m) is not None


def _separate_linears(path: str, m: nn.Module) -> list[LinearOp]:
    layout = _layout(m)
    return [linear_op(path, p, m.get_submodule(p)) for p in (*layout.qkv, layout.out)]


def _separate_heads(path: str, m: nn.Module) -> GroupSet | None:
    layout = _layout(m)
    hd = layout.head_dim
    projections = [m.get_submodule(p) for p in layout.qkv]
    members = [Member(f"{path}.{p}.weight", 0, 0, hd) for p in layout.qkv]
    members += [Member(f"{path}.{p}.bias", 0, 0, hd) for p, lin in zip(layout.qkv, projections) if lin.bias is not None]
    members.append(Member(f"{path}.{layout.out}.weight", 1, 0, hd))
    heads = projections[0].out_features // hd
    for name, p in m.named_parameters():
        if name.endswith("relative_position_bias_table") and p.dim() == 2 and p.shape[1] == heads:
            members.append(Member(f"{path}.{name}", 1, 0, 1, masked=False))
    return GroupSet("head", path, heads, tuple(members), module=path)


def _set_heads(holder: nn.Module, heads: int, head_dim: int) -> None:
    for attr in HEAD_COUNTS:
        if isinstance(getattr(holder, attr, None), int):
            setattr(holder, attr, heads)
    if isinstance(getattr(holder, "all_head_size", None), int):
        holder.all_head_size = heads * head_dim


def _separate_rewrite(m: nn.Module, heads: int) -> None:
    layout = _layout(m)
    _set_heads(m.get_submodule(layout.holder) if layout.holder else m, heads, layout.head_dim)


FAMILY = register(AttentionFamily("transformers.separate-qkv", _separate_matches, _separate_linears, _separate_heads,
                                  _separate_rewrite))
