"""Conformance of the read calls: ``get``, ``history``, ``query_after``,
``walk_ancestors`` and ``verify_receipt``, the same from the in-process engine and
from a served store (DESIGN.md §1)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

import batpak_mp as bp

from ._contract import KIND, OTHER_KIND, Impl, Shapes, check_error, event_at

UNKNOWN_ID = bytes(range(0xA0, 0xB0))  # 16 bytes no store hands out in these tests


# -- get --------------------------------------------------------------------------------
def test_get_unknown_id_is_not_found(impl: Impl) -> None:
    err = check_error(lambda: impl.api.get(UNKNOWN_ID), bp.NotFound, what="event", key=UNKNOWN_ID.hex())
    assert isinstance(err, KeyError)


@pytest.mark.parametrize("event_id", [b"short", UNKNOWN_ID + b"\x00", UNKNOWN_ID.hex()], ids=["short", "long", "str"])
def test_get_malformed_id(impl: Impl, event_id: Any) -> None:
    check_error(lambda: impl.api.get(event_id), bp.InvalidArgument, name="event_id", value=event_id,
                reason="must be 16 bytes")


# -- history ----------------------------------------------------------------------------
def _five_interleaved(impl: Impl) -> tuple[Shapes, bp.Coordinate, bp.Coordinate]:
    """Events 1..5 of the test: a, b, a, a, b (clocks a: 1, 2, 3; b: 1, 2)."""
    shapes = impl.shapes()
    a, b = impl.coord("a"), impl.coord("b")
    for i, c in enumerate((a, b, a, a, b), start=1):
        shapes.receipt(impl.api.append(c, KIND if c is a else OTHER_KIND, i))
    return shapes, a, b


def _expected_a(a: bp.Coordinate) -> list[dict[str, Any]]:
    return [event_at(1, a, 1, 1), event_at(3, a, 2, 3, prev="h#1"), event_at(4, a, 3, 4, prev="h#3")]


def test_history_oldest_first(impl: Impl) -> None:
    shapes, a, b = _five_interleaved(impl)
    assert shapes.events(impl.api.history(a.entity)) == _expected_a(a)
    assert shapes.events(impl.api.history(b.entity)) == [
        event_at(2, b, 1, 2, kind=OTHER_KIND), event_at(5, b, 2, 5, prev="h#2", kind=OTHER_KIND)]


@pytest.mark.parametrize(("after_clock", "limit", "picked"), [
    (None, None, [0, 1, 2]), (0, None, [0, 1, 2]), (1, None, [1, 2]), (2, None, [2]), (3, None, []), (99, None, []),
    (None, 0, []), (None, 1, [0]), (None, 2, [0, 1]), (None, 9, [0, 1, 2]), (1, 1, [1]), (1, 5, [1, 2]),
])
def test_history_after_clock_and_limit(impl: Impl, after_clock: int | None, limit: int | None, picked: list[int]) -> None:
    shapes, a, _ = _five_interleaved(impl)
    expected = _expected_a(a)
    got = impl.api.history(a.entity, after_clock=after_clock, limit=limit)
    assert shapes.events(got) == [expected[i] for i in picked]


def test_history_of_an_unknown_entity_is_empty(impl: Impl) -> None:
    assert impl.api.history(impl.coord("nobody").entity) == []
    assert impl.api.history(impl.coord("nobody").entity, after_clock=3, limit=2) == []


@pytest.mark.parametrize(("call", "error", "fields"), [
    (lambda api: api.history(""), bp.InvalidCoordinate, {"field": "entity", "value": "", "reason": "must not be empty"}),
    (lambda api: api.history("a\x01b"), bp.InvalidCoordinate,
     {"field": "entity", "value": "a\x01b", "reason": "contains a control character"}),
    (lambda api: api.history(7), bp.InvalidCoordinate, {"field": "entity", "value": 7, "reason": "must be a str"}),
    (lambda api: api.history("e", after_clock=-1), bp.InvalidArgument,
     {"name": "after_clock", "value": -1, "reason": "must be an int >= 0"}),
    (lambda api: api.history("e", limit=-1), bp.InvalidArgument, {"name": "limit", "value": -1, "reason": "must be an int >= 0"}),
    (lambda api: api.history("e", limit=1.0), bp.InvalidArgument, {"name": "limit", "value": 1.0, "reason": "must be an int >= 0"}),
], ids=["empty", "control", "not-str", "after-neg", "limit-neg", "limit-float"])
def test_history_refusals(impl: Impl, call: Any, error: type[bp.BatpakError], fields: dict[str, Any]) -> None:
    check_error(lambda: call(impl.api), error, **fields)


# -- query_after ------------------------------------------------------------------------
def _mixed_log(impl: Impl) -> tuple[Shapes, list[dict[str, Any]], bp.Coordinate, bp.Coordinate, bp.Coordinate]:
    """Events 1..6 of the test over entities a, b and two scopes, two kinds; returns
    their expected shapes (in commit order)."""
    shapes = impl.shapes()
    a = impl.coord("a")
    b = impl.coord("b", scope=a.scope)  # same scope as a
    a2 = bp.Coordinate(a.entity, f"{a.scope}-other")  # a's chain, another scope
    plan = [(a, KIND), (b, KIND), (a2, OTHER_KIND), (b, OTHER_KIND), (a, KIND), (b, KIND)]
    expected: list[dict[str, Any]] = []
    clocks: dict[str, int] = {}
    last: dict[str, int] = {}
    for n, (c, kind) in enumerate(plan, start=1):
        shapes.receipt(impl.api.append(c, kind, {"n": n}))
        clocks[c.entity] = clocks.get(c.entity, 0) + 1
        prev = f"h#{last[c.entity]}" if c.entity in last else "zero"
        expected.append(event_at(n, c, clocks[c.entity], {"n": n}, prev, kind=kind))
        last[c.entity] = n
    return shapes, expected, a, b, a2


def test_query_after_commit_order(impl: Impl) -> None:
    shapes, expected, *_ = _mixed_log(impl)
    assert shapes.page(impl.api.query_after(shapes.start)) == {"events": expected, "next_after": 6}
    assert shapes.page(impl.api.query_after(shapes.start + 4)) == {"events": expected[4:], "next_after": 6}
    assert shapes.page(impl.api.query_after(shapes.start, limit=2)) == {"events": expected[:2], "next_after": 2}


@pytest.mark.parametrize(("filters", "picked"), [
    ({"entity": "a"}, [0, 2, 4]),
    ({"entity": "b"}, [1, 3, 5]),
    ({"scope": "a"}, [0, 1, 3, 4, 5]),
    ({"scope": "a2"}, [2]),
    ({"kind": KIND}, [0, 1, 4, 5]),
    ({"kind": OTHER_KIND}, [2, 3]),
    ({"entity": "a", "scope": "a"}, [0, 4]),
    ({"entity": "b", "kind": OTHER_KIND}, [3]),
    ({"entity": "a", "scope": "a2", "kind": KIND}, []),
])
@pytest.mark.parametrize("limit", [1, 2, 1000])
def test_query_after_filters_and_resuming(impl: Impl, filters: dict[str, Any], picked: list[int], limit: int) -> None:
    """Paging with ``next_after`` yields exactly the matching events, each once, in order."""
    shapes, expected, a, b, a2 = _mixed_log(impl)
    names = {"a": a, "b": b, "a2": a2}
    kwargs: dict[str, Any] = {}
    if "entity" in filters:
        kwargs["entity"] = names[filters["entity"]].entity
    if "scope" in filters:
        kwargs["scope"] = names[filters["scope"]].scope
    if "kind" in filters:
        kwargs["kind"] = filters["kind"]
    got: list[dict[str, Any]] = []
    after = shapes.start
    while True:
        page = impl.api.query_after(after, limit=limit, **kwargs)
        got += shapes.events(page.events)
        if not page.events:
            break
        assert len(page.events) <= limit
        if len(page.events) == limit:  # a full page resumes right after its last event
            assert page.next_after == page.events[-1].global_sequence
        after = page.next_after
    assert shapes.seq(page.next_after) == 6  # the last page ends at the end of the log
    assert got == [expected[i] for i in picked]


def test_query_after_the_end(impl: Impl) -> None:
    shapes, *_ = _mixed_log(impl)
    end = shapes.start + 6
    page = impl.api.query_after(end)
    assert (page.events, page.next_after) == ([], end)
    far = impl.api.query_after(end + 1000)
    assert (far.events, far.next_after) == ([], end + 1000)
    none = impl.api.query_after(shapes.start, entity=impl.coord("nobody").entity)
    assert (none.events, none.next_after) == ([], end)  # nothing matched: resume after what was scanned


@pytest.mark.parametrize(("kwargs", "error", "fields"), [
    ({"after": -1}, bp.InvalidArgument, {"name": "after", "value": -1, "reason": "must be an int >= 0"}),
    ({"after": "0"}, bp.InvalidArgument, {"name": "after", "value": "0", "reason": "must be an int >= 0"}),
    ({"limit": 0}, bp.InvalidArgument, {"name": "limit", "value": 0, "reason": "must be an int >= 1"}),
    ({"limit": None}, bp.InvalidArgument, {"name": "limit", "value": None, "reason": "must be an int >= 1"}),
    ({"entity": ""}, bp.InvalidCoordinate, {"field": "entity", "value": "", "reason": "must not be empty"}),
    ({"scope": "\x00"}, bp.InvalidCoordinate, {"field": "scope", "value": "\x00", "reason": "contains a control character"}),
    ({"kind": "1:7"}, bp.InvalidArgument, {"name": "kind", "value": "1:7", "reason": "must be a bp.Kind"}),
], ids=["after-neg", "after-str", "limit-0", "limit-none", "entity-empty", "scope-control", "kind-str"])
def test_query_after_refusals(impl: Impl, kwargs: dict[str, Any], error: type[bp.BatpakError],
                              fields: dict[str, Any]) -> None:
    check_error(lambda: impl.api.query_after(**kwargs), error, **fields)


@pytest.mark.parametrize("kind", [bp.Kind(16, 1), bp.Kind(1, 4096)], ids=["category-16", "type-4096"])
def test_query_after_refuses_an_invalid_kind(impl: Impl, kind: bp.Kind) -> None:
    check_error(lambda: impl.api.query_after(0, kind=kind), bp.InvalidKind, category=kind[0], type_id=kind[1],
                reason=f"{'category must be an int in 0..15' if kind[0] > 15 else 'type_id must be an int in 0..4095'}")


# -- walk_ancestors ---------------------------------------------------------------------
def test_walk_ancestors_newest_first(impl: Impl) -> None:
    shapes, a, _ = _five_interleaved(impl)
    expected = _expected_a(a)
    head = impl.api.history(a.entity)[-1]
    walked = list(impl.api.walk_ancestors(head.event_id))
    assert shapes.events(walked) == expected[::-1]
    for newer, older in itertools.pairwise(walked):
        assert newer.prev_hash == older.event_hash
    assert walked[-1].prev_hash == bytes(32)


@pytest.mark.parametrize(("start_at", "limit", "picked"), [
    (2, None, [2, 1, 0]), (2, 0, []), (2, 1, [2]), (2, 2, [2, 1]), (2, 3, [2, 1, 0]), (2, 10, [2, 1, 0]),
    (1, None, [1, 0]), (0, None, [0]), (0, 5, [0]),
])
def test_walk_ancestors_from_and_limit(impl: Impl, start_at: int, limit: int | None, picked: list[int]) -> None:
    shapes, a, _ = _five_interleaved(impl)
    expected = _expected_a(a)
    start_id = impl.api.history(a.entity)[start_at].event_id
    walked = list(impl.api.walk_ancestors(start_id, limit=limit))
    assert shapes.events(walked) == [expected[i] for i in picked]


@pytest.mark.parametrize(("event_id", "limit", "error", "fields"), [
    (UNKNOWN_ID, None, bp.NotFound, {"what": "event", "key": UNKNOWN_ID.hex()}),
    (b"short", None, bp.InvalidArgument, {"name": "event_id", "value": b"short", "reason": "must be 16 bytes"}),
    (UNKNOWN_ID, -1, bp.InvalidArgument, {"name": "limit", "value": -1, "reason": "must be an int >= 0"}),
], ids=["unknown", "malformed", "limit-neg"])
def test_walk_ancestors_refuses_at_the_call(impl: Impl, event_id: bytes, limit: int | None,
                                            error: type[bp.BatpakError], fields: dict[str, Any]) -> None:
    check_error(lambda: impl.api.walk_ancestors(event_id, limit=limit), error, **fields)


@pytest.mark.parametrize(("event_id", "limit", "error", "fields"), [
    (UNKNOWN_ID, None, bp.NotFound, {"what": "event", "key": UNKNOWN_ID.hex()}),
    (b"short", None, bp.InvalidArgument, {"name": "event_id", "value": b"short", "reason": "must be 16 bytes"}),
    (UNKNOWN_ID, -1, bp.InvalidArgument, {"name": "limit", "value": -1, "reason": "must be an int >= 0"}),
], ids=["unknown", "malformed", "limit-neg"])
def test_walk_ancestors_refusals(impl: Impl, event_id: bytes, limit: int | None,
                                 error: type[bp.BatpakError], fields: dict[str, Any]) -> None:
    check_error(lambda: list(impl.api.walk_ancestors(event_id, limit=limit)), error, **fields)


# -- verify_receipt ---------------------------------------------------------------------
def test_verify_receipt_true_for_every_way_to_get_one(impl: Impl) -> None:
    api = impl.api
    c = impl.coord()
    single = api.append(c, KIND, 1, idempotency_key=f"k-{c.entity}")
    batch = api.append_batch([bp.BatchItem(c, KIND, 2), bp.BatchItem(impl.coord(), KIND, 3)])
    resent = api.append(c, KIND, 1, idempotency_key=f"k-{c.entity}")
    for r in [single, *batch, resent]:
        assert api.verify_receipt(r) is True


_CHANGES: dict[str, Any] = {
    "event_id": lambda r: UNKNOWN_ID,
    "event_id_other": None,  # the id of another stored event
    "global_sequence": lambda r: r.global_sequence + 1,
    "entity": lambda r: r.entity + "x",
    "scope": lambda r: r.scope + "x",
    "entity_clock": lambda r: r.entity_clock + 1,
    "event_hash": lambda r: bytes([r.event_hash[0] ^ 1]) + r.event_hash[1:],
    "prev_hash": lambda r: b"\x01" * 32,
    "wall_ms": lambda r: r.wall_ms - 1,
}


@pytest.mark.parametrize("field", list(_CHANGES))
def test_verify_receipt_false_when_one_field_changes(impl: Impl, field: str) -> None:
    api = impl.api
    c = impl.coord()
    other = api.append(c, KIND, 0)
    r = api.append(c, KIND, 1)
    change = _CHANGES[field]
    forged = r._replace(event_id=other.event_id) if change is None else r._replace(**{field: change(r)})
    assert forged != r
    assert api.verify_receipt(forged) is False
    assert api.verify_receipt(r) is True
