"""Conformance of ``append_batch``: all or nothing across entities, guards inside one
batch, whole-batch deduplication, and every refusal, the same from the in-process
engine and from a served store (DESIGN.md §1)."""

from __future__ import annotations

from typing import Any

import pytest

import batpak_mp as bp

from ._contract import (
    KIND,
    OTHER_KIND,
    PAYLOAD_LIMIT,
    Has,
    Impl,
    check_error,
    event_at,
    packb,
    receipt_at,
)


def test_batch_across_entities(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    a, b = impl.coord("a"), impl.coord("b")
    correlation = b"\x07" * 16
    rs = api.append_batch([
        bp.BatchItem(a, KIND, {"i": 0}),
        bp.BatchItem(b, OTHER_KIND, b"one", correlation_id=correlation),
        bp.BatchItem(a, KIND, None, expected_clock=1, payload_version=2),
    ])
    assert shapes.receipts(rs) == [receipt_at(1, a, 1), receipt_at(2, b, 1), receipt_at(3, a, 2, prev="h#1")]
    assert impl.visible() == shapes.start + 3
    assert shapes.events([api.get(r.event_id) for r in rs]) == [
        event_at(1, a, 1, {"i": 0}),
        event_at(2, b, 1, b"one", kind=OTHER_KIND, correlation_id=correlation.hex()),
        event_at(3, a, 2, None, prev="h#1", payload_version=2),
    ]


def test_single_item_batch_is_an_append(impl: Impl) -> None:
    shapes = impl.shapes()
    c = impl.coord()
    (r,) = impl.api.append_batch([bp.BatchItem(c, KIND, "only")])
    assert shapes.receipt(r) == receipt_at(1, c, 1)


def test_causation_inside_a_batch(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    cause = api.append(c, KIND, "cause")
    rs = api.append_batch([bp.BatchItem(c, KIND, "e1", causation_id=cause.event_id),
                           bp.BatchItem(c, KIND, "e2", causation_id=cause.event_id)])
    shapes.receipt(cause)
    assert shapes.events([api.get(r.event_id) for r in rs]) == [
        event_at(2, c, 2, "e1", prev="h#1", causation_id="#1"),
        event_at(3, c, 3, "e2", prev="h#2", causation_id="#1"),
    ]


def test_expected_clocks_count_earlier_items_of_the_batch(impl: Impl) -> None:
    shapes = impl.shapes()
    c = impl.coord()
    rs = impl.api.append_batch([bp.BatchItem(c, KIND, i, expected_clock=i) for i in range(3)])
    assert shapes.receipts(rs) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1"), receipt_at(3, c, 3, prev="h#2")]


@pytest.mark.parametrize("where", ["first", "last"])
def test_one_conflict_writes_nothing(impl: Impl, where: str) -> None:
    api = impl.api
    a, b = impl.coord("a"), impl.coord("b")
    api.append(b, KIND, "existing")
    start = impl.visible()
    bad = bp.BatchItem(b, KIND, "stale", expected_clock=0)
    good = [bp.BatchItem(a, KIND, i) for i in range(3)]
    items = [bad, *good] if where == "first" else [*good, bad]
    check_error(lambda: api.append_batch(items), bp.ConcurrencyConflict, entity=b.entity, expected=0, actual=1,
                conflicts=((b.entity, 0, 1),))
    assert impl.visible() == start
    assert api.history(a.entity) == []
    assert [e.payload for e in api.history(b.entity)] == ["existing"]


def test_conflict_with_an_earlier_item_of_the_batch(impl: Impl) -> None:
    c = impl.coord()
    start = impl.visible()
    items = [bp.BatchItem(c, KIND, 1, expected_clock=0), bp.BatchItem(c, KIND, 2, expected_clock=0)]
    check_error(lambda: impl.api.append_batch(items), bp.ConcurrencyConflict, entity=c.entity, expected=0, actual=1,
                conflicts=((c.entity, 0, 1),))
    assert impl.visible() == start


def test_a_refused_batch_does_not_use_up_its_keys(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    items = [bp.BatchItem(c, KIND, 1, idempotency_key=f"a-{c.entity}"),
             bp.BatchItem(c, KIND, 2, idempotency_key=f"b-{c.entity}", expected_clock=5)]
    check_error(lambda: api.append_batch(items), bp.ConcurrencyConflict, entity=c.entity, expected=5, actual=1,
                conflicts=((c.entity, 5, 1),))
    rs = api.append_batch([items[0], bp.BatchItem(c, KIND, 2, idempotency_key=f"b-{c.entity}", expected_clock=1)])
    assert shapes.receipts(rs) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1")]


def test_whole_batch_resent_is_deduplicated(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    a, b = impl.coord("a"), impl.coord("b")
    items = [bp.BatchItem(a, KIND, 1, idempotency_key=f"k1-{a.entity}"),
             bp.BatchItem(b, KIND, 2, idempotency_key=f"k2-{a.entity}".encode())]
    first = api.append_batch(items)
    again = api.append_batch(items)
    assert all(r.deduplicated for r in again) and [r._replace(deduplicated=False) for r in again] == first
    assert shapes.receipts(again) == [receipt_at(1, a, 1), receipt_at(2, b, 1)]
    assert impl.visible() == shapes.start + 2


def test_batch_of_keys_committed_one_by_one_returns_the_originals(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    singles = [api.append(c, KIND, i, idempotency_key=f"k{i}-{c.entity}") for i in range(2)]
    batch = api.append_batch([bp.BatchItem(c, KIND, i, idempotency_key=f"k{i}-{c.entity}") for i in range(2)])
    assert [r._replace(deduplicated=False) for r in batch] == singles
    assert shapes.receipts(batch) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1")]
    assert impl.visible() == shapes.start + 2


@pytest.mark.parametrize("unseen_key", [True, False], ids=["unseen-key", "no-key"])
def test_mixed_seen_and_unseen_keys_are_refused(impl: Impl, unseen_key: bool) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    seen = api.append(c, KIND, "seen", idempotency_key=f"seen-{c.entity}")
    fresh_key = f"fresh-{c.entity}" if unseen_key else None
    items = [bp.BatchItem(c, KIND, "again", idempotency_key=f"seen-{c.entity}"),
             bp.BatchItem(c, KIND, "new", idempotency_key=fresh_key)]
    check_error(lambda: api.append_batch(items), bp.InvalidArgument, name="idempotency_key", value=None,
                reason="some keys of this batch were committed before and some not")
    assert impl.visible() == shapes.start + 1
    assert shapes.receipt(seen) == receipt_at(1, c, 1)
    later = api.append(c, KIND, "new", idempotency_key=fresh_key)  # the unseen key was not used up
    assert shapes.receipt(later) == receipt_at(2, c, 2, prev="h#1")


def test_same_key_twice_in_one_batch_is_refused(impl: Impl) -> None:
    c = impl.coord()
    start = impl.visible()
    items = [bp.BatchItem(c, KIND, i, idempotency_key=f"twice-{c.entity}") for i in range(2)]
    check_error(lambda: impl.api.append_batch(items), bp.InvalidArgument, name="idempotency_key", value=None,
                reason="the same key appears twice in one batch")
    assert impl.visible() == start


def test_empty_batch_is_refused(impl: Impl) -> None:
    start = impl.visible()
    check_error(lambda: impl.api.append_batch([]), bp.InvalidArgument, name="items", value=[],
                reason="a batch needs at least one event")
    assert impl.visible() == start


@pytest.mark.parametrize(("items", "name", "value", "reason"), [
    (None, "items", None, "must be a sequence of bp.BatchItem"),
    ("abc", "items", "abc", "must be a sequence of bp.BatchItem"),
    ([1], "items[0]", 1, "must be a bp.BatchItem"),
], ids=["none", "str", "not-an-item"])
def test_not_a_batch_is_refused(impl: Impl, items: Any, name: str, value: Any, reason: str) -> None:
    start = impl.visible()
    check_error(lambda: impl.api.append_batch(items), bp.InvalidArgument, name=name, value=value, reason=reason)
    assert impl.visible() == start


def test_too_many_events_are_refused(impl: Impl) -> None:
    c = impl.coord()
    start = impl.visible()
    items = [bp.BatchItem(c, KIND, None)] * 10_001  # DESIGN §3: batches up to 10,000 events
    check_error(lambda: impl.api.append_batch(items), bp.InvalidArgument, name="items", value=10_001,
                reason="a batch holds at most 10000 events")
    assert impl.visible() == start


def test_reserved_kind_in_a_batch_writes_nothing(impl: Impl) -> None:
    c = impl.coord()
    start = impl.visible()
    items = [bp.BatchItem(c, KIND, 1), bp.BatchItem(c, bp.Kind(0xD, 1), {"gate": "g", "code": "c", "message": ""})]
    check_error(lambda: impl.api.append_batch(items), bp.ReservedKind, category=0xD, type_id=1,
                reason="category 0xd is reserved for the store")
    assert impl.visible() == start


def test_bad_item_in_a_batch_writes_nothing(impl: Impl) -> None:
    api = impl.api
    c = impl.coord()
    start = impl.visible()
    big = b"x" * PAYLOAD_LIMIT
    check_error(lambda: api.append_batch([bp.BatchItem(c, KIND, 1), bp.BatchItem(c, KIND, big)]),
                bp.PayloadTooLarge, size=len(packb(big)), limit=PAYLOAD_LIMIT, what="payload")
    check_error(lambda: api.append_batch([bp.BatchItem(c, KIND, 1), bp.BatchItem(c, KIND, {1, 2})]),
                bp.InvalidPayload, reason=Has("set"))
    check_error(lambda: api.append_batch([bp.BatchItem(c, KIND, 1), bp.BatchItem(c, KIND, 2, expected_clock=-1)]),
                bp.InvalidArgument, name="expected_clock", value=-1, reason="must be an int >= 0")
    assert impl.visible() == start
    assert api.history(c.entity) == []
