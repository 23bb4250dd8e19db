"""Bad input gets a typed ebcompile error that names the problem and a fix."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ebcompile
from ebcompile import errors
from ebcompile.errors import (
    CaptureError,
    CheckpointError,
    ConfigError,
    EbcompileError,
    InputMismatchError,
    InvalidRatioError,
    NoPrunableLayerError,
    NotPreparedError,
    TicketMismatchError,
)
from ebcompile.prepare import current_masks
from ebcompile.search.ticket import Ticket, signature_of

from conftest import TINY, make_mlp


def raises(exc: type[EbcompileError], *words: str):
    """pytest.raises for an ebcompile error whose message names the problem (words) and a fix."""
    assert issubclass(exc, EbcompileError)

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *args):
            handled = self.ctx.__exit__(*args)
            message = str(self.info.value)
            assert isinstance(self.info.value, EbcompileError)
            assert "Fix:" in message, message
            for word in words:
                assert word.lower() in message.lower(), (word, message)
            return handled

    return _Check()


def test_every_error_is_an_ebcompile_error():
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == errors.__name__:
            assert issubclass(obj, EbcompileError), name
    assert ebcompile.EbcompileError is EbcompileError


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, 0.0, 1.0, float("nan"), "0.3", None])
def test_ratio_outside_open_interval(ratio, mlp):
    with raises(InvalidRatioError, "ratio", "(0, 1)"):
        ebcompile.prepare(mlp, TINY["mlp"][1](), ratio=ratio)
    assert getattr(mlp, "_ebcompile", None) is None  # the model is left untouched
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in mlp.modules())


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5])
def test_ratio_outside_open_interval_in_controller_and_masks(ratio, mlp):
    model = ebcompile.prepare(mlp, TINY["mlp"][1]())
    with raises(InvalidRatioError, "ratio"):
        ebcompile.EarlyBird(model, ratio=ratio)
    with raises(InvalidRatioError, "ratio"):
        current_masks(model, ratio)


def test_conv_only_model_has_no_prunable_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with raises(NoPrunableLayerError, "no prunable linear", "Sequential"):
        ebcompile.prepare(model, torch.randn(1, 3, 8, 8))


def test_exclude_everything(mlp):
    with raises(NoPrunableLayerError, "no prunable linear", "include=/exclude="):
        ebcompile.prepare(mlp, TINY["mlp"][1](), exclude=["*"])
    assert getattr(mlp, "_ebcompile", None) is None


def test_only_the_output_layer_is_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with raises(NoPrunableLayerError, "prune_output_layer=True"):
        ebcompile.prepare(model, torch.randn(1, 3, 8, 8))
    ebcompile.prepare(model, torch.randn(1, 3, 8, 8), prune_output_layer=True)
    assert [n.tensor for n in ebcompile.mask_nodes(model)] == ["2.weight"]


def test_structured_without_groups():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))  # only "0" masked: no fc1 -> fc2 pair
    with raises(NoPrunableLayerError, "structure='unstructured'"):
        ebcompile.prepare(model, torch.randn(2, 4), structure="structured", include=["0"])


@pytest.mark.parametrize("bad", [torch.randn(2, 7), torch.randn(2, 16), {"y": torch.randn(2, 8)}, torch.randint(0, 5, (2, 8))])
def test_example_inputs_that_do_not_fit(bad, mlp):
    with raises(InputMismatchError, "example inputs", "do not run through", "Sequential"):
        ebcompile.prepare(mlp, bad)


def test_wrong_image_size_for_vit(vit):
    with raises(InputMismatchError, "VisionTransformer", "(1, 3, 32, 32)"):
        ebcompile.prepare(vit, torch.randn(1, 3, 32, 32))


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: symbolic_trace cannot branch on a Proxy and torch.export
    cannot guard on a data-dependent value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = self.fc(x)
        steps = int(abs(x.detach().numpy()).sum() * 1000) % 3 + 1  # numpy: not even real-tensor export sees it
        for _ in range(steps):
            x = torch.relu(x)
        return self.out(x)


def test_untraceable_model_raises_capture_error_naming_both_paths():
    model, x = DataDependent(), torch.randn(3, 4)
    model(x)  # it runs eagerly
    with pytest.raises(Exception):  # noqa: B017 - any failure: both capture paths must fail on this model
        torch.fx.symbolic_trace(model)
    with pytest.raises(Exception):  # noqa: B017
        torch.export.export(model, (x,), strict=False)
    with raises(CaptureError, "symbolic_trace", "export", "DataDependent") as info:
        ebcompile.prepare(model, x)
    message = str(info.value)
    assert message.index("symbolic_trace:") < message.index("export:")
    assert getattr(model, "_ebcompile", None) is None


def test_unknown_capture_method_and_options(mlp):
    x = TINY["mlp"][1]()
    with raises(ConfigError, "capture method"):
        ebcompile.prepare(mlp, x, capture_method="jit")
    with raises(ConfigError, "structure"):
        ebcompile.prepare(mlp, x, structure="blocks")
    with raises(ConfigError, "scope"):
        ebcompile.prepare(mlp, x, scope="model")
    model = ebcompile.prepare(mlp, x)
    with raises(ConfigError, "already prepared"):
        ebcompile.prepare(model, x)
    for kwargs, word in [({"window": 0}, "window"), ({"rule": "fuzzy"}, "rule"), ({"every": 0}, "every"),
                         ({"threshold": 0}, "threshold"), ({"every": "batch"}, "every")]:
        with raises(ConfigError, word):
            ebcompile.EarlyBird(model, **kwargs)


def test_unprepared_model(mlp):
    with raises(NotPreparedError, "ebcompile.prepare"):
        ebcompile.EarlyBird(mlp)
    with raises(NotPreparedError, "ebcompile.prepare"):
        ebcompile.mask_nodes(mlp)


def ticket_of(model: nn.Module) -> Ticket:
    return Ticket(current_masks(model), model._ebcompile.ratio, model._ebcompile.scope, signature_of(model))


def test_ticket_from_a_differently_shaped_model(mlp):
    x = TINY["mlp"][1]()
    model = ebcompile.prepare(mlp, x)
    wide = ebcompile.prepare(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)), x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with raises(TicketMismatchError, "another model", "different shapes", "0.weight"):
        ebcompile.apply_ticket(model, ticket_of(wide))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing applied
    assert not any(n.frozen for n in ebcompile.mask_nodes(model))


def test_ticket_from_another_architecture_or_structure():
    vit_make, vit_batch = TINY["vit"]
    swin_make, swin_batch = TINY["swin"]
    vit = ebcompile.prepare(vit_make(), vit_batch(), structure="unstructured")
    swin = ebcompile.prepare(swin_make(), swin_batch(), structure="unstructured")
    with raises(TicketMismatchError, "only in the ticket"):
        ebcompile.apply_ticket(swin, ticket_of(vit))
    structured = ebcompile.prepare(vit_make(), vit_batch(), structure="structured")
    with raises(TicketMismatchError, "structure"):
        ebcompile.apply_ticket(structured, ticket_of(vit))


def test_apply_ticket_bad_arguments(mlp):
    model = ebcompile.prepare(mlp, TINY["mlp"][1]())
    ticket = ticket_of(model)
    with raises(ConfigError, "mode"):
        ebcompile.apply_ticket(model, ticket, mode="restart")
    with raises(ConfigError, "weights="):
        ebcompile.apply_ticket(model, ticket, mode="rewind")
    with raises(TicketMismatchError, "Ticket"):
        ebcompile.apply_ticket(model, {"0.weight": torch.ones(16, 8, dtype=torch.bool)})
    with raises(TicketMismatchError, "snapshot"):
        ebcompile.apply_ticket(model, ticket, mode="rewind", weights={"nope.weight": torch.zeros(1)})
    with raises(NotPreparedError, "prepare"):
        ebcompile.apply_ticket(make_mlp(), ticket)


def test_ticket_load_on_foreign_files(tmp_path, mlp):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with raises(CheckpointError, "notes.txt", "not a safetensors file"):
        Ticket.load(text)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with raises(CheckpointError, "not an ebcompile ticket"):
        Ticket.load(foreign)
    torch_file = tmp_path / "model.pt"
    torch.save(make_mlp().state_dict(), torch_file)
    with raises(CheckpointError, "model.pt"):
        Ticket.load(torch_file)
    with raises(CheckpointError, "does not exist"):
        Ticket.load(tmp_path / "missing.safetensors")
    # a controller checkpoint is not a ticket, and a ticket is not a controller checkpoint
    model = ebcompile.prepare(mlp, TINY["mlp"][1]())
    eb = ebcompile.EarlyBird(model)
    eb.step()
    eb.save(tmp_path / "eb.safetensors")
    with raises(CheckpointError, "ebcompile-earlybird", "not an ebcompile ticket"):
        Ticket.load(tmp_path / "eb.safetensors")
    ticket_of(model).save(tmp_path / "t.safetensors")
    with raises(CheckpointError, "not an ebcompile earlybird"):
        ebcompile.EarlyBird(model).load(tmp_path / "t.safetensors")
