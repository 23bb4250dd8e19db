"""Units that meet, in a product, data from an op the analysis does not follow.

A short convolution as LFM2 writes it: ``B, C, x = in_proj(h).chunk(3)``, ``y = C * conv1d(B * x)``, ``out_proj(y)``.
When the convolution mixes channels (``groups=1``) it is not followed, so its output has no labels; zeroing a row of
``C`` (and the matching ``out_proj`` column) is still exact in the masked model, because the product keeps zeros
zero. But a compact model cannot cut ``C``'s channel without cutting the convolution's output channel too: the
analysis must not offer those units (before, it did, and the compact model failed: ``28 vs 27``). Checked: such a
projection gets no units, the rest of the model still does, and compact ≡ masked at two lengths. LFM2's own
convolution is depthwise (``groups=dim``): each channel is filtered on its own, so it is followed — the channels
are units, the filters and bias are cut with them ; a grouped one
keeps each group's channels together (``test_depthwise_and_grouped_convolutions_keep_their_groups_as_units``).

Also here: linears whose weights are tied across two module objects (Zamba's shared transformer block). The masks
went on one holder only, so the other computed with the unmasked weights and compaction broke the tie (a 64-wide
input met a 45-wide linear); such linears are now kept whole, with the reason in ``plan.skipped``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ebcompile


class ShortConv(nn.Module):
    def __init__(self, dim: int, groups: int = 1) -> None:
        super().__init__()
        self.in_proj, self.out_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, groups=groups, padding=2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, x = self.in_proj(h).transpose(-1, -2).chunk(3, dim=-2)
        y = c * self.conv(b * x)[..., : h.shape[1]]
        return self.out_proj(y.transpose(-1, -2))


class Net(nn.Module):
    def __init__(self, dim: int = 16, groups: int = 1) -> None:
        super().__init__()
        self.mix, self.fc1, self.fc2 = ShortConv(dim, groups), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.mix(h)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h)


def test_units_meeting_unfollowed_data_are_not_offered_and_compact_is_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    model = ebcompile.prepare(Net().eval(), x, ratio=0.5, structure="structured", scope="layer")
    plan = model._ebcompile.plan
    grouped = {m.tensor.rsplit(".", 1)[0] for g in plan.groups for m in g.members}
    assert "mix.in_proj" not in grouped and "mix.in_proj" in plan.skipped
    assert "fc1" in grouped, "the FFN's neurons are still found"
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model, 0.5))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small.fc1.out_features < 64
    with torch.no_grad():
        for t in (7, 11):
            y = torch.randn(3, t, 16, generator=torch.Generator().manual_seed(t))
            torch.testing.assert_close(small(y), model(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups, units, kept", [(16, 16, (8, 8, 8, (8, 1, 3))), (4, 4, (2, 8, 8, (8, 4, 3)))],
                         ids=["depthwise", "grouped"])
def test_depthwise_and_grouped_convolutions_keep_their_groups_as_units(groups, units, kept, tmp_path):
    """Depthwise: one channel of B, C and x and its filter per unit. groups=4 over 16 channels: each group's 4
    channels are one unit (ZAYA convolves each head's q|k channels as one group); compact removes whole groups,
    keeps the per-group width and lowers the group count (also when loaded)."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    model = ebcompile.prepare(Net(groups=groups).eval(), x, ratio=0.5, structure="structured", scope="layer")
    group = next(g for g in model._ebcompile.plan.groups if any(m.tensor == "mix.in_proj.weight" for m in g.members))
    assert {"mix.conv.weight", "mix.conv.bias", "mix.out_proj.weight"} <= {m.tensor for m in group.members}
    assert group.units == units
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model, 0.5))
    small = ebcompile.compact(model, round_to=None).eval()
    conv = small.mix.conv
    assert (conv.groups, conv.in_channels, conv.out_channels, tuple(conv.weight.shape)) == kept
    assert small.mix.in_proj.out_features == 24
    ebcompile.save(small, tmp_path / "s")
    back = ebcompile.load(tmp_path / "s", model=Net(groups=groups))
    assert back.mix.conv.groups == kept[0]
    with torch.no_grad():
        for t in (7, 11):
            y = torch.randn(3, t, 16, generator=torch.Generator().manual_seed(t))
            torch.testing.assert_close(small(y), model(y), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(back(y), small(y), rtol=1e-6, atol=1e-7)
    report = ebcompile.export_onnx(small, tmp_path / "s.onnx", x)
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4


class TiedBlocks(nn.Module):
    """Two FFN module objects whose linears share their weights (Zamba's shared transformer block, tied per layer)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.b1, self.b2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.b1.weight, self.b2.weight = self.a1.weight, self.a2.weight
        self.c1, self.c2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for fc1, fc2 in ((self.a1, self.a2), (self.b1, self.b2), (self.c1, self.c2)):
            h = h + fc2(torch.relu(fc1(h)))
        return self.head(h)


def test_weights_tied_across_modules_are_kept_whole_and_stay_tied():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = ebcompile.prepare(TiedBlocks().eval(), x, ratio=0.5, structure="structured", scope="layer")
    skipped = model._ebcompile.plan.skipped
    assert all("tied across modules" in skipped[n] for n in ("a1", "a2", "b1", "b2") if n in skipped)
    assert {"a1", "b1"} & set(skipped), "a tied linear was masked"
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model, 0.5))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small.c1.out_features < 64 and small.a1.out_features == 64
    assert small.a1.weight is small.b1.weight, "the tie broke"
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


class MaskedFillAttention(nn.Module):
    """XLM's attention: a padding mask ``expand_as(scores)`` then ``masked_fill``: the mask takes the scores' shape,
    so it shrinks with the heads and must not stop them being cut (unlike a convolution's output)."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.num_heads = heads

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2)
        mask = (pad == 0).view(b, 1, 1, t).expand_as(scores)
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, t, -1))


