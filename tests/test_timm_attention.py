"""timm attention the structure analysis follows without a family: Swin and MaxViT (a relative-position bias table
indexed per head inside the layer: its columns follow the heads) and EVA-02 (rotary q/k, SwiGLU; exported although its
forward takes an ``is_causal`` flag). Heads are found, compact ≡ masked, the compact model exports to verified ONNX
and reloads. Swin and MaxViT cut their heads and bias-table columns; EVA-02 cuts its heads with the slices of the
q|k|v bias its forward concatenates from q_bias, a zero k_bias *buffer* (non-persistent: ``save`` stores it cut)
and v_bias, through ``F.linear(x, self.qkv.weight, bias)`` (the traced forward reads the compact weight)."""

from __future__ import annotations

import pytest
import torch

import ebcompile

timm = pytest.importorskip("timm")

CASES = {
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=32,
                                       depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=10), 56),
    "maxvit": (lambda: timm.create_model("maxvit_tiny_rw_224", pretrained=False, img_size=64, embed_dim=(32, 64),
                                         depths=(1, 1), num_classes=10, stem_width=16), 64),
    "eva02": (lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, num_classes=10, depth=2), 56),
}


def _seeded(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = CASES[name][0]().eval()
    with torch.no_grad():  # layers that differ, so the ranking cuts heads unevenly
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_heads_are_cut_with_their_bias_columns_and_export(name, tmp_path):
    size = CASES[name][1]
    x = torch.randn(2, 3, size, size)
    model = ebcompile.prepare(_seeded(name), x, ratio=0.5, structure="structured", scope="layer", importance="magnitude")
    heads = [g for g in model._ebcompile.plan.groups if g.kind == "head" and g.units > 1]
    assert heads, model._ebcompile.plan.skipped
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None).eval()
    with torch.no_grad():
        for b in (2, 3):
            other = torch.randn(b, 3, size, size)
            torch.testing.assert_close(small(other), model(other), rtol=1e-4, atol=1e-5)
    for g in heads:  # every attention with heads to cut lost half of them, its bias table's columns too
        assert small.get_submodule(g.module).qkv.out_features < model.get_submodule(g.module).qkv.out_features
        attn = small.get_submodule(g.module)
        kept = int(model._ebcompile.ticket.masks.units[f"head:{g.name}"].sum()) if getattr(model._ebcompile, "ticket", None) \
            else None
        tables = [p for n, p in attn.named_parameters() if "relative_position_bias_table" in n]
        for t in tables:
            assert t.shape[-1] == kept == g.units // 2, (g.name, t.shape, kept)
    report = ebcompile.export_onnx(small, tmp_path / "m.onnx", x)
    assert report.max_abs_error is not None
    ebcompile.save(small, tmp_path / "saved")
    loaded = ebcompile.load(tmp_path / "saved", model=CASES[name][0]()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))
