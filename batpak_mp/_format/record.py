"""The 64-byte index record (docs/FORMAT.md §4) and the ``records.idx`` header (§5).

Owns: the record layout, defined once as ``RECORD_FIELDS``; the struct, the NamedTuple
and the numpy dtype are all derived from it. One record per global sequence, at
``RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE`` in records.idx; the seal footer of a
segment holds the same records. Pure: no I/O.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .._errors import FutureFormat
from .directory import FORMAT_VERSION, RECORDS_FILE

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
