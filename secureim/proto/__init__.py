"""The secureim wire protocol, sans-IO: frames, typed messages, handshake and records.

Layer: the bottom of the package beside ``e2e``.  Nothing here touches a socket, a thread, a
database, a file or the terminal; it imports only ``crypto_utils``, ``diffiehellman`` and
``secureim.errors``.  Both the server (``secureim.server``) and the client (``secureim.client``)
drive it the same way::

    events = proto.receive_data(bytes_from_socket)   # typed events out
    sock.sendall(proto.data_to_send())               # handshake replies
    sock.sendall(proto.send(SomeMessage(...)))       # sealed application messages

- ``limits``: the wire constants and the username rule;
- ``codec``: typed fields and the ``@message`` decorator (one encode/decode pair per message);
- ``messages``: every message, one frozen dataclass each;
- ``records``: frames (length prefix, hard maximum) and the record layer's traffic keys;
- ``handshake``: the handshake and session state machines (a transition table);
- ``puzzle``: the stateless client puzzle issued before costly work.

This package re-exports the public names of those modules, so ``from secureim import proto as P``
then ``P.Login`` reads like the protocol.  Every byte layout, state and key is in docs/PROTOCOL.md.
"""

from __future__ import annotations

from diffiehellman import DEFAULT_GROUP as DEFAULT_GROUP
from diffiehellman import GROUPS as GROUPS
from secureim.proto.codec import (
    MESSAGE_TYPES as MESSAGE_TYPES,
)
from secureim.proto.codec import (
    Kind as Kind,
)
from secureim.proto.codec import (
    Message as Message,
)
from secureim.proto.codec import (
    decode_message as decode_message,
)
from secureim.proto.codec import (
    message as message,
)
from secureim.proto.codec import (
    wire as wire,
)
from secureim.proto.handshake import (
    RECEIVE_TABLE as RECEIVE_TABLE,
)
from secureim.proto.handshake import (
    SEND_TABLE as SEND_TABLE,
)
from secureim.proto.handshake import (
    SIGNATURE_CONTEXT as SIGNATURE_CONTEXT,
)
from secureim.proto.handshake import (
    ClientProtocol as ClientProtocol,
)
from secureim.proto.handshake import (
    Connection as Connection,
)
from secureim.proto.handshake import (
    HandshakeComplete as HandshakeComplete,
)
from secureim.proto.handshake import (
    Role as Role,
)
from secureim.proto.handshake import (
    ServerProtocol as ServerProtocol,
)
from secureim.proto.handshake import (
    State as State,
)
from secureim.proto.handshake import (
    derive_handshake_keys as derive_handshake_keys,
)
from secureim.proto.limits import (
    DEFAULT_PORT as DEFAULT_PORT,
)
from secureim.proto.limits import (
    FRAME_HEADER as FRAME_HEADER,
)
from secureim.proto.limits import (
    MAX_FRAME_BYTES as MAX_FRAME_BYTES,
)
from secureim.proto.limits import (
    MAX_OFFERED_GROUPS as MAX_OFFERED_GROUPS,
)
from secureim.proto.limits import (
    MAX_PASSWORD_BYTES as MAX_PASSWORD_BYTES,
)
from secureim.proto.limits import (
    MAX_PAYLOAD_BYTES as MAX_PAYLOAD_BYTES,
)
from secureim.proto.limits import (
    MAX_PUBLIC_VALUE_BYTES as MAX_PUBLIC_VALUE_BYTES,
)
from secureim.proto.limits import (
    MAX_REASON_BYTES as MAX_REASON_BYTES,
)
from secureim.proto.limits import (
    MAX_RESPONSE_VALUE_BYTES as MAX_RESPONSE_VALUE_BYTES,
)
from secureim.proto.limits import (
    MAX_TICKET_BYTES as MAX_TICKET_BYTES,
)
from secureim.proto.limits import (
    MAX_USERNAME_BYTES as MAX_USERNAME_BYTES,
)
from secureim.proto.limits import (
    MAX_WHO_USERS as MAX_WHO_USERS,
)
from secureim.proto.limits import (
    NONCE_BYTES as NONCE_BYTES,
)
from secureim.proto.limits import (
    PROTOCOL_VERSION as PROTOCOL_VERSION,
)
from secureim.proto.limits import (
    SEQUENCE_LIMIT as SEQUENCE_LIMIT,
)
from secureim.proto.limits import (
    TICKET_LIFETIME_S as TICKET_LIFETIME_S,
)
from secureim.proto.limits import (
    USERNAME_RE as USERNAME_RE,
)
from secureim.proto.limits import (
    USERNAME_RULES as USERNAME_RULES,
)
from secureim.proto.limits import (
    normalize_username as normalize_username,
)
from secureim.proto.messages import (
    MAX_CHANGE_BYTES as MAX_CHANGE_BYTES,
)
from secureim.proto.messages import (
    MAX_PREKEYS_PER_PUBLISH as MAX_PREKEYS_PER_PUBLISH,
)
from secureim.proto.messages import (
    MAX_ROOM_NAME_BYTES as MAX_ROOM_NAME_BYTES,
)
from secureim.proto.messages import (
    MSG_REF_BYTES as MSG_REF_BYTES,
)
from secureim.proto.messages import (
    ONE_TIME_PREKEY_BYTES as ONE_TIME_PREKEY_BYTES,
)
from secureim.proto.messages import (
    SIGNED_PREKEY_BYTES as SIGNED_PREKEY_BYTES,
)
from secureim.proto.messages import (
    AccountDeleted as AccountDeleted,
)
from secureim.proto.messages import (
    Ack as Ack,
)
from secureim.proto.messages import (
    AuthCode as AuthCode,
)
from secureim.proto.messages import (
    AuthFailed as AuthFailed,
)
from secureim.proto.messages import (
    AuthOk as AuthOk,
)
from secureim.proto.messages import (
    ChangePassword as ChangePassword,
)
from secureim.proto.messages import (
    ClientFinished as ClientFinished,
)
from secureim.proto.messages import (
    ClientHello as ClientHello,
)
from secureim.proto.messages import (
    ConversationKey as ConversationKey,
)
from secureim.proto.messages import (
    Defer as Defer,
)
from secureim.proto.messages import (
    DeleteAccount as DeleteAccount,
)
from secureim.proto.messages import (
    Deliver as Deliver,
)
from secureim.proto.messages import (
    DirectAsked as DirectAsked,
)
from secureim.proto.messages import (
    DirectOffer as DirectOffer,
)
from secureim.proto.messages import (
    DirectRequest as DirectRequest,
)
from secureim.proto.messages import (
    DirectUnavailable as DirectUnavailable,
)
from secureim.proto.messages import (
    Error as Error,
)
from secureim.proto.messages import (
    ErrorCode as ErrorCode,
)
from secureim.proto.messages import (
    Goodbye as Goodbye,
)
from secureim.proto.messages import (
    GroupRetry as GroupRetry,
)
from secureim.proto.messages import (
    HandshakeError as HandshakeError,
)
from secureim.proto.messages import (
    HandshakeErrorCode as HandshakeErrorCode,
)
from secureim.proto.messages import (
    KeyUpdate as KeyUpdate,
)
from secureim.proto.messages import (
    Login as Login,
)
from secureim.proto.messages import (
    OfflineKey as OfflineKey,
)
from secureim.proto.messages import (
    OfflineOpen as OfflineOpen,
)
from secureim.proto.messages import (
    OpenConversation as OpenConversation,
)
from secureim.proto.messages import (
    PasswordChanged as PasswordChanged,
)
from secureim.proto.messages import (
    PasswordChangeFailed as PasswordChangeFailed,
)
from secureim.proto.messages import (
    PeerStatus as PeerStatus,
)
from secureim.proto.messages import (
    PrekeyStatus as PrekeyStatus,
)
from secureim.proto.messages import (
    PublishPrekeys as PublishPrekeys,
)
from secureim.proto.messages import (
    Puzzle as Puzzle,
)
from secureim.proto.messages import (
    Register as Register,
)
from secureim.proto.messages import (
    RegisterEndpoint as RegisterEndpoint,
)
from secureim.proto.messages import (
    Relay as Relay,
)
from secureim.proto.messages import (
    Resume as Resume,
)
from secureim.proto.messages import (
    RoomChange as RoomChange,
)
from secureim.proto.messages import (
    RoomChanged as RoomChanged,
)
from secureim.proto.messages import (
    RoomCreate as RoomCreate,
)
from secureim.proto.messages import (
    RoomMessage as RoomMessage,
)
from secureim.proto.messages import (
    RoomResult as RoomResult,
)
from secureim.proto.messages import (
    RoomSend as RoomSend,
)
from secureim.proto.messages import (
    RoomSendResult as RoomSendResult,
)
from secureim.proto.messages import (
    RoomStatus as RoomStatus,
)
from secureim.proto.messages import (
    ServerAuth as ServerAuth,
)
from secureim.proto.messages import (
    ServerHello as ServerHello,
)
from secureim.proto.messages import (
    Store as Store,
)
from secureim.proto.messages import (
    StoredMessage as StoredMessage,
)
from secureim.proto.messages import (
    StoreResult as StoreResult,
)
from secureim.proto.messages import (
    StoreStatus as StoreStatus,
)
from secureim.proto.messages import (
    WhoRequest as WhoRequest,
)
from secureim.proto.messages import (
    WhoResponse as WhoResponse,
)
from secureim.proto.records import (
    RECORD_AAD_PREFIX as RECORD_AAD_PREFIX,
)
from secureim.proto.records import (
    FrameDecoder as FrameDecoder,
)
from secureim.proto.records import (
    TrafficKeys as TrafficKeys,
)
from secureim.proto.records import (
    encode_frame as encode_frame,
)
