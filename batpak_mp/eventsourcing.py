"""A persistence module for the ``eventsourcing`` library: ``PERSISTENCE_MODULE=batpak_mp.eventsourcing``.

Owns: the ``Factory`` (an ``eventsourcing`` ``InfrastructureFactory``) and the aggregate,
application, tracking and process recorders over a served store (``bp.serve``), named by
the environment variable ``BATPAK_MP_DATA_DIR`` (eventsourcing's application-prefixed
variables apply: ``BANKACCOUNTS_BATPAK_MP_DATA_DIR`` wins for the application named
``BankAccounts``). Install with ``pip install 'batpak-mp[eventsourcing]'``.

How eventsourcing's records map onto the store:
- every application has a scope of its own (``BATPAK_MP_SCOPE``, else
  ``<BATPAK_MP_NAMESPACE or "es">/<application name>``), so several applications share
  one store; an aggregate's events are the events of the entity ``<scope>:<originator
  id>`` (so an entity-prefix query of ``<scope>`` finds them all), in the scope ``<scope>``. Snapshots (and any other recorder
  purpose P) live in the scope ``<scope>.P``, tracking records in ``<scope>.tracking``.
- ``originator_version`` travels in the payload; versions of one aggregate must rise
  along its chain. A batch is checked as SQL's primary key (originator_id,
  originator_version) would check it against an aggregate's events: a version at or below
  the newest recorded one is ``IntegrityError``, and the append carries the entity's clock
  as ``expected_clock``, so a concurrent writer that got there first makes the store
  refuse the whole batch (all or nothing), which is then looked at again.
- notification ids are the positions of an application's events in its scope: 1, 2, 3...
  in commit order, with no gaps, the same in every process. ``_ScopePositions`` keeps
  them (one place, to be replaced by the store's own per-scope positions).
- a topic is the payload's; the event's kind is ``Kind(KIND_CATEGORY, hash of the topic)``
  so a kind filter can narrow a topic query later.

Invariants: only the store's own typed errors are turned into eventsourcing's
(``IntegrityError`` for a conflict, ``DataError`` for bad input, ``OperationalError``
when the service cannot be reached); a failed batch writes nothing. Visibility fences are
not used in these scopes (an event revealed late would change positions already handed out).
Must not import the writer, the engine or the supervisor: it is a client, like any
process that calls ``bp.connect``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import zlib
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    DataError,
    InfrastructureFactory,
    IntegrityError,
    Notification,
    OperationalError,
    PersistenceError,
    ProcessRecorder,
    StoredEvent,
    Subscription,
    Tracking,
    TrackingRecorder,
)
from eventsourcing.utils import Environment, EnvType, resolve_topic

from ._client import Store
from ._client import connect as _connect
from ._errors import BatpakError, ConcurrencyConflict, StoreClosed, WriterTimeout, WriterUnavailable
from ._values import BatchItem, Coordinate, Event, Kind

KIND_CATEGORY = 0xE  # eventsourcing's events and tracking records: one category, 0x0 and 0xD are the store's
TRACKING_TYPE = 0  # type id of a tracking record; topics hash onto 1..4095
_TOPIC_TYPES = 4095
SCAN_PAGE = 10_000  # events per read while catching up with a scope's positions (bounded memory per read)
SELECT_PAGE = 500  # events per read while looking for topics in a range of notification ids
MAX_ATTEMPTS = 100  # re-plans of one insert after the store saw a concurrent writer first (each one a new round)
DEFAULT_POOL_SIZE = 8  # Stores per factory: threads of one process append in the same group commit
SUBSCRIPTION_POLL_S = 0.1  # a stopped subscription notices within this long


def topic_kind(topic: str) -> Kind:
    """The kind an event of ``topic`` is stored under (a hash: filters narrow by it, then compare topics)."""
    return Kind(KIND_CATEGORY, zlib.crc32(topic.encode("utf-8")) % _TOPIC_TYPES + 1)


TRACKING_KIND = Kind(KIND_CATEGORY, TRACKING_TYPE)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """The store's typed errors as eventsourcing's (PEP 249 names), the original chained."""
    try:
        yield
    except (WriterUnavailable, WriterTimeout, StoreClosed) as exc:
        raise OperationalError(str(exc)) from exc
    except ConcurrencyConflict as exc:
        raise IntegrityError(str(exc)) from exc
    except BatpakError as exc:
        if isinstance(exc, ValueError):
            raise DataError(str(exc)) from exc
        raise PersistenceError(str(exc)) from exc


class Datastore:
    """One served store as a factory's recorders use it: a small pool of ``Store``
    connections (a ``Store`` serves one caller at a time, so threads of one process take
    one each and their appends share a group commit) and each scope's positions."""

    def __init__(self, data_dir: str, *, pool_size: int = DEFAULT_POOL_SIZE, timeout: float = 30.0) -> None:
        self.data_dir = data_dir
        self.timeout = timeout
        self._free: list[Store] = []
        self._all: list[Store] = []
        self._slots = threading.BoundedSemaphore(pool_size)
        self._lock = threading.Lock()
        self._positions: dict[str, _ScopePositions] = {}
        self._closed = False
        with self.store():  # fail now, not at the first insert, when nothing serves data_dir
            pass

    @contextlib.contextmanager
    def store(self) -> Iterator[Store]:
        """A ``Store`` of the pool for the block (connected on first need)."""
        if self._closed:
            raise OperationalError(f"the datastore of {self.data_dir!r} is closed")
        self._slots.acquire()
        try:
            with self._lock:
                store = self._free.pop() if self._free else None
            if store is None:
                with _translated():
                    store = _connect(self.data_dir, timeout=self.timeout)
                with self._lock:
                    self._all.append(store)
            try:
                with _translated():
                    yield store
            finally:
                with self._lock:
                    self._free.append(store)
        finally:
            self._slots.release()

    def positions(self, scope: str) -> _ScopePositions:
        with self._lock:
            found = self._positions.get(scope)
            if found is None:
                found = self._positions[scope] = _ScopePositions(scope)
            return found

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stores, self._all, self._free = self._all, [], []
        for store in stores:
            store.close()


