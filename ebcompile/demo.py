"""The embedded demo: a small ViT on scikit-learn's bundled digits, searched, pruned, compacted, on the CPU."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .persist.io import atomic_path, check_writable
from .plots import plot_search
from .prepare import prepare
from .recipes.switch import take_ticket
from .report import count_macs, count_parameters
from .search.controller import DEADLINE, EarlyBird
from .search.ticket import draw_ticket

__all__ = ["DemoResult", "run_demo", "digits_split", "small_vit"]


@dataclass
class DemoResult:
    epochs: int
    ticket_epoch: int | None
    ticket_by: str | None  # "rule" or "deadline"
    dense_accuracy: float
    pruned_accuracy: float
    dense_parameters: int
    pruned_parameters: int
    dense_macs: int
    pruned_macs: int
    dense_seconds: float
    earlybird_seconds: float
    heads: str
    ffn_widths: str
    plot: str


def digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as 3-channel images, stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8).div(8.0).sub(1.0).repeat(1, 3, 1, 1)
    labels = torch.tensor(y)
    train, val = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=y, random_state=seed)
    return images[train], labels[train], images[val], labels[val]


def small_vit(num_classes: int = 10) -> torch.nn.Module:
    """A 4-layer, 4-head, width-64 torchvision ViT over 2x2 patches of an 8x8 image."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=8, patch_size=2, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=num_classes)


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _epoch(model, opt, x, y, batch, generator) -> float:
    model.train()
    order = torch.randperm(len(y), generator=generator)
    total = 0.0
    for i in range(0, len(y), batch):
        idx = order[i:i + batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(y)


def run_demo(
    out_dir: str | Path = "demo-output",
    epochs: int = 40,
    ratio: float = 0.3,
    threshold: float = 0.3,
    window: int = 5,
    deadline: float | None = DEADLINE,
    lr: float = 0.05,
    milestones: tuple[int, ...] = (10, 25),
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] = tqdm.write,
) -> DemoResult:
    """Train a small ViT densely while EarlyBird watches, then follow the recipe from the ticket, and compare.

    One run gives both sides: the dense model trains for ``epochs``; the state at the ticket (drawn by the rule,
    or by ``deadline`` x ``epochs`` at the latest) is kept, compacted (pruned heads and neurons removed) with the
    optimizer's momentum carried over, and the smaller model trains on with the same schedule to ``epochs``.
    """
    torch.manual_seed(seed)
    out = check_writable(out_dir, directory=True)  # before training, not after
    xtr, ytr, xva, yva = digits_split(seed)
    model = prepare(small_vit(), xtr[:2], ratio=ratio, structure="structured")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)
    eb = EarlyBird(model, threshold=threshold, window=window, budget=epochs, deadline=deadline)
    gen = torch.Generator().manual_seed(seed)
    saved = None
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc="dense + search", disable=not progress, leave=False)
    for epoch in bar:
        loss = _epoch(model, opt, xtr, ytr, 64, gen)
        sched.step()
        was_found = eb.found
        found = eb.step()
        record = eb.history[-1]
        if not was_found:
            d = record.get("distances") or {}
            echo(f"epoch {epoch + 1:3d}  loss {loss:.3f}  val acc {_accuracy(model, xva, yva):.3f}  distance "
                 + ("  ".join(f"{k} {v:.4f}" for k, v in d.items()) if d else "-"))
        if found and not was_found:
            echo(f"early-bird ticket found at epoch {epoch + 1} of {epochs}")
            saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
                     copy.deepcopy(sched.state_dict()), epoch + 1, time.perf_counter() - start,
                     gen.get_state())
        bar.set_postfix(loss=f"{loss:.3f}", ticket=eb.ticket.found_at["check"] + 1 if eb.found else "-")
    dense_seconds = time.perf_counter() - start
    dense_acc = _accuracy(model, xva, yva)
    dense_params, dense_macs = count_parameters(model), count_macs(model, xva[:1])
    if saved is None:
        echo(f"no ticket within {epochs} epochs: the masks never stayed within the threshold; using the last masks")
        eb.ticket = draw_ticket(model)
        eb.ticket.found_at = {"check": eb.checks - 1, "tick": epochs}
        saved = (model.state_dict(), opt.state_dict(), sched.state_dict(), epochs, dense_seconds, gen.get_state())
    state, opt_state, sched_state, ticket_epoch, search_seconds, gen_state = saved
    model.load_state_dict(state)
    opt.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    gen.set_state(gen_state)
    start = time.perf_counter()
    # the compacted model itself trains on: smaller layers, so each epoch costs less than a dense one; the SGD
    # momentum is sliced onto it and the schedule goes on where the ticket left it
    small = take_ticket(model, eb.ticket, mode="continue", optimizer=opt)
    for _ in tqdm(range(ticket_epoch, epochs), desc="retrain ticket", disable=not progress, leave=False):
        _epoch(small, opt, xtr, ytr, 64, gen)
        sched.step()
    retrain_seconds = time.perf_counter() - start
    pruned_acc = _accuracy(small, xva, yva)
    small.eval()
    plot = out / "demo-search.png"
    plot_search(eb, plot, title=f"small ViT on digits, structured p={ratio}")
    heads = [layer.self_attention.num_heads for layer in small.encoder.layers]
    widths = [layer.mlp[0].out_features for layer in small.encoder.layers]
    result = DemoResult(
        epochs=epochs, ticket_epoch=ticket_epoch if eb.found else None,
        ticket_by=eb.ticket.found_at.get("by") if eb.found else None, dense_accuracy=dense_acc,
        pruned_accuracy=pruned_acc, dense_parameters=dense_params, pruned_parameters=count_parameters(small),
        dense_macs=dense_macs, pruned_macs=count_macs(small, xva[:1]), dense_seconds=dense_seconds,
        earlybird_seconds=search_seconds + retrain_seconds, heads="/".join(map(str, heads)),
        ffn_widths="/".join(map(str, widths)), plot=str(plot),
    )
    with atomic_path(out / "demo-result.json") as tmp:
        tmp.write_text(json.dumps(asdict(result), indent=2))
    return result


def format_result(r: DemoResult) -> str:
    """The demo's closing table."""
    rows = [
        ("", "dense", "early-bird ticket (compact)"),
        ("val accuracy", f"{r.dense_accuracy:.2%}", f"{r.pruned_accuracy:.2%}"),
        ("parameters", f"{r.dense_parameters:,}", f"{r.pruned_parameters:,}"),
        ("MACs / image", f"{r.dense_macs:,}", f"{r.pruned_macs:,}"),
        ("heads per layer", "4/4/4/4", r.heads),
        ("FFN widths", "128/128/128/128", r.ffn_widths),
        ("train wall time", f"{r.dense_seconds:.1f} s", f"{r.earlybird_seconds:.1f} s"),
    ]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, width)) for row in rows]
    found = (f"ticket at epoch {r.ticket_epoch} of {r.epochs} (by the {r.ticket_by})" if r.ticket_epoch
             else f"no ticket in {r.epochs} epochs")
    return "\n".join([found] + lines + [f"plot: {r.plot}"])
