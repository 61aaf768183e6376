"""Erasure requests (OPERATIONS.md "Retention and erasure"): what ``redact`` appends and
what compaction reads back.

Owns: checking a request (``redaction_item``: the event exists and can lose its payload:
not a system event, not a frame of format version 1; a reason that is a short non-empty
str) and the one system event that records it (kind ``SYSTEM_REDACT_REQUEST`` on the
chain ``redactions``, scope ``system``: every process reads the same requests from the
log), and reading the requests back (``requested``); the rule set event
(``retention_item``), the rules in force (``current_retention``) and the sequences they
remove now (``expiring``). Serves the in-process engine and
the client alike. Must not import the engine, the writer, the client or the IPC layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._errors import InvalidArgument, NotFound, RedactionRefused
from .._format.frame import FRAME_VERSION
from .._format.ids import event_id_sequence
from .._retention import Retention, RetentionRule, Seen, expired, retention_of, retention_payload
from .._values import (
    CATEGORY_SYSTEM,
    REDACTION_ENTITY,
    RETENTION_ENTITY,
    SYSTEM_REDACT_REQUEST,
    SYSTEM_RETENTION_SET,
    BatchItem,
    Coordinate,
    Kind,
)
from .reader import Reader

MAX_REASON_CHARS = 1024  # a reason is a note for the audit trail, kept for good in the log


def redaction_item(reader: Reader, event_id: bytes, reason: str) -> BatchItem:
    """The request to remove ``event_id``'s payload at the next compaction, as the
    system event that records it. ``NotFound`` for an unknown id; ``RedactionRefused``
    for a system event or a version-1 frame; ``InvalidArgument`` for a bad reason."""
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
        raise InvalidArgument("reason", reason, f"must be a non-empty str of at most {MAX_REASON_CHARS} characters")
    ev = reader.get(event_id)  # NotFound, InvalidArgument for a bad id
    if ev.kind[0] == CATEGORY_SYSTEM:
        raise RedactionRefused(ev.event_id.hex(), "system events are the store's own record (writer starts, "
                                                  "cursor positions, fences, erasure requests) and stay whole")
    version = reader.frame_version(ev.global_sequence)
    if version != FRAME_VERSION:
        raise RedactionRefused(ev.event_id.hex(), f"it is a version-{version} frame, whose hash covers its payload "
                                                  "bytes (written before format version 2)")
    return BatchItem(Coordinate(REDACTION_ENTITY, "system"), Kind(CATEGORY_SYSTEM, SYSTEM_REDACT_REQUEST),
                     {"event": bytes(ev.event_id), "sequence": ev.global_sequence, "reason": reason})


def requested(reader: Reader) -> set[int]:
    """The sequences of every event an erasure request names (as far as ``reader`` sees)."""
    try:
        chain = reader.history(REDACTION_ENTITY)
    except NotFound:
        return set()
    out: set[int] = set()
    for ev in chain:
        payload = ev.payload
        if ev.kind == (CATEGORY_SYSTEM, SYSTEM_REDACT_REQUEST) and isinstance(payload, dict):
            seq = payload.get("sequence")
            event = payload.get("event")
            if type(seq) is int and isinstance(event, bytes) and len(event) == 16 and event_id_sequence(event) == seq:
                out.add(seq)
    return out


def current_retention(reader: Reader, cache: dict[str, Any]) -> Retention:
    """The retention in force: the latest ``SYSTEM_RETENTION_SET`` event's (none: no
    rules, keys deduplicate for good). ``cache`` keeps it while the chain's head stays."""
    reader.refresh()
    head = reader.head_of(RETENTION_ENTITY.encode())
    if cache.get("head") != head:
        found = Retention()
        if head:
            ev = reader.get_seq(head)
            if ev.kind == (CATEGORY_SYSTEM, SYSTEM_RETENTION_SET) and not ev.redacted:
                found = retention_of(ev.payload)
        cache["head"], cache["retention"] = head, found
    retention: Retention = cache["retention"]
    return retention


def retention_item(rules: Sequence[RetentionRule], idempotency_window_ms: int | None) -> BatchItem:
    """The system event that puts ``rules`` (and the idempotency window) in force."""
    return BatchItem(Coordinate(RETENTION_ENTITY, "system"), Kind(CATEGORY_SYSTEM, SYSTEM_RETENTION_SET),
                     retention_payload(rules, idempotency_window_ms))


def expiring(reader: Reader, rules: Sequence[RetentionRule], now_ms: int, upto: int) -> set[int]:
    """The sequences at or below ``upto`` the rules remove now (a scan of every visible
    event's header: no payload is decoded)."""
    if not rules:
        return set()
    seen = (Seen(ev.global_sequence, ev.coordinate.entity, ev.coordinate.scope, (ev.kind[0] << 12) | ev.kind[1],
                 ev.wall_ms) for ev in reader.scan(0))
    return expired(rules, seen, now_ms, upto=upto)
