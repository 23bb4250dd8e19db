"""``compact`` and ``prepare`` leave the user's model as they found it.

CvT's attention normalises its convolutional projections with a batch norm and reads its head width from an
attribute that is also the residual width, so compaction traces its forward and runs it once per mode to plan the
size rewrite. The train-mode run updated the batch norm's running statistics of the *masked* model, which then
differed from the compact one by 3e-3 (caught by compact's self-check, blamed on the attention). Checked here on a
block built the same way: running statistics, the random number generator's state (the train-mode run draws
dropout) and each module's own train/eval mode are unchanged by ``prepare`` and ``compact``, and the compact model
computes what the masked one does.
"""

from __future__ import annotations

import torch
from torch import nn

import ebcompile


class NormedAttention(nn.Module):
    """Batch-normed input, heads of ``x.size(-1) // heads`` (sizes from the residual width), dropout in training."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.heads_, self.drop = heads, nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = (f(x).view(B, T, self.heads_, C // self.heads_).transpose(1, 2) for f in (self.q, self.k, self.v))
        p = self.drop(torch.softmax(q @ k.transpose(-2, -1) / (C // self.heads_) ** 0.5, dim=-1))
        return self.o((p @ v).transpose(1, 2).reshape(B, T, C))


class Net(nn.Module):
    def __init__(self, dim: int = 24, heads: int = 4) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(6, dim), nn.Linear(dim, 3)
        self.blocks = nn.ModuleList([NormedAttention(dim, heads) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def test_compact_changes_no_running_statistics_rng_or_modes():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # running statistics away from their initial values, as a trained model's are
        model.train()(x)
    model.blocks[1].norm.eval()  # a user's frozen batch norm inside a model that trains
    model = ebcompile.prepare(model, x, ratio=0.5, structure="structured", scope="layer")
    assert model.training and not model.blocks[1].norm.training, "prepare flattened the modules' own modes"
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model, 0.5))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}

    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    small = ebcompile.compact(model, round_to=None)
    assert torch.equal(torch.random.get_rng_state(), rng), "compact drew from the user's random number generator"
    for k, v in model.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), f"compact changed the masked model's {k}"
    assert model.training and not model.blocks[1].norm.training, "compact flattened the modules' own modes"
    assert small.blocks[0].q.out_features < 24, "no head was cut: the test would not exercise the rewrite"

    model.eval(), small.eval()
    with torch.no_grad():
        for b, t in ((3, 5), (2, 9)):
            y = torch.randn(b, t, 6, generator=torch.Generator().manual_seed(b))
            torch.testing.assert_close(small(y), model(y), rtol=1e-5, atol=1e-6)
