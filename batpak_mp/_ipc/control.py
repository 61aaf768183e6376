"""The control block: a small shared-memory record of the service's state.

Owns: its byte layout (docs/PROTOCOL.md §4), the seqlock that lets one writer update it
while any number of readers read it without locks (its name is ``names.control_name``),
the doorbells: a table of futex words after the first page, one of which the writer
rings after each reply it writes into a client's area (§4.3), and where the stats region
(§4.4, laid out by ``stats``) sits in the first page, under the same seqlock. Written by the writer
(frontiers, state, heartbeat, doorbells) and by the supervisor (state after it reaps a
writer, restart count, failure reason); read by clients, which map it read-only.
Invariants: the block a process uses passed ``objects``' checks on the descriptor it was
mapped from (the service's own user, mode 0600, a regular file, big enough): the writer
and supervisor replace one someone else made, a client refuses it. Shared memory is only
ever stored into with values packed beforehand (slice assignment, one aligned store for
``seq``), never with ``struct.pack_into``: it clears its target before it writes, so the
``seq`` word would pass through 0 (even, "consistent") in the middle of an update and a
reader could accept a half-cleared block (a live service once read as ABSENT with no
heartbeat).
Must not import the engine, the writer or the client.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import posix_ipc

from .._errors import BatpakError, FutureFormat, ProtocolError, StorageError, WriterUnavailable
from .._values import WriterState
from . import objects
from .futex import ReadOnlyMapping, Word, WordTable, word_in_writable
from .names import control_name, doorbell_slot
from .stats import STATS, Stats, decode

CONTROL_MAGIC = 0x4C54435F504D5042  # "BPMP_CTL" little-endian
CONTROL_VERSION = 4  # 4: max_payload; 3: the stats region (§4.4); 2: doorbells after the first page (1 was one page)
FIELDS_PAGE = 4096  # the fields, the reason and the notify word
DOORBELLS_AT = FIELDS_PAGE
DOORBELLS = 4096  # u32 futex words: a client waits on word doorbell_slot(area) % DOORBELLS
CONTROL_SIZE = DOORBELLS_AT + 4 * DOORBELLS  # 20 KiB
REASON_MAX = 512  # bytes of the failure reason text

# u64 fields after the 16-byte head (magic u64, version u32, pad u32); seq is the seqlock
_FIELDS = (
    "seq", "writer_epoch", "writer_pid", "state", "heartbeat_ns", "visible", "durable",
    "base_segment", "delta_gen", "supervisor_pid", "restarts", "store_key", "clients",
    "dropped_messages", "started_ns", "revealed", "groups", "requests", "max_payload",
)
_FIELD_FMT = struct.Struct("<" + "Q" * len(_FIELDS))
_HEAD = struct.Struct("<QII")
_FIELDS_AT = 16
_FIELDS_END = _FIELDS_AT + _FIELD_FMT.size
_REASON_AT = _FIELDS_END
_REASON_LEN = struct.Struct("<I")
_SEQ = struct.Struct("<Q")
_AFTER_SEQ = _FIELDS_AT + _SEQ.size  # an update stores the fields from here: seq only by its own store
NOTIFY_AT = 2048  # a u32 the writer bumps after every publish; subscribers futex-wait on it
STATS_AT = 2560  # the stats region (stats.STATS_FIELDS, u64 each), inside the seqlock, after the notify word
assert NOTIFY_AT + 4 <= STATS_AT and STATS_AT + STATS.size <= FIELDS_PAGE
_FRONTIER = struct.Struct("<QQQQ")  # visible, durable, base_segment, delta_gen
_REVEALED = _FIELDS.index("revealed")


class ControlSnapshot(NamedTuple):
    seq: int
    writer_epoch: int
    writer_pid: int
    state: int
    heartbeat_ns: int
    visible: int
    durable: int
    base_segment: int
    delta_gen: int
    supervisor_pid: int
    restarts: int
    store_key: int  # 64 bits of the store id: a durable hint applies to this store only
    clients: int
    dropped_messages: int
    started_ns: int
    revealed: int  # ranges in fences.tbl (committed visibility fences)
    groups: int  # commit groups (one write + one fsync each) since this writer started
    requests: int  # append requests served by those groups: requests/groups = group commit at work
    max_payload: int  # the writer's max_payload_bytes (clients refuse larger payloads before sending); 0: unknown
    reason: str


class ControlBlock:
    """A mapped control block. ``create`` makes (or adopts) it; ``attach`` only opens."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool, bell: Word,
                 doorbells: WordTable | ReadOnlyMapping) -> None:
        self.name = name
        self._mm = mm
        self.owner = owner
        self.bell: Word | None = bell  # the futex word (writable only for the owner)
        self._doorbells: WordTable | ReadOnlyMapping | None = doorbells
        self._stats_stored: Sequence[int] | None = None  # the values last stored in the stats region
        # the seqlock counter of a writable block: each of its values stored with one aligned 8-byte store
        self._seq: ctypes.c_uint64 | None = ctypes.c_uint64.from_buffer(mm, _FIELDS_AT) if owner else None

    @classmethod
    def create(cls, data_dir: str, log: Callable[[str], None] | None = None) -> ControlBlock:
        """Open or create the block of ``data_dir`` (0600). An existing block of this
        user keeps its contents (a new writer continues the epoch count of the old one);
        one made by someone else is replaced (``objects.create_shared_memory``)."""
        name = control_name(data_dir)
        fd = objects.create_shared_memory(name, CONTROL_SIZE, adopt=_adoptable, log=log)
        try:
            mm = mmap.mmap(fd, CONTROL_SIZE)
        finally:
            os.close(fd)
        magic, version, _ = _HEAD.unpack_from(mm, 0)
        head = _HEAD.pack(CONTROL_MAGIC, CONTROL_VERSION, 0)
        if magic != CONTROL_MAGIC:
            mm[:CONTROL_SIZE] = bytes(CONTROL_SIZE)
            mm[:_HEAD.size] = head
        elif version > CONTROL_VERSION:
            mm.close()
            raise FutureFormat(name, version, CONTROL_VERSION)
        elif version < CONTROL_VERSION:  # left by an older service: doorbells and stats are new (zero)
            mm[:_HEAD.size] = head
            old_fields_end = _FIELDS_AT + 8 * _FIELDS.index("max_payload")  # where older versions put the reason
            mm[old_fields_end:NOTIFY_AT] = bytes(NOTIFY_AT - old_fields_end)  # max_payload 0, no reason
        return cls(name, mm, True, word_in_writable(mm, NOTIFY_AT), WordTable(mm, DOORBELLS_AT, DOORBELLS))

    @classmethod
    def attach(cls, data_dir: str) -> ControlBlock:
        """Open an existing block read-only; WriterUnavailable when none is served,
        ``UnsafeIpcObject`` when the object is not the service's (its owner must be the
        data directory's)."""
        name = control_name(data_dir)
        try:
            uid = os.stat(data_dir).st_uid  # the service's user: the block must be its
            fd = objects.open_shared_memory(name, objects.Expect(uid, FIELDS_PAGE, single_link=False))
        except FileNotFoundError:
            raise WriterUnavailable(f"no service is running for {data_dir!r} (start it with bp.serve or "
                                    "`batpak-mp serve`)") from None
        except OSError as exc:
            if isinstance(exc, BatpakError):
                raise
            raise StorageError("stat", data_dir, exc) from None  # e.g. EACCES: another user's directory
        try:
            head = os.pread(fd, _HEAD.size, 0)
            magic, version, _ = _HEAD.unpack(head) if len(head) == _HEAD.size else (0, 0, 0)
            if magic != CONTROL_MAGIC:
                raise ProtocolError(f"control block {name} has a bad magic")
            if version > CONTROL_VERSION:
                raise FutureFormat(name, version, CONTROL_VERSION)
            if version < CONTROL_VERSION or os.fstat(fd).st_size < CONTROL_SIZE:
                raise ProtocolError(f"control block {name} is of version {version} (an older service runs): "
                                    "restart the service with this version")
            mm = mmap.mmap(fd, CONTROL_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
            words = ReadOnlyMapping(fd, CONTROL_SIZE)
        finally:
            os.close(fd)
        return cls(name, mm, False, words.word(NOTIFY_AT), words)

    # -- reading (lock-free) -----------------------------------------------------------
    def _settled(self, read_fields: Any) -> Any:
        """Run ``read_fields`` until it saw no update in flight (seqlock). Spins briefly,
        then yields the CPU: on a busy machine the writer may be descheduled mid-update.
        An update that never finishes means its writer died in it; the supervisor
        repairs the count when it reaps the writer, so a reader waits up to 2 s."""
        mm = self._mm
        deadline = 0.0
        spins = 0
        while True:
            s1 = _SEQ.unpack_from(mm, _FIELDS_AT)[0]
            if not s1 & 1:
                value = read_fields(mm)
                if _SEQ.unpack_from(mm, _FIELDS_AT)[0] == s1:
                    return value
            spins += 1
            if spins > 100:
                if not deadline:
                    deadline = time.monotonic() + 2.0
                elif time.monotonic() > deadline:
                    raise WriterUnavailable("the control block stayed mid-update for 2 s (its writer died in it)")
                time.sleep(0.0001 if spins < 1000 else 0.001)

    def read(self) -> ControlSnapshot:
        def fields(mm: mmap.mmap) -> ControlSnapshot:
            values = _FIELD_FMT.unpack_from(mm, _FIELDS_AT)
            (n,) = _REASON_LEN.unpack_from(mm, _REASON_AT)
            reason = bytes(mm[_REASON_AT + 4:_REASON_AT + 4 + min(n, REASON_MAX)])
            return ControlSnapshot._make((*values, reason.decode("utf-8", "replace")))

        snap: ControlSnapshot = self._settled(fields)
        return snap

    def read_stats(self) -> tuple[ControlSnapshot, Stats]:
        """The fields and the stats region (§4.4) in one consistent read."""
        def fields(mm: mmap.mmap) -> tuple[tuple[int, ...], bytes, tuple[int, ...]]:
            (n,) = _REASON_LEN.unpack_from(mm, _REASON_AT)
            return (_FIELD_FMT.unpack_from(mm, _FIELDS_AT), bytes(mm[_REASON_AT + 4:_REASON_AT + 4 + min(n, REASON_MAX)]),
                    STATS.unpack_from(mm, STATS_AT))

        values, reason, stats = self._settled(fields)
        return ControlSnapshot._make((*values, reason.decode("utf-8", "replace"))), decode(stats)

    def frontier(self) -> tuple[int, int, int, int, int]:
        """(visible, base_segment, delta_gen, state, revealed) — the hot read of every
        client call."""
        def fields(mm: mmap.mmap) -> tuple[int, int, int, int, int]:
            vis, _dur, base, delta = _FRONTIER.unpack_from(mm, _FIELDS_AT + 5 * 8)
            return (vis, base, delta, _SEQ.unpack_from(mm, _FIELDS_AT + 3 * 8)[0],
                    _SEQ.unpack_from(mm, _FIELDS_AT + _REVEALED * 8)[0])

        result: tuple[int, int, int, int, int] = self._settled(fields)
        return result

    # -- writing (one writer at a time: the writer, or the supervisor after a reap) ------
    def update(self, **fields: int | str) -> None:
        self._update(fields, None)

    def update_with_stats(self, stats: Sequence[int], /, **fields: int | str) -> None:
        """``update(**fields)`` and the whole stats region (§4.4: the writer's
        ``WriterStats.values()``) in one seqlock'd update."""
        self._update(fields, stats)

    def _update(self, fields: dict[str, int | str], stats: Sequence[int] | None) -> None:
        """The updater's side of the seqlock (PROTOCOL.md §4.1). Everything is packed
        before it is stored (``struct.pack_into`` would clear the block first, seq
        included: see the module's invariants); ``seq`` is stored on its own, odd first."""
        mm, seq_word = self._mm, self._seq
        if seq_word is None:
            raise WriterUnavailable("the control block is closed or read-only")
        values = dict(zip(_FIELDS, _FIELD_FMT.unpack_from(mm, _FIELDS_AT), strict=True))
        seq = values["seq"]
        if seq & 1:  # a previous updater died mid-update: finish its odd count
            seq += 1
        reason = fields.pop("reason", None)
        for key, value in fields.items():
            if key not in values or key == "seq":
                raise KeyError(key)
            values[key] = int(value)
        values["seq"] = seq + 1
        packed = _FIELD_FMT.pack(*values.values())  # before the odd store: a bad value leaves the block as it was
        raw = None if reason is None else str(reason).encode()[:REASON_MAX]
        new_stats = None if stats is None or stats is self._stats_stored else STATS.pack(*stats)
        seq_word.value = seq + 1  # odd: update in progress
        mm[_AFTER_SEQ:_FIELDS_END] = packed[_SEQ.size:]
        if raw is not None:
            mm[_REASON_AT:_REASON_AT + 4 + len(raw)] = _REASON_LEN.pack(len(raw)) + raw
        if new_stats is not None:  # the same tuple again: stored already
            mm[STATS_AT:STATS_AT + STATS.size] = new_stats
            self._stats_stored = stats
        seq_word.value = seq + 2  # even: consistent

    def heartbeat(self) -> None:
        self.update(heartbeat_ns=time.monotonic_ns())

    def ring(self) -> None:
        """Wake every subscriber (after a publish)."""
        if self.bell is not None:
            self.bell.ring()

    def ring_doorbell(self, slot: int) -> None:
        """Wake the client(s) waiting on doorbell ``slot`` (writer: after a reply)."""
        table = self._doorbells
        if isinstance(table, WordTable):
            table.ring(slot)

    def doorbell(self, area: str) -> Word:
        """The word a client waits on for the replies written into ``area``."""
        return self.doorbell_word(doorbell_slot(area, DOORBELLS))

    def doorbell_word(self, slot: int) -> Word:
        """Doorbell word ``slot`` (0..DOORBELLS-1): what an asyncio waiter watches for all
        the areas it named after that word (``names.area_token``)."""
        table = self._doorbells
        if not isinstance(table, ReadOnlyMapping):
            raise WriterUnavailable("the control block is closed")
        return table.word(DOORBELLS_AT + 4 * (slot % DOORBELLS))

    def close(self) -> None:
        self._seq = None  # the ctypes view must go before the mapping can be closed
        bell, self.bell = self.bell, None
        table, self._doorbells = self._doorbells, None
        if isinstance(table, ReadOnlyMapping):
            table.close()
        elif isinstance(table, WordTable):
            table.release()
        del bell, table  # releases the ctypes views of a writable mapping before it is closed
        self._mm.close()

    @staticmethod
    def unlink(data_dir: str) -> None:
        """Remove the block's name (best effort: gone already, or not ours to remove)."""
        try:
            posix_ipc.unlink_shared_memory(control_name(data_dir))
        except (posix_ipc.Error, OSError):
            pass


def state_name(state: int) -> str:
    try:
        return WriterState(state).name.lower()
    except ValueError:
        return f"unknown({state})"


def _adoptable(fd: int, st: os.stat_result) -> bool:
    """An existing object of the service's user is continued as the control block when
    it is one (its magic) or nothing else can reach it (one link: a fresh or garbage
    object is zeroed). One with other names and no magic is some other memory: replaced."""
    if st.st_nlink == 1:
        return True
    head = os.pread(fd, _HEAD.size, 0)
    return len(head) == _HEAD.size and _HEAD.unpack(head)[0] == CONTROL_MAGIC
