"""Retention rules, pure (issue 13 #2): validation (a rule that would remove system
events, cursor positions or an entity's latest event is RetentionRefused; other bad
values InvalidArgument), the payload round trip, and what ``expired`` selects."""

from __future__ import annotations

from typing import Any

import pytest

import batpak_mp as bp
from batpak_mp._retention import Retention, Seen, expired, retention_of, retention_payload


@pytest.mark.parametrize("kwargs", [
    {"kind": bp.Kind(0, 0x10), "keep_last": 5},          # cursor positions are system events
    {"scope": "system", "keep_last": 5},
    {"entity_prefix": "cursor:", "keep_last": 5},
    {"entity_prefix": "cursor:orders", "max_age_ms": 10},
    {"entity_prefix": "fences", "keep_last": 1},
    {"entity_prefix": "redactions", "keep_last": 1},
    {"entity_prefix": "user-", "keep_last": 0},         # would remove each entity's latest event
])
def test_rules_that_would_remove_what_must_stay_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(bp.RetentionRefused):
        bp.RetentionRule(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {}, {"entity_prefix": "u"}, {"entity_prefix": "", "keep_last": 1}, {"entity_prefix": 3, "keep_last": 1},
    {"keep_last": -1}, {"keep_last": 1.5}, {"max_age_ms": 0}, {"max_age_ms": "1"}, {"scope": "", "keep_last": 1},
    {"kind": (1,), "keep_last": 1}, {"kind": (*bp.Kind(1, 1), 1), "keep_last": 1},
])
def test_bad_rules_are_invalid_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises((bp.InvalidArgument, bp.InvalidCoordinate, bp.InvalidKind)):
        bp.RetentionRule(**kwargs)


def test_the_payload_round_trips_and_bad_ones_mean_no_rules() -> None:
    rules = (bp.RetentionRule(entity_prefix="u-", keep_last=2), bp.RetentionRule(scope="s", kind=bp.Kind(1, 2),
                                                                                 max_age_ms=1000))
    assert retention_of(retention_payload(rules, 60_000)) == Retention(rules, 60_000)
    assert retention_of({"rules": [["x"]]}) == Retention() == retention_of(None)
    for bad in ([1], "rules", [bp.RetentionRule(keep_last=1)] * 257):
        with pytest.raises(bp.InvalidArgument):
            retention_payload(bad, None)  # type: ignore[arg-type]
    with pytest.raises(bp.InvalidArgument):
        retention_payload([], 0)


def ev(seq: int, entity: str, wall: int, kind: int = 0x1001, scope: str = "s") -> Seen:
    return Seen(seq, entity, scope, kind, wall)


def test_expired_keeps_the_last_n_and_the_latest_and_never_system_events() -> None:
    events = [ev(1, "u-a", 0), ev(2, "u-a", 0), ev(3, "u-b", 0), ev(4, "u-a", 0), ev(5, "u-a", 0),
              ev(6, "cursor:x", 0, kind=0x0010, scope="system"), ev(7, "other", 0), ev(8, "u-b", 0)]
    keep2 = [bp.RetentionRule(entity_prefix="u-", keep_last=2)]
    assert expired(keep2, events, 10, upto=8) == {1, 2}
    assert expired(keep2, events, 10, upto=1) == {1}  # only sealed segments: up to ``upto``
    old = [bp.RetentionRule(max_age_ms=5)]
    # everything older than 5 ms but each entity's latest event (5, 7, 8) and the system one
    assert expired(old, events, 10, upto=8) == {1, 2, 3, 4}
    assert expired(old, events, 5, upto=8) == set()
    by_kind = [bp.RetentionRule(kind=bp.Kind(1, 2), keep_last=1)]
    assert expired(by_kind, events, 10, upto=8) == set()
    assert expired([], events, 10, upto=8) == set()
