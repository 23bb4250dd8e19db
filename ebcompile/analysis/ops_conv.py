"""Label handler for convolutions (``analysis.structure``): a depthwise one keeps its channels apart, so they can be
units; any other mixes channels and is not followed. Registered into ``ophandlers.HANDLERS`` on import."""

from __future__ import annotations

import numpy as np
from torch import fx

from .labels import Labels, aligned
from .ophandlers import Flow, handler, shape

# op -> position of ``groups`` among its arguments (``convolution`` also has ``transposed`` at 6)
_GROUPS_AT = {"conv1d": 6, "conv2d": 6, "conv3d": 6, "convolution": 8, "_convolution": 8}


@handler(*_GROUPS_AT)
def _convolution(flow: Flow, node: fx.Node):
    """A depthwise convolution (groups = input channels = output channels, one filter per channel: SegFormer's and
    PVTv2's Mix-FFN, LFM2's short convolution) filters each channel on its own: the channels (dim 1) stay units, the
    filter's rows and the bias follow them, and the positions a filter slides over must be one unit. Any other
    convolution sums over channels: refused."""
    x, weight = node.args[0], node.args[1]
    lab, s, ws = flow.lab(x), shape(x), shape(weight)
    if not isinstance(lab, Labels) or s is None or ws is None:
        return None
    name = node.target._opname
    at = _GROUPS_AT[name]
    groups = node.args[at] if len(node.args) > at else node.kwargs.get("groups", 1)
    transposed = at == 8 and len(node.args) > 6 and bool(node.args[6])
    ids = aligned(lab.ids, len(s))
    filters = flow.param_of.get(weight.name) if isinstance(weight, fx.Node) else None
    bias = node.args[2] if len(node.args) > 2 else None
    bias_name = flow.param_of.get(bias.name) if isinstance(bias, fx.Node) else None
    depthwise = len(s) >= 3 and groups == s[1] == ws[0] and ws[1] == 1 and not transposed
    if lab.param or not depthwise or filters is None or (bias is not None and bias_name is None) or ids.shape[1] != s[1]:
        flow.forbid(x, f"its features are read by {name}, which mixes channels (only depthwise ones are followed)")
        return None
    rows = np.moveaxis(ids, 1, 0).reshape(s[1], -1)  # per channel: every position its filter slides over
    if rows.shape[1] > 1:
        for row in rows:
            flow.el.same_unit.append((row.copy(), "its positions are filtered together by a convolution"))
    flow.el.union(rows[:, 0], flow.el.of(filters, 0, ws[0]))
    if bias_name is not None:
        flow.el.union(rows[:, 0], flow.el.of(bias_name, 0, ws[0]))
    out = ids
    for d in range(2, len(s)):  # output positions differ in number (padding, stride): each channel keeps its labels
        out = np.take(out, [0], axis=d)
    return Labels(out)
