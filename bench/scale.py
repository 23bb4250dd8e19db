"""ebcompile from ~50M to ~1.1B parameters (random-init Llama, no downloads), and the weightless analysis of 70B.

    python bench/scale.py                       # every config, each in a fresh subprocess, then docs/benchmarks.md
    python bench/scale.py --configs 56M 246M    # some of them
    python bench/scale.py --no-write            # print only

Per config, in its own process (so that its peak RSS is its own), one thread (``torch.set_num_threads(1)``):
prepare time and its peak memory as a ratio to the model's bytes (the model's bytes plus the peak RSS rise during
prepare, over the model's bytes: the model itself counts 1.0; the RSS the random init leaves behind is not
prepare's); one training step (batch 2 x seq 128; AdamW, SGD
without momentum at 1.1B where AdamW's states would not fit next to other work); the second EarlyBird check of a
structured search for each importance kind, as a ratio to that step; ``apply_ticket`` + ``compact`` as a ratio
to a step; ``export_onnx`` of the compact model where the model is under 2 GB. Then ``ebcompile.analyse`` of a
70B Llama built on the meta device: its time and peak RSS. Every ratio is taken inside one run, on CPU time (one
thread: the machine is shared, and CPU time is what other processes do not inflate); wall times are kept too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {  # name -> (hidden, layers, heads, kv heads, intermediate, vocab)
    "56M": (512, 8, 8, 4, 1408, 32000),
    "246M": (1024, 16, 16, 4, 2816, 32000),
    "537M": (1536, 18, 24, 4, 4096, 32000),
    "1.1B": (2048, 22, 32, 4, 5632, 32000),  # TinyLlama's shape
}
LLAMA_70B = (8192, 80, 64, 8, 28672, 128256)
KINDS = ("magnitude", "taylor", "activation", "gate")
BATCH, SEQ = 2, 128
ONNX_LIMIT = 2 << 30  # protobuf's limit on one ONNX file


def _rss() -> int:
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS (Linux >= 4.0)


class _Timer:
    """Wall and CPU seconds of a block."""

    def __enter__(self) -> _Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _llama(shape: tuple[int, ...], device: str = "cpu"):
    import torch
    import transformers as tf

    hidden, layers, heads, kv, inter, vocab = shape
    config = tf.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, use_cache=False,
                            max_position_embeddings=2048)
    with torch.device(device):
        return tf.LlamaForCausalLM(config)


def _init_in_place(model) -> None:
    """Give a meta-built Llama real random weights without temporaries: N(0, 0.02) matrices, unit norms."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.model.rotary_emb = LlamaRotaryEmbedding(model.config)  # its inv_freq buffer, computed on the CPU


def _unprepare(model) -> None:
    """Back to the plain model (masks and trackers gone), so that the next importance kind prepares it again."""
    from ebcompile.transforms.masks import strip_masks

    model._ebcompile.tracker.close()
    strip_masks(model, bake=False)
    del model._ebcompile


