"""Per-op handlers that follow an eager attention while the export traces it (used by ``fusion.AttentionFusion``).

Invariant: a tensor tagged ``_ebc_scores`` holds exactly ``scale * (q @ kt) + bias`` (reshaped to its own shape
when only leading dims changed; after ``softmax(dim=-1)``, ``probs`` is set and it holds the probabilities of those
logits). Every handler computes the op itself first, so values are never changed; it only tags the result. Any op
without a handler that writes a tagged tensor in place drops the tag, so a tag is never stale.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..analysis.op_names import RESHAPES
from .attention import emit_attention

__all__ = ["HANDLERS", "forget_in_place"]

T = torch.Tensor
TAGS = ("_ebc_scores", "_ebc_repeat", "_ebc_expand", "_ebc_lost")


@dataclass(frozen=True)
class Scores:
    q: torch.Tensor  # [..., S, D]
    kt: torch.Tensor  # [..., D, T]
    scale: float
    bias: torch.Tensor | None  # broadcastable to the tagged tensor's shape
    probs: bool = False


def _scores(t) -> Scores | None:
    return getattr(t, "_ebc_scores", None) if isinstance(t, torch.Tensor) else None


scores_of = _scores  # what the fusion mode reads to tell a followed in-place op from one left untracked


def _tag(t: torch.Tensor, info: Scores | None, lost: str | None = None) -> torch.Tensor:
    for name in TAGS[0], TAGS[3]:
        if hasattr(t, name):
            delattr(t, name)
    if info is not None:
        t._ebc_scores = info
    elif lost is not None:
        t._ebc_lost = lost
    return t


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def forget_in_place(func, args, kwargs) -> None:
    """An in-place op or ``out=`` we do not follow: its target's tags no longer describe it."""
    name = _name(func)
    targets = [kwargs["out"]] if isinstance(kwargs.get("out"), torch.Tensor) else []
    if (name.endswith("_") and not name.endswith("__")) or (name.startswith("__i") and name.endswith("__")):
        targets += [args[0]] if args and isinstance(args[0], torch.Tensor) else []
    for t in targets:
        if _scores(t) is not None:
            _tag(t, None, f"{name} writes the attention scores in place")
        for tag in TAGS[1:3]:
            if hasattr(t, tag):
                delattr(t, tag)


def _matmul(mode, func, args, kwargs):
    a, b = args[0], args[1]
    out = func(*args, **kwargs)
    info = _scores(a)
    if info is not None and info.probs:
        return _fuse(mode, info, a, b, out)
    if getattr(a, "_ebc_lost", None):
        mode.note(a._ebc_lost)
    elif isinstance(b, torch.Tensor) and info is None and _scores(b) is None and a.dim() >= 3 and b.dim() == a.dim() \
            and a.shape[:-2] == b.shape[:-2] and a.is_floating_point():
        _tag(out, Scores(a, b, 1.0, None))
    return out


def _baddbmm(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    bias, q, kt = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if isinstance(beta, numbers.Number) and isinstance(alpha, numbers.Number) and _scores(q) is None:
        _tag(out, Scores(q, kt, float(alpha), bias * beta if beta else None))
    return out


def _fuse(mode, info: Scores, probs: torch.Tensor, v: torch.Tensor, eager: torch.Tensor) -> torch.Tensor:
    q, kt = info.q, info.kt
    if not (q.dim() in (3, 4) and probs.shape == q.shape[:-1] + kt.shape[-1:] and v.shape[:-1] == kt.shape[:-2] + kt.shape[-1:]
            and q.shape[:-2] == kt.shape[:-2]):
        mode.note(f"shapes q {tuple(q.shape)}, k^T {tuple(kt.shape)}, v {tuple(v.shape)} are not [batch, heads, seq, dim]")
        return eager
    bias = info.bias
    if bias is not None and bias.dim() > probs.dim():
        bias = bias.expand(probs.shape)
    k = kt.transpose(-2, -1)
    if q.dim() == 3:  # [batch * heads, seq, dim]: one head per batch row
        q, k, v, eager = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), eager.unsqueeze(1)
        bias = bias.unsqueeze(-3) if bias is not None else None
        return emit_attention(mode, q, k, v, bias, info.scale, False, eager).squeeze(1)
    return emit_attention(mode, q, k, v, bias, info.scale, False, eager)


