"""Reproduce the seed paper (Cheekati 2024, "Early Transformers") with ebcompile, and measure what early-bird costs.

    pip install -e '.[bench]'            # the pretrained MiniLM (else its rows are left out)
    python bench/reproduce.py            # the full run (about an hour on the CPU), writes docs/RESULTS.md
    python bench/reproduce.py --quick --out /tmp/r/RESULTS.md   # a smoke run of the whole pipeline (< 3 min)

Per model (small ViT and Swin trained from scratch on MNIST t10k, small GPT-2 and RoBERTa from scratch on MR
polarity, pretrained all-MiniLM-L6-v2 fine-tuned on MR) and seed: one dense run with every early-bird search
riding on it (unstructured magnitude masks, the seed's method, and structured heads/FFN neurons, at p = 0.1,
0.3, 0.5), then three pipelines on the same budget of optimizer steps:

- dense: the dense run;
- traditional: the dense run, one-shot magnitude pruning of its final weights, then the whole budget again
  on the pruned model (structured: compacted; unstructured: masked), fresh optimizer and schedule;
- early-bird: the dense run up to the ticket (the search stops there), then the ticket retrained for the rest
  of the budget: structured tickets compacted with the optimizer state carried (``compact(model,
  optimizer=opt)``), unstructured ones masked with the same optimizer.

Wall time and CPU time are measured in this one run; training MACs are 3 x forward MACs x samples.
Other early-bird rules ride on the same dense run for the pitfall table. Writes docs/RESULTS.md, one PNG per
model beside it, and the measured recipe section of docs/early-bird.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _repro_doc import render, write_plot  # noqa: E402
from _repro_run import Rule, Search, dense_run, replay, retrain  # noqa: E402
from _repro_tasks import make_tasks  # noqa: E402

RATIOS = (0.1, 0.3, 0.5)
PITFALL_RULES = [Rule("absolute", 0.1), Rule("absolute", 0.01), Rule("relative", 0.1), Rule("relative", 0.3), Rule("relative", 0.5),
                 Rule("relative", 0.3, window=3), Rule("relative", 0.1, window=10), Rule("relative", 0.1, warmup=0.1)]


def recipe_rule(task) -> Rule:
    """The recommended rule of a task: its rule and threshold, window 5, and its deadline."""
    return Rule(task.rule[0], task.rule[1], deadline=task.rule[2])


def searches_for(task, structures: list[str], ratios: tuple[float, ...]) -> list[Search]:
    """The live searches: the recommended rule at every ratio; other rules are replayed on the recorded distances."""
    return [Search(st, p, recipe_rule(task)) for st in structures for p in ratios]


def run_task(task, seeds: list[int], structures: list[str], ratios: tuple[float, ...], scope: str, traditional: str,
             plot_dir: Path | None) -> list[dict]:
    rows: list[dict] = []
    for seed in seeds:
        searches = searches_for(task, structures, ratios)
        run = dense_run(task, seed, searches, scope)
        samples = task.batch  # per step
        base = {"model": task.name, "seed": seed, "steps": run.steps}
        rows.append({**base, "pipeline": "dense", "acc": run.accuracy, "wall": run.seconds, "cpu": run.cpu,
                     "train_macs": 3 * run.macs * samples * run.steps, "fwd_macs": run.macs,
                     "params": run.report.parameters, "nonzero": run.report.nonzero, "bytes": run.report.bytes})
        per_step: dict[tuple[str, float], float] = {}
        for s in searches:
            if s.role != "recipe":
                continue
            snap = run.snapshots.get(s)
            found = snap is not None
            snap = snap or run.final
            left = run.steps - snap.step
            eb = retrain(task, run, snap, s.structure, s.ratio, scope, left, carry=True, ticket=snap.ticket)
            per_step[(s.structure, s.ratio)] = eb.seconds / max(left, 1)
            key = {**base, "structure": s.structure, "p": s.ratio, "params": eb.parameters, "nonzero": eb.nonzero,
                   "bytes": eb.bytes, "fwd_macs": eb.macs}
            rows.append({**key, "pipeline": "early-bird", "acc": eb.accuracy, "wall": snap.seconds + eb.seconds,
                         "cpu": snap.cpu + eb.cpu, "found": found, "step": snap.step if found else None, "by": snap.by,
                         "check": snap.check if found else None, "search_wall": snap.seconds,
                         "train_macs": 3 * samples * (run.macs * snap.step + eb.macs * left),
                         "step_ratio": (eb.seconds / max(left, 1)) / (run.seconds / run.steps), "mac_ratio": eb.macs / run.macs})
            if traditional == "all" or (s.structure == "structured" and s.ratio in (0.3, 0.5)):
                tr = retrain(task, run, run.final, s.structure, s.ratio, scope, run.steps, carry=False)
                rows.append({**key, "pipeline": "traditional", "acc": tr.accuracy, "wall": run.seconds + tr.seconds,
                             "cpu": run.cpu + tr.cpu, "train_macs": 3 * samples * run.steps * (run.macs + tr.macs)})
        fires = {}
        recipe = recipe_rule(task)
        for st, trace in run.traces.items():
            for rule in [recipe] + [r for r in PITFALL_RULES if r != recipe]:
                fired = replay(trace, rule, run.every, run.steps)
                check, step, by = fired if fired is not None else (None, None, "")
                live = run.snapshots.get(Search(st, 0.3, rule))
                if live is not None and (live.check, live.step) != (check, step):  # the replay is EarlyBird's rule: it must agree
                    print(f"warning: {task.name} {st} {rule.label}: live check {live.check} at step {live.step}, replayed {fired}")
                fires[(st, rule.label)] = check
                seconds = run.clock[step] if step is not None else None
                rest = per_step.get((st, 0.3), 0.0)
                rows.append({**base, "pipeline": "pitfall", "structure": st, "p": 0.3, "rule": rule.label, "recipe": rule == recipe,
                             "step": step, "check": check, "by": by, "checks": run.steps // run.every, "search_wall": seconds,
                             "est_wall": None if step is None else seconds + rest * (run.steps - step), "dense_wall": run.seconds})
        if plot_dir is not None and seed == seeds[0]:
            write_plot(run, fires, plot_dir / f"reproduce-{task.name}.png")
    return rows


def rows_path(out: Path) -> Path:
    """Where a run writing ``out`` keeps its raw rows (docs/RESULTS.md: docs/reproduce-rows.json)."""
    return out.parent / ("reproduce-rows.json" if out.name == "RESULTS.md" else f"{out.stem}-rows.json")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny data and budgets, one seed: checks the pipeline, not the numbers")
    p.add_argument("--models", nargs="+", default=None, help="default: vit swin gpt2 roberta minilm (--quick: without minilm)")
    p.add_argument("--seeds", type=int, default=None, help="seeds for the small models (default 3; --quick 1)")
    p.add_argument("--scope", default="global", choices=["global", "layer"], help="structured ranking scope")
    p.add_argument("--traditional", default="structured", choices=["structured", "all"],
                   help="traditional pipeline at p = 0.3 and structured p = 0.5 only (default: the targets), or for all")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared machine)")
    p.add_argument("--render", default=None, help="only rewrite the documents from the rows a run saved (docs/reproduce-rows.json)")
    p.add_argument("--merge", default=None, help="keep the rows of the models not run now from a saved run (docs/reproduce-rows.json); "
                                                 "its time is added to this run's, less the saved time of the models run again")
    p.add_argument("--out", default=None, help="where RESULTS.md goes (default docs/RESULTS.md; --quick writes nothing unless given)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out else (None if a.quick else ROOT / "docs" / "RESULTS.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows: list[dict] = []
    model_seconds: dict[str, float] = {}
    model_dates: dict[str, str] = {}
    tasks = make_tasks(a.models or ["vit", "swin", "gpt2", "roberta"] + ([] if a.quick else ["minilm"]), a.quick)
    if a.render:
        saved = json.loads(Path(a.render).read_text())
        rows, tasks = saved["rows"], [t for t in tasks if t.name in {r["model"] for r in saved["rows"]}]
        start -= saved["seconds"]
        model_seconds, model_dates = saved.get("model_seconds", {}), saved.get("model_dates", {})
    for task in tasks if not a.render else []:
        pretrained = task.extra.get("pretrained", False)
        seeds = list(range(1 if (a.quick or pretrained) else (a.seeds or 3)))
        structures = ["unstructured", "structured"]
        ratios = (0.3,) if a.quick else RATIOS
        began = time.perf_counter()
        rows += run_task(task, seeds, structures, ratios, a.scope, a.traditional, out.parent if out else None)
        model_seconds[task.name], model_dates[task.name] = time.perf_counter() - began, time.strftime("%Y-%m-%d")
        print(f"{task.name} done at {time.perf_counter() - start:.0f} s", flush=True)
    total = saved["seconds"] if a.render else time.perf_counter() - start
    if a.merge:
        kept = json.loads(Path(a.merge).read_text())
        ran = {t.name for t in tasks}
        rows = [r for r in kept["rows"] if r["model"] not in ran] + rows
        kept_seconds = kept.get("model_seconds", {})  # the models run again now no longer count their old time
        total += kept["seconds"] - sum(v for m, v in kept_seconds.items() if m in ran)
        model_seconds = {**{m: v for m, v in kept_seconds.items() if m not in ran}, **model_seconds}
        model_dates = {**{m: v for m, v in kept.get("model_dates", {}).items() if m not in ran}, **model_dates}
        names = {r["model"] for r in rows}
        tasks = [t for t in make_tasks([m for m in ["vit", "swin", "gpt2", "roberta", "minilm"] if m in names], a.quick)]
    if not a.render and out is not None:  # the raw rows beside the document, to re-render it without training again
        rows_path(out).write_text(json.dumps({"rows": rows, "seconds": total, "model_seconds": model_seconds,
                                              "model_dates": model_dates}, indent=1))
    text = render(rows, tasks, total, a, model_seconds, model_dates)
    print(text)
    if out is not None:
        from ebcompile.persist.io import atomic_path

        from _sections import kept_sections

        old = out.read_text() if out.exists() else ""
        with atomic_path(out) as tmp:
            tmp.write_text(kept_sections(old, text))  # the importance benches' sections stay
        if not a.quick and out == ROOT / "docs" / "RESULTS.md":
            from _repro_doc import recipe_section

            from _sections import publish

            header, body = recipe_section(rows, tasks, total)
            publish("early-bird.md", "recipe", header, body)
        print(f"written to {out}")


if __name__ == "__main__":
    main()
