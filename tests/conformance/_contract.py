"""What the conformance tests hold both implementations to, as code.

Owns: ``EventStore`` (the calls of DESIGN.md §1 that ``bp.Engine`` and ``bp.Store`` both
have, as a Protocol: mypy checks both classes against it in conftest.py), ``Impl`` (one
implementation under test), ``Shapes`` (receipts, events and pages with the fields that
legitimately differ between two stores — event ids, hashes, wall clock — turned into
labels, and sequences made relative to where the test started, so one expected value
serves both), ``check_error`` (an error's exact type and every field it carries) and
``differs`` (a known difference: the test stays as the contract says and is a strict
xfail on the side that breaks it, so fixing that side turns the suite red until the
mark is removed).
Invariants: a label depends only on what both implementations must agree on (the
relative sequence of the event it names), so equal shapes mean equal answers.
Must not import batpak_mp's private modules: the suite sees the public API only.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self

import msgpack
import pytest

import batpak_mp as bp

IMPLS = ("engine", "store")

# Options given to both bp.serve(...) and bp.EngineConfig(...). The payload limit is small
# so PayloadTooLarge is cheap to provoke, and below the client's own fixed check, so the
# served writer's check is the one that answers for the store.
PAYLOAD_LIMIT = 64 * 1024  # bytes of encoded payload per event
DEFAULT_CONFIG: dict[str, Any] = {"segment_max_bytes": 1 << 20, "max_payload_bytes": PAYLOAD_LIMIT}

ZERO_HASH = bytes(32)  # the prev_hash of an entity's first event (DESIGN §2.4: a chain per entity)
WALL_SLACK_MS = 5_000  # a stamped wall clock must fall within the test's run, give or take this
KIND = bp.Kind(1, 7)  # an ordinary caller kind
OTHER_KIND = bp.Kind(2, 9)

# Effect records (reserved category 0xD) the store appends on a caller's behalf; the type
# ids are part of the log format (docs/FORMAT.md), not of the Python API.
CATEGORY_EFFECT = 0xD
EFFECT_DENIAL = 0x001
EFFECT_BYPASS = 0x002


class EventStore(Protocol):
    """The read/write calls both implementations offer (DESIGN.md §1 plus the gate entry
    points). ``bp.Engine`` and ``bp.Store`` must each be assignable to it."""

    def append(self, coord: bp.Coordinate, kind: bp.Kind, payload: Any, *,
               idempotency_key: str | bytes | None = None, expected_clock: int | None = None,
               causation_id: bytes | None = None, correlation_id: bytes | None = None,
               payload_version: int | None = None) -> bp.Receipt: ...

    def append_batch(self, items: Sequence[bp.BatchItem]) -> list[bp.Receipt]: ...

    def get(self, event_id: bytes) -> bp.Event: ...

    def history(self, entity: str, *, after_clock: int | None = None, limit: int | None = None,
                before_clock: int | None = None, newest_first: bool = False) -> list[bp.Event]: ...

    def query_after(self, after: int = 0, *, limit: int = 1000, entity: str | None = None,
                    scope: str | None = None, kind: bp.Kind | None = None, kinds: Iterable[bp.Kind] | None = None,
                    upto: int | None = None, region: bp.Region | None = None) -> bp.Page: ...

    def latest(self, entity: str) -> bp.Event | None: ...

    def latest_in_scope(self, scope: str) -> bp.Event | None: ...

    def query_scope(self, scope: str, after_position: int = 0, *, limit: int = 1000,
                    upto_position: int | None = None, region: bp.Region | None = None) -> bp.Page: ...

    def walk_ancestors(self, event_id: bytes, *, limit: int | None = None) -> Iterator[bp.Event]: ...

    def verify_receipt(self, receipt: bp.Receipt) -> bool: ...

    def append_effect(self, coord: bp.Coordinate, type_id: int, payload: Any, *, causation_id: bytes | None = None,
                      idempotency_key: str | bytes | None = None) -> bp.Receipt: ...

    def append_denial(self, coord: bp.Coordinate, denial: bp.Denial, *, proposal_kind: bp.Kind | None = None,
                      causation_id: bytes | None = None) -> bp.Receipt: ...

    def append_bypass(self, item: bp.BatchItem, reason: str, *,
                      gates: Sequence[str] = ()) -> tuple[bp.Receipt, bp.Receipt]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Shapes:
    """Turns answers into plain dicts both implementations must produce identically.

    ``global_sequence`` becomes relative to ``start`` (the visible frontier when the test
    began); an event id becomes ``"#n"`` and an event hash ``"h#n"``, where n is the
    relative sequence of the event they belong to (learned from the receipts and events
    shaped so far: shape in commit order); the zero hash is ``"zero"``; a wall clock in
    the test's time window is ``"now"``. Anything else stays as it is (a caller-chosen
    id, say), so a wrong link shows up as a raw value that cannot match."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._ids: dict[bytes, str] = {}
        self._hashes: dict[bytes, str] = {ZERO_HASH: "zero"}
        self._t0 = _now_ms()

    def seq(self, sequence: int) -> int:
        return sequence - self.start

    def _learn(self, sequence: int, event_id: bytes, event_hash: bytes) -> None:
        n = self.seq(sequence)
        self._ids.setdefault(event_id, f"#{n}")
        self._hashes.setdefault(event_hash, f"h#{n}")

    def id(self, value: bytes | None) -> str | None:
        return None if value is None else self._ids.get(value, value.hex())

    def hash(self, value: bytes) -> str:
        return self._hashes.get(value, value.hex())

    def wall(self, wall_ms: int) -> int | str:
        return "now" if self._t0 - WALL_SLACK_MS <= wall_ms <= _now_ms() + WALL_SLACK_MS else wall_ms

    def receipt(self, r: bp.Receipt) -> dict[str, Any]:
        assert type(r) is bp.Receipt, type(r)
        self._learn(r.global_sequence, r.event_id, r.event_hash)
        return {
            "event_id": self.id(r.event_id), "global_sequence": self.seq(r.global_sequence), "entity": r.entity,
            "scope": r.scope, "entity_clock": r.entity_clock, "event_hash": self.hash(r.event_hash),
            "prev_hash": self.hash(r.prev_hash), "wall_ms": self.wall(r.wall_ms), "durable": r.durable,
            "signature": None if r.signature is None else f"{len(r.signature)} bytes",
        }

    def receipts(self, rs: Sequence[bp.Receipt]) -> list[dict[str, Any]]:
        return [self.receipt(r) for r in rs]

    def event(self, e: bp.Event, *, payload: bool = True) -> dict[str, Any]:
        """``payload=False`` leaves the decoded payload out (it may raise FutureVersion)."""
        assert type(e) is bp.Event and type(e.kind) is bp.Kind, (type(e), type(e.kind))
        self._learn(e.global_sequence, e.event_id, e.event_hash)
        shape = {
            "event_id": self.id(e.event_id), "global_sequence": self.seq(e.global_sequence),
            "entity": e.coordinate.entity, "scope": e.coordinate.scope, "kind": e.kind,
            "entity_clock": e.entity_clock, "wall_ms": self.wall(e.wall_ms), "payload_bytes": e.payload_bytes,
            "payload_version": e.payload_version, "event_hash": self.hash(e.event_hash),
            "prev_hash": self.hash(e.prev_hash), "causation_id": self.id(e.causation_id),
            "correlation_id": self.id(e.correlation_id),
        }
        if payload:
            shape["payload"] = e.payload
        return shape

    def events(self, es: Sequence[bp.Event]) -> list[dict[str, Any]]:
        return [self.event(e) for e in es]

    def page(self, p: bp.Page) -> dict[str, Any]:
        return {"events": self.events(p.events), "next_after": self.seq(p.next_after)}


