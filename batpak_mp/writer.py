"""The writer process: the one owner of a data directory while the service runs.

Run as ``python -m batpak_mp.writer DATA_DIR [options]`` (the supervisor does this).
Owns: taking the lock and recovering (through the engine), the request queue, the
client areas it reads and answers (through checked descriptors, never mapped: a client
cannot fault the writer by truncating its area), the pipelined group-commit loop (the
loop takes every message waiting in the kernel queue, validates and writes them as one
group while a syncer thread runs the fsync of the previous one, which wakes the loop
with a message of its own; replies wait for the fsync covering them; a heartbeat thread
keeps the heartbeat going through long commits), visibility fences
held by clients, the control block's writer fields (epoch, state, heartbeat, frontiers,
the subscribers' futex word), lifecycle events in the log, reclaiming IPC objects of
dead clients, and a graceful drain on SIGTERM/SIGINT.
Exit codes (the supervisor relies on them; ``WriterExit`` in ``_ipc/codes.py``): 0 clean
stop; 70 fail-closed (a failed fsync poisoned the store); 71 corruption or a newer format
found at recovery; 72 the store is locked by another process; 2 bad usage.
Must not import the client or the supervisor.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import queue
import resource
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import posix_ipc

from ._errors import (
    BatpakError,
    CorruptSegment,
    FenceLost,
    FutureFormat,
    InvalidArgument,
    InvalidCoordinate,
    InvalidKind,
    InvalidPayload,
    MasterKeyError,
    PayloadTooLarge,
    ProtocolError,
    ReservedKind,
    StorageError,
    StoreLocked,
    StorePoisoned,
    UnsafeIpcObject,
)
from ._format.frame import ZERO_ID
from ._gates import check_effect
from ._ipc import objects
from ._ipc import wire as W
from ._ipc.codes import OPT_READY_FD, OPT_SUPERVISOR_PID, WRITER_READY_LINE, WriterExit
from ._ipc.control import DOORBELLS, ControlBlock
from ._ipc.names import doorbell_slot, ipc_prefix, parse_area_name, request_queue_name
from ._ipc.objects import pid_alive
from ._ipc.stats import WriterStats
from ._prepare import Prepared
from ._storage.compaction import CompactStep, compact_in_background
from ._storage.engine import Engine, EngineConfig, parse_sync
from ._values import (
    CATEGORY_EFFECT,
    FENCE_ENTITY,
    RESERVED_CATEGORIES,
    STORE_KINDS,
    SYSTEM_FENCE_CANCEL,
    SYSTEM_FENCE_COMMIT,
    SYSTEM_WRITER_STARTED,
    SYSTEM_WRITER_STOPPED,
    Receipt,
    WriterState,
    check_name,
)

QUEUE_DEPTH = 10  # the kernel default msg_max: must work without raising limits
HEARTBEAT_EVERY_NS = 50_000_000  # 50 ms: the supervisor's hang detection reads this
RECEIVE_TIMEOUT_S = 0.05  # how long the loop sleeps in the kernel when idle
NUDGE = b"\x00"  # the syncer's "an fsync finished" on the request queue (not a request: no client is answered)
NUDGE_PRIORITY = 1  # above the clients' 0, so it is taken first
CHECKPOINT_EVERY_NS = 1_000_000_000  # durable floor persisted at least once a second...
CHECKPOINT_EVERY_EVENTS = 20_000  # ...and every 20k events: bounds the tail a restart scans
SWEEP_EVERY_NS = 5_000_000_000  # dead clients' IPC objects reclaimed every 5 s
MAX_AREAS = 1024  # client areas kept open (one descriptor each) at once (LRU beyond)
FIRST_READ = 4096  # bytes read from an area at once: a whole request, mostly (larger ones are streamed)
NAMES_CACHED = 4096  # entity/scope names remembered as valid (at most 1 KiB each)
STORE_KIND_OBJECTS = 4096  # objects a store kind's payload may decode to (a bypass names <= 1024 gates)
FILES_WANTED = 4096  # the writer raises its soft RLIMIT_NOFILE to this (areas, segments, index files)
DRAIN_MAX = 64  # messages taken per group while draining at stop
GROUP_STATS_ENV = "BATPAK_MP_GROUP_STATS"  # a file the writer writes its group sizes to at a clean stop (benchmarks)
GROUP_MAX = 256  # requests in one commit group at most (one write, one fsync)


def _log(msg: str) -> None:
    sys.stderr.write(f"batpak-mp writer[{os.getpid()}]: {msg}\n")
    sys.stderr.flush()


class WireItems:
    """Validates append items as they come off the wire (shape checked by ``_wire``)
    and turns them into ``Prepared`` events. Names already seen valid are remembered,
    so the common case costs a dict lookup instead of a UTF-8 and control-char scan."""

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self._names: set[bytes] = set()  # at most NAMES_CACHED: a bounded cost in memory

    def _name(self, field: str, raw: bytes) -> None:
        if raw in self._names:
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidCoordinate(field, raw[:64], "is not valid UTF-8") from None
        check_name(field, text)
        if len(self._names) >= NAMES_CACHED:
            self._names.clear()
        self._names.add(raw)

    @staticmethod
    def _store_kind(kind: int, payload: bytes) -> None:
        """A reserved kind is accepted only from the allowlist, with its payload keys
        (an effect record: exactly the shape the engine accepts, ``_gates.check_effect``)."""
        required = STORE_KINDS.get(kind)
        if required is None:
            raise ReservedKind(kind >> 12, kind & 0xFFF)
        try:
            doc = W.unpack_limited(payload, STORE_KIND_OBJECTS, STORE_KIND_OBJECTS, 64)
        except ProtocolError:
            doc = None
        if kind >> 12 == CATEGORY_EFFECT:
            check_effect(kind & 0xFFF, doc)
            return
        if not isinstance(doc, dict) or not required <= doc.keys():
            raise InvalidPayload(f"kind {kind >> 12:#x}:{kind & 0xFFF:#x} needs a map with keys {sorted(required)}")

    def prepare(self, items: list[list[Any]]) -> list[Prepared]:
        out = []
        name = self._name
        well_formed = W.payload_is_msgpack
        for entity, scope, kind, payload, pv, idem, clock, causation, correlation in items:
            name("entity", entity)
            name("scope", scope)
            if not 0 <= kind <= 0xFFFF:
                raise InvalidKind(kind, None, "packed kind out of range")
            if (kind >> 12) in RESERVED_CATEGORIES:
                self._store_kind(kind, payload)
            if len(payload) > self.max_payload:
                raise PayloadTooLarge(len(payload), self.max_payload)
            if not 0 <= pv <= 0xFFFF:
                raise InvalidArgument("payload_version", pv, "must be 0..65535")
            if clock is not None and clock < 0:
                raise InvalidArgument("expected_clock", clock, "must be an int >= 0")
            if not well_formed(payload):  # checked, never decoded here: its contents are the client's
                raise InvalidPayload("payload bytes are not one msgpack object")
            out.append(Prepared(entity, scope, kind, payload, pv, idem, clock,
                                causation if causation and any(causation) else ZERO_ID,
                                correlation if correlation and any(correlation) else ZERO_ID))
        return out


class _SyncDone(NamedTuple):
    target: int  # groups written when the fsync started: it covers them
    error: OSError | None
    path: str


class _Compaction:
    """Compaction in a served store (issue 13): copies prepared on a thread of their own
    (``compact_in_background``), each swapped in by the writer's loop between commit
    groups (``tick``, at least every 50 ms), so appends go on; one run at a time, every OP_COMPACT meanwhile answered by
    it with its totals (or the error that stopped it)."""

    def __init__(self, writer: Writer) -> None:
        self.w = writer
        self.waiters: list[tuple[_Area, int]] = []
        self.totals = [0, 0, 0]  # segments swapped in (-1: failed), payloads removed, bytes
        self.started = 0.0
        self.running = False
        self.steps: queue.SimpleQueue[CompactStep] = queue.SimpleQueue()  # from the compaction thread

    def poll(self) -> None:
        while self.running:
            try:
                self.step(self.steps.get_nowait())
            except queue.Empty:
                return

    def begin(self, area: _Area, request_id: int) -> None:
        self.waiters.append((area, request_id))
        if self.running:
            return
        try:
            plan = self.w.engine.compaction_plan()
        except BatpakError as exc:
            self._answer(exc)
            return
        self.running, self.totals, self.started = True, [0, 0, 0], time.monotonic()
        compact_in_background(plan, self.w.engine.compaction_prepare, self.steps.put)

    def step(self, step: CompactStep) -> None:
        engine, totals = self.w.engine, self.totals
        if step.copy is None:  # the run ended
            self.running = False
            self._answer(step.error)
        elif totals[0] < 0:  # a swap failed already: later copies are dropped
            engine.compaction_abandon(step.copy)
        else:
            try:
                done = engine.compaction_swap(step.copy)
            except BatpakError as exc:  # the old segment stays in place, whole; the waiters hear why
                totals[0] = -1
                self._answer(exc)
                return
            totals[0] += 1
            totals[1] += len(done.stubbed)
            totals[2] += done.bytes_removed

    def _answer(self, error: BaseException | None) -> None:
        data = [max(self.totals[0], 0), self.totals[1], self.totals[2], round((time.monotonic() - self.started) * 1000, 2)]
        for area, request_id in self.waiters:
            if error is not None:
                self.w.reply_error(area, request_id, error)
            else:
                self.w.reply(area, W.Reply(request_id, self.w.epoch, W.STATUS_OK, data))
        self.waiters = []


class Fences:
    """Visibility fences held by clients. A fence's events are written (and durable) but
    hidden; committing appends a FENCE_COMMIT system event naming their sequence ranges
    and then reveals them; cancelling (by the owner, or because the owner died) appends
    a FENCE_CANCEL event and they stay hidden for good. Fences live in this writer's
    memory only: after a restart a client's fence is lost (FenceLost) and its events
    stay hidden, which the log shows as a fence with no commit.

    The owner of a fence is the process that opened it, as the writer knows it: the pid
    of the client area the request came through, which that process maps (the kernel
    says so, ``objects.maps_file``), never a pid a message claims. One owner holds at
    most ``PER_OWNER`` open fences, so no client can take them all; the ranges they
    hold are bounded too (memory)."""

    MAX_OPEN = 4096  # open fences across all clients
    PER_OWNER = 16  # open fences of one client process
    MAX_RANGES = 4096  # separate sequence ranges one fence holds (commit it to go on)
    MAX_RANGES_TOTAL = 65_536  # ranges across all fences: ~10 MiB of writer memory at most

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._open: dict[bytes, tuple[int, list[list[int]]]] = {}  # token -> (owner pid, ranges)
        self._owned: dict[int, int] = {}  # owner pid -> open fences
        self._ranges = 0

    def begin(self, owner: int) -> bytes:
        if len(self._open) >= self.MAX_OPEN:
            raise InvalidArgument("fence", len(self._open), f"at most {self.MAX_OPEN} fences may be open")
        held = self._owned.get(owner, 0)
        if held >= self.PER_OWNER:
            raise InvalidArgument("fence", held, f"one process may hold at most {self.PER_OWNER} open fences")
        token = os.urandom(16)
        self._open[token] = (owner, [])
        self._owned[owner] = held + 1
        return token

    def check(self, token: bytes, owner: int) -> None:
        entry = self._open.get(token)
        if entry is None:
            raise FenceLost(token, "this writer holds no such fence (cancelled, or the writer restarted)")
        if entry[0] != owner:
            raise FenceLost(token, "the fence belongs to another process")

    def check_room(self, token: bytes, owner: int) -> None:
        """``check``, and room for the ranges of one more fenced append."""
        self.check(token, owner)
        held = len(self._open[token][1])
        if held >= self.MAX_RANGES or self._ranges >= self.MAX_RANGES_TOTAL:
            raise InvalidArgument("fence", held, "holds too many separate ranges of events: commit it first")

    def written(self, token: bytes, first: int, last: int) -> bool:
        """Record a fenced append once it is published; False when its fence is gone
        meanwhile (cancelled by the dead-owner sweep while the append awaited its fsync):
        its events stay hidden for good and the append is answered ``FenceLost``."""
        entry = self._open.get(token)
        if entry is None:
            return False
        ranges = entry[1]
        if ranges and ranges[-1][1] + 1 == first:
            ranges[-1][1] = last
        else:
            ranges.append([first, last])
            self._ranges += 1
        return True

    def finish(self, token: bytes, owner: int, *, commit: bool, why: str = "") -> None:
        self.check(token, owner)
        _, ranges = self._open.pop(token)
        self._ranges -= len(ranges)
        left = self._owned[owner] - 1
        if left:
            self._owned[owner] = left
        else:
            del self._owned[owner]
        kind = SYSTEM_FENCE_COMMIT if commit else SYSTEM_FENCE_CANCEL
        payload: dict[str, Any] = {"fence": token, "ranges": ranges}
        if not commit:
            payload["why"] = why
        self.engine.append_system(FENCE_ENTITY, kind, payload)
        if commit and ranges:
            self.engine.reveal([(a, b) for a, b in ranges])

    def cancel_dead(self) -> None:
        for token, (pid, _) in list(self._open.items()):
            if not pid_alive(pid):
                self.finish(token, pid, commit=False, why=f"owner process {pid} died")


class _Area:
    """A client's area as the writer holds it: a descriptor of the file, checked when it
    was opened (this user's, mode 0600, a regular file with one link, a size within
    [AREA_MIN, AREA_MAX]) and the pid whose process maps it. Read with pread and written
    with pwrite: a truncated area is a short read, never a fault."""

    __slots__ = ("bell", "fd", "name", "pid", "size")

    def __init__(self, fd: int, name: str, pid: int, size: int) -> None:
        self.fd = fd
        self.name = name
        self.pid = pid
        self.size = size
        self.bell = doorbell_slot(name, DOORBELLS)  # the word of the control block its client waits on

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Request(W.Source):
    """A large request's bytes, read from its area as the decoder needs them."""

    def __init__(self, fd: int, n: int) -> None:
        self._fd = fd
        self._at = W.HEADER
        self._end = W.HEADER + n

    def read(self, size: int) -> bytes:
        size = min(size, self._end - self._at)
        if size <= 0:
            return b""
        chunk = os.pread(self._fd, size, self._at)
        self._at += len(chunk)
        return chunk


