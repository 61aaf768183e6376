"""The frame codec: one event <-> bytes. Pure: bytes in, values out; no I/O, no clock.

Owns: the byte layout of a frame (docs/FORMAT.md §Frames), the cumulative per-entity
hash chain (``event_hash`` covers the predecessor's hash, every header field and the
entity, scope and payload bytes), the CRC, and a total decoder: any byte string gives a
frame, ``NEED_MORE``, ``EMPTY`` or one typed error, never ``IndexError``/``struct.error``.
Must not import os, mmap, posix_ipc or anything with a clock.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

from .._errors import CorruptSegment, FutureFormat

if TYPE_CHECKING:
    import mmap

Buffer: TypeAlias = "bytes | bytearray | memoryview | mmap.mmap"

FRAME_VERSION = 1

# <frame_len u32><crc32 u32> then the hashed header:
# version u16, flags u16, kind u16, entity_len u16, scope_len u16, payload_version u16,
# payload_len u32, global_sequence u64, entity_clock u64, wall_ms u64,
# event_id 16s, causation_id 16s, correlation_id 16s, idem_hash 16s, prev_hash 32s,
# then event_hash 32s (not hashed: it *is* the hash), then entity, scope, payload bytes.
HEADER = struct.Struct("<IIHHHHHHIQQQ16s16s16s16s32s32s")
HEADER_SIZE = HEADER.size  # 176 bytes
HASHED_START = 8  # the length and CRC frame the record; they are not part of the event
HASH_OFFSET = HEADER_SIZE - 32  # where event_hash sits; bytes before it are hashed
MIN_FRAME = HEADER_SIZE + 2  # entity and scope are at least one byte each
MAX_FRAME = 1 << 31  # a frame length beyond this is garbage, not a frame

FLAG_COMMIT_END = 0x1  # last frame of one request: recovery cuts after the last of these
FLAG_HAS_CAUSATION = 0x2
FLAG_HAS_CORRELATION = 0x4
FLAG_FENCED = 0x8  # written inside a visibility fence: hidden until a FENCE_COMMIT event reveals it
KNOWN_FLAGS = FLAG_COMMIT_END | FLAG_HAS_CAUSATION | FLAG_HAS_CORRELATION | FLAG_FENCED

ZERO_HASH = bytes(32)
ZERO_ID = bytes(16)

# Scan results (see ``scan_frame``)
OK = 0
EMPTY = 1  # a zero length word: the end of written data
NEED_MORE = 2  # the frame runs past the bytes available
BAD = 3  # checksum, length or structure is wrong


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


def chain_hash(hashed_header: bytes | memoryview, body: bytes | memoryview) -> bytes:
    """The event hash: blake2b-256 over the header (from version through prev_hash) and
    the entity, scope and payload bytes. prev_hash inside the header makes it cumulative."""
    h = hashlib.blake2b(hashed_header, digest_size=32)
    h.update(body)
    return h.digest()


HASHED_HEADER = struct.Struct("<HHHHHHIQQQ16s16s16s16s32s")  # the header from version to prev_hash
LEN_CRC = struct.Struct("<II")
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
    to be joined by the caller (the engine joins a whole commit group at once).
    Returns (pieces, event_hash, frame_len). The one encoder: ``encode_frame`` and the
    engine's commit path both use it."""
    hashed = _pack_hashed(FRAME_VERSION, flags, kind, len(entity), len(scope), payload_version, len(payload),
                          global_sequence, entity_clock, wall_ms, event_id, causation_id, correlation_id,
                          idem_hash, prev_hash)
    body = entity + scope + payload
    h = _blake2b(hashed, digest_size=32)
    h.update(body)
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


def scan_frame(buf: Buffer, off: int, limit: int) -> tuple[int, Frame | int | str | None]:
    """Look at the frame starting at ``off``, using bytes up to ``limit``.

    Returns (OK, Frame), (EMPTY, None), (NEED_MORE, needed_len) or (BAD, reason).
    Never raises for any input (a newer frame version is reported as BAD with a reason
    starting "future"). This is the one decoder: recovery, readers and verify use it."""
    if off < 0 or limit > len(buf) or off > limit:
        return BAD, f"offset {off} outside buffer of {len(buf)} bytes (limit {limit})"
    if limit - off < 8:
        if limit - off >= 4 and buf[off:off + 4] == b"\0\0\0\0":
            return EMPTY, None
        if not any(buf[off:limit]):
            return (EMPTY, None) if limit - off >= 4 else (NEED_MORE, 8)
        return NEED_MORE, 8
    frame_len, crc = struct.unpack_from("<II", buf, off)
    if frame_len == 0:
        return EMPTY, None
    if frame_len < MIN_FRAME or frame_len > MAX_FRAME:
        return BAD, f"frame length {frame_len} out of range"
    if limit - off < frame_len:
        return NEED_MORE, frame_len
    mv = memoryview(buf)[off:off + frame_len]
    if zlib.crc32(mv[HASHED_START:]) != crc:
        return BAD, "checksum mismatch"
    (_, _, version, flags, kind, entity_len, scope_len, payload_version, payload_len,
     seq, clock, wall_ms, event_id, causation, correlation, idem_hash, prev_hash,
     event_hash) = HEADER.unpack_from(mv, 0)
    if version != FRAME_VERSION:
        if version > FRAME_VERSION:
            return BAD, f"future frame version {version}"
        return BAD, f"unknown frame version {version}"
    if HEADER_SIZE + entity_len + scope_len + payload_len != frame_len:
        return BAD, "field lengths do not add up to the frame length"
    if entity_len == 0 or scope_len == 0:
        return BAD, "empty entity or scope"
    if flags & ~KNOWN_FLAGS:
        return BAD, f"unknown flags {flags:#x}"
    e_end = HEADER_SIZE + entity_len
    s_end = e_end + scope_len
    return OK, Frame(
        frame_len, flags, kind, payload_version, seq, clock, wall_ms, bytes(event_id),
        bytes(causation), bytes(correlation), bytes(idem_hash), bytes(prev_hash),
        bytes(event_hash), bytes(mv[HEADER_SIZE:e_end]), bytes(mv[e_end:s_end]),
        bytes(mv[s_end:frame_len]),
    )


def hash_matches(buf: Buffer, off: int, frame: Frame) -> bool:
    """Recompute a decoded frame's event hash from its bytes and compare."""
    mv = memoryview(buf)[off:off + frame.frame_len]
    return chain_hash(mv[HASHED_START:HASH_OFFSET], mv[HEADER_SIZE:]) == frame.event_hash


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
    if reason.startswith("future frame version"):
        raise FutureFormat(segment, int(reason.rsplit(" ", 1)[1]), FRAME_VERSION)
    raise CorruptSegment(segment, offset, reason)
