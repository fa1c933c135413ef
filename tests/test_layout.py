"""The package's shape: one layer per folder, imports only downward, every command in `commands/`, and modules and
functions a reader can take in. Read from the source with `ast`, so an import inside a function counts too.

    core < config < {data, model, cli.py} < training < evaluation < train.py < {export, search} < commands

An import inside `if __name__ == "__main__":` is a module run as a command (`python -m smptrain.train`), not a
library dependency, and is not counted.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "smptrain"
LEVELS = {"core": 0, "config": 1, "data": 2, "model": 2, "cli": 2, "training": 3, "evaluation": 4, "train": 5,
          "export": 6, "search": 6, "commands": 7}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def level(module: str) -> int | None:
    """The layer of a module (its folder, or the top-level module itself); None for the package's `__init__`."""
    parts = module.split(".")
    return LEVELS[parts[1]] if len(parts) > 1 else None


def is_main_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def library_nodes(tree: ast.AST):
    """Every node of a module except those inside its `if __name__ == "__main__":` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not is_main_block(child))


def imports() -> dict[str, set[str]]:
    """Every smptrain module and the smptrain modules it imports anywhere in its code."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in library_nodes(ast.parse(path.read_text(), str(path))):
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


def test_every_module_lies_in_a_layer():
    graph = imports()
    assert len(graph) > 40  # the walk found the package
    top = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert top - {"__init__"} == set(LEVELS), "a new top-level module or folder needs its layer in LEVELS"
    assert len(list(PACKAGE.iterdir())) - (PACKAGE / "__pycache__").exists() <= 13


def test_no_module_imports_a_higher_layer():
    upward = [f"{module} (layer {level(module)}) imports {target} (layer {level(target)})"
              for module, targets in imports().items() for target in targets
              if level(module) is not None and level(target) > level(module)]
    assert upward == []


def test_no_module_imports_itself_back_through_others():
    assert circles(imports()) == []


def test_nothing_imports_a_command():
    graph = imports()
    assert [m for m, targets in graph.items() if not m.startswith("smptrain.commands")
            and any(t.startswith("smptrain.commands") for t in targets)] == []


def test_every_console_script_is_a_command_module_and_every_command_module_a_script():
    import importlib
    import pkgutil

    import smptrain.commands

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    targets = {target.split(":")[0] for target in scripts.values()}
    modules = {f"smptrain.commands.{m.name}" for m in pkgutil.iter_modules(smptrain.commands.__path__)}
    assert targets == modules
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_modules_and_functions_stay_readable():
    """No module over 400 lines; no function over 60, counted from its `def` (a click command's option list is its
    decorators)."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert long == []


def test_the_checks_find_what_they_look_for():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert level("smptrain.core.errors") == 0 and level("smptrain.train") == 5 and level("smptrain") is None
    tree = ast.parse("import os\nif __name__ == '__main__':\n    import smptrain.commands.train\n")
    assert not any(isinstance(n, ast.Import) and n.names[0].name.startswith("smptrain") for n in library_nodes(tree))
