"""Dense vs compact early-bird tickets: latency on onnxruntime and PyTorch eager, beside FLOP ratios.

    python bench/onnx_gpu.py            # GPU when present (ORT CUDA EP + IOBinding, fp16), else CPU EP (fp32)
    python bench/onnx_gpu.py --quick    # small batches, for a CPU machine

Prints a Markdown table and writes it to docs/benchmarks.md (between the markers of its section).
Models have random weights: a ticket drawn from them prunes arbitrary units, which is all latency needs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ebcompile  # noqa: E402
from ebcompile.export.onnx import export_onnx, ort_session  # noqa: E402
from ebcompile.passes.shrink import compact  # noqa: E402
from ebcompile.report import count_macs, count_parameters  # noqa: E402
from ebcompile.ticket import draw_ticket  # noqa: E402
from ebcompile.timing import median_ms  # noqa: E402

from _sections import publish  # noqa: E402


def gpt2_shaped_encoder(seq: int = 512) -> torch.nn.Module:
    """12 layers, 12 heads, width 768, FFN 3072: GPT-2-small's shape as a bidirectional encoder."""
    from torchvision.models.vision_transformer import Encoder

    return Encoder(seq_length=seq, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072, dropout=0.0,
                   attention_dropout=0.0)


MODELS = {
    "vit_b_16": (lambda s: torchvision.models.vit_b_16(), lambda b, s: torch.randn(b, 3, 224, 224)),
    "swin_t": (lambda s: torchvision.models.swin_t(), lambda b, s: torch.randn(b, 3, 224, 224)),
    "gpt2-encoder": (gpt2_shaped_encoder, lambda b, s: torch.randn(b, s, 768)),
}


def eager_ms(model, x, device, dtype, repeats) -> float:
    model = model.to(device, dtype).eval()
    x = x.to(device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        return median_ms(lambda: model(x), repeats, sync)


def ort_ms(path, x, device, dtype, repeats) -> tuple[float, str]:
    session = ort_session(path, prefer_gpu=device == "cuda")
    provider = session.get_providers()[0]
    name = session.get_inputs()[0].name
    if provider == "CUDAExecutionProvider":
        xin = x.to("cuda", dtype).contiguous()
        binding = session.io_binding()
        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        binding.bind_input(name, "cuda", 0, np_dtype, list(xin.shape), xin.data_ptr())
        binding.bind_output(session.get_outputs()[0].name, "cuda")
        return median_ms(lambda: session.run_with_iobinding(binding), repeats, torch.cuda.synchronize), provider
    feed = {name: x.to(dtype).numpy()}
    return median_ms(lambda: session.run(None, feed), repeats, lambda: None), provider


def run(models, ratios, batches, seq, repeats, optimize) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    rows = []
    jobs = [(m, b, r) for m in models for b in batches[m] for r in [0.0, *ratios]]
    for name, batch, ratio in tqdm(jobs, desc="bench"):
        build, inputs = MODELS[name]
        torch.manual_seed(0)
        x = inputs(batch, seq)
        row = {"model": name, "batch": batch, "config": "dense" if ratio == 0 else f"p={ratio}"}
        try:
            model = build(seq).eval()
            if ratio:
                ebcompile.prepare(model, inputs(1, seq), ratio=ratio, structure="structured")
                ebcompile.apply_ticket(model, draw_ticket(model))
                model = compact(model).eval()
            row["params"] = count_parameters(model)
            row["macs"] = count_macs(model, inputs(1, seq))
            row["eager_ms"] = eager_ms(model, x, device, dtype, repeats)
            with tempfile.TemporaryDirectory() as tmp:
                for key, fused in (("ort", False), ("fused", True)):
                    path = Path(tmp) / f"{key}.onnx"
                    export_onnx(model.float().cpu(), path, inputs(1, seq), dtype="fp16" if dtype == torch.float16 else "fp32",
                                optimize=optimize, verify=device == "cpu", fused_attention=fused)
                    row[f"{key}_ms"], row["provider"] = ort_ms(path, x, device, dtype, repeats)
        except Exception as exc:  # noqa: BLE001 - a failing model is reported in the table
            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    dense = {(r["model"], r["batch"]): r for r in rows if r["config"] == "dense"}
    out = ["| model | batch | config | params | FLOP ratio | eager ms | eager ratio | ORT ms | ORT ratio | ORT / eager "
           "| ORT fused-attention ms | fused ratio | fused / eager | EP |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['batch']} | {r['config']} | failed: {r['error']} | | | | | | | | | | |")
            continue
        d = dense.get((r["model"], r["batch"]), r)
        ok = "error" not in d
        out.append(
            f"| {r['model']} | {r['batch']} | {r['config']} | {r['params'] / 1e6:.1f}M | "
            f"{r['macs'] / d['macs']:.3f} | {r['eager_ms']:.2f} | {r['eager_ms'] / d['eager_ms']:.3f} | "
            f"{r['ort_ms']:.2f} | {r['ort_ms'] / d['ort_ms']:.3f} | {r['ort_ms'] / r['eager_ms']:.2f} | "
            f"{r['fused_ms']:.2f} | {r['fused_ms'] / d['fused_ms']:.3f} | {r['fused_ms'] / r['eager_ms']:.2f} | "
            f"{r['provider'].replace('ExecutionProvider', '')} |" if ok
            else f"| {r['model']} | {r['batch']} | {r['config']} | dense failed | | | | | | | | | | |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.3])
    p.add_argument("--quick", action="store_true", help="CPU-sized batches: ViT/Swin b1, encoder b1 x 128")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--optimize", action="store_true", help="run onnxruntime's transformer optimizer on the export")
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args()
    gpu = torch.cuda.is_available()
    if a.quick or not gpu:
        batches, seq, repeats = {"vit_b_16": [1], "swin_t": [1], "gpt2-encoder": [1]}, 128, a.repeats or 5
    else:
        batches, seq, repeats = {"vit_b_16": [1, 64], "swin_t": [64], "gpt2-encoder": [8]}, 512, a.repeats or 20
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(a.models, a.ratios, batches, seq, repeats, a.optimize)
    where = (f"GPU {torch.cuda.get_device_name()} (fp16, ORT CUDA EP + IOBinding)" if gpu
             else f"CPU only ({torch.get_num_threads()} threads, fp32, ORT CPU EP; "
                  "no GPU on this machine — GPU lines unmeasured)")
    header = (f"## ONNX Runtime vs eager, dense vs compact\n\nMeasured {time.strftime('%Y-%m-%d')} on {where}; "
              f"torch {torch.__version__}; encoder sequence {seq}; median of {repeats}; "
              f"optimizer {'on' if a.optimize else 'off'}. "
              "Written by `python bench/onnx_gpu.py" + (" --quick" if a.quick else "") + "`.")
    text = table(rows)
    publish("benchmarks.md", "onnx_gpu", header, text, write=not a.no_write)


if __name__ == "__main__":
    main()
