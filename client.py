"""The secureim terminal client: log in, pick a destination, chat.

Only the terminal lives here; connection, handshake, login and conversations
are in clientlib.py.  Incoming messages are printed above the line being typed
(prompt_toolkit's patch_stdout), so they never garble it.  Everything from the
network is passed through ``clientlib.sanitize`` before it is shown.

Exit codes: 0 normal exit, 1 error (server unreachable, connection lost, login
impossible), 3 the server's identity key did not match.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import threading
from pathlib import Path

import clientlib as C
import protocol as P
from diffiehellman import DEFAULT_GROUP, GROUPS
from errors import (
    AccountBanned,
    AccountLocked,
    AuthError,
    ConfigError,
    ConnectionClosed,
    HandshakeFailed,
    InvalidCredentials,
    InvalidPassword,
    InvalidUsername,
    ProtocolError,
    SecureIMError,
    ServerKeyMismatch,
    ServiceUnavailable,
    UsernameTaken,
)
from protocol import DEFAULT_PORT

EXIT_OK, EXIT_ERROR, EXIT_KEY_MISMATCH = 0, 1, 3
MAX_LOGIN_ROUNDS = 6
DELETE_ANSWER_TIMEOUT_S = 30.0   # bcrypt on a busy server; the answer normally takes well under a second

HELP = """[CLIENT]: Commands:
  /to USER        talk to USER (several conversations can be open at once)
  /direct USER    talk to USER peer to peer over UDP (the server no longer carries the messages)
  /mode USER      show whether the conversation with USER is direct or relayed
  /who            list who is online
  /fingerprint    show the server's and your own identity fingerprints
  /verify USER    show the safety number to compare with USER (in person or by phone)
  /verified USER  mark USER as verified, after the safety numbers matched
  /accept USER    accept USER's changed identity key (after checking /verify USER)
  /delete-account delete your account on the server (asks your password and a typed confirmation)
  /help           this help
  /quit           leave (Ctrl-D and Ctrl-C leave too)
