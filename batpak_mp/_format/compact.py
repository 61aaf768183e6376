"""The compacted copy of a sealed segment (docs/FORMAT.md §3.9): the same segment with
stubs (§3.8) in place of the frames whose payloads must go. Pure: bytes in, bytes out.

Owns: ``rewrite_sealed``, which reads a sealed segment's bytes (checked whole by the
caller: ``sealed_verdict``), walks its frames through the frame validity rule
(``frame_header``) in the order its seal footer lists them, replaces the frames of the
sequences asked for by ``frame.encode_stub`` and lays the result out as a sealed segment
of its own: header (the same segment id, store id and first sequence, the new size),
frames, a footer with the records re-pointed (offset, length, flags), and a trailer
whose checksum covers it all. Invariants: every other byte of every frame is copied as
it was, so every event hash, and with them the chains, are unchanged; a stub stays a
stub; a version-1 frame is never stubbed (its hash covers its payload bytes); the
result is smaller than the input or None (nothing to do). Must not import os, mmap,
posix_ipc or anything with a clock.
"""

from __future__ import annotations

import zlib
from collections.abc import Container
from typing import NamedTuple

from .._errors import CorruptSegment
from .._values import CATEGORY_SYSTEM
from .frame import (
    FLAG_REDACTED,
    FRAME_VERSION,
    H_FLAGS,
    H_FRAME_LEN,
    H_GLOBAL_SEQUENCE,
    H_KIND,
    H_VERSION,
    Buffer,
    RawHeader,
    encode_stub,
    frame_header,
)
from .record import R_FLAGS, R_FRAME_LEN, R_OFFSET, RECORD, RECORD_SIZE
from .segment import (
    SEG_HEADER_SIZE,
    SEG_TRAILER_SIZE,
    decode_footer,
    decode_segment_header,
    encode_footer,
    encode_segment_header,
    encode_trailer,
)
from .segment import Trailer as Trailer


class Rewritten(NamedTuple):
    """A compacted segment: its bytes (a whole file), its footer's records, and what changed."""

    data: bytes
    records: bytes
    stubbed: tuple[int, ...]  # sequences whose payload was removed now
    bytes_removed: int  # the old file's size minus the new one's


def strippable(version: int, flags: int, kind: int) -> bool:
    """Whether a frame can become a stub now: version 2 (a version-1 hash covers the
    payload bytes), not one already, and not a system event (the store's own record)."""
    return version == FRAME_VERSION and not flags & FLAG_REDACTED and kind >> 12 != CATEGORY_SYSTEM


def rewrite_sealed(name: str, old: Buffer, trailer: Trailer, strip: Container[int]) -> Rewritten | None:
    """The compacted copy of the sealed segment ``old`` (its whole file, checksum and
    footer already checked, ``trailer`` its trailer) with every frame whose sequence is
    in ``strip`` made a stub; None when none of them is a frame that can be one.
    ``CorruptSegment`` when a frame does not match the footer's record of it."""
    header = decode_segment_header(bytes(old[:SEG_HEADER_SIZE]), name)
    foot_start = trailer.footer_offset
    first_seq, records = decode_footer(bytes(old[foot_start:foot_start + trailer.footer_len]), name, foot_start)
    count = len(records) // RECORD_SIZE
    plan: list[tuple[int, int, int, RawHeader | None]] = []  # (seq, offset, length, header to stub)
    for i in range(count):
        old_rec = RECORD.unpack_from(records, i * RECORD_SIZE)
        seq, off, length = first_seq + i, old_rec[R_OFFSET], old_rec[R_FRAME_LEN]
        h = frame_header(old, off, min(off + length, foot_start))
        if type(h) is not tuple or h[H_FRAME_LEN] != length or h[H_GLOBAL_SEQUENCE] != seq:
            raise CorruptSegment(name, off, f"the seal footer's record of sequence {seq} does not name its frame")
        stub = seq in strip and strippable(h[H_VERSION], h[H_FLAGS], h[H_KIND])
        plan.append((seq, off, length, tuple(h) if stub else None))
    if not any(stub_of is not None for _, _, _, stub_of in plan):
        return None
    body = bytearray()
    new_records = bytearray()
    stubbed: list[int] = []
    pos = SEG_HEADER_SIZE
    for i, (seq, off, length, stub_of) in enumerate(plan):
        frame = encode_stub(old, off, stub_of) if stub_of is not None else bytes(old[off:off + length])
        if stub_of is not None:
            stubbed.append(seq)
        rec: list[object] = list(RECORD.unpack_from(records, i * RECORD_SIZE))
        rec[R_OFFSET], rec[R_FRAME_LEN] = pos, len(frame)
        rec[R_FLAGS] = int.from_bytes(frame[10:12], "little")
        new_records += RECORD.pack(*rec)
        body += frame
        pos += len(frame)
    footer = encode_footer(first_seq, bytes(new_records))
    size = SEG_HEADER_SIZE + len(body) + len(footer) + SEG_TRAILER_SIZE
    head = encode_segment_header(header.segment_id, header.store_id, header.first_seq, size)
    data = head + bytes(body) + footer
    data += encode_trailer(SEG_HEADER_SIZE + len(body), len(footer), zlib.crc32(data))
    return Rewritten(data, bytes(new_records), tuple(stubbed), len(old) - len(data))
