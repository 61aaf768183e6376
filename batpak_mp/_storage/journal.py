"""The commit path of an open data directory: plan -> write -> fsync -> index -> publish.

Owns: the active segment while the engine runs, the groups written but not yet
published, the visible and durable frontiers, the poison of a failed fsync, rotation
(seal the full segment, fold it into the base tables, start the next one, tell the
writer, prune), the checkpoint, and the answers planning needs about the written log.
``Engine`` opens the directory, recovers it and hands the result to ``start``; the
writer's pipeline drives ``commit(settle=False)``, ``pending_sync_target`` and
``publish_through`` through the engine.
Invariants: ``visible`` never passes a frame that recovery could cut (in the default
sync mode a group is published only after its fsync); groups are published in the
order they were written; a failed fsync poisons for good and the unacknowledged frames
are zeroed (best effort); a failed write takes back only its own group; a full disk
(``DiskFull``: no room for the group's records, a write, or the next segment) fails the
requests that meet it, nothing of them written, and the journal goes on.
Every OS call goes through ``osio.Disk``. Must not import the writer, the client, the
IPC layer or posix_ipc.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .._errors import BatpakError, StorageError, StorePoisoned
from .._format.checkpoint import encode_checkpoint
from .._format.directory import CHECKPOINT_FILE, name_hash
from .._format.frame import Frame
from .._prepare import Prepared
from .._read.reader import Reader, View
from .._signing import Signer
from .._values import Receipt, SyncMode
from .config import EngineConfig
from .fences import FenceTable
from .indexfiles import IndexFiles
from .osio import Disk
from .planning import (
    M_SEQ,
    BatchLimits,
    EntityState,
    Group,
    Lookups,
    Planner,
    fits,
    frame_in_group,
    new_entity,
    segment_bytes_for,
)
from .recovery import Recovered, Stamps
from .segments import ActiveSegment, SegmentFiles

Results = list[list[Receipt] | BatpakError]  # per request of a commit: its receipts, or its refusal


@dataclass
class _Pending:
    """A group written to the segment but not yet published (waiting for its fsync)."""

    group: Group
    results: Results
    placed: list[tuple[int, int, int]]  # (request index, first index in the group, count)
    start: int  # offset of its first frame
    end: int
    crc_after: int


class Journal:
    """The write path over an open, recovered directory (see the module docstring)."""

    def __init__(self, data_dir: str, config: EngineConfig, disk: Disk, clock_ms: Callable[[], int],
                 store_tag: int, signer: Signer | None, segments: SegmentFiles, index: IndexFiles,
                 fences: FenceTable, stamps: Stamps) -> None:
        self.config = config
        self.disk = disk
        self._clock_ms = clock_ms
        self._checkpoint_path = os.path.join(data_dir, CHECKPOINT_FILE)
        self.signer = signer
        self.segments = segments
        self.index = index
        self.fences = fences
        self.stamps = stamps
        self.reader: Reader | None = None  # attached once the directory is recovered
        self.seg: ActiveSegment | None = None
        self.poison: StorePoisoned | None = None
        self.visible = 0
        self.durable = 0
        self._last_sync_ms = 0
        self._pending: list[_Pending] = []  # groups written, waiting for the fsync that publishes them
        self.groups_written = self.groups_published = 0  # monotonic: the writer's pipeline counts on them
        self.index_listener: Callable[[], None] = lambda: None
        self.idem_window: Callable[[], int | None] = lambda: None  # ms a key deduplicates (the engine's retention)
        self.cipher: Callable[[Sequence[Prepared]], Sequence[Prepared]] | None = None  # the store encrypts payloads
        self.reader_stale = False  # a rotation failed before the reader mapped the index files it made
        self.planner = Planner(
            Lookups(self._published_state, self._idem_seq, self._receipt_of_written, self._frame_of_written),
            BatchLimits(config.max_batch_events, config.max_batch_bytes), store_tag,
            signer=signer, durable_receipts=config.sync is SyncMode.GROUP)

    def start(self, done: Recovered) -> None:
        """Take over what recovery left: the active segment and the last sequence."""
        self.seg = done.active
        self.visible = self.durable = done.last_seq
        self.planner.next_seq = done.last_seq + 1
        if done.fresh_delta is not None:
            self.index.new_delta(done.fresh_delta, self._segment_bytes())
            self.index.prune()
        self.write_checkpoint()
        self.stamps.save()

    def attach(self, reader: Reader) -> None:
        self.reader = reader

    def _idem_seq(self, idem: bytes) -> int:
        """The sequence an idempotency key was written under, unless its event is older
        than the retention's idempotency window (issue 13): a retry after the window is
        a new event. Looked at only on a hit (a retry), never on the plain path."""
        seq = self.index.idem_seq(idem)
        if seq and seq <= self.visible and self.reader is not None:
            window = self.idem_window()
            if window is not None and self._clock_ms() - self.reader.get_seq(seq).wall_ms > window:
                return 0
        return seq

    def view(self) -> View:
        """What readers may see: the visible frontier and the current index files."""
        return View(self.visible, self.index.base_segment, self.index.delta_gen, len(self.fences.revealed))

    def _publish_view(self) -> None:
        assert self.reader is not None
        self.reader.view = self.view()

    def release(self) -> None:
        if self.seg is not None:
            self.disk.close_quietly(self.seg.fd, self.seg.path)
        self.seg = None

    # ------------------------------------------------------------------ commit
    def commit(self, requests: Sequence[Sequence[Prepared]], fenced: Sequence[bool] | None = None, *,
               settle: bool = True) -> Results:
        """See ``Engine.commit``."""
        if self.reader_stale:
            self.refresh_reader()  # planning asks the reader for entity heads
        results: Results = [[] for _ in requests]
        plan = self.planner
        group = plan.group(self._clock_ms())
        placed: list[tuple[int, int, int]] = []  # (request index, first index in group, count)
        seg = self.seg
        assert seg is not None
        for ri, items in enumerate(requests):
            fence = fenced is not None and fenced[ri]
            start, before = group.count, group.nbytes
            try:
                if self.cipher is not None:  # payload encryption, shreds (issue 13: encryption.py)
                    items = self.cipher(items)
                originals = plan.plan(group, items, fence)
            except BatpakError as exc:
                results[ri] = exc
                continue
            if originals is not None:
                results[ri] = originals
                continue
            if seg.sealed or not fits(seg.end, seg.count, seg.size, group):
                # it does not fit: take it back out, write what fits, rotate, plan it again
                nbytes = group.nbytes - before
                plan.truncate(group, start)
                if group.count:
                    self._write(group, results, placed)
                    group, placed = plan.next_group(group), []
                try:
                    self._rotate(segment_bytes_for(nbytes, len(items)))
                except StorePoisoned:
                    raise
                except StorageError as exc:
                    # no next segment (a full disk, most often): this request and the rest
                    # fail with it, nothing of them written; the next commit rotates again
                    for rest in range(ri, len(requests)):
                        results[rest] = exc
                    break
                seg = self.seg
                assert seg is not None
                start = 0
                try:
                    plan.encode(group, items, fence)
                except BatpakError as exc:
                    results[ri] = exc
                    continue
            placed.append((ri, start, len(items)))
        if group.count:
            self._write(group, results, placed)
        if settle:
            self.settle()
        return results

    def _write(self, group: Group, results: Results, placed: list[tuple[int, int, int]]) -> None:
        """Write a group's frames after everything written so far. The in-memory view
        of entities and keys moves on at once (the next group builds on it); readers see
        nothing until ``publish_through``. A failed write takes only this group back."""
        seg = self.seg
        assert seg is not None
        data = group.data()
        try:
            # room for the group's records first (allocated: on a full disk this fails
            # here, before anything is written, not after the fsync when it is published)
            self.index.ensure_records(group.metas[-1][M_SEQ])
        except StorageError as exc:
            self._refuse_group(group, results, placed, exc)
            return
        try:
            self.disk.pwrite(seg.fd, data, seg.end, seg.path)
        except StorageError as exc:
            self._abandon_write(seg, len(data), group)
            self._refuse_group(group, results, placed, exc)
            return
        crc_after = zlib.crc32(data, seg.write_crc)
        self._pending.append(_Pending(group, results, list(placed), seg.end, seg.end + len(data), crc_after))
        self.groups_written += 1
        seg.end += len(data)
        seg.count += group.count
        seg.write_crc = crc_after
        self.planner.written(group)
        self.index.written(group.metas)

    def _abandon_write(self, seg: ActiveSegment, length: int, group: Group) -> None:
        """A write failed: zero what may have landed; if even that fails, poison (the
        segment's tail is unknown)."""
        try:
            self.disk.zero_range(seg.fd, seg.end, length, seg.path)
        except StorageError as exc:
            self.poison = StorePoisoned(exc.op, exc.path, exc.cause)

    def _refuse_group(self, group: Group, results: Results, placed: list[tuple[int, int, int]],
                      exc: StorageError) -> None:
        """A group that could not be written: forget it, and fail each of its requests."""
        self.planner.abandon(group)
        for ri, _, _ in placed:
            results[ri] = exc

    # ------------------------------------------------------------------ fsync and publish
    def settle(self) -> None:
        """fsync (as the sync mode says) and publish every written group."""
        if not self._pending:
            return
        seg = self.seg
        assert seg is not None
        now = self._clock_ms()
        synced = False
        if self.config.sync is SyncMode.GROUP or (
            self.config.sync is SyncMode.INTERVAL and now - self._last_sync_ms >= self.config.sync_interval_ms
        ):
            self._fsync_pending(seg)
            self._last_sync_ms = now
            synced = True
        self.publish_through(len(self._pending), synced)

    def _fsync_pending(self, seg: ActiveSegment) -> None:
        try:
            self._fsync(seg.fd, seg.path)
        except StorePoisoned:
            self._unwrite_pending(seg)
            raise

    def _unwrite_pending(self, seg: ActiveSegment) -> None:
        """Never acknowledged: best effort to keep these frames from coming back at recovery."""
        try:
            self.disk.zero_range(seg.fd, seg.pub_end, seg.end - seg.pub_end, seg.path)
        except StorageError:
            pass

    def _fsync(self, fd: int, path: str) -> None:
        try:
            self.disk.fdatasync(fd, path)
        except StorageError as exc:
            self.poison = StorePoisoned(exc.op, exc.path, exc.cause)
            raise self.poison from exc

    def pending_sync_target(self) -> tuple[int, str, int]:
        """See ``Engine.pending_sync_target``: the descriptor is a duplicate the caller
        owns (a rotation may close the segment's own before the fsync runs, and the number
        be reused by the next file)."""
        seg = self.seg
        assert seg is not None
        return self.disk.dup(seg.fd, seg.path), seg.path, len(self._pending)

    def sync_failed(self, exc: OSError, path: str) -> StorePoisoned:
        """See ``Engine.sync_failed``."""
        cause = exc.cause if isinstance(exc, StorageError) else exc
        self.poison = StorePoisoned("fsync", path, cause)
        if self.seg is not None:
            self._unwrite_pending(self.seg)
        return self.poison

    def publish_through(self, groups: int, synced: bool) -> None:
        """See ``Engine.publish_through``."""
        seg = self.seg
        assert seg is not None
        index = self.index
        sid = seg.segment_id
        for p in self._pending[:groups]:
            group = p.group
            last_seq = group.metas[-1][M_SEQ]
            index.index_group(group.metas, sid, p.start)
            seg.pub_end = p.end
            seg.crc = p.crc_after
            self.visible = last_seq
            if synced:
                self.durable = last_seq
            for ri, start, n in p.placed:
                p.results[ri] = group.receipts[start:start + n]
        del self._pending[:groups]
        self.groups_published += groups
        self.planner.trim(nothing_pending=not self._pending)
        self._publish_view()

    def sync(self) -> int:
        """fsync now; returns the durable frontier."""
        seg = self.seg
        assert seg is not None
        if self._pending:
            self._fsync_pending(seg)
            self.publish_through(len(self._pending), True)
        if self.durable < self.visible:
            self._fsync(seg.fd, seg.path)
            self._last_sync_ms = self._clock_ms()
            self.durable = self.visible
        return self.durable

    def tick(self) -> None:
        """Periodic duty for the interval sync mode: fsync when the interval passed."""
        if (self.config.sync is SyncMode.INTERVAL and self.durable < self.visible
                and self._clock_ms() - self._last_sync_ms >= self.config.sync_interval_ms):
            self.sync()

    def write_checkpoint(self) -> None:
        """Persist the durable floor recovery will hold the log to. When this fails (a
        full disk) the older checkpoint stays, whole: its floor is lower (damage above it
        would be taken for a torn tail rather than reported; the control block's durable
        still counts after a process crash), and the same-boot restart declines when it
        names another segment. The writer retries every second."""
        seg = self.seg
        if seg is None:
            return
        self.disk.write_file_atomic(self._checkpoint_path, encode_checkpoint(
            self.durable, seg.segment_id, seg.pub_end, self.visible, self.stamps.boot_id, self.index.delta_gen,
            self.index.base_segment, seg.crc))

    # ------------------------------------------------------------------ segments
    def _segment_bytes(self) -> int:
        """The most bytes a segment may span now (the delta table is sized for it)."""
        return max(self.config.segment_max_bytes, self.seg.size if self.seg else 0)

    def seal(self, seg: ActiveSegment) -> None:
        """Seal ``seg`` with the records of its frames (a failed fsync poisons)."""
        st = self.segments.seal(seg, self.index.records_of(seg.first_seq, seg.count), self._fsync)
        self.stamps.stamp(seg.segment_id, st)  # its checksum was just computed

    def _rotate(self, need_bytes: int) -> None:
        """Seal the active segment, fold it into the base tables, start the next one.
        The index files for the next segment are made (each step all or nothing) before
        the switch to it: a rotation that fails leaves the sealed segment active with a
        consistent index, and the next commit rotates again from where this one stopped."""
        self.settle()  # the footer lists every frame: all of them must be indexed first
        seg = self.seg
        assert seg is not None
        if not seg.sealed:  # sealed already when a previous rotation failed after sealing
            self.seal(seg)
        through = seg.next_seq - 1
        size = max(self.config.segment_max_bytes, need_bytes)
        self.index.build_bases(seg.segment_id, through)
        self.reader_stale = True  # from here the view may name index files the reader has not mapped
        self.index.open_bases(seg.segment_id, through)
        self.index.new_delta([], size)
        self.refresh_reader()
        self.seg = self.segments.next_after(seg, size)
        self.segments.retire(seg)
        try:
            self.stamps.save()
            self.write_checkpoint()
        except StorageError:
            pass  # the switch is done: these only speed up and tighten the next open (write_checkpoint)
        self.index_listener()  # the writer publishes the new tables before the old go
        self.index.prune()

    def refresh_reader(self) -> None:
        """Map the index files the view names (after a rotation changed them)."""
        assert self.reader is not None
        self.reader.refresh()
        self.reader_stale = False

    # ------------------------------------------------------------------ what planning asks
    def _published_state(self, entity: bytes) -> EntityState:
        """An entity's clock and head in the published log."""
        assert self.reader is not None
        head = self.reader.head_of(entity)
        if not head:
            return new_entity(entity)
        f = self.reader.frame(head)
        return EntityState(f.entity_clock, f.event_hash, head, name_hash(entity))

    def _receipt_of_written(self, seq: int) -> Receipt:
        """The receipt of a written event: in a group not yet published, or in the log."""
        for p in self._pending:
            metas = p.group.metas
            if metas[0][M_SEQ] <= seq <= metas[-1][M_SEQ]:
                return p.group.receipts[seq - metas[0][M_SEQ]]
        return self.receipt_for(seq)

    def _frame_of_written(self, seq: int) -> Frame | None:
        """The frame of a written event (the idempotency check): in a group not yet
        published, or in the log."""
        for p in self._pending:
            metas = p.group.metas
            if metas[0][M_SEQ] <= seq <= metas[-1][M_SEQ]:
                return frame_in_group(p.group, seq - metas[0][M_SEQ])
        assert self.reader is not None
        return self.reader.frame(seq)

    def receipt_for(self, seq: int) -> Receipt:
        """The receipt of a published event (signed when the engine signs)."""
        assert self.reader is not None
        f = self.reader.frame(seq)
        sig = None
        if self.signer is not None:
            sig = self.signer.sign(f.event_id, seq, f.entity, f.scope, f.entity_clock, f.event_hash, f.prev_hash,
                                   f.wall_ms)
        return Receipt(f.event_id, seq, f.entity.decode(), f.scope.decode(), f.entity_clock, f.event_hash,
                       f.prev_hash, f.wall_ms, seq <= self.durable, sig)
