"""Defence mutations of the core: handshake, record layer, crypto suites, accounts, DoS gates, e2e, direct mode.

Each entry switches one defence off; its tests must then fail (tests/mutations/run.py).
docs/SECURITY.md cites these names beside the attack cases they prove.
"""

from __future__ import annotations

from model import Mutation

ATTACKS = "tests/integration/test_attacks.py"
E2E = "tests/integration/test_e2e.py"
SERVER = "tests/integration/test_server.py"
PROTO = "tests/unit/proto/test_protocol.py"
CRYPTO = "tests/unit/crypto/test_crypto_utils.py"
DH = "tests/unit/crypto/test_diffiehellman.py"
VECTORS = "tests/unit/crypto/test_vectors.py"
DIRECT = "tests/integration/test_direct.py"


def _handshake_case(name: str) -> str:
    return f"{ATTACKS}::test_handshake_tampering_is_detected[{name}]"


def _record_case(case: str) -> str:
    return f"{ATTACKS}::test_record_tampering_is_detected_and_nothing_wrong_is_shown[{case}]"


MUTATIONS: list[Mutation] = [
    # --- end-to-end layer (e2e.py) ------------------------------------------------------
    Mutation(
        name="e2e-root-without-dh",
        file="secureim/e2e/sessions.py",
        find='    return cu.hkdf(\n        kdc_key + dh + kem_secrets[0] + kem_secrets[1],\n        salt=transcript_hash,\n        info=cu.label("e2e root x25519-mlkem768"),\n        length=32,\n    )\n',
        replace='    return cu.hkdf(kdc_key, salt=transcript_hash, info=cu.label("e2e root x25519-mlkem768"), length=32)\n',
        tests=(f"{E2E}::test_curious_server_cannot_read_messages",),
        why="The e2e root must mix the clients' secrets (X25519 and ML-KEM): with the KDC key alone the server "
        "reads every message.",
    ),
    Mutation(
        name="e2e-skipped-key-not-deleted",
        file="secureim/e2e/sessions.py",
        find="return skipped[key], lambda: skipped.pop(key, None)",
        replace="return skipped[key], lambda: None",
        tests=(f"{E2E}::test_a_replayed_out_of_order_message_is_refused",),
        why="A skipped message's key is deleted once used: kept, a replayed out-of-order message is shown again.",
    ),
    Mutation(
        name="e2e-share-signature",
        file="secureim/e2e/sessions.py",
        find="        share = x_public + encapsulation_key\n        if not cu.verify_signature(\n            self.peer_identity, signature, _share_transcript(self.id, generation, self.peer, self.me, share)\n",
        replace="        share = x_public + encapsulation_key\n        if False and not cu.verify_signature(\n            self.peer_identity, signature, _share_transcript(self.id, generation, self.peer, self.me, share)\n",
        tests=(
            f"{E2E}::test_shares_must_be_signed_by_the_peer_for_this_conversation",
            f"{E2E}::test_active_server_swapping_dh_shares_is_caught_by_both_clients",
        ),
        why="Key shares are signed by the peer's identity key: unsigned, the server swaps in its own DH shares.",
    ),
    Mutation(
        name="e2e-hash-ratchet",
        file="secureim/e2e/sessions.py",
        find='self.key = cu.hmac_sha256(self.key, b"\\x02")  # the old chain key is overwritten',
        replace="self.key = self.key",
        tests=(f"{E2E}::test_every_message_has_a_fresh_key",),
        why="The chain key advances per message: without it, one key opens every message, past ones included.",
    ),
    Mutation(
        name="e2e-freshness-window",
        file="secureim/e2e/sessions.py",
        find="if abs(self._clock() - opened.sent_at) > FRESHNESS_WINDOW_S:",
        replace="if False:",
        tests=(f"{E2E}::test_too_old_and_future_messages_are_refused",),
        why="Messages older (or later) than 10 minutes are refused: without it, held-back messages are shown late.",
    ),
    Mutation(
        name="e2e-max-skip",
        file="secureim/e2e/sessions.py",
        find="if counter - chain.index > MAX_SKIP:",
        replace="if False:",
        tests=(f"{E2E}::test_out_of_order_within_the_bound_and_refused_beyond",),
        why="A message may skip at most MAX_SKIP keys: unbounded, one forged counter costs the receiver 2^64 steps.",
    ),
    Mutation(
        name="e2e-peer-pin",
        file="secureim/e2e/sessions.py",
        find="if not cu.constant_time_equal(known[0], key):\n            raise IdentityChanged",
        replace="if False:\n            raise IdentityChanged",
        tests=(
            f"{E2E}::test_peer_trust_pins_refuses_changes_and_marks_verified",
            f"{E2E}::test_active_server_substituting_identities_is_refused_after_pinning",
        ),
        why="A peer's pinned identity key may not change silently: without the check the server substitutes keys.",
    ),
    # --- handshake (protocol.py) --------------------------------------------------------------
    Mutation(
        name="handshake-server-signature",
        file="secureim/proto/handshake.py",
        find="if not cu.verify_signature(server_key, msg.signature, SIGNATURE_CONTEXT + th1):",
        replace="if False:",
        tests=(
            f"{PROTO}::test_server_signing_with_another_key_is_refused",
            _handshake_case("A03 flip a bit in the server's signature"),
            _handshake_case("A01 flip a bit in ClientHello's nonce"),
            _handshake_case("A02 flip a bit in ServerHello's nonce"),
            _handshake_case("A05 substitute the client's DH value"),
            _handshake_case("A06 substitute the server's DH value"),
            _handshake_case("A08 swap the server's identity key"),
            f"{ATTACKS}::test_A12_downgrade_the_suite_in_server_hello",
        ),
        why="The client checks the server's signature over the transcript: without it, anyone can impersonate it.",
    ),
    Mutation(
        name="handshake-server-confirmation",
        file="secureim/proto/handshake.py",
        find="if not DiffieHellman.verify_hashed_key(self._keys.server_confirm, msg.confirm, th1):",
        replace="if False:",
        tests=(
            f"{PROTO}::test_bad_key_confirmation_is_refused",
            _handshake_case("A04 flip a bit in the server's key confirmation"),
        ),
        why="The server proves it holds the session key: without the check a mismatched key goes unnoticed.",
    ),
    Mutation(
        name="handshake-client-finished",
        file="secureim/proto/handshake.py",
        find="if not DiffieHellman.verify_hashed_key(self._keys.client_confirm, msg.confirm, th2):",
        replace="if False:",
        tests=(
            f"{PROTO}::test_bad_client_finished_is_refused",
            f"{ATTACKS}::test_A11_flip_a_bit_in_client_finished_is_refused_by_the_server",
            f"{ATTACKS}::test_A14_replay_a_whole_recorded_session_later",
        ),
        why="The server checks the client's key confirmation: without it, a replayed session goes on to login.",
    ),
    Mutation(
        name="handshake-expected-server-key",
        file="secureim/proto/handshake.py",
        find="        if self._expected_server_key is not None and not cu.constant_time_equal(\n            server_key, self._expected_server_key\n        ):\n",
        replace="        if False and not cu.constant_time_equal(server_key, self._expected_server_key):\n",
        tests=(f"{PROTO}::test_impostor_server_with_valid_signature_but_unpinned_key_is_refused",),
        why="A server with a valid signature under another key than the pinned one is refused.",
    ),
    Mutation(
        name="handshake-state-table",
        file="secureim/proto/handshake.py",
        find="if type(msg) not in allowed:\n            raise UnexpectedMessage",
        replace="if False:\n            raise UnexpectedMessage",
        tests=(f"{PROTO}::test_login_before_handshake_is_refused",),
        why="Messages outside the state table close the connection: without it, a login skips the handshake.",
    ),
    Mutation(
        name="frame-size-check",
        file="secureim/proto/records.py",
        find="if length > self._max:  # refused from the header, before the body is buffered",
        replace="if False:",
        tests=(
            f"{PROTO}::test_oversized_frame_refused_from_its_header_alone",
            f"{ATTACKS}::test_A27_oversized_frame_from_a_client_closes_only_that_client",
        ),
        why="A frame header over the limit is refused before buffering: without it, 2 GiB headers exhaust memory.",
    ),
    Mutation(
        name="record-sequence-numbers",
        file="secureim/proto/records.py",
        find='return RECORD_AAD_PREFIX + self.seq.to_bytes(8, "big")',
        replace="return RECORD_AAD_PREFIX",
        tests=(
            f"{PROTO}::test_record_attacks_end_the_session_with_a_reason",
            *(_record_case(f"{d}-{k}") for d in ("c2s", "s2c") for k in ("drop", "duplicate", "reorder")),
        ),
        why="Records carry an implicit sequence number in their AAD: without it, replay and reordering go unseen.",
    ),
    Mutation(
        name="record-sequence-never-wraps",
        file="secureim/proto/records.py",
        find="if self.seq >= SEQUENCE_LIMIT:",
        replace="if False:",
        tests=(f"{PROTO}::test_sequence_numbers_never_wrap",),
        why="The record sequence number refuses to wrap (a wrapped number would repeat an AAD).",
    ),
    Mutation(
        name="puzzle-required-before-dh",
        file="secureim/proto/handshake.py",
        find="if self._puzzle is not None and not self._puzzle_passed(msg):",
        replace="if False:",
        tests=(f"{ATTACKS}::test_A35_puzzle_is_required_before_any_dh_work",),
        why="Under load the server asks for a puzzle before any DH work: without the gate, hellos cost it CPU for free.",
    ),
    Mutation(
        name="handshake-configured-groups",
        file="secureim/proto/handshake.py",
        find="        return (\n            name in GROUPS\n            and (self._allowed_groups is None or name in self._allowed_groups)\n            and (name not in POST_QUANTUM_GROUPS or cu.mlkem_available())\n        )\n",
        replace="        return name in GROUPS and True and (name not in POST_QUANTUM_GROUPS or cu.mlkem_available())\n",
        tests=(f"{PROTO}::test_server_refuses_groups_disabled_by_configuration",),
        why="Groups the operator disabled are refused, not used.",
    ),
    Mutation(
        name="username-rules",
        file="secureim/proto/limits.py",
        find="if not USERNAME_RE.fullmatch(name):",
        replace="if not name:",
        tests=(f"{ATTACKS}::test_A30_hostile_usernames_are_refused",),
        why="ASCII-only username rules refuse look-alikes, controls, bidi, SQL metacharacters and paths.",
    ),
    Mutation(
        name="puzzle-ignored-is-refused",
        file="secureim/proto/handshake.py",
        find="if self._puzzles_sent:\n                self._refuse(",
        replace="if False:\n                self._refuse(",
        tests=(f"{ATTACKS}::test_A35_a_client_that_ignores_the_puzzle_is_refused",),
        why="A client that answers a puzzle with another unsolved hello is refused, not sent puzzles forever.",
    ),
    # --- crypto suites and DH (crypto_utils.py, diffiehellman.py) -----------------------------
    Mutation(
        name="tdes-mac-verification",
        file="crypto_utils.py",
        find="self._tag(aad, iv_ct).verify(tag)  # constant-time comparison",
        replace="pass",
        tests=(
            f"{CRYPTO}::test_every_byte_tampered_is_detected",
            f"{VECTORS}::test_tdes_suite_known_answers",
            _record_case("c2s-flip"),
            _record_case("s2c-flip"),
        ),
        why="The 3des suite verifies its HMAC before decrypting: without it, tampered records are accepted.",
    ),
    Mutation(
        name="tdes-mac-covers-aad-length",
        file="crypto_utils.py",
        find='return len(aad).to_bytes(8, "big") + aad',
        replace="return aad",
        tests=(f"{VECTORS}::test_tdes_suite_known_answers",),
        why="The HMAC input starts with the AAD length, so (aad, iv||ct) cannot be re-split; the KAT pins the layout.",
    ),
    Mutation(
        name="tdes-mac-covers-iv",
        file="crypto_utils.py",
        find="h.update(iv_ct)",
        replace="h.update(iv_ct[TDES_BLOCK_BYTES:])",
        tests=(
            f"{CRYPTO}::test_every_byte_tampered_is_detected",
            f"{VECTORS}::test_tdes_suite_known_answers",
        ),
        why="The HMAC covers the IV: without it, flipping IV bits flips the first plaintext block undetected.",
    ),
    Mutation(
        name="tdes-weak-keys",
        file="crypto_utils.py",
        find="if any(k in DES_WEAK_KEYS for k in (k1, k2, k3)):",
        replace="if False:",
        tests=(f"{CRYPTO}::test_weak_and_semi_weak_subkeys_refused",),
        why="Weak and semi-weak DES keys are refused (SP 800-67r2 3.3.2).",
    ),
    Mutation(
        name="tdes-independent-keys",
        file="crypto_utils.py",
        find="if k1 == k2 or k2 == k3 or k1 == k3:",
        replace="if False:",
        tests=(f"{CRYPTO}::test_dependent_subkeys_and_bad_parity_refused",),
        why="Three independent DES keys (keying option 1): K1=K2 would collapse Triple-DES to single DES.",
    ),
    Mutation(
        name="identity-file-permissions",
        file="crypto_utils.py",
        find="if mode & (stat.S_IRWXG | stat.S_IRWXO):",
        replace="if False:",
        tests=(f"{CRYPTO}::test_identity_readable_by_others_is_refused",),
        why="A server identity key readable by others is refused, as OpenSSH refuses such files.",
    ),
    Mutation(
        name="dh-group-allowlist",
        file="diffiehellman.py",
        find="        return GROUPS[name]\n",
        replace='        return GROUPS.get(name, GROUPS["modp2048"])\n',
        tests=(f"{DH}::test_groups_not_on_allowlist_are_refused",),
        why="Group names off the allowlist are refused, never mapped to some default group (fail closed).",
    ),
    Mutation(
        name="handshake-group-allowlist",
        file="secureim/proto/handshake.py",
        find="        return (\n            name in GROUPS\n            and (self._allowed_groups is None or name in self._allowed_groups)\n            and (name not in POST_QUANTUM_GROUPS or cu.mlkem_available())\n",
        replace="        return (self._allowed_groups is None or name in self._allowed_groups) and (\n            name not in POST_QUANTUM_GROUPS or cu.mlkem_available()\n",
        tests=(
            f"{ATTACKS}::test_A29_groups_off_the_allowlist_on_the_wire",
            _handshake_case("A07 downgrade the group to modp1024"),
        ),
        why="The server picks only allowlisted groups from the client's offer; an unknown name is refused on the wire.",
    ),
    Mutation(
        name="dh-public-value-range",
        file="diffiehellman.py",
        find="if not 1 < y < group.p - 1:",
        replace="if False:",
        tests=(f"{DH}::test_range_check_is_what_refuses_0_1_p_minus_1_and_p",),
        why="DH public values 0, 1, p-1, p are refused (RFC 7919 5.1): they force a known shared secret.",
    ),
    Mutation(
        name="dh-subgroup-check",
        file="diffiehellman.py",
        find="if modexp(y, group.q, group.p) != 1:",
        replace="if False:",
        tests=(f"{DH}::test_subgroup_check_is_what_refuses_non_residues",),
        why="Public values outside the prime-order subgroup are refused (small-subgroup confinement).",
    ),
    Mutation(
        name="dh-x25519-low-order",
        file="diffiehellman.py",
        find='raise InvalidPublicValue("X25519 public value gives an all-zero shared secret.") from None',
        replace="secret = bytes(32)",
        tests=(f"{DH}::test_x25519_low_order_points_refused",),
        why="X25519 points giving an all-zero secret are refused (RFC 7748 6.1).",
    ),
    # --- accounts (auth.py) ---------------------------------------------------------------------
    Mutation(
        name="auth-dummy-bcrypt-for-unknown-users",
        file="secureim/server/accounts.py",
        find="ok = self._check(password, stored if stored is not None else self._dummy_hash)",
        replace="ok = stored is not None and self._check(password, stored)",
        tests=(f"{SERVER}::test_wrong_password_and_unknown_user_get_the_same_answer",),
        why="Unknown users cost one bcrypt check like real ones: skipped, response time tells who has an account.",
    ),
    Mutation(
        name="auth-dummy-bcrypt-for-invalid-names",
        file="secureim/server/accounts.py",
        find="self._check(password[:MAX_PASSWORD_BYTES], self._dummy_hash)",
        replace="None",
        tests=(f"{SERVER}::test_wrong_password_and_unknown_user_get_the_same_answer",),
        why="Invalid names cost one bcrypt check too, so they answer no faster than real accounts.",
    ),
    Mutation(
        name="auth-lockout",
        file="secureim/server/accounts.py",
        find="if failures.locked_until > now:",
        replace="if False:",
        tests=(f"{SERVER}::test_lockout_after_five_failures_for_that_source_only",),
        why="Five failures lock the account for that source for 60 s: without it, even the right password works.",
    ),
    Mutation(
        name="auth-no-truncation",
        file="secureim/server/accounts.py",
        find="return base64.b64encode(hmac_sha256(PREHASH_KEY, password))",
        replace="return password[:72]",
        tests=(f"{ATTACKS}::test_A31_password_lengths",),
        why="Passwords are pre-hashed, never truncated to bcrypt's 72 bytes: a 72-byte prefix must not log in.",
    ),
    Mutation(
        name="auth-min-password-length",
        file="secureim/server/accounts.py",
        find="if len(password) < MIN_PASSWORD_BYTES:",
        replace="if False:",
        tests=(f"{ATTACKS}::test_A31_password_lengths",),
        why="Passwords shorter than 8 bytes are refused at registration.",
    ),
    # --- server (server.py, puzzle.py, tickets.py) -----------------------------------------------
    Mutation(
        name="server-puzzle-source-binding",
        file="secureim/server/net.py",
        find="            source=source,\n",
        replace='            source="",\n',
        tests=(f"{ATTACKS}::test_A36_the_real_server_binds_puzzles_to_the_source_address",),
        why="The server binds each puzzle to the client's address: unbound, one solution serves a botnet.",
    ),
    Mutation(
        name="server-puzzle-load-wired",
        file="secureim/server/net.py",
        find="            load=self.service.registry.unauthenticated_total,\n",
        replace="            load=lambda: 0,\n",
        tests=(f"{ATTACKS}::test_A37_load_adaptive_difficulty_through_the_real_server",),
        why="Puzzle difficulty follows the half-open connection count: unwired, 'auto' never asks for work.",
    ),
    Mutation(
        name="server-rate-limit",
        file="secureim/server/net.py",
        find="elif not self.rate_limiter.allow(source):",
        replace="elif False:",
        tests=(f"{ATTACKS}::test_A39_per_source_connection_rate_limit",),
        why="New connections per source are rate-limited (token bucket) before any work.",
    ),
    Mutation(
        name="server-half-open-cap-per-source",
        file="secureim/server/registry.py",
        find="if self.unauthenticated.get(session.source, 0) >= max_unauth_per_source:",
        replace="if False:",
        tests=(
            f"{ATTACKS}::test_A41_half_open_connections_are_capped_per_source",
            f"{ATTACKS}::test_A40_flood_of_junk_from_one_source_does_not_stop_others",
        ),
        why="Half-open connections are capped per source: without it, one address holds every slot.",
    ),
    Mutation(
        name="server-max-auth-tries",
        file="secureim/server/logins.py",
        find="if session.auth_attempts >= self.config.max_auth_tries:",
        replace="if False:",
        tests=(f"{SERVER}::test_too_many_attempts_close_the_connection",),
        why="Six login attempts per connection, then it is closed (OpenSSH MaxAuthTries).",
    ),
    Mutation(
        name="server-login-grace",
        file="secureim/server/net.py",
        find="self.loop.call_later(self.config.login_grace_s, self._login_deadline, session)",
        replace="pass",
        tests=(f"{SERVER}::test_silent_client_is_closed_at_the_login_deadline",),
        why="A connection not logged in within the grace time is closed: without it, silent sockets pile up.",
    ),
    Mutation(
        name="server-relay-membership",
        file="secureim/server/kdc.py",
        find="if conv is None or me not in conv.members:",
        replace="if conv is None:",
        tests=(f"{ATTACKS}::test_A32_relay_into_a_conversation_one_is_not_in",),
        why="Only members may relay into a conversation: without it, anyone injects into others' chats.",
    ),
    Mutation(
        name="server-no-conversation-with-oneself",
        file="secureim/server/kdc.py",
        find="        if peer == session.username:\n",
        replace="        if False:\n",
        tests=(f"{ATTACKS}::test_A33_relay_to_oneself_and_to_nobody",),
        why="A conversation with oneself is refused (the KDC would hand one user both ends).",
    ),
    Mutation(
        name="server-slow-reader-dropped",
        file="secureim/server/registry.py",
        find="if self._out_bytes + link.buffered > link.limit:",
        replace="if False:",
        tests=(f"{SERVER}::test_client_that_stops_reading_is_dropped_not_waited_for",),
        why="A client that stops reading is dropped when its queue is full, not buffered without bound.",
    ),
    Mutation(
        name="puzzle-mac-binds-source",
        file="secureim/server/puzzle_gate.py",
        find=' + source.encode("utf-8", "replace")',
        replace="",
        tests=(
            f"{ATTACKS}::test_A36_puzzle_solutions_cannot_be_forged_replayed_or_moved",
            f"{ATTACKS}::test_A36_the_real_server_binds_puzzles_to_the_source_address",
        ),
        why="The challenge MAC covers the source address: without it, a solution can be moved to another address.",
    ),
    Mutation(
        name="puzzle-replay-cache",
        file="secureim/server/puzzle_gate.py",
        find="if token in self._used:",
        replace="if False:",
        tests=(f"{ATTACKS}::test_A36_puzzle_solutions_cannot_be_forged_replayed_or_moved",),
        why="A puzzle solution is accepted once: without the cache, one solution opens unlimited connections.",
    ),
    Mutation(
        name="puzzle-expiry",
        file="secureim/server/puzzle_gate.py",
        find="if not 0 <= now - issued_at <= LIFETIME_S:",
        replace="if False:",
        tests=(f"{ATTACKS}::test_A36_puzzle_solutions_cannot_be_forged_replayed_or_moved",),
        why="Challenges expire after 60 s, so solutions cannot be stockpiled.",
    ),
    Mutation(
        name="puzzle-difficulty-floor",
        file="secureim/server/puzzle_gate.py",
        find="if difficulty < required:",
        replace="if False:",
        tests=(f"{ATTACKS}::test_A36_puzzle_solutions_cannot_be_forged_replayed_or_moved",),
        why="A solution to an easier, older challenge does not pass when load has raised the difficulty.",
    ),
    Mutation(
        name="ticket-identity-binding",
        file="secureim/server/tickets.py",
        find="        if (\n            version != TICKET_VERSION\n            or expires < self._clock()\n            or not cu.constant_time_equal(bound_key, identity_key)\n        ):\n",
        replace="        if version != TICKET_VERSION or expires < self._clock():\n",
        tests=(f"{SERVER}::test_tickets_are_bound_forged_and_expired_ones_refused",),
        why="A resumption ticket works only with the identity key it was issued to: a stolen ticket is useless.",
    ),
    Mutation(
        name="ticket-expiry",
        file="secureim/server/tickets.py",
        find="        if (\n            version != TICKET_VERSION\n            or expires < self._clock()\n            or not cu.constant_time_equal(bound_key, identity_key)\n        ):\n",
        replace="        if version != TICKET_VERSION or not cu.constant_time_equal(bound_key, identity_key):\n",
        tests=(f"{SERVER}::test_tickets_are_bound_forged_and_expired_ones_refused",),
        why="Resumption tickets expire.",
    ),
    # --- client (clientlib.py) ------------------------------------------------------------------
    Mutation(
        name="client-reply-deadline",
        file="secureim/client/connection.py",
        find="self.sock.settimeout(self.reply_timeout_s)",
        replace="self.sock.settimeout(None)",
        tests=(f"{ATTACKS}::test_A09_client_gives_up_on_a_server_that_accepts_and_never_answers",),
        why="The client gives up on a server that accepts and never answers, on its own deadline.",
    ),
    Mutation(
        name="client-server-pin",
        file="secureim/client/connection.py",
        find="elif not cu.constant_time_equal(known, key):",
        replace="elif False:",
        tests=(f"{ATTACKS}::test_A13_impostor_server_with_its_own_identity_is_refused_once_pinned",),
        why="TOFU: a server key different from the one pinned on first contact is refused.",
    ),
    Mutation(
        name="client-puzzle-cap",
        file="secureim/proto/puzzle.py",
        find="if difficulty > CLIENT_MAX_DIFFICULTY:",
        replace="if False:",
        tests=(f"{ATTACKS}::test_A38_client_refuses_absurd_puzzles",),
        why="A client refuses puzzles over 24 bits: a hostile server cannot make it grind for hours.",
    ),
    Mutation(
        name="client-sanitiser",
        file="secureim/client/display.py",
        find='        if cat in ("Cc", "Zl", "Zp", "Co", "Cs", "Cn") or (\n            cat == "Cf" and ord(ch) not in HARMLESS_FORMAT_CHARS\n        ):\n',
        replace="        if False:\n",
        tests=(f"{ATTACKS}::test_A34_terminal_escape_sequences_are_neutralised",),
        why="Control, format and bidi characters from peers are shown escaped: raw, peers rewrite the screen.",
    ),
    # --- direct mode (direct.py) ------------------------------------------------------------------
    Mutation(
        name="direct-replay-window",
        file="secureim/e2e/datagrams.py",
        find="if not self._window.check(seq):",
        replace="if False:",
        tests=(f"{DIRECT}::test_replayed_datagram_is_refused",),
        why="Direct datagrams pass a replay window (RFC 6479) before anything else: without it, a replay is "
        "only caught later by the reliability layer's duplicate check.",
    ),
    Mutation(
        name="direct-ticket-replay",
        file="secureim/e2e/datagrams.py",
        find="if t.ticket_id in self._seen_tickets:",
        replace="if False:",
        tests=(f"{DIRECT}::test_replayed_ticket_stranger_and_tampered_datagrams_are_refused",),
        why="A direct-mode ticket opens one link: a replayed hello is refused.",
    ),
]
