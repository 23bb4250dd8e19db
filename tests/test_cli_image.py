"""``ebcompile search`` -> ``retrain`` -> ``export`` on images (a small ViT on a slice of MNIST t10k, and on an
image folder of PNGs through a user's ``module:factory``), resuming a saved search, and the bad-input paths."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ebcompile.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist-t10k"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data is not beside this checkout")
VIT = ["torchvision:VisionTransformer", "--model-kwargs",
       json.dumps({"image_size": 28, "patch_size": 7, "num_layers": 2, "num_heads": 4, "hidden_dim": 32, "mlp_dim": 64})]
FAST = ["--every", "2", "--window", "2", "--rule", "relative", "--threshold", "1.0", "--deadline", "none"]  # checks at 2, 4, 6: ticket at 6
LATE = ["--every", "2", "--rule", "absolute", "--threshold", "1e-9", "--deadline", "0.5"]  # the rule never fires: the deadline does
FACTORY = '''from torchvision.models import VisionTransformer


def make(num_classes, depth=1):
    return VisionTransformer(image_size=16, patch_size=4, num_layers=depth, num_heads=4, hidden_dim=32, mlp_dim=64,
                             num_classes=num_classes)
'''


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two fighting over the CI machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _png_folder(root: Path, sizes: dict[str, tuple[int, int]] | None = None, per_class: int = 10) -> Path:
    """Three classes of PIL-written PNGs (12x12; class 'gray' is grayscale, the others RGB), told apart by brightness."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, (name, mode) in enumerate((("dark", "RGB"), ("gray", "L"), ("light", "RGB"))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = (sizes or {}).get(f"{name}/{i}", (12, 12))
            pixels = np.clip(rng.normal(40 + 80 * c, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(root / name / f"{i}.png")
    return root


def _png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n"


@needs_mnist
def test_search_retrain_export_a_small_vit_on_mnist(tmp_path, capsys):
    import ebcompile
    from ebcompile.recipes.imageclf import Recipe

    search, small, onnx_path = tmp_path / "search", tmp_path / "small", tmp_path / "small.onnx"
    data = ["--data", str(MNIST), "--train-limit", "256", "--batch", "32"]
    assert main(["search", *VIT, "--out", str(search), *data, *FAST, "--epochs", "1"]) == 0
    assert "ticket found by the rule at step 6" in capsys.readouterr().out
    result = json.loads((search / "search.json").read_text())
    assert result["found"] and result["step"] == 6 and result["found_at"]["tick"] == 6 and len(result["distances"]) == 2
    assert _png((search / "search.png").read_bytes())
    ticket = ebcompile.Ticket.load(search / "ticket.safetensors")
    assert ticket.structure == "structured" and 0.2 < ticket.sparsity() < 0.4
    recipe = Recipe.load(search / "model")  # grayscale MNIST repeated to the ViT's 3 channels, 28x28 kept
    assert (recipe.channels, recipe.image_size, recipe.num_classes) == (3, [28, 28], 10)

    assert main(["search", *VIT, "--out", str(search), *data, *FAST, "--epochs", "1"]) == 0  # resumes: nothing to redo
    assert "resuming the search" in capsys.readouterr().out
    assert json.loads((search / "search.json").read_text())["found_at"] == result["found_at"]

    assert main(["retrain", str(search), "--out", str(small), *data, "--epochs", "1"]) == 0
    report = json.loads((small / "retrain.json").read_text())
    assert report["optimizer_state"] == "carried" and report["parameters"] < report["dense_parameters"]
    model = ebcompile.load(small / "model", model=Recipe.load(small / "model").build())
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]
    capsys.readouterr()
    assert main(["export", str(small / "model"), str(onnx_path), "--batch", "2"]) == 0
    assert "matches PyTorch" in capsys.readouterr().out

    import onnxruntime as ort

    from ebcompile.data import read_idx

    images = torch.from_numpy(read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[-5:].copy())[:, None]
    x = recipe.fit(images)  # real digits, batch 5: the batch axis is dynamic
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)


