"""The secureim server: ``python server.py`` (``--help`` for the options).

The server lives in the ``secureim.server`` package (docs/ARCHITECTURE.md); this file is its
entry point, kept at the top of the repository so the README's command works from a clone.
"""

from __future__ import annotations

from secureim.server.main import run

if __name__ == "__main__":
    run()
