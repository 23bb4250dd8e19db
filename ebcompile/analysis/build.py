"""``ANALYSE``: the analysis passes of ``prepare``, which change nothing (the model may be on the meta device).

check_options → capture → find_linears → select_linears → find_groups → choose_structure, each a ``Pass`` of
``ebcompile.pipeline`` naming what it requires and ensures; ``build_plan`` runs them, and ``prepare`` runs them
after its guards (``prepare.PREPARE``). The result: the ``Plan`` (linears, groups, and why each left-out linear is left out),
the structure and scope chosen, and the tensors that get masks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..adapters import adapter_tensors, is_adapter_rank, unsupported_adapters
from ..capture.graph import capture
from ..errors import ConfigError, NoPrunableLayerError
from ..names import split_name
from ..pipeline import Pass, Pipeline, State
from ..plan import SCOPES, Plan
from ..search.scorers import KINDS, check_kind
from .groups import find_groups
from .linears import find_linears

__all__ = ["ANALYSE", "Options", "build_plan", "STRUCTURES", "SCOPES", "KV_HEADS"]

STRUCTURES = ("unstructured", "structured")
KV_HEADS = ("prune", "keep")


@dataclass(frozen=True)
class Options:
    """``prepare``'s choices, as given (``check_options`` validates them)."""

    structure: str = "auto"
    scope: str | None = None
    include: Any = None
    exclude: Any = None
    prune_output_layer: bool = False
    capture_method: str = "auto"
    kv_heads: str = "prune"
    importance: str = "auto"


def build_plan(model: nn.Module, example_inputs: Any, structure: str = "auto", scope: str | None = None,
               include: Sequence[str] | None = None, exclude: Sequence[str] | None = None, prune_output_layer: bool = False,
               capture_method: str = "auto", kv_heads: str = "prune", importance: str = "auto",
               ) -> tuple[Plan, str, str, list[str]]:
    """``prepare``'s checks of its arguments and its analysis (the ``ANALYSE`` pipeline), changing nothing (the model
    may be on the meta device): the plan, the structure and scope chosen, and the tensors that would get masks."""
    options = Options(structure, scope, include, exclude, prune_output_layer, capture_method, kv_heads, importance)
    state = ANALYSE.run(model=model, example_inputs=example_inputs, options=options)
    return state.plan, state.structure, state.scope, state.tensors


def _check_options(s: State) -> None:
    o = s.options
    s.include, s.exclude = _patterns("include", o.include), _patterns("exclude", o.exclude)
    if not isinstance(o.prune_output_layer, bool):
        raise ConfigError(f"prune_output_layer={o.prune_output_layer!r} must be True or False. Fix: e.g. prune_output_layer=True.")
    _check_choice("structure", o.structure, STRUCTURES + ("auto",))
    s.scope = _check_choice("scope", o.scope or "global", SCOPES)
    _check_choice("kv_heads", o.kv_heads, KV_HEADS)
    if o.structure != "auto":
        check_kind(o.importance, o.structure)
    elif o.importance not in KINDS:
        check_kind(o.importance, "structured")
    if getattr(s.model, "_ebcompile", None) is not None:
        raise ConfigError("this model is already prepared. Fix: call prepare once, on the plain model.")
    unsupported = unsupported_adapters(s.model)
    if unsupported:
        kinds = ", ".join(f"{k} ({v})" for k, v in unsupported.items())
        raise ConfigError(f"the model has PEFT adapters prepare cannot follow: {kinds}; their update is no product of two "
                          "factors that can be sliced with the base layer's heads and neurons. Fix: use LoRA (use_dora=False) "
                          "or IA3 adapters, or merge these first (model.merge_and_unload()) and prepare the merged model.")


def _capture(s: State) -> None:
    s.captured = capture(s.model, s.example_inputs, s.options.capture_method)


def _find_linears(s: State) -> None:
    s.linears, s.attention = find_linears(s.captured)


