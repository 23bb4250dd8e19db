"""bench/hf_zoo.py on a fake transformers test suite (tmp_path): a one-family suite whose ModelTester builds a tiny
Llama, run in process through every stage, gives a passing row in zoo.json and a line in ZOO.md; a family that
cannot finish in its timeout still gets a row naming the timeout. No fetched suite is needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import hf_zoo  # noqa: E402
from _zoo_stages import new_row  # noqa: E402

TESTER = '''
import unittest

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from ...test_modeling_common import ModelTesterMixin


class TinyllamaModelTester:
    base_model_class = LlamaModel

    def __init__(self, parent):
        self.parent = parent

    def prepare_config_and_inputs_for_common(self):
        config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
                             num_hidden_layers=2, vocab_size=50, max_position_embeddings=32)
        ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))
        return config, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class TinyllamaModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LlamaModel, LlamaForCausalLM)

    def setUp(self):
        self.model_tester = TinyllamaModelTester(self)
'''


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    root = tmp_path / "suite"
    family = root / "tests" / "models" / "tinyllama"
    family.mkdir(parents=True)
    for pkg in (root / "tests", root / "tests" / "models", family):
        (pkg / "__init__.py").write_text("")
    (root / "tests" / "test_modeling_common.py").write_text("class ModelTesterMixin:\n    pass\n")
    (family / "test_modeling_tinyllama.py").write_text(TESTER)
    yield root
    for name in [m for m in sys.modules if m == "tests" or m.startswith("tests.")]:
        del sys.modules[name]  # the fake suite's package must not shadow this repo's tests/ for later tests
    if str(root) in sys.path:
        sys.path.remove(str(root))


def test_runner_writes_a_passing_row(suite: Path, tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "zoo.json", tmp_path / "ZOO.md"
    assert hf_zoo.main(["--suite", str(suite), "--families", "tinyllama", "--in-process",
                        "--json", str(out_json), "--md", str(out_md)]) == 0
    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["family"] == "tinyllama" and row["model_class"] == "LlamaModel"
    assert (row["status"], row["stage"], row["reason"]) == ("pass", "", ""), row
    assert row["dense_onnx"] == "ok"
    assert row["found"]["kv"] == 4 and row["found"]["neuron"] == 80  # 2 KV groups x 2 layers; 40 neurons x 2 layers
    assert row["cut"]["neuron"] > 0 and row["max_diff"] < 1e-4
    page = out_md.read_text()
    assert "| tinyllama | pass |" in page and "**1** have heads, KV groups or experts found, **1** prune some" in page
    assert row["attention"] is True and "Of the **1** whose dense forward computes attention" in page


@pytest.mark.parametrize("options", [["--importance", "gate"], ["--importance", "activation", "--lora"]],
                         ids=["gate", "lora-activation"])
def test_a_data_aware_kind_trains_first_and_the_page_says_so(suite: Path, tmp_path: Path, options: list[str]) -> None:
    out_json, out_md = tmp_path / "zoo.json", tmp_path / "ZOO.md"
    assert hf_zoo.main(["--suite", str(suite), "--families", "tinyllama", "--in-process", "--json", str(out_json),
                        "--md", str(out_md), *options]) == 0
    (row,) = json.loads(out_json.read_text())["rows"]
    assert (row["status"], row["importance"], row.get("lora", False)) == ("pass", options[1], "--lora" in options), row
    assert "train" in row["stage_seconds"] and row["cut"]["neuron"] > 0 and row["max_diff"] < 1e-4
    page = out_md.read_text()
    assert f"importance=\"{options[1]}\")` → three AdamW steps" in page and f"global {options[1]} ranking" in page
    assert ("merge_and_unload" in page) == ("--lora" in options)


def test_cached_rows_are_kept_and_unknown_families_refused(suite: Path, tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "zoo.json", tmp_path / "ZOO.md"
    cached = dict(new_row("tinyllama"), status="pass", stage="")
    out_json.write_text(json.dumps({"rows": [cached]}))
    assert hf_zoo.main(["--suite", str(suite), "--in-process", "--json", str(out_json), "--md", str(out_md)]) == 0
    assert json.loads(out_json.read_text())["rows"] == [cached]  # resumed: nothing re-run
    assert hf_zoo.main(["--suite", str(suite), "--families", "nosuch", "--json", str(out_json), "--md", str(out_md)]) == 2
    assert hf_zoo.main(["--suite", str(tmp_path / "empty"), "--json", str(out_json), "--md", str(out_md)]) == 2


def test_a_timeout_is_a_row(suite: Path) -> None:
    row = hf_zoo.run_one("tinyllama", suite, timeout=0.5)  # killed while still importing
    assert row["status"] == "fail" and row["reason"].startswith("Timeout: over 0 s (in stage load)"), row
    assert row["family"] == "tinyllama" and row["stage"] == "load"


def test_expert_and_expert_neuron_groups_of_one_layer_are_counted_apart():
    """A mixture-of-experts layer's expert group and its expert-neuron group share one name: the cut is counted per
    mask key (``expert:<name>``, ``neuron:<name>``), so removed experts are not reported as neurons."""
    from types import SimpleNamespace

    import torch
    from _zoo_stages import cut_units, found_units

    from ebcompile.plan import GroupSet, Member

    groups = [GroupSet("expert", "mlp.experts", 8, (Member("mlp.experts.up", 0, 0, 1),), min_units=2),
              GroupSet("neuron", "mlp.experts", 64, (Member("mlp.experts.up", 1, 0, 1),), per_group=8)]
    model = SimpleNamespace(_ebcompile=SimpleNamespace(plan=SimpleNamespace(groups=groups)))
    found, kind_of = found_units(model)
    assert found["expert"] == 8 and found["neuron"] == 64
    keep_experts, keep_neurons = torch.arange(8) >= 3, torch.arange(64) >= 10
    masks = SimpleNamespace(units={"expert:mlp.experts": keep_experts, "neuron:mlp.experts": keep_neurons},
                            kind_of=lambda key: key.split(":", 1)[0])
    cut = cut_units(SimpleNamespace(masks=masks), kind_of)
    assert cut["expert"] == 3 and cut["neuron"] == 10
