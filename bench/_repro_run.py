"""Training runs of ``bench/reproduce.py``: one dense run with every early-bird search riding on it, then retraining.

The dense run trains a structured-prepared model (all masks inactive, so it trains like the plain one) and
checks every search at its own schedule; a search that finds its ticket stops checking and keeps a snapshot
of the whole training state (weights, optimizer, schedule, data order) and of the wall time spent so far on
training plus its own checks. Searches for unstructured masks, which this model's ``EarlyBird`` cannot draw,
are ``Watch`` objects: the same masks (``compute_masks``), the same distance (``hamming``) and the same rule.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from _repro_tasks import Task
from torch import nn
from tqdm.auto import tqdm

import ebcompile
from ebcompile.prepare import config_of
from ebcompile.recipes import take_ticket
from ebcompile.report import count_macs
from ebcompile.search.controller import deadline_step
from ebcompile.search.importance import compute_masks, hamming


@dataclass(frozen=True)
class Rule:
    """An early-bird rule: EarlyBird's ``rule``, ``threshold``, ``window``, a warm-up as a fraction of the steps,
    and ``deadline``: the share of the steps by which the ticket is drawn at the latest (None: the rule alone)."""

    rule: str
    threshold: float
    window: int = 5
    warmup: float = 0.0
    deadline: float | None = None

    @property
    def label(self) -> str:
        return (f"{self.rule} {self.threshold:g}" + (f", window {self.window}" if self.window != 5 else "")
                + (f", warm-up {self.warmup:.0%}" if self.warmup else "") + (f", deadline {self.deadline:.0%}" if self.deadline else ""))


@dataclass(frozen=True)
class Search:
    """One early-bird search: which masks (structure, ratio) and which rule."""

    structure: str
    ratio: float
    rule: Rule
    role: str = "recipe"  # "recipe" (the recommended rule) or "pitfall" (another rule, for the pitfall table)


@dataclass
class Snapshot:
    step: int
    check: int
    seconds: float  # training wall time up to here plus this search's own checks
    cpu: float  # process CPU time of the same
    check_seconds: float
    by: str  # "rule" or "deadline" (or "" for the end of the run)
    state: dict[str, torch.Tensor]
    names: list[str]  # parameter names in optimizer order (parametrization prefixes removed)
    opt: dict
    sched: dict
    gen: torch.Tensor
    ticket: Any = None


class Watch:
    """EarlyBird's rule over masks it cannot draw on this model (unstructured masks on a structured-prepared model)."""

    def __init__(self, model: nn.Module, structure: str, ratio: float, rule: Rule, every: int, warmup: int, steps: int) -> None:
        self.model, self.structure, self.ratio, self.rule, self.every, self.warmup = model, structure, ratio, rule, every, warmup
        self.last = deadline_step(steps, rule.deadline)
        self.ticks, self.checks, self.max_distance, self.found_check, self.by = 0, 0, 0.0, None, ""
        self.recent: deque[float] = deque(maxlen=rule.window)
        self.previous, self.trace = None, []

    @property
    def found(self) -> bool:
        return self.found_check is not None

    def step(self) -> bool:
        self.ticks += 1
        last = self.last is not None and self.ticks >= self.last
        if self.found or (not last and (self.ticks <= self.warmup or (self.ticks - self.warmup) % self.every)):
            return self.found
        cfg = config_of(self.model)
        masks = compute_masks(self.model, cfg.plan, self.ratio, self.structure, "global")
        if self.previous is not None:
            d = hamming(self.previous, masks)
            value = max(v for k, v in d.items() if k != "overall") if len(d) > 1 else d["overall"]
            self.trace.append(value)
            self.max_distance = max(self.max_distance, value)
            self.recent.append(value)
            ok = [(v < self.rule.threshold) if self.rule.rule == "absolute" else (v <= self.rule.threshold * self.max_distance)
                  for v in self.recent]
            if len(self.recent) == self.rule.window and all(ok):
                self.found_check, self.by = self.checks, "rule"
        if last and not self.found:
            self.found_check, self.by = self.checks, "deadline"
        self.previous = masks
        self.checks += 1
        return self.found