def run_one(name: str) -> dict:
    import torch

    import ebcompile

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = _rss()
    model = _llama(CONFIGS[name], device="meta" if CONFIGS[name][0] >= 2048 else "cpu")
    if CONFIGS[name][0] >= 2048:  # 1.1B: HF's init leaves ~1.3x the model in freed-but-held RSS; init in place instead
        _init_in_place(model)
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    big = params > 800e6
    ids = torch.randint(0, CONFIGS[name][-1], (BATCH, SEQ))
    example = {"input_ids": ids[:1, :16]}
    row: dict = {"config": name, "params": params, "bytes": nbytes, "optimizer": "SGD (no momentum)" if big else "AdamW",
                 "threads": torch.get_num_threads()}

    def make_opt(m):
        ps = [p for p in m.parameters() if p.requires_grad]
        return torch.optim.SGD(ps, lr=1e-4) if big else torch.optim.AdamW(ps, lr=1e-4)

    def train_step(m, opt) -> _Timer:
        with _Timer() as t:
            loss = m(input_ids=ids, labels=ids).loss
            if getattr(m._ebcompile, "importance", "") == "gate":
                loss = loss + 1e-4 * ebcompile.gate_penalty(m)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return t

    for kind in ("taylor", "activation", "gate", "magnitude"):  # magnitude last: its search gives the ticket
        _reset_peak()
        before = _rss()
        with _Timer() as t:
            ebcompile.prepare(model, example, structure="structured", importance=kind)
        if kind == "taylor":  # the first prepare of this process: its time and peak
            row["prepare_s"], row["prepare_cpu_s"] = t.wall, t.cpu
            row["prepare_rise"] = _status("VmHWM") - before
            row["prepare_peak_x"] = 1 + row["prepare_rise"] / nbytes
            row["process_peak_x"] = (_status("VmHWM") - base) / nbytes  # with what the init left behind
        opt = make_opt(model)
        eb = ebcompile.EarlyBird(model, every=1)
        steps = [train_step(model, opt)]
        eb.check()
        steps.append(train_step(model, opt))
        with _Timer() as c:
            eb.check()
        row[f"check_{kind}_s"], row[f"check_{kind}_wall_s"] = c.cpu, c.wall
        row[f"step_{kind}_s"], row[f"step_{kind}_wall_s"] = steps[-1].cpu, steps[-1].wall
        if kind != "magnitude":
            del opt
            _unprepare(model)
    step = row["step_s"] = row["step_magnitude_s"]
    for kind in KINDS:
        row[f"check_{kind}_x"] = row[f"check_{kind}_s"] / step
    eb.check(last=True)
    with _Timer() as t:
        ebcompile.apply_ticket(model, eb.ticket, mode="continue")
        # stateless SGD (1.1B) needs no state carried: a new one over the compact parameters is the same optimizer,
        # and the shadow copies that carrying needs would not fit next to other work
        small = ebcompile.compact(model, optimizer=None if big else opt)
    row["compact_s"], row["compact_wall_s"], row["compact_x"] = t.cpu, t.wall, t.cpu / step
    row["compact_params"] = sum(p.numel() for p in small.parameters())
    del model
    if nbytes < ONNX_LIMIT:
        with tempfile.TemporaryDirectory() as d, _Timer() as t:
            ebcompile.export_onnx(small, os.path.join(d, "m.onnx"), example)
        row["export_s"], row["export_wall_s"], row["export_x"] = t.cpu, t.wall, t.cpu / step
    row["peak_rss"] = _status("VmHWM")
    return row


def run_meta() -> dict:
    import torch

    import ebcompile

    torch.set_num_threads(1)
    base = _rss()
    _reset_peak()
    with _Timer() as t:
        model = _llama(LLAMA_70B, device="meta")
        analysis = ebcompile.analyse(model, {"input_ids": torch.randint(0, 1000, (1, 16))})
    return {"params": analysis.parameters, "analyse_s": t.wall, "analyse_cpu_s": t.cpu,
            "peak_rise": _status("VmHWM") - base, "groups": analysis.counts(), "linears": len(analysis.plan.linears)}


def _subprocess(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, *args, "--out", f.name], check=True, env=env)
        return json.loads(Path(f.name).read_text())


TARGETS = (("prepare peak", lambda r: r["prepare_peak_x"], 1.3),
           ("EarlyBird check, slowest kind", lambda r: max(r[f"check_{k}_x"] for k in KINDS), 0.1),
           ("apply_ticket + compact", lambda r: r["compact_x"], 3.0))


def _target(rows: list[dict], what: str, value, limit: float) -> str:
    missed = [f"{r['config']} ({value(r):.2f})" for r in rows if value(r) > limit]
    return f"{what} ≤ {limit:g}x: " + ("met at every size" if not missed else "missed at " + ", ".join(missed))


