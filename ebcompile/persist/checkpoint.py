"""``save`` / ``load``: a (compacted) model as a directory that rebuilds without pickle.

Layout of ``directory``:

- ``model.safetensors``: the state_dict (tied tensors stored once, see ``aliases``);
- ``config.json``: the Hugging Face config, when the model is a ``transformers.PreTrainedModel``
  (``architectures`` names its class);
- ``ebcompile.json``: ``format``, ``version``, the shape of every state_dict tensor (``shapes``), the head
  count of every attention module of a registered family (``heads``) and ``aliases`` (key -> stored key);
- ``ebcompile-files.json``: the manifest of the files the save wrote (``savedir``), the only ones a later
  save replaces or removes.

Invariants: the save is committed by ``savedir.atomic_dir`` (the manifest last, so a directory holding it is
complete); ``load(save(m))`` computes what ``m`` computes — the fresh model (rebuilt from ``config.json``
with no custom code, its sizes checked against the weights first, or the ``model=`` passed) is shrunk to the
recorded head counts and tensor shapes with the same rewrites ``compact`` uses, then loaded strictly; nothing
is ever unpickled; any unreadable or inconsistent file raises ``CheckpointError``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis.experts_list import expert_list_sizes, keep_experts
from ..errors import CheckpointError, ConfigError, EbcompileError
from ..families import compacted_by, family_of
from ..families.vocabulary import GROUP_COUNTS, HEAD_COUNTS, KV_COUNTS, NEURON_WIDTHS, WIDTHS
from ..modules import SparseLinear
from ..names import set_tensor, split_name, tensor_at
from ..transforms.counts import SLICED_BUFFERS, WIDTH_ATTRS, ConfigView
from ..transforms.head_inputs import head_input_slices
from ..transforms.head_inputs import install as install_head_inputs
from ..transforms.remove_units import fix_attributes, removed_indices
from ..transforms.reshapes import install_rewrite, rewrites_of
from ..transforms.shrink import plain_model
from .fsguard import exists, guard, read_json
from .hfload import build_checked, header_shapes, hf_class, hf_config, read_folder, saved_hf_class
from .materialized import require_materialized
from .model_format import CONFIG, FORMAT, META, VERSION, WEIGHTS, count_attributes, head_counts
from .savedir import atomic_dir, read_saved

__all__ = ["save", "load", "head_counts", "WEIGHTS", "CONFIG", "META"]

COUNT_NAMES = set(HEAD_COUNTS + KV_COUNTS + GROUP_COUNTS + WIDTHS + NEURON_WIDTHS)  # what count_attributes saves anyway

def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _set_counts(model: nn.Module, counts: dict[str, Any]) -> None:
    for key, value in counts.items():
        owner, attr = split_name(key)
        if owner == "config" or owner.endswith(".config"):  # a module's view of the shared config (transforms.counts)
            parent = owner[:-len("config")].rstrip(".")
            if not _has_config(model, parent) or not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"the checkpoint sets {key}, which the model lacks. Fix: pass a model of the saved "
                                      "architecture.")
            module = model.get_submodule(parent)
            if not isinstance(module.config, ConfigView):
                module.config = ConfigView(module.config, {})
            module.config.overrides[attr] = value
            continue
        try:
            module = model.get_submodule(owner)
        except AttributeError as exc:
            raise CheckpointError(f"the checkpoint sets {key}, which the model lacks. Fix: pass a model of the saved "
                                  "architecture.") from exc
        if isinstance(value, list) and isinstance(module.__dict__.get(attr), tuple) \
                and all(type(x) is int and x >= 0 for x in value) and len(value) == len(module.__dict__[attr]):
            setattr(module, attr, tuple(value))  # a shape attribute (transforms.reshapes.rewrite_widths)
            module.__dict__.setdefault(WIDTH_ATTRS, {})[attr] = tuple(value)
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{META}: {key}={value!r} is not a count. Fix: save the model again.")
        if isinstance(module.__dict__.get(attr), int):
            setattr(module, attr, value)
            if attr in module.__dict__.get(WIDTH_ATTRS, {}) or attr not in COUNT_NAMES:  # saved again if saved again
                module.__dict__.setdefault(WIDTH_ATTRS, {})[attr] = value


def _has_config(model: nn.Module, path: str) -> bool:
    try:
        return model.get_submodule(path).__dict__.get("config") is not None
    except AttributeError:
        return False


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` to ``directory`` and return its path: created if needed, or an earlier save's files
    replaced (written beside it and committed; a kill at any instant leaves the old or the new save loadable;
    files the earlier save did not write stay). Any other non-empty directory is refused (``OutputPathError``).

    A prepared model is saved as what it deploys to: compacted when a ticket is applied (structured tickets
    lose their pruned heads and neurons), otherwise with its masks baked into the weights.
    """
    from .materialized import require_module

    require_module(model, "save")
    require_materialized(model, "save")
    net = plain_model(model)
    if any(isinstance(m, SparseLinear) for m in net.modules()):
        raise ConfigError("save writes dense models; this one holds SparseLinear (compact(..., sparse=True)) layers. "
                          "Fix: save compact(model) without sparse=True.")
    directory = Path(directory)
    state = net.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored: dict[tuple, str] = {}
    extra = _extra_state(state)  # get_extra_state() values: JSON, beside the tensors
    state = {k: v for k, v in state.items() if k not in extra}
    for key, value in state.items():
        ident = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if ident in stored:  # tied weights (GPT-2 lm_head / wte): stored once
            aliases[key] = stored[ident]
            continue
        stored[ident] = key
        tensors[key] = value.detach().to("cpu").clone().contiguous()
    for name in getattr(net, SLICED_BUFFERS, []):  # cut by compact but outside the state_dict: stored beside it
        tensors[name] = tensor_at(net, name).detach().to("cpu").clone().contiguous()
    is_hf = _is_hf(net)
    meta = {"format": FORMAT, "version": VERSION, "class": f"{type(net).__module__}.{type(net).__qualname__}",
            "transformers": is_hf, "shapes": {k: list(v.shape) for k, v in {**state, **tensors}.items()},
            "heads": head_counts(net), "aliases": aliases, "counts": count_attributes(net),
            "reshapes": rewrites_of(net), "extra_state": extra, "buffers": list(getattr(net, SLICED_BUFFERS, [])),
            "experts": expert_list_sizes(net), "head_inputs": head_input_slices(net)}
    from safetensors.torch import save_file

    with atomic_dir(directory, marker=META) as tmp:  # a kill at any instant leaves the old or the new save
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if is_hf:
            config = net.config.to_dict()
            config["architectures"] = [type(net).__name__]
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def _extra_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state_dict entries that are not tensors (``get_extra_state``); refused unless JSON can hold them."""
    extra = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    for key, value in extra.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} (get_extra_state) is a {type(value).__name__} that JSON cannot hold, and ebcompile "
                              "saves tensors and JSON only (never pickle). Fix: return tensors or JSON values (dict, list, "
                              "str, numbers) from get_extra_state.") from None
    return extra


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META
    if not exists(path):
        raise CheckpointError(f"{path} does not exist. Fix: pass a directory written by ebcompile.save.")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ebcompile model description. Fix: pass a directory written by ebcompile.save.")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has version {meta.get('version')!r}; this ebcompile reads version {VERSION}. "
                              "Fix: save it again with this version.")
    meta.setdefault("counts", {})
    meta.setdefault("reshapes", {})
    meta.setdefault("buffers", [])
    meta.setdefault("experts", {})
    meta.setdefault("head_inputs", {})
    if not isinstance(meta["buffers"], list) or not all(isinstance(b, str) for b in meta["buffers"]):
        raise CheckpointError(f"{path} has a malformed 'buffers' entry. Fix: save the model again.")
    for key, kind in (("shapes", dict), ("heads", dict), ("aliases", dict), ("counts", dict), ("reshapes", dict), ("experts", dict),
                      ("head_inputs", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path} lacks a valid {key!r} entry. Fix: save the model again.")
    return meta


def _hf_model(directory: Path, shapes: dict[str, list[int]], saved_class: object = None,
              experts: dict[str, list[str]] | None = None) -> nn.Module:
    """The model class ``ebcompile.json`` records (else the one ``config.json``'s ``architectures`` names), built
    from that config (no hub access, no code from the folder) once the weights' ``shapes`` are checked to fit it."""
    if not exists(directory / CONFIG):
        raise CheckpointError(f"{directory / CONFIG} does not exist. Fix: save with ebcompile.save, or pass model=.")
    cls = saved_hf_class(saved_class)
    try:
        config = (cls.config_class.from_dict(read_folder(directory)) if cls is not None  # bounded JSON, no code
                  else hf_config(directory, local_only=True))
    except EbcompileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means the config cannot be used
        raise CheckpointError(f"{directory / CONFIG} is not a usable transformers config: {exc}. Fix: save again.") from exc
    cls = cls or hf_class(config, "Fix: pass model= (a freshly built model of that architecture).")
    return build_checked(cls, config, shapes, directory, experts or {})


def _shrink(model: nn.Module, meta: dict[str, Any]) -> None:
    """Cut ``model``'s heads, then every other tensor, to the recorded counts and shapes (values are garbage
    until the weights are loaded)."""
    _reinstall_rewrites(model, meta.get("reshapes", {}))
    try:
        keep_experts(model, meta.get("experts", {}))  # the experts each cut container kept
    except ValueError as exc:
        raise CheckpointError(f"ebcompile.json's experts do not fit the model: {exc}. Fix: pass a model of the saved "
                              "architecture, before compaction.") from exc
    groups, kept = {}, {}
    for path, count in meta["heads"].items():
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            raise CheckpointError(f"the checkpoint has an attention module {path!r} the model lacks. Fix: pass a model "
                                  "of the saved architecture.") from exc
        family = family_of(module)
        group = family.heads(path, module) if family is not None else None
        if group is None:
            if compacted_by(module) is not None and module.num_heads == count:  # already compact (rebuilt by load)
                continue
            raise CheckpointError(f"{path} is not an attention module whose heads ebcompile follows. Fix: pass model= "
                                  "built like the saved one, before compaction.")
        if not isinstance(count, int) or not 0 < count <= group.units:
            raise CheckpointError(f"{path}: recorded {count!r} heads, the model has {group.units}. Fix: pass a model of "
                                  "the saved architecture.")
        if count < group.units:
            keep = torch.arange(group.units) < count
            for (name, dim), idx in removed_indices(group, keep).items():
                t = tensor_at(model, name)
                set_tensor(model, name, t.detach().narrow(dim, 0, t.shape[dim] - len(idx)).clone())
            groups[path], kept[path] = group, (count, group.units)
    fix_attributes(model, groups, kept)
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for name, shape in meta["shapes"].items():
        t = params.get(name)
        if t is None or list(t.shape) == list(shape):
            continue  # unknown keys are reported by the strict load
        if not isinstance(shape, list) or len(shape) != t.dim() or any(
                isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= n for s, n in zip(shape, t.shape)):
            raise CheckpointError(f"{name} was saved with shape {shape}, which is no slice of the model's {list(t.shape)}. "
                                  "Fix: pass a model of the saved architecture, before compaction.")
        piece = t.detach()
        for dim, size in enumerate(shape):
            piece = piece.narrow(dim, 0, int(size))
        set_tensor(model, name, piece.clone())
    fix_attributes(model, {}, {})  # nn.Linear / Conv1D feature counts follow the new shapes
    _set_counts(model, meta.get("counts", {}))
    _reinstall_head_inputs(model, meta.get("head_inputs", {}))


def _reinstall_head_inputs(model: nn.Module, slices: Any) -> None:
    """Per-head inputs compact sliced (``transforms.head_inputs``): the same slices on the rebuilt modules."""
    def valid(s: Any) -> bool:
        kind, _, key = s.get("arg", "").partition(":") if isinstance(s, dict) and isinstance(s.get("arg"), str) else ("", "", "")
        period, keep = s.get("period"), s.get("keep") if isinstance(s, dict) else None
        return (kind == "kwarg" and bool(key) or kind == "arg" and key.isdigit()) and isinstance(s.get("dim"), int) \
            and isinstance(period, int) and period > 0 and isinstance(keep, list) and bool(keep) \
            and all(isinstance(k, int) and 0 <= k < period for k in keep)

    if not isinstance(slices, dict):
        raise CheckpointError("ebcompile.json's 'head_inputs' is malformed. Fix: save the model again.")
    for path, entries in slices.items():
        if not isinstance(entries, list) or not all(valid(s) for s in entries):
            raise CheckpointError(f"ebcompile.json's head_inputs for {path!r} are malformed. Fix: save the model again.")
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            raise CheckpointError(f"the checkpoint slices the per-head inputs of {path!r}, which the model lacks. Fix: pass "
                                  "a model of the saved architecture.") from exc
        install_head_inputs(module, entries)


def _reinstall_rewrites(model: nn.Module, rewrites: dict[str, Any]) -> None:
    """Forwards that compact rewrote (``transforms.reshapes``): traced again from the fresh model's own code."""
    for path, changes in rewrites.items():
        try:
            module = model.get_submodule(path)
            install_rewrite(module, module, changes)
        except Exception as exc:  # noqa: BLE001 - a missing module, an untraceable forward or a malformed entry
            raise CheckpointError(f"the forward of {path} was rewritten at compaction and cannot be rewritten again here "
                                  f"({type(exc).__name__}: {str(exc)[:200]}). Fix: pass model= built from the same code as "
                                  "the saved one, before compaction.") from exc


def _load_pretrained(directory: Path, model: nn.Module | None) -> nn.Module:
    """A ``save_pretrained`` directory: tensor shapes from the files, counts from ``ebcompile.json`` if written;
    tied weights (absent from the files) are tied again."""
    from .pretrained import pretrained_weights

    weights = pretrained_weights(directory)
    meta = read_json(directory / META) if exists(directory / META) else {}
    if weights is None:
        raise CheckpointError(f"{directory} has no model.safetensors. Fix: save with save_pretrained(safe_serialization=True).")
    experts = meta.get("experts", {}) if isinstance(meta, dict) and isinstance(meta.get("experts"), dict) else {}
    model = _hf_model(directory, {k: list(v.shape) for k, v in weights.items()}, None, experts) if model is None else model
    meta = {"heads": {}, "counts": meta.get("counts", {}) if isinstance(meta, dict) else {}, "experts": experts,
            "reshapes": meta.get("reshapes", {}) if isinstance(meta, dict) else {},
            "head_inputs": meta.get("head_inputs", {}) if isinstance(meta, dict) else {},
            "shapes": {k: list(v.shape) for k, v in weights.items()}}
    _shrink(model, meta)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in weights}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise CheckpointError(f"{directory}: the saved tensors do not fit {type(model).__name__} (missing {untied[:3]}, "
                              f"unexpected {list(unexpected)[:3]}). Fix: pass a model of the saved architecture.")
    return model.eval()


