"""Attention patterns from the Hugging Face zoo that compaction used to fail on, each in a small hand-written module.

- ``WeightNormConv``: a ``weight_norm`` parametrization on a conv the analysis never masks (HuBERT / SEW's
  positional conv) is another library's: compaction leaves it in place.
- ``ComputedShape``: the merge of the heads reshapes to ``x.size()[:-2] + (self.embed_dim,)`` (one computed shape
  argument), the forward takes ``**kwargs`` and also returns the per-head attention probabilities (BLIP).
- ``Untraceable``: an ``if`` on a tensor size stops ``torch.fx`` and the merge reshapes to ``self.embed_dim`` (FSMT,
  CLVP): no rewrite reaches it, so compaction keeps its heads whole (``plan.skipped`` says why) and the model
  compacts exactly instead of failing.

Each is checked: compact == masked on the example and on another batch and sequence length, and after save -> load.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ebcompile

TOL = 1e-5


class ComputedShape(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = dim, heads
        self.qkv, self.projection = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, tgt_len, embed_dim = h.size()
        qkv = self.qkv(h).reshape(bsz, tgt_len, 3, self.num_heads, embed_dim // self.num_heads).permute(2, 0, 3, 1, 4)
        probs = torch.matmul(qkv[0], qkv[1].transpose(-1, -2)).softmax(-1)
        out = torch.matmul(probs, qkv[2]).permute(0, 2, 1, 3)
        return self.projection(out.reshape(out.size()[:-2] + (self.embed_dim,))), probs


class WidthAttribute(nn.Module):
    """Untraceable (control flow on a size), and it merges its heads back with ``self.embed_dim``: a width under a
    name that also means the residual width elsewhere (GPTBigCode splits its fused q/k/v with it)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = dim, heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def heads(self, h: torch.Tensor) -> torch.Tensor:
        bsz, tgt_len, _ = h.size()
        q, k, v = (p(h).view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1) @ v
        if out.size(1) != self.num_heads:  # control flow on a size: symbolic_trace cannot follow it
            raise ValueError("wrong head count")
        return out.transpose(1, 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.o(self.heads(h).reshape(*h.shape[:2], self.embed_dim))


class Untraceable(WidthAttribute):
    """As WidthAttribute, but the merged width is the input's, read as a Python int: nothing rewrites it."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.o(self.heads(h).reshape(*h.shape[:-1], int(h.shape[-1])))


class WeightNormConv(nn.Module):
    """A self-attention block after a weight-normed depthwise conv over the sequence."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        conv = nn.Conv1d(dim, dim, 3, padding=1, groups=dim)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.attn = ComputedShape(dim, heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.attn(h)[0]


class Layer(nn.Module):
    """Pre-norm residual layer; the attention is called with a keyword its forward only takes as ``**kwargs``."""

    def __init__(self, block: type[nn.Module], dim: int, heads: int) -> None:
        super().__init__()
        self.norm, self.block = nn.LayerNorm(dim), block(dim, heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.block(self.norm(h), **({"output_attentions": False} if isinstance(self.block, ComputedShape) else {}))
        return h + (out[0] if isinstance(out, tuple) else out)


def net(block: type[nn.Module], dim: int = 32, heads: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, dim), Layer(block, dim, heads), Layer(block, dim, heads), nn.Linear(dim, 5)).eval()


def batch(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 12, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def compact_and_check(block: type[nn.Module], tmp_path) -> tuple[nn.Module, nn.Module]:
    x = batch(2, 7)
    model = ebcompile.prepare(net(block), x, ratio=0.5, structure="structured", scope="layer")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    with torch.no_grad():
        for b, t in [(2, 7), (3, 5)]:
            assert rel_err(small(batch(b, t, b)), model(batch(b, t, b))) <= TOL
    ebcompile.save(small, tmp_path)
    loaded = ebcompile.load(tmp_path, model=net(block))
    with torch.no_grad():
        assert rel_err(loaded(batch(4, 9)), small(batch(4, 9))) <= TOL
    return model, small


def test_a_foreign_parametrization_on_an_unpruned_conv_stays(tmp_path):
    model, small = compact_and_check(WeightNormConv, tmp_path)
    assert any(g.kind == "head" for g in model._ebcompile.plan.groups)
    assert nn.utils.parametrize.is_parametrized(small[1].block.conv, "weight")  # weight_norm still there
    assert small[1].block.attn.qkv.out_features < 3 * 32  # and the heads next to it were cut


def test_heads_merged_by_a_computed_shape_with_per_head_outputs(tmp_path):
    model, small = compact_and_check(ComputedShape, tmp_path)
    assert [g.module for g in model._ebcompile.plan.groups if g.kind == "head"] == ["1.block", "2.block"]
    assert all(small[i].block.__dict__.get("_ebcompile_reshapes") for i in (1, 2))
    assert small[1].block.qkv.out_features == 3 * 16


def test_a_width_attribute_is_rewritten_where_the_module_needs_it_and_saved(tmp_path):
    """``embed_dim`` is no count-table name (it is the residual width in most modules); it is set to the compact
    width only because this module fails without it and computes the masked output with it; load sets it again."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, small = compact_and_check(WidthAttribute, tmp_path)  # save / load and the outputs checked there
    assert all(small[i].block.q.out_features == 16 and small[i].block.embed_dim == 16 for i in (1, 2))
    assert ebcompile.load(tmp_path, model=net(WidthAttribute))[1].block.embed_dim == 16


def test_heads_no_rewrite_reaches_are_kept_whole(tmp_path):
    with pytest.warns(UserWarning, match=r"keeps the units \(heads, neurons\) of 1.block, 2.block whole"):
        model, small = compact_and_check(Untraceable, tmp_path)
    skipped = model._ebcompile.plan.skipped
    assert all(skipped[f"{i}.block.{p}"].startswith("kept whole at compact: ") for i in (1, 2) for p in "qkvo")
    assert "RuntimeError: shape" in skipped["1.block.q"]
    assert all(small[i].block.q.out_features == 32 and small[i].block.num_heads == 4 for i in (1, 2))
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))  # compacts at once now, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ebcompile.compact(model, round_to=None).eval()
    with torch.no_grad():
        assert rel_err(again(batch(2, 7)), model(batch(2, 7))) <= TOL