def replay(distances: list[float], rule: Rule, every: int, steps: int) -> tuple[int, int, str] | None:
    """``(check, step, by)`` where ``rule`` fires over a whole run's distances (distance i compares check i + 1 with
    check i, check k is at step (k + 1) x every), as EarlyBird would: a warm-up counts whole check intervals, and
    a deadline forces one more check at its step when the rule has not fired by then."""
    warmup_checks = round(rule.warmup * steps / every)
    check = _replay(distances, rule, warmup_checks)
    last = deadline_step(steps, rule.deadline)
    if last is not None:
        if check is None or (check + 1) * every > last:
            return (last - 1) // every, last, "deadline"
    return None if check is None else (check, (check + 1) * every, "rule")


def _replay(distances: list[float], rule: Rule, first: int = 0) -> int | None:
    recent: deque[float] = deque(maxlen=rule.window)
    peak = 0.0
    for i, v in enumerate(distances[first:]):
        peak = max(peak, v)
        recent.append(v)
        ok = [(x < rule.threshold) if rule.rule == "absolute" else (x <= rule.threshold * peak) for x in recent]
        if len(recent) == rule.window and all(ok):
            return first + i + 1
    return None


def _names(model: nn.Module) -> list[str]:
    return [n.replace("parametrizations.", "").replace(".original", "") for n, _ in model.named_parameters()]


@dataclass
class DenseRun:
    task: Task
    seed: int
    accuracy: float
    seconds: float  # training only: every search's checks excluded
    cpu: float  # process CPU time of the same
    steps: int
    every: int
    final: Snapshot
    snapshots: dict[Search, Snapshot] = field(default_factory=dict)
    traces: dict[str, list[float]] = field(default_factory=dict)  # kind -> distance per check (whole run)
    kinds: dict[str, list[float]] = field(default_factory=dict)  # structured distance per kind ("head", "neuron", "overall")
    clock: list[float] = field(default_factory=list)  # training wall seconds after each step (index 0: before the first)
    matrix: Any = None  # pairwise structured mask distances over the whole run
    macs: float = 0.0  # forward MACs per sample
    report: Any = None  # ebcompile.report of the dense model


def _controller(model: nn.Module, s: Search, every: int, steps: int) -> Any:
    warmup = round(s.rule.warmup * steps)
    if s.structure == "structured":
        return ebcompile.EarlyBird(model, ratio=s.ratio, threshold=s.rule.threshold, rule=s.rule.rule, window=s.rule.window,
                                   every=every, warmup=warmup, budget=steps, deadline=s.rule.deadline)
    return Watch(model, s.structure, s.ratio, s.rule, every, warmup, steps)


def _snapshot(model, opt, sched, gen, step, check, seconds, cpu, check_seconds, by="") -> Snapshot:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Snapshot(step, check, seconds, cpu, check_seconds, by, state, _names(model), copy.deepcopy(opt.state_dict()),
                    copy.deepcopy(sched.state_dict()), gen.get_state(), None)


