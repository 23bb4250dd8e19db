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

from conftest import save_word_bert

ROOT = Path(__file__).resolve().parents[1]


def test_demo_short_budget_writes_plot_and_result(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--epochs", "6", "--window", "2", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "val accuracy" in out and "MACs / image" in out and "distance" in out
    result = json.loads((tmp_path / "demo-result.json").read_text())
    assert result["pruned_parameters"] < result["dense_parameters"]
    assert result["pruned_macs"] < result["dense_macs"]
    assert (result["ticket_epoch"], result["ticket_by"]) == (1, "deadline")  # 15% of 6 epochs, before a window of 2 fits
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
    from ebcompile.search.ticket import draw_ticket

    model = ebcompile.prepare(small_vit(), torch.randn(1, 3, 8, 8), ratio=0.5, structure="structured", scope="layer")
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


def test_compact_with_a_ticket_from_another_model_is_one_line(tmp_path, capsys):
    import ebcompile

    dense_dir, ticket_path = tmp_path / "dense", tmp_path / "ticket.safetensors"
    _tiny_hf("bert").save_pretrained(dense_dir)
    other = ebcompile.prepare(_tiny_hf("gpt2"), {"input_ids": torch.ones(1, 4, dtype=torch.long)}, ratio=0.5,
                              structure="structured")
    ebcompile.draw_ticket(other).save(ticket_path)
    capsys.readouterr()  # the setup's own progress bars
    for argv in (["compact", str(dense_dir), str(ticket_path), str(tmp_path / "out")],
                 ["export", str(tmp_path / "missing"), str(tmp_path / "m.onnx")],
                 ["export", str(dense_dir), str(tmp_path / "m.onnx"), "--seq", "999"]):
        code, err = main(argv), capsys.readouterr().err  # in process: the one-line contract is main's
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and "Fix:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()


# -- search and retrain a text classifier from the shell (tiny BERT + word-level tokenizer, real MR texts) -------

MR = ROOT.parent / "shared" / "data" / "mr-polarity"
needs_mr = pytest.mark.skipif(not MR.is_dir(), reason="../shared/data is not beside this checkout")


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """A 2-layer BERT classifier and a 400-word tokenizer built from MR's own words, saved like a hub model."""
    import collections

    from tokenizers import pre_tokenizers, processors

    words = collections.Counter(w for name in ("rt-polarity.pos", "rt-polarity.neg")
                                for w in re.findall(r"\w+", (MR / name).read_text(encoding="latin-1").lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [w for w, _ in words.most_common(400)]

    def bert_style(backend):
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return {"cls_token": "[CLS]", "sep_token": "[SEP]"}

    return save_word_bert(tmp_path_factory.mktemp("tiny-bert"), vocab, layers=2, heads=4, hidden=32, positions=64,
                          backend_setup=bert_style)


TRAIN = ["--data", str(MR), "--train-limit", "192", "--batch", "16", "--max-len", "32"]


@needs_mr
def test_search_retrain_export_from_the_command_line(tiny_classifier, tmp_path, capsys):
    import ebcompile

    search, small = tmp_path / "search", tmp_path / "small"
    assert main(["search", str(tiny_classifier), "--out", str(search), *TRAIN, "--epochs", "2", "--every", "2",
                 "--window", "2", "--rule", "relative", "--threshold", "1.0", "--deadline", "none"]) == 0
    assert "ticket found by the rule at step 6" in capsys.readouterr().out  # checks at steps 2, 4, 6; window 2 passes at the 3rd
    result = json.loads((search / "search.json").read_text())
    assert result["found"] and result["step"] == 6 and len(result["distances"]) == 2
    assert (search / "search.png").read_bytes()[:4] == b"\x89PNG" and (search / "model" / "tokenizer.json").is_file()
    ticket = ebcompile.Ticket.load(search / "ticket.safetensors")
    assert ticket.structure == "structured" and 0.2 < ticket.sparsity() < 0.4

    for mode in ("continue", "rewind"):
        assert main(["retrain", str(search), "--out", str(small / mode), "--mode", mode, *TRAIN, "--epochs", "1"]) == 0
        report = json.loads((small / mode / "retrain.json").read_text())
        assert report["mode"] == mode and report["parameters"] < report["dense_parameters"]
        assert report["optimizer_state"] == ("carried" if mode == "continue" else "fresh")  # the search's AdamW at its ticket
        assert 0.0 <= report["validation_accuracy"] <= 1.0
    model = ebcompile.load(small / "continue" / "model")
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]
    assert main(["export", str(small / "continue" / "model"), str(tmp_path / "small.onnx")]) == 0
    assert (tmp_path / "small.onnx").is_file()


@needs_mr
def test_search_without_a_ticket_exits_1_and_keeps_the_search(tiny_classifier, tmp_path, capsys):
    out = tmp_path / "search"
    assert main(["search", str(tiny_classifier), "--out", str(out), *TRAIN, "--epochs", "1", "--every", "4",
                 "--threshold", "1e-9", "--deadline", "none"]) == 1
    assert "no ticket within 12 steps" in capsys.readouterr().out
    assert (out / "earlybird.safetensors").is_file() and not (out / "ticket.safetensors").exists()
    proc = subprocess.run([sys.executable, "-m", "ebcompile.cli.main", "retrain", str(out), "--out", str(tmp_path / "r"),
                           *TRAIN], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "lacks model/" in proc.stderr
    assert "Fix:" in proc.stderr and "Traceback" not in proc.stderr


@needs_mr
def test_search_draws_the_ticket_by_the_deadline_share_of_the_epochs(tiny_classifier, tmp_path, capsys):
    out = tmp_path / "search"  # 12 steps; the rule never fires; 25% of them: the ticket at step 3
    assert main(["search", str(tiny_classifier), "--out", str(out), *TRAIN, "--epochs", "1", "--every", "4",
                 "--threshold", "1e-9", "--deadline", "0.25"]) == 0
    assert "ticket found by the deadline (--deadline) at step 3" in capsys.readouterr().out
    result = json.loads((out / "search.json").read_text())
    assert result["found_at"] == {"check": 0, "tick": 3, "by": "deadline"} and (out / "ticket.safetensors").is_file()
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and the error, exit 2
        main(["search", str(tiny_classifier), "--out", str(out), *TRAIN, "--deadline", "0"])
    assert exit_info.value.code == 2 and "not a share in (0, 1]" in capsys.readouterr().err


@needs_mr
def test_text_search_defaults_follow_the_measured_fine_tuning_recipe(tiny_classifier, tmp_path):
    """No --every / --rule / --threshold / --deadline: a check every max_steps / 75 optimizer steps (at least 1),
    relative 0.3 over a window of 5, the deadline at 30% (docs/early-bird.md), and the ticket drawn by then."""
    from ebcompile.persist.io import load_tensors

    out = tmp_path / "search"  # 4 optimizer steps
    assert main(["search", str(tiny_classifier), "--out", str(out), *TRAIN, "--train-limit", "64", "--epochs", "1"]) == 0
    _, state = load_tensors(out / "earlybird.safetensors", "earlybird", prefix="importance/")
    config = state["config"]
    assert (config["every"], config["rule"], config["threshold"], config["window"], config["deadline"]) == (
        1, "relative", 0.3, 5, 0.3)
    assert json.loads((out / "search.json").read_text())["found_at"]["tick"] <= 2  # 30% of 4 steps, at the latest


def test_bench_compares_dense_and_compact(tmp_path, capsys):
    import ebcompile

    dense_dir = tmp_path / "dense"
    _tiny_hf("bert").save_pretrained(dense_dir)
    model = _tiny_hf("bert")
    ebcompile.prepare(model, {"input_ids": torch.ones(1, 8, dtype=torch.long)}, ratio=0.5, structure="structured")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    ebcompile.save(model, tmp_path / "small")
    assert main(["bench", str(dense_dir), str(tmp_path / "small"), "--seq", "8", "--repeats", "2", "--onnx",
                 "--device", "cpu"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {tmp_path}")]
    assert len(rows) == 2 and "CPU)" in rows[1]
    params, macs = (float(x) for x in rows[1].rsplit("|", 2)[1].split(" / ")[:2])
    assert params < 1.0 and macs < 1.0
    assert rows[0].rsplit("|", 2)[1].strip().startswith("1.000 / 1.000 / 1.000 / 1.000")


@needs_mr
def test_retrain_keeps_an_unstructured_ticket_pruned(tiny_classifier, tmp_path, capsys):
    import ebcompile

    search, small = tmp_path / "search", tmp_path / "small"
    assert main(["search", str(tiny_classifier), "--out", str(search), *TRAIN, "--epochs", "1", "--every", "2",
                 "--window", "2", "--rule", "relative", "--threshold", "1.0", "--structure", "unstructured"]) == 0
    assert main(["retrain", str(search), "--out", str(small), *TRAIN, "--epochs", "1"]) == 0
    model = ebcompile.load(small / "model")
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}"]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert 0.25 <= zeros <= 0.35  # the ticket's 30% stayed zero through retraining


@needs_mr
def test_search_with_gate_importance_then_retrain(tiny_classifier, tmp_path, capsys):
    import ebcompile

    search = tmp_path / "search"
    assert main(["search", str(tiny_classifier), "--out", str(search), *TRAIN, "--epochs", "1", "--every", "2",
                 "--importance", "gate", "--deadline", "0.5"]) == 0
    ticket = ebcompile.Ticket.load(search / "ticket.safetensors")
    assert ticket.structure == "structured"
    assert main(["retrain", str(search), "--out", str(tmp_path / "small"), *TRAIN, "--epochs", "1"]) == 0
    report = json.loads((tmp_path / "small" / "retrain.json").read_text())
    assert report["parameters"] < report["dense_parameters"]
    model = ebcompile.load(tmp_path / "small" / "model")
    assert not any(".gates." in n or "_gate" in n for n, _ in model.named_parameters())
    capsys.readouterr()
    assert main(["search", str(tiny_classifier), "--out", str(search), *TRAIN, "--epochs", "2", "--every", "2",
                 "--importance", "taylor", "--deadline", "0.5"]) == 2  # a resume with another importance is refused
    assert "importance='gate'" in capsys.readouterr().err
