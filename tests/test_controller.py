"""EarlyBird: when the ticket is declared, never on noise, and resuming mid-search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ebcompile
from ebcompile.prepare import current_masks

from conftest import TINY


def redraw(model: nn.Module, seed: int) -> None:
    """Re-draw every weight at random (the masks change completely)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def perturb(model: nn.Module, step: int, scale: float) -> None:
    """A deterministic 'training step': seeded noise of the given size on every weight."""
    g = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def prepared(name: str, structure: str = "unstructured", **kw) -> nn.Module:
    make, batch = TINY[name]
    return ebcompile.prepare(make(), batch(), structure=structure, **kw)


@pytest.mark.parametrize("rule", ["relative", "absolute"])
@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("changing", [4, 7])
def test_ticket_found_exactly_window_checks_after_weights_stop_changing(rule, window, changing):
    model = prepared("mlp", ratio=0.3)
    eb = ebcompile.EarlyBird(model, rule=rule, window=window, threshold=0.1)
    found_at = None
    for check in range(changing + window + 5):
        if check < changing:  # training with changing masks
            redraw(model, seed=check)
        # afterwards: no update, the masks stay put
        if eb.step() and found_at is None:
            found_at = check
    # check `changing` is the first with unchanged masks; `window` zero distances end at changing + window - 1
    assert found_at == changing + window - 1
    assert eb.ticket.found_at == {"check": changing + window - 1, "tick": changing + window, "by": "rule"}
    assert eb.distances()[changing - 1:] == [0.0] * (len(eb.distances()) - changing + 1)
    assert all(d > 0.1 for d in eb.distances()[: changing - 1])
    masks = current_masks(model)
    assert all(torch.equal(masks.tensors[k], eb.ticket.masks.tensors[k]) for k in masks.tensors)
    assert eb.ticket.sparsity() == pytest.approx(0.3, abs=1e-2)


@pytest.mark.parametrize("rule", ["relative", "absolute"])
def test_structured_ticket_found_window_checks_after_stop(rule):
    model = prepared("vit", "structured", ratio=0.5)
    eb = ebcompile.EarlyBird(model, rule=rule, window=3)
    fired = []
    for check in range(7):
        if check < 2:
            redraw(model, seed=check)
        fired.append(eb.step())
    # checks 0, 1 changed; checks 2, 3, 4 repeat check 1's masks -> found at check 4
    assert fired.index(True) == 4
    assert all(fired[4:])
    assert set(eb.ticket.masks.units) == {f"{g.kind}:{g.name}" for g in model._ebcompile.plan.groups}
    assert set(eb.history[-1]["distances"]) >= {"overall", "head", "neuron"}


def test_every_and_warmup_schedule(mlp):
    model = ebcompile.prepare(mlp, TINY["mlp"][1](), ratio=0.3)
    eb = ebcompile.EarlyBird(model, every=3, warmup=2, window=2)
    results = [eb.step() for _ in range(20)]
    # checks at ticks 5, 8, 11 (warmup 2, then every 3); 2 zero distances after the first check -> tick 11
    assert [r["tick"] for r in eb.history] == [5, 8, 11]
    assert results.index(True) == 10
    assert eb.ticket.found_at == {"check": 2, "tick": 11, "by": "rule"}
    assert eb.ticks == 20 and eb.checks == 3  # no more checks once found


@pytest.mark.parametrize("rule", ["relative", "absolute"])
@pytest.mark.parametrize("name,structure", [("mlp", "unstructured"), ("vit", "structured"), ("swin", "unstructured")])
def test_never_fires_when_weights_are_redrawn_every_check(rule, name, structure):
    model = prepared(name, structure, ratio=0.3)
    eb = ebcompile.EarlyBird(model, rule=rule)
    for check in range(30):
        for p in model.parameters():  # re-draw every weight with torch.nn.init
            nn.init.normal_(p)
        assert eb.step() is False, f"fired at check {check}: {eb.distances()}"
    assert eb.ticket is None and eb.checks == 30 and len(eb.distances()) == 29
    assert min(eb.distances()) > 0.1


