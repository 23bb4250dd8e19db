"""The data the analyses produce: prunable linear ops and coupled groups (heads, FFN neurons)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SCOPES = ("global", "layer")  # a ticket ranks units over the whole model or within each layer


@dataclass(frozen=True)
class LinearOp:
    """One linear op of the graph, tied to its parameters.

    ``out_dim`` is the weight dimension that indexes output features: 0 for ``nn.Linear`` ([out, in]),
    1 for Hugging Face ``Conv1D`` ([in, out]).
    """

    name: str
    weight: str
    bias: str | None = None
    out_dim: int = 0
    # "linear" | "attention" (a projection inside an attention op) | "output" (the output layer, e.g. a classifier);
    # never "head", which names attention heads (``GroupSet.kind``)
    kind: str = "linear"


# LinearOp kinds renamed since a plan was saved: the output layer was "head" before it became "output"
_RENAMED_KINDS = {"head": "output"}


def _linear_op(data: dict) -> LinearOp:
    kind = data.get("kind", "linear")
    return LinearOp(**dict(data, kind=_RENAMED_KINDS.get(kind, kind)))


@dataclass(frozen=True)
class Member:
    """A slice of one tensor that belongs to a group set: unit ``u`` owns indices
    ``offset + u*unit_size ... offset + (u+1)*unit_size - 1`` along ``dim``.

    ``masked`` members are zeroed by structured masks; the others (a relative-position bias table, a
    per-head logit scale) only follow the units when the model is compacted.
    """

    tensor: str
    dim: int
    offset: int
    unit_size: int
    masked: bool = True
    # an expert's slice of a fused [experts, ...] tensor: run b of the group's units (``GroupSet.per_group`` units
    # each) owns the slice above at index b of dim 0 (neurons inside the experts of a mixture-of-experts layer)
    batched: bool = False


@dataclass(frozen=True)
class HeadInput:
    """A per-head tensor the attention module receives from outside (BLOOM's ALiBi): ``heads[p]`` is the head of
    position ``p`` along ``dim`` (from the end), repeating (a batch folded in front); compaction slices argument
    ``arg`` ("arg:<i>" or "kwarg:<name>") of the module's forward to the kept heads (``transforms.head_inputs``)."""

    node: str
    shape: tuple[int, ...]
    dim: int
    heads: tuple[int, ...]
    arg: str = ""


@dataclass(frozen=True)
class GroupSet:
    """``units`` coupled structures of one kind in one layer: the heads of one attention op, or the
    neurons of one FFN (fc1 row + bias + fc2 column)."""

    kind: str  # "head" | "neuron" | "expert" (whole experts of a mixture-of-experts layer)
    name: str
    units: int
    members: tuple[Member, ...]
    module: str | None = None  # module whose head-count attributes compaction rewrites
    attributes: tuple[str, ...] = ()  # e.g. ("num_heads",)
    per_group: int = 0  # grouped-query heads kept per KV head: units come in runs of this many, each run keeps as many
    min_units: int = 1  # the fewest units a draw keeps (a mixture-of-experts layer keeps at least top_k experts)
    # RMS norms whose statistics span these units (OLMo-2's q_norm): (producer weight, its bias or None, the norm's
    # weight, the full width); compaction rescales them (``analysis.norm_folds``, ``transforms.norm_scale``)
    folds: tuple[tuple[str, str | None, str, int], ...] = ()
    head_inputs: tuple[HeadInput, ...] = ()  # per-head tensors from outside the module (analysis.head_inputs)


@dataclass
class Plan:
    """What ``prepare`` decided: the masked linears and the coupled groups of the model."""

    linears: list[LinearOp] = field(default_factory=list)
    groups: list[GroupSet] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # linear -> why it is not masked (structured: or kept whole)
    capture: str = ""

    def to_dict(self) -> dict:
        return {
            "linears": [asdict(x) for x in self.linears],
            "groups": [dict(asdict(g), members=[asdict(m) for m in g.members], head_inputs=[asdict(h) for h in g.head_inputs])
                       for g in self.groups],
            "skipped": dict(self.skipped),
            "capture": self.capture,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        groups = [
            GroupSet(**dict(g, members=tuple(Member(**m) for m in g["members"]), attributes=tuple(g.get("attributes", ())),
                            folds=tuple(tuple(f) for f in g.get("folds", ())),
                            head_inputs=tuple(HeadInput(**dict(h, shape=tuple(h["shape"]), heads=tuple(h["heads"])))
                                              for h in g.get("head_inputs", ()))))
            for g in data["groups"]
        ]
        return cls([_linear_op(x) for x in data["linears"]], groups, dict(data.get("skipped", {})), data.get("capture", ""))
