"""Replay on top of a ``Store``: durable cursors, reactors, causal look-ups, projections.

Owns:
- ``Cursor``: a named consumer whose position lives in the journal itself, as a chain of
  system events (kind 0x0:0x010, payload ``{"cursor": name, "through": seq}``) on the
  entity ``cursor:<name>`` in scope ``system``. Opening one reads the head of that entity
  (one table lookup, not a scan).
- ``Reactor``: runs a handler for each event and commits the reactions it returns together
  with the cursor's ack of the source event, in one all-or-nothing batch.
- ``caused_by``: the events whose ``causation_id`` names an event (a bounded forward scan).
- Projections: folding matching events into a state (``project``), the per-store cache
  behind ``project_if_changed`` (kept here, weakly keyed by the store, new in a forked
  child), and snapshot files in ``<data_dir>/snapshots/``.

Invariants:
- A cursor's position never moves backwards: an ack is appended only above the position
  known, guarded by ``expected_clock`` on the cursor's entity, so two processes using the
  same cursor cannot interleave their acks out of order (the loser re-reads the head).
- Delivery is at least once: an event is acknowledged only after it was handed out, and
  a new ``Cursor`` resumes right after the last ack in the journal.
- A reactor's reactions and the ack of their source commit together or not at all, and
  their idempotency keys are derived from (reactor name, source event id, index): running
  the handler again for the same event (after a crash, or in a second instance) commits
  nothing new.
- System events (category 0x0: the writer's lifecycle, cursor positions) reach cursors,
  reactors and projections only when the filter asks for them (``include_system``, an
  entity, or a kind of category 0), so a cursor never sees its own acks.
- A projection never starts from a snapshot of another name, version, filter set or
  journal: a snapshot that does not match exactly, or cannot be read, is ignored and the
  state is rebuilt from zero.

Depends on a store only through ``_api.ReplayHost`` (the client's ``Store`` implements it;
the client imports this module, never the reverse). Must not import the client, the
writer, the engine, the reader or the supervisor.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import os
import re
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from ._api import EventFeed, ReplayHost
from ._errors import (
    BatpakError,
    ConcurrencyConflict,
    CursorFilterChanged,
    InvalidArgument,
    ProtocolError,
    ReactorError,
    StorageError,
)
from ._ipc.names import PID_MAX
from ._iterate import Feed
from ._query import Region, region_of
from ._values import (
    CATEGORY_SYSTEM,
    SYSTEM_CURSOR_ACK,
    BatchItem,
    Coordinate,
    Event,
    Kind,
    Receipt,
    check_kind,
    check_name,
)

CURSOR_SCOPE = "system"
CURSOR_ACK = Kind(CATEGORY_SYSTEM, SYSTEM_CURSOR_ACK)
ACK_RACES = 64  # tries against other instances of the same cursor before giving up
ACK_AT_MAX = 100_000  # delivered fenced events remembered for their acks; past it, the acknowledged ones are dropped
PAGE = 1000  # events per query_after page while folding or scanning
MAX_REACTIONS = 9_999  # a batch holds 10,000 events: the reactions plus the ack
DEFAULT_MAX_FAILURES = 5  # consecutive failures of one event before run() raises ReactorError
DEFAULT_BACKOFF_S = 0.1  # first retry delay after a handler failure; doubles per failure ...
DEFAULT_MAX_BACKOFF_S = 5.0  # ... up to this
DEFAULT_ACK_EVERY = 100  # events without reactions acknowledged together (one ack event)
ERRORS_KEPT = 100  # failures a reactor remembers in ``errors``
STOP_CHECK_S = 1.0  # a running reactor notices stop() at least this often while idle
SNAPSHOT_DIR = "snapshots"
SNAPSHOT_MAGIC = b"BPSNAP01"
SNAPSHOT_FORMAT = 1
DEFAULT_SNAPSHOT_EVERY = 1000  # sequences passed before a snapshot is rewritten
CACHE_MAX = 256  # cached projection states per store; the oldest is dropped beyond
_KEY_PERSON = b"batpak-mp/rx1"  # blake2b personalisation of derived idempotency keys


def derived_key(*parts: Any) -> bytes:
    """A 16-byte idempotency key derived from ``parts`` (stable across processes)."""
    return hashlib.blake2b(msgpack.packb(list(parts), use_bin_type=True), digest_size=16,
                           person=_KEY_PERSON).digest()


# -- filters ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a cursor, reactor or projection looks at. System events are skipped
    unless ``include_system`` is set or the filter names them (an entity, or a kind of
    category 0)."""

    entity: str | None = None
    scope: str | None = None
    kind: Kind | None = None
    include_system: bool = False
    region: Region | None = None  # a whole bp.Region (entity prefix, kinds, ...), merged with the fields above

    def __post_init__(self) -> None:
        if self.entity is not None:
            check_name("entity", self.entity)
        if self.scope is not None:
            check_name("scope", self.scope)
        if self.kind is not None:
            packed = check_kind(self.kind, allow_reserved=True)
            object.__setattr__(self, "kind", Kind.unpack(packed))
        if type(self.include_system) is not bool:
            raise InvalidArgument("include_system", self.include_system, "must be a bool")
        if self.region is not None:
            object.__setattr__(self, "region", region_of(self.region, entity=self.entity, scope=self.scope,
                                                         kind=self.kind))

    def as_region(self) -> Region:
        """The store-side filter, as the one filter object of every read."""
        return self.region if self.region is not None else Region(entity=self.entity, scope=self.scope, kind=self.kind)

    @property
    def system(self) -> bool:
        """Whether system events pass."""
        return self.include_system or self.entity is not None or (
            self.kind is not None and self.kind.category == CATEGORY_SYSTEM) or (
            self.region is not None and self.region.names_system())

    def admits(self, ev: Event) -> bool:
        """The part of the filter the store does not apply: skipping system events."""
        return self.system or ev.kind[0] != CATEGORY_SYSTEM

    def matches(self, ev: Event) -> bool:
        """The whole filter, for events read another way (an entity's history)."""
        if self.region is not None:
            return self.region.matches(ev) and self.admits(ev)
        return ((self.entity is None or ev.coordinate.entity == self.entity)
                and (self.scope is None or ev.coordinate.scope == self.scope)
                and (self.kind is None or ev.kind == self.kind)
                and self.admits(ev))

    def key(self) -> tuple[Any, ...]:
        base = (self.entity, self.scope, None if self.kind is None else self.kind.packed(), self.system)
        return base if self.region is None else (*base, self.region.identity())

    def identity(self) -> str:
        """The stable text a durable cursor records with its acks (``Region.identity``, and
        ``+system`` when system events pass without being named)."""
        text = self.as_region().identity()
        return text + ";+system" if self.include_system and self.entity is None else text