Anything else is sent to the current destination."""


class Terminal:
    """Prompts and output: prompt_toolkit on a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty()
        self._session = None
        if self.interactive:
            from prompt_toolkit import PromptSession

            self._session = PromptSession()

    def say(self, line: str) -> None:
        print(line, flush=True)

    def ask(self, prompt: str, *, secret: bool = False) -> str:
        if self._session is not None:
            return self._session.prompt(prompt, is_password=secret)
        if secret:
            return getpass.getpass(prompt)
        print(prompt, end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            raise EOFError()
        return line.rstrip("\n")

    def interrupt(self) -> None:
        """End the prompt being shown (from another thread): it raises EOFError."""
        if self._session is None:
            return
        app = self._session.app
        if app.is_running and app.loop is not None:
            app.loop.call_soon_threadsafe(lambda: app.exit(exception=EOFError()) if app.is_running else None)

    def patch_stdout(self):
        if self._session is None:
            from contextlib import nullcontext

            return nullcontext()
        from prompt_toolkit.patch_stdout import patch_stdout

        return patch_stdout(raw=True)


class ChatUI:
    def __init__(self, client: C.ChatClient, term: Terminal, prefer_direct: bool = False) -> None:
        self.client = client
        self.term = term
        self.prefer_direct = prefer_direct
        self.destination: str | None = None
        self.lost: str | None = None
        self.deleted = False
        self._deletion_answered = threading.Event()
        self._printer = threading.Thread(target=self._print_events, name="events", daemon=True)

    # -- incoming events ------------------------------------------------------------
    def _print_events(self) -> None:
        while True:
            event = self.client.next_event(timeout=None)
            if isinstance(event, C.AccountDeletion):
                self.term.say(f"[CLIENT]: {event.reason}")
                self.deleted = event.deleted
                self._deletion_answered.set()
                continue
            if isinstance(event, C.Disconnected) and self.deleted:
                return  # the server closes after a deletion: a normal end
            if isinstance(event, C.Disconnected):
                self.lost = event.reason
                self.term.say(f"[CLIENT]: Connection to the server lost: {C.sanitize(event.reason)}")
                self.term.interrupt()
                return
            line = self._describe(event)
            if line:
                self.term.say(line)

    def _describe(self, event) -> str | None:
        peer = C.sanitize(getattr(event, "peer", "") or "", 64)
        is_dest = peer == self.destination
        if isinstance(event, C.MessageReceived):
            return f"[{peer}]: {C.sanitize(event.text)}"
        if isinstance(event, C.DirectReady):
            return f"[CLIENT]: Conversation with {peer} is now direct (peer to peer; the server no longer sees it)."
        if isinstance(event, C.DirectFallback):
            return f"[CLIENT]: No direct connection to {peer} ({C.sanitize(event.reason)}); using the relay."
        if isinstance(event, C.MessageUndelivered):
            return f"[CLIENT]: Not delivered to {peer} (no acknowledgement): {C.sanitize(event.text, 200)}"
        if isinstance(event, C.PeerOnline):
            return "[CLIENT]: Destination user is online." if is_dest else f"[CLIENT]: {peer} is online."
        if isinstance(event, C.PeerOffline):
            return "[CLIENT]: Destination user is offline." if is_dest else f"[CLIENT]: {peer} is offline."
        if isinstance(event, C.PeerUnknown):
            return f"[CLIENT]: Destination user {peer} does not exist; type /to USER to choose another."
        if isinstance(event, C.ConversationReady):
            if self.prefer_direct:
                self.client.open_direct(event.peer)
            trust = "verified" if event.verified else f"not verified yet: /verify {peer}"
            if event.opened_by_peer and not is_dest:
                return f"[CLIENT]: {peer} opened a conversation with you ({trust}); type /to {peer} to reply."
            return f"[CLIENT]: Conversation with {peer} is ready (encrypted end to end; {trust})."
        if isinstance(event, C.SecurityWarning):
            return (f"[CLIENT]: @@@ SECURITY WARNING about {peer} @@@\n"
                    f"[CLIENT]: {C.sanitize(event.text)}")
        if isinstance(event, C.MessageRejected):
            return f"[CLIENT]: {C.sanitize(event.reason)}"
        if isinstance(event, C.WhoList):
            more = f" (and {event.total - len(event.users)} more)" if event.total > len(event.users) else ""
            return f"[CLIENT]: Online now ({event.total}): {', '.join(event.users)}{more}"
        if isinstance(event, C.ServerNotice):
            return f"[CLIENT]: Server: {event.text}"
        return None

    # -- the chat loop ---------------------------------------------------------------
    def run(self) -> int:
        self._printer.start()
        with self.term.patch_stdout():
            try:
                while self.destination is None:
                    name = self.term.ask("[CLIENT]: Destination: ").strip()
                    if name.startswith("/"):
                        if self._command(name) is not None:
                            return EXIT_OK
                    elif name:
                        self._switch_to(name)
                while True:
                    line = self.term.ask(f"[{self.client.username}]> ")
                    if self.lost is not None:
                        return EXIT_ERROR
                    if line.startswith("/"):
                        if self._command(line.strip()) is not None:
                            return EXIT_OK
                    elif line.strip():
                        self._send(line)
            except (EOFError, KeyboardInterrupt):
                return EXIT_ERROR if self.lost is not None else EXIT_OK
            except (ConnectionClosed, ProtocolError) as exc:
                self.term.say(f"[CLIENT]: Connection to the server lost: {exc}")
                return EXIT_ERROR

    def _identity_command(self, cmd: str, peer: str) -> None:
        if not peer:
            self.term.say(f"[CLIENT]: Usage: {cmd} USER")
            return
        shown = C.sanitize(peer, 64)
        if cmd == "/verify":
            number = self.client.safety_number(peer)
            if number is None:
                self.term.say(f"[CLIENT]: You have no key for {shown} yet; open a conversation first.")
                return
            state = "verified" if self.client.is_verified(peer) else "not verified"
            self.term.say(f"[CLIENT]: Safety number with {shown} ({state}):")
            self.term.say(f"[CLIENT]:     {number}")
            self.term.say(f"[CLIENT]: Compare it with {shown} in person or by phone; if it matches, type "
                          f"/verified {shown}.")
        elif cmd == "/verified":
            ok = self.client.mark_verified(peer)
            self.term.say(f"[CLIENT]: {shown} is now marked as verified." if ok
                          else f"[CLIENT]: You have no key for {shown} to verify.")
        else:
            ok = self.client.accept_identity(peer)
            self.term.say(f"[CLIENT]: Accepted {shown}'s new identity key; reopening the conversation." if ok
                          else f"[CLIENT]: {shown}'s identity key has not changed; nothing to accept.")

    def _delete_account(self) -> bool:
        """True once the server has deleted the account (the client then leaves)."""
        me = self.client.username or ""
        self.term.say("[CLIENT]: This deletes your account on the server for good.")
        password = self.term.ask("[CLIENT]: Password: ", secret=True)
        typed = self.term.ask(f"[CLIENT]: Type your username ({me}) to confirm: ").strip()
        if typed != me:
            self.term.say("[CLIENT]: Not confirmed; nothing was deleted.")
            return False
        self._deletion_answered.clear()
        try:
            self.client.delete_account(password, typed)
        except InvalidPassword as exc:
            self.term.say(f"[CLIENT]: {exc}")
            return False
        if not self._deletion_answered.wait(DELETE_ANSWER_TIMEOUT_S):
            self.term.say("[CLIENT]: The server did not answer; your account may not be deleted.")
        return self.deleted

    def _switch_to(self, name: str) -> None:
        try:
            name = P.normalize_username(name)
        except InvalidUsername as exc:
            self.term.say(f"[CLIENT]: {exc}")
            return
        if name == self.client.username:
            self.term.say("[CLIENT]: That is you; choose someone else.")
            return
        self.destination = name
        if self.client.has_conversation(name):
            self.term.say(f"[CLIENT]: Now talking to {C.sanitize(name, 64)}.")
        else:
            self.client.open_conversation(name)

    def _send(self, text: str) -> None:
        dest = self.destination
        if dest is None:
            return
        if not self.client.has_conversation(dest):
            self.term.say(f"[CLIENT]: {C.sanitize(dest, 64)} is not connected; the message was not sent.")
            return
        try:
            self.client.send_message(dest, text)
        except ValueError as exc:  # too long
            self.term.say(f"[CLIENT]: {exc}")

    def _command(self, line: str) -> int | None:
        """Run a /command; returns an exit code to leave, or None to go on."""
        cmd, _, arg = line.partition(" ")
        if cmd == "/quit":
            return EXIT_OK
        if cmd == "/help":
            self.term.say(HELP)
        elif cmd == "/who":
            self.client.who()
        elif cmd == "/to":
            if arg.strip():
                self._switch_to(arg)
            else:
                self.term.say("[CLIENT]: Usage: /to USER")
        elif cmd == "/fingerprint":
            self.term.say(f"[CLIENT]: Server {self.client.server_id}: {self.client.server_fingerprint}")
            self.term.say(f"[CLIENT]: Your identity ({self.client.username}): {self.client.identity_fingerprint}")
        elif cmd == "/direct" and arg.strip():
            self.client.open_direct(arg.strip().lower())
        elif cmd == "/mode" and arg.strip():
            peer = arg.strip().lower()
            mode = "direct (peer to peer)" if self.client.is_direct(peer) else "relayed by the server"
            self.term.say(f"[CLIENT]: Conversation with {C.sanitize(peer, 64)}: {mode}.")
        elif cmd == "/delete-account":
            if self._delete_account():
                return EXIT_OK
        elif cmd in ("/verify", "/verified", "/accept"):
            self._identity_command(cmd, arg.strip().lower())
        else:
            self.term.say(f"[CLIENT]: Unknown command {C.sanitize(cmd, 32)}; type /help.")
        return None


def log_in(client: C.ChatClient, term: Terminal) -> bool:
    """The design-000 login dialogue; True once logged in."""
    for _ in range(MAX_LOGIN_ROUNDS):
        username = term.ask("[CLIENT]: Username: ").strip()
        if not username:
            continue
        password = term.ask("[CLIENT]: Password: ", secret=True)
        try:
            client.login(username, password)
            return True
        except InvalidCredentials:
            term.say("[CLIENT]: Unknown user or wrong password.")
        except AccountBanned as exc:  # the server closed the connection: nothing more to try here
            term.say(f"[CLIENT]: {exc}")
            return False
        except AccountLocked as exc:
            term.say(f"[CLIENT]: {exc}")
            continue
        except (InvalidUsername, InvalidPassword, AuthError) as exc:
            term.say(f"[CLIENT]: {exc}")
            continue
        answer = term.ask(f"[CLIENT]: Create a new account named '{C.sanitize(username, 64)}'? (y/n): ")
        if answer.strip().lower() not in ("y", "yes"):
            continue
        confirm = term.ask("[CLIENT]: Confirm password: ", secret=True)
        if confirm != password:
            term.say("[CLIENT]: The passwords do not match.")
            continue
        try:
            client.register(username, password)
            term.say("[CLIENT]: Account created.")
            return True
        except UsernameTaken:
            term.say("[CLIENT]: That username is taken (so the password was wrong).")
        except (InvalidUsername, InvalidPassword) as exc:
            term.say(f"[CLIENT]: {exc}")
    term.say("[CLIENT]: Too many attempts.")
    return False


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="secureim terminal client.")
    p.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"server port (default {DEFAULT_PORT})")
    p.add_argument("--home", type=Path, default=None,
                   help="where this client keeps its files (default $SECUREIM_HOME or ~/.secureim)")
    p.add_argument("--server-fingerprint", default=None, metavar="SHA256:...",
                   help="the server's identity fingerprint; refuse any other key")
    p.add_argument("--direct", action="store_true",
                   help="prefer direct (peer-to-peer UDP) conversations; falls back to the relay")
    p.add_argument("--group", default=DEFAULT_GROUP, choices=list(GROUPS),
                   help=f"Diffie-Hellman group to propose (default {DEFAULT_GROUP})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    term = Terminal()
    try:
        client = C.ChatClient(args.host, args.port, home=args.home, group=args.group,
                              server_fingerprint=args.server_fingerprint)
    except ConfigError as exc:
        term.say(f"[CLIENT]: {exc}")
        return EXIT_ERROR
    term.say("[CLIENT]: Connecting to server...")
    try:
        client.connect()
    except ServerKeyMismatch as exc:
        term.say("[CLIENT]: @@@ WARNING: THE SERVER'S IDENTITY KEY DOES NOT MATCH! @@@")
        term.say("[CLIENT]: Someone may be impersonating the server (a man-in-the-middle attack),")
        term.say("[CLIENT]: or the server's key was replaced.")
        term.say(f"[CLIENT]: {exc}")
        term.say(f"[CLIENT]: Refusing to connect. If the change is expected, remove the line for "
                 f"{client.server_id} from {client.known_servers.path}.")
        return EXIT_KEY_MISMATCH
    except HandshakeFailed as exc:
        term.say(f"[CLIENT]: Could not connect securely to {client.server_id}: {exc}")
        return EXIT_ERROR
    except (ConnectionClosed, ProtocolError) as exc:
        term.say(f"[CLIENT]: {exc}")
        return EXIT_ERROR
    term.say("[CLIENT]: Connection successful.")
    if client.first_contact:
        term.say(f"[CLIENT]: First contact with {client.server_id}; its identity key "
                 f"{client.server_fingerprint} is now remembered (trust on first use).")
    try:
        if not log_in(client, term):
            client.close()
            return EXIT_ERROR
    except (EOFError, KeyboardInterrupt):
        client.close()
        return EXIT_OK
    except (ConnectionClosed, ServiceUnavailable, ProtocolError) as exc:
        term.say(f"[CLIENT]: {exc}")
        client.close()
        return EXIT_ERROR
    term.say("[CLIENT]: User logged in successfully.")
    client.start()
    if args.direct:
        client.enable_direct()
    try:
        code = ChatUI(client, term, prefer_direct=args.direct).run()
    finally:
        client.close()
    if code == EXIT_OK:
        term.say("[CLIENT]: Goodbye.")
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SecureIMError as exc:  # the last edge: a clear line, never a traceback
        print(f"[CLIENT]: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
