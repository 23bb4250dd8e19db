"""Forwards that branch on traced values (Hugging Face's older attention: TrOCR, FSMT, LED, ProphetNet, ...) compact
by a value-recorded trace (``transforms.trace_values``), and the heads folded into the batch are followed."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ebcompile
from ebcompile.analysis.feature_dims import Outer, _reshape
from ebcompile.transforms.trace_values import failed_guard, replay, same_keys, trace_with_values

TOL = 1e-5


def renamed_kwarg(fn):
    """A decorator with a ``*args, **kwargs`` signature, as transformers' ``deprecate_kwarg`` wraps forwards."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if "past_key_value" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_value")
        return fn(*args, **kwargs)
    return wrapped


class OldStyleAttention(nn.Module):
    """BART-era attention: the residual width read from the input's size, the heads folded into the batch for
    ``bmm``, shape guards that raise, an optional cross-attention input, ``torch.finfo`` of a traced dtype."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def _shape(self, t: torch.Tensor, seq: int, bsz: int) -> torch.Tensor:
        return t.view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    @renamed_kwarg
    def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None, output_attentions=False,
                **kwargs):
        bsz, tgt_len, embed_dim = hidden_states.size()
        source = hidden_states if key_value_states is None else key_value_states
        q = self._shape(self.q_proj(hidden_states) * self.head_dim ** -0.5, tgt_len, bsz)
        k = self._shape(self.k_proj(source), -1, bsz)
        v = self._shape(self.v_proj(source), -1, bsz)
        if cache is not None:  # a KV cache: what was stored comes first
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        proj_shape = (bsz * self.num_heads, -1, self.head_dim)
        q, k, v = q.reshape(*proj_shape), k.reshape(*proj_shape), v.reshape(*proj_shape)
        src_len = k.size(1)
        weights = torch.bmm(q, k.transpose(1, 2))
        if weights.size() != (bsz * self.num_heads, tgt_len, src_len):
            raise ValueError(f"attention weights of size {weights.size()}")
        if attention_mask is not None:
            fill = torch.finfo(weights.dtype).min
            weights = weights.view(bsz, self.num_heads, tgt_len, src_len).masked_fill(attention_mask, fill)
            weights = weights.view(bsz * self.num_heads, tgt_len, src_len)
        weights = weights.softmax(-1)
        out = torch.bmm(weights, v)
        if out.size() != (bsz * self.num_heads, tgt_len, self.head_dim):
            raise ValueError("attention output of the wrong size")
        out = out.view(bsz, self.num_heads, tgt_len, self.head_dim).transpose(1, 2).reshape(bsz, tgt_len, embed_dim)
        return self.out_proj(out), (weights.view(bsz, self.num_heads, tgt_len, src_len) if output_attentions else None)


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self_attn, self.cross_attn = OldStyleAttention(dim, heads), OldStyleAttention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, h: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(h, output_attentions=False)[0]
        h = h + self.cross_attn(h, key_value_states=enc)[0]
        return h + self.fc2(torch.relu(self.fc1(h)))


class Net(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.layers, self.out = nn.Linear(12, dim), nn.ModuleList(Layer(dim, heads) for _ in range(2)), nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, enc)
        return self.out(h)


def inputs(b: int, t: int, s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 12, generator=g), torch.randn(b, s, 32, generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def test_old_style_attention_compacts_by_a_value_trace_and_reloads(tmp_path):
    model = ebcompile.prepare(Net().eval(), inputs(2, 7, 5), ratio=0.5, structure="structured", scope="layer")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        small = ebcompile.compact(model, round_to=None).eval()
    assert not [w for w in seen if "keeps the units" in str(w.message)]  # nothing held whole
    assert not any(v.startswith("kept whole") for v in model._ebcompile.plan.skipped.values())
    for layer in small.layers:
        for attn in (layer.self_attn, layer.cross_attn):
            assert attn.q_proj.out_features == 16 and attn.num_heads == 2
            assert "trace" in attn.__dict__["_ebcompile_reshapes"]
    with torch.no_grad():
        for shape in [(2, 7, 5), (3, 4, 9), (1, 11, 2)]:  # other batch, target and source lengths than traced
            assert rel_err(small(*inputs(*shape, seed=1)), model(*inputs(*shape, seed=1))) <= TOL
    report = ebcompile.export_onnx(small, tmp_path / "onnx" / "small.onnx", inputs(3, 4, 9))  # the asserted graph exports
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4
    ebcompile.save(small, tmp_path / "saved")
    loaded = ebcompile.load(tmp_path / "saved", model=Net().eval())
    with torch.no_grad():
        assert rel_err(loaded(*inputs(4, 6, 3, seed=2)), small(*inputs(4, 6, 3, seed=2))) <= TOL
        h, mask = torch.randn(2, 5, 32), torch.rand(2, 1, 5, 5) > 0.7
        with pytest.warns(UserWarning, match="original width"):  # the padded call reloads with the rewrite
            torch.testing.assert_close(loaded.layers[1].self_attn(h, attention_mask=mask)[0],
                                       model.layers[1].self_attn(h, attention_mask=mask)[0])


def test_a_call_unlike_the_traced_example_runs_the_modules_own_code_at_the_original_width():
    model = ebcompile.prepare(Net().eval(), inputs(2, 7, 5), ratio=0.5, structure="structured", scope="layer")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    attn = small.layers[0].self_attn
    h = torch.randn(2, 7, 32)
    masked = model.layers[0].self_attn
    mask = torch.rand(2, 1, 7, 7) > 0.8
    with torch.no_grad(), pytest.warns(UserWarning, match="runs its own code at the original width"):
        got = attn(h, attention_mask=mask)  # traced without a mask: the module's own code, its cut heads padded back
    torch.testing.assert_close(got[0], masked(h, attention_mask=mask)[0])
    ours, theirs = [], []
    with torch.no_grad():
        for step in range(3):  # a KV cache kept across calls, as in generation
            x = h[:, step:step + 1]
            torch.testing.assert_close(attn(x, cache=ours)[0], masked(x, cache=theirs)[0])
        weights = attn(h, output_attentions=True)[1]  # the probabilities of every original head (cut ones uniform)
    assert weights.shape == (2, 4, 7, 7)
    loss = attn(h, attention_mask=mask)[0].square().sum()
    loss.backward()  # the padded call trains the compact weights
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.shape == (16, 32)


class Branchy(nn.Module):
    """A decision on a traced value that is not a guard: short sequences take another path."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        y = self.lin(x)
        if x.size(1) > 4:
            y = y * 2
        return y + sum(v for v in kwargs.values())