def load(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved by ``save(model, directory)`` and return it in eval mode.

    Hugging Face models are rebuilt from ``config.json`` (class from ``architectures``); any other model needs
    ``model=``: a freshly built, uncompacted instance of the saved architecture (it is shrunk in place).
    """
    got = read_saved(directory, lambda folder: _read(folder, model))  # never two saves' files, mid-commit
    if isinstance(got, nn.Module):
        return got
    if model is not None:  # the caller's model: every refusal must come before it changes
        _into(_meta_copy(model), got[1], {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in got[2].items()})
    return _into(*got)


def _meta_copy(model: nn.Module) -> nn.Module:
    """``model`` with every parameter and buffer on the meta device (no memory): a rehearsal of the load."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        ghost = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(ghost, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else ghost
    return copy.deepcopy(model, memo)


def _into(model: nn.Module, meta: dict[str, Any], weights: dict[str, Any]) -> nn.Module:
    """Shrink ``model`` to the saved counts and shapes and load ``weights`` into it (strict)."""
    _shrink(model, meta)
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for name in meta["buffers"]:  # non-persistent buffers compact cut: set from the file, not the state_dict
        value = weights.pop(name, None)
        if name not in buffers or value is None or list(value.shape) != list(buffers[name].shape):
            raise CheckpointError(f"{META} lists buffer {name!r}, which the model or {WEIGHTS} lacks or which does not fit. "
                                  "Fix: pass a model of the saved architecture, or save the model again.")
        set_tensor(model, name, value.to(buffers[name].device) if not buffers[name].is_meta else value.to("meta"))
    floats = {v.dtype for v in weights.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if len(floats) == 1:  # the saved dtype; floating tensors only (Module.to would drop a complex buffer's imaginary part)
        dtype = floats.pop()
        model._apply(lambda x: x.to(dtype) if x.is_floating_point() else x)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        why = " ".join(str(exc).split())[:400]  # torch's message spans lines; an error is read on one
        raise CheckpointError(f"the saved tensors do not fit {type(model).__name__}: {why}. Fix: pass a model "
                              "of the saved architecture.") from exc
    return model.eval()


def _read(directory: Path, model: nn.Module | None) -> nn.Module | tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Everything ``load`` reads from ``directory``, with the model to load into (nothing of it changed yet); a
    ``save_pretrained`` folder is loaded whole."""
    meta_path = directory / META
    try:
        pretrained = not exists(meta_path) or bool(read_json(meta_path).get("pretrained"))
    except (CheckpointError, AttributeError):
        pretrained = False  # _read_meta below reports the broken file
    if pretrained and exists(directory / CONFIG):  # save_pretrained: sizes from the tensors themselves
        return _load_pretrained(directory, model)
    meta = _read_meta(directory)
    if model is None:
        if not meta["transformers"]:
            raise CheckpointError(f"{directory} holds a {meta.get('class')} model, not a transformers one. Fix: pass "
                                  "model= (a freshly built model of that class).")
        shapes = header_shapes([directory / WEIGHTS])
        shapes.update({k: shapes[t] for k, t in meta["aliases"].items() if t in shapes})
        shapes = {k: v for k, v in shapes.items() if k not in meta["buffers"]}  # outside the state_dict
        model = _hf_model(directory, shapes, meta.get("class"), meta["experts"])
    elif getattr(model, "_ebcompile", None) is not None:
        raise ConfigError("load needs a plain model; this one was prepared by ebcompile. Fix: pass a freshly built model.")
    else:  # loading into meta tensors would return a model with no values
        require_materialized(model, "load(model=...)")
    from safetensors.torch import load_file

    with guard(directory / WEIGHTS, "read"):
        weights = load_file(str(directory / WEIGHTS))
    for key, target in meta["aliases"].items():
        if target not in weights:
            raise CheckpointError(f"alias {key} -> {target}: {target} is not in {WEIGHTS}. Fix: save the model again.")
        weights[key] = weights[target]
    if set(weights) != set(meta["shapes"]):
        raise CheckpointError(f"{WEIGHTS} and {META} list different tensors. Fix: save the model again.")
    extra = meta.get("extra_state", {})
    if not isinstance(extra, dict):
        raise CheckpointError(f"{META}: extra_state must be an object. Fix: save the model again.")
    return model, meta, {**weights, **extra}
