"""Conformance of the query model (issues 14 #3 and 15 #2): one ``bp.Region`` filter for
every read — entity exact or by prefix at ``:`` boundaries, scope, kind exact / by a set /
by category, entity-clock range, an upper bound on the sequence — plus ``latest(entity)``
and ``history`` bounded on both ends, newest first, stopping at ``limit``; the same from
the in-process engine and from a served store. Bad filters are typed errors naming the
value."""

from __future__ import annotations

from typing import Any

import pytest

import batpak_mp as bp

from ._contract import KIND, OTHER_KIND, Impl, check_error

THIRD_KIND = bp.Kind(3, 1)


def _seqs(events: list[bp.Event]) -> list[int]:
    return [e.global_sequence for e in events]


# -- bad filters: typed errors, never a raw TypeError -----------------------------------------
@pytest.mark.parametrize(("kwargs", "error", "fields"), [
    ({"kind": (1, None)}, bp.InvalidKind, {"category": 1, "type_id": None,
                                            "reason": "type_id must be an int in 0..4095"}),
    ({"kind": (None, 1)}, bp.InvalidKind, {"category": None, "type_id": 1,
                                            "reason": "category must be an int in 0..15"}),
    ({"kind": "x"}, bp.InvalidArgument, {"name": "kind", "value": "x", "reason": "must be a bp.Kind"}),
    ({"kinds": [(1, "a")]}, bp.InvalidKind, {"category": 1, "type_id": "a",
                                              "reason": "type_id must be an int in 0..4095"}),
    ({"kinds": KIND}, bp.InvalidArgument, {"name": "kinds", "value": KIND,
                                           "reason": "must be a collection of bp.Kind"}),
    ({"kinds": []}, bp.InvalidArgument, {"name": "kinds", "value": [], "reason": "must name 1..4096 kinds"}),
    ({"upto": -1}, bp.InvalidArgument, {"name": "upto", "value": -1, "reason": "must be an int >= 0"}),
    ({"upto": "9"}, bp.InvalidArgument, {"name": "upto", "value": "9", "reason": "must be an int >= 0"}),
    ({"region": "all"}, bp.InvalidArgument, {"name": "region", "value": "all", "reason": "must be a bp.Region"}),
])
def test_bad_query_filters_are_typed_errors(impl: Impl, kwargs: dict[str, Any], error: type[bp.BatpakError],
                                            fields: dict[str, Any]) -> None:
    err = check_error(lambda: impl.api.query_after(0, **kwargs), error, **fields)
    assert isinstance(err, ValueError)


@pytest.mark.parametrize(("kwargs", "name", "reason"), [
    ({"clock": (5, 2)}, "clock", "last must be an int >= first, or None"),
    ({"clock": 3}, "clock", "must be a (first, last) tuple of entity clocks"),
    ({"entity": "a", "entity_prefix": "a"}, "entity_prefix", "cannot be combined with entity"),
])
def test_bad_regions_are_typed_errors(kwargs: dict[str, Any], name: str, reason: str) -> None:
    with pytest.raises(bp.InvalidArgument) as info:
        bp.Region(**kwargs)
    assert (info.value.name, info.value.reason) == (name, reason)
    with pytest.raises(bp.InvalidKind):
        bp.Region(category=16)


def test_history_bad_bounds(impl: Impl) -> None:
    check_error(lambda: impl.api.history("x", before_clock=0), bp.InvalidArgument, name="before_clock", value=0,
                reason="must be an int >= 1")
    check_error(lambda: impl.api.history("x", newest_first=1), bp.InvalidArgument,  # type: ignore[arg-type]
                name="newest_first", value=1, reason="must be a bool")


# -- latest -----------------------------------------------------------------------------------
def test_latest(impl: Impl) -> None:
    a, b = impl.coord("a"), impl.coord("b")
    assert impl.api.latest(a.entity) is None
    impl.api.append(a, KIND, 1)
    r2 = impl.api.append(a, KIND, 2)
    impl.api.append(b, KIND, 3)
    got = impl.api.latest(a.entity)
    assert got is not None and got.event_id == r2.event_id and got.payload == 2 and got.entity_clock == 2
    check_error(lambda: impl.api.latest(""), bp.InvalidCoordinate, field="entity", value="",
                reason="must not be empty")


# -- history: both ends, newest first, stops at limit -----------------------------------------
@pytest.mark.parametrize(("kwargs", "clocks"), [
    ({}, [1, 2, 3, 4, 5]),
    ({"newest_first": True}, [5, 4, 3, 2, 1]),
    ({"newest_first": True, "limit": 2}, [5, 4]),
    ({"newest_first": True, "limit": 1}, [5]),
    ({"limit": 2}, [1, 2]),
    ({"before_clock": 4}, [1, 2, 3]),
    ({"before_clock": 4, "newest_first": True, "limit": 2}, [3, 2]),
    ({"after_clock": 1, "before_clock": 4}, [2, 3]),
    ({"after_clock": 3, "before_clock": 4}, []),
    ({"after_clock": 2, "newest_first": True}, [5, 4, 3]),
    ({"newest_first": True, "limit": 0}, []),
])
def test_history_bounds(impl: Impl, kwargs: dict[str, Any], clocks: list[int]) -> None:
    a, other = impl.coord("a"), impl.coord("o")
    for i in range(1, 6):
        impl.api.append(a, KIND, i)
        impl.api.append(other, KIND, i)
    got = impl.api.history(a.entity, **kwargs)
    assert [e.entity_clock for e in got] == clocks
    assert [e.payload for e in got] == clocks


