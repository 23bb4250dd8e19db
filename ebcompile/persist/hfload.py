"""Hugging Face configs and models, built without running any code a folder or hub repository names.

- Every ``from_pretrained`` ebcompile calls gets ``NO_CODE`` (``trust_remote_code=False``), so transformers never
  imports a folder's ``.py`` files nor asks on stdin whether to: a config whose ``auto_map`` names custom code
  loads with transformers' own class for its ``model_type`` when there is one, else is a ``CheckpointError``.
- ``config.json`` and ``tokenizer_config.json`` of a local folder are read first with bounded size and nesting.
- ``build_checked``: before a model is allocated from a config, the same model is built on the meta device
  and compared with the tensor shapes of the weights (safetensors headers): a config whose sizes disagree
  with the weights (``vocab_size``, ``hidden_size``, positions, layers, a width smaller than the saved one)
  is refused before any memory is taken.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis.experts_list import keep_experts
from ..errors import CheckpointError, EbcompileError
from .fsguard import exists, guard, read_json

__all__ = ["NO_CODE", "NO_PICKLE", "read_folder", "refuse_pickled_weights",
           "hf_config", "hf_class", "saved_hf_class", "build_checked", "header_shapes",
           "quiet_transformers"]

NO_CODE: dict[str, Any] = {"trust_remote_code": False}
NO_PICKLE: dict[str, Any] = {**NO_CODE, "use_safetensors": True}  # a model's from_pretrained: safetensors weights only
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_NO_CODE_FIX = ("Fix: ebcompile never runs code from a model folder or hub repository; pass a model whose config "
                "names an architecture transformers provides, or build the model yourself and pass it (model=).")


def read_folder(source: str | os.PathLike) -> dict[str, Any] | None:
    """A local folder's ``config.json`` (None for a hub name), read with bounded JSON; ``tokenizer_config.json``
    is checked the same way."""
    folder = Path(source).expanduser()
    refuse_pickled_weights(folder)
    if not exists(folder / "config.json"):
        if exists(folder / "tokenizer_config.json"):
            read_json(folder / "tokenizer_config.json")
        return None
    raw = read_json(folder / "config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a JSON object. Fix: save the model again.")
    if exists(folder / "tokenizer_config.json"):
        read_json(folder / "tokenizer_config.json")
    return raw


def refuse_pickled_weights(folder: Path) -> None:
    """A ``CheckpointError`` for a folder whose weights are only pickles: loading them would unpickle (run code)."""
    if not folder.is_dir():
        return
    names = [p.name for p in folder.iterdir()]
    pickled = sorted(n for n in names if n.endswith(PICKLED))
    if pickled and not any(n.endswith(".safetensors") for n in names):
        raise CheckpointError(f"{folder} holds its weights only as pickles ({', '.join(pickled[:3])}); ebcompile never "
                              "unpickles a file (unpickling can run code). Fix: convert them to safetensors where you "
                              "trust them (model.save_pretrained(dir, safe_serialization=True)), or use the repository's "
                              ".safetensors weights.")


def refuse_custom_code(source: str | os.PathLike, exc: BaseException, raw: dict[str, Any] | None) -> None:
    """Raise the custom-code ``CheckpointError`` if ``exc`` (from transformers) is its refusal to run a model's code."""
    if "trust_remote_code" in str(exc) or (raw is not None and raw.get("auto_map")):
        names = sorted((raw or {}).get("auto_map") or {})
        raise CheckpointError(f"{source} needs custom code to load (config.json auto_map: {names or 'custom code'}, "
                              f"model_type {(raw or {}).get('model_type')!r}). {_NO_CODE_FIX}") from exc


def hf_config(source: str | os.PathLike, local_only: bool = False) -> Any:
    """``AutoConfig.from_pretrained(source)`` with no custom code; a config that needs it is a ``CheckpointError``.
    Other failures propagate (callers say what they were loading)."""
    import transformers

    raw = read_folder(source)
    try:
        return transformers.AutoConfig.from_pretrained(str(source), local_files_only=local_only, **NO_CODE)
    except EbcompileError:
        raise
    except Exception as exc:
        refuse_custom_code(source, exc, raw)
        raise


def hf_class(config: Any, fix: str) -> type:
    """The ``transformers`` model class a config's ``architectures`` names; ``CheckpointError`` ending in ``fix``."""
    import transformers

    name = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"config.json names architecture {name!r}, which transformers does not provide. {fix}")
    return cls


