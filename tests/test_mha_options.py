"""``nn.MultiheadAttention`` options: ``kdim``/``vdim`` (separate q/k/v weights) and ``add_zero_attn`` compact like
the packed module, and every stock module exports with dynamic batch and sequence axes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ebcompile
from ebcompile.export import export_onnx
from ebcompile.export.onnx import ort_session
from ebcompile.modules import CompactMultiheadAttention


class Attend(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, **options)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.attn(x, memory, memory, need_weights=False)[0])


def _compacted(options: dict, memory_width: int):
    torch.manual_seed(0)
    model = Attend(**options)
    example = (torch.randn(2, 8, 32), torch.randn(2, 10, memory_width))
    ebcompile.prepare(model, example, ratio=0.5, structure="structured", importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    return model.eval(), ebcompile.compact(model, round_to=None).eval()


@pytest.mark.parametrize(("options", "width"), [
    ({"kdim": 48, "vdim": 48}, 48),
    ({"kdim": 48, "vdim": 48, "add_zero_attn": True}, 48),
    ({"add_zero_attn": True}, 32),
    ({"kdim": 48, "vdim": 48, "bias": False}, 48),
])
def test_separate_qkv_and_zero_attn_compact_like_the_masked_model(options, width):
    masked, small = _compacted(options, width)
    attn = small.attn
    assert isinstance(attn, CompactMultiheadAttention) and attn.num_heads < 4
    if "kdim" in options:  # the stock tensor names, sliced to the kept heads
        assert attn.k_proj_weight.shape == (attn.num_heads * 8, options["kdim"])
        assert attn.v_proj_weight.shape == (attn.num_heads * 8, options["vdim"])
    torch.manual_seed(1)
    x, memory = torch.randn(3, 5, 32), torch.randn(3, 7, width)  # another batch and other lengths
    with torch.no_grad():
        torch.testing.assert_close(small(x, memory), masked(x, memory), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"kdim": 24, "vdim": 40}, {"add_zero_attn": True}])
def test_compact_module_of_all_heads_is_the_stock_function(options):
    """Masks, padding, unbatched inputs and the returned attention weights, as nn.MultiheadAttention computes them."""
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(16, 4, **options).eval()
    mine = CompactMultiheadAttention.from_module(stock).eval()
    q, k, v = torch.randn(5, 2, 16), torch.randn(6, 2, options.get("kdim", 16)), torch.randn(6, 2, options.get("vdim", 16))
    pad = torch.tensor([[False] * 5 + [True], [False] * 6])
    causal = torch.ones(5, 6, dtype=torch.bool).triu(2)  # a boolean mask, like the padding one
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": causal, "key_padding_mask": pad},
                       {"average_attn_weights": False}):
            want, want_w = stock(q, k, v, need_weights=True, **kwargs)
            got, got_w = mine(q, k, v, need_weights=True, **kwargs)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got_w, want_w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine(q[:, 0], k[:, 0], v[:, 0])[0], stock(q[:, 0], k[:, 0], v[:, 0])[0], rtol=1e-4, atol=1e-5)


class Encoder(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)
        self.dim = 1 if batch_first else 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids)).mean(self.dim))


class Weights(nn.Module):
    """Cross attention whose averaged attention weights (the stock default, need_weights=True) are an output."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)

    def forward(self, x: torch.Tensor, memory: torch.Tensor):
        return self.attn(x, memory, memory)


def _run(path, feeds: dict) -> list:
    session = ort_session(path, prefer_gpu=False)
    return session.run(None, {i.name: f for i, f in zip(session.get_inputs(), feeds.values())})


@pytest.mark.parametrize("batch_first", [False, True])
def test_stock_transformer_exports_dynamic_in_batch_and_sequence(tmp_path, batch_first):
    torch.manual_seed(0)
    model = Encoder(batch_first).eval()
    example, other = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (3, 13))
    if not batch_first:
        example, other = example.T.contiguous(), other.T.contiguous()
    axes = {"input": {0: "batch", 1: "sequence"} if batch_first else {0: "sequence", 1: "batch"}, "output": {0: "batch"}}
    export_onnx(model, tmp_path / "enc.onnx", example, dynamic_axes=axes)
    assert type(model.enc.layers[0].self_attn) is nn.MultiheadAttention  # the caller's model is left as it was
    with torch.no_grad():
        want = model(other).numpy()
    np.testing.assert_allclose(_run(tmp_path / "enc.onnx", {"ids": other.numpy()})[0], want, rtol=1e-4, atol=1e-5)


def test_stock_cross_attention_and_its_weights_export_dynamic(tmp_path):
    torch.manual_seed(0)
    model = Weights().eval()
    example = (torch.randn(2, 5, 16), torch.randn(2, 7, 8))
    axes = {n: {0: "batch", 1: "query" if n != "memory" else "keys"} for n in ("x", "memory", "output_0")}
    axes["output_1"] = {0: "batch", 1: "query", 2: "keys"}
    report = export_onnx(model, tmp_path / "w.onnx", example, input_names=["x", "memory"], dynamic_axes=axes)
    assert len(report.op_counts) and report.max_abs_error is not None
    x, memory = torch.randn(3, 4, 16), torch.randn(3, 9, 8)
    with torch.no_grad():
        want = [t.numpy() for t in model(x, memory)]
    got = _run(tmp_path / "w.onnx", {"x": x.numpy(), "memory": memory.numpy()})
    assert len(got) == 2
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
