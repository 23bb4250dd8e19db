"""torchvision Swin (v1 and v2): ``ShiftedWindowAttention`` calls a wrapped function the graph cannot see into.

Fused ``qkv`` (head rows at offsets 0, E, 2E) and ``proj`` (head columns). Per-head tensors that follow the
heads unmasked: ``relative_position_bias_table`` (a column per head), v2's ``logit_scale`` and the last linear
of its ``cpb_mlp`` (a row per head).
"""

from __future__ import annotations

from torch import nn

from ..modules import CompactShiftedWindowAttention, CompactShiftedWindowAttentionV2
from ..plan import GroupSet, LinearOp, Member
from .registry import AttentionFamily, linear_op, qkv_members, register

__all__ = ["FAMILY"]


def _is_tv_swin(m: nn.Module) -> bool:
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return isinstance(m, ShiftedWindowAttention)  # V2 subclasses it


def _swin_linears(path: str, m: nn.Module) -> list[LinearOp]:
    return [linear_op(path, "qkv", m.qkv), linear_op(path, "proj", m.proj)]


def _swin_heads(path: str, m: nn.Module) -> GroupSet | None:
    embed, heads = m.qkv.in_features, m.num_heads
    if embed % heads:
        return None
    head_dim = embed // heads
    biases = [f"{path}.qkv.bias"] if m.qkv.bias is not None else []
    members = qkv_members([f"{path}.qkv.weight"], biases, embed, head_dim) + [Member(f"{path}.proj.weight", 1, 0, head_dim)]
    if hasattr(m, "relative_position_bias_table"):
        members.append(Member(f"{path}.relative_position_bias_table", 1, 0, 1, masked=False))
    if hasattr(m, "logit_scale"):
        members.append(Member(f"{path}.logit_scale", 0, 0, 1, masked=False))
    if hasattr(m, "cpb_mlp"):
        last = [n for n, x in m.cpb_mlp.named_modules() if isinstance(x, nn.Linear)][-1]
        members.append(Member(f"{path}.cpb_mlp.{last}.weight", 0, 0, 1, masked=False))
    return GroupSet("head", path, heads, tuple(members), module=path, attributes=("num_heads",))


def _swin_rewrite(m: nn.Module, heads: int) -> nn.Module:
    """v2 (it has ``logit_scale``) or v1, as the compact module of that version."""
    compact = CompactShiftedWindowAttentionV2 if hasattr(m, "logit_scale") else CompactShiftedWindowAttention
    return compact.from_module(m, heads)


FAMILY = register(AttentionFamily("torchvision.ShiftedWindowAttention", _is_tv_swin, _swin_linears, _swin_heads,
                                  rewrite=_swin_rewrite,
                                  compact_types=(CompactShiftedWindowAttention, CompactShiftedWindowAttentionV2)))
