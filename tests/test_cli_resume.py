"""A text ``ebcompile search`` killed and run again resumes from its safetensors checkpoint (never a pickle)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli import MR, TRAIN, needs_mr, tiny_classifier  # noqa: F401 - the fixture, imported for its name

from ebcompile.cli.main import main
from ebcompile.recipes import textclf

pytestmark = needs_mr
SEARCH = [*TRAIN, "--lr", "1e-3", "--epochs", "1", "--every", "2", "--threshold", "1e-9", "--deadline", "none", "--save-every", "4"]


def _killed_at(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next search dies right after its checkpoint at ``step`` is complete."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt("killed")

    made = textclf.trainer
    monkeypatch.setattr(textclf, "trainer", lambda *a, **k: made(*a[:5], [*a[5], Kill()], **k))


def test_a_killed_text_search_resumes_where_it_stopped(tiny_classifier, tmp_path, capsys, monkeypatch):  # noqa: F811
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["search", str(tiny_classifier), "--out", str(whole), *SEARCH]) == 1  # 12 steps, 6 checks, no ticket
    straight = json.loads((whole / "search.json").read_text())
    with monkeypatch.context() as m:
        _killed_at(8, m)
        assert main(["search", str(tiny_classifier), "--out", str(resumed), *SEARCH]) == 130  # interrupted
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert not (resumed / "search.json").exists()
    (resumed / "checkpoint-10").mkdir()  # as if killed while writing a later one: removed, never resumed from
    (resumed / "checkpoint-10" / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    assert main(["search", str(tiny_classifier), "--out", str(resumed), *SEARCH]) == 1
    assert "checkpoint-8 at step 8 (4 checks)" in capsys.readouterr().out
    again = json.loads((resumed / "search.json").read_text())
    assert not (resumed / "checkpoint-10").exists()
    assert again["step"] == straight["step"] == 12 and again["checks"] == straight["checks"] == 6
    torch.testing.assert_close(torch.tensor(again["distances"]), torch.tensor(straight["distances"]), rtol=1e-4, atol=1e-6)
    assert again["validation_accuracy"] == pytest.approx(straight["validation_accuracy"], abs=1e-9)
    a, b = (load_file(str(d / "checkpoint-12" / "model.safetensors")) for d in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)  # the same steps taken
    written = [p.name for p in resumed.rglob("*") if p.is_file()]
    assert not [n for n in written if n.endswith((".pt", ".pth", ".bin", ".pkl"))], written  # nothing pickled
    assert {"optimizer.safetensors", "scheduler.json", "rng_state.safetensors", "earlybird.safetensors",
            "progress.json", "training_args.json"} <= set(written)


def test_a_search_resumed_with_other_settings_is_refused(tiny_classifier, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "search"
    with monkeypatch.context() as m:
        _killed_at(4, m)
        assert main(["search", str(tiny_classifier), "--out", str(out), *SEARCH]) == 130
    before = sorted(str(p) for p in out.rglob("*"))
    assert main(["search", str(tiny_classifier), "--out", str(out), *SEARCH, "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "other settings (ratio=0.3)" in err and "Fix:" in err
    assert sorted(str(p) for p in out.rglob("*")) == before  # refused before anything was written


def test_a_found_ticket_is_not_searched_again(tiny_classifier, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "search"
    args = [*TRAIN, "--epochs", "2", "--every", "2", "--window", "2", "--rule", "relative", "--threshold", "1.0",
            "--deadline", "none", "--save-every", "4"]
    assert main(["search", str(tiny_classifier), "--out", str(out), *args]) == 0
    first = json.loads((out / "search.json").read_text())
    assert first["found"] and first["step"] == 6 and (out / "checkpoint-6" / "progress.json").is_file()
    capsys.readouterr()
    assert main(["search", str(tiny_classifier), "--out", str(out), *args, "--epochs", "3"]) == 0
    printed = capsys.readouterr().out
    assert "at step 6 (3 checks)" in printed and "ticket found by the rule at step 6" in printed
    again = json.loads((out / "search.json").read_text())
    assert again["found_at"] == first["found_at"] and again["step"] == 6
    assert again["validation_accuracy"] == pytest.approx(first["validation_accuracy"], abs=1e-9)
