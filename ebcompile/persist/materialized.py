"""Models whose weights have no values (the ``meta`` device) are refused at every public entry point.

A model built under ``torch.device("meta")`` (or ``accelerate.init_empty_weights``, or moved with
``.to("meta")``) has shapes but no numbers: tracing, ranking, compacting, exporting or saving it can only fail
deep inside torch (``NotImplementedError: Cannot copy out of meta tensor``) or, worse, succeed on nothing.
``require_materialized`` raises a ``ConfigError`` naming the first such tensor and the fix, before anything
changes; ``require_module`` refuses what is not an ``nn.Module`` at all (a name or a path) the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["require_materialized", "require_values", "meta_error", "require_module"]

FIX = ("Fix: materialize the weights first: model.to_empty(device='cpu') (or 'cuda'), then load the real weights "
       "(model.load_state_dict(state), ebcompile.load(directory, model=model), or from_pretrained without meta/empty-"
       "weight initialization).")


def meta_error(what: str, name: str) -> ConfigError:
    return ConfigError(f"{what} needs weights with values, and {name} is on the meta device (shapes only, no data: a "
                       f"model built under torch.device('meta') or init_empty_weights, or moved with .to('meta')). {FIX}")


def require_materialized(model: nn.Module, what: str) -> None:
    """Raise ``meta_error`` for the first parameter or buffer of ``model`` on the meta device."""
    for kind, named in (("parameter", model.named_parameters), ("buffer", model.named_buffers)):
        for name, tensor in named():
            if tensor.is_meta:
                raise meta_error(what, f"{type(model).__name__}'s {kind} {name}")


def require_values(tensors: Iterable[torch.Tensor], what: str) -> None:
    """Raise ``meta_error`` if any of ``tensors`` is on the meta device."""
    if any(t.is_meta for t in tensors):
        raise meta_error(what, "a weight it reads")


def require_module(model: Any, what: str) -> None:
    """``model`` must be an ``nn.Module``: a model name or path is loaded first by the caller."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what} needs an nn.Module, got {type(model).__name__} {str(model)[:60]!r}. Fix: build or load the "
                          "model first (e.g. AutoModel.from_pretrained(name), or ebcompile.load(directory)).")
