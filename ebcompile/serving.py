"""``save_for_serving``: a compact Llama-shaped decoder as a folder a serving engine (vLLM) loads.

- Every layer keeps the same counts and the family's config can say so (``pretrained.sync_config``): the stock
  architecture (``save_pretrained``), loaded by vLLM and ``AutoModelForCausalLM.from_pretrained`` as it is. Not for
  Qwen2 with pruned heads: vLLM's Qwen2 takes head_dim = hidden_size / heads, not the config's ``head_dim``.
- Layers differ (or that Qwen2 case): DeciLM / Nemotron-NAS (``architectures: ["DeciLMForCausalLM"]``, ``model_type`` "nemotron-nas"),
  one ``block_configs`` entry per layer: ``attention: {n_heads_in_group, no_op, replace_with_linear}`` and
  ``ffn: {ffn_mult, no_op, replace_with_linear}``; weights under the source model's own names. DeciLM's limits are
  checked first, and a ticket it cannot express raises ``ServingFormatError`` naming the fix, before anything is
  written: one query-head count for every layer (KV heads may differ, dividing it), FFN widths that
  ``int(2 * ffn_mult * hidden / 3)`` rounded up to a multiple of 256 gives back (``compact(model, round_to=256)``),
  the same bias layout in every layer (Qwen2's q/k/v biases: ``qkv_bias``, which vLLM's DeciLM reads), no sliding
  window. Neither transformers nor vLLM registers a config class for "nemotron-nas", so such a folder carries
  ``configuration_decilm.py`` (``ebcompile/persist/decilm_config.py``: a Llama config plus ``block_configs``, no model
  code) and needs ``trust_remote_code=True`` in vLLM: the one code file ebcompile ever writes.

Invariant: ``load_served(save_for_serving(m, d))`` computes what ``m`` computes (``load_served`` rebuilds the
source architecture from the DeciLM fields alone and loads the weights strictly); the folder is committed by
``savedir.atomic_dir`` (safetensors + JSON, plus that one config file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ServingFormatError
from .families.config_values import config_value
from .persist.savedir import atomic_dir

__all__ = ["save_for_serving", "load_served", "serving_layout", "ffn_mult_for", "DECILM_MULTIPLE"]

CONFIG, WEIGHTS, CODE = "config.json", "model.safetensors", "configuration_decilm.py"
DECILM_MULTIPLE = 256  # DeciLM rounds every FFN width up to a multiple of this
DECILM_SOURCES = ("llama", "qwen2", "mistral")  # model types whose layers DeciLM computes exactly
# model types whose vLLM attention computes head_dim as hidden_size / heads, ignoring config.head_dim: stock only
# while the heads still fill hidden_size, DeciLM (which reads head_dim) otherwise
HEAD_DIM_FROM_HIDDEN = ("qwen2",)
_ATTN, _MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Layer:
    heads: int
    kv_heads: int
    ffn: int


def _decilm_width(ffn_mult: float, hidden: int) -> int:
    """DeciLM's FFN width for ``ffn_mult`` (its ``_ffn_mult_to_intermediate_size``)."""
    width = int(2 * ffn_mult * hidden / 3)
    return width if width % DECILM_MULTIPLE == 0 else width + DECILM_MULTIPLE - width % DECILM_MULTIPLE


def ffn_mult_for(width: int, hidden: int) -> float | None:
    """The ``ffn_mult`` DeciLM turns back into ``width``, or None if no multiplier does (not a multiple of 256)."""
    mult = 3 * width / (2 * hidden)
    return mult if width > 0 and _decilm_width(mult, hidden) == width else None


def _core(model: nn.Module) -> nn.Module:
    """The plain compact model: a prepared one is compacted (``transforms.shrink.plain_model``)."""
    from .persist.materialized import require_module
    from .transforms.shrink import plain_model

    require_module(model, "save_for_serving")
    return plain_model(model)


