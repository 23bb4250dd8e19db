"""``ebcompile demo``: the embedded end-to-end run on scikit-learn's digits (CPU, about a minute)."""

from __future__ import annotations

import argparse

from ..search.controller import DEADLINE
from .search import deadline_share


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small ViT on the bundled digits, find and retrain the early-bird ticket",
                       description=__doc__)
    p.add_argument("--out", default="demo-output", help="folder for the plot and result JSON (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=40, help="training budget in epochs (default: %(default)s)")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of heads and FFN neurons to prune (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.3, help="relative distance threshold (default: %(default)s)")
    p.add_argument("--window", type=int, default=5, help="checks that must stay under it (default: %(default)s)")
    p.add_argument("--deadline", type=deadline_share, default=DEADLINE,
                   help="share of --epochs by which the ticket is drawn at the latest (default: %(default)s); 'none': the rule alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..demo import format_result, run_demo
    from ..errors import ConfigError
    from ..prepare import check_ratio

    check_ratio(args.ratio)
    if args.epochs < 2:
        raise ConfigError(f"--epochs {args.epochs} is too small. Fix: pass at least 2 (default 40).")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run_demo(args.out, epochs=args.epochs, ratio=args.ratio, threshold=args.threshold, window=args.window,
                      deadline=DEADLINE if args.deadline == "auto" else args.deadline, seed=args.seed, progress=not args.no_progress,
                      echo=print if args.no_progress else _write)
    print(format_result(result))
    return 0


def _write(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line)