# -- cursors ---------------------------------------------------------------------------------


class Cursor(Feed):
    """A named, durable consumer: iterating yields the matching events after its
    acknowledged position, blocking until new ones are visible (``timeout``: end after
    that many idle seconds). Delivery is at least once: events handed out but not
    acknowledged are handed out again to the next ``Cursor`` of the same name (after a
    crash or a restart). ``ack(event)`` acknowledges that event and every earlier one.

    Each ack is one small durable event in the journal (a round trip and, in the default
    sync mode, a share of an fsync): acknowledge every N events with ``ack_through``
    when throughput matters. One thread drives a ``Cursor`` object; one process should
    drive a given cursor name at a time — a second one is safe (acks never move
    backwards) but both see the unacknowledged events."""

    def __init__(self, store: ReplayHost, name: str, flt: EventFilter, *, start_after: int | None = 0,
                 timeout: float | None = None, reset: bool = False) -> None:
        if type(reset) is not bool:
            raise InvalidArgument("reset", reset, "must be a bool")
        if not isinstance(name, str) or not name:
            raise InvalidArgument("name", name, "must be a non-empty str")
        if start_after is not None and (type(start_after) is not int or start_after < 0):
            raise InvalidArgument("start_after", start_after, "must be an int >= 0, or None for 'from now'")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
            raise InvalidArgument("timeout", timeout, "must be a number of seconds >= 0, or None")
        self.name = name
        self.filter = flt
        self.identity = flt.identity()
        self._ack_at: dict[int, int] = {}  # sequence -> the position its ack records (delivered at another)
        self._store = store
        self._coord = Coordinate(f"cursor:{name}", CURSOR_SCOPE)
        self._timeout = timeout
        self._clock = 0  # the cursor entity's clock as last seen (guards the next ack)
        self.acked = 0
        self.delivered = 0  # the newest sequence handed out
        found = self._load()
        if found is not None:
            self.acked, self._clock = found
            stored = self._stored_identity
            if stored is not None and stored != self.identity:
                if not reset:
                    raise CursorFilterChanged(name, stored, self.identity)
                found = None  # the documented reset: the cursor starts over under its new filter
                self.acked = 0
        if found is None:
            visible = store.frontier().visible
            begin = visible if start_after is None else start_after
            if begin > visible:
                raise InvalidArgument("start_after", start_after, f"is beyond the visible frontier {visible}")
            if begin or reset:  # a restart starts there too; a reset records the new filter at once
                self._commit([], begin, derived_key("cursor-start", name, begin, self.identity, self._clock))
        self.delivered = self.acked
        self._sub: EventFeed = store.subscribe(self.acked, region=flt.as_region())

    @property
    def position(self) -> int:
        """The acknowledged position: every matching event up to it was handled."""
        return self.acked

    # -- the position in the journal -------------------------------------------------------
    def _load(self) -> tuple[int, int] | None:
        """(acknowledged position, entity clock) from the journal, or None for a new cursor
        (``_stored_identity``: the filter the newest ack recorded, None before issue 14)."""
        self._stored_identity: str | None = None
        head = self._store.entity_head(self._coord.entity)
        if head is None:
            return None
        ack: Event | None = head
        if head.kind != CURSOR_ACK:  # someone appended an ordinary event to this entity
            ack = next((e for e in reversed(self._store.history(self._coord.entity)) if e.kind == CURSOR_ACK), None)
        if ack is not None and isinstance(ack.payload, dict) and isinstance(ack.payload.get("filter"), str):
            self._stored_identity = ack.payload["filter"]
        return (self._through(ack) if ack is not None else 0), head.entity_clock

    def _through(self, ack: Event) -> int:
        doc = ack.payload
        through = doc.get("through") if isinstance(doc, dict) else None
        if type(through) is not int or through < 0 or doc.get("cursor") != self.name:
            raise ProtocolError(f"cursor {self.name!r}: malformed position record at sequence {ack.global_sequence}")
        return through

    def _commit(self, items: list[BatchItem], through: int, key: bytes) -> list[Receipt] | None:
        """Append ``items`` and the ack through ``through`` in one batch. Returns the
        receipts of ``items``, or None when another instance of this cursor had already
        acknowledged ``through`` (then nothing of this batch was written)."""
        conflict: ConcurrencyConflict | None = None
        for _ in range(ACK_RACES):
            ack = BatchItem(self._coord, CURSOR_ACK, {"cursor": self.name, "through": through, "filter": self.identity},
                            idempotency_key=key, expected_clock=self._clock)
            try:
                receipts = self._store.append_store_kinds([*items, ack])
            except ConcurrencyConflict as exc:
                if exc.entity != self._coord.entity:
                    raise
                conflict = exc
                found = self._load()
                acked, self._clock = found if found is not None else (0, 0)
                if acked >= through:
                    self._moved_to(acked)
                    return None
                continue
            self._clock = max(self._clock, receipts[-1].entity_clock)  # a duplicate returns the original
            self._moved_to(through)
            return receipts[:-1]
        assert conflict is not None
        raise conflict

    def _moved_to(self, acked: int) -> None:
        if acked > self.acked:
            self.acked = acked
        if self.acked > self.delivered:
            self._restart_at(self.acked)

    def _restart_at(self, after: int) -> None:
        old = getattr(self, "_sub", None)
        if old is not None:
            old.close()
            flt = self.filter
            self._sub = self._store.subscribe(after, region=flt.as_region())
        self.delivered = after

    # -- delivery --------------------------------------------------------------------------
    def next(self, timeout: float | None = None) -> Event | None:
        """The next matching event after the last one handed out; None after ``timeout``
        idle seconds (0: do not wait) or when closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ev = self._sub.next(remaining)
            if ev is None:
                return None
            # where it was delivered: a fenced event at its FENCE_COMMIT (an ack records that
            # position, or the one before when more of the same commit follow)
            pos: int = getattr(self._sub, "stream_position", ev.global_sequence)
            last: bool = getattr(self._sub, "stream_last", True)
            self.delivered = pos
            if self.filter.admits(ev):
                at = pos if last else pos - 1
                if at != ev.global_sequence:
                    if len(self._ack_at) > ACK_AT_MAX:
                        self._ack_at = {k: v for k, v in self._ack_at.items() if v > self.acked}
                    self._ack_at[ev.global_sequence] = at
                return ev

    def ack_position(self, event: Event) -> int:
        """The stream position an ack of ``event`` records: its sequence, or for an event
        revealed by a fence, its FENCE_COMMIT's (the one before, while more of that
        commit are still to come)."""
        return self._ack_at.get(event.global_sequence, event.global_sequence)

    def ack(self, event: Event) -> None:
        """Acknowledge ``event`` and every event before it (durable on return)."""
        if not isinstance(event, Event):
            raise InvalidArgument("event", event, "must be a bp.Event")
        self.ack_through(self.ack_position(event))

    def ack_through(self, sequence: int) -> None:
        """Acknowledge every event up to ``sequence``. Never moves backwards: a sequence at
        or below the position is a no-op. Durable on return."""
        if type(sequence) is not int or sequence < 0:
            raise InvalidArgument("sequence", sequence, "must be an int >= 0")
        if sequence <= self.acked:
            return
        visible = self._store.frontier().visible
        if sequence > visible:
            raise InvalidArgument("sequence", sequence, f"is beyond the visible frontier {visible}")
        self._commit([], sequence, derived_key("cursor-ack", self.name, sequence))

    def rewind(self) -> None:
        """Hand out again the events after the acknowledged position."""
        self._restart_at(self.acked)

    def close(self) -> None:
        self._sub.close()

    def __repr__(self) -> str:
        return f"Cursor({self.name!r}, acked={self.acked}, delivered={self.delivered})"


# -- reactors --------------------------------------------------------------------------------

Reaction = BatchItem | tuple[Coordinate, Kind, Any]
Handler = Callable[[Event], Iterable[Reaction] | BatchItem | None]


@dataclass(frozen=True, slots=True)
class ReactorFailure:
    """One failure of a reactor's handler (or of appending what it returned)."""

    sequence: int
    event_id: bytes
    error: BaseException
    attempt: int  # consecutive failures of this event so far (1: the first)


