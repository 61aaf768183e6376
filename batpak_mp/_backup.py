"""Online backup, restore and fork of a data directory: ``bp.backup``, ``bp.restore``,
``bp.fork`` (and the CLI's ``backup``, ``restore``, ``fork``).

Owns: taking a consistent copy of a store at a frontier while its service runs (or with
no service), incrementally into a previous backup of the same store; putting a backup in
place of a data directory; making a new store (its own id, a lineage record) from a
store's history up to a sequence, sharing its sealed segments by hard link.

How a copy is consistent (docs/OPERATIONS.md "Backup, restore and fork"):
- the frontier F is read first: the control block's durable frontier when a writer
  holds the store (every sequence <= F is fsynced and no recovery cuts it), else what an
  offline open finds (``find_frontier``: what a recovery would keep);
- sealed segments never change: each is copied whole with its whole-file checksum
  checked on the bytes as read (``CorruptSegment`` on a mismatch), or, in a backup, taken
  from the previous backup when its size, header and trailer are the same;
- the segment holding F is copied only through the end of F's frame (nothing
  half-committed), the rest of the file left zero but allocated, and its frames are
  scanned (checksum and event hash) in the copy; derived files (index/, the checkpoint,
  snapshots) are not copied: the writer that opens the copy rebuilds them.

Invariants: nothing in the source is written, renamed, locked or probed (segments are
opened read-only; the writer lock is never touched: a probe could make a restarting
writer fail with ``StoreLocked``; whether a service runs is read from the control
block). ``restore`` is the exception by design: it holds the target's locks. A destination is built in a staging directory
beside it (same parent, so the same file system) and published by one atomic rename, or
``renameat2(RENAME_EXCHANGE)`` when a previous backup is there, each followed by an fsync
of the parent: a SIGKILL at any point leaves the destination the previous good backup or
the new one; leftovers are removed by the next run (under a lock file beside the
destination, ``.<name>.bpmp-lock``). Every OS error becomes ``StorageError`` (``DiskFull``
for ENOSPC/EDQUOT) naming the operation and path.
Must not import the writer, the client or the supervisor.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypeVar

import posix_ipc

from ._client import process_started_ns, service_gone
from ._crypto import KEYS_FILE
from ._errors import (
    AlreadyServed,
    BackupRefused,
    BatpakError,
    CorruptSegment,
    DiskFull,
    InvalidArgument,
    StorageError,
    StoreLocked,
)
from ._format.directory import META_FILE, SEGMENT_DIR, name_hash, parse_segment_name, segment_name
from ._format.frame import FLAG_COMMIT_END
from ._format.ids import store_key_of
from ._format.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestFile,
    SourceSegment,
    decode_manifest,
    encode_manifest,
    plan_segments,
)
from ._format.meta import Lineage, decode_lineage, decode_meta, encode_meta
from ._format.record import R_PREV_IN_ENTITY, RECORD, record_offset
from ._format.scan import ScannedFrame
from ._format.segment import (
    FOOTER_HEAD,
    SEG_HEADER_SIZE,
    SEG_TRAILER_SIZE,
    decode_segment_header,
    decode_trailer,
    encode_footer,
    encode_trailer,
    footer_count,
    sealed_verdict,
)
from ._ipc.control import ControlBlock
from ._ipc.names import supervisor_lock_path, writer_lock_path
from ._native import scan_segment  # the active codec: C when built, else _format's
from ._read.offline import find_frontier
from ._read.reader import unborn_segment
from ._read.verify import verify
from ._service import cleanup_ipc, lock_holder
from ._storage.osio import Disk
from ._values import WriterState

T = TypeVar("T")
DISK = Disk()  # the write side's seam: every failure a StorageError (DiskFull for ENOSPC/EDQUOT) naming op and path
Progress = Callable[[int, int], None]  # (bytes done, bytes in all): called per chunk and per step

CHUNK = 1 << 18  # bytes per read and write while copying: sequential enough for full speed, often enough for progress
WRITEBACK = 8 << 20  # bytes: start writing the copy back every 8 MiB, so the final fsync (and the live
# writer's own fsyncs meanwhile) never wait behind a whole segment of dirty pages
DIR_MODE = 0o700  # as a data directory (OPERATIONS.md, trust model)
FILE_MODE = 0o600
# copied with a backup, after the segments: the signing key's public half and the key itself; the
# wrapped data keys of encrypted entities (_crypto.KEYS_FILE: a key is on disk before any frame
# encrypted under it, so a table read after the segments has every key they need)
SIDE_FILES = ("receipt.pub", "receipt.key", KEYS_FILE)
_RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h): swap two paths atomically
_AT_FDCWD = -100
_FULL = (errno.ENOSPC, errno.EDQUOT)
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)  # a file system (or libc) without RENAME_EXCHANGE


class BackupReport(NamedTuple):
    """What ``bp.backup`` copied."""

    dest: str
    store_id: str  # hex
    last_sequence: int  # the backup holds sequences 1..last_sequence
    files_copied: int
    files_reused: int  # sealed segments taken from the previous backup in ``dest``
    bytes_copied: int
    seconds: float
    incremental: bool  # a previous backup of the store was in ``dest``


class ForkReport(NamedTuple):
    """What ``bp.fork`` made."""

    dest: str
    store_id: str  # the fork's own, hex
    parent_store_id: str
    fork_sequence: int  # the fork holds the parent's sequences 1..fork_sequence
    files_linked: int  # sealed segments shared with the parent (hard links)
    files_copied: int
    bytes_copied: int
    seconds: float


class RestoreReport(NamedTuple):
    """What ``bp.restore`` put in place."""

    data_dir: str
    store_id: str
    last_sequence: int
    previous: str | None  # where the directory's previous contents were moved (None: it was empty or missing)
    seconds: float


# -- OS calls: every failure a typed error naming the operation and the path ---------------------
def _os(op: str, path: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except BatpakError:
        raise
    except OSError as exc:
        cls = DiskFull if exc.errno in _FULL else StorageError
        raise cls(op, path, exc) from None


def _write_new(path: str, data: bytes, mode: int = FILE_MODE) -> None:
    """Create ``path`` (it must not exist), write ``data``, fsync."""
    fd = DISK.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        DISK.pwrite(fd, data, 0, path)
        DISK.fsync(fd, path)
    finally:
        DISK.close_quietly(fd, path)


def _mkdir(path: str) -> None:
    _os("mkdir", path, lambda: os.mkdir(path, DIR_MODE))


def _remove_tree(path: str) -> None:
    if os.path.lexists(path):
        _os("remove", path, lambda: shutil.rmtree(path))


def _libc(name: str, *argtypes: type) -> Callable[..., int] | None:
    """A libc function returning int (errno kept), or None where libc lacks it."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_renameat2 = _libc("renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_sync_file_range = _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the dirty pages in the range, do not wait


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``[offset, offset+length)`` back now (a hint: errors show at fsync)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _exchange(a: str, b: str) -> bool:
    """Swap the directories ``a`` and ``b`` in one step; False when the file system (or
    libc) cannot."""
    fn = _renameat2
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise StorageError("rename", b, OSError(err, os.strerror(err)))


