"""``ebcompile`` entry point: parse, dispatch, and turn errors into one line.

An ``EbcompileError`` (bad input, with its fix) and an argument the parser refuses exit 2, in one line with a
fix; any other exception is a bug in ebcompile: one line saying so, exit 1. ``--debug`` shows the traceback
instead. A Ctrl-C (SIGINT) is one ``interrupted`` line and exit 130 wherever it lands: while the arguments are
parsed, and also when the error that reaches ``main`` is another one it caused (a DataLoader worker or child
process killed by the same signal, a typed error raised from it).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

from ..errors import EbcompileError
from ..persist.io import check_writable
from . import bench, compact, demo, export, inspect, retrain, search, serve

OUTPUTS = {"demo": True, "search": True, "retrain": True, "compact": True, "export": False, "serve-export": True}  # args.out: a directory?
SUBCOMMANDS = {"demo": demo, "search": search, "retrain": retrain, "compact": compact, "export": export,
               "inspect": inspect, "bench": bench, "serve-export": serve}


class Parser(argparse.ArgumentParser):
    """An argument parser (its subcommands' too) whose errors are one line with a fix, exit code 2."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split()).rstrip(".")
        self.exit(2, f"{self.prog}: error: {line}. Fix: see `{self.prog} --help` for the arguments it accepts.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ebcompile",
        description="Early-bird lottery tickets for Transformers: search, retrain, compact, export.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for module in SUBCOMMANDS.values():
        module.add_parser(sub)
    return parser


@contextmanager
def _sigint_seen() -> Iterator[list[int]]:
    """Inside: SIGINT raises ``KeyboardInterrupt`` as usual and is also recorded in the yielded list."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: object) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None) -> int:
    command = None
    with _sigint_seen() as seen:
        try:
            args = build_parser().parse_args(argv)
            command = args.command
            return _run(args, seen)
        except KeyboardInterrupt:
            return _interrupted(command)


def _interrupted(command: str | None) -> int:
    print(f"ebcompile {command}: interrupted" if command else "ebcompile: interrupted", file=sys.stderr)
    return 130


def _run(args: argparse.Namespace, seen: list[int]) -> int:
    try:
        if getattr(args, "check", None) is not None:  # a command's own argument checks, before anything is touched
            args.check(args)
        if args.command in OUTPUTS and getattr(args, "out", None):
            check_writable(args.out, directory=OUTPUTS[args.command])  # before any training, not after
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return _interrupted(args.command)
    except Exception as exc:  # noqa: BLE001 - the one place every error becomes one line
        if seen:  # the error is what the interrupt left behind (a killed worker, a child's signal)
            return _interrupted(args.command)
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
