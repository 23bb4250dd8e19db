"""Family facts live in one place: ``families.records`` (one record per family) and ``families.vocabulary``
(names every family shares). Checked: records recognise models by ``config.model_type`` and by class name along the
MRO, unknown models have none, each attention family a record names is the registered one, and no other module of
the package spells out a count attribute, a config field or an optimizer type table of its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import ebcompile
from ebcompile.errors import ConfigError
from ebcompile.families import FAMILIES, RECORDS, AttentionFamily, Family, linear_op, record_of, register_record
from ebcompile.plan import GroupSet, Member

PKG = Path(__file__).resolve().parents[1] / "ebcompile"


class _Config:
    def __init__(self, model_type: str) -> None:
        self.model_type = model_type


class _Model(nn.Module):
    def __init__(self, model_type: str) -> None:
        super().__init__()
        self.config = _Config(model_type)


def test_records_recognise_models_by_model_type_and_by_class():
    assert record_of(_Model("roberta")).ort_model_type == "bert"
    assert record_of(_Model("mistral")).name == "llama"
    assert record_of(_Model("no-such-family")) is None
    assert record_of(nn.Linear(2, 2)) is None

    class VisionTransformer(nn.Module):  # timm / torchvision name a model class, not a model_type
        pass

    class MyViT(VisionTransformer):
        pass

    assert record_of(MyViT()).ort_model_type == "vit"


def test_attention_families_of_records_are_registered_and_names_are_unique():
    for record in RECORDS:
        assert record.attention is None or record.attention in FAMILIES, record.name
    names = [r.name for r in RECORDS]
    assert len(names) == len(set(names))
    model_types = [t for r in RECORDS for t in r.model_types]
    assert len(model_types) == len(set(model_types))  # one family per model_type


def test_no_module_keeps_its_own_copy_of_the_shared_names():
    """The head-count vocabulary and the optimizer table are defined once (families/), not per consumer."""
    pattern = re.compile(r'^\s*(HEAD_COUNTS|KV_COUNTS|NEURON_WIDTHS|CONFIG_FIELDS|HF_MODEL_TYPES)\s*=', re.M)
    owners = [p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if pattern.search(p.read_text())]
    assert owners == ["families/vocabulary.py"]


@torch.fx.wrap
def opaque_attention(q, k, v, n_head):
    b, t, e = q.shape
    q, k, v = (z.view(b, t, n_head, e // n_head).transpose(1, 2) for z in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, e)

class RecordedAttention(nn.Module):
    def __init__(self, dim: int = 16, n_head: int = 4) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        return self.o(opaque_attention(self.q(x), self.k(x), self.v(x), self.n_head))

class RecordedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.head = RecordedAttention(), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(x + self.attn(x))


def test_a_family_record_from_the_users_file_makes_opaque_attention_prunable():
    """docs/extending.md's family example: one record (class name, export type, opaque attention) in one file."""
    def heads(path, m):
        members = [Member(f"{path}.{n}.{t}", 0, 0, m.head_dim) for n in "qkv" for t in ("weight", "bias")]
        members.append(Member(f"{path}.o.weight", 1, 0, m.head_dim))
        return GroupSet("head", path, m.q.out_features // m.head_dim, tuple(members), module=path)

    def rewrite(m, kept):
        m.n_head = kept

    attention = AttentionFamily("tests.RecordedAttention", lambda m: isinstance(m, RecordedAttention),
                                lambda path, m: [linear_op(path, n, getattr(m, n)) for n in "qkvo"], heads, rewrite)
    record = Family("tests.recorded", classes=("RecordedNet",), ort_model_type="bert", attention=attention)
    try:
        register_record(record)
        with pytest.raises(ConfigError, match="already recorded"):
            register_record(record)
        assert attention in FAMILIES and record_of(RecordedNet()) is record
        torch.manual_seed(0)
        x = torch.randn(2, 5, 16)
        model = ebcompile.prepare(RecordedNet().eval(), x, ratio=0.5, structure="structured")
        assert [g.kind for g in model._ebcompile.plan.groups] == ["head"]
        ebcompile.apply_ticket(model, ebcompile.draw_ticket(model, 0.5))
        small = ebcompile.compact(model, round_to=None).eval()
        assert small.attn.n_head == 2 and small.attn.q.out_features == 8
        with torch.no_grad():
            torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
    finally:
        if record in RECORDS:
            RECORDS.remove(record)
        if attention in FAMILIES:
            FAMILIES.remove(attention)
