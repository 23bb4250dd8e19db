"""Dense vs compact early-bird tickets, per family: latency on ONNX Runtime (plain export, and fused attention +
transformer optimizer), PyTorch eager and torch.compile, beside FLOP ratios, as ratios within one run.

    python bench/onnx_gpu.py            # on a GPU: fp16, ORT CUDA EP + IOBinding, eager, torch.compile
    python bench/onnx_gpu.py --quick    # tiny models, batch 1, CPU EP fp32: a smoke run for a CPU machine

Families: torchvision ViT-B/16 and Swin-T, Hugging Face GPT-2, BERT, ViT, and a Llama decoder with grouped-query
attention (16 heads over 4 KV heads). Each is compacted at p = 0.1 / 0.3 / 0.5 (structured ticket drawn from its
random weights: latency only needs the shapes). The GPU run writes the ``onnx_gpu`` section of docs/benchmarks.md,
a CPU run the ``onnx_cpu`` section. onnxruntime-gpu on the GPU machine: see /work/shared/docs/gpu.md.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torchvision
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ebcompile  # noqa: E402
from ebcompile.export.onnx import export_onnx, ort_session  # noqa: E402
from ebcompile.export.optimize import FUSED_ATTENTION_OPS  # noqa: E402
from ebcompile.report import count_macs, count_parameters  # noqa: E402
from ebcompile.search.ticket import draw_ticket  # noqa: E402
from ebcompile.timing import median_ms  # noqa: E402

from _sections import publish  # noqa: E402

NP_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32}


@dataclass(frozen=True)
class Family:
    build: Callable[[bool], torch.nn.Module]  # quick -> model
    inputs: Callable[[int, int, bool], Any]  # (batch, seq, quick) -> a tensor or keyword tensors
    batch: int  # GPU batch (quick: 1)


def _tokens(b: int, s: int, quick: bool) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 1000, (b, s)), "attention_mask": torch.ones(b, s, dtype=torch.long)}


def _images(b: int, s: int, quick: bool) -> torch.Tensor:
    return torch.randn(b, 3, 32 if quick else 224, 32 if quick else 224)


def _hf(kind: str, quick: bool) -> torch.nn.Module:
    import transformers as t

    small = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128)
    if kind == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=1000) if quick else t.GPT2Config())
    if kind == "bert":
        return t.BertForSequenceClassification(t.BertConfig(**small, vocab_size=1000) if quick else t.BertConfig())
    if kind == "vit":
        return t.ViTForImageClassification(t.ViTConfig(**small, image_size=32, patch_size=8) if quick else t.ViTConfig())
    config = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  vocab_size=1000) if quick else dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                                                      num_key_value_heads=4, intermediate_size=2816, vocab_size=32000)
    return t.LlamaForCausalLM(t.LlamaConfig(**config, max_position_embeddings=1024))


def _tv(kind: str, quick: bool) -> torch.nn.Module:
    from torchvision.models import SwinTransformer, VisionTransformer

    if kind == "vit":
        return VisionTransformer(32, 8, 2, 4, 64, 128, num_classes=10) if quick else torchvision.models.vit_b_16()
    return SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], num_classes=10) if quick else torchvision.models.swin_t()


FAMILIES = {
    "tv-vit_b_16": Family(lambda q: _tv("vit", q), _images, 64),
    "tv-swin_t": Family(lambda q: _tv("swin", q), _images, 64),
    "hf-gpt2": Family(lambda q: _hf("gpt2", q), _tokens, 8),
    "hf-bert": Family(lambda q: _hf("bert", q), _tokens, 8),
    "hf-vit": Family(lambda q: _hf("vit", q), lambda b, s, q: {"pixel_values": _images(b, s, q)}, 64),
    "llama-gqa": Family(lambda q: _hf("llama", q), _tokens, 8),
}


def _call(model: torch.nn.Module, x: Any) -> Any:
    if not isinstance(x, dict):
        return model(x)
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    return model(**x, **extra)


def _to(x: Any, device: str, dtype: torch.dtype) -> Any:
    move = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    return {k: move(v) for k, v in x.items()} if isinstance(x, dict) else move(x)


def torch_ms(model: torch.nn.Module, x: Any, device: str, dtype: torch.dtype, repeats: int, compiled: bool) -> float:
    model = model.to(device, dtype).eval()
    run = torch.compile(model) if compiled else model
    x = _to(x, device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        return median_ms(lambda: _call(run, x), repeats, sync)


def ort_ms(path: Path, x: Any, device: str, dtype: torch.dtype, repeats: int) -> tuple[float, str]:
    """ORT latency; on the CUDA EP every input and output stays on the GPU (IOBinding)."""
    session = ort_session(path, prefer_gpu=device == "cuda")
    provider = session.get_providers()[0]
    feeds = x if isinstance(x, dict) else {"input": x}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}
    if provider == "CUDAExecutionProvider":
        binding, keep = session.io_binding(), []
        for name, t in feeds.items():
            t = (t.to("cuda", dtype) if t.is_floating_point() else t.to("cuda")).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", 0, NP_DTYPES[t.dtype], list(t.shape), t.data_ptr())
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda")
        return median_ms(lambda: session.run_with_iobinding(binding), repeats, torch.cuda.synchronize), provider
    host = {k: (v.to(dtype) if v.is_floating_point() else v).numpy() for k, v in feeds.items()}
    return median_ms(lambda: session.run(None, host), repeats), provider


def _ticketed(name: str, ratio: float, quick: bool, seq: int) -> torch.nn.Module:
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.build(quick).eval()
    if ratio:
        ebcompile.prepare(model, family.inputs(1, seq, quick), ratio=ratio, structure="structured", importance="magnitude")
        ebcompile.apply_ticket(model, draw_ticket(model))
        model = ebcompile.compact(model).eval()
    return model


def measure(name: str, ratio: float, batch: int, seq: int, repeats: int, quick: bool, compiled: bool) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    family = FAMILIES[name]
    row: dict[str, Any] = {"model": name, "batch": batch, "config": "dense" if ratio == 0 else f"p={ratio}"}
    try:
        model = _ticketed(name, ratio, quick, seq)
        torch.manual_seed(1)
        x, example = family.inputs(batch, seq, quick), family.inputs(1, seq, quick)
        row["params"], row["macs"] = count_parameters(model), count_macs(model, example)
        row["eager_ms"] = torch_ms(model, x, device, dtype, repeats, compiled=False)
        if compiled:
            row["compile_ms"] = _or_error(row, "compile", lambda: torch_ms(model, x, device, dtype, repeats, compiled=True))
        with tempfile.TemporaryDirectory() as tmp:
            for key, optimize in (("ort", False), ("fused", True)):
                path = Path(tmp) / f"{key}.onnx"

                def timed(path=path, optimize=optimize) -> float:
                    export_onnx(model.float().cpu(), path, example, dtype="fp16" if dtype == torch.float16 else "fp32",
                                optimize=optimize, fused_attention=optimize, verify=device == "cpu")
                    ms, row["provider"] = ort_ms(path, x, device, dtype, repeats)
                    return ms

                row[f"{key}_ms"] = _or_error(row, key, timed)
                if optimize and path.exists():
                    row["fused_nodes"] = sum(n.op_type in FUSED_ATTENTION_OPS for n in onnx.load(str(path)).graph.node)
    except Exception as exc:  # noqa: BLE001 - a failing model is reported in the table
        row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return row


def _or_error(row: dict, key: str, fn: Callable[[], float]) -> float | None:
    """``fn()``, or None with the error kept in ``row["errors"]`` (one failing column leaves the others)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported under the table
        row.setdefault("errors", []).append(f"{key}: {type(exc).__name__}: {str(exc)[:160]}")
        return None


