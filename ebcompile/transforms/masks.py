"""Transform: insert mask nodes on weights (and strip them again).

Invariant: ``insert_masks`` then ``strip_masks`` is the identity on the module tree, parameter objects and
state_dict; while a mask is all ones the forward is bitwise the original one (the parametrization returns
the weight untouched, and the attribute read skips the parametrization machinery altogether: the
prepared model trains at the plain model's speed). Masks live as ``torch.nn.utils.parametrize`` parametrizations on the user's own
modules, so the model keeps its class, call signature and methods; state_dict keeps the original keys
(``<module>.weight``, holding the masked value) and adds ``<module>.weight_mask``. With ``importance="gate"`` a
mask also holds one learnable gate per unit (``<module>.weight_gate.<i>``) that scales the unit's slice;
``strip_masks(bake=True)`` folds the gates into the weight, so a compacted model has none.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..names import GATE_SUFFIX, MASK_SUFFIX, split_name
from ..search.distributed import masked

__all__ = ["WeightMask", "insert_masks", "strip_masks", "iter_masks", "MASK_SUFFIX", "GATE_SUFFIX", "is_gate"]


class WeightMask(nn.Module):
    """Multiplies a tensor by a boolean mask, and by learnable unit gates (``importance="gate"``) when it has any;
    the identity while ``active`` is False and it has no gate."""

    def __init__(self, shape: torch.Size, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=device))
        self.active = False  # False while all ones: no multiply, bit-exact original forward
        self.frozen = False  # True once a ticket is applied
        self.gates = nn.ParameterList()  # one coefficient per unit of a group, initialised to 1
        self.gate_slices: list[tuple[int, int, int, int]] = []  # (dim, offset, unit_size, experts or 0) each gate scales
        self.gated = False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.active:
            weight = weight * self.mask
        return weight * self.gate_scale(weight) if self.gated else weight

    def add_gate(self, units: int, member: Any) -> int:
        """A new gate of ``units`` coefficients over ``member``'s slice (a ``plan.Member``); returns its index. A
        ``batched`` member (a fused 3-D expert tensor) is gated per expert: ``units`` = experts x units per expert."""
        self.gates.append(nn.Parameter(torch.ones(units, device=self.mask.device)))
        experts = self.mask.shape[0] if getattr(member, "batched", False) else 0
        self.gate_slices.append((member.dim % self.mask.dim(), member.offset, member.unit_size, experts))
        self.gated = True
        return len(self.gates) - 1

    def gate_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """The product of every gate, expanded to a tensor that broadcasts against ``weight``."""
        scale = None
        for gate, (dim, offset, unit, experts) in zip(self.gates, self.gate_slices):
            size = weight.shape[dim]
            g = gate.to(weight.dtype).reshape(max(experts, 1), -1).repeat_interleave(unit, 1)
            ones = weight.new_ones(())
            vec = torch.cat([ones.expand(g.shape[0], offset), g, ones.expand(g.shape[0], size - offset - g.shape[1])], 1)
            shape = [1] * weight.dim()
            shape[dim] = size
            if experts:
                shape[0] = experts
            vec = vec.reshape(shape)
            scale = vec if scale is None else scale * vec
        return scale

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def set(self, mask: torch.Tensor) -> None:
        self.mask.copy_(mask.to(self.mask.device, torch.bool))
        self.active = not bool(self.mask.all())


def insert_masks(model: nn.Module, tensors: list[str]) -> None:
    """Put a ``WeightMask`` on each named parameter of ``model``."""
    modules = dict(model.named_modules())
    for name in tensors:
        owner, attr = split_name(name)
        module = modules[owner]
        if parametrize.is_parametrized(module, attr):
            continue
        param = getattr(module, attr)
        parametrize.register_parametrization(module, attr, WeightMask(param.shape, param.device), unsafe=True)
        _fast_path(type(module), attr)
        module._register_state_dict_hook(_save_hook(attr))
        module.__dict__.setdefault("_ebcompile_pre_hooks", []).append(module.register_load_state_dict_pre_hook(_load_hook(attr)))


def _fast_path(cls: type, attr: str) -> None:
    """Wrap the property ``parametrize`` injected for ``attr``: an inactive (all-ones) mask returns the stored
    tensor directly, without the two module calls of the parametrization (a few percent of a small model's step)."""
    slow = cls.__dict__[attr]
    if getattr(slow.fget, "_ebcompile_fast", False):
        return

    def get(self: nn.Module) -> torch.Tensor:
        plist = self._modules["parametrizations"]._modules[attr]
        first = plist._modules["0"]
        if len(plist) == 1 and not (first.active or first.gated):  # parametrizations added after ours still run
            original = plist._parameters.get("original")
            return original if original is not None else plist.original
        return slow.fget(self)

    get._ebcompile_fast = True
    setattr(cls, attr, property(get, slow.fset))


def strip_masks(model: nn.Module, bake: bool = True) -> None:
    """Remove every ``WeightMask``; ``bake=True`` leaves the masked values in the parameters.

    Parameter objects are kept (optimizers stay valid). Unlike ``parametrize.remove_parametrizations``
    this never edits the injected class, which deep copies of the module share.
    """
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        plists = dict(module.parametrizations.items())
        ours = [len(pl) == 1 and isinstance(pl[0], WeightMask) for pl in plists.values()]
        if not any(ours):  # another library's (weight_norm on a conv): not ebcompile's to remove
            continue
        if not all(ours):
            raise NotImplementedError(f"{type(module).__name__} carries an ebcompile mask and another parametrization "
                                      f"({', '.join(plists)}); ebcompile masks only unparametrized weights")
        originals = {}
        for attr, plist in plists.items():
            original = plist.original
            with torch.no_grad():
                if bake and plist[0].active:
                    original.mul_(plist[0].mask)
                if bake and plist[0].gated:  # gates fold into the weights
                    original.mul_(plist[0].gate_scale(original).to(original.dtype))
            originals[attr] = original
        module.__class__ = module.__class__.__bases__[0]
        del module._modules["parametrizations"]
        for attr, original in originals.items():
            module._parameters[attr] = original
        _drop_hooks(module)


def _drop_hooks(module: nn.Module) -> None:
    for hooks in (module._state_dict_hooks, module._forward_hooks, module._forward_pre_hooks):  # ours, trackers' (tagged)
        for key, hook in list(hooks.items()):
            if getattr(hook, "_ebcompile", False):
                del hooks[key]
    for handle in module.__dict__.pop("_ebcompile_pre_hooks", []):
        handle.remove()


def is_gate(parameter_name: str) -> bool:
    """True for a unit gate's parameter name (``<module>.parametrizations.<attr>.0.gates.<i>``)."""
    return ".parametrizations." in f".{parameter_name}" and ".0.gates." in parameter_name


def iter_masks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, WeightMask]]:
    """(qualified tensor name, owner module, attribute, mask) for every inserted mask."""
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, WeightMask):
                    yield (f"{path}.{attr}" if path else attr), module, attr, p