# -- query_after: kinds, category, upto, prefix, clock range ----------------------------------
def _mixed(impl: Impl) -> tuple[int, bp.Coordinate, list[bp.Receipt]]:
    """Six events: order:1 KIND, order:1:line OTHER, order:12 KIND, order:1 THIRD, order OTHER,
    order:1:line KIND (entities share a tag, so the test's prefixes are its own)."""
    start = impl.visible()
    base = impl.coord("order")
    scope = base.scope
    ents = [f"{base.entity}:1", f"{base.entity}:1:line", f"{base.entity}:12", f"{base.entity}:1",
            base.entity, f"{base.entity}:1:line"]
    kinds = [KIND, OTHER_KIND, KIND, THIRD_KIND, OTHER_KIND, KIND]
    rs = [impl.api.append(bp.Coordinate(e, scope), k, i) for i, (e, k) in enumerate(zip(ents, kinds, strict=True))]
    return start, base, rs


def _rel(start: int, events: list[bp.Event]) -> list[int]:
    return [e.global_sequence - start for e in events]


def test_query_after_by_a_set_of_kinds_and_category(impl: Impl) -> None:
    start, base, _ = _mixed(impl)
    q = impl.api.query_after
    assert _rel(start, q(start, scope=base.scope, kinds=[OTHER_KIND, THIRD_KIND]).events) == [2, 4, 5]
    assert _rel(start, q(start, scope=base.scope, kinds={KIND}).events) == [1, 3, 6]
    assert _rel(start, q(start, region=bp.Region(scope=base.scope, category=3)).events) == [4]
    # kind and kinds together: both must hold
    assert _rel(start, q(start, scope=base.scope, kind=KIND, kinds=[KIND, OTHER_KIND]).events) == [1, 3, 6]


def test_query_after_upto(impl: Impl) -> None:
    start, base, _ = _mixed(impl)
    page = impl.api.query_after(start, scope=base.scope, upto=start + 3)
    assert _rel(start, page.events) == [1, 2, 3]
    assert page.next_after == start + 3  # resumable at the bound
    assert impl.api.query_after(start + 3, scope=base.scope, upto=start + 3).events == []
    page = impl.api.query_after(start, scope=base.scope, kinds=[KIND], upto=start + 5, limit=1)
    assert _rel(start, page.events) == [1] and page.next_after == start + 1


def test_query_after_entity_prefix_at_colon_boundaries(impl: Impl) -> None:
    start, base, _ = _mixed(impl)
    q = impl.api.query_after
    assert _rel(start, q(start, region=bp.Region(entity_prefix=f"{base.entity}:1")).events) == [1, 2, 4, 6]
    assert _rel(start, q(start, region=bp.Region(entity_prefix=base.entity)).events) == [1, 2, 3, 4, 5, 6]
    assert _rel(start, q(start, region=bp.Region(entity_prefix=f"{base.entity}:1:line")).events) == [2, 6]
    assert q(start, region=bp.Region(entity_prefix=f"{base.entity}:")).events == []  # "x:" is no entity's prefix
    # a prefix with a kind set, and a limit: the page resumes where it stopped
    page = q(start, limit=1, region=bp.Region(entity_prefix=f"{base.entity}:1", kinds=frozenset({KIND})))
    assert _rel(start, page.events) == [1]
    page = q(page.next_after, limit=5, region=bp.Region(entity_prefix=f"{base.entity}:1", kinds=frozenset({KIND})))
    assert _rel(start, page.events) == [6]


def test_query_after_clock_range_and_exact_entity(impl: Impl) -> None:
    a = impl.coord("a")
    start = impl.visible()
    for i in range(6):
        impl.api.append(a, KIND, i)
        impl.api.append(impl.coord("noise"), KIND, i)
    got = impl.api.query_after(start, region=bp.Region(entity=a.entity, clock=(2, 4))).events
    assert [e.entity_clock for e in got] == [2, 3, 4]
    got = impl.api.query_after(start, region=bp.Region(scope=a.scope, clock=(5, None))).events
    assert [e.entity_clock for e in got] == [5, 6]
    page = impl.api.query_after(start, entity=a.entity, limit=2)
    assert [e.entity_clock for e in page.events] == [1, 2] and page.next_after == page.events[-1].global_sequence
    page = impl.api.query_after(page.next_after, entity=a.entity, limit=10)
    assert [e.entity_clock for e in page.events] == [3, 4, 5, 6]


def test_region_keywords_merge_and_must_agree(impl: Impl) -> None:
    start, base, _ = _mixed(impl)
    region = bp.Region(scope=base.scope)
    assert _rel(start, impl.api.query_after(start, region=region, kind=OTHER_KIND).events) == [2, 5]
    assert _rel(start, impl.api.query_after(start, region=region.with_upto(start + 2), upto=start + 4).events) == [1, 2]
    check_error(lambda: impl.api.query_after(start, region=region, scope="elsewhere"), bp.InvalidArgument,
                name="scope", value="elsewhere", reason=f"disagrees with the region's {base.scope!r}")


def test_region_identity_is_spelling_free() -> None:
    assert bp.Region(kinds=frozenset({KIND, OTHER_KIND})).identity() == bp.Region(kinds=[OTHER_KIND, KIND]).identity()  # type: ignore[arg-type]
    assert bp.Region(kind=KIND).identity() == bp.Region(kinds=[KIND]).identity()  # type: ignore[arg-type]
    assert bp.Region(scope="a").identity() != bp.Region(scope="b").identity()