def test_decisions_are_recorded_replayed_and_guarded():
    module, x = Branchy().eval(), torch.randn(2, 6, 8)
    gm, record = trace_with_values(module, (x,), {"bias": torch.ones(8)})
    assert record["concrete"] == {}
    assert [d[:2] for d in record["decisions"]] == [["bool", True], ["len", 1]]  # the branch, then ``sum`` over kwargs
    again = replay(module, record)
    assert again.code == gm.code
    with torch.no_grad():
        torch.testing.assert_close(again(x, bias=torch.ones(8)), module(x, bias=torch.ones(8)))
        with pytest.raises(Exception, match="ebcompile decision 0") as info:
            again(torch.randn(2, 3, 8), bias=torch.ones(8))  # would have taken the other branch
        assert failed_guard(info.value) == 0
        with pytest.raises(Exception, match="ebcompile decision 1"):
            again(x)  # no keyword to sum over
    assert same_keys({"a": 1, "b": 2}, ["b", "a"]) and not same_keys({"a": 1}, ["a", "b"])


def test_unguarded_decisions_replay_without_an_assert():
    module, x = Branchy().eval(), torch.randn(2, 6, 8)
    _, record = trace_with_values(module, (x,), {"bias": torch.ones(8)})
    record["decisions"][0][2] = False
    with torch.no_grad():
        replay(module, record)(torch.randn(2, 3, 8), bias=torch.ones(8))  # the branch stays the traced one, no guard left


def test_heads_folded_into_the_batch_are_followed():
    heads = np.array([True, False, True, True])
    dims = (None, heads, None, None)  # [B, H, T, D] with D's features all kept (not followed here)
    folded = _reshape(dims, (3, 4, 5, 6), (12, 5, 6))
    assert isinstance(folded[0], Outer) and folded[0].mask.tolist() == heads.tolist() and folded[1:] == (None, None)
    unfolded = _reshape(folded, (12, 5, 6), (3, 4, 5, 6))
    assert unfolded[0] is None and unfolded[1].tolist() == heads.tolist()