class Reactor:
    """Runs ``handler(event)`` for each matching event and appends what it returns.

    The handler returns reactions (``bp.BatchItem`` or ``(coord, kind, payload)``
    tuples, or None). They are appended with ``causation_id`` set to the source event,
    ``correlation_id`` inherited (the source's correlation id, else its event id, unless
    the reaction sets one) and idempotency keys derived from (reactor name, source event
    id, index) — any key a reaction carries is replaced — in one batch together with the
    ack of the source event. A crash before that batch commits re-runs the handler; a
    re-run after it commits (or a second instance) writes nothing new. Handlers should be
    deterministic; side effects outside the store happen at least once.

    Events for which the handler returns nothing are acknowledged together (one ack
    every ``ack_every`` events, and whenever the reactor waits or returns).

    A handler that raises (or returns something that cannot be appended): the event is
    not acknowledged, the failure is recorded in ``errors`` and passed to ``on_error``,
    and the same event is retried after a back-off (``backoff`` seconds, doubling up to
    ``max_backoff``); after ``max_failures`` consecutive failures ``ReactorError`` is
    raised (calling ``run`` again resumes with the same event). Store failures
    (``WriterUnavailable``, ``WriterTimeout``) propagate; the event stays pending.

    A reactor is driven by one thread; ``stop()`` may be called from any thread (or
    from the handler) and takes effect within ``STOP_CHECK_S``."""

    def __init__(self, store: ReplayHost, name: str, handler: Handler, flt: EventFilter, *, start_after: int | None = 0,
                 max_failures: int = DEFAULT_MAX_FAILURES, backoff: float = DEFAULT_BACKOFF_S,
                 max_backoff: float = DEFAULT_MAX_BACKOFF_S, ack_every: int = DEFAULT_ACK_EVERY,
                 on_error: Callable[[Event, BaseException], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not callable(handler):
            raise InvalidArgument("handler", handler, "must be callable")
        if type(max_failures) is not int or max_failures < 1:
            raise InvalidArgument("max_failures", max_failures, "must be an int >= 1")
        if not isinstance(backoff, (int, float)) or backoff < 0:
            raise InvalidArgument("backoff", backoff, "must be a number of seconds >= 0")
        if not isinstance(max_backoff, (int, float)) or max_backoff < backoff:
            raise InvalidArgument("max_backoff", max_backoff, "must be a number of seconds >= backoff")
        if type(ack_every) is not int or ack_every < 1:
            raise InvalidArgument("ack_every", ack_every, "must be an int >= 1")
        if on_error is not None and not callable(on_error):
            raise InvalidArgument("on_error", on_error, "must be callable or None")
        if not isinstance(name, str) or not name:
            raise InvalidArgument("name", name, "must be a non-empty str")
        self.name = name
        self.handler = handler
        self.max_failures = max_failures
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.ack_every = ack_every
        self.on_error = on_error
        self.errors: deque[ReactorFailure] = deque(maxlen=ERRORS_KEPT)
        self.handled = 0  # events handled by this object (acknowledged, or about to be)
        self.cursor = Cursor(store, f"reactor:{name}", flt, start_after=start_after)
        self._clock = clock
        self._pending: Event | None = None  # the event being handled or waiting for a retry
        self._failures = 0  # consecutive failures of the pending event
        self._retry_at = 0.0
        self._unacked = 0  # newest handled sequence whose ack is deferred
        self._unacked_count = 0
        self._stopped = False
        self._wake = threading.Event()

    # -- driving ---------------------------------------------------------------------------
    def run(self, timeout: float | None = None, max_events: int | None = None) -> int:
        """Handle events as they come until ``timeout`` seconds have passed (None: until
        ``stop()``), or ``max_events`` events were handled. Returns the number handled."""
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
            raise InvalidArgument("timeout", timeout, "must be a number of seconds >= 0, or None")
        if max_events is not None and (type(max_events) is not int or max_events < 0):
            raise InvalidArgument("max_events", max_events, "must be an int >= 0, or None")
        self._stopped = False
        self._wake.clear()
        deadline = None if timeout is None else self._clock() + timeout
        handled = 0
        while not self._stopped and (max_events is None or handled < max_events):
            ev = self._pending
            if ev is not None:
                if not self._wait_retry(deadline):
                    break
            else:
                ev = self.cursor.next(0)
                if ev is None:
                    self._flush()  # about to wait: acknowledge what was handled
                    left = None if deadline is None else deadline - self._clock()
                    if left is not None and left <= 0:
                        break
                    ev = self.cursor.next(STOP_CHECK_S if left is None else min(left, STOP_CHECK_S))
                    if ev is None:
                        continue
            if self._process(ev):
                handled += 1
        self._flush()
        return handled

    def run_once(self) -> int:
        """Handle the events visible now, without waiting for new ones; returns the number
        handled. Stops at a failing event; called again, it first sleeps out the
        back-off of that event (so a loop around it does not spin)."""
        handled = 0
        self._stopped = False
        while not self._stopped:
            ev = self._pending
            if ev is not None:
                if not self._wait_retry(None):
                    break
            else:
                ev = self.cursor.next(0)
                if ev is None:
                    break
            if not self._process(ev):
                break
            handled += 1
        self._flush()
        return handled

    def step(self, timeout: float = 0.0) -> bool:
        """Handle at most one event, waiting up to ``timeout`` seconds for it (and for the
        back-off of a failed one). True if an event was handled."""
        deadline = self._clock() + timeout
        self._stopped = False
        ev = self._pending
        if ev is not None:
            if not self._wait_retry(deadline):
                return False
        else:
            ev = self.cursor.next(timeout)
            if ev is None:
                self._flush()
                return False
        done = self._process(ev)
        self._flush()
        return done

    def stop(self) -> None:
        """Make ``run`` return soon (from any thread, or from the handler)."""
        self._stopped = True
        self._wake.set()

    def close(self) -> None:
        self.stop()
        self.cursor.close()

    def __enter__(self) -> Reactor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one event -------------------------------------------------------------------------
    def _process(self, ev: Event) -> bool:
        """Handle one event; False if it failed (it stays pending for a retry)."""
        self._pending = ev
        try:
            items = self._reactions(ev, self.handler(ev))
        except Exception as exc:
            self._failed(ev, exc)
            return False
        try:
            if items:
                # the reactions and the ack of their source, together; the ack covers every
                # event handled before it too
                self.cursor._commit(items, self.cursor.ack_position(ev),
                                    derived_key("reactor-ack", self.name, ev.event_id))
                self._unacked = self._unacked_count = 0
            else:
                self._unacked = max(self._unacked, self.cursor.ack_position(ev))
                self._unacked_count += 1
                if self._unacked_count >= self.ack_every:
                    self._flush()
        except BatpakError as exc:
            if not isinstance(exc, (ValueError, ConcurrencyConflict)):
                raise  # the store is unavailable: not the handler's fault; the event stays pending
            self._failed(ev, exc)  # what the handler returned cannot be appended
            return False
        self._pending = None
        self._failures = 0
        self.handled += 1
        return True

    def _reactions(self, ev: Event, out: Any) -> list[BatchItem]:
        if out is None:
            return []
        if isinstance(out, BatchItem) or (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], Coordinate)):
            out = [out]
        items: list[BatchItem] = []
        for i, r in enumerate(out):
            if isinstance(r, BatchItem):
                item = r
            elif isinstance(r, tuple) and len(r) == 3:
                item = BatchItem(r[0], r[1], r[2])
            else:
                raise InvalidArgument(f"reaction[{i}]", r, "must be a bp.BatchItem or a (coord, kind, payload) tuple")
            check_kind(item.kind)  # reserved kinds are the store's own
            items.append(dataclasses.replace(
                item, idempotency_key=derived_key("reaction", self.name, ev.event_id, i),
                causation_id=ev.event_id,
                correlation_id=item.correlation_id or ev.correlation_id or ev.event_id))
            if len(items) > MAX_REACTIONS:
                raise InvalidArgument("reactions", len(items), f"at most {MAX_REACTIONS} per event")
        return items

    def _failed(self, ev: Event, exc: Exception) -> None:
        self._failures += 1
        self.errors.append(ReactorFailure(ev.global_sequence, ev.event_id, exc, self._failures))
        delay = min(self.backoff * 2 ** (self._failures - 1), self.max_backoff)
        self._retry_at = self._clock() + delay
        if self.on_error is not None:
            self.on_error(ev, exc)
        if self._failures >= self.max_failures:
            failures, self._failures = self._failures, 0
            self._flush()
            raise ReactorError(self.name, ev.global_sequence, failures, exc) from exc

    def _wait_retry(self, deadline: float | None) -> bool:
        """Sleep out the back-off of the pending event; False if the deadline (or a stop)
        came first."""
        wait = self._retry_at - self._clock()
        if wait > 0:
            if deadline is not None and deadline - self._clock() < wait:
                self._flush()
                self._wake.wait(max(deadline - self._clock(), 0.0))
                return False
            self._flush()
            self._wake.wait(wait)
        return not self._stopped

    def _flush(self) -> None:
        """Acknowledge the handled events whose ack was deferred."""
        if self._unacked > self.cursor.acked:
            self.cursor._commit([], self._unacked, derived_key("cursor-ack", self.cursor.name, self._unacked))
        self._unacked = self._unacked_count = 0

    def __repr__(self) -> str:
        return f"Reactor({self.name!r}, acked={self.cursor.acked}, handled={self.handled}, failures={self._failures})"


