"""The client as a library: connect, pin the server, log in, open conversations, chat.

Layer: above ``proto`` and ``e2e``; never imports ``secureim.server`` or ``secureim.tui``.  This
package's ``__init__`` is the facade the terminal (``secureim.tui``), scripts, tests and benchmarks
use: :class:`ChatClient`, the events it emits, and the helpers to show text safely.

Two layers of encryption:

- the *session* layer (``proto.ClientProtocol``) to the server;
- the *conversation* layer (``e2e.sessions.E2ESession``) end to end with the peer: keyed by the
  KDC key *and* an identity-signed DH between the two clients, then a fresh key per message.
  The server relays its output as opaque bytes.

Incoming things arrive as typed events on a queue (``ChatClient.next_event()``).

Several servers of one service (``servers=[(host, port), ...]``) share one server key: the pin,
the identity file and the peer keys are all kept under the *service id*, the first entry, so
failing over to another node is neither a new server nor a key change.  ``auto_reconnect=True``
resumes on the next live node with the session ticket when the connection is lost
(docs/CLIENT.md).

- ``chat``: :class:`ChatClient`, a facade over its parts (its docstring: which thread runs what,
  and the lock order): ``connection``, ``session``, ``account``, ``trust``, ``conversations``,
  ``sending``, ``incoming``, ``direct``; each gets the narrow Protocol it needs (``ports``);
- ``events``: the event records; ``display``: ``sanitize``;
- ``pinning``: known servers, pending keys, the home folder;
- ``offline``: store and forward (the mailbox; its worker: ``courier``; stored messages in: ``inbox``); ``waiting``: lines that
  cannot leave yet (``MAX_QUEUED_LINES``, the policy the terminal and scripts share);
  ``rooms`` (+ ``room_messaging``, ``room_events``): group rooms; ``history``: the encrypted local
  history; ``scripting``: ``send``/``receive`` and the JSON-lines interface.
"""

from __future__ import annotations

