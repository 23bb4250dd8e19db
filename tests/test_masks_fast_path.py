"""The all-ones fast path of the mask parametrization: skipped work, never skipped masks."""

from __future__ import annotations

import copy

import torch
from torch import nn

import ebcompile
from ebcompile.transforms.masks import iter_masks


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def test_all_ones_masks_return_the_stored_parameter_and_the_plain_forward():
    plain = _mlp()
    model = ebcompile.prepare(copy.deepcopy(plain), torch.randn(2, 6), ratio=0.5)
    for _, module, attr, mask in iter_masks(model):
        assert not mask.active
        assert getattr(module, attr) is module.parametrizations[attr].original  # no multiply, no copy
    x = torch.randn(5, 6)
    assert torch.equal(model(x), plain(x))


def test_applied_masks_still_zero_the_weights_in_forward_and_gradient():
    model = ebcompile.prepare(_mlp(), torch.randn(2, 6), ratio=0.5)
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    x = torch.randn(5, 6)
    reference = copy.deepcopy(model)
    ebcompile.transforms.masks.strip_masks(reference, bake=True)
    for name, module, attr, mask in iter_masks(model):
        assert mask.active
        assert not bool(mask.mask.all())
        weight = getattr(module, attr)
        assert bool((weight[~mask.mask] == 0).all()), name
    assert torch.allclose(model(x), reference(x))
    model(x).sum().backward()
    for _, module, attr, mask in iter_masks(model):
        grad = module.parametrizations[attr].original.grad
        assert bool((grad[~mask.mask] == 0).all())  # pruned weights get no gradient through the mask


def test_a_mask_set_to_all_ones_again_returns_to_the_fast_path_and_copies_keep_it():
    model = ebcompile.prepare(_mlp(), torch.randn(2, 6), ratio=0.5)
    name, module, attr, mask = next(iter_masks(model))
    partial = torch.ones_like(mask.mask)
    partial[0] = False
    mask.set(partial)
    assert bool((getattr(module, attr)[0] == 0).all())
    twin = copy.deepcopy(model)
    twin_module = twin.get_submodule(name.rsplit(".", 1)[0])
    assert bool((getattr(twin_module, attr)[0] == 0).all())  # the copy masks too
    mask.set(torch.ones_like(mask.mask))
    assert getattr(module, attr) is module.parametrizations[attr].original
    assert bool((getattr(twin_module, attr)[0] == 0).all())  # and keeps its own mask
