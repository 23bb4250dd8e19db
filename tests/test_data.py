"""Loaders for the real data in ../shared/data (skipped where it is missing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ebcompile.data import load_mnist, load_polarity, read_idx
from ebcompile.errors import CheckpointError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside this checkout")


@needs
def test_mnist_t10k_split_and_class_counts():
    xtr, ytr, xva, yva = load_mnist(DATA / "mnist-t10k")
    assert xtr.shape == (8000, 1, 28, 28) and xva.shape == (2000, 1, 28, 28)
    assert float(xtr.min()) == -1.0 and float(xtr.max()) == 1.0
    counts = torch.bincount(torch.cat([ytr, yva]), minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs
def test_polarity_lines_split_and_balance():
    xtr, ytr, xva, yva = load_polarity(DATA / "mr-polarity")
    assert len(xtr) + len(xva) == 10662 and len(xva) == 1067
    assert sum(ytr) + sum(yva) == 5331
    assert load_polarity(DATA / "mr-polarity")[0][:5] == xtr[:5]  # the fixed seed gives the same split


def test_read_idx_refuses_other_files(tmp_path):
    bad = tmp_path / "x.idx"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(CheckpointError, match="Fix:"):
        read_idx(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_idx(tmp_path / "missing.gz")
