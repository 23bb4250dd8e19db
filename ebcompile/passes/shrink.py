"""Transform: physically remove pruned heads and FFN neurons.

Invariant: does not preserve shapes, does preserve the function of the masked model — for every input,
``compact(m)(x) == m(x)`` up to float rounding, where ``m`` has a structured ticket applied. The result is
an ordinary ``nn.Module`` with no mask left in it; head counts are rewritten where they live (module
attributes; ``nn.MultiheadAttention`` becomes ``CompactMultiheadAttention``, which allows any head count).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import NotPreparedError
from ..modules import CompactMultiheadAttention
from ..plan import GroupSet
from ..prepare import config_of
from .masks import strip_masks

__all__ = ["compact"]


def _removed_indices(group: GroupSet, keep: torch.Tensor) -> dict[tuple[str, int], set[int]]:
    pruned = [int(u) for u in (~keep).nonzero().flatten()]
    out: dict[tuple[str, int], set[int]] = {}
    for m in group.members:
        idx = out.setdefault((m.tensor, m.dim), set())
        for u in pruned:
            start = m.offset + u * m.unit_size
            idx.update(range(start, start + m.unit_size))
    return out


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value


def _fix_attributes(model: nn.Module, groups: dict[str, GroupSet], kept_heads: dict[str, int]) -> None:
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            module.nf = module.weight.shape[1]
    for path, heads in kept_heads.items():
        mod = model.get_submodule(path)
        if isinstance(mod, nn.MultiheadAttention):
            _replace(model, path, _compact_mha(mod, heads))
        else:
            for attr in groups[path].attributes:
                setattr(mod, attr, heads)


def _compact_mha(mod: nn.MultiheadAttention, heads: int) -> CompactMultiheadAttention:
    head_dim = mod.embed_dim // mod.num_heads
    new = CompactMultiheadAttention(mod.embed_dim, heads, head_dim, bias=mod.in_proj_bias is not None,
                                    batch_first=mod.batch_first, dropout=mod.dropout)
    new.to(mod.out_proj.weight.device, mod.out_proj.weight.dtype)
    with torch.no_grad():
        w = mod.in_proj_weight if mod._qkv_same_embed_dim else torch.cat([mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight])
        new.in_proj.weight.copy_(w)
        if mod.in_proj_bias is not None:
            new.in_proj.bias.copy_(mod.in_proj_bias)
        new.out_proj.weight.copy_(mod.out_proj.weight)
        if mod.out_proj.bias is not None:
            new.out_proj.bias.copy_(mod.out_proj.bias)
    new.train(mod.training)
    return new


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, name, new)


def compact(model: nn.Module) -> nn.Module:
    """A new, smaller module computing what the masked ``model`` computes (``model`` is left as it is)."""
    cfg = config_of(model)
    ticket = getattr(cfg, "ticket", None)
    if ticket is None:
        raise NotPreparedError("no ticket is applied to this model. Fix: call ebcompile.apply_ticket(model, ticket) before compact.")
    new = copy.deepcopy(model)
    strip_masks(new, bake=True)
    new.__dict__.pop("_ebcompile", None)
    if ticket.structure != "structured":
        return new
    removed: dict[tuple[str, int], set[int]] = {}
    kept_heads: dict[str, int] = {}
    groups = {g.name: g for g in cfg.plan.groups}
    for g in cfg.plan.groups:
        keep = ticket.masks.units[f"{g.kind}:{g.name}"]
        for key, idx in _removed_indices(g, keep).items():
            removed.setdefault(key, set()).update(idx)
        if g.kind == "head":
            kept_heads[g.module or g.name] = int(keep.sum())
    with torch.no_grad():
        for (name, dim), idx in removed.items():
            if not idx:
                continue
            owner, _, attr = name.rpartition(".")
            t = getattr(new.get_submodule(owner), attr)
            keep_idx = torch.tensor([i for i in range(t.shape[dim]) if i not in idx], device=t.device)
            _set_tensor(new, name, t.detach().index_select(dim, keep_idx).clone())
    _fix_attributes(new, groups, kept_heads)
    return new
