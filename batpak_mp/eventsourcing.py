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
  id>`` in the scope ``<scope>`` (an entity-prefix query of ``<scope>`` finds them all).
  Snapshots (and any other recorder purpose P) live in the scope ``<scope>.P``, tracking
  records in ``<scope>.tracking``, one entity per upstream application.
- ``originator_version`` travels in the payload; versions of one aggregate must rise
  along its chain. A batch is checked as SQL's primary key (originator_id,
  originator_version) would check it against an aggregate's events: a version at or below
  the newest recorded one is ``IntegrityError``, and the append carries the entity's clock
  as ``expected_clock``, so a concurrent writer that got there first makes the store
  refuse the whole batch (all or nothing), which is then looked at again.
- notification ids are the store's ``scope_position`` of an application's events: 1, 2,
  3... in commit order, with no gaps, the same in every process (``_ScopeLog``).
- a topic is the payload's; the event's kind is ``Kind(KIND_CATEGORY, hash of the topic)``,
  so a topic filter reads only the events of those kinds (the payload's topic decides).

Invariants: only the store's own typed errors are turned into eventsourcing's
(``IntegrityError`` for a conflict, ``DataError`` for bad input, ``OperationalError``
when the service cannot be reached); a failed batch writes nothing. Visibility fences are
not used in these scopes (an event revealed late would change positions already handed out).
Must not import the writer, the engine or the supervisor: it is a client, like any
process that calls ``bp.connect``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
import zlib
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
    WaitInterruptedError,
)
from eventsourcing.utils import Environment, EnvType, resolve_topic

from ._client import Store
from ._client import connect as _connect
from ._errors import BatpakError, ConcurrencyConflict, StoreClosed, WriterTimeout, WriterUnavailable
from ._query import Region
from ._values import BatchItem, Coordinate, Event, Kind, Receipt

KIND_CATEGORY = 0xE  # eventsourcing's events and tracking records: one category, 0x0 and 0xD are the store's
TRACKING_TYPE = 0  # type id of a tracking record; topics hash onto 1..4095
_TOPIC_TYPES = 4095
MAX_ATTEMPTS = 100  # re-plans of one insert after the store saw a concurrent writer first (each one a new round)
DEFAULT_POOL_SIZE = 1  # Stores per factory, each shared by any number of threads (their appends share group commits)
SUBSCRIPTION_POLL_S = 0.1  # a stopped subscription (or a set interrupt of a wait) is noticed within this long


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
    """One served store as a factory's recorders use it: ``pool_size`` ``Store``
    connections (connected on first need), each shared by any number of threads — a
    ``Store`` lets several threads have requests in flight at once, so their appends share
    a group commit. More than one only spreads the client-side work (each its own reader
    and request areas); one is enough for most processes."""

    def __init__(self, data_dir: str, *, pool_size: int = DEFAULT_POOL_SIZE, timeout: float = 30.0) -> None:
        if type(pool_size) is not int or pool_size < 1:
            raise DataError(f"pool_size must be an int >= 1, not {pool_size!r}")
        self.data_dir = data_dir
        self.timeout = timeout
        self._stores: list[Store | None] = [None] * pool_size
        self._active = [0] * pool_size  # blocks using each Store now (a close waits for them)
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        with self.store():  # fail now, not at the first insert, when nothing serves data_dir
            pass

    @contextlib.contextmanager
    def store(self) -> Iterator[Store]:
        """A ``Store`` of the pool for the block (the pool's next, connected on first need)."""
        i = next(self._turn) % len(self._stores)
        with self._lock:
            if self._closed:
                raise OperationalError(f"the datastore of {self.data_dir!r} is closed")
            store = self._stores[i]
            if store is None:
                with _translated():
                    store = self._stores[i] = _connect(self.data_dir, timeout=self.timeout)
            self._active[i] += 1
        try:
            with _translated():
                yield store
        finally:
            with self._lock:
                self._active[i] -= 1
                last = self._closed and not self._active[i]
            if last:  # closed while blocks ran (other threads): the last one closes it
                store.close()

    def close(self) -> None:
        """Close the idle connections now; one that blocks on other threads are using is
        closed when the last of them ends (a call in flight finishes, as a database pool
        lets it); later calls are refused."""
        with self._lock:
            self._closed = True
            idle = [s for s, n in zip(self._stores, self._active, strict=True) if s is not None and not n]
        for store in idle:
            store.close()


