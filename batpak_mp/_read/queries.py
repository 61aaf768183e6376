"""The query calls of the read side, each a function over a ``Reader``: ``latest``,
``history`` (both ends bounded, newest first or oldest first), ``query_after`` /
``select`` (commit order, filtered by a ``Region``) and the per-scope positions reads.

Owns: the walk each call takes through the index — an entity's chain from its head for
anything about one entity, the scope chain for positions, the tag index's postings for an
entity prefix, a scope, kinds or a category (then the few records above it), the records in
order for the rest — so that a call's cost grows with the events it returns (and, for an entity or a
scope, the events between the head and them), not with the log.
Invariants: as the reader's (nothing beyond the visible frontier; every record checked
against its frame; a stale view is retried once through ``Reader._retrying``).
Must not import the engine, writer or client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any, Protocol

from .._errors import InvalidArgument
from .._format.directory import name_hash
from .._format.frame import FLAG_FENCED
from .._format.record import (
    R_ENTITY_CLOCK,
    R_ENTITY_HASH,
    R_FLAGS,
    R_KIND,
    R_PREV_IN_ENTITY,
    R_SCOPE_HASH,
    RECORD,
    RECORD_SIZE,
    RECORDS_HEADER_SIZE,
)
from .._format.record import numpy_dtype as record_dtype
from .._format.tables import walk_to_position
from .._format.tags import region_tag_options
from .._query import Region, entity_in_prefix, region_of
from .._values import CATEGORY_SYSTEM, SYSTEM_FENCE_COMMIT, Event, Kind, Page, check_name
from .positions import ScopeMaps
from .tags import TagMaps


class StaleView(Exception):
    """A record or slot did not match its frame: the index moved under us; refresh.
    (Defined here, where the query walks raise it; the reader re-exports it.)"""


class Reader(Protocol):
    """What the query walks use of ``reader.Reader`` (which imports this module)."""

    view: Any  # reader.View: .visible
    scopes: ScopeMaps
    tags: TagMaps | None
    entity_names: dict[int, str]

    def refresh(self) -> Any: ...

    def record(self, seq: int) -> tuple[Any, ...]: ...

    def event(self, seq: int, *, include_hidden: bool = False) -> Event: ...

    def hidden(self, seq: int, flags: int) -> bool: ...

    def head_of(self, entity_raw: bytes) -> int: ...

    def _records_map(self, seq: int) -> Any: ...

    def _retrying(self, fn: Callable[[], Any]) -> Any: ...

_rec_unpack = RECORD.unpack_from
SCAN_SPAN_MAX = 256  # records a query walks itself before asking the tag index (a follower's short step)
TAIL_CHUNK = 16_384  # records filtered column-wise at a time where the tag index does not reach (1 MiB copied)



def latest(reader: Reader, entity: str) -> Event | None:
    """The newest visible event of ``entity``, or None: one table lookup, then a step
    back along the entity's chain past events of an uncommitted fence."""
    raw = check_name("entity", entity)
    reader.refresh()

    def run() -> Event | None:
        seq = reader.head_of(raw)
        while seq:
            rec = reader.record(seq)
            if not (rec[R_FLAGS] & FLAG_FENCED and reader.hidden(seq, rec[R_FLAGS])):
                ev = reader.event(seq)
                if ev.coordinate.entity != entity:
                    raise _stale(f"entity chain of {entity!r}")
                return ev
            seq = rec[R_PREV_IN_ENTITY]
        return None

    found: Event | None = reader._retrying(run)
    return found


