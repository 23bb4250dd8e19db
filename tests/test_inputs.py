"""Bad inputs the reliability catalogue named, beyond files and saves: each a typed error naming the fix, raised
before anything changes, or (weight_norm, get_extra_state) handled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ebcompile
from ebcompile.errors import ConfigError, DistributedError, NoPrunableLayerError

X = torch.randn(3, 4)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 2))


@pytest.mark.parametrize("call", ["prepare", "compact", "save", "snapshot"])
@pytest.mark.parametrize("model", ["bert-base-uncased", "./my-model", None, 3])
def test_a_model_that_is_not_a_module_is_a_config_error(call, model, tmp_path):
    fn = {"prepare": lambda: ebcompile.prepare(model, (X,)), "compact": lambda: ebcompile.compact(model),
          "save": lambda: ebcompile.save(model, tmp_path / "out"), "snapshot": lambda: ebcompile.snapshot(model)}[call]
    with pytest.raises(ConfigError, match="needs an nn.Module.*Fix: build or load the model first"):
        fn()
    assert list(tmp_path.iterdir()) == []


def test_include_and_exclude_take_one_pattern_or_a_list():
    one = ebcompile.prepare(mlp(), (X,), include="2")
    assert [n.tensor for n in ebcompile.mask_nodes(one)] == ["2.weight"]
    many = ebcompile.prepare(mlp(), (X,), exclude=("2",))
    assert [n.tensor for n in ebcompile.mask_nodes(many)] == ["0.weight"]
    for bad in (dict(include=3), dict(exclude=[1]), dict(prune_output_layer="yes")):
        model = mlp()
        with pytest.raises(ConfigError, match="Fix:"):
            ebcompile.prepare(model, (X,), **bad)
        assert not hasattr(model, "_ebcompile")


def test_compact_optimizer_must_be_an_optimizer():
    model = ebcompile.prepare(mlp(), (X,), ratio=0.5, structure="structured")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    with pytest.raises(ConfigError, match="torch.optim.Optimizer.*Fix:"):
        ebcompile.compact(model, optimizer="adam")


def test_prepare_refuses_a_wrapped_model_and_leaves_it_untouched():
    inner = mlp()
    wrapped = nn.DataParallel(inner)
    before = {k: v.clone() for k, v in inner.state_dict().items()}
    with pytest.raises(ConfigError, match="already wrapped.*Fix: call ebcompile.prepare on the plain model first"):
        ebcompile.prepare(wrapped, (X,))
    assert not hasattr(inner, "_ebcompile") and not any("parametrizations" in k for k in inner.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in inner.state_dict().items())


def test_old_style_weight_norm_linear_is_skipped_with_the_reason():
    model = mlp()
    model[0] = nn.utils.weight_norm(model[0])
    want = model(X)
    prepared = ebcompile.prepare(model, (X,), ratio=0.3)
    reason = prepared._ebcompile.plan.skipped["0"]
    assert "recomputed at every forward" in reason
    assert [n.tensor for n in ebcompile.mask_nodes(prepared)] == ["2.weight"]
    assert torch.equal(prepared(X), want)  # still the same function
    with pytest.raises(NoPrunableLayerError, match="Fix:"):
        ebcompile.prepare(nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 2)),
                          (X,), structure="structured")


def test_parametrized_weight_norm_linear_is_skipped_with_the_reason():
    model = mlp()
    model[2] = nn.utils.parametrizations.weight_norm(model[2])
    prepared = ebcompile.prepare(model, (X,), ratio=0.3)
    assert "parametrized" in prepared._ebcompile.plan.skipped["2"]
    assert [n.tensor for n in ebcompile.mask_nodes(prepared)] == ["0.weight"]


class WithExtraState(nn.Module):
    def __init__(self, extra: object = None) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 2)
        self.extra = extra if extra is not None else {"scale": 1.0, "tags": ["a"]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(torch.relu(self.fc1(x)))) * self.extra.get("scale", 1.0)

    def get_extra_state(self) -> object:
        return self.extra

    def set_extra_state(self, state: object) -> None:
        self.extra = state


def test_get_extra_state_round_trips_through_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = ebcompile.prepare(WithExtraState({"scale": 2.5, "tags": ["x", "y"]}), (X,), ratio=0.5, structure="structured")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model)
    ebcompile.save(small, tmp_path / "m")
    back = ebcompile.load(tmp_path / "m", model=WithExtraState())
    assert back.extra == {"scale": 2.5, "tags": ["x", "y"]}
    assert torch.allclose(back(X), small(X))


def test_extra_state_json_cannot_hold_is_refused_and_nothing_written(tmp_path):
    model = WithExtraState({"scale": 1.0, "fn": object()})
    with pytest.raises(ConfigError, match="JSON cannot hold.*Fix:"):
        ebcompile.save(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_compact_on_a_sharded_model_says_to_gather_first(monkeypatch):
    import ebcompile.transforms.shrink as shrink

    model = ebcompile.prepare(mlp(), (X,), ratio=0.5, structure="structured")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    monkeypatch.setattr(shrink, "is_sharded", lambda p: True)  # as FSDP2 DTensor parameters look
    with pytest.raises(DistributedError, match="sharded.*Fix: gather it first.*full_state_dict"):
        ebcompile.compact(model)


def test_report_errors_are_typed(tmp_path):
    from ebcompile.errors import CheckpointError, InputMismatchError

    with pytest.raises(InputMismatchError, match=r"\(2, 5\).*Fix: pass example_inputs"):
        ebcompile.report(mlp(), torch.randn(2, 5))
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"not onnx at all")
    with pytest.raises(CheckpointError, match="cannot be read as ONNX.*Fix:"):
        ebcompile.report(garbage)
    with pytest.raises(ConfigError, match="Fix:"):
        ebcompile.report(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("argv", [["export", "./no-such-model", "x.onnx"], ["bench", "../no-such-model"]])
def test_cli_local_looking_model_path_that_does_not_exist_is_one_line_exit_2(argv, capsys, tmp_path, monkeypatch):
    from ebcompile.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such folder" in err[0] and "Fix:" in err[0]
    assert list(tmp_path.iterdir()) == []


def _nan_model() -> nn.Sequential:
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("case", ["inputs", "nan", "not-a-module", "swapped", "onnxruntime"])
def test_export_errors_are_typed_and_leave_nothing(case, tmp_path, monkeypatch):
    from ebcompile.errors import ExportError, InputMismatchError
    from ebcompile.export import onnx as export_module

    target = tmp_path / "new" / "deeper" / "m.onnx"
    call = {
        "inputs": (InputMismatchError, lambda: ebcompile.export_onnx(mlp(), target, torch.randn(2, 5))),
        "nan": (ExportError, lambda: ebcompile.export_onnx(_nan_model(), target, X)),
        "not-a-module": (ConfigError, lambda: ebcompile.export_onnx("bert-base", target, X)),
        "swapped": (ConfigError, lambda: ebcompile.export_onnx(mlp(), (X,), target)),
        "onnxruntime": (ExportError, lambda: ebcompile.export_onnx(mlp(), target, X)),
    }
    if case == "onnxruntime":
        def broken(*args, **kwargs):
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation")
        monkeypatch.setattr(export_module, "run_onnxruntime", broken)
    error, fn = call[case]
    with pytest.raises(error, match="Fix:"):
        fn()
    assert list(tmp_path.iterdir()) == []  # no file, no folder created on the way


def test_ranks_that_disagree_change_nothing_and_sync_false_skips_the_check(monkeypatch):
    import ebcompile.search.controller as controller

    def disagree(what, data, fix):
        raise DistributedError(f"ranks disagree on {what}. {fix}")

    model = ebcompile.prepare(mlp(), (X,), ratio=0.5)
    eb = ebcompile.EarlyBird(model, window=1, every=1)
    eb.step()
    eb.step()
    before = (eb.checks, list(eb.distances()), eb.max_distance, list(eb._recent), len(eb.history))
    with torch.no_grad():
        model[0].weight.mul_(-1.5).add_(0.3)  # the masks move, so the check has something to record
    monkeypatch.setattr(controller, "check_same", disagree)
    monkeypatch.setattr(controller, "world", lambda: (0, 2))  # as if a second rank drew other masks
    with pytest.raises(DistributedError, match="Fix:.*sync=False"):
        eb.check()
    assert (eb.checks, list(eb.distances()), eb.max_distance, list(eb._recent), len(eb.history)) == before
    alone = ebcompile.EarlyBird(model, window=1, every=1, sync=False)
    alone.check()
    alone.check()  # no cross-rank check: nothing raised
    assert alone.checks == 2
    with pytest.raises(ConfigError, match="sync="):
        ebcompile.EarlyBird(model, sync="yes")


def test_save_and_export_of_a_wrapped_model_write_the_model_inside(tmp_path):
    model = ebcompile.prepare(mlp(), (X,), ratio=0.5, structure="structured")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    wrapped = nn.DataParallel(model)  # DistributedDataParallel is unwrapped the same way
    ebcompile.save(wrapped, tmp_path / "saved")
    back = ebcompile.load(tmp_path / "saved", model=mlp())
    assert torch.allclose(back(X), model(X), atol=1e-6)
    report = ebcompile.export_onnx(wrapped, tmp_path / "m.onnx", X)
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4


def test_fp16_export_whose_optimizer_fails_is_an_error_not_an_fp32_file(tmp_path, monkeypatch):
    from ebcompile.errors import ExportError
    from ebcompile.export import onnx as export_module

    def failing(path, net, fp16, notes):
        notes.append("optimizer skipped: RuntimeError: boom")
        return False

    monkeypatch.setattr(export_module, "optimize_file", failing)
    with pytest.raises(ExportError, match="optimizer failed.*Fix: export with optimize=False"):
        ebcompile.export_onnx(mlp(), tmp_path / "m.onnx", X, dtype="fp16", optimize=True)
    assert list(tmp_path.iterdir()) == []


def test_a_parametrization_added_after_prepare_still_runs():
    class Twice(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    model = ebcompile.prepare(mlp(), (X,), ratio=0.5)
    layer = model[0]
    nn.utils.parametrize.register_parametrization(layer, "weight", Twice())
    assert torch.equal(layer.weight, 2 * layer.parametrizations.weight.original)
