"""Transform: rewrite the head counts and widths a module's forward reads, after its tensors were sliced.

Data first: the attribute names of ``families.vocabulary`` are where Transformer code keeps these numbers (``num_heads``,
``num_key_value_heads``, ``num_key_value_groups``, ``all_head_size``, ``intermediate_size``, ...). An attribute
is rewritten only when its value is the one the removed units imply (a head count equal to the number of
heads, a width equal to heads x head_dim), scaled by kept / original. Modules the table does not cover are
caught by ``compact``'s check on the example inputs, never silently wrong.

A module that reads its counts from ``self.config`` at forward time (Phi-3's attention slices its fused QKV
with ``config.num_attention_heads``) gets a ``ConfigView``: its own counts over the shared config, which stays
untouched and keeps serving every other attribute.

Submodules that hold parameters but none of the group's (another layer's attention under the common parent
of a group coupled across layers) are left alone.

Invariant: only ``int`` attributes of the group's module and its submodules (or of their own config views)
change; tensors are untouched.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..families.config_values import config_value
from ..families.vocabulary import GROUP_COUNTS, HEAD_COUNTS, KV_COUNTS, NEURON_WIDTHS, WIDTHS
from ..names import split_name
from ..plan import GroupSet

__all__ = ["ConfigView", "WIDTH_ATTRS", "SLICED_BUFFERS", "rewrite_counts"]

SLICED_BUFFERS = "_ebcompile_sliced_buffers"  # non-persistent buffers compact cut (names): ebcompile.save writes them
WIDTH_ATTRS = "_ebcompile_widths"  # a module's own width attributes transforms.reshapes.rewrite_widths set: {attr: value}


def _scaled(value: int, kept: int, units: int) -> int | None:
    return value * kept // units if value * kept % units == 0 else None


def rewrite_counts(root: nn.Module, group: GroupSet, kept: int) -> list[str]:
    """Scale the count attributes under ``group.module`` (heads) or the producer's module (neurons) by
    ``kept / group.units``; returns the attributes changed (``path.attr``)."""
    if kept == group.units:
        return []
    if group.kind == "head":
        path = group.module or ""
        names = HEAD_COUNTS + WIDTHS + (() if group.per_group else KV_COUNTS)
    else:
        path = split_name(group.name)[0]
        names = NEURON_WIDTHS
    try:
        top = root.get_submodule(path)
    except AttributeError:
        return []
    changed = []
    members = {_plain(m.tensor) for m in group.members}
    for sub_path, module in top.named_modules(prefix=path):
        if isinstance(module, nn.Linear) or (module is root and path == ""):
            continue
        own = {_plain(f"{sub_path}.{n}" if sub_path else n) for n, _ in module.named_parameters()}
        if own and not own & members:  # another layer's block under a common parent (T5's cross-attention)
            continue
        changed += _rewrite_config(module, sub_path, names, kept, group.units)
        for attr in GROUP_COUNTS if group.per_group else ():  # query heads per KV head
            if module.__dict__.get(attr) == group.per_group and kept % (group.units // group.per_group) == 0:
                setattr(module, attr, kept // (group.units // group.per_group))
                changed.append(f"{sub_path}.{attr}")
        for attr in names:
            value = module.__dict__.get(attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < group.units:
                continue
            new = _scaled(value, kept, group.units)
            if new is not None and new > 0:
                setattr(module, attr, new)
                changed.append(f"{sub_path}.{attr}")
    return changed


def _plain(name: str) -> str:
    """A parameter name without the parametrization wrapper (``w.parametrizations.weight.original`` -> ``w.weight``)."""
    return name.replace(".parametrizations.", ".").removesuffix(".original")


class ConfigView:
    """A module's view of a shared config: the counts compaction rewrote for this module, everything else read
    from (and written to) the shared config, so later changes to it (``set_attn_implementation``) still apply."""

    def __init__(self, base: Any, overrides: dict[str, int]) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "overrides", dict(overrides))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy / pickle protocol: this object's own, never the shared config's
            raise AttributeError(name)
        overrides = object.__getattribute__(self, "overrides")
        return overrides[name] if name in overrides else getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.overrides:
            self.overrides[name] = value
        else:
            setattr(self._base, name, value)

    def __repr__(self) -> str:
        return f"ConfigView({self.overrides} over {type(self._base).__name__})"


def _rewrite_config(module: nn.Module, path: str, names: tuple[str, ...], kept: int, units: int) -> list[str]:
    """Scale the counts ``module.config`` holds, in a ``ConfigView`` owned by ``module`` alone (``path.config.attr``)."""
    config = module.__dict__.get("config")
    if config is None or isinstance(config, (dict, nn.Module)):
        return []
    new_values = {}
    for attr in names:
        value = config_value(config, attr)
        if isinstance(value, int) and not isinstance(value, bool) and value >= units:
            new = _scaled(value, kept, units)
            if new is not None and new > 0:
                new_values[attr] = new
    if not new_values:
        return []
    if isinstance(config, ConfigView):
        config.overrides.update(new_values)
    else:
        module.config = ConfigView(config, new_values)
    return [f"{path}.config.{attr}" for attr in new_values]
