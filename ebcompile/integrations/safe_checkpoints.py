"""``SafeCheckpoints``: ``transformers.Trainer`` checkpoints written and read as safetensors + JSON only.

Invariant: a checkpoint written by a Trainer with this mixin holds no pickle that is ever read (optimizer state
by parameter name in ``optimizer.safetensors``, the scheduler and scaler counters and the Python/NumPy random
states as JSON, the torch random states as safetensors, the training arguments as JSON), and resuming reads
none: a checkpoint folder that is incomplete or holds pickled weights or states is refused with
``CheckpointError`` before anything is loaded. So a resumed run takes the steps an uninterrupted one takes
(CPU and CUDA random states). DeepSpeed and FSDP shard their state in their own pickled formats: refused.
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
from ..persist.fsguard import read_json
from ..persist.io import atomic_path, load_tensors, save_tensors
from ..persist.optim_io import load_optimizer, save_optimizer

__all__ = ["OPTIMIZER_FILE", "SafeCheckpoints", "safe_trainer_class"]

OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE = "optimizer.safetensors", "scheduler.json", "scaler.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "optimizer.pt", "optimizer.bin", "scheduler.pt",
           "scaler.pt", "rng_state.pth")


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

    def _refuse_sharded(self) -> None:
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise ConfigError("SafeCheckpoints cannot save DeepSpeed or FSDP state: they shard it in their own pickled "
                              "formats. Fix: use the plain Trainer for those, or train with one process or DDP.")

    # -- saving ------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._refuse_sharded()
        self._pending_json = {}  # every JSON part made before any file is written: a bad state fails first
        if self.lr_scheduler is not None:
            self._pending_json[SCHEDULER_FILE] = _json_state(self.lr_scheduler, "learning-rate scheduler")
        scaler = getattr(getattr(self, "accelerator", None), "scaler", None)
        if scaler is not None:
            self._pending_json[SCALER_FILE] = _json_state(scaler, "gradient scaler")
        try:
            json.dumps(self.optimizer.state_dict()["param_groups"])
        except TypeError as exc:
            raise ConfigError(f"the optimizer's param groups are not plain numbers ({exc}). Fix: pass plain floats "
                              "(e.g. lr=1e-4, not a tensor), or use a plain Trainer.") from exc
        super()._save_checkpoint(model, trial)  # type: ignore[misc]

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.args.should_save:
            return
        save_optimizer(self.optimizer, self.model, Path(output_dir) / OPTIMIZER_FILE)
        self._write_pending(output_dir, SCHEDULER_FILE)

    def _save_scaler(self, output_dir: str) -> None:
        if self.args.should_save:
            self._write_pending(output_dir, SCALER_FILE)

    def _write_pending(self, output_dir: str, name: str) -> None:
        text = getattr(self, "_pending_json", {}).get(name)
        if text is not None:
            with atomic_path(Path(output_dir) / name) as tmp:
                tmp.write_text(text)

    def _save_rng_state(self, output_dir: str) -> None:
        version, mt, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors = {"torch_cpu": torch.random.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.random.get_rng_state_all())})
        header = {"python": [version, list(mt), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
        save_tensors(Path(output_dir) / _rng_file(self.args), tensors, header, "rng-state")

    def _save(self, output_dir: str | None = None, *args: Any, **kwargs: Any) -> None:
        super()._save(output_dir, *args, **kwargs)  # type: ignore[misc]
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save and (folder / "training_args.bin").is_file():
            os.remove(folder / "training_args.bin")  # the Trainer pickles its arguments here; never read: kept as JSON
            with atomic_path(folder / "training_args.json") as tmp:
                tmp.write_text(self.args.to_json_string())

    # -- resuming ----------------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self._refuse_sharded()
        self._check_checkpoint(Path(resume_from_checkpoint))  # before the weights or anything else is loaded
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    def _check_checkpoint(self, folder: Path) -> None:
        pickled = sorted(p.name for p in folder.glob("*") if p.name in PICKLED or p.name.startswith("rng_state_")
                         and p.suffix == ".pth")
        if pickled:
            raise CheckpointError(f"{folder} holds pickles ({', '.join(pickled)}), which ebcompile never loads. Fix: "
                                  "resume from a checkpoint written by a SafeCheckpoints trainer.")
        needed = ["trainer_state.json", OPTIMIZER_FILE] + ([SCHEDULER_FILE] if self.lr_scheduler is not None else [])
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing or not any(folder.glob("*model*.safetensors")):
            raise CheckpointError(f"{folder} is incomplete (no {', '.join(missing) or 'model weights'}): the run was "
                                  "stopped while writing it. Fix: remove it and resume from the checkpoint before it.")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        folder = Path(checkpoint)
        load_optimizer(self.optimizer, self.model, folder / OPTIMIZER_FILE)
        if self.lr_scheduler is not None:
            try:
                self.lr_scheduler.load_state_dict(read_json(folder / SCHEDULER_FILE))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise CheckpointError(f"{folder / SCHEDULER_FILE} is broken ({type(exc).__name__}). Fix: resume from "
                                      "another checkpoint.") from exc

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(getattr(self, "accelerator", None), "scaler", None)
        path = Path(checkpoint) / SCALER_FILE if checkpoint is not None else None
        if scaler is not None and path is not None and path.is_file():
            try:
                scaler.load_state_dict(read_json(path))
            except (ValueError, TypeError, KeyError, RuntimeError) as exc:
                raise CheckpointError(f"{path} is broken ({type(exc).__name__}). Fix: resume from another checkpoint.") from exc

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = Path(checkpoint) / _rng_file(self.args)
        if not path.is_file():
            return  # as the Trainer does: the run resumes, without the same random draws
        tensors, header = load_tensors(path, "rng-state")
        try:  # every state parsed before any is set
            version, mt, gauss = header["python"]
            kind, pos, has_gauss, cached = header["numpy"]
            python = (version, tuple(mt), gauss)
            numpy = (kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached)
            cpu = tensors["torch_cpu"]
            if cpu.dtype != torch.uint8 or cpu.numel() != torch.random.get_rng_state().numel():
                raise ValueError("torch_cpu is not a CPU generator state")
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path} is broken ({type(exc).__name__}). Fix: resume from another checkpoint.") from exc
        random.setstate(python)
        np.random.set_state(numpy)
        torch.random.set_rng_state(cpu)
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.random.set_rng_state_all(cuda)


def safe_trainer_class(base: type | None = None) -> type:
    """``base`` (default ``transformers.Trainer``) with ``SafeCheckpoints`` mixed in (``base`` itself if it has it)."""
    if base is None:
        from transformers import Trainer as base
    if issubclass(base, SafeCheckpoints):
        return base
    return type(f"Safe{base.__name__}", (SafeCheckpoints, base), {})
