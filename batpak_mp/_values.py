"""Plain values of the public API: coordinates, kinds, receipts, events, pages.

Owns: construction-time validation of caller input (coordinates, kinds), the shapes
the store hands back, and this process's registry of payload versions and upcasters
(``register_payload``: ``Event.payload`` upcasts with it). Pure: no I/O, no clock, no
randomness. Must not import any other module of the package except ``_errors``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from ._errors import FutureVersion, InvalidArgument, InvalidCoordinate, InvalidKind, MasterKeyError, ReservedKind

MAX_NAME_BYTES = 1024  # entity/scope limit in UTF-8 bytes: keeps frame headers small
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

CATEGORY_SYSTEM = 0x0  # reserved: the writer's own lifecycle events
CATEGORY_EFFECT = 0xD  # reserved: store-generated effects (denials, reactions' bookkeeping)
RESERVED_CATEGORIES = frozenset({CATEGORY_SYSTEM, CATEGORY_EFFECT})

# Reserved kinds a client may ask the writer to append on the store's behalf (cursor
# positions, gate audit records), each with the payload keys it must carry. Every other
# reserved kind is refused with ReservedKind.
SYSTEM_WRITER_STARTED = 0x001
SYSTEM_WRITER_STOPPED = 0x002
SYSTEM_CURSOR_ACK = 0x010
SYSTEM_FENCE_COMMIT = 0x020  # payload {"fence": token, "ranges": [[first, last], ...]}: those become visible
SYSTEM_FENCE_CANCEL = 0x021  # payload {"fence": token, "ranges": [...], "why": str}: they stay hidden for good
FENCE_ENTITY = "fences"  # the chain holding every fence commit and cancel (scope "system")
SYSTEM_REDACT_REQUEST = 0x030  # payload {"event": id, "sequence": int, "reason": str}: compaction removes its payload
REDACTION_ENTITY = "redactions"  # the chain of erasure requests (scope "system"); kept for good, never redacted
SYSTEM_RETENTION_SET = 0x031  # payload {"rules": [...], "idempotency_window_ms": int | None}: the rules from now on
RETENTION_ENTITY = "retention"  # the chain of retention rule sets (scope "system"): the latest is in force
SYSTEM_SHRED = 0x032  # payload {"key": 16-byte key id}: that data key is destroyed before this event is written
SHRED_ENTITY = "shredding"  # the chain of shreds (scope "system"); names no entity, only its key id
EFFECT_DENIAL = 0x001
EFFECT_BYPASS = 0x002
STORE_KINDS: dict[int, frozenset[str]] = {
    (CATEGORY_SYSTEM << 12) | SYSTEM_CURSOR_ACK: frozenset({"cursor", "through"}),
    (CATEGORY_SYSTEM << 12) | SYSTEM_REDACT_REQUEST: frozenset({"event", "sequence", "reason"}),
    (CATEGORY_SYSTEM << 12) | SYSTEM_RETENTION_SET: frozenset({"rules", "idempotency_window_ms"}),
    (CATEGORY_SYSTEM << 12) | SYSTEM_SHRED: frozenset({"key"}),
    (CATEGORY_EFFECT << 12) | EFFECT_DENIAL: frozenset({"gate", "code", "message"}),
    (CATEGORY_EFFECT << 12) | EFFECT_BYPASS: frozenset({"reason"}),
}


def check_name(field_name: str, value: object) -> bytes:
    """Validate an entity or scope name; return its UTF-8 bytes."""
    if not isinstance(value, str):
        raise InvalidCoordinate(field_name, value, "must be a str")
    if not value:
        raise InvalidCoordinate(field_name, value, "must not be empty")
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_NAME_BYTES:
        raise InvalidCoordinate(
            field_name, value, f"is {len(raw)} UTF-8 bytes, the limit is {MAX_NAME_BYTES}"
        )
    if _CONTROL.search(value):
        raise InvalidCoordinate(field_name, value, "contains a control character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidCoordinate(field_name, value, "contains a lone surrogate") from None
    return raw


class Coordinate:
    """Where an event belongs: its ``entity`` (the hash chain) and its ``scope``."""

    __slots__ = ("_entity_bytes", "_scope_bytes", "entity", "scope")

    entity: str
    scope: str

    def __init__(self, entity: str, scope: str) -> None:
        self._entity_bytes = check_name("entity", entity)
        self._scope_bytes = check_name("scope", scope)
        self.entity = entity
        self.scope = scope

    @classmethod
    def _trusted(cls, entity_bytes: bytes, scope_bytes: bytes) -> Coordinate:
        """Build from bytes already validated on the way into the log."""
        self = object.__new__(cls)
        self._entity_bytes = entity_bytes
        self._scope_bytes = scope_bytes
        self.entity = entity_bytes.decode("utf-8")
        self.scope = scope_bytes.decode("utf-8")
        return self

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Coordinate)
            and self.entity == other.entity
            and self.scope == other.scope
        )

    def __hash__(self) -> int:
        return hash((self.entity, self.scope))

    def __repr__(self) -> str:
        return f"Coordinate({self.entity!r}, {self.scope!r})"


class Kind(NamedTuple):
    """An event kind: ``category`` 0..15 (0x0 and 0xD reserved) and ``type_id`` 0..4095."""

    category: int
    type_id: int

    def packed(self) -> int:
        return (self.category << 12) | self.type_id

    @classmethod
    def unpack(cls, value: int) -> Kind:
        return cls(value >> 12, value & 0xFFF)


def check_kind(kind: object, *, allow_reserved: bool = False) -> int:
    """Validate a caller's kind; return its packed 16-bit form."""
    if not isinstance(kind, tuple) or len(kind) != 2:
        raise InvalidKind(kind, None, "must be a bp.Kind(category, type_id)")
    category, type_id = kind
    if type(category) is not int or not 0 <= category <= 15:
        raise InvalidKind(category, type_id, "category must be an int in 0..15")
    if type(type_id) is not int or not 0 <= type_id <= 4095:
        raise InvalidKind(category, type_id, "type_id must be an int in 0..4095")
    if category in RESERVED_CATEGORIES and not allow_reserved:
        raise ReservedKind(category, type_id)
    return (category << 12) | type_id