class _ScopePositions:
    """Gap-free positions (notification ids) of one scope's events, as this process has
    seen them: position N is the Nth event of the scope in commit order. Every process
    counts the same log, so every process gives an event the same position. Kept as the
    global sequences of the scope's events, read once each, on demand.

    TODO(issue 15 item 2): the store's own per-scope positions replace this class (the
    first read of a process then no longer walks the scope, nor memory grows with it)."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self._seqs = array("q")
        self._scanned = 0  # the last global sequence looked at
        self._lock = threading.Lock()

    def _catch_up(self, store: Store, upto: int | None = None) -> None:
        with self._lock:
            target = store.frontier().visible if upto is None else upto
            while self._scanned < target:
                page = store.query_after(self._scanned, limit=SCAN_PAGE, scope=self.scope)
                self._seqs.extend(e.global_sequence for e in page.events)
                if page.next_after <= self._scanned:
                    break  # nothing more is visible yet
                self._scanned = page.next_after

    def count(self, store: Store) -> int:
        """How many events the scope has (its newest position)."""
        self._catch_up(store)
        return len(self._seqs)

    def position(self, store: Store, seq: int) -> int:
        """The position of the scope's event at global sequence ``seq`` (visible)."""
        if seq > self._scanned:
            self._catch_up(store, seq)
        i = bisect_left(self._seqs, seq)
        if i == len(self._seqs) or self._seqs[i] != seq:
            raise PersistenceError(f"sequence {seq} is not an event of scope {self.scope!r}")
        return i + 1

    def sequence(self, position: int) -> int:
        """The global sequence of the event at ``position`` (1 <= position <= count)."""
        return self._seqs[position - 1]

    def read(self, store: Store, first: int, last: int, topics: Sequence[str], limit: int) -> list[Notification]:
        """Notifications ``first..last`` (positions known to ``count``), at most ``limit``,
        of the given topics (all when empty)."""
        out: list[Notification] = []
        wanted = frozenset(topics)
        position = first
        while position <= last and len(out) < limit:
            n = min(last - position + 1, SELECT_PAGE if wanted else limit - len(out))
            page = store.query_after(self.sequence(position) - 1, limit=n, scope=self.scope)
            if not page.events:
                raise PersistenceError(f"positions {position}..{last} of scope {self.scope!r} are no longer readable")
            for ev in page.events:
                stored = _stored(ev, len(self.scope) + 1)
                if not wanted or stored.topic in wanted:
                    out.append(Notification(id=position, originator_id=stored.originator_id,
                                            originator_version=stored.originator_version, topic=stored.topic,
                                            state=stored.state))
                    if len(out) == limit:
                        break
                position += 1
        return out


