"""Tickets: the masks the controller settled on, how they are saved, and how they are applied."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import CheckpointError, ConfigError, TicketMismatchError
from ..persist.io import load_tensors, save_tensors
from ..persist.masks_io import masks_from_tensors, masks_to_tensors
from ..persist.materialized import require_materialized
from ..plan import SCOPES
from ..prepare import config_of
from ..transforms.masks import iter_masks
from .distributed import full_state_dict, is_main, load_full_state_dict, mask_, unwrap
from .importance import Masks, raw_tensor

__all__ = ["Ticket", "apply_ticket", "snapshot", "MODES"]

MODES = ("continue", "rewind", "reinit")


@dataclass
class Ticket:
    """Frozen-to-be masks plus what they were drawn from (to refuse them on another model)."""

    masks: Masks
    ratio: float
    scope: str
    signature: dict[str, list[int]]  # masked tensor name -> shape
    found_at: dict[str, int] = field(default_factory=dict)  # {"check": k, "tick": t}

    @property
    def structure(self) -> str:
        return self.masks.structure

    def sparsity(self) -> float:
        """Fraction of the masked units (weights, or heads+neurons) that the ticket prunes."""
        return self.masks.pruned_fraction()

    def save(self, path: str | os.PathLike) -> None:
        """Write the ticket (safetensors + JSON, atomic). Across processes only global rank 0 writes."""
        if not is_main():
            return
        tensors, mask_header = masks_to_tensors(self.masks)  # key order kept as before: same bytes on disk
        header = {"structure": mask_header["structure"], "ratio": self.ratio, "scope": self.scope,
                  "signature": self.signature, "found_at": self.found_at, "kinds": mask_header["kinds"]}
        save_tensors(path, tensors, header, "ticket")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Ticket:
        tensors, h = load_tensors(path, "ticket")
        try:
            return ticket_from(masks_from_tensors(tensors, h), h)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path} is a broken ticket ({type(exc).__name__}: {str(exc)[:120]}). Fix: save the "
                                  "ticket again.") from exc


def ticket_from(masks: Masks, h: dict[str, Any]) -> Ticket:
    """A ``Ticket`` from its header fields, checked (raises KeyError/TypeError/ValueError when malformed)."""
    ratio, scope, found_at = h["ratio"], h["scope"], dict(h["found_at"])
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"ratio {ratio!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}")
    signature = {str(k): [int(x) for x in v] for k, v in dict(h["signature"]).items()}
    if any(x < 0 for v in signature.values() for x in v):
        raise ValueError("negative size in the signature")
    return Ticket(masks, float(ratio), scope, signature, found_at)


def signature_of(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(m.mask.shape) for name, _, _, m in iter_masks(model)}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's weights (no masks), for ``apply_ticket(..., mode="rewind")``. Sharded (FSDP2)
    tensors are gathered whole: call it on every rank."""
    from ..persist.materialized import require_module

    require_module(model, "snapshot")
    state = full_state_dict(unwrap(model))
    return {k: v for k, v in state.items() if not k.endswith("_mask")}


def _check_signature(model: nn.Module, ticket: Ticket) -> None:
    mine = signature_of(model)
    if mine == ticket.signature:
        return
    missing = sorted(set(ticket.signature) - set(mine))[:3]
    extra = sorted(set(mine) - set(ticket.signature))[:3]
    shape = [k for k in set(mine) & set(ticket.signature) if mine[k] != ticket.signature[k]][:3]
    raise TicketMismatchError(
        "the ticket was drawn from another model or configuration "
        f"(tensors only in the ticket: {missing or 'none'}; only in the model: {extra or 'none'}; "
        f"different shapes: {shape or 'none'}). Fix: apply a ticket to the prepared model it came from, "
        "prepared with the same structure and include/exclude patterns."
    )


_FROZEN_MODELS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_HOOK: Any = None


def _rezero_after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Optimizer post-step hook: pruned stored weights stay exactly zero whatever the optimizer does.

    Only the tensors this optimizer updates are touched: a masked model whose optimizer moved to its compacted
    copy (``compact(model, optimizer=opt)``) costs nothing per step, even before it is garbage-collected."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for model in list(_FROZEN_MODELS):
            for name, _, _, m in iter_masks(model):
                if m.frozen and m.active:
                    weight = raw_tensor(model, name)
                    if id(weight) in stepped:
                        mask_(weight, m.mask)


def _reset_all(model: nn.Module) -> None:
    for module in model.modules():
        for fn in ("reset_parameters", "_reset_parameters"):
            if callable(getattr(module, fn, None)):
                getattr(module, fn)()
                break


