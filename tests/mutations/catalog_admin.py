"""Defences of operating the server (issue 17): bans, kicks, ticket epochs, the audit log, self-service deletion."""

from __future__ import annotations

from model import Mutation

T = "tests/integration/test_admin.py::"
S = "tests/integration/storage/test_admin_storage.py::"

MUTATIONS: list[Mutation] = [
    Mutation(
        name="admin-ban-enforced-at-login",
        file="secureim/server/moderation.py",
        find="            ban = self.storage.user_ban(username, time.time())",
        replace="            ban = None",
        tests=(T + "test_a_banned_user_is_disconnected_at_once_and_cannot_log_in",),
        why="A banned account's password (or ticket) logs it straight back in.",
    ),
    Mutation(
        name="admin-ban-ends-live-session",
        file="secureim/server/moderation.py",
        find="                self._kick(action.username, action.reason)",
        replace="                pass",
        tests=(
            T + "test_a_banned_user_is_disconnected_at_once_and_cannot_log_in",
            T + "test_kick_shows_the_reason_and_the_user_may_come_back",
        ),
        why="A banned or kicked user stays connected and keeps chatting until they leave.",
    ),
    Mutation(
        name="admin-network-ban-checked-at-login",
        file="secureim/server/moderation.py",
        find="        ban = self.address_bans.match(session.source)\n        if ban is not None:  # the cache",
        replace="        ban = None\n        if ban is not None:  # the cache",
        tests=(T + "test_a_banned_network_is_disconnected_and_refused",),
        why="A banned network logs in again right after being disconnected.",
    ),
    Mutation(
        name="admin-network-ban-ends-live-sessions",
        file="secureim/server/moderation.py",
        find="            self._kick_banned_sources()",
        replace="            pass",
        tests=(T + "test_a_banned_network_is_disconnected_and_refused",),
        why="Sessions from a newly banned network stay connected.",
    ),
    Mutation(
        name="admin-reset-bumps-ticket-epoch",
        file="secureim/server/admin.py",
        find="        self.storage.bump_ticket_epoch(name)",
        replace="        pass",
        tests=(T + "test_reset_password_ends_tickets_and_the_old_password",),
        why="reset-password leaves every resumption ticket valid for 12 more hours.",
    ),
    Mutation(
        name="admin-audit-never-stores-password",
        file="secureim/server/logins.py",
        find="                who=loggable(msg.username),\n                username=msg.username,\n            )\n",
        replace='                who=loggable(msg.username),\n                username=msg.username + msg.password.decode("utf-8", "replace"),\n            )\n',
        tests=(
            T + "test_audit_log_on_sqlite_has_the_rows_and_no_secret",
            T + "test_audit_log_on_mariadb_has_the_rows_and_no_secret",
        ),
        why="Mistyped passwords (often a real password of another site) end up readable in the audit log.",
    ),
    Mutation(
        name="admin-delete-user-removes-conversations",
        file="secureim/storage/accounts.py",
        find='            conn.execute(\n                "DELETE FROM conversations WHERE user_low = ? OR user_high = ?", (username, username)\n            )\n',
        replace="            pass\n",
        tests=(
            S + "test_delete_user_removes_everything_kept_for_them[sqlite]",
            T + "test_delete_user_removes_the_account_and_their_conversations",
        ),
        why="A deleted user's conversation metadata (who talked to whom, when) stays in the database.",
    ),
    Mutation(
        name="admin-delete-account-needs-password",
        file="secureim/server/logins.py",
        find="            self.auth.login(me, msg.password, session.source)",
        replace="            pass",
        tests=(T + "test_delete_account_asks_password_and_confirmation_then_deletes",),
        why="Anyone at a left-open client deletes its user's account without knowing the password.",
    ),
    Mutation(
        name="admin-delete-account-needs-confirmation",
        file="secureim/server/logins.py",
        find="        if msg.confirm != me:",
        replace="        if False:",
        tests=(T + "test_delete_account_refuses_a_confirmation_that_is_not_the_username",),
        why="A buggy or confused client deletes the account without the typed confirmation.",
    ),
    Mutation(
        name="admin-bad-input-exit-2",
        file="secureim/server/admin.py",
        find='        print(f"admin: {exc}", file=sys.stderr)\n        return EXIT_BAD_INPUT\n    except SecureIMError as exc:  # the database went away\n',
        replace='        print(f"admin: {exc}", file=sys.stderr)\n        return EXIT_OK\n    except SecureIMError as exc:  # the database went away\n',
        tests=(T + "test_bad_admin_input_is_one_line_and_exit_2",),
        why="Scripts that ban or delete cannot tell that nothing happened (a typo in the name).",
    ),
    Mutation(
        name="admin-metrics-loopback-only",
        file="secureim/server/metrics.py",
        find='METRICS_HOST = "127.0.0.1"',
        replace='METRICS_HOST = "0.0.0.0"',
        tests=(T + "test_metrics_listen_on_loopback_only",),
        why="Who is online and how busy the server is become readable from the whole network.",
    ),
]