def caused_by(store: ReplayHost, event_id: bytes, *, limit: int = 100, within: int = 100_000) -> list[Event]:
    """The events whose ``causation_id`` is ``event_id``, in commit order.

    Effects always come after their cause, so this scans forward from the cause, reading
    at most ``within`` events (a read of the mapped log, about a microsecond or two each:
    the default 100,000 costs in the order of 0.1–0.3 s when the log is that long), and
    stops at ``limit`` matches. Effects more than ``within`` events after their cause are
    not found; no index is kept for this."""
    if type(limit) is not int or limit < 1:
        raise InvalidArgument("limit", limit, "must be an int >= 1")
    if type(within) is not int or within < 1:
        raise InvalidArgument("within", within, "must be an int >= 1")
    cause = store.get(event_id)
    found: list[Event] = []
    after = cause.global_sequence
    end = after + within
    while after < end and len(found) < limit:
        page = store.query_after(after, limit=min(PAGE, end - after))
        for ev in page.events:
            if ev.causation_id == cause.event_id:
                found.append(ev)
                if len(found) >= limit:
                    break
        if not page.events:
            break
        after = page.events[-1].global_sequence
    return found


# -- projections -----------------------------------------------------------------------------


class Projection(Protocol):
    """What ``store.project`` folds with. ``initial`` is the empty state (a value, deep-
    copied for each fold, or a zero-argument callable); ``apply(state, event)`` returns the
    next state; ``name`` and ``version`` identify it (caches and snapshots are keyed by
    them: change ``version`` whenever ``apply`` or the state's shape changes)."""

    name: str
    version: int
    initial: Any

    def apply(self, state: Any, event: Event) -> Any: ...


