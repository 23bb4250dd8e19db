"""Training across processes (DDP, FSDP2, Accelerate / the HF Trainer): the few collective steps the search needs.

Invariants:
- In a single process (no ``torch.distributed`` process group) every function here returns at once and
  communicates nothing: the one-process path is the plain path.
- Scores are computed from each rank's local shard and only small vectors cross processes (per-unit scores,
  per-tensor counts, digests). The one exception, documented: unstructured masks under FSDP2, whose kept bits
  are gathered (one byte per weight, a quarter of an fp32 weight) because every rank holds the whole mask.
- Sharded parameters (FSDP2 DTensors) are read and written through their local shard only.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DistributedError
from ..persist.materialized import require_values

__all__ = ["world", "is_main", "is_sharded", "full_vector", "local_part", "local_tensor", "shard_rows", "mask_", "masked",
           "copy_", "collective_ints", "check_same", "all_finite", "full_state_dict", "load_full_state_dict",
           "unwrap"]

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - older torch has no FSDP2
    DTensor = ()  # type: ignore[assignment,misc]


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on the process that writes files (global rank 0), and in a single process."""
    return world()[0] == 0


def is_sharded(t: Any) -> bool:
    return isinstance(t, DTensor)


def full_vector(t: torch.Tensor) -> torch.Tensor:
    """A small reduced tensor (per-unit scores, per-index sums) as a plain tensor on every rank."""
    return t.full_tensor() if is_sharded(t) else t


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The piece of the whole tensor ``full`` that this rank's shard of ``like`` holds (``full`` itself when
    ``like`` is not sharded). Every rank holds ``full``: nothing is communicated."""
    if not is_sharded(like):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def mask_(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """``weight *= mask`` in place, on the local shard when ``weight`` is sharded (runs after every optimizer step
    of a frozen ticket: the plain path is the one multiply it always was)."""
    if not is_sharded(weight):
        weight.mul_(mask)
        return
    weight.to_local().mul_(local_part(mask, weight))


def masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight * mask`` (a new tensor), sharded like ``weight``."""
    if not is_sharded(weight):
        return weight * mask
    return weight * distribute_tensor(mask.to(weight.device), weight.device_mesh, weight.placements, src_data_rank=None)


def copy_(target: torch.Tensor, full: torch.Tensor) -> None:
    """``target[...] = full`` in place, on the local shard when ``target`` is sharded."""
    local = target.to_local() if is_sharded(target) else target
    local.copy_(local_part(full, target))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t


def collective_ints(values: list[int]) -> torch.Tensor:
    """Small integers as a tensor on the device the process group's backend communicates from."""
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return torch.tensor(values, dtype=torch.int64, device=device)


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``. A NaN or inf makes the sum non-finite, so a finite sum settles it in one read (an
    EarlyBird check spent half its time in ``isfinite(t).all()``); a sum that overflows is checked element-wise."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def all_finite(tensors: list[torch.Tensor], reduce: bool = True) -> list[bool]:
    """For each tensor: no NaN or inf in it, on any rank (one small all-reduce, so that every rank decides alike;
    ``reduce=False``: this rank's view only, unless the tensors are sharded)."""
    require_values(tensors, "EarlyBird.check (masks are drawn from weight values)")
    flags = [_finite(local_tensor(t)) if t.is_floating_point() else True for t in tensors]
    if world()[1] == 1 or not (reduce or any(is_sharded(t) for t in tensors)):
        return flags
    t = collective_ints([int(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def check_same(what: str, data: bytes, fix: str) -> None:
    """Raise ``DistributedError`` on every rank unless every rank passed the same ``data`` (compared by digest)."""
    rank, size = world()
    if size == 1:
        return
    digest = zlib.crc32(data) ^ (len(data) << 32)
    mine = collective_ints([digest])
    gathered = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine)
    digests = [int(g.item()) for g in gathered]
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise DistributedError(f"ranks disagree on {what}: ranks {differ} differ from rank 0 (seen on rank {rank}). {fix}")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered whole, on the CPU, on every rank (a collective:
    call it on every rank). With it, ``compact`` and ``ebcompile.save`` run on an unsharded copy of the model."""
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors (``full_state_dict`` or a saved file) into a prepared model, sharded or not: each rank
    copies its own shard. Keys are the model's ``state_dict`` keys; masks (``*_mask``) are loaded too."""
    from torch.nn.utils import parametrize

    from ..names import MASK_SUFFIX, split_name

    if not any(is_sharded(p) for p in model.parameters()):
        model.load_state_dict(state, strict=False)
        return
    with torch.no_grad():
        for key, value in state.items():
            owner, attr = split_name(key)
            module = model.get_submodule(owner)
            if attr.endswith(MASK_SUFFIX) and parametrize.is_parametrized(module, attr[: -len(MASK_SUFFIX)]):
                module.parametrizations[attr[: -len(MASK_SUFFIX)]][0].set(value)
                continue
            target = module.parametrizations[attr].original if parametrize.is_parametrized(module, attr) else getattr(module, attr)
            copy_(target, value.to(target.dtype))


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (FSDP2 keeps the model itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def shard_rows(t: torch.Tensor) -> tuple[int, int] | None:
    """(first row, rows) of the global tensor that this rank's shard holds, when ``t`` is sharded on dim 0 only
    (FSDP2's layout); None for a plain tensor. Other layouts raise ``DistributedError``."""
    if not is_sharded(t) or not any(isinstance(p, Shard) for p in t.placements):
        return None  # whole on every rank
    if any(isinstance(p, Shard) and p.dim != 0 for p in t.placements):
        raise DistributedError(f"a tensor sharded as {t.placements} is not supported for unstructured masks. "
                               "Fix: shard parameters on dim 0 (fully_shard's default) or use structure='structured'.")
    rows = torch.arange(t.shape[0], device=t.to_local().device)
    local = local_part(rows, t)
    return (int(local[0]) if local.numel() else 0, local.numel())
