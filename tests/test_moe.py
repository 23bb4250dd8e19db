"""Mixture-of-experts units (``analysis.experts``): whole experts and the neurons inside fused 3-D experts.

Tiny random Mixtral (4 experts, top-2, router softmax renormalised over the top-k) and Qwen2-MoE (6 experts, top-2,
norm_topk_prob False so the softmax over all experts matters, plus a shared expert): hidden 32, 2 layers. Experts use
``batched_mm``: the default ``grouped_mm`` has no ONNX export (``aten::histc``; the dense model fails too), and the
eager loop over the experts the example hits is unrolled by the tracer (it verifies on the example only).
"""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

import ebcompile
from ebcompile.errors import TicketMismatchError
from ebcompile.prepare import tracker_of
from ebcompile.search.importance import expand_units

import zoo
from hf_models import quiet_one_thread  # noqa: F401 - autouse: one thread, transformers quiet
from zoo import text_batch

TOL = dict(rtol=1e-5, atol=1e-5)


def mixtral() -> MixtralForCausalLM:
    return MixtralForCausalLM(MixtralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                                            head_dim=8, intermediate_size=48, vocab_size=100, num_local_experts=4,
                                            num_experts_per_tok=2, max_position_embeddings=32))


def qwen() -> Qwen2MoeForCausalLM:
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                                              shared_expert_intermediate_size=40, vocab_size=100, num_experts=6,
                                              num_experts_per_tok=2, max_position_embeddings=32, norm_topk_prob=False))


MODELS = {"mixtral": (mixtral, "num_local_experts", "intermediate_size"),
          "qwen2-moe": (qwen, "num_experts", "moe_intermediate_size")}


def build(name: str, impl: str = "batched_mm"):
    model = zoo.seeded(MODELS[name][0])
    model.config._experts_implementation = impl
    return model


def ticketed(name: str, importance: str = "magnitude", scope: str = "global", ratio: float = 0.4, impl: str = "batched_mm"):
    x = text_batch()
    model = ebcompile.prepare(build(name, impl), x, structure="structured", ratio=ratio, scope=scope, importance=importance)
    if importance in ("taylor", "gate"):  # they read gradients: a few language-model steps
        train(model, importance)
    elif importance != "magnitude":
        with torch.no_grad():
            for seed in range(3):
                model(**text_batch(batch=4, seed=seed))
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    return model.eval(), x


