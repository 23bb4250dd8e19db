"""Capture by pieces: a model whose own forward neither traces nor exports (Python on a tensor's values, as a
vision-language model's merge of image and text tokens) is analysed through its largest submodules that export,
each with the inputs it got in one eager run; units inside a piece are found and cut, nothing crosses a piece."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ebcompile
from ebcompile.capture.graph import CAPTURE_PATHS, normalize_inputs

from checks import assert_reloads


class Block(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Untraceable(nn.Module):
    """Two towers and a head; the forward picks how often to run the second tower from numpy."""

    def __init__(self) -> None:
        super().__init__()
        self.vision = nn.Sequential(Block(), Block())
        self.text = Block()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.vision(x)
        for _ in range(int(abs(h.detach().numpy()).sum() * 1000) % 2 + 1):
            h = self.text(h)
        return self.head(h.mean(1))


def test_whole_capture_fails_and_the_pieces_are_the_towers() -> None:
    model, x = Untraceable().eval(), torch.randn(2, 5, 16)
    args, kwargs = normalize_inputs(x)
    for path in ("symbolic_trace", "export"):
        with pytest.raises(Exception):  # noqa: B017 - any failure: the whole model must not capture
            CAPTURE_PATHS[path](model, args, kwargs)
    cap = CAPTURE_PATHS["pieces"](model, args, kwargs)
    assert cap.pieces == ["vision", "text"]  # the head, a lone linear, is no piece
    assert {"vision.0.fc1.weight", "text.fc2.weight"} <= set(cap.param_of.values())


def test_neurons_inside_pieces_are_found_cut_and_compact_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = Untraceable().eval(), torch.randn(2, 5, 16)
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    plan = model._ebcompile.plan
    assert plan.capture == "export of pieces: vision, text"
    assert sorted(g.name for g in plan.groups if g.kind == "neuron") == ["text.fc1", "vision.0.fc1", "vision.1.fc1"]
    assert "head" not in {op.name for op in plan.linears}
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small.text.fc1.out_features < 32
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))
    ebcompile.save(small, tmp_path / "s")
    back = ebcompile.load(tmp_path / "s", model=Untraceable())
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x))


class LayersInAList(nn.Module):
    """Layers held in a ``ModuleList`` that the forward iterates (the list itself is never called), one of which
    does not export (Switch Transformers: the blocks under ``encoder.block``, an expert loop over token indices)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        if int(abs(x.detach().numpy()).sum() * 1000) % 2:  # the whole model does not export
            x = x * 2
        return self.head(x)


def test_pieces_are_found_inside_a_module_list_that_is_never_called() -> None:
    model, x = LayersInAList().eval(), torch.randn(2, 5, 16)
    args, kwargs = normalize_inputs(x)
    cap = CAPTURE_PATHS["pieces"](model, args, kwargs)
    assert cap.pieces == ["layers.0", "layers.1"]


@torch.fx.wrap
def _host_round_trip(x: torch.Tensor) -> torch.Tensor:
    """Host code torch.export cannot trace (numpy); ``symbolic_trace`` keeps it as one opaque call."""
    return torch.from_numpy(x.detach().numpy().copy()).to(x.dtype)


class GatedBlock(nn.Module):
    """A gated FFN (SwiGLU): each neuron is a gate row, an up row and a down column."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


class TracesButDoesNotExport(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.Sequential(Block(), GatedBlock())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(_host_round_trip(self.inp(x))).mean(1))


def test_a_model_that_traces_but_does_not_export_is_analysed_by_its_exported_pieces() -> None:
    """The whole model captures by ``symbolic_trace`` only; its units come from the one structure analysis over the
    export graphs of its pieces (no second, fx-level search)."""
    torch.manual_seed(0)
    model, x = TracesButDoesNotExport().eval(), torch.randn(2, 5, 8)
    args, kwargs = normalize_inputs(x)
    with pytest.raises(Exception):  # noqa: B017 - any failure: the whole model must not export
        CAPTURE_PATHS["export"](model, args, kwargs)
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    plan = model._ebcompile.plan
    assert plan.capture == "symbolic_trace"
    assert sorted(g.name for g in plan.groups if g.kind == "neuron") == ["blocks.0.fc1", "blocks.1.gate"]
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small.blocks[0].fc1.out_features < 32 and small.blocks[1].up.out_features == small.blocks[1].gate.out_features < 32
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


class AttentionThenNumpy(nn.Module):
    """A block whose own forward does not export (numpy), holding ``nn.MultiheadAttention`` (one ``nn.Linear`` plus
    its in-projection weight) and an FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ffn = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        scale = float(abs(x.detach().numpy()).mean() > -1)  # always 1.0, decided on the host
        return self.ffn(x) * scale