def dense_run(task: Task, seed: int, searches: list[Search], scope: str, record: float = 0.3) -> DenseRun:
    """Train densely for the task's budget with every search attached; ``record`` is the ratio whose distances are traced."""
    torch.manual_seed(seed)
    model = ebcompile.prepare(task.build(), task.example(), ratio=record, structure="structured", scope=scope,
                              importance="magnitude")  # the seed paper's ranking; several searches share one model
    model.train()
    opt, sched = task.optimizer(model, task.steps)
    every = max(1, task.steps_per_epoch // task.checks_per_epoch)
    live = {s: _controller(model, s, every, task.steps) for s in searches}
    recorders = {"structured": _controller(model, Search("structured", record, Rule("absolute", 1e-12)), every, task.steps)}
    if any(s.structure == "unstructured" for s in searches):
        recorders["unstructured"] = _controller(model, Search("unstructured", record, Rule("absolute", 1e-12)), every, task.steps)
    gen = torch.Generator().manual_seed(seed)
    spent = {s: [0.0, 0.0] for s in searches}  # wall, CPU
    snaps: dict[Search, Snapshot] = {}
    train_seconds, train_cpu, step = 0.0, 0.0, 0
    clock: list[float] = [0.0]
    bar = tqdm(total=task.steps, desc=f"{task.name} seed {seed}: dense + {len(searches)} searches", leave=False)
    while step < task.steps:
        for idx in torch.randperm(len(task.train[1]), generator=gen).split(task.batch):
            if step >= task.steps:
                break
            start, cpu = time.perf_counter(), time.process_time()
            task.train_step(model, opt, sched, idx)
            train_seconds += time.perf_counter() - start
            train_cpu += time.process_time() - cpu
            step += 1
            bar.update()
            for s, c in live.items():
                if s in snaps:
                    continue
                start, cpu = time.perf_counter(), time.process_time()
                found = c.step()
                spent[s][0] += time.perf_counter() - start
                spent[s][1] += time.process_time() - cpu
                if found:
                    check = c.ticket.found_at["check"] if s.structure == "structured" else c.found_check
                    by = c.ticket.found_at["by"] if s.structure == "structured" else c.by
                    snaps[s] = _snapshot(model, opt, sched, gen, step, check, train_seconds + spent[s][0], train_cpu + spent[s][1],
                                         spent[s][0], by)
                    snaps[s].ticket = c.ticket if s.structure == "structured" else None
            for r in recorders.values():
                r.step()
            clock.append(train_seconds)
    bar.close()
    run = DenseRun(task, seed, task.accuracy(model), train_seconds, train_cpu, task.steps, every,
                   _snapshot(model, opt, sched, gen, step, -1, train_seconds, train_cpu, 0.0), snaps)
    run.clock = clock
    run.traces = {k: (r.distances() if k == "structured" else r.trace) for k, r in recorders.items()}
    records = [r["distances"] for r in recorders["structured"].history if r["distances"]]
    run.kinds = {k: [d[k] for d in records] for k in (records[0] if records else {})}
    run.matrix = recorders["structured"].distance_matrix()
    run.macs = count_macs(model, task.example(8)) / 8
    run.report = ebcompile.report(model)
    return run


@dataclass
class Retrained:
    accuracy: float
    seconds: float  # compaction + retraining
    cpu: float
    steps: int
    macs: float  # forward MACs per sample of the retrained model
    parameters: int
    nonzero: int
    bytes: int


def _fresh(task: Task, run_scope: str, structure: str, ratio: float, snap: Snapshot) -> nn.Module:
    model = ebcompile.prepare(task.build(), task.example(), ratio=ratio, structure=structure,
                              scope=run_scope if structure == "structured" else "global", importance="magnitude")
    state = snap.state if structure == "structured" else {k: v for k, v in snap.state.items() if not k.endswith("_mask")}
    model.load_state_dict(state, strict=structure == "structured")
    return model.train()


def retrain(task: Task, run: DenseRun, snap: Snapshot, structure: str, ratio: float, scope: str, steps: int,
            carry: bool = True, ticket: Any = None) -> Retrained:
    """Retrain a ticket for ``steps``: structured tickets compacted (optimizer state carried when ``carry``),
    unstructured ones masked. ``ticket=None`` draws it from the snapshot's weights (one-shot magnitude pruning)."""
    model = _fresh(task, scope, structure, ratio, snap)
    params = dict(zip(_names(model), model.parameters()))
    if carry:
        opt, sched = task.optimizer(model, task.steps, [params[n] for n in snap.names])
        opt.load_state_dict(snap.opt)
        sched.load_state_dict(snap.sched)
    else:
        opt, sched = task.optimizer(model, steps)
    ticket = ticket or ebcompile.draw_ticket(model, ratio)
    gen = torch.Generator()
    gen.set_state(snap.gen)
    start, cpu = time.perf_counter(), time.process_time()
    model = take_ticket(model, ticket, mode="continue", optimizer=opt)  # structured: the compact model trains
    done = 0
    while done < steps:
        for idx in torch.randperm(len(task.train[1]), generator=gen).split(task.batch):
            if done >= steps:
                break
            task.train_step(model, opt, sched, idx)
            done += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    rep = ebcompile.report(model)
    macs = count_macs(model, task.example(8)) / 8
    return Retrained(task.accuracy(model), seconds, cpu, steps, macs, rep.parameters, rep.nonzero, rep.bytes)
