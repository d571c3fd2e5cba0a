"""The server console: operator commands typed on the server's stdin (/users, /who, /kick, /ban, /help).

It runs only when stdin is a terminal, or with ``--console`` (tests pipe commands
in); a closed or empty stdin just ends the console, never the server.  Commands
go through the same ``admin.AdminOps`` as ``python server.py admin``, so they
are audited and reach every server sharing the database.  One reader thread,
bounded lines, and any error becomes one line of output: the console cannot
block or crash the server.
"""

from __future__ import annotations

import logging
import shlex
import threading
from collections.abc import Callable
from typing import TextIO

from secureim.errors import SecureIMError
from secureim.server.admin import AdminOps

log = logging.getLogger("secureim.console")

MAX_LINE_CHARS = 1024
HELP = """[SERVER]: Console commands:
  /users                     every account (created, last login, online, locked, banned)
  /who                       who is connected (user, address, since, node)
  /kick USER [REASON]        end USER's session
  /ban USER [DURATION] [REASON]   ban USER (DURATION like 30m, 1h, 7d; default no end)
  /help                      this help
For more (unban, ban-address, reset-password, delete-user, audit): python server.py admin --help"""


class ServerConsole:
    def __init__(self, ops: AdminOps, stream: TextIO, say: Callable[[str], None]) -> None:
        self.ops = ops
        self.stream = stream
        self.say = say
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                line = self.stream.readline(MAX_LINE_CHARS + 1)
            except (OSError, ValueError):  # stdin closed under us
                return
            if not line:
                return  # end of input: the console stops, the server goes on
            try:
                self.execute(line.strip())
            except Exception:
                log.exception("console command failed")
                self.say("[SERVER]: That command failed; see the log.")

    def execute(self, line: str) -> None:
        if not line:
            return
        try:
            words = shlex.split(line[:MAX_LINE_CHARS])
        except ValueError:
            self.say("[SERVER]: Unbalanced quotes; type /help.")
            return
        cmd, args = words[0], words[1:]
        try:
            if cmd == "/help":
                self.say(HELP)
            elif cmd == "/users":
                self._lines(self.ops.users())
            elif cmd == "/who":
                self._lines(self.ops.sessions())
            elif cmd == "/kick" and args:
                self.say(f"[SERVER]: {self.ops.kick(args[0], ' '.join(args[1:]))}")
            elif cmd == "/ban" and args:
                duration = args[1] if len(args) > 1 and args[1][:1].isdigit() else None
                reason = " ".join(args[2:] if duration else args[1:])
                self.say(f"[SERVER]: {self.ops.ban(args[0], duration, reason)}")
            elif cmd in ("/kick", "/ban"):
                self.say(f"[SERVER]: Usage: {cmd} USER ...; type /help.")
            else:
                self.say(f"[SERVER]: Unknown command {cmd[:32]!r}; type /help.")
        except SecureIMError as exc:  # unknown user, bad duration, database down
            self.say(f"[SERVER]: {exc}")

    def _lines(self, lines: list[str]) -> None:
        for line in lines:
            self.say(f"[SERVER]: {line}")
