"""Run the exported file in onnxruntime in a child process (one per export): a native crash there (seen: SIGSEGV
on an fp16 torchvision ViT) is an ``ExportError`` naming the signal, not the end of the calling process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ExportError

__all__ = ["run_onnxruntime", "CHILD"]

CHILD = Path(__file__).with_name("ort_child.py")


def run_onnxruntime(path: str | os.PathLike, feeds: dict[str, np.ndarray], gpu: bool) -> tuple[list[str], list[np.ndarray]]:
    """(providers, outputs) of one onnxruntime run of ``path`` on ``feeds``, in a child process. A child that
    raised: ``RuntimeError`` with its one-line message; one killed by a signal: ``ExportError`` (SIGINT:
    ``KeyboardInterrupt``)."""
    with tempfile.TemporaryDirectory(prefix="ebcompile-ort-") as tmp:
        np.savez(Path(tmp) / "feeds.npz", **feeds)
        proc = subprocess.run([sys.executable, str(CHILD), str(path), tmp, "1" if gpu else "0"],
                              capture_output=True, text=True)
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode)
            if sig == signal.SIGINT:
                raise KeyboardInterrupt
            raise ExportError(f"onnxruntime crashed ({sig.name}) running the exported file; nothing is written. Fix: "
                              "export with optimize=False (or fused_attention=False), or dtype='fp32', or compact the "
                              "model first; verify=False skips the check (the file is then unverified).")
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"onnxruntime's check exited with {proc.returncode}")
        providers = json.loads((Path(tmp) / "providers.json").read_text())
        with np.load(Path(tmp) / "outputs.npz") as data:
            return providers, [data[f"arr_{i}"] for i in range(len(data.files))]
