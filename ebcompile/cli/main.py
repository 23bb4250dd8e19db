"""``ebcompile`` entry point: parse, dispatch, and turn ebcompile errors into one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import EbcompileError
from . import bench, compact, demo, export, inspect, retrain, search

SUBCOMMANDS = {"demo": demo, "search": search, "retrain": retrain, "compact": compact, "export": export,
               "inspect": inspect, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebcompile",
        description="Early-bird lottery tickets for Transformers: search, retrain, compact, export.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for module in SUBCOMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except EbcompileError as exc:
        print(f"ebcompile {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ebcompile {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
