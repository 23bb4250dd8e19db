"""Optimizer state as safetensors + JSON, matched by parameter name; nothing is ever pickled.

Invariant: ``load_optimizer`` either restores the whole state saved by ``save_optimizer`` for the same optimizer
class over the same named parameters, or raises ``CheckpointError`` and leaves the optimizer as it was.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .io import load_tensors, save_tensors

__all__ = ["load_optimizer", "save_optimizer"]


def _unwrapped(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a wrapper such as accelerate's ``AcceleratedOptimizer``."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _param_names(opt: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), "?") for g in opt.param_groups for p in g["params"]]


def _param_shapes(opt: torch.optim.Optimizer) -> list[list[int]]:
    return [list(p.shape) for g in opt.param_groups for p in g["params"]]


def save_optimizer(opt: torch.optim.Optimizer, model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``opt``'s state (tensors, scalars, param groups) and the names and shapes of the parameters it updates;
    a param group that is not plain JSON (a tensor learning rate) raises ``ConfigError`` before anything is written."""
    opt = _unwrapped(opt)
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}/{key}"] = value
            else:
                scalars[f"{idx}/{key}"] = value
    header = {"optimizer": type(opt).__name__, "names": _param_names(opt, model), "shapes": _param_shapes(opt),
              "param_groups": state["param_groups"], "scalars": scalars}
    try:
        json.dumps(header)
    except TypeError as exc:
        raise ConfigError(f"the optimizer state holds values that are not plain numbers ({exc}). Fix: pass plain floats "
                          "(e.g. lr=1e-4, not a tensor).") from exc
    save_tensors(path, tensors, header, "optimizer")


def load_optimizer(opt: torch.optim.Optimizer, model: nn.Module, path: str | os.PathLike) -> None:
    """Restore ``save_optimizer``'s state into ``opt``; refused (nothing changed) if it was saved for other parameters."""
    opt = _unwrapped(opt)
    tensors, header = load_tensors(path, "optimizer")
    sizes = [len(g["params"]) for g in header.get("param_groups", [])] if isinstance(header.get("param_groups"), list) else None
    if (header.get("optimizer") != type(opt).__name__ or header.get("names") != _param_names(opt, model)
            or header.get("shapes", _param_shapes(opt)) != _param_shapes(opt) or sizes != [len(g["params"]) for g in opt.param_groups]):
        raise CheckpointError(f"{path} holds {header.get('optimizer')} state for other parameters (names, shapes or "
                              f"parameter groups differ from this {type(opt).__name__}'s). Fix: load it into an optimizer "
                              "built the same way over the model it was saved with.")
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, value in list(tensors.items()) + list(header.get("scalars", {}).items()):
            idx, name = key.split("/", 1)
            state.setdefault(int(idx), {})[name] = value
        opt.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path} is broken ({type(exc).__name__}: {str(exc)[:120]}). Fix: resume from another "
                              "saved state, or start again.") from exc
