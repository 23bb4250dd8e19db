"""``ebcompile retrain``: retrain the ticket a ``search`` found, compacted, and save it (``ebcompile.save``).

The ticket is applied (``--mode continue``: the early-bird weights, ``rewind``: the weights before the
search, ``reinit``: fresh ones); a structured ticket's pruned heads and neurons are removed and the smaller
model trains for ``--epochs`` (an unstructured ticket trains masked, its zeros held, and is compacted after).
Writes ``--out``/``model`` (reload with ``ebcompile.load``, tokenizer beside it) and ``retrain.json``.
With ``--mode continue`` the search's optimizer state (its checkpoint at the ticket) is carried onto the model
that trains (structured: the compact one, by ``compact(model, optimizer=opt)``; unstructured: the masked one),
its learning rate restarted at ``--lr``; other modes start a fresh optimizer. An image search's folder
(``model/imageclf.json``) retrains the same way in a PyTorch loop. The work is ``ebcompile.recipes.retrain``.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .args import add_factory_argument, add_training_arguments

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
    """Refuse an ``--out`` that is the search folder or inside its ``model/`` before anything is read or written."""
    from ..recipes import check_retrain_out

    check_retrain_out(args.search, args.out)


def run(args: argparse.Namespace) -> int:
    from ..recipes import RetrainSettings, retrain
    from ..recipes.settings import from_namespace

    return retrain(from_namespace(RetrainSettings, args))
