"""Names and fixed layouts of everything in a data directory (docs/FORMAT.md).

Owns: file names, the segment header, seal footer and trailer, the 64-byte index
record, the checkpoint record and store.meta. Pure codecs over bytes: no I/O here.
Must not import os, mmap or posix_ipc.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import NamedTuple

from .._errors import CorruptSegment, FutureFormat

FORMAT_VERSION = 1  # of the whole directory; store.meta, segments and index files carry it

META_FILE = "store.meta"
LOCK_FILE = "writer.lock"
CHECKPOINT_FILE = "durable.ckpt"
SEGMENT_DIR = "segments"
INDEX_DIR = "index"
RECORDS_FILE = "records.idx"
VERIFIED_FILE = "verified.tbl"  # sealed segments checksummed in this boot (derived, msgpack)
FENCES_FILE = "fences.tbl"  # revealed sequence ranges of committed fences (derived from the log)
FENCES_HEADER = struct.Struct("<8sIIQ")  # magic, version, reserved, count of ranges
FENCES_MAGIC = b"BPMPFNCS"
FENCE_RANGE = struct.Struct("<QQ")  # first, last (inclusive)


def segment_name(segment_id: int) -> str:
    return f"{segment_id:012d}.seg"


def entities_base_name(through_segment: int) -> str:
    return f"entities-{through_segment:012d}.tbl"


def idem_base_name(through_segment: int) -> str:
    return f"idem-{through_segment:012d}.tbl"


def delta_name(generation: int) -> str:
    return f"delta-{generation:012d}.tbl"


# ---- segment header (offset 0) --------------------------------------------------------
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


# ---- index record: one per global sequence, also the unit of the seal footer ---------
# entity_clock u64, segment_id u32, offset u32, frame_len u32, kind u16, flags u16,
# entity_hash u64, scope_hash u64, prev_in_entity u64, idem_hash 16s
RECORD = struct.Struct("<QIIIHHQQQ16s")
RECORD_SIZE = RECORD.size  # 64
RECORDS_HEADER_SIZE = 64  # records.idx: a header, then record for seq N at 64 + (N-1)*64


class Record(NamedTuple):
    entity_clock: int
    segment_id: int
    offset: int
    frame_len: int
    kind: int
    flags: int
    entity_hash: int
    scope_hash: int
    prev_in_entity: int
    idem_hash: bytes


def name_hash(raw: bytes) -> int:
    """The 64-bit hash of an entity or scope name used by the index (0 means empty)."""
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") or 1


def idem_hash(key: str | bytes) -> bytes:
    """The 128-bit hash an idempotency key is stored and matched under."""
    # surrogatepass: a str with a lone surrogate still gets its own hash (valid UTF-8
    # never contains an encoded surrogate, so no other key can collide with it)
    raw = b"s" + key.encode("utf-8", "surrogatepass") if isinstance(key, str) else b"b" + bytes(key)
    return hashlib.blake2b(raw, digest_size=16, person=b"bp-idem").digest()


# ---- event ids: time-ordered, and they carry their sequence --------------------------
def make_event_id(wall_ms: int, store_tag: int, seq: int) -> bytes:
    """16 bytes: 48-bit wall ms, 16-bit store tag, 64-bit global sequence (big-endian,
    so ids sort by time, then by commit order). ``get`` finds the record in O(1)."""
    return (wall_ms & 0xFFFFFFFFFFFF).to_bytes(6, "big") + store_tag.to_bytes(2, "big") + seq.to_bytes(8, "big")


def event_id_sequence(event_id: bytes) -> int:
    return int.from_bytes(event_id[8:16], "big")


# ---- checkpoint: a durable floor for recovery ---------------------------------------
# magic, version, durable seq, active segment, end offset of the visible log, visible seq,
# boot id, delta generation, base segment, crc32 of the active segment's frames, crc
CHECKPOINT = struct.Struct("<8sIQQQQ16sQQII")
CHECKPOINT_MAGIC = b"BPMPCKPT"


class Checkpoint(NamedTuple):
    """What the writer last persisted about its state. ``seq`` is the durable floor
    recovery holds the log to; the rest lets a restart in the same boot (page cache
    intact) trust the index files through ``visible`` and scan only the tail."""

    seq: int
    segment_id: int
    end_offset: int
    visible: int = 0
    boot_id: bytes = bytes(16)
    delta_gen: int = 0
    base_segment: int = 0
    frames_crc: int = 0  # crc32 of the active segment's bytes [64, end_offset)


def encode_checkpoint(seq: int, segment_id: int, end_offset: int, visible: int = 0, boot_id: bytes = bytes(16),
                      delta_gen: int = 0, base_segment: int = 0, frames_crc: int = 0) -> bytes:
    head = CHECKPOINT.pack(CHECKPOINT_MAGIC, FORMAT_VERSION, seq, segment_id, end_offset, visible, boot_id,
                           delta_gen, base_segment, frames_crc, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(head))


def decode_checkpoint(data: bytes) -> Checkpoint | None:
    """The checkpoint, or None when the bytes are not a whole checkpoint (the engine
    refuses to open over a damaged one: it would lower the durable floor)."""
    if len(data) != CHECKPOINT.size:
        return None
    magic, version, seq, segment_id, end_offset, visible, boot_id, delta_gen, base_segment, frames_crc, crc = \
        CHECKPOINT.unpack(data)
    if magic != CHECKPOINT_MAGIC or zlib.crc32(data[:-4]) != crc:
        return None
    if version > FORMAT_VERSION:
        raise FutureFormat(CHECKPOINT_FILE, version, FORMAT_VERSION)
    return Checkpoint(seq, segment_id, end_offset, visible, boot_id, delta_gen, base_segment, frames_crc)


# ---- records.idx header -----------------------------------------------------------------
RECORDS_HEADER = struct.Struct("<8sIIQ")  # magic, version, reserved, store key
RECORDS_MAGIC = b"BPMPRECS"


def encode_records_header(store_key: int) -> bytes:
    return RECORDS_HEADER.pack(RECORDS_MAGIC, FORMAT_VERSION, 0, store_key).ljust(RECORDS_HEADER_SIZE, b"\0")


def records_header_matches(data: bytes, store_key: int) -> bool:
    """True when records.idx belongs to this store and version; FutureFormat when newer.
    (records.idx is derived data: a mismatch means rebuild, never trust.)"""
    magic, version, _, key = RECORDS_HEADER.unpack_from(data, 0)
    if magic == RECORDS_MAGIC and version > FORMAT_VERSION:
        raise FutureFormat(RECORDS_FILE, version, FORMAT_VERSION)
    return bool(magic == RECORDS_MAGIC and version == FORMAT_VERSION and key == store_key)


# ---- store.meta ---------------------------------------------------------------------
def encode_meta(store_id: bytes, created_ms: int) -> bytes:
    doc = {"format": "batpak-mp", "format_version": FORMAT_VERSION,
           "store_id": store_id.hex(), "created_ms": created_ms}
    return (json.dumps(doc, indent=2) + "\n").encode()


def decode_meta(data: bytes, path: str) -> bytes:
    """The store id from store.meta; FutureFormat or CorruptSegment when it is wrong."""
    try:
        doc = json.loads(data)
        version = int(doc["format_version"])
        store_id = bytes.fromhex(doc["store_id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptSegment(path, 0, f"store.meta is unreadable: {exc}") from None
    if doc.get("format") != "batpak-mp":
        raise CorruptSegment(path, 0, "store.meta is not a batpak-mp store")
    if version > FORMAT_VERSION:
        raise FutureFormat(path, version, FORMAT_VERSION)
    if len(store_id) != 16:
        raise CorruptSegment(path, 0, "store.meta store_id is not 16 bytes")
    return store_id
