"""compact: structured tickets lose their pruned heads/neurons, unstructured ones can be stored sparse, and
the compact model computes what the masked one computes.

Property tests draw tiny ViT / Swin v1 / Swin v2 / MLP configurations and random unit masks (layers left
with one head included). Prepared models are cached per configuration and deep-copied per example, with
fresh random weights, to keep each example in the tens of milliseconds.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize
from torchvision.models import VisionTransformer
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)

import ebcompile
from ebcompile.errors import ConfigError, EbcompileError, NoTicketError, NotPreparedError
from ebcompile.importance import Masks, expand_units
from ebcompile.modules import (
    CompactMultiheadAttention,
    CompactShiftedWindowAttention,
    CompactShiftedWindowAttentionV2,
    SparseLinear,
)
from ebcompile.passes.masks import WeightMask
from ebcompile.passes.shrink import compact, storage_bytes
from ebcompile.ticket import Ticket, signature_of

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state",
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
    small = compact(masked)
    assert_no_masks(small)
    assert_same_function(masked, small, inputs)
    check_heads(masked, small, units)
    expected = plain_params(masked) - sum(
        (g.units - int(units[f"{g.kind}:{g.name}"].sum())) * removed_per_unit(masked, g) for g in masked._ebcompile.plan.groups
    )
    assert plain_params(small) == expected
    return small


# -- structured: property tests --------------------------------------------------------------------------

vit_cfgs = st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2, 3, 4]), st.sampled_from([2, 4]), st.sampled_from([4, 7]))


@settings(max_examples=60, **PROPS)
@given(cfg=vit_cfgs, seed=st.integers(0, 2**16), batches=st.lists(st.integers(1, 3), min_size=1, max_size=2), data=st.data())
def test_vit_compact_equals_masked(cfg, seed, batches, data):
    model = fresh("vit", cfg, "structured", seed)
    units = keep_vectors(data, model)
    ebcompile.apply_ticket(model, structured_ticket(model, units))
    check_structured(model, units, [example("vit", cfg, b, seed=seed + i) for i, b in enumerate(batches)])


@st.composite
def swin_cfgs(draw):
    h1 = draw(st.sampled_from([1, 2, 3]))
    heads = (h1,) if draw(st.booleans()) else (h1, draw(st.sampled_from(sorted({1, h1, 2 * h1}))))
    return heads, draw(st.sampled_from([2, 4]))


# token grids 4x4, 6x6 (padded to 8), 8x8 and 6x8: no shift, shift with padding, shift without padding
swin_sizes = st.sampled_from([(8, 8), (12, 12), (16, 16), (12, 16)])


@pytest.mark.parametrize("kind", ["swin1", "swin2"])
@settings(max_examples=35, **PROPS)
@given(cfg=swin_cfgs(), seed=st.integers(0, 2**16), size=swin_sizes, batch=st.integers(1, 3), data=st.data())
def test_swin_compact_equals_masked(kind, cfg, seed, size, batch, data):
    model = fresh(kind, cfg, "structured", seed)
    units = keep_vectors(data, model)
    ebcompile.apply_ticket(model, structured_ticket(model, units))
    check_structured(model, units, [example(kind, cfg, batch, size, seed), example(kind, cfg, 1, (16, 12), seed + 1)])


mlp_cfgs = st.tuples(
    st.lists(st.integers(1, 6), min_size=4, max_size=5).map(tuple),  # >= 2 masked linears: >= 1 neuron group
    st.sampled_from(["relu", "gelu", "tanh", "sigmoid"]),
    st.booleans(),
)


@settings(max_examples=50, **PROPS)
@given(cfg=mlp_cfgs, seed=st.integers(0, 2**16), batch=st.integers(1, 4), data=st.data())
def test_mlp_compact_equals_masked(cfg, seed, batch, data):
    model = fresh("mlp", cfg, "structured", seed)
    units = keep_vectors(data, model)
    ebcompile.apply_ticket(model, structured_ticket(model, units))
    small = compact(model)
    assert_no_masks(small)
    assert_same_function(model, small, [example("mlp", cfg, batch, seed=seed), example("mlp", cfg, 1, seed=seed + 1)])
    # every hidden width between two masked linears is a neuron group; the output layer is never masked
    widths = list(cfg[0])
    for g in model._ebcompile.plan.groups:
        widths[int(g.name) // 2 + 1] = int(units[f"neuron:{g.name}"].sum())
    bias = cfg[2]
    assert plain_params(small) == sum(a * b + (b if bias else 0) for a, b in zip(widths[:-1], widths[1:]))
    assert [m.out_features for m in small if isinstance(m, nn.Linear)] == widths[1:]


# -- optimizer state carried onto the compact model -------------------------------------------------------


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def _train(model: nn.Module, opt, sched, x: torch.Tensor, target: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        loss = ((model(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@settings(max_examples=30, **PROPS)
@given(kind=st.sampled_from(["vit", "swin1", "swin2", "mlp"]), vit=vit_cfgs, swin=swin_cfgs(), mlp=mlp_cfgs,
       opt_kind=st.sampled_from(["sgd", "adamw"]), seed=st.integers(0, 2**16), data=st.data())
def test_compact_with_optimizer_trains_like_the_masked_model(kind, vit, swin, mlp, opt_kind, seed, data):
    """compact(model, optimizer=opt) mid-training, then more steps ≡ the masked model trained on."""
    cfg = {"vit": vit, "mlp": mlp}.get(kind, swin)
    masked = fresh(kind, cfg, "structured", seed)
    ebcompile.apply_ticket(masked, structured_ticket(masked, keep_vectors(data, masked)))
    twin = copy.deepcopy(masked)
    x, x2 = example(kind, cfg, 3, seed=seed), example(kind, cfg, 2, seed=seed + 1)
    with torch.no_grad():
        target = torch.randn(masked(x).shape, generator=torch.Generator().manual_seed(seed))
    runs = []
    for model in (masked, twin):
        opt = _optimizer(opt_kind, model.parameters())
        runs.append((opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.7**s)))
        _train(model, *runs[-1], x, target, 2)
    (opt_a, sched_a), (opt_b, sched_b) = runs
    small = compact(twin, optimizer=opt_b)
    held = [p for g in opt_b.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in small.parameters()} and len(held) == len(list(small.parameters()))
    for p in held:
        for v in opt_b.state[p].values():
            assert not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape == p.shape
    _train(masked, opt_a, sched_a, x, target, 3)
    _train(small, opt_b, sched_b, x, target, 3)
    assert opt_b.param_groups[0]["lr"] == pytest.approx(opt_a.param_groups[0]["lr"])
    with torch.no_grad():
        for inp in (x, x2):
            assert rel_err(small(inp), masked(inp)) <= (TOL if opt_kind == "sgd" else 1e-4)


def test_compact_with_optimizer_refuses_what_it_cannot_carry(mlp):
    x = torch.randn(2, 8)
    model = half_pruned_mlp(mlp, x)
    with pytest.raises(ConfigError, match="none of the model's parameters"):
        compact(model, optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = next(model.parameters())
    opt.state[first]["row_factor"] = torch.zeros(first.shape[0] + 1)  # a factored (Adafactor-like) state
    with pytest.raises(ConfigError, match="row_factor"):
        compact(model, optimizer=opt)
    assert opt.param_groups[0]["params"][0] is first  # left untouched on refusal
    other = ebcompile.prepare(build("mlp", ((8, 16, 16, 4), "relu", True)), x, ratio=0.5)
    ebcompile.apply_ticket(other, unstructured_ticket(other, 0.5, 0))
    for sparse in (False, True):
        with pytest.raises(ConfigError, match="unstructured"):
            compact(other, sparse=sparse, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))


# -- rounding --------------------------------------------------------------------------------------------


@settings(max_examples=40, **PROPS)
@given(kind=st.sampled_from(["vit", "mlp"]), vit=vit_cfgs, mlp=mlp_cfgs, round_to=st.sampled_from([2, 3, 4, 8]),
       seed=st.integers(0, 2**16), data=st.data())
def test_round_to_keeps_widths_at_multiples(kind, vit, mlp, round_to, seed, data):
    cfg = vit if kind == "vit" else mlp
    model = fresh(kind, cfg, "structured", seed)
    units = keep_vectors(data, model)
    ebcompile.apply_ticket(model, structured_ticket(model, units))
    small = compact(model, round_to=round_to)
    assert_no_masks(small)
    assert_same_function(model, small, [example(kind, cfg, 2, seed=seed)])
    for g in model._ebcompile.plan.groups:
        kept = int(units[f"{g.kind}:{g.name}"].sum())
        if g.kind == "head":
            orig = model.get_submodule(g.module)
            hd = orig.embed_dim // orig.num_heads
            width, full = small.get_submodule(g.module).num_heads * hd, g.units * hd
        else:
            width, full, hd = small.get_submodule(g.name).out_features, g.units, 1
        step = round_to // math.gcd(hd, round_to)
        assert width == min(full, -(-kept // step) * step * hd)
        assert kept * hd <= width <= full
        assert width % round_to == 0 or width == full


def test_round_to_none_and_one_keep_exact_widths(vit):
    model = ebcompile.prepare(vit, torch.randn(1, 3, 16, 16), structure="structured", ratio=0.5)
    units = {f"{g.kind}:{g.name}": torch.arange(g.units) % 3 == 0 for g in model._ebcompile.plan.groups}
    ebcompile.apply_ticket(model, structured_ticket(model, units))
    a, b = compact(model), compact(model, round_to=1)
    assert plain_params(a) == plain_params(b)
    c = compact(model, round_to=8)  # head_dim 8: heads stay as they are, the 64-wide FFN keeps 24 of 22
    assert [m.num_heads for m in c.modules() if isinstance(m, CompactMultiheadAttention)] == [2, 2]
    assert [c.get_submodule(g.name).out_features for g in model._ebcompile.plan.groups if g.kind == "neuron"] == [24, 24]
    assert_same_function(model, c, [torch.randn(2, 3, 16, 16)])


# -- unstructured / sparse -------------------------------------------------------------------------------


@settings(max_examples=45, **PROPS)
@given(kind=st.sampled_from(["vit", "swin1", "swin2", "mlp"]), vit=vit_cfgs, swin=swin_cfgs(), mlp=mlp_cfgs,
       density=st.sampled_from([0.0, 0.1, 0.3, 0.7, 1.0]), seed=st.integers(0, 2**16), batch=st.integers(1, 3))
def test_sparse_compact_equals_masked(kind, vit, swin, mlp, density, seed, batch):
    cfg = {"vit": vit, "mlp": mlp}.get(kind, swin)
    model = fresh(kind, cfg, "unstructured", seed)
    ticket = unstructured_ticket(model, density, seed)
    ebcompile.apply_ticket(model, ticket)
    inputs = [example(kind, cfg, batch, seed=seed)]

    dense = compact(model)
    assert_no_masks(dense)
    assert_same_function(model, dense, inputs)
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    for name, mask in ticket.masks.tensors.items():
        owner, _, attr = name.rpartition(".")
        assert not getattr(dense.get_submodule(owner), attr)[~mask].any()

    sparse = compact(model, sparse=True)
    assert_no_masks(sparse)
    assert_same_function(model, sparse, inputs)
    converted = {p for p, m in sparse.named_modules() if isinstance(m, SparseLinear)}
    # nn.MultiheadAttention's in_proj_weight becomes CompactMultiheadAttention.in_proj
    expected = {n[: -len("_weight")] if n.endswith(".in_proj_weight") else n.rpartition(".")[0] for n in ticket.masks.tensors}
    assert converted == expected
    assert not any(isinstance(m, nn.MultiheadAttention) for m in sparse.modules())
    nnz = 0
    overhead = 0
    for p in converted:
        m = sparse.get_submodule(p)
        assert m.crow_indices.dtype == torch.int32 and m.col_indices.dtype == torch.int32
        nnz += m.nnz
        overhead += m.in_features * m.out_features * 4 - (m.nnz * 8 + (m.out_features + 1) * 4)
    assert nnz == sum(int(dense.state_dict()[n].count_nonzero()) for n in ticket.masks.tensors)
    b_dense, b_sparse = storage_bytes(dense), storage_bytes(sparse)
    assert b_dense["dense"] == b_dense["sparse"] and b_dense["sparse_layers"] == 0
    assert b_sparse["dense"] == b_dense["dense"]
    assert b_sparse["sparse"] == b_sparse["dense"] - overhead
    assert b_sparse["sparse_layers"] == len(converted)
    if density <= 0.1 and all(sparse.get_submodule(p).in_features >= 4 for p in converted):
        assert b_sparse["sparse"] < b_sparse["dense"]  # CSR row pointers cost (out + 1) * 4 bytes per layer


def test_sparse_linear_state_dict_copy_and_grad():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.2] = 0
    s = SparseLinear.from_linear(lin)
    x = torch.randn(4, 3, 6)
    assert torch.allclose(s(x), lin(x), atol=1e-6)
    assert torch.equal(s.weight.to_dense(), lin.weight.detach())
    assert torch.equal(s.to_dense().weight, lin.weight.detach())
    c = copy.deepcopy(s)
    assert torch.equal(c(x), s(x))
    other = SparseLinear(6, 5)  # nnz 0: load_state_dict takes the checkpoint's sizes
    other.load_state_dict(s.state_dict())
    assert torch.equal(other(x), s(x))
    s(x).sum().backward()
    assert s.values.grad is not None and s.values.grad.shape == s.values.shape
    assert set(s.state_dict()) == {"values", "crow_indices", "col_indices", "bias"}


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
    small = compact(model)
    assert [m.num_heads for m in small.modules() if isinstance(m, CompactMultiheadAttention)] == [1, 1]
    assert [small.get_submodule(g.name).out_features for g in model._ebcompile.plan.groups if g.kind == "neuron"] == [1, 1]
    assert_same_function(model, small, [torch.randn(2, 3, 16, 16)])