def _check_complete(model: nn.Module, ticket: Ticket, masks: list, mode: str, weights: Any) -> None:
    """Every mask the model holds is in the ticket with its shape; rewind weights fit the model."""
    for name, _, _, m in masks:
        t = ticket.masks.tensors.get(name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(m.mask.shape):
            got = "no mask" if not isinstance(t, torch.Tensor) else f"a mask of shape {list(t.shape)}"
            raise TicketMismatchError(f"the ticket has {got} for {name} (the model's is {list(m.mask.shape)}). Fix: apply "
                                      "a complete ticket drawn from this prepared model (EarlyBird.ticket or Ticket.load).")
    if mode != "rewind":
        return
    if not isinstance(weights, dict) or not weights:
        raise ConfigError("mode='rewind' needs weights=. Fix: pass EarlyBird(..., rewind_at=0).rewind_weights "
                          "or a snapshot(model) taken at the point to rewind to.")
    state = model.state_dict()
    missing = [k for k in weights if k not in state]
    if missing:
        raise TicketMismatchError(f"rewind weights name tensors the model lacks ({missing[:3]}). Fix: snapshot this model.")
    for k, v in weights.items():
        if not isinstance(v, torch.Tensor) or v.shape != state[k].shape:
            got = type(v).__name__ if not isinstance(v, torch.Tensor) else f"shape {list(v.shape)}"
            raise TicketMismatchError(f"rewind weight {k} has {got}, the model's has shape {list(state[k].shape)}. "
                                      "Fix: snapshot this model (ebcompile.snapshot) at the point to rewind to.")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise TicketMismatchError(f"rewind weight {k} holds NaN or inf. Fix: snapshot the model before training diverged.")


def apply_ticket(
    model: nn.Module,
    ticket: Ticket,
    mode: str = "continue",
    weights: dict[str, torch.Tensor] | None = None,
    init: Callable[[nn.Module], None] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Freeze ``ticket``'s masks into the prepared ``model`` and choose the weights to retrain from.

    mode:
        ``"continue"``: keep the current weights (the early-bird weights).
        ``"rewind"``: load ``weights`` (e.g. ``EarlyBird(rewind_at=0).rewind_weights`` or ``snapshot(model)``).
        ``"reinit"``: re-initialise every module with ``reset_parameters`` (or call ``init(model)``), seeded.
    Pruned weights are then exactly zero in the forward, in ``state_dict`` and in the stored parameters,
    and stay zero through any optimizer step (momentum and weight decay included).
    """
    model = unwrap(model)
    config_of(model)
    require_materialized(model, "apply_ticket")
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not one of {', '.join(map(repr, MODES))}. Fix: pick one of them.")
    if not isinstance(ticket, Ticket):
        raise TicketMismatchError(f"expected an ebcompile Ticket, got {type(ticket).__name__}. "
                                  "Fix: pass EarlyBird.ticket or Ticket.load(path).")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed={seed!r} is not an integer. Fix: pass an int, e.g. seed=0, or leave it None.")
    if init is not None and not callable(init):
        raise ConfigError(f"init={init!r} is not callable. Fix: pass a function that takes the model, or leave it None.")
    _check_signature(model, ticket)
    masks = list(iter_masks(model))
    _check_complete(model, ticket, masks, mode, weights)  # everything validated before anything changes
    active = [m.active for _, _, _, m in masks]
    for _, _, _, m in masks:  # identity parametrizations: weights read/written in place below
        m.active = False
    try:
        if mode == "rewind":
            load_full_state_dict(model, weights)
        elif mode == "reinit":
            if seed is not None:
                torch.manual_seed(seed)
            (init or _reset_all)(model)
    except BaseException:  # the user's init failed: the masks as they were
        for (_, _, _, m), was in zip(masks, active):
            m.active = was
        raise
    with torch.no_grad():
        for name, _, _, m in masks:
            m.set(ticket.masks.tensors[name])
            m.frozen = True
            mask_(raw_tensor(model, name), m.mask)
    global _HOOK
    if _HOOK is None:
        _HOOK = register_optimizer_step_post_hook(_rezero_after_step)
    _FROZEN_MODELS.add(model)
    model._ebcompile.ticket = ticket
    return model


def draw_ticket(model: nn.Module, ratio: float | None = None) -> Ticket:
    """The ticket magnitude pruning at ``ratio`` gives right now, without a search (one-shot pruning)."""
    from ..prepare import current_masks

    model = unwrap(model)
    cfg = config_of(model)
    require_materialized(model, "draw_ticket")
    masks = current_masks(model, ratio)
    return Ticket(masks, cfg.ratio if ratio is None else float(ratio), cfg.scope, signature_of(model), {})
