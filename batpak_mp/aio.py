"""The asyncio face of the client: ``store = await bp.aio.connect(data_dir)`` -> ``AsyncStore``.

Owns: running the client's writes on an event loop — the very ops the sync ``Store``
drives (``_client.Call`` generators), over the same request life (``Channel.exchange``),
so both faces share every rule — with any number of requests in flight from one loop,
sharing the writer's group commits; and waking coroutines without a thread per call and
without polling: every area of an ``AsyncStore`` rings one doorbell word of the control
block (named in its token, ``names.area_token``), and one waiter thread sleeps in the
kernel on that word and hands each reply to its coroutine (``call_soon_threadsafe``, once
per wake for all replies found); a second waiter thread, started on first use, sleeps on
the notify word for subscriptions and cursors. Both threads pin the control block
(``Store._pinned``), so closing never unmaps a word a thread sleeps on.

Reads (``get``, ``history``, ``query_after``, ...) make no round trip: they read the
mapped files in microseconds and are called directly (a very long ``history`` or a
projection over millions of events may be handed to ``asyncio.to_thread`` by the caller).
Store methods without a coroutine here (administrative ones) run in the loop's default
executor. An ``AsyncStore`` belongs to the loop that made it and to its process.
Invariants: the sync core stays free of asyncio (this module imports ``_client``, never
the reverse); a cancelled call abandons its area (a writer may still answer into it).
Must not import the writer, the engine or the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._client import (
    DEFAULT_TIMEOUT_S,
    Channel,
    Op,
    Store,
    Subscription,
    ipc_errors,
    op_effect,
    op_fence_begin,
    op_fence_finish,
    op_prepared,
    op_sync,
    prepare_batch,
    reply_data,
)
from ._errors import FenceLost, InvalidArgument, StoreClosed, WriterTimeout
from ._gates import Denial, bypass_audit_item, denial_payload
from ._ipc import wire as W
from ._ipc.control import DOORBELLS
from ._ipc.futex import Word
from ._iterate import AsyncFeed, idle_wait
from ._replay import Cursor
from ._values import EFFECT_DENIAL, BatchItem, Coordinate, Event, Kind, Receipt

__all__ = ["AsyncCursor", "AsyncFence", "AsyncStore", "AsyncSubscription", "connect"]

T = TypeVar("T")
IDLE_S = 0.5  # a waiter thread with nothing to wake looks at its stop flag this often
DURABLE_POLL_MAX_S = 0.01  # wait_for_durable: the longest sleep between looks (as the sync Store)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake_all(futs: list[asyncio.Future[None]]) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_result(None)


class _Waiter:
    """A thread asleep in the kernel on one futex word of the control block; each time
    the word moves (and every ``IDLE_S``) it runs ``ready()`` — which futures can go on —
    and wakes them on the loop, all in one call. Futures are registered with ``watch``."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop, word: Callable[[], Word], name: str,
                 ready: Callable[[dict[int, tuple[Any, asyncio.Future[None]]]], list[int]]) -> None:
        self._loop = loop
        self._ready = ready
        self._pending: dict[int, tuple[Any, asyncio.Future[None]]] = {}
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._stop = False
        started = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                with store._pinned():  # the word stays mapped while this thread sleeps on it
                    w = word()
                    started.set()
                    self._run(w)
            except BaseException as exc:  # StoreClosed before it began
                failed.append(exc)
                started.set()

        self._thread = threading.Thread(target=run, name=f"batpak-aio-{name}", daemon=True)
        self._thread.start()
        started.wait()
        if failed:
            raise failed[0]

    def watch(self, what: Any, fut: asyncio.Future[None]) -> int:
        key = next(self._keys)
        with self._lock:
            self._pending[key] = (what, fut)
        return key

    def forget(self, key: int) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def stop(self) -> None:
        self._stop = True

    def _run(self, word: Word) -> None:
        while not self._stop:
            seen = word.value  # read before looking: a move after this ends the wait at once
            with self._lock:
                pending = dict(self._pending)
            if pending:
                keys = self._ready(pending)
                if keys:
                    with self._lock:
                        for key in keys:
                            self._pending.pop(key, None)
                    try:
                        self._loop.call_soon_threadsafe(_wake_all, [pending[k][1] for k in keys])
                    except RuntimeError:  # the loop is closed: nobody left to wake
                        return
            word.wait(seen, IDLE_S)


