"""The secureim server: handshake, database-backed login, Key Distribution Center, relay.

Layer: above ``proto``, ``e2e`` and ``storage``; never imports ``secureim.client`` or
``secureim.tui``.  Top to bottom:

- ``main``: the command line and the process's life (``python server.py``);
- ``net``: the network shell: the asyncio listener, one ``Link`` per connection, the worker
  pools; writes never block on a slow reader, and a client that stops reading is dropped;
- ``service``: ``ChatService``, what the server does with each typed message (login, presence,
  KDC, relay, queue, direct mode); it never touches a socket;
- ``registry``: the shared state (who is online, live conversations), one object, one lock;
- one module per domain: ``accounts`` (passwords, lockout), ``rooms``, ``tickets``,
  ``moderation``, ``admin`` (the operator's CLI), ``console``, ``metrics``, ``workers``;
- ``cluster``: what crosses server nodes (``local`` for one process, ``nats_bus`` for several).

The relay opens only the outer (session) layer: the payload inside a Relay is sealed end to end
by the clients, and is forwarded as opaque bytes.
"""
