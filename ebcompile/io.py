"""Safe checkpoint files: safetensors tensors + a JSON header, written to a temp file then renamed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

__all__ = ["atomic_path", "save_tensors", "load_tensors"]


class atomic_path:
    """Context manager yielding a temp path beside ``path``; renamed onto ``path`` only on success."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict, kind: str) -> None:
    """Write tensors and a JSON-serialisable header; ``kind`` is checked again at load time."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": f"ebcompile-{kind}", "header": json.dumps(header)}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)


def load_tensors(path: str | os.PathLike, kind: str, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by ``save_tensors`` with the same ``kind`` (only the tensors whose names start with
    ``prefix``); never unpickles anything."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist. Fix: pass the path of a file ebcompile saved.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != f"ebcompile-{kind}":  # checked before any tensor is read
                raise CheckpointError(
                    f"{path} holds {meta.get('format', 'no ebcompile data')!r}, not an ebcompile {kind}. "
                    f"Fix: pass a file written by the {kind}'s save()."
                )
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not our file"
        raise CheckpointError(f"{path} is not a safetensors file ({exc}). Fix: pass a file ebcompile saved.") from exc
    return tensors, json.loads(meta["header"])
