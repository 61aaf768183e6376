"""The frame codec: one event <-> bytes. Pure: bytes in, values out; no I/O, no clock.

Owns: the byte layout of a frame (docs/FORMAT.md §3.2), declared once as the ``Header``
NamedTuple (each field's struct code in its annotation; ``HEADER``, ``LEN_CRC``,
``HASHED_HEADER``, the offsets and the ``H_*`` positions are derived from it); the flag
bits and their names (§3.3); the cumulative per-entity hash chain (``event_hash`` covers
the predecessor's hash, every header field, the entity and scope bytes and, from frame
version 2 on, a digest of the payload rather than its bytes, so compaction can replace a
payload by its digest, a *stub*, and the chain still verifies: §3.4; ``encode_stub``);
the CRC; and **the frame validity rule**, written once in ``frame_header``: every decoder
(``scan_frame``/``decode_frame``, the recovery scan, the reader, inspect) goes through it,
so they accept and reject the same bytes. Decoders are total: any byte string gives a
frame, "need more", the end marker or one typed error, never ``IndexError``/``struct.error``.
Must not import os, mmap, posix_ipc or anything with a clock.
"""

from __future__ import annotations

import hashlib
import zlib
from functools import reduce
from operator import or_
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, TypeAlias

from .._errors import CorruptSegment, FutureFormat
from .._values import Coordinate, Event, Kind
from .layout import fields_of, offset_of, position_of, struct_of

if TYPE_CHECKING:
    import mmap

Buffer: TypeAlias = "bytes | bytearray | memoryview | mmap.mmap"

FRAME_VERSION = 2  # what the writer writes (docs/FORMAT.md §3.4: the chain covers the payload's digest)
FRAME_VERSION_MIN = 1  # the oldest frame version still read and verified (its chain covers the payload bytes)
PAYLOAD_DIGEST_SIZE = 32  # bytes of blake2b over a payload: what a version-2 hash covers, and a stub keeps


class Header(NamedTuple):
    """The fixed 176-byte head of every frame, in byte order: the layout, defined here
    and nowhere else. Then come entity, scope and payload bytes."""

    frame_len: Annotated[int, "I"]  # whole frame, these 4 bytes included
    crc: Annotated[int, "I"]  # crc32 of frame[8:frame_len]
    version: Annotated[int, "H"]  # FRAME_VERSION; the hashed header starts here
    flags: Annotated[int, "H"]
    kind: Annotated[int, "H"]  # category << 12 | type_id
    entity_len: Annotated[int, "H"]
    scope_len: Annotated[int, "H"]
    payload_version: Annotated[int, "H"]
    payload_len: Annotated[int, "I"]
    global_sequence: Annotated[int, "Q"]
    entity_clock: Annotated[int, "Q"]
    wall_ms: Annotated[int, "Q"]
    event_id: Annotated[bytes, "16s"]
    causation_id: Annotated[bytes, "16s"]
    correlation_id: Annotated[bytes, "16s"]
    idem_hash: Annotated[bytes, "16s"]
    prev_hash: Annotated[bytes, "32s"]  # the hashed header ends here
    event_hash: Annotated[bytes, "32s"]  # not hashed: it *is* the hash


HEADER_FIELDS = fields_of(Header)
HEADER = struct_of(HEADER_FIELDS)  # "<IIHHHHHHIQQQ16s16s16s16s32s32s"
HEADER_SIZE = HEADER.size  # 176 bytes
LEN_CRC = struct_of(HEADER_FIELDS, "frame_len", "crc")
HASHED_HEADER = struct_of(HEADER_FIELDS, "version", "prev_hash")  # the header from version to prev_hash
HASHED_START = offset_of(HEADER_FIELDS, "version")  # 8: length and CRC frame the record; they are not the event
HASH_OFFSET = offset_of(HEADER_FIELDS, "event_hash")  # 144: bytes before it (from HASHED_START) are hashed
MIN_FRAME = HEADER_SIZE + 2  # entity and scope are at least one byte each
MAX_FRAME = 1 << 31  # a frame length beyond this is garbage, not a frame

