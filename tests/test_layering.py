"""The package's import graph: no circle, and nothing below the facade imports the trainer."""

from __future__ import annotations

import ast
from pathlib import Path

import statetrainer

PACKAGE = Path(statetrainer.__file__).parent
# The facade, and the tools on top of it that drive a Trainer (the command line, the test helpers, the bisect)
FACADE = {"statetrainer", "statetrainer.__main__", "statetrainer.trainer", "statetrainer.testing", "statetrainer.cli",
          "statetrainer.bisecting"}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in it (type-checking imports too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            stem = ".".join([*base, node.module] if node.module else base)
            for alias in node.names:  # ``from . import checkpoint`` imports the module, not the package's __init__
                found.add(f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem)
    return {each for each in found if each in modules and each != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, modules) for path in paths}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        stack, on_path = [(start, iter(sorted(graph[start])))], [start]
        if start in done:
            continue
        while stack:
            node, targets = stack[-1]
            child = next(targets, None)
            if child is None:
                stack.pop()
                on_path.pop()
                done.add(node)
            elif child in on_path:
                return [*on_path[on_path.index(child) :], child]
            elif child not in done:
                stack.append((child, iter(sorted(graph[child]))))
                on_path.append(child)
    return None


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "statetrainer.run" in graph["statetrainer.trainer"]  # the graph is read
    assert find_circle(graph) is None, " -> ".join(find_circle(graph) or [])


def test_only_the_facade_imports_the_trainer():
    graph = import_graph()
    importers = sorted(name for name, targets in graph.items() if "statetrainer.trainer" in targets)
    assert set(importers) <= FACADE, importers