class Receipt(NamedTuple):
    """Proof that an event was committed; returned by ``append``."""

    event_id: bytes
    global_sequence: int
    entity: str
    scope: str
    entity_clock: int
    event_hash: bytes
    prev_hash: bytes
    wall_ms: int
    durable: bool
    signature: bytes | None = None
    deduplicated: bool = False  # its idempotency key was committed by an earlier call: nothing was written


class Event:
    """One committed event, as read from the log. ``payload`` is decoded on first use."""

    __slots__ = (
        "_payload",
        "causation_id",
        "coordinate",
        "correlation_id",
        "entity_clock",
        "event_hash",
        "event_id",
        "global_sequence",
        "kind",
        "payload_bytes",
        "payload_version",
        "prev_hash",
        "redacted",
        "scope_position",
        "wall_ms",
    )

    def __init__(
        self,
        event_id: bytes,
        global_sequence: int,
        coordinate: Coordinate,
        kind: Kind,
        entity_clock: int,
        wall_ms: int,
        payload_bytes: bytes,
        payload_version: int,
        event_hash: bytes,
        prev_hash: bytes,
        causation_id: bytes | None,
        correlation_id: bytes | None,
        redacted: bool = False,
        scope_position: int | None = None,
    ) -> None:
        self.event_id = event_id
        self.global_sequence = global_sequence
        self.coordinate = coordinate
        self.kind = kind
        self.entity_clock = entity_clock
        self.wall_ms = wall_ms
        self.payload_bytes = payload_bytes
        self.payload_version = payload_version
        self.event_hash = event_hash
        self.prev_hash = prev_hash
        self.causation_id = causation_id
        self.correlation_id = correlation_id
        self.redacted = redacted  # a stub: compaction removed the payload (None), its digest stays in the chain
        # the event's gap-free position in its scope (1, 2, ...: stream order), filled by
        # the reader from positions.idx; None where a read does not know it
        self.scope_position = scope_position
        self._payload: Any = None if redacted else _UNDECODED

    @property
    def payload(self) -> Any:
        """The decoded payload, upcast in memory to the registered version of its kind
        (``register_payload``); ``FutureVersion`` if it was stored at a newer one. An
        encrypted payload is decrypted first (issue 13); None once its key was shredded."""
        if self._payload is _UNDECODED:
            raw: bytes | None = self.payload_bytes
            if self.payload_bytes[:1] == _ENCRYPTED:
                raw = _decrypted(self)
                if raw is None:  # shredded: its key is gone everywhere
                    self._payload = None
                    return None
            value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            if _PAYLOAD_VERSIONS:
                registered = _PAYLOAD_VERSIONS.get((self.kind[0] << 12) | self.kind[1])
                if registered is not None:
                    value = _upcast(self.kind, self.payload_version, value, registered)
            self._payload = value
        return self._payload

    @property
    def encrypted(self) -> bool:
        """The payload is stored encrypted under its entity's data key (issue 13)."""
        return self.payload_bytes[:1] == _ENCRYPTED

    @property
    def shredded(self) -> bool:
        """The payload was encrypted and its key destroyed (``shred``): it reads as None."""
        return self.payload_bytes[:1] == _ENCRYPTED and _decrypted(self) is None

    @property
    def entity(self) -> str:
        return self.coordinate.entity

    @property
    def scope(self) -> str:
        return self.coordinate.scope

    def __repr__(self) -> str:
        return (
            f"Event(seq={self.global_sequence}, id={self.event_id.hex()}, "
            f"entity={self.coordinate.entity!r}, kind={tuple(self.kind)}, "
            f"clock={self.entity_clock})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and (
            self.event_id == other.event_id and self.event_hash == other.event_hash
        )

    def __hash__(self) -> int:
        return hash(self.event_id)


