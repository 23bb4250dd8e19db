"""Forms met in transformers' model zoo that the analysis now follows, each reduced to a few lines.

- LayoutLMv3: one bias table for every layer (``rel_pos_bias = nn.Linear(bins, heads)`` in the encoder), looked up
  under ``torch.no_grad()`` as ``weight[:, buckets].index_select(1, idx)``: ``torch.export`` wraps the block in a
  ``wrap_with_set_grad_enabled`` higher-order op, which capture now inlines; the table's rows then meet every layer's
  heads, so head h of every layer and row h of the table make one unit (cut in every layer at once).
- Swin v2: each layer computes its bias table with a small MLP (``cpb_mlp(coords).view(-1, heads)``) and picks its
  rows with an index buffer: indexing along a dimension the labels do not vary on keeps them, so the MLP's output
  rows follow the heads.
- Hiera: ``max(dim)`` over positions (query pooling) keeps the labels, like ``amax``.
- DeepSeek-V2 and MiMo: a router computed as `F.linear(x.float(), self.weight.float())` is a linear of its weight
  (so its experts are found).
- DeepSeek-V2: rotary embedding in complex form (`view_as_complex` of channel pairs, `view_as_real` back); LeViT:
  `hardswish`, which torch does not tag pointwise.
- Switch Transformers / NLLB-MoE: a forward that casts a submodule to the dtype it already has
  (``self.classifier = self.classifier.to(self.dtype)``) exports (fake parameters cannot be swapped in place).
Each: the units are found, the compact model computes what the masked one did at two lengths, and is smaller.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import ebcompile


def _attention(q: nn.Linear, k: nn.Linear, v: nn.Linear, x: torch.Tensor, head_dim: int, bias: torch.Tensor):
    b, n, _ = x.shape
    q_, k_, v_ = (p(x).view(b, n, -1, head_dim).transpose(1, 2) for p in (q, k, v))
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=bias).transpose(1, 2).reshape(b, n, -1)


class SharedBiasLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.o(_attention(self.q, self.k, self.v, x, self.head_dim, bias))
        return x + self.fc2(F.gelu(self.fc1(x)))


class SharedBiasEncoder(nn.Module):
    """LayoutLMv3's form: the bias of every layer from one table, looked up without gradients."""

    def __init__(self, dim: int = 24, heads: int = 4, bins: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, dim)
        self.rel_pos_bias = nn.Linear(bins, heads, bias=False)
        self.layers = nn.ModuleList(SharedBiasLayer(dim, heads) for _ in range(layers))
        self.register_buffer("buckets", torch.arange(17) % bins, persistent=False)
        self.out = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1])
        rel = (pos[None, :] - pos[:, None]).clamp(-8, 8) + 8
        with torch.no_grad():
            table = self.rel_pos_bias.weight[:, self.buckets]
            bias = table.index_select(1, rel.flatten()).view(-1, *rel.shape)  # [heads, n, n]
        bias = bias.unsqueeze(0)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, bias)
        return self.out(x)


class MlpBiasLayer(nn.Module):
    """Swin v2's form: a per-layer MLP maps relative coordinates to one bias per head, indexed by position pair."""

    def __init__(self, dim: int = 24, heads: int = 4, window: int = 6) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, heads, bias=False))
        coords = torch.stack(torch.meshgrid(torch.arange(-5, 6.0), torch.arange(-1, 2.0), indexing="ij"), -1)
        self.register_buffer("coords", coords.reshape(-1, 2), persistent=False)
        idx = torch.arange(window)
        self.register_buffer("index", ((idx[:, None] - idx[None, :]) + 5) * 3 + 1, persistent=False)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        table = self.cpb_mlp(self.coords).view(-1, self.heads)
        bias = table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        bias = 16 * torch.sigmoid(bias).unsqueeze(0)
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + bias
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        x = x + self.o(y)
        return x + self.fc2(F.gelu(self.fc1(x)))


class MlpBiasNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.blocks = nn.Sequential(MlpBiasLayer(), MlpBiasLayer())
        self.out = nn.Linear(24, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.embed(ids)))


