"""``CompactMultiheadAttention``: ``nn.MultiheadAttention`` with any number of kept heads, and its fused
ONNX export (one ONNX Runtime ``com.microsoft.Attention`` node, switched on by ``FUSED_EXPORT``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CompactMultiheadAttention"]

FUSED_EXPORT = False  # set by export_onnx(fused_attention=True); read at call time by CompactMultiheadAttention


class CompactMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with ``num_heads * head_dim != embed_dim`` allowed (pruned heads).

    Same call signature as ``nn.MultiheadAttention`` for self/cross attention; returns
    ``(output, None)`` (attention weights are not materialised).
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        inner = num_heads * head_dim
        self.in_proj = nn.Linear(embed_dim, 3 * inner, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, device=device, dtype=dtype)

    # what nn.TransformerEncoderLayer reads of its self_attn; False keeps it off its fused fast path, whose
    # kernel assumes num_heads * head_dim == embed_dim
    _qkv_same_embed_dim = False

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention, num_heads: int | None = None) -> CompactMultiheadAttention:
        """The same function as ``module`` (packed q/k/v, no ``add_bias_kv``/``add_zero_attn``), whose
        ``in_proj_weight`` may hold only ``num_heads`` heads of width ``embed_dim // module.num_heads``."""
        num_heads = module.num_heads if num_heads is None else num_heads
        head_dim = module.in_proj_weight.shape[0] // (3 * num_heads)
        w = module.out_proj.weight
        new = cls(module.embed_dim, num_heads, head_dim, bias=module.in_proj_bias is not None,
                  batch_first=module.batch_first, dropout=module.dropout, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.in_proj.weight.copy_(module.in_proj_weight)
            if module.in_proj_bias is not None:
                new.in_proj.bias.copy_(module.in_proj_bias)
            new.out_proj.weight.copy_(w)
            if module.out_proj.bias is not None:
                new.out_proj.bias.copy_(module.out_proj.bias)
        new.in_proj.weight.requires_grad_(module.in_proj_weight.requires_grad)
        new.out_proj.weight.requires_grad_(w.requires_grad)
        new.train(module.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = False, attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        inner = self.num_heads * self.head_dim
        w, b = self.in_proj.weight, self.in_proj.bias
        if (FUSED_EXPORT and torch.onnx.is_in_onnx_export() and query is key and key is value and b is not None
                and attn_mask is None and key_padding_mask is None and not is_causal and w.layout == torch.strided):
            out = self.out_proj(_FusedAttention.apply(query, w, b, self.num_heads, inner))
            return (out if self.batch_first else out.transpose(0, 1)), None
        if query is key and key is value:
            q, k, v = F.linear(query, w, b).split(inner, dim=-1)
        else:
            if w.layout != torch.strided:  # a SparseLinear in_proj: CSR cannot be split by rows
                w = w.to_dense()
            bq, bk, bv = b.split(inner) if b is not None else (None, None, None)
            wq, wk, wv = w.split(inner)
            q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        batch, tgt, src = q.shape[0], q.shape[1], k.shape[1]
        q = q.reshape(batch, tgt, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(batch, src, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(batch, src, self.num_heads, self.head_dim).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tgt, inner))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


class _FusedAttention(torch.autograd.Function):
    """Self-attention with packed q/k/v that exports as one ONNX Runtime ``com.microsoft.Attention`` node.

    ``qkv_hidden_sizes`` lets the op take any number of kept heads (q/k/v width != residual width),
    which is what a compact model has. The PyTorch forward is the plain computation (used for tracing).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, heads: int, inner: int) -> torch.Tensor:
        q, k, v = F.linear(x, w, b).split(inner, dim=-1)
        batch, seq = x.shape[0], x.shape[1]
        q, k, v = (t.reshape(batch, seq, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, seq, inner)

    @staticmethod
    def symbolic(g, x, w, b, heads: int, inner: int):
        wt = g.op("Transpose", w, perm_i=[1, 0])  # Attention wants [hidden, 3 * inner]; folded at export
        out = g.op("com.microsoft::Attention", x, wt, b, num_heads_i=heads, qkv_hidden_sizes_i=[inner, inner, inner])
        sizes = x.type().varyingSizes() if x.type().kind() == "TensorType" else None
        if sizes is not None:  # tell the exporter the output shape: [batch, seq, inner]
            out.setType(x.type().with_sizes(list(sizes[:-1]) + [inner]))
        return out


def _merge_masks(attn_mask, key_padding_mask, dtype):
    def additive(m):
        if m is None:
            return None
        return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)

    a, k = additive(attn_mask), additive(key_padding_mask)
    if k is not None:
        k = k[:, None, None, :]
    if a is None:
        return k
    return a if k is None else a + k
