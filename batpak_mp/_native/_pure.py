"""The pure-Python fallbacks of the codec calls ``_format`` has no single function for.

Owns: ``encode_group`` (a whole commit group through ``_format.frame.encode_parts``, with
an item's prev_hash allowed to be the index of an earlier item), ``unpack_record`` (the
record of a sequence in records.idx), ``pack_records`` (a published group's records into
records.idx), and the reader's hot path: ``event_at`` (the ``Event`` of the frame a record
names) and ``scan_events`` (a run of frames as Events). They are the reference the C
extension's functions of the same names are tested against, and what callers get
without it. Pure: bytes in, values out (``pack_records`` writes into the buffer it is
given). Must not import os, mmap or anything with a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

from .._format.frame import (
    FLAG_FENCED,
    H_FLAGS,
    H_FRAME_LEN,
    H_GLOBAL_SEQUENCE,
    Buffer,
    encode_parts,
    event_from_header,
    frame_header,
)
from .._format.record import RECORD, RECORD_SIZE, RECORDS_HEADER_SIZE
from .._values import Coordinate, Event

GROUP_ITEM_FIELDS = 14  # the arguments of encode_parts, in order; prev_hash (the 11th) may be an index

GroupItem = tuple[int, int, int, int, int, int, bytes, bytes, bytes, bytes, bytes | int, bytes, bytes, bytes]
RecordTuple = tuple[int, int, int, int, int, int, int, int, int, bytes]
RecordMeta = tuple[int, int, int, int, int, int, int, int, bytes, bytes]
"""What a record is packed from: planning's EventMeta, (seq, clock, kind, flags, frame_len,
prev_seq, entity_hash, scope_hash, entity, idem)."""
Coords = dict[bytes, tuple[int, Coordinate]]  # a reader's cache of decoded names (event_from_header)


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


def pack_records(buf: Any, metas: Iterable[RecordMeta], segment_id: int, offset: int) -> int:
    """Write the record of each event of a group whose first frame is at ``offset`` of
    segment ``segment_id`` into the records.idx buffer ``buf``; returns the offset past
    the group's last frame."""
    pack = RECORD.pack_into
    for (seq, clock, kind, flags, flen, prev, ent_h, scope_h, _entity, idem) in metas:
        pack(buf, RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE, clock, segment_id, offset, flen, kind, flags,
             ent_h, scope_h, prev, idem)
        offset += flen
    return offset


def event_at(buf: Buffer, off: int, limit: int, seq: int, coords: Coords) -> Event | None:
    """The Event of the frame of ``seq`` that fills ``buf[off:limit]`` exactly (the frame
    validity rule of ``frame_header``); None when there is no such frame there (or its
    names are not UTF-8): the record that named it is stale."""
    if off < 0 or limit > len(buf):
        return None
    h = frame_header(buf, off, limit)
    if type(h) is not tuple or h[H_FRAME_LEN] != limit - off or h[H_GLOBAL_SEQUENCE] != seq:
        return None
    return event_from_header(cast(bytes, buf), off, h, coords)


def scan_events(buf: Buffer, off: int, limit: int, seq: int, last: int, coords: Coords,
                max_events: int) -> tuple[list[Event], int, int]:
    """A run of frames from ``off`` as Events, the first carrying ``seq``, none past
    ``last``, at most ``max_events``: (events, offset and sequence after them). It stops
    before a frame that is not valid, does not carry the next sequence, was written in a
    fence (whether it is hidden is the caller's to decide) or whose names are not UTF-8."""
    if off < 0 or limit > len(buf):
        raise ValueError(f"scan_events: offset {off} or limit {limit} outside buffer of {len(buf)} bytes")
    events: list[Event] = []
    while seq <= last and len(events) < max_events:
        h = frame_header(buf, off, limit)
        if type(h) is not tuple or h[H_GLOBAL_SEQUENCE] != seq or h[H_FLAGS] & FLAG_FENCED:
            break
        ev = event_from_header(cast(bytes, buf), off, h, coords)
        if ev is None:
            break
        events.append(ev)
        seq += 1
        off += h[H_FRAME_LEN]
    return events, off, seq
