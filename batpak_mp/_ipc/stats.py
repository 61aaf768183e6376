"""The writer's statistics: the layout of the control block's stats region, and the
accumulator the writer keeps them in.

Owns (docs/PROTOCOL.md §4.4): which cumulative counters the stats region holds, in which
order, and the upper bounds of its histograms' buckets; ``encode``/``decode`` between the
flat tuple of u64 the control block stores and a ``Stats`` value; and ``WriterStats``,
which the writer feeds with what it observes (a group's size and commit time, an fsync's
duration) and reads back as that flat tuple when it publishes.

Invariants: every counter only grows during one writer's life (a new writer starts again
from zero, as ``groups`` and ``requests`` do), so any number of scrapers can read them
without resetting anything; a histogram's buckets are stored per bucket (not cumulative)
and its count is their sum, so count and buckets can never disagree. The region is
published inside the control block's seqlock together with ``groups`` and ``requests``:
one read sees a group-size histogram whose count is ``groups`` and whose sum is
``requests``. The layout is written once, here: ``STATS_FIELDS`` names the slots.

Pure: no clock, no OS, no threads. The writer measures (``time.monotonic_ns``) and passes
durations in; its syncer thread hands fsync durations over through a ``deque`` (append and
popleft are atomic), so only the writer's loop touches the counters.
Must not import the storage layer, the read layer or any process role.
"""

from __future__ import annotations

import bisect
import operator
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

# requests per commit group: the writer takes at most GROUP_MAX = 256 into one group
GROUP_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# commit and fsync durations (ns): from a tmpfs fsync (~10 us) to a disk in trouble (seconds)
LATENCY_BOUNDS_NS = (
    10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000,
    100_000_000, 250_000_000, 500_000_000, 1_000_000_000, 2_500_000_000,
)


def _histogram_slots(name: str, bounds: Sequence[int]) -> list[str]:
    return [f"{name}_le_{b}" for b in bounds] + [f"{name}_le_inf", f"{name}_sum"]


# the u64 slots of the region, in order (docs/PROTOCOL.md §4.4)
STATS_FIELDS: tuple[str, ...] = (
    "appended_events",  # events of append requests answered with receipts (an idempotent replay counts)
    "appended_bytes",  # their msgpack payload bytes
    *_histogram_slots("group_size", GROUP_BOUNDS),  # requests per group; sum = requests
    *_histogram_slots("commit_ns", LATENCY_BOUNDS_NS),  # a group's write until it is published
    *_histogram_slots("fsync_ns", LATENCY_BOUNDS_NS),  # the syncer thread's fdatasync of written groups
)
STATS = struct.Struct("<" + "Q" * len(STATS_FIELDS))
U64_MAX = (1 << 64) - 1

_GROUP_AT = STATS_FIELDS.index("group_size_le_1")
_COMMIT_AT = STATS_FIELDS.index(f"commit_ns_le_{LATENCY_BOUNDS_NS[0]}")
_FSYNC_AT = STATS_FIELDS.index(f"fsync_ns_le_{LATENCY_BOUNDS_NS[0]}")


class Histogram(NamedTuple):
    """``buckets[i]``: observations at most ``bounds[i]`` and above the bound before it;
    the last bucket has no upper bound (+Inf). ``total``: the sum of the observations."""

    bounds: tuple[int, ...]
    buckets: tuple[int, ...]
    total: int

    @property
    def observations(self) -> int:
        return sum(self.buckets)

    def cumulative(self) -> list[int]:
        """Observations at most each bound, then all of them (Prometheus's ``le`` buckets)."""
        out, running = [], 0
        for n in self.buckets:
            running += n
            out.append(running)
        return out

    def quantile(self, q: float) -> int | None:
        """The upper bound of the bucket holding the ``q`` quantile (None: no observations,
        or it lies in the +Inf bucket): what a histogram can say, no more."""
        count = self.observations
        if not count:
            return None
        rank = q * count
        for bound, seen in zip(self.bounds, self.cumulative(), strict=False):
            if seen >= rank:
                return bound
        return None


class Stats(NamedTuple):
    appended_events: int
    appended_bytes: int
    group_size: Histogram
    commit_ns: Histogram
    fsync_ns: Histogram