class Clients:
    """The client areas the writer answers: each opened once through a checked
    descriptor (``objects.open_shared_memory``) and kept (LRU, ``MAX_AREAS``); requests
    read from it within the writer's ``Limits``; replies written into it, then its
    doorbell rung (a word of the writer's own control block); and the sweep of areas
    whose process is gone."""

    def __init__(self, prefix: str, control: ControlBlock, limits: W.Limits) -> None:
        self.prefix = prefix
        self.control = control
        self.limits = limits
        self._areas: OrderedDict[str, _Area] = OrderedDict()
        self._expect = objects.Expect(os.geteuid(), W.AREA_MIN, W.AREA_MAX)

    def __len__(self) -> int:
        return len(self._areas)

    def known(self, name: str) -> _Area | None:
        """The open area of that name, if any (no check, no LRU move)."""
        return self._areas.get(name)

    def get(self, name: str, pid: int) -> _Area | None:
        """The area ``name`` made by process ``pid``; None when it is gone or fails a check."""
        area = self._areas.get(name)
        if area is not None:
            self._areas.move_to_end(name)
            return area
        area = self._open(name, pid)
        if area is not None:
            self._areas[name] = area
            if len(self._areas) > MAX_AREAS:
                self._areas.popitem(last=False)[1].close()
        return area

    def _open(self, name: str, pid: int) -> _Area | None:
        try:
            fd = objects.open_shared_memory(name, self._expect, write=True)
        except (OSError, ValueError):  # gone, or refused (UnsafeIpcObject is a PermissionError)
            return None
        st = os.fstat(fd)
        if objects.maps_file(pid, st) is False:  # not the area of the process its name says
            os.close(fd)
            return None
        return _Area(fd, name, pid, st.st_size)

    def drop(self, area: _Area) -> None:
        """Forget an area (its client said BYE)."""
        if self._areas.get(area.name) is area:
            del self._areas[area.name]
        area.close()

    def read(self, area: _Area) -> tuple[W.Request, int]:
        """The request in ``area`` and its size; ``ProtocolError`` when it is malformed,
        too large, or the area was truncated under it."""
        try:
            head = os.pread(area.fd, FIRST_READ, 0)
            n = W.request_length(head, self.limits)
            if W.HEADER + n <= len(head):
                return W.decode_request(memoryview(head)[W.HEADER:W.HEADER + n], n, self.limits), n
            return W.decode_request(_Request(area.fd, n), n, self.limits), n
        except OSError as exc:
            raise ProtocolError(f"area {area.name} cannot be read: {exc.strerror}") from None

    def reply(self, area: _Area, reply: W.Reply, epoch: int) -> bool:
        """Write ``reply`` into ``area`` (the body, then the id it answers) and ring its
        doorbell; False when the area cannot take it."""
        body = W.encode_reply(reply)
        if W.BODY_AT + len(body) > area.size:
            body = W.encode_reply(W.Reply(reply.request_id, epoch, W.STATUS_ERROR, ["ReplyTooLarge", [len(body)]]))
            if W.BODY_AT + len(body) > area.size:
                return False
        try:
            os.pwrite(area.fd, body, W.BODY_AT)
            os.pwrite(area.fd, W.REPLY_TO.pack(reply.request_id), 0)
        except (OSError, OverflowError):
            return False
        self.control.ring_doorbell(area.bell)
        return True

    def sweep(self) -> objects.Swept:
        """Close the areas of processes that are gone, and unlink the client objects of
        dead processes in /dev/shm (this user's regular files only; never raises)."""
        for name, area in list(self._areas.items()):
            if not pid_alive(area.pid):
                del self._areas[name]
                area.close()
        return objects.sweep_client_objects(self.prefix, lambda pid: not pid_alive(pid))

    def close(self) -> None:
        for area in self._areas.values():
            area.close()
        self._areas.clear()


