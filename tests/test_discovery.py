"""Discovery across the model zoo (``tests/zoo.py``): structured pruning finds the heads and FFN neurons of
models written the way their users write them — grouped-query attention (Llama, Qwen2, Mistral), stock
``nn.TransformerEncoder``, nanoGPT's fused ``c_attn``, a hand-written SwiGLU MLP, DistilBERT, the T5 encoder,
timm's ViT — and the pipeline prepare -> EarlyBird -> apply_ticket -> compact -> export_onnx / save -> load keeps
computing what the masked model computes.

Each model is prepared (ratio 0.3, scope "layer") and ticketed once per module (``_pipeline``, cached) and
deep-copied per test.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ebcompile

import zoo
from eb_search import search

RATIO = 0.3
TOL = 1e-5
NAMES = sorted(zoo.ZOO)
HF_NAMES = [n for n in NAMES if zoo.ZOO[n].hf]
DECODERS = ["llama", "qwen2", "mistral"]


@pytest.fixture(autouse=True, scope="module")
def quiet_one_thread():
    """Tiny tensors: one intra-op thread is faster and the machine is shared; transformers stays quiet."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is a dependency
        transformers = None
    verbosity = transformers.logging.get_verbosity() if transformers else None
    if transformers:
        transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    if transformers:
        transformers.logging.set_verbosity(verbosity)


def need(name: str) -> None:
    """Skip when the zoo model comes from a package that is not installed (timm)."""
    if zoo.ZOO[name].needs:
        pytest.importorskip(zoo.ZOO[name].needs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    # relative to the output's magnitude, floored at 1e-2 (as tests/test_compact.py)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-2))


def n_params(model: nn.Module, prefix: str) -> int:
    """Parameters under module ``prefix`` (the module must exist: a renamed or dropped module is an error)."""
    model.get_submodule(prefix)
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix + "."))


@dataclass
class Pipeline:
    masked: nn.Module
    compact: nn.Module
    inputs: Any


@functools.cache
def _pipeline(name: str, kv_heads: str | None = None) -> Pipeline:
    model, inputs = zoo.build(name)
    kw = {"kv_heads": kv_heads} if kv_heads is not None else {}
    model = ebcompile.prepare(model, inputs, ratio=RATIO, structure="structured", scope="layer", **kw)
    ebcompile.apply_ticket(model, search(model, inputs))
    return Pipeline(model, ebcompile.compact(model).eval(), inputs)


def pipeline(name: str, kv_heads: str | None = None) -> Pipeline:
    need(name)
    p = _pipeline(name, kv_heads)
    return Pipeline(copy.deepcopy(p.masked), copy.deepcopy(p.compact), p.inputs)


# -- the zoo itself ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_is_seeded_and_exportable(name):
    """Not ebcompile: the zoo models run, are the same every build, and torch.export captures them."""
    need(name)
    model, inputs = zoo.build(name)
    out = zoo.output(model, inputs)
    assert torch.isfinite(out).all() and out.std() > 0.1
    assert torch.equal(zoo.output(zoo.fresh(name), inputs), out)
    for path in zoo.ZOO[name].shrink:
        assert n_params(model, path) > 0
    if isinstance(inputs, dict):
        args, kwargs = (), dict(inputs, use_cache=False) if name in DECODERS else inputs
    else:
        args, kwargs = (inputs,), {}
    torch.export.export(model, args, kwargs, strict=False)


# -- analyses ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_heads_and_ffn_neurons_are_found(name):
    need(name)
    model, inputs = zoo.build(name)
    plan = ebcompile.prepare(model, inputs, ratio=RATIO, structure="structured", scope="layer")._ebcompile.plan
    spec = zoo.ZOO[name]
    assert sum(g.kind == "head" for g in plan.groups) == spec.heads, [(g.kind, g.name) for g in plan.groups]
    assert sum(g.kind == "neuron" for g in plan.groups) == spec.ffns, [(g.kind, g.name) for g in plan.groups]
    masked = {m.tensor for g in plan.groups for m in g.members if m.masked}
    missing = [path for path in spec.shrink if not any(t.startswith(path + ".") for t in masked)]
    assert not missing, f"no group slices {missing}; skipped: {plan.skipped}"


# -- the pipeline ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_compact_shrinks_every_projection_and_ffn_linear(name):
    p = pipeline(name)
    original = zoo.fresh(name)
    grown = {path: (n_params(original, path), n_params(p.compact, path)) for path in zoo.ZOO[name].shrink}
    assert all(after < before for before, after in grown.values()), grown


