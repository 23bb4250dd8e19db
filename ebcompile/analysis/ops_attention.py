"""Label handlers for products of two activations: ``matmul``/``bmm``/``addmm`` (eager attention: scores = q @ k^T,
out = probs @ v) and ``scaled_dot_product_attention`` (``analysis.structure``).

A contracted labelled dimension ties each position of one side to the same position of the other (q's head
channels to k's) and makes the contracted slice one unit; labelled batch dimensions (the head axis) are tied
across the two sides — which, when one side repeats its heads (grouped-query attention), joins the query
heads of a group to their KV head: whole KV groups are the units. With ``kv_heads="keep"`` the repeated side is
kept whole instead and the query heads stay units of their own, grouped by the KV head they read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import fx

from .head_inputs import WHY, record_bias
from .labels import Labels, aligned, varying
from .ophandlers import Flow, _out, aten_name, handler, linear_source, module_of, shape


def _aligned(lab: Labels | None, nd: int) -> np.ndarray | None:
    if not isinstance(lab, Labels) or lab.param:
        return None
    return aligned(lab.ids, nd)


def _repeats(flow: Flow, ids: np.ndarray, axis: int) -> np.ndarray | None:
    """For a head axis whose slices repeat (k/v expanded to the query heads): the group index of each position."""
    if ids.shape[axis] < 2:
        return None
    keys = [frozenset(flow.el.roots(np.take(ids, [i], axis=axis))) for i in range(ids.shape[axis])]
    if any(not k for k in keys) or len(set(keys)) == len(keys):
        return None
    index: dict[frozenset, int] = {}
    return np.array([index.setdefault(k, len(index)) for k in keys])


def product(flow: Flow, a: Labels | None, b: Labels | None, out_shape: tuple[int, ...], transpose_b: bool = False,
            what: str = "matmul", shapes: tuple[Any, Any] | None = None) -> Labels | None:
    """Labels of ``a @ b`` (``b`` given as ``[..., N, K]`` when ``transpose_b``; ``shapes``: the operands' shapes,
    which let per-head channels be contracted with data every head shares)."""
    nd = len(out_shape)
    la, lb = _aligned(a, nd), _aligned(b, nd)
    if la is None and lb is None:
        return None
    if lb is not None and transpose_b:
        lb = np.swapaxes(lb, -1, -2)
    el = flow.el
    single = _one_kv_head(la[..., :, :1], lb[..., :1, :]) if la is not None and lb is not None else None
    if single is not None:  # multi-query: the shared side's labels spread over the heads, then kept whole
        la, lb = (la, np.repeat(lb, la.shape[single], single)) if lb.shape[single] == 1 else (
            np.repeat(la, lb.shape[single], single), lb)
    if la is not None and lb is not None and (flow.keep_kv or single is not None):
        kept = _keep_kv(flow, la[..., :, :1], lb[..., :1, :], la, lb)
        if kept is not None:
            return kept
    # contracted dimension: a[..., m, k] with b[..., k, n]
    if la is not None and lb is not None and _owns_channels(la, la.ndim - 2, -1) and not _owns_channels(lb, lb.ndim - 1, -2):
        # each row of a (a head: Bros's "bnid,bijd->bnij") has channels of its own, contracted with data every row
        # shares: removing a row leaves that data whole, which must not lose any of its channels
        el.forbid(lb, f"its features are contracted with every head's own channels by {what} (kept whole)")
        lb = None
    if la is not None and lb is not None:
        shared = _shared_channels(la, lb)
        if shared is not None:  # MLA: a rotary key part shared by every head is kept whole, the rest stays per head
            el.forbid(lb[..., shared, :], "a key part every attention head reads (kept whole)")
            la, lb = la[..., :, ~shared], lb[..., ~shared, :]
        el.union(la[..., :, :, None], lb[..., None, :, :])
    elif la is not None and la.shape[-1] > 1 and not _rows_own_channels(la, shapes[1] if shapes else None, la.ndim - 1):
        el.forbid(la, f"its features are contracted with other data by {what}")
        la = None
    elif lb is not None and lb.shape[-2] > 1 and not _rows_own_channels(lb, shapes[0] if shapes else None, lb.ndim - 2):
        el.forbid(lb, f"its features are contracted with other data by {what}")
        lb = None
    for ids, axis in ((la, -1), (lb, -2)):
        if ids is not None:
            el.union_along(ids, ids.ndim + axis)
    left = la[..., :, :1] if la is not None else None  # [..., M, 1]
    right = lb[..., :1, :] if lb is not None else None  # [..., 1, N]
    if left is None or right is None:
        return None if left is None and right is None else _out(left if right is None else right)
    batch_axis = _head_axis(left, right)
    el.union(left, right)
    if batch_axis is not None:
        el.attention.update(int(x) for x in left[left >= 0].ravel())
    lb_, rb_ = np.broadcast_arrays(left, right)
    return _out(np.where(lb_ >= 0, lb_, rb_))


def _owns_channels(ids: np.ndarray, axis: int, contracted: int) -> bool:
    """Whether the contracted labels differ from one position of ``axis`` to the next (rows with channels of their
    own, not the same channels read by every row)."""
    first = np.take(ids, [0], axis=contracted)
    return first.shape[axis] > 1 and axis in varying(first)


def _rows_own_channels(ids: np.ndarray, other: Any, axis: int) -> bool:
    """Labelled channels contracted with unlabelled data can stay prunable when each row (a head) owns its channels
    whole — the contracted slice joins its row's unit, so removing a unit removes whole rows and the data keeps its
    size — and the data is the same for every labelled batch position (SAM's relative-position tables, shared by
    the heads: size 1 along the head axis). Otherwise the contraction mixes the units with other data."""
    if other is None:
        return False
    nd = ids.ndim
    other = (1,) * (nd - len(other)) + tuple(other)
    rows = varying(np.take(ids, [0], axis=axis))
    return bool(rows) and all(other[d] == 1 for d in rows if d < nd - 2)


def _keep_kv(flow: Flow, left: np.ndarray, right: np.ndarray, la: np.ndarray, lb: np.ndarray) -> Labels | None:
    """``kv_heads="keep"``: when one side repeats its heads (KV heads expanded to the query heads), keep that
    side whole and let the other side's heads be units of their own, grouped by the KV head they read."""
    axis = _head_axis(left, right)
    if axis is None:
        return None
    for mine, other, full, k_axis in ((left, right, la, -1), (right, left, lb, -2)):
        groups = _repeats(flow, other, axis)
        if groups is None or _repeats(flow, mine, axis) is not None:
            continue
        flow.el.forbid(la if mine is right else lb, "KV heads are kept whole (kv_heads='keep')")
        flow.el.union_along(full, full.ndim + k_axis)
        heads = np.take(full, 0, axis=k_axis)
        flow.kv_groups.append((np.moveaxis(np.broadcast_to(heads, heads.shape), axis, 0).reshape(heads.shape[axis], -1)[:, 0],
                               groups))
        flow.el.attention.update(int(x) for x in mine[mine >= 0].ravel())
        out_shape = np.broadcast_shapes(left.shape, right.shape)
        return _out(np.broadcast_to(mine, out_shape).copy())
    return None