class MaxPooledFfn(nn.Module):
    """Hiera's query pooling, reduced to its op: ``max(dim)`` over pairs of positions inside an FFN."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(self.embed(ids)))
        b, n, f = h.shape
        pooled = h.view(b, n // 2, 2, f).max(dim=2).values
        return self.out(self.fc2(pooled))


def _compact_matches(model: nn.Module, inputs: list[torch.Tensor], capture: str = "auto") -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ebcompile.prepare(model, inputs[0], ratio=0.5, structure="structured", importance="magnitude",
                      capture_method=capture)
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model, 0.5))
    small = ebcompile.compact(model, round_to=None)
    model.eval(), small.eval()
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    return model, small


def _groups(model: nn.Module, kind: str) -> list:
    return [g for g in model._ebcompile.plan.groups if g.kind == kind]


def test_one_bias_table_for_every_layer_couples_their_heads():
    torch.manual_seed(0)
    model = SharedBiasEncoder()
    model, small = _compact_matches(model, [torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (1, 9))], "export")
    heads = _groups(model, "head")
    assert len(heads) == 1 and heads[0].units == 4  # head h of both layers and row h of the table: one unit
    tensors = {m.tensor for m in heads[0].members}
    assert "rel_pos_bias.weight" in tensors and {"layers.0.q.weight", "layers.1.q.weight"} <= tensors
    assert small.rel_pos_bias.out_features == 2 and small.layers[0].q.out_features == small.layers[1].q.out_features == 12


def test_a_bias_table_computed_by_an_mlp_follows_the_heads():
    torch.manual_seed(0)
    for capture in ("symbolic_trace", "export"):
        model, small = _compact_matches(MlpBiasNet(), [torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (3, 6))], capture)
        heads = _groups(model, "head")
        assert len(heads) == 2 and all(g.units == 4 for g in heads), capture
        assert any(m.tensor == "blocks.0.cpb_mlp.2.weight" for m in heads[0].members), capture
        kept = [block.heads for block in small.blocks]
        assert sum(kept) == 4 and [b.cpb_mlp[2].out_features for b in small.blocks] == kept, capture


def test_max_over_positions_keeps_the_neurons():
    torch.manual_seed(0)
    model, small = _compact_matches(MaxPooledFfn(), [torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (1, 4))], "export")
    assert [g.units for g in _groups(model, "neuron")] == [64]
    assert small.fc1.out_features == 32


class ComplexRotaryAttention(nn.Module):
    """DeepSeek-V2's rotary embedding in complex form: ``view_as_complex`` of channel pairs times per-position phases,
    then ``view_as_real`` and a flatten back; and LeViT's ``hardswish`` (not tagged pointwise by torch) before the
    output projection."""

    def __init__(self, dim: int = 24, heads: int = 4) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-2]
        angles = torch.arange(n)[:, None] * torch.arange(1, self.head_dim // 2 + 1)[None, :] * 0.1
        phases = torch.polar(torch.ones_like(angles), angles)
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * phases).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v).transpose(1, 2).reshape(b, n, -1)
        x = x + self.o(F.hardswish(y))
        return x + self.fc2(F.hardswish(self.fc1(x)))


def test_complex_rotary_and_hardswish_keep_the_heads():
    torch.manual_seed(0)
    net = nn.Sequential(ComplexRotaryAttention(), nn.Linear(24, 3))
    model, small = _compact_matches(net, [torch.randn(2, 6, 24), torch.randn(1, 9, 24)], "export")
    assert [g.units for g in _groups(model, "head")] == [4] and [g.units for g in _groups(model, "neuron")] == [48]
    assert small[0].q.out_features == 12 and small[0].fc1.out_features == 24


class CastWeights(nn.Module):
    """DeepSeek-V2's and MiMo's router form: ``F.linear(x.float(), self.weight.float())``, a linear on a dtype copy of
    its weight (and bias)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x.float(), self.fc1.weight.float(), self.fc1.bias.float()))
        return self.out(x + self.fc2(h))


def test_a_linear_on_a_cast_of_its_weight_is_still_a_linear():
    torch.manual_seed(0)
    model, small = _compact_matches(CastWeights(), [torch.randn(2, 5, 16), torch.randn(1, 3, 16)], "export")
    assert [g.units for g in _groups(model, "neuron")] == [64] and small.fc1.out_features == 32


class CastsItsRouter(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.router, self.out = nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.router = self.router.to(torch.float32)  # already float32: changes nothing
        return self.out(self.fc2(F.gelu(self.fc1(x + self.router(x)))))


def test_a_forward_that_casts_a_submodule_to_its_own_dtype_exports():
    torch.manual_seed(0)
    model, small = _compact_matches(CastsItsRouter(), [torch.randn(2, 5, 16), torch.randn(1, 3, 16)], "export")
    assert model._ebcompile.plan.capture.startswith("export") and small.fc1.out_features == 32


class SinkAttention(nn.Module):
    """An attention sink per head (GPT-OSS, Flint): a learned logit concatenated to each head's scores, softmaxed
    with them and dropped — Flint's form, without GPT-OSS's max subtraction that happened to tie sink and head."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) * 0.5
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = F.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
        return x + self.o((probs @ v).transpose(1, 2).reshape(b, n, -1))


class SinkNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.attn = nn.Embedding(50, 16), SinkAttention()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.attn(self.emb(ids))


def test_an_attention_sink_concatenated_to_the_scores_follows_its_head():
    model, small = _compact_matches(SinkNet(), [torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (1, 9))], "export")
    heads = _groups(model, "head")
    assert len(heads) == 1 and "attn.sinks" in {m.tensor for m in heads[0].members}
    assert small.attn.sinks.numel() == small.attn.num_heads == small.attn.q.out_features // 4 < 4
