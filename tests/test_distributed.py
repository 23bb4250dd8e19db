"""The early-bird search across processes: torchrun --nproc_per_node=2 with gloo on the CPU (DDP, FSDP2, the HF
Trainer). Stated tolerance: the same ticket at the same check as one process on the same data; masks may differ in
at most 1% of their bits (float sums in another order can flip a near tie), distances within 0.01."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dist_worker

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(dist_worker.__file__)
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def torchrun(out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the worker on 2 ranks. With ``check``, both ranks must have written their results (a process that aborts
    while tearing down gloo after writing them, seen once on an overloaded machine, does not change them)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), *args, str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    name = "-".join([args[0]] + (["resumed"] if "--resume" in args else []))
    written = all((out / f"{name}-2-rank{r}.json").is_file() for r in (0, 1))
    if check and not written:
        pytest.fail(f"torchrun {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def ranks(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}-2-rank{r}.json").read_text()) for r in (0, 1)]


def bit_distance(a: str, b: str) -> float:
    x, y = np.frombuffer(bytes.fromhex(a), np.uint8), np.frombuffer(bytes.fromhex(b), np.uint8)
    return float(np.unpackbits(x ^ y).sum()) / (8 * len(x))


def assert_same_search(got: dict, want: dict) -> None:
    assert got["found_at"] == want["found_at"]
    assert len(got["distances"]) == len(want["distances"])
    assert np.allclose(got["distances"], want["distances"], atol=0.01)
    assert bit_distance(got["last_bits"], want["last_bits"]) <= 0.01
    if want["ticket_bits"] is not None:
        assert bit_distance(got["ticket_bits"], want["ticket_bits"]) <= 0.01


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    return {s: dist_worker.search("single", s, out) for s in ("structured", "unstructured")}


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(out, "fsdp")
    return out, ranks(out, "fsdp")


KINDS = ("structured@auto", "structured@taylor", "structured@activation", "structured@gate", "unstructured@activation")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One torchrun for every DDP search (each start costs two interpreters importing torch)."""
    out = tmp_path_factory.mktemp("ddp")
    torchrun(out, "ddp", "--structures", ",".join(("structured", "unstructured", *KINDS, "diverged")))
    return out, ranks(out, "ddp")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_find_the_one_process_ticket(mode, single, fsdp, ddp):
    if mode == "fsdp":
        results = fsdp[1]
    else:
        results = ddp[1]
        for r in results:  # rank 1's weights drifted behind DDP's back: both ranks stop at the first check
            assert r["diverged"]["error"] == "DistributedError"
            assert "ranks disagree on the masks" in r["diverged"]["message"] and "Fix:" in r["diverged"]["message"]
    assert single["structured"]["found_at"] is not None
    for structure, want in single.items():  # both ranks: the same masks, distances and decision, as one process
        r0, r1 = results[0][structure], results[1][structure]
        assert {k: v for k, v in r0.items() if k in r1} == r1
        assert_same_search(r0, want)
    structured = results[0]["structured"]
    assert structured["zeros_kept"] and results[1]["structured"]["zeros_kept"]  # the frozen ticket under training
    assert structured["compact_error"] <= 1e-5  # the gathered copy compacts to what the sharded model computes
    assert structured["compact_params"] < sum(p.numel() for p in dist_worker.encoder().parameters())
    if mode == "fsdp":
        assert structured["compact_sharded"] == "DistributedError"  # compact on the sharded model says: gather first


def test_ddp_agrees_for_every_importance_kind(ddp, tmp_path):
    """Taylor reads DDP's averaged gradients, gates are DDP parameters, and activation statistics are summed over the
    ranks before a draw: two ranks, each on its half of the batch, draw what one process draws on the whole batch."""
    results = ddp[1]
    for name in KINDS:
        structure, _, importance = name.partition("@")
        want = dist_worker.search("single", structure, tmp_path, importance=importance)
        r0, r1 = results[0][name], results[1][name]
        assert "error" not in r0, r0
        assert {k: v for k, v in r0.items() if k in r1} == r1  # identical masks and decisions on both ranks
        assert_same_search(r0, want)
        assert len(r0["distances"]) >= 2


def test_fsdp_search_killed_and_resumed_finds_the_same_ticket(fsdp, tmp_path):
    done = torchrun(tmp_path, "fsdp", "--structures", "structured", "--kill-at", "2", check=False)
    assert done.returncode != 0 and (tmp_path / "fsdp-structured-search.safetensors").is_file()
    assert not list(tmp_path.glob("fsdp-2-rank*.json"))  # killed before the end
    torchrun(tmp_path, "fsdp", "--structures", "structured", "--resume")
    resumed = ranks(tmp_path, "fsdp-resumed")
    want = fsdp[1][0]["structured"]
    for r in resumed:
        assert r["structured"]["found_at"] == want["found_at"] and r["structured"]["ticket"] == want["ticket"]
        assert r["structured"]["distances"] == want["distances"]


def test_trainer_callback_across_two_processes(tmp_path):
    pytest.importorskip("transformers")
    want = dist_worker.trainer(tmp_path)
    torchrun(tmp_path, "trainer")
    results = ranks(tmp_path, "trainer")
    assert want["found_at"] is not None
    assert results[0]["trainer"] == results[1]["trainer"]
    got = results[0]["trainer"]
    assert got["found_at"] == want["found_at"]
    assert np.allclose(got["distances"], want["distances"], atol=0.01)
    assert bit_distance(got["ticket_bits"], want["ticket_bits"]) <= 0.01
