"""How mask distances behave during training, and where each early-bird rule fires.

    python bench/distances.py                 # digits (the demo recipe) and MNIST t10k (../shared/data)

One dense training run per data set; at every epoch the masks that pruning at p would give are drawn for
unstructured weights (global magnitude) and for structured heads / FFN neurons (per layer), and the
validation accuracy is recorded. Each rule (absolute / relative threshold, window 5) is then replayed
over the same distances. Prints Markdown and writes it to docs/early-bird.md (its measured section).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ebcompile  # noqa: E402
from ebcompile.demo import digits_split, small_vit  # noqa: E402
from ebcompile.search.importance import compute_masks, hamming  # noqa: E402

from _sections import publish  # noqa: E402

RULES = [("absolute", 0.1), ("absolute", 0.01), ("relative", 0.1), ("relative", 0.2), ("relative", 0.3)]


def mnist_vit() -> torch.nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=28, patch_size=7, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)


def data(name: str):
    if name == "digits":
        return digits_split(0), small_vit()
    from ebcompile.data import load_mnist

    xtr, ytr, xva, yva = load_mnist(ROOT.parent / "shared" / "data" / "mnist-t10k")
    return (xtr.repeat(1, 3, 1, 1), ytr, xva.repeat(1, 3, 1, 1), yva), mnist_vit()


def trace(name: str, epochs: int, ratio: float, recipe: str) -> list[dict]:
    torch.manual_seed(0)
    (xtr, ytr, xva, yva), model = data(name)
    ebcompile.prepare(model, xtr[:2], ratio=ratio, structure="structured", importance="magnitude")
    plan = model._ebcompile.plan
    steps = epochs * -(-len(ytr) // 64)
    if recipe == "sgd-step":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.25 * steps), int(0.625 * steps)], 0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    rows, prev = [], None
    for epoch in tqdm(range(epochs), desc=f"{name} {recipe}", leave=False):
        model.train()
        for idx in torch.randperm(len(ytr)).split(64):
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = float((torch.cat([model(x).argmax(1) for x in xva.split(500)]) == yva).float().mean())
        now = {"unstructured": compute_masks(model, plan, ratio, "unstructured", "global"),
               "structured": compute_masks(model, plan, ratio, "structured", "layer")}
        row = {"epoch": epoch + 1, "acc": acc}
        if prev is not None:
            row["weight"] = hamming(prev["unstructured"], now["unstructured"])["overall"]
            d = hamming(prev["structured"], now["structured"])
            row["head"], row["neuron"] = d.get("head", 0.0), d.get("neuron", 0.0)
            row["max"] = max(row["head"], row["neuron"])
        rows.append(row)
        prev = now
    return rows


def fires(values: list[float], rule: str, threshold: float, window: int = 5) -> int | None:
    """Index (into ``values``) of the check at which the rule fires, replaying EarlyBird's rule."""
    recent, peak = [], 0.0
    for i, v in enumerate(values):
        peak = max(peak, v)
        recent = (recent + [v])[-window:]
        ok = [(x < threshold) if rule == "absolute" else (x <= threshold * peak) for x in recent]
        if len(recent) == window and all(ok):
            return i
    return None


def report(name: str, recipe: str, rows: list[dict], ratio: float) -> str:
    lines = [f"### {name}, {recipe}, p = {ratio}", "",
             "| epoch | val acc | unstructured | heads | FFN neurons |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {r['acc']:.3f} | {r.get('weight', float('nan')):.4f} | "
                     f"{r.get('head', float('nan')):.4f} | {r.get('neuron', float('nan')):.4f} |")
    lines += ["", "Where each rule (window 5) fires — epoch (val acc then):", "",
              "| rule | unstructured | structured (max of heads, neurons) |", "|---|---|---|"]
    measured = rows[1:]
    for rule, thr in RULES:
        cells = []
        for key in ("weight", "max"):
            i = fires([r[key] for r in measured], rule, thr)
            cells.append("never" if i is None else f"{measured[i]['epoch']} ({measured[i]['acc']:.3f})")
        lines.append(f"| {rule} {thr:g} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["digits", "mnist"], choices=["digits", "mnist"])
    p.add_argument("--recipes", nargs="+", default=["sgd-step", "adamw-onecycle"])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.time()
    parts = []
    for name in a.sets:
        for recipe in a.recipes:
            epochs = a.epochs if name == "digits" else max(4, a.epochs // 3)
            parts.append(report(name, recipe, trace(name, epochs, a.ratio, recipe), a.ratio))
    text = "\n\n".join(parts)
    header = (f"Measured {time.strftime('%Y-%m-%d')} on the CPU ({torch.get_num_threads()} threads) in "
              f"{time.time() - start:.0f} s by `python bench/distances.py`. sgd-step: SGD momentum 0.9, lr 0.05, x0.1 at "
              "25% and 62.5% of training; adamw-onecycle: AdamW 2e-3, one-cycle. Distances are normalized Hamming "
              "distances between consecutive epochs' masks.")
    publish("early-bird.md", "distances", header, text, write=not a.no_write)


if __name__ == "__main__":
    main()
