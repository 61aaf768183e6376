"""Compaction: sealed segments rewritten with stubs in place of removed payloads, and
swapped in while readers and appends go on (docs/FORMAT.md §3.9, OPERATIONS.md
"Retention and erasure").

Owns: the swap of one sealed segment (``Compactor.rewrite``) and the clean-up of an
interrupted one at open (``Compactor.recover``). The bytes of the new file are
``_format.compact.rewrite_sealed``'s; which sequences lose their payload is the caller's
(the engine: redaction requests and retention rules).

The swap, in this order, each step fsynced before the next:
  1. the old file is checked whole (checksum and footer: damage is never copied on);
  2. the new file is written as ``segments/<name>.compact`` and fsynced;
  3. ``index/compaction.pending`` (the segment id) is written: a crash from here on makes
     the next open take the full recovery, which copies every seal footer into
     records.idx, so records and segment can never disagree after a restart;
  4. ``rename(<name>.compact, <name>)`` and an fsync of ``segments/``: the one atomic
     step. Before it the old file is the segment, after it the new one; any process that
     opens the name (a reader mapping it, a backup copying it) gets one or the other,
     whole. Processes that mapped the old file keep reading it (its inode lives on
     until the last mapping goes; then its space returns to the file system);
  5. the segment's records in records.idx are re-pointed at the new offsets (readers
     that meet a record of one file and the bytes of the other see a mismatch, drop
     their mapping and read again: ``_read/reader.py``);
  6. the marker is removed.
Nothing is ever truncated or written in place in a segment. Invariants: only sealed
segments are rewritten (the active one is never touched); appends go on meanwhile (they
write the active segment and records past every sealed one). Every OS call goes through
``osio.Disk``. ``EngineErasure``: the engine's calls for it (redact, set_retention, retention,
compact and its steps). Must not import the writer, the client or the IPC layer.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Container, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .._crypto import shred_payload
from .._errors import InvalidArgument
from .._format.compact import rewrite_sealed
from .._format.directory import COMPACTION_MARKER, compact_temp_name, parse_compact_temp_name
from .._format.record import R_SEGMENT_ID
from .._prepare import Prepared, prepare_items
from .._read.redaction import current_retention, expiring, redaction_item, requested, retention_item
from .._retention import Retention, RetentionRule
from .._values import (
    CATEGORY_SYSTEM,
    SHRED_ENTITY,
    SYSTEM_SHRED,
    BatchItem,
    CompactReport,
    Coordinate,
    Kind,
    Receipt,
    check_name,
)
from .encryption import Encryption
from .indexfiles import IndexFiles
from .osio import Disk
from .segments import SegmentFiles

if TYPE_CHECKING:
    from .._read.reader import Reader
    from .config import EngineConfig
    from .journal import Journal


class Swapped(NamedTuple):
    """One segment rewritten and swapped in."""

    segment_id: int
    stubbed: tuple[int, ...]
    bytes_removed: int


class CompactCopy(NamedTuple):
    """A compacted copy written and fsynced beside its segment, ready to swap in."""

    segment_id: int
    first_seq: int
    temp_path: str
    records: bytes
    stubbed: tuple[int, ...]
    bytes_removed: int


class Compactor:
    """Rewrites sealed segments of one open directory (the engine's segment and index
    files). ``prepare`` (reads a sealed segment, writes its copy: the slow part) may run
    on any thread; ``swap`` (marker, rename, records) runs where records.idx is written."""

    def __init__(self, disk: Disk, segments: SegmentFiles, index: IndexFiles, idx_dir: str,
                 on_swap: Callable[[int], None] = lambda sid: None) -> None:
        self.disk = disk
        self.segments = segments
        self.index = index
        self.marker = os.path.join(idx_dir, COMPACTION_MARKER)
        self.on_swap = on_swap  # told after a swap and its records (the engine's reader drops its old mapping)

    def interrupted(self) -> bool:
        """Whether a swap was interrupted (its records may not match the segment now)."""
        return self.disk.read_file(self.marker) is not None

    def recover(self) -> None:
        """At open, after the full recovery made records.idx agree with every footer:
        remove a half-written copy and the marker of an interrupted swap."""
        d = self.disk
        for name in d.listdir(self.segments.dir):
            if parse_compact_temp_name(name) is not None:
                d.unlink(os.path.join(self.segments.dir, name))
        if self.interrupted():
            d.fsync_dir(self.segments.dir)
            d.unlink(self.marker)

    def segments_holding(self, seqs: Iterable[int], active_segment: int, visible: int) -> dict[int, set[int]]:
        """The sealed segments (before ``active_segment``) holding any of ``seqs``, each
        with those of its sequences."""
        out: dict[int, set[int]] = {}
        for seq in seqs:
            if 0 < seq <= visible:
                sid = self.index.record(seq)[R_SEGMENT_ID]
                if sid < active_segment:
                    out.setdefault(sid, set()).add(seq)
        return out

    def prepare(self, segment_id: int, strip: Container[int]) -> CompactCopy | None:
        """Write the compacted copy of sealed segment ``segment_id`` (every frame of a
        sequence in ``strip`` a stub) as ``<name>.compact`` and fsync it; None when none
        of them can become a stub there. The segment is checked whole first."""
        d, segs = self.disk, self.segments
        seg = segs.open(segment_id, os.O_RDONLY)
        try:
            verdict = segs.judge(seg, first_seq=None, unsealed_ok=False)
            trailer = verdict.trailer
            assert trailer is not None  # unsealed_ok=False: judge raised otherwise
            segs.check_sealed(seg, trailer, footer=True)
            body = d.map_shared(seg.fd, seg.size, seg.path, writable=False)
            try:
                new = rewrite_sealed(seg.path, body, trailer, strip)
            finally:
                body.close()
        finally:
            d.close_quietly(seg.fd, seg.path)
        if new is None:
            return None
        tmp = os.path.join(segs.dir, compact_temp_name(segment_id))
        fd = d.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            d.pwrite(fd, new.data, 0, tmp)
            d.fsync(fd, tmp)
        except BaseException:
            d.close_quietly(fd, tmp)
            d.unlink_quietly(tmp)
            raise
        d.close(fd, tmp)
        return CompactCopy(segment_id, verdict.header.first_seq, tmp, new.records, new.stubbed, new.bytes_removed)

    def swap(self, p: CompactCopy) -> Swapped:
        """Swap a prepared copy in: the marker, the rename (atomic: any process opening
        the segment's name gets the old file or the new one, whole), the records, the
        marker removed. A failure before the rename leaves the old segment in place."""
        d, segs = self.disk, self.segments
        try:
            d.write_file_atomic(self.marker, f"{p.segment_id}\n".encode())
            d.replace(p.temp_path, segs.path(p.segment_id))
        except BaseException:
            d.unlink_quietly(p.temp_path)
            raise
        try:
            d.fsync_dir(segs.dir)
        finally:  # renamed: the records must follow whatever else fails (the marker stays then)
            self.index.adopt_records(p.first_seq, p.records)
            self.on_swap(p.segment_id)
        d.unlink(self.marker)
        return Swapped(p.segment_id, p.stubbed, p.bytes_removed)

    def abandon(self, p: CompactCopy) -> None:
        """Drop a prepared copy that will not be swapped in."""
        self.disk.unlink_quietly(p.temp_path)


class CompactStep(NamedTuple):
    """What a background compaction hands its owner's loop: a copy to swap in, or (copy
    None) the end of the run, with the error that ended it early, if any."""

    copy: CompactCopy | None
    error: BaseException | None = None


def compact_in_background(plan: dict[int, set[int]], prepare: Callable[[int, set[int]], CompactCopy | None],
                          post: Callable[[CompactStep], None]) -> threading.Thread:
    """Prepare each planned segment's copy on a thread of its own (reading a sealed
    segment and writing its copy: the slow part) and ``post`` each to the owner's loop,
    which swaps it in (``Compactor.swap``: where records.idx is written), then a last
    step. The loop keeps committing meanwhile: appends flow."""
    def run() -> None:
        try:
            for sid, strip in sorted(plan.items()):
                copy = prepare(sid, strip)
                if copy is not None:
                    post(CompactStep(copy))
        except BaseException as exc:  # a failed step ends the run; the owner reports it
            post(CompactStep(None, exc))
            return
        post(CompactStep(None))

    thread = threading.Thread(target=run, name="batpak-compaction", daemon=True)
    thread.start()
    return thread


class EngineErasure:
    """The engine's erasure and retention calls (issue 13), mixed into ``Engine``: erasure
    requests, retention rules, and compaction whole (``compact``) or in the steps the
    writer's loop drives (``compaction_plan`` / ``_prepare`` / ``_swap`` / ``_abandon``)."""

    if TYPE_CHECKING:
        reader: Reader
        config: EngineConfig
        _journal: Journal
        _compactor: Compactor
        _retention_cache: dict[str, Any]
        _clock_ms: Callable[[], int]
        _encryption: Encryption
        store_tag: int
        inherited: tuple[tuple[bytes, int], ...]

        def _check_open(self) -> None: ...
        def _commit_one(self, prepared: list[Prepared]) -> list[Receipt]: ...

    def redact(self, event_id: bytes, *, reason: str) -> Receipt:
        """Ask for ``event_id``'s payload to be removed at the next compaction (a stub
        stays: FORMAT.md §3.8); the request is a system event on the ``redactions``
        chain. ``RedactionRefused`` for a system event or a version-1 frame."""
        self._check_open()
        item = redaction_item(self.reader, event_id, reason)
        return self._commit_one(prepare_items([item], max_payload=self.config.max_payload_bytes, store_kinds=True))[0]

    def set_retention(self, rules: Sequence[RetentionRule], *, idempotency_window_ms: int | None = None) -> Receipt:
        """Put ``rules`` in force (replacing the ones before) for every process: a system
        event on the ``retention`` chain. Compaction applies them (OPERATIONS.md §11.3)."""
        self._check_open()
        item = retention_item(rules, idempotency_window_ms)
        return self._commit_one(prepare_items([item], max_payload=self.config.max_payload_bytes, store_kinds=True))[0]

    def retention(self) -> Retention:
        """The retention rules in force (the latest ``set_retention``)."""
        self._check_open()
        return current_retention(self.reader, self._retention_cache)

    def compaction_plan(self) -> dict[int, set[int]]:
        """The sealed segments compaction would rewrite now, each with the sequences
        whose payload goes (erasure requests, retention rules; never the active segment)."""
        self._check_open()
        seg = self._journal.seg
        active = seg.segment_id if seg else 1 << 62
        strip = requested(self.reader)
        rules = self.retention().rules
        if rules and seg is not None:
            strip |= expiring(self.reader, rules, self._clock_ms(), seg.first_seq - 1)
        return self._compactor.segments_holding(strip, active, self._journal.visible)

    def compaction_prepare(self, segment_id: int, strip: set[int]) -> CompactCopy | None:
        """Write one segment's compacted copy beside it (the slow part: any thread)."""
        return self._compactor.prepare(segment_id, strip)

    def compaction_swap(self, prepared: CompactCopy) -> Swapped:
        """Swap a prepared copy in (the thread that writes records.idx: the engine's owner)."""
        self._check_open()
        return self._compactor.swap(prepared)

    def compaction_abandon(self, prepared: CompactCopy) -> None:
        """Delete a prepared copy that will not be swapped in."""
        self._compactor.abandon(prepared)

    def compact(self) -> CompactReport:
        """Rewrite every sealed segment holding an event whose payload must go, with a
        stub in its place, and swap each in (``_storage/compaction.py``)."""
        started = time.perf_counter()
        segments = events = reclaimed = 0
        for sid, strip in sorted(self.compaction_plan().items()):
            prepared = self.compaction_prepare(sid, strip)
            if prepared is None:
                continue
            done = self.compaction_swap(prepared)
            segments += 1
            events += len(done.stubbed)
            reclaimed += done.bytes_removed
        return CompactReport(segments, events, reclaimed, round((time.perf_counter() - started) * 1000, 2))

    def _segment_swapped(self, segment_id: int) -> None:
        reader = getattr(self, "reader", None)
        if reader is not None:
            reader.forget_segments()  # its mapping of the old file goes; the file's space with it

    def enable_encryption(self, entity_prefixes: Sequence[str]) -> None:
        """Encrypt the payloads of entities starting with any of ``entity_prefixes`` from
        now on, each under a data key of its own wrapped by the master key
        (``BATPAK_MP_MASTER_KEY_FILE``); ``MasterKeyError`` without one."""
        self._check_open()
        self._encryption.enable(entity_prefixes)
        self._encryption.register(self.store_tag, self.inherited)
        self._journal.cipher = self._encryption.apply

    def shred(self, entity: str) -> Receipt:
        """Destroy ``entity``'s data key: its payloads read as shredded everywhere from
        now on (backups taken afterwards too); the chain and ``bp.verify`` still pass."""
        self._check_open()
        check_name("entity", entity)
        if self._encryption.ring is None:
            raise InvalidArgument("entity", entity, "this store encrypts no payloads: there is no key to shred")
        item = BatchItem(Coordinate(SHRED_ENTITY, "system"), Kind(CATEGORY_SYSTEM, SYSTEM_SHRED), shred_payload(entity))
        return self._commit_one(prepare_items([item], max_payload=self.config.max_payload_bytes, store_kinds=True))[0]
