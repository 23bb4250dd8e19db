"""The onnxruntime side of ``export_onnx``'s check, importable without torch and runnable as a script:
``python ort_child.py MODEL.onnx FOLDER GPU`` reads ``FOLDER/feeds.npz``, runs the model once and writes
``FOLDER/outputs.npz`` and ``FOLDER/providers.json``. Run in a child process (``ort_check``), a native crash of
onnxruntime ends the child, never the caller."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def session(path: str, gpu: bool) -> Any:
    """An onnxruntime session on CUDA when ``gpu`` and onnxruntime has its provider (decided by the session), else
    CPU, quietly."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - fall back to whatever loads
                pass
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers)


def main(model: str, folder: str, gpu: str) -> int:
    import numpy as np

    out = Path(folder)
    sess = session(model, gpu == "1")
    with np.load(out / "feeds.npz") as data:
        names = {i.name for i in sess.get_inputs()}
        feeds = {k: data[k] for k in data.files if k in names}
    got = sess.run(None, feeds)
    np.savez(out / "outputs.npz", *[np.asarray(g) for g in got])
    (out / "providers.json").write_text(json.dumps(sess.get_providers()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(*sys.argv[1:4]))
    except Exception as exc:  # noqa: BLE001 - the parent turns this line into an ExportError
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        sys.exit(1)