def _stored(ev: Event, prefix: int, originator_id: UUID | str | None = None) -> StoredEvent:
    """The stored event an event of an aggregate's entity holds (``prefix``: the length of
    ``<scope>:`` in front of the originator id in its entity name)."""
    version, topic, state, is_uuid = ev.payload
    if originator_id is None:
        raw = ev.coordinate.entity[prefix:]
        originator_id = UUID(raw) if is_uuid else raw
    return StoredEvent(originator_id=originator_id, originator_version=version, topic=topic, state=state)


class BatpakRecorder:
    """What every recorder here shares: the datastore and the scope it records in."""

    def __init__(self, datastore: Datastore, scope: str) -> None:
        self.datastore = datastore
        self.scope = scope

    def entity(self, originator_id: UUID | str) -> str:
        return f"{self.scope}:{originator_id}"

    def tracking_entity(self, application_name: str) -> str:
        return f"{self.scope}.tracking:{application_name}"

    def _items(self, stored_events: Sequence[StoredEvent], store: Store) -> list[BatchItem]:
        """The batch for ``stored_events``: versions checked against each other and against
        each aggregate's newest recorded event; the first event of each aggregate carries
        the aggregate's clock as read now (the store refuses the batch if it moved)."""
        items: list[BatchItem] = []
        newest: dict[str, int] = {}
        for s in stored_events:
            entity = self.entity(s.originator_id)
            version = s.originator_version
            if entity in newest:
                if version <= newest[entity]:
                    raise IntegrityError(f"stored events are not unique, or their versions fall: {s}")
                expected = None
            else:
                head = store.latest(entity)
                if head is not None and version <= head.payload[0]:
                    raise IntegrityError(f"stored event already recorded (newest version {head.payload[0]}): {s}")
                expected = 0 if head is None else head.entity_clock
            newest[entity] = version
            payload = [version, s.topic, s.state, 1 if isinstance(s.originator_id, UUID) else 0]
            items.append(BatchItem(Coordinate(entity, self.scope), topic_kind(s.topic), payload, expected_clock=expected))
        return items

    def _tracking_item(self, tracking: Tracking, store: Store) -> BatchItem:
        """The tracking record's event: ``IntegrityError`` unless it is past the newest."""
        entity = self.tracking_entity(tracking.application_name)
        head = store.latest(entity)
        if head is not None and tracking.notification_id <= head.payload:
            raise IntegrityError(f"tracking {tracking.notification_id} of {tracking.application_name!r} is not after "
                                 f"{head.payload}, the newest recorded")
        coord = Coordinate(entity, f"{self.scope}.tracking")
        return BatchItem(coord, TRACKING_KIND, tracking.notification_id,
                         expected_clock=0 if head is None else head.entity_clock)

    def _insert(self, stored_events: Sequence[StoredEvent], tracking: Tracking | None = None,
                positions: bool = False) -> list[int] | None:
        """Append the events (and tracking record) all or nothing; with ``positions``,
        return their notification ids. A concurrent writer seen by the store means the
        batch is planned again from what is recorded then."""
        if not stored_events and tracking is None:
            return None
        with self.datastore.store() as store:
            for _ in range(MAX_ATTEMPTS):
                items = self._items(stored_events, store)
                if tracking is not None:
                    items.append(self._tracking_item(tracking, store))
                try:
                    receipts = store.append_batch(items)
                except ConcurrencyConflict:
                    continue  # another writer got there first: look again (IntegrityError if it took our versions)
                if not positions:
                    return None
                scope = self.datastore.positions(self.scope)
                return [scope.position(store, r.global_sequence) for r in receipts[:len(stored_events)]]
        raise OperationalError(f"gave up after {MAX_ATTEMPTS} concurrent writers got there first")

    def _select(self, originator_id: UUID | str, gt: int | None, lte: int | None, desc: bool,
                limit: int | None) -> list[StoredEvent]:
        """An aggregate's events by version, read as a window of its entity's clocks.
        Versions rise by at least one per event along the chain (``_items`` refuses
        anything else), so the clock of version ``gt`` is at least ``head clock -
        (head version - gt)``: the lower edge is exact from the head alone; the upper one
        assumes contiguous versions and checks the event just past it (else the whole
        chain is read)."""
        entity = self.entity(originator_id)
        with self.datastore.store() as store:
            head = store.latest(entity)
            if head is None or (gt is not None and gt >= head.payload[0]) or limit == 0:
                return []
            top, clock = head.payload[0], head.entity_clock
            after = None if gt is None or clock - (top - gt) < 1 else clock - (top - gt)
            if lte is None or lte >= top:
                events = store.history(entity, after_clock=after, newest_first=desc, limit=limit if desc else None)
            else:
                past = clock - (top - lte) + 1  # the clock just past version lte, if versions are contiguous
                events = store.history(entity, after_clock=after, before_clock=past + 1) if past >= 1 else []
                if not events or events[-1].entity_clock != past or events[-1].payload[0] <= lte:
                    events = store.history(entity, after_clock=after)  # a gap in the versions: read it all
                if desc:
                    events.reverse()
        out: list[StoredEvent] = []
        for ev in events:
            version = ev.payload[0]
            if (gt is not None and version <= gt) or (lte is not None and version > lte):
                continue
            out.append(_stored(ev, 0, originator_id))
            if limit is not None and len(out) >= limit:
                break
        return out


