"""The wire codec between clients and the writer. Pure: bytes in, values out.

Owns: the format of queue messages, request bodies and replies (docs/PROTOCOL.md),
their version, and the mapping of typed errors to and from the wire. Total decoders:
any bytes give a value or ``ProtocolError`` — never another exception. msgpack only,
never pickle. Must not import os, mmap, posix_ipc or any clock.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack

from .. import _errors as E
from .._format.frame import Buffer

WIRE_VERSION = 2  # 2: a receipt names its entity and scope when they are not the request's (§8.1)
MAX_MESSAGE = 8192  # the kernel's default msgsize_max: a queue message never exceeds it

OP_APPEND = 1  # body: [item, ...]; all-or-nothing
OP_SYNC = 2  # body: None; fsync now, reply the durable frontier
OP_PING = 3  # body: None; reply the frontier
OP_BYE = 4  # body: None; the client is leaving (the writer drops its area); no reply
OP_FENCE_BEGIN = 5  # body: None; reply: [fence token (16 bytes)]
OP_APPEND_FENCED = 6  # body: [token, [item, ...]]; written hidden inside the fence; reply: receipts
OP_FENCE_COMMIT = 7  # body: token; the fence's events become visible; reply: [visible, durable]
OP_FENCE_CANCEL = 8  # body: token; its events stay hidden for good; reply: [visible, durable]
FENCE_OPS = (OP_FENCE_BEGIN, OP_APPEND_FENCED, OP_FENCE_COMMIT, OP_FENCE_CANCEL)

STATUS_OK = 0
STATUS_ERROR = 1

LEN = struct.Struct("<I")  # every body in a shared area is prefixed by its length


class Message(NamedTuple):
    """What travels on the request queue: where the request body waits."""

    version: int
    client_pid: int
    area: str  # name of the client's shared-memory area (it also names its semaphore)
    request_id: int


class Request(NamedTuple):
    op: int
    request_id: int
    epoch_seen: int
    body: Any


class Reply(NamedTuple):
    request_id: int
    writer_epoch: int
    status: int
    data: Any


# An item of OP_APPEND:
# [entity bytes, scope bytes, kind int, payload bytes, payload_version int, idem 16 bytes,
#  expected_clock int|None, causation 16 bytes|None, correlation 16 bytes|None]
ITEM_FIELDS = 9


def _unpack(data: bytes | memoryview, what: str, max_len: int) -> Any:
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=max_len, max_str_len=max_len,
            max_array_len=max(16, max_len // 8), max_map_len=1024, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for hostile bytes
        raise E.ProtocolError(f"malformed {what}: {type(exc).__name__}") from None


def encode_message(msg: Message) -> bytes:
    return msgpack.packb([msg.version, msg.client_pid, msg.area, msg.request_id])  # type: ignore[no-any-return]


def decode_message(data: bytes, is_our_area: Callable[[str], bool]) -> Message:
    """A queue message; ``is_our_area`` tells the names of this store's client areas
    (``names.is_area_of``): a message naming anything else is refused, so the writer
    never opens another object."""
    if len(data) > MAX_MESSAGE:
        raise E.ProtocolError(f"message of {len(data)} bytes is over {MAX_MESSAGE}")
    doc = _unpack(data, "message", MAX_MESSAGE)
    if not isinstance(doc, list) or len(doc) != 4:
        raise E.ProtocolError("message is not a 4-element array")
    version, pid, area, request_id = doc
    if version != WIRE_VERSION:
        raise E.ProtocolError(f"wire version {version!r}, this writer speaks {WIRE_VERSION}")
    if type(pid) is not int or not 0 < pid < 1 << 31:
        raise E.ProtocolError(f"bad client pid {pid!r}")
    if not isinstance(area, str) or not is_our_area(area):
        raise E.ProtocolError(f"area {area!r} is not one of this store's client areas")
    if type(request_id) is not int or not 0 <= request_id < 1 << 63:
        raise E.ProtocolError(f"bad request id {request_id!r}")
    return Message(version, pid, area, request_id)


def encode_request(req: Request) -> bytes:
    body = msgpack.packb([req.op, req.request_id, req.epoch_seen, req.body], use_bin_type=True)
    return LEN.pack(len(body)) + body  # type: ignore[no-any-return]


def decode_request(area: Buffer, max_len: int) -> Request:
    """Decode the length-prefixed request at the start of a client's area."""
    if len(area) < LEN.size:
        raise E.ProtocolError("area is too small for a request")
    (n,) = LEN.unpack_from(area, 0)
    if n > len(area) - LEN.size or n > max_len:
        raise E.ProtocolError(f"request length {n} does not fit the area")
    doc = _unpack(memoryview(area)[LEN.size:LEN.size + n], "request", max_len)
    if not isinstance(doc, list) or len(doc) != 4:
        raise E.ProtocolError("request is not a 4-element array")
    op, request_id, epoch_seen, body = doc
    if op not in (OP_APPEND, OP_SYNC, OP_PING, OP_BYE, *FENCE_OPS):
        raise E.ProtocolError(f"unknown op {op!r}")
    if type(request_id) is not int or type(epoch_seen) is not int:
        raise E.ProtocolError("request id and epoch must be ints")
    if op == OP_APPEND_FENCED:
        if not isinstance(body, list) or len(body) != 2 or not _is_token(body[0]):
            raise E.ProtocolError("fenced append body must be [token, items]")
        _check_items(body[1])
    elif op == OP_APPEND:
        _check_items(body)
    elif op in (OP_FENCE_COMMIT, OP_FENCE_CANCEL) and not _is_token(body):
        raise E.ProtocolError("fence commit/cancel body must be a 16-byte token")
    return Request(op, request_id, epoch_seen, body)


