"""Capture: model + example inputs -> an fx graph whose parameter uses are named.

Three paths, tried in order: ``torch.fx.symbolic_trace`` (torchvision ViT/Swin, plain modules; leaf modules
such as ``nn.MultiheadAttention`` stay single nodes) and ``torch.export.export`` (Hugging Face models and
anything with data-dependent Python; where that Python branches on tensor values, once more with real-tensor
propagation, so the branches follow the example inputs), then by pieces (``capture_pieces``: the largest submodules
that export, merged; a vision-language model's towers when the whole does not export). The graph is only analysed; the user's module is never
replaced.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn

from ..errors import CaptureError, EbcompileError, InputMismatchError
from ..transforms.verify import evaluating
from .pieces import capture_pieces
from .types import Captured

CONSTANT = "ebcompile.constant"  # node.meta: the value of a small lifted integer constant (torch.export)

__all__ = ["CONSTANT", "Captured", "capture", "normalize_inputs", "graph_kwargs", "inputs_fit"]


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def check_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Run the model once so that inputs that do not fit fail with a clear message."""
    with evaluating(model), torch.no_grad(), inputs_fit(model, args, kwargs):
        model(*args, **kwargs)


@contextlib.contextmanager
def inputs_fit(model: nn.Module, args: tuple, kwargs: dict) -> Iterator[None]:
    """Turn any error of a forward on the example inputs into ``InputMismatchError`` naming their shapes."""
    try:
        yield
    except EbcompileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means the inputs do not fit
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        shapes += [f"{k}={tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}" for k, v in kwargs.items()]
        raise InputMismatchError(
            f"the example inputs {shapes} do not run through {type(model).__name__}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Fix: pass example_inputs shaped like one real batch (a tensor, a tuple of tensors, or a dict of "
            "keyword tensors)."
        ) from exc


