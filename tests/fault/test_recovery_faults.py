"""Recovery and fault tests of the engine, on real files with real fsync.

- a torn write at every byte offset of the log's tail is cut back to the last whole
  commit (a batch is never half kept) and the store goes on;
- a flipped bit anywhere in a sealed segment, or below the durable checkpoint in the
  active one, is corruption: ``bp.verify`` reports it and ``Engine.open`` refuses;
- ENOSPC, EIO and short writes injected through ``Disk(FaultPlan(...))`` give typed
  errors, never lose an acknowledged event and never show a half-written one;
- files from a newer format are refused with ``FutureFormat``.
Every test ends with ``bp.verify`` of the directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from _engine_helpers import (
    SegmentLayout,
    all_events,
    assert_holds_exactly,
    copy_store,
    flip_bit,
    read_layout,
    segment_ids,
    segment_path,
    set_frame_field,
    zero_range,
)
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._format.directory import CHECKPOINT_FILE, FORMAT_VERSION, INDEX_DIR, META_FILE, entities_base_name, segment_name
from batpak_mp._format.frame import FRAME_VERSION, decode_frame
from batpak_mp._format.segment import SEG_HEADER, SEG_HEADER_SIZE, SEG_TRAILER_SIZE
from batpak_mp._prepare import prepare
from batpak_mp._storage.osio import Disk, FaultPlan

K = bp.Kind(1, 7)


def coord(entity: str) -> bp.Coordinate:
    return bp.Coordinate(entity, "room:1")


def file_digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).digest()


# ---- a store with a sealed segment and a mixed tail ----------------------------------
@dataclass
class Built:
    path: str
    receipts: list[bp.Receipt]
    sealed_id: int
    active_id: int
    k0: bp.Receipt  # first event of the last batch, keyed "k0"

    def sealed(self) -> SegmentLayout:
        return read_layout(segment_path(self.path, self.sealed_id))

    def active(self) -> SegmentLayout:
        return read_layout(segment_path(self.path, self.active_id))


def _build(path: str) -> Built:
    receipts: list[bp.Receipt] = []
    with bp.Engine.open(path, SMALL) as e:
        i = 0
        while len(segment_ids(path)) < 2:  # fill segment 1 until the engine rotates
            receipts.append(e.append(coord(f"e{i % 3}"), K, {"i": i, "pad": "x" * 30_000}))
            i += 1
        # the active segment: singles and batches, entities continuing from segment 1
        receipts.append(e.append(coord("e0"), K, {"i": "single"}))
        receipts += e.append_batch([bp.BatchItem(coord("e1"), K, 1), bp.BatchItem(coord("e2"), K, 2),
                                    bp.BatchItem(coord("e1"), K, 3)])
        receipts.append(e.append(coord("e2"), K, [1, 2, 3], idempotency_key="single-3"))
        last_batch = e.append_batch([bp.BatchItem(coord("e0"), K, "a", idempotency_key="k0"),
                                     bp.BatchItem(coord("new"), K, "b", idempotency_key="k1"),
                                     bp.BatchItem(coord("e0"), K, "c", idempotency_key="k2")])
        receipts += last_batch
        receipts.append(e.append(coord("e1"), K, 1))  # a small last frame
        assert e.visible == len(receipts)
    assert_verified(path)
    ids = segment_ids(path)
    return Built(path, receipts, ids[0], ids[-1], last_batch[0])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(os.path.join(tmp_path_factory.mktemp("built"), "data"))


@pytest.fixture
def fresh(tmp_path: os.PathLike[str]) -> Iterator[str]:
    """A scratch directory for copies, removed as the test goes."""
    yield os.fspath(tmp_path)


def test_built_store_shape(built: Built) -> None:
    sealed, active = built.sealed(), built.active()
    assert sealed.trailer is not None and active.trailer is None
    # the event that made the engine rotate, then the singles and batches above
    assert [len(c) for c in active.commits()] == [1, 1, 3, 1, 3, 1]
    assert len(sealed.frames) + len(active.frames) == len(built.receipts)


# ---- 2. a torn write at every offset of the tail ------------------------------------
def _cut_offsets(active: SegmentLayout) -> list[int]:
    commits = active.commits()
    region_start = commits[-2][0].offset
    last = active.frames[-1]
    offsets = set(range(last.offset, active.end + 1))  # every byte of the last frame, and no cut
    for f in active.frames:  # every frame boundary (and its neighbours), everywhere in the segment
        offsets |= {f.offset - 1, f.offset, f.offset + 1}
    for f in commits[-2]:  # the length word and CRC of each frame of the last batch
        offsets |= set(range(f.offset, f.offset + 12))
    rng = random.Random(20240611)
    offsets |= set(rng.sample(range(region_start, active.end), 40))
    return sorted(o for o in offsets if SEG_HEADER_SIZE <= o <= active.end)


def test_torn_tail_at_every_offset(built: Built, fresh: str) -> None:
    active = built.active()
    sealed_count = len(built.sealed().frames)
    commit_ends = []  # (end offset, events through this commit)
    n = sealed_count
    for c in active.commits():
        n += len(c)
        commit_ends.append((c[-1].offset + c[-1].frame_len, n))
    offsets = _cut_offsets(active)
    assert len(offsets) > 150
    for off in offsets:
        copy = copy_store(built.path, os.path.join(fresh, f"cut-{off}"))
        seg = segment_path(copy, built.active_id)
        size = os.path.getsize(seg)
        zero_range(seg, off, active.end)
        assert os.path.getsize(seg) == size
        os.unlink(os.path.join(copy, CHECKPOINT_FILE))  # so the floor does not (rightly) flag the cut
        expected = max([n for end, n in commit_ends if end <= off], default=sealed_count)
        kept = built.receipts[:expected]
        with bp.Engine.open(copy, SMALL) as e:
            assert e.visible == expected, f"cut at {off}"
            assert [ev.event_id for ev in all_events(e)] == [r.event_id for r in kept], f"cut at {off}"
            # the store goes on: a key of a cut commit is new again, a kept one is a duplicate
            again = e.append(coord("e0"), K, "a", idempotency_key="k0")
            if built.k0 in kept:
                assert again._replace(deduplicated=False) == built.k0 and e.visible == expected
            else:
                assert again.global_sequence == expected + 1
            e1_head = [r for r in kept if r.entity == "e1"][-1]
            r = e.append(coord("e1"), K, "after", expected_clock=e1_head.entity_clock)
            assert r.global_sequence == e.visible and r.prev_hash == e1_head.event_hash
            assert [h.event_id for h in e.history("e1")][-2:] == [e1_head.event_id, r.event_id]
        report = assert_verified(copy)
        assert report.events_checked == e.visible
        shutil.rmtree(copy)


def test_torn_tail_inside_a_batch_keeps_no_part_of_it(built: Built, fresh: str) -> None:
    """The frames of a batch before the tear are whole and valid, yet none is kept."""
    active = built.active()
    batch = active.commits()[-2]
    copy = copy_store(built.path, os.path.join(fresh, "c"))
    zero_range(segment_path(copy, built.active_id), batch[-1].offset, active.end)
    os.unlink(os.path.join(copy, CHECKPOINT_FILE))
    with bp.Engine.open(copy, SMALL) as e:
        assert e.visible == batch[0].seq - 1
        assert e.recovery_report["torn_bytes_cut"] >= batch[0].frame_len + batch[1].frame_len
        with pytest.raises(bp.NotFound):
            e.get(built.receipts[batch[0].seq - 1].event_id)
    # the cut is zeroed on disk: the whole frames of the batch cannot come back
    with open(segment_path(copy, built.active_id), "rb") as f:
        f.seek(batch[0].offset)
        assert not any(f.read(active.end - batch[0].offset))
    assert_verified(copy)


def test_torn_tail_below_the_checkpoint_is_corruption(built: Built, fresh: str) -> None:
    """With the checkpoint kept, losing a durable commit is refused, not cut."""
    active = built.active()
    copy = copy_store(built.path, os.path.join(fresh, "c"))
    seg = segment_path(copy, built.active_id)
    zero_range(seg, active.frames[-1].offset + 20, active.end)
    before = file_digest(seg)
    with pytest.raises(bp.CorruptSegment):
        bp.Engine.open(copy, SMALL)
    assert file_digest(seg) == before  # fail closed: nothing was cut
    assert not bp.verify(copy).ok


# ---- 3. flipped bits -----------------------------------------------------------------
def _sealed_positions(layout: SegmentLayout) -> dict[str, list[int]]:
    assert layout.trailer is not None
    foff, flen = layout.trailer.footer_offset, layout.trailer.footer_len
    rng = random.Random(7)
    regions = {
        "header": (0, SEG_HEADER.size),
        "header padding": (SEG_HEADER.size, SEG_HEADER_SIZE),
        "frames": (SEG_HEADER_SIZE, foff),
        "footer": (foff, foff + flen),
        "padding": (foff + flen, layout.size - SEG_TRAILER_SIZE),
        "trailer": (layout.size - SEG_TRAILER_SIZE, layout.size),
    }
    out = {name: rng.sample(range(a, b), min(6, b - a)) for name, (a, b) in regions.items()}
    out["frames"] += [f.offset + d for f in layout.frames[:3] for d in (0, 3, 4, 8, 150, 177)]
    out["trailer"] += [layout.size - 1, layout.size - SEG_TRAILER_SIZE]
    return out


def test_flipped_bit_in_a_sealed_segment(built: Built, fresh: str) -> None:
    layout = built.sealed()
    name = segment_name(built.sealed_id)
    rng = random.Random(11)
    checked = 0
    for region, positions in _sealed_positions(layout).items():
        for pos in positions:
            copy = copy_store(built.path, os.path.join(fresh, f"flip-{pos}"))
            seg = segment_path(copy, built.sealed_id)
            flip_bit(seg, pos, rng.randrange(8))
            damaged = file_digest(seg)
            report = bp.verify(copy)
            assert not report.ok, (region, pos)
            assert any(p.segment == name for p in report.problems), (region, pos, report.problems)
            with pytest.raises(bp.CorruptSegment) as ei:
                bp.Engine.open(copy, SMALL)
            assert name in str(ei.value.segment), (region, pos)
            assert file_digest(seg) == damaged, (region, pos)  # refused, not repaired over
            shutil.rmtree(copy)
            checked += 1
    assert checked >= 40


def test_flipped_bit_in_the_active_segment_below_the_checkpoint(built: Built, fresh: str) -> None:
    layout = built.active()
    name = segment_name(built.active_id)
    rng = random.Random(12)
    for f in layout.frames:  # every frame, durable per the checkpoint written at close
        for pos in (f.offset + rng.randrange(f.frame_len), f.offset + rng.randrange(8)):
            copy = copy_store(built.path, os.path.join(fresh, f"flip-{pos}"))
            seg = segment_path(copy, built.active_id)
            flip_bit(seg, pos, rng.randrange(8))
            damaged = file_digest(seg)
            with pytest.raises(bp.CorruptSegment):
                bp.Engine.open(copy, SMALL)
            assert file_digest(seg) == damaged, pos  # nothing was cut
            report = bp.verify(copy)
            assert not report.ok and any(p.segment == name for p in report.problems), (pos, report.problems)
            shutil.rmtree(copy)


def test_flipped_bit_in_the_active_header(built: Built, fresh: str) -> None:
    rng = random.Random(13)
    for pos in [*rng.sample(range(SEG_HEADER.size), 6), SEG_HEADER_SIZE - 1]:
        copy = copy_store(built.path, os.path.join(fresh, f"flip-{pos}"))
        flip_bit(segment_path(copy, built.active_id), pos, rng.randrange(8))
        assert not bp.verify(copy).ok
        with pytest.raises(bp.CorruptSegment):
            bp.Engine.open(copy, SMALL)
        shutil.rmtree(copy)


# ---- 4. faults through the Disk seam -------------------------------------------------
@dataclass
class Faulty:
    engine: bp.Engine
    plan: FaultPlan
    acked: list[bp.Receipt]


def open_faulty(path: str, n: int = 3) -> Faulty:
    plan = FaultPlan()
    e = bp.Engine.open(path, SMALL, disk=Disk(plan))
    acked = [e.append(coord(f"e{i % 2}"), K, {"i": i}) for i in range(n)]
    return Faulty(e, plan, acked)


def reopen_and_check(path: str, acked: list[bp.Receipt]) -> None:
    """Reopen with a normal Disk: exactly the acknowledged events, and it goes on."""
    with bp.Engine.open(path, SMALL) as e:
        assert_holds_exactly(e, acked)
        r = e.append(coord("e0"), K, "after reopen")
        assert r.global_sequence == len(acked) + 1
    assert_verified(path)


def test_pwrite_enospc(data_dir: str) -> None:
    f = open_faulty(data_dir)
    e = f.engine
    f.plan.fail["pwrite"] = (0, errno.ENOSPC)
    with pytest.raises(bp.StorageError) as ei:
        e.append(coord("e0"), K, "refused")
    assert ei.value.errno == errno.ENOSPC and ei.value.op == "pwrite"
    assert not isinstance(ei.value, bp.StorePoisoned) and isinstance(ei.value, OSError)
    assert e.visible == 3 and [h.global_sequence for h in e.history("e0")] == [1, 3]
    # a batch refused the same way, then the disk has room again
    f.plan.fail["pwrite"] = (0, errno.ENOSPC)
    with pytest.raises(bp.StorageError):
        e.append_batch([bp.BatchItem(coord("e0"), K, 1), bp.BatchItem(coord("e1"), K, 2)])
    assert e.visible == 3
    f.acked.append(e.append(coord("e0"), K, "fits", expected_clock=2))
    assert f.acked[-1].global_sequence == 4 and f.acked[-1].prev_hash == f.acked[2].event_hash
    # several requests in one group: each gets the error
    f.plan.fail["pwrite"] = (0, errno.ENOSPC)
    reqs = [[prepare(coord(f"e{i}"), K, i, idempotency_key=None, expected_clock=None, causation_id=None,
                     correlation_id=None, max_payload=1 << 20)] for i in range(3)]
    results = e.commit(reqs)
    assert all(isinstance(r, bp.StorageError) for r in results), results
    f.acked += e.append_batch([bp.BatchItem(coord("e1"), K, 5), bp.BatchItem(coord("e2"), K, 6)])
    assert f.plan.calls["pwrite"] >= 6
    e.close()
    reopen_and_check(data_dir, f.acked)


@pytest.mark.parametrize("cut", [0, 1, 4, 8, 100, 176, 200, 400])
def test_short_write(data_dir: str, cut: int) -> None:
    f = open_faulty(data_dir)
    e = f.engine
    assert e._seg is not None
    end = e._seg.end
    seg = segment_path(data_dir, e._seg.segment_id)
    f.plan.short_write_at = cut
    with pytest.raises(bp.StorageError) as ei:
        e.append_batch([bp.BatchItem(coord("e0"), K, "x" * 20), bp.BatchItem(coord("e1"), K, "y" * 20)])
    assert ei.value.errno == errno.ENOSPC
    with open(seg, "rb") as fh:  # what landed was zeroed again
        fh.seek(end)
        assert not any(fh.read(1024))
    assert e.visible == 3
    f.acked.append(e.append(coord("e1"), K, "next"))
    assert f.acked[-1].global_sequence == 4
    e.close()
    reopen_and_check(data_dir, f.acked)


@pytest.mark.parametrize("whole_frames", [0, 1])
def test_short_write_that_cannot_be_cleaned_up_poisons(data_dir: str, whole_frames: int) -> None:
    """The write tears and zeroing the torn bytes fails too: the engine stops, and
    recovery cuts what landed (a whole first frame of a batch included)."""
    f = open_faulty(data_dir)
    e = f.engine
    items = [bp.BatchItem(coord("e0"), K, "x" * 20), bp.BatchItem(coord("e1"), K, "y" * 20)]
    p0 = prepare(items[0].coord, K, items[0].payload, idempotency_key=None, expected_clock=None,
                 causation_id=None, correlation_id=None, max_payload=1 << 20)
    first_len = 176 + len(p0.entity) + len(p0.scope) + len(p0.payload)
    f.plan.short_write_at = first_len if whole_frames else 50
    f.plan.fail["zero_range"] = (0, errno.EIO)
    with pytest.raises(bp.StorageError):
        e.append_batch(items)
    with pytest.raises(bp.StorePoisoned):
        e.append(coord("e0"), K, "later")
    e.close()
    reopen_and_check(data_dir, f.acked)


def test_fsync_eio_poisons_for_good(data_dir: str) -> None:
    f = open_faulty(data_dir)
    e = f.engine
    f.plan.fail["fsync"] = (0, errno.EIO)
    with pytest.raises(bp.StorePoisoned) as ei:
        e.append(coord("e0"), K, "never acknowledged")
    assert ei.value.errno == errno.EIO and isinstance(ei.value, bp.StorageError)
    assert e.visible == 3  # nothing of the failed commit was published
    first = f.acked[0]
    calls: list[Callable[[], object]] = [
        lambda: e.append(coord("e0"), K, 1),
        lambda: e.append_batch([bp.BatchItem(coord("e0"), K, 1)]),
        lambda: e.get(first.event_id),
        lambda: e.history("e0"),
        lambda: e.query_after(0),
        lambda: e.walk_ancestors(first.event_id),
        lambda: e.verify_receipt(first),
        lambda: e.sync(),
        lambda: e.checkpoint(),
    ]
    for call in calls:
        with pytest.raises(bp.StorePoisoned):
            call()
    fsyncs = f.plan.calls["fsync"]
    e.close()  # closing a poisoned engine releases it without another fsync
    assert f.plan.calls.get("fsync", 0) == fsyncs
    for call in calls:
        with pytest.raises(bp.BatpakError):
            call()
    reopen_and_check(data_dir, f.acked)


def test_fsync_eio_on_a_batch_shows_none_of_it(data_dir: str) -> None:
    f = open_faulty(data_dir)
    f.plan.fail["fsync"] = (0, errno.EIO)
    with pytest.raises(bp.StorePoisoned):
        f.engine.append_batch([bp.BatchItem(coord(f"b{i}"), K, i, idempotency_key=f"b{i}") for i in range(5)])
    f.engine.close()
    reopen_and_check(data_dir, f.acked)
    with bp.Engine.open(data_dir, SMALL) as e:  # the keys are new: the batch never happened
        r = e.append(coord("b0"), K, 0, idempotency_key="b0")
        assert r.entity_clock == 1 and r.global_sequence == len(f.acked) + 2
    assert_verified(data_dir)


def _fill_until_rotation_is_near(e: bp.Engine, acked: list[bp.Receipt], room: int) -> None:
    assert e._seg is not None
    while e._seg.size - e._seg.end > room:
        acked.append(e.append(coord("e0"), K, "x" * 20_000))
    assert e._seg.segment_id == 1


def test_fallocate_fails_at_rotation(data_dir: str) -> None:
    f = open_faulty(data_dir)
    e = f.engine
    _fill_until_rotation_is_near(e, f.acked, 60_000)
    f.plan.fail["fallocate"] = (0, errno.ENOSPC)
    with pytest.raises(bp.StorageError) as ei:
        e.append(coord("e1"), K, "y" * 100_000)  # needs the next segment
    assert ei.value.errno == errno.ENOSPC and ei.value.op == "fallocate"
    assert not isinstance(ei.value, bp.StorePoisoned)
    assert segment_ids(data_dir) == [1]  # the half-made segment is gone
    assert e.visible == len(f.acked)
    # a small event would still fit in the old segment: it must not land after its seal
    f.acked.append(e.append(coord("e1"), K, "small"))
    e.close()
    assert_verified(data_dir)
    reopen_and_check(data_dir, f.acked)
    with bp.Engine.open(data_dir, SMALL) as e:  # the next segment, now that there is room
        e.append(coord("e1"), K, "y" * 100_000)
        assert e.visible == len(f.acked) + 2
    assert len(segment_ids(data_dir)) >= 2
    assert_verified(data_dir)


def test_fallocate_fails_twice_then_recovers(data_dir: str) -> None:
    f = open_faulty(data_dir)
    e = f.engine
    _fill_until_rotation_is_near(e, f.acked, 60_000)
    for _ in range(2):
        f.plan.fail["fallocate"] = (0, errno.ENOSPC)
        with pytest.raises(bp.StorageError):
            e.append(coord("e1"), K, "y" * 100_000)
    e.close()  # closed while the first segment is sealed and no next one exists
    reopen_and_check(data_dir, f.acked)


def test_fsync_eio_while_sealing(data_dir: str) -> None:
    f = open_faulty(data_dir)
    e = f.engine
    _fill_until_rotation_is_near(e, f.acked, 60_000)
    f.plan.fail["fsync"] = (0, errno.EIO)
    with pytest.raises(bp.StorePoisoned):
        e.append(coord("e1"), K, "y" * 100_000)
    with pytest.raises(bp.StorePoisoned):
        e.append(coord("e1"), K, "small")
    e.close()
    reopen_and_check(data_dir, f.acked)


def test_faults_while_opening_are_typed_and_release_the_lock(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        acked = [e.append(coord("e0"), K, i) for i in range(3)]
    for op, err in (("fsync", errno.EIO), ("write", errno.ENOSPC), ("mmap", errno.ENOMEM),
                    ("pread", errno.EIO), ("open", errno.EMFILE), ("zero_range", errno.EIO)):
        plan = FaultPlan(fail={op: (0, err)})
        with pytest.raises(bp.StorageError) as ei:
            bp.Engine.open(data_dir, SMALL, disk=Disk(plan))
        assert ei.value.errno == err, op
        assert plan.calls.get(op, 0) >= 1
    reopen_and_check(data_dir, acked)


# ---- crash in the middle of a rotation ------------------------------------------------
@pytest.mark.parametrize("state", ["empty", "allocated"])
def test_next_segment_whose_header_never_landed(built: Built, fresh: str, state: str) -> None:
    """A kill between creating the next segment file and writing its header leaves an
    empty (or zero-filled) file: no frame can be in it, so recovery drops it."""
    copy = copy_store(built.path, os.path.join(fresh, "c"))
    nxt = segment_path(copy, built.active_id + 1)
    with open(nxt, "wb") as fh:
        if state == "allocated":
            fh.truncate(SMALL.segment_max_bytes)
    assert_verified(copy)  # no event is missing: verify does not call it damage
    with bp.Engine.open(copy, SMALL) as e:
        assert_holds_exactly(e, built.receipts)
        e.append(coord("e0"), K, 1)
    assert segment_ids(copy) == [built.sealed_id, built.active_id]
    assert_verified(copy)


def test_a_zeroed_header_with_frames_behind_it_is_not_dropped(built: Built, fresh: str) -> None:
    copy = copy_store(built.path, os.path.join(fresh, "c"))
    seg = segment_path(copy, built.active_id)
    zero_range(seg, 0, SEG_HEADER_SIZE)
    with pytest.raises(bp.CorruptSegment):
        bp.Engine.open(copy, SMALL)
    assert os.path.exists(seg)
    assert not bp.verify(copy).ok


def test_reopening_keeps_the_base_tables(built: Built, fresh: str) -> None:
    """The base tables cover the sealed segments only; a clean reopen reuses them
    instead of rebuilding (and rewriting) them."""
    copy = copy_store(built.path, os.path.join(fresh, "c"))
    base = os.path.join(copy, INDEX_DIR, entities_base_name(built.sealed_id))
    for _ in range(2):
        inode = os.stat(base).st_ino
        plan = FaultPlan()
        with bp.Engine.open(copy, SMALL, disk=Disk(plan)) as e:
            assert e.visible == len(built.receipts)
        assert os.stat(base).st_ino == inode
    assert_verified(copy)


# ---- 5. future formats ---------------------------------------------------------------
def test_future_store_meta(built: Built, fresh: str) -> None:
    copy = copy_store(built.path, os.path.join(fresh, "c"))
    meta = os.path.join(copy, META_FILE)
    with open(meta) as fh:
        doc = json.load(fh)
    doc["format_version"] = FORMAT_VERSION + 1
    with open(meta, "w") as fh:
        json.dump(doc, fh)
    with pytest.raises(bp.FutureFormat) as ei:
        bp.Engine.open(copy, SMALL)
    assert ei.value.found == FORMAT_VERSION + 1 and ei.value.supported == FORMAT_VERSION
    assert not bp.verify(copy).ok


@pytest.mark.parametrize("which", ["sealed", "active"])
def test_future_segment_header(built: Built, fresh: str, which: str) -> None:
    copy = copy_store(built.path, os.path.join(fresh, "c"))
    seg = segment_path(copy, built.sealed_id if which == "sealed" else built.active_id)
    with open(seg, "r+b") as fh:
        head = bytearray(fh.read(SEG_HEADER_SIZE))
        struct.pack_into("<I", head, 8, FORMAT_VERSION + 1)
        struct.pack_into("<I", head, SEG_HEADER.size - 4, zlib.crc32(head[: SEG_HEADER.size - 4]))
        fh.seek(0)
        fh.write(head)
    before = file_digest(seg)
    with pytest.raises(bp.FutureFormat) as ei:
        bp.Engine.open(copy, SMALL)
    assert ei.value.found == FORMAT_VERSION + 1
    assert file_digest(seg) == before
    assert not bp.verify(copy).ok


def test_future_frame_version_in_a_real_segment(built: Built) -> None:
    layout = built.active()
    with open(segment_path(built.path, built.active_id), "rb") as fh:
        fh.seek(layout.frames[0].offset)
        raw = fh.read(layout.frames[0].frame_len)
    assert decode_frame(raw) is not None
    with pytest.raises(bp.FutureFormat) as ei:
        decode_frame(set_frame_field(raw, "<H", 8, FRAME_VERSION + 1), segment="s")
    assert ei.value.found == FRAME_VERSION + 1


def test_unicode_idempotency_keys(data_dir: str) -> None:
    """Any str key is accepted, a lone surrogate included (typed, never a raw
    UnicodeEncodeError), and deduplicates."""
    with bp.Engine.open(data_dir, SMALL) as e:
        r = e.append(coord("e0"), K, 1, idempotency_key="\ud800")
        assert e.append(coord("e0"), K, 1, idempotency_key="\ud800")._replace(deduplicated=False) == r
        assert e.append(coord("e0"), K, 1, idempotency_key="\udfff").global_sequence == 2
        assert e.visible == 2
    assert_verified(data_dir)
