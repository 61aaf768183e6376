"""The one seam through which the engine touches the operating system.

Owns: every file-system call the write side makes (open, close, dup, fstat, pread,
pwrite, fsync, fallocate, zeroing and hole punching, rename, unlink, listdir, flock,
mmap, the lock file). Each failure becomes a ``StorageError`` naming the operation and
the path, so no raw ``OSError`` escapes; a full file system (ENOSPC, EDQUOT) is its
subclass ``DiskFull``. Tests pass a ``Disk`` with a ``FaultPlan`` to make chosen calls
fail (ENOSPC, EIO, short writes) without patching anything by string; the op names a
plan uses are the ``op`` of the errors (``"fsync"`` covers fsync, fdatasync and
directory fsyncs).
Invariants: the only module of ``batpak_mp._storage`` that calls ``os`` (checked by
tests/rules/test_storage_seam.py); a failed ``close`` still releases the descriptor, as
Linux does; zeroing a range keeps its blocks allocated where the file system lets it (a
preallocated segment must not have to allocate again, and meet ENOSPC, mid-append);
``allocate`` never shrinks a file; a file written through a mapping is allocated first
(a write to a sparse mapping on a full file system is SIGBUS, not an error).
Must not import the engine, the writer or the client.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .._errors import DiskFull, StorageError

T = TypeVar("T")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10  # zeros that stay allocated (ext4, xfs); tmpfs and btrfs lack it
_ZERO_CHUNK = 1 << 20  # bytes written per call when neither zeroing nor hole punching is supported
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # fallocate modes a file system lacks
_FULL = (errno.ENOSPC, errno.EDQUOT)  # the file system (or the owner's quota) is full

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
except (OSError, AttributeError):  # not glibc: fall back to writing zeros
    _libc = None


@dataclass
class FaultPlan:
    """Which calls fail: ``fail[op] = (countdown, errno)``; the call fails when its
    countdown reaches zero (0 = the next call). ``short_write_at`` truncates the next
    pwrite to that many bytes (then raises ENOSPC, as a full disk does)."""

    fail: dict[str, tuple[int, int]] = field(default_factory=dict)
    short_write_at: int | None = None
    boot_id: bytes | None = None  # pretend another boot (tests of the cold recovery path)
    calls: dict[str, int] = field(default_factory=dict)

    def check(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        spec = self.fail.get(op)
        if spec is None:
            return
        countdown, err = spec
        if countdown <= 0:
            del self.fail[op]
            raise OSError(err, os.strerror(err))
        self.fail[op] = (countdown - 1, err)


class Disk:
    """File-system calls, each turned into ``StorageError`` on failure."""

    def __init__(self, faults: FaultPlan | None = None) -> None:
        self.faults = faults

    def _do(self, op: str, path: str, fn: Callable[[], T], *, inject: bool = True) -> T:
        try:
            if inject and self.faults is not None:
                self.faults.check(op)
            return fn()
        except StorageError:
            raise
        except OSError as exc:
            raise (DiskFull if exc.errno in _FULL else StorageError)(op, path, exc) from exc

    # -- files --------------------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return self._do("open", path, lambda: os.open(path, flags | os.O_CLOEXEC, mode))

    def close(self, fd: int, path: str = "") -> None:
        """Close ``fd``. Even when this reports an error the descriptor is gone (Linux
        releases it before reporting), so a caller never closes it again."""
        def run() -> None:
            try:
                if self.faults is not None:
                    self.faults.check("close")
            finally:
                os.close(fd)
        self._do("close", path, run, inject=False)

    def close_quietly(self, fd: int, path: str = "") -> None:
        """Close ``fd`` when an error is already on its way or the file's data is already
        fsynced: a failure here has nothing left to report."""
        try:
            self.close(fd, path)
        except StorageError:
            pass

    def fstat(self, fd: int, path: str) -> os.stat_result:
        return self._do("fstat", path, lambda: os.fstat(fd))

    def open_existing(self, path: str, flags: int) -> int | None:
        """``open`` without O_CREAT: None when the file does not exist."""
        def run() -> int | None:
            try:
                return os.open(path, flags | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
        return self._do("open", path, run)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int, path: str) -> None:
        """Write all of ``data`` at ``offset`` (loops over short writes)."""
        def run() -> None:
            view = memoryview(data)
            plan = self.faults
            if plan is not None and plan.short_write_at is not None:
                cut = plan.short_write_at
                plan.short_write_at = None
                os.pwrite(fd, view[:cut], offset)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            pos = 0
            while pos < len(view):
                n = os.pwrite(fd, view[pos:], offset + pos)
                if n <= 0:
                    raise OSError(errno.EIO, "pwrite wrote nothing")
                pos += n
        self._do("pwrite", path, run)

    def pread(self, fd: int, size: int, offset: int, path: str) -> bytes:
        return self._do("pread", path, lambda: os.pread(fd, size, offset))

    def fsync(self, fd: int, path: str) -> None:
        self._do("fsync", path, lambda: os.fsync(fd))

    def fdatasync(self, fd: int, path: str) -> None:
        self._do("fsync", path, lambda: os.fdatasync(fd))

    def fsync_dir(self, path: str) -> None:
        def run() -> None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._do("fsync", path, run)

    def allocate(self, fd: int, size: int, path: str) -> None:
        """Make the file at least ``size`` bytes long with all of them allocated, so later
        writes (through ``pwrite`` or a mapping) cannot meet ENOSPC. Never shrinks it."""
        def run() -> None:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                if os.fstat(fd).st_size < size:  # no allocation here: at least the size
                    os.ftruncate(fd, size)
        self._do("fallocate", path, run)

    def truncate(self, fd: int, size: int, path: str) -> None:
        self._do("ftruncate", path, lambda: os.ftruncate(fd, size))

    def zero_range(self, fd: int, offset: int, length: int, path: str) -> None:
        """Make [offset, offset+length) read as zeros without changing the file size
        (readers may have the file mapped: shrinking it would SIGBUS them) and keep it
        allocated (a preallocated segment must not allocate again mid-append): zero it
        in place (FALLOC_FL_ZERO_RANGE) where the file system can; else punch a hole and
        allocate the range again; else write zeros. The zeros are the guarantee; when the
        file system is full the range may stay a hole (a later write there then fails
        typed, as any write on a full disk does)."""
        def run() -> None:
            if length <= 0:
                return
            if _fallocate(fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length, _UNSUPPORTED + _FULL):
                return
            if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length, _UNSUPPORTED):
                _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length, _UNSUPPORTED + _FULL)
                return
            zeros = bytes(min(_ZERO_CHUNK, length))
            pos = 0
            while pos < length:
                n = os.pwrite(fd, memoryview(zeros)[:min(len(zeros), length - pos)], offset + pos)
                if n <= 0:
                    raise OSError(errno.EIO, "pwrite wrote nothing")
                pos += n
        self._do("zero_range", path, run)

    def dup(self, fd: int, path: str) -> int:
        """A second descriptor of the same open file: its holder (another thread) may
        use it, and must close it, whatever happens to ``fd`` meanwhile."""
        return self._do("dup", path, lambda: os.dup(fd))

    def write_file_atomic(self, path: str, data: bytes) -> None:
        """Write a small file by temp + fsync + rename + directory fsync. Every byte is
        written (short writes are continued) or it fails typed: the temp file is then
        removed (it holds space a full disk needs back) and ``path`` is left as it was."""
        tmp = path + ".tmp"
        def run() -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except BaseException:
                _unlink_quietly(tmp)
                raise
        self._do("write", path, run)
        self.fsync_dir(os.path.dirname(path) or ".")

    def write_file(self, path: str, data: bytes) -> None:
        """Write a whole file that nothing reads until a later step names it (derived
        data, rebuilt after a reboot): no temp file, rename or fsync. Every byte is
        written or it fails typed, and the partial file is then removed."""
        def run() -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            except BaseException:
                _unlink_quietly(path)
                raise
        self._do("write", path, run)

    def read_file(self, path: str) -> bytes | None:
        """The whole file, or None when it does not exist."""
        def run() -> bytes | None:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None
        return self._do("read", path, run)

    def file_size(self, path: str) -> int:
        return self._do("stat", path, lambda: os.stat(path).st_size)

    def listdir(self, path: str) -> list[str]:
        return self._do("listdir", path, lambda: sorted(os.listdir(path)))

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        def run() -> None:
            os.makedirs(path, mode=mode, exist_ok=True)
            os.chmod(path, mode)
        self._do("mkdir", path, run)

    def replace(self, src: str, dst: str) -> None:
        self._do("rename", dst, lambda: os.replace(src, dst))

    def unlink(self, path: str) -> None:
        def run() -> None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._do("unlink", path, run)

    def unlink_quietly(self, path: str) -> None:
        """Remove a file of a step that failed: an error is already on its way."""
        try:
            self.unlink(path)
        except StorageError:
            pass

    def boot_id(self) -> bytes:
        """16 bytes naming this boot of the kernel (zeros when unknown). Data written in
        the same boot is still in the page cache after a process crash."""
        if self.faults is not None and self.faults.boot_id is not None:
            return self.faults.boot_id
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                return bytes.fromhex(f.read().strip().replace("-", ""))[:16].ljust(16, b"\0")
        except (OSError, ValueError):
            return bytes(16)

    # -- locking and mapping ------------------------------------------------------------
    def try_lock(self, fd: int, path: str) -> bool:
        """Take an exclusive flock; False when someone else holds it."""
        def run() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
        return self._do("flock", path, run)

    def take_lock(self, path: str) -> tuple[int, int]:
        """Open the lock file ``path`` (created when missing), take its exclusive flock and
        write this process's id into it: (fd, 0). When another process holds it: (-1, the
        holder's pid as its file says, 0 when unreadable); nothing is left open."""
        fd = self.open(path, os.O_RDWR | os.O_CREAT)
        try:
            if self.try_lock(fd, path):
                self.truncate(fd, 0, path)
                self.pwrite(fd, f"{os.getpid()}\n".encode(), 0, path)
                return fd, 0
            try:
                holder = int(self.pread(fd, 32, 0, path).split(b"\n")[0] or 0)
            except (StorageError, ValueError):
                holder = 0
        except BaseException:
            self.close_quietly(fd, path)
            raise
        self.close_quietly(fd, path)  # the caller reports the lock as taken: that is the news
        return -1, holder

    def map_shared(self, fd: int, size: int, path: str, *, writable: bool) -> mmap.mmap:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return self._do("mmap", path, lambda: mmap.mmap(fd, size, mmap.MAP_SHARED, prot))

    def map_readonly(self, path: str) -> mmap.mmap | None:
        """A read-only shared mapping of a whole file, as every reader maps it (the
        reader's own ``map_readonly``); None when it is missing or empty."""
        fd = self.open_existing(path, os.O_RDONLY)
        if fd is None:
            return None
        try:
            size = self.fstat(fd, path).st_size
            return self.map_shared(fd, size, path, writable=False) if size else None
        finally:
            self.close_quietly(fd, path)  # read-only: the mapping outlives the descriptor


def _fallocate(fd: int, mode: int, offset: int, length: int, declined: tuple[int, ...]) -> bool:
    """fallocate(2) with ``mode``: True when done, False when it failed with an errno in
    ``declined`` (or there is no libc to call); any other failure raises."""
    if _libc is None:
        return False
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in declined:
        return False
    raise OSError(err, os.strerror(err))


def _write_all(fd: int, data: bytes) -> None:
    """``write`` until every byte is written: a short write (a file system filling up,
    a signal) is continued, and the call after it reports why it stopped."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        n = os.write(fd, view[pos:])
        if n <= 0:
            raise OSError(errno.EIO, "write wrote nothing")
        pos += n


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


DEFAULT_DISK = Disk()
