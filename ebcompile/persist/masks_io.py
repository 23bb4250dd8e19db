"""How ``Masks`` become tensors and a JSON header (tickets, saved searches, Trainer checkpoints) and back.

A mask is stored as a uint8 tensor named ``<prefix><tag><name>``, where the tag says whether ``name`` is a
tensor (per-weight mask) or a group set (per-unit mask); the header holds ``structure`` and ``kinds``.
Two tag styles exist on disk and both stay readable: ``TICKET_TAGS`` (``Ticket.save``: ``tensor/``,
``unit/``) and ``STATE_TAGS`` (``EarlyBird.state_dict``/``save``: ``t:``, ``u:``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..search.importance import Masks

__all__ = ["TICKET_TAGS", "STATE_TAGS", "masks_to_tensors", "masks_from_tensors", "pack_bits"]

TICKET_TAGS = ("tensor/", "unit/")  # (per-tensor masks, per-unit masks)
STATE_TAGS = ("t:", "u:")


def masks_to_tensors(masks: Masks, prefix: str = "", tags: tuple[str, str] = TICKET_TAGS
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``masks`` as uint8 tensors named ``prefix + tag + name`` and a JSON-serialisable header
    (``{"structure", "kinds"}``) that ``masks_from_tensors`` needs back."""
    tensor_tag, unit_tag = tags
    tensors = {f"{prefix}{tensor_tag}{k}": v.to(torch.uint8) for k, v in masks.tensors.items()}
    tensors.update({f"{prefix}{unit_tag}{k}": v.to(torch.uint8) for k, v in masks.units.items()})
    return tensors, {"structure": masks.structure, "kinds": dict(masks.kinds)}


def masks_from_tensors(tensors: dict[str, torch.Tensor], header: dict[str, Any], prefix: str = "",
                       tags: tuple[str, str] = TICKET_TAGS) -> Masks:
    """The ``Masks`` that ``masks_to_tensors`` wrote with the same ``prefix`` and ``tags`` (``header`` needs
    ``structure`` and ``kinds``; other keys are ignored, as are tensors not named ``prefix + tag + name``)."""
    masks = Masks(header["structure"], kinds=dict(header["kinds"]))
    for key, value in tensors.items():
        for tag, into in zip((prefix + tags[0], prefix + tags[1]), (masks.tensors, masks.units)):
            if key.startswith(tag):
                into[key[len(tag):]] = value.bool()
                break
    return masks


def pack_bits(masks: Masks) -> np.ndarray:
    """The vectors distances are measured on (``masks.compared()``), concatenated and bit-packed (uint8)."""
    flat = torch.cat([v.flatten().cpu() for v in masks.compared().values()]).numpy()
    return np.packbits(flat)