@pytest.mark.parametrize("name", NAMES)
def test_compact_computes_what_the_masked_model_computes(name):
    p = pipeline(name)
    assert rel_err(zoo.output(p.masked, p.inputs), zoo.output(zoo.fresh(name), p.inputs)) > 1e-3  # the ticket bites
    assert rel_err(zoo.output(p.compact, p.inputs), zoo.output(p.masked, p.inputs)) <= TOL
    other = zoo.ZOO[name].batch(batch=3, seed=7)  # another batch too
    assert rel_err(zoo.output(p.compact, other), zoo.output(p.masked, other)) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_of_the_compact_model_verifies(name, tmp_path):
    p = pipeline(name)
    report = ebcompile.export_onnx(p.compact, tmp_path / "m.onnx", p.inputs)  # raises when onnxruntime disagrees
    assert report.max_abs_error is not None and (tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, tmp_path):
    p = pipeline(name)
    ebcompile.save(p.compact, tmp_path)
    loaded = ebcompile.load(tmp_path) if zoo.ZOO[name].hf else ebcompile.load(tmp_path, model=zoo.fresh(name))
    assert rel_err(zoo.output(loaded, p.inputs), zoo.output(p.compact, p.inputs)) <= TOL
    assert loaded.state_dict().keys() == p.compact.state_dict().keys()


@pytest.mark.parametrize("name", HF_NAMES)
def test_save_pretrained_of_a_compact_model_loads_with_ebcompile(name, tmp_path):
    """No ebcompile.json: the sizes come from the tensor shapes."""
    p = pipeline(name)
    p.compact.save_pretrained(tmp_path)
    loaded = ebcompile.load(tmp_path)
    assert rel_err(zoo.output(loaded, p.inputs), zoo.output(p.compact, p.inputs)) <= TOL
    assert sum(q.numel() for q in loaded.parameters()) == sum(q.numel() for q in p.compact.parameters())


# -- grouped-query attention -------------------------------------------------------------------------------


def _qkvo(model: nn.Module, layer: int = 0) -> dict[str, tuple[int, int]]:
    attn = model.model.layers[layer].self_attn
    return {n: tuple(getattr(attn, f"{n}_proj").weight.shape) for n in "qkvo"}


def test_llama_greedy_generation_is_identical_masked_and_compacted():
    p = pipeline("llama")
    prompt = zoo.text_batch(batch=1, seq=4, seed=5, pad=False)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    masked = p.masked.generate(**prompt, **kw)
    compact = p.compact.generate(**prompt, **kw)
    assert masked.shape == (1, 9) and torch.equal(masked, compact)


@pytest.mark.parametrize("name", DECODERS)
def test_kv_heads_prune_removes_whole_kv_groups_with_their_query_heads(name):
    p = pipeline(name, "prune")
    hd, group = zoo.HEAD_DIM, zoo.HEADS // zoo.KV_HEADS
    for layer in range(zoo.LAYERS):
        shapes = _qkvo(p.compact, layer)
        kv = shapes["k"][0] // hd
        assert shapes["k"][0] < zoo.KV_HEADS * hd and shapes["v"][0] == shapes["k"][0], shapes
        assert shapes["q"][0] == kv * group * hd and shapes["o"][1] == shapes["q"][0], shapes  # q heads follow
    assert rel_err(zoo.output(p.compact, p.inputs), zoo.output(p.masked, p.inputs)) <= TOL


@pytest.mark.parametrize("name", ["llama"])
def test_kv_heads_keep_prunes_query_heads_evenly_inside_every_kv_group(name):
    p = pipeline(name, "keep")
    hd = zoo.HEAD_DIM
    for layer in range(zoo.LAYERS):
        shapes = _qkvo(p.compact, layer)
        assert shapes["k"] == shapes["v"] == (zoo.KV_HEADS * hd, zoo.HIDDEN), shapes  # KV heads unchanged
        assert shapes["q"][0] < zoo.HEADS * hd and shapes["o"][1] == shapes["q"][0], shapes
        q_heads = shapes["q"][0] // hd
        assert shapes["q"][0] % hd == 0 and q_heads % zoo.KV_HEADS == 0, shapes  # the same count in every group
    assert rel_err(zoo.output(p.compact, p.inputs), zoo.output(p.masked, p.inputs)) <= TOL


def test_llama_layer_scope_save_pretrained_loads_in_stock_transformers(tmp_path):
    """scope="layer": every layer keeps the same counts, so the compact config describes it for stock transformers."""
    from transformers import AutoModelForCausalLM

    p = pipeline("llama")
    p.compact.save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(stock) is type(p.compact)
    assert sum(q.numel() for q in stock.parameters()) == sum(q.numel() for q in p.compact.parameters())
    assert rel_err(zoo.output(stock, p.inputs), zoo.output(p.compact, p.inputs)) <= TOL
    assert rel_err(zoo.output(stock, p.inputs), zoo.output(p.masked, p.inputs)) <= TOL


# -- extending: a family the analysis cannot follow --------------------------------------------------------


