"""Unstructured magnitude masks when weights are sharded across processes (FSDP2 DTensors).

Invariant: the masks equal what one process holding the whole weights would draw: the k smallest magnitudes
(per tensor, or over all tensors for ``scope="global"``) are dropped, ties at the threshold dropped in position
order. The k-th smallest magnitude is found by a radix select over the float bits: 31 all-reduces of one count
per ranking, never the weights themselves. Only the kept bits are then gathered, since every rank holds the
whole mask buffer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DistributedError
from .distributed import DTensor, collective_ints, local_tensor, shard_rows, world
from .scoring import raw_tensor

__all__ = ["unstructured_sharded"]


def unstructured_sharded(model: nn.Module, names: list[str], ratio: float, scope: str,
                         scores: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The keep-mask of each name (``importance.Masks.tensors``). ``scores``: one non-negative tensor per name,
    sharded like its weight (default: the weights' magnitudes)."""
    raws = scores if scores is not None else [raw_tensor(model, n) for n in names]
    rank, size = world()
    for r in raws:  # ties are dropped in rank order, which is row order only on a 1-D mesh over every rank in order
        if isinstance(r, DTensor) and (r.device_mesh.ndim != 1 or r.device_mesh.mesh.flatten().tolist() != list(range(size))):
            raise DistributedError("unstructured masks support a 1-D device mesh over every rank in order (FSDP2 "
                                   "fully_shard's default). Fix: use structure='structured', or shard over one mesh dimension.")
    rows = [shard_rows(r) for r in raws]
    # magnitudes as int32 bits (non-negative floats order like their bits); replicated tensors count on rank 0 only
    bits = [local_tensor(r).detach().abs().float().flatten().view(torch.int32) for r in raws]
    owned = [row is not None or rank == 0 for row in rows]
    rankings = [list(range(len(raws)))] if scope == "global" else [[i] for i in range(len(raws))]
    ks = [round(ratio * sum(raws[i].numel() for i in s)) for s in rankings]
    thresholds = _kth_smallest(bits, owned, rankings, ks)

    cut = [thresholds[0 if scope == "global" else i] for i in range(len(bits))]  # each tensor's ranking threshold
    less = [int((b < t).sum()) if owned[i] else 0 for i, (b, t) in enumerate(zip(bits, cut))]
    ties = [int((b == t).sum()) if owned[i] else 0 for i, (b, t) in enumerate(zip(bits, cut))]
    less_all = _all_reduce(less)
    ties_by_rank = _all_gather(ties, size)  # [rank][tensor]
    masks: dict[str, torch.Tensor] = {}
    for s, k, t in zip(rankings, ks, thresholds):
        need = k - sum(less_all[i] for i in s)  # ties to drop, in position order: tensor, then shard (rank)
        before = 0
        for i in s:
            mine = before + (sum(ties_by_rank[r][i] for r in range(rank)) if rows[i] is not None else 0)
            drop_here = max(0, min(need - mine, ties_by_rank[rank if rows[i] is not None else 0][i]))
            before += sum(ties_by_rank[r][i] for r in range(size)) if rows[i] is not None else ties_by_rank[0][i]
            b = bits[i]
            eq = b == t
            keep = (b > t) | (eq & (eq.cumsum(0) > drop_here)) if k > 0 else torch.ones_like(b, dtype=torch.bool)
            masks[names[i]] = _whole(keep, raws[i])
    return masks


def _kth_smallest(bits: list[torch.Tensor], owned: list[bool], rankings: list[list[int]], ks: list[int]) -> list[int]:
    """For each ranking, the int bits of its k-th smallest magnitude over all ranks (radix select, MSB first)."""
    prefix = [0] * len(rankings)
    for bit in range(30, -1, -1):
        cand = [p | (1 << bit) for p in prefix]
        counts = _all_reduce([sum(int((bits[i] < c).sum()) for i in s if owned[i]) for s, c in zip(rankings, cand)])
        prefix = [p if n >= k else c for p, c, n, k in zip(prefix, cand, counts, ks)]
    return prefix


def _all_reduce(values: list[int]) -> list[int]:
    t = collective_ints(values)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def _all_gather(values: list[int], size: int) -> list[list[int]]:
    mine = collective_ints(values)
    out = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(out, mine)
    return [[int(v) for v in o.tolist()] for o in out]


def _whole(keep_local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole keep-mask on every rank from each rank's local piece (gathered as bytes)."""
    if not isinstance(like, DTensor):
        return keep_local.reshape(like.shape)
    local = keep_local.to(torch.uint8).reshape(like.to_local().shape)
    whole = DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                               stride=like.stride()).full_tensor()
    return whole.bool()
