"""The terminal client: log in, pick a destination, chat (``python client.py``).

Layer: the top.  It uses the client library only through its facade (``secureim.client``) and
``secureim.client.scripting`` for the one-shot commands; never the server or the storage.

Incoming messages are printed above the line being typed (prompt_toolkit's run_in_terminal), so
they never garble it.  Everything from the network is passed through ``client.sanitize`` before
it is shown.  Exit codes: 0 normal exit (sent), 1 error (server unreachable, connection lost,
message refused), 2 usage, 3 the server's identity key did not match, 4 login failed.

The terminal stays when the connection drops (docs/CLIENT.md, "When the connection drops"): it
resumes with the session ticket, queues what is typed meanwhile, and ends only on /quit, Ctrl-D,
a final failure, or a refused ticket the user does not replace with a new login.

- ``main``: the command line; ``login``: logging in and registering; ``app``: ``ChatUI``;
- ``terminal``: prompts and output above the input line; ``commands``: slash commands and help.
"""
