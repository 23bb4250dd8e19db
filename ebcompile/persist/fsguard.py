"""One place where file-system failures become ebcompile errors, and where untrusted JSON is read.

- ``os_error(path, exc, action)``: an ``OSError`` (or safetensors' ``SafetensorError``, which wraps one) as
  ``CheckpointError`` (reading) or ``OutputPathError`` (writing), naming the real cause (no space, name too
  long, permission denied, ...) and its fix; ``guard(path, action)`` applies it to a block.
- ``exists(path)``: like ``Path.exists`` but an unreadable path is an error, never "no such file".
- ``read_json(path)``: bounded in size and nesting (a 100,000-deep file is a ``CheckpointError``, not a
  ``RecursionError``), OS errors typed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from ..errors import CheckpointError, EbcompileError, OutputPathError

__all__ = ["os_error", "guard", "exists", "read_json", "parse_json", "MAX_JSON_BYTES", "MAX_JSON_DEPTH"]

MAX_JSON_BYTES, MAX_JSON_DEPTH = 256 * 2**20, 100
Action = Literal["read", "write"]

_CAUSES = {  # errno -> (reason, fix when reading, fix when writing)
    errno.ENOSPC: ("no space left on the disk", "free disk space", "free disk space or pass a path on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space in your quota", "free space in your quota or pass another path"),
    errno.ENAMETOOLONG: ("the name is too long for the file system", "pass a shorter path", "pass a shorter path"),
    errno.EACCES: ("permission denied", "make it readable (chmod) or run as a user who may read it",
                   "pass a path in a writable directory (or fix its permissions)"),
    errno.EPERM: ("operation not permitted", "make it readable (chmod) or run as a user who may read it",
                  "pass a path in a writable directory (or fix its permissions)"),
    errno.EROFS: ("read-only file system", "copy it to a readable disk", "pass a path on a writable disk"),
    errno.ENOENT: ("it does not exist", "check the path", "pass a path whose folders exist"),
    errno.ENOTDIR: ("a file is in the way of its folders", "check the path",
                    "pass a path whose folders are directories (or remove that file)"),
    errno.EISDIR: ("it is a directory", "pass the path of a file", "pass a file path or remove the directory"),
    errno.ELOOP: ("too many symbolic links", "check the path's links", "check the path's links"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n)", "raise the open-file limit (ulimit -n)"),
}


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"(?:code: |os error )(\d+)", str(exc))  # safetensors: "IoError(Os { code: 28, ... })"
    return int(found[1]) if found else None


def os_error(path: str | os.PathLike, exc: BaseException, action: Action) -> EbcompileError:
    """``exc`` (an OS or safetensors error met reading or writing ``path``) as a typed error with its fix."""
    code = _errno_of(exc)
    reason, read_fix, write_fix = _CAUSES.get(code, (None, "check the file and its folders",
                                                     "pass a path in a writable directory with enough disk space"))
    if reason is None:
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)[:200] or type(exc).__name__
    if action == "read":
        return CheckpointError(f"cannot read {path}: {reason}. Fix: {read_fix}.")
    return OutputPathError(f"cannot write {path}: {reason}. Fix: {write_fix}.")


def _safetensor_error() -> type[BaseException]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - older safetensors
        return OSError
    return SafetensorError


@contextlib.contextmanager
def guard(path: str | os.PathLike, action: Action) -> Iterator[None]:
    """Turn the ``OSError`` / ``SafetensorError`` raised in the block into ``os_error(path, ..., action)``."""
    try:
        yield
    except EbcompileError:
        raise
    except (OSError, _safetensor_error()) as exc:
        cause: BaseException = exc
        if action == "read" and isinstance(exc, FileNotFoundError):  # safetensors reports any open failure so
            try:
                os.stat(path)
            except OSError as real:
                cause = real
        if action == "read" and not isinstance(cause, OSError) and _errno_of(cause) is None:
            raise CheckpointError(f"{path} is not a safetensors file ({str(cause)[:200]}). Fix: save it "
                                  "again.") from exc
        raise os_error(path, cause, action) from exc

def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists; a path that cannot be looked at (permission, name too long) raises."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise os_error(path, exc, "read") from exc
    return True


def _depth(text: str) -> int:
    depth = deepest = 0
    for token in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):
        c = token.group()
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)`` refusing nesting deeper than ``max_depth`` (``CheckpointError`` naming ``where``)."""
    if _depth(text) > max_depth:
        raise CheckpointError(f"{where} nests deeper than {max_depth} levels, which no file ebcompile reads does. "
                              "Fix: pass the file ebcompile or transformers wrote.")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where} is not valid JSON ({str(exc)[:120]}). Fix: save it again.") from exc


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path`` (bounded size and nesting); every failure is a ``CheckpointError``."""
    path = Path(path)
    with guard(path, "read"):
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block the read, or never end
            raise CheckpointError(f"{path} is not a regular file. Fix: pass the file ebcompile or transformers wrote.")
        size = info.st_size
        if size > max_bytes:
            raise CheckpointError(f"{path} is {size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB of JSON "
                                  "ebcompile reads. Fix: pass the file ebcompile or transformers wrote.")
        raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text. Fix: save it again.") from exc
    return parse_json(text, str(path))
