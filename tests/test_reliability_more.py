"""Issue 21, last items: models on the meta device, non-tensor extra state, loads during a concurrent save.

- Every public entry point refuses a model whose weights are on the ``meta`` device with a ``ConfigError``
  naming the device and the fix, before anything changes.
- ``get_extra_state`` values that are not tensors travel as JSON, nested modules included.
- A reader loading a folder while another process saves into it again and again always gets one whole save.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import ebcompile
from ebcompile.errors import ConfigError

from conftest import make_mlp, mlp_batch

ROOT = Path(__file__).resolve().parents[1]


def meta_check(info: pytest.ExceptionInfo, what: str) -> None:
    msg = str(info.value)
    assert isinstance(info.value, ConfigError), msg
    assert what in msg and "meta device" in msg and "Fix:" in msg and "to_empty" in msg, msg


def on_meta() -> nn.Module:
    with torch.device("meta"):
        return make_mlp()


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- meta-device models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_on_meta", [False, True])
def test_prepare_refuses_a_meta_model(x_on_meta):
    model = on_meta()
    x = mlp_batch().to("meta") if x_on_meta else mlp_batch()  # meta inputs used to "prepare" a model with no values
    with pytest.raises(ConfigError) as info:
        ebcompile.prepare(model, (x,), ratio=0.5)
    meta_check(info, "prepare")
    assert getattr(model, "_ebcompile", None) is None


def test_save_compact_export_refuse_a_meta_model(tmp_path):
    with pytest.raises(ConfigError) as info:
        ebcompile.save(on_meta(), tmp_path / "m")
    meta_check(info, "save")
    with pytest.raises(ConfigError) as info:
        ebcompile.export_onnx(on_meta(), tmp_path / "m.onnx", (mlp_batch(),))
    meta_check(info, "export_onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_prepared_model_moved_to_meta_is_refused_everywhere(tmp_path):
    torch.manual_seed(0)
    model = ebcompile.prepare(make_mlp(), (mlp_batch(),), ratio=0.5, structure="structured")
    eb = ebcompile.EarlyBird(model, window=1)
    ticket = ebcompile.draw_ticket(model)
    model.to("meta")
    with pytest.raises(ConfigError) as info:
        eb.check()
    meta_check(info, "EarlyBird.check")
    assert eb.checks == 0 and eb.history == []
    with pytest.raises(ConfigError) as info:
        ebcompile.draw_ticket(model)
    meta_check(info, "draw_ticket")
    with pytest.raises(ConfigError) as info:
        ebcompile.apply_ticket(model, ticket)
    meta_check(info, "apply_ticket")
    with pytest.raises(ConfigError) as info:
        ebcompile.compact(model)
    meta_check(info, "compact")
    with pytest.raises(ConfigError) as info:
        ebcompile.save(model, tmp_path / "m")
    meta_check(info, "save")
    with pytest.raises(ConfigError) as info:
        ebcompile.export_onnx(model, tmp_path / "m.onnx", (mlp_batch(),))
    meta_check(info, "export_onnx")
    assert list(tmp_path.iterdir()) == []


def test_load_into_a_meta_model_is_refused(tmp_path):
    ebcompile.save(make_mlp(), tmp_path / "m")
    with pytest.raises(ConfigError) as info:
        ebcompile.load(tmp_path / "m", model=on_meta())
    meta_check(info, "load")
    model = on_meta().to_empty(device="cpu")  # the fix the message gives
    assert all(not p.is_meta for p in ebcompile.load(tmp_path / "m", model=model).parameters())


# -- get_extra_state that is not a tensor ------------------------------------------------------------------


class Tagged(nn.Module):
    def __init__(self, tag: object) -> None:
        super().__init__()
        self.fc, self.tag = nn.Linear(8, 8), tag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def get_extra_state(self) -> object:
        return self.tag

    def set_extra_state(self, state: object) -> None:
        self.tag = state


class Holder(nn.Module):
    def __init__(self, tag: object, inner: object) -> None:
        super().__init__()
        self.inner, self.fc2, self.head, self.tag = Tagged(inner), nn.Linear(8, 4), nn.Linear(4, 2), tag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.inner(x)))))

    get_extra_state, set_extra_state = Tagged.get_extra_state, Tagged.set_extra_state


@pytest.mark.parametrize("stage", ["plain", "masked", "compact"])
def test_nested_extra_state_survives_save_and_load(tmp_path, stage):
    model = Holder({"top": [1, 2]}, {"inner": "yes"})
    if stage != "plain":
        model = ebcompile.prepare(model, (mlp_batch(),), ratio=0.5, structure="structured")
        ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
        model = ebcompile.compact(model) if stage == "compact" else model
    ebcompile.save(model, tmp_path / "m")
    back = ebcompile.load(tmp_path / "m", model=Holder(None, None))
    assert (back.tag, back.inner.tag) == ({"top": [1, 2]}, {"inner": "yes"})


# -- loads while another process saves into the same folder ------------------------------------------------

SAVER = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{root!r}, {tests!r}]
    import ebcompile
    from test_reliability_more import Versioned
    stop, folder, ready, v = sys.argv[1], sys.argv[2], sys.argv[3], 2
    import os
    while not os.path.exists(stop):
        ebcompile.save(Versioned(v), folder)
        open(ready, "w").close()
        v = v % 7 + 1
""")


class Versioned(nn.Module):
    """Every weight holds ``version``, and so does its extra state (JSON beside the tensors)."""

    def __init__(self, version: int = 0) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.fill_(version)
        self.version = version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def get_extra_state(self) -> object:
        return {"version": self.version}

    def set_extra_state(self, state: object) -> None:
        self.version = state["version"]


def test_every_load_during_repeated_saves_gets_one_whole_save(tmp_path):
    folder, stop, ready = tmp_path / "m", tmp_path / "stop", tmp_path / "ready"
    ebcompile.save(Versioned(1), folder)
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    saver = subprocess.Popen([sys.executable, str(script), str(stop), str(folder), str(ready)], stderr=subprocess.PIPE, text=True)
    try:
        start = time.monotonic()
        while not ready.exists() and saver.poll() is None and time.monotonic() < start + 120:
            time.sleep(0.02)  # the saver's interpreter and torch import (slow on a loaded machine)
        deadline, seen, loads = time.monotonic() + 30, set(), 0
        while (loads < 200 or len(seen) < 2) and time.monotonic() < deadline:
            back = ebcompile.load(folder, model=Versioned())
            values = {float(v) for p in back.parameters() for v in p.detach().unique()}
            assert values == {float(back.version)} and 1 <= back.version <= 7, (values, back.version)
            seen.add(back.version)
            loads += 1
    finally:
        stop.touch()
        _, err = saver.communicate(timeout=30)
    assert saver.returncode == 0, err
    assert loads >= 50 and len(seen) > 1, (loads, seen)  # the loads really overlapped several saves
    assert sorted(os.listdir(tmp_path)) == ["m", "ready", "saver.py", "stop"]
