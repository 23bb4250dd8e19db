"""Save directories that own only what they wrote.

A save is written whole into a sibling temp directory, then committed into the target: every file it wrote
replaces its namesake, the files the previous save listed and this one does not are removed, and every other
file (a README, a tokenizer the user put there) is left untouched. ``ebcompile-files.json`` (the manifest)
lists the files a save wrote; it is moved in last, so a directory holding it is complete. Before the first
change the previous save's files are hard-linked into a backup beside the target: a kill at any instant
leaves the old save (the backup, which ``resolve_saved`` returns while the manifest is missing) or the new
one, and the next write to the same path rolls an interrupted commit back. Every file gets ``0o666 & ~umask``
and every new folder ``0o777 & ~umask``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import CheckpointError, OutputPathError
from .fsguard import exists, guard, os_error, read_json
from .io import _leftovers, _make_parents, _public_mode, _remove, _remove_created, abandon
from .model_format import FORMAT, META

__all__ = ["atomic_dir", "recover", "resolve_saved", "read_saved", "MANIFEST"]

T = TypeVar("T")

MANIFEST, JOURNAL = "ebcompile-files.json", ".ebcompile-commit.json"
_TMPDIR, _OLD = ".tmpdir", ".old"


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() or p.is_symlink())


def _manifest(folder: Path) -> list[str] | None:
    """The files the save in ``folder`` wrote, or None if it has no (readable) manifest."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if _inside(folder, files) else None


def _inside(folder: Path, names: object) -> bool:
    """``names`` is a list of relative paths that stay inside ``folder`` (no ``..``, no link out of it)."""
    if not isinstance(names, list) or not all(isinstance(f, str) and f and not os.path.isabs(f) for f in names):
        return False
    root = folder.resolve()
    return all(".." not in Path(f).parts and (folder / f).resolve().is_relative_to(root) for f in names)


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def _drop(folder: Path, name: str) -> None:
    """Remove ``folder/name`` and the folders under ``folder`` it leaves empty."""
    (folder / name).unlink(missing_ok=True)
    for parent in (folder / name).parents:
        if parent == folder or not parent.is_relative_to(folder):
            break
        try:
            parent.rmdir()
        except OSError:
            break


def _legacy_save(path: Path, marker: str) -> bool:
    """Whether ``path`` is an ``ebcompile.save`` written before manifests: its ``marker`` is an ``ebcompile.json`` of
    that format, not the one ``save_pretrained`` adds beside transformers' files (a ``config.json`` proves nothing)."""
    if marker != META or not (path / marker).is_file():
        return False
    try:
        meta = read_json(path / marker)
    except CheckpointError:
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT and not meta.get("pretrained")


class atomic_dir:
    """Context manager yielding a temp directory, committed into ``path`` on success (see the module docstring).

    ``path`` may be missing, empty, or an earlier save (it holds the manifest, or ``marker`` for saves written
    before manifests); any other non-empty directory is refused, and so is a file of the new save that would
    replace a file no save wrote."""

    def __init__(self, path: str | os.PathLike, marker: str) -> None:
        self.path, self.marker = Path(path), marker

    def __enter__(self) -> Path:
        with guard(self.path, "write"):  # a name too long, a folder not searchable: typed
            return self._enter()

    def _enter(self) -> Path:
        path = self.path
        recover(path)
        if path.exists() and not path.is_dir():
            raise OutputPathError(f"{path} is a file, not a directory. Fix: pass a directory path or remove the file.")
        self.old = _manifest(path) if path.is_dir() else []
        self.legacy = self.old is None and _legacy_save(path, self.marker)  # a save from before manifests
        if self.old is None and not self.legacy and any(path.iterdir()):
            raise OutputPathError(f"{path} holds files that are not an ebcompile save, and a save never writes among "
                                  "files it did not write. Fix: pass a new or empty directory.")
        self.created = _make_parents(path)
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=_TMPDIR, dir=path.parent))
        except OSError as exc:
            _remove_created(self.created)
            raise os_error(path, exc, "write") from exc
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            abandon(self.tmp, self.created, self.path, exc)
            return
        try:
            self._commit()
        except OutputPathError:
            _remove(self.tmp)
            raise
        except OSError as err:
            abandon(self.tmp, self.created, self.path, err)
        _remove(self.tmp)

    def _commit(self) -> None:
        path, tmp = self.path, self.tmp
        new = [f for f in _files(tmp) if f != MANIFEST]
        old = [f for f in new if (path / f).exists()] if self.legacy else list(self.old or [])
        theirs = [f for f in new if f not in old and ((path / f).exists() or (path / f).is_symlink())]
        if theirs:
            raise OutputPathError(f"{path / theirs[0]} was not written by an ebcompile save, and this save would replace "
                                  "it. Fix: move that file away or pass another directory.")
        (tmp / MANIFEST).write_text(json.dumps({"format": "ebcompile-files", "version": 1, "files": new}, indent=1) + "\n")
        for p in tmp.rglob("*"):
            _public_mode(p, 0o777 if p.is_dir() else 0o666)
        _public_mode(tmp, 0o777)
        if not path.exists() or not any(path.iterdir()):
            os.replace(tmp, path)  # nothing there yet: one rename
            return
        backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=_OLD, dir=path.parent))
        try:
            (backup / JOURNAL).write_text(json.dumps({"old": old, "new": new}))
            for name in [*old, MANIFEST]:  # the previous save, whole, beside: what readers get until the commit ends
                if (path / name).is_file():
                    (backup / name).parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(path / name, backup / name)
                    except OSError:
                        shutil.copy2(path / name, backup / name)
        except OSError:
            _remove(backup)  # nothing in ``path`` changed yet
            raise
        try:
            (path / MANIFEST).unlink(missing_ok=True)  # from here until the manifest is back, readers get the backup
            for name in old:
                if name not in new:
                    _drop(path, name)
            for name in sorted(new, key=lambda n: n == self.marker):  # the marker last
                _move(tmp / name, path / name)
            _move(tmp / MANIFEST, path / MANIFEST)
        except OSError:
            _roll_back(path, backup)
            raise
        _remove(backup)


