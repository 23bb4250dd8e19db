"""The names Transformer code gives to the same facts, in one place: data that every family shares.

A family the structure analysis finds needs no record of its own; what ``compact``, ``report``, ``checkpoint`` and
``save_pretrained`` still need to know is *where* a module or config keeps a head count or a width, and those names
recur across families (``num_heads`` in BERT, ``n_head`` in GPT-2, ``num_key_value_heads`` in Llama). They are
listed here, once; per-family facts that are not shared live in the ``Family`` records (``families.records``).
"""

from __future__ import annotations

from torch import nn

__all__ = ["HEAD_COUNTS", "KV_COUNTS", "GROUP_COUNTS", "WIDTHS", "NEURON_WIDTHS", "CONFIG_FIELDS",
           "TRANSPOSED_LINEARS", "is_transposed_linear"]

# module (or config) attributes holding the query head count, the key/value head count, query heads per KV head
HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "nhead", "num_q_heads", "heads", "n_local_heads")
KV_COUNTS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "num_kv", "kv_heads", "n_kv", "n_local_kv_heads",
             "n_groups")  # n_groups: a Mamba-2 mixer's B/C groups, shared by its heads as K/V by query heads
GROUP_COUNTS = ("num_key_value_groups", "n_rep", "num_queries_per_kv", "kv_groups")
# attention widths (heads x head_dim; a Mamba-2 mixer's heads x head_dim and its convolution's channels) and FFN
# widths a forward reads
WIDTHS = ("all_head_size", "inner_dim", "attn_dim", "split_size", "hidden_size_per_partition", "qkv_dim", "intermediate_size",
          "conv_dim")
NEURON_WIDTHS = ("intermediate_size", "ffn_dim", "d_ff", "dim_feedforward", "hidden_features", "mlp_dim")

# Hugging Face config field -> (names of the linears whose output width gives it, divided by the config's head_dim?)
CONFIG_FIELDS = {
    "num_attention_heads": (("q_proj", "query", "q", "q_lin"), True),
    "num_key_value_heads": (("k_proj", "key", "k", "k_lin"), True),
    "intermediate_size": (("up_proj", "gate_proj", "fc1", "c_fc", "w1", "lin1", "wi", "dense_h_to_4h"), False),
}

# linear layers stored as weight [in, out] whose forward reads ``nf`` (Hugging Face GPT-2's ``Conv1D``)
TRANSPOSED_LINEARS = ("Conv1D",)


def is_transposed_linear(module: nn.Module) -> bool:
    return type(module).__name__ in TRANSPOSED_LINEARS and hasattr(module, "nf")
