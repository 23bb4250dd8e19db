"""One ``Family`` record per model family: every fact about it that its graph does not show, in one place.

A family the structure analysis finds (heads, KV groups, FFN neurons, experts followed in the graph; counts
rewritten through the shared names of ``families.vocabulary``) needs no record at all. A record exists for what is
left: how to recognise the model (Hugging Face ``config.model_type``, or a class name for torchvision / timm), the
onnxruntime optimizer type its fused export uses, and — for an attention module the graph cannot see into — the
``AttentionFamily`` that names its projections and heads and rewrites it after compaction.

Readers: ``export.optimize`` (the optimizer type), and through ``attention`` the registry that ``prepare``,
``compact``, ``report`` and ``load`` consult. A new family is one ``register_record(Family(...))`` call, from the
library's own files or the user's (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from . import hf_gpt2, hf_separate_qkv, torch_mha, torchvision_swin
from .registry import FAMILIES, AttentionFamily, register

__all__ = ["Family", "RECORDS", "record_of", "register_record"]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...] = ()  # Hugging Face ``config.model_type`` values
    classes: tuple[str, ...] = ()  # model class names (torchvision, timm), matched along the class's MRO
    ort_model_type: str | None = None  # ``onnxruntime.transformers`` optimizer model_type of the fused export
    attention: AttentionFamily | None = None  # an attention module the graph cannot see into


RECORDS: list[Family] = [
    Family("bert", ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert", "deberta",
                    "mpnet"), ort_model_type="bert", attention=hf_separate_qkv.FAMILY),
    Family("gpt2", ("gpt2", "decision_transformer"), ort_model_type="gpt2", attention=hf_gpt2.FAMILY),
    Family("gpt-neox", ("gpt_neox",), ort_model_type="gpt_neox"),
    Family("vit", ("vit", "deit", "beit", "dinov2"), ("VisionTransformer",), ort_model_type="vit",
           attention=hf_separate_qkv.FAMILY),
    Family("swin", ("swin", "swinv2"), ort_model_type="swin", attention=hf_separate_qkv.FAMILY),
    Family("torchvision-swin", classes=("SwinTransformer",), ort_model_type="swin", attention=torchvision_swin.FAMILY),
    Family("t5", ("t5", "mt5"), ort_model_type="t5"),
    Family("bart", ("bart",), ort_model_type="bart"),
    Family("clip", ("clip",), ort_model_type="clip"),
    Family("phi", ("phi",), ort_model_type="phi"),
    Family("llama", ("llama", "mistral", "qwen2", "gemma"), ort_model_type="gpt2"),  # decoders fuse as GPT-2 does
    Family("qwen3", ("qwen3",), ort_model_type="qwen3"),
    Family("torch-mha", attention=torch_mha.FAMILY),  # nn.MultiheadAttention inside any model
]


def register_record(family: Family) -> Family:
    """Add ``family`` (from your own file, before ``prepare``); its ``attention``, if any, joins the registry that
    ``prepare``, ``compact`` and ``load`` consult. A name or ``model_type`` already recorded is refused."""
    taken = {t for r in RECORDS for t in r.model_types} & set(family.model_types)
    if any(r.name == family.name for r in RECORDS) or taken:
        raise ConfigError(f"family {family.name!r} is already recorded (name or model_type {sorted(taken)}). Fix: give "
                          "it another name, or leave the built-in record in place.")
    if family.attention is not None and family.attention not in FAMILIES:
        register(family.attention)
    RECORDS.append(family)
    return family


def record_of(model: nn.Module) -> Family | None:
    """The record of ``model``'s family: by its config's ``model_type``, else by its class (or a base class) name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type:
        found = next((r for r in RECORDS if model_type in r.model_types), None)
        if found is not None:
            return found
    names = [c.__name__ for c in type(model).__mro__]
    return next((r for n in names for r in RECORDS if n in r.classes), None)
