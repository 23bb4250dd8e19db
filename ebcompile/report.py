"""Counts people compare: parameters, non-zero parameters, FLOPs (MACs) and bytes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .capture import normalize_inputs

__all__ = ["count_parameters", "count_macs"]


def count_parameters(model: nn.Module, nonzero: bool = False) -> int:
    """Parameters of ``model`` as stored (``nonzero=True``: the ones that are not exactly zero, masks applied)."""
    if not nonzero:
        return sum(p.numel() for p in model.parameters())
    return sum(int((v != 0).sum()) for k, v in model.state_dict().items() if not k.endswith("_mask") and v.is_floating_point())


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward on ``example_inputs`` (torch's FLOP counter / 2)."""
    args, kwargs = normalize_inputs(example_inputs)
    was_training = model.training
    model.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel is invisible to the counter
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model.train(was_training)
    return counter.get_total_flops() // 2
