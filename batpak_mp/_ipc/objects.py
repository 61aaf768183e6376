"""Opening, creating, checking and removing the IPC objects of a store, safely.

Owns (docs/PROTOCOL.md §2.1, docs/OPERATIONS.md "Trust model"): what every IPC object
must be before a process of the service uses it, checked with ``fstat`` on the very
descriptor that was opened (so what was checked is what is used): owned by the expected
user, no group or other permission bits, the expected file type, one link, a size in
range. And what happens when an object fails: one the service creates itself (control
block, request queue) but finds made by someone else is unlinked and made afresh with
``O_CREAT|O_EXCL`` — or, when it cannot be removed (another user's file in the sticky
``/dev/shm``), refused with ``UnsafeIpcObject`` naming it and its owner; a client area is
refused. Also: whether a process really maps a client area (the kernel's word for who
made it, from ``/proc/<pid>/maps``), and the sweep of a store's client objects in
``/dev/shm`` (strict names, regular files of this user only, never an exception).

Invariants: nothing here maps memory; a shared-memory object is opened with
``O_NOFOLLOW`` (a symlink is never followed) and ``O_NONBLOCK`` (a FIFO never blocks);
the names come from ``names`` and are never built here. Linux only (``/dev/shm``,
``/proc``, descriptors for message queues), as the rest of the IPC layer.
Must not import the storage layer, the read layer or any process role.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import NamedTuple

import posix_ipc

from .._errors import UnsafeIpcObject
from .names import SHM_DIR, client_objects, control_name, ipc_prefix, request_queue_name, shm_file

CREATE_ATTEMPTS = 5  # squatted names replaced in a row before giving up (someone re-creates them)
MODE = 0o600  # every object of a store: its owner reads and writes, nobody else
MQUEUE_DIR = "/dev/mqueue"  # where the queue's owner can be read when it cannot be opened (if mounted)
_OPEN_SHM = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_READ_SHM = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class Expect(NamedTuple):
    """What an object must be."""

    uid: int  # its owner: the service's user
    min_size: int = 0
    max_size: int | None = None
    single_link: bool = True  # no other name reaches it (a link could make it "another" object)


def problem(st: os.stat_result, expect: Expect) -> str | None:
    """Why an object with status ``st`` may not be used, or None. Pure."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != expect.uid:
        return f"belongs to uid {st.st_uid}, not to the service's uid {expect.uid}"
    if st.st_mode & 0o077:
        return "is open to other users (group/other permission bits)"
    if expect.single_link and st.st_nlink != 1:
        return f"has {st.st_nlink} links (another name reaches the same memory)"
    if st.st_size < expect.min_size:
        return f"is {st.st_size} bytes, under {expect.min_size}"
    if expect.max_size is not None and st.st_size > expect.max_size:
        return f"is {st.st_size} bytes, over {expect.max_size}"
    return None


def shm_path(name: str) -> str:
    return os.path.join(SHM_DIR, shm_file(name))


def _refuse(name: str, st: os.stat_result | None, why: str) -> UnsafeIpcObject:
    return UnsafeIpcObject(name, -1 if st is None else st.st_uid, 0 if st is None else st.st_mode, why)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


# -- shared memory ------------------------------------------------------------------------------
def create_shared_memory(name: str, size: int, *, adopt: Callable[[int, os.stat_result], bool],
                         log: Callable[[str], None] | None = None) -> int:
    """A descriptor (read-write) of the shared-memory object ``name``, at least ``size``
    bytes: created (mode 0600) when missing; an existing one is used only when it passes
    the checks as this user's and ``adopt(fd, st)`` accepts it (e.g. its magic), else it
    is unlinked and created afresh. ``UnsafeIpcObject`` when it cannot be removed."""
    path = shm_path(name)
    uid = os.geteuid()
    for _ in range(CREATE_ATTEMPTS):
        try:
            fd = os.open(path, _OPEN_SHM | os.O_CREAT | os.O_EXCL, MODE)
        except FileExistsError:
            pass
        else:
            os.ftruncate(fd, size)
            return fd
        fd, st, why = _open_existing(path, Expect(uid, single_link=False), adopt)
        if fd >= 0:
            assert st is not None
            if st.st_size < size:
                os.ftruncate(fd, size)
            return fd
        if why:
            _remove(name, path, st, why, log)
    raise _refuse(name, _lstat(path), f"kept being re-created by another process ({CREATE_ATTEMPTS} attempts)")


