"""Transform: rewrite the feature sizes baked into a module's forward once its heads are cut.

Some attention code takes its reshape sizes from the residual width (nanoGPT: ``split(self.n_embd)``,
``q.view(B, T, n_head, C // n_head)`` with ``C = x.size(-1)``, ``y.view(B, T, C)``), so no attribute rewrite
makes its compact form run. ``adapt_forwards`` traces such a module with ``torch.fx.symbolic_trace`` (from the
masked model, whose sizes are the original ones), lets ``analysis.feature_dims`` follow which original feature
indices every tensor dimension carries on the module's example inputs, and replaces the size arguments of the
shape ops on feature dimensions by the compact sizes. Batch and sequence sizes stay dynamic; ``-1``
stays ``-1``; a size that folds heads into the batch (``bsz * self.num_heads``) is scaled at run time.
``self.training`` branches are traced once per mode. A forward ``symbolic_trace`` cannot take (shape guards that
raise, ``torch.finfo`` of a traced dtype, a decorator's ``*args, **kwargs``) is traced on its example call by
``trace_values`` (its decisions recorded, replayed at load, and asserted at run time). The compact module is
checked on the inputs it gets in the compact model (a cut before it, e.g. of an encoder's projection, is seen).

Invariant: a rewritten forward is installed only when the module's compact output equals its masked output on
the example inputs (outputs with a head dimension, such as attention probabilities: on the kept heads);
otherwise the module is left as it was. A module whose compact form still raises is reported to ``compact``,
which holds its units whole (``hold_whole``: recorded in ``plan.skipped``, the pruned ones stay as zeros), so
the model compacts exactly; any other mismatch is named by ``check_same_function``. The rewrite is data (node
name -> new sizes; JSON): ``checkpoint`` records it in ``ebcompile.json`` and ``load`` installs it again on the
freshly built model, without storing or running code from the checkpoint.
"""

from __future__ import annotations

import functools
import operator
import types
import warnings
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..adapters import trace_module
from ..analysis.feature_dims import FollowFeatures, Irregular, kept_part, output_dims, shape_changes, size_args
from ..analysis.op_names import SIZED_VIEWS, SPLITS, op_name
from ..names import split_name
from ..plan import Plan
from .counts import WIDTH_ATTRS
from .padded_calls import PADDED_WARNED, padding_of, run_padded
from .trace_values import FIXED, call_as_traced, failed_guard, forward_signature, replay, trace_with_values
from .verify import _tensors, compute_dtype, evaluating, example_for, inputs_in, relative_error, running_as, tolerance_for
from .width_attrs import rewrite_widths, same_but_heads, undo_widths

__all__ = ["adapt_forwards", "hold_whole", "install_rewrite", "rewrites_of", "rewrite_widths", "ATTR", "WIDTH_ATTRS"]

ATTR = "_ebcompile_reshapes"  # on a rewritten module: {"eval"|"train": {node name: change}}
KINDS = {"sizes": SIZED_VIEWS, "split": SPLITS, "slices": {"getitem"}}  # change -> the ops it may apply to


def _apply(graph: fx.Graph, changes: dict[str, dict[str, Any]]) -> None:
    nodes = {n.name: n for n in graph.nodes}
    for name, change in changes.items():
        n = nodes.get(name)
        if n is None or len(change) != 1 or op_name(n) not in KINDS.get(next(iter(change)), ()):
            raise KeyError(f"the traced forward has no node {name!r} that {sorted(change)} applies to")
        if "sizes" in change:
            sizes, packed = size_args(n)
            if len(sizes) == 1 and isinstance(sizes[0], fx.Node) and len(change["sizes"]) != 1:
                sizes, packed = _unpacked(graph, n, sizes[0], len(change["sizes"])), True
            new = [s if v is None else _scaled(graph, n, s, v) if isinstance(v, list) else int(v)
                   for s, v in zip(sizes, change["sizes"])]
            n.args = (n.args[0], tuple(new)) if packed else (n.args[0], *new)
        elif "split" in change:
            dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
            sizes = [int(v) for v in change["split"]]
            if n.op == "call_method":
                n.target = "split"
            else:
                n.target = torch.split
            n.args, n.kwargs = (n.args[0], sizes, dim), {}
        elif "slices" in change:
            index = list(n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],))
            for k, bounds in change["slices"].items():  # [start, stop] or, for a strided slice, [start, stop, step]
                index[int(k)] = slice(*(int(b) for b in bounds)) if len(bounds) == 3 else slice(int(bounds[0]), int(bounds[1]), None)
            n.args = (n.args[0], tuple(index) if isinstance(n.args[1], tuple) else index[0])
    graph.lint()


