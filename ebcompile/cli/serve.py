"""``ebcompile serve-export``: a compact decoder (``ebcompile.save`` or ``save_pretrained`` folder) as a folder vLLM
serves (``ebcompile.save_for_serving``: the stock architecture, or DeciLM ``block_configs`` when layers differ)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-export", help="write a compact Llama/Qwen2/Mistral decoder as a folder vLLM serves",
                       description=__doc__)
    p.add_argument("model", help="the compact model: an ebcompile.save directory (ebcompile compact's output) or a "
                                 "save_pretrained folder")
    p.add_argument("out", help="directory for the serving folder (config.json + model.safetensors)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..serving import save_for_serving, serving_layout
    from .models import load_model

    model = load_model(args.model)
    where = save_for_serving(model, args.out)
    layout = serving_layout(model)
    decilm = (where / "configuration_decilm.py").exists()
    print(f"{args.model}: {len(layout)} layers, query/KV heads "
          f"{'/'.join(str(x.heads) for x in layout)} / {'/'.join(str(x.kv_heads) for x in layout)}, FFN "
          f"{'/'.join(str(x.ffn) for x in layout)}")
    how = ("DeciLM block_configs: vllm serve " f"{where} --trust-remote-code" if decilm
           else f"{type(model).__name__}: vllm serve {where}")
    print(f"written to {where} ({how})")
    return 0