def table(rows: list[dict], meta: dict | None) -> str:
    lines = ["| config | params | fp32 bytes | optimizer | step s | prepare s (x step) | prepare peak (x bytes) | "
             "check magnitude / taylor / activation / gate (x step) | apply+compact s (x step) | export_onnx s (x step) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        checks = " / ".join(f"{r[f'check_{k}_x']:.3f}" for k in KINDS)
        export = f"{r['export_s']:.1f} ({r['export_x']:.2f})" if "export_s" in r else "skipped: ≥ 2 GB (protobuf limit)"
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.0f}M | {r['bytes'] / 2**30:.2f} GiB | {r['optimizer']} | "
                     f"{r['step_s']:.2f} | {r['prepare_cpu_s']:.1f} ({r['prepare_cpu_s'] / r['step_s']:.2f}) | "
                     f"{r['prepare_peak_x']:.2f} | {checks} | {r['compact_s']:.1f} ({r['compact_x']:.2f}) | {export} |")
    lines += ["", "Targets: " + "; ".join(_target(rows, *t) for t in TARGETS) + "."]
    if meta:
        g = meta["groups"]
        lines += ["", f"70B Llama on the meta device (hidden 8192, 80 layers, 64 heads, 8 KV heads, intermediate 28672, vocab "
                  f"128256; {meta['params'] / 1e9:.1f}B parameters, {meta['params'] * 2 / 2**30:.0f} GiB in bf16): "
                  f"`ebcompile.analyse` took {meta['analyse_s']:.0f} s wall ({meta['analyse_cpu_s']:.0f} s CPU) and "
                  f"{meta['peak_rise'] / 2**20:.0f} MiB of peak RSS over the process's start; it found "
                  f"{meta['linears']} prunable linears, " + ", ".join(f"{v} {k}" for k, v in g.items()) + "."]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ebcompile.persist.io import atomic_path

    x = [r["params"] / 1e6 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in KINDS:
        ax1.plot(x, [r[f"check_{kind}_x"] for r in rows], marker="o", label=f"check ({kind})")
    ax1.plot(x, [r["compact_x"] for r in rows], marker="s", label="apply_ticket + compact")
    ax1.plot(x, [r["prepare_cpu_s"] / r["step_s"] for r in rows], marker="^", label="prepare")
    ax1.axhline(0.1, ls="--", c="gray", lw=0.8)
    ax1.axhline(3, ls=":", c="gray", lw=0.8)
    ax1.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="time / one training step",
            title="cost relative to a training step (1 thread)")
    ax1.legend(fontsize=7)
    ax2.plot(x, [r["prepare_peak_x"] for r in rows], marker="o", label="prepare peak RSS")
    ax2.axhline(1.3, ls="--", c="gray", lw=0.8, label="target 1.3x")
    ax2.set(xscale="log", xlabel="parameters (M)", ylabel="x the model's bytes", title="prepare peak memory")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


