"""apply_ticket: frozen masks under AdamW, rewind / reinit, Ticket save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ebcompile
from ebcompile.prepare import current_masks
from ebcompile.search.importance import raw_tensor
from ebcompile.search.ticket import Ticket, signature_of

from conftest import TINY


def ticket_now(model: nn.Module) -> Ticket:
    cfg = model._ebcompile
    return Ticket(current_masks(model), cfg.ratio, cfg.scope, signature_of(model))


def effective(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        out = model(x)
        loss = (out - torch.randn(out.shape, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name,structure", [("mlp", "unstructured"), ("vit", "unstructured"), ("vit", "structured"),
                                            ("swin", "structured")])
def test_frozen_masks_stay_zero_through_adamw_with_weight_decay(name, structure):
    make, batch = TINY[name]
    x = batch()
    model = ebcompile.prepare(make(), x, ratio=0.5, structure=structure)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.5, betas=(0.9, 0.999))
    train_steps(model, opt, x, 3, seed=0)  # momentum on every weight, pruned ones included
    ticket = ticket_now(model)
    ebcompile.apply_ticket(model, ticket)
    before = {t: raw_tensor(model, t).detach().clone() for t in ticket.masks.tensors}
    train_steps(model, opt, x, 4, seed=1)
    state = model.state_dict()
    for t, keep in ticket.masks.tensors.items():
        pruned = ~keep
        if not pruned.any():
            continue
        assert bool((effective(model, t)[pruned] == 0).all()), t
        assert bool((state[t][pruned] == 0).all()), t
        assert bool((raw_tensor(model, t)[pruned] == 0).all()), t
        assert torch.equal(state[f"{t}_mask"], keep)
        if t.endswith("weight"):  # kept weights keep training
            assert not torch.equal(raw_tensor(model, t)[keep], before[t][keep]), t
    assert sum(int((~k).sum()) for k in ticket.masks.tensors.values()) > 0


def test_frozen_masks_stay_zero_with_fused_sgd_momentum_and_after_optimizer_made_later(mlp):
    x = TINY["mlp"][1]()
    model = ebcompile.prepare(mlp, x, ratio=0.4)
    ticket = ticket_now(model)
    ebcompile.apply_ticket(model, ticket)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1, foreach=True)
    train_steps(model, opt, x, 3, seed=2)
    for t, keep in ticket.masks.tensors.items():
        assert bool((raw_tensor(model, t)[~keep] == 0).all())


def test_continue_keeps_current_weights(mlp):
    x = TINY["mlp"][1]()
    model = ebcompile.prepare(mlp, x, ratio=0.3)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ticket = ticket_now(model)
    ebcompile.apply_ticket(model, ticket, mode="continue")
    for k, v in model.state_dict().items():
        if k.endswith("_mask"):
            continue
        keep = ticket.masks.tensors.get(k)
        assert torch.equal(v, raw[k] * keep if keep is not None else raw[k]), k


@pytest.mark.parametrize("source", ["earlybird", "snapshot"])
def test_rewind_restores_saved_weights_with_masks_applied(source):
    make, batch = TINY["vit"]
    x = batch()
    model = ebcompile.prepare(make(), x, ratio=0.4, structure="structured")
    eb = ebcompile.EarlyBird(model, rewind_at=0 if source == "earlybird" else None)
    saved = eb.rewind_weights if source == "earlybird" else ebcompile.snapshot(model)
    assert saved is not None and not any(k.endswith("_mask") for k in saved)
    saved_copy = {k: v.clone() for k, v in saved.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    train_steps(model, opt, x, 3, seed=0)
    ticket = ticket_now(model)
    ebcompile.apply_ticket(model, ticket, mode="rewind", weights=saved)
    state = model.state_dict()
    assert set(saved) == {k for k in state if not k.endswith("_mask")}
    for k, v in saved_copy.items():
        keep = ticket.masks.tensors.get(k)
        assert torch.equal(state[k], v * keep if keep is not None else v), k
    for t, keep in ticket.masks.tensors.items():
        assert torch.equal(raw_tensor(model, t), saved_copy[t] * keep)


def test_rewind_at_k_snapshots_at_call_k(mlp):
    x = TINY["mlp"][1]()
    model = ebcompile.prepare(mlp, x, ratio=0.3)
    eb = ebcompile.EarlyBird(model, rewind_at=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = None
    for call in range(1, 4):
        train_steps(model, opt, x, 1, seed=call)
        if call == 2:
            expected = ebcompile.snapshot(model)
        eb.step()
    assert eb.rewind_weights is not None
    assert eb.rewind_weights.keys() == expected.keys()
    assert all(torch.equal(eb.rewind_weights[k], expected[k]) for k in expected)
    assert not all(torch.equal(eb.rewind_weights[k], v) for k, v in ebcompile.snapshot(model).items())


@pytest.mark.parametrize("name,structure", [("mlp", "unstructured"), ("vit", "structured"), ("swin", "unstructured")])
def test_reinit_reinitialises_reproducibly(name, structure):
    make, batch = TINY[name]
    x = batch()
    models = [ebcompile.prepare(make(), x, ratio=0.4, structure=structure) for _ in range(3)]
    before = {k: v.clone() for k, v in models[0].state_dict().items()}
    ticket = ticket_now(models[0])
    ebcompile.apply_ticket(models[0], ticket, mode="reinit", seed=7)
    ebcompile.apply_ticket(models[1], ticket, mode="reinit", seed=7)
    ebcompile.apply_ticket(models[2], ticket, mode="reinit", seed=8)
    a, b, c = (m.state_dict() for m in models)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "seeded reinit must be reproducible"
    linear_weights = [op.weight for op in models[0]._ebcompile.plan.linears]
    for t in linear_weights:
        keep = ticket.masks.tensors[t]
        assert not torch.equal(a[t][keep], before[t][keep]), t  # re-drawn
        assert not torch.equal(a[t], c[t]), t  # another seed, other weights
    for t, keep in ticket.masks.tensors.items():
        assert bool((a[t][~keep] == 0).all()) and bool((raw_tensor(models[0], t)[~keep] == 0).all()), t
    with torch.no_grad():
        assert torch.equal(models[0](x), models[1](x))


def test_reinit_with_custom_init(mlp):
    x = TINY["mlp"][1]()
    model = ebcompile.prepare(mlp, x, ratio=0.5)
    ticket = ticket_now(model)

    def init(m: nn.Module) -> None:
        for p in m.parameters():
            nn.init.constant_(p, 0.5)

    ebcompile.apply_ticket(model, ticket, mode="reinit", init=init)
    for t, keep in ticket.masks.tensors.items():
        assert torch.equal(effective(model, t), 0.5 * keep.float())


def test_ticket_save_load_round_trip(tmp_path):
    make, batch = TINY["vit"]
    x = batch()
    model = ebcompile.prepare(make(), x, ratio=0.3, structure="structured")
    ticket = ticket_now(model)
    ticket.found_at = {"check": 3, "tick": 4}
    path = tmp_path / "ticket.safetensors"
    ticket.save(path)
    loaded = Ticket.load(path)
    expected = ("structured", 0.3, "global", {"check": 3, "tick": 4})
    assert (loaded.structure, loaded.ratio, loaded.scope, loaded.found_at) == expected
    assert loaded.signature == ticket.signature
    assert loaded.masks.kinds == ticket.masks.kinds
    for part in ("tensors", "units"):
        mine, theirs = getattr(ticket.masks, part), getattr(loaded.masks, part)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) and theirs[k].dtype == torch.bool for k in mine)
    assert loaded.sparsity() == ticket.sparsity()
    other = ebcompile.prepare(make(), x, ratio=0.3, structure="structured")
    ebcompile.apply_ticket(other, loaded)
    for t, keep in ticket.masks.tensors.items():
        assert torch.equal(effective(other, t), raw_tensor(other, t) * keep)



def test_the_rezero_hook_touches_only_what_the_stepping_optimizer_updates():
    from ebcompile.transforms.masks import iter_masks

    make, batch = TINY["vit"]
    model = ebcompile.prepare(make(), batch(), ratio=0.3, structure="structured")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ebcompile.apply_ticket(model, ticket_now(model))
    name, _, _, mask = next((n, *rest) for n, *rest in iter_masks(model) if not bool(rest[-1].mask.all()))
    weight = raw_tensor(model, name)
    with torch.no_grad():
        weight.fill_(1.0)  # pruned entries made non-zero behind the optimizers' back
    other = nn.Linear(3, 3)
    torch.optim.SGD(other.parameters(), lr=0.1).step()  # another optimizer: the masked model is not touched
    assert bool((weight[~mask.mask.expand_as(weight)] == 1).all())
    opt.step()  # its own optimizer: pruned entries are zero again
    assert bool((weight[~mask.mask.expand_as(weight)] == 0).all())


@pytest.mark.parametrize("kwargs", [{"seed": "x"}, {"seed": 1.5}, {"init": 5}])
def test_a_bad_reinit_seed_or_init_is_refused_before_anything_changes(kwargs):
    make, batch = TINY["mlp"]
    model = ebcompile.prepare(make(), batch(), ratio=0.5, structure="unstructured")
    before, flags = {k: v.clone() for k, v in model.state_dict().items()}, _flags(model)
    with pytest.raises(ebcompile.errors.ConfigError, match="Fix:"):
        ebcompile.apply_ticket(model, ticket_now(model), mode="reinit", **kwargs)
    assert _flags(model) == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_init_that_raises_leaves_the_masks_as_they_were():
    make, batch = TINY["mlp"]
    model = ebcompile.prepare(make(), batch(), ratio=0.5, structure="unstructured")

    def broken(_: nn.Module) -> None:
        raise RuntimeError("user init failed")

    flags = _flags(model)
    with pytest.raises(RuntimeError, match="user init failed"):
        ebcompile.apply_ticket(model, ticket_now(model), mode="reinit", init=broken)
    assert _flags(model) == flags


def test_a_ticket_file_with_an_unknown_scope_is_a_broken_ticket(tmp_path):
    import json
    import struct

    make, batch = TINY["mlp"]
    model = ebcompile.prepare(make(), batch(), ratio=0.5, structure="unstructured")
    ticket_now(model).save(tmp_path / "t.safetensors")
    raw = (tmp_path / "t.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    key = next(k for k, v in meta.items() if '"scope"' in v or k == "scope")
    meta[key] = meta[key].replace('"global"', '"bogus"') if key != "scope" else "bogus"
    body = json.dumps(header).encode()
    (tmp_path / "t.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    with pytest.raises(ebcompile.errors.CheckpointError, match="scope"):
        Ticket.load(tmp_path / "t.safetensors")


def _flags(model: nn.Module) -> list[tuple[bool, bool]]:
    from ebcompile.transforms.masks import iter_masks

    return [(m.active, m.frozen) for _, _, _, m in iter_masks(model)]