def _is_token(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == 16


def _check_items(body: Any) -> None:
    if not isinstance(body, list) or not body:
        raise E.ProtocolError("append body must be a non-empty array of items")
    for item in body:
        check_item(item)


def check_item(item: Any) -> None:
    """Shape and types of one append item (values are validated by the engine)."""
    if not isinstance(item, list) or len(item) != ITEM_FIELDS:
        raise E.ProtocolError("append item is not a 9-element array")
    entity, scope, kind, payload, pv, idem, clock, causation, correlation = item
    if not (isinstance(entity, bytes) and isinstance(scope, bytes) and isinstance(payload, bytes)):
        raise E.ProtocolError("entity, scope and payload must be bytes")
    if type(kind) is not int or type(pv) is not int:
        raise E.ProtocolError("kind and payload_version must be ints")
    if not isinstance(idem, bytes) or len(idem) != 16:
        raise E.ProtocolError("idempotency hash must be 16 bytes")
    if clock is not None and type(clock) is not int:
        raise E.ProtocolError("expected_clock must be an int or nil")
    for ident in (causation, correlation):
        if ident is not None and not (isinstance(ident, bytes) and len(ident) == 16):
            raise E.ProtocolError("causation/correlation ids must be 16 bytes or nil")


def encode_reply(reply: Reply) -> bytes:
    body = msgpack.packb([reply.request_id, reply.writer_epoch, reply.status, reply.data], use_bin_type=True)
    return LEN.pack(len(body)) + body  # type: ignore[no-any-return]


def decode_reply(area: Buffer) -> Reply:
    if len(area) < LEN.size:
        raise E.ProtocolError("area is too small for a reply")
    (n,) = LEN.unpack_from(area, 0)
    if n > len(area) - LEN.size:
        raise E.ProtocolError(f"reply length {n} does not fit the area")
    doc = _unpack(memoryview(area)[LEN.size:LEN.size + n], "reply", len(area))
    if not isinstance(doc, list) or len(doc) != 4:
        raise E.ProtocolError("reply is not a 4-element array")
    return Reply(*doc)


# -- receipts and errors on the wire ---------------------------------------------------
def receipt_fields(r: Any, entity: bytes, scope: bytes) -> list[Any]:
    """A receipt as it travels, compact: without entity and scope when they are the ones
    of the request item it answers (``entity``, ``scope``: the client knows them); with
    them, as two more fields, when they are not (a duplicate idempotency key sent with
    another coordinate is answered with the stored event's receipt)."""
    fields = [r.event_id, r.global_sequence, r.entity_clock, r.event_hash, r.prev_hash, r.wall_ms, r.durable,
              r.signature]
    if r.entity.encode() != entity or r.scope.encode() != scope:
        fields += [r.entity, r.scope]
    return fields


RECEIPT_WIRE_MAX = 256  # bytes one receipt takes in a reply, at most (with a signature)


_PLAIN = (type(None), bool, int, float, str, bytes)  # what a field value may travel as, as it is
_PLAIN_MAX = 1024  # bytes or characters of a plain value sent as it is; beyond, its repr, cut


def _wire_value(value: Any) -> Any:
    """The value an error field names, as it travels: plain data as it is (so the caller
    gets the value it passed back), anything else as its repr."""
    kind = type(value)
    if kind in (str, bytes):
        fits = len(value) <= _PLAIN_MAX
    else:
        fits = kind in _PLAIN and (kind is not int or -(1 << 63) <= value < 1 << 64)  # msgpack's int range
    return value if fits else repr(value)[:_PLAIN_MAX]


def error_to_wire(exc: BaseException) -> list[Any]:
    """[class name, fields] of a typed error (only data, never code)."""
    if isinstance(exc, E.ConcurrencyConflict):
        return ["ConcurrencyConflict", [exc.entity, exc.expected, exc.actual]]
    if isinstance(exc, E.PayloadTooLarge):
        return ["PayloadTooLarge", [exc.size, exc.limit, exc.what]]
    if isinstance(exc, E.ReservedKind):
        return ["ReservedKind", [exc.category, exc.type_id]]
    if isinstance(exc, E.InvalidKind):
        return ["InvalidKind", [_wire_value(exc.category), _wire_value(exc.type_id), exc.reason]]
    if isinstance(exc, E.InvalidCoordinate):
        return ["InvalidCoordinate", [exc.field, _wire_value(exc.value), exc.reason]]
    if isinstance(exc, E.InvalidArgument):
        return ["InvalidArgument", [exc.name, _wire_value(exc.value), exc.reason]]
    if isinstance(exc, E.InvalidPayload):
        return ["InvalidPayload", [exc.reason]]
    if isinstance(exc, E.ProtocolError):
        return ["ProtocolError", [exc.reason]]
    if isinstance(exc, E.FenceLost):
        return ["FenceLost", [exc.token, exc.reason]]
    if isinstance(exc, E.StorageError):
        return ["WriterUnavailable", [f"the writer failed closed: {exc}"]]
    return ["WriterUnavailable", [f"{type(exc).__name__}: {exc}"]]


def error_from_wire(data: Any) -> E.BatpakError:
    try:
        name, args = data
        if name == "ConcurrencyConflict":
            return E.ConcurrencyConflict(*args)
        if name == "PayloadTooLarge":
            return E.PayloadTooLarge(*args)
        if name == "ReservedKind":
            return E.ReservedKind(*args)
        if name == "InvalidKind":
            return E.InvalidKind(*args)
        if name == "InvalidCoordinate":
            return E.InvalidCoordinate(*args)
        if name == "InvalidArgument":
            return E.InvalidArgument(*args)
        if name == "InvalidPayload":
            return E.InvalidPayload(*args)
        if name == "ProtocolError":
            return E.ProtocolError(*args)
        if name == "FenceLost":
            return E.FenceLost(*args)
        if name == "WriterUnavailable":
            return E.WriterUnavailable(*args)
    except (TypeError, ValueError):
        pass
    return E.ProtocolError(f"unreadable error reply {data!r:.200}")
