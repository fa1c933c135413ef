"""The package's shape: imports point one way (no circle, at module level or inside functions), and the foundation
modules import no subpackage. Read from the source with `ast`, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "smptrain"
FOUNDATION = {"smptrain.choices", "smptrain.config", "smptrain.darts_config", "smptrain.errors", "smptrain.storage",
              "smptrain.runtime", "smptrain.processes", "smptrain.failpoints",
              "smptrain.recipes"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every smptrain module and the smptrain modules it imports anywhere in its code."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("smptrain.")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "smptrain":
                for alias in node.names:  # `from smptrain.evaluation import plots` imports a module
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if candidate in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name and m != "smptrain"}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_back_through_others():
    graph = imports()
    assert len(graph) > 30  # the walk found the package
    assert circles(graph) == []


def test_the_foundation_imports_no_subpackage():
    graph = imports()
    for module in sorted(FOUNDATION):
        assert graph[module] <= FOUNDATION, f"{module} imports {sorted(graph[module] - FOUNDATION)}"


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