def _scale(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    tagged, other = (a, b) if _scores(a) is not None else (b, a)
    info = _scores(tagged)
    divide = "div" in _name(func)
    if info is None or info.probs or (divide and tagged is b) or (isinstance(b, torch.Tensor) and _scores(b) is not None
                                                                  and tagged is a):
        return out
    if "rounding_mode" in kwargs and kwargs["rounding_mode"] is not None:
        return _tag(out, None, "a rounded division of the scores")
    if isinstance(other, numbers.Number):
        c = 1.0 / other if divide else float(other)
        return _tag(out, replace(info, scale=info.scale * c, bias=info.bias * c if info.bias is not None else None))
    if isinstance(other, torch.Tensor) and other.numel() == 1:
        c = 1.0 / other if divide else other
        c = c.reshape(())
        return _tag(out, replace(info, q=info.q * c, bias=info.bias * c if info.bias is not None else None))
    return _tag(out, None, f"{_name(func)} of the scores by a tensor of shape {tuple(other.shape)}")


def _add(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    sub = "sub" in _name(func)
    alpha = kwargs.get("alpha", 1)
    ia, ib = _scores(a), _scores(b)
    if (ia is None) == (ib is None) or (ia or ib).probs:
        return out if ia is None else _tag(out, None, "the scores are added to themselves")
    info, other = (ia, b) if ia is not None else (ib, a)
    if sub and ib is not None:
        return _tag(out, None, "the scores are subtracted from a tensor")
    if isinstance(other, numbers.Number):  # softmax does not see a constant shift
        return _tag(out, info)
    if not isinstance(other, torch.Tensor) or out.shape != (a if ia is not None else b).shape:
        return _tag(out, None, "an addition broadcasts the scores to another shape")
    other = other * (-alpha if sub else alpha) if (sub or alpha != 1) else other
    return _tag(out, replace(info, bias=other if info.bias is None else info.bias + other))


def _masked_fill(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    a, mask = args[0], args[1] if len(args) > 1 else kwargs["mask"]
    value = args[2] if len(args) > 2 else kwargs["value"]
    info = _scores(a)
    if info is None or info.probs:
        return out
    value = float(value) if isinstance(value, (numbers.Number, torch.Tensor)) else 0.0
    if value > -1e4 or out.shape != a.shape:
        return _tag(out, None, f"masked_fill of the scores with {value:g} (only a large negative value is a mask)")
    add = torch.zeros_like(mask, dtype=a.dtype).masked_fill(mask, torch.finfo(a.dtype).min)
    return _tag(out, replace(info, bias=add if info.bias is None else info.bias + add))


def _reshape(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    a = args[0]
    info = _scores(a)
    if info is not None:
        if out.dim() >= 2 and out.shape[-2:] == a.shape[-2:]:
            bias = info.bias.expand(a.shape).reshape(out.shape) if info.bias is not None else None
            return _tag(out, replace(info, bias=bias))
        return _tag(out, None, f"{_name(func)} of the scores changes their last two dims")
    src = getattr(a, "_ebc_expand", None)  # repeat_kv: k[:, :, None].expand(b, kv, n, t, d).reshape(b, kv * n, t, d)
    if src is not None and out.dim() == 4 and out.shape[1] == a.shape[1] * a.shape[2] and out.shape[2:] == a.shape[3:]:
        out._ebc_repeat = (src, a.shape[2])
    return out


def _expand(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    a = args[0]
    if a.dim() == 5 and a.shape[2] == 1 and out.shape[2] > 1 and out.shape[:2] == a.shape[:2] and out.shape[3:] == a.shape[3:]:
        out._ebc_expand = a.squeeze(2)
    return out


def _repeat_interleave(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    a = args[0]
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    if isinstance(a, torch.Tensor) and a.dim() == 4 and isinstance(repeats, int) and dim in (1, -3):
        out._ebc_repeat = (a, repeats)
    return out


def _softmax(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    a = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    info = _scores(a)
    if info is None:
        lost = getattr(a, "_ebc_lost", None)
        return _tag(out, None, lost or "the softmax input is not q @ k^T")
    if dim not in (-1, a.dim() - 1) or info.probs:
        return _tag(out, None, f"softmax over dim {dim} of the scores")
    return _tag(out, replace(info, probs=True))


def _keep(mode, func, args, kwargs):
    """Ops that leave probabilities as they are: eval-mode dropout, dtype casts, contiguous."""
    out = func(*args, **kwargs)
    a = args[0] if args else kwargs.get("input")
    info = _scores(a)
    if info is None or not isinstance(out, torch.Tensor):
        return out
    if "dropout" in _name(func):
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[2] if len(args) > 2 else kwargs.get("training", True)
        if training and p > 0:
            return _tag(out, None, f"dropout p={p} on the probabilities in training mode")
    if out.is_floating_point():
        return _tag(out, info) if out is not a else out
    return _tag(out, None, "a cast of the probabilities")


def _sdpa(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    call = dict(zip(names, args)) | kwargs
    q, k, v = call["query"], call["key"], call["value"]
    mask, causal = call.get("attn_mask"), bool(call.get("is_causal", False))
    if call.get("dropout_p", 0.0):
        mode.note(f"scaled_dot_product_attention with dropout_p={call['dropout_p']}")
        return out
    if not (q.dim() == k.dim() == v.dim() and q.dim() in (3, 4)) or q.shape[:-3] != k.shape[:-3]:
        mode.note(f"scaled_dot_product_attention on q {tuple(q.shape)}, k {tuple(k.shape)}: not [batch, heads, seq, dim]")
        return out
    if q.dim() == 3:
        q, k, v, out1 = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), out.unsqueeze(1)
        return emit_attention(mode, q, k, v, mask, call.get("scale"), causal, out1).squeeze(1)
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1] or q.shape[0] != k.shape[0]:
        mode.note(f"scaled_dot_product_attention with {q.shape[1]} query heads over {k.shape[1]} key heads")
        return out
    return emit_attention(mode, q, k, v, mask, call.get("scale"), causal, out)


def _table() -> dict[str, Callable]:
    """Handlers by the op's aten-style name (``analysis.op_names``: ``torch.mul``, ``Tensor.__rmul__`` and
    ``Tensor.multiply`` are all ``mul``; ``Tensor.__imul__`` and ``mul_`` are ``mul_``)."""
    groups = {
        _matmul: ("matmul", "bmm"),
        _baddbmm: ("baddbmm",),
        _scale: ("mul", "div", "mul_", "div_"),
        _add: ("add", "sub", "add_", "sub_"),
        _masked_fill: ("masked_fill", "masked_fill_"),
        _reshape: tuple(RESHAPES),
        _expand: ("expand",),
        _repeat_interleave: ("repeat_interleave",),
        _softmax: ("softmax",),
        _keep: ("dropout", "to", "type_as", "float", "half", "contiguous"),
        _sdpa: ("scaled_dot_product_attention",),
    }
    return {name: handler for handler, names in groups.items() for name in names}


HANDLERS = _table()
