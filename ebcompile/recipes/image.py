"""The image recipe: ``search_image`` and ``retrain_image``, a plain PyTorch loop (AdamW) around ``EarlyBird`` and
``compact``.

The search trains at a constant learning rate, checks every ``--every`` optimizer steps, and stops at the
ticket. After every epoch, at the ticket and at the end of the budget it swaps in ``--out/model/`` whole: the
weights (``ebcompile.save``), the recipe, ``optimizer.safetensors``, ``earlybird.safetensors`` and
``progress.json`` (the step reached and the settings): one consistent resume point whatever kills the run. A
second ``search`` into the same ``--out`` resumes from it (same settings; only ``--epochs`` may change), and
batch order and dropout are seeded per step, so a resumed search draws the checks an uninterrupted one draws.

``retrain_image`` rebuilds that model, applies the ticket and (structured) trains the compact model; with ``--mode
continue`` the search's optimizer state comes along (``compact(model, optimizer=opt)``), other modes start a
fresh optimizer. Its learning rate decays linearly to zero over ``--epochs``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageData, load_images
from ..errors import CheckpointError, ConfigError
from ..persist.fsguard import read_json
from ..persist.io import atomic_path
from ..persist.optim_io import load_optimizer, save_optimizer
from ..persist.savedir import recover
from .imageclf import (
    Recipe,
    build_model,
    check_classifier,
    logits_of,
    model_geometry,
    parse_kwargs,
    save_model,
    trusted_spec,
)
from .outputs import finish, refuse_other_settings
from .settings import RetrainSettings, SearchSettings, check_training

LR, RULE, THRESHOLD = 1e-3, "relative", 0.3  # image defaults: from-scratch AdamW; the rule measured in docs/RESULTS.md
PROGRESS, OPTIMIZER, SEARCH_STATE = "progress.json", "optimizer.safetensors", "earlybird.safetensors"
RESUMABLE = ("model", "model_kwargs", "data", "image_size", "train_limit", "batch", "lr", "seed", "ratio", "structure",
             "scope", "every", "warmup", "window", "rule", "threshold", "deadline")


def _data(args: SearchSettings | RetrainSettings) -> ImageData:
    check_training(args)
    if args.train_limit is not None and args.train_limit < 2:
        raise ConfigError(f"--train-limit {args.train_limit} is too small. Fix: pass at least 2 (or leave it out).")
    data = load_images(args.data, seed=args.seed)
    if args.train_limit is not None:
        data.train_x, data.train_y = data.train_x[:args.train_limit], data.train_y[:args.train_limit]
        if len(torch.unique(data.train_y)) < 2:
            raise ConfigError(f"--train-limit {args.train_limit} keeps one class only. Fix: pass a larger limit.")
    return data


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _settings(args: SearchSettings) -> dict[str, Any]:
    data = str(Path(args.data).expanduser().resolve()) if Path(args.data).expanduser().exists() else args.data
    values = {**dataclasses.asdict(args), "data": data, "model_kwargs": parse_kwargs(args.model_kwargs)}
    return {k: values[k] for k in RESUMABLE}


# -- the search --------------------------------------------------------------------------------------------------

def search_image(args: SearchSettings) -> int:
    """Run the image search ``args`` describes (resuming the one saved in ``args.out``); 0 when a ticket was found."""
    from ..persist import checkpoint
    from ..plots import plot_search
    from ..prepare import check_ratio, prepare
    from ..search.controller import DEADLINE, EarlyBird

    check_ratio(args.ratio)
    args = dataclasses.replace(args)  # the defaults below are filled in a copy
    if args.importance not in ("auto", "magnitude"):
        raise ConfigError(f"--importance {args.importance} is for text models; the image search ranks by magnitude (measured "
                          "from scratch in docs/RESULTS.md). Fix: leave out --importance, or use ebcompile.prepare(..., "
                          "importance=...) in your own loop.")
    args.lr = LR if args.lr is None else args.lr
    args.threshold = THRESHOLD if args.threshold is None else args.threshold
    args.rule = RULE if args.rule is None else args.rule
    args.every = 50 if args.every is None else args.every
    args.deadline = DEADLINE if args.deadline == "auto" else args.deadline
    out, settings = Path(args.out), _settings(args)
    recover(out / "model")  # a commit a kill interrupted is rolled back: progress and weights of one save
    progress = _saved_progress(out, settings)  # refused before any training
    data = _data(args)
    num_classes = len(data.classes)
    torch.manual_seed(args.seed)
    model = build_model(args.model, settings["model_kwargs"], num_classes)
    channels, size = model_geometry(model, args.image_size, data.channels, data.size)
    recipe = Recipe(args.model, settings["model_kwargs"], num_classes, channels, list(size), data.classes)
    example = recipe.fit(data.train_x[:2])
    check_classifier(model, args.model, example, num_classes)
    if progress is not None:
        checkpoint.load(out / "model", model=model)
    prepare(model, example, ratio=args.ratio, structure=args.structure, scope=args.scope, importance="magnitude")
    model.to(_device())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    per_epoch = math.ceil(len(data.train_y) / args.batch)
    total = math.ceil(args.epochs * per_epoch)
    eb = EarlyBird(model, threshold=args.threshold, rule=args.rule, window=args.window, every=args.every,
                   warmup=args.warmup, rewind_at=0, budget=total, deadline=args.deadline)
    step = 0
    if progress is not None:
        eb.load(out / "model" / SEARCH_STATE)
        eb.budget = total  # this run's --epochs: the deadline follows the budget asked for now
        load_optimizer(opt, model, out / "model" / OPTIMIZER)
        step = progress["step"]
        print(f"resuming the search saved in {out / 'model'} at step {step} ({eb.checks} checks)")

    def save(at: int) -> None:
        extra = {OPTIMIZER: lambda p: save_optimizer(opt, model, p), SEARCH_STATE: eb.save,
                 PROGRESS: lambda p: p.write_text(json.dumps({"step": at, "found": eb.found, "settings": settings}) + "\n")}
        save_model(model, recipe, out / "model", extra)

    step = _train(model, opt, data, recipe, args, step, total, per_epoch, desc="search", earlybird=eb, save=save)
    save(step)
    _publish(out / "model" / SEARCH_STATE, out / SEARCH_STATE)
    plot_search(eb, out / "search.png", title=f"{args.model}: {args.structure} p={args.ratio}")
    acc = accuracy(model, data, recipe)
    result = {"task": "image", "model": args.model, "found": eb.found, "step": step, "epoch": round(step / per_epoch, 3),
              "checks": eb.checks, "validation_accuracy": acc, "distances": eb.distances()}
    return finish(args, out, eb, result, step, "Train longer (--epochs, the search resumes where it stopped)")


def _saved_progress(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The saved search to resume in ``out`` (None: start afresh); another run's folder is refused."""
    folder = out / "model"
    if not folder.exists():
        return None
    if not (folder / PROGRESS).is_file():
        raise ConfigError(f"{out} holds a model/ folder that is not an image search. Fix: pass a new --out (or the --out "
                          "of an image search to resume it).")
    try:
        progress = read_json(folder / PROGRESS)
        saved, step = progress["settings"], progress["step"]
        if not isinstance(saved, dict) or isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError("bad step or settings")
    except (CheckpointError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / PROGRESS} is broken ({type(exc).__name__}). Fix: pass a new --out.") from exc
    refuse_other_settings(out, saved, settings, RESUMABLE)
    return progress


