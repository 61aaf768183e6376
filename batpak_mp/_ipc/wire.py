"""The wire codec between clients and the writer. Pure: bytes in, values out.

Owns: the format of queue messages, client areas, request bodies and replies
(docs/PROTOCOL.md §5-§8), their version, the limits a request is decoded within, and the
mapping of typed errors to and from the wire. Total decoders: any bytes give a value or
``ProtocolError`` — never another exception. Bounded decoders: what decoding a request
may allocate is fixed by ``Limits`` (the writer's configuration), never by the size of
the area a client chose — every array of an item holds at most 9 elements, maps and
text are refused, the objects one request may make are counted, and a payload is only
checked to be one well-formed msgpack object (skipped, never built).
msgpack only, never pickle. Must not import os, mmap, posix_ipc or any clock.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack

from .. import _errors as E
from .._format.frame import Buffer
from .._values import MAX_NAME_BYTES

# 3: a client area starts with the id of the request its reply answers; doorbells are
# words of the control block, not semaphores (§4.3, §6). 2: a receipt names its entity
# and scope when they are not the request's (§8.1)
WIRE_VERSION = 4
MAX_MESSAGE = 256  # bytes: a queue message is a reference of at most 81; a 10 x 256 queue is charged ~3.6 KiB of
# the user's RLIMIT_MSGQUEUE (819,200 by default), so one user can serve ~200 stores (10 x 8192 allowed 9)

OP_APPEND = 1  # body: [item, ...]; all-or-nothing
OP_SYNC = 2  # body: None; fsync now, reply the durable frontier
OP_PING = 3  # body: None; reply the frontier
OP_BYE = 4  # body: None; the client is leaving (the writer drops its area); no reply
OP_FENCE_BEGIN = 5  # body: None; reply: [fence token (16 bytes)]
OP_APPEND_FENCED = 6  # body: [token, [item, ...]]; written hidden inside the fence; reply: receipts
OP_FENCE_COMMIT = 7  # body: token; the fence's events become visible; reply: [visible, durable]
OP_FENCE_CANCEL = 8  # body: token; its events stay hidden for good; reply: [visible, durable]
OP_COMPACT = 9  # body: None; compaction (issue 13) runs, appends go on; reply: [segments, events, bytes, elapsed_ms]
FENCE_OPS = (OP_FENCE_BEGIN, OP_APPEND_FENCED, OP_FENCE_COMMIT, OP_FENCE_CANCEL)
_OPS = frozenset((OP_APPEND, OP_SYNC, OP_PING, OP_BYE, *FENCE_OPS, OP_COMPACT))

STATUS_OK = 0
STATUS_ERROR = 1

LEN = struct.Struct("<I")  # every body in a shared area is prefixed by its length
REPLY_TO = struct.Struct("<Q")  # area offset 0: the request id the reply in the area answers (0: none yet)
BODY_AT = REPLY_TO.size  # area offset of the length-prefixed request, later the reply
HEADER = BODY_AT + LEN.size  # bytes before the msgpack of a request or reply
AREA_MIN = 4096  # bytes: the writer refuses a smaller client area (clients make 64 KiB)
AREA_MAX = 1 << 30  # bytes: the writer refuses a larger one; no request needs more


class Message(NamedTuple):
    """What travels on the request queue: where the request body waits."""

    version: int
    client_pid: int  # the pid in the area's name (checked equal)
    area: str  # name of the client's shared-memory area
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
ITEM_OVERHEAD = 2 * MAX_NAME_BYTES + 128  # bytes of one item beyond its payload, at most (names, ids, ints, headers)
READ_CHUNK = 1 << 20  # a large request is read from its area and decoded 1 MiB at a time
SMALL_REQUEST = 4096 - HEADER  # bytes: a request this small (and flat) is decoded in one call


class Limits(NamedTuple):
    """What one request may hold: fixed by the writer's configuration."""

    max_request: int  # bytes of its msgpack
    max_items: int  # items of one append
    max_bin: int  # bytes of one bin (a payload; the request's own bytes bound it)

    @property
    def max_objects(self) -> int:
        """Objects decoding may make: the items, each a list of its fields, and a few."""
        return 16 + self.max_items * (ITEM_FIELDS + 1)


