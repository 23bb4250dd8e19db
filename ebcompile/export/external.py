"""ONNX exports with their weights beside them (external data), for models whose protobuf would pass 2 GB.

Invariant: an export is one ``.onnx`` file and at most one data file beside it, which the ``.onnx`` names (and
stamps in its ``metadata_props`` as ``ebcompile.external_data``). The data file is linked into place under a name no
file there has, before the ``.onnx`` is renamed over the old one, so a crash at any instant leaves the previous
export or the new one whole (at worst beside an unreferenced data file). The previous export's data file is removed
only after the new ``.onnx`` is in place, and only when that ``.onnx`` was stamped by ebcompile and names it: a file
no export wrote is never removed. Tensors are moved by streaming, one at a time: never the whole model in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto
from torch import nn

__all__ = ["INLINE_LIMIT", "STAMP", "weight_bytes", "has_external", "pack", "data_name", "previous_data", "publish"]

INLINE_LIMIT = 2**31 - 2**27  # weights above this go external: a protobuf holds 2 GB, graph and names included
THRESHOLD, ALIGN, CHUNK = 1024, 4096, 2**24  # tensors of 1 KiB and more go to the data file, 4 KiB-aligned
STAMP = "ebcompile.external_data"
_STAMPED_MAX = 2**28  # an .onnx with external data holds the graph only: a larger file is not one to read for its stamp


def weight_bytes(net: nn.Module, half: bool) -> int:
    """Bytes of ``net``'s distinct parameters and buffers as exported (floating ones in fp16 when ``half``)."""
    seen, total = set(), 0
    for t in [*net.parameters(), *net.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * (2 if half and t.is_floating_point() else t.element_size())
    return total


def _tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Initializers and tensor attributes of ``graph`` and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else []:
                yield from _tensors(sub)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def has_external(path: Path) -> bool:
    """Whether the ``.onnx`` at ``path`` keeps any tensor in external data."""
    return any(_external(t) for t in _tensors(onnx.load(str(path), load_external_data=False).graph))


def _entries(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _copy(src: Path, offset: int, length: int | None, out) -> int:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length if length is not None else os.fstat(f.fileno()).st_size - offset
        written = 0
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{src} ends {left} bytes early")
            out.write(chunk)
            left -= len(chunk)
            written += len(chunk)
    return written


def pack(onnx_path: Path, name: str) -> int:
    """Rewrite ``onnx_path`` (in a private folder) so every tensor of at least 1 KiB, inline or in any external
    file beside it (the exporter writes one per tensor), lies in ``onnx_path.parent / name``; the source files are
    removed. Returns the data file's size (0: no tensor qualified, and no data file is written)."""
    folder = onnx_path.parent
    model = onnx.load(str(onnx_path), load_external_data=False)  # external tensors stay on disk
    part, sources, offset, moved = folder / f"{name}.part", set(), 0, 0
    with open(part, "wb") as out:
        for tensor in _tensors(model.graph):
            if _external(tensor):
                info = _entries(tensor)
                src = (folder / info.get("location", "")).resolve()
                if src.parent != folder.resolve():
                    raise ValueError(f"tensor {tensor.name} points outside the export folder ({info.get('location')})")
                raw, sources = None, sources | {src}
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= THRESHOLD:
                raw = tensor.raw_data
            else:
                continue
            out.write(b"\0" * (-offset % ALIGN))
            offset += -offset % ALIGN
            if raw is None:
                length = int(info["length"]) if "length" in info else None
                size = _copy(src, int(info.get("offset", 0)), length, out)
            else:
                out.write(raw)
                size = len(raw)
                tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", name), ("offset", str(offset)), ("length", str(size))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset, moved = offset + size, moved + 1
    if not moved:
        part.unlink()
        return 0
    kept = [(e.key, e.value) for e in model.metadata_props if e.key != STAMP]
    del model.metadata_props[:]
    for key, value in [*kept, (STAMP, name)]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(onnx_path))
    for src in sources:
        src.unlink(missing_ok=True)
    os.replace(part, folder / name)
    return offset


def previous_data(path: Path) -> Path | None:
    """The data file of the ebcompile export now at ``path`` (its stamp names it, and its tensors use it), or None."""
    try:
        if not path.is_file() or path.stat().st_size > _STAMPED_MAX:
            return None
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file we can read: nothing of ours to remove
        return None
    name = next((e.value for e in model.metadata_props if e.key == STAMP), None)
    if not name or Path(name).name != name or name in (".", ".."):
        return None
    used = {_entries(t).get("location") for t in _tensors(model.graph) if _external(t)}
    return path.parent / name if used == {name} and (path.parent / name).is_file() else None


def data_name(path: Path) -> str:
    """A name beside ``path`` no file has: ``{name}.data``, else ``{name}.1.data``, ``{name}.2.data``, ..."""
    name, n = f"{path.name}.data", 0
    while os.path.lexists(path.parent / name):
        n += 1
        name = f"{path.name}.{n}.data"
    return name


def publish(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` (same file system), refusing to replace a file that appeared there meanwhile."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system
        if os.path.lexists(dst):
            raise FileExistsError(17, "a file appeared where the data file goes", str(dst)) from None
        os.replace(src, dst)
        return
    src.unlink()

