"""onnxruntime's transformer optimizer on an exported file: LayerNorm, SkipLayerNorm, RMSNorm
(``SimplifiedLayerNormalization``), GELU / BiasGelu fusions, run with the optimizer ``model_type`` of the model's
family (its ``families.records`` record, else read off the graph), then optional fp16.

Invariant: inputs, outputs and function stay; contrib attention nodes written at export are kept as they are.
A failing optimizer leaves the file unchanged and says why in the notes. A file with external data (over 2 GB) is
optimized with its data loaded and saved back with external data beside it; the optimizer then holds every weight
in a Python protobuf and fuses on copies (bench/onnx_large.py: past 13 GB RSS on a 2.3 GB model, where the plain
export adds 0.5 GB to the model's own memory), so for such a model prefer ``fused_attention=True`` without ``optimize``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
from torch import nn

from ..families.records import record_of
from .external import has_external

__all__ = ["optimize_file", "optimizer_model_type", "FUSED_ATTENTION_OPS", "attention_summary"]

FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")

def optimizer_model_type(net: nn.Module, path: Path) -> str:
    """The optimizer ``model_type`` for ``net``: from its family record (``families.records``), else the graph (causal attention: gpt2; a
    convolution input: vit; else bert), always one the installed onnxruntime knows."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    record = record_of(net)
    wanted = record.ort_model_type if record is not None else None
    if wanted in MODEL_TYPES:
        return wanted
    graph = onnx.load(str(path), load_external_data=False).graph
    causal = any(n.op_type == "GroupQueryAttention" or any(a.name == "unidirectional" and a.i for a in n.attribute)
                 for n in graph.node if n.op_type in FUSED_ATTENTION_OPS)
    return "gpt2" if causal else "vit" if any(n.op_type == "Conv" for n in graph.node) else "bert"


def optimize_file(path: Path, net: nn.Module, fp16: bool, notes: list[str]) -> bool:
    """Run the optimizer on ``path`` in place (head counts found per layer: ``num_heads=0``); True when it ran."""
    path = Path(path).resolve()  # the optimizer runs in a scratch working directory
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        model_type = optimizer_model_type(net, path)
        external = has_external(path)  # over 2 GB: read with its data, written back with it (``external.py`` packs it)
        options = FusionOptions(model_type)
        options.enable_embed_layer_norm = False  # its mask output would replace the model's own attention mask
        # onnxruntime's shape inference saves a model into the working directory when it cannot finish: run it in a
        # temporary one, so an export never leaves files behind
        with warnings.catch_warnings(), _quiet_logging(), tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
            warnings.simplefilter("ignore")
            opt = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=1,
                                 optimization_options=options)
            if fp16:
                opt.convert_float_to_float16(keep_io_types=False)
            opt.save_model_to_file(str(path), use_external_data_format=external)
        notes.append(f"optimizer model_type {model_type}")
        return True
    except Exception as exc:  # noqa: BLE001 - an optimizer failure keeps the plain export
        notes.append(f"optimizer skipped: {type(exc).__name__}: {str(exc)[:200]}")
        return False


@contextlib.contextmanager
def _quiet_logging():
    """The optimizer logs shape-inference chatter at WARNING from many module-named loggers: silence it while it runs."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(previous)


def attention_summary(graph: onnx.GraphProto) -> str | None:
    """One line: the fused attention nodes and their head counts (KV heads after a slash), in graph order."""
    heads = []
    for node in graph.node:
        if node.op_type in FUSED_ATTENTION_OPS:
            attrs = {a.name: a.i for a in node.attribute}
            kv = attrs.get("kv_num_heads")
            heads.append(f"{node.op_type}:{attrs.get('num_heads')}" + (f"/{kv}" if kv else ""))
    return f"fused attention nodes (heads per node): {', '.join(heads)}" if heads else None
