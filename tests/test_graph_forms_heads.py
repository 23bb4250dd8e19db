"""Attention forms of transformers' model zoo whose heads the analysis used to merge into one unit, each reduced to a
few lines (before: one "head" unit per layer, nothing to cut; now: every head a unit, compact ≡ masked).

- Swin-v2 / Swin2SR: cosine attention, ``F.normalize(q, dim=-1)`` — ``linalg_vector_norm(x, ord, dim, keepdim)``
  takes ``ord`` before ``dim``; the analysis read ``ord`` as the dims and reduced over every head.
- RoFormer: rotary angles from a sinusoidal position *table* (an embedding looked up by ``arange``), split, stacked
  and ``reshape_as``'d: rows picked by positions are constants per channel, like a weight, shared by every head.
- SAM2 (Hiera): queries max-pooled over space before attention (pooling works per channel), and attention weights
  computed next to ``scaled_dot_product_attention`` and never used (dead code must constrain nothing).
- Bros: ``einsum("bnid,bijd->bnij", q, bbox)`` — each head's channels contracted with position data every head shares.
"""

from __future__ import annotations

import torch
from test_graph_forms import _compact_matches
from torch import nn
from torch.nn import functional as F

import ebcompile

DIM, HEADS = 24, 4


class Block(nn.Module):
    """q/k/v/o, an attention given as ``scores``, a GELU FFN; subclasses change how q and k meet."""

    def __init__(self) -> None:
        super().__init__()
        self.hd = DIM // HEADS
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, -1, self.hd).transpose(1, 2)

    def attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (q @ k.transpose(-2, -1) / self.hd**0.5).softmax(-1) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (self.split(p(x)) for p in (self.q, self.k, self.v))
        y = self.attend(x, q, k, v)
        x = x + self.o(y.transpose(1, 2).reshape(b, y.shape[2], -1))
        return x + self.fc2(F.gelu(self.fc1(x)))


class CosineAttention(Block):
    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.rand(HEADS, 1, 1) + 1)

    def attend(self, x, q, k, v):
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * self.logit_scale.exp()
        return scores.softmax(-1) @ v


