"""Heterogeneous (per-layer) Hugging Face configs: Gemma 4 holds ``head_dim`` per layer; nothing reads it globally."""

from __future__ import annotations

import pytest
import torch

import ebcompile
from ebcompile.families.config_values import config_value, per_layer_fields

transformers = pytest.importorskip("transformers")
Gemma4TextConfig = getattr(transformers, "Gemma4TextConfig", None)
pytestmark = pytest.mark.skipif(Gemma4TextConfig is None, reason="transformers without Gemma 4")


def gemma4():
    config = Gemma4TextConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.Gemma4TextModel(config).eval()


def test_config_value_returns_the_default_for_a_per_layer_field():
    config = gemma4().config
    assert "head_dim" in per_layer_fields(config)
    with pytest.raises(RuntimeError):
        config.head_dim  # noqa: B018 - transformers refuses the global read
    assert config_value(config, "head_dim", "per-layer") == "per-layer"
    assert config_value(config, "hidden_size") == 32 and config_value(object(), "hidden_size") is None


def test_gemma4_compacts_reports_saves_and_exports(tmp_path):
    x = {"input_ids": torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(1))}
    model = ebcompile.prepare(gemma4(), x, structure="structured", ratio=0.3)
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None)
    with torch.no_grad():
        want = model(**x).last_hidden_state
        torch.testing.assert_close(small(**x).last_hidden_state, want, rtol=1e-4, atol=1e-5)
    heads = ebcompile.report(small).heads
    assert heads and sum(heads.values()) < 2 * 4  # some query heads removed, counted per layer
    ebcompile.save(small, tmp_path / "save")
    with torch.no_grad():
        torch.testing.assert_close(ebcompile.load(tmp_path / "save")(**x).last_hidden_state, want, rtol=1e-4, atol=1e-5)
    assert ebcompile.export_onnx(small, tmp_path / "m.onnx", x).max_abs_error < 1e-4
