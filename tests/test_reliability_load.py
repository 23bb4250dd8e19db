"""Trust on load: no code runs because a folder or a run's JSON names it, and untrusted files give typed errors.

Each test writes a file that would run code (a marker file appears) or break a plain reader (deep JSON, a
config that disagrees with its weights, an unreadable path) and checks the typed error with its fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ebcompile
from ebcompile.cli.main import main
from ebcompile.errors import CheckpointError, EbcompileError

from conftest import make_mlp

ROOT = Path(__file__).resolve().parents[1]
DEEP = "[" * 100_000 + "]" * 100_000
EVIL = "open({marker!r}, 'w').write('ran')\n"


def check(info: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(info.value)
    assert isinstance(info.value, EbcompileError) and "Fix:" in msg, msg
    assert all(w.lower() in msg.lower() for w in words), (words, msg)


def one_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Fix:" in lines[0] and all(w.lower() in lines[0].lower() for w in words), err


def tiny_bert(vocab: int = 64):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                                                    intermediate_size=64, vocab_size=vocab,
                                                    max_position_embeddings=32)).eval()


# -- custom code named by a model folder --------------------------------------------------------------------


def custom_code_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder, marker = tmp_path / "custom", tmp_path / "marker"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evilnet", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                     "AutoModelForSequenceClassification": "evil.EvilModel"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTok", None]}}))
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    return folder, marker


LOADERS = {
    "load": "import ebcompile; ebcompile.load({folder!r})",
    "classifier": "from ebcompile.recipes.textclf import load_classifier; load_classifier({folder!r})",
    "export": "import sys; from ebcompile.cli.main import main; sys.exit(main(['export', {folder!r}, {out!r}]))",
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_folder_naming_custom_code_never_runs_it_even_when_stdin_says_yes(tmp_path, loader):
    folder, marker = custom_code_folder(tmp_path)
    script = LOADERS[loader].format(folder=str(folder), out=str(tmp_path / "m.onnx"))
    if loader != "export":
        script = ("from ebcompile.errors import CheckpointError\ntry:\n    " + script.replace("; ", "\n    ") +
                  "\nexcept CheckpointError as exc:\n    print('typed:', exc)")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], input="y\ny\ny\n", capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert not marker.exists(), "the folder's code ran"
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr  # never asked
    if loader == "export":
        assert proc.returncode == 2, proc.stderr
        one_line(proc.stderr, "custom code")
    else:
        assert proc.returncode == 0 and "typed:" in proc.stdout and "Fix:" in proc.stdout, proc.stdout + proc.stderr


# -- weights only as pickles (pytorch_model.bin) ------------------------------------------------------------


def test_a_folder_whose_weights_are_only_pickles_is_refused_never_unpickled(tmp_path, monkeypatch, capsys):
    from ebcompile.recipes.textclf import load_classifier

    folder = tmp_path / "pickled"
    model = tiny_bert()
    model.save_pretrained(folder)  # then its weights as a pickle only, as older save_pretrained wrote them
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a) or {})  # must never be reached
    for load in (ebcompile.load, load_classifier):
        with pytest.raises(CheckpointError) as info:
            load(str(folder))
        check(info, "pickle", "safetensors")
    capsys.readouterr()
    assert main(["export", str(folder), str(tmp_path / "m.onnx")]) == 2
    one_line(capsys.readouterr().err, "pickle")
    assert not unpickled and not (tmp_path / "m.onnx").exists()


# -- a run folder's imageclf.json naming MODULE:FACTORY -----------------------------------------------------


VIT_KW = {"image_size": 16, "patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}


def image_run(tmp_path: Path, spec: str, kwargs: dict) -> Path:
    """A saved image model folder whose recipe names ``spec`` (written as a tampered file would be)."""
    from ebcompile.recipes.imageclf import Recipe, build_model, save_model

    folder = tmp_path / "run" / "model"
    model = build_model("torchvision:VisionTransformer", VIT_KW, 3)
    save_model(model, Recipe("torchvision:VisionTransformer", VIT_KW, 3, 3, [16, 16], ["a", "b", "c"]), folder)
    recipe = json.loads((folder / "imageclf.json").read_text())
    recipe.update(model=spec, kwargs=kwargs)
    (folder / "imageclf.json").write_text(json.dumps(recipe))
    return folder


@pytest.mark.parametrize("command", ["export", "compact", "retrain"])
@pytest.mark.parametrize("spec,kwargs", [("evilmod:make", {}), ("subprocess:getoutput", {"cmd": "touch marker"})])
def test_a_run_json_naming_a_factory_never_imports_it(tmp_path, monkeypatch, capsys, command, spec, kwargs):
    marker = tmp_path / "marker"
    (tmp_path / "evilmod.py").write_text(EVIL.format(marker=str(marker)) + "def make(**kw):\n    raise SystemExit\n")
    folder = image_run(tmp_path, spec, kwargs)
    monkeypatch.chdir(tmp_path)  # where a MODULE:FACTORY would be imported from
    argv = {"export": ["export", str(folder), "m.onnx"], "compact": ["compact", str(folder), "t.safetensors", "small"],
            "retrain": ["retrain", str(folder.parent), "--out", "r", "--data", str(tmp_path)]}[command]
    if command == "compact":
        ebcompile.draw_ticket(ebcompile.prepare(make_mlp(), torch.randn(2, 8), ratio=0.5)).save(tmp_path / "t.safetensors")
    if command == "retrain":
        for name in ("earlybird.safetensors", "optimizer.safetensors"):
            (folder / name).write_bytes(b"")
    assert main(argv) == 2
    one_line(capsys.readouterr().err, spec, "--factory")
    assert not marker.exists() and not (tmp_path / "m.onnx").exists() and not (tmp_path / "small").exists()


def test_an_explicit_factory_builds_the_run_and_recipe_kwargs_may_not_load_files(tmp_path, monkeypatch):
    from ebcompile.recipes.imageclf import Recipe, load_saved

    (tmp_path / "mine.py").write_text("from torchvision.models import VisionTransformer as make\n")
    folder = image_run(tmp_path, "mine:make", VIT_KW)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        Recipe.load(folder).build()
    check(info, "mine:make", "--factory")
    model, _ = load_saved(folder, factory="mine:make")  # named by the caller: trusted
    assert model.encoder.layers[0].self_attention.num_heads == 2
    recipe = json.loads((folder / "imageclf.json").read_text())
    recipe["kwargs"]["checkpoint_path"] = str(tmp_path / "pickled.pt")
    (folder / "imageclf.json").write_text(json.dumps(recipe))
    with pytest.raises(CheckpointError) as info:
        Recipe.load(folder)
    check(info, "checkpoint_path")


# -- JSON, configs and paths that would break a plain reader ------------------------------------------------


def test_deeply_nested_json_is_a_checkpoint_error_not_a_recursion_error(tmp_path, capsys):
    ebcompile.save(make_mlp(), tmp_path / "a")
    (tmp_path / "a" / "ebcompile.json").write_text(DEEP)
    with pytest.raises(CheckpointError) as info:
        ebcompile.load(tmp_path / "a", model=make_mlp())
    check(info, "nests deeper")
    ebcompile.save(tiny_bert(), tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text(DEEP)
    with pytest.raises(CheckpointError) as info:
        ebcompile.load(tmp_path / "b")
    check(info, "config.json", "nests deeper")
    folder = image_run(tmp_path, "torchvision:VisionTransformer", VIT_KW)
    (folder / "imageclf.json").write_text(DEEP)
    assert main(["export", str(folder), str(tmp_path / "m.onnx")]) == 2
    one_line(capsys.readouterr().err, "nests deeper")


@pytest.mark.parametrize("field,value,words", [
    ("vocab_size", 80, "word_embeddings"), ("vocab_size", 10**12, "word_embeddings"),
    ("hidden_size", 48, "shape"), ("num_hidden_layers", 3, "layer.2"), ("max_position_embeddings", 16, "position")])
def test_a_config_that_disagrees_with_the_weights_is_refused_before_allocating(tmp_path, field, value, words):
    model = tiny_bert()
    for kind in ("save", "save_pretrained"):
        folder = tmp_path / kind
        ebcompile.save(model, folder) if kind == "save" else model.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        config[field] = value
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError) as info:
            ebcompile.load(folder)
        check(info, "disagrees", words)


def test_a_config_wider_than_the_machine_is_refused_before_allocating(tmp_path):
    """A width larger than the saved one reads as compaction; one too large to build at all is refused up front."""
    model = tiny_bert()
    ebcompile.prepare(model, {"input_ids": torch.randint(0, 64, (1, 8))}, ratio=0.5, structure="structured",
                      importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    ebcompile.save(ebcompile.compact(model, round_to=None), tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    config["intermediate_size"] = 10**10
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        ebcompile.load(tmp_path / "s")
    check(info, "GiB", "config.json")


def test_a_config_that_agrees_still_loads_and_computes_the_same(tmp_path):
    model = tiny_bert()
    ebcompile.save(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    ids = torch.randint(0, 64, (2, 8))
    for folder in ("a", "b"):
        torch.testing.assert_close(ebcompile.load(tmp_path / folder)(input_ids=ids).logits, model(input_ids=ids).logits)


def test_an_unreadable_path_is_reported_as_such_not_as_missing(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError) as info:
        ebcompile.load(tmp_path / ("x" * 300), model=make_mlp())
    check(info, "too long", "shorter")
    ebcompile.save(make_mlp(), tmp_path / "run")
    meta, real_stat = tmp_path / "run" / "ebcompile.json", os.stat

    def stat(path, *args, **kwargs):  # as a file of another user under chmod 000 behaves (root reads anything)
        if isinstance(path, (str, os.PathLike)) and Path(path) == meta:
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(CheckpointError) as info:
        ebcompile.load(tmp_path / "run", model=make_mlp())
    check(info, "permission denied", "chmod")
    assert "does not exist" not in str(info.value)


def test_load_into_a_model_of_another_architecture_leaves_it_untouched(tmp_path):
    """``load(dir, model=...)`` rehearses the whole load on a meta copy first: a model that does not fit is refused
    with the model exactly as it was (before, 12 of its tensors had been cut when the strict load refused)."""
    from torchvision.models import VisionTransformer

    def vit(layers: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return VisionTransformer(image_size=16, patch_size=4, num_layers=layers, num_heads=4, hidden_dim=32,
                                 mlp_dim=64, num_classes=10).eval()

    model, x = vit(2), torch.randn(1, 3, 16, 16)
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    ebcompile.save(ebcompile.compact(model, round_to=None), tmp_path / "s")
    wrong = vit(3)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        ebcompile.load(tmp_path / "s", model=wrong)
    check(info, "saved architecture")
    after = wrong.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m).__name__ == "MultiheadAttention" for n, m in wrong.named_modules() if n.endswith("self_attention"))
    loaded = ebcompile.load(tmp_path / "s", model=vit(2))  # the right architecture still loads
    assert loaded(x).shape == (1, 10)


def test_a_fifo_in_place_of_ebcompile_json_is_refused_not_read(tmp_path):
    ebcompile.save(make_mlp(), tmp_path / "s")
    (tmp_path / "s" / "ebcompile.json").unlink()
    os.mkfifo(tmp_path / "s" / "ebcompile.json")  # a read would block forever
    with pytest.raises(CheckpointError) as info:
        ebcompile.load(tmp_path / "s", model=make_mlp())
    check(info, "not a regular file")
