"""``CompactMultiheadAttention``: ``nn.MultiheadAttention`` with any number of kept heads, and its fused
ONNX export (one ONNX Runtime ``com.microsoft.Attention`` node, switched on by ``FUSED_EXPORT``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["CompactMultiheadAttention"]

FUSED_EXPORT = False  # set by export_onnx(fused_attention=True); read at call time by CompactMultiheadAttention


class CompactMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with ``num_heads * head_dim != embed_dim`` allowed (pruned heads).

    Same call signature as ``nn.MultiheadAttention`` (batched or unbatched, self or cross attention, ``kdim``/``vdim``
    with separate ``q/k/v_proj_weight``, ``add_zero_attn``), except that ``need_weights`` defaults to False: the
    attention weights (averaged over the kept heads) are returned only when asked for, else ``(output, None)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, device=None, dtype=None, kdim: int | None = None, vdim: int | None = None,
                 add_zero_attn: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout, self.add_zero_attn = batch_first, dropout, add_zero_attn
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.packed = self.kdim == embed_dim and self.vdim == embed_dim  # one in_proj Linear, else q/k/v_proj_weight
        inner, kw = num_heads * head_dim, {"device": device, "dtype": dtype}
        if self.packed:
            self.in_proj = nn.Linear(embed_dim, 3 * inner, bias=bias, **kw)
        else:  # the stock module's names: a dense state_dict loads into it once its heads are sliced
            self.register_parameter("in_proj_weight", None)
            for name, width in (("q", embed_dim), ("k", self.kdim), ("v", self.vdim)):
                setattr(self, f"{name}_proj_weight", nn.Parameter(nn.init.xavier_uniform_(torch.empty(inner, width, **kw))))
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **kw)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)

    # what nn.TransformerEncoderLayer reads of its self_attn; False keeps it off its fused fast path, whose
    # kernel assumes num_heads * head_dim == embed_dim
    _qkv_same_embed_dim = False

    def __getattr__(self, name: str):
        """``in_proj_weight`` / ``in_proj_bias`` of a packed module are its ``in_proj`` Linear's tensors."""
        in_proj = self.__dict__.get("_modules", {}).get("in_proj")
        if in_proj is not None and name in ("in_proj_weight", "in_proj_bias"):
            return in_proj.weight if name == "in_proj_weight" else in_proj.bias
        return super().__getattr__(name)

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention, num_heads: int | None = None) -> CompactMultiheadAttention:
        """The same function as ``module`` (no ``add_bias_kv``), whose q/k/v weights may hold only ``num_heads``
        heads of width ``embed_dim // module.num_heads``."""
        if module.bias_k is not None:
            raise ConfigError("an nn.MultiheadAttention uses add_bias_kv, which CompactMultiheadAttention does not "
                              "implement. Fix: leave it unpruned (exclude=['<path>.*']).")
        num_heads = module.num_heads if num_heads is None else num_heads
        packed = module._qkv_same_embed_dim
        rows = module.in_proj_weight.shape[0] // 3 if packed else module.q_proj_weight.shape[0]
        w = module.out_proj.weight
        new = cls(module.embed_dim, num_heads, rows // num_heads, bias=module.in_proj_bias is not None,
                  batch_first=module.batch_first, dropout=module.dropout, device=w.device, dtype=w.dtype,
                  kdim=module.kdim, vdim=module.vdim, add_zero_attn=module.add_zero_attn)
        names = ["in_proj_weight"] if packed else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        pairs = [(getattr(new, n), getattr(module, n)) for n in [*names, "in_proj_bias"]]
        pairs += [(new.out_proj.weight, w), (new.out_proj.bias, module.out_proj.bias)]
        with torch.no_grad():
            for mine, theirs in pairs:
                if theirs is not None:
                    mine.copy_(theirs)
                    mine.requires_grad_(theirs.requires_grad)
        new.train(module.training)
        return new

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """q, k, v, each [batch, length, heads * head_dim]."""
        inner = self.num_heads * self.head_dim
        b = self.in_proj_bias
        if not self.packed:
            bq, bk, bv = b.split(inner) if b is not None else (None, None, None)
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj.weight
        if query is key and key is value:
            return F.linear(query, w, b).split(inner, dim=-1)
        if w.layout != torch.strided:  # a SparseLinear in_proj: CSR cannot be split by rows
            w = w.to_dense()
        bq, bk, bv = b.split(inner) if b is not None else (None, None, None)
        wq, wk, wv = w.split(inner)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = False, attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        if query.dim() == 2:  # unbatched: [length, embed]
            at = 0 if self.batch_first else 1
            out, weights = self.forward(query.unsqueeze(at), key.unsqueeze(at), value.unsqueeze(at),
                                        None if key_padding_mask is None else key_padding_mask.unsqueeze(0),
                                        need_weights, attn_mask, average_attn_weights, is_causal)
            return out.squeeze(at), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        inner = self.num_heads * self.head_dim
        b = self.in_proj_bias
        if (FUSED_EXPORT and torch.onnx.is_in_onnx_export() and query is key and key is value and b is not None
                and self.packed and not self.add_zero_attn and attn_mask is None and key_padding_mask is None
                and not is_causal and self.in_proj.weight.layout == torch.strided):
            out = self.out_proj(_FusedAttention.apply(query, self.in_proj.weight, b, self.num_heads, inner))
            weights = None
            if need_weights:  # computed apart: the exporter drops these nodes when the weights go unused
                q, k, _ = self._project(query, key, value)
                weights = _probabilities(*self._heads(q, k, k)[:2], None, False, 0.0)
                weights = weights.mean(1) if average_attn_weights else weights
            return (out if self.batch_first else out.transpose(0, 1)), weights
        q, k, v = self._heads(*self._project(query, key, value))
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype, q.shape[0], self.num_heads)
        if self.add_zero_attn:  # one more key and value, all zero, that every query may attend to
            k, v = (torch.cat([t, t.new_zeros(t.shape[:2] + (1, t.shape[3]))], dim=2) for t in (k, v))
            if mask is None and is_causal:
                mask = _causal(q.shape[2], k.shape[2] - 1, q.dtype, q.device)
            mask = None if mask is None else F.pad(mask, (0, 1))
        dropout, causal = (self.dropout if self.training else 0.0), is_causal and mask is None
        weights = _probabilities(q, k, mask, causal, dropout) if need_weights else None
        if weights is not None and dropout:  # the output from the same dropped-out probabilities
            out = weights @ v
        else:  # weights computed apart: an export drops their nodes when they go unused
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        out = self.out_proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], inner))
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[batch, length, heads * head_dim] -> [batch, heads, length, head_dim]."""
        return tuple(t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))


class ExportedMultiheadAttention(CompactMultiheadAttention):
    """A stock ``nn.MultiheadAttention`` as ``export_onnx`` traces it: the same function and call defaults
    (``need_weights=True``), with reshapes that follow the input's sizes (the stock module's TorchScript export fixes
    the example's sequence length in a Reshape)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                               is_causal)


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