class BatpakAggregateRecorder(BatpakRecorder, AggregateRecorder):
    """Aggregate events (or snapshots) of one scope."""

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        self._insert(stored_events)
        return None

    def select_events(self, originator_id: UUID | str, *, gt: int | None = None, lte: int | None = None,
                      desc: bool = False, limit: int | None = None) -> Sequence[StoredEvent]:
        return self._select(originator_id, gt, lte, desc, limit)


class BatpakApplicationRecorder(BatpakRecorder, ApplicationRecorder):
    """An application's events and its notification log (positions in its scope)."""

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        return self._insert(stored_events, positions=True)

    def select_events(self, originator_id: UUID | str, *, gt: int | None = None, lte: int | None = None,
                      desc: bool = False, limit: int | None = None) -> Sequence[StoredEvent]:
        return self._select(originator_id, gt, lte, desc, limit)

    def select_notifications(self, start: int | None, limit: int, stop: int | None = None,
                             topics: Sequence[str] = (), *, inclusive_of_start: bool = True) -> Sequence[Notification]:
        first = 1 if start is None else (start if inclusive_of_start else start + 1)
        first = max(first, 1)
        positions = self.datastore.positions(self.scope)
        with self.datastore.store() as store:
            last = positions.count(store)
            if stop is not None:
                last = min(last, stop)
            if first > last or limit < 1:
                return []
            return positions.read(store, first, last, topics, limit)

    def max_notification_id(self) -> int | None:
        with self.datastore.store() as store:
            return self.datastore.positions(self.scope).count(store) or None

    def subscribe(self, gt: int | None = None, topics: Sequence[str] = ()) -> Subscription[ApplicationRecorder]:
        return BatpakSubscription(self, gt=gt, topics=topics)


class BatpakTrackingRecorder(BatpakRecorder, TrackingRecorder):
    """Tracking records: one entity per upstream application, its newest record the position."""

    def insert_tracking(self, tracking: Tracking) -> None:
        self._insert((), tracking)

    def max_tracking_id(self, application_name: str) -> int | None:
        with self.datastore.store() as store:
            head = store.latest(self.tracking_entity(application_name))
        return None if head is None else int(head.payload)


class BatpakProcessRecorder(BatpakTrackingRecorder, BatpakApplicationRecorder, ProcessRecorder):
    """An application's events recorded together with the tracking record of the
    upstream event they answer, all or nothing."""

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        tracking: Tracking | None = kwargs.get("tracking")
        ids = self._insert(stored_events, tracking, positions=True)
        return ids if stored_events else None


class BatpakSubscription(Subscription[BatpakApplicationRecorder]):
    """Notifications after ``gt`` (from the first when None), then new ones as they are
    committed: woken by the writer (a futex, no polling of the log), with a connection of
    its own. ``stop`` from another thread ends a waiting ``next`` within
    ``SUBSCRIPTION_POLL_S``."""

    def __init__(self, recorder: BatpakApplicationRecorder, gt: int | None = None, topics: Sequence[str] = ()) -> None:
        super().__init__(recorder, gt=gt, topics=topics)
        self._wanted = frozenset(topics)
        self._buffer: deque[Notification] = deque()
        self._positions = recorder.datastore.positions(recorder.scope)
        with _translated():
            self._store = _connect(recorder.datastore.data_dir, timeout=recorder.datastore.timeout)
            after = 0
            if gt:
                count = self._positions.count(self._store)
                after = self._positions.sequence(min(gt, count)) if count else 0
            self._feed = self._store.subscribe(after, scope=recorder.scope)

    def __next__(self) -> Notification:
        last = self._last_notification_id or 0
        with _translated():
            while not self._has_been_stopped:
                ev = self._feed.next(SUBSCRIPTION_POLL_S)
                if ev is None:
                    continue
                position = self._positions.position(self._store, ev.global_sequence)
                if position <= last:
                    continue
                stored = _stored(ev, len(self._positions.scope) + 1)
                self._last_notification_id = last = position
                if self._wanted and stored.topic not in self._wanted:
                    continue
                return Notification(id=position, originator_id=stored.originator_id,
                                    originator_version=stored.originator_version, topic=stored.topic,
                                    state=stored.state)
        raise StopIteration

    def stop(self) -> None:
        super().stop()
        self._feed.close()

    def __exit__(self, *args: object, **kwargs: Any) -> None:
        try:
            super().__exit__(*args, **kwargs)
        finally:
            self._store.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._store.close()


