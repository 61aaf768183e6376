"""Reader.scan: the whole log in commit order without payload decode, across segments."""

from __future__ import annotations

import os

import pytest
from conftest import SMALL, assert_verified

import batpak_mp as bp

K = bp.Kind(1, 2)


def _fields(ev: bp.Event) -> tuple[object, ...]:
    return (ev.event_id, ev.global_sequence, ev.coordinate, ev.kind, ev.entity_clock, ev.wall_ms,
            ev.payload_bytes, ev.payload_version, ev.event_hash, ev.prev_hash, ev.causation_id,
            ev.correlation_id)


def _fill(e: bp.Engine, batches: int) -> None:
    for b in range(batches):
        e.append_batch([
            bp.BatchItem(bp.Coordinate(f"ent{i % 7}", "sc"), K, {"i": i, "pad": "x" * 300},
                         causation_id=b"\1" * 16 if i % 3 == 0 else None)
            for i in range(b * 100, b * 100 + 100)
        ])


def test_scan_matches_query_after_across_segments(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        _fill(e, 60)  # ~3 MB: several sealed segments
        # names that concatenate alike must stay apart
        e.append(bp.Coordinate("ab", "c"), K, 1)
        e.append(bp.Coordinate("a", "bc"), K, 2)
        paged: list[bp.Event] = []
        after = 0
        while page := e.query_after(after, limit=333).events:
            paged += page
            after = page[-1].global_sequence
        scanned = list(e.reader.scan())
        assert [_fields(x) for x in scanned] == [_fields(x) for x in paged]
        assert len(scanned) == e.visible == 6002
        assert [ev.global_sequence for ev in e.reader.scan(after=5990)] == list(range(5991, 6003))
        assert list(e.reader.scan(after=6002)) == []
        assert scanned[-1].payload == 2
        # bounded by the frontier at the call
        it = e.reader.scan(after=5999)
        first = next(it)
        e.append(bp.Coordinate("z", "s"), K, 3)
        assert [first.global_sequence, *(ev.global_sequence for ev in it)] == [6000, 6001, 6002]
        with pytest.raises(bp.InvalidArgument):
            list(e.reader.scan(after=-1))
    assert_verified(data_dir)


def test_scan_fails_closed_on_a_changed_byte(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        _fill(e, 40)
        seg_dir = os.path.join(data_dir, "segments")
        first = os.path.join(seg_dir, sorted(os.listdir(seg_dir))[0])
        with open(first, "r+b") as f:
            f.seek(300_000)
            byte = f.read(1)
            f.seek(300_000)
            f.write(bytes([byte[0] ^ 1]))
        with pytest.raises(bp.CorruptSegment):
            list(e.reader.scan())
