"""The terminal itself: prompts, output above the input line, completion."""

from __future__ import annotations

import getpass
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from prompt_toolkit.completion import Completer, Completion

from secureim import client as C
from secureim.tui.commands import COMMANDS, USER_COMMANDS


class PromptInterrupted(Exception):
    """Another thread ended the prompt: the session needs the main thread (it ended, or its ticket was refused)."""


class LeaveChat(Exception):
    """The chat loop ends with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Terminal:
    """Prompts and output: prompt_toolkit on a terminal, plain lines otherwise."""

    def __init__(self, *, timestamps: bool = True, bell: bool = True) -> None:
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty()
        self.timestamps, self.bell = timestamps, bell
        self.completions: Callable[[], list[str]] = lambda: []  # (words) for Tab
        self._session: Any = (
            None  # login and destination prompts (a PromptSession): what was typed stays on screen
        )
        self._chat_session: Any = None  # the chat line: erased when sent, shown again as an output line
        self._kept: dict[int, str] = {}  # per prompt session: its text when interrupted, typed again for you
        # Output while prompts come and go (see write_above): the prompt on screen, from its first draw
        # until prompt() returns, as (session, app, loop); the text not written yet, oldest first.
        self._out_lock = threading.RLock()
        self._live: tuple[Any, Any, Any] | None = None
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
            self.write_above(text)

    def ring(self) -> None:
        if not self.bell:
            return
        if self._session is None:
            sys.stdout.write("\a")
            sys.stdout.flush()
        else:
            self.write_above("\a")

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
    def write_above(self, text: str) -> None:
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
            app._running_in_terminal_f = None  # noqa: SLF001 - prompt_toolkit has no public reset; its loop is closed: it would block every later one
            app._running_in_terminal = False  # noqa: SLF001 - the flag that goes with it (no public way)
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
    """sys.stdout and sys.stderr while the chat runs: whole lines go to Terminal.write_above."""

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
        self.term.write_above(text)
        return len(data)

    def flush(self) -> None:
        with self._lock:
            text, self._partial = "".join(self._partial), []
        if text:
            self.term.write_above(text)

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


def preview(text: str, width: int = 40) -> str:
    one = " ".join(C.sanitize_lines(text))
    return one if len(one) <= width else one[: width - 1] + shown_or("…", "...")


def shown_or(fancy: str, plain: str) -> str:
    try:
        fancy.encode(sys.stdout.encoding or "ascii")
        return fancy
    except (UnicodeEncodeError, LookupError):
        return plain


def arrow_glyph() -> str:
    return shown_or("→", "->")