@torch.fx.wrap
def opaque_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int) -> torch.Tensor:
    """A leaf of ``symbolic_trace``: the graph sees one call, not the head split inside."""
    B, T, W = q.shape
    q, k, v = (t.reshape(B, T, n_head, W // n_head).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, W)


class OpaqueAttention(nn.Module):
    def __init__(self, dim: int = zoo.HIDDEN, heads: int = zoo.HEADS) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.n_head, self.head_dim = heads, dim // heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(opaque_attention(self.q(x), self.k(x), self.v(x), self.n_head))


class OpaqueNet(nn.Module):
    def __init__(self, block: type[nn.Module] = OpaqueAttention) -> None:
        super().__init__()
        self.inp = nn.Linear(16, zoo.HIDDEN)
        self.norms = nn.ModuleList([nn.LayerNorm(zoo.HIDDEN) for _ in range(zoo.LAYERS)])
        self.blocks = nn.ModuleList([block() for _ in range(zoo.LAYERS)])
        self.out = nn.Linear(zoo.HIDDEN, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for norm, attn in zip(self.norms, self.blocks):
            h = h + attn(norm(h))
        return self.out(h)


def _opaque_net() -> nn.Module:
    torch.manual_seed(0)
    model = OpaqueNet().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return model


def test_a_registered_family_makes_opaque_attention_prunable(tmp_path):
    from ebcompile import families
    from ebcompile.families import AttentionFamily, linear_op
    from ebcompile.plan import GroupSet, Member

    def heads(path: str, m: OpaqueAttention) -> GroupSet:
        members = [Member(f"{path}.{n}.{t}", 0, 0, m.head_dim) for n in "qkv" for t in ("weight", "bias")]
        members.append(Member(f"{path}.o.weight", 1, 0, m.head_dim))
        return GroupSet("head", path, m.q.out_features // m.head_dim, tuple(members), module=path)

    def rewrite(m: OpaqueAttention, kept: int) -> None:
        m.n_head = kept

    family = AttentionFamily("tests.OpaqueAttention", lambda m: isinstance(m, OpaqueAttention),
                             lambda path, m: [linear_op(path, n, getattr(m, n)) for n in "qkvo"], heads, rewrite)
    families.register(family)
    try:
        x = zoo.feature_batch()
        model = ebcompile.prepare(_opaque_net(), x, ratio=0.5, structure="structured", scope="layer")
        groups = [(g.kind, g.name, g.units) for g in model._ebcompile.plan.groups]
        assert [g for g in groups if g[0] == "head"] == [("head", f"blocks.{i}", zoo.HEADS) for i in range(zoo.LAYERS)]
        ebcompile.apply_ticket(model, search(model, x))
        small = ebcompile.compact(model).eval()
        for i in range(zoo.LAYERS):
            attn = small.blocks[i]
            assert attn.n_head == 2 and attn.q.out_features == attn.o.in_features == 2 * attn.head_dim
        with torch.no_grad():
            assert rel_err(small(x), model(x)) <= TOL
            ebcompile.save(small, tmp_path)
            assert rel_err(ebcompile.load(tmp_path, model=_opaque_net())(x), small(x)) <= TOL
    finally:
        if family in families.FAMILIES:
            families.FAMILIES.remove(family)


class UntraceableAttention(nn.Module):
    """Reads the residual width and its head count (``nh``, in no attribute table) at run time, behind a branch
    on a tensor shape, and merges the heads by the width as a Python int: no rewrite reaches it."""

    def __init__(self, dim: int = zoo.HIDDEN, heads: int = zoo.HEADS) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.nh = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        if q.shape[-1] % self.nh:
            raise ValueError("width not divisible by the head count")
        q, k, v = (t.view(B, T, self.nh, -1).transpose(1, 2) for t in (q, k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, int(C)))


def test_compact_holds_whole_what_it_cannot_rewrite_naming_the_module():
    """Heads found but not expressible after slicing: kept whole (a warning and plan.skipped name the module), the
    model compacts exactly, never a wrong model."""
    torch.manual_seed(0)
    model = OpaqueNet(UntraceableAttention).eval()
    x = zoo.feature_batch()
    model = ebcompile.prepare(model, x, ratio=0.3, structure="structured", scope="layer")
    assert [g.module for g in model._ebcompile.plan.groups if g.kind == "head"] == ["blocks.0", "blocks.1"]
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    with pytest.warns(UserWarning, match=r"blocks\.0.*Fix"):
        small = ebcompile.compact(model)
    assert model._ebcompile.plan.skipped["blocks.0.qkv"].startswith("kept whole at compact: blocks.0")
    assert small.blocks[0].qkv.out_features == 3 * zoo.HIDDEN
    with torch.no_grad():
        assert rel_err(small(x), model(x)) <= TOL