_UNDECODED: Any = object()
_ENCRYPTED = b"\xc1"  # the first byte of an encrypted payload (_crypto.MARK): msgpack never uses 0xC1
_CIPHERS: dict[bytes, Callable[[bytes, bytes], bytes | None]] = {}  # store tag (2 bytes) -> decrypt(entity, data)


def register_cipher(store_tag: int, decrypt: Callable[[bytes, bytes], bytes | None]) -> None:
    """How this process decrypts the payloads of the store with ``store_tag`` (``_crypto``)."""
    _CIPHERS[store_tag.to_bytes(2, "big")] = decrypt


def _decrypted(ev: Event) -> bytes | None:
    decrypt = _CIPHERS.get(ev.event_id[6:8])
    if decrypt is None:
        raise MasterKeyError("", "this process opened no master key for the store of event "
                                 f"{ev.event_id.hex()}: its payload is encrypted")
    return decrypt(ev.coordinate._entity_bytes, ev.payload_bytes)

# -- payload versions ------------------------------------------------------------------------
# packed kind -> (current version, upcasters): upcasters[n - 1] turns a version-n payload
# into version n + 1. Per process: each process registers the kinds it reads and writes.
_PAYLOAD_VERSIONS: dict[int, tuple[int, tuple[Callable[[Any], Any], ...]]] = {}


def register_payload(kind: Kind, version: int, upcasters: Mapping[int, Callable[[Any], Any]] | None = None) -> None:
    """Declare that payloads of ``kind`` are at ``version`` (1..65535) in this process.

    ``upcasters[n]`` turns a version-``n`` payload into version ``n + 1``; one is needed
    for every ``n`` in ``1 .. version - 1`` (checked here, so a read never meets a gap).
    From then on, appends of ``kind`` from this process are stamped with ``version``
    (unless the caller passes ``payload_version``) and ``Event.payload`` upcasts older
    payloads in memory; stored bytes are never rewritten. Version 0 (what an append of an
    unregistered kind records) is read as version 1. A payload stored at a version newer
    than ``version`` raises ``FutureVersion`` when read. Registering again replaces the
    earlier registration. Reserved kinds cannot be registered."""
    packed = check_kind(kind)
    if type(version) is not int or not 1 <= version <= 0xFFFF:
        raise InvalidArgument("version", version, "must be an int in 1..65535")
    given = dict(upcasters or {})
    if set(given) != set(range(1, version)):
        raise InvalidArgument("upcasters", sorted(given, key=repr),
                              f"needs exactly one upcaster for each version in 1..{version - 1}")
    for n, fn in given.items():
        if not callable(fn):
            raise InvalidArgument(f"upcasters[{n}]", fn, "must be callable")
    _PAYLOAD_VERSIONS[packed] = (version, tuple(given[n] for n in range(1, version)))


def unregister_payload(kind: Kind) -> None:
    """Forget the registration of ``kind`` (its events read as stored again)."""
    _PAYLOAD_VERSIONS.pop(check_kind(kind), None)