def _publish(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (a hard link where the file system allows), atomically."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


# -- retraining the ticket ---------------------------------------------------------------------------------------

def retrain_image(args: RetrainSettings) -> int:
    """Retrain the ticket of the image search in ``args.search``, compacted; save it to ``args.out``/model."""
    from ..persist import checkpoint
    from ..prepare import prepare
    from ..search.controller import EarlyBird
    from .switch import finished, take_ticket

    folder, out = Path(args.search) / "model", Path(args.out)
    if not (folder / SEARCH_STATE).is_file() or not (folder / OPTIMIZER).is_file():
        raise CheckpointError(f"{folder} lacks {SEARCH_STATE} or {OPTIMIZER}. Fix: pass the --out folder of an image "
                              "`ebcompile search`.")
    args.lr = LR if args.lr is None else args.lr
    recipe = Recipe.load(folder)
    trusted_spec(recipe.model, args.factory)  # a factory only the file names: refused before any work
    data = _data(args)
    if len(data.classes) != recipe.num_classes or (data.classes != recipe.classes and recipe.classes):
        raise ConfigError(f"--data {args.data} has classes {data.classes[:5]}..., the search trained on {recipe.classes[:5]}"
                          "... Fix: retrain on the data the search used.")
    torch.manual_seed(args.seed)
    model = checkpoint.load(folder, model=recipe.build(args.factory))
    dense = sum(p.numel() for p in model.parameters())
    eb_probe = load_ticket_or_fail(folder)
    prepare(model, recipe.fit(data.train_x[:2]), ratio=eb_probe.ratio, structure=eb_probe.structure, scope=eb_probe.scope,
            importance="magnitude")
    model.to(_device())
    eb = EarlyBird(model)  # the saved search: its ticket and the weights before it (for --mode rewind)
    eb.load(folder / SEARCH_STATE)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    carried = args.mode == "continue"
    if carried:
        load_optimizer(opt, model, folder / OPTIMIZER)
    small = take_ticket(model, eb.ticket, mode=args.mode, weights=eb.rewind_weights, seed=args.seed,
                        optimizer=opt if carried else None)
    if small is not model and not carried:  # compacted: a fresh optimizer over its parameters
        opt = torch.optim.AdamW(small.parameters(), lr=args.lr, weight_decay=0.01)
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] = args.lr
    per_epoch = math.ceil(len(data.train_y) / args.batch)
    total = math.ceil(args.epochs * per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    _train(small, opt, data, recipe, args, 0, total, per_epoch, desc=f"retrain ({args.mode})", scheduler=sched)
    acc = accuracy(small, data, recipe)
    small = finished(small, model)
    save_model(small.cpu(), recipe, out / "model")
    params = sum(p.numel() for p in small.parameters())
    with atomic_path(out / "retrain.json") as tmp:
        tmp.write_text(json.dumps({"search": str(args.search), "mode": args.mode, "optimizer_state": "carried" if carried
                                   else "fresh", "validation_accuracy": acc, "dense_parameters": dense, "parameters": params},
                                  indent=2) + "\n")
    print(f"retrained the compact ticket ({args.mode}, optimizer state {'carried' if carried else 'fresh'}): {dense:,} -> "
          f"{params:,} parameters, validation accuracy {acc:.2%}")
    print(f"written to {out / 'model'} (export: ebcompile export {out / 'model'} model.onnx)")
    return 0


def load_ticket_or_fail(folder: Path) -> Any:
    from ..search.controller import load_ticket

    try:
        return load_ticket(folder / SEARCH_STATE)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder.parent} holds no ticket ({exc}). Fix: resume the search with more --epochs until "
                              "it finds one.") from exc


