"""What the CLI commands read: a model from a path or hub name, and an example batch for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, EbcompileError
from ..persist.checkpoint import META
from ..persist.fsguard import guard


def load_model(source: str, factory: str | None = None) -> nn.Module:
    """An ``ebcompile.save`` directory (an image model's is rebuilt from its ``imageclf.json`` recipe, a
    ``MODULE:FACTORY`` one only by ``factory``), a Hugging Face model folder (``save_pretrained``, a Trainer
    checkpoint) or a hub name, in eval mode. No code the folder names or holds is run."""
    from ..persist import checkpoint
    from ..recipes import imageclf

    if imageclf.is_saved(source):
        return imageclf.load_saved(source, factory)[0]
    if (Path(source) / META).is_file():
        return checkpoint.load(source)
    from ..data import looks_local

    if looks_local(source, hub_ids=True) and not Path(source).expanduser().exists():
        raise CheckpointError(f"{source}: no such folder. Fix: check the path (a hub name has no ./, ../, / or ~ in front).")
    from ..persist import hfload
    from ..persist.hfload import NO_PICKLE, hf_class, hf_config
    from ..persist.hub import hub_kwargs

    hub = {} if Path(source).expanduser().exists() else hub_kwargs(source)  # offline or unreachable: at once
    try:
        config = hf_config(source, local_only=bool(hub))
    except EbcompileError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing folder, bad JSON, no network for a hub name
        raise CheckpointError(f"{source} is neither an ebcompile.save directory nor a Hugging Face model "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Fix: pass a folder written by "
                              "ebcompile.save or save_pretrained, or a hub name when online.") from exc
    cls = hf_class(config, f"Fix: save {source} with save_pretrained (it records its class).")
    with hfload.quiet_transformers(), guard(source, "read"):
        return cls.from_pretrained(source, **hub, **NO_PICKLE).eval()


def load_with_inputs(source: str, batch: int = 1, seq: int = 16, factory: str | None = None
                     ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``load_model(source, factory)`` and a made-up batch for it (``example_inputs``; random pixels for an image
    model)."""
    from ..recipes import imageclf

    if imageclf.is_saved(source):
        model, recipe = imageclf.load_saved(source, factory)
        return model, imageclf.example_inputs(model, recipe, batch)
    model = load_model(source)
    return model, example_inputs(model, batch, seq)


def example_inputs(model: nn.Module, batch: int = 1, seq: int = 16) -> dict[str, torch.Tensor]:
    """A made-up batch of the right kind for a Hugging Face model: token ids + attention mask, or pixels."""
    if batch < 1 or seq < 1:
        raise ConfigError(f"--batch {batch} / --seq {seq} must be >= 1. Fix: e.g. --batch 1 --seq 16.")
    config: Any = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} is not a Hugging Face model, so its inputs are unknown. "
                          "Fix: use the Python API (ebcompile.export_onnx with example inputs).")
    g = torch.Generator().manual_seed(0)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
        return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), *size, generator=g)}
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seq > limit:
        raise ConfigError(f"--seq {seq} exceeds the model's {limit} positions. Fix: pass --seq {limit} or less.")
    ids = torch.randint(0, min(int(config.vocab_size), 1000), (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
