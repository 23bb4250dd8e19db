"""Label handlers for ops that move features around without computing: views, permutes, slices, splits,
concatenation, repeats (``analysis.structure``). Registered into ``ophandlers.HANDLERS`` on import."""

from __future__ import annotations

import operator

import numpy as np
from torch import fx

from .labels import Labels, aligned, compress, varying
from .op_names import IDENTITY, PERMUTES, RESHAPES, SPLITS
from .ophandlers import Flow, _norm_dim, _out, aten_name, handler, shape, table_columns


@handler(*IDENTITY)
def _identity(flow: Flow, node: fx.Node):
    lab = flow.lab(node.args[0])
    out = shape(node)
    if not isinstance(lab, Labels) or out is None:
        return None
    ids = aligned(lab.ids, len(out))
    return Labels(ids, lab.param)


@handler("view_as_complex")
def _view_as_complex(flow: Flow, node: fx.Node):
    """Pairs of the last dimension as complex numbers (complex rotary embeddings, DeepSeek-V2): a pair inside one
    unit keeps its labels; labels that differ within a pair are refused."""
    lab, src = flow.lab(node.args[0]), shape(node.args[0])
    if not isinstance(lab, Labels) or src is None:
        return None
    ids = aligned(lab.ids, len(src))
    if ids.shape[-1] == 2:
        flow.el.union_along(ids, ids.ndim - 1)
    return Labels(ids[..., 0], lab.param)


@handler("view_as_real")
def _view_as_real(flow: Flow, node: fx.Node):
    lab = flow.lab(node.args[0])
    return Labels(lab.ids[..., None], lab.param) if isinstance(lab, Labels) else None


@handler("native_dropout")
def _native_dropout(flow: Flow, node: fx.Node):
    return [_identity(flow, node), None]


@handler(*RESHAPES, "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze")
def _reshape(flow: Flow, node: fx.Node):
    """Element order is kept: reshape the labels with the tensor. A labelled dimension split into several
    (features -> heads x head_dim) makes each slice along the innermost new one a single unit (a head); a split in
    two is settled once the halves' fate is known (``Elements.settle_splits``: Moshi's gated FFN)."""
    lab, src, dst = flow.lab(node.args[0]), shape(node.args[0]), shape(node)
    if not isinstance(lab, Labels) or src is None or dst is None:
        return None
    try:
        ids = np.array(lab.full(src)).reshape(dst)
    except OverflowError:
        flow.forbid(node.args[0], "too large to follow")
        return None
    ids = compress(ids)
    vary = varying(ids)
    if len(vary) > len(varying(lab.ids)) and not lab.param:
        if len(vary) > 1 and ids.shape[vary[-2]] == 2:  # two heads, or the two halves of a gated FFN: decided later
            flow.el.pending_splits.append((ids, vary[-2], vary[-1]))
        else:
            flow.el.union_along(ids, vary[-1])
    return Labels(ids, lab.param)


@handler(*PERMUTES, "movedim")
def _permute(flow: Flow, node: fx.Node):
    lab = flow.lab(node.args[0])
    if not isinstance(lab, Labels):
        return None
    nd = lab.ids.ndim
    name = node.target._opname
    if name == "permute":
        order = [_norm_dim(d, nd) for d in node.args[1]]
        return Labels(np.transpose(lab.ids, order), lab.param)
    if name == "t":
        return Labels(lab.ids.T, lab.param)
    if name == "movedim":
        return Labels(np.moveaxis(lab.ids, node.args[1], node.args[2]), lab.param)
    return Labels(np.swapaxes(lab.ids, node.args[1], node.args[2]), lab.param)


@handler("slice")
def _slice(flow: Flow, node: fx.Node):
    lab = flow.lab(node.args[0])
    if not isinstance(lab, Labels):
        return None
    ids = lab.ids
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, ids.ndim)
    if ids.shape[dim] == 1:
        return lab
    size = ids.shape[dim]
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    step = node.args[4] if len(node.args) > 4 else 1
    idx = range(*slice(start, end, step).indices(size))
    return _out(np.take(ids, list(idx), axis=dim), lab.param)


