"""``SafeCheckpoints``: ``transformers.Trainer`` checkpoints written and read as safetensors + JSON only.

Invariant: a checkpoint written by a Trainer with this mixin holds no pickle (no ``optimizer.pt``,
``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth`` or ``training_args.bin``), and resuming from one reads none.
The optimizer state is matched by parameter name (``ebcompile.optim_io``), the scheduler and scaler counters are
JSON, and the random states come back, so a resumed run takes the steps an uninterrupted one takes. A checkpoint
holding pickles instead is refused with ``CheckpointError``. Sharded optimizers (DeepSpeed, FSDP) keep the
Trainer's own format; this mixin is for single-process and DDP training.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..io import atomic_path, load_tensors, save_tensors
from ..optim_io import load_optimizer, save_optimizer

__all__ = ["OPTIMIZER_FILE", "SafeCheckpoints", "safe_trainer_class"]

OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE = "optimizer.safetensors", "scheduler.json", "scaler.json"
PICKLES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state.pth")


def _json_state(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj.state_dict())
    except TypeError as exc:
        raise ConfigError(f"the {what} state is not plain numbers ({exc}); SafeCheckpoints writes JSON only. Fix: use "
                          f"a {what} whose state_dict() holds numbers and lists, or a plain Trainer.") from exc


def _rng_file(args: Any) -> str:
    return f"rng_state_{args.process_index}.safetensors" if args.world_size > 1 else "rng_state.safetensors"


class SafeCheckpoints:
    """Mix into a ``transformers.Trainer`` subclass (first): ``class MyTrainer(SafeCheckpoints, Trainer)``, or use
    ``safe_trainer_class()``. ``trainer.train(resume_from_checkpoint=...)`` then resumes without unpickling."""

    def _sharded(self) -> bool:
        return bool(getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False))

    # -- optimizer, scheduler, scaler --------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._sharded():
            return super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
        if not self.args.should_save:
            return
        save_optimizer(self.optimizer, self.model, Path(output_dir) / OPTIMIZER_FILE)
        if self.lr_scheduler is not None:
            text = _json_state(self.lr_scheduler, "learning-rate scheduler")
            with atomic_path(Path(output_dir) / SCHEDULER_FILE) as tmp:
                tmp.write_text(text)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self._sharded():
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        folder = Path(checkpoint)
        if not (folder / OPTIMIZER_FILE).is_file():
            pickled = [p for p in PICKLES[:2] if (folder / p).is_file()]
            if pickled:
                raise CheckpointError(f"{folder} holds its optimizer state as a pickle ({pickled[0]}), which ebcompile "
                                      "never loads. Fix: resume from a checkpoint written by a SafeCheckpoints trainer.")
            return
        load_optimizer(self.optimizer, self.model, folder / OPTIMIZER_FILE)
        if self.lr_scheduler is not None and (folder / SCHEDULER_FILE).is_file():
            try:
                self.lr_scheduler.load_state_dict(json.loads((folder / SCHEDULER_FILE).read_text()))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise CheckpointError(f"{folder / SCHEDULER_FILE} is broken ({type(exc).__name__}). Fix: resume from "
                                      "another checkpoint.") from exc

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(getattr(self, "accelerator", None), "scaler", None)
        if scaler is not None and self.args.should_save:
            text = _json_state(scaler, "gradient scaler")
            with atomic_path(Path(output_dir) / SCALER_FILE) as tmp:
                tmp.write_text(text)

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(getattr(self, "accelerator", None), "scaler", None)
        if checkpoint is not None and scaler is not None and (Path(checkpoint) / SCALER_FILE).is_file():
            scaler.load_state_dict(json.loads((Path(checkpoint) / SCALER_FILE).read_text()))

    # -- random states -----------------------------------------------------------------------------------------
    def _save_rng_state(self, output_dir: str) -> None:
        version, mt, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors = {"torch_cpu": torch.random.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.random.get_rng_state_all())})
        header = {"python": [version, list(mt), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
        save_tensors(Path(output_dir) / _rng_file(self.args), tensors, header, "rng-state")

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = Path(checkpoint) / _rng_file(self.args)
        if not path.is_file():
            return  # as the Trainer does: the run resumes, without the same random draws
        tensors, header = load_tensors(path, "rng-state")
        try:
            version, mt, gauss = header["python"]
            kind, pos, has_gauss, cached = header["numpy"]
            random.setstate((version, tuple(mt), gauss))
            np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
            torch.random.set_rng_state(tensors["torch_cpu"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path} is broken ({type(exc).__name__}). Fix: resume from another checkpoint.") from exc
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.random.set_rng_state_all(cuda)

    # -- the model folder: training arguments as JSON ----------------------------------------------------------
    def _save(self, output_dir: str | None = None, *args: Any, **kwargs: Any) -> None:
        super()._save(output_dir, *args, **kwargs)  # type: ignore[misc]
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save and (folder / "training_args.bin").is_file():
            os.remove(folder / "training_args.bin")  # a pickle of the TrainingArguments: kept as JSON instead
            with atomic_path(folder / "training_args.json") as tmp:
                tmp.write_text(self.args.to_json_string())


def safe_trainer_class(base: type | None = None) -> type:
    """``base`` (default ``transformers.Trainer``) with ``SafeCheckpoints`` mixed in."""
    if base is None:
        from transformers import Trainer as base
    return type(f"Safe{base.__name__}", (SafeCheckpoints, base), {})
