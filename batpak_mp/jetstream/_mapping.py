"""How one journal event becomes one JetStream message, and how a message is checked.

Owns: the subject of an event (``<prefix>.<entity token>``: an entity's UTF-8 bytes with
every byte outside ``[A-Za-z0-9_-]`` written ``~xx``, so any entity is one subject token),
the message headers (``Nats-Msg-Id`` = event id hex, the store id, sequence, entity,
clock, kind, hashes, frame version), the stream metadata that names the store, the body
(the frame's bytes exactly as the journal holds them), and
``ChainCheck``: the one check every reader of a stream applies to each message in
stream order (the remote reader and restore-from-stream both use it): the frame decodes
whole (length, CRC, version, names) and its event hash recomputes
(``_format.frame.decode_frame``), its sequence is the message's stream sequence (no gap,
no reordering), its headers say what its frame says, its event id carries the store's
tag and its sequence, and it extends its entity's hash chain (``prev_hash`` is the
entity's last hash, ``entity_clock`` is one more).
Invariants: stream sequence N holds global sequence N (the bridge publishes with
``Nats-Expected-Last-Sequence`` = N - 1), so the stream is the journal, message for
message; a message that fails a check is reported as ``StreamTampered`` naming its stream
sequence and subject, and nothing after it is accepted.
Pure: bytes and strings in, values out; no sockets, no clock. Must not import os,
asyncio, nats, the read side or any process role.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import quote, unquote_to_bytes

from .._errors import BatpakError, StreamTampered
from .._format.frame import HASHED_START, ZERO_HASH, Frame, NeedMore, decode_frame
from .._format.ids import event_id_sequence, store_tag_of
from .._values import Kind

# -- headers and metadata (the names are part of the stream's format: never renamed) -----------
MSG_ID = "Nats-Msg-Id"  # JetStream de-duplicates on it (within the stream's duplicate window)
EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"  # the server refuses the publish unless the stream ends there
H_STORE = "Bp-Store"  # hex store id (store.meta) of the journal the event belongs to
H_SEQ = "Bp-Seq"  # global sequence, decimal
H_ENTITY = "Bp-Entity"  # entity, percent-encoded UTF-8
H_CLOCK = "Bp-Clock"  # entity clock, decimal
H_KIND = "Bp-Kind"  # "category:type_id", decimal
H_HASH = "Bp-Hash"  # event hash, hex
H_PREV = "Bp-Prev"  # previous hash in the entity's chain, hex
H_FRAME = "Bp-Frame"  # frame version of the body
META_STORE = "batpak_store_id"  # stream metadata: the one store whose journal this stream holds
META_FORMAT = "batpak_stream"  # stream metadata: this mapping's version
STREAM_FORMAT = "1"
PREFIX_ROOT = "batpak"  # default subject prefix: batpak.<stream>

_TOKEN_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_HEX = "0123456789abcdef"


def default_prefix(stream: str) -> str:
    return f"{PREFIX_ROOT}.{stream}"


def entity_token(entity: bytes) -> str:
    """One subject token for any entity: safe bytes as they are, others as ``~xx``."""
    return "".join(chr(b) if b in _TOKEN_SAFE else "~" + _HEX[b >> 4] + _HEX[b & 15] for b in entity)


def token_entity(token: str) -> bytes:
    """The entity bytes of a token ``entity_token`` made; ValueError for any other string."""
    out = bytearray()
    i = 0
    while i < len(token):
        c = token[i]
        if c == "~":
            pair = token[i + 1:i + 3]
            if len(pair) != 2 or any(ch not in _HEX for ch in pair):
                raise ValueError(f"bad escape in subject token {token!r}")
            out.append(int(pair, 16))
            i += 3
            continue
        b = ord(c)
        if b not in _TOKEN_SAFE:
            raise ValueError(f"character {c!r} is not allowed in a subject token")
        out.append(b)
        i += 1
    return bytes(out)


def subject_of(prefix: str, entity: bytes) -> str:
    return f"{prefix}.{entity_token(entity)}"


def frame_version(body: bytes) -> int:
    """The version field of the frame at the start of ``body`` (0 when too short)."""
    return int.from_bytes(body[HASHED_START:HASHED_START + 2], "little") if len(body) >= HASHED_START + 2 else 0


def kind_text(packed: int) -> str:
    k = Kind.unpack(packed)
    return f"{k.category}:{k.type_id}"


def headers_of(frame: Frame, store_hex: str, version: int) -> dict[str, str]:
    """The headers of the message of ``frame`` (without the publish expectation)."""
    return {
        MSG_ID: frame.event_id.hex(), H_STORE: store_hex, H_SEQ: str(frame.global_sequence),
        H_ENTITY: quote(frame.entity, safe=""), H_CLOCK: str(frame.entity_clock), H_KIND: kind_text(frame.kind),
        H_HASH: frame.event_hash.hex(), H_PREV: frame.prev_hash.hex(), H_FRAME: str(version),
    }


def publish_headers(frame: Frame, store_hex: str, version: int) -> dict[str, str]:
    """``headers_of`` plus the expectation that the stream ends just before this event."""
    h = headers_of(frame, store_hex, version)
    h[EXPECTED_LAST_SEQ] = str(frame.global_sequence - 1)
    return h


class Head(NamedTuple):
    clock: int
    event_hash: bytes


class ChainCheck:
    """Checks the messages of one stream in stream order (see the module docstring).
    ``store_hex``: the store the stream must hold (None: the first message's, which
    must then match the stream's metadata when the caller gives that)."""

    def __init__(self, stream: str, store_hex: str | None = None) -> None:
        self.stream = stream
        self.store_hex = store_hex
        self.next_seq = 1
        self.heads: dict[bytes, Head] = {}
        self.broken: StreamTampered | None = None  # sticky: nothing after a bad message is accepted
        self._tag: bytes | None = None  # the store tag every event id carries (bytes 6..8)

    def _bad(self, seq: int, subject: str, reason: str) -> StreamTampered:
        self.broken = StreamTampered(self.stream, seq, subject, reason)
        return self.broken

    def check(self, stream_seq: int, subject: str, headers: Mapping[str, str] | None, body: bytes) -> Frame:
        """The frame of the next message, checked; ``StreamTampered`` otherwise."""
        if self.broken is not None:
            raise self.broken
        if stream_seq != self.next_seq:
            what = "missing" if stream_seq > self.next_seq else "out of order"
            raise self._bad(stream_seq, subject, f"message {self.next_seq} is {what} (got {stream_seq})")
        h = headers or {}
        store = h.get(H_STORE)
        if store is None:
            raise self._bad(stream_seq, subject, f"no {H_STORE} header: not a batpak-mp event")
        if self.store_hex is None:
            self.store_hex = store
        elif store != self.store_hex:
            raise self._bad(stream_seq, subject, f"store {store}, the stream's is {self.store_hex}")
        try:
            frame = decode_frame(bytes(body), segment=f"stream {self.stream}", offset=stream_seq)
        except BatpakError as exc:  # CorruptSegment / FutureFormat: checksum, hash, structure, version
            raise self._bad(stream_seq, subject, f"frame: {getattr(exc, 'reason', exc)}") from None
        if not isinstance(frame, Frame) or frame.frame_len != len(body):
            got = "a truncated frame" if isinstance(frame, NeedMore) else "not exactly one frame"
            raise self._bad(stream_seq, subject, f"body is {got}")
        expect = headers_of(frame, self.store_hex, frame_version(body))
        for name, value in expect.items():
            if h.get(name) != value:
                raise self._bad(stream_seq, subject, f"header {name} is {h.get(name)!r}, its frame says {value!r}")
        if frame.global_sequence != stream_seq:
            raise self._bad(stream_seq, subject, f"frame of sequence {frame.global_sequence} at stream sequence {stream_seq}")
        if self._tag is None:
            self._tag = store_tag_of(bytes.fromhex(self.store_hex)).to_bytes(2, "big") if len(self.store_hex) == 32 else b""
        if event_id_sequence(frame.event_id) != stream_seq or frame.event_id[6:8] != self._tag:
            raise self._bad(stream_seq, subject, "event id does not carry this store's tag and this sequence")
        if not subject.endswith("." + entity_token(frame.entity)):
            raise self._bad(stream_seq, subject, "subject does not name the frame's entity")
        head = self.heads.get(frame.entity) or Head(0, ZERO_HASH)
        if frame.prev_hash != head.event_hash or frame.entity_clock != head.clock + 1:
            raise self._bad(stream_seq, subject,
                            f"hash chain of entity {frame.entity.decode(errors='replace')!r} broken: clock "
                            f"{frame.entity_clock} after {head.clock}, prev_hash {frame.prev_hash.hex()[:16]} "
                            f"after {head.event_hash.hex()[:16]}")
        self.heads[frame.entity] = Head(frame.entity_clock, frame.event_hash)
        self.next_seq = stream_seq + 1
        return frame


def entity_of_header(value: str) -> bytes:
    """The entity bytes of an ``H_ENTITY`` header."""
    return unquote_to_bytes(value)
