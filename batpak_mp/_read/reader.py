"""Reads committed events straight from the mapped files, without the writer.

Owns: mapping segments, ``records.idx`` and the lookup tables read-only, and answering
``get``, ``history``, ``query_after`` and ``walk_ancestors`` bounded by a visible
frontier. The same code serves the in-process engine and every client process.
Invariants: never returns a frame beyond the visible frontier; every record and table
slot is validated against the frame it names (sequence, entity, checksum); a file is
never mapped writable here. Must not import the engine, writer or client.
"""

from __future__ import annotations

import bisect
import functools
import mmap
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from .._errors import CorruptSegment, InvalidArgument, NotFound, StorageError
from .._format.directory import (
    FENCES_FILE,
    INDEX_DIR,
    RECORDS_FILE,
    SEGMENT_DIR,
    delta_name,
    entities_base_name,
    name_hash,
    segment_name,
)
from .._format.fences import FENCE_RANGE, FENCES_HEADER
from .._format.frame import (
    FLAG_FENCED,
    H_FLAGS,
    H_FRAME_LEN,
    H_GLOBAL_SEQUENCE,
    OK,
    Frame,
    event_from_header,
    frame_to_event,
)
from .._format.ids import event_id_sequence
from .._format.record import (
    LOCATION,
    LOCATION_OFFSET,
    R_FRAME_LEN,
    R_OFFSET,
    R_PREV_IN_ENTITY,
    R_SEGMENT_ID,
    RECORD,
    RECORD_SIZE,
    RECORDS_HEADER_SIZE,
)
from .._format.segment import SEG_HEADER_SIZE
from .._format.tables import (
    DELTA_MAGIC,
    ENTITY_BASE_MAGIC,
    BaseTable,
    check_header,
    delta_candidates,
)
from .._native import event_at, frame_header, scan_events, scan_frame, unpack_record  # the active codec
from .._query import Region
from .._values import Coordinate, Event, Page
from . import queries
from .positions import ScopeMaps
from .queries import StaleView
from .tags import TagMaps

__all__ = ["Hidden", "Reader", "StaleView", "View", "frame_to_event", "map_readonly"]

_rec_unpack = RECORD.unpack_from
_locate = LOCATION.unpack_from
SCAN_RUN = 64  # events ``scan`` builds per call of the codec (a run ends early at a fence or a segment's end)
STALE_RETRIES = 100  # ~1 ms apart: how long a record may disagree with its frame (a compaction's swap) before it is damage


class View(NamedTuple):
    """What a reader may see: the visible frontier and which index files are current."""

    visible: int
    base_segment: int  # newest sealed segment folded into the base tables (0: none)
    delta_gen: int  # generation of the active segment's delta table (0: none)
    revealed: int = 0  # how many ranges fences.tbl holds (committed visibility fences)


class Hidden(Exception):
    """The event was written inside a visibility fence that has not been committed."""