# positions in a tuple unpacked with HEADER (what ``frame_header`` returns)
H_FRAME_LEN = position_of(HEADER_FIELDS, "frame_len")
H_CRC = position_of(HEADER_FIELDS, "crc")
H_VERSION = position_of(HEADER_FIELDS, "version")
H_FLAGS = position_of(HEADER_FIELDS, "flags")
H_KIND = position_of(HEADER_FIELDS, "kind")
H_ENTITY_LEN = position_of(HEADER_FIELDS, "entity_len")
H_SCOPE_LEN = position_of(HEADER_FIELDS, "scope_len")
H_PAYLOAD_VERSION = position_of(HEADER_FIELDS, "payload_version")
H_PAYLOAD_LEN = position_of(HEADER_FIELDS, "payload_len")
H_GLOBAL_SEQUENCE = position_of(HEADER_FIELDS, "global_sequence")
H_ENTITY_CLOCK = position_of(HEADER_FIELDS, "entity_clock")
H_WALL_MS = position_of(HEADER_FIELDS, "wall_ms")
H_EVENT_ID = position_of(HEADER_FIELDS, "event_id")
H_CAUSATION_ID = position_of(HEADER_FIELDS, "causation_id")
H_CORRELATION_ID = position_of(HEADER_FIELDS, "correlation_id")
H_IDEM_HASH = position_of(HEADER_FIELDS, "idem_hash")
H_PREV_HASH = position_of(HEADER_FIELDS, "prev_hash")
H_EVENT_HASH = position_of(HEADER_FIELDS, "event_hash")

FLAG_COMMIT_END = 0x1  # last frame of one request: recovery cuts after the last of these
FLAG_HAS_CAUSATION = 0x2  # causation_id is set
FLAG_HAS_CORRELATION = 0x4  # correlation_id is set
FLAG_FENCED = 0x8  # written inside a visibility fence: hidden until a FENCE_COMMIT event reveals it
FLAG_REDACTED = 0x10  # a stub (version 2 only): the payload was removed, its digest stands in its place
FLAG_NAMES: dict[int, str] = {  # every flag bit a frame may carry, by the name FORMAT.md §3.3 gives it
    FLAG_COMMIT_END: "COMMIT_END",
    FLAG_HAS_CAUSATION: "HAS_CAUSATION",
    FLAG_HAS_CORRELATION: "HAS_CORRELATION",
    FLAG_FENCED: "FENCED",
    FLAG_REDACTED: "REDACTED",
}
KNOWN_FLAGS: int = reduce(or_, FLAG_NAMES)  # any other bit makes a frame bad

ZERO_HASH = bytes(32)
ZERO_ID = bytes(16)

# Scan results (see ``scan_frame``)
OK = 0
EMPTY = 1  # a zero length word: the end of written data
NEED_MORE = 2  # the frame runs past the bytes available
BAD = 3  # checksum, length or structure is wrong

END = 0  # ``frame_header``'s answer for the end marker (a zero length word)
NAMES_NOT_UTF8 = "entity or scope is not UTF-8"
CHECKSUM_MISMATCH = "checksum mismatch"
_CRC_COPY_MAX = 1 << 12  # frames up to this size are checksummed from a copy (cheaper than a memoryview)
COORD_CACHE_MAX = 10_000  # decoded (entity, scope) pairs a reader keeps before starting over
RawHeader: TypeAlias = "tuple[Any, ...]"  # a header unpacked with HEADER, indexed with H_*


class Frame(NamedTuple):
    """A decoded frame: every header field plus the variable parts as bytes."""

    frame_len: int
    flags: int
    kind: int
    payload_version: int
    global_sequence: int
    entity_clock: int
    wall_ms: int
    event_id: bytes
    causation_id: bytes
    correlation_id: bytes
    idem_hash: bytes
    prev_hash: bytes
    event_hash: bytes
    entity: bytes
    scope: bytes
    payload: bytes


def flag_names(flags: int) -> list[str]:
    """The names of the bits set in ``flags``; a bit no frame may carry is ``unknown:0x..``."""
    names = [name for bit, name in FLAG_NAMES.items() if flags & bit]
    if flags & ~KNOWN_FLAGS:
        names.append(f"unknown:{flags & ~KNOWN_FLAGS:#x}")
    return names


