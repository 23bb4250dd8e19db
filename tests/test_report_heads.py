"""``report(model).heads`` (and ``kv_heads`` for grouped-query layers) give each attention layer's true head counts,
dense and after a structured compact, for every family the tests build.

The truth is independent of what ``report`` reads (module attributes, weights over ``head_dim``, families): the
dense counts come from the model's config and the structure analysis' head groups (``plan.groups``), the compact
ones from the ticket's kept units of each group.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_moe import mixtral

import ebcompile

import zoo
from hf_models import (
    ARCHS,
    quiet_one_thread,  # noqa: F401 - autouse: one thread, transformers quiet
)
from hf_models import build as hf_build

ZOO = ("llama", "qwen2", "phi3", "falcon", "gptj", "codegen", "gpt-bigcode", "minicpm3", "deepseek-v3",
       "distilbert", "t5-encoder", "tenc-post", "nanogpt", "timm-vit")
HF = ("gpt2-lm", "bert", "vit", "swin")


def _model(name: str):
    if name in HF:
        return hf_build(name), ARCHS[name].batch()
    if name == "mixtral":
        return zoo.seeded(mixtral), zoo.text_batch()
    return zoo.build(name)


def _dense_truth(model, plan) -> dict[str, tuple[int, int]]:
    """Per head group's module: (query heads, key/value heads). A group's units are its heads, or its KV groups
    when the config says key/value heads are fewer (``kv_heads="prune"``: a unit is one KV head with its queries)."""
    cfg = getattr(model, "config", None)
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    out = {}
    for g in plan.groups:
        if g.kind != "head":
            continue
        if getattr(cfg, "multi_query", False) is True:  # one KV head (GPTBigCode): the query heads are the units
            assert g.units == heads and g.per_group == heads, (g.module, g.units, g.per_group)
            out[g.module] = (heads, 1)
        elif isinstance(heads, int) and isinstance(kv, int) and kv != heads and g.units == kv:
            out[g.module] = (heads, kv)
        else:
            if isinstance(heads, int):
                assert g.units == heads, (g.module, g.units, heads)  # the analysis agrees with the config
            out[g.module] = (g.units, g.units)
    return out


@pytest.mark.parametrize("name,scope", [(n, "layer") for n in ZOO + HF + ("mixtral",)] + [("llama", "global"), ("bert", "global")])
def test_report_heads_are_true_dense_and_compact(name, scope):
    torch.manual_seed(0)
    model, inputs = _model(name)
    dense = ebcompile.report(model)
    prepared = ebcompile.prepare(model, inputs, ratio=0.5, structure="structured", scope=scope)
    plan = prepared._ebcompile.plan
    truth = _dense_truth(prepared, plan)
    assert truth, "the analysis found no heads"
    layers = {m: [k for k in dense.heads if k == m or k.startswith(m + ".")] for m in truth}  # T5: one group, every layer
    assert all(layers.values()), layers
    assert dense.heads == {k: h for m, (h, _) in truth.items() for k in layers[m]}
    assert dense.kv_heads == {k: kv for m, (h, kv) in truth.items() if kv != h for k in layers[m]}

    ticket = ebcompile.draw_ticket(prepared)
    ebcompile.apply_ticket(prepared, ticket)
    small = ebcompile.compact(prepared)
    after = {}
    for g in plan.groups:
        if g.kind != "head":
            continue
        kept = int(ticket.masks.units[f"{g.kind}:{g.name}"].sum())
        heads, kv = truth[g.module]
        after[g.module] = (heads * kept // g.units, kv if g.per_group else kv * kept // g.units)
    rep = ebcompile.report(small)
    assert rep.heads == {k: h for m, (h, _) in after.items() for k in layers[m]}
    assert rep.kv_heads == {k: kv for m, (h, kv) in after.items() if kv != h for k in layers[m]}
    assert math.prod(rep.heads.values()) < math.prod(dense.heads.values())  # heads were removed
    if rep.kv_heads:
        assert "(kv " in str(rep)
