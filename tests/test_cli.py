"""The command line: the demo end to end (short budget), inspect, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ebcompile.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_short_budget_writes_plot_and_result(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--epochs", "6", "--window", "2", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "val accuracy" in out and "MACs / image" in out and "distance" in out
    result = json.loads((tmp_path / "demo-result.json").read_text())
    assert result["pruned_parameters"] < result["dense_parameters"]
    assert result["pruned_macs"] < result["dense_macs"]
    png = (tmp_path / "demo-search.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--ratio", "1.5"], "ratio=1.5"),
        (["demo", "--epochs", "1"], "--epochs 1"),
        (["inspect", "/nonexistent/ticket.safetensors"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, words):
    proc = subprocess.run([sys.executable, "-m", "ebcompile.cli.main", *argv], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert words in lines[0] and "Fix:" in lines[0]
    assert "Traceback" not in proc.stderr


def test_inspect_reads_a_saved_ticket(tmp_path, capsys):
    import ebcompile
    from ebcompile.demo import small_vit
    from ebcompile.ticket import draw_ticket

    model = ebcompile.prepare(small_vit(), torch.randn(1, 3, 8, 8), ratio=0.5, structure="structured")
    path = tmp_path / "t.safetensors"
    draw_ticket(model).save(path)
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["structure"] == "structured"
    heads = [e for e in data["entries"] if e["name"].startswith("head:")]
    assert len(heads) == 4 and all(e["kept"] == 2 and e["total"] == 4 for e in heads)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd.strip() in (ROOT / ".ci" / "run").read_text()


# -- compact and export from the shell (tiny Hugging Face models) ----------------------------------------------


def _tiny_hf(kind: str):
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, n_inner=64, vocab_size=64, n_positions=32))
    else:
        model = BertForSequenceClassification(BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                                                         intermediate_size=64, vocab_size=64, max_position_embeddings=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_compact_then_export_from_the_command_line(kind, tmp_path, capsys):
    import ebcompile
    from ebcompile.cli.models import example_inputs

    dense_dir, ticket_path, out = tmp_path / "dense", tmp_path / "ticket.safetensors", tmp_path / "small"
    _tiny_hf(kind).save_pretrained(dense_dir)
    model = _tiny_hf(kind)
    inputs = example_inputs(model)
    ebcompile.prepare(model, inputs, ratio=0.5, structure="structured")
    ticket = ebcompile.draw_ticket(model)
    ticket.save(ticket_path)
    ebcompile.apply_ticket(model, ticket)
    expected = ebcompile.compact(model).eval()

    assert main(["compact", str(dense_dir), str(ticket_path), str(out)]) == 0
    assert "parameters" in capsys.readouterr().out
    small = ebcompile.load(out)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in expected.parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, expected(**inputs).logits, rtol=1e-5, atol=1e-6)

    onnx_path = tmp_path / "small.onnx"
    assert main(["export", str(out), str(onnx_path), "--seq", "8"]) == 0
    printed = capsys.readouterr().out
    assert onnx_path.is_file() and "matches PyTorch" in printed
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    longer = example_inputs(small, batch=3, seq=12)  # dynamic batch and sequence
    got = sess.run(None, {k: v.numpy() for k, v in longer.items()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), small(**longer).logits, rtol=1e-4, atol=1e-4)


def test_compact_with_a_ticket_from_another_model_is_one_line(tmp_path):
    import ebcompile

    dense_dir, ticket_path = tmp_path / "dense", tmp_path / "ticket.safetensors"
    _tiny_hf("bert").save_pretrained(dense_dir)
    other = ebcompile.prepare(_tiny_hf("gpt2"), {"input_ids": torch.ones(1, 4, dtype=torch.long)}, ratio=0.5,
                              structure="structured")
    ebcompile.draw_ticket(other).save(ticket_path)
    for argv in (["compact", str(dense_dir), str(ticket_path), str(tmp_path / "out")],
                 ["export", str(tmp_path / "missing"), str(tmp_path / "m.onnx")],
                 ["export", str(dense_dir), str(tmp_path / "m.onnx"), "--seq", "999"]):
        proc = subprocess.run([sys.executable, "-m", "ebcompile.cli.main", *argv], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()
