"""Per-head tensors an attention layer receives from outside (ALiBi): BLOOM builds ``[batch * heads, 1, keys]`` once
in the model's forward, MPT ``[heads, 1, keys]``; a hand-written model passes its bias positionally. Heads are units,
each compact layer slices the tensor to its kept heads where it enters (any batch size), and save/load, save_pretrained
and ONNX keep the slices. A tensor no argument can be told apart by keeps the heads whole, and says why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ebcompile
from ebcompile.errors import CheckpointError

transformers = pytest.importorskip("transformers")


def _bloom():
    return transformers.BloomModel(transformers.BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=4))


def _mpt():
    return transformers.MptModel(transformers.MptConfig(vocab_size=99, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                                                        expansion_ratio=2))


def _batch(b: int, s: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 99, (b, s), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _ticketed(build):
    torch.manual_seed(0)
    model = ebcompile.prepare(build().eval(), _batch(2, 7), ratio=0.5, structure="structured", importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    return model.eval()


@pytest.mark.parametrize("build, arg", [(_bloom, "kwarg:alibi"), (_mpt, "kwarg:position_bias")], ids=["bloom", "mpt"])
def test_alibi_is_sliced_per_layer_and_every_form_of_the_model_agrees(build, arg, tmp_path):
    masked = _ticketed(build)
    heads = [g for g in masked._ebcompile.plan.groups if g.kind == "head"]
    assert len(heads) == 2 and all(h.head_inputs and h.head_inputs[0].arg == arg for h in heads)
    assert sorted(heads[0].head_inputs[0].heads) == [0, 1, 2, 3]
    small = ebcompile.compact(masked, round_to=None).eval()
    kept = [len(s[0]["keep"]) for s in ebcompile.transforms.head_inputs.head_input_slices(small).values()]
    assert kept and min(kept) < 4
    with torch.no_grad():
        for batch in (_batch(2, 7), _batch(1, 5, 1), _batch(3, 9, 2)):  # other batch sizes and lengths than prepared
            torch.testing.assert_close(small(**batch).last_hidden_state, masked(**batch).last_hidden_state)
    ebcompile.save(small, tmp_path / "s")
    back = ebcompile.load(tmp_path / "s", model=build())
    small.save_pretrained(tmp_path / "hf")
    again = ebcompile.load(tmp_path / "hf")
    x = _batch(3, 6, 3)
    with torch.no_grad():
        want = small(**x).last_hidden_state
        torch.testing.assert_close(back(**x).last_hidden_state, want)
        torch.testing.assert_close(again(**x).last_hidden_state, want)
    report = ebcompile.export_onnx(small, tmp_path / "s.onnx", _batch(2, 7))
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4


class Attention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) + bias  # bias [heads, s, s], passed positionally
        x = x + self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(torch.relu(self.fc1(x)))


class Biased(nn.Module):
    """A model building one per-head bias for its layers (slopes times distance), as ALiBi does."""

    def __init__(self, ambiguous: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Attention(), Attention()])
        self.ambiguous = ambiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        slopes = 2.0 ** -torch.arange(1, 5, dtype=x.dtype)
        bias = -slopes[:, None, None] * (torch.arange(s)[None, :] - torch.arange(s)[:, None]).abs().to(x.dtype)
        for layer in self.layers:
            x = layer(x, bias, bias.clone()) if self.ambiguous else layer(x, bias)
        return x


def test_a_positional_bias_is_sliced_and_an_ambiguous_one_keeps_the_heads(tmp_path):
    torch.manual_seed(0)
    model, x = Biased().eval(), torch.randn(2, 6, 16)
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    heads = [g for g in model._ebcompile.plan.groups if g.kind == "head"]
    assert [h.head_inputs[0].arg for h in heads] == ["arg:1", "arg:1"]
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    y = torch.randn(3, 4, 16)  # another batch size and length
    with torch.no_grad():
        torch.testing.assert_close(small(y), model(y))
    torch.manual_seed(0)
    other = ebcompile.prepare(Biased(ambiguous=True).eval(), x, ratio=0.5, structure="structured", importance="magnitude")
    assert not [g for g in other._ebcompile.plan.groups if g.kind == "head"]
    assert "per-head bias" in other._ebcompile.plan.skipped["layers.0.qkv"]


def test_malformed_head_input_slices_in_a_checkpoint_are_refused(tmp_path):
    small = ebcompile.compact(_ticketed(_bloom), round_to=None)
    ebcompile.save(small, tmp_path / "s")
    meta_path = tmp_path / "s" / "ebcompile.json"
    import json

    meta = json.loads(meta_path.read_text())
    path = next(iter(meta["head_inputs"]))
    meta["head_inputs"][path][0]["keep"] = [7]  # no position of a 4-head period
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="head_inputs"):
        ebcompile.load(tmp_path / "s", model=_bloom())


def test_a_compact_alibi_model_generates_the_masked_models_tokens():
    """With a KV cache the ALiBi tensor spans the whole cache length: each step's is sliced alike."""
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=4))
    x = _batch(2, 7)
    ebcompile.prepare(model.eval(), x, ratio=0.5, structure="structured", importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    with torch.no_grad():
        want = model.generate(**x, max_new_tokens=6, do_sample=False)
        got = ebcompile.compact(model).eval().generate(**x, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
