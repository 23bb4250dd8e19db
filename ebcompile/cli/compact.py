"""``ebcompile compact``: apply a saved ticket to a model and save the compacted model (``ebcompile.save``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import add_factory_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compact", help="apply a saved ticket to a model (Hugging Face, or an image run's model/) and write the compact model",
                       description=__doc__)
    p.add_argument("model", help="the trained model: a save_pretrained folder, a Trainer checkpoint or a hub name")
    p.add_argument("ticket", help="the ticket drawn on this model: a Ticket.save file, an EarlyBird.save file, or a "
                                  "Trainer checkpoint folder (EarlyBirdCallback writes earlybird.safetensors there)")
    p.add_argument("out", help="directory for the compact model (reload with ebcompile.load)")
    p.add_argument("--round-to", type=int, default=None,
                   help="keep widths at multiples of N (structured tickets; default 8; 1: exactly the ticket's units)")
    add_factory_argument(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..persist import checkpoint
    from ..prepare import prepare
    from ..recipes import imageclf
    from ..report import report
    from ..search.controller import load_ticket
    from ..search.ticket import apply_ticket
    from ..transforms.shrink import compact
    from .models import load_with_inputs

    ticket = load_ticket(args.ticket)
    model, inputs = load_with_inputs(args.model, factory=args.factory)
    dense = sum(p.numel() for p in model.parameters())
    prepare(model, inputs, ratio=ticket.ratio, structure=ticket.structure, scope=ticket.scope)
    apply_ticket(model, ticket, mode="continue")
    small = compact(model, round_to="auto" if args.round_to is None else args.round_to)
    if imageclf.is_saved(args.model):  # an image model: its recipe goes along, so that export can rebuild it
        imageclf.save_model(small, imageclf.Recipe.load(args.model), Path(args.out))
        where = Path(args.out)
    else:
        where = checkpoint.save(small, args.out)
    print(f"{args.model}: {ticket.structure} ticket (ratio {ticket.ratio}) applied and compacted: "
          f"{dense:,} -> {sum(p.numel() for p in small.parameters()):,} parameters")
    print(report(small))
    how = "ebcompile export, or ebcompile.load(path, model=Recipe.load(path).build(factory=...))" if imageclf.is_saved(where) else \
        f"ebcompile.load({str(where)!r})"
    print(f"written to {where} (reload: {how})")
    return 0
