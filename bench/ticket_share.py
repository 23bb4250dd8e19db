"""Does an earlier ticket retrain worse? Draw the structured ticket at fixed shares of the budget and compare.

    python bench/ticket_share.py                   # ViT and GPT-2 of bench/reproduce.py, seed 0 (about 12 minutes on the CPU)
    python bench/ticket_share.py --models vit --shares 0.1 0.3 --no-write

One dense run per model (the task, budget and optimizer of ``bench/reproduce.py``) keeps the whole training state
at each share of the budget; from each, magnitude pruning draws the structured ticket (global scope), which is
compacted with the optimizer state carried (``compact(model, optimizer=opt)``) and trained for the rest of the
budget. Accuracy is compared with the dense run's. This is the measurement behind ``EarlyBird``'s ``deadline``
default; it writes the ``ticket-share`` section of docs/early-bird.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _repro_run import DenseRun, _snapshot, retrain  # noqa: E402
from _repro_tasks import make_tasks  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import ebcompile  # noqa: E402
from ebcompile.search.controller import deadline_step  # noqa: E402

from _sections import publish  # noqa: E402


def dense_with_snapshots(task, seed: int, shares: list[float]) -> tuple[DenseRun, dict[float, object]]:
    torch.manual_seed(seed)
    model = ebcompile.prepare(task.build(), task.example(), ratio=0.3, structure="structured", scope="global",
                                 importance="magnitude").train()
    opt, sched = task.optimizer(model, task.steps)
    gen = torch.Generator().manual_seed(seed)
    at = {deadline_step(task.steps, s): s for s in shares}  # the step a search with that deadline would stop at
    snaps, step, seconds = {}, 0, 0.0
    bar = tqdm(total=task.steps, desc=f"{task.name}: dense", leave=False)
    while step < task.steps:
        for idx in torch.randperm(len(task.train[1]), generator=gen).split(task.batch):
            if step >= task.steps:
                break
            start = time.perf_counter()
            task.train_step(model, opt, sched, idx)
            seconds += time.perf_counter() - start
            step += 1
            bar.update()
            if step in at:
                snaps[at[step]] = _snapshot(model, opt, sched, gen, step, 0, seconds, 0.0, 0.0)
    bar.close()
    final = _snapshot(model, opt, sched, gen, step, -1, seconds, 0.0, 0.0)
    every = max(1, task.steps_per_epoch // task.checks_per_epoch)
    return DenseRun(task, seed, task.accuracy(model), seconds, 0.0, task.steps, every, final), snaps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit", "gpt2"])
    p.add_argument("--shares", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print the table only")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = ["| model | dense | structured p | " + " | ".join(f"ticket at {s:.0%}" for s in a.shares) + " |",
            "|---|---|---|" + "---|" * len(a.shares)]
    for task in make_tasks(a.models, quick=False):
        run, snaps = dense_with_snapshots(task, a.seed, a.shares)
        for ratio in a.ratios:
            cells = []
            for share in a.shares:
                snap = snaps[share]
                eb = retrain(task, run, snap, "structured", ratio, "global", task.steps - snap.step, carry=True)
                cells.append(f"{eb.accuracy:.2%} ({100 * (eb.accuracy - run.accuracy):+.2f})")
            rows.append(f"| {task.name} | {run.accuracy:.2%} | {ratio:g} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    header = (f"Measured {time.strftime('%Y-%m-%d')} by `python bench/ticket_share.py` in {(time.perf_counter() - start) / 60:.0f} "
              f"minutes (CPU, seed {a.seed}, the tasks and budgets of bench/reproduce.py). Validation accuracy after the ticket "
              "drawn at each share of the budget was compacted (optimizer state carried) and trained for the rest of it; in "
              "brackets, points against the dense run.")
    publish("early-bird.md", "ticket-share", header, "\n".join(rows), write=not a.no_write)


if __name__ == "__main__":
    main()
