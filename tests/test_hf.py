"""Hugging Face transformers: attention families, GPT-2 FFN groups, the pipeline prepare -> EarlyBird ->
apply_ticket -> compact -> export_onnx / save -> load, and generation. The Trainer callback is in
tests/test_hf_trainer.py.

Tiny random configurations (tests/hf_models.py: 2 layers, 4 heads, hidden 32, intermediate 64, vocab 100, sequence 8);
nothing is downloaded. Each architecture is prepared and ticketed once per module (``pipeline``) and copied per test.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import GPT2LMHeadModel  # noqa: E402

import ebcompile  # noqa: E402
from ebcompile.errors import CheckpointError, NoPrunableLayerError  # noqa: E402
from ebcompile.export.onnx import ort_session  # noqa: E402
from ebcompile.families import family_of  # noqa: E402

from eb_search import search  # noqa: E402
from hf_models import (  # noqa: E402
    ARCHS,
    TOL,
    build,
    image_batch,
    logits,
    quiet_one_thread,  # noqa: F401 - an autouse fixture: one thread, quiet transformers
    text_batch,
)

# -- one ticketed model per architecture -------------------------------------------------------------------


@dataclass
class Pipeline:
    masked: nn.Module
    compact: nn.Module
    inputs: dict[str, torch.Tensor]


@functools.cache
def _pipeline(name: str) -> Pipeline:
    inputs = ARCHS[name].batch()
    model = ebcompile.prepare(build(name), inputs, ratio=0.5, structure="structured", scope="layer")  # the same count per layer
    ebcompile.apply_ticket(model, search(model, inputs))
    return Pipeline(model, ebcompile.compact(model).eval(), inputs)


@pytest.fixture(params=sorted(ARCHS))
def pipeline(request) -> tuple[str, Pipeline]:
    p = _pipeline(request.param)
    return request.param, Pipeline(copy.deepcopy(p.masked), copy.deepcopy(p.compact), p.inputs)


# -- analyses ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_heads_and_ffn_neurons_are_found(name):
    inputs = ARCHS[name].batch()
    model = ebcompile.prepare(build(name), inputs, structure="structured")
    plan = model._ebcompile.plan
    kinds = {g.kind for g in plan.groups}
    assert kinds == {"head", "neuron"}
    layers = 4 if name == "swin" else 2
    assert sum(g.kind == "head" for g in plan.groups) == layers
    assert sum(g.kind == "neuron" for g in plan.groups) == layers
    assert type(model).__name__ == type(ARCHS[name].build()).__name__  # the user's class, not a wrapper
    assert all(op.kind != "output" for op in plan.linears)  # the classifier / lm_head is left alone


def test_deit_heads_compact_like_vit():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(0)
    config = DeiTConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64, image_size=32,
                        patch_size=8, num_labels=3)
    inputs = image_batch()
    model = ebcompile.prepare(DeiTForImageClassificationWithTeacher(config).eval(), inputs, ratio=0.5, structure="structured")
    assert [g.kind for g in model._ebcompile.plan.groups] == ["head", "head", "neuron", "neuron"]
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    compact = ebcompile.compact(model)
    assert compact.deit.layers[0].attention.num_attention_heads == 2
    torch.testing.assert_close(logits(compact, inputs), logits(model, inputs), **TOL)


def test_gpt2_groups_follow_fused_conv1d_layout():
    model = ebcompile.prepare(build("gpt2-lm"), text_batch(), structure="structured")
    groups = {g.name: g for g in model._ebcompile.plan.groups}
    head = groups["transformer.h.0.attn"]
    members = {(m.tensor.rsplit(".", 2)[-2] + "." + m.tensor.rsplit(".", 1)[-1], m.dim, m.offset, m.unit_size)
               for m in head.members}
    assert members == {("c_attn.weight", 1, 0, 8), ("c_attn.weight", 1, 32, 8), ("c_attn.weight", 1, 64, 8),
                       ("c_attn.bias", 0, 0, 8), ("c_attn.bias", 0, 32, 8), ("c_attn.bias", 0, 64, 8),
                       ("c_proj.weight", 0, 0, 8)}
    ffn = groups["transformer.h.0.mlp.c_fc"]
    assert ffn.units == 64 and {(m.tensor.split(".")[-2], m.dim) for m in ffn.members} == {
        ("c_fc", 1), ("c_fc", 0), ("c_proj", 0)}
    assert model._ebcompile.plan.skipped == {"lm_head": model._ebcompile.plan.skipped["lm_head"]}


def test_swin_relative_position_table_follows_heads():
    model = ebcompile.prepare(build("swin"), image_batch(), structure="structured")
    head = next(g for g in model._ebcompile.plan.groups if g.kind == "head")
    table = [m for m in head.members if m.tensor.endswith("relative_position_bias_table")]
    assert len(table) == 1 and table[0].dim == 1 and not table[0].masked


class DecomposedGelu(nn.Module):
    """fc1 -> tanh-GELU spelled out (one value with many users) -> fc2, optionally with a residual."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.residual = nn.Linear(16, 16), nn.Linear(16, 16), residual
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        a = 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0))))
        if self.residual:
            a = a + x  # an outside tensor: fc1's neurons no longer map one-to-one onto fc2's inputs
        return self.head(self.fc2(a))


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_ffn_region_with_shared_pointwise_values_is_grouped(method):
    model = ebcompile.prepare(DecomposedGelu(False), torch.randn(2, 16), structure="structured", capture_method=method)
    assert [(g.kind, g.name) for g in model._ebcompile.plan.groups] == [("neuron", "fc1")]


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_residual_add_stops_the_ffn_region(method):
    with pytest.raises(NoPrunableLayerError):
        ebcompile.prepare(DecomposedGelu(True), torch.randn(2, 16), structure="structured", capture_method=method)