def _scaled(graph: fx.Graph, n: fx.Node, size: Any, scale: list[int]) -> fx.Node:
    """``size * kept // total`` as graph nodes before ``n``: a size computed at run time (batch x heads) whose
    feature part shrinks from ``total`` to ``kept``."""
    with graph.inserting_before(n):
        return graph.call_function(operator.floordiv, (graph.call_function(operator.mul, (size, int(scale[0]))), int(scale[1])))


def _unpacked(graph: fx.Graph, n: fx.Node, shape: fx.Node, ndim: int) -> list[fx.Node]:
    """``shape[0], ..., shape[ndim - 1]`` as graph nodes before ``n`` (a shape op given one computed shape)."""
    with graph.inserting_before(n):
        return [graph.call_function(operator.getitem, (shape, k)) for k in range(ndim)]


def _trace(module: nn.Module, training: bool) -> fx.GraphModule:
    with running_as(module, training):
        return trace_module(module)


def _inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    values, pos, used = [], list(args), set()
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        name = str(n.target).lstrip("*")
        used |= {name, name.rpartition("_")[0] if n.meta.get(FIXED) else name}
        if str(n.target).startswith("**"):  # ``**kwargs``: what no named argument took (``FollowFeatures.placeholder``)
            values.append({k: v for k, v in kwargs.items() if k not in used})
            continue
        if str(n.target).startswith("*"):  # ``*args``: the interpreter gives it every remaining positional value
            values.extend(pos)
            pos = []
        elif pos:
            values.append(pos.pop(0))
        elif name in kwargs:
            values.append(kwargs[name])
        elif name.rpartition("_")[0] in kwargs and n.meta.get(FIXED):  # fx renames an argument traced as a constant
            values.append(kwargs[name.rpartition("_")[0]])
        elif n.args:
            values.append(n.args[0])
        else:
            raise Irregular(f"no value for argument {name}")
    return values


def _plain_weights(gm: fx.GraphModule) -> None:
    """A masked weight read in the forward itself (``F.linear(x, self.qkv.weight)``) traces as a call of its mask's
    parametrization; the compact module has a plain weight (the mask baked in): read that attribute instead."""
    graph = gm.graph
    for n in list(graph.nodes):
        owner, sep, attr = str(n.target).rpartition(".parametrizations.")
        if n.op == "call_module" and sep and "." not in attr:
            holder = gm.get_submodule(owner)  # the GraphModule's own container: give it the name, for its checks
            if not hasattr(holder, attr):
                holder.register_buffer(attr, torch.empty(0), persistent=False)
            with graph.inserting_before(n):
                plain = graph.get_attr(f"{owner}.{attr}")
            n.replace_all_uses_with(plain)
            graph.erase_node(n)


