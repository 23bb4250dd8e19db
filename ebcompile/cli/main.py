"""``ebcompile`` entry point: parse, dispatch, and turn errors into one line.

An ``EbcompileError`` (bad input, with its fix) exits 2; any other exception is a bug in ebcompile: one line
saying so, exit 1. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import EbcompileError
from ..io import check_writable
from . import bench, compact, demo, export, inspect, retrain, search

OUTPUTS = {"demo": True, "search": True, "retrain": True, "compact": True, "export": False}  # args.out: a directory?
SUBCOMMANDS = {"demo": demo, "search": search, "retrain": retrain, "compact": compact, "export": export,
               "inspect": inspect, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebcompile",
        description="Early-bird lottery tickets for Transformers: search, retrain, compact, export.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for module in SUBCOMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in OUTPUTS and getattr(args, "out", None):
            check_writable(args.out, directory=OUTPUTS[args.command])  # before any training, not after
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"ebcompile {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place every error becomes one line
        if args.debug:
            raise
        if isinstance(exc, EbcompileError):
            print(f"ebcompile {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(f"ebcompile {args.command}: internal error (a bug in ebcompile; please report it): {type(exc).__name__}: "
              f"{_one_line(exc)[:300]}. Run with --debug for the traceback.", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
