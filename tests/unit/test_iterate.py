"""The feeds' shared iterator bases (``batpak_mp._iterate``), on a fake clock and fake
feeds: ``idle_wait`` gives the idle waits every feed's ``next(timeout)`` used to compute
by hand; ``Feed`` / ``PagedFeed`` / ``AsyncFeed`` end iteration exactly when ``next`` gives
None (after the feed's own timeout) and close on leaving a ``with`` block, error or not;
and every feed of the package is built on them."""

from __future__ import annotations

import asyncio

import pytest

from batpak_mp import Coordinate, Event, Kind
from batpak_mp._client import Subscription
from batpak_mp._groups import GroupCursor
from batpak_mp._iterate import AsyncFeed, Feed, PagedFeed, idle_wait
from batpak_mp._replay import Cursor
from batpak_mp.aio import AsyncCursor, AsyncSubscription


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _event(seq: int) -> Event:
    return Event(seq.to_bytes(16, "big"), seq, Coordinate("e", "s"), Kind(1, 1), seq, 0, b"\xc0", 1, bytes(32),
                 bytes(32), None, None)


def test_idle_wait_without_a_deadline_is_the_cap_and_reads_no_clock() -> None:
    def clock() -> float:
        raise AssertionError("no deadline: the clock is not read")

    assert idle_wait(1.0, None, clock) == 1.0
    assert idle_wait(0.5, None, clock) == 0.5


def test_idle_wait_is_capped_and_gives_up_once_the_deadline_passed() -> None:
    clock = Clock(100.0)
    deadline = 102.0
    assert idle_wait(0.5, deadline, clock) == 0.5  # the cap comes first
    clock.now = 101.75
    assert idle_wait(0.5, deadline, clock) == 0.25  # the deadline comes first
    clock.now = 102.0
    assert idle_wait(0.5, deadline, clock) is None  # reached: give up, do not sleep 0
    clock.now = 103.0
    assert idle_wait(0.5, deadline, clock) is None


class ListFeed(PagedFeed[Event]):
    """Hands out the events of one page, then None (as a feed that timed out)."""

    def __init__(self, events: list[Event], timeout: float | None) -> None:
        super().__init__(timeout)
        self.pages = [events]
        self.position = 0  # the last sequence handed out
        self.timeouts: list[float | None] = []

    def next(self, timeout: float | None = None) -> Event | None:
        self.timeouts.append(timeout)
        while not self._closed:
            if self._buffer:
                ev = self._buffer.popleft()
                self.position = ev.global_sequence
                return ev
            if not self.pages:
                return None
            self._buffer.extend(self.pages.pop())
        return None


def test_iterating_ends_when_next_gives_none_and_passes_the_feeds_timeout() -> None:
    feed = ListFeed([_event(1), _event(2)], timeout=0.25)
    assert iter(feed) is feed
    assert [ev.global_sequence for ev in feed] == [1, 2]
    assert feed.timeouts == [0.25, 0.25, 0.25]
    with pytest.raises(StopIteration):
        next(feed)


def test_close_drops_the_buffer_and_ends_the_feed_and_may_be_repeated() -> None:
    feed = ListFeed([_event(1), _event(2), _event(3)], timeout=None)
    assert feed.next() is not None
    assert len(feed._buffer) == 2
    feed.close()
    assert feed._buffer == type(feed._buffer)()
    assert feed.next() is None
    assert list(feed) == []
    feed.close()


def test_leaving_a_with_block_closes_the_feed_even_on_an_error() -> None:
    with ListFeed([_event(1)], timeout=None) as feed:
        assert feed.next() is not None
    assert feed._closed
    with pytest.raises(KeyError), ListFeed([_event(1)], timeout=None) as other:
        raise KeyError("x")
    assert other._closed  # and the error is not swallowed


class AsyncListFeed(AsyncFeed[ListFeed]):
    """The asyncio face of a ``ListFeed`` (as ``AsyncSubscription`` is of a ``Subscription``)."""

    def __init__(self, feed: ListFeed, timeout: float | None) -> None:
        super().__init__(feed, timeout)
        self.timeouts: list[float | None] = []

    async def next(self, timeout: float | None = None) -> Event | None:
        self.timeouts.append(timeout)
        await asyncio.sleep(0)
        return self._feed.next(0)


def test_async_iteration_and_with_block_over_the_sync_feed() -> None:
    async def run() -> tuple[list[int], AsyncListFeed]:
        async with AsyncListFeed(ListFeed([_event(1), _event(2)], timeout=None), timeout=0.5) as feed:
            assert feed.__aiter__() is feed
            assert feed.position == 0
            got = [ev.global_sequence async for ev in feed]
            assert feed.position == 2  # the sync feed's
            with pytest.raises(StopAsyncIteration):
                await feed.__anext__()
            assert not feed._feed._closed
        return got, feed

    got, feed = asyncio.run(run())
    assert got == [1, 2]
    assert feed.timeouts == [0.5, 0.5, 0.5, 0.5]
    assert feed._feed._closed  # leaving the block closed the sync feed


def test_the_bases_must_be_completed() -> None:
    with pytest.raises(NotImplementedError):
        Feed().next()
    with pytest.raises(NotImplementedError):
        Feed().close()
    with pytest.raises(NotImplementedError):
        asyncio.run(AsyncFeed(ListFeed([], timeout=None), None).next())


@pytest.mark.parametrize(("feed", "base"), [(Subscription, PagedFeed), (Cursor, Feed), (GroupCursor, Feed),
                                            (AsyncSubscription, AsyncFeed), (AsyncCursor, AsyncFeed)],
                         ids=lambda x: x.__name__)
def test_every_feed_is_built_on_the_shared_base(feed: type, base: type) -> None:
    _assert_built_on(feed, base)


def test_the_remote_subscription_is_built_on_the_shared_base() -> None:
    pytest.importorskip("nats")
    from batpak_mp.jetstream._remote import RemoteSubscription

    _assert_built_on(RemoteSubscription, PagedFeed)


def _assert_built_on(feed: type, base: type) -> None:
    assert issubclass(feed, base)
    shared = [n for n in ("__iter__", "__next__", "__enter__", "__exit__", "__aiter__", "__anext__", "__aenter__",
                          "__aexit__") if hasattr(base, n)]
    assert len(shared) == 4
    for name in shared:
        assert getattr(feed, name) is getattr(base, name), f"{feed.__name__}.{name} is written out again"