def payload_version_for(kind: object) -> int:
    """The version an append of ``kind`` is stamped with when the caller gives none: the
    registered version, else 0. Never raises (the append validates the kind itself)."""
    if not _PAYLOAD_VERSIONS:
        return 0
    try:
        packed = (kind[0] << 12) | kind[1]  # type: ignore[index]
        registered = _PAYLOAD_VERSIONS.get(packed)
    except (TypeError, IndexError, KeyError):
        return 0
    return registered[0] if registered is not None else 0


def _upcast(kind: Kind, stored: int, value: Any, registered: tuple[int, tuple[Callable[[Any], Any], ...]]) -> Any:
    current, upcasters = registered
    stored = max(stored, 1)
    if stored > current:
        raise FutureVersion(kind, stored, current)
    for n in range(stored, current):
        value = upcasters[n - 1](value)
    return value


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One event of an ``append_batch`` call."""

    coord: Coordinate
    kind: Kind
    payload: Any
    idempotency_key: str | bytes | None = None
    expected_clock: int | None = None
    causation_id: bytes | None = None
    correlation_id: bytes | None = None
    payload_version: int | None = None  # None: the registered version of the kind (else 0)


@dataclass(frozen=True, slots=True)
class Page:
    """A page of ``query_after``: ``events`` ascending, resume with ``next_after``."""

    events: list[Event]
    next_after: int


class WriterState(enum.IntEnum):
    """Life stages of the writer, as published in the control block."""

    ABSENT = 0
    STARTING = 1
    READY = 2
    DRAINING = 3
    STOPPED = 4
    FAILED = 5


@dataclass(frozen=True, slots=True)
class Frontier:
    """How far the log is visible and durable, and who is writing it."""

    visible: int
    durable: int
    writer_epoch: int
    writer_state: WriterState
    writer_pid: int = 0


class SyncMode(enum.Enum):
    """When the writer fsyncs. ``GROUP`` (default) fsyncs every commit group before
    acknowledging; ``INTERVAL`` acknowledges at once and fsyncs on a timer; ``NONE``
    leaves it to the kernel. The weaker two say ``durable=False`` in receipts."""

    GROUP = "group"
    INTERVAL = "interval"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of ``verify``: where, and what is wrong."""

    segment: str
    offset: int
    what: str


@dataclass(slots=True)
class VerifyReport:
    """The outcome of ``bp.verify(data_dir)``."""

    events_checked: int = 0
    segments_checked: int = 0
    events_fenced: int = 0  # written inside visibility fences (checked like every other event)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How the supervisor restarts a writer that died. Exactly two policies exist:
    ``RestartPolicy.once()`` (one restart in the supervisor's life) and
    ``RestartPolicy.bounded(max_restarts, within_ms)`` (at most ``max_restarts`` restarts
    within any rolling window of ``within_ms``)."""

    kind: str  # "once" or "bounded"
    max_restarts: int = 1
    within_ms: int = 0

    @classmethod
    def once(cls) -> RestartPolicy:
        return cls("once", 1, 0)

    @classmethod
    def bounded(cls, max_restarts: int, within_ms: int) -> RestartPolicy:
        from ._errors import InvalidArgument

        if type(max_restarts) is not int or max_restarts < 0:
            raise InvalidArgument("max_restarts", max_restarts, "must be an int >= 0")
        if type(within_ms) is not int or within_ms < 1:
            raise InvalidArgument("within_ms", within_ms, "must be an int >= 1 (milliseconds)")
        return cls("bounded", max_restarts, within_ms)

    def spec(self) -> str:
        """The command-line form: ``once`` or ``bounded:N:MS``."""
        return "once" if self.kind == "once" else f"bounded:{self.max_restarts}:{self.within_ms}"

    @classmethod
    def parse(cls, text: str) -> RestartPolicy:
        from ._errors import InvalidArgument

        if text == "once":
            return cls.once()
        parts = text.split(":")
        if len(parts) == 3 and parts[0] == "bounded" and all(x.isascii() and x.isdigit() for x in parts[1:]):
            return cls.bounded(int(parts[1]), int(parts[2]))
        raise InvalidArgument("restart", text, "must be 'once' or 'bounded:MAX_RESTARTS:WITHIN_MS'")


class CompactReport(NamedTuple):
    """What ``compact()`` did: sealed segments rewritten and swapped in, events whose
    payload it removed (each now a stub), and the bytes the segment files shrank by."""

    segments_rewritten: int
    events_removed: int
    bytes_reclaimed: int
    elapsed_ms: float