# -- training ----------------------------------------------------------------------------------------------------

def _train(model: nn.Module, opt: torch.optim.Optimizer, data: ImageData, recipe: Recipe, args: SearchSettings | RetrainSettings,
           step: int, total: int, per_epoch: int, desc: str, earlybird: Any = None, save: Any = None,
           scheduler: Any = None) -> int:
    """Optimizer steps ``step`` .. ``total``; batch order of epoch e and dropout of step s seeded from ``--seed``.
    With ``earlybird``: one ``step()`` per optimizer step, stopping at the ticket; ``save(step)`` after each epoch."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    n = len(data.train_y)
    model.train()
    order = None
    bar = tqdm(total=total, initial=step, desc=desc, leave=False, dynamic_ncols=True)
    try:
        while step < total and not (earlybird is not None and earlybird.found):
            epoch, i = divmod(step, per_epoch)
            if order is None or i == 0:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
            idx = order[i * args.batch:(i + 1) * args.batch]
            torch.manual_seed(args.seed * 1_000_003 + step)
            x, y = recipe.fit(data.train_x[idx]).to(device), data.train_y[idx].to(device)
            loss = F.cross_entropy(logits_of(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            bar.update(1)
            post = {"loss": f"{loss.item():.3f}"}
            if earlybird is not None:
                earlybird.step()
                last = earlybird.history[-1].get("distance", float("nan")) if earlybird.history else float("nan")
                post |= {"checks": earlybird.checks, "d": f"{last:.4f}"}
                if save is not None and step % per_epoch == 0 and step < total and not earlybird.found:
                    save(step)
            bar.set_postfix(post, refresh=False)
    finally:
        bar.close()
    return step


def accuracy(model: nn.Module, data: ImageData, recipe: Recipe, batch: int = 256) -> float:
    model.eval()
    device = next(model.parameters()).device
    right = 0
    with torch.no_grad():
        for i in range(0, len(data.val_y), batch):
            x = recipe.fit(data.val_x[i:i + batch]).to(device)
            right += int((logits_of(model(x)).argmax(-1).cpu() == data.val_y[i:i + batch]).sum())
    return right / max(1, len(data.val_y))
