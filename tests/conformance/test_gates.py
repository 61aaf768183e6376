"""Conformance of the gate entry points both implementations offer: ``append_denial``,
``append_effect`` and ``append_bypass`` (effect records of the reserved category 0xD
that the store appends on a caller's behalf), the same from the in-process engine and
from a served store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import batpak_mp as bp

from ._contract import (
    CATEGORY_EFFECT,
    EFFECT_BYPASS,
    EFFECT_DENIAL,
    KIND,
    Has,
    Impl,
    check_error,
    event_at,
    receipt_at,
)

DENIAL_KIND = bp.Kind(CATEGORY_EFFECT, EFFECT_DENIAL)
BYPASS_KIND = bp.Kind(CATEGORY_EFFECT, EFFECT_BYPASS)


def _digest(item: bp.BatchItem) -> bytes:
    return bp.Proposal(item.coord, item.kind, item.payload, item.idempotency_key, item.expected_clock,
                       item.causation_id, item.correlation_id).digest()


# -- append_denial ----------------------------------------------------------------------
def test_denial_is_chained_in_the_entity(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    cause = api.append(c, KIND, "before")
    r = api.append_denial(c, bp.Denial("limits", "over-quota", "3 of 3 used"), proposal_kind=KIND,
                          causation_id=cause.event_id)
    bare = api.append_denial(c, bp.Denial("g2", "no"))
    assert shapes.receipts([cause, r, bare]) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1"),
                                                 receipt_at(3, c, 3, prev="h#2")]
    denied = {"gate": "limits", "code": "over-quota", "message": "3 of 3 used", "proposed_kind": [1, 7]}
    assert shapes.events(api.history(c.entity)) == [
        event_at(1, c, 1, "before"),
        event_at(2, c, 2, denied, prev="h#1", kind=DENIAL_KIND, causation_id="#1"),
        event_at(3, c, 3, {"gate": "g2", "code": "no", "message": "", "proposed_kind": None}, prev="h#2", kind=DENIAL_KIND),
    ]


@pytest.mark.parametrize(("call", "error", "fields"), [
    (lambda api, c: api.append_denial(c, "no"), bp.InvalidArgument,
     {"name": "denial", "value": "str", "reason": "must be a bp.Denial"}),
    (lambda api, c: api.append_denial(c, bp.Denial("g", "c"), proposal_kind=bp.Kind(0, 1)), bp.ReservedKind,
     {"category": 0, "type_id": 1, "reason": "category 0x0 is reserved for the store"}),
    (lambda api, c: api.append_denial(c, bp.Denial("g", "c"), proposal_kind=bp.Kind(16, 1)), bp.InvalidKind,
     {"category": 16, "type_id": 1, "reason": "category must be an int in 0..15"}),
    (lambda api, c: api.append_denial(c, bp.Denial("g", "c"), causation_id=b"short"), bp.InvalidArgument,
     {"name": "causation_id", "value": b"short", "reason": "must be a 16-byte event id"}),
    (lambda api, c: api.append_denial("entity", bp.Denial("g", "c")), bp.InvalidArgument,
     {"name": "coord", "value": "entity", "reason": "must be a bp.Coordinate"}),
    (lambda api, c: api.append_denial(c, bp.Denial("", "no")), bp.InvalidArgument,  # the gate set names it, not the store
     {"name": "payload", "value": "effect 0xd:0x1", "reason": "gate: must not be empty"}),
], ids=["not-a-denial", "reserved-proposal-kind", "invalid-proposal-kind", "bad-causation", "not-a-coordinate",
        "unnamed-gate"])
def test_denial_refusals(impl: Impl, call: Any, error: type[bp.BatpakError], fields: dict[str, Any]) -> None:
    c = impl.coord()
    start = impl.visible()
    check_error(lambda: call(impl.api, c), error, **fields)
    assert impl.visible() == start


# -- append_effect ----------------------------------------------------------------------
def test_effects_of_both_allowed_types(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    denial = {"gate": "g", "code": "c", "message": "m"}
    bypass = {"reason": "operator override", "gates": ["g1", "g2"]}
    rs = [api.append_effect(c, EFFECT_DENIAL, denial), api.append_effect(c, EFFECT_BYPASS, bypass)]
    assert shapes.receipts(rs) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1")]
    assert shapes.events(api.history(c.entity)) == [
        event_at(1, c, 1, denial, kind=DENIAL_KIND),
        event_at(2, c, 2, bypass, prev="h#1", kind=BYPASS_KIND),
    ]


def test_effect_idempotency_key(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    payload = {"reason": "once"}
    first = api.append_effect(c, EFFECT_BYPASS, payload, idempotency_key=f"fx-{c.entity}")
    again = api.append_effect(c, EFFECT_BYPASS, payload, idempotency_key=f"fx-{c.entity}")
    assert again.deduplicated and again._replace(deduplicated=False) == first
    assert shapes.receipts([first, again]) == [receipt_at(1, c, 1)] * 2
    assert impl.visible() == shapes.start + 1


@pytest.mark.parametrize(("type_id", "payload", "error", "fields"), [
    (0x003, {"reason": "r"}, bp.ReservedKind, {"category": 0xD, "type_id": 3, "reason": "category 0xd is reserved for the store"}),
    (0x1000, {"reason": "r"}, bp.ReservedKind, {"category": 0xD, "type_id": 0x1000,
                                                "reason": "category 0xd is reserved for the store"}),
    (EFFECT_DENIAL, {"gate": "g"}, bp.InvalidArgument, {"name": "payload", "value": "effect 0xd:0x1",
                                                        "reason": Has("missing keys ['code', 'message']")}),
    (EFFECT_BYPASS, {"reason": "r", "extra": 1}, bp.InvalidArgument, {"name": "payload", "value": "effect 0xd:0x2",
                                                                      "reason": Has("unknown keys")}),
    (EFFECT_BYPASS, ["reason"], bp.InvalidArgument, {"name": "payload", "value": "effect 0xd:0x2",
                                                     "reason": "must be a map, not list"}),
    (EFFECT_BYPASS, {"reason": 5}, bp.InvalidArgument, {"name": "payload", "value": "effect 0xd:0x2",
                                                        "reason": Has("reason")}),
], ids=["unknown-type", "type-out-of-range", "missing-keys", "unknown-key", "not-a-map", "bad-value"])
def test_effect_refusals(impl: Impl, type_id: int, payload: Any, error: type[bp.BatpakError], fields: dict[str, Any]) -> None:
    c = impl.coord()
    start = impl.visible()
    check_error(lambda: impl.api.append_effect(c, type_id, payload), error, **fields)
    assert impl.visible() == start


# -- append_bypass ----------------------------------------------------------------------
def _audit(item: bp.BatchItem, reason: str, gates: list[str]) -> dict[str, Any]:
    return {"reason": reason, "gates": gates, "proposed_kind": [item.kind[0], item.kind[1]],
            "proposal_digest": _digest(item)}


def test_bypass_appends_the_event_and_its_audit_record(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    correlation = b"\x42" * 16
    item = bp.BatchItem(c, KIND, {"amount": 5}, expected_clock=0, correlation_id=correlation)
    event, audit = api.append_bypass(item, "incident 42", gates=["limits", "fraud"])
    assert shapes.receipts([event, audit]) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1")]
    assert shapes.events(api.history(c.entity)) == [
        event_at(1, c, 1, {"amount": 5}, correlation_id=correlation.hex()),
        event_at(2, c, 2, _audit(item, "incident 42", ["limits", "fraud"]), prev="h#1", kind=BYPASS_KIND,
                 correlation_id=correlation.hex()),
    ]


def test_bypass_resent_with_a_key_is_deduplicated(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    item = bp.BatchItem(c, KIND, 1, idempotency_key=f"bp-{c.entity}")
    first = api.append_bypass(item, "why")
    again = api.append_bypass(item, "why")
    assert tuple(r._replace(deduplicated=False) for r in again) == first and all(r.deduplicated for r in again)
    assert shapes.receipts(list(again)) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1")]
    assert impl.visible() == shapes.start + 2


def test_bypass_conflict_writes_nothing(impl: Impl) -> None:
    api = impl.api
    c = impl.coord()
    api.append(c, KIND, 0)
    start = impl.visible()
    check_error(lambda: api.append_bypass(bp.BatchItem(c, KIND, 1, expected_clock=0), "why"), bp.ConcurrencyConflict,
                entity=c.entity, expected=0, actual=1, conflicts=((c.entity, 0, 1),))
    assert impl.visible() == start


@pytest.mark.parametrize(("item_kind", "error", "fields"), [
    (bp.Kind(0, 0x010), bp.ReservedKind, {"category": 0, "type_id": 0x010, "reason": "category 0x0 is reserved for the store"}),
    (bp.Kind(0xD, 2), bp.ReservedKind, {"category": 0xD, "type_id": 2, "reason": "category 0xd is reserved for the store"}),
    (bp.Kind(1, 4096), bp.InvalidKind, {"category": 1, "type_id": 4096, "reason": "type_id must be an int in 0..4095"}),
], ids=["system-cursor-ack", "effect-bypass", "invalid"])
def test_bypass_refuses_store_kinds(impl: Impl, item_kind: bp.Kind, error: type[bp.BatpakError],
                                    fields: dict[str, Any]) -> None:
    start = impl.visible()
    item = bp.BatchItem(impl.coord(), item_kind, {"cursor": "c", "through": 1, "reason": "r"})
    check_error(lambda: impl.api.append_bypass(item, "why"), error, **fields)
    assert impl.visible() == start


@pytest.mark.parametrize(("reason", "gates", "fields"), [
    ("", [], {"name": "payload", "value": "effect 0xd:0x2", "reason": Has("reason")}),
    ("why", [""], {"name": "payload", "value": "effect 0xd:0x2", "reason": Has("gate name")}),
], ids=["empty-reason", "empty-gate-name"])
def test_bypass_refusals(impl: Impl, reason: str, gates: list[str], fields: dict[str, Any]) -> None:
    start = impl.visible()
    item = bp.BatchItem(impl.coord(), KIND, 1)
    check_error(lambda: impl.api.append_bypass(item, reason, gates=gates), bp.InvalidArgument, **fields)
    assert impl.visible() == start


@pytest.fixture
def versioned_kind() -> Iterator[bp.Kind]:
    kind = bp.Kind(4, 0x321)
    bp.register_payload(kind, 2, {1: lambda p: p})
    yield kind
    bp.unregister_payload(kind)


@pytest.mark.parametrize(("given", "stored"), [(None, 2), (1, 1), (7, 7)], ids=["registered", "explicit-1", "explicit-7"])
def test_bypass_payload_version(impl: Impl, versioned_kind: bp.Kind, given: int | None, stored: int) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    item = bp.BatchItem(c, versioned_kind, {"v": 1}, payload_version=given)
    event, audit = api.append_bypass(item, "why")
    assert shapes.receipts([event, audit]) == [receipt_at(1, c, 1), receipt_at(2, c, 2, prev="h#1")]
    assert [(e.kind, e.payload_version) for e in api.history(c.entity)] == [(versioned_kind, stored), (BYPASS_KIND, 0)]