def test_image_folder_and_a_user_factory_search_retrain_export(tmp_path, monkeypatch, capsys):
    import ebcompile
    from ebcompile.recipes.imageclf import Recipe

    folder = _png_folder(tmp_path / "shapes")
    (tmp_path / "tinynet.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)  # MODULE:FACTORY is imported from the current directory
    search, small = tmp_path / "search", tmp_path / "small"
    data = ["--data", str(folder), "--batch", "8"]
    spec = ["tinynet:make", "--model-kwargs", '{"depth": 2}']
    assert main(["search", *spec, "--out", str(search), *data, *LATE, "--epochs", "4"]) == 0
    assert "ticket found by the deadline (--deadline) at step" in capsys.readouterr().out
    result = json.loads((search / "search.json").read_text())
    assert result["found_at"]["by"] == "deadline" and result["step"] == result["found_at"]["tick"]
    recipe = Recipe.load(search / "model")  # 12x12 PNGs resized to the model's 16x16; grayscale class made RGB
    assert (recipe.channels, recipe.image_size, recipe.classes) == (3, [16, 16], ["dark", "gray", "light"])
    assert _png((search / "search.png").read_bytes())

    trust = ["--factory", "tinynet:make"]  # a run's recipe naming MODULE:FACTORY is built only by a factory named here
    assert main(["retrain", str(search), "--out", str(small), *data, "--epochs", "1", "--mode", "rewind", *trust]) == 0
    report = json.loads((small / "retrain.json").read_text())
    assert report["optimizer_state"] == "fresh" and report["parameters"] < report["dense_parameters"]
    assert main(["export", str(small / "model"), str(tmp_path / "m.onnx"), *trust]) == 0
    assert "matches PyTorch" in capsys.readouterr().out
    model = ebcompile.load(small / "model", model=Recipe.load(small / "model").build(factory="tinynet:make"))
    heads = [layer.self_attention.num_heads for layer in model.encoder.layers]
    assert len(heads) == 2 and sum(heads) < 8

    other = _png_folder(tmp_path / "other")
    (other / "gray").rename(other / "grey")  # other class names: refused before any training
    assert main(["retrain", str(search), "--out", str(tmp_path / "r2"), "--data", str(other), *trust]) == 2
    assert "the search trained on" in capsys.readouterr().err and not (tmp_path / "r2").exists()


def test_image_data_layouts(tmp_path):
    from PIL import Image

    from ebcompile.data import load_images

    root = tmp_path / "idx"
    root.mkdir()
    for prefix, n in (("train", 12), ("t10k", 4)):  # MNIST's file names: the train pair trains, the t10k pair validates
        _idx(root / f"{prefix}-images-idx3-ubyte.gz", np.arange(n * 25).reshape(n, 5, 5) % 256)
        _idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 3)
    d = load_images(str(root))
    assert d.train_x.shape == (12, 1, 5, 5) and d.val_x.shape == (4, 1, 5, 5) and d.classes == ["0", "1", "2"]
    assert d.train_x[1, 0, 0, 0] == 25  # file order, pixels as stored

    for split, n in (("train", 4), ("val", 2)):  # train/ + val/ folders of grayscale class folders
        for c in ("a", "b"):
            (tmp_path / "f" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (6, 4), 50 * i).save(tmp_path / "f" / split / c / f"{i}.png")
    d = load_images(str(tmp_path / "f"))
    assert d.train_x.shape == (8, 1, 4, 6) and d.val_x.shape == (4, 1, 4, 6) and d.classes == ["a", "b"]

    d = load_images(str(_png_folder(tmp_path / "one")))  # one split: 20% of every class held out, seeded
    assert d.channels == 3 and d.size == (12, 12) and torch.bincount(d.val_y).tolist() == [2, 2, 2]
    assert torch.equal(load_images(str(tmp_path / "one")).train_y, d.train_y)


