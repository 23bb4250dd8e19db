"""Hand-written mixture-of-experts layers with fused 3-D experts and a separate gate tensor, as Mixtral's reference
code, gpt-fast and torchtitan write them (``w1`` gate, ``w3`` up, ``w2`` down), stored ``[E, out, in]`` (gpt-fast)
or transposed ``[E, in, out]`` (torchtitan, read with ``x @ w``; no ``is_transposed`` flag to say so): whole experts
and the neurons inside them are found from the shapes, cut, compacted exactly, saved and exported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ebcompile

from checks import assert_reloads


class Experts(nn.Module):
    def __init__(self, experts: int, dim: int, width: int, transposed: bool) -> None:
        super().__init__()
        self.transposed = transposed
        up, down = ((experts, dim, width), (experts, width, dim)) if transposed else ((experts, width, dim), (experts, dim, width))
        self.w1, self.w3 = nn.Parameter(torch.randn(up) * 0.3), nn.Parameter(torch.randn(up) * 0.3)
        self.w2 = nn.Parameter(torch.randn(down) * 0.3)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = self.w1[index], self.w3[index], self.w2[index]  # [T, A, ...]: gpt-fast's gather of the routed experts
        if self.transposed:
            h = F.silu(torch.einsum("ti,taio->tao", x, w1)) * torch.einsum("ti,taio->tao", x, w3)
            return torch.einsum("tao,taoi->tai", h, w2)
        h = F.silu(torch.einsum("ti,taoi->tao", x, w1)) * torch.einsum("ti,taoi->tao", x, w3)
        return torch.einsum("tao,taio->tai", h, w2)


class MoE(nn.Module):
    def __init__(self, transposed: bool, experts: int = 6, dim: int = 16, width: int = 12, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k = experts, top_k
        self.gate = nn.Linear(dim, experts, bias=False)
        self.cond_ffn = Experts(experts, dim, width, transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weight, index = F.softmax(self.gate(flat), dim=-1).topk(self.top_k, dim=-1)
        out = torch.einsum("tai,ta->ti", self.cond_ffn(flat, index), weight / weight.sum(-1, keepdim=True))
        return x + out.reshape(x.shape)


def model(transposed: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), MoE(transposed), MoE(transposed), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("transposed", [False, True], ids=["gpt-fast", "torchtitan"])
def test_separate_gate_experts_are_cut_compacted_saved_and_exported(transposed: bool, tmp_path) -> None:
    m, x = model(transposed), torch.randn(2, 5, 16)
    ebcompile.prepare(m, x, ratio=0.4, structure="structured", importance="magnitude")
    groups = {(g.kind, g.name): g for g in m._ebcompile.plan.groups}
    assert {("expert", "1.cond_ffn"), ("neuron", "1.cond_ffn"), ("expert", "2.cond_ffn")} <= set(groups)
    neuron = groups[("neuron", "1.cond_ffn")]
    assert [mm.tensor.rsplit(".", 1)[1] for mm in neuron.members] == ["w1", "w3", "w2"]
    assert neuron.units == 6 * 12 and neuron.per_group == 12
    ebcompile.apply_ticket(m, ebcompile.draw_ticket(m))
    small = ebcompile.compact(m, round_to=None).eval()
    experts = [small[i].cond_ffn.w1.shape[0] for i in (1, 2)]
    assert min(experts) >= 2 and sum(experts) < 12
    for i in (1, 2):
        block = small[i]
        assert block.gate.out_features == block.num_experts == block.cond_ffn.w2.shape[0] == block.cond_ffn.w3.shape[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x))
    assert_reloads(small, model(transposed), x, tmp_path / "s")
    report = ebcompile.export_onnx(small, tmp_path / "s.onnx", x)
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4


def test_activation_importance_reads_the_separate_gate() -> None:
    m, x = model(False), torch.randn(2, 5, 16)
    ebcompile.prepare(m, x, ratio=0.4, structure="structured", importance="activation")
    with torch.no_grad():
        m(x)
    ebcompile.apply_ticket(m, ebcompile.draw_ticket(m))
    small = ebcompile.compact(m, round_to=None).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x))


class OddlyNamed(nn.Module):
    """torchtitan-style experts under names no list knows: their roles are read from the shapes alone."""

    def __init__(self, experts: int = 6, dim: int = 16, width: int = 12) -> None:
        super().__init__()
        self.gate_w = nn.Parameter(torch.randn(experts, dim, width) * 0.3)
        self.in_w = nn.Parameter(torch.randn(experts, dim, width) * 0.3)
        self.out_w = nn.Parameter(torch.randn(experts, width, dim) * 0.3)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        g, u, d = self.gate_w[index], self.in_w[index], self.out_w[index]
        h = F.silu(torch.einsum("ti,taio->tao", x, g)) * torch.einsum("ti,taio->tao", x, u)
        return torch.einsum("tao,taoi->tai", h, d)


def test_experts_under_unknown_names_are_read_from_their_shapes() -> None:
    torch.manual_seed(0)
    m, x = model(True), torch.randn(2, 5, 16)
    for i in (1, 2):
        m[i].cond_ffn = OddlyNamed()
    ebcompile.prepare(m, x, ratio=0.4, structure="structured", importance="magnitude")
    kinds = sorted(g.kind for g in m._ebcompile.plan.groups if g.name.endswith("cond_ffn"))
    assert kinds == ["expert", "expert", "neuron", "neuron"]
    ebcompile.apply_ticket(m, ebcompile.draw_ticket(m))
    small = ebcompile.compact(m, round_to=None).eval()
    assert sum(small[i].cond_ffn.gate_w.shape[0] for i in (1, 2)) < 12
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x))


class FlatExperts(nn.Module):
    """MegaBlocks-style experts: each tensor stored flat ``[E * I, H]`` and viewed per expert in a routing loop."""

    def __init__(self, experts: int = 4, dim: int = 16, width: int = 8) -> None:
        super().__init__()
        self.num_experts, self.ffn_hidden_size, self.dim = experts, width, dim
        self.w1, self.v1, self.w2 = (nn.Parameter(torch.randn(experts * width, dim) * 0.3) for _ in range(3))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        view = (-1, self.ffn_hidden_size, self.dim)
        for e in index.unique().tolist():
            tok, slot = torch.where(index == e)
            w1, v1, w2 = self.w1.view(view)[e], self.v1.view(view)[e], self.w2.view(view)[e]
            h = F.silu(x[tok] @ w1.T) * (x[tok] @ v1.T)
            out.index_add_(0, tok, (h @ w2) * weight[tok, slot, None])
        return out


class FlatMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.top_k = 2
        self.router = nn.Sequential(nn.Linear(16, 4, bias=False))  # nested, as DBRX's router.layer
        self.experts = nn.Module()
        self.experts.mlp = FlatExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weight, index = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        return x + self.experts.mlp(flat, index, weight).reshape(x.shape)


def test_flat_experts_are_cut_per_expert_and_reload(tmp_path) -> None:
    """Each flat tensor holds neuron j of expert e in row e*I + j: whole experts and equal neuron counts per expert
    are cut, the per-expert width and count attributes follow, compact is exact at any rounding, and it reloads."""
    torch.manual_seed(0)
    m, x = nn.Sequential(FlatMoE(), FlatMoE()).eval(), torch.randn(2, 6, 16)
    ebcompile.prepare(m, x, ratio=0.5, structure="structured", importance="magnitude")
    kinds = {(g.kind, g.name): g for g in m._ebcompile.plan.groups}
    assert set(kinds) == {(k, f"{i}.experts.mlp") for k in ("expert", "neuron") for i in (0, 1)}
    assert kinds[("neuron", "0.experts.mlp")].per_group == 8 and kinds[("expert", "0.experts.mlp")].min_units == 2
    ebcompile.apply_ticket(m, ebcompile.draw_ticket(m))
    for round_to in (None, 4):
        small = ebcompile.compact(m, round_to=round_to).eval()
        for block in small:
            mlp = block.experts.mlp
            assert mlp.w1.shape == mlp.v1.shape == mlp.w2.shape == (mlp.num_experts * mlp.ffn_hidden_size, 16)
            assert block.router[0].out_features == mlp.num_experts >= 2
        assert sum(b.experts.mlp.w1.shape[0] for b in small) < 64
        with torch.no_grad():
            torch.testing.assert_close(small(x), m(x))
    assert_reloads(small, nn.Sequential(FlatMoE(), FlatMoE()), x, tmp_path / "s")


def test_dbrx_experts_and_their_neurons_are_cut_and_reload_from_the_config(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DbrxConfig(vocab_size=99, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                                  attn_config={"kv_n_heads": 2, "clip_qkv": 8, "rope_theta": 10000},
                                  ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2,
                                              "moe_jitter_eps": 0, "moe_loss_weight": 0.05,
                                              "moe_normalize_expert_weights": 1.0})
    torch.manual_seed(0)
    model = transformers.DbrxModel(cfg).eval()
    x = {"input_ids": torch.randint(0, 99, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    assert {g.kind for g in model._ebcompile.plan.groups} == {"head", "expert", "neuron"}
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    experts = small.blocks[0].ffn.experts
    assert experts.num_experts == experts.mlp.moe_num_experts < 4 or experts.ffn_hidden_size == experts.mlp.ffn_hidden_size < 16
    with torch.no_grad():
        torch.testing.assert_close(small(**x).last_hidden_state, model(**x).last_hidden_state)
    ebcompile.save(small, tmp_path / "s")
    back = ebcompile.load(tmp_path / "s")  # rebuilt from config.json, cut to the saved counts
    with torch.no_grad():
        torch.testing.assert_close(back(**x).last_hidden_state, small(**x).last_hidden_state)
    report = ebcompile.export_onnx(small, tmp_path / "s.onnx", x)
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4


class Router(nn.Module):
    """A router module around its linear (AFMoE's ``router.gate``, Hunyuan's ``gate.wg``), with the top-k on it."""

    def __init__(self, dim: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = experts, top_k
        self.proj = nn.Linear(dim, experts, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(self.proj(x))
        index = (scores + bias).topk(self.top_k, dim=-1).indices
        weight = scores.gather(1, index)
        return weight / weight.sum(-1, keepdim=True), index


class WrappedRouterMoE(nn.Module):
    def __init__(self, experts: int = 6, dim: int = 16, width: int = 12) -> None:
        super().__init__()
        self.router = Router(dim, experts, top_k=2)
        self.expert_bias = nn.Parameter(torch.randn(experts) * 0.1)
        # a shared expert whose hidden width equals the expert count: its up linear is [E, H] too, and no router
        self.shared = nn.Sequential(nn.Linear(dim, experts), nn.GELU(), nn.Linear(experts, dim))
        self.experts = Experts(experts, dim, width, transposed=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weight, index = self.router(flat, self.expert_bias)
        out = torch.einsum("tai,ta->ti", self.experts(flat, index), weight)
        return x + out.reshape(x.shape) + self.shared(x)


def test_a_router_linear_inside_a_router_module_is_found_and_cut_with_its_experts(tmp_path) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), WrappedRouterMoE(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 5, 16)
    ebcompile.prepare(m, x, ratio=0.5, structure="structured", importance="magnitude")
    expert = next(g for g in m._ebcompile.plan.groups if g.kind == "expert")
    names = [mm.tensor for mm in expert.members]
    assert names[0] == "1.router.proj.weight" and "1.expert_bias" in names and expert.min_units == 2
    ebcompile.apply_ticket(m, ebcompile.draw_ticket(m))
    small = ebcompile.compact(m, round_to=None).eval()
    block = small[1]
    kept = block.experts.w1.shape[0]
    assert 2 <= kept < 6
    assert block.router.proj.out_features == block.router.num_experts == block.expert_bias.shape[0] == kept
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x))
    torch.manual_seed(0)
    assert_reloads(small, nn.Sequential(nn.Linear(16, 16), WrappedRouterMoE(), nn.Linear(16, 4)).eval(), x, tmp_path / "s")


class RoutedTo(MoE):
    """The experts per token under a name no list knows (``route_to``): the graph's ``topk`` says it."""

    def __init__(self, transposed: bool) -> None:
        super().__init__(transposed, top_k=3)
        self.route_to = self.top_k
        del self.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.top_k = self.route_to
        try:
            return super().forward(x)
        finally:
            del self.top_k