def _shared_channels(la: np.ndarray, lb: np.ndarray) -> np.ndarray | None:
    """The contracted positions (``la[..., m, k] @ lb[..., k, n]``) where ``lb`` has the same labels in every head
    while ``la`` has its own per head, when some other position is per head on both sides (DeepSeek / MiniCPM3
    multi-head latent attention: the rotary key part is computed once and expanded to every head)."""
    axis = _head_axis(la[..., :, :1], lb[..., :1, :])
    if axis is None or la.shape[-1] != lb.shape[-2] or la.shape[-1] < 2:
        return None

    def per_head(ids: np.ndarray, dim: int) -> np.ndarray:  # per contracted position: labels differ across heads
        moved = np.moveaxis(ids, (axis, dim), (0, -1))
        return ((moved != moved[:1]) & (moved >= 0)).reshape(-1, moved.shape[-1]).any(0)

    a_own, b_own = per_head(la, la.ndim - 1), per_head(lb, lb.ndim - 2)
    shared = a_own & ~b_own & (np.moveaxis(lb, lb.ndim - 2, -1) >= 0).reshape(-1, lb.shape[-2]).any(0)
    return shared if shared.any() and (a_own & b_own).any() else None


def _one_kv_head(left: np.ndarray, right: np.ndarray) -> int | None:
    """Multi-query attention: the batch axis along which one side has labelled heads and the other a single head
    broadcast to them (its labels size 1 there). That only KV head cannot be pruned (it would remove the attention),
    so the query heads are the units (``kv_heads="keep"`` for this product)."""
    for axis in range(left.ndim - 2):
        for mine, other in ((left, right), (right, left)):
            if mine.shape[axis] > 1 and other.shape[axis] == 1 and axis in varying(mine) and (other >= 0).any():
                return axis
    return None