def chain_hash(hashed_header: bytes | memoryview, body: bytes | memoryview) -> bytes:
    """The event hash of a version-1 frame: blake2b-256 over the header (from version
    through prev_hash) and the entity, scope and payload bytes. prev_hash inside the
    header makes it cumulative."""
    h = hashlib.blake2b(hashed_header, digest_size=32)
    h.update(body)
    return h.digest()


def payload_digest(payload: bytes | memoryview) -> bytes:
    """blake2b-256 of a payload: what a version-2 event hash covers in its place, and
    what a stub keeps of it."""
    return hashlib.blake2b(payload, digest_size=PAYLOAD_DIGEST_SIZE).digest()


def chain_hash_v2(hashed_header: bytes | memoryview, names: bytes | memoryview, digest: bytes | memoryview) -> bytes:
    """The event hash of a version-2 frame: blake2b-256 over the header (from version
    through prev_hash, the ``REDACTED`` bit of ``flags`` cleared: a stub hashes as the
    frame it replaced), the entity and scope bytes and the payload's digest."""
    hdr = bytearray(hashed_header)
    hdr[2] &= ~FLAG_REDACTED & 0xFF  # flags is the u16 at hashed offset 2 (frame offset 10)
    h = hashlib.blake2b(hdr, digest_size=32)
    h.update(names)
    h.update(digest)
    return h.digest()


_pack_hashed = HASHED_HEADER.pack
_pack_len_crc = LEN_CRC.pack
_blake2b = hashlib.blake2b
_crc32 = zlib.crc32


def encode_parts(
    flags: int, kind: int, payload_version: int, global_sequence: int, entity_clock: int, wall_ms: int,
    event_id: bytes, causation_id: bytes, correlation_id: bytes, idem_hash: bytes, prev_hash: bytes,
    entity: bytes, scope: bytes, payload: bytes,
) -> tuple[tuple[bytes, bytes, bytes, bytes], bytes, int]:
    """Encode one frame as its four pieces (length+CRC, hashed header, event hash, body),
    to be joined by the caller (the engine joins a whole commit group at once), at
    ``FRAME_VERSION`` (``flags`` never carries ``REDACTED``: stubs are made by
    ``encode_stub``). Returns (pieces, event_hash, frame_len). The one encoder: ``encode_frame`` and the
    engine's commit path both use it."""
    hashed = _pack_hashed(FRAME_VERSION, flags, kind, len(entity), len(scope), payload_version, len(payload),
                          global_sequence, entity_clock, wall_ms, event_id, causation_id, correlation_id,
                          idem_hash, prev_hash)
    body = entity + scope + payload
    if flags & FLAG_REDACTED:  # not a frame the writer makes; hashed as frame_hash would (the payload is the digest)
        event_hash = chain_hash_v2(hashed, entity + scope, payload)
    else:
        h = _blake2b(hashed, digest_size=32)
        h.update(entity)
        h.update(scope)
        h.update(_blake2b(payload, digest_size=PAYLOAD_DIGEST_SIZE).digest())
        event_hash = h.digest()
    frame_len = HEADER_SIZE + len(body)
    crc = _crc32(body, _crc32(event_hash, _crc32(hashed)))
    return (_pack_len_crc(frame_len, crc), hashed, event_hash, body), event_hash, frame_len


def encode_frame(
    *,
    flags: int,
    kind: int,
    payload_version: int,
    global_sequence: int,
    entity_clock: int,
    wall_ms: int,
    event_id: bytes,
    causation_id: bytes,
    correlation_id: bytes,
    idem_hash: bytes,
    prev_hash: bytes,
    entity: bytes,
    scope: bytes,
    payload: bytes,
) -> tuple[bytes, bytes]:
    """Encode one frame; return (frame bytes, event_hash)."""
    pieces, event_hash, _ = encode_parts(flags, kind, payload_version, global_sequence, entity_clock, wall_ms,
                                         event_id, causation_id, correlation_id, idem_hash, prev_hash,
                                         entity, scope, payload)
    return b"".join(pieces), event_hash


