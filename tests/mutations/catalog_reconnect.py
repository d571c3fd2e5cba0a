"""Mutations of the terminal client that stays (issue 12 item 4): reconnect, the queue, the login window."""

from __future__ import annotations

from model import Mutation

_RC = "tests/cli/test_cli_reconnect.py"

MUTATIONS: list[Mutation] = [
    Mutation(
        name="terminal-exits-on-a-lost-connection",
        file="secureim/tui/main.py",
        find="        if stays\n",
        replace="        if False\n",
        tests=(
            f"{_RC}::test_sigkill_mid_chat_both_terminals_stay_reconnect_and_deliver_the_queued_line_once",
            f"{_RC}::test_the_terminal_keeps_trying_as_long_as_a_ticket_lives",
        ),
        why="the terminal client exits on a server restart: the next line the user types runs as a shell command.",
    ),
    Mutation(
        name="terminal-gives-up-at-the-library-bound",
        file="secureim/tui/commands.py",
        find="TERMINAL_RECONNECT_WINDOW_S = float(TICKET_LIFETIME_S)",
        replace="TERMINAL_RECONNECT_WINDOW_S = 60.0  # the library's RECONNECT_MAX_S",
        tests=(f"{_RC}::test_the_terminal_keeps_trying_as_long_as_a_ticket_lives",),
        why="the terminal gives up after a minute: a server down for longer ends every session.",
    ),
    Mutation(
        name="terminal-queue-drops-lines-typed-while-disconnected",
        file="secureim/client/waiting.py",
        find="                self.lines.append((peer, text))\n",
        replace="                pass\n",
        tests=(
            f"{_RC}::test_sigkill_mid_chat_both_terminals_stay_reconnect_and_deliver_the_queued_line_once",
        ),
        why="a line typed during the outage is said to be queued and silently never sent.",
    ),
    Mutation(
        name="terminal-queue-not-flushed-when-rekeyed",
        file="secureim/client/waiting.py",
        find="            self.flush(event.peer, say)\n",
        replace="            pass\n",
        tests=(
            f"{_RC}::test_sigkill_mid_chat_both_terminals_stay_reconnect_and_deliver_the_queued_line_once",
        ),
        why="queued lines wait forever: the conversation is keyed again but nothing is sent.",
    ),
    Mutation(
        name="terminal-prompt-interrupted-on-reconnect",
        file="secureim/tui/terminal.py",
        find="            self._kept[id(session)] = session.app.current_buffer.text\n",
        replace="            pass\n",
        tests=(f"{_RC}::test_a_refused_ticket_asks_to_log_in_again_and_no_ends_it",),
        why="an interrupted prompt loses what was typed: the half-typed chat line, or the name at the login prompt.",
    ),
    Mutation(
        name="terminal-refused-ticket-ends-without-asking",
        file="secureim/client/session.py",
        find='                self._account.forget_ticket()\n                return f"Reconnecting failed: {exc}"',
        replace='                return f"Reconnecting failed: {exc}"',
        tests=(f"{_RC}::test_a_refused_ticket_asks_to_log_in_again_and_no_ends_it",),
        why="an expired or refused ticket ends the terminal with an error instead of offering a login.",
    ),
    Mutation(
        name="terminal-login-window-not-watched",
        file="secureim/tui/login.py",
        find='threading.Thread(target=self._wait, args=(stop,), name="login-window", daemon=True).start()',
        replace="pass",
        tests=(f"{_RC}::test_the_login_window_says_at_once_when_the_server_closed_it",),
        why="the server's login grace ends silently: the user learns it only after typing name and password.",
    ),
    Mutation(
        name="server-login-grace-30-s",
        file="secureim/server/config.py",
        find="    login_grace_s: float = 120.0 ",
        replace="    login_grace_s: float = 30.0 ",
        tests=(f"{_RC}::test_the_login_grace_is_openssh_s_120_s",),
        why="a person at the Username prompt loses the login after 30 s (issue 12 asks for OpenSSH's 120 s).",
    ),
]
