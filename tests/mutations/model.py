"""One named defence mutation: a small patch that switches a defence off, and the tests that must fail.

Catalogues are the modules ``catalog_<area>.py`` beside this file; each defines
``MUTATIONS: list[Mutation]``. The runner (``python -m tests.mutations.run`` or
``python tests/mutations/run.py``) applies each mutation to a temporary copy of the
repository, runs only the named tests there, and reports every mutation whose tests
stay green (a *survivor*). One catalogue per area keeps parallel work from colliding.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    """A defence switched off.

    name:    a stable, unique identifier (``e2e-root-without-dh``), cited in docs/SECURITY.md.
    file:    the path, relative to the repository root, of the file to patch.
    find:    text that must occur exactly once in that file (the runner refuses otherwise,
             so a refactor that moves the defence breaks the catalogue loudly, not silently).
    replace: what ``find`` becomes: the defence, switched off.
    tests:   pytest node ids (``tests/integration/test_e2e.py::test_x``) that must fail with the mutation.
    why:     one line: which defence this is and what an attacker gains without it.
    """

    name: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    why: str
