"""Attention written with ``einsum`` (Funnel, ProphetNet, ConvBERT style), a DeBERTa-style relative-position term
``gather``-ed along the key axis, and the export's pointwise aliases (``torch.multiply``) and ``broadcast_to``:
the heads and neurons are found, and the compact model computes what the masked one did on other shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ebcompile


class EinsumAttention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, span: int = 8) -> None:
        super().__init__()
        self.d = dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.pos = nn.Linear(dim, dim)
        self.rel = nn.Parameter(torch.randn(2 * span, dim))
        self.span = span

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.d)
        k = self.k(x).view(b, t, -1, self.d)
        v = self.v(x).view(b, t, -1, self.d)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
        pos_k = self.pos(self.rel).view(2 * self.span, -1, self.d)  # [2 span, h, d]
        c2p = torch.einsum("bqhd,rhd->bhqr", q, pos_k)
        rel = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).clamp(-self.span, self.span - 1) + self.span
        index = torch.broadcast_to(rel[None, None], (b, c2p.shape[1], t, t))
        scores = scores + torch.gather(c2p, -1, index)
        probs = torch.softmax(scores / self.d**0.5, -1)
        return self.o(torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.attn = EinsumAttention(dim)
        self.gate, self.up, self.down = nn.Linear(dim, 40), nn.Linear(dim, 40), nn.Linear(40, dim)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.down(torch.multiply(F.silu(self.gate(x)), self.up(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_einsum_gather_attention_heads_compact_exactly(importance) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 6, 32)
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance=importance)
    kinds = sorted(g.kind for g in model._ebcompile.plan.groups)
    assert kinds == ["head", "head", "neuron", "neuron"], model._ebcompile.plan.skipped
    with torch.no_grad():
        model(x)  # activation statistics for the draw
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    assert sum(b.attn.q.out_features for b in small.blocks) < 64 and small.blocks[0].attn.pos.out_features < 32
    with torch.no_grad():
        for t in (6, 7):
            y = torch.randn(3, t, 32)
            torch.testing.assert_close(small(y), model(y))


def test_einsum_summing_a_letter_of_one_operand_is_refused() -> None:
    class Summed(nn.Module):  # "bthd->bt"-like: the head channels summed inside one operand are not followed
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            h = torch.einsum("btf,btg->bt", self.a(x), self.b(x))
            return self.out(x * h[..., None])

    model = Summed()
    ebcompile.prepare(model, torch.randn(2, 3, 16), ratio=0.5, structure="unstructured")  # the masks still go on
    with pytest.raises(ebcompile.errors.NoPrunableLayerError):
        ebcompile.prepare(Summed(), torch.randn(2, 3, 16), ratio=0.5, structure="structured")


class RolledAttention(nn.Module):
    """Swin-style shifted tokens (``roll`` over positions) and XLM-style ``cat`` of a legacy empty cache."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 40), nn.Linear(40, dim)
        self.temperature = nn.Parameter(torch.ones(1))  # one entry scaling every head's channels: shared

    def forward(self, x):
        b, t, _ = x.shape
        shifted = torch.roll(x, shifts=1, dims=1)
        q, k, v = self.qkv(shifted).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q = q * self.temperature
        k = torch.cat([torch.empty(0), k], dim=2)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        x = x + torch.roll(self.o(h), shifts=-1, dims=1)
        return x + self.down(F.gelu(self.up(x)))


def test_rolled_positions_and_an_empty_cache_keep_the_heads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(RolledAttention(), RolledAttention()).eval()
    x = torch.randn(2, 5, 32)
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    assert sorted(g.kind for g in model._ebcompile.plan.groups) == ["head", "head", "neuron", "neuron"]
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small[0].qkv.out_features < 96
    with torch.no_grad():
        y = torch.randn(3, 7, 32)
        torch.testing.assert_close(small(y), model(y))


class NoisyBlock(nn.Module):
    """A forward that samples (VITS's noise in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = RolledAttention()

    def forward(self, x):
        return self.inner(x + 0.01 * torch.randn_like(x))


def test_a_sampling_forward_compacts_and_a_scalar_parameter_is_shared() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(NoisyBlock(), NoisyBlock()).eval()
    x = torch.randn(2, 5, 32)
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    assert "head" in {g.kind for g in model._ebcompile.plan.groups}
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()  # its self-check draws the same noise for both models
    assert small[0].inner.temperature.shape == (1,) and small[0].inner.qkv.out_features < 96
