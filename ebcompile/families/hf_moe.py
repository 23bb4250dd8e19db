"""Mixture-of-experts facts the graph cannot show, as data (``analysis.experts`` reads them).

The structure is found without this file: an experts container is a module with 3-D parameters sharing a leading
dim E, next to a router whose weight is ``[E, hidden]``. What the shapes alone leave open is written here: which
fused tensor feeds the experts' hidden units and which reads them, whether the feeding one holds gate and up
halves (and in which order), whether the tensors are stored transposed, and where expert counts and widths live
(module attributes, config fields). The defaults match ``transformers`` 5.x ``@use_experts_implementation``
experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek, ...), which also carry the layout flags
(``has_gate``, ``is_transposed``, ``is_concatenated``, ``has_bias``) as attributes, read first. Tensors under
names no list here knows are read from their shapes alone when exactly one reading fits (``analysis.experts``).
"""

from __future__ import annotations

__all__ = ["UP_TENSORS", "DOWN_TENSORS", "GATE_TENSORS", "BIAS_SUFFIX", "LAYOUT_FLAGS", "GATED_UP", "EXPERT_COUNTS", "EXPERT_WIDTHS",
           "TOP_K", "CONFIG_EXPERT_COUNTS", "CONFIG_EXPERT_WIDTHS", "SHARED_EXPERT"]

# the fused tensor that makes the experts' hidden units ([E, k*I, H]) and the one that reads them ([E, H, I])
UP_TENSORS = ("gate_up_proj", "up_proj", "w13", "w3", "fc1", "w1")
DOWN_TENSORS = ("down_proj", "w2", "fc2")
# a separate gate tensor shaped like the up one (Mixtral's reference code, gpt-fast, torchtitan: w1 gate, w3 up, w2
# down): the first of these beside the up tensor (never the up tensor itself) makes the experts gated
GATE_TENSORS = ("gate_proj", "w1")
BIAS_SUFFIX = "_bias"  # gate_up_proj_bias [E, k*I], down_proj_bias [E, H]
GATED_UP = ("gate_up_proj", "w13")  # these hold gate and up halves unless the module's has_gate says otherwise
# module attribute -> default when the module lacks it (a module without ``is_transposed`` whose tensors only fit the
# transposed [E, H, I] / [E, I, H] layout is read as transposed)
LAYOUT_FLAGS = {"is_transposed": False, "is_concatenated": True}

# module attributes (experts container and router) holding the expert count, and the experts' width
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
EXPERT_WIDTHS = ("intermediate_dim", "moe_intermediate_size", "expert_dim", "ffn_hidden_size")
TOP_K = ("top_k", "num_experts_per_tok", "top_k_experts", "moe_topk", "num_experts_per_token", "experts_per_token")

# config fields: the expert count and the per-expert width (the first one the config has)
CONFIG_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
CONFIG_EXPERT_WIDTHS = ("moe_intermediate_size", "intermediate_size")
# a dense shared expert beside the routed ones: (child module name, config field of its width)
SHARED_EXPERT = ("shared_expert", "shared_expert_intermediate_size")