class _Tracer(fx.Tracer):
    """fx's tracer, but a ``torch.nn`` container (``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer``) is
    traced through instead of kept as one opaque call; ``nn.MultiheadAttention`` stays a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.MultiheadAttention):
            return True
        return super().is_leaf_module(m, qualname) and not any(True for _ in m.children())


def _symbolic_trace(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    cap = Captured(graph=gm.graph, method="symbolic_trace", root=model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in params:
            cap.param_of[node.name] = node.target
        elif node.op == "call_module":
            cap.module_of[node.name] = node.target
    return cap


def graph_kwargs(model: nn.Module, kwargs: dict) -> dict:
    """``kwargs`` plus ``use_cache=False`` for models whose forward takes ``use_cache`` (Hugging Face decoders), or
    passes ``**kwargs`` on to a model configured with it (a PEFT wrapper): a KV cache object in the outputs cannot
    be exported, and it is not part of the computation."""
    if kwargs.get("use_cache") is not None:  # None (a parent passing its own default on) means unset
        return kwargs
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    passes_on = any(p.kind is p.VAR_KEYWORD for p in params.values()) and _has_cache(getattr(model, "config", None))
    return dict(kwargs, use_cache=False) if "use_cache" in params or passes_on else kwargs


def _has_cache(config: Any) -> bool:
    """Whether ``config`` or its text config (a vision-language model's: Llava, InternVL) sets ``use_cache``."""
    if config is None:
        return False
    get_text = getattr(config, "get_text_config", None)
    try:
        text = get_text(decoder=True) if callable(get_text) else None
    except Exception:  # noqa: BLE001 - a config without a single text config
        text = None
    return hasattr(config, "use_cache") or hasattr(text, "use_cache")


@contextlib.contextmanager
def _no_op_conversions() -> Iterator[None]:
    """While exporting, ``module.to(dtype/device)`` that changes nothing returns the module as it is. A forward that
    casts a submodule to the dtype it already has (Switch Transformers' and NLLB-MoE's routers:
    ``self.classifier = self.classifier.to(self.dtype)``) otherwise fails in export, whose fake parameters cannot
    be swapped in place ("Couldn't swap Linear.weight"). A conversion that changes something runs as before."""
    original = nn.Module.to

    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*self.parameters(), *self.buffers()]
        same = memory_format is None and all(
            (device is None or t.device == device) and (dtype is None or not t.is_floating_point() or t.dtype == dtype)
            for t in tensors)
        return self if same else original(self, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original


class _DropPartialGraphs:
    """stderr, less the partial graph ``torch.export`` prints whole when it fails (one write of generated code;
    a failure here is expected and handled: the next capture path is tried)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.dropped = stream, False

    def write(self, text: str) -> int:
        drop = "def forward(self" in text or (self.dropped and text == "\n")  # print's own newline after it, too
        self.dropped = "def forward(self" in text
        return len(text) if drop else self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _export_program(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict); where the forward branches on tensor values (``.item()``, ``.tolist()``,
    ``nonzero``: vision-language models' image grids, MoE routing), once more with real-tensor propagation, which
    decides those branches by the example inputs' values. The graph is only analysed for these inputs, so a branch
    fixed by them is what the analysis needs."""
    from torch._functorch import config as functorch_config
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")  # prints whole graphs on these errors
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    stderr, sys.stderr = sys.stderr, _DropPartialGraphs(sys.stderr)
    try:
        with _no_op_conversions():
            return torch.export.export(model, args, kwargs, strict=False)
    except GuardOnDataDependentSymNode as first:
        try:
            with functorch_config.patch(fake_tensor_propagate_real_tensors=True), _no_op_conversions():
                return torch.export.export(model, args, kwargs, strict=False)
        except Exception:  # noqa: BLE001 - report the plain export's error, the one a user can act on
            raise first from None
    finally:
        shapes_log.setLevel(level)
        sys.stderr = stderr


def _export(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    with evaluating(model):
        ep = _export_program(model, args, graph_kwargs(model, kwargs))
    inline_grad_blocks(ep.graph_module)
    cap = Captured(graph=ep.graph_module.graph, method="export", root=model)
    sig = ep.graph_signature
    cap.user_outputs = [i for i, spec in enumerate(sig.output_specs) if spec.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
    constants = getattr(sig, "inputs_to_lifted_tensor_constants", {})
    for node in ep.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in sig.inputs_to_parameters:
            cap.param_of[node.name] = sig.inputs_to_parameters[node.name]
        elif node.op == "placeholder" and node.name in sig.inputs_to_buffers:
            cap.buffer_of[node.name] = sig.inputs_to_buffers[node.name]
        elif node.op == "placeholder" and node.name in constants:  # small integer constants: index lists (x[..., [-2]])
            value = ep.constants.get(constants[node.name])
            if isinstance(value, torch.Tensor) and value.numel() <= 4096 and not value.is_floating_point() and not value.is_complex():
                node.meta[CONSTANT] = value.detach().cpu().clone()
    return cap


def inline_grad_blocks(gm: fx.GraphModule) -> None:
    """Copy the body of every ``with torch.no_grad()`` block (``torch.export``'s ``wrap_with_set_grad_enabled``
    higher-order op over a submodule) into the graph in its place, so the analysis follows the features through it
    (LayoutLMv3 looks up its per-head position bias under ``no_grad``). The graph is only analysed, never run."""
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    for node in [n for n in gm.graph.nodes if hop is not None and n.op == "call_function" and n.target is hop]:
        sub = getattr(gm, node.args[1].target, None) if isinstance(node.args[1], fx.Node) else None
        if not isinstance(sub, fx.GraphModule) or any(n.op == "get_attr" for n in sub.graph.nodes):
            continue  # a nested block: left as it is (its outputs are then unlabelled)
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, node.args[2:]))
        outputs: Any = None
        with gm.graph.inserting_before(node):
            for inner in sub.graph.nodes:
                if inner.op == "output":
                    outputs = fx.map_arg(inner.args[0], env.__getitem__)
                elif inner.op != "placeholder":
                    env[inner] = gm.graph.node_copy(inner, env.__getitem__)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for user in list(node.users):
            if user.target is not operator.getitem:
                break
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)


CAPTURE_PATHS: dict[str, Callable[[nn.Module, tuple, dict], Captured]] = {
    "symbolic_trace": _symbolic_trace,
    "export": _export,
    # the largest exportable parts, recorded without a KV cache (a cache object is no input export takes)
    "pieces": lambda model, args, kwargs: capture_pieces(model, args, graph_kwargs(model, kwargs), _export),
}


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


def capture(model: nn.Module, example_inputs: Any, method: str = "auto") -> Captured:
    """Capture ``model`` as a graph, trying ``symbolic_trace`` then ``torch.export`` (``method="auto"``)."""
    args, kwargs = normalize_inputs(example_inputs)
    if not _on_meta(model):  # a meta model's eager forward can fail on .item() where tracing does not (ebcompile.analyse)
        check_inputs(model, args, kwargs)
    if method != "auto" and method not in CAPTURE_PATHS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown capture method {method!r}. Fix: use one of 'auto', {', '.join(map(repr, CAPTURE_PATHS))}.")
    paths = list(CAPTURE_PATHS) if method == "auto" else [method]
    failures = []
    for name in paths:
        try:
            return CAPTURE_PATHS[name](model, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - collect every path's failure for the message
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failures.append(f"{name}: {type(exc).__name__}: {first[:300]}")
    raise CaptureError(
        f"could not capture {type(model).__name__} as a graph; tried " + "; ".join(failures)
        + ". Fix: make the failing code traceable — wrap a data-dependent function with torch.fx.wrap, or move "
        "Python control flow on tensor values out of forward — or pass capture_method= to pick the path that "
        "comes closest and read its error."
    )
