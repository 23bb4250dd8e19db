"""Loaders for the data the CLI, benches and tests read: MNIST IDX, MR polarity lines, image folders, torchvision names."""

from __future__ import annotations

import gzip
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, ConfigError

__all__ = ["read_idx", "load_mnist", "load_polarity", "ImageData", "load_images"]


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip or plain): big-endian magic, dimensions, then uint8 data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist. Fix: pass the path of an IDX file (e.g. t10k-images-idx3-ubyte.gz).")
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise CheckpointError(f"{path} is not an unsigned-byte IDX file. Fix: pass an MNIST-style IDX file.")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(folder: str | Path, train: int = 8000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST t10k as float images in [-1, 1], [N, 1, 28, 28]; the fixed split of ../shared/data (first ``train``)."""
    folder = Path(folder)
    x = torch.tensor(read_idx(folder / "t10k-images-idx3-ubyte.gz"), dtype=torch.float32).div(127.5).sub(1.0).unsqueeze(1)
    y = torch.tensor(read_idx(folder / "t10k-labels-idx1-ubyte.gz"), dtype=torch.long)
    return x[:train], y[:train], x[train:], y[train:]


def load_polarity(folder: str | Path, seed: int = 0, val_fraction: float = 0.1
                  ) -> tuple[list[str], list[int], list[str], list[int]]:
    """MR sentence polarity (Latin-1 lines), shuffled with ``seed``, split 90/10."""
    folder = Path(folder)
    rows = [(line.strip(), label) for label, name in ((1, "rt-polarity.pos"), (0, "rt-polarity.neg"))
            for line in (folder / name).read_text(encoding="latin-1").split("\n") if line.strip()]
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * (1 - val_fraction))
    tr, va = rows[:cut], rows[cut:]
    return [t for t, _ in tr], [y for _, y in tr], [t for t, _ in va], [y for _, y in va]


# -- image classification: an IDX folder, an image folder (one subfolder per class), or a torchvision name -------

IDX_IMAGES = re.compile(r"^(?P<prefix>.*?)[-_.]?images[-_.]idx3[-_.]ubyte(\.gz)?$")
IDX_LABELS = re.compile(r"^(?P<prefix>.*?)[-_.]?labels[-_.]idx1[-_.]ubyte(\.gz)?$")
SPLIT_NAMES = ("val", "validation", "test")
NAMED = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


@dataclass
class ImageData:
    """Images as uint8 ``[N, C, H, W]`` (C is 1 or 3, one size for all), integer labels, class names."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list[str]

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])


def looks_local(spec: str, hub_ids: bool = False) -> bool:
    """A path, not a name: it must exist, never be looked up online. ``hub_ids``: ``owner/name`` is a hub id
    (models and text data sets); otherwise any ``/`` makes a path (image data set names have none)."""
    if spec.startswith(("/", "./", "../", "~", ".\\")) or spec in (".", "..") or "\\" in spec:
        return True
    return spec.count("/") > (1 if hub_ids else 0)


def load_images(spec: str, seed: int = 0, val_fraction: float = 0.2) -> ImageData:
    """An image classification data set, validated (``ConfigError`` naming the problem and the fix).

    ``spec`` is a folder of MNIST-style IDX files (``<prefix>-images-idx3-ubyte[.gz]`` + ``<prefix>-labels-idx1-
    ubyte[.gz]``; with a ``train`` and a ``t10k``/``test`` pair, those are the splits), an image folder (one
    subfolder per class of PIL-readable images of one size, or ``train/`` + ``val/``|``test/`` folders of them), or
    one of ``NAMED`` (downloaded by torchvision into ``$EBCOMPILE_DATA`` or ``~/.cache/ebcompile``). A data set
    with one split is split per class, seeded: ``val_fraction`` of each class held out for validation.
    """
    folder = Path(spec).expanduser()
    if folder.is_dir():
        pairs = _idx_pairs(folder)
        data = _idx_data(spec, folder, pairs, seed, val_fraction) if pairs else _folder_data(spec, folder, seed, val_fraction)
    elif folder.exists():
        raise ConfigError(f"{spec} is a file. Fix: pass the folder holding the data (IDX files, or one subfolder per class).")
    elif looks_local(spec):
        raise ConfigError(f"{spec}: no such folder. Fix: check the path (a data set name such as cifar10 has no ./, ../, "
                          "/ or ~ in front).")
    elif spec.lower() in NAMED:
        data = _named(spec.lower())
    else:
        raise ConfigError(f"{spec} is neither a folder nor a known data set name. Fix: pass an IDX folder, an image folder "
                          f"(one subfolder per class) or one of {', '.join(NAMED)} (downloaded when online).")
    _check(spec, data)
    return data


