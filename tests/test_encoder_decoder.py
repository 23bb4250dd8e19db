"""Encoder-decoder models (T5, BART) and a per-head bias the analysis cannot slice (BLOOM's ALiBi): the default
``prepare`` -> ticket -> ``compact`` computes what the masked model does, and the compact model exports to ONNX
verified in onnxruntime with a decoder sequence shorter than the encoder's."""

from __future__ import annotations

import pytest
import torch

import ebcompile

transformers = pytest.importorskip("transformers")

VOCAB = 100


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))


def _bart():
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=64))


def _bloom():
    return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4))


def _compact(build, inputs):
    torch.manual_seed(0)
    masked = ebcompile.prepare(build().eval(), inputs, ratio=0.4)
    ebcompile.apply_ticket(masked, ebcompile.draw_ticket(masked))
    small = ebcompile.compact(masked)
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, masked(**inputs).logits, rtol=1e-4, atol=1e-5)
    return masked, small


@pytest.mark.parametrize("build", [_t5, _bart], ids=["t5", "bart"])
def test_encoder_decoder_compacts_exactly_and_exports_verified(build, tmp_path):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids[:, :5]}
    masked, small = _compact(build, inputs)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in masked.parameters())
    heads = [g for g in masked._ebcompile.plan.groups if g.kind == "head"]
    assert heads, "attention heads found in the encoder or the decoder"
    ebcompile.export_onnx(small, tmp_path / "small.onnx", inputs)  # raises ExportError unless ORT matches PyTorch
    assert (tmp_path / "small.onnx").stat().st_size > 0


def test_a_per_head_bias_built_outside_the_layers_keeps_the_heads():
    """BLOOM adds ALiBi slopes made from the head count once for all layers: heads are refused (and said why),
    FFN neurons are pruned, and the compact model is exact."""
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    masked, small = _compact(_bloom, {"input_ids": ids})
    plan = masked._ebcompile.plan
    assert {g.kind for g in plan.groups} == {"neuron"}
    assert "per-head bias" in plan.skipped["transformer.h.0.self_attention.query_key_value"]
    assert small.transformer.h[0].mlp.dense_h_to_4h.out_features < 128
