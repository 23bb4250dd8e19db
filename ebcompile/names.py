"""Dotted names of tensors and modules: ``"encoder.0.attn.q.weight"`` is attribute ``weight`` of module ``encoder.0.attn.q``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["split_name", "tensor_at", "set_tensor", "MASK_SUFFIX", "GATE_SUFFIX"]

MASK_SUFFIX = "_mask"  # state-dict key of a weight's mask: "<module>.weight_mask" (transforms/masks.py)
GATE_SUFFIX = "_gate"  # and of its learnable unit gates (importance="gate")


def split_name(name: str) -> tuple[str, str]:
    """``(owner, attribute)`` of a dotted name: ``"a.b.weight"`` -> ``("a.b", "weight")``; ``"weight"`` -> ``("", "weight")``.

    The owner is the path of the module holding the attribute (``""``: the root); works for module paths too
    (``"a.b"`` -> ``("a", "b")``).
    """
    owner, _, attr = name.rpartition(".")
    return owner, attr


def tensor_at(model: nn.Module, name: str) -> Any:
    """The parameter, buffer or attribute ``name`` of ``model`` (as the owner module returns it: masked if parametrized)."""
    owner, attr = split_name(name)
    return getattr(model.get_submodule(owner), attr)


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer ``name`` by ``value`` (a new shape), keeping ``requires_grad``."""
    owner, attr = split_name(name)
    module = model.get_submodule(owner)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value
