"""A Hugging Face model holding ``nn.MultiheadAttention`` (SigLIP's attention-pooling head): compact turns the pruned
module into ``CompactMultiheadAttention`` (``in_proj.weight``), and ``load`` without ``model=`` rebuilds it from the
config (the family record names the compact tensor names); a container that only keeps a head count never hides
the attention modules inside it from the saved head counts; a sub-model class reloads by the class the save records."""
from __future__ import annotations

import torch
from torch import nn

import ebcompile
from ebcompile.modules import CompactMultiheadAttention
from ebcompile.persist.model_format import attention_heads, head_counts


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


def test_a_sub_model_class_reloads_by_the_class_the_save_records(tmp_path) -> None:
    """``TrOCRDecoder`` is no top-level transformers name, so ``config.json``'s architectures cannot rebuild it;
    ``ebcompile.json`` records the class, which ``load`` imports from transformers itself (never from the folder)."""
    import transformers
    from transformers.models.trocr.modeling_trocr import TrOCRConfig, TrOCRDecoder

    assert not hasattr(transformers, "TrOCRDecoder")
    torch.manual_seed(0)
    model = TrOCRDecoder(TrOCRConfig(vocab_size=50, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                     decoder_ffn_dim=48, max_position_embeddings=32, cross_attention_hidden_size=32)).eval()
    x = {"input_ids": torch.randint(0, 50, (2, 7))}
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    ebcompile.save(small, tmp_path / "s")
    back = ebcompile.load(tmp_path / "s")
    assert type(back) is TrOCRDecoder
    with torch.no_grad():
        torch.testing.assert_close(back(**x).last_hidden_state, small(**x).last_hidden_state)
