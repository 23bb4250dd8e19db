"""Image classification for ``ebcompile search`` / ``retrain`` / ``export``: the model recipe and pixels fitted to it.

A model is named ``torchvision:NAME`` (a builder such as ``vit_b_16``, or a class of ``torchvision.models`` such
as ``VisionTransformer``, which takes a small config), ``timm:NAME`` (the optional timm package, imported only
then) or ``MODULE:FACTORY`` (a callable returning an ``nn.Module``, imported from the current directory or the
Python path). ``--model-kwargs`` (a JSON object) goes to it, ``num_classes`` comes from the data (a factory
that takes no ``num_classes`` must build that many outputs itself). Weights start random: the search trains
from scratch. The recipe (``imageclf.json``, in every model folder an image run saves) rebuilds the model for
``retrain``, ``compact``, ``export`` and ``ebcompile.load(folder, model=recipe.build())``. No code is imported
because a file names it: a recipe naming ``MODULE:FACTORY`` is built only by a factory the caller names
(``--factory MODULE:FACTORY``, ``recipe.build(factory=...)``), and its kwargs may not name checkpoints or
weights to load.

Pixels, in this order: the model's channels (the ``in_channels`` of its first ``Conv2d``, else the data's):
grayscale is repeated to 3 channels, RGB becomes 1 channel as luma 0.299 R + 0.587 G + 0.114 B; the model's
image size (``--image-size``, else an ``image_size`` / ``img_size`` attribute of the model or a submodule, else
the data's own): bilinear, antialiased; then values in [-1, 1] (x / 127.5 - 1).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..persist.fsguard import read_json

RECIPE = "imageclf.json"
FORMAT, VERSION = "ebcompile-imageclf", 1
SPEC = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)$")
LUMA = (0.299, 0.587, 0.114)
LOADS = re.compile(r"checkpoint|pretrained|weights|(^|_)(path|file|url|dir)$", re.IGNORECASE)  # recipe kwargs that load things


def is_image_model(spec: str) -> bool:
    """``torchvision:NAME``, ``timm:NAME`` or ``MODULE:FACTORY`` (a Hugging Face name or folder has no such colon)."""
    return bool(SPEC.match(spec))


def is_saved(folder: str | os.PathLike) -> bool:
    return (Path(folder) / RECIPE).is_file()


@dataclass
class Recipe:
    """How to rebuild the model and feed it: builder, its arguments, classes, input channels and size."""

    model: str
    kwargs: dict[str, Any]
    num_classes: int
    channels: int
    image_size: list[int]
    classes: list[str] = field(default_factory=list)

    def build(self, factory: str | None = None) -> nn.Module:
        """The model, random weights; a ``MODULE:FACTORY`` recipe needs ``factory`` (the caller's, trusted)."""
        return build_model(trusted_spec(self.model, factory), self.kwargs, self.num_classes)

    def fit(self, images: torch.Tensor) -> torch.Tensor:
        return fit_pixels(images, self.channels, tuple(self.image_size))

    def save(self, folder: Path) -> None:
        (folder / RECIPE).write_text(json.dumps({"format": FORMAT, "version": VERSION, **asdict(self)}, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Recipe:
        path = Path(folder) / RECIPE
        raw = read_json(path)  # bounded size and nesting
        try:
            if raw.pop("format") != FORMAT or raw.pop("version") != VERSION:
                raise ValueError("not this format or version")
            recipe = cls(**raw)
            ok = (isinstance(recipe.model, str) and isinstance(recipe.kwargs, dict) and _count(recipe.num_classes)
                  and _count(recipe.channels) and isinstance(recipe.image_size, list) and len(recipe.image_size) == 2
                  and all(_count(s) for s in recipe.image_size) and isinstance(recipe.classes, list))
            if not ok:
                raise ValueError("a field is missing or out of range")
            loads = [k for k, v in recipe.kwargs.items() if v not in (None, False) and LOADS.search(k)]
            if loads:
                raise ValueError(f"kwargs {loads} would load files or weights the recipe names")
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{path} is not a readable image model recipe ({type(exc).__name__}: {str(exc)[:120]}). "
                                  "Fix: pass a model folder written by `ebcompile search` / `retrain` on images.") from exc
        return recipe


def trusted_spec(named: str, factory: str | None) -> str:
    """The model spec to build a recipe naming ``named``: ``factory`` if the caller gives one, ``named`` if it
    is a torchvision or timm name; a ``MODULE:FACTORY`` only a file names is refused (never imported)."""
    if factory is not None:
        if not is_image_model(factory):
            raise ConfigError(f"--factory {factory} is not MODULE:FACTORY. Fix: e.g. --factory mymodels:make_vit.")
        return factory
    m = SPEC.match(named)
    if m is not None and m["module"] not in ("torchvision", "timm"):
        raise CheckpointError(f"{RECIPE} names the factory {named!r}; ebcompile never imports code because a file names "
                              f"it. Fix: if you trust that module, pass --factory {named} (Python: "
                              "Recipe.build(factory=...)).")
    return named


def _count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-kwargs is not valid JSON ({exc.msg} at character {exc.pos}). Fix: pass a JSON object, "
                          "e.g. '{\"image_size\": 28, \"patch_size\": 7}'.") from None
    if not isinstance(kwargs, dict):
        raise ConfigError("--model-kwargs must be a JSON object. Fix: e.g. '{\"image_size\": 28, \"patch_size\": 7}'.")
    if "num_classes" in kwargs:
        raise ConfigError("--model-kwargs sets num_classes, which comes from the data. Fix: leave it out.")
    return kwargs


def build_model(spec: str, kwargs: dict[str, Any], num_classes: int) -> nn.Module:
    """The model ``spec`` names, built with ``kwargs`` and ``num_classes`` outputs (random weights)."""
    m = SPEC.match(spec)
    if m is None:
        raise ConfigError(f"{spec} is not an image model name. Fix: pass torchvision:NAME, timm:NAME or MODULE:FACTORY.")
    module, attr = m["module"], m["attr"]
    if module == "torchvision":
        factory = _torchvision(attr)
    elif module == "timm":
        factory = _timm(attr)
    else:
        factory = _import(spec, module, attr)
    kw = dict(kwargs)
    if _takes(factory, "num_classes"):
        kw["num_classes"] = num_classes
    try:
        model = factory(**kw)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's builder is bad input
        raise ConfigError(f"{spec}(**{kw}) failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}). "
                          "Fix: pass --model-kwargs the builder accepts.") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} returned a {type(model).__name__}, not an nn.Module. Fix: pass a factory that builds "
                          "the model.")
    return model


