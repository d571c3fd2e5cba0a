"""Scripting the client: the one-shot ``send`` and ``receive`` commands and the JSON-lines interface.

``client.py`` parses the command line and calls :func:`run_send`,
:func:`run_receive` or :func:`run_json_session`; this module drives
``clientlib.ChatClient`` and never the terminal UI (no prompt_toolkit).  The
exit codes and the JSON schema are documented in docs/CLIENT.md and are a
stable interface: add fields, never rename or remove them.
"""

from __future__ import annotations

import getpass
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from secureim import client as C
from secureim import proto as P
from secureim.errors import (
    AuthError,
    ConfigError,
    ConnectionClosed,
    MessageRefused,
    SecureIMError,
    ServerKeyMismatch,
)

# Exit codes (docs/CLIENT.md): scripts depend on them.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_KEY_MISMATCH, EXIT_LOGIN_FAILED = 0, 1, 2, 3, 4
PASSWORD_ENV, USER_ENV = "SECUREIM_PASSWORD", "SECUREIM_USER"
SEND_TIMEOUT_S = 40.0  # key exchange (10 s) plus the server's answer (30 s)
JSON_SCHEMA = 1  # the "v" of every JSON line
WAIT_DELIVERED_S = 60.0  # send --wait-delivered: how long the recipient's receipt is waited for


class UsageError(ConfigError):
    """The command line is wrong (exit 2)."""


def exit_code(exc: BaseException) -> int:
    """The documented exit code for an error that ended a command."""
    if isinstance(exc, ServerKeyMismatch):
        return EXIT_KEY_MISMATCH
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, AuthError):
        return EXIT_LOGIN_FAILED
    return EXIT_ERROR


# =============================================================================
# Credentials: never from an argument (ps shows every process's arguments)
# =============================================================================
def username_from(args) -> str:
    name = args.user or os.environ.get(USER_ENV)
    if not name:
        raise UsageError(f"Say who you are: --user NAME or {USER_ENV}.")
    return name


def password_from(args, *, prompt_allowed: bool = True) -> str:
    """``--password-file FILE`` (first line; readable by you only), ``$SECUREIM_PASSWORD``, or a
    prompt on the terminal (never on stdin, which may carry commands)."""
    if args.password_file is not None:
        path = Path(args.password_file)
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise UsageError(f"--password-file {path} can be read by others; chmod 600 {path} first.")
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"--password-file {path}: {exc.strerror or exc}.") from None
        if not lines or not lines[0]:
            raise UsageError(f"--password-file {path} is empty.")
        return lines[0]
    env = os.environ.get(PASSWORD_ENV)
    if env:
        return env
    if prompt_allowed:
        try:
            with open("/dev/tty", "rb"):
                pass
        except OSError:
            pass
        else:
            return getpass.getpass("[CLIENT]: Password: ")  # on /dev/tty, not stdout
    raise UsageError(f"No password: set {PASSWORD_ENV}, use --password-file FILE, or run on a terminal.")


# =============================================================================
# Output: plain lines for people, one JSON object per line for programs
# =============================================================================
def _history_entry(client: C.ChatClient, entry) -> dict:
    me = client.username
    mine = entry.direction == "out"
    return {
        "from": me if mine else entry.peer,
        "to": entry.peer if mine else me,
        "text": entry.text,
        "at": entry.at,
        "state": entry.state,
    }


