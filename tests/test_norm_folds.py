"""RMS norms across heads (OLMo-2, OLMoE, FlexOlmo: ``q_norm``/``k_norm`` over every head's channels of q_proj and
k_proj) no longer join the heads into one unit: compaction rescales the producer and the norm weight so the smaller
norm divides by what the masked one did (``analysis.norm_folds``, ``transforms.norm_scale``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import ebcompile


def _olmo2(heads: int = 4, kv: int = 2) -> nn.Module:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = Olmo2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(0)
    return Olmo2ForCausalLM(cfg).eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_olmo2_heads_are_units_and_compact_matches_masked(tmp_path):
    model = _olmo2()
    ids = torch.randint(0, 64, (2, 7))
    ebcompile.prepare(model, {"input_ids": ids}, ratio=0.5, structure="structured", importance="magnitude")
    heads = [g for g in model._ebcompile.plan.groups if g.kind == "head"]
    assert [g.units for g in heads] == [2, 2]  # whole KV groups (2 query heads each), one unit each, per layer
    assert all({f[2] for f in g.folds} == {f"model.layers.{i}.self_attn.q_norm.weight", f"model.layers.{i}.self_attn.k_norm.weight"}
               for i, g in enumerate(heads))
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model, 0.5))
    small = ebcompile.compact(model, round_to=None).eval()
    for x in (ids, torch.randint(0, 64, (1, 11))):
        torch.testing.assert_close(_logits(small, x), _logits(model, x), atol=1e-5, rtol=1e-5)
    attn = [layer.self_attn for layer in small.model.layers]
    assert sum(a.q_proj.out_features for a in attn) < 2 * 32
    assert all(a.q_norm.weight.numel() == a.q_proj.out_features and a.k_norm.weight.numel() == a.k_proj.out_features
               for a in attn)
    ebcompile.save(small, tmp_path / "small")
    back = ebcompile.load(tmp_path / "small").eval()
    torch.testing.assert_close(_logits(back, ids), _logits(small, ids))


class NormAfterResidual(nn.Module):
    """An RMS norm over q_proj's output plus other data (not one linear's output alone): no fold, the heads stay
    joined as by any norm."""

    def __init__(self, dim: int = 24, heads: int = 4) -> None:
        super().__init__()
        self.hd = dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.fc1, self.fc2, self.out = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x) + x
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
        q, k, v = (t.view(b, n, -1, self.hd).transpose(1, 2) for t in (q, self.k(x), self.v(x)))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))
        return self.out(x + self.fc2(F.gelu(self.fc1(x))))


def test_an_rms_norm_over_more_than_one_linear_output_keeps_joining_the_heads():
    torch.manual_seed(0)
    model = ebcompile.prepare(NormAfterResidual(), torch.randn(2, 5, 24), ratio=0.5, structure="structured",
                              importance="magnitude", capture_method="export")
    assert not [g for g in model._ebcompile.plan.groups if g.kind == "head" and g.units > 1]
    assert [g.units for g in model._ebcompile.plan.groups if g.kind == "neuron"] == [48]
