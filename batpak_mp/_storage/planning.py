"""The commit decision logic as pure code: what a commit group of requests becomes.

Owns: the batch checks (empty, too many events, too many bytes, one key twice in a
batch), the idempotency guard (all of a batch's keys seen before: the original receipts;
some but not all: refused), the expected-clock guard, entity states within a group and
across written groups, encoding a request into a group (sequences, clocks, flags, event
ids, receipts: one call of the active codec's ``encode_request`` per request, which
mirrors ``_native/_pure.py``), taking a request back out (partial rollback), and whether
a group still fits in the active segment.
Invariants: a request is planned all or nothing: a refused one leaves the group and
``next_seq`` exactly as they were; sequences are contiguous within a group and across
groups; a group's entity states and keys are those of its own events, the last one of an
entity winning.
Pure, in the manner of h11: no files, no os, no mmap, no clock (``wall_ms`` comes in with
each group), no randomness. What planning needs to know about the log outside the group
comes through ``Lookups`` (the engine answers from its index files and reader; unit tests
answer from dicts). Must not import os, mmap, time, the osio seam, the read side or any
process role.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NamedTuple

from .._errors import ConcurrencyConflict, IdempotencyConflict, InvalidArgument, PayloadTooLarge
from .._format.frame import (
    FLAG_FENCED,
    FLAG_REDACTED,
    OK,
    ZERO_HASH,
    ZERO_ID,
    Frame,
)
from .._format.ids import event_id_prefix
from .._format.record import RECORD_SIZE
from .._format.segment import FOOTER_HEAD, SEG_HEADER_SIZE, SEG_TRAILER_SIZE
from .._native import encode_request, name_hash, scan_frame  # the active codec: C when built, else _format's
from .._prepare import Prepared
from .._values import Receipt

if TYPE_CHECKING:
    from .._signing import Signer

FOOTER_ROOM = FOOTER_HEAD.size + SEG_TRAILER_SIZE  # bytes a segment keeps free past its frames for the
# footer's head and the trailer; the footer's records come on top (RECORD_SIZE bytes per event)
ENTITY_CACHE_MAX = 1_000_000  # entity states remembered across groups; past it (and with nothing
# written but unpublished) the cache starts over: every state can be read back from the log
SCOPE_CACHE_MAX = 100_000  # scope name hashes remembered; past it the cache starts over


EventMeta = tuple[int, int, int, int, int, int, int, int, bytes, bytes]
"""What the index needs of one planned event, a plain tuple (one is built per event):
(seq, clock, kind, flags, frame_len, prev_seq, entity_hash, scope_hash, entity, idem)."""
M_SEQ: Final = 0  # positions in an EventMeta (Final: mypy reads each index's type)
M_CLOCK: Final = 1
M_KIND: Final = 2
M_FLAGS: Final = 3
M_FRAME_LEN: Final = 4
M_PREV_SEQ: Final = 5
M_ENTITY_HASH: Final = 6
M_SCOPE_HASH: Final = 7
M_ENTITY: Final = 8
M_IDEM: Final = 9


class EntityState(NamedTuple):
    """An entity's chain as far as planned: its clock and newest event."""

    clock: int  # 0: no event yet
    head_hash: bytes  # event hash of its newest event (ZERO_HASH: none)
    head_seq: int  # sequence of its newest event (0: none)
    name_hash: int  # cached: the index needs it for every event of the entity


def new_entity(entity: bytes) -> EntityState:
    """The state of an entity with no event."""
    return EntityState(0, ZERO_HASH, 0, name_hash(entity))


class Lookups(NamedTuple):
    """What planning asks about the log outside the group it plans."""

    entity_state: Callable[[bytes], EntityState]  # an entity's state in the published log
    idem_seq: Callable[[bytes], int]  # the sequence a key was written under (written or published); 0: never
    receipt_for: Callable[[int], Receipt]  # the receipt of an event written before this group
    # the frame of an event written before this group (the idempotency check compares a
    # re-used key's request with it); None: no such look-up (the check is skipped)
    frame_for: Callable[[int], Frame | None] | None = None


@dataclass(frozen=True)
class BatchLimits:
    max_events: int  # events in one request
    max_bytes: int  # encoded payload bytes of one request


def check_batch(items: Sequence[Prepared], limits: BatchLimits) -> None:
    """The checks of one request on its own: not empty, not too many events or bytes,
    no idempotency key twice."""
    if not items:
        raise InvalidArgument("items", [], "a batch needs at least one event")
    if len(items) > limits.max_events:
        raise InvalidArgument("items", len(items), f"a batch holds at most {limits.max_events} events")
    total = len(items[0].payload) if len(items) == 1 else sum(len(p.payload) for p in items)
    if total > limits.max_bytes:
        raise PayloadTooLarge(total, limits.max_bytes, "batch")
    if len(items) > 1:
        keyed = [p.idem for p in items if p.idem != ZERO_ID]
        if len(set(keyed)) != len(keyed):
            raise InvalidArgument("idempotency_key", None, "the same key appears twice in one batch")


