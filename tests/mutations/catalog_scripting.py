"""Mutations of the scriptable client, the encrypted history (issue 15) and client failover (issue 11.5)."""

from __future__ import annotations

from model import Mutation

_H = "tests/unit/client/test_history.py"
_S = "tests/integration/test_scripting.py"
_F = "tests/integration/test_failover.py"

MUTATIONS: list[Mutation] = [
    Mutation(
        name="history-delivered-overwritten",
        file="secureim/client/history.py",
        find="            if entry.state == STATE_DELIVERED and state != STATE_DELIVERED:\n",
        replace="            if False:\n",
        tests=(f"{_H}::test_rows_come_back_in_order_with_direction_time_and_state",),
        why="a store answer handled after the peer's receipt writes 'accepted' over 'delivered': the history "
        "says a message the peer has read was never confirmed.",
    ),
    Mutation(
        name="history-shown-in-write-order",
        file="secureim/client/history.py",
        find='"WHERE conversation = ? ORDER BY at_ms DESC, id DESC LIMIT ?",',
        replace='"WHERE conversation = ? ORDER BY id DESC LIMIT ?",',
        tests=(f"{_H}::test_an_answer_written_before_its_question_is_still_shown_after_it",),
        why="rows shown in the order they were written: a reply that came in before the sender's own row "
        "was written is shown above the question it answers.",
    ),
    Mutation(
        name="history-sent-row-dated-after-it-left",
        file="secureim/client/sending.py",
        find="        return self.record_sent(entry, at=sent_at)",
        replace="        return self.record_sent(entry, at=time.time())",
        tests=("tests/unit/client/test_sending.py",),
        why="a live message dated when its row is written, not when it left: under load the peer's reply "
        "is older and the history shows the answer before the question.",
    ),
    Mutation(
        name="history-rows-in-plaintext",
        file="secureim/client/history.py",
        find="sealed = self._content.seal(raw, self._aad(tag, at_ms))",
        replace="sealed = bytes(cu.SEALED_BOX_NONCE_BYTES) + raw",
        tests=(
            f"{_H}::test_the_file_holds_no_plaintext_and_is_private",
            f"{_S}::test_history_survives_quit_holds_no_plaintext_and_needs_the_password",
        ),
        why="the history file holds every message in the clear: anyone who copies the home folder reads them.",
    ),
    Mutation(
        name="history-aad-without-conversation-and-time",
        file="secureim/client/history.py",
        find='return len(self._owner).to_bytes(2, "big") + self._owner + tag + at_ms.to_bytes(8, "big")',
        replace='return len(self._owner).to_bytes(2, "big") + self._owner',
        tests=(f"{_H}::test_a_row_moved_to_another_conversation_or_time_is_not_shown",),
        why="a row's time (and conversation) is not bound to its ciphertext: someone with the file "
        "re-dates or reorders what was said.",
    ),
    Mutation(
        name="history-key-not-from-the-password",
        file="crypto_utils.py",  # the one keystore derivation (PasswordSeal), which the history uses
        find='    return Scrypt(salt=salt, length=AES_KEY_BYTES, n=params.n, r=params.r, p=params.p).derive(\n        password.encode("utf-8")\n    )\n',
        replace='    return Scrypt(salt=salt, length=AES_KEY_BYTES, n=params.n, r=params.r, p=params.p).derive(b"")\n',
        tests=(
            f"{_H}::test_a_wrong_password_cannot_open_it_and_the_right_one_can",
            f"{_S}::test_history_survives_quit_holds_no_plaintext_and_needs_the_password",
        ),
        why="the history's key does not depend on the password: any password (or none) opens it.",
    ),
    Mutation(
        name="history-key-not-bound-to-owner",
        file="secureim/client/history.py",
        find='owner = f"{username}@{service_id}".encode()',
        replace='owner = b""',
        tests=(f"{_H}::test_another_users_file_does_not_open_as_mine",),
        why="the sealed data key and the rows are not bound to their user and service: a file planted "
        "under another name opens as that user's history.",
    ),
    Mutation(
        name="history-not-resealed-on-passwd",
        file="secureim/client/chat.py",
        find="            self.history.change_password(new_password)\n",
        replace="            pass\n",
        tests=(f"{_H}::test_passwd_reseals_the_history_and_a_foreign_seal_is_said_not_overwritten",),
        why="after /passwd the history stays sealed under the old password: the next login cannot open it "
        "and the user loses it (or learns to delete it).",
    ),
    Mutation(
        name="client-no-history-still-writes",
        file="secureim/tui/main.py",
        find="            history=not args.no_history,\n",
        replace="            history=True,\n",
        tests=(f"{_S}::test_no_history_leaves_no_file_and_forget_erases",),
        why="--no-history (incognito) still writes the conversation to disk.",
    ),
    Mutation(
        name="client-password-argument-accepted",
        file="secureim/tui/main.py",
        find="    if args.password is not None:\n        parser.error(",
        replace="    if False:\n        parser.error(",
        tests=(f"{_S}::test_usage_errors_are_exit_2",),
        why="a password given on the command line is used: every user of the machine reads it in ps.",
    ),
    Mutation(
        name="client-password-file-readable-by-others",
        file="secureim/client/scripting.py",
        find="if mode & (stat.S_IRWXG | stat.S_IRWXO):",
        replace="if False:",
        tests=(f"{_S}::test_usage_errors_are_exit_2",),
        why="a password file other users can read is accepted, so the password leaks without a word.",
    ),
    Mutation(
        name="client-exit-code-key-mismatch",
        file="secureim/client/scripting.py",
        find="    if isinstance(exc, ServerKeyMismatch):\n        return EXIT_KEY_MISMATCH\n",
        replace="    if isinstance(exc, ServerKeyMismatch):\n        return EXIT_ERROR\n",
        tests=(f"{_S}::test_a_changed_server_key_gives_exit_3_and_sends_nothing",),
        why="a script cannot tell a possible man in the middle (exit 3) from a network hiccup and retries.",
    ),
    Mutation(
        name="client-exit-code-login-failed",
        file="secureim/client/scripting.py",
        find="    if isinstance(exc, AuthError):\n        return EXIT_LOGIN_FAILED\n",
        replace="    if isinstance(exc, AuthError):\n        return EXIT_ERROR\n",
        tests=(f"{_S}::test_a_wrong_password_gives_exit_4",),
        why="a wrong password looks like a network error (exit 1): a script retries it into a lockout.",
    ),
    Mutation(
        name="client-send-ignores-refusal",
        file="secureim/client/sending.py",
        find="        if barrier.refusals:\n            raise MessageRefused(",
        replace="        if False:\n            raise MessageRefused(",
        tests=(f"{_F}::test_send_confirmed_reports_the_servers_refusal",),
        why="send reports success (exit 0) for a message the server refused: the alert never arrived.",
    ),
    Mutation(
        name="client-json-not-ascii",
        file="secureim/client/scripting.py",
        find="                self._write(self.out, json.dumps(doc))",
        replace="                self._write(self.out, json.dumps(doc, ensure_ascii=False))",
        tests=(f"{_S}::test_receive_count_1_json_prints_one_valid_object",),
        why="a peer's bidi override reaches the terminal raw through --json output shown to a person.",
    ),
    Mutation(
        name="failover-pin-per-node",
        file="secureim/client/connection.py",
        find='        host, port = self.servers[0]\n        return f"{host}:{port}"',
        replace='        host, port = self.host, self.port\n        return f"{host}:{port}"',
        tests=(
            f"{_F}::test_connect_skips_a_dead_server_and_pins_the_service",
            f"{_F}::test_a_node_with_another_key_is_a_mismatch_not_a_failover",
            f"{_F}::test_both_clients_fail_over_to_node_2_without_the_password",
        ),
        why="the server key is pinned per node: every failover is a silent first contact, so an impostor "
        "reached as 'node 2' is trusted on first use.",
    ),
    Mutation(
        name="resume-old-receiver-not-silenced",
        file="secureim/client/session.py",
        find="            if connection == self.generation:\n                self.connection_ended(",
        replace="            if True:\n                self.connection_ended(",
        tests=(f"{_F}::test_resume_on_a_connection_that_is_still_open_is_safe",),
        why="resume() on an open connection: the old receiver reports the connection lost (and closes the "
        "new session's state) after the new one is up.",
    ),
    Mutation(
        name="reconnect-undoes-a-kick",
        file="secureim/client/session.py",
        find="        if (\n            self.auto_reconnect\n            and not self.stopping.is_set()\n            and self._account.ticket is not None\n            and (not goodbye or not self.node_reachable())\n        ):\n",
        replace="        if self.auto_reconnect and not self.stopping.is_set() and self._account.ticket is not None and True:\n",
        tests=(f"{_F}::test_a_kick_from_a_node_that_is_up_is_not_undone_by_reconnecting",),
        why="auto_reconnect resumes straight after a kick or a login from another place: an operator cannot "
        "remove a session, and two devices kick each other out forever.",
    ),
    Mutation(
        name="kick-after-an-answered-message-reconnects",
        file="secureim/client/session.py",
        find="                if bye is not None:\n",
        replace="                if False:\n",
        tests=(f"{_F}::test_a_kick_that_follows_a_message_the_client_answers_is_still_a_kick",),
        why="a kick that arrives in the same read as a message the client answers (a prekey top-up, a "
        "receipt) is taken for a lost connection, and auto_reconnect undoes it (the CI race).",
    ),
    Mutation(
        name="kick-batch-answer-failure-ends-the-read",
        file="secureim/client/session.py",
        find="                        if not goodbye:\n                            raise\n",
        replace="                        raise\n",
        tests=(f"{_F}::test_a_kick_that_follows_a_message_the_client_answers_is_still_a_kick",),
        why="an answer that fails on the session a Goodbye just closed drops the rest of that read (the "
        "messages before the Goodbye go unshown) and the kick's reason is lost.",
    ),
]