@dataclass(slots=True)
class _Fold:
    state: Any
    position: int  # every matching event at or below this sequence is in ``state``
    clock: int  # folds of one entity: the entity clock of the last event folded in
    visible: int  # the visible frontier this fold is up to date with


@dataclass(slots=True)
class _CacheEntry:
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    fold: _Fold | None = None
    snapshot_at: int = -1  # the position of the newest snapshot known (-1: none)


# project_if_changed's caches: one per store, weakly keyed (a store's cache goes with it).
_caches: weakref.WeakKeyDictionary[ReplayHost, dict[Any, _CacheEntry]] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def _cache_entry(store: ReplayHost, key: Any) -> _CacheEntry:
    """The cache entry of ``key`` for ``store`` (made on first use; beyond ``CACHE_MAX``
    entries the oldest is dropped)."""
    with _caches_lock:
        cache = _caches.get(store)
        if cache is None:
            cache = _caches[store] = {}
        entry = cache.get(key)
        if entry is None:
            entry = cache[key] = _CacheEntry()
            while len(cache) > CACHE_MAX:
                del cache[next(iter(cache))]
        return entry


def _forget_caches_after_fork() -> None:
    """A forked child starts without caches: a lock another thread of the parent held at
    the fork would never be released in the child."""
    global _caches, _caches_lock
    _caches = weakref.WeakKeyDictionary()
    _caches_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_caches_after_fork)


