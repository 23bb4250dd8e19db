"""ONNX export: checker + onnxruntime (CPU EP) agree with PyTorch; failures leave no file behind."""

from __future__ import annotations

import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models import VisionTransformer

import ebcompile
from ebcompile.errors import ExportError
from ebcompile.export import export_onnx
from ebcompile.search.ticket import draw_ticket


def _ticketed_vit(layers: int, heads: int, head_dim: int, mlp: int, ratio: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=8, patch_size=4, num_layers=layers, num_heads=heads, hidden_dim=heads * head_dim,
                              mlp_dim=mlp, num_classes=5).eval()
    ebcompile.prepare(model, torch.randn(1, 3, 8, 8), ratio=ratio, structure="structured")
    with torch.no_grad():
        for p in model.parameters():  # spread the magnitudes so the ticket prunes varied units
            p.mul_(torch.rand_like(p) * 2)
    return ebcompile.apply_ticket(model, draw_ticket(model))


@settings(max_examples=16, deadline=None)
@given(layers=st.integers(1, 2), heads=st.integers(1, 4), head_dim=st.sampled_from([4, 8]), mlp=st.sampled_from([8, 16]),
       ratio=st.sampled_from([0.1, 0.3, 0.5, 0.7]), batch=st.integers(1, 3), seed=st.integers(0, 10_000),
       fused=st.booleans())
def test_compact_vit_onnx_matches_pytorch(tmp_path_factory, layers, heads, head_dim, mlp, ratio, batch, seed, fused):
    model = _ticketed_vit(layers, heads, head_dim, mlp, ratio, seed)
    path = tmp_path_factory.mktemp("onnx") / "vit.onnx"
    report = export_onnx(model, path, torch.randn(2, 3, 8, 8), fused_attention=fused)
    assert report.providers == ["CPUExecutionProvider"] and report.max_abs_error is not None
    assert report.op_counts.get("Attention", 0) == (layers if fused else 0)
    graph = onnx.load(str(path)).graph
    assert not [i.name for i in graph.initializer if "mask" in i.name]
    # dynamic batch: another batch size than the one exported with
    import onnxruntime as ort

    x = torch.randn(batch, 3, 8, 8)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert abs(got - want).max() <= 1e-4 * (1 + abs(want).max())


def test_export_shrinks_file_with_the_ticket(tmp_path):
    dense = VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5)
    a = export_onnx(dense, tmp_path / "dense.onnx", torch.randn(1, 3, 8, 8))
    b = export_onnx(_ticketed_vit(2, 4, 8, 64, 0.5, 0), tmp_path / "pruned.onnx", torch.randn(1, 3, 8, 8))
    assert b.bytes < 0.8 * a.bytes


def test_verification_failure_raises_and_leaves_no_file(tmp_path, monkeypatch):
    import ebcompile.export.onnx as onnx_export

    real = onnx_export.run_onnxruntime

    def off_by_one(*args, **kwargs):  # onnxruntime computing something else than PyTorch
        providers, outputs = real(*args, **kwargs)
        return providers, [o + 1.0 for o in outputs]

    monkeypatch.setattr(onnx_export, "run_onnxruntime", off_by_one)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="Fix:"):
        export_onnx(model, path, torch.randn(2, 4))
    assert list(tmp_path.iterdir()) == []


def test_bad_dtype_is_a_config_error(tmp_path):
    with pytest.raises(ebcompile.EbcompileError, match="dtype"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx", torch.randn(1, 2), dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_fp16_export_verifies_within_fp16_tolerance(tmp_path):
    model = _ticketed_vit(1, 2, 8, 16, 0.5, 1)
    report = export_onnx(model, tmp_path / "h.onnx", torch.randn(2, 3, 8, 8), dtype="fp16")
    assert report.tolerance == (2e-2, 2e-2)


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(["swin", "swin_v2", "mlp"]), heads=st.integers(1, 3), ratio=st.sampled_from([0.3, 0.5]),
       batch=st.integers(1, 2), seed=st.integers(0, 10_000))
def test_compact_swin_and_mlp_onnx_match_pytorch(tmp_path_factory, kind, heads, ratio, batch, seed):
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(seed)
    if kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 12), torch.nn.ReLU(),
                                    torch.nn.Linear(12, 3))
        x = torch.randn(batch, 6)
    else:
        extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if kind == "swin_v2" else {}
        model = SwinTransformer(patch_size=[2, 2], embed_dim=8 * heads, depths=[2], num_heads=[heads], window_size=[4, 4],
                                num_classes=4, **extra)
        x = torch.randn(batch, 3, 16, 16)
    model.eval()
    ebcompile.prepare(model, x, ratio=ratio, structure="structured")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) * 2)
    ebcompile.apply_ticket(model, draw_ticket(model))
    report = export_onnx(model, tmp_path_factory.mktemp("onnx") / f"{kind}.onnx", x)
    assert report.max_abs_error is not None and report.providers == ["CPUExecutionProvider"]