class Factory(InfrastructureFactory[BatpakTrackingRecorder]):
    """eventsourcing's infrastructure factory for a served batpak-mp store."""

    BATPAK_MP_DATA_DIR = "BATPAK_MP_DATA_DIR"
    BATPAK_MP_SCOPE = "BATPAK_MP_SCOPE"
    BATPAK_MP_NAMESPACE = "BATPAK_MP_NAMESPACE"
    BATPAK_MP_TIMEOUT = "BATPAK_MP_TIMEOUT"
    BATPAK_MP_POOL_SIZE = "BATPAK_MP_POOL_SIZE"

    aggregate_recorder_class = BatpakAggregateRecorder
    application_recorder_class = BatpakApplicationRecorder
    tracking_recorder_class = BatpakTrackingRecorder
    process_recorder_class = BatpakProcessRecorder

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        data_dir = self.env.get(self.BATPAK_MP_DATA_DIR)
        if not data_dir:
            keys = ", ".join(self.env.create_keys(self.BATPAK_MP_DATA_DIR))
            raise OSError(f"batpak-mp data directory not found in environment with keys: {keys}")
        timeout = self._number(self.BATPAK_MP_TIMEOUT, "30", float)
        pool_size = int(self._number(self.BATPAK_MP_POOL_SIZE, str(DEFAULT_POOL_SIZE), int))
        namespace = self.env.get(self.BATPAK_MP_NAMESPACE) or "es"
        self.scope = self.env.get(self.BATPAK_MP_SCOPE) or f"{namespace}/{self.env.name or 'application'}"
        self.datastore = Datastore(os.path.abspath(data_dir), pool_size=pool_size, timeout=timeout)

    def _number(self, key: str, default: str, kind: type[float] | type[int]) -> float:
        raw = (self.env.get(key) or "").strip() or default
        try:
            value = kind(raw)
        except ValueError:
            raise OSError(f"batpak-mp environment value for key {key!r} is not a number: {raw!r}") from None
        if value <= 0:
            raise OSError(f"batpak-mp environment value for key {key!r} must be positive: {raw!r}")
        return value

    def _scope_for(self, purpose: str) -> str:
        return self.scope if purpose == "events" else f"{self.scope}.{purpose}"

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        return self.aggregate_recorder_class(self.datastore, self._scope_for(purpose))

    def application_recorder(self) -> ApplicationRecorder:
        topic = self.env.get(self.APPLICATION_RECORDER_TOPIC)
        cls: type[BatpakApplicationRecorder] = resolve_topic(topic) if topic else self.application_recorder_class
        assert issubclass(cls, BatpakApplicationRecorder)
        return cls(self.datastore, self.scope)

    def tracking_recorder(self, tracking_recorder_class: type[BatpakTrackingRecorder] | None = None
                          ) -> BatpakTrackingRecorder:
        cls = tracking_recorder_class
        if cls is None:
            topic = self.env.get(self.TRACKING_RECORDER_TOPIC)
            cls = resolve_topic(topic) if topic else self.tracking_recorder_class
        assert cls is not None and issubclass(cls, BatpakTrackingRecorder)
        return cls(self.datastore, self.scope)

    def process_recorder(self) -> ProcessRecorder:
        topic = self.env.get(self.PROCESS_RECORDER_TOPIC)
        cls: type[BatpakProcessRecorder] = resolve_topic(topic) if topic else self.process_recorder_class
        assert issubclass(cls, BatpakProcessRecorder)
        return cls(self.datastore, self.scope)

    def close(self) -> None:
        self.datastore.close()


__all__ = [
    "TRACKING_KIND",
    "BatpakAggregateRecorder",
    "BatpakApplicationRecorder",
    "BatpakProcessRecorder",
    "BatpakRecorder",
    "BatpakSubscription",
    "BatpakTrackingRecorder",
    "Datastore",
    "Factory",
    "topic_kind",
]
