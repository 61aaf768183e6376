"""The pure parts of backup and fork: the manifest codec, the copy plan, the lineage
record in store.meta and the segment verdict's rule for inherited segments."""

from __future__ import annotations

import pytest

import batpak_mp as bp
from batpak_mp._format.manifest import (
    Manifest,
    ManifestFile,
    SourceSegment,
    decode_manifest,
    encode_manifest,
    plan_segments,
)
from batpak_mp._format.meta import Lineage, decode_lineage, decode_meta, encode_meta, inherited_of
from batpak_mp._format.segment import SEG_TRAILER_SIZE, encode_segment_header, segment_verdict

PARENT, FORK, OTHER = b"P" * 16, b"F" * 16, b"O" * 16
SIZE = 1 << 20


def seg(sid: int, first: int, last: int, sealed: bool) -> SourceSegment:
    return SourceSegment(sid, SIZE, first, last if sealed else 0, f"{sid:02x}" * 48 if sealed else "")


NAMES = {i: f"segments/{i:012d}.seg" for i in range(1, 6)}
LOG = [seg(1, 1, 100, True), seg(2, 101, 200, True), seg(3, 201, 0, False)]


def test_manifest_round_trip_and_damage() -> None:
    m = Manifest(PARENT, 250, 1_700_000_000_000, (ManifestFile("segments/000000000001.seg", SIZE, "ab"),))
    assert decode_manifest(encode_manifest(m), "m") == m
    for bad in (b"", b"{}", b'{"format": "batpak-mp-backup"}', b"[1]", encode_manifest(m).replace(b"5", b"x", 1)):
        with pytest.raises(bp.CorruptSegment):
            decode_manifest(bad, "m")
    newer = encode_manifest(m).replace(b'"version": 1', b'"version": 9')
    with pytest.raises(bp.FutureFormat):
        decode_manifest(newer, "m")


def test_backup_plan_copies_new_sealed_reuses_same_and_takes_a_prefix_of_the_active() -> None:
    steps = plan_segments(LOG, 250, previous={}, names=NAMES, fork=False)
    assert [(s.segment.segment_id, s.action, s.through) for s in steps] == [(1, "copy", 100), (2, "copy", 200),
                                                                           (3, "prefix", 250)]
    previous = {NAMES[1]: ManifestFile(NAMES[1], SIZE, LOG[0].seal),
                NAMES[2]: ManifestFile(NAMES[2], SIZE, "")}  # was the active prefix then: copied again
    steps = plan_segments(LOG, 250, previous=previous, names=NAMES, fork=False)
    assert [s.action for s in steps] == ["reuse", "copy", "prefix"]
    changed = {NAMES[1]: ManifestFile(NAMES[1], SIZE - 1, LOG[0].seal)}
    assert plan_segments(LOG, 250, previous=changed, names=NAMES, fork=False)[0].action == "copy"
    # a frontier inside a sealed segment: the whole sealed file (all committed), nothing after it
    assert [(s.segment.segment_id, s.through) for s in plan_segments(LOG, 150, previous={}, names=NAMES,
                                                                     fork=False)] == [(1, 100), (2, 200)]
    assert plan_segments(LOG, 0, previous={}, names=NAMES, fork=False) == []


def test_fork_plan_links_sealed_segments_before_the_point_and_owns_the_one_holding_it() -> None:
    plan = plan_segments(LOG, 150, previous={}, names={}, fork=True)
    assert [(s.segment.segment_id, s.action, s.through) for s in plan] == [(1, "link", 100), (2, "prefix", 150)]
    plan = plan_segments(LOG, 200, previous={}, names={}, fork=True)  # ends exactly at a seal: shared whole
    assert [s.action for s in plan] == ["link", "link"]
    plan = plan_segments(LOG, 230, previous={}, names={}, fork=True)
    assert [s.action for s in plan] == ["link", "link", "prefix"] and plan[-1].through == 230


def test_lineage_in_store_meta() -> None:
    lineage = Lineage(PARENT, 42, ((OTHER, 10), (PARENT, 42)))
    raw = encode_meta(FORK, 1, lineage)
    assert decode_meta(raw, "m") == FORK
    assert decode_lineage(raw, "m") == lineage and inherited_of(raw, "m") == lineage.inherited
    plain = encode_meta(PARENT, 1)
    assert decode_lineage(plain, "m") is None and inherited_of(plain, "m") == ()
    for bad in (raw.replace(b'"fork_seq": 42', b'"fork_seq": "x"'), raw.replace(PARENT.hex().encode(), b"abc", 1),
                raw.replace(b'"inherited"', b'"nothing"')):
        with pytest.raises(bp.CorruptSegment, match="lineage"):
            decode_lineage(bad, "m")


def test_a_fork_accepts_its_parents_segments_only_up_to_the_fork_point() -> None:
    tail = bytes(SEG_TRAILER_SIZE)

    def problems(header_store: bytes, first: int, inherited: tuple[tuple[bytes, int], ...]) -> list[str]:
        head = encode_segment_header(1, header_store, first, SIZE)
        v = segment_verdict("s", head, tail, SIZE, store_id=FORK, first_seq=first, unsealed_ok=True,
                            inherited=inherited)
        return [p.reason for p in v.problems]

    inherited = ((PARENT, 42),)
    assert problems(FORK, 43, inherited) == []
    assert problems(PARENT, 1, inherited) == [] and problems(PARENT, 42, inherited) == []
    assert problems(PARENT, 43, inherited) == ["segment belongs to another store"]  # after the fork point
    assert problems(OTHER, 1, inherited) == ["segment belongs to another store"]
    assert problems(PARENT, 1, ()) == ["segment belongs to another store"]  # no lineage, no inheritance
