"""The chat screen's slash commands (``/to``, ``/history``, ``/passwd``, rooms, identities...).

``ChatCommands`` belongs to one :class:`secureim.tui.app.ChatUI` (the screen and the event printer
stay there) and sees it through the ``ChatView`` Protocol.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from secureim import client as C
from secureim.errors import (
    AuthError,
    ConnectionClosed,
    InvalidCredentials,
    InvalidPassword,
    InvalidUsername,
    RoomError,
    ServiceUnavailable,
)
from secureim.tui.commands import (
    COMMANDS,
    DELETE_ANSWER_TIMEOUT_S,
    EXIT_OK,
    HELP,
    HISTORY_DEFAULT_LINES,
    MAX_PASSWORD_TRIES,
    PASSWORD_RULE,
    ROOM_COMMANDS,
    USER_COMMANDS,
)
from secureim.tui.login import password_problem
from secureim.tui.terminal import Terminal, preview


class ChatView(Protocol):
    """What the commands read and change of the chat screen (secureim.tui.app.ChatUI)."""

    client: C.ChatClient
    term: Terminal
    destination: str | None
    arrow: str
    unread: dict[str, int]
    deleted: bool
    lock: threading.Lock
    history_due: str | None
    deletion_answered: threading.Event


class ChatCommands:
    """The slash commands of one chat screen (``ui``), which it reads and updates through ``ChatView``."""

    def __init__(self, ui: ChatView) -> None:
        self.ui = ui

    def room_gone(self, room: str) -> str:
        """This client is no longer in ``room``: its unread mark goes, and if it was the destination
        the prompt asks for another.  Returns what to add to the notice."""
        with self.ui.lock:
            self.ui.unread.pop(room, None)
        if self.ui.destination != room:
            return ""
        self.ui.destination = None
        self.ui.term.refresh()
        return "\n[CLIENT]: Choose a destination: a USER or a #ROOM."

    def _identity_command(self, cmd: str, peer: str) -> None:
        shown = C.sanitize(peer, 64)
        if cmd == "/verify":
            number = self.ui.client.safety_number(peer)
            if number is None:
                self.ui.term.say(f"[CLIENT]: You have no key for {shown} yet; open a conversation first.")
                return
            state = "verified" if self.ui.client.is_verified(peer) else "not verified"
            self.ui.term.say(f"[CLIENT]: Safety number with {shown} ({state}):")
            self.ui.term.say(f"[CLIENT]:     {number}")
            self.ui.term.say(
                f"[CLIENT]: Compare it with {shown} in person or by phone; if it matches, type "
                f"/verified {shown}."
            )
        elif cmd == "/verified":
            ok = self.ui.client.mark_verified(peer)
            self.ui.term.say(
                f"[CLIENT]: {shown} is now marked as verified."
                if ok
                else f"[CLIENT]: You have no key for {shown} to verify."
            )
        else:
            ok = self.ui.client.accept_identity(peer, reopen=False)
            self.ui.term.say(
                f"[CLIENT]: Accepted {shown}'s new identity key; reopening the conversation."
                if ok
                else f"[CLIENT]: {shown}'s identity key has not changed; nothing to accept."
            )
            if ok:  # said first: the "Conversation ... is ready" line it brings comes after it
                self.ui.client.open_conversation(peer)

    def _delete_account(self) -> bool:
        """True once the server has deleted the account (the client then leaves)."""
        me = self.ui.client.username or ""
        self.ui.term.say("[CLIENT]: This deletes your account on the server for good.")
        password = self.ui.term.ask("[CLIENT]: Password: ", secret=True)
        typed = self.ui.term.ask(f"[CLIENT]: Type your username ({me}) to confirm: ").strip()
        if typed != me:
            self.ui.term.say("[CLIENT]: Not confirmed; nothing was deleted.")
            return False
        self.ui.deletion_answered.clear()
        try:
            self.ui.client.delete_account(password, typed)
        except InvalidPassword as exc:
            self.ui.term.say(f"[CLIENT]: {exc}")
            return False
        if not self.ui.deletion_answered.wait(DELETE_ANSWER_TIMEOUT_S):
            self.ui.term.say("[CLIENT]: The server did not answer; your account may not be deleted.")
        return self.ui.deleted

    def switch_to(self, name: str) -> None:
        if name.strip().startswith("#"):
            self._switch_to_room(name)
            return
        try:
            name = C.normalize_username(name)
        except InvalidUsername as exc:
            self.ui.term.say(f"[CLIENT]: {exc}")
            return
        if name == self.ui.client.username:
            self.ui.term.say("[CLIENT]: That is you; choose someone else.")
            return
        self.ui.destination = name
        with self.ui.lock:
            self.ui.unread.pop(name, None)
        if self.ui.client.has_conversation(name):
            # The design's answer to a destination is always its status first (scripts rely on it).
            self.ui.term.say("[CLIENT]: Destination user is online.")
            self.ui.term.say(f"[CLIENT]: Now talking to {C.sanitize(name, 64)}.")
            self.show_history(name, C.SHOWN_ON_OPEN, opening=True)
        else:
            with self.ui.lock:
                self.ui.history_due = name  # shown after the server's answer, which comes first
            try:
                self.ui.client.open_conversation(name)
            except ConnectionClosed:  # asked for again by the reconnect (it reopens what is wanted)
                self.ui.term.say(
                    f"[CLIENT]: Now talking to {C.sanitize(name, 64)}; the conversation opens once "
                    "reconnected."
                )

    def _switch_to_room(self, name: str) -> None:
        try:
            name = C.normalize_room(name)
            members = self.ui.client.rooms.members(name)
        except RoomError as exc:
            with self.ui.lock:
                self.ui.unread.pop(
                    C.normalize_room(name) if C.ROOM_RE.fullmatch(name.strip().lower()) else name, None
                )
            self.ui.term.say(f"[CLIENT]: {exc}")
            return
        self.ui.destination = name
        with self.ui.lock:
            self.ui.unread.pop(name, None)
        self.ui.term.say(f"[CLIENT]: Now talking in {name} ({len(members)} members: {', '.join(members)}).")

    def _room_command(self, cmd: str, arg: str) -> None:
        rooms = self.ui.client.rooms
        words = arg.split()
        need = 2 if cmd in ("/invite", "/remove") else 1
        if len(words) != need:
            self.ui.term.say(f"[CLIENT]: Usage: {COMMANDS[cmd][0]} ({COMMANDS[cmd][1]})")
            return
        try:
            room = C.normalize_room(words[0])
            if cmd == "/create":
                rooms.create(room)
                self.ui.term.say(
                    f"[CLIENT]: You created {room}; you are its admin. /invite {room} USER adds "
                    f"people, /to {room} talks there."
                )
            elif cmd == "/invite":
                user = C.normalize_username(words[1])
                rooms.invite(room, user)
                self.ui.term.say(f"[CLIENT]: You added {user} to {room}.")
            elif cmd == "/remove":
                user = C.normalize_username(words[1])
                rooms.remove(room, user)
                self.ui.term.say(
                    f"[CLIENT]: You removed {user} from {room}; what is said there from now on is "
                    "sealed under new keys they do not have."
                )
            elif cmd == "/leave":
                self.ui.term.say(f"[CLIENT]: {rooms.leave(room)}{self.room_gone(room)}")
            else:
                members = rooms.members(room)
                admin = rooms.admin_of(room)
                self.ui.term.say(
                    f"[CLIENT]: {room} ({len(members)}): "
                    + ", ".join(f"{m} (admin)" if m == admin else m for m in members)
                )
        except (RoomError, InvalidUsername, ConnectionClosed) as exc:
            self.ui.term.say(f"[CLIENT]: {C.sanitize(str(exc), 300)}")

    def _rooms(self) -> None:
        mine = self.ui.client.rooms.summary()
        if not mine:
            self.ui.term.say("[CLIENT]: You are in no rooms; /create #ROOM makes one.")
            return
        self.ui.term.say("[CLIENT]: Your rooms: " + ", ".join(f"{r} ({n})" for r, n in mine))

    def _pending(self) -> None:
        waiting = self.ui.client.pending()
        if not waiting:
            self.ui.term.say("[CLIENT]: Every message you sent this session has been delivered.")
            return
        self.ui.term.say(f"[CLIENT]: Not delivered yet ({len(waiting)}):")
        for entry in waiting:
            when = time.strftime("%H:%M", time.localtime(entry.at))
            self.ui.term.say(
                f"[CLIENT]:   {when} to {C.sanitize(entry.peer, 64)} ({entry.state}): {preview(entry.text)}"
            )

    def show_history(self, peer: str, limit: int, *, opening: bool = False) -> None:
        """The last ``limit`` lines with ``peer``, each with its own date and time."""
        if self.ui.client.history is None:
            if not opening:
                self.ui.term.say(
                    "[CLIENT]: No history is kept in this session (--no-history, or it could not be opened)."
                )
            return
        page = self.ui.client.history_page(peer, limit)
        shown = C.sanitize(peer, 64)
        if not page.entries:
            if not opening:
                self.ui.term.say(f"[CLIENT]: No history with {shown}.")
            return
        self.ui.term.say(f"[CLIENT]: Earlier with {shown} (last {len(page.entries)}):")
        today = time.strftime("%Y-%m-%d")
        lines = []
        for entry in page.entries:
            day = time.strftime("%Y-%m-%d", time.localtime(entry.at))
            when = time.strftime("%H:%M" if day == today else "%Y-%m-%d %H:%M", time.localtime(entry.at))
            who = (
                f"{self.ui.client.username}{self.ui.arrow}{shown}" if entry.direction == C.OUTGOING else shown
            )
            mark = " (refused by the server: not delivered)" if entry.state == C.STATE_REFUSED else ""
            lines += [f"  {when} [{who}]: {line}{mark}" for line in C.sanitize_lines(entry.text)]
        self.ui.term.say("\n".join(lines), stamped=False)
        if page.damaged:
            self.ui.term.say(
                f"[CLIENT]: {page.damaged} line(s) of the history failed their integrity check and "
                "were not shown."
            )

    def _history_command(self, arg: str) -> None:
        if self.ui.destination is None:
            self.ui.term.say("[CLIENT]: Choose a conversation first: /to USER")
            return
        if self.ui.destination.startswith("#"):
            self.ui.term.say(
                "[CLIENT]: The local history keeps one-to-one conversations only; rooms are not kept."
            )
            return
        if arg and not (arg.isdigit() and 1 <= int(arg) <= 10_000):
            self.ui.term.say("[CLIENT]: Usage: /history [N], N from 1 to 10000.")
            return
        self.show_history(self.ui.destination, int(arg) if arg else HISTORY_DEFAULT_LINES)

    def _forget(self, peer: str) -> None:
        if peer.startswith("#"):
            self.ui.term.say(
                "[CLIENT]: The local history keeps one-to-one conversations only; rooms are not kept."
            )
            return
        shown = C.sanitize(peer, 64)
        if self.ui.client.history is None:
            self.ui.term.say("[CLIENT]: No history is kept in this session; nothing to forget.")
            return
        try:
            count = self.ui.client.forget(peer)
        except InvalidUsername as exc:
            self.ui.term.say(f"[CLIENT]: {exc}")
            return
        self.ui.term.say(f"[CLIENT]: Erased the history with {shown} ({count} message(s)).")

    def _unread(self) -> None:
        with self.ui.lock:
            news = sorted(self.ui.unread.items())
        if not news:
            self.ui.term.say("[CLIENT]: No unread messages.")
        else:
            self.ui.term.say(
                "[CLIENT]: Unread: "
                + ", ".join(f"{peer} ({n})" for peer, n in news)
                + "; /to USER to read and reply."
            )

    def _help(self, arg: str) -> None:
        if not arg:
            self.ui.term.say(HELP)
            return
        name = "/" + arg.lower().lstrip("/")
        entry = COMMANDS.get(name)
        if entry is None:
            self.ui.term.say(f"[CLIENT]: No command {C.sanitize(name, 32)}; type /help for the list.")
            return
        usage, summary, more = entry
        self.ui.term.say(f"[CLIENT]: {usage}: {summary}." + (f"\n[CLIENT]: {more}" if more else ""))

    def _passwd(self) -> None:
        old = self.ui.term.ask("[CLIENT]: Old password: ", secret=True)
        self.ui.term.say(f"[CLIENT]: {PASSWORD_RULE}")
        for _ in range(MAX_PASSWORD_TRIES):
            new = self.ui.term.ask("[CLIENT]: New password: ", secret=True)
            problem = password_problem(new)
            if problem is None:
                if self.ui.term.ask("[CLIENT]: Confirm new password: ", secret=True) == new:
                    break
                problem = "The passwords do not match."
            self.ui.term.say(f"[CLIENT]: {problem} Type the new password again.")
        else:
            self.ui.term.say("[CLIENT]: The password was not changed.")
            return
        try:
            self.ui.client.change_password(old, new)
        except InvalidCredentials:
            self.ui.term.say("[CLIENT]: The old password is wrong; the password was not changed.")
        except (AuthError, ServiceUnavailable) as exc:
            self.ui.term.say(f"[CLIENT]: {exc} The password was not changed.")
        else:
            self.ui.term.say(
                "[CLIENT]: Password changed. Every saved login (session ticket) of your account has "
                "ended; use the new password from now on."
            )

    def command(self, line: str) -> int | None:
        """Run a /command; returns an exit code to leave, or None to go on."""
        cmd, _, arg = line.partition(" ")
        cmd, arg = cmd.lower(), arg.strip()
        if cmd in USER_COMMANDS and not arg:
            self.ui.term.say(f"[CLIENT]: Usage: {COMMANDS[cmd][0]} ({COMMANDS[cmd][1]})")
            return None
        if cmd == "/quit":
            return EXIT_OK
        if cmd == "/help":
            self._help(arg)
        elif cmd == "/who":
            self.ui.client.who()
        elif cmd == "/unread":
            self._unread()
        elif cmd == "/pending":
            self._pending()
        elif cmd == "/rooms":
            self._rooms()
        elif cmd in ROOM_COMMANDS:
            self._room_command(cmd, arg)
        elif cmd == "/to":
            self.switch_to(arg)
        elif cmd == "/fingerprint":
            self.ui.term.say(
                f"[CLIENT]: Server {self.ui.client.server_id}: {self.ui.client.server_fingerprint}"
            )
            self.ui.term.say(
                f"[CLIENT]: Your identity ({self.ui.client.username}): {self.ui.client.identity_fingerprint}"
            )
        elif cmd == "/passwd":
            self._passwd()
        elif cmd == "/history":
            self._history_command(arg)
        elif cmd == "/forget":
            self._forget(arg.lower())
        elif cmd == "/direct":
            try:
                self.ui.client.open_direct(arg)
            except InvalidUsername as exc:
                self.ui.term.say(f"[CLIENT]: {exc}")
        elif cmd == "/mode":
            peer = arg.lower()
            mode = "direct (peer to peer)" if self.ui.client.is_direct(peer) else "relayed by the server"
            self.ui.term.say(f"[CLIENT]: Conversation with {C.sanitize(peer, 64)}: {mode}.")
        elif cmd == "/delete-account":
            if self._delete_account():
                return EXIT_OK
        elif cmd in ("/verify", "/verified", "/accept"):
            self._identity_command(cmd, arg.lower())
        else:
            self.ui.term.say(
                f"[CLIENT]: Unknown command {C.sanitize(cmd, 32)}; type /help (or //text to send "
                f"a line that starts with /)."
            )
        return None
