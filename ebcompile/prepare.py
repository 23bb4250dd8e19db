"""``prepare``: capture, analyse, insert masks. The user's module is returned, masked in place.

``PREPARE`` is the declared pipeline (``ebcompile.pipeline``): check_model, then the analysis passes of
``analysis.build.ANALYSE`` (which change nothing), then check_importance → insert_masks → attach_config →
track_importance, the transforms, each preserving the computation (all-ones masks, read-only hooks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .analysis.build import ANALYSE, Options, build_plan
from .capture.graph import graph_kwargs, normalize_inputs
from .errors import ConfigError, InvalidRatioError, NotPreparedError
from .persist.materialized import require_materialized, require_module
from .pipeline import Pass, Pipeline, State
from .plan import Plan
from .search.auto_importance import make_importance
from .search.distributed import is_sharded, unwrap
from .search.gates import check_plan_kind
from .search.importance import Masks, compute_masks
from .search.scoring import Importance, raw_tensor
from .transforms.masks import insert_masks, iter_masks

__all__ = ["prepare", "PrepareConfig", "config_of", "mask_nodes", "MaskNode", "current_masks", "check_ratio", "tracker_of",
           "mask_shapes", "build_plan", "PREPARE", "ANALYSE", "Options"]


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
    options = Options(structure, scope, include, exclude, prune_output_layer, capture_method, kv_heads, importance)
    PREPARE.run(model=model, example_inputs=example_inputs, options=options, ratio=ratio)
    return model


# -- the passes of prepare, in order ------------------------------------------------------------------------------

def _check_model(s: State) -> None:
    """Guards: a plain, materialized, unwrapped module, a valid ratio; the example inputs as ``(args, kwargs)``."""
    require_module(s.model, "prepare")
    require_materialized(s.model, "prepare")
    if any(is_sharded(p) for p in s.model.parameters()) or unwrap(s.model) is not s.model:
        raise ConfigError(f"prepare got a model already wrapped for several processes ({type(s.model).__name__}, or sharded "
                          "parameters). Fix: call ebcompile.prepare on the plain model first, then wrap it in "
                          "DistributedDataParallel or fully_shard it.")
    s.ratio = check_ratio(s.ratio)
    args, kwargs = normalize_inputs(s.example_inputs)
    s.example = (_detached(args), graph_kwargs(s.model, _detached(kwargs)))


def _check_importance(s: State) -> None:
    check_plan_kind(s.options.importance, s.plan, s.structure, s.model)


def _insert_masks(s: State) -> None:
    insert_masks(s.model, s.tensors)


def _attach_config(s: State) -> None:
    s.model._ebcompile = PrepareConfig(s.plan, s.ratio, s.structure, s.scope, s.options.kv_heads, s.example,
                                       importance=s.options.importance)


def _track_importance(s: State) -> None:
    s.model._ebcompile.tracker = s.tracker = make_importance(s.options.importance, s.model, s.plan, s.structure)


PREPARE = Pipeline("prepare", ("model", "example_inputs", "options", "ratio"), [
    Pass("check_model", _check_model, ("model", "example_inputs", "ratio"), ("ratio", "example"),
         doc="a plain, materialized, unwrapped module and a ratio in (0, 1); the example as (args, kwargs)"),
    *ANALYSE.passes,
    Pass("check_importance", _check_importance, ("model", "plan", "structure", "options"),
         doc="the importance kind can rank this plan (gate: every unit has a tensor to scale)"),
    Pass("insert_masks", _insert_masks, ("model", "tensors"), (), preserves=True,
         doc="a mask parametrization on every tensor, all ones: the model computes what it did"),
    Pass("attach_config", _attach_config, ("model", "plan", "ratio", "structure", "scope", "example"), (),
         preserves=True, doc="model._ebcompile: the plan, the choices and the example inputs compact checks on"),
    Pass("track_importance", _track_importance, ("model", "plan", "structure"), ("tracker",), preserves=True,
         doc="the importance kind's scorer, with its read-only hooks"),
])


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
