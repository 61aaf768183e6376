"""The one contract of a store, as typing Protocols: what every implementation offers.

Owns:
- ``EventStore``: the public read/write API of DESIGN.md §1 (append, append_batch, get,
  history, query_after, walk_ancestors, verify_receipt, close, the context manager) plus
  the gate entry points (append_effect, append_denial, append_bypass). The in-process
  ``Engine`` and the served ``Store`` both implement it; the conformance suite runs the
  same tests against both, and tests/unit/test_api_contract.py compares their signatures
  with this one.
- ``ReplayHost``: the narrow interface the replay layer (``_replay``: cursors, reactors,
  projections) needs from a store, so that it depends on this contract instead of on the
  client's internals: reads, the frontier, subscriptions, an entity's head, appends of the
  store's own allowlisted kinds, and pages in stream order. ``Store`` implements it.
- ``EventFeed``: what ``subscribe`` returns, as the replay layer uses it.

Invariants: argument names, defaults and keyword-only markers here are the public ones
(DESIGN.md §1 fixes them); an implementation may add optional arguments and methods,
never drop or rename one.
Must not import any implementation (engine, client, writer, reader): it is imported by them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, Self

from ._gates import Denial
from ._query import Region
from ._values import BatchItem, Coordinate, Event, Frontier, Kind, Page, Receipt


class EventStore(Protocol):
    """The public read/write API of one store (DESIGN.md §1)."""

    # -- writes ---------------------------------------------------------------------------
    def append(self, coord: Coordinate, kind: Kind, payload: Any, *, idempotency_key: str | bytes | None = None,
               expected_clock: int | None = None, causation_id: bytes | None = None,
               correlation_id: bytes | None = None, payload_version: int | None = None) -> Receipt: ...

    def append_batch(self, items: Sequence[BatchItem]) -> list[Receipt]: ...

    # -- gates: refusals and bypasses recorded in the entity's chain -----------------------
    def append_effect(self, coord: Coordinate, type_id: int, payload: Any, *, causation_id: bytes | None = None,
                      idempotency_key: str | bytes | None = None) -> Receipt: ...

    def append_denial(self, coord: Coordinate, denial: Denial, *, proposal_kind: Kind | None = None,
                      causation_id: bytes | None = None) -> Receipt: ...

    def append_bypass(self, item: BatchItem, reason: str, *,
                      gates: Sequence[str] = ()) -> tuple[Receipt, Receipt]: ...

    # -- reads ----------------------------------------------------------------------------
    def get(self, event_id: bytes) -> Event: ...

    def history(self, entity: str, *, after_clock: int | None = None, limit: int | None = None,
                before_clock: int | None = None, newest_first: bool = False) -> list[Event]: ...

    def query_after(self, after: int = 0, *, limit: int = 1000, entity: str | None = None,
                    scope: str | None = None, kind: Kind | None = None, kinds: Iterable[Kind] | None = None,
                    upto: int | None = None, region: Region | None = None) -> Page: ...

    def latest(self, entity: str) -> Event | None: ...

    def latest_in_scope(self, scope: str) -> Event | None: ...

    def query_scope(self, scope: str, after_position: int = 0, *, limit: int = 1000,
                    upto_position: int | None = None, region: Region | None = None) -> Page: ...

    def walk_ancestors(self, event_id: bytes, *, limit: int | None = None) -> Iterator[Event]: ...

    def verify_receipt(self, receipt: Receipt) -> bool: ...

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class EventFeed(Protocol):
    """Events as they become visible (``Store.subscribe``)."""

    def next(self, timeout: float | None = None) -> Event | None: ...

    def close(self) -> None: ...


class ReplayHost(Protocol):
    """What cursors, reactors and projections need from a store."""

    data_dir: str  # projections keep their snapshot files under it

    def get(self, event_id: bytes) -> Event: ...

    def history(self, entity: str, *, after_clock: int | None = None, limit: int | None = None,
                before_clock: int | None = None, newest_first: bool = False) -> list[Event]: ...

    def query_after(self, after: int = 0, *, limit: int = 1000, entity: str | None = None,
                    scope: str | None = None, kind: Kind | None = None, kinds: Iterable[Kind] | None = None,
                    upto: int | None = None, region: Region | None = None) -> Page: ...

    def frontier(self) -> Frontier: ...

    def subscribe(self, after: int | None = None, *, entity: str | None = None, scope: str | None = None,
                  kind: Kind | None = None, timeout: float | None = None, region: Region | None = None) -> EventFeed: ...

    def entity_head(self, entity: str) -> Event | None:
        """The newest visible event of ``entity`` (one table lookup), or None."""
        ...

    def append_store_kinds(self, items: Sequence[BatchItem]) -> list[Receipt]:
        """Append events of the store's own allowlisted reserved kinds (cursor positions,
        gate audit records) together with ordinary ones, all or nothing."""
        ...

    def stream_entries(self, after: int, limit: int, region: Region) -> tuple[list[tuple[Event, int, bool]], int]:
        """The next page in stream order as (event, stream position, last at that
        position) entries, and the last position looked at."""
        ...

    def stream_page(self, after: int, limit: int, *, entity: str | None = None, scope: str | None = None,
                    kind: Kind | None = None) -> tuple[list[Event], int]:
        """The next page in stream order (a fenced event counts where its commit stands)
        and the last sequence looked at."""
        ...
