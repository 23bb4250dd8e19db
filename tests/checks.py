"""Checks several test files share."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import ebcompile


def assert_reloads(small: nn.Module, fresh: nn.Module, x: torch.Tensor, folder: Path) -> nn.Module:
    """``ebcompile.save`` of the compact model, ``ebcompile.load`` into ``fresh`` (built like the original): the
    reloaded model computes what the compact one does. Returns it."""
    ebcompile.save(small, folder)
    back = ebcompile.load(folder, model=fresh)
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x))
    return back
