"""Patterns behind the capture, save/load and ONNX failures of the Hugging Face zoo (bench/hf_zoo.py), each
reproduced by a small hand-written module (nothing from transformers' test suite).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402

from ebcompile.hfload import build_checked  # noqa: E402


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
