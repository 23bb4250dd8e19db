"""Tiny random Hugging Face models shared by tests/test_hf.py and tests/test_hf_trainer.py: 2 layers, 4 heads,
hidden 32, intermediate 64, vocab 100, sequence 8; nothing is downloaded. Weights are seeded and re-drawn
(``zoo.seeded``) so that a pruned head visibly changes the outputs; token batches are ``zoo.text_batch``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import zoo
from zoo import VOCAB, text_batch  # the zoo's token batches: ids in [2, VOCAB) (never a pad or special id), one padded row

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True, scope="module")
def quiet_one_thread():
    """Tiny tensors: one intra-op thread is faster and the machine is shared; transformers stays quiet."""
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)


# -- models ------------------------------------------------------------------------------------------------


def _gpt2_config(**kw) -> GPT2Config:
    return GPT2Config(n_layer=2, n_head=4, n_embd=32, n_inner=64, vocab_size=VOCAB, n_positions=16,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)


def _text_config(cls, **kw):
    return cls(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64, vocab_size=VOCAB,
               max_position_embeddings=24, **kw)


def image_batch(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


@dataclass(frozen=True)
class Arch:
    build: Callable[[], nn.Module]
    batch: Callable[..., dict[str, torch.Tensor]]
    text: bool


ARCHS = {
    "gpt2-lm": Arch(lambda: GPT2LMHeadModel(_gpt2_config()), text_batch, True),
    "gpt2-cls": Arch(lambda: GPT2ForSequenceClassification(_gpt2_config()), text_batch, True),
    "bert": Arch(lambda: BertForSequenceClassification(_text_config(BertConfig)), text_batch, True),
    "roberta": Arch(lambda: RobertaForSequenceClassification(_text_config(RobertaConfig, pad_token_id=1)), text_batch, True),
    "vit": Arch(lambda: ViTForImageClassification(ViTConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                                                            intermediate_size=64, image_size=32, patch_size=8,
                                                            num_labels=3)), image_batch, False),
    "swin": Arch(lambda: SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                                               num_heads=[2, 4], window_size=4, num_labels=3)),
                 image_batch, False),
}


def build(name: str) -> nn.Module:
    """``ARCHS[name]`` in eval mode with seeded, re-drawn weights (the same every call)."""
    return zoo.seeded(ARCHS[name].build)


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits

