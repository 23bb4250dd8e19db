"""Mamba-2 mixers (and the Mamba layers of hybrids: Bamba, Falcon-H1, Nemotron-H, Granite 4, Zamba2): the SSM heads
are found by the structure analysis (a head's x/z rows, dt, A, D, its conv1d channels, its slice of the gated norm and
of out_proj; heads sharing B/C groups go together, as query heads with their K/V head), cut, and the mixer's counts
rewritten (``num_heads``, ``n_groups``, ``intermediate_size``, ``conv_dim``): compact ≡ masked, also token by token
through the SSM cache, and save / load rebuilds it. The chunked scan's ``cumsum`` over time is followed."""

from __future__ import annotations

import pytest
import torch

import ebcompile

transformers = pytest.importorskip("transformers")


def _mamba2(groups: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Mamba2Config(vocab_size=100, hidden_size=32, num_heads=8, head_dim=8, n_groups=groups,
                                       state_size=4, expand=2, num_hidden_layers=2, chunk_size=8, conv_kernel=4)
    return transformers.Mamba2ForCausalLM(config).eval()


def _same_tokens_and_reload(small, masked, ids, tmp_path) -> None:
    """The compact model computes the masked one's logits, greedy tokens through the SSM cache, and reloads."""
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, masked(input_ids=ids).logits)
        prompt = ids[:1, :5]
        assert torch.equal(small.generate(prompt, max_new_tokens=6, do_sample=False),
                           masked.generate(prompt, max_new_tokens=6, do_sample=False))
    ebcompile.save(small, tmp_path / "s")
    back = ebcompile.load(tmp_path / "s")  # rebuilt from config.json, cut to the saved counts
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, small(input_ids=ids).logits)


def test_mamba2_heads_are_cut_with_their_groups_and_generate_as_the_masked_model(tmp_path) -> None:
    m, ids = _mamba2(), torch.randint(0, 100, (2, 12))
    ebcompile.prepare(m, {"input_ids": ids}, ratio=0.4, structure="structured", importance="magnitude")
    groups = [g for g in m._ebcompile.plan.groups if g.module and g.module.endswith("mixer")]
    assert len(groups) == 2 and all(g.units == 4 for g in groups)  # 8 heads in 4 B/C groups per layer
    ebcompile.apply_ticket(m, ebcompile.draw_ticket(m))
    small = ebcompile.compact(m, round_to=None)
    assert not [k for k, v in m._ebcompile.plan.skipped.items() if v.startswith("kept whole")]
    mixers = [layer.mixer for layer in small.backbone.layers]
    assert sum(x.num_heads for x in mixers) < 16
    for x in mixers:
        assert x.n_groups * 2 == x.num_heads and x.intermediate_size == x.num_heads * 8 == x.out_proj.in_features
        assert x.conv_dim == x.conv1d.out_channels == x.intermediate_size + 2 * x.n_groups * 4
    _same_tokens_and_reload(small, m, ids, tmp_path)


def _mamba1() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=100, hidden_size=16, state_size=4, expand=2, num_hidden_layers=2,
                                      conv_kernel=4, time_step_rank=3)
    return transformers.MambaForCausalLM(config).eval()


def test_mamba1_channels_are_units_and_generate_as_the_masked_model(tmp_path) -> None:
    """Mamba-1 (Falcon-Mamba, Jamba's mamba layers): each of the mixer's channels is a unit (its x/z rows, conv1d
    channel, dt_proj row — read as ``dt_proj.weight @ time_step`` — and bias, A_log row, D, its x_proj and out_proj
    columns). B and C meet every channel in an outer product (``dt[..., None] * B[..., None, :]``): they stay whole
    and do not join the channels into one unit."""
    m, ids = _mamba1(), torch.randint(0, 100, (2, 10))
    ebcompile.prepare(m, {"input_ids": ids}, ratio=0.4, structure="structured", importance="magnitude")
    groups = [g for g in m._ebcompile.plan.groups if g.name.endswith("mixer.in_proj")]
    assert len(groups) == 2 and all(g.units == 32 for g in groups)
    tensors = {mem.tensor.split("mixer.")[1] for mem in groups[0].members}
    assert {"dt_proj.weight", "dt_proj.bias", "A_log", "D", "conv1d.weight", "conv1d.bias", "x_proj.weight"} <= tensors
    ebcompile.apply_ticket(m, ebcompile.draw_ticket(m))
    small = ebcompile.compact(m, round_to=None)
    mixers = [layer.mixer for layer in small.backbone.layers]
    assert sum(x.out_proj.in_features for x in mixers) < 64
    for x in mixers:
        assert x.A_log.shape[0] == x.dt_proj.weight.shape[0] == x.conv1d.out_channels == x.out_proj.in_features
    _same_tokens_and_reload(small, m, ids, tmp_path)