def _causal(tgt: int, src: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive mask of ``is_causal``: query i sees keys 0..i."""
    return torch.zeros(tgt, src, dtype=dtype, device=device).masked_fill(
        torch.ones(tgt, src, dtype=torch.bool, device=device).triu(1), float("-inf"))


def _probabilities(q: torch.Tensor, k: torch.Tensor, mask, causal: bool, dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + mask), after dropout: [batch, heads, tgt, src]."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if causal:
        mask = _causal(q.shape[2], k.shape[2], q.dtype, q.device)
    if mask is not None:
        scores = scores + mask
    return F.dropout(scores.softmax(-1), dropout) if dropout else scores.softmax(-1)


def _merge_masks(attn_mask, key_padding_mask, dtype, batch: int, heads: int):
    """``attn_mask`` ([tgt, src], or [batch * heads, tgt, src]) and ``key_padding_mask`` ([batch, src]) as one
    additive mask that broadcasts to [batch, heads, tgt, src]."""
    def additive(m):
        if m is None:
            return None
        return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)

    a, k = additive(attn_mask), additive(key_padding_mask)
    if a is not None and a.dim() == 3:
        a = a.reshape(batch, heads, a.shape[1], a.shape[2])
    if k is not None:
        k = k[:, None, None, :]
    if a is None:
        return k
    return a if k is None else a + k