def _roll_back(path: Path, backup: Path) -> None:
    """Undo an interrupted commit into ``path`` from its ``backup``: the new save's files out, the old ones back."""
    try:
        journal = json.loads((backup / JOURNAL).read_text())
        old, new = journal["old"], journal["new"]
        if not (_inside(path, old) and _inside(path, new)):
            raise ValueError("a name outside the folder")
    except (OSError, ValueError, KeyError, TypeError):
        old, new = [f for f in _files(backup) if f != JOURNAL], []
    for name in new:
        if name not in old:
            _drop(path, name)
    for name in [*old, MANIFEST]:
        if (backup / name).is_file():
            _move(backup / name, path / name)
    _remove(backup)


def recover(path: Path) -> None:
    """Finish what killed writers left beside ``path``: roll back an interrupted commit, drop temp directories."""
    for backup in sorted(_leftovers(path, _OLD), key=lambda p: p.stat().st_mtime):
        try:
            if not path.exists():  # a whole-directory swap (earlier versions) killed between its two renames
                os.rename(backup, path)
                (path / JOURNAL).unlink(missing_ok=True)
            elif not (path / MANIFEST).is_file():
                _roll_back(path, backup)
            else:
                _remove(backup)  # the commit had finished
        except OSError:
            pass
    for stale in _leftovers(path, _TMPDIR):
        _remove(stale)


def resolve_saved(path: str | os.PathLike) -> Path:
    """``path``, or the previous save beside it while a commit into ``path`` is under way (or was killed)."""
    path = Path(path)
    if exists(path / MANIFEST):  # an unreadable path raises here, typed, rather than reading as missing
        return path
    try:
        olds = sorted(path.parent.glob(f".{path.name}.*{_OLD}"), key=lambda p: p.stat().st_mtime)
    except OSError:
        olds = []
    return olds[-1] if olds else path


def _stamp(folder: Path) -> tuple[int, ...] | None:
    """Which commit ``folder``'s manifest belongs to (every commit moves in a new one), or None without one."""
    try:
        st = os.stat(folder / MANIFEST)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def read_saved(path: str | os.PathLike, read: Callable[[Path], T], tries: int = 200) -> T:
    """``read(folder)`` of the save at ``path`` (``folder``: ``path`` or, mid-commit, the backup beside it), run
    again whenever a commit began or ended while it read, so that it never sees files of two saves. ``read``
    must change nothing before it returns."""
    path = Path(path)
    for attempt in range(tries):
        folder = resolve_saved(path)
        stamp = _stamp(folder)
        try:
            result = read(folder)
        except Exception:
            if resolve_saved(path) == folder and _stamp(folder) == stamp:
                raise  # the files did not change under the read: the error is theirs
        else:
            if resolve_saved(path) == folder and _stamp(folder) == stamp:
                return result
        time.sleep(min(0.001 * attempt, 0.02))
    raise CheckpointError(f"{path} changed under each of {tries} reads: another process keeps saving into it. Fix: load "
                          "it once that process has finished saving (or load a copy).")
