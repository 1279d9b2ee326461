"""The package's rooms stay apart: the library core (rules, layers, conversion, diagnostics) imports nothing from
the application around it (CLI, trainer, pipeline, experiments, report, bench), and no two modules import each
other at load time (no import cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

CORE = ("falign.functional", "falign.rules", "falign.nn", "falign.convert", "falign.diagnostics", "falign.errors",
        "falign.steps", "falign.seeding")
"""The library core: the modules a user of ``falign.convert`` and the diagnostics loads (mypy-checked in CI)."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "falign").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, top_level_only: bool, modules: dict[str, Path]) -> set[str]:
    """The falign modules ``path`` imports (all of them, or only those imported when the module loads).
    ``from P import M`` of a submodule ``M`` is an import of ``P.M`` (not of the names in ``P/__init__.py``)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports for the type checker only are not imports
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("falign")}


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {m: {i for i in _imports(p, top_level_only, modules) if i in modules and i != m}
            for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]], skip: set[str]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt in skip:
                continue
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and start not in skip:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_core_imports_nothing_from_the_application():
    graph = _graph(top_level_only=False)
    assert set(graph) >= {"falign.convert", "falign.app.train.trainer", "falign.app.cli"}  # the walk found the package
    bad = sorted((m, i) for m, imports in graph.items() if _in(m, CORE)
                 for i in imports if i != "falign" and not _in(i, CORE))
    assert bad == []


@pytest.mark.parametrize("top_level_only", [True, False], ids=["at load time", "counting imports inside functions"])
def test_no_import_cycle(top_level_only):
    assert _cycle(_graph(top_level_only), skip=set()) is None


@pytest.mark.parametrize("edges", [{"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"a": {"a2"}, "a2": {"a"}}])
def test_the_cycle_finder_finds_a_constructed_cycle(edges):
    assert _cycle(edges, skip=set()) is not None
    assert _cycle({"a": {"b"}, "b": set()}, skip=set()) is None
