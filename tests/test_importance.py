"""Importance kinds (magnitude, taylor, activation, gate): every kind drives the same search, ticket, compaction,
export and save/load; data-aware kinds see what magnitude cannot; bad settings are refused before anything changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ebcompile
from ebcompile.errors import ConfigError, ImportanceDataError
from ebcompile.prepare import current_masks, tracker_of
from ebcompile.search.scoring import Importance

KINDS = ["magnitude", "taylor", "activation", "gate"]


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (4, 8), generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data, eb=None, kind: str = "magnitude") -> None:
    for ids, y in data:
        loss = model(input_ids=ids, labels=y).loss
        loss.backward()
        if kind == "gate":
            ebcompile.add_gate_penalty_grad(model, 1e-3)
        opt.step()
        opt.zero_grad()
        if eb is not None:
            eb.step()


def searched(kind: str, steps: int = 8):
    model = ebcompile.prepare(tiny_bert(), {"input_ids": batches(1)[0][0]}, ratio=0.5, importance=kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    eb = ebcompile.EarlyBird(model, every=2, window=2, deadline=None)
    train(model, opt, batches(steps), eb, kind)
    return model, opt, eb


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_compacts_exports_and_reloads(kind, tmp_path):
    model, opt, eb = searched(kind)
    assert eb.checks == 4 and len(eb.distances()) == 3
    ticket = eb.ticket or ebcompile.draw_ticket(model)
    ebcompile.apply_ticket(model, ticket)
    small = ebcompile.compact(model, round_to=None, optimizer=opt)
    assert not any("gate" in n for n, _ in small.named_parameters())  # gates folded into the weights
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in tiny_bert().parameters())
    model.eval()
    small.eval()
    for shape in [(3, 11), (1, 5)]:  # compact == masked on inputs of other shapes
        ids = torch.randint(0, 64, shape)
        torch.testing.assert_close(small(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    ids = torch.randint(0, 64, (2, 8))
    report = ebcompile.export_onnx(small, tmp_path / "m.onnx", {"input_ids": ids})
    assert report is not None
    ebcompile.save(small, tmp_path / "saved")
    loaded = ebcompile.load(tmp_path / "saved").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, small(input_ids=ids).logits)
    train(small, opt, batches(2))  # the carried optimizer keeps training the compact model


@pytest.mark.parametrize("kind", ["taylor", "activation", "gate"])
def test_resumed_search_finds_the_same_ticket(kind, tmp_path):
    """Saved mid-window (statistics of 1 step of a 2-step window), model + optimizer + search reloaded: same ticket."""
    data = batches(14)
    straight, opt, eb = searched(kind, steps=0)
    train(straight, opt, data, eb, kind)

    first, opt1, eb1 = searched(kind, steps=0)
    train(first, opt1, data[:5], eb1, kind)
    eb1.save(tmp_path / "eb.safetensors")
    weights = {k: v.clone() for k, v in first.state_dict().items()}
    opt_state = opt1.state_dict()

    resumed, opt2, eb2 = searched(kind, steps=0)
    resumed.load_state_dict(weights)
    opt2.load_state_dict(opt_state)
    eb2.load(tmp_path / "eb.safetensors")
    train(resumed, opt2, data[5:], eb2, kind)
    assert eb2.distances() == pytest.approx(eb.distances())
    for key, v in eb._previous.units.items():
        assert torch.equal(eb2._previous.units[key], v)


def dead_neuron_mlp(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """fc1 -> relu -> fc2 where the 4 neurons with the largest weights never fire (bias -100): magnitude keeps them,
    every data-aware kind sees that they do nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight[:4] *= 10
        model[2].weight[:, :4] *= 10
        model[0].bias[:4] = -100.0
    x = torch.randn(32, 8)
    return ebcompile.prepare(model, (x,), ratio=0.25, structure="structured", scope="layer", importance=kind), x