def _check_projection(projection: Any) -> tuple[str, int]:
    name = getattr(projection, "name", None)
    version = getattr(projection, "version", None)
    if not isinstance(name, str) or not name:
        raise InvalidArgument("projection.name", name, "must be a non-empty str")
    if type(version) is not int or version < 0:
        raise InvalidArgument("projection.version", version, "must be an int >= 0")
    if not callable(getattr(projection, "apply", None)) or not hasattr(projection, "initial"):
        raise InvalidArgument("projection", projection, "needs `initial` and `apply(state, event)`")
    return name, version


def _initial(projection: Projection) -> Any:
    init = projection.initial
    return init() if callable(init) else copy.deepcopy(init)


def _fold(store: ReplayHost, projection: Projection, flt: EventFilter, start: _Fold) -> _Fold:
    """Bring ``start`` up to the visible frontier."""
    apply = projection.apply
    state = start.state
    if flt.entity is not None:
        visible = store.frontier().visible
        events = store.history(flt.entity, after_clock=start.clock)
        for ev in events:
            if flt.matches(ev):
                state = apply(state, ev)
        if not events:
            return _Fold(state, start.position, start.clock, visible)
        last = events[-1]
        return _Fold(state, last.global_sequence, last.entity_clock, max(visible, last.global_sequence))

    after = start.position
    admits = flt.admits
    while True:
        # stream order: a fenced event counts where its FENCE_COMMIT stands, so a cached
        # fold that had passed it still takes it in when the fence commits
        events, end = store.stream_page(after, PAGE, scope=flt.scope, kind=flt.kind)
        for ev in events:
            if admits(ev):
                state = apply(state, ev)
        if end <= after:  # nothing more up to the visible frontier
            return _Fold(state, after, 0, after)
        after = end


