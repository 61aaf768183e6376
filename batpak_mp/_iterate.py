"""The iterator protocol every event feed shares, written once: the sync and async bases of
``Subscription``, ``Cursor``, ``GroupCursor``, ``RemoteSubscription``, ``AsyncSubscription``
and ``AsyncCursor``.

Owns:
- ``Feed``: ``for ev in feed`` (``next(self._timeout)`` until it gives None, then
  ``StopIteration``) and ``with feed:`` (``close()`` on leaving). A subclass supplies
  ``next(timeout)`` and ``close()`` and sets ``_timeout``.
- ``PagedFeed``: a ``Feed`` that buffers a page of entries at a time (``PAGE``) and is
  closed by a flag: ``close()`` sets ``_closed`` and drops the buffer, so ``next`` (which
  loops ``while not self._closed``) returns None from then on.
- ``AsyncFeed``: the same for ``async for`` / ``async with`` (``StopAsyncIteration``), as
  the asyncio face of a sync feed (``_feed``): its ``position`` and ``close`` are the
  sync feed's; a subclass supplies ``async next(timeout)``.
- ``idle_wait``: how long an idle feed may sleep before it looks again, against the
  deadline of its ``next(timeout)`` on a clock the caller passes.

Invariants: iterating ends exactly when ``next`` gives None (each feed says when: timed
out, closed, or for a group member, events still to acknowledge), never on an event;
leaving a ``with`` block closes the feed, error or not, and lets the error through.
Pure: no clock of its own (each caller passes ``time.monotonic`` or its loop's ``time``),
no OS, no threads. Must not import anything of batpak_mp but ``_values``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, Self, TypeVar

from ._values import Event

__all__ = ["AsyncFeed", "Feed", "PagedFeed", "SyncFeed", "idle_wait"]

T = TypeVar("T")


class SyncFeed(Protocol):
    """What an ``AsyncFeed`` needs of the sync feed it wraps."""

    @property
    def position(self) -> int: ...

    def close(self) -> None: ...


F = TypeVar("F", bound=SyncFeed)


def idle_wait(cap: float, deadline: float | None, clock: Callable[[], float]) -> float | None:
    """How long an idle feed sleeps before it looks again: ``cap`` seconds, or less when
    ``deadline`` (a time on ``clock``; None: no deadline) comes first; None once it has
    passed (give up). Called only when idle: the path that hands out events pays nothing."""
    if deadline is None:
        return cap
    wait = min(cap, deadline - clock())
    return wait if wait > 0 else None


class Feed:
    """``for ev in feed`` and ``with feed``, over the subclass's ``next`` and ``close``."""

    _timeout: float | None  # the idle seconds after which iterating ends (None: never)

    def next(self, timeout: float | None = None) -> Event | None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Event:
        ev = self.next(self._timeout)
        if ev is None:
            raise StopIteration
        return ev

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PagedFeed(Feed, Generic[T]):
    """A ``Feed`` that reads a page (``PAGE`` entries) at a time into ``_buffer`` and
    hands the entries out one by one until ``close()``."""

    PAGE = 1000  # entries read per look: memory per feed stays bounded, a backlog still takes few reads

    def __init__(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._buffer: deque[T] = deque()
        self._closed = False

    def close(self) -> None:
        self._closed = True
        self._buffer.clear()


class AsyncFeed(Generic[F]):
    """``async for ev in feed`` and ``async with feed`` over a sync feed, with the
    subclass's ``next``."""

    def __init__(self, feed: F, timeout: float | None) -> None:
        self._feed = feed
        self._timeout = timeout  # the idle seconds after which iterating ends (None: never)

    @property
    def position(self) -> int:
        return self._feed.position

    async def next(self, timeout: float | None = None) -> Event | None:
        raise NotImplementedError

    def close(self) -> None:
        self._feed.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        ev = await self.next(self._timeout)
        if ev is None:
            raise StopAsyncIteration
        return ev

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
