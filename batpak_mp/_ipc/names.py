"""Every name derived from a data directory that more than one process must agree on.

Owns (docs/PROTOCOL.md §2 and §14): the IPC prefix of a data directory, the names of its
control block, request queue and client areas, and the doorbell slot of an area; how a
POSIX name maps to a file in ``/dev/shm`` (shared memory ``bpmp-…``; ``sem.bpmp-…`` for
the doorbell semaphores of wire version 2, which only the cleanup still recognises) and
how such a file name is parsed back (which store, which client pid); and the lock files
in the data directory (the writer's ``LOCK_FILE`` is defined with the other file names in
``_format/directory.py`` and only re-exported here).

Invariants: a name is built in exactly one function here and parsed by its inverse in
the same module (``area_name`` / ``parse_area_name``), so the writer's validation of a
message, the client's naming, the writer's sweep of dead clients and ``cleanup_ipc``
cannot drift apart. Parsing is strict and total: ASCII digits and hex only, a pid within
the kernel's range, anything else is "not ours" (None) and never an exception — the
names come from a world-writable directory. Two spellings of one directory (relative,
symlinked) give one prefix.

Pure but for ``os.path`` (``realpath`` to find the directory's one spelling, ``join``):
no ``posix_ipc``, no listing, stat or unlinking — ``_ipc/objects.py`` does the I/O.
Must not import the storage layer, the read layer or any process role.
"""

from __future__ import annotations

import hashlib
import os.path
import re
import zlib
from typing import NamedTuple

from .._format.directory import LOCK_FILE

SHM_DIR = "/dev/shm"  # where Linux shows POSIX shared memory and semaphores (listing only)
SEM_FILE_PREFIX = "sem."  # glibc names a semaphore's file in SHM_DIR "sem.<name without />"
PREFIX_TAG = "/bpmp-"  # every IPC object of every store starts with it
PREFIX_HASH_BYTES = 6  # 12 hex digits of blake2b(realpath): short enough for NAME_MAX, unique per path
CONTROL_SUFFIX = "-ctl"  # <prefix>-ctl: the control block (shared memory)
QUEUE_SUFFIX = "-req"  # <prefix>-req: the request queue (message queue)
AREA_INFIX = "-c"  # <prefix>-c<pid>-<hex>: a client area (shared memory)
SEMAPHORE_SUFFIX = "s"  # <area>s: an area's doorbell semaphore in wire version 2; "s" is not a hex digit
AREA_TOKEN_BYTES = 4  # random bytes in a new area's name (8 hex digits, after the 3 naming its doorbell word)
BELL_DIGITS = 3  # hex digits at the start of an area token naming its doorbell word (16**3 = 4096 words)
WRITER_LOCK_FILE = LOCK_FILE  # flock'ed by the live writer; probed (never held) by the supervisor
SUPERVISOR_LOCK_FILE = "supervisor.lock"  # flock'ed for a supervisor's life: one per data directory

PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT on 64-bit Linux: no process id is above it
_AREA_TAIL = re.compile(r"-c([1-9][0-9]{0,6})-([0-9a-f]{1,32})", re.ASCII)  # after the prefix; the pid, the token
_PREFIX = re.compile(r"/bpmp-[0-9a-f]{12}", re.ASCII)


def ipc_prefix(data_dir: str) -> str:
    """The name prefix of every IPC object of a data directory (unique per real path)."""
    real = os.path.realpath(data_dir)
    return PREFIX_TAG + hashlib.blake2b(real.encode(), digest_size=PREFIX_HASH_BYTES).hexdigest()


def control_name(data_dir: str) -> str:
    return ipc_prefix(data_dir) + CONTROL_SUFFIX


def request_queue_name(data_dir: str) -> str:
    return ipc_prefix(data_dir) + QUEUE_SUFFIX


def area_prefix(prefix: str) -> str:
    """What every client area name of the store with IPC prefix ``prefix`` starts with."""
    return prefix + AREA_INFIX


def area_name(prefix: str, pid: int, token: str) -> str:
    """A client area's name: its creator's pid and a random hex ``token``."""
    return f"{area_prefix(prefix)}{pid}-{token}"


