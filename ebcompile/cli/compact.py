"""``ebcompile compact``: apply a saved ticket to a model and save the compacted model (``ebcompile.save``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compact", help="apply a saved ticket to a Hugging Face model and write the compact model",
                       description=__doc__)
    p.add_argument("model", help="the trained model: a save_pretrained folder, a Trainer checkpoint or a hub name")
    p.add_argument("ticket", help="the ticket drawn on this model: a Ticket.save file, an EarlyBird.save file, or a "
                                  "Trainer checkpoint folder (EarlyBirdCallback writes earlybird.safetensors there)")
    p.add_argument("out", help="directory for the compact model (reload with ebcompile.load)")
    p.add_argument("--round-to", type=int, default=None, help="keep widths at multiples of N (structured tickets; 8 on GPU)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import checkpoint
    from ..controller import load_ticket
    from ..passes.shrink import compact
    from ..prepare import prepare
    from ..report import report
    from ..ticket import apply_ticket
    from .models import example_inputs, load_model

    ticket = load_ticket(args.ticket)
    model = load_model(args.model)
    dense = sum(p.numel() for p in model.parameters())
    prepare(model, example_inputs(model), ratio=ticket.ratio, structure=ticket.structure, scope=ticket.scope)
    apply_ticket(model, ticket, mode="continue")
    small = compact(model, round_to=args.round_to)
    where = checkpoint.save(small, args.out)
    print(f"{args.model}: {ticket.structure} ticket (ratio {ticket.ratio}) applied and compacted: "
          f"{dense:,} -> {sum(p.numel() for p in small.parameters()):,} parameters")
    print(report(small))
    print(f"written to {where} (reload: ebcompile.load({str(where)!r}))")
    return 0
