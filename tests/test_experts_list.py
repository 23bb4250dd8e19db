"""Mixture-of-experts layers whose experts are separate modules (``nn.ModuleList`` / ``nn.ModuleDict``): whole
experts are units next to the router whose output picks them, compact removes them (the router's rows with them),
and the compact model computes what the masked one does, saves, reloads and exports."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import ebcompile


class Expert(nn.Module):
    def __init__(self, d: int = 16, h: int = 32) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class MoE(nn.Module):
    """Top-k routing over a ModuleList, in a data-dependent loop (which torch.export cannot capture whole)."""

    def __init__(self, d: int = 16, n: int = 6, k: int = 2) -> None:
        super().__init__()
        self.gate = nn.Linear(d, n, bias=False)
        self.experts = nn.ModuleList([Expert(d) for _ in range(n)])
        self.top_k, self.num_experts = k, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        x = x.reshape(-1, d)
        w, idx = F.softmax(self.gate(x), dim=-1).topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows, slot = torch.where(idx == e)
            if rows.numel():
                out.index_add_(0, rows, self.experts[e](x[rows]) * w[rows, slot, None])
        return out.reshape(b, s, d)


class Net(nn.Module):
    """Token embedding, two residual MoE layers (``moe``: their class), an output layer."""

    def __init__(self, moe: type[nn.Module] = MoE, vocab: int = 50, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.moes = nn.ModuleList([moe(d), moe(d)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for moe in self.moes:
            x = x + moe(x)
        return self.head(x)


def _ticketed(model: nn.Module, example, ratio: float = 0.4) -> nn.Module:
    ebcompile.prepare(model, example, ratio=ratio, structure="structured", importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    return model


def test_modulelist_experts_are_units_and_compact_removes_them(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 9))
    model = Net().eval()
    ebcompile.prepare(model, ids, ratio=0.4, structure="structured", importance="magnitude")
    experts = {g.name: g for g in model._ebcompile.plan.groups if g.kind == "expert"}
    assert sorted(experts) == ["moes.0.experts", "moes.1.experts"]
    assert all(g.units == 6 and g.min_units == 2 and g.members[0].tensor.endswith("gate.weight") for g in experts.values())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(ids).sum().backward()
    opt.step()
    ticket = ebcompile.draw_ticket(model)
    ebcompile.apply_ticket(model, ticket)
    kept = [int(ticket.masks.units[f"expert:moes.{i}.experts"].sum()) for i in range(2)]
    assert all(2 <= k < 6 for k in kept)
    with torch.no_grad():
        masked = model(ids)
    small = ebcompile.compact(model, round_to=None, optimizer=opt).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(ids), masked, rtol=1e-5, atol=1e-5)
    assert [len(m.experts) for m in small.moes] == kept == [m.num_experts for m in small.moes]
    assert [m.gate.out_features for m in small.moes] == kept
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in small.parameters()}
    ebcompile.save(small, tmp_path / "small")
    back = ebcompile.load(tmp_path / "small", model=Net()).eval()
    assert [len(m.experts) for m in back.moes] == kept
    with torch.no_grad():
        torch.testing.assert_close(back(ids), small(ids))
    report = ebcompile.export_onnx(small, tmp_path / "small.onnx", ids)
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4


def test_a_list_of_layers_beside_a_linear_of_that_width_is_no_mixture_of_experts():
    """Two layers and a two-class head: the head's output picks nothing (no top-k), so no expert unit."""

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Expert(), Expert()])
            self.pick = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = x + layer(x)
            return self.pick(x).softmax(-1)

    model = Stack().eval()
    ebcompile.prepare(model, torch.randn(2, 5, 16), ratio=0.4, structure="structured", prune_output_layer=True)
    assert not [g for g in model._ebcompile.plan.groups if g.kind == "expert"]