# What the terminal needs beyond the client itself, so that it imports this facade alone.
from diffiehellman import DEFAULT_GROUP as DEFAULT_GROUP
from diffiehellman import GROUPS as GROUPS
from secureim.client.chat import (
    CONNECT_TIMEOUT_S as CONNECT_TIMEOUT_S,
)
from secureim.client.chat import (
    EVENT_QUEUE_MAX as EVENT_QUEUE_MAX,
)
from secureim.client.chat import (
    KEY_EXCHANGE_WAIT_S as KEY_EXCHANGE_WAIT_S,
)
from secureim.client.chat import (
    NODE_CONNECT_TIMEOUT_S as NODE_CONNECT_TIMEOUT_S,
)
from secureim.client.chat import (
    NODE_SHUTDOWN_REASONS as NODE_SHUTDOWN_REASONS,
)
from secureim.client.chat import (
    PRESENCE_OFFLINE as PRESENCE_OFFLINE,
)
from secureim.client.chat import (
    PRESENCE_ONLINE as PRESENCE_ONLINE,
)
from secureim.client.chat import (
    PRESENCE_REFUSED as PRESENCE_REFUSED,
)
from secureim.client.chat import (
    PRESENCE_UNKNOWN as PRESENCE_UNKNOWN,
)
from secureim.client.chat import (
    PUBLISH_WAIT_S as PUBLISH_WAIT_S,
)
from secureim.client.chat import (
    RECONNECT_ATTEMPTS as RECONNECT_ATTEMPTS,
)
from secureim.client.chat import (
    RECONNECT_BASE_DELAY_S as RECONNECT_BASE_DELAY_S,
)
from secureim.client.chat import (
    RECONNECT_MAX_DELAY_S as RECONNECT_MAX_DELAY_S,
)
from secureim.client.chat import (
    RECONNECT_MAX_S as RECONNECT_MAX_S,
)
from secureim.client.chat import (
    REPLY_TIMEOUT_S as REPLY_TIMEOUT_S,
)
from secureim.client.chat import (
    ChatClient as ChatClient,
)
from secureim.client.chat import (
    default_home as default_home,
)
from secureim.client.display import (
    HARMLESS_FORMAT_CHARS as HARMLESS_FORMAT_CHARS,
)
from secureim.client.display import (
    MAX_DISPLAY_CHARS as MAX_DISPLAY_CHARS,
)
from secureim.client.display import (
    sanitize as sanitize,
)
from secureim.client.display import (
    sanitize_lines as sanitize_lines,
)
from secureim.client.events import (
    AccountDeletion as AccountDeletion,
)
from secureim.client.events import (
    ConversationReady as ConversationReady,
)
from secureim.client.events import (
    DirectFallback as DirectFallback,
)
from secureim.client.events import (
    DirectReady as DirectReady,
)
from secureim.client.events import (
    DirectRequested as DirectRequested,
)
from secureim.client.events import (
    Disconnected as Disconnected,
)
from secureim.client.events import (
    HistoryUnavailable as HistoryUnavailable,
)
from secureim.client.events import (
    MessageDelivered as MessageDelivered,
)
from secureim.client.events import (
    MessageNotStored as MessageNotStored,
)
from secureim.client.events import (
    MessageReceived as MessageReceived,
)
from secureim.client.events import (
    MessageRejected as MessageRejected,
)
from secureim.client.events import (
    MessageStored as MessageStored,
)
from secureim.client.events import (
    MessageUndelivered as MessageUndelivered,
)
from secureim.client.events import (
    PeerOffline as PeerOffline,
)
from secureim.client.events import (
    PeerOnline as PeerOnline,
)
from secureim.client.events import (
    PeerUnknown as PeerUnknown,
)
from secureim.client.events import (
    Reconnected as Reconnected,
)
from secureim.client.events import (
    Reconnecting as Reconnecting,
)
from secureim.client.events import (
    SecurityWarning as SecurityWarning,
)
from secureim.client.events import (
    ServerNotice as ServerNotice,
)
from secureim.client.events import (
    WhoList as WhoList,
)
from secureim.client.history import (
    DEFAULT_MAX_AGE_DAYS as DEFAULT_MAX_AGE_DAYS,
)
from secureim.client.history import (
    DEFAULT_MAX_PER_CONVERSATION as DEFAULT_MAX_PER_CONVERSATION,
)
from secureim.client.history import (
    OUTGOING as OUTGOING,
)
from secureim.client.history import (
    SHOWN_ON_OPEN as SHOWN_ON_OPEN,
)
from secureim.client.history import (
    STATE_REFUSED as STATE_REFUSED,
)
from secureim.client.pinning import (
    KNOWN_SERVERS_FILE as KNOWN_SERVERS_FILE,
)
from secureim.client.pinning import (
    MAX_SERVERS as MAX_SERVERS,
)
from secureim.client.pinning import (
    KnownServers as KnownServers,
)
from secureim.client.pinning import (
    PendingKeys as PendingKeys,
)
from secureim.client.pinning import (
    check_home as check_home,
)
from secureim.client.pinning import (
    parse_fingerprint as parse_fingerprint,
)
from secureim.client.pinning import (
    parse_servers as parse_servers,
)
from secureim.client.rooms import (
    RoomMessageReceived as RoomMessageReceived,
)
from secureim.client.rooms import (
    RoomNotice as RoomNotice,
)
from secureim.client.rooms import (
    RoomWarning as RoomWarning,
)
from secureim.client.waiting import (
    MAX_QUEUED_LINES as MAX_QUEUED_LINES,
)
from secureim.client.waiting import (
    LineOutcome as LineOutcome,
)
from secureim.e2e.rooms import ROOM_RE as ROOM_RE
from secureim.e2e.rooms import normalize_room as normalize_room
from secureim.e2e.sessions import MAX_TEXT_BYTES as MAX_TEXT_BYTES
from secureim.proto import (
    DEFAULT_PORT as DEFAULT_PORT,
)
from secureim.proto import (
    MAX_PASSWORD_BYTES as MAX_PASSWORD_BYTES,
)
from secureim.proto import (
    TICKET_LIFETIME_S as TICKET_LIFETIME_S,
)
from secureim.proto import (
    normalize_username as normalize_username,
)
