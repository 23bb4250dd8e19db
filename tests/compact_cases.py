"""Shared by tests/test_compact.py and tests/test_compact_options.py: tiny ViT / Swin v1 / Swin v2 / MLP
builders, hypothesis strategies over their configurations, random structured and unstructured tickets, and the
checks that a compact model computes what the masked one computes with the parameter count it should have.

Prepared models are cached per configuration and deep-copied per example, with fresh random weights, to keep
each example in the tens of milliseconds.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize
from torchvision.models import VisionTransformer
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    ShiftedWindowAttentionV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)

import ebcompile
from ebcompile.modules import (
    CompactMultiheadAttention,
    CompactShiftedWindowAttention,
    CompactShiftedWindowAttentionV2,
)
from ebcompile.search.importance import Masks, expand_units
from ebcompile.search.ticket import Ticket, signature_of
from ebcompile.transforms.masks import WeightMask
from ebcompile.transforms.shrink import compact

SPARSE_WARNINGS = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state",
                                             "ignore:Sparse invariant checks")

TOL = 1e-5
PROPS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- models ----------------------------------------------------------------------------------------------


def build(kind: str, cfg: tuple) -> nn.Module:
    torch.manual_seed(0)
    if kind == "vit":
        layers, heads, head_dim, mlp_dim = cfg
        return VisionTransformer(image_size=8, patch_size=4, num_layers=layers, num_heads=heads,
                                 hidden_dim=heads * head_dim, mlp_dim=mlp_dim, num_classes=3).eval()
    if kind in ("swin1", "swin2"):
        heads, head_dim = cfg
        v2 = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if kind == "swin2" else {}
        return SwinTransformer(patch_size=[2, 2], embed_dim=heads[0] * head_dim, depths=[2] * len(heads),
                               num_heads=list(heads), window_size=[4, 4], mlp_ratio=1.5, stochastic_depth_prob=0.0,
                               num_classes=3, **v2).eval()
    widths, act, bias = cfg
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            mods.append(acts[act]())
    return nn.Sequential(*mods).eval()


def example(kind: str, cfg: tuple, batch: int = 2, size: tuple[int, int] = (16, 16), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return torch.randn(batch, 3, 8, 8, generator=g)
    if kind in ("swin1", "swin2"):
        return torch.randn(batch, 3, *size, generator=g)
    return torch.randn(batch, cfg[0][0], generator=g)


@functools.cache
def _prepared(kind: str, cfg: tuple, structure: str) -> nn.Module:
    return ebcompile.prepare(build(kind, cfg), example(kind, cfg), structure=structure, ratio=0.5)


def fresh(kind: str, cfg: tuple, structure: str, seed: int) -> nn.Module:
    """A prepared model of this configuration with new random weights (all of them: biases, position
    tables, logit scales, norms)."""
    model = copy.deepcopy(_prepared(kind, cfg, structure))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 1.0 / math.sqrt(p.shape[-1]) if p.dim() >= 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def plain_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- tickets ---------------------------------------------------------------------------------------------


def keep_vectors(data, model: nn.Module) -> dict[str, torch.Tensor]:
    """A random keep-vector per group set: random bits, exactly one unit, or everything."""
    out = {}
    for g in model._ebcompile.plan.groups:
        mode = data.draw(st.sampled_from(["bits", "bits", "one", "all"]))
        if mode == "all":
            keep = torch.ones(g.units, dtype=torch.bool)
        elif mode == "one":
            keep = torch.zeros(g.units, dtype=torch.bool)
            keep[data.draw(st.integers(0, g.units - 1))] = True
        else:
            keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=g.units, max_size=g.units)))
            if not keep.any():
                keep[data.draw(st.integers(0, g.units - 1))] = True
        out[f"{g.kind}:{g.name}"] = keep
    return out


def structured_ticket(model: nn.Module, units: dict[str, torch.Tensor]) -> Ticket:
    cfg = model._ebcompile
    signature = signature_of(model)
    masks = Masks("structured")
    masks.tensors = {name: torch.ones(shape, dtype=torch.bool) for name, shape in signature.items()}
    for g in cfg.plan.groups:
        key = f"{g.kind}:{g.name}"
        masks.units[key] = units[key]
        masks.kinds[key] = g.kind
        expand_units(model, g, units[key], masks.tensors)
    return Ticket(masks, cfg.ratio, cfg.scope, signature)


def unstructured_ticket(model: nn.Module, density: float, seed: int) -> Ticket:
    cfg = model._ebcompile
    g = torch.Generator().manual_seed(seed)
    masks = Masks("unstructured")
    for name, shape in signature_of(model).items():
        masks.tensors[name] = torch.rand(shape, generator=g) < density
    return Ticket(masks, cfg.ratio, cfg.scope, signature_of(model))


def half_pruned_mlp(mlp: nn.Module, x: torch.Tensor) -> nn.Module:
    """``mlp`` prepared with a structured ticket keeping every other neuron."""
    model = ebcompile.prepare(mlp, x, structure="structured", ratio=0.5)
    units = {f"{g.kind}:{g.name}": torch.arange(g.units) % 2 == 0 for g in model._ebcompile.plan.groups}
    ebcompile.apply_ticket(model, structured_ticket(model, units))
    return model


# -- checks ----------------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    # relative to the output's magnitude, floored at 1e-2: an output that cancels to ~1e-5 (seen with
    # 1-wide GELU layers) otherwise turns float32 summation-order rounding (~1e-9) into a "relative" 4e-5
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-2))


def assert_same_function(masked: nn.Module, small: nn.Module, inputs: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in inputs:
            ref, out = masked(x), small(x)
            assert out.shape == ref.shape
            assert rel_err(out, ref) <= TOL, rel_err(out, ref)


def assert_no_masks(model: nn.Module) -> None:
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any(isinstance(m, WeightMask) for m in model.modules())
    assert not any(k.endswith("_mask") or "parametrizations" in k for k in model.state_dict())
    assert getattr(model, "_ebcompile", None) is None


def removed_per_unit(model: nn.Module, group) -> int:
    """Parameters one pruned unit takes away, read from the original modules (not from the plan)."""
    if group.kind == "neuron":
        fc1 = model.get_submodule(group.name)
        parent, _, idx = group.name.rpartition(".")
        fc2 = [m for m in model.get_submodule(parent).children() if isinstance(m, nn.Linear)][1]
        assert fc2 is not fc1 and fc1 is model.get_submodule(parent)[int(idx)]
        return fc1.in_features + (fc1.bias is not None) + fc2.out_features
    mod = model.get_submodule(group.module)
    if isinstance(mod, nn.MultiheadAttention):
        e = mod.embed_dim
        hd = e // mod.num_heads
        return 4 * e * hd + (3 * hd if mod.in_proj_bias is not None else 0)
    c = mod.proj.out_features
    hd = c // mod.num_heads
    n = 4 * c * hd + (3 * hd if mod.qkv.bias is not None else 0)
    if isinstance(mod, ShiftedWindowAttentionV2):
        return n + 1 + mod.cpb_mlp[-1].in_features  # logit scale + a cpb_mlp output row
    return n + mod.relative_position_bias_table.shape[0]  # a bias-table column


def check_heads(masked: nn.Module, small: nn.Module, units: dict[str, torch.Tensor]) -> None:
    for g in masked._ebcompile.plan.groups:
        if g.kind != "head":
            continue
        kept = int(units[f"head:{g.name}"].sum())
        orig, new = masked.get_submodule(g.module), small.get_submodule(g.module)
        assert new.num_heads == kept
        if isinstance(orig, nn.MultiheadAttention):
            hd = orig.embed_dim // orig.num_heads
            assert isinstance(new, CompactMultiheadAttention if kept < g.units else nn.MultiheadAttention)
            if kept < g.units:
                assert new.head_dim == hd and new.in_proj.out_features == 3 * kept * hd
        else:
            hd = orig.proj.out_features // orig.num_heads
            v2 = isinstance(orig, ShiftedWindowAttentionV2)
            if kept < g.units:
                assert type(new) is (CompactShiftedWindowAttentionV2 if v2 else CompactShiftedWindowAttention)
                assert new.head_dim == hd and new.qkv.out_features == 3 * kept * hd and new.proj.in_features == kept * hd
                assert new.window_size == orig.window_size and new.shift_size == orig.shift_size
                if v2:
                    assert new.logit_scale.shape[0] == kept and new.cpb_mlp[-1].out_features == kept
                else:
                    assert new.relative_position_bias_table.shape[1] == kept
            else:
                assert type(new) is type(orig)


def check_structured(masked: nn.Module, units: dict[str, torch.Tensor], inputs: list[torch.Tensor]) -> nn.Module:
    small = compact(masked, round_to=None)  # exactly the ticket's units (rounding: tests/test_compact_options.py)
    assert_no_masks(small)
    assert_same_function(masked, small, inputs)
    check_heads(masked, small, units)
    expected = plain_params(masked) - sum(
        (g.units - int(units[f"{g.kind}:{g.name}"].sum())) * removed_per_unit(masked, g) for g in masked._ebcompile.plan.groups
    )
    assert plain_params(small) == expected
    return small


# -- configurations --------------------------------------------------------------------------------------

vit_cfgs = st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2, 3, 4]), st.sampled_from([2, 4]), st.sampled_from([4, 7]))


@st.composite
def swin_cfgs(draw):
    h1 = draw(st.sampled_from([1, 2, 3]))
    heads = (h1,) if draw(st.booleans()) else (h1, draw(st.sampled_from(sorted({1, h1, 2 * h1}))))
    return heads, draw(st.sampled_from([2, 4]))


mlp_cfgs = st.tuples(
    st.lists(st.integers(1, 6), min_size=4, max_size=5).map(tuple),  # >= 2 masked linears: >= 1 neuron group
    st.sampled_from(["relu", "gelu", "tanh", "sigmoid"]),
    st.booleans(),
)
