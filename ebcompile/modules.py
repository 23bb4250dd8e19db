"""Modules that compaction puts in place of attention modules whose head count changed, and the sparse
linear that stores an unstructured ticket's weights as CSR."""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CompactMultiheadAttention",
    "CompactShiftedWindowAttention",
    "CompactShiftedWindowAttentionV2",
    "SparseLinear",
    "compact_shifted_window_attention",
]


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

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention, num_heads: int | None = None) -> "CompactMultiheadAttention":
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


FUSED_EXPORT = False  # set by export_onnx(fused_attention=True)


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


# -- torchvision Swin -------------------------------------------------------------------------------------


def compact_shifted_window_attention(
    input: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` (same arguments, same numerics) with the head width read
    from the weights (``qkv_weight`` has ``3 * num_heads * head_dim`` rows) instead of taken as
    ``C // num_heads`` of the residual width ``C``, so that any number of kept heads works.
    """
    B, H, W, C = input.shape
    inner = qkv_weight.shape[0] // 3
    head_dim = inner // num_heads
    # pad feature maps to multiples of window size
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape

    shift_size = list(shift_size)
    # if the window is larger than the feature map there is nothing to shift
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0

    # cyclic shift
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))

    # partition windows
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)

    # multi-head attention
    if logit_scale is not None and qkv_bias is not None:  # Swin V2 never uses a key bias
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        # cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
        attn = attn * logit_scale
    else:
        q = q * head_dim ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    # add relative position bias
    attn = attn + relative_position_bias

    if sum(shift_size) > 0:
        # generate attention mask
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))

    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)

    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), inner)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    C = x.size(-1)

    # reverse windows
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)

    # reverse cyclic shift
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))

    # unpad features
    x = x[:, :H, :W, :].contiguous()
    return x


torch.fx.wrap("compact_shifted_window_attention")


def _relative_position_bias(table: torch.Tensor, index: torch.Tensor, window_size: list[int]) -> torch.Tensor:
    n = window_size[0] * window_size[1]
    bias = table[index].view(n, n, -1)
    return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


torch.fx.wrap("_relative_position_bias")


class CompactShiftedWindowAttention(nn.Module):
    """torchvision ``ShiftedWindowAttention`` with ``num_heads * head_dim`` free of the residual width
    ``dim`` (pruned heads).

    Same attributes (``window_size``, ``shift_size``, ``num_heads``, ``attention_dropout``, ``dropout``,
    ``qkv``, ``proj``, ``relative_position_bias_table``, ``relative_position_index``; plus ``head_dim``),
    same state_dict keys and same forward: ``[B, H, W, dim] -> [B, H, W, dim]``. ``qkv``/``proj`` may be
    ``SparseLinear``: their CSR weights go through ``F.linear`` unchanged.
    """

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int,
                 head_dim: int | None = None, qkv_bias: bool = True, proj_bias: bool = True,
                 attention_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        if len(window_size) != 2 or len(shift_size) != 2:
            raise ValueError("window_size and shift_size must be of length 2")
        self.window_size = list(window_size)
        self.shift_size = list(shift_size)
        self.num_heads = num_heads
        self.head_dim = head_dim if head_dim is not None else dim // num_heads
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.define_relative_position_bias_table()
        self.define_relative_position_index()

    @classmethod
    def from_module(cls, module: nn.Module, num_heads: int | None = None) -> "CompactShiftedWindowAttention":
        """Take over the tensors and submodules of a (possibly sliced) torchvision Swin attention module;
        ``head_dim`` is read from ``module.qkv`` (``3 * num_heads * head_dim`` output rows)."""
        num_heads = module.num_heads if num_heads is None else num_heads
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, p in module._parameters.items():
            new.register_parameter(name, p)
        for name, b in module._buffers.items():
            new.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
        for name, child in module._modules.items():
            new.add_module(name, child)
        new.window_size, new.shift_size = list(module.window_size), list(module.shift_size)
        new.num_heads = num_heads
        new.head_dim = module.qkv.weight.shape[0] // (3 * num_heads)
        new.attention_dropout, new.dropout = module.attention_dropout, module.dropout
        new.train(module.training)
        return new

    def define_relative_position_bias_table(self) -> None:
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1), self.num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def define_relative_position_index(self) -> None:
        coords = torch.stack(torch.meshgrid(torch.arange(self.window_size[0]), torch.arange(self.window_size[1]), indexing="ij"))
        flat = torch.flatten(coords, 1)
        rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += self.window_size[0] - 1
        rel[:, :, 1] += self.window_size[1] - 1
        rel[:, :, 0] *= 2 * self.window_size[1] - 1
        self.register_buffer("relative_position_index", rel.sum(-1).flatten())

    def get_relative_position_bias(self) -> torch.Tensor:
        return _relative_position_bias(self.relative_position_bias_table, self.relative_position_index, self.window_size)

    def _logit_scale(self) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return compact_shifted_window_attention(
            x,
            self.qkv.weight,
            self.proj.weight,
            self.get_relative_position_bias(),
            self.window_size,
            self.num_heads,
            shift_size=self.shift_size,
            attention_dropout=self.attention_dropout,
            dropout=self.dropout,
            qkv_bias=self.qkv.bias,
            proj_bias=self.proj.bias,
            logit_scale=self._logit_scale(),
            training=self.training,
        )

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, window_size={self.window_size}, shift_size={self.shift_size}"


class CompactShiftedWindowAttentionV2(CompactShiftedWindowAttention):
    """torchvision ``ShiftedWindowAttentionV2`` (cosine attention, log-spaced continuous position bias)
    with any number of kept heads; adds ``logit_scale``, ``cpb_mlp`` and ``relative_coords_table``."""

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int,
                 head_dim: int | None = None, qkv_bias: bool = True, proj_bias: bool = True,
                 attention_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__(dim, window_size, shift_size, num_heads, head_dim, qkv_bias, proj_bias, attention_dropout, dropout)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
        if qkv_bias:
            length = self.qkv.bias.numel() // 3
            self.qkv.bias[length : 2 * length].data.zero_()

    def define_relative_position_bias_table(self) -> None:
        h = torch.arange(-(self.window_size[0] - 1), self.window_size[0], dtype=torch.float32)
        w = torch.arange(-(self.window_size[1] - 1), self.window_size[1], dtype=torch.float32)
        table = torch.stack(torch.meshgrid([h, w], indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
        table[:, :, :, 0] /= self.window_size[0] - 1
        table[:, :, :, 1] /= self.window_size[1] - 1
        table *= 8  # normalize to -8, 8
        table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / 3.0
        self.register_buffer("relative_coords_table", table)

    def get_relative_position_bias(self) -> torch.Tensor:
        bias = _relative_position_bias(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads),
                                       self.relative_position_index, self.window_size)
        return 16 * torch.sigmoid(bias)

    def _logit_scale(self) -> torch.Tensor | None:
        return self.logit_scale


# -- sparse storage ---------------------------------------------------------------------------------------


class SparseLinear(nn.Module):
    """``nn.Linear`` whose weight is stored in CSR form: ``values`` (a parameter, so the kept weights stay
    trainable), ``crow_indices`` and ``col_indices`` (int32 buffers where they fit).

    ``weight`` is the ``[out_features, in_features]`` CSR tensor, assembled without a copy; ``F.linear``
    accepts it, so code that reads ``module.weight`` functionally (torchvision Swin) keeps working.
    The forward is ``F.linear(x, weight, bias)``: a sparse-dense matmul, equal to the dense one up to
    float rounding. Deep copies, ``.to()``, ``state_dict`` and ``load_state_dict`` (of any nnz) work.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, nnz: int = 0, device=None, dtype=None,
                 index_dtype: torch.dtype = torch.int32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(torch.zeros(nnz, device=device, dtype=dtype))
        self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=index_dtype, device=device))
        self.register_buffer("col_indices", torch.zeros(nnz, dtype=index_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "SparseLinear":
        """Store the nonzero entries of ``weight`` ([out, in]); ``bias`` is kept dense."""
        w = weight.detach()
        csr = w.to_sparse_csr()
        out_features, in_features = w.shape
        small = csr.values().numel() < 2**31 and in_features < 2**31
        index_dtype = torch.int32 if small else torch.int64
        new = cls(in_features, out_features, bias is not None, 0, w.device, w.dtype, index_dtype)
        new.values = nn.Parameter(csr.values().clone(), requires_grad=weight.requires_grad)
        new.crow_indices = csr.crow_indices().to(index_dtype)
        new.col_indices = csr.col_indices().to(index_dtype)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return new

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        new = cls.from_dense(linear.weight, linear.bias)
        new.train(linear.training)
        return new

    @property
    def weight(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                       (self.out_features, self.in_features), check_invariants=False)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def to_dense(self) -> nn.Linear:
        """An ordinary ``nn.Linear`` with the same function."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # a checkpoint may hold another number of nonzeros: take its sizes before the usual copy
        for name in ("values", "col_indices", "crow_indices"):
            value = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.shape != current.shape:
                fresh = torch.empty(value.shape, dtype=current.dtype, device=current.device)
                if name == "values":
                    self.values = nn.Parameter(fresh, requires_grad=self.values.requires_grad)
                else:
                    setattr(self, name, fresh)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        density = self.nnz / max(self.in_features * self.out_features, 1)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, density={density:.3f}")
