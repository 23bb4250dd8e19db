"""Channel labels: which parameter slice every feature of every tensor of a graph comes from.

The data the structure analysis (``analysis.structure``) propagates. Every dimension of every parameter that a
linear op, an embedding or a pointwise op touches gets one *element* per index; ``Labels`` holds, for one
tensor of the graph, the element each position belongs to (``-1``: none) as a numpy array broadcastable to
the tensor (size 1 along dimensions the labels do not vary on). ``Elements`` is the union-find over elements
plus what must hold at the end: elements that may not be removed (``invalid``, with why) and sets of elements
that must end up in one unit (``same_unit``: reductions, normalisations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Elements", "Labels", "compress", "varying"]

MATERIALIZE_LIMIT = 50_000_000  # a label array larger than this is not followed (the unit is left alone)


class Elements:
    """Union-find over parameter-slice elements, with their owners and the end-of-analysis constraints."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.where: list[tuple[str, int, int]] = []  # element -> (tensor, dim, index)
        self.base: dict[tuple[str, int], int] = {}
        self.invalid: dict[int, str] = {}  # element -> why it may not be removed
        self.same_unit: list[tuple[np.ndarray, str]] = []  # (elements, why) that must form a single unit
        self.attention: set[int] = set()  # elements that pass through an attention op (heads)
        self.roles: dict[tuple[str, int], str] = {}  # (tensor, dim) -> "out" | "in" | "bias" (of a linear op)
        # (activation elements, parameter elements along one of its dims, why): resolved by ``settle_followers``
        self.followers: list[tuple[np.ndarray, np.ndarray, str]] = []
        # (activation elements, the shape of data without labels it meets, why): resolved by ``settle_followers``
        self.fixed_extents: list[tuple[np.ndarray, tuple[int, ...], str]] = []
        # (labels, outer axis, inner axis) of features split in two (``view(..., 2, -1)``): resolved by ``settle_splits``
        self.pending_splits: list[tuple[np.ndarray, int, int]] = []
        # roots of elements kept whole because every unit of another axis reads them (the state side of an outer
        # product, as a KV head every query head reads): never joined with a unit, so they do not stop it
        self.whole: set[int] = set()

    def of(self, tensor: str, dim: int, size: int) -> np.ndarray:
        """The elements of ``tensor`` along ``dim`` (created on first use)."""
        key = (tensor, dim)
        if key not in self.base:
            self.base[key] = len(self.parent)
            self.parent.extend(range(len(self.parent), len(self.parent) + size))
            self.where.extend((tensor, dim, i) for i in range(size))
        start = self.base[key]
        return np.arange(start, start + size, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union elementwise (broadcast) where both sides are labelled (never a kept-whole element with a unit)."""
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        keep = (a >= 0) & (b >= 0)
        whole = self.whole
        for x, y in {(int(x), int(y)) for x, y in zip(a[keep].ravel(), b[keep].ravel())}:
            rx, ry = self.find(x), self.find(y)
            if rx == ry or (whole and (rx in whole) != (ry in whole)):
                continue
            self.parent[max(rx, ry)] = min(rx, ry)
            if rx in whole:
                whole.add(min(rx, ry))

    def keep_whole(self, ids: np.ndarray, why: str) -> None:
        """``ids`` are never removed and never join a unit (``whole``)."""
        self.forbid(ids, why)
        self.whole.update(self.roots(ids))

    def union_along(self, ids: np.ndarray, axis: int) -> None:
        """Make all elements along ``axis`` one unit (a head from its head_dim channels)."""
        if ids.shape[axis] > 1:
            first = np.take(ids, [0], axis=axis)
            self.union(ids, first)

    def forbid(self, ids: np.ndarray, why: str) -> None:
        for x in np.unique(ids[ids >= 0]):
            self.invalid.setdefault(int(x), why)

    def roots(self, ids: np.ndarray) -> set[int]:
        return {self.find(int(x)) for x in np.unique(ids[ids >= 0])}

    def settle_splits(self) -> None:
        """Features split in two halves are two heads (each half one unit, as any split into heads) unless the halves
        were joined position by position outside any attention (a gated FFN, ``act(h[..., 0, :]) * h[..., 1, :]``:
        then each pair is a neuron of its own)."""
        attending = {self.find(e) for e in self.attention}
        for ids, outer, inner in self.pending_splits:
            first, second = (self.unit_roots(np.take(ids, [i], axis=outer)) for i in (0, 1))
            # two query heads reading one KV head are joined channel by channel too, through it: still heads
            if not np.array_equal(first, second) or attending & set(np.unique(first).tolist()):
                self.union_along(ids, inner)

    def settle_followers(self) -> None:
        """Once every unit is known: a parameter index that meets one unit only follows it (a per-head bias added
        after the head split, before the attention op joins each head's channels); one that meets several is shared,
        which is sound only where those units do not differ along that parameter's dimension (a norm weight over
        head_dim), else the activation's units may not be removed. Then the fixed extents: data of full width from an
        op the analysis does not follow (``fixed_extents``) forbids the units that vary along a dimension it spans,
        since a compact model could not cut that data with them."""
        for act, param, why in self.followers:
            a, b = np.broadcast_arrays(act, param)
            keep = (a >= 0) & (b >= 0)
            if not keep.any():
                continue
            unique, inverse = np.unique(a[keep], return_inverse=True)
            roots = np.array([self.find(int(x)) for x in unique], dtype=np.int64)[inverse.reshape(-1)]
            pairs = np.unique(np.stack([b[keep], roots]), axis=1)  # distinct (parameter element, unit root)
            if len(np.unique(pairs[0])) == pairs.shape[1]:  # every parameter element meets one unit
                for y, r in pairs.T:
                    self.union(np.array([y]), np.array([r]))
                continue
            dim = next((d for d in range(param.ndim) if param.shape[d] > 1), None)
            if dim is None:  # one entry broadcast everywhere (a scalar parameter): shared, never sliced
                continue
            full = np.full(a.shape, -1, dtype=np.int64)
            full[keep] = roots
            first = np.take(full, [0], axis=dim)
            if not np.array_equal(np.broadcast_to(first, full.shape)[keep], roots):
                self.forbid(a[keep], why)
        for act, extent, why in self.fixed_extents:
            if any(_units_vary(self.unit_roots(act), d) for d in range(act.ndim) if extent[d] > 1 and act.shape[d] > 1):
                self.forbid(act, why)

    def unit_roots(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` with every element replaced by the root of its unit (``-1`` stays)."""
        out = np.full(ids.shape, -1, dtype=np.int64)
        keep = ids >= 0
        unique, inverse = np.unique(ids[keep], return_inverse=True)
        out[keep] = np.array([self.find(int(x)) for x in unique], dtype=np.int64)[inverse.reshape(-1)]
        return out


def _units_vary(roots: np.ndarray, dim: int) -> bool:
    """Whether different units (or labelled and unlabelled positions) lie along ``dim``: cutting a unit shrinks it."""
    first = np.take(roots, [0], axis=dim)
    return not np.array_equal(np.broadcast_to(first, roots.shape), roots)


@dataclass
class Labels:
    """Elements of one tensor's positions; ``param``: it comes straight from a parameter (shared, not a unit)."""

    ids: np.ndarray
    param: bool = False

    def full(self, shape: tuple[int, ...]) -> np.ndarray:
        if int(np.prod(shape, dtype=np.int64)) > MATERIALIZE_LIMIT:
            raise OverflowError("label array too large")
        return np.broadcast_to(self.ids, shape)


def aligned(ids: np.ndarray, ndim: int) -> np.ndarray:
    """``ids`` with leading size-1 dimensions added up to ``ndim`` (numpy's broadcasting alignment, made explicit)."""
    return ids.reshape((1,) * (ndim - ids.ndim) + ids.shape)


def varying(ids: np.ndarray) -> list[int]:
    """Dimensions along which the labels change."""
    return [d for d in range(ids.ndim) if ids.shape[d] > 1]


def compress(ids: np.ndarray) -> np.ndarray:
    """The smallest broadcastable array equal to ``ids`` (size 1 where the labels do not vary)."""
    for d in range(ids.ndim):
        if ids.shape[d] > 1:
            first = np.take(ids, [0], axis=d)
            if np.array_equal(np.broadcast_to(first, ids.shape), ids):
                ids = first
    return np.ascontiguousarray(ids)
