"""The seed paper's memory table (its Table 1), redone with real bytes, beside structured compaction.

    python bench/memory_table.py            # vit_b_16, swin_t, and HF GPT-2 / RoBERTa (random init, no hub)

For each model: dense; unstructured p = 0.1 / 0.3 (non-zero parameters — what the seed paper's "memory"
column appears to count — then the bytes a CSR copy and a bitmap + values copy really take, and the
latency of the CSR model); structured p = 0.1 / 0.3 after compaction (parameters, bytes, MACs, latency).
CPU latency, batch 1, median of --repeats. Writes a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ebcompile  # noqa: E402
from ebcompile.report import count_macs, count_parameters  # noqa: E402
from ebcompile.transforms.shrink import storage_bytes  # noqa: E402

from _sections import publish  # noqa: E402


def _gpt2():
    import transformers as tf

    return tf.GPT2ForSequenceClassification(tf.GPT2Config(num_labels=2, pad_token_id=0, use_cache=False))


def _roberta():
    import transformers as tf

    return tf.RobertaForSequenceClassification(tf.RobertaConfig(num_labels=2))


def models():
    ids = lambda: {"input_ids": torch.randint(5, 1000, (1, 128))}  # noqa: E731
    image = lambda: torch.randn(1, 3, 224, 224)  # noqa: E731
    return {
        "vit_b_16": (torchvision.models.vit_b_16, image),
        "swin_t": (torchvision.models.swin_t, image),
        "gpt2 (seq 128)": (_gpt2, ids),
        "roberta-base (seq 128)": (_roberta, ids),
    }


def latency_ms(model, x, repeats: int) -> float:
    model.eval()
    args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
    with torch.inference_mode():
        model(*args, **kwargs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(*args, **kwargs)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(name, build, inputs, ratios, repeats) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    x = inputs()
    dense = build().eval()
    base = {"model": name, "config": "dense", "params": count_parameters(dense), "nonzero": count_parameters(dense, nonzero=True),
            "bytes": storage_bytes(dense)["sparse"], "macs": count_macs(dense, x), "ms": latency_ms(dense, x, repeats)}
    rows.append(base)
    for structure in ("unstructured", "structured"):
        for ratio in ratios:
            torch.manual_seed(0)
            model = ebcompile.prepare(build().eval(), x, ratio=ratio, structure=structure, importance="magnitude")
            ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
            row = {"model": name, "config": f"{structure} p={ratio}", "nonzero": count_parameters(model, nonzero=True)}
            small = ebcompile.compact(model, sparse=structure == "unstructured").eval()
            sb = storage_bytes(small)
            row["params"] = count_parameters(small) if structure == "structured" else base["params"]
            row["bytes"] = sb["sparse"]
            if structure == "unstructured":  # a bitmap (1 bit per weight) + the kept values, as a third way
                masked = sum(m.numel() for m in (t for n, t in model.state_dict().items() if n.endswith("weight_mask")))
                kept = sum(int(m.sum()) for n, m in model.state_dict().items() if n.endswith("weight_mask"))
                row["bitmap_bytes"] = base["bytes"] - 4 * masked + 4 * kept + masked // 8
            row["macs"] = count_macs(small, x) if structure == "structured" else base["macs"]
            row["ms"] = latency_ms(small, x, repeats)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | config | parameters | non-zero | bytes stored | bytes (bitmap + values) | MACs | CPU ms (b1) |",
           "|---|---|---|---|---|---|---|---|"]
    dense = {r["model"]: r for r in rows if r["config"] == "dense"}
    for r in rows:
        d = dense[r["model"]]
        if "error" in r:
            out.append(f"| {r['model']} | {r['config']} | failed: {r['error']} | | | | | |")
            continue

        def rel(k: str, r: dict = r, d: dict = d) -> str:
            return f" ({r[k] / d[k]:.2f}×)" if r is not d else ""

        bitmap = f"{r['bitmap_bytes'] / 1e6:.1f} MB ({r['bitmap_bytes'] / d['bytes']:.2f}×)" if "bitmap_bytes" in r else ""
        out.append(f"| {r['model']} | {r['config']} | {r['params'] / 1e6:.1f}M{rel('params')} "
                   f"| {r['nonzero'] / 1e6:.1f}M{rel('nonzero')} | {r['bytes'] / 1e6:.1f} MB{rel('bytes')} | {bitmap} "
                   f"| {r['macs'] / 1e9:.2f} G{rel('macs')} | {r['ms']:.0f}{rel('ms')} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.3])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    rows = []
    chosen = {k: v for k, v in models().items() if a.models is None or k.split()[0] in a.models}
    for name, (build, inputs) in tqdm(chosen.items(), desc="models"):
        try:
            rows += measure(name, build, inputs, a.ratios, a.repeats)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            rows.append({"model": name, "config": "dense", "error": f"{type(exc).__name__}: {str(exc)[:150]}"})
    header = (f"## Memory: the seed paper's Table 1 with real bytes\n\nMeasured {time.strftime('%Y-%m-%d')} on the CPU "
              f"({torch.get_num_threads()} threads, fp32, batch 1, median of {a.repeats}) by `python bench/memory_table.py`; "
              "random weights, one-shot magnitude tickets. Unstructured rows store the masked linears as CSR "
              "(`compact(sparse=True)`); structured rows are the compacted dense models.")
    text = table(rows)
    publish("benchmarks.md", "memory", header, text, write=not a.no_write)


if __name__ == "__main__":
    main()
