"""The structure analysis of a model without weights (the meta device) equals the one of the same model with them."""

from __future__ import annotations

import pytest
import torch

import ebcompile
from ebcompile.errors import ConfigError, NoPrunableLayerError

tf = pytest.importorskip("transformers")


def _config():
    return tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=96, vocab_size=128, use_cache=False)


def _llama(device: str = "cpu"):
    torch.manual_seed(0)
    with torch.device(device):
        return tf.LlamaForCausalLM(_config())


IDS = {"input_ids": torch.randint(0, 128, (1, 8))}


@pytest.mark.parametrize("kv_heads", ["prune", "keep"])
def test_meta_analysis_finds_the_plan_prepare_finds(kv_heads):
    meta = ebcompile.analyse(_llama("meta"), IDS, kv_heads=kv_heads)
    real = ebcompile.prepare(_llama(), IDS, kv_heads=kv_heads, structure="structured")
    assert meta.plan.to_dict() == real._ebcompile.plan.to_dict()
    assert meta.structure == "structured"
    assert sorted(meta.tensors) == sorted(name for name, *_ in ebcompile.prepare.__globals__["iter_masks"](real))
    expect = {"KV groups": 2 * 2, "neurons": 2 * 96} if kv_heads == "prune" else {"heads": 2 * 4, "neurons": 2 * 96}
    assert meta.counts() == expect
    assert "lm_head" in meta.plan.skipped and "lm_head" in str(meta)


def test_analyse_changes_nothing_and_accepts_meta_inputs():
    model = _llama("meta")
    before = {k: (v.shape, v.device) for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    analysis = ebcompile.analyse(model, {"input_ids": IDS["input_ids"].to("meta")})
    assert {k: (v.shape, v.device) for k, v in model.state_dict().items()} == before
    assert getattr(model, "_ebcompile", None) is None
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    assert analysis.parameters == sum(p.numel() for p in model.parameters())
    assert 0 < analysis.masked_parameters < analysis.parameters


def test_entry_points_needing_weights_still_refuse_meta_models():
    model = _llama("meta")
    with pytest.raises(ConfigError, match="meta device"):
        ebcompile.prepare(model, IDS)
    with pytest.raises(NoPrunableLayerError):  # the same typed errors as prepare, before anything changes
        ebcompile.analyse(model, IDS, include=["nothing.*"])
    with pytest.raises(ConfigError, match="nn.Module"):
        ebcompile.analyse("meta-llama/Llama-3-70B", IDS)
