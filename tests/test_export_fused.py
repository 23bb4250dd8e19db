"""Fused attention in the ONNX export, for every family ebcompile compacts: after a global-scope structured
ticket at p = 0.3 (uneven head counts across layers), ``export_onnx(optimize=True)`` writes exactly one fused
onnxruntime attention node per attention layer (``Attention`` / ``MultiHeadAttention`` / ``GroupQueryAttention``)
with that layer's own head counts, fuses the norms and GELUs, and onnxruntime (CPU EP) still matches PyTorch —
in fp32 within 1e-4 and in fp16 within the stated fp16 tolerance — on the example and on other shapes.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import onnx
import pytest
import test_reshapes as reshapes
import torch
from torch import nn

import ebcompile
from ebcompile.export import export_onnx
from ebcompile.export.optimize import FUSED_ATTENTION_OPS

import zoo

RATIO = 0.3


@pytest.fixture(autouse=True, scope="module")
def quiet_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)


def _hf(name: str) -> nn.Module:
    import transformers as t

    text = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64, vocab_size=zoo.VOCAB,
                max_position_embeddings=24)
    image = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64, image_size=16,
                 patch_size=4, num_labels=3)
    return {
        "hf-gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_inner=64, vocab_size=zoo.VOCAB,
                                                          n_positions=16, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
        "hf-bert": lambda: t.BertForSequenceClassification(t.BertConfig(**text)),
        "hf-roberta": lambda: t.RobertaForSequenceClassification(t.RobertaConfig(**text, pad_token_id=1)),
        "hf-vit": lambda: t.ViTForImageClassification(t.ViTConfig(**image)),
        "hf-deit": lambda: t.DeiTForImageClassification(t.DeiTConfig(**image)),
        "hf-swin": lambda: t.SwinForImageClassification(t.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2],
                                                                     num_heads=[4], window_size=4, num_labels=3)),
    }[name]()


def _torchvision(name: str) -> nn.Module:
    from torchvision.models import SwinTransformer, VisionTransformer

    if name == "tv-vit":
        return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5)
    return SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2], num_heads=[4], window_size=[4, 4], num_classes=5)


def _image(batch: int = 2, seed: int = 1, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# name -> (constructor, example inputs, attention layers)
FAMILIES = {
    "tv-vit": (lambda: _torchvision("tv-vit"), _image, 2),
    "tv-swin": (lambda: _torchvision("tv-swin"), _image, 2),  # one stage: shifted and unshifted windows
    **{n: (functools.partial(_hf, n), zoo.text_batch, 2) for n in ("hf-gpt2", "hf-bert", "hf-roberta")},
    **{n: (functools.partial(_hf, n), lambda: {"pixel_values": _image()}, 2) for n in ("hf-vit", "hf-deit")},
    "hf-swin": (functools.partial(_hf, "hf-swin"), lambda: {"pixel_values": _image()}, 2),
    **{n: (zoo.ZOO[n].make, zoo.ZOO[n].batch, 2) for n in ("llama", "qwen2", "mistral", "gptj", "codegen", "gpt-bigcode", "minicpm3",
                                                          "deepseek-v3", "nanogpt",
                                                          "tenc-post",
                                                          "distilbert", "t5-encoder",
                                                          "timm-vit")},
    **{b.__name__: (functools.partial(reshapes.Net, b, 24, 6), lambda: reshapes.batch(2, 7), 2)
       for b in (reshapes.ChunkMatmul, reshapes.SliceSDPA, reshapes.SeparateProjections)},
}


@functools.cache
def _compact(name: str) -> tuple[nn.Module, object]:
    """The family's model, ticketed globally at p = 0.3 with perturbed weights (layers differ), and compacted."""
    make, inputs, _ = FAMILIES[name]
    if name == "timm-vit":
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = make().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
            p.mul_(torch.rand(p.shape, generator=g) * 2)
    x = inputs()
    ebcompile.prepare(model, x, ratio=RATIO, structure="structured", scope="global")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    return ebcompile.compact(model).eval(), x


def _fused_nodes(path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type in FUSED_ATTENTION_OPS]


