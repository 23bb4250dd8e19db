"""A zoo of tiny random Transformers for the discovery tests: each written the way its users write it.

Every factory returns ``(model.eval(), example_inputs)``: CPU, seeded (the same call gives the same weights),
hidden 32, 2 layers, 4 heads, intermediate 64, vocab 100, sequence 8. 2-D+ weights are re-drawn with std
``1/sqrt(fan_in)`` (``seeded``, shared with ``tests/hf_models.py``) so that a pruned head or neuron visibly changes the
outputs. ``ZOO[name].shrink`` lists the modules (q/k/v/out projections — a fused qkv counts as one — and the
FFN linears) that a structured ticket must make smaller.

- ``llama`` / ``qwen2`` / ``mistral``: grouped-query attention, 4 query heads over 2 KV heads, head_dim 8,
  SwiGLU MLP (``gate_proj``/``up_proj``/``down_proj``); inputs ``input_ids`` + ``attention_mask``.
- ``phi3``: the same grouped-query attention with one fused ``qkv_proj`` (sliced by ``config.num_attention_heads``
  at forward time) and one fused ``gate_up_proj``.
- ``falcon``: every linear written out (``FalconLinear``: ``x @ self.weight.T + self.bias``), fused per-head
  ``query_key_value``.
- ``tenc-post`` / ``tenc-pre``: stock ``nn.TransformerEncoder`` (post- and pre-norm layers) between an input
  embedding and a classifier on the mean over the sequence.
- ``nanogpt``: Karpathy's nanoGPT ``model.py`` (fused ``c_attn`` split three ways, ``view``/``transpose`` to
  heads, ``F.scaled_dot_product_attention``, ``c_fc`` -> GELU -> ``c_proj``, tied ``lm_head``).
- ``param-mlp``: MLP blocks written with raw ``nn.Parameter`` matmuls (``x @ w_in + b``, ``h @ w_out.T``).
- ``swiglu``: a hand-written SwiGLU MLP ``w2(F.silu(w1(x)) * w3(x))`` in pre-norm residual blocks.
- ``distilbert``, ``t5-encoder``: ``transformers`` models with their own attention layouts.
- ``timm-vit``: ``timm`` ``VisionTransformer`` (fused ``qkv``, ``attn_dim``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, SEQ = 32, 2, 4, 2, 8, 64, 100, 8


# -- inputs ------------------------------------------------------------------------------------------------


def text_batch(batch: int = 2, seq: int = SEQ, seed: int = 1, pad: bool = True) -> dict[str, torch.Tensor]:
    """Token ids in [2, VOCAB) and an attention mask whose last row ends in two padded positions."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1:
        mask[-1, seq - 2:] = 0
    return {"input_ids": torch.randint(2, VOCAB, (batch, seq), generator=g), "attention_mask": mask}


def token_batch(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def image_batch(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# -- nanoGPT (after https://github.com/karpathy/nanoGPT/blob/master/model.py) -------------------------------


@dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = VOCAB
    n_layer: int = LAYERS
    n_head: int = HEADS
    n_embd: int = HIDDEN
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False"""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, but in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # regularization
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)

        # calculate query, key, values for all heads in batch and move head forward to be the batch dim
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

        # causal self-attention; Self-attend: (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T)
        y = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side

        # output projection
        y = self.resid_dropout(self.c_proj(y))
        return y


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)  # 4x in nanoGPT; 64 here
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        x = self.dropout(x)
        return x


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x)  # nanoGPT keeps only x[:, [-1], :] here; all positions are compared
            loss = None
        return logits, loss


# -- hand-written models -----------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SwiGLUBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class SwiGLUNet(nn.Module):
    def __init__(self, dim: int = HIDDEN, hidden: int = FFN, layers: int = LAYERS, classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(16, dim)
        self.blocks = nn.ModuleList([SwiGLUBlock(dim, hidden) for _ in range(layers)])
        self.out = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class ParamMLPBlock(nn.Module):
    """A pre-norm MLP written with raw parameters: ``gelu(x @ w_in + b_in) @ w_out.T`` (``w_in`` is [in, out])."""

    def __init__(self, dim: int = HIDDEN, hidden: int = FFN) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.w_in, self.b_in = nn.Parameter(torch.randn(dim, hidden)), nn.Parameter(torch.zeros(hidden))
        self.w_out = nn.Parameter(torch.randn(dim, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.norm(x) @ self.w_in + self.b_in) @ self.w_out.T


class ParamMLPNet(SwiGLUNet):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ParamMLPBlock() for _ in range(LAYERS)])


def feature_batch(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, SEQ, 16, generator=torch.Generator().manual_seed(seed))


class EncoderClassifier(nn.Module):
    """Token embedding -> stock ``nn.TransformerEncoder`` -> mean over the sequence -> classifier."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        layer = nn.TransformerEncoderLayer(d_model=HIDDEN, nhead=HEADS, dim_feedforward=FFN, dropout=0.0,
                                           batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=LAYERS, enable_nested_tensor=False)
        self.classifier = nn.Linear(HIDDEN, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(self.embed(input_ids)).mean(dim=1))


# -- transformers ------------------------------------------------------------------------------------------


def _decoder_config(cls, **kw):
    return cls(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
               head_dim=HEAD_DIM, intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=64,
               bos_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False, **kw)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(_decoder_config(LlamaConfig))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(_decoder_config(Qwen2Config))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(_decoder_config(MistralConfig, sliding_window=None))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(_decoder_config(Phi3Config, use_cache=False))


def _falcon():
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB,
                                          multi_query=False, parallel_attn=False, bias=True, use_cache=False,
                                          bos_token_id=0, eos_token_id=1, pad_token_id=0))


def _distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    return DistilBertForSequenceClassification(DistilBertConfig(
        dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, vocab_size=VOCAB, max_position_embeddings=64,
        num_labels=3, pad_token_id=0))


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=HIDDEN, d_kv=HEAD_DIM, num_heads=HEADS, d_ff=FFN, num_layers=LAYERS,
                                   vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    return GPTJForCausalLM(GPTJConfig(vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                      rotary_dim=4, n_inner=FFN, bos_token_id=0, eos_token_id=1, use_cache=False))


def _codegen():
    from transformers import CodeGenConfig, CodeGenForCausalLM

    return CodeGenForCausalLM(CodeGenConfig(vocab_size=VOCAB, n_positions=64, n_ctx=64, n_embd=HIDDEN, n_layer=LAYERS,
                                            n_head=HEADS, rotary_dim=4, n_inner=FFN, bos_token_id=0, eos_token_id=1,
                                            use_cache=False))


def _gpt_bigcode():
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=LAYERS,
                                                  n_head=HEADS, n_inner=FFN, multi_query=True, use_cache=False,
                                                  bos_token_id=0, eos_token_id=1))


def _mla(config_cls, model_cls, **kw):  # multi-head latent attention: low-rank q and kv, a rotary key part every head shares
    return model_cls(config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=16, kv_lora_rank=16,
                                qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
                                use_cache=False, bos_token_id=0, eos_token_id=1, pad_token_id=0, **kw))


def _minicpm3():
    from transformers import MiniCPM3Config, MiniCPM3ForCausalLM

    return _mla(MiniCPM3Config, MiniCPM3ForCausalLM)


def _deepseek_v3():  # the dense layers only (first_k_dense_replace): experts are tests/test_moe.py's
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return _mla(DeepseekV3Config, DeepseekV3ForCausalLM, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                n_group=1, topk_group=1, first_k_dense_replace=LAYERS, rope_interleave=True)


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=4, embed_dim=HIDDEN, depth=LAYERS, num_heads=HEADS, mlp_ratio=2,
                             num_classes=10)


# -- the zoo -----------------------------------------------------------------------------------------------


