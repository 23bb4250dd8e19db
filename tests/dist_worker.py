"""One early-bird search, in one process or under torchrun (DDP or FSDP2, gloo on the CPU); used by test_distributed.

    python tests/dist_worker.py single OUT                 # the reference: one process, the whole batch
    torchrun --nproc_per_node=2 tests/dist_worker.py ddp OUT
    torchrun --nproc_per_node=2 tests/dist_worker.py fsdp OUT [--kill-at K | --resume]
    [torchrun ...] tests/dist_worker.py trainer OUT        # the HF Trainer with EarlyBirdCallback
    --structures structured,unstructured,diverged          # the searches to run, one after the other
    --structures structured@taylor,unstructured@activation # ... ranked by another importance kind

Every step trains on the whole data set (the ranks' halves average to the one-process batch), so a search
across processes must find what one process finds. Each rank writes OUT/<mode>[-resumed]-<world size>-rank<r>.json.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

import ebcompile
from ebcompile.persist.masks_io import pack_bits
from ebcompile.search.distributed import full_state_dict, load_full_state_dict

STEPS, SAMPLES, SEQ, DIM = 14, 8, 5, 32
SEARCH = dict(every=1, window=3, rule="relative", threshold=0.3, rewind_at=0)


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(DIM, 4, 75, dropout=0.0, batch_first=True)  # odd FFN: uneven FSDP shards
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(SAMPLES, SEQ, DIM, generator=g), torch.randn(SAMPLES, SEQ, DIM, generator=g)


def digest(masks: ebcompile.search.importance.Masks) -> str:
    return hashlib.sha256(pack_bits(masks).tobytes()).hexdigest()[:16]


def bits(masks: ebcompile.search.importance.Masks) -> str:
    return pack_bits(masks).tobytes().hex()


def search(mode: str, structure: str, out: Path, kill_at: int | None = None, resume: bool = False, diverge: bool = False,
           importance: str = "magnitude") -> dict:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    x, y = data()
    model = ebcompile.prepare(encoder(), (x[:2],), ratio=0.3, structure=structure, scope="global", importance=importance)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    wrapped = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    if diverge and rank == 1:  # this rank's weights drift from the others' (not through DDP): masks must not be trusted
        with torch.no_grad():
            ebcompile.search.importance.raw_tensor(model, "layers.0.linear1.weight")[:8].mul_(0)
    eb = ebcompile.EarlyBird(wrapped, **SEARCH)
    state_file, weights_file = out / f"{mode}-{structure}-search.safetensors", out / f"{mode}-{structure}-weights.safetensors"
    start = 0
    if resume:
        load_full_state_dict(model, load_file(weights_file))
        eb.load(state_file)
        start = eb.ticks
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.2)
    mine = slice(rank, None, world)  # this rank's half; the halves' mean gradients average to the whole batch's
    for _ in range(start, STEPS):
        loss = nn.functional.mse_loss(wrapped(x[mine]), y[mine])
        loss.backward()
        if importance == "gate":
            ebcompile.add_gate_penalty_grad(model, 1e-3)
        opt.step()
        opt.zero_grad()
        found = eb.step()
        if kill_at is not None and eb.checks == kill_at:
            eb.save(state_file)  # rank 0 writes
            weights = full_state_dict(model)  # every rank gathers
            if rank == 0:
                save_file(weights, weights_file)
            if world > 1:
                dist.barrier()
            os._exit(17)  # killed: nothing after this point runs
        if found:
            break
    result = {"found_at": eb.ticket.found_at if eb.found else None, "distances": eb.distances(),
              "ticket": digest(eb.ticket.masks) if eb.found else None, "last": digest(eb._previous), "checks": eb.checks,
              "ticket_bits": bits(eb.ticket.masks) if eb.found else None, "last_bits": bits(eb._previous)}
    if eb.found:
        ticket = eb.ticket
        ebcompile.apply_ticket(wrapped, ticket, mode="rewind", weights=eb.rewind_weights)
        for _ in range(2):  # the pruned weights stay zero while training goes on
            nn.functional.mse_loss(wrapped(x[mine]), y[mine]).backward()
            opt.step()
            opt.zero_grad()
        if mode == "fsdp":
            try:
                ebcompile.compact(model)
            except ebcompile.EbcompileError as exc:
                result["compact_sharded"] = type(exc).__name__
        state = full_state_dict(model)
        result["zeros_kept"] = all(bool((state[name][~m] == 0).all()) for name, m in ticket.masks.tensors.items())
        if rank == 0 and structure == "structured":  # compact the gathered copy: what the sharded model computes
            plain = ebcompile.prepare(encoder(), (x[:2],), ratio=0.3, structure=structure, scope="global")
            load_full_state_dict(plain, state)
            ebcompile.apply_ticket(plain, ticket)
            small = ebcompile.compact(plain)
            with torch.no_grad():
                result["compact_error"] = float((small(x) - plain(x)).abs().max())
                result["compact_params"] = sum(p.numel() for p in small.parameters())
    return result


def trainer(out: Path) -> dict:
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from ebcompile.integrations import EarlyBirdCallback

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (SAMPLES, 6), generator=g)
    rows = [{"input_ids": i, "labels": int(i.sum()) % 2} for i in ids]
    model = ebcompile.prepare(model, {"input_ids": ids[:2]}, ratio=0.3, scope="global")
    callback = EarlyBirdCallback(every=1, window=3, rule="relative", threshold=0.3, stop=True)
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=SAMPLES // world, num_train_epochs=STEPS,
                             learning_rate=5e-3, use_cpu=True, ddp_backend="gloo" if world > 1 else None, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                             average_tokens_across_devices=False)  # else the Trainer doubles the loss on 2 ranks
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
    eb = callback.earlybird
    return {"found_at": eb.ticket.found_at if eb.found else None, "distances": eb.distances(),
            "ticket": digest(eb.ticket.masks) if eb.found else None, "ticket_bits": bits(eb.ticket.masks) if eb.found else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "ddp", "fsdp", "trainer"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--structures", default="structured,unstructured")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    a = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    if a.mode == "trainer":
        results["trainer"] = trainer(a.out)
    else:
        if a.mode != "single":
            dist.init_process_group("gloo")
        for name in a.structures.split(","):  # "diverged": a structured search where rank 1 drifts from the others
            structure, _, importance = name.partition("@")
            structure, diverge = ("structured", True) if structure == "diverged" else (structure, False)
            try:
                results[name] = search(a.mode, structure, a.out, a.kill_at, a.resume, diverge, importance or "magnitude")
            except ebcompile.EbcompileError as exc:
                results[name] = {"error": type(exc).__name__, "message": str(exc)}
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    tag = "-resumed" if a.resume else ""
    (a.out / f"{a.mode}{tag}-{world}-rank{rank}.json").write_text(json.dumps(results))
    gc.collect()  # DDP reducers of finished searches go before their process group does
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
