"""Label handler for two-operand ``einsum`` (Funnel, ProphetNet, relative-attention scores): the equation is
rewritten as the batched product ``ops_attention.product`` follows — batch letters (in both operands and the
output), the first operand's own letters, the contracted letters, the second operand's own letters — and the
product's labels are laid back out in the output's letter order (``analysis.structure``)."""

from __future__ import annotations

import numpy as np
from torch import fx

from .labels import Labels, aligned, compress
from .ophandlers import Flow, handler, shape
from .ops_attention import product


def _parse(equation: str) -> tuple[list[str], str] | None:
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    inputs, out = eq.split("->")
    return inputs.split(","), out


@handler("einsum")
def _einsum(flow: Flow, node: fx.Node):
    parsed = _parse(node.args[0]) if isinstance(node.args[0], str) else None
    operands = list(node.args[1]) if len(node.args) > 1 else []
    labs = [flow.lab(a) for a in operands]
    if parsed is None or len(operands) != 2 or any(isinstance(x, list) for x in labs):
        raise ValueError("einsum form not followed")  # the caller forbids the labelled inputs
    (first, second), out = parsed
    shapes = [shape(a) for a in operands]
    size = {}
    for letters, s in zip((first, second), shapes):
        for c, n in zip(letters, s):
            if size.setdefault(c, n) != n:
                raise ValueError("broadcast einsum letters")
    for letters in (first, second):  # a letter summed inside one operand: reduced across whatever it labels
        if any(c not in out and c not in (second if letters is first else first) for c in letters):
            raise ValueError("einsum sums a letter of one operand")
    batch = [c for c in out if c in first and c in second]
    m = [c for c in out if c in first and c not in second]
    n = [c for c in out if c in second and c not in first]
    k = [c for c in first if c in second and c not in out]

    def laid_out(lab, letters: str, order: list[str], groups: list[int]):
        if not isinstance(lab, Labels) or lab.param:
            return None if not isinstance(lab, Labels) else lab
        ids = np.array(lab.full(tuple(size[c] for c in letters)))
        ids = np.transpose(ids, [letters.index(c) for c in order])
        dims, at = [], 0
        for g in groups:
            dims.append(int(np.prod([size[c] for c in order[at:at + g]], dtype=np.int64)))
            at += g
        return Labels(compress(ids.reshape(dims)))

    left = laid_out(labs[0], first, batch + m + k, [1] * len(batch) + [len(m), len(k)])
    right = laid_out(labs[1], second, batch + k + n, [1] * len(batch) + [len(k), len(n)])
    flat = tuple(size[c] for c in batch) + (int(np.prod([size[c] for c in m])), int(np.prod([size[c] for c in n])))
    inner = int(np.prod([size[c] for c in k], dtype=np.int64))
    operand_shapes = (flat[:-1] + (inner,), flat[:-2] + (inner, flat[-1]))
    res = product(flow, left, right, flat, what="einsum", shapes=operand_shapes)
    if res is None:
        return None
    ids = np.broadcast_to(aligned(res.ids, len(flat)), flat)
    ids = ids.reshape(tuple(size[c] for c in batch + m + n))
    order = batch + m + n
    return Labels(compress(np.transpose(ids, [order.index(c) for c in out])))
