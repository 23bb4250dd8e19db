"""Loading one family of the transformers test suite: its ModelTester's tiny config and common inputs, and the
model class the zoo runs (the tester's base model class, else the first of ``all_model_classes`` that runs).

Invariant: nothing of the suite is changed on disk; the suite's folder (the one holding ``tests/``) goes first on
``sys.path`` so that the tester modules import as ``tests.models.<family>.test_modeling_<family>`` with their
relative imports of ``test_modeling_common`` and friends. Only third-party modules the suite imports but this
environment lacks (``parameterized``, ...) are stubbed, and each stub is named in the row.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
import types
import unittest
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_URL = "https://github.com/huggingface/transformers"
_NEVER_STUB = ("tests", "transformers", "torch", "ebcompile")  # tests.* only when the suite has no such file


class SuiteError(Exception):
    """The suite folder is missing or does not hold ``tests/models/<family>/test_modeling_<family>.py``."""


@dataclass
class Loaded:
    model_class: type
    config: Any
    inputs: dict[str, Any]
    candidates: list[type] = field(default_factory=list)
    stubs: list[str] = field(default_factory=list)


def suite_root(path: str | Path) -> Path:
    """The folder that holds ``tests/`` (``path`` may name that folder or ``tests/`` itself)."""
    p = Path(path).expanduser().resolve()
    if p.name == "tests" and (p / "models").is_dir():
        p = p.parent
    if not (p / "tests" / "models").is_dir():
        raise SuiteError(f"{path} holds no tests/models/. Fix: pass --suite the folder holding transformers' tests/ "
                         f"(or run with --fetch to clone it from {REPO_URL} when online)")
    return p


def families(root: Path) -> list[str]:
    return sorted(d.name for d in (root / "tests" / "models").iterdir()
                  if (d / f"test_modeling_{d.name}.py").is_file())


def fetch_suite(dest: Path, ref: str | None = None) -> Path:
    """Sparse, shallow clone of transformers' ``tests/`` into ``dest`` (online only); returns the suite root."""
    if (dest / "tests" / "models").is_dir():
        return dest
    cmd = ["git", "clone", "--depth", "1", "--filter=blob:none", "--sparse"] + (["--branch", ref] if ref else [])
    subprocess.run(cmd + [REPO_URL, str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "sparse-checkout", "set", "--no-cone", "/tests/", "/src/transformers/testing_utils.py"], check=True)
    return dest


def _parameterized_stub() -> types.ModuleType:
    mod = types.ModuleType("parameterized")

    class parameterized:  # noqa: N801 - the name the suite imports
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __call__(self, fn: Any) -> Any:
            return fn

        @staticmethod
        def expand(*args: Any, **kwargs: Any) -> Any:
            return lambda fn: fn

    mod.parameterized = parameterized
    mod.parameterized_class = lambda *a, **k: (lambda c: c)
    mod.param = lambda *a, **k: (a, k)
    return mod


def _stub(name: str) -> types.ModuleType:
    if name == "parameterized":
        return _parameterized_stub()
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so that submodule imports find stubs too
    mod.__getattr__ = _attribute  # type: ignore[method-assign]
    return mod


def _attribute(attr: str) -> type:
    if attr.startswith("__"):  # __file__, __spec__, ...: a module without them, not a stub of them
        raise AttributeError(attr)
    return _anything(attr)


def _anything(attr: str) -> type:
    """A stub attribute: a class (mixins subclass it) that, called on one function or string, returns it (decorators,
    ``url_to_local_path(url)``), and otherwise gives an instance that is a pass-through decorator itself."""

    def new(cls: type, *args: Any, **kwargs: Any) -> Any:
        if cls is stub and len(args) == 1 and not kwargs and (callable(args[0]) or isinstance(args[0], str)):
            return args[0]
        return object.__new__(cls)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return args[0] if len(args) == 1 and callable(args[0]) else self

    stub = type(attr, (), {"__new__": new, "__init__": lambda self, *a, **k: None, "__call__": call})
    return stub


def import_tester_module(root: Path, family: str, stubs: list[str]) -> types.ModuleType:
    if not (root / "tests" / "models" / family / f"test_modeling_{family}.py").is_file():
        raise SuiteError(f"no tests/models/{family}/test_modeling_{family}.py under {root}. Fix: check the family "
                         "name (the folder name under tests/models/)")
    return import_suite_module(root, f"tests.models.{family}.test_modeling_{family}", stubs)


def warm_up(root: Path) -> list[str]:
    """Import the suite's shared helpers once (a parent that forks one child per family pays this once)."""
    stubs: list[str] = []
    for name in ("tests.test_modeling_common", "tests.causal_lm_tester"):
        if root.joinpath(*name.split(".")).with_suffix(".py").is_file():
            try:
                import_suite_module(root, name, stubs)
            except Exception:  # noqa: BLE001 - a family that needs it reports the failure itself
                pass
    _WARM.extend(s for s in stubs if s not in _WARM)
    return stubs


_WARM: list[str] = []  # stubs the warm-up installed (a forked child inherits them)


