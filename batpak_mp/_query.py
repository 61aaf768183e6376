"""The one filter of every read that selects events: ``Region`` (upstream's predicate).

Owns: ``Region`` — an entity (exact, or a prefix matched at ``:`` boundaries), a scope, a
kind (exact, a set of kinds, or a category), an inclusive entity-clock range and an upper
bound on the global sequence (``upto``) — validated once, at construction, into typed
errors naming the value at fault; how a region is tested against an index record (the
hashes and copies the 64-byte record holds: cheap, may pass a hash collision; one record,
or a numpy array of them) and against
an ``Event`` (exact); and ``identity()``, the stable text a durable cursor is bound to.
``query_after``, ``subscribe``, cursors, reactors, projections and the newer calls
(``history``, ``query_scope``) all take one.
Invariants: a Region is immutable and valid once built; ``passes_record`` never rejects an
event ``matches`` accepts (it is a prefilter); ``identity()`` depends only on what the
region selects, never on how it was spelled.
Pure: no I/O, clock or randomness. Must not import the reader, the engine, the client or
any process role.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from ._errors import InvalidArgument, InvalidKind
from ._format.directory import name_hash
from ._values import CATEGORY_SYSTEM, Event, Kind, check_kind, check_name

__all__ = ["Region", "entity_in_prefix", "region_of"]

PREFIX_SEP = ":"  # an entity prefix matches the entity itself or anything under "<prefix>:"
MAX_KINDS = 4096  # kinds one region may name (a set, tested per record): a bound on caller input


def entity_in_prefix(entity: str, prefix: str) -> bool:
    """Whether ``entity`` is ``prefix`` or lies under it at a ``:`` boundary (``a`` holds
    ``a`` and ``a:x``, not ``ab``)."""
    return entity == prefix or (entity.startswith(prefix) and entity[len(prefix)] == PREFIX_SEP)


def _int_at_least(name: str, value: Any, low: int) -> int:
    if type(value) is not int or value < low:
        raise InvalidArgument(name, value, f"must be an int >= {low}")
    return value


@dataclass(frozen=True, slots=True)
class Region:
    """Which events a read selects. Every field is optional and they combine with AND:

    - ``entity``: exactly this entity; ``entity_prefix``: this entity and every entity
      under it at a ``:`` boundary (not both);
    - ``scope``: exactly this scope;
    - ``kind``: exactly this kind; ``kinds``: any of these kinds; ``category``: any kind
      of this category (0..15);
    - ``clock``: ``(first, last)`` entity clocks, inclusive (``last`` None: no end);
    - ``upto``: no event with a global sequence above this one.

    Bad values raise ``InvalidArgument`` / ``InvalidKind`` / ``InvalidCoordinate`` here,
    naming the value."""

    entity: str | None = None
    entity_prefix: str | None = None
    scope: str | None = None
    kind: Kind | None = None
    kinds: frozenset[Kind] | None = None
    category: int | None = None
    clock: tuple[int, int | None] | None = None
    upto: int | None = None

    def __post_init__(self) -> None:
        if self.entity is not None:
            check_name("entity", self.entity)
        if self.entity_prefix is not None:
            check_name("entity_prefix", self.entity_prefix)
            if self.entity is not None:
                raise InvalidArgument("entity_prefix", self.entity_prefix, "cannot be combined with entity")
        if self.scope is not None:
            check_name("scope", self.scope)
        if self.kind is not None:
            object.__setattr__(self, "kind", Kind.unpack(check_kind(self.kind, allow_reserved=True)))
        if self.kinds is not None:
            raw: Any = self.kinds
            if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable) or (
                    isinstance(raw, tuple) and len(raw) == 2 and not isinstance(raw[0], tuple)):
                raise InvalidArgument("kinds", raw, "must be a collection of bp.Kind")
            items = list(raw)
            if not items or len(items) > MAX_KINDS:
                raise InvalidArgument("kinds", raw, f"must name 1..{MAX_KINDS} kinds")
            object.__setattr__(self, "kinds", frozenset(Kind.unpack(check_kind(k, allow_reserved=True)) for k in items))
        if self.category is not None and (type(self.category) is not int or not 0 <= self.category <= 15):
            raise InvalidKind(self.category, None, "category must be an int in 0..15")
        if self.clock is not None:
            c = self.clock
            if not isinstance(c, tuple) or len(c) != 2:
                raise InvalidArgument("clock", c, "must be a (first, last) tuple of entity clocks")
            first = _int_at_least("clock", c[0], 0) if c[0] is not None else 0
            last = c[1]
            if last is not None and (type(last) is not int or last < first):
                raise InvalidArgument("clock", c, "last must be an int >= first, or None")
            object.__setattr__(self, "clock", (first, last))
        if self.upto is not None:
            _int_at_least("upto", self.upto, 0)

    # -- derived -----------------------------------------------------------------------------
    def packed_kinds(self) -> frozenset[int] | None:
        """The packed kinds a record's kind must be one of (None: any)."""
        sets: list[frozenset[int]] = []
        if self.kind is not None:
            sets.append(frozenset({self.kind.packed()}))
        if self.kinds is not None:
            sets.append(frozenset(k.packed() for k in self.kinds))
        if not sets:
            return None
        out = sets[0]
        for s in sets[1:]:
            out &= s
        if self.category is not None:
            out = frozenset(k for k in out if k >> 12 == self.category)
        return out

    def hashes(self) -> tuple[int, int]:
        """(entity hash, scope hash) a record must carry; 0: any."""
        return (name_hash(self.entity.encode()) if self.entity is not None else 0,
                name_hash(self.scope.encode()) if self.scope is not None else 0)

    def names_system(self) -> bool:
        """Whether the region asks for system events by name (an entity, or a system kind)."""
        packed = self.packed_kinds()
        return (self.entity is not None or self.category == CATEGORY_SYSTEM
                or (packed is not None and any(k >> 12 == CATEGORY_SYSTEM for k in packed)))

    def passes_record(self, seq: int, clock: int, kind: int, entity_hash: int, scope_hash: int,
                      hashes: tuple[int, int], packed: frozenset[int] | None) -> bool:
        """The prefilter on what an index record holds (``hashes`` and ``packed`` are
        ``self.hashes()`` and ``self.packed_kinds()``, computed once per read)."""
        if self.upto is not None and seq > self.upto:
            return False
        if hashes[0] and entity_hash != hashes[0]:
            return False
        if hashes[1] and scope_hash != hashes[1]:
            return False
        if packed is not None and kind not in packed:
            return False
        if self.category is not None and kind >> 12 != self.category:
            return False
        c = self.clock
        return c is None or (c[0] <= clock and (c[1] is None or clock <= c[1]))

    def records_mask(self, recs: Any) -> Any:
        """``passes_record`` for a whole numpy array of records (``_format.record.numpy_dtype``)
        at once, but for ``upto`` (the caller bounds the span): a bool array (numpy is
        imported here, by the readers that filter a long span column-wise)."""
        import numpy as np

        keep = np.ones(len(recs), dtype=bool)
        hashes = self.hashes()
        if hashes[0]:
            keep &= recs["entity_hash"] == np.uint64(hashes[0])
        if hashes[1]:
            keep &= recs["scope_hash"] == np.uint64(hashes[1])
        packed = self.packed_kinds()
        if packed is not None:
            keep &= np.isin(recs["kind"], np.array(sorted(packed), dtype=np.uint16))
        if self.category is not None:
            keep &= (recs["kind"] >> 12) == self.category
        if self.clock is not None:
            keep &= recs["entity_clock"] >= np.uint64(self.clock[0])
            if self.clock[1] is not None:
                keep &= recs["entity_clock"] <= np.uint64(self.clock[1])
        return keep

    def matches(self, ev: Event) -> bool:
        """The whole region, exactly, for one event."""
        if self.upto is not None and ev.global_sequence > self.upto:
            return False
        entity = ev.coordinate.entity
        if self.entity is not None and entity != self.entity:
            return False
        if self.entity_prefix is not None and not entity_in_prefix(entity, self.entity_prefix):
            return False
        if self.scope is not None and ev.coordinate.scope != self.scope:
            return False
        k = (ev.kind[0] << 12) | ev.kind[1]
        packed = self.packed_kinds()
        if packed is not None and k not in packed:
            return False
        if self.category is not None and ev.kind[0] != self.category:
            return False
        c = self.clock
        return c is None or (c[0] <= ev.entity_clock and (c[1] is None or ev.entity_clock <= c[1]))

    def identity(self) -> str:
        """A stable text naming what the region selects (a durable cursor is bound to it)."""
        packed = self.packed_kinds()
        parts = [
            f"e={self.entity!r}" if self.entity is not None else "",
            f"p={self.entity_prefix!r}" if self.entity_prefix is not None else "",
            f"s={self.scope!r}" if self.scope is not None else "",
            f"k={sorted(packed)}" if packed is not None else "",
            f"c={self.category}" if self.category is not None else "",
            f"clock={list(self.clock)}" if self.clock is not None else "",
            f"upto={self.upto}" if self.upto is not None else "",
        ]
        return ";".join(p for p in parts if p)

    def with_upto(self, upto: int | None) -> Region:
        """This region, bounded at ``upto`` as well (the lower of the two)."""
        if upto is None:
            return self
        bound = upto if self.upto is None else min(self.upto, upto)
        return Region(self.entity, self.entity_prefix, self.scope, self.kind, self.kinds, self.category,
                      self.clock, bound)


