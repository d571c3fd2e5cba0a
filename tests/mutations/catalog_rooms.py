"""Mutations of group rooms (issue 13): membership verification, sender keys, the server's checks."""

from __future__ import annotations

from model import Mutation

RM = "tests/test_rooms.py::"
FLOW = "tests/test_room_flow.py::"
CLI = "tests/test_cli_rooms.py::"

MUTATIONS: list[Mutation] = [
    Mutation(
        name="rooms-change-signature-unchecked",
        file="rooms.py",
        find="    if not cu.verify_signature(actor_identity, change.signature, CHANGE_CONTEXT + change.signed_part):",
        replace="    if False:",
        tests=(RM + "test_a_forged_add_is_refused_and_changes_nothing",
               CLI + "test_a_member_added_by_the_server_is_refused_and_shown_as_a_warning"),
        why="the server adds a ghost member with a change it signed itself, and every client accepts it.",
    ),
    Mutation(
        name="rooms-admin-key-from-the-server",
        file="rooms.py",
        find="key = self.admin_identity if change.action in (ADD, REMOVE, CLOSE) else actor_identity",
        replace="key = actor_identity or self.admin_identity",
        tests=(RM + "test_a_forged_add_is_refused_and_changes_nothing",),
        why="the key an admin change is checked with comes from the server, which names its own.",
    ),
    Mutation(
        name="rooms-any-member-may-add",
        file="rooms.py",
        find="    if a in (ADD, REMOVE, CLOSE) and who != admin:",
        replace="    if False:",
        tests=(RM + "test_a_forged_add_is_refused_and_changes_nothing",),
        why="a member who is not the admin adds whoever they like.",
    ),
    Mutation(
        name="rooms-chain-unchecked",
        file="rooms.py",
        find="        if not cu.constant_time_equal(change.prev_head, self.head):",
        replace="        if False:",
        tests=(RM + "test_changes_must_follow_in_order_without_gaps_or_forks",),
        why="a change that does not follow the last one (a fork the server shows some members) is applied.",
    ),
    Mutation(
        name="rooms-gap-accepted",
        file="rooms.py",
        find="        if change.epoch != self.epoch + 1:",
        replace="        if False:",
        tests=(RM + "test_changes_must_follow_in_order_without_gaps_or_forks",),
        why="the server withholds a change (a removal, say) and the next one is applied anyway.",
    ),
    Mutation(
        name="rooms-member-list-unchecked",
        file="rooms.py",
        find="    if change.members != expected_members(a, before, change.target):",
        replace="    if False:",
        tests=(RM + "test_changes_must_follow_in_order_without_gaps_or_forks",),
        why="a change whose member list does not follow from the last one slips members in.",
    ),
    Mutation(
        name="rooms-uid-unchecked",
        file="rooms.py",
        find="        if change.uid != self.uid or change.room != self.name:",
        replace="        if False:",
        tests=(RM + "test_a_change_from_another_room_is_refused",),
        why="a change of another room of the same name (made again, or replayed) is applied here.",
    ),
    Mutation(
        name="rooms-message-signature-unchecked",
        file="rooms.py",
        find="        if not cu.verify_signature(record.signing, signature, aad + sealed):",
        replace="        if False:",
        tests=(RM + "test_a_member_cannot_pass_off_a_message_as_another_members",),
        why="any member holding a chain key forges messages as that member.",
    ),
    Mutation(
        name="rooms-sender-key-from-a-non-member",
        file="rooms.py",
        find="        if not cu.constant_time_equal(info.head, head) or sender not in info.members or sender == self.me:",
        replace="        if not cu.constant_time_equal(info.head, head):",
        tests=(RM + "test_sender_keys_for_a_future_epoch_wait_and_stale_or_foreign_ones_are_refused",),
        why="someone who is not a member of the epoch gets their messages shown in the room.",
    ),
    Mutation(
        name="rooms-sender-chain-from-public-data",
        file="rooms.py",
        find="self.own = _Own(self.epoch, cu.random_bytes(KEY_ID_BYTES), e2e._Chain(cu.random_bytes(32)),",
        replace="self.own = _Own(self.epoch, self.head[:KEY_ID_BYTES], e2e._Chain(self.head),",
        tests=(RM + "test_a_sender_key_is_never_reused_across_epochs_or_restarts",),
        why="a sender chain made from the epoch's public head: the same keys after a restart, and the "
            "server (which knows the head) reads everything.",
    ),
    Mutation(
        name="rooms-room-key-not-an-input",
        file="rooms.py",
        find="material = cu.hkdf(message_key, salt=kdc_key, info=cu.label(\"room message key\"),",
        replace="material = cu.hkdf(message_key, salt=None, info=cu.label(\"room message key\"),",
        tests=(RM + "test_the_servers_room_key_is_an_input_of_every_message_key",),
        why="the KDC's room key no longer counts: a leaked sender key alone opens the room's messages.",
    ),
    Mutation(
        name="rooms-live-freshness-unchecked",
        file="rooms.py",
        find="            fresh = abs(age) <= e2e.FRESHNESS_WINDOW_S",
        replace="            fresh = True",
        tests=(RM + "test_a_stored_message_may_be_old_but_not_from_the_future",),
        why="a live room message of last week (a replay held back by the server) is shown as new.",
    ),
    Mutation(
        name="rooms-server-signature-unchecked",
        file="room_service.py",
        find="            R.verify_signature(change, session.identity_key)",
        replace="            pass",
        tests=(FLOW + "test_the_server_refuses_what_the_clients_would_refuse",),
        why="the server commits a change its sender did not sign: the room forks between server and clients.",
    ),
    Mutation(
        name="rooms-server-fans-out-for-non-members",
        file="room_service.py",
        find="        if cached is None or me not in cached.members:\n            answer(",
        replace="        if cached is None:\n            answer(",
        tests=(FLOW + "test_the_server_refuses_what_the_clients_would_refuse",),
        why="a removed member still writes into the room through the server.",
    ),
    Mutation(
        name="rooms-server-stale-epoch-accepted",
        file="room_service.py",
        find="        if msg.epoch != room.epoch:\n            answer(P.RoomStatus.STALE,",
        replace="        if False:\n            answer(P.RoomStatus.STALE,",
        tests=(FLOW + "test_a_change_forged_by_the_server_is_refused_loudly",),
        why="a message sealed for an earlier member list is fanned out to the members of a later one.",
    ),
    Mutation(
        name="rooms-removed-member-gets-the-new-key",
        file="room_service.py",
        find="                key = b\"\"               # who is no longer a member gets no key of the new epoch",
        replace="                pass",
        tests=(FLOW + "test_the_server_refuses_what_the_clients_would_refuse",),
        why="the KDC hands the removed member the room key of the epoch that removed them.",
    ),
    Mutation(
        name="rooms-leaver-gets-the-new-key",
        file="room_service.py",
        find="                          key=b\"\" if leaving else key)",
        replace="                          key=key)",
        tests=(FLOW + "test_only_the_admin_changes_members_and_mistakes_get_clear_answers",),
        why="the answer to a leave hands the member who leaves the room key of the epoch without them.",
    ),
    Mutation(
        name="rooms-client-sends-keys-to-the-servers-list",
        file="rooms.py",
        find="        missing = [m for m in info.members if m != self.me and m not in own.sent_to]",
        replace="        missing = [m for m in info.members + ('mallory',) if m != self.me and m not in own.sent_to]",
        tests=(FLOW + "test_a_change_forged_by_the_server_is_refused_loudly",),
        why="the sender key goes to someone outside the verified member list (as if taken from the server's).",
    ),
]
