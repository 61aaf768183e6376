"""Conformance of ``close``: after it every call raises ``bp.StoreClosed``, closing again
is a no-op, the context manager closes, and what was acknowledged before stays; the
same for the in-process engine and a served store (each test closes a private
instance, see the ``another`` fixture)."""

from __future__ import annotations

from typing import Any

import pytest

import batpak_mp as bp

from ._contract import EFFECT_BYPASS, KIND, Impl, Shapes, check_error, event_at, receipt_at

_C = bp.Coordinate("closed", "scope")
CALLS: dict[str, Any] = {
    "append": lambda api, r: api.append(_C, KIND, 1),
    "append_batch": lambda api, r: api.append_batch([bp.BatchItem(_C, KIND, 1)]),
    "get": lambda api, r: api.get(r.event_id),
    "history": lambda api, r: api.history(r.entity),
    "query_after": lambda api, r: api.query_after(0),
    "walk_ancestors": lambda api, r: list(api.walk_ancestors(r.event_id)),
    "verify_receipt": lambda api, r: api.verify_receipt(r),
    "append_effect": lambda api, r: api.append_effect(_C, EFFECT_BYPASS, {"reason": "r"}),
    "append_denial": lambda api, r: api.append_denial(_C, bp.Denial("g", "c")),
    "append_bypass": lambda api, r: api.append_bypass(bp.BatchItem(_C, KIND, 1), "why"),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_every_call_after_close_raises_store_closed(another: Impl, call: str) -> None:
    api = another.api
    r = api.append(another.coord(), KIND, "before close")
    CALLS[call](api, r)  # works while open
    api.close()
    check_error(lambda: CALLS[call](api, r), bp.StoreClosed)
    api.close()  # closing again is a no-op
    check_error(lambda: CALLS[call](api, r), bp.StoreClosed)


def test_context_manager_closes(another: Impl) -> None:
    shapes = another.shapes()
    c = another.coord()
    with another.api as entered:
        assert entered is another.api
        r = entered.append(c, KIND, 1)
    assert shapes.receipt(r) == receipt_at(1, c, 1)
    check_error(lambda: another.api.get(r.event_id), bp.StoreClosed)


def test_acknowledged_events_outlive_the_instance(another: Impl) -> None:
    c = another.coord()
    r = another.api.append(c, KIND, "kept")
    another.api.close()
    again = another.reopen()
    try:
        shapes = Shapes(r.global_sequence - 1)
        assert shapes.receipt(r) == receipt_at(1, c, 1)
        assert shapes.events(again.history(c.entity)) == [event_at(1, c, 1, "kept")]
        assert again.verify_receipt(r)
    finally:
        again.close()
