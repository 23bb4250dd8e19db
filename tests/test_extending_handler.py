"""docs/extending.md's op-handler example, run as written: an aten op the analysis does not follow (``flip``) stops
the heads; a handler registered from the user's own file lets them be found and cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ebcompile
from ebcompile.analysis import ophandlers


class FlippedHeads(nn.Module):
    """Self-attention whose queries have each head's channels reversed (``flip`` on the head_dim axis)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 64), nn.Linear(64, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = torch.nn.functional.scaled_dot_product_attention(q.flip(-1), k.flip(-1), v)
        x = x + self.o(out.transpose(1, 2).reshape(b, t, -1))
        return x + self.fc2(torch.relu(self.fc1(x)))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), FlippedHeads(), nn.Linear(32, 3)).eval()


def heads_found(model: nn.Module) -> int:
    x = torch.randn(2, 5, 8)
    plan = ebcompile.prepare(model, x, structure="structured", importance="magnitude")._ebcompile.plan
    return sum(g.kind == "head" for g in plan.groups)


@pytest.fixture
def no_flip_handler():
    """The registration stays in this test: ``flip`` has no handler before and after it."""
    assert "flip" not in ophandlers.HANDLERS
    yield
    ophandlers.HANDLERS.pop("flip", None)


def test_the_documented_handler_makes_the_heads_prunable(no_flip_handler):
    assert heads_found(net()) == 0  # flip reads the head features: left whole, plan.skipped says so

    # -- the example of docs/extending.md, "Adding an op handler" -------------------------------------------
    from ebcompile.analysis.labels import Labels
    from ebcompile.analysis.ophandlers import handler

    @handler("flip")
    def _flip(flow, node):
        """``flip(x, dims)``: every position keeps its labels, in reversed order along ``dims``."""
        lab = flow.lab(node.args[0])
        if not isinstance(lab, Labels):
            return None
        dims = [d % lab.ids.ndim for d in node.args[1]]
        return Labels(np.flip(lab.ids, dims).copy(), lab.param)
    # ---------------------------------------------------------------------------------------------------------

    model = net()
    assert heads_found(model) == 1
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small[1].q.out_features < 32
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