def _takes(factory: Any, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _torchvision(name: str) -> Any:
    import torchvision.models as tvm

    builders = tvm.list_models(module=tvm)
    if name in builders:
        return tvm.get_model_builder(name)
    cls = getattr(tvm, name, None)
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        return cls
    import difflib

    near = difflib.get_close_matches(name, builders + [n for n in dir(tvm) if n[:1].isupper()], n=3)
    raise ConfigError(f"torchvision has no classification model {name!r}{f' (close: {near})' if near else ''}. Fix: pass a "
                      "name of torchvision.models.list_models(), or a class such as VisionTransformer.")


def _timm(name: str) -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"timm:{name} needs the timm package, which is not installed. Fix: pip install timm, or pass a "
                          "torchvision:NAME model.") from None
    if not timm.is_model(name):
        raise ConfigError(f"timm has no model {name!r}. Fix: pass a name of timm.list_models().")
    return lambda **kw: timm.create_model(name, pretrained=False, **kw)


def _import(spec: str, module: str, attr: str) -> Any:
    """``module.attr`` imported with the current directory first on the path (as ``python -m`` does)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{spec}: cannot import {module} ({exc}). Fix: run from the folder holding {module.split('.')[0]}"
                          ".py, or put it on PYTHONPATH.") from None
    except Exception as exc:  # noqa: BLE001 - the module's own code failed
        raise ConfigError(f"{spec}: importing {module} raised {type(exc).__name__}: {str(exc)[:160]}. Fix: make the "
                          "module importable.") from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    obj: Any = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise ConfigError(f"{spec}: {module} has no callable {attr}. Fix: name a function or class that builds the model.")
    return obj


# -- pixels ------------------------------------------------------------------------------------------------------

def model_geometry(model: nn.Module, image_size: str | None, data_channels: int, data_size: tuple[int, int]
                   ) -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) the model reads; see the module docstring for the order of the sources."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = int(conv.in_channels) if conv is not None else data_channels
    if channels != data_channels and 1 not in (channels, data_channels):
        raise ConfigError(f"the model reads {channels}-channel images, the data has {data_channels} channels. Fix: build "
                          "the model for 1 or 3 channels (e.g. --model-kwargs '{\"in_chans\": 3}').")
    if image_size is not None:
        return channels, parse_size(image_size)
    for m in model.modules():
        for attr in ("image_size", "img_size"):
            value = getattr(m, attr, None)
            if _count(value):
                return channels, (int(value), int(value))
            if isinstance(value, (tuple, list)) and len(value) == 2 and all(_count(v) for v in value):
                return channels, (int(value[0]), int(value[1]))
    return channels, data_size


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
        return (int(parts[0]), int(parts[-1]))
    raise ConfigError(f"--image-size {text} is not a size. Fix: pass N (square) or HxW, e.g. --image-size 28.")


def fit_pixels(images: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` → float ``[N, channels, *size]`` in [-1, 1]."""
    x = images.float()
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1 and x.shape[1] == 3:
            x = (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ConfigError(f"cannot turn {x.shape[1]}-channel images into {channels} channels. Fix: pass grayscale or "
                              "RGB images, for a model that reads 1 or 3 channels.")
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return x / 127.5 - 1.0


def logits_of(output: Any) -> torch.Tensor:
    """A classifier's logits: the tensor itself, a ``.logits`` field, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(f"the model returned a {type(output).__name__}, not logits. Fix: pass a classifier that returns a "
                      "tensor of class scores.")


def check_classifier(model: nn.Module, spec: str, example: torch.Tensor, num_classes: int) -> None:
    """The model runs on ``example`` and gives ``[N, num_classes]`` scores."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = logits_of(model(example))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the input does not fit the model
        raise ConfigError(f"{spec} does not run on images of shape {tuple(example.shape[1:])} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''}). Fix: pass --image-size (or --model-kwargs) "
                          "matching the model.") from exc
    finally:
        model.train(was)
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ConfigError(f"{spec} gives scores of shape {tuple(out.shape)}, the data has {num_classes} classes. Fix: build "
                          "the model with num_classes outputs (a factory taking num_classes gets it from the data).")


def example_inputs(model: nn.Module, recipe: Recipe, batch: int = 1) -> dict[str, torch.Tensor]:
    """A made-up batch for a rebuilt image model, keyed by its forward's first parameter."""
    if batch < 1:
        raise ConfigError(f"--batch {batch} must be >= 1. Fix: e.g. --batch 1.")
    first = next(iter(inspect.signature(model.forward).parameters.values()), None)
    if first is None or first.kind not in (first.POSITIONAL_OR_KEYWORD, first.KEYWORD_ONLY):
        raise ConfigError(f"{type(model).__name__}.forward takes no named image input. Fix: use the Python API with "
                          "positional example inputs.")
    g = torch.Generator().manual_seed(0)
    return {first.name: torch.rand(batch, recipe.channels, *recipe.image_size, generator=g) * 2 - 1}


# -- saved model folders -----------------------------------------------------------------------------------------

def save_model(model: nn.Module, recipe: Recipe, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """``ebcompile.save(model)``, the recipe and ``extra`` files (name -> writer(path)), swapped in as one folder."""
    from ..persist import checkpoint
    from ..persist.checkpoint import META
    from ..persist.savedir import atomic_dir

    with atomic_dir(folder, marker=META) as tmp:
        checkpoint.save(model, tmp)
        recipe.save(tmp)
        for name, write in (extra or {}).items():
            write(tmp / name)


def load_saved(folder: str | os.PathLike, factory: str | None = None) -> tuple[nn.Module, Recipe]:
    """The model saved in ``folder`` with its recipe, rebuilt (eval mode); ``factory``: see ``Recipe.build``."""
    from ..persist import checkpoint

    recipe = Recipe.load(folder)
    return checkpoint.load(folder, model=recipe.build(factory)), recipe