def _select_linears(s: State) -> None:
    """The plan's linears: every captured linear but adapters, the output layer, include/exclude, tied and recomputed
    weights (each skip said in ``plan.skipped``); raises when none is left."""
    model, cap, linears = s.model, s.captured, s.linears
    plan = Plan(capture=f"export of pieces: {', '.join(cap.pieces)}" if cap.pieces else cap.method)
    adapters, tied = adapter_tensors(model), _tied_across_modules(model, [op.weight for op in linears])
    for op in linears:
        if op.weight in adapters:
            plan.skipped[op.name] = (f"an adapter of {adapters[op.weight]}: with structured masks its rows / columns follow that "
                                     "layer's heads and neurons; it is never masked on its own")
        elif op.kind == "output" and not s.options.prune_output_layer:
            plan.skipped[op.name] = "feeds the model output (pass prune_output_layer=True to mask it)"
        elif s.include and not _matches(op.name, s.include):
            plan.skipped[op.name] = "not matched by include"
        elif _matches(op.name, s.exclude):
            plan.skipped[op.name] = "matched by exclude"
        elif op.weight in tied:
            plan.skipped[op.name] = (f"its weight is also the weight of {tied[op.weight]} (tied across modules, as Zamba's "
                                     "shared transformer block): cut in one, the tie would break; it is kept whole")
        elif _recomputed(model, op.weight):
            plan.skipped[op.name] = ("its weight is recomputed at every forward (a hook, e.g. nn.utils.weight_norm): a mask "
                                     "on it would be overwritten; remove the hook to prune it")
        else:
            plan.linears.append(op)
    for name, module in model.named_modules():  # linears the graph shows only through their parametrization
        if isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight") and name not in plan.skipped:
            plan.skipped[name] = ("its weight is parametrized (e.g. parametrizations.weight_norm); ebcompile masks stored "
                                  "weights: remove the parametrization to prune it")
    if not plan.linears:
        raise NoPrunableLayerError(
            f"no prunable linear layer in {type(model).__name__} (linear layers found: {_found(linears)}). "
            "Fix: loosen include=/exclude=, or pass prune_output_layer=True if the only linear is the output layer."
        )
    s.plan, s.adapters = plan, adapters


def _find_groups(s: State) -> None:
    """Heads, KV groups, neurons and experts among the plan's linears (adapters' ranks and left-out routers dropped)."""
    plan, adapters = s.plan, s.adapters
    masked_weights = {op.weight for op in plan.linears}
    followers = {w for w, base in adapters.items() if f"{base}.weight" in masked_weights}  # adapters of masked layers
    groups, s.why = find_groups(s.captured, s.attention, masked_weights | followers, s.example_inputs,
                                keep_kv=s.options.kv_heads == "keep")
    plan.groups = [g for g in groups if not is_adapter_rank(g, adapters) and not _router_left_out(g, s.include, s.exclude, plan)]


def _choose_structure(s: State) -> None:
    """Structured where groups were found (or asked for), the reasons linears stay whole, the tensors to mask."""
    plan, why, importance = s.plan, s.why, s.options.importance
    grouped = {m.tensor for g in plan.groups for m in g.members}
    structure = s.options.structure
    if structure == "auto":
        structure = "structured" if plan.groups else "unstructured"
        check_kind(importance, structure)
    for op in plan.linears:  # masked, but in no head or neuron group: say why (structured masks keep it whole)
        if structure == "structured" and op.weight not in grouped and op.name in why:
            plan.skipped.setdefault(op.name, why[op.name])
    for name, reason in why.items():  # routers (masked or not) of experts that are no units: say why
        if reason.startswith(("no whole experts", "no experts")):
            plan.skipped.setdefault(name, reason)
    masked_weights = {op.weight for op in plan.linears}
    if structure == "structured":
        if not plan.groups:
            reasons = "; ".join(f"{n}: {r}" for n, r in list(why.items())[:3])
            raise NoPrunableLayerError(
                f"no attention head or FFN neuron group among the masked linears of {type(s.model).__name__} "
                f"({_found(s.linears)}){f' ({reasons})' if reasons else ''}. Fix: use structure='unstructured', or "
                "include both linears of an FFN block."
            )
        # group slices (biases included) plus every other masked linear, which keeps an all-ones mask
        s.tensors = sorted({m.tensor for g in plan.groups for m in g.members if m.masked} | masked_weights)
    else:
        s.tensors = [op.weight for op in plan.linears]
    s.structure = structure


