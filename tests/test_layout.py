"""Package layout: no import circle between ebcompile modules, and no file over 400 lines.

The import graph is read with `ast` from every module of the package and counts every import between ebcompile
modules, at module level AND inside functions (a lazy `from ..x import y` only hides a circle, it still makes x a
dependency). Imports under `if TYPE_CHECKING:` never run and are left out. A circle is a strongly connected
component with more than one module; the failure lists every one. Imports of other packages (onnx, transformers,
peft ...) are not edges: only ebcompile -> ebcompile counts.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ebcompile"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file in the package (packages by their __init__)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = ("ebcompile",) + path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement anywhere in the tree, except those only run for type checkers."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the ebcompile modules it imports (module-level and function-level)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                # `from pkg import sub` imports the submodule sub when there is one, else a name of pkg
                targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in mods else base_name
                           for a in node.names]
            for target in targets:
                while target and target not in mods:   # `import ebcompile.x.y as z` / a name: nearest module
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def _describe(comp: list[str], graph: dict[str, set[str]]) -> str:
    members = set(comp)
    edges = [f"    {a} -> {b}" for a in comp for b in sorted(graph[a] & members)]
    return " <-> ".join(comp) + "\n" + "\n".join(edges)


def test_cycle_finder_finds_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert cycles(graph) == [["a", "b", "c"], ["e", "f"]]


def test_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "ebcompile.transforms.shrink" in graph["ebcompile"]  # module level: from .transforms.shrink import compact
    assert "ebcompile.persist.pretrained" in graph["ebcompile.transforms.shrink"]  # inside compact(): from ..pretrained import ...
    assert "ebcompile.export.onnx" in graph["ebcompile.export"]  # a package's __init__
    assert all(t.startswith("ebcompile") for targets in graph.values() for t in targets)


def test_no_import_circles() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, f"{len(found)} import circle(s) between ebcompile modules (function-level imports count):\n" + \
        "\n".join(_describe(c, graph) for c in found)


def test_no_file_over_400_lines() -> None:
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split along a real seam): {long}"
