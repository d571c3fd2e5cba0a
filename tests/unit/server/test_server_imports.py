"""The server package's import graph: acyclic (function bodies included), no imports inside
functions, no module importing another's private names, the domain modules below the shell."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "secureim" / "server"
DOMAIN = {"moderation", "presence", "kdc", "direct", "store_forward", "rooms", "logins", "accounts"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, known: set[str]) -> list[tuple[str, list[str], bool]]:
    """(module, names, inside a function) for each import not under ``if TYPE_CHECKING:``."""
    found: list[tuple[str, list[str], bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, [], inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                names = [alias.name for alias in child.names]
                submodules = [f"{child.module}.{n}" for n in names if f"{child.module}.{n}" in known]
                found.extend((m, [], inner) for m in submodules)
                found.append((child.module, [n for n in names if f"{child.module}.{n}" not in known], inner))
            visit(child, inner)

    visit(tree, False)
    return found


def _graph() -> tuple[dict[str, set[str]], list[str], list[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {_module_name(f) for f in files}
    graph: dict[str, set[str]] = {m: set() for m in known}
    in_functions, private = [], []
    for path in files:
        me = _module_name(path)
        for module, names, inner in _imports(ast.parse(path.read_text()), known):
            if not module.startswith("secureim.server"):
                continue
            if module in known and module != me:
                graph[me].add(module)
            if inner:
                in_functions.append(f"{me} imports {module} inside a function")
            private += [f"{me} imports {module}.{n}" for n in names if n.startswith("_")]
    return graph, in_functions, private


def test_no_cycles_no_function_imports_no_private_names():
    graph, in_functions, private = _graph()
    assert in_functions == []
    assert private == []
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, module, nxt])
            if nxt not in state:
                visit(nxt, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_domain_modules_stay_below_the_service_and_the_shell():
    graph, _f, _p = _graph()
    for name in DOMAIN:
        deps = graph[f"secureim.server.{name}"]
        assert not deps & {"secureim.server.service", "secureim.server.net", "secureim.server.main"}, name
