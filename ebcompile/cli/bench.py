"""``ebcompile bench``: parameters, MACs and latency of saved models side by side (e.g. dense vs compact).

Each model is an ``ebcompile.save`` directory, a Hugging Face folder or a hub name; all get the same made-up
batch. Latency is the median of ``--repeats`` runs in PyTorch eager and, with ``--onnx``, in onnxruntime
(exported to a temporary file). Ratios are against the first model.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="parameters, MACs and latency of models side by side (dense vs compact)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="ebcompile.save directories, Hugging Face folders or hub names")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128, help="sequence length for text models (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    p.add_argument("--onnx", action="store_true",
                   help="also time onnxruntime (CUDA EP when present, else CPU EP; fed from host memory, "
                        "so on a GPU its copies are timed: bench/onnx_gpu.py binds device buffers)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os
    import tempfile

    import torch

    from ..errors import ConfigError
    from ..report import count_macs
    from ..timing import eager_ms, ort_ms
    from .models import load_with_inputs

    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats} must be >= 1. Fix: e.g. --repeats 20.")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no GPU. Fix: --device cpu (or auto).")
    dtype = torch.float16 if args.fp16 else None
    rows = []
    for source in args.models:
        model, inputs = load_with_inputs(source, args.batch, args.seq)
        row = {"model": source, "parameters": sum(p.numel() for p in model.parameters()),
               "macs": count_macs(model, inputs), "eager": eager_ms(model, inputs, device, args.repeats, dtype)}
        if args.onnx:
            from ..export.onnx import export_onnx, ort_session

            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.onnx")
                export_onnx(model.float().cpu(), path, inputs,
                            dtype="fp16" if args.fp16 else "fp32", verify=False)
                session = ort_session(path, prefer_gpu=device == "cuda")
                row["ort"] = ort_ms(session, inputs, args.repeats)
                row["provider"] = session.get_providers()[0]
        rows.append(row)
    print(table(rows, device, args))
    return 0


def table(rows: list[dict], device: str, args: argparse.Namespace) -> str:
    base = rows[0]
    head = ("| model | parameters | MACs | eager ms |" + (" ORT ms |" if args.onnx else "")
            + " vs first: params / MACs / eager" + (" / ORT" if args.onnx else "") + " |")
    lines = [f"batch {args.batch}, seq {args.seq}, {device}{' fp16' if args.fp16 else ''}, median of {args.repeats}", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratios = [r["parameters"] / base["parameters"], r["macs"] / max(1, base["macs"]), r["eager"] / base["eager"]]
        cells = [r["model"], f"{r['parameters']:,}", f"{r['macs'] / 1e6:,.1f}M", f"{r['eager']:.2f}"]
        if args.onnx:
            cells.append(f"{r['ort']:.2f} ({r['provider'].replace('ExecutionProvider', '')})")
            ratios.append(r["ort"] / base["ort"])
        cells.append(" / ".join(f"{x:.3f}" for x in ratios))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