def train(model, importance: str, steps: int = 3) -> list[dict[str, torch.Tensor]]:
    """``steps`` AdamW steps of the language-model loss; returns each step's gradients (read before the step)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    grads = []
    for seed in range(steps):
        x = text_batch(batch=4, seed=seed)
        model(**x, labels=x["input_ids"]).loss.backward()
        if importance == "gate":
            ebcompile.add_gate_penalty_grad(model, 1e-3)
        grads.append({n: (p.detach().clone(), p.grad.detach().clone()) for n, p in model.named_parameters()
                      if p.grad is not None})
        opt.step()
        opt.zero_grad()
    return grads


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def moe_blocks(model):
    return [layer.mlp for layer in model.model.layers]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_experts_and_expert_neurons_are_found(name):
    model = ebcompile.prepare(build(name), text_batch(), structure="structured")
    groups = {(g.kind, g.name): g for g in model._ebcompile.plan.groups}
    experts = MODELS[name][0]().config.__dict__[MODELS[name][1]]
    for i in range(2):
        path = f"model.layers.{i}.mlp.experts"
        whole, inner = groups[("expert", path)], groups[("neuron", path)]
        assert (whole.units, whole.min_units) == (experts, 2)
        assert whole.members[0].tensor == f"model.layers.{i}.mlp.gate.weight"  # the router's rows follow the experts
        assert inner.per_group * experts == inner.units and all(m.batched for m in inner.members)
        assert f"model.layers.{i}.mlp.gate" not in model._ebcompile.plan.skipped


@pytest.mark.parametrize("importance", ["magnitude", "activation", "taylor", "gate"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compact_removes_experts_and_neurons_and_computes_what_the_masked_model_computes(name, importance):
    masked, x = ticketed(name, importance)
    small = ebcompile.compact(masked).eval()
    units = masked._ebcompile.ticket.masks.units
    for i, block in enumerate(moe_blocks(small)):
        kept = int(units[f"expert:model.layers.{i}.mlp.experts"].sum())
        assert kept >= 2  # top_k
        assert block.gate.weight.shape[0] == block.experts.num_experts == block.gate.num_experts == kept
        width = block.experts.intermediate_dim
        assert block.experts.gate_up_proj.shape == (kept, 2 * width, 32)
        assert block.experts.down_proj.shape == (kept, 32, width)
    original = build(name)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in original.parameters())
    assert any(b.experts.num_experts < MODELS[name][0]().config.__dict__[MODELS[name][1]] for b in moe_blocks(small))
    assert not torch.allclose(logits(original, x), logits(masked, x), **TOL)  # the ticket bites
    for batch in (x, text_batch(batch=3, seed=7), text_batch(batch=5, seq=6, seed=11)):
        torch.testing.assert_close(logits(small, batch), logits(masked, batch), **TOL)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_expert_neurons_are_ranked_within_each_expert_and_kept_alike(name):
    masked, _ = ticketed(name, scope="layer", ratio=0.3)
    for key, keep in masked._ebcompile.ticket.masks.units.items():
        if key.startswith("neuron:") and key.endswith(".experts"):
            group = next(g for g in masked._ebcompile.plan.groups if f"{g.kind}:{g.name}" == key)
            per_expert = keep.reshape(-1, group.per_group).sum(1)
            assert len(set(per_expert.tolist())) == 1 and int(per_expert[0]) < group.per_group
            kept_rows = keep.reshape(-1, group.per_group)
            assert not all(torch.equal(kept_rows[0], r) for r in kept_rows)  # each expert drops its own neurons


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_masked_expert_is_never_routed_to(name):
    masked, _ = ticketed(name, ratio=0.5)
    routed: list[tuple[int, torch.Tensor]] = []
    handles = [block.gate.register_forward_hook(lambda m, a, out, i=i: routed.append((i, out[2])))
               for i, block in enumerate(moe_blocks(masked))]
    for seed in range(4):
        logits(masked, text_batch(batch=4, seed=seed))
    for h in handles:
        h.remove()
    units = masked._ebcompile.ticket.masks.units
    pruned = {i: set((~units[f"expert:model.layers.{i}.mlp.experts"]).nonzero().flatten().tolist()) for i in range(2)}
    assert any(pruned.values())
    for i, index in routed:
        assert not pruned[i] & set(index.flatten().tolist())
    # a zero router row alone would be routed to: logit 0 beats negative logits in top-k
    for block in moe_blocks(masked):
        block.gate._forward_pre_hooks.clear()
    routed.clear()
    handles = [block.gate.register_forward_hook(lambda m, a, out, i=i: routed.append((i, out[2])))
               for i, block in enumerate(moe_blocks(masked))]
    logits(masked, text_batch(batch=4, seed=0))
    assert any(pruned[i] & set(index.flatten().tolist()) for i, index in routed)


def test_top_k_experts_are_always_kept_and_compact_refuses_fewer():
    masked, _ = ticketed("mixtral", ratio=0.9)
    for key, keep in masked._ebcompile.ticket.masks.units.items():
        if key.startswith("expert:"):
            assert int(keep.sum()) == 2
    model = ebcompile.prepare(build("mixtral"), text_batch(), structure="structured", ratio=0.4)
    ticket = ebcompile.draw_ticket(model)
    group = next(g for g in model._ebcompile.plan.groups if g.kind == "expert")
    keep = torch.zeros(group.units, dtype=torch.bool)
    keep[0] = True
    ticket.masks.units[f"expert:{group.name}"] = keep
    for m in group.members:
        ticket.masks.tensors.pop(m.tensor, None)
    expand_units(model, group, keep, ticket.masks.tensors)
    for g in model._ebcompile.plan.groups:  # members shared with another group (the experts' neurons) again
        if g.name == group.name and g.kind == "neuron":
            expand_units(model, g, ticket.masks.units[f"neuron:{g.name}"], ticket.masks.tensors)
    ebcompile.apply_ticket(model, ticket)
    with pytest.raises(TicketMismatchError, match="top_k"):
        ebcompile.compact(model)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_load_round_trip(name, tmp_path):
    masked, x = ticketed(name)
    small = ebcompile.compact(masked).eval()
    ebcompile.save(masked, tmp_path / "eb")
    loaded = ebcompile.load(tmp_path / "eb")
    torch.testing.assert_close(logits(loaded, x), logits(small, x), **TOL)
    assert [b.experts.num_experts for b in moe_blocks(loaded)] == [b.experts.num_experts for b in moe_blocks(small)]


def test_uniform_compact_mixtral_reloads_with_stock_from_pretrained(tmp_path):
    masked, x = ticketed("mixtral", scope="layer")
    small = ebcompile.compact(masked).eval()
    small.save_pretrained(tmp_path)
    assert small.config.num_local_experts == small.model.layers[0].mlp.experts.num_experts < 4
    assert small.config.intermediate_size == small.model.layers[0].mlp.experts.intermediate_dim < 48
    stock = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(stock, x), logits(small, x), **TOL)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_export_of_the_compact_model_verifies(name, tmp_path):
    masked, x = ticketed(name)
    report = ebcompile.export_onnx(masked, tmp_path / "m.onnx", x, verify=True)
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_taylor_scores_experts_and_their_neurons_by_weight_times_gradient(name):
    """A whole expert's score is the mean over steps of |w * dL/dw| summed over its router row and its slices of the
    fused tensors; an expert neuron's, over its rows of gate/up and its column of down, expert by expert."""
    model = ebcompile.prepare(build(name), text_batch(), structure="structured", ratio=0.4, importance="taylor")
    grads = train(model, "taylor")
    tracker = tracker_of(model)
    tracker.begin_draw(fresh=True, sync=False)
    groups = {(g.kind, g.name): g for g in model._ebcompile.plan.groups}
    for i in range(2):
        path = f"model.layers.{i}.mlp"

        def taylor(tensor: str, keep: tuple[int, ...], path: str = path) -> torch.Tensor:
            total = 0
            for step in grads:
                w, g = _param_name(step, f"{path}.{tensor}")
                prod = (w * g).abs()
                total = total + prod.sum([d for d in range(prod.dim()) if d not in keep])
            return total / len(grads)

        experts = taylor("gate.weight", (0,)) + taylor("experts.gate_up_proj", (0,)) + taylor("experts.down_proj", (0,))
        torch.testing.assert_close(tracker.unit_scores(groups["expert", f"{path}.experts"]), experts)
        width = build(name).config.__dict__[MODELS[name][2]]
        up = taylor("experts.gate_up_proj", (0, 1))  # [E, 2I]: gate rows, then up rows
        neurons = up[:, :width] + up[:, width:] + taylor("experts.down_proj", (0, 2))
        torch.testing.assert_close(tracker.unit_scores(groups["neuron", f"{path}.experts"]), neurons.flatten())
    tracker.end_draw(fresh=True)


