"""End-to-end secrecy between clients, even against the server (sans-IO).

Layer: beside ``proto`` at the bottom: no socket, thread, database or terminal; files only
through the stores' explicit load/save calls.  It imports ``crypto_utils``, ``secureim.errors``
and ``secureim.proto`` (for the wire limits and names).

- ``sessions``: identities, the pairwise double-DH + ML-KEM sessions and their ratchet;
- ``prekeys``: prekey bundles and offline sessions (store and forward, PROTOCOL.md 15);
- ``rooms``: signed room membership, sender keys, room messages (PROTOCOL.md 16);
- ``datagrams``: direct mode's reliable, ordered, authenticated channel over UDP.
"""