def _check(spec: str, d: ImageData) -> None:
    if len(d.train_y) == 0 or len(d.val_y) == 0:
        which = "training" if len(d.train_y) == 0 else "validation"
        raise ConfigError(f"{spec}: the {which} split is empty. Fix: pass more images (at least 2 per class, so that "
                          "some are held out for validation).")
    if len(d.train_x) != len(d.train_y) or len(d.val_x) != len(d.val_y):
        raise ConfigError(f"{spec}: {len(d.train_x)} images but {len(d.train_y)} labels. Fix: pass matching image and "
                          "label files.")
    if d.train_x.dim() != 4 or d.channels not in (1, 3) or d.val_x.shape[1:] != d.train_x.shape[1:]:
        raise ConfigError(f"{spec}: images of shape {tuple(d.train_x.shape[1:])} and {tuple(d.val_x.shape[1:])}; "
                          "expected one size, 1 or 3 channels. Fix: pass grayscale or RGB images of one size.")
    present = torch.unique(d.train_y).tolist()
    if len(present) < 2:
        raise ConfigError(f"{spec}: every training image has class {d.classes[present[0]]!r}; a classifier needs two "
                          "classes at least. Fix: pass images of two classes or more.")


def _split(labels: torch.Tensor, seed: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, ``val_fraction`` (at least one when the class has two) held out; training order shuffled."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = 0 if len(idx) < 2 else max(1, round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    tr = torch.cat(train)
    return tr[torch.randperm(len(tr), generator=g)], torch.cat(val).sort().values


def _from_one(images: torch.Tensor, labels: torch.Tensor, classes: list[str], seed: int, val_fraction: float) -> ImageData:
    tr, va = _split(labels, seed, val_fraction)
    return ImageData(images[tr], labels[tr], images[va], labels[va], classes)


def _idx_pairs(folder: Path) -> dict[str, tuple[Path, Path | None]]:
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    labels = {m["prefix"]: folder / n for n in names if (m := IDX_LABELS.match(n))}
    return {m["prefix"]: (folder / n, labels.get(m["prefix"])) for n in names if (m := IDX_IMAGES.match(n))}


def _read_idx_pair(spec: str, images: Path, labels: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    if labels is None:
        raise ConfigError(f"{spec}: {images.name} has no labels file beside it. Fix: add the matching "
                          f"{images.name.replace('images', 'labels').replace('idx3', 'idx1')}.")
    try:
        x, y = read_idx(images), read_idx(labels)
    except (OSError, EOFError, ValueError, struct.error, CheckpointError) as exc:
        raise ConfigError(f"{spec}: cannot read {images.name} / {labels.name} ({type(exc).__name__}: {str(exc)[:120]}). "
                          "Fix: pass complete MNIST-style IDX files.") from exc
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    else:
        raise ConfigError(f"{spec}: {images.name} holds an array of shape {x.shape}, not images. Fix: pass an IDX file of "
                          "N x H x W (or N x H x W x C) pixels.")
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigError(f"{spec}: {len(x)} images in {images.name} but {len(y)} labels in {labels.name}. Fix: pass "
                          "matching image and label files.")
    return torch.from_numpy(np.array(x)), torch.from_numpy(y.astype(np.int64))


def _idx_data(spec: str, folder: Path, pairs: dict, seed: int, val_fraction: float) -> ImageData:
    read = {prefix: _read_idx_pair(spec, *files) for prefix, files in pairs.items()}
    if len(read) == 1:
        x, y = next(iter(read.values()))
        return _from_one(x, y, _number_names(y), seed, val_fraction)
    train = [p for p in read if "train" in p]
    val = [p for p in read if p not in train]
    if len(train) != 1 or len(val) != 1:
        raise ConfigError(f"{spec}: IDX pairs {sorted(read)}; expected one, or one train + one test pair. Fix: keep the "
                          "pairs of one data set in the folder.")
    (xtr, ytr), (xva, yva) = read[train[0]], read[val[0]]
    return ImageData(xtr, ytr, xva, yva, _number_names(torch.cat([ytr, yva])))


def _number_names(labels: torch.Tensor) -> list[str]:
    return [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]


def _image_files(folder: Path) -> list[Path]:
    from PIL import Image

    known = set(Image.registered_extensions())
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in known)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_data(spec: str, folder: Path, seed: int, val_fraction: float) -> ImageData:
    subs = {p.name.lower(): p for p in _class_folders(folder)}
    val_dir = next((subs[n] for n in SPLIT_NAMES if n in subs), None)
    if "train" in subs and val_dir is not None and _class_folders(subs["train"]):
        classes = [p.name for p in _class_folders(subs["train"])]
        (xtr, ytr), (xva, yva) = _read_classes(spec, subs["train"], classes), _read_classes(spec, val_dir, classes)
        if xtr.shape[1:] != xva.shape[1:]:
            raise ConfigError(f"{spec}: training images are {tuple(xtr.shape[1:])}, validation images "
                              f"{tuple(xva.shape[1:])}. Fix: give both splits images of one size and color mode.")
        return ImageData(xtr, ytr, xva, yva, classes)
    if _image_files(folder):
        raise ConfigError(f"{spec} holds images directly. Fix: put them in one subfolder per class ({spec}/<class>/*.png).")
    classes = [p.name for p in _class_folders(folder)]
    if not classes:
        raise ConfigError(f"{spec} has no IDX files and no class subfolders. Fix: pass an MNIST-style IDX folder or an "
                          "image folder with one subfolder of images per class.")
    x, y = _read_classes(spec, folder, classes)
    return _from_one(x, y, classes, seed, val_fraction)


def _read_classes(spec: str, folder: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``folder/<class>/``, decoded (unreadable files and mixed sizes refused); grayscale stays one
    channel unless some image has colour."""
    from PIL import Image
    from tqdm.auto import tqdm

    extra = sorted({p.name for p in _class_folders(folder)} - set(classes))
    if extra:
        raise ConfigError(f"{spec}: {folder.name}/ has class folders {extra} the training split lacks. Fix: give both "
                          "splits the same class folders.")
    files = [(f, c) for c, name in enumerate(classes) if (folder / name).is_dir() for f in _image_files(folder / name)]
    empty = [name for name in classes if (folder / name).is_dir() and not _image_files(folder / name)]
    if empty:
        raise ConfigError(f"{spec}: class folder {folder / empty[0]} holds no images. Fix: add images to it or remove it.")
    arrays, size = [], None
    for path, _ in tqdm(files, desc=f"reading {folder.name}", leave=False, disable=len(files) < 1000):
        try:
            with Image.open(path) as im:
                im.load()
                gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
                pixels = np.asarray(im.convert("L" if gray else "RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ConfigError(f"{spec}: cannot read {path} as an image ({type(exc).__name__}). Fix: remove or replace the "
                              "file.") from exc
        if size is None:
            size, first = pixels.shape[:2], path
        elif pixels.shape[:2] != size:
            raise ConfigError(f"{spec}: {path} is {pixels.shape[1]}x{pixels.shape[0]}, {first} is {size[1]}x{size[0]}. "
                              "Fix: resize the images to one size first (ebcompile then resizes all alike to the model's "
                              "input size).")
        arrays.append(pixels)
    if not arrays:
        raise ConfigError(f"{spec}: no images under {folder}. Fix: put images in one subfolder per class.")
    color = any(a.ndim == 3 for a in arrays)
    x = np.stack([(np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a) if color else a[..., None] for a in arrays])
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.tensor([c for _, c in files], dtype=torch.long)


def _named(name: str) -> ImageData:
    """A torchvision data set, downloaded once into ``$EBCOMPILE_DATA`` (default ``~/.cache/ebcompile``)."""
    import os

    import torchvision.datasets as tvd

    root = Path(os.environ.get("EBCOMPILE_DATA") or Path.home() / ".cache" / "ebcompile").expanduser()
    try:
        splits = [getattr(tvd, NAMED[name])(str(root), train=train, download=True) for train in (True, False)]
    except Exception as exc:  # noqa: BLE001 - offline, a partial download, a full disk
        raise ConfigError(f"{name}: cannot download it into {root} ({type(exc).__name__}: {str(exc)[:120]}). Fix: be online "
                          "once (it is kept there; set EBCOMPILE_DATA to keep it elsewhere), or pass a local IDX or image "
                          "folder.") from exc
    xs = []
    for ds in splits:
        x = np.asarray(ds.data, dtype=np.uint8)
        xs.append(torch.from_numpy(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2).copy()))
    ys = [torch.as_tensor(np.asarray(ds.targets), dtype=torch.long) for ds in splits]
    return ImageData(xs[0], ys[0], xs[1], ys[1], [str(c) for c in splits[0].classes])