# -- the destination: a lock beside it, a staging directory, an atomic publish ----------------
class _Target:
    """A destination path and its siblings: ``.<name>.bpmp-lock`` (held while we work),
    ``.<name>.bpmp-staging`` (the copy being built) and ``.<name>.bpmp-old`` (only where
    RENAME_EXCHANGE is missing: the previous backup between two renames)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.parent, name = os.path.split(path)
        self.lock_path = os.path.join(self.parent, f".{name}.bpmp-lock")
        self.staging = os.path.join(self.parent, f".{name}.bpmp-staging")
        self.old = os.path.join(self.parent, f".{name}.bpmp-old")
        self._lock_fd = -1

    @contextlib.contextmanager
    def locked(self) -> Iterator[_Target]:
        if not os.path.isdir(self.parent):
            raise BackupRefused(self.path, f"its parent directory {self.parent!r} does not exist")
        fd = _os("open", self.lock_path,
                 lambda: os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BackupRefused(self.path, "another backup, fork or restore into it is running") from None
            self._lock_fd = fd
            self._tidy()
            try:
                yield self
            except BaseException:
                with contextlib.suppress(BatpakError, OSError):
                    _remove_tree(self.staging)  # what a failed run staged (the next run would remove it too)
                raise
        finally:
            self._lock_fd = -1
            os.close(fd)

    def _tidy(self) -> None:
        """Finish what a killed run left: the previous backup between two renames goes
        back in place; a staging directory is garbage."""
        if os.path.lexists(self.old):
            if os.path.lexists(self.path):
                _remove_tree(self.old)
            else:
                _os("rename", self.path, lambda: os.rename(self.old, self.path))
            DISK.fsync_dir(self.parent)
        _remove_tree(self.staging)

    def start(self) -> str:
        _mkdir(self.staging)
        _mkdir(os.path.join(self.staging, SEGMENT_DIR))
        return self.staging

    def publish(self, step: Callable[[], None]) -> str | None:
        """Put the staging directory in place of the destination atomically; the
        destination's previous contents end up at the staging path (returned), or None
        when there was no destination."""
        DISK.fsync_dir(os.path.join(self.staging, SEGMENT_DIR))
        DISK.fsync_dir(self.staging)
        if not os.path.lexists(self.path):
            _os("rename", self.path, lambda: os.rename(self.staging, self.path))
            DISK.fsync_dir(self.parent)
            step()
            return None
        if not _exchange(self.staging, self.path):
            _os("rename", self.path, lambda: os.rename(self.path, self.old))
            DISK.fsync_dir(self.parent)
            step()
            _os("rename", self.path, lambda: os.rename(self.staging, self.path))
            _os("rename", self.old, lambda: os.rename(self.old, self.staging))
        DISK.fsync_dir(self.parent)
        step()
        return self.staging


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check_apart(source: str, dest: str) -> None:
    src, dst = os.path.realpath(source), os.path.realpath(dest)
    if _inside(dst, src):
        raise BackupRefused(dest, f"it lies inside the data directory {source!r} being copied")
    if _inside(src, dst):
        raise BackupRefused(dest, f"the data directory {source!r} lies inside it")


def _listing(path: str) -> list[str] | None:
    """The names in ``path``; None when it does not exist."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        raise BackupRefused(path, "it is not a directory")
    return DISK.listdir(path)