class Writer:
    """The service loop around one Engine."""

    def __init__(self, data_dir: str, config: EngineConfig, supervisor_pid: int = 0) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.config = config
        self.supervisor_pid = supervisor_pid
        self.prefix = ipc_prefix(self.data_dir)
        self.stopping = False
        self.dropped = 0
        self.limits = W.request_limits(config.max_payload_bytes, config.max_batch_events, config.max_batch_bytes)
        self._swept_skipped = 0
        # the fsync the syncer thread finished (the loop takes it; one fsync in flight at a time)
        self._synced: _SyncDone | None = None
        self._nudge_failed = False  # logged once
        self.compaction = _Compaction(self)  # issue 13: a compaction's copies, swapped in between groups
        self._sync_jobs: queue.SimpleQueue[tuple[int, str, int] | None] = queue.SimpleQueue()
        self._syncing = False
        self._beater_stop = threading.Event()
        self._rung_at = -1
        self.groups = self.requests = 0
        self.group_sizes: dict[int, int] = {}  # requests in a commit group -> how many groups (tools/bench.py)
        self.stats = WriterStats()  # the control block's stats region (metrics: batpak_mp/_metrics.py)
        # replies held until the groups they belong to are published: (groups written at
        # their commit, area, request, results, index)
        self._waiting: list[tuple[int, _Area, W.Request, list[Any], int]] = []
        self._ckpt_seq = 0
        self._ckpt_failing = False  # the last checkpoint failed (logged once per streak)
        # _last_beat: the receiver thread's heartbeat; _last_publish: the loop's own
        self._last_beat = self._last_publish = self._last_ckpt = self._last_sweep = 0
        self.items = WireItems(config.max_payload_bytes)
        self._control_lock = threading.Lock()  # the loop and the receiver thread both beat
        _raise_file_limit()
        self.control = ControlBlock.create(self.data_dir, log=_log)
        self.clients = Clients(self.prefix, self.control, self.limits)
        prev = self.control.read()
        # the engine takes the data directory's lock first: a writer that loses the race
        # for it (StoreLocked) must not touch the live service's control block
        self.engine = Engine.open(self.data_dir, config, durable_hint=(prev.store_key, prev.durable))
        self.engine.set_index_listener(self.publish)  # new index files are named before old ones go
        self.fences: Fences = Fences(self.engine)
        self.epoch = self.control.read().writer_epoch + 1
        self.control.update(writer_epoch=self.epoch, writer_pid=os.getpid(), state=WriterState.STARTING,
                            max_payload=config.max_payload_bytes,
                            heartbeat_ns=time.monotonic_ns(), started_ns=time.monotonic_ns(), reason="")
        self.queue = objects.create_request_queue(request_queue_name(self.data_dir), QUEUE_DEPTH, W.MAX_MESSAGE, _log)
        if self.engine.signer is not None:
            self._publish_public_key(self.engine.signer.public_key)
        report = self.engine.recovery_report
        self.engine.append_system("writer", SYSTEM_WRITER_STARTED, {
            "epoch": self.epoch, "pid": os.getpid(), "recovered_through": report.get("last_sequence", 0),
            "torn_bytes_cut": report.get("torn_bytes_cut", 0), "recovery_ms": report.get("elapsed_ms", 0),
        })
        self.sweep_dead_clients()
        self.publish(state=WriterState.READY, store_key=self.engine.store_key)

    def _publish_public_key(self, key: bytes) -> None:
        self.engine.disk.write_file_atomic(os.path.join(self.data_dir, "receipt.pub"), key.hex().encode() + b"\n")

    # -- control block -------------------------------------------------------------------
    def publish(self, **extra: int | str) -> None:
        e = self.engine
        with self._control_lock:
            view = e.view()
            self.control.update_with_stats(  # the stats region with the counters it must agree with
                self.stats.values(), visible=view.visible, durable=e.durable, base_segment=view.base_segment,
                delta_gen=view.delta_gen, heartbeat_ns=time.monotonic_ns(), clients=len(self.clients),
                dropped_messages=self.dropped, revealed=view.revealed, groups=self.groups,
                requests=self.requests, **extra)
            if e.visible != self._rung_at or "state" in extra:
                self._rung_at = e.visible
                self.control.ring()  # subscribers in every process wake up

    def _beat_loop(self) -> None:
        """Heartbeat thread: keeps the heartbeat going while the loop is busy in a long
        commit (a 10,000-event batch, a slow write): busy is not hung."""
        while not self._beater_stop.wait(HEARTBEAT_EVERY_NS / 1e9):
            now = time.monotonic_ns()
            if now - self._last_beat >= HEARTBEAT_EVERY_NS:
                self._last_beat = now
                with self._control_lock:
                    self.control.update(heartbeat_ns=now)

    # -- the loop ------------------------------------------------------------------------
    def _sync_loop(self) -> None:
        """Syncer thread: runs the fsync of written groups while the loop parses and
        writes the next group (one fsync in flight at a time), then reports back."""
        while True:
            job = self._sync_jobs.get()
            if job is None:
                return
            fd, path, target = job
            try:
                t0 = time.monotonic_ns()
                self.engine.disk.fdatasync(fd, path)
                self.stats.fsync(time.monotonic_ns() - t0)
                self._synced = _SyncDone(target, None, path)
            except OSError as exc:
                self._synced = _SyncDone(target, exc, path)
            finally:  # the job's own duplicate (pending_sync_target): a rotation cannot close it
                self.engine.disk.close_quietly(fd, path)
            self._nudge()

    def _nudge(self) -> None:
        """Wake the loop if it sleeps in the kernel queue (a message of its own, taken
        first). A full queue needs none: the loop is awake taking messages, and looks at
        ``_synced`` after each take."""
        try:
            self.queue.send(NUDGE, 0, NUDGE_PRIORITY)
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            pass
        except posix_ipc.Error as exc:  # the loop still sees the fsync, at its next 50 ms wake
            if not self._nudge_failed:
                self._nudge_failed = True
                _log(f"cannot wake the loop through the request queue ({exc}): replies wait up to 50 ms")

    def _sync_done(self, done: _SyncDone) -> None:
        self._syncing = False
        if done.error is not None:
            raise self.engine.sync_failed(done.error, done.path)
        groups = done.target - self.engine.groups_published
        if groups > 0:  # (fewer when a rotation or an op settled them meanwhile)
            self.engine.publish_through(groups, True)
        self._answer_published()

    def _take(self, batch: list[bytes]) -> None:
        """Take what the kernel queue holds into ``batch`` (up to ``GROUP_MAX``), sleeping
        there up to ``RECEIVE_TIMEOUT_S`` for the first message. The loop takes them
        itself — no thread between the queue and the loop — so a request costs no extra
        wake-up; clients beyond the queue's 10 messages wait in the kernel for room."""
        receive = self.queue.receive
        try:
            msg = receive(RECEIVE_TIMEOUT_S)[0]
            while True:
                if msg != NUDGE:
                    batch.append(msg)
                    if len(batch) >= GROUP_MAX:
                        return
                msg = receive(0)[0]
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return

    def serve(self) -> None:
        pipelined = self.config.sync.value == "group"
        beater = threading.Thread(target=self._beat_loop, name="batpak-heartbeat", daemon=True)
        beater.start()
        syncer = threading.Thread(target=self._sync_loop, name="batpak-syncer", daemon=True)
        syncer.start()
        try:
            while not self.stopping:
                batch: list[bytes] = []
                self._take(batch)
                done = self._synced
                if done is not None:
                    self._synced = None
                    self._sync_done(done)
                if batch:
                    self.handle(batch, pipelined=pipelined)
                if pipelined and not self._syncing and self.engine.groups_written > self.engine.groups_published:
                    self._syncing = True
                    fd, path, _ = self.engine.pending_sync_target()
                    self._sync_jobs.put((fd, path, self.engine.groups_written))
                self.tick()
        finally:
            self._beater_stop.set()
            beater.join()
            self._sync_jobs.put(None)
            syncer.join()
        self.engine.sync()  # written groups: fsync and publish them, then answer
        self._answer_published()

    def drain(self) -> None:
        """Answer whatever is queued now, then stop taking work."""
        with self._control_lock:
            self.control.update(state=WriterState.DRAINING)
        while True:
            batch: list[bytes] = []
            while len(batch) < DRAIN_MAX:
                try:
                    msg = self.queue.receive(0)[0]
                except (posix_ipc.BusyError, posix_ipc.SignalError):
                    break
                if msg != NUDGE:
                    batch.append(msg)
            if not batch:
                break
            self.handle(batch)

    def tick(self) -> None:
        now = time.monotonic_ns()
        self.compaction.poll()  # swap in the copies a compaction prepared since (issue 13)
        if self.config.sync.value == "interval":
            self.engine.tick()
        if now - self._last_publish >= HEARTBEAT_EVERY_NS:
            self._last_publish = now
            self.publish()
            if self.supervisor_pid and os.getppid() != self.supervisor_pid:
                _log("supervisor is gone: stopping")
                self.stopping = True
        if now - self._last_ckpt >= CHECKPOINT_EVERY_NS or self.engine.visible - self._ckpt_seq >= CHECKPOINT_EVERY_EVENTS:
            self._last_ckpt = now
            self._ckpt_seq = self.engine.visible
            self._checkpoint()
            self.engine.index_tags()  # the tail below a chunk, at most once a second (a failure waits there)
        if now - self._last_sweep >= SWEEP_EVERY_NS:
            self._last_sweep = now
            try:
                self.sweep_dead_clients()
            except StorePoisoned:
                raise
            except StorageError as exc:  # a dead owner's FENCE_CANCEL met a full disk: next sweep
                _log(f"sweep: {exc}")
            self._answer_published()  # a cancelled fence appended (and settled) an event
            self.publish()

    def _checkpoint(self) -> None:
        """Persist the durable floor. A failure (a full disk) is logged and retried at the
        next tick: the older checkpoint stays valid and the writer stays up."""
        try:
            self.engine.checkpoint()
        except StorePoisoned:
            raise
        except StorageError as exc:
            if not self._ckpt_failing:
                _log(f"checkpoint failed (retried every second): {exc}")
            self._ckpt_failing = True
            return
        if self._ckpt_failing:
            _log("checkpoint written again")
            self._ckpt_failing = False

    def handle(self, raw_messages: list[bytes], *, pipelined: bool = False) -> None:
        """One commit group: parse every message and commit every append together.
        Pipelined (sync mode "group"): the group is only written here; its replies wait
        in ``_waiting`` until the fsync covering it returns (``_sync_done``). Otherwise
        it is fsynced (per the sync mode), published and answered at once."""
        appends: list[tuple[_Area, W.Request, list[Prepared]]] = []
        others: list[tuple[_Area, W.Request]] = []
        held = 0  # request bytes decoded into this group: past one largest request, it is committed
        for raw in raw_messages:
            parsed = self._parse(raw)
            if parsed is None:
                continue
            area, req, size = parsed
            if req.op in (W.OP_APPEND, W.OP_APPEND_FENCED):
                try:
                    if req.op == W.OP_APPEND_FENCED:
                        self.fences.check_room(req.body[0], area.pid)
                        prepared = self.items.prepare(req.body[1])
                    else:
                        prepared = self.items.prepare(req.body)
                except BatpakError as exc:
                    self.reply_error(area, req.request_id, exc)
                    continue
                appends.append((area, req, prepared))
                held += size
                if held >= self.limits.max_request:  # bounds the writer's memory: a group of giants
                    self._commit(appends, settle=not pipelined)
                    appends, held = [], 0
            elif req.op == W.OP_BYE:
                self.clients.drop(area)
            elif req.op == W.OP_COMPACT:
                self.compaction.begin(area, req.request_id)  # answered when the run ends (tick)
            else:
                others.append((area, req))
        if appends:
            self._commit(appends, settle=not pipelined or bool(others))
        self._answer_published()
        if others:
            # the ops below act on a published log (a fence commit follows its appends); the
            # fsync that takes is the sync mode's (only SYNC itself always fsyncs)
            self.engine.settle()
            self._answer_published()
        for area, req in others:
            try:
                data: Any = [self.engine.visible, self.engine.durable]
                if req.op == W.OP_SYNC:
                    self.engine.sync()
                elif req.op == W.OP_FENCE_BEGIN:
                    data = [self.fences.begin(area.pid)]
                elif req.op == W.OP_FENCE_COMMIT:
                    self.fences.finish(req.body, area.pid, commit=True)
                elif req.op == W.OP_FENCE_CANCEL:
                    self.fences.finish(req.body, area.pid, commit=False, why="cancelled by its owner")
            except BatpakError as exc:
                self.reply_error(area, req.request_id, exc)
                continue
            self.publish()
            if req.op != W.OP_FENCE_BEGIN:
                data = [self.engine.visible, self.engine.durable]
            self.reply(area, W.Reply(req.request_id, self.epoch, W.STATUS_OK, data))
        if self.engine.poisoned is not None:
            raise self.engine.poisoned

    def _commit(self, appends: list[tuple[_Area, W.Request, list[Prepared]]], *, settle: bool) -> None:
        """Commit ``appends`` as one group; their replies wait in ``_waiting`` (holding
        only what a reply needs: the payloads are let go once written)."""
        self.groups += 1
        self.requests += len(appends)
        self.group_sizes[len(appends)] = self.group_sizes.get(len(appends), 0) + 1
        fenced = [req.op == W.OP_APPEND_FENCED for _, req, _ in appends]
        t0 = time.monotonic_ns()
        results = self.engine.commit([p for _, _, p in appends], fenced if any(fenced) else None, settle=settle)
        target = self.engine.groups_written  # every reply waits for the groups written so far
        self.stats.group([p for _, _, p in appends], results, target, t0)
        self._waiting += [(target, area, _names_only(req), results, i) for i, (area, req, _) in enumerate(appends)]

    def _area_pid(self, name: str) -> int | None:
        """The pid in the name of one of this store's areas (None for any other name)."""
        known = self.clients.known(name)
        if known is not None:
            return known.pid
        parsed = parse_area_name(name)
        return parsed.pid if parsed is not None and parsed.prefix == self.prefix else None

    def _parse(self, raw: bytes) -> tuple[_Area, W.Request, int] | None:
        try:
            msg = W.decode_message(raw, self._area_pid)
        except ProtocolError:
            self.dropped += 1
            return None
        area = self.clients.get(msg.area, msg.client_pid)
        if area is None:
            self.dropped += 1  # the client is gone (or re-sent through a new area), or the area fails a check
            return None
        try:
            req, size = self.clients.read(area)
        except BatpakError as exc:  # malformed (ProtocolError), or a batch over the limit (InvalidArgument)
            self.reply_error(area, msg.request_id, exc)
            return None
        if req.request_id != msg.request_id:
            self.dropped += 1  # a stale message: the area already holds a newer request
            return None
        return area, req, size

    def _answer_published(self) -> None:
        """Reply to every request whose groups are published (fsynced, in the default
        mode): acknowledged means durable."""
        published = self.engine.groups_published
        self.stats.published(published, time.monotonic_ns())
        if not self._waiting or self._waiting[0][0] > published:
            return
        ready = [w for w in self._waiting if w[0] <= published]
        self._waiting = [w for w in self._waiting if w[0] > published]
        self.publish()
        for _, area, req, results, i in ready:
            res = results[i]
            if isinstance(res, BaseException):
                self.reply_error(area, req.request_id, res)
                continue
            if req.op == W.OP_APPEND_FENCED and not self.fences.written(
                    req.body[0], res[0].global_sequence, res[-1].global_sequence):
                self.reply_error(area, req.request_id, FenceLost(req.body[0], "the fence was cancelled (its owner "
                                                                 "died) before this append was durable"))
                continue
            self.reply_receipts(area, req, res)

    def reply(self, area: _Area, reply: W.Reply) -> None:
        if not self.clients.reply(area, reply, self.epoch):
            self.dropped += 1

    def reply_receipts(self, area: _Area, req: W.Request, receipts: list[Receipt]) -> None:
        items = req.body[1] if req.op == W.OP_APPEND_FENCED else req.body  # one receipt per item
        if req.epoch_seen != self.epoch and receipts and receipts[0].deduplicated:
            # a request first sent to an earlier writer (re-sent, or left in the queue): its
            # "original" may be its own first attempt, so it is not reported as a duplicate
            receipts = [r._replace(deduplicated=False) for r in receipts]
        fields = [W.receipt_fields(r, it[0], it[1]) for r, it in zip(receipts, items, strict=True)]
        self.reply(area, W.Reply(req.request_id, self.epoch, W.STATUS_OK, fields))

    def reply_error(self, area: _Area, request_id: int, exc: BaseException) -> None:
        self.reply(area, W.Reply(request_id, self.epoch, W.STATUS_ERROR, W.error_to_wire(exc)))

    # -- housekeeping --------------------------------------------------------------------
    def sweep_dead_clients(self) -> None:
        """Cancel the visibility fences of client processes that no longer exist, close
        their areas and unlink their objects (``Clients.sweep``)."""
        self.fences.cancel_dead()
        swept = self.clients.sweep()
        if swept.skipped != self._swept_skipped:  # said once per change, not every 5 s
            self._swept_skipped = swept.skipped
            if swept.skipped:
                _log(f"sweep: left {swept.skipped} object(s) under this store's prefix in /dev/shm that are not "
                     "this user's regular files (or could not be removed)")

    def close(self, clean: bool) -> None:
        if clean:
            try:
                self.engine.append_system("writer", SYSTEM_WRITER_STOPPED, {"epoch": self.epoch, "pid": os.getpid()})
            except BatpakError:
                pass
        self.engine.close()
        if clean:
            self.publish(state=WriterState.STOPPED)
        self.clients.close()
        self.queue.close()


