"""``ebcompile retrain``: retrain the ticket a ``search`` found, compacted, and save it (``ebcompile.save``).

The ticket is applied (``--mode continue``: the early-bird weights, ``rewind``: the weights before the
search, ``reinit``: fresh ones); a structured ticket's pruned heads and neurons are removed and the smaller
model trains for ``--epochs`` (an unstructured ticket trains masked, its zeros held, and is compacted after).
Writes ``--out``/``model`` (reload with ``ebcompile.load``, tokenizer beside it) and ``retrain.json``.
With ``--mode continue`` the search's optimizer state (its checkpoint at the ticket) is carried onto the model
that trains (structured: the compact one, by ``compact(model, optimizer=opt)``; unstructured: the masked one),
its learning rate restarted at ``--lr``; other modes start a fresh optimizer. An image search's folder
(``model/imageclf.json``) retrains the same way in a PyTorch loop.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .imageclf import add_factory_argument
    from .textclf import add_training_arguments

    p = sub.add_parser("retrain", help="retrain the compacted ticket found by `ebcompile search`",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("search", help="the --out folder of `ebcompile search`")
    p.add_argument("--out", required=True, help="folder for the retrained compact model")
    p.add_argument("--mode", default="continue", choices=["continue", "rewind", "reinit"],
                   help="which weights the ticket retrains from (default: %(default)s)")
    add_training_arguments(p)
    add_factory_argument(p)
    p.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` that is the search folder or inside its ``model/`` (checked before anything is read or
    written): the retrain would write its checkpoints among the search's and replace the model it reads."""
    from ..errors import OutputPathError

    search, out = Path(args.search).expanduser().resolve(), Path(args.out).expanduser().resolve()
    if out == search or out.is_relative_to(search / "model"):
        raise OutputPathError(f"--out {args.out} is the search folder {args.search}{'' if out == search else ' (its model/)'}: "
                              "the retrain would write over the search it reads. Fix: pass another folder, e.g. "
                              f"--out {search.with_name(search.name + '-retrained')}.")


def run(args: argparse.Namespace) -> int:
    from .imageclf import is_saved

    if is_saved(Path(args.search) / "model"):
        from .imagetrain import retrain

        return retrain(args)
    from ..errors import CheckpointError
    from ..persist import checkpoint
    from ..persist.io import atomic_path
    from ..persist.pretrained import pretrained_weights
    from ..persist.savedir import atomic_dir
    from ..prepare import prepare
    from ..search.controller import EarlyBird, load_ticket, saved_importance
    from ..search.ticket import apply_ticket
    from ..transforms.masks import is_gate
    from ..transforms.shrink import compact
    from . import textclf

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
    apply_ticket(model, eb.ticket, mode=args.mode, weights=eb.rewind_weights, seed=args.seed)
    # structured: train the compact model (cheaper steps), the optimizer moved onto it with its state sliced;
    # unstructured: the masked one (masks hold the zeros)
    small = compact(model, optimizer=opt).train() if eb.ticket.structure == "structured" else model.train()
    textclf.trainer(small, tok, train, args, out, optimizer=opt).train()
    acc = textclf.accuracy(small, tok, val, args.max_len)
    if small is model:
        small = compact(model)
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


def carried_optimizer(model: Any, tok: Any, train: Any, args: argparse.Namespace, search: Path, kind: str) -> Any:
    """The search's AdamW state at its ticket (its newest complete checkpoint), over ``model``'s parameters, its
    learning rate restarted at ``--lr``; None (a fresh optimizer) when the search kept no checkpoint."""
    from ..persist.fsguard import read_json
    from ..persist.optim_io import load_optimizer
    from . import textclf
    from .textsearch import DEFAULTS, PROGRESS, gated_optimizer, ticket_checkpoint

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
