"""Encoder-decoder models (T5, BART) and a per-head bias made outside the layers (BLOOM's ALiBi): the default
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


def test_a_per_head_bias_built_outside_the_layers_is_sliced_with_the_heads():
    """BLOOM adds ALiBi slopes made from the head count once for all layers: each compact layer slices them to its
    kept heads where they enter it (``analysis.head_inputs``), and the compact model is exact."""
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    masked, small = _compact(_bloom, {"input_ids": ids})
    plan = masked._ebcompile.plan
    assert {g.kind for g in plan.groups} == {"head", "neuron"}
    assert small.transformer.h[0].mlp.dense_h_to_4h.out_features < 128


class BaddbmmAttention(torch.nn.Module):
    """Eager attention as GPT-NeoX-Japanese writes it: scores = baddbmm(zeros made here, q, k^T), separate q/k/v."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2).reshape(b * self.num_heads, s, self.head_dim)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        zeros = torch.zeros(b * self.num_heads, s, s, dtype=x.dtype)
        probs = torch.baddbmm(zeros, q, k.transpose(1, 2), beta=1.0, alpha=self.head_dim ** -0.5).softmax(-1)
        out = torch.bmm(probs, v).view(b, self.num_heads, s, self.head_dim).transpose(1, 2).reshape(b, s, -1)
        return x + self.o(out)


def test_baddbmm_attention_with_its_own_zero_addend_keeps_its_heads_prunable():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), BaddbmmAttention(), torch.nn.Linear(32, 3)).eval()
    x = torch.randn(2, 5, 8)
    masked = ebcompile.prepare(net, x, ratio=0.5, structure="structured", capture_method="export")
    assert [g.units for g in masked._ebcompile.plan.groups if g.kind == "head"] == [4]
    ebcompile.apply_ticket(masked, ebcompile.draw_ticket(masked))
    small = ebcompile.compact(masked, round_to=None)
    assert small[1].num_heads < 4
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)
