"""Check: the compact model computes what the masked model computes, on the example inputs of ``prepare``.

Run by ``compact`` after every structured compaction. On a mismatch the modules of the head and neuron groups
are compared one by one (forward hooks, in execution order) and the first that differs is named in a
``CompactionError``: a compaction is never silently wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import CompactionError

__all__ = ["check_same_function", "relative_error", "TOLERANCE", "tolerance_for", "compute_dtype", "example_for", "evaluating", "inputs_in"]

TOLERANCE = 1e-3  # max |compact - masked| / max(|masked|, 1e-2); float32 rounding is ~1e-6, a wrong head ~1
EPS_FACTOR = 8  # low precision: a smaller matmul's other summation order is a few eps (bf16 one-ulp weights: ~1 eps)


def tolerance_for(dtype: torch.dtype) -> float:
    """The self-check tolerance for a model computing in ``dtype``: ``TOLERANCE``, or ``EPS_FACTOR`` times its
    machine epsilon where that is larger (bfloat16: 6.3e-2, float16: 7.8e-3)."""
    return max(TOLERANCE, EPS_FACTOR * torch.finfo(dtype).eps) if dtype.is_floating_point else TOLERANCE


def compute_dtype(model: nn.Module, out: Any = None) -> torch.dtype:
    """The least precise floating dtype among ``model``'s parameters and the tensors of ``out``."""
    dtypes = [t.dtype for t in [*model.parameters(), *_tensors(out)] if t.is_floating_point()]
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for x in out for t in _tensors(x)]
    return []