def history(reader: Reader, entity: str, after_clock: int | None = None, limit: int | None = None, *,
            before_clock: int | None = None, newest_first: bool = False) -> list[Event]:
    """An entity's events with ``after_clock < clock < before_clock``, oldest first
    (``newest_first``: newest first, and the walk back from the head stops at
    ``limit``). Walks the entity's chain from its head: the cost is the events between
    the head and the last one returned, never the log."""
    raw = check_name("entity", entity)
    if after_clock is not None and (type(after_clock) is not int or after_clock < 0):
        raise InvalidArgument("after_clock", after_clock, "must be an int >= 0")
    if before_clock is not None and (type(before_clock) is not int or before_clock < 1):
        raise InvalidArgument("before_clock", before_clock, "must be an int >= 1")
    if limit is not None and (type(limit) is not int or limit < 0):
        raise InvalidArgument("limit", limit, "must be an int >= 0")
    if type(newest_first) is not bool:
        raise InvalidArgument("newest_first", newest_first, "must be a bool")
    reader.refresh()
    floor = after_clock or 0
    ceiling = before_clock

    def run() -> list[Event]:
        seq = reader.head_of(raw)
        seqs: list[int] = []
        while seq:
            if newest_first and limit is not None and len(seqs) >= limit:
                break
            rec = reader.record(seq)
            clock = rec[R_ENTITY_CLOCK]
            if clock <= floor:
                break
            if (ceiling is None or clock < ceiling) and not (
                    rec[R_FLAGS] & FLAG_FENCED and reader.hidden(seq, rec[R_FLAGS])):
                seqs.append(seq)
            seq = rec[R_PREV_IN_ENTITY]
        if not newest_first:
            seqs.reverse()
        if limit is not None:
            seqs = seqs[:limit]
        out = [reader.event(s) for s in seqs]
        for ev in out:
            if ev.coordinate.entity != entity:
                raise _stale(f"entity chain of {entity!r}")
        return out

    result: list[Event] = reader._retrying(run)
    return result


def query_after(
    reader: Reader, after: int = 0, limit: int = 1000, entity: str | None = None,
    scope: str | None = None, kind: Any = None, *, upto: int | None = None, skip_fenced: bool = False,
    kinds: Any = None, region: Region | None = None,
) -> Page:
    """Events after ``after`` in commit order that the region (built from the
    keyword filters, or given whole) selects. ``upto``: look no further than that
    sequence. ``skip_fenced``: leave out every event written in a fence, revealed or
    not (subscriptions deliver those at their FENCE_COMMIT instead). With an exact
    entity the entity's chain is walked instead of the log; with an entity prefix, a scope,
    kinds or a category, the tag index's postings (and the few records above it)."""
    if type(after) is not int or after < 0:
        raise InvalidArgument("after", after, "must be an int >= 0")
    if type(limit) is not int or limit < 1:
        raise InvalidArgument("limit", limit, "must be an int >= 1")
    if kind is not None and (not isinstance(kind, tuple) or len(kind) != 2):
        raise InvalidArgument("kind", kind, "must be a bp.Kind")
    reg = region_of(region, entity=entity, scope=scope, kind=Kind(*kind) if kind is not None else None, kinds=kinds,
                    upto=upto)
    return select(reader, after, limit, reg, skip_fenced=skip_fenced)


def select(reader: Reader, after: int, limit: int, reg: Region, *, skip_fenced: bool = False) -> Page:
    """``query_after`` over a built region (see there)."""
    view = reader.refresh()
    visible = view.visible if reg.upto is None else min(view.visible, reg.upto)
    hashes = reg.hashes()
    packed = reg.packed_kinds()
    passes = reg.passes_record
    exact = reg.entity is not None or reg.scope is not None or reg.entity_prefix is not None
    prefix = reg.entity_prefix

    def run() -> Page:
        events: list[Event] = []
        if visible <= after:
            return Page(events, after)
        seqs: Iterable[int] = range(after + 1, visible + 1)
        if reg.entity is not None:
            seqs = entity_seqs_after(reader, reg.entity.encode(), after, visible)
        elif visible - after > SCAN_SPAN_MAX and region_tag_options(reg) is not None:
            found = reader.tags.candidates(reg, after, visible) if reader.tags is not None else None
            indexed, through = found if found is not None else ((), after)
            seqs = chain(indexed, tail_candidates(reader, reg, through, visible))
        m = reader._records_map(visible)
        seq = after
        for seq in seqs:
            rec = _rec_unpack(m, RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE)
            if not passes(seq, rec[R_ENTITY_CLOCK], rec[R_KIND], rec[R_ENTITY_HASH], rec[R_SCOPE_HASH],
                          hashes, packed):
                continue
            if rec[R_FLAGS] & FLAG_FENCED and (skip_fenced or reader.hidden(seq, rec[R_FLAGS])):
                continue
            if prefix is not None and not entity_in_prefix(entity_name(reader, rec[R_ENTITY_HASH], seq), prefix):
                continue  # an entity outside the prefix (its name read once per reader)
            ev = reader.event(seq)
            if exact and not reg.matches(ev):
                continue
            events.append(ev)
            if len(events) >= limit:
                break
        else:
            seq = visible  # every sequence up to the bound was looked at
        return Page(events, seq)

    page: Page = reader._retrying(run)
    return page


