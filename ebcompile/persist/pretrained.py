"""Compact Hugging Face models and ``save_pretrained``: a directory that reloads.

- ``sync_config``: when every layer of the compact model keeps the same counts and the family's config can say
  so (Llama, Qwen2, Mistral, Gemma carry ``head_dim``), the config is rewritten (``num_attention_heads``,
  ``num_key_value_heads``, ``intermediate_size``) — checked by building the class from it on the meta device
  and comparing every tensor shape — so ``save_pretrained`` writes a directory that stock
  ``AutoModel*.from_pretrained`` reloads. Otherwise the config is left as it was.
- ``attach_save_pretrained``: the compact model's ``save_pretrained`` also writes ``ebcompile.json`` (the
  per-layer counts), which ``ebcompile.load`` reads; without it, ``load`` infers the sizes from the tensor shapes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import merged_shapes, pretrained_core
from ..analysis.experts import expert_layout
from ..families import hf_moe
from ..families.config_values import config_value
from ..families.vocabulary import CONFIG_FIELDS
from ..names import split_name
from ..transforms.counts import ConfigView

__all__ = ["sync_config", "attach_save_pretrained", "pretrained_weights"]



def _widths(model: nn.Module, names: tuple[str, ...]) -> set[int]:
    return {m.out_features for path, m in model.named_modules()
            if isinstance(m, nn.Linear) and split_name(path.removesuffix(".base_layer"))[1] in names}  # PEFT: the wrapped linear


def sync_config(model: nn.Module) -> bool:
    """Rewrite ``model.config`` to the compact sizes when one config can describe them; True if it did. For a PEFT
    model, the config of the model it wraps, judged by the shapes the adapters merge into."""
    from ..transforms.head_inputs import head_input_slices

    model = pretrained_core(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config") or head_input_slices(model):
        return False  # per-head inputs sliced per layer (ALiBi): no stock class does that
    new = copy.deepcopy(config)
    head_dim = config_value(config, "head_dim")
    for field, (names, per_head) in CONFIG_FIELDS.items():
        if not isinstance(config_value(config, field), int):
            continue
        widths = _widths(model, names)
        if len(widths) != 1 or (per_head and not isinstance(head_dim, int)):
            continue
        width = widths.pop()
        setattr(new, field, width // head_dim if per_head else width)
    for field, value in expert_config(model, config).items():  # mixture-of-experts counts and widths
        setattr(new, field, value)
    if new.to_dict() == config.to_dict():
        return False
    try:
        with torch.device("meta"):
            fresh = type(model)._from_config(new)
    except Exception:  # noqa: BLE001 - the config cannot describe these sizes
        return False
    want = merged_shapes(model)
    if {k: tuple(v.shape) for k, v in fresh.state_dict().items()} != want:
        return False
    model.config = new
    for module in model.modules():  # submodules holding the shared config object, or a view of it (transforms.counts)
        held = module.__dict__.get("config")
        if held is config or (isinstance(held, ConfigView) and held._base is config):
            module.config = new
    return True


def attach_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained(dir)`` also write ``ebcompile.json`` with the per-layer counts. For a PEFT model,
    the wrapped model's (what ``merge_and_unload()`` returns); the adapter folder stays PEFT's own."""
    model = pretrained_core(model)
    original = getattr(model, "save_pretrained", None)
    if original is None:
        return

    def save_pretrained(save_directory, *args: Any, **kwargs: Any):
        from ..analysis.experts_list import expert_list_sizes
        from ..transforms.head_inputs import head_input_slices
        from ..transforms.reshapes import rewrites_of
        from .model_format import FORMAT, META, VERSION, count_attributes, head_counts

        out = original(save_directory, *args, **kwargs)
        meta = {"format": FORMAT, "version": VERSION, "class": f"{type(model).__module__}.{type(model).__qualname__}",
                "transformers": True, "pretrained": True, "shapes": {}, "heads": head_counts(model), "aliases": {},
                "counts": count_attributes(model), "reshapes": rewrites_of(model), "experts": expert_list_sizes(model),
                "head_inputs": head_input_slices(model)}
        from .io import atomic_path

        with atomic_path(Path(save_directory) / META) as tmp:
            tmp.write_text(json.dumps(meta, indent=1) + "\n")
        return out

    model.save_pretrained = save_pretrained


def pretrained_weights(directory: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a ``save_pretrained`` directory (one file or an index of shards), or None if there are none."""
    from safetensors.torch import load_file

    from ..errors import CheckpointError
    from .fsguard import exists, guard, read_json

    index = directory / "model.safetensors.index.json"
    if exists(index):
        try:
            files = sorted(set(read_json(index)["weight_map"].values()))
            if not all(isinstance(f, str) and Path(f).name == f for f in files):
                raise TypeError("a shard is not a file name")
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} has no valid weight_map ({exc}). Fix: save the model again.") from exc
    elif exists(directory / "model.safetensors"):
        files = ["model.safetensors"]
    else:
        return None
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        with guard(directory / name, "read"):
            weights.update(load_file(str(directory / name)))
    return weights


def expert_config(model: nn.Module, config: object) -> dict[str, int]:
    """Config fields (expert count, per-expert width, shared-expert width) that describe every experts container
    of ``model`` when they all agree; fields they disagree on are left out."""
    counts, widths, shared = set(), set(), set()
    for module in model.modules():
        params = dict(module.named_parameters(recurse=False))
        down = next((n for n in hf_moe.DOWN_TENSORS if n in params and params[n].dim() == 3), None)
        if down is not None:
            lay = expert_layout(module, int(params[down].shape[1])) or expert_layout(module, int(params[down].shape[2]))
            if lay is not None:
                counts.add(lay.experts)
                widths.add(lay.width)
        child = module._modules.get(hf_moe.SHARED_EXPERT[0])
        if child is not None:
            shared |= {m.out_features for n, m in child.named_modules() if isinstance(m, nn.Linear)
                       and split_name(n)[1] in ("up_proj", "gate_proj")}
    out: dict[str, int] = {}
    for fields, values in ((hf_moe.CONFIG_EXPERT_COUNTS, counts), (hf_moe.CONFIG_EXPERT_WIDTHS, widths),
                           ((hf_moe.SHARED_EXPERT[1],), shared)):
        field = next((f for f in fields if isinstance(config_value(config, f), int)), None)
        if field is not None and len(values) == 1:
            out[field] = values.pop()
    return out
