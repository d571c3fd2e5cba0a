"""``ChatUI``: the chat screen, its commands and what it shows for each event."""

from __future__ import annotations

import threading
import time

from secureim import client as C
from secureim.client import MAX_TEXT_BYTES
from secureim.errors import (
    AuthError,
    ConnectionClosed,
    InvalidCredentials,
    InvalidPassword,
    InvalidUsername,
    MessageRefused,
    ProtocolError,
    RoomError,
    ServiceUnavailable,
)
from secureim.tui.commands import (
    COMMANDS,
    DELETE_ANSWER_TIMEOUT_S,
    EXIT_ERROR,
    EXIT_OK,
    HELP,
    HISTORY_DEFAULT_LINES,
    MAX_PASSWORD_TRIES,
    MAX_QUEUED_LINES,
    PASSWORD_RULE,
    ROOM_COMMANDS,
    USER_COMMANDS,
)
from secureim.tui.login import password_problem
from secureim.tui.terminal import LeaveChat, PromptInterrupted, Terminal, arrow_glyph, preview, shown_or


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
        self.arrow = arrow_glyph()
        self.ellipsis = shown_or("…", "...")
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
            self._show_history(due, C.SHOWN_ON_OPEN, opening=True)

    def _describe(self, event) -> str | None:
        peer = C.sanitize(getattr(event, "peer", "") or "", 64)
        is_dest = peer == self.destination
        if isinstance(event, (C.RoomMessageReceived, C.RoomNotice, C.RoomWarning)):
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
            return f"[CLIENT]: Delivered to {peer}: {preview(event.text)}"
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
        if isinstance(event, C.RoomMessageReceived):
            sender = C.sanitize(event.sender, 64)
            mark = self._news_from(room)
            # Every line carries the room and the sender: a line inside cannot pass for another's.
            return "\n".join(f"{mark}[{room} {sender}]: {line}" for line in C.sanitize_lines(event.text))
        if isinstance(event, C.RoomWarning):
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
            except LeaveChat as leave:
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
        """The next line typed.  Raises LeaveChat when the session is over: lost for good, or a refused
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
            raise LeaveChat(EXIT_ERROR)
        while self.expired:
            answer = self.term.ask("[CLIENT]: Your session expired; log in again? (y/n): ").strip().lower()
            if answer not in ("y", "yes"):
                raise LeaveChat(EXIT_OK)
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
            name = C.normalize_username(name)
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
            self._show_history(name, C.SHOWN_ON_OPEN, opening=True)
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
            name = C.normalize_room(name)
            members = self.client.rooms.members(name)
        except RoomError as exc:
            with self._lock:
                self.unread.pop(
                    C.normalize_room(name) if C.ROOM_RE.fullmatch(name.strip().lower()) else name, None
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
            room = C.normalize_room(words[0])
            if cmd == "/create":
                rooms.create(room)
                self.term.say(
                    f"[CLIENT]: You created {room}; you are its admin. /invite {room} USER adds "
                    f"people, /to {room} talks there."
                )
            elif cmd == "/invite":
                user = C.normalize_username(words[1])
                rooms.invite(room, user)
                self.term.say(f"[CLIENT]: You added {user} to {room}.")
            elif cmd == "/remove":
                user = C.normalize_username(words[1])
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
                f"[CLIENT]:   {when} to {C.sanitize(entry.peer, 64)} ({entry.state}): {preview(entry.text)}"
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
            who = f"{self.client.username}{self.arrow}{shown}" if entry.direction == C.OUTGOING else shown
            mark = " (refused by the server: not delivered)" if entry.state == C.STATE_REFUSED else ""
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