def tail_candidates(reader: Reader, reg: Region, after: int, upto: int) -> Iterable[int]:
    """The sequences in ``(after, upto]`` whose records pass ``reg``'s scope, kinds,
    category and clock and whose entity is under its prefix (a hash's verdict, from one
    frame per entity, remembered by the reader): a span the tag index does not cover,
    filtered column-wise (numpy over a copy of the records, a chunk at a time) when it is
    long."""
    if upto - after <= SCAN_SPAN_MAX:
        return range(after + 1, upto + 1)
    return _filtered_chunks(reader, reg, after, upto)


def _filtered_chunks(reader: Reader, reg: Region, after: int, upto: int) -> Iterator[int]:
    import numpy as np

    for lo in range(after, upto, TAIL_CHUNK):
        hi = min(lo + TAIL_CHUNK, upto)
        m = reader._records_map(hi)
        off = RECORDS_HEADER_SIZE + lo * RECORD_SIZE
        recs = np.frombuffer(bytes(m[off:off + (hi - lo) * RECORD_SIZE]), dtype=record_dtype())  # a copy: no map pinned
        keep = reg.records_mask(recs)
        if reg.entity_prefix is not None:
            uniq, first = np.unique(recs["entity_hash"][keep], return_index=True)
            at = np.flatnonzero(keep)[first]
            prefix = reg.entity_prefix
            under = [h for h, i in zip(uniq.tolist(), at.tolist(), strict=True)
                     if entity_in_prefix(entity_name(reader, h, lo + 1 + i), prefix)]
            keep &= np.isin(recs["entity_hash"], np.array(under, dtype=np.uint64))
        yield from (np.flatnonzero(keep) + (lo + 1)).tolist()


ENTITY_NAMES_MAX = 100_000  # entity hash -> name a reader remembers for prefix verdicts (then starts over)


def entity_name(reader: Reader, h: int, seq: int) -> str:
    """The entity name of hash ``h``, read from the frame at ``seq`` once and remembered
    (a hash shared by two entities, 2**-64 a pair, could give the other's verdict: every
    candidate is checked against its own frame later)."""
    names = reader.entity_names
    name = names.get(h)
    if name is None:
        if len(names) >= ENTITY_NAMES_MAX:
            names.clear()
        name = names[h] = reader.event(seq, include_hidden=True).coordinate.entity
    return name


def entity_seqs_after(reader: Reader, raw: bytes, after: int, visible: int) -> list[int]:
    """The sequences of an entity's events in ``(after, visible]``, ascending, from its chain."""
    seq = reader.head_of(raw)
    while seq > visible:
        seq = reader.record(seq)[R_PREV_IN_ENTITY]
    out: list[int] = []
    while seq > after:
        out.append(seq)
        seq = reader.record(seq)[R_PREV_IN_ENTITY]
    out.reverse()
    return out



def _stale(what: str) -> Exception:
    return StaleView(what)


# -- per-scope positions ----------------------------------------------------------------------
SCOPE_CHUNK = 256  # positions looked at per walk while a region filters a scope's events


def scope_head(reader: Reader, scope_raw: bytes) -> tuple[int, int]:
    """(sequence, position) of the newest event of a scope this reader may see, or (0, 0):
    the head in scopeheads.idx, stepped back along the scope's chain past what the view
    does not show yet (beyond the frontier, or inside a fence not revealed to it)."""
    h = name_hash(scope_raw)
    visible = reader.view.visible
    scopes = reader.scopes
    for candidate in scopes.head_candidates(h):
        seq = candidate
        while seq:
            pos, prev, _ = scopes.entry(seq)
            if not pos:
                break  # no entry: not this scope's chain (or stale): try another candidate
            if seq <= visible:
                rec = reader.record(seq)
                if rec[R_SCOPE_HASH] != h:
                    break
                if not (rec[R_FLAGS] & FLAG_FENCED and reader.hidden(seq, rec[R_FLAGS])):
                    return seq, pos
            seq = prev
    return 0, 0


def latest_in_scope(reader: Reader, scope: str) -> Event | None:
    """The newest event of ``scope`` in stream order (highest position), or None."""
    raw = check_name("scope", scope)
    reader.refresh()

    def run() -> Event | None:
        seq, _ = scope_head(reader, raw)
        if not seq:
            return None
        ev = reader.event(seq)
        if ev.coordinate.scope != scope:
            raise _stale(f"scope chain of {scope!r}")
        return ev

    found: Event | None = reader._retrying(run)
    return found