def _replied(pending: dict[int, tuple[Any, asyncio.Future[None]]]) -> list[int]:
    out = []
    for key, ((area, request_id), _) in pending.items():
        try:
            if area.replied(request_id):
                out.append(key)
        except ValueError:  # abandoned meanwhile (its mapping closed): let its coroutine look
            out.append(key)
    return out


def _everyone(pending: dict[int, tuple[Any, asyncio.Future[None]]]) -> list[int]:
    return list(pending)


class AsyncStore:
    """A ``Store`` for asyncio: the writes are coroutines (many in flight at once from one
    loop, sharing group commits), reads are direct calls (no round trip), subscriptions
    and cursors are async iterators. ``async with await bp.aio.connect(d) as store:``."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop
        self._pid = os.getpid()
        self._closed = False
        self._calls = 0
        self._idle = asyncio.Event()
        self._idle.set()
        bell = secrets.randbelow(DOORBELLS)
        with ipc_errors(f"cannot reach the service of {store.data_dir!r}"):
            self._channel = Channel(store.data_dir, store._control, bell=bell)
        try:
            self._replies = _Waiter(store, loop, lambda: store._control.doorbell_word(bell), "replies", _replied)
        except BaseException:
            self._channel.close()
            raise
        self._notify: _Waiter | None = None  # started by the first subscription or cursor that waits

    @property
    def data_dir(self) -> str:
        return self._store.data_dir

    @property
    def store(self) -> Store:
        """The sync ``Store`` underneath (same connection): for code that is not async."""
        return self._store

    # -- driving ops on the loop -------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise StoreClosed()
        if os.getpid() != self._pid:
            raise InvalidArgument("AsyncStore", self._pid, "belongs to the process that made it: connect anew after fork")

    async def _request(self, call_op: int, body: Any, reply_room: int, timeout: float | None) -> Any:
        self._check_usable()
        loop = self._loop
        run = self._channel.exchange(call_op, body, reply_room, self._store.timeout if timeout is None else timeout)
        self._calls += 1
        self._idle.clear()
        try:
            with ipc_errors("the request channel to the writer failed"):
                wait = next(run)
                while True:
                    if wait.message is not None:  # the queue is full: wait for room in the executor
                        sent = await loop.run_in_executor(None, self._channel.send_blocking, wait.message, wait.timeout)
                        wait = run.send(sent)
                        continue
                    area = wait.area
                    assert area is not None
                    fut: asyncio.Future[None] = loop.create_future()
                    key = self._replies.watch((area, wait.request_id), fut)
                    if area.replied(wait.request_id):  # answered before the waiter could know of it
                        fut.set_result(None)
                    timer = loop.call_later(wait.timeout, _wake, fut)
                    try:
                        await fut
                    finally:
                        timer.cancel()
                        self._replies.forget(key)
                    wait = run.send(False)
        except StopIteration as done:
            reply = done.value
        finally:
            run.close()  # cancelled or failed mid-way: the exchange abandons its area
            self._calls -= 1
            if not self._calls:
                self._idle.set()
        return reply_data(call_op, reply)

    async def _drive(self, op: Op[T]) -> T:
        try:
            call = next(op)
            while True:
                call = op.send(await self._request(call.op, call.body, call.reply_room, call.timeout))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _notified(self, word_seen: int, timeout: float) -> None:
        """Return once the notify word moved past ``word_seen``, or after ``timeout``."""
        if self._notify is None:
            store = self._store
            self._notify = _Waiter(store, self._loop, lambda: _notify_word(store), "notify", _everyone)
        fut: asyncio.Future[None] = self._loop.create_future()
        key = self._notify.watch(None, fut)
        if _notify_word(self._store).value != word_seen:
            fut.set_result(None)
        timer = self._loop.call_later(max(timeout, 0.0), _wake, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._notify.forget(key)

    # -- writes ----------------------------------------------------------------------------------
    async def append(self, coord: Coordinate, kind: Kind, payload: Any, *, idempotency_key: str | bytes | None = None,
                     expected_clock: int | None = None, causation_id: bytes | None = None,
                     correlation_id: bytes | None = None, payload_version: int | None = None) -> Receipt:
        """``Store.append``, awaited: returns once the event is durable (default sync mode)."""
        return await self._drive(self._store._op_append(
            coord, kind, payload, idempotency_key=idempotency_key, expected_clock=expected_clock,
            causation_id=causation_id, correlation_id=correlation_id, payload_version=payload_version))

    async def append_batch(self, items: Sequence[BatchItem]) -> list[Receipt]:
        return await self._drive(op_prepared(prepare_batch(items, max_payload=self._store.payload_limit)))

    async def append_store_kinds(self, items: Sequence[BatchItem]) -> list[Receipt]:
        return await self._drive(op_prepared(prepare_batch(items, store_kinds=True,
                                                             max_payload=self._store.payload_limit)))

    async def append_effect(self, coord: Coordinate, type_id: int, payload: Any, *,
                            causation_id: bytes | None = None, idempotency_key: str | bytes | None = None) -> Receipt:
        return await self._drive(op_effect(coord, type_id, payload, causation_id=causation_id,
                                            idempotency_key=idempotency_key))

    async def append_denial(self, coord: Coordinate, denial: Denial, *, proposal_kind: Kind | None = None,
                            causation_id: bytes | None = None) -> Receipt:
        return await self.append_effect(coord, EFFECT_DENIAL, denial_payload(denial, proposal_kind),
                                        causation_id=causation_id)

    async def append_bypass(self, item: BatchItem, reason: str, *, gates: Sequence[str] = ()) -> tuple[Receipt, Receipt]:
        event, audit = await self.append_store_kinds([item, bypass_audit_item(item, reason, gates)])
        return event, audit

    async def sync(self, timeout: float | None = None) -> int:
        return await self._drive(op_sync(timeout))

    async def wait_for_durable(self, sequence: int, timeout: float) -> None:
        """``Store.wait_for_durable`` without blocking the loop."""
        if type(sequence) is not int or sequence < 0:
            raise InvalidArgument("sequence", sequence, "must be an int >= 0")
        deadline = self._loop.time() + timeout
        asked = False
        delay = 0.0002
        while True:
            f = self._store.frontier()
            if f.durable >= sequence:
                return
            if not asked and f.visible >= sequence:
                asked = True
                with contextlib.suppress(WriterTimeout):
                    await self.sync(timeout=max(deadline - self._loop.time(), 0.001))
                    continue
            if self._loop.time() >= deadline:
                raise WriterTimeout(f"sequence {sequence} to become durable", timeout)
            await asyncio.sleep(delay)
            delay = min(delay * 2, DURABLE_POLL_MAX_S)

    async def fence(self) -> AsyncFence:
        """Open a visibility fence: ``async with await store.fence() as f: await f.append(...)``."""
        return AsyncFence(self, await self._drive(op_fence_begin()))

    # -- reads and feeds ---------------------------------------------------------------------------
    def subscribe(self, after: int | None = None, *, entity: str | None = None, scope: str | None = None,
                  kind: Kind | None = None, timeout: float | None = None) -> AsyncSubscription:
        """``Store.subscribe`` as an async iterator (``async for ev in store.subscribe()``)."""
        return AsyncSubscription(self, self._store.subscribe(after, entity=entity, scope=scope, kind=kind),
                                 timeout)

    def cursor(self, name: str, *, timeout: float | None = None, **filters: Any) -> AsyncCursor:
        """``Store.cursor`` as an async iterator; ``await cur.ack(ev)``."""
        return AsyncCursor(self, self._store.cursor(name, **filters), timeout)

    def __getattr__(self, name: str) -> Any:
        """Every other ``Store`` method: reads directly (they make no round trip); the rest
        (administrative writes) as coroutines run in the loop's default executor."""
        attr = getattr(self._store, name)
        if name in _DIRECT or not callable(attr) or name.startswith("_"):
            return attr

        async def threaded(*args: Any, **kwargs: Any) -> Any:
            self._check_usable()
            return await self._loop.run_in_executor(None, functools.partial(attr, *args, **kwargs))

        return threaded

    # -- lifecycle -----------------------------------------------------------------------------------
    async def close(self) -> None:
        """Let the calls in flight finish, then close (the waiter threads end on their own)."""
        if self._closed:
            return
        self._closed = True
        await self._idle.wait()
        self._replies.stop()
        if self._notify is not None:
            self._notify.stop()
        self._channel.close()
        self._store.close()

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# reads (and cheap local calls) that run directly on the loop
_DIRECT = frozenset({
    "get", "history", "query_after", "walk_ancestors", "verify_receipt", "entity_head", "frontier", "stream_page",
    "caused_by", "project", "project_if_changed", "react", "latest",
})


