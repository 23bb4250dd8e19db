"""Data-aware scores of mixture-of-experts units for ``importance="activation"``, from forward hooks.

- a whole expert: the router's mean probability for it over every token seen (softmax over all experts of the
  router logits, masked experts at -inf as ``analysis.experts`` routes them): the share of the layer's routing mass it
  carries. Routing, not weight size, is what says an expert is unused.
- a neuron inside an expert: Wanda-structured, as FFN neurons are scored (``scorers.ActivationImportance``): the
  mean |down column| of that expert times the RMS of the neuron's activation over the tokens routed to that expert.
  The activations are recomputed in a forward hook on the experts container from its inputs (hidden states, top-k
  expert ids): while statistics are gathered each forward runs the expert up-projections once more.

Invariants as for every kind (``ebcompile.search.scoring``): hooks only read, stop once a ticket is applied, every score is
>= 0, sums are over everything seen since ``prepare`` and summed over DDP ranks before a draw. A layer whose hooks
saw nothing (or inputs of another form) is scored by magnitude.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.experts import dead_experts, expert_layout
from ..names import split_name
from ..plan import GroupSet, Plan
from .scoring import all_reduce_sum, raw_tensor, unit_slice_scores

__all__ = ["ExpertActivation"]


class _Hook:
    _ebcompile = True  # strip_masks drops tagged hooks

    def __init__(self, fn: Callable[[nn.Module, tuple], None]) -> None:
        self.fn = fn

    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self.fn(module, inputs)


class ExpertActivation:
    """Routing and activation statistics of every experts container of ``plan`` (keys: the container's path)."""

    def __init__(self, model: nn.Module, plan: Plan, stopped: Callable[[], bool]) -> None:
        self._model, self.stopped = weakref.ref(model), stopped
        self.sums: dict[str, torch.Tensor] = {}  # "probs/<path>" [E], "sumsq/<path>" [E, I], "routed/<path>" [E], ...
        self.pending: dict[str, torch.Tensor] = {}
        self.handles = []
        for g in plan.groups:
            if g.kind == "expert":
                router = split_name(g.members[0].tensor)[0]
                self.handles.append(model.get_submodule(router).register_forward_hook(_Hook(self._router(g.name))))
            elif any(m.batched for m in g.members):
                self.handles.append(model.get_submodule(g.name).register_forward_hook(_Hook(self._experts(g.name))))

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = value if key not in self.sums else self.sums[key] + value

    def _router(self, path: str) -> Callable[[nn.Module, tuple], None]:
        def observe(router: nn.Module, inputs: tuple) -> None:
            x = inputs[0] if inputs else None
            w = router.weight
            if self.stopped() or not isinstance(x, torch.Tensor) or x.shape[-1] != w.shape[1]:
                return
            with torch.no_grad():
                logits = F.linear(x.detach().reshape(-1, w.shape[1]), w.detach(), getattr(router, "bias", None))
                dead = dead_experts(router)
                if dead is not None:
                    logits = logits.masked_fill(dead.to(logits.device), float("-inf"))
                probs = logits.float().softmax(-1)
            self._add(f"probs/{path}", probs.sum(0))
            self._add(f"tokens/{path}", torch.tensor(float(probs.shape[0])))

        return observe

    def _experts(self, path: str) -> Callable[[nn.Module, tuple], None]:
        def observe(module: nn.Module, inputs: tuple) -> None:
            if self.stopped() or len(inputs) < 2:
                return
            x, index = inputs[0], inputs[1]
            lay = expert_layout(module, x.shape[-1]) if isinstance(x, torch.Tensor) else None
            if lay is None or not isinstance(index, torch.Tensor) or index.dim() != 2 or index.shape[0] != x.shape[0]:
                return
            up, bias = getattr(module, lay.up), getattr(module, lay.up_bias) if lay.up_bias else None
            gate = getattr(module, lay.gate) if lay.gate else None
            act = getattr(module, "act_fn", F.silu)
            sumsq = torch.zeros(lay.experts, lay.width)
            routed = torch.zeros(lay.experts)
            with torch.no_grad():
                for e in range(lay.experts):
                    rows = (index == e).any(-1)
                    if not bool(rows.any()):
                        continue
                    w = up[e].detach()
                    h = x.detach()[rows] @ (w if lay.transposed else w.T)
                    if bias is not None:
                        h = h + bias[e].detach()
                    if gate is not None:  # a gate tensor of its own
                        g = x.detach()[rows] @ (gate[e].detach() if lay.transposed else gate[e].detach().T)
                        h = act(g + getattr(module, lay.gate_bias)[e].detach() if lay.gate_bias else g) * h
                    elif lay.gated and hasattr(module, "_apply_gate"):
                        h = module._apply_gate(h)
                    else:
                        h = act(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1] if lay.gated else act(h)
                    sumsq[e] = h.float().pow(2).sum(0).cpu()
                    routed[e] = float(h.shape[0])
            self._add(f"sumsq/{path}", sumsq)
            self._add(f"routed/{path}", routed)

        return observe

    def begin_draw(self, sync: bool) -> None:
        keys = sorted(self.sums)
        self.pending = dict(zip(keys, all_reduce_sum([self.sums[k] for k in keys], sync)))

    def unit_scores(self, group: GroupSet) -> torch.Tensor:
        model = self._model()
        if group.kind == "expert" and f"probs/{group.name}" in self.pending:
            return self.pending[f"probs/{group.name}"] / self.pending[f"tokens/{group.name}"].clamp(min=1.0)
        if group.kind != "expert" and f"sumsq/{group.name}" in self.pending:
            routed = self.pending[f"routed/{group.name}"].clamp(min=1.0)
            rms = (self.pending[f"sumsq/{group.name}"] / routed[:, None]).sqrt()  # [E, I]
            down = group.members[-1]  # the tensor reading the neurons (analysis.experts lists it last)
            w = raw_tensor(model, down.tensor).detach().abs().float()
            per_neuron = w.mean(3 - down.dim)  # [E, I]: the mean |weight| reading each neuron
            return (per_neuron.cpu() * rms).flatten()
        return unit_slice_scores(model, group, lambda _, t: t.float().pow(2), "rms")  # never seen: magnitude

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"experts/{k}": v.detach().cpu() for k, v in self.sums.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sums = {k[len("experts/"):]: v.clone() for k, v in state.items()}

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

