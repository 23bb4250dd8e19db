"""Command-line arguments the training commands share (``search``, ``retrain``, ``compact``, ``export``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..recipes.textclf import LR


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="text: a folder with rt-polarity.pos/.neg (MR polarity), or a datasets "
                                                 "hub name with text/label columns such as imdb (needs `pip install datasets`); "
                                                 "images: an MNIST-style IDX folder, an image folder (one subfolder per "
                                                 "class) or cifar10 (downloaded when online)")
    p.add_argument("--epochs", type=float, default=3.0, help="training budget in epochs (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="per-device batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default: {LR} for text, with linear decay; "
                                                          "1e-3 for images)")
    p.add_argument("--max-len", type=int, default=128, help="tokens per text (default: %(default)s)")
    p.add_argument("--train-limit", type=int, default=None, help="use only this many training texts or images")
    p.add_argument("--seed", type=int, default=0)


def add_factory_argument(p: Any) -> None:
    p.add_argument("--factory", default=None, metavar="MODULE:FACTORY",
                   help="builds an image run's model whose imageclf.json names MODULE:FACTORY (only code named on the "
                        "command line is imported)")
