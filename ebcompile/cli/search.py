"""``ebcompile search``: train a classifier until the early-bird ticket appears.

Text: fine-tune a Hugging Face sequence classifier (a model folder or hub name). Images: train from scratch a
model named ``torchvision:NAME``, ``timm:NAME`` or ``MODULE:FACTORY`` (``--model-kwargs`` JSON, e.g.
``torchvision:VisionTransformer --model-kwargs '{"image_size": 28, "patch_size": 7, "num_layers": 2,
"num_heads": 4, "hidden_dim": 64, "mlp_dim": 128}'``) on an IDX folder, an image folder or cifar10; a second
search into the same ``--out`` resumes the saved one (``ebcompile.recipes.search``: recipes/text.py, recipes/image.py).
Pixels are fitted to the model: grayscale repeated to 3 channels (or RGB to luma for a 1-channel model), resized (bilinear, antialiased)
to its image size (``--image-size``, else its own ``image_size``/``img_size``, else the data's), scaled to [-1, 1].

Writes to ``--out``: ``model/`` (the early-bird weights: save_pretrained + tokenizer for text; ebcompile.save +
``imageclf.json`` recipe + optimizer and search state for images), ``earlybird.safetensors`` (the search, with
the starting weights for ``retrain --mode rewind``), ``ticket.safetensors``, ``search.png`` (mask-distance
heatmap + distance curve) and ``search.json``.
"""

from __future__ import annotations

import argparse

from ..search.controller import DEADLINE, FINETUNE_DEADLINE


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .args import add_training_arguments

    p = sub.add_parser("search", help="fine-tune a text classifier until the early-bird ticket appears",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a Hugging Face model folder or hub name (e.g. roberta-base when online), or an image "
                                 "model: torchvision:NAME, timm:NAME or MODULE:FACTORY")
    p.add_argument("--out", required=True, help="folder for the ticket, the search state and the early-bird model")
    add_training_arguments(p)
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of heads and FFN neurons (or weights) to prune")
    p.add_argument("--structure", default="structured", choices=["structured", "unstructured"])
    p.add_argument("--scope", default="global", choices=["global", "layer"],
                   help="global (default): one ranking over all layers, each keeps its own widths (measured better "
                        "when fine-tuning a pretrained model); layer: every layer prunes the same share")
    p.add_argument("--importance", default="auto", choices=["auto", "magnitude", "taylor", "activation", "gate"],
                   help="how heads and neurons are ranked (default: %(default)s: taylor when the weights train, activation "
                        "with LoRA's frozen weights; the image search ranks by magnitude). Fine-tuning a pretrained text "
                        "model, gate (learnable unit gates with an L1 penalty, in their own AdamW group at --gate-lr) kept "
                        "the most accuracy in docs/early-bird.md but adds parameters; taylor and activation add none")
    p.add_argument("--gate-lr", type=float, default=1e-2, help="--importance gate: the gates' learning rate (default: %(default)s)")
    p.add_argument("--every", type=int, default=None,
                   help="optimizer steps between checks (default: text: the training's optimizer steps / 75, the measured "
                        "fine-tuning recipe of docs/early-bird.md, e.g. every 10 of 750; images: 50)")
    p.add_argument("--warmup", type=int, default=0, help="optimizer steps before the first check")
    p.add_argument("--window", type=int, default=5, help="checks whose distances must all pass (default: %(default)s)")
    p.add_argument("--rule", default=None, choices=["absolute", "relative"],
                   help="absolute, or relative to the largest distance seen (default: relative: the seed paper's "
                        "absolute rules fire at the first possible check, docs/early-bird.md)")
    p.add_argument("--threshold", type=float, default=None,
                   help="(default: 0.3 of the largest distance, relative; measured for fine-tuning in docs/early-bird.md and "
                        "from scratch by bench/reproduce.py: docs/RESULTS.md)")
    p.add_argument("--deadline", type=deadline_share, default="auto",
                   help="share of the training budget (--epochs) by which the ticket is drawn at the latest, even if the "
                        f"rule has not fired (default: text {FINETUNE_DEADLINE}, where fine-tuning's rule fires at 15-20%%: "
                        f"docs/early-bird.md; images {DEADLINE}, measured from scratch by bench/reproduce.py: "
                        "docs/RESULTS.md); 'none': only the rule decides")
    p.add_argument("--save-every", type=int, default=200,
                   help="text: optimizer steps between resume points (default: %(default)s); images save one every epoch")
    p.add_argument("--model-kwargs", default=None, help="images: JSON object of arguments for the model builder")
    p.add_argument("--image-size", default=None, help="images: N or HxW fed to the model (default: the model's own "
                                                      "image_size, else the data's)")
    p.set_defaults(run=run)


def deadline_share(text: str) -> float | str | None:
    """``--deadline``: a share of the budget in (0, 1], 'none', or 'auto' (the default of the kind of model)."""
    if text.lower() in ("none", "auto"):
        return None if text.lower() == "none" else "auto"
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share in (0, 1] or 'none'")
    return value


def run(args: argparse.Namespace) -> int:
    from ..recipes import SearchSettings, search
    from ..recipes.settings import from_namespace

    return search(from_namespace(SearchSettings, args))
