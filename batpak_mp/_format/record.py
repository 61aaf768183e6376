"""The 64-byte index record (docs/FORMAT.md §4) and the ``records.idx`` header (§5).

Owns: the record layout, declared once as the ``Record`` NamedTuple (each field's struct
code in its annotation); ``RECORD_FIELDS``, the struct ``RECORD``, the ``R_*`` positions
of each field in an unpacked record, per-field structs and ``numpy_dtype()`` are all
derived from it. One record per global sequence, at ``record_offset(seq)`` in
records.idx; the seal footer of a segment holds the same records. Readers index an
unpacked record with the ``R_*`` constants (module constants, cheap in hot loops), never
with a bare number. Pure: no I/O; numpy is imported only inside ``numpy_dtype``.
Must not import os, mmap, posix_ipc or anything with a clock.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, NamedTuple

from .._errors import FutureFormat
from .directory import FORMAT_VERSION, RECORDS_FILE
from .layout import field_struct, fields_of, offset_of, position_of, struct_of


class Record(NamedTuple):
    """One index record: where a sequence's frame is, and what the index needs of it."""

    entity_clock: Annotated[int, "Q"]  # copy of the frame's
    segment_id: Annotated[int, "I"]  # segment holding the frame
    offset: Annotated[int, "I"]  # byte offset of the frame in that segment
    frame_len: Annotated[int, "I"]  # copy of the frame's
    kind: Annotated[int, "H"]  # copy of the frame's
    flags: Annotated[int, "H"]  # copy of the frame's
    entity_hash: Annotated[int, "Q"]  # name_hash(entity)
    scope_hash: Annotated[int, "Q"]  # name_hash(scope)
    prev_in_entity: Annotated[int, "Q"]  # the entity's previous sequence, 0 for its first
    idem_hash: Annotated[bytes, "16s"]  # copy of the frame's


RECORD_FIELDS = fields_of(Record)
RECORD = struct_of(RECORD_FIELDS)  # "<QIIIHHQQQ16s"
RECORD_SIZE = RECORD.size  # 64
RECORDS_HEADER_SIZE = 64  # records.idx: a header, then record for seq N at 64 + (N-1)*64

# positions in a tuple unpacked with RECORD (rec[R_FLAGS] reads as what it is)
R_ENTITY_CLOCK = position_of(RECORD_FIELDS, "entity_clock")
R_SEGMENT_ID = position_of(RECORD_FIELDS, "segment_id")
R_OFFSET = position_of(RECORD_FIELDS, "offset")
R_FRAME_LEN = position_of(RECORD_FIELDS, "frame_len")
R_KIND = position_of(RECORD_FIELDS, "kind")
R_FLAGS = position_of(RECORD_FIELDS, "flags")
R_ENTITY_HASH = position_of(RECORD_FIELDS, "entity_hash")
R_SCOPE_HASH = position_of(RECORD_FIELDS, "scope_hash")
R_PREV_IN_ENTITY = position_of(RECORD_FIELDS, "prev_in_entity")
R_IDEM_HASH = position_of(RECORD_FIELDS, "idem_hash")

# where the frame is (segment_id, offset, frame_len, kind, flags): the run of fields a
# reader's hot path needs, unpacked without the rest (no 16-byte idem_hash object)
LOCATION = struct_of(RECORD_FIELDS, "segment_id", "flags")
LOCATION_FIELDS = tuple(name for name, _ in RECORD_FIELDS[R_SEGMENT_ID:R_FLAGS + 1])
LOCATION_OFFSET = offset_of(RECORD_FIELDS, "segment_id")

# one field read alone (e.g. every idempotency hash of a run of records, with iter_unpack)
IDEM_OF_RECORD = field_struct(RECORD_FIELDS, "idem_hash")
PREV_OF_RECORD = field_struct(RECORD_FIELDS, "prev_in_entity")

_NUMPY_CODES = {"Q": "<u8", "I": "<u4", "H": "<u2"}


def record_offset(seq: int) -> int:
    """Byte offset of the record of global sequence ``seq`` (>= 1) in records.idx."""
    return RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE


def numpy_dtype() -> Any:
    """The record as a numpy structured dtype (64 bytes, field names as in ``Record``),
    for whole-column work over records.idx. A 16-byte field becomes two little-endian u64
    halves, ``<name>_lo`` (bytes 0..7) and ``<name>_hi`` (bytes 8..15), which numpy can
    compare and sort. numpy is imported here, not at module import."""
    import numpy as np

    spec: list[tuple[str, str]] = []
    for name, code in RECORD_FIELDS:
        if code == "16s":
            spec += [(f"{name}_lo", "<u8"), (f"{name}_hi", "<u8")]
        elif code in _NUMPY_CODES:
            spec.append((name, _NUMPY_CODES[code]))
        else:  # a layout change this function does not know how to map
            raise TypeError(f"no numpy type for record field {name} ({code})")
    dtype = np.dtype(spec)
    assert dtype.itemsize == RECORD_SIZE
    return dtype


RECORDS_HEADER = struct.Struct("<8sIIQ")  # magic, version, reserved, store key
RECORDS_MAGIC = b"BPMPRECS"


def encode_records_header(store_key: int) -> bytes:
    return RECORDS_HEADER.pack(RECORDS_MAGIC, FORMAT_VERSION, 0, store_key).ljust(RECORDS_HEADER_SIZE, b"\0")


def records_header_matches(data: bytes, store_key: int) -> bool:
    """True when records.idx belongs to this store and version; FutureFormat when newer.
    (records.idx is derived data: a mismatch means rebuild, never trust.)"""
    if len(data) < RECORDS_HEADER.size:
        return False
    magic, version, _, key = RECORDS_HEADER.unpack_from(data, 0)
    if magic == RECORDS_MAGIC and version > FORMAT_VERSION:
        raise FutureFormat(RECORDS_FILE, version, FORMAT_VERSION)
    return bool(magic == RECORDS_MAGIC and version == FORMAT_VERSION and key == store_key)
