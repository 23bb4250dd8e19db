"""Analysis: which original feature indices every dimension of every tensor of a traced module carries.

Runs a ``torch.fx.symbolic_trace`` of one module (an ``fx.Interpreter`` on real inputs) after some of its
linears lost output rows: each linear's output feature dim carries the kept rows (a bool array over the
original rows), and the arrays follow the values through views and reshapes (dims matched in groups of equal
products; a head split must stay a rectangle of kept heads x kept channels), permutes, splits, chunks and
slices, matmuls, attention and pointwise ops. Batch and sequence dims carry nothing (``None``). Writes
``node.meta["ebcompile.features"]``; ``shape_changes`` reads it and says which size arguments of which shape
ops must change for the compact weights (``transforms.reshapes`` applies them).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..adapters import is_tuner_layer
from .op_names import PERMUTES, SIZED_VIEWS, SPLITS, op_name

__all__ = ["FollowFeatures", "Irregular", "Outer", "shape_changes", "size_args", "META", "output_dims", "kept_part"]

META = "ebcompile.features"

Dims = tuple  # per dimension of a tensor: a bool array over its original indices (a feature dim), or None


class Irregular(Exception):
    """The kept features of a dimension cannot be laid out as a smaller dense tensor."""


def _reshape(dims: Dims, old: tuple[int, ...], new: tuple[int, ...]) -> Dims:
    """Masks of a view from ``old`` to ``new``: dims are matched in groups of equal products."""
    out: list[np.ndarray | None] = [None] * len(new)
    i = j = 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
            i += 1
            continue
        if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            j += 1
            continue
        gi, gj = [i], [j]
        a, b = old[i], new[j]
        while a != b:
            if a < b:
                i += 1
                gi.append(i)
                a *= old[i]
            else:
                j += 1
                gj.append(j)
                b *= new[j]
        i, j = i + 1, j + 1
        masks = [dims[k] for k in gi]
        if all(m is None for m in masks):
            continue  # a batch or sequence dimension stays dynamic
        for k, m in zip(gj, _regroup(masks, [new[k] for k in gj])):
            out[k] = m
    return tuple(out)


class Outer:
    """A dimension that is a dynamic size (batch, sequence) times features, the features inner: ``reshape(B * H,
    T, D)`` of ``[B, H, T, D]`` (attention with the heads folded into the batch). ``mask``: the kept features."""

    __slots__ = ("mask",)

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask


def _regroup(masks: list[Any], sizes: list[int]) -> list[Any]:
    """The masks of the new dims (``sizes``) of one view group whose old dims carry ``masks``: dynamic dims
    (``None``, an ``Outer``'s dynamic part) first, then features; the features go to the innermost new dims whose
    sizes they fill, a new dim that mixes both becomes an ``Outer``. Irregular when the kept features are no rectangle."""
    lead = 0
    while lead < len(masks) and masks[lead] is None:
        lead += 1
    feats = [m.mask if isinstance(m, Outer) else m for m in masks[lead:]]
    dynamic = lead > 0 or isinstance(masks[lead], Outer)
    if any(m is None or isinstance(m, Outer) for m in masks[lead + 1:]):
        return [None] * len(sizes)  # features then a dynamic dim: not followed, the size stays as it is
    full = functools.reduce(np.logical_and.outer, feats)
    total, inner, k = full.size, 1, len(sizes)
    if dynamic:  # the innermost new dims the features fill; the one they fill in part mixes them with the dynamic size
        while k > 0 and inner * sizes[k - 1] <= total and total % (inner * sizes[k - 1]) == 0:
            inner *= sizes[k - 1]
            k -= 1
        if inner == total and k == 0 and sizes[0] != total:
            raise Irregular("a view of a dynamic size by features")
        if inner < total and k > 0 and sizes[k - 1] % (total // inner):
            raise Irregular(f"a view to {sizes} that splits features from a dynamic size")
        shape = ([total // inner] if inner < total else []) + sizes[k:]
        if inner < total and k == 0:
            raise Irregular(f"a view to {sizes} that splits a dynamic size")
    else:
        shape = sizes
    full = full.reshape(shape)
    parts = [full.any(axis=tuple(x for x in range(len(shape)) if x != p)) for p in range(len(shape))]
    if not np.array_equal(full, functools.reduce(np.logical_and.outer, parts)):
        raise Irregular(f"view to {sizes}")
    if not dynamic:
        return parts
    if inner < total:  # new dim k - 1 holds the dynamic size times the outer part of the features
        return [None] * (k - 1) + [Outer(parts[0])] + parts[1:]
    return [None] * k + parts


def _entries(index: tuple, ndim: int) -> list[tuple[Any, int | None]]:
    """Each entry of a tensor index with the input dimension it reads (None for ``None``/``...``)."""
    used = sum(1 for x in index if x is not None and x is not Ellipsis)
    out, d = [], 0
    for x in index:
        if x is Ellipsis:
            out.append((x, None))
            d += ndim - used
        elif x is None:
            out.append((x, None))
        else:
            out.append((x, d))
            d += 1
    return out


def _index(dims: Dims, index: Any, ndim: int) -> Dims:
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(x, (torch.Tensor, list)) for x in index):
        raise Irregular("tensor index")
    out, d = [], 0
    for x, dim in _entries(index, ndim):
        if x is Ellipsis:
            used = sum(1 for y in index if y is not None and y is not Ellipsis)
            out.extend(dims[d:d + ndim - used])
            d += ndim - used
        elif x is None:
            out.append(None)
        elif isinstance(x, slice):
            out.append(None if dims[dim] is None else dims[dim][x])
            d = dim + 1
        else:
            d = dim + 1
    return tuple(out) + tuple(dims[d:])


class FollowFeatures(fx.Interpreter):
    """Runs a traced module and records, per node, its value and the original feature indices of its dims."""

    def __init__(self, gm: fx.GraphModule, rows: dict[str, np.ndarray]) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.rows = rows  # submodule path -> kept output rows
        self.dims: dict[fx.Node, Any] = {}
        self.values: dict[fx.Node, Any] = {}

    def placeholder(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if str(target).startswith("**"):  # the forward's ``**kwargs``: the dict ``reshapes._inputs`` passes last
            return next(self.args_iter, {})
        return super().placeholder(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        self.dims[n] = n.meta[META] = self._follow(n, out)
        return out

    def concrete(self, arg: Any) -> Any:
        """``arg`` with the values its nodes took in this run."""
        return fx.node.map_arg(arg, lambda a: self.values[a])

    def _arg(self, a: Any) -> Any:
        return self.dims.get(a) if isinstance(a, fx.Node) else None

    def _follow(self, n: fx.Node, out: Any) -> Any:
        op, args = op_name(n), n.args
        if isinstance(out, (tuple, list)) and op not in SPLITS:
            return [(None,) * o.dim() if isinstance(o, torch.Tensor) else None for o in out]
        if not isinstance(out, (torch.Tensor, tuple, list)):
            return None
        if n.op in ("placeholder", "get_attr"):
            return (None,) * out.dim() if isinstance(out, torch.Tensor) else None
        src = self._arg(args[0]) if args else None
        x = self.values.get(args[0]) if args and isinstance(args[0], fx.Node) else None
        if n.op == "call_module":
            called = self.module.get_submodule(n.target)
            key = f"{n.target}.base_layer" if is_tuner_layer(called) else n.target  # LoRA: its base layer's rows
            if key in self.rows:
                return (*(src or (None,) * out.dim())[:-1], self.rows[key])
            if isinstance(called, nn.Linear) or (is_tuner_layer(called) and isinstance(called.base_layer, nn.Linear)):
                return (*(src or (None,) * out.dim())[:-1], np.ones(out.shape[-1], dtype=bool))
        if op == "linear":  # F.linear(x, module.weight, ...) in the forward itself (timm EVA's q|k|v with a built bias)
            w = args[1] if len(args) > 1 else n.kwargs.get("weight")
            owner = _weight_owner(w)
            if owner in self.rows:
                return (*(src or (None,) * out.dim())[:-1], self.rows[owner])
        if op in SIZED_VIEWS | {"flatten", "unflatten", "view_as", "reshape_as"} and src is not None and op != "expand":
            return _reshape(src, tuple(x.shape), tuple(out.shape))
        if op in PERMUTES | SPLITS:
            args = self.concrete(args)  # dims computed at run time
        if op in PERMUTES and src is not None:
            if op == "permute":
                order = args[1] if isinstance(args[1], (tuple, list)) else args[1:]
            else:
                order = list(range(x.dim()))
                a, b = (args[1], args[2]) if op != "t" else (0, 1)
                order[a], order[b] = order[b], order[a]
            return tuple(src[int(k)] for k in order)
        if op in SPLITS and src is not None:
            dim = self.concrete(n.kwargs).get("dim", args[2] if len(args) > 2 else 0) if op != "unbind" else (args[1] if len(args) > 1 else 0)
            dim %= x.dim()
            if op == "unbind":
                return [src[:dim] + src[dim + 1:] for _ in out]
            pieces, start = [], 0
            for o in out:
                m = src[dim]
                pieces.append(src[:dim] + (None if m is None else m[start:start + o.shape[dim]],) + src[dim + 1:])
                start += o.shape[dim]
            return pieces
        if op == "getitem":
            if isinstance(x, (tuple, list)):
                got = self.dims.get(args[0])
                return got[args[1]] if isinstance(got, list) else None
            return _index(src, self.concrete(args[1]), x.dim()) if src is not None else None
        if op in ("matmul", "bmm") and src is not None:
            other = self._arg(args[1]) or (None,) * out.dim()
            return (*src[:-2], src[-2], other[-1])
        if op == "stack" and isinstance(args[0], (tuple, list)):  # a new dim of static size: every position kept
            ins = [self._arg(a) for a in args[0]]
            if ins and all(d is not None and _same_dims(d, ins[0]) for d in ins):
                dim = self.concrete(n.kwargs).get("dim", args[1] if len(args) > 1 else 0) % out.dim()
                return (*ins[0][:dim], np.ones(out.shape[dim], dtype=bool), *ins[0][dim:])
            return (None,) * out.dim()
        if op == "scaled_dot_product_attention" and src is not None:
            v = self._arg(args[2]) or (None,) * out.dim()
            return (*src[:-1], v[-1])
        return self._pointwise(n, out) if isinstance(out, torch.Tensor) else None

    def _pointwise(self, n: fx.Node, out: torch.Tensor) -> Dims:
        """Each output dim takes the mask of an input dim of the same size, aligned from the right."""
        ins = [(self.values[a], self.dims[a]) for a in n.all_input_nodes if isinstance(self.values.get(a), torch.Tensor)]
        dims: list[np.ndarray | None] = []
        for k in range(out.dim()):
            back = out.dim() - k
            masks = [d[-back] for v, d in ins if d is not None and v.dim() >= back and d[-back] is not None
                     and v.shape[-back] == out.shape[k]]
            dims.append(masks[0] if masks else None)
        return tuple(dims)


def _same_dims(a: Dims, b: Dims) -> bool:
    return len(a) == len(b) and all((x is None and y is None) or (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
                                    and np.array_equal(x, y)) for x, y in zip(a, b))


def _weight_owner(w: Any) -> str | None:
    """The module whose weight node ``w`` reads: ``get_attr`` of ``<owner>.weight``, or its mask's parametrization
    (``call_module`` of ``<owner>.parametrizations.weight``)."""
    if isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target).endswith(".weight"):
        return str(w.target).rpartition(".")[0]
    if isinstance(w, fx.Node) and w.op == "call_module" and str(w.target).endswith(".parametrizations.weight"):
        return str(w.target)[: -len(".parametrizations.weight")]
    return None


def output_dims(follow: FollowFeatures) -> list[Any]:
    """The feature dims of each tensor the traced module returned (``None``: not followed), in the order
    ``verify.relative_error`` flattens an output (tuples, lists and dict values, depth first)."""
    found: list[Any] = []

    def walk(a: Any, value: Any, dims: Any) -> None:
        if isinstance(a, fx.Node):
            value, dims = follow.values.get(a), follow.dims.get(a)
            a = None
        if isinstance(value, torch.Tensor):
            found.append(dims if isinstance(dims, tuple) else None)
        elif isinstance(value, (tuple, list, dict)):
            items = list(value.values()) if isinstance(value, dict) else list(value)
            args = list(a.values()) if isinstance(a, dict) else list(a) if isinstance(a, (tuple, list)) else []
            for k, v in enumerate(items):
                walk(args[k] if len(args) == len(items) else None, v,
                     dims[k] if isinstance(dims, list) and len(dims) == len(items) else None)

    out = next(n for n in follow.module.graph.nodes if n.op == "output")
    walk(out.args[0], follow.concrete(out.args[0]), None)
    return found


def kept_part(t: torch.Tensor, dims: Any) -> torch.Tensor:
    """``t`` (of the original sizes) restricted to the kept features of each of its feature dims."""
    for k, m in enumerate(dims or ()):
        if isinstance(m, np.ndarray) and k < t.dim() and len(m) == t.shape[k] and not m.all():
            t = t.index_select(k, torch.from_numpy(np.flatnonzero(m)).to(t.device))
    return t


def size_args(n: fx.Node) -> tuple[list[Any], bool]:
    """The size arguments of a view/reshape/expand node, and whether they are passed as one tuple."""
    if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)):
        return list(n.args[1]), True
    return list(n.args[1:]), False


def shape_changes(follow: FollowFeatures) -> dict[str, dict[str, Any]]:
    """Node name -> the new size arguments of every shape op on feature dims whose sizes change (JSON data)."""
    changes: dict[str, dict[str, Any]] = {}
    for n, dims in follow.dims.items():
        op, out = op_name(n), follow.values[n]
        if op in SIZED_VIEWS and isinstance(out, torch.Tensor) and dims is not None:
            sizes, _ = size_args(n)
            if len(sizes) == 1 and isinstance(follow.values.get(sizes[0]), (tuple, list)):
                sizes = list(follow.values[sizes[0]])  # one computed shape (``x.size()[:-2] + (self.embed_dim,)``)
            if len(sizes) != out.dim():
                continue
            new = [_new_size(m, s) for m, s in zip(dims, sizes)]
            if any(v is not None and (not isinstance(s, int) or v != s) for v, s in zip(new, sizes)):
                changes[n.name] = {"sizes": new}
        elif op in SPLITS - {"unbind", "tensor_split"} and isinstance(dims, list):
            dim = _split_dim(n, follow)
            old = [int(o.shape[dim]) for o in out]
            new = [_kept(d, dim, s) for d, s in zip(dims, old)]
            if new != old:
                changes[n.name] = {"split": new}
        elif op == "getitem" and isinstance(follow.values.get(n.args[0]), torch.Tensor):
            src = follow.dims.get(n.args[0])
            index = follow.concrete(n.args[1])
            index = index if isinstance(index, tuple) else (index,)
            if src is None:
                continue
            new_index: dict[str, list[int]] = {}
            for k, (x, dim) in enumerate(_entries(index, len(src))):
                if isinstance(x, slice) and dim is not None and src[dim] is not None:
                    start, stop, step = x.indices(len(src[dim]))
                    if step != 1 and bool(np.all(src[dim])):  # every feature kept (a head's width): unchanged
                        continue
                    if step != 1:  # (rotary's x[..., ::2] over heads x head_dim): the same stride over the kept features
                        new_index[str(k)] = _strided(src[dim], start, stop, step)
                        continue
                    bounds = [int(src[dim][:start].sum()), int(src[dim][:stop].sum())]
                    if bounds != [start, stop]:
                        new_index[str(k)] = bounds
            if new_index:
                changes[n.name] = {"slices": new_index}
    return changes


def _new_size(m: Any, s: Any) -> int | list[int] | None:
    """A view's new size argument for a dim carrying ``m``: ``None`` (unchanged: dynamic, or ``-1``), the kept count
    for a literal size, or ``[kept, total]`` for a size computed at run time (scaled by that there: it may hold a
    dynamic factor the example does not show, e.g. a batch of one folded with the heads)."""
    if m is None or (isinstance(s, int) and s == -1):
        return None
    mask = m.mask if isinstance(m, Outer) else m
    kept, total = int(mask.sum()), len(mask)
    if isinstance(s, int):
        return s * kept // total if isinstance(m, Outer) else kept
    # a size computed at run time (``bsz * self.num_heads``; with a batch of one in the example it equals the heads)
    return None if kept == total else [kept, total]


def _strided(kept: np.ndarray, start: int, stop: int, step: int) -> list[int]:
    """Bounds of the slice of the kept features that takes what ``start:stop:step`` took of the original ones."""
    picked = np.flatnonzero(np.isin(np.flatnonzero(kept), np.arange(start, stop, step)))
    if step < 1 or not len(picked) or not np.array_equal(picked, np.arange(picked[0], picked[-1] + 1, step)):
        raise Irregular("strided slice of a pruned dimension")
    return [int(picked[0]), int(picked[-1]) + 1, step]


def _split_dim(n: fx.Node, follow: FollowFeatures) -> int:
    dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
    return dim % follow.values[n.args[0]].dim()


def _kept(dims: Dims, dim: int, old: int) -> int:
    return old if dims[dim] is None else int(dims[dim].sum())