_EVENTS: dict[type, tuple[str, Callable]] = {
    C.MessageReceived: (
        "message",
        lambda e: {
            "from": e.peer,
            "text": e.text,
            "sent_at": e.sent_at,
            "direct": e.direct,
            "stored": e.stored_at is not None,
        },
    ),
    C.PeerOnline: ("presence", lambda e: {"peer": e.peer, "status": "online"}),
    C.PeerOffline: ("presence", lambda e: {"peer": e.peer, "status": "offline"}),
    C.PeerUnknown: ("presence", lambda e: {"peer": e.peer, "status": "unknown"}),
    C.ConversationReady: (
        "conversation_ready",
        lambda e: {"peer": e.peer, "verified": e.verified, "opened_by_peer": e.opened_by_peer},
    ),
    C.SecurityWarning: ("security_warning", lambda e: {"peer": e.peer, "text": e.text}),
    C.MessageRejected: ("message_rejected", lambda e: {"peer": e.peer, "reason": e.reason}),
    C.MessageUndelivered: ("undelivered", lambda e: {"peer": e.peer, "text": e.text}),
    C.WhoList: ("who", lambda e: {"users": list(e.users), "total": e.total}),
    C.ServerNotice: ("notice", lambda e: {"text": e.text, "code": e.code}),
    C.DirectReady: ("direct", lambda e: {"peer": e.peer, "state": "up", "reason": ""}),
    C.DirectFallback: ("direct", lambda e: {"peer": e.peer, "state": "relayed", "reason": e.reason}),
    C.DirectRequested: ("direct", lambda e: {"peer": e.peer, "state": "requested", "reason": ""}),
    C.AccountDeletion: ("account_deletion", lambda e: {"deleted": e.deleted, "reason": e.reason}),
    C.Reconnecting: ("reconnecting", lambda e: {"attempt": e.attempt, "reason": e.reason}),
    C.Reconnected: ("reconnected", lambda e: {"server": e.server, "attempts": e.attempts}),
    C.HistoryUnavailable: ("history_unavailable", lambda e: {"reason": e.reason}),
    C.MessageStored: ("stored", lambda e: {"to": e.peer, "text": e.text, "online": e.online}),
    C.MessageNotStored: ("not_stored", lambda e: {"to": e.peer, "text": e.text, "reason": e.reason}),
    C.MessageDelivered: ("delivered", lambda e: {"to": e.peer, "text": e.text, "stored": e.stored}),
    C.Disconnected: ("disconnected", lambda e: {"reason": e.reason}),
}


def event_json(event) -> dict | None:
    """A clientlib event as its JSON object (docs/CLIENT.md, "JSON events"), or None."""
    entry = _EVENTS.get(type(event))
    if entry is None:
        return None
    name, fields = entry
    return {"v": JSON_SCHEMA, "event": name, "time": round(time.time(), 3), **fields(event)}


class Output:
    """stdout (and stderr for notices in plain mode), one writer at a time."""

    def __init__(self, json_mode: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._lock = threading.Lock()

    def event(self, name: str, **fields) -> None:
        """A JSON line (ASCII only: a peer's text can never reach a terminal raw)."""
        line = json.dumps({"v": JSON_SCHEMA, "event": name, "time": round(time.time(), 3), **fields})
        self._write(self.out, line)

    def say(self, text: str) -> None:
        """A line for people: plain mode on stderr; in JSON mode an "info" event."""
        if self.json_mode:
            self.event("info", text=text)
        else:
            self._write(self.err, f"[CLIENT]: {text}")

    def error(self, text: str, **fields) -> None:
        if self.json_mode:
            self.event("error", error=text, **fields)
        else:
            self._write(self.err, f"[CLIENT]: {text}")

    def client_event(self, event) -> None:
        if self.json_mode:
            doc = event_json(event)
            if doc is not None:
                self._write(self.out, json.dumps(doc))
            return
        if isinstance(event, C.MessageReceived):  # the message on stdout, every line naming its sender
            sender = C.sanitize(event.peer, 64)
            self._write(self.out, "\n".join(f"[{sender}]: {line}" for line in C.sanitize_lines(event.text)))
        elif isinstance(event, C.SecurityWarning):
            self.say(f"SECURITY WARNING about {C.sanitize(event.peer, 64)}: {C.sanitize(event.text)}")
        elif isinstance(event, (C.ServerNotice, C.HistoryUnavailable)):
            self.say(C.sanitize(getattr(event, "text", "") or getattr(event, "reason", "")))
        elif isinstance(event, C.Disconnected):
            self.say(f"Connection to the server lost: {C.sanitize(event.reason)}")

    def _write(self, stream: TextIO, line: str) -> None:
        with self._lock:
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):  # the reader went away (a closed pipe)
                pass


