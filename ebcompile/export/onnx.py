"""``export_onnx``: write ONNX, check it, run it in onnxruntime against PyTorch, and only then keep it."""

from __future__ import annotations

import contextlib
import copy
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from ..capture.graph import graph_kwargs, inputs_fit, normalize_inputs
from ..errors import ConfigError, ExportError
from ..names import split_name
from ..persist.io import atomic_path
from ..transforms.shrink import plain_model
from .calls import KeywordCall, PositionalCall, auto_axes, check_axes, check_names, flag_defaults, flatten, parameters_of, with_attention_mask
from .exporters import DYNAMO_MIN_OPSET, check_opset, write
from .external import INLINE_LIMIT, data_name, has_external, pack, previous_data, publish, weight_bytes
from .fusion import AttentionFusion
from .optimize import attention_summary, optimize_file
from .ort_check import run_onnxruntime
from .ort_child import session

__all__ = ["export_onnx", "ExportReport", "ort_session", "plain_model"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MASK_OPS = ("weight_mask", "parametrizations")


@dataclass
class ExportReport:
    path: str
    bytes: int
    providers: list[str]
    max_abs_error: float | None
    tolerance: tuple[float, float]
    optimized: bool
    op_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    external_data: bool = False  # the weights are in a data file beside ``path`` (``files[1]``)
    files: list[str] = field(default_factory=list)  # every file written; ``bytes`` is their total


def _to_compact_attention(net: nn.Module) -> None:
    """Swap each stock ``nn.MultiheadAttention`` (but ``add_bias_kv``) under ``net`` for the equivalent
    ``ExportedMultiheadAttention``: the stock module's export fixes the example's sequence length in a Reshape."""
    from ..modules.mha import ExportedMultiheadAttention

    for path, module in list(net.named_modules()):
        if path and type(module) is nn.MultiheadAttention and module.bias_k is None:
            owner, name = split_name(path)
            setattr(net.get_submodule(owner) if owner else net, name, ExportedMultiheadAttention.from_module(module))


@contextlib.contextmanager
def _fused(enabled: bool):
    from ..modules import mha

    old, mha.FUSED_EXPORT = mha.FUSED_EXPORT, enabled
    try:
        yield
    finally:
        mha.FUSED_EXPORT = old


def _shared_copy(net: nn.Module, half: bool = False, upcast: bool = False) -> nn.Module:
    """A copy of ``net``'s modules holding ``net``'s own tensors (``half``: fp16 copies of its floating ones;
    ``upcast``: fp32 copies of its bf16/fp16 ones), so the export can swap modules and set eval mode without changing
    the caller's model or copying its weights."""
    memo: dict[int, Any] = {}
    for t in [*net.parameters(), *net.buffers()]:
        if (half or (upcast and t.dtype in (torch.float16, torch.bfloat16))) and t.is_floating_point():
            new = t.detach().half() if half else t.detach().float()
            memo[id(t)] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
        else:
            memo[id(t)] = t
    return copy.deepcopy(net, memo)


def _exportable_experts(net: nn.Module) -> str:
    """Mixture-of-experts containers of the export copy ``net`` switched to transformers' ``batched_mm`` experts
    kernel: the default ``grouped_mm`` traces to ``aten::histc`` (no ONNX op) and ``eager`` unrolls only the experts
    the example routes to. Same function; returns a note when something was switched."""
    switched = False
    for module in net.modules():
        config = getattr(module, "config", None)
        if hasattr(module, "is_concatenated") and getattr(config, "_experts_implementation", "batched_mm") != "batched_mm":
            config._experts_implementation = "batched_mm"  # the copy's config: the caller's model keeps its own
            switched = True
    return "mixture-of-experts layers exported with the batched_mm experts kernel" if switched else ""


def ort_session(path: str | os.PathLike, prefer_gpu: bool = True):
    """An onnxruntime session on CUDA when a GPU really is there (decided by the session), else CPU, quietly."""
    return session(str(path), prefer_gpu and torch.cuda.is_available())


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | str | None = "auto",
    dtype: str = "fp32",
    opset: int = 17,
    optimize: bool = False,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    fused_attention: bool | None = None,
    external_data: bool | None = None,
) -> ExportReport:
    """Export ``model`` (a prepared model is compacted first) to ONNX at ``path`` and verify it.

    ``dynamic_axes="auto"`` makes dim 0 of every input/output the batch and dim 1 of integer inputs the
    sequence. Verification: ``onnx.checker``, then onnxruntime (CUDA EP when a GPU is there, else CPU)
    against PyTorch on ``example_inputs``, |ort - torch| <= atol + rtol * |torch| (default 1e-4/1e-4 in fp32;
    an fp16 export is held to 2e-2/2e-2 of the fp32 model). ``fused_attention`` (default: ``optimize``) writes each attention as ONE onnxruntime
    contrib node with that layer's own head counts: packed ``nn.MultiheadAttention`` self-attention as
    ``Attention``, every other ``scaled_dot_product_attention`` or ``softmax(q k^T) v`` as ``MultiHeadAttention``,
    or ``GroupQueryAttention`` when key/value have fewer heads (see ``export/attention.py``); an attention left
    unfused is named in ``report.notes`` with the reason. ``optimize=True`` then runs onnxruntime's transformer
    optimizer (LayerNorm, SkipLayerNorm, RMSNorm, GELU fusions) with the model type of the model's family.
    ``external_data`` (default: when the weights pass ~2 GB, the protobuf limit) writes the graph to ``path`` and
    the weights to one file beside it (``<name>.data``, see ``export/external.py``), committed together.
    On any failure an ``ExportError`` is raised and the previous export at ``path`` (or nothing) is left there.
    """
    import onnx

    from ..persist.materialized import require_materialized, require_module

    require_module(model, "export_onnx")
    require_materialized(model, "export_onnx")
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"path={type(path).__name__} is not a file path. Fix: call export_onnx(model, path, example_inputs).")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {list(DTYPES)}. Fix: use 'fp32' or 'fp16'.")
    opset = check_opset(opset)
    check_axes(dynamic_axes)
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0):
            raise ConfigError(f"{name}={tol!r} is not a number >= 0. Fix: pass a tolerance such as 1e-4, or None "
                              "(1e-4 in fp32, 2e-2 in fp16).")
    check_names(input_names, *normalize_inputs(example_inputs))
    fp16 = dtype == "fp16"
    rtol = rtol if rtol is not None else (2e-2 if fp16 else 1e-4)
    atol = atol if atol is not None else (2e-2 if fp16 else 1e-4)
    if external_data is not None and not isinstance(external_data, bool):
        raise ConfigError(f"external_data={external_data!r} is not True, False or None. Fix: pass a bool, or None "
                          "(external data when the weights pass 2 GB).")
    plain = plain_model(model)
    low = sorted({str(p.dtype).removeprefix("torch.") for p in plain.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
    net = _shared_copy(plain, upcast=bool(low))  # dtype="fp32" exports in float32 (onnxruntime's CPU kernels lack bf16)
    experts_note = _exportable_experts(net)
    weights = weight_bytes(net, fp16)
    if external_data is False and weights > INLINE_LIMIT:
        raise ConfigError(f"external_data=False, but the weights take {weights / 2**30:.2f} GiB and an ONNX protobuf "
                          "holds at most 2 GB. Fix: pass external_data=None (or True): the weights then go to a data "
                          "file beside the .onnx.")
    net.eval()
    fused_attention = optimize if fused_attention is None else fused_attention
    family_net = net
    args, kwargs = normalize_inputs(example_inputs)
    if low:  # the model's half-precision weights and inputs, as float32
        args, kwargs = pytree.tree_map(lambda a: a.float() if torch.is_tensor(a) and a.is_floating_point() else a, (args, kwargs))
        experts_note = "; ".join(n for n in (experts_note, f"the model's {'/'.join(low)} weights exported as float32") if n)
    args, kwargs, mask_note = with_attention_mask(net, args, kwargs)
    if kwargs:  # keyword inputs (Hugging Face models): ONNX inputs in input_names order, passed back by name
        check_names(input_names, args, kwargs)  # example_inputs may have become keywords (with_attention_mask)
        input_names = input_names or [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        args = tuple(kwargs[k] for k in input_names)
        extra = {k: v for k, v in graph_kwargs(net, kwargs).items() if k not in input_names}
        net = KeywordCall(net, input_names, extra)
    elif flag_defaults(net, len(args)):
        net = PositionalCall(net)
    with torch.no_grad(), inputs_fit(family_net, args, {}):  # fp16 is checked against the fp32 model
        reference = flatten(net(*args))
    if any(r.is_floating_point() and not bool(torch.isfinite(r).all()) for r in reference):
        raise ExportError(f"{type(family_net).__name__} itself outputs NaN or inf on example_inputs, so no export can be "
                          "verified. Fix: check the weights (a diverged training run) and pass finite, realistic inputs.")
    _to_compact_attention(net)  # after the reference: the file is held to the model's own modules
    traced, traced_args = net, args  # optimize + fp16: optimized in fp32, then converted (onnxruntime's own order)
    if fp16:
        args = tuple(a.half() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        if not optimize:
            traced, traced_args = _shared_copy(net, half=True), args
    input_names = input_names or [f"input_{i}" if len(args) > 1 else "input" for i in range(len(args))]
    output_names = output_names or (["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))])
    tries = [dynamic_axes] if dynamic_axes != "auto" else _auto_tries(input_names, list(args), output_names, reference)
    notes: list[str] = [n for n in (mask_note, experts_note) if n]
    path = Path(path)
    moved: Path | None = None  # the data file, once beside path: removed again if the export then fails
    # torch's TorchScript exporter first (attention fusion and onnxruntime's optimizer read its graphs); where its file
    # fails to export, load or verify, the dynamo exporter's (torch.export based) when nothing asked for those
    # (with auto axes, one sequence name for every token input first, then one per distinct example length)
    attempts = [("torchscript", a) for a in tries] + ([] if (optimize or fused_attention) else [("dynamo", tries[-1])])
    first: ExportError | None = None
    base_notes = len(notes)
    for attempt, (exporter, axes) in enumerate(attempts):
        try:
            with atomic_path(path) as tmp:
                try:
                    fusion = AttentionFusion(traced) if fused_attention else nullcontext()
                    write(exporter, traced, traced_args, tmp, input_names, output_names, axes, opset, _fused(fused_attention), fusion)
                    onnx.checker.check_model(str(tmp))
                except Exception as exc:  # noqa: BLE001
                    fix = ("pass attention_mask in example_inputs (without it Hugging Face models build their mask with ops "
                           "ONNX lacks)" if isinstance(net, KeywordCall) and "attention_mask" not in net.names
                           and "attention_mask" in parameters_of(net.net) else
                           "export a compact model with fixed-shape inputs, or report the failing op")
                    raise ExportError(f"torch.onnx.export / onnx.checker failed for {type(net).__name__}: "
                                      f"{type(exc).__name__}: {str(exc)[:300]}. Fix: {fix}.") from exc
                notes += fusion.notes if fused_attention else []
                optimized = optimize_file(tmp, family_net, fp16, notes) if optimize else False
                if optimize and fp16 and not optimized:  # the fp32 trace was to be converted by the optimizer
                    raise ExportError(f"onnxruntime's optimizer failed ({notes[-1] if notes else 'no reason given'}), and an fp16 "
                                      "export with optimize=True is converted to fp16 by it. Fix: export with optimize=False "
                                      "(fp16 traced directly), or in fp32.")
                data = _external(tmp, path, external_data, weights, notes, check=not optimized)
                try:
                    graph = onnx.load(str(tmp), load_external_data=False).graph
                except Exception as exc:  # noqa: BLE001 - a file the optimizer broke
                    raise ExportError(f"the exported file cannot be read back ({type(exc).__name__}: {str(exc)[:150]}). "
                                      "Fix: export with optimize=False, or report the model.") from exc
                summary = attention_summary(graph)
                notes += [summary] if summary else []
                counts: dict[str, int] = {}
                for node in graph.node:
                    counts[node.op_type] = counts.get(node.op_type, 0) + 1
                leftover = [i.name for i in graph.initializer if any(s in i.name for s in MASK_OPS)]
                if leftover:
                    raise ExportError(f"mask tensors left in the exported graph ({leftover[:3]}). Fix: compact the model first.")
                providers, err = _verify(tmp, input_names, args, output_names, reference, rtol, atol) if verify else ([], None)
                files = [tmp] + ([tmp.parent / data] if data else [])
                size = sum(f.stat().st_size for f in files)
                old = previous_data(path)  # the data file of the export replaced, removed once the new one is in place
                if data:
                    publish(tmp.parent / data, path.parent / data)
                    moved = path.parent / data
        except ExportError as exc:
            if moved is not None:
                moved.unlink(missing_ok=True)
            if attempt == len(attempts) - 1:
                if first is None:
                    raise
                raise ExportError(f"{first} (the {exporter} exporter failed too: {str(exc)[:200]})") from first
            first, moved, notes = first or exc, None, notes[:base_notes]  # the next attempt starts afresh
            continue
        except BaseException:
            if moved is not None:
                moved.unlink(missing_ok=True)
            raise
        if first is not None and exporter == "dynamo":
            notes.append(f"exported by torch.onnx's dynamo exporter (opset {max(opset, DYNAMO_MIN_OPSET)}): the TorchScript "
                         f"exporter's file failed ({str(first)[:160]})")
        elif first is not None:
            notes.append(f"one sequence axis per distinct input length: one name for all failed ({str(first)[:160]})")
        break
    if old is not None and old != moved:
        with contextlib.suppress(OSError):
            old.unlink()
    return ExportReport(str(path), size, providers, err, (rtol, atol), optimized, counts, notes, external_data=bool(data),
                        files=[str(path)] + ([str(moved)] if moved else []))


def _external(tmp: Path, path: Path, wanted: bool | None, weights: int, notes: list[str], check: bool) -> str | None:
    """Move the weights of the export at ``tmp`` to one data file beside it when ``wanted`` (None: when they pass
    the protobuf limit, or the exporter already had to write them apart); its name, or None when inline. ``check``:
    run ``onnx.checker`` again on the packed file (not after the optimizer, whose contrib ops it does not know)."""
    import onnx

    spilled = has_external(tmp)
    if wanted is False and spilled:
        raise ExportError("external_data=False, but the exported graph needs its weights in external data (its protobuf "
                          "passes 2 GB). Fix: pass external_data=None (or True).")
    if not (wanted or spilled or (wanted is None and weights > INLINE_LIMIT)):
        return None
    name = data_name(path)
    if not pack(tmp, name):
        notes.append("external_data: no tensor of 1 KiB or more, so the weights stay inside the .onnx")
        return None
    if check:
        onnx.checker.check_model(str(tmp))  # the path form: it follows external data and allows more than 2 GB
    return name


def _ort_reason(text: str) -> str:
    """onnxruntime's error, short: the failing node and the end of its status message, where the cause is (a reshape's
    input and requested shapes), not the source path in front of it."""
    head, _, status = text.partition("Status Message:")
    if not status:
        return text[:200]
    node = head.split("Non-zero status code returned while running")[-1].strip()[:120]
    return f"{node} {status.strip().split(' was false. ')[-1][-200:]}"


def _auto_tries(input_names: list[str], args: list, output_names: list[str], reference: list) -> list[dict]:
    """The automatic dynamic axes to try: one sequence name for all token inputs, then (where the example's lengths
    differ) one per length."""
    tries = []
    for per_length in (False, True):
        lengths: dict[tuple[str, int], str] = {}
        axes = auto_axes(input_names, args, lengths, per_length) | auto_axes(output_names, reference, lengths, per_length)
        if axes not in tries:
            tries.append(axes)
    return tries


def _verify(tmp: Path, input_names: list[str], args: tuple, output_names: list[str], reference: list[torch.Tensor],
            rtol: float, atol: float) -> tuple[list[str], float]:
    """Run ``tmp`` in onnxruntime on ``args`` and hold it to ``reference``: (providers, max |diff|)."""
    try:  # in a child process: a native crash of onnxruntime is an ExportError, not the caller's end
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(input_names, args) if isinstance(a, torch.Tensor)}
        providers, got = run_onnxruntime(tmp, feeds, gpu=torch.cuda.is_available())
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime refuses the graph or one of its kernels fails
        raise ExportError(f"onnxruntime cannot run the exported file ({type(exc).__name__}: {_ort_reason(str(exc))}). Fix: "
                          "export with optimize=False (or fused_attention=False), or dtype='fp32'.") from exc
    err = 0.0
    for name, want, have in zip(output_names, reference, got):
        w = want.detach().float().cpu().numpy()
        h = np.asarray(have, dtype=np.float32)
        if w.shape != h.shape:
            raise ExportError(f"onnxruntime output {name} has shape {h.shape}, PyTorch {w.shape}. Fix: check dynamic_axes.")
        excess = np.abs(h - w) - (atol + rtol * np.abs(w))
        err = max(err, float(np.abs(h - w).max(initial=0.0)))
        if (excess > 0).any():
            raise ExportError(
                f"onnxruntime ({providers[0]}) disagrees with PyTorch on {name}: max |diff| "
                f"{float(np.abs(h - w).max()):.3g} > atol {atol:g} + rtol {rtol:g}·|ref|. Fix: export in fp32, "
                "or loosen rtol/atol if the difference is expected."
            )
    return providers, err