def test_experts_per_token_under_an_unknown_name_are_read_from_the_graph() -> None:
    torch.manual_seed(0)
    m, x = nn.Sequential(nn.Linear(16, 16), RoutedTo(False), RoutedTo(True), nn.Linear(16, 4)).eval(), torch.randn(2, 5, 16)
    ebcompile.prepare(m, x, ratio=0.9, structure="structured", importance="magnitude")
    assert [g.min_units for g in m._ebcompile.plan.groups if g.kind == "expert"] == [3, 3]
    ebcompile.apply_ticket(m, ebcompile.draw_ticket(m))
    small = ebcompile.compact(m, round_to=None).eval()
    assert [small[i].cond_ffn.w1.shape[0] for i in (1, 2)] == [3, 3]  # the 3 experts each token reads stay
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x))


@pytest.mark.parametrize("importance", ["taylor", "gate"])
@pytest.mark.parametrize("transposed", [False, True], ids=["gpt-fast", "torchtitan"])
def test_gradient_kinds_rank_separate_gate_experts(importance: str, transposed: bool, tmp_path) -> None:
    m, x = model(transposed), torch.randn(2, 5, 16)
    ebcompile.prepare(m, x, ratio=0.4, structure="structured", importance=importance)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(3):
        batch = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(seed))
        m(batch).pow(2).mean().backward()
        if importance == "gate":
            ebcompile.add_gate_penalty_grad(m, 1e-3)
        opt.step()
        opt.zero_grad()
    ebcompile.apply_ticket(m, ebcompile.draw_ticket(m))
    small = ebcompile.compact(m, round_to=None).eval()
    assert sum(small[i].cond_ffn.w1.shape[0] for i in (1, 2)) < 12
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x))
    assert_reloads(small, model(transposed), x, tmp_path / "s")