def project(store: ReplayHost, projection: Projection, flt: EventFilter, *, snapshot: bool = False,
            snapshot_every: int = DEFAULT_SNAPSHOT_EVERY) -> Any:
    """Fold every matching event into ``projection``'s state (from a snapshot, if asked)."""
    _check_projection(projection)
    _check_snapshot_args(snapshot, snapshot_every)
    start = _load_snapshot(store, projection, flt) if snapshot else None
    snap_at = start.position if start is not None else -1
    if start is None:
        start = _Fold(_initial(projection), 0, 0, 0)
    result = _fold(store, projection, flt, start)
    if snapshot and result.position - snap_at >= snapshot_every:
        _save_snapshot(store, projection, flt, result)
    return result.state


def project_if_changed(store: ReplayHost, projection: Projection, flt: EventFilter, *, snapshot: bool = False,
                       snapshot_every: int = DEFAULT_SNAPSHOT_EVERY) -> Any:
    """Like ``project``, from this store's cache: the cached state itself when nothing
    was appended since (or nothing matching, for an entity), else the cached state with
    only the new events folded in. The returned state is the cached object: treat it as
    read-only (``apply`` may build on it in place)."""
    name, version = _check_projection(projection)
    _check_snapshot_args(snapshot, snapshot_every)
    key = (type(projection).__module__, type(projection).__qualname__, name, version, flt.key())
    entry = _cache_entry(store, key)
    with entry.lock:
        visible = store.frontier().visible
        start = entry.fold
        if start is not None:
            if start.visible == visible:
                return start.state
            if flt.entity is not None:
                head = store.entity_head(flt.entity)
                if (head.entity_clock if head is not None else 0) == start.clock:
                    start.visible = visible  # nothing of this entity since
                    return start.state
        else:
            start = _load_snapshot(store, projection, flt) if snapshot else None
            if start is not None:
                entry.snapshot_at = start.position
            else:
                start = _Fold(_initial(projection), 0, 0, 0)
        entry.fold = None  # a fold that raises must not leave a half-applied state cached
        result = _fold(store, projection, flt, start)
        entry.fold = result
        if snapshot and result.position - entry.snapshot_at >= snapshot_every:
            _save_snapshot(store, projection, flt, result)
            entry.snapshot_at = result.position
        return result.state


