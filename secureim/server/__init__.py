"""The secureim server: handshake, database-backed login, Key Distribution Center, relay.

Layer: above ``proto``, ``e2e`` and ``storage``; never imports ``secureim.client`` or
``secureim.tui``.  Top to bottom (each imports only modules below it; no imports in functions):

- ``main``: the command line and the process's life (``python server.py``); ``options``,
  ``config``, ``workers`` (the ``--workers`` supervisor), ``admin`` and ``console``;
- ``net``: the network shell: the asyncio listener, one ``Link`` per connection, the worker
  pools; writes never block on a slow reader, and a client that stops reading is dropped;
- ``service``: ``ChatService``, the composition root: builds the domain handlers, the router and
  the ``runtime``; the façade the shell, the operator's tools, tests and the cluster (its
  ``ClusterHost``) use.  It never touches a socket;
- ``router``: **the table of where each message type runs** (the loop thread, the worker pool,
  the password pool) and which handler takes it, with the threads and the lock order;
- one module per domain, each seeing the others only through the Protocols of ``ports``:
  ``logins`` (login, resume, password change, deletion; ``accounts`` has the password rules and
  bcrypt), ``presence``, ``kdc`` (keys and the relay, the hot path), ``direct``, ``store_forward``
  (prekeys, the offline queue), ``rooms``, ``moderation``, ``tickets``, ``metrics``;
- ``registry``: the shared state (sessions, who is online, live conversations), one lock;
- ``cluster``: what crosses server nodes (``local`` for one process, ``nats_bus`` for several).

The relay opens only the outer (session) layer: the payload inside a Relay is sealed end to end
by the clients, and is forwarded as opaque bytes.
"""
