"""Counts people compare: parameters, non-zero parameters, FLOPs (MACs), bytes, and heads per attention layer.

Heads (and key/value heads where grouped) are read by ``model_format.attention_heads``, the one reader that
``save`` and ``save_pretrained`` record from too, so a dense and a compacted model are described alike."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .capture.graph import inputs_fit, normalize_inputs
from .errors import CheckpointError, ConfigError
from .persist.model_format import attention_heads
from .transforms.verify import evaluating

__all__ = ["count_parameters", "count_macs", "report", "Report"]


def count_parameters(model: nn.Module, nonzero: bool = False) -> int:
    """Parameters of ``model`` as stored (``nonzero=True``: the ones that are not exactly zero, masks applied)."""
    if not nonzero:
        return sum(p.numel() for p in model.parameters())
    return sum(int((v != 0).sum()) for k, v in model.state_dict().items() if not k.endswith("_mask") and v.is_floating_point())


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward on ``example_inputs`` (torch's FLOP counter / 2)."""
    args, kwargs = normalize_inputs(example_inputs)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel is invisible to the counter
    try:
        with evaluating(model), torch.no_grad(), inputs_fit(model, args, kwargs), FlopCounterMode(display=False) as counter:
            model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() // 2


@dataclass
class Report:
    """What ``ebcompile.report`` measured; ``str(report)`` is a readable table."""

    source: str
    parameters: int
    nonzero: int
    bytes: int
    macs: int | None = None
    heads: dict[str, int] = field(default_factory=dict)  # attention module -> query heads
    kv_heads: dict[str, int] = field(default_factory=dict)  # grouped-query layers only: module -> key/value heads
    linears: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # name -> (in, out, density)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / max(self.parameters, 1)

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.parameters:,} parameters ({self.nonzero:,} non-zero, sparsity {self.sparsity:.2%}), "
                 f"{self.bytes:,} bytes" + (f", {self.macs:,} MACs per forward" if self.macs is not None else "")]
        if self.heads:
            lines.append("heads: " + ", ".join(f"{k} {v}" + (f" (kv {self.kv_heads[k]})" if k in self.kv_heads else "")
                                               for k, v in self.heads.items()))
        if self.linears:
            width = max(len(k) for k in self.linears)
            lines.append(f"{'linear':<{width}}  {'in':>6}  {'out':>6}  density")
            lines += [f"{k:<{width}}  {i:>6}  {o:>6}  {d:.3f}" for k, (i, o, d) in self.linears.items()]
        return "\n".join(lines)


def report(model_or_path: nn.Module | str | os.PathLike, example_inputs: Any = None) -> Report:
    """Parameters, non-zero parameters, bytes, MACs (with ``example_inputs``), heads and linear widths.

    Works on a plain, prepared or compact ``nn.Module``, or on an exported ``.onnx`` file (then bytes are
    the file size and parameters the initializers).
    """
    if not isinstance(model_or_path, nn.Module):
        if not isinstance(model_or_path, (str, os.PathLike)):
            raise ConfigError(f"report needs an nn.Module or the path of an .onnx file, got {type(model_or_path).__name__}. "
                              "Fix: pass the model or the exported file's path.")
        return _report_onnx(Path(model_or_path))
    model = model_or_path
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_mask")}
    floats = [v for v in state.values() if v.is_floating_point()]
    rep = Report(type(model).__name__, count_parameters(model), count_parameters(model, nonzero=True),
                 sum(v.numel() * v.element_size() for v in floats))
    if example_inputs is not None:
        rep.macs = count_macs(model, example_inputs)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            rep.linears[name] = (module.in_features, module.out_features, float((w != 0).float().mean()))
    for name, count in attention_heads(model).items():
        rep.heads[name] = count.heads
        if count.kv_heads != count.heads:
            rep.kv_heads[name] = count.kv_heads
    return rep


def _report_onnx(path: Path) -> Report:
    import onnx
    from onnx import numpy_helper

    if not path.is_file():
        raise CheckpointError(f"{path} does not exist. Fix: pass an nn.Module or the path of an exported .onnx file.")
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # noqa: BLE001 - not ONNX, truncated, or unreadable
        raise CheckpointError(f"{path} cannot be read as ONNX ({type(exc).__name__}: {str(exc)[:150]}). Fix: pass a file "
                              "written by ebcompile.export_onnx (or ebcompile export).") from exc
    arrays = [numpy_helper.to_array(t) for t in graph.initializer]
    params = sum(a.size for a in arrays if a.dtype.kind == "f")
    nonzero = sum(int((a != 0).sum()) for a in arrays if a.dtype.kind == "f")
    return Report(path.name, params, nonzero, path.stat().st_size)
