"""The commit decision logic (batpak_mp/_storage/planning.py), driven with plain values.

No files, no engine: the log outside the group is a few dicts behind ``Lookups``, the
wall clock is a number. Covered: contiguous sequences and per-entity clocks and chains;
the flags (commit end, fence, causation, correlation); event ids; the batch checks; the
idempotency guard within a group, against written keys, and all-or-none; the
expected-clock guard; rollback (a refused request leaves the group and ``next_seq``
exactly as they were, and a property test: planning with refusals gives the same bytes
as planning only what was accepted); written groups, abandon, the cache bound; whether a
group fits; signed receipts.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batpak_mp as bp
from batpak_mp._format.frame import (
    FLAG_COMMIT_END,
    FLAG_FENCED,
    FLAG_HAS_CAUSATION,
    FLAG_HAS_CORRELATION,
    ZERO_HASH,
    Frame,
    decode_frame,
)
from batpak_mp._format.ids import event_id_prefix, event_id_sequence
from batpak_mp._format.record import RECORD_SIZE
from batpak_mp._prepare import Prepared, prepare
from batpak_mp._signing import Signer
from batpak_mp._storage import planning
from batpak_mp._storage.planning import (
    FOOTER_ROOM,
    BatchLimits,
    EntityState,
    Group,
    Lookups,
    Planner,
    check_batch,
    fits,
    new_entity,
    segment_bytes_for,
)

K = bp.Kind(1, 7)
WALL_MS = 1_700_000_000_123
STORE_TAG = 0xBEEF
LIMITS = BatchLimits(max_events=50, max_bytes=10_000)


def ev(entity: str, payload: object = 0, *, key: str | None = None, expected: int | None = None,
       causation: bytes | None = None, correlation: bytes | None = None) -> Prepared:
    return prepare(bp.Coordinate(entity, "room"), K, payload, idempotency_key=key, expected_clock=expected,
                   causation_id=causation, correlation_id=correlation, max_payload=1 << 20)


@dataclass
class FakeLog:
    """The log outside the group: entity states, written keys and their receipts."""

    states: dict[bytes, EntityState] = field(default_factory=dict)
    keys: dict[bytes, int] = field(default_factory=dict)
    receipts: dict[int, bp.Receipt] = field(default_factory=dict)
    state_lookups: list[bytes] = field(default_factory=list)

    def entity_state(self, entity: bytes) -> EntityState:
        self.state_lookups.append(entity)
        return self.states.get(entity) or new_entity(entity)

    def lookups(self) -> Lookups:
        return Lookups(self.entity_state, lambda idem: self.keys.get(idem, 0), self.receipts.__getitem__)


def planner(log: FakeLog | None = None, *, next_seq: int = 1, signer: Signer | None = None) -> Planner:
    return Planner((log or FakeLog()).lookups(), LIMITS, STORE_TAG, signer=signer, next_seq=next_seq)


def frames_of(group: Group) -> list[Frame]:
    data, out, off = group.data(), [], 0
    while off < len(data):
        f = decode_frame(data[off:])
        assert isinstance(f, Frame)
        out.append(f)
        off += f.frame_len
    return out


def snapshot(p: Planner, group: Group) -> tuple[int, Group]:
    return p.next_seq, copy.deepcopy(group)


# ---- sequences, clocks, chains, flags, ids ----------------------------------------------
def test_sequences_are_contiguous_and_clocks_count_per_entity() -> None:
    log = FakeLog()
    a_head = EntityState(4, b"\xaa" * 32, 7, new_entity(b"a").name_hash)
    log.states[b"a"] = a_head
    p = planner(log, next_seq=10)
    g = p.group(WALL_MS)
    assert p.plan(g, [ev("a"), ev("b")]) is None
    assert p.plan(g, [ev("a")]) is None
    assert p.plan(g, [ev("b"), ev("c"), ev("a")]) is None
    seqs = [m[planning.M_SEQ] for m in g.metas]
    assert seqs == list(range(10, 16)) and p.next_seq == 16
    assert [(r.entity, r.entity_clock) for r in g.receipts] == [
        ("a", 5), ("b", 1), ("a", 6), ("b", 2), ("c", 1), ("a", 7)]
    # each event chains to the entity's previous one: hash and sequence
    assert g.receipts[0].prev_hash == a_head.head_hash and g.metas[0][planning.M_PREV_SEQ] == a_head.head_seq
    assert g.receipts[2].prev_hash == g.receipts[0].event_hash and g.metas[2][planning.M_PREV_SEQ] == 10
    assert g.receipts[1].prev_hash == ZERO_HASH and g.metas[1][planning.M_PREV_SEQ] == 0
    assert g.entities[b"a"] == EntityState(7, g.receipts[5].event_hash, 15, a_head.name_hash)
    assert g.count == 6 and g.nbytes == sum(m[planning.M_FRAME_LEN] for m in g.metas) == len(g.data())


def test_the_frames_decode_to_what_was_planned() -> None:
    p = planner(next_seq=3)
    g = p.group(WALL_MS)
    cause, corr = b"\x01" * 16, b"\x02" * 16
    p.plan(g, [ev("a", {"x": 1}, key="k1"), ev("b", [1, 2], causation=cause)])
    p.plan(g, [ev("a", "z", correlation=corr)], fenced=True)
    p.plan(g, [ev("c", None, causation=cause, correlation=corr)])
    frames = frames_of(g)
    assert [f.global_sequence for f in frames] == [3, 4, 5, 6]
    assert [f.event_hash for f in frames] == [r.event_hash for r in g.receipts]
    assert [f.event_id for f in frames] == [r.event_id for r in g.receipts]
    assert [f.flags for f in frames] == [
        0,
        FLAG_COMMIT_END | FLAG_HAS_CAUSATION,
        FLAG_COMMIT_END | FLAG_FENCED | FLAG_HAS_CORRELATION,
        FLAG_COMMIT_END | FLAG_HAS_CAUSATION | FLAG_HAS_CORRELATION,
    ]
    assert [m[planning.M_FLAGS] for m in g.metas] == [f.flags for f in frames]
    assert frames[1].causation_id == cause and frames[2].correlation_id == corr
    assert all(f.wall_ms == WALL_MS for f in frames)


def test_event_ids_carry_the_wall_clock_store_tag_and_sequence() -> None:
    p = planner(next_seq=41)
    g = p.group(WALL_MS)
    p.plan(g, [ev("a"), ev("a")])
    for r in g.receipts:
        assert r.event_id[:8] == event_id_prefix(WALL_MS, STORE_TAG)
        assert event_id_sequence(r.event_id) == r.global_sequence
        assert r.wall_ms == WALL_MS


def test_a_group_after_another_in_the_same_commit_keeps_its_clock() -> None:
    p = planner()
    g = p.group(WALL_MS)
    nxt = p.next_group(g)
    assert (nxt.wall_ms, nxt.id_prefix, nxt.count) == (g.wall_ms, g.id_prefix, 0)


# ---- batch checks -----------------------------------------------------------------------
@pytest.mark.parametrize(("items", "error"), [
    ([], bp.InvalidArgument),
    ([ev(f"e{i}") for i in range(51)], bp.InvalidArgument),
    ([ev("a", "x" * 6000), ev("b", "y" * 6000)], bp.PayloadTooLarge),
    ([ev("a", key="k"), ev("b", key="k")], bp.InvalidArgument),
])
def test_batch_checks_refuse_and_leave_the_group_alone(items: list[Prepared], error: type[Exception]) -> None:
    with pytest.raises(error):
        check_batch(items, LIMITS)
    p = planner()
    g = p.group(WALL_MS)
    p.plan(g, [ev("a")])
    before = snapshot(p, g)
    with pytest.raises(error):
        p.plan(g, items)
    assert snapshot(p, g) == before


def test_several_events_without_keys_are_one_batch() -> None:
    check_batch([ev("a"), ev("a"), ev("b")], LIMITS)


# ---- the idempotency guard --------------------------------------------------------------
def test_a_key_seen_earlier_in_the_group_returns_the_first_receipts() -> None:
    p = planner()
    g = p.group(WALL_MS)
    assert p.plan(g, [ev("a", key="k1"), ev("b", key="k2")]) is None
    first = list(g.receipts)
    before = snapshot(p, g)
    again = p.plan(g, [ev("a", key="k1"), ev("b", key="k2")])
    assert again == [r._replace(deduplicated=True) for r in first]
    assert snapshot(p, g) == before  # nothing added
    with pytest.raises(bp.IdempotencyConflict) as info:  # the same key for another request (issue 15)
        p.plan(g, [ev("x", "other payload", key="k1"), ev("y", key="k2")])
    assert (info.value.sequence, info.value.field) == (first[0].global_sequence, "entity")
    assert snapshot(p, g) == before


def test_written_keys_return_their_original_receipts() -> None:
    log = FakeLog()
    p0 = planner(next_seq=5)
    g0 = p0.group(WALL_MS - 10)
    p0.plan(g0, [ev("a", key="k1"), ev("a", key="k2")])
    original = g0.receipts
    for r, item in zip(original, (ev("a", key="k1"), ev("a", key="k2")), strict=True):
        log.keys[item.idem] = r.global_sequence
        log.receipts[r.global_sequence] = r
    p = planner(log, next_seq=7)
    g = p.group(WALL_MS)
    assert p.plan(g, [ev("a", key="k2"), ev("a", key="k1")]) == [original[1]._replace(deduplicated=True),
                                                                 original[0]._replace(deduplicated=True)]
    assert g.count == 0 and p.next_seq == 7


@pytest.mark.parametrize("other", [None, "new-key"])
def test_some_keys_seen_and_some_not_is_refused(other: str | None) -> None:
    log = FakeLog()
    seen = ev("a", key="seen")
    log.keys[seen.idem] = 3
    p = planner(log, next_seq=4)
    g = p.group(WALL_MS)
    p.plan(g, [ev("z", key="in-group")])
    before = snapshot(p, g)
    with pytest.raises(bp.InvalidArgument):
        p.plan(g, [seen, ev("b", key=other)])
    with pytest.raises(bp.InvalidArgument):  # a key of this group counts as seen too
        p.plan(g, [ev("c", key="in-group"), ev("d", key="fresh")])
    assert snapshot(p, g) == before


# ---- the expected-clock guard and rollback ----------------------------------------------
def test_expected_clock_conflict_names_both_clocks() -> None:
    log = FakeLog()
    log.states[b"a"] = EntityState(3, b"\x01" * 32, 9, new_entity(b"a").name_hash)
    p = planner(log, next_seq=10)
    g = p.group(WALL_MS)
    with pytest.raises(bp.ConcurrencyConflict) as ei:
        p.plan(g, [ev("a", expected=2)])
    assert (ei.value.entity, ei.value.expected, ei.value.actual) == ("a", 2, 3)
    assert p.plan(g, [ev("a", expected=3)]) is None
    assert p.plan(g, [ev("a", expected=4), ev("new", expected=0)]) is None  # builds on the group's own events


def test_a_conflict_late_in_a_batch_rolls_the_whole_batch_back() -> None:
    p = planner(next_seq=100)
    g = p.group(WALL_MS)
    p.plan(g, [ev("a", key="k0"), ev("b")])
    before = snapshot(p, g)
    with pytest.raises(bp.ConcurrencyConflict):
        # a and b move on and a key is taken before the third event conflicts
        p.plan(g, [ev("a", key="k1"), ev("b"), ev("c", expected=5)])
    assert snapshot(p, g) == before
    # the key of the refused batch is free; the next request gets the refused one's sequences
    assert p.plan(g, [ev("a", key="k1")]) is None
    assert g.metas[-1][planning.M_SEQ] == 102 and g.receipts[-1].entity_clock == 2


def test_truncate_takes_the_last_request_back_exactly() -> None:
    p = planner(next_seq=1)
    g = p.group(WALL_MS)
    p.plan(g, [ev("a"), ev("b", key="kb")])
    before = snapshot(p, g)
    p.plan(g, [ev("b", key="kb2"), ev("a"), ev("c")], fenced=True)
    p.truncate(g, 2)
    assert snapshot(p, g) == before
    p.truncate(g, 2)  # nothing past it: no change
    assert snapshot(p, g) == before


Request = tuple[tuple[str, int | None, str | None], ...]  # (entity, expected clock, key) per event
requests_st = st.lists(
    st.lists(st.tuples(st.sampled_from("abc"), st.one_of(st.none(), st.integers(0, 4)),
                       st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3", "k4"]))),
             min_size=0, max_size=4).map(tuple),
    min_size=1, max_size=12)


def _plan_all(requests: Sequence[Request]) -> tuple[Planner, Group, list[int]]:
    p = planner(next_seq=1)
    g = p.group(WALL_MS)
    accepted = []
    for i, req in enumerate(requests):
        items = [ev(e, [j, c, k], key=k, expected=c) for j, (e, c, k) in enumerate(req)]
        try:
            if p.plan(g, items) is None:
                accepted.append(i)
        except bp.BatpakError:
            pass
    return p, g, accepted


@settings(max_examples=200, deadline=None)
@given(requests_st)
def test_refused_requests_leave_no_trace(requests: list[Request]) -> None:
    """Planning with refusals and duplicates in between gives exactly what planning only
    the accepted requests gives: same bytes, metas, receipts, states, keys, next_seq."""
    p1, g1, accepted = _plan_all(requests)
    p2, g2, again = _plan_all([requests[i] for i in accepted])
    assert again == list(range(len(accepted)))
    assert g1.data() == g2.data() and g1 == g2 and p1.next_seq == p2.next_seq
    assert [m[planning.M_SEQ] for m in g1.metas] == list(range(1, g1.count + 1))


# ---- written groups, abandon, the caches ------------------------------------------------
def test_the_next_group_builds_on_a_written_one() -> None:
    log = FakeLog()
    p = planner(log)
    g1 = p.group(WALL_MS)
    p.plan(g1, [ev("a"), ev("a")])
    p.written(g1)
    g2 = p.next_group(g1)
    p.plan(g2, [ev("a", expected=2)])
    assert g2.receipts[0].prev_hash == g1.receipts[1].event_hash and g2.metas[0][planning.M_PREV_SEQ] == 2
    assert log.state_lookups == [b"a"]  # asked the log once: written states are remembered


def test_an_abandoned_group_frees_its_sequences_and_states() -> None:
    log = FakeLog()
    p = planner(log, next_seq=20)
    g1 = p.group(WALL_MS)
    p.plan(g1, [ev("a"), ev("b")])
    p.abandon(g1)  # its write failed: never written()
    assert p.next_seq == 20
    g2 = p.next_group(g1)
    p.plan(g2, [ev("a", expected=0)])
    assert g2.metas[0][planning.M_SEQ] == 20
    p.abandon(p.next_group(g2))  # an empty group: nothing to free
    assert p.next_seq == 21


def test_the_entity_cache_starts_over_only_with_nothing_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning, "ENTITY_CACHE_MAX", 1)
    log = FakeLog()
    p = planner(log)
    g = p.group(WALL_MS)
    p.plan(g, [ev("a"), ev("b")])
    p.written(g)
    p.trim(nothing_pending=False)  # written, not published: its states live only in the cache
    p.plan(p.next_group(g), [ev("a", expected=1)])
    p.trim(nothing_pending=True)
    p.plan(p.next_group(g), [ev("a")])
    assert log.state_lookups == [b"a", b"b", b"a"]


# ---- fitting a segment ------------------------------------------------------------------
def test_fits_counts_frames_footer_and_trailer() -> None:
    p = planner()
    g = p.group(WALL_MS)
    p.plan(g, [ev("a", "x" * 100), ev("b")])
    end, count = 4096, 10
    size = end + g.nbytes + FOOTER_ROOM + (count + g.count) * RECORD_SIZE
    assert fits(end, count, size, g)
    assert not fits(end, count, size - 1, g)
    assert segment_bytes_for(g.nbytes, g.count) == 64 + g.nbytes + FOOTER_ROOM + g.count * RECORD_SIZE


# ---- receipts ---------------------------------------------------------------------------
def test_receipts_are_signed_and_say_whether_durable() -> None:
    signer = Signer(bytes(range(32)))
    p = planner(signer=signer)
    g = p.group(WALL_MS)
    p.plan(g, [ev("a"), ev("b")])
    assert all(r.durable and r.signature and signer.verify(r) for r in g.receipts)
    lazy = Planner(FakeLog().lookups(), LIMITS, STORE_TAG, durable_receipts=False)
    g2 = lazy.group(WALL_MS)
    lazy.plan(g2, [ev("a")])
    assert not g2.receipts[0].durable and g2.receipts[0].signature is None
