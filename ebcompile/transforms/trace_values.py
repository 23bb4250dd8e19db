"""A ``torch.fx`` tracer for forwards that branch on traced values, for ``transforms.reshapes``.

``torch.fx.symbolic_trace`` refuses Python control flow on a traced value: the shape guards of Hugging Face's
older attention modules (``if attn_weights.size() != (bsz * self.num_heads, tgt_len, src_len): raise ...``; TrOCR,
FSMT, LED, ProphetNet, Table Transformer and others) stop it, and an optional argument traced as a placeholder takes
the wrong ``is not None`` branch. ``ValueTracer`` traces one module on its example call: every ``None``, flag or
string argument is fixed to its example value (tensors and numbers stay inputs), every op also runs on the example
values, and each decision Python needs (``bool``, ``len``, iteration, the keys of ``**kwargs``) is taken from them
and *recorded*. The graph asserts each decision at run time (``torch._assert``), so a call that would have branched
differently raises instead of computing something else. Tracing again from the record (``replay``) needs no
inputs: that is how ``install_rewrite`` and ``load`` rebuild the same graph from the module's own code and the
JSON record, without running or storing code from a checkpoint. A call with other fixed arguments than traced (a
KV cache in generation) runs the module's own code with its cut tensors zero-padded back (``transforms.padded_calls.run_padded``).
"""
from __future__ import annotations

import functools
import inspect
import operator
import re
from typing import Any

import torch
from torch import fx, nn

from ..adapters import AdapterLeafTracer
from .padded_calls import run_padded

__all__ = ["ValueTracer", "trace_with_values", "replay", "call_as_traced", "forward_signature", "FIXED", "failed_guard",
           "GUARD", "concrete_arguments", "TraceRecord"]

TraceRecord = dict[str, Any]  # {"concrete": {arg: value}, "decisions": [[kind, value, guarded], ...]}
FIXED = "ebcompile.fixed"  # node.meta of a placeholder fx renamed ``<arg>_1``: an argument traced as a constant
GUARD = "ebcompile decision"  # how a failed guard's message begins (``failed_guard`` reads the index back)
_SCALARS = (type(None), bool, int, float, str)  # what a record can hold
_FIXED_TYPES = (type(None), bool, str)  # arguments traced as constants (numbers stay inputs: an image's height)
_MISSING = object()


class _ValueProxy(fx.Proxy):
    def __len__(self) -> int:
        return self.tracer.decide("len", self)  # type: ignore[attr-defined]


