"""Mutations of the package's shape: a layer rule broken must fail tests/unit/test_architecture.py.

The import-linter contracts (pyproject.toml) are checked by `lint-imports` in .ci/run; these
entries prove the checks that pytest makes (cycles, private names across modules).
"""

from __future__ import annotations

from model import Mutation

ARCH = "tests/unit/test_architecture.py"

MUTATIONS: list[Mutation] = [
    Mutation(
        name="architecture-import-cycle-inside-a-function",
        file="secureim/client/outgoing.py",
        find="from secureim import proto as P\n",
        replace="from secureim import proto as P\n\n\ndef _cycle() -> object:\n"
        "    from secureim.client import offline  # the outbox imports this module: a cycle\n\n"
        "    return offline\n",
        tests=(f"{ARCH}::test_no_import_cycles_also_inside_functions",),
        why="an import inside a function that closes a cycle (outgoing <-> offline): the layers "
        "stop being layers, and the cycle finder must still see it.",
    ),
    Mutation(
        name="architecture-private-name-imported-across-modules",
        file="secureim/client/outgoing.py",
        find="from secureim import proto as P\n",
        replace="from secureim import proto as P\nfrom secureim.client.display import _escape as _escape\n",
        tests=(f"{ARCH}::test_no_module_imports_another_modules_private_names",),
        why="a module that imports another's private name reaches past its interface (ruff's SLF001 "
        "only sees attribute access).",
    ),
]
