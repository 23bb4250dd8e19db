"""prepare: which linears get masks, identity while masks are all ones, exact pruning counts, state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import swin_t, vit_b_16

import ebcompile
from ebcompile.prepare import current_masks
from ebcompile.search.importance import raw_tensor
from ebcompile.search.ticket import Ticket, signature_of

from conftest import TINY, make_mlp

OUTPUT_LAYERS = {"vit": "heads.head", "swin": "head", "mlp": "4", "vit_b_16": "heads.head", "swin_t": "head"}


def expected_weights(model: nn.Module, output: str) -> set[str]:
    """Every nn.Linear weight and MHA packed in-projection, except the output layer (the classifier; computed independently)."""
    out = set()
    for path, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            out.add(f"{path}.in_proj_weight")
        elif isinstance(mod, nn.Linear) and path != output:
            out.add(f"{path}.weight")
    return out


def effective(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor the forward uses (``module.weight`` through the parametrization)."""
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def check_prepared(model: nn.Module, output: str, expected: set[str], x: torch.Tensor, y: torch.Tensor, structure: str) -> None:
    plan = model._ebcompile.plan
    assert {op.weight for op in plan.linears} == expected
    assert list(plan.skipped)[0] == output and "model output" in plan.skipped[output]
    grouped = {m.tensor for g in plan.groups for m in g.members}
    kept_whole = {op.name for op in plan.linears if op.weight not in grouped}
    # structured: a masked linear in no group (Swin's patch-merging reduction feeds a norm) says why
    assert set(list(plan.skipped)[1:]) == (kept_whole if structure == "structured" else set())
    assert all(plan.skipped[name] for name in kept_whole if structure == "structured")
    masked = {n.tensor for n in ebcompile.mask_nodes(model)}
    if structure == "unstructured":
        assert masked == expected
    else:  # every prunable linear is masked, plus the biases that follow the head/neuron rows
        assert expected <= masked
        assert all(n.endswith("bias") for n in masked - expected)
    assert f"{output}.weight" not in masked
    assert all(n.density == 1.0 and not n.frozen for n in ebcompile.mask_nodes(model))
    with torch.no_grad():
        assert torch.equal(model(x), y)


@pytest.fixture(scope="module", params=["vit_b_16", "swin_t"])
def full_size(request):
    torch.manual_seed(0)
    model = {"vit_b_16": vit_b_16, "swin_t": swin_t}[request.param](weights=None).eval()
    size = 224 if request.param == "vit_b_16" else 64  # ViT needs its image size; Swin takes any (faster)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
    return request.param, model, x, y


@pytest.mark.parametrize("structure", ["unstructured", "structured"])
def test_full_size_torchvision_models_mask_every_prunable_linear_and_keep_outputs(full_size, structure):
    name, base, x, y = full_size
    model = copy.deepcopy(base)
    expected = expected_weights(model, OUTPUT_LAYERS[name])
    assert len(expected) == {"vit_b_16": 48, "swin_t": 51}[name]
    assert ebcompile.prepare(model, x, ratio=0.3, structure=structure) is model
    check_prepared(model, OUTPUT_LAYERS[name], expected, x, y, structure)


@pytest.mark.parametrize("structure", ["unstructured", "structured"])
def test_tiny_models_mask_every_prunable_linear_and_keep_outputs(tiny, structure):
    name, model, x = tiny
    with torch.no_grad():
        y = model(x)
    expected = expected_weights(model, OUTPUT_LAYERS[name])
    ebcompile.prepare(model, x, structure=structure)
    check_prepared(model, OUTPUT_LAYERS[name], expected, x, y, structure)
    kinds = {g.kind for g in model._ebcompile.plan.groups}
    assert kinds == ({"neuron"} if name == "mlp" else {"head", "neuron"})


def test_identity_in_training_mode_too(vit):
    x = TINY["vit"][1]()
    vit.train()
    torch.manual_seed(3)
    y = vit(x)
    ebcompile.prepare(vit, x)
    assert vit.training  # prepare leaves the mode as it was
    torch.manual_seed(3)
    assert torch.equal(vit(x), y)


def test_default_structure_is_structured_where_groups_are_found_else_unstructured(vit):
    x = TINY["vit"][1]()
    ebcompile.prepare(vit, x, ratio=0.5)
    assert (vit._ebcompile.structure, vit._ebcompile.scope) == ("structured", "global")
    assert ebcompile.draw_ticket(vit).structure == "structured"
    torch.manual_seed(0)
    lone = nn.Sequential(nn.Linear(8, 4))  # its only linear feeds the output: no neuron can go
    ebcompile.prepare(lone, torch.randn(2, 8), prune_output_layer=True)
    assert (lone._ebcompile.structure, lone._ebcompile.scope) == ("unstructured", "global")
    assert not lone._ebcompile.plan.groups and ebcompile.draw_ticket(lone, 0.5).sparsity() == pytest.approx(0.5)
    with pytest.raises(ebcompile.errors.ConfigError, match="structure='automatic'"):
        ebcompile.prepare(make_mlp(), torch.randn(2, 8), structure="automatic")