# =============================================================================
# Logging in, and the commands
# =============================================================================
def connect_and_log_in(client: C.ChatClient, username: str, password: str, out: Output) -> None:
    """Connect (over the server list), check the server's key, log in, start receiving."""
    client.connect()
    if client.first_contact:
        out.say(
            f"First contact with {client.server_id}; its identity key {client.server_fingerprint} is now "
            "remembered (trust on first use)."
        )
    client.login(username, password)
    client.start()
    if out.json_mode:
        out.event(
            "ready",
            user=client.username,
            server=client.server_id,
            node=client.node_id,
            fingerprint=client.server_fingerprint,
            first_contact=client.first_contact,
            history=client.history is not None,
        )


def run_command(
    make_client: Callable[[], C.ChatClient],
    args,
    out: Output,
    body: Callable[[C.ChatClient], int],
    *,
    interrupted: int = EXIT_OK,
) -> int:
    """Log in, run ``body``, close; every error becomes one clear line and its exit code
    (Ctrl-C: ``interrupted``, so an interrupted ``send`` is never reported as sent)."""
    client = None
    try:
        username, password = username_from(args), password_from(args)
        client = make_client()
        connect_and_log_in(client, username, password, out)
        return body(client)
    except KeyboardInterrupt:
        return interrupted
    except (SecureIMError, ValueError) as exc:
        out.error(str(exc), exit=exit_code(exc))
        return exit_code(exc)
    finally:
        if client is not None:
            client.close()


def send_one(
    client: C.ChatClient, peer: str, text: str, out: Output, *, wait_delivered: bool = False, **echo
) -> bool:
    """Send and wait until the server accepted (or stored) it; with ``wait_delivered``, also
    until the recipient's end-to-end receipt (bounded: WAIT_DELIVERED_S).  One "sent" event
    (and one "delivered") or one error."""
    try:
        entry = client.send_confirmed(peer, text)
    except (MessageRefused, ConnectionClosed, ValueError, AuthError) as exc:
        out.error(str(exc), to=peer, **echo)
        return False
    name = P.normalize_username(peer)
    state = "stored" if entry.stored else "accepted"
    if out.json_mode:
        out.event("sent", to=name, state=state, **echo)
    elif entry.stored:
        out.say(f"Stored for {name} (offline); it is delivered when {name} logs in.")
    if not wait_delivered:
        return True
    if not entry.receipted.wait(WAIT_DELIVERED_S):
        out.error(
            f"No delivery receipt from {name} within {WAIT_DELIVERED_S:.0f} s (the message is {state}).",
            to=peer,
            **echo,
        )
        return False
    if out.json_mode:
        out.event("delivered", to=name, **echo)
    return True


def run_send(make_client, args, out: Output) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text:
        out.error("Nothing to send (an empty text).", exit=EXIT_USAGE)
        return EXIT_USAGE
    return run_command(
        make_client,
        args,
        out,
        lambda client: (
            EXIT_OK
            if send_one(client, args.user_to, text, out, wait_delivered=args.wait_delivered)
            else EXIT_ERROR
        ),
        interrupted=EXIT_ERROR,
    )


class EventPump:
    """Prints every event of a client as it arrives; counts messages; notices the end."""

    def __init__(self, client: C.ChatClient, out: Output, count: int | None = None) -> None:
        self.client, self.out, self.count = client, out, count
        self.received = 0
        self.lost: str | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            event = self.client.next_event(timeout=0.5)
            if event is None:
                continue
            self.out.client_event(event)
            if isinstance(event, C.MessageReceived):
                self.received += 1
                if self.count is not None and self.received >= self.count:
                    self.done.set()
            elif isinstance(event, C.Disconnected):
                self.lost = event.reason
                self.done.set()


def run_commands(client: C.ChatClient, out: Output, lines, stop: threading.Event, end_on_eof: bool) -> None:
    """Read JSON commands, one per line, and run them in order until ``quit``, ``stop`` or the end
    of input (which ends the session only if ``end_on_eof``)."""
    for line in lines:
        if stop.is_set():
            return
        if line.strip() and not handle_command(client, line, out):
            stop.set()
            return
    if end_on_eof:
        stop.set()


