"""Redaction and compaction in one process (issue 13 #1, #3): an erasure request, then a
compaction that swaps in a sealed segment with a stub in place of the payload. Reads
return the event flagged ``redacted`` with no payload, the chain, walk_ancestors,
receipts and ``bp.verify`` pass through it, readers that mapped the old file keep
working, space is given back; bad requests are refused with typed errors and change
nothing; a failing disk call at any step of a swap leaves every event whole and the
store verifying. Every test ends with ``bp.verify`` clean."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._format.directory import COMPACTION_MARKER, INDEX_DIR, SEGMENT_DIR
from batpak_mp._read.reader import Reader
from batpak_mp._storage.osio import Disk, FaultPlan

BLOB = "z" * 3000  # ~340 events fill a 1 MiB segment


def fill(eng: bp.Engine, n: int = 700) -> list[bp.Receipt]:
    """``n`` events over entities p-0 .. p-3, in batches of 25 (a request never spans
    two segments, so the rotations fall between batches)."""
    items = [bp.BatchItem(bp.Coordinate(f"p-{i % 4}", "people"), bp.Kind(1, 1), {"i": i, "blob": BLOB})
             for i in range(n)]
    return [r for at in range(0, n, 25) for r in eng.append_batch(items[at:at + 25])]


def seg_sizes(d: str) -> dict[str, int]:
    seg_dir = os.path.join(d, SEGMENT_DIR)
    return {n: os.path.getsize(os.path.join(seg_dir, n)) for n in sorted(os.listdir(seg_dir))}


def test_a_redacted_event_reads_as_a_stub_and_everything_still_verifies(tmp_path: Path) -> None:
    d = str(tmp_path / "s")
    with bp.Engine.open(d, SMALL) as eng:
        rs = fill(eng)
        victims = [rs[3], rs[10], rs[400]]  # two in segment 1, one in segment 2
        pending = rs[699]  # in the active segment: waits until its segment is sealed
        for r in [*victims, pending]:
            eng.redact(r.event_id, reason="erasure request #42")
        before = seg_sizes(d)
        report = eng.compact()
        assert (report.segments_rewritten, report.events_removed) == (2, 3)
        assert report.bytes_reclaimed == sum(before.values()) - sum(seg_sizes(d).values()) > 0
        for r in victims:
            ev = eng.get(r.event_id)
            assert ev.redacted and ev.payload is None and ev.payload_bytes == b""
            assert (ev.event_hash, ev.prev_hash, ev.entity_clock) == (r.event_hash, r.prev_hash, r.entity_clock)
            assert eng.verify_receipt(r)
        assert not eng.get(pending.event_id).redacted and eng.get(rs[4].event_id).payload["i"] == 4
        hist = eng.history("p-3")
        assert [e.entity_clock for e in hist] == list(range(1, 176))
        assert [e.global_sequence for e in hist if e.redacted] == [4]
        page = eng.query_after(0, limit=20, entity="p-2")
        assert [e.redacted for e in page.events][:3] == [False, False, True]  # sequence 11 is p-2's third
        walked = list(eng.walk_ancestors(rs[698].event_id))  # p-2's chain, through the stub of sequence 11
        assert len(walked) == 175 and any(e.redacted for e in walked)
        again = eng.compact()
        assert (again.segments_rewritten, again.events_removed, again.bytes_reclaimed) == (0, 0, 0)
    report_v = assert_verified(d)
    assert report_v.events_checked == 704
    with bp.Engine.open(d, SMALL) as eng:  # reopened: the stubs are in the log for good
        assert eng.get(rs[10].event_id).redacted and eng.get(rs[11].event_id).payload["i"] == 11
    assert not os.path.exists(os.path.join(d, INDEX_DIR, COMPACTION_MARKER))
    assert_verified(d)


def test_a_reader_that_mapped_the_old_segment_keeps_reading(tmp_path: Path) -> None:
    d = str(tmp_path / "s")
    with bp.Engine.open(d, SMALL) as eng:
        rs = fill(eng)
        other = Reader(d, eng.view)  # another reader of the same files (as a client's is)
        other.refresh()
        assert other.get(rs[5].event_id).payload["i"] == 5  # maps segment 1 (the old file)
        scan = other.scan(0)
        first = [next(scan) for _ in range(3)]  # a scan in progress over the old mapping
        eng.redact(rs[5].event_id, reason="gone")
        eng.compact()
        rest = list(scan)  # the old file stays readable through the mapping it holds
        assert [e.global_sequence for e in first + rest][:710] == list(range(1, len(first) + len(rest) + 1))
        ev = other.get(rs[5].event_id)  # the records now name the new file: remapped, read again
        assert ev.redacted and ev.event_hash == rs[5].event_hash
        assert other.get(rs[6].event_id).payload["i"] == 6
        other.close()
    assert_verified(d)


def test_bad_erasure_requests_are_refused_and_change_nothing(tmp_path: Path) -> None:
    d = str(tmp_path / "s")
    with bp.Engine.open(d, SMALL) as eng:
        rs = fill(eng, 5)
        eng.append_system("writer", 0x001, {"epoch": 1, "pid": 1, "recovered_through": 0, "torn_bytes_cut": 0,
                                            "recovery_ms": 0})
        system = eng.history("writer", )[0]
        visible = eng.visible
        with pytest.raises(bp.RedactionRefused, match="system events"):
            eng.redact(system.event_id, reason="no")
        with pytest.raises(bp.NotFound):
            eng.redact(rs[0].event_id[:8] + (999).to_bytes(8, "big"), reason="no such event")
        with pytest.raises(bp.InvalidArgument):
            eng.redact(b"short", reason="bad id")
        for reason in ("", "   ", "x" * 1025, None, 7):
            with pytest.raises(bp.InvalidArgument):
                eng.redact(rs[0].event_id, reason=reason)  # type: ignore[arg-type]
        assert eng.visible == visible and eng.compaction_plan() == {}
    assert_verified(d)


@pytest.mark.parametrize("op,countdown", [("open", 0), ("pwrite", 0), ("fsync", 0), ("close", 0),
                                          ("write", 0), ("rename", 0), ("rename", 1), ("fsync", 2),
                                          ("unlink", 0)])
def test_a_disk_fault_at_any_step_of_a_swap_leaves_every_event_whole(tmp_path: Path, op: str, countdown: int) -> None:
    d = str(tmp_path / "s")
    plan = FaultPlan()
    with bp.Engine.open(d, SMALL, disk=Disk(plan)) as eng:
        rs = fill(eng)
        eng.redact(rs[7].event_id, reason="erase")
        plan.fail[op] = (countdown, errno.EIO)
        try:
            eng.compact()
        except bp.StorageError:
            pass  # a step failed: the old segment or the new one is in place, whole
        plan.fail.clear()
        ev = eng.get(rs[7].event_id)
        assert ev.event_hash == rs[7].event_hash and (ev.redacted or ev.payload["i"] == 7)
        assert eng.get(rs[8].event_id).payload["i"] == 8
    assert_verified(d)
    with bp.Engine.open(d, SMALL) as eng:  # the next open cleans up; compaction then completes
        eng.compact()
        assert eng.get(rs[7].event_id).redacted and eng.get(rs[8].event_id).payload["i"] == 8
        assert not [n for n in os.listdir(os.path.join(d, SEGMENT_DIR)) if not n.endswith(".seg")]
    assert_verified(d)
