"""Constant index lists in a forward (``h[..., [0, 2, 4]]``, ``h[:, [0, 2]]``), as ``torch.export`` lifts them:
the structure analysis follows the features through them, and a dimension indexed so keeps its size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ebcompile


class InterleavedGLU(nn.Module):
    """Gate and up interleaved in one projection, taken apart by constant index lists over the features."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return x + self.fc2(F.silu(h[..., list(range(0, h.shape[-1], 2))]) * h[..., list(range(1, h.shape[-1], 2))])


class PickTokens(nn.Module):
    """An FFN whose output keeps tokens 0 and 2 by a constant index list over the sequence."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x))[:, [0, 2]])


def _compact(block: nn.Module) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), block, nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 8)
    masked = ebcompile.prepare(net, x, ratio=0.5, structure="structured", capture_method="export")
    ebcompile.apply_ticket(masked, ebcompile.draw_ticket(masked))
    return masked, ebcompile.compact(masked, round_to=None), x


def test_features_indexed_by_a_constant_list_keep_their_width():
    masked, small, x = _compact(InterleavedGLU())
    assert small[1].fc1.out_features == 64 and small[1].fc2.in_features == 32  # the index lists are in the code
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)


def test_tokens_picked_by_a_constant_list_leave_the_ffn_prunable():
    masked, small, x = _compact(PickTokens())
    assert small[1].fc1.out_features < 32
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)
    other = torch.randn(3, 4, 8)  # another batch and sequence length
    torch.testing.assert_close(small(other), masked(other), rtol=1e-5, atol=1e-6)
