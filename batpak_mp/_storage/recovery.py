"""Recovery at open: from the files on disk to an active segment and a last sequence.

Owns: reading the durable checkpoint; the full recovery (every sealed segment's
checksum and footer checked and its records adopted, every unsealed segment scanned,
its torn tail zeroed, a segment left unsealed by a crash sealed now, a seal torn by a
power cut (trailer on disk, footer not, every frame whole) finished, a newest file whose
header never landed dropped); the same-boot fast path (after a process crash the page
cache still holds what the last writer wrote: trust the index files through the
checkpoint and scan only the active segment's tail); and the checksum stamps of sealed
segments checked in this boot (``verified.tbl``), which let a same-boot restart skip
re-reading those unchanged since.
Invariants: nothing at or below the durable floor (checkpoint, or the caller's hint) is
ever cut: damage there is ``CorruptSegment``, raised before anything is zeroed; a frame
of a newer format is ``FutureFormat``, never cut; a torn seal is never corruption, and a
failed seal check with a damaged frame below the footer always is; the fast path only
ever declines (the full recovery then decides and reports), it never guesses. Sealed
segments are never modified (a torn seal is not a seal: it is finished).
Every OS call goes through ``osio.Disk``. Must not import the engine, the read side or
any process role.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .._errors import CorruptSegment, FutureFormat
from .._format.checkpoint import Checkpoint, decode_checkpoint
from .._format.directory import VERIFIED_FILE
from .._format.frame import BAD, EMPTY, FRAME_VERSION, NEED_MORE
from .._format.scan import ScannedFrame, SegmentScan
from .._format.segment import SEG_HEADER_SIZE, SEG_TRAILER_SIZE, Trailer, sealed_verdict
from .._native import scan_segment  # the active codec: C when built, else _format.scan's
from .indexfiles import IndexFiles
from .osio import Disk
from .segments import ActiveSegment, OpenedSegment, SegmentFiles


def read_checkpoint(disk: Disk, path: str) -> Checkpoint | None:
    """The durable checkpoint, None when there is none; a damaged one is corruption
    (it is written whole, by rename)."""
    raw = disk.read_file(path)
    if raw is None:
        return None
    ckpt = decode_checkpoint(raw)
    if ckpt is None:
        raise CorruptSegment(path, 0, "the durable checkpoint is damaged (it is written whole, by rename)")
    return ckpt


class Stamps:
    """Sealed segments whose whole-file checksum was checked in this boot, with the
    (inode, mtime, size) they had then. A same-boot restart skips re-reading those
    that are unchanged: any write through the file system changes the mtime (and
    forces the check); damage below it cannot reach readers through a page cache
    that still holds the checked bytes. A reboot checks everything again."""

    def __init__(self, disk: Disk, idx_dir: str, boot_id: bytes) -> None:
        self.disk = disk
        self.path = os.path.join(idx_dir, VERIFIED_FILE)
        self.boot_id = boot_id  # zeros: unknown, nothing is ever skipped
        self._stamps: dict[int, tuple[int, ...]] = {}  # segment id -> (inode, mtime_ns, size)
        self._dirty = False

    def same_boot(self, boot_id: bytes) -> bool:
        return any(self.boot_id) and boot_id == self.boot_id

    def load(self) -> None:
        raw = self.disk.read_file(self.path)
        self._stamps = {}
        try:
            doc = msgpack.unpackb(raw, strict_map_key=False) if raw else None
            if isinstance(doc, dict) and self.same_boot(doc.get("boot", b"")):
                self._stamps = {int(k): tuple(v) for k, v in doc["stamps"].items()}
        except Exception:  # derived data: unreadable means "check everything"
            self._stamps = {}
        self._dirty = False

    def stamp(self, segment_id: int, st: os.stat_result) -> None:
        self._stamps[segment_id] = (st.st_ino, st.st_mtime_ns, st.st_size)
        self._dirty = True

    def unchanged(self, segment_id: int, st: os.stat_result) -> bool:
        """Checked in this boot and not written since."""
        return self._stamps.get(segment_id) == (st.st_ino, st.st_mtime_ns, st.st_size)

    def save(self) -> None:
        if self._dirty and any(self.boot_id):
            doc = {"boot": self.boot_id, "stamps": {sid: list(v) for sid, v in self._stamps.items()}}
            self.disk.write_file_atomic(self.path, msgpack.packb(doc))
            self._dirty = False


@dataclass
class Recovered:
    """What recovery leaves: the active segment (open) and the last sequence kept."""

    active: ActiveSegment
    last_seq: int  # visible and durable
    fresh_delta: list[ScannedFrame] | None  # the active segment's frames for a fresh delta table;
    # None: the existing delta table was mapped again (same boot)
    report: dict[str, Any]


@dataclass
class _Walk:
    """The full recovery's progress through the segments, oldest first."""

    next_seq: int = 1
    sealed: list[int] = field(default_factory=list)
    cut_bytes: int = 0
    active: ActiveSegment | None = None
    scanned: list[ScannedFrame] = field(default_factory=list)