def _histogram(values: Sequence[int], at: int, bounds: tuple[int, ...]) -> Histogram:
    n = len(bounds) + 1
    return Histogram(bounds, tuple(values[at:at + n]), values[at + n])


def decode(values: Sequence[int]) -> Stats:
    """The region's flat u64 values as a ``Stats``."""
    if len(values) != len(STATS_FIELDS):
        raise ValueError(f"a stats region holds {len(STATS_FIELDS)} values, not {len(values)}")
    return Stats(values[0], values[1], _histogram(values, _GROUP_AT, GROUP_BOUNDS),
                 _histogram(values, _COMMIT_AT, LATENCY_BOUNDS_NS), _histogram(values, _FSYNC_AT, LATENCY_BOUNDS_NS))


def encode(stats: Stats) -> tuple[int, ...]:
    """The inverse of ``decode``."""
    out = [stats.appended_events, stats.appended_bytes]
    for h in (stats.group_size, stats.commit_ns, stats.fsync_ns):
        out += [*h.buckets, h.total]
    return tuple(out)


EMPTY = decode((0,) * len(STATS_FIELDS))
_payload = operator.itemgetter(3)  # a Prepared's msgpack payload


class WriterStats:
    """What the writer's loop accumulates; ``values()`` is what it publishes.

    ``group`` when a group has been committed (written); ``published`` with the engine's
    ``groups_published`` whenever replies may be released: each group's commit time runs
    from the start of its write to that moment (with sync mode ``group``, the fsync that
    covers it is inside). ``fsync`` may be called from another thread."""

    def __init__(self) -> None:
        self._values = [0] * len(STATS_FIELDS)
        self._published: tuple[int, ...] | None = None  # values() as last returned; None: changed since
        self._started: deque[tuple[int, int]] = deque()  # (groups written at its commit, its start ns)
        self._fsyncs: deque[int] = deque()  # durations handed over by the syncer thread

    def group(self, requests: Sequence[Sequence[Any]], results: Sequence[object], written: int, start_ns: int) -> None:
        """A group of ``requests`` (lists of prepared events, each with its payload bytes
        at index 3) was committed; ``results[i]`` is an exception for a refused request.
        ``written``: the engine's ``groups_written`` after it; ``start_ns``: when it began."""
        v = self._values
        events = size = 0
        for items, result in zip(requests, results, strict=True):
            if not isinstance(result, BaseException):
                events += len(items)
                size += sum(map(len, map(_payload, items)))
        self._published = None
        v[0] += events
        v[1] += size
        n = len(requests)
        v[_GROUP_AT + bisect.bisect_left(GROUP_BOUNDS, n)] += 1
        v[_GROUP_AT + len(GROUP_BOUNDS) + 1] += n
        self._started.append((written, start_ns))

    def published(self, groups_published: int, now_ns: int) -> None:
        """Groups up to ``groups_published`` are published at ``now_ns``."""
        started = self._started
        if started and started[0][0] <= groups_published:
            self._published = None
        while started and started[0][0] <= groups_published:
            _, t0 = started.popleft()
            self._observe(_COMMIT_AT, max(0, now_ns - t0))

    def fsync(self, duration_ns: int) -> None:
        """An fsync took ``duration_ns`` (thread-safe: only queued here)."""
        self._fsyncs.append(duration_ns)

    def _observe(self, at: int, ns: int) -> None:
        v = self._values
        v[at + bisect.bisect_left(LATENCY_BOUNDS_NS, ns)] += 1
        v[at + len(LATENCY_BOUNDS_NS) + 1] = min(U64_MAX, v[at + len(LATENCY_BOUNDS_NS) + 1] + ns)

    def values(self) -> tuple[int, ...]:
        """The region's values now (fsyncs handed over meanwhile are counted first)."""
        fsyncs = self._fsyncs
        if fsyncs:
            self._published = None
        while fsyncs:
            self._observe(_FSYNC_AT, fsyncs.popleft())
        if self._published is None:  # most publishes change nothing here: reuse the tuple
            self._published = tuple(self._values)
        return self._published
