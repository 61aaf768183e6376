"""The pure-Python fallbacks of the two codec calls ``_format`` has no single function for.

Owns: ``encode_group`` (a whole commit group through ``_format.frame.encode_parts``, with
an item's prev_hash allowed to be the index of an earlier item) and ``unpack_record``
(the record of a sequence in records.idx). They are the reference the C extension's
functions of the same names are tested against, and what callers get without it.
Pure: bytes in, values out. Must not import os, mmap or anything with a clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from .._format.frame import Buffer, encode_parts
from .._format.record import RECORD, RECORD_SIZE, RECORDS_HEADER_SIZE

GROUP_ITEM_FIELDS = 14  # the arguments of encode_parts, in order; prev_hash (the 11th) may be an index

GroupItem = tuple[int, int, int, int, int, int, bytes, bytes, bytes, bytes, bytes | int, bytes, bytes, bytes]
RecordTuple = tuple[int, int, int, int, int, int, int, int, int, bytes]


def encode_group(items: Sequence[GroupItem]) -> tuple[bytes, list[bytes], list[int]]:
    """Encode a commit group: (the frames joined, their event hashes, their lengths).
    An item whose prev_hash is an int chains to that earlier item's event hash."""
    parts: list[bytes] = []
    hashes: list[bytes] = []
    lens: list[int] = []
    for i, item in enumerate(tuple(items)):
        fields = tuple(item)
        if len(fields) != GROUP_ITEM_FIELDS:
            raise TypeError(f"encode_group: item {i} has {len(fields)} fields, expected the 14 of encode_parts")
        (flags, kind, payload_version, seq, clock, wall_ms, event_id, causation_id, correlation_id, idem_hash, prev,
         entity, scope, payload) = cast(GroupItem, fields)
        if isinstance(prev, int):
            if not 0 <= prev < i:
                raise IndexError(f"encode_group: item {i} names item {prev!r} as its predecessor, "
                                 "which is not an earlier item")
            prev = hashes[prev]
        pieces, event_hash, frame_len = encode_parts(flags, kind, payload_version, seq, clock, wall_ms, event_id,
                                                     causation_id, correlation_id, idem_hash, prev, entity, scope,
                                                     payload)
        parts += pieces
        hashes.append(event_hash)
        lens.append(frame_len)
    return b"".join(parts), hashes, lens


def unpack_record(buf: Buffer, seq: int) -> RecordTuple:
    """The index record of ``seq`` in a records.idx buffer, as a plain tuple."""
    rec: RecordTuple = RECORD.unpack_from(buf, RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE)
    return rec