def segment_bytes_for(nbytes: int, events: int) -> int:
    """The smallest segment that holds ``events`` frames of ``nbytes`` with its footer."""
    return SEG_HEADER_SIZE + nbytes + FOOTER_ROOM + events * RECORD_SIZE


def fits(end: int, count: int, size: int, group: Group) -> bool:
    """Whether ``group`` still fits in a segment of ``size`` bytes whose frames end at
    ``end`` and that holds ``count`` events (its footer lists every one of them)."""
    return end + group.nbytes + FOOTER_ROOM + (count + group.count) * RECORD_SIZE <= size


@dataclass
class Group:
    """Frames of one commit group, planned but not yet written."""

    wall_ms: int  # of every event of the group
    id_prefix: bytes  # the first 8 bytes of their event ids (wall ms, store tag)
    parts: list[bytes] = field(default_factory=list)  # the frames of each request, joined once at write
    part_starts: list[int] = field(default_factory=list)  # index of the first event of each of ``parts``
    nbytes: int = 0
    metas: list[EventMeta] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    entities: dict[bytes, EntityState] = field(default_factory=dict)  # states after this group's events
    idem: dict[bytes, int] = field(default_factory=dict)  # keys of this group -> sequence

    @property
    def count(self) -> int:
        return len(self.metas)

    def data(self) -> bytes:
        """Every frame of the group, one buffer for one write."""
        return b"".join(self.parts)