def test_multihead_attention_inside_an_unexportable_block_is_a_piece_and_its_heads_are_cut() -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(AttentionThenNumpy(), AttentionThenNumpy()).eval(), torch.randn(2, 5, 16)
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    plan = model._ebcompile.plan
    assert "0.attn" in plan.capture and sorted(g.name for g in plan.groups if g.kind == "head") == ["0.attn", "1.attn"]
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small[0].attn.num_heads < 4 or small[1].attn.num_heads < 4
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_a_decoder_whose_moe_does_not_export_is_captured_by_pieces_without_its_kv_cache() -> None:
    """DBRX: its experts loop over data-dependent token sets (no whole-model export), and a plain forward hands every
    layer a ``DynamicCache``, which export takes as no input: pieces are recorded with ``use_cache=False``, so the
    attention layers export and their heads are cut (its experts: tests/test_moe_handwritten.py)."""
    from transformers import DbrxConfig, DbrxModel

    cfg = DbrxConfig(vocab_size=99, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                     attn_config={"kv_n_heads": 2, "clip_qkv": 8, "rope_theta": 10000},
                     ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2, "moe_jitter_eps": 0,
                                 "moe_loss_weight": 0.05, "moe_normalize_expert_weights": 1.0})
    torch.manual_seed(0)
    model = DbrxModel(cfg).eval()
    x = {"input_ids": torch.randint(0, 99, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    plan = model._ebcompile.plan
    assert plan.capture == ("export of pieces: blocks.0.norm_attn_norm, blocks.0.ffn.router, blocks.1.norm_attn_norm, "
                            "blocks.1.ffn.router")  # the routers of its flat experts are pieces too
    assert [g.kind for g in plan.groups if g.kind == "head"] == ["head", "head"]
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small.blocks[0].norm_attn_norm.attn.Wqkv.out_features < 64
    with torch.no_grad():
        torch.testing.assert_close(small(**x).last_hidden_state, model(**x).last_hidden_state)


class AttentionReturningWeights(nn.Module):
    """Attention that returns ``(output, probabilities)``, as every Hugging Face attention layer does."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        probs = (q @ k.transpose(-1, -2) / 2).softmax(-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, s, -1)), probs


class LayerDroppingWeights(nn.Module):
    def __init__(self, keep_weights: bool) -> None:
        super().__init__()
        self.attn, self.ffn, self.keep_weights = AttentionReturningWeights(), Block(), keep_weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, probs = self.attn(x)
        scale = float(abs(x.detach().numpy()).mean() > -1)  # host code: the layer itself does not export
        return self.ffn(x + out) * scale, (probs.mean() if self.keep_weights else None)


class Summed(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, extra = self[0](x)
        return out if extra is None else out + extra


@pytest.mark.parametrize("keep_weights", [False, True])
def test_a_piece_output_nothing_reads_constrains_nothing(keep_weights: bool) -> None:
    """The attention weights a layer drops leave the piece but reach nothing: its heads are cut. When the caller
    does read them (here a mean of every head's probabilities), the heads stay whole."""
    torch.manual_seed(0)
    model, x = Summed(LayerDroppingWeights(keep_weights)).eval(), torch.randn(2, 5, 16)
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    plan = model._ebcompile.plan
    assert "0.attn" in plan.capture
    heads = [g.name for g in plan.groups if g.kind == "head"]
    assert heads == ([] if keep_weights else ["0.attn"])
    if not keep_weights:
        ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
        small = ebcompile.compact(model, round_to=None).eval()
        assert small[0].attn.q.out_features < 16
        with torch.no_grad():
            torch.testing.assert_close(small(x), model(x))


@dataclasses.dataclass
class PlainOutput:  # no pytree node: the capture looks into its fields
    hidden: torch.Tensor
    probs: torch.Tensor


class ReturnsWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = LayerDroppingWeights(keep_weights=False)

    def forward(self, x: torch.Tensor) -> PlainOutput:
        out, probs = self.layer.attn(x)
        scale = float(abs(x.detach().numpy()).mean() > -1)
        return PlainOutput(self.layer.ffn(x + out) * scale, probs)


def test_piece_outputs_the_model_returns_in_a_plain_dataclass_are_read() -> None:
    model, x = ReturnsWeights().eval(), torch.randn(2, 5, 16)
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    assert not [g for g in model._ebcompile.plan.groups if g.kind == "head"]  # the user gets every head's weights


class LoopedExperts(nn.Module):
    """Fused 3-D experts run by a Python loop over the experts the tokens were routed to (no export)."""

    def __init__(self, experts: int = 4, dim: int = 16, width: int = 8) -> None:
        super().__init__()
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * width, dim) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(experts, dim, width) * 0.2)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in index.unique().tolist():
            tok, slot = torch.where(index == e)
            gate, up = F.linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            out.index_add_(0, tok, F.linear(F.silu(gate) * up, self.down_proj[e]) * weight[tok, slot, None])
        return out


class Router(nn.Module):
    """A router holding its weight directly (no ``nn.Linear``), as GPT-OSS-style models do."""

    def __init__(self, experts: int = 4, dim: int = 16, top_k: int = 2) -> None:
        super().__init__()
        self.top_k, self.weight = top_k, nn.Parameter(torch.randn(experts, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, index = F.linear(x, self.weight).topk(self.top_k, dim=-1)
        return top.softmax(-1), index


class LoopedMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router, self.experts = Router(), LoopedExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weight, index = self.router(flat)
        return x + self.experts(flat, index, weight).reshape(x.shape)


def test_the_router_of_experts_whose_loop_does_not_export_is_a_piece_and_experts_are_cut(tmp_path) -> None:
    """The experts' loop over routed token sets does not export and no ``nn.Linear`` is in the layer; the router
    alone is a piece, so whole experts and the neurons inside them are found, cut and compacted exactly."""
    torch.manual_seed(0)
    model, x = nn.Sequential(LoopedMoE(), LoopedMoE()).eval(), torch.randn(2, 6, 16)
    ebcompile.prepare(model, x, ratio=0.4, structure="structured", importance="magnitude")
    plan = model._ebcompile.plan
    assert plan.capture == "export of pieces: 0.router, 1.router"
    assert sorted(g.kind for g in plan.groups) == ["expert", "expert", "neuron", "neuron"]
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    assert sum(b.experts.gate_up_proj.shape[0] for b in small) < 8
    assert all(b.router.weight.shape[0] == b.experts.gate_up_proj.shape[0] == b.experts.num_experts for b in small)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))
    assert_reloads(small, nn.Sequential(LoopedMoE(), LoopedMoE()), x, tmp_path / "s")
