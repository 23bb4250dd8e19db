"""Early-bird from scratch, per importance kind: which ranking should ``importance="auto"`` use when the weights train
from a random start? The four small models of bench/reproduce.py (ViT and Swin on MNIST t10k, GPT-2 and RoBERTa on
MR polarity), structured global tickets.

    python bench/importance_scratch.py                                  # every model, kind and seed below
    python bench/importance_scratch.py --models vit --kinds taylor --seeds 0
    python bench/importance_scratch.py --table                          # only rebuild the table from the saved runs

One run = one training budget of the task (bench/_repro_tasks.py: its data, AdamW with warm-up and linear decay). An
early-bird run prepares the model with the kind, checks with the from-scratch recipe of RESULTS.md (relative 0.3,
window 5, deadline at 15% of the budget); at the ticket it compacts with the AdamW state carried and trains the
smaller model for the rest of the budget. ``dense`` trains the plain model. Gates (``gate``) train in the task's
optimizer with an L1 penalty of 1e-4. One torch thread; CPU seconds of training (evaluation excluded). Each run
writes docs/importance/scratch-<model>-<kind>-p<ratio>-s<seed>.json; the table goes into docs/early-bird.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _repro_tasks import make_tasks  # noqa: E402

import ebcompile  # noqa: E402
from ebcompile.prepare import config_of  # noqa: E402
from ebcompile.recipes import take_ticket  # noqa: E402

from _sections import publish  # noqa: E402

OUT = ROOT / "docs" / "importance"
KINDS = ("dense", "magnitude", "taylor", "activation", "gate", "auto")


def run(task, kind: str, ratio: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = task.build()
    eb = None
    if kind != "dense":
        ebcompile.prepare(model, task.example(), ratio=ratio, structure="structured", importance=kind)
        rule, threshold, deadline = task.rule
        eb = ebcompile.EarlyBird(model, every=max(1, task.steps_per_epoch // task.checks_per_epoch), budget=task.steps,
                                 deadline=deadline, rule=rule, threshold=threshold)
    model.train()
    opt, sched = task.optimizer(model, task.steps)
    gen = torch.Generator().manual_seed(seed)
    result = {"model": task.name, "kind": kind, "ratio": None if kind == "dense" else ratio, "seed": seed, "steps": task.steps}
    cpu, step, searching = 0.0, 0, eb is not None
    while step < task.steps:
        for idx in torch.randperm(len(task.train[1]), generator=gen).split(task.batch):
            if step >= task.steps:
                break
            start = time.process_time()
            loss = task.loss(model, idx)
            opt.zero_grad()
            loss.backward()
            if searching and kind == "gate":
                ebcompile.add_gate_penalty_grad(model, 1e-4)
            opt.step()
            sched.step()
            step += 1
            if searching and eb.step():
                searching = False
                result.update(ticket_step=step, by=eb.ticket.found_at["by"], chosen=config_of(model).importance)
                model = take_ticket(model, eb.ticket, optimizer=opt)
            cpu += time.process_time() - start
    result.update(cpu_seconds=cpu, accuracy=task.accuracy(model), parameters=sum(p.numel() for p in model.parameters()))
    return result


def table(write: bool) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob("scratch-*.json"))]
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        cells.setdefault((r["model"], r["kind"]), []).append(r)
    models = sorted({r["model"] for r in runs}, key=lambda m: ["vit", "swin", "gpt2", "roberta"].index(m)
                    if m in ("vit", "swin", "gpt2", "roberta") else 9)
    lines = ["| model | importance | seeds | accuracy | − dense (points) | ticket at (mean share of budget) | drawn by the rule "
             "| CPU time / dense |", "|---|---|---|---|---|---|---|---|"]
    for m in models:
        dense = cells.get((m, "dense"), [])
        dense_acc = statistics.mean(r["accuracy"] for r in dense) if dense else None
        dense_cpu = statistics.mean(r["cpu_seconds"] for r in dense) if dense else None
        for kind in KINDS:
            rs = cells.get((m, kind))
            if not rs:
                continue
            acc = [r["accuracy"] * 100 for r in rs]
            spread = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
            if kind == "dense":
                lines.append(f"| {m} | dense | {len(rs)} | {statistics.mean(acc):.2f}{spread} | – | – | – | 1.00x |")
                continue
            diff = f"{statistics.mean(acc) - dense_acc * 100:+.2f}" if dense_acc is not None else "–"
            share = statistics.mean(r["ticket_step"] / r["steps"] for r in rs if r.get("ticket_step"))
            rule = sum(r.get("by") == "rule" for r in rs)
            cost = f"{statistics.mean(r['cpu_seconds'] for r in rs) / dense_cpu:.2f}x" if dense_cpu else "–"
            chosen = {r.get("chosen") for r in rs} - {kind}
            name = kind + (f" (chose {', '.join(sorted(map(str, chosen)))})" if kind == "auto" and chosen else "")
            lines.append(f"| {m} | {name} | {len(rs)} | {statistics.mean(acc):.2f}{spread} | {diff} | {share:.0%} | {rule} of {len(rs)} "
                         f"| {cost} |")
    header = ("## Measured: early-bird from scratch, per importance kind (bench/importance_scratch.py)\n\n"
              f"Measured {time.strftime('%Y-%m-%d')} on this 2-core CPU, one torch thread per run: the four small models of "
              "RESULTS.md trained from scratch on their budgets, structured global tickets at p = 0.3, the from-scratch "
              "rule (relative 0.3, window 5, deadline 15%); at the ticket compacted with the AdamW state carried and trained "
              "to the end of the budget. Accuracy in %, mean ± standard deviation over seeds. These runs shared the 2 cores with "
              "other jobs (the test suite): the CPU-time ratios are rough.")
    for doc in ("early-bird.md", "RESULTS.md"):  # RESULTS.md: the importance column of the results
        publish(doc, "importance_scratch", header, "\n".join(lines), write=write)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit", "gpt2", "swin", "roberta"])
    p.add_argument("--kinds", nargs="+", default=["dense", "magnitude", "taylor", "activation", "gate"], choices=KINDS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--table", action="store_true", help="only rebuild the table from docs/importance/scratch-*.json")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny data and budgets: checks the pipeline (writes nothing)")
    a = p.parse_args()
    torch.set_num_threads(1)
    if not a.table:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        OUT.mkdir(parents=True, exist_ok=True)
        a.no_write = a.no_write or a.quick
        for task in make_tasks(a.models, quick=a.quick):
            for seed in a.seeds:
                for kind in a.kinds:
                    name = f"scratch-{task.name}-{kind}" + ("" if kind == "dense" else f"-p{a.ratio:g}") + f"-s{seed}"
                    r = run(task, kind, a.ratio, seed)
                    print(f"{name}: accuracy {r['accuracy']:.2%}, ticket at {r.get('ticket_step', '-')} by {r.get('by', '-')}, "
                          f"CPU {r['cpu_seconds']:.0f} s", flush=True)
                    if not a.no_write:
                        (OUT / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
    table(not a.no_write)


if __name__ == "__main__":
    main()
