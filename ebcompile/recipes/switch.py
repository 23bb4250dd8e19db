"""The step from search to retraining, written once: apply the ticket, then train the model that makes it cheaper.

Invariant: the returned model computes what the masked ``model`` computes right after ``apply_ticket`` (a
structured ticket's compact model is checked by ``compact`` itself); a given optimizer then steps the
returned model's parameters, its state carried (sliced onto the compact weights). ``model`` is not trained.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..search.ticket import Ticket, apply_ticket
from ..transforms.shrink import compact

__all__ = ["take_ticket", "finished"]


def take_ticket(model: nn.Module, ticket: Ticket, *, mode: str = "continue", weights: dict[str, torch.Tensor] | None = None,
                seed: int | None = None, optimizer: torch.optim.Optimizer | None = None, round_to: Any = "auto") -> nn.Module:
    """``apply_ticket(model, ticket, mode, weights, seed)``, then the model to train on, in train mode.

    Structured: ``compact(model, optimizer=optimizer)``, a smaller dense model whose steps cost less (the
    optimizer, when given, moved onto it with its state sliced). Unstructured: ``model`` itself, its masks
    holding the pruned weights at zero through every step (``finished`` compacts it after training)."""
    apply_ticket(model, ticket, mode=mode, weights=weights, seed=seed)
    if ticket.structure == "structured":
        return compact(model, optimizer=optimizer, round_to=round_to).train()
    return model.train()


def finished(trained: nn.Module, masked: nn.Module) -> nn.Module:
    """The model to save after retraining: ``trained`` if ``take_ticket`` compacted it, else ``masked`` compacted."""
    return compact(masked) if trained is masked else trained