class InterleavedRotary(nn.Module):
    """Rotates pairs of features over the flat heads x head_dim width (``t[..., ::2]``, ``t[..., 1::2]``) before
    the heads are split, and merges them back by the input's width."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape

        def rotate(y: torch.Tensor) -> torch.Tensor:
            return torch.stack([-y[..., 1::2], y[..., ::2]], -1).flatten(-2)

        q, k, v = rotate(self.q(x)), rotate(self.k(x)), self.v(x)
        q, k, v = (y.view(b, t, self.num_heads, -1).transpose(1, 2) for y in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, t, c))


def test_strided_slices_over_the_heads_width_take_the_same_stride_of_the_kept_heads(tmp_path):
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(12, 32), InterleavedRotary(), nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.out(h + self.attn(h))

    torch.manual_seed(0)
    x = torch.randn(2, 7, 12)
    model = ebcompile.prepare(Residual().eval(), x, ratio=0.5, structure="structured", scope="layer")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    changes = small.attn.__dict__["_ebcompile_reshapes"]["eval"]
    assert small.attn.q.out_features == 16
    assert any(len(b) == 3 for c in changes.values() for b in c.get("slices", {}).values())  # strided: [start, stop, step]
    with torch.no_grad():
        y = torch.randn(3, 5, 12)
        assert rel_err(small(y), model(y)) <= TOL


def test_an_example_batch_of_one_still_folds_the_heads_with_the_batch():
    """With a batch of one, ``bsz * num_heads`` equals the head count: the size is scaled at run time, not fixed."""
    model = ebcompile.prepare(Net().eval(), inputs(1, 7, 5), ratio=0.5, structure="structured", scope="layer")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    assert small.layers[0].self_attn.num_heads == 2
    with torch.no_grad():
        for shape in [(1, 7, 5), (2, 7, 5), (3, 4, 9)]:
            assert rel_err(small(*inputs(*shape, seed=3)), model(*inputs(*shape, seed=3))) <= TOL


def test_calls_the_trace_cannot_take_run_the_modules_own_code():
    """A keyword the decorator renames, a tensor argument left out: the module's own (decorated) code runs, padded."""
    model = ebcompile.prepare(Net().eval(), inputs(2, 7, 5), ratio=0.5, structure="structured", scope="layer")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    h = torch.randn(2, 3, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for attn, masked in [(small.layers[0].self_attn, model.layers[0].self_attn)]:
            ours, theirs = [], []
            for _ in range(2):  # ``past_key_value`` is renamed to ``cache`` by the decorator only
                torch.testing.assert_close(attn(h, past_key_value=ours)[0], masked(h, past_key_value=theirs)[0])
            assert len(ours) == 2 and ours[0].shape[2] == 6
        cross, masked = small.layers[0].cross_attn, model.layers[0].cross_attn  # traced with key_value_states
        torch.testing.assert_close(cross(h)[0], masked(h)[0])  # called without it: self-attention


def test_lora_on_a_value_traced_attention_keeps_working_once_merged():
    """peft LoRA on every projection: tuner layers stay single calls in the rewritten forward, so the compact
    PeftModel merges (``merge_and_unload``) into a plain model whose traced and padded calls still run."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lora = peft.get_peft_model(Net().eval(), peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model = ebcompile.prepare(lora, inputs(2, 7, 5), ratio=0.5, structure="structured", scope="layer", importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    attn = small.base_model.model.layers[0].self_attn
    assert "trace" in attn.__dict__["_ebcompile_reshapes"] and attn.num_heads == 2
    merged = small.merge_and_unload().eval()
    assert isinstance(merged.layers[0].self_attn.q_proj, nn.Linear) and merged.layers[0].self_attn.q_proj.out_features == 16
    with torch.no_grad():
        for shape in [(2, 7, 5), (3, 4, 9)]:
            assert rel_err(merged(*inputs(*shape, seed=1)), model(*inputs(*shape, seed=1))) <= TOL
        h, mask = torch.randn(2, 7, 32), torch.rand(2, 1, 7, 7) > 0.8
        with pytest.warns(UserWarning, match="original width"):  # a padded call: the merged tensors, padded back
            got = merged.layers[0].self_attn(h, attention_mask=mask)[0]
        torch.testing.assert_close(got, model.base_model.model.layers[0].self_attn(h, attention_mask=mask)[0])