def _per_layer(pattern: str, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(pattern.format(i=i, n=n) for i in range(LAYERS) for n in names)


@dataclass(frozen=True)
class Spec:
    make: Callable[[], nn.Module]  # unseeded constructor
    batch: Callable[..., Any]  # batch(batch=2, seed=1) -> example inputs
    shrink: tuple[str, ...]  # modules whose parameter count must drop
    hf: bool = False  # a transformers PreTrainedModel
    needs: str | None = None  # optional package the model comes from
    heads: int = LAYERS  # attention modules with head groups
    ffns: int = LAYERS  # FFN neuron groups


_HF_DECODER = _per_layer("model.layers.{i}.{n}", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
_TENC = _per_layer("encoder.layers.{i}.{n}", ("self_attn", "self_attn.out_proj", "linear1", "linear2"))

ZOO: dict[str, Spec] = {
    "llama": Spec(_llama, text_batch, _HF_DECODER, hf=True),
    "qwen2": Spec(_qwen2, text_batch, _HF_DECODER, hf=True),
    "mistral": Spec(_mistral, text_batch, _HF_DECODER, hf=True),
    "phi3": Spec(_phi3, text_batch, _per_layer("model.layers.{i}.{n}", ("self_attn.qkv_proj", "self_attn.o_proj",
                                                                     "mlp.gate_up_proj", "mlp.down_proj")), hf=True),
    "falcon": Spec(_falcon, text_batch, _per_layer("transformer.h.{i}.{n}", ("self_attention.query_key_value",
                                                                         "self_attention.dense", "mlp.dense_h_to_4h",
                                                                         "mlp.dense_4h_to_h")), hf=True),
    # rotary embeddings rotating every two features (torch.stack of the pair's halves); CodeGen: one fused qkv
    "gptj": Spec(_gptj, text_batch, _per_layer("transformer.h.{i}.{n}", ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                                      "attn.out_proj", "mlp.fc_in", "mlp.fc_out")), hf=True),
    "codegen": Spec(_codegen, text_batch, _per_layer("transformer.h.{i}.{n}", ("attn.qkv_proj", "attn.out_proj", "mlp.fc_in",
                                                                            "mlp.fc_out")), hf=True),
    # multi-query attention (one KV head): the query heads are the units; its fused c_attn splits by embed_dim
    "gpt-bigcode": Spec(_gpt_bigcode, text_batch, _per_layer("transformer.h.{i}.{n}", ("attn.c_attn", "attn.c_proj",
                                                                                    "mlp.c_fc", "mlp.c_proj")), hf=True),
    "minicpm3": Spec(_minicpm3, text_batch, _per_layer("model.layers.{i}.{n}", ("self_attn.q_b_proj", "self_attn.kv_b_proj",
                                                                            "self_attn.o_proj", "mlp.up_proj")), hf=True,
                     ffns=3 * LAYERS),  # + q_a_proj and kv_a_proj: one unit each (normalized together), never cut
    "deepseek-v3": Spec(_deepseek_v3, text_batch, _per_layer("model.layers.{i}.{n}", ("self_attn.q_b_proj", "self_attn.kv_b_proj",
                                                                                  "self_attn.o_proj", "mlp.up_proj")), hf=True,
                        ffns=3 * LAYERS),
    "tenc-post": Spec(lambda: EncoderClassifier(norm_first=False), token_batch, _TENC),
    "tenc-pre": Spec(lambda: EncoderClassifier(norm_first=True), token_batch, _TENC),
    "nanogpt": Spec(lambda: GPT(GPTConfig()), token_batch,
                    _per_layer("transformer.h.{i}.{n}", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))),
    "param-mlp": Spec(ParamMLPNet, feature_batch, tuple(f"blocks.{i}" for i in range(LAYERS)), heads=0),
    "swiglu": Spec(SwiGLUNet, feature_batch, _per_layer("blocks.{i}.mlp.{n}", ("w1", "w2", "w3")), heads=0),
    "distilbert": Spec(_distilbert, text_batch, _per_layer("distilbert.transformer.layer.{i}.{n}", (
        "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2")), hf=True),
    "t5-encoder": Spec(_t5_encoder, text_batch, _per_layer("encoder.block.{i}.layer.{n}", (
        "0.SelfAttention.q", "0.SelfAttention.k", "0.SelfAttention.v", "0.SelfAttention.o", "1.DenseReluDense.wi",
        "1.DenseReluDense.wo")), hf=True, heads=1),  # one relative-position bias read by every layer: one head group
    "timm-vit": Spec(_timm_vit, image_batch, _per_layer("blocks.{i}.{n}", ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")),
                     needs="timm"),
}


def seeded(make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` in eval mode after ``torch.manual_seed(0)``, its 2-D+ weights re-drawn with std ``1/sqrt(fan_in)``
    (same every call; also tests/hf_models.py's ``build``)."""
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():  # weights large enough that a pruned head visibly changes the outputs
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return model


def fresh(name: str) -> nn.Module:
    """The zoo model ``name``, uncompacted, in eval mode, with its seeded weights (same every call)."""
    return seeded(ZOO[name].make)


def build(name: str) -> tuple[nn.Module, Any]:
    """``(model.eval(), example_inputs)`` for the zoo model ``name``."""
    return fresh(name), ZOO[name].batch()


def call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def main_output(out: Any) -> torch.Tensor:
    """The tensor a model's user reads: logits, the last hidden state, or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    return out[0]


def output(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return main_output(call(model, inputs))


# per-model helpers for these factories' names, as the brief of the zoo asks: name() -> (model, inputs)
def llama(): return build("llama")  # noqa: E704
def qwen2(): return build("qwen2")  # noqa: E704
def mistral(): return build("mistral")  # noqa: E704
def transformer_encoder(norm_first: bool = False): return build("tenc-pre" if norm_first else "tenc-post")  # noqa: E704
def nanogpt(): return build("nanogpt")  # noqa: E704
def swiglu(): return build("swiglu")  # noqa: E704
def distilbert(): return build("distilbert")  # noqa: E704
def t5_encoder(): return build("t5-encoder")  # noqa: E704
def timm_vit(): return build("timm-vit")  # noqa: E704
