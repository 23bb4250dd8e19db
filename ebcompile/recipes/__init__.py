"""Recipes: search → ticket → retrain, written once; ``ebcompile search`` / ``ebcompile retrain`` call them.

    from ebcompile.recipes import SearchSettings, RetrainSettings, search, retrain
    search(SearchSettings(model="sentence-transformers/all-MiniLM-L6-v2", data="mr-polarity", out="run"))
    retrain(RetrainSettings(search="run", data="mr-polarity", out="run-small"))

A text model (a Hugging Face folder or hub name) fine-tunes in a ``Trainer`` (``recipes/text.py``); an image model
(``torchvision:NAME``, ``timm:NAME``, ``MODULE:FACTORY``) trains from scratch in a PyTorch loop
(``recipes/image.py``). Both hand over from search to retraining with ``take_ticket`` (``recipes/switch.py``),
which your own loop can call too. Each returns 0 when done (``search``: 1 when no ticket appeared in the budget);
bad settings raise a typed ``ebcompile.errors`` error before anything is written, and a run that fails or is
interrupted removes the ``out`` folder it created while that holds no file.
"""

from __future__ import annotations

from pathlib import Path

from .outputs import removed_if_left_empty
from .settings import RetrainSettings, SearchSettings, check_training
from .switch import finished, take_ticket

__all__ = ["SearchSettings", "RetrainSettings", "search", "retrain", "take_ticket", "finished", "check_retrain_out"]


def search(settings: SearchSettings) -> int:
    """Train until the early-bird ticket appears; write it, the early-bird model and the search to ``settings.out``."""
    from ..persist.io import check_writable
    from .imageclf import is_image_model

    check_training(settings)
    check_writable(settings.out, directory=True)  # before any training, not after
    with removed_if_left_empty(settings.out):
        if is_image_model(settings.model):
            from .image import search_image

            return search_image(settings)
        from .text import search_text

        return search_text(settings)


def retrain(settings: RetrainSettings) -> int:
    """Retrain the ticket the search in ``settings.search`` found, compacted; save it to ``settings.out``/model."""
    from ..persist.io import check_writable
    from .imageclf import is_saved

    check_retrain_out(settings.search, settings.out)
    check_training(settings)
    check_writable(settings.out, directory=True)
    with removed_if_left_empty(settings.out):
        if is_saved(Path(settings.search) / "model"):
            from .image import retrain_image

            return retrain_image(settings)
        from .text import retrain_text

        return retrain_text(settings)


def check_retrain_out(search: str, out: str) -> None:
    """``OutputPathError`` for an ``out`` that is the search folder or inside its ``model/``: the retrain would write
    its checkpoints among the search's and replace the model it reads."""
    from ..errors import OutputPathError

    folder, target = Path(search).expanduser().resolve(), Path(out).expanduser().resolve()
    if target == folder or target.is_relative_to(folder / "model"):
        raise OutputPathError(f"--out {out} is the search folder {search}{'' if target == folder else ' (its model/)'}: "
                              "the retrain would write over the search it reads. Fix: pass another folder, e.g. "
                              f"--out {folder.with_name(folder.name + '-retrained')}.")
