"""Modules that compaction puts in place of attention modules whose head count changed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CompactMultiheadAttention"]


class CompactMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with ``num_heads * head_dim != embed_dim`` allowed (pruned heads).

    Same call signature as ``nn.MultiheadAttention`` for self/cross attention; returns
    ``(output, None)`` (attention weights are not materialised).
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        inner = num_heads * head_dim
        self.in_proj = nn.Linear(embed_dim, 3 * inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = False, attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        inner = self.num_heads * self.head_dim
        w, b = self.in_proj.weight, self.in_proj.bias
        if query is key and key is value:
            q, k, v = F.linear(query, w, b).split(inner, dim=-1)
        else:
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
