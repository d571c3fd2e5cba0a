"""Group rooms, end to end (sans-IO): signed membership, sender keys, room messages.

docs/PROTOCOL.md section 16.  Three layers, each checked by the clients, not trusted
to the server:

- **Membership** is a hash chain of changes (create, add, remove, leave, close), each
  signed by the identity key of whoever made it: the admin for create, add, remove and
  close, the member who goes for a leave.  Every change names the room's random
  ``uid``, its epoch (1 for the creation, +1 per change), the head hash of the change
  before it and the complete **roster** after it: every member's name *and identity
  key*, as the admin vouches for them.  :meth:`RoomSession.apply` accepts a change
  only if all of that follows from the state this client already verified, and checks
  its signature with the key the roster gives its author (never one the server
  sends), so a server cannot add a member unseen, forge a leave, drop a change,
  reorder two, or replay one from another room (another uid) or another epoch.
- **The KDC layer**: for every epoch the server makes a fresh room key and hands it to
  the members it knows (seed design 000, as per conversation).  Every message key is
  also derived from it: a member the server removed cannot open what follows even with
  a leaked sender key.
- **Sender keys** (as in Signal's groups): every member has, per epoch, its own chain
  key and its own Ed25519 signing key, made fresh (never derived from an earlier one)
  and sent to each member of that epoch over the pairwise end-to-end sessions
  (``e2e.BODY_SENDER_KEY``).  Each message advances the chain (a fresh key, the old
  chain key overwritten) and is signed with the signing key, so a member holding the
  chain cannot forge another member's messages.  A member removed at epoch e+1 holds
  nothing of any epoch-(e+1) chain, and a member added at e+1 holds nothing of epoch e.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

import crypto_utils as cu
from secureim import proto as P
from secureim.e2e import prekeys as K
from secureim.e2e import sessions as e2e
from secureim.errors import ChangeRefused, CryptoError, DecryptionFailed, InvalidRoomName, SecureIMError

# --- names and bounds -------------------------------------------------------------
ROOM_RE = re.compile(r"#[a-z0-9_-]{1,32}")
ROOM_RULES = "Room names are '#' and 1 to 32 characters: letters a-z, digits, '_' or '-'."
DEFAULT_MAX_MEMBERS = 256
HARD_MAX_MEMBERS = 512  # the wire limit: a change lists every member and key (about 34 KiB)
UID_BYTES = 16
HEAD_BYTES = 32
ZERO_HEAD = bytes(HEAD_BYTES)
MAX_KEPT_EPOCHS = 8  # epochs whose keys are kept for messages still on their way
MAX_KEYS_PER_SENDER = 4  # sender keys kept per member and epoch (a restart makes a new one)
MAX_ROOM_SKIPPED = 2000  # skipped message keys kept per room
MAX_PENDING = 64  # sender keys that arrived before the change they belong to...
MAX_PENDING_PER_SENDER = 2  # ...at most this many from one member...
MAX_PENDING_AHEAD = 2  # ...and for at most this many epochs past this client's
MAX_ROOMS = 256  # rooms one client keeps
IDENTITY_BYTES = 32

# --- membership changes -------------------------------------------------------------
CREATE, ADD, REMOVE, LEAVE, CLOSE = 1, 2, 3, 4, 5
ACTION_NAMES = {CREATE: "create", ADD: "add", REMOVE: "remove", LEAVE: "leave", CLOSE: "close"}
CHANGE_VERSION = 1
_CHANGE_FIXED = struct.Struct(">BB16sIQ32s")  # version, action, uid, epoch, made at (ms), previous head
_COUNT = struct.Struct(">H")
SIGNATURE_BYTES = 64
CHANGE_CONTEXT = b"secureim/v1 room change\x00"

# --- sender keys and messages -----------------------------------------------------
KEY_ID_BYTES = 8
_DISTRIBUTION = struct.Struct(
    ">16sI32s8sI32s32s"
)  # uid, epoch, head, key id, first counter, chain key, signing key
ROOM_MESSAGE_KIND = 0x10
_MESSAGE_HEADER = struct.Struct(">BI8sI")  # kind, epoch, key id, counter
MESSAGE_CONTEXT = b"secureim/v1 room message\x00"
MIN_MESSAGE_BYTES = _MESSAGE_HEADER.size + SIGNATURE_BYTES  # shorter is never a room message


def normalize_room(raw: str) -> str:
    """Lower-case and check a room name ('#team'); raises :class:`InvalidRoomName` with the rules."""
    if not isinstance(raw, str):
        raise InvalidRoomName(ROOM_RULES)
    name = raw.strip().lower() if raw.isascii() else raw
    if not ROOM_RE.fullmatch(name):
        raise InvalidRoomName(ROOM_RULES)
    return name


def _put_name(out: bytearray, name: str) -> None:
    raw = name.encode("ascii")
    if len(raw) > 255:
        raise ValueError("name too long")
    out += bytes([len(raw)]) + raw


class _Cursor:
    def __init__(self, data: bytes, offset: int = 0) -> None:
        self.data, self.pos = data, offset

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ChangeRefused("A malformed membership change was refused.")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def name(self) -> str:
        raw = self.take(self.take(1)[0])
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise ChangeRefused("A malformed membership change was refused.") from None


@dataclass(frozen=True)
class Change:
    """One membership change, as signed.  ``blob`` is the exact bytes (signature included)."""

    action: int
    uid: bytes
    room: str
    epoch: int
    at_ms: int
    prev_head: bytes
    actor: str
    target: str
    admin: str
    roster: tuple[tuple[str, bytes], ...]  # (member, identity key), by name
    signature: bytes
    blob: bytes

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(name for name, _key in self.roster)

    def identity_of(self, name: str) -> bytes | None:
        return next((key for member, key in self.roster if member == name), None)

    @property
    def signed_part(self) -> bytes:
        return self.blob[:-SIGNATURE_BYTES]

    @property
    def head(self) -> bytes:
        return change_head(self.blob)


def change_head(blob: bytes) -> bytes:
    """The hash the next change names as its predecessor."""
    return cu.sha256(b"secureim/v1 room head" + blob)


def make_change(
    identity: cu.IdentityKey,
    *,
    action: int,
    uid: bytes,
    room: str,
    epoch: int,
    at_ms: int,
    prev_head: bytes,
    actor: str,
    target: str,
    admin: str,
    roster,
) -> Change:
    """Encode and sign a change with ``identity`` (the actor's identity key); ``roster`` is
    every member after it as (name, identity key)."""
    out = bytearray(_CHANGE_FIXED.pack(CHANGE_VERSION, action, uid, epoch, at_ms, prev_head))
    for name in (room, actor, target, admin):
        _put_name(out, name)
    roster = tuple(sorted(roster))
    out += _COUNT.pack(len(roster))
    for name, key in roster:
        _put_name(out, name)
        if len(key) != IDENTITY_BYTES:
            raise ValueError("an identity key is 32 bytes")
        out += key
    signature = identity.sign(CHANGE_CONTEXT + bytes(out))
    return parse_change(bytes(out) + signature)


def parse_change(blob: bytes) -> Change:
    """Decode a change (no signature check yet); ChangeRefused if malformed or out of bounds."""
    if not isinstance(blob, bytes) or len(blob) < _CHANGE_FIXED.size + SIGNATURE_BYTES:
        raise ChangeRefused("A malformed membership change was refused.")
    version, action, uid, epoch, at_ms, prev = _CHANGE_FIXED.unpack_from(blob)
    cur = _Cursor(blob[:-SIGNATURE_BYTES], _CHANGE_FIXED.size)
    room, actor, target, admin = cur.name(), cur.name(), cur.name(), cur.name()
    (count,) = _COUNT.unpack(cur.take(_COUNT.size))
    if count > HARD_MAX_MEMBERS:
        raise ChangeRefused("A membership change listing too many members was refused.")
    roster = tuple((cur.name(), cur.take(IDENTITY_BYTES)) for _ in range(count))
    members = [name for name, _key in roster]
    if cur.pos != len(cur.data) or version != CHANGE_VERSION or action not in ACTION_NAMES or epoch < 1:
        raise ChangeRefused("A malformed membership change was refused.")
    if not ROOM_RE.fullmatch(room) or members != sorted(set(members)):
        raise ChangeRefused("A malformed membership change was refused.")
    for name in (actor, admin, *members) + ((target,) if target else ()):
        if not P.USERNAME_RE.fullmatch(name):
            raise ChangeRefused("A malformed membership change was refused.")
    return Change(
        action, uid, room, epoch, at_ms, prev, actor, target, admin, roster, blob[-SIGNATURE_BYTES:], blob
    )


def expected_roster(action: int, before, target: str, target_identity: bytes | None):
    """The roster after ``action`` on ``before`` (an add brings ``target_identity``)."""
    if action == ADD:
        return tuple(sorted([*before, (target, target_identity or b"")]))
    if action in (REMOVE, LEAVE):
        return tuple((m, k) for m, k in before if m != target)
    return ()


def check_rules(
    change: Change,
    before,
    admin: str | None,
    max_members: int = HARD_MAX_MEMBERS,
    *,
    names_only: bool = False,
) -> None:
    """Who may make ``change`` on top of roster ``before`` (None: the creation); ChangeRefused if not.
    ``names_only``: the server's check, which knows the members' names but not the keys clients
    were vouched (each client checks the keys against its own verified roster)."""
    a, who = change.action, change.actor
    if before is None:
        if (
            a != CREATE
            or change.epoch != 1
            or change.prev_head != ZERO_HEAD
            or who != change.admin
            or change.members != (who,)
            or change.target
        ):
            raise ChangeRefused(f"A change that does not create {change.room} was refused.")
        return
    before_names = tuple(m for m, _k in before)
    if a == CREATE:
        raise ChangeRefused(f"A second creation of {change.room} was refused.")
    if change.admin != admin:
        raise ChangeRefused(f"A change naming another admin of {change.room} was refused.")
    if a in (ADD, REMOVE, CLOSE) and who != admin:
        raise ChangeRefused(
            f"Only the admin of {change.room} ({admin}) may {ACTION_NAMES[a]} members; "
            f"a change made by {who} was refused."
        )
    if a == ADD and (not change.target or change.target in before_names):
        raise ChangeRefused(f"A change adding {change.target or 'nobody'} to {change.room} was refused.")
    if a == ADD and len(before_names) + 1 > max_members:
        raise ChangeRefused(f"{change.room} is full ({max_members} members).")
    if a in (REMOVE, LEAVE) and (change.target not in before_names or change.target == admin):
        raise ChangeRefused(f"A change removing {change.target or 'nobody'} from {change.room} was refused.")
    if a == LEAVE and who != change.target:
        raise ChangeRefused(f"{who} cannot make {change.target} leave {change.room}; the change was refused.")
    if a == CLOSE and change.target:
        raise ChangeRefused(f"A malformed closing of {change.room} was refused.")
    expected = expected_roster(a, before, change.target, change.identity_of(change.target))
    if names_only:
        follows = change.members == tuple(m for m, _k in expected)
    else:
        follows = len(change.roster) == len(expected) and all(
            m == n and cu.constant_time_equal(k, e)
            for (m, k), (n, e) in zip(change.roster, expected, strict=True)
        )
    if not follows:
        raise ChangeRefused(f"A change to {change.room} whose member list does not follow was refused.")


def verify_signature(change: Change, actor_identity: bytes) -> None:
    if not cu.verify_signature(actor_identity, change.signature, CHANGE_CONTEXT + change.signed_part):
        raise ChangeRefused(
            f"A change to {change.room} said to be by {change.actor} is not signed by "
            f"{change.actor}'s identity key: the server (or someone on its side) forged it. "
            "It was refused."
        )


def describe(change: Change) -> str:
    """What the screen shows for a verified change."""
    a, room = change.action, change.room
    if a == CREATE:
        return f"{change.actor} created {room}."
    if a == ADD:
        return f"{change.actor} added {change.target} to {room}."
    if a == REMOVE:
        return f"{change.actor} removed {change.target} from {room}."
    if a == LEAVE:
        return f"{change.target} left {room}."
    return f"{change.actor} closed {room}."


# =============================================================================
# One room, as this client verified it
# =============================================================================
@dataclass
class _Epoch:
    head: bytes
    roster: tuple[tuple[str, bytes], ...]
    kdc_key: bytes | None = None
    at_ms: int = 0  # when the change that began it was made (its author's clock)

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(name for name, _key in self.roster)

    def identity_of(self, name: str) -> bytes | None:
        return next((key for member, key in self.roster if member == name), None)


@dataclass
class _Received:
    """A member's sender key of one epoch, as it arrived over the pairwise session."""

    chain: e2e.Chain
    signing: bytes


@dataclass
class _Own:
    epoch: int
    key_id: bytes
    chain: e2e.Chain
    signing: cu.IdentityKey
    sent_to: set = field(default_factory=set)  # members who have this key


@dataclass(frozen=True)
class Applied:
    change: Change
    text: str
    me_gone: bool = False


class RoomSession:
    """The verified state of one room and every key of it this client holds."""

    def __init__(
        self, me: str, uid: bytes, name: str, admin: str, admin_identity: bytes, suite_id: int
    ) -> None:
        self.me, self.uid, self.name, self.admin = me, uid, name, admin
        self.admin_identity = admin_identity
        self.suite_id = suite_id
        self.room_id = 0  # the server's handle (not part of anything signed)
        self.epoch = 0
        self.head = ZERO_HEAD
        self.epochs: dict[int, _Epoch] = {}
        self.received: dict[tuple[str, int, bytes], _Received] = {}  # (sender, epoch, key id)
        self.skipped: dict[tuple[str, int, bytes, int], bytes] = {}  # (sender, epoch, key id, n) -> key
        self.pending: list[tuple[str, bytes, bytes | None]] = []  # (sender, distribution, identity) early
        self.own: _Own | None = None

    @property
    def members(self) -> tuple[str, ...]:
        current = self.epochs.get(self.epoch)
        return current.members if current else ()

    @property
    def roster(self) -> tuple[tuple[str, bytes], ...]:
        current = self.epochs.get(self.epoch)
        return current.roster if current else ()

    # -- membership ----------------------------------------------------------------
    @classmethod
    def first_contact(
        cls, me: str, change: Change, my_identity: bytes, suite_id: int, left_at: int = 0
    ) -> RoomSession:
        """A room this client has no state for: its own creation, or the admin's signed add of
        *this* client (its name and its identity key), newer than any change that ended an
        earlier membership of the same room (``left_at``): a replayed old add is refused.  The
        admin's key is the one the add's roster gives the admin; the caller then checks it
        against the key pinned for the admin."""
        mine = change.identity_of(me)
        if mine is None or not cu.constant_time_equal(mine, my_identity):
            raise ChangeRefused(
                f"A change adding someone else's key as {me} to {change.room} was refused "
                "(an add meant for another device of yours, or a forgery)."
            )
        if change.action == CREATE:
            check_rules(change, None, None)
            if change.admin != me:
                raise ChangeRefused(f"A creation of {change.room} this client did not make was refused.")
        elif (
            change.action != ADD
            or change.target != me
            or change.actor != change.admin
            or change.identity_of(change.admin) is None
        ):
            raise ChangeRefused(f"A change to {change.room}, a room this client is not in, was refused.")
        if change.epoch <= left_at:
            raise ChangeRefused(
                f"An old change adding you to {change.room} (from before you left it or were "
                "removed) was replayed, and refused."
            )
        admin_identity = change.identity_of(change.admin)
        assert admin_identity is not None  # checked above: the admin is in the roster
        verify_signature(change, admin_identity)
        room = cls(me, change.uid, change.room, change.admin, admin_identity, suite_id)
        room._advance(change)
        return room

    def apply(self, change: Change, kdc_key: bytes | None = None) -> Applied | None:
        """Verify and apply the next change; None if it is one already applied (a redelivery).
        Its signature is checked with the key the verified roster gives its author (the admin, or
        the member who leaves), never one the server names.  ChangeRefused, state untouched, if
        anything fails."""
        if change.uid != self.uid or change.room != self.name:
            raise ChangeRefused(f"A change for another room was offered as {self.name}'s and refused.")
        if change.epoch <= self.epoch:
            known = self.epochs.get(change.epoch)
            if known is not None and cu.constant_time_equal(known.head, change.head):
                if kdc_key and known.kdc_key is None:
                    known.kdc_key = kdc_key
                return None
            if change.epoch == self.epoch or known is not None:
                raise ChangeRefused(
                    f"A second, different change {change.epoch} of {self.name} was refused: "
                    "the server showed members different histories."
                )
            return None  # older than anything kept: nothing to compare it with, nothing to do
        if change.epoch != self.epoch + 1:
            raise ChangeRefused(
                f"Change {change.epoch} of {self.name} came before change {self.epoch + 1}; it "
                "was refused (a change was withheld)."
            )
        if not cu.constant_time_equal(change.prev_head, self.head):
            raise ChangeRefused(f"A change to {self.name} that does not follow the last one was refused.")
        check_rules(change, self.roster, self.admin)
        key = (
            self.admin_identity
            if change.action in (ADD, REMOVE, CLOSE)
            else self.epochs[self.epoch].identity_of(change.actor)
        )
        if key is None:
            raise ChangeRefused(f"A change to {self.name} by an unknown key was refused.")
        verify_signature(change, key)
        self._advance(change, kdc_key)
        gone = change.action == CLOSE or (change.action in (REMOVE, LEAVE) and change.target == self.me)
        return Applied(change, describe(change), me_gone=gone)

    def _advance(self, change: Change, kdc_key: bytes | None = None) -> None:
        self.epoch, self.head = change.epoch, change.head
        self.epochs[change.epoch] = _Epoch(change.head, change.roster, kdc_key, change.at_ms)
        for old in sorted(self.epochs)[:-MAX_KEPT_EPOCHS]:
            self._drop_epoch(old)
        self.own = None  # a new epoch: a new sender key, made when this client next writes

    def _drop_epoch(self, epoch: int) -> None:
        self.epochs.pop(epoch, None)
        for k in [k for k in self.received if k[1] == epoch]:
            del self.received[k]
        for s in [s for s in self.skipped if s[1] == epoch]:
            del self.skipped[s]

    def set_kdc_key(self, epoch: int, key: bytes) -> None:
        info = self.epochs.get(epoch)
        if info is not None and key:
            info.kdc_key = key

    def next_change(
        self,
        identity: cu.IdentityKey,
        action: int,
        target: str,
        at_ms: int,
        target_identity: bytes | None = None,
    ) -> Change:
        """The change this client (admin, or a leaving member) would make next, signed; an add
        vouches for ``target_identity`` as the newcomer's key."""
        if action == ADD and (target_identity is None or len(target_identity) != IDENTITY_BYTES):
            raise ChangeRefused(f"Adding {target} needs {target}'s identity key.")
        roster = expected_roster(action, self.roster, target, target_identity)
        change = make_change(
            identity,
            action=action,
            uid=self.uid,
            room=self.name,
            epoch=self.epoch + 1,
            at_ms=at_ms,
            prev_head=self.head,
            actor=self.me,
            target=target,
            admin=self.admin,
            roster=roster,
        )
        check_rules(change, self.roster, self.admin)
        return change

    # -- sender keys ------------------------------------------------------------------
    def own_key(self) -> _Own:
        """This client's sender key of the current epoch (made fresh when first needed)."""
        if self.own is None or self.own.epoch != self.epoch:
            self.own = _Own(
                self.epoch,
                cu.random_bytes(KEY_ID_BYTES),
                e2e.Chain(cu.random_bytes(32)),
                cu.IdentityKey.generate(),
            )
        return self.own

    def distribution(self) -> tuple[bytes, list[str]]:
        """(content of a BODY_SENDER_KEY message, the members that do not have it yet)."""
        own = self.own_key()
        info = self.epochs[self.epoch]
        content = _DISTRIBUTION.pack(
            self.uid,
            own.epoch,
            info.head,
            own.key_id,
            own.chain.index,
            own.chain.key,
            cu.public_bytes(own.signing),
        )
        name = bytearray()
        _put_name(name, self.name)
        missing = [m for m in info.members if m != self.me and m not in own.sent_to]
        return content + bytes(name), missing

    def mark_sent(self, members) -> None:
        if self.own is not None:
            self.own.sent_to.update(members)

    def receive_distribution(self, sender: str, content: bytes, sender_identity: bytes | None) -> str:
        """A member's sender key, opened from the pairwise session with ``sender`` whose identity
        key is ``sender_identity``: it must be the key the roster gives ``sender``.  Returns "ok",
        "later" (its epoch is not verified here yet: kept, bounded), or "known" (a copy of a key
        held already: ignored, so a chain never goes back); ChangeRefused otherwise."""
        uid, epoch, head, key_id, counter, chain_key, signing = _parse_distribution(content, self.name)
        if uid != self.uid:
            raise ChangeRefused(f"A sender key from {sender} for another {self.name} was refused.")
        info = self.epochs.get(epoch)
        if info is None:
            if self.epoch < epoch <= self.epoch + MAX_PENDING_AHEAD:
                if sum(1 for p in self.pending if p[0] == sender) < MAX_PENDING_PER_SENDER:
                    self.pending.append((sender, content, sender_identity))
                    del self.pending[:-MAX_PENDING]
                return "later"
            raise ChangeRefused(
                f"A sender key from {sender} for a state of {self.name} this client does not "
                "keep was ignored."
            )
        vouched = info.identity_of(sender)
        if sender == self.me or vouched is None:
            raise ChangeRefused(
                f"A sender key from {sender}, who is not a member of {self.name} as this client "
                "knows it, was refused."
            )
        if not cu.constant_time_equal(info.head, head):
            raise SplitHistory(
                f"WARNING: {sender}'s client knows another history of {self.name} than this one "
                "(the server showed members different changes); its sender key was refused."
            )
        if sender_identity is None or not cu.constant_time_equal(sender_identity, vouched):
            raise ChangeRefused(
                f"A sender key said to be from {sender} came from a key other than the one "
                f"{self.admin} vouched for in {self.name}; it was refused."
            )
        if epoch < self.epoch and sender not in self.members:
            raise ChangeRefused(
                f"A new sender key from {sender}, who is no longer in {self.name}, for an "
                "earlier state of it was refused."
            )
        if (sender, epoch, key_id) in self.received:
            return "known"  # a second copy (resent after a refused store): it must not rewind the chain
        chain = e2e.Chain(chain_key)
        chain.index = counter
        self.received[(sender, epoch, key_id)] = _Received(chain, signing)
        mine = [k for k in self.received if k[0] == sender and k[1] == epoch]
        for old in mine[:-MAX_KEYS_PER_SENDER]:
            del self.received[old]
        return "ok"

    def take_pending(self) -> list[tuple[str, bytes, bytes | None]]:
        """Sender keys that came early and whose epoch may be verified now."""
        ready = [p for p in self.pending if _epoch_of(p[1]) <= self.epoch]
        self.pending = [p for p in self.pending if _epoch_of(p[1]) > self.epoch]
        return ready

    def awaiting_key(self, sender: str, payload: bytes) -> bool:
        """Whether ``payload`` is under a sender key that may still be on its way (a member of a
        kept epoch, a key id not seen yet): the message is held, not refused."""
        if len(payload) < _MESSAGE_HEADER.size or payload[0] != ROOM_MESSAGE_KIND:
            return False
        _kind, epoch, key_id, _counter = _MESSAGE_HEADER.unpack_from(payload)
        info = self.epochs.get(epoch)
        return (sender, epoch, key_id) not in self.received and (
            self.epoch < epoch <= self.epoch + MAX_PENDING_AHEAD
            or (info is not None and sender in info.members)
        )

    # -- messages ------------------------------------------------------------------------
    def _aad(self, sender: str, header: bytes) -> bytes:
        name = bytearray()
        _put_name(name, self.name)
        _put_name(name, sender)
        return MESSAGE_CONTEXT + self.uid + bytes(name) + header

    def _cipher(self, message_key: bytes, kdc_key: bytes):
        suite = cu.suite_by_id(self.suite_id)
        material = cu.hkdf(
            message_key, salt=kdc_key, info=cu.label("room message key"), length=suite.key_bytes
        )
        return suite.cipher(suite.key_from_material(material))

    def seal(self, text: str, msg_id: bytes, now: float) -> bytes:
        """A text message for the room under this client's current sender key."""
        info = self.epochs.get(self.epoch)
        if info is None or info.kdc_key is None or self.me not in info.members:
            raise CryptoError(f"{self.name} has no key for its current members yet.")
        own = self.own_key()
        body = e2e.pack_body(e2e.BODY_TEXT, msg_id, text.encode("utf-8"), now)
        counter, message_key = own.chain.step()
        header = _MESSAGE_HEADER.pack(ROOM_MESSAGE_KIND, own.epoch, own.key_id, counter)
        aad = self._aad(self.me, header)
        sealed = self._cipher(message_key, info.kdc_key).seal(body, aad)
        return header + sealed + own.signing.sign(aad + sealed)

    def open(
        self,
        sender: str,
        payload: bytes,
        *,
        now: float,
        stored_at: float | None = None,
        kdc_key: bytes | None = None,
    ) -> e2e.Opened:
        """A message from ``sender``: signature, chain, cipher, freshness; DecryptionFailed, nothing
        changed, on anything wrong."""
        if len(payload) < _MESSAGE_HEADER.size + SIGNATURE_BYTES:
            raise DecryptionFailed(f"A malformed message in {self.name} was discarded.")
        kind, epoch, key_id, counter = _MESSAGE_HEADER.unpack_from(payload)
        record = self.received.get((sender, epoch, key_id))
        info = self.epochs.get(epoch)
        if kind != ROOM_MESSAGE_KIND or record is None or info is None:
            raise DecryptionFailed(
                f"A message from {sender} in {self.name} came under a key this client does not "
                "hold (sent before it joined, or after it was removed, or its key is still on "
                "its way); it was not shown."
            )
        key = kdc_key or info.kdc_key
        if not key:
            raise DecryptionFailed(f"A message from {sender} in {self.name} came without its room key.")
        header = payload[: _MESSAGE_HEADER.size]
        sealed, signature = payload[_MESSAGE_HEADER.size : -SIGNATURE_BYTES], payload[-SIGNATURE_BYTES:]
        aad = self._aad(sender, header)
        if not cu.verify_signature(record.signing, signature, aad + sealed):
            raise DecryptionFailed(
                f"A message said to be from {sender} in {self.name} is not signed with "
                f"{sender}'s sender key; it was discarded."
            )
        message_key, commit = e2e.next_message_key(
            record.chain,
            counter,
            self.skipped,
            lambda n: (sender, epoch, key_id, n),
            sender,
            MAX_ROOM_SKIPPED,
            f"message in {self.name}",
        )
        try:
            body = self._cipher(message_key, key).open(sealed, aad)
        except DecryptionFailed:
            raise DecryptionFailed(
                f"A message from {sender} in {self.name} failed its integrity check and was discarded."
            ) from None
        opened = e2e.parse_body(body, sender)
        if opened.kind != e2e.BODY_TEXT:
            raise DecryptionFailed(f"A malformed message from {sender} in {self.name} was discarded.")
        age = now - opened.sent_at
        if stored_at is None:
            fresh = abs(age) <= e2e.FRESHNESS_WINDOW_S
        else:
            fresh = opened.sent_at <= stored_at + e2e.FRESHNESS_WINDOW_S and age <= K.STORED_MAX_AGE_S
        if not fresh:
            raise DecryptionFailed(
                f"A message from {sender} in {self.name} was too old (or dated in the future) "
                "and was refused."
            )
        if epoch < self.epoch and sender not in self.members:
            # under an earlier epoch from someone who has gone since: only what they sent before
            ended = self.epochs.get(epoch + 1)
            if ended is None or opened.sent_at * 1000 > ended.at_ms + e2e.FRESHNESS_WINDOW_S * 1000:
                raise DecryptionFailed(
                    f"A message from {sender}, who is no longer in {self.name}, dated after "
                    "they went, was refused."
                )
        commit()
        return opened

    # -- at rest (room_to_dict / room_from_dict, below the class) ---------------------------
    def to_dict(self) -> dict:
        return room_to_dict(self)

    @classmethod
    def from_dict(cls, me: str, doc: dict) -> RoomSession:
        return room_from_dict(me, doc)


def room_to_dict(room: RoomSession) -> dict:
    """A room at rest (the prekey store keeps it, sealed under the password)."""
    b = cu.b64encode
    return {
        "uid": b(room.uid),
        "name": room.name,
        "admin": room.admin,
        "admin_identity": b(room.admin_identity),
        "suite": room.suite_id,
        "room_id": room.room_id,
        "epoch": room.epoch,
        "head": b(room.head),
        "epochs": {
            str(n): {
                "head": b(e.head),
                "roster": [[m, b(k)] for m, k in e.roster],
                "kdc": b(e.kdc_key) if e.kdc_key else "",
                "at": e.at_ms,
            }
            for n, e in room.epochs.items()
        },
        "received": [
            [s, n, b(k), b(r.chain.key), r.chain.index, b(r.signing)]
            for (s, n, k), r in room.received.items()
        ],
        "skipped": [[s, n, b(k), c, b(v)] for (s, n, k, c), v in room.skipped.items()],
        "pending": [[s, b(c), b(i) if i else ""] for s, c, i in room.pending],
    }


def room_from_dict(me: str, doc: dict) -> RoomSession:
    """The room :func:`room_to_dict` kept."""
    d = cu.b64decode
    room = RoomSession(
        me, d(doc["uid"]), doc["name"], doc["admin"], d(doc["admin_identity"]), int(doc["suite"])
    )
    room.room_id, room.epoch, room.head = int(doc["room_id"]), int(doc["epoch"]), d(doc["head"])
    room.epochs = {
        int(n): _Epoch(
            d(e["head"]),
            tuple((m, d(k)) for m, k in e["roster"]),
            d(e["kdc"]) if e["kdc"] else None,
            int(e.get("at", 0)),
        )
        for n, e in doc["epochs"].items()
    }
    for s, n, k, chain_key, index, signing in doc["received"]:
        chain = e2e.Chain(d(chain_key))
        chain.index = int(index)
        room.received[(s, int(n), d(k))] = _Received(chain, d(signing))
    room.skipped = {(s, int(n), d(k), int(c)): d(v) for s, n, k, c, v in doc["skipped"]}
    room.pending = [(s, d(c), d(i) if i else None) for s, c, i in doc.get("pending", [])]
    return room


class SplitHistory(ChangeRefused):
    """A member's sender key names another head for the same epoch: the server showed members
    different histories.  Shown as a warning, not only logged."""


def _parse_distribution(content: bytes, expect_name: str | None = None):
    if len(content) < _DISTRIBUTION.size + 2:
        raise ChangeRefused("A malformed sender key was refused.")
    fields = _DISTRIBUTION.unpack_from(content)
    cur = _Cursor(content, _DISTRIBUTION.size)
    name = cur.name()
    if cur.pos != len(content) or (expect_name is not None and name != expect_name):
        raise ChangeRefused("A malformed sender key was refused.")
    return fields


def _epoch_of(content: bytes) -> int:
    return _DISTRIBUTION.unpack_from(content)[1]


def distribution_room(content: bytes) -> str:
    """The room a BODY_SENDER_KEY message is for (to find its state); ChangeRefused if malformed."""
    if len(content) < _DISTRIBUTION.size + 2:
        raise ChangeRefused("A malformed sender key was refused.")
    cur = _Cursor(content, _DISTRIBUTION.size)
    name = cur.name()
    if not ROOM_RE.fullmatch(name):
        raise ChangeRefused("A malformed sender key was refused.")
    return name


def load_rooms(me: str, docs: dict) -> dict[str, RoomSession]:
    rooms = {}
    for name, doc in docs.items():
        try:
            rooms[name] = RoomSession.from_dict(me, doc)
        except (KeyError, TypeError, ValueError, SecureIMError):
            continue  # an unreadable entry: that room is rejoined from its next change
    return rooms
