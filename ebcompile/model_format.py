"""The saved-model format both writers use (``checkpoint.save`` and the ``save_pretrained`` that ``compact``
attaches, ``pretrained.py``): file names, the format tag and version of ``ebcompile.json``, and the per-layer counts
it records (``heads``, ``counts``).

Invariant: what is recorded is read from the model as it is (module attributes, a compacted module's view of its
config), never from a list of model classes, so a reload rebuilds exactly the counts the saved model computes with.
"""

from __future__ import annotations

from torch import nn

from .families import family_of
from .modules import CompactMultiheadAttention, CompactShiftedWindowAttention
from .passes.counts import GROUP_COUNTS, HEAD_COUNTS, KV_COUNTS, NEURON_WIDTHS, WIDTHS, ConfigView

__all__ = ["WEIGHTS", "CONFIG", "META", "FORMAT", "VERSION", "head_counts", "count_attributes"]

WEIGHTS, CONFIG, META = "model.safetensors", "config.json", "ebcompile.json"
FORMAT, VERSION = "ebcompile-model", 1


def head_counts(model: nn.Module) -> dict[str, int]:
    """Head count of every attention module: registered families (outermost) and ebcompile's compact modules."""
    counts: dict[str, int] = {}
    for path, m in model.named_modules():
        if any(path.startswith(p + ".") for p in counts):
            continue
        if isinstance(m, (CompactMultiheadAttention, CompactShiftedWindowAttention)):
            counts[path] = int(m.num_heads)
        elif (family := family_of(m)) is not None and (group := family.heads(path, m)) is not None:
            counts[path] = int(group.units)
    return counts


def count_attributes(model: nn.Module) -> dict[str, int]:
    """Every head count and width attribute of the table in ``passes.counts`` (``path.attr`` -> value): what a
    fresh model needs rewritten, besides its tensor shapes, to compute what the compact one does."""
    from .families.hf_moe import EXPERT_COUNTS, EXPERT_WIDTHS

    names = set(HEAD_COUNTS + KV_COUNTS + GROUP_COUNTS + WIDTHS + NEURON_WIDTHS + EXPERT_COUNTS + EXPERT_WIDTHS)
    out = {}
    for path, module in model.named_modules():
        for attr in names & set(module.__dict__):
            value = module.__dict__[attr]
            if isinstance(value, int) and not isinstance(value, bool):
                out[f"{path}.{attr}" if path else attr] = value
        view = module.__dict__.get("config")
        if isinstance(view, ConfigView):  # the counts compaction gave this module over the shared config
            out.update({f"{path}.config.{attr}" if path else f"config.{attr}": v for attr, v in view.overrides.items()})
    return out
