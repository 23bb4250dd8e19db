"""What the text and image searches (``recipes/text.py``, ``recipes/image.py``) share at both ends of a run: the
check that a resumed search keeps its saved settings, and the ticket and ``search.json`` a finished one writes.

Invariant: a resume with other settings is refused (``ConfigError``) before anything in ``--out`` changes;
``search.json`` is written atomically; a run that fails or is interrupted leaves no empty ``--out`` it created.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..persist.io import atomic_path
from .settings import SearchSettings

__all__ = ["refuse_other_settings", "finish", "removed_if_left_empty"]


def refuse_other_settings(out: Path, saved: dict[str, Any], settings: dict[str, Any], keys: tuple[str, ...]) -> None:
    """``ConfigError`` naming the settings of the search saved in ``out`` that this run changes (a resume needs them
    equal; only ``--epochs`` may change)."""
    changed = [k for k in keys if saved.get(k) != settings[k]]
    if changed:
        was = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
        raise ConfigError(f"{out} holds a search with other settings ({was}). Fix: pass the same settings to resume it "
                          "(only --epochs may change), or a new --out.")


def finish(args: SearchSettings, out: Path, eb: Any, result: dict[str, Any], step: int, longer: str) -> int:
    """Write the ticket and ``search.json`` of a finished search and say what to do next; 1 when no ticket appeared."""
    if eb.found:
        eb.ticket.save(out / "ticket.safetensors")
        result["found_at"] = eb.ticket.found_at
    with atomic_path(out / "search.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    if not eb.found:
        print(f"no ticket within {step} steps ({eb.checks} checks; distances in {out / 'search.json'}). {longer}, check "
              "more often (--every) or loosen --threshold.")
        return 1
    how = "by the deadline (--deadline)" if eb.ticket.found_at.get("by") == "deadline" else "by the rule"
    print(f"ticket found {how} at step {eb.ticket.found_at['tick']} ({eb.checks} checks), validation accuracy of the early-bird "
          f"model {result['validation_accuracy']:.2%}; pruned {eb.ticket.sparsity():.1%} of the {args.structure} units.")
    print(f"written to {out}/ (model/, ticket.safetensors, earlybird.safetensors, search.png). "
          f"Next: ebcompile retrain {out} --data {args.data} --out <folder>")
    return 0


@contextmanager
def removed_if_left_empty(out: str | os.PathLike) -> Iterator[None]:
    """Around a run that writes ``out``: if it raises (or is interrupted), the folders it created (``out`` and the
    missing parents made with it, e.g. by the Trainer's ``output_dir``) are removed again while they hold no file."""
    created, path = [], Path(out).expanduser().absolute()
    for folder in [path, *path.parents]:  # out first, then each missing parent up to the first that exists
        if folder.exists() or folder.is_symlink():
            break
        created.append(folder)
    try:
        yield
    except BaseException:
        if created and created[0].is_dir() and not created[0].is_symlink() and not _holds_files(created[0]):
            shutil.rmtree(created[0], ignore_errors=True)
            for parent in created[1:]:
                try:
                    parent.rmdir()  # only while empty
                except OSError:
                    break
        raise


def _holds_files(folder: Path) -> bool:
    """Anything but (empty) directories below ``folder``; symbolic links count and are not followed."""
    for root, dirs, files in os.walk(folder):
        if files or any(os.path.islink(os.path.join(root, d)) for d in dirs):
            return True
    return False
