"""Recipes: search → ticket → retrain, written once; ``ebcompile search`` / ``ebcompile retrain`` call them.

    from ebcompile.recipes import SearchSettings, RetrainSettings, search, retrain
    search(SearchSettings(model="sentence-transformers/all-MiniLM-L6-v2", data="mr-polarity", out="run"))
    retrain(RetrainSettings(search="run", data="mr-polarity", out="run-small"))

A text model (a Hugging Face folder or hub name) fine-tunes in a ``Trainer`` (``recipes/text.py``); an image model
(``torchvision:NAME``, ``timm:NAME``, ``MODULE:FACTORY``) trains from scratch in a PyTorch loop
(``recipes/image.py``). Both hand over from search to retraining with ``take_ticket`` (``recipes/switch.py``),
which your own loop can call too. Each returns 0 when done (``search``: 1 when no ticket appeared in the budget);
bad settings raise a typed ``ebcompile.errors`` error before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from .settings import RetrainSettings, SearchSettings
from .switch import finished, take_ticket

__all__ = ["SearchSettings", "RetrainSettings", "search", "retrain", "take_ticket", "finished"]


def search(settings: SearchSettings) -> int:
    """Train until the early-bird ticket appears; write it, the early-bird model and the search to ``settings.out``."""
    from .imageclf import is_image_model

    if is_image_model(settings.model):
        from .image import search_image

        return search_image(settings)
    from .text import search_text

    return search_text(settings)


def retrain(settings: RetrainSettings) -> int:
    """Retrain the ticket the search in ``settings.search`` found, compacted; save it to ``settings.out``/model."""
    from .imageclf import is_saved

    if is_saved(Path(settings.search) / "model"):
        from .image import retrain_image

        return retrain_image(settings)
    from .text import retrain_text

    return retrain_text(settings)