def frame_header(buf: Buffer, off: int, limit: int, *, final: bool = False) -> RawHeader | int | str:
    """The frame validity rule, the one place it is written down. Looks at the frame
    starting at ``off`` using bytes up to ``limit`` (``0 <= off``, ``limit <= len(buf)``;
    ``scan_frame`` checks that for any caller) and returns:

    - the header (a tuple unpacked with ``HEADER``, indexed with ``H_*``) of a whole frame
      that is valid: length in range, CRC, a version from ``FRAME_VERSION_MIN`` to
      ``FRAME_VERSION``, lengths that add up to the frame's (a stub, flagged
      ``REDACTED``, holds the payload's 32-byte digest instead of its ``payload_len``
      bytes), non-empty entity and scope, no unknown flag bit (``REDACTED`` is unknown
      to version 1);
    - an int: ``END`` (0) for the end marker, a zero length word; else the number of bytes
      the frame needs (it runs past ``limit``). ``final``: ``limit`` is the end of the
      region (a segment's frame area), so fewer than 8 bytes there that are all zero are
      the end too, not a cut length word;
    - a str: why these bytes are not a frame (a newer version starts "future frame version").

    Entity and scope must also be UTF-8 (``frame_names``); that is checked where the names
    are decoded, which readers do once per distinct name."""
    n = limit - off
    if n >= HEADER_SIZE:
        h = _unpack_header(buf, off)
        frame_len: int = h[0]
        if MIN_FRAME <= frame_len <= n:  # a whole frame's bytes are there: check them
            if _crc32(buf[off + 8:off + frame_len] if frame_len <= _CRC_COPY_MAX
                      else memoryview(buf)[off + 8:off + frame_len]) != h[1]:
                return CHECKSUM_MISMATCH
            version: int = h[2]
            if not FRAME_VERSION_MIN <= version <= FRAME_VERSION:
                return f"future frame version {version}" if version > FRAME_VERSION else f"unknown frame version {version}"
            flags: int = h[3]
            if HEADER_SIZE + h[5] + h[6] + (PAYLOAD_DIGEST_SIZE if flags & FLAG_REDACTED else h[8]) != frame_len:
                return "field lengths do not add up to the frame length"
            if not h[5] or not h[6]:
                return "empty entity or scope"
            if flags & ~KNOWN_FLAGS or (version == 1 and flags & FLAG_REDACTED):
                return f"unknown flags {flags:#x}"
            return h
    elif n >= 8:
        frame_len = _unpack_len_crc(buf, off)[0]
    else:
        end_marker = (n >= 4 and not any(buf[off:off + 4])) or (final and not any(buf[off:limit]))
        return END if end_marker else 8
    # the length word alone decides: the end marker, garbage, or a frame past ``limit``
    if frame_len == 0:
        return END
    if frame_len < MIN_FRAME or frame_len > MAX_FRAME:
        return f"frame length {frame_len} out of range"
    return frame_len


# frame_header indexes the header with literal positions (constants, not global lookups:
# it runs for every event every reader returns). They must be the declaration's:
if (H_FRAME_LEN, H_CRC, H_VERSION, H_FLAGS, H_ENTITY_LEN, H_SCOPE_LEN, H_PAYLOAD_LEN, HASHED_START) != (
        0, 1, 2, 3, 5, 6, 8, 8):
    raise ImportError("frame_header's literal header positions no longer match Header")

_unpack_header = HEADER.unpack_from
_unpack_len_crc = LEN_CRC.unpack_from


def frame_names(buf: Buffer, off: int, h: RawHeader) -> tuple[bytes, bytes] | None:
    """(entity, scope) bytes of the valid frame at ``off`` whose header is ``h``; None
    when either is not UTF-8 (then the frame is bad: ``NAMES_NOT_UTF8``)."""
    e0 = off + HEADER_SIZE
    e1 = e0 + h[H_ENTITY_LEN]
    entity = bytes(buf[e0:e1])
    scope = bytes(buf[e1:e1 + h[H_SCOPE_LEN]])
    try:
        entity.decode("utf-8")
        scope.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return entity, scope


def frame_from_header(buf: Buffer, off: int, h: RawHeader) -> Frame | None:
    """The ``Frame`` of a valid frame whose header ``frame_header`` returned; None when
    its names are not UTF-8."""
    names = frame_names(buf, off, h)
    if names is None:
        return None
    return Frame(
        h[H_FRAME_LEN], h[H_FLAGS], h[H_KIND], h[H_PAYLOAD_VERSION], h[H_GLOBAL_SEQUENCE], h[H_ENTITY_CLOCK],
        h[H_WALL_MS], h[H_EVENT_ID], h[H_CAUSATION_ID], h[H_CORRELATION_ID], h[H_IDEM_HASH], h[H_PREV_HASH],
        h[H_EVENT_HASH], names[0], names[1],
        bytes(buf[off + HEADER_SIZE + h[H_ENTITY_LEN] + h[H_SCOPE_LEN]:off + h[H_FRAME_LEN]]),
    )


