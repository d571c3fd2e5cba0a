"""``ChatUI``: the chat screen, its commands and what it shows for each event."""

from __future__ import annotations

import threading

from secureim import client as C
from secureim.client import MAX_TEXT_BYTES
from secureim.errors import (
    ConnectionClosed,
    MessageRefused,
    ProtocolError,
    RoomError,
)
from secureim.tui.actions import ChatCommands
from secureim.tui.commands import (
    EXIT_ERROR,
    EXIT_OK,
    MAX_QUEUED_LINES,
)
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
        self.lock = threading.Lock()
        self.unread: dict[str, int] = {}
        self.online: set[str] = set()
        self.deleted = False
        self.history_due: str | None = None  # the destination whose last lines follow its status
        self.deletion_answered = threading.Event()
        # A lost connection: the client's waiting lines (C.ChatClient.waiting) know it is away until
        # Reconnected; then each conversation waits for its ConversationReady, lines typed meanwhile
        # wait there, in order.
        self.expired = False  # the ticket was refused: the main thread asks to log in again
        self.commands = ChatCommands(self)
        self._printer = self._new_printer()
        term.completions = self._names

    @property
    def offline(self) -> bool:
        return self.client.waiting.away

    def _new_printer(self) -> threading.Thread:
        return threading.Thread(target=self._print_events, args=(self.client,), name="events", daemon=True)

    def _names(self) -> list[str]:
        with self.lock:
            names = self.online | set(self.unread)
        names |= set(self.client.open_conversations()) | set(self.client.rooms.my_rooms())
        names.discard(self.client.username or "")
        return sorted(names)

    def prompt(self) -> str:
        with self.lock:
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
                self.deletion_answered.set()
                continue
            if isinstance(event, C.Disconnected) and self.deleted:
                return  # the server closes after a deletion: a normal end
            if isinstance(event, C.Disconnected):
                client.waiting.note_lost()
                with self.lock:
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
            client.waiting.after_event(event, self._say_outcome)

    def _history_after_status(self, event) -> None:
        if not isinstance(event, (C.PeerOnline, C.PeerOffline, C.PeerUnknown)):
            return
        with self.lock:
            due = self.history_due
            if due != event.peer:
                return
            self.history_due = None
        if not isinstance(event, C.PeerUnknown):
            self.commands.show_history(due, C.SHOWN_ON_OPEN, opening=True)

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
            with self.lock:
                self.online.add(peer)
            return "[CLIENT]: Destination user is online." if is_dest else f"[CLIENT]: {peer} is online."
        if isinstance(event, C.PeerOffline):
            with self.lock:
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
            with self.lock:
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
            with self.lock:
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
            self.client.waiting.note_lost()
            if event.attempt != 1:  # one line per outage, not one per try
                return None
            return f"[CLIENT]: Connection lost ({C.sanitize(event.reason, 200).rstrip('.')}); reconnecting{self.ellipsis}"
        if isinstance(event, C.Reconnected):
            self.client.waiting.note_reconnected(self.destination)  # each conversation is keyed anew
            return f"[CLIENT]: Reconnected to {C.sanitize(event.server, 300)}."
        return None

    def _news_from(self, where: str) -> str:
        """A message from ``where`` (a user or a #room): marked, counted and rung when it is not
        the current destination."""
        if self.destination is None or where == self.destination:
            return ""
        with self.lock:
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
            return line + self.commands.room_gone(room)
        if event.joined:
            line += f" Type /to {room} to talk there."
        return line

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
            unsent = self.client.waiting.unsent()
            if unsent:
                self.term.say(f"[CLIENT]: {unsent} queued line(s) were not sent.")
            return code

    def _chat(self) -> int:
        while self.destination is None:
            name = self._read("[CLIENT]: Destination: ").strip()
            if name.startswith("/"):
                if self.commands.command(name) is not None:
                    return EXIT_OK
            elif name:
                self.commands.switch_to(name)
        while True:
            line = self._read(self.prompt, chat=True)
            try:
                if line.startswith("//"):
                    self._send(line[1:])
                elif line.startswith("/"):
                    if self.commands.command(line.strip()) is not None:
                        return EXIT_OK
                elif line.strip() and self.destination is None:
                    self.commands.switch_to(line.strip())  # asked for a destination again (a room went)
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
        old, self.client = self.client, client
        peers = client.waiting.take_over(old.waiting, self.destination)
        with self.lock:
            self.expired = False
        self._printer = self._new_printer()
        self._printer.start()
        for peer in peers:
            try:
                client.open_conversation(peer)
            except ConnectionClosed:
                break  # lost again: the reconnect reopens what it wanted
        if self.destination is not None:
            self.term.say(f"[CLIENT]: Now talking to {C.sanitize(self.destination, 64)}.")

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

    def _say_outcome(self, outcome: C.LineOutcome) -> None:
        """What happened to a line (the client's waiting lines decide; the words are the terminal's)."""
        peer, kind = outcome.peer, outcome.kind
        if kind == "sent":
            self._echo(peer, outcome.text)
        elif kind == "refused":
            self.term.say(f"[CLIENT]: Not sent: {C.sanitize(outcome.text, 300)}")
        elif kind == "too-long":
            self.term.say(f"[CLIENT]: {outcome.text}")
        elif kind == "full":
            self.term.say(f"[CLIENT]: Not sent: {MAX_QUEUED_LINES} lines are already waiting to be sent.")
        elif kind == "queued-away":
            self.term.say("[CLIENT]: Queued (not connected); it will be sent after reconnecting.")
        elif kind == "queued-not-ready":
            self.term.say(
                f"[CLIENT]: Queued (the conversation with {C.sanitize(peer, 64)} is not ready yet); "
                "it will be sent when it is."
            )
        elif kind == "dropped":
            self.term.say(
                f"[CLIENT]: {outcome.count} queued line(s) for {C.sanitize(peer, 64)} were not sent."
            )

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
        waiting = self.client.waiting
        if waiting.must_queue(dest):
            waiting.queue(dest, text, self._say_outcome)
            return
        shown = C.sanitize(dest, 64)
        # Right after /to the key exchange may still be running: wait for it (bounded), never drop the line.
        if not self.client.has_conversation(dest) and not self.client.wait_conversation(dest):
            if waiting.must_queue(dest):  # the connection dropped meanwhile
                waiting.queue(dest, text, self._say_outcome)
                return
            presence = self.client.presence(dest)
            if presence == C.PRESENCE_OFFLINE:  # stored for them (sealed from their prekeys)
                waiting.hand_over(dest, text, self._say_outcome, offline=True)
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
        waiting.hand_over(dest, text, self._say_outcome)