class _ScopeLog:
    """An application's notification log: the events of its scope by their gap-free
    ``scope_position`` (the store assigns it in commit order; 1, 2, 3...), which every
    process reads alike. Holds no state: each call asks the store's position index
    (``latest_in_scope`` one look-up, ``query_scope`` an O(log n) seek)."""

    def __init__(self, scope: str) -> None:
        self.scope = scope

    def count(self, store: Store) -> int:
        """How many events the scope has (its newest position)."""
        head = store.latest_in_scope(self.scope)
        return 0 if head is None else int(head.scope_position or 0)

    def positions(self, store: Store, receipts: Sequence[Receipt]) -> list[int]:
        """The positions of events just appended in one request, all in this scope: the
        writer numbers a request's events together, so they follow the first one's."""
        if not receipts:
            return []
        first = store.get(receipts[0].event_id).scope_position
        if not first:
            raise PersistenceError(f"event {receipts[0].event_id.hex()} has no position in scope {self.scope!r}")
        return list(range(first, first + len(receipts)))

    def sequence(self, store: Store, position: int) -> int:
        """The global sequence of the event at ``position`` (0 when there is none yet)."""
        page = store.query_scope(self.scope, position - 1, limit=1, upto_position=position)
        return page.events[0].global_sequence if page.events else 0

    def read(self, store: Store, first: int, last: int, topics: Sequence[str], limit: int) -> list[Notification]:
        """Notifications ``first..last``, at most ``limit``, of the given topics (all
        when empty: a topic's kind narrows the read, the payload's topic decides)."""
        wanted = frozenset(topics)
        region = Region(kinds=frozenset(topic_kind(t) for t in wanted)) if wanted else None
        prefix = len(self.scope) + 1
        out: list[Notification] = []
        after = first - 1
        while after < last and len(out) < limit:
            page = store.query_scope(self.scope, after, limit=limit - len(out), upto_position=last, region=region)
            for ev in page.events:
                stored = _stored(ev, prefix)
                if not wanted or stored.topic in wanted:
                    out.append(Notification(id=int(ev.scope_position or 0), originator_id=stored.originator_id,
                                            originator_version=stored.originator_version, topic=stored.topic,
                                            state=stored.state))
            if page.next_after <= after:
                break
            after = page.next_after
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
                return _ScopeLog(self.scope).positions(store, receipts[:len(stored_events)])
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
        log = _ScopeLog(self.scope)
        with self.datastore.store() as store:
            last = log.count(store)
            if stop is not None:
                last = min(last, stop)
            if first > last or limit < 1:
                return []
            return log.read(store, first, last, topics, limit)

    def max_notification_id(self) -> int | None:
        with self.datastore.store() as store:
            return _ScopeLog(self.scope).count(store) or None

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

    def wait(self, application_name: str, notification_id: int | None, timeout: float = 1.0,
             interrupt: threading.Event | None = None) -> None:
        """eventsourcing's ``wait``, woken by the writer when a tracking record of this
        scope is committed instead of polling with sleeps of 0.1 to 0.8 s."""
        deadline = time.monotonic() + timeout
        with _translated():
            store = _connect(self.datastore.data_dir, timeout=self.datastore.timeout)
        try:
            with _translated():
                feed = store.subscribe(None, scope=f"{self.scope}.tracking")  # from now: subscribed before looking
                while not self.has_tracking_id(application_name, notification_id):
                    if interrupt is not None and interrupt.is_set():
                        raise WaitInterruptedError
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"Timed out waiting for notification {notification_id} "
                                           f"from application '{application_name}' to be processed")
                    feed.next(min(SUBSCRIPTION_POLL_S, remaining))
        finally:
            store.close()


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
        self._prefix = len(recorder.scope) + 1
        with _translated():
            self._store = _connect(recorder.datastore.data_dir, timeout=recorder.datastore.timeout)
            after = 0  # from the first notification (eventsourcing's meaning of gt=None)
            if gt:
                log = _ScopeLog(recorder.scope)
                after = log.sequence(self._store, min(gt, log.count(self._store)) or 1)
            self._feed = self._store.subscribe(after, scope=recorder.scope)

    def __next__(self) -> Notification:
        last = self._last_notification_id or 0
        with _translated():
            while not self._has_been_stopped:
                ev = self._feed.next(SUBSCRIPTION_POLL_S)
                if ev is None:
                    continue
                position = int(ev.scope_position or 0)
                if position <= last:
                    continue
                stored = _stored(ev, self._prefix)
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