NOTES = """![scale](scale.png)

What was changed to get there (each profiled first; the numbers above are after the changes):

- **EarlyBird check**: half of a structured check's CPU time was the NaN/inf guard, `isfinite(w).all()` over every
  masked weight (a bool copy of the model per check). `distributed.all_finite` now settles a tensor by its sum (a
  NaN or inf makes it non-finite; only a sum that overflows is checked element-wise): a magnitude check at 56M went
  from 0.076x to 0.041x a step, at 246M from 0.14x to the value above. What is left: the per-unit sums of
  squares (one read of every masked weight) and the per-tensor keep-masks a draw expands (one byte per weight).
- **compact with an optimizer**: carrying AdamW's two moments runs compaction on three shadow copies; each also ran
  the forward rewrites and the check on the example inputs (forward passes on state values that mean nothing),
  and found each new parameter's origin with a sort-based `torch.unique` over every element. The shadow passes now
  only slice (`_compact(check=False)`), and the origin is the min/max of the marks: 2.8x -> 2.1x a step at 56M.
- **meta-device analysis**: `ebcompile.analyse(model, example)` runs prepare's own checks and analysis
  (`prepare.build_plan`, shared with `prepare`) and changes nothing; `capture` skips its eager input check on a
  meta model (Hugging Face's packed-sequence detection calls `.item()`, which `torch.export` traces through).
  `prepare`, `EarlyBird`, `apply_ticket`, `compact`, `export_onnx` and `save` still refuse meta models
  (`ConfigError` naming `to_empty` + loading weights). tests/test_scale_meta.py: the meta plan equals prepare's plan.

Where a target is missed, and why:

- **prepare peak at 56M (1.42x)**: prepare's memory is the masks (one byte per masked weight: 0.25x of the masked
  fp32 weights, 0.22x of the model at 1.1B) plus a fixed ~70 MB: torch.export's graph and fake tensors, the
  analysis's per-feature index arrays, and the first import of torch.export's machinery in the process (on a 1.5M
  Llama: importing torch.export's modules 30 MB, the first prepare of a process 41 MB more, a second prepare in the
  same process 3 MB). At 56M (225 MB) that once-per-process part alone is 0.3x; from 246M on the target holds.
  The brief's "~3 GB at 246M" was the process's RSS with the random init (the `process_peak_x` field of the JSON
  rows: 2.0x at 56M, 1.4x at 246M): Hugging Face's init leaves freed memory held by the allocator, not prepare's.
- **537M** is not in the table: with AdamW its compact (three shadow copies of the model for the optimizer
  state, beside two moments and the compact copy) passes the ~14 GB one process may take on this shared machine.
- **1.1B** trains with SGD without momentum (AdamW's states would not fit), so `compact` is called without
  `optimizer=` (stateless: a new SGD over the compact parameters is the same optimizer), its weights are
  initialised in place (N(0, 0.02)) instead of by Hugging Face's init, and `export_onnx` is skipped (over 2 GB).
  Its process peaked at 13.8 GB RSS (the masked model, its gradients and the compact copy).
- **70B without weights**: the analysis's memory is the `torch.export` graph of 80 layers (fake tensors hold shapes,
  no data) and the structure analysis's per-feature index arrays; it ran while other work shared the two cores,
  hence wall time well above CPU time."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=["56M", "246M", "1.1B"], choices=list(CONFIGS),
                        help="537M (AdamW) needs ~16 GB for its compact with the optimizer carried: not by default")
    parser.add_argument("--one", choices=[*CONFIGS, "meta70b"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--no-meta", action="store_true", help="skip the 70B meta-device analysis")
    parser.add_argument("--meta-from", help="the 70B analysis's JSON from an earlier `--one meta70b --out FILE` run")
    parser.add_argument("--rows-from", nargs="*", help="files of rows printed by earlier runs, instead of running")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.one:
        result = run_meta() if args.one == "meta70b" else run_one(args.one)
        Path(args.out).write_text(json.dumps(result))
        return
    rows = []
    if args.rows_from:  # rows printed by earlier runs (one JSON object a line), e.g. each config run on its own
        for path in args.rows_from:
            rows += [json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")]
        rows.sort(key=lambda r: r["params"])
    for name in [] if args.rows_from else args.configs:
        rows.append(_subprocess(["--one", name]))
        print(json.dumps(rows[-1]), flush=True)
    meta = None if args.no_meta else (json.loads(Path(args.meta_from).read_text()) if args.meta_from
                                      else _subprocess(["--one", "meta70b"]))
    from _sections import publish

    header = ("## Scale: Llama from 56M to 1.1B parameters, and a 70B analysis without weights\n\n"
              "`python bench/scale.py` (random init, CPU, one thread, batch 2 x seq 128; each config in a fresh "
              "process). Times are CPU seconds and ratios are to one training step of the same run, in CPU time; prepare "
              "peak = (model bytes + the peak RSS rise during prepare) / model bytes.")
    publish("benchmarks.md", "scale", header, table(rows, meta) + "\n\n" + NOTES, write=not args.no_write)
    if not args.no_write:
        plot(rows, ROOT / "docs" / "scale.png")


if __name__ == "__main__":
    main()