# -- the pipeline ------------------------------------------------------------------------------------------


def test_compact_computes_what_the_masked_model_computes(pipeline):
    name, p = pipeline
    assert not torch.allclose(logits(build(name), p.inputs), logits(p.masked, p.inputs), **TOL)  # the ticket bites
    torch.testing.assert_close(logits(p.compact, p.inputs), logits(p.masked, p.inputs), **TOL)
    other = ARCHS[name].batch(batch=3, seed=7)  # another batch (and padding) too
    torch.testing.assert_close(logits(p.compact, other), logits(p.masked, other), **TOL)
    assert sum(q.numel() for q in p.compact.parameters()) < sum(q.numel() for q in build(name).parameters())
    for path, m in p.compact.named_modules():
        if family_of(m) is not None and path:
            assert family_of(m).heads(path, m).units == (1 if name == "swin" and "layers.0" in path else 2)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_default_prepare_is_structured_global_and_compacts_exactly(name):
    """prepare's defaults (structure auto -> structured, global scope): layers keep different head counts."""
    inputs = ARCHS[name].batch()
    model = ebcompile.prepare(build(name), inputs, ratio=0.5)
    assert (model._ebcompile.structure, model._ebcompile.scope) == ("structured", "global")
    with torch.no_grad():  # spread the heads' magnitudes so that a global ranking is not a per-layer one
        attentions = [m for path, m in model.named_modules() if path and family_of(m) is not None]
        for i, m in enumerate(attentions):
            for q in m.parameters():
                q.mul_(1.0 + i)
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model).eval()
    kept = [family_of(m).heads(path, m).units for path, m in small.named_modules() if path and family_of(m) is not None]
    assert len(set(kept)) > 1, kept
    model.eval()
    torch.testing.assert_close(logits(small, inputs), logits(model, inputs), **TOL)
    other = ARCHS[name].batch(batch=3, seed=7)
    torch.testing.assert_close(logits(small, other), logits(model, other), **TOL)


@pytest.mark.parametrize("name", ["gpt2-cls", "bert", "swin"])
def test_compact_with_optimizer_retrains_like_the_masked_model(name):
    """AdamW moments follow the kept heads and neurons (Conv1D's [in, out] layout, BERT's q/k/v, Swin's table)."""
    base = _pipeline(name)
    masked, twin = copy.deepcopy(base.masked), copy.deepcopy(base.masked)
    labels = torch.tensor([0, 1])
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01) for m in (masked, twin)]

    def train(model, opt, steps):
        for _ in range(steps):  # eval mode: no dropout, so both runs see the same function
            opt.zero_grad()
            model(**base.inputs, labels=labels).loss.backward()
            opt.step()

    train(masked, opts[0], 2)
    train(twin, opts[1], 2)
    small = ebcompile.compact(twin, optimizer=opts[1])
    train(masked, opts[0], 2)
    train(small, opts[1], 2)
    torch.testing.assert_close(logits(small, base.inputs), logits(masked, base.inputs), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits(small, base.inputs), logits(base.compact, base.inputs), rtol=1e-4, atol=1e-5)


