"""Benches write their tables into marked sections of Markdown files under docs/."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebcompile.persist.io import atomic_path  # noqa: E402


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


def kept_sections(old: str, new: str) -> str:
    """``new`` with every marked section of ``old`` that ``new`` lacks appended (a generator that rewrites a whole
    document, e.g. reproduce.py's RESULTS.md, keeps the sections other benches write into it)."""
    pos = 0
    while (start := old.find("<!-- ", pos)) >= 0:
        stop = old.find(" -->", start)
        tag = old[start + 5:stop]
        pos = stop
        if not tag.endswith(":begin"):
            continue
        end = f"<!-- {tag[:-6]}:end -->"
        if f"<!-- {tag} -->" in new or end not in old[stop:]:
            continue
        block = old[start:old.index(end, stop) + len(end)]
        new, pos = new.rstrip() + "\n\n" + block + "\n", old.index(end, stop)
    return new


def publish(doc: str, name: str, header: str, text: str, write: bool = True) -> None:
    """Print a bench's header and table, and (``write``) put them in their section of ``docs/<doc>``."""
    block = f"{header}\n\n{text}"
    print(block)
    if write:
        print(f"written to {write_section(doc, name, block)}")
