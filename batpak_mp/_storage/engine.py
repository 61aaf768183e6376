"""The journal engine: the single owner of a data directory, in one process.

Owns: the lock, store.meta, recovery at open (full, or the same-boot fast path), segment
files (preallocated, rotated and sealed with an index footer), ``records.idx``, the delta
and base lookup tables, fences.tbl, the checkpoint, the commit path (validate -> encode
-> one write -> one fsync -> index -> publish; the fsync and publish may be deferred by
the writer's pipeline) and the durable/visible frontiers. The writer process wraps it; tests and
tools use it directly.
Invariants: ``visible`` never passes a frame that recovery could cut (in the default
sync mode it is published only after fsync); a failed fsync poisons the engine for
good; index files are derived data, rebuilt from segments when they disagree.
Must not import the writer, the client, the supervisor or posix_ipc.
"""

from __future__ import annotations

import os
import secrets
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from .._errors import (
    BatpakError,
    ConcurrencyConflict,
    CorruptSegment,
    FutureFormat,
    InvalidArgument,
    PayloadTooLarge,
    StorageError,
    StoreClosed,
    StoreLocked,
    StorePoisoned,
)
from .._format.checkpoint import Checkpoint, decode_checkpoint, encode_checkpoint
from .._format.directory import (
    CHECKPOINT_FILE,
    FENCES_FILE,
    FORMAT_VERSION,
    INDEX_DIR,
    LOCK_FILE,
    META_FILE,
    RECORDS_FILE,
    SEGMENT_DIR,
    VERIFIED_FILE,
    delta_name,
    entities_base_name,
    idem_base_name,
    name_hash,
    segment_name,
)
from .._format.fences import FENCE_RANGE, FENCES_HEADER, FENCES_MAGIC
from .._format.frame import (
    BAD,
    FLAG_COMMIT_END,
    FLAG_FENCED,
    FLAG_HAS_CAUSATION,
    FLAG_HAS_CORRELATION,
    FRAME_VERSION,
    MIN_FRAME,
    NEED_MORE,
    OK,
    ZERO_HASH,
    ZERO_ID,
    Frame,
    encode_parts,
    scan_frame,
)
from .._format.meta import decode_meta, encode_meta
from .._format.record import RECORD, RECORD_SIZE, RECORDS_HEADER_SIZE, encode_records_header, records_header_matches
from .._format.scan import ScannedFrame, scan_segment
from .._format.segment import (
    FOOTER_HEAD,
    SEG_HEADER_SIZE,
    SEG_TRAILER_SIZE,
    Trailer,
    decode_footer,
    decode_segment_header,
    decode_trailer,
    encode_footer,
    encode_segment_header,
    encode_trailer,
)
from .._format.tables import (
    DELTA_MAGIC,
    DELTA_SLOT_SIZE,
    ENTITY_BASE_MAGIC,
    IDEM_BASE_MAGIC,
    TABLE_HEADER_SIZE,
    BaseTable,
    check_header,
    delta_candidates,
    delta_capacity_for,
    delta_header,
    delta_upsert,
    encode_entity_base,
    encode_idem_base,
    verify_base,
)
from .._gates import Denial, bypass_audit_item, denial_payload, effect_item
from .._prepare import Prepared, prepare
from .._read.reader import Reader, View, map_readonly
from .._read.receipts import receipt_matches
from .._signing import Signer
from .._values import (
    CATEGORY_SYSTEM,
    EFFECT_DENIAL,
    FENCE_ENTITY,
    SYSTEM_FENCE_COMMIT,
    BatchItem,
    Coordinate,
    Event,
    Kind,
    Page,
    Receipt,
    SyncMode,
    payload_version_for,
)
from .osio import DEFAULT_DISK, Disk

MiB = 1 << 20
RECORDS_GROWTH = 1 << 16  # records.idx grows by this many records (4 MiB) at a time
_SENTINEL_FOOTER_ROOM = FOOTER_HEAD.size + SEG_TRAILER_SIZE
_u64 = struct.Struct("<Q")
_two_u64 = struct.Struct("<QQ")
_IDEM_OF_RECORD = struct.Struct("<48x16s")  # the idempotency hash at the end of an index record


@dataclass(frozen=True)
class EngineConfig:
    """Tunables of an engine (the writer takes the same ones from the command line)."""

    segment_max_bytes: int = 64 * MiB  # preallocated size of each segment file
    sync: SyncMode = SyncMode.GROUP
    sync_interval_ms: int = 100  # with SyncMode.INTERVAL: the longest a commit waits for fsync
    max_payload_bytes: int = 16 * MiB  # per event, encoded
    max_batch_events: int = 10_000
    max_batch_bytes: int = 256 * MiB  # encoded payloads of one batch
    signing_key: bytes | None = None  # raw 32-byte Ed25519 private key: receipts get signed

    def __post_init__(self) -> None:
        if not 1 * MiB <= self.segment_max_bytes <= 3 << 30:
            raise InvalidArgument("segment_max_bytes", self.segment_max_bytes, "must be 1 MiB .. 3 GiB")
        if not isinstance(self.sync, SyncMode):
            object.__setattr__(self, "sync", parse_sync(self.sync))
        if self.sync_interval_ms < 1:
            raise InvalidArgument("sync_interval_ms", self.sync_interval_ms, "must be >= 1")
        if not 1 <= self.max_payload_bytes <= 1 << 30:
            raise InvalidArgument("max_payload_bytes", self.max_payload_bytes, "must be 1 .. 1 GiB")


def parse_sync(value: object) -> SyncMode:
    try:
        return SyncMode(value)
    except ValueError:
        raise InvalidArgument("sync", value, "must be one of group, interval, none") from None


class _Entity(NamedTuple):
    clock: int
    head_hash: bytes
    head_seq: int
    name_hash: int  # cached: the index needs it for every event of the entity


@dataclass
class _Segment:
    segment_id: int
    first_seq: int
    size: int
    fd: int
    path: str
    end: int  # offset just past the last frame written (published or pending)
    count: int  # frames written in it
    crc: int = 0  # crc32 of the published bytes [64, pub_end): the checkpoint carries it
    sealed: bool = False  # footer and trailer written: nothing more may go in (a failed rotation retries)
    pub_end: int = -1  # offset just past the last published frame (-1: same as end)
    write_crc: int = -1  # crc32 of the written bytes [64, end) (-1: same as crc)

    def __post_init__(self) -> None:
        if self.pub_end < 0:
            self.pub_end = self.end
        if self.write_crc < 0:
            self.write_crc = self.crc


@dataclass
class _Pending:
    """A group written to the segment but not yet published (waiting for its fsync)."""

    group: _Group
    results: list[list[Receipt] | BatpakError]
    placed: list[tuple[int, int, int]]
    start: int  # offset of its first frame
    end: int
    crc_after: int


@dataclass
class _Group:
    """Frames of one commit group, not yet written."""

    parts: list[bytes] = field(default_factory=list)  # frame pieces, joined once at write
    nbytes: int = 0
    # per event: (seq, clock, kind, flags, frame_len, prev_seq, entity_hash, scope_hash, entity, idem)
    metas: list[tuple[Any, ...]] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    entities: dict[bytes, _Entity] = field(default_factory=dict)
    idem: dict[bytes, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.metas)


