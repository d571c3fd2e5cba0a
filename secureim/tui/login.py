"""Logging in and registering at the terminal."""

from __future__ import annotations

import threading
import time

from secureim import client as C
from secureim.client import MAX_PASSWORD_BYTES
from secureim.errors import (
    AccountBanned,
    AccountLocked,
    AuthError,
    InvalidCredentials,
    InvalidPassword,
    InvalidUsername,
    UsernameTaken,
)
from secureim.tui.commands import (
    LOGIN_WATCH_POLL_S,
    MAX_LOGIN_ROUNDS,
    MAX_PASSWORD_TRIES,
    MIN_PASSWORD_BYTES,
    PASSWORD_RULE,
)
from secureim.tui.terminal import PromptInterrupted, Terminal


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
