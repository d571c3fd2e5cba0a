"""The message codec: typed fields, the ``@message`` decorator, and decoding by type id."""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, cast, dataclass_transform

from secureim.errors import (
    LocalProtocolError,
    MalformedMessage,
)


# =============================================================================
# Field codec: one encode/decode pair, driven by each message's field metadata.
# =============================================================================
class Kind(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's __hash__ is Python code, run per field
    U8 = "u8"
    U32 = "u32"
    U64 = "u64"
    BOOL = "bool"
    BYTES = "bytes"  # u16 length + bytes
    TEXT = "text"  # u16 length + strict UTF-8
    TEXT_LIST = "list"  # u16 count + TEXT items


_INT_STRUCTS = {Kind.U8: struct.Struct(">B"), Kind.U32: struct.Struct(">I"), Kind.U64: struct.Struct(">Q")}
_U16 = struct.Struct(">H")


def wire(
    kind: Kind,
    *,
    max_len: int = 0,
    exact: int | None = None,
    max_items: int = 0,
    default: Any = dataclasses.MISSING,
) -> Any:
    """Declare a message field's wire encoding (and its bounds)."""
    return field(
        default=default, metadata={"kind": kind, "max_len": max_len, "exact": exact, "max_items": max_items}
    )


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedMessage("Message truncated.")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def _encode_field(out: bytearray, name: str, meta: dict, value: Any) -> None:
    kind = meta["kind"]
    if kind in _INT_STRUCTS:
        try:
            out += _INT_STRUCTS[kind].pack(value)
        except (struct.error, TypeError):
            raise LocalProtocolError(f"Field {name} out of range.") from None
    elif kind is Kind.BOOL:
        out.append(1 if value else 0)
    elif kind is Kind.BYTES:
        _encode_bytes(out, name, meta, bytes(value))
    elif kind is Kind.TEXT:
        _encode_bytes(out, name, meta, value.encode("utf-8"))
    elif kind is Kind.TEXT_LIST:
        if len(value) > meta["max_items"]:
            raise LocalProtocolError(f"Field {name} has too many items.")
        out += _U16.pack(len(value))
        for item in value:
            _encode_bytes(out, name, meta, item.encode("utf-8"))


def _encode_bytes(out: bytearray, name: str, meta: dict, raw: bytes) -> None:
    if meta["exact"] is not None and len(raw) != meta["exact"]:
        raise LocalProtocolError(f"Field {name} must be {meta['exact']} bytes.")
    if len(raw) > meta["max_len"]:
        raise LocalProtocolError(f"Field {name} is longer than {meta['max_len']} bytes.")
    out += _U16.pack(len(raw))
    out += raw


def _decode_bytes(r: _Reader, name: str, meta: dict) -> bytes:
    (n,) = _U16.unpack(r.take(2))
    if n > meta["max_len"] or (meta["exact"] is not None and n != meta["exact"]):
        raise MalformedMessage(f"Field {name} has a bad length.")
    return r.take(n)


def _decode_text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise MalformedMessage(f"Field {name} is not valid UTF-8.") from None


def _decode_field(r: _Reader, name: str, meta: dict) -> Any:
    kind = meta["kind"]
    if kind in _INT_STRUCTS:
        st = _INT_STRUCTS[kind]
        return st.unpack(r.take(st.size))[0]
    if kind is Kind.BOOL:
        b = r.take(1)[0]
        if b > 1:
            raise MalformedMessage(f"Field {name} is not a boolean.")
        return b == 1
    if kind is Kind.BYTES:
        return _decode_bytes(r, name, meta)
    if kind is Kind.TEXT:
        return _decode_text(_decode_bytes(r, name, meta), name)
    (count,) = _U16.unpack(r.take(2))
    if count > meta["max_items"]:
        raise MalformedMessage(f"Field {name} has too many items.")
    return tuple(_decode_text(_decode_bytes(r, name, meta), name) for _ in range(count))


def _compile_field(name: str, meta: dict) -> tuple[Callable, Callable]:
    """One field's encoder ``(out, value)`` and decoder ``(data, pos) -> (value, pos)``, specialised
    once per message class: the same encoding and bounds as _encode_field / _decode_field, without
    looking the kind up for every field of every frame (the relay codes two messages per frame)."""
    kind, exact, max_len = meta["kind"], meta["exact"], meta["max_len"]
    if kind in _INT_STRUCTS:
        st = _INT_STRUCTS[kind]
        pack, unpack, size = st.pack, st.unpack_from, st.size

        def enc(out: bytearray, value: Any) -> None:
            try:
                out += pack(value)
            except (struct.error, TypeError):
                raise LocalProtocolError(f"Field {name} out of range.") from None

        def dec(data: bytes, pos: int) -> tuple[Any, int]:
            if pos + size > len(data):
                raise MalformedMessage("Message truncated.")
            return unpack(data, pos)[0], pos + size

        return enc, dec
    if kind is Kind.BYTES or kind is Kind.TEXT:
        text = kind is Kind.TEXT
        u16_pack, u16_unpack = _U16.pack, _U16.unpack_from

        def enc(out: bytearray, value: Any) -> None:
            raw = value.encode("utf-8") if text else bytes(value)
            if exact is not None and len(raw) != exact:
                raise LocalProtocolError(f"Field {name} must be {exact} bytes.")
            if len(raw) > max_len:
                raise LocalProtocolError(f"Field {name} is longer than {max_len} bytes.")
            out += u16_pack(len(raw))
            out += raw

        def dec(data: bytes, pos: int) -> tuple[Any, int]:
            if pos + 2 > len(data):
                raise MalformedMessage("Message truncated.")
            (n,) = u16_unpack(data, pos)
            if n > max_len or (exact is not None and n != exact):
                raise MalformedMessage(f"Field {name} has a bad length.")
            end = pos + 2 + n
            if end > len(data):
                raise MalformedMessage("Message truncated.")
            raw = data[pos + 2 : end]
            return (_decode_text(raw, name) if text else raw), end

        return enc, dec

    def enc_generic(out: bytearray, value: Any) -> None:
        _encode_field(out, name, meta, value)

    def dec_generic(data: bytes, pos: int) -> tuple[Any, int]:
        r = _Reader(data)
        r.pos = pos
        value = _decode_field(r, name, meta)
        return value, r.pos

    return enc_generic, dec_generic


# =============================================================================
# Messages
# =============================================================================
MESSAGE_TYPES: dict[int, type[Message]] = {}


class Message:
    """Base of every typed message; ``TYPE`` is its one-byte wire tag."""

    TYPE: ClassVar[int]
    FIELDS: ClassVar[tuple] = ()  # (name, metadata) per field, computed once at registration

    ENCODERS: ClassVar[tuple] = ()  # (name, encoder) per field, compiled at registration
    DECODERS: ClassVar[tuple] = ()  # (name, decoder) per field

    def encode(self) -> bytes:
        out = bytearray((self.TYPE,))
        for name, enc in self.ENCODERS:
            enc(out, getattr(self, name))
        return bytes(out)

    def __repr__(self) -> str:  # never print secrets (passwords, keys) in logs
        shown = []
        for name, meta in self.FIELDS:  # dataclasses.fields(self), kept at registration
            value = getattr(self, name)
            if meta.get("kind") is Kind.BYTES:
                value = f"<{len(value)} bytes>"
            shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


_M = TypeVar("_M", bound=type[Message])


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, field))
def message(type_id: int) -> Callable[[_M], _M]:
    """Register a message class under its wire tag and make it a frozen dataclass with a compiled codec.

    ``dataclass_transform`` tells type checkers that the class becomes a dataclass here, so its
    constructor and fields are checked as if ``@dataclass(frozen=True)`` were written on it."""

    def register(cls: _M) -> _M:
        if type_id in MESSAGE_TYPES:
            raise RuntimeError(f"duplicate message type {type_id:#x}")
        cls.TYPE = type_id
        cls = dataclass(frozen=True, repr=False)(cls)  # type: ignore[assignment]
        cls.FIELDS = tuple((f.name, dict(f.metadata)) for f in dataclasses.fields(cast(Any, cls)))
        compiled = [(name, _compile_field(name, meta)) for name, meta in cls.FIELDS]
        cls.ENCODERS = tuple((name, enc) for name, (enc, _dec) in compiled)
        cls.DECODERS = tuple((name, dec) for name, (_enc, dec) in compiled)
        MESSAGE_TYPES[type_id] = cls
        return cls

    return register


def decode_message(data: bytes) -> Message:
    """Decode one message; anything malformed raises :class:`MalformedMessage` only."""
    if not data:
        raise MalformedMessage("Empty message.")
    cls = MESSAGE_TYPES.get(data[0])
    if cls is None:
        raise MalformedMessage(f"Unknown message type {data[0]:#04x}.")
    values, pos = {}, 1
    for name, dec in cls.DECODERS:
        values[name], pos = dec(data, pos)
    if pos != len(data):
        raise MalformedMessage("Trailing bytes after message.")
    return cls(**values)
