"""The two ways ``export_onnx`` writes a file: torch's TorchScript exporter (attention fusion and onnxruntime's
optimizer read its graphs), and its dynamo exporter (torch.export based), tried where the first one's file fails.

Invariant: each writes ``net`` on ``args`` to one ONNX file with the named inputs and outputs and the dynamic axes
asked for; neither verifies (``export_onnx`` does, the same way for both).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import numbers
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .symbolics import register as register_symbolics

__all__ = ["write", "DYNAMO_MIN_OPSET", "check_opset"]


DYNAMO_MIN_OPSET = 18  # the dynamo exporter writes opset 18 and later


def check_opset(opset: Any) -> int:
    """``opset`` as an int, or ``ConfigError`` unless it is one torch.onnx writes: from the TorchScript exporter's
    oldest to the newest that torch.onnx and the installed ``onnx`` both know (7 to 23 with torch 2.x, onnx 1.17+)."""
    import onnx

    from ..errors import ConfigError

    try:
        from torch.onnx import _constants
        low, high = int(_constants.ONNX_MIN_OPSET), int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):  # a torch that moved its constants
        low, high = 7, 20
    high = min(high, onnx.defs.onnx_opset_version())
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral):
        raise ConfigError(f"opset={opset!r} is not an int. Fix: pass an ONNX opset number from {low} to {high} "
                          "(default 17).")
    if not low <= opset <= high:
        which = (f"older than any torch.onnx exporter writes (the TorchScript exporter starts at {low}, the dynamo "
                 f"one at {DYNAMO_MIN_OPSET})" if opset < low else
                 f"newer than torch {torch.__version__} and onnx {onnx.__version__} support (up to {high})")
        raise ConfigError(f"opset={opset} is {which}. Fix: pass an opset from {low} to {high} (default 17).")
    return int(opset)


def write(exporter: str, net: nn.Module, args: tuple, tmp: Path, input_names: list[str], output_names: list[str],
          axes: Any, opset: int, patches: Any, fusion: Any) -> None:
    """``net`` on ``args`` to ONNX at ``tmp`` with torch's TorchScript exporter (inside ``patches`` and ``fusion``,
    context managers of ``export_onnx``) or its dynamo (torch.export based) one."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the dynamo exporter's progress lines
        warnings.simplefilter("ignore")
        if exporter == "dynamo":  # one spec per positional input: the axes named dynamic, the rest as traced
            shapes = None if not axes else tuple({d: torch.export.Dim.DYNAMIC for d in axes.get(n, {})} for n in input_names)
            params = list(inspect.signature(net.forward).parameters.values())
            if shapes is not None and params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
                shapes = (shapes,)  # forward(*args): one input, the tuple
            torch.onnx.export(net, args, str(tmp), input_names=input_names, output_names=output_names, dynamic_shapes=shapes,
                              opset_version=max(opset, DYNAMO_MIN_OPSET), dynamo=True, external_data=False)
            return
        register_symbolics(opset)  # aten ops the TorchScript exporter lacks (rms_norm)
        with patches, fusion, _no_native_stdout():
            torch.onnx.export(net, args, str(tmp), input_names=input_names, output_names=output_names,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)


@contextlib.contextmanager
def _no_native_stdout() -> Iterator[None]:
    """File descriptor 1 on /dev/null: the TorchScript exporter's native log prints its whole IR graph there when an
    export fails (its log switch tests a function object, so it is always on), though the failure is handled."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 to redirect
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)