def install_rewrite(original: nn.Module, target: nn.Module, changes: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Trace ``original`` (of the original sizes) per mode, apply ``changes`` and make the result ``target``'s
    forward (``target`` may be ``original`` itself, shrunk after this call). A ``"trace"`` entry (a forward that
    branches on traced values) is replayed with ``trace_values.replay``; the forward then checks that each call
    passes the non-tensor arguments it was traced with."""
    forwards, record = {}, changes.get("trace")
    for mode in ("eval", "train"):
        if record is None:
            gm = _trace(original, mode == "train")
        else:
            with running_as(original, mode == "train"):
                gm = replay(original, {"concrete": record["concrete"], "decisions": record["decisions"][mode]})
        _plain_weights(gm)
        _apply(gm.graph, changes.get(mode, {}))
        gm.recompile()
        for n in gm.graph.nodes:  # tensor constants the tracer made live on the GraphModule only
            if n.op == "get_attr" and not _has(target, str(n.target)):
                target.__dict__[str(n.target)] = getattr(gm, str(n.target))
        forwards[mode] = type(gm).forward
    call = (lambda f, module, args, kwargs: f(module, *args, **kwargs)) if record is None else \
        functools.partial(call_as_traced, forward_signature(original), record,
                          changes.get("padding"))

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return call(forwards["train" if self.training else "eval"], self, args, kwargs)

    target.forward = types.MethodType(forward, target)  # rebinds to the copy under copy.deepcopy
    target.__dict__[ATTR] = changes


def _has(module: nn.Module, path: str) -> bool:
    try:
        functools.reduce(getattr, path.split("."), module)
        return True
    except AttributeError:
        return False


def rewrites_of(model: nn.Module) -> dict[str, Any]:
    """Module path -> its recorded rewrite, for every module whose forward was rewritten."""
    return {path: m.__dict__[ATTR] for path, m in model.named_modules() if ATTR in m.__dict__}


def _plan(original: nn.Module, rows: dict[str, np.ndarray], args: tuple, kwargs: dict,
          values: bool = False) -> tuple[dict[str, Any], list]:
    """The changes per mode, and the feature dims of each output tensor (eval mode). ``values``: trace with the
    example call's values (``trace_values``; recorded under ``"trace"``) instead of plain ``symbolic_trace``."""
    changes: dict[str, Any] = {}
    dims: list = []
    for mode in ("eval", "train"):
        with running_as(original, mode == "train"):
            if values:
                gm, record = trace_with_values(original, args, kwargs)
                trace = changes.setdefault("trace", {"concrete": record["concrete"], "extra": record["extra"], "decisions": {}})
                trace["decisions"][mode] = record["decisions"]
            else:
                gm = trace_module(original)
        follow = FollowFeatures(gm, rows)
        with running_as(original, mode == "train"), torch.no_grad():  # no running statistics or RNG state changed
            follow.run(*_inputs(gm, args, kwargs))
        changes[mode] = shape_changes(follow)
        dims = output_dims(follow) if mode == "eval" else dims
    return changes, dims


def _call(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        try:
            return module(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a compact module that cannot run is what this pass repairs
            return exc


def adapt_forwards(masked: nn.Module, compact: nn.Module, paths: list[str], example: tuple[tuple, dict] | None,
                   removed: dict[tuple[str, int], set[int]], failed: dict[str, str] | None = None,
                   widths: dict[str, tuple[int, int, int, int]] | None = None) -> list[str]:
    """Rewrite the forward of every module in ``paths`` whose compact output differs from its masked output on
    the example inputs, where size attributes (``rewrite_widths``, with ``widths``: path -> (original, compact)
    heads x head width, original and kept heads) or tracing and following its features can fix it. Returns the rewritten paths;
    ``failed`` gets each module whose compact form still raises on its example inputs, with the error."""
    if example is None or not paths:
        return []
    seen: dict[str, tuple[tuple, dict, Any]] = {}

    def record(path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            seen.setdefault(path, (args, kwargs, out))
        return hook

    handles = [masked.get_submodule(p).register_forward_hook(record(p), with_kwargs=True) for p in paths]
    args, kwargs = example_for(masked, example)
    tol = tolerance_for(compute_dtype(masked))
    try:
        with evaluating(masked), torch.no_grad():
            masked(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    done = []
    compact.eval()
    for path, (args, kwargs, ref) in seen.items():
        target = compact.get_submodule(path)
        out = _call(target, args, kwargs)
        heads = (widths or {}).get(path, (0, 0, 0, 0))[2:]
        if _computes(ref, out, heads, tol):
            continue
        fresh = inputs_in(compact, path, example)  # inputs cut before the module are cut here too
        call = fresh or (args, kwargs)
        if fresh and _computes(ref, out := _call(target, *call), heads, tol):
            continue
        if path in (widths or {}):
            w0, w1, h0, h1 = widths[path]
            changed = rewrite_widths(target, (w0, w1), (h0, h1))
            out = _call(target, *call) if changed else out
            if changed and not isinstance(out, Exception) and same_but_heads(ref, out, (h0, h1)) <= tol:
                continue
            undo_widths(changed)
        rows, cut = {}, {}  # kept output rows per linear inside the module; every cut of its tensors (for padding)
        for (name, dim), idx in removed.items():
            if not (_inside(name, path) and idx):
                continue
            cut.setdefault(_inside(name, path), {})[dim] = sorted(idx)
            owner, attr = split_name(name)
            if dim == 0 and attr == "weight":
                size = masked.get_submodule(owner).weight.shape[0]
                rows[_inside(owner, path)] = ~np.isin(np.arange(size), sorted(idx))
        original = masked.get_submodule(path)
        if _rewrite(original, target, rows, (args, kwargs), call, ref, tol, False):
            done.append(path)
            continue
        try:
            padding = padding_of(original, target, cut)
        except (AttributeError, KeyError, IndexError):  # a cut tensor the module does not hold by that name
            padding = None
        if _rewrite(original, target, rows, (args, kwargs), call, ref, tol, True, padding):
            done.append(path)
            continue
        if failed is not None and isinstance(out := _call(target, *call), Exception):
            failed[path] = f"{type(out).__name__}: {str(out).splitlines()[0][:200] if str(out) else ''}"
    return done


def _inside(name: str, path: str) -> str:
    """``name`` relative to the module at ``path`` ("" for the root), or "" when it is not inside it."""
    if not path:
        return name
    return name[len(path) + 1:] if name.startswith(path + ".") else ""


def _computes(ref: Any, out: Any, heads: tuple[int, int], tol: float) -> bool:
    """Whether ``out`` is ``ref`` (a per-head output, its attention probabilities, may have fewer heads: the model
    check judges those)."""
    return not isinstance(out, Exception) and (relative_error(ref, out) <= tol or same_but_heads(ref, out, heads) <= tol)


def _rewrite(original: nn.Module, target: nn.Module, rows: dict[str, np.ndarray], example: tuple[tuple, dict],
             call: tuple[tuple, dict], ref: Any, tol: float, values: bool, padding: dict | None = None) -> bool:
    """Trace ``original`` on ``example`` (its inputs in the masked model), follow and install a rewritten forward on
    ``target``; kept only if ``target`` on ``call`` (its inputs in the compact model) computes ``ref`` (outputs
    with a head dimension compared on the kept heads)."""
    try:
        changes, dims = _plan(original, rows, *example, values)
        if padding is not None:
            changes["padding"] = padding
        install_rewrite(original, target, changes)
        if values:
            _unguard_stale(original, target, changes, call)
        refs = _tensors(ref)
        if len(dims) == len(refs):  # per-head outputs (attention probabilities): the kept heads only
            ref = [kept_part(t, d) for t, d in zip(refs, dims)]
        out = _call(target, *call)
        if not isinstance(out, Exception) and relative_error(ref, out) <= tol:
            if padding is not None and not _pads_right(target, padding, call, ref, tol):
                changes.pop("padding")  # a call unlike the traced one then raises, naming the fix
                install_rewrite(original, target, changes)
            return True
    except Exception:  # noqa: BLE001 - untraceable or irregular: left for check_same_function to name
        pass
    target.__dict__.pop("forward", None)
    target.__dict__.pop(ATTR, None)
    return False


def _pads_right(target: nn.Module, padding: dict, call: tuple[tuple, dict], ref: Any, tol: float) -> bool:
    """Whether ``run_padded`` computes ``ref`` on the example (every cut tensor it needs is in ``padding``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                out = run_padded(target, padding, *call)
        except Exception:  # noqa: BLE001 - a cut tensor the padding does not restore
            return False
        finally:
            target.__dict__.pop(PADDED_WARNED, None)
    return bool(_tensors(out)) and relative_error(_tensors(ref)[:1], _tensors(out)[:1]) <= tol  # the main output


def _unguard_stale(original: nn.Module, target: nn.Module, changes: dict[str, Any], call: tuple[tuple, dict]) -> None:
    """Drop the guard of each traced decision that fails on the example itself once the sizes are rewritten: its
    condition compares against a size the rewrite changed (``attn_weights.size() != (bsz * self.num_heads, ...)``),
    so it no longer tells a different branch from the one traced. Every other decision stays asserted."""
    for _ in range(sum(len(d) for d in changes["trace"]["decisions"].values())):
        for mode in ("eval", "train"):
            with running_as(target, mode == "train"):
                out = _call(target, *call)
            k = failed_guard(out) if isinstance(out, Exception) else None
            if k is not None:
                changes["trace"]["decisions"][mode][k][2] = False
                install_rewrite(original, target, changes)
                break
        else:
            return


HELD_WHOLE = "kept whole at compact"  # how hold_whole's plan.skipped reasons begin (compact reads it back)


def is_held_whole(plan: Plan, module: str) -> bool:
    """Whether ``hold_whole`` kept ``module``'s units whole (other plan.skipped reasons, e.g. a LoRA adapter, do not)."""
    return plan.skipped.get(module, "").startswith(HELD_WHOLE)


def hold_whole(plan: Plan, failed: dict[str, str]) -> list[str]:
    """Record in ``plan.skipped`` the linears of every group of each module in ``failed`` (path -> error of its
    compact form: the groups it is the module of or holds tensors of): ``compact`` then keeps those units whole (a pruned one stays,
    zero, as in the masked model), so the model compacts exactly. Returns the modules newly held whole (none when
    every one already was: the failure has another cause, which the caller's check then reports)."""
    held = []
    for path, error in failed.items():
        inside = [g for g in plan.groups if g.module == path or any(m.tensor.startswith(path + ".") for m in g.members)]
        if not inside:  # (a group held whole loses nothing anywhere, also in tensors outside the module)
            continue
        why = (f"{HELD_WHOLE}: {path}'s forward fails with its units cut ({error}); it reads a width that "
               "neither the attribute rewrites nor the traced reshape rewrite reach (docs/extending.md)")
        owners = {split_name(m.tensor)[0] for g in inside for m in g.members if m.masked} - set(plan.skipped)
        if not owners:  # already held whole and still failing: holding again would change nothing (no retry loop)
            continue
        plan.skipped.update(dict.fromkeys(sorted(owners), why))
        held.append(path)
    if held:
        warnings.warn(f"compact keeps the units (heads, neurons) of {', '.join(held)} whole (their forward reads a width it cannot "
                      "rewrite; plan.skipped says why). Fix, to cut them: register a family (docs/extending.md).",
                      UserWarning, stacklevel=3)
    return held