class MaskedNet(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.attn, self.head = MaskedFillAttention(dim), nn.Linear(dim, 3)
        self.conv = nn.Conv1d(dim, dim, kernel_size=1)  # an op the analysis does not follow, away from the heads

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(x, pad)
        return self.head(h + self.conv(h.transpose(1, 2)).transpose(1, 2))


def test_a_mask_shaped_like_the_scores_does_not_stop_heads():
    torch.manual_seed(0)
    x, pad = torch.randn(2, 6, 16), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    model = ebcompile.prepare(MaskedNet().eval(), (x, pad), ratio=0.5, structure="structured", scope="layer")
    kinds = {g.kind for g in model._ebcompile.plan.groups}
    assert "head" in kinds, model._ebcompile.plan.skipped
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model, 0.5))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small.attn.q.out_features < 16
    with torch.no_grad():
        torch.testing.assert_close(small(x, pad), model(x, pad), rtol=1e-5, atol=1e-6)


class Scan(nn.Module):
    """A running sum over time between two linears (a Mamba-2 chunk's ``cumsum``), or over the features."""

    def __init__(self, dim: int = 16, width: int = 24, over_features: bool = False) -> None:
        super().__init__()
        self.up, self.down, self.over_features = nn.Linear(dim, width), nn.Linear(width, dim), over_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        h = h.cumsum(dim=-1) if self.over_features else h.cumsum(dim=1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)
        return x + self.down(h)


@pytest.mark.parametrize("over_features", [False, True], ids=["over-time", "over-features"])
def test_a_scan_over_time_passes_units_through_and_one_over_features_joins_them(over_features):
    torch.manual_seed(0)
    m = nn.Sequential(Scan(over_features=over_features), nn.Linear(16, 2)).eval()
    x = torch.randn(2, 7, 16)
    if over_features:  # every position of the scan reads all features before it: no unit can go alone
        with pytest.raises(ebcompile.errors.NoPrunableLayerError, match="0.up: no heads or neurons: .* by cumsum"):
            ebcompile.prepare(m, x, ratio=0.3, structure="structured", importance="magnitude")
        return
    ebcompile.prepare(m, x, ratio=0.3, structure="structured", importance="magnitude")
    groups = [g for g in m._ebcompile.plan.groups if g.kind == "neuron"]
    assert [g.units for g in groups] == [24]
    ebcompile.apply_ticket(m, ebcompile.draw_ticket(m))
    small = ebcompile.compact(m, round_to=None)
    assert small[0].up.out_features < 24
    with torch.no_grad():
        for t in (7, 3):
            x = torch.randn(2, t, 16)
            torch.testing.assert_close(small(x), m(x))


class OuterGate(nn.Module):
    """An FFN whose neurons are gated by ``W @ x`` (a weight on the left of a matmul, rows of its own) and mixed with
    a small state in an outer product (``h[..., None] * s[..., None, :]``, as Mamba's ``dt * B``)."""

    def __init__(self, dim: int = 16, width: int = 24, state: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2, self.state = nn.Linear(dim, width), nn.Linear(width, dim), nn.Linear(dim, state)
        self.gate = nn.Parameter(torch.randn(width, dim) / dim ** 0.5)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid((self.gate @ x.transpose(-1, -2)).transpose(-1, -2))
        h = torch.relu(self.fc1(x)) * g
        h = (h[..., None] * torch.tanh(self.state(x))[..., None, :]).sum(-1)
        return self.head(x + self.fc2(h))


def test_a_weight_first_matmul_follows_the_units_and_an_outer_product_keeps_one_side():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = ebcompile.prepare(OuterGate().eval(), x, ratio=0.5, structure="structured", importance="magnitude")
    plan = model._ebcompile.plan
    [group] = [g for g in plan.groups if g.name == "fc1"]
    assert group.units == 24 and {"gate", "fc1.weight", "fc2.weight"} <= {m.tensor for m in group.members}
    assert "outer product" in plan.skipped["state"]
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model, 0.5))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small.fc1.out_features == small.gate.shape[0] == 12 and small.state.out_features == 4
    with torch.no_grad():
        for t in (5, 9):
            y = torch.randn(3, t, 16, generator=torch.Generator().manual_seed(t))
            torch.testing.assert_close(small(y), model(y), rtol=1e-5, atol=1e-6)
