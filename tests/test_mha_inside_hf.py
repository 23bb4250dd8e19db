"""A Hugging Face model holding ``nn.MultiheadAttention`` (SigLIP's attention-pooling head): compact turns the pruned
module into ``CompactMultiheadAttention`` (``in_proj.weight``), and ``load`` without ``model=`` rebuilds it from the
config (the family record names the compact tensor names); a container that only keeps a head count never hides
the attention modules inside it from the saved head counts."""
from __future__ import annotations

import torch
from torch import nn

import ebcompile
from ebcompile.model_format import attention_heads, head_counts
from ebcompile.modules import CompactMultiheadAttention


def _siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                             image_size=16, patch_size=4, num_channels=3)
    return SiglipVisionModel(cfg).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}


def test_pooling_head_mha_saves_and_loads_without_model(tmp_path) -> None:
    model, inputs = _siglip()
    ebcompile.prepare(model, inputs, ratio=0.5, structure="structured", importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    pooled = small.head.attention
    assert isinstance(pooled, CompactMultiheadAttention) and pooled.num_heads < 4
    assert head_counts(small)["head.attention"] == pooled.num_heads
    ebcompile.save(small, tmp_path / "s")
    back = ebcompile.load(tmp_path / "s")
    assert isinstance(back.head.attention, CompactMultiheadAttention)
    assert back.head.attention.num_heads == pooled.num_heads
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).pooler_output, small(**inputs).pooler_output)


class _Decoder(nn.Module):
    """Keeps ``num_heads`` and a Linear of its own, like OneFormer's transformer decoder, around real attention."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 8
        self.proj = nn.Linear(16, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)


def test_followed_attention_inside_a_counting_container() -> None:
    counts = attention_heads(_Decoder())
    assert list(counts) == ["attn"] and counts["attn"].heads == 4 and counts["attn"].followed
