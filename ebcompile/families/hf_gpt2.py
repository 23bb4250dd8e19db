"""Hugging Face GPT-2 attention (``GPT2Attention``), as ``transformers`` 5.x builds it.

Fused ``c_attn`` Conv1D (weight ``[in, 3w]``: q/k/v head columns at offsets 0, w, 2w) and ``c_proj`` Conv1D
(weight ``[w, out]``: head rows). The forward reads ``split_size`` and ``head_dim``, so ``rewrite`` sets
``num_heads`` and ``split_size`` (the tensors were sliced by ``compact``). The width is read from tensor
shapes, so ``heads`` also describes an already compacted module (``ebcompile.load`` relies on it). Cross
attention (``q_attn`` plus a 2-way ``c_attn``) keeps its linears in the family but its heads are not followed.
"""

from __future__ import annotations

from torch import nn

from ..plan import GroupSet, LinearOp, Member
from .registry import AttentionFamily, class_named, linear_op, qkv_members, register

__all__ = ["GPT2_NAMES", "FAMILY"]

GPT2_NAMES = ("GPT2Attention", "DecisionTransformerGPT2Attention")


def _gpt2_width(m: nn.Module) -> int | None:
    """Current attention width ``heads * head_dim`` (from ``c_attn``), or None when the layout is not the fused one."""
    c_attn = getattr(m, "c_attn", None)
    if getattr(m, "is_cross_attention", False) or c_attn is None or c_attn.weight.shape[1] % 3:
        return None
    width = c_attn.weight.shape[1] // 3
    return width if width % m.head_dim == 0 and m.c_proj.weight.shape[0] == width else None


def _gpt2_matches(m: nn.Module) -> bool:
    return class_named(m, GPT2_NAMES, "transformers") and hasattr(m, "c_proj") and hasattr(m, "head_dim")


def _gpt2_linears(path: str, m: nn.Module) -> list[LinearOp]:
    names = ["c_attn", "q_attn", "c_proj"] if hasattr(m, "q_attn") else ["c_attn", "c_proj"]
    return [linear_op(path, n, getattr(m, n), out_dim=1) for n in names]


def _gpt2_heads(path: str, m: nn.Module) -> GroupSet | None:
    width = _gpt2_width(m)
    if width is None:  # cross attention (q_attn + 2-way c_attn): heads not followed
        return None
    members = qkv_members([f"{path}.c_attn.weight"], [f"{path}.c_attn.bias"], width, m.head_dim, dim=1)
    members.append(Member(f"{path}.c_proj.weight", 0, 0, m.head_dim))
    return GroupSet("head", path, width // m.head_dim, tuple(members), module=path)


def _gpt2_rewrite(m: nn.Module, heads: int) -> None:
    m.num_heads = heads
    m.split_size = heads * m.head_dim  # forward splits c_attn's output in three pieces of split_size


FAMILY = register(AttentionFamily("transformers.GPT2Attention", _gpt2_matches, _gpt2_linears, _gpt2_heads,
                                  _gpt2_rewrite))
