"""Retention rules (issue 13; OPERATIONS.md §11.3): which events lose their payload at
compaction, decided from the rules the store holds. Pure: values in, sequences out.

Owns: ``RetentionRule`` (validated at construction: a rule that would remove a system
event, a cursor position or an entity's latest event is ``RetentionRefused``; other bad
values ``InvalidArgument``), ``Retention`` (the rules plus the idempotency-key window: the
one payload of a ``SYSTEM_RETENTION_SET`` event, encoded and decoded here), and
``expired`` (the sequences the rules remove, given the events and the time).
Invariants: never selects a system event (category 0x0: writer starts, cursor positions,
fences, erasure requests, the rules themselves), nor the latest event of any entity
(a writer using ``expected_clock`` on it, and every projection's anchor, keep it).
Must not import os, a clock, the storage, the read side or any process role: time
comes in as an argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._errors import InvalidArgument, RetentionRefused
from ._values import (
    CATEGORY_SYSTEM,
    FENCE_ENTITY,
    REDACTION_ENTITY,
    RETENTION_ENTITY,
    Kind,
    check_kind,
    check_name,
)

SYSTEM_CHAINS = ("writer", FENCE_ENTITY, REDACTION_ENTITY, RETENTION_ENTITY)  # the store's own entities
CURSOR_PREFIX = "cursor:"  # a cursor's or reactor's positions: "cursor:<name>"
MAX_RULES = 256  # the rules live in one system event's payload: a short list


@dataclass(frozen=True)
class RetentionRule:
    """Events that lose their payload at compaction: those whose entity starts with
    ``entity_prefix``, in ``scope``, of ``kind`` (each None: any), beyond the newest
    ``keep_last`` of their entity that the rule selects, or older than ``max_age_ms``
    (at least one of the two). The latest event of an entity is always kept."""

    entity_prefix: str | None = None
    scope: str | None = None
    kind: Kind | None = None
    keep_last: int | None = None
    max_age_ms: int | None = None

    def __post_init__(self) -> None:
        if self.entity_prefix is not None:
            if not isinstance(self.entity_prefix, str) or not self.entity_prefix:
                raise InvalidArgument("entity_prefix", self.entity_prefix, "must be a non-empty str or None")
            if self.entity_prefix.startswith(CURSOR_PREFIX) or self.entity_prefix in SYSTEM_CHAINS:
                raise RetentionRefused(self, f"entity prefix {self.entity_prefix!r} names the store's own chains "
                                             "(cursor positions, writer starts, fences, erasure requests, rules)")
        if self.scope is not None:
            check_name("scope", self.scope)
            if self.scope == "system":
                raise RetentionRefused(self, "scope 'system' holds the store's own record (cursor positions, fences)")
        if self.kind is not None:
            if not isinstance(self.kind, tuple) or len(self.kind) != 2:
                raise InvalidArgument("kind", self.kind, "must be a bp.Kind or None")
            check_kind(self.kind, allow_reserved=True)
            if self.kind[0] == CATEGORY_SYSTEM:
                raise RetentionRefused(self, "system events (category 0x0) are the store's own record and stay whole")
            object.__setattr__(self, "kind", Kind(*self.kind))
        for name in ("keep_last", "max_age_ms"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise InvalidArgument(name, value, "must be an int >= 0 or None")
        if self.keep_last == 0:
            raise RetentionRefused(self, "keep_last=0 would remove the latest event of each entity (an "
                                         "expected_clock writer and every projection anchor on it): keep at least 1")
        if self.max_age_ms == 0:
            raise InvalidArgument("max_age_ms", 0, "must be >= 1 (or None)")
        if self.keep_last is None and self.max_age_ms is None:
            raise InvalidArgument("keep_last", None, "a rule needs keep_last or max_age_ms (or both)")

    def matches(self, entity: str, scope: str, kind: int) -> bool:
        return ((self.entity_prefix is None or entity.startswith(self.entity_prefix))
                and (self.scope is None or scope == self.scope)
                and (self.kind is None or kind == (self.kind[0] << 12) | self.kind[1])
                and kind >> 12 != CATEGORY_SYSTEM)

    def to_wire(self) -> list[Any]:
        return [self.entity_prefix, self.scope, None if self.kind is None else list(self.kind), self.keep_last,
                self.max_age_ms]

    @classmethod
    def from_wire(cls, doc: Any) -> RetentionRule:
        if not isinstance(doc, list) or len(doc) != 5:
            raise InvalidArgument("rule", doc, "must be [entity_prefix, scope, kind, keep_last, max_age_ms]")
        kind = None if doc[2] is None else Kind(*doc[2])
        return cls(doc[0], doc[1], kind, doc[3], doc[4])


class Retention(NamedTuple):
    """The rules in force (the latest ``SYSTEM_RETENTION_SET`` event's), and how long an
    idempotency key deduplicates a retry (None: for good)."""

    rules: tuple[RetentionRule, ...] = ()
    idempotency_window_ms: int | None = None


def retention_payload(rules: Sequence[RetentionRule], idempotency_window_ms: int | None) -> dict[str, Any]:
    """The payload of the ``SYSTEM_RETENTION_SET`` event that puts ``rules`` in force."""
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise InvalidArgument("rules", rules, "must be a list of bp.RetentionRule")
    if len(rules) > MAX_RULES:
        raise InvalidArgument("rules", len(rules), f"at most {MAX_RULES} rules")
    for rule in rules:
        if not isinstance(rule, RetentionRule):
            raise InvalidArgument("rules", rule, "must be a bp.RetentionRule")
    if idempotency_window_ms is not None and (type(idempotency_window_ms) is not int or idempotency_window_ms < 1):
        raise InvalidArgument("idempotency_window_ms", idempotency_window_ms, "must be an int >= 1 or None")
    return {"rules": [r.to_wire() for r in rules], "idempotency_window_ms": idempotency_window_ms}


def retention_of(payload: Any) -> Retention:
    """The ``Retention`` a ``SYSTEM_RETENTION_SET`` payload puts in force; an unreadable
    one (a client of another version) counts as no rules, never as damage."""
    try:
        window = payload.get("idempotency_window_ms")
        rules = tuple(RetentionRule.from_wire(r) for r in payload["rules"])
        if window is not None and (type(window) is not int or window < 1):
            return Retention()
        return Retention(rules, window)
    except Exception:
        return Retention()


class Seen(NamedTuple):
    """What ``expired`` needs of an event (no payload)."""

    seq: int
    entity: str
    scope: str
    kind: int  # packed
    wall_ms: int


def expired(rules: Sequence[RetentionRule], events: Iterable[Seen], now_ms: int, *, upto: int) -> set[int]:
    """The sequences at or below ``upto`` (the sealed segments' end) whose payload the
    rules remove at ``now_ms``. ``events``: every visible event, in sequence order (the
    latest of each entity, which is kept, may lie past ``upto``)."""
    if not rules:
        return set()
    latest: dict[str, int] = {}
    selected: dict[tuple[int, str], list[Seen]] = {}
    for ev in events:
        latest[ev.entity] = ev.seq
        for i, rule in enumerate(rules):
            if rule.matches(ev.entity, ev.scope, ev.kind):
                selected.setdefault((i, ev.entity), []).append(ev)
    out: set[int] = set()
    for (i, entity), evs in selected.items():
        rule = rules[i]
        keep_from = len(evs) - rule.keep_last if rule.keep_last is not None else 0  # below it: beyond keep_last
        for pos, ev in enumerate(evs):
            old = rule.max_age_ms is not None and now_ms - ev.wall_ms > rule.max_age_ms
            if (pos < keep_from or old) and ev.seq <= upto and ev.seq != latest[entity]:
                out.add(ev.seq)
    return out
