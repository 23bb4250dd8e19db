"""torchvision's vit_b_16 and swin_t at full width (their classes and widths, fewer blocks: tests/test_prepare.py masks
the full-depth models) at structured p = 0.3: smaller linears, smaller verified ONNX."""

from __future__ import annotations

import onnx
import pytest
import torch
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import ebcompile
from ebcompile.search.importance import raw_tensor

CASES = {  # vit_b_16's and swin_t's widths, heads and windows, shallower
    "vit_b_16": lambda: VisionTransformer(image_size=224, patch_size=16, num_layers=2, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "swin_t": lambda: SwinTransformer(patch_size=[4, 4], embed_dim=96, depths=[1, 1, 2, 1], num_heads=[3, 6, 12, 24],
                                      window_size=[7, 7], stochastic_depth_prob=0.2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_structured_p03_shrinks_linears_and_onnx(name, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    dense = CASES[name]().eval()
    dense_file = ebcompile.export_onnx(dense, tmp_path / "dense.onnx", x)
    model = ebcompile.prepare(dense, x, ratio=0.3, structure="structured", scope="layer")  # 30% of every layer's units
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    plan = model._ebcompile.plan
    pruned_tensors = {m.tensor for g in plan.groups for m in g.members if m.masked}
    before = sum(raw_tensor(model, n).numel() for n in pruned_tensors)
    total = sum(p.numel() for p in dense.parameters())
    small = ebcompile.compact(model).eval()
    removed = total - sum(p.numel() for p in small.parameters())
    drop = removed / before
    assert drop >= 0.28, f"the pruned linear layers lost {drop:.1%} of their parameters"
    report = ebcompile.export_onnx(small, tmp_path / "small.onnx", x)
    assert report.max_abs_error is not None  # verified against PyTorch in onnxruntime
    file_drop = 1 - report.bytes / dense_file.bytes
    assert abs(file_drop - removed / total) <= 0.02, (file_drop, removed / total)
    graph = onnx.load(str(tmp_path / "small.onnx"), load_external_data=False).graph
    assert not [i.name for i in graph.initializer if "mask" in i.name or "parametrizations" in i.name]
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=1e-4, atol=1e-4)