def _save_hook(attr: str):
    def hook(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        orig = state.pop(f"{prefix}parametrizations.{attr}.original", None)
        mask = state.pop(f"{prefix}parametrizations.{attr}.0.mask", None)
        gate_prefix = f"{prefix}parametrizations.{attr}.0.gates."
        for key in [k for k in state if k.startswith(gate_prefix)]:  # unit gates: <weight>_gate.<i>
            state[f"{prefix}{attr}{GATE_SUFFIX}.{key[len(gate_prefix):]}"] = state.pop(key)
        if orig is None:
            return
        state[f"{prefix}{attr}"] = masked(orig, mask) if mask is not None else orig
        if mask is not None:
            state[f"{prefix}{attr}{MASK_SUFFIX}"] = mask

    hook._ebcompile = True
    return hook


def _load_hook(attr: str):
    def hook(module: nn.Module, state: dict, prefix: str, *args) -> None:
        if f"{prefix}{attr}" in state:
            state[f"{prefix}parametrizations.{attr}.original"] = state.pop(f"{prefix}{attr}")
        plist = module.parametrizations[attr]
        gate_prefix = f"{prefix}{attr}{GATE_SUFFIX}."
        for key in [k for k in state if k.startswith(gate_prefix)]:
            state[f"{prefix}parametrizations.{attr}.0.gates.{key[len(gate_prefix):]}"] = state.pop(key)
        key = f"{prefix}{attr}{MASK_SUFFIX}"
        if key in state:
            mask = state.pop(key)
            state[f"{prefix}parametrizations.{attr}.0.mask"] = mask
            plist[0].active = not bool(mask.all())
        else:  # a plain checkpoint: keep the masks the model has
            state.setdefault(f"{prefix}parametrizations.{attr}.0.mask", plist[0].mask)

    return hook