def _param_name(step: dict, tensor: str) -> tuple[torch.Tensor, torch.Tensor]:
    owner, attr = tensor.rsplit(".", 1)
    return step.get(tensor) or step[f"{owner}.parametrizations.{attr}.original"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gates_scale_each_experts_output_and_the_lowest_are_cut(name):
    """importance="gate" learns a coefficient per expert on its slice of the down tensor (the expert's output is
    linear in it) and one per expert neuron on its column of down; the ticket cuts the lowest |gate|."""
    x = text_batch()
    model = ebcompile.prepare(build(name), x, structure="structured", ratio=0.4, importance="gate").eval()
    block = moe_blocks(model)[0]
    mask = block.experts.parametrizations.down_proj[0]
    expert_gate, neuron_gate = mask.gates  # the whole-expert gate, then the per-expert neuron gate
    experts, width = block.experts.down_proj.shape[0], block.experts.down_proj.shape[2]
    assert expert_gate.shape == (experts,) and neuron_gate.shape == (experts * width,)
    raw = mask.original if hasattr(mask, "original") else block.experts.parametrizations.down_proj.original
    with torch.no_grad():
        expert_gate.copy_(torch.linspace(1.0, 0.5, experts))
        neuron_gate.copy_(torch.rand(experts * width, generator=torch.Generator().manual_seed(0)) + 0.5)
        want = raw * expert_gate[:, None, None] * neuron_gate.reshape(experts, 1, width)
        torch.testing.assert_close(block.experts.down_proj, want)
        expert_gate[1] = 0.01  # the least important expert of layer 0
    ticket = ebcompile.draw_ticket(model)
    assert not bool(ticket.masks.units["expert:model.layers.0.mlp.experts"][1])
    ebcompile.apply_ticket(model, ticket)
    small = ebcompile.compact(model).eval()  # the gates fold into the weights
    torch.testing.assert_close(logits(small, x), logits(model, x), **TOL)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_default_grouped_mm_kernel_compacts_any_width_and_exports(name, tmp_path):
    x = text_batch()  # ratio 0.37 per layer: expert widths no multiple of 4 before alignment (grouped_mm needs 16 bytes)
    model = ebcompile.prepare(build(name, "grouped_mm"), x, structure="structured", ratio=0.37, scope="layer")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model.eval(), round_to=None)
    widths = {m.down_proj.shape[-1] for m in small.modules() if isinstance(getattr(m, "down_proj", None), torch.Tensor)}
    assert widths and all(w % 4 == 0 for w in widths)
    torch.testing.assert_close(logits(small, x), logits(model, x), rtol=1e-4, atol=1e-5)
    report = ebcompile.export_onnx(small, tmp_path / "m.onnx", x, verify=True)
    assert report.max_abs_error < 1e-4 and any("batched_mm" in n for n in report.notes)
    assert small.config._experts_implementation == "grouped_mm"  # only the export's copy was switched


