"""Mutations of the terminal client's display defences and of /passwd (issue 14)."""

from __future__ import annotations

from model import Mutation

_UX = "tests/cli/test_cli_ux.py"

MUTATIONS: list[Mutation] = [
    Mutation(
        name="client-sanitize-keeps-format-controls",
        file="secureim/client/display.py",
        find='        if cat in ("Cc", "Zl", "Zp", "Co", "Cs", "Cn") or (\n            cat == "Cf" and ord(ch) not in HARMLESS_FORMAT_CHARS\n        ):\n',
        replace='        if cat in ("Cc", "Zl", "Zp", "Co", "Cs", "Cn") or False:\n',
        tests=(
            f"{_UX}::test_sanitize_never_lets_a_control_or_bidi_character_through",
            f"{_UX}::test_bug5_emoji_with_zero_width_joiners_are_kept_and_bidi_is_not",
        ),
        why="bidi overrides and isolates reach the terminal: a peer reorders what is shown (Trojan Source).",
    ),
    Mutation(
        name="client-sanitize-bidi-allowed",
        file="secureim/client/display.py",
        find="HARMLESS_FORMAT_CHARS = frozenset({0x00AD, 0x200C, 0x200D, 0x2060}) | frozenset(range(0xE0020, 0xE0080))\n",
        replace="HARMLESS_FORMAT_CHARS = frozenset(\n    {0x00AD, 0x200C, 0x200D, 0x2060, 0x200F, 0x202E, 0x2066, 0x2069}\n) | frozenset(range(0xE0020, 0xE0080))\n",
        tests=(
            f"{_UX}::test_sanitize_never_lets_a_control_or_bidi_character_through",
            f"{_UX}::test_bug5_emoji_with_zero_width_joiners_are_kept_and_bidi_is_not",
        ),
        why="the allow-list of harmless format characters grows to bidi controls: a peer reorders text.",
    ),
    Mutation(
        name="client-sanitize-keeps-c0-c1",
        file="secureim/client/display.py",
        find='        if cat in ("Cc", "Zl", "Zp", "Co", "Cs", "Cn") or (\n            cat == "Cf" and ord(ch) not in HARMLESS_FORMAT_CHARS\n        ):\n',
        replace='        if cat in ("Zl", "Zp", "Co", "Cs", "Cn") or (cat == "Cf" and ord(ch) not in HARMLESS_FORMAT_CHARS):\n',
        tests=(
            f"{_UX}::test_sanitize_never_lets_a_control_or_bidi_character_through",
            f"{_UX}::test_bug5_emoji_with_zero_width_joiners_are_kept_and_bidi_is_not",
        ),
        why="ESC, CR and C1 controls reach the terminal: a peer clears the screen or rewrites lines.",
    ),
    Mutation(
        name="client-multiline-first-line-prefixed-only",
        file="secureim/tui/app.py",
        find='return "\\n".join(f"{mark}[{peer}]: {line}" for line in C.sanitize_lines(event.text))',
        replace='return f"{mark}[{peer}]: " + "\\n".join(C.sanitize_lines(event.text))',
        tests=(f"{_UX}::test_bug4_a_multi_line_paste_is_shown_as_lines_each_with_the_sender",),
        why="only the first line of a message names its sender: a second line can pass for '[bob]: ...'.",
    ),
    Mutation(
        name="client-lines-keep-carriage-return",
        file="secureim/client/display.py",
        find='    return [sanitize(line, max_chars) for line in text[:max_chars].replace("\\r\\n", "\\n").split("\\n")]\n',
        replace='    return [\n        sanitize(line, max_chars).replace("\\\\x0d", "\\r")\n        for line in text[:max_chars].replace("\\r\\n", "\\n").split("\\n")\n    ]\n',
        tests=(f"{_UX}::test_sanitize_never_lets_a_control_or_bidi_character_through",),
        why="a bare CR inside a line returns the cursor and overwrites the sender's prefix.",
    ),
    Mutation(
        name="passwd-old-tickets-still-resume",
        file="secureim/server/logins.py",
        find="if epoch != self.storage.get_ticket_epoch(username):",
        replace="if False:",
        tests=(
            f"{_UX}::test_passwd_ends_every_resumption_ticket",
            "tests/integration/test_admin.py::test_reset_password_ends_tickets_and_the_old_password",
        ),
        why="a password change or an administrator's reset leaves earlier tickets valid: a stolen client keeps the account for 12 hours.",
    ),
    Mutation(
        name="passwd-old-password-unchecked",
        file="secureim/server/accounts.py",
        find="        self.login(username, old_password, source)\n",
        replace="        pass\n",
        tests=(f"{_UX}::test_passwd_changes_the_password_and_keeps_the_identity",),
        why="anyone at an unlocked terminal changes the password without knowing it, and locks the owner out.",
    ),
    Mutation(
        name="passwd-identity-not-resealed",
        file="secureim/client/account.py",
        find="            self.identities.save(self.username, new_password, self.identity)\n",
        replace="            pass\n",
        tests=(f"{_UX}::test_passwd_changes_the_password_and_keeps_the_identity",),
        why="the identity key stays sealed under the old password: the next login makes a new key and "
        "every peer sees a key-change warning (and learns to click through it).",
    ),
]
