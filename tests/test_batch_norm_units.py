"""A batch norm between an FFN's two linears (LeViT's ``MLPLayerWithBN``): its channels stay independent units,
so the neurons are found, and the norm's weight, bias and running statistics (buffers) are cut with them."""
from __future__ import annotations

import torch
from torch import nn

import ebcompile


class BNMlp(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, tokens, dim]
        h = self.up(x)
        h = self.bn(h.flatten(0, 1)).reshape_as(h)
        return x + self.down(torch.nn.functional.gelu(h))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(BNMlp(), BNMlp())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))


def _trained_stats(model: nn.Module) -> None:
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(seed)))
    model.eval()


def test_batch_norm_channels_follow_the_neurons(tmp_path) -> None:
    torch.manual_seed(0)
    model = Net()
    _trained_stats(model)
    x = torch.randn(2, 5, 16)
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    neurons = [g for g in model._ebcompile.plan.groups if g.kind == "neuron"]
    assert len(neurons) == 2
    tensors = {m.tensor for g in neurons for m in g.members}
    assert {"blocks.0.bn.weight", "blocks.0.bn.bias", "blocks.0.bn.running_mean", "blocks.0.bn.running_var"} <= tensors
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    kept = small.blocks[0].up.out_features
    assert kept < 24 and small.blocks[0].bn.running_mean.shape == (kept,) and small.blocks[0].bn.weight.shape == (kept,)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.eval()(x))
    ebcompile.save(small, tmp_path / "s")
    back = ebcompile.load(tmp_path / "s", model=Net())
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x))
