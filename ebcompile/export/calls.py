"""The call an ONNX export traces: the model wrapped to take positional tensors and return a flat tuple, its inputs'
names and dynamic axes, and an all-ones attention mask added where a Hugging Face model would otherwise build one
with ops ONNX lacks (``export.onnx``)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["KeywordCall", "PositionalCall", "flag_defaults", "auto_axes", "flatten", "parameters_of",
           "with_attention_mask", "check_names", "check_axes"]


class KeywordCall(nn.Module):
    """``net(**dict(zip(names, args)), **extra)`` with positional inputs, returning its tensors as a flat tuple
    (a Hugging Face ``ModelOutput`` becomes its tensor fields in order; cache objects are dropped)."""

    def __init__(self, net: nn.Module, names: list[str], extra: dict[str, Any]) -> None:
        super().__init__()
        self.net, self.names, self.extra = net, list(names), dict(extra)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flatten(self.net(**dict(zip(self.names, args)), **self.extra)))


class PositionalCall(nn.Module):
    """``net(*args)`` and nothing else: ``torch.onnx.export`` appends the defaults of a forward's other parameters to
    the traced inputs, so a flag such as timm Eva's ``is_causal=False`` would reach the model as a tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args: torch.Tensor) -> Any:
        return self.net(*args)


def flag_defaults(net: nn.Module, given: int) -> bool:
    """Whether ``net.forward`` has parameters after the ``given`` positional ones whose defaults are plain flags or
    numbers (``PositionalCall`` then hides them from the exporter)."""
    try:
        params = list(inspect.signature(net.forward).parameters.values())[given:]
    except (TypeError, ValueError):
        return False
    return any(isinstance(p.default, (bool, int, float)) for p in params)


def parameters_of(net: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(net.forward).parameters)
    except (TypeError, ValueError):
        return set()


def auto_axes(names: list[str], tensors: list[torch.Tensor], lengths: dict[tuple[str, int], str],
              per_length: bool = True) -> dict[str, dict[int, str]]:
    """Dim 0 of every tensor is ``batch``; dim 1 of integer tensors (token ids, masks) a sequence axis: one name for
    all (``sequence``; ``decoder_sequence`` for a decoder's), or with ``per_length`` one name per distinct example
    length (``lengths``, shared by the inputs and outputs: a source of 10 tokens and a target of 8 are two axes)."""
    axes = {}
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            continue
        axes[name] = {0: "batch"}
        if not t.is_floating_point() and t.dim() >= 2:  # token ids / attention masks: [batch, sequence]
            decoder = name.startswith("decoder_") or (name == "labels" and any(n.startswith("decoder_") for n in names))
            base = "decoder_sequence" if decoder else "sequence"  # encoder-decoder inputs
            if not per_length:
                axes[name][1] = base
                continue
            if (base, t.shape[1]) not in lengths:
                count = sum(b == base for b, _ in lengths)
                lengths[(base, t.shape[1])] = base if count == 0 else f"{base}_{count + 1}"
            axes[name][1] = lengths[(base, t.shape[1])]
    return axes


def flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in flatten(o)] if isinstance(out, (list, tuple)) else []


def with_attention_mask(net: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict, str]:
    """Token inputs without an ``attention_mask`` for a model that takes one: an all-ones mask becomes an input
    (without it, Hugging Face decoders build their mask with ops ONNX lacks)."""
    params = parameters_of(net)
    if "attention_mask" not in params or "attention_mask" in kwargs:
        return args, kwargs, ""
    if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point() \
            and "input_ids" in params:
        args, kwargs = (), {"input_ids": args[0]}
    ids = kwargs.get("input_ids")
    if args or not isinstance(ids, torch.Tensor):
        return args, kwargs, ""
    return args, {**kwargs, "attention_mask": torch.ones_like(ids)}, \
        "attention_mask added as an input (all ones in the example): pass it to the exported model"


def check_axes(dynamic_axes: Any) -> None:
    """``ConfigError`` unless ``dynamic_axes`` is ``"auto"``, None or a dict of input/output name -> axes."""
    if dynamic_axes is None or (isinstance(dynamic_axes, str) and dynamic_axes == "auto"):
        return
    if not isinstance(dynamic_axes, dict) or not all(
            isinstance(k, str) and isinstance(v, (dict, list, tuple)) for k, v in dynamic_axes.items()):
        raise ConfigError(f"dynamic_axes={dynamic_axes!r} is not 'auto', None or a dict of input/output name -> axes. "
                          "Fix: pass e.g. {'input': {0: 'batch'}}, 'auto' (batch and sequence axes) or None (static).")


def check_names(input_names: Any, args: tuple, kwargs: dict) -> None:
    """``ConfigError`` unless ``input_names`` (when given) names each positional input once, or, for keyword
    inputs, only keyword tensors that were passed."""
    if input_names is None:
        return
    if isinstance(input_names, str) or not all(isinstance(n, str) for n in input_names) \
            or len(set(input_names)) != len(input_names):
        raise ConfigError(f"input_names={input_names!r} is not a list of distinct strings. Fix: pass one name per "
                          "input, e.g. ['input'].")
    if kwargs:
        tensors = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        unknown = [n for n in input_names if n not in tensors]
        if unknown:
            raise ConfigError(f"input_names {unknown} are not keyword tensors of example_inputs ({tensors}). Fix: "
                              "name only keys of the example_inputs dict, or leave input_names=None.")
    elif len(input_names) != len(args):
        raise ConfigError(f"input_names has {len(input_names)} names for {len(args)} example input(s). Fix: pass "
                          f"exactly {len(args)} name(s), or leave input_names=None.")
