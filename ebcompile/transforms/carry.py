"""What ``compact`` carries over from the masked model, and what it checks on it first.

``flags_of``/``carry_flags``: each module's train/eval mode and each parameter's ``requires_grad`` come back as
they were (a PEFT model's frozen base stays frozen, a model in train mode stays in train mode). A module that
``compact`` replaced (``CompactMultiheadAttention``, ``SparseLinear``, a family rewrite) takes its mode from its
parent and its parameters' flags from the parameters they replace (``in_proj.bias`` <- ``in_proj_bias``), or
from the replaced module's parameters where those all agree.

``check_ticket_state``: the masks on the model are still the applied ticket's; a ``state_dict`` saved before
``apply_ticket`` and loaded after it puts all-ones masks (and unpruned weights) back, which would compact into a
model that is neither the ticket nor the masked one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TicketStateError
from .masks import iter_masks

__all__ = ["flags_of", "carry_flags", "check_ticket_state"]

Flags = tuple[dict[str, bool], dict[str, bool]]


def _plain(name: str) -> str | None:
    """The name a parameter has once masks are stripped (``a.parametrizations.weight.original`` -> ``a.weight``);
    None for a mask's own parameters (unit gates), which compact folds away."""
    if ".parametrizations." not in f".{name}":
        return name
    head, _, rest = f".{name}".partition(".parametrizations.")
    attr, _, tail = rest.partition(".")
    return f"{head}.{attr}"[1:] if tail == "original" else None


def flags_of(model: nn.Module) -> Flags:
    """({module path: training}, {parameter name without masks: requires_grad}) of ``model``."""
    modes = {path: m.training for path, m in model.named_modules()}
    grads = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        plain = _plain(name)
        if plain is not None:
            grads[plain] = p.requires_grad
    return modes, grads


def _inherited(name: str, grads: dict[str, bool], modes: dict[str, bool]) -> bool | None:
    """``requires_grad`` for a parameter of a replaced module: its old name's (``a.b`` as ``a_b``), else the
    one value all parameters of the deepest original module above it share."""
    owner, _, attr = name.rpartition(".")
    if owner and f"{owner}_{attr}" in grads:
        return grads[f"{owner}_{attr}"]
    while owner and owner not in modes:
        owner = owner.rpartition(".")[0]
    prefix = f"{owner}." if owner else ""
    values = {g for n, g in grads.items() if n.startswith(prefix)}
    return values.pop() if len(values) == 1 else None


def carry_flags(new: nn.Module, flags: Flags) -> None:
    """Give ``new``'s modules and parameters the modes and ``requires_grad`` recorded by ``flags_of``."""
    modes, grads = flags
    parents: dict[str, bool] = {}
    for path, module in new.named_modules():
        mode = modes.get(path, parents.get(path.rpartition(".")[0], modes.get("", True)))
        module.training = mode
        parents[path] = mode
    for name, p in new.named_parameters(remove_duplicate=False):
        want = grads[name] if name in grads else _inherited(name, grads, modes)
        if want is not None and p.requires_grad != want:
            p.requires_grad_(want)


def check_ticket_state(model: nn.Module, ticket) -> None:
    """``TicketStateError`` unless every mask on ``model`` is the one ``ticket`` holds for its tensor."""
    stale = [name for name, _, _, m in iter_masks(model) if name in ticket.masks.tensors
             and not torch.equal(m.mask.cpu(), ticket.masks.tensors[name].cpu().bool())]
    if stale:
        raise TicketStateError(
            f"the masks of {len(stale)} tensor(s) ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}) no "
            "longer match the applied ticket: a state_dict saved before apply_ticket was loaded after it (its "
            "all-ones masks and unpruned weights replaced the ticket's). Fix: call ebcompile.apply_ticket(model, "
            "ticket) again after loading (or load the state_dict before apply_ticket), then compact(model)."
        )