def test_distance_matrix_matches_history(mlp):
    model = ebcompile.prepare(mlp, TINY["mlp"][1](), ratio=0.3)
    eb = ebcompile.EarlyBird(model, window=2)
    for check in range(4):
        redraw(model, seed=check % 2)  # alternate between two weight draws
        eb.step()
    m = eb.distance_matrix()
    assert m.shape == (4, 4) and np.allclose(m, m.T) and np.all(np.diag(m) == 0)
    assert m[0, 2] == 0 and m[1, 3] == 0 and m[0, 1] > 0
    assert [m[i, i + 1] for i in range(3)] == pytest.approx(eb.distances())


# -- resume ------------------------------------------------------------------------------------------------

SCALES = [0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001] + [0.0] * 10


def run(model: nn.Module, eb: ebcompile.EarlyBird, start: int, stop: int) -> int | None:
    """Deterministic updates + checks for steps start..stop-1; the step at which the ticket appeared."""
    for step in range(start, stop):
        perturb(model, step, SCALES[step])
        if eb.step():
            return step
    return None


def search_args() -> dict:
    return dict(ratio=0.3, threshold=0.1, rule="relative", window=3, rewind_at=0)


@pytest.mark.parametrize("how", ["state_dict", "file"])
@pytest.mark.parametrize("structure", ["unstructured", "structured"])
@pytest.mark.parametrize("when", ["early", "late"])
def test_resumed_search_finds_the_same_ticket(how, structure, when, tmp_path):
    name = "vit" if structure == "structured" else "mlp"
    reference = prepared(name, structure, ratio=0.3)
    eb = ebcompile.EarlyBird(reference, **search_args())
    found = run(reference, eb, 0, len(SCALES))
    assert found is not None and found > 4, eb.distances()
    ticket = eb.ticket

    # the interrupted run: stop mid-search (late: one step before the ticket, with the window part full),
    # save model + controller, resume in fresh objects
    stop = 3 if when == "early" else found
    first = prepared(name, structure, ratio=0.3)
    eb1 = ebcompile.EarlyBird(first, **search_args())
    assert run(first, eb1, 0, stop) is None
    model_state = first.state_dict()
    if how == "state_dict":
        saved = eb1.state_dict()
    else:
        eb1.save(tmp_path / "eb.safetensors")
    del eb1, first

    make, batch = TINY[name]
    torch.manual_seed(99)
    second = ebcompile.prepare(make(), batch(), structure=structure, ratio=0.3)
    second.load_state_dict(model_state)
    eb2 = ebcompile.EarlyBird(second, **search_args())
    if how == "state_dict":
        eb2.load_state_dict(saved)
    else:
        eb2.load(tmp_path / "eb.safetensors")
    assert eb2.ticks == stop and eb2.checks == stop
    assert run(second, eb2, stop, len(SCALES)) == found
    assert eb2.ticket.found_at == ticket.found_at
    assert eb2.distances() == eb.distances()
    for part in ("tensors", "units"):
        a, b = getattr(ticket.masks, part), getattr(eb2.ticket.masks, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(eb2.distance_matrix(), eb.distance_matrix())
    assert eb2.rewind_weights.keys() == eb.rewind_weights.keys()
    assert all(torch.equal(eb2.rewind_weights[k], eb.rewind_weights[k]) for k in eb.rewind_weights)


def test_saved_found_controller_round_trips(tmp_path):
    model = prepared("mlp", ratio=0.3)
    eb = ebcompile.EarlyBird(model, window=2)
    for _ in range(4):
        eb.step()
    assert eb.found
    eb.save(tmp_path / "eb.safetensors")
    again = ebcompile.EarlyBird(model, window=2)
    again.load(tmp_path / "eb.safetensors")
    assert again.found and again.ticket.found_at == eb.ticket.found_at
    assert all(torch.equal(again.ticket.masks.tensors[k], v) for k, v in eb.ticket.masks.tensors.items())
    assert again.step() is True


def test_load_ticket_reads_tickets_and_saved_searches(tmp_path):
    from ebcompile.errors import CheckpointError
    from ebcompile.search.controller import load_ticket

    model = prepared("mlp", ratio=0.3)
    eb = ebcompile.EarlyBird(model, window=2)
    eb.step()
    eb.save(tmp_path / "early.safetensors")
    with pytest.raises(CheckpointError, match="not found its ticket yet"):
        load_ticket(tmp_path / "early.safetensors")
    while not eb.step():
        pass
    (tmp_path / "ckpt").mkdir()
    eb.save(tmp_path / "ckpt" / "earlybird.safetensors")
    eb.ticket.save(tmp_path / "ticket.safetensors")
    for where in (tmp_path / "ckpt", tmp_path / "ckpt" / "earlybird.safetensors", tmp_path / "ticket.safetensors"):
        t = load_ticket(where)
        expected = (eb.ticket.ratio, eb.ticket.scope, eb.ticket.signature, eb.ticket.found_at)
        assert (t.ratio, t.scope, t.signature, t.found_at) == expected
        assert all(torch.equal(t.masks.tensors[k], v) for k, v in eb.ticket.masks.tensors.items())
    (tmp_path / "other.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="neither a saved ticket nor a saved early-bird search"):
        load_ticket(tmp_path / "other.safetensors")


def test_controller_state_from_another_model_is_refused():
    from ebcompile.errors import TicketMismatchError

    model = prepared("mlp", ratio=0.3)
    eb = ebcompile.EarlyBird(model, window=1)
    eb.step(), eb.step()
    other = ebcompile.prepare(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)), TINY["mlp"][1](),
                              prune_output_layer=True)
    with pytest.raises(TicketMismatchError, match="Fix:"):
        ebcompile.EarlyBird(other).load_state_dict(eb.state_dict())


