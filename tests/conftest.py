"""Small model fixtures shared by the ebcompile tests (tiny configs: the machine has 2 CPU cores)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one torch thread per worker, N workers share the cores
    torch.set_num_threads(1)

from torchvision.models.swin_transformer import SwinTransformer  # noqa: E402
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402


def make_vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                             num_classes=10).eval()


def make_swin() -> nn.Module:
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10).eval()


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def image_batch(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def mlp_batch(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(1))


# name -> (model factory, example inputs factory)
TINY = {"vit": (make_vit, image_batch), "swin": (make_swin, image_batch), "mlp": (make_mlp, mlp_batch)}


@pytest.fixture
def vit() -> nn.Module:
    return make_vit()


@pytest.fixture
def swin() -> nn.Module:
    return make_swin()


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()


@pytest.fixture(params=sorted(TINY))
def tiny(request) -> tuple[str, nn.Module, torch.Tensor]:
    """(name, model, example inputs) for each tiny model."""
    make, batch = TINY[request.param]
    return request.param, make(), batch()


def save_word_bert(folder, vocab: list[str], layers: int, heads: int, hidden: int, positions: int,
                   backend_setup=None):
    """A BERT classifier with a word-level tokenizer over ``vocab`` (``[PAD]``/``[UNK]`` first), saved in ``folder``
    as a hub model is (``backend_setup(backend)`` may add a pre-tokenizer or post-processor)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = backend_setup(backend) if backend_setup else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", **(extra or {}))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_hidden_layers=layers, num_attention_heads=heads, hidden_size=hidden,
                                                     intermediate_size=2 * hidden, vocab_size=len(vocab),
                                                     max_position_embeddings=positions))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