def _refuse_future(scan: SegmentScan, path: str) -> None:
    """A whole frame from a newer writer: never cut what we cannot read."""
    if scan.stop_status == BAD and scan.stop_reason.startswith("future frame version"):
        raise FutureFormat(path, int(scan.stop_reason.rsplit(" ", 1)[1]), FRAME_VERSION)


class Recovery:
    """One recovery of a locked data directory. ``seal`` seals a segment a crash left
    unsealed before the last one (the engine's seal, so both paths stamp alike)."""

    def __init__(self, segments: SegmentFiles, index: IndexFiles, stamps: Stamps, segment_max_bytes: int,
                 seal: Callable[[ActiveSegment], None]) -> None:
        self.segments = segments
        self.disk = segments.disk
        self.index = index
        self.stamps = stamps
        self.segment_max_bytes = segment_max_bytes
        self.seal = seal

    def run(self, ckpt: Checkpoint | None, floor: int, *, full: bool = False) -> Recovered:
        """Recover; nothing at or below ``floor`` may be missing. ``full``: skip the
        same-boot path (a compaction's swap was cut short: records.idx may not match a
        segment, and only the full recovery copies every seal footer into it)."""
        if not full and ckpt is not None and self.stamps.same_boot(ckpt.boot_id) and self.index.records_trusted:
            try:
                done = self._same_boot(ckpt, floor)
                if done is not None:
                    return done
            except CorruptSegment:
                pass  # anything unexpected: the full recovery decides, and reports
        return self._full(floor)

    # -- the full recovery ----------------------------------------------------------------
    def _full(self, floor: int) -> Recovered:
        segs, d = self.segments, self.disk
        ids = segs.ids()
        if ids and segs.drop_unborn(ids[-1]):
            ids.pop()
        walk = _Walk()
        try:
            for pos, sid in enumerate(ids):
                self._walk_segment(walk, sid, pos == len(ids) - 1, floor)
            last = walk.next_seq - 1
            if last < floor:
                raise CorruptSegment(segs.dir, 0, f"log ends at sequence {last}, but sequence {floor} was durable")
            # the base tables cover the sealed segments only (the active one is in the delta)
            active = walk.active
            self.index.open_bases(walk.sealed[-1] if walk.sealed else 0, active.first_seq - 1 if active else last)
            if active is None:
                walk.scanned = []
                walk.active = active = segs.create((ids[-1] + 1) if ids else 1, walk.next_seq, self.segment_max_bytes)
            else:
                d.fdatasync(active.fd, active.path)  # what recovery keeps is now on disk
        except BaseException:
            if walk.active is not None:
                d.close_quietly(walk.active.fd, walk.active.path)
            raise
        report = {"sealed_segments": len(walk.sealed), "active_segment": active.segment_id, "last_sequence": last,
                  "torn_bytes_cut": walk.cut_bytes, "active_frames_scanned": len(walk.scanned)}
        return Recovered(active, last, walk.scanned, report)

    def _walk_segment(self, walk: _Walk, sid: int, is_last: bool, floor: int) -> None:
        segs = self.segments
        seg = segs.open(sid, os.O_RDWR)
        try:
            verdict = segs.judge(seg, first_seq=walk.next_seq)
            header, trailer = verdict.header, verdict.trailer
            if trailer is None:
                self._walk_unsealed(walk, sid, seg, header.first_seq, floor, seal=not is_last)
                return
            try:  # sealed: check it whole, and make records.idx agree with its footer
                records = segs.check_sealed(seg, trailer, footer=True)
            except CorruptSegment as damage:
                if not self._footer_torn(seg, trailer, walk.next_seq):
                    raise
                # a power cut tore the seal (the trailer on disk, not all of its footer):
                # finish it from the frames, which are all whole. The floor is checked only
                # when nothing follows: otherwise the segments after it carry the log on.
                self._walk_unsealed(walk, sid, seg, header.first_seq, floor if is_last else 0, seal=True,
                                    torn=(trailer, damage))
                return
            walk.next_seq += self.index.adopt_records(walk.next_seq, records)
            self.stamps.stamp(sid, seg.stat)
            walk.sealed.append(sid)
        finally:
            if walk.active is None or walk.active.fd != seg.fd:
                self.disk.close_quietly(seg.fd, seg.path)

    def _footer_torn(self, seg: OpenedSegment, trailer: Trailer, first_seq: int) -> bool:
        """Whether a sealed segment whose check failed may hold a torn seal: its footer
        does not verify while the frames from the header up to the footer's offset are
        all whole, in sequence from ``first_seq``, and end with a whole commit. (Whether
        the seal rebuilt from them is the one the trailer names is checked next.)"""
        mm = self.disk.map_shared(seg.fd, seg.size, seg.path, writable=False)
        try:
            if not sealed_verdict(seg.path, mm, trailer, checksum=False).problems:
                return False  # the footer is whole: what failed is damage, not a torn seal
            scan = scan_segment(mm, SEG_HEADER_SIZE, trailer.footer_offset, first_seq)
        finally:
            mm.close()
        return (scan.stop_status == EMPTY and scan.stop_offset == scan.commit_end == trailer.footer_offset
                and scan.committed == len(scan.frames))

    def _walk_unsealed(self, walk: _Walk, sid: int, seg: OpenedSegment, first_seq: int, floor: int, *, seal: bool,
                       torn: tuple[Trailer, CorruptSegment] | None = None) -> None:
        """Scan an unsealed segment (its first events link back into the base tables),
        cut its torn tail, and ``seal`` it (a segment before the last, or one whose seal
        was ``torn``: its frames end at the trailer's footer offset) or make it the
        active one. A torn seal is finished only when the seal rebuilt from the frames is
        the one its trailer names, sector by sector; else its ``CorruptSegment`` stands."""
        d, idx, size = self.disk, self.index, seg.size
        idx.open_bases(walk.sealed[-1] if walk.sealed else 0, walk.next_seq - 1)
        mm = d.map_shared(seg.fd, size, seg.path, writable=False)
        try:
            scan = scan_segment(mm, SEG_HEADER_SIZE, torn[0].footer_offset if torn else size - SEG_TRAILER_SIZE,
                                walk.next_seq)
        finally:
            mm.close()
        kept = scan.frames[: scan.committed]
        last_kept = walk.next_seq + len(kept) - 1
        _refuse_future(scan, seg.path)
        if scan.damage_mid_log or (scan.stop_status in (BAD, NEED_MORE) and last_kept < floor):
            raise CorruptSegment(seg.path, scan.stop_offset, scan.stop_reason)
        if last_kept < floor:  # checked before anything is zeroed: keep the evidence
            raise CorruptSegment(seg.path, scan.commit_end, f"log ends at sequence {last_kept}, "
                                 f"but sequence {floor} was durable")
        idx.write_scanned(sid, kept)
        if torn is not None and not self.segments.seal_matches(seg, torn[0], first_seq,
                                                               idx.records_of(first_seq, len(kept))):
            raise torn[1]
        cut = scan.commit_end
        # bytes past the last commit: a torn tail, or never written; and the last 32 bytes,
        # which hold no valid trailer (or the torn seal's, written again below). Zero them
        # without shrinking the file (it may be mapped), keeping them allocated, so stale
        # frames can never come back.
        d.zero_range(seg.fd, cut, size - cut, seg.path)
        walk.cut_bytes += max(scan.stop_offset - cut, 0)
        active = ActiveSegment(sid, first_seq, size, seg.fd, seg.path, cut, len(kept))
        active.crc = active.write_crc = self.segments.frames_crc(seg.fd, seg.path, cut)
        walk.next_seq += len(kept)
        walk.scanned = kept
        if not seal:
            walk.active = active
            return
        # a crash between a segment's last commit and its seal, or during the seal: seal it now
        d.fdatasync(seg.fd, seg.path)
        self.seal(active)
        walk.sealed.append(sid)
        idx.build_bases(sid, walk.next_seq - 1)

    # -- the same-boot fast path ----------------------------------------------------------
    def _same_boot(self, ckpt: Checkpoint, floor: int) -> Recovered | None:
        """Restart after a process crash in the same boot: the page cache still holds what
        the last writer wrote, and it wrote records and table slots only for frames that
        were whole (after their write returned). So trust the index files through the
        checkpoint's visible sequence and scan only the active segment's tail. Sealed
        segments are still checksummed whole (a flipped bit in one is always reported
        by open) unless stamped in this boot; their footers and the base tables are not
        re-read. Returns None when anything does not line up."""
        segs = self.segments
        ids = segs.ids()
        if not ids or ids[-1] != ckpt.segment_id or ckpt.visible < ckpt.seq:
            return None
        sealed = ids[:-1]
        if ckpt.base_segment != (sealed[-1] if sealed else 0) or not ckpt.delta_gen:
            return None
        for sid in sealed:
            self._check_sealed_checksum(sid)
        seg = segs.open(ckpt.segment_id, os.O_RDWR)
        done = None
        try:
            done = self._resume_active(seg, ckpt, floor, len(sealed))
        finally:
            if done is None:
                self.disk.close_quietly(seg.fd, seg.path)
        return done

    def _resume_active(self, seg: OpenedSegment, ckpt: Checkpoint, floor: int, sealed: int) -> Recovered | None:
        d, idx, size = self.disk, self.index, seg.size
        verdict = self.segments.judge(seg, first_seq=None)
        header, trailer = verdict.header, verdict.trailer
        if ckpt.end_offset > size - SEG_TRAILER_SIZE or trailer is not None:
            return None
        first, trusted = header.first_seq, ckpt.visible
        if trusted < first - 1 or not idx.holds_records_through(trusted) or not idx.map_delta(ckpt.delta_gen):
            return None
        try:
            idx.open_bases(ckpt.base_segment, first - 1, verify=False)
        except CorruptSegment:
            return None
        mm = d.map_shared(seg.fd, size, seg.path, writable=False)
        try:
            if zlib.crc32(memoryview(mm)[SEG_HEADER_SIZE:ckpt.end_offset]) != ckpt.frames_crc:
                raise CorruptSegment(seg.path, SEG_HEADER_SIZE, "a byte below the checkpoint changed (frames "
                                     "checksum mismatch)")
            if trusted >= first and not idx.record_matches_frame(mm, trusted, ckpt.segment_id):
                return None
            scan = scan_segment(mm, ckpt.end_offset, size - SEG_TRAILER_SIZE, trusted + 1)
            tail_crc = zlib.crc32(memoryview(mm)[ckpt.end_offset:scan.commit_end], ckpt.frames_crc)
        finally:
            mm.close()
        kept = scan.frames[: scan.committed]
        last = trusted + len(kept)
        _refuse_future(scan, seg.path)
        if scan.damage_mid_log or last < floor:
            return None  # let the full recovery judge it (and report it)
        d.zero_range(seg.fd, scan.commit_end, size - SEG_TRAILER_SIZE - scan.commit_end, seg.path)
        active = ActiveSegment(ckpt.segment_id, first, size, seg.fd, seg.path, scan.commit_end, last - first + 1,
                               tail_crc)
        idx.write_scanned(ckpt.segment_id, kept)  # the tail's records need heads below it
        idx.resume_delta(first, trusted, kept)  # the writer's view of the active segment: keys and slots
        d.fdatasync(seg.fd, seg.path)
        report = {"sealed_segments": sealed, "active_segment": ckpt.segment_id, "last_sequence": last,
                  "torn_bytes_cut": max(scan.stop_offset - scan.commit_end, 0), "active_frames_scanned": len(kept),
                  "same_boot": True}
        return Recovered(active, last, None, report)

    def _check_sealed_checksum(self, sid: int) -> None:
        segs = self.segments
        seg = segs.open(sid, os.O_RDONLY)
        try:
            if self.stamps.unchanged(sid, seg.stat):
                return  # checked in this boot and not written since
            trailer = segs.judge(seg, first_seq=None, unsealed_ok=False).trailer
            assert trailer is not None
            segs.check_sealed(seg, trailer, footer=False)
            self.stamps.stamp(sid, seg.stat)
        finally:
            self.disk.close_quietly(seg.fd, seg.path)