@pytest.mark.parametrize("budget,deadline,tick", [(40, 0.15, 6), (40, 0.5, 20), (7, 0.01, 1), (10, 1.0, 10)])
def test_deadline_draws_the_ticket_when_the_rule_has_not_fired(budget, deadline, tick):
    model = prepared("mlp", ratio=0.3)
    eb = ebcompile.EarlyBird(model, every=3, budget=budget, deadline=deadline)
    for t in range(1, budget + 1):
        redraw(model, seed=t)  # masks change completely: the rule never fires
        if eb.step():
            break
    assert eb.found and t == tick and eb.ticket.found_at == {"check": eb.checks - 1, "tick": tick, "by": "deadline"}
    masks = current_masks(model)  # the ticket is the masks of the weights at the deadline
    assert all(torch.equal(eb.ticket.masks.tensors[k], v) for k, v in masks.tensors.items())
    again = ebcompile.EarlyBird(model)
    again.load_state_dict(eb.state_dict())
    assert (again.budget, again.deadline, again.ticket.found_at) == (budget, deadline, eb.ticket.found_at)


def test_rule_before_the_deadline_and_no_deadline_without_budget_or_with_none():
    model = prepared("mlp", ratio=0.3)
    eb = ebcompile.EarlyBird(model, window=2, budget=100, deadline=0.5)
    ticks = next(t for t in range(1, 100) if eb.step())  # weights never change: the rule fires at the third check
    assert ticks == 3 and eb.ticket.found_at["by"] == "rule"
    for kw in ({"budget": None}, {"budget": 10, "deadline": None}):
        eb = ebcompile.EarlyBird(model, **kw)
        for t in range(1, 21):
            redraw(model, seed=t)
            assert not eb.step()


@pytest.mark.parametrize("kw", [{"budget": 0}, {"budget": 2.5}, {"budget": True}, {"deadline": 0}, {"deadline": 1.5},
                                {"deadline": "15%"}, {"deadline": True}])
def test_bad_budget_or_deadline_is_a_config_error(kw):
    with pytest.raises(ebcompile.errors.ConfigError, match="budget|deadline"):
        ebcompile.EarlyBird(prepared("mlp", ratio=0.3), **kw)
