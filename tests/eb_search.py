"""A short EarlyBird search shared by the Hugging Face and zoo tests (tests/test_hf.py, tests/test_discovery.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import ebcompile

import zoo


def search(model: nn.Module, inputs: Any, steps: int = 3) -> ebcompile.Ticket:
    """A short EarlyBird search: one SGD step on a made-up loss between checks; the ticket appears at once."""
    eb = ebcompile.EarlyBird(model, window=2, threshold=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        zoo.main_output(zoo.call(model, inputs)).float().pow(2).mean().backward()
        opt.step()
        eb.step()
    model.eval()
    assert eb.found, eb.history
    return eb.ticket
