"""No lost files: a save owns only the files its manifest lists, writes with the umask's modes, and every OS
failure on the way is a typed error with its fix, the earlier save left whole."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import ebcompile
import ebcompile.persist.io
from ebcompile.errors import EbcompileError, OutputPathError
from ebcompile.persist.savedir import MANIFEST, atomic_dir

from conftest import make_mlp, mlp_batch

ENOSPC = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def check(info: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(info.value)
    assert isinstance(info.value, EbcompileError) and "Fix:" in msg, msg
    assert all(w.lower() in msg.lower() for w in words), (words, msg)


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def other_mlp() -> torch.nn.Module:
    model = make_mlp()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    return model


# -- ownership ----------------------------------------------------------------------------------------------


def test_a_save_over_an_earlier_save_keeps_the_files_the_user_added(tmp_path):
    run = tmp_path / "run"
    ebcompile.save(make_mlp(), run)
    (run / "README.md").write_text("my notes")
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    ebcompile.save(other_mlp(), run)
    assert (run / "README.md").read_text() == "my notes" and (run / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert torch.equal(ebcompile.load(run, model=make_mlp())[0].weight, other_mlp()[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temp or backup left


def test_a_commit_removes_only_its_own_stale_files_and_never_replaces_anothers(tmp_path):
    run = tmp_path / "run"
    with atomic_dir(run, marker="a.txt") as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("1")
    (run / "c.txt").write_text("theirs")
    with atomic_dir(run, marker="a.txt") as tmp:  # writes a.txt only: its own sub/b.txt goes, their c.txt stays
        (tmp / "a.txt").write_text("2")
    assert files(run) == {"a.txt": b"2", "c.txt": b"theirs", MANIFEST: (run / MANIFEST).read_bytes()}
    before = files(run)
    with pytest.raises(OutputPathError) as info, atomic_dir(run, marker="a.txt") as tmp:
        (tmp / "a.txt").write_text("3")
        (tmp / "c.txt").write_text("would replace theirs")
    check(info, "c.txt", "not written by an ebcompile save")
    assert files(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_save_from_before_manifests_is_replaced_without_deleting_other_files(tmp_path):
    run = tmp_path / "run"
    ebcompile.save(make_mlp(), run)
    (run / MANIFEST).unlink()  # as saves written before manifests look
    (run / "notes.txt").write_text("keep")
    ebcompile.save(other_mlp(), run)
    assert (run / "notes.txt").read_text() == "keep" and (run / MANIFEST).is_file()
    assert torch.equal(ebcompile.load(run, model=make_mlp())[0].weight, other_mlp()[0].weight)


class _Tokenizer:
    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / "tokenizer.json").write_text("{}")


def test_the_search_model_folders_keep_a_users_notes(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from ebcompile.recipes.imageclf import Recipe, build_model, save_model
    from ebcompile.recipes.textclf import save_pretrained_atomically

    kw = {"image_size": 16, "patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}
    recipe = Recipe("torchvision:VisionTransformer", kw, 3, 3, [16, 16], ["a", "b", "c"])
    model = build_model(recipe.model, kw, 3)
    save_model(model, recipe, tmp_path / "image" / "model")  # image search --out/model
    bert = BertForSequenceClassification(BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16,
                                                    intermediate_size=32, vocab_size=32, max_position_embeddings=16))
    save_pretrained_atomically(bert, _Tokenizer(), tmp_path / "text" / "model")  # text search --out/model
    for kind, save in (("image", lambda: save_model(model, recipe, tmp_path / "image" / "model")),
                       ("text", lambda: save_pretrained_atomically(bert, _Tokenizer(), tmp_path / "text" / "model"))):
        (tmp_path / kind / "model" / "notes.txt").write_text("mine")
        save()
        assert (tmp_path / kind / "model" / "notes.txt").read_text() == "mine", kind
        assert sorted(p.name for p in (tmp_path / kind).iterdir()) == ["model"], kind


def test_the_image_search_command_keeps_a_users_notes_when_it_resumes(tmp_path, capsys):
    from test_cli_image import LATE, _png_folder

    from ebcompile.cli.main import main

    data = ["--data", str(_png_folder(tmp_path / "shapes")), "--batch", "8", *LATE]
    spec = ["torchvision:VisionTransformer", "--model-kwargs", '{"image_size": 16, "patch_size": 8, "num_layers": 1, '
            '"num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}']
    out = tmp_path / "search"
    main(["search", *spec, "--out", str(out), *data, "--epochs", "1"])
    (out / "model" / "notes.txt").write_text("mine")
    main(["search", *spec, "--out", str(out), *data, "--epochs", "2"])  # resumes, saves model/ again
    assert "resuming the search" in capsys.readouterr().out
    assert (out / "model" / "notes.txt").read_text() == "mine"


# -- file modes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_a_save_writes_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        ebcompile.save(make_mlp(), tmp_path / "run")
        ebcompile.save(other_mlp(), tmp_path / "run")  # the commit into an existing save too
        ebcompile.draw_ticket(ebcompile.prepare(make_mlp(), mlp_batch(), ratio=0.5)).save(tmp_path / "t.safetensors")
    finally:
        os.umask(old)
    for path in [tmp_path / "t.safetensors", *(tmp_path / "run").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o777 & ~umask


# -- typed OS errors ----------------------------------------------------------------------------------------


def test_a_full_disk_during_a_save_is_a_typed_error_and_the_earlier_save_stays(tmp_path, monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    ebcompile.save(make_mlp(), run)
    (run / "README.md").write_text("mine")
    before = files(run)

    def full(*args, **kwargs):
        raise SafetensorError(ENOSPC)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(ebcompile.persist.io, "save_file", full)
    with pytest.raises(OutputPathError) as info:
        ebcompile.save(other_mlp(), run)
    check(info, "no space left", "free disk space")
    with pytest.raises(OutputPathError) as info:
        ebcompile.draw_ticket(ebcompile.prepare(make_mlp(), mlp_batch(), ratio=0.5)).save(tmp_path / "t.safetensors")
    check(info, "no space left")
    assert files(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failure_in_the_middle_of_a_commit_rolls_back_to_the_earlier_save(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ebcompile.save(make_mlp(), run)
    (run / "README.md").write_text("mine")
    before, real = files(run), os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the second file of the commit: the disk fills up
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputPathError) as info:
        ebcompile.save(other_mlp(), run)
    check(info, "no space left")
    monkeypatch.undo()
    assert files(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_name_too_long_is_named_with_its_fix(tmp_path):
    with pytest.raises(OutputPathError) as info:
        ebcompile.save(make_mlp(), tmp_path / ("x" * 300))
    check(info, "too long", "shorter")
    assert list(tmp_path.iterdir()) == []


def test_a_kill_in_the_middle_of_a_commit_leaves_the_old_save_and_the_next_save_rolls_it_back(tmp_path):
    run = tmp_path / "run"
    ebcompile.save(make_mlp(), run)
    (run / "README.md").write_text("mine")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    backup = tmp_path / f".run.{dead}.abc.old"  # the commit's backup: hard links of the old save
    backup.mkdir()
    for name in ("model.safetensors", "ebcompile.json", MANIFEST):
        os.link(run / name, backup / name)
    (run / MANIFEST).unlink()  # killed after the manifest went, one new file moved in
    other = tmp_path / "other"
    ebcompile.save(other_mlp(), other)
    os.replace(other / "model.safetensors", run / "model.safetensors")
    x = mlp_batch()
    assert torch.equal(ebcompile.load(run, model=make_mlp())(x), make_mlp()(x))  # the old save, whole
    ebcompile.save(other_mlp(), run)  # rolls back, then commits
    assert torch.equal(ebcompile.load(run, model=make_mlp())(x), other_mlp()(x))
    assert (run / "README.md").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["other", "run"]


def test_a_tampered_manifest_cannot_make_a_save_delete_files_outside_its_folder(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside.txt"
    ebcompile.save(make_mlp(), run)
    outside.write_text("mine")
    (run / "link").symlink_to(tmp_path)
    (run / MANIFEST).write_text('{"files": ["../outside.txt", "link/outside.txt", "model.safetensors"]}')
    ebcompile.save(other_mlp(), run)  # read as a save from before manifests: only its own names are replaced
    assert outside.read_text() == "mine" and (run / "link").is_symlink()
    assert torch.equal(ebcompile.load(run, model=make_mlp())[0].weight, other_mlp()[0].weight)


def test_a_save_pretrained_folder_is_not_taken_for_an_earlier_save(tmp_path):
    """A compact model's ``save_pretrained`` writes transformers' files and an ``ebcompile.json`` beside them: that
    folder is the user's, and ``ebcompile.save`` refuses it instead of replacing its weights and config."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=1, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                                 vocab_size=64, max_position_embeddings=16)).eval()
    ids = torch.randint(0, 64, (1, 8))
    ebcompile.prepare(model, {"input_ids": ids}, ratio=0.5, structure="structured", importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None)
    small.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "ebcompile.json").is_file()
    before = files(tmp_path / "mine")
    with pytest.raises(OutputPathError) as info:
        ebcompile.save(other_mlp(), tmp_path / "mine")
    check(info, "not an ebcompile save")
    assert files(tmp_path / "mine") == before
