"""secureim: a secure terminal instant messenger (server, client library, terminal).

The folders are the layers, bottom to top (docs/ARCHITECTURE.md draws them):

- ``errors``: the one exception tree;
- ``proto``: the wire protocol, sans-IO (frames, messages, handshake, records, puzzle);
- ``e2e``: end-to-end secrecy, sans-IO (pairwise sessions, prekeys, rooms, direct datagrams);
- ``storage``: the server's database (SQLite and MySQL/MariaDB);
- ``server``: the network shell, the registry and one module per domain;
- ``client``: the client library and its facade, ``ChatClient``;
- ``tui``: the terminal, which uses only the client facade.

Beside the package, at the top of the repository: ``crypto_utils`` (the one crypto surface) and
``diffiehellman`` (the DH groups) are the base every layer stands on; ``server.py`` and
``client.py`` are the entry points; ``database.py`` re-exports ``storage``.
"""