def relative_error(a: Any, b: Any) -> float:
    xs, ys = _tensors(a), _tensors(b)
    if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
        return float("inf")
    worst = 0.0
    for x, y in zip(xs, ys):
        if x.is_floating_point():
            scale = max(float(x.detach().abs().max()) if x.numel() else 0.0, 1e-2)
            worst = max(worst, float((x.detach() - y.detach()).abs().max()) / scale if x.numel() else 0.0)
        elif not torch.equal(x, y):
            return float("inf")
    return worst


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside, each module's own train/eval mode back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def running_as(module: nn.Module, training: bool) -> Iterator[None]:
    """``module`` in train (``training``) or eval mode inside, leaving no trace: afterwards each module's own mode,
    every buffer's values (a batch norm in train mode updates its running statistics) and the random number
    generators' states (dropout draws from them: the CPU's and those of the GPUs the module is on) are what they were."""
    modes = [(m, m.training) for m in module.modules()]
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    module.train(training)
    try:
        cuda = sorted({t.device.index or 0 for t in module.parameters() if t.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):  # the CPU generator and those of the GPUs the module is on
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _entering(entered: list[str], path: str):
    def hook(module: nn.Module, args: tuple) -> None:
        entered.append(path)
    return hook


def _leaving(entered: list[str], seen: list[tuple[str, Any]], path: str):
    def hook(module: nn.Module, args: tuple, out: Any) -> None:
        seen.append((path, out))
        entered.remove(path)
    return hook


def _run(model: nn.Module, args: tuple, kwargs: dict, watch: list[str],
         entered: list[str] | None = None) -> tuple[Any, list[tuple[str, Any]]]:
    """The output and each watched module's output; ``entered`` keeps the watched modules still running (on an
    exception: the one that raised, innermost last)."""
    seen: list[tuple[str, Any]] = []
    entered = [] if entered is None else entered
    handles = []
    for path in watch:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        handles.append(module.register_forward_pre_hook(_entering(entered, path)))
        handles.append(module.register_forward_hook(_leaving(entered, seen, path)))
    try:  # the same random numbers for both models: a forward that samples (VITS's noise) compares equal
        cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        with evaluating(model), torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            return model(*args, **kwargs), seen
    finally:
        for h in handles:
            h.remove()


def _on(device: torch.device, x: Any, dtype: torch.dtype | None = None) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.to(device)
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _on(device, v, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_on(device, v, dtype) for v in x)
    return x


def example_for(model: nn.Module, example: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """``example`` on ``model``'s device, its floating tensors in ``model``'s dtype where the model has a single
    one (a model cast after ``prepare``, e.g. ``model.float()`` to compact in float32, still runs its example)."""
    params = list(model.parameters())
    floats = {p.dtype for p in params if p.is_floating_point()}
    dtype = floats.pop() if len(floats) == 1 else None
    device = params[0].device if params else torch.device("cpu")
    return _on(device, example[0], dtype), _on(device, example[1], dtype)


def _same_shapes(a: Any, b: Any) -> bool:
    """Outputs comparable position by position (a cut FFN's hidden activations are narrower by design)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_shapes(x, y) for x, y in zip(a, b))
    return True


def _raising_module(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """The modules of ``model`` still running when its forward on the example raises, innermost last (no outputs
    kept); empty when it runs or raises in the model's own forward."""
    running: list[str] = []
    handles = []
    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(lambda m, a, p=path: running.append(p)))
            handles.append(module.register_forward_hook(lambda m, a, o, p=path: running.remove(p)))
    try:
        with evaluating(model), torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the failure is the point: where it happened is in ``running``
        return running
    finally:
        for h in handles:
            h.remove()
    return []


def check_same_function(masked: nn.Module, compact: nn.Module, example: tuple[tuple, dict] | None,
                        modules: list[str]) -> float:
    """Max relative error of ``compact`` against ``masked`` on ``example``; ``CompactionError`` above
    ``tolerance_for`` the model's dtype, naming the first of ``modules`` whose output differs (and, in low
    precision, the dtype as the likely cause with the float32 fix)."""
    if example is None:
        return 0.0
    args, kwargs = example_for(masked, example)
    ref, ref_seen = _run(masked, args, kwargs, modules)
    entered: list[str] = []
    try:
        out, out_seen = _run(compact, args, kwargs, modules, entered)
    except Exception as exc:  # noqa: BLE001 - the compact model fails to run: a rewrite is missing
        if not entered:  # it raised outside every watched module: find the innermost module that was running
            entered = _raising_module(compact, args, kwargs)
        where = f"{entered[-1]} ({type(compact.get_submodule(entered[-1])).__name__})" if entered else "a module"
        error = CompactionError(
            f"the compact model fails on the example inputs in {where}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}. Its forward reads a head count or width that neither the attribute "
            f"rewrites nor the traced reshape rewrite reach. Fix: exclude it from pruning "
            f"(exclude=['{entered[-1] if entered else '<module>'}.*']), or register a family for it (docs/extending.md)."
        )
        error.module, error.cause = (entered[-1] if entered else None), f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        raise error from exc
    err = relative_error(ref, out)
    dtype = compute_dtype(masked, ref)
    tol = tolerance_for(dtype)
    if err <= tol:
        return err
    got = dict(out_seen)
    culprit = next((p for p, o in ref_seen if p in got and _same_shapes(o, got[p]) and relative_error(o, got[p]) > tol), None)
    where = f"{culprit} ({type(compact.get_submodule(culprit)).__name__})" if culprit else "the model"
    head = f"the compact model differs from the masked one (relative error {err:.2e}, tolerance {tol:.1e}) starting at {where}"
    if torch.finfo(dtype).eps > torch.finfo(torch.float32).eps:
        name = str(dtype).removeprefix("torch.")
        raise CompactionError(
            f"{head}. The model computes in {name}: its rounding in the smaller matmuls is the likely cause, not a "
            f"wrong rewrite. Fix: compact in float32 and cast back: small = ebcompile.compact(model.float()).to(torch.{name}) "
            f"(if that fails too, exclude the module: exclude=['{culprit or '<module>'}.*'])."
        )
    raise CompactionError(
        f"{head}: its forward reads a head count or width that the attribute rewrites do not cover. Fix: exclude it "
        f"from pruning (exclude=['{culprit or '<module>'}.*']), or register a family for it (docs/extending.md)."
    )


class _Reached(BaseException):  # (not an Exception: a model's broad ``except Exception`` must not swallow it)
    """Raised by a pre-hook to stop a forward once a module's inputs are recorded."""


def inputs_in(model: nn.Module, path: str, example: tuple[tuple, dict]) -> tuple[tuple, dict] | None:
    """The inputs ``path`` gets in ``model`` on ``example``, before its own pre-hooks (``None`` when the model fails
    before reaching it)."""
    got: list[tuple[tuple, dict]] = []

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append((args, kwargs))
        raise _Reached

    args, kwargs = example_for(model, example)
    handle = model.get_submodule(path).register_forward_pre_hook(stop, with_kwargs=True, prepend=True)  # as called
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except _Reached:
        pass
    except Exception:  # noqa: BLE001 - an earlier module still fails: its masked inputs are used instead
        return None
    finally:
        handle.remove()
    return got[0] if got else None