# -- the source: its store id and frontier, and its segments ----------------------------------
class _Source:
    def __init__(self, root: str) -> None:
        self.root = root
        meta_path = os.path.join(root, META_FILE)
        if not os.path.isdir(root):
            raise InvalidArgument("data_dir", root, "is not a batpak-mp data directory (no such directory)")
        raw = DISK.read_file(meta_path)
        if raw is None:
            raise InvalidArgument("data_dir", root, f"is not a batpak-mp data directory (no {META_FILE})")
        self.meta = raw
        self.store_id = decode_meta(raw, meta_path)
        self.lineage = decode_lineage(raw, meta_path)
        self.seg_dir = os.path.join(root, SEGMENT_DIR)

    def durable_hint(self) -> tuple[tuple[int, int] | None, bool]:
        """(store key, durable frontier) from the control block of this store, when there
        is one, and whether its service runs (starting, ready or draining, with a live
        writer or supervisor: the clients' own judgement, ``service_gone``). The writer
        lock is never probed: a probe at the moment a restarted writer takes it would make
        that writer fail with ``StoreLocked``."""
        try:
            block = ControlBlock.attach(self.root)
        except (BatpakError, posix_ipc.Error, OSError):
            return None, False
        try:
            snap = block.read()
        except BatpakError:
            return None, False
        finally:
            block.close()
        if snap.store_key != store_key_of(self.store_id):
            return None, False
        served = snap.state in (WriterState.STARTING, WriterState.READY, WriterState.DRAINING) and service_gone(
            snap, time.monotonic_ns(), process_started_ns) is None
        return (snap.store_key, snap.durable), served

    def frontier(self) -> tuple[int, int]:
        """(F, visible): F the sequence every copy holds at least — the durable frontier
        of a served store, else the offline frontier — and how far the index is written
        (``find_frontier``'s visible, the bound of a fork)."""
        hint, served = self.durable_hint()
        if served and hint is not None:
            return hint[1], hint[1]
        found = find_frontier(self.root, hint)
        if isinstance(found.records, mmap.mmap):
            found.records.close()
        return found.visible, found.visible

    def segments(self) -> list[SourceSegment]:
        names = DISK.listdir(self.seg_dir) if os.path.isdir(self.seg_dir) else []
        ids = sorted(sid for sid in map(parse_segment_name, names) if sid is not None)
        if ids and unborn_segment(self.path(ids[-1])):
            ids.pop()  # being created by a rotation: it holds no event
        out: list[SourceSegment] = []
        for sid in ids:
            path = self.path(sid)

            def head_tail(path: str = path) -> tuple[int, bytes, bytes, bytes]:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    head = os.pread(f.fileno(), SEG_HEADER_SIZE, 0)
                    tail = os.pread(f.fileno(), SEG_TRAILER_SIZE, max(size - SEG_TRAILER_SIZE, 0))
                    trailer = decode_trailer(tail)
                    footer = os.pread(f.fileno(), FOOTER_HEAD.size, trailer.footer_offset) if trailer else b""
                return size, head, tail, footer

            size, head, tail, footer = _os("read", path, head_tail)
            header = decode_segment_header(head, path)
            if footer:
                count = footer_count(footer)
                if count is None:
                    raise CorruptSegment(path, size - SEG_TRAILER_SIZE, "seal footer has a bad magic")
                out.append(SourceSegment(sid, size, header.first_seq, header.first_seq + count - 1, (head + tail).hex()))
            else:
                out.append(SourceSegment(sid, size, header.first_seq, 0, ""))
        return out

    def path(self, sid: int) -> str:
        return os.path.join(self.seg_dir, segment_name(sid))


