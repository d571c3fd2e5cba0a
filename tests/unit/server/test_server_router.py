"""The router table (secureim/server/router.py): where each message type runs, and which handler."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from secureim import proto as P
from secureim.server.config import ServerConfig
from secureim.server.router import (
    FAST_MESSAGES,
    NO_ROUTE,
    PASSWORD_MESSAGES,
    Placement,
    Router,
    build_routes,
)

LOOP, WORKER, PASSWORD = Placement.LOOP, Placement.WORKER, Placement.PASSWORD

# Today's placement, message by message (the loop/worker decisions the table replaced).
TABLE = {
    P.Relay: (LOOP, "conversations.relay"),
    P.WhoRequest: (LOOP, "presence.who"),
    P.RoomSend: (WORKER, "rooms.send"),  # LOOP when the fast-path predicate says so
    P.Login: (PASSWORD, "accounts.login_or_register"),
    P.Register: (PASSWORD, "accounts.login_or_register"),
    P.ChangePassword: (PASSWORD, "accounts.change_password"),
    P.DeleteAccount: (PASSWORD, "accounts.delete_account"),
    P.Resume: (WORKER, "accounts.resume"),
    P.OpenConversation: (WORKER, "conversations.open"),
    P.RegisterEndpoint: (WORKER, "direct.register_endpoint"),
    P.DirectRequest: (WORKER, "direct.direct_request"),
    P.PublishPrekeys: (WORKER, "mailbox.publish_prekeys"),
    P.OfflineOpen: (WORKER, "mailbox.offline_open"),
    P.Store: (WORKER, "mailbox.store"),
    P.Ack: (WORKER, "mailbox.ack"),
    P.Defer: (WORKER, "mailbox.defer"),
    P.RoomCreate: (WORKER, "rooms.create"),
    P.RoomChange: (WORKER, "rooms.change"),
}


def _named_stubs(fast: list[bool]) -> tuple[Router, dict[str, object]]:
    """A router over stub domains whose every handler is a distinct, named function."""
    names: dict[str, object] = {}

    def domain(prefix: str, *methods: str) -> SimpleNamespace:
        ns = SimpleNamespace()
        for method in methods:

            def handler(session, msg, _name=f"{prefix}.{method}"):
                return _name

            names[f"{prefix}.{method}"] = handler
            setattr(ns, method, handler)
        return ns

    router = Router(
        build_routes(
            domain("accounts", "login_or_register", "resume", "change_password", "delete_account"),
            domain("conversations", "relay", "open"),
            domain("presence", "who"),
            domain("direct", "register_endpoint", "direct_request"),
            domain("mailbox", "publish_prekeys", "offline_open", "store", "ack", "defer"),
            domain("rooms", "create", "change", "send"),
            SimpleNamespace(send_is_fast=lambda session, msg: fast[0]),
        )
    )
    return router, names


@pytest.mark.parametrize("kind", list(TABLE), ids=lambda k: k.__name__)
def test_each_message_type_has_its_placement_and_handler(kind):
    router, names = _named_stubs([False])
    placement, handler = TABLE[kind]
    assert router.route(kind).placement is placement
    assert router.handler(kind) is names[handler]


def test_the_table_covers_exactly_the_handled_types():
    router, _names = _named_stubs([False])
    assert set(router.handlers) == set(TABLE)
    assert router.route(P.Goodbye) is NO_ROUTE and router.handler(P.Goodbye) is None
    assert router.route(P.Goodbye).placement is WORKER  # a no-op still takes the session's turn


def test_the_static_sets_agree_with_the_table():
    assert {k for k, (p, _h) in TABLE.items() if p is LOOP} == FAST_MESSAGES
    assert {k for k, (p, _h) in TABLE.items() if p is PASSWORD} == PASSWORD_MESSAGES
    router, _names = _named_stubs([False])
    for kind in TABLE:
        probe = object.__new__(kind)
        assert router.is_password_work(probe) is (kind in PASSWORD_MESSAGES)
    assert not router.is_password_work(b"handshake bytes")


def test_a_room_message_runs_on_the_loop_only_when_the_fast_path_says_so():
    fast = [False]
    router, _names = _named_stubs(fast)
    msg = P.RoomSend(room_id=1, epoch=1, msg_ref=bytes(P.MSG_REF_BYTES), payload=b"x")
    assert router.placement(None, msg) is WORKER and not router.runs_on_loop(None, msg)
    fast[0] = True
    assert router.placement(None, msg) is LOOP and router.runs_on_loop(None, msg)
    assert router.runs_on_loop(None, P.Relay(conversation_id=1, payload=b""))
    assert not router.runs_on_loop(None, P.Goodbye(reason=""))


def test_override_swaps_the_handler_and_keeps_the_placement():
    router, names = _named_stubs([False])
    seen = []
    previous = router.override(P.Relay, lambda session, msg: seen.append(msg))
    assert previous is names["conversations.relay"]
    assert router.route(P.Relay).placement is LOOP and router.runs_on_loop(
        None, P.Relay(conversation_id=1, payload=b"")
    )
    router.handlers[P.Relay](None, "m")
    assert seen == ["m"]


def test_the_service_routes_to_its_domain_handlers(tmp_path):
    from secureim.server.service import ChatService
    from secureim.storage import open_storage

    config = ServerConfig(data_dir=tmp_path, bcrypt_cost=4)
    storage = open_storage(config.database_url)
    try:
        service = ChatService(storage, config)
        owners = {
            "accounts": service.accounts,
            "conversations": service.conversations,
            "presence": service.presence,
            "direct": service.direct,
            "mailbox": service.mailbox,
            "rooms": service.rooms,
        }
        for kind, (placement, name) in TABLE.items():
            owner, method = name.split(".")
            assert service.router.route(kind).placement is placement
            assert service.router.handler(kind) == getattr(owners[owner], method)
        assert service.router.route(P.RoomSend).loop_if == service.room_keyring.send_is_fast
    finally:
        storage.close()
