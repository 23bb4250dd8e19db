"""Latency measurement shared by ``ebcompile bench`` and the scripts in ``bench/``: median of timed runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["median_ms", "eager_ms", "ort_ms"]


def median_ms(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def eager_ms(model: nn.Module, inputs: dict[str, torch.Tensor], device: str, repeats: int,
             dtype: torch.dtype | None = None) -> float:
    """PyTorch eager latency of ``model(**inputs)`` (floating inputs and the model cast to ``dtype``)."""
    model = model.to(device=device, dtype=dtype).eval() if dtype is not None else model.to(device).eval()
    feed = {k: v.to(device=device, dtype=dtype) if dtype is not None and v.is_floating_point() else v.to(device)
            for k, v in inputs.items()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        return median_ms(lambda: model(**feed), repeats, sync)


def ort_ms(session: Any, inputs: dict[str, torch.Tensor], repeats: int) -> float:
    """onnxruntime latency of ``session.run`` on ``inputs`` (numpy feeds, in the dtypes the graph declares)."""
    import numpy as np

    types = {i.name: i.type for i in session.get_inputs()}
    feed = {k: v.cpu().numpy().astype(np.float16 if types.get(k) == "tensor(float16)" else v.cpu().numpy().dtype)
            for k, v in inputs.items() if k in types}
    return median_ms(lambda: session.run(None, feed), repeats)