@handler("pad", "constant_pad_nd")
def _pad(flow: Flow, node: fx.Node):
    """Padding along dimensions the labels do not vary on keeps them (the relative-position shift of Conformer
    scores pads the key axis); constant padding along a labelled one adds unlabelled positions."""
    lab, out = flow.lab(node.args[0]), shape(node)
    if not isinstance(lab, Labels) or out is None:
        return None
    pads = list(node.args[1])
    ids = aligned(lab.ids, len(out))
    widths = [(0, 0)] * len(out)
    for i in range(0, len(pads), 2):
        widths[len(out) - 1 - i // 2] = (pads[i], pads[i + 1])
    padded = [d for d, w in enumerate(widths) if w != (0, 0) and ids.shape[d] > 1]
    if not padded:
        return Labels(ids, lab.param)
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    if node.target._opname == "pad" and mode != "constant" or any(min(widths[d]) < 0 for d in padded):
        flow.forbid(node.args[0], f"padded by {mode} along its features")
        return None
    return _out(np.pad(ids, [widths[d] if d in padded else (0, 0) for d in range(len(out))], constant_values=-1), lab.param)


@handler("roll")
def _roll(flow: Flow, node: fx.Node):
    """Shifting along dimensions the labels do not vary on (Swin's shifted windows over positions) keeps them."""
    lab = flow.lab(node.args[0])
    if not isinstance(lab, Labels):
        return None
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims", [])
    dims = [dims] if isinstance(dims, int) else list(dims)
    ids = lab.ids
    if not dims or any(ids.shape[_norm_dim(d, ids.ndim)] > 1 for d in dims if -ids.ndim <= d < ids.ndim):
        flow.forbid(node.args[0], "rolled along its features")
        return None
    return lab


@handler("select")
def _select(flow: Flow, node: fx.Node):
    lab = flow.lab(node.args[0])
    if not isinstance(lab, Labels):
        return None
    dim = _norm_dim(node.args[1], lab.ids.ndim)
    index = node.args[2] if lab.ids.shape[dim] > 1 else 0
    return _out(np.take(lab.ids, index, axis=dim), lab.param)


@handler(*SPLITS, "unsafe_split")
def _split(flow: Flow, node: fx.Node):
    lab = flow.lab(node.args[0])
    vals = node.meta.get("val")
    if not isinstance(lab, Labels) or not isinstance(vals, (list, tuple)):
        return None
    ids = lab.ids
    name = node.target._opname
    default = 0 if name == "unbind" else 0
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", default)
    if name == "unbind":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = _norm_dim(dim, ids.ndim)
    if ids.shape[dim] == 1:
        return [Labels(ids if name != "unbind" else np.squeeze(ids, dim), lab.param) for _ in vals]
    out, start = [], 0
    for v in vals:
        size = 1 if name == "unbind" else int(v.shape[dim])
        piece = np.take(ids, list(range(start, start + size)), axis=dim)
        out.append(_out(np.squeeze(piece, dim) if name == "unbind" else piece, lab.param))
        start += size
    return out


def _constant(node) -> np.ndarray | None:
    """The value of a small integer constant (``capture.CONSTANT``), through copies of it."""
    from ..capture.graph import CONSTANT

    while isinstance(node, fx.Node):
        if CONSTANT in node.meta:
            return node.meta[CONSTANT].numpy()
        if aten_name(node) not in (
                "lift_fresh_copy", "clone", "_to_copy", "detach", "detach_", "alias"):
            return None
        node = node.args[0]
    return None


def _rows_picked(lab: Labels, given: list, src: tuple[int, ...] | None, out: tuple[int, ...] | None) -> Labels | None:
    """``x[idx]`` with one index tensor along a dimension the labels do not vary on (a per-head table computed in
    the forward, Swin v2's ``cpb_mlp(coords).view(-1, heads)[relative_position_index]``): whatever the indices, every
    picked position keeps its row's labels; the indexed dimension becomes the index tensor's dimensions."""
    if len(given) != 1 or src is None or out is None or not isinstance(given[0][1], fx.Node) or shape(given[0][1]) is None:
        return None
    dim, index = given[0][0], shape(given[0][1])
    ids = aligned(lab.ids, len(src))
    if ids.ndim <= dim or ids.shape[dim] != 1:
        return None
    ids = ids.reshape(ids.shape[:dim] + (1,) * len(index) + ids.shape[dim + 1:])
    return Labels(ids, lab.param) if ids.ndim == len(out) else None


@handler("index")
def _index(flow: Flow, node: fx.Node):
    """``x[..., [i, j]]``: constant indices along one dimension pick those slices (any other indexing is refused).
    The indices are baked into the model's code, so that dimension must keep its size: its slices join one unit."""
    lab, indices = flow.lab(node.args[0]), node.args[1]
    table = flow.param_of.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
    picks = [d for d, i in enumerate(indices) if i is not None]
    if lab is None and table is not None and len(shape(node.args[0]) or ()) == 2 and len(picks) == 1 \
            and picks[0] in (0, 1) and shape(node) is not None:
        # rows of a 2-D parameter picked by an index tensor (a relative-position bias table, timm Swin / MaxViT),
        # or its columns (``bias.weight[:, buckets]``, LayoutLMv3): the other dimension's labels follow
        if picks[0] == 0:
            return table_columns(flow, table, shape(node.args[0])[1], node)
        rows = shape(node.args[0])[0]
        return Labels(flow.el.of(table, 0, rows).reshape((rows,) + (1,) * (len(shape(node)) - 1)))
    if not isinstance(lab, Labels):
        return None
    given = [(d, i) for d, i in enumerate(indices) if i is not None]
    picked = _rows_picked(lab, given, shape(node.args[0]), shape(node))
    if picked is not None:
        return picked
    value = _constant(given[0][1]) if len(given) == 1 else None
    if value is None or value.ndim != 1 or value.dtype.kind not in "iu":  # integer positions (not a boolean mask)
        flow.forbid(node.args[0], "indexed by tensors the analysis does not know")
        return None
    dim = given[0][0]
    if lab.ids.shape[dim] == 1:
        return _out(np.take(lab.ids, [0] * len(value), axis=dim), lab.param)
    flow.el.union_along(lab.ids, dim)
    return _out(np.take(lab.ids, value.tolist(), axis=dim), lab.param)


@handler("index_select")
def _index_select(flow: Flow, node: fx.Node):
    """``x.index_select(dim, idx)`` along a dimension the labels do not vary on: labels kept (a per-head table
    looked up at relative positions); along a labelled dimension it is refused."""
    lab, out = flow.lab(node.args[0]), shape(node)
    if not isinstance(lab, Labels) or out is None:
        return None
    ids = aligned(lab.ids, len(out))
    if ids.shape[_norm_dim(node.args[1], len(out))] > 1:
        flow.forbid(node.args[0], "indexed along its features by index_select")
        return None
    return Labels(ids, lab.param)


@handler("gather")
def _gather(flow: Flow, node: fx.Node):
    """``x.gather(dim, index)`` along a dimension the labels do not vary on (DeBERTa's relative-position scores
    gathered along the key axis, per head): each output position keeps its row's labels. Along a labelled
    dimension it is refused."""
    lab, out = flow.lab(node.args[0]), shape(node)
    if not isinstance(lab, Labels) or out is None:
        return None
    ids = aligned(lab.ids, len(out))
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(out))
    if ids.shape[dim] > 1 or any(ids.shape[d] > 1 and ids.shape[d] != out[d] for d in range(len(out)) if d != dim):
        flow.forbid(node.args[0], "gathered along its features")
        return None
    return Labels(ids, lab.param)


