"""The pure-Python fallbacks of the codec calls ``_format`` has no single function for.

Owns: ``encode_group`` (a whole commit group through ``_format.frame.encode_parts``, with
an item's prev_hash allowed to be the index of an earlier item), ``encode_request`` (one
append request's events planned and encoded: clocks, chain, flags, event ids, frames,
index metas, receipts; the commit path's per-event work), ``unpack_record`` (the record
of a sequence in records.idx), ``pack_records`` and ``index_group`` (a published group's
records into records.idx, then its delta slots), and the reader's hot path: ``event_at``
(the ``Event`` of the frame a record names) and ``scan_events`` (a run of frames as
Events). They are the reference the C extension's functions of the same names are
tested against, and what callers get without it. Pure: bytes in, values out
(``pack_records`` and ``index_group`` write into the buffers they are given). Must not
import os, mmap or anything with a clock.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._errors import ConcurrencyConflict
from .._format.directory import name_hash
from .._format.frame import (
    FLAG_COMMIT_END,
    FLAG_FENCED,
    FLAG_HAS_CAUSATION,
    FLAG_HAS_CORRELATION,
    H_FLAGS,
    H_FRAME_LEN,
    H_GLOBAL_SEQUENCE,
    ZERO_ID,
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
_new_tuple = tuple.__new__  # what a NamedTuple's own __new__ calls
# event_from_header slices its buffer as bytes or an mmap does; event_at and scan_events pass
# it theirs as is (a typing.cast per event would cost a call on the readers' hot path)
_event_from: Callable[[Buffer, int, Any, Coords], Event | None] = event_from_header  # type: ignore[assignment]
_U64 = struct.Struct("<Q")  # a delta slot's head sequence, 8 bytes past its entity hash (_format.tables.DELTA_SLOT)
Chain = tuple[int, bytes | int, int, int]
"""An entity's chain as far as planned, in planning's EntityState order: (clock, head
hash, head sequence, entity name hash); inside a request the head hash may be the int
index of the request's event that is the head."""


def encode_group(items: Sequence[GroupItem]) -> tuple[bytes, list[bytes], list[int]]:
    """Encode a commit group: (the frames joined, their event hashes, their lengths).
    An item whose prev_hash is an int chains to that earlier item's event hash."""
    parts: list[bytes] = []
    hashes: list[bytes] = []
    lens: list[int] = []
    for i, item in enumerate(items if isinstance(items, (list, tuple)) else tuple(items)):
        fields: tuple[Any, ...] = item if type(item) is tuple else tuple(item)
        if len(fields) != GROUP_ITEM_FIELDS:
            raise TypeError(f"encode_group: item {i} has {len(fields)} fields, expected the 14 of encode_parts")
        prev = fields[10]
        if isinstance(prev, int):
            if not 0 <= prev < i:
                raise IndexError(f"encode_group: item {i} names item {prev!r} as its predecessor, "
                                 "which is not an earlier item")
            fields = (*fields[:10], hashes[prev], *fields[11:])
        pieces, event_hash, frame_len = encode_parts(*fields)
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
    return _event_from(buf, off, h, coords)


def scan_events(buf: Buffer, off: int, limit: int, seq: int, last: int, coords: Coords,
                max_events: int) -> tuple[list[Event], int, int]:
    """A run of frames from ``off`` as Events, the first carrying ``seq``, none past
    ``last``, at most ``max_events``: (events, offset and sequence after them). It stops
    before a frame that is not valid, does not carry the next sequence, was written in a
    fence (whether it is hidden is the caller's to decide) or whose names are not UTF-8."""
    if off < 0 or limit > len(buf):
        raise ValueError(f"scan_events: offset {off} or limit {limit} outside buffer of {len(buf)} bytes")
    events: list[Event] = []
    header, event_from, add = frame_header, _event_from, events.append  # locals: this loop runs per event
    stop = min(last, seq + max_events - 1)
    while seq <= stop:
        h = header(buf, off, limit)
        if type(h) is not tuple or h[H_GLOBAL_SEQUENCE] != seq or h[H_FLAGS] & FLAG_FENCED:
            break
        ev = event_from(buf, off, h, coords)
        if ev is None:
            break
        add(ev)
        seq += 1
        off += h[H_FRAME_LEN]
    return events, off, seq