class Engine:
    """Single-owner journal engine. Open with ``Engine.open(data_dir)``."""

    def __init__(self) -> None:  # use Engine.open
        raise TypeError("use Engine.open(data_dir, ...)")

    # ------------------------------------------------------------------ open / close
    @classmethod
    def open(
        cls, data_dir: str | os.PathLike[str], config: EngineConfig | None = None, *,
        disk: Disk | None = None, clock_ms: Callable[[], int] | None = None,
        durable_hint: tuple[int, int] | None = None,
    ) -> Engine:
        """Lock, recover and open ``data_dir`` (created 0700 when missing).

        ``durable_hint``: (store key, sequence) known to have been durable, e.g. from the
        control block; applied only when the key is this store's. Damage at or below that
        sequence is corruption, never a torn tail."""
        self = object.__new__(cls)
        self._init(os.fspath(data_dir), config or EngineConfig(), disk or DEFAULT_DISK,
                   clock_ms or (lambda: time.time_ns() // 1_000_000), durable_hint)
        return self

    def _init(self, data_dir: str, config: EngineConfig, disk: Disk,
              clock_ms: Callable[[], int], durable_hint: tuple[int, int] | None) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.config = config
        self.disk = disk
        self._clock_ms = clock_ms
        self._closed = False
        self._poison: StorePoisoned | None = None
        self._lock_fd = -1
        self._seg: _Segment | None = None
        self._records_fd = -1
        self._records_map: Any = None
        self._delta_fd = -1
        self._delta_map: Any = None
        self._delta_cap = 0
        self._delta_gen = 0
        self._base_segment = 0
        self._base_maps: list[Any] = []
        self._entity_base: BaseTable | None = None
        self._idem_base: BaseTable | None = None
        self._entities: dict[bytes, _Entity] = {}
        self._idem_active: dict[bytes, int] = {}
        self._delta_slots: dict[bytes, int] = {}  # entity -> its slot offset in the delta table
        self._scope_hashes: dict[bytes, int] = {}
        self.visible = 0
        self.durable = 0
        self._last_sync_ms = 0
        self.signer = Signer(config.signing_key) if config.signing_key else None
        self.recovery_report: dict[str, Any] = {}
        self._boot_id = bytes(16)
        self._stamps: dict[int, tuple[int, ...]] = {}  # segment id -> (inode, mtime_ns, size) checked this boot
        self._stamps_dirty = False
        self._pending: list[_Pending] = []  # groups written, waiting for the fsync that publishes them
        self.groups_written = self.groups_published = 0  # monotonic: the writer's pipeline counts on them
        self.revealed: list[tuple[int, int]] = []  # committed fences' sequence ranges
        self.on_index_change: Callable[[], None] = lambda: None  # set by the writer: publish now
        self._seg_dir = os.path.join(self.data_dir, SEGMENT_DIR)
        self._idx_dir = os.path.join(self.data_dir, INDEX_DIR)
        try:
            self._lock()
            self._load_meta()
            self._recover(durable_hint)
        except BaseException:
            self._release()
            raise
        self.reader = Reader(self.data_dir, self.view)
        self.reader.refresh()
        self._rebuild_fences()

    def _lock(self) -> None:
        d = self.disk
        d.makedirs(self.data_dir)
        path = os.path.join(self.data_dir, LOCK_FILE)
        fd = d.open(path, os.O_RDWR | os.O_CREAT)
        if not d.try_lock(fd, path):
            try:
                holder = int(os.pread(fd, 32, 0).split(b"\n")[0] or 0)
            except (OSError, ValueError):
                holder = 0
            d.close(fd, path)
            raise StoreLocked(self.data_dir, holder or None)
        self._lock_fd = fd
        d.truncate(fd, 0, path)
        d.pwrite(fd, f"{os.getpid()}\n".encode(), 0, path)
        d.makedirs(self._seg_dir)
        d.makedirs(self._idx_dir)

    def _load_meta(self) -> None:
        path = os.path.join(self.data_dir, META_FILE)
        raw = self.disk.read_file(path)
        if raw is None:
            if self.disk.listdir(self._seg_dir):
                raise CorruptSegment(path, 0, "store.meta is missing but segments exist")
            self.store_id = secrets.token_bytes(16)
            self.disk.write_file_atomic(path, encode_meta(self.store_id, self._clock_ms()))
        else:
            self.store_id = decode_meta(raw, path)
        self.store_tag = int.from_bytes(self.store_id[:2], "big")  # in every event id
        self.store_key = int.from_bytes(self.store_id[:8], "little") or 1  # in the control block

    # ------------------------------------------------------------------ recovery
    def _segment_ids(self) -> list[int]:
        ids = []
        for name in self.disk.listdir(self._seg_dir):
            if name.endswith(".seg") and name[:-4].isdigit():
                ids.append(int(name[:-4]))
        return sorted(ids)

    def _recover(self, durable_hint: tuple[int, int] | None) -> None:
        d = self.disk
        started = time.perf_counter()
        ckpt_raw = d.read_file(os.path.join(self.data_dir, CHECKPOINT_FILE))
        ckpt = decode_checkpoint(ckpt_raw) if ckpt_raw is not None else None
        if ckpt_raw is not None and ckpt is None:
            raise CorruptSegment(os.path.join(self.data_dir, CHECKPOINT_FILE), 0,
                                 "the durable checkpoint is damaged (it is written whole, by rename)")
        hint = durable_hint[1] if durable_hint and durable_hint[0] == self.store_key else 0
        floor = max(hint, ckpt[0] if ckpt else 0)
        self._open_records()
        self._boot_id = self.disk.boot_id()
        self._load_stamps()
        if ckpt is not None and any(self._boot_id) and ckpt.boot_id == self._boot_id and self._records_trusted:
            try:
                if self._recover_same_boot(ckpt, floor, started):
                    return
            except CorruptSegment:
                pass  # anything unexpected: the full recovery decides, and reports
            self._seg = None
            self.visible = self.durable = 0
        ids = self._segment_ids()
        if ids and self._drop_unborn(ids[-1]):
            ids.pop()
        next_seq = 1
        sealed: list[int] = []
        cut_bytes = 0
        active: _Segment | None = None
        scanned: list[ScannedFrame] = []
        for pos, sid in enumerate(ids):
            path = os.path.join(self._seg_dir, segment_name(sid))
            fd = d.open(path, os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                header = decode_segment_header(d.pread(fd, SEG_HEADER_SIZE, 0, path), path)
                if header.store_id != self.store_id:
                    raise CorruptSegment(path, 0, "segment belongs to another store")
                if header.first_seq != next_seq:
                    raise CorruptSegment(path, 0, f"segment starts at sequence {header.first_seq}, "
                                         f"expected {next_seq}")
                trailer = decode_trailer(d.pread(fd, SEG_TRAILER_SIZE, size - SEG_TRAILER_SIZE, path))
                if trailer is not None:
                    next_seq += self._adopt_sealed(fd, path, size, trailer, next_seq)
                    self._stamp(sid, os.fstat(fd))
                    sealed.append(sid)
                    continue
                # an unsealed segment: scan it (its first events link back into the base tables)
                self._open_bases(sealed[-1] if sealed else 0, next_seq - 1)
                mm = d.map_shared(fd, size, path, writable=False)
                try:
                    scan = scan_segment(mm, SEG_HEADER_SIZE, size - SEG_TRAILER_SIZE, next_seq)
                finally:
                    mm.close()
                kept = scan.frames[: scan.committed]
                last_kept = next_seq + len(kept) - 1
                is_last = pos == len(ids) - 1
                if scan.stop_status == BAD and scan.stop_reason.startswith("future frame version"):
                    # a whole frame from a newer writer: never cut what we cannot read
                    raise FutureFormat(path, int(scan.stop_reason.rsplit(" ", 1)[1]), FRAME_VERSION)
                if scan.damage_mid_log or (scan.stop_status in (BAD, NEED_MORE) and last_kept < floor):
                    raise CorruptSegment(path, scan.stop_offset, scan.stop_reason)
                if last_kept < floor:  # checked before anything is zeroed: keep the evidence
                    raise CorruptSegment(path, scan.commit_end, f"log ends at sequence {last_kept}, "
                                         f"but sequence {floor} was durable")
                cut = scan.commit_end
                # bytes past the last commit: a torn tail, or never written. Zero them without
                # shrinking the file (it may be mapped), so stale frames can never come back.
                d.zero_range(fd, cut, size - SEG_TRAILER_SIZE - cut, path)
                cut_bytes += max(scan.stop_offset - cut, 0)
                seg = _Segment(sid, header.first_seq, size, fd, path, cut, len(kept))
                seg.crc = seg.write_crc = self._frames_crc(fd, path, cut)
                self._write_scanned_records(seg, kept)
                next_seq += len(kept)
                scanned = kept
                if is_last:
                    active = seg
                    continue
                # a crash between a segment's last commit and its seal: seal it now
                d.fdatasync(fd, path)
                self._seal(seg)
                sealed.append(sid)
                self._build_bases(sid, next_seq - 1)
            finally:
                if active is None or active.fd != fd:
                    os.close(fd)
        if next_seq - 1 < floor:
            raise CorruptSegment(self._seg_dir, 0, f"log ends at sequence {next_seq - 1}, "
                                 f"but sequence {floor} was durable")
        self.visible = self.durable = next_seq - 1
        self._next_seq = next_seq
        # the base tables cover the sealed segments only (the active one is in the delta)
        self._open_bases(sealed[-1] if sealed else 0, active.first_seq - 1 if active else next_seq - 1)
        if active is None:
            active = self._create_segment((ids[-1] + 1) if ids else 1, next_seq, self.config.segment_max_bytes)
            scanned = []
        else:
            d.fdatasync(active.fd, active.path)  # what recovery keeps is now on disk
        self._seg = active
        self._new_delta(scanned)
        self._prune_index_files()
        self._write_checkpoint()
        self._save_stamps()
        self.recovery_report = {
            "sealed_segments": len(sealed), "active_segment": active.segment_id,
            "last_sequence": self.visible, "torn_bytes_cut": cut_bytes,
            "active_frames_scanned": len(scanned),
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    def _recover_same_boot(self, ckpt: Checkpoint, floor: int, started: float) -> bool:
        """Restart after a process crash in the same boot: the page cache still holds what
        the last writer wrote, and it wrote records and table slots only for frames that
        were whole (after their write returned). So trust the index files through the
        checkpoint's visible sequence and scan only the active segment's tail. Sealed
        segments are still checksummed whole (a flipped bit in one is always reported
        by open); their footers and the base tables are not re-read. Returns False when
        anything does not line up: the full recovery then runs."""
        d = self.disk
        ids = self._segment_ids()
        if not ids or ids[-1] != ckpt.segment_id or ckpt.visible < ckpt.seq:
            return False
        sealed = ids[:-1]
        if ckpt.base_segment != (sealed[-1] if sealed else 0) or not ckpt.delta_gen:
            return False
        for sid in sealed:
            self._check_sealed_checksum(sid)
        path = os.path.join(self._seg_dir, segment_name(ckpt.segment_id))
        fd = d.open(path, os.O_RDWR)
        adopted = False
        try:
            size = os.fstat(fd).st_size
            header = decode_segment_header(d.pread(fd, SEG_HEADER_SIZE, 0, path), path)
            if (header.store_id != self.store_id or ckpt.end_offset > size - SEG_TRAILER_SIZE
                    or decode_trailer(d.pread(fd, SEG_TRAILER_SIZE, size - SEG_TRAILER_SIZE, path)) is not None):
                return False
            first, trusted = header.first_seq, ckpt.visible
            if trusted < first - 1 or len(self._records_map) < RECORDS_HEADER_SIZE + trusted * RECORD_SIZE:
                return False
            if not self._map_delta_file(ckpt.delta_gen):
                return False
            through = first - 1
            try:
                self._open_bases(ckpt.base_segment, through, verify=False)
            except CorruptSegment:
                return False
            mm = d.map_shared(fd, size, path, writable=False)
            try:
                if zlib.crc32(memoryview(mm)[SEG_HEADER_SIZE:ckpt.end_offset]) != ckpt.frames_crc:
                    raise CorruptSegment(path, SEG_HEADER_SIZE, "a byte below the checkpoint changed (frames "
                                         "checksum mismatch)")
                if trusted >= first and not self._record_matches_frame(mm, trusted, ckpt.segment_id):
                    return False
                scan = scan_segment(mm, ckpt.end_offset, size - SEG_TRAILER_SIZE, trusted + 1)
                tail_crc = zlib.crc32(memoryview(mm)[ckpt.end_offset:scan.commit_end], ckpt.frames_crc)
            finally:
                mm.close()
            kept = scan.frames[: scan.committed]
            last = trusted + len(kept)
            if scan.stop_status == BAD and scan.stop_reason.startswith("future frame version"):
                raise FutureFormat(path, int(scan.stop_reason.rsplit(" ", 1)[1]), FRAME_VERSION)
            if scan.damage_mid_log or last < floor:
                return False  # let the full recovery judge it (and report it)
            d.zero_range(fd, scan.commit_end, size - SEG_TRAILER_SIZE - scan.commit_end, path)
            count = last - first + 1
            seg = _Segment(ckpt.segment_id, first, size, fd, path, scan.commit_end, count, tail_crc)
            self._next_seq = last + 1
            self.visible = self.durable = trusted  # the tail's records need heads below it
            self._write_scanned_records(seg, kept)
            # the writer's in-memory view of the active segment: keys and table slots
            start = RECORDS_HEADER_SIZE + (first - 1) * RECORD_SIZE
            keys = self._records_map[start:start + (trusted - first + 1) * RECORD_SIZE]
            self._idem_active = {k: first + i for i, (k,) in enumerate(_IDEM_OF_RECORD.iter_unpack(keys))
                                 if k != ZERO_ID}
            self._delta_slots = {}
            for f in kept:
                prev = RECORD.unpack_from(self._records_map, RECORDS_HEADER_SIZE + (f.seq - 1) * RECORD_SIZE)[8]
                delta_upsert(self._delta_map, self._delta_cap, name_hash(f.entity), f.seq, prev)
                if f.idem_hash != ZERO_ID:
                    self._idem_active[f.idem_hash] = f.seq
            d.fdatasync(fd, path)
            self._seg = seg
            self.visible = self.durable = last
            adopted = True
        finally:
            if not adopted:
                os.close(fd)
        self._write_checkpoint()
        self._save_stamps()
        self.recovery_report = {
            "sealed_segments": len(sealed), "active_segment": seg.segment_id, "last_sequence": self.visible,
            "torn_bytes_cut": max(scan.stop_offset - scan.commit_end, 0), "active_frames_scanned": len(kept),
            "same_boot": True, "elapsed_ms": round((time.perf_counter() - started) * 1000, 2),
        }
        return True

    # -- sealed segments checked in this boot ----------------------------------------------
    def _load_stamps(self) -> None:
        """Sealed segments whose whole-file checksum was checked in this boot, with the
        (inode, mtime, size) they had then. A same-boot restart skips re-reading those
        that are unchanged: any write through the file system changes the mtime (and
        forces the check); damage below it cannot reach readers through a page cache
        that still holds the checked bytes. A reboot checks everything again."""
        raw = self.disk.read_file(os.path.join(self._idx_dir, VERIFIED_FILE))
        self._stamps = {}
        try:
            doc = msgpack.unpackb(raw, strict_map_key=False) if raw else None
            if isinstance(doc, dict) and doc.get("boot") == self._boot_id and any(self._boot_id):
                self._stamps = {int(k): tuple(v) for k, v in doc["stamps"].items()}
        except Exception:  # derived data: unreadable means "check everything"
            self._stamps = {}
        self._stamps_dirty = False

    def _stamp(self, sid: int, st: os.stat_result) -> None:
        self._stamps[sid] = (st.st_ino, st.st_mtime_ns, st.st_size)
        self._stamps_dirty = True

    def _save_stamps(self) -> None:
        if self._stamps_dirty and any(self._boot_id):
            doc = {"boot": self._boot_id, "stamps": {sid: list(v) for sid, v in self._stamps.items()}}
            self.disk.write_file_atomic(os.path.join(self._idx_dir, VERIFIED_FILE), msgpack.packb(doc))
            self._stamps_dirty = False

    def _check_sealed_checksum(self, sid: int) -> None:
        path = os.path.join(self._seg_dir, segment_name(sid))
        fd = self.disk.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            size = st.st_size
            if self._stamps.get(sid) == (st.st_ino, st.st_mtime_ns, size):
                return  # checked in this boot and not written since
            header = decode_segment_header(self.disk.pread(fd, SEG_HEADER_SIZE, 0, path), path)
            if header.store_id != self.store_id:
                raise CorruptSegment(path, 0, "segment belongs to another store")
            trailer = decode_trailer(self.disk.pread(fd, SEG_TRAILER_SIZE, size - SEG_TRAILER_SIZE, path))
            if trailer is None:
                raise CorruptSegment(path, size - SEG_TRAILER_SIZE, "segment before the last is not sealed")
            body = self.disk.map_shared(fd, size, path, writable=False)
            try:
                if zlib.crc32(memoryview(body)[: size - SEG_TRAILER_SIZE]) != trailer.segment_crc:
                    raise CorruptSegment(path, 0, "sealed segment checksum mismatch (a byte changed after sealing)")
            finally:
                body.close()
            self._stamp(sid, st)
        finally:
            os.close(fd)

    def _frames_crc(self, fd: int, path: str, end: int) -> int:
        if end <= SEG_HEADER_SIZE:
            return 0
        mm = self.disk.map_shared(fd, end, path, writable=False)
        try:
            return zlib.crc32(memoryview(mm)[SEG_HEADER_SIZE:end])
        finally:
            mm.close()

    def _record_matches_frame(self, mm: Any, seq: int, segment_id: int) -> bool:
        rec = RECORD.unpack_from(self._records_map, RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE)
        if rec[1] != segment_id:
            return False
        status, frame = scan_frame(mm, rec[2], rec[2] + rec[3])
        return status == OK and isinstance(frame, Frame) and frame.global_sequence == seq

    def _map_delta_file(self, generation: int) -> bool:
        """Map an existing delta table for writing (the same-boot restart path)."""
        path = os.path.join(self._idx_dir, delta_name(generation))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            size = os.fstat(fd).st_size
            m = self.disk.map_shared(fd, size, path, writable=True)
            cap, _, gen, _ = check_header(m, DELTA_MAGIC, path)
            if gen != generation or size != TABLE_HEADER_SIZE + cap * DELTA_SLOT_SIZE:
                m.close()
                os.close(fd)
                return False
        except (BatpakError, ValueError):
            os.close(fd)
            return False
        self._delta_fd, self._delta_map, self._delta_cap, self._delta_gen = fd, m, cap, generation
        return True

    def _drop_unborn(self, sid: int) -> bool:
        """A kill while a segment was being created (rotation) can leave the newest file
        empty or all zeros: its header is fsynced before any frame goes in, so it holds no
        event. Remove it (True); a file with any non-zero byte is left to the checks."""
        d = self.disk
        path = os.path.join(self._seg_dir, segment_name(sid))
        fd = d.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            off = 0
            while off < size:
                chunk = d.pread(fd, min(MiB, size - off), off, path)
                if not chunk:
                    break
                if chunk.count(0) != len(chunk):
                    return False
                off += len(chunk)
        finally:
            os.close(fd)
        d.unlink(path)
        d.fsync_dir(self._seg_dir)
        return True

    def _adopt_sealed(self, fd: int, path: str, size: int, trailer: Trailer, first_seq: int) -> int:
        """Check a sealed segment (whole-file checksum, footer) and make records.idx agree
        with its footer. Returns how many events it holds. No frame is decoded."""
        body = self.disk.map_shared(fd, size, path, writable=False)
        try:
            if zlib.crc32(memoryview(body)[: size - SEG_TRAILER_SIZE]) != trailer.segment_crc:
                raise CorruptSegment(path, 0, "sealed segment checksum mismatch (a byte changed after sealing)")
            foff, flen = trailer.footer_offset, trailer.footer_len
            _, records = decode_footer(bytes(body[foff:foff + flen]), path, foff)
        finally:
            body.close()
        count = len(records) // RECORD_SIZE
        self._ensure_records(first_seq + count)
        start = RECORDS_HEADER_SIZE + (first_seq - 1) * RECORD_SIZE
        if self._records_map[start:start + len(records)] != records:
            self._records_map[start:start + len(records)] = records
        return count

    def _write_scanned_records(self, seg: _Segment, frames: list[ScannedFrame]) -> None:
        """Rebuild the index records of a scanned (unsealed) segment."""
        if not frames:
            return
        self._ensure_records(frames[-1].seq)
        last_in_entity: dict[bytes, int] = {}
        pack = RECORD.pack_into
        m = self._records_map
        for f in frames:
            prev = last_in_entity.get(f.entity)
            if prev is None:
                prev = self._head_before(f.entity, f.prev_hash, f.clock) if f.clock > 1 else 0
            last_in_entity[f.entity] = f.seq
            pack(m, RECORDS_HEADER_SIZE + (f.seq - 1) * RECORD_SIZE, f.clock, seg.segment_id,
                 f.offset, f.frame_len, f.kind, f.flags, name_hash(f.entity), name_hash(f.scope),
                 prev, f.idem_hash)

    def _head_before(self, entity: bytes, prev_hash: bytes, clock: int) -> int:
        """Sequence of an entity's event with clock ``clock - 1``, found through the lookup
        tables (the delta, when recovery kept it, then the base) and the records' back
        links. The index records below the scanned frames are trusted here."""
        h = name_hash(entity)
        candidates: list[int] = []
        if self._delta_map is not None:
            candidates += delta_candidates(self._delta_map, self._delta_cap, h)
        if self._entity_base is not None:
            candidates += self._entity_base.entity_candidates(h)
        for seq in candidates:
            while seq:
                rec = RECORD.unpack_from(self._records_map, RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE)
                if rec[6] != h or rec[0] < clock - 1:
                    break
                if rec[0] == clock - 1:
                    return seq
                seq = rec[8]
        raise CorruptSegment(self._seg_dir, 0, f"predecessor of entity {entity!r} clock {clock} not found")

    # ------------------------------------------------------------------ index files
    def _open_records(self) -> None:
        path = os.path.join(self._idx_dir, RECORDS_FILE)
        self._records_path = path
        self._records_fd = self.disk.open(path, os.O_RDWR | os.O_CREAT)
        size = os.fstat(self._records_fd).st_size
        if size < RECORDS_HEADER_SIZE + RECORDS_GROWTH * RECORD_SIZE:
            size = RECORDS_HEADER_SIZE + RECORDS_GROWTH * RECORD_SIZE
            self.disk.truncate(self._records_fd, size, path)
        self._records_map = self.disk.map_shared(self._records_fd, size, path, writable=True)
        self._records_trusted = records_header_matches(self._records_map[:RECORDS_HEADER_SIZE], self.store_key)
        if not self._records_trusted:
            # another store's or an unlabelled file: its records are rewritten by the full recovery
            self._records_map[:RECORDS_HEADER_SIZE] = encode_records_header(self.store_key)

    def _ensure_records(self, seq: int) -> None:
        need = RECORDS_HEADER_SIZE + seq * RECORD_SIZE
        if len(self._records_map) >= need:
            return
        size = len(self._records_map)
        while size < need:
            size += RECORDS_GROWTH * RECORD_SIZE
        self.disk.truncate(self._records_fd, size, self._records_path)
        old = self._records_map
        self._records_map = self.disk.map_shared(self._records_fd, size, self._records_path, writable=True)
        old.close()

    def _open_bases(self, through_segment: int, through_seq: int, *, verify: bool = True) -> None:
        """Map the base tables for sealed segments, rebuilding them when missing/bad
        (with ``verify`` off: a same-boot restart; missing or bad is CorruptSegment)."""
        self._close_bases()
        self._base_segment = through_segment
        if not through_segment:
            return
        tables = []
        for name, magic, cols in (
            (entities_base_name(through_segment), ENTITY_BASE_MAGIC, 2),
            (idem_base_name(through_segment), IDEM_BASE_MAGIC, 3),
        ):
            path = os.path.join(self._idx_dir, name)
            table = self._map_base(path, name, magic, cols, through_seq, verify)
            if table is None and not verify:
                raise CorruptSegment(path, 0, "index table missing or not for this log")
            if table is None:
                self._build_bases(through_segment, through_seq)
                table = self._map_base(path, name, magic, cols, through_seq)
                if table is None:
                    raise CorruptSegment(path, 0, "rebuilt index table does not verify")
            tables.append(table)
        self._entity_base, self._idem_base = tables

    def _close_bases(self) -> None:
        for table in (self._entity_base, self._idem_base):
            if table is not None:
                table.release()
        self._entity_base = self._idem_base = None
        for m in self._base_maps:
            m.close()
        self._base_maps = []

    def _map_base(self, path: str, name: str, magic: bytes, cols: int, through_seq: int,
                  verify: bool = True) -> BaseTable | None:
        m = map_readonly(path)  # the same read-only mapping every reader makes
        if m is None:
            return None
        try:
            count, through = verify_base(m, magic, name, cols, digest=verify)
        except CorruptSegment:
            m.close()
            return None
        if through != through_seq:
            m.close()
            return None
        self._base_maps.append(m)
        return BaseTable(m, count, cols)

    def _build_bases(self, through_segment: int, through_seq: int) -> None:
        """Fold every record up to ``through_seq`` into fresh base tables (numpy)."""
        import numpy as np

        dtype = np.dtype([("clock", "<u8"), ("seg", "<u4"), ("off", "<u4"), ("len", "<u4"),
                          ("kind", "<u2"), ("flags", "<u2"), ("ent", "<u8"), ("scope", "<u8"),
                          ("prev", "<u8"), ("idem_lo", "<u8"), ("idem_hi", "<u8")])
        recs = np.frombuffer(self._records_map, dtype=dtype, count=through_seq, offset=RECORDS_HEADER_SIZE)
        seqs = np.arange(1, through_seq + 1, dtype="<u8")
        # heads: sequences no later event of the same entity points back to (exact even
        # when two entities share a 64-bit hash)
        is_head = np.ones(through_seq + 1, dtype=bool)
        prev = recs["prev"]
        is_head[prev[prev > 0]] = False
        heads = seqs[is_head[1:]]
        ent = recs["ent"][heads - 1]
        order = np.argsort(ent, kind="stable")
        ent_body = encode_entity_base(ent[order].astype("<u8").tobytes(), heads[order].astype("<u8").tobytes(),
                                      through_seq)
        keyed = (recs["idem_lo"] != 0) | (recs["idem_hi"] != 0)
        # idem hash bytes are stored as 16 bytes: compare as (hi, lo) of their u64 halves
        lo = recs["idem_lo"][keyed]
        hi = recs["idem_hi"][keyed]
        kseq = seqs[keyed]
        order = np.lexsort((lo, hi))
        idem_body = encode_idem_base(hi[order].astype("<u8").tobytes(), lo[order].astype("<u8").tobytes(),
                                     kseq[order].astype("<u8").tobytes(), through_seq)
        self.disk.write_file_atomic(os.path.join(self._idx_dir, entities_base_name(through_segment)), ent_body)
        self.disk.write_file_atomic(os.path.join(self._idx_dir, idem_base_name(through_segment)), idem_body)

    def _prune_index_files(self) -> None:
        keep = {entities_base_name(self._base_segment), idem_base_name(self._base_segment),
                RECORDS_FILE, FENCES_FILE, VERIFIED_FILE}
        if self._delta_gen:
            keep.add(delta_name(self._delta_gen))
        for name in self.disk.listdir(self._idx_dir):
            if name not in keep and (name.endswith(".tbl") or name.endswith(".tmp")):
                self.disk.unlink(os.path.join(self._idx_dir, name))  # mapped readers keep their inode

    def _new_delta(self, frames: list[ScannedFrame]) -> None:
        """A fresh delta table for the active segment (new generation), filled from
        ``frames`` (the scan of that segment at recovery)."""
        existing = [int(n[6:-4]) for n in self.disk.listdir(self._idx_dir)
                    if n.startswith("delta-") and n.endswith(".tbl") and n[6:-4].isdigit()]
        gen = max([*existing, self._delta_gen]) + 1
        seg_size = max(self.config.segment_max_bytes, self._seg.size if self._seg else 0)
        max_frames = seg_size // (MIN_FRAME + RECORD_SIZE) + 1  # the delta never passes half full
        cap = delta_capacity_for(max_frames)
        path = os.path.join(self._idx_dir, delta_name(gen))
        fd = self.disk.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            self.disk.truncate(fd, TABLE_HEADER_SIZE + cap * DELTA_SLOT_SIZE, path)
            self.disk.pwrite(fd, delta_header(cap, gen), 0, path)
            m = self.disk.map_shared(fd, TABLE_HEADER_SIZE + cap * DELTA_SLOT_SIZE, path, writable=True)
        except BaseException:
            os.close(fd)
            raise
        if self._delta_map is not None:
            self._delta_map.close()
            os.close(self._delta_fd)
        self._delta_fd, self._delta_map, self._delta_cap, self._delta_gen = fd, m, cap, gen
        self._idem_active = {}
        self._delta_slots = {}
        heads: dict[bytes, int] = {}
        for f in frames:
            prev = heads.get(f.entity, -1)
            self._delta_slots[f.entity] = delta_upsert(m, cap, name_hash(f.entity), f.seq, prev)
            heads[f.entity] = f.seq
            if f.idem_hash != ZERO_ID:
                self._idem_active[f.idem_hash] = f.seq

    def view(self) -> View:
        return View(self.visible, self._base_segment, self._delta_gen, len(self.revealed))

    # ------------------------------------------------------------------ visibility fences
    def _rebuild_fences(self) -> None:
        """The revealed ranges are derived data: rebuild them from the fence chain of the
        log (every FENCE_COMMIT event) into a fresh fences.tbl, replaced by rename."""
        ranges: list[tuple[int, int]] = []
        for ev in self.reader.history(FENCE_ENTITY):
            if ev.kind == (CATEGORY_SYSTEM, SYSTEM_FENCE_COMMIT):
                ranges += [(int(a), int(b)) for a, b in ev.payload["ranges"]]
        self.revealed = ranges
        body = b"".join(FENCE_RANGE.pack(a, b) for a, b in ranges)
        head = FENCES_HEADER.pack(FENCES_MAGIC, FORMAT_VERSION, 0, len(ranges))
        self.disk.write_file_atomic(os.path.join(self._idx_dir, FENCES_FILE), head + body)
        self.reader.view = self.view()

    def reveal(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Make fenced events visible: call after their FENCE_COMMIT event is committed
        (the event is the authority; this file only lets readers find out fast)."""
        path = os.path.join(self._idx_dir, FENCES_FILE)
        fd = self.disk.open(path, os.O_RDWR)
        try:
            body = b"".join(FENCE_RANGE.pack(a, b) for a, b in ranges)
            self.disk.pwrite(fd, body, FENCES_HEADER.size + len(self.revealed) * FENCE_RANGE.size, path)
            self.revealed = self.revealed + [(int(a), int(b)) for a, b in ranges]
            self.disk.pwrite(fd, FENCES_HEADER.pack(FENCES_MAGIC, FORMAT_VERSION, 0, len(self.revealed)),
                             0, path)
        finally:
            os.close(fd)
        self.reader.view = self.view()

    # ------------------------------------------------------------------ segments
    def _create_segment(self, segment_id: int, first_seq: int, size: int) -> _Segment:
        d = self.disk
        path = os.path.join(self._seg_dir, segment_name(segment_id))
        fd = d.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            d.allocate(fd, size, path)
            d.pwrite(fd, encode_segment_header(segment_id, self.store_id, first_seq, size), 0, path)
            d.fsync(fd, path)
            d.fsync_dir(self._seg_dir)
        except BaseException:
            os.close(fd)
            d.unlink(path)
            raise
        return _Segment(segment_id, first_seq, size, fd, path, SEG_HEADER_SIZE, 0)

    def _seal(self, seg: _Segment) -> None:
        """Write the index footer and trailer of a full segment and fsync it."""
        start = RECORDS_HEADER_SIZE + (seg.first_seq - 1) * RECORD_SIZE
        records = bytes(self._records_map[start:start + seg.count * RECORD_SIZE])
        footer = encode_footer(seg.first_seq, records)
        self.disk.pwrite(seg.fd, footer, seg.end, seg.path)
        body = self.disk.map_shared(seg.fd, seg.size, seg.path, writable=False)
        try:
            crc = zlib.crc32(memoryview(body)[: seg.size - SEG_TRAILER_SIZE])
        finally:
            body.close()
        self.disk.pwrite(seg.fd, encode_trailer(seg.end, len(footer), crc), seg.size - SEG_TRAILER_SIZE,
                         seg.path)
        self._fsync(seg.fd, seg.path)
        self._stamp(seg.segment_id, os.fstat(seg.fd))  # its checksum was just computed
        seg.sealed = True

    def _rotate(self, need_bytes: int) -> None:
        """Seal the active segment, fold it into the base tables, start the next one."""
        self._settle()  # the footer lists every frame: all of them must be indexed first
        seg = self._seg
        assert seg is not None
        if not seg.sealed:  # sealed already when a previous rotation failed after sealing
            self._seal(seg)
        sid = seg.segment_id
        next_first = seg.first_seq + seg.count
        self._build_bases(sid, next_first - 1)
        size = max(self.config.segment_max_bytes, need_bytes)
        new = self._create_segment(sid + 1, next_first, size)
        os.close(seg.fd)
        self._seg = new
        self._open_bases(sid, next_first - 1)
        self._new_delta([])
        self._save_stamps()
        self._write_checkpoint()
        self.reader.refresh()
        self.on_index_change()  # the writer publishes the new tables before the old go
        self._prune_index_files()

    def _fsync(self, fd: int, path: str) -> None:
        try:
            self.disk.fdatasync(fd, path)
        except StorageError as exc:
            self._poison = StorePoisoned(exc.op, exc.path, exc.cause)
            raise self._poison from exc

    def _write_checkpoint(self) -> None:
        seg = self._seg
        if seg is None:
            return
        self.disk.write_file_atomic(os.path.join(self.data_dir, CHECKPOINT_FILE), encode_checkpoint(
            self.durable, seg.segment_id, seg.pub_end, self.visible, self._boot_id, self._delta_gen, self._base_segment,
            seg.crc))

    # ------------------------------------------------------------------ state checks
    def _check_open(self) -> None:
        if self._poison is not None:
            raise self._poison
        if self._closed:
            raise StoreClosed("engine")

    def _entity_state(self, entity: bytes) -> _Entity:
        """An entity's clock and head outside the current group (cache, then index)."""
        st = self._entities.get(entity)
        if st is not None:
            return st
        head = self.reader.head_of(entity)
        h = name_hash(entity)
        if head:
            f = self.reader.frame(head)
            st = _Entity(f.entity_clock, f.event_hash, head, h)
        else:
            st = _Entity(0, ZERO_HASH, 0, h)
        if len(self._entities) > 1_000_000 and not self._pending:  # bounded: it is a cache (but pending
            # groups' entity states live only here until they are published)
            self._entities.clear()
        self._entities[entity] = st
        return st

    def _scope_hash(self, scope: bytes) -> int:
        h = self._scope_hashes.get(scope)
        if h is None:
            if len(self._scope_hashes) > 100_000:
                self._scope_hashes.clear()
            h = self._scope_hashes[scope] = name_hash(scope)
        return h

    def _idem_lookup(self, idem: bytes, group: _Group) -> int:
        if idem == ZERO_ID:
            return 0  # an in-process append without a key: nothing to deduplicate
        seq = group.idem.get(idem) or self._idem_active.get(idem)
        if seq:
            return seq
        base = self._idem_base
        if base is not None:
            lo, hi = _two_u64.unpack(idem)
            return base.idem_lookup(hi, lo)
        return 0

    def receipt_for(self, seq: int) -> Receipt:
        f = self.reader.frame(seq)
        return self._receipt(f.event_id, seq, f.entity, f.scope, f.entity_clock, f.event_hash,
                             f.prev_hash, f.wall_ms, seq <= self.durable)

    def _receipt(self, event_id: bytes, seq: int, entity: bytes, scope: bytes, clock: int,
                 event_hash: bytes, prev_hash: bytes, wall_ms: int, durable: bool) -> Receipt:
        sig = None
        if self.signer is not None:
            sig = self.signer.sign(event_id, seq, entity, scope, clock, event_hash, prev_hash, wall_ms)
        return Receipt(event_id, seq, entity.decode(), scope.decode(), clock, event_hash, prev_hash,
                       wall_ms, durable, sig)

    # ------------------------------------------------------------------ commit path
    def commit(self, requests: Sequence[Sequence[Prepared]], fenced: Sequence[bool] | None = None, *,
               settle: bool = True) -> list[list[Receipt] | BatpakError]:
        """Commit several requests as one group: each request is all-or-nothing and is
        answered on its own (a list of receipts, or the error that refused it). One
        write and one fsync cover the whole group (more only when a segment fills).
        ``fenced[i]``: request i is written inside a visibility fence (hidden until a
        FENCE_COMMIT event reveals it; see ``reveal``).
        With ``settle=False`` (the writer's pipeline) the group is written but neither
        fsynced nor published: its results must not be released before
        ``publish_through`` says the fsync covering it succeeded."""
        self._check_open()
        results: list[list[Receipt] | BatpakError] = [[] for _ in requests]
        group = _Group()
        placed: list[tuple[int, int, int]] = []  # (request index, first index in group, count)
        wall_ms = self._clock_ms()
        id_prefix = (wall_ms & 0xFFFFFFFFFFFF).to_bytes(6, "big") + self.store_tag.to_bytes(2, "big")
        seg = self._seg
        assert seg is not None
        cfg = self.config
        for ri, items in enumerate(requests):
            try:
                if not items:
                    raise InvalidArgument("items", [], "a batch needs at least one event")
                if len(items) > cfg.max_batch_events:
                    raise InvalidArgument("items", len(items), f"a batch holds at most {cfg.max_batch_events} events")
                total = sum(len(p.payload) for p in items)
                if total > cfg.max_batch_bytes:
                    raise PayloadTooLarge(total, cfg.max_batch_bytes, "batch")
                if len(items) > 1:
                    keyed = [p.idem for p in items if p.idem != ZERO_ID]
                    if len(set(keyed)) != len(keyed):
                        raise InvalidArgument("idempotency_key", None, "the same key appears twice in one batch")
                originals = [self._idem_lookup(p.idem, group) for p in items]
                if any(originals):
                    if not all(originals):
                        raise InvalidArgument("idempotency_key", None,
                                              "some keys of this batch were committed before and some not")
                    results[ri] = [self._original(s, group) for s in originals]
                    continue
                start = group.count
                fence_flag = FLAG_FENCED if fenced is not None and fenced[ri] else 0
                nbytes = self._encode_request(items, group, wall_ms, id_prefix, fence_flag)
            except BatpakError as exc:
                results[ri] = exc
                continue
            end_after = seg.end + group.nbytes + _SENTINEL_FOOTER_ROOM + (seg.count + group.count) * RECORD_SIZE
            if end_after > seg.size or seg.sealed:
                # it does not fit: take it back out, write what fits, rotate, encode again
                self._truncate_group(group, start)
                if group.count:
                    self._write(group, results, placed)
                    group = _Group()
                    placed = []
                self._rotate(SEG_HEADER_SIZE + nbytes + _SENTINEL_FOOTER_ROOM + len(items) * RECORD_SIZE)
                seg = self._seg
                assert seg is not None
                start = 0
                try:
                    self._encode_request(items, group, wall_ms, id_prefix, fence_flag)
                except BatpakError as exc:
                    results[ri] = exc
                    continue
            placed.append((ri, start, len(items)))
        if group.count:
            self._write(group, results, placed)
        if settle:
            self._settle()
        return results

    def _original(self, seq: int, group: _Group) -> Receipt:
        """The receipt of an already committed event (or one in this group, or in a
        group written but not yet published)."""
        first = self._next_seq - group.count
        if seq >= first:
            return group.receipts[seq - first]
        for p in self._pending:
            metas = p.group.metas
            if metas[0][0] <= seq <= metas[-1][0]:
                return p.group.receipts[seq - int(metas[0][0])]
        return self.receipt_for(seq)

    def _truncate_group(self, group: _Group, keep: int) -> None:
        """Forget the group's events from index ``keep`` on (one request's worth)."""
        dropped = group.metas[keep:]
        if not dropped:
            return
        del group.metas[keep:]
        del group.receipts[keep:]
        del group.parts[keep * 4:]
        group.nbytes = sum(m[4] for m in group.metas)
        self._next_seq -= len(dropped)
        for m in dropped:
            group.idem.pop(m[9], None)
        # entity states in the group: recompute from what is left
        group.entities = {}
        for m in group.metas:
            entity = m[8]
            group.entities[entity] = _Entity(m[1], group.receipts[m[0] - group.metas[0][0]].event_hash, m[0], m[6])

    def _encode_request(self, items: Sequence[Prepared], group: _Group, wall_ms: int, id_prefix: bytes,
                        fence_flag: int = 0) -> int:
        """Check one request's guards and encode its frames into ``group`` (all or
        nothing: on a conflict the group is left as it was). Returns its byte size."""
        start = group.count
        seq = self._next_seq
        ents = group.entities
        parts = group.parts
        metas = group.metas
        receipts = group.receipts
        last = len(items) - 1
        durable = self.config.sync is SyncMode.GROUP
        signer = self.signer
        nbytes = 0
        try:
            for i, p in enumerate(items):
                entity = p.entity
                st = ents.get(entity) or self._entity_state(entity)
                if p.expected_clock is not None and p.expected_clock != st.clock:
                    raise ConcurrencyConflict(entity.decode(), p.expected_clock, st.clock)
                clock = st.clock + 1
                flags = (FLAG_COMMIT_END if i == last else 0) | fence_flag
                if p.causation != ZERO_ID:
                    flags |= FLAG_HAS_CAUSATION
                if p.correlation != ZERO_ID:
                    flags |= FLAG_HAS_CORRELATION
                event_id = id_prefix + seq.to_bytes(8, "big")
                scope, payload = p.scope, p.payload
                pieces, ehash, frame_len = encode_parts(flags, p.kind, p.payload_version, seq, clock, wall_ms,
                                                        event_id, p.causation, p.correlation, p.idem, st.head_hash,
                                                        entity, scope, payload)
                parts += pieces
                nbytes += frame_len
                metas.append((seq, clock, p.kind, flags, frame_len, st.head_seq, st.name_hash,
                               self._scope_hash(scope), entity, p.idem))
                sig = signer.sign(event_id, seq, entity, scope, clock, ehash, st.head_hash, wall_ms) if signer else None
                receipts.append(Receipt(event_id, seq, entity.decode(), scope.decode(), clock, ehash, st.head_hash,
                                        wall_ms, durable, sig))
                ents[entity] = _Entity(clock, ehash, seq, st.name_hash)
                if p.idem != ZERO_ID:
                    group.idem[p.idem] = seq
                seq += 1
        except BatpakError:
            self._next_seq = seq
            self._truncate_group(group, start)
            raise
        group.nbytes += nbytes
        self._next_seq = seq
        return nbytes

    def _write(self, group: _Group, results: list[list[Receipt] | BatpakError],
               placed: list[tuple[int, int, int]]) -> None:
        """Write a group's frames after everything written so far. The in-memory view
        of entities and keys moves on at once (the next group builds on it); readers see
        nothing until ``_publish``. A failed write takes only this group back."""
        seg = self._seg
        assert seg is not None
        data = b"".join(group.parts)
        first_seq = group.metas[0][0]
        try:
            self.disk.pwrite(seg.fd, data, seg.end, seg.path)
        except StorageError as exc:
            self._abandon_write(seg, len(data), first_seq)
            for ri, _, _ in placed:
                results[ri] = exc
            return
        crc_after = zlib.crc32(data, seg.write_crc)
        self._pending.append(_Pending(group, results, list(placed), seg.end, seg.end + len(data), crc_after))
        self.groups_written += 1
        seg.end += len(data)
        seg.count += group.count
        seg.write_crc = crc_after
        self._entities.update(group.entities)
        idem_active = self._idem_active
        for meta in group.metas:
            if meta[9] != ZERO_ID:
                idem_active[meta[9]] = meta[0]

    def settle(self) -> None:
        """fsync (as the sync mode says) and publish every written group."""
        self._check_open()
        self._settle()

    def _settle(self) -> None:
        """fsync (as the sync mode says) and publish every written group."""
        if not self._pending:
            return
        seg = self._seg
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

    def _fsync_pending(self, seg: _Segment) -> None:
        try:
            self._fsync(seg.fd, seg.path)
        except StorePoisoned:
            # never acknowledged: best effort to keep these frames from coming back at recovery
            try:
                self.disk.zero_range(seg.fd, seg.pub_end, seg.end - seg.pub_end, seg.path)
            except StorageError:
                pass
            raise

    def pending_sync_target(self) -> tuple[int, str, int]:
        """(fd, path, groups) for an fsync that another thread may run while this one
        writes the next group: on success, ``publish_through(groups, True)``."""
        seg = self._seg
        assert seg is not None
        return seg.fd, seg.path, len(self._pending)

    def sync_failed(self, exc: OSError, path: str) -> StorePoisoned:
        """An fsync run by another thread failed: poison, exactly as ``_fsync`` does."""
        cause = exc.cause if isinstance(exc, StorageError) else exc
        self._poison = StorePoisoned("fsync", path, cause)
        seg = self._seg
        if seg is not None:
            try:
                self.disk.zero_range(seg.fd, seg.pub_end, seg.end - seg.pub_end, seg.path)
            except StorageError:
                pass
        return self._poison

    def publish_through(self, groups: int, synced: bool) -> None:
        """Index and publish the first ``groups`` written groups, in order, and fill the
        results of their requests. ``synced``: an fsync covering them returned."""
        seg = self._seg
        assert seg is not None
        m_slots = self._delta_slots
        delta, cap = self._delta_map, self._delta_cap
        pack = RECORD.pack_into
        sid = seg.segment_id
        for p in self._pending[:groups]:
            group = p.group
            last_seq = group.metas[-1][0]
            self._ensure_records(last_seq)
            m = self._records_map
            off = p.start
            # index: records, then delta slots (a reader that sees a slot finds its record)
            for (seq, clock, kind, flags, flen, prev, ent_h, scope_h, entity, idem) in group.metas:
                pack(m, RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE, clock, sid, off, flen, kind, flags,
                     ent_h, scope_h, prev, idem)
                slot = m_slots.get(entity)
                if slot is None:
                    slot = m_slots[entity] = delta_upsert(delta, cap, ent_h, seq, prev)
                else:
                    _u64.pack_into(delta, slot + 8, seq)
                off += flen
            seg.pub_end = p.end
            seg.crc = p.crc_after
            self.visible = last_seq
            if synced:
                self.durable = last_seq
            for ri, start, n in p.placed:
                p.results[ri] = group.receipts[start:start + n]
        del self._pending[:groups]
        self.groups_published += groups
        self.reader.view = self.view()

    def _abandon_write(self, seg: _Segment, length: int, first_seq: int) -> None:
        """A write failed: zero what may have landed and forget the group; if even that
        fails, poison (the segment's tail is unknown)."""
        try:
            self.disk.zero_range(seg.fd, seg.end, length, seg.path)
        except StorageError as exc:
            self._poison = StorePoisoned(exc.op, exc.path, exc.cause)
        self._next_seq = first_seq

    def sync(self) -> int:
        """fsync now; returns the durable frontier."""
        self._check_open()
        if self._pending:
            self._fsync_pending(self._seg)  # type: ignore[arg-type]
            self.publish_through(len(self._pending), True)
        if self.durable < self.visible and self._seg is not None:
            self._fsync(self._seg.fd, self._seg.path)
            self._last_sync_ms = self._clock_ms()
            self.durable = self.visible
        return self.durable

    def tick(self) -> None:
        """Periodic duty for the interval sync mode: fsync when the interval passed."""
        if (self.config.sync is SyncMode.INTERVAL and self.durable < self.visible
                and self._clock_ms() - self._last_sync_ms >= self.config.sync_interval_ms):
            self.sync()

    def checkpoint(self) -> None:
        """Persist the durable floor recovery will hold the log to."""
        self._check_open()
        self._write_checkpoint()

    # ------------------------------------------------------------------ public-ish API
    def append(self, coord: Coordinate, kind: Kind, payload: Any, *, idempotency_key: str | bytes | None = None,
               expected_clock: int | None = None, causation_id: bytes | None = None,
               correlation_id: bytes | None = None, payload_version: int | None = None) -> Receipt:
        """Append one event (``payload_version``: default the kind's registered version)."""
        self._check_open()
        p = prepare(coord, kind, payload, idempotency_key=idempotency_key, expected_clock=expected_clock,
                    causation_id=causation_id, correlation_id=correlation_id,
                    max_payload=self.config.max_payload_bytes,
                    payload_version=payload_version_for(kind) if payload_version is None else payload_version)
        res = self.commit([[p]])[0]
        if isinstance(res, BaseException):
            raise res
        return res[0]

    def append_system(self, entity: str, type_id: int, payload: Any) -> Receipt:
        """Append an event of the reserved system category (the store's own lifecycle)."""
        self._check_open()
        p = prepare(Coordinate(entity, "system"), Kind(0, type_id), payload, idempotency_key=None,
                    expected_clock=None, causation_id=None, correlation_id=None,
                    max_payload=self.config.max_payload_bytes, allow_reserved=True)
        res = self.commit([[p]])[0]
        if isinstance(res, BaseException):
            raise res
        return res[0]

    def append_effect(self, coord: Coordinate, type_id: int, payload: Any, *, causation_id: bytes | None = None,
                      idempotency_key: str | bytes | None = None) -> Receipt:
        """Append a store-recorded effect (reserved category 0xD): only an allowlisted
        type id (``EFFECT_DENIAL``, ``EFFECT_BYPASS``) with a payload of its shape."""
        item = effect_item(coord, type_id, payload, causation_id=causation_id, idempotency_key=idempotency_key)
        return self._append_items([(item, True)])[0]

    def append_denial(self, coord: Coordinate, denial: Denial, *, proposal_kind: Kind | None = None,
                      causation_id: bytes | None = None) -> Receipt:
        """Persist a gate's denial in the entity's chain, so refusals are auditable."""
        return self.append_effect(coord, EFFECT_DENIAL, denial_payload(denial, proposal_kind), causation_id=causation_id)

    def append_bypass(self, item: BatchItem, reason: str, *, gates: Sequence[str] = ()) -> tuple[Receipt, Receipt]:
        """Append ``item`` past the gates together with its bypass audit record, all or
        nothing (the record is chained right after the event)."""
        event, audit = self._append_items([(item, False), (bypass_audit_item(item, reason, gates), True)])
        return event, audit

    def _append_items(self, items: Sequence[tuple[BatchItem, bool]]) -> list[Receipt]:
        """Append (item, allow_reserved) pairs as one all-or-nothing request."""
        self._check_open()
        prepared = [
            prepare(it.coord, it.kind, it.payload, idempotency_key=it.idempotency_key,
                    expected_clock=it.expected_clock, causation_id=it.causation_id,
                    correlation_id=it.correlation_id, max_payload=self.config.max_payload_bytes,
                    allow_reserved=reserved)
            for it, reserved in items
        ]
        res = self.commit([prepared])[0]
        if isinstance(res, BaseException):
            raise res
        return res

    def append_batch(self, items: Sequence[BatchItem]) -> list[Receipt]:
        self._check_open()
        prepared = [
            prepare(it.coord, it.kind, it.payload, idempotency_key=it.idempotency_key,
                    expected_clock=it.expected_clock, causation_id=it.causation_id,
                    correlation_id=it.correlation_id, max_payload=self.config.max_payload_bytes,
                    payload_version=payload_version_for(it.kind) if it.payload_version is None else it.payload_version)
            for it in items
        ]
        res = self.commit([prepared])[0]
        if isinstance(res, BaseException):
            raise res
        return res

    def get(self, event_id: bytes) -> Event:
        self._check_open()
        return self.reader.get(event_id)

    def history(self, entity: str, *, after_clock: int | None = None, limit: int | None = None) -> list[Event]:
        self._check_open()
        return self.reader.history(entity, after_clock, limit)

    def query_after(self, after: int = 0, *, limit: int = 1000, entity: str | None = None,
                    scope: str | None = None, kind: Kind | None = None) -> Page:
        self._check_open()
        return self.reader.query_after(after, limit, entity, scope, kind)

    def walk_ancestors(self, event_id: bytes, *, limit: int | None = None) -> Iterator[Event]:
        self._check_open()
        return self.reader.walk_ancestors(event_id, limit)

    def verify_receipt(self, receipt: Receipt) -> bool:
        self._check_open()
        return receipt_matches(self.reader, receipt, self.signer)

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._poison is None and self._seg is not None:
                self.sync()
                self._write_checkpoint()
        finally:
            self._closed = True
            self._release()

    def _release(self) -> None:
        reader = getattr(self, "reader", None)
        if reader is not None:
            reader.close()
        self._close_bases()
        for name in ("_records_map", "_delta_map"):
            m = getattr(self, name, None)
            if m is not None:
                m.close()
                setattr(self, name, None)
        for fd in (self._records_fd, self._delta_fd, self._seg.fd if self._seg else -1, self._lock_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._records_fd = self._delta_fd = self._lock_fd = -1
        self._seg = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
