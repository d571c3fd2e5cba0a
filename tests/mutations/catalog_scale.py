"""Mutation catalogue, scaling area (issue 11): the cluster bus and the event-loop server.

Each entry was applied to a scratch copy and its tests seen failing
(`python tests/mutations/run.py --only NAME -j 1`); docs/SECURITY.md, section
"The cluster bus", names them.
"""

from __future__ import annotations

from model import Mutation

BUS = "tests/unit/server/test_cluster_bus.py::"
CLUSTER = "tests/integration/test_cluster.py::"
PROTO = "tests/unit/proto/test_protocol.py::"

MUTATIONS: list[Mutation] = [
    Mutation(
        name="bus-frame-not-bound-to-subject",
        file="secureim/server/cluster/nats_bus.py",
        find='    return b"secureim/v1 bus " + subject.encode()',
        replace='    return b"secureim/v1 bus "',
        tests=(BUS + "test_a_frame_for_one_node_does_not_open_on_another_subject",),
        why="A frame sealed for one node's inbox opens on another's: a NATS user redirects relays and keys.",
    ),
    Mutation(
        name="bus-replay-accepted",
        file="secureim/server/cluster/nats_bus.py",
        find="if seq <= self._seen.get(key, 0):",
        replace="if False:",
        tests=(BUS + "test_a_replayed_or_duplicated_frame_is_refused",),
        why="A recorded bus frame replayed is acted on again: duplicate deliveries, presence flipped back.",
    ),
    Mutation(
        name="bus-stale-frame-accepted",
        file="secureim/server/cluster/nats_bus.py",
        find="if abs(time.time() - sent_at) > MAX_FRAME_AGE_S:",
        replace="if False:",
        tests=(BUS + "test_a_stale_frame_is_refused",),
        why="A frame recorded long ago (from an earlier node incarnation) is replayed and believed.",
    ),
    Mutation(
        name="bus-deliver-any-message",
        file="secureim/server/cluster/nats_bus.py",
        find="        if not isinstance(\n            msg, (P.Deliver, P.PeerStatus, P.DirectAsked, P.Error, P.StoredMessage, P.RoomMessage)\n        ):\n",
        replace="        if False:\n",
        tests=(BUS + "test_a_deliver_frame_carries_only_what_may_cross_nodes",),
        why="A DELIVER frame smuggles any message to a user (a ConversationKey, an AuthOk) past the KDC's rules.",
    ),
    Mutation(
        name="bus-lost-relay-not-bounced",
        file="secureim/server/cluster/nats_bus.py",
        find="        if isinstance(\n            msg, P.Deliver\n        ):  # gone from here in the meantime: the sender hears it was not delivered\n",
        replace="        if False:  # gone from here in the meantime: the sender hears it was not delivered\n",
        tests=(BUS + "test_a_relay_for_someone_who_just_left_is_bounced_to_the_sender",),
        why="A relay reaching a node after its recipient left vanishes: the sender believes it was delivered.",
    ),
    Mutation(
        name="bus-key-outside-conversation",
        file="secureim/server/cluster/nats_bus.py",
        find="if username not in members or msg.peer not in members:",
        replace="if False:",
        tests=(BUS + "test_a_key_frame_for_someone_outside_the_conversation_is_refused",),
        why="A KEY frame names members it does not key: a conversation is registered for someone outside it.",
    ),
    Mutation(
        name="bus-older-login-replaces-newer",
        file="secureim/server/cluster/nats_bus.py",
        find="if (local.login_at, self.incarnation) > (login_at, sender):",
        replace="if False:",
        tests=(BUS + "test_an_older_login_elsewhere_does_not_replace_the_newer_one_here",),
        why="A late ONLINE of an older login closes the user's current session: two nodes close each other's.",
    ),
    Mutation(
        name="bus-repeat-resets-conversations",
        file="secureim/server/cluster/nats_bus.py",
        find="        if previous is not None and previous.node == sender and previous.login_at == login_at:\n            return",
        replace="        if False:\n            return",
        tests=(BUS + "test_a_snapshot_repeating_what_we_know_leaves_conversations_alone",),
        why="Every snapshot tears down every cross-node conversation: a re-keying storm at each node start.",
    ),
    Mutation(
        name="bus-move-here-keeps-stale-conversations",
        file="secureim/server/cluster/nats_bus.py",
        find="        self._host.notify(username, self._host.drop_conversations(username, watch=False), online=True)\n",
        replace="        pass\n",
        tests=(BUS + "test_a_user_who_moves_here_ends_the_conversations_with_the_session_elsewhere",),
        why="A user who moves nodes keeps conversations keyed to the old session: peers' messages cannot be read.",
    ),
    Mutation(
        name="bus-any-offline-ends-presence",
        file="secureim/server/cluster/nats_bus.py",
        find="if entry is None or entry.node != sender or (login_at is not None and entry.login_at != login_at):",
        replace="if entry is None:",
        tests=(BUS + "test_the_end_of_an_older_session_does_not_hide_the_newer_one",),
        why="The end of a replaced session marks the user offline although they are online on another node.",
    ),
    Mutation(
        name="bus-expiry-while-cut-off",
        file="secureim/server/cluster/nats_bus.py",
        find="if self.connected_since is None or time.monotonic() - self.connected_since < NODE_TIMEOUT_S:",
        replace="if False:",
        tests=(BUS + "test_silence_while_our_own_link_is_down_says_nothing",),
        why="A node cut off from NATS declares every other node's users offline (and tells its own users so).",
    ),
    Mutation(
        name="bus-node-expiry-off",
        file="secureim/server/cluster/nats_bus.py",
        find="            if now - heard > NODE_TIMEOUT_S:",
        replace="            if False:",
        tests=(BUS + "test_users_of_a_silent_node_go_offline_and_their_peers_hear_it",),
        why="Users of a crashed node stay 'online' forever: messages to them vanish into a dead inbox.",
    ),
    Mutation(
        name="bus-send-while-link-down",
        file="secureim/server/cluster/nats_bus.py",
        find="        if not self.connected:\n            return False\n        self._call(self._enqueue",
        replace="        self._call(self._enqueue",
        tests=(CLUSTER + "test_nats_stopped_and_restarted_mid_run",),
        why="While NATS is down a cross-node send is taken as delivered: the sender is never told it was lost.",
    ),
    Mutation(
        name="cluster-allows-sqlite",
        file="secureim/server/options.py",
        find='        if not (args.db_url or "").startswith(("mysql://", "mariadb://")):',
        replace="        if False:",
        tests=(BUS + "test_a_cluster_on_sqlite_is_refused_in_one_line",),
        why="Nodes on separate SQLite files: each has its own accounts and lockouts; a ban on one is not on the others.",
    ),
    Mutation(
        name="record-cipher-random-block-shown",
        file="crypto_utils.py",
        find="return pkcs7_unpad(self._decryptor.update(iv_ct)[TDES_BLOCK_BYTES:])",
        replace="return pkcs7_unpad(self._decryptor.update(iv_ct))",
        tests=(
            "tests/unit/crypto/test_crypto_utils.py::test_record_cipher_records_open_with_a_fresh_context_and_back",
            "tests/unit/crypto/test_crypto_utils.py::test_record_cipher_opens_in_any_order_and_survives_a_forgery",
        ),
        why="The long-lived decryptor's first block (R xor an earlier record's block) is taken as plaintext.",
    ),
    Mutation(
        name="ffdh-pow-in-the-server-process",
        file="secureim/server/net.py",
        find="        diffiehellman.offload_modexp(self.modexp)  # finite-field groups: pow() off the GIL",
        replace="        pass",
        tests=(
            "tests/integration/test_server.py::test_finite_field_exponentiations_run_outside_the_server_process",
        ),
        why="An FFDH login's pow() holds the GIL for ~30 ms on a worker thread: a burst stalls every relay.",
    ),
    Mutation(
        name="open-peer-not-rechecked-after-lookup",
        file="secureim/server/registry.py",
        find="            session = self.online.get(target)\n            if session is None:",
        replace="            session = None\n            if session is None:",
        tests=(
            "tests/integration/test_server.py::test_a_peer_who_logs_in_while_the_server_looks_them_up_is_not_reported_offline",
        ),
        why="A peer logging in during the open's database read is reported offline and never watched: no conversation.",
    ),
    Mutation(
        name="password-work-shares-the-worker-threads",
        file="secureim/server/net.py",
        find="            pool = self.password_pool if self.router.is_password_work(item) else self.pool",
        replace="            pool = self.pool",
        tests=("tests/integration/test_server.py::test_logins_waiting_for_bcrypt_do_not_hold_up_other_work",),
        why="Logins waiting for bcrypt take every worker: opens, resumes and rekeys (whose relays wait) stall.",
    ),
    Mutation(
        name="codec-field-length-unchecked",
        file="secureim/proto/codec.py",
        find="            if n > max_len or (exact is not None and n != exact):",
        replace="            if False:",
        tests=(PROTO + "test_a_bytes_field_longer_than_its_bound_is_refused_by_the_decoder",),
        why="A field longer than its bound is accepted: oversized names and keys reach the server's logic.",
    ),
]
