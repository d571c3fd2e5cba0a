"""The shape of the package, held by tests: no import cycles (also inside functions), small modules
and classes, and a docstring on every package saying what lives there.

The layer contracts themselves (which layer may import which, the sans-IO cores, the terminal's
facade) are import-linter's, in pyproject.toml, run by `lint-imports` in .ci/run; this file checks
what import-linter does not.  docs/ARCHITECTURE.md explains each rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
PACKAGE = "secureim"
MAX_MODULE_LINES = 800
MAX_CLASS_LINES = 400
# Named exceptions to the size limits, each with its reason (docs/ARCHITECTURE.md, "Sizes").
SIZE_EXCEPTIONS: dict[str, str] = {}


def _internal_graph() -> dict[str, set[str]]:
    graph = grimp.build_graph(PACKAGE)  # every import statement, in functions too
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [g for g in groups if len(g) > 1 or g[0] in graph.get(g[0], ())]


def test_the_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_also_inside_functions():
    cycles = strongly_connected(_internal_graph())
    assert cycles == [], f"modules that import each other: {cycles}"


def _python_files() -> list[Path]:
    return sorted((ROOT / PACKAGE).rglob("*.py")) + sorted(ROOT.glob("*.py"))


def _oversized() -> list[str]:
    found = []
    for path in _python_files():
        name = str(path.relative_to(ROOT))
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    found.append(f"{name}:{node.name}: {size} lines")
    return found


def test_no_module_over_800_lines_and_no_class_over_400():
    over = [entry for entry in _oversized() if entry.split(":")[0] not in SIZE_EXCEPTIONS]
    assert over == [], f"over the size limits (split them, or name the exception and why): {over}"


def test_every_size_exception_is_still_needed():
    needed = {entry.split(":")[0] for entry in _oversized()}
    assert set(SIZE_EXCEPTIONS) <= needed, "a named exception that no longer applies: remove it"


@pytest.mark.parametrize(
    "package",
    sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / PACKAGE).rglob("__init__.py")),
)
def test_every_package_says_what_lives_there(package):
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 8, f"{package}/__init__.py needs a docstring naming its job"


def test_no_module_imports_another_modules_private_names():
    """ruff's SLF001 catches ``module._name``; this catches ``from module import _name``."""
    found = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                private = [
                    a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                ]
                if private:
                    found.append(f"{path.relative_to(ROOT)}: from {node.module} import {', '.join(private)}")
    assert found == []
