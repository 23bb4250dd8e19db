"""A compact model over 2 GB exports, verifies and reloads in onnxruntime (external data).

    OMP_NUM_THREADS=2 python bench/onnx_large.py            # Llama-style GQA decoder, ~2.4 GB compact, fp32
    OMP_NUM_THREADS=2 python bench/onnx_large.py --small    # the same path on a ~40 MB model (a smoke run)

A Llama decoder (16 query heads over 4 KV heads) gets a structured ticket at p = 0.1 drawn from its random weights
and is compacted; ``export_onnx(fused_attention=True)`` then writes it with its weights in one data file beside the
``.onnx`` (automatic: they pass the 2 GB protobuf limit), checks it, and verifies it in onnxruntime against PyTorch.
The file is then loaded again in onnxruntime in this process and run on another batch and sequence length.
Peak RSS of this process is reset (``/proc/self/clear_refs``) before the export, so it is the export's own peak
(onnxruntime's check inside the export runs in a child process); the reload runs in a fresh process too, which
reports its own peak. Writes the ``onnx_large`` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ebcompile  # noqa: E402
from ebcompile.export.onnx import export_onnx  # noqa: E402
from ebcompile.export.optimize import FUSED_ATTENTION_OPS  # noqa: E402
from ebcompile.search.ticket import draw_ticket  # noqa: E402

from _sections import publish  # noqa: E402

GiB = 2**30


def _status(key: str) -> int:
    """``VmHWM`` / ``VmRSS`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    except OSError:
        pass


def _tokens(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 32000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def build(small: bool, ratio: float) -> torch.nn.Module:
    import transformers as t

    layers, hidden, inter = (2, 512, 1408) if small else (12, 2048, 5632)
    config = t.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                           intermediate_size=inter, vocab_size=32000, max_position_embeddings=256,
                           tie_word_embeddings=False)
    torch.manual_seed(0)
    model = t.LlamaForCausalLM(config).eval()
    ebcompile.prepare(model, _tokens(1, 16, 0), ratio=ratio, structure="structured", importance="magnitude")
    ebcompile.apply_ticket(model, draw_ticket(model))
    compact = ebcompile.compact(model).eval()
    del model
    gc.collect()
    return compact


CONFIGS = {"fused attention": {"fused_attention": True},
           "fused attention + optimizer": {"fused_attention": True, "optimize": True}}


def run(small: bool, ratio: float, folder: Path, configs: list[str]) -> tuple[float, list[dict]]:
    """Build the compact model once, then export and reload it per config: (build seconds, one row per config)."""
    t0 = time.perf_counter()
    model = build(small, ratio)
    build_s = time.perf_counter() - t0
    other = _tokens(2, 24, 1)
    with torch.no_grad():  # the reference for the reload
        want = model(**other, use_cache=False).logits.numpy()
    rows = []
    for name in configs:
        row: dict = {"config": name, "params": sum(p.numel() for p in model.parameters()),
                     "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
        out = folder / "llama.onnx"
        try:
            gc.collect()
            row["rss_before"] = _status("VmRSS")
            _reset_peak()
            t0 = time.perf_counter()
            rep = export_onnx(model, out, _tokens(1, 16, 0), external_data=True if small else None, **CONFIGS[name])
            row["export_s"] = time.perf_counter() - t0
            row["export_peak"] = _status("VmHWM")
            row.update(external=rep.external_data, files=[(Path(f).name, Path(f).stat().st_size) for f in rep.files],
                       verify_diff=rep.max_abs_error, notes=rep.notes, optimized=rep.optimized)
            row["fused"] = sum(rep.op_counts.get(op, 0) for op in FUSED_ATTENTION_OPS)
            got, row["reload_s"], row["reload_peak"] = reload(out, {k: v.numpy() for k, v in other.items()})
            row["reload_diff"], row["reload_ref"] = float(np.abs(got - want).max()), float(np.abs(want).max())
        except Exception as exc:  # noqa: BLE001 - reported in the table
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        for f in folder.iterdir():
            f.unlink()
        rows.append(row)
    return build_s, rows


RELOAD = """
import json, sys, time
from pathlib import Path
import numpy as np
import onnxruntime as ort
start = time.perf_counter()
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
with np.load(sys.argv[2]) as feeds:
    got = session.run(None, {k: feeds[k] for k in feeds.files})[0]  # output_0: the logits
seconds = time.perf_counter() - start
np.save(sys.argv[3], got)
hwm = next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak": hwm}))
"""


def reload(path: Path, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, float, int]:
    """Load ``path`` in onnxruntime in a fresh process and run it: (first output, seconds, that process's peak RSS)."""
    folder = path.parent
    np.savez(folder / "feeds.npz", **feeds)
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(path), str(folder / "feeds.npz"), str(folder / "got.npy")],
                          capture_output=True, text=True, check=True)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return np.load(folder / "got.npy"), found["seconds"], found["peak"]


OPTIMIZER_NOTE = (
    "\n\nNot in the table: `optimize=True` (onnxruntime's transformer optimizer) on this model works with external data "
    "(tests/test_export_external.py runs it on spilled weights) but was stopped at 13 GB RSS and climbing on this 24 GB "
    "machine: the optimizer loads every weight into a Python protobuf and fuses on copies of them. Run it with "
    "`--config 'fused attention + optimizer'` on a machine with more memory.")


def _line(row: dict) -> str:
    if "error" in row:
        return f"| {row['config']} | {row['params'] / 1e6:.0f} M | failed: {row['error']} |" + " |" * 10
    files = ", ".join(f"`{n}` {s / GiB:.3f} GiB" if s > GiB / 100 else f"`{n}` {s / 2**10:.0f} KiB" for n, s in row["files"])
    return (f"| {row['config']} | {row['params'] / 1e6:.0f} M | {row['weight_bytes'] / GiB:.2f} GiB | {files} "
            f"| {row['external']} | {row['fused']} | {row['export_s']:.0f} | {row['rss_before'] / GiB:.2f} GiB "
            f"| {row['export_peak'] / GiB:.2f} GiB | {row['verify_diff']:.2e} | {row['reload_s']:.1f} "
            f"| {row['reload_peak'] / GiB:.2f} GiB | {row['reload_diff']:.2e} (max abs logit {row['reload_ref']:.2f}) |")


def table(rows: list[dict]) -> str:
    return "\n".join([
        "| export | params | fp32 weights | files written | external data | fused attention nodes | export s "
        "| RSS before export | export peak RSS | verify max diff | reload + run s | reload peak RSS "
        "| reload max diff (batch 2, seq 24) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[_line(r) for r in rows],
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a ~40 MB model: the same path, quickly (not written)")
    parser.add_argument("--ratio", type=float, default=0.1, help="structured ticket ratio before compaction")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--config", choices=list(CONFIGS), action="append",
                        help="the exports to run (default: fused attention only; the optimizer one needs >13 GB here)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    with tempfile.TemporaryDirectory(prefix="onnx-large-") as tmp:
        build_s, rows = run(args.small, args.ratio, Path(tmp), args.config or ["fused attention"])
    header = (f"### ONNX export above 2 GB (external data)\n\nMeasured {date.today()} on CPU ({platform.machine()}, "
              f"{torch.get_num_threads()} threads), torch {torch.__version__}, onnxruntime {onnxruntime.__version__}. "
              f"A Llama-style decoder (16 query / 4 KV heads, vocab 32000, untied head) with a structured ticket at "
              f"p = {args.ratio} from random weights, compacted (build + ticket + compact: {build_s:.0f} s), then "
              "`export_onnx(model, path, example, fused_attention=True)` with `external_data` left automatic: the graph "
              "in the `.onnx`, the weights in one data file beside it. The export includes `onnx.checker` (path form) "
              "and the onnxruntime check in a child process against PyTorch (1e-4 + 1e-4·|ref|); export peak RSS is the "
              "exporting process's high-water mark from the start of the export (the model itself is \"RSS before\"; "
              "the onnxruntime check's child process is not included). Reload: a fresh process opens an onnxruntime "
              "CPU session from the path and runs batch 2 × 24 tokens, compared with PyTorch; its peak RSS is its own. "
              "Written by `OMP_NUM_THREADS=2 python bench/onnx_large.py`.")
    notes = "\n".join(f"- {r['config']}: {n}" for r in rows for n in r.get("notes", []))
    if "fused attention + optimizer" not in {r["config"] for r in rows}:
        notes += OPTIMIZER_NOTE
    publish("benchmarks.md", "onnx_large", header, table(rows) + ("\n\nExport notes:\n" + notes if notes else ""),
            write=not (args.small or args.no_write))


if __name__ == "__main__":
    main()
