"""Label handler for convolutions (``analysis.structure``): a depthwise one keeps its channels apart, so they can be
units, a grouped one keeps its groups apart (each group's channels one unit); any other mixes channels and is not
followed. Registered into ``ophandlers.HANDLERS`` on import."""

from __future__ import annotations

import numpy as np
from torch import fx

from .labels import Labels, aligned
from .ophandlers import Flow, _param_behind, handler, shape

# op -> position of ``groups`` among its arguments (``convolution`` also has ``transposed`` at 6)
_GROUPS_AT = {"conv1d": 6, "conv2d": 6, "conv3d": 6, "convolution": 8, "_convolution": 8}


@handler(*_GROUPS_AT)
def _convolution(flow: Flow, node: fx.Node):
    """A depthwise convolution (groups = input channels = output channels, one filter per channel: SegFormer's and
    PVTv2's Mix-FFN, LFM2's short convolution) filters each channel on its own: the channels (dim 1) stay units, the
    filter's rows and the bias follow them, and the positions a filter slides over must be one unit. A grouped one
    (ZAYA's per-head convolution over q|k) mixes the channels of each group only: each group's input channels are
    one unit (a head, or several), its filter rows and bias follow, and ``compact`` keeps the per-group widths and
    lowers the group count. The filter may be a view of a parameter (``weight.unsqueeze(1)``). Any other
    convolution sums over all channels: refused."""
    x, weight = node.args[0], node.args[1]
    lab, s, ws = flow.lab(x), shape(x), shape(weight)
    if not isinstance(lab, Labels) or s is None or ws is None:
        return None
    name = node.target._opname
    at = _GROUPS_AT[name]
    groups = node.args[at] if len(node.args) > at else node.kwargs.get("groups", 1)
    transposed = at == 8 and len(node.args) > 6 and bool(node.args[6])
    ids = aligned(lab.ids, len(s))
    behind = _param_behind(flow, weight) if isinstance(weight, fx.Node) else None
    filters = behind[0] if behind is not None and behind[1][0] == ws[0] else None
    bias = node.args[2] if len(node.args) > 2 else None
    bias_name = flow.param_of.get(bias.name) if isinstance(bias, fx.Node) else None
    grouped = (len(s) >= 3 and isinstance(groups, int) and groups > 1 and s[1] == ws[0] and s[1] % groups == 0
               and ws[1] == s[1] // groups and not transposed)
    if lab.param or not grouped or filters is None or (bias is not None and bias_name is None) or ids.shape[1] != s[1]:
        flow.forbid(x, f"its features are read by {name}, which mixes channels (only depthwise and grouped ones are "
                       "followed)")
        return None
    rows = np.moveaxis(ids, 1, 0).reshape(s[1], -1)  # per channel: every position its filter slides over
    width = s[1] // groups
    for g in range(groups):  # a group's channels are cut together; the positions its filters slide over: one unit
        block = rows[g * width:(g + 1) * width]
        if width > 1 and (block[:, 0] < 0).any():  # a group mixing features with data of its own: kept whole
            flow.el.forbid(block[block >= 0], "its channels share a convolution group with data the analysis cannot cut")
        elif width > 1:
            flow.el.union(np.full(width, block[0, 0]), block[:, 0])
        if block.size > 1:
            flow.el.same_unit.append((block.reshape(-1).copy(), "its channels are mixed by a grouped convolution"))
    flow.el.union(rows[:, 0], flow.el.of(filters, 0, ws[0]))
    if bias_name is not None:
        flow.el.union(rows[:, 0], flow.el.of(bias_name, 0, ws[0]))
    out = ids
    for d in range(2, len(s)):  # output positions differ in number (padding, stride): each channel keeps its labels
        out = np.take(out, [0], axis=d)
    return Labels(out)


def _spatial_dims(name: str) -> int | None:
    """How many trailing dims a per-channel pooling or resampling op works over (``max_pool2d`` -> 2)."""
    for k in (1, 2, 3):
        if f"{k}d" in name:
            return k
    return None


_POOLS = [f"{kind}{k}d{suffix}" for kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool",
                                             "_adaptive_avg_pool", "upsample_nearest", "_upsample_nearest_exact")
          for k in (1, 2, 3) for suffix in ("", "_with_indices")]
_POOLS += ["upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d",
           "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa"]


@handler(*_POOLS)
def _pool(flow: Flow, node: fx.Node):
    """Pooling and resampling (SAM2's query pooling, Swin-v2's pooler, an FPN's upsampling) work on each channel
    alone over the trailing spatial dims: channels keep their labels; the positions pooled together must be one
    unit. Ops returning ``(values, indices)`` label both alike."""
    x = node.args[0]
    lab, s, k = flow.lab(x), shape(x), _spatial_dims(node.target._opname)
    if not isinstance(lab, Labels) or s is None or k is None or len(s) <= k:
        return None
    ids = aligned(lab.ids, len(s))
    spatial = list(range(len(s) - k, len(s)))
    if any(ids.shape[d] > 1 for d in spatial):
        for d in spatial:
            ids = np.moveaxis(ids, d, -1)
        rows = ids.reshape(-1, int(np.prod(ids.shape[-k:])))
        for row in rows:
            flow.el.same_unit.append((row.copy(), "its positions are pooled together"))
        ids = np.moveaxis(ids, list(range(len(s) - k, len(s))), spatial)
    for d in spatial:
        ids = np.take(ids, [0], axis=d)
    out = Labels(ids, lab.param)
    values = shape(node)
    return out if values is not None else [out, out]
