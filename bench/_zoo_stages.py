"""One family through ebcompile, stage by stage: load → dense → dense_onnx (the baseline, never fatal) → prepare →
ticket → compact → equal → onnx → save_load.

Invariant: a row always says how far the family got: ``stage`` is the first stage that failed ("" when all passed),
``reason`` its exception type and first line, and ``report(row)`` is called after every stage so that a parent which
kills the process on a timeout still knows the stage it was in.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

STAGES = ("load", "dense", "dense_onnx", "prepare", "train", "ticket", "compact", "equal", "onnx", "save_load")
IMPORTANCE = ("magnitude", "taylor", "activation", "gate")
TRAIN_STEPS = 3  # a few AdamW steps on the tester's inputs: data-aware importance needs gradients or activations seen
KINDS = ("head", "kv", "expert", "neuron")
RATIO = 0.3
RTOL, ATOL = 1e-4, 1e-5
NO_TESTER = "has no TestCase using ModelTesterMixin"


def reason_of(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def where_of(exc: BaseException) -> str:
    """The innermost frame of the traceback (file:line function), to tell library failures from model code."""
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return ""
    f = tb[-1]
    parts = Path(f.filename).parts
    short = "/".join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else "/".join(parts[-3:])
    return f"{short}:{f.lineno} {f.name}"


def tensors_of(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model output, in order (ModelOutput / dict values, tuples, lists); caches skipped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors_of(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in tensors_of(v)]
    return []


def run_model(model: torch.nn.Module, inputs: dict[str, Any]) -> list[torch.Tensor]:
    """The outputs, drawn with the same random numbers every time (VITS samples noise in eval mode)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return [t.detach().float() for t in tensors_of(model(**inputs))]


