"""The recovery scan: where does the committed log end in a segment's bytes? Pure.

Owns: walking frames from a start offset, checking checksum and sequence continuity,
finding the last whole commit (the last frame flagged COMMIT_END), and deciding whether
what follows is a torn tail (cut it) or damage below the durable floor (fail closed).
Input is a buffer and numbers; output is a plain result. No os, mmap or clock here:
the engine does the I/O and tests feed bytes.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

from .frame import (
    BAD,
    EMPTY,
    FLAG_COMMIT_END,
    FRAME_VERSION,
    HASH_OFFSET,
    HASHED_START,
    HEADER,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_FRAME,
    MIN_FRAME,
    NEED_MORE,
    OK,
    Buffer,
    chain_hash,
    scan_frame,
)

_head = struct.Struct("<II").unpack_from


class ScannedFrame(NamedTuple):
    """What recovery keeps of a frame: enough to rebuild every index entry."""

    offset: int
    frame_len: int
    flags: int
    kind: int
    seq: int
    clock: int
    entity: bytes
    scope: bytes
    idem_hash: bytes
    prev_hash: bytes
    event_hash: bytes


class SegmentScan(NamedTuple):
    frames: list[ScannedFrame]  # whole, continuous frames (committed ones first)
    committed: int  # how many of ``frames`` end at or before the last COMMIT_END
    commit_end: int  # offset just past the last committed frame
    stop_offset: int  # where the scan stopped
    stop_status: int  # EMPTY, NEED_MORE, BAD, or OK when a sequence jump stopped it
    stop_reason: str
    damage_mid_log: bool  # a bad frame is followed by a frame that continues the log
    hash_errors: list[tuple[int, str]]  # (offset, what) when check_hash is on


def scan_segment(
    buf: Buffer, start: int, limit: int, expect_seq: int,
    *, check_hash: bool = False,
) -> SegmentScan:
    """Scan frames in ``buf[start:limit]``, expecting the first to carry ``expect_seq``."""
    frames: list[ScannedFrame] = []
    committed = 0
    commit_end = start
    off = start
    seq_next = expect_seq
    hash_errors: list[tuple[int, str]] = []
    mv = memoryview(buf)
    if start < 0 or start > len(mv):
        return SegmentScan(frames, 0, start, start, BAD, f"start {start} outside buffer of {len(mv)} bytes",
                           False, hash_errors)
    limit = min(limit, len(mv))  # never read past the buffer, whatever the caller says
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    status, reason = EMPTY, "end of data"
    while True:
        if limit - off < 8:
            torn = limit - off >= 4 and any(mv[off:limit])
            status, reason = (NEED_MORE, "truncated length word") if torn else (EMPTY, "end of segment")
            break
        frame_len, crc = _head(mv, off)
        if frame_len == 0:
            status, reason = EMPTY, "end of data"
            break
        if frame_len < MIN_FRAME or frame_len > MAX_FRAME:
            status, reason = BAD, f"frame length {frame_len} out of range"
            break
        end = off + frame_len
        if end > limit:
            status, reason = NEED_MORE, f"frame of {frame_len} bytes runs past the end"
            break
        if crc32(mv[off + HASHED_START:end]) != crc:
            status, reason = BAD, "checksum mismatch"
            break
        (_, _, version, flags, kind, elen, slen, _pv, plen, seq, clock, _wall, _eid, _c, _r,
         idem, prev, ehash) = unpack(mv, off)
        if (version != FRAME_VERSION or HEADER_SIZE + elen + slen + plen != frame_len or not elen or not slen
                or flags & ~KNOWN_FLAGS):
            status, reason = BAD, (f"future frame version {version}" if version > FRAME_VERSION
                                   else f"bad frame structure (version {version})")
            break
        if seq != seq_next:
            status, reason = OK, f"sequence {seq} where {seq_next} was expected"
            break
        e_end = off + HEADER_SIZE + elen
        if check_hash and chain_hash(mv[off + HASHED_START:off + HASH_OFFSET], mv[off + HEADER_SIZE:end]) != ehash:
            hash_errors.append((off, f"event hash mismatch at sequence {seq}"))
        frames.append(ScannedFrame(off, frame_len, flags, kind, seq, clock, bytes(mv[off + HEADER_SIZE:e_end]),
                                   bytes(mv[e_end:e_end + slen]), idem, prev, ehash))
        seq_next += 1
        off = end
        if flags & FLAG_COMMIT_END:
            committed = len(frames)
            commit_end = off
    damage_mid_log = False
    if status == BAD:
        # A damaged frame whose stated length leads to a frame that continues the log is
        # damage in the middle, not a torn tail.
        frame_len = _head(mv, off)[0] if limit - off >= 8 else 0
        nxt = off + frame_len
        if MIN_FRAME <= frame_len <= MAX_FRAME and nxt < limit:
            st, val = scan_frame(mv, nxt, limit)
            damage_mid_log = st == OK and getattr(val, "global_sequence", -1) == seq_next + 1
    return SegmentScan(frames, committed, commit_end, off, status, reason, damage_mid_log, hash_errors)