def _heads(node: onnx.NodeProto) -> tuple[int, int]:
    attrs = {a.name: a.i for a in node.attribute}
    return attrs["num_heads"], attrs.get("kv_num_heads", attrs["num_heads"])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_one_fused_attention_node_per_layer_and_ort_matches(name, tmp_path):
    model, x = _compact(name)
    report = export_onnx(model, tmp_path / "m.onnx", x, optimize=True)  # verifies: |ort - torch| <= 1e-4 + 1e-4 |torch|
    assert report.optimized and report.tolerance == (1e-4, 1e-4) and report.max_abs_error is not None
    nodes = _fused_nodes(tmp_path / "m.onnx")
    assert len(nodes) == FAMILIES[name][2], report.notes
    assert sum(report.op_counts.get(op, 0) for op in FUSED_ATTENTION_OPS) == len(nodes)
    assert report.op_counts.get("Softmax", 0) == 0, report.notes  # no attention left as MatMul-Softmax-MatMul
    assert not any("not fused" in n for n in report.notes), report.notes
    fused_norms = sum(report.op_counts.get(op, 0) for op in ("LayerNormalization", "SkipLayerNormalization",
                                                              "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"))
    assert fused_norms >= 1 and "Sqrt" not in report.op_counts, report.op_counts  # every norm fused


def test_head_counts_are_each_layers_own_after_a_global_ticket(tmp_path):
    """GQA decoder: num_heads / kv_num_heads of every node are the compact layer's, and layers differ."""
    model, x = _compact("llama")
    report = export_onnx(model, tmp_path / "m.onnx", x, optimize=True)
    assert report.op_counts.get("SkipSimplifiedLayerNormalization", 0) >= 2, report.op_counts  # RMSNorm + residual
    want = [(a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim)
            for a in (layer.self_attn for layer in model.model.layers)]
    got = [_heads(n) for n in _fused_nodes(tmp_path / "m.onnx")]
    assert got == want and len(set(got)) > 1, got
    assert {n.op_type for n in _fused_nodes(tmp_path / "m.onnx")} == {"GroupQueryAttention"}


@pytest.mark.parametrize("name", ["llama", "hf-bert", "nanogpt"])
def test_fused_export_keeps_batch_and_sequence_dynamic(name, tmp_path):
    import onnxruntime as ort

    model, x = _compact(name)
    export_onnx(model, tmp_path / "m.onnx", x, optimize=True)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    if name == "nanogpt":
        other = {"input": zoo.token_batch(batch=3, seq=5, seed=5)}
    else:
        other = zoo.text_batch(batch=3, seq=6, seed=5)
    feeds = {k: v.numpy() for k, v in other.items()}
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = zoo.main_output(model(other["input"]) if name == "nanogpt" else model(**other))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "hf-gpt2", "tv-swin"])
def test_fp16_fused_export_within_the_fp16_tolerance(name, tmp_path):
    model, x = _compact(name)
    report = export_onnx(copy.deepcopy(model), tmp_path / "h.onnx", x, optimize=True, dtype="fp16")
    assert report.tolerance == (2e-2, 2e-2) and report.max_abs_error is not None
    assert len(_fused_nodes(tmp_path / "h.onnx")) == FAMILIES[name][2]


def test_unfusable_attention_is_named_in_the_notes(tmp_path):
    """Scores clipped before the softmax cannot be one attention node: the export says which module and why."""

    class Clipped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
            att = (q @ k.transpose(-2, -1)).clamp(-5, 5).softmax(dim=-1)
            return self.out((att @ v).transpose(1, 2).flatten(2))

    torch.manual_seed(0)
    model = nn.Sequential(Clipped()).eval()
    report = export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 5, 16), optimize=True)
    assert report.op_counts.get("MultiHeadAttention", 0) == 0 and report.op_counts.get("Softmax") == 1
    assert any(n.startswith("attention in 0 not fused") for n in report.notes), report.notes


def test_fused_attention_off_keeps_the_plain_graph(tmp_path):
    model, x = _compact("nanogpt")
    report = export_onnx(model, tmp_path / "m.onnx", x, fused_attention=False)
    assert report.op_counts.get("Softmax") == 2 and not _fused_nodes(tmp_path / "m.onnx")


class InPlaceOnProbabilities(nn.Module):
    """softmax, then an in-place change of the probabilities: a fused node cannot hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
        p = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
        p.mul_(0.5)
        return self.out((p @ v).transpose(1, 2).reshape(b, t, c))


def test_in_place_change_of_the_probabilities_is_left_unfused(tmp_path):
    torch.manual_seed(0)
    report = export_onnx(InPlaceOnProbabilities(), tmp_path / "m.onnx", torch.randn(2, 5, 8), optimize=True)
    assert not any(op in report.op_counts for op in FUSED_ATTENTION_OPS)
    assert any("not fused" in n and "in place" in n for n in report.notes), report.notes
