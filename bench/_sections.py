"""Benches write their tables into marked sections of Markdown files under docs/."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebcompile.io import atomic_path  # noqa: E402


def write_section(doc: str, name: str, block: str) -> Path:
    """Replace (or append) the ``<!-- name:begin/end -->`` section of ``docs/<doc>``, atomically."""
    path = ROOT / "docs" / doc
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{block}\n{end}"
    if begin in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(new)
    return path


def publish(doc: str, name: str, header: str, text: str, write: bool = True) -> None:
    """Print a bench's header and table, and (``write``) put them in their section of ``docs/<doc>``."""
    block = f"{header}\n\n{text}"
    print(block)
    if write:
        print(f"written to {write_section(doc, name, block)}")