def _ratio(r: dict, d: dict, key: str) -> str:
    return f"{r[key]:.2f} | {r[key] / d[key]:.3f}" if r.get(key) and d.get(key) else "– | –"


def table(rows: list[dict]) -> str:
    dense = {(r["model"], r["batch"]): r for r in rows if r["config"] == "dense"}
    out = ["| model | batch | config | params | FLOP ratio | eager ms | eager ratio | compile ms | compile ratio | ORT ms "
           "| ORT ratio | ORT fused ms | fused ratio | fused / eager | fused attention nodes | EP |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = dense.get((r["model"], r["batch"]), {})
        if "error" in r or "error" in d:
            out.append(f"| {r['model']} | {r['batch']} | {r['config']} | failed: {r.get('error', 'dense failed')} |"
                       + " |" * 12)
            continue
        vs_eager = f"{r['fused_ms'] / r['eager_ms']:.2f}" if r.get("fused_ms") else "–"
        out.append(
            f"| {r['model']} | {r['batch']} | {r['config']} | {r['params'] / 1e6:.2f}M | {r['macs'] / d['macs']:.3f} | "
            f"{_ratio(r, d, 'eager_ms')} | {_ratio(r, d, 'compile_ms')} | {_ratio(r, d, 'ort_ms')} | "
            f"{_ratio(r, d, 'fused_ms')} | {vs_eager} | {r.get('fused_nodes', '–')} | "
            f"{r.get('provider', '–').replace('ExecutionProvider', '')} |")
    errors = [f"- {r['model']} {r['config']}: {e}" for r in rows for e in r.get("errors", [])]
    return "\n".join(out + (["", "Errors:", *errors] if errors else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.3, 0.5])
    p.add_argument("--quick", action="store_true", help="tiny models, batch 1, sequence 32: a CPU smoke run")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="token sequence length (default 512; quick 32)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (default: on a GPU only)")
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args()
    gpu = torch.cuda.is_available()
    quick = a.quick or not gpu
    seq = a.seq or (32 if quick else 512)
    repeats = a.repeats or (5 if quick else 20)
    compiled = gpu and not a.no_compile
    jobs = [(m, r) for m in a.models for r in [0.0, *a.ratios]]
    rows = [measure(m, r, 1 if quick else FAMILIES[m].batch, seq, repeats, quick, compiled) for m, r in tqdm(jobs, desc="bench")]
    where = (f"GPU {torch.cuda.get_device_name()} (fp16; ORT CUDA EP + IOBinding)" if gpu
             else f"CPU only ({torch.get_num_threads()} threads, fp32, ORT CPU EP, tiny models; no GPU on this machine)")
    import onnxruntime

    header = (f"## ONNX Runtime vs PyTorch, dense vs compact, per family\n\nMeasured {time.strftime('%Y-%m-%d')} on {where}; "
              f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; token sequence {seq}; median of {repeats}. "
              "ORT: plain export; ORT fused: `export_onnx(optimize=True)` (one fused attention node per layer + "
              "LayerNorm/GELU fusions). Ratios are to the dense row of the same model and batch. Written by "
              "`python bench/onnx_gpu.py" + (" --quick" if a.quick else "") + "`.")
    publish("benchmarks.md", "onnx_gpu" if gpu else "onnx_cpu", header, table(rows), write=not a.no_write)


if __name__ == "__main__":
    main()