def with_routing_bias(build, bias_of) -> torch.nn.Module:
    """A seeded MoE model on the batched_mm kernel whose per-expert routing bias (``bias_of(block)``) is set to distinct
    values, so that cutting it with the wrong experts changes the routing."""
    model = zoo.seeded(build)
    model.config._experts_implementation = "batched_mm"
    with torch.no_grad():
        for block in moe_blocks(model):
            bias = bias_of(block)
            bias.copy_(torch.linspace(-0.01, 0.01, bias.numel()).reshape(bias.shape))
    return model


def test_per_expert_routing_bias_buffers_follow_the_experts(tmp_path):
    """MiniMax-M2 keeps ``e_score_correction_bias`` (one entry per expert) on the MoE block: compaction cuts it with
    the experts, so the kept experts keep their own corrections."""
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    cfg = MiniMaxM2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, head_dim=8,
                          intermediate_size=24, vocab_size=100, num_local_experts=6, num_experts_per_tok=2,
                          max_position_embeddings=32)
    model = with_routing_bias(lambda: MiniMaxM2ForCausalLM(cfg), lambda block: block.e_score_correction_bias)
    x = text_batch()
    ebcompile.prepare(model, x, structure="structured", ratio=0.4, importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    model.eval()
    small = ebcompile.compact(model).eval()
    torch.testing.assert_close(logits(small, x), logits(model, x), **TOL)
    kept = [b.experts.num_experts for b in moe_blocks(small)]
    assert min(kept) < 6
    for block, n in zip(moe_blocks(small), kept):
        assert block.e_score_correction_bias.shape == (n,) and block.gate.weight.shape[0] == n
    ebcompile.save(small, tmp_path / "eb")
    torch.testing.assert_close(logits(ebcompile.load(tmp_path / "eb"), x), logits(small, x), **TOL)


def test_a_float32_router_with_a_per_expert_bias_in_a_child_module_follows_the_experts():
    """ERNIE 4.5: the router computes ``F.linear(x.float(), self.weight.float())`` (a linear of its weight all the
    same) and keeps ``e_score_correction_bias`` [1, E] in a child (``gate.moe_statics``): the experts are found, the
    bias is cut with them along its expert dim, and the compact model computes what the masked one did."""
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    cfg = Ernie4_5_MoeConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                             intermediate_size=48, moe_intermediate_size=24, vocab_size=100, moe_num_experts=6,
                             num_experts=6, moe_k=2, num_experts_per_tok=2, moe_layer_start_index=0,
                             max_position_embeddings=32)
    model = with_routing_bias(lambda: Ernie4_5_MoeForCausalLM(cfg), lambda block: block.gate.moe_statics.e_score_correction_bias)
    x = text_batch()
    ebcompile.prepare(model, x, structure="structured", ratio=0.4, importance="magnitude")
    experts = [g for g in model._ebcompile.plan.groups if g.kind == "expert"]
    assert len(experts) == 2 and all(any(m.tensor.endswith("moe_statics.e_score_correction_bias") and m.dim == 1
                                         for m in g.members) for g in experts)
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    model.eval()
    small = ebcompile.compact(model).eval()
    torch.testing.assert_close(logits(small, x), logits(model, x), **TOL)
    for block in moe_blocks(small):
        assert block.gate.moe_statics.e_score_correction_bias.shape == (1, block.gate.weight.shape[0])


def test_an_expert_count_read_outside_the_moe_block_keeps_its_experts_whole():
    """ERNIE-4.5-VL's decoder MLP routes text and vision tokens to two MoE blocks and reshapes their router logits
    with its own ``num_experts``: cutting experts in one block would break it, so such blocks keep their experts
    (the reason is in ``plan.skipped``) and their expert neurons are still found."""
    model = mixtral()
    model.config._experts_implementation = "batched_mm"
    model.model.layers[0].num_experts = 4  # an outer module sized by the expert count
    ebcompile.prepare(model, text_batch(), structure="structured", ratio=0.4, importance="magnitude")
    plan = model._ebcompile.plan
    experts = {g.name for g in plan.groups if g.kind == "expert"}
    assert experts == {"model.layers.1.mlp.experts"}
    assert "model.layers.0 outside the MoE block reads the expert count" in plan.skipped["model.layers.0.mlp.gate"]
    assert "model.layers.0.mlp.experts" in {g.name for g in plan.groups if g.kind == "neuron"}
