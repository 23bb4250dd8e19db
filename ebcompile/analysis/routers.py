"""Where a mixture-of-experts block keeps its router, and what the router and the block hold per expert.

Shared by the three experts analyses (fused 3-D tensors, a list of expert modules, flat ``[E * I, H]`` tensors): the
router is a ``[E, H]`` weight at most two levels under the block and outside the experts container (``mlp.gate``, or a
linear inside a router module: AFMoE's ``mlp.router.gate``, Hunyuan's ``mlp.gate.wg``); top-k is read from the router,
the modules between it and the block, the block, then their configs (``families.hf_moe.TOP_K``).
"""

from __future__ import annotations

from torch import fx, nn

from ..families import hf_moe

__all__ = ["modules_near", "router_chain", "top_k_of", "outer_expert_count", "per_expert"]


def modules_near(model: nn.Module, block: str, container: str, depth: int = 2) -> list[tuple[str, nn.Module]]:
    """(path, module) of the modules at most ``depth`` levels under ``block``, neither inside ``container`` nor
    above it, shallowest first: where an MoE block keeps its router (``mlp.gate``, or a linear inside a router
    module: ``mlp.router.gate``, ``mlp.gate.wg``)."""
    owner = model.get_submodule(block) if block else model
    found = []
    for name, module in owner.named_modules():
        full = f"{block}.{name}" if block and name else (name or block)
        if (not name or name.count(".") >= depth or full == container or full.startswith(container + ".")
                or container.startswith(full + ".")):
            continue
        found.append((full, module))
    return sorted(found, key=lambda item: item[0].count("."))


def router_chain(block: str, router: str) -> list[str]:
    """The paths of the router module and of every module between it and ``block`` (excluded), innermost first."""
    parts, start = router.split("."), len(block.split(".")) if block else 0
    return [".".join(parts[:i]) for i in range(len(parts), start, -1)]


def top_k_of(model: nn.Module, block: str, router: str) -> int:
    """The experts each token is routed to: read from the router, the modules between it and its block, the block,
    then their configs."""
    owner = model.get_submodule(block) if block else model
    holders = [*(model.get_submodule(p) for p in router_chain(block, router)), owner]
    for holder in [*holders, *(getattr(h, "config", None) for h in holders)]:
        for attr in hf_moe.TOP_K:
            value = getattr(holder, attr, None) if holder is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return 1


def outer_expert_count(model: nn.Module, block: str, experts: int) -> str | None:
    """The first module between the model and the MoE ``block`` (both excluded) that holds the expert count: a
    forward there is sized by it (``router_logits.reshape(-1, self.num_experts)`` over several blocks)."""
    parts = block.split(".") if block else []
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        holder = model.get_submodule(path)
        if any(getattr(holder, attr, None) == experts for attr in hf_moe.EXPERT_COUNTS):
            return path
    return None


def per_expert(module: nn.Module, experts: int, recurse: bool = False) -> list[tuple[str, int]]:
    """(name, dim) of a router's or MoE block's tensors with one entry per expert along one dim, every other dim of
    size 1, besides the router's weight and bias (DeepSeek-V3's and MiniMax-M2's ``e_score_correction_bias`` [E];
    ERNIE 4.5's, [1, E] in the router's ``moe_statics`` child, with ``recurse``): they follow the experts at
    compaction."""
    tensors = [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]
    found = []
    for name, t in tensors:
        big = [d for d, s in enumerate(t.shape) if s != 1]
        if name not in ("weight", "bias") and len(big) == 1 and t.shape[big[0]] == experts:
            found.append((name, big[0]))
    return found


def graph_top_k(graph: fx.Graph, param_of: dict[str, str], router_weight: str, experts: int, limit: int = 64) -> int | None:
    """The ``k`` of the first ``topk`` over ``experts`` values that the router weight reaches in the captured graph
    (breadth first, at most ``limit`` nodes): what the example really routes with, whatever the attribute holding it
    is called. A ``topk`` over another size (a group-limited router's in-group choice) is passed over."""
    start = [n for n in graph.nodes if n.op in ("placeholder", "get_attr") and param_of.get(n.name) == router_weight]
    seen, queue = set(start), list(start)
    while queue and len(seen) <= limit:
        node = queue.pop(0)
        name = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and name.split(".")[0] == "topk":
            k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
            val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            over = val.shape[dim] if val is not None and isinstance(dim, int) else None
            if isinstance(k, int) and not isinstance(k, bool) and over == experts:
                return min(k, experts)
            continue  # another choice: not this router's
        for user in node.users:
            if user not in seen:
                seen.add(user)
                queue.append(user)
    return None
