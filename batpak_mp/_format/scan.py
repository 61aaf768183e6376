"""The recovery scan: where does the committed log end in a segment's bytes? Pure.

Owns: walking frames from a start offset with the frame validity rule of ``frame.py``
(``frame_header``: this module knows no byte of the frame layout), checking sequence
continuity, finding the last whole commit (the last frame flagged COMMIT_END), and
deciding whether what follows is a torn tail (cut it) or damage below the durable floor
(fail closed): ``scan_segment`` finds, ``committed_through`` decides. Input is a buffer
and numbers; output is a plain result or a typed error. No os, mmap or clock here: the
engine and the offline reader do the I/O and tests feed bytes. Must not import os, mmap,
posix_ipc or anything with a clock.
"""

from __future__ import annotations

from typing import NamedTuple

from .._errors import CorruptSegment
from .frame import (
    BAD,
    EMPTY,
    END,
    FLAG_COMMIT_END,
    H_ENTITY_CLOCK,
    H_EVENT_HASH,
    H_FLAGS,
    H_FRAME_LEN,
    H_GLOBAL_SEQUENCE,
    H_IDEM_HASH,
    H_KIND,
    H_PREV_HASH,
    LEN_CRC,
    MAX_FRAME,
    MIN_FRAME,
    NAMES_NOT_UTF8,
    NEED_MORE,
    OK,
    Buffer,
    frame_hash,
    frame_header,
    frame_names,
    future_or_corrupt,
    scan_frame,
)


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
    """Scan frames in ``buf[start:limit]``, expecting the first to carry ``expect_seq``.
    ``limit`` is the end of the frame area (``frame_header``'s ``final``)."""
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
    status, reason = EMPTY, "end of data"
    while True:
        h = frame_header(buf, off, limit, final=True)
        if type(h) is not tuple:
            if isinstance(h, str):
                status, reason = BAD, h
            elif h == END:
                status, reason = EMPTY, "end of data" if limit - off >= 8 else "end of segment"
            else:
                status, reason = NEED_MORE, (f"frame of {h} bytes runs past the end" if limit - off >= 8
                                             else "truncated length word")
            break
        names = frame_names(buf, off, h)
        if names is None:
            status, reason = BAD, NAMES_NOT_UTF8
            break
        seq = h[H_GLOBAL_SEQUENCE]
        if seq != seq_next:
            status, reason = OK, f"sequence {seq} where {seq_next} was expected"
            break
        frame_len = h[H_FRAME_LEN]
        if check_hash and frame_hash(buf, off, frame_len) != h[H_EVENT_HASH]:
            hash_errors.append((off, f"event hash mismatch at sequence {seq}"))
        flags = h[H_FLAGS]
        frames.append(ScannedFrame(off, frame_len, flags, h[H_KIND], seq, h[H_ENTITY_CLOCK], names[0], names[1],
                                   h[H_IDEM_HASH], h[H_PREV_HASH], h[H_EVENT_HASH]))
        seq_next += 1
        off += frame_len
        if flags & FLAG_COMMIT_END:
            committed = len(frames)
            commit_end = off
    damage_mid_log = False
    if status == BAD:
        # A damaged frame whose stated length leads to a frame that continues the log is
        # damage in the middle, not a torn tail.
        frame_len = LEN_CRC.unpack_from(buf, off)[0] if limit - off >= 8 else 0
        nxt = off + frame_len
        if MIN_FRAME <= frame_len <= MAX_FRAME and nxt < limit:
            st, val = scan_frame(buf, nxt, limit, final=True)
            damage_mid_log = st == OK and getattr(val, "global_sequence", -1) == seq_next + 1
    return SegmentScan(frames, committed, commit_end, off, status, reason, damage_mid_log, hash_errors)


def committed_through(where: str, scan: SegmentScan, first_seq: int, floor: int) -> int:
    """Recovery's decision over one scan of an unsealed segment whose first frame is
    ``first_seq``: the last sequence to keep (``first_seq - 1`` when none), or a typed
    error, raised before anything is cut so the evidence stays:

    - ``FutureFormat``: the scan stopped at a whole frame of a newer version (never cut
      what this code cannot read);
    - ``CorruptSegment``: damage in the middle of the log, or the log would end below
      ``floor`` (the durable sequence), at a bad frame or at its end.

    Anything after the kept frames is a torn tail (or never written)."""
    last_kept = first_seq + scan.committed - 1
    if scan.stop_status == BAD and scan.stop_reason.startswith("future frame version"):
        raise future_or_corrupt(where, scan.stop_offset, scan.stop_reason)
    if scan.damage_mid_log or (scan.stop_status in (BAD, NEED_MORE) and last_kept < floor):
        raise CorruptSegment(where, scan.stop_offset, scan.stop_reason)
    if last_kept < floor:
        raise CorruptSegment(where, scan.commit_end, f"log ends at sequence {last_kept}, but sequence {floor} was durable")
    return last_kept