def request_limits(max_payload: int, max_items: int, max_batch_bytes: int) -> Limits:
    """The limits of a writer whose engine takes batches of ``max_items`` events and
    ``max_batch_bytes`` of payloads, ``max_payload`` each: the largest request it can
    accept is ``max_request`` bytes."""
    biggest = max(max_payload, max_batch_bytes) + max_items * ITEM_OVERHEAD + 64
    # a bin may be as large as the request (its bytes are the request's): a payload over
    # ``max_payload`` decodes, to be refused as PayloadTooLarge by the writer's item checks
    return Limits(biggest, max_items, biggest)


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


def decode_message(data: bytes, area_pid: Callable[[str], int | None]) -> Message:
    """A queue message; ``area_pid`` gives the pid in the name of one of this store's
    client areas, None for any other name (``names.parse_area_name``): a message naming
    anything else is refused, so the writer never opens another object, and so is one
    whose pid is not the one its area's name carries."""
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
    owner = area_pid(area) if isinstance(area, str) else None
    if owner is None:
        raise E.ProtocolError(f"area {area!r:.200} is not one of this store's client areas")
    if owner != pid:
        raise E.ProtocolError(f"client pid {pid} is not the pid of its area {area!r}")
    if type(request_id) is not int or not 0 <= request_id < 1 << 63:
        raise E.ProtocolError(f"bad request id {request_id!r}")
    return Message(version, pid, area, request_id)


def encode_request(req: Request) -> bytes:
    """A request as it goes into a client area at offset 0: no reply yet (``REPLY_TO``
    0), then the length-prefixed msgpack."""
    body = msgpack.packb([req.op, req.request_id, req.epoch_seen, req.body], use_bin_type=True)
    return REPLY_TO.pack(0) + LEN.pack(len(body)) + body  # type: ignore[no-any-return]


def request_length(head: Buffer, limits: Limits) -> int:
    """The length of the request whose area starts with ``head`` (at least ``HEADER``
    bytes, else the area was truncated): ``ProtocolError`` over ``limits.max_request``."""
    if len(head) < HEADER:
        raise E.ProtocolError(f"area holds {len(head)} bytes, no request header")
    n: int = LEN.unpack_from(head, BODY_AT)[0]
    if n > limits.max_request:
        raise E.ProtocolError(f"request of {n} bytes is over the {limits.max_request}-byte limit")
    return n


class Source:
    """Where a large request's bytes come from, ``READ_CHUNK`` at a time: ``read(size)``
    gives at most ``size`` bytes, b"" at the end (the writer reads its client's area)."""

    def read(self, size: int) -> bytes:  # pragma: no cover - an interface
        raise NotImplementedError