def _notify_word(store: Store) -> Word:
    bell = store._control.bell
    if bell is None:
        raise StoreClosed()
    return bell


class AsyncFence:
    """A visibility fence of an ``AsyncStore`` (see ``Store.fence``)."""

    def __init__(self, store: AsyncStore, token: bytes) -> None:
        self._store = store
        self.token = token
        self.done = False

    async def append(self, coord: Coordinate, kind: Kind, payload: Any, *, idempotency_key: str | bytes | None = None,
                     expected_clock: int | None = None, causation_id: bytes | None = None,
                     correlation_id: bytes | None = None) -> Receipt:
        return (await self.append_batch([BatchItem(coord, kind, payload, idempotency_key, expected_clock,
                                                   causation_id, correlation_id)]))[0]

    async def append_batch(self, items: Sequence[BatchItem]) -> list[Receipt]:
        if self.done:
            raise FenceLost(self.token, "the fence was already committed or cancelled")
        limit = self._store._store.payload_limit
        return await self._store._drive(op_prepared(prepare_batch(items, max_payload=limit), self.token))

    async def _finish(self, op: int) -> None:
        if not self.done:
            self.done = True
            await self._store._drive(op_fence_finish(self.token, op))

    async def commit(self) -> None:
        await self._finish(W.OP_FENCE_COMMIT)

    async def cancel(self) -> None:
        await self._finish(W.OP_FENCE_CANCEL)

    async def __aenter__(self) -> AsyncFence:
        return self

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            await self.commit()
        else:
            with contextlib.suppress(Exception):
                await self.cancel()  # the original exception matters more; the fence stays hidden anyway


