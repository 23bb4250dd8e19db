"""compact options: ``compact(model, optimizer=...)`` carries optimizer state onto the compact model,
``round_to`` keeps widths at multiples, and ``sparse=True`` stores unstructured tickets as CSR ``SparseLinear``
layers that compute what the masked model computes.

Property tests draw tiny ViT / Swin v1 / Swin v2 / MLP configurations (tests/compact_cases.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ebcompile
from ebcompile.errors import ConfigError
from ebcompile.modules import CompactMultiheadAttention, SparseLinear
from ebcompile.transforms.shrink import compact, storage_bytes

from compact_cases import (
    PROPS,
    SPARSE_WARNINGS,
    TOL,
    assert_no_masks,
    assert_same_function,
    build,
    example,
    fresh,
    half_pruned_mlp,
    keep_vectors,
    mlp_cfgs,
    one_thread,  # noqa: F401 - an autouse fixture: one intra-op thread for this module
    plain_params,
    rel_err,
    structured_ticket,
    swin_cfgs,
    unstructured_ticket,
    vit_cfgs,
)

pytestmark = SPARSE_WARNINGS


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


@settings(max_examples=20, **PROPS)
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
    # exactly the ticket's units: a zero padding neuron (round_to) trains when its activation of 0 is not 0 (sigmoid)
    small = compact(twin, optimizer=opt_b, round_to=None)
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


@settings(max_examples=25, **PROPS)
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


def test_round_to_default_is_8_and_none_or_one_keep_exact_widths(vit):
    model = ebcompile.prepare(vit, torch.randn(1, 3, 16, 16), structure="structured", ratio=0.5)
    units = {f"{g.kind}:{g.name}": torch.arange(g.units) % 3 == 0 for g in model._ebcompile.plan.groups}
    ebcompile.apply_ticket(model, structured_ticket(model, units))
    a, b = compact(model, round_to=None), compact(model, round_to=1)
    assert plain_params(a) == plain_params(b)
    neurons = [g.name for g in model._ebcompile.plan.groups if g.kind == "neuron"]
    assert [a.get_submodule(n).out_features for n in neurons] == [22, 22]
    for c in (compact(model), compact(model, round_to=8)):  # head_dim 8: heads stay as they are, the FFN keeps 24 of 22
        assert [m.num_heads for m in c.modules() if isinstance(m, CompactMultiheadAttention)] == [2, 2]
        assert [c.get_submodule(n).out_features for n in neurons] == [24, 24]
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
