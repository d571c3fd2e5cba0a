"""Mutation catalogue, post-quantum area (issue 18): each hybrid X25519 + ML-KEM-768 defence switched off.

Every entry was applied by hand to a scratch copy of the repository and its tests
seen failing (docs/SECURITY.md, section "Post-quantum: recorded traffic against a
future quantum computer").
"""

from __future__ import annotations

from model import Mutation

PQ = "tests/integration/test_attacks_pq.py::"
VEC = "tests/unit/crypto/test_vectors_mlkem.py::"

MUTATIONS: list[Mutation] = [
    Mutation(
        name="pq-default-group-classical",
        file="diffiehellman.py",
        find='DEFAULT_GROUP = "x25519-mlkem768"',
        replace='DEFAULT_GROUP = "x25519"',
        tests=(PQ + "test_the_default_is_hybrid_and_offers_x25519_only_as_a_fallback",),
        why="Without the hybrid default every session is X25519 only: recordable now, decryptable later.",
    ),
    Mutation(
        name="pq-hybrid-secret-without-mlkem",
        file="diffiehellman.py",
        find="    return kem_secret + x25519_secret",
        replace="    return x25519_secret",
        tests=(PQ + "test_PQ14_recorded_handshake_session_needs_both_x25519_and_mlkem_secrets",),
        why="A handshake secret without the ML-KEM part falls to whoever breaks X25519 (harvest now, decrypt later).",
    ),
    Mutation(
        name="pq-downgrade-accepted",
        file="secureim/proto/handshake.py",
        find="        if self._allows(msg.group):\n",
        replace="        if False:\n",
        tests=(
            PQ + "test_PQ01_forged_group_retry_is_refused_by_the_server_as_a_downgrade",
            PQ + "test_PQ06_on_the_wire_a_classical_share_with_the_hybrid_list_is_a_downgrade",
        ),
        why="A forged GroupRetry or a rewritten share pushes both sides to classical X25519 unnoticed.",
    ),
    Mutation(
        name="pq-share-outside-offered-list",
        file="secureim/proto/handshake.py",
        find="        if msg.group not in offered:",
        replace="        if False:",
        tests=(PQ + "test_PQ05_share_outside_the_offered_list_is_refused",),
        why="A share in a group the client never offered would bypass the downgrade rule on the signed list.",
    ),
    Mutation(
        name="pq-client-accepts-any-group-retry",
        file="secureim/proto/handshake.py",
        find="            if msg.group not in self._groups or msg.group == self._dh.group.name:",
        replace="            if False:",
        tests=(PQ + "test_PQ03_client_refuses_a_retry_for_a_group_it_did_not_offer_or_a_second_retry",),
        why="An unauthenticated GroupRetry could move the client to any allowlisted group, even one it refused.",
    ),
    Mutation(
        name="pq-server-share-size-after-work",
        file="secureim/proto/handshake.py",
        find="            if len(msg.public) != share_length(group):  # sizes first, before any puzzle or DH work",
        replace="            if False:",
        tests=(PQ + "test_PQ07_wrong_size_hybrid_share_is_refused_before_any_work",),
        why="Shares of the wrong size would reach the puzzle and the key exchange before being refused.",
    ),
    Mutation(
        name="pq-client-answer-size-unchecked",
        file="diffiehellman.py",
        find="        if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != expected:",
        replace="        if False:",
        tests=(PQ + "test_PQ10_wrong_size_or_forged_server_answer",),
        why="A server answer of the wrong size would be split and decapsulated before being refused.",
    ),
    Mutation(
        name="pq-encapsulation-key-size-unchecked",
        file="crypto_utils.py",
        find="    if (\n        not isinstance(encapsulation_key, (bytes, bytearray))\n        or len(encapsulation_key) != MLKEM768_ENCAPSULATION_KEY_BYTES\n    ):\n",
        replace="    if not isinstance(encapsulation_key, (bytes, bytearray)) or False:\n",
        tests=(VEC + "test_mlkem768_encapsulation_key_checks_wycheproof",),
        why="Keys of the wrong size go to OpenSSL unchecked and come back as a misleading error.",
    ),
    Mutation(
        name="pq-encapsulation-key-modulus-error-unwrapped",
        file="crypto_utils.py",
        find='    except ValueError:  # right size, so the modulus check failed\n        raise InvalidKemValue(\n            "The ML-KEM-768 encapsulation key is malformed (a coefficient is not reduced modulo q)."\n',
        replace='    except ValueError:  # right size, so the modulus check failed\n        raise ValueError(\n            "The ML-KEM-768 encapsulation key is malformed (a coefficient is not reduced modulo q)."\n',
        tests=(
            VEC + "test_mlkem768_encapsulation_key_checks_wycheproof",
            PQ + "test_PQ09_malformed_encapsulation_key_is_refused_with_a_clear_error",
            PQ + "test_PQ12_malformed_encapsulation_key_in_a_signed_share_is_refused",
        ),
        why="A malformed ML-KEM key would escape as a bare ValueError: a crash instead of a clear refusal.",
    ),
    Mutation(
        name="pq-ciphertext-size-unchecked",
        file="crypto_utils.py",
        find="        if not isinstance(ciphertext, (bytes, bytearray)) or len(ciphertext) != MLKEM768_CIPHERTEXT_BYTES:",
        replace="        if False:",
        tests=(VEC + "test_mlkem768_keygen_and_decapsulation_wycheproof",),
        why="Ciphertexts of the wrong size go to OpenSSL unchecked and come back as a misleading error.",
    ),
    Mutation(
        name="pq-e2e-root-without-mlkem",
        file="secureim/e2e/sessions.py",
        find='    return cu.hkdf(\n        kdc_key + dh + kem_secrets[0] + kem_secrets[1],\n        salt=transcript_hash,\n        info=cu.label("e2e root x25519-mlkem768"),\n        length=32,\n    )\n',
        replace='    return cu.hkdf(kdc_key + dh, salt=transcript_hash, info=cu.label("e2e root x25519-mlkem768"), length=32)\n',
        tests=(PQ + "test_PQ15_recorded_conversation_needs_both_x25519_and_mlkem_secrets",),
        why="A conversation root without ML-KEM falls to a server that kept the KDC key and later breaks X25519.",
    ),
    Mutation(
        name="pq-e2e-root-without-x25519",
        file="secureim/e2e/sessions.py",
        find="        kdc_key + dh + kem_secrets[0] + kem_secrets[1],\n",
        replace="        kdc_key + kem_secrets[0] + kem_secrets[1],\n",
        tests=(PQ + "test_PQ15_recorded_conversation_needs_both_x25519_and_mlkem_secrets",),
        why="A conversation root without X25519 rests on ML-KEM alone: a flaw in the new scheme would open it.",
    ),
    Mutation(
        name="pq-e2e-share-size-unchecked",
        file="secureim/e2e/sessions.py",
        find="        if len(payload) != layout.size:",
        replace="        if False:",
        tests=(PQ + "test_PQ11_wrong_size_shares_and_replies_are_refused",),
        why="A share or reply of the wrong size would crash the receiver (struct.error) instead of a refusal.",
    ),
    Mutation(
        name="pq-e2e-malformed-key-unwrapped",
        file="secureim/e2e/sessions.py",
        find="        except InvalidKemValue as exc:\n            raise ShareRejected(",
        replace="        except ZeroDivisionError as exc:\n            raise ShareRejected(",
        tests=(PQ + "test_PQ12_malformed_encapsulation_key_in_a_signed_share_is_refused",),
        why="A peer's malformed ML-KEM key would escape as an unexpected error instead of a refused conversation.",
    ),
    Mutation(
        name="pq-e2e-reply-signature-unchecked",
        file="secureim/e2e/sessions.py",
        find="        if not cu.verify_signature(\n            self.peer_identity,\n            signature,\n            _share_transcript(self.id, generation, self.peer, self.me, ciphertext + answered, KIND_KEM_REPLY),\n        ):\n",
        replace="        if False:\n",
        tests=(PQ + "test_PQ13_swapped_ciphertext_or_early_reply_is_refused",),
        why="The server could swap the ML-KEM ciphertext; the clients would then silently hold different roots.",
    ),
    Mutation(
        name="pq-e2e-reply-before-share",
        file="secureim/e2e/sessions.py",
        find="        if gen.peer_share is None or gen.kem_to_peer is None or gen.dh is None:",
        replace="        if False:",
        tests=(PQ + "test_PQ13_swapped_ciphertext_or_early_reply_is_refused",),
        why="A reply arriving before its share would be processed against missing state (a crash).",
    ),
]
