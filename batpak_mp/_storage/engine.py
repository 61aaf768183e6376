"""The journal engine: the single owner of a data directory, in one process (the facade).

Owns: opening a directory (the lock, store.meta, recovery, the reader, fences.tbl) and
closing it, the public read/write API, and the surface the writer process drives (see
``Engine``). The commit path itself is ``journal.Journal``. The parts, each a module of
this package:
  config      ``EngineConfig``: the tunables
  planning    the commit decision logic, pure (guards, grouping, rollback, sequences)
  journal     the commit path: plan -> write -> fsync -> index -> publish; rotation
  segments    segment files: the active segment, create, seal, rotate mechanics
  indexfiles  records.idx, the delta table, the base tables
  recovery    recovery at open (full, or the same-boot fast path), checksum stamps
  fences      fences.tbl: the revealed ranges of committed visibility fences
  osio        the ``Disk`` seam: the only module that calls the OS
Invariants: ``visible`` never passes a frame that recovery could cut (in the default
sync mode it is published only after fsync); a failed fsync poisons the engine for
good; index files are derived data, rebuilt from segments when they disagree; a failed
close is never reported (durability comes from fsync, and the descriptor is gone either
way); a failed open releases the lock and every descriptor it took.
Must not import the writer, the client, the supervisor, the IPC layer or posix_ipc.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .._errors import BatpakError, CorruptSegment, DiskFull, StoreClosed, StoreLocked, StorePoisoned
from .._format.directory import CHECKPOINT_FILE, INDEX_DIR, LOCK_FILE, META_FILE, SEGMENT_DIR
from .._format.ids import store_tag_of
from .._format.meta import decode_meta, encode_meta, inherited_of, upgraded_meta
from .._gates import Denial, bypass_audit_item, denial_payload, effect_item
from .._prepare import Prepared, prepare, prepare_items
from .._query import Region
from .._read.reader import Reader, StaleView, View
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
    payload_version_for,
)
from .compaction import Compactor, EngineErasure
from .config import EngineConfig, parse_sync
from .encryption import Encryption
from .fences import FenceTable
from .indexfiles import IndexFiles
from .journal import Journal
from .osio import DEFAULT_DISK, Disk
from .recovery import Recovery, Stamps, read_checkpoint
from .segments import ActiveSegment, SegmentFiles

__all__ = ["Engine", "EngineConfig", "parse_sync"]


class Engine(EngineErasure):
    """Single-owner journal engine. Open with ``Engine.open(data_dir)``.

    Beyond the public API, the writer process drives: ``commit`` (several requests, some
    fenced, optionally not settled), ``settle``, ``sync``, ``tick``, ``checkpoint``;
    ``groups_written``/``groups_published`` with ``pending_sync_target``,
    ``publish_through`` and ``sync_failed`` (its pipeline's fsync on another thread);
    ``view()`` (the frontier and index generations it publishes), ``poisoned``,
    ``set_index_listener``, ``reveal``, ``index_tags``, ``append_system``, ``recovery_report``,
    ``store_key``, ``signer`` and ``disk``."""

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
        self._lock_fd = -1
        self.signer = Signer(config.signing_key) if config.signing_key else None
        self.recovery_report: dict[str, Any] = {}
        self._seg_dir = os.path.join(self.data_dir, SEGMENT_DIR)
        self._idx_dir = os.path.join(self.data_dir, INDEX_DIR)
        try:
            self._lock()
            self._encryption = Encryption.open(self.disk, self.data_dir)  # MasterKeyError here: nothing written yet
            self._load_meta()
            self._recover(durable_hint)
            self.reader = Reader(self.data_dir, self._journal.view)
            self._journal.attach(self.reader)
            self.reader.refresh()
            fence_chain = self.reader.history(FENCE_ENTITY)
            self._fences.rebuild(fence_chain)
            self._index.open_positions(self.visible, [(ev.global_sequence, ev.payload["ranges"]) for ev in fence_chain
                                                      if ev.kind == (CATEGORY_SYSTEM, SYSTEM_FENCE_COMMIT)])
            self._index.open_tags(self.visible, trusted=bool(self.recovery_report.get("same_boot")),
                                  entity_of=self._entity_of, enabled=self.config.tag_index)
            self.reader.view = self.view()
        except BaseException:
            self._release()
            raise

    def _entity_of(self, seq: int) -> bytes:
        """The entity name of a published event (the tag index files events by prefix)."""
        try:
            return self.reader.frame(seq).entity
        except StaleView as exc:  # records.idx disagrees with the log: the index build gives up, typed
            raise CorruptSegment(self._seg_dir, 0, f"no readable frame for sequence {seq}") from exc

    def index_tags(self) -> None:
        """File every published event in the tag index now (the writer calls it about once
        a second; commits file them a chunk at a time)."""
        self._check_open()
        self._index.build_tags(self.visible)

    def _lock(self) -> None:
        d = self.disk
        d.makedirs(self.data_dir)
        fd, holder = d.take_lock(os.path.join(self.data_dir, LOCK_FILE))
        if fd < 0:
            raise StoreLocked(self.data_dir, holder or None)
        self._lock_fd = fd
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
            upgraded = upgraded_meta(raw)
            if upgraded is not None:  # a version-1 store: new frames chain payload digests (FORMAT.md §9)
                self.disk.write_file_atomic(path, upgraded)
        self.inherited = inherited_of(raw, path) if raw is not None else ()  # a fork's (FORMAT.md §8.1)
        self.store_tag = store_tag_of(self.store_id)  # in every event id
        self.store_key = int.from_bytes(self.store_id[:8], "little") or 1  # in the control block

    def _recover(self, durable_hint: tuple[int, int] | None) -> None:
        started = time.perf_counter()
        d = self.disk
        ckpt = read_checkpoint(d, os.path.join(self.data_dir, CHECKPOINT_FILE))
        hint = durable_hint[1] if durable_hint and durable_hint[0] == self.store_key else 0
        floor = max(hint, ckpt.seq if ckpt else 0)
        self._index = IndexFiles(d, self._idx_dir, self._seg_dir, self.store_key)
        self._index.open_records()
        stamps = Stamps(d, self._idx_dir, d.boot_id())
        stamps.load()
        segments = SegmentFiles(d, self._seg_dir, self.store_id, self.inherited)
        self._fences = FenceTable(d, self._idx_dir)
        self._journal = Journal(self.data_dir, self.config, d, self._clock_ms, self.store_tag, self.signer,
                                segments, self._index, self._fences, stamps)
        self._compactor = Compactor(d, segments, self._index, self._idx_dir, on_swap=self._segment_swapped)
        self._retention_cache: dict[str, Any] = {}
        self._journal.idem_window = lambda: self.retention().idempotency_window_ms
        self._encryption.register(self.store_tag, self.inherited)
        self._journal.cipher = self._encryption.apply if self._encryption.ring is not None else None
        done = Recovery(segments, self._index, stamps, self.config.segment_max_bytes, self._journal.seal).run(
            ckpt, floor, full=self._compactor.interrupted())  # a swap cut short: every footer into records.idx
        self._journal.start(done)  # owns the active segment from here (a failure below closes it)
        self._compactor.recover()
        self.recovery_report = {**done.report, "elapsed_ms": round((time.perf_counter() - started) * 1000, 2)}

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self.poisoned is None and self._seg is not None:
                self.sync()
                self._index.build_tags(self.visible)  # a reopen finds every event filed
                try:
                    self._journal.write_checkpoint()
                except DiskFull:
                    pass  # the log is fsynced; the older checkpoint only holds less of it (write_checkpoint)
        finally:
            self._closed = True
            self._release()

    def _release(self) -> None:
        # getattr: an open that failed part way has only some of them
        reader, index, journal = (getattr(self, name, None) for name in ("reader", "_index", "_journal"))
        if reader is not None:
            reader.close()
        if index is not None:
            index.close()
        if journal is not None:
            journal.release()
        if self._lock_fd >= 0:
            self.disk.close_quietly(self._lock_fd, LOCK_FILE)
        self._lock_fd = -1

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        poison = self.poisoned
        if poison is not None:
            raise poison
        if self._closed:
            raise StoreClosed("engine")

    # ------------------------------------------------------------------ the writer's surface
    @property
    def visible(self) -> int:
        """The newest sequence readers may see."""
        return self._journal.visible

    @property
    def durable(self) -> int:
        """The newest sequence known to be on disk (fsynced)."""
        return self._journal.durable

    @property
    def groups_written(self) -> int:
        return self._journal.groups_written

    @property
    def groups_published(self) -> int:
        return self._journal.groups_published

    @property
    def poisoned(self) -> StorePoisoned | None:
        """The failure that stopped this engine for good, or None."""
        journal = getattr(self, "_journal", None)
        return journal.poison if journal is not None else None

    @property
    def revealed(self) -> list[tuple[int, int]]:
        """Committed fences' sequence ranges, in commit order."""
        return self._fences.revealed

    @property
    def _seg(self) -> ActiveSegment | None:
        """The active segment (tests look at its ends)."""
        journal = getattr(self, "_journal", None)
        return journal.seg if journal is not None else None

    def set_index_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs when a rotation has named new index files, before the old
        ones are removed: the writer publishes the new ``view()`` so clients move first."""
        self._journal.index_listener = listener

    def view(self) -> View:
        """What readers may see: the visible frontier and the current index files."""
        return self._journal.view()

    def reveal(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Make fenced events visible: call after their FENCE_COMMIT event is committed
        (the event is the authority; fences.tbl only lets readers find out fast)."""
        self._index.reveal_positions(ranges, self.visible)  # positions first: a reader that sees them revealed finds them
        self._fences.reveal(ranges)
        self.reader.view = self.view()

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
        return self._journal.commit(requests, fenced, settle=settle)

    def settle(self) -> None:
        """fsync (as the sync mode says) and publish every written group."""
        self._check_open()
        self._journal.settle()

    def sync(self) -> int:
        """fsync now; returns the durable frontier."""
        self._check_open()
        return self._journal.sync()

    def tick(self) -> None:
        """Periodic duty for the interval sync mode: fsync when the interval passed."""
        self._journal.tick()

    def checkpoint(self) -> None:
        """Persist the durable floor recovery will hold the log to."""
        self._check_open()
        self._journal.write_checkpoint()

    def pending_sync_target(self) -> tuple[int, str, int]:
        """(fd, path, groups) for an fsync that another thread may run while this one
        writes the next group: on success, ``publish_through(groups, True)``. ``fd`` is
        the caller's own duplicate of the segment's descriptor (valid whatever a rotation
        does meanwhile): close it with ``disk.close_quietly`` after the fsync."""
        return self._journal.pending_sync_target()

    def publish_through(self, groups: int, synced: bool) -> None:
        """Index and publish the first ``groups`` written groups, in order, and fill the
        results of their requests. ``synced``: an fsync covering them returned."""
        self._journal.publish_through(groups, synced)

    def sync_failed(self, exc: OSError, path: str) -> StorePoisoned:
        """An fsync run by another thread failed: poison, exactly as a failed fsync here does."""
        return self._journal.sync_failed(exc, path)

    def receipt_for(self, seq: int) -> Receipt:
        """The receipt of a published event (signed when the engine signs)."""
        return self._journal.receipt_for(seq)

    # ------------------------------------------------------------------ public API
    def append(self, coord: Coordinate, kind: Kind, payload: Any, *, idempotency_key: str | bytes | None = None,
               expected_clock: int | None = None, causation_id: bytes | None = None,
               correlation_id: bytes | None = None, payload_version: int | None = None) -> Receipt:
        """Append one event (``payload_version``: default the kind's registered version)."""
        self._check_open()
        p = prepare(coord, kind, payload, idempotency_key=idempotency_key, expected_clock=expected_clock,
                    causation_id=causation_id, correlation_id=correlation_id,
                    max_payload=self.config.max_payload_bytes,
                    payload_version=payload_version_for(kind) if payload_version is None else payload_version)
        return self._commit_one([p])[0]

    def append_system(self, entity: str, type_id: int, payload: Any) -> Receipt:
        """Append an event of the reserved system category (the store's own lifecycle)."""
        self._check_open()
        p = prepare(Coordinate(entity, "system"), Kind(0, type_id), payload, idempotency_key=None,
                    expected_clock=None, causation_id=None, correlation_id=None,
                    max_payload=self.config.max_payload_bytes, allow_reserved=True)
        return self._commit_one([p])[0]

    def append_effect(self, coord: Coordinate, type_id: int, payload: Any, *, causation_id: bytes | None = None,
                      idempotency_key: str | bytes | None = None) -> Receipt:
        """Append a store-recorded effect (reserved category 0xD): only an allowlisted
        type id (``EFFECT_DENIAL``, ``EFFECT_BYPASS``) with a payload of its shape."""
        item = effect_item(coord, type_id, payload, causation_id=causation_id, idempotency_key=idempotency_key)
        return self.append_store_kinds([item])[0]

    def append_denial(self, coord: Coordinate, denial: Denial, *, proposal_kind: Kind | None = None,
                      causation_id: bytes | None = None) -> Receipt:
        """Persist a gate's denial in the entity's chain, so refusals are auditable."""
        return self.append_effect(coord, EFFECT_DENIAL, denial_payload(denial, proposal_kind), causation_id=causation_id)

    def append_bypass(self, item: BatchItem, reason: str, *, gates: Sequence[str] = ()) -> tuple[Receipt, Receipt]:
        """Append ``item`` past the gates together with its bypass audit record, all or
        nothing (the record is chained right after the event)."""
        event, audit = self.append_store_kinds([item, bypass_audit_item(item, reason, gates)])
        return event, audit

    def append_store_kinds(self, items: Sequence[BatchItem]) -> list[Receipt]:
        """``append_batch`` that also accepts the store's own allowlisted reserved kinds
        (as ``Store.append_store_kinds``)."""
        self._check_open()
        return self._commit_one(prepare_items(items, max_payload=self.config.max_payload_bytes, store_kinds=True))

    def append_batch(self, items: Sequence[BatchItem]) -> list[Receipt]:
        self._check_open()
        return self._commit_one(prepare_items(items, max_payload=self.config.max_payload_bytes))

    def _commit_one(self, prepared: list[Prepared]) -> list[Receipt]:
        """Commit one request on its own; its refusal is raised."""
        res = self.commit([prepared])[0]
        if isinstance(res, BaseException):
            raise res
        return res

    def get(self, event_id: bytes) -> Event:
        self._check_open()
        return self.reader.get(event_id)

    def history(self, entity: str, *, after_clock: int | None = None, limit: int | None = None,
                before_clock: int | None = None, newest_first: bool = False) -> list[Event]:
        self._check_open()
        return self.reader.history(entity, after_clock, limit, before_clock=before_clock, newest_first=newest_first)

    def query_after(self, after: int = 0, *, limit: int = 1000, entity: str | None = None,
                    scope: str | None = None, kind: Kind | None = None, kinds: Iterable[Kind] | None = None,
                    upto: int | None = None, region: Region | None = None) -> Page:
        self._check_open()
        return self.reader.query_after(after, limit, entity, scope, kind, kinds=kinds, upto=upto, region=region)

    def latest(self, entity: str) -> Event | None:
        self._check_open()
        return self.reader.latest(entity)

    def latest_in_scope(self, scope: str) -> Event | None:
        self._check_open()
        return self.reader.latest_in_scope(scope)

    def query_scope(self, scope: str, after_position: int = 0, *, limit: int = 1000,
                    upto_position: int | None = None, region: Region | None = None) -> Page:
        self._check_open()
        return self.reader.query_scope(scope, after_position, limit, upto_position, region)

    def walk_ancestors(self, event_id: bytes, *, limit: int | None = None) -> Iterator[Event]:
        self._check_open()
        return self.reader.walk_ancestors(event_id, limit)

    def verify_receipt(self, receipt: Receipt) -> bool:
        self._check_open()
        return receipt_matches(self.reader, receipt, self.signer.verify if self.signer is not None else None)