def _is_block(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return all(isinstance(getattr(attn, n, None), nn.Linear) for n in _ATTN) and \
        all(isinstance(getattr(mlp, n, None), nn.Linear) for n in _MLP)


def _layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if getattr(model, "config", None) is None or not isinstance(layers, nn.ModuleList) or not len(layers) \
            or not all(_is_block(layer) for layer in layers):
        raise ServingFormatError(f"save_for_serving writes Llama-shaped decoders (model.layers[i].self_attn.q/k/v/o_proj, "
                                 f"mlp.gate/up/down_proj: Llama, Qwen2, Mistral); {type(model).__name__} is not one. "
                                 "Fix: save it with ebcompile.save (reload: ebcompile.load).")
    return list(layers)


def _head_dim(model: nn.Module) -> int:
    config = model.config
    head_dim = config_value(config, "head_dim")
    return int(head_dim) if isinstance(head_dim, int) and head_dim > 0 else config.hidden_size // config.num_attention_heads


def serving_layout(model: nn.Module) -> list[Layer]:
    """Query heads, KV heads and FFN width of every decoder layer of a compact Llama-shaped ``model``
    (``ServingFormatError`` for any other model, checked before its config is read)."""
    layers = _layers(model)
    head_dim = _head_dim(model)
    return [Layer(layer.self_attn.q_proj.out_features // head_dim, layer.self_attn.k_proj.out_features // head_dim,
                  layer.mlp.up_proj.out_features) for layer in layers]


def _stock(model: nn.Module, layout: list[Layer]) -> bool:
    """The model's own config describes every layer (rewritten by ``sync_config`` where it can be)."""
    from .persist.pretrained import sync_config

    if len(set(layout)) != 1:
        return False
    if model.config.model_type in HEAD_DIM_FROM_HIDDEN and layout[0].heads * _head_dim(model) != model.config.hidden_size:
        return False
    sync_config(model)
    config, (layer,) = model.config, set(layout)
    return (config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads),
            config.intermediate_size, _head_dim(model)) == (layer.heads, layer.kv_heads, layer.ffn,
                                                            model.model.layers[0].self_attn.head_dim)


def _biases(model: nn.Module) -> dict[str, bool]:
    """``attention_bias`` (o_proj), ``qkv_bias`` and ``mlp_bias``, the same in every layer, or ServingFormatError."""
    seen: set[tuple[bool, ...]] = set()
    for layer in _layers(model):
        seen.add(tuple(getattr(layer.self_attn, n).bias is not None for n in _ATTN)
                 + tuple(getattr(layer.mlp, n).bias is not None for n in _MLP))
    q, k, v, o, *mlp = seen.pop() if len(seen) == 1 else (None,) * 7
    if len(seen) or q is None or not (q == k == v) or len(set(mlp)) != 1:
        raise ServingFormatError("DeciLM gives q/k/v one bias setting, o_proj one and the MLP one, the same in every "
                                 "layer; this model's layers mix them. Fix: save it with ebcompile.save (reload: "
                                 "ebcompile.load).")
    return {"attention_bias": bool(o), "qkv_bias": bool(q), "mlp_bias": bool(mlp[0])}


