"""Segment files (docs/FORMAT.md §3.1 and §3.6): the 64-byte header at offset 0, the
seal footer (the segment's index records) and the 32-byte trailer at the end.

Owns: those three layouts, their encoders and total decoders. Frames, which fill the
space between header and footer, are ``frame.py``'s. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import NamedTuple

from .._errors import CorruptSegment, FutureFormat
from .directory import FORMAT_VERSION
from .record import RECORD_SIZE

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