def saved_hf_class(qualified: object) -> type | None:
    """The ``transformers`` model class ``ebcompile.json`` records (``transformers.models.<m>.modeling_<m>.<Class>``),
    or None: only modules inside the installed transformers are imported, never code from the folder. It names
    classes ``config.json``'s ``architectures`` cannot (a sub-model such as ``TrOCRDecoder``, Bark's sub-models)."""
    import importlib

    import transformers

    if not isinstance(qualified, str) or not qualified.startswith("transformers.models."):
        return None
    module, _, name = qualified.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def header_shapes(files: list[Path]) -> dict[str, list[int]]:
    """Every tensor's shape from safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for path in files:
        with guard(path, "read"), safe_open(str(path), framework="pt") as f:
            shapes.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def _disagreement(fresh: nn.Module, shapes: dict[str, list[int]]) -> str | None:
    """Why the weights' ``shapes`` cannot be (a compaction of) ``fresh``'s tensors, or None if they can."""
    state = {k: list(v.shape) for k, v in fresh.state_dict().items()}
    for dense, compact in _compact_names(fresh).items():  # a compacted module saves some tensors under new names
        if compact in shapes and dense in state:
            state[compact] = state.pop(dense)
    tied = set(getattr(fresh, "all_tied_weights_keys", None) or {})
    missing = [k for k in state if k not in shapes and k not in tied]
    if missing:
        return f"the config describes {missing[0]} ({len(missing)} tensors in all), which the weights lack"
    extra = [k for k in shapes if k not in state]
    if extra:
        return f"the weights hold {extra[0]} ({len(extra)} tensors in all), which the config does not describe"
    for key, saved in shapes.items():  # compaction only ever removes units: a saved size is at most the config's
        if len(saved) != len(state[key]) or any(s > n for s, n in zip(saved, state[key])):
            return f"{key} has shape {saved} in the weights, {state[key]} by the config"
    embeddings = {f"{p}.weight": m for p, m in fresh.named_modules() if isinstance(m, nn.Embedding)}
    inputs = input_embeddings(fresh)
    for key, module in embeddings.items():  # vocabularies, positions and the residual width are never pruned
        exact = state[key] if module is inputs else state[key][:1]
        if key in shapes and shapes[key][:len(exact)] != exact:
            return f"{key} has shape {shapes[key]} in the weights, {state[key]} by the config"
    return None


def _compact_names(model: nn.Module) -> dict[str, str]:
    """Dense state_dict name -> the name its compacted module saves it under, from the families' records."""
    from ..families import family_of

    names: dict[str, str] = {}
    for path, module in model.named_modules():
        family = family_of(module) if path else None
        if family is not None and family.compact_names is not None:
            names.update(family.compact_names(path, module))
    return names


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()``, or None where the model has none: transformers raises
    ``NotImplementedError`` for a model without a token embedding (a vision model: ConvNext, DETR)."""
    try:
        return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except (NotImplementedError, AttributeError):
        return None


def build_checked(cls: type, config: Any, shapes: dict[str, list[int]], where: str | os.PathLike,
                  experts: dict[str, list[str]] | None = None) -> nn.Module:
    """``cls._from_config(config)``, after checking on the meta device that the weights' ``shapes`` fit it (with the
    ``experts`` a compact model kept per container: ``analysis.experts_list.keep_experts``)."""
    try:
        with torch.device("meta"):
            fresh = cls._from_config(config)
    except Exception as exc:  # noqa: BLE001 - the config cannot build its own class
        raise CheckpointError(f"{where}: config.json does not build {cls.__name__} ({type(exc).__name__}: "
                              f"{str(exc)[:200]}). Fix: save the model again.") from exc
    try:
        keep_experts(fresh, experts or {})  # checkpoint._shrink cuts the real model alike
    except ValueError as exc:
        raise CheckpointError(f"{where}: ebcompile.json's experts do not fit config.json ({exc}). Fix: save the model "
                              "again.") from exc
    why = _disagreement(fresh, shapes)
    if why is not None:
        raise CheckpointError(f"{where}: config.json disagrees with the saved weights: {why}. Fix: pass the config.json "
                              "saved with these weights (or save the model again).")
    need = sum(t.numel() * t.element_size() for t in [*fresh.parameters(), *fresh.buffers()])
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    if memory and need > memory:  # the full-size model is built before it is cut to the saved shapes
        raise CheckpointError(f"{where}: config.json describes a model of {need / 2**30:.1f} GiB before it is cut to the "
                              f"saved shapes, more than this machine's {memory / 2**30:.1f} GiB (a config that does not fit "
                              "its weights?). Fix: pass the config.json saved with these weights, or load on a larger machine.")
    try:
        return cls._from_config(config)
    except (MemoryError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: building {cls.__name__} from config.json failed ({type(exc).__name__}: "
                              f"{str(exc)[:200]}). Fix: pass the config.json saved with these weights.") from exc


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off while loading: a prepared model's ``*_mask`` keys and a
    new classifier head are expected, and stderr stays for our one-line errors."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
