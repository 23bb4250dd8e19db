"""``prepare``: capture, analyse, insert masks. The user's module is returned, masked in place."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .adapters import adapter_tensors, is_adapter_rank
from .analysis.groups import find_groups
from .analysis.linears import find_linears
from .capture.graph import capture, graph_kwargs, normalize_inputs
from .errors import ConfigError, InvalidRatioError, NoPrunableLayerError, NotPreparedError
from .names import split_name
from .persist.materialized import require_materialized, require_module
from .plan import Plan
from .search.auto_importance import make_importance
from .search.distributed import is_sharded, unwrap
from .search.importance import Masks, compute_masks
from .search.scorers import KINDS, check_kind, check_plan_kind
from .search.scoring import Importance, raw_tensor
from .transforms.masks import insert_masks, iter_masks

__all__ = ["prepare", "PrepareConfig", "config_of", "mask_nodes", "MaskNode", "current_masks", "check_ratio", "tracker_of",
           "mask_shapes", "build_plan"]

STRUCTURES = ("unstructured", "structured")
SCOPES = ("global", "layer")
KV_HEADS = ("prune", "keep")


@dataclass
class PrepareConfig:
    """What ``prepare`` was asked for, kept on the model as ``model._ebcompile``."""

    plan: Plan
    ratio: float
    structure: str
    scope: str
    kv_heads: str = "prune"
    example: Any = None  # (args, kwargs) of the example inputs: compact checks its result on them
    ticket: Any = None  # the applied Ticket (set by apply_ticket)
    importance: str = "auto"
    tracker: Any = None  # the importance kind's scorer (ebcompile.search.scoring.Importance), with its hooks and statistics


@dataclass(frozen=True)
class MaskNode:
    """One inserted mask, as ``ebcompile inspect`` lists it."""

    tensor: str
    shape: tuple[int, ...]
    density: float
    frozen: bool


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise InvalidRatioError(f"ratio={ratio!r} is not a number. Fix: pass a float in (0, 1), e.g. ratio=0.3.")
    if not 0.0 < float(ratio) < 1.0:
        raise InvalidRatioError(
            f"ratio={ratio!r} is outside (0, 1). Fix: pass the fraction of units to prune, e.g. ratio=0.3."
        )
    return float(ratio)


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


def prepare(
    model: nn.Module,
    example_inputs: Any,
    ratio: float = 0.3,
    structure: str = "auto",
    scope: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    prune_output_layer: bool = False,
    capture_method: str = "auto",
    kv_heads: str = "prune",
    importance: str = "auto",
) -> nn.Module:
    """Mask every prunable linear weight of ``model`` and return the same module, ready to train.

    Args:
        model: any ``nn.Module`` (torchvision ViT/Swin, an MLP, ...). It is modified in place.
        example_inputs: one batch: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        ratio: fraction of the chosen structures that pruning removes, in (0, 1).
        structure: ``"structured"`` (attention heads, KV groups, FFN neurons: the compacted ticket is smaller and
            trains faster), ``"unstructured"`` (single weights: the seed paper's method; saves no time), or
            ``"auto"`` (default): structured when the analysis finds a head or neuron group, else unstructured.
        scope: ``"global"`` (default: one ranking over the model, the measured recipe) or ``"layer"`` (each layer
            prunes ``ratio`` of its own units).
        include / exclude: fnmatch patterns over linear names (module paths, e.g. ``"encoder.*.mlp.*"``).
        prune_output_layer: also mask linears that feed the model output (the classifier head).
        capture_method: ``"auto"``, ``"symbolic_trace"`` or ``"export"``.
        kv_heads: grouped-query attention. ``"prune"`` (default) removes whole KV groups with the query
            heads that read them: the KV cache shrinks too. ``"keep"`` keeps every KV head and removes the same
            number of query heads inside every group (finer-grained; the KV cache is unchanged).
        importance: how units (or weights) are ranked, from the weights or from the data training sees:
            ``"auto"`` (default: ``"taylor"`` when the masked weights train, ``"activation"`` when they are frozen
            (LoRA), ``"magnitude"`` when no training was seen; chosen at the first early-bird check),
            ``"magnitude"`` (weights only), ``"taylor"`` (``|w * dL/dw|``, read from the gradients at
            each optimizer step), ``"activation"`` (``|w| * rms(input)``, from forward hooks; works with frozen
            weights, e.g. LoRA) or ``"gate"`` (EarlyBERT: a learnable coefficient per head / KV group / neuron; add
            ``l1 * ebcompile.gate_penalty(model)`` to the loss, or let ``EarlyBirdCallback`` do it). Measured
            choices per setting: docs/early-bird.md.

    The returned model trains exactly like the original while its masks are all ones (no multiply is
    even done); ``EarlyBird`` draws masks and ``apply_ticket`` freezes them.
    """
    require_module(model, "prepare")
    require_materialized(model, "prepare")
    if any(is_sharded(p) for p in model.parameters()) or unwrap(model) is not model:
        raise ConfigError(f"prepare got a model already wrapped for several processes ({type(model).__name__}, or sharded "
                          "parameters). Fix: call ebcompile.prepare on the plain model first, then wrap it in "
                          "DistributedDataParallel or fully_shard it.")
    ratio = check_ratio(ratio)
    plan, structure, scope, tensors = build_plan(model, example_inputs, structure, scope, include, exclude,
                                                 prune_output_layer, capture_method, kv_heads, importance)
    check_plan_kind(importance, plan, structure)
    insert_masks(model, tensors)
    args, kwargs = normalize_inputs(example_inputs)
    example = (_detached(args), graph_kwargs(model, _detached(kwargs)))
    model._ebcompile = PrepareConfig(plan, ratio, structure, scope, kv_heads, example, importance=importance)
    model._ebcompile.tracker = make_importance(importance, model, plan, structure)
    return model


def build_plan(model: nn.Module, example_inputs: Any, structure: str = "auto", scope: str | None = None,
               include: Sequence[str] | None = None, exclude: Sequence[str] | None = None, prune_output_layer: bool = False,
               capture_method: str = "auto", kv_heads: str = "prune", importance: str = "auto",
               ) -> tuple[Plan, str, str, list[str]]:
    """``prepare``'s checks of its arguments and its analysis, changing nothing (the model may be on the meta device):
    the plan, the structure and scope chosen, and the tensors that would get masks."""
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    if not isinstance(prune_output_layer, bool):
        raise ConfigError(f"prune_output_layer={prune_output_layer!r} must be True or False. Fix: e.g. prune_output_layer=True.")
    _check_choice("structure", structure, STRUCTURES + ("auto",))
    scope = _check_choice("scope", scope or "global", SCOPES)
    _check_choice("kv_heads", kv_heads, KV_HEADS)
    if structure != "auto":
        check_kind(importance, structure)
    elif importance not in KINDS:
        check_kind(importance, "structured")
    if getattr(model, "_ebcompile", None) is not None:
        raise ConfigError("this model is already prepared. Fix: call prepare once, on the plain model.")
    cap = capture(model, example_inputs, capture_method)
    linears, attn = find_linears(cap)
    plan = Plan(capture=f"export of pieces: {', '.join(cap.pieces)}" if cap.pieces else cap.method)
    adapters, tied = adapter_tensors(model), _tied_across_modules(model, [op.weight for op in linears])
    for op in linears:
        if op.weight in adapters:
            plan.skipped[op.name] = (f"an adapter of {adapters[op.weight]}: with structured masks its rows / columns follow that "
                                     "layer's heads and neurons; it is never masked on its own")
        elif op.kind == "output" and not prune_output_layer:
            plan.skipped[op.name] = "feeds the model output (pass prune_output_layer=True to mask it)"
        elif include and not _matches(op.name, include):
            plan.skipped[op.name] = "not matched by include"
        elif _matches(op.name, exclude):
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
    found = ", ".join(op.name for op in linears) or "none"
    if not plan.linears:
        raise NoPrunableLayerError(
            f"no prunable linear layer in {type(model).__name__} (linear layers found: {found}). "
            "Fix: loosen include=/exclude=, or pass prune_output_layer=True if the only linear is the output layer."
        )
    masked_weights = {op.weight for op in plan.linears}
    followers = {w for w, base in adapters.items() if f"{base}.weight" in masked_weights}  # adapters of masked layers
    groups, why = find_groups(cap, attn, masked_weights | followers, example_inputs, keep_kv=kv_heads == "keep")
    plan.groups = [g for g in groups if not is_adapter_rank(g, adapters) and not _router_left_out(g, include, exclude, plan)]
    grouped = {m.tensor for g in plan.groups for m in g.members}
    if structure == "auto":
        structure = "structured" if plan.groups else "unstructured"
        check_kind(importance, structure)
    for op in plan.linears:  # masked, but in no head or neuron group: say why (structured masks keep it whole)
        if structure == "structured" and op.weight not in grouped and op.name in why:
            plan.skipped.setdefault(op.name, why[op.name])
    for name, reason in why.items():  # routers (masked or not) of experts that are no units: say why
        if reason.startswith(("no whole experts", "no experts")):
            plan.skipped.setdefault(name, reason)
    if structure == "structured":
        if not plan.groups:
            reasons = "; ".join(f"{n}: {r}" for n, r in list(why.items())[:3])
            raise NoPrunableLayerError(
                f"no attention head or FFN neuron group among the masked linears of {type(model).__name__} "
                f"({found}){f' ({reasons})' if reasons else ''}. Fix: use structure='unstructured', or include both "
                "linears of an FFN block."
            )
        # group slices (biases included) plus every other masked linear, which keeps an all-ones mask
        tensors = sorted({m.tensor for g in plan.groups for m in g.members if m.masked} | masked_weights)
    else:
        tensors = [op.weight for op in plan.linears]
    return plan, structure, scope, tensors


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


def _detached(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_detached(v) for v in x)
    return x


def config_of(model: nn.Module) -> PrepareConfig:
    cfg = getattr(model, "_ebcompile", None)
    if cfg is None:
        raise NotPreparedError(
            f"{type(model).__name__} has no ebcompile masks. Fix: call ebcompile.prepare(model, example_inputs) first."
        )
    return cfg


def current_masks(model: nn.Module, ratio: float | None = None, fresh: bool = False, sync: bool = True) -> Masks:
    """The masks pruning at ``ratio`` (default: the prepared ratio) gives now, by the prepared importance kind.

    ``fresh`` (an early-bird check): a data-aware kind must have seen data since the last check, and a new window
    of statistics starts after the draw; otherwise the statistics seen so far (or the last check's) are used.
    ``sync``: sum data statistics over the ranks of a process group first (DDP: every rank draws alike)."""
    cfg = config_of(model)
    ratio = check_ratio(ratio if ratio is not None else cfg.ratio)
    tracker = tracker_of(model)
    tracker.begin_draw(fresh, sync)  # raises ImportanceDataError before anything changes
    masks = compute_masks(model, cfg.plan, ratio, cfg.structure, cfg.scope, tracker)
    tracker.end_draw(fresh)
    return masks


def tracker_of(model: nn.Module) -> Importance:
    """The importance scorer of a prepared model (a magnitude one for models prepared before importance kinds)."""
    cfg = config_of(model)
    if getattr(cfg, "tracker", None) is None:
        cfg.tracker = make_importance(getattr(cfg, "importance", "magnitude"), model, cfg.plan, cfg.structure)
    return cfg.tracker


def mask_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shapes of the vectors mask distances are measured on (``Masks.compared``), without drawing masks."""
    cfg = config_of(model)
    if cfg.structure == "structured":
        return {f"{g.kind}:{g.name}": (g.units,) for g in cfg.plan.groups}
    return {op.weight: tuple(raw_tensor(model, op.weight).shape) for op in cfg.plan.linears}


def mask_nodes(model: nn.Module) -> list[MaskNode]:
    """Every inserted mask with its shape, kept fraction and whether it is frozen."""
    config_of(model)
    return [
        MaskNode(name, tuple(m.mask.shape), float(m.mask.float().mean()), m.frozen)
        for name, _, _, m in iter_masks(model)
    ]