def _open_existing(path: str, expect: Expect, adopt: Callable[[int, os.stat_result], bool],
                   ) -> tuple[int, os.stat_result | None, str]:
    """(fd, st, "") for a usable object; (-1, st, why) for one to replace; (-1, None, "")
    when it vanished meanwhile."""
    try:
        fd = os.open(path, _OPEN_SHM)
    except FileNotFoundError:
        return -1, None, ""
    except OSError as exc:  # a symlink (ELOOP), another user's (EACCES), a directory...
        st = _lstat(path)
        return -1, st, "" if st is None else (problem(st, expect) or f"cannot be opened ({exc.strerror})")
    st = os.fstat(fd)
    why = problem(st, expect)
    if why is None and not adopt(fd, st):
        why = f"is not one of this store's (with {st.st_nlink} links)"
    if why is None:
        return fd, st, ""
    os.close(fd)
    return -1, st, why


def _remove(name: str, path: str, st: os.stat_result | None, why: str, log: Callable[[str], None] | None) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _refuse(name, st, f"{why}, and cannot be removed ({exc.strerror}): remove it as its owner or root, "
                                "then start the service again") from None
    if log is not None:
        log(f"replaced {name}: it {why}")


def open_shared_memory(name: str, expect: Expect, *, write: bool = False) -> int:
    """A descriptor of the existing object ``name`` that passes ``expect``:
    ``FileNotFoundError`` when there is none, ``UnsafeIpcObject`` when it fails."""
    path = shm_path(name)
    try:
        fd = os.open(path, _OPEN_SHM if write else _READ_SHM)
    except FileNotFoundError:
        raise
    except OSError as exc:
        st = _lstat(path)
        raise _refuse(name, st, (problem(st, expect) if st is not None else None)
                      or f"cannot be opened ({exc.strerror})") from None
    st = os.fstat(fd)
    why = problem(st, expect)
    if why is not None:
        os.close(fd)
        raise _refuse(name, st, why)
    return fd


