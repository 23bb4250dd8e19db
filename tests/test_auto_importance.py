"""importance="auto" (prepare's default): taylor when the masked weights train, activation when they are frozen (LoRA),
magnitude when no training was seen; chosen at the first check, kept, saved and resumed as the kind chosen."""

from __future__ import annotations

import pytest
import torch
from test_importance import batches, dead_neuron_mlp, tiny_bert, train
from torch import nn

import ebcompile
from ebcompile.prepare import config_of, current_masks, tracker_of
from ebcompile.search.controller import saved_importance
from ebcompile.search.scoring import _TAYLOR


def auto_bert(frozen: bool = False):
    model = ebcompile.prepare(tiny_bert(), {"input_ids": batches(1)[0][0]}, ratio=0.5)
    assert config_of(model).importance == "auto"
    if frozen:  # LoRA-like: the masked weights never get gradients; only the classifier trains
        for name, p in model.named_parameters():
            p.requires_grad_("classifier" in name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


@pytest.mark.parametrize(("frozen", "kind"), [(False, "taylor"), (True, "activation")])
def test_first_check_chooses_the_kind_the_loop_feeds(frozen, kind):
    model, opt = auto_bert(frozen)
    eb = ebcompile.EarlyBird(model, every=2, window=2, deadline=None)
    train(model, opt, batches(6), eb)
    assert config_of(model).importance == kind and tracker_of(model).kind == kind
    assert eb.checks == 3 and len(eb.distances()) == 2
    reading_gradients = [t for t in _TAYLOR if t._model() is model]  # the taylor candidate's hook is gone unless chosen
    assert reading_gradients == ([tracker_of(model)] if kind == "taylor" else [])
    ebcompile.apply_ticket(model, eb.ticket or ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None)
    ids = torch.randint(0, 64, (3, 7))
    torch.testing.assert_close(small.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_the_chosen_kind_ranks_like_that_kind_prepared_by_name():
    """auto's taylor masks equal those of a model prepared with importance='taylor' on the same training."""
    masks = {}
    for kind in ("auto", "taylor"):
        model = ebcompile.prepare(tiny_bert(), {"input_ids": batches(1)[0][0]}, ratio=0.5, importance=kind)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        eb = ebcompile.EarlyBird(model, every=2, window=2, deadline=None)
        train(model, opt, batches(6), eb)
        masks[kind] = eb._previous.units
    assert masks["auto"].keys() == masks["taylor"].keys()
    assert all(torch.equal(masks["auto"][k], masks["taylor"][k]) for k in masks["taylor"])


def test_no_training_seen_ranks_by_magnitude_and_says_so():
    model, x = dead_neuron_mlp("auto")
    assert bool(current_masks(model).units["neuron:0"][:4].all())  # a draw that is no check chooses nothing
    assert config_of(model).importance == "auto"
    with pytest.warns(UserWarning, match="ranks by magnitude"):
        ebcompile.EarlyBird(model).check()
    assert config_of(model).importance == "magnitude"


def test_forward_passes_only_choose_activation_which_sees_dead_neurons():
    model, x = dead_neuron_mlp("auto")
    model(x)
    assert not bool(current_masks(model).units["neuron:0"][:4].any())  # best so far: activation
    ebcompile.EarlyBird(model).check()
    assert config_of(model).importance == "activation"


@pytest.mark.parametrize("save_after", [1, 5])
def test_resume_before_and_after_the_choice_finds_the_same_ticket(save_after, tmp_path):
    data = batches(12)
    straight, opt = auto_bert()
    eb = ebcompile.EarlyBird(straight, every=2, window=2, deadline=None)
    train(straight, opt, data, eb)

    first, opt1 = auto_bert()
    eb1 = ebcompile.EarlyBird(first, every=2, window=2, deadline=None)
    train(first, opt1, data[:save_after], eb1)
    eb1.save(tmp_path / "eb.safetensors")
    assert saved_importance(tmp_path / "eb.safetensors") == ("auto" if save_after < 2 else "taylor")
    weights, opt_state = {k: v.clone() for k, v in first.state_dict().items()}, opt1.state_dict()

    resumed, opt2 = auto_bert()
    resumed.load_state_dict(weights)
    opt2.load_state_dict(opt_state)
    eb2 = ebcompile.EarlyBird(resumed, every=2, window=2, deadline=None)
    eb2.load(tmp_path / "eb.safetensors")
    train(resumed, opt2, data[save_after:], eb2)
    assert config_of(resumed).importance == "taylor"
    assert eb2.distances() == pytest.approx(eb.distances())
    for key, v in eb._previous.units.items():
        assert torch.equal(eb2._previous.units[key], v)


def test_a_search_of_another_kind_does_not_load_into_auto(tmp_path):
    model, opt = auto_bert()
    eb = ebcompile.EarlyBird(model, every=2, window=2, deadline=None)
    train(model, opt, batches(4), eb)  # chose taylor
    eb.save(tmp_path / "eb.safetensors")
    gated = ebcompile.prepare(tiny_bert(), {"input_ids": batches(1)[0][0]}, ratio=0.5, importance="gate")
    with pytest.raises(ebcompile.errors.TicketMismatchError, match="Fix:"):
        ebcompile.EarlyBird(gated).load(tmp_path / "eb.safetensors")
    frozen, _ = auto_bert(frozen=True)
    eb3 = ebcompile.EarlyBird(frozen, every=2, window=2, deadline=None)
    eb3.load(tmp_path / "eb.safetensors")  # auto adopts the saved kind
    assert config_of(frozen).importance == "taylor"


def test_fused_experts_choose_like_any_model():
    """Fused 3-D experts are scored by every kind: trained, auto chooses taylor; only run forward, activation."""
    from test_moe import build, text_batch, train

    inputs = text_batch()
    model = ebcompile.prepare(build("mixtral"), inputs, ratio=0.3, structure="structured")
    assert set(tracker_of(model).candidates) == {"taylor", "activation", "magnitude"}
    train(model, "taylor")
    ebcompile.EarlyBird(model).check()
    assert config_of(model).importance == "taylor"
    frozen = ebcompile.prepare(build("mixtral"), inputs, ratio=0.3, structure="structured")
    with torch.no_grad():
        frozen(**inputs)
    ebcompile.EarlyBird(frozen).check()
    assert config_of(frozen).importance == "activation"


def test_unknown_kind_names_auto():
    with pytest.raises(ebcompile.errors.ConfigError, match="'auto'"):
        ebcompile.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(2, 4),), importance="best")
