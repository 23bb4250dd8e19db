"""Hand-written attention whose forward takes its reshape sizes from the residual width (``transforms.reshapes``).

Each variant is written the way tutorials and research code write it; none reads an attribute that the count
tables rewrite correctly, so only the traced reshape rewrite makes the compact model run. Checked: compact ==
masked on the example and on other batch sizes and sequence lengths (batch and sequence stay dynamic), in
train mode with gradients, after ``copy.deepcopy``, and after ``save`` -> ``load`` on a freshly built model.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ebcompile

TOL = 1e-5


class ChunkMatmul(nn.Module):
    """``chunk`` of a fused projection, ``reshape`` to ``C // heads``, explicit softmax(q k^T) v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.to_qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.h = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, self.h, C // self.h).permute(0, 2, 1, 3) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.h))
        y = att.softmax(dim=-1) @ v
        return self.proj(y.permute(0, 2, 1, 3).reshape(B, T, C))


class SliceSDPA(nn.Module):
    """Slices ``qkv[..., :C]`` of a fused projection, ``view(..., -1)`` heads, ``flatten`` back."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.n = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        q, k, v = (t.view(B, T, self.n, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(2))


class SeparateProjections(nn.Module):
    """Separate q/k/v, head width from ``x.size(-1)``, dropout on the probabilities (trained differently)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim) for _ in range(4))
        self.heads_ = heads
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.size(0), x.size(1)
        d = x.size(-1) // self.heads_
        q = self.wq(x).view(B, T, self.heads_, d).transpose(1, 2)
        k = self.wk(x).view(B, T, self.heads_, d).transpose(1, 2)
        v = self.wv(x).view(B, T, self.heads_, d).transpose(1, 2)
        p = torch.softmax(torch.matmul(q, k.transpose(2, 3)) / d ** 0.5, dim=-1)
        if self.training:
            p = self.drop(p)
        y = torch.matmul(p, v).transpose(1, 2).contiguous().view(B, T, x.size(-1))
        return self.wo(y)


class Net(nn.Module):
    def __init__(self, block: type[nn.Module], dim: int, heads: int, layers: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(12, dim)
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(layers)])
        self.blocks = nn.ModuleList([block(dim, heads) for _ in range(layers)])
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for norm, attn in zip(self.norms, self.blocks):
            h = h + attn(norm(h))
        return self.head(h)


def build(block: type[nn.Module], dim: int, heads: int) -> nn.Module:
    torch.manual_seed(0)
    model = Net(block, dim, heads).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return model