def map_readonly(path: str) -> mmap.mmap | None:
    """A read-only shared mapping of a whole file; None when it is missing or empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError("open", path, exc) from exc
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError as exc:
        raise StorageError("mmap", path, exc) from exc
    finally:
        os.close(fd)


def unborn_segment(path: str) -> bool:
    """A segment file that is empty or all zeros: its header was never written, so no
    frame was either (a rotation being made, or cut short by a crash; the engine removes
    such a newest file when it opens the directory)."""
    m = map_readonly(path)
    if m is None:
        return True
    try:
        if any(m[:SEG_HEADER_SIZE + 8]):  # the header, and a frame's length word after it
            return False
        size = len(m)
        step = 1 << 20
        return all(m[i:i + step].count(0) == min(step, size - i) for i in range(0, size, step))
    finally:
        m.close()


class Reader:
    """Lock-free reads over the data directory, bounded by ``view_fn()``."""

    def __init__(self, data_dir: str, view_fn: Callable[[], View]) -> None:
        self.data_dir = data_dir
        self._view_fn = view_fn
        self._seg_dir = os.path.join(data_dir, SEGMENT_DIR)
        self._idx_dir = os.path.join(data_dir, INDEX_DIR)
        self._segments: dict[int, mmap.mmap] = {}
        self._records: mmap.mmap | bytes | None = None  # bytes: records held in memory (the offline reader)
        self._base: BaseTable | None = None
        self._base_map: mmap.mmap | None = None
        self._base_segment = -1
        self._delta: mmap.mmap | None = None
        self._delta_cap = 0
        self._delta_gen = -1
        self.view = View(0, 0, 0)
        self._coords: dict[bytes, tuple[int, Coordinate]] = {}  # decoded names, reused across events
        self.scopes = ScopeMaps(self._idx_dir, map_readonly)  # per-scope positions (positions.idx, scopeheads.idx)
        self.tags: TagMaps | None = TagMaps(self._idx_dir, map_readonly)  # postings by prefix, scope, kind, category
        self.entity_names: dict[int, str] = {}  # entity hash -> name: prefix verdicts of the unindexed tail
        self._revealed_first: list[int] = []  # committed fences' ranges, sorted by first sequence
        self._revealed_last: list[int] = []

    # -- mapping ------------------------------------------------------------------------
    def refresh(self) -> View:
        """Take the current view and map the index files it names. The writer replaces
        those files at a rotation and removes the old ones once it has published the
        new names: a reader that read the old names just before retries with a fresh
        view (a few ms at most) before it calls the index damaged."""
        for attempt in range(200):
            view = self._view_fn()
            try:
                if view.base_segment != self._base_segment:
                    self._map_base(view.base_segment)
                if view.delta_gen != self._delta_gen:
                    self._map_delta(view.delta_gen)
                if view.revealed != len(self._revealed_first):
                    self._load_fences(view.revealed)
            except StaleView as exc:
                self._base_segment = self._delta_gen = -1  # remap both next time
                if attempt == 199:
                    raise CorruptSegment(self.data_dir, 0, f"index file {exc} is missing") from None
                time.sleep(0.001)
                continue
            self.view = view
            self.scopes.cover(view.visible)
            return view
        raise AssertionError("unreachable")

    def _map_base(self, through_segment: int) -> None:
        if self._base is not None:
            self._base.release()
        if self._base_map is not None:
            self._base_map.close()
        self._base = None
        self._base_map = None
        if through_segment:
            name = entities_base_name(through_segment)
            m = map_readonly(os.path.join(self._idx_dir, name))
            if m is None:
                raise StaleView(name)
            count, _, _, _ = check_header(m, ENTITY_BASE_MAGIC, name)
            self._base_map = m
            self._base = BaseTable(m, count, 2)
        self._base_segment = through_segment

    def _map_delta(self, generation: int) -> None:
        if self._delta is not None:
            self._delta.close()
        self._delta = None
        self._delta_cap = 0
        if generation:
            name = delta_name(generation)
            m = map_readonly(os.path.join(self._idx_dir, name))
            if m is None:
                raise StaleView(name)
            self._delta_cap, _, _, _ = check_header(m, DELTA_MAGIC, name)
            self._delta = m
        self._delta_gen = generation

    def _load_fences(self, count: int) -> None:
        path = os.path.join(self._idx_dir, FENCES_FILE)
        try:
            with open(path, "rb") as f:
                data = f.read(FENCES_HEADER.size + count * FENCE_RANGE.size)
        except FileNotFoundError:
            data = b""
        if len(data) < FENCES_HEADER.size + count * FENCE_RANGE.size:
            raise StaleView(FENCES_FILE)
        ranges = sorted(FENCE_RANGE.iter_unpack(data[FENCES_HEADER.size:]))
        self._revealed_first = [a for a, _ in ranges]
        self._revealed_last = [b for _, b in ranges]

    def hidden(self, seq: int, flags: int) -> bool:
        """True for an event written inside a fence that was never committed."""
        if not flags & FLAG_FENCED:
            return False
        i = bisect.bisect_right(self._revealed_first, seq) - 1
        return i < 0 or self._revealed_last[i] < seq

    def _records_map(self, seq: int) -> mmap.mmap | bytes:
        m = self._records
        end = RECORDS_HEADER_SIZE + seq * RECORD_SIZE
        if m is None or len(m) < end:
            if isinstance(m, mmap.mmap):
                m.close()
            m = map_readonly(os.path.join(self._idx_dir, RECORDS_FILE))
            if m is None or len(m) < end:
                raise StaleView(RECORDS_FILE)
            self._records = m
        return m

    def _segment(self, segment_id: int) -> mmap.mmap:
        m = self._segments.get(segment_id)
        if m is None:
            m = map_readonly(os.path.join(self._seg_dir, segment_name(segment_id)))
            if m is None:
                raise StaleView(segment_name(segment_id))
            self._segments[segment_id] = m
        return m

    def close(self) -> None:
        self.scopes.close()
        if self.tags is not None:
            self.tags.close()
        self._map_base(0)
        self._map_delta(0)
        for m in self._segments.values():
            m.close()
        self._segments.clear()
        if isinstance(self._records, mmap.mmap):
            self._records.close()
        self._records = None

    # -- primitive reads ----------------------------------------------------------------
    def record(self, seq: int) -> tuple[Any, ...]:
        """The index record of ``seq``, unpacked (index it with ``_format.record.R_*``)."""
        return unpack_record(self._records_map(seq), seq)

    def prev_in_entity(self, seq: int) -> int:
        """The sequence of the event before ``seq`` in its entity (0: ``seq`` is the first)."""
        prev: int = self.record(seq)[R_PREV_IN_ENTITY]
        return prev

    def frame(self, seq: int) -> Frame:
        """The frame of a visible sequence, validated against its record (offset, length,
        and everything ``frame_header`` checks, sequence included)."""
        rec = self.record(seq)
        seg = self._segment(rec[R_SEGMENT_ID])
        off, length = rec[R_OFFSET], rec[R_FRAME_LEN]
        status, value = scan_frame(seg, off, min(off + length, len(seg)))
        if (status != OK or not isinstance(value, Frame) or value.global_sequence != seq
                or value.frame_len != length):
            raise StaleView(f"sequence {seq}")
        return value

    def event(self, seq: int, *, include_hidden: bool = False) -> Event:
        """The Event of a visible sequence: the hot path of every read. Checks the
        record against the frame (``frame_header``'s rule, then the length and sequence
        the record names) and builds the Event straight from the mapped bytes (the active
        codec's ``event_at``); ``StaleView`` when they disagree."""
        m = self._records
        rec_off = RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE
        if m is None or len(m) < rec_off + RECORD_SIZE:
            m = self._records_map(seq)
        sid, off, flen, _kind, flags = _locate(m, rec_off + LOCATION_OFFSET)  # LOCATION_FIELDS, in order
        if flags & FLAG_FENCED and not include_hidden and self.hidden(seq, flags):
            raise Hidden(seq)
        seg = self._segments.get(sid) or self._segment(sid)
        ev = event_at(seg, off, off + flen, seq, self._coords)
        if ev is None:
            raise StaleView(f"sequence {seq}")
        pos = self.scopes.position(seq)
        if pos:
            ev.scope_position = pos
        return ev

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        """Run a read; on a stale index refresh the view and read again, with the
        segments mapped afresh: a compaction may have swapped a segment file and
        re-pointed its records (``_storage/compaction.py``), so for up to
        ``STALE_RETRIES`` ms a record of one file and the bytes of the other are a swap
        under way; after that they are corruption."""
        try:
            return fn()
        except StaleView:
            pass
        for attempt in range(STALE_RETRIES):
            self.forget_segments()
            self.refresh()
            try:
                return fn()
            except StaleView as exc:
                if attempt == STALE_RETRIES - 1:
                    raise CorruptSegment(self.data_dir, 0, f"index does not match the log at {exc}") from None
            time.sleep(0.001)
        raise AssertionError("unreachable")

    def forget_segments(self) -> None:
        """Drop the cached segment mappings (the next read maps each file by its name
        again: after a compaction swapped one). Not closed here: a scan in progress may
        still hold one; each closes when its last user lets go."""
        self._segments.clear()

    def head_of(self, entity_raw: bytes) -> int:
        """Newest visible sequence of an entity, or 0."""
        h = name_hash(entity_raw)
        visible = self.view.visible
        # the active segment's delta first (newest), then the sealed segments' base table;
        # a candidate counts only when its frame names this entity (64-bit hash collisions)
        for source in (self._delta_candidates(h), self._base.entity_candidates(h) if self._base else ()):
            for candidate in source:
                seq = candidate
                while seq > visible:  # walk back past events written but not yet published
                    seq = self.record(seq)[R_PREV_IN_ENTITY]
                if seq and self.frame(seq).entity == entity_raw:
                    return seq
        return 0

    def _delta_candidates(self, h: int) -> list[int]:
        return list(delta_candidates(self._delta, self._delta_cap, h)) if self._delta is not None else []

    # -- the read API -------------------------------------------------------------------
    def get_seq(self, seq: int) -> Event:
        if not 0 < seq <= self.view.visible:
            self.refresh()
            if not 0 < seq <= self.view.visible:
                raise NotFound("sequence", seq)
        try:
            ev: Event = self._retrying(functools.partial(self.event, seq))
        except Hidden:
            self.refresh()  # a fence may have been committed since the last look
            try:
                ev = self._retrying(functools.partial(self.event, seq))
            except Hidden:
                raise NotFound("sequence", seq) from None
        return ev

    def get(self, event_id: bytes) -> Event:
        if not isinstance(event_id, (bytes, bytearray)) or len(event_id) != 16:
            raise InvalidArgument("event_id", event_id, "must be 16 bytes")
        seq = event_id_sequence(event_id)
        if not 0 < seq <= self.view.visible:
            self.refresh()
            if not 0 < seq <= self.view.visible:
                raise NotFound("event", bytes(event_id).hex())
        try:
            ev = self.event(seq)
        except (StaleView, Hidden):
            try:
                self.refresh()
                ev = self._retrying(functools.partial(self.event, seq))
            except Hidden:
                raise NotFound("event", bytes(event_id).hex()) from None
        if ev.event_id != event_id:
            raise NotFound("event", bytes(event_id).hex())
        return ev

    # the query calls live in ``queries`` (one function per call, over this reader)
    def latest(self, entity: str) -> Event | None:
        return queries.latest(self, entity)

    def history(self, entity: str, after_clock: int | None = None, limit: int | None = None, *,
                before_clock: int | None = None, newest_first: bool = False) -> list[Event]:
        return queries.history(self, entity, after_clock, limit, before_clock=before_clock, newest_first=newest_first)

    def query_after(self, after: int = 0, limit: int = 1000, entity: str | None = None, scope: str | None = None,
                    kind: Any = None, *, upto: int | None = None, skip_fenced: bool = False, kinds: Any = None,
                    region: Region | None = None) -> Page:
        return queries.query_after(self, after, limit, entity, scope, kind, upto=upto, skip_fenced=skip_fenced,
                                   kinds=kinds, region=region)

    def select(self, after: int, limit: int, reg: Region, *, skip_fenced: bool = False) -> Page:
        return queries.select(self, after, limit, reg, skip_fenced=skip_fenced)

    def stream_page(self, after: int, limit: int, region: Region) -> tuple[list[queries.StreamEntry], int]:
        return queries.stream_page(self, after, limit, region)

    def latest_in_scope(self, scope: str) -> Event | None:
        return queries.latest_in_scope(self, scope)

    def query_scope(self, scope: str, after_position: int = 0, limit: int = 1000, upto_position: int | None = None,
                    region: Region | None = None) -> Page:
        return queries.query_scope(self, scope, after_position, limit, upto_position, region)

    def walk_ancestors(self, event_id: bytes, limit: int | None = None) -> Iterator[Event]:
        """The event and its predecessors in its entity, newest first, checking the hash
        chain. A bad argument or an unknown id raises here, at the call (as ``Store``
        does), not at the first ``next()``."""
        if limit is not None and (type(limit) is not int or limit < 0):
            raise InvalidArgument("limit", limit, "must be an int >= 0")
        return self._walk(self.get(event_id).global_sequence, limit)

    def _walk(self, seq: int, limit: int | None) -> Iterator[Event]:
        count = 0
        expect_hash: bytes | None = None
        while seq and (limit is None or count < limit):
            frame = self._retrying(functools.partial(self.frame, seq))
            if expect_hash is not None and frame.event_hash != expect_hash:
                raise CorruptSegment(self.data_dir, 0, f"hash chain broken at sequence {seq}")
            if not self.hidden(seq, frame.flags):  # a never-committed fence's event: walked, not shown
                yield frame_to_event(frame)
                count += 1
            expect_hash = frame.prev_hash
            seq = self._retrying(functools.partial(self.prev_in_entity, seq))

    def frame_version(self, seq: int) -> int:
        """The frame version of a visible sequence (1: written before format version 2,
        its hash covers its payload bytes; FORMAT.md §9.1)."""
        def run() -> int:
            self.frame(seq)  # validated against its record
            rec = self.record(seq)
            off = rec[R_OFFSET]
            return int.from_bytes(self._segment(rec[R_SEGMENT_ID])[off + 8:off + 10], "little")
        version: int = self._retrying(run)
        return version

    def _run_start(self, seq: int) -> tuple[mmap.mmap, int]:
        """Where the frame of ``seq`` starts (its segment map and offset), validated."""
        self.frame(seq)
        rec = self.record(seq)
        return self._segment(rec[R_SEGMENT_ID]), rec[R_OFFSET]

    def scan(self, after: int = 0) -> Iterator[Event]:
        """Every event with ``global_sequence > after``, in commit order, up to the visible
        frontier at the call; payloads are not decoded (``event.payload`` decodes on first
        use). Walks each segment's frames front to back (checksum, version, lengths and
        sequence checked per frame) and consults ``records.idx`` only where a run of
        frames starts (the first event, each segment boundary), so a whole-log scan costs
        one header unpack and one CRC per event."""
        if type(after) is not int or after < 0:
            raise InvalidArgument("after", after, "must be an int >= 0")
        visible = self.refresh().visible
        coords: dict[bytes, tuple[int, Coordinate]] = {}
        seq = after
        while seq < visible:
            m, off = self._retrying(functools.partial(self._run_start, seq + 1))
            run_from = seq
            limit = len(m)
            while seq < visible:
                # a run of plain frames in one call of the active codec
                events, off, after = scan_events(m, off, limit, seq + 1, visible, coords, SCAN_RUN)
                seq = after - 1
                yield from events
                if events or seq >= visible:
                    continue
                # it stopped before a frame written in a fence (shown once revealed), or
                # before what is not a frame: a segment's footer, or damage (the record
                # index decides below)
                h = frame_header(m, off, limit)
                if type(h) is not tuple or h[H_GLOBAL_SEQUENCE] != seq + 1:
                    break
                if not self.hidden(seq + 1, h[H_FLAGS]):
                    ev = event_from_header(m, off, h, coords)
                    if ev is None:
                        break
                    yield ev
                seq += 1
                off += h[H_FRAME_LEN]
            if seq == run_from:
                raise CorruptSegment(self.data_dir, off, f"scan found no valid frame for sequence {seq + 1}")