def test_unit_scores_do_not_grow_with_layer_width():
    """Units of layers of different widths whose weights are alike score alike (RMS): a global ranking must not
    prune the narrow layers first only because their units hold fewer weights."""
    from ebcompile.search.importance import group_scores

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    ebcompile.prepare(model, torch.randn(2, 4), structure="structured")
    groups = model._ebcompile.plan.groups
    assert len(groups) == 2 and len({g.units for g in groups}) == 2  # 6 neurons of 4 + 1 + 32 weights, 32 of 6 + 1 + 6
    for g in groups:
        torch.testing.assert_close(group_scores(model, g), torch.full((g.units,), 0.5))


def test_prune_output_layer_and_patterns(mlp):
    x = TINY["mlp"][1]()
    ebcompile.prepare(mlp, x, prune_output_layer=True, exclude=["2"])
    assert {n.tensor for n in ebcompile.mask_nodes(mlp)} == {"0.weight", "4.weight"}
    assert mlp._ebcompile.plan.skipped == {"2": "matched by exclude"}
    other = ebcompile.prepare(make_mlp(), x, include=["2"])
    assert {n.tensor for n in ebcompile.mask_nodes(other)} == {"2.weight"}


def test_output_layer_kind_is_output_and_old_plans_still_load(mlp):
    from ebcompile.plan import Plan

    x = TINY["mlp"][1]()
    plan = ebcompile.prepare(mlp, x, prune_output_layer=True)._ebcompile.plan
    assert [op.kind for op in plan.linears if op.name == "4"] == ["output"]
    assert Plan.from_dict(plan.to_dict()) == plan
    old = plan.to_dict()
    for op in old["linears"]:
        op["kind"] = "head" if op["kind"] == "output" else op["kind"]  # saved before the rename
    assert Plan.from_dict(old) == plan


# -- exact pruning counts ------------------------------------------------------------------------------------

def apply(model: nn.Module, masks) -> None:
    cfg = model._ebcompile
    ebcompile.apply_ticket(model, Ticket(masks, cfg.ratio, cfg.scope, signature_of(model)))


def check_effective_zeros(model: nn.Module, masks) -> None:
    """After apply_ticket the forward's weights are zero exactly where the masks prune."""
    assert set(masks.tensors) == {n.tensor for n in ebcompile.mask_nodes(model)}
    for name, keep in masks.tensors.items():
        w = effective(model, name)
        assert torch.equal(w == 0, ~keep), name
        assert torch.equal(raw_tensor(model, name) == 0, ~keep), name


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("ratio", [0.3, 0.55])
def test_unstructured_global_prunes_exactly_round_pN(name, ratio):
    make, batch = TINY[name]
    model = ebcompile.prepare(make(), batch(), ratio=ratio, structure="unstructured")
    masks = current_masks(model)
    n = sum(raw_tensor(model, op.weight).numel() for op in model._ebcompile.plan.linears)
    assert sum(k.numel() for k in masks.tensors.values()) == n
    assert sum(int((~k).sum()) for k in masks.tensors.values()) == round(ratio * n)
    # global: every pruned weight is no larger than every kept one
    mags = torch.cat([raw_tensor(model, t).detach().abs().flatten() for t in masks.tensors])
    keep = torch.cat([k.flatten() for k in masks.tensors.values()])
    assert mags[~keep].max() <= mags[keep].min()
    apply(model, masks)
    check_effective_zeros(model, masks)


@pytest.mark.parametrize("name", sorted(TINY))
def test_unstructured_layer_scope_prunes_round_pn_per_tensor(name):
    make, batch = TINY[name]
    ratio = 0.37
    model = ebcompile.prepare(make(), batch(), ratio=ratio, structure="unstructured", scope="layer")
    masks = current_masks(model)
    for tensor, keep in masks.tensors.items():
        assert int((~keep).sum()) == round(ratio * keep.numel()), tensor
        w = raw_tensor(model, tensor).detach().abs()
        assert w[~keep].max() <= w[keep].min()
    apply(model, masks)
    check_effective_zeros(model, masks)


def unit_slices(model: nn.Module, group) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """For each masked tensor of a group: (dim, index tensor of unit u) for every unit, derived independently."""
    out: dict[str, list] = {}
    mod = model.get_submodule(group.name) if group.kind == "head" else None
    if group.kind == "head":
        if isinstance(mod, nn.MultiheadAttention):
            qkv_w, qkv_b, proj = f"{group.name}.in_proj_weight", f"{group.name}.in_proj_bias", f"{group.name}.out_proj.weight"
            embed = mod.embed_dim
        else:
            qkv_w, qkv_b, proj = f"{group.name}.qkv.weight", f"{group.name}.qkv.bias", f"{group.name}.proj.weight"
            embed = mod.qkv.in_features
        hd = embed // group.units
        rows = [torch.cat([torch.arange(i * embed + u * hd, i * embed + (u + 1) * hd) for i in range(3)])
                for u in range(group.units)]
        out[qkv_w] = [(0, r) for r in rows]
        out[qkv_b] = [(0, r) for r in rows]
        out[proj] = [(1, torch.arange(u * hd, (u + 1) * hd)) for u in range(group.units)]
    else:
        fc1 = group.name
        fc2 = [op for op in model._ebcompile.plan.linears if op.weight in {m.tensor for m in group.members} and op.name != fc1][0]
        out[f"{fc1}.weight"] = [(0, torch.tensor([u])) for u in range(group.units)]
        out[f"{fc1}.bias"] = [(0, torch.tensor([u])) for u in range(group.units)]
        out[fc2.weight] = [(1, torch.tensor([u])) for u in range(group.units)]
    return out