class _Budget:
    """A list hook that counts what decoding has made (each list and its elements) and
    stops it past ``left``: the memory a request may take is fixed, whatever its shape."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left

    def __call__(self, value: list[Any]) -> list[Any]:
        self.left -= len(value) + 1
        if self.left < 0:
            raise ValueError("request holds more objects than its items may")
        return value


def _no_map(value: dict[Any, Any]) -> Any:
    raise ValueError("a request holds no maps")


def _request_unpacker(data: Buffer | Source, n: int, limits: Limits) -> msgpack.Unpacker:
    opts: dict[str, Any] = dict(raw=False, use_list=True, max_bin_len=limits.max_bin, max_str_len=0,
                                max_array_len=ITEM_FIELDS, max_map_len=0, max_ext_len=0,
                                list_hook=_Budget(limits.max_objects), object_hook=_no_map)
    if isinstance(data, Source):
        return msgpack.Unpacker(data, read_size=min(READ_CHUNK, n) or 1,
                                max_buffer_size=limits.max_bin + READ_CHUNK, **opts)
    unpacker = msgpack.Unpacker(max_buffer_size=max(n, 1), **opts)
    unpacker.feed(data)
    return unpacker


def decode_request(data: Buffer | Source, n: int, limits: Limits) -> Request:
    """Decode a request of ``n`` bytes (its msgpack, after the header): ``data`` holds
    them, or is a ``Source`` to read them from. Allocates within ``limits``.

    A small request (``SMALL_REQUEST`` bytes, every array at most 9 long: a single
    append, a batch of up to 9, any other op) is decoded in one call: it cannot make more
    objects than it has bytes, so it needs no counting. Anything else, or anything that
    call refuses, goes through the streaming decoder, which has the last word."""
    if n <= SMALL_REQUEST and not isinstance(data, Source):
        try:
            doc = msgpack.unpackb(data, raw=False, max_array_len=ITEM_FIELDS, max_map_len=0, max_str_len=0,
                                  max_ext_len=0, max_bin_len=SMALL_REQUEST)
        except Exception:
            pass  # malformed, or a batch of more than 9: decided below
        else:
            return _request_from(doc, limits)
    try:
        unpacker = _request_unpacker(data, n, limits)
        req = _read_request(unpacker, limits)
        if unpacker.tell() != n:
            raise E.ProtocolError(f"request is {unpacker.tell()} bytes, its header says {n}")
    except E.BatpakError:
        raise
    except Exception as exc:  # msgpack raises many types for hostile bytes; our hooks ValueError
        raise E.ProtocolError(f"malformed request: {type(exc).__name__}: {str(exc)[:100]}") from None
    return req


def _request_from(doc: Any, limits: Limits) -> Request:
    """A request from its decoded msgpack (the small-request path)."""
    if not isinstance(doc, list) or len(doc) != 4:
        raise E.ProtocolError("request is not a 4-element array")
    op, request_id, epoch_seen, body = doc
    if op not in _OPS:
        raise E.ProtocolError(f"unknown op {op!r:.40}")
    if type(request_id) is not int or type(epoch_seen) is not int:
        raise E.ProtocolError("request id and epoch must be ints")
    if op == OP_APPEND_FENCED:
        if not isinstance(body, list) or len(body) != 2 or not _is_token(body[0]):
            raise E.ProtocolError("fenced append body must be [token, items]")
        _check_items(body[1], limits)
    elif op == OP_APPEND:
        _check_items(body, limits)
    elif op in (OP_FENCE_COMMIT, OP_FENCE_CANCEL) and not _is_token(body):
        raise E.ProtocolError("fence commit/cancel body must be a 16-byte token")
    return Request(op, request_id, epoch_seen, body)


def _check_items(body: Any, limits: Limits) -> None:
    if not isinstance(body, list) or not body:
        raise E.ProtocolError("append body must be a non-empty array of items")
    if len(body) > limits.max_items:
        raise E.InvalidArgument("items", len(body), f"a batch holds at most {limits.max_items} events")
    for item in body:
        check_item(item)


def _read_request(u: msgpack.Unpacker, limits: Limits) -> Request:
    if u.read_array_header() != 4:
        raise E.ProtocolError("request is not a 4-element array")
    op, request_id, epoch_seen = u.unpack(), u.unpack(), u.unpack()
    if op not in _OPS:
        raise E.ProtocolError(f"unknown op {op!r:.40}")
    if type(request_id) is not int or type(epoch_seen) is not int:
        raise E.ProtocolError("request id and epoch must be ints")
    body: Any
    if op == OP_APPEND_FENCED:
        if u.read_array_header() != 2:
            raise E.ProtocolError("fenced append body must be [token, items]")
        token = u.unpack()
        if not _is_token(token):
            raise E.ProtocolError("fenced append body must be [token, items]")
        body = [token, _read_items(u, limits)]
    elif op == OP_APPEND:
        body = _read_items(u, limits)
    else:
        body = u.unpack()
        if op in (OP_FENCE_COMMIT, OP_FENCE_CANCEL) and not _is_token(body):
            raise E.ProtocolError("fence commit/cancel body must be a 16-byte token")
    return Request(op, request_id, epoch_seen, body)


def _read_items(u: msgpack.Unpacker, limits: Limits) -> list[Any]:
    n = u.read_array_header()
    if n > limits.max_items:  # the engine's own words (its batch limit), before any item is decoded
        raise E.InvalidArgument("items", n, f"a batch holds at most {limits.max_items} events")
    if n == 0:
        raise E.ProtocolError("append body must be a non-empty array of items")
    items = [u.unpack() for _ in range(n)]
    for item in items:
        check_item(item)
    return items


def payload_is_msgpack(data: bytes) -> bool:
    """Whether ``data`` is exactly one well-formed msgpack object. Skips it without
    building it: no memory beyond the bytes, whatever they hold."""
    try:
        unpacker = msgpack.Unpacker(max_buffer_size=len(data) or 1)
        unpacker.feed(data)
        unpacker.skip()
        return bool(unpacker.tell() == len(data))
    except Exception:
        return False


def unpack_limited(data: bytes, max_objects: int, max_array_len: int, max_map_len: int) -> Any:
    """Decode small trusted-shape data (a store kind's payload) within a budget of
    objects; ``ProtocolError`` beyond it or for malformed bytes."""
    budget = _Budget(max_objects)

    def count_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        budget(pairs)  # counted as a list of its pairs
        return dict(pairs)

    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, max_array_len=max_array_len,
                               max_map_len=max_map_len, max_ext_len=0, list_hook=budget,
                               object_pairs_hook=count_map)
    except Exception as exc:
        raise E.ProtocolError(f"malformed payload: {type(exc).__name__}") from None


def _is_token(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == 16


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
    """A reply as it goes into a client area at ``BODY_AT`` (length-prefixed msgpack);
    the writer then writes ``REPLY_TO`` at offset 0 (the client's "it is there")."""
    body = msgpack.packb([reply.request_id, reply.writer_epoch, reply.status, reply.data], use_bin_type=True)
    return LEN.pack(len(body)) + body  # type: ignore[no-any-return]


def decode_reply(area: Buffer) -> Reply:
    """Decode the length-prefixed reply at the start of ``area`` (a client's area from
    ``BODY_AT`` on)."""
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
    if r.deduplicated:  # an earlier call's event: entity, scope and the flag (PROTOCOL.md §8.1)
        fields += [r.entity, r.scope, True]
    elif r.entity.encode() != entity or r.scope.encode() != scope:
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
        return ["ConcurrencyConflict", [exc.entity, exc.expected, exc.actual, [list(c) for c in exc.conflicts]]]
    if isinstance(exc, E.IdempotencyConflict):
        return ["IdempotencyConflict", [exc.key, exc.sequence, exc.field]]
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
    if isinstance(exc, E.DiskFull):  # the request was not written; the writer serves on
        return ["DiskFull", [str(exc.op), str(exc.path), int(exc.errno or 0), str(exc.cause.strerror or exc.cause)]]
    if isinstance(exc, E.StorageError):
        return ["WriterUnavailable", [f"the writer failed closed: {exc}"]]
    return ["WriterUnavailable", [f"{type(exc).__name__}: {exc}"]]


def error_from_wire(data: Any) -> E.BatpakError:
    try:
        name, args = data
        if name == "ConcurrencyConflict":
            return E.ConcurrencyConflict(*args)
        if name == "IdempotencyConflict":
            return E.IdempotencyConflict(*args)
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
        if name == "DiskFull":
            op, path, err, text = args
            return E.DiskFull(str(op), str(path), OSError(int(err), str(text)))
    except (TypeError, ValueError):
        pass
    return E.ProtocolError(f"unreadable error reply {data!r:.200}")