@handler("getitem")
def _getitem(flow: Flow, node: fx.Node):
    labs = flow.labels.get(node.args[0])
    if isinstance(labs, list) and isinstance(node.args[1], int) and node.args[1] < len(labs):
        return labs[node.args[1]]
    return None


@handler("cat", "concat", "concatenate")
def _cat(flow: Flow, node: fx.Node):
    tensors = node.args[0]
    if not any(isinstance(flow.lab(t), Labels) for t in tensors):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dst = shape(node)
    dim = _norm_dim(dim, len(dst))
    pieces, labs = [], []
    for t in tensors:
        s = shape(t)
        if len(s) != len(dst) and 0 in s:  # a legacy empty tensor (an empty cache): torch.cat skips it
            continue
        lab = flow.lab(t)
        if lab is None and len(s) == 1:  # a buffer beside labelled slices (EVA's zero k bias)
            lab = flow.buffer_labels(t, s[0])
        ids = lab.ids if isinstance(lab, Labels) else -np.ones((1,) * len(s), dtype=np.int64)
        labs += [lab] if isinstance(lab, Labels) else []
        full = list(dst)
        full[dim] = s[dim]
        pieces.append(np.broadcast_to(ids, full))
    acts = [p for p, t in zip(pieces, tensors) if isinstance(flow.lab(t), Labels) and not flow.lab(t).param]
    for p, t in zip(pieces, tensors):  # a per-unit parameter beside the units' activations (a head's attention sink
        if acts and isinstance(flow.lab(t), Labels) and flow.lab(t).param:  # logit): it follows the unit it meets
            flow.el.followers.append((np.take(acts[0], [0], axis=dim), np.take(p, [0], axis=dim),
                                      "its features are concatenated with a parameter shared across units"))
    return _out(np.concatenate(pieces, axis=dim), all(lab.param for lab in labs))  # a cat of parameters is one