def test_compact_attributes_follow_the_kept_heads():
    p = _pipeline("gpt2-lm")
    attn = p.compact.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf, attn.c_attn.nx) == (2, 16, 48, 32)
    assert (attn.c_proj.nx, attn.c_proj.nf) == (16, 32)
    bert = _pipeline("bert").compact.bert.encoder.layer[0].attention
    assert (bert.self.num_attention_heads, bert.self.all_head_size, bert.self.query.out_features) == (2, 16, 16)
    assert bert.output.dense.in_features == 16
    swin = _pipeline("swin").compact.swin.encoder.layers[1].blocks[0].attention
    assert swin.num_attention_heads == 2 and swin.relative_position_bias.relative_position_bias_table.shape[1] == 2


def test_onnx_matches_pytorch(pipeline, tmp_path):
    name, p = pipeline
    report = ebcompile.export_onnx(p.masked, tmp_path / "m.onnx", p.inputs, verify=True)
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4
    assert not any("mask" in op.lower() for op in report.op_counts)


@pytest.mark.parametrize("name", ["gpt2-lm", "gpt2-cls", "roberta"])
def test_onnx_has_dynamic_batch_and_sequence(name, tmp_path):
    p = _pipeline(name)
    ebcompile.export_onnx(p.masked, tmp_path / "m.onnx", p.inputs)
    session = ort_session(tmp_path / "m.onnx", prefer_gpu=False)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    other = text_batch(batch=3, seq=5, seed=3)
    got = session.run(None, {k: v.numpy() for k, v in other.items()})[0]
    np.testing.assert_allclose(got, logits(p.compact, other).numpy(), rtol=1e-4, atol=1e-5)


def test_save_load_round_trip(pipeline, tmp_path):
    name, p = pipeline
    ebcompile.save(p.masked, tmp_path)  # a prepared model with a ticket is saved compacted
    assert sorted(x.name for x in tmp_path.iterdir()) == ["config.json", "ebcompile-files.json", "ebcompile.json",
                                                          "model.safetensors"]
    meta = json.loads((tmp_path / "ebcompile.json").read_text())
    assert set(meta["heads"].values()) <= {1, 2}
    loaded = ebcompile.load(tmp_path)
    assert type(loaded) is type(p.compact) and not loaded.training
    torch.testing.assert_close(logits(loaded, p.inputs), logits(p.compact, p.inputs), **TOL)
    assert loaded.state_dict().keys() == p.compact.state_dict().keys()


def test_save_load_keeps_gpt2_tied_embeddings(tmp_path):
    p = _pipeline("gpt2-lm")
    ebcompile.save(p.compact, tmp_path)
    assert json.loads((tmp_path / "ebcompile.json").read_text())["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = ebcompile.load(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_save_load_torchvision_model_needs_a_fresh_model(tmp_path):
    from conftest import image_batch as tv_batch
    from conftest import make_vit

    x = tv_batch()
    model = ebcompile.prepare(make_vit(), x, ratio=0.5, structure="structured")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    ebcompile.save(model, tmp_path)
    with pytest.raises(CheckpointError):
        ebcompile.load(tmp_path)
    loaded = ebcompile.load(tmp_path, model=make_vit())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ebcompile.compact(model).eval()(x), **TOL)


def test_bad_checkpoints_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        ebcompile.load(tmp_path / "missing")
    ebcompile.save(_pipeline("bert").compact, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError):
        ebcompile.load(tmp_path)
    (tmp_path / "ebcompile.json").write_text("{broken")
    with pytest.raises(CheckpointError):
        ebcompile.load(tmp_path)
    (tmp_path / "ebcompile.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError):
        ebcompile.load(tmp_path)
    other = tmp_path / "other"
    ebcompile.save(_pipeline("bert").compact, other)
    with pytest.raises(CheckpointError):  # a checkpoint of another architecture
        ebcompile.load(other, model=build("gpt2-cls"))


# -- the user's PreTrainedModel keeps working --------------------------------------------------------------


def test_gpt2_greedy_generation_is_identical_masked_and_compacted():
    p = _pipeline("gpt2-lm")
    prompt = text_batch(batch=1, seq=4, seed=5, pad=False)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    masked = p.masked.generate(**prompt, **kw)
    compact = p.compact.generate(**prompt, **kw)
    assert masked.shape == (1, 10) and torch.equal(masked, compact)


def test_prepared_model_computes_a_loss_and_saves_with_save_pretrained(tmp_path):
    inputs = text_batch()
    model = ebcompile.prepare(build("gpt2-lm"), dict(inputs, labels=inputs["input_ids"]), structure="structured")
    assert model(**inputs, labels=inputs["input_ids"]).loss.isfinite()
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    model.save_pretrained(tmp_path)
    assert model.lm_head.weight is model.transformer.wte.weight
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()  # *_mask keys are ignored, weights are masked
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), **TOL)