# -- snapshots -------------------------------------------------------------------------------
#
# File: SNAPSHOT_MAGIC (8 bytes), blake2b-256 of the body (32 bytes), body = msgpack map
# {format, name, version, filters, position, clock, anchor_id, anchor_hash, state}. The
# anchor is the event at ``position``: a snapshot is used only if that event is still the
# same one (same id and hash) in this journal, so a snapshot from another store, or from
# a journal restored to an older backup, is never applied.


def _check_snapshot_args(snapshot: object, every: object) -> None:
    if type(snapshot) is not bool:
        raise InvalidArgument("snapshot", snapshot, "must be a bool")
    if type(every) is not int or every < 1:
        raise InvalidArgument("snapshot_every", every, "must be an int >= 1")


def snapshot_path(data_dir: str, projection: Projection, flt: EventFilter) -> str:
    """Where the snapshot of ``projection`` with filter ``flt`` lives."""
    name, _ = _check_projection(projection)
    digest = hashlib.blake2b(msgpack.packb([name, *flt.key()], use_bin_type=True), digest_size=8).hexdigest()
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64]
    return os.path.join(data_dir, SNAPSHOT_DIR, f"{safe}-{digest}.snap")


def _anchor(store: ReplayHost, position: int) -> Event | None:
    if position <= 0:
        return None
    page = store.query_after(position - 1, limit=1)
    ev = page.events[0] if page.events else None
    return ev if ev is not None and ev.global_sequence == position else None


def _load_snapshot(store: ReplayHost, projection: Projection, flt: EventFilter) -> _Fold | None:
    """The snapshot's fold, or None if there is none or it does not match exactly."""
    name, version = _check_projection(projection)
    path = snapshot_path(store.data_dir, projection, flt)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None  # missing or unreadable: rebuild from zero
    if len(data) < 40 or data[:8] != SNAPSHOT_MAGIC:
        return None
    body = data[40:]
    if hashlib.blake2b(body, digest_size=32).digest() != data[8:40]:
        return None
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        return None
    if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT:
        return None
    if doc.get("name") != name or doc.get("version") != version or doc.get("filters") != list(flt.key()):
        return None
    position, clock = doc.get("position"), doc.get("clock")
    if type(position) is not int or type(clock) is not int or position < 0 or clock < 0 or "state" not in doc:
        return None
    visible = store.frontier().visible
    if position > visible:
        return None  # the journal is behind the snapshot: not this journal's state
    if position:
        anchor = _anchor(store, position)
        if anchor is None or anchor.event_id != doc.get("anchor_id") or anchor.event_hash != doc.get("anchor_hash"):
            return None
    return _Fold(doc["state"], position, clock, 0)


def _save_snapshot(store: ReplayHost, projection: Projection, flt: EventFilter, fold: _Fold) -> None:
    """Write the snapshot atomically: a temporary file (0600), fsync, rename, fsync of
    the directory."""
    name, version = _check_projection(projection)
    anchor = _anchor(store, fold.position)
    if fold.position and anchor is None:
        return  # cannot happen for a visible position; never write an unanchored snapshot
    doc = {
        "format": SNAPSHOT_FORMAT, "name": name, "version": version, "filters": list(flt.key()),
        "position": fold.position, "clock": fold.clock,
        "anchor_id": anchor.event_id if anchor is not None else b"",
        "anchor_hash": anchor.event_hash if anchor is not None else b"",
        "state": fold.state,
    }
    try:
        body = msgpack.packb(doc, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument("projection state", type(fold.state).__name__,
                              f"must be msgpack-encodable to be snapshotted ({exc})") from None
    data = SNAPSHOT_MAGIC + hashlib.blake2b(body, digest_size=32).digest() + body
    path = snapshot_path(store.data_dir, projection, flt)
    folder = os.path.dirname(path)
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        _sweep_temporaries(folder, os.path.basename(path))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StorageError("write snapshot", path, exc) from None


def _sweep_temporaries(folder: str, base: str) -> None:
    """Remove temporary files of this snapshot left by processes that died mid-write."""
    prefix = base + ".tmp-"
    for entry in os.listdir(folder):
        if not entry.startswith(prefix):
            continue
        pid_text = entry[len(prefix):].split("-", 1)[0]
        # strict: ASCII digits of a real pid only (str.isdigit() takes '²' and int() of it
        # fails; a huge number makes os.kill raise OverflowError): anything else is left alone
        if not (pid_text.isascii() and pid_text.isdigit() and len(pid_text) <= 7 and 0 < int(pid_text) <= PID_MAX):
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # alive (or another user's): leave it
        except ProcessLookupError:
            pass
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                continue
        try:
            os.unlink(os.path.join(folder, entry))
        except OSError:
            pass