def _names_only(req: W.Request) -> W.Request:
    """``req`` with each item cut to its entity and scope (what its receipt needs)."""
    if req.op == W.OP_APPEND_FENCED:
        return W.Request(req.op, req.request_id, req.epoch_seen, [req.body[0], [(it[0], it[1]) for it in req.body[1]]])
    return W.Request(req.op, req.request_id, req.epoch_seen, [(it[0], it[1]) for it in req.body])


def _raise_file_limit() -> None:
    """One descriptor per client area: raise the soft limit towards ``FILES_WANTED``."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = FILES_WANTED if hard == resource.RLIM_INFINITY else min(FILES_WANTED, hard)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError):
        pass


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM us when the supervisor dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m batpak_mp.writer", description=__doc__.split("\n")[0])
    p.add_argument("data_dir")
    p.add_argument("--segment-max-bytes", type=int, default=EngineConfig.segment_max_bytes)
    p.add_argument("--sync", default="group", choices=["group", "interval", "none"])
    p.add_argument("--sync-interval-ms", type=int, default=EngineConfig.sync_interval_ms)
    p.add_argument("--max-payload-bytes", type=int, default=EngineConfig.max_payload_bytes)
    p.add_argument("--signing-key-file", default=None, help="file holding a hex Ed25519 private key")
    p.add_argument("--no-tag-index", dest="tag_index", action="store_false",
                   help="keep no tag index (prefix, scope and kind queries filter the records)")
    p.add_argument(OPT_READY_FD, dest="ready_fd", type=int, default=-1)
    p.add_argument(OPT_SUPERVISOR_PID, dest="supervisor_pid", type=int, default=0)
    return p


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    key = None
    if args.signing_key_file:
        with open(args.signing_key_file) as f:
            key = bytes.fromhex(f.read().strip())
    return EngineConfig(segment_max_bytes=args.segment_max_bytes, sync=parse_sync(args.sync),
                        sync_interval_ms=args.sync_interval_ms, max_payload_bytes=args.max_payload_bytes,
                        signing_key=key, tag_index=args.tag_index)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.supervisor_pid:
        _die_with_parent()
        if os.getppid() != args.supervisor_pid:
            return WriterExit.OK
    try:
        config = config_from_args(args)
    except (BatpakError, OSError, ValueError) as exc:
        _log(f"bad configuration: {exc}")
        return WriterExit.USAGE
    stop_requested: list[bool] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop_requested.append(True)
        if writer_ref:
            writer_ref[0].stopping = True

    writer_ref: list[Writer] = []
    sys.setswitchinterval(0.0005)  # hand the GIL to the syncer thread quickly once its fsync returns
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fail: Callable[[str], None] = lambda reason: _mark_failed(args.data_dir, reason)  # noqa: E731
    try:
        writer = Writer(args.data_dir, config, args.supervisor_pid)
    except StoreLocked as exc:
        _log(str(exc))
        return WriterExit.LOCKED
    except (CorruptSegment, FutureFormat) as exc:
        _log(f"recovery refused the store: {exc}")
        fail(str(exc))
        return WriterExit.CORRUPT
    except StorePoisoned as exc:
        _log(str(exc))
        fail(str(exc))
        return WriterExit.POISONED
    except (UnsafeIpcObject, MasterKeyError) as exc:  # another user's object it cannot remove, or a wrong
        _log(f"refused: {exc}")                       # or missing master key: restarting cannot help
        fail(str(exc))
        return WriterExit.USAGE
    writer_ref.append(writer)
    writer.stopping = bool(stop_requested)
    if args.ready_fd >= 0:
        try:
            os.write(args.ready_fd, WRITER_READY_LINE)
            os.close(args.ready_fd)
        except OSError:
            pass
    _log(f"ready: epoch {writer.epoch}, last sequence {writer.engine.visible}, "
         f"recovery {writer.engine.recovery_report.get('elapsed_ms')} ms")
    try:
        writer.serve()
        writer.drain()
    except StorePoisoned as exc:
        _log(f"failed closed: {exc}")
        writer.control.update(state=WriterState.FAILED, reason=f"failed closed: {exc}")
        return WriterExit.POISONED
    writer.close(clean=True)
    _write_group_sizes(writer.group_sizes)
    _log("stopped")
    return WriterExit.OK


def _write_group_sizes(sizes: dict[int, int]) -> None:
    """At a clean stop, "<requests> <groups>" lines to the file ``BATPAK_MP_GROUP_STATS``
    names, when it names one: the group-size distribution tools/bench.py reports."""
    path = os.environ.get(GROUP_STATS_ENV)
    if path:
        try:
            with open(path, "w") as f:
                f.write("".join(f"{size} {count}\n" for size, count in sorted(sizes.items())))
        except OSError as exc:
            _log(f"could not write the group sizes to {path}: {exc}")


def _mark_failed(data_dir: str, reason: str) -> None:
    try:
        block = ControlBlock.create(data_dir)
        block.update(state=WriterState.FAILED, reason=reason)
        block.close()
    except Exception:  # best effort: the exit code says it too
        pass


if __name__ == "__main__":
    sys.exit(main())