class AsyncSubscription(AsyncFeed[Subscription]):
    """``Store.subscribe`` on a loop: ``async for ev in sub`` (ends after ``timeout`` idle
    seconds when given), or ``await sub.next(timeout)``."""

    def __init__(self, store: AsyncStore, sub: Subscription, timeout: float | None) -> None:
        super().__init__(sub, timeout)
        self._store = store

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next matching event; None after ``timeout`` idle seconds or when closed."""
        steps = self._feed.steps(timeout)
        try:
            _, seen, wait = next(steps)
            while True:
                await self._store._notified(seen, wait)
                _, seen, wait = steps.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        finally:
            steps.close()


class AsyncCursor(AsyncFeed[Cursor]):
    """``Store.cursor`` on a loop: ``async for ev in cur`` and ``await cur.ack(ev)``.
    Acknowledging is a write of the cursor's position; it runs in the loop's executor."""

    def __init__(self, store: AsyncStore, cursor: Cursor, timeout: float | None) -> None:
        super().__init__(cursor, timeout)
        self._store = store

    @property
    def cursor(self) -> Cursor:
        return self._feed

    async def next(self, timeout: float | None = None) -> Event | None:
        deadline = None if timeout is None else self._store._loop.time() + timeout
        while True:
            seen = _notify_word(self._store._store).value  # read before looking
            ev = self._feed.next(0)
            if ev is not None:
                return ev
            wait = idle_wait(Subscription.STATE_CHECK_S, deadline, self._store._loop.time)
            if wait is None:
                return None
            await self._store._notified(seen, wait)

    async def ack(self, event: Event) -> None:
        await self._store._loop.run_in_executor(None, self._feed.ack, event)

    async def ack_through(self, sequence: int) -> None:
        await self._store._loop.run_in_executor(None, self._feed.ack_through, sequence)


async def connect(data_dir: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT_S) -> AsyncStore:
    """Attach to a served data directory from a coroutine. Cheap: maps files lazily."""
    loop = asyncio.get_running_loop()
    store = Store(data_dir, timeout=timeout)
    try:
        return AsyncStore(store, loop)
    except BaseException:
        store.close()
        raise
