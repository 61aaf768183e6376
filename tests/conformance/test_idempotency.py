"""Conformance of de-duplication and conflicts (issue 15 #2): a receipt says when its key
was committed by an earlier call (``Receipt.deduplicated``, nothing written); a key
re-used for another request is an ``IdempotencyConflict`` naming the stored event and
the field that differs; a batch's ``ConcurrencyConflict`` names every stale event. The
same from the in-process engine and a served store."""

from __future__ import annotations

from typing import Any

import pytest

import batpak_mp as bp

from ._contract import KIND, OTHER_KIND, Has, Impl, check_error

CAUSE = bytes(range(16))


def test_a_repeated_request_is_deduplicated(impl: Impl) -> None:
    c = impl.coord()
    first = impl.api.append(c, KIND, {"x": 1}, idempotency_key=f"k-{c.entity}", causation_id=CAUSE)
    start = impl.visible()
    again = impl.api.append(c, KIND, {"x": 1}, idempotency_key=f"k-{c.entity}", causation_id=CAUSE)
    assert (first.deduplicated, again.deduplicated) == (False, True)
    assert again._replace(deduplicated=False) == first
    assert impl.visible() == start
    assert impl.api.verify_receipt(again)


@pytest.mark.parametrize(("change", "field"), [
    ({"payload": {"x": 2}}, "payload"),
    ({"kind": OTHER_KIND}, "kind"),
    ({"scope": "elsewhere"}, "scope"),
    ({"entity": "someone-else"}, "entity"),
    ({"causation_id": bytes(16 * [7])}, "causation_id"),
    ({"causation_id": None}, "causation_id"),
    ({"correlation_id": CAUSE}, "correlation_id"),
    ({"payload_version": 3}, "payload_version"),
])
def test_a_key_reused_for_another_request_is_refused(impl: Impl, change: dict[str, Any], field: str) -> None:
    c = impl.coord()
    key = f"k-{c.entity}"
    first = impl.api.append(c, KIND, {"x": 1}, idempotency_key=key, causation_id=CAUSE)
    start = impl.visible()
    args: dict[str, Any] = {"payload": {"x": 1}, "kind": KIND, "causation_id": CAUSE, "correlation_id": None,
                            "payload_version": None, **change}
    coord = bp.Coordinate(args.pop("entity", c.entity), args.pop("scope", c.scope))
    err = check_error(lambda: impl.api.append(coord, args.pop("kind"), args.pop("payload"), idempotency_key=key,
                                              **args),
                      bp.IdempotencyConflict, key=Has(""), sequence=first.global_sequence, field=field)
    assert isinstance(err, ValueError) and len(err.key) == 32  # type: ignore[attr-defined]
    assert impl.visible() == start


def test_a_batch_reusing_keys_for_other_events_is_refused(impl: Impl) -> None:
    a, b = impl.coord("a"), impl.coord("b")
    items = [bp.BatchItem(a, KIND, 1, idempotency_key=f"k1-{a.entity}"),
             bp.BatchItem(b, KIND, 2, idempotency_key=f"k2-{a.entity}")]
    first = impl.api.append_batch(items)
    again = impl.api.append_batch(items)
    assert [r.deduplicated for r in again] == [True, True]
    changed = [items[0], bp.BatchItem(b, KIND, 3, idempotency_key=f"k2-{a.entity}")]
    check_error(lambda: impl.api.append_batch(changed), bp.IdempotencyConflict, key=Has(""),
                sequence=first[1].global_sequence, field="payload")


def test_every_conflict_of_a_batch_is_named(impl: Impl) -> None:
    a, b, c = impl.coord("a"), impl.coord("b"), impl.coord("c")
    impl.api.append(a, KIND, 0)
    impl.api.append(b, KIND, 0)
    impl.api.append(b, KIND, 0)
    start = impl.visible()
    items = [bp.BatchItem(a, KIND, 1, expected_clock=0),  # stale: a has 1
             bp.BatchItem(c, KIND, 1, expected_clock=0),  # right
             bp.BatchItem(b, KIND, 1, expected_clock=1),  # stale: b has 2
             bp.BatchItem(b, KIND, 2, expected_clock=2)]  # stale in the batch: b would have 3 here
    check_error(lambda: impl.api.append_batch(items), bp.ConcurrencyConflict, entity=a.entity, expected=0, actual=1,
                conflicts=((a.entity, 0, 1), (b.entity, 1, 2), (b.entity, 2, 3)))
    assert impl.visible() == start
