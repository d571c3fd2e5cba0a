"""The secureim terminal client: ``python client.py`` (``--help`` for the options).

The terminal lives in the ``secureim.tui`` package and the client library in
``secureim.client`` (docs/ARCHITECTURE.md); this file is the entry point, kept at the top of
the repository so the README's command works from a clone.
"""

from __future__ import annotations

from secureim.tui.main import run

if __name__ == "__main__":
    run()