@needs_mnist
def test_a_resumed_search_draws_the_checks_of_an_uninterrupted_one(tmp_path, capsys):
    args = [*VIT, "--data", str(MNIST), "--train-limit", "96", "--batch", "32", "--every", "2", "--threshold", "1e-9",
            "--structure", "unstructured", "--deadline", "none"]
    assert main(["search", *args, "--epochs", "1", "--out", str(tmp_path / "a")]) == 1  # no ticket: the search is kept
    assert "no ticket within 3 steps" in capsys.readouterr().out
    assert main(["search", *args, "--epochs", "2", "--out", str(tmp_path / "a")]) == 1  # resumed at step 3
    assert "resuming the search saved in" in capsys.readouterr().out
    assert main(["search", *args, "--epochs", "2", "--out", str(tmp_path / "b")]) == 1  # in one go
    capsys.readouterr()
    a, b = (json.loads((tmp_path / x / "search.json").read_text()) for x in "ab")
    assert a["step"] == b["step"] == 6 and a["checks"] == b["checks"] == 3 and a["distances"] == b["distances"]

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}
    assert main(["search", *args, "--epochs", "3", "--ratio", "0.5", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (ratio=0.3)" in err[0] and "Fix:" in err[0]
    assert main(["retrain", str(tmp_path / "a"), "--out", str(tmp_path / "r"), "--data", str(MNIST)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no ticket" in err[0] and "Fix:" in err[0]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")} == before and not (tmp_path / "r").exists()


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _bad_data(tmp_path: Path, kind: str) -> str:
    root = tmp_path / kind
    if kind == "empty":
        root.mkdir()
    elif kind == "one-class":
        _png_folder(root)
        for name in ("gray", "light"):
            for f in (root / name).iterdir():
                f.unlink()
            (root / name).rmdir()
    elif kind == "unreadable":
        _png_folder(root)
        (root / "dark" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif kind == "sizes":
        _png_folder(root, sizes={"light/4": (14, 12)})
    elif kind == "ok":
        _png_folder(root)
    elif kind == "idx-counts":
        root.mkdir()
        _idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((6, 8, 8)))
        _idx(root / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 0, 1, 0]))
    else:
        return kind
    return str(root)


@pytest.mark.parametrize("data, extra, words", [
    ("empty", [], "no IDX files and no class subfolders"),
    ("one-class", [], "two classes at least"),
    ("unreadable", [], "cannot read"),
    ("sizes", [], "14x12"),
    ("idx-counts", [], "6 images"),
    ("./no-such-folder", [], "no such folder"),
    ("imagenet-21k", [], "neither a folder nor a known data set"),
    ("ok", ["--model-kwargs", "{bad json"], "not valid JSON"),
    ("ok", ["--model-kwargs", '{"num_classes": 3}'], "comes from the data"),
    ("ok", ["--image-size", "30"], "does not run on images of shape (3, 30, 30)"),
])
def test_bad_image_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, data, extra, words):
    out = tmp_path / "out"
    model = [VIT[0], *extra] if "--model-kwargs" in extra else [*VIT, *extra]
    argv = ["search", *model, "--data", _bad_data(tmp_path, data), "--out", str(out), "--epochs", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "Fix:" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("model, words", [
    ("torchvision:vit_b_17", "no classification model 'vit_b_17'"),
    ("no_such_module_here:make", "cannot import no_such_module_here"),
    ("timm:vit_tiny_patch16_224", "needs the timm package"),
])
def test_bad_image_model_is_one_line(tmp_path, capsys, monkeypatch, model, words):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    argv = ["search", model, "--data", str(_png_folder(tmp_path / "d")), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "Fix:" in err[0], err
    assert not (tmp_path / "out").exists()


def test_cifar10_offline_names_the_fix(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setenv("EBCOMPILE_DATA", str(tmp_path / "cache"))
    assert main(["search", *VIT, "--data", "cifar10", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot download it" in err and "Fix: be online once" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_bad_image_data_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ebcompile.cli.main", "search", *VIT, "--data", _bad_data(tmp_path, "sizes"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Fix:" in proc.stderr