def batch(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 12, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


SHAPES = [(32, 4), (24, 6), (32, 2)]  # (width, heads)


@pytest.mark.parametrize("dim,heads", SHAPES)
@pytest.mark.parametrize("block", [ChunkMatmul, SliceSDPA, SeparateProjections])
def test_compact_attention_with_sizes_from_the_residual_width(block, dim, heads, tmp_path):
    x = batch(2, 7)
    model = ebcompile.prepare(build(block, dim, heads), x, ratio=0.5, structure="structured", scope="layer")
    assert [g.module for g in model._ebcompile.plan.groups if g.kind == "head"] == ["blocks.0", "blocks.1"]
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()  # exactly half the heads (rounding to 8 would keep 4 of 6 at width 24)
    kept = [small.blocks[i].__dict__.get("_ebcompile_reshapes") for i in range(2)]
    assert all(kept), "the forward of every pruned attention block is rewritten"
    width = dim - dim // heads * (heads // 2)
    assert all(p.shape[0] == (3 * width if p.shape[0] > dim else width) for n, p in small.named_parameters()
               if n.startswith("blocks.") and n.endswith("weight") and not n.endswith(("proj.weight", "out.weight", "wo.weight")))
    with torch.no_grad():
        for b, t in [(2, 7), (1, 3), (5, 11)]:  # batch and sequence length stay dynamic
            other = batch(b, t, seed=b + t)
            assert rel_err(small(other), model(other)) <= TOL
        assert rel_err(copy.deepcopy(small)(x), model(x)) <= TOL
    small.train()
    small(batch(3, 5)).square().mean().backward()
    assert all(p.grad is not None for p in small.parameters())
    small.eval()
    ebcompile.save(small, tmp_path)
    loaded = ebcompile.load(tmp_path, model=build(block, dim, heads))
    with torch.no_grad():
        assert rel_err(loaded(batch(4, 9)), small(batch(4, 9))) <= TOL


def test_load_refuses_a_rewrite_that_does_not_fit_the_model(tmp_path):
    """The recorded rewrite names nodes of the saved code; a model of other code gets a typed error."""
    from ebcompile.errors import CheckpointError

    x = batch(2, 7)
    model = ebcompile.prepare(build(SliceSDPA, 32, 4), x, ratio=0.5, structure="structured", scope="layer")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    ebcompile.save(ebcompile.compact(model), tmp_path)
    with pytest.raises(CheckpointError, match="Fix:"):
        ebcompile.load(tmp_path, model=build(ChunkMatmul, 32, 4))


def test_holding_units_whole_again_is_no_retry():
    """A module that still fails with its units already held whole is not held again: compact stops retrying and
    its self-check reports the failure (once a RecursionError in Decision Transformer)."""
    import warnings

    from ebcompile.plan import GroupSet, Member, Plan
    from ebcompile.transforms.reshapes import hold_whole

    group = GroupSet("head", "attn", 2, (Member("attn.q.weight", 0, 0, 4), Member("attn.o.weight", 1, 0, 4)), module="attn")
    plan = Plan(groups=[group])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert hold_whole(plan, {"attn": "RuntimeError: shape"}) == ["attn"]
        assert set(plan.skipped) == {"attn.q", "attn.o"}
        assert hold_whole(plan, {"attn": "RuntimeError: shape"}) == []


def test_a_width_attribute_is_rewritten_where_the_module_also_returns_per_head_probabilities(tmp_path):
    """XGLM's attention reshapes its output with ``self.embed_dim`` (heads x head_dim here), does not trace, and returns
    its attention probabilities beside the output: the compact module returns fewer heads there, which must not stop
    the width rewrite (before, every cut layer was held whole)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.XGLMConfig(vocab_size=99, d_model=32, num_layers=2, attention_heads=4, ffn_dim=37)
    model = transformers.XGLMModel(config).eval()
    ids = torch.randint(0, 99, (2, 7))
    ebcompile.prepare(model, {"input_ids": ids}, ratio=0.4, structure="structured", importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None)
    assert not [k for k, v in model._ebcompile.plan.skipped.items() if v.startswith("kept whole")]
    heads = [layer.self_attn.num_heads for layer in small.layers]
    assert sum(heads) < 8 and [layer.self_attn.embed_dim for layer in small.layers] == [h * 8 for h in heads]
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    ebcompile.save(small, tmp_path / "s")
    back = ebcompile.load(tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).last_hidden_state, small(input_ids=ids).last_hidden_state)


class Inline(nn.Module):
    """Attention written in the model's own forward (no attention submodule), sizes from the residual width."""

    def __init__(self, d: int = 32, h: int = 4) -> None:
        super().__init__()
        self.h, self.emb = h, nn.Embedding(50, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2, self.cls = nn.Linear(d, 64), nn.Linear(64, d), nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        B, T, C = x.shape
        q, k, v = (m(x).view(B, T, self.h, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = (q @ k.transpose(-1, -2) / math.sqrt(C // self.h)).softmax(-1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(B, T, C))
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.cls(x.mean(1))


def test_attention_in_the_root_forward_is_rewritten_there(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 8))
    model = ebcompile.prepare(Inline(), ids, ratio=0.5, structure="structured", importance="magnitude", scope="layer")
    assert [g.module for g in model._ebcompile.plan.groups if g.kind == "head"] == [""]  # the root module
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no module held whole
        small = ebcompile.compact(model, round_to=None).eval()
    assert small.q.out_features == 16 and small.fc1.out_features == 32
    with torch.no_grad():
        for b, t in [(3, 12), (1, 5)]:
            other = torch.randint(0, 50, (b, t), generator=torch.Generator().manual_seed(t))
            torch.testing.assert_close(small(other), model(other))
    ebcompile.save(small, tmp_path)
    torch.manual_seed(0)
    loaded = ebcompile.load(tmp_path, model=Inline()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), small(ids))
    ebcompile.export_onnx(small, tmp_path / "m.onnx", ids)
