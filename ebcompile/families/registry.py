"""Registry of attention families: how to find their projections and their heads.

Most attention needs no family: the graph analysis follows the projections, the reshapes into heads and the
attributes the forward reads. A family exists only for what that analysis cannot follow: an opaque leaf op
(``nn.MultiheadAttention`` is a leaf of ``symbolic_trace``), a wrapped function (torchvision Swin's
``shifted_window_attention``), or a module whose attributes must be rewritten after its heads were removed
(Hugging Face attention mixes reshapes and head-count attributes). Such a module is recognised by its type.
One ``AttentionFamily`` per family says which linears it owns, which tensor slices make up each head and how
to rewrite its attributes; every other parameter under the module (Swin v2's ``cpb_mlp``) belongs to the
family and is never pruned as a plain linear. Add a family with ``register``; ``family_of`` returns the first
registered family that matches, so registration order matters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..plan import GroupSet, LinearOp, Member

__all__ = ["AttentionFamily", "register", "family_of", "compacted_by", "FAMILIES", "linear_op", "qkv_members", "class_named"]


@dataclass(frozen=True)
class AttentionFamily:
    name: str
    matches: Callable[[nn.Module], bool]
    linears: Callable[[str, nn.Module], list[LinearOp]]
    heads: Callable[[str, nn.Module], GroupSet | None]  # None: heads cannot be followed (masks stay unstructured)
    # compaction: called after the head slices were removed from the tensors, with the kept head count;
    # returns a replacement module, or None when it rewrote the module's attributes in place
    rewrite: Callable[[nn.Module, int], nn.Module | None] | None = None
    # the state_dict names a compacted module saves under, by the dense module's (path, module) -> {dense: compact}
    compact_names: Callable[[str, nn.Module], dict[str, str]] | None = None
    # the classes ``rewrite`` returns: a module of one of them is already compact (``load`` recognises it)
    compact_types: tuple[type, ...] = ()


FAMILIES: list[AttentionFamily] = []


def register(family: AttentionFamily) -> AttentionFamily:
    FAMILIES.append(family)
    return family


def family_of(module: nn.Module) -> AttentionFamily | None:
    return next((f for f in FAMILIES if f.matches(module)), None)


def compacted_by(module: nn.Module) -> AttentionFamily | None:
    """The family whose ``rewrite`` made ``module`` (a ``CompactMultiheadAttention``...), if any."""
    return next((f for f in FAMILIES if isinstance(module, f.compact_types)), None) if FAMILIES else None


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


def class_named(module: nn.Module, names: tuple[str, ...], package: str) -> bool:
    """True when ``module``'s class (or a base class) is one of ``names`` defined in ``package``, which is never imported."""
    return any(c.__name__ in names and c.__module__.startswith(f"{package}.") for c in type(module).__mro__)