def _head_axis(left: np.ndarray, right: np.ndarray) -> int | None:
    """The batch axis both sides are labelled along (the head axis of attention), if any."""
    for axis in range(left.ndim - 2):
        if left.shape[axis] > 1 and right.shape[axis] > 1:
            return axis
    return None


@handler("matmul", "bmm", "mm")
def _matmul(flow: Flow, node: fx.Node):
    a, b = node.args[0], node.args[1]
    if shape(a) is None or shape(b) is None or len(shape(a)) < 2 or len(shape(b)) < 2:
        flow.forbid(a, "a vector product")
        flow.forbid(b, "a vector product")
        return None
    from .linears import weight_operand

    operand = weight_operand(b)
    if operand is not None and operand[0].name in flow.param_of and len(shape(operand[0]) or ()) == 2:
        w, out_dim = operand  # x @ W or x @ W.T with a 2-D parameter: a linear op
        return linear_source(flow, a, flow.param_of[w.name], shape(w), out_dim, None, shape(node))
    left = weight_operand(a)
    if left is not None and left[0].name in flow.param_of and len(shape(left[0]) or ()) == 2 and flow.lab(a) is None:
        return _weight_first(flow, flow.param_of[left[0].name], shape(left[0]), 1 - left[1], b, shape(node))
    return product(flow, flow.lab(a), flow.lab(b), shape(node), shapes=(shape(a), shape(b)))


def _weight_first(flow: Flow, weight: str, w_shape: tuple[int, ...], out_dim: int, x: Any,
                  out_shape: tuple[int, ...]) -> Labels:
    """``W @ x`` with a 2-D parameter ``W`` (Mamba's ``dt_proj.weight @ time_step.mT``): the output's rows are W's
    rows, elements of their own that follow the units they meet (no linear is masked for them: they are sliced, as a
    bias is); x's features along dim -2 are tied to W's columns."""
    el, in_dim = flow.el, 1 - out_dim
    lab = flow.lab(x)
    if isinstance(lab, Labels) and not lab.param:
        ids = aligned(lab.ids, len(out_shape))
        if any(d != ids.ndim - 2 for d in varying(ids)):
            el.forbid(ids, "read by a product with a weight along a dimension other than its features")
        elif ids.shape[-2] == w_shape[in_dim]:
            el.union(ids.reshape(-1), el.of(weight, in_dim, w_shape[in_dim]))
    rows = el.of(weight, out_dim, w_shape[out_dim])
    return Labels(rows.reshape((1,) * (len(out_shape) - 2) + (-1, 1)))


def matmul_like(flow: Flow, node: fx.Node, a, b, bias=None):
    out = product(flow, flow.lab(a), flow.lab(b), shape(node), shapes=(shape(a), shape(b)))
    if isinstance(bias, fx.Node) and isinstance(flow.lab(bias), Labels):
        flow.forbid(bias, "added to a matmul")
    return out


@handler("addmm")
def _addmm(flow: Flow, node: fx.Node):  # Hugging Face Conv1D: addmm(bias, x2d, weight[in, out])
    b, x, w = node.args[:3]
    wname = flow.param_of.get(w.name) if isinstance(w, fx.Node) else None
    if wname is None:
        return matmul_like(flow, node, node.args[1], node.args[2], bias=node.args[0])
    bname = flow.param_of.get(b.name) if isinstance(b, fx.Node) else None
    return linear_source(flow, x, wname, shape(w), 1, bname, shape(node))


@handler("baddbmm")
def _baddbmm(flow: Flow, node: fx.Node):
    out = product(flow, flow.lab(node.args[1]), flow.lab(node.args[2]), shape(node),
                  shapes=(shape(node.args[1]), shape(node.args[2])))
    extra = flow.lab(node.args[0])
    if isinstance(extra, Labels) and out is not None:
        flow.el.union(out.ids, extra.ids)
    elif out is not None and _beta(node) != 0:  # beta = 0: the addend is ignored
        _unsliceable_bias(flow, out, node.args[0], node.args[1], node.args[2], node)
    return out


def _beta(node: fx.Node) -> Any:
    return node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)


