"""The secureim terminal client: log in, pick a destination, chat.

Only the terminal lives here; connection, handshake, login and conversations
are in clientlib.py.  Incoming messages are printed above the line being typed
(Terminal: prompt_toolkit's run_in_terminal), so they never garble it.  Everything from the
network is passed through ``clientlib.sanitize`` before it is shown.

Scripts use ``client.py send USER TEXT``, ``client.py receive`` and ``--json``
(scripting.py; docs/CLIENT.md).  Exit codes: 0 normal exit (sent), 1 error
(server unreachable, connection lost, message refused), 2 usage, 3 the server's
identity key did not match, 4 login failed.

The terminal stays when the connection drops (docs/CLIENT.md, "When the connection
drops"): it resumes with the session ticket, queues what is typed meanwhile, and
ends only on /quit, Ctrl-D, a final failure, or a refused ticket the user does
not replace with a new login.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import threading
import time
from pathlib import Path

from prompt_toolkit.completion import Completer, Completion

import clientlib as C
import room_client as RC
import rooms as R
import history as H
import protocol as P
import scripting as S
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
    MessageRefused,
    ProtocolError,
    RoomError,
    SecureIMError,
    ServerKeyMismatch,
    ServiceUnavailable,
    UsernameTaken,
)
from e2e import MAX_TEXT_BYTES
from protocol import DEFAULT_PORT, MAX_PASSWORD_BYTES
from tickets import TICKET_LIFETIME_S

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_KEY_MISMATCH, EXIT_LOGIN_FAILED = (
    S.EXIT_OK,
    S.EXIT_ERROR,
    S.EXIT_USAGE,
    S.EXIT_KEY_MISMATCH,
    S.EXIT_LOGIN_FAILED,
)
HISTORY_DEFAULT_LINES = 20
MAX_LOGIN_ROUNDS = 6
DELETE_ANSWER_TIMEOUT_S = 30.0  # bcrypt on a busy server; the answer normally takes well under a second
MAX_PASSWORD_TRIES = 3
MIN_PASSWORD_BYTES = 8  # the server's rule (auth.MIN_PASSWORD_BYTES); it checks again
PASSWORD_RULE = f"Passwords are {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} characters."
# A lost connection (docs/CLIENT.md, "When the connection drops"): the library resumes with the session
# ticket on the next server of --host, waiting before try k a random time up to
# min(C.RECONNECT_MAX_DELAY_S, C.RECONNECT_BASE_DELAY_S * 2^(k-1)) (full jitter), for as long as the
# ticket can still be valid: no ticket outlives TICKET_LIFETIME_S, and a refused one asks to log in again.
TERMINAL_RECONNECT_WINDOW_S = float(TICKET_LIFETIME_S)
TERMINAL_RECONNECT_ATTEMPTS = 20_000  # not the bound that ends it: at 4 s a try on average, the window is
MAX_QUEUED_LINES = 100  # lines typed while disconnected, each at most MAX_TEXT_BYTES
LOGIN_WATCH_POLL_S = 0.25  # how soon the login watcher lets go of the socket for a login

# name -> (usage, one-line summary, more help or "").  /help COMMAND shows one entry.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "/to": (
        "/to USER",
        "talk to USER, or in #ROOM (several conversations can be open at once)",
        "Messages you type go to USER (or to every member of #ROOM) from now on; the prompt shows where.",
    ),
    "/rooms": ("/rooms", "list the rooms you are in", ""),
    "/create": (
        "/create #ROOM",
        "make a room (you are its admin); then /invite people",
        "Room names are '#' and 1 to 32 of a-z, 0-9, '_' and '-'. Messages in a room are encrypted "
        "end to end with each member's own sender key; the server relays what it cannot read.",
    ),
    "/invite": (
        "/invite #ROOM USER",
        "add USER to #ROOM (its admin only)",
        "Every member's client checks your signature on the change and shows it. USER cannot read "
        "what was said in #ROOM before.",
    ),
    "/remove": (
        "/remove #ROOM USER",
        "remove USER from #ROOM (its admin only)",
        "USER's client cannot read anything said in #ROOM afterwards: every member makes a new key.",
    ),
    "/leave": ("/leave #ROOM", "leave #ROOM (its admin's /leave closes it for everyone)", ""),
    "/members": ("/members #ROOM", "list the members of #ROOM, as your client verified them", ""),
    "/who": ("/who", "list who is online", ""),
    "/pending": (
        "/pending",
        "list your messages of this session that are not delivered yet",
        "A message to someone offline is stored (encrypted end to end) by the server until they log "
        'in; "delivered" comes from their client, which the server cannot fake.',
    ),
    "/unread": (
        "/unread",
        "show which conversations have messages you have not seen",
        "Messages from a conversation other than the current one are marked with * and ring "
        "the terminal bell (--no-bell to silence); /to USER marks them read.",
    ),
    "/direct": (
        "/direct USER",
        "talk to USER peer to peer over UDP (the server no longer carries the messages)",
        "Direct mode shows your IP address and a UDP port to USER (and USER's to you); the "
        "messages stay encrypted end to end. Also accepts USER's request for a direct link.",
    ),
    "/mode": ("/mode USER", "show whether the conversation with USER is direct or relayed", ""),
    "/fingerprint": ("/fingerprint", "show the server's and your own identity fingerprints", ""),
    "/verify": ("/verify USER", "show the safety number to compare with USER (in person or by phone)", ""),
    "/verified": ("/verified USER", "mark USER as verified, after the safety numbers matched", ""),
    "/accept": (
        "/accept USER",
        "accept USER's changed identity key (after checking /verify USER)",
        "Works at any time after the warning, also after this client was restarted.",
    ),
    "/history": (
        "/history [N]",
        f"show the last N lines (default {HISTORY_DEFAULT_LINES}) of this conversation",
        "The history is kept under --home, encrypted under a key only your password opens; "
        "--no-history keeps nothing.",
    ),
    "/forget": ("/forget USER", "erase the local history of the conversation with USER", ""),
    "/passwd": (
        "/passwd",
        "change your password (the old one is asked first)",
        "Every saved login (resumption ticket) of your account ends; this session goes on.",
    ),
    "/delete-account": (
        "/delete-account",
        "delete your account on the server (asks your password and a typed confirmation)",
        "Your account, your conversations and your saved logins on the server end; "
        "the files under --home stay.",
    ),
    "/help": ("/help [COMMAND]", "this help, or help for one command", ""),
    "/quit": ("/quit", "leave (Ctrl-D on an empty line leaves too)", ""),
}
USER_COMMANDS = frozenset(name for name, (usage, _s, _m) in COMMANDS.items() if "USER" in usage)
ROOM_COMMANDS = frozenset(name for name, (usage, _s, _m) in COMMANDS.items() if "#ROOM" in usage)


def help_text() -> str:
    lines = ["[CLIENT]: Commands (case does not matter; Tab completes commands and names):"]
    width = max(len(usage) for usage, _s, _m in COMMANDS.values()) + 2
    lines += [f"  {usage:<{width}}{summary}" for usage, summary, _more in COMMANDS.values()]
    lines += [
        f"  {'//text':<{width}}send a line that starts with /",
        "Anything else is sent to the current destination. Ctrl-C clears the line.",
        "Direct mode shows your address to the peer: see /help direct.",
    ]
    return "\n".join(lines)


HELP = help_text()


class PromptInterrupted(Exception):
    """Another thread ended the prompt: the session needs the main thread (it ended, or its ticket was refused)."""


class _Leave(Exception):
    """The chat loop ends with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Terminal:
    """Prompts and output: prompt_toolkit on a terminal, plain lines otherwise."""

    def __init__(self, *, timestamps: bool = True, bell: bool = True) -> None:
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty()
        self.timestamps, self.bell = timestamps, bell
        self.completions = lambda: []  # (words) for Tab
        self._session = None  # login and destination prompts: what was typed stays on screen
        self._chat_session = None  # the chat line: erased when sent, shown again as an output line
        self._kept: dict[int, str] = {}  # per prompt session: its text when interrupted, typed again for you
        # Output while prompts come and go (see _emit): the prompt on screen, from its first draw
        # until prompt() returns, as (session, app, loop); the text not written yet, oldest first.
        self._out_lock = threading.RLock()
        self._live = None
        self._pending: list[str] = []
        self._flush_due = False  # a flush is scheduled on the live prompt's loop
        self._stdout = sys.stdout  # the terminal itself, also while the chat replaces sys.stdout
        if self.interactive:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.key_binding import KeyBindings

            keys = KeyBindings()

            @keys.add("c-c")
            def _clear(event) -> None:  # irssi and weechat: Ctrl-C clears the input line
                event.app.current_buffer.reset()

            self._session = PromptSession(completer=ChatCompleter(self), complete_while_typing=False)
            # While typing, a long line scrolls sideways instead of growing the input area past
            # the window (which garbled long pastes); once sent it is printed whole, and wraps.
            self._chat_session = PromptSession(
                key_bindings=keys,
                completer=ChatCompleter(self),
                complete_while_typing=False,
                erase_when_done=True,
                wrap_lines=False,
            )

    def _stamp(self) -> str:
        return time.strftime("%H:%M ") if self.timestamps else ""

    def say(self, line: str, *, stamped: bool = True) -> None:
        stamp, parts = self._stamp() if stamped else "", line.split("\n")
        if parts[0].startswith("[CLIENT]: "):  # a several-line notice: every line says who speaks
            parts[1:] = [p if p.startswith(("[", "  ")) else f"[CLIENT]: {p}" for p in parts[1:]]
        text = "\n".join(stamp + part for part in parts) + "\n"
        if self._session is None:
            print(text, end="", flush=True)
        else:
            self._emit(text)

    def ring(self) -> None:
        if not self.bell:
            return
        if self._session is None:
            sys.stdout.write("\a")
            sys.stdout.flush()
        else:
            self._emit("\a")

    def ask(self, prompt, *, secret: bool = False, chat: bool = False, cancel_if=None) -> str:
        """The line typed.  ``cancel_if``: checked once the prompt is up; when true the prompt
        ends at once with PromptInterrupted (what another thread set before interrupt() is
        never missed, however the two race)."""
        session = self._chat_session if chat and not secret else self._session
        if session is not None:
            try:
                return session.prompt(
                    prompt,
                    is_password=secret,
                    default=self._kept.pop(id(session), ""),
                    pre_run=lambda: self._shown(session, cancel_if),
                )
            finally:
                with self._out_lock:  # the prompt is gone (its loop closed): write what waits, here
                    self._live, self._flush_due = None, False
                    self._write_pending()
        text = prompt() if callable(prompt) else prompt
        if secret:
            return getpass.getpass(text)
        print(text, end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            raise EOFError()
        return line.rstrip("\n")

    # Output and prompts.  prompt_toolkit's patch_stdout hands every write to its own thread,
    # which decides there whether a prompt is running: a line said just before a prompt was
    # then written after the prompt had been drawn, below it (the prompt was not drawn again:
    # in the tests "[CLIENT]: Password:" came before "Log in again as bob." and was never seen
    # again).  Here the decision and the write are made under one lock that the prompt also
    # takes before its first draw (pre_run): with no prompt up the text is written at once by
    # the caller; with one up it goes above it (run_in_terminal on the prompt's loop); what a
    # closing prompt's loop did not write, ask() writes when prompt() returns.
    def _emit(self, text: str) -> None:
        with self._out_lock:
            self._pending.append(text)
            if self._live is None:
                self._write_pending()
            elif not self._flush_due:
                try:
                    self._live[2].call_soon_threadsafe(self._flush_above, self._live[1])
                    self._flush_due = True
                except RuntimeError:  # the prompt's loop has just closed: ask() writes it
                    pass

    def _write_pending(self, *, in_prompt: bool = False) -> None:
        """With _out_lock held.  ``in_prompt``: on the prompt's loop, inside run_in_terminal (its
        output object is used there only); otherwise no prompt is up, and the text goes straight
        to the terminal (prompt_toolkit's output object is not shared across threads)."""
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        if in_prompt:
            output = self._session.app.output
            output.enable_autowrap()
            output.write_raw(text)
            output.flush()
            return
        raw = getattr(self._stdout, "buffer", None)
        if raw is not None:
            raw.write(text.encode(self._stdout.encoding or "utf-8", "replace"))
        else:
            self._stdout.write(text)
        self._stdout.flush()

    def _write_pending_now(self) -> None:
        with self._out_lock:
            self._flush_due = False
            self._write_pending(in_prompt=self._live is not None)

    def _flush_above(self, app) -> None:  # on the prompt's loop
        if app.is_running:
            from prompt_toolkit.application import run_in_terminal

            run_in_terminal(self._write_pending_now)  # erases the prompt, writes, draws it again
        else:
            self._write_pending_now()  # it has drawn itself for the last time: plain lines follow

    def _shown(self, session, cancel_if) -> None:  # on the prompt's loop, before its first draw
        app = session.app
        stale = getattr(app, "_running_in_terminal_f", None)
        if stale is not None and not stale.done():  # left by a run_in_terminal of an earlier run (its
            app._running_in_terminal_f = None  # loop is closed): it would block every later one
            app._running_in_terminal = False
        with self._out_lock:
            self._write_pending()
            self._live = (session, app, app.loop)
        if cancel_if is not None and cancel_if():
            self._kept[id(session)] = app.current_buffer.text
            app.exit(exception=PromptInterrupted())

    def interrupt(self, exception: type[BaseException] = EOFError) -> None:
        """End the prompt being shown (from another thread): it raises ``exception``.  What was typed
        is kept: the next prompt of the same kind starts with it."""
        with self._out_lock:
            if self._live is not None:
                session, _app, loop = self._live
                try:
                    loop.call_soon_threadsafe(self._end_prompt, session, exception)
                except RuntimeError:  # its loop has just closed: no prompt to end
                    pass

    def _end_prompt(self, session, exception: type[BaseException]) -> None:  # on the prompt's own loop
        if session.app.is_running and not session.app.is_done:
            self._kept[id(session)] = session.app.current_buffer.text
            session.app.exit(exception=exception())

    def refresh(self) -> None:
        """Draw the prompt again (its text changed: unread conversations)."""
        with self._out_lock:
            if self._live is not None:
                self._live[1].invalidate()

    def patch_stdout(self):
        """While the chat runs, what else is printed (to sys.stdout or sys.stderr) goes above the
        prompt too, in order with what is said."""
        if self._session is None:
            from contextlib import nullcontext

            return nullcontext()
        return _StdoutToTerminal(self)


class _StdoutToTerminal:
    """sys.stdout and sys.stderr while the chat runs: whole lines go to Terminal._emit."""

    def __init__(self, term: Terminal) -> None:
        self.term = term
        self._partial: list[str] = []
        self._lock = threading.Lock()

    def __enter__(self):
        self._saved = sys.stdout, sys.stderr
        self.encoding = sys.stdout.encoding
        self.errors = "strict"
        sys.stdout = sys.stderr = self
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        sys.stdout, sys.stderr = self._saved

    def write(self, data: str) -> int:
        with self._lock:
            if "\n" not in data:  # the prompt is drawn again over a part line: wait for its end
                self._partial.append(data)
                return len(data)
            before, after = data.rsplit("\n", 1)
            text = "".join(self._partial) + before + "\n"
            self._partial = [after] if after else []
        self.term._emit(text)
        return len(data)

    def flush(self) -> None:
        with self._lock:
            text, self._partial = "".join(self._partial), []
        if text:
            self.term._emit(text)

    def isatty(self) -> bool:
        return self._saved[0].isatty()

    def fileno(self) -> int:
        return self._saved[0].fileno()


class ChatCompleter(Completer):
    """Tab: command names after a leading /, then the names of online users and open conversations."""

    def __init__(self, term: Terminal) -> None:
        self.term = term

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if text.startswith("/") and " " not in text:
            for name in sorted(COMMANDS):
                if name.startswith(text.lower()):
                    yield Completion(name + (" " if name in USER_COMMANDS else ""), start_position=-len(text))
            return
        cmd, _, arg = text.partition(" ")
        if text.startswith("/") and (cmd.lower() not in USER_COMMANDS or " " in arg):
            return
        word = arg if text.startswith("/") else text
        if " " in word:
            return
        for name in self.term.completions():
            if name.startswith(word.lower()):
                yield Completion(name, start_position=-len(word))


def _preview(text: str, width: int = 40) -> str:
    one = " ".join(C.sanitize_lines(text))
    return one if len(one) <= width else one[: width - 1] + _shown_or("…", "...")


def _shown_or(fancy: str, plain: str) -> str:
    try:
        fancy.encode(sys.stdout.encoding or "ascii")
        return fancy
    except (UnicodeEncodeError, LookupError):
        return plain


def _arrow() -> str:
    return _shown_or("→", "->")


class ChatUI:
    def __init__(
        self, client: C.ChatClient, term: Terminal, prefer_direct: bool = False, relogin=None
    ) -> None:
        self.client = client
        self.term = term
        self.prefer_direct = prefer_direct
        self.relogin = relogin  # (the old client) -> a new logged-in client, or None: after a refused ticket
        self.destination: str | None = None
        self.lost: str | None = None
        self.arrow = _arrow()
        self.ellipsis = _shown_or("…", "...")
        self._lock = threading.Lock()
        self.unread: dict[str, int] = {}
        self.online: set[str] = set()
        self.deleted = False
        self._history_due: str | None = None  # the destination whose last lines follow its status
        self._deletion_answered = threading.Event()
        # A lost connection (guarded by _lock): offline until Reconnected; then each conversation in
        # rekeying waits for its ConversationReady; lines typed meanwhile wait in queued, in order.
        self.offline = False
        self.expired = False  # the ticket was refused: the main thread asks to log in again
        self.rekeying: set[str] = set()
        self.queued: list[tuple[str, str]] = []  # (peer, text), oldest first
        self._order = threading.Lock()  # held while a line goes out: the queued ones first, each once
        self._printer = self._new_printer()
        term.completions = self._names

    def _new_printer(self) -> threading.Thread:
        return threading.Thread(target=self._print_events, args=(self.client,), name="events", daemon=True)

    def _names(self) -> list[str]:
        with self._lock:
            names = self.online | set(self.unread)
        names |= set(self.client.open_conversations()) | set(self.client.rooms.my_rooms())
        names.discard(self.client.username or "")
        return sorted(names)

    def prompt(self) -> str:
        with self._lock:
            news = [f"{peer}:{n}" for peer, n in sorted(self.unread.items())]
        activity = f" (act: {', '.join(news)})" if news else ""
        state = " (reconnecting)" if self.offline else ""
        if self.destination is None:  # the room talked in was left, closed or removed us
            return f"[CLIENT]{activity}{state} Destination: "
        return f"[{self.client.username}{self.arrow}{self.destination}]{activity}{state}> "

    # -- incoming events ------------------------------------------------------------
    def _print_events(self, client: C.ChatClient) -> None:
        """One client's events; a new login after a refused ticket starts a new printer."""
        while True:
            event = client.next_event(timeout=None)
            if isinstance(event, C.AccountDeletion):
                self.term.say(f"[CLIENT]: {event.reason}")
                self.deleted = event.deleted
                self._deletion_answered.set()
                continue
            if isinstance(event, C.Disconnected) and self.deleted:
                return  # the server closes after a deletion: a normal end
            if isinstance(event, C.Disconnected):
                with self._lock:
                    self.offline = True
                    if event.ticket_refused:  # only the password goes on: the main thread asks
                        self.expired = True
                    else:
                        self.lost = event.reason
                if not event.ticket_refused:
                    self.term.say(f"[CLIENT]: Connection to the server lost: {C.sanitize(event.reason)}")
                self.term.interrupt(PromptInterrupted)
                return
            line = self._describe(event)
            if line:
                self.term.say(line)
                self.term.refresh()
            self._history_after_status(event)
            self._after_reconnect(event)

    def _after_reconnect(self, event) -> None:
        """A conversation that is keyed again takes its queued lines; one that cannot be stops holding new ones."""
        peer = getattr(event, "peer", None)
        if isinstance(event, C.ConversationReady):
            self._flush(event.peer)
        elif isinstance(event, C.PeerOffline):
            self._flush(event.peer, offline=True)  # offline now: the queued lines are stored for them
        elif isinstance(event, C.SecurityWarning):
            with self._lock:
                self.rekeying.discard(peer)  # "Not sent: ... refused" again; the queued lines wait
        elif isinstance(event, C.PeerUnknown):
            with self._lock:
                self.rekeying.discard(peer)
                dropped = [text for p, text in self.queued if p == peer]
                self.queued = [(p, text) for p, text in self.queued if p != peer]
            if dropped:
                self.term.say(
                    f"[CLIENT]: {len(dropped)} queued line(s) for {C.sanitize(peer, 64)} were not sent."
                )

    def _history_after_status(self, event) -> None:
        if not isinstance(event, (C.PeerOnline, C.PeerOffline, C.PeerUnknown)):
            return
        with self._lock:
            due = self._history_due
            if due != event.peer:
                return
            self._history_due = None
        if not isinstance(event, C.PeerUnknown):
            self._show_history(due, H.SHOWN_ON_OPEN, opening=True)

    def _describe(self, event) -> str | None:
        peer = C.sanitize(getattr(event, "peer", "") or "", 64)
        is_dest = peer == self.destination
        if isinstance(event, (RC.RoomMessageReceived, RC.RoomNotice, RC.RoomWarning)):
            return self._describe_room(event)
        if isinstance(event, C.MessageReceived):
            mark = self._news_from(peer)
            # Every line of a message carries the sender: a line inside it cannot pass for another's.
            return "\n".join(f"{mark}[{peer}]: {line}" for line in C.sanitize_lines(event.text))
        if isinstance(event, C.DirectReady):
            return f"[CLIENT]: Conversation with {peer} is now direct (peer to peer; the server no longer sees it)."
        if isinstance(event, C.DirectFallback):
            return f"[CLIENT]: No direct connection to {peer} ({C.sanitize(event.reason)}); using the relay."
        if isinstance(event, C.DirectRequested):
            return (
                f"[CLIENT]: {peer} asks for a direct connection (peer to peer: each of you sees the "
                f"other's address); /direct {peer} to accept."
            )
        if isinstance(event, C.MessageStored):
            if event.online:
                return None  # handed over at once: "delivered" follows
            return f"[CLIENT]: Stored for {peer} (offline); it will be delivered when {peer} logs in."
        if isinstance(event, C.MessageNotStored):
            return f"[CLIENT]: Not stored for {peer}: {C.sanitize(event.reason, 300)}"
        if isinstance(event, C.MessageDelivered):
            if not event.stored:
                return None  # live messages: /pending lists the ones without a receipt
            return f"[CLIENT]: Delivered to {peer}: {_preview(event.text)}"
        if isinstance(event, C.MessageUndelivered):
            return f"[CLIENT]: Not delivered to {peer} (no acknowledgement): {C.sanitize(event.text, 200)}"
        if isinstance(event, C.PeerOnline):
            with self._lock:
                self.online.add(peer)
            return "[CLIENT]: Destination user is online." if is_dest else f"[CLIENT]: {peer} is online."
        if isinstance(event, C.PeerOffline):
            with self._lock:
                self.online.discard(peer)
            return (
                "[CLIENT]: Destination user is offline.\n"
                f"[CLIENT]: What you type now is stored for {peer} until they log in."
                if is_dest
                else f"[CLIENT]: {peer} is offline."
            )
        if isinstance(event, C.PeerUnknown):
            if not is_dest:  # (the answer to an /invite's key lookup: the command says it)
                return None
            return f"[CLIENT]: Destination user {peer} does not exist; type /to USER to choose another."
        if isinstance(event, C.ConversationReady):
            if self.prefer_direct:
                self.client.open_direct(event.peer)
            with self._lock:
                self.online.add(peer)
            trust = "verified" if event.verified else f"not verified yet: /verify {peer}"
            if event.opened_by_peer and not is_dest:
                return f"[CLIENT]: {peer} opened a conversation with you ({trust}); type /to {peer} to reply."
            return f"[CLIENT]: Conversation with {peer} is ready (encrypted end to end; {trust})."
        if isinstance(event, C.SecurityWarning):
            return (
                f"[CLIENT]: @@@ SECURITY WARNING about {peer} @@@\n"
                f"[CLIENT]: {C.sanitize(event.text)}\n"
                f"[CLIENT]: Messages from and to {peer} are refused until then."
            )
        if isinstance(event, C.MessageRejected):
            return f"[CLIENT]: {C.sanitize(event.reason)}"
        if isinstance(event, C.WhoList):
            with self._lock:
                self.online = set(event.users)
            more = f" (and {event.total - len(event.users)} more)" if event.total > len(event.users) else ""
            return f"[CLIENT]: Online now ({event.total}): {', '.join(event.users)}{more}"
        if isinstance(event, C.ServerNotice):
            return f"[CLIENT]: Server: {event.text}"
        if isinstance(event, C.HistoryUnavailable):
            return f"[CLIENT]: {C.sanitize(event.reason)}"
        if isinstance(event, C.Reconnecting):
            if self.deleted:
                return None
            with self._lock:
                self.offline = True
            if event.attempt != 1:  # one line per outage, not one per try
                return None
            return f"[CLIENT]: Connection lost ({C.sanitize(event.reason, 200).rstrip('.')}); reconnecting{self.ellipsis}"
        if isinstance(event, C.Reconnected):
            with self._lock:
                self.offline = False  # the conversations are asked for again: each is keyed anew
                self.rekeying = {
                    p
                    for p in [self.destination, *(p for p, _t in self.queued)]
                    if p and not p.startswith("#")
                }
            return f"[CLIENT]: Reconnected to {C.sanitize(event.server, 300)}."
        return None

    def _news_from(self, where: str) -> str:
        """A message from ``where`` (a user or a #room): marked, counted and rung when it is not
        the current destination."""
        if self.destination is None or where == self.destination:
            return ""
        with self._lock:
            self.unread[where] = self.unread.get(where, 0) + 1
        self.term.ring()
        return "* "

    def _describe_room(self, event) -> str:
        room = C.sanitize(event.room, 40)
        if isinstance(event, RC.RoomMessageReceived):
            sender = C.sanitize(event.sender, 64)
            mark = self._news_from(room)
            # Every line carries the room and the sender: a line inside cannot pass for another's.
            return "\n".join(f"{mark}[{room} {sender}]: {line}" for line in C.sanitize_lines(event.text))
        if isinstance(event, RC.RoomWarning):
            return f"[CLIENT]: @@@ {C.sanitize(event.text, 600)}"
        line = f"[CLIENT]: {C.sanitize(event.text, 600)}"
        if event.gone:
            return line + self._room_gone(room)
        if event.joined:
            line += f" Type /to {room} to talk there."
        return line

    def _room_gone(self, room: str) -> str:
        """This client is no longer in ``room``: its unread mark goes, and if it was the destination
        the prompt asks for another.  Returns what to add to the notice."""
        with self._lock:
            self.unread.pop(room, None)
        if self.destination != room:
            return ""
        self.destination = None
        self.term.refresh()
        return "\n[CLIENT]: Choose a destination: a USER or a #ROOM."

    # -- the chat loop ---------------------------------------------------------------
    def run(self) -> int:
        self._printer.start()
        with self.term.patch_stdout():
            try:
                code = self._chat()
            except _Leave as leave:
                code = leave.code
            except (EOFError, KeyboardInterrupt):
                code = EXIT_ERROR if self.lost is not None else EXIT_OK
            except ProtocolError as exc:
                self.term.say(f"[CLIENT]: Connection to the server lost: {exc}")
                code = EXIT_ERROR
            with self._lock:
                unsent = len(self.queued)
            if unsent:
                self.term.say(f"[CLIENT]: {unsent} queued line(s) were not sent.")
            return code

    def _chat(self) -> int:
        while self.destination is None:
            name = self._read("[CLIENT]: Destination: ").strip()
            if name.startswith("/"):
                if self._command(name) is not None:
                    return EXIT_OK
            elif name:
                self._switch_to(name)
        while True:
            line = self._read(self.prompt, chat=True)
            try:
                if line.startswith("//"):
                    self._send(line[1:])
                elif line.startswith("/"):
                    if self._command(line.strip()) is not None:
                        return EXIT_OK
                elif line.strip() and self.destination is None:
                    self._switch_to(line.strip())  # asked for a destination again (a room went)
                elif line.strip():
                    self._send(line)
            except ConnectionClosed as exc:  # a command while reconnecting: the session goes on
                self.term.say(f"[CLIENT]: {C.sanitize(str(exc))}")

    def _read(self, prompt, *, chat: bool = False) -> str:
        """The next line typed.  Raises _Leave when the session is over: lost for good, or a refused
        ticket that the user does not replace with a new login (asked here, on the main thread)."""
        while True:
            self._settle()
            try:
                line = self.term.ask(prompt, chat=chat, cancel_if=self._needs_main)
            except PromptInterrupted:  # the printer needs us: lost, or the ticket was refused
                continue
            self._settle()  # without a terminal the line was read before we could ask: it comes after
            return line

    def _needs_main(self) -> bool:
        """The printer wants the main thread (set before it interrupts the prompt)."""
        return self.lost is not None or self.expired

    def _settle(self) -> None:
        if self.lost is not None:
            raise _Leave(EXIT_ERROR)
        while self.expired:
            answer = self.term.ask("[CLIENT]: Your session expired; log in again? (y/n): ").strip().lower()
            if answer not in ("y", "yes"):
                raise _Leave(EXIT_OK)
            client = self.relogin(self.client) if self.relogin is not None else None
            if client is not None:
                self._take_over(client)

    def _take_over(self, client: C.ChatClient) -> None:
        """A new login after a refused ticket: same destination, same queued lines, a new printer."""
        self.client = client
        with self._lock:
            self.expired = self.offline = False
            self.rekeying = {p for p in [self.destination, *(p for p, _t in self.queued)] if p}
            peers = sorted(self.rekeying)
        self._printer = self._new_printer()
        self._printer.start()
        for peer in peers:
            try:
                client.open_conversation(peer)
            except ConnectionClosed:
                break  # lost again: the reconnect reopens what it wanted
        if self.destination is not None:
            self.term.say(f"[CLIENT]: Now talking to {C.sanitize(self.destination, 64)}.")

    def _identity_command(self, cmd: str, peer: str) -> None:
        shown = C.sanitize(peer, 64)
        if cmd == "/verify":
            number = self.client.safety_number(peer)
            if number is None:
                self.term.say(f"[CLIENT]: You have no key for {shown} yet; open a conversation first.")
                return
            state = "verified" if self.client.is_verified(peer) else "not verified"
            self.term.say(f"[CLIENT]: Safety number with {shown} ({state}):")
            self.term.say(f"[CLIENT]:     {number}")
            self.term.say(
                f"[CLIENT]: Compare it with {shown} in person or by phone; if it matches, type "
                f"/verified {shown}."
            )
        elif cmd == "/verified":
            ok = self.client.mark_verified(peer)
            self.term.say(
                f"[CLIENT]: {shown} is now marked as verified."
                if ok
                else f"[CLIENT]: You have no key for {shown} to verify."
            )
        else:
            ok = self.client.accept_identity(peer, reopen=False)
            self.term.say(
                f"[CLIENT]: Accepted {shown}'s new identity key; reopening the conversation."
                if ok
                else f"[CLIENT]: {shown}'s identity key has not changed; nothing to accept."
            )
            if ok:  # said first: the "Conversation ... is ready" line it brings comes after it
                self.client.open_conversation(peer)

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
        if name.strip().startswith("#"):
            self._switch_to_room(name)
            return
        try:
            name = P.normalize_username(name)
        except InvalidUsername as exc:
            self.term.say(f"[CLIENT]: {exc}")
            return
        if name == self.client.username:
            self.term.say("[CLIENT]: That is you; choose someone else.")
            return
        self.destination = name
        with self._lock:
            self.unread.pop(name, None)
        if self.client.has_conversation(name):
            # The design's answer to a destination is always its status first (scripts rely on it).
            self.term.say("[CLIENT]: Destination user is online.")
            self.term.say(f"[CLIENT]: Now talking to {C.sanitize(name, 64)}.")
            self._show_history(name, H.SHOWN_ON_OPEN, opening=True)
        else:
            with self._lock:
                self._history_due = name  # shown after the server's answer, which comes first
            try:
                self.client.open_conversation(name)
            except ConnectionClosed:  # asked for again by the reconnect (it reopens what is wanted)
                self.term.say(
                    f"[CLIENT]: Now talking to {C.sanitize(name, 64)}; the conversation opens once "
                    "reconnected."
                )

    def _switch_to_room(self, name: str) -> None:
        try:
            name = R.normalize_room(name)
            members = self.client.rooms.members(name)
        except RoomError as exc:
            with self._lock:
                self.unread.pop(
                    R.normalize_room(name) if R.ROOM_RE.fullmatch(name.strip().lower()) else name, None
                )
            self.term.say(f"[CLIENT]: {exc}")
            return
        self.destination = name
        with self._lock:
            self.unread.pop(name, None)
        self.term.say(f"[CLIENT]: Now talking in {name} ({len(members)} members: {', '.join(members)}).")

    def _send_room(self, room: str, text: str) -> None:
        if self.offline or self.client.reconnecting:
            self.term.say("[CLIENT]: Not sent: not connected; type it again once reconnected.")
            return
        try:
            sent = self.client.rooms.send(room, text)
        except (RoomError, MessageRefused, ValueError) as exc:
            self.term.say(f"[CLIENT]: Not sent to {room}: {C.sanitize(str(exc), 300)}")
            return
        self._echo(room, text)
        if sent.stored:
            self.term.say(
                f"[CLIENT]: Stored for {sent.stored} offline member(s) of {room}; they get it when they "
                "log in."
            )
        if sent.note:
            self.term.say(f"[CLIENT]: {C.sanitize(sent.note, 300)}")

    def _room_command(self, cmd: str, arg: str) -> None:
        rooms = self.client.rooms
        words = arg.split()
        need = 2 if cmd in ("/invite", "/remove") else 1
        if len(words) != need:
            self.term.say(f"[CLIENT]: Usage: {COMMANDS[cmd][0]} ({COMMANDS[cmd][1]})")
            return
        try:
            room = R.normalize_room(words[0])
            if cmd == "/create":
                rooms.create(room)
                self.term.say(
                    f"[CLIENT]: You created {room}; you are its admin. /invite {room} USER adds "
                    f"people, /to {room} talks there."
                )
            elif cmd == "/invite":
                user = P.normalize_username(words[1])
                rooms.invite(room, user)
                self.term.say(f"[CLIENT]: You added {user} to {room}.")
            elif cmd == "/remove":
                user = P.normalize_username(words[1])
                rooms.remove(room, user)
                self.term.say(
                    f"[CLIENT]: You removed {user} from {room}; what is said there from now on is "
                    "sealed under new keys they do not have."
                )
            elif cmd == "/leave":
                self.term.say(f"[CLIENT]: {rooms.leave(room)}{self._room_gone(room)}")
            else:
                members = rooms.members(room)
                admin = rooms.admin_of(room)
                self.term.say(
                    f"[CLIENT]: {room} ({len(members)}): "
                    + ", ".join(f"{m} (admin)" if m == admin else m for m in members)
                )
        except (RoomError, InvalidUsername, ConnectionClosed) as exc:
            self.term.say(f"[CLIENT]: {C.sanitize(str(exc), 300)}")

    def _rooms(self) -> None:
        mine = self.client.rooms.summary()
        if not mine:
            self.term.say("[CLIENT]: You are in no rooms; /create #ROOM makes one.")
            return
        self.term.say("[CLIENT]: Your rooms: " + ", ".join(f"{r} ({n})" for r, n in mine))

    def _must_queue(self, dest: str) -> bool:
        """Not connected, or the conversation is not keyed again after a reconnect, or lines wait before it."""
        with self._lock:
            return (
                self.offline
                or dest in self.rekeying
                or any(p == dest for p, _t in self.queued)
                or self.client.reconnecting
            )

    def _queue(self, dest: str, text: str) -> None:
        with self._lock:
            full = len(self.queued) >= MAX_QUEUED_LINES
            if not full:
                self.queued.append((dest, text))
            offline = self.offline or self.client.reconnecting
        if full:
            self.term.say(f"[CLIENT]: Not sent: {MAX_QUEUED_LINES} lines are already waiting to be sent.")
        elif offline:
            self.term.say("[CLIENT]: Queued (not connected); it will be sent after reconnecting.")
        else:
            self.term.say(
                f"[CLIENT]: Queued (the conversation with {C.sanitize(dest, 64)} is not ready yet); "
                "it will be sent when it is."
            )

    def _flush(self, peer: str, *, offline: bool = False) -> None:
        """The conversation with ``peer`` is keyed (or ``peer`` is offline, so the lines are stored
        for them): its queued lines go, in order, each once."""
        with self._order:
            with self._lock:
                self.rekeying.discard(peer)
            while True:
                with self._lock:
                    at = next((i for i, (p, _t) in enumerate(self.queued) if p == peer), None)
                    if at is None:
                        return
                    _peer, text = self.queued.pop(at)
                try:
                    if offline:
                        self.client.send_offline(peer, text)
                    else:
                        self.client.send_message(peer, text)
                except ConnectionClosed:  # lost again: it waits for the next reconnect, still first
                    with self._lock:
                        self.queued.insert(at, (peer, text))
                    return
                except MessageRefused as exc:
                    self.term.say(f"[CLIENT]: Not sent: {C.sanitize(str(exc), 300)}")
                    continue
                self._echo(peer, text)

    def _echo(self, peer: str, text: str) -> None:
        me = f"{self.client.username}{self.arrow}{C.sanitize(peer, 64)}"
        self.term.say("\n".join(f"[{me}]: {line}" for line in C.sanitize_lines(text)))

    def _send(self, text: str) -> None:
        dest = self.destination
        if dest is None:
            self.term.say("[CLIENT]: Choose a destination first: /to USER or /to #ROOM")
            return
        if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
            self.term.say(f"[CLIENT]: Messages are limited to {MAX_TEXT_BYTES} bytes.")
            return
        if dest.startswith("#"):
            self._send_room(dest, text)
            return
        if self._must_queue(dest):
            self._queue(dest, text)
            return
        shown = C.sanitize(dest, 64)
        # Right after /to the key exchange may still be running: wait for it (bounded), never drop the line.
        if not self.client.has_conversation(dest) and not self.client.wait_conversation(dest):
            if self._must_queue(dest):  # the connection dropped meanwhile
                self._queue(dest, text)
                return
            presence = self.client.presence(dest)
            if presence == C.PRESENCE_OFFLINE:  # stored for them (sealed from their prekeys)
                self._hand_over(dest, text, self.client.send_offline)
                return
            if presence == C.PRESENCE_UNKNOWN:
                why = f"{shown} does not exist; type /to USER to choose another"
            elif presence == C.PRESENCE_REFUSED:
                why = f"you refused {shown}'s new identity key (check /verify {shown}, then /accept {shown})"
            elif presence == C.PRESENCE_ONLINE:
                why = (
                    f"{shown}'s client did not complete the key exchange; if your identity key changed "
                    f"(a new device), {shown} must first accept it with /accept {self.client.username}"
                )
            else:
                why = f"there is no conversation with {shown}; type /to {shown}"
            self.term.say(f"[CLIENT]: Not sent: {why}.")
            return
        self._hand_over(dest, text, self.client.send_message)

    def _hand_over(self, dest: str, text: str, send) -> None:
        """``send`` (live, or stored for an offline peer) after the lines already waiting; a line
        that never reached the server is queued and goes after the reconnect, once."""
        with self._order:
            if self._must_queue(dest):  # queued lines go first
                self._queue(dest, text)
                return
            try:
                send(dest, text)
            except ValueError as exc:  # too long
                self.term.say(f"[CLIENT]: {exc}")
                return
            except MessageRefused as exc:
                self.term.say(f"[CLIENT]: Not sent: {C.sanitize(str(exc), 300)}")
                return
            except ConnectionClosed:
                self._queue(dest, text)
                return
        self._echo(dest, text)

    def _pending(self) -> None:
        waiting = self.client.pending()
        if not waiting:
            self.term.say("[CLIENT]: Every message you sent this session has been delivered.")
            return
        self.term.say(f"[CLIENT]: Not delivered yet ({len(waiting)}):")
        for entry in waiting:
            when = time.strftime("%H:%M", time.localtime(entry.at))
            self.term.say(
                f"[CLIENT]:   {when} to {C.sanitize(entry.peer, 64)} ({entry.state}): {_preview(entry.text)}"
            )

    def _show_history(self, peer: str, limit: int, *, opening: bool = False) -> None:
        """The last ``limit`` lines with ``peer``, each with its own date and time."""
        if self.client.history is None:
            if not opening:
                self.term.say(
                    "[CLIENT]: No history is kept in this session (--no-history, or it could not be opened)."
                )
            return
        page = self.client.history_page(peer, limit)
        shown = C.sanitize(peer, 64)
        if not page.entries:
            if not opening:
                self.term.say(f"[CLIENT]: No history with {shown}.")
            return
        self.term.say(f"[CLIENT]: Earlier with {shown} (last {len(page.entries)}):")
        today = time.strftime("%Y-%m-%d")
        lines = []
        for entry in page.entries:
            day = time.strftime("%Y-%m-%d", time.localtime(entry.at))
            when = time.strftime("%H:%M" if day == today else "%Y-%m-%d %H:%M", time.localtime(entry.at))
            who = f"{self.client.username}{self.arrow}{shown}" if entry.direction == H.OUTGOING else shown
            mark = " (refused by the server: not delivered)" if entry.state == H.STATE_REFUSED else ""
            lines += [f"  {when} [{who}]: {line}{mark}" for line in C.sanitize_lines(entry.text)]
        self.term.say("\n".join(lines), stamped=False)
        if page.damaged:
            self.term.say(
                f"[CLIENT]: {page.damaged} line(s) of the history failed their integrity check and "
                "were not shown."
            )

    def _history_command(self, arg: str) -> None:
        if self.destination is None:
            self.term.say("[CLIENT]: Choose a conversation first: /to USER")
            return
        if self.destination.startswith("#"):
            self.term.say(
                "[CLIENT]: The local history keeps one-to-one conversations only; rooms are not kept."
            )
            return
        if arg and not (arg.isdigit() and 1 <= int(arg) <= 10_000):
            self.term.say("[CLIENT]: Usage: /history [N], N from 1 to 10000.")
            return
        self._show_history(self.destination, int(arg) if arg else HISTORY_DEFAULT_LINES)

    def _forget(self, peer: str) -> None:
        if peer.startswith("#"):
            self.term.say(
                "[CLIENT]: The local history keeps one-to-one conversations only; rooms are not kept."
            )
            return
        shown = C.sanitize(peer, 64)
        if self.client.history is None:
            self.term.say("[CLIENT]: No history is kept in this session; nothing to forget.")
            return
        try:
            count = self.client.forget(peer)
        except InvalidUsername as exc:
            self.term.say(f"[CLIENT]: {exc}")
            return
        self.term.say(f"[CLIENT]: Erased the history with {shown} ({count} message(s)).")

    def _unread(self) -> None:
        with self._lock:
            news = sorted(self.unread.items())
        if not news:
            self.term.say("[CLIENT]: No unread messages.")
        else:
            self.term.say(
                "[CLIENT]: Unread: "
                + ", ".join(f"{peer} ({n})" for peer, n in news)
                + "; /to USER to read and reply."
            )

    def _help(self, arg: str) -> None:
        if not arg:
            self.term.say(HELP)
            return
        name = "/" + arg.lower().lstrip("/")
        entry = COMMANDS.get(name)
        if entry is None:
            self.term.say(f"[CLIENT]: No command {C.sanitize(name, 32)}; type /help for the list.")
            return
        usage, summary, more = entry
        self.term.say(f"[CLIENT]: {usage}: {summary}." + (f"\n[CLIENT]: {more}" if more else ""))

    def _passwd(self) -> None:
        old = self.term.ask("[CLIENT]: Old password: ", secret=True)
        self.term.say(f"[CLIENT]: {PASSWORD_RULE}")
        for _ in range(MAX_PASSWORD_TRIES):
            new = self.term.ask("[CLIENT]: New password: ", secret=True)
            problem = password_problem(new)
            if problem is None:
                if self.term.ask("[CLIENT]: Confirm new password: ", secret=True) == new:
                    break
                problem = "The passwords do not match."
            self.term.say(f"[CLIENT]: {problem} Type the new password again.")
        else:
            self.term.say("[CLIENT]: The password was not changed.")
            return
        try:
            self.client.change_password(old, new)
        except InvalidCredentials:
            self.term.say("[CLIENT]: The old password is wrong; the password was not changed.")
        except (AuthError, ServiceUnavailable) as exc:
            self.term.say(f"[CLIENT]: {exc} The password was not changed.")
        else:
            self.term.say(
                "[CLIENT]: Password changed. Every saved login (session ticket) of your account has "
                "ended; use the new password from now on."
            )

    def _command(self, line: str) -> int | None:
        """Run a /command; returns an exit code to leave, or None to go on."""
        cmd, _, arg = line.partition(" ")
        cmd, arg = cmd.lower(), arg.strip()
        if cmd in USER_COMMANDS and not arg:
            self.term.say(f"[CLIENT]: Usage: {COMMANDS[cmd][0]} ({COMMANDS[cmd][1]})")
            return None
        if cmd == "/quit":
            return EXIT_OK
        if cmd == "/help":
            self._help(arg)
        elif cmd == "/who":
            self.client.who()
        elif cmd == "/unread":
            self._unread()
        elif cmd == "/pending":
            self._pending()
        elif cmd == "/rooms":
            self._rooms()
        elif cmd in ROOM_COMMANDS:
            self._room_command(cmd, arg)
        elif cmd == "/to":
            self._switch_to(arg)
        elif cmd == "/fingerprint":
            self.term.say(f"[CLIENT]: Server {self.client.server_id}: {self.client.server_fingerprint}")
            self.term.say(
                f"[CLIENT]: Your identity ({self.client.username}): {self.client.identity_fingerprint}"
            )
        elif cmd == "/passwd":
            self._passwd()
        elif cmd == "/history":
            self._history_command(arg)
        elif cmd == "/forget":
            self._forget(arg.lower())
        elif cmd == "/direct":
            try:
                self.client.open_direct(arg)
            except InvalidUsername as exc:
                self.term.say(f"[CLIENT]: {exc}")
        elif cmd == "/mode":
            peer = arg.lower()
            mode = "direct (peer to peer)" if self.client.is_direct(peer) else "relayed by the server"
            self.term.say(f"[CLIENT]: Conversation with {C.sanitize(peer, 64)}: {mode}.")
        elif cmd == "/delete-account":
            if self._delete_account():
                return EXIT_OK
        elif cmd in ("/verify", "/verified", "/accept"):
            self._identity_command(cmd, arg.lower())
        else:
            self.term.say(
                f"[CLIENT]: Unknown command {C.sanitize(cmd, 32)}; type /help (or //text to send "
                f"a line that starts with /)."
            )
        return None


def password_problem(password: str) -> str | None:
    """What is wrong with a new password, before it is sent (the server checks again)."""
    size = len(password.encode("utf-8"))
    if size < MIN_PASSWORD_BYTES:
        return f"Passwords must be at least {MIN_PASSWORD_BYTES} characters."
    if size > MAX_PASSWORD_BYTES:
        return f"Passwords must be at most {MAX_PASSWORD_BYTES} bytes."
    return None


class LoginWindow:
    """Watches the connection while a prompt of the login dialogue waits.

    Nothing reads the socket before login, so without this a server that ended the login at
    its login grace (server.py --login-grace, 120 s by default; it just closes) is noticed only
    after the user has typed a name and a password.  While a prompt waits, a thread waits on
    the socket (without reading: wait_hangup peeks); when the server has closed it, the thread
    interrupts the prompt, and the main thread says so and shows the prompt again with what
    was typed (only the main thread writes while prompt_toolkit runs).  The answer then
    reconnects (a new handshake) and the dialogue goes on where it was.  Each prompt has its
    own watcher and stop flag, set before the login reads the socket: a watcher still waiting
    then sees the server's answer, finds its flag set, and does nothing.
    """

    def __init__(self, client: C.ChatClient, term: Terminal) -> None:
        self.client, self.term = client, term
        self.opened_at = time.monotonic()
        self.lapsed = threading.Event()
        self._told = threading.Event()
        self._tell_lock = threading.Lock()

    def _wait(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.client.wait_hangup(LOGIN_WATCH_POLL_S):
                if stop.is_set():
                    return
                self.lapsed.set()
                if not self.term.interactive:  # plain lines: no prompt to interrupt, print it here
                    self._tell()
                    return
                while not self._told.is_set() and not stop.is_set():  # until the main thread has said it
                    self.term.interrupt(PromptInterrupted)
                    self._told.wait(LOGIN_WATCH_POLL_S)
                return

    def _tell(self) -> None:
        with self._tell_lock:
            if self._told.is_set():
                return
            self._told.set()
        self.term.say(
            f"[CLIENT]: The server closed the login after {round(time.monotonic() - self.opened_at)} s "
            "of waiting; press Enter to reconnect."
        )

    def ask(self, prompt: str, *, secret: bool = False) -> str:
        """The user's answer, on a live connection: one the server closed meanwhile is made again."""
        stop = threading.Event()
        threading.Thread(target=self._wait, args=(stop,), name="login-window", daemon=True).start()
        try:
            while True:
                try:
                    answer = self.term.ask(prompt, secret=secret)
                    break
                except PromptInterrupted:
                    self._tell()
        finally:
            stop.set()
        if self.lapsed.is_set():
            self._tell()
            self.client.connect()  # a new handshake; the server's key is checked again
            self.opened_at = time.monotonic()
            self.lapsed.clear()
            self._told.clear()
            self.term.say(f"[CLIENT]: Reconnected to {self.client.node_id}.")
        return answer


def _register(
    client: C.ChatClient, term: Terminal, username: str, password: str, window: LoginWindow
) -> bool:
    """Create the account; a short or mistyped password asks for the password again, not the name."""
    for _ in range(MAX_PASSWORD_TRIES):
        problem = password_problem(password)
        if problem is None:
            if window.ask("[CLIENT]: Confirm password: ", secret=True) == password:
                try:
                    client.register(username, password)
                except UsernameTaken:
                    term.say("[CLIENT]: That username is taken (so the password was wrong).")
                    return False
                except InvalidPassword as exc:
                    problem = str(exc)
                else:
                    term.say("[CLIENT]: Account created.")
                    return True
            else:
                problem = "The passwords do not match."
        term.say(f"[CLIENT]: {problem} Type the password again ({PASSWORD_RULE.lower()[:-1]}).")
        password = window.ask("[CLIENT]: Password: ", secret=True)
    term.say("[CLIENT]: The account was not created.")
    return False


def log_in(client: C.ChatClient, term: Terminal, *, username: str | None = None) -> bool:
    """The design-000 login dialogue; True once logged in.  ``username``: ask only its password
    first (logging in again after a refused ticket)."""
    return _login_dialogue(client, term, LoginWindow(client, term), username)


def _login_dialogue(client: C.ChatClient, term: Terminal, window: LoginWindow, known: str | None) -> bool:
    if known is None:
        term.say(f"[CLIENT]: Log in, or type a new name to create an account. {PASSWORD_RULE}")
    else:
        term.say(f"[CLIENT]: Log in again as {C.sanitize(known, 64)}.")
    for _ in range(MAX_LOGIN_ROUNDS):
        username, known = known or window.ask("[CLIENT]: Username: ").strip(), None
        if not username:
            continue
        password = window.ask("[CLIENT]: Password: ", secret=True)
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
        answer = window.ask(f"[CLIENT]: Create a new account named '{C.sanitize(username, 64)}'? (y/n): ")
        if answer.strip().lower() not in ("y", "yes"):
            continue
        try:
            if _register(client, term, username, password, window):
                return True
        except InvalidUsername as exc:
            term.say(f"[CLIENT]: {exc}")
    term.say("[CLIENT]: Too many attempts.")
    return False


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
    d = (lambda value: argparse.SUPPRESS) if sub else (lambda value: value)
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
        default=d(H.DEFAULT_MAX_PER_CONVERSATION),
        metavar="N",
        help="keep at most N messages per conversation",
    )
    p.add_argument(
        "--history-days",
        type=float,
        default=d(H.DEFAULT_MAX_AGE_DAYS),
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
    reconnect = (
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SecureIMError as exc:  # the last edge: a clear line, never a traceback
        print(f"[CLIENT]: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
