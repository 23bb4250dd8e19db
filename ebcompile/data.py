"""Small loaders for the real data sets benches and tests read by path (MNIST IDX, MR polarity lines)."""

from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["read_idx", "load_mnist", "load_polarity"]


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
