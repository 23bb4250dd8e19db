"""``analysis.routers.graph_top_k``: the experts each token is routed to, read from the captured graph's ``topk`` over
the expert dim when no attribute says it; a ``topk`` over another size (group-limited routing picks groups first,
as DeepSeek-V3 does) is passed over."""

from __future__ import annotations

import torch
from torch import nn

from ebcompile.analysis.routers import graph_top_k
from ebcompile.capture.graph import capture


class GroupLimited(nn.Module):
    """6 experts in 3 groups of 2: the best 2 groups first (a ``topk`` over 3), then the best 4 experts (over 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.gate(x).softmax(-1)
        groups = scores.reshape(-1, 3, 2).amax(-1).topk(2, dim=-1).indices  # over the groups
        keep = torch.zeros(x.shape[0], 3).scatter(1, groups, 1.0).repeat_interleave(2, dim=-1)
        masked = ((scores * keep + 0.0) * 1.0 - 0.0).clamp(min=0.0)  # the experts' choice lies deeper than the groups'
        weights, index = masked.topk(4, dim=-1)
        return weights.sum() + index.sum()


def test_the_topk_over_the_experts_gives_k():
    cap = capture(GroupLimited(), (torch.randn(5, 8),), "export")
    assert graph_top_k(cap.graph, cap.param_of, "gate.weight", experts=6) == 4
    assert graph_top_k(cap.graph, cap.param_of, "gate.weight", experts=5) is None  # no topk over 5 values