def import_suite_module(root: Path, name: str, stubs: list[str]) -> types.ModuleType:
    """``name`` from the suite, stubbing what this environment lacks (each stub appended to ``stubs``)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    _installed_for_source_tree(root, stubs)
    for _ in range(12):
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            if not isinstance(exc, ModuleNotFoundError):
                _fill_missing(root, exc, stubs)
                _forget(name)
                continue
            missing = exc.name or ""
            top = missing.split(".")[0]
            on_disk = (root.joinpath(*missing.split(".")).with_suffix(".py").exists() or root.joinpath(*missing.split(".")).is_dir())
            if not missing or missing in sys.modules or (top in _NEVER_STUB and (top != "tests" or on_disk)):
                raise
            sys.modules[missing] = _stub(missing)
            stubs.append(missing)
            _forget(name)
    return importlib.import_module(name)


def _installed_for_source_tree(root: Path, stubs: list[str]) -> None:
    """test_pipeline_mixin imports ``<suite>/src/transformers`` by path; a suite without transformers' sources
    gets the installed package instead."""
    if (root / "src" / "transformers" / "__init__.py").is_file():
        return
    import transformers
    import transformers.utils
    import transformers.utils.import_utils as iu

    if getattr(iu.direct_transformers_import, "_zoo", False):
        return

    def direct_transformers_import(path: str, file: str = "__init__.py") -> types.ModuleType:
        return transformers

    direct_transformers_import._zoo = True  # type: ignore[attr-defined]
    iu.direct_transformers_import = transformers.utils.direct_transformers_import = direct_transformers_import
    stubs.append("direct_transformers_import -> installed transformers")


def _forget(name: str) -> None:
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def _fill_missing(root: Path, exc: ImportError, stubs: list[str]) -> None:
    """A name the suite imports from ``transformers.testing_utils`` that the installed one lacks: its top-level
    definition from the suite's own ``src/transformers/testing_utils.py`` when the suite has it, else a no-op
    ``require_*`` decorator / ``is_*`` -> False. Anything else is re-raised."""
    found = re.match(r"cannot import name '(\w+)' from '([\w.]+)'", str(exc))
    if not found or found.group(2) != "transformers.testing_utils":
        raise exc
    attr, module = found.group(1), sys.modules[found.group(2)]
    era = root / "src" / "transformers" / "testing_utils.py"
    if era.is_file():
        text = era.read_text()
        for node in ast.parse(text).body:
            targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if getattr(node, "name", None) == attr or attr in targets:
                exec(compile(ast.Module([node], []), str(era), "exec"), module.__dict__)  # noqa: S102 - the suite's own code
                stubs.append(f"testing_utils.{attr} (from the suite)")
                return
    if attr.startswith("require_"):
        setattr(module, attr, lambda fn: fn)
    elif attr.startswith("is_"):
        setattr(module, attr, lambda *a, **k: False)
    else:
        raise exc
    stubs.append(f"testing_utils.{attr} (stub)")


def _test_class(module: types.ModuleType) -> type:
    found = []
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ != module.__name__ or not issubclass(cls, unittest.TestCase):
            continue
        if any(b.__name__ == "ModelTesterMixin" for b in cls.__mro__):
            found.append(cls)
    if not found:
        raise SuiteError(f"{module.__name__} has no TestCase using ModelTesterMixin")  # _zoo_stages.NO_TESTER
    found.sort(key=lambda c: (inspect.getsourcelines(c)[1] if _has_source(c) else 1 << 30))
    return found[0]


def _has_source(cls: type) -> bool:
    try:
        inspect.getsourcelines(cls)
        return True
    except (OSError, TypeError):
        return False


def _candidates(test: Any, tester: Any, config: Any) -> list[type]:
    import transformers

    listed = [c for c in (getattr(test, "all_model_classes", None) or ()) if isinstance(c, type)]
    first: list[type] = []
    base = getattr(tester, "base_model_class", None)
    if isinstance(base, type):
        first.append(base)
    try:
        mapped = transformers.MODEL_MAPPING[type(config)]
        if isinstance(mapped, type):
            first.append(mapped)
    except Exception:  # noqa: BLE001 - not every config has a base model in the auto mapping
        pass
    out: list[type] = []
    for c in first + listed:
        if c not in out:
            out.append(c)
    return out


def load_family(root: Path, family: str) -> Loaded:
    """Import the family's tester, build its tiny config and common inputs, and list the model classes to try."""
    stubs: list[str] = list(_WARM)
    module = import_tester_module(root, family, stubs)
    cls = _test_class(module)
    test = cls("setUp")
    test.setUp()
    tester = getattr(test, "model_tester", None)
    if tester is None:
        raise SuiteError(f"{cls.__name__}.setUp made no model_tester")
    config, inputs = tester.prepare_config_and_inputs_for_common()
    cands = _candidates(test, tester, config)
    if not cands:
        raise SuiteError(f"{cls.__name__} lists no model classes")
    return Loaded(cands[0], config, dict(inputs), cands, stubs)
