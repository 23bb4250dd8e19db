"""Conformer relative-position attention (Transformer-XL style, as in Wav2Vec2-Conformer, Parakeet, FastSpeech2-
Conformer, SeamlessM4T's speech encoder): per-head ``pos_bias_u``/``pos_bias_v`` parameters of (heads, head_dim)
added after the head split, the relative shift by ``F.pad``, an in-place ``masked_fill_`` on the scores. The heads
are found, the bias rows are cut with them, and the compact model computes what the masked one did."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ebcompile


class RelPosAttention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q, self.k, self.v, self.pos = (nn.Linear(dim, dim) for _ in range(4))
        self.out = nn.Linear(dim, dim)
        self.pos_bias_u = nn.Parameter(torch.randn(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.randn(heads, self.head_dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.head_dim)  # [b, t, h, d]
        k = self.k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        p = self.pos(pos).view(1, pos.shape[1], -1, self.head_dim).permute(0, 2, 3, 1)  # [1, h, d, 2t-1]
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-1, -2))
        bd = torch.matmul((q + self.pos_bias_v[None, None]).transpose(1, 2), p)  # [b, h, t, 2t-1]
        shape = bd.shape
        bd = F.pad(bd, (1, 0)).view(shape[0], shape[1], shape[3] + 1, shape[2])[:, :, 1:].view(shape)[..., :t]
        scores = (ac + bd) / self.head_dim**0.5
        scores.masked_fill_(pad[:, None, None, :], float("-inf"))
        h = torch.softmax(scores, -1) @ v
        return self.out(h.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.attn = RelPosAttention(dim)
        self.up, self.down = nn.Linear(dim, 48), nn.Linear(48, dim)

    def forward(self, x, pos, pad):
        x = x + self.attn(x, pos, pad)
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 3)

    def forward(self, x, pos, pad):
        for block in self.blocks:
            x = block(x, pos, pad)
        return self.head(x.mean(1))


def _inputs(b: int = 2, t: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[0, -2:] = True
    return torch.randn(b, t, 32, generator=g), torch.randn(1, 2 * t - 1, 32, generator=g), pad


def test_relative_position_heads_are_cut_with_their_bias_rows(tmp_path) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    ebcompile.prepare(model, _inputs(), ratio=0.5, structure="structured", importance="magnitude")
    heads = [g for g in model._ebcompile.plan.groups if g.kind == "head"]
    assert len(heads) == 2 and all(g.units == 4 for g in heads)
    tensors = {m.tensor for g in heads for m in g.members}
    assert {"blocks.0.attn.pos_bias_u", "blocks.0.attn.pos_bias_v", "blocks.0.attn.pos.weight"} <= tensors
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    for block in small.blocks:
        kept = block.attn.q.out_features // 8
        assert block.attn.pos_bias_u.shape == (kept, 8) == block.attn.pos_bias_v.shape
    assert sum(b.attn.q.out_features for b in small.blocks) < 64
    with torch.no_grad():
        for seed, t in ((1, 6), (2, 9)):  # another length: the shift's sizes come from the input
            torch.testing.assert_close(small(*_inputs(3, t, seed)), model(*_inputs(3, t, seed)))


def test_wav2vec2_conformer_relative_heads_compact_exactly() -> None:
    transformers = __import__("pytest").importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2ConformerConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, conv_dim=(32, 32),
        conv_stride=(4, 4), conv_kernel=(8, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        position_embeddings_type="relative", vocab_size=32)
    model = transformers.Wav2Vec2ConformerModel(cfg).eval()
    x = torch.randn(2, 1600)
    ebcompile.prepare(model, (x,), ratio=0.5, structure="structured", importance="magnitude")
    assert [g.units for g in model._ebcompile.plan.groups if g.kind == "head"] == [4]
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small.encoder.layers[0].self_attn.pos_bias_u.shape[0] < 4
    with torch.no_grad():
        torch.testing.assert_close(small(x).last_hidden_state, model(x).last_hidden_state)
