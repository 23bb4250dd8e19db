"""The data-aware importance kinds ``taylor`` and ``activation`` (``gate`` is in ``ebcompile.search.gates``).

The base kind and the shared reductions are in ``ebcompile.search.scoring``; its docstring says what each kind scores.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_tensors
from ..analysis.experts import is_expert_group
from ..errors import ConfigError, ImportanceDataError
from ..names import split_name
from ..plan import GroupSet, Member, Plan
from .distributed import full_vector, is_sharded
from .expert_scores import ExpertActivation
from .scoring import (
    Importance,
    all_reduce_sum,
    check_window,
    in_dims,
    member_key,
    raw_tensor,
    register_taylor,
    sharded_product,
    unit_slice_scores,
    unregister_taylor,
)

__all__ = ["KINDS", "TaylorImportance", "ActivationImportance"]

KINDS = ("auto", "magnitude", "taylor", "activation", "gate")


class _Cumulative(Importance):
    """Statistics summed over everything seen since ``prepare``; ``window`` counts what came since the last check,
    which a check needs to be more than nothing."""

    window = 0

    def end_draw(self, fresh: bool) -> None:
        self.current = self._pending
        if fresh:
            self.window = 0


class TaylorImportance(_Cumulative):
    """``|w * g|`` per weight, summed per unit (structured: only per-index sums along each member's unit dim are kept,
    a few small vectors per tensor; unstructured: one float per weight), averaged over the steps of a window."""

    kind = "taylor"

    def __init__(self, model: nn.Module, plan: Plan, structure: str) -> None:
        super().__init__(model, plan, structure)
        # a fused 3-D expert tensor's neurons (``analysis.experts``): the sums keep the expert dim too, [E, width]
        self.per_expert = {member_key(m) for g in plan.groups for m in g.members if m.masked and m.batched}
        if structure == "structured":
            self.keys = sorted({member_key(m) for g in plan.groups for m in g.members if m.masked})
        else:
            self.keys = [(op.weight, -1) for op in plan.linears]  # -1: element-wise
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.steps = 0  # optimizer steps in the sums (all since prepare)
        self.window = 0  # ... of which since the last check
        self.current: dict[tuple[str, int], torch.Tensor] | None = None
        self._warned: set[str] = set()
        self.weights = {op.weight for op in plan.linears}
        self.adapters = set(adapter_tensors(model))  # LoRA's factors: they train, but say nothing of a base unit
        self.fallback: set[str] = set()  # groups of the current draw scored by magnitude (``layer_ranked``)
        register_taylor(self)

    def observe(self, stepped: set[int]) -> None:
        """Add this optimizer step's ``|w * g|`` (called by the optimizer pre-step hook)."""
        if self._stopped():
            return
        model, seen = self._model(), False
        with torch.no_grad():
            for key in self.keys:
                p = _stored(model, key[0])
                if id(p) not in stepped or p.grad is None:
                    continue
                prod = (p.detach() * p.grad).abs_().float()  # the product is a fresh tensor: abs in place
                if key[1] >= 0:
                    dim = key[1] % prod.dim()
                    kept = (0, dim) if key in self.per_expert else (dim,)
                    other = [d for d in range(prod.dim()) if d not in kept]
                    prod = prod.sum(other) if other else prod
                old = self.sums.get(key)
                if old is not None and not is_sharded(prod):  # resumed sums come back on the CPU
                    old = old.to(prod.device)
                self.sums[key] = prod if old is None else old + prod
                seen = True
        self.steps += int(seen)
        self.window += int(seen)

    def begin_draw(self, fresh: bool, sync: bool = True) -> None:
        if (fresh and self.window == 0) or (self.steps == 0 and self.current is None):
            check_window("taylor", 0, "take optimizer steps between checks (the gradients are read when optimizer.step() "
                         "runs); with frozen weights (LoRA) use importance='activation' or 'gate'.")
        if self.steps:
            got = {k[0] for k in self.sums}
            if not self.weights & got:  # the adapters train, the base does not (LoRA): no ranking to read
                raise ImportanceDataError("importance='taylor' got no gradient for any masked linear weight: the base "
                                          "weights are frozen (LoRA?). Fix: use importance='activation' or 'gate'.")
            missing = sorted({k[0] for k in self.keys} - got - self._warned)
            if missing:  # said once: a silent fallback would look like data-aware scores
                self._warned.update(missing)
                warnings.warn(f"importance='taylor' got no gradient for {len(missing)} masked tensors (e.g. {missing[0]}: "
                              "frozen, or read only through a choice such as a top-k index); units with no gradient at "
                              "all are ranked by magnitude within their layer. Fix: importance='activation', or exclude= "
                              "those layers",
                              stacklevel=3)
            self._pending = {k: v / self.steps for k, v in self.sums.items()}
        else:
            self._pending = self.current

    def element_scores(self, name: str) -> torch.Tensor:
        return self._pending[(name, -1)]

    def unit_scores(self, group: GroupSet) -> torch.Tensor:
        total = None
        base = [m for m in group.members if m.masked and m.tensor not in self.adapters]
        seen = any(member_key(m) in self._pending for m in base)  # adapters' gradients alone say nothing of a unit
        for m in group.members if seen else ():
            vec = self._pending.get(member_key(m)) if m.masked else None
            if vec is None:
                continue
            vec = full_vector(vec)
            if m.batched:  # [E, width]: each expert's run of ``per_group`` units, expert after expert
                units = vec.narrow(1, m.offset, group.per_group * m.unit_size).reshape(-1, m.unit_size).sum(1)
            else:
                units = vec.narrow(0, m.offset, group.units * m.unit_size).reshape(group.units, m.unit_size).sum(1)
            total = units if total is None else total + units.to(total.device)
        if total is None:  # no base tensor got a gradient (begin_draw warned): magnitude, ranked within the layer
            self.fallback.add(f"{group.kind}:{group.name}")
            return unit_slice_scores(self._model(), group, lambda _, t: t.float().pow(2), "rms")
        self.fallback.discard(f"{group.kind}:{group.name}")
        return total

    def layer_ranked(self, group: GroupSet) -> bool:
        return f"{group.kind}:{group.name}" in self.fallback

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"sum/{k[1]}/{k[0]}": full_vector(v).detach().cpu() for k, v in self.sums.items()}
        out.update({f"current/{k[1]}/{k[0]}": full_vector(v).detach().cpu() for k, v in (self.current or {}).items()})
        out["steps"], out["window"] = torch.tensor(self.steps), torch.tensor(self.window)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        sums, current = _split_keys(state, "sum/"), _split_keys(state, "current/")
        known = set(self.keys)
        if not set(sums) <= known or not set(current) <= known:
            raise ValueError("taylor statistics of tensors this model does not mask")
        self.sums, self.current, self.steps = sums, current or None, int(state.get("steps", torch.tensor(0)))
        self.window = int(state.get("window", torch.tensor(0)))

    def close(self) -> None:
        unregister_taylor(self)