@pytest.mark.parametrize("kind", ["magnitude", "taylor", "activation"])
def test_data_aware_kinds_prune_dead_neurons(kind):
    """(Gates learn a unit's use for the task over many steps; a dead unit's gate only decays by the L1 term.)"""
    model, x = dead_neuron_mlp(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    keep = current_masks(model).units["neuron:0"]
    dead_kept = bool(keep[:4].all())
    assert dead_kept == (kind == "magnitude"), keep  # magnitude keeps the big dead neurons; the others drop them


def test_activation_works_with_frozen_weights():
    """LoRA-like: the weights never move; activation statistics still rank the units, taylor says it cannot."""
    model, x = dead_neuron_mlp("activation")
    for p in model.parameters():
        p.requires_grad_(False)
    model(x)
    assert not bool(current_masks(model).units["neuron:0"][:4].any())
    frozen, x = dead_neuron_mlp("taylor")
    for p in frozen.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    frozen(x)
    opt.step()
    with pytest.raises(ImportanceDataError, match="Fix: .*activation"):
        ebcompile.EarlyBird(frozen).check()


def second_ffn_frozen(width: int, ratio: float, scope: str) -> nn.Module:
    """Two FFNs (groups "0" and "4") prepared with taylor, the second frozen, after one optimizer step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, width), nn.ReLU(),
                          nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(32, 8)
    ebcompile.prepare(model, (x,), ratio=ratio, structure="structured", scope=scope, importance="taylor")
    for i in (4, 6):
        for p in model[i].parameters():
            p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model(x).pow(2).mean().backward()
    opt.step()
    return model


def test_taylor_ranks_units_without_gradients_by_magnitude_and_says_so():
    """An FFN the loss reaches with no gradient (frozen, or read only through a top-k choice: DeepSeek's sparse
    attention indexer) is ranked by magnitude with a warning; the FFNs that train still rank by |w * g|."""
    model = second_ffn_frozen(16, 0.25, "layer")
    tracker, groups = tracker_of(model), {g.name: g for g in model._ebcompile.plan.groups}
    with pytest.warns(UserWarning, match=r"no gradient for \d+ masked tensors.*magnitude"):
        tracker.begin_draw(fresh=False, sync=False)
    magnitude = Importance(model, model._ebcompile.plan, "structured")
    torch.testing.assert_close(tracker.unit_scores(groups["4"]), magnitude.unit_scores(groups["4"]))
    assert not torch.allclose(tracker.unit_scores(groups["0"]), magnitude.unit_scores(groups["0"]))
    tracker.end_draw(fresh=False)
    current_masks(model)  # the draw goes through


def test_taylor_ranks_a_gradient_less_layer_within_itself_in_a_global_ticket():
    """Magnitude and |w * g| are on different scales: the layer scored by magnitude loses its share (the layer
    quota), not all or none of its units to a global ranking against the other layer's Taylor scores."""
    model = second_ffn_frozen(64, 0.5, "global")
    with pytest.warns(UserWarning, match="within their layer"):
        masks = current_masks(model)
    assert int(masks.units["neuron:4"].sum()) == 32


def test_no_data_since_the_last_check_is_refused_before_anything_changes():
    model, x = dead_neuron_mlp("activation")
    eb = ebcompile.EarlyBird(model, every=1, window=2)
    model(x)
    eb.check()
    before = (eb.checks, list(eb.history))
    with pytest.raises(ImportanceDataError, match="forward pass.*Fix:"):
        eb.check()
    assert (eb.checks, eb.history) == before
    model(x)
    eb.check()  # a forward pass later it checks again
    assert eb.checks == 2

    model, x = dead_neuron_mlp("taylor")
    with pytest.raises(ImportanceDataError, match="gradient.*Fix:"):
        ebcompile.EarlyBird(model).check()  # no optimizer step yet


def test_bad_kinds_are_refused_before_the_model_changes():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    for kind, structure in [("fisher", "structured"), (3, "auto"), ("gate", "unstructured")]:
        with pytest.raises(ConfigError, match="Fix:"):
            ebcompile.prepare(model, (torch.randn(2, 4),), importance=kind, structure=structure)
        assert getattr(model, "_ebcompile", None) is None
        assert not any("parametrizations" in n for n, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="importance='gate'"):
        ebcompile.gate_penalty(ebcompile.prepare(model, (torch.randn(2, 4),), structure="structured"))


def test_gates_live_in_the_state_dict_and_fold_at_compact():
    model, x = dead_neuron_mlp("gate")
    state = model.state_dict()
    gate_keys = [k for k in state if "_gate." in k]
    assert gate_keys == ["2.weight_gate.0"]  # on the consumer side: the input columns of the linear after the neurons
    with torch.no_grad():
        for _, _, _, m in ebcompile.transforms.masks.iter_masks(model):
            for g in m.gates:
                g.mul_(torch.linspace(0.5, 1.5, g.numel()))
    want = model(x)
    other, _ = dead_neuron_mlp("gate")
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(x), want)
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None)
    torch.testing.assert_close(small(x), model(x))


