"""``python client.py``: the command line, then the chat screen or a script."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from secureim import client as C
from secureim.client import DEFAULT_GROUP, DEFAULT_PORT, GROUPS
from secureim.client import scripting as S
from secureim.errors import (
    ConfigError,
    ConnectionClosed,
    HandshakeFailed,
    ProtocolError,
    SecureIMError,
    ServerKeyMismatch,
    ServiceUnavailable,
)
from secureim.tui.app import ChatUI
from secureim.tui.commands import (
    EXIT_ERROR,
    EXIT_KEY_MISMATCH,
    EXIT_LOGIN_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    TERMINAL_RECONNECT_ATTEMPTS,
    TERMINAL_RECONNECT_WINDOW_S,
)
from secureim.tui.login import log_in
from secureim.tui.terminal import Terminal


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError("a port is between 1 and 65535")
    return port


def _common_options(p: argparse.ArgumentParser, *, sub: bool) -> None:
    """The options every mode takes; a subcommand's copies default to 'not given' so that
    ``client.py --json send ...`` and ``client.py send --json ...`` mean the same."""
    d = (lambda _value: argparse.SUPPRESS) if sub else (lambda value: value)
    p.add_argument(
        "--host",
        default=d("127.0.0.1"),
        help="server address; several servers of one service as a,b,c or h1:p1,h2:p2 "
        f"(at most {C.MAX_SERVERS}; tried in order, the first names the service)",
    )
    p.add_argument(
        "--port", type=_port, default=d(DEFAULT_PORT), help="server port (1-65535) for hosts without one"
    )
    p.add_argument(
        "--home",
        type=Path,
        default=d(None),
        help="where this client keeps its files; one per user when several share a machine "
        "(None: $SECUREIM_HOME or ~/.secureim)",
    )
    p.add_argument(
        "--server-fingerprint",
        default=d(None),
        metavar="SHA256:...",
        help="the server's identity fingerprint; refuse any other key",
    )
    p.add_argument(
        "--group", default=d(DEFAULT_GROUP), choices=list(GROUPS), help="Diffie-Hellman group to propose"
    )
    p.add_argument(
        "--user", default=d(None), help=f"your username, for send, receive and --json (or ${S.USER_ENV})"
    )
    p.add_argument(
        "--password-file",
        default=d(None),
        metavar="FILE",
        help=f"read the password from the first line of FILE (mode 600); or ${S.PASSWORD_ENV}; "
        "never an argument",
    )
    p.add_argument("--password", default=d(None), help=argparse.SUPPRESS)  # only to refuse it clearly
    p.add_argument(
        "--json",
        action="store_true",
        default=d(False),
        help="one JSON object per line on stdout for every event; commands as JSON lines on stdin",
    )
    p.add_argument(
        "--no-history",
        action="store_true",
        default=d(False),
        help="keep no local history this session (write nothing)",
    )
    p.add_argument(
        "--history-max",
        type=int,
        default=d(C.DEFAULT_MAX_PER_CONVERSATION),
        metavar="N",
        help="keep at most N messages per conversation",
    )
    p.add_argument(
        "--history-days",
        type=float,
        default=d(C.DEFAULT_MAX_AGE_DAYS),
        metavar="DAYS",
        help="keep messages for at most DAYS days",
    )


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="secureim terminal client; `send` and `receive` for scripts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common_options(p, sub=False)
    p.add_argument(
        "--direct",
        action="store_true",
        help="prefer direct (peer-to-peer UDP) conversations, which show your address to the "
        "peer; falls back to the relay",
    )
    p.add_argument("--no-timestamps", action="store_true", help="no HH:MM time before each line")
    p.add_argument(
        "--no-bell",
        action="store_true",
        help="no terminal bell for messages from a conversation other than the current one",
    )
    commands = p.add_subparsers(dest="command", metavar="{send,receive}")
    send = commands.add_parser(
        "send",
        help="log in, send one message, wait until the server accepted it, exit",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    send.add_argument("user_to", metavar="USER", help="who gets the message")
    send.add_argument("text", metavar="TEXT", help="the message (- reads it from stdin)")
    send.add_argument(
        "--wait-delivered",
        action="store_true",
        help="also wait (at most 60 s) for the recipient's end-to-end delivery receipt; exit 1 without one",
    )
    _common_options(send, sub=True)
    receive = commands.add_parser(
        "receive",
        help="log in and print messages as they arrive",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    receive.add_argument("--timeout", type=float, default=None, metavar="S", help="stop after S seconds")
    receive.add_argument("--count", type=int, default=None, metavar="N", help="stop after N messages")
    _common_options(receive, sub=True)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked: exit 2 with one line for anything wrong (a password given as an
    argument included: every user of the machine can read it in ps)."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.password is not None:
        parser.error(
            f"a password is never given as an argument (ps shows it to everyone); use "
            f"${S.PASSWORD_ENV}, --password-file FILE, or the prompt"
        )
    try:
        args.servers = C.parse_servers(args.host, args.port)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.history_max < 1 or args.history_days <= 0:
        parser.error("--history-max is at least 1 and --history-days more than 0")
    return args


def client_factory(args, home: Path, *, stays: bool = False):
    """``stays``: the terminal's client, which resumes a lost connection for as long as its ticket
    can be valid (TERMINAL_RECONNECT_*); scripts end on a lost connection instead."""
    reconnect: dict[str, Any] = (
        dict(
            auto_reconnect=True,
            reconnect_attempts=TERMINAL_RECONNECT_ATTEMPTS,
            reconnect_max_s=TERMINAL_RECONNECT_WINDOW_S,
        )
        if stays
        else {}
    )

    def make() -> C.ChatClient:
        return C.ChatClient(
            servers=args.servers,
            home=home,
            group=args.group,
            server_fingerprint=args.server_fingerprint,
            history=not args.no_history,
            history_max_messages=args.history_max,
            history_max_age_days=args.history_days,
            **reconnect,
        )

    return make


def run_script(args) -> int:
    """``send``, ``receive``, or ``--json``: no prompt_toolkit, no dialogue."""
    out = S.Output(args.json)
    try:
        home = C.check_home(args.home if args.home is not None else C.default_home())
    except ConfigError as exc:
        out.error(str(exc), exit=EXIT_ERROR)
        return EXIT_ERROR
    make = client_factory(args, home)
    try:
        if args.command == "send":
            return S.run_send(make, args, out)
        if args.command == "receive":
            return S.run_receive(make, args, out)
        return S.run_json_session(make, args, out)
    except S.UsageError as exc:
        out.error(str(exc), exit=EXIT_USAGE)
        return EXIT_USAGE


def _key_mismatch(term: Terminal, client: C.ChatClient, exc: ServerKeyMismatch) -> int:
    term.say("[CLIENT]: @@@ WARNING: THE SERVER'S IDENTITY KEY DOES NOT MATCH! @@@")
    term.say("[CLIENT]: Someone may be impersonating the server (a man-in-the-middle attack),")
    term.say("[CLIENT]: or the server's key was replaced.")
    term.say(f"[CLIENT]: {exc}")
    term.say(
        f"[CLIENT]: Refusing to connect. If the change is expected, remove the line for "
        f"{client.server_id} from {client.known_servers.path}."
    )
    return EXIT_KEY_MISMATCH


def _connect(client: C.ChatClient, term: Terminal) -> int | None:
    """Connect and say how it went; the exit code if it failed."""
    term.say("[CLIENT]: Connecting to server...")
    try:
        client.connect()
    except ServerKeyMismatch as exc:
        return _key_mismatch(term, client, exc)
    except HandshakeFailed as exc:
        term.say(f"[CLIENT]: Could not connect securely to {client.node_id}: {exc}")
        return EXIT_ERROR
    except (ConnectionClosed, ProtocolError) as exc:
        term.say(f"[CLIENT]: {exc}")
        return EXIT_ERROR
    term.say("[CLIENT]: Connection successful.")
    if client.first_contact:
        term.say(
            f"[CLIENT]: First contact with {client.server_id}; its identity key "
            f"{client.server_fingerprint} is now remembered (trust on first use)."
        )
    return None


def _session(client: C.ChatClient, term: Terminal, *, username: str | None = None) -> int | None:
    """Connect and log in (and start receiving); the exit code if that did not happen."""
    code = _connect(client, term)
    if code is not None:
        return code
    try:
        if not log_in(client, term, username=username):
            client.close()
            return EXIT_LOGIN_FAILED
    except (EOFError, KeyboardInterrupt):
        client.close()
        raise
    except ServerKeyMismatch as exc:  # the login window reconnected to another key
        client.close()
        return _key_mismatch(term, client, exc)
    except (ConnectionClosed, ServiceUnavailable, ProtocolError) as exc:
        term.say(f"[CLIENT]: {exc}")
        client.close()
        return EXIT_ERROR
    term.say("[CLIENT]: User logged in successfully.")
    client.start()
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command is not None or args.json:
        return run_script(args)
    term = Terminal(timestamps=not args.no_timestamps, bell=not args.no_bell)
    try:
        home = C.check_home(args.home if args.home is not None else C.default_home())
        make = client_factory(args, home, stays=True)
        client = make()
    except ConfigError as exc:
        term.say(f"[CLIENT]: {exc}")
        return EXIT_ERROR
    try:
        code = _session(client, term)
    except (EOFError, KeyboardInterrupt):
        return EXIT_OK
    if code is not None:
        return code
    if args.direct:
        client.enable_direct()

    def relogin(old: C.ChatClient) -> C.ChatClient | None:
        """The ticket was refused: a new connection and the password, as the same user."""
        old.close(timeout_s=2)
        new = make()
        if _session(new, term, username=old.username) is not None:
            return None
        if args.direct:
            new.enable_direct()
        return new

    ui = ChatUI(client, term, prefer_direct=args.direct, relogin=relogin)
    try:
        code = ui.run()
    finally:
        ui.client.close()
    if code == EXIT_OK:
        term.say("[CLIENT]: Goodbye.")
    return code


def run() -> None:
    """``python client.py`` and the ``secureim`` command: the last edge, a clear line, never a traceback."""
    try:
        sys.exit(main())
    except SecureIMError as exc:
        print(f"[CLIENT]: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