@pytest.mark.parametrize("rank", [4, 6], ids=["r4", "r-equals-experts"])
def test_lora_on_the_router_follows_the_experts(rank: int) -> None:
    """LoRA on the router (peft wraps it as ``gate.base_layer`` beside ``lora_A``/``lora_B``): the adapter's rows go
    with their experts, so the compact PeftModel computes the masked one and merges into a smaller router. Only
    ``lora_B`` (experts x rank) follows, also when the rank equals the expert count (``lora_A`` is rank x hidden)."""
    peft = pytest.importorskip("peft")
    m, x = model(False), torch.randn(2, 5, 16)
    m = peft.get_peft_model(m, peft.LoraConfig(r=rank, target_modules=["gate", "0"]))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    ebcompile.prepare(m, x, ratio=0.4, structure="structured", importance="magnitude")
    experts = [g for g in m._ebcompile.plan.groups if g.kind == "expert"]
    assert len(experts) == 2 and all(g.members[1].tensor.endswith("gate.lora_B.default.weight") for g in experts)
    assert not any("lora_A" in mm.tensor for g in experts for mm in g.members)
    ebcompile.apply_ticket(m, ebcompile.draw_ticket(m))
    small = ebcompile.compact(m, round_to=None).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x))
        merged = small.merge_and_unload()
        torch.testing.assert_close(merged(x), m(x))
    assert sum(merged[i].cond_ffn.w1.shape[0] for i in (1, 2)) < 12
    assert all(merged[i].gate.weight.shape[0] == merged[i].cond_ffn.w1.shape[0] for i in (1, 2))
