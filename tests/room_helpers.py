"""Checks on what a client holds of a room (the removed-member tests use them)."""

from __future__ import annotations

from secureim.e2e import rooms as R
from secureim.e2e import sessions as e2e
from secureim.errors import SecureIMError


def any_key_opens(room: R.RoomSession, sender: str, payload: bytes, max_counter: int = 1100) -> bool:
    """Whether ANY chain key or skipped key ``room`` holds, under ANY room key it holds, at any
    counter up to ``max_counter``, opens ``payload`` (signature aside): a brute force over
    everything a client kept, not just the key the header names."""
    header_size = R._MESSAGE_HEADER.size
    header = payload[:header_size]
    sealed = payload[header_size : -R.SIGNATURE_BYTES]
    aad = room._aad(sender, header)
    message_keys = list(room.skipped.values())
    for record in room.received.values():
        chain = e2e.Chain(record.chain.key)
        for _ in range(max_counter):
            message_keys.append(chain.step()[1])
    if room.own is not None:
        chain = e2e.Chain(room.own.chain.key)
        message_keys.extend(chain.step()[1] for _ in range(max_counter))
    kdc_keys = [e.kdc_key for e in room.epochs.values() if e.kdc_key]
    for mk in message_keys:
        for kdc in kdc_keys:
            try:
                room._cipher(mk, kdc).open(sealed, aad)
                return True
            except SecureIMError:
                continue
    return False


def rooms_in_store(home, username: str, server_id: str, password: str) -> dict[str, R.RoomSession]:
    """Every room state sealed in a client's store on disk (opened with the user's password)."""
    from secureim.e2e import prekeys as K

    store = K.PrekeyStore(home, username, server_id, password)
    return R.load_rooms(username, store.rooms)
