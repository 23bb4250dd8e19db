"""The text recipe: fine-tune a Hugging Face classifier in a ``Trainer`` until the early-bird ticket appears
(``search_text``), then retrain the ticket compacted (``retrain_text``).

Every ``--save-every`` optimizer steps, at the ticket and at the end of the budget the Trainer writes
``--out/checkpoint-<step>/`` as safetensors + JSON (``SafeCheckpoints``: weights, optimizer, scheduler, random
states, ``earlybird.safetensors``), and ``progress.json`` last, which marks the checkpoint complete. The two
newest are kept. A second ``search`` into the same ``--out`` resumes from the newest complete one (same settings;
only ``--epochs`` may change), after removing the folders a killed run left half-written: the Trainer skips the
batches already seen, so with the same ``--epochs`` it draws the checks an uninterrupted search draws (more
epochs change the learning-rate schedule and the deadline from then on). A search that had found its ticket is
not trained again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..persist.fsguard import read_json
from ..persist.io import atomic_path
from .outputs import finish, refuse_other_settings
from .settings import RetrainSettings, SearchSettings, check_training

PROGRESS = "progress.json"
RESUMABLE = ("model", "data", "train_limit", "batch", "lr", "max_len", "seed", "ratio", "structure", "scope", "every",
             "warmup", "window", "rule", "threshold", "deadline", "importance", "gate_lr")
DEFAULTS = {"importance": "magnitude", "gate_lr": 1e-2}  # settings a search saved before they existed had these


def settings_of(args: SearchSettings) -> dict[str, Any]:
    values = dataclasses.asdict(args)
    for key in ("model", "data"):  # a local folder by its absolute path, a hub name as given
        local = Path(values[key]).expanduser()
        values[key] = str(local.resolve()) if local.exists() else values[key]
    return {k: values[k] for k in RESUMABLE}


def checkpoints(out: Path) -> list[Path]:
    """``out``'s Trainer checkpoint folders, oldest step first."""
    steps = sorted((int(p.name.split("-", 1)[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit())
    return [p for _, p in steps]


def resume_point(out: Path, settings: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint of a text search in ``out`` and its progress; another run's is refused."""
    complete = [p for p in checkpoints(out) if (p / PROGRESS).is_file()]
    if not complete:
        if (out / "model" / "imageclf.json").is_file():
            raise ConfigError(f"{out} holds an image search. Fix: pass a new --out for this text search.")
        return None
    folder = complete[-1]
    for stale in checkpoints(out)[checkpoints(out).index(folder) + 1:]:  # written after it, never completed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        progress = read_json(folder / PROGRESS)
        saved, found = progress["settings"], progress["found"]
        if not isinstance(saved, dict) or not isinstance(found, bool):
            raise ValueError("bad settings or found")
    except (CheckpointError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / PROGRESS} is broken ({type(exc).__name__}). Fix: remove {folder}, or pass a "
                              "new --out.") from exc
    refuse_other_settings(out, {**DEFAULTS, **saved}, settings, RESUMABLE)
    return folder, progress


def ticket_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a text search in ``out`` if it holds the found ticket, else None."""
    for folder in reversed(checkpoints(out)):
        try:
            progress = read_json(folder / PROGRESS)
        except CheckpointError:
            continue
        return folder if progress.get("found") is True and (folder / "optimizer.safetensors").is_file() else None
    return None


def progress_callback(settings: dict[str, Any], earlybird: Any) -> Any:
    """A callback that saves at the ticket and at the end, and marks each checkpoint complete (written last)."""
    from transformers import TrainerCallback

    class SearchProgress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if earlybird.found or state.global_step >= state.max_steps:
                control.should_save = True
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir() and args.should_save:
                with atomic_path(folder / PROGRESS) as tmp:
                    tmp.write_text(json.dumps({"step": state.global_step, "found": earlybird.found,
                                               "checks": earlybird.checks, "settings": settings}) + "\n")

    return SearchProgress()


def gated_optimizer(model: Any, importance: str, lr: float | None, gate_lr: float) -> Any:
    """``--importance gate``: the Trainer's AdamW, with the unit gates in a group of their own at ``--gate-lr`` and no
    weight decay (at a fine-tuning learning rate a gate barely moves); None (the Trainer's own) otherwise."""
    if importance != "gate":
        return None
    import torch

    from ..search.gates import gate_parameters
    from .textclf import LR

    gates = {id(g) for g in gate_parameters(model)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in gates]
    return torch.optim.AdamW([{"params": rest, "weight_decay": 0.01},
                              {"params": gate_parameters(model), "lr": gate_lr, "weight_decay": 0.0}],
                             lr=LR if lr is None else lr)


def search_text(args: SearchSettings) -> int:
    """Run the text search ``args`` describes (resuming the one saved in ``args.out``); 0 when a ticket was found."""
    from ..integrations.hf_trainer import STATE_FILE, EarlyBirdCallback, auto_every
    from ..plots import plot_search
    from ..prepare import check_ratio, prepare
    from ..search.controller import FINETUNE_DEADLINE, EarlyBird
    from . import textclf

    check_ratio(args.ratio)
    check_training(args)  # --batch divides below, --lr reaches AdamW
    args = dataclasses.replace(args)  # the defaults below are filled in a copy
    args.threshold = 0.3 if args.threshold is None else args.threshold  # the measured fine-tuning recipe
    args.rule = "relative" if args.rule is None else args.rule
    args.deadline = FINETUNE_DEADLINE if args.deadline == "auto" else args.deadline
    if args.model_kwargs is not None or args.image_size is not None:
        raise ConfigError("--model-kwargs and --image-size are for image models. Fix: leave them out for a text model, "
                          "or name an image model (torchvision:NAME, timm:NAME, MODULE:FACTORY).")
    if not args.gate_lr > 0:
        raise ConfigError(f"--gate-lr {args.gate_lr} must be > 0. Fix: e.g. --gate-lr 0.01.")
    if args.save_every < 1:
        raise ConfigError(f"--save-every {args.save_every} must be >= 1. Fix: e.g. --save-every 200.")
    out, settings = Path(args.out), settings_of(args)
    resume = resume_point(out, settings)  # refused before anything is loaded or trained
    train, val = textclf.load_texts(args.data, args.train_limit)
    if args.every is None:  # as the callback's every="auto", over the training's optimizer steps
        args.every = auto_every(math.ceil(args.epochs * math.ceil(len(train[0]) / args.batch)))
    model, tok = textclf.load_classifier(args.model, num_labels=textclf.label_count(train, val))
    prepare(model, textclf.example_batch(tok, train, args.max_len), ratio=args.ratio, structure=args.structure,
            scope=args.scope, importance=args.importance)
    eb = EarlyBird(model, threshold=args.threshold, rule=args.rule, window=args.window, every=args.every,
                   warmup=args.warmup, rewind_at=0, deadline=args.deadline)
    callback = EarlyBirdCallback(every=1, earlybird=eb, apply=False, stop=True, deadline=args.deadline)
    trainer = textclf.trainer(model, tok, train, args, out, [callback, progress_callback(settings, eb)],
                              save_every=args.save_every,
                              optimizer=gated_optimizer(model, args.importance, args.lr, args.gate_lr))
    if resume is None:
        trainer.train()
    else:
        folder, progress = resume
        print(f"resuming the search saved in {folder} at step {progress['step']} ({progress['checks']} checks)")
        if progress["found"]:  # nothing left to train: the checkpoint holds the early-bird weights and the ticket
            trainer._load_from_checkpoint(str(folder))
            eb.load(folder / STATE_FILE)
            trainer.state.global_step = progress["step"]
        else:
            trainer.train(resume_from_checkpoint=str(folder))
    step = trainer.state.global_step
    out.mkdir(parents=True, exist_ok=True)
    eb.save(out / "earlybird.safetensors")
    plot_search(eb, out / "search.png", title=f"{args.model}: {args.structure} p={args.ratio}")
    acc = textclf.accuracy(model, tok, val, args.max_len)
    result = {"model": args.model, "found": eb.found, "step": step, "checks": eb.checks,
              "validation_accuracy": acc, "distances": eb.distances()}
    if eb.found:
        textclf.save_pretrained_atomically(model, tok, out / "model")
    return finish(args, out, eb, result, step, "Train longer (--epochs; the search resumes where it stopped)")


def retrain_text(args: RetrainSettings) -> int:
    """Retrain the ticket of the text search in ``args.search``, compacted; save it to ``args.out``/model."""
    from ..persist import checkpoint
    from ..persist.pretrained import pretrained_weights
    from ..persist.savedir import atomic_dir
    from ..prepare import prepare
    from ..search.controller import EarlyBird, load_ticket, saved_importance
    from ..transforms.masks import is_gate
    from . import textclf
    from .switch import finished, take_ticket

    check_training(args)
    search = Path(args.search)
    if not (search / "model").is_dir() or not (search / "earlybird.safetensors").is_file():
        raise CheckpointError(f"{search} lacks model/ or earlybird.safetensors. Fix: pass the --out folder of a "
                              "`ebcompile search` that found its ticket.")
    train, val = textclf.load_texts(args.data, args.train_limit)
    model, tok = textclf.load_classifier(str(search / "model"))  # the head the search trained
    dense = sum(p.numel() for p in model.parameters())
    ticket = load_ticket(search)
    kind = saved_importance(search / "earlybird.safetensors")
    prepare(model, textclf.example_batch(tok, train, args.max_len), ratio=ticket.ratio, structure=ticket.structure,
            scope=ticket.scope, importance=kind)
    if kind == "gate":  # the gates the search learnt (from_pretrained dropped them): the model computes what it did
        model.load_state_dict({k: v for k, v in (pretrained_weights(search / "model") or {}).items() if is_gate(k)}, strict=False)
    eb = EarlyBird(model)  # the saved search: its ticket and the weights before it (for --mode rewind)
    eb.load(search / "earlybird.safetensors")
    out = Path(args.out)
    opt = carried_optimizer(model, tok, train, args, search, kind) if args.mode == "continue" else None
    small = take_ticket(model, eb.ticket, mode=args.mode, weights=eb.rewind_weights, seed=args.seed, optimizer=opt)
    textclf.trainer(small, tok, train, args, out, optimizer=opt).train()
    acc = textclf.accuracy(small, tok, val, args.max_len)
    small = finished(small, model)
    with atomic_dir(out / "model", marker=checkpoint.META) as tmp:  # one commit: files a save did not write stay
        checkpoint.save(small, tmp)
        tok.save_pretrained(tmp)
    params, state = sum(p.numel() for p in small.parameters()), "fresh" if opt is None else "carried"
    with atomic_path(out / "retrain.json") as tmp:
        tmp.write_text(json.dumps({"search": str(search), "mode": args.mode, "optimizer_state": state, "validation_accuracy": acc,
                                   "dense_parameters": dense, "parameters": params}, indent=2) + "\n")
    print(f"retrained the compact ticket ({args.mode}, optimizer state {state}): {dense:,} -> {params:,} parameters, "
          f"validation accuracy {acc:.2%}")
    print(f"written to {out / 'model'} (reload: ebcompile.load({str(out / 'model')!r}))")
    return 0


def carried_optimizer(model: Any, tok: Any, train: Any, args: RetrainSettings, search: Path, kind: str) -> Any:
    """The search's AdamW state at its ticket (its newest complete checkpoint), over ``model``'s parameters, its
    learning rate restarted at ``args.lr``; None (a fresh optimizer) when the search kept no checkpoint."""
    from ..persist.optim_io import load_optimizer
    from . import textclf

    folder = ticket_checkpoint(search)
    if folder is None:
        print(f"{search} keeps no checkpoint of the search at its ticket (written before searches kept resume "
              "points, or removed): the retrain starts a fresh optimizer")
        return None
    saved = {**DEFAULTS, **read_json(folder / PROGRESS).get("settings", {})}  # built as the search built it
    opt = gated_optimizer(model, kind, args.lr, saved["gate_lr"]) or \
        textclf.trainer(model, tok, train, args, Path(args.out)).create_optimizer()
    load_optimizer(opt, model, folder / "optimizer.safetensors")
    lr = textclf.LR if args.lr is None else args.lr
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] = lr
    return opt