def encode_request(items: Sequence[Any], entities: dict[bytes, Any], known: dict[bytes, Any],
                   lookup: Callable[[bytes], Any], first_seq: int, wall_ms: int, id_prefix: bytes,
                   fence_flag: int, durable: bool, scope_hashes: dict[bytes, int], receipt_type: Any,
                   state_type: Any) -> tuple[bytes, list[RecordMeta], list[Any], list[tuple[bytes, int]]]:
    """Plan and encode one append request (``items``: ``_prepare.Prepared``) as the
    events ``first_seq``, ``first_seq + 1``, ... of a commit group written at ``wall_ms``
    (event ids start with ``id_prefix``). Each event's entity state (planning's
    EntityState) comes from the request's own earlier events, else ``entities`` (the
    group's), else ``known`` (filled through ``lookup`` on a miss); an expected clock
    that does not match raises ``ConcurrencyConflict`` before anything is changed but
    ``known``. Then one ``encode_group`` call. On success ``entities`` holds each
    entity's new state (``state_type``) and the result is (the frames joined, the
    index metas, the receipts (``receipt_type``, unsigned), the (idempotency hash,
    sequence) of each keyed event). Scope name hashes are cached in ``scope_hashes``.
    ``receipt_type`` and ``state_type`` are NamedTuple classes, built as their own
    ``__new__`` builds them: ``tuple.__new__(cls, fields)``."""
    last = len(items) - 1
    rows: list[GroupItem] = []
    chained: list[Chain] = []
    mine: dict[bytes, Chain] = {}  # entities moved by this request: their head is named by its index here
    for i, p in enumerate(items):
        entity = p[0]
        st = mine.get(entity) or entities.get(entity) or known.get(entity)
        if st is None:
            st = known[entity] = lookup(entity)
        if p[6] is not None and p[6] != st[0]:
            raise ConcurrencyConflict(entity.decode(), p[6], st[0])
        flags = (FLAG_COMMIT_END if i == last else 0) | fence_flag
        if p[7] != ZERO_ID:
            flags |= FLAG_HAS_CAUSATION
        if p[8] != ZERO_ID:
            flags |= FLAG_HAS_CORRELATION
        seq = first_seq + i
        rows.append((flags, p[2], p[4], seq, st[0] + 1, wall_ms, id_prefix + seq.to_bytes(8, "big"), p[7], p[8],
                     p[5], st[1], entity, p[1], p[3]))
        chained.append(st)
        mine[entity] = (st[0] + 1, i, seq, st[3])
    data, hashes, lens = encode_group(rows)
    metas: list[RecordMeta] = []
    receipts: list[Any] = []
    keyed: list[tuple[bytes, int]] = []
    states: list[Any] = []
    for p, row, st, ehash, flen in zip(items, rows, chained, hashes, lens, strict=True):
        entity, scope, seq, clock, event_id = p[0], p[1], row[3], row[4], row[6]
        prev = hashes[head] if isinstance(head := st[1], int) else head
        scope_hash = scope_hashes.get(scope)
        if scope_hash is None:
            scope_hash = scope_hashes[scope] = name_hash(scope)
        metas.append((seq, clock, p[2], row[0], flen, st[2], st[3], scope_hash, entity, p[5]))
        receipts.append(_new_tuple(receipt_type, (event_id, seq, entity.decode(), scope.decode(), clock, ehash, prev,
                                                  wall_ms, durable, None, False)))
        states.append(_new_tuple(state_type, (clock, ehash, seq, st[3])))
        if p[5] != ZERO_ID:
            keyed.append((p[5], seq))
    for p, state in zip(items, states, strict=True):  # only now: nothing can fail any more
        entities[p[0]] = state
    return data, metas, receipts, keyed


def index_group(records: Any, metas: Sequence[RecordMeta], segment_id: int, offset: int, delta: Any,
                slots: dict[bytes, int], upsert: Callable[[int, int, int], int]) -> int:
    """Index a published group whose first frame is at ``offset``: its records
    (``pack_records``) first, so a reader that sees a slot finds its record, then each
    entity's slot in the delta table pointed at its newest event of the group. ``slots``
    holds each entity's slot offset; a missing one is found by ``upsert(entity hash,
    sequence, previous sequence)`` and kept. Returns the offset past the group."""
    end = pack_records(records, metas, segment_id, offset)
    heads: dict[int, int] = {}  # slot offset -> the newest sequence of its entity in the group
    for meta in metas:
        slot = slots.get(meta[8])
        if slot is None:  # the entity's first event in this segment
            slot = slots[meta[8]] = upsert(meta[6], meta[0], meta[5])
        heads[slot] = meta[0]
    for slot, seq in heads.items():
        delta[slot + 8:slot + 16] = _U64.pack(seq)
    return end
