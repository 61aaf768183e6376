"""Cross-process wake-ups on a 32-bit word in shared memory (Linux futex).

Owns: the two futex calls the store needs — wait while a word still holds a value, and
wake every waiter — on memory shared between processes (non-private futexes), plus
getting the address of a word in a mapping, and a table of words rung one at a time
(the doorbells). The writer rings the notify word after each publish and a doorbell
after each reply; any number of waiters in any number of processes sleep in the kernel,
using no CPU and holding no state in the writer (a killed waiter leaves nothing behind).
Every word lives in memory the writer made and checked (the control block), so ringing
one can never fault on a file a client truncated.
Must not import the engine, the writer or the client.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import platform
from typing import Any

_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98, "i386": 240, "i686": 240,
              "armv7l": 240, "ppc64le": 221, "s390x": 238, "riscv64": 98}.get(platform.machine().lower())
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_INT_MAX = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

AVAILABLE = _SYS_FUTEX is not None


class Word:
    """A 32-bit word at ``address`` (kept alive by ``owner``) to wait on or ring."""

    def __init__(self, address: int, owner: object) -> None:
        self.address = address
        self._owner = owner  # the mapping must outlive the address
        self._value = ctypes.c_uint32.from_address(address)
        self._arg = ctypes.c_void_p(address)  # made once: every wait and ring passes it

    @property
    def value(self) -> int:
        return int(self._value.value)

    def wait(self, expected: int, timeout: float | None) -> None:
        """Sleep while the word equals ``expected`` (returns at once if it does not), until
        woken, the timeout passes, or a signal arrives. Spurious returns are allowed."""
        if _SYS_FUTEX is None:  # pragma: no cover - other platforms: a short sleep
            import time

            time.sleep(min(timeout or 0.01, 0.01))
            return
        ts = None
        if timeout is not None:
            timeout = max(timeout, 0.0)
            ts = _Timespec(int(timeout), int((timeout - int(timeout)) * 1e9))
        rc = _syscall(_SYS_FUTEX, self._arg, _FUTEX_WAIT, ctypes.c_uint32(expected),
                      ctypes.byref(ts) if ts is not None else None, None, 0)
        if rc == -1:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
                raise OSError(err, "futex wait failed")

    def ring(self) -> None:
        """Bump the word and wake every waiter (writer side; the mapping is writable)."""
        self._value.value = (self._value.value + 1) & 0xFFFFFFFF
        if _SYS_FUTEX is not None:
            _syscall(_SYS_FUTEX, self._arg, _FUTEX_WAKE, _INT_MAX, None, None, 0)


class WordTable:
    """``count`` consecutive 32-bit words at ``offset`` of a writable Python mmap, each
    rung on its own (the writer's side of the doorbells)."""

    def __init__(self, mm: mmap.mmap, offset: int, count: int) -> None:
        self._words: Any = (ctypes.c_uint32 * count).from_buffer(mm, offset)
        self._base = ctypes.addressof(self._words)
        self._args: dict[int, ctypes.c_void_p] = {}  # index -> its address as a call argument, made once

    def ring(self, index: int) -> None:
        """Bump word ``index`` and wake every waiter on it."""
        words = self._words
        words[index] = (words[index] + 1) & 0xFFFFFFFF
        if _SYS_FUTEX is not None:
            arg = self._args.get(index)
            if arg is None:
                arg = self._args[index] = ctypes.c_void_p(self._base + 4 * index)
            _syscall(_SYS_FUTEX, arg, _FUTEX_WAKE, _INT_MAX, None, None, 0)

    def release(self) -> None:
        """Drop the view, so the mapping can be closed."""
        self._words = None


def word_in_writable(mm: mmap.mmap, offset: int) -> Word:
    """The word at ``offset`` of a writable Python mmap."""
    cell = ctypes.c_uint32.from_buffer(mm, offset)
    return Word(ctypes.addressof(cell), (mm, cell))


class ReadOnlyMapping:
    """A read-only MAP_SHARED mapping made with libc, so its address is known (Python's
    mmap does not expose the address of a read-only mapping)."""

    def __init__(self, fd: int, size: int) -> None:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap of the control block failed")
        self.address: int = addr
        self.size = size

    def word(self, offset: int) -> Word:
        return Word(self.address + offset, self)

    def close(self) -> None:
        if self.address:
            _libc.munmap(ctypes.c_void_p(self.address), self.size)
            self.address = 0