@handler("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention")
def _sdpa(flow: Flow, node: fx.Node):
    q, k, v = node.args[:3]
    positional = node.target._opname in ("scaled_dot_product_attention", "_scaled_dot_product_efficient_attention")
    mask = node.args[3] if positional and len(node.args) > 3 else node.kwargs.get("attn_mask")  # flash: a keyword
    qs, ks, vs = shape(q), shape(k), shape(v)
    if qs is None or ks is None or vs is None:
        return None
    heads, kv = qs[-3] if len(qs) >= 3 else 1, ks[-3] if len(ks) >= 3 else 1
    lk, lv = flow.lab(k), flow.lab(v)
    if heads != kv and kv > 0 and heads % kv == 0:  # enable_gqa: each KV head serves heads // kv query heads
        lk = Labels(np.repeat(lk.ids, heads // kv, axis=-3), lk.param) if isinstance(lk, Labels) and lk.ids.shape[-3] > 1 else lk
        lv = Labels(np.repeat(lv.ids, heads // kv, axis=-3), lv.param) if isinstance(lv, Labels) and lv.ids.shape[-3] > 1 else lv
    scores_shape = qs[:-1] + (ks[-2],)
    scores = product(flow, flow.lab(q), lk, scores_shape, transpose_b=True, what="attention")
    lmask = flow.lab(mask) if isinstance(mask, fx.Node) else None
    if isinstance(lmask, Labels) and scores is not None:
        flow.el.union(scores.ids, aligned(lmask.ids, len(scores_shape)))
    elif scores is not None:
        _unsliceable_bias(flow, scores, mask, q, k, node)
    out = _probs_v(flow, scores, lv, qs[:-1] + (vs[-1],))
    return out if node.target._opname == "scaled_dot_product_attention" else [out, None]


_BROADCASTS = ("expand", "expand_as", "_to_copy", "to", "clone", "contiguous", "alias", "type_as")
_FILLS = ("zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros",
          "new_ones", "new_full", "new_empty")


def _unsliceable_bias(flow: Flow, scores: Labels, bias: Any, q: Any, k: Any, attention: fx.Node) -> None:
    """An unlabelled addend to the scores that differs per head (BLOOM's ALiBi, T5's cross-attention bias built
    once from the head count and shared by every layer) cannot be sliced with the heads: keep them whole.
    Fine: a mask expanded from size 1 along the heads (``[B, 1, q, k]`` broadcast), and a fill (``zeros``,
    ``full``, ...) made in the attention's own module and read nowhere else (sized by that module's head count)."""
    if not isinstance(bias, fx.Node) or shape(bias) is None:
        return
    nd = scores.ids.ndim
    sizes = [(1,) * (nd - len(shape(bias))) + tuple(shape(bias))]
    node, chain = bias, [bias]
    while aten_name(node) in _BROADCASTS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        chain.append(node)
        if shape(node) is not None:
            sizes.append((1,) * (nd - len(shape(node))) + tuple(shape(node)))
    where = module_of(attention)
    if (aten_name(node) in _FILLS and where is not None
            and all(module_of(u) == where for n in chain for u in n.users)):
        return
    if any(all(s[d] > 1 for s in sizes) for d in varying(scores.ids)):
        if record_bias(flow, scores.ids, bias, attention):
            return  # sliced where it enters the attention module (analysis.head_inputs)
        why = WHY
        flow.forbid(q, why)
        flow.forbid(k, why)


def _probs_v(flow: Flow, scores: Labels | None, lv: Labels | None, out_shape: tuple[int, ...]) -> Labels | None:
    """Labels of ``probs @ v`` where ``probs`` carries the scores' labels."""
    nd = len(out_shape)
    left = _aligned(scores, nd)
    right = _aligned(lv, nd)
    el = flow.el
    if right is not None:
        el.union_along(right, nd - 1)
    if left is None or right is None:
        return _out(right) if left is None and right is not None else (_out(left[..., :, :1]) if left is not None else None)
    left = left[..., :, :1]
    right_b = right[..., :1, :]
    axis = _head_axis(left, right_b)
    single = _one_kv_head(left, right_b)
    if single is not None and right_b.shape[single] == 1:  # multi-query: one v read by every head
        right_b = np.repeat(right_b, left.shape[single], single)
        axis = single
    if (flow.keep_kv or single is not None) and axis is not None and _repeats(flow, right_b, axis) is not None:
        el.forbid(right_b, "KV heads are kept whole (kv_heads='keep')")
        shape_ = np.broadcast_shapes(left.shape, right_b.shape)
        return _out(np.broadcast_to(left, shape_).copy())
    el.union(left, right_b)
    lb_, rb_ = np.broadcast_arrays(left, right_b)
    return _out(np.where(rb_ >= 0, rb_, lb_))