# -- copying one segment ----------------------------------------------------------------------
class _Copier:
    """Copies segment files into a staging directory, counting bytes and calling
    ``progress``. Each source file is opened once and everything about it (its size,
    trailer, frames) is read through that descriptor: a compaction that swaps a sealed
    segment by rename meanwhile (FORMAT.md §3.9) gives one whole file or the other,
    never a mix."""

    def __init__(self, progress: Progress | None, total: int, max_rate: float | None = None) -> None:
        self.progress = progress
        self.total = total
        self.done = 0
        self.files = 0
        self.max_rate = max_rate  # bytes per second at most (None: as fast as the disks go)
        self.started = time.monotonic()

    def step(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total)

    def copy(self, sfd: int, src: str, dst: str, length: int, size: int) -> int:
        """Copy ``src[0:length]`` (open as ``sfd``) into a new file ``dst`` of ``size``
        bytes (the rest allocated after the copy, reading as zeros, as the writer
        preallocates: no write into it may meet ENOSPC later); the crc32 of
        ``dst[0:min(length, size-32)]``, computed on the bytes as read."""
        limit = min(length, size - SEG_TRAILER_SIZE)
        dfd = DISK.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            crc, off = 0, 0
            while off < length:
                n = min(CHUNK, length - off)
                chunk = DISK.pread(sfd, n, off, src)
                if len(chunk) != n:
                    raise CorruptSegment(src, off + len(chunk), f"file ended at {off + len(chunk)} bytes, "
                                         f"expected {length}")
                if off < limit:
                    crc = zlib.crc32(memoryview(chunk)[:limit - off], crc)
                DISK.pwrite(dfd, chunk, off, dst)
                if (off + n) % WRITEBACK < n:
                    _start_writeback(dfd, (off + n) // WRITEBACK * WRITEBACK - WRITEBACK, WRITEBACK)
                off += n
                self.done += n
                self.step()
                if self.max_rate is not None:
                    ahead = self.done / self.max_rate - (time.monotonic() - self.started)
                    if ahead > 0:
                        time.sleep(ahead)
            if size > length:
                DISK.allocate(dfd, size, dst)  # the rest, as the writer preallocates (holes only: cheap)
            DISK.fsync(dfd, dst)
        finally:
            DISK.close_quietly(dfd, dst)
        self.files += 1
        return crc

    def copy_sealed(self, src: str, dst: str) -> tuple[int, str]:
        """Copy a sealed segment whole, its whole-file checksum checked on the bytes as
        read; (its size, the hex of its header and trailer) for the manifest."""
        sfd = DISK.open(src, os.O_RDONLY)
        try:
            size = DISK.fstat(sfd, src).st_size
            head = DISK.pread(sfd, SEG_HEADER_SIZE, 0, src)
            tail = DISK.pread(sfd, SEG_TRAILER_SIZE, max(size - SEG_TRAILER_SIZE, 0), src)
            trailer = decode_trailer(tail)
            if trailer is None:
                raise CorruptSegment(src, max(size - SEG_TRAILER_SIZE, 0), "a sealed segment lost its trailer")
            if self.copy(sfd, src, dst, size, size) != trailer.segment_crc:  # it covers the footer too
                raise CorruptSegment(src, 0, "sealed segment checksum mismatch (a byte changed after sealing): "
                                             "the source fails verification; nothing was published")
        finally:
            DISK.close_quietly(sfd, src)
        return size, (head + tail).hex()

    def copy_prefix(self, src: str, dst: str, seg: SourceSegment, through: int | None,
                    who: str) -> tuple[int, list[ScannedFrame]]:
        """Copy the header and the frames of ``seg`` through sequence ``through`` (None:
        its last whole commit) into
        ``dst``, each frame checked (its CRC) by the scan that found where they end; (the
        offset where they end, those frames). Frames at or below a durable sequence never
        change, and the scan and the copy read the same file, so the bytes copied are the
        bytes scanned."""
        sfd = DISK.open(src, os.O_RDONLY)
        try:
            size = DISK.fstat(sfd, src).st_size
            m = DISK.map_shared(sfd, size, src, writable=False)
            try:
                frames = _frames_through(m, src, seg, through, who)
            finally:
                m.close()
            end = frames[-1].offset + frames[-1].frame_len if frames else SEG_HEADER_SIZE
            self.total -= size - end  # counted whole before the frontier's frame was found
            self.copy(sfd, src, dst, end, size)
        finally:
            DISK.close_quietly(sfd, src)
        return end, frames


def _map(path: str) -> mmap.mmap:
    m = DISK.map_readonly(path)
    if m is None:
        raise CorruptSegment(path, 0, "segment is empty")
    return m


def _frames_through(m: mmap.mmap, path: str, seg: SourceSegment, through: int | None,
                    who: str) -> list[ScannedFrame]:
    """The frames of segment ``path`` (mapped as ``m``) from its first through sequence
    ``through`` (None: through its last whole commit); they must be whole (the scan checks every frame's CRC) and end a commit
    (``who``: the argument that named it, for the error). Damage among them is
    ``CorruptSegment``."""
    if through is not None and through < seg.first_seq:
        return []
    limit = len(m) - SEG_TRAILER_SIZE
    trailer = decode_trailer(m[limit:])
    if trailer is not None:
        limit = trailer.footer_offset
    scan = scan_segment(m, SEG_HEADER_SIZE, limit, seg.first_seq)
    frames = scan.frames[: scan.committed]
    if through is None:
        return frames
    i = through - seg.first_seq
    if i >= len(frames):
        raise CorruptSegment(path, scan.stop_offset, f"sequence {through} was durable but its segment's whole "
                             f"commits end at {seg.first_seq + len(frames) - 1} ({scan.stop_reason})")
    if not frames[i].flags & FLAG_COMMIT_END:
        last = next(g.seq for g in frames[i:] if g.flags & FLAG_COMMIT_END)
        raise InvalidArgument(who, through, f"lies inside a batch (its commit ends at sequence {last}); "
                                            "a copy holds whole commits only")
    return frames[: i + 1]


def _footer_records(sid: int, frames: list[ScannedFrame], records: mmap.mmap | bytes) -> bytes:
    """The seal footer's records of ``frames`` (FORMAT.md §4), from the frames themselves
    (locations, flags and hashes as copied) and ``records`` (records.idx, or its image)
    for each one's ``prev_in_entity``, which needs the history before it."""
    out = bytearray()
    for f in frames:
        prev = RECORD.unpack_from(records, record_offset(f.seq))[R_PREV_IN_ENTITY]
        out += RECORD.pack(f.clock, sid, f.offset, f.frame_len, f.kind, f.flags, name_hash(f.entity),
                           name_hash(f.scope), prev, f.idem_hash)
    return bytes(out)


def _same_file(a: str, size: int, head_tail: str) -> bool:
    """``a`` has ``size`` bytes and the header and trailer ``head_tail`` (hex)."""
    try:
        with open(a, "rb") as f:
            if os.fstat(f.fileno()).st_size != size:
                return False
            got = os.pread(f.fileno(), SEG_HEADER_SIZE, 0) + os.pread(f.fileno(), SEG_TRAILER_SIZE, size - SEG_TRAILER_SIZE)
    except OSError:
        return False
    return got.hex() == head_tail


def _link_or_copy(copier: _Copier, src: str, dst: str, seg: SourceSegment) -> bool:
    """Hard-link ``src`` as ``dst``; where the file systems differ (or refuse links), copy
    it, checked. True when linked."""
    try:
        os.link(src, dst)
        DISK.fsync_dir(os.path.dirname(dst))
        return True
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise StorageError("link", dst, exc) from None
    copier.copy_sealed(src, dst)
    return False


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _previous_backup(dest: str, store_id: bytes) -> Manifest | None:
    """The manifest of a previous backup of this store in ``dest``; None when ``dest`` is
    missing or empty; ``BackupRefused`` for anything else."""
    names = _listing(dest)
    if not names:
        return None
    if MANIFEST_FILE not in names:
        raise BackupRefused(dest, f"it is not empty and holds no {MANIFEST_FILE} (not a backup made by bp.backup)")
    path = os.path.join(dest, MANIFEST_FILE)
    raw = DISK.read_file(path)
    manifest = decode_manifest(raw or b"", path)
    if manifest.store_id != store_id:
        raise BackupRefused(dest, f"it is a backup of another store ({manifest.store_id.hex()}, this one is "
                            f"{store_id.hex()})", manifest.store_id.hex())
    if lock_holder(writer_lock_path(dest)) is not None:
        raise StoreLocked(dest, lock_holder(writer_lock_path(dest)))
    return manifest


# -- bp.backup ----------------------------------------------------------------------------------
def backup(data_dir: str | os.PathLike[str], dest: str | os.PathLike[str], *,
           progress: Progress | None = None, max_rate: float | None = None) -> BackupReport:
    """Copy the store in ``data_dir`` into ``dest`` consistently, while its service runs
    or not: every event durable when the backup started, whole commits only, checked as
    copied. ``dest`` is missing, empty, or a previous backup of the same store (then only
    what is new is copied). ``dest`` is replaced atomically: interrupted at any point, it
    is the previous backup or the new one. A backup is a store directory: ``bp.serve``
    serves it, ``bp.restore`` puts it in place. ``progress(done, total)``: bytes.
    ``max_rate``: bytes per second to copy at most, to leave the disk to the service
    (``tools/bench_backup.py`` measures what a backup costs appending clients).

    Typed errors: ``BackupRefused`` (``dest`` inside the store, or holding something
    else), ``InvalidArgument`` (not a store), ``CorruptSegment`` (the source fails its
    checksums), ``DiskFull``/``StorageError``; the source is never changed."""
    started = time.perf_counter()
    if max_rate is not None and (isinstance(max_rate, bool) or not isinstance(max_rate, (int, float))
                                 or not max_rate > 0):
        raise InvalidArgument("max_rate", max_rate, "must be a number of bytes per second > 0, or None")
    src = _Source(os.path.abspath(os.fspath(data_dir)))
    target = _Target(os.path.abspath(os.fspath(dest)))
    _check_apart(src.root, target.path)
    with target.locked():
        previous = _previous_backup(target.path, src.store_id)
        frontier, _ = src.frontier()
        segments = src.segments()
        names = {seg.segment_id: f"{SEGMENT_DIR}/{segment_name(seg.segment_id)}" for seg in segments}
        prev_files = {f.name: f for f in previous.files} if previous else {}
        steps = plan_segments(segments, frontier, previous=prev_files, names=names, fork=False)
        if frontier and (not steps or steps[-1].through < frontier):
            raise CorruptSegment(src.seg_dir, 0, f"sequence {frontier} was durable but no segment holds it")
        copier = _Copier(progress, sum(s.segment.size for s in steps if s.action != "reuse"), max_rate)
        staging = target.start()
        files: list[ManifestFile] = []
        reused = 0
        for s in steps:
            name = names[s.segment.segment_id]
            src_path, dst_path = src.path(s.segment.segment_id), os.path.join(staging, name)
            size, seal = s.segment.size, s.segment.seal
            if s.action == "reuse" and _reuse(os.path.join(target.path, name), dst_path, s.segment):
                reused += 1
            elif s.segment.seal:
                copier.total += s.segment.size if s.action == "reuse" else 0  # the previous copy changed
                size, seal = copier.copy_sealed(src_path, dst_path)
            else:
                copier.copy_prefix(src_path, dst_path, s.segment, s.through, "frontier")
            files.append(ManifestFile(name, size, seal))
            copier.step()
        last = steps[-1].through if steps else 0
        for side in SIDE_FILES:
            data = DISK.read_file(os.path.join(src.root, side))
            if data is not None:
                _write_new(os.path.join(staging, side), data)
        _write_new(os.path.join(staging, META_FILE), src.meta)
        _write_new(os.path.join(staging, MANIFEST_FILE),
                   encode_manifest(Manifest(src.store_id, last, _now_ms(), tuple(files))))
        copier.step()
        old = target.publish(copier.step)
        if old is not None:
            _remove_tree(old)
            copier.step()
    return BackupReport(target.path, src.store_id.hex(), last, copier.files, reused, copier.done,
                        time.perf_counter() - started, previous is not None)


def _reuse(old: str, new: str, seg: SourceSegment) -> bool:
    """Take the previous backup's copy of a sealed segment (hard link inside the same
    parent) when it is still the same file; False: copy it from the source instead."""
    if not _same_file(old, seg.size, seg.seal):
        return False
    try:
        os.link(old, new)
    except OSError:
        return False
    return True


# -- bp.fork ------------------------------------------------------------------------------------
def fork(data_dir: str | os.PathLike[str], dest: str | os.PathLike[str], *, at: int | None = None,
         progress: Progress | None = None) -> ForkReport:
    """Make ``dest`` a new store (its own store id; ``store.meta`` holds the lineage
    record: parent store id and fork point) holding ``data_dir``'s history through
    sequence ``at`` (default: the durable frontier now), while the parent is served or
    not. Sealed segments that end by ``at`` are shared by hard link (copied, checked,
    when ``dest`` is on another file system); the segment holding ``at`` becomes a
    private, sealed copy, so neither store's later writes reach the other. ``at`` must
    end a commit. Typed errors as ``backup``'s, and ``BackupRefused`` when ``dest`` is not
    empty, ``InvalidArgument`` for an ``at`` past the frontier or inside a batch."""
    started = time.perf_counter()
    src = _Source(os.path.abspath(os.fspath(data_dir)))
    target = _Target(os.path.abspath(os.fspath(dest)))
    _check_apart(src.root, target.path)
    if at is not None and (not isinstance(at, int) or isinstance(at, bool) or at < 0):
        raise InvalidArgument("at", at, "must be a sequence number >= 0")
    with target.locked():
        if _listing(target.path):
            raise BackupRefused(target.path, "a fork needs a missing or empty directory")
        hint, served = src.durable_hint()
        found = find_frontier(src.root, hint)
        try:
            limit = min(found.visible, hint[1]) if served and hint is not None else found.visible
            point = limit if at is None else at
            if point > limit:
                raise InvalidArgument("at", at, f"is past the store's durable frontier {limit}")
            segments = src.segments()
            steps = plan_segments(segments, point, previous={}, names={}, fork=True)
            total = sum(s.segment.size for s in steps if s.action == "prefix")
            copier = _Copier(progress, total)
            staging = target.start()
            linked = 0
            for s in steps:
                name = segment_name(s.segment.segment_id)
                src_path, dst_path = src.path(s.segment.segment_id), os.path.join(staging, SEGMENT_DIR, name)
                if s.action == "link":
                    _check_sealed(src_path)
                    linked += _link_or_copy(copier, src_path, dst_path, s.segment)
                else:
                    end, frames = copier.copy_prefix(src_path, dst_path, s.segment, s.through, "at")
                    _seal_copy(dst_path, s.segment, end, _footer_records(s.segment.segment_id, frames, found.records))
                copier.step()
        finally:
            if isinstance(found.records, mmap.mmap):
                found.records.close()
        keys = DISK.read_file(os.path.join(src.root, SIDE_FILES[2]))  # read after the segments, as a backup does
        if keys is not None:
            _write_new(os.path.join(staging, SIDE_FILES[2]), keys)  # inherited encrypted payloads stay readable
        fork_id = secrets.token_bytes(16)
        inherited = tuple((sid, min(t, point)) for sid, t in (src.lineage.inherited if src.lineage else ()))
        lineage = Lineage(src.store_id, point, (*inherited, (src.store_id, point)))
        _write_new(os.path.join(staging, META_FILE), encode_meta(fork_id, _now_ms(), lineage))
        copier.step()
        old = target.publish(copier.step)
        if old is not None:
            _remove_tree(old)
    return ForkReport(target.path, fork_id.hex(), src.store_id.hex(), point, linked, copier.files, copier.done,
                      time.perf_counter() - started)


def _check_sealed(path: str) -> None:
    """A sealed segment passes its whole-file checksum (which covers its footer)."""
    m = _map(path)
    try:
        trailer = decode_trailer(m[len(m) - SEG_TRAILER_SIZE:])
        if trailer is None:
            raise CorruptSegment(path, len(m) - SEG_TRAILER_SIZE, "segment is no longer sealed")
        sealed_verdict(path, m, trailer, footer=False).check()  # the checksum covers the footer
    finally:
        m.close()


def _seal_copy(path: str, seg: SourceSegment, end: int, records: bytes) -> None:
    """Seal a private prefix copy as the writer seals (FORMAT.md §3.6): footer at
    ``end``, fsync, trailer with the whole-file checksum, fsync."""
    footer = encode_footer(seg.first_seq, records)
    if end + len(footer) > seg.size - SEG_TRAILER_SIZE:
        raise CorruptSegment(path, end, "no room for the seal footer (the writer always leaves it)")

    fd = DISK.open(path, os.O_RDWR)
    try:
        DISK.pwrite(fd, footer, end, path)
        DISK.fsync(fd, path)  # the footer before the trailer that vouches for it (§3.6)
        m = DISK.map_shared(fd, seg.size, path, writable=False)
        try:
            crc = zlib.crc32(memoryview(m)[: seg.size - SEG_TRAILER_SIZE])
        finally:
            m.close()
        DISK.pwrite(fd, encode_trailer(end, len(footer), crc), seg.size - SEG_TRAILER_SIZE, path)
        DISK.fsync(fd, path)
    finally:
        DISK.close_quietly(fd, path)


# -- bp.restore ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _held_locks(data_dir: str) -> Iterator[None]:
    """Hold the supervisor and writer locks of ``data_dir`` (created when missing) so no
    service starts while it is replaced; ``AlreadyServed`` when one is running."""
    fds: list[int] = []
    try:
        if os.path.isdir(data_dir):
            for path in (supervisor_lock_path(data_dir), writer_lock_path(data_dir)):
                fds.append(_open_lock_file(path))
                fd = fds[-1]
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise AlreadyServed(data_dir, lock_holder(path), "restore refuses a directory that is "
                                        "being served: stop its service first") from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _open_lock_file(path: str) -> int:
    return _os("open", path, lambda: os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))