def query_scope(reader: Reader, scope: str, after_position: int = 0, limit: int = 1000,
                upto_position: int | None = None, region: Region | None = None) -> Page:
    """The events of ``scope`` with positions above ``after_position`` (and at most
    ``upto_position``), in position order, that ``region`` also selects; at most
    ``limit``. ``page.next_after`` is the last *position* looked at (resume with it).
    Cost: a seek of O(log n) steps along the scope's skip links, then the positions
    returned (with a region: the positions looked at)."""
    raw = check_name("scope", scope)
    if type(after_position) is not int or after_position < 0:
        raise InvalidArgument("after_position", after_position, "must be an int >= 0")
    if type(limit) is not int or limit < 1:
        raise InvalidArgument("limit", limit, "must be an int >= 1")
    if upto_position is not None and (type(upto_position) is not int or upto_position < 0):
        raise InvalidArgument("upto_position", upto_position, "must be an int >= 0")
    if region is not None and not isinstance(region, Region):
        raise InvalidArgument("region", region, "must be a bp.Region")
    reader.refresh()
    entry = reader.scopes.entry

    def run() -> Page:
        head, head_pos = scope_head(reader, raw)
        top_bound = head_pos if upto_position is None else min(head_pos, upto_position)
        events: list[Event] = []
        looked = after_position
        while looked < top_bound and len(events) < limit:
            want = limit - len(events)
            top = min(top_bound, looked + (want if region is None else max(want, SCOPE_CHUNK)))
            seq = walk_to_position(entry, head, head_pos, top)
            seqs: list[int] = []
            for _ in range(top - looked):
                if not seq:
                    raise _stale(f"positions of scope {scope!r}")
                seqs.append(seq)
                seq = entry(seq)[1]
            seqs.reverse()
            for pos, s in enumerate(seqs, start=looked + 1):
                ev = reader.event(s)
                if ev.coordinate.scope != scope or ev.scope_position != pos:
                    raise _stale(f"positions of scope {scope!r}")
                if region is None or region.matches(ev):
                    events.append(ev)
                    if len(events) >= limit:
                        return Page(events, pos)
            looked = top
        return Page(events, max(looked, after_position))

    page: Page = reader._retrying(run)
    return page


# -- stream order -----------------------------------------------------------------------------
FENCE_COMMIT_REGION = Region(kind=Kind(CATEGORY_SYSTEM, SYSTEM_FENCE_COMMIT))
StreamEntry = tuple[Event, int, bool]  # (event, stream position, the last entry at that position)


def stream_page(reader: Reader, after: int, limit: int, region: Region) -> tuple[list[StreamEntry], int]:
    """The next page after stream position ``after`` in *stream* order, for consumers that
    keep a position (subscriptions, cursors, reactors, consumer groups, incremental
    projections). An event written in a visibility fence is delivered where its
    FENCE_COMMIT event stands (its stream position is the commit's sequence), after the
    commit, in the order of the commit's ranges: a consumer that had passed its own
    sequence still gets it, exactly once. Each entry says its stream position and whether
    it is the last one delivered at that position (an ack of an earlier one of a commit
    must not cover the rest). Returns (entries, the last position looked at); ``region``
    filters (its ``upto`` bounds the positions)."""
    page = select(reader, after, limit, region, skip_fenced=True)
    end = page.next_after
    commits = select(reader, after, 1 << 62, FENCE_COMMIT_REGION.with_upto(end)).events
    if not commits:
        return [(e, e.global_sequence, True) for e in page.events], end
    keyed: list[tuple[int, int, Event]] = [(e.global_sequence, 0, e) for e in page.events]
    for c in commits:
        n = 0
        for first, last in c.payload["ranges"]:
            for seq in range(int(first), int(last) + 1):
                ev = reader.event(seq, include_hidden=True)  # the commit event is the authority
                if region.matches(ev):  # its own sequence is below the commit: within any bound the commit is
                    n += 1
                    keyed.append((c.global_sequence, n, ev))
    keyed.sort(key=lambda t: (t[0], t[1]))
    out: list[StreamEntry] = []
    for i, (pos, _, ev) in enumerate(keyed):
        out.append((ev, pos, i + 1 == len(keyed) or keyed[i + 1][0] != pos))
    return out, end
