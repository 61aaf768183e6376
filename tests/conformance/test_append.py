"""Conformance of ``append``: receipts, payloads, idempotency keys, expected clocks,
causal links, payload versions and every refusal, the same from the in-process engine
and from a served store (DESIGN.md §1, §2.3-2.4)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import batpak_mp as bp

from ._contract import KIND, PAYLOAD_LIMIT, Has, Impl, check_error, event_at, packb, receipt_at


def test_receipts_and_events_chain_per_entity(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    a, b = impl.coord("a"), impl.coord("b")
    r1 = api.append(a, KIND, {"x": 10, "y": 20})
    r2 = api.append(b, KIND, "second")
    r3 = api.append(a, KIND, [3])
    assert shapes.receipts([r1, r2, r3]) == [
        receipt_at(1, a, 1),
        receipt_at(2, b, 1),
        receipt_at(3, a, 2, prev="h#1"),
    ]
    assert impl.visible() == shapes.start + 3
    events = [api.get(r.event_id) for r in (r1, r2, r3)]
    assert shapes.events(events) == [
        event_at(1, a, 1, {"x": 10, "y": 20}),
        event_at(2, b, 1, "second"),
        event_at(3, a, 2, [3], prev="h#1"),
    ]
    assert [e.wall_ms for e in events] == [r.wall_ms for r in (r1, r2, r3)]


PAYLOADS: list[tuple[str, Any, Any]] = [  # (id, payload given, payload read back)
    ("nested", {"a": [1, {"b": b"\x00\xff", "c": None}], "s": "é✓", "t": True, "f": 1.5},
     {"a": [1, {"b": b"\x00\xff", "c": None}], "s": "é✓", "t": True, "f": 1.5}),
    ("list", [1, "two", b"3", [4, [5]], {}], [1, "two", b"3", [4, [5]], {}]),
    ("bytes", b"\x00raw\xff" * 10, b"\x00raw\xff" * 10),
    ("str", "plain text", "plain text"),
    ("empty-str", "", ""),
    ("int-min", -(2**63), -(2**63)),
    ("int-max", 2**64 - 1, 2**64 - 1),
    ("zero", 0, 0),
    ("none", None, None),
    ("false", False, False),
    ("tuple", (1, (2, 3)), [1, [2, 3]]),  # msgpack has no tuple: read back as lists
    ("empty-map", {}, {}),
    ("bytes-key", {b"k": 1}, {b"k": 1}),
]


@pytest.mark.parametrize(("given", "read"), [p[1:] for p in PAYLOADS], ids=[p[0] for p in PAYLOADS])
def test_payload_round_trip(impl: Impl, given: Any, read: Any) -> None:
    shapes = impl.shapes()
    c = impl.coord()
    r = impl.api.append(c, KIND, given)
    assert shapes.event(impl.api.get(r.event_id)) == event_at(1, c, 1, read, payload_bytes=packb(given))


def test_payload_map_with_int_keys(impl: Impl) -> None:
    shapes = impl.shapes()
    c = impl.coord()
    r = impl.api.append(c, KIND, {1: "one", -2: ["two"]})
    assert shapes.event(impl.api.get(r.event_id)) == event_at(1, c, 1, {1: "one", -2: ["two"]})


@pytest.mark.parametrize("key", ["order-1", b"order-1\x00\xff", "k" * 1024], ids=["str", "bytes", "str-1024"])
def test_duplicate_key_returns_original_and_writes_nothing(impl: Impl, key: str | bytes) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    first = api.append(c, KIND, {"n": 1}, idempotency_key=key)
    again = api.append(c, KIND, {"n": 1}, idempotency_key=key)
    assert again.deduplicated and not first.deduplicated
    assert again._replace(deduplicated=False) == first
    assert shapes.receipts([first, again]) == [receipt_at(1, c, 1)] * 2
    assert impl.visible() == shapes.start + 1
    assert [e.payload for e in api.history(c.entity)] == [{"n": 1}]


def test_key_kind_is_part_of_the_key(impl: Impl) -> None:
    """A str key and the bytes of the same text are two keys (both implementations agree)."""
    shapes = impl.shapes()
    c = impl.coord()
    rs = [impl.api.append(c, KIND, 1, idempotency_key=key) for key in ("k", b"k")]
    assert shapes.receipts(rs) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1")]


def test_duplicate_key_on_another_coordinate_is_refused(impl: Impl) -> None:
    """A key re-used for another request (here another entity) is an IdempotencyConflict
    naming the stored event (issue 15 #2); nothing is written."""
    api = impl.api
    a, b = impl.coord("a"), impl.coord("b")
    first = api.append(a, KIND, 1, idempotency_key=f"dup-{a.entity}")
    start = impl.visible()
    err = check_error(lambda: api.append(b, KIND, 1, idempotency_key=f"dup-{a.entity}"), bp.IdempotencyConflict,
                      key=Has(""), sequence=first.global_sequence, field="entity")
    assert isinstance(err, ValueError)
    assert impl.visible() == start
    assert api.history(b.entity) == []


def test_no_key_appends_every_time(impl: Impl) -> None:
    shapes = impl.shapes()
    c = impl.coord()
    rs = [impl.api.append(c, KIND, "same") for _ in range(2)]
    assert shapes.receipts(rs) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1")]


def test_expected_clock_met(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    r1 = api.append(c, KIND, 1, expected_clock=0)
    r2 = api.append(c, KIND, 2, expected_clock=1)
    assert shapes.receipts([r1, r2]) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1")]


def test_expected_clock_conflict_writes_nothing(impl: Impl) -> None:
    api = impl.api
    c, fresh = impl.coord(), impl.coord("fresh")
    api.append(c, KIND, 1)
    api.append(c, KIND, 2)
    start = impl.visible()
    check_error(lambda: api.append(c, KIND, 3, expected_clock=1), bp.ConcurrencyConflict,
                entity=c.entity, expected=1, actual=2, conflicts=((c.entity, 1, 2),))
    check_error(lambda: api.append(fresh, KIND, 3, expected_clock=3), bp.ConcurrencyConflict,
                entity=fresh.entity, expected=3, actual=0, conflicts=((fresh.entity, 3, 0),))
    assert impl.visible() == start
    assert [e.entity_clock for e in api.history(c.entity)] == [1, 2]
    assert api.history(fresh.entity) == []


def test_conflict_does_not_use_up_the_key(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    key = f"retry-{c.entity}"
    check_error(lambda: api.append(c, KIND, 1, idempotency_key=key, expected_clock=1), bp.ConcurrencyConflict,
                entity=c.entity, expected=1, actual=0, conflicts=((c.entity, 1, 0),))
    r = api.append(c, KIND, 1, idempotency_key=key, expected_clock=0)
    assert shapes.receipt(r) == receipt_at(1, c, 1)


def test_duplicate_key_answers_before_the_clock_guard(impl: Impl) -> None:
    """A re-sent request whose clock has moved on since gets its original receipt."""
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    first = api.append(c, KIND, 1, idempotency_key=f"k-{c.entity}", expected_clock=0)
    api.append(c, KIND, 2)
    again = api.append(c, KIND, 1, idempotency_key=f"k-{c.entity}", expected_clock=0)
    assert again.deduplicated and again._replace(deduplicated=False) == first
    assert shapes.receipt(again) == receipt_at(1, c, 1)
    assert impl.visible() == shapes.start + 2


def test_causation_and_correlation_round_trip(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    correlation = bytes(range(1, 17))  # a caller-chosen id: the same raw value in both
    cause = api.append(c, KIND, "cause", correlation_id=correlation)
    effect = api.append(c, KIND, "effect", causation_id=cause.event_id, correlation_id=correlation)
    assert shapes.events(api.history(c.entity)) == [
        event_at(1, c, 1, "cause", correlation_id=correlation.hex()),
        event_at(2, c, 2, "effect", prev="h#1", causation_id="#1", correlation_id=correlation.hex()),
    ]
    assert shapes.receipts([cause, effect]) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1")]


@pytest.mark.parametrize("kind", [bp.Kind(0, 1), bp.Kind(0, 0x010), bp.Kind(0xD, 1), bp.Kind(0xD, 2), bp.Kind(0xD, 0xFFF)],
                         ids=["system", "system-cursor-ack", "effect-denial", "effect-bypass", "effect-other"])
def test_reserved_kinds_are_refused(impl: Impl, kind: bp.Kind) -> None:
    """Categories 0x0 and 0xD are the store's, even the kinds it appends itself."""
    start = impl.visible()
    payload = {"cursor": "c", "through": 1, "gate": "g", "code": "c", "message": "", "reason": "r"}
    check_error(lambda: impl.api.append(impl.coord(), kind, payload), bp.ReservedKind,
                category=kind[0], type_id=kind[1], reason=f"category {kind[0]:#x} is reserved for the store")
    assert impl.visible() == start


@pytest.mark.parametrize(("kind", "category", "type_id", "reason"), [
    (bp.Kind(16, 1), 16, 1, "category must be an int in 0..15"),
    (bp.Kind(-1, 1), -1, 1, "category must be an int in 0..15"),
    (bp.Kind(1, 4096), 1, 4096, "type_id must be an int in 0..4095"),
    (bp.Kind(1, -1), 1, -1, "type_id must be an int in 0..4095"),
    (bp.Kind(True, 1), True, 1, "category must be an int in 0..15"),
    ((1,), (1,), None, "must be a bp.Kind(category, type_id)"),
    ("1:7", "1:7", None, "must be a bp.Kind(category, type_id)"),
], ids=["category-16", "category-neg", "type-4096", "type-neg", "category-bool", "short-tuple", "str"])
def test_invalid_kinds(impl: Impl, kind: Any, category: Any, type_id: Any, reason: str) -> None:
    start = impl.visible()
    check_error(lambda: impl.api.append(impl.coord(), kind, 1), bp.InvalidKind,
                category=category, type_id=type_id, reason=reason)
    assert impl.visible() == start


def test_invalid_coordinates(impl: Impl) -> None:
    """A bad name is refused where the coordinate is built, before either implementation;
    something that is not a Coordinate is refused by both alike."""
    for bad in ("", "bad\x00name", "x" * 1025, "\ud800"):
        with pytest.raises(bp.InvalidCoordinate):
            bp.Coordinate(bad, "scope")
        with pytest.raises(bp.InvalidCoordinate):
            bp.Coordinate("entity", bad)
    start = impl.visible()
    check_error(lambda: impl.api.append(("entity", "scope"), KIND, 1),  # type: ignore[arg-type]
                bp.InvalidArgument, name="coord", value=("entity", "scope"), reason="must be a bp.Coordinate")
    assert impl.visible() == start


@pytest.mark.parametrize("category", [True, 1.0], ids=["bool", "float"])
def test_kind_validation_does_not_depend_on_earlier_appends(impl: Impl, category: Any) -> None:
    impl.api.append(impl.coord(), bp.Kind(1, 7), 1)  # Kind(1, 7) is now known valid
    start = impl.visible()
    check_error(lambda: impl.api.append(impl.coord(), bp.Kind(category, 7), 1), bp.InvalidKind,
                category=category, type_id=7, reason="category must be an int in 0..15")
    assert impl.visible() == start


_KEY_REASON = "must be a non-empty str or bytes of at most 1024"
_ID_REASON = "must be a 16-byte event id"


@pytest.mark.parametrize(("kwargs", "name", "value", "reason"), [
    ({"expected_clock": -1}, "expected_clock", -1, "must be an int >= 0"),
    ({"expected_clock": "0"}, "expected_clock", "0", "must be an int >= 0"),
    ({"expected_clock": True}, "expected_clock", True, "must be an int >= 0"),
    ({"idempotency_key": ""}, "idempotency_key", "", _KEY_REASON),
    ({"idempotency_key": b""}, "idempotency_key", b"", _KEY_REASON),
    ({"idempotency_key": "k" * 1025}, "idempotency_key", "k" * 1025, _KEY_REASON),
    ({"idempotency_key": 7}, "idempotency_key", 7, _KEY_REASON),
    ({"causation_id": b"short"}, "causation_id", b"short", _ID_REASON),
    ({"causation_id": bytes(16)}, "causation_id", bytes(16), _ID_REASON),
    ({"causation_id": "x" * 16}, "causation_id", "x" * 16, _ID_REASON),
    ({"correlation_id": b"\x01" * 17}, "correlation_id", b"\x01" * 17, _ID_REASON),
    ({"payload_version": -1}, "payload_version", -1, "must be 0..65535"),
    ({"payload_version": 65536}, "payload_version", 65536, "must be 0..65535"),
], ids=["clock-neg", "clock-str", "clock-bool", "key-empty", "key-empty-bytes", "key-long", "key-int",
        "causation-short", "causation-zero", "causation-str", "correlation-long", "version-neg", "version-big"])
def test_invalid_arguments(impl: Impl, kwargs: dict[str, Any], name: str, value: Any, reason: str) -> None:
    start = impl.visible()
    check_error(lambda: impl.api.append(impl.coord(), KIND, 1, **kwargs), bp.InvalidArgument,
                name=name, value=value, reason=reason)
    assert impl.visible() == start


def test_payload_at_the_limit_is_accepted(impl: Impl) -> None:
    shapes = impl.shapes()
    c = impl.coord()
    payload = b"x" * (PAYLOAD_LIMIT - 3)  # msgpack bin 16: a 3-byte header
    assert len(packb(payload)) == PAYLOAD_LIMIT
    r = impl.api.append(c, KIND, payload)
    assert shapes.event(impl.api.get(r.event_id)) == event_at(1, c, 1, payload)


@pytest.mark.parametrize("payload", [b"x" * (PAYLOAD_LIMIT - 2), "y" * PAYLOAD_LIMIT, [b"z" * 1024] * 64],
                         ids=["bytes-one-over", "str", "list"])
def test_payload_too_large(impl: Impl, payload: Any) -> None:
    start = impl.visible()
    err = check_error(lambda: impl.api.append(impl.coord(), KIND, payload), bp.PayloadTooLarge,
                      size=len(packb(payload)), limit=PAYLOAD_LIMIT, what="payload")
    assert isinstance(err, ValueError)
    assert impl.visible() == start


class _Opaque:
    pass


@pytest.mark.parametrize(("payload", "reason"), [
    (_Opaque(), Has("_Opaque")),
    ({1, 2}, Has("set")),
    ({"deep": [{"x": _Opaque()}]}, Has("_Opaque")),
    (2**64, "Integer value out of range"),
    (-(2**63) - 1, "Integer value out of range"),
], ids=["object", "set", "nested-object", "int-too-big", "int-too-small"])
def test_unpackable_payload(impl: Impl, payload: Any, reason: Any) -> None:
    start = impl.visible()
    err = check_error(lambda: impl.api.append(impl.coord(), KIND, payload), bp.InvalidPayload, reason=reason)
    assert isinstance(err, ValueError)
    assert impl.visible() == start


# -- payload versions ---------------------------------------------------------------------
@pytest.fixture
def versioned_kind() -> Iterator[bp.Kind]:
    """A kind registered at version 3 in this process (upcasters tag what they did)."""
    kind = bp.Kind(3, 0x123)
    bp.register_payload(kind, 3, {1: lambda p: {**p, "up": [*p.get("up", []), 1]},
                                  2: lambda p: {**p, "up": [*p.get("up", []), 2]}})
    yield kind
    bp.unregister_payload(kind)


def test_explicit_payload_version(impl: Impl) -> None:
    shapes = impl.shapes()
    c = impl.coord()
    r = impl.api.append(c, KIND, "v7", payload_version=7)
    r0 = impl.api.append(c, KIND, "v0", payload_version=0)
    assert shapes.events(impl.api.history(c.entity)) == [
        event_at(1, c, 1, "v7", payload_version=7),
        event_at(2, c, 2, "v0", prev="h#1"),
    ]
    assert shapes.receipts([r, r0]) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1")]


def test_registered_payload_version_stamps_and_upcasts(impl: Impl, versioned_kind: bp.Kind) -> None:
    shapes = impl.shapes()
    c = impl.coord()
    impl.api.append(c, versioned_kind, {"n": 1})  # stamped with the registered version
    impl.api.append(c, versioned_kind, {"n": 2}, payload_version=1)  # an old writer's payload
    impl.api.append(c, versioned_kind, {"n": 3}, payload_version=0)  # unregistered: read as version 1
    assert shapes.events(impl.api.history(c.entity)) == [
        event_at(1, c, 1, {"n": 1}, kind=versioned_kind, payload_version=3),
        event_at(2, c, 2, {"n": 2, "up": [1, 2]}, prev="h#1", kind=versioned_kind, payload_version=1,
                 payload_bytes=packb({"n": 2})),
        event_at(3, c, 3, {"n": 3, "up": [1, 2]}, prev="h#2", kind=versioned_kind, payload_version=0,
                 payload_bytes=packb({"n": 3})),
    ]


def test_payload_newer_than_registered_is_refused_on_read(impl: Impl, versioned_kind: bp.Kind) -> None:
    shapes = impl.shapes()
    c = impl.coord()
    r = impl.api.append(c, versioned_kind, {"n": 1}, payload_version=4)
    ev = impl.api.get(r.event_id)
    expected = event_at(1, c, 1, {"n": 1}, kind=versioned_kind, payload_version=4)
    del expected["payload"]
    assert shapes.event(ev, payload=False) == expected
    check_error(lambda: ev.payload, bp.FutureVersion, kind=versioned_kind, stored=4, known=3)