class TableRotary(Block):
    def __init__(self) -> None:
        super().__init__()
        angles = torch.arange(64)[:, None] / 10 ** (torch.arange(0, self.hd, 2) / self.hd)[None, :]
        self.positions = nn.Embedding(64, self.hd, _weight=torch.cat([angles.sin(), angles.cos()], -1))
        self.positions.weight.requires_grad_(False)

    @staticmethod
    def rotate(t: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        turned = torch.stack([-t[..., 1::2], t[..., ::2]], dim=-1).reshape_as(t)
        return t * cos + turned * sin

    def attend(self, x, q, k, v):
        table = self.positions(torch.arange(x.shape[1]))[None, None]
        sin, cos = table.chunk(2, dim=-1)
        sin = torch.stack([sin, sin], dim=-1).reshape_as(table)
        cos = torch.stack([cos, cos], dim=-1).reshape_as(table)
        return super().attend(x, self.rotate(q, sin, cos), self.rotate(k, sin, cos), v)


class PooledQuery(Block):
    """Queries max-pooled 2 -> 1 over a 1-D grid of positions (channels first), plus unused attention weights."""

    def attend(self, x, q, k, v):
        unused = (q @ k.transpose(-2, -1)).softmax(-1)  # computed, never read (SAM2)
        del unused
        b, h, n, d = q.shape
        pooled = F.max_pool1d(q.transpose(1, 2).reshape(b, n, h * d).transpose(1, 2), 2)  # [b, h*d, n/2]
        q = pooled.transpose(1, 2).reshape(b, n // 2, h, d).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v).repeat_interleave(2, dim=2)  # back to n positions


class SharedBoxes(Block):
    """Each head's queries also meet box features every head shares (Bros's ``bnid,bijd->bnij``)."""

    def __init__(self) -> None:
        super().__init__()
        self.box = nn.Linear(4, self.hd)

    def attend(self, x, q, k, v):
        n = x.shape[1]
        boxes = self.box(torch.linspace(0, 1, n * n * 4).view(1, n, n, 4)).expand(x.shape[0], -1, -1, -1)
        scores = q @ k.transpose(-2, -1) + torch.einsum("bnid,bijd->bnij", q, boxes)
        return (scores / self.hd**0.5).softmax(-1) @ v


def _check(block: type[Block], lengths: tuple[int, int] = (6, 8)) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(block(), block(), nn.Linear(DIM, 3))
    inputs = [torch.randn(2, lengths[0], DIM), torch.randn(1, lengths[1], DIM)]
    model, small = _compact_matches(model, inputs, "export")
    heads = [g for g in model._ebcompile.plan.groups if g.kind == "head"]
    assert [g.units for g in heads] == [HEADS, HEADS], [g.units for g in heads]
    assert sum(small[i].q.out_features for i in range(2)) == DIM  # half the heads of the two layers
    return model, small


def test_cosine_attention_keeps_one_unit_per_head():
    model, small = _check(CosineAttention)
    assert [tuple(small[i].logit_scale.shape) for i in range(2)] == [(small[i].q.out_features // 6, 1, 1) for i in range(2)]


def test_rotary_from_a_position_table_keeps_one_unit_per_head():
    model, small = _check(TableRotary)
    assert small[0].positions.weight.shape == (64, 6)  # the table every head reads stays whole


def test_pooled_queries_and_unused_attention_weights_keep_one_unit_per_head():
    _check(PooledQuery, lengths=(6, 8))


def test_heads_contracted_with_shared_position_data_keep_one_unit_per_head():
    model, small = _check(SharedBoxes)
    assert small[0].box.out_features == 6


class UnusedStage(nn.Module):
    """A backbone stage computed and never read (VitMatte's tester keeps stage 1 only): no units, and a reason."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused, self.out = Block(), Block(), nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.used(x)
        self.unused(h)
        return self.out(h)


def test_a_stage_whose_output_is_never_used_has_no_units_and_says_why():
    torch.manual_seed(0)
    model = ebcompile.prepare(UnusedStage(), torch.randn(2, 6, DIM), ratio=0.5, structure="structured",
                              importance="magnitude", capture_method="export")
    plan = model._ebcompile.plan
    assert {g.name.split(".")[0] for g in plan.groups} == {"used"}
    assert plan.skipped["unused.fc1"] == "no heads or neurons: its output never reaches the model's output"


class GatedByView(nn.Module):
    """Moshi's gating FFN: ``fc1`` to ``2 F``, ``view(..., 2, -1)``, ``act(h[..., 0, :]) * h[..., 1, :]``, ``fc2``;
    and a two-head attention whose ``view(b, n, -1, head_dim)`` is a split in two like any other into heads."""

    def __init__(self, dim: int = 16, ffn: int = 12, kv_heads: int = 2) -> None:
        super().__init__()
        self.hd, self.kv = dim // 2, kv_heads
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, kv_heads * self.hd), nn.Linear(dim, kv_heads * self.hd)
        self.fc1, self.fc2, self.out = nn.Linear(dim, 2 * ffn), nn.Linear(ffn, dim), nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, self.hd).transpose(1, 2)
        k, v = (p(x).view(b, n, -1, self.hd).transpose(1, 2) for p in (self.k, self.v))
        if self.kv == 1:  # multi-query: both query heads read one KV head
            k, v = k.expand(b, q.shape[1], n, self.hd), v.expand(b, q.shape[1], n, self.hd)
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))
        h = self.fc1(x).view(b, n, 2, -1)
        return self.out(x + self.fc2(F.silu(h[..., 0, :]) * h[..., 1, :]))


def test_a_gated_ffn_split_by_view_keeps_one_unit_per_neuron_and_two_heads_stay_heads():
    for kv_heads in (2, 1):
        torch.manual_seed(0)
        model, small = _compact_matches(GatedByView(kv_heads=kv_heads), [torch.randn(2, 5, 16), torch.randn(1, 7, 16)],
                                        "export")
        units = {g.kind: g.units for g in model._ebcompile.plan.groups}
        assert units == {"neuron": 12, "head": 2}, (kv_heads, units)
        assert small.fc1.out_features < 24 and small.fc1.out_features == 2 * small.fc2.in_features
