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
