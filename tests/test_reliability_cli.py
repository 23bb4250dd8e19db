"""The command line fails fast and in one line: a hub name without network, an interrupt, a retrain that would
write into its own search folder, and an onnxruntime check that crashes the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMED = """
import sys, time
from ebcompile.cli.main import main
import transformers  # imports are not what is timed
t = time.perf_counter()
rc = main({argv!r})
print(json.dumps({{"rc": rc, "s": time.perf_counter() - t}}))
"""


def one_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Fix:" in lines[0] and all(w.lower() in lines[0].lower() for w in words), err


def timed_cli(tmp_path: Path, argv: list[str], **env: str) -> tuple[dict, str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))},
           "HF_HOME": str(tmp_path / "hf"), **env}
    proc = subprocess.run([sys.executable, "-c", "import json\n" + TIMED.format(argv=argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def mr_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mr"
    folder.mkdir()
    for name, word in (("pos", "good"), ("neg", "bad")):
        (folder / f"rt-polarity.{name}").write_text("".join(f"a {word} film {i}\n" for i in range(20)))
    return folder


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable"])
@pytest.mark.parametrize("command", ["export", "search"])
def test_a_mistyped_hub_name_without_network_fails_in_one_line_within_seconds(tmp_path, env, command):
    data = mr_folder(tmp_path)
    argv = (["export", "bert-base-uncsed", str(tmp_path / "m.onnx")] if command == "export" else
            ["search", "bert-base-uncsed", "--out", str(tmp_path / "run"), "--data", str(data)])
    result, err = timed_cli(tmp_path, argv, **env)
    assert result["rc"] == 2 and result["s"] < 5, (result, err)
    one_line(err, "bert-base-uncsed", "HF_HUB_OFFLINE" if "HF_HUB_OFFLINE" in env else "reach")