def restore(backup_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str], *, force: bool = False,
            progress: Progress | None = None) -> RestoreReport:
    """Put the backup ``backup_dir`` in place as ``data_dir``: refused while ``data_dir``
    is served (``AlreadyServed``) or when it holds another store (``BackupRefused``,
    unless ``force``); the backup is copied beside it, checked with ``bp.verify``, the
    directory's stale IPC objects (a control block whose durable frontier would hold
    recovery to the old store) are removed, and the copy replaces the directory in one
    atomic step. Its previous contents are kept at ``<data_dir>.pre-restore-<ms>``."""
    started = time.perf_counter()
    src = _Source(os.path.abspath(os.fspath(backup_dir)))
    target = _Target(os.path.abspath(os.fspath(data_dir)))
    _check_apart(src.root, target.path)
    with target.locked(), _held_locks(target.path):
        names = _listing(target.path) or []
        meta = DISK.read_file(os.path.join(target.path, META_FILE)) if names else None
        found = decode_meta(meta, target.path) if meta is not None else None
        mine = {os.path.basename(supervisor_lock_path(target.path)), os.path.basename(writer_lock_path(target.path))}
        if not force and found is not None and found != src.store_id:
            raise BackupRefused(target.path, f"it holds another store ({found.hex()}; the backup is of "
                                f"{src.store_id.hex()}): pass force to replace it", found.hex())
        if not force and found is None and set(names) - mine:
            raise BackupRefused(target.path, "it is not empty and not a batpak-mp store: pass force to replace it")
        segments = src.segments()
        copier = _Copier(progress, sum(s.size for s in segments))
        staging = target.start()
        for seg in segments:
            dst = os.path.join(staging, SEGMENT_DIR, segment_name(seg.segment_id))
            if seg.seal:
                copier.copy_sealed(src.path(seg.segment_id), dst)
            else:
                copier.copy_prefix(src.path(seg.segment_id), dst, seg, None, "backup")
        for side in (META_FILE, *SIDE_FILES):
            data = DISK.read_file(os.path.join(src.root, side))
            if data is not None:
                _write_new(os.path.join(staging, side), data)
        report = verify(staging)
        if not report.ok:
            p = report.problems[0]
            raise CorruptSegment(os.path.join(src.root, p.segment), p.offset,
                                 f"the backup fails verification: {p.what}")
        last = _last_sequence(staging)
        with contextlib.suppress(BatpakError, OSError):
            cleanup_ipc(target.path)  # the old service's objects: its durable frontier is the old store's
        old = target.publish(copier.step)
        kept: str | None = None
        if old is not None:
            if set(os.listdir(old)) - mine:
                kept = _keep_aside(old, f"{target.path}.pre-restore-{_now_ms()}")
                DISK.fsync_dir(target.parent)
            else:
                _remove_tree(old)
    return RestoreReport(target.path, src.store_id.hex(), last, kept, time.perf_counter() - started)


def _keep_aside(old: str, new: str) -> str:
    _os("rename", new, lambda: os.rename(old, new))
    return new


def _last_sequence(root: str) -> int:
    found = find_frontier(root)
    if isinstance(found.records, mmap.mmap):
        found.records.close()
    return found.visible

