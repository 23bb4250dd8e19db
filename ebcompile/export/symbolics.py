"""ONNX symbolics for aten ops the TorchScript exporter lacks, written as the ONNX ops they compute.

``aten::rms_norm`` (``nn.RMSNorm``, ``F.rms_norm``: common in hand-written Transformers and newer Hugging Face
models such as DiffLlama) has no symbolic up to opset 23: ``x * rsqrt(mean(x * x over the normalized dims) + eps)``
(times ``weight``), with ``eps`` the input dtype's machine epsilon when the call gives none, as PyTorch does.

Invariant: registered once per opset (``register``), for ops the exporter has no symbolic of its own; the exported
graph computes what the op does (``export_onnx`` verifies every file against PyTorch).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["register"]

_DONE: set[int] = set()
_DTYPES = {"Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16, "Double": torch.float64}


def _rms_norm(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    from torch.onnx import symbolic_helper as sh

    dims = sh._get_const(normalized_shape, "is", "normalized_shape")
    axes = list(range(-len(dims), 0))
    value = None if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    if value is None:
        kind = x.type().scalarType() if x.type().kind() == "TensorType" else "Float"
        value = torch.finfo(_DTYPES.get(kind, torch.float32)).eps
    squared = g.op("Mul", x, x)
    if g.opset >= 18:  # ReduceMean takes its axes as an input from opset 18
        mean = g.op("ReduceMean", squared, g.op("Constant", value_t=torch.tensor(axes, dtype=torch.long)), keepdims_i=1)
    else:
        mean = g.op("ReduceMean", squared, axes_i=axes, keepdims_i=1)
    eps_t = g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32))
    eps_t = g.op("CastLike", eps_t, mean) if g.opset >= 15 else eps_t  # CastLike from opset 15; float32 before
    out = g.op("Mul", x, g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean, eps_t))))
    return out if sh._is_none(weight) else g.op("Mul", out, weight)


def register(opset: int) -> None:
    """The symbolics above, for ``opset`` (idempotent)."""
    if opset in _DONE:
        return
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, opset)
    _DONE.add(opset)