def semaphore_name(area: str) -> str:
    """The doorbell semaphore a client area had in wire version 2 (cleanup only)."""
    return area + SEMAPHORE_SUFFIX


def doorbell_slot(area: str, slots: int) -> int:
    """Which of the control block's ``slots`` doorbell words rings for ``area``: named by
    the first three hex digits of the area's token (``area_token``), so a client picks its
    word — at random for one area, the same word for all the areas of one asyncio waiter.
    Two areas may share a word: a waiter re-checks its own area(s) on each wake, and a
    wake-up is only a hint, so a client choosing another's word costs it nothing but a
    spurious wake. Any other name falls back to a hash of it."""
    parsed = parse_area_name(area)
    if parsed is None or len(parsed.token) < BELL_DIGITS:
        return zlib.crc32(area.encode()) % slots
    return int(parsed.token[:BELL_DIGITS], 16) % slots


def area_token(bell: int, random_hex: str) -> str:
    """An area token that rings doorbell word ``bell`` (0..4095): three hex digits naming
    the word, then ``random_hex`` (a fresh name per area)."""
    return f"{bell % (16 ** BELL_DIGITS):0{BELL_DIGITS}x}{random_hex}"


class AreaName(NamedTuple):
    prefix: str  # the store's IPC prefix
    pid: int  # the process that created the area
    token: str


def parse_area_name(name: str) -> AreaName | None:
    """The parts of a name made by ``area_name``, else None (anything else)."""
    head = _PREFIX.match(name)
    if head is None:
        return None
    tail = _AREA_TAIL.fullmatch(name, head.end())
    if tail is None:
        return None
    pid = int(tail.group(1))
    return AreaName(head.group(), pid, tail.group(2)) if pid <= PID_MAX else None


def is_area_of(name: str, prefix: str) -> bool:
    """Whether ``name`` is a client area name of the store with IPC prefix ``prefix``."""
    parsed = parse_area_name(name)
    return parsed is not None and parsed.prefix == prefix


def shm_file(name: str, *, semaphore: bool = False) -> str:
    """The file name (in ``SHM_DIR``) of a shared-memory object or semaphore."""
    return (SEM_FILE_PREFIX if semaphore else "") + name.lstrip("/")


class ShmObject(NamedTuple):
    """A file of ``SHM_DIR`` read back as an IPC object."""

    name: str  # its POSIX name (what to unlink)
    semaphore: bool  # a semaphore (else shared memory)
    area: AreaName | None  # the client area it is (or rings for), if it is one


def parse_shm_file(entry: str) -> ShmObject:
    """What the file ``entry`` of ``SHM_DIR`` is (any name: ``area`` tells if it is ours)."""
    semaphore = entry.startswith(SEM_FILE_PREFIX)
    name = "/" + (entry[len(SEM_FILE_PREFIX):] if semaphore else entry)
    if semaphore:
        area = parse_area_name(name[:-len(SEMAPHORE_SUFFIX)]) if name.endswith(SEMAPHORE_SUFFIX) else None
    else:
        area = parse_area_name(name)
    return ShmObject(name, semaphore, area)


def client_objects(entries: list[str], prefix: str) -> list[ShmObject]:
    """The client areas and doorbells among ``entries`` (a listing of ``SHM_DIR``) that
    belong to the store with IPC prefix ``prefix``."""
    found = (parse_shm_file(e) for e in entries)
    return [o for o in found if o.area is not None and o.area.prefix == prefix]


def store_files(entries: list[str], prefix: str) -> list[str]:
    """The files among ``entries`` (a listing of ``SHM_DIR``) that belong to the store
    with IPC prefix ``prefix``: its control block, client areas and doorbells."""
    ours = {shm_file(prefix + CONTROL_SUFFIX)}
    ours.update(shm_file(o.name, semaphore=o.semaphore) for o in client_objects(entries, prefix))
    return sorted(e for e in entries if e in ours)


def writer_lock_path(data_dir: str) -> str:
    return os.path.join(data_dir, WRITER_LOCK_FILE)


def supervisor_lock_path(data_dir: str) -> str:
    return os.path.join(data_dir, SUPERVISOR_LOCK_FILE)
