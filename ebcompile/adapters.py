"""Adapter layers (PEFT LoRA and its kin): which tensors are adapters, and which base layer each one serves.

A PEFT tuner layer wraps the user's linear as ``base_layer`` and adds low-rank factors beside it
(``lora_A.<name>``: ``[r, in]``, ``lora_B.<name>``: ``[out, r]``). The structure analysis follows the
adapters like any linear: the rows of ``lora_B`` join the heads / neurons of the base layer's output and the
columns of ``lora_A`` those of its input, so a pruned unit is zero on both paths and compaction slices both.
Invariant kept here: an adapter's rank is never a unit of its own (it is a factorization, not a neuron), and
an adapter is never masked element-wise (it follows its base layer's units, or is left whole).

Recognised by duck type, so no import of ``peft`` is needed: a module with a ``base_layer`` child whose other
parameters sit in ``ModuleDict``/``ParameterDict`` containers keyed by adapter name.
"""

from __future__ import annotations

from torch import fx, nn

from .plan import GroupSet

__all__ = ["adapter_tensors", "unsupported_adapters", "is_tuner_layer", "AdapterLeafTracer", "trace_module", "is_adapter_rank",
           "sync_adapter_features", "pretrained_core", "merged_shapes"]


def is_tuner_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer: its ``base_layer`` beside the adapters."""
    return isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(module, "active_adapters")


def _tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if is_tuner_layer(m)}


class AdapterLeafTracer(fx.Tracer):
    """fx's tracer with each PEFT tuner layer kept as one call: a forward rewritten through it keeps working once the
    adapters are merged (``merge_and_unload`` puts the plain base layer at the tuner layer's path)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_tuner_layer(m) or super().is_leaf_module(m, qualname)


def trace_module(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` of ``module`` with tuner layers as leaves (``AdapterLeafTracer``)."""
    tracer = AdapterLeafTracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def adapter_tensors(model: nn.Module) -> dict[str, str]:
    """Adapter parameter name -> the path of the base layer it serves (empty for a model without adapters)."""
    found: dict[str, str] = {}
    for path, layer in _tuner_layers(model).items():
        prefix = f"{path}." if path else ""
        for name, _ in layer.named_parameters():
            if not name.startswith("base_layer."):
                found[prefix + name] = prefix + "base_layer"
    return found


# adapters whose update is no product of two factors the structure analysis can slice: DoRA rescales each row by a
# norm of the whole merged weight, LoHa and LoKr build the update as a Hadamard / Kronecker product
_UNSUPPORTED = {"lora_magnitude_vector": "DoRA (use_dora=True)", "hada_": "LoHa", "lokr_": "LoKr"}


def unsupported_adapters(model: nn.Module) -> dict[str, str]:
    """Adapter kind -> one of its parameters, for the PEFT adapters prepare cannot follow."""
    found: dict[str, str] = {}
    for name, base in adapter_tensors(model).items():
        own = name[len(base) - len("base_layer"):]  # the part inside the tuner layer: lora_magnitude_vector.default...
        kind = next((k for p, k in _UNSUPPORTED.items() if own.startswith(p)), None)
        if kind is not None:
            found.setdefault(kind, name)
    return found


def is_adapter_rank(group: GroupSet, adapters: dict[str, str]) -> bool:
    """True for a neuron group made only of adapter tensors: the rank of a low-rank factor (lora_A -> lora_B)."""
    masked = [m.tensor for m in group.members if m.masked]
    return bool(masked) and all(t in adapters for t in masked)


def sync_adapter_features(model: nn.Module) -> None:
    """After compaction, a tuner layer's ``in_features``/``out_features`` follow its sliced base linear."""
    for layer in _tuner_layers(model).values():
        base = layer.base_layer
        if isinstance(base, nn.Linear):
            if hasattr(layer, "in_features"):
                layer.in_features = base.in_features
            if hasattr(layer, "out_features"):
                layer.out_features = base.out_features


def pretrained_core(model: nn.Module) -> nn.Module:
    """The model a PEFT wrapper wraps (``get_base_model()``), or ``model`` itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and isinstance(getattr(model, "peft_config", None), dict) else model


def merged_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of ``model`` once its adapters are merged: adapter tensors gone, ``base_layer.`` dropped."""
    adapters = adapter_tensors(model)
    return {k.replace(".base_layer.", "."): tuple(v.shape) for k, v in model.state_dict().items() if k not in adapters}
