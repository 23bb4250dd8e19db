"""compact: structured tickets lose their pruned heads/neurons, and the compact model computes what the masked
one computes; the compact Swin attention modules; what compact refuses. Optimizer carry-over, ``round_to`` and
sparse storage are in tests/test_compact_options.py.

Property tests draw tiny ViT / Swin v1 / Swin v2 / MLP configurations and random unit masks (layers left
with one head included); the builders, tickets and checks are in tests/compact_cases.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

import ebcompile
from ebcompile.errors import ConfigError, EbcompileError, NoTicketError, NotPreparedError
from ebcompile.modules import CompactMultiheadAttention, CompactShiftedWindowAttention, CompactShiftedWindowAttentionV2
from ebcompile.transforms.shrink import compact

from compact_cases import (
    PROPS,
    SPARSE_WARNINGS,
    assert_no_masks,
    assert_same_function,
    build,
    check_structured,
    example,
    fresh,
    half_pruned_mlp,
    keep_vectors,
    mlp_cfgs,
    one_thread,  # noqa: F401 - an autouse fixture: one intra-op thread for this module
    plain_params,
    structured_ticket,
    swin_cfgs,
    unstructured_ticket,
    vit_cfgs,
)

pytestmark = SPARSE_WARNINGS


# -- structured: property tests --------------------------------------------------------------------------


@settings(max_examples=40, **PROPS)
@given(cfg=vit_cfgs, seed=st.integers(0, 2**16), batches=st.lists(st.integers(1, 3), min_size=1, max_size=2), data=st.data())
def test_vit_compact_equals_masked(cfg, seed, batches, data):
    model = fresh("vit", cfg, "structured", seed)
    units = keep_vectors(data, model)
    ebcompile.apply_ticket(model, structured_ticket(model, units))
    check_structured(model, units, [example("vit", cfg, b, seed=seed + i) for i, b in enumerate(batches)])


# token grids 4x4, 6x6 (padded to 8), 8x8 and 6x8: no shift, shift with padding, shift without padding
swin_sizes = st.sampled_from([(8, 8), (12, 12), (16, 16), (12, 16)])


@pytest.mark.parametrize("kind", ["swin1", "swin2"])
@settings(max_examples=20, **PROPS)  # each example builds, masks, compacts and runs two Swin models
@given(cfg=swin_cfgs(), seed=st.integers(0, 2**16), size=swin_sizes, batch=st.integers(1, 3), data=st.data())
def test_swin_compact_equals_masked(kind, cfg, seed, size, batch, data):
    model = fresh(kind, cfg, "structured", seed)
    units = keep_vectors(data, model)
    ebcompile.apply_ticket(model, structured_ticket(model, units))
    check_structured(model, units, [example(kind, cfg, batch, size, seed), example(kind, cfg, 1, (16, 12), seed + 1)])


@settings(max_examples=50, **PROPS)
@given(cfg=mlp_cfgs, seed=st.integers(0, 2**16), batch=st.integers(1, 4), data=st.data())
def test_mlp_compact_equals_masked(cfg, seed, batch, data):
    model = fresh("mlp", cfg, "structured", seed)
    units = keep_vectors(data, model)
    ebcompile.apply_ticket(model, structured_ticket(model, units))
    small = compact(model, round_to=None)  # exactly the ticket's neurons
    assert_no_masks(small)
    assert_same_function(model, small, [example("mlp", cfg, batch, seed=seed), example("mlp", cfg, 1, seed=seed + 1)])
    # every hidden width between two masked linears is a neuron group; the output layer is never masked
    widths = list(cfg[0])
    for g in model._ebcompile.plan.groups:
        widths[int(g.name) // 2 + 1] = int(units[f"neuron:{g.name}"].sum())
    bias = cfg[2]
    assert plain_params(small) == sum(a * b + (b if bias else 0) for a, b in zip(widths[:-1], widths[1:]))
    assert [m.out_features for m in small if isinstance(m, nn.Linear)] == widths[1:]


# -- the Swin modules on their own -----------------------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("shift", [0, 2])
def test_compact_swin_attention_matches_torchvision(v2, shift):
    torch.manual_seed(0)
    if v2:
        tv_cls, cls = ShiftedWindowAttentionV2, CompactShiftedWindowAttentionV2
    else:
        tv_cls, cls = ShiftedWindowAttention, CompactShiftedWindowAttention
    tv = tv_cls(12, [4, 4], [shift, shift], 3).eval()
    with torch.no_grad():
        for p in tv.parameters():
            p.normal_(0, 0.3)  # the key bias too: V2 must ignore it
    x = torch.randn(2, 6, 7, 12)
    with torch.no_grad():
        ref = tv(x)
        built = cls(12, [4, 4], [shift, shift], 3).eval()
        built.load_state_dict(tv.state_dict())
        assert torch.equal(built(x), ref)
        taken = cls.from_module(copy.deepcopy(tv))
        assert torch.equal(taken(x), ref)
    assert set(built.state_dict()) == set(tv.state_dict())
    wide = cls(12, [4, 4], [shift, shift], num_heads=5, head_dim=4)  # 5 * 4 != 12
    assert wide(x).shape == x.shape
    assert torch.fx.symbolic_trace(built)(x).shape == x.shape


# -- the usual pipeline, and what compact refuses --------------------------------------------------------


def test_earlybird_ticket_compacts(tiny):
    _, model, x = tiny
    model = ebcompile.prepare(model, x, structure="structured", ratio=0.5)
    eb = ebcompile.EarlyBird(model, window=1)
    eb.step()
    eb.step()
    ebcompile.apply_ticket(model, eb.ticket)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = compact(model)
    assert_no_masks(small)
    assert plain_params(small) < plain_params(model)
    assert_same_function(model, small, [x, x[:1]])
    after = model.state_dict()  # the masked model is left as it was
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(parametrize.is_parametrized(m) for m in model.modules())


def test_compact_without_ticket_raises(mlp):
    with pytest.raises(NotPreparedError, match="prepare"):
        compact(mlp)
    model = ebcompile.prepare(mlp, torch.randn(2, 8), structure="structured", ratio=0.5)
    with pytest.raises(NoTicketError, match="apply_ticket") as err:
        compact(model)
    assert isinstance(err.value, EbcompileError) and isinstance(err.value, NotPreparedError)


def test_compact_rejects_bad_options(mlp):
    x = torch.randn(2, 8)
    model = half_pruned_mlp(mlp, x)
    with pytest.raises(ConfigError, match="sparse"):
        compact(model, sparse=True)
    for bad in (0, -8, 2.5, "8", True):
        with pytest.raises(ConfigError, match="round_to"):
            compact(model, round_to=bad)
    other = ebcompile.prepare(build("mlp", ((8, 16, 16, 4), "relu", True)), x, ratio=0.5)
    ebcompile.apply_ticket(other, unstructured_ticket(other, 0.5, 0))
    with pytest.raises(ConfigError, match="round_to"):
        compact(other, round_to=8)


def test_keeping_every_unit_changes_nothing(vit):
    model = ebcompile.prepare(vit, torch.randn(1, 3, 16, 16), structure="structured", ratio=0.5)
    units = {f"{g.kind}:{g.name}": torch.ones(g.units, dtype=torch.bool) for g in model._ebcompile.plan.groups}
    ebcompile.apply_ticket(model, structured_ticket(model, units))
    small = compact(model)
    assert plain_params(small) == plain_params(model)
    assert sum(isinstance(m, nn.MultiheadAttention) for m in small.modules()) == 2
    assert_same_function(model, small, [torch.randn(2, 3, 16, 16)])


def test_a_group_with_no_kept_unit_keeps_one_zero_unit(vit):
    """A hand-made ticket may prune every unit of a set; one all-zero unit stays (same function)."""
    model = ebcompile.prepare(vit, torch.randn(1, 3, 16, 16), structure="structured", ratio=0.5)
    units = {f"{g.kind}:{g.name}": torch.zeros(g.units, dtype=torch.bool) for g in model._ebcompile.plan.groups}
    ebcompile.apply_ticket(model, structured_ticket(model, units))
    small = compact(model, round_to=None)
    assert [m.num_heads for m in small.modules() if isinstance(m, CompactMultiheadAttention)] == [1, 1]
    assert [small.get_submodule(g.name).out_features for g in model._ebcompile.plan.groups if g.kind == "neuron"] == [1, 1]
    assert_same_function(model, small, [torch.randn(2, 3, 16, 16)])