def check_structured_zeros(model: nn.Module, masks) -> None:
    """Pruned heads/neurons have all their rows/columns zero in the effective weights; kept ones none."""
    for group in model._ebcompile.plan.groups:
        keep = masks.units[f"{group.kind}:{group.name}"]
        for tensor, slices in unit_slices(model, group).items():
            w, raw = effective(model, tensor), raw_tensor(model, tensor)
            for u, (dim, idx) in enumerate(slices):
                piece = w.index_select(dim, idx)
                if keep[u]:  # untouched (biases may be zero-initialised, weights are not)
                    assert torch.equal(piece, raw.index_select(dim, idx)), (tensor, u)
                    assert tensor.endswith("bias") or bool((piece != 0).all()), (tensor, u)
                else:
                    assert bool((piece == 0).all()), (tensor, u)
    pruned_units = sum(int((~k).sum()) for k in masks.units.values())
    assert pruned_units > 0


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_structured_layer_scope_prunes_round_pn_per_group(name, ratio):
    make, batch = TINY[name]
    model = ebcompile.prepare(make(), batch(), ratio=ratio, structure="structured", scope="layer")
    masks = current_masks(model)
    groups = model._ebcompile.plan.groups
    assert set(masks.units) == {f"{g.kind}:{g.name}" for g in groups}
    for g in groups:
        keep = masks.units[f"{g.kind}:{g.name}"]
        assert keep.numel() == g.units
        assert int((~keep).sum()) == round(ratio * g.units), g.name
    apply(model, masks)
    check_structured_zeros(model, masks)
    for name_, keep in masks.tensors.items():  # tensor masks agree with the effective weights too
        assert torch.equal(effective(model, name_), raw_tensor(model, name_) * keep)
        assert not name_.endswith("weight") or torch.equal(effective(model, name_) == 0, ~keep)


@pytest.mark.parametrize("name", ["vit", "swin"])
@pytest.mark.parametrize("ratio", [0.3, 0.45])
def test_structured_global_prunes_round_pN_per_kind(name, ratio):
    make, batch = TINY[name]
    model = ebcompile.prepare(make(), batch(), ratio=ratio, structure="structured", scope="global")
    masks = current_masks(model)
    for kind in ("head", "neuron"):
        keys = [k for k in masks.units if masks.kinds[k] == kind]
        total = sum(masks.units[k].numel() for k in keys)
        assert total == sum(g.units for g in model._ebcompile.plan.groups if g.kind == kind)
        assert sum(int((~masks.units[k]).sum()) for k in keys) == round(ratio * total), kind
        assert all(masks.units[k].any() for k in keys)  # no layer loses all its units
    apply(model, masks)
    check_structured_zeros(model, masks)


def test_mask_nodes_report_density_after_ticket(mlp):
    model = ebcompile.prepare(mlp, TINY["mlp"][1](), ratio=0.25, scope="layer")
    apply(model, current_masks(model))
    for node in ebcompile.mask_nodes(model):
        assert node.frozen and node.density == pytest.approx(0.75, abs=1 / 256)


# -- state_dict ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("structure", ["unstructured", "structured"])
def test_state_dict_keeps_original_keys_and_round_trips(name, structure):
    make, batch = TINY[name]
    x = batch()
    original_keys = set(make().state_dict())
    model = ebcompile.prepare(make(), x, ratio=0.4, structure=structure)
    masked = {n.tensor for n in ebcompile.mask_nodes(model)}
    keys = set(model.state_dict())
    assert original_keys <= keys
    assert keys - original_keys == {f"{t}_mask" for t in masked}
    apply(model, current_masks(model))
    with torch.no_grad():
        y = model(x)
    state = model.state_dict()
    for t in masked:
        assert torch.equal(state[t], raw_tensor(model, t) * state[f"{t}_mask"])
        assert bool((state[t][~state[f"{t}_mask"]] == 0).all())
    torch.manual_seed(123)  # a fresh model with other weights
    fresh = ebcompile.prepare(make().apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None), x,
                              ratio=0.4, structure=structure)
    with torch.no_grad():
        assert not torch.equal(fresh(x), y)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    for t in masked:
        assert torch.equal(fresh.state_dict()[f"{t}_mask"], state[f"{t}_mask"])


def test_plain_state_dict_loads_into_prepared_model(mlp):
    x = TINY["mlp"][1]()
    plain = make_mlp()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)
        y = plain(x)
    model = ebcompile.prepare(mlp, x)
    model.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), y)
