"""Pass: RMS norms across units keep their divisor (``analysis.norm_folds``).

Invariant: for every fold of the plan whose norm lost channels (``N`` -> ``N'``), the compact model's producer rows
(and bias) are multiplied by ``c = sqrt(N'/N)`` and the norm's weight divided by ``c``: the compact norm's mean of
squares over ``N'`` channels equals the masked model's over ``N`` (whose pruned channels are zero), and its output
equals the masked norm's on every kept channel. Weights only: the forward, ``state_dict`` keys and configs are
unchanged, so save/load, ``save_pretrained`` and ONNX need nothing of their own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..names import tensor_at
from ..plan import Plan

__all__ = ["rescale_folded_norms"]


@torch.no_grad()
def rescale_folded_norms(model: nn.Module, plan: Plan) -> None:
    done: set[str] = set()
    for group in plan.groups:
        for producer, bias, norm_weight, width in group.folds:
            if norm_weight in done:
                continue
            done.add(norm_weight)
            kept = tensor_at(model, norm_weight).numel()
            if kept >= width:
                continue
            c = math.sqrt(kept / width)
            tensor_at(model, producer).mul_(c)
            if bias is not None:
                tensor_at(model, bias).mul_(c)
            tensor_at(model, norm_weight).div_(c)