def test_switch_transformers_experts_are_cut_and_reload_from_the_config(tmp_path):
    from transformers import SwitchTransformersConfig, SwitchTransformersModel

    cfg = SwitchTransformersConfig(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, num_experts=8, expert_capacity=100, encoder_sparse_step=1,
                                   decoder_sparse_step=1)
    torch.manual_seed(0)
    x = {"input_ids": torch.randint(0, 99, (2, 7)), "decoder_input_ids": torch.randint(0, 99, (2, 5))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _ticketed(SwitchTransformersModel(cfg).eval(), x)
    experts = [g for g in model._ebcompile.plan.groups if g.kind == "expert"]
    assert len(experts) == 4 and all(g.module.endswith("mlp.experts") for g in experts)
    with torch.no_grad():
        masked = model(**x).last_hidden_state
    small = ebcompile.compact(model, round_to=None).eval()
    sizes = [len(small.get_submodule(g.module)) for g in experts]
    assert min(sizes) < 8 and all(small.get_submodule(g.module).num_experts == n for g, n in zip(experts, sizes))
    with torch.no_grad():
        torch.testing.assert_close(small(**x).last_hidden_state, masked, rtol=1e-5, atol=1e-5)
    ebcompile.save(small, tmp_path / "s")
    back = ebcompile.load(tmp_path / "s").eval()  # rebuilt from config.json, the dropped experts dropped again
    with torch.no_grad():
        torch.testing.assert_close(back(**x).last_hidden_state, small(**x).last_hidden_state)


def test_activation_importance_ranks_modulelist_experts_by_their_routing_mass():
    """``importance="activation"``: a whole expert scores the router probability it gets over the tokens seen; the
    expert every token prefers is kept whatever its weights' size."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 9))
    model = Net().eval()
    ebcompile.prepare(model, ids, ratio=0.5, structure="structured", importance="activation")
    with torch.no_grad():  # layer 0 routes every token to expert 5 first; expert 5's weights are the smallest
        model.moes[0].gate.weight.zero_()
        model.moes[0].gate.bias = None
        model.moes[0].gate.weight[5] = 0.0
        for i in range(5):
            model.moes[0].gate.weight[i] = -0.5
        for p in model.moes[0].experts[5].parameters():
            p.mul_(1e-3)
    eb = ebcompile.EarlyBird(model, every=1)
    with torch.no_grad():
        model(ids)
    eb.step()
    ticket = ebcompile.draw_ticket(model)
    assert bool(ticket.masks.units["expert:moes.0.experts"][5])


def test_experts_indexed_by_position_get_no_expert_units_and_say_why():
    """NLLB-MoE's experts container looks its experts up by the position a one-hot takes, not by the router's
    choice: removing one would change what the others compute, so its experts are no units (the reason is in
    ``plan.skipped``) and their neurons are still cut exactly."""
    from transformers import NllbMoeConfig, NllbMoeModel

    cfg = NllbMoeConfig(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_experts=4,
                        expert_capacity=100, encoder_sparse_step=1, decoder_sparse_step=1, max_position_embeddings=64)
    torch.manual_seed(0)
    x = {"input_ids": torch.randint(3, 99, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long),
         "decoder_input_ids": torch.randint(3, 99, (2, 5))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _ticketed(NllbMoeModel(cfg).eval(), x)
    plan = model._ebcompile.plan
    assert not [g for g in plan.groups if g.kind == "expert"]
    assert "indexes experts by position" in plan.skipped["encoder.layers.0.ffn.router.classifier"]
    with torch.no_grad():
        masked = model(**x).last_hidden_state
        torch.testing.assert_close(ebcompile.compact(model, round_to=None).eval()(**x).last_hidden_state, masked)


class _SwiGLU(nn.Module):
    def __init__(self, d: int = 24, h: int = 40) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = (nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False),
                                     nn.Linear(h, d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _NamedMoE(nn.Module):
    """Top-1 by ``torch.max``, experts in a ModuleDict under names (no numbers), looked up in order, a shared expert."""

    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.router = nn.Linear(d, 5)
        self.experts = nn.ModuleDict({name: _SwiGLU(d) for name in "abcde"})
        self.shared = _SwiGLU(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        top, idx = torch.max(self.router(flat), dim=-1)
        out, experts = torch.zeros_like(flat), list(self.experts.values())
        for e in idx.unique().tolist():
            sel = idx == e
            out[sel] = experts[e](flat[sel]) * torch.sigmoid(top[sel, None])
        return (out + self.shared(flat)).reshape(b, s, d)


def test_named_experts_keep_their_names_and_reload(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (3, 11))
    model = _ticketed(Net(_NamedMoE, 40, 24).eval(), ids)
    assert sorted(g.name for g in model._ebcompile.plan.groups if g.kind == "expert") == ["moes.0.experts", "moes.1.experts"]
    with torch.no_grad():
        masked = model(ids)
    small = ebcompile.compact(model, round_to=None).eval()
    kept = [list(layer.experts) for layer in small.moes]
    assert all(set(k) < set("abcde") and len(k) >= 2 for k in kept)  # names kept, in order
    with torch.no_grad():
        torch.testing.assert_close(small(ids), masked, rtol=1e-5, atol=1e-5)
    ebcompile.save(small, tmp_path / "s")
    back = ebcompile.load(tmp_path / "s", model=Net(_NamedMoE, 40, 24)).eval()
    assert [list(layer.experts) for layer in back.moes] == kept
    with torch.no_grad():
        torch.testing.assert_close(back(ids), small(ids))


def test_exclude_of_a_router_no_graph_reads_keeps_its_experts():
    """The routers here are in no captured graph (the routing loop does not export), so no linear rule sees them:
    ``exclude=`` still keeps their experts whole, and says so; the experts' own neurons are still cut."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 9))
    model = Net().eval()
    ebcompile.prepare(model, ids, ratio=0.4, structure="structured", importance="magnitude", exclude="moes.0.gate")
    plan = model._ebcompile.plan
    assert [g.name for g in plan.groups if g.kind == "expert"] == ["moes.1.experts"]
    assert "matched by exclude" in plan.skipped["moes.0.gate"]
    assert any(g.kind == "neuron" and g.name.startswith("moes.0.experts") for g in plan.groups)