def packb(payload: Any) -> bytes:
    """A payload's msgpack bytes, as both implementations store them."""
    raw: bytes = msgpack.packb(payload, use_bin_type=True)
    return raw


def receipt_at(n: int, coord: bp.Coordinate, clock: int, prev: str = "zero", **fields: Any) -> dict[str, Any]:
    """The expected shape of the receipt of the n-th event of a test."""
    return {
        "event_id": f"#{n}", "global_sequence": n, "entity": coord.entity, "scope": coord.scope,
        "entity_clock": clock, "event_hash": f"h#{n}", "prev_hash": prev, "wall_ms": "now", "durable": True,
        "signature": None, **fields,
    }


def event_at(n: int, coord: bp.Coordinate, clock: int, payload: Any, prev: str = "zero", *,
             kind: bp.Kind = KIND, **fields: Any) -> dict[str, Any]:
    """The expected shape of the n-th event of a test (``payload`` as given to append)."""
    return {
        "event_id": f"#{n}", "global_sequence": n, "entity": coord.entity, "scope": coord.scope, "kind": kind,
        "entity_clock": clock, "wall_ms": "now", "payload_bytes": packb(payload), "payload_version": 0,
        "event_hash": f"h#{n}", "prev_hash": prev, "causation_id": None, "correlation_id": None,
        "payload": payload, **fields,
    }


class Has:
    """Matches any str containing ``part`` (for the prose of an error's ``reason``)."""

    def __init__(self, part: str) -> None:
        self.part = part

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.part in other

    __hash__ = None  # type: ignore[assignment]  # compared, never hashed

    def __repr__(self) -> str:
        return f"Has({self.part!r})"


def error_data(exc: BaseException) -> tuple[type[BaseException], dict[str, Any]]:
    """An error's exact type and every field it carries."""
    return type(exc), {k: v for k, v in vars(exc).items() if not k.startswith("_")}


def check_error(call: Callable[[], object], error_type: type[bp.BatpakError], /, **fields: Any) -> bp.BatpakError:
    """``call()`` raises exactly ``error_type`` carrying exactly ``fields`` (a ``Has`` for prose)."""
    with pytest.raises(bp.BatpakError) as info:
        call()
    assert error_data(info.value) == (error_type, fields)
    return info.value


@dataclass(frozen=True)
class Impl:
    """One implementation under test: ``api`` (a bp.Engine or a bp.Store), its data
    directory, how to read its visible frontier (where a test starts counting), and how
    to open another instance over the same data (for an engine only once ``api`` is
    closed: the open one holds the directory's lock)."""

    name: str
    api: EventStore
    data_dir: str
    visible: Callable[[], int]
    reopen: Callable[[], EventStore]

    def coord(self, entity: str = "e", scope: str | None = None) -> bp.Coordinate:
        """A coordinate no other test uses (the store and engine live for a whole module)."""
        tag = uuid.uuid4().hex[:12]
        return bp.Coordinate(f"{entity}-{tag}", scope if scope is not None else f"s-{tag}")

    def shapes(self) -> Shapes:
        return Shapes(self.visible())


def differs(wrong: str, reason: str) -> pytest.MarkDecorator:
    """Mark a test whose contract ``wrong`` ("engine" or "store") breaks today: a strict
    xfail on that side only (run it as written on the other)."""
    assert wrong in IMPLS, wrong
    params = [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"{name}: {reason}"))
              if name == wrong else name for name in IMPLS]
    return pytest.mark.parametrize("impl", params, indirect=True)
