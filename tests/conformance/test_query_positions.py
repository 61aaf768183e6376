"""Conformance of per-scope positions (issue 15 #2): every event gets a gap-free position
in its scope, 1, 2, 3, ... whatever else the log holds (other scopes, the store's own
system events), readable as ``Event.scope_position`` and read by position with
``query_scope``; ``latest_in_scope`` is the scope's newest event. The same from the
in-process engine and a served store. (Fences: tests/multiprocess/test_scope_positions.py.)"""

from __future__ import annotations

import pytest

import batpak_mp as bp

from ._contract import KIND, OTHER_KIND, Impl, check_error


def _positions(events: list[bp.Event]) -> list[int | None]:
    return [e.scope_position for e in events]


def test_positions_start_at_one_and_have_no_gaps(impl: Impl) -> None:
    a, b = impl.coord("a"), impl.coord("b")
    a2 = bp.Coordinate(a.entity + "-2", a.scope)  # another entity of a's scope
    assert impl.api.latest_in_scope(a.scope) is None
    receipts = [impl.api.append(c, KIND, i) for i, c in enumerate((a, b, a2, b, a, a2))]
    got = [impl.api.get(r.event_id) for r in receipts]
    assert _positions(got) == [1, 1, 2, 2, 3, 4]
    assert _positions(impl.api.history(a.entity)) == [1, 3]
    assert _positions(impl.api.query_after(receipts[0].global_sequence - 1, scope=b.scope).events) == [1, 2]
    newest = impl.api.latest_in_scope(a.scope)
    assert newest is not None and newest.event_id == receipts[5].event_id and newest.scope_position == 4


def test_query_scope_by_position(impl: Impl) -> None:
    a, noise = impl.coord("a"), impl.coord("noise")
    for i in range(1, 8):
        impl.api.append(a, KIND if i % 2 else OTHER_KIND, i)
        impl.api.append(noise, KIND, i)
    page = impl.api.query_scope(a.scope)
    assert [e.payload for e in page.events] == [1, 2, 3, 4, 5, 6, 7] and page.next_after == 7
    page = impl.api.query_scope(a.scope, 2, limit=3)
    assert _positions(page.events) == [3, 4, 5] and page.next_after == 5
    page = impl.api.query_scope(a.scope, page.next_after, limit=3)
    assert _positions(page.events) == [6, 7] and page.next_after == 7
    assert impl.api.query_scope(a.scope, 7).events == []
    assert _positions(impl.api.query_scope(a.scope, 1, upto_position=3).events) == [2, 3]
    # a region filters within the scope; positions keep their numbers (the gaps are the filter's)
    page = impl.api.query_scope(a.scope, 0, limit=2, region=bp.Region(kind=OTHER_KIND))
    assert _positions(page.events) == [2, 4] and page.next_after == 4
    assert impl.api.query_scope("no-such-scope-" + a.scope).events == []


def test_positions_over_a_long_scope(impl: Impl) -> None:
    """Seeks land exactly at every kind of position (the skip links are taken, not walked)."""
    a, noise = impl.coord("a"), impl.coord("noise")
    n = 1500
    for start in range(0, n, 500):
        impl.api.append_batch([bp.BatchItem(a if i % 3 else noise, KIND, i) for i in range(start, start + 500)]
                              + [bp.BatchItem(a, KIND, -1)])
    total = n - n // 3 + 3
    newest = impl.api.latest_in_scope(a.scope)
    assert newest is not None and newest.scope_position == total
    for after in (0, 1, 2, 63, 64, 65, 511, 512, 777, total - 2, total - 1):
        page = impl.api.query_scope(a.scope, after, limit=3)
        assert _positions(page.events) == list(range(after + 1, min(after + 3, total) + 1)), after


@pytest.mark.parametrize(("kwargs", "name", "value", "reason"), [
    ({"after_position": -1}, "after_position", -1, "must be an int >= 0"),
    ({"limit": 0}, "limit", 0, "must be an int >= 1"),
    ({"upto_position": "3"}, "upto_position", "3", "must be an int >= 0"),
    ({"region": 5}, "region", 5, "must be a bp.Region"),
])
def test_query_scope_bad_arguments(impl: Impl, kwargs: dict[str, object], name: str, value: object,
                                   reason: str) -> None:
    check_error(lambda: impl.api.query_scope("s", **kwargs), bp.InvalidArgument,  # type: ignore[arg-type]
                name=name, value=value, reason=reason)
