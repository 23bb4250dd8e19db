"""The torch-function mode active while the ONNX exporter traces: each attention the per-op handlers
(``attention_ops.py``) can follow is replaced by one fused contrib node (``attention.emit_attention``).

Invariant: every op runs as the model runs it (handlers compute the op first and only tag results), and a tensor
an unhandled op writes in place loses its tag, so the traced values are the model's own. A module stack kept by
hooks names the layer in the notes of each attention left unfused.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..analysis.op_names import function_name
from .attention_ops import HANDLERS, forget_in_place, scores_of

__all__ = ["AttentionFusion"]


class AttentionFusion(TorchFunctionMode):
    """Active while the exporter traces: replaces each attention it can follow by ``emit_attention``."""

    def __init__(self, net: nn.Module, gqa: bool = True) -> None:
        super().__init__()
        self.net, self.gqa = net, gqa
        self.notes: list[str] = []
        self._names = {m: n for n, m in net.named_modules()}
        self._stack: list[str] = []
        self._hooks: list = []

    @property
    def layer(self) -> str:
        return self._stack[-1] if self._stack else "<model>"

    def note(self, why: str) -> None:
        line = f"attention in {self.layer} not fused: {why}"
        if line not in self.notes:
            self.notes.append(line)

    def __enter__(self):
        for module, name in self._names.items():
            self._hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: self._stack.append(n or "<model>")))
            self._hooks.append(module.register_forward_hook(lambda m, a, o: self._stack.pop() and None))
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = HANDLERS.get(function_name(func))
        if handler is not None:
            before = scores_of(args[0]) if args and isinstance(args[0], torch.Tensor) else None
            out = handler(self, func, args, kwargs)
            if before is not None and out is args[0] and scores_of(out) is before:
                forget_in_place(func, args, kwargs)  # an in-place op the handler left untracked (e.g. on the probabilities)
            return out
        out = func(*args, **kwargs)
        forget_in_place(func, args, kwargs)
        return out
