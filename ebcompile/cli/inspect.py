"""``ebcompile inspect``: what a saved ticket or controller state holds."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise a saved ticket, per layer", description=__doc__)
    p.add_argument("path", help="a ticket (Ticket.save), a saved search (EarlyBird.save) or a Trainer checkpoint folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..search.controller import load_ticket

    t = load_ticket(args.path)
    rows = []
    for key, keep in (t.masks.units or t.masks.tensors).items():
        rows.append({"name": key, "kept": int(keep.sum()), "total": keep.numel()})
    summary = {"structure": t.structure, "ratio": t.ratio, "scope": t.scope, "found_at": t.found_at,
               "pruned_fraction": round(t.sparsity(), 6), "entries": rows}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.path}: {t.structure} ticket, ratio {t.ratio}, scope {t.scope}, found at {t.found_at}, "
          f"pruned {t.sparsity():.2%}")
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        print(f"  {r['name']:<{width}}  {r['kept']:>8,} / {r['total']:<8,} kept")
    return 0
