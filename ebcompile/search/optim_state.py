"""Move an optimizer from a masked model onto its compacted copy, per-parameter state sliced to what was kept.

Invariant: for element-wise optimizers (SGD, Adam, AdamW, RMSprop, ...), training the compacted model with
the retargeted optimizer takes the same steps on every kept weight as training the masked model with the
original optimizer would (their gradients agree because compact ≡ masked, and each state entry follows its
weight).

How: compaction is a structural transform (which units go depends on the ticket, never on weight values),
so running it on a shadow copy whose parameters hold a state tensor (``exp_avg``, ``momentum_buffer``, ...)
gives that state sliced exactly like the weights. A first shadow pass with a distinct constant per parameter
tells which new parameter came from which old one, whatever compaction renamed or rebuilt.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..transforms.masks import is_gate

Transform = Callable[[nn.Module], nn.Module]


def _shadow_pass(shadow: nn.Module, old_names: list[str], values: dict[str, torch.Tensor], transform: Transform
                 ) -> dict[str, torch.Tensor]:
    """``transform`` applied to ``shadow`` with each parameter's data replaced by ``values[name]`` (zeros if absent)."""
    params = dict(shadow.named_parameters())
    with torch.no_grad():
        for name in old_names:
            p = params[name]
            v = values.get(name)
            p.data = torch.zeros_like(p.data, dtype=torch.float32) if v is None else v.detach().to(torch.float32).clone()
    return {n: p.detach() for n, p in transform(shadow).named_parameters()}


def _origins(shadow: nn.Module, old_names: list[str], transform: Transform) -> dict[str, str]:
    """new parameter name → the old parameter it was cut from."""
    marks = {name: torch.full_like(p, i + 1, dtype=torch.float32) for i, (name, p) in
             enumerate((n, dict(shadow.named_parameters())[n]) for n in old_names)}
    origin: dict[str, str] = {}
    for new_name, t in _shadow_pass(shadow, old_names, marks, transform).items():
        nz = t[t != 0]  # its smallest and largest marks: one origin when they agree (a sort-based unique cost ~3x more)
        found = {int(v) for v in torch.aminmax(nz)} if nz.numel() else set()
        if len(found) > 1:
            raise ConfigError(f"compaction merged several parameters into {new_name}; their optimizer state cannot be carried. "
                              "Fix: build a fresh optimizer for the compacted model.")
        if found:
            origin[new_name] = old_names[found.pop() - 1]
    return origin


def _cpu_shadow(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the CPU (float32 parameters, no grads):
    the shadow passes cost host memory, not accelerator memory."""
    memo: dict[int, object] = {}
    for name, p in model.named_parameters():  # unit gates are ones: compaction folds them into the weights
        fill = torch.ones if is_gate(name) else torch.zeros
        memo[id(p)] = nn.Parameter(fill(p.shape, dtype=torch.float32), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(model, memo)


def retarget_optimizer(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module, transform: Transform) -> None:
    """Point ``optimizer`` (in place) at ``new = transform(old)``'s parameters, its state sliced alike.

    Parameter groups keep their hyperparameters (a learning-rate scheduler attached to ``optimizer`` keeps
    working); parameters the optimizer did not hold stay out of it; parameters of other modules it holds stay.
    Scalar state (``step``) is copied; a state tensor shaped unlike its parameter (factored optimizers such
    as Adafactor) raises ``ConfigError``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer= must be a torch.optim.Optimizer, got {type(optimizer).__name__}. "
                          "Fix: pass the optimizer object that trains this model.")
    old_params = dict(old.named_parameters())
    name_of = {id(p): n for n, p in old_params.items()}
    held = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"] if id(p) in name_of]
    if not held:
        raise ConfigError("the optimizer holds none of the model's parameters. Fix: pass the optimizer that trains this model.")
    state_keys: set[str] = set()
    for name in held:
        p = old_params[name]
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if v.shape != p.shape:
                    raise ConfigError(f"optimizer state {k!r} of {name} has shape {tuple(v.shape)}, not the parameter's "
                                      f"{tuple(p.shape)}, so it cannot be sliced ({type(optimizer).__name__}). "
                                      "Fix: build a fresh optimizer for the compacted model.")
                state_keys.add(k)
    shadow = _cpu_shadow(old)
    names = [n for n in old_params if not is_gate(n)]  # folded into weights: no successor, state dropped
    origin = _origins(shadow, names, transform)

    def held_values(k: str) -> dict[str, torch.Tensor]:
        return {n: optimizer.state[old_params[n]][k] for n in held
                if isinstance(optimizer.state.get(old_params[n], {}).get(k), torch.Tensor)}

    sliced = {k: _shadow_pass(shadow, names, held_values(k), transform) for k in sorted(state_keys)}
    new_params = dict(new.named_parameters())
    successors: dict[str, list[str]] = defaultdict(list)
    for new_name, old_name in origin.items():
        if new_name in new_params:
            successors[old_name].append(new_name)
    state = defaultdict(dict)
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            old_name = name_of.get(id(p))
            if old_name is None:  # not part of the model: left as it is
                params.append(p)
                if p in optimizer.state:
                    state[p] = optimizer.state[p]
                continue
            for new_name in successors.get(old_name, []):
                q = new_params[new_name]
                params.append(q)
                if p not in optimizer.state:
                    continue
                entry = {}
                for k, v in optimizer.state[p].items():
                    if k in sliced and isinstance(v, torch.Tensor):
                        entry[k] = sliced[k][new_name].to(dtype=v.dtype, device=v.device).clone()
                    else:
                        entry[k] = v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                state[q] = entry
        group["params"] = params
    optimizer.state = state