def region_of(region: Region | None = None, *, entity: str | None = None, scope: str | None = None,
              kind: Kind | None = None, kinds: Iterable[Kind] | None = None, upto: int | None = None,
              entity_prefix: str | None = None, category: int | None = None) -> Region:
    """The region of a read's keyword filters, or ``region`` with them added (a keyword
    given both ways must agree)."""
    if region is None:
        return Region(entity, entity_prefix, scope, kind, cast(Any, kinds), category,
                      None, upto)
    if not isinstance(region, Region):
        raise InvalidArgument("region", region, "must be a bp.Region")
    extra = Region(entity, entity_prefix, scope, kind, cast(Any, kinds), category,
                   None, upto)
    merged: dict[str, Any] = {}
    for name in ("entity", "entity_prefix", "scope", "kind", "kinds", "category", "upto"):
        mine, theirs = getattr(region, name), getattr(extra, name)
        if mine is not None and theirs is not None and mine != theirs and name != "upto":
            raise InvalidArgument(name, theirs, f"disagrees with the region's {mine!r}")
        merged[name] = theirs if mine is None else mine
    out = Region(merged["entity"], merged["entity_prefix"], merged["scope"], merged["kind"], merged["kinds"],
                 merged["category"], region.clock, None)
    return out.with_upto(region.upto).with_upto(extra.upto)
