"""A hand-written Transformer in the style of Meta's reference Llama: rotary embeddings as complex numbers
(``torch.polar``, ``view_as_complex``) in a non-persistent complex buffer, grouped-query attention by
``repeat_interleave``, ``nn.RMSNorm``, a SwiGLU FFN. Prepared, cut, compacted, saved and reloaded, and exported."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import ebcompile


def precompute_freqs_cis(dim, end, theta=10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)

def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    fc = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * fc).flatten(3)
    xk_out = torch.view_as_real(xk_ * fc).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)

class Attention(nn.Module):
    def __init__(self, dim=32, n_heads=4, n_kv_heads=2):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.hd, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(n_heads * self.hd, dim, bias=False)
    def forward(self, x, freqs_cis):
        b, s, _ = x.shape
        xq = self.wq(x).view(b, s, self.n_heads, self.hd)
        xk = self.wk(x).view(b, s, self.n_kv, self.hd)
        xv = self.wv(x).view(b, s, self.n_kv, self.hd)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        rep = self.n_heads // self.n_kv
        xk, xv = xk.repeat_interleave(rep, dim=2), xv.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))

class FF(nn.Module):
    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False), nn.Linear(dim, hidden, bias=False)
    def forward(self, x): return self.w2(F.silu(self.w1(x)) * self.w3(x))

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.feed_forward = Attention(), FF()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(32, eps=1e-5), nn.RMSNorm(32, eps=1e-5)
    def forward(self, x, fc):
        h = x + self.attention(self.attention_norm(x), fc)
        return h + self.feed_forward(self.ffn_norm(h))

class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(64, 32)
        self.layers = nn.ModuleList([Block() for _ in range(2)])
        self.norm = nn.RMSNorm(32, eps=1e-5)
        self.output = nn.Linear(32, 64, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(8, 64), persistent=False)
    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        fc = self.freqs_cis[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h, fc)
        return self.output(self.norm(h))


def test_meta_style_llama_compacts_reloads_and_exports(tmp_path):
    torch.manual_seed(0)
    model, ids = Transformer().eval(), torch.randint(0, 64, (2, 9))
    ebcompile.prepare(model, ids, ratio=0.5, structure="structured", importance="magnitude")
    kinds = sorted((g.kind, g.units) for g in model._ebcompile.plan.groups)
    assert kinds == [("head", 2), ("head", 2), ("neuron", 64), ("neuron", 64)]  # KV groups of two query heads each
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    with torch.no_grad():
        masked = model(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing held whole: n_heads / n_kv are rewritten with the cut
        small = ebcompile.compact(model, round_to=None).eval()
    assert all(layer.feed_forward.w1.out_features < 64 for layer in small.layers)
    assert [(a.n_heads, a.n_kv, a.wq.out_features, a.wk.out_features) for a in (la.attention for la in small.layers)] \
        == [(2, 1, 16, 8)] * 2
    with torch.no_grad():
        torch.testing.assert_close(small(ids), masked, rtol=1e-5, atol=1e-5)
    ebcompile.save(small, tmp_path / "s")
    back = ebcompile.load(tmp_path / "s", model=Transformer()).eval()
    assert back.freqs_cis.is_complex() and torch.equal(back.freqs_cis, small.freqs_cis)  # not cast to the weights' dtype
    with torch.no_grad():
        torch.testing.assert_close(back(ids), small(ids))
    report = ebcompile.export_onnx(small, tmp_path / "small.onnx", ids)  # complex ops: the dynamo exporter writes it
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4
