"""Safe writes: every file goes to a temp file beside it and is renamed into place (save directories:
``savedir``). A kill at any instant leaves the old or the new version readable; temp files of killed writers
are removed by the next write to the same path. Every OS error becomes an ``OutputPathError`` naming the path,
the cause and the fix (``fsguard``), and a failed write removes what it created.

Also: safetensors tensors + a JSON header (``save_tensors``/``load_tensors``); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, OutputPathError
from .fsguard import guard, os_error, parse_json

__all__ = ["atomic_path", "check_writable", "save_tensors", "load_tensors"]

_TMP, _TMPDIR = ".tmp", ".tmpdir"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _leftovers(path: Path, suffix: str) -> list[Path]:
    """Temp entries ``.{name}.{pid}.*{suffix}`` beside ``path`` whose writer process is gone."""
    out = []
    try:
        siblings = list(path.parent.glob(f".{path.name}.*{suffix}"))
    except OSError:
        return []
    for p in siblings:
        pid = p.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            out.append(p)
    return out


def _remove(p: Path) -> None:
    try:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    except OSError:
        pass


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; returns those created (deepest last)."""
    missing = []
    for parent in [path.parent, *path.parent.parents]:
        if parent.is_dir():
            break
        if parent.exists() or parent.is_symlink():
            raise OutputPathError(f"{parent} is a file, so {path} cannot be created under it. Fix: pass a path whose "
                                  "folders are directories (or remove that file).")
        missing.append(parent)
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            _remove_created(created)
            raise os_error(folder, exc, "write") from exc
        created.append(folder)
    return created


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break


def _public_mode(path: Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)  # mkstemp/mkdtemp make 0600/0700


class atomic_path:
    """Context manager yielding a temp path beside ``path`` (in a private temp folder, so that a writer's own
    temp files are cleaned with it); renamed onto ``path`` only on success."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        with guard(self.path, "write"):  # a name too long, a folder not searchable: typed
            if self.path.is_dir():
                raise OutputPathError(f"{self.path} is a directory, not a file. Fix: pass a file path (e.g. "
                                      f"{self.path / 'file'}) or remove the directory.")
            self.created = _make_parents(self.path)
        for stale in _leftovers(self.path, _TMPDIR) + _leftovers(self.path, _TMP):
            _remove(stale)
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.{os.getpid()}.", suffix=_TMPDIR, dir=self.path.parent))
        except OSError as exc:
            _remove_created(self.created)
            raise os_error(self.path, exc, "write") from exc
        self.tmp = self.folder / self.path.name
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                if not self.tmp.is_file():
                    raise FileNotFoundError(2, "nothing was written")
                _public_mode(self.tmp, 0o666)
                os.replace(self.tmp, self.path)
                _remove(self.folder)
                return
            except OSError as err:
                abandon(self.folder, self.created, self.path, err)
        abandon(self.folder, self.created, self.path, exc)


def abandon(temp: Path, created: list[Path], path: Path, exc: BaseException | None) -> None:
    """A failed write of ``path``: remove its ``temp`` entry and the folders it ``created``; an OS (or
    safetensors I/O) error ``exc`` is raised typed, any other propagates as it is."""
    _remove(temp)
    _remove_created(created)
    if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
        raise os_error(path, exc, "write") from exc


def check_writable(path: str | os.PathLike, directory: bool) -> Path:
    """Fail now, not after training, if ``path`` cannot be written (as a directory or as a file); creates
    nothing."""
    path = Path(path)
    with guard(path, "write"):
        _check_writable(path, directory)
    return path


def _check_writable(path: Path, directory: bool) -> None:
    if path.exists() and path.is_dir() != directory:
        kind = "a directory" if path.is_dir() else "a file"
        raise OutputPathError(f"{path} is {kind}; a {'directory' if directory else 'file'} is needed there. Fix: pass "
                              "another path or remove it.")
    for parent in [path.parent, *path.parent.parents]:
        if parent.is_dir():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputPathError(f"cannot write under {parent}: permission denied. Fix: pass a path in a writable "
                                      "directory.")
            break
        if parent.exists():
            raise OutputPathError(f"{parent} is a file, so {path} cannot be created under it. Fix: pass a path whose "
                                  "folders are directories (or remove that file).")


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
    with guard(path, "read"):
        if not path.is_file():
            os.stat(path)  # the real cause (permission, name too long) before "does not exist"
            raise CheckpointError(f"{path} is not a file. Fix: pass the path of a file ebcompile saved.")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != f"ebcompile-{kind}":  # checked before any tensor is read
                raise CheckpointError(
                    f"{path} holds {meta.get('format', 'no ebcompile data')!r}, not an ebcompile {kind}. "
                    f"Fix: pass a file written by the {kind}'s save()."
                )
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    try:
        header = parse_json(meta["header"], f"the header of {path}")
        if not isinstance(header, dict):
            raise TypeError("not a JSON object")
    except (KeyError, TypeError, CheckpointError) as exc:
        raise CheckpointError(f"{path} has a broken ebcompile {kind} header ({type(exc).__name__}). Fix: save the {kind} "
                              "again.") from exc
    return tensors, header
