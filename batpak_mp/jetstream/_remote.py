"""The remote reader: the read half of the ``Store`` API over a JetStream stream.

Owns: ``RemoteStore`` (``get``, ``history``, ``query_after``, ``subscribe``,
``walk_ancestors``, ``verify_receipt``, ``entity_head``, ``frontier_sequence``) and
``RemoteSubscription``. Its asyncio loop lives in a thread of its own (``LoopThread``);
an ordered consumer delivers the stream from sequence 1 into an in-memory index, each
message checked on arrival by ``_mapping.ChainCheck`` (frame checksum and hash, headers,
stream position, the entity's hash chain) before anything can return it. Reads first
catch up with the stream's last sequence at the call (so a read sees every event the
bridge had published when it was made), then answer from the index with the store's
visibility rule for fences (FORMAT.md §14: a fenced event is shown once a
``SYSTEM_FENCE_COMMIT`` names it; subscriptions deliver it at that commit).
Invariants: a message that fails its check is never returned, nor anything after it:
every later call raises the same ``StreamTampered``; memory grows with the stream (every
event's header and payload bytes are kept: for logs past memory, restore into a local
journal and read that).
Must not import the writer, the client (``Store``), the service or the supervisor.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .._errors import InvalidArgument, NotFound, StoreClosed, StreamMismatch, StreamTampered, StreamUnavailable
from .._format.frame import FLAG_FENCED, frame_to_event
from .._format.ids import event_id_sequence
from .._iterate import PagedFeed, idle_wait
from .._read.reader import Reader
from .._read.receipts import receipt_matches
from .._signing import verify_receipt_signature
from .._values import (
    CATEGORY_SYSTEM,
    FENCE_ENTITY,
    SYSTEM_FENCE_COMMIT,
    Event,
    Kind,
    Page,
    Receipt,
    check_kind,
    check_name,
)
from ._mapping import ChainCheck
from ._nats import API_TIMEOUT_S, NATS_ERRORS, LoopThread, check_store, follow, open_nats, stream_info

RETRY_S = 0.25  # between attempts to set up the consumer while the stream does not answer
DEFAULT_TIMEOUT_S = 10.0  # a read waits this long for the stream's info, or for the next message while it catches up
_FENCE_COMMIT = Kind(CATEGORY_SYSTEM, SYSTEM_FENCE_COMMIT)


class RemoteStore:
    """A verified, read-only view of a store's journal in a JetStream stream."""

    def __init__(self, url: str, stream: str, *, timeout: float = DEFAULT_TIMEOUT_S,
                 public_key: bytes | None = None) -> None:
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise InvalidArgument("timeout", timeout, "must be a positive number of seconds")
        self.url, self.stream, self.timeout = url, stream, float(timeout)
        self._public_key = public_key
        self._cond = threading.Condition()
        self._events: list[Event] = []  # index seq - 1
        self._fenced: list[bool] = []
        self._by_entity: dict[str, list[int]] = {}
        self._revealed: list[tuple[int, int]] = []  # committed fence ranges, sorted
        self._closed = False
        self._loop = LoopThread(f"batpak-remote-{stream}")
        self._nc: Client | None = None
        self._sub: Any = None
        self._check = ChainCheck(stream)
        try:
            self.store_id, self._check = self._loop.run(self._start(), self.timeout + 1)
        except NATS_ERRORS as exc:  # TimeoutError included: the server did not answer in time
            self.close()
            raise StreamUnavailable(url, stream, f"cannot follow the stream: {type(exc).__name__}: {exc}") from None
        except BaseException:
            self.close()
            raise

    # -- the stream -> the index -----------------------------------------------------------
    async def _start(self) -> tuple[str, ChainCheck]:
        self._nc = await open_nats(self.url)
        js = self._nc.jetstream()
        deadline = time.monotonic() + self.timeout
        while True:  # a cluster electing a leader (a node just lost) answers late or not at all for a moment
            try:
                return await self._follow(js)
            except NATS_ERRORS:
                if time.monotonic() + RETRY_S >= deadline:
                    raise
                await asyncio.sleep(RETRY_S)

    async def _follow(self, js: JetStreamContext) -> tuple[str, ChainCheck]:
        info = await stream_info(js, self.stream)
        if info is None:
            raise StreamMismatch(self.stream, "no such stream")
        store = check_store(self.stream, info, None)
        first = int(info.state.first_seq)
        if info.state.last_seq and first != 1:
            raise StreamMismatch(self.stream, f"the stream starts at sequence {first}: its chain cannot be checked "
                                 "from the start (a stream of the bridge keeps every message)")
        check = ChainCheck(self.stream, store)
        self._check = check
        subjects = info.config.subjects or [">"]
        self._sub = await follow(js, self.stream, 1, self._on_msg, subject=subjects[0])
        return store, check

    def _on_msg(self, msg: Msg) -> None:
        check = self._check
        seq = msg.metadata.sequence.stream
        if check.broken is not None or seq < check.next_seq:  # a redelivery after the consumer reset: kept already
            return
        try:
            frame = check.check(seq, msg.subject, msg.headers, msg.data)
        except StreamTampered:
            with self._cond:
                self._cond.notify_all()
            return
        ev = frame_to_event(frame)
        with self._cond:
            self._events.append(ev)
            self._fenced.append(bool(frame.flags & FLAG_FENCED))
            self._by_entity.setdefault(ev.coordinate.entity, []).append(seq)
            if ev.kind == _FENCE_COMMIT and ev.coordinate.entity == FENCE_ENTITY:
                for first, last in ev.payload["ranges"]:
                    bisect.insort(self._revealed, (int(first), int(last)))
            self._cond.notify_all()

    def _raise_if_broken(self) -> None:
        if self._closed:
            raise StoreClosed("remote store")
        if self._check.broken is not None:
            raise self._check.broken

    async def _last_seq(self) -> int:
        assert self._nc is not None
        info = await stream_info(self._nc.jetstream(), self.stream)
        return int(info.state.last_seq) if info is not None else 0

    def _catch_up(self, through: int | None = None) -> int:
        """Wait until the index holds the stream's last sequence (asked now), or ``through``."""
        self._raise_if_broken()
        if through is None:
            try:
                through = self._loop.run(self._last_seq(), min(self.timeout, API_TIMEOUT_S))
            except NATS_ERRORS as exc:
                raise StreamUnavailable(self.url, self.stream, f"stream info: {type(exc).__name__}: {exc}") from None
        deadline = time.monotonic() + self.timeout  # moved on by every message: the first read of a long stream takes a while
        with self._cond:
            seen = len(self._events)
            while seen < through:
                self._raise_if_broken()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StreamUnavailable(self.url, self.stream, f"caught up to {seen} of {through}: no message "
                                            f"for {self.timeout} s")
                self._cond.wait(min(left, 0.2))
                if len(self._events) > seen:
                    seen = len(self._events)
                    deadline = time.monotonic() + self.timeout
        self._raise_if_broken()
        return through

    # -- visibility ------------------------------------------------------------------------
    def _hidden(self, seq: int) -> bool:
        if not self._fenced[seq - 1]:
            return False
        i = bisect.bisect_right(self._revealed, (seq, 1 << 63)) - 1
        return i < 0 or self._revealed[i][1] < seq

    # -- the read API ----------------------------------------------------------------------
    def frontier_sequence(self) -> int:
        """The stream's last sequence (the journal's last published event), caught up to."""
        return self._catch_up()

    def get(self, event_id: bytes) -> Event:
        if not isinstance(event_id, (bytes, bytearray)) or len(event_id) != 16:
            raise InvalidArgument("event_id", event_id, "must be 16 bytes")
        seq = event_id_sequence(bytes(event_id))
        self._raise_if_broken()
        if seq > len(self._events):
            self._catch_up()
        with self._cond:
            if not 0 < seq <= len(self._events) or self._events[seq - 1].event_id != event_id or self._hidden(seq):
                raise NotFound("event", bytes(event_id).hex())
            return self._events[seq - 1]

    def history(self, entity: str, *, after_clock: int | None = None, limit: int | None = None) -> list[Event]:
        check_name("entity", entity)
        if after_clock is not None and (type(after_clock) is not int or after_clock < 0):
            raise InvalidArgument("after_clock", after_clock, "must be an int >= 0")
        if limit is not None and (type(limit) is not int or limit < 0):
            raise InvalidArgument("limit", limit, "must be an int >= 0")
        self._catch_up()
        floor = after_clock or 0
        with self._cond:
            out = [self._events[s - 1] for s in self._by_entity.get(entity, ())
                   if not self._hidden(s) and self._events[s - 1].entity_clock > floor]
        return out if limit is None else out[:limit]

    def query_after(self, after: int = 0, *, limit: int = 1000, entity: str | None = None,
                    scope: str | None = None, kind: Kind | None = None) -> Page:
        if type(after) is not int or after < 0:
            raise InvalidArgument("after", after, "must be an int >= 0")
        if type(limit) is not int or limit < 1:
            raise InvalidArgument("limit", limit, "must be an int >= 1")
        if entity is not None:
            check_name("entity", entity)
        if scope is not None:
            check_name("scope", scope)
        if kind is not None:
            if not isinstance(kind, tuple) or len(kind) != 2:
                raise InvalidArgument("kind", kind, "must be a bp.Kind")
            check_kind(kind, allow_reserved=True)
        visible = self._catch_up()
        events: list[Event] = []
        seq = after
        with self._cond:
            while seq < visible and len(events) < limit:
                seq += 1
                ev = self._events[seq - 1]
                if self._hidden(seq) or not _matches(ev, entity, scope, kind):
                    continue
                events.append(ev)
        return Page(events, seq)

    def walk_ancestors(self, event_id: bytes, *, limit: int | None = None) -> Iterator[Event]:
        """The event, then its predecessors in its entity's chain (checked on arrival)."""
        if limit is not None and (type(limit) is not int or limit < 0):
            raise InvalidArgument("limit", limit, "must be an int >= 0")
        ev = self.get(event_id)
        with self._cond:
            seqs = self._by_entity[ev.coordinate.entity]
            i = bisect.bisect_right(seqs, ev.global_sequence)
            out = [self._events[s - 1] for s in reversed(seqs[:i]) if not self._hidden(s)]
        return iter(out if limit is None else out[:limit])

    def entity_head(self, entity: str) -> Event | None:
        hist = self.history(entity)
        return hist[-1] if hist else None

    def verify_receipt(self, receipt: Receipt) -> bool:
        """The receipt matches the event in the stream (and its signature, when a
        ``public_key`` was given: the store's ``receipt.pub``)."""
        self._raise_if_broken()
        key = self._public_key
        # receipt_matches asks its reader for ``get`` only, which this class answers the same way
        return receipt_matches(cast(Reader, self), receipt,
                               None if key is None else lambda r: verify_receipt_signature(r, key))

    def stream_page(self, after: int, limit: int, *, entity: str | None = None, scope: str | None = None,
                    kind: Kind | None = None, upto: int | None = None) -> tuple[list[Event], int]:
        """The next events in *stream* order after ``after`` (a fenced event where its
        FENCE_COMMIT stands), and the last sequence looked at (as ``Store.stream_page``)."""
        visible = len(self._events) if upto is None else upto
        out: list[Event] = []
        seq = after
        with self._cond:
            while seq < visible and len(out) < limit:
                seq += 1
                ev = self._events[seq - 1]
                if self._fenced[seq - 1]:
                    continue  # delivered at its commit
                if _matches(ev, entity, scope, kind):
                    out.append(ev)
                if ev.kind == _FENCE_COMMIT and ev.coordinate.entity == FENCE_ENTITY:
                    for first, last in ev.payload["ranges"]:
                        out.extend(e for e in self._events[int(first) - 1:int(last)] if _matches(e, entity, scope, kind))
        return out, seq

    def subscribe(self, after: int | None = None, *, entity: str | None = None, scope: str | None = None,
                  kind: Kind | None = None, timeout: float | None = None) -> RemoteSubscription:
        """New events as the stream receives them (``after``: a sequence to start after;
        default: the stream's end now, i.e. only new events)."""
        if after is None:
            after = self._catch_up()
        elif type(after) is not int or after < 0:
            raise InvalidArgument("after", after, "must be an int >= 0")
        self.query_after(after, limit=1, entity=entity, scope=scope, kind=kind)  # validates the filters
        return RemoteSubscription(self, after, entity, scope, kind, timeout)

    def _wait_new(self, position: int, timeout: float) -> None:
        with self._cond:
            if len(self._events) <= position and self._check.broken is None and not self._closed:
                self._cond.wait(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shut() -> None:
            if self._sub is not None:
                try:
                    await self._sub.unsubscribe()
                except NATS_ERRORS:
                    pass
            if self._nc is not None:
                try:
                    await self._nc.close()
                except NATS_ERRORS:
                    pass

        try:
            self._loop.run(shut(), 3.0)
        except (TimeoutError, RuntimeError):
            pass
        self._loop.close()
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _matches(ev: Event, entity: str | None, scope: str | None, kind: Kind | None) -> bool:
    return ((entity is None or ev.coordinate.entity == entity) and (scope is None or ev.coordinate.scope == scope)
            and (kind is None or ev.kind == kind))


class RemoteSubscription(PagedFeed[Event]):
    """An iterator of a stream's events as they arrive (verified), like ``Subscription``."""

    IDLE_S = 0.5  # while idle, it looks again (a broken stream, a closed store) at least this often

    def __init__(self, store: RemoteStore, after: int, entity: str | None, scope: str | None, kind: Kind | None,
                 timeout: float | None) -> None:
        super().__init__(timeout)
        self._store = store
        self.position = after
        self._filters = (entity, scope, kind)

    def next(self, timeout: float | None = None) -> Event | None:
        """The next matching event; None after ``timeout`` idle seconds or when closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        store = self._store
        entity, scope, kind = self._filters
        while not self._closed:
            if self._buffer:
                return self._buffer.popleft()
            store._raise_if_broken()
            events, self.position = store.stream_page(self.position, self.PAGE, entity=entity, scope=scope, kind=kind)
            if events:
                self._buffer.extend(events)
                continue
            wait = idle_wait(self.IDLE_S, deadline, time.monotonic)
            if wait is None:
                return None
            store._wait_new(self.position, wait)
        return None


def connect(url: str, stream: str, *, timeout: float = DEFAULT_TIMEOUT_S, public_key: bytes | None = None) -> RemoteStore:
    """A verified read-only view of the journal a bridge published into ``stream``."""
    return RemoteStore(url, stream, timeout=timeout, public_key=public_key)