_KINDS: dict[int, Kind] = {}  # packed kind -> Kind (at most 65,536 of them), filled as kinds are met


def event_from_header(buf: bytes | mmap.mmap, off: int, h: RawHeader,
                      coords: dict[bytes, tuple[int, Coordinate]]) -> Event | None:
    """The ``Event`` of a valid frame whose header ``frame_header`` returned, built
    straight from the buffer (the readers' hot path: ``get``, ``history``, ``query_after``,
    ``scan``). ``coords`` caches decoded names across calls (entity and scope bytes ->
    (entity length, Coordinate)); ``buf`` is bytes or an mmap, whose slices are bytes.
    None when the names are not UTF-8."""
    # unpacked in HEADER order (tests check this against the names of ``Header``)
    (frame_len, _, _, flags, kind, elen, slen, pv, _, seq, clock, wall, event_id, causation, correlation,
     _, prev, ehash) = h
    e0 = off + HEADER_SIZE
    p0 = e0 + elen + slen
    names = buf[e0:p0]
    hit = coords.get(names)
    if hit is None or hit[0] != elen:  # ("ab", "c") and ("a", "bc") share their bytes
        try:
            coord = Coordinate._trusted(names[:elen], names[elen:])
        except UnicodeDecodeError:
            return None
        if len(coords) >= COORD_CACHE_MAX:
            coords.clear()
        coords[names] = (elen, coord)
    else:
        coord = hit[1]
    k = _KINDS.get(kind)
    if k is None:
        k = _KINDS[kind] = Kind.unpack(kind)
    if flags & FLAG_REDACTED:
        return Event(event_id, seq, coord, k, clock, wall, b"", pv, ehash, prev,
                     causation if flags & FLAG_HAS_CAUSATION else None,
                     correlation if flags & FLAG_HAS_CORRELATION else None, True)
    return Event(event_id, seq, coord, k, clock, wall, buf[p0:off + frame_len], pv, ehash, prev,
                 causation if flags & FLAG_HAS_CAUSATION else None,
                 correlation if flags & FLAG_HAS_CORRELATION else None)


def frame_to_event(f: Frame) -> Event:
    """The ``Event`` of a decoded ``Frame`` (whose names were checked by its decoder)."""
    redacted = bool(f.flags & FLAG_REDACTED)
    return Event(
        f.event_id, f.global_sequence, Coordinate._trusted(f.entity, f.scope),
        Kind.unpack(f.kind), f.entity_clock, f.wall_ms, b"" if redacted else f.payload, f.payload_version,
        f.event_hash, f.prev_hash,
        f.causation_id if f.flags & FLAG_HAS_CAUSATION else None,
        f.correlation_id if f.flags & FLAG_HAS_CORRELATION else None,
        redacted,
    )


def header_fields(buf: Buffer, off: int, limit: int) -> dict[str, Any] | None:
    """Every header field of the bytes at ``off`` by name, valid or not (for showing a
    damaged frame); None when fewer than ``HEADER_SIZE`` bytes are there."""
    if off < 0 or min(limit, len(buf)) - off < HEADER_SIZE:
        return None
    return Header._make(_unpack_header(buf, off))._asdict()


def scan_frame(buf: Buffer, off: int, limit: int, *, final: bool = False) -> tuple[int, Frame | int | str | None]:
    """Look at the frame starting at ``off``, using bytes up to ``limit``.

    Returns (OK, Frame), (EMPTY, None), (NEED_MORE, needed_len) or (BAD, reason).
    Never raises for any input (a newer frame version is reported as BAD with a reason
    starting "future"). ``final``: see ``frame_header``, whose rule this applies."""
    if off < 0 or limit > len(buf) or off > limit:
        return BAD, f"offset {off} outside buffer of {len(buf)} bytes (limit {limit})"
    h = frame_header(buf, off, limit, final=final)
    if isinstance(h, tuple):
        frame = frame_from_header(buf, off, h)
        return (OK, frame) if frame is not None else (BAD, NAMES_NOT_UTF8)
    if isinstance(h, str):
        return BAD, h
    return (EMPTY, None) if h == END else (NEED_MORE, h)


