"""Capture by pieces: a model whose own forward neither traces nor exports (Python on a tensor's values, as a
vision-language model's merge of image and text tokens) is analysed through its largest submodules that export,
each with the inputs it got in one eager run; units inside a piece are found and cut, nothing crosses a piece."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ebcompile
from ebcompile.capture.graph import CAPTURE_PATHS, normalize_inputs


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
    attention layers export and their heads are cut."""
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
    assert plan.capture == "export of pieces: blocks.0.norm_attn_norm, blocks.1.norm_attn_norm"
    assert [g.kind for g in plan.groups] == ["head", "head"]
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small.blocks[0].norm_attn_norm.attn.Wqkv.out_features < 64
    with torch.no_grad():
        torch.testing.assert_close(small(**x).last_hidden_state, model(**x).last_hidden_state)