def _decilm_config(model: nn.Module, layout: list[Layer]) -> dict[str, Any]:
    """The DeciLM config.json of ``model``, or ServingFormatError naming what DeciLM cannot express."""
    config = model.config
    kind = getattr(config, "model_type", None)
    fix_scope = ('prepare with scope="layer" (every layer keeps the same counts: a stock config), or keep attention '
                 'whole and prune FFN neurons per layer (prepare(..., exclude=["*.self_attn.*"]))')
    if kind not in DECILM_SOURCES:
        raise ServingFormatError(f"this {kind} model keeps different counts per layer, and DeciLM (the per-layer serving "
                                 f"format) computes only {', '.join(DECILM_SOURCES)} layers exactly. Fix: {fix_scope}, or "
                                 "save it with ebcompile.save.")
    if len({layer.heads for layer in layout}) != 1:
        raise ServingFormatError(f"DeciLM has one query-head count for every layer; this ticket keeps "
                                 f"{[layer.heads for layer in layout]} query heads per layer. Fix: {fix_scope}.")
    heads = layout[0].heads
    for i, layer in enumerate(layout):
        if layer.kv_heads < 1 or heads % layer.kv_heads:
            raise ServingFormatError(f"layer {i}: {layer.kv_heads} KV heads do not divide {heads} query heads (DeciLM: "
                                     f"n_heads_in_group = query heads / KV heads). Fix: {fix_scope}.")
    hidden = config.hidden_size
    mults = [ffn_mult_for(layer.ffn, hidden) for layer in layout]
    if None in mults:
        raise ServingFormatError(f"DeciLM rounds every FFN width up to a multiple of {DECILM_MULTIPLE}; this ticket keeps "
                                 f"{[layer.ffn for layer in layout]} (original {config.intermediate_size}). Fix: compact "
                                 f"with round_to={DECILM_MULTIPLE} (ebcompile.compact(model, round_to={DECILM_MULTIPLE}), "
                                 f"CLI: ebcompile compact --round-to {DECILM_MULTIPLE}); the original width must be a "
                                 f"multiple of {DECILM_MULTIPLE} too.")
    if (kind == "mistral" and getattr(config, "sliding_window", None) is not None) or getattr(config, "use_sliding_window", False):
        raise ServingFormatError(f"DeciLM has no sliding-window attention, and this {kind} config uses one "
                                 f"(sliding_window={config.sliding_window}). Fix: set model.config.sliding_window = None "
                                 "when your sequences never exceed it, or save with ebcompile.save.")
    out = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "auto_map", "layer_types",
                                                                 "use_sliding_window", "sliding_window", "max_window_layers")}
    out.update(_biases(model))
    out.update({
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": f"{CODE.removesuffix('.py')}.DeciLMConfig"},
        "num_attention_heads": heads, "num_key_value_heads": layout[0].kv_heads, "head_dim": _head_dim(model),
        "intermediate_size": max(layer.ffn for layer in layout),
        "block_configs": [{"attention": {"n_heads_in_group": heads // layer.kv_heads, "no_op": False,
                                         "replace_with_linear": False},
                           "ffn": {"ffn_mult": mult, "no_op": False, "replace_with_linear": False}}
                          for layer, mult in zip(layout, mults)],
        "ebcompile": {"source_model_type": kind, "source_architecture": type(model).__name__},
    })
    return out


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict to serve: contiguous CPU copies, a tied ``lm_head.weight`` left out (the config ties it)."""
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()
            if not (tied and k == "lm_head.weight") and "rotary_emb" not in k}


def save_for_serving(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the compact decoder ``model`` (a prepared model with a ticket is compacted first) to ``directory``
    as a folder vLLM serves, and return its path.

    Same counts in every layer: the stock architecture (``config.json`` + ``model.safetensors``, ``ebcompile.json``
    beside). Counts per layer: DeciLM / Nemotron-NAS ``block_configs`` plus ``configuration_decilm.py``, served
    with ``LLM(directory, trust_remote_code=True)`` and reloaded here with ``load_served``.

    Raises:
        ServingFormatError: not a Llama-shaped decoder, or a per-layer ticket DeciLM cannot express (the message
            names the fix: ``scope="layer"``, ``exclude=["*.self_attn.*"]``, ``round_to=256``); nothing is written.
        OutputPathError: ``directory`` holds files no ebcompile save wrote.
    """
    from .persist.materialized import require_materialized

    net = _core(model)
    require_materialized(net, "save_for_serving")
    layout = serving_layout(net)
    directory = Path(directory)
    if _stock(net, layout):
        with atomic_dir(directory, marker=CONFIG) as tmp:
            net.save_pretrained(tmp)
        return directory
    config = _decilm_config(net, layout)
    from safetensors.torch import save_file

    from .persist.decilm_config import DeciLMConfig

    DeciLMConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "auto_map")})  # it parses
    tensors = _tensors(net)
    with atomic_dir(directory, marker=CONFIG) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CODE).write_text((Path(__file__).parent / "persist" / "decilm_config.py").read_text())
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def load_served(directory: str | os.PathLike) -> nn.Module:
    """The model a ``save_for_serving`` folder holds, in eval mode, without running its code file: a stock folder
    through ``from_pretrained``; a DeciLM one rebuilt as its source architecture (``config["ebcompile"]``) with each
    layer's projections sized from ``block_configs`` alone (KV heads = heads / n_heads_in_group, FFN width from
    ``ffn_mult`` as DeciLM computes it), then loaded strictly."""
    from .persist.fsguard import read_json
    from .persist.hfload import NO_PICKLE, hf_class, hf_config

    directory = Path(directory)
    config = read_json(directory / CONFIG)
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory / CONFIG} is not a JSON object. Fix: write the folder with save_for_serving.")
    if config.get("model_type") != "nemotron-nas":
        cls = hf_class(hf_config(str(directory), local_only=True), "Fix: write the folder with save_for_serving.")
        return cls.from_pretrained(directory, **NO_PICKLE).eval()
    return _rebuild_decilm(directory, config)