class _RMSBlock(torch.nn.Module):
    """``nn.RMSNorm`` (``aten::rms_norm``, which torch's ONNX exporter has no symbolic for) before a gated FFN."""

    def __init__(self, d: int = 16, affine: bool = True, eps: float | None = None) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(d, eps=eps, elementwise_affine=affine)
        self.fc1, self.fc2 = torch.nn.Linear(d, 32), torch.nn.Linear(32, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(x))))


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("affine, eps", [(True, None), (False, 1e-5)])
def test_rms_norm_exports_and_verifies_dense_and_compact(tmp_path, opset, affine, eps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(_RMSBlock(affine=affine, eps=eps), _RMSBlock(affine=affine, eps=eps)).eval()
    if affine:
        with torch.no_grad():
            for block in model:
                block.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 16)
    report = ebcompile.export_onnx(model, tmp_path / "dense.onnx", x, opset=opset)
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4
    ebcompile.prepare(model, x, ratio=0.5, structure="structured")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    report = ebcompile.export_onnx(model, tmp_path / "compact.onnx", x, opset=opset)  # compacted first
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4


def test_a_file_the_torchscript_exporter_gets_wrong_is_written_by_the_dynamo_exporter(tmp_path):
    """Cohere's three q/k/v views share the constant -1 with a later reshape in the TorchScript trace, and torch's
    TorchScript exporter writes one of them as a fixed 2: onnxruntime cannot run the file. ``export_onnx`` then
    exports with torch.onnx's dynamo exporter, verifies that file and says so in ``notes``; its batch and sequence
    axes stay dynamic."""
    import numpy as np
    from transformers import AutoConfig, AutoModel

    from ebcompile.export.onnx import ort_session

    cfg = AutoConfig.for_model("cohere", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37, max_position_embeddings=64, eos_token_id=1)
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg).eval()
    x = {"input_ids": torch.randint(0, 99, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    report = ebcompile.export_onnx(model, tmp_path / "cohere.onnx", x)
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4
    assert any("dynamo exporter" in n for n in report.notes), report.notes
    other = {"input_ids": torch.randint(0, 99, (3, 5)), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    sess = ort_session(tmp_path / "cohere.onnx")
    got = sess.run(None, {i.name: other[i.name].numpy() for i in sess.get_inputs()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(**other).last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)


def test_an_onnxruntime_failure_is_reported_by_its_node_and_cause():
    from ebcompile.export.onnx import _ort_reason

    raw = ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape node. Name:'/net/a/"
           "Reshape_2' Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/tensor/reshape_helper.h:91 "
           "onnxruntime::ReshapeHelper::ReshapeHelper(const onnxruntime::TensorShape&, onnxruntime::TensorShapeVector&, "
           "bool) input_shape_size == requested_shape_size was false. The input tensor cannot be reshaped to the "
           "requested shape. Input shape:{2,7,32}, requested shape:{2,7,2,8}")
    reason = _ort_reason(raw)
    assert "Reshape_2" in reason and "Input shape:{2,7,32}, requested shape:{2,7,2,8}" in reason and len(reason) < 300
    assert _ort_reason("a short error") == "a short error"


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_a_bfloat16_model_exports_in_the_dtype_asked(tmp_path, dtype):
    """onnxruntime's CPU kernels have no bfloat16 Mul: a bf16 model is exported from a float32 copy (``dtype='fp32'``,
    said in ``notes``) or converted to fp16 (``dtype='fp16'``); the caller's model stays bf16."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_RMSBlock(), _RMSBlock()).eval().to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    report = ebcompile.export_onnx(model, tmp_path / "m.onnx", x, dtype=dtype)
    assert report.max_abs_error is not None and any("bfloat16 weights exported as float32" in n for n in report.notes)
    elem = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.elem_type
    assert elem == (onnx.TensorProto.FLOAT if dtype == "fp32" else onnx.TensorProto.FLOAT16)
    assert next(p for p in model.parameters()).dtype == torch.bfloat16


def test_two_token_inputs_of_different_lengths_get_two_sequence_axes_where_one_fails(tmp_path):
    """A source of 10 tokens and a target of 8 through one embedding (an encoder-decoder written with torch.nn):
    with one sequence name for both the file fails on the example itself; the export then names one axis per
    length, and says so."""
    torch.manual_seed(0)

    class SrcTgt(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(30, 16), torch.nn.Linear(16, 30)
            self.encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                       batch_first=True), 1, enable_nested_tensor=False)
            self.decoder = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0,
                                                       batch_first=True), 1)

        def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
            t = tgt.shape[1]
            causal = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
            return self.head(self.decoder(self.emb(tgt), self.encoder(self.emb(src)), tgt_mask=causal))

    net = SrcTgt().eval()
    src, tgt = torch.randint(0, 30, (2, 10)), torch.randint(0, 30, (2, 8))
    report = ebcompile.export_onnx(net, tmp_path / "m.onnx", (src, tgt))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(tmp_path / "m.onnx")).graph.input}
    assert len({d[1] for d in dims.values()}) == 2, dims
    assert any("per distinct input length" in n for n in report.notes), report.notes
