"""Segment files (docs/FORMAT.md §3.1 and §3.6): the 64-byte header at offset 0, the
seal footer (the segment's index records) and the 32-byte trailer at the end.

Owns: those three layouts, their encoders and total decoders, and the one answer to "is
this segment acceptable here" (``segment_verdict``: the header belongs to this store and
continues the log, the seal state is allowed; ``sealed_verdict``: the whole-file checksum
and the footer of a sealed one). Recovery, verify, inspect and the offline reader ask it;
each decides what to do with a problem (refuse to open, report it, show it). Frames, which
fill the space between header and footer, are ``frame.py``'s. Pure: no I/O. Must not
import os, mmap, posix_ipc or anything with a clock.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import TYPE_CHECKING, NamedTuple

from .._errors import CorruptSegment, FutureFormat
from .directory import FORMAT_VERSION
from .record import RECORD_SIZE

if TYPE_CHECKING:
    from .frame import Buffer

SEGMENT_MAGIC = b"BPMPSEG\x00"
SEG_HEADER = struct.Struct("<8sII16sQQI")  # magic, version, segment_id, store_id, first_seq, size, crc
SEG_HEADER_SIZE = 64  # frames start here; the rest of the 64 bytes is zero
SEG_TRAILER = struct.Struct("<8sQQII")  # magic, footer_offset, footer_len, segment crc, own crc
SEG_TRAILER_SIZE = 32  # the last 32 bytes of a segment file, written at sealing
TRAILER_MAGIC = b"BPMPSEAL"
FOOTER_HEAD = struct.Struct("<8sQQ32s")  # magic, first_seq, count, records blake2b
FOOTER_MAGIC = b"BPMPSIDX"


class SegmentHeader(NamedTuple):
    segment_id: int
    store_id: bytes
    first_seq: int
    size: int


def encode_segment_header(segment_id: int, store_id: bytes, first_seq: int, size: int) -> bytes:
    body = SEG_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, segment_id, store_id, first_seq, size, 0)
    crc = zlib.crc32(body[: SEG_HEADER.size - 4])
    body = body[: SEG_HEADER.size - 4] + struct.pack("<I", crc)
    return body.ljust(SEG_HEADER_SIZE, b"\0")


def decode_segment_header(data: bytes, name: str) -> SegmentHeader:
    if len(data) < SEG_HEADER_SIZE:
        raise CorruptSegment(name, 0, f"segment header is {len(data)} bytes, expected {SEG_HEADER_SIZE}")
    magic, version, segment_id, store_id, first_seq, size, crc = SEG_HEADER.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        raise CorruptSegment(name, 0, "not a batpak-mp segment (bad magic)")
    if zlib.crc32(data[: SEG_HEADER.size - 4]) != crc:
        raise CorruptSegment(name, 0, "segment header checksum mismatch")
    if version > FORMAT_VERSION:
        raise FutureFormat(name, version, FORMAT_VERSION)
    if version < 1:
        raise CorruptSegment(name, 8, f"segment format version {version} does not exist")
    if any(data[SEG_HEADER.size:SEG_HEADER_SIZE]):  # not under the header CRC: must stay zero
        raise CorruptSegment(name, SEG_HEADER.size, "segment header padding is not zero")
    return SegmentHeader(segment_id, store_id, first_seq, size)


class Trailer(NamedTuple):
    footer_offset: int
    footer_len: int
    segment_crc: int  # crc32 of every byte before the trailer: any flipped bit shows


def encode_trailer(footer_offset: int, footer_len: int, segment_crc: int) -> bytes:
    head = struct.pack("<8sQQI", TRAILER_MAGIC, footer_offset, footer_len, segment_crc)
    return head + struct.pack("<I", zlib.crc32(head))


def decode_trailer(data: bytes) -> Trailer | None:
    """The trailer of a sealed segment, or None when the segment is not sealed."""
    if len(data) < SEG_TRAILER.size:
        return None
    magic, footer_offset, footer_len, segment_crc, crc = SEG_TRAILER.unpack_from(data, 0)
    if magic != TRAILER_MAGIC or zlib.crc32(data[:28]) != crc:
        return None
    return Trailer(footer_offset, footer_len, segment_crc)


def encode_footer(first_seq: int, records: bytes) -> bytes:
    count = len(records) // RECORD_SIZE
    digest = hashlib.blake2b(records, digest_size=32).digest()
    return FOOTER_HEAD.pack(FOOTER_MAGIC, first_seq, count, digest) + records


def decode_footer(data: bytes, name: str, offset: int) -> tuple[int, bytes]:
    """(first_seq, record bytes) of a seal footer, verified; else CorruptSegment."""
    if len(data) < FOOTER_HEAD.size:
        raise CorruptSegment(name, offset, "seal footer truncated")
    magic, first_seq, count, digest = FOOTER_HEAD.unpack_from(data, 0)
    records = data[FOOTER_HEAD.size:]
    if magic != FOOTER_MAGIC:
        raise CorruptSegment(name, offset, "seal footer has a bad magic")
    if len(records) != count * RECORD_SIZE:
        raise CorruptSegment(name, offset, "seal footer length does not match its count")
    if hashlib.blake2b(records, digest_size=32).digest() != digest:
        raise CorruptSegment(name, offset, "seal footer checksum mismatch")
    return first_seq, records


def footer_count(data: bytes) -> int | None:
    """The record count a seal footer's head states (not verified), or None when ``data``
    is too short or has no footer magic."""
    if len(data) < FOOTER_HEAD.size:
        return None
    magic, _, count, _ = FOOTER_HEAD.unpack_from(data, 0)
    return int(count) if magic == FOOTER_MAGIC else None


class SegmentVerdict(NamedTuple):
    """What ``segment_verdict`` found. ``problems`` is empty when the segment is
    acceptable; otherwise each says what is wrong, with the segment and offset."""

    header: SegmentHeader
    trailer: Trailer | None  # None: not sealed
    frames_end: int  # frames lie in [64, frames_end): the footer when sealed, else size - 32
    problems: tuple[CorruptSegment, ...]

    def check(self) -> None:
        """Raise the first problem (for callers that refuse any)."""
        if self.problems:
            raise self.problems[0]


def segment_verdict(
    name: str, head: bytes, tail: bytes, size: int, *, store_id: bytes | None, first_seq: int | None,
    unsealed_ok: bool, segment_id: int | None = None, inherited: tuple[tuple[bytes, int], ...] = (),
) -> SegmentVerdict:
    """Judge a segment from its first 64 bytes (``head``), its last 32 (``tail``) and its
    size: does it belong to the store ``store_id``, start at ``first_seq`` (where the
    log so far ends + 1), carry ``segment_id`` in its header (each checked when not None),
    and is its seal state allowed (``unsealed_ok``: recovery accepts an unsealed segment
    anywhere and seals it; verify only the newest)? A sealed segment's trailer must point
    inside it. ``inherited`` (a fork's lineage, ``meta.inherited_of``): a header naming one
    of those store ids is this store's when the segment starts at or before the last
    sequence taken from it (FORMAT.md §8.1).
    Raises ``CorruptSegment``/``FutureFormat`` only when the header cannot be decoded
    (then nothing else can be judged); every other finding is in ``problems``."""
    header = decode_segment_header(head, name)
    problems: list[CorruptSegment] = []
    if store_id is not None and header.store_id != store_id and not any(
            header.store_id == sid and header.first_seq <= through for sid, through in inherited):
        problems.append(CorruptSegment(name, 0, "segment belongs to another store"))
    if segment_id is not None and header.segment_id != segment_id:
        problems.append(CorruptSegment(name, 0, f"header says segment {header.segment_id}, the file name {segment_id}"))
    if first_seq is not None and header.first_seq != first_seq:
        problems.append(CorruptSegment(name, 0, f"segment starts at sequence {header.first_seq}, expected {first_seq}"))
    limit = size - SEG_TRAILER_SIZE
    trailer = decode_trailer(tail) if size >= SEG_HEADER_SIZE + SEG_TRAILER_SIZE else None
    frames_end = limit
    if trailer is not None:
        if trailer.footer_offset < SEG_HEADER_SIZE or trailer.footer_offset + trailer.footer_len > limit:
            problems.append(CorruptSegment(name, limit, "trailer points outside the segment"))
        else:
            frames_end = trailer.footer_offset
    elif not unsealed_ok:
        problems.append(CorruptSegment(name, max(limit, 0), "segment before the last is not sealed"))
    return SegmentVerdict(header, trailer, frames_end, tuple(problems))


class SealedVerdict(NamedTuple):
    """What ``sealed_verdict`` found: the footer's records (None when they could not be
    read) and every problem (empty: the sealed segment is intact)."""

    records: bytes | None
    problems: tuple[CorruptSegment, ...]

    def check(self) -> bytes | None:
        """Raise the first problem; else the records."""
        if self.problems:
            raise self.problems[0]
        return self.records


def sealed_verdict(name: str, body: Buffer, trailer: Trailer, *, checksum: bool = True,
                   footer: bool = True) -> SealedVerdict:
    """Check a sealed segment's bytes (``body``: the whole file): (``checksum``) the crc32
    of everything before the trailer, and (``footer``) that the seal footer decodes
    (magic, length, digest). Never raises."""
    problems: list[CorruptSegment] = []
    limit = len(body) - SEG_TRAILER_SIZE
    if checksum:
        mv = memoryview(body)
        try:
            if zlib.crc32(mv[:limit]) != trailer.segment_crc:
                problems.append(CorruptSegment(name, 0, "sealed segment checksum mismatch (a byte changed after sealing)"))
        finally:
            mv.release()
    records = None
    if footer:
        start, end = trailer.footer_offset, trailer.footer_offset + trailer.footer_len
        if start < SEG_HEADER_SIZE or end > limit:
            problems.append(CorruptSegment(name, limit, "trailer points outside the segment"))
        else:
            try:
                _, records = decode_footer(bytes(body[start:end]), name, start)
            except CorruptSegment as exc:
                problems.append(exc)
    return SealedVerdict(records, tuple(problems))