def maps_file(pid: int, st: os.stat_result) -> bool | None:
    """Whether process ``pid`` has the file of ``st`` mapped (a client maps its area
    while it uses it; the kernel vouches for that, not for a name): None when the
    kernel will not say (its maps unreadable to us)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return None
    needle = b" %d " % st.st_ino
    dev = b"%02x:%02x " % (os.major(st.st_dev), os.minor(st.st_dev))
    where = SHM_DIR.encode()
    return any(needle in line and dev in line and where in line for line in data.splitlines())


# -- message queues -----------------------------------------------------------------------------
def create_request_queue(name: str, depth: int, message_size: int,
                         log: Callable[[str], None] | None = None) -> posix_ipc.MessageQueue:
    """The writer's end of the request queue ``name`` (it reads requests, and writes only
    the wake-up its own syncer thread sends the loop): created (mode 0600)
    when missing; an existing queue is used only when it is this user's, 0600, with these
    limits; else unlinked and created afresh (``UnsafeIpcObject`` when it cannot be)."""
    uid = os.geteuid()
    st: os.stat_result | None = None
    for _ in range(CREATE_ATTEMPTS):
        try:
            return posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=MODE, max_messages=depth,
                                          max_message_size=message_size, read=True, write=True)
        except posix_ipc.ExistentialError:
            pass
        try:
            mq = posix_ipc.MessageQueue(name, read=True, write=True)
        except posix_ipc.ExistentialError:
            continue
        except posix_ipc.PermissionsError:
            st = _queue_stat(name)
            why = "is not readable by the service's user" if st is None else (
                problem(st, Expect(uid)) or "is not readable by the service's user")
        else:
            st = os.fstat(mq.mqd)
            why = problem(st, Expect(uid)) or _queue_limits(mq, depth, message_size)
            if not why:
                return mq
            mq.close()
        try:
            posix_ipc.unlink_message_queue(name)
        except posix_ipc.ExistentialError:
            continue
        except posix_ipc.Error as exc:
            raise _refuse(name, st, f"{why}, and cannot be removed ({exc}): remove it as its owner or root, "
                                    "then start the service again") from None
        if log is not None:
            log(f"replaced {name}: it {why}")
    raise _refuse(name, st, f"kept being re-created by another process ({CREATE_ATTEMPTS} attempts)")


def _queue_limits(mq: posix_ipc.MessageQueue, depth: int, message_size: int) -> str:
    if mq.max_messages != depth or mq.max_message_size != message_size:
        return f"holds {mq.max_messages} messages of {mq.max_message_size} bytes, not {depth} of {message_size}"
    return ""


def _queue_stat(name: str) -> os.stat_result | None:
    return _lstat(os.path.join(MQUEUE_DIR, name.lstrip("/")))


def open_request_queue(name: str, uid: int) -> posix_ipc.MessageQueue:
    """A client's end (write-only) of the request queue, checked to be the service's
    (owner ``uid``, mode 0600): ``posix_ipc.ExistentialError`` when there is none,
    ``UnsafeIpcObject`` when it is not the service's."""
    try:
        mq = posix_ipc.MessageQueue(name, read=False, write=True)
    except posix_ipc.PermissionsError:
        st = _queue_stat(name)
        raise _refuse(name, st, "cannot be opened for writing by this user" if st is None
                      else problem(st, Expect(uid)) or "cannot be opened for writing by this user") from None
    why = problem(os.fstat(mq.mqd), Expect(uid))
    if why is not None:
        st = os.fstat(mq.mqd)
        mq.close()
        raise _refuse(name, st, why)
    return mq


# -- the sweep ----------------------------------------------------------------------------------
class Swept(NamedTuple):
    removed: int  # objects unlinked
    skipped: int  # objects left: another owner, not a regular file, could not be removed


def sweep_client_objects(prefix: str, gone: Callable[[int], bool]) -> Swept:
    """Unlink this user's client areas (and old doorbell semaphores) of the store with
    IPC ``prefix`` whose creator pid ``gone`` says is gone (``cleanup``: every one).
    Names are parsed strictly; another user's file, a directory, a symlink or anything
    that cannot be removed is left where it is and counted. Never raises."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return Swept(0, 0)
    uid = os.geteuid()
    removed = skipped = 0
    for obj in client_objects(entries, prefix):
        assert obj.area is not None
        try:
            if not gone(obj.area.pid):
                continue
            path = shm_path(obj.name) if not obj.semaphore else os.path.join(SHM_DIR, shm_file(obj.name, semaphore=True))
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                skipped += 1
                continue
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            continue
        except (OSError, ValueError, OverflowError):
            skipped += 1
    return Swept(removed, skipped)


def remove_store_objects(data_dir: str) -> None:
    """Unlink the store's request queue, its control block and every client area and
    semaphore of it (the service has stopped: the caller made sure nobody serves the
    directory). Gone already, or not this user's to remove: left. Never raises. The one
    removal of a store's objects (``_service.cleanup_ipc``: ``bp.serve``'s stop,
    ``batpak-mp serve`` and ``reset-ipc``)."""
    for unlink, name in ((posix_ipc.unlink_message_queue, request_queue_name(data_dir)),
                         (posix_ipc.unlink_shared_memory, control_name(data_dir))):
        try:
            unlink(name)
        except (posix_ipc.Error, OSError):
            pass
    sweep_client_objects(ipc_prefix(data_dir), lambda pid: True)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (any owner). A pid out of range is not alive."""
    if not 0 < pid < 1 << 31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as exc:  # pragma: no cover - EINVAL and the like
        return exc.errno == errno.EPERM
    return True