def _stored(model: nn.Module, name: str) -> torch.Tensor:
    """``raw_tensor(model, name)`` by a walk of the registered submodules: ``get_submodule``'s checks cost about
    20 µs a name, paid for every masked tensor at every optimizer step. Anything else goes the general way."""
    owner, attr = split_name(name)
    module = model
    try:
        for part in owner.split(".") if owner else ():
            module = module._modules[part]
        return module._modules["parametrizations"]._modules[attr]._parameters["original"]
    except (KeyError, AttributeError):
        return raw_tensor(model, name)


def _split_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[tuple[str, int], torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            dim, name = k[len(prefix):].split("/", 1)
            out[(name, int(dim))] = v.clone()
    return out


class _ActivationHook:
    """Forward hook of one masked linear's module: sums of squares of its input features (tagged for strip_masks)."""

    _ebcompile = True

    def __init__(self, tracker: ActivationImportance, name: str) -> None:
        self.tracker, self.name = tracker, name

    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self.tracker.observe(self.name, inputs[0] if inputs else None)


class ActivationImportance(_Cumulative):
    """``|w_ij| * rms(x_j)`` from forward hooks on the masked linears' modules: a module whose first input does not
    have the weight's input width (a parameter used inside a larger module) is scored by magnitude (``fallback``)."""

    kind = "activation"

    def __init__(self, model: nn.Module, plan: Plan, structure: str) -> None:
        super().__init__(model, plan, structure)
        dims = in_dims(plan)
        self.dims = {n: (d, raw_tensor(model, n).shape[d]) for n, d in dims.items() if raw_tensor(model, n).dim() == 2}
        self.sumsq: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}  # rows of input seen per tensor (all since prepare)
        self.window = 0  # rows seen since the last check
        self.fallback: set[str] = set()
        self._warned: set[str] = set()
        self.current: dict[str, torch.Tensor] | None = None
        self._last: tuple[weakref.ref, tuple[int, int], torch.Tensor] | None = None  # the last input seen, its sums
        self.handles = []
        for name in self.dims:
            owner, _ = split_name(name)
            self.handles.append(model.get_submodule(owner).register_forward_hook(_ActivationHook(self, name)))
        moe = structure == "structured" and any(is_expert_group(g) for g in plan.groups)
        self.experts = ExpertActivation(model, plan, self._stopped) if moe else None  # router-weighted (expert_scores)

    def observe(self, name: str, x: Any) -> None:
        if self._stopped():
            return
        dim, width = self.dims[name]
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != width or not x.is_floating_point():
            self.fallback.add(name)
            return
        last = self._last
        if last is not None and last[0]() is x and last[1] == (x._version, width):
            sq = last[2].clone()  # the same input as the module before (q, k and v read one tensor): same sums
        else:
            with torch.no_grad():
                flat = x.detach().float().reshape(-1, width)
                sq = (flat * flat).sum(0)
            self._last = (weakref.ref(x), (x._version, width), sq)
        self.sumsq[name] = sq if name not in self.sumsq else self.sumsq[name] + sq  # never in place (sq is kept above)
        self.tokens[name] = self.tokens.get(name, 0) + x.numel() // width
        self.window += x.numel() // width

    def begin_draw(self, fresh: bool, sync: bool = True) -> None:
        names = sorted(self.sumsq)
        seen = sum(self.tokens.values())
        if (fresh and self.window == 0) or (not seen and self.current is None):
            check_window("activation", 0, "run forward passes on training (or calibration) data between checks; "
                         "a check must follow at least one batch.")
        if self.experts is not None:
            self.experts.begin_draw(sync)
        if seen:
            counts = torch.tensor([float(self.tokens[n]) for n in names])
            reduced = all_reduce_sum([self.sumsq[n] for n in names] + [counts], sync)
            counts = reduced.pop()
            self._pending = {n: (s / max(float(c), 1.0)).sqrt() for n, s, c in zip(names, reduced, counts.tolist())}
            unseen = sorted(set(self.dims) - set(self.sumsq) - self._warned)
            if unseen:  # said once: a silent fallback would look like data-aware scores
                self._warned.update(unseen)
                warnings.warn(f"importance='activation': {len(unseen)} masked tensors were never seen as their module's "
                              f"input (e.g. {unseen[0]}: a weight its module reads without calling it, as "
                              "nn.MultiheadAttention does with out_proj); they are ranked by magnitude", stacklevel=3)
        else:
            self._pending = self.current

    def _scored(self, name: str, raw: torch.Tensor) -> torch.Tensor | None:
        rms = self._pending.get(name) if self._pending else None
        if rms is None:  # never seen through its module's input: magnitude
            return raw.abs().float()
        dim, width = self.dims[name]
        shape = [1, 1]
        shape[dim] = width
        return sharded_product(raw.abs().float(), rms.to(raw.device).reshape(shape))

    def element_scores(self, name: str) -> torch.Tensor:
        return self._scored(name, raw_tensor(self.model, name).detach())

    def unit_scores(self, group: GroupSet) -> torch.Tensor:
        """FLAP / Wanda-structured: a unit's activation times the weights that read it (the input columns of the
        linear after it: an attention output projection, an FFN's down projection); a group with no such member
        (e.g. heads whose output projection is not masked) falls back to every masked weight of the unit. Experts and
        their neurons: router-weighted (``expert_scores``)."""
        if self.experts is not None and is_expert_group(group):
            return self.experts.unit_scores(group)
        reading = [m for m in group.members if m.masked and m.tensor in self.dims and m.dim % 2 == self.dims[m.tensor][0]]

        def element(m: Member, raw: torch.Tensor) -> torch.Tensor | None:
            if m.tensor not in self.dims or (reading and m not in reading):
                return None
            return self._scored(m.tensor, raw)

        return unit_slice_scores(self.model, group, element, "mean")

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"sumsq/{n}": v.detach().cpu() for n, v in self.sumsq.items()}
        out.update({f"tokens/{n}": torch.tensor(t) for n, t in self.tokens.items()})
        out.update({f"current/{n}": v.detach().cpu() for n, v in (self.current or {}).items()})
        out["window"] = torch.tensor(self.window)
        if self.experts is not None:
            out.update(self.experts.state_dict())
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        parts: dict[str, dict[str, torch.Tensor]] = {"sumsq": {}, "tokens": {}, "current": {}}
        state = dict(state)
        moe = {k: state.pop(k) for k in [k for k in state if k.startswith("experts/")]}
        if moe and self.experts is None:
            raise ValueError("activation statistics of experts this model does not have")
        if self.experts is not None:
            self.experts.load_state_dict(moe)
        self.window = int(state.pop("window", torch.tensor(0)))
        for k, v in state.items():
            kind, name = k.split("/", 1)
            if kind not in parts or name not in self.dims:
                raise ValueError(f"activation statistic {k!r} does not fit this model")
            parts[kind][name] = v
        self.sumsq = {n: v.clone() for n, v in parts["sumsq"].items()}
        self.tokens = {n: int(v) for n, v in parts["tokens"].items()}
        self.current = {n: v.clone() for n, v in parts["current"].items()} or None

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.experts is not None:
            self.experts.close()


def check_kind(kind: Any, structure: str) -> str:
    """``kind`` checked against ``structure`` (raises ConfigError before anything changes)."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ConfigError(f"importance={kind!r} is not one of {', '.join(map(repr, KINDS))}. Fix: pick one of them "
                          "(importance='auto', the default, picks taylor or activation from what training feeds it).")
    if kind == "gate" and structure != "structured":
        raise ConfigError("importance='gate' learns one coefficient per head, KV group and neuron, so it needs structured "
                          "masks. Fix: pass structure='structured', or use importance='taylor' or 'activation'.")
    return kind