def test_trainer_callback_adds_the_gate_penalty(tmp_path):
    from transformers import Trainer, TrainingArguments

    from ebcompile.integrations import EarlyBirdCallback

    def gate_sum(l1: float) -> float:
        model = ebcompile.prepare(tiny_bert(), {"input_ids": batches(1)[0][0]}, importance="gate")
        rows = [{"input_ids": ids[i], "labels": int(y[i])} for ids, y in batches(4) for i in range(4)]
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=0.1,
                                 use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, weight_decay=0.0,
                                 lr_scheduler_type="constant", optim="sgd", seed=0)
        callback = EarlyBirdCallback(every=1, window=2, gate_l1=l1, deadline=None)
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
        assert callback.earlybird.checks == 4
        return float(ebcompile.gate_penalty(model).detach())

    # 4 SGD steps at lr 0.1 with an L1 gradient of 0.5 pull every gate 0.2 further down
    units = sum(g.units for g in ebcompile.prepare(tiny_bert(), {"input_ids": batches(1)[0][0]})._ebcompile.plan.groups)
    assert gate_sum(0.0) - gate_sum(0.5) == pytest.approx(0.2 * units, rel=0.05)
    with pytest.raises(ConfigError, match="gate_l1"):
        EarlyBirdCallback(gate_l1=-1)


def test_data_statistics_settle_so_the_rule_can_fire_on_frozen_weights():
    """Statistics are cumulative: with frozen weights and batches from one distribution, the ranking's distance
    between checks falls as data accumulates (measured: first five checks 0.07, last five 0), and the relative rule
    fires; per-window statistics stay as noisy as one batch (0.14 -> 0.19) and never settle."""
    for window in (50, 3):  # 50: never fires, every distance is seen; 3: the default-style rule
        model = ebcompile.prepare(tiny_bert(), {"input_ids": batches(1)[0][0]}, ratio=0.5, importance="activation")
        for p in model.parameters():
            p.requires_grad_(False)
        eb = ebcompile.EarlyBird(model, every=1, window=window, deadline=None)
        with torch.no_grad():
            for ids, _ in batches(30, seed=3):
                model(input_ids=ids)
                eb.step()
        d = eb.distances()
        if window == 50:
            assert sum(d[-5:]) <= 0.5 * sum(d[:5]) and max(d) > 0, d
        else:
            assert eb.found and eb.ticket.found_at["by"] == "rule", d


def test_activation_says_which_weights_it_never_saw():
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj: those heads are ranked by magnitude,
    and the user is told once instead of getting silently weight-only scores."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = ebcompile.prepare(nn.Sequential(layer, nn.Linear(16, 2)), torch.randn(2, 5, 16), ratio=0.5, importance="activation")
    model(torch.randn(2, 5, 16))
    eb = ebcompile.EarlyBird(model, every=1, deadline=None)
    with pytest.warns(UserWarning, match="out_proj"):
        eb.step()
    model(torch.randn(2, 5, 16))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eb.step()  # said once
