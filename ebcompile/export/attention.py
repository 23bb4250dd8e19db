"""Fused attention for the ONNX export: each attention computed while the model is traced becomes ONE
onnxruntime contrib node, ``com.microsoft.MultiHeadAttention``, or ``GroupQueryAttention`` when key/value carry
fewer heads than the query.

Invariant: the traced values are the model's own (the fused op's PyTorch forward returns the eager result, and the
eager subgraph it replaces is dead code the exporter drops), so fusing never changes what is verified; head and
KV-head counts are read from each call's tensor shapes, so per-layer counts left by pruning are exact by
construction. Attention is found where it is computed, not by model type: ``F.scaled_dot_product_attention``
(Hugging Face SDPA, ``nn.MultiheadAttention``, nanoGPT...) and the eager ``softmax(q @ k^T * scale + bias) @ v``
chain, followed op by op (``attention_ops.py``, ``fusion.py``). An attention that cannot be fused is left as it is and the
reason is noted with the module it ran in. Masks become an additive ``attention_bias`` (a masked position gets
the dtype's lowest value): a query row whose keys are all masked is the one case where the fused op and an eager
``masked_fill(-inf)`` may differ (both rows are meaningless padding).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

__all__ = ["emit_attention", "gqa_supported"]


@functools.cache
def gqa_supported() -> bool:
    """The installed onnxruntime's ``GroupQueryAttention`` takes ``causal`` and ``attention_bias`` (any mask)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ortc

        schema = next(s for s in ortc.get_all_operator_schema() if s.domain == "com.microsoft" and s.name == "GroupQueryAttention")
        return "causal" in schema.attributes and "attention_bias" in [i.name for i in schema.inputs]
    except Exception:  # noqa: BLE001 - an onnxruntime without the op or the schema API: use MultiHeadAttention
        return False


def _absent(g):
    node = g.op("prim::Constant")
    node.setType(torch._C.OptionalType.ofTensor())
    return node


class _ContribAttention(torch.autograd.Function):
    """``[B, S, H*D]`` query, ``[B, T, Hk*D]`` key/value -> ``[B, S, H*Dv]``; exported as one contrib node.

    The forward returns ``eager``, the model's own result, so tracing sees exactly what the model computes."""

    @staticmethod
    def forward(ctx, q, k, v, bias, eager, heads: int, kv_heads: int, scale: float, causal: int, same_width: bool):  # noqa: ARG004
        return eager.clone()

    @staticmethod
    def symbolic(g, q, k, v, bias, eager, heads: int, kv_heads: int, scale: float, causal: int, same_width: bool):  # noqa: ARG004
        bias = bias if bias is not None and not bias.node().mustBeNone() else _absent(g)
        if kv_heads == heads:
            out = g.op("com.microsoft::MultiHeadAttention", q, k, v, _absent(g), _absent(g), bias, num_heads_i=heads,
                       scale_f=scale, unidirectional_i=causal)
        else:  # GroupQueryAttention without a cache: every sequence is its full length
            shape = g.op("Shape", k)  # B, T, Hk*D
            total = g.op("Gather", shape, g.op("Constant", value_t=torch.tensor(1)), axis_i=0)
            batch = g.op("Gather", shape, g.op("Constant", value_t=torch.tensor([0])), axis_i=0)
            seqlens = g.op("Expand", g.op("Sub", total, g.op("Constant", value_t=torch.tensor(1))), batch)
            seqlens, total = g.op("Cast", seqlens, to_i=6), g.op("Cast", total, to_i=6)  # int32
            out = g.op("com.microsoft::GroupQueryAttention", q, k, v, _absent(g), _absent(g), seqlens, total,
                             _absent(g), _absent(g), _absent(g), bias, num_heads_i=heads, kv_num_heads_i=kv_heads,
                             scale_f=scale, causal_i=causal)  # no cache: present_key/value left out
        # the output's type: q's ([batch, seq, H*D], symbolic sizes), else v's; a type copied from the traced eager
        # tensor would carry the example's batch into every shape read from the output
        out.setType(q.type() if same_width else v.type())
        return out


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An SDPA-style mask (bool: True takes part; float: added) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)  # *_like: shapes stay traced
    return mask.to(dtype)


def emit_attention(mode: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   scale: float | None, causal: bool, eager: torch.Tensor) -> torch.Tensor:
    """``eager`` (= softmax(q k^T scale + bias [+ causal]) v, heads on dim 1) computed again by one contrib node.

    q ``[B, H, S, D]``, k ``[B, Hk, T, D]``, v ``[B, Hk, T, Dv]``, ``H % Hk == 0``; returns eager's shape. ``mode`` is the
    ``fusion.AttentionFusion`` tracing (its ``gqa`` flag is read)."""
    batch, heads, seq, dim = (int(n) for n in q.shape)  # sizes are traced tensors while exporting
    total, dim_v = int(k.shape[2]), int(v.shape[3])
    repeat = getattr(k, "_ebc_repeat", None)  # key/value repeated per query head (repeat_kv): fuse the original
    if repeat is not None and getattr(v, "_ebc_repeat", (None, 0))[1] == repeat[1] and k.shape[1] == heads:
        k, v = repeat[0], v._ebc_repeat[0]
    kv_heads = int(k.shape[1])
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    if bias is not None:
        bias = _additive(bias, q.dtype)
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        bias = bias.expand(-1, -1, q.shape[2], k.shape[2])  # traced sizes: sequence lengths stay dynamic
        if int(bias.shape[0]) not in (1, batch) or int(bias.shape[1]) not in (1, heads):
            bias = bias.expand(q.shape[0], heads, q.shape[2], k.shape[2])
    use_gqa = kv_heads != heads and seq == total and mode.gqa and gqa_supported()
    if kv_heads != heads and not use_gqa:
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        kv_heads = heads
    if causal and seq != total:  # top-left aligned causal mask (SDPA's) as a bias; the ops take bottom-right
        tri = torch.ones_like(q[0, 0, :, :1] * k[0, 0, :, 0], dtype=torch.bool).tril()  # [S, T], traced sizes
        causal_bias = _additive(tri, q.dtype)[None, None]
        bias = causal_bias if bias is None else bias + causal_bias
        causal = False
    flat = [t.transpose(1, 2).flatten(2) for t in (q, k, v)]
    out = _ContribAttention.apply(*flat, bias, eager.transpose(1, 2).flatten(2), heads, kv_heads, scale, int(causal),
                                  dim == dim_v)
    return out.reshape(q.shape[0], q.shape[2], heads, dim_v).transpose(1, 2)  # sizes read from q: they stay dynamic