class Planner:
    """Plans requests into groups. Holds the next sequence and what was written so far
    of entity chains (``written`` moves it on once a group's write returned)."""

    def __init__(self, lookups: Lookups, limits: BatchLimits, store_tag: int, *,
                 signer: Signer | None = None, durable_receipts: bool = True, next_seq: int = 1) -> None:
        self.lookups = lookups
        self.limits = limits
        self.store_tag = store_tag
        self.signer = signer
        self.durable_receipts = durable_receipts  # receipts say durable (the sync mode fsyncs each group)
        self.next_seq = next_seq
        self._entities: dict[bytes, EntityState] = {}  # states as written (published or not)
        self._scope_hashes: dict[bytes, int] = {}

    # -- groups ---------------------------------------------------------------------------
    def group(self, wall_ms: int) -> Group:
        """An empty group whose events carry ``wall_ms``."""
        return Group(wall_ms, event_id_prefix(wall_ms, self.store_tag))

    def next_group(self, group: Group) -> Group:
        """An empty group after ``group`` in the same commit (same wall clock)."""
        return Group(group.wall_ms, group.id_prefix)

    def written(self, group: Group) -> None:
        """``group`` is written: the next groups build on its entity states."""
        self._entities.update(group.entities)

    def abandon(self, group: Group) -> None:
        """Writing ``group`` (the last planned) failed: its sequences are free again."""
        if group.metas:
            self.next_seq = group.metas[0][M_SEQ]

    def trim(self, nothing_pending: bool) -> None:
        """Bound the entity cache. Only with nothing written but unpublished: such a
        group's states live only here until it is published."""
        if nothing_pending and len(self._entities) > ENTITY_CACHE_MAX:
            self._entities.clear()

    # -- requests -------------------------------------------------------------------------
    def plan(self, group: Group, items: Sequence[Prepared], fenced: bool = False) -> list[Receipt] | None:
        """Plan one request into ``group``: the batch checks, then the idempotency guard,
        then the frames. Returns None when the request was added, or the original receipts
        of a request committed before (nothing added). Raises the typed error that refuses
        the request; the group is then as it was."""
        check_batch(items, self.limits)
        originals = self.originals(group, items)
        if originals is None:
            self.encode(group, items, fenced)
        return originals

    def originals(self, group: Group, items: Sequence[Prepared]) -> list[Receipt] | None:
        """The idempotency guard: None when no key of the request was seen before, its
        original receipts when every key was, and a refusal when only some were."""
        if len(items) == 1:  # the common case, a single append
            seq = self._idem_seq(items[0].idem, group)
            if not seq:
                return None
            self._same_request(items[0], seq, group)
            return [self._original(seq, group)]
        seqs = [self._idem_seq(p.idem, group) for p in items]
        if not any(seqs):
            return None
        if not all(seqs):
            raise InvalidArgument("idempotency_key", None, "some keys of this batch were committed before and some not")
        for p, seq in zip(items, seqs, strict=True):
            self._same_request(p, seq, group)
        return [self._original(seq, group) for seq in seqs]

    def _same_request(self, p: Prepared, seq: int, group: Group) -> None:
        """``IdempotencyConflict`` when the event stored under ``p``'s key (at ``seq``)
        is not what ``p`` asks for: a key re-used for another request."""
        first = self.next_seq - group.count
        if seq >= first:
            frame = frame_in_group(group, seq - first)
        elif self.lookups.frame_for is not None:
            frame = self.lookups.frame_for(seq)
        else:
            return
        field = request_difference(p, frame) if frame is not None else None
        if field is not None:
            raise IdempotencyConflict(p.idem.hex(), seq, field)

    def encode(self, group: Group, items: Sequence[Prepared], fenced: bool = False) -> int:
        """Check each event's expected clock and encode the request into ``group``: one
        call of the active codec's ``encode_request`` (entity states, the guard, flags,
        event ids, frames, index metas, receipts). All or nothing: on a conflict the
        group is left as it was. Returns the request's byte size."""
        if len(self._scope_hashes) > SCOPE_CACHE_MAX:
            self._scope_hashes.clear()
        first = self.next_seq
        try:
            data, metas, receipts, keyed = encode_request(
                items, group.entities, self._entities, self.lookups.entity_state, first, group.wall_ms,
                group.id_prefix, FLAG_FENCED if fenced else 0, self.durable_receipts, self._scope_hashes, Receipt,
                EntityState)
        except ConcurrencyConflict as exc:
            raise self._all_conflicts(group, items, exc) from None
        if self.signer is not None:
            receipts = [self._signed(r, p) for r, p in zip(receipts, items, strict=True)]
        group.part_starts.append(len(group.metas))
        group.parts.append(data)
        group.metas += metas
        group.receipts += receipts
        group.idem.update(keyed)
        group.nbytes += len(data)
        self.next_seq = first + len(items)
        return len(data)

    def _all_conflicts(self, group: Group, items: Sequence[Prepared], first: ConcurrencyConflict) -> ConcurrencyConflict:
        """The conflict of a request naming every event whose expected clock is wrong
        (the codec stops at the first): each event's entity state as the guard saw it."""
        clocks: dict[bytes, int] = {}
        found: list[tuple[str, int, int]] = []
        for p in items:
            clock = clocks.get(p.entity)
            if clock is None:
                st = group.entities.get(p.entity) or self._entities.get(p.entity) or self.lookups.entity_state(p.entity)
                clock = st.clock
            if p.expected_clock is not None and p.expected_clock != clock:
                found.append((p.entity.decode(errors="replace"), p.expected_clock, clock))
            clocks[p.entity] = clock + 1
        if len(found) < 2:
            return first
        return ConcurrencyConflict(*found[0], conflicts=found)

    def _signed(self, r: Receipt, p: Prepared) -> Receipt:
        assert self.signer is not None
        return r._replace(signature=self.signer.sign(r.event_id, r.global_sequence, p.entity, p.scope, r.entity_clock,
                                                     r.event_hash, r.prev_hash, r.wall_ms))

    def truncate(self, group: Group, keep: int) -> None:
        """Take the group's events from index ``keep`` on back out (one request's worth,
        the last planned): the group and ``next_seq`` are as before it was planned."""
        dropped = group.metas[keep:]
        if not dropped:
            return
        while group.part_starts and group.part_starts[-1] >= keep:
            group.part_starts.pop()
            group.parts.pop()
        if group.part_starts:  # ``keep`` inside a request's frames: keep that request's first ones
            first = group.part_starts[-1]
            group.parts[-1] = group.parts[-1][:sum(m[M_FRAME_LEN] for m in group.metas[first:keep])]
        del group.metas[keep:]
        del group.receipts[keep:]
        group.nbytes = sum(m[M_FRAME_LEN] for m in group.metas)
        self.next_seq -= len(dropped)
        for m in dropped:
            group.idem.pop(m[M_IDEM], None)
        # entity states in the group: recompute from what is left (the last event of each wins)
        group.entities = {}
        for m, r in zip(group.metas, group.receipts, strict=True):
            group.entities[m[M_ENTITY]] = EntityState(m[M_CLOCK], r.event_hash, m[M_SEQ], m[M_ENTITY_HASH])

    # -- lookups --------------------------------------------------------------------------
    def _idem_seq(self, idem: bytes, group: Group) -> int:
        if idem == ZERO_ID:
            return 0  # an append without a key: nothing to deduplicate
        return group.idem.get(idem) or self.lookups.idem_seq(idem)

    def _original(self, seq: int, group: Group) -> Receipt:
        """The receipt of an event planned before: in this group, or written earlier."""
        first = self.next_seq - group.count
        if seq >= first:
            return group.receipts[seq - first]._replace(deduplicated=True)
        return self.lookups.receipt_for(seq)._replace(deduplicated=True)


def frame_in_group(group: Group, index: int) -> Frame | None:
    """The frame of the ``index``-th event of a planned (or written) group."""
    metas = group.metas
    if not 0 <= index < len(metas):
        return None
    off = sum(m[M_FRAME_LEN] for m in metas[:index])
    status, value = scan_frame(group.data(), off, off + metas[index][M_FRAME_LEN])
    return value if status == OK and isinstance(value, Frame) else None


def request_difference(p: Prepared, f: Frame) -> str | None:
    """The first field in which request ``p`` differs from the stored frame ``f`` (None:
    the same request). A stub's payload was removed: it is not compared."""
    if f.entity != p.entity:
        return "entity"
    if f.scope != p.scope:
        return "scope"
    if f.kind != p.kind:
        return "kind"
    if not f.flags & FLAG_REDACTED and bytes(f.payload) != p.payload:
        return "payload"
    if f.payload_version != p.payload_version:
        return "payload_version"
    if f.causation_id != p.causation:
        return "causation_id"
    if f.correlation_id != p.correlation:
        return "correlation_id"
    return None
