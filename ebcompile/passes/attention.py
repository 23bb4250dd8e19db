"""Registry of attention families: how to find their projections and their heads.

An attention op whose internals the graph cannot follow (``nn.MultiheadAttention`` is a leaf of
``symbolic_trace``; torchvision Swin calls a wrapped function; HF attention mixes reshapes and
attributes) is recognised by its module type. One ``AttentionFamily`` per family says which linears
it owns and which tensor slices make up each head; every other parameter under the module (Swin v2's
``cpb_mlp``) belongs to the family and is never pruned as a plain linear. Add a family with ``register``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..plan import GroupSet, LinearOp, Member

__all__ = ["AttentionFamily", "register", "family_of", "FAMILIES", "qkv_members"]


@dataclass(frozen=True)
class AttentionFamily:
    name: str
    matches: Callable[[nn.Module], bool]
    linears: Callable[[str, nn.Module], list[LinearOp]]
    heads: Callable[[str, nn.Module], GroupSet | None]  # None: heads cannot be followed (masks stay unstructured)
    # compaction: called after the head slices were removed from the tensors, with the kept head count;
    # returns a replacement module, or None when it rewrote the module's attributes in place
    rewrite: Callable[[nn.Module, int], nn.Module | None] | None = None


FAMILIES: list[AttentionFamily] = []


def register(family: AttentionFamily) -> AttentionFamily:
    FAMILIES.append(family)
    return family


def family_of(module: nn.Module) -> AttentionFamily | None:
    return next((f for f in FAMILIES if f.matches(module)), None)


def linear_op(path: str, name: str, module: nn.Linear, out_dim: int = 0) -> LinearOp:
    full = f"{path}.{name}" if name else path
    return LinearOp(full, f"{full}.weight", f"{full}.bias" if getattr(module, "bias", None) is not None else None,
                    out_dim, "attention")


def qkv_members(weights: list[str], biases: list[str], embed: int, head_dim: int, dim: int = 0) -> list[Member]:
    """Head slices of q/k/v: one packed tensor (offsets 0, E, 2E) or three separate ones."""
    members = []
    for group in (weights, biases):
        if len(group) == 1:
            members += [Member(group[0], dim if group is weights else 0, i * embed, head_dim) for i in range(3)]
        else:
            members += [Member(t, dim if group is weights else 0, 0, head_dim) for t in group]
    return members


# -- torch.nn.MultiheadAttention --------------------------------------------------------------------------
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


register(AttentionFamily("torch.nn.MultiheadAttention", lambda m: isinstance(m, nn.MultiheadAttention),
                         _mha_linears, _mha_heads))


# -- torchvision Swin (v1 and v2) ---------------------------------------------------------------------------
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


register(AttentionFamily("torchvision.ShiftedWindowAttention", _is_tv_swin, _swin_linears, _swin_heads))


from . import hf_attention as _hf_attention  # noqa: E402,F401 - registers the Hugging Face families
