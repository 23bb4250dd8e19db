"""Family facts live in one place: ``families.records`` (one record per family) and ``families.vocabulary``
(names every family shares). Checked: records recognise models by ``config.model_type`` and by class name along the
MRO, unknown models have none, each attention family a record names is the registered one, and no other module of
the package spells out a count attribute, a config field or an optimizer type table of its own."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from ebcompile.families import FAMILIES, RECORDS, record_of

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