def _text_field(doc: dict, name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise UsageError(f'"{name}" must be a non-empty string.')
    return value


def handle_command(client: C.ChatClient, line: str, out: Output) -> bool:
    """One JSON command; False for ``quit``.  Errors are "error" events, never the end."""
    try:
        doc = json.loads(line)
    except ValueError:
        out.error(
            'Not a JSON object: each line is one command such as {"cmd": "send", "to": "bob", "text": "hi"}.'
        )
        return True
    if not isinstance(doc, dict) or not isinstance(doc.get("cmd"), str):
        out.error('A command is a JSON object with a "cmd" string.')
        return True
    cmd = doc["cmd"]
    echo = {"id": doc["id"]} if isinstance(doc.get("id"), (str, int)) else {}
    try:
        if cmd == "quit":
            return False
        if cmd == "send":
            send_one(client, _text_field(doc, "to"), _text_field(doc, "text"), out, **echo)
        elif cmd == "who":
            client.who()
        elif cmd == "open":
            client.open_conversation(_text_field(doc, "peer"))
        elif cmd == "history":
            limit = doc.get("limit", 20)
            if not isinstance(limit, int) or not 1 <= limit <= 10_000:
                raise UsageError('"limit" is a number from 1 to 10000.')
            peer = P.normalize_username(_text_field(doc, "peer"))
            page = client.history_page(peer, limit)
            out.event(
                "history",
                peer=peer,
                entries=[_history_entry(client, e) for e in page.entries],
                damaged=page.damaged,
                enabled=client.history is not None,
                **echo,
            )
        elif cmd == "forget":
            peer = P.normalize_username(_text_field(doc, "peer"))
            out.event("forgotten", peer=peer, count=client.forget(peer), **echo)
        elif cmd == "accept":  # the only way a changed identity key is accepted: explicitly
            peer = P.normalize_username(_text_field(doc, "peer"))
            changed = client.accept_identity(peer, reopen=False)
            out.event("accepted", peer=peer, changed=changed, **echo)
            if changed:  # said first: its conversation_ready comes after it
                client.open_conversation(peer)
        elif cmd == "verify":
            peer = P.normalize_username(_text_field(doc, "peer"))
            out.event(
                "safety_number",
                peer=peer,
                number=client.safety_number(peer),
                verified=client.is_verified(peer),
                **echo,
            )
        else:
            out.error(
                f"Unknown command {cmd!r}: send, who, open, history, forget, accept, verify, quit.", **echo
            )
    except (SecureIMError, ValueError) as exc:
        out.error(str(exc), cmd=cmd, **echo)
    return True


def _stdin_commands(
    client: C.ChatClient, out: Output, stop: threading.Event, stdin: TextIO, end_on_eof: bool
) -> None:
    threading.Thread(
        target=run_commands, args=(client, out, stdin, stop, end_on_eof), name="commands", daemon=True
    ).start()


def run_receive(make_client, args, out: Output, stdin: TextIO | None = None) -> int:
    """Print messages as they arrive; end after ``--count`` messages or ``--timeout`` seconds.

    Exit 0 when the count was reached (or, without a count, at the timeout); 1 when the
    connection was lost or the timeout came first.  With ``--json``, stdin carries commands.
    """
    if args.count is not None and args.count < 1:
        raise UsageError("--count is at least 1.")

    def body(client: C.ChatClient) -> int:
        pump = EventPump(client, out, args.count)
        pump.start()
        if out.json_mode:
            _stdin_commands(client, out, pump.done, stdin or sys.stdin, end_on_eof=False)
        pump.done.wait(args.timeout)
        pump.done.set()
        if pump.lost is not None:
            return EXIT_ERROR
        if args.count is not None and pump.received < args.count:
            out.error(
                f"Timed out after {args.timeout:g} s with {pump.received} of {args.count} messages.",
                exit=EXIT_ERROR,
            )
            return EXIT_ERROR
        return EXIT_OK

    return run_command(make_client, args, out, body)


def run_json_session(make_client, args, out: Output, stdin: TextIO | None = None) -> int:
    """An interactive session driven by a program: JSON commands in, JSON events out, until
    ``quit`` or the end of stdin (exit 0) or a lost connection (exit 1)."""

    def body(client: C.ChatClient) -> int:
        pump = EventPump(client, out)
        pump.start()
        _stdin_commands(client, out, pump.done, stdin or sys.stdin, end_on_eof=True)
        pump.done.wait()
        return EXIT_ERROR if pump.lost is not None else EXIT_OK

    return run_command(make_client, args, out, body)
