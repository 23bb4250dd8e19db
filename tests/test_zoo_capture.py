"""Patterns behind the capture, save/load and ONNX failures of the Hugging Face zoo (bench/hf_zoo.py), each
reproduced by a small hand-written module (nothing from transformers' test suite).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402

import ebcompile  # noqa: E402
from ebcompile.capture.graph import capture, graph_kwargs  # noqa: E402
from ebcompile.persist.hfload import build_checked  # noqa: E402


class _ConvConfig(PretrainedConfig):
    model_type = "ebcompile_test_conv"

    def __init__(self, width: int = 8, **kwargs):
        self.width = width
        super().__init__(**kwargs)


class _ConvModel(PreTrainedModel):
    """A model without a token embedding: transformers' ``get_input_embeddings`` raises NotImplementedError."""

    config_class = _ConvConfig

    def __init__(self, config: _ConvConfig):
        super().__init__(config)
        self.conv = nn.Conv2d(3, config.width, 3)
        self.fc = nn.Linear(config.width, 4)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(pixel_values).mean((2, 3)))


def test_load_checks_a_model_without_input_embeddings():
    """save/load of a vision model (ConvNext, DETR): the shape check must not need ``get_input_embeddings``."""
    model = _ConvModel(_ConvConfig())
    with pytest.raises(NotImplementedError):
        model.get_input_embeddings()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    shapes["fc.weight"] = [3, 8]  # a compacted output width still fits
    shapes["fc.bias"] = [3]
    assert isinstance(build_checked(_ConvModel, _ConvConfig(), shapes, "here"), _ConvModel)


class _Cache:
    pass


class _TextConfig:
    use_cache = True


class _VisionLanguageConfig:
    """A composite config (Llava, InternVL): ``use_cache`` lives on the text config only."""

    def get_text_config(self, decoder: bool = False) -> _TextConfig:
        return _TextConfig()


class _PassesKwargsOn(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _VisionLanguageConfig()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, **kwargs) -> Any:
        if kwargs.get("use_cache", True):  # a cache object in the outputs: torch.export cannot flatten it
            return self.fc(x), _Cache()
        return self.fc(x)


def test_use_cache_is_turned_off_through_a_text_config():
    """A vision-language model passes ``**kwargs`` on to its language model, whose config sets use_cache."""
    model = _PassesKwargsOn()
    assert graph_kwargs(model, {"x": torch.ones(1, 4)})["use_cache"] is False
    assert capture(model, {"x": torch.ones(1, 4)}).method == "export"


class _SplitByLengths(nn.Module):
    """Branches on tensor values (``.tolist()`` sizes, ``if tensor.any()``), as image grids and MoE routing do."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, lengths.tolist(), dim=1)
        y = torch.cat([p.mean(1, keepdim=True) for p in parts], 1)
        y = y + self.down(torch.relu(self.up(y)))
        if (lengths > 2).any():
            y = y * 2
        return self.head(y)


def test_data_dependent_forward_is_captured_and_compacts():
    """Plain torch.export refuses the value-dependent branches; capture decides them by the example inputs."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    torch.manual_seed(0)
    model = _SplitByLengths().eval()
    inputs = {"x": torch.randn(2, 6, 8), "lengths": torch.tensor([1, 2, 3])}
    with pytest.raises(GuardOnDataDependentSymNode):
        torch.export.export(model, (), inputs, strict=False)
    prepared = ebcompile.prepare(model, inputs, structure="structured")
    assert [(g.kind, g.units) for g in prepared._ebcompile.plan.groups] == [("neuron", 32)]
    ebcompile.apply_ticket(prepared, ebcompile.draw_ticket(prepared, 0.3))
    with torch.no_grad():
        masked = prepared(**inputs)
        small = ebcompile.compact(prepared, round_to=None)
        assert small.up.out_features < 32
        torch.testing.assert_close(small(**inputs), masked)