def frame_hash(buf: Buffer, off: int, frame_len: int) -> bytes:
    """The event hash the bytes of the frame at ``off`` give (to compare with the one it
    stores), by the frame's version: version 1 hashes the entity, scope and payload
    bytes (``chain_hash``); version 2 the names and the payload's digest, which a stub
    stores in place of the payload (``chain_hash_v2``). Any other version, or bytes too
    short to hold the names a version-2 header states, hash as version 1 (no frame
    that passes ``frame_header`` is one of those)."""
    mv = memoryview(buf)[off:off + frame_len]
    n = len(mv)
    if n >= HEADER_SIZE and mv[8] == 2 and mv[9] == 0:
        names_end = HEADER_SIZE + (mv[14] | mv[15] << 8) + (mv[16] | mv[17] << 8)
        if names_end <= n:
            payload = mv[names_end:]
            digest = payload if mv[10] & FLAG_REDACTED else payload_digest(payload)
            return chain_hash_v2(mv[HASHED_START:HASH_OFFSET], mv[HEADER_SIZE:names_end], digest)
    return chain_hash(mv[HASHED_START:HASH_OFFSET], mv[HEADER_SIZE:])


def encode_stub(buf: Buffer, off: int, h: RawHeader) -> bytes:
    """The stub of the valid version-2 frame at ``off`` (header ``h`` from
    ``frame_header``): the same header with ``REDACTED`` set, the same entity and scope,
    and the payload's digest in place of the payload (its ``payload_len`` is kept); the
    event hash is the frame's own, which the stub still verifies against. A frame that is
    a stub already is returned as it is."""
    frame_len = h[H_FRAME_LEN]
    frame = bytes(buf[off:off + frame_len])
    if h[H_FLAGS] & FLAG_REDACTED:
        return frame
    if h[H_VERSION] != FRAME_VERSION:
        raise ValueError(f"a version-{h[H_VERSION]} frame cannot be a stub (its hash covers its payload bytes)")
    names_end = HEADER_SIZE + h[H_ENTITY_LEN] + h[H_SCOPE_LEN]
    body = bytearray(frame[:names_end])
    body[10:12] = (h[H_FLAGS] | FLAG_REDACTED).to_bytes(2, "little")
    body += payload_digest(memoryview(frame)[names_end:])
    stub_len = len(body)
    body[0:4] = stub_len.to_bytes(4, "little")
    body[4:8] = _crc32(memoryview(body)[HASHED_START:]).to_bytes(4, "little")
    return bytes(body)


def hash_matches(buf: Buffer, off: int, frame: Frame) -> bool:
    """Recompute a decoded frame's event hash from its bytes and compare."""
    return frame_hash(buf, off, frame.frame_len) == frame.event_hash


class NeedMore(NamedTuple):
    """``decode_frame`` needs at least ``needed`` bytes to decide."""

    needed: int


def decode_frame(data: bytes, *, segment: str = "<bytes>", offset: int = 0) -> Frame | NeedMore | None:
    """Decode the frame at the start of ``data``: a ``Frame``, ``NeedMore``, ``None``
    for the end marker (zero length), or ``CorruptSegment``/``FutureFormat``."""
    status, value = scan_frame(data, 0, len(data))
    if status == OK:
        assert isinstance(value, Frame)
        if not hash_matches(data, 0, value):
            raise CorruptSegment(segment, offset, "event hash does not match the frame")
        return value
    if status == EMPTY:
        return None
    if status == NEED_MORE:
        assert isinstance(value, int)
        return NeedMore(value)
    reason = str(value)
    raise future_or_corrupt(segment, offset, reason)


def future_or_corrupt(where: str, offset: int, reason: str) -> CorruptSegment | FutureFormat:
    """The typed error for a ``frame_header`` reason: ``FutureFormat`` for a frame of a
    newer version (never cut, never called damage), else ``CorruptSegment``."""
    if reason.startswith("future frame version"):
        return FutureFormat(where, int(reason.rsplit(" ", 1)[1]), FRAME_VERSION)
    return CorruptSegment(where, offset, reason)
