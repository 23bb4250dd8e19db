"""Faults and bad input: a typed error with its fix, raised before anything changes, and nothing left behind.

Every test checks the error type and the "Fix:" in its message, that the model (or controller, or earlier
file) is untouched, and that no temp file or folder is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ebcompile
from ebcompile.errors import (
    CheckpointError,
    ConfigError,
    EbcompileError,
    NonFiniteWeightsError,
    OutputPathError,
    TicketMismatchError,
)
from ebcompile.persist.io import atomic_path

from conftest import make_mlp, mlp_batch

ROOT = Path(__file__).resolve().parents[1]


def prepared(structure: str = "unstructured") -> torch.nn.Module:
    return ebcompile.prepare(make_mlp(), mlp_batch(), ratio=0.5, structure=structure)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def check(info: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(info.value)
    assert isinstance(info.value, EbcompileError) and "Fix:" in msg, msg
    assert all(w.lower() in msg.lower() for w in words), (words, msg)


# -- writes ------------------------------------------------------------------------------------------------


def test_writing_a_file_onto_a_directory_or_under_a_file_is_a_typed_error(tmp_path):
    model = prepared()
    ticket = ebcompile.draw_ticket(model)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    before = listing(tmp_path)
    with pytest.raises(OutputPathError) as info:
        ticket.save(tmp_path / "adir")
    check(info, "directory")
    with pytest.raises(OutputPathError) as info:
        ticket.save(tmp_path / "afile" / "sub" / "t.safetensors")
    check(info, "afile", "is a file")
    assert listing(tmp_path) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_writing_into_a_read_only_directory_is_a_typed_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputPathError) as info:
            ebcompile.draw_ticket(prepared()).save(ro / "new" / "t.safetensors")
        check(info, str(ro))
        assert listing(ro) == []
    finally:
        ro.chmod(0o755)


def test_a_failed_write_removes_its_temp_file_and_the_folders_it_created(tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed half way")
    assert listing(tmp_path) == []


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "t.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".t.safetensors.{int(dead.stdout)}.abc123.tmp"
    stale.write_bytes(b"\0" * 1000)
    ebcompile.draw_ticket(prepared()).save(target)
    assert listing(tmp_path) == ["t.safetensors"]


def kill_after(work: Callable[[], None], delay: float) -> None:
    """Fork a child that runs ``work`` (an endless loop of writes) and SIGKILL it ``delay`` seconds after it starts
    (mid-write). A fork of this warm process, not a fresh interpreter: the kill is the same, without importing torch."""
    ready, signal_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            os.close(ready)
            os.write(signal_end, b"r")
            work()
        finally:
            os._exit(1)
    os.close(signal_end)
    try:
        assert os.read(ready, 1) == b"r"
        time.sleep(delay)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready)


def _save_tickets_forever(ticket: ebcompile.Ticket, path: Path) -> None:
    i = 0
    while True:
        torch.manual_seed(i)
        ticket.save(path)
        i += 1


def test_sigkill_while_overwriting_a_ticket_leaves_a_loadable_ticket(tmp_path):
    path = tmp_path / "ticket.safetensors"
    model = prepared()
    ebcompile.draw_ticket(model).save(path)
    ticket = ebcompile.draw_ticket(model)
    for delay in (0.05, 0.2, 0.5):
        kill_after(lambda: _save_tickets_forever(ticket, path), delay)
        ebcompile.Ticket.load(path)  # the old or the new ticket, whole
    ebcompile.draw_ticket(model).save(path)  # the next write removes what the killed ones left
    assert listing(tmp_path) == ["ticket.safetensors"]


# -- tickets, snapshots, saved searches ----------------------------------------------------------------------


def _rewrite_header(src: Path, dst: Path, header: str | None) -> None:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if header is None:
        meta.pop("header")
    else:
        meta["header"] = header
    save_file(tensors, str(dst), metadata=meta)


@pytest.mark.parametrize("header", [None, "{not json", "[1, 2]", json.dumps({"ratio": 0.5}),
                                    json.dumps({"ratio": "0.5", "scope": "global", "signature": {}, "found_at": {},
                                                "structure": "unstructured", "kinds": {}})])
def test_a_ticket_with_a_broken_header_is_a_checkpoint_error(tmp_path, header):
    good = tmp_path / "good.safetensors"
    ebcompile.draw_ticket(prepared()).save(good)
    bad = tmp_path / "bad.safetensors"
    _rewrite_header(good, bad, header)
    with pytest.raises(CheckpointError) as info:
        ebcompile.Ticket.load(bad)
    check(info)


@pytest.mark.parametrize("structure", ["unstructured", "structured"])
def test_a_ticket_missing_a_mask_is_refused_before_any_weight_changes(structure):
    model = prepared(structure)
    ticket = ebcompile.draw_ticket(model)
    last = sorted(ticket.masks.tensors)[-1]  # applied last: a half-way failure would have changed the others
    del ticket.masks.tensors[last]
    before = weights(model)
    with pytest.raises(TicketMismatchError) as info:
        ebcompile.apply_ticket(model, ticket)
    check(info, last)
    assert same(weights(model), before)
    assert all(not n.frozen for n in ebcompile.mask_nodes(model))
    assert model._ebcompile.ticket is None


def test_rewind_weights_of_other_widths_are_refused_before_any_weight_changes():
    model = prepared()
    other = ebcompile.snapshot(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 32)))
    good = ebcompile.snapshot(model)
    rewind = {**good, "2.weight": other["2.weight"]}
    before = weights(model)
    for bad in (rewind, {**good, "0.weight": torch.full_like(good["0.weight"], float("nan"))}):
        with pytest.raises(TicketMismatchError) as info:
            ebcompile.apply_ticket(model, ebcompile.draw_ticket(model), mode="rewind", weights=bad)
        check(info)
        assert same(weights(model), before) and all(not n.frozen for n in ebcompile.mask_nodes(model))


def test_loading_another_models_search_leaves_the_controller_as_it_was(tmp_path):
    other = ebcompile.prepare(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)),
                              mlp_batch(), ratio=0.5)
    eb_other = ebcompile.EarlyBird(other, window=1)
    for _ in range(3):
        eb_other.step()
    eb_other.save(tmp_path / "other.safetensors")
    model = prepared()
    eb = ebcompile.EarlyBird(model, window=2)
    eb.step()
    eb.step()
    before = (eb.ticks, list(eb.history), eb.checks, eb.ticket)
    with pytest.raises(TicketMismatchError) as info:
        eb.load(tmp_path / "other.safetensors")
    check(info, "another model")
    assert (eb.ticks, list(eb.history), eb.checks, eb.ticket) == before


def test_a_search_file_with_broken_settings_is_refused(tmp_path):
    model = prepared()
    eb = ebcompile.EarlyBird(model)
    eb.step()
    state = eb.state_dict()
    state["config"]["window"] = -3
    with pytest.raises(CheckpointError) as info:
        ebcompile.EarlyBird(model).load_state_dict(state)
    check(info, "window")


def test_nan_weights_stop_the_search_instead_of_declaring_a_ticket():
    model = prepared()
    eb = ebcompile.EarlyBird(model, window=1, threshold=0.5)
    eb.step()
    with torch.no_grad():
        model[2].parametrizations.weight.original[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError) as info:
        eb.step()
    check(info, "2.weight", "NaN")
    assert not eb.found


@pytest.mark.parametrize("kwargs", [{"threshold": "0.1"}, {"threshold": float("nan")}, {"rewind_at": -1},
                                    {"rewind_at": 1.5}, {"criterion": 3}])
def test_controller_settings_of_the_wrong_type_are_config_errors(kwargs):
    with pytest.raises(ConfigError) as info:
        ebcompile.EarlyBird(prepared(), **kwargs)
    check(info, next(iter(kwargs)))


# -- the command line ---------------------------------------------------------------------------------------


def cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ebcompile.cli.main", *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_demo_onto_a_file_fails_at_once_with_one_line(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    proc = cli("demo", "--out", "out", "--epochs", "1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Fix:" in proc.stderr and "is a file" in proc.stderr
    assert (tmp_path / "out").read_text() == "not a folder"


def test_an_internal_error_is_one_line_saying_it_is_a_bug_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    from ebcompile.cli import inspect as inspect_cmd
    from ebcompile.cli import main as cli_main

    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(inspect_cmd, "run", boom)
    parser = cli_main.build_parser()
    args = parser.parse_args(["inspect", "x"]) if "inspect" in cli_main.SUBCOMMANDS else None
    assert args is not None
    monkeypatch.setattr(cli_main, "build_parser", lambda: _Fixed(parser, boom))
    assert cli_main.main(["inspect", "x"]) == 1
    with pytest.raises(ZeroDivisionError):
        cli_main.main(["--debug", "inspect", "x"])


class _Fixed:
    """A parser whose parsed command runs ``fn``."""

    def __init__(self, parser, fn) -> None:
        self.parser, self.fn = parser, fn

    def parse_args(self, argv):
        args = self.parser.parse_args(argv)
        args.run = self.fn
        return args


# -- export ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_dict", [True, False])
def test_gpt2_exports_without_an_attention_mask_and_keeps_the_terminal_quiet(tmp_path, capfd, as_dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=16, use_cache=False)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(2, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    report = ebcompile.export_onnx(model, tmp_path / "m.onnx", {"input_ids": ids} if as_dict else ids)
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4
    assert any("attention_mask" in n for n in report.notes)
    out, err = capfd.readouterr()
    assert len((out + err).splitlines()) < 20, (out + err)[:2000]
    assert listing(tmp_path) == ["m.onnx"]


def _mr(folder: Path, pos: str, neg: str) -> Path:
    folder.mkdir()
    (folder / "rt-polarity.pos").write_text(pos, encoding="latin-1")
    (folder / "rt-polarity.neg").write_text(neg, encoding="latin-1")
    return folder


@pytest.mark.parametrize("data,words", [
    ("empty", "empty"), ("one-class", "two classes"), ("./no-such-folder", "no such folder"),
    ("../../no/such/folder", "no such folder")])
def test_search_checks_its_data_before_training(tmp_path, data, words, monkeypatch, capsys):
    """In process (the shell's one-line contract is checked by the subprocess tests of test_reliability_cli.py)."""
    from ebcompile.cli.main import main

    if data == "empty":
        _mr(tmp_path / data, "", "\n\n")
    elif data == "one-class":
        _mr(tmp_path / data, "".join(f"good film {i}\n" for i in range(50)), "")
    monkeypatch.chdir(tmp_path)
    rc = main(["search", "./no-model-needed-first", "--data", data, "--out", "run"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Fix:" in err and words in err, err
    assert not (tmp_path / "run").exists()


# -- whole save directories ------------------------------------------------------------------------------------


def test_save_refuses_a_directory_of_other_files_and_replaces_an_earlier_save(tmp_path):
    model = make_mlp()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(OutputPathError) as info:
        ebcompile.save(model, theirs)
    check(info, "not an ebcompile save")
    assert listing(theirs) == ["notes.txt"]
    ebcompile.save(model, tmp_path / "run")
    other = make_mlp()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    ebcompile.save(other, tmp_path / "run")
    assert torch.equal(ebcompile.load(tmp_path / "run", model=make_mlp())[0].weight, other[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "theirs"]


def test_a_kill_between_the_two_renames_of_a_swap_leaves_the_old_save_loadable(tmp_path):
    model = make_mlp()
    ebcompile.save(model, tmp_path / "run")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    (tmp_path / "run").rename(tmp_path / f".run.{dead}.old")  # the swapped-out save, the new one not yet in place
    (tmp_path / f".run.{dead}.x1.tmpdir").mkdir()
    x = mlp_batch()
    assert torch.equal(ebcompile.load(tmp_path / "run", model=make_mlp())(x), model(x))
    ebcompile.save(model, tmp_path / "run")  # recovers, then replaces; leftovers removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _save_models_forever(path: Path) -> None:
    model, i = make_mlp(), 0
    while True:
        with torch.no_grad():
            model[0].weight.fill_(float(i % 7))
        ebcompile.save(model, path)
        i += 1


def test_sigkill_while_overwriting_a_save_directory_leaves_a_loadable_save(tmp_path):
    path = tmp_path / "run"
    ebcompile.save(make_mlp(), path)
    for delay in (0.05, 0.3, 0.8):
        kill_after(lambda: _save_models_forever(path), delay)
        loaded = ebcompile.load(path, model=make_mlp())  # the old or the new save, whole
        assert loaded[0].weight.unique().numel() in (1, make_mlp()[0].weight.numel())
    ebcompile.save(make_mlp(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("size", [-1, 1.5, "4", True])
def test_a_bad_size_in_ebcompile_json_is_a_checkpoint_error(tmp_path, size):
    ebcompile.save(make_mlp(), tmp_path / "run")
    meta_path = tmp_path / "run" / "ebcompile.json"
    meta = json.loads(meta_path.read_text())
    meta["shapes"]["0.weight"] = [size, 8]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as info:
        ebcompile.load(tmp_path / "run", model=make_mlp())
    check(info, "0.weight")