def _found(linears: list) -> str:
    return ", ".join(op.name for op in linears) or "none"


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}. Fix: pick one of them.")
    return value


def _router_left_out(group: Any, include: Sequence[str] | None, exclude: Sequence[str] | None, plan: Plan) -> bool:
    """An expert group whose router include=/exclude= leave out (a router no captured graph reads is no linear of the
    plan, so the linear rules never saw it); said in ``plan.skipped``."""
    if group.kind != "expert":
        return False
    router = split_name(group.members[0].tensor)[0]
    why = ("not matched by include" if include and not _matches(router, include) else
           "matched by exclude" if _matches(router, exclude) else None)
    if why is not None:
        plan.skipped.setdefault(router, f"{why}: its experts are kept")
    return why is not None


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _patterns(name: str, value: Any) -> list[str] | None:
    """include/exclude: None, one fnmatch pattern, or a list of them."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set)) and all(isinstance(p, str) for p in value):
        return list(value)
    raise ConfigError(f"{name}={value!r} must be a pattern or a list of patterns over linear names. "
                      f'Fix: e.g. {name}=["encoder.*.mlp.*"].')


def _tied_across_modules(model: nn.Module, weights: list[str]) -> dict[str, str]:
    """Each of ``weights`` whose parameter another module also holds (weights tied between two module objects;
    one module reused in several places holds it once) -> that other module's path."""
    holders: dict[int, list[str]] = {}
    for path, module in model.named_modules():
        for value in module._parameters.values():
            if value is not None:
                holders.setdefault(id(value), []).append(path)
    out = {}
    for weight in weights:
        owner, attr = split_name(weight)
        value = model.get_submodule(owner)._parameters.get(attr)
        others = [p for p in holders.get(id(value), []) if p != owner] if value is not None else []
        if others:
            out[weight] = others[0]
    return out


def _recomputed(model: nn.Module, weight: str) -> bool:
    """True when ``weight`` is not a stored parameter but a tensor a hook recomputes (old-style weight_norm)."""
    owner, attr = split_name(weight)
    module = model.get_submodule(owner)
    return attr not in module._parameters and not parametrize.is_parametrized(module, attr)


ANALYSE = Pipeline("analyse", ("model", "example_inputs", "options"), [
    Pass("check_options", _check_options, ("model", "options"), ("include", "exclude", "scope"),
         doc="validate include/exclude, structure, scope, kv_heads, importance; refuse a prepared model"),
    Pass("capture", _capture, ("model", "example_inputs", "options"), ("captured",),
         doc="torch.export (or symbolic_trace, or export by pieces) of the model on the example inputs"),
    Pass("find_linears", _find_linears, ("captured",), ("linears", "attention"),
         doc="every linear op of the graph, its weight layout, and the attention ops"),
    Pass("select_linears", _select_linears, ("model", "linears", "include", "exclude"), ("plan", "adapters"),
         doc="the plan's linears; adapters, the output layer, tied and recomputed weights left out, each with why"),
    Pass("find_groups", _find_groups, ("captured", "attention", "plan", "adapters", "example_inputs"), ("why",),
         doc="the label propagation: heads, KV groups, neurons, experts (plan.groups) and why a linear has none"),
    Pass("choose_structure", _choose_structure, ("plan", "why", "linears"), ("structure", "tensors"),
         doc="structured where groups exist; the tensors that get masks"),
])
