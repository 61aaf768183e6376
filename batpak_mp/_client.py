"""The client: ``bp.connect(data_dir)`` -> ``Store``, usable from any number of processes.

Owns: the client's shared-memory area, sending requests on the store's queue, waiting
for replies (on the area's doorbell, a futex word of the control block the writer rings
after writing a reply), riding through writer restarts (re-sending the same
request, same idempotency keys, through a fresh area), fork safety (a child re-attaches
on first use), and the lock-free read path (``Reader`` bounded by the control block).
Implements ``_api.EventStore`` (the public API, shared with the in-process ``Engine``) and
``_api.ReplayHost`` (what ``_replay``'s cursors, reactors and projections use; this module
imports ``_replay``, never the reverse). IPC names come from ``_ipc.names``; the control
block and queue it talks to must be the service's (owned by the data directory's owner,
mode 0600: ``_ipc.objects``), so it never sends a request to an object someone else made.
Invariants: every append carries idempotency keys (generated when the caller gives
none), so a re-send is applied at most once; a call ends in a receipt or a typed error,
never a hang past its timeout. Must not import the writer, the engine's commit path or
the supervisor.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import mmap
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar, overload

import posix_ipc

from ._api import EventStore, ReplayHost
from ._crypto import KEYS_FILE, open_for_reading, shred_payload
from ._errors import (
    BatpakError,
    FenceLost,
    InvalidArgument,
    NotFound,
    ProtocolError,
    StoreClosed,
    WriterTimeout,
    WriterUnavailable,
)
from ._gates import Denial, bypass_audit_item, denial_payload, effect_item
from ._groups import DEFAULT_ACK_EVERY as DEFAULT_GROUP_ACK_EVERY
from ._groups import DEFAULT_CHUNK, GroupCursor
from ._ipc import objects
from ._ipc import wire as W
from ._ipc.control import DOORBELLS, ControlBlock, ControlSnapshot, state_name
from ._ipc.futex import Word
from ._ipc.names import AREA_TOKEN_BYTES, SHM_DIR, area_name, area_token, ipc_prefix, request_queue_name
from ._iterate import PagedFeed, idle_wait
from ._prepare import Prepared, prepare, prepare_items
from ._query import Region, region_of
from ._read.reader import Reader, View
from ._read.receipts import receipt_matches
from ._read.redaction import current_retention, redaction_item, retention_item
from ._replay import Cursor, EventFilter, Handler, Projection, Reactor
from ._replay import caused_by as _caused_by
from ._replay import project as _project
from ._replay import project_if_changed as _project_if_changed
from ._retention import Retention, RetentionRule
from ._signing import verify_receipt_signature
from ._values import (
    EFFECT_DENIAL,
    SHRED_ENTITY,
    SYSTEM_SHRED,
    BatchItem,
    CompactReport,
    Coordinate,
    Event,
    Frontier,
    Kind,
    Page,
    Receipt,
    WriterState,
    check_name,
    payload_version_for,
)

DEFAULT_TIMEOUT_S = 30.0
COMPACT_TIMEOUT_S = 600.0  # a compaction rewrites sealed segments one after another: minutes on a big store
STALE_HEARTBEAT_NS = 300_000_000  # 300 ms (six 50 ms heartbeats): only then are the service's pids looked at
START_SLACK_NS = 20_000_000  # /proc start times count clock ticks (10 ms): a process started this soon
# after the block's last stamp may still be the service's own (benefit of the doubt: wait on)
AREA_MIN = 64 * 1024  # a client's area: 64 KiB (200 clients fit Docker's 64 MiB /dev/shm)
AREA_MAX = 1 << 30
AREA_SHRINK_ABOVE = 1 << 20  # an area grown past 1 MiB for a large payload is given back afterwards
POLL_S = 0.05  # while waiting for a reply, the control block is checked this often
MAX_PAYLOAD = 16 * 1024 * 1024  # the limit a client assumes while the service has not said its own (control block)
_PER_ITEM_OVERHEAD = 64  # msgpack framing of one item beyond its variable fields
_MASK128 = (1 << 128) - 1

_live_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_live_stores):
        store._forked = True
        # another thread of the parent may have held the lock at the fork: it would
        # never be released in the child
        store._lock = threading.RLock()
        store._pin_lock = threading.Lock()
        store._pins = 0  # the threads that had it pinned do not exist here
        store._calls = 0  # nor the threads that had requests in flight
        store._calls_done = threading.Condition(threading.Lock())


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Area:
    """One shared-memory area of this process (owned: unlinked on close, and only by the
    process that created it) and its doorbell, the word of the control block the writer
    rings after writing a reply into it (the word named by the area's token:
    ``names.doorbell_slot``; shared with other areas on the same word, so a wake-up is
    only a hint: the area's ``REPLY_TO`` says whose reply). An area carries one request
    at a time; a ``Channel`` lends its areas out, so a process has as many requests in
    flight as it has areas lent."""

    def __init__(self, prefix: str, size: int, control: ControlBlock, bell: int | None = None) -> None:
        pid = os.getpid()
        for _ in range(100):
            word = secrets.randbelow(DOORBELLS) if bell is None else bell
            name = area_name(prefix, pid, area_token(word, secrets.token_hex(AREA_TOKEN_BYTES)))
            try:
                shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
                break
            except posix_ipc.ExistentialError:
                continue
            except (posix_ipc.Error, OSError, ValueError) as exc:
                raise WriterUnavailable(_shm_hint(size, exc)) from None
        else:  # pragma: no cover - 100 random collisions
            raise WriterUnavailable("could not name a client area")
        try:
            # reserve every page now: a too-small /dev/shm fails here with ENOSPC and a
            # clear error, never with SIGBUS in the middle of a request
            os.posix_fallocate(shm.fd, 0, size)
            self.mm = mmap.mmap(shm.fd, size)
        except (OSError, ValueError) as exc:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise WriterUnavailable(_shm_hint(size, exc)) from None
        shm.close_fd()
        self.name = name
        self.size = size
        self.pid = pid
        self.bell: Word = control.doorbell(name)

    def replied(self, request_id: int) -> bool:
        """Whether the writer's reply to ``request_id`` is in the area."""
        return bool(W.REPLY_TO.unpack_from(self.mm, 0)[0] == request_id)

    def reply(self) -> W.Reply:
        """The reply in the area (``ProtocolError`` when malformed)."""
        n = W.LEN.unpack_from(self.mm, W.BODY_AT)[0]
        if n > self.size - W.HEADER:
            raise ProtocolError(f"reply length {n} does not fit the area")
        return W.decode_reply(self.mm[W.BODY_AT:W.HEADER + n])

    def close(self) -> None:
        """Unmap and unlink (only in the process that created the area)."""
        if self.pid != os.getpid():
            return
        try:
            self.mm.close()
        except (BufferError, ValueError):
            pass
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass


def _shm_hint(size: int, exc: BaseException) -> str:
    try:
        st = os.statvfs(SHM_DIR)
        free = st.f_bavail * st.f_frsize
        where = f"{SHM_DIR} has {free // 1024} KiB free"
    except OSError:
        where = f"{SHM_DIR} is not available"
    return (f"cannot allocate a {size // 1024} KiB client area in shared memory ({exc}); {where}. "
            "Enlarge it (docker run --shm-size=256m) or use smaller batches/payloads.")


def prepare_batch(items: Sequence[BatchItem], *, store_kinds: bool = False,
                   max_payload: int = MAX_PAYLOAD) -> list[Prepared]:
    """``_prepare.prepare_items``, then keys for items without one (base + index), so the
    request can be re-sent and is applied at most once."""
    prepared = prepare_items(items, max_payload=max_payload, store_kinds=store_kinds)
    base = int.from_bytes(secrets.token_bytes(16), "little")
    for i, it in enumerate(items):
        if it.idempotency_key is None:
            prepared[i] = prepared[i]._replace(idem=((base + i) & _MASK128).to_bytes(16, "little"))
    return prepared


def _check_state(snap: ControlSnapshot) -> None:
    """``WriterUnavailable`` at once when the service failed, was stopped, or is gone
    although its control block does not say so (``service_gone``)."""
    if snap.state == WriterState.FAILED:
        raise WriterUnavailable(snap.reason or "the service failed")
    if snap.state == WriterState.STOPPED:
        raise WriterUnavailable("the service was stopped")
    gone = service_gone(snap, time.monotonic_ns(), process_started_ns)
    if gone is not None:
        raise WriterUnavailable(gone)


def service_gone(snap: ControlSnapshot, now_ns: int, started_ns: Callable[[int], int | None]) -> str | None:
    """Why the service behind ``snap`` is gone although its block says it runs (its
    writer and its supervisor both died, e.g. SIGKILLed together), or None. Pure.

    Looked at only once the block's last stamp (``heartbeat_ns``: every 50 ms from a
    live writer; the supervisor stamps each of its writes) is older than
    ``STALE_HEARTBEAT_NS``, so a restart by a live supervisor and a long recovery are
    waited for as before. ``now_ns``: CLOCK_MONOTONIC; ``started_ns(pid)``: when the
    process that now has ``pid`` started, on that clock (None: no live process; a value
    at or before the stamp: it may be the service's own). A pid reused by a process
    that started after the stamp is not the service's."""
    if snap.state in (WriterState.STOPPED, WriterState.FAILED):
        return None  # the block says so itself
    if now_ns - snap.heartbeat_ns < STALE_HEARTBEAT_NS:
        return None
    for pid in (snap.writer_pid, snap.supervisor_pid):
        if pid:
            start = started_ns(pid)
            if start is not None and start <= snap.heartbeat_ns + START_SLACK_NS:
                return None
    state = state_name(snap.state).upper()
    return (f"the service is gone: neither its writer (pid {snap.writer_pid or '-'}) nor its supervisor "
            f"(pid {snap.supervisor_pid or '-'}) runs any more, although its control block still says {state} "
            f"(last written {(now_ns - snap.heartbeat_ns) // 1_000_000} ms ago); start it again")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_started_ns(pid: int) -> int | None:
    """When the live process ``pid`` started, in CLOCK_MONOTONIC ns; None when no such
    process runs (a zombie counts as gone); 0 when it runs but its start is unknown
    (another user's without /proc access, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        fields = raw[raw.rindex(b")") + 2:].split()  # after "pid (comm)": comm may hold anything
        if fields[0] in (b"Z", b"X"):
            return None
        ticks = int(fields[19])  # field 22, starttime: clock ticks since boot (CLOCK_BOOTTIME)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except (OSError, ValueError, IndexError):
        return 0 if _pid_exists(pid) else None
    boot_minus_mono = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    return ticks * 1_000_000_000 // _CLOCK_TICKS - boot_minus_mono


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists, it is someone else's
    return True


# -- replies ------------------------------------------------------------------------------
_FRONTIER_OPS = (W.OP_SYNC, W.OP_PING, W.OP_FENCE_COMMIT, W.OP_FENCE_CANCEL)  # reply: [visible, durable]


def reply_data(op: int, reply: W.Reply) -> Any:
    """The data of the writer's reply to ``op``, checked for the shape that op answers
    with; the typed error an error reply carries, raised; anything else (wrong shape,
    wrong types) ``ProtocolError``. Pure."""
    status, data = reply.status, reply.data
    if status == W.STATUS_ERROR and type(status) is int:
        err = _error_from_wire(data)
        raise err
    if status != W.STATUS_OK or type(status) is not int:
        raise ProtocolError(f"reply status {status!r:.40} is neither ok nor error")
    if op in _FRONTIER_OPS:
        ok = isinstance(data, list) and len(data) == 2 and all(type(v) is int and v >= 0 for v in data)
    elif op == W.OP_FENCE_BEGIN:
        ok = isinstance(data, list) and len(data) == 1 and isinstance(data[0], bytes) and len(data[0]) == 16
    else:
        ok = isinstance(data, list)  # receipts: checked one by one (``receipts_from_reply``)
    if not ok:
        raise ProtocolError(f"malformed reply to op {op}: {data!r:.200}")
    return data


def _error_from_wire(data: Any) -> BatpakError:
    try:
        return W.error_from_wire(data)
    except Exception:  # a typed error built from hostile fields: its constructor may choke
        return ProtocolError(f"unreadable error reply {data!r:.200}")


def reply_too_large(reply: W.Reply) -> int | None:
    """The size a reply needs when the writer said the area is too small for it, else None."""
    data = reply.data
    if reply.status != W.STATUS_ERROR or not isinstance(data, list) or data[:1] != ["ReplyTooLarge"]:
        return None
    try:
        (size,) = data[1]
    except (IndexError, TypeError, ValueError):
        raise ProtocolError(f"malformed ReplyTooLarge reply {data!r:.200}") from None
    if type(size) is not int or not 0 < size <= AREA_MAX:
        raise ProtocolError(f"ReplyTooLarge names an impossible size {size!r:.40}")
    return size


def receipts_from_reply(prepared: Sequence[Prepared], data: Any) -> list[Receipt]:
    """One ``Receipt`` per prepared item from an append reply's data (``reply_data``);
    ``ProtocolError`` unless each has the fields and types of PROTOCOL.md §8.1."""
    if not isinstance(data, list) or len(data) != len(prepared):
        raise ProtocolError("append reply does not hold one receipt per event")
    return [_receipt(p, f) for p, f in zip(prepared, data, strict=True)]


def _receipt(p: Prepared, f: Any) -> Receipt:
    if not isinstance(f, list) or len(f) not in (8, 10, 11):
        raise ProtocolError(f"malformed receipt in reply: {f!r:.200}")
    event_id, seq, clock, ehash, prev, wall, durable, sig, *named = f
    deduplicated = named.pop() if len(named) == 3 else False  # an earlier call's event (PROTOCOL.md §8.1)
    if deduplicated is not True and deduplicated is not False:
        raise ProtocolError(f"malformed receipt in reply: {f!r:.200}")
    # entity and scope travel only when they are not the request's (another event's
    # receipt: a duplicate key sent with another coordinate)
    entity, scope = named if named else (p.entity.decode(), p.scope.decode())
    ints_ok = all(type(v) is int and v >= 0 for v in (seq, clock, wall))
    bytes_ok = (_is_bytes(event_id, 16) and _is_bytes(ehash, 32) and _is_bytes(prev, 32)
                and (sig is None or isinstance(sig, bytes)))
    if not (ints_ok and bytes_ok and type(durable) is bool and type(entity) is str and type(scope) is str):
        raise ProtocolError(f"malformed receipt in reply: {f!r:.200}")
    return Receipt(event_id, seq, entity, scope, clock, ehash, prev, wall, durable, sig, deduplicated)


def _is_bytes(value: Any, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


class Wait(NamedTuple):
    """What a request in flight (``Channel.exchange``) needs before it can go on: either
    its reply — ``area`` holds it once its ``REPLY_TO`` is ``request_id``; wake when the
    area's doorbell word no longer holds ``seen``, or after ``timeout`` seconds — or,
    when ``message`` is set, room in the full request queue for it (send it, blocking at
    most ``timeout``, and tell the exchange whether it went)."""

    area: _Area | None
    request_id: int
    seen: int
    timeout: float
    message: bytes | None


Exchange = Generator[Wait, bool, W.Reply]


class Channel:
    """This process's line to the writer: the store's request queue, a pool of
    shared-memory areas (made on demand, one per request in flight, lent out and given
    back; one grown for a large request is not kept; an area a writer may still answer
    into is abandoned, never reused), and the request ids. Thread-safe: any number of
    threads (or one asyncio loop) have requests in flight at once.

    The life of a request is one generator, ``exchange`` (sans-IO: it never blocks), so
    the thread driver ``call`` (futex waits) and the asyncio driver (``aio``: one waiter
    thread for all of a loop's requests) share every rule of it. ``bell``: the doorbell
    word every area of this channel rings (an asyncio waiter watches one word); None: a
    random word per area."""

    POOL_MAX = 64  # idle areas kept (64 KiB each): beyond it, a returned area is unlinked

    def __init__(self, data_dir: str, control: ControlBlock, bell: int | None = None) -> None:
        self.prefix = ipc_prefix(data_dir)
        self._control = control
        self._bell = bell
        try:  # the service's own queue only (owner: the data directory's): else UnsafeIpcObject
            self.queue = objects.open_request_queue(request_queue_name(data_dir), os.stat(data_dir).st_uid)
        except (posix_ipc.ExistentialError, FileNotFoundError):
            raise WriterUnavailable(f"the request queue of {data_dir!r} does not exist (is the service up?)") from None
        self._free: list[_Area] = []  # idle areas, newest last
        self._pool_lock = threading.Lock()
        self._closed = False
        self._request_ids = itertools.count(1)  # next() on a count is atomic under the GIL

    # -- the pool --------------------------------------------------------------------------
    def idle_areas(self) -> list[_Area]:
        """The areas waiting in the pool (tests and diagnostics)."""
        with self._pool_lock:
            return list(self._free)

    def _take(self, need: int) -> _Area:
        size = AREA_MIN
        while size < need:
            size *= 2
        if size > AREA_MAX:
            raise InvalidArgument("request", need, f"is larger than the {AREA_MAX} byte limit of one request")
        with self._pool_lock:
            free = self._free
            for i in range(len(free) - 1, -1, -1):
                if free[i].size >= need:
                    return free.pop(i)
        return _Area(self.prefix, size, self._control, self._bell)

    def _give(self, area: _Area) -> None:
        """An area whose request is answered: back to the pool (unlinked when the pool is
        full or closed, or when it was grown past ``AREA_SHRINK_ABOVE`` for one request)."""
        if area.pid != os.getpid():
            return  # made before a fork: the parent's
        with self._pool_lock:
            if not self._closed and area.size <= AREA_SHRINK_ABOVE and len(self._free) < self.POOL_MAX:
                self._free.append(area)
                return
        area.close()

    def after_fork(self) -> None:
        """In a forked child: the parent's areas are the parent's (not unlinked here)."""
        self._free = []
        self._pool_lock = threading.Lock()

    # -- one request -----------------------------------------------------------------------
    def call(self, op: int, body: Any, reply_room: int, timeout: float) -> W.Reply:
        """Send one request and wait for its reply in this thread (futex waits)."""
        run = self.exchange(op, body, reply_room, timeout)
        try:
            wait = next(run)
            while True:
                if wait.message is None:
                    assert wait.area is not None
                    wait.area.bell.wait(wait.seen, wait.timeout)
                    wait = run.send(False)
                else:
                    wait = run.send(self.send_blocking(wait.message, wait.timeout))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def send_blocking(self, message: bytes, timeout: float) -> bool:
        """Put ``message`` on the queue, waiting up to ``timeout`` for room; False if none came."""
        try:
            self.queue.send(message, timeout)
            return True
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return False

    def exchange(self, op: int, body: Any, reply_room: int, timeout: float) -> Exchange:
        """One request, from its encoding to its reply, riding through writer restarts;
        yields a ``Wait`` whenever it must wait. Each area it used is given back when
        answered, or abandoned (a writer may still answer into it) on any failure."""
        deadline = time.monotonic() + timeout
        request_id = next(self._request_ids)
        snap = self._control.read()
        _check_state(snap)
        epoch = snap.writer_epoch
        encoded = W.encode_request(W.Request(op, request_id, epoch, body))
        need = max(len(encoded), reply_room)
        area = yield from self._send(encoded, need, request_id, deadline, timeout)
        try:
            while True:
                seen = area.bell.value  # read before looking: a reply written after this wakes the wait
                if not area.replied(request_id):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise WriterTimeout("the writer's reply", timeout)
                    yield Wait(area, request_id, seen, min(POLL_S, remaining), None)
                    if area.replied(request_id):
                        continue
                    snap = self._control.read()  # no reply yet (a wait ran out, or another area's bell)
                    _check_state(snap)
                    if snap.writer_epoch != epoch and snap.state == WriterState.READY:
                        # a new writer: our request may be lost with the old one. Re-send the
                        # same request (same keys) through a fresh area; duplicates are no-ops.
                        epoch = snap.writer_epoch
                        area.close()
                        area = yield from self._send(encoded, need, request_id, deadline, timeout)
                    continue
                reply = area.reply()
                if reply.request_id != request_id:  # REPLY_TO said it is: this body is not the writer's
                    raise ProtocolError(f"reply names request {reply.request_id!r:.40}, not {request_id}")
                larger = reply_too_large(reply)
                if larger is not None:
                    need = larger + 1024
                    area.close()
                    area = yield from self._send(encoded, need, request_id, deadline, timeout)
                    continue
                self._give(area)
                return reply
        except BaseException:
            area.close()  # a writer may still answer into it, or answered something untrusted
            raise

    def _send(self, encoded: bytes, need: int, request_id: int, deadline: float,
              timeout: float) -> Generator[Wait, bool, _Area]:
        area = self._take(need)
        try:
            area.mm[:len(encoded)] = encoded
            msg = W.encode_message(W.Message(W.WIRE_VERSION, os.getpid(), area.name, request_id))
            while True:
                try:
                    self.queue.send(msg, 0)
                    return area
                except posix_ipc.BusyError:
                    pass
                except posix_ipc.SignalError:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WriterTimeout("room in the request queue", timeout)
                if (yield Wait(None, request_id, 0, min(POLL_S, remaining), msg)):
                    return area
                _check_state(self._control.read())
        except BaseException:
            self._give(area)  # never sent: nobody will answer into it
            raise

    def close(self) -> None:
        """Say BYE for each idle area (the writer forgets it), unlink them, close the queue.
        Areas still lent out are unlinked when given back."""
        with self._pool_lock:
            self._closed = True
            areas, self._free = self._free, []
        for area in areas:
            if area.pid != os.getpid():
                continue
            try:
                msg = W.encode_message(W.Message(W.WIRE_VERSION, os.getpid(), area.name, 0))
                bye = W.encode_request(W.Request(W.OP_BYE, 0, 0, None))
                area.mm[:len(bye)] = bye
                self.queue.send(msg, 0)
            except (posix_ipc.Error, ValueError, BatpakError):
                pass
            area.close()
        self.queue.close()


class Call(NamedTuple):
    """One request an op (below) needs answered: the reply's data is sent back into it."""

    op: int
    body: Any
    reply_room: int = 0
    timeout: float | None = None


T = TypeVar("T")
Op = Generator[Call, Any, T]  # a write: yields its requests, returns its result


def op_prepared(prepared: list[Prepared], fence: bytes | None = None) -> Op[list[Receipt]]:
    """Append prepared events (all or nothing), through ``fence`` when given."""
    items = [[p.entity, p.scope, p.kind, p.payload, p.payload_version, p.idem, p.expected_clock,
              p.causation if any(p.causation) else None, p.correlation if any(p.correlation) else None]
             for p in prepared]
    room = sum(len(p.payload) + len(p.entity) + len(p.scope) + W.RECEIPT_WIRE_MAX + _PER_ITEM_OVERHEAD
               for p in prepared) + 1024
    if fence is None:
        data = yield Call(W.OP_APPEND, items, room)
    else:
        data = yield Call(W.OP_APPEND_FENCED, [fence, items], room + 64)
    return receipts_from_reply(prepared, data)


def op_effect(coord: Coordinate, type_id: int, payload: Any, *, causation_id: bytes | None,
               idempotency_key: str | bytes | None) -> Op[Receipt]:
    item = effect_item(coord, type_id, payload, causation_id=causation_id, idempotency_key=idempotency_key)
    return (yield from op_prepared(prepare_batch([item], store_kinds=True)))[0]


def op_fence_begin() -> Op[bytes]:
    return bytes((yield Call(W.OP_FENCE_BEGIN, None))[0])


def op_fence_finish(token: bytes, op: int) -> Op[None]:
    yield Call(op, token)


def op_sync(timeout: float | None) -> Op[int]:
    return int((yield Call(W.OP_SYNC, None, 0, timeout))[1])


def op_compact(timeout: float | None) -> Op[CompactReport]:
    data = yield Call(W.OP_COMPACT, None, 0, timeout)
    if len(data) != 4 or not all(type(v) in (int, float) and v >= 0 for v in data):
        raise ProtocolError(f"malformed reply to compact: {data!r:.200}")
    return CompactReport(int(data[0]), int(data[1]), int(data[2]), float(data[3]))


class _Erasure:
    """Store's erasure and retention calls (issue 13; OPERATIONS.md §11), mixed in."""

    if TYPE_CHECKING:
        _lock: threading.RLock
        _reader: Reader
        _retention_cache: dict[str, Any]

        def _ensure_open(self) -> None: ...
        def _drive(self, op: Op[T]) -> T: ...
        def append_store_kinds(self, items: Sequence[BatchItem]) -> list[Receipt]: ...

    def redact(self, event_id: bytes, *, reason: str) -> Receipt:
        """Ask for ``event_id``'s payload to go at the next compaction (OPERATIONS.md §11)."""
        with self._lock:
            self._ensure_open()
            item = redaction_item(self._reader, event_id, reason)
        return self._drive(op_prepared(prepare_batch([item], store_kinds=True)))[0]

    def set_retention(self, rules: Sequence[RetentionRule], *, idempotency_window_ms: int | None = None) -> Receipt:
        """Put retention ``rules`` in force for every process (OPERATIONS.md §11.3)."""
        return self.append_store_kinds([retention_item(rules, idempotency_window_ms)])[0]

    def retention(self) -> Retention:
        with self._lock:
            self._ensure_open()
            return current_retention(self._reader, self._retention_cache)

    def compact(self, timeout: float | None = COMPACT_TIMEOUT_S) -> CompactReport:
        """Have the writer compact now, appends going on (OPERATIONS.md §11.2)."""
        return self._drive(op_compact(timeout))

    def shred(self, entity: str) -> Receipt:
        """Destroy ``entity``'s data key (OPERATIONS.md §11.4): its payloads read as shredded."""
        check_name("entity", entity)
        if not os.path.exists(os.path.join(self._reader.data_dir, KEYS_FILE)):
            raise InvalidArgument("entity", entity, "this store encrypts no payloads: there is no key to shred")
        item = BatchItem(Coordinate(SHRED_ENTITY, "system"), Kind(0, SYSTEM_SHRED), shred_payload(entity))
        return self.append_store_kinds([item])[0]


class _Queries:
    """Store's query calls (issues 14 #3, 15 #2: ``_read/queries``), mixed in: no round
    trip, each under the store's lock, on its reader."""

    if TYPE_CHECKING:
        _lock: threading.RLock
        _reader: Reader

        def _ensure_open(self) -> None: ...

    def history(self, entity: str, *, after_clock: int | None = None, limit: int | None = None,
                before_clock: int | None = None, newest_first: bool = False) -> list[Event]:
        with self._lock:
            self._ensure_open()
            return self._reader.history(entity, after_clock, limit, before_clock=before_clock,
                                        newest_first=newest_first)

    def query_after(self, after: int = 0, *, limit: int = 1000, entity: str | None = None,
                    scope: str | None = None, kind: Kind | None = None, kinds: Iterable[Kind] | None = None,
                    upto: int | None = None, region: Region | None = None) -> Page:
        with self._lock:
            self._ensure_open()
            return self._reader.query_after(after, limit, entity, scope, kind, kinds=kinds, upto=upto, region=region)

    def latest(self, entity: str) -> Event | None:
        """The newest visible event of ``entity``, or None (one table lookup)."""
        with self._lock:
            self._ensure_open()
            return self._reader.latest(entity)

    def latest_in_scope(self, scope: str) -> Event | None:
        """The newest event of ``scope`` (its highest ``scope_position``), or None."""
        with self._lock:
            self._ensure_open()
            return self._reader.latest_in_scope(scope)

    def query_scope(self, scope: str, after_position: int = 0, *, limit: int = 1000,
                    upto_position: int | None = None, region: Region | None = None) -> Page:
        """The events of ``scope`` by their gap-free ``scope_position`` (after
        ``after_position``, at most ``upto_position``); ``page.next_after`` is a position."""
        with self._lock:
            self._ensure_open()
            return self._reader.query_scope(scope, after_position, limit, upto_position, region)

    def stream_entries(self, after: int, limit: int, region: Region) -> tuple[list[tuple[Event, int, bool]], int]:
        """``stream_page`` with each event's stream position and whether it is the last
        one at that position (what cursors acknowledge): (entries, last position looked at)."""
        with self._lock:
            self._ensure_open()
            return self._reader.stream_page(after, limit, region)


class Store(_Erasure, _Queries):
    """A connection to a served data directory. Thread-safe; fork-safe."""

    def __init__(self, data_dir: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise InvalidArgument("timeout", timeout, "must be a positive number of seconds")
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.timeout = float(timeout)
        self._lock = threading.RLock()
        self._closed = False
        self._forked = False
        # threads using the control block outside the lock (subscriptions, frontier): the
        # last one out after ``close`` unmaps it (``_pinned``)
        self._pin_lock = threading.Lock()
        self._pins = 0
        self._control_closed = False
        self._payload_limit = 0  # the service's max_payload_bytes, once read (payload_limit)
        # requests in flight (any number of threads at once): ``close`` lets them finish
        self._calls = 0
        self._calls_done = threading.Condition(threading.Lock())
        with ipc_errors(f"cannot reach the service of {self.data_dir!r}"):
            self._control = ControlBlock.attach(self.data_dir)
        try:
            with ipc_errors(f"cannot reach the service of {self.data_dir!r}"):
                _check_state(self._control.read())
                self._channel = Channel(self.data_dir, self._control)
        except BaseException:
            self._control.close()
            raise
        self._reader = Reader(self.data_dir, self._view)
        open_for_reading(self.data_dir)  # encrypted payloads (issue 13): MasterKeyError without the key
        self._retention_cache: dict[str, Any] = {}  # the rules in force, while the retention chain's head stays
        self._public_key = self._load_public_key()
        _live_stores.add(self)

    # -- plumbing --------------------------------------------------------------------------
    def _view(self) -> View:
        vis, base, delta, _state, revealed = self._control.frontier()
        return View(vis, base, delta, revealed)

    @contextlib.contextmanager
    def _pinned(self) -> Iterator[ControlBlock]:
        """The control block, kept mapped for the block although another thread may
        ``close`` the store meanwhile; ``StoreClosed`` once it is closed."""
        with self._pin_lock:
            if self._closed:
                raise StoreClosed()
            self._pins += 1
        try:
            yield self._control
        finally:
            with self._pin_lock:
                self._pins -= 1
            if self._closed:
                self._drop_control()

    def _drop_control(self) -> None:
        """Unmap the control block once the store is closed and nobody has it pinned
        (under the store lock: a read that began before ``close`` uses it too)."""
        with self._lock, self._pin_lock:
            if self._pins or self._control_closed:
                return
            self._control_closed = True
            self._control.close()

    def _load_public_key(self) -> bytes | None:
        try:
            with open(os.path.join(self.data_dir, "receipt.pub")) as f:
                return bytes.fromhex(f.read().strip())
        except (OSError, ValueError):
            return None

    def _ensure_open(self) -> None:
        if self._closed:
            raise StoreClosed()
        if self._forked:
            # a child of a fork: the parent's area is not ours; get our own
            self._forked = False
            self._channel.after_fork()
            self._lock = threading.RLock()
            self._reader = Reader(self.data_dir, self._view)

    def _request(self, op: int, body: Any, reply_room: int = 0, timeout: float | None = None) -> Any:
        """One request to the writer (riding through its restarts): the reply's data, or
        the typed error the reply carries, raised. Holds no lock while it waits: threads
        sharing this store have their requests in flight together (and share group
        commits), and reads never wait behind them."""
        self._begin_call()
        try:
            with ipc_errors("the request channel to the writer failed"):
                reply = self._channel.call(op, body, reply_room, self.timeout if timeout is None else timeout)
        finally:
            self._end_call()
        return reply_data(op, reply)

    def _begin_call(self) -> None:
        if self._closed or self._forked:
            with self._lock:
                self._ensure_open()
        with self._calls_done:
            if self._closed:
                raise StoreClosed()
            self._calls += 1

    def _end_call(self) -> None:
        with self._calls_done:
            self._calls -= 1
            if not self._calls:
                self._calls_done.notify_all()

    # -- writes ----------------------------------------------------------------------------
    @property
    def payload_limit(self) -> int:
        """The largest payload the service takes (its ``max_payload_bytes``, which its
        writer publishes in the control block): larger ones are refused here, before a
        round trip, with the service's own limit in the ``PayloadTooLarge``."""
        limit = self._payload_limit
        if not limit:
            with self._pinned() as control:
                limit = control.read().max_payload
            if limit:
                self._payload_limit = limit
        return limit or MAX_PAYLOAD

    # Each write is an *op*: a generator that yields the ``Call``s it needs and returns its
    # result. ``_drive`` runs one in this thread; ``aio.AsyncStore`` runs the same op on an
    # event loop, so both faces share every rule of a write.
    def _drive(self, op: Op[T]) -> T:
        try:
            call = next(op)
            while True:
                call = op.send(self._request(call.op, call.body, call.reply_room, call.timeout))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def append(self, coord: Coordinate, kind: Kind, payload: Any, *, idempotency_key: str | bytes | None = None,
               expected_clock: int | None = None, causation_id: bytes | None = None,
               correlation_id: bytes | None = None, payload_version: int | None = None) -> Receipt:
        """Append one event; returns once it is durable (in the default sync mode).
        ``payload_version`` defaults to the version registered for ``kind``
        (``bp.register_payload``), else 0."""
        return self._drive(self._op_append(coord, kind, payload, idempotency_key=idempotency_key,
                                           expected_clock=expected_clock, causation_id=causation_id,
                                           correlation_id=correlation_id, payload_version=payload_version))

    def _op_append(self, coord: Coordinate, kind: Kind, payload: Any, *, idempotency_key: str | bytes | None = None,
                   expected_clock: int | None = None, causation_id: bytes | None = None,
                   correlation_id: bytes | None = None, payload_version: int | None = None) -> Op[Receipt]:
        p = prepare(coord, kind, payload, idempotency_key=idempotency_key, expected_clock=expected_clock,
                    causation_id=causation_id, correlation_id=correlation_id, max_payload=self.payload_limit,
                    payload_version=payload_version_for(kind) if payload_version is None else payload_version)
        if idempotency_key is None:
            p = p._replace(idem=secrets.token_bytes(16))  # every request is re-sendable
        return (yield from op_prepared([p]))[0]

    def append_batch(self, items: Sequence[BatchItem]) -> list[Receipt]:
        """Append events all-or-nothing (across entities)."""
        return self._drive(op_prepared(prepare_batch(items, max_payload=self.payload_limit)))

    def append_store_kinds(self, items: Sequence[BatchItem]) -> list[Receipt]:
        """Append events of the store's own allowlisted reserved kinds (cursor positions,
        gate audit records) together with ordinary ones, all or nothing. For the store's
        own layers (cursors, reactors, gates: ``_api.ReplayHost``); a reserved kind off
        the allowlist is ``ReservedKind`` here, and the writer checks the allowlist again."""
        return self._drive(op_prepared(prepare_batch(items, store_kinds=True, max_payload=self.payload_limit)))

    def append_effect(self, coord: Coordinate, type_id: int, payload: Any, *, causation_id: bytes | None = None,
                      idempotency_key: str | bytes | None = None) -> Receipt:
        """Append a store-recorded effect (reserved category 0xD): only an allowlisted
        type id with a payload of its shape (the writer checks both again)."""
        return self._drive(op_effect(coord, type_id, payload, causation_id=causation_id,
                                      idempotency_key=idempotency_key))

    def append_denial(self, coord: Coordinate, denial: Denial, *, proposal_kind: Kind | None = None,
                      causation_id: bytes | None = None) -> Receipt:
        """Persist a gate's denial in the entity's chain, so refusals are auditable."""
        return self.append_effect(coord, EFFECT_DENIAL, denial_payload(denial, proposal_kind), causation_id=causation_id)

    def append_bypass(self, item: BatchItem, reason: str, *, gates: Sequence[str] = ()) -> tuple[Receipt, Receipt]:
        """Append ``item`` past the gates together with its bypass audit record, all or
        nothing (the record is chained right after the event)."""
        event, audit = self.append_store_kinds([item, bypass_audit_item(item, reason, gates)])
        return event, audit

    def _append(self, prepared: list[Prepared], fence: bytes | None = None) -> list[Receipt]:
        return self._drive(op_prepared(prepared, fence))

    # -- reads (no round trip) -------------------------------------------------------------
    def get(self, event_id: bytes) -> Event:
        if self._closed or self._forked:
            self._ensure_open()
        with self._lock:
            if self._closed:  # closed by another thread since
                raise StoreClosed()
            return self._reader.get(event_id)

    def walk_ancestors(self, event_id: bytes, *, limit: int | None = None) -> Iterator[Event]:
        with self._lock:
            self._ensure_open()
            return iter(list(self._reader.walk_ancestors(event_id, limit)))

    def verify_receipt(self, receipt: Receipt) -> bool:
        with self._lock:
            self._ensure_open()
            key = self._public_key  # the service signs its receipts: a receipt must carry a valid signature
            return receipt_matches(self._reader, receipt,
                                   None if key is None else lambda r: verify_receipt_signature(r, key))

    def fence(self) -> Fence:
        """Open a visibility fence: ``with store.fence() as f: f.append(...)``."""
        return Fence(self)

    def subscribe(self, after: int | None = None, *, entity: str | None = None, scope: str | None = None,
                  kind: Kind | None = None, timeout: float | None = None, region: Region | None = None) -> Subscription:
        """New events matching the filters (or a whole ``region``), as they become
        visible (``after``: a sequence to start after; default: the current frontier, i.e.
        only new events). Iterating blocks in the kernel until the writer publishes (no
        polling); with ``timeout`` the iteration ends after that many idle seconds."""
        self._ensure_open()
        if after is None:
            with self._pinned() as control:
                after = control.frontier()[0]
        elif type(after) is not int or after < 0:
            raise InvalidArgument("after", after, "must be an int >= 0")
        return Subscription(self, after, entity, scope, kind, timeout, region)

    def entity_head(self, entity: str) -> Event | None:
        """The newest visible event of ``entity``, or None: one table lookup (a cursor
        reads its position with it). Events of an uncommitted visibility fence are
        stepped over (back along the entity's chain)."""
        raw = check_name("entity", entity)
        with self._lock:
            self._ensure_open()
            reader = self._reader
            reader.refresh()
            seq: int = reader._retrying(lambda: reader.head_of(raw))
            while seq:
                try:
                    return reader.get_seq(seq)
                except NotFound:  # hidden inside a fence: its predecessor in the chain
                    seq = reader._retrying(functools.partial(reader.prev_in_entity, seq))
            return None

    def stream_page(self, after: int, limit: int, *, entity: str | None = None, scope: str | None = None,
                    kind: Kind | None = None) -> tuple[list[Event], int]:
        """The next page of the log after ``after`` in stream order (see ``_stream_page``)
        and the last sequence looked at: what subscriptions, cursors and incremental
        projections read (``_api.ReplayHost``)."""
        with self._lock:
            self._ensure_open()
            return _stream_page(self._reader, after, limit, entity, scope, kind)

    # -- replay: cursors, reactors, causal links, projections (see _replay) -----------------
    @overload
    def cursor(self, name: str, *, entity: str | None = None, scope: str | None = None, kind: Kind | None = None,
               include_system: bool = False, start_after: int | None = 0, timeout: float | None = None,
               reset: bool = False, group: Literal[False] = False, region: Region | None = None) -> Cursor: ...

    @overload
    def cursor(self, name: str, *, entity: str | None = None, scope: str | None = None, kind: Kind | None = None,
               include_system: bool = False, start_after: int | None = 0, timeout: float | None = None,
               reset: bool = False, group: Literal[True], chunk: int = DEFAULT_CHUNK,
               ack_every: int = DEFAULT_GROUP_ACK_EVERY, region: Region | None = None) -> GroupCursor: ...

    def cursor(self, name: str, *, entity: str | None = None, scope: str | None = None, kind: Kind | None = None,
               include_system: bool = False, start_after: int | None = 0, timeout: float | None = None,
               reset: bool = False, group: bool = False, chunk: int = DEFAULT_CHUNK,
               ack_every: int = DEFAULT_GROUP_ACK_EVERY, region: Region | None = None) -> Cursor | GroupCursor:
        """A durable named consumer of the matching events: resumes after its last
        ``ack`` (kept in the journal), at-least-once. ``start_after`` (a sequence, or None
        for the current frontier) applies only to a cursor that has never acknowledged.
        ``timeout``: iteration ends after that many idle seconds. A cursor remembers its
        filter: opening it under another is ``CursorFilterChanged``, unless ``reset``
        (it then starts over at ``start_after`` under the new filter). With ``group=True``
        the processes that open the same name share its work: a ``GroupCursor`` (claims of
        ``chunk`` positions, progress written every ``ack_every`` acks)."""
        self._ensure_open()
        flt = EventFilter(entity, scope, kind, include_system, region)
        if group:
            # a consumer group (``_groups``): every member process opens the same name with
            # group=True; each event goes to one live member; a dead member's claim moves on
            if reset:
                raise InvalidArgument("reset", reset, "a consumer group cannot be reset (use another name)")
            return GroupCursor(self, name, flt, start_after=start_after or 0, chunk=chunk, ack_every=ack_every,
                               timeout=timeout)
        return Cursor(self, name, flt, start_after=start_after, timeout=timeout, reset=reset)

    def react(self, name: str, handler: Handler, *, entity: str | None = None, scope: str | None = None,
              kind: Kind | None = None, include_system: bool = False, start_after: int | None = 0,
              max_failures: int = 5, backoff: float = 0.1, max_backoff: float = 5.0, ack_every: int = 100,
              on_error: Callable[[Event, BaseException], None] | None = None) -> Reactor:
        """A reactor: ``handler(event)`` returns reactions, appended with the event as
        their cause, idempotently, together with the event's ack. Drive it with
        ``run(timeout, max_events)``, ``run_once()`` or ``step()``."""
        self._ensure_open()
        return Reactor(self, name, handler, EventFilter(entity, scope, kind, include_system), start_after=start_after,
                       max_failures=max_failures, backoff=backoff, max_backoff=max_backoff, ack_every=ack_every,
                       on_error=on_error)

    def caused_by(self, event_id: bytes, *, limit: int = 100, within: int = 100_000) -> list[Event]:
        """The events whose ``causation_id`` is ``event_id`` (a forward scan of at most
        ``within`` events after the cause; stops at ``limit`` matches)."""
        return _caused_by(self, event_id, limit=limit, within=within)

    def project(self, projection: Projection, *, entity: str | None = None, scope: str | None = None,
                kind: Kind | None = None, include_system: bool = False, snapshot: bool = False,
                snapshot_every: int = 1000) -> Any:
        """Fold the matching events into ``projection``'s state. With ``snapshot``, start
        from its snapshot file (when it matches exactly) and rewrite it once at least
        ``snapshot_every`` sequences have passed since."""
        return _project(self, projection, EventFilter(entity, scope, kind, include_system), snapshot=snapshot,
                        snapshot_every=snapshot_every)

    def project_if_changed(self, projection: Projection, *, entity: str | None = None, scope: str | None = None,
                           kind: Kind | None = None, include_system: bool = False, snapshot: bool = False,
                           snapshot_every: int = 1000) -> Any:
        """``project`` through this Store's cache: the cached state when nothing relevant
        was appended since, else the cached state with only the new events folded in."""
        return _project_if_changed(self, projection, EventFilter(entity, scope, kind, include_system),
                                   snapshot=snapshot, snapshot_every=snapshot_every)

    # -- frontier --------------------------------------------------------------------------
    def frontier(self) -> Frontier:
        self._ensure_open()
        with self._pinned() as control:
            s = control.read()
        try:
            state = WriterState(s.state)
        except ValueError:
            state = WriterState.ABSENT
        return Frontier(s.visible, s.durable, s.writer_epoch, state, s.writer_pid)

    def sync(self, timeout: float | None = None) -> int:
        """Ask the writer to fsync now; returns the durable frontier."""
        return self._drive(op_sync(timeout))

    def wait_for_durable(self, sequence: int, timeout: float) -> None:
        """Return once ``sequence`` is on disk; ``WriterTimeout`` otherwise."""
        if type(sequence) is not int or sequence < 0:
            raise InvalidArgument("sequence", sequence, "must be an int >= 0")
        self._ensure_open()
        deadline = time.monotonic() + timeout
        asked = False
        delay = 0.0002
        while True:
            with self._pinned() as control:
                snap = control.read()
            if snap.durable >= sequence:
                return
            _check_state(snap)
            if not asked and snap.visible >= sequence:
                asked = True  # weaker sync modes: ask for the fsync instead of waiting for it
                try:
                    self.sync(timeout=max(deadline - time.monotonic(), 0.001))
                    continue
                except WriterTimeout:
                    pass
            if time.monotonic() >= deadline:
                raise WriterTimeout(f"sequence {sequence} to become durable", timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the store: a request in flight in another thread is let finish first;
        a subscription waiting in another thread ends with ``StoreClosed`` (within its
        1 s state check)."""
        with self._pin_lock:
            if self._closed:
                return
            self._closed = True
        _live_stores.discard(self)
        with self._calls_done:  # requests in flight end within their own timeouts
            while self._calls:
                self._calls_done.wait()
        with self._lock:
            with contextlib.suppress(posix_ipc.Error, OSError, ValueError):
                self._channel.close()
            self._reader.close()
        self._drop_control()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._channel.close()
        except Exception:
            pass


class Fence:
    """A visibility fence (``with store.fence() as f:``): events appended through it are
    written and durable but invisible to every reader and subscriber until ``commit``;
    ``cancel`` (or an exception in the ``with`` block, the death of this process, or a
    writer restart) leaves them invisible for good. ``bp.verify`` still checks them."""

    def __init__(self, store: Store, token: bytes | None = None) -> None:
        self._store = store
        self.token: bytes = store._drive(op_fence_begin()) if token is None else token
        self.done = False

    def append(self, coord: Coordinate, kind: Kind, payload: Any, *, idempotency_key: str | bytes | None = None,
               expected_clock: int | None = None, causation_id: bytes | None = None,
               correlation_id: bytes | None = None) -> Receipt:
        return self.append_batch([BatchItem(coord, kind, payload, idempotency_key, expected_clock, causation_id,
                                            correlation_id)])[0]

    def append_batch(self, items: Sequence[BatchItem]) -> list[Receipt]:
        if self.done:
            raise FenceLost(self.token, "the fence was already committed or cancelled")
        return self._store._append(prepare_batch(items, max_payload=self._store.payload_limit), fence=self.token)

    def _finish(self, op: int) -> None:
        if self.done:
            return
        self.done = True
        self._store._drive(op_fence_finish(self.token, op))

    def commit(self) -> None:
        """Reveal every event written through this fence, at once."""
        self._finish(W.OP_FENCE_COMMIT)

    def cancel(self) -> None:
        """Leave this fence's events invisible for good."""
        self._finish(W.OP_FENCE_CANCEL)

    def __enter__(self) -> Fence:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            try:
                self.cancel()
            except BatpakError:
                pass  # the original exception matters more; the fence stays hidden anyway


def _stream_page(reader: Reader, after: int, limit: int, entity: str | None, scope: str | None,
                 kind: Kind | None) -> tuple[list[Event], int]:
    """The next page of the log in *stream* order (``_read/queries.stream_page``: a fenced
    event is delivered where its FENCE_COMMIT stands) and the last position looked at."""
    entries, end = reader.stream_page(after, limit, Region(entity=entity, scope=scope, kind=kind))
    return [e for e, _, _ in entries], end


class Subscription(PagedFeed[tuple[Event, int, bool]]):
    """An iterator of events from a ``Store``, woken by the writer through a futex on the
    control block. Holds no state in the writer: a subscriber that dies leaves nothing
    behind, and a slow one never slows the writer (it reads the files itself)."""

    STATE_CHECK_S = 1.0  # while idle, the writer's state is looked at this often

    def __init__(self, store: Store, after: int, entity: str | None, scope: str | None, kind: Kind | None,
                 timeout: float | None, region: Region | None = None) -> None:
        # validate the filters first (query_after raises typed errors for bad ones)
        store.query_after(after, limit=1, entity=entity, scope=scope, kind=kind, region=region)
        super().__init__(timeout)  # buffers (event, stream position, last at it) a page at a time
        self._store = store
        self.position = after  # the last sequence looked at (events delivered or filtered out)
        self._entity, self._scope, self._kind = entity, scope, kind
        self._region = region_of(region, entity=entity, scope=scope, kind=kind)
        # the stream position of the last event handed out (a fenced event's is its
        # FENCE_COMMIT's sequence) and whether it was the last one at that position
        self.stream_position = after
        self.stream_last = True

    def next(self, timeout: float | None = None) -> Event | None:
        """The next matching event; None after ``timeout`` idle seconds or when closed."""
        steps = self.steps(timeout)
        try:
            bell, seen, wait = next(steps)
            while True:
                bell.wait(seen, wait)
                bell, seen, wait = steps.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def steps(self, timeout: float | None) -> Generator[tuple[Word, int, float], None, Event | None]:
        """``next`` without blocking (sans-IO, shared with ``aio``): yields (word, seen,
        seconds) whenever it must sleep until the notify word moves past ``seen``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        store = self._store
        while not self._closed:
            if self._buffer:
                ev, self.stream_position, self.stream_last = self._buffer.popleft()
                return ev
            with store._pinned() as control:  # StoreClosed once another thread closed the store
                bell = control.bell
                if bell is None:
                    raise StoreClosed()
                seen = bell.value  # read before looking: a publish after this wakes the wait
                entries, self.position = store.stream_entries(self.position, self.PAGE, self._region)
                if entries:
                    self._buffer.extend(entries)
                    continue
                if control.frontier()[0] > self.position:
                    continue  # more to look at (a page of non-matching events)
                _check_state(control.read())
                wait = idle_wait(self.STATE_CHECK_S, deadline, time.monotonic)
                if wait is None:
                    return None
                yield bell, seen, wait  # pinned while it sleeps: the word stays mapped
        return None


@contextlib.contextmanager
def ipc_errors(what: str) -> Iterator[None]:
    """``posix_ipc`` errors (not OSErrors) as ``WriterUnavailable``: none escapes the API."""
    try:
        yield
    except posix_ipc.Error as exc:
        raise WriterUnavailable(f"{what}: {type(exc).__name__}: {exc}") from None


def connect(data_dir: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT_S) -> Store:
    """Attach to a served data directory. Cheap: maps files lazily, scans nothing."""
    return Store(data_dir, timeout=timeout)


# The contracts Store implements, checked by mypy (a missing or renamed method fails it).
_STORE_API: type[EventStore] = Store
_REPLAY_HOST: type[ReplayHost] = Store
