"""Mutations of store and forward (issue 12): prekeys, the offline init, the queue, receipts."""

from __future__ import annotations

from model import Mutation

PK = "tests/test_prekeys.py::"
OFF = "tests/test_offline.py::"
QS = "tests/test_queue_storage.py::"

MUTATIONS: list[Mutation] = [
    Mutation(
        name="offline-one-time-prekey-kept",
        file="prekeys.py",
        find="store.one_time.pop(opk_id, None)   # used once: its private key is gone",
        replace="store.one_time.get(opk_id)",
        tests=(PK + "test_a_one_time_prekey_is_used_once_and_a_replay_is_refused",),
        why="a one-time prekey opens a second init: a replayed stored message is accepted after a restart.",
    ),
    Mutation(
        name="offline-signed-prekey-replay-forgotten",
        file="prekeys.py",
        find="if not opk_id and seen in signed.seen:",
        replace="if False:",
        tests=(PK + "test_the_signed_prekey_alone_works_when_one_time_prekeys_are_exhausted_and_is_not_replayable",),
        why="with the one-time prekeys exhausted, a replayed init under the signed prekey is accepted again.",
    ),
    Mutation(
        name="offline-init-signature-unchecked",
        file="prekeys.py",
        find="        if not cu.verify_signature(ctx.peer_identity, signature, _init_text(",
        replace="        if False and not cu.verify_signature(ctx.peer_identity, signature, _init_text(",
        tests=(PK + "test_a_forged_init_is_refused_before_any_key_is_spent",),
        why="anyone with the bundle (the server) starts a session as alice: forged stored messages are shown.",
    ),
    Mutation(
        name="offline-bundle-signature-unchecked",
        file="prekeys.py",
        find="if spk_id == 0 or not cu.verify_signature(peer_identity, spk_sig,",
        replace="if spk_id == 0 or False and not cu.verify_signature(peer_identity, spk_sig,",
        tests=(PK + "test_a_tampered_bundle_is_refused_by_the_sender",),
        why="the server swaps the signed prekey for its own and reads everything stored for the peer.",
    ),
    Mutation(
        name="offline-root-without-kdc-key",
        file="prekeys.py",
        find="return cu.hkdf(kdc_key + b\"\".join(secrets), salt=transcript,",
        replace="return cu.hkdf(b\"\".join(secrets), salt=transcript,",
        tests=(PK + "test_the_kdc_key_is_an_input_too",),
        why="the seed design's KDC key is no longer an input: the offline session drops design 000's layer.",
    ),
    Mutation(
        name="offline-root-kdc-key-only",
        file="prekeys.py",
        find="return cu.hkdf(kdc_key + b\"\".join(secrets), salt=transcript,",
        replace="return cu.hkdf(kdc_key, salt=transcript,",
        tests=(PK + "test_the_server_alone_cannot_open_a_stored_message",),
        why="the root is the KDC key alone: the server, which made it, opens every stored message.",
    ),
    Mutation(
        name="queue-bound-ignored-sqlite",
        file="database.py",
        find="            if count >= max_messages:\n                return FULL_MESSAGES, 0",
        replace="            if False:\n                return FULL_MESSAGES, 0",
        tests=(QS + "test_the_bounds_refuse_new_messages_and_keep_the_stored_ones[sqlite]",
               OFF + "test_a_full_mailbox_refuses_plainly_and_keeps_what_is_stored"),
        why="one sender fills a recipient's queue (and the server's disk) without end.",
    ),
    Mutation(
        name="queue-bound-ignored-mysql",
        file="schema.sql",
        find="    IF v_count >= p_max_messages THEN",
        replace="    IF FALSE THEN",
        tests=(QS + "test_the_bounds_refuse_new_messages_and_keep_the_stored_ones[mysql]",),
        why="the MySQL procedure stores past the bound.",
    ),
    Mutation(
        name="queue-deleted-before-ack",
        file="server.py",
        find="                session.queue_sent_upto = row.id\n",
        replace="                session.queue_sent_upto = row.id\n                self.storage.ack_queued(me, row.id)\n",
        tests=(OFF + "test_a_changed_identity_holds_stored_messages_until_accept",),
        why="a stored message is deleted when sent, not when the client has it: a dropped connection loses it.",
    ),
    Mutation(
        name="offline-changed-identity-discards",
        file="offline.py",
        find="                if len(held) < MAX_HELD:\n                    held.append(msg)",
        replace="                if len(held) < MAX_HELD:\n                    self._ack(msg)",
        tests=(OFF + "test_a_changed_identity_holds_stored_messages_until_accept",),
        why="stored messages from a peer whose key changed are silently thrown away instead of held.",
    ),
    Mutation(
        name="offline-redelivery-shown-again",
        file="offline.py",
        find="        if seen:\n            self._ack(msg)",
        replace="        if False:\n            self._ack(msg)",
        tests=(OFF + "test_a_server_replaying_a_stored_message_gets_it_acknowledged_and_never_shown_twice",),
        why="a stored message delivered twice (a lost ack, a server replay) is processed twice.",
    ),
    Mutation(
        name="receipt-from-anyone",
        file="offline.py",
        find="if entry is not None and entry.peer == peer and entry.state != DELIVERED:",
        replace="if entry is not None and entry.state != DELIVERED:",
        tests=(OFF + "test_a_receipt_only_marks_messages_sent_to_its_sender",),
        why="carol's receipt marks alice's message to bob delivered: a third party forges delivery.",
    ),
    Mutation(
        name="receipts-never-sent",
        file="clientlib.py",
        find="        if self.receipts:\n            self.mailbox.receipt(sender, opened.msg_id)",
        replace="        if False:\n            self.mailbox.receipt(sender, opened.msg_id)",
        tests=(OFF + "test_live_messages_are_receipted_end_to_end",
               OFF + "test_stored_messages_to_an_online_user_are_handed_over_at_once"),
        why="nobody can tell whether a message was delivered.",
    ),
    Mutation(
        name="store-membership-unchecked",
        file="server.py",
        find="if known is None or me not in known.members:",
        replace="if known is None:",
        tests=(OFF + "test_storing_into_someone_elses_conversation_is_refused",),
        why="anyone stores into a conversation they are not in (only the missing offline key still stops it).",
    ),
    Mutation(
        name="offline-open-unlimited",
        file="server.py",
        find="if len(session.offline_opens) >= self.config.offline_opens_per_minute:",
        replace="if False:",
        tests=(OFF + "test_offline_opens_are_rate_limited_per_session",),
        why="one session drains a victim's one-time prekeys as fast as it can ask.",
    ),
    Mutation(
        name="prekeys-kept-after-identity-change",
        file="server.py",
        find="                    self.storage.clear_prekeys(username, signed=True)  # signed by the old key: useless now\n",
        replace="",
        tests=(OFF + "test_a_new_identity_key_drops_the_prekeys_signed_by_the_old_one",),
        why="senders keep getting prekeys signed by a key the user no longer has (refused, or worse, trusted).",
    ),
]