def _rebuild_decilm(directory: Path, config: dict[str, Any]) -> nn.Module:
    import transformers
    from safetensors.torch import load_file

    from .persist.fsguard import guard

    fix = "Fix: write the folder with ebcompile.save_for_serving."
    source, blocks = config.get("ebcompile", {}).get("source_model_type"), config.get("block_configs")
    if source not in DECILM_SOURCES or not isinstance(blocks, list) or len(blocks) != config.get("num_hidden_layers"):
        raise CheckpointError(f"{directory / CONFIG} names no source architecture ebcompile rebuilds, or its block_configs "
                              f"do not cover every layer. {fix}")
    heads, head_dim, hidden = config["num_attention_heads"], config["head_dim"], config["hidden_size"]
    try:
        sizes = [(heads // b["attention"]["n_heads_in_group"], _decilm_width(b["ffn"]["ffn_mult"], hidden)) for b in blocks]
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{directory / CONFIG}: a block_configs entry is malformed ({exc!r}). {fix}") from exc
    skip = ("block_configs", "architectures", "auto_map", "model_type", "ebcompile", "qkv_bias", "transformers_version")
    fields = {k: v for k, v in config.items() if k not in skip}
    fields.update(num_attention_heads=1, num_key_value_heads=1, intermediate_size=1)  # every projection is resized below
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(source, **fields))
    qkv_bias = bool(config.get("qkv_bias", config.get("attention_bias", False)))
    o_bias, mlp_bias = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    for layer, (kv, ffn) in zip(model.model.layers, sizes):
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        attn.k_proj = nn.Linear(hidden, kv * head_dim, bias=qkv_bias)
        attn.v_proj = nn.Linear(hidden, kv * head_dim, bias=qkv_bias)
        attn.o_proj = nn.Linear(heads * head_dim, hidden, bias=o_bias)
        attn.head_dim, attn.num_key_value_groups, attn.scaling = head_dim, heads // kv, head_dim ** -0.5
        mlp.gate_proj, mlp.up_proj = nn.Linear(hidden, ffn, bias=mlp_bias), nn.Linear(hidden, ffn, bias=mlp_bias)
        mlp.down_proj = nn.Linear(ffn, hidden, bias=mlp_bias)
    with guard(directory / WEIGHTS, "read"):
        weights = load_file(str(directory / WEIGHTS))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        raise CheckpointError(f"{directory / WEIGHTS} does not fit its config ({str(exc).splitlines()[-1].strip()}). "
                              f"{fix}") from exc
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{directory / WEIGHTS} does not fit its config: missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}. {fix}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
