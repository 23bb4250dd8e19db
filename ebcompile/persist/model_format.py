"""The saved-model format both writers use (``checkpoint.save`` and the ``save_pretrained`` that ``compact``
attaches, ``pretrained.py``): file names, the format tag and version of ``ebcompile.json``, and the per-layer counts
it records (``heads``, ``counts``). ``attention_heads`` reads the query and key/value heads of every attention layer,
dense or compacted; ``head_counts`` (what ``load`` can cut) and ``report`` both read it.

Invariant: what is recorded is read from the model as it is (module attributes, a compacted module's view of its
config), never from a list of model classes, so a reload rebuilds exactly the counts the saved model computes with.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..families import family_of
from ..families.config_values import config_value
from ..families.vocabulary import GROUP_COUNTS, HEAD_COUNTS, KV_COUNTS, NEURON_WIDTHS, WIDTHS
from ..modules import CompactMultiheadAttention, CompactShiftedWindowAttention
from ..transforms.counts import WIDTH_ATTRS, ConfigView

__all__ = ["WEIGHTS", "CONFIG", "META", "FORMAT", "VERSION", "head_counts", "attention_heads", "HeadCount", "count_attributes"]

WEIGHTS, CONFIG, META = "model.safetensors", "config.json", "ebcompile.json"
FORMAT, VERSION = "ebcompile-model", 1


def head_counts(model: nn.Module) -> dict[str, int]:
    """Head count of every attention module whose heads ``load`` can cut (a registered family or ebcompile's
    compact modules; outermost first): the ``heads`` of ``ebcompile.json``."""
    return {path: c.heads for path, c in attention_heads(model).items() if c.followed}


@dataclass(frozen=True)
class HeadCount:
    heads: int  # query heads
    kv_heads: int  # key/value heads (== heads unless grouped-query attention)
    followed: bool  # a family ebcompile follows by module (or a compact module): ``load`` can cut it to ``heads``


def attention_heads(model: nn.Module) -> dict[str, HeadCount]:
    """Query and key/value heads of every attention module, outermost first, read from the model as it is (dense or
    compacted): a registered family's head group, ebcompile's compact modules, projection widths over ``head_dim``
    (Hugging Face q/k/v projections, grouped-query included), else the counts the module or its own config view keeps.
    Modules ``load`` can cut are found first, so a container that merely keeps a head count (a decoder's
    ``num_heads``) never hides the attention modules inside it."""
    modules = [(path, m) for path, m in model.named_modules() if path and not isinstance(m, nn.Linear)]
    counts: dict[str, HeadCount] = {}
    for path, m in modules:
        if not _inside(path, counts) and (found := _followed_heads(path, m)) is not None:
            counts[path] = found
    for path, m in modules:
        if path not in counts and not _inside(path, counts) and not any(p.startswith(path + ".") for p in counts) and (
                found := _kept_heads(m)) is not None:
            counts[path] = found
    order = {path: i for i, (path, _) in enumerate(modules)}
    return dict(sorted(counts.items(), key=lambda item: order[item[0]]))


def _inside(path: str, counts: dict[str, HeadCount]) -> bool:
    return any(path.startswith(p + ".") for p in counts)


def _followed_heads(path: str, m: nn.Module) -> HeadCount | None:
    if isinstance(m, (CompactMultiheadAttention, CompactShiftedWindowAttention)):
        return HeadCount(int(m.num_heads), int(m.num_heads), True)
    if (family := family_of(m)) is not None and (group := family.heads(path, m)) is not None:
        return HeadCount(int(group.units), int(group.units), True)
    return None


def _kept_heads(m: nn.Module) -> HeadCount | None:
    config = getattr(m, "config", None)
    head_dim = _int(m, "head_dim") or _int(config, "head_dim")
    q, k = (next((c for n in names if isinstance(c := getattr(m, n, None), nn.Linear)), None)
            for names in (("q_proj", "query"), ("k_proj", "key")))
    if q is not None and k is not None and head_dim and not (q.out_features % head_dim or k.out_features % head_dim):
        return HeadCount(q.out_features // head_dim, k.out_features // head_dim, False)
    linears = [c for c in m.children() if isinstance(c, nn.Linear)]
    if not linears and not isinstance(m, nn.MultiheadAttention):
        return None
    if heads := next((v for a in HEAD_COUNTS if (v := _int(m, a))), None):  # a count the module keeps
        return HeadCount(heads, next((v for a in KV_COUNTS if (v := _int(m, a))), heads), False)
    heads = next((v for a in HEAD_COUNTS if (v := _int(config, a))), None)  # its config (a compact layer's ConfigView)
    kv = next((v for a in KV_COUNTS if (v := _int(config, a))), heads)
    own_dim = _int(m, "head_dim")  # an attention module's own head width (an MLP sharing the config has none)
    if heads and own_dim and any(c.out_features == (heads + 2 * kv) * own_dim for c in linears):  # a fused q|k|v
        return HeadCount(heads, kv, False)
    return None


def _int(obj: object, attr: str) -> int | None:
    value = config_value(obj, attr) if obj is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def count_attributes(model: nn.Module) -> dict[str, int]:
    """Every head count and width attribute of the table in ``transforms.counts`` (``path.attr`` -> value): what a
    fresh model needs rewritten, besides its tensor shapes, to compute what the compact one does."""
    from ..families.hf_moe import EXPERT_COUNTS, EXPERT_WIDTHS

    names = set(HEAD_COUNTS + KV_COUNTS + GROUP_COUNTS + WIDTHS + NEURON_WIDTHS + EXPERT_COUNTS + EXPERT_WIDTHS)
    out = {}
    for path, module in model.named_modules():
        own = set(module.__dict__.get(WIDTH_ATTRS, ()))
        for attr in (names | own) & set(module.__dict__):
            value = module.__dict__[attr]
            if isinstance(value, int) and not isinstance(value, bool):
                out[f"{path}.{attr}" if path else attr] = value
            elif attr in own and isinstance(value, tuple):  # a shape attribute transforms.reshapes.rewrite_widths set
                out[f"{path}.{attr}" if path else attr] = list(value)
        view = module.__dict__.get("config")
        if isinstance(view, ConfigView):  # the counts compaction gave this module over the shared config
            out.update({f"{path}.config.{attr}" if path else f"config.{attr}": v for attr, v in view.overrides.items()})
    return out