class ValueTracer(AdapterLeafTracer):
    """``symbolic_trace`` whose control-flow decisions come from example values (``inputs``: placeholder name ->
    value) or, with ``decisions`` and no inputs, from an earlier trace's record. PEFT tuner layers stay leaves."""

    def __init__(self, inputs: dict[str, Any] | None = None, decisions: list | None = None) -> None:
        super().__init__()
        self.inputs = inputs
        self.values: dict[fx.Node, Any] = {}
        self.decisions: list[list[Any]] = []  # what this trace decided, in order
        self._replay = list(decisions) if decisions is not None else None
        self._evaluating = False  # computing a value: module calls and attributes run eagerly, nothing is traced

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        return forward(*args, **kwargs) if self._evaluating else super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:  # noqa: A003 - fx's hook
        return attr_val if self._evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        if target is torch.nn.functional.scaled_dot_product_attention and isinstance(kwargs.get("is_causal"), fx.Proxy):
            kwargs = dict(kwargs, is_causal=self.decide("bool", kwargs["is_causal"]))  # a Python bool for export
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.inputs is not None:
            self.values[proxy.node] = self._evaluate(proxy.node)
        return proxy

    def _evaluate(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            return self.inputs.get(str(n.target).lstrip("*"), _MISSING)
        missing: list[fx.Node] = []
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: _value(self.values, a, missing))
        if missing:
            return _MISSING
        self._evaluating = True
        grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)  # values only: the traced graph keeps the forward's own grad mode
        try:
            if n.op == "get_attr":
                obj: Any = self.root
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
                return obj
            if n.op == "call_function":
                return n.target(*args, **kwargs)
            if n.op == "call_method":
                return getattr(args[0], n.target)(*args[1:], **kwargs)
            if n.op == "call_module":
                return self.root.get_submodule(n.target)(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a value that cannot be computed only matters if a decision needs it
            return _MISSING
        finally:
            self._evaluating = False
            torch.set_grad_enabled(grad)
        return _MISSING

    def decide(self, kind: str, proxy: fx.Proxy) -> Any:
        """The value of ``kind``(``proxy``) Python needs now: recorded (and replayed) as ``[kind, value, guarded]``;
        a guarded decision is asserted in the graph."""
        guarded = True
        if self._replay is not None:
            if not self._replay or self._replay[0][0] != kind:
                raise fx.proxy.TraceError(f"the recorded trace has no {kind} decision here (the module's code changed?)")
            entry = self._replay.pop(0)
            value, guarded = entry[1], bool(entry[2]) if len(entry) > 2 else True
        else:
            got = self.values.get(proxy.node, _MISSING)
            if got is _MISSING:
                raise fx.proxy.TraceError(f"{kind}() of a traced value whose example value is unknown ({proxy.node.format_node()})")
            value = bool(got) if kind == "bool" else len(got) if kind == "len" else [str(k) for k in got]
        index = len(self.decisions)
        self.decisions.append([kind, value, guarded])
        if guarded:
            if kind == "bool":
                cond = self.create_proxy("call_function", operator.truth if value else operator.not_, (proxy,), {})
            elif kind == "len":
                cond = self.create_proxy("call_function", operator.eq, (self.create_proxy("call_function", len, (proxy,), {}), value), {})
            else:
                cond = self.create_proxy("call_function", same_keys, (proxy, value), {})
            self.create_proxy("call_function", torch._assert, (cond, f"{GUARD} {index}: traced with {kind} = {value}; "
                              "this call branches differently from the example the forward was rewritten on"), {})
        return value

    def keys(self, obj: fx.Proxy) -> list[str]:  # ``f(**kwargs)`` of the forward's own ``**kwargs``
        return self.decide("keys", obj)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.decide("bool", obj)

    def iter(self, obj: fx.Proxy):  # noqa: A003 - fx.Tracer's hook name
        items = self.create_proxy("call_function", tuple, (obj,), {})  # any iterable (``dict.values()``, a tensor)
        return iter([items[k] for k in range(self.decide("len", obj))])


def same_keys(mapping: dict, keys: list[str]) -> bool:
    """Whether ``mapping`` has exactly ``keys`` (a guard of a traced ``**kwargs``)."""
    return sorted(map(str, mapping)) == sorted(keys)


def _value(values: dict[fx.Node, Any], a: fx.Node, missing: list) -> Any:
    got = values.get(a, _MISSING)
    if got is _MISSING:
        missing.append(a)
    return got


def concrete_arguments(module: nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """The example call as (every ``None``, flag or string argument -> its example or default value, fixed in the
    trace; every argument by name -> its example value). Raises ``TypeError`` for an argument that is neither a
    tensor, a number, a tuple of them nor one of those (a cache object): it cannot be recorded."""
    sig = inspect.signature(module.forward)
    bound = sig.bind_partial(*args, **kwargs)
    concrete, named = {}, {}
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_POSITIONAL:
            raise TypeError(f"*{name}: a traced forward is called by its named arguments")
        if p.kind is p.VAR_KEYWORD:
            named[name] = dict(bound.arguments.get(name, {}))
            continue
        value = bound.arguments.get(name, p.default)
        if value is inspect.Parameter.empty:
            raise TypeError(f"no example value for argument {name}")
        named[name] = value
        if isinstance(value, _FIXED_TYPES):
            concrete[name] = value
        elif not _traceable(value):
            raise TypeError(f"argument {name} is a {type(value).__name__}: a trace cannot record it")
    return concrete, named


def _traceable(value: Any) -> bool:
    """A tensor or number, or a tuple of them: an input of the traced graph (its example value guides decisions)."""
    if isinstance(value, (torch.Tensor, int, float)):
        return True
    return isinstance(value, (tuple, list)) and bool(value) and all(_traceable(v) for v in value)


def trace_with_values(module: nn.Module, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, TraceRecord]:
    """Trace ``module`` on its example call (in its current mode); returns the graph and its record."""
    concrete, named = concrete_arguments(module, args, kwargs)
    inputs = {k: _cloned(v) for k, v in named.items()}  # an in-place op of the forward must not touch the example
    tracer = ValueTracer(inputs)
    graph = _trace(tracer, module, concrete)
    _mark_fixed(graph, module, concrete)
    varkw = [v for k, v in named.items() if isinstance(v, dict) and _is_varkw(module, k)]
    record = {"concrete": concrete, "decisions": tracer.decisions, "extra": sorted(varkw[0]) if varkw else []}
    return fx.GraphModule(tracer.root, graph, type(module).__name__), record


def forward_signature(module: nn.Module) -> inspect.Signature:
    """The signature of ``module``'s class forward under its decorators (``self`` first)."""
    return inspect.signature(inspect.unwrap(type(module).forward))


def _is_varkw(module: nn.Module, name: str) -> bool:
    p = forward_signature(module).parameters.get(name)
    return p is not None and p.kind is p.VAR_KEYWORD


def _mark_fixed(graph: fx.Graph, module: nn.Module, concrete: dict[str, Any]) -> None:
    """``node.meta[FIXED]`` on each placeholder fx renamed for a fixed argument (``key_value_states_1``)."""
    params = forward_signature(module).parameters
    for n in graph.nodes:
        if n.op == "placeholder" and str(n.target) not in params and str(n.target).rpartition("_")[0] in concrete:
            n.meta[FIXED] = True


def replay(module: nn.Module, record: TraceRecord) -> fx.GraphModule:
    """Trace ``module`` again from ``record`` (no inputs needed): the graph ``trace_with_values`` built."""
    tracer = ValueTracer(decisions=[list(d) for d in record["decisions"]])
    graph = _trace(tracer, module, dict(record["concrete"]))
    _mark_fixed(graph, module, record["concrete"])
    if tracer._replay:
        raise fx.proxy.TraceError(f"{len(tracer._replay)} recorded decisions were not reached (the module's code changed?)")
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def call_as_traced(sig: inspect.Signature, record: TraceRecord, fallback: dict[str, Any] | None, traced: Any,
                   module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Call ``traced`` (a ``GraphModule.forward`` traced with ``record["concrete"]`` fixed; fx renames those
    arguments) as the module's own forward (``sig``, undecorated) is called. A call unlike the traced one — other
    values for the fixed arguments (a KV cache in generation, where the example passed none), ``None`` or an object
    where a tensor was traced, other extra keywords (a decorator's renamed argument) — runs the module's own code at
    its original width (``run_padded`` with ``fallback``): the same outputs, not faster; without a fallback it
    raises, naming the fix."""
    concrete, extra = record["concrete"], record.get("extra")
    try:
        bound = sig.bind(module, *args, **kwargs)
    except TypeError:
        bound, unlike = None, "arguments its forward's own signature does not take"
    positional, rest = [], {}
    for k, (name, p) in enumerate(sig.parameters.items() if bound is not None else ()):
        if k == 0:  # self
            continue
        value = bound.arguments.get(name, p.default)
        unlike = None
        if p.kind is p.VAR_KEYWORD:
            rest = dict(value) if value is not p.default else {}
            if extra is not None and sorted(rest) != sorted(extra):
                unlike = f"keywords {sorted(rest)}"
        elif name in concrete:
            if not _same(value, concrete[name]):
                unlike = f"{name}={_shown(value)}"
        elif not _traceable(value):
            unlike = f"{name}={_shown(value)}"
        if unlike:
            break
        if p.kind is not p.VAR_KEYWORD:
            positional.append(value)
    else:
        if bound is not None:
            return traced(module, *positional, **rest)
    if fallback is not None:
        return run_padded(module, fallback, args, kwargs)
    raise RuntimeError(f"{type(module).__name__}'s forward was rewritten at compaction for the example call "
                       f"({', '.join(f'{k}={v!r}' for k, v in concrete.items())}) and cannot run with {unlike}. Fix: "
                       "call it as the example inputs of prepare did, or compact with example inputs that pass it.")


def _same(value: Any, fixed: Any) -> bool:
    return isinstance(value, _SCALARS) and type(value) is type(fixed) and value == fixed


def _shown(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:60]


def failed_guard(exc: BaseException) -> int | None:
    """The index of the recorded decision whose guard raised ``exc``, if one did."""
    found = re.search(rf"{GUARD} (\d+):", str(exc))
    return int(found.group(1)) if found else None


def _trace(tracer: ValueTracer, module: nn.Module, concrete: dict[str, Any]) -> fx.Graph:
    """``tracer.trace`` of ``module``'s forward under its decorators (a ``deprecate_kwarg`` wrapper's ``*args,
    **kwargs`` signature hides the arguments ``concrete_args`` names), the module's class restored after."""
    cls = type(module)
    plain = inspect.unwrap(cls.forward)
    if plain is not cls.forward:
        module.__class__ = type(cls.__name__, (cls,), {"forward": plain, "__module__": cls.__module__})
    infos = {name: getattr(torch, name) for name in ("finfo", "iinfo")}
    for name, info in infos.items():  # ``torch.finfo(x.dtype).min`` of a traced dtype: a node, read at run time
        setattr(torch, name, functools.partial(_info_of, info))
    try:
        return tracer.trace(module, concrete_args=concrete)
    finally:
        module.__class__ = cls
        for name, info in infos.items():
            setattr(torch, name, info)


def _info_of(info: type, *args: Any, **kwargs: Any) -> Any:
    proxies = [a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)]
    return proxies[0].tracer.create_proxy("call_function", info, args, kwargs) if proxies else info(*args, **kwargs)


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cloned(v) for v in value)
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    return value