@handler("stack")
def _stack(flow: Flow, node: fx.Node):
    """``stack(tensors, dim)``: a new axis at ``dim`` indexes the inputs; each input keeps its labels along the others
    (GPT-J's rotate_every_two stacks the two halves of each rotary pair)."""
    tensors = node.args[0]
    labs = [flow.lab(t) for t in tensors]
    if not any(isinstance(lab, Labels) for lab in labs):
        return None
    dst = shape(node)
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(dst))
    ndim = len(dst) - 1
    padded = [aligned(lab.ids, ndim) if isinstance(lab, Labels) else None
              for lab in labs]
    common = np.broadcast_shapes(*[ids.shape for ids in padded if ids is not None])
    pieces = [np.broadcast_to(ids if ids is not None else -np.ones((1,) * ndim, dtype=np.int64), common) for ids in padded]
    return _out(np.stack(pieces, axis=dim), all(lab.param for lab in labs if isinstance(lab, Labels)))


@handler("repeat_interleave")
def _repeat_interleave(flow: Flow, node: fx.Node):
    lab = flow.lab(node.args[0])
    if not isinstance(lab, Labels) or not isinstance(node.args[1], int):
        flow.forbid(node.args[0], "repeated by a tensor of counts")
        return None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None:
        flow.forbid(node.args[0], "flattened by repeat_interleave")
        return None
    dim = _norm_dim(dim, lab.ids.ndim)
    if lab.ids.shape[dim] == 1:
        return lab
    return Labels(np.repeat(lab.ids, node.args[1], axis=dim), lab.param)


@handler("repeat")
def _repeat(flow: Flow, node: fx.Node):
    lab, src = flow.lab(node.args[0]), shape(node.args[0])
    if not isinstance(lab, Labels):
        return None
    reps = list(node.args[1])
    ids = np.broadcast_to(lab.ids, src)
    ids = aligned(ids, len(reps))
    return Labels(compress(np.tile(ids, reps)), lab.param)


HANDLER_FUNCTIONS = {operator.getitem: "getitem"}


# -- a buffer filled in place: ``new_empty`` then ``buf[..., a:b] = x`` (DeepSeek's latent attention key) ----------
FILLS = ("new_empty", "new_zeros", "new_ones", "new_full", "empty_like", "zeros_like", "ones_like", "full_like")


@handler(*FILLS)
def _fill(flow: Flow, node: fx.Node):
    """A fresh tensor shaped (or typed) like its input: nothing labelled, and the input's features stay free."""
    return None


def _region(node: fx.Node) -> tuple[fx.Node, list[tuple[str, tuple]]] | None:
    """``node`` as a chain of ``slice`` / ``select`` views of a base tensor: the base and the chain, outermost first."""
    chain = []
    while isinstance(node, fx.Node) and aten_name(node) in ("slice", "select"):
        chain.append((aten_name(node), tuple(node.args[1:])))
        node = node.args[0]
    return (node, chain[::-1]) if chain and isinstance(node, fx.Node) else None


@handler("copy_")
def _copy_(flow: Flow, node: fx.Node):
    """``dst.copy_(src)`` where ``dst`` is a slice of a buffer: the buffer's labels get ``src``'s at that region
    (later readers of the buffer see them); anything else keeps ``src``'s features whole."""
    dst, src = node.args[0], node.args[1]
    lab, found = flow.lab(src), _region(dst)
    base_shape = shape(found[0]) if found else None
    if not isinstance(lab, Labels) or base_shape is None or isinstance(flow.lab(found[0]), list):
        flow.forbid(src, "copied into a tensor the analysis does not follow")
        return None
    base, chain = found
    old = flow.lab(base)
    try:
        ids = np.array(old.full(base_shape)) if isinstance(old, Labels) else -np.ones(base_shape, dtype=np.int64)
        view = ids
        for op, args in chain:
            dim = _norm_dim(args[0] if args else 0, view.ndim)
            if op == "select":
                view = view[(slice(None),) * dim + (args[1],)]
            else:  # slice(dim, start, end, step): numpy clips the ends as torch does
                view = view[(slice(None),) * dim + (slice(*(list(args[1:4]) + [None] * 3)[:3]),)]
        view[...] = np.broadcast_to(aligned(lab.ids, view.ndim), view.shape)
    except (OverflowError, ValueError, IndexError):
        flow.forbid(src, "copied into a tensor the analysis does not follow")
        return None
    flow.labels[base] = _out(ids)
    return _out(np.array(view))