class _OpNames(TorchDispatchMode):
    """Records the aten ops one forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def computes_attention(model: torch.nn.Module, inputs: dict[str, Any]) -> bool:
    """Whether a forward computes attention: scaled dot-product attention, or a softmax next to a batched product
    (``bmm``/``baddbmm``; matmuls of 3-D+ tensors dispatch to them). CNNs, state-space models and codecs do not."""
    with _OpNames() as seen:
        run_model(model, inputs)
    sdpa = any("scaled_dot_product" in n for n in seen.names)
    return sdpa or (bool({"softmax", "_softmax", "_safe_softmax"} & seen.names) and bool({"bmm", "baddbmm"} & seen.names))


def fill_zero_weights(model: torch.nn.Module) -> int:
    """Give every all-zero weight matrix small random values, as any training step would; returns how many.

    Some families initialise a router or a gate to zero (AFMoE's router): every expert then ties, and ``topk`` breaks
    ties over four columns differently than over the three a compact router keeps, so masked and compact differ for a
    reason no trained model has."""
    filled = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.is_floating_point() and p.numel() > 1 and not p.any():
                p.normal_(0.0, 0.02)
                filled += 1
    return filled


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest |a - b| beyond tolerance scale; raises AssertionError when the outputs do not match at all."""
    if len(a) != len(b):
        raise AssertionError(f"{len(a)} output tensors vs {len(b)}")
    worst = 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise AssertionError(f"output {i}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel() and not torch.allclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True):
            d = float((x - y).abs().nan_to_num(0).max())
            raise AssertionError(f"output {i} {tuple(x.shape)}: max |diff| {d:.3g} > {ATOL} + {RTOL}·|ref|")
        if x.numel():
            worst = max(worst, float((x - y).abs().nan_to_num(0).max()))
    return worst


def max_heads(model: torch.nn.Module) -> int | None:
    """The largest query head count any module of ``model`` holds (``num_heads``, ``num_attention_heads``, ...; a
    per-layer list counts by its largest entry), or None if no module holds one: a tester config with one head per
    attention module has no head to cut."""
    from ebcompile.families.vocabulary import HEAD_COUNTS

    counts = []
    for module in model.modules():
        for attr in HEAD_COUNTS:
            value = module.__dict__.get(attr)
            values = value if isinstance(value, (list, tuple)) else [value]
            counts += [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        config = module.__dict__.get("config")
        for attr in HEAD_COUNTS:
            value = getattr(config, attr, None) if config is not None else None
            values = value if isinstance(value, (list, tuple)) else [value]
            counts += [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return max(counts) if counts else None


def found_units(model: torch.nn.Module) -> tuple[dict[str, int], dict[str, str]]:
    """Units per kind in the prepared plan, and the kind of each group by its mask key ``kind:name`` (``kv``: a head
    group whose units are whole KV groups, i.e. its masked members do not all have the same unit size). Keyed by the
    whole key: a mixture-of-experts layer's expert group and expert-neuron group share one name."""
    plan = model._ebcompile.plan
    found = dict.fromkeys(KINDS, 0)
    kind_of: dict[str, str] = {}
    for g in plan.groups:
        kind = g.kind
        if kind == "head" and len({m.unit_size for m in g.members if m.masked}) > 1:
            kind = "kv"
        kind_of[f"{g.kind}:{g.name}"] = kind
        found[kind] = found.get(kind, 0) + g.units
    return found, kind_of


def cut_units(ticket: Any, kind_of: dict[str, str], held: frozenset[str] = frozenset()) -> dict[str, int]:
    """Units the ticket cuts per kind, leaving out the groups (mask keys) in ``held``."""
    cut = dict.fromkeys(KINDS, 0)
    for key, keep in ticket.masks.units.items():
        if key in held:
            continue
        kind = kind_of.get(key, ticket.masks.kind_of(key))
        cut[kind] = cut.get(kind, 0) + int((~keep).sum())
    return cut


def held_whole(model: torch.nn.Module, ticket: Any, kind_of: dict[str, str]) -> tuple[list[str], dict[str, int]]:
    """The modules ``compact`` kept whole (their forward could not take fewer units: the ticket's cuts there stay as
    zeros), and the units compact really removed: the ticket's cuts less those of the groups it held whole."""
    from ebcompile.names import split_name
    from ebcompile.transforms.reshapes import is_held_whole

    plan = model._ebcompile.plan
    held = sorted(path for path, why in plan.skipped.items() if is_held_whole(plan, path))
    kept = frozenset(f"{g.kind}:{g.name}" for g in plan.groups
                     if any(is_held_whole(plan, split_name(m.tensor)[0]) for m in g.members if m.masked))
    return held, cut_units(ticket, kind_of, kept)


def new_row(family: str) -> dict[str, Any]:
    return {"family": family, "status": "fail", "stage": "load", "reason": "", "where": "", "model_class": "",
            "dense_onnx": "", "found": {}, "cut": {}, "max_diff": None, "stubs": [], "seconds": 0.0, "stage_seconds": {}}


def train_steps(model: torch.nn.Module, inputs: dict[str, Any], importance: str) -> None:
    """``TRAIN_STEPS`` AdamW steps minimising the mean square of every float output (the testers give no labels), so
    that ``taylor`` sees gradients, ``activation`` forward passes and ``gate`` trained gates before the ticket. In
    training mode, or in eval mode (gradients flow all the same) where a model's training forward asks for labels."""
    import ebcompile

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception:  # noqa: BLE001 - e.g. FastSpeech2: "All labels must be provided to run in training mode"
        model.eval()
    for _ in range(TRAIN_STEPS):
        outs = [t for t in tensors_of(model(**inputs)) if t.is_floating_point() and t.requires_grad]
        if not outs:
            raise RuntimeError("no output of the model has a gradient")
        sum(t.float().pow(2).mean() for t in outs).backward()
        if importance == "gate":
            ebcompile.add_gate_penalty_grad(model, 1e-4)
        opt.step()
        opt.zero_grad()
    model.eval()


def run_family(root: Path, family: str, report: Callable[[dict[str, Any]], None] = lambda row: None,
               importance: str = "magnitude", lora: bool = False) -> dict[str, Any]:
    """Every stage for one family; returns (and reports after each stage) the row. A data-aware ``importance`` adds
    the ``train`` stage (``train_steps``) between prepare and ticket. ``lora``: the dense model gets LoRA adapters on
    every linear (peft, r = 4, the base frozen) before prepare, and compact's result is merged
    (``merge_and_unload``) before it is compared, exported and saved."""
    from _zoo_suite import load_family

    import ebcompile

    row = new_row(family)
    if importance != "magnitude":
        row["importance"] = importance
    if lora:
        row["lora"] = True
    start = time.perf_counter()
    state: dict[str, Any] = {}

    def stage(name: str, fn: Callable[[], None], fatal: bool = True) -> bool:
        row["stage"] = name
        report(row)
        t0 = time.perf_counter()
        try:
            fn()
            ok = True
        except Exception as exc:  # noqa: BLE001 - every failure is the measurement
            ok = False
            if fatal:
                row["reason"], row["where"] = reason_of(exc), where_of(exc)
            else:
                row["dense_onnx"] = reason_of(exc)
        row["stage_seconds"][name] = round(time.perf_counter() - t0, 2)
        row["seconds"] = round(time.perf_counter() - start, 2)
        return ok or not fatal

    def load() -> None:
        loaded = load_family(root, family)
        row["stubs"] = loaded.stubs
        state["loaded"] = loaded

    def dense() -> None:
        loaded, errors = state["loaded"], []
        for cls in loaded.candidates:
            try:
                torch.manual_seed(0)
                model = cls(loaded.config).eval()
                row["zero_weights"] = fill_zero_weights(model)
                state["dense_out"] = run_model(model, loaded.inputs)
            except Exception as exc:  # noqa: BLE001 - try the next class
                errors.append((cls.__name__, exc))
                continue
            state["model"], row["model_class"] = model, cls.__name__
            row["attention"] = computes_attention(model, loaded.inputs)
            row["max_heads"] = max_heads(model)
            return
        name, exc = errors[0]
        row["model_class"] = name
        raise exc

    def dense_onnx() -> None:
        ebcompile.export_onnx(state["model"], Path(tmp) / "dense.onnx", state["loaded"].inputs)
        row["dense_onnx"] = "ok"

    def prepare() -> None:
        if lora:
            import peft

            cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
            state["model"] = peft.get_peft_model(state["model"], cfg).eval()
        state["model"] = ebcompile.prepare(state["model"], state["loaded"].inputs, ratio=RATIO, structure="structured",
                                           importance=importance)
        row["found"], state["kind_of"] = found_units(state["model"])

    def train() -> None:
        if importance != "magnitude":
            train_steps(state["model"], state["loaded"].inputs, importance)

    def ticket() -> None:
        t = state["ticket"] = ebcompile.draw_ticket(state["model"], RATIO)
        row["cut"] = cut_units(t, state["kind_of"])
        ebcompile.apply_ticket(state["model"], t)
        state["masked_out"] = run_model(state["model"], state["loaded"].inputs)

    def compact() -> None:
        state["small"] = ebcompile.compact(state["model"], round_to=None)
        row["held"], row["cut"] = held_whole(state["model"], state["ticket"], state["kind_of"])
        if lora:
            state["small"] = state["small"].merge_and_unload()
        from ebcompile.transforms.reshapes import rewrites_of
        rewrites = rewrites_of(state["small"])  # forwards compact rewrote: by a plain trace, or on the example's values
        row["rewritten"] = {"plain": sum("trace" not in r for r in rewrites.values()),
                            "values": sum("trace" in r for r in rewrites.values())}

    def equal() -> None:
        state["small"].eval()
        state["small_out"] = run_model(state["small"], state["loaded"].inputs)
        row["max_diff"] = max_diff(state["masked_out"], state["small_out"])

    def onnx() -> None:
        ebcompile.export_onnx(state["small"], Path(tmp) / "compact.onnx", state["loaded"].inputs)

    def save_load() -> None:
        ebcompile.save(state["small"], Path(tmp) / "saved")
        back = ebcompile.load(Path(tmp) / "saved")
        max_diff(state["small_out"], run_model(back, state["loaded"].inputs))

    with tempfile.TemporaryDirectory(prefix=f"zoo-{family}-") as tmp:
        steps = dict(load=load, dense=dense, dense_onnx=dense_onnx, prepare=prepare, train=train, ticket=ticket, compact=compact,
                     equal=equal, onnx=onnx, save_load=save_load)
        for name in STAGES:
            if name == "train" and importance == "magnitude":
                continue
            if not stage(name, steps[name], fatal=name != "dense_onnx"):
                if name == "load" and NO_TESTER in row["reason"]:
                    row["status"] = "skip"  # integration tests only (xlm_roberta, camembert): no tiny model to build
                report(row)
                return row
    row.update(status="pass", stage="")
    report(row)
    return row
